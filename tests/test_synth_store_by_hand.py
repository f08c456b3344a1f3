"""Synthetic generation, the stored benchmark, its card and rsmatch-push pinned by hand, with
stand-ins for the pipeline, the T5 model and the Hub (found by a mutation audit)."""

import io
import json
import zlib
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from rsmatch import hub
from rsmatch.benchmark import card, store, synth
from rsmatch.benchmark.sources import SourceError

# --- prompts ---------------------------------------------------------------------------------


def test_template_prompts_one_per_image_with_underscores_as_spaces():
    """The template names the class in words, once per image asked for."""
    assert synth.template_prompts(["pickup_truck", "cat"], 2) == {
        "pickup_truck": ["a photo of a pickup truck"] * 2,
        "cat": ["a photo of a cat"] * 2,
    }


class _FakeTok:
    """Tokenizer stand-in: records the words it was given; decodes ids as 'w<id>'."""

    def __init__(self, seen):
        self.seen = seen

    def __call__(self, texts, return_tensors=None):
        self.seen.append(texts)
        return _Inputs()

    def batch_decode(self, ids, skip_special_tokens=True):
        return [f"w{int(i)}" for i in ids]


class _Inputs(dict):
    def to(self, device):
        return self


class _FakeSeq2Seq:
    """Model stand-in: `num_return_sequences` draws from torch's global RNG (0..3: repeats)."""

    def __init__(self, calls):
        self.calls = calls

    def to(self, device):
        return self

    def eval(self):
        return self

    def generate(self, num_return_sequences, **kw):
        self.calls.append(num_return_sequences)
        return torch.randint(0, 1000, (num_return_sequences,))


@pytest.fixture
def fake_t5(monkeypatch):
    import transformers

    seen, calls = [], []
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", staticmethod(lambda m: _FakeTok(seen))
    )
    monkeypatch.setattr(
        transformers.AutoModelForSeq2SeqLM,
        "from_pretrained",
        staticmethod(lambda m: _FakeSeq2Seq(calls)),
    )
    return SimpleNamespace(seen=seen, calls=calls)


def test_t5_prompts_sample_a_quarter_more_and_feed_the_class_in_words(fake_t5):
    """8 per class: round(1.25 * 8) = 10 samples; the keyword is the class name with spaces."""
    out = synth.t5_prompts(["pickup_truck", "cat"], 8, "m", seed=0)
    assert fake_t5.calls == [10, 10]
    assert fake_t5.seen == [["pickup truck"], ["cat"]]
    assert [len(v) for v in out.values()] == [8, 8]


def test_t5_prompts_differ_by_class_and_seed_and_top_up_with_the_template(fake_t5):
    """Each class draws from its own seed (seed, class); too few distinct: template fills."""
    a = synth.t5_prompts(["x", "y"], 3, "m", seed=0)
    b = synth.t5_prompts(["x", "y"], 3, "m", seed=1)
    assert a["x"] != a["y"] and a["x"] != b["x"]
    assert a == synth.t5_prompts(["x", "y"], 3, "m", seed=0)


def test_t5_prompts_dedupe_then_fill_with_the_template(monkeypatch, fake_t5):
    """Sampled sentences repeat: distinct ones first, in order, then the template to per_class."""
    monkeypatch.setattr(
        _FakeSeq2Seq, "generate", lambda self, num_return_sequences, **kw: torch.tensor([5, 5, 7])
    )
    out = synth.t5_prompts(["big_dog"], 4, "m", samples=3)
    assert out == {"big_dog": ["w5", "w7", "a photo of a big dog", "a photo of a big dog"]}
    monkeypatch.setattr(
        _FakeSeq2Seq, "generate", lambda self, num_return_sequences, **kw: torch.arange(6)
    )
    assert synth.t5_prompts(["c"], 2, "m", samples=6) == {"c": ["w0", "w1"]}  # cut to per_class


# --- the plan: files, prompts, seeds ---------------------------------------------------------


def _seed(seed, gen, c, i):
    return int(np.random.SeedSequence([seed, zlib.crc32(gen.encode()), c, i]).generate_state(1)[0])


