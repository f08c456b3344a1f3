"""The data modules by hand: a benchmark loaded into tensors with its provenance and split
record, the real-only and filter-first pools, the seeds and views of a batch, device copies,
decoding and the data checks' messages (a mutation audit of rsmatch/data/, augment.py aside)."""

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rsmatch.benchmark.sources import SourceError
from rsmatch.benchmark.store import save_benchmark
from rsmatch.config import DataConfig
from rsmatch.data import loaders
from rsmatch.data.check import check_local_paths, check_sources
from rsmatch.data.decode import decode
from rsmatch.data.exclude import kept_rows
from rsmatch.data.loaders import BatchMaker, IndexStream, load_train_data, step_generator

from .conftest import CLASSES, png_bytes
from .test_data import _data

CPU = torch.device("cpu")
VIEWS = ("x_lb", "y_lb", "idx_lb", "x_lb_s", "u_w", "u_s", "idx_ulb")

# The pool of the hand-made benchmark: source_id, is_synthetic, generator, the grey level of
# every pixel (which tells the rows apart once decoded), label, and a detector's score.
POOL = [
    ("real/0", False, "real", 10, 0, 0.3),
    ("a/1", True, "a", 20, 1, 0.9),
    ("real/2", False, "real", 30, 2, 0.6),  # at the threshold 0.6: kept
    ("b/3", True, "b", 40, 0, 0.1),
    ("real/4", False, "real", 50, 1, 0.8),
]
LABELED = [("real/5", False, "real", 60, 0), ("real/6", False, "real", 70, 2)]
TEST = [("real/7", False, "real", 80, 1)]


def _split(rows, image=lambda grey: png_bytes((4, 4), grey, "L")):
    features = datasets.Features({
        "image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES),
        "source_id": datasets.Value("string"), "is_synthetic": datasets.Value("bool"),
        "generator": datasets.Value("string")})  # fmt: skip
    columns = {
        "image": [{"bytes": image(r[3]), "path": r[0].replace("/", "-") + ".png"} for r in rows],
        "label": [r[4] for r in rows],
        "source_id": [r[0] for r in rows],
        "is_synthetic": [r[1] for r in rows],
        "generator": [r[2] for r in rows],
    }
    return datasets.Dataset.from_dict(columns, features=features)


def _save(out, test_image=None):
    test = _split(TEST) if test_image is None else _split(TEST, lambda grey: test_image)
    dd = datasets.DatasetDict(labeled=_split(LABELED), unlabeled=_split(POOL), test=test)
    save_benchmark(dd, out, {"labels_per_class": 1})
    return str(out)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The benchmark above, saved, with its detector scores beside it."""
    root = tmp_path_factory.mktemp("hand")
    scores = root / "scores.parquet"
    pq.write_table(pa.table({"split": ["unlabeled"] * len(POOL), "source_id": [r[0] for r in POOL],
                             "synthetic_score": [r[5] for r in POOL]}), scores)  # fmt: skip
    return _save(root / "bench"), str(scores)


def _greys(images):
    return images[:, 0, 0, 0].tolist()


# -- loading a benchmark ------------------------------------------------------------------------


def test_a_benchmark_loads_its_splits_labels_and_provenance_in_row_order(bench):
    """Every split decoded in row order (grey to grey), its labels, and the pool's truth."""
    data = load_train_data(DataConfig(benchmark=bench[0]))
    assert _greys(data.labeled) == [60, 70] and data.labeled_y.tolist() == [0, 2]
    assert _greys(data.unlabeled) == [10, 20, 30, 40, 50]
    assert _greys(data.test) == [80] and data.test_y.tolist() == [1]
    assert data.unlabeled.shape == (5, 3, 4, 4) and data.class_names == CLASSES
    assert data.provenance.is_synthetic.tolist() == [False, True, False, True, False]
    assert data.provenance.generator == ["real", "a", "real", "b", "real"]
    assert data.split_meta == {"labels_per_class": 1, "real_only": False}


def test_exclusion_keeps_scores_at_or_below_the_threshold_and_records_it(bench):
    """exclude_above=0.6: a/1 (0.9) and real/4 (0.8) go, real/2 (0.6, equal) stays; provenance
    follows the kept rows; the split record names the file, the threshold and the count."""
    data = load_train_data(DataConfig(benchmark=bench[0], exclude_scores=bench[1],
                                      exclude_above=0.6))  # fmt: skip
    assert _greys(data.unlabeled) == [10, 30, 40]
    assert data.provenance.is_synthetic.tolist() == [False, False, True]
    assert data.provenance.generator == ["real", "real", "b"]
    assert data.split_meta == {"labels_per_class": 1, "exclude_scores": bench[1],
                               "exclude_above": 0.6, "excluded": 2, "real_only": False}  # fmt: skip


