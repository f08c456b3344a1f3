"""The trainer's lifecycle, by hand (a mutation audit of rsmatch/trainer.py): what __init__
resolves and applies, what prepare_output records in run.json, which steps evaluate and save,
what metrics.json and the eval/ logs hold, how a signal stops a run, and the small helpers."""

import json
import signal
from types import SimpleNamespace

import pytest
import torch

from rsmatch import runfolder
from rsmatch.config import ConfigError
from rsmatch.models import Normalize
from rsmatch.trainer import Trainer, _hparams

from .conftest import tiny_config


def _trainer(sources, tmp_path, **extra) -> Trainer:
    return Trainer(tiny_config(sources, tmp_path / "run", algorithm="supervised", **extra))


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("prefetch, resolved", [(True, True), ("auto", False), (False, False)])
def test_run_json_records_what_the_trainer_resolved(sources, tmp_path, prefetch, resolved):
    """On one CPU process: world size 1, device cpu, precision as configured, prefetch on only
    when asked for (`auto` is CUDA only), no CUDA graphs, and the split's counts: 4 labels per
    class of 3 classes, the other 90 - 12 = 78 training images unlabeled, 3 * 10 test images."""
    trainer = _trainer(sources, tmp_path, **{"train.prefetch": prefetch})
    assert trainer.prefetch is resolved
    trainer.prepare_output()
    run = json.loads((tmp_path / "run" / "run.json").read_text(encoding="utf-8"))
    assert run["world_size"] == 1 and run["device"] == "cpu"
    assert run["mixed_precision"] == "no" and run["precision"]["mixed_precision"] == "no"
    assert run["precision"]["channels_last"] is False
    assert run["prefetch"] is resolved and run["graph_batches"] is False
    assert run["counts"] == {"labeled": 12, "unlabeled": 78, "test": 30}
    assert run["split"]["labels_per_class"] == 4 and run["split"]["seed"] == 0
    assert [h["event"] for h in run["history"]] == ["start"]
    assert run["history"][0]["resumed_from"] is None
    assert (tmp_path / "run" / ".lock").exists()  # held for the whole run
    trainer.batches.close()
    trainer.lock.release()


