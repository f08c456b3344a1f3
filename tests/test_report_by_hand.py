"""rsmatch-report and rsmatch-analyze: behaviour a mutation audit found unpinned.

Values are computed by hand in the comments; figures are checked by the data handed to
matplotlib, not by pixels.
"""

import math
from pathlib import Path
from types import SimpleNamespace

import matplotlib.figure
import numpy as np
import pytest
import torch
import yaml
from torch import nn

from rsmatch import analysis, figures
from rsmatch.cli.report import main
from rsmatch.report import collect, make_cells, read_evals

from .test_report import fake_run


def _report(root: Path, out: Path, *args: str) -> str:
    assert main([str(root), "--out", str(out), *args]) == 0
    return (out / "README.md").read_text(encoding="utf-8")


def _table_rows(md: str, title: str = "## Best test accuracy (%)") -> list[str]:
    table = md.split(title)[1].split("##")[0]
    return [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]


@pytest.fixture
def saved_figures(monkeypatch):
    """Every figure the report draws, by file name, instead of PNGs on disk."""
    got = {}

    def save(fig, path):
        got[Path(path).name] = fig
        Path(path).write_bytes(b"")

    monkeypatch.setattr(figures, "_save", save)
    yield got
    import matplotlib.pyplot as plt

    for fig in got.values():
        plt.close(fig)


# --- rows, cells and their order --------------------------------------------------------------


def test_rows_follow_the_registry_with_real_only_first(tmp_path):
    """Rows: supervised, the SSL baselines, RSMatch (registration order); `(real only)` first."""
    root = tmp_path / "runs"
    fake_run(root, "rs", "rsmatch", 0.5, 0, 0.9, 0.9)
    fake_run(root, "flex", "flexmatch", 0.5, 0, 0.8, 0.8)
    fake_run(root, "fm", "fixmatch", 0.5, 0, 0.7, 0.7)
    fake_run(root, "fm-real", "fixmatch", 0.5, 0, 0.6, 0.6, data__real_only=True)
    fake_run(root, "sup", "supervised", 0.5, 0, 0.5, 0.5)
    rows = [r.split(" | ")[0].strip("| ") for r in _table_rows(_report(root, tmp_path / "o"))]
    assert rows == ["method", "supervised", "fixmatch (real only)", "fixmatch", "flexmatch",
                    "rsmatch"]  # fmt: skip


def test_cells_of_one_method_are_ordered_by_labels_then_ratio(tmp_path):
    """Detector rows of one method: r = 0.3 before r = 0.5 (same labels)."""
    root = tmp_path / "runs"
    for name, ratio in (("a", 0.5), ("b", 0.3)):
        fake_run(root, name, "rsmatch", ratio, 0, 0.9, 0.9, detector={"detector_acc": 0.7})
    md = _report(root, tmp_path / "o")
    rows = _table_rows(md, "## Detector on the unlabeled pool")
    assert [r.split(" | ")[1] for r in rows[1:]] == ["r = 0.3, 25 labels", "r = 0.5, 25 labels"]


def test_a_rsmatch_run_on_another_base_is_its_own_method(tmp_path):
    """rsmatch.base = flexmatch: the row `rsmatch (flexmatch)`, apart from plain rsmatch."""
    root = tmp_path / "runs"
    fake_run(root, "rs", "rsmatch", 0.5, 0, 0.9, 0.9)
    fake_run(root, "rs-flex", "rsmatch", 0.5, 0, 0.8, 0.8, rsmatch__base="flexmatch")
    assert {r.method for r in collect(root)} == {"rsmatch", "rsmatch (flexmatch)"}