def test_real_only_drops_the_synthetic_rows_then_exclusion_counts_among_the_reals(bench):
    """The oracle keeps real/0, real/2, real/4; exclusion then drops real/4 alone (1 excluded)."""
    alone = load_train_data(DataConfig(benchmark=bench[0], real_only=True))
    assert _greys(alone.unlabeled) == [10, 30, 50]
    assert alone.provenance.generator == ["real"] * 3
    assert alone.split_meta == {"labels_per_class": 1, "real_only": True}
    both = load_train_data(DataConfig(benchmark=bench[0], real_only=True, exclude_scores=bench[1],
                                      exclude_above=0.6))  # fmt: skip
    assert _greys(both.unlabeled) == [10, 30]
    assert both.provenance.is_synthetic.tolist() == [False, False]
    assert both.provenance.generator == ["real", "real"]
    assert both.split_meta["excluded"] == 1 and both.split_meta["real_only"] is True


def test_a_split_built_from_the_sources_is_recorded_with_its_settings(sources):
    """The record of a split built at start: the sources and the SplitSpec, seed included."""
    real, a, b = str(sources["real"]), str(sources["gen_a"]), str(sources["gen_b"])
    cfg = DataConfig(real=real, synthetic={"b": b, "a": a}, labels_per_class=4,
                     replace_ratio=0.5, unlabeled_per_class=20, split_seed=1)  # fmt: skip
    dd, meta = loaders.load_benchmark_from_config(cfg)
    assert meta == {"real": real, "synthetic": {"b": b, "a": a}, "labels_per_class": 4,
                    "replace_ratio": 0.5, "unlabeled_per_class": 20, "seed": 1}  # fmt: skip
    assert len(dd["labeled"]) == 3 * 4 and len(dd["unlabeled"]) == 3 * 20


# -- the seeds and views of a batch -----------------------------------------------------------


def test_each_draw_is_seeded_by_seed_stream_and_step_or_epoch(monkeypatch):
    """Step 5 of 6 labeled (of 12) and 12 unlabeled (of 40) rows: labeled rows 30..35 are epoch
    2 of stream 0, unlabeled rows 60..71 epoch 1 of stream 1; the augmentation draws are streams
    2 and 3 at step 5. The key order is (seed, stream, step or epoch)."""
    keys = []
    real = loaders.step_generator
    monkeypatch.setattr(loaders, "step_generator", lambda *k: keys.append(k) or real(*k))
    BatchMaker(_data(12, 40), 6, 2, 3, 0, 1, CPU, strong_labeled=True).draws(5)
    assert keys == [(3, 2, 5), (3, 0, 2), (3, 3, 5), (3, 1, 1)]
    keys.clear()
    stream = IndexStream(10, 4, seed=7, stream=1)
    stream.indices(2)  # positions 8..11 span epochs 0 and 1
    stream.indices(2)  # the epoch's order is kept, not drawn again
    assert keys == [(7, 1, 0), (7, 1, 1), (7, 1, 0), (7, 1, 1)]


def test_the_seed_of_a_draw_is_numpys_seed_sequence_of_its_keys():
    """The 64-bit seed SeedSequence([3, 2, 5]) gives: a stable number (numpy keeps its
    SeedSequence output fixed), so a resumed run draws what it drew before."""
    assert step_generator(3, 2, 5).initial_seed() == 16915429354210642500


def test_views_not_asked_for_are_not_made_and_change_no_other_view():
    """Defaults: no strong labeled view; unlabeled=False: no unlabeled view or draw. Asking for
    the strong labeled view leaves every other view of the step as it was."""
    data = _data()
    plain = BatchMaker(data, 6, 2, 3, 0, 1, CPU)(4)
    assert plain.x_lb_s is None and plain.u_w is not None
    strong = BatchMaker(data, 6, 2, 3, 0, 1, CPU, strong_labeled=True)(4)
    for name in ("x_lb", "y_lb", "idx_lb", "u_w", "u_s", "idx_ulb"):
        assert torch.equal(getattr(strong, name), getattr(plain, name)), name
    supervised = BatchMaker(data, 6, 2, 3, 0, 1, CPU, unlabeled=False)
    d, b = supervised.draws(4), supervised(4)
    assert (d.u, d.weak_u, d.strong_u, d.idx_ulb) == (None, None, None, None)
    assert (b.u_w, b.u_s, b.idx_ulb, b.x_lb_s) == (None, None, None, None)
    assert torch.equal(b.x_lb, plain.x_lb)


def test_a_batch_is_made_on_the_makers_device_from_host_draws():
    """On `meta` (any device but the host's): the draws on the host, every view on the device;
    moved, nested draws move too and the strong ops' indices stay on the host."""
    m = BatchMaker(_data(), 6, 2, 3, 0, 1, torch.device("meta"), strong_labeled=True)
    assert {getattr(m(0), name).device.type for name in VIEWS} == {"meta"}
    d = m.draws(0)
    assert d.x_lb.device.type == d.weak_lb.shift.device.type == "cpu"
    moved = d.to("meta")
    for t in (moved.x_lb, moved.weak_lb.shift, moved.weak_lb.flip, moved.strong_u.weak.shift,
              moved.strong_lb.cutout, moved.idx_ulb):  # fmt: skip
        assert t.device.type == "meta"
    assert moved.strong_u.ops.device.type == "cpu"
    alone = BatchMaker(_data(), 6, 2, 3, 0, 1, CPU, unlabeled=False).draws(0).to("meta")
    assert alone.u is None and alone.strong_lb is None and alone.x_lb.device.type == "meta"


