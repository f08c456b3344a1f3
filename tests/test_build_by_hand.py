"""The benchmark builder pinned by hand: the unreadable-image listing and the options refused
before any work, the generation plan and the recorded metadata (found by a mutation audit)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from rsmatch.benchmark import build
from rsmatch.benchmark.integrity import check_readable, decode_bytes, unreadable
from rsmatch.benchmark.sources import SourceError, index_real
from rsmatch.benchmark.split import SplitSpec
from rsmatch.benchmark.store import load_benchmark
from rsmatch.cli import build_benchmark as bb

from .conftest import png_bytes, write_class_folder

# --- integrity: the unreadable-image listing -------------------------------------------------


class _Listed:
    """A stand-in index: `raw()` is all that the integrity check reads."""

    def __init__(self, items: list[tuple[str, bytes]]) -> None:
        self.items = items

    def raw(self):
        return iter(self.items)


def test_decode_bytes_gives_three_channels_for_a_grayscale_image():
    """Training's decoder always yields RGB uint8 [3, H, W], whatever the file's mode."""
    image = decode_bytes(png_bytes((2, 4), 0, "L"))
    assert image.shape == (3, 2, 4) and image.dtype == torch.uint8


def test_unreadable_positions_are_the_rows_of_the_bad_images():
    """Positions index the source's rows exactly (they are skipped on load)."""
    good = png_bytes((2, 4), 0)
    index = _Listed([("a", good), ("b", b"junk"), ("c", good), ("d", b"")])
    bad = unreadable(index)
    assert bad.positions == frozenset({1, 3}) and bad.names == ["b", "d"]


def test_listing_names_the_first_20_and_counts_the_rest():
    """23 bad images: the first 20 by name, in order, then 'and 3 more'."""
    names = [f"img{i:02d}" for i in range(23)]
    index = _Listed([(n, b"junk") for n in names])
    with pytest.raises(SourceError) as e:
        check_readable({"real/train": index}, hint=" (hint)")
    assert str(e.value) == "23 unreadable image(s) (hint): " + ", ".join(names[:20]) + " and 3 more"


# --- build: options refused before any work --------------------------------------------------


def _opts(sources, tmp_path, **kw) -> build.BuildOptions:
    base = {"real": str(sources["real"]), "out": tmp_path / "out", "replace_ratio": 0.0}
    return build.BuildOptions(**{**base, **kw})


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"prompts_per_class": 0}, "--prompts-per-class=0: must be >= 1"),
        ({"batch_size": 0}, "--batch-size=0: must be >= 1"),
        ({"resolution": -8}, "--resolution=-8: must be >= 0"),
        ({"images_per_class": -1}, "--images-per-class=-1: must be >= 0"),
        ({"jpeg_quality": 101}, "--jpeg-quality=101: must be in [-1, 100]"),
        ({"seed": 2**32}, "--seed=4294967296: must be in [0, 4294967295]"),
        ({"labels_per_class": True}, "--labels-per-class=True: must be an integer"),
        ({"replace_ratio": True}, "--replace-ratio=True: must be a number"),
        ({"synthetic": ["a=x", "a=y"]}, "--synthetic: 'a' given twice"),
        ({"synthetic": ["a="]}, "--synthetic 'a=': expected NAME=VALUE"),
        ({"synthetic": ["sd14=x"], "generate": ["sd14"]}, "--synthetic and --generate both name ['sd14']"),
    ],
)  # fmt: skip
def test_plan_refuses_bad_options_by_flag(sources, tmp_path, kw, message):
    """Each range bound, bools as numbers, and the NAME=VALUE pairs, named by their flag."""
    with pytest.raises(build.BuildError) as e:
        build.plan(_opts(sources, tmp_path, **kw))
    assert str(e.value) == message


def test_generation_without_its_extra_is_refused_before_any_work(sources, tmp_path, monkeypatch):
    """Without diffusers the builder used to fail with a traceback after loading the prompt
    model, leaving the export folder behind."""
    real_find_spec = build.importlib.util.find_spec
    monkeypatch.setattr(build.importlib.util, "find_spec",
                        lambda name: None if name == "diffusers" else real_find_spec(name))  # fmt: skip
    with pytest.raises(build.BuildError) as e:
        build.plan(_opts(sources, tmp_path, replace_ratio=0.5, generate=["sd14"]))
    assert str(e.value) == ("--generate: diffusers not installed (the generate extra: "
                            "pip install -e '.[generate]' in the repository)")  # fmt: skip
    build.plan(_opts(sources, tmp_path, replace_ratio=0.5, synthetic=[f"g={sources['real']}"]))


