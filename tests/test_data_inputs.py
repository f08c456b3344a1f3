"""Data inputs are checked before any work and loading never writes next to the data: real-only
data, unreadable images (real and synthetic), counts before decoding, missing paths, the
builder's --config, and read-only saved datasets."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from rsmatch.benchmark import integrity
from rsmatch.benchmark.push import FILES
from rsmatch.benchmark.sources import SourceError, load_real, load_synthetic
from rsmatch.benchmark.split import SplitSpec, build_split
from rsmatch.benchmark.store import load_benchmark
from rsmatch.cli import build_benchmark as bb
from rsmatch.cli import train
from rsmatch.data.check import check_sources
from rsmatch.data.loaders import load_train_data

from .conftest import CLASSES, ROOT, tiny_config, tiny_overrides, write_class_folder


def _tree(root: Path) -> dict[Path, tuple[int, int]]:
    """Every path under root with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("rsmatch-build-benchmark: error: "), err
    return err[0]


def _nothing_written(out: Path) -> None:
    siblings = (out, out.with_name(out.name + ".synthetic"), out.with_name(f".{out.name}.tmp"))
    assert not any(p.exists() for p in siblings)


def _build_args(sources, out, *extra):
    return ["--real", str(sources["real"]), "--labels-per-class", "4", "--out", str(out), *extra]


# --- loading never writes next to the data ---------------------------------------------------


def test_saved_datasets_on_read_only_storage_load_without_writing(sources, tmp_path):
    data = tmp_path / "data"
    real = load_real(str(sources["real"]))
    datasets.DatasetDict(train=real.train, test=real.test).save_to_disk(str(data / "real"))
    for g in ("a", "b"):
        synthetic = load_synthetic(str(sources[f"gen_{g}"]), real.class_names)
        synthetic.save_to_disk(str(data / g))
    argv = _build_args(sources, data / "bench", "--synthetic", f"a={sources['gen_a']}",
                       "--replace-ratio", "0.25")  # fmt: skip
    assert bb.main(argv) == 0
    subprocess.run(["chmod", "-R", "a-w", str(data)], check=True)
    before = _tree(data)
    try:
        saved = {
            "data.real": data / "real",
            "data.synthetic": f"{{a: {data / 'a'}, b: {data / 'b'}}}",
        }
        for extra in ({}, {"data.real_only": True}, {"data.benchmark": data / "bench"},
                      {"data.benchmark": data / "bench", "data.real_only": True}):  # fmt: skip
            cfg = tiny_config(sources, tmp_path / "run", **saved, **extra)
            check_sources(cfg.data)
            loaded = load_train_data(cfg.data)
            assert len(loaded.labeled) == 12
        assert _tree(data) == before  # root ignores permissions: compare, don't expect errors
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(data)], check=True)


# --- a benchmark from the Hub ------------------------------------------------------------------


def _as_pushed(bench: Path, repo: Path) -> Path:
    """`bench` laid out as `rsmatch-push` leaves its Hub dataset repo, and as a download of that
    repo is: parquet shards named as `DatasetDict.push_to_hub` names them (images embedded: the
    benchmark holds their bytes), beside the card, preview and rsmatch_benchmark.json."""
    dd, _ = load_benchmark(bench)
    for split, ds in dd.items():
        ds.to_parquet(str(repo / "data" / f"{split}-00000-of-00001.parquet"))
    for name in FILES:
        shutil.copy(bench / name, repo / name)
    return repo


def _same_benchmark(a: tuple[datasets.DatasetDict, dict], b: tuple[datasets.DatasetDict, dict]):
    assert a[1] == b[1] and set(a[0]) == set(b[0]) == {"labeled", "unlabeled", "test"}
    for split in a[0]:
        x, y = a[0][split], b[0][split]
        assert x.features["label"].names == y.features["label"].names
        for column in ("label", "source_id", "is_synthetic", "generator"):
            assert x[column] == y[column], (split, column)
        assert x.data.column("image").to_pylist() == y.data.column("image").to_pylist()


