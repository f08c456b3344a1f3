import json
import shutil

import datasets
import numpy as np
import pytest
import torch

from rsmatch.benchmark import sources as src
from rsmatch.benchmark.sources import SourceError, load_real, load_synthetic
from rsmatch.benchmark.split import (
    SplitSpec,
    build_split,
    generator_shares,
    pool_sizes,
    required_per_generator,
)
from rsmatch.benchmark.store import summary
from rsmatch.config import DataConfig
from rsmatch.data import augment
from rsmatch.data.batch import Provenance, TrainData
from rsmatch.data.check import check_local_paths
from rsmatch.data.decode import decode
from rsmatch.data.loaders import BatchMaker, IndexStream

from .conftest import CLASSES, SHARED, png_bytes


def _split(sources, seed=0, ratio=0.5, labels=4, cap=None):
    real = load_real(str(sources["real"]))
    synth = {g: load_synthetic(str(sources[f"gen_{g}"]), real.class_names) for g in ("a", "b")}
    return build_split(real, synth, SplitSpec(labels, ratio, cap, seed))


def _ids(dd, split):
    return list(dd[split]["source_id"])


def test_split_is_deterministic_by_seed(sources):
    a, b, c = _split(sources, 0), _split(sources, 0), _split(sources, 1)
    for split in ("labeled", "unlabeled"):
        assert _ids(a, split) == _ids(b, split)
    assert _ids(a, "labeled") != _ids(c, "labeled")
    assert set(_ids(a, "unlabeled")) != set(_ids(c, "unlabeled"))


def test_a_seed_gives_the_split_it_gave_before(sources):
    """Recorded rows: a benchmark rebuilt from the same sources and seed must be the same split,
    or numbers measured on it stop being comparable. A change here changes every user's split:
    it needs a CHANGELOG entry saying so."""
    dd = _split(sources, 0)
    assert _ids(dd, "labeled") == [
        f"real/{i}" for i in (2, 11, 26, 21, 31, 47, 59, 41, 76, 60, 89, 75)
    ]
    assert _ids(dd, "unlabeled")[:12] == [
        "real/13", "real/35", "real/24", "real/27", "b/25", "real/9",
        "real/7", "b/4", "real/48", "b/13", "real/15", "b/19",
    ]  # fmt: skip
    drawn_from_a = sorted(int(i[2:]) for i in _ids(dd, "unlabeled") if i.startswith("a/"))
    assert drawn_from_a == [
        2,
        3,
        4,
        6,
        7,
        8,
        9,
        12,
        13,
        14,
        17,
        19,
        20,
        22,
        25,
        28,
        30,
        32,
        33,
        34,
        35,
    ]


def test_pool_order_carries_no_provenance(sources):
    """Reals and each generator's images are interleaved by a seeded shuffle, not stacked."""
    a, b, c = _split(sources, 0), _split(sources, 0), _split(sources, 1)
    gens = list(a["unlabeled"]["generator"])
    assert _ids(a, "unlabeled") == _ids(b, "unlabeled")  # deterministic by seed
    assert list(c["unlabeled"]["generator"]) != gens
    # stacked, the pool would read real..real a..a b..b: count the changes of generator
    changes = sum(x != y for x, y in zip(gens, gens[1:]))
    assert len(set(gens)) == 3 and changes > 10, gens
    first_half = [g != "real" for g in gens[: len(gens) // 2]]
    assert 0 < sum(first_half) < len(first_half)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.7])
def test_replacement_is_exactly_class_balanced(sources, ratio):
    dd = _split(sources, ratio=ratio)
    counts = summary(dd)
    pool = 30 - 4  # per class
    n_syn = round(ratio * pool)
    labels = np.asarray(dd["unlabeled"]["label"])
    synthetic = np.asarray(dd["unlabeled"]["is_synthetic"])
    for c in range(len(CLASSES)):
        assert (labels == c).sum() == pool  # the pool keeps its size
        assert (synthetic & (labels == c)).sum() == n_syn
    gens = counts["unlabeled"]["per_generator"]
    shares = generator_shares(n_syn, ["a", "b"])
    assert gens.get("a", 0) == 3 * shares["a"] and gens.get("b", 0) == 3 * shares["b"]
    assert counts["labeled"]["per_class"] == dict.fromkeys(CLASSES, 4)
    # labeled and unlabeled reals never overlap; the test split is real only
    assert not set(_ids(dd, "labeled")) & set(_ids(dd, "unlabeled"))
    assert not any(dd["test"]["is_synthetic"]) and not any(dd["labeled"]["is_synthetic"])


