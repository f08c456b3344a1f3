"""Checkpoints, run records and the run folder by hand: what is sealed, saved, loaded, refused
and recorded, on tiny hand-made folders (a mutation audit of rsmatch/checkpoint.py,
rsmatch/runinfo.py and rsmatch/runfolder.py)."""

import fcntl
import json
import os
import platform
import stat
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator

from rsmatch import checkpoint, runfolder, runinfo
from rsmatch.checkpoint import REQUIRED, CheckpointError, verify, write_manifest
from rsmatch.config import ConfigError, as_saved, load_config, to_dict

from .test_reliability import _sealed


def saved_by_hand(root: Path, step: int = 1) -> tuple[Accelerator, torch.nn.Module, Path]:
    """A real checkpoint of a 2x2 linear layer, as `checkpoint.save` writes it."""
    acc = Accelerator(cpu=True)
    model = acc.prepare(torch.nn.Linear(2, 2))
    config = {"zeta": 1, "alpha": "0o17"}  # not in sorted order; a text YAML 1.2 reads as 15
    path = checkpoint.save(acc, root, step, model, {"n": torch.tensor([7])}, {"step": step},
                           config, keep=2)  # fmt: skip
    return acc, model, path


def saved_config(**overrides: object) -> dict:
    """The config a checkpoint holds for `load_config(None, overrides)`, as read back."""
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    return as_saved(cfg)


# -- the manifest -----------------------------------------------------------------------------


def test_a_resealed_manifest_lists_the_files_but_not_itself(tmp_path):
    """Sealing a folder again (a manifest already there) vouches for the others only."""
    folder = _sealed(tmp_path, 1)
    write_manifest(folder)
    files = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["files"]
    assert sorted(files) == ["algorithm.safetensors", "config.yaml", "ema.safetensors",
                             "trainer.json"]  # fmt: skip
    assert files["config.yaml"]["size"] == 22  # "config.yaml of step 1\n"
    verify(folder)


def test_files_in_subfolders_are_listed_by_their_relative_path(tmp_path):
    """Sharded states (DeepSpeed) live in subfolders: named `sub/file`, checked there."""
    folder = tmp_path / "step_00000001"
    folder.mkdir()
    for name in REQUIRED:
        (folder / name).write_text("x", encoding="utf-8")
    (folder / "shards").mkdir()
    (folder / "shards" / "part.bin").write_text("abc", encoding="utf-8")
    write_manifest(folder)
    files = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["files"]
    assert files["shards/part.bin"]["size"] == 3 and "part.bin" not in files
    verify(folder)
    (folder / "shards" / "part.bin").write_text("abcd", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"shards/part.bin: 4 bytes, the manifest says 3$"):
        verify(folder)


def test_a_missing_manifest_says_the_checkpoint_is_incomplete(tmp_path):
    folder = _sealed(tmp_path, 1)
    (folder / "manifest.json").unlink()
    with pytest.raises(CheckpointError) as e:
        verify(folder)
    assert str(e.value) == f"{folder}/manifest.json: missing (the checkpoint is incomplete)"


@pytest.mark.parametrize(
    "text, problem",
    [('{"files": {"config.yaml": {"size": 3}}}', "malformed"),  # no sha256
     ('{"files": {"config.yaml": {"sha256": "0"}}}', "malformed"),  # no size
     ("[1, 2]", "unreadable (TypeError)"),
     ("{not json", "unreadable (JSONDecodeError)")],
)  # fmt: skip
def test_a_malformed_manifest_is_named(tmp_path, text, problem):
    folder = _sealed(tmp_path, 1)
    (folder / "manifest.json").write_text(text, encoding="utf-8")
    with pytest.raises(CheckpointError) as e:
        verify(folder)
    assert str(e.value) == f"{folder}/manifest.json: {problem}"


@pytest.mark.parametrize("name", ["trainer.json", "config.yaml", "algorithm.safetensors"])
def test_each_required_file_must_be_in_the_manifest(tmp_path, name):
    folder = _sealed(tmp_path, 1)
    (folder / name).unlink()
    write_manifest(folder)
    with pytest.raises(CheckpointError) as e:
        verify(folder)
    assert str(e.value) == f"{folder}/{name}: not in the manifest (an incomplete checkpoint)"


