"""Build an RS-SSL benchmark folder from a real source and synthetic ones, imported or generated.

`build(options)` runs the steps below in order. Everything that can be checked is checked
before any work, the cheap checks first: options, then the sources' layout and images per class
(files are listed, not read), then one decoding pass that lists every unreadable image. The
output folder appears only once complete.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np

from rsmatch.atomic import write_folder
from rsmatch.benchmark import synth
from rsmatch.benchmark.card import dataset_card
from rsmatch.benchmark.errors import BuildError
from rsmatch.benchmark.integrity import check_readable
from rsmatch.benchmark.options import BuildOptions, GeneratorSpec
from rsmatch.benchmark.preview import preview
from rsmatch.benchmark.push import push_benchmark
from rsmatch.benchmark.sources import (
    RealIndex,
    RealSource,
    SourceIndex,
    image_bytes,
    image_files,
    index_cifake_folder,
    index_class_folder,
    index_real,
    index_synthetic,
    is_repo_id,
    missing_folder,
    read_class_folder,
)
from rsmatch.benchmark.split import (
    CONFIG_KEYS,
    REAL,
    SplitSpec,
    build_split,
    check_counts,
    required_per_generator,
)
from rsmatch.benchmark.store import save_benchmark
from rsmatch.cli import name_value_pairs
from rsmatch.hub import repo_id_problem
from rsmatch.runfolder import unwritable

if TYPE_CHECKING:
    from accelerate import PartialState


@dataclass
class Plan:
    """The options resolved: imported folders and generators by name, and the split."""

    out: Path
    imports: dict[str, str]  # name -> "[cifake:]FOLDER"
    generators: dict[str, GeneratorSpec]
    split: SplitSpec

    @property
    def names(self) -> list[str]:
        return sorted([*self.imports, *self.generators])


GENERATE_NEEDS = ("diffusers", "transformers")  # the pipelines and the prompt model


def _flag(name: str) -> str:
    """An option's command-line flag: labels_per_class -> --labels-per-class."""
    return "--" + name.replace("_", "-")


# The split's settings as this tool's flags, for `check_counts`' errors
FLAGS = {name: _flag(name) for name in CONFIG_KEYS}


def _check_ranges(opts: BuildOptions) -> None:
    """Each number's range, named by its flag (argparse checks only that it is a number)."""
    ranges = {"labels_per_class": (1, None), "unlabeled_per_class": (1, None),
              "images_per_class": (0, None), "prompts_per_class": (1, None),
              "batch_size": (1, None), "resolution": (0, None), "jpeg_quality": (-1, 100),
              "seed": (0, 2**32 - 1), "replace_ratio": (0, 1)}  # fmt: skip
    for name, (low, high) in ranges.items():
        value, flag = getattr(opts, name), _flag(name)
        if value is None and name == "unlabeled_per_class":  # None: every remaining image
            continue
        number = (int, float) if name == "replace_ratio" else int  # --config skips argparse's types
        if not isinstance(value, number) or isinstance(value, bool):
            kind = "a number" if name == "replace_ratio" else "an integer"
            raise BuildError(f"{flag}={value!r}: must be {kind}")
        if not (low <= value and (high is None or value <= high)):  # NaN fails too
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise BuildError(f"{flag}={value}: must be {bound}")