def test_a_benchmark_pushed_to_the_hub_trains_from_its_id_or_a_download(
    sources, tmp_path, monkeypatch, capsys
):
    """The Hub is simulated at its two calls (the meta file and the dataset), each answered from
    a folder laid out as the pushed repo; everything after them is the real loading code."""
    bench = tmp_path / "bench"
    argv = _build_args(
        sources, bench, "--synthetic", f"a={sources['gen_a']}", "--replace-ratio", "0.25"
    )
    assert bb.main(argv) == 0
    saved = load_benchmark(bench)
    repo = _as_pushed(bench, tmp_path / "download")
    assert not (repo / "dataset_dict.json").exists()
    _same_benchmark(load_benchmark(repo), saved)  # a download of the repo

    asked = []
    real_load_dataset = datasets.load_dataset

    def hf_hub_download(repo_id, filename, repo_type=None, **_):
        asked.append((repo_id, filename, repo_type))
        return str(repo / filename)

    def load_dataset(spec, **kw):
        asked.append((spec, "load_dataset"))
        return real_load_dataset(str(repo) if spec == "you/bench" else spec, **kw)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", hf_hub_download)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    _same_benchmark(load_benchmark("you/bench"), saved)
    assert asked == [
        ("you/bench", "rsmatch_benchmark.json", "dataset"),
        ("you/bench", "load_dataset"),
    ]

    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides(sources, run) if not o.startswith("data.")]
    assert (
        train.main(["--config", "configs/demo.yaml", *overrides, "data.benchmark=you/bench"]) == 0
    )
    assert "benchmark: you/bench" in (run / "config.yaml").read_text(encoding="utf-8")
    split = json.loads((run / "run.json").read_text(encoding="utf-8"))["split"]
    assert split == {**saved[1], "real_only": False}  # what the pushed benchmark says
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 4


def test_a_hub_benchmark_that_cannot_be_read_is_one_line_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"  # HF_HUB_OFFLINE=1 in the tests: nothing cached, nothing to read
    overrides = ["data.benchmark=nobody/no-bench", f"train.output_dir={run}"]
    assert train.main(["--config", "configs/demo.yaml", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and (
        "data.benchmark='nobody/no-bench': no local folder of that name, and as a Hub dataset "
        "id: cannot read rsmatch_benchmark.json (" in err[0]
    ), err
    assert not run.exists()


def test_a_benchmark_download_missing_data_or_a_split_is_one_line(sources, tmp_path):
    bench = tmp_path / "bench"
    assert bb.main(_build_args(sources, bench, "--replace-ratio", "0")) == 0
    repo = _as_pushed(bench, tmp_path / "download")
    (repo / "data" / "test-00000-of-00001.parquet").unlink()
    with pytest.raises(SourceError, match=r"missing splits \['test'\]$"):
        load_benchmark(repo)
    shutil.rmtree(repo / "data")  # rsmatch_benchmark.json alone: no data at all
    with pytest.raises(SourceError, match=r"no data \(neither a saved DatasetDict"):
        load_benchmark(repo)


def test_a_hub_benchmark_loads_its_data_at_the_commit_its_meta_came_from(
    sources, tmp_path, monkeypatch
):
    bench = tmp_path / "bench"
    assert bb.main(_build_args(sources, bench, "--replace-ratio", "0")) == 0
    repo = _as_pushed(bench, tmp_path / "download")
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "snapshots" / sha
    snapshot.mkdir(parents=True)
    shutil.copy(repo / "rsmatch_benchmark.json", snapshot)
    revisions = []
    real_load_dataset = datasets.load_dataset
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda r, f, **_: str(snapshot / f))

    def load_dataset(spec, revision=None, **kw):
        revisions.append(revision)
        return real_load_dataset(str(repo), **kw)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    _, meta = load_benchmark("you/bench")
    assert revisions == [sha] and meta["hub_revision"] == sha


# --- real-only data --------------------------------------------------------------------------


def test_real_only_split_keeps_the_reals_of_a_zero_ratio(sources):
    real = load_real(str(sources["real"]))
    alone = build_split(real, {}, SplitSpec(4, 0.0, None, 0))
    synthetic = {"a": load_synthetic(str(sources["gen_a"]), real.class_names)}
    with_unused = build_split(real, synthetic, SplitSpec(4, 0.0, None, 0))
    assert len(alone["unlabeled"]) == 3 * (30 - 4) and not any(alone["unlabeled"]["is_synthetic"])
    for split in ("labeled", "unlabeled", "test"):
        assert alone[split]["source_id"] == with_unused[split]["source_id"]
    with pytest.raises(SourceError, match=r"data.replace_ratio=0.1 needs data.synthetic"):
        build_split(real, {}, SplitSpec(4, 0.1, None, 0))


def test_builder_real_only(sources, tmp_path, capsys):
    out = tmp_path / "b"
    assert bb.main(_build_args(sources, out, "--replace-ratio", "0")) == 0
    assert json.loads(capsys.readouterr().out) == {
        "out": str(out), "labeled": 12, "unlabeled": 78, "test": 30
    }  # fmt: skip
    dd, meta = load_benchmark(out)
    assert not any(dd["unlabeled"]["is_synthetic"]) and meta["synthetic"] == {}
    assert "No synthetic sources." in (out / "README.md").read_text(encoding="utf-8")


def test_a_benchmark_with_an_empty_split_is_refused_by_name(sources, tmp_path, capsys):
    """Saved elsewhere (the builder refuses to make one): training indexed into the empty
    labeled split and crashed with an IndexError."""
    assert bb.main(_build_args(sources, tmp_path / "b", "--replace-ratio", "0")) == 0
    dd, _ = load_benchmark(tmp_path / "b")
    dd["labeled"] = dd["labeled"].select([])
    dd.save_to_disk(str(tmp_path / "empty"))
    shutil.copy(tmp_path / "b" / "rsmatch_benchmark.json", tmp_path / "empty")
    overrides = [f"data.benchmark={tmp_path / 'empty'}", f"train.output_dir={tmp_path / 'run'}"]
    assert train.main(["--config", "configs/demo.yaml", *overrides]) == 2
    assert "empty splits ['labeled']" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm", ["supervised", "fixmatch", "flexmatch", "freematch", "simmatch", "rsmatch"]
)
def test_real_only_config_trains_every_algorithm(sources, tmp_path, capsys, algorithm):
    argv = tiny_overrides(sources, tmp_path / "run", algorithm=algorithm, **{
        "data.synthetic": "{}", "data.replace_ratio": 0, "train.steps": 2})  # fmt: skip
    assert train.main(argv) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["step"] == 2 and metrics["algorithm"] == algorithm


