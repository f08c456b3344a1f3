"""The benchmark builder, offline: tiny random diffusers pipelines and a tiny T5 from configs."""

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from rsmatch.benchmark import synth
from rsmatch.benchmark.sources import cifake_class
from rsmatch.benchmark.store import load_benchmark
from rsmatch.cli import build_benchmark as bb

from .conftest import CLASSES, SHARED, failure, write_class_folder
from .tiny_models import save_tiny_sd, save_tiny_sdxl, save_tiny_t5
from .torchrun import torchrun

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    sdxl = save_tiny_sdxl(root / "sdxl")
    from diffusers import UNet2DConditionModel

    lightning = root / "lightning_unet.safetensors"  # stands in for the 4-step UNet file
    save_file(UNet2DConditionModel.from_pretrained(str(sdxl / "unet")).state_dict(), str(lightning))
    return {
        "sd": save_tiny_sd(root / "sd"),
        "sdxl": sdxl,
        "lightning": lightning,
        "t5": save_tiny_t5(root / "t5"),
    }


@pytest.fixture(autouse=True)
def _two_denoising_steps(monkeypatch):
    """The generators' 4-50 denoising steps cut to 2 for the builds in this process: these tests
    check what a build makes and where it goes, not how its images look, and 50 steps of even a
    tiny UNet took most of each generating build's time."""
    for name, spec in synth.GENERATORS.items():
        monkeypatch.setitem(synth.GENERATORS, name, synth.replace(spec, steps=2))


def _cifake(folder: Path, per_class: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for k in range(len(CLASSES)):
        for i in range(per_class):
            name = f"{i}.jpg" if k == 0 else f"{i} ({k + 1}).jpg"
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                folder / name, quality=75
            )
    return folder


def _args(sources, out, *extra):
    return ["--real", str(sources["real"]), "--labels-per-class", "4", "--replace-ratio", "0.5",
            "--unlabeled-per-class", "12", "--out", str(out), *extra]  # fmt: skip


@pytest.mark.slow
def test_build_end_to_end_with_generators_import_and_cifake(sources, tiny, tmp_path):
    out = tmp_path / "bench"
    cifake = _cifake(tmp_path / "cifake", 3)
    argv = _args(sources, out, "--synthetic", f"a={sources['gen_a']}", "--synthetic", f"c=cifake:{cifake}",
                 "--generate", "sd14", "sdxl_lightning", "--generator-model", f"sd14={tiny['sd']}",
                 "--generator-model", f"sdxl_lightning={tiny['sdxl']}", "--lightning-unet", str(tiny["lightning"]),
                 "--prompt-model", str(tiny["t5"]), "--prompts-per-class", "3", "--resolution", "32",
                 "--batch-size", "4")  # fmt: skip
    assert bb.main(argv) == 0
    dd, meta = load_benchmark(out)
    unl = dd["unlabeled"]
    labels, gens = np.asarray(unl["label"]), np.asarray(unl["generator"])
    # 12 per class, 6 replaced, shared by 4 generators as 2, 2, 1, 1 (sorted: a, c, sd14, sdxl_lightning)
    for c in range(3):
        assert (labels == c).sum() == 12
        assert (np.asarray(unl["is_synthetic"]) & (labels == c)).sum() == 6
    assert {g: int((gens == g).sum()) for g in sorted(set(gens))} == {
        "a": 6,
        "c": 6,
        "real": 18,
        "sd14": 3,
        "sdxl_lightning": 3,
    }
    generated = [p for p, g in zip(unl["prompt"], gens) if g in ("sd14", "sdxl_lightning")]
    assert all(generated) and all(p == "" for p, g in zip(unl["prompt"], gens) if g == "real")
    assert not any(dd["labeled"]["is_synthetic"]) and not any(dd["test"]["is_synthetic"])
    card = (out / "README.md").read_text(encoding="utf-8")
    assert (
        "| unlabeled | 36 | 12 | 12 | 12 |" in card
        and "sdxl_lightning: 3" in card
        and "--generate" in card
    )
    assert (out / "preview.png").stat().st_size > 1000
    # generated files are JPEG like the real set, resized to 32x32, with a prompt index
    files = sorted((out.with_name("bench.synthetic") / "sd14" / "cat").glob("*.jpg"))
    assert (
        files and Image.open(files[0]).size == (32, 32) and files[0].read_bytes()[:2] == b"\xff\xd8"
    )
    assert (out.with_name("bench.synthetic") / "sd14" / "prompts.jsonl").is_file()
    assert meta["replace_ratio"] == 0.5 and meta["prompts"] == "t5"