def test_plan_names_files_per_class_and_cycles_prompts(tmp_path):
    """OUT/<class>/<class>_<5-digit index><suffix>; image i takes prompt i mod len(prompts)."""
    prompts = {"cat": ["p0", "p1"], "dog": ["q0"]}
    jobs = synth.plan_jobs(tmp_path, "sd14", prompts, 3, seed=0, suffix=".jpg")
    assert [(j.class_name, j.index, j.prompt) for j in jobs] == [
        ("cat", 0, "p0"), ("cat", 1, "p1"), ("cat", 2, "p0"),
        ("dog", 0, "q0"), ("dog", 1, "q0"), ("dog", 2, "q0"),
    ]  # fmt: skip
    assert jobs[2].path == tmp_path / "cat" / "cat_00002.jpg"
    assert jobs[4].path == tmp_path / "dog" / "dog_00001.jpg"


def test_plan_seeds_are_those_of_seed_generator_class_index(tmp_path):
    """The recorded recipe: SeedSequence([seed, crc32(generator), class, index]); so all distinct
    across classes, generators and build seeds, and a generator's seeds ignore the others."""
    prompts = {"cat": ["p"], "dog": ["p"]}
    jobs = synth.plan_jobs(tmp_path, "sd14", prompts, 2, seed=7, suffix=".png")
    assert [j.seed for j in jobs] == [
        _seed(7, "sd14", 0, 0), _seed(7, "sd14", 0, 1), _seed(7, "sd14", 1, 0), _seed(7, "sd14", 1, 1)
    ]  # fmt: skip
    others = [j.seed for j in synth.plan_jobs(tmp_path, "glide", prompts, 2, 7, ".png")]
    reseeded = [j.seed for j in synth.plan_jobs(tmp_path, "sd14", prompts, 2, 8, ".png")]
    assert len({*[j.seed for j in jobs], *others, *reseeded}) == 12


def test_prompt_index_lists_class_relative_files_prompts_and_seeds(tmp_path):
    """prompts.jsonl: one line per planned image, `class/file`, its prompt and its seed."""
    jobs = synth.plan_jobs(tmp_path, "sd14", {"cat": ["p"], "dog": ["q"]}, 1, 0, ".jpg")
    synth.write_prompt_index(tmp_path, jobs)
    lines = [
        json.loads(x) for x in (tmp_path / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert lines == [
        {"file": "cat/cat_00000.jpg", "prompt": "p", "seed": _seed(0, "sd14", 0, 0)},
        {"file": "dog/dog_00000.jpg", "prompt": "q", "seed": _seed(0, "sd14", 1, 0)},
    ]


# --- generation with a stand-in pipeline ------------------------------------------------------


class _FakePipe:
    """Records each call; image k is one colour drawn from generator k, at height x width."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, **kw):
        self.calls.append((list(prompts), kw))
        images = []
        for g in kw["generator"]:
            images.append(Image.new("RGB", (kw.get("width", 8), kw.get("height", 8)), _rgb(g)))
        return SimpleNamespace(images=images)


@pytest.fixture
def fake_pipe(monkeypatch):
    pipe = _FakePipe()
    loads = []
    monkeypatch.setattr(synth, "load_pipeline", lambda *a: loads.append(a) or pipe)
    pipe.loads = loads
    return pipe


def _rgb(g: torch.Generator) -> tuple[int, ...]:
    """The stand-in pipeline's colour for an image: three draws from its generator."""
    return tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g))


def _colour(seed):
    return _rgb(torch.Generator("cpu").manual_seed(seed))


