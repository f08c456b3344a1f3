"""Experiment grids: validation before any run, naming, filters, skip and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rsmatch.cli.experiment import main
from rsmatch.config import as_saved, flat_config
from rsmatch.experiment import MANIFEST, load_grid, run_grid, select
from tests.conftest import tiny_overrides

from .conftest import ROOT


def write_grid(tmp_path: Path, axes: dict, overrides: list[str] = (), **extra) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text("algorithm: fixmatch\ntrain:\n  steps: 10\n", encoding="utf-8")
    grid = {"base": str(base), "output": str(tmp_path / "out"), "axes": axes, **extra}
    if overrides:
        grid["overrides"] = list(overrides)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "axes, extra, culprit",
    [
        ({"train.batch_sise": [8]}, {}, "axes.train.batch_sise=8: train.batch_sise: unknown key"),
        ({"data.replace_ratio": [0.5, 1.5]}, {}, "axes.data.replace_ratio=1.5"),
        ({"algorithm": ["fixmatch", "fixmach"]}, {}, "axes.algorithm=fixmach"),
        ({"train.seed": []}, {}, "axes.train.seed: empty axis"),
        ({"method": {}}, {}, "axes.method: empty axis"),
        ({"method": {"oracle": {"data.real_onyl": True}}}, {}, "data.real_onyl: unknown key"),
        ({"train.seed": [0]}, {"base": "configs/nope.yaml"}, "base: no such config file"),
        ({"train.seed": [0]}, {"overrides": ["train.lr=-1"]}, "overrides: train.lr=-1"),
        ({"train.seed": [0]}, {"seeds": [1]}, "seeds: unknown grid key"),
        ({"train.output_dir": ["a"]}, {}, "axes.train.output_dir"),
        ({"train.seed": [0]}, {"overrides": ["train.seed=3"]}, "train.seed is also in"),
        ({"data.benchmark": ["bench"], "data.replace_ratio": [0.3]}, {}, "data.replace_ratio is ignored"),
    ],
)  # fmt: skip
def test_bad_grid_exits_2_naming_the_culprit_and_writes_nothing(
    tmp_path, capsys, axes, extra, culprit
):
    grid = write_grid(tmp_path, axes)
    if extra:
        raw = yaml.safe_load(grid.read_text(encoding="utf-8"))
        raw.update(extra)
        grid.write_text(yaml.safe_dump(raw), encoding="utf-8")
    before = sorted(tmp_path.rglob("*"))
    assert main([str(grid)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and culprit in err, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even the output folder


def test_a_missing_data_folder_exits_2_before_any_run(tmp_path, capsys):
    """A typo in one axis value of a long grid is found before the first run, not at its
    turn; a dry run still lists the grid (its folders may be generated later)."""
    real = tmp_path / "real"
    real.mkdir()
    grid = write_grid(tmp_path, {"data.synthetic": [{"g": str(real)}, {"g": str(tmp_path / "typo")}]},
                      overrides=[f"data.real={real}"])  # fmt: skip
    assert main([str(grid), "--dry-run"]) == 0
    before = sorted(tmp_path.rglob("*"))
    assert main([str(grid)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"data.synthetic.g: {tmp_path / 'typo'}: no such folder"), err
    assert "error: run data.synthetic=" in err and len(err.splitlines()) == 1, err
    assert sorted(tmp_path.rglob("*")) == before
    # a finished run is not trained again: its folder may have gone since
    done = tmp_path / "out" / load_grid(grid).runs[1].name
    done.mkdir(parents=True)
    (done / "metrics.json").write_text("{}", encoding="utf-8")
    assert main([str(grid), "--only", "typo"]) == 0


def test_two_axes_setting_one_key_are_refused(tmp_path, capsys):
    grid = write_grid(
        tmp_path, {"algorithm": ["fixmatch"], "method": {"oracle": {"algorithm": "fixmatch"}}}
    )
    assert main([str(grid)]) == 2
    assert "axes.method: sets algorithm, which axes.algorithm sets too" in capsys.readouterr().err


def test_runs_are_named_from_axis_values_and_configured_by_them(tmp_path):
    grid = load_grid(write_grid(
        tmp_path,
        {"method": {"fm": {"algorithm": "fixmatch"},
                    "fm_real": {"algorithm": "fixmatch", "data.real_only": True}},
         "data.replace_ratio": [0.3, 0.7], "data.synthetic": [{"g": "x/y"}], "train.seed": [0, 1]},
        overrides=["train.lr=0.1"],
    ))  # fmt: skip
    names = [r.name for r in grid.runs]
    assert len(names) == 8 and len(set(names)) == 8
    assert names[0] == "method=fm,data.replace_ratio=0.3,data.synthetic=g_x_y,train.seed=0"
    run = grid.runs[-1]
    assert run.labels == {"method": "fm_real", "data.replace_ratio": "0.7",
                          "data.synthetic": '{"g":"x/y"}', "train.seed": "1"}  # fmt: skip
    cfg = run.config
    assert cfg.algorithm == "fixmatch" and cfg.data.real_only is True
    assert cfg.data.replace_ratio == 0.7 and cfg.train.seed == 1 and cfg.train.lr == 0.1
    assert cfg.data.synthetic == {"g": "x/y"}
    assert cfg.train.output_dir == str(tmp_path / "out" / run.name)


def test_dry_run_lists_states_and_only_filters(tmp_path, capsys):
    grid = write_grid(tmp_path, {"algorithm": ["fixmatch", "rsmatch"], "train.seed": [0, 1]})
    out = tmp_path / "out"
    done, partial = out / "algorithm=fixmatch,train.seed=1", out / "algorithm=rsmatch,train.seed=0"
    (done / "metrics.json").parent.mkdir(parents=True)
    (done / "metrics.json").write_text("{}", encoding="utf-8")
    (partial / "checkpoints").mkdir(parents=True)
    (partial / "checkpoints" / "latest").write_text("step_00000004\n", encoding="utf-8")
    assert main([str(grid), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"todo     {out}/algorithm=fixmatch,train.seed=0",
        f"done     {done}",
        f"partial  {partial}",
        f"todo     {out}/algorithm=rsmatch,train.seed=1",
        "4 runs: 1 done, 1 partial, 2 todo",
    ]
    assert main([str(grid), "--dry-run", "--only", "algorithm=rsmatch"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 runs: 0 done, 1 partial, 1 todo"
    assert main([str(grid), "--dry-run", "--only", "train.seed=1", "--only", "fixm"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1 runs: 1 done, 0 partial, 0 todo"
    assert main([str(grid), "--dry-run", "--only", "train.seed=7"]) == 2
    assert "matches no run" in capsys.readouterr().err
    assert not (out / MANIFEST).exists()  # a dry run writes nothing


def test_only_matches_an_axis_value_exactly(tmp_path):
    """`train.seed=1` is not `train.seed=10`, though one name contains the other."""
    grid = load_grid(write_grid(tmp_path, {"train.seed": [1, 10]}))
    assert [r.name for r in select(grid.runs, ["train.seed=1"])] == ["train.seed=1"]
    assert len(select(grid.runs, ["seed=1"])) == 2  # not an axis: a substring of the name


def test_two_values_that_name_one_folder_are_refused(tmp_path, capsys):
    grid = write_grid(tmp_path, {"method": {"a/b": {"train.seed": 1}, "a_b": {"train.seed": 2}}})
    assert main([str(grid), "--dry-run"]) == 2
    assert "get the same folder 'method=a_b'" in capsys.readouterr().err


def test_a_finished_run_with_another_config_stops_the_grid(tmp_path, capsys):
    grid = write_grid(tmp_path, {"train.seed": [0]})
    run = tmp_path / "out" / "train.seed=0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}", encoding="utf-8")
    (run / "config.yaml").write_text(
        "algorithm: fixmatch\ntrain:\n  steps: 99\n  seed: 0\n", encoding="utf-8"
    )
    assert main([str(grid), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.steps is 99 there, 10 in the grid); move the run away or change `output` " in err
    assert err.rstrip().endswith("`rsmatch-train --resume train.steps=N` extends one run alone)")


def test_a_finished_run_on_other_generators_stops_the_grid(tmp_path, capsys):
    """data.synthetic is compared whole: {a: ...} against {b: ...} share no dotted key."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    grid = write_grid(tmp_path, {"train.seed": [0]}, [f"data.synthetic={{b: {tmp_path / 'b'}}}"])
    run = tmp_path / "out" / "train.seed=0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}", encoding="utf-8")
    saved = {"algorithm": "fixmatch", "train": {"steps": 10, "seed": 0},
             "data": {"synthetic": {"a": str(tmp_path / "a")}}}  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    assert main([str(grid), "--dry-run"]) == 2
    assert f"data.synthetic is {{'a': '{tmp_path / 'a'}'}} there" in capsys.readouterr().err