def test_generation_resumes_where_it_stopped(tiny, tmp_path):
    prompts = synth.template_prompts(CLASSES, 1)
    spec = synth.replace(synth.GENERATORS["sd14"], model=str(tiny["sd"]), steps=2, resolution=32)
    jobs = synth.plan_jobs(tmp_path / "sd14", "sd14", prompts, 2, seed=0, suffix=".png")
    args = (spec, jobs, 32, 4, 0, torch.float32, "cpu", "sd14", False)
    assert synth.generate(*args) == 6
    first = {j.path: j.path.read_bytes() for j in jobs}
    jobs[1].path.unlink()
    jobs[4].path.unlink()
    assert synth.generate(*args) == 2  # only the missing ones
    assert synth.generate(*args) == 0
    # per-image seeds: regenerated files equal the originals
    assert all(j.path.read_bytes() == first[j.path] for j in jobs)


def test_t5_prompts_are_deterministic_and_deduplicated(tiny):
    a = synth.t5_prompts(CLASSES, 4, str(tiny["t5"]), seed=1)
    assert a == synth.t5_prompts(CLASSES, 4, str(tiny["t5"]), seed=1)
    for name in CLASSES:
        assert len(a[name]) == 4
        sampled = [p for p in a[name] if not p.startswith("a photo of")]
        assert len(set(sampled)) == len(sampled)