def test_the_lowest_seed_is_a_cells_reference_run(tmp_path):
    """Within a cell runs go by seed, not name: the warning names seed 0 first, and the
    report's config copy is seed 0's."""
    root = tmp_path / "runs"
    fake_run(root, "z-seed0", "fixmatch", 0.5, 0, 0.8, 0.8, ssl__threshold=0.7)
    fake_run(root, "a-seed1", "fixmatch", 0.5, 1, 0.8, 0.8, ssl__threshold=0.9)
    out = tmp_path / "o"
    md = _report(root, out)
    assert "z-seed0 and a-seed1 differ in config: ssl.threshold" in md
    assert yaml.safe_load((out / "configs" / "fixmatch.yaml").read_text(encoding="utf-8"))[
        "ssl"
    ] == {"threshold": 0.7}


def test_an_unfinished_runs_commit_is_neither_a_warning_nor_listed(tmp_path):
    """Only finished runs' code counts: a stopped run from another commit changes nothing."""
    root = tmp_path / "runs"
    fake_run(root, "s0", "fixmatch", 0.5, 0, 0.8, 0.8)
    fake_run(root, "s1", "fixmatch", 0.5, 1, None, commit="c" * 40)
    out = tmp_path / "o"
    md = _report(root, out)
    assert "differ in commit" not in md
    assert (out / "table.csv").read_text(encoding="utf-8").splitlines()[1].split(",")[
        -2
    ] == "a" * 40


def test_a_config_difference_names_its_first_five_keys(tmp_path):
    """Six keys differ (sorted: ssl.a .. ssl.f): the warning names ssl.a to ssl.e only."""
    root = tmp_path / "runs"
    fake_run(root, "s0", "fixmatch", 0.5, 0, 0.8, 0.8)
    extra = {f"ssl__{k}": 1 for k in "abcdef"}
    fake_run(root, "s1", "fixmatch", 0.5, 1, 0.8, 0.8, **extra)
    md = _report(root, tmp_path / "o")
    assert "s0 and s1 differ in config: ssl.a, ssl.b, ssl.c, ssl.d, ssl.e\n" in md


def test_evals_out_of_order_are_read_by_step(tmp_path):
    """evals.jsonl with a later step first (logs joined after a resume): sorted by step."""
    (tmp_path / "evals.jsonl").write_text(
        '{"step": 20, "x": 2}\n{"step": 10, "x": 1}\n', encoding="utf-8"
    )
    assert [e["step"] for e in read_evals(tmp_path)] == [10, 20]


# --- the README's text ------------------------------------------------------------------------


def test_the_readme_counts_runs_not_cells(tmp_path):
    """Three runs in one cell, two finished: `2 of 3 runs finished`."""
    root = tmp_path / "runs"
    fake_run(root, "s0", "fixmatch", 0.5, 0, 0.8, 0.8)
    fake_run(root, "s1", "fixmatch", 0.5, 1, 0.8, 0.8)
    fake_run(root, "s2", "fixmatch", 0.5, 2, None)
    assert "2 of 3 runs finished." in _report(root, tmp_path / "o")


def test_commit_links_drop_dirty_from_the_url_and_configs_have_slug_names(tmp_path):
    """--repo-url: the link targets the bare sha, the text keeps `+dirty`; a method with
    punctuation gets configs/rsmatch-w-o-fake-head.yaml (no trailing dash)."""
    root = tmp_path / "runs"
    fake_run(root, "rs", "rsmatch", 0.5, 0, 0.8, 0.8, dirty=True, rsmatch__fake_head=False)
    out = tmp_path / "o"
    md = _report(root, out, "--repo-url", "https://h/x/")
    sha = "a" * 40
    assert f"[`aaaaaaa+dirty`](https://h/x/commit/{sha})" in md
    assert "[config](configs/rsmatch-w-o-fake-head.yaml)" in md
    assert (out / "configs" / "rsmatch-w-o-fake-head.yaml").is_file()


def test_a_ratio_of_one_is_titled_without_a_decimal(tmp_path):
    """Column titles format the ratio with :g: `r = 1, 25 labels`."""
    root = tmp_path / "runs"
    fake_run(root, "fm", "fixmatch", 1.0, 0, 0.8, 0.8)
    assert "| r = 1, 25 labels |" in _report(root, tmp_path / "o")