def test_launcher_arguments_need_the_accelerate_launcher(tmp_path, capsys):
    grid = write_grid(tmp_path, {"train.seed": [0]})
    assert main([str(grid), "--", "--num_processes", "2"]) == 2
    assert "need --launcher accelerate" in capsys.readouterr().err


@pytest.mark.parametrize(
    "launched", [{"WORLD_SIZE": "2"}, {"WORLD_SIZE": "1", "ACCELERATE_USE_DEEPSPEED": "true"}]
)
def test_a_grid_under_accelerate_launch_is_refused(tmp_path, capsys, monkeypatch, launched):
    """A grid trains its runs in its own process: under a launch of several ranks every rank
    would drive the whole grid; under DeepSpeed its second run met the first one's destroyed
    process group (DeepSpeed keeps it)."""
    for key, value in launched.items():
        monkeypatch.setenv(key, value)
    grid = write_grid(tmp_path, {"train.seed": [0]})
    assert main([str(grid)]) == 2
    assert "start it plainly and pass --launcher accelerate" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _mtime(run: Path) -> int:
    return (run / "metrics.json").stat().st_mtime_ns


@pytest.mark.slow
def test_tiny_grid_runs_end_to_end_and_continues_after_a_stop(sources, tmp_path, capsys):
    overrides = [o for o in tiny_overrides(sources, tmp_path / "unused", **{"train.steps": 6})
                 if not o.startswith("train.output_dir=")]  # fmt: skip
    grid = write_grid(tmp_path, {"algorithm": ["fixmatch", "rsmatch"], "train.seed": [0, 1]},
                      overrides=overrides)  # fmt: skip
    out = tmp_path / "out"
    first, second = out / "algorithm=fixmatch,train.seed=0", out / "algorithm=fixmatch,train.seed=1"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "rsmatch.cli.experiment", str(grid)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + 300
    # the second run's first checkpoint (step 2 of 6): its loop runs and handles signals
    while not (second / "checkpoints" / "latest").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output
    assert "stopped during algorithm=fixmatch,train.seed=1" in output
    assert (first / "metrics.json").is_file() and not (second / "metrics.json").exists()
    stopped_at = int(
        (second / "checkpoints" / "latest").read_text(encoding="utf-8").strip().split("_")[1]
    )
    assert 2 <= stopped_at < 6
    finished = _mtime(first)

    capsys.readouterr()
    assert main([str(grid)]) == 0  # in this process now
    log = capsys.readouterr().out
    assert "[grid] resuming algorithm=fixmatch,train.seed=1" in log
    assert "starting algorithm=fixmatch,train.seed=0" not in log
    assert "[grid] starting algorithm=rsmatch,train.seed=1" in log
    for run in out.iterdir():
        if run.is_dir():
            assert json.loads((run / "metrics.json").read_text(encoding="utf-8"))["step"] == 6, run
    assert _mtime(first) == finished  # not redone
    assert json.loads((second / "run.json").read_text(encoding="utf-8"))["history"][-1][
        "resumed_from"
    ]
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert [r["name"] for r in manifest["runs"]] == sorted(
        p.name for p in out.iterdir() if p.is_dir()
    )
    mtimes = {p: _mtime(p) for p in out.iterdir() if p.is_dir()}
    assert main([str(grid)]) == 0  # all done: nothing reruns
    log = capsys.readouterr().out
    assert "[grid] st" not in log and "[grid] 4 of 4 runs finished already: skipped" in log
    assert {p: _mtime(p) for p in mtimes} == mtimes