def test_a_file_of_the_same_size_with_other_bytes_is_named(tmp_path):
    folder = _sealed(tmp_path, 1)
    (folder / "trainer.json").write_text(
        "trainer.json of step 2\n", encoding="utf-8"
    )  # same 23 bytes
    with pytest.raises(CheckpointError) as e:
        verify(folder)
    assert str(e.value) == f"{folder}/trainer.json: contents differ from the manifest (sha256)"


# -- save and load ----------------------------------------------------------------------------


def test_save_writes_latest_config_and_trainer_state_as_given(tmp_path):
    """`latest` is one line naming the folder; config.yaml keeps the run's key order and quotes
    a text that would read back as a number."""
    _, _, path = saved_by_hand(tmp_path, 3)
    assert path == tmp_path / "step_00000003"
    assert (tmp_path / "latest").read_text(encoding="utf-8") == "step_00000003\n"
    assert (path / "config.yaml").read_text(encoding="utf-8") == "zeta: 1\nalpha: '0o17'\n"
    assert json.loads((path / "trainer.json").read_text(encoding="utf-8")) == {"step": 3}


def test_saved_safetensors_files_follow_the_umask(tmp_path):
    """0666 less the umask, like every other file of the run (0640 under umask 027)."""
    old = os.umask(0o027)
    try:
        _, _, path = saved_by_hand(tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.glob("*.safetensors")}
    assert {"ema.safetensors", "algorithm.safetensors"} <= modes.keys()
    assert set(modes.values()) == {0o640}


def test_readable_as_umask_reaches_subfolders(tmp_path):
    (tmp_path / "shards").mkdir()
    shard = tmp_path / "shards" / "a.safetensors"
    shard.write_bytes(b"x")
    shard.chmod(0o600)
    old = os.umask(0o002)
    try:
        checkpoint.readable_as_umask(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(shard.stat().st_mode) == 0o664


def test_load_names_a_checkpoint_whose_accelerate_state_fails(tmp_path):
    """A state Accelerate cannot load (its weights file gone): one CheckpointError naming it."""
    acc, model, path = saved_by_hand(tmp_path)
    weights = [p for p in path.iterdir() if p.name.startswith("model")]
    assert weights, sorted(p.name for p in path.iterdir())
    for p in weights:
        p.unlink()
    with pytest.raises(CheckpointError, match=rf"^{path}: cannot be loaded \("):
        checkpoint.load(acc, path, model)


def test_load_names_an_unreadable_trainer_state(tmp_path):
    acc, model, path = saved_by_hand(tmp_path)
    (path / "trainer.json").write_text("{", encoding="utf-8")
    with pytest.raises(CheckpointError, match=rf"^{path}: cannot be loaded \(JSONDecodeError: "):
        checkpoint.load(acc, path, model)


# -- choosing the checkpoint to resume from ---------------------------------------------------


def test_resume_from_a_step_in_an_empty_folder_says_none(tmp_path):
    with pytest.raises(CheckpointError) as e:
        checkpoint.select(tmp_path, 5)
    assert str(e.value) == (
        f"--resume-from 5: no checkpoint {tmp_path}/step_00000005 (steps: none)"
    )


def test_auto_fallback_with_nothing_intact_lists_every_reason(tmp_path):
    for step in (2, 4):
        (_sealed(tmp_path, step) / "trainer.json").unlink()
    with pytest.raises(CheckpointError) as e:
        checkpoint.select(tmp_path, "auto-fallback")
    assert str(e.value) == (
        f"--resume=auto-fallback: no intact checkpoint under {tmp_path} "
        f"({tmp_path}/step_00000004/trainer.json: missing; "
        f"{tmp_path}/step_00000002/trainer.json: missing)"
    )
    empty = tmp_path / "empty"
    with pytest.raises(CheckpointError) as e:
        checkpoint.select(empty, "auto-fallback")
    assert str(e.value) == f"--resume=auto-fallback: no intact checkpoint under {empty}"


def test_resume_without_a_latest_pointer_takes_the_newest_checkpoint(tmp_path):
    """A crash between a checkpoint's rename and its `latest` pointer leaves the sealed folder
    alone: `--resume` and a grid's rerun take it (verified, as any other)."""
    from rsmatch.experiment import run_state

    run = tmp_path / "run"
    assert checkpoint.latest(run / "checkpoints") is None and run_state(run) == "todo"
    _sealed(run / "checkpoints", 2)
    newest = _sealed(run / "checkpoints", 4)
    assert checkpoint.select(run / "checkpoints", "latest") == (newest, [])
    assert run_state(run) == "partial"
    (newest / "trainer.json").write_text("x", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"trainer.json: .* broken \(--resume=auto-fallback"):
        checkpoint.select(run / "checkpoints", "latest")


def test_a_file_the_manifest_does_not_list_is_refused(tmp_path):
    """Another rank's RNG state (or any file) added to a sealed checkpoint would be loaded
    unchecked: refused by name."""
    folder = _sealed(tmp_path, 1)
    (folder / "random_states_1.pkl").write_bytes(b"not written with the checkpoint")
    with pytest.raises(CheckpointError) as e:
        verify(folder)
    assert (
        str(e.value)
        == f"{folder / 'random_states_1.pkl'}: not in the manifest (added after the checkpoint)"
    )
    (folder / "random_states_1.pkl").unlink()
    (folder / "shards").mkdir()  # where DeepSpeed writes
    (folder / "shards" / "extra.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"shards/extra.pt: not in the manifest"):
        verify(folder)


# -- the resume rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [("train.eval_batch_size", 8), ("train.log_every", 3), ("train.save_every", 7),
     ("train.output_dir", "/elsewhere/run")],
)  # fmt: skip
def test_resume_may_change_each_key_that_leaves_the_trajectory(key, value):
    """Each of these may differ from the checkpoint's config (the list in RESUMABLE)."""
    runinfo.check_resume_config(saved_config(), load_config(None, [f"{key}={value}"]),
                                Path("ckpt"))  # fmt: skip


