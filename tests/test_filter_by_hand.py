"""Behaviour of rsmatch-filter, its report and the exports that test_filter.py leaves unpinned
(found by a mutation audit). A stand-in detector scores an image by its red value (red / 100),
so every score, call, count and order below is computed by hand; no training is needed."""

import json
import warnings

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch

from rsmatch import filter as flt
from rsmatch import filter_report as rep
from rsmatch.benchmark.errors import SourceError
from rsmatch.export import detector_card, export_kind
from rsmatch.filter import FilterResult
from rsmatch.filter_report import counts, format_metric, provenance_metrics
from rsmatch.models import Detector

from .conftest import loaded_in_a_fresh_process, png_bytes
from .test_filter import _Rank

SIZE = (4, 4)


class RedDetector:
    """What run_filter reads of a Detector: score = red / 100 (25 -> 0.25, 50 -> 0.5, exact)."""

    image_size = list(SIZE)

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold

    def to(self, device):
        return self

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, 0].float() / 100


def images(reds: list[int | None], **columns) -> datasets.Dataset:
    """One row per red value (None: bytes that do not decode), ids `0.png`, `1.png`, ..."""
    paths = [f"{i}.png" for i in range(len(reds))]
    data = [png_bytes(SIZE, (r, 0, 0)) if r is not None else b"broken" for r in reds]
    cols = {"image": [{"bytes": b, "path": p} for b, p in zip(data, paths)], "path": paths}
    features = {"image": datasets.Image(), "path": datasets.Value("string")}
    for name, (values, feature) in columns.items():
        cols[name], features[name] = values, feature
    return datasets.Dataset.from_dict(cols, features=datasets.Features(features))


def filter_(dd, **kw):
    return flt.run_filter(
        RedDetector(kw.pop("det_threshold", 0.5)), dd, _Rank(0, 1, []), **kw
    )  # one process


# -- loading ----------------------------------------------------------------------------------


def test_a_missing_name_without_a_slash_is_a_missing_folder_not_a_hub_dataset(
    tmp_path, monkeypatch
):
    """`--images imgz` (no such folder, no `/`) is refused as a folder; the Hub is not asked."""
    asked = []
    monkeypatch.setattr(flt.datasets, "load_dataset", lambda *a, **k: asked.append(a))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(flt.FilterError, match=r"^--images imgz: no such folder$"):
        flt.load_images("imgz")
    assert asked == []


def test_a_hub_dataset_without_rows_or_without_images_is_refused(tmp_path, monkeypatch):
    """An empty download is `no images`; one without an Image column names its columns."""
    monkeypatch.chdir(tmp_path)
    empty = datasets.DatasetDict(train=images([]))
    monkeypatch.setattr(flt.datasets, "load_dataset", lambda spec, **kwargs: empty)
    with pytest.raises(flt.FilterError, match=r"^--images me/data: no images$"):
        flt.load_images("me/data")
    text = datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": ["a", "b"]}))
    monkeypatch.setattr(flt.datasets, "load_dataset", lambda spec, **kwargs: text)
    with pytest.raises(flt.FilterError, match=r"columns \['text'\]: no Image column"):
        flt.load_images("me/data")


# -- scoring and calling ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("broken", "listed"),
    [
        (5, "0.png, 1.png, 2.png, 3.png, 4.png (pass"),
        (6, "0.png, 1.png, 2.png, 3.png, 4.png and 1 more (pass"),
        (8, "0.png, 1.png, 2.png, 3.png, 4.png and 3 more (pass"),
    ],
)
def test_the_corrupt_error_names_the_first_five_files_and_counts_the_rest(broken, listed):
    dd = datasets.DatasetDict(train=images([None] * broken + [10]))
    with pytest.raises(flt.FilterError) as e:
        filter_(dd)
    assert (
        str(e.value)
        == f"--images: {broken} image(s) do not decode: {listed} --skip-corrupt to skip them)"
    )


def test_nothing_decodes_is_an_error_even_when_skipping_corrupt_files():
    dd = datasets.DatasetDict(train=images([None, None]))
    with pytest.raises(flt.FilterError, match=r"^--images: no image decodes$"):
        filter_(dd, skip_corrupt=True)