# --- figures: what is plotted against what ----------------------------------------------------


def _lines(ax) -> dict[str, tuple[list, list]]:
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines}


def test_the_accuracy_figure_plots_the_mean_test_accuracy_of_finished_runs(tmp_path, saved_figures):
    """Seeds 0, 1 finished: test acc at step 10 is 0.70, 0.74 (best - 0.1), at 20 0.78, 0.82
    -> means 72, 80; std at 20 = 0.02 * sqrt 2 = 2.828 points. A stopped seed 2 (test acc
    0.5 at both steps) is not in the mean."""
    root = tmp_path / "runs"
    fake_run(root, "s0", "fixmatch", 0.5, 0, 0.80, 0.78)
    fake_run(root, "s1", "fixmatch", 0.5, 1, 0.84, 0.82)
    (fake_run(root, "s2", "fixmatch", 0.5, 2, 0.60, 0.50) / "metrics.json").unlink()
    _report(root, tmp_path / "o")
    (ax,) = saved_figures["accuracy.png"].axes
    steps, ys = _lines(ax)["fixmatch"]
    assert steps == [10, 20] and ys == pytest.approx([72.0, 80.0])
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() == pytest.approx(80 + 2.8284, abs=1e-3)


def test_the_detector_figure_has_a_curve_per_generator(tmp_path, saved_figures):
    """Two seeds: generator a at step 20 is 0.6, 0.9 -> 75; at step 10 half that, 37.5."""
    root = tmp_path / "runs"
    for seed, gen_a in ((0, 0.6), (1, 0.9)):
        fake_run(root, f"s{seed}", "rsmatch", 0.5, seed, 0.9, 0.9,
                 detector={"detector_acc": 0.8, "detector_acc/gen_a": gen_a})  # fmt: skip
    _report(root, tmp_path / "o")
    (ax,) = saved_figures["detector.png"].axes
    lines = _lines(ax)
    assert set(lines) == {"all", "gen_a"}
    assert lines["gen_a"] == ([10, 20], pytest.approx([37.5, 75.0]))


def test_the_routing_figure_has_queue_purity_and_all_three_mask_rates(tmp_path, saved_figures):
    """An RSMatch run logs queue purity and three mask rates: four rows; the routed-real rate
    at step 20 is 0.006 * 20 = 12 %."""
    root = tmp_path / "runs"
    fake_run(root, "rs", "rsmatch", 0.5, 0, 0.9, 0.9, detector={"detector_acc": 0.8})
    _report(root, tmp_path / "o")
    axes = saved_figures["routing.png"].axes
    assert [ax.get_ylabel() for ax in axes] == ["queue purity (%)", "mask_rate (%)",
                                                "mask_real_rate (%)", "mask_fake_rate (%)"]  # fmt: skip
    steps, ys = _lines(axes[2])["rsmatch"]
    assert steps[-1] == 20 and ys[-1] == pytest.approx(12.0)


def test_a_figure_no_longer_drawn_is_removed_from_the_report_folder(tmp_path):
    """A stale detector.png from an earlier report is deleted when no run has a detector."""
    root, out = tmp_path / "runs", tmp_path / "o"
    fake_run(root, "fm", "fixmatch", 0.5, 0, 0.8, 0.8)
    out.mkdir()
    (out / "detector.png").write_bytes(b"old")
    md = _report(root, out)
    assert not (out / "detector.png").exists() and "detector.png" not in md


def test_a_second_report_in_one_process_rereads_tensorboard(tmp_path):
    """The TensorBoard cache of an earlier report (here: empty) is not reused."""
    root = tmp_path / "runs"
    run = fake_run(root, "fm", "fixmatch", 0.5, 0, 0.8, 0.8)
    figures._TB_CACHE[run.resolve()] = {}
    assert "](routing.png)" in _report(root, tmp_path / "o")