def test_generate_passes_steps_guidance_resolution_and_one_seed_per_image(fake_pipe, tmp_path):
    """Batches of batch_size, in plan order; each image drawn from its own job's seed; the
    spec's steps, guidance and native resolution; files PNG at `size` when quality is 0."""
    spec = synth.GeneratorSpec("m", steps=3, guidance=2.5, resolution=16)
    jobs = synth.plan_jobs(tmp_path, "g", {"a": ["pa"], "b": ["pb"]}, 2, 0, ".png")
    assert synth.generate(spec, jobs, 4, 3, 0, torch.float32, "cpu", "g", False) == 4
    assert [c[0] for c in fake_pipe.calls] == [["pa", "pa", "pb"], ["pb"]]
    kw = fake_pipe.calls[0][1]
    assert (kw["num_inference_steps"], kw["guidance_scale"], kw["height"], kw["width"]) == (
        3, 2.5, 16, 16,
    )  # fmt: skip
    for j in jobs:
        image = Image.open(j.path)
        assert image.format == "PNG" and image.size == (4, 4)
        assert image.getpixel((0, 0)) == _colour(j.seed)
    assert not list(tmp_path.rglob(".*.tmp"))


def test_generate_without_native_resolution_lets_the_pipeline_choose(fake_pipe, tmp_path):
    """resolution 0: no height/width passed."""
    spec = synth.GeneratorSpec("m", steps=1, guidance=0.0, resolution=0)
    jobs = synth.plan_jobs(tmp_path, "g", {"a": ["pa"]}, 1, 0, ".png")
    synth.generate(spec, jobs, 4, 1, 0, torch.float32, "cpu", "g", False)
    assert "height" not in fake_pipe.calls[0][1] and "width" not in fake_pipe.calls[0][1]


def test_generate_makes_only_missing_files_and_loads_nothing_when_done(fake_pipe, tmp_path):
    """Resume: existing files are kept as they are; a complete folder never loads the model."""
    spec = synth.GeneratorSpec("m", steps=1, guidance=0.0, resolution=8)
    jobs = synth.plan_jobs(tmp_path, "g", {"a": ["pa"]}, 3, 0, ".png")
    jobs[1].path.parent.mkdir(parents=True)
    jobs[1].path.write_bytes(b"kept")
    assert synth.generate(spec, jobs, 4, 8, 0, torch.float32, "cpu", "g", False) == 2
    assert jobs[1].path.read_bytes() == b"kept" and len(fake_pipe.calls[0][0]) == 2
    assert synth.generate(spec, jobs, 4, 8, 0, torch.float32, "cpu", "g", False) == 0
    assert len(fake_pipe.loads) == 1


# --- stored bytes: size, filter, encoding ------------------------------------------------------


def _noise(size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(
        mode
    )


def test_stored_bytes_are_a_lanczos_resize_to_a_square():
    """PNG (quality 0) is lossless: the pixels are exactly PIL's LANCZOS resize to size x size."""
    image = _noise()
    stored = Image.open(io.BytesIO(synth.to_stored_bytes(image, 12, 0)))
    want = image.resize((12, 12), Image.Resampling.LANCZOS)
    assert stored.format == "PNG" and stored.size == (12, 12)
    assert np.array_equal(np.asarray(stored), np.asarray(want))


def test_stored_bytes_use_the_jpeg_quality_asked():
    """A JPEG at the given quality: the same bytes as PIL's encoder at that quality."""
    image = _noise().resize((16, 16), Image.Resampling.LANCZOS)
    for q in (30, 95):
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=q)
        assert synth.to_stored_bytes(_noise(), 16, q) == buf.getvalue()


def test_stored_bytes_of_an_rgba_or_grayscale_image_are_rgb():
    """Pipelines may return RGBA or L: stored as 3-channel RGB."""
    for mode in ("RGBA", "L"):
        stored = Image.open(io.BytesIO(synth.to_stored_bytes(_noise(mode=mode), 8, 75)))
        assert stored.mode == "RGB"


# --- generators by name ------------------------------------------------------------------------


def test_resolve_generators_swaps_only_the_named_models():
    """A --generator-model replaces that generator's weights; the others keep their Hub ids."""
    specs = synth.resolve_generators(["sd14", "glide"], {"glide": "/local/ldm"})
    assert specs["glide"].model == "/local/ldm" and specs["glide"].steps == 50
    assert specs["sd14"].model == "CompVis/stable-diffusion-v1-4"
    with pytest.raises(ValueError, match=r"--generator-model: \['glide'\] are not among"):
        synth.resolve_generators(["sd14"], {"glide": "x"})