def test_a_resume_refusal_names_the_file_and_the_keys(tmp_path):
    saved = saved_config(**{"train.momentum": 0.5})
    with pytest.raises(ConfigError) as e:
        runinfo.check_resume_config(saved, load_config(None, []), Path("ck/config.yaml"))
    assert str(e.value).startswith(
        "--resume: the config differs from ck/config.yaml in train.momentum (0.5 -> 0.9); only "
        "train.steps, train.eval_every, "
    )


# -- run.json, config.yaml and evals.jsonl ----------------------------------------------------


def test_a_resume_appends_to_the_run_record(tmp_path, monkeypatch):
    """The first event stays, with the start's seed; the resume names its checkpoint; the
    extra facts are in the record and in each event."""
    monkeypatch.setattr(runinfo, "git_commit", lambda: {"commit": "abc", "dirty": False})
    runinfo.write_run_record(tmp_path, load_config(None, ["train.seed=1"]), {"world_size": 1},
                             resumed_from=None)  # fmt: skip
    runinfo.write_run_record(tmp_path, load_config(None, ["train.seed=1"]), {"world_size": 2},
                             resumed_from="ck/step_00000004")  # fmt: skip
    run = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert run["seed"] == 1 and run["world_size"] == 1 and run["git"] == {"commit": "abc",
                                                                          "dirty": False}  # fmt: skip
    assert [(h["event"], h["resumed_from"], h["world_size"]) for h in run["history"]] == [
        ("start", None, 1), ("resume", "ck/step_00000004", 2)]  # fmt: skip


def test_a_resume_with_an_unreadable_run_json_starts_a_new_record(tmp_path):
    (tmp_path / "run.json").write_text('{"seed": 0, "hist', encoding="utf-8")  # cut off
    runinfo.write_run_record(tmp_path, load_config(None, ["train.seed=5"]), {},
                             resumed_from="ck/step_00000002")  # fmt: skip
    run = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert run["seed"] == 5 and [h["event"] for h in run["history"]] == ["resume"]


