"""The Accelerate loop: end to end, resume exactness, signals, provenance isolation."""

import json
import shutil
import signal
import subprocess
import sys
import time

import datasets
import pytest
import torch
from safetensors.torch import load_file

from rsmatch.benchmark.store import save_benchmark
from rsmatch.config import ConfigError
from rsmatch.data.loaders import load_benchmark_from_config, load_train_data
from rsmatch.trainer import Trainer

from .conftest import ROOT, tiny_config, tiny_overrides


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(cfg, resume=False, data=None) -> Trainer:
    trainer = Trainer(cfg, data=data)
    trainer.fit(resume=resume)
    return trainer


@pytest.mark.parametrize(
    "algorithm", ["supervised", "fixmatch", "flexmatch", "freematch", "simmatch", "rsmatch"]
)
def test_end_to_end_writes_traceable_run(sources, tmp_path, algorithm):
    out = tmp_path / "run"
    trainer = _run(tiny_config(sources, out, algorithm=algorithm))
    assert trainer.live_model is trainer.accelerator.unwrap_model(trainer.model)  # found once
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    for key in ("test_acc", "best_acc", "step", "seconds"):
        assert key in metrics
    assert metrics["step"] == 4 and 0 <= metrics["test_acc"] <= 1
    assert ("detector_acc" in metrics) == (algorithm == "rsmatch")
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["seed"] == 0 and "torch" in run["versions"] and "commit" in run["git"]
    assert run["precision"]["mixed_precision"] == "no" and run["host_memory"].startswith("on")
    assert run["threads"] == torch.get_num_threads()  # a launcher may have set it to 1
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "latest").is_file()
    exported = load_file(str(out / "model" / "model.safetensors"))
    assert exported and all(k.split(".")[0] in ("encoder", "head") for k in exported)
    assert len((out / "evals.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert trainer.state.step == 4
    # a second run into the same folder is refused instead of overwriting it
    with pytest.raises(ConfigError, match="train.output_dir"):
        Trainer(tiny_config(sources, out)).prepare_output(resume=False)


def assert_resume_is_exact(sources, tmp_path, **extra) -> Trainer:
    """4 straight steps == 2 steps + resume + 2 steps (weights, EMA, algorithm state)."""
    straight = _run(tiny_config(sources, tmp_path / "a", **extra, **{"train.keep_checkpoints": 5}))
    # a second run is given only the step-2 checkpoint of the first, then resumed to step 4
    resumed_dir = tmp_path / "b" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_00000002", resumed_dir / "step_00000002")
    (resumed_dir / "latest").write_text("step_00000002\n", encoding="utf-8")
    resumed = _run(tiny_config(sources, tmp_path / "b", **extra), resume=True)
    a, b = _weights(straight), _weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    for k, v in straight.algorithm.state_dict().items():
        assert torch.equal(v, resumed.algorithm.state_dict()[k]), k
    ema_a, ema_b = straight.ema.module.state_dict(), resumed.ema.module.state_dict()
    for k in ema_a:
        torch.testing.assert_close(ema_a[k], ema_b[k], rtol=0, atol=1e-6, msg=k)
    return straight


@pytest.mark.parametrize("algorithm", ["fixmatch", "flexmatch", "freematch", "simmatch", "rsmatch"])
def test_resume_continues_the_exact_trajectory(sources, tmp_path, algorithm):
    assert_resume_is_exact(sources, tmp_path, algorithm=algorithm)


@pytest.mark.parametrize("algorithm", ["fixmatch", "rsmatch"])
def test_resume_is_exact_in_bf16_and_channels_last(sources, tmp_path, algorithm):
    """What `auto` picks on a GPU or a CPU with native bf16 (elsewhere emulated: slow, exact)."""
    overrides = {"train.mixed_precision": "bf16", "train.channels_last": True}
    assert_resume_is_exact(sources, tmp_path, algorithm=algorithm, **overrides)


@pytest.mark.parametrize("algorithm", ["fixmatch", "rsmatch"])
def test_provenance_never_reaches_training(sources, tmp_path, algorithm):
    """Permuting the provenance columns of the pool (is_synthetic, generator and source_id
    together, rows and images left in place) leaves training bit-identical. The pool order is
    shuffled at split time, so a row's position carries no provenance either."""
    dd, meta = load_benchmark_from_config(tiny_config(sources, tmp_path / "x").data)
    pool = dd["unlabeled"]
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(1)).tolist()
    columns = ("is_synthetic", "generator", "source_id")
    assert [pool["is_synthetic"][i] for i in perm] != pool["is_synthetic"]
    permuted = pool.remove_columns(list(columns))
    for name in columns:
        permuted = permuted.add_column(name, [pool[name][i] for i in perm])
    trained = []
    for name, unlabeled in (("plain", pool), ("permuted", permuted)):
        save_benchmark(datasets.DatasetDict({**dd, "unlabeled": unlabeled}), tmp_path / name, meta)
        cfg = tiny_config(sources, tmp_path / f"run_{name}", algorithm=algorithm,
                          **{"train.eval_every": 100, "data.benchmark": str(tmp_path / name)})  # fmt: skip
        trained.append(_run(cfg))
    plain, other = trained
    a, b = _weights(plain), _weights(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert plain.algorithm.state_dict().keys() == other.algorithm.state_dict().keys()
    for k, v in plain.algorithm.state_dict().items():
        assert torch.equal(v, other.algorithm.state_dict()[k]), k


def test_real_only_oracle_drops_synthetic_images(sources, tmp_path):
    cfg = tiny_config(sources, tmp_path, **{"data.real_only": True})
    data = load_train_data(cfg.data)
    assert len(data.unlabeled) == 3 * 13 and not data.provenance.is_synthetic.any()
    assert data.provenance.generator == ["real"] * len(data.unlabeled)


@pytest.mark.slow
def test_sigterm_saves_a_loadable_checkpoint(sources, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(
        sources, out, **{"train.steps": 2000, "train.save_every": 1000, "train.eval_every": 1000}
    )
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + 240
    while not (out / "tb").exists() and time.time() < deadline:  # the loop has started
        time.sleep(0.5)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert "stopped by signal" in output
    latest = (out / "checkpoints" / "latest").read_text(encoding="utf-8").strip()
    stopped_at = int(latest.split("_")[1])
    assert 0 < stopped_at < 2000
    assert not list((out / "checkpoints").glob(".tmp*"))
    assert not (out / "metrics.json").exists()
    # the checkpoint loads and training goes on from it
    cfg = tiny_config(sources, out, **{"train.steps": stopped_at + 2, "train.eval_every": 1000})
    trainer = Trainer(cfg)
    trainer.fit(resume=True)
    assert trainer.state.step == stopped_at + 2


def test_run_record_names_the_split_seed_trained_on(sources, tmp_path):
    """A saved benchmark fixes its split: run.json's split_seed is its seed, not the ignored
    data.split_seed (the record said 0 beside a split whose seed was 3)."""
    from rsmatch.runinfo import write_run_record

    cfg = tiny_config(sources, tmp_path / "x", **{"data.split_seed": 0})
    write_run_record(tmp_path / "bench", cfg, {"split": {"seed": 3}}, resumed_from=None)
    write_run_record(tmp_path / "own", cfg, {"split": {"seed": 0}}, resumed_from=None)
    seeds = [
        json.loads((tmp_path / n / "run.json").read_text(encoding="utf-8"))["split_seed"]
        for n in ("bench", "own")
    ]
    assert seeds == [3, 0]


@pytest.mark.parametrize(
    "warmup, decays",
    # by hand, step k = 0, 1, 2, 3: with the warm-up the decay is min(0.6, 1 - 1/(1+k)) = 0
    # (the first update copies the weights), 1/2, min(0.6, 2/3), min(0.6, 3/4); without it 0.6
    # from the first update, as USB's EMA
    [(True, [0.0, 0.5, 0.6, 0.6]), (False, [0.6, 0.6, 0.6, 0.6])],
)
def test_the_ema_follows_its_decay_schedule_step_by_step(sources, tmp_path, warmup, decays):
    """The trainer's EMA, as configured (decay, warm-up, its step count): each step's average
    against the live weights, and BatchNorm statistics copied, not averaged."""
    cfg = tiny_config(
        sources, tmp_path / "run", **{"train.ema_decay": 0.6, "train.ema_warmup": warmup}
    )
    trainer = Trainer(cfg)
    name = next(n for n, _ in trainer.live_model.named_parameters())
    seen = []  # (EMA before, live, EMA after) of one parameter at each update
    update = trainer.ema.update

    def recorded(model, step=None):
        before = dict(trainer.ema.module.named_parameters())[name].detach().clone()
        update(model, step=step)
        live = dict(model.named_parameters())[name].detach().clone()
        seen.append(
            (before, live, dict(trainer.ema.module.named_parameters())[name].detach().clone())
        )

    trainer.ema.update = recorded
    trainer.fit()
    assert len(seen) == len(decays) == cfg.train.steps
    for (before, live, after), d in zip(seen, decays, strict=True):
        assert not torch.equal(before, live)
        torch.testing.assert_close(after, d * before + (1 - d) * live, rtol=1e-6, atol=1e-7)
    buffers = zip(trainer.ema.module.named_buffers(), trainer.live_model.buffers(), strict=True)
    for (name, ema_buffer), live_buffer in buffers:
        assert torch.equal(ema_buffer, live_buffer), name