def test_band_skips_nan_values_and_has_no_std_for_one_run():
    """Step 0: 0.2 and NaN -> mean 0.2, std 0 (one value); step 1: 0.2, 0.4 -> 0.3 ± 0.1414."""
    series = {"a": {0: 0.2, 1: 0.2}, "b": {0: math.nan, 1: 0.4}}
    steps, mean, std = figures.band(["a", "b"], series.get)
    assert list(steps) == [0, 1]
    assert mean == pytest.approx([0.2, 0.3]) and std == pytest.approx([0.0, 0.141421], abs=1e-6)


def test_cells_done_and_missing_split_on_metrics(tmp_path):
    """make_cells: one cell of three runs, one without metrics.json."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        fake_run(root, f"s{seed}", "fixmatch", 0.5, seed, 0.8, 0.8)
    fake_run(root, "s2", "fixmatch", 0.5, 2, None)
    (cell,) = make_cells(collect(root))
    assert [r.name for r in cell.done] == ["s0", "s1"] and [r.name for r in cell.missing] == ["s2"]


# --- rsmatch-analyze ---------------------------------------------------------------------------


def _pool(labels, synthetic, generator=None, names=("a", "b", "c")):
    labels = np.asarray(labels)
    n = len(labels)
    return SimpleNamespace(
        labels=labels,
        synthetic=np.asarray(synthetic, dtype=bool),
        generator=np.asarray(generator if generator is not None else [""] * n),
        class_names=list(names),
        images=torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8),
    )


def test_the_gradcam_grid_is_real_then_synthetic_per_class_with_empty_slots():
    """Class 0: real {0, 1}, synthetic {2}; class 1: real {3, 4}, synthetic {5, 6}. With two
    per class: [r, r, s, -1] for class 0, then [r, r, s, s] for class 1; two rows."""
    pool = _pool([0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 0, 0, 1, 1])
    grid, rows = analysis.pick_grid(pool, per_class=2, classes=2, seed=0)
    assert rows == 2 and len(grid) == 8
    assert sorted(grid[0:2]) == [0, 1] and grid[2:4] == [2, -1]
    assert sorted(grid[4:6]) == [3, 4] and sorted(grid[6:8]) == [5, 6]


def test_features_covers_every_image_in_batches():
    """5 images in batches of 2: 5 feature rows, in order."""
    classifier = lambda x: {"feat": x.float().flatten(1)}  # noqa: E731
    images = torch.arange(5 * 3, dtype=torch.uint8).reshape(5, 3, 1, 1)
    assert analysis.features(classifier, images, batch=2).tolist() == images.flatten(1).tolist()


def test_tsne_perplexity_and_provenance_legend(monkeypatch):
    """10 features: perplexity min(30, 9 / 3) = 3; the right panel lists real (6) and each
    generator of a synthetic image, g1 (3) and g2 (1), not the real images' empty generator."""
    import sklearn.manifold

    asked = {}

    class FakeTSNE:
        def __init__(self, n, perplexity, init, random_state):
            asked["perplexity"] = perplexity

        def fit_transform(self, feats):
            return np.random.default_rng(0).normal(size=(len(feats), 2))

    monkeypatch.setattr(sklearn.manifold, "TSNE", FakeTSNE)
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    pool = _pool([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1],
                 ["", "", "", "", "", "", "g1", "g1", "g2", "g1"])  # fmt: skip
    analysis.tsne_figure(pool, np.zeros((10, 4)), 0, Path("unused.png"))
    assert asked["perplexity"] == pytest.approx(3.0)
    legend = [t.get_text() for t in saved[0].axes[1].get_legend().get_texts()]
    assert legend == ["real (6)", "g1 (3)", "g2 (1)"]


class _ToFloat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


