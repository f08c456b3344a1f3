"""Source indexing and the benchmark preview, checked against values worked out by hand."""

import datasets
import numpy as np
import pytest

from rsmatch.benchmark import preview as pv
from rsmatch.benchmark import sources as src
from rsmatch.benchmark.sources import SourceError

from .conftest import png_bytes

CLASSES = ["cat", "dog", "ship"]


def _touch(root, *names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_class_folders_count_exactly_the_five_image_suffixes(tmp_path):
    """jpg, jpeg, png, bmp and webp are images; gif, tiff, txt and no suffix are not."""
    _touch(tmp_path, "cat/a.jpg", "cat/b.jpeg", "cat/c.png", "cat/d.bmp", "cat/e.webp")
    _touch(tmp_path, "cat/f.gif", "cat/g.tiff", "cat/h.txt", "cat/i", "dog/j.WEBP", "dog/k.Bmp")
    index = src.index_class_folder(tmp_path)
    assert index.keys == ["cat/a.jpg", "cat/b.jpeg", "cat/c.png", "cat/d.bmp", "cat/e.webp",
                          "dog/j.WEBP", "dog/k.Bmp"]  # fmt: skip
    assert index.labels.tolist() == [0, 0, 0, 0, 0, 1, 1]


def test_class_folders_without_images_are_named_with_the_suffixes(tmp_path):
    """Class folders holding no image file: one error naming the folder and the suffixes."""
    _touch(tmp_path, "cat/notes.txt", "dog/x.gif")
    msg = rf"^{tmp_path}: no images \(\.bmp, \.jpeg, \.jpg, \.png, \.webp\) found$"
    with pytest.raises(SourceError, match=msg):
        src.index_class_folder(tmp_path, CLASSES)


def test_a_folder_without_class_subfolders_says_so(tmp_path):
    """Images directly in the root (no class folders) are refused as such, naming the root."""
    _touch(tmp_path, "0.jpg", ".hidden/1.jpg")
    with pytest.raises(SourceError, match=rf"^{tmp_path}: no class subfolders$"):
        src.index_class_folder(tmp_path)


def test_missing_and_file_roots_are_told_apart(tmp_path):
    """A missing root is `no such folder`, a file given as root is `not a folder`."""
    with pytest.raises(SourceError, match=rf"^{tmp_path / 'nope'}: no such folder$"):
        src.index_class_folder(tmp_path / "nope")
    _touch(tmp_path, "file.jpg")
    with pytest.raises(SourceError, match=rf"^{tmp_path / 'file.jpg'}: not a folder$"):
        src.index_cifake_folder(tmp_path / "file.jpg", CLASSES)


def test_cifake_names_accept_jpeg_and_any_suffix_case(tmp_path):
    """`7.jpeg` is class 1, `8 (3).JPG` class 3, `9 (2).PNG` class 2 (0-based: 0, 2, 1)."""
    _touch(tmp_path, "7.jpeg", "8 (3).JPG", "9 (2).PNG")
    index = src.index_cifake_folder(tmp_path, CLASSES)
    assert index.keys == ["7.jpeg", "8 (3).JPG", "9 (2).PNG"]
    assert index.labels.tolist() == [0, 2, 1] and index.counts().tolist() == [1, 1, 1]


def test_cifake_keys_are_bare_file_names(tmp_path):
    """A CIFAKE image's key (its `path` once loaded) is the file name, not the full path."""
    (tmp_path / "12 (2).png").write_bytes(b"\x89PNG-not-decoded")
    loaded = src.index_cifake_folder(tmp_path, CLASSES).load()
    image = loaded.cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert image["path"] == "12 (2).png" and image["bytes"] == b"\x89PNG-not-decoded"
    assert loaded["label"] == [1]


def test_empty_cifake_folder_and_bad_names_are_refused(tmp_path):
    """No images: `no CIFAKE images found`; a name outside the convention is named."""
    _touch(tmp_path, "notes.txt")
    with pytest.raises(SourceError, match=rf"^{tmp_path}: no CIFAKE images found$"):
        src.index_cifake_folder(tmp_path, CLASSES)
    _touch(tmp_path, "cat_1.jpg")
    with pytest.raises(SourceError, match=r"^cat_1.jpg: not a CIFAKE file name"):
        src.index_cifake_folder(tmp_path, CLASSES)


def _unlabeled(rows: list[tuple[str, bool, str]]) -> datasets.DatasetDict:
    """An unlabeled split whose row i is a solid image of value 10 * i."""
    features = datasets.Features({
        "image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"]),
        "is_synthetic": datasets.Value("bool"), "generator": datasets.Value("string"),
    })  # fmt: skip
    columns = {
        "image": [{"bytes": png_bytes((4, 4), 10 * i), "path": None} for i in range(len(rows))],
        "label": [["cat", "dog"].index(c) for c, _, _ in rows],
        "is_synthetic": [s for _, s, _ in rows],
        "generator": [g for _, _, g in rows],
    }
    return datasets.DatasetDict(unlabeled=datasets.Dataset.from_dict(columns, features=features))