def test_versions_are_recorded_as_installed_local_label_and_all(monkeypatch):
    """A CUDA build's `+cu130` is kept; a package not installed is left out."""

    def version(name):
        if name in ("deepspeed", "diffusers"):
            raise metadata.PackageNotFoundError(name)
        return f"1.{len(name)}+cu130"

    monkeypatch.setattr(runinfo.metadata, "version", version)
    found = runinfo.versions()
    assert found.pop("python") == platform.python_version()
    assert found == {"rsmatch": "1.7+cu130", "torch": "1.5+cu130", "torchvision": "1.11+cu130",
                     "accelerate": "1.10+cu130", "timm": "1.4+cu130", "datasets": "1.8+cu130",
                     "safetensors": "1.11+cu130", "numpy": "1.5+cu130",
                     "transformers": "1.12+cu130"}  # fmt: skip


def test_the_run_config_yaml_keeps_the_config_order(tmp_path):
    """config.yaml reads like the config, not sorted: model, train, ssl; output_dir first."""
    runinfo.write_run_record(tmp_path, load_config(None, []), {}, resumed_from=None)
    text = (tmp_path / "config.yaml").read_text(encoding="utf-8")
    assert text.startswith("algorithm: rsmatch\ndata:\n")
    assert "\ntrain:\n  output_dir: runs/demo\n  seed: 0\n  steps: 1048576\n" in text
    assert text.index("\nmodel:") < text.index("\ntrain:") < text.index("\nssl:")
    assert yaml.safe_load(text) == yaml.safe_load(yaml.safe_dump(to_dict(load_config(None, []))))


def test_trim_evals_keeps_the_step_resumed_from_and_says_how_many_it_dropped(tmp_path):
    (tmp_path / "evals.jsonl").write_text(
        '{"step": 2, "test_acc": 0.1}\n\n{"step": 4, "test_acc": 0.2}\n{"step": 6}\n',
        encoding="utf-8",
    )
    assert runinfo.trim_evals(tmp_path, 4) == 2  # step 6 and the blank line
    assert (tmp_path / "evals.jsonl").read_text(encoding="utf-8") == (
        '{"step": 2, "test_acc": 0.1}\n{"step": 4, "test_acc": 0.2}\n'
    )
    assert runinfo.trim_evals(tmp_path, 4) == 0
    assert runinfo.trim_evals(tmp_path / "none", 4) == 0


def test_a_last_evaluation_cut_off_by_a_crash_is_dropped_on_resume_and_skipped_by_a_report(
    tmp_path,
):
    """A crash (a full disk, SIGKILL) in the middle of appending an evaluation leaves a cut-off
    last line: the resume drops it (it crashed on it with a JSONDecodeError) and counts it; the
    report and `eval_entries` read the whole lines."""
    from rsmatch.report import read_evals

    cut = '{"step": 2, "test_acc": 0.1}\n{"step": 4, "test_acc": 0.2}\n{"step": 6, "test_a'
    (tmp_path / "evals.jsonl").write_text(cut, encoding="utf-8")
    assert [e["step"] for e in runinfo.eval_entries(tmp_path)] == [2, 4]
    assert [e["step"] for e in read_evals(tmp_path)] == [2, 4]
    assert runinfo.trim_evals(tmp_path, 6) == 1
    assert (tmp_path / "evals.jsonl").read_text(encoding="utf-8") == cut.rsplit("\n", 1)[0] + "\n"
    assert runinfo.eval_entries(tmp_path / "none") == []


# -- the run folder ---------------------------------------------------------------------------


def test_an_output_dir_under_a_file_is_named(tmp_path):
    (tmp_path / "f").write_text("x", encoding="utf-8")
    assert runfolder.unwritable(tmp_path / "f" / "run") == f"{tmp_path}/f is a file, not a folder"
    assert runfolder.unwritable(tmp_path / "a" / "b") is None


@pytest.mark.parametrize("inside", ["checkpoints", "tb"])
def test_check_writable_checks_the_folders_a_run_writes_into(tmp_path, monkeypatch, inside):
    """Write and search permission on the folder and on checkpoints/ and tb/ (faked: root may
    write anywhere)."""
    out = tmp_path / "run"
    (out / inside).mkdir(parents=True)
    asked = []

    def access(path, mode):
        asked.append(mode)
        return Path(path).name != inside

    monkeypatch.setattr(runfolder.os, "access", access)
    with pytest.raises(ConfigError) as e:
        runfolder.check_writable(out)
    assert str(e.value) == f"train.output_dir={str(out)!r}: {out}/{inside} is not writable"
    assert set(asked) == {os.W_OK | os.X_OK}


