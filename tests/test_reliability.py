"""Never a traceback, never a lost or mixed-up run (issue 13): checkpoints that prove themselves,
resume rules, one run per folder, and errors as users read them — through the CLI."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from rsmatch import runfolder, runinfo
from rsmatch.checkpoint import CheckpointError
from rsmatch.cli import train as train_cli
from rsmatch.config import ConfigError, load_config, to_dict
from rsmatch.trainer import Trainer

from .conftest import ROOT, loaded_in_a_fresh_process, tiny_config, tiny_overrides
from .torchrun import torchrun

STEP2, STEP4 = "step_00000002", "step_00000004"


def cli_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """launch/train.py in a fresh process: for what only a fresh process shows (import-time
    prints); the other tests run the same entry in this process (`cli`)."""
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture
def cli(train_in_process):
    return train_in_process


def error_line(res: subprocess.CompletedProcess) -> str:
    """The whole of stderr: exactly one line, `rsmatch-train: error: ...`."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("rsmatch-train: error: "), res.stderr
    return lines[0]


def tree(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` with the sha256 of its bytes."""
    if not folder.exists():
        return {}
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"
        for p in sorted(folder.rglob("*"))
    }


@contextmanager
def immutable(path: Path):
    """Read-only even for root (tests run as root here): the ext4 immutable attribute."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def _state(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "ema": {k: v.detach().clone() for k, v in trainer.ema.module.state_dict().items()},
        "algorithm": {k: v.clone() for k, v in trainer.algorithm.state_dict().items()},
    }


@pytest.fixture(scope="module")
def straight(sources, tmp_path_factory):
    """An uninterrupted 4-step RSMatch run: checkpoints and evaluations at steps 2 and 4."""
    out = tmp_path_factory.mktemp("straight") / "run"
    trainer = Trainer(tiny_config(sources, out, **{"train.keep_checkpoints": 5}))
    trainer.fit()
    return out, _state(trainer)


def copy_run(straight, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(straight[0], out)
    return out


# -- errors before anything is decoded or written ---------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"model.backbone": "wrn28_3"}, "model.backbone='wrn28_3': not a timm model; did you mean wrn28_8?"),
        ({"rsmatch.detector_backbone": "resnet19"}, "rsmatch.detector_backbone='resnet19': not a timm model; did you mean resnet18?"),
        ({"train.eval_batch_size": 0}, "train.eval_batch_size=0: must be >= 1"),
        ({"train.seed": -1}, "train.seed=-1: must be in [0, 2**32)"),
        ({"data.split_seed": -3}, "data.split_seed=-3: must be in [0, 2**32)"),
        ({"train.lrr": 0.1}, "train.lrr: unknown key; did you mean train.lr? (valid: "),
    ],
)  # fmt: skip
def test_config_errors_are_one_line_and_write_nothing(sources, tmp_path, extra, message, cli):
    out = tmp_path / "run"
    line = error_line(cli(tiny_overrides(sources, out, **extra), tmp_path))
    assert message in line, line
    assert not out.exists()


@pytest.mark.parametrize(
    "key, world", [("train.graph_batches", 1), ("train.sync_bn", 2)]
)  # fmt: skip
def test_settings_the_device_refuses_are_refused_before_the_data_is_read(
    sources, tmp_path, key, world
):
    """CUDA-only settings on a CPU: the error names the setting, not the (missing) data."""
    cfg = tiny_config(sources, tmp_path / "run", **{key: True, "data.real": tmp_path / "absent"})
    ranks = SimpleNamespace(process_index=0, num_processes=world, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match=f"{key}=true: .* needs? CUDA"):
        Trainer(cfg, accelerator=ranks)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "setting, device, graphed",
    [("auto", "cuda", True), ("auto", "cpu", False), (False, "cuda", False), (True, "cuda", True)],
)
def test_graph_batches_auto_means_on_cuda(setting, device, graphed):
    assert Trainer._resolve_graph_batches(setting, device) is graphed


def test_yaml_error_names_file_line_and_column(tmp_path):
    (tmp_path / "bad.yaml").write_text(
        "train:\n  lr: 0.1\n   steps: 3\n", encoding="utf-8"
    )  # one space too many
    line = error_line(cli_process(["--config", "bad.yaml"], tmp_path))
    assert line == "rsmatch-train: error: bad.yaml:3:9: mapping values are not allowed here", line


@pytest.mark.parametrize(
    "args, not_loaded, error",
    [
        (["--config", "absent.yaml"], ("torch",), "--config: no such file 'absent.yaml'"),
        (["train.lrr=0.1"], ("timm", "torchvision", "torch._dynamo", "datasets",
                             "huggingface_hub", "accelerate", "safetensors"),
         "train.lrr: unknown key"),
    ],
)  # fmt: skip
def test_config_errors_come_before_the_heavy_libraries_load(tmp_path, args, not_loaded, error):
    """A mistyped --config path is reported before torch loads (0.3 s instead of 4 s on a
    2-core Zen 3); a mistyped key, which needs the config's dataclasses (with torch), before
    timm (which imports torchvision and torch._dynamo), datasets, the Hub client, Accelerate
    and safetensors (4 s instead of 10 s)."""
    out, err = loaded_in_a_fresh_process("rsmatch.cli.train", not_loaded, tmp_path, args)
    assert out == "2 []", out + err
    assert err.startswith(f"rsmatch-train: error: {error}"), err


def test_a_rank_left_running_reports_its_error_after_the_wait(sources, tmp_path, cli, monkeypatch):
    """Rank 1 alone: no rank 0 exits first to have the launcher stop it, so after its wait it
    reports the error itself, naming its rank (an error of one node is never silenced)."""
    monkeypatch.setattr(train_cli, "OTHER_RANKS_WAIT_S", 0.5)
    start = time.monotonic()
    res = cli(tiny_overrides(sources, tmp_path / "run", **{"train.seed": -1}), tmp_path,
              env={"RANK": "1"})  # fmt: skip
    assert res.returncode == 2
    assert (
        res.stderr.strip() == "rsmatch-train: error: [rank 1] train.seed=-1: must be in [0, 2**32)"
    )
    assert time.monotonic() - start >= 0.5


def test_output_dir_under_a_regular_file(sources, tmp_path, cli):
    (tmp_path / "file").write_text("x", encoding="utf-8")
    line = error_line(cli(tiny_overrides(sources, tmp_path / "file" / "run"), tmp_path))
    assert (
        f"train.output_dir='{tmp_path}/file/run': {tmp_path}/file is a file, not a folder" in line
    )
    assert (tmp_path / "file").read_text(encoding="utf-8") == "x"


def test_output_dir_in_a_read_only_parent(sources, tmp_path, cli):
    parent = tmp_path / "ro"
    parent.mkdir()
    with immutable(parent):
        line = error_line(cli(tiny_overrides(sources, parent / "run"), tmp_path))
    assert f"train.output_dir='{parent}/run': {parent} is not writable" in line
    assert not (parent / "run").exists()


def test_ctrl_c_before_the_training_loop_is_one_line(sources, tmp_path, monkeypatch, capsys):
    """While data decodes (the signal handlers come with the loop): exit 130, no traceback."""
    import rsmatch.trainer

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(rsmatch.trainer, "Trainer", interrupted)
    assert train_cli.main(tiny_overrides(sources, tmp_path / "run")) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "rsmatch-train: interrupted outside the training loop; nothing saved"
    ]
    assert not (tmp_path / "run").exists()


def test_output_dir_where_no_folder_can_be_made(sources, tmp_path, cli):
    """/proc passes os.access for root but refuses a mkdir: one line, not a traceback."""
    res = cli(tiny_overrides(sources, "/proc/rsmatch-run"), tmp_path)
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip().splitlines()[-1]  # found at the lock, after DeepSpeed's import note
    assert line.startswith("rsmatch-train: error: train.output_dir='/proc/rsmatch-run': cannot "
                           "create it ("), line  # fmt: skip


def test_resume_with_read_only_checkpoints_is_refused_before_training(
    straight, sources, tmp_path, cli
):
    out = copy_run(straight, tmp_path)
    before = tree(out)
    with immutable(out / "checkpoints"):
        line = error_line(cli(["--resume", *tiny_overrides(sources, out)], tmp_path))
    assert f"{out}/checkpoints is not writable" in line
    assert tree(out) == before


# -- checkpoints that prove themselves ---------------------------------------------------------

FILES = ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
         "ema.safetensors", "algorithm.safetensors", "trainer.json", "config.yaml"]  # fmt: skip


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    else:
        path.unlink()


def test_checkpoint_files_are_all_in_the_manifest(straight):
    manifest = json.loads(
        (straight[0] / "checkpoints" / STEP4 / "manifest.json").read_text(encoding="utf-8")
    )
    assert sorted(manifest["files"]) == sorted(FILES)
    entry = manifest["files"]["trainer.json"]
    data = (straight[0] / "checkpoints" / STEP4 / "trainer.json").read_bytes()
    assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
@pytest.mark.parametrize("name", [*FILES, "manifest.json"])
def test_a_broken_latest_checkpoint_is_named(straight, sources, tmp_path, name, how):
    """The same check the CLI runs before loading anything (one CLI run per mode below)."""
    out = copy_run(straight, tmp_path)
    corrupt(out / "checkpoints" / STEP4 / name, how)
    before = tree(out)
    with pytest.raises(CheckpointError) as e:
        runfolder.check_run_folder(tiny_config(sources, out), True)
    message = str(e.value)
    assert "\n" not in message and "--resume=auto-fallback" in message
    # a flipped hash digit inside the manifest names the file whose hash it was
    named = f"{out}/checkpoints/{STEP4}/{name}"
    assert named in message or (name == "manifest.json" and f"{STEP4}/" in message), message
    found, skipped = runfolder.check_run_folder(tiny_config(sources, out), "auto-fallback")
    assert found.name == STEP2 and len(skipped) == 1 and STEP4 in skipped[0]
    assert tree(out) == before


@pytest.mark.parametrize(
    "name, how", [("random_states_0.pkl", "truncate"), ("optimizer.bin", "flip"),
                  ("algorithm.safetensors", "delete")],
)  # fmt: skip
def test_cli_refuses_a_broken_checkpoint_and_changes_nothing(
    straight, sources, tmp_path, name, how, cli
):
    out = copy_run(straight, tmp_path)
    corrupt(out / "checkpoints" / STEP4 / name, how)
    before = tree(out)
    line = error_line(cli(["--resume", *tiny_overrides(sources, out)], tmp_path))
    assert f"{out}/checkpoints/{STEP4}/{name}" in line and "auto-fallback" in line, line
    assert tree(out) == before


def test_trainer_loads_before_it_writes(straight, sources, tmp_path):
    """The trainer's own path (the CLI checks earlier): refuse, release the lock, write nothing."""
    out = copy_run(straight, tmp_path)
    corrupt(out / "checkpoints" / STEP4 / "trainer.json", "truncate")
    before = tree(out)
    trainer = Trainer(tiny_config(sources, out))
    with pytest.raises(CheckpointError, match=f"{STEP4}/trainer.json: "):
        trainer.prepare_output(True)
    assert tree(out) == before


def test_a_sealed_checkpoint_missing_algorithm_state_is_an_error(straight, sources, tmp_path):
    """A manifest that vouches for an incomplete algorithm state: an error, never `{}`."""
    from safetensors.torch import load_file, save_file

    from rsmatch.checkpoint import write_manifest

    out = copy_run(straight, tmp_path)
    folder = out / "checkpoints" / STEP4
    state = load_file(str(folder / "algorithm.safetensors"))
    save_file(dict(list(state.items())[1:]), str(folder / "algorithm.safetensors"))
    write_manifest(folder)
    before = tree(out)
    with pytest.raises(CheckpointError) as e:
        Trainer(tiny_config(sources, out)).prepare_output(True)
    assert f"{STEP4}: does not fit this run (" in str(e.value) and "Missing key" in str(e.value)
    assert "\n" not in str(e.value)
    assert tree(out) == before


def test_a_sealed_checkpoint_missing_an_ema_weight_is_an_error(straight, sources, tmp_path):
    """The EMA loads strictly: a missing average is an error, not the fresh copy's weights."""
    from safetensors.torch import load_file, save_file

    from rsmatch.checkpoint import write_manifest

    out = copy_run(straight, tmp_path)
    folder = out / "checkpoints" / STEP4
    state = load_file(str(folder / "ema.safetensors"))
    # a weight: BatchNorm fills a missing `num_batches_tracked` in by itself
    del state[next(k for k in state if k.endswith(".weight"))]
    save_file(state, str(folder / "ema.safetensors"))
    write_manifest(folder)
    with pytest.raises(CheckpointError, match=rf"{STEP4}: cannot be loaded \(RuntimeError: "):
        Trainer(tiny_config(sources, out)).prepare_output(True)


def test_a_run_that_died_before_its_first_checkpoint_leaves_no_evaluations(sources, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "evals.jsonl").write_text('{"step": 2, "test_acc": 0.5}\n', encoding="utf-8")
    Trainer(tiny_config(sources, out)).fit()
    steps = [
        json.loads(x)["step"]
        for x in (out / "evals.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert steps == [2, 4]


def test_auto_fallback_ends_bit_identical_to_an_uninterrupted_run(straight, sources, tmp_path):
    out = copy_run(straight, tmp_path)
    corrupt(out / "checkpoints" / STEP4 / "ema.safetensors", "flip")
    trainer = Trainer(tiny_config(sources, out))
    trainer.fit(resume="auto-fallback")
    assert trainer.state.step == 4
    resumed, reference = _state(trainer), straight[1]
    for part in ("model", "ema", "algorithm"):
        assert reference[part].keys() == resumed[part].keys()
        for k, v in reference[part].items():
            assert torch.equal(v, resumed[part][k]), (part, k)
    # the broken checkpoint is kept aside, the evaluations are not doubled, the history grows
    assert (out / "checkpoints" / f"set_aside_{STEP4}").is_dir()
    assert (out / "checkpoints" / "latest").read_text(encoding="utf-8").strip() == STEP4
    steps = [
        json.loads(x)["step"]
        for x in (out / "evals.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert steps == [2, 4]
    history = json.loads((out / "run.json").read_text(encoding="utf-8"))["history"]
    assert [h["event"] for h in history] == ["start", "resume"]
    assert history[1]["resumed_from"] == str(out / "checkpoints" / STEP2)
    assert not (out / ".lock").exists()


def test_resume_from_an_explicit_step(straight, sources, tmp_path):
    out = copy_run(straight, tmp_path)
    with pytest.raises(CheckpointError, match=r"--resume-from 3: no checkpoint .* \(steps: 4, 2\)"):
        runfolder.check_run_folder(tiny_config(sources, out), 3)
    found, skipped = runfolder.check_run_folder(tiny_config(sources, out), 2)
    assert found.name == STEP2 and skipped == []


def test_missing_latest_target_is_named(straight, sources, tmp_path):
    out = copy_run(straight, tmp_path)
    shutil.rmtree(out / "checkpoints" / STEP4)
    with pytest.raises(CheckpointError, match=rf"latest: points to {STEP4}, which is missing"):
        runfolder.check_run_folder(tiny_config(sources, out), True)


# -- resume rules -------------------------------------------------------------------------------


def test_resume_with_a_changed_algorithm_lists_the_keys(straight, sources, tmp_path, cli):
    out = copy_run(straight, tmp_path)
    before = tree(out)
    args = tiny_overrides(sources, out, algorithm="fixmatch", **{"train.lr": 0.01})
    line = error_line(cli(["--resume", *args], tmp_path))
    assert (
        f"--resume: the config differs from {out}/checkpoints/{STEP4}/config.yaml in "
        "algorithm ('rsmatch' -> 'fixmatch'), train.lr (0.03 -> 0.01); only train.steps"
    ) in line, line
    assert tree(out) == before


def test_resume_may_change_steps_and_intervals(straight, sources, tmp_path):
    out = copy_run(straight, tmp_path)
    cfg = tiny_config(sources, out, **{"train.steps": 6, "train.eval_every": 3,
                                       "train.progress": True, "train.keep_checkpoints": 1})  # fmt: skip
    found, _ = runfolder.check_run_folder(cfg, True)
    assert found.name == STEP4


def test_resume_past_the_new_last_step_is_refused_before_writing(straight, sources, tmp_path, cli):
    out = copy_run(straight, tmp_path)
    before = tree(out)
    line = error_line(cli(["--resume", *tiny_overrides(sources, out, **{"train.steps": 3})],
                          tmp_path))  # fmt: skip
    step4 = out / "checkpoints" / STEP4
    assert line == (
        f"rsmatch-train: error: train.steps=3: below the step of the checkpoint to resume from "
        f"({step4}, step 4); train.steps=4 ends the run there, --resume-from an earlier step "
        "ends it sooner"
    )
    assert tree(out) == before


def test_resume_at_its_new_last_step_evaluates_and_finishes(sources, tmp_path):
    """Checkpoint at step 2 without an evaluation there (eval_every 4); resumed from it with
    train.steps=2, the run ends at once: evaluated at step 2, exported, metrics written."""
    out = tmp_path / "run"
    keys = {"train.eval_every": 4, "train.keep_checkpoints": 5}
    Trainer(tiny_config(sources, out, **keys)).fit()
    metrics = Trainer(tiny_config(sources, out, **keys, **{"train.steps": 2})).fit(resume=2)
    assert metrics["step"] == 2 and 0 <= metrics["test_acc"] <= 1
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["step"] == 2
    steps = [
        json.loads(x)["step"]
        for x in (out / "evals.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert steps == [2]  # step 4's evaluation dropped with its checkpoint set aside
    # one TensorBoard file per start: the final evaluation is logged before the trackers close
    # (logged after, it reopened a writer that nobody closed)
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 2


def test_a_resume_says_when_processes_or_precision_differ_from_the_checkpoint(
    straight, sources, tmp_path, capsys
):
    """Neither is a config key (the process count comes from the launch, `auto` precision from
    the machine): a resume that changes them is warned about; one that does not, is not."""
    from rsmatch.checkpoint import write_manifest

    out = copy_run(straight, tmp_path)
    step4 = out / "checkpoints" / STEP4
    saved = json.loads((step4 / "trainer.json").read_text(encoding="utf-8"))
    assert (saved["world_size"], saved["mixed_precision"]) == (1, "no")  # how it trained
    saved.update(world_size=2, mixed_precision="bf16")  # as if written by 2 bf16 processes
    (step4 / "trainer.json").write_text(json.dumps(saved), encoding="utf-8")
    write_manifest(step4)
    trainer = Trainer(tiny_config(sources, out))
    trainer.prepare_output(resume=True)
    trainer.lock.release()
    err = capsys.readouterr().err
    assert "WARNING: resumed with processes 2 -> 1, precision bf16 -> no: training goes on" in err
    assert (trainer.state.world_size, trainer.state.mixed_precision) == (1, "no")  # saved next
    other = Trainer(tiny_config(sources, copy_run(straight, tmp_path / "b")))
    other.prepare_output(resume=True)
    other.lock.release()
    assert "WARNING: resumed with" not in capsys.readouterr().err
    # a checkpoint from before these were recorded: nothing to compare, no "processes 0 -> 1"
    older = copy_run(straight, tmp_path / "c")
    step4 = older / "checkpoints" / STEP4
    saved = json.loads((step4 / "trainer.json").read_text(encoding="utf-8"))
    del saved["world_size"], saved["mixed_precision"]
    (step4 / "trainer.json").write_text(json.dumps(saved), encoding="utf-8")
    write_manifest(step4)
    resumed = Trainer(tiny_config(sources, older))
    resumed.prepare_output(resume=True)
    resumed.lock.release()
    assert "WARNING" not in capsys.readouterr().err
    assert (resumed.state.world_size, resumed.state.mixed_precision) == (1, "no")


@pytest.mark.parametrize("best_step, set_aside", [(4, True), (2, False)])
def test_a_resume_from_before_the_best_sets_best_aside(
    straight, sources, tmp_path, capsys, best_step, set_aside
):
    """best/ evaluated at step 4 is not the resumed run's (it restarts from step 2, whose
    best_acc no longer counts step 4's): renamed, as the step-4 checkpoint is. From step 2
    itself it stays."""
    out = copy_run(straight, tmp_path)
    (out / "best" / "best.json").write_text(json.dumps({"step": best_step, "test_acc": 0.9}))
    trainer = Trainer(tiny_config(sources, out))
    trainer.prepare_output(resume=2)
    trainer.lock.release()
    aside = out / f"set_aside_best_step_{best_step:08d}"
    assert aside.is_dir() == set_aside and (out / "best").is_dir()
    # set aside, best/ is exported again from the loaded EMA: the restored best is step 2's
    assert trainer.state.best_step == 2
    saved = json.loads((out / "best" / "best.json").read_text(encoding="utf-8"))
    assert saved["step"] == 2 and (saved["test_acc"] == 0.9) != set_aside
    note = f"best/ (step 4): newer than the checkpoint resumed from, set aside as {aside.name}"
    assert (note in capsys.readouterr().err) == set_aside


def test_resume_with_more_steps_follows_the_longer_schedule(straight, sources, tmp_path, capsys):
    out = copy_run(straight, tmp_path)
    trainer = Trainer(tiny_config(sources, out, **{"train.steps": 8}))
    used, step, opt = [], trainer.optimizer.step, trainer.optimizer
    trainer.optimizer.step = lambda: (used.append([g["lr"] for g in opt.param_groups]), step())
    trainer.fit(resume=True)
    # by hand, 0.03 * cos(pi * 7/16 * k / steps): 0.0058527 at k = 4 of 4; k = 4..7 of 8 below,
    # in every group (weight decay on, and off for BatchNorm and biases)
    assert len(opt.param_groups) == 2
    for lrs, want in zip(used, [0.0231903, 0.0195952, 0.0154231, 0.0107969], strict=True):
        assert lrs == pytest.approx([want, want], abs=1e-7)
    note = "note: train.steps 4 -> 8: the cosine learning rate follows the new length"
    assert f"{note} (at step 4: 0.0058527 -> 0.02319)" in capsys.readouterr().err


def test_a_resume_without_config_continues_with_the_runs_own(cli, straight, tmp_path):
    """`rsmatch-train --resume train.output_dir=RUN`: the run's config.yaml is the base (the
    defaults differed from it in nine keys, each refused as a change); overrides still apply."""
    out = copy_run(straight, tmp_path)
    res = cli(["--resume", f"train.output_dir={out}", "train.steps=5"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["step"] == 5


def test_stdout_is_the_metrics_line_alone(straight, sources, tmp_path):
    """`rsmatch-train ... | jq`: notes (here "resumed from"), warnings and libraries' prints
    (DeepSpeed logs to stdout, at import too) go to stderr. A run without DeepSpeed does not
    import it: Accelerate's unwrap_model did, and DeepSpeed warned on every CPU run."""
    out = copy_run(straight, tmp_path)
    res = cli_process(["--resume", *tiny_overrides(sources, out, **{"train.steps": 5})], tmp_path)
    assert res.returncode == 0, res.stderr
    (line,) = res.stdout.splitlines()
    assert json.loads(line)["step"] == 5
    assert f"resumed from {out}/checkpoints/{STEP4} at step 4" in res.stderr
    assert "real_accelerator.py" not in res.stderr, res.stderr  # DeepSpeed's import-time warning


def test_what_libraries_print_while_training_goes_to_stderr(sources, tmp_path, capfd, monkeypatch):
    """DeepSpeed's logger writes to stdout, NCCL's debug output and DeepSpeed's op builds to file
    descriptor 1: the run's stdout stays its metrics line, whichever way a note is written."""

    def fit(self, resume=False):
        print("a print")
        # a stream held since import, left unflushed (buffered even under PYTHONUNBUFFERED)
        sys.__stdout__.reconfigure(write_through=False)
        sys.__stdout__.write("a stream held since import\n")
        os.write(1, b"a native write\n")
        subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
        return {"step": 0}

    monkeypatch.setattr(Trainer, "fit", fit)
    write_through = sys.__stdout__.write_through
    try:
        assert train_cli.main(tiny_overrides(sources, tmp_path / "run")) == 0
    finally:
        sys.__stdout__.reconfigure(write_through=write_through)
    out, err = capfd.readouterr()
    assert out == '{"step": 0}\n'
    for note in ("a print", "a stream held since import", "a native write", "a child process"):
        assert note in err


def test_overrides_the_run_does_not_read_are_one_warning_each(
    sources, tmp_path, capsys, monkeypatch
):
    class Stub:  # the CLI up to training, with nothing read
        def __init__(self, cfg):
            self.accelerator = SimpleNamespace(is_main_process=True, end_training=lambda: None)

        def fit(self, resume=False):
            return {"step": 0}

    monkeypatch.setattr("rsmatch.trainer.Trainer", Stub)
    extra = ["algorithm=fixmatch", "rsmatch.queue_length=8", f"data.benchmark={tmp_path}",
             "data.replace_ratio=0.3", "data.real_only=true"]  # fmt: skip
    base = ["--config", "configs/demo.yaml", f"train.output_dir={tmp_path / 'run'}"]
    assert train_cli.main([*base, *extra]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "rsmatch-train: warning: rsmatch.queue_length: ignored, algorithm=fixmatch does not "
        "read that section",
        "rsmatch-train: warning: data.replace_ratio: ignored, data.benchmark fixes the split "
        "(its rsmatch_benchmark.json says how)",
    ]


def test_a_new_run_into_a_used_folder_is_refused(straight, sources, tmp_path, cli):
    out = copy_run(straight, tmp_path)
    before = tree(out)
    line = error_line(cli(tiny_overrides(sources, out), tmp_path))
    assert "holds a run already; pass --resume" in line
    assert tree(out) == before


@pytest.mark.parametrize("left", ["metrics.json only", "a checkpoint without latest"])
def test_a_new_run_into_a_folder_with_any_trace_of_a_run_is_refused(straight, sources, tmp_path,
                                                                     left):  # fmt: skip
    """Checkpoints deleted but metrics.json kept, or `latest` lost: still another run's folder
    (a new run would append to its evals.jsonl)."""
    out = copy_run(straight, tmp_path)
    if left == "metrics.json only":
        shutil.rmtree(out / "checkpoints")
    else:
        (out / "metrics.json").unlink()
        (out / "checkpoints" / "latest").unlink()
    with pytest.raises(ConfigError, match="holds a run already; pass --resume"):
        runfolder.check_run_folder(tiny_config(sources, out), False)


# -- one run per folder -------------------------------------------------------------------------


def test_a_locked_folder_is_refused_naming_the_holder(sources, tmp_path, cli):
    out = tmp_path / "run"
    with runfolder.RunLock(out):
        line = error_line(cli(tiny_overrides(sources, out), tmp_path))
        assert f"in use by another run (pid {os.getpid()} on " in line, line
        assert [p.name for p in out.iterdir()] == [".lock"]
    assert not (out / ".lock").exists()


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with (
        runfolder.RunLock(tmp_path / "run"),
        pytest.raises(ConfigError, match="in use by another run"),
    ):
        runfolder.RunLock(tmp_path / "run").acquire()
    runfolder.RunLock(tmp_path / "run").acquire()  # released: free again


@pytest.mark.slow
def test_two_runs_racing_into_one_folder_exactly_one_trains(sources, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(sources, out, **{"train.steps": 12, "train.eval_every": 4,
                                           "train.save_every": 4})  # fmt: skip
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), *args]
    first = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(1)
    second = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    results = [p.communicate(timeout=300) + (p.returncode,) for p in (first, second)]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[2] == 2)
    assert "in use by another run" in loser[1] or "holds a run already" in loser[1], loser[1]
    steps = [
        json.loads(x)["step"]
        for x in (out / "evals.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert steps == [4, 8, 12]
    assert len(json.loads((out / "run.json").read_text(encoding="utf-8"))["history"]) == 1
    assert not list((out / "checkpoints").glob(".tmp*")) and not (out / ".lock").exists()


@pytest.mark.slow
def test_two_processes_print_an_error_once(sources, tmp_path):
    args = tiny_overrides(sources, tmp_path / "run", **{"train.seed": -1})
    res = torchrun(ROOT / "launch" / "train.py", args, cwd=tmp_path, timeout=300)
    errors = [x for x in (res.stdout + res.stderr).splitlines() if "rsmatch-train: error:" in x]
    assert errors == ["rsmatch-train: error: train.seed=-1: must be in [0, 2**32)"], res.stderr
    assert res.returncode != 0 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_resume_that_fails_on_one_rank_leaves_the_folder_as_it_was(straight, sources, tmp_path):
    """Rank 0 loads, rank 1 does not: rank 0 must not set step 4 aside, trim evals.jsonl or
    append to run.json first. It reports rank 1's error, once."""
    out = copy_run(straight, tmp_path)

    def files() -> dict[str, bytes]:
        return {
            p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()
        }

    before = files()
    args = ["--resume-from", "2", *tiny_overrides(sources, out)]
    res = torchrun(ROOT / "tests" / "load_fails_on_rank1.py", args, cwd=tmp_path, timeout=300)
    errors = [x for x in (res.stdout + res.stderr).splitlines() if "rsmatch-train: error:" in x]
    assert errors == ["rsmatch-train: error: [rank 1] cannot be loaded here (this test's failure "
                      "on rank 1)"], res.stderr  # fmt: skip
    assert res.returncode != 0 and files() == before


def test_agreed_raises_on_every_rank_what_failed_on_any(straight, sources, tmp_path, monkeypatch):
    """The ranks' agreement, with a stand-in gather: this rank's own error first, else the first
    failing rank's message, named by its rank; the result when every rank succeeded."""
    trainer = Trainer(tiny_config(sources, copy_run(straight, tmp_path)))
    trainer.world = 3
    others = ["", "", "step_2: missing on this node"]  # what each rank reports
    monkeypatch.setattr("rsmatch.trainer.gather_object", lambda mine: [mine[0], *others[1:]])
    with pytest.raises(CheckpointError, match=r"^\[rank 2\] step_2: missing on this node$"):
        trainer._agreed(lambda: 7)
    with pytest.raises(ZeroDivisionError):  # its own, not rank 2's
        trainer._agreed(lambda: 1 / 0)
    others[2] = ""
    assert trainer._agreed(lambda: 7) == 7


def test_temporary_checkpoint_folders_are_unique_per_run(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from rsmatch import checkpoint

    acc = Accelerator(cpu=True)
    model = acc.prepare(torch.nn.Linear(2, 2))
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(
        checkpoint.os, "replace", lambda a, b: (renamed.append(Path(a).name), real_replace(a, b))
    )
    stale = tmp_path / ".tmp_step_00000001_1_dead"  # left by a killed run: cleared under the lock
    stale.mkdir()
    for _ in range(2):
        checkpoint.save(acc, tmp_path, 1, model, {}, {"step": 1}, {"algorithm": "x"}, keep=2)
    tmps = [n for n in renamed if n.startswith(".tmp_step_")]
    assert len(tmps) == 2 and tmps[0] != tmps[1]
    assert all(n.startswith(f".tmp_step_00000001_{os.getpid()}_") for n in tmps)
    assert (
        not stale.exists()
        and [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    )
    checkpoint.verify(tmp_path / "step_00000001")


def test_resume_ignores_sections_of_algorithms_registered_on_one_side_only():
    """A plugin algorithm's section in the saved config (or only in the new one) does not block a
    resume; a change inside the run's own algorithm section still does."""
    cfg = load_config(None, ["algorithm=freematch"])
    saved = yaml.safe_load(yaml.safe_dump(to_dict(cfg)))
    runinfo.check_resume_config({**saved, "plugin": {"scale": 2.0}}, cfg, Path("ckpt"))
    saved["freematch"]["ema_p"] = 0.5
    with pytest.raises(ConfigError, match=r"freematch.ema_p \(0.5 -> 0.999\)"):
        runinfo.check_resume_config(saved, cfg, Path("ckpt"))
    del saved["freematch"]
    with pytest.raises(ConfigError, match=r"freematch.ema_p \('<absent>' -> 0.999\)"):
        runinfo.check_resume_config(saved, cfg, Path("ckpt"))


def test_resume_names_changed_synthetic_sources_as_one_key():
    cfg = load_config(None, ["data.replace_ratio=0"])
    saved = yaml.safe_load(yaml.safe_dump(to_dict(cfg)))
    saved["data"]["synthetic"] = {"ddpm": "d", "cgan": "c"}
    with pytest.raises(ConfigError) as refused:
        runinfo.check_resume_config(saved, cfg, Path("ckpt"))
    assert str(refused.value).startswith(
        "--resume: the config differs from ckpt in data.synthetic ({'ddpm': 'd', 'cgan': 'c'} -> "
        "{}); only train.steps"
    )


# -- the checkpoint folder's own rules, on hand-made folders ------------------------------------


def _sealed(root: Path, step: int) -> Path:
    """A checkpoint folder with the required files and a manifest, as `save` leaves it."""
    from rsmatch.checkpoint import REQUIRED, write_manifest

    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True)
    for name in REQUIRED:
        (folder / name).write_text(f"{name} of step {step}\n", encoding="utf-8")
    write_manifest(folder)
    return folder


def test_verify_names_what_the_manifest_does_not_vouch_for(tmp_path):
    from rsmatch.checkpoint import verify, write_manifest

    folder = _sealed(tmp_path, 1)
    verify(folder)
    (folder / "trainer.json").write_text(
        "{}", encoding="utf-8"
    )  # was "trainer.json of step 1\n": 23 bytes
    with pytest.raises(CheckpointError, match=r"trainer.json: 2 bytes, the manifest says 23$"):
        verify(folder)
    (folder / "ema.safetensors").unlink()  # a manifest sealed without a required file
    write_manifest(folder)
    with pytest.raises(CheckpointError, match=r"ema.safetensors: not in the manifest"):
        verify(folder)
    for manifest, problem in (({"files": {"config.yaml": 3}}, "malformed"),
                              ({"files": ["config.yaml"]}, "malformed"),
                              ({"entries": {}}, r"unreadable \(KeyError\)")):  # fmt: skip
        (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        with pytest.raises(CheckpointError, match=rf"manifest.json: {problem}$"):
            verify(folder)


def test_resume_from_a_broken_explicit_step_is_refused(tmp_path):
    from rsmatch.checkpoint import select

    _sealed(tmp_path, 2)
    (_sealed(tmp_path, 4) / "config.yaml").write_text("changed\n", encoding="utf-8")
    assert select(tmp_path, 2) == (tmp_path / "step_00000002", [])
    with pytest.raises(CheckpointError, match=r"step_00000004/config.yaml: .*manifest"):
        select(tmp_path, 4)


def test_a_broken_only_checkpoint_says_there_is_no_older_one(tmp_path):
    from rsmatch.checkpoint import select

    (_sealed(tmp_path, 2) / "trainer.json").write_text("x", encoding="utf-8")
    (tmp_path / "latest").write_text("step_00000002\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"broken \(no older checkpoint\)$"):
        select(tmp_path, "latest")


def test_a_file_named_like_a_checkpoint_is_not_one(tmp_path):
    from accelerate import Accelerator

    from rsmatch import checkpoint

    for step in (2, 4):
        _sealed(tmp_path, step)
    (tmp_path / "step_00000009").write_text("not a checkpoint", encoding="utf-8")
    assert checkpoint.steps(tmp_path) == [tmp_path / "step_00000004", tmp_path / "step_00000002"]
    assert checkpoint.select(tmp_path, "auto-fallback") == (tmp_path / "step_00000004", [])
    acc = Accelerator(cpu=True)  # nor is it counted, or removed, when saves rotate
    model = acc.prepare(torch.nn.Linear(2, 2))
    checkpoint.save(acc, tmp_path, 6, model, {}, {"step": 6}, {"algorithm": "x"}, keep=2)
    assert checkpoint.steps(tmp_path) == [tmp_path / "step_00000006", tmp_path / "step_00000004"]
    assert (tmp_path / "step_00000009").is_file()


def test_auto_fallback_takes_the_newest_intact_checkpoint(tmp_path):
    from rsmatch.checkpoint import select

    for step in (2, 4, 6, 10):
        _sealed(tmp_path, step)
    (tmp_path / "step_00000010" / "trainer.json").unlink()
    found, skipped = select(tmp_path, "auto-fallback")
    assert found == tmp_path / "step_00000006"
    assert len(skipped) == 1 and "step_00000010/trainer.json: missing" in skipped[0]


def test_set_aside_moves_the_newer_checkpoints_and_points_latest_back(tmp_path):
    from rsmatch.checkpoint import latest, set_aside, steps

    for step in (2, 4, 6):
        _sealed(tmp_path, step)
    (tmp_path / "latest").write_text("step_00000006\n", encoding="utf-8")
    (tmp_path / "set_aside_step_00000006").mkdir()  # left by an earlier fallback: replaced
    (tmp_path / "set_aside_step_00000006" / "old").write_text("x", encoding="utf-8")
    moved = set_aside(tmp_path, tmp_path / "step_00000002")
    assert moved == [tmp_path / "set_aside_step_00000006", tmp_path / "set_aside_step_00000004"]
    assert steps(tmp_path) == [tmp_path / "step_00000002"]
    assert latest(tmp_path) == tmp_path / "step_00000002"
    assert not (tmp_path / "set_aside_step_00000006" / "old").exists()
    assert (tmp_path / "set_aside_step_00000006" / "trainer.json").is_file()


def test_save_keeps_the_newest_checkpoints(tmp_path):
    from accelerate import Accelerator

    from rsmatch import checkpoint

    acc = Accelerator(cpu=True)
    model = acc.prepare(torch.nn.Linear(2, 2))
    for step in (1, 2, 3, 10):
        checkpoint.save(acc, tmp_path, step, model, {"n": torch.tensor([step])}, {"step": step},
                        {"algorithm": "x"}, keep=2)  # fmt: skip
    assert [p.name for p in checkpoint.steps(tmp_path)] == ["step_00000010", "step_00000003"]
    assert checkpoint.latest(tmp_path) == tmp_path / "step_00000010"
    checkpoint.verify(tmp_path / "step_00000010")
    algo, trainer = checkpoint.load(acc, tmp_path / "step_00000010", model)
    assert algo["n"].tolist() == [10] and trainer == {"step": 10}


def test_a_load_error_is_named_by_its_first_line():
    from rsmatch.checkpoint import _first_line

    assert _first_line(RuntimeError("Error(s) in loading:\n\tMissing key(s)")) == (
        "RuntimeError: Error(s) in loading:"
    )
    assert _first_line(KeyError()) == "KeyError: "


def test_without_a_git_checkout_the_commit_comes_from_the_build(monkeypatch):
    """The Docker image has no git: run.json records the commit its build was given."""

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(runinfo.subprocess, "run", no_git)
    monkeypatch.setenv("RSMATCH_GIT_COMMIT", "0123abc")
    assert runinfo.git_commit() == {"commit": "0123abc", "dirty": False}
    monkeypatch.delenv("RSMATCH_GIT_COMMIT")
    assert runinfo.git_commit() == {"commit": "unknown", "dirty": False}


def test_a_run_that_crashes_frees_its_folder(sources, tmp_path, monkeypatch):
    """An inline grid goes on in the same process: the crashed run's lock must not outlive it."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(sources, out))
    monkeypatch.setattr(trainer, "train_step", lambda step: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        trainer.fit()
    assert not (out / ".lock").exists()
    with runfolder.RunLock(out):  # free for the next run, in this very process
        pass


# -- what a run records, and its folder's lock ------------------------------------------------


def test_run_record_names_both_seeds_the_versions_and_the_commit(tmp_path):
    cfg = load_config(None, ["train.seed=7", "data.split_seed=3"])
    runinfo.write_run_record(tmp_path, cfg, {}, resumed_from=None)
    run = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert run["seed"] == 7 and run["split_seed"] == 3
    assert {"python", "rsmatch", "torch", "numpy"} <= set(run["versions"])
    assert set(run["git"]) == {"commit", "dirty"}


def _fake_git(toplevel: Path):
    answers = {"--show-toplevel": f"{toplevel}\n", "HEAD": "abc123\n", "--porcelain": " M x.py\n"}

    def run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 0, stdout=answers[cmd[-1]], stderr="")

    return run


def test_uncommitted_changes_mark_the_commit_dirty(monkeypatch):
    package_checkout = Path(runinfo.__file__).resolve().parent.parent
    monkeypatch.setattr(runinfo.subprocess, "run", _fake_git(package_checkout))
    assert runinfo.git_commit() == {"commit": "abc123", "dirty": True}


def test_a_package_inside_another_projects_checkout_takes_the_builds_commit(monkeypatch, tmp_path):
    """Installed into a venv inside some other git checkout, git answers for that project."""
    monkeypatch.setattr(runinfo.subprocess, "run", _fake_git(tmp_path / "other-project"))
    monkeypatch.setenv("RSMATCH_GIT_COMMIT", "0123abc")
    assert runinfo.git_commit() == {"commit": "0123abc", "dirty": False}


def test_a_new_run_record_does_not_inherit_an_earlier_run_json(tmp_path):
    runinfo.write_run_record(tmp_path, load_config(None, ["train.seed=1"]), {}, resumed_from=None)
    runinfo.write_run_record(tmp_path, load_config(None, ["train.seed=2"]), {}, resumed_from=None)
    run = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert run["seed"] == 2 and [h["event"] for h in run["history"]] == ["start"]


@pytest.mark.parametrize(
    "key, old, new", [("train.seed", 0, 1), ("data.split_seed", 0, 1), ("train.lr", 0.03, 0.1)]
)
def test_resume_refuses_a_changed_seed_or_learning_rate(key, old, new):
    saved = yaml.safe_load(yaml.safe_dump(to_dict(load_config(None, [f"{key}={old}"]))))
    with pytest.raises(ConfigError, match=rf"{key} \({old} -> {new}\)"):
        runinfo.check_resume_config(saved, load_config(None, [f"{key}={new}"]), Path("ckpt"))


def test_check_free_refuses_a_held_folder_before_any_data_is_read(tmp_path):
    out = tmp_path / "run"
    runfolder.check_free(out)  # no folder
    held = rf"in use by another run \(pid {os.getpid()} on "
    with runfolder.RunLock(out), pytest.raises(ConfigError, match=held):
        runfolder.check_free(out)
    (out / ".lock").write_text("{}", encoding="utf-8")  # a lock file nobody holds
    runfolder.check_free(out)


def test_release_closes_the_lock_and_removes_the_folders_a_failed_start_made(tmp_path):
    lock = runfolder.RunLock(tmp_path / "a" / "b")
    lock.acquire()
    fd = lock.fd
    lock.release(keep_folder=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed
    lock = runfolder.RunLock(tmp_path / "a" / "b")
    lock.acquire()
    lock.release()
    assert (tmp_path / "a" / "b").is_dir() and not (tmp_path / "a" / "b" / ".lock").exists()


def test_acquire_locks_again_when_the_lock_file_was_replaced(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_flock, calls = runfolder.fcntl.flock, []

    def flock(fd, op):
        real_flock(fd, op)
        if not calls:  # a releasing holder unlinks the file just after we locked it
            (out / ".lock").unlink()
        calls.append(op)

    monkeypatch.setattr(runfolder.fcntl, "flock", flock)
    lock = runfolder.RunLock(out)
    lock.acquire()
    assert len(calls) == 2
    assert os.fstat(lock.fd).st_ino == os.stat(out / ".lock").st_ino
    lock.release()