def _shown(monkeypatch, dd, tmp_path, per_kind):
    """(grid row, grid column, dataset row) of each image `preview` draws, and its titles."""
    from matplotlib.axes import Axes

    drawn, titles = [], []

    def imshow(ax, im, *a, **k):
        spec = ax.get_subplotspec()
        drawn.append((spec.rowspan.start, spec.colspan.start, int(np.asarray(im)[0, 0, 0]) // 10))

    monkeypatch.setattr(Axes, "imshow", imshow)
    real_title = Axes.set_title
    monkeypatch.setattr(
        Axes, "set_title", lambda ax, t, *a, **k: (titles.append(t), real_title(ax, t, *a, **k))
    )
    pv.preview(dd, tmp_path / "p.png", per_kind=per_kind)
    assert (tmp_path / "p.png").is_file()
    return drawn, [t for t in titles if t]


def test_preview_shows_real_then_synthetic_per_class_one_generator_at_a_time(monkeypatch, tmp_path):
    """Per class: reals first, then synthetics alternating generators a, b; titles on row 0."""
    rows = [
        ("cat", False, "real"),  # 0
        ("cat", True, "b"),  # 1
        ("cat", True, "a"),  # 2
        ("cat", False, "real"),  # 3
        ("cat", True, "a"),  # 4
        ("dog", False, "real"),  # 5
        ("cat", False, "real"),  # 6
        ("dog", True, "b"),  # 7
        ("cat", True, "b"),  # 8
    ]
    shown, titles = _shown(monkeypatch, _unlabeled(rows), tmp_path, per_kind=3)
    # cat: reals 0, 3, 6; synthetics a = [2, 4], b = [1, 8] -> 2, 1, 4; dog: real 5, synthetic 7
    # (grid row, grid column, dataset row): reals in columns 0-2, synthetics in 3-5
    assert shown == [(0, 0, 0), (0, 1, 3), (0, 2, 6), (0, 3, 2), (0, 4, 1), (0, 5, 4),
                     (1, 0, 5), (1, 3, 7)]  # fmt: skip
    assert titles == ["real", "real", "real", "a", "b", "a"]


def test_interleaved_takes_one_per_generator_in_name_order():
    """Rows of generators z, a, a, z, m -> a, m, z, a, z order: sorted names, one each in turn."""
    generators = np.array(["z", "a", "a", "z", "m", "m"])
    rows = np.array([0, 1, 2, 3, 4, 5])
    assert pv._interleaved(rows, generators, 6) == [1, 4, 0, 2, 5, 3]
    assert pv._interleaved(rows, generators, 2) == [1, 4]
    assert pv._interleaved(np.array([3, 0]), generators, 4) == [3, 0]  # one generator: as given


def test_a_label_column_is_preferred_over_fine_label_and_labels_is_read(tmp_path):
    """With both `label` and `fine_label`, `label` is the label; a lone `labels` is read too."""
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.Value("int64"),
                                  "label": datasets.ClassLabel(names=["x", "y"])})  # fmt: skip
    image = {"bytes": png_bytes((4, 4), 0), "path": None}
    ds = datasets.Dataset.from_dict(
        {"img": [image, image], "fine_label": [5, 7], "label": [1, 0]}, features=features
    )
    index = src.index_dataset(ds, "both")
    assert index.labels.tolist() == [1, 0] and index.class_names == ["x", "y"]
    alone = ds.remove_columns(["label", "fine_label"]).add_column("labels", [2, 0])
    index = src.index_dataset(alone, "alone")
    assert index.labels.tolist() == [2, 0] and index.class_names == ["0", "1", "2"]


def test_real_test_folder_is_labelled_by_the_train_class_names(tmp_path):
    """A test split missing a class keeps the train split's numbering; an extra class fails."""
    _touch(tmp_path, "train/cat/0.png", "train/dog/1.png", "train/ship/2.png")
    _touch(tmp_path, "test/dog/3.png", "test/ship/4.png")
    real = src.index_real(str(tmp_path))
    assert real.test.class_names == CLASSES and real.test.labels.tolist() == [1, 2]
    assert real.test.counts().tolist() == [0, 1, 1]
    _touch(tmp_path, "test/bird/5.png")
    with pytest.raises(SourceError, match=r"class folders \['bird'\] are not among the classes"):
        src.index_real(str(tmp_path))