def test_shipped_grids_expand_to_the_papers_runs(monkeypatch):
    monkeypatch.chdir(ROOT)  # grid paths are relative to the repository root
    t1 = load_grid("configs/experiments/table1_cifar10.yaml")
    assert len(t1.runs) == 6 * 3 * 3
    oracle = [r.config for r in t1.runs if r.labels["method"] == "fixmatch_real_only"]
    assert len(oracle) == 9 and all(c.algorithm == "fixmatch" and c.data.real_only for c in oracle)
    assert {(r.config.train.seed, r.config.data.split_seed) for r in t1.runs} == {
        (0, 0),
        (1, 1),
        (2, 2),
    }
    assert {r.config.data.replace_ratio for r in t1.runs} == {0.3, 0.5, 0.7}
    t100 = load_grid("configs/experiments/table1_cifar100.yaml")
    assert len(t100.runs) == 54 and t100.runs[0].config.data.real == "uoft-cs/cifar100"
    demo = load_grid("configs/experiments/cpu_demo.yaml")
    assert len(demo.runs) == 8 and demo.runs[0].config.train.steps == 200
    # the committed report's runs, as the grid makes them now: every key they record (keys
    # added since are not in them), the run folder left out (the report's is under runs/)
    for algorithm in ("fixmatch", "rsmatch"):
        committed = yaml.safe_load(
            (ROOT / f"docs/report-cpu-demo/configs/{algorithm}.yaml").read_text()
        )
        run = next(r for r in demo.runs if r.name.startswith(f"algorithm={algorithm},"))
        now = flat_config(as_saved(run.config))
        differ = {k: (v, now.get(k, "<absent>")) for k, v in flat_config(committed).items()
                  if k != "train.output_dir" and now.get(k, "<absent>") != v}  # fmt: skip
        assert not differ, differ
    l100 = load_grid("configs/experiments/labels100.yaml")
    assert len(l100.runs) == 2 * 2 * 3
    assert {(r.config.data.labels_per_class, r.config.data.replace_ratio) for r in l100.runs} == {
        (100, 0.5)
    }
    c100 = [r.config for r in l100.runs if r.labels["dataset"] == "cifar100"]
    assert len(c100) == 6 and all(
        c.data.real == "uoft-cs/cifar100" and c.train.weight_decay == 0.001
        and set(c.data.synthetic) == {"glide", "sd14", "sdxl_lightning"} for c in c100
    )  # fmt: skip
    t3 = load_grid("configs/experiments/table3_ablations.yaml")
    switches = {
        r.labels["method"]: (r.config.algorithm, r.config.rsmatch.shared_encoder,
                             r.config.rsmatch.class_wise, r.config.rsmatch.fake_head)
        for r in t3.runs
    }  # fmt: skip
    assert len(t3.runs) == 5 * 3 and switches == {
        "fixmatch": ("fixmatch", False, True, True),
        "without_independent_models": ("rsmatch", True, True, True),
        "without_class_wise_queue": ("rsmatch", False, False, True),
        "without_fake_head": ("rsmatch", False, True, False),
        "rsmatch": ("rsmatch", False, True, True),
    }