# -- decoding -----------------------------------------------------------------------------------


def _images(*items):
    features = datasets.Features({"image": datasets.Image()})
    rows = [{"bytes": data, "path": path} for data, path in items]
    return datasets.Dataset.from_dict({"image": rows}, features=features)


def test_an_undecodable_image_is_named_by_row_and_path():
    ds = _images((png_bytes((4, 4), 0, "L"), "a.png"), (b"not an image", "b.bmp"))
    with pytest.raises(SourceError, match=r"^cannot decode image 1 \(b\.bmp\): "):
        decode(ds)


def test_an_image_of_another_size_is_named_by_row_and_path():
    ds = _images((png_bytes((8, 6), 0, "L"), "a.png"), (png_bytes((6, 8), 0, "L"), "c/d.png"))
    with pytest.raises(SourceError) as e:
        decode(ds)
    assert str(e.value) == "image 1 (c/d.png) is (6, 8), expected (8, 6) like the first image"


# -- the filter-first scores file ---------------------------------------------------------------


def _scores(path, ids, scores, split=None):
    columns = {"source_id": ids, "synthetic_score": scores}
    if split is not None:
        columns = {"split": split, **columns}
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_kept_rows_errors_name_the_setting_the_rows_and_the_fix(tmp_path):
    path = _scores(tmp_path / "s.parquet", ["x", "z"], [0.1, 0.9])
    key = f"data.exclude_scores={path!r}"
    with pytest.raises(SourceError) as e:
        kept_rows(["x", "y", "w"], path, 0.5)
    assert str(e.value) == (
        f"{key}: 2 of 3 pool rows have no score (e.g. 'y'); score this benchmark's unlabeled split"
    )
    with pytest.raises(SourceError) as e:
        kept_rows(["z"], path, 0.5)
    assert str(e.value) == "data.exclude_above=0.5: drops every unlabeled row"
    empty = _scores(tmp_path / "n.parquet", ["x"], [0.1])
    pq.write_table(pa.table({"id": ["x"]}), empty)
    with pytest.raises(SourceError) as e:
        kept_rows(["x"], empty, 0.5)
    assert str(e.value) == (
        f"data.exclude_scores={empty!r}: no ['source_id', 'synthetic_score'] column(s); score a "
        "saved benchmark, whose rows carry source_id, with rsmatch-filter"
    )
    twice = _scores(tmp_path / "t.parquet", ["x", "x"], [0.1, 0.2])
    with pytest.raises(SourceError) as e:
        kept_rows(["x"], twice, 0.5)
    assert (
        str(e.value)
        == f"data.exclude_scores={twice!r}: source_id values repeat; score one pool only"
    )


def test_the_pools_scores_are_taken_from_its_own_rows_wherever_they_lie(tmp_path):
    """Labeled and test rows first, reusing the pool's ids with other scores: x keeps its 0.2."""
    path = _scores(tmp_path / "s.parquet", ["x", "y", "x", "y", "x"], [0.9, 0.1, 0.2, 0.7, 0.8],
                   split=["labeled", "labeled", "unlabeled", "unlabeled", "test"])  # fmt: skip
    assert kept_rows(["y", "x"], path, 0.5) == [1]


# -- the data checks ----------------------------------------------------------------------------


def test_a_benchmark_is_checked_split_by_split(bench):
    """Images per class of each split, named `benchmark/SPLIT`."""
    assert check_sources(DataConfig(benchmark=bench[0])) == {
        "benchmark/labeled": {"cat": 1, "dog": 0, "ship": 1},
        "benchmark/unlabeled": {"cat": 2, "dog": 2, "ship": 1},
        "benchmark/test": {"cat": 0, "dog": 1, "ship": 0},
    }


def test_an_unreadable_image_in_a_benchmarks_test_split_is_named_by_split_and_row(tmp_path):
    bench = _save(tmp_path / "bench", test_image=b"not an image")
    with pytest.raises(SourceError) as e:
        check_sources(DataConfig(benchmark=bench))
    assert str(e.value) == f"1 unreadable image(s): {bench} (test)[0] (real-7.png)"


def test_a_benchmarks_paths_alone_are_checked_not_the_sources_it_replaces(bench):
    """With data.benchmark set, data.real and data.synthetic are not read: not checked either."""
    cfg = DataConfig(benchmark=bench[0], real="/nonexistent/real", synthetic={"a": "/nonexistent"})
    check_local_paths(cfg)
