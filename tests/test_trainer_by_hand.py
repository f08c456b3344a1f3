"""The training recipe around every algorithm, by hand (a mutation audit of rsmatch/trainer.py):
USB's optimizer (SGD, Nesterov momentum, no weight decay on 1-d parameters), its cosine
schedule, gradient clipping, which evaluation is the best one and what `best/` holds, and the
logging windows."""

import json
import math

import pytest
import torch

from rsmatch.trainer import Trainer, cosine_schedule

from .conftest import tiny_config


def _trainer(sources, tmp_path, **extra) -> Trainer:
    return Trainer(tiny_config(sources, tmp_path / "run", algorithm="supervised", **extra))


def _flat(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in trainer.live_model.parameters()])


def test_cosine_schedule_by_hand():
    """USB's factor cos(pi * 7/16 * k / K) at k = 0, K/2, K."""
    factor = cosine_schedule(16, 7 / 16)
    assert factor(0) == 1.0
    assert factor(8) == pytest.approx(0.7730105, abs=1e-7)  # cos(7 pi / 32)
    assert factor(16) == pytest.approx(0.1950903, abs=1e-7)  # cos(7 pi / 16)
    assert cosine_schedule(16, 1.0)(8) == pytest.approx(0.0, abs=1e-12)  # cos(pi / 2)
    # past cos's first zero the factor stays 0, as USB's max(0, cos): cos(3 pi / 4) = -0.707
    assert cosine_schedule(16, 1.0)(12) == 0.0 and cosine_schedule(16, 1.0)(16) == 0.0


def test_optimizer_is_nesterov_sgd_without_decay_on_1d_parameters(sources, tmp_path):
    """Every trained parameter in exactly one group; weight decay (train.weight_decay) on the
    convolution and linear weights only, none on BatchNorm's weights and the biases; the
    configured learning rate and momentum, with Nesterov."""
    trainer = _trainer(
        sources, tmp_path, **{"train.lr": 0.05, "train.momentum": 0.8, "train.weight_decay": 0.01}
    )
    groups = trainer.optimizer.param_groups
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in trainer.live_model.parameters())
    for g in groups:
        assert g["nesterov"] is True and g["momentum"] == 0.8 and g["lr"] == 0.05
        for p in g["params"]:
            assert g["weight_decay"] == (0.01 if p.dim() > 1 else 0.0), tuple(p.shape)
    assert {g["weight_decay"] for g in groups} == {0.0, 0.01}


def test_learning_rate_follows_the_cosine_step_by_step(sources, tmp_path):
    """After k steps of a 4-step run the rate is 0.05 * cos(7 pi k / 64)."""
    trainer = _trainer(sources, tmp_path, **{"train.lr": 0.05})
    rates = []
    for k in range(4):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.train_step(k)
    assert rates == pytest.approx([0.05, 0.0470772, 0.03865052, 0.02570514], abs=1e-8)


@pytest.mark.parametrize("clip, expected", [(0.01, 0.03 * 1.9 * 0.01), (0.02, 0.03 * 1.9 * 0.02)])
def test_first_step_moves_the_weights_by_lr_times_1_plus_momentum_times_the_clip(
    sources, tmp_path, clip, expected
):
    """Without weight decay, the first Nesterov step moves the parameters by
    lr * (1 + momentum) * g, and clipping makes the norm of g the clip value (the gradient of
    a freshly initialised network is far larger): |dtheta| = 0.03 * 1.9 * clip."""
    trainer = _trainer(
        sources, tmp_path,
        **{"train.lr": 0.03, "train.momentum": 0.9, "train.weight_decay": 0.0,
           "train.clip_grad_norm": clip},
    )  # fmt: skip
    before = _flat(trainer)
    trainer.train_step(0)
    assert (_flat(trainer) - before).norm().item() == pytest.approx(expected, rel=1e-4)


def test_no_clipping_by_default(sources, tmp_path):
    """train.clip_grad_norm = 0 is off: the first step moves the weights by far more than any
    clip value above would allow (and does move them)."""
    trainer = _trainer(sources, tmp_path, **{"train.weight_decay": 0.0})
    before = _flat(trainer)
    trainer.train_step(0)
    assert (_flat(trainer) - before).norm().item() > 0.03 * 1.9 * 0.5