def test_a_failed_run_is_reported_on_stderr_and_the_grid_goes_on(tmp_path, capsys):
    grid = load_grid(write_grid(tmp_path, {"train.seed": [0, 1]}))
    started = []

    def train(argv: list[str]) -> int:
        started.append([a for a in argv if a.startswith("train.seed=")])
        return 2  # each run refuses to start, as a bad path found late would

    assert run_grid(grid, grid.runs, train) == 1
    assert started == [["train.seed=0"], ["train.seed=1"]]  # the second ran after the first failed
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert "[grid] FAILED train.seed=0 (exit code 2); continuing" in err
    assert err[-1] == "[grid] 2 run(s) failed: train.seed=0, train.seed=1"
    assert "[grid] starting train.seed=1" in captured.out and "FAILED" not in captured.out


def test_null_and_boolean_axis_values_name_runs_as_yaml_and_load_as_values(tmp_path):
    grid = load_grid(
        write_grid(
            tmp_path, {"data.unlabeled_per_class": [None, 10], "data.real_only": [True, False]}
        )
    )
    assert [r.name for r in grid.runs][:2] == [
        "data.unlabeled_per_class=null,data.real_only=true",
        "data.unlabeled_per_class=null,data.real_only=false",
    ]
    assert grid.runs[0].config.data.unlabeled_per_class is None
    assert grid.runs[0].config.data.real_only is True


def test_a_partial_run_with_another_config_is_refused(tmp_path, capsys):
    grid = write_grid(tmp_path, {"train.seed": [0]})
    run = tmp_path / "out" / "train.seed=0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000004\n", encoding="utf-8")
    (run / "config.yaml").write_text(
        "algorithm: fixmatch\ntrain:\n  steps: 10\n  lr: 0.5\n", encoding="utf-8"
    )
    assert main([str(grid), "--dry-run"]) == 2
    assert "train.lr is 0.5 there, 0.03 in the grid" in capsys.readouterr().err


def test_train_output_dir_in_grid_overrides_is_refused(tmp_path, capsys):
    grid = write_grid(tmp_path, {"train.seed": [0]}, overrides=["train.output_dir=elsewhere"])
    assert main([str(grid)]) == 2
    assert "overrides: train.output_dir is set by the grid" in capsys.readouterr().err


def test_partial_runs_are_resumed_and_a_stopped_run_stops_the_grid(tmp_path, capsys):
    grid = load_grid(write_grid(tmp_path, {"train.seed": [0, 1]}))
    done, partial = grid.runs[0].path, grid.runs[1].path
    done.mkdir(parents=True)
    (done / "metrics.json").write_text("{}", encoding="utf-8")
    (done / "checkpoints").mkdir()
    (done / "checkpoints" / "latest").write_text(
        "step_00000010\n", encoding="utf-8"
    )  # a finished run has both
    (partial / "checkpoints").mkdir(parents=True)
    (partial / "checkpoints" / "latest").write_text("step_00000004\n", encoding="utf-8")
    calls = []
    assert run_grid(grid, grid.runs, lambda argv: calls.append(argv) or 0) == 130  # 0, no metrics
    assert len(calls) == 1 and calls[0][-1] == "--resume" and "train.seed=1" in calls[0]