def test_generator_specs_are_the_papers_settings():
    """Hub ids, steps, guidance and native sizes of the three generators (docs/method.md section 1)."""
    g = synth.GENERATORS
    assert (g["sd14"].model, g["sd14"].steps, g["sd14"].guidance, g["sd14"].resolution) == (
        "CompVis/stable-diffusion-v1-4", 50, 7.5, 512,
    )  # fmt: skip
    assert (g["glide"].model, g["glide"].steps, g["glide"].resolution) == (
        "CompVis/ldm-text2im-large-256", 50, 256,
    )  # fmt: skip
    lightning = g["sdxl_lightning"]
    assert (lightning.model, lightning.steps, lightning.guidance, lightning.resolution) == (
        "stabilityai/stable-diffusion-xl-base-1.0", 4, 0.0, 1024,
    )  # fmt: skip
    assert lightning.unet == "ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors"


def test_a_load_failure_names_the_model_with_the_first_line_cut_at_a_word():
    """One ModelLoadError: the error's first line only, cut to 200 characters at a space."""
    long = "word " * 60

    def fail():
        raise OSError(long + "\nsecond line")

    with pytest.raises(synth.ModelLoadError) as e:
        synth._loaded("generator model X", fail, "--generator-model GEN=FOLDER")
    first = ("word " * 40)[:200].rsplit(" ", 1)[0] + " ..."
    assert str(e.value) == (
        f"generator model X: cannot load (OSError: {first}); offline, download it where the Hub "
        "is reachable and pass --generator-model GEN=FOLDER"
    )


# --- the stored benchmark, its summary and card -------------------------------------------------


def _split(labels, gens):
    feats = datasets.Features(
        {
            "label": datasets.ClassLabel(names=["cat", "dog"]),
            "generator": datasets.Value("string"),
            "is_synthetic": datasets.Value("bool"),
        }
    )
    return datasets.Dataset.from_dict(
        {"label": labels, "generator": gens, "is_synthetic": [g != "real" for g in gens]}, feats
    )


def _dd():
    return datasets.DatasetDict(
        {
            "labeled": _split([0, 1], ["real"] * 2),
            "unlabeled": _split([0, 0, 0, 1, 1], ["real", "b", "a", "a", "real"]),
            "test": _split([1, 1, 0], ["real"] * 3),
        }
    )


def _meta(**kw):
    return {
        "real": "cifar10", "labels_per_class": 1, "replace_ratio": 0.4, "unlabeled_per_class": 3,
        "seed": 5, "command": ["rsmatch-build-benchmark", "--real", "cifar10"],
        "synthetic": {"a": "/x/a", "b": "sd"}, "skipped_corrupt": {"real/train": ["p"], "b": ["q", "r"]},
        **kw,
    }  # fmt: skip


def test_summary_counts_per_split_class_and_generator():
    """Totals, per-class by ClassLabel name and per-generator (sorted) counts."""
    s = store.summary(_dd())
    assert s["unlabeled"] == {
        "total": 5,
        "per_class": {"cat": 3, "dog": 2},
        "per_generator": {"a": 2, "b": 1, "real": 2},
    }
    assert s["test"]["per_class"] == {"cat": 1, "dog": 2} and s["labeled"]["total"] == 2


def test_card_states_the_numbers_of_the_benchmark():
    """The table rows, generator counts, sources, cap, seed and the skipped count (3 images)."""
    text = str(card.dataset_card(_dd(), _meta()))
    assert "| split | total | cat | dog |" in text
    assert "| labeled | 2 | 1 | 1 |\n| unlabeled | 5 | 3 | 2 |\n| test | 3 | 1 | 2 |" in text
    assert "Unlabeled images per generator: a: 2, b: 1, real: 2" in text
    assert "Synthetic sources: `a` (/x/a), `b` (sd)" in text
    assert "r = 0.4 of each class's unlabeled pool (capped at 3 per class); split seed 5." in text
    assert "Unreadable images skipped: 3." in text
    assert "rsmatch-build-benchmark --real cifar10" in text
    assert "size_categories: n<1K" in text and "- image-classification" in text
    assert "tags:\n- rs-ssl\n- synthetic-data" in text
    uncapped = str(card.dataset_card(_dd(), _meta(unlabeled_per_class=None, synthetic={})))
    assert "capped" not in uncapped and "No synthetic sources." in uncapped