# --- unreadable images, real and synthetic, in one listing ------------------------------------


def _with_bad_images(sources, tmp_path) -> tuple[Path, Path, list[Path]]:
    real = tmp_path / "real"
    shutil.copytree(sources["real"], real)
    synthetic = write_class_folder(tmp_path / "gen", 12, seed=9, synthetic=True)
    good = (real / "train" / "dog" / "0000.jpg").read_bytes()
    bad = [real / "train" / "cat" / "0000.jpg", real / "test" / "dog" / "0001.jpg",
           synthetic / "ship" / "0003.jpg"]  # fmt: skip
    bad[0].write_bytes(b"")  # zero bytes
    bad[1].write_bytes(good[: len(good) // 2])  # truncated
    bad[2].write_bytes(b"not an image")
    return real, synthetic, bad


def test_builder_lists_every_unreadable_image_before_any_work(sources, tmp_path, capsys):
    real, synthetic, bad = _with_bad_images(sources, tmp_path)
    out = tmp_path / "b"
    argv = ["--real", str(real), "--synthetic", f"g={synthetic}", "--labels-per-class", "4",
            "--replace-ratio", "0.25", "--out", str(out)]  # fmt: skip
    assert bb.main(argv) == 2
    line = _one_error_line(capsys)
    assert "3 unreadable image(s) (pass --skip-corrupt to drop them): " in line
    assert all(str(p.resolve()) in line for p in bad)
    _nothing_written(out)

    assert bb.main([*argv, "--skip-corrupt"]) == 0
    dd, meta = load_benchmark(out)
    assert sorted(n for names in meta["skipped_corrupt"].values() for n in names) == sorted(
        str(p.resolve()) for p in bad
    )
    assert len(dd["test"]) == 29 and "Unreadable images skipped: 3." in (
        out / "README.md"
    ).read_text(encoding="utf-8")
    labels = np.asarray([*dd["labeled"]["label"], *dd["unlabeled"]["label"]])
    assert (labels == CLASSES.index("cat")).sum() == 29  # the pool lost the zero-byte real


def test_training_check_lists_every_unreadable_image(sources, tmp_path):
    real, synthetic, bad = _with_bad_images(sources, tmp_path)
    cfg = tiny_config(sources, tmp_path / "run", **{
        "data.real": real, "data.synthetic": f"{{g: {synthetic}}}", "data.replace_ratio": 0.25})  # fmt: skip
    with pytest.raises(SourceError) as e:
        check_sources(cfg.data)
    message = str(e.value)
    assert message.startswith("3 unreadable image(s): ") and "\n" not in message
    assert all(str(p.resolve()) in message for p in bad)


def test_unreadable_image_inside_a_saved_dataset_is_named_by_row(sources, tmp_path):
    ds = load_synthetic(str(sources["gen_a"]), CLASSES)
    rows = ds.cast_column("image", datasets.Image(decode=False)).to_list()
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="BMP")  # PIL reads it; training cannot
    rows[5]["image"] = {"bytes": buf.getvalue(), "path": "cat/0005.bmp"}
    broken = datasets.Dataset.from_list(rows, features=ds.features)
    broken.save_to_disk(str(tmp_path / "saved"))
    cfg = tiny_config(
        sources,
        tmp_path / "run",
        **{"data.synthetic": f"{{a: {tmp_path / 'saved'}, b: {sources['gen_b']}}}"},
    )
    with pytest.raises(SourceError, match=r"^1 unreadable image\(s\): .*saved\[5\] \(0005.bmp\)$"):
        check_sources(cfg.data)


# --- counts before decoding, and paths named by their key -------------------------------------


@pytest.fixture
def no_decoding(monkeypatch):
    def refuse(data):
        raise AssertionError("an image was decoded before the counts were checked")

    monkeypatch.setattr(integrity, "decode_bytes", refuse)


def test_too_few_synthetic_images_fail_by_counting(sources, tmp_path, capsys, no_decoding):
    out = tmp_path / "b"
    argv = _build_args(sources, out, "--synthetic", f"a={sources['gen_a']}", "--replace-ratio", "1")
    assert bb.main(argv) == 2  # 26 per class to replace, 12 per class exist
    assert _one_error_line(capsys).endswith(
        "--synthetic a: 12 images of class 'cat', the ratio needs 26"
    )
    _nothing_written(out)
    cfg = tiny_config(sources, tmp_path / "run", **{"data.replace_ratio": 1.0})
    with pytest.raises(SourceError, match="generator 'a' has 12 images of class 'cat', 13 needed"):
        check_sources(cfg.data)
    cfg = tiny_config(sources, tmp_path / "run", **{"data.labels_per_class": 30})
    with pytest.raises(SourceError, match="data.labels_per_class=30: class 'cat' has only 30"):
        check_sources(cfg.data)


def test_local_synthetic_folders_are_checked_before_the_real_set_is_fetched(
    sources, tmp_path, monkeypatch
):
    """configs/rsmatch.yaml before its synthetic folders are generated: named at once, not
    after downloading CIFAR-10 (or, offline, after the Hub's retries)."""
    fetch = lambda *a, **k: pytest.fail("the real set was fetched first")  # noqa: E731
    monkeypatch.setattr(datasets, "load_dataset", fetch)
    cfg = tiny_config(sources, tmp_path / "run", **{"data.real": "uoft-cs/cifar10",
                      "data.synthetic": f"{{a: {sources['gen_a']}, b: /nonexistent/b}}"})  # fmt: skip
    with pytest.raises(SourceError, match=r"^data.synthetic.b: /nonexistent/b: no such folder$"):
        check_sources(cfg.data)


def test_missing_paths_are_named_by_their_key(sources, tmp_path, capsys):
    for spec in ("/nonexistent/real", "../nonexistent"):
        cfg = tiny_config(sources, tmp_path / "run", **{"data.real": spec})
        with pytest.raises(SourceError, match=rf"^data.real={spec}: no such folder$"):
            check_sources(cfg.data)
    cfg = tiny_config(sources, tmp_path / "run", **{"data.synthetic": "{a: /nonexistent/a}"})
    with pytest.raises(SourceError, match=r"^data.synthetic.a: /nonexistent/a: no such folder$"):
        check_sources(cfg.data)
    out = tmp_path / "b"
    assert bb.main(["--real", "/nonexistent/real", "--replace-ratio", "0", "--out", str(out)]) == 2
    assert _one_error_line(capsys).endswith("--real=/nonexistent/real: no such folder")
    _nothing_written(out)
    split = tmp_path / "split"  # one split saved alone
    datasets.Dataset.from_dict({"label": [0]}).save_to_disk(str(split))
    cfg = tiny_config(sources, tmp_path / "run", **{"data.real": split})
    with pytest.raises(SourceError, match=rf"^data.real={split}: a saved single split; a real set"):
        check_sources(cfg.data)


def test_generator_name_real_is_reserved(sources, tmp_path, capsys):
    out = tmp_path / "b"
    assert bb.main(_build_args(sources, out, "--synthetic", f"real={sources['gen_a']}")) == 2
    assert "'real' is reserved" in _one_error_line(capsys)
    cfg = tiny_config(
        sources, tmp_path / "run", **{"data.synthetic": f"{{real: {sources['gen_a']}}}"}
    )
    with pytest.raises(SourceError, match="'real' is reserved"):
        check_sources(cfg.data)


# --- the builder's --config --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "nope.yaml: cannot read (No such file or directory)"),
        (
            "real: x\nout: [unclosed\n",
            "invalid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'",
        ),
        ("- real\n- out\n", "expected a mapping of option names to values"),
    ],
)
def test_builder_config_errors_are_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "nope.yaml"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    assert bb.main(["--config", str(path)]) == 2
    line = _one_error_line(capsys)
    assert f"--config {path}" in line and line.endswith(message)