def test_best_is_the_first_evaluation_of_the_highest_accuracy(sources, tmp_path, monkeypatch):
    """An evaluation is the best only when strictly better: a tie keeps the earlier step, and
    `best/` is written only on a new best, whole, with no temporary folders left."""
    trainer = _trainer(sources, tmp_path)
    trainer.prepare_output()
    accuracies = iter([0.5, 0.5, 0.7, 0.6])
    monkeypatch.setattr("rsmatch.evaluate.accuracy", lambda *_: next(accuracies))
    exported = []
    export = trainer.export
    trainer.export = lambda folder=None: exported.append(folder.name) or export(folder)
    for step in (2, 4, 6, 8):
        trainer._evaluate(step)
    rows = [
        json.loads(line)
        for line in (tmp_path / "run" / "evals.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert [(r["step"], r["best_acc"], r["best_step"]) for r in rows] == [
        (2, 0.5, 2), (4, 0.5, 2), (6, 0.7, 6), (8, 0.7, 6)
    ]  # fmt: skip
    assert exported == [".best.tmp", ".best.tmp"]  # steps 2 and 6
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "best" in names and ".best.tmp" not in names and ".best.old" not in names
    assert (tmp_path / "run" / "best" / "model" / "model.safetensors").is_file()
    record = json.loads((tmp_path / "run" / "best" / "best.json").read_text(encoding="utf-8"))
    assert record == {"step": 6, "test_acc": 0.7}
    trainer.lock.release()


def test_a_first_evaluation_at_zero_accuracy_is_the_best_so_far(sources, tmp_path, monkeypatch):
    """0% (a tiny or diverged run) is still the first best: best/ and best_step name it, and a
    later 0% is a tie, not a new best."""
    trainer = _trainer(sources, tmp_path)
    trainer.prepare_output()
    accuracies = iter([0.0, 0.0, 0.25])
    monkeypatch.setattr("rsmatch.evaluate.accuracy", lambda *_: next(accuracies))
    for step in (2, 4):
        trainer._evaluate(step)
    assert (trainer.state.best_acc, trainer.state.best_step) == (0.0, 2)
    record = json.loads((tmp_path / "run" / "best" / "best.json").read_text(encoding="utf-8"))
    assert record == {"step": 2, "test_acc": 0.0}
    trainer._evaluate(6)
    assert (trainer.state.best_acc, trainer.state.best_step) == (0.25, 6)
    trainer.lock.release()


def test_logs_every_log_every_steps_and_the_last_partial_window(sources, tmp_path):
    """log_every = 2 over 5 steps logs at steps 2, 4 and 5, each the mean of its own window:
    the loss logged at step 5 is step 5's alone, at step 2 the mean of steps 1 and 2."""
    trainer = _trainer(sources, tmp_path, **{"train.steps": 5, "train.log_every": 2,
                                             "train.eval_every": 5, "train.save_every": 5})  # fmt: skip
    losses, logged = [], {}
    step = trainer.train_step

    def recorded(k):
        out = step(k)
        losses.append(out["loss"].item())
        return out

    trainer.train_step = recorded
    log = trainer.accelerator.log

    def logging(values, step):
        logged.setdefault(step, values)
        log(values, step=step)

    trainer.accelerator.log = logging
    trainer.fit()
    assert sorted(logged) == [2, 4, 5]
    assert logged[2]["loss"] == pytest.approx((losses[0] + losses[1]) / 2, rel=1e-6)
    assert logged[4]["loss"] == pytest.approx((losses[2] + losses[3]) / 2, rel=1e-6)
    assert logged[5]["loss"] == pytest.approx(losses[4], rel=1e-6)
    # the rate logged is the one the next step will use: lr * cos(7 pi k / (16 * 5)) at k = 2
    assert logged[2]["lr"] == pytest.approx(0.03 * math.cos(7 * math.pi * 2 / 80), rel=1e-6)


def test_a_metric_logged_with_its_graph_is_refused(sources, tmp_path):
    """Kept until the next log, a logged tensor with its graph would keep every step's
    activations alive: the trainer refuses it by name (detached values pass)."""
    trainer = _trainer(sources, tmp_path)
    window = {}
    trainer._collect(window, {"ok": torch.ones(1)})
    with pytest.raises(RuntimeError, match="'leak' with its autograd graph attached"):
        trainer._collect({}, {"leak": torch.ones(1, requires_grad=True) * 2})
    assert list(window) == ["ok"]