@pytest.mark.parametrize(
    "n, label",
    [(999, "n<1K"), (1000, "1K<n<10K"), (9_999, "1K<n<10K"), (10_000, "10K<n<100K"),
     (100_000, "100K<n<1M"), (999_999, "100K<n<1M"), (1_000_000, "1M<n<10M"),
     (50_000_000, "10M<n<100M"), (10**12 - 1, "100B<n<1T"), (10**12, "n>1T")],
)  # fmt: skip
def test_size_category_buckets(n, label):
    """The Hub's size buckets at their edges (a million rows was 'n>1M', no Hub category)."""
    assert card._size_category(n) == label


def test_size_categories_are_the_ones_datasets_knows():
    """Every bucket the card can write is in datasets' own list of size categories."""
    listed = Path(datasets.__file__).parent / "utils" / "resources" / "size_categories.json"
    if not listed.is_file():
        pytest.skip("this datasets version ships no size_categories.json")
    assert [*card.SIZE_CATEGORIES, "n>1T"] == json.loads(listed.read_text(encoding="utf-8"))[
        1:
    ]  # after "unknown"


def test_save_then_load_keeps_the_meta_and_class_names(tmp_path):
    """A saved benchmark loads back with its meta, splits and ClassLabel names."""
    out = tmp_path / "b"
    store.save_benchmark(_dd(), out, {"seed": 3})
    assert json.loads((out / store.META_FILE).read_text(encoding="utf-8")) == {"seed": 3}
    dd, meta = store.load_benchmark(out)
    assert meta == {"seed": 3} and dd["unlabeled"].features["label"].names == ["cat", "dog"]
    assert dd["unlabeled"]["generator"] == ["real", "b", "a", "a", "real"]
    assert dd["unlabeled"]["is_synthetic"] == [False, True, True, True, False]


def test_load_refuses_a_folder_without_meta_or_missing(tmp_path):
    """Each refusal names the spec and what is wrong."""
    with pytest.raises(SourceError, match=r"data.benchmark='.*/nope': no such folder$"):
        store.load_benchmark(tmp_path / "nope")
    _dd().save_to_disk(str(tmp_path / "d"))
    with pytest.raises(SourceError, match=r"not a saved RS-SSL benchmark \(rsmatch_benchmark"):
        store.load_benchmark(tmp_path / "d")
    (tmp_path / "d" / store.META_FILE).write_text('{"split": ', encoding="utf-8")  # cut off
    with pytest.raises(SourceError, match=r"/d': rsmatch_benchmark.json is not valid JSON \("):
        store.load_benchmark(tmp_path / "d")


def test_hub_meta_revision_only_from_a_snapshot_folder(tmp_path, monkeypatch):
    """The commit is the snapshot folder's name; a file elsewhere gives no revision, and
    load_benchmark then records no hub_revision and asks for the latest data."""
    snap = tmp_path / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / store.META_FILE).write_text('{"seed": 1}', encoding="utf-8")
    (tmp_path / store.META_FILE).write_text('{"seed": 2}', encoding="utf-8")
    where = {"file": snap / store.META_FILE}
    asked = []
    monkeypatch.setattr(
        "huggingface_hub.hf_hub_download",
        lambda repo, f, repo_type=None: asked.append((repo, f, repo_type)) or str(where["file"]),
    )
    assert store._hub_meta("me/b", "n") == ({"seed": 1}, "abc123")
    assert asked == [("me/b", "rsmatch_benchmark.json", "dataset")]
    where["file"] = tmp_path / store.META_FILE
    assert store._hub_meta("me/b", "n") == ({"seed": 2}, None)
    revisions = []
    monkeypatch.setattr(
        store,
        "load_hub_layout",
        lambda spec, name, revision=None: revisions.append(revision) or _dd(),
    )
    _, meta = store.load_benchmark("me/b")
    assert meta == {"seed": 2} and revisions == [None]


