"""Experiment grids, rsmatch-push and the exports by hand: what the other tests leave unpinned
(a mutation audit of rsmatch/experiment.py, rsmatch/hub.py and rsmatch/export.py). No network:
the Hub calls are stand-ins."""

import json
import os
import signal
import stat
import sys
from types import SimpleNamespace

import pytest
import yaml

from rsmatch import experiment, hub
from rsmatch.experiment import MANIFEST, GridError, config_drift, load_grid, run_grid, select

from .test_experiment import write_grid
from .test_synth_store_by_hand import _run

# --- grid files ----------------------------------------------------------------------------------


def test_a_missing_grid_file_is_a_grid_error(tmp_path):
    """No such file: a GridError naming it, not a FileNotFoundError."""
    with pytest.raises(GridError, match=r"/nope\.yaml: no such grid file$"):
        load_grid(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "raw, message",
    [
        ([1, 2], "a grid is a mapping with base, output, axes, overrides"),
        ({"base": "BASE", "axes": {"train.seed": [0]}}, "output: missing from "),
        ({"base": "BASE", "output": "o", "axes": {"train.seed": [0]}, "overrides": [3]},
         "overrides: expected a list of key=value strings"),
        ({"base": "BASE", "output": "o", "axes": ["train.seed"]},
         "axes: expected a mapping axis: [values]"),
        ({"base": "BASE", "output": "o", "axes": {"method": {"x": {"train.output_dir": "d"}}}},
         "axes.method.x: run folders are named by the grid"),
    ],
)  # fmt: skip
def test_malformed_grids_name_the_grid_key(tmp_path, raw, message):
    """Each shape error is a GridError naming the key at fault."""
    base = tmp_path / "base.yaml"
    base.write_text("algorithm: fixmatch\n", encoding="utf-8")
    text = yaml.safe_dump(raw).replace("BASE", str(base))
    (tmp_path / "grid.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(GridError) as e:
        load_grid(tmp_path / "grid.yaml")
    assert message in str(e.value)


def test_a_bad_base_config_is_blamed_on_base_without_overrides(tmp_path):
    """No `overrides`: the base file is the culprit; with them, the overrides are."""
    grid = write_grid(tmp_path, {"train.seed": [0]})
    (tmp_path / "base.yaml").write_text("train:\n  lr: -1\n", encoding="utf-8")
    with pytest.raises(GridError, match=r"^base: train.lr=-1.0: must be positive"):
        load_grid(grid)
    grid = write_grid(tmp_path, {"train.seed": [0]}, overrides=["train.steps=3"])
    (tmp_path / "base.yaml").write_text("train:\n  lr: -1\n", encoding="utf-8")
    with pytest.raises(GridError, match=r"^overrides: train.lr=-1.0"):
        load_grid(grid)


def test_a_named_axis_value_may_set_nothing(tmp_path):
    """`baseline:` (null) in a named axis is the base config as it is."""
    grid = load_grid(write_grid(tmp_path, {"method": {"baseline": None,
                                                       "oracle": {"data.real_only": True}}}))  # fmt: skip
    assert [r.name for r in grid.runs] == ["method=baseline", "method=oracle"]
    assert grid.runs[0].config.data.real_only is False
    assert grid.runs[1].config.data.real_only is True


def test_named_axis_with_integer_names_as_in_the_docs(tmp_path):
    """docs/experiments.md's `seed: {0: {...}, 1: {...}}`: labels are the text "0", "1"."""
    grid = load_grid(write_grid(tmp_path, {"seed": {0: {"train.seed": 0, "data.split_seed": 0},
                                                    1: {"train.seed": 1, "data.split_seed": 1}}}))  # fmt: skip
    assert [r.name for r in grid.runs] == ["seed=0", "seed=1"]
    assert grid.runs[1].labels == {"seed": "1"}
    assert (grid.runs[1].config.train.seed, grid.runs[1].config.data.split_seed) == (1, 1)


def test_a_mapping_value_names_its_run_with_sorted_keys(tmp_path):
    """{b: .., a: ..} and {a: .., b: ..} are one value: the label sorts the keys."""
    grid = load_grid(write_grid(tmp_path, {"data.synthetic": [{"b": "y", "a": "x"}]}))
    run = grid.runs[0]
    assert run.labels == {"data.synthetic": '{"a":"x","b":"y"}'}
    assert run.name == "data.synthetic=a_x_,_b_y"


def test_run_names_up_to_200_characters_are_allowed(tmp_path):
    """`method=` + 193 characters (200) is a folder name; one more is refused."""
    grid = load_grid(write_grid(tmp_path, {"method": {"a" * 193: {"train.seed": 1}}}))
    assert len(grid.runs[0].name) == 200
    with pytest.raises(GridError, match=r"^axes: run name method=a{53}\.\.\. is too long"):
        load_grid(write_grid(tmp_path, {"method": {"a" * 194: {"train.seed": 1}}}))


def test_output_dir_and_progress_are_no_drift(tmp_path):
    """A finished run whose config.yaml names its folder otherwise (`output` written relative
    then, absolute now) or ran without progress bars is the same run; any other key drifts."""
    run = load_grid(write_grid(tmp_path, {"train.seed": [0]})).runs[0]
    run.path.mkdir(parents=True)
    (run.path / "metrics.json").write_text("{}", encoding="utf-8")
    (run.path / "config.yaml").write_text(
        "train:\n  output_dir: elsewhere/run\n  progress: false\n  steps: 10\n", encoding="utf-8"
    )
    assert config_drift(run) is None
    (run.path / "config.yaml").write_text(
        "train:\n  output_dir: elsewhere/run\n  lr: 0.5\n", encoding="utf-8"
    )
    assert config_drift(run) == ("train.lr", "train.lr is 0.5 there, 0.03 in the grid")


def test_a_run_not_started_is_no_drift(tmp_path):
    """A config.yaml in a folder with neither metrics.json nor a checkpoint (a run that died
    before its first checkpoint) starts afresh: no drift; with metrics.json it is drift."""
    run = load_grid(write_grid(tmp_path, {"train.seed": [0]})).runs[0]
    run.path.mkdir(parents=True)
    (run.path / "config.yaml").write_text("train:\n  steps: 99\n", encoding="utf-8")
    assert config_drift(run) is None
    (run.path / "metrics.json").write_text("{}", encoding="utf-8")
    assert config_drift(run) == ("train.steps", "train.steps is 99 there, 10 in the grid")


def test_only_takes_an_axis_value_as_written_in_the_run_name(tmp_path):
    """docs/experiments.md: `--only algorithm=rsmatch  # axis = value (as in the run name)`;
    the run of value `a/b` is named `method=a_b`, so `--only method=a_b` should pick it."""
    grid = load_grid(write_grid(tmp_path, {"method": {"a/b": {"train.seed": 1},
                                                       "c": {"train.seed": 2}}}))  # fmt: skip
    assert [r.name for r in grid.runs] == ["method=a_b", "method=c"]
    assert [r.name for r in select(grid.runs, ["method=a_b"])] == ["method=a_b"]
    assert [r.name for r in select(grid.runs, ["method=a/b"])] == ["method=a_b"]  # as given
    with pytest.raises(GridError, match="matches no run"):
        select(grid.runs, ["method=a"])  # a value, not a part of one


# --- running a grid ------------------------------------------------------------------------------


def _finish(run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text("{}", encoding="utf-8")


def test_run_state_needs_the_latest_pointer_to_resume(tmp_path):
    """An empty checkpoints/ (a run stopped before its first save) starts afresh: todo."""
    (tmp_path / "checkpoints").mkdir()
    assert experiment.run_state(tmp_path) == "todo"
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002\n", encoding="utf-8")
    assert experiment.run_state(tmp_path) == "partial"
    (tmp_path / "metrics.json").write_text("{}", encoding="utf-8")
    assert experiment.run_state(tmp_path) == "done"


def test_run_grid_passes_the_base_config_and_overrides_and_writes_the_manifest(tmp_path):
    """argv is --config BASE then the run's overrides (output_dir last); experiment.json names
    the grid file, the raw grid and each run's name, axes, overrides and config."""
    path = write_grid(tmp_path, {"train.seed": [0, 1]})
    grid = load_grid(path)
    out = tmp_path / "out"
    seen = []

    def train(argv):
        seen.append(argv)
        _finish(out / "train.seed=0")
        return 0

    _finish(out / "train.seed=1")  # finished before: skipped
    assert run_grid(grid, grid.runs, train) == 0
    assert seen == [["--config", str(tmp_path / "base.yaml"), "train.seed=0",
                     f'train.output_dir="{out}/train.seed=0"']]  # fmt: skip
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["grid_file"] == str(path)
    assert manifest["grid"] == yaml.safe_load(path.read_text(encoding="utf-8"))
    first = manifest["runs"][0]
    assert (first["name"], first["axes"]) == ("train.seed=0", {"train.seed": "0"})
    assert first["overrides"] == ["train.seed=0", f'train.output_dir="{out}/train.seed=0"']
    assert first["config"]["train"]["seed"] == 0
    assert first["config"]["train"]["output_dir"] == f"{out}/train.seed=0"
    assert [r["name"] for r in manifest["runs"]] == ["train.seed=0", "train.seed=1"]


def test_run_grid_says_how_many_runs_it_skipped(tmp_path, capsys):
    grid = load_grid(write_grid(tmp_path, {"train.seed": [0, 1, 2]}))
    _finish(grid.runs[0].path)
    _finish(grid.runs[2].path)
    assert run_grid(grid, grid.runs, lambda argv: _finish(grid.runs[1].path) or 0) == 0
    assert "[grid] 2 of 3 runs finished already: skipped\n" in capsys.readouterr().out


def test_ctrl_c_in_a_run_stops_the_grid_with_130(tmp_path, capsys):
    """A KeyboardInterrupt out of the trainer is a stop: exit 130, no later run starts."""
    grid = load_grid(write_grid(tmp_path, {"train.seed": [0, 1]}))
    calls = []

    def train(argv):
        calls.append(argv)
        raise KeyboardInterrupt

    try:
        code = run_grid(grid, grid.runs, train)
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped run_grid")
    assert code == 130 and len(calls) == 1
    assert "[grid] stopped during train.seed=0; rerun the same command to resume" in (
        capsys.readouterr().out
    )


def test_an_exception_in_a_run_is_a_failure_and_the_grid_goes_on(tmp_path, capsys):
    grid = load_grid(write_grid(tmp_path, {"train.seed": [0, 1]}))
    calls = []

    def train(argv):
        calls.append(argv)
        if len(calls) == 1:
            raise RuntimeError("broken run")
        _finish(grid.runs[1].path)
        return 0

    assert run_grid(grid, grid.runs, train) == 1
    assert len(calls) == 2
    err = capsys.readouterr().err
    assert "RuntimeError: broken run" in err  # the traceback
    assert err.rstrip().endswith("[grid] 1 run(s) failed: train.seed=0")


def test_a_run_that_wrote_metrics_counts_as_done_whatever_its_exit_code(tmp_path, capsys):
    grid = load_grid(write_grid(tmp_path, {"train.seed": [0]}))
    assert run_grid(grid, grid.runs, lambda argv: _finish(grid.runs[0].path) or 1) == 0
    assert "FAILED" not in capsys.readouterr().err


@pytest.mark.parametrize("code", [-signal.SIGTERM, -signal.SIGINT, 130])
def test_a_run_killed_by_a_signal_stops_the_grid(tmp_path, code):
    """accelerate launch's child killed by SIGTERM/SIGINT returns -15/-2: a stop (130)."""
    grid = load_grid(write_grid(tmp_path, {"train.seed": [0, 1]}))
    calls = []
    assert run_grid(grid, grid.runs, lambda argv: calls.append(argv) or code) == 130
    assert len(calls) == 1


def test_accelerate_launcher_command_and_signal_forwarding(monkeypatch, capsys):
    """`python -m accelerate.commands.launch LAUNCHER --module rsmatch.cli.train ARGS`; SIGTERM
    is passed to the child while it runs, and the handlers are restored after."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    sent = []

    class Child:
        def __init__(self, cmd):
            self.cmd = cmd

        def send_signal(self, signum):
            sent.append(signum)

        def wait(self):
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
            return 3

    children = []
    monkeypatch.setattr(
        experiment.subprocess, "Popen", lambda cmd: children.append(Child(cmd)) or children[-1]
    )
    code = experiment.train_with_accelerate(["--config", "c.yaml"], ["--num_processes", "2"])
    assert code == 3
    assert children[0].cmd == [sys.executable, "-m", "accelerate.commands.launch",
                               "--num_processes", "2", "--module", "rsmatch.cli.train",
                               "--config", "c.yaml"]  # fmt: skip
    assert sent == [signal.SIGTERM]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert capsys.readouterr().out.startswith("+ ")


# --- rsmatch-push ----------------------------------------------------------------------------------


def test_model_card_states_processes_generators_and_ratio(tmp_path):
    run = _run(tmp_path / "r", split={"real": "cifar10", "synthetic": {"sd14": 40},
                                      "replace_ratio": 0.3, "seed": 1})  # fmt: skip
    record = json.loads((run / "run.json").read_text(encoding="utf-8"))
    record["world_size"] = 2
    (run / "run.json").write_text(json.dumps(record), encoding="utf-8")
    text = hub.model_card(run, "me/m")
    data = "Data: real `cifar10`, synthetic {'sd14': 40}, ? labels per class, replace ratio 0.3,"
    assert data in text
    assert "training seed 3; 2 process(es);" in text


def test_stage_copies_the_record_and_replaces_an_old_staging(tmp_path):
    """RUN/hub is rebuilt: every record file and the card, nothing left from before."""
    run = _run(tmp_path / "r")
    (run / "hub").mkdir()
    (run / "hub" / "stale.bin").write_text("old", encoding="utf-8")
    hub.stage(run, "me/m", run / "hub")
    assert sorted(p.name for p in (run / "hub").iterdir()) == [
        "README.md", "config.json", "config.yaml", "evals.jsonl", "metrics.json",
        "model.safetensors", "run.json",
    ]  # fmt: skip
    assert (run / "hub" / "evals.jsonl").read_text(encoding="utf-8") == "{}\n"


def test_detector_push_of_an_unfinished_run_names_the_missing_files(tmp_path, capsys):
    run = _run(tmp_path / "r")
    (run / "detector").mkdir()
    (run / "detector" / "model.safetensors").write_bytes(b"d")
    (run / "metrics.json").unlink()
    assert hub.main([str(run), "me/det", "--detector"]) == 2
    assert capsys.readouterr().err == (
        f"rsmatch-push: error: {run}: not a finished run (missing metrics.json)\n"
    )
    assert not (run / "hub-detector").exists()


@pytest.mark.parametrize(
    "metrics, problem",
    [("{not json", "not valid JSON (Expecting property name enclosed in double quotes: line 1 "
                   "column 2 (char 1))"),
     ("[0.5]", "not a JSON object")],
)  # fmt: skip
def test_an_unreadable_record_is_a_usage_error(tmp_path, capsys, metrics, problem):
    """metrics.json not JSON, or not an object: exit 2, one line naming it, no traceback."""
    run = _run(tmp_path / "r")
    (run / "metrics.json").write_text(metrics, encoding="utf-8")
    assert hub.main([str(run), "me/m"]) == 2
    assert capsys.readouterr().err == f"rsmatch-push: error: {run / 'metrics.json'}: {problem}\n"


def test_stage_only_stages_and_pushes_nothing(tmp_path, monkeypatch, capsys):
    run = _run(tmp_path / "r")
    monkeypatch.setattr(hub, "push", lambda *a: pytest.fail("pushed"))
    assert hub.main([str(run), "me/m", "--stage-only"]) == 0
    assert capsys.readouterr().out == f"staged {run / 'hub'}\n"
    assert (run / "hub" / "README.md").is_file()


def test_push_prints_the_commit_url_or_exits_1_naming_the_staged_folder(
    tmp_path, monkeypatch, capsys
):
    run = _run(tmp_path / "r")
    monkeypatch.setattr(hub, "push", lambda folder, repo, private: f"https://hub/{repo}/commit/1")
    assert hub.main([str(run), "me/m"]) == 0
    assert capsys.readouterr().out == "pushed https://hub/me/m/commit/1\n"

    def fail(folder, repo, private):
        raise OSError("no route")

    monkeypatch.setattr(hub, "push", fail)
    assert hub.main([str(run), "me/m"]) == 1
    assert capsys.readouterr().err == (
        f"rsmatch-push: push failed (OSError: no route); staged files are in {run / 'hub'}\n"
    )


@pytest.mark.parametrize("private", [False, True])
def test_data_folders_go_to_their_own_pusher_with_private(tmp_path, monkeypatch, capsys, private):
    """A benchmark goes to push_benchmark, a filter output to filter.push; --private is passed
    on; success prints `pushed REPO`, a failure exits 1."""
    import rsmatch.benchmark.push
    import rsmatch.benchmark.sources
    import rsmatch.benchmark.store
    import rsmatch.filter

    calls = []
    monkeypatch.setattr(rsmatch.benchmark.store, "load_benchmark", lambda f: ("DD", {}))
    monkeypatch.setattr(rsmatch.benchmark.push, "push_benchmark",
                        lambda f, dd, repo, priv: calls.append(("bench", f, dd, repo, priv)))  # fmt: skip
    monkeypatch.setattr(rsmatch.benchmark.sources, "load_saved",
                        lambda path, name, flag: ("DS", path, name, flag))  # fmt: skip
    monkeypatch.setattr(rsmatch.filter, "push",
                        lambda f, ds, repo, priv: calls.append(("filter", f, ds, repo, priv)))  # fmt: skip
    bench, filtered = tmp_path / "b", tmp_path / "f"
    bench.mkdir()
    (bench / rsmatch.benchmark.store.META_FILE).write_text("{}", encoding="utf-8")
    (filtered / "dataset").mkdir(parents=True)
    (filtered / "scores.parquet").write_bytes(b"")
    flag = ["--private"] if private else []
    assert hub.main([str(bench), "me/b", *flag]) == 0
    assert hub.main([str(filtered), "me/f", *flag]) == 0
    assert calls == [
        ("bench", bench, "DD", "me/b", private),
        ("filter", filtered, ("DS", filtered / "dataset", f"{filtered}/dataset", False), "me/f",
         private),
    ]  # fmt: skip
    assert capsys.readouterr().out == "pushed me/b\npushed me/f\n"

    def down(*a):
        raise ConnectionError("offline")

    monkeypatch.setattr(rsmatch.filter, "push", down)
    assert hub.main([str(filtered), "me/f"]) == 1
    assert capsys.readouterr().err == "rsmatch-push: push failed (ConnectionError: offline)\n"


# --- exports -------------------------------------------------------------------------------------


def test_exported_classifier_loads_in_eval_mode_readable_with_its_stem(tmp_path, capsys):
    """A small-stem ResNet export: loads with its 3x3 stem, in eval mode, silently, and its
    weights are as readable as the umask allows (safetensors writes 0600)."""
    from rsmatch.export import export_classifier, load_classifier
    from rsmatch.models import Classifier

    trained = Classifier("resnet18", 2, [0.5] * 3, [0.25] * 3, small_stem=True, fake_head=True)
    umask = os.umask(0o022)
    try:
        export_classifier(trained, tmp_path / "m", ["cat", "dog"], [0.5] * 3, [0.25] * 3, True,
                          "fixmatch")  # fmt: skip
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m" / "model.safetensors").stat().st_mode) == 0o644
    assert (
        json.loads((tmp_path / "m" / "config.json").read_text(encoding="utf-8"))["small_stem"]
        is True
    )
    model = load_classifier(tmp_path / "m")
    assert model.training is False and model.fake_head is None
    assert tuple(model.encoder.conv1.weight.shape[-2:]) == (3, 3)
    assert model.class_names == ["cat", "dog"]
    assert capsys.readouterr().out == ""
    # its own card: huggingface_hub's generic one said the model had been pushed to the Hub
    card = (tmp_path / "m" / "README.md").read_text(encoding="utf-8")
    assert "A `resnet18` classifier trained with **fixmatch**" in card and "- fixmatch\n" in card
    assert (
        "Classes (2): cat, dog." in card and "mean [0.5, 0.5, 0.5], std [0.25, 0.25, 0.25]" in card
    )
    assert "pushed to the Hub" not in card


def test_exported_detector_loads_in_eval_mode_silently_with_its_card(tmp_path, capsys):
    from rsmatch.export import export_detector, load_detector
    from rsmatch.models import Detector

    det = Detector("wrn10_1", [0.5] * 3, [0.25] * 3)
    export_detector(det, tmp_path / "d", [0.5] * 3, [0.25] * 3, [24, 16], ["cat"], "cifar",
                    {"steps (train.steps)": 7}, None)  # fmt: skip
    loaded = load_detector(tmp_path / "d")
    assert loaded.training is False and loaded.image_size == [24, 16]
    assert capsys.readouterr().out == ""
    card = (tmp_path / "d" / "README.md").read_text(encoding="utf-8")
    assert "the labeled real images of `cifar` (called real)" in card
    assert "uint8 RGB images, NCHW, 24x16; normalised inside the model " in card
    assert "(mean [0.5, 0.5, 0.5], std [0.25, 0.25, 0.25])" in card
    assert "No detector metrics at export" in card


def test_a_hub_id_is_passed_on_and_a_bad_path_refused(monkeypatch, tmp_path):
    """`me/det` (no such folder here) goes to from_pretrained as given; `a/b/c` is no id."""
    from rsmatch import export
    from rsmatch.models import Detector

    asked, det = [], SimpleNamespace()
    det.eval = lambda: det
    monkeypatch.setattr(Detector, "from_pretrained",
                        classmethod(lambda cls, spec, strict: asked.append(spec) or det))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert export.load_detector("me/det") is det and asked == ["me/det"]
    with pytest.raises(FileNotFoundError, match=r"^a/b/c: no such folder, and not a Hub model id$"):
        export.load_detector("a/b/c")


def test_detector_card_lists_metrics_sorted(tmp_path):
    from rsmatch.export import detector_card
    from rsmatch.models import Detector

    det = Detector("wrn10_1", [0.5] * 3, [0.25] * 3, image_size=[32, 32])
    text = str(detector_card(det, {}, {"zeta": 0.5, "alpha": 0.125, "mid": 1.0}))
    assert "| alpha | 0.1250 |\n| mid | 1.0000 |\n| zeta | 0.5000 |" in text
