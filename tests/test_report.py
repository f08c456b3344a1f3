"""Reports from fabricated run folders: numbers checked against values computed by hand."""

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from rsmatch.cli.report import main
from rsmatch.report import collect, read_evals


def fake_run(root: Path, name: str, algorithm: str, ratio: float, seed: int, best: float | None,
             final: float | None = None, commit: str = "a" * 40, detector: dict | None = None,
             dirty: bool = False, **config) -> Path:  # fmt: skip
    """A run folder as the trainer leaves it; best=None leaves it unfinished (no metrics.json)."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {"algorithm": algorithm,
           "data": {"replace_ratio": ratio, "labels_per_class": 25, "real_only": False},
           "train": {"seed": seed, "output_dir": str(run), "steps": 20},
           "ssl": {"threshold": 0.95}, "rsmatch": {"base": "fixmatch"}}  # fmt: skip
    for key, value in config.items():
        section, leaf = key.split("__")
        cfg[section][leaf] = value
    (run / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    ckpt = run / "checkpoints" / "step_00000010"  # checkpoints hold a copy of the config
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    (run / "run.json").write_text(
        json.dumps({"seed": seed, "git": {"commit": commit, "dirty": dirty}}), encoding="utf-8"
    )
    detector = detector or {}
    evals = []
    for step, frac in ((10, 0.5), (20, 1.0)):
        acc = None if best is None else (final if step == 20 else best - 0.1)
        e = {"step": step, "test_acc": acc, "best_acc": best}
        e.update({k: v * frac for k, v in detector.items()})
        if detector:
            e["queue_purity"] = 0.6 + 0.1 * frac
        evals.append(e)
    if best is None:
        evals = evals[:1]
    (run / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals), encoding="utf-8")
    if best is not None:
        metrics = {
            "algorithm": algorithm,
            "test_acc": final,
            "best_acc": best,
            "step": 20,
            **detector,
        }
        (run / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run / "tb")) as w:
        for step in range(1, 21):
            w.add_scalar("mask_rate", 0.01 * step + 0.01 * seed, step)
            if algorithm == "rsmatch":
                w.add_scalar("mask_real_rate", 0.006 * step, step)
                w.add_scalar("mask_fake_rate", 0.004 * step, step)
    return run


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    # fixmatch, r = 0.5: three seeds, one from another commit
    for seed, best, final in ((0, 0.80, 0.78), (1, 0.84, 0.82), (2, 0.90, 0.88)):
        fake_run(root, f"fm-r0.5-s{seed}", "fixmatch", 0.5, seed, best, final,
                 commit=("b" if seed == 2 else "a") * 40)  # fmt: skip
    # rsmatch, r = 0.5: two finished seeds with detector metrics, the third interrupted
    for seed, best, final, det, gen_a in ((0, 0.86, 0.85, 0.70, 0.60), (1, 0.88, 0.87, 0.80, 0.90)):
        fake_run(root, f"rs-r0.5-s{seed}", "rsmatch", 0.5, seed, best, final,
                 detector={"detector_acc": det, "detector_precision": 0.5, "detector_recall": 0.4,
                           "detector_acc/gen_a": gen_a})  # fmt: skip
    fake_run(root, "rs-r0.5-s2", "rsmatch", 0.5, 2, None)
    # rsmatch-push stages a copy of a run's files inside it (no run of their own)
    for staged in (root / "fm-r0.5-s0" / "hub", root / "rs-r0.5-s0" / "hub-detector"):
        staged.mkdir()
        for name in ("config.yaml", "run.json", "metrics.json", "evals.jsonl"):
            (staged / name).write_bytes((staged.parent / name).read_bytes())
    # rsmatch, r = 0.3: one seed
    fake_run(root, "rs-r0.3-s0", "rsmatch", 0.3, 0, 0.91, 0.90,
             detector={"detector_acc": 0.75, "detector_precision": 0.7, "detector_recall": 0.6})  # fmt: skip
    # flexmatch, r = 0.3: two seeds whose configs differ beyond the seed
    fake_run(root, "flex-r0.3-s0", "flexmatch", 0.3, 0, 0.70, 0.70)
    fake_run(root, "flex-r0.3-s1", "flexmatch", 0.3, 1, 0.72, 0.72, ssl__threshold=0.9)
    # fixmatch, r = 0.3 is in the grid's manifest but never started
    manifest = {"grid": {"axes": {"algorithm": ["fixmatch"], "train.seed": [0]}},
                "runs": [{"name": "fm-r0.3-s0", "axes": {"algorithm": "fixmatch", "train.seed": "0"},
                          "config": {"algorithm": "fixmatch", "data": {"replace_ratio": 0.3,
                                     "labels_per_class": 25}, "train": {"seed": 0}}}]}  # fmt: skip
    (root / "experiment.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root


def _csv(out: Path) -> dict[tuple[str, float], dict[str, str]]:
    with open(out / "table.csv", encoding="utf-8") as f:
        return {(r["method"], float(r["replace_ratio"])): r for r in csv.DictReader(f)}


def test_report_numbers_match_hand_computed_values(runs, tmp_path):
    out = tmp_path / "report"
    assert main([str(runs), "--out", str(out)]) == 0
    rows = _csv(out)
    fm = rows["fixmatch", 0.5]
    # best 80, 84, 90: mean 84.667; deviations -4.667, -0.667, 5.333 -> var 50.667 / 2 -> std 5.033
    assert float(fm["best_mean"]) == pytest.approx(84.6667, abs=1e-3)
    assert float(fm["best_std"]) == pytest.approx(5.0332, abs=1e-3)
    assert float(fm["final_mean"]) == pytest.approx(82.6667, abs=1e-3)
    assert float(fm["final_std"]) == pytest.approx(5.0332, abs=1e-3)
    assert (fm["n"], fm["n_missing"]) == ("3", "0")
    rs = rows["rsmatch", 0.5]
    # 86, 88 -> 87 ± 1.414; the interrupted third seed is counted as missing
    assert float(rs["best_mean"]) == pytest.approx(87.0) and float(rs["best_std"]) == pytest.approx(
        1.4142, abs=1e-3
    )
    assert (rs["n"], rs["n_missing"]) == ("2", "1")
    # detector 70, 80 -> 75 ± 7.071; generator a: 60, 90 -> 75 ± 21.213
    assert float(rs["detector_acc_mean"]) == pytest.approx(75.0)
    assert float(rs["detector_acc_std"]) == pytest.approx(7.0711, abs=1e-3)
    assert float(rs["detector_acc/gen_a_std"]) == pytest.approx(21.2132, abs=1e-3)
    one = rows["rsmatch", 0.3]
    assert float(one["best_mean"]) == pytest.approx(91.0) and one["best_std"] == ""
    never = rows["fixmatch", 0.3]
    assert (never["n"], never["n_missing"], never["best_mean"]) == ("0", "1", "")

    md = (out / "README.md").read_text(encoding="utf-8")
    best_table = md.split("## Best test accuracy (%)")[1].split("##")[0]
    lines = {
        line.split(" | ")[0].strip("| "): line
        for line in best_table.splitlines()
        if line.startswith("| ")
    }
    assert "84.67 ± 5.03 (n=3)" in lines["fixmatch"]
    assert "missing (0 of 1)" in lines["fixmatch"]
    assert "**87.00 ± 1.41** (n=2, 1 missing)" in lines["rsmatch"]  # best of r = 0.5
    assert "**91.00 ± n/a** (n=1)" in lines["rsmatch"]  # best of r = 0.3
    assert "71.00 ± 1.41 (n=2)" in lines["flexmatch"]
    assert "r = 0.3, 25 labels | r = 0.5, 25 labels" in best_table
    assert "[config](configs/fixmatch.yaml)" in lines["fixmatch"]
    assert (out / "configs" / "fixmatch.yaml").is_file()
    final_table = md.split("## Final test accuracy (%)")[1].split("##")[0]
    assert "**86.00 ± 1.41**" in final_table
    # warnings: a cell whose runs differ in commit, one whose configs differ; not for seeds
    warnings = md.split("## Warnings")[1].split("##")[0]
    assert (
        "fixmatch, r = 0.5, 25 labels: runs differ in commit (aaaaaaaaaaaa, bbbbbbbbbbbb)"
        in warnings
    )
    assert "flex-r0.3-s0 and flex-r0.3-s1 differ in config: ssl.threshold" in warnings
    assert "rsmatch" not in warnings
    missing = md.split("## Missing runs")[1].split("##")[0]
    assert "`rs-r0.5-s2`: stopped at step 10" in missing and "`fm-r0.3-s0`: not started" in missing
    # detector: accuracy 70, 80; precision 0.5, 0.5; recall 0.4, 0.4; generator a 60, 90; n = 2
    detector = md.split("## Detector on the unlabeled pool (%, final evaluation)")[1].split("##")[0]
    assert "| method | setting | accuracy | precision | recall | acc. gen_a | n |" in detector
    assert (
        "| rsmatch | r = 0.5, 25 labels | 75.00 ± 7.07 | 50.00 ± 0.00 | 40.00 ± 0.00 | "
        "75.00 ± 21.21 | 2 |"
    ) in detector


def test_report_figures_are_valid_non_blank_pngs(runs, tmp_path):
    out = tmp_path / "report"
    assert main([str(runs), "--out", str(out)]) == 0
    md = (out / "README.md").read_text(encoding="utf-8")
    for name in ("accuracy.png", "detector.png", "routing.png"):
        assert f"]({name})" in md
        with Image.open(out / name) as im:
            im.verify()
        pixels = np.asarray(Image.open(out / name).convert("RGB")).astype(int)
        assert pixels.std() > 0
        # drawn curves are coloured; frames and text are grey
        chroma = pixels.max(-1) - pixels.min(-1)
        assert (chroma > 60).sum() > 200, name


def test_a_report_of_unfinished_runs_has_no_empty_figures(tmp_path):
    """Early in a grid: no finished run, so no curve to label (matplotlib warned) and no
    figure to show (the report had an empty Figures section)."""
    fake_run(tmp_path / "runs", "fm-r0.5-s0", "fixmatch", 0.5, 0, None)
    out = tmp_path / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    md = (out / "README.md").read_text(encoding="utf-8")
    assert "## Missing runs" in md and "## Figures" not in md


def test_a_run_on_a_benchmark_reports_the_benchmarks_split_from_its_folder_or_hub_cache(
    tmp_path, monkeypatch
):
    """A run without a split in run.json (not started, or stopped early) on a benchmark: the
    ratio and labels are the benchmark's, not the config keys it overrides; a Hub id's meta
    comes from the local Hub cache only."""
    meta = tmp_path / "bench" / "rsmatch_benchmark.json"
    meta.parent.mkdir()
    meta.write_text(json.dumps({"replace_ratio": 0.25, "labels_per_class": 4}), encoding="utf-8")
    asked = []

    def try_to_load_from_cache(repo_id, filename, repo_type=None, **_):
        asked.append((repo_id, filename, repo_type))
        return str(meta) if repo_id == "you/bench" else None

    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", try_to_load_from_cache)
    for name, bench in (("folder", str(meta.parent)), ("hub", "you/bench"), ("uncached", "you/x")):
        fake_run(tmp_path / "runs", name, "fixmatch", 0.5, 0, 0.8, data__benchmark=bench)
    got = {r.name: (r.ratio, r.labels) for r in collect(tmp_path / "runs")}
    assert got == {"folder": (0.25, 4), "hub": (0.25, 4), "uncached": (0.5, 25)}
    assert asked == [("you/bench", "rsmatch_benchmark.json", "dataset"),
                     ("you/x", "rsmatch_benchmark.json", "dataset")]  # fmt: skip


def test_report_of_an_empty_folder_exits_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no runs" in capsys.readouterr().err
    assert main([str(tmp_path / "nope")]) == 2


def test_a_step_logged_twice_after_a_resume_keeps_the_last_value(tmp_path):
    (tmp_path / "evals.jsonl").write_text(
        '{"step": 2, "test_acc": 0.1}\n{"step": 4, "test_acc": 0.2}\n{"step": 4, "test_acc": 0.3}\n',
        encoding="utf-8",
    )
    assert read_evals(tmp_path) == [{"step": 2, "test_acc": 0.1}, {"step": 4, "test_acc": 0.3}]


def test_filter_first_runs_are_their_own_method(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "fm", "fixmatch", 0.5, 0, 0.80, 0.78)
    fake_run(root, "fm-filtered", "fixmatch", 0.5, 0, 0.84, 0.82,
             data__exclude_scores="scores.parquet", data__exclude_above=0.3)  # fmt: skip
    fake_run(root, "fm-real", "fixmatch", 0.5, 0, 0.90, 0.88, data__real_only=True)
    assert main([str(root), "--out", str(tmp_path / "report")]) == 0
    rows = _csv(tmp_path / "report")
    assert set(rows) == {("fixmatch", 0.5), ("fixmatch (real only)", 0.5),
                         ("fixmatch (filter-first at 0.3)", 0.5)}  # fmt: skip
    assert float(rows[("fixmatch (filter-first at 0.3)", 0.5)]["best_mean"]) == pytest.approx(84.0)


def test_ablations_are_named_as_in_the_paper(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "rs", "rsmatch", 0.5, 0, 0.90, 0.90)
    fake_run(root, "shared", "rsmatch", 0.5, 0, 0.80, 0.80, rsmatch__shared_encoder=True)
    fake_run(root, "fifo", "rsmatch", 0.5, 0, 0.70, 0.70, rsmatch__class_wise=False)
    fake_run(root, "drop", "rsmatch", 0.5, 0, 0.60, 0.60, rsmatch__fake_head=False)
    fake_run(root, "fm", "fixmatch", 0.5, 0, 0.50, 0.50, rsmatch__fake_head=False)  # not read
    assert main([str(root), "--out", str(tmp_path / "report")]) == 0
    best = {m: float(r["best_mean"]) for (m, _), r in _csv(tmp_path / "report").items()}
    assert best == {"fixmatch": 50.0, "rsmatch (w/o ind. models)": 80.0,
                    "rsmatch (w/o class-wise queue)": 70.0, "rsmatch (w/o fake head)": 60.0,
                    "rsmatch": 90.0}  # fmt: skip


def test_missing_runs_are_named_with_their_grid(tmp_path):
    """A run of grid g1 never started; a run of the same name in grid g2 finished."""
    root = tmp_path / "runs"
    fake_run(root / "g2", "fm", "fixmatch", 0.5, 0, 0.80, 0.80)
    manifest = {"grid": {"axes": {"algorithm": ["fixmatch"]}},
                "runs": [{"name": "fm", "axes": {"algorithm": "fixmatch"},
                          "config": {"algorithm": "fixmatch", "data": {"replace_ratio": 0.5,
                                     "labels_per_class": 25}, "train": {"seed": 0}}}]}  # fmt: skip
    (root / "g1").mkdir()
    (root / "g1" / "experiment.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert main([str(root), "--out", str(tmp_path / "report")]) == 0
    missing = (
        (tmp_path / "report" / "README.md").read_text(encoding="utf-8").split("## Missing runs")[1]
    )
    assert "- `g1/fm`: not started" in missing and "g2/fm" not in missing


def test_std_bands_stay_within_what_a_rate_can_be():
    import matplotlib.pyplot as plt

    from rsmatch.figures import _plot

    series = {"a": {0: 0.0, 10: 0.99}, "b": {0: 0.3, 10: 0.7}}  # std 0.21 at both steps
    fig, ax = plt.subplots()
    assert _plot(ax, ["a", "b"], series.get, "m", "C0")
    ys = ax.collections[0].get_paths()[0].vertices[:, 1]
    # step 0: mean 0.15, band [-0.06, 0.36] -> [0, 36]; step 10: 0.845 +- 0.205 -> [64, 100]
    assert ys.min() == 0.0 and ys.max() == 100.0
    plt.close(fig)


def test_a_grids_ablation_axis_is_named_by_the_method_alone(tmp_path):
    """The shipped Table 3 grid's `method` axis sets only keys the method name covers: rows are
    `rsmatch (w/o fake head)`, not `... method=without_fake_head`."""
    root = tmp_path / "runs"
    axes = {"method": {"without_fake_head": {"algorithm": "rsmatch", "rsmatch.fake_head": False},
                       "rsmatch": {"algorithm": "rsmatch"}}}  # fmt: skip
    entries = []
    for label, fake_head, best in (("without_fake_head", False, 0.6), ("rsmatch", True, 0.9)):
        name = f"method={label}"
        fake_run(root, name, "rsmatch", 0.5, 0, best, best, rsmatch__fake_head=fake_head)
        cfg = yaml.safe_load((root / name / "config.yaml").read_text(encoding="utf-8"))
        entries.append({"name": name, "axes": {"method": label}, "config": cfg})
    (root / "experiment.json").write_text(
        json.dumps({"grid": {"axes": axes}, "runs": entries}), encoding="utf-8"
    )
    assert main([str(root), "--out", str(tmp_path / "report")]) == 0
    assert set(_csv(tmp_path / "report")) == {("rsmatch (w/o fake head)", 0.5), ("rsmatch", 0.5)}


def test_a_run_from_a_dirty_tree_is_not_the_same_code(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "fm-s0", "fixmatch", 0.5, 0, 0.80, 0.80)
    fake_run(root, "fm-s1", "fixmatch", 0.5, 1, 0.82, 0.82, dirty=True)
    assert main([str(root), "--out", str(tmp_path / "report")]) == 0
    warnings = (
        (tmp_path / "report" / "README.md").read_text(encoding="utf-8").split("## Warnings")[1]
    )
    assert "runs differ in commit (aaaaaaaaaaaa, aaaaaaaaaaaa+dirty)" in warnings


def test_the_split_trained_on_comes_from_the_run_record(tmp_path):
    """A run on a saved benchmark: config.yaml keeps the ignored ratio and labels (0.5, 25),
    run.json's `split` the benchmark's own (0.25, 10); the report files it under the latter."""
    root = tmp_path / "runs"
    run = fake_run(root, "bench", "fixmatch", 0.5, 0, 0.80, 0.80)
    record = json.loads((run / "run.json").read_text(encoding="utf-8"))
    record["split"] = {"replace_ratio": 0.25, "labels_per_class": 10, "seed": 3}
    (run / "run.json").write_text(json.dumps(record), encoding="utf-8")
    assert main([str(root), "--out", str(tmp_path / "report")]) == 0
    (row,) = _csv(tmp_path / "report").values()
    assert (row["replace_ratio"], row["labels_per_class"]) == ("0.25", "10")


def test_a_stopped_run_is_named_with_its_last_evaluated_step(tmp_path):
    root = tmp_path / "runs"
    run = fake_run(root, "fm", "fixmatch", 0.5, 0, 0.80, 0.80)  # evaluated at steps 10 and 20
    (run / "metrics.json").unlink()
    assert main([str(root), "--out", str(tmp_path / "report")]) == 0
    missing = (
        (tmp_path / "report" / "README.md").read_text(encoding="utf-8").split("## Missing runs")[1]
    )
    assert "- `fm`: stopped at step 20" in missing
