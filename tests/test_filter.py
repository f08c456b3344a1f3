"""The detector as a product: export and reload, rsmatch-filter's scores, filtering, report,
corrupt and odd-sized images, Hub push (offline, at the API boundary), bad input, and the
filter-first baseline (`data.exclude_scores`) that never reads provenance."""

import contextlib
import io
import json
import os
import re
import shutil
import stat
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rsmatch import filter as flt
from rsmatch import hub
from rsmatch.algorithms.rsmatch import SYNTHETIC
from rsmatch.benchmark.integrity import decode_bytes
from rsmatch.benchmark.sources import load_real, load_synthetic, read_class_folder
from rsmatch.benchmark.split import SplitSpec, build_split
from rsmatch.benchmark.store import save_benchmark
from rsmatch.cli import filter as cli
from rsmatch.config import ConfigError, load_config
from rsmatch.data.decode import decode
from rsmatch.data.exclude import kept_rows
from rsmatch.data.loaders import load_train_data
from rsmatch.export import load_detector
from rsmatch.filter import FilterResult
from rsmatch.filter_report import counts, provenance_metrics
from rsmatch.trainer import Trainer

from .conftest import failure, png_bytes, tiny_config, tiny_overrides
from .torchrun import torchrun


@pytest.fixture(scope="module")
def run(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    trainer = Trainer(tiny_config(sources, out, algorithm="rsmatch"))
    trainer.fit()
    return out, trainer


@pytest.fixture(scope="module")
def bench(sources, tmp_path_factory):
    real = load_real(str(sources["real"]))
    synth = {g: load_synthetic(str(sources[f"gen_{g}"]), real.class_names) for g in ("a", "b")}
    dd = build_split(real, synth, SplitSpec(4, 0.5, None, 0))
    out = tmp_path_factory.mktemp("bench") / "b"
    save_benchmark(dd, out, {"real": str(sources["real"]), "labels_per_class": 4})
    return out


def filter_(tmp_path, *args):
    out = tmp_path / "out"
    return cli.main([*args, "--out", str(out), "--precision", "no"]), out


def scores_of(out):
    t = pq.read_table(out / "scores.parquet").to_pydict()
    return dict(zip(t["id"], t["synthetic_score"])), t


def test_loading_the_wrong_export_or_a_mistyped_path_is_one_clear_error(run, tmp_path):
    from rsmatch.export import load_classifier

    out, _ = run
    # the filter names the mistake (it said the folder held no detector export)
    with pytest.raises(flt.FilterError, match=r"/model: a classifier export, not a detector "
                                              r"export \(an RSMatch run writes both"):  # fmt: skip
        flt.resolve_detector(str(out / "model"))
    with pytest.raises(ValueError, match=r"/detector: a detector export; load_classifier loads a "
                                         r"classifier export$"):  # fmt: skip
        load_classifier(out / "detector")
    with pytest.raises(ValueError, match=r"/model: a classifier export; load_detector"):
        load_detector(out / "model")
    with pytest.raises(ValueError, match=r": not an export \(config.json \+ model.safetensors\)"):
        load_detector(out)
    with pytest.raises(FileNotFoundError, match=r"/nope/detector: no such folder, and not a Hub"):
        load_detector(tmp_path / "nope" / "detector")


def test_models_and_checkpoints_are_as_readable_as_the_runs_other_files(run):
    """safetensors 0.8 writes 0600: a cluster group could not read the models."""
    out, _ = run
    umask = os.umask(0)
    os.umask(umask)
    files = [*out.glob("*/model.safetensors"), *out.glob("checkpoints/*/*.safetensors")]
    assert len(files) >= 4
    modes = {str(f): stat.S_IMODE(f.stat().st_mode) for f in files}
    assert modes == {str(f): 0o666 & ~umask for f in files}
    assert stat.S_IMODE((out / "config.yaml").stat().st_mode) == 0o666 & ~umask


def test_detector_scores_keep_no_autograd_graph(run):
    out, _ = run
    det = load_detector(out / "detector")
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    s = det.score(x)
    assert not s.requires_grad and s.grad_fn is None and s.shape == (4,)
    with torch.no_grad():  # the probability of the class RSMatch trains as synthetic
        torch.testing.assert_close(s, det(x).float().softmax(-1)[:, SYNTHETIC])


def test_detector_exports_and_reloads_bit_identically(run):
    out, trainer = run
    live = trainer.accelerator.unwrap_model(trainer.model).detector
    det = load_detector(out / "detector")
    state = live.state_dict()
    assert det.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in det.state_dict().items())
    # the normalisation too (its buffers are not in the state dict)
    assert (det.mean, det.std) == (list(live.mean), list(live.std))
    assert torch.equal(det.normalize.mean, live.normalize.mean)
    assert torch.equal(det.normalize.std, live.normalize.std)
    assert (det.image_size, det.threshold) == ([32, 32], 0.5)
    assert det.class_names == trainer.data.class_names and det.real_set == trainer.cfg.data.real
    assert (out / "best" / "detector" / "model.safetensors").is_file()
    card = (out / "detector" / "README.md").read_text(encoding="utf-8")
    last = json.loads((out / "evals.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    assert "without a single synthetic label" in card
    assert f"| detector_acc | {last['detector_acc']:.4f} |" in card
    assert "| steps (train.steps) | 4 |" in card


@pytest.mark.slow
def test_resuming_a_finished_run_keeps_the_detector_card_metrics(sources, tmp_path):
    """A resume that exports before evaluating again (here: the run had finished) wrote a card
    without metrics; they now come from the last evaluation, which the checkpoint keeps."""
    out = tmp_path / "r"
    Trainer(tiny_config(sources, out, algorithm="rsmatch")).fit()
    last = json.loads((out / "evals.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    Trainer(tiny_config(sources, out, algorithm="rsmatch")).fit(resume=True)
    card = (out / "detector" / "README.md").read_text(encoding="utf-8")
    assert f"| detector_acc | {last['detector_acc']:.4f} |" in card
    assert f"| queue_purity | {last['queue_purity']:.4f} |" in card
    assert (
        json.loads((out / "metrics.json").read_text(encoding="utf-8"))["detector_acc"]
        == last["detector_acc"]
    )


def test_shared_encoder_run_exports_no_detector(sources, tmp_path):
    cfg = tiny_config(sources, tmp_path / "r", algorithm="rsmatch", **{"rsmatch.shared_encoder": True,
                      "train.steps": 1, "train.eval_every": 1})  # fmt: skip
    Trainer(cfg).fit()
    assert (tmp_path / "r" / "model").is_dir() and not (tmp_path / "r" / "detector").exists()
    rc, _ = filter_(tmp_path, "--detector", str(tmp_path / "r"), "--images", "x")
    assert rc == 2


def test_filter_a_folder_scores_equal_the_detector_and_keep_real(run, sources, tmp_path):
    out, _ = run
    det = load_detector(out / "detector")
    folder = sources["gen_a"]
    ds = read_class_folder(folder)
    with torch.no_grad():
        expected = det.score(decode(ds)).tolist()
    ids = [row["path"] for row in ds.cast_column("image", datasets.Image(decode=False))["image"]]
    threshold = sorted(expected)[len(expected) // 2]  # a score itself: <= keeps it
    rc, res = filter_(tmp_path, "--detector", str(out), "--images", str(folder), "--threshold",
                      str(threshold), "--keep", "real")  # fmt: skip
    assert rc == 0
    got, table = scores_of(res)
    assert sorted(got) == sorted(ids)
    torch.testing.assert_close(torch.tensor([got[i] for i in ids]), torch.tensor(expected))
    assert table["call"] == [
        "synthetic" if s > threshold else "real" for s in table["synthetic_score"]
    ]
    saved = datasets.load_from_disk(str(res / "dataset"))["train"]
    want = sorted(i for i in ids if got[i] <= threshold)
    assert sorted(saved["path"]) == want and 0 < len(want) < len(ids)
    assert saved.features["label"].names == ["cat", "dog", "ship"]  # nested: class folders
    report = json.loads((res / "report.json").read_text(encoding="utf-8"))
    assert report["counts"]["saved"] == len(want) and report["provenance_metrics"] is None
    for name in ("README.md", "histogram.png", "most_synthetic.png", "most_real.png"):
        assert (res / name).is_file()


def test_filter_a_saved_benchmark_reports_provenance(run, bench, tmp_path):
    out, _ = run
    rc, res = filter_(tmp_path, "--detector", str(out / "detector"), "--images", str(bench))
    assert rc == 0
    _, table = scores_of(res)
    dd = datasets.load_from_disk(str(res / "dataset"))
    src = datasets.load_from_disk(str(bench))
    assert set(dd) == {"labeled", "unlabeled", "test"}
    unl = [i for i, s in enumerate(table["split"]) if s == "unlabeled"]
    assert [table["source_id"][i] for i in unl] == src["unlabeled"]["source_id"]
    assert dd["unlabeled"]["synthetic_score"] == [table["synthetic_score"][i] for i in unl]
    report = json.loads((res / "report.json").read_text(encoding="utf-8"))
    truth = np.concatenate([src[s]["is_synthetic"] for s in src])
    gens = [g for s in src for g in src[s]["generator"]]
    want = provenance_metrics(np.asarray(table["synthetic_score"]), truth, gens, 0.5)
    assert report["provenance_metrics"] == pytest.approx(want, nan_ok=True)
    assert "recall/a" in want and "roc_auc" in (res / "README.md").read_text(encoding="utf-8")
    rc, pool = filter_(tmp_path / "pool", "--detector", str(out), "--images", str(bench),
                       "--split", "unlabeled")  # fmt: skip
    assert rc == 0 and set(datasets.load_from_disk(str(pool / "dataset"))) == {"unlabeled"}
    assert scores_of(pool)[1]["synthetic_score"] == [table["synthetic_score"][i] for i in unl]


def test_per_class_counts_by_hand_in_class_order():
    """Classes listed as the labels number them (not in the order images come), every class,
    summed over splits; a score equal to the threshold is called real."""
    names = datasets.ClassLabel(names=["airplane", "cat", "truck"])
    features = datasets.Features({"label": names, "synthetic_score": datasets.Value("float32")})
    scored = datasets.DatasetDict(
        a=datasets.Dataset.from_dict(
            {"label": [2, 2, 0, 2], "synthetic_score": [0.9, 0.5, 0.7, 0.2]}, features=features
        ),
        b=datasets.Dataset.from_dict({"label": [0], "synthetic_score": [0.1]}, features=features),
    )
    calls = ["synthetic", "real", "synthetic", "real", "real"]
    result = FilterResult(0.5, {"call": calls}, scored, scored)
    assert counts(result) == {
        "scored": 5, "corrupt_skipped": 0, "called_real": 3, "called_synthetic": 2, "saved": 5,
        "per_class": {
            "airplane": {"images": 2, "called_synthetic": 1},
            "cat": {"images": 0, "called_synthetic": 0},
            "truck": {"images": 3, "called_synthetic": 1},
        },
    }  # fmt: skip
    assert list(counts(result)["per_class"]) == ["airplane", "cat", "truck"]


def test_filter_a_downloaded_hub_benchmark_scores_its_rows_not_its_preview(run, bench, tmp_path):
    """A download of a pushed benchmark (parquet shards under data/ beside preview.png) is
    scored row for row as the saved benchmark is; it was read as a folder of one PNG."""
    out, _ = run
    repo = tmp_path / "download"
    for split, ds in datasets.load_from_disk(str(bench)).items():
        ds.to_parquet(str(repo / "data" / f"{split}-00000-of-00001.parquet"))
    (repo / "preview.png").write_bytes(png_bytes((32, 64)))
    rc, res = filter_(tmp_path / "hub", "--detector", str(out / "detector"), "--images", str(repo))
    assert rc == 0
    rc, saved = filter_(
        tmp_path / "saved", "--detector", str(out / "detector"), "--images", str(bench)
    )
    assert rc == 0

    def rows(folder):  # the splits may come in another order
        t = scores_of(folder)[1]
        return sorted(zip(t["split"], t["source_id"], t["synthetic_score"], t["call"]))

    assert rows(res) == rows(saved)
    assert len(rows(res)) == sum(len(d) for d in datasets.load_from_disk(str(bench)).values())


def test_provenance_metrics_by_hand():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.2])
    truth = np.array([0, 0, 1, 1, 1, 0], dtype=bool)
    gens = ["real", "real", "g1", "g1", "g2", "real"]
    m = provenance_metrics(scores, truth, gens, 0.5)
    # positive > negative pairs: 0.35 beats 0.1, 0.2; 0.8 and 0.7 beat all three -> 8 of 9
    assert m["roc_auc"] == pytest.approx(8 / 9)
    assert m["accuracy"] == pytest.approx(5 / 6)  # only 0.35 (synthetic) is called real
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(2 / 3)
    assert m["recall/g1"] == 0.5 and m["recall/g2"] == 1.0 and m["real_called_synthetic"] == 0.0


def test_corrupt_and_odd_sized_images(run, sources, tmp_path):
    out, _ = run
    folder = tmp_path / "flat"
    folder.mkdir()
    good = (sources["gen_b"] / "cat" / "0000.jpg").read_bytes()
    (folder / "a.jpg").write_bytes(good)
    (folder / "big.png").write_bytes(png_bytes((50, 70)))  # H=50, W=70
    (folder / "cut.jpg").write_bytes(good[: len(good) // 2])
    (folder / "text.png").write_bytes(b"not an image")
    rc, res = filter_(tmp_path, "--detector", str(out), "--images", str(folder))
    assert rc == 2 and not res.exists()
    rc, res = filter_(tmp_path, "--detector", str(out), "--images", str(folder), "--skip-corrupt")
    assert rc == 0
    assert (res / "corrupt.txt").read_text(encoding="utf-8").split() == ["cut.jpg", "text.png"]
    got, _ = scores_of(res)
    det = load_detector(out / "detector")
    big = Image.open(io.BytesIO(png_bytes((50, 70)))).resize((32, 32), Image.Resampling.LANCZOS)
    x = torch.stack([decode(read_class_folder(sources["gen_b"]).select([0]))[0],
                     torch.from_numpy(np.array(big)).permute(2, 0, 1)])  # fmt: skip
    with torch.no_grad():
        want = det.score(x).tolist()
    assert sorted(got) == ["a.jpg", "big.png"]
    assert [got["a.jpg"], got["big.png"]] == pytest.approx(want, abs=1e-6)
    saved = datasets.load_from_disk(str(res / "dataset"))["train"]
    assert "label" not in saved.column_names  # a flat folder has no classes


def test_corrupt_error_names_the_files(run, tmp_path, capsys):
    out, _ = run
    folder = tmp_path / "imgs" / "cat"
    folder.mkdir(parents=True)
    (folder / "bad.jpg").write_bytes(b"\xff\xd8broken")
    (folder / "ok.png").write_bytes(png_bytes((32, 32)))
    rc, res = filter_(tmp_path, "--detector", str(out), "--images", str(tmp_path / "imgs"))
    err = [line for line in capsys.readouterr().err.splitlines() if line and "batch/s" not in line]
    assert rc == 2 and len(err) == 1 and "cat/bad.jpg" in err[0] and "--skip-corrupt" in err[0]
    assert not res.exists()


@pytest.mark.parametrize(
    "case",
    ["missing", "empty", "no-detector", "classifier", "out-exists", "split"]
    + ["saved-empty", "saved-empty-split", "saved-truncated", "typo-images", "typo-detector"],
)
def test_bad_input_exits_2_with_one_line(run, sources, bench, tmp_path, capsys, monkeypatch, case):
    out, _ = run
    detector, images, named, extra = str(out), str(sources["gen_a"]), None, []
    if case == "missing":
        images = named = str(tmp_path / "nope")
    elif case.startswith("typo"):  # org/name-shaped, but inside a folder here: not the Hub

        def ask_the_hub(*args, **kwargs):
            raise AssertionError("asked the Hub")

        monkeypatch.chdir(tmp_path)
        (tmp_path / "runs").mkdir()
        if case == "typo-images":
            monkeypatch.setattr(datasets, "load_dataset", ask_the_hub)
            images, named = "runs/imgz", "--images runs/imgz: no such folder"
        else:
            monkeypatch.setattr(flt, "load_detector", ask_the_hub)
            detector, named = "runs/dmeo", "--detector runs/dmeo: no such folder"
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        images = named = str(tmp_path / "empty")
    elif case.startswith("saved"):  # datasets itself fails to load an empty split (IndexError)
        ds = flt.read_folder(sources["gen_a"])
        saved = {
            "saved-empty": ds.select([]),
            "saved-empty-split": datasets.DatasetDict(a=ds, b=ds.select([])),
            "saved-truncated": ds,
        }[case]
        saved.save_to_disk(str(tmp_path / "saved"))
        if case == "saved-truncated":
            (arrow,) = (tmp_path / "saved").glob("*.arrow")
            arrow.write_bytes(arrow.read_bytes()[:100])
        images = str(tmp_path / "saved")
        named = {"saved-empty": "no rows", "saved-empty-split": "empty splits ['b']"}.get(
            case, "cannot load"
        )
    elif case == "no-detector":  # a run folder without detector/ (e.g. FixMatch)
        shutil.copytree(out / "model", tmp_path / "fm" / "model")
        detector = named = str(tmp_path / "fm")
    elif case == "classifier":
        detector = named = str(out / "model")
    elif case == "split":
        images, extra, named = str(bench), ["--split", "nope"], "--split nope"
    else:
        (tmp_path / "out").mkdir()
        named = str(tmp_path / "out")
    rc, res = filter_(tmp_path, "--detector", detector, "--images", images, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and named in err[0] and err[0].startswith("rsmatch-filter:")
    assert case == "out-exists" or not res.exists()


def test_push_at_the_api_boundary(run, sources, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    out, _ = run
    calls = []
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub",
                        lambda self, repo, **kw: calls.append(("data", repo, kw, sorted(self))))  # fmt: skip
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("card", kw)))  # fmt: skip
    rc, res = filter_(tmp_path, "--detector", str(out), "--images", str(sources["gen_a"]),
                      "--push-to-hub", "me/filtered", "--private")  # fmt: skip
    assert rc == 0
    assert calls[0] == ("data", "me/filtered", {"private": True}, ["train"])
    kw = calls[1][1]
    assert (kw["folder_path"], kw["repo_id"], kw["repo_type"]) == (
        str(res),
        "me/filtered",
        "dataset",
    )
    assert "README.md" in kw["allow_patterns"]
    card = (res / "README.md").read_text(encoding="utf-8")
    assert "threshold **0.5**" in card and "| scored | 36 |" in card and str(out) in card


def test_push_offline_fails_cleanly_and_rsmatch_push_retries(
    run, sources, tmp_path, capsys, monkeypatch
):
    import huggingface_hub

    out, _ = run
    rc, res = filter_(tmp_path, "--detector", str(out), "--images", str(sources["gen_a"]),
                      "--push-to-hub", "me/filtered")  # fmt: skip
    assert (
        rc == 1 and "push failed" in capsys.readouterr().err and (res / "scores.parquet").is_file()
    )
    assert hub.main([str(res), "me/filtered"]) == 1  # still offline: the same one line
    assert capsys.readouterr().err.startswith("rsmatch-push: push failed (")
    assert hub.main([str(res), "me/filtered", "--detector"]) == 2
    assert "--detector: for run folders; " in capsys.readouterr().err
    calls = []  # online again: what rsmatch-filter --push-to-hub sends
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub",
                        lambda self, repo, **kw: calls.append(("data", repo, kw, len(self["train"]))))  # fmt: skip
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("card", kw["folder_path"], kw["repo_type"])))  # fmt: skip
    assert hub.main([str(res), "me/filtered", "--private"]) == 0
    assert calls == [("data", "me/filtered", {"private": True}, 36), ("card", str(res), "dataset")]


def test_rsmatch_push_detector_at_the_api_boundary(run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    out, _ = run
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo, **kw: calls.append(("create", repo)))  # fmt: skip
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["folder_path"])) or "url")  # fmt: skip
    assert hub.main([str(out), "me/detector", "--detector"]) == 0
    staged = out / "hub-detector"
    assert calls == [("create", "me/detector"), ("upload", str(staged))]
    names = {p.name for p in staged.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", *hub.RECORD_FILES} == names
    assert "synthetic-image detector" in (staged / "README.md").read_text(encoding="utf-8")
    (tmp_path / "fm").mkdir()
    for name in hub.RECORD_FILES:
        shutil.copy2(out / name, tmp_path / "fm" / name)
    assert hub.main([str(tmp_path / "fm"), "me/detector", "--detector"]) == 2
    assert "no detector/ export" in capsys.readouterr().err


def test_keep_fraction_threshold_by_hand():
    scores = np.array([0.9, 0.1, 0.5, 0.3, 0.7])  # sorted: 0.1 0.3 0.5 0.7 0.9
    assert flt.threshold_for_fraction(scores, 0.4) == 0.3  # the 2 lowest called real
    assert flt.threshold_for_fraction(scores, 1.0) == 0.9
    assert flt.threshold_for_fraction(scores, 0.01) == 0.1  # at least one image is kept
    assert flt.threshold_for_fraction(np.array([0.6, 0.2, 0.2]), 1 / 3) == 0.2  # ties kept
    assert flt.threshold_for_fraction(scores, 0.75) == 0.7  # 3.75 images rounds to 4
    halves = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    assert flt.threshold_for_fraction(halves[:5], 0.5) == 0.3  # 2.5 images: 3, halves up
    assert flt.threshold_for_fraction(halves, 0.5) == 0.4  # 3.5 images: 4


def test_keep_fraction_calls_that_fraction_real(run, sources, tmp_path):
    out, _ = run
    rc, res = filter_(tmp_path, "--detector", str(out), "--images", str(sources["gen_a"]),
                      "--keep-fraction", "0.25", "--keep", "real")  # fmt: skip
    assert rc == 0
    got, table = scores_of(res)
    threshold = sorted(table["synthetic_score"])[9 - 1]  # round(0.25 * 36) = 9 lowest
    assert json.loads((res / "report.json").read_text(encoding="utf-8"))["threshold"] == threshold
    assert table["call"].count("real") == sum(s <= threshold for s in got.values()) >= 9
    saved = datasets.load_from_disk(str(res / "dataset"))["train"]
    assert sorted(saved["path"]) == sorted(i for i, s in got.items() if s <= threshold)


def test_non_square_detector_input_is_height_by_width():
    """`size` is (H, W); PIL sizes are (W, H): a wide image and a tall one of the transposed
    size are both resized to H x W, and one already H x W is decoded as training decodes it."""
    size = (24, 16)
    for h, w in ((20, 30), (16, 24)):
        data = png_bytes((h, w))
        x = flt.to_tensor(data, size)
        want = Image.open(io.BytesIO(data)).resize((16, 24), Image.Resampling.LANCZOS)
        assert x.shape == (3, 24, 16) and x.dtype == torch.uint8
        assert torch.equal(x, torch.from_numpy(np.array(want)).permute(2, 0, 1))
    exact = png_bytes((24, 16))
    assert torch.equal(flt.to_tensor(exact, size), decode_bytes(exact))
    assert flt.to_tensor(b"not an image", size) is None


def test_a_folder_is_labelled_only_when_every_image_is_in_a_subfolder(tmp_path):
    for rel in ("cat/a.png", "cat/deep/b.png", "dog/c.png"):
        (tmp_path / "nested" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "nested" / rel).write_bytes(png_bytes((8, 8)))
    ds = flt.read_folder(tmp_path / "nested")
    assert ds["path"] == ["cat/a.png", "cat/deep/b.png", "dog/c.png"]
    assert ds.features["label"].names == ["cat", "dog"] and ds["label"] == [0, 0, 1]
    shutil.copytree(tmp_path / "nested", tmp_path / "mixed")
    (tmp_path / "mixed" / "top.png").write_bytes(png_bytes((8, 8)))
    mixed = flt.read_folder(tmp_path / "mixed")
    assert len(mixed) == 4 and "label" not in mixed.column_names


def test_labels_give_provenance_by_source(sources, tmp_path):
    real, gen = sources["real"] / "train", sources["gen_a"]
    dd = flt.load_labelled({"real": str(real), "a": str(gen)})
    ds = dd["train"]
    assert list(dd) == ["train"] and len(ds) == 90 + 36
    assert ds["is_synthetic"] == [False] * 90 + [True] * 36
    assert ds["generator"] == ["real"] * 90 + ["a"] * 36
    assert ds["path"][0] == "real/cat/0000.jpg" and ds["path"][90] == "a/cat/0000.jpg"
    assert ds.features["label"].names == ["cat", "dog", "ship"]  # one class set: labels kept
    assert ds["label"][:90] == flt.read_folder(real)["label"]
    # a source with other classes: provenance stays, class labels go
    shutil.copytree(gen / "cat", tmp_path / "other" / "cat")
    shutil.copytree(gen / "dog", tmp_path / "other" / "dog")
    mixed = flt.load_labelled({"real": str(real), "b": str(tmp_path / "other")})["train"]
    assert "label" not in mixed.column_names and sum(mixed["is_synthetic"]) == 24
    # a source without files (a saved Dataset): ids name it, row by row (beside a folder source
    # they were null, so a score could not be traced to its image)
    flt.read_folder(gen).remove_columns("path").save_to_disk(str(tmp_path / "saved"))
    saved = flt.load_labelled({"real": str(real), "s": str(tmp_path / "saved")})["train"]
    assert saved["path"][89:92] == ["real/ship/0029.jpg", "s/train/0", "s/train/1"]
    for bad in ({"real": str(real)}, {"a": str(gen), "b": str(gen)}):
        with pytest.raises(flt.FilterError, match="needs real=SOURCE and at least one"):
            flt.load_labelled(bad)


class _Rank:
    """The Accelerator that score_dataset reads, for one rank of `world`; `gather` hands back
    the shards of the ranks before this one (recorded in `shards`) and this rank's."""

    def __init__(self, rank: int, world: int, shards: list) -> None:
        self.process_index, self.num_processes, self.shards = rank, world, shards
        self.device, self.is_local_main_process = torch.device("cpu"), rank == 0

    def autocast(self):
        return contextlib.nullcontext()

    def gather(self, local):
        self.shards.append(local.clone())
        return torch.cat([*self.shards, *[local] * (self.num_processes - len(self.shards))])


def test_ranks_score_contiguous_shards_padded_to_equal_length(run, sources):
    """5 rows on 2 ranks: rank 0 scores rows 0-2, rank 1 rows 3-4 and pads its shard with NaN;
    the gathered scores are every row's, in order."""
    det = load_detector(run[0] / "detector")
    ds = read_class_folder(sources["gen_a"]).select([0, 13, 14, 26, 35])
    with torch.no_grad():
        want = det.score(decode(ds)).double()
    shards: list = []
    for rank in (0, 1):
        got = flt.score_dataset(det, ds, 2, _Rank(rank, 2, shards))
    assert [len(s) for s in shards] == [3, 3] and torch.isnan(shards[1][2])
    torch.testing.assert_close(torch.cat([shards[0], shards[1][:2]]).double(), want)
    torch.testing.assert_close(torch.from_numpy(got), want)


def test_run_filter_on_splits_with_and_without_source_ids(run, sources, tmp_path):
    """A split without source_id (or provenance) leaves the column out for all; a row that does
    not decode is skipped and takes no part in the keep-fraction threshold."""
    det = load_detector(run[0] / "detector")
    images = read_class_folder(sources["gen_b"]).select(range(5)).remove_columns("label")
    a = images.select(range(3)).add_column("source_id", ["s0", "s1", "s2"])
    a = a.add_column("is_synthetic", [True] * 3).add_column("generator", ["b"] * 3)
    b = images.select([3, 4]).cast_column("image", datasets.Image(decode=False))
    # the first row broken: later rows keep their own row numbers and ids
    b = b.map(lambda x, i: {"image": {"bytes": b"broken" if i == 0 else x["bytes"], "path": None}},
              input_columns="image", with_indices=True)  # fmt: skip
    dd = datasets.DatasetDict(a=a, b=b.cast_column("image", datasets.Image()))
    res = flt.run_filter(det, dd, _Rank(0, 1, []), batch_size=2, keep_fraction=1.0,
                         keep_real=True, skip_corrupt=True)  # fmt: skip
    assert res.corrupt == ["b/0"] and res.table["id"] == ["a/0", "a/1", "a/2", "b/1"]
    assert res.table["row"] == [0, 1, 2, 1]
    assert "source_id" not in res.table
    assert res.threshold == max(res.table["synthetic_score"])  # the decoded rows' maximum
    assert [len(res.dataset[s]) for s in ("a", "b")] == [3, 1]
    assert not flt.provenance(res.scored) and flt.provenance(datasets.DatasetDict(a=a))


def test_outputs_appear_whole_or_not_at_all(tmp_path):
    table = {"split": ["train"], "row": [0], "id": ["x.png"], "synthetic_score": [0.2],
             "call": ["real"]}  # fmt: skip
    ds = datasets.Dataset.from_dict({"path": ["x.png"], "synthetic_score": [0.2]})
    result = flt.FilterResult(0.5, table, datasets.DatasetDict(train=ds),
                              datasets.DatasetDict(train=ds))  # fmt: skip
    out, tmp = tmp_path / "out", tmp_path / ".out.tmp"
    tmp.mkdir()
    (tmp / "stale").write_text("left by a killed run", encoding="utf-8")

    def failing(folder):
        raise RuntimeError("the report failed")

    with pytest.raises(RuntimeError, match="the report failed"):
        flt.write_outputs(result, out, failing)
    assert not out.exists() and not tmp.exists()
    tmp.mkdir()
    (tmp / "stale").write_text("left by a killed run", encoding="utf-8")
    flt.write_outputs(
        result, out, lambda folder: (folder / "report.json").write_text("{}", encoding="utf-8")
    )
    assert sorted(p.name for p in out.iterdir()) == ["dataset", "report.json", "scores.parquet"]
    assert pq.read_table(out / "scores.parquet").to_pydict() == table and not tmp.exists()


# -- the filter-first baseline ---------------------------------------------------------------


def write_scores(path: Path, source_ids: list[str], scores: list[float], split: str = "unlabeled"):
    pq.write_table(pa.table({"split": [split] * len(scores), "source_id": source_ids,
                             "synthetic_score": scores}), path)  # fmt: skip
    return path


def fake_scores(bench, path):
    """Scores for every split: labeled/test rows reuse source ids and must be ignored."""
    dd = datasets.load_from_disk(str(bench))
    rng = np.random.default_rng(0)
    cols = {"split": [], "source_id": [], "synthetic_score": []}
    for split in ("labeled", "unlabeled", "test"):
        ids = dd[split]["source_id"]
        cols["split"] += [split] * len(ids)
        cols["source_id"] += ids
        cols["synthetic_score"] += rng.uniform(size=len(ids)).round(2).tolist()
    pq.write_table(pa.table(cols), path)
    unl = [s for s, sp in zip(cols["synthetic_score"], cols["split"]) if sp == "unlabeled"]
    return dd["unlabeled"], np.asarray(unl)


def test_exclude_scores_trains_and_drops_exactly_the_rows_above(sources, bench, tmp_path, capsys):
    """... and says on stderr how much of the pool is left (a detector that calls nearly
    everything synthetic left 4 of 2,000 images, silently)."""
    pool, scores = fake_scores(bench, tmp_path / "s.parquet")
    keep = np.flatnonzero(scores <= 0.5)
    assert 0 < len(keep) < len(scores)
    cfg = load_config(None, tiny_overrides(sources, tmp_path / "r", algorithm="fixmatch",
        **{"data.benchmark": str(bench), "data.exclude_scores": str(tmp_path / "s.parquet"),
           "data.exclude_above": 0.5, "train.steps": 2}))  # fmt: skip
    trainer = Trainer(cfg)
    trainer.fit()
    assert torch.equal(trainer.data.unlabeled, decode(pool.select(keep.tolist())))
    assert trainer.data.split_meta["excluded"] == len(scores) - len(keep)
    assert (tmp_path / "r" / "metrics.json").is_file()
    note = (f"data.exclude_scores: {len(scores) - len(keep)} of {len(scores)} unlabeled images "
            f"excluded (score > 0.5), {len(keep)} left\n")  # fmt: skip
    assert note in capsys.readouterr().err


def test_exclusion_keeps_provenance_aligned_and_combines_with_real_only(bench, tmp_path):
    pool, scores = fake_scores(bench, tmp_path / "s.parquet")
    base = [f"data.benchmark={bench}", f"data.exclude_scores={tmp_path / 's.parquet'}"]
    data = load_train_data(load_config(None, base).data)
    kept = pool.select(np.flatnonzero(scores <= 0.5).tolist())
    assert data.provenance.is_synthetic.tolist() == kept["is_synthetic"]  # evaluation's truth
    assert data.provenance.generator == kept["generator"]
    reals = [i for i, synthetic in enumerate(pool["is_synthetic"]) if not synthetic]
    want = [i for i in reals if scores[i] <= 0.5]
    assert 0 < len(want) < len(reals)
    data = load_train_data(load_config(None, [*base, "data.real_only=true"]).data)
    assert torch.equal(data.unlabeled, decode(pool.select(want)))
    assert data.split_meta["excluded"] == len(reals) - len(want)


def test_exclude_never_reads_provenance(bench, tmp_path):
    pool, _ = fake_scores(bench, tmp_path / "s.parquet")
    dd = datasets.load_from_disk(str(bench))
    rng = np.random.default_rng(1)
    flipped = [not v for v in rng.permutation(dd["unlabeled"]["is_synthetic"]).tolist()]
    unl = dd["unlabeled"].remove_columns(["is_synthetic", "generator"])
    unl = unl.add_column("is_synthetic", flipped).add_column(
        "generator", rng.permutation(dd["unlabeled"]["generator"]).tolist()
    )
    save_benchmark(datasets.DatasetDict(labeled=dd["labeled"], unlabeled=unl, test=dd["test"]),
                   tmp_path / "shuffled", {"labels_per_class": 4})  # fmt: skip
    kept = []
    for path in (bench, tmp_path / "shuffled"):
        cfg = load_config(None, [f"data.benchmark={path}",
                                 f"data.exclude_scores={tmp_path / 's.parquet'}"])  # fmt: skip
        kept.append(load_train_data(cfg.data).unlabeled)
    assert torch.equal(kept[0], kept[1]) and len(kept[0]) < len(pool)
    # the ids' content is irrelevant: opaque ids with the same scores keep the same rows
    ids, scores = pool["source_id"], pq.read_table(tmp_path / "s.parquet").to_pydict()
    score_of = {i: s for i, s, sp in zip(scores["source_id"], scores["synthetic_score"],
                                          scores["split"]) if sp == "unlabeled"}  # fmt: skip
    opaque = [f"id{i}" for i in range(len(ids))]
    renamed = write_scores(tmp_path / "r.parquet", opaque, [score_of[i] for i in ids])
    assert kept_rows(opaque, str(renamed), 0.5) == kept_rows(ids, str(tmp_path / "s.parquet"), 0.5)


def test_exclude_errors(bench, tmp_path):
    with pytest.raises(ConfigError, match="data.exclude_above"):
        load_config(None, ["data.exclude_above=1.5"])
    with pytest.raises(ConfigError, match="data.exclude_scores"):
        load_config(None, [f"data.exclude_scores={tmp_path / 'none.parquet'}"])
    ids = ["real/1", "a/2"]
    path = write_scores(tmp_path / "s.parquet", ["real/1"], [0.2])
    with pytest.raises(ValueError, match="1 of 2 pool rows have no score"):
        kept_rows(ids, str(path), 0.5)
    path = write_scores(tmp_path / "s.parquet", ids, [0.9, 0.8])
    with pytest.raises(ValueError, match="drops every unlabeled row"):
        kept_rows(ids, str(path), 0.5)


@pytest.mark.slow
def test_two_processes_score_like_one(run, sources, tmp_path):
    out, _ = run
    args = ["--detector", str(out), "--images", str(sources["real"]), "--precision", "no"]
    res = torchrun("launch/filter.py", [*args, "--out", str(tmp_path / "p2")],
                   restore=tmp_path / "p2", cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert res.returncode == 0, failure(res)
    assert cli.main([*args, "--out", str(tmp_path / "p1")]) == 0
    one, two = scores_of(tmp_path / "p1")[1], scores_of(tmp_path / "p2")[1]
    assert one["id"] == two["id"] and len(one["id"]) == 120  # real/train + real/test
    assert one["synthetic_score"] == two["synthetic_score"]


def test_exclude_scores_file_errors_name_the_setting(tmp_path):
    key = f"data.exclude_scores={str(tmp_path / 'x.parquet')!r}"
    (tmp_path / "x.parquet").write_text("not parquet", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(key)}: not a readable parquet file"):
        kept_rows(["a"], str(tmp_path / "x.parquet"), 0.5)
    pq.write_table(pa.table({"source_id": ["a"], "score": [0.1]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=rf"^{re.escape(key)}: no \['synthetic_score'\] column"):
        kept_rows(["a"], str(tmp_path / "x.parquet"), 0.5)
    write_scores(tmp_path / "x.parquet", ["a", "b", "a"], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=rf"^{re.escape(key)}: source_id values repeat"):
        kept_rows(["a", "b"], str(tmp_path / "x.parquet"), 0.5)


def test_exclude_scores_of_one_split_other_than_the_pool_are_all_read(tmp_path):
    """A scores file with no `unlabeled` rows (a saved Dataset scored alone is split `train`),
    or with no `split` column at all, is read whole."""
    ids, scores = ["a", "b", "c"], [0.7, 0.2, 0.5]
    path = write_scores(tmp_path / "train.parquet", ids, scores, split="train")
    assert kept_rows(["c", "a", "b"], str(path), 0.5) == [0, 2]
    pq.write_table(pa.table({"source_id": ids, "synthetic_score": scores}), tmp_path / "n.parquet")
    assert kept_rows(["c", "a", "b"], str(tmp_path / "n.parquet"), 0.5) == [0, 2]


@pytest.mark.parametrize("during", ["run_filter", "write_report"])
def test_ctrl_c_while_scoring_or_writing_is_one_line_and_writes_nothing(
    run, sources, tmp_path, capsys, monkeypatch, during
):
    import rsmatch.filter_report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(flt if during == "run_filter" else rsmatch.filter_report, during,
                        interrupted)  # fmt: skip
    rc, res = filter_(tmp_path, "--detector", str(run[0]), "--images", str(sources["gen_a"]))
    err = capsys.readouterr().err.strip().splitlines()  # after the progress bar, if scored
    assert rc == 130 and err[-1] == f"rsmatch-filter: interrupted; nothing written to {res}"
    assert not [line for line in err if "Traceback" in line]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary folder


def test_a_split_with_nothing_kept_is_left_out_of_the_saved_dataset(run, bench, tmp_path):
    """datasets saves a split without rows but cannot load it back (nor could rsmatch-push)."""
    out, _ = run
    rc, first = filter_(tmp_path / "all", "--detector", str(out), "--images", str(bench))
    _, table = scores_of(first)
    lowest = {}
    for split, score in zip(table["split"], table["synthetic_score"]):
        lowest[split] = min(score, lowest.get(split, score))
    (empty, top), (_, second) = sorted(lowest.items(), key=lambda kv: -kv[1])[:2]
    assert top > second  # a threshold between them keeps nothing of `empty` only
    rc, res = filter_(tmp_path / "keep", "--detector", str(out), "--images", str(bench),
                      "--keep", "real", "--threshold", str((top + second) / 2))  # fmt: skip
    assert rc == 0
    dd = datasets.load_from_disk(str(res / "dataset"))
    assert empty not in dd and len(dd) == 2 and all(len(ds) for ds in dd.values())


def test_an_output_inside_the_scored_folder_is_not_scored_next_time(run, sources, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(sources["gen_a"], images)
    args = ["--detector", str(run[0]), "--images", str(images), "--precision", "no"]
    assert cli.main([*args, "--out", str(images / "filtered")]) == 0  # its figures are PNGs
    assert cli.main([*args, "--out", str(tmp_path / "again")]) == 0
    first, again = (scores_of(p)[1]["id"] for p in (images / "filtered", tmp_path / "again"))
    assert again == first and len(first) == 36
    # a folder holding only such an output: said so (it was a bare "no images found")
    only = tmp_path / "only"
    only.mkdir()
    shutil.move(images / "filtered", only / "filtered")
    message = "no images found outside earlier rsmatch-filter outputs (3 inside, skipped)"
    with pytest.raises(flt.FilterError, match=rf"^--images {only}: {re.escape(message)}$"):
        flt.read_folder(only)