def test_unlabeled_cap_and_errors(sources):
    dd = _split(sources, cap=10, ratio=0.5)
    assert len(dd["unlabeled"]) == 30 and sum(dd["unlabeled"]["is_synthetic"]) == 15
    with pytest.raises(SourceError, match="unlabeled_per_class=99"):
        _split(sources, cap=99)
    with pytest.raises(SourceError, match="generator 'a' has 12 images of class 'cat', 13 needed"):
        _split(sources, ratio=1.0)


def test_generator_shares_are_equal():
    assert generator_shares(7, ["b", "a", "c"]) == {"a": 3, "b": 2, "c": 2}


def test_synthetic_with_unknown_class_is_rejected(sources, tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "unicorn").mkdir()
    with pytest.raises(SourceError, match="unicorn"):
        load_synthetic(str(tmp_path), CLASSES)


def test_hub_style_dataset_with_img_and_fine_label(tmp_path, sources):
    """A local copy laid out like uoft-cs/cifar100 loads through the Hub code path."""
    real = load_real(str(sources["real"]))
    for split, ds in (("train", real.train), ("test", real.test)):
        ds = ds.rename_columns({"image": "img", "label": "fine_label"})
        ds = ds.add_column("coarse_label", [0] * len(ds))
        (tmp_path / "data").mkdir(exist_ok=True)
        ds.to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))
    hub = load_real(str(tmp_path / "data" / ".."))  # not train/test folders: goes to load_dataset
    assert hub.class_names == CLASSES
    assert torch.equal(decode(hub.train), decode(real.train))


def _data(n_lab=12, n_unl=40):
    g = torch.Generator().manual_seed(0)
    img = lambda n: torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)  # noqa: E731
    return TrainData(img(n_lab), torch.arange(n_lab) % 3, img(n_unl), img(6), torch.arange(6) % 3,
                     CLASSES, Provenance(torch.zeros(n_unl, dtype=torch.bool), ["real"] * n_unl), {})  # fmt: skip


def test_global_batch_is_independent_of_world_size():
    data = _data()
    cpu = torch.device("cpu")
    one = BatchMaker(data, 6, 2, seed=3, rank=0, world=1, device=cpu, strong_labeled=True)
    two = [
        BatchMaker(data, 6, 2, seed=3, rank=r, world=2, device=cpu, strong_labeled=True)
        for r in (0, 1)
    ]
    for step in (0, 5, 17):
        full, halves = one(step), [m(step) for m in two]
        for name in ("x_lb", "x_lb_s", "y_lb", "idx_lb", "u_w", "u_s", "idx_ulb"):
            joined = torch.cat([getattr(h, name) for h in halves])
            assert torch.equal(getattr(full, name), joined), (step, name)


def test_index_stream_covers_each_epoch_once():
    stream = IndexStream(10, 4, seed=0, stream=1)
    first = torch.cat([stream.indices(k) for k in range(5)])  # 20 draws = 2 epochs
    assert sorted(first[:10].tolist()) == list(range(10))
    assert sorted(first[10:].tolist()) == list(range(10))
    assert torch.equal(IndexStream(10, 4, 0, 1).indices(3), stream.indices(3))
    assert not torch.equal(first[:10], first[10:])  # each epoch is a new order


def test_weak_draws_flip_half_and_shift_uniformly():
    """USB's weak view: horizontal flip with p = 0.5, crop offsets uniform over 0..8 (32 x 32)."""
    p = augment.sample_weak(40_000, torch.Generator().manual_seed(0), (32, 32))
    assert abs(p.flip.float().mean().item() - 0.5) < 0.01  # 4 standard deviations
    for axis in (0, 1):
        counts = torch.bincount(p.shift[:, axis], minlength=9)
        assert len(counts) == 9 and (counts - 40_000 / 9).abs().max() < 300  # ~3 sd