def plan(opts: BuildOptions) -> Plan:
    """Check the options alone (nothing is read yet)."""
    for flag in ("real", "out"):
        if getattr(opts, flag) is None:
            raise BuildError(f"--{flag} is required")
    _check_ranges(opts)
    if opts.push_to_hub and (problem := repo_id_problem(opts.push_to_hub)):
        raise BuildError(f"--push-to-hub {opts.push_to_hub!r}: {problem}")
    if opts.out.exists():
        raise BuildError(f"--out {opts.out}: exists already (choose a new folder)")
    if problem := unwritable(opts.out):
        raise BuildError(f"--out {opts.out}: {problem}")
    if opts.images_per_class and not opts.generate:  # it would be silently unused
        raise BuildError(f"--images-per-class={opts.images_per_class}: only with --generate")
    imports = name_value_pairs(opts.synthetic, "--synthetic", BuildError)
    clash = sorted(set(imports) & set(opts.generate))
    if clash:
        raise BuildError(f"--synthetic and --generate both name {clash}")
    if REAL in imports:
        raise BuildError(f"--synthetic: the name {REAL!r} is reserved for real images")
    try:
        generators = synth.resolve_generators(
            opts.generate, name_value_pairs(opts.generator_model, "--generator-model", BuildError)
        )
    except ValueError as e:
        raise BuildError(str(e)) from None
    missing = [m for m in GENERATE_NEEDS if generators and importlib.util.find_spec(m) is None]
    if missing:  # before any image is read, not after the prompt model loads
        raise BuildError(f"--generate: {', '.join(missing)} not installed (the generate extra: "
                         "pip install -e '.[generate]' in the repository)")  # fmt: skip
    if opts.lightning_unet and "sdxl_lightning" in generators:
        generators["sdxl_lightning"] = replace(
            generators["sdxl_lightning"], unet=opts.lightning_unet
        )
    given = name_value_pairs(opts.generator_model, "--generator-model", BuildError)
    models = {f"--generator-model {g}={m}": m for g, m in given.items()}
    if generators and opts.prompts == "t5":
        models[f"--prompt-model {opts.prompt_model}"] = opts.prompt_model
    for flag, model in models.items():  # a local folder or a Hub id, before hours of work
        if not Path(model).exists() and not is_repo_id(model):
            raise BuildError(f"{flag}: no such folder")
    if opts.replace_ratio > 0 and not (imports or generators):
        raise BuildError(f"--replace-ratio={opts.replace_ratio} needs --synthetic or --generate")
    split = SplitSpec(
        opts.labels_per_class, opts.replace_ratio, opts.unlabeled_per_class, opts.seed
    )
    return Plan(opts.out, imports, generators, split)


def index_imports(imports: dict[str, str], class_names: list[str]) -> dict[str, SourceIndex]:
    """Each imported folder's layout and classes; its files are listed, not read."""
    out = {}
    for g, value in imports.items():
        path = Path(value.removeprefix("cifake:"))
        if not path.is_dir():
            raise BuildError(f"--synthetic {g}={path}: {missing_folder(path)}")
        if (path / "dataset_info.json").is_file():
            out[g] = index_synthetic(str(path), class_names)
        elif value.startswith("cifake:"):
            out[g] = index_cifake_folder(path, class_names)
        else:
            missing = sorted(set(class_names) - {p.name for p in path.iterdir() if p.is_dir()})
            if missing:
                raise BuildError(f"--synthetic {g}={path}: missing class folders {missing}")
            out[g] = index_class_folder(path, class_names)
    return out


def images_to_generate(
    opts: BuildOptions, p: Plan, real: RealIndex, imports: dict[str, SourceIndex],
    drop: dict[str, frozenset[int]],
) -> int:  # fmt: skip
    """Check images per class against the split (without the positions in `drop`); returns how
    many images per class each generator must make."""
    counts = real.train.counts(drop.get("real/train", frozenset()))
    synthetic = {g: i.counts(drop.get(f"synthetic/{g}", frozenset())) for g, i in imports.items()}
    need = required_per_generator(counts, p.split, p.names)
    for g, have in synthetic.items():
        if have.min() < need[g]:
            c = int(have.argmin())
            raise BuildError(
                f"--synthetic {g}: {have[c]} images of class {real.class_names[c]!r}, "
                f"the ratio needs {need[g]}"
            )
    per_class = opts.images_per_class or max([need[g] for g in p.generators], default=0)
    short = [g for g in p.generators if per_class < need[g]]
    if short:
        raise BuildError(
            f"--images-per-class={per_class}: the ratio needs {max(need[g] for g in short)} per class"
        )
    planned = dict.fromkeys(p.generators, np.full(len(real.class_names), per_class))
    check_counts(counts, real.class_names, {**synthetic, **planned}, p.split, FLAGS)
    return per_class