def test_cifake_naming():
    assert [cifake_class(n) for n in ("0.jpg", "17 (2).jpg", "3 (10).jpg")] == [0, 1, 9]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--generate", "dalle"], "unknown generators ['dalle']"),
        (["--synthetic", "a=/nonexistent"], "no such folder"),
        (
            ["--replace-ratio", "1.0", "--unlabeled-per-class", "13", "--synthetic", "a=GEN_A"],
            "12 images of class 'cat', the ratio needs 13",
        ),
        (["--replace-ratio", "0.5"], "needs --synthetic or --generate"),
        (
            ["--replace-ratio", "1.5", "--synthetic", "a=GEN_A"],
            "--replace-ratio=1.5: must be in [0, 1]",
        ),
        (
            ["--replace-ratio", "nan", "--synthetic", "a=GEN_A"],
            "--replace-ratio=nan: must be in [0, 1]",
        ),
        # numbers out of range used to build broken benchmarks (a negative count slices from the end)
        (["--labels-per-class", "-3"], "--labels-per-class=-3: must be >= 1"),
        (["--labels-per-class", "0"], "--labels-per-class=0: must be >= 1"),
        (["--unlabeled-per-class", "0"], "--unlabeled-per-class=0: must be >= 1"),
        (["--seed", "-1"], "--seed=-1: must be in [0, 4294967295]"),
        (["--jpeg-quality", "200"], "--jpeg-quality=200: must be in [-1, 100]"),
        (
            ["--images-per-class", "5", "--synthetic", "a=GEN_A"],
            "--images-per-class=5: only with --generate",
        ),
        # the split's checks name the flags, not the trainer's config keys
        (
            ["--labels-per-class", "30", "--replace-ratio", "0"],
            "--labels-per-class=30: class 'cat' has only 30 images",
        ),
        (
            ["--generate", "sd14", "--images-per-class", "2", "--synthetic", "a=GEN_A"],
            "--images-per-class=2: the ratio needs 3",
        ),
        # model paths that exist nowhere: at once, not after the real set is read
        (
            ["--generate", "sd14", "--generator-model", "sd14=/nonexistent"],
            "--generator-model sd14=/nonexistent: no such folder",
        ),
        (
            ["--generate", "sd14", "--generator-model", "sd14=GEN_A", "--prompt-model", "/t5"],
            "--prompt-model /t5: no such folder",
        ),
    ],
)
def test_bad_input_fails_before_work(sources, tmp_path, capsys, extra, message):
    extra = [e.replace("GEN_A", str(sources["gen_a"])) for e in extra]
    assert bb.main(_args(sources, tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.synthetic").exists()


def test_out_under_a_file_fails_before_work(sources, tmp_path, capsys):
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    assert bb.main(_args(sources, tmp_path / "afile" / "sub")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rsmatch-build-benchmark: error: --out {tmp_path}/afile/sub: "
                   f"{tmp_path}/afile is a file, not a folder"]  # fmt: skip
    assert (tmp_path / "afile").read_text(encoding="utf-8") == "x"


def test_missing_classes_and_corrupt_images(sources, tmp_path, capsys):
    partial = write_class_folder(tmp_path / "partial", 12, seed=7, synthetic=True)
    for f in (partial / "ship").iterdir():
        f.unlink()
    (partial / "ship").rmdir()
    assert bb.main(_args(sources, tmp_path / "o1", "--synthetic", f"p={partial}")) == 2
    assert "missing class folders ['ship']" in capsys.readouterr().err

    broken = write_class_folder(tmp_path / "broken", 12, seed=8, synthetic=True)
    (broken / "cat" / "0000.jpg").write_bytes(b"not an image")
    assert (
        bb.main(
            _args(sources, tmp_path / "o2", "--synthetic", f"b={broken}", "--replace-ratio", "0.25")
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "1 unreadable image(s)" in err and "cat/0000.jpg" in err
    out = tmp_path / "o3"
    assert (
        bb.main(
            _args(
                sources,
                out,
                "--synthetic",
                f"b={broken}",
                "--replace-ratio",
                "0.25",
                "--skip-corrupt",
            )
        )
        == 0
    )
    assert "Unreadable images skipped: 1." in (out / "README.md").read_text(encoding="utf-8")
    # skipping may leave too few: counted again, the error names the builder's flag
    argv = _args(sources, tmp_path / "o5", "--synthetic", f"b={broken}", "--replace-ratio", "1")
    assert bb.main([*argv, "--skip-corrupt"]) == 2  # 12 per class needed, 11 cats readable
    assert capsys.readouterr().err.endswith(
        "--synthetic b: 11 images of class 'cat', the ratio needs 12\n"
    )
    # an unreadable real test image is skipped from the test split too
    real = tmp_path / "real"
    shutil.copytree(sources["real"], real)
    (real / "test" / "dog" / "0003.jpg").write_bytes(b"not an image")
    out = tmp_path / "o4"
    argv = _args(sources, out, "--replace-ratio", "0", "--skip-corrupt")
    assert bb.main(["--real", str(real), *argv[2:]]) == 0
    dd, _ = load_benchmark(out)
    assert len(dd["test"]) == 3 * 10 - 1 and len(dd["labeled"]) == 3 * 4


def test_existing_output_is_not_overwritten(sources, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert bb.main(_args(sources, tmp_path / "out", "--replace-ratio", "0")) == 2
    assert "exists already" in capsys.readouterr().err


def test_push_to_hub_at_the_api_boundary(sources, tmp_path, monkeypatch):
    calls = []
    import datasets
    import huggingface_hub

    monkeypatch.setattr(
        datasets.DatasetDict,
        "push_to_hub",
        lambda self, repo, private=False: calls.append(("data", repo, private, sorted(self))),
    )
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file",
                        lambda self, **kw: calls.append(("file", kw["repo_id"], kw["path_in_repo"], kw["repo_type"])))  # fmt: skip
    out = tmp_path / "b"
    argv = _args(
        sources,
        out,
        "--synthetic",
        f"a={sources['gen_a']}",
        "--push-to-hub",
        "me/rsssl",
        "--private",
    )
    assert bb.main(argv) == 0
    assert calls[0] == ("data", "me/rsssl", True, ["labeled", "test", "unlabeled"])
    assert [c[2] for c in calls[1:]] == ["README.md", "preview.png", "rsmatch_benchmark.json"]
    assert all(c[3] == "dataset" for c in calls[1:])


def test_push_offline_fails_cleanly_and_keeps_the_build(sources, tmp_path, capsys, monkeypatch):
    out = tmp_path / "b"
    argv = _args(sources, out, "--synthetic", f"a={sources['gen_a']}", "--push-to-hub", "me/rsssl")
    assert bb.main(argv) == 1  # HF_HUB_OFFLINE=1 in the tests
    err = capsys.readouterr().err
    assert "push failed" in err and err.rstrip().endswith(f"retry with rsmatch-push {out} me/rsssl")
    assert load_benchmark(out)[0]["unlabeled"].num_rows == 36
    # retried without a rebuild: rsmatch-push sends what --push-to-hub would have
    import datasets
    import huggingface_hub

    from rsmatch import hub

    calls = []
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub",
                        lambda self, repo, private=False: calls.append(("data", repo, private, sorted(self))))  # fmt: skip
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file",
                        lambda self, **kw: calls.append(("file", kw["path_in_repo"], kw["repo_type"])))  # fmt: skip
    assert hub.main([str(out), "me/rsssl"]) == 0
    assert calls[0] == ("data", "me/rsssl", False, ["labeled", "test", "unlabeled"])
    assert calls[1:] == [
        ("file", name, "dataset") for name in ("README.md", "preview.png", "rsmatch_benchmark.json")
    ]


def test_config_file_sets_options(sources, tmp_path):
    cfg = tmp_path / "b.yaml"
    cfg.write_text(json.dumps({"real": str(sources["real"]), "synthetic": [f"a={sources['gen_a']}"],
                               "labels_per_class": 2, "replace_ratio": 0.25, "out": str(tmp_path / "b")}), encoding="utf-8")  # fmt: skip
    assert bb.main(["--config", str(cfg)]) == 0
    dd, meta = load_benchmark(tmp_path / "b")
    assert meta["labels_per_class"] == 2 and len(dd["labeled"]) == 6
    bad = tmp_path / "bad.yaml"
    bad.write_text("{realz: x}", encoding="utf-8")
    with pytest.raises(bb.BuildError, match="realz"):
        bb.parse_args(["--config", str(bad)])


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "cifar10-jpeg.tar.gz").exists(), reason="needs ../shared/data")
def test_benchmark_from_shared_data_trains_unchanged(tmp_path):
    import tarfile

    from rsmatch.config import load_config
    from rsmatch.trainer import Trainer

    # The shared layout and files, the first 150 images of each folder (all 80,000 took ~40 s
    # to unpack and index, for a build that reads 1,250 of them)
    for name in ("cifar10-jpeg", "synth-ddpm-jpeg", "synth-cgan-jpeg"):
        with tarfile.open(SHARED / f"{name}.tar.gz") as tar:
            first = [m for m in tar if not m.isfile() or int(Path(m.name).stem) < 150]
            tar.extractall(tmp_path, members=first, filter="data")
    out = tmp_path / "bench"
    argv = ["--real", str(tmp_path / "cifar10"), "--synthetic", f"ddpm={tmp_path / 'synth/ddpm'}",
            "--synthetic", f"cgan={tmp_path / 'synth/cgan'}", "--labels-per-class", "25",
            "--unlabeled-per-class", "100", "--replace-ratio", "0.5", "--out", str(out)]  # fmt: skip
    assert bb.main(argv) == 0
    dd, _ = load_benchmark(out)
    assert len(dd["unlabeled"]) == 1000 and sum(dd["unlabeled"]["is_synthetic"]) == 500
    cfg = load_config(None, [f"data.benchmark={out}", "model.backbone=wrn10_1", "rsmatch.detector_backbone=wrn10_1",
                             "train.steps=2", "train.batch_size=10", "train.uratio=2", "train.eval_every=2",
                             f"train.output_dir={tmp_path / 'run'}", "train.progress=false"])  # fmt: skip
    metrics = Trainer(cfg).fit()
    assert (
        metrics["step"] == 2 and "detector_acc/ddpm" in metrics and "detector_acc/cgan" in metrics
    )