def test_without_threshold_or_fraction_the_detectors_own_threshold_calls():
    """A detector exported with threshold 0.25: 0.5 is called synthetic, 0.25 (equal) real."""
    dd = datasets.DatasetDict(train=images([10, 25, 50]))
    res = filter_(dd, det_threshold=0.25, keep_real=True)
    assert res.threshold == 0.25
    assert res.table["call"] == ["real", "real", "synthetic"]
    assert res.dataset["train"]["path"] == ["0.png", "1.png"]


def test_scores_calls_and_kept_rows_by_hand():
    """Scores are red / 100 in row order; > threshold is synthetic, <= is kept with keep_real."""
    dd = datasets.DatasetDict(train=images([75, 25, 50, 100]))
    res = filter_(dd, threshold=0.5, keep_real=True)
    assert res.table["synthetic_score"] == [0.75, 0.25, 0.5, 1.0]
    assert res.table["call"] == ["synthetic", "real", "real", "synthetic"]
    assert res.dataset["train"]["path"] == ["1.png", "2.png"]
    assert res.scored["train"]["synthetic_score"] == [0.75, 0.25, 0.5, 1.0]


# -- writing and pushing ----------------------------------------------------------------------


def test_corrupt_txt_is_one_name_a_line(tmp_path):
    ds = datasets.Dataset.from_dict({"path": ["a.png"], "synthetic_score": [0.2]})
    table = {"split": ["train"], "row": [0], "id": ["a.png"], "synthetic_score": [0.2],
             "call": ["real"]}  # fmt: skip
    dd = datasets.DatasetDict(train=ds)
    result = FilterResult(0.5, table, dd, dd, corrupt=["b.png", "c/d.jpg"])
    flt.write_outputs(result, tmp_path / "out", lambda folder: None)
    assert (tmp_path / "out" / "corrupt.txt").read_text(encoding="utf-8") == "b.png\nc/d.jpg\n"


def test_push_uploads_the_card_its_figures_and_report_json(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub",
                        lambda self, repo, **kw: calls.append(("data", repo, kw)))  # fmt: skip
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("card", kw)))  # fmt: skip
    dd = datasets.DatasetDict(train=datasets.Dataset.from_dict({"x": [1]}))
    flt.push(tmp_path, dd, "me/set", private=False)
    assert calls == [
        ("data", "me/set", {"private": False}),
        ("card", {"folder_path": str(tmp_path), "repo_id": "me/set", "repo_type": "dataset",
                  "allow_patterns": ["README.md", "*.png", "report.json"]}),
    ]  # fmt: skip


# -- provenance metrics and counts ------------------------------------------------------------


def test_provenance_metrics_call_a_score_equal_to_the_threshold_real():
    scores = np.array([0.5, 0.5, 0.9, 0.1])
    truth = np.array([1, 0, 1, 0], dtype=bool)
    m = provenance_metrics(scores, truth, ["g", "real", "g", "real"], 0.5)
    # called synthetic: 0.9 only -> tp 1 of 2 synthetic, no false positive
    assert m["accuracy"] == 0.75 and m["precision"] == 1.0 and m["recall"] == 0.5
    assert m["real_called_synthetic"] == 0.0 and m["recall/g"] == 0.5


def test_provenance_metrics_keys_are_the_generators_only():
    """recall/G for each synthetic generator; the real images' generator gets none."""
    m = provenance_metrics(np.array([0.1, 0.9, 0.6]), np.array([0, 1, 1], dtype=bool),
                           ["real", "g2", "g1"], 0.5)  # fmt: skip
    assert list(m) == ["roc_auc", "accuracy", "precision", "recall", "real_called_synthetic",
                       "recall/g1", "recall/g2"]  # fmt: skip