def test_raw_names_files_by_absolute_path_and_rows_by_position(tmp_path, monkeypatch):
    """raw(): a file is named by its absolute path; a row as `where[i]`, plus `(path)` if any."""
    _touch(tmp_path, "gen/cat/0.png")
    (tmp_path / "gen/cat/0.png").write_bytes(b"abc")
    monkeypatch.chdir(tmp_path)
    folder = src.index_class_folder(src.Path("gen"))
    assert list(folder.raw()) == [(str(tmp_path / "gen/cat/0.png"), b"abc")]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])}
    )
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"x", "path": "cat/7.jpg"}, {"bytes": b"y", "path": None}],
         "label": [0, 0]}, features=features)  # fmt: skip
    assert list(src.index_dataset(ds, "S (train)").raw()) == [
        ("S (train)[0] (cat/7.jpg)", b"x"), ("S (train)[1]", b"y")]  # fmt: skip


def test_a_saved_synthetic_dataset_with_no_rows_is_named_as_such(tmp_path):
    """A saved Dataset of no rows: `a saved dataset with no rows`, not datasets' IndexError."""
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)}
    )
    datasets.Dataset.from_dict({"image": [], "label": []}, features=features).save_to_disk(
        str(tmp_path / "s")
    )
    with pytest.raises(SourceError, match=rf"^{tmp_path / 's'}: a saved dataset with no rows$"):
        src.index_synthetic(str(tmp_path / "s"), CLASSES)


def _config(sources, **synthetic):
    from rsmatch.config import DataConfig

    return DataConfig(real=str(sources["real"]), synthetic=synthetic, labels_per_class=4,
                      replace_ratio=0.5)  # fmt: skip


def test_check_sources_reports_images_per_class_of_every_source(sources):
    """The fixture's folders: 30/10 real train/test and 12 per generator, in each class."""
    from rsmatch.data.check import check_sources

    counts = check_sources(_config(sources, b=str(sources["gen_b"]), a=str(sources["gen_a"])))
    assert counts == {
        "real/train": {"cat": 30, "dog": 30, "ship": 30},
        "real/test": {"cat": 10, "dog": 10, "ship": 10},
        "synthetic/a": {"cat": 12, "dog": 12, "ship": 12},
        "synthetic/b": {"cat": 12, "dog": 12, "ship": 12},
    }


def test_synthetic_paths_are_checked_as_folders_in_name_order(sources, tmp_path):
    """A file as a synthetic source is `not a folder`; of two bad ones, the first name is told."""
    from rsmatch.data.check import check_local_paths

    _touch(tmp_path, "f.jpg")
    with pytest.raises(SourceError, match=rf"^data.synthetic.x: {tmp_path}/f.jpg: not a folder$"):
        check_local_paths(_config(sources, x=str(tmp_path / "f.jpg")))
    bad = _config(sources, z=str(tmp_path / "nz"), m=str(tmp_path / "nm"))
    with pytest.raises(SourceError, match=rf"^data.synthetic.m: {tmp_path}/nm: no such folder$"):
        check_local_paths(bad)


def test_a_bad_synthetic_source_is_named_by_its_key(sources, tmp_path):
    """An index error of a synthetic folder is prefixed by `data.synthetic.NAME: `."""
    from rsmatch.data.check import data_indexes

    _touch(tmp_path, "g/bird/0.png")
    with pytest.raises(SourceError, match=rf"^data.synthetic.g: {tmp_path}/g: class folders"):
        data_indexes(_config(sources, g=str(tmp_path / "g")))


def test_decode_of_no_rows_is_refused():
    """Decoding a dataset with no rows is a SourceError, not an empty tensor."""
    from rsmatch.data.decode import decode

    features = datasets.Features({"image": datasets.Image()})
    with pytest.raises(SourceError, match=r"^no images to decode$"):
        decode(datasets.Dataset.from_dict({"image": []}, features=features))


def test_interleaved_fills_every_slot_when_generators_are_uneven():
    """3 rows of a, 1 of b, 4 slots: a, b, then a's remaining two (zip stopped at b's one)."""
    assert pv._interleaved(np.arange(4), np.array(["a", "a", "a", "b"]), 4) == [0, 3, 1, 2]


def test_a_cifake_parent_folder_is_refused_not_read_as_synthetic(tmp_path):
    """CIFAKE/train holds REAL and FAKE: reading it recursively took the real images too."""
    _touch(tmp_path, "train/REAL/0001.jpg", "train/FAKE/0002 (3).jpg")
    with pytest.raises(SourceError, match=r"no CIFAKE images found \(CIFAKE folders are flat"):
        src.index_cifake_folder(tmp_path / "train", CLASSES)
    fake = src.index_cifake_folder(tmp_path / "train" / "FAKE", CLASSES)
    assert fake.keys == ["0002 (3).jpg"] and fake.labels.tolist() == [2]