@pytest.mark.parametrize(
    "text, message",
    [  # --config values that are not strings skip argparse's types: they crashed in the split
        ("labels_per_class: null\n", "--labels-per-class=None: must be an integer"),
        ("seed: 1.5\n", "--seed=1.5: must be an integer"),
        ("replace_ratio: [0.5]\n", "--replace-ratio=[0.5]: must be a number"),
    ],
)
def test_builder_config_values_are_type_checked(sources, tmp_path, capsys, text, message):
    path = tmp_path / "options.yaml"
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "b"
    assert bb.main(["--config", str(path), "--real", str(sources["real"]), "--out", str(out)]) == 2
    assert _one_error_line(capsys).endswith(message) and not out.exists()


def test_builder_config_error_through_the_entry_point(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("real: [\n", encoding="utf-8")
    res = subprocess.run([sys.executable, str(ROOT / "launch" / "build_benchmark.py"), "--config", str(bad)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert (
        res.stderr.strip()
        .splitlines()[-1]
        .startswith(f"rsmatch-build-benchmark: error: --config {bad}: invalid YAML at line 2")
    )


@pytest.mark.parametrize("made, message", [(False, "no such folder"), (True, "not a saved RS-SSL")])
def test_a_benchmark_path_that_is_not_one_is_named(tmp_path, capsys, made, message):
    if made:
        (tmp_path / "bench").mkdir()
    overrides = [f"data.benchmark={tmp_path / 'bench'}", f"train.output_dir={tmp_path / 'run'}"]
    assert train.main(["--config", "configs/demo.yaml", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"data.benchmark='{tmp_path / 'bench'}': {message}" in err[0]


def test_real_only_with_an_all_synthetic_pool_is_one_line(sources, tmp_path, capsys):
    pool = {"data.real_only": True, "data.replace_ratio": 1.0, "data.unlabeled_per_class": 8}
    overrides = tiny_overrides(sources, tmp_path / "run", **pool)
    assert train.main(overrides) == 2
    message = "data.real_only=true: the unlabeled pool holds no real image (replace_ratio=1.0)"
    assert capsys.readouterr().err.strip().splitlines() == [f"rsmatch-train: error: {message}"]
    assert not (tmp_path / "run").exists()