def test_weak_crop_pads_an_eighth_of_the_image_as_usb():
    """USB pads int(img_size * (1 - crop_ratio 0.875)): 4 px at 32, 12 at 96 (STL-10's size),
    2 for a 20 x 28 image (its shorter side)."""
    assert [augment.crop_pad(*hw) for hw in ((32, 32), (96, 96), (20, 28))] == [4, 12, 2]
    shifts = augment.sample_weak(2000, torch.Generator().manual_seed(1), (96, 96)).shift
    assert shifts.min() == 0 and shifts.max() == 24  # 0..2 * 12
    # offset (0, 0), no flip: the image moves 12 px down and right, the top-left corner
    # mirrored from x[12, 12] (reflect padding does not repeat the edge)
    x = torch.randint(
        0, 256, (1, 3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    out = augment.apply_weak(x, augment.WeakParams(torch.tensor([[0, 0]]), torch.tensor([False])))
    assert torch.equal(out[..., 12:, 12:], x[..., :84, :84])
    assert torch.equal(out[..., 0, 0], x[..., 12, 12])


def _images_of_side(n: int, side: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)


def test_each_stream_crops_with_its_own_images_padding():
    """The batch maker draws each view's offsets for the images it is made from: 48-px labeled
    images pad 6 px (offsets 0..12), 64-px unlabeled ones 8 px (0..16), weak and strong alike."""
    g = torch.Generator().manual_seed(0)
    data = TrainData(_images_of_side(12, 48, g), torch.arange(12) % 3, _images_of_side(40, 64, g),
                     _images_of_side(6, 48, g), torch.arange(6) % 3, CLASSES,
                     Provenance(torch.zeros(40, dtype=torch.bool), ["real"] * 40), {})  # fmt: skip
    maker = BatchMaker(data, 6, 2, seed=3, rank=0, world=1, device=torch.device("cpu"))
    draws = [maker.draws(step) for step in range(40)]
    for name, stream, high in (("weak_lb", lambda d: d.weak_lb, 12),
                               ("weak_u", lambda d: d.weak_u, 16),
                               ("strong_u", lambda d: d.strong_u.weak, 16)):  # fmt: skip
        shifts = torch.cat([stream(d).shift for d in draws])
        assert (shifts.min(), shifts.max()) == (0, high), name


def test_cutout_side_is_a_fraction_of_the_width():
    """USB's Cutout: side v * width (`img.size[0]`), on a non-square image."""
    x = torch.zeros(1, 3, 16, 32, dtype=torch.uint8)
    weak = augment.WeakParams(torch.tensor([[2, 2]]), torch.tensor([False]))  # no shift, no flip
    identity = torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3)
    cutout = torch.tensor([[0.5, 0.5, 0.25]], dtype=torch.float64)
    filled = (augment.apply_strong(x, augment.StrongParams(weak, *identity, cutout))[0] != 0).all(0)
    # by hand: v = 0.25 * 32 = 8 px; centre (32 - 31 * 0.5, 16 - 15 * 0.5) = (16.5, 8.5);
    # corner floor(centre - v / 2) = (12, 4); the far edge (x 20, y 12) included
    want = torch.zeros(16, 32, dtype=torch.bool)
    want[4:13, 12:21] = True
    assert torch.equal(filled, want)


def test_streams_views_and_steps_draw_independently():
    """Labeled and unlabeled orders, each view's augmentation and each step: separate draws."""
    m = BatchMaker(_data(12, 12), 6, 1, 3, 0, 1, torch.device("cpu"), strong_labeled=True)
    d0, d1 = m.draws(0), m.draws(1)
    assert not torch.equal(d0.idx_lb, d0.idx_ulb)  # equal pool sizes: a shared stream shows
    assert not torch.equal(d0.weak_lb.shift, d0.weak_u.shift)
    assert not torch.equal(d0.strong_u.weak.shift, d0.weak_u.shift)
    assert not torch.equal(d0.strong_lb.weak.shift, d0.weak_lb.shift)
    assert not torch.equal(d0.weak_lb.shift, d1.weak_lb.shift)
    assert not torch.equal(d0.weak_u.shift, d1.weak_u.shift)


def test_each_view_is_made_from_the_rows_and_draws_it_names():
    data = _data()
    m = BatchMaker(data, 6, 2, 3, 0, 1, torch.device("cpu"), strong_labeled=True)
    for step in (0, 3):
        d, b = m.draws(step), m(step)
        assert torch.equal(d.x_lb, data.labeled[b.idx_lb])
        assert torch.equal(b.y_lb, data.labeled_y[b.idx_lb])
        assert torch.equal(d.u, data.unlabeled[b.idx_ulb])
        assert torch.equal(b.x_lb, augment.apply_weak(d.x_lb, d.weak_lb))
        assert torch.equal(b.x_lb_s, augment.apply_strong(d.x_lb, d.strong_lb))
        assert torch.equal(b.u_w, augment.apply_weak(d.u, d.weak_u))
        assert torch.equal(b.u_s, augment.apply_strong(d.u, d.strong_u))  # from u, not u_w


def test_augment_views():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    still = augment.WeakParams(torch.full((64, 2), 4), torch.zeros(64, dtype=torch.bool))
    assert torch.equal(augment.apply_weak(x, still), x)
    flipped = augment.WeakParams(torch.full((64, 2), 4), torch.ones(64, dtype=torch.bool))
    assert torch.equal(augment.apply_weak(x, flipped), x.flip(-1))
    p = augment.sample_strong(64, g, (32, 32))
    s = augment.apply_strong(x, p)
    assert s.dtype == torch.uint8 and s.shape == x.shape
    assert torch.equal(augment.apply_strong(x[10:20], p[10:20]), s[10:20])  # per-image, sliceable
    assert (s != augment.apply_weak(x, p.weak)).any()


def test_each_randaugment_op_keeps_range_and_shape():
    x = torch.randint(0, 256, (8, 3, 32, 32)).float()
    for name in augment.OPS:
        for m in (torch.zeros(8), torch.ones(8), torch.rand(8)):
            y = augment.apply_op(x.clone(), name, m)
            assert y.shape == x.shape and y.min() >= 0 and y.max() <= 255, name


@pytest.mark.skipif(not (SHARED / "cifar10-jpeg.tar.gz").exists(), reason="needs ../shared/data")
def test_bundled_demo_matches_shared_data():
    """The committed demo images are byte-identical to files of the shared CIFAR-10 set."""
    import tarfile
    from pathlib import Path

    real = load_real(str(Path(__file__).resolve().parents[1] / "data" / "demo" / "real"))
    row = real.train.cast_column("image", datasets.Image(decode=False))[0]
    first, name = row["image"], real.class_names[row["label"]]
    with tarfile.open(SHARED / "cifar10-jpeg.tar.gz") as tar:
        member = tar.extractfile(f"cifar10/train/{name}/{first['path']}")
        assert member is not None and member.read() == first["bytes"]


def test_the_cap_and_the_synthetic_images_may_be_used_up_exactly(sources):
    dd = _split(sources, cap=26)  # 30 - 4 labeled: the whole pool
    assert len(dd["unlabeled"]) == 3 * 26
    dd = _split(sources, ratio=0.92)  # round(0.92 * 26) = 24: 12 of each generator's 12
    gens = list(dd["unlabeled"]["generator"])
    assert gens.count("a") == gens.count("b") == 3 * 12


def test_every_split_has_a_prompt_column_and_generators_keep_theirs(sources):
    real = load_real(str(sources["real"]))
    synth = {g: load_synthetic(str(sources[f"gen_{g}"]), real.class_names) for g in ("a", "b")}
    prompts = [f"a photo number {i}" for i in range(len(synth["a"]))]
    synth["a"] = synth["a"].add_column("prompt", prompts)
    dd = build_split(real, synth, SplitSpec(4, 0.5, None, 0))
    for split in ("labeled", "test"):
        assert set(dd[split]["prompt"]) == {""}
    unl = dd["unlabeled"]
    for gen, prompt, sid in zip(unl["generator"], unl["prompt"], unl["source_id"]):
        # source_id is "<generator>/<row>": generator a's rows keep their own prompt
        assert prompt == (prompts[int(sid.split("/")[1])] if gen == "a" else ""), sid


def test_pool_sizes_apply_the_cap_per_class():
    counts = np.array([30, 12])  # pools of 26 and 8 after 4 labeled
    assert pool_sizes(counts, SplitSpec(4, 0.5, None, 0)) == [26, 8]
    assert pool_sizes(counts, SplitSpec(4, 0.5, 20, 0)) == [20, 8]


def test_required_per_generator_is_the_largest_share_of_any_class():
    counts = np.array([30, 12])
    # ratio 0.5: class 0 replaces 13 (a 7, b 6), class 1 replaces 4 (2, 2)
    assert required_per_generator(counts, SplitSpec(4, 0.5, None, 0), ["b", "a"]) == {
        "b": 6,
        "a": 7,
    }
    # capped at 2 per class: 1 replaced per class, all from a
    assert required_per_generator(counts, SplitSpec(4, 0.5, 2, 0), ["a", "b"]) == {"a": 1, "b": 0}
    assert required_per_generator(counts, SplitSpec(4, 0.0, None, 0), ["a"]) == {"a": 0}
    # no class has an unlabeled image (4 labeled of 4, or of 3): nothing to generate
    assert required_per_generator(np.array([4, 3]), SplitSpec(4, 0.7, None, 0), ["a"]) == {"a": 0}


# -- source indexes, before any image is read --------------------------------------------------


def test_class_folders_skip_hidden_entries_and_read_any_suffix_case(tmp_path):
    for rel in ("cat/0.jpg", "cat/1.JPG", "cat/._2.jpg", "dog/3.png", ".ipynb_checkpoints/4.jpg"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    for index in (src.index_class_folder(tmp_path), src.index_class_folder(tmp_path, CLASSES)):
        assert index.keys == ["cat/0.jpg", "cat/1.JPG", "dog/3.png"]
    assert src.index_class_folder(tmp_path).class_names == ["cat", "dog"]


def test_a_folder_with_some_classes_is_labelled_by_the_real_class_names(tmp_path):
    for name in ("dog", "ship"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "0.png").write_bytes(b"")
    index = src.index_class_folder(tmp_path, CLASSES)
    assert index.labels.tolist() == [1, 2] and index.counts().tolist() == [0, 1, 1]
    unsorted = src.index_class_folder(tmp_path, ["ship", "cat", "dog"])  # a Hub set's order
    assert unsorted.labels.tolist() == [2, 0] and unsorted.class_names == ["ship", "cat", "dog"]


def test_counts_and_load_leave_out_the_skipped_positions(sources):
    folder = src.index_class_folder(sources["gen_a"], CLASSES)  # 12 images per class
    assert folder.counts(frozenset({0, 1, 30})).tolist() == [10, 12, 11]
    assert src.class_counts(np.array([0, 0, 1]), 3).tolist() == [2, 1, 0]
    saved = src.index_dataset(folder.load(), "x")
    kept = saved.load(frozenset({0, 35}))
    assert len(kept) == 34 and kept["label"] == folder.load()["label"][1:35]
    assert saved.load() is saved.dataset


def test_cifake_classes_beyond_the_real_set_are_refused(tmp_path):
    (tmp_path / "0001 (3).jpg").write_bytes(b"")
    (tmp_path / "0002.jpg").write_bytes(b"")
    assert src.index_cifake_folder(tmp_path, CLASSES).labels.tolist() == [2, 0]
    (tmp_path / "0003 (4).jpg").write_bytes(b"")
    with pytest.raises(SourceError, match=r"0003 \(4\).jpg: class 4 but the real set has 3"):
        src.index_cifake_folder(tmp_path, CLASSES)


def test_saved_datasets_are_mapped_to_the_real_class_names(sources, tmp_path):
    images = load_real(str(sources["real"])).test.select(range(3))
    plain = images.cast_column("label", datasets.Value("int64"))  # integer labels, no names
    index = src.index_dataset(plain.map(lambda _: {"label": 2}), "plain")
    assert index.class_names == ["0", "1", "2"] and index.labels.tolist() == [2, 2, 2]
    names = datasets.ClassLabel(names=["ship", "cat"])  # another order, a subset
    other = images.cast_column("label", names).map(lambda _, i: {"label": i % 2}, with_indices=True)
    other.save_to_disk(str(tmp_path / "other"))
    index = src.index_synthetic(str(tmp_path / "other"), CLASSES)
    assert index.labels.tolist() == [2, 0, 2]
    assert index.load()["label"] == [2, 0, 2] and index.load().features["label"].names == CLASSES
    with pytest.raises(SourceError, match=r"classes \['cat'\] are not among \['dog', 'ship'\]"):
        src.index_synthetic(str(tmp_path / "other"), ["dog", "ship"])


def test_a_saved_real_set_needs_train_and_test_splits(sources, tmp_path):
    real = load_real(str(sources["real"]))
    datasets.DatasetDict(train=real.train).save_to_disk(str(tmp_path / "r"))
    with pytest.raises(SourceError, match=r"r: missing split\(s\) \['test'\]$"):
        src.index_real(str(tmp_path / "r"))


def test_prompts_are_kept_per_file_and_empty_where_none_was_written(sources, tmp_path):
    root = tmp_path / "gen"
    for name in ("cat", "dog"):
        shutil.copytree(sources["gen_a"] / name, root / name)
    (root / "prompts.jsonl").write_text(
        json.dumps({"file": "dog/0001.jpg", "prompt": "a dog"}) + "\n", encoding="utf-8"
    )
    ds = src.read_class_folder(root, CLASSES)
    assert ds["prompt"][12 + 1] == "a dog" and ds["prompt"].count("") == 23


def test_num_classes_counts_the_class_names():
    assert _data().num_classes == len(CLASSES) == 3


def test_saved_sources_that_datasets_cannot_load_are_named(sources, tmp_path):
    """datasets fails on a saved split with no rows (IndexError) and on a truncated arrow file;
    either is a one-line SourceError naming the setting."""
    real = load_real(str(sources["real"]))
    datasets.DatasetDict(train=real.train, test=real.test.select([])).save_to_disk(
        str(tmp_path / "r")
    )
    with pytest.raises(SourceError, match=r"^data.real=.*/r: empty splits \['test'\]$"):
        src.index_real(str(tmp_path / "r"))
    real.train.save_to_disk(str(tmp_path / "s"))
    (arrow,) = (tmp_path / "s").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(SourceError, match=r"^.*/s: cannot load this saved dataset \("):
        src.index_synthetic(str(tmp_path / "s"), CLASSES)


def test_a_path_inside_a_local_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """`benchmarks/nope` is shaped like a Hub id; with `benchmarks/` here it is a mistyped path,
    refused at once instead of after the Hub's retries (and, in a grid, after earlier runs)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmarks").mkdir()
    assert not src.is_hub_id("benchmarks/nope") and not src.is_hub_id("benchmarks")
    assert src.is_hub_id("uoft-cs/cifar10") and src.is_hub_id("cifar10")
    assert not src.is_hub_id("/data/cifar10") and not src.is_hub_id("a/b/c")
    with pytest.raises(SourceError, match=r"^data.benchmark=benchmarks/nope: no such folder$"):
        check_local_paths(DataConfig(benchmark="benchmarks/nope"))
    check_local_paths(DataConfig(real="uoft-cs/cifar10", synthetic={}))  # left to the Hub
    check_local_paths(DataConfig(benchmark="you/bench"))  # likewise


@pytest.mark.parametrize("h, w", [(16, 16), (1, 32)])  # (1, 32) would broadcast silently
def test_decode_refuses_an_image_of_another_size(h, w):
    features = datasets.Features({"image": datasets.Image()})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": png_bytes(size), "path": None} for size in ((32, 32), (h, w))]},
        features=features,
    )
    with pytest.raises(SourceError, match=rf"image 1 .* is \({h}, {w}\), expected \(32, 32\)"):
        decode(ds)