def test_plan_accepts_the_range_bounds(sources, tmp_path):
    """The inclusive ends: JPEG quality 100 and seed 2**32 - 1 are valid."""
    p = build.plan(_opts(sources, tmp_path, jpeg_quality=100, seed=2**32 - 1))
    assert p.split.seed == 2**32 - 1


def test_plan_carries_the_seed_and_the_lightning_unet(sources, tmp_path):
    """--seed reaches the split, --lightning-unet the sdxl_lightning generator."""
    p = build.plan(_opts(sources, tmp_path, seed=7, replace_ratio=0.5, generate=["sdxl_lightning"],
                         lightning_unet="/models/unet.safetensors"))  # fmt: skip
    assert p.split == SplitSpec(25, 0.5, None, 7)
    assert p.generators["sdxl_lightning"].unet == "/models/unet.safetensors"


def test_images_to_generate_is_the_largest_generator_share(sources, tmp_path):
    """10 unlabeled per class at r = 0.5: 5 replaced, shared 3 + 2 by two generators: each
    generator makes 3 per class (the larger share)."""
    opts = _opts(sources, tmp_path, labels_per_class=4, unlabeled_per_class=10, replace_ratio=0.5,
                 generate=["sd14", "sdxl_lightning"], prompts="template")  # fmt: skip
    p = build.plan(opts)
    real = index_real(str(sources["real"]))
    assert build.images_to_generate(opts, p, real, {}, {}) == 3


def test_dropped_real_images_are_left_out_of_the_counts(sources, tmp_path):
    """30 real cats; one dropped as unreadable leaves 29, too few for 29 labels plus a pool."""
    opts = _opts(sources, tmp_path, labels_per_class=29)
    p, real = build.plan(opts), index_real(str(sources["real"]))
    assert build.images_to_generate(opts, p, real, {}, {}) == 0  # 29 + 1: enough
    cat = int(np.flatnonzero(real.train.labels == 0)[0])
    with pytest.raises(SourceError, match="--labels-per-class=29: class 'cat' has only 29 images"):
        build.images_to_generate(opts, p, real, {}, {"real/train": frozenset({cat})})


def test_short_synthetic_folder_names_its_smallest_class(sources, tmp_path, capsys):
    """The error names the class with the fewest images, not the first class."""
    gen = write_class_folder(tmp_path / "gen", 12, seed=4, synthetic=True)
    for f in sorted((gen / "dog").iterdir())[5:]:
        f.unlink()
    argv = ["--real", str(sources["real"]), "--synthetic", f"g={gen}", "--labels-per-class", "4",
            "--unlabeled-per-class", "12", "--replace-ratio", "1", "--out", str(tmp_path / "o")]  # fmt: skip
    assert bb.main(argv) == 2
    assert capsys.readouterr().err.endswith(
        "--synthetic g: 5 images of class 'dog', the ratio needs 12\n"
    )


def test_metadata_records_paths_prompts_and_command():
    """Import-only: no prompts; a cifake: prefix is not part of the path; the command verbatim."""
    opts = build.BuildOptions(real="r", synthetic=["c=cifake:/data/c"], command=["prog", "--x"])
    p = build.Plan(Path("out"), {"c": "cifake:/data/c"}, {}, SplitSpec(4, 0.5, 12, 3))
    meta = build.metadata(opts, p, {})
    assert meta["synthetic"] == {"c": "/data/c"} and meta["prompts"] is None
    assert meta["command"] == ["prog", "--x"] and meta["seed"] == 3


def test_built_benchmark_records_its_seed_and_command(sources, tmp_path):
    """An import build: rsmatch_benchmark.json has the seed, the exact command, no prompts."""
    argv = ["--real", str(sources["real"]), "--synthetic", f"a={sources['gen_a']}",
            "--labels-per-class", "4", "--unlabeled-per-class", "6", "--seed", "7",
            "--out", str(tmp_path / "b")]  # fmt: skip
    assert bb.main(argv) == 0
    _, meta = load_benchmark(tmp_path / "b")
    assert meta["seed"] == 7 and meta["prompts"] is None
    assert meta["command"] == ["rsmatch-build-benchmark", *argv]