def held_by_hand(out: Path, text: str) -> int:
    """`out/.lock` holding `text`, locked by a descriptor of this process (close it after)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / ".lock").write_text(text, encoding="utf-8")
    fd = os.open(out / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_held_lock_without_a_readable_holder_is_still_refused(tmp_path):
    out = tmp_path / "run"
    fd = held_by_hand(out, "")  # the holder has not written its name yet
    try:
        with pytest.raises(ConfigError) as e:
            runfolder.check_free(out)
    finally:
        os.close(fd)
    assert str(e.value) == (
        f"train.output_dir={str(out)!r}: in use by another run (holder not yet recorded); "
        "one run per folder"
    )


def test_the_busy_message_says_since_when(tmp_path):
    out = tmp_path / "run"
    holder = {"pid": 12, "host": "node3", "started": "2026-01-02T03:04:05+0000"}
    fd = held_by_hand(out, json.dumps(holder))
    named = r"\(pid 12 on node3 since 2026-01-02T03:04:05\+0000\)"
    try:
        with pytest.raises(ConfigError, match=named):
            runfolder.RunLock(out).acquire()
    finally:
        os.close(fd)


def test_the_lock_file_names_only_its_holder(tmp_path):
    """A longer lock file left behind is overwritten whole, not in part."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(
        json.dumps({"pid": 1, "host": "x" * 200, "started": "long ago"}), encoding="utf-8"
    )
    with runfolder.RunLock(out):
        holder = json.loads((out / ".lock").read_text(encoding="utf-8"))
        assert holder["pid"] == os.getpid() and set(holder) == {"pid", "host", "started"}


def test_with_runlock_keeps_the_folder_it_made(tmp_path):
    """A run that ends (the `with` block) keeps its folder, even an empty one."""
    with runfolder.RunLock(tmp_path / "a" / "run"):
        pass
    assert (tmp_path / "a" / "run").is_dir() and not (tmp_path / "a" / "run" / ".lock").exists()


def test_a_folder_that_cannot_be_made_leaves_no_parents_behind(tmp_path):
    """mkdir makes `a` and then fails on a name too long: the refusal is one line and `a` is
    removed again (a refused run leaves the folder as it found it)."""
    out = tmp_path / "a" / ("n" * 300)
    with pytest.raises(ConfigError) as e:
        runfolder.RunLock(out).acquire()
    assert str(e.value) == f"train.output_dir={str(out)!r}: cannot create it (File name too long)"
    assert not (tmp_path / "a").exists()


def test_check_free_under_a_file_finds_nobody(tmp_path):
    (tmp_path / "f").write_text("x", encoding="utf-8")
    assert runfolder.check_free(tmp_path / "f" / "run") is None


def test_a_new_run_is_refused_where_only_latest_is_left(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_00000004\n", encoding="utf-8")
    cfg = load_config(None, [f"train.output_dir={out}"])
    with pytest.raises(ConfigError, match="holds a run already; pass --resume or choose another"):
        runfolder.check_run_folder(cfg, None)
    assert runfolder.check_run_folder(load_config(None, [f"train.output_dir={tmp_path / 'new'}"]),
                                      False) == (None, [])  # fmt: skip


def test_resume_latest_by_name_and_by_true_are_the_same(tmp_path):
    """`resume` is True or "latest": the checkpoint `latest` points at, verified."""
    out = tmp_path / "run"
    cfg = load_config(None, [f"train.output_dir={out}", "train.steps=10"])
    folder = out / "checkpoints" / "step_00000004"
    folder.mkdir(parents=True)
    for name in REQUIRED:
        (folder / name).write_text("{}\n", encoding="utf-8")
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)), encoding="utf-8")
    write_manifest(folder)
    (out / "checkpoints" / "latest").write_text("step_00000004\n", encoding="utf-8")
    assert runfolder.check_run_folder(cfg, True) == (folder, [])
    assert runfolder.check_run_folder(cfg, "latest") == (folder, [])