# --- rsmatch-push ------------------------------------------------------------------------------


def _run(root: Path, dirty=False, split=None) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "model" / "model.safetensors").write_bytes(b"w")
    (root / "model" / "config.json").write_text('{"backbone": "wrn28_2"}', encoding="utf-8")
    (root / "metrics.json").write_text(
        '{"algorithm": "fixmatch", "test_acc": 0.123456, "step": 7}', encoding="utf-8"
    )
    # run.json as written: the split's seed in its metadata ("seed"), or the record's own
    record = {"seed": 3, "split_seed": 9, "git": {"commit": "0123456789abcdef", "dirty": dirty}}
    record["split"] = split or {"real": "cifar10", "labels_per_class": 4}
    (root / "run.json").write_text(json.dumps(record), encoding="utf-8")
    (root / "config.yaml").write_text("x: 1\n", encoding="utf-8")
    (root / "evals.jsonl").write_text("{}\n", encoding="utf-8")
    return root


def test_model_card_numbers_and_provenance(tmp_path):
    """Title from the repo name, metrics to 4 places, seeds, commit (12 chars) and dirtiness."""
    text = hub.model_card(_run(tmp_path / "r", dirty=True), "me/my-model")
    assert "\n# my-model\n" in text and "- fixmatch\n" in text
    assert "| test_acc | 0.1235 |" in text and "| step | 7 |" in text
    assert "split seed 9; training seed 3; 1 process(es); git 0123456789ab (dirty)." in text
    assert "4 labels per class" in text and "model = load_classifier('me/my-model')" in text
    clean = hub.model_card(_run(tmp_path / "c", split={"seed": 2}), "me/m")
    assert "split seed 2;" in clean and "(dirty)" not in clean and "real `?`" in clean


def test_stage_names_every_missing_file(tmp_path):
    """A run missing files: all of them named, nothing staged."""
    run = _run(tmp_path / "r")
    (run / "metrics.json").unlink()
    (run / "model" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing model/config.json, metrics.json\)$"):
        hub.stage(run, "me/m", run / "hub")
    assert not (run / "hub").exists()