def test_channels_last_reaches_the_weights_and_every_normalize(sources, tmp_path):
    """train.channels_last=true: every convolution weight is channels_last, and each Normalize (the
    model's input) is told to lay its output out the same way; off, neither."""
    on = _trainer(sources, tmp_path / "on", **{"train.channels_last": True})
    off = _trainer(sources, tmp_path / "off")
    for trainer, want in ((on, True), (off, False)):
        # 3x3 kernels (a 1x1 one is contiguous both ways)
        weights = [p for p in trainer.live_model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
        assert weights, "no convolution found"
        for p in weights:
            assert p.is_contiguous(memory_format=torch.channels_last) is want, tuple(p.shape)
        norms = [m for m in trainer.live_model.modules() if isinstance(m, Normalize)]
        assert norms and all(m.channels_last is want for m in norms)


@pytest.mark.parametrize(
    "world, setting, device, expected",
    [
        (1, True, "cuda", False),  # one process: nothing to synchronise
        (1, True, "cpu", False),  # ... and so nothing to refuse
        (2, "auto", "cuda", True),
        (2, True, "cuda", True),
        (2, False, "cuda", False),
        (2, "auto", "cpu", False),
    ],
)
def test_sync_bn_resolution(world, setting, device, expected):
    """SyncBatchNorm only with several processes on CUDA; `auto` means on there."""
    ranks = SimpleNamespace(world=world)
    assert Trainer._resolve_sync_bn(ranks, setting, device) is expected


def test_sync_bn_true_on_cpu_with_several_processes_is_refused():
    with pytest.raises(
        ConfigError, match=r"^train.sync_bn=true: SyncBatchNorm needs CUDA \(device cpu\)$"
    ):
        Trainer._resolve_sync_bn(SimpleNamespace(world=2), True, "cpu")


def test_metrics_evaluations_checkpoints_and_eval_logs_by_hand(
    sources, tmp_path, monkeypatch, capsys
):
    """4 steps, eval_every = save_every = 3: evaluated and saved at step 3 and at the last step
    (4). Accuracies 0.6 then 0.4: the best stays step 3's. metrics.json (and fit's return) hold
    the last accuracy, the best and its step, the step, and the seconds, which continue the
    trainer's (10 s before, plus 1.23456 s of this fit's clock, rounded to 0.01 s); the eval/
    logs carry every result but the step; the lock is released."""
    trainer = _trainer(sources, tmp_path, **{"train.eval_every": 3, "train.save_every": 3,
                                              "train.keep_checkpoints": 5})  # fmt: skip
    accuracies = iter([0.6, 0.4])
    monkeypatch.setattr("rsmatch.evaluate.accuracy", lambda *_: next(accuracies))
    clock = iter([100.0, 100.1, 100.2, 100.3, 101.23456])
    monkeypatch.setattr("rsmatch.trainer.time", SimpleNamespace(time=lambda: next(clock)))
    logged = {}
    log = trainer.accelerator.log

    def logging(values, step):
        evals = {k: v for k, v in values.items() if k.startswith("eval/")}
        if evals:
            logged[step] = evals
        log(values, step=step)

    trainer.accelerator.log = logging
    trainer.state.seconds = 10.0
    metrics = trainer.fit()
    out = tmp_path / "run"
    want = {"algorithm": "supervised", "test_acc": 0.4, "best_acc": 0.6, "best_step": 3,
            "step": 4, "seconds": 11.23}  # fmt: skip
    assert metrics == want
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8")) == want
    assert _lines(out / "evals.jsonl") == [
        {"step": 3, "test_acc": 0.6, "best_acc": 0.6, "best_step": 3},
        {"step": 4, "test_acc": 0.4, "best_acc": 0.6, "best_step": 3},
    ]
    assert logged == {
        3: {"eval/test_acc": 0.6, "eval/best_acc": 0.6, "eval/best_step": 3},
        4: {"eval/test_acc": 0.4, "eval/best_acc": 0.6, "eval/best_step": 3},
    }
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step_00000003", "step_00000004"]
    assert (out / "checkpoints" / "latest").read_text(encoding="utf-8").strip() == "step_00000004"
    # each checkpoint holds its step's evaluation: evaluated before it is saved
    for step, acc in ((3, 0.6), (4, 0.4)):
        state = json.loads(
            (out / "checkpoints" / f"step_0000000{step}" / "trainer.json").read_text(
                encoding="utf-8"
            )
        )
        assert (state["step"], state["best_acc"], state["best_step"]) == (step, 0.6, 3)
        assert state["last_eval"] == {
            "step": step,
            "test_acc": acc,
            "best_acc": 0.6,
            "best_step": 3,
        }
    assert (out / "model" / "model.safetensors").is_file()
    assert not (out / ".lock").exists()
    assert "stopped by signal" not in capsys.readouterr().err


def test_a_signal_stops_after_its_step_with_a_checkpoint(sources, tmp_path, capsys):
    """SIGINT during step 2 of 4 (no evaluation or save due before step 4): the step ends, a
    checkpoint is saved at step 2, nothing is evaluated or exported, the lock is released, the
    user is told how to go on, and the handlers the caller had are back."""
    trainer = _trainer(sources, tmp_path, **{"train.eval_every": 4, "train.save_every": 4})
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    step, during = trainer.train_step, []

    def interrupted(k):
        during.append(signal.getsignal(signal.SIGTERM) == trainer._on_signal)
        if k == 1:
            signal.raise_signal(signal.SIGINT)
        return step(k)

    trainer.train_step = interrupted
    assert trainer.fit() == {"interrupted": True, "step": 2}
    assert during == [True, True]
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert not (out / "metrics.json").exists() and not (out / "evals.jsonl").exists()
    assert not (out / "model").exists() and not (out / ".lock").exists()
    assert (
        "stopped by signal at step 2; checkpoint saved. Continue with --resume (in a grid: rerun "
        "the grid's command)\n" in capsys.readouterr().err
    )
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_signal_in_the_last_step_lets_the_run_finish(sources, tmp_path, capsys):
    """SIGTERM during step 4 of 4: the work is done, so the run evaluates, saves, exports and
    returns its metrics instead of stopping with a checkpoint to resume from."""
    trainer = _trainer(sources, tmp_path, **{"train.eval_every": 4, "train.save_every": 4})
    step = trainer.train_step

    def interrupted(k):
        if k == 3:
            signal.raise_signal(signal.SIGTERM)
        return step(k)

    trainer.train_step = interrupted
    metrics = trainer.fit()
    out = tmp_path / "run"
    assert metrics["step"] == 4 and "interrupted" not in metrics
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8")) == metrics
    assert (out / "model" / "model.safetensors").is_file() and not (out / ".lock").exists()
    assert "stopped by signal" not in capsys.readouterr().err


def test_a_resume_says_what_it_set_aside_dropped_and_resumed_from(sources, tmp_path, capsys):
    """Resumed from step 2 of a finished 4-step run evaluated at every step: step 4's
    checkpoint is set aside (named by its new name, set_aside_step_N), the evaluations at steps 3 and 4 dropped,
    the history says `resume` from step 2, and the trainer's state (best step, last
    evaluation) is the checkpoint's."""
    keys = {"train.keep_checkpoints": 5, "train.eval_every": 1}
    _trainer(sources, tmp_path, **keys).fit()
    out = tmp_path / "run"
    capsys.readouterr()
    trainer = _trainer(sources, tmp_path, **keys)
    trainer.prepare_output(resume=2)
    err = capsys.readouterr().err
    step2 = out / "checkpoints" / "step_00000002"
    assert "set_aside_step_00000004: newer than the checkpoint resumed from, set aside" in err
    assert "dropped 2 evaluations after step 2" in err
    assert f"resumed from {step2} at step 2" in err
    assert trainer.state.step == 2 and trainer.state.last_eval["step"] == 2
    assert [r["step"] for r in _lines(out / "evals.jsonl")] == [1, 2]
    history = json.loads((out / "run.json").read_text(encoding="utf-8"))["history"]
    assert [(h["event"], h["resumed_from"]) for h in history] == [
        ("start", None), ("resume", str(step2))
    ]  # fmt: skip
    trainer.batches.close()
    trainer.lock.release()


def test_a_refused_resume_releases_the_folder(sources, tmp_path):
    """--resume into a folder without checkpoints is refused, and the lock taken for it is
    given back (the folder can be locked again at once)."""
    trainer = _trainer(sources, tmp_path)
    with pytest.raises(Exception, match="checkpoint"):
        trainer.prepare_output(resume=True)
    with runfolder.RunLock(tmp_path / "run"):
        pass
    trainer.batches.close()


def test_algorithm_metrics_are_the_evaluation_without_the_trainers_keys(sources, tmp_path):
    """What an algorithm adds (RSMatch's detector metrics) goes to the export and metrics.json;
    the step, test and best accuracies and the best step are the trainer's own."""
    trainer = _trainer(sources, tmp_path)
    trainer.state.last_eval = {"step": 4, "test_acc": 0.5, "best_acc": 0.6, "best_step": 2,
                               "detector_acc": 0.9, "detector_auc": 0.8}  # fmt: skip
    assert trainer._algorithm_metrics() == {"detector_acc": 0.9, "detector_auc": 0.8}


def test_a_key_that_comes_or_goes_between_steps_is_refused(sources, tmp_path):
    """Every rank must reduce the same keys: a changed key set names both."""
    trainer = _trainer(sources, tmp_path)
    window = {}
    trainer._collect(window, {"a": torch.ones(()), "b": torch.ones(())})
    with pytest.raises(RuntimeError, match=r"logged \['a'\] at step 0, but \['a', 'b'\] before"):
        trainer._collect(window, {"a": torch.ones(())})
    trainer._collect(window, {"b": torch.zeros(()), "a": torch.zeros(())})  # order is free
    assert {k: len(v) for k, v in window.items()} == {"a": 2, "b": 2}


def test_reduce_takes_window_means_and_the_rate(sources, tmp_path):
    """Each key's mean over its window, and the learning rate (train.lr before any step)."""
    trainer = _trainer(sources, tmp_path, **{"train.lr": 0.02})
    window = {"b": [torch.tensor(1.0), torch.tensor(4.0)], "a": [torch.tensor(2.0)] * 2}
    assert trainer._reduce(window) == {"a": 2.0, "b": 2.5, "lr": 0.02}


def test_hparams_are_flat_scalars_and_strings(sources, tmp_path):
    cfg = tiny_config(sources, tmp_path, algorithm="supervised")
    hp = _hparams(cfg)
    assert hp["train.steps"] == 4 and hp["algorithm"] == "supervised"
    assert hp["train.progress"] is False
    assert all(isinstance(v, (int, float, str, bool)) for v in hp.values())


def test_a_shorter_schedule_lowers_the_rate_at_once(sources, tmp_path, capsys):
    """A resume at step 2 that shortens train.steps from 8 to 4: every group's rate becomes
    0.03 * cos(pi * 7/16 * 2/4) = 0.03 * cos(7 pi / 32) = 0.0231903 (it was
    0.03 * cos(7 pi / 64) = 0.0282463), and the note says so; an unchanged length changes
    nothing."""
    trainer = _trainer(sources, tmp_path)
    trainer.state.step = 2
    trainer._follow_new_schedule_length(4)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.03, 0.03]
    assert capsys.readouterr().err == ""
    trainer._follow_new_schedule_length(8)
    rates = [g["lr"] for g in trainer.optimizer.param_groups]
    assert rates == pytest.approx([0.0231903, 0.0231903], abs=1e-7)
    assert capsys.readouterr().err == (
        "note: train.steps 8 -> 4: the cosine learning rate follows the new length "
        "(at step 2: 0.028246 -> 0.02319)\n"
    )