class _Encoder(nn.Module):  # timm's two halves: features, then pooling
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def forward_head(self, f: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return f.mean((2, 3))


class _Net(nn.Module):
    """An exported model's shape (classifier or detector): normalize, encoder, head."""

    def __init__(self) -> None:
        super().__init__()
        self.normalize, self.encoder, self.head = _ToFloat(), _Encoder(), nn.Identity()


@pytest.mark.parametrize("target, expected", [("class", [0, 1]), ("synthetic", [1, 1])])
def test_gradcam_explains_the_true_class_or_the_synthetic_logit(monkeypatch, target, expected):
    """One row, one per side: a real image of class 0 and a synthetic one of class 1. The
    classifier explains the true class (0, 1), the detector the synthetic logit (1, 1);
    titles say real on the left, syn on the right."""
    pytest.importorskip("pytorch_grad_cam")
    import pytorch_grad_cam

    captured = []

    class FakeCam:
        def __init__(self, net, target_layers):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __call__(self, images, targets):
            captured.extend(t.category for t in targets)
            return np.zeros((len(images), 8, 8), dtype=np.float32)

    monkeypatch.setattr(pytorch_grad_cam, "GradCAMPlusPlus", FakeCam)
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    pool = _pool([0, 1], [0, 1], names=("a", "b"))
    analysis.gradcam_figure(_Net(), pool, [0, 1], 1, 1, target, Path("unused.png"), "t")
    assert captured == expected
    titles = [ax.get_title().split(" ")[0] for ax in saved[0].axes]
    assert titles == ["real", "syn"]


def test_analyze_asks_for_as_many_classes_as_the_run_has_or_ten(tmp_path, monkeypatch):
    """--classes equal to the run's 3 classes is allowed (3 rows); unset: min(10, 3) = 3 rows."""
    (tmp_path / "run" / "model").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):  # an export's files (loading is stubbed)
        (tmp_path / "run" / "model" / name).write_text("", encoding="utf-8")
    pool = _pool([0, 1, 2] * 2, [0, 0, 0, 1, 1, 1])
    rows_drawn = []
    monkeypatch.setattr(analysis, "load_classifier", lambda path: None)
    monkeypatch.setattr(analysis, "Pool", lambda run, samples, seed: pool)
    monkeypatch.setattr(analysis, "features", lambda clf, images: np.zeros((len(images), 2)))
    monkeypatch.setattr(analysis, "tsne_figure", lambda *a: None)
    monkeypatch.setattr(
        analysis, "gradcam_figure", lambda m, p, g, rows, *a: rows_drawn.append(rows)
    )
    analysis.analyze(tmp_path / "run", tmp_path / "out", classes=3)
    analysis.analyze(tmp_path / "run", tmp_path / "out")
    assert rows_drawn == [3, 3]


@pytest.mark.parametrize(
    "text, problem", [("", "empty, and no grid manifest lists this run"), ("a: [1", "not YAML")]
)
def test_an_unreadable_config_is_one_error_naming_it_and_nothing_is_written(
    tmp_path, capsys, text, problem
):
    """A run killed while writing config.yaml: exit 2 naming the file, no report folder."""
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "config.yaml").write_text(text, encoding="utf-8")
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsmatch-report: error: ") and "x/config.yaml: " + problem in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("x/metrics.json", '{"test_acc": 0.', "x/metrics.json: not valid JSON"),
        ("x/run.json", "[1, 2]", "x/run.json: not a JSON object"),
        ("experiment.json", '{"grid": {}}', "experiment.json: not a grid manifest (KeyError"),
    ],
)
def test_an_unreadable_json_file_is_one_error_naming_it(tmp_path, capsys, name, text, problem):
    """A metrics.json cut off by a crash (or any JSON file the report reads): exit 2 naming it,
    not a traceback; no report folder."""
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("algorithm: fixmatch\n", encoding="utf-8")
    (tmp_path / "runs" / name).write_text(text, encoding="utf-8")
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsmatch-report: error: ") and problem in err
    assert not (tmp_path / "out").exists()