def test_push_uploads_the_staged_folder_to_the_repo(tmp_path, monkeypatch):
    """create_repo(exist_ok, private as asked) then upload_folder of the staged folder."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo, **kw: calls.append((repo, kw))
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "upload_folder",
        lambda self, **kw: calls.append(kw) or SimpleNamespace(commit_url="u"),
    )
    assert hub.push(tmp_path, "me/m", private=False) == "u"
    assert calls == [
        ("me/m", {"private": False, "exist_ok": True}),
        {"folder_path": str(tmp_path), "repo_id": "me/m", "commit_message": "rsmatch run"},
    ]


def test_data_folder_kind_needs_the_benchmark_meta_or_both_filter_outputs(tmp_path):
    """A filter output is scores.parquet AND dataset/; one of them alone is no data folder."""
    assert hub.data_folder_kind(tmp_path) is None
    (tmp_path / "scores.parquet").write_bytes(b"")
    assert hub.data_folder_kind(tmp_path) is None
    (tmp_path / "dataset").mkdir()
    assert hub.data_folder_kind(tmp_path) == "filter"
    (tmp_path / store.META_FILE).write_text("{}", encoding="utf-8")
    assert hub.data_folder_kind(tmp_path) == "benchmark"


@pytest.mark.parametrize("flag", ["--detector", "--stage-only"])
def test_run_only_flags_are_refused_for_a_data_folder(tmp_path, capsys, flag):
    """--detector / --stage-only on a benchmark: exit 2, one line naming the flag."""
    (tmp_path / store.META_FILE).write_text("{}", encoding="utf-8")
    assert hub.main([str(tmp_path), "me/b", flag]) == 2
    assert capsys.readouterr().err == (
        f"rsmatch-push: error: {flag}: for run folders; {tmp_path} is a benchmark output\n"
    )


def test_an_unreadable_benchmark_is_a_usage_error_not_a_push_failure(tmp_path, capsys):
    """A benchmark folder whose data is missing: exit 2 naming it, before any push."""
    (tmp_path / store.META_FILE).write_text("{}", encoding="utf-8")
    assert hub.main([str(tmp_path), "me/b"]) == 2
    assert "rsmatch-push: error: data.benchmark=" in capsys.readouterr().err


def test_detector_push_stages_the_detector_and_the_record(tmp_path, monkeypatch):
    """--detector: RUN/hub-detector holds detector/ and the record files, then is uploaded."""
    run = _run(tmp_path / "r")
    (run / "detector").mkdir()
    (run / "detector" / "model.safetensors").write_bytes(b"d")
    pushed = []
    monkeypatch.setattr(
        hub, "push", lambda folder, repo, private: pushed.append((folder, repo, private)) or "u"
    )
    assert hub.main([str(run), "me/det", "--detector"]) == 0
    assert pushed == [(run / "hub-detector", "me/det", False)]
    names = sorted(p.name for p in (run / "hub-detector").iterdir())
    assert names == sorted(["model.safetensors", *hub.RECORD_FILES])


class _FakeDiffusion:
    """A loaded pipeline stand-in: a UNet that records its weights, a real Euler config."""

    def __init__(self):
        from diffusers import EulerDiscreteScheduler

        self.unet = SimpleNamespace(load_state_dict=lambda sd: self.loaded.append(sd))
        self.scheduler = EulerDiscreteScheduler()
        self.loaded, self.progress, self.device = [], None, None

    def set_progress_bar_config(self, **kw):
        self.progress = kw

    def to(self, device):
        self.device = device
        return self


def test_lightning_pipeline_swaps_in_a_local_unet_and_the_trailing_scheduler(tmp_path, monkeypatch):
    """sdxl_lightning: the base model at the dtype asked, the UNet file loaded (a local file is
    never fetched), Euler with trailing timesteps, progress bar off, moved to the device."""
    import diffusers
    import huggingface_hub
    from safetensors.torch import save_file

    unet = tmp_path / "unet.safetensors"
    save_file({"w": torch.ones(2)}, str(unet))
    pipe, asked = _FakeDiffusion(), []
    monkeypatch.setattr(
        diffusers.DiffusionPipeline,
        "from_pretrained",
        staticmethod(lambda model, **kw: asked.append((model, kw)) or pipe),
    )
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: 1 / 0)
    spec = synth.replace(synth.GENERATORS["sdxl_lightning"], unet=str(unet))
    assert synth.load_pipeline(spec, torch.float16, "cpu") is pipe
    assert asked == [("stabilityai/stable-diffusion-xl-base-1.0", {"dtype": torch.float16})]
    assert [sorted(sd) for sd in pipe.loaded] == [["w"]]
    assert isinstance(pipe.scheduler, diffusers.EulerDiscreteScheduler)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.progress == {"disable": True} and pipe.device == "cpu"


def test_lightning_unet_from_the_hub_is_repo_and_file(monkeypatch):
    """'owner/repo/file' is fetched as hf_hub_download('owner/repo', 'file')."""
    import diffusers
    import huggingface_hub

    pipe, fetched = _FakeDiffusion(), []
    monkeypatch.setattr(
        diffusers.DiffusionPipeline, "from_pretrained", staticmethod(lambda model, **kw: pipe)
    )
    monkeypatch.setattr(
        huggingface_hub, "hf_hub_download", lambda repo, f: fetched.append((repo, f)) or "x"
    )
    monkeypatch.setattr("safetensors.torch.load_file", lambda path: {"from": path})
    synth.load_pipeline(synth.GENERATORS["sdxl_lightning"], torch.float32, "cpu")
    assert fetched == [("ByteDance/SDXL-Lightning", "sdxl_lightning_4step_unet.safetensors")]
    assert pipe.loaded == [{"from": "x"}]
    nested = synth.replace(synth.GENERATORS["sdxl_lightning"], unet="o/r/sub/u.safetensors")
    synth.load_pipeline(nested, torch.float32, "cpu")  # a file in a folder of the repo
    assert fetched[1] == ("o/r", "sub/u.safetensors")