def test_run_json_records_bf16_and_the_thread_count(sources, tmp_path, monkeypatch):
    """The precision resolved (bf16 as configured) and torch's thread count at the start."""
    trainer = _trainer(sources, tmp_path, **{"train.mixed_precision": "bf16"})
    monkeypatch.setattr("torch.get_num_threads", lambda: 7)
    trainer.prepare_output()
    run = json.loads((tmp_path / "run" / "run.json").read_text(encoding="utf-8"))
    assert run["mixed_precision"] == "bf16" and run["precision"]["mixed_precision"] == "bf16"
    assert run["threads"] == 7
    trainer.batches.close()
    trainer.lock.release()


def test_a_stale_last_evaluation_is_repeated_at_the_last_step(sources, tmp_path, monkeypatch):
    """Started at its last step (4) with the last evaluation from step 3 (a resume where the
    checkpoint came after an evaluation): fit evaluates step 4 before finishing, so
    metrics.json reports step 4's accuracy, not step 3's."""
    trainer = _trainer(sources, tmp_path)
    trainer.state.step, trainer.state.best_acc, trainer.state.best_step = 4, 0.9, 3
    trainer.state.last_eval = {"step": 3, "test_acc": 0.9, "best_acc": 0.9, "best_step": 3}
    monkeypatch.setattr("rsmatch.evaluate.accuracy", lambda *_: 0.25)
    metrics = trainer.fit()
    assert (metrics["step"], metrics["test_acc"], metrics["best_acc"], metrics["best_step"]) == (
        4,
        0.25,
        0.9,
        3,
    )
    assert [r["step"] for r in _lines(tmp_path / "run" / "evals.jsonl")] == [4]