def test_provenance_metrics_with_one_class_or_nothing_called():
    """All synthetic, nothing called synthetic: ROC AUC, precision and the false-positive rate
    are undefined, None (JSON null; NaN made report.json invalid JSON), without sklearn's
    warning; recall and accuracy are 0. All real: recall undefined."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = provenance_metrics(np.array([0.1, 0.2]), np.array([1, 1], dtype=bool), ["g", "g"], 0.5)
    assert m == {"roc_auc": None, "accuracy": 0.0, "precision": None, "recall": 0.0,
                 "real_called_synthetic": None, "recall/g": 0.0}  # fmt: skip
    m = provenance_metrics(np.array([0.1, 0.9]), np.array([0, 0], dtype=bool), ["r", "r"], 0.5)
    assert m == {"roc_auc": None, "accuracy": 0.5, "precision": 0.0, "recall": None,
                 "real_called_synthetic": 0.5}  # fmt: skip


def test_counts_report_the_skipped_corrupt_files():
    ds = datasets.Dataset.from_dict({"synthetic_score": [0.2, 0.7]})
    dd = datasets.DatasetDict(train=ds)
    result = FilterResult(0.5, {"call": ["real", "synthetic"]}, dd, dd, ["x.png", "y.png"])
    assert counts(result) == {"scored": 2, "corrupt_skipped": 2, "called_real": 1,
                              "called_synthetic": 1, "saved": 2}  # fmt: skip


# -- the report's grids -----------------------------------------------------------------------


def labelled(reds: list[int], labels: list[int], names: list[str]) -> datasets.Dataset:
    ds = images(reds, label=(labels, datasets.ClassLabel(names=names)))
    return ds.add_column("synthetic_score", [r / 100 for r in reds])


def test_extremes_pick_the_eight_highest_or_lowest_per_class_in_score_order():
    reds = [30, 90, 10, 60, 0, 80, 20, 70, 40, 50, 55]  # class a: all but the last
    dd = datasets.DatasetDict(train=labelled(reds, [0] * 10 + [1], ["a", "b"]))
    top = rep.extremes(dd, SIZE, most_synthetic=True)
    low = rep.extremes(dd, SIZE, most_synthetic=False)
    assert [(name, scores) for name, _, scores in top] == [
        ("a", [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]), ("b", [0.55])]  # fmt: skip
    assert [(name, scores) for name, _, scores in low] == [
        ("a", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]), ("b", [0.55])]  # fmt: skip
    # each picture is the image of its score
    assert [int(x[0, 0, 0]) for x in top[0][1]] == [90, 80, 70, 60, 50, 40, 30, 20]


def test_extremes_show_at_most_twenty_classes_and_all_images_without_labels():
    names = [f"c{i:02d}" for i in range(21)]
    dd = datasets.DatasetDict(train=labelled(list(range(21)), list(range(21)), names))
    assert [name for name, _, _ in rep.extremes(dd, SIZE, True)] == names[:20]
    flat = datasets.DatasetDict(train=images([5, 15]).add_column("synthetic_score", [0.05, 0.15]))
    assert [(n, s) for n, _, s in rep.extremes(flat, SIZE, True)] == [("all", [0.15, 0.05])]


def test_extremes_take_the_first_classes_by_index_whatever_the_row_order(monkeypatch):
    """A shuffled split of a many-class set: the grids show classes 0, 1, ... (rows 2, 1, 0)."""
    monkeypatch.setattr(rep, "GRID_CLASSES", 2)
    dd = datasets.DatasetDict(train=labelled([10, 20, 30], [2, 1, 0], ["c0", "c1", "c2"]))
    assert [(n, s) for n, _, s in rep.extremes(dd, SIZE, True)] == [("c0", [0.3]), ("c1", [0.2])]


def test_rows_without_a_label_are_their_own_row_and_count(monkeypatch):
    """datasets' -1 (an `unlabeled` split of a Hub dataset): not the last class's images."""
    monkeypatch.setattr(rep, "GRID_IMAGES", 2)
    dd = datasets.DatasetDict(train=labelled([10, 20, 30, 90], [0, -1, 1, -1], ["a", "b"]))
    top = rep.extremes(dd, SIZE, most_synthetic=True)
    assert [(n, s) for n, _, s in top] == [("a", [0.1]), ("b", [0.3]), ("(no label)", [0.9, 0.2])]
    monkeypatch.setattr(rep, "GRID_CLASSES", 1)  # more classes than a grid shows: still a row
    top = rep.extremes(dd, SIZE, most_synthetic=True)
    assert [(n, s) for n, _, s in top] == [("a", [0.1]), ("(no label)", [0.9, 0.2])]
    result = FilterResult(0.5, {"call": ["real", "real", "real", "synthetic"]}, dd, dd, [])
    assert counts(result)["per_class"] == {
        "a": {"images": 1, "called_synthetic": 0},
        "b": {"images": 1, "called_synthetic": 0},
        "(no label)": {"images": 2, "called_synthetic": 1},
    }  # adds up to the 4 scored


# -- the report -------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_real", [True, False])
def test_write_report_by_hand(tmp_path, monkeypatch, keep_real):
    """report.json, README.md (counts, per-class table, corrupt note) and what the histogram and
    the grids are drawn from, for 4 images of 2 classes with provenance at threshold 0.5."""
    drawn = {}
    monkeypatch.setattr(rep, "histogram", lambda path, scores, threshold, truth:
                        drawn.update(hist=(path.name, scores.tolist(), threshold, truth.tolist())))  # fmt: skip
    monkeypatch.setattr(rep, "grid", lambda path, rows, title:
                        drawn.update({title: (path.name, [(n, s) for n, _, s in rows])}))  # fmt: skip
    reds = [90, 25, 50, 75]
    ds = labelled(reds, [0, 0, 1, 1], ["cat", "dog"])
    ds = ds.add_column("is_synthetic", [True, False, False, True])
    ds = ds.add_column("generator", ["g", "real", "real", "g"])
    scored = datasets.DatasetDict(train=ds)
    saved = datasets.DatasetDict(train=ds.select([1, 2])) if keep_real else scored
    table = {"synthetic_score": [0.9, 0.25, 0.5, 0.75],
             "call": ["synthetic", "real", "real", "synthetic"]}  # fmt: skip
    corrupt = ["bad.jpg"] if keep_real else []
    result = FilterResult(0.5, table, scored, saved, corrupt)
    metrics = {"roc_auc": 1.0, "recall": None}
    rep.write_report(tmp_path, result, "DET", "IMGS", [4, 4], metrics, keep_real)

    record = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert record["keep"] == ("real" if keep_real else "all")
    assert record["threshold"] == 0.5 and record["provenance_metrics"] == metrics
    assert record["counts"] == {
        "scored": 4, "corrupt_skipped": len(corrupt), "called_real": 2, "called_synthetic": 2,
        "saved": 2 if keep_real else 4,
        "per_class": {"cat": {"images": 2, "called_synthetic": 1},
                      "dog": {"images": 2, "called_synthetic": 1}},
    }  # fmt: skip
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert ("only the images called real" in card) == keep_real
    assert ("every scored image" in card) == (not keep_real)
    assert f"| scored | 4 |\n| corrupt_skipped | {len(corrupt)} |\n| called_real | 2 |" in card
    assert "| per_class |" not in card
    assert (
        "| class | images | called synthetic |\n|---|---|---|\n| cat | 2 | 1 |\n| dog | 2 | 1 |"
        in card
    )
    assert "| roc_auc | 1.0000 |\n| recall | n/a |" in card
    assert '"recall": null' in (tmp_path / "report.json").read_text(encoding="utf-8")
    note = "1 file(s) did not decode and were skipped (corrupt.txt)."
    assert (note in card) == keep_real
    # the histogram splits by provenance; the grids: most synthetic first, most real first
    assert drawn["hist"] == ("histogram.png", [0.9, 0.25, 0.5, 0.75], 0.5,
                             [True, False, False, True])  # fmt: skip
    assert drawn["most synthetic"] == ("most_synthetic.png", [("cat", [0.9, 0.25]),
                                                              ("dog", [0.75, 0.5])])  # fmt: skip
    assert drawn["most real"] == ("most_real.png", [("cat", [0.25, 0.9]), ("dog", [0.5, 0.75])])


# -- exports ----------------------------------------------------------------------------------


def test_export_kind_needs_weights_and_a_known_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"threshold": 0.5}), encoding="utf-8")
    assert export_kind(tmp_path) is None  # no model.safetensors
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert export_kind(tmp_path) == "detector"
    (tmp_path / "config.json").write_text(json.dumps({"backbone": "wrn10_1"}), encoding="utf-8")
    assert export_kind(tmp_path) is None  # neither a classifier's nor a detector's config


def test_detector_card_states_the_threshold_and_sorts_metrics():
    det = Detector("wrn10_1", [0.5] * 3, [0.25] * 3, image_size=[24, 16], threshold=0.3,
                   class_names=["cat", "dog"], real_set="cifar")  # fmt: skip
    card = detector_card(
        det, {"steps (train.steps)": 7}, {"queue_purity": 0.5, "detector_acc": 0.25}
    )
    text = str(card)
    assert "An image is called synthetic when its score exceeds 0.3 (" in text
    assert "| detector_acc | 0.2500 |\n| queue_purity | 0.5000 |" in text
    assert "| steps (train.steps) | 7 |" in text and "24x16" in text
    assert "No detector metrics" in str(detector_card(det, {}, None))


def test_an_option_error_comes_before_torch_loads(tmp_path):
    """The options are checked (here `--out`, which exists) before torch, torchvision and
    datasets load: 0.4 s instead of 10 s on a 2-core Zen 3."""
    argv = ["--detector", "d", "--images", "i", "--out", str(tmp_path)]
    out, err = loaded_in_a_fresh_process(
        "rsmatch.cli.filter", ("torch", "torchvision", "datasets"), tmp_path, argv
    )
    assert out == "2 []", out + err
    assert err == f"rsmatch-filter: error: --out {tmp_path}: exists; choose a new folder\n"
    # an --out that cannot be made: refused at once, not after every image is scored
    (tmp_path / "blocker").write_text("a file", encoding="utf-8")
    argv[-1] = str(tmp_path / "blocker" / "out")
    out, err = loaded_in_a_fresh_process(
        "rsmatch.cli.filter", ("torch", "torchvision", "datasets"), tmp_path, argv
    )
    assert out == "2 []", out + err
    assert err == (f"rsmatch-filter: error: --out {argv[-1]}: {tmp_path / 'blocker'} is a file, "
                   "not a folder\n")  # fmt: skip


# -- rsmatch-filter: loading ------------------------------------------------------------------


def test_an_empty_folder_is_no_images_found_without_the_skipped_note(tmp_path):
    """The note on earlier filter outputs appears only when there were images inside them."""
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no image here", encoding="utf-8")
    with pytest.raises(flt.FilterError) as error:
        flt.read_folder(tmp_path / "empty")
    assert str(error.value) == f"--images {tmp_path / 'empty'}: no images found"


def test_a_hub_id_that_does_not_load_is_named_with_its_option(tmp_path, monkeypatch):
    """A Hub id goes through the benchmark sources' loader: one line naming `--images ID`."""

    def offline(spec, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.chdir(tmp_path)  # no local folder me/data
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SourceError) as error:
        flt.load_images("me/data")
    assert str(error.value) == (
        "--images me/data: cannot load this Hub dataset id (no local folder of that name) "
        "(ConnectionError: offline)"
    )


def test_a_labels_source_error_names_it_as_typed(tmp_path, sources):
    """`--labels real=PATH` with no such folder: the error names `--labels real=PATH` (it read
    `--labels real= PATH`, a space the user never typed)."""
    missing = tmp_path / "nope"
    with pytest.raises(flt.FilterError) as error:
        flt.load_labelled({"real": str(missing), "a": str(sources["gen_a"])})
    assert str(error.value).startswith(f"--labels real={missing}: ")


def test_an_empty_labels_folder_is_named_as_a_labels_source(tmp_path, sources):
    """It was blamed on `--images`."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(flt.FilterError) as error:
        flt.load_labelled({"real": str(sources["real"]), "a": str(tmp_path / "empty")})
    assert str(error.value).startswith("--labels a=") and "--images" not in str(error.value)


# -- rsmatch-filter: the report ---------------------------------------------------------------


def test_format_metric_shows_zero_as_a_number_and_only_none_as_n_a():
    """0.0 is a measured value (no real image called synthetic), not an undefined one."""
    assert format_metric(0.0) == "0.0000"
    assert format_metric(None) == "n/a"
    assert format_metric(0.12345) == "0.1235"
    assert format_metric(1.0) == "1.0000"