@pytest.mark.parametrize("broken", ["generator", "prompt"])
def test_a_model_that_cannot_load_is_one_line_naming_it(sources, tiny, tmp_path, capsys, broken):
    """A folder that holds no model (or, online, a wrong id): one line naming it, exit 2."""
    empty = tmp_path / "empty"
    empty.mkdir()
    sd, t5 = (empty, tiny["t5"]) if broken == "generator" else (tiny["sd"], empty)
    argv = _args(sources, tmp_path / "out", "--generate", "sd14", "--generator-model",
                 f"sd14={sd}", "--prompt-model", str(t5))  # fmt: skip
    assert bb.main(argv) == 2
    err = capsys.readouterr().err
    what = f"generator model {empty}" if broken == "generator" else f"--prompt-model {empty}"
    ours = [line for line in err.splitlines() if line.startswith("rsmatch-build-benchmark")]
    assert "Traceback" not in err and len(ours) == 1  # besides, T5's "Loading weights" bar
    assert ours[0].startswith(f"rsmatch-build-benchmark: error: {what}: cannot load (")
    instead = "--generator-model GEN=FOLDER" if broken == "generator" else "--prompt-model FOLDER"
    assert f"offline, download it where the Hub is reachable and pass {instead}" in ours[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.synthetic").exists()


def test_an_interrupted_write_leaves_no_temporary_folder(sources, tmp_path, monkeypatch, capsys):
    from rsmatch.benchmark import build

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "preview", interrupted)  # the last file written
    argv = _args(sources, tmp_path / "out", "--synthetic", f"a={sources['gen_a']}")
    assert bb.main(argv) == 130  # Ctrl-C: one line, as a shell reports SIGINT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rsmatch-build-benchmark: interrupted; the benchmark was not written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.undo()  # now stopped while pushing: the build is there to push later
    monkeypatch.setattr(build, "push_benchmark", interrupted)
    assert bb.main([*argv, "--push-to-hub", "me/rsssl"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    out = tmp_path / "out"
    assert err == [f"rsmatch-build-benchmark: interrupted; {out} is built; push it with "
                   f"rsmatch-push {out} REPO"] and load_benchmark(out)  # fmt: skip


def test_other_ranks_of_an_import_write_nothing(sources, tmp_path, monkeypatch, capsys):
    from rsmatch.benchmark import build

    monkeypatch.setattr(
        build,
        "process_state",
        lambda: SimpleNamespace(is_main_process=False, destroy_process_group=lambda: None),
    )
    assert bb.main(_args(sources, tmp_path / "out", "--synthetic", f"a={sources['gen_a']}")) == 0
    assert capsys.readouterr().out == "" and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("generate", [False, True])
def test_two_processes_build_one_benchmark(sources, tiny, tmp_path, generate):
    """Launched as two CPU processes: one writes (the other deleted its temporary folder under
    it), and both take part in generation (each thought it was alone, without `cpu=True`)."""
    out = tmp_path / "b"
    extra = ["--generate", "sd14", "--generator-model", f"sd14={tiny['sd']}", "--prompts",
             "template", "--resolution", "32"] if generate else []  # fmt: skip
    res = torchrun(REPO / "launch" / "build_benchmark.py",
                   _args(sources, out, "--synthetic", f"a={sources['gen_a']}", *extra))  # fmt: skip
    assert res.returncode == 0, failure(res)
    assert [json.loads(line)["out"] for line in res.stdout.splitlines()] == [str(out)]
    dd, meta = load_benchmark(out)
    assert dd["unlabeled"].num_rows == 36
    assert sorted(meta["synthetic"]) == (["a", "sd14"] if generate else ["a"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("synthetic: {ddpm: a/b, cgan: c}", {"synthetic": ["ddpm=a/b", "cgan=c"]}),
        ("synthetic: ddpm=a", {"synthetic": ["ddpm=a"]}),  # one value, not its characters
        ("generate: sd14", {"generate": ["sd14"]}),
        ("replace_ratio: 1", {"replace_ratio": 1}),  # numbers: checked with the flags' values
        ("replace_ratio: 5e-1", {"replace_ratio": 0.5}),  # YAML reads this one as text
        ("unlabeled_per_class: null", {"unlabeled_per_class": None}),
        ("out: 5", {"out": Path("5")}),  # a folder named 5 (crashed on 5.exists())
        ("device: cuda:0", {"device": "cuda:0"}),
        ("skip_corrupt: 'no'", "skip_corrupt: expected true or false, got 'no'"),  # was true
        ("skip_corrupt: yes", "skip_corrupt: expected true or false, got 'yes'"),  # YAML 1.2
        ("seed: 010", {"seed": 10}),  # YAML 1.2: decimal (YAML 1.1 read octal 8)
        ("synthetic: [1, 2]", "synthetic: expected a list of text, got [1, 2]"),
        ("prompts: foo", "prompts: 'foo' is not one of ['t5', 'template']"),  # fell back silently
        ("dtype: float64", "dtype: 'float64' is not one of ['float32', 'float16', 'bfloat16']"),
        ("real: [a]", "real: expected text, got ['a']"),
        ("seed: abc", "seed: 'abc' is not a valid int"),
        ("replace_ration: 0.5", "unknown keys ['replace_ration']; did you mean replace_ratio?"),
        ("a: 1\nb: 2", "unknown keys ['a', 'b']"),
    ],
)
def test_config_file_values_take_their_flags_types(tmp_path, text, expected):
    cfg = tmp_path / "b.yaml"
    cfg.write_text(text, encoding="utf-8")
    if isinstance(expected, dict):
        options = bb.parse_args(["--config", str(cfg)])
        assert {k: getattr(options, k) for k in expected} == expected
    else:
        with pytest.raises(bb.BuildError, match=f"^--config {cfg}: {re.escape(expected)}$"):
            bb.parse_args(["--config", str(cfg)])


def test_a_generated_folder_resumes_only_with_its_recipe(sources, tiny, tmp_path, capsys):
    export = tmp_path / "synthetic"
    gen = ["--generate", "sd14", "--generator-model", f"sd14={tiny['sd']}", "--prompts",
           "template", "--resolution", "32", "--export-synthetic", str(export)]  # fmt: skip
    assert bb.main(_args(sources, tmp_path / "a", *gen)) == 0
    recipe = json.loads((export / "sd14" / "generator.json").read_text(encoding="utf-8"))
    assert (recipe["model"], recipe["resolution"], recipe["seed"]) == (str(tiny["sd"]), 32, 0)
    made = {f: f.stat().st_mtime_ns for f in export.rglob("*.jpg")}
    capsys.readouterr()
    assert bb.main(_args(sources, tmp_path / "b", *gen, "--seed", "1")) == 2  # another recipe
    err = capsys.readouterr().err
    assert f"{export / 'sd14'}: its images were made with seed=0, this build asks seed=1" in err
    assert bb.main(_args(sources, tmp_path / "c", *gen)) == 0  # the same: resumed, none remade
    assert {f: f.stat().st_mtime_ns for f in export.rglob("*.jpg")} == made
    # another generator beside it: sd14's folder is complete and its recipe unchanged
    glide = ["--generate", "glide", "sd14", "--generator-model", f"glide={tiny['sd']}"]
    assert bb.main(_args(sources, tmp_path / "d", *gen, *glide, "--seed", "1")) == 2
    assert not (export / "glide").exists()  # refused before glide, which sorts first, began
    assert bb.main(_args(sources, tmp_path / "e", *gen, *glide)) == 0
    assert {f: f.stat().st_mtime_ns for f in (export / "sd14").rglob("*.jpg")} == made
    # a larger build into the folder, then the first command again: that build draws from its
    # own images only (6 a class), as it did before, not from the 9 a class now there
    assert bb.main(_args(sources, tmp_path / "f", *gen, "--images-per-class", "9")) == 0
    assert bb.main(_args(sources, tmp_path / "g", *gen)) == 0

    def synthetic_rows(out: Path) -> list[str]:
        pool = datasets.load_from_disk(str(out))["unlabeled"]
        return sorted(i for i, fake in zip(pool["source_id"], pool["is_synthetic"]) if fake)

    assert synthetic_rows(tmp_path / "g") == synthetic_rows(tmp_path / "c")
    assert synthetic_rows(tmp_path / "f") != synthetic_rows(tmp_path / "c")  # it drew from 9


def test_a_recipe_that_made_no_image_binds_nothing(sources, tiny, tmp_path, capsys):
    """A model that failed to load leaves its recipe; the corrected command must still run."""
    export, empty = tmp_path / "synthetic", tmp_path / "empty"
    empty.mkdir()
    gen = ["--generate", "sd14", "--prompts", "template", "--resolution", "32",
           "--export-synthetic", str(export)]  # fmt: skip
    assert bb.main(_args(sources, tmp_path / "a", *gen, "--generator-model", f"sd14={empty}")) == 2
    assert "cannot load" in capsys.readouterr().err
    assert (
        bb.main(_args(sources, tmp_path / "b", *gen, "--generator-model", f"sd14={tiny['sd']}"))
        == 0
    )