def _is_jpeg(real: RealSource) -> bool:
    first = real.train.cast_column("image", datasets.Image(decode=False))[0]["image"]
    return image_bytes(first)[:2] == b"\xff\xd8"


def process_state() -> PartialState:
    """Accelerate's view of the launched processes. On CPUs it needs `cpu=True`, without which
    each launched process thinks it is alone, and every one would generate and write it all."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.accelerator.is_available())  # MPS, XPU: not the CPU


RECIPE_FILE = "generator.json"  # how a generated folder's images were made


def check_recipe(folder: Path, recipe: dict) -> None:
    """A generated folder resumes only with the recipe that began it: any other model, size,
    format, seed or prompts would leave a mix of images that no record describes. A recipe
    whose run made no image (its model failed to load) binds nothing."""
    made = folder / RECIPE_FILE
    if not folder.is_dir() or not image_files(folder):
        return
    if not made.is_file():  # made before recipes were recorded
        print(f"{folder}: no {RECIPE_FILE} (an older build); resuming it as this build's recipe",
              file=sys.stderr)  # fmt: skip
        return
    try:
        before = json.loads(made.read_text(encoding="utf-8"))
    except ValueError:
        raise BuildError(f"{made}: unreadable; remove it if the images are this build's") from None
    changed = [k for k in sorted(before.keys() | recipe.keys()) if before.get(k) != recipe.get(k)]
    if changed:
        k = changed[0]
        raise BuildError(
            f"{folder}: its images were made with {k}={before.get(k)!r}, this build asks "
            f"{k}={recipe.get(k)!r}; choose another --export-synthetic, or remove the folder"
        )


def generate_missing(
    opts: BuildOptions, p: Plan, real: RealSource, per_class: int, state: PartialState
) -> dict[str, datasets.Dataset] | None:
    """Generate into resumable class folders, split across processes; None on non-main ranks."""
    import torch

    size = int(real.train[0]["image"].size[0])
    quality = opts.jpeg_quality if opts.jpeg_quality >= 0 else (75 if _is_jpeg(real) else 0)
    root = opts.export_synthetic or p.out.with_name(p.out.name + ".synthetic")
    names = real.class_names
    t5 = opts.prompts == "t5"
    specs = {g: replace(s, resolution=opts.resolution or s.resolution)
             for g, s in sorted(p.generators.items())}  # fmt: skip
    recipes = {g: {**s.__dict__, "size": size, "jpeg_quality": quality, "seed": opts.seed,
                   "prompts": opts.prompts, "prompt_model": opts.prompt_model if t5 else None,
                   "prompts_per_class": opts.prompts_per_class if t5 else None}
               for g, s in specs.items()}  # fmt: skip
    for g, recipe in recipes.items():  # every rank, before prompts or any image
        check_recipe(root / g, recipe)
    if t5:
        prompts = synth.t5_prompts(names, opts.prompts_per_class, opts.prompt_model, opts.seed)
    else:
        prompts = synth.template_prompts(names, 1)
    dtype = getattr(torch, opts.dtype) if state.device.type != "cpu" else torch.float32
    out = {}
    for g, spec in specs.items():
        state.wait_for_everyone()
        if state.is_main_process:
            (root / g).mkdir(parents=True, exist_ok=True)
            (root / g / RECIPE_FILE).write_text(
                json.dumps(recipes[g], indent=1) + "\n", encoding="utf-8"
            )
        jobs = synth.plan_jobs(
            root / g, g, prompts, per_class, opts.seed, ".jpg" if quality else ".png"
        )
        try:
            with state.split_between_processes(jobs) as mine:
                synth.generate(spec, mine, size, opts.batch_size, quality, dtype, opts.device or str(state.device),
                               desc=f"{g} [{state.process_index}]", show_progress=state.is_local_main_process)  # fmt: skip
        except synth.ModelLoadError:
            if state.is_main_process:
                _drop_if_imageless(root, g)
            raise
        state.wait_for_everyone()
        if state.is_main_process:
            synth.write_prompt_index(root / g, jobs)
        state.wait_for_everyone()
        out[g] = read_class_folder(root / g, names, only={j.path for j in jobs})
    return out if state.is_main_process else None


def _drop_if_imageless(root: Path, g: str) -> None:
    """A generator whose model failed to load leaves no folder behind (its recipe alone),
    nor the export root if nothing else is in it; a folder that holds images is kept."""
    folder = root / g
    if folder.is_dir() and not image_files(folder):
        shutil.rmtree(folder)
        with contextlib.suppress(OSError):  # not empty: other generators' folders
            root.rmdir()


def write(out: Path, dd: datasets.DatasetDict, meta: dict) -> None:
    """Data, metadata, card and preview, written whole or not at all, Ctrl-C included
    (`atomic.write_folder`)."""

    def fill(tmp: Path) -> None:
        save_benchmark(dd, tmp, meta)
        dataset_card(dd, meta).save(tmp / "README.md")
        preview(dd, tmp / "preview.png")

    write_folder(out, fill)


def load_sources(
    real: RealIndex, imports: dict[str, SourceIndex], drop: dict[str, frozenset[int]]
) -> tuple[RealSource, dict[str, datasets.Dataset]]:
    """Read the image bytes, without the positions in `drop` (unreadable images skipped)."""
    train, test = (
        getattr(real, s).load(drop.get(f"real/{s}", frozenset())) for s in ("train", "test")
    )
    synthetic = {g: i.load(drop.get(f"synthetic/{g}", frozenset())) for g, i in imports.items()}
    return RealSource(train, test, real.class_names), synthetic


def metadata(opts: BuildOptions, p: Plan, skipped: dict[str, list[str]]) -> dict:
    """`rsmatch_benchmark.json`: the sources, the split and the exact command."""
    return {
        "real": opts.real,
        "synthetic": {
            **{g: str(Path(v.removeprefix("cifake:"))) for g, v in p.imports.items()},
            **{g: s.model for g, s in p.generators.items()},
        },
        **p.split.__dict__,
        "prompts": opts.prompts if p.generators else None,
        "skipped_corrupt": skipped,
        "command": opts.command,
    }


def build(opts: BuildOptions) -> dict[str, int] | None:
    """Build the benchmark; returns its split sizes (None on the other ranks of a launch)."""
    datasets.disable_progress_bars()
    p = plan(opts)
    state = process_state()
    try:
        return _build(opts, p, state)
    finally:  # a launched CPU build's gloo group, whose threads must not outlive Python
        state.destroy_process_group()


def _build(opts: BuildOptions, p: Plan, state: PartialState) -> dict[str, int] | None:
    if not p.generators and not state.is_main_process:
        return None  # generation is split across processes; importing and writing are not
    real = index_real(opts.real, key="--real")
    imports = index_imports(p.imports, real.class_names)
    per_class = images_to_generate(opts, p, real, imports, {})  # before any image is read
    indexes = {"real/train": real.train, "real/test": real.test}
    indexes |= {f"synthetic/{g}": index for g, index in imports.items()}
    found = check_readable(
        indexes, drop=opts.skip_corrupt, hint=" (pass --skip-corrupt to drop them)"
    )
    drop = {name: bad.positions for name, bad in found.items() if bad.names}
    if drop:  # the counts again, without the dropped images
        per_class = images_to_generate(opts, p, real, imports, drop)
    loaded, synthetic = load_sources(real, imports, drop)
    if p.generators:
        generated = generate_missing(opts, p, loaded, per_class, state)
        if generated is None:
            return None
        synthetic |= generated
    dd = build_split(loaded, synthetic, p.split)
    write(p.out, dd, metadata(opts, p, {name: found[name].names for name in drop}))
    if opts.push_to_hub:
        push_benchmark(p.out, dd, opts.push_to_hub, opts.private)
    return {split: len(dd[split]) for split in dd}
