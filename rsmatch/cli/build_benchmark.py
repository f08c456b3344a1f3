"""Build an RS-SSL benchmark: real images with a fraction of the unlabeled pool replaced by
synthetic ones, generated with diffusers from T5 prompts or imported from folders.

    rsmatch-build-benchmark --real uoft-cs/cifar10 --generate sd14 sdxl_lightning glide \\
        --images-per-class 3500 --labels-per-class 25 --replace-ratio 0.5 --out benchmarks/c10
    rsmatch-build-benchmark --real ../cifar10 --synthetic ddpm=../synth/ddpm \\
        --synthetic cifake=cifake:../CIFAKE/train/FAKE --replace-ratio 0.3 --out benchmarks/mine

Everything that can be checked is checked before any work (unknown generators, missing
classes, too few synthetic images for the ratio, unreadable images); the output folder appears
only once complete. The trainer reads it with `data.benchmark=OUT`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import yaml

from rsmatch.benchmark import synth
from rsmatch.benchmark.sources import (
    SourceError,
    find_corrupt,
    load_real,
    load_synthetic,
    read_cifake_folder,
    read_class_folder,
)
from rsmatch.benchmark.split import (
    SplitSpec,
    build_split,
    required_per_generator,
    save_benchmark,
    summary,
)


class BuildError(ValueError):
    """Bad input, found before any work."""


class PushError(RuntimeError):
    """The benchmark was built but could not be pushed to the Hub."""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rsmatch-build-benchmark", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    ap.add_argument("--config", help="YAML file whose keys are these options' names (flags win)")
    ap.add_argument(
        "--real", help="Hub id, folder with train/ and test/ class folders, or saved DatasetDict"
    )
    ap.add_argument("--synthetic", action="append", default=[], metavar="NAME=[cifake:]FOLDER",
                    help="import a folder of generated images (one subfolder per class, or CIFAKE naming); repeatable")  # fmt: skip
    ap.add_argument(
        "--generate",
        nargs="*",
        default=[],
        metavar="GEN",
        help=f"generate with {sorted(synth.GENERATORS)}",
    )
    ap.add_argument("--generator-model", action="append", default=[], metavar="GEN=PATH_OR_ID",
                    help="use other weights for a generator (a local copy, a fine-tune)")  # fmt: skip
    ap.add_argument("--lightning-unet", default=None, metavar="REPO/FILE_OR_PATH",
                    help="SDXL-Lightning UNet weights (default ByteDance/SDXL-Lightning 4-step)")  # fmt: skip
    ap.add_argument(
        "--images-per-class",
        type=int,
        default=0,
        help="images to generate per class and generator (default: what the ratio needs)",
    )
    ap.add_argument(
        "--prompts",
        choices=["t5", "template"],
        default="t5",
        help="T5 word-to-sentence prompts or 'a photo of a {class}'",
    )
    ap.add_argument(
        "--prompt-model",
        default=synth.DEFAULT_PROMPT_MODEL,
        help="T5 checkpoint (Hub id or folder)",
    )
    ap.add_argument(
        "--prompts-per-class",
        type=int,
        default=200,
        help="distinct prompts per class (He et al.: 200)",
    )
    ap.add_argument("--batch-size", type=int, default=8, help="generation batch size")
    ap.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float16",
        help="generation dtype (float32 on CPU)",
    )
    ap.add_argument(
        "--device",
        default=None,
        help="generation device (default: this process's accelerator device)",
    )
    ap.add_argument(
        "--resolution",
        type=int,
        default=0,
        help="generate at this size instead of the model's native one",
    )
    ap.add_argument(
        "--jpeg-quality",
        type=int,
        default=-1,
        help="store synthetic images as JPEG of this quality; 0 = PNG; default: 75 if the real set is JPEG",
    )
    ap.add_argument(
        "--export-synthetic",
        type=Path,
        default=None,
        help="where generated class folders go (default OUT.synthetic); reruns resume here",
    )
    ap.add_argument("--labels-per-class", type=int, default=25)
    ap.add_argument("--unlabeled-per-class", type=int, default=None)
    ap.add_argument("--replace-ratio", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0, help="split, prompt and generation seed")
    ap.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="drop unreadable images (counted in the card) instead of failing",
    )
    ap.add_argument("--out", type=Path, help="output folder (must not exist)")
    ap.add_argument(
        "--push-to-hub",
        metavar="REPO",
        default=None,
        help="push the dataset, card and preview to this Hub dataset repo",
    )
    ap.add_argument("--private", action="store_true", help="create the Hub repo private")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    if args.config:
        values = yaml.safe_load(Path(args.config).read_text()) or {}
        known = {a.dest for a in ap._actions}
        unknown = sorted(set(k.replace("-", "_") for k in values) - known)
        if unknown:
            raise BuildError(f"--config {args.config}: unknown keys {unknown}")
        ap.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})
        args = ap.parse_args(argv)
    args.command = ["rsmatch-build-benchmark", *(sys.argv[1:] if argv is None else argv)]
    for flag in ("real", "out"):
        if getattr(args, flag) is None:
            raise BuildError(f"--{flag} is required")
    if not 0 <= args.replace_ratio <= 1:
        raise BuildError(f"--replace-ratio={args.replace_ratio}: not in [0, 1]")
    return args


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise BuildError(f"{flag} {item!r}: expected NAME=VALUE")
        if name in out:
            raise BuildError(f"{flag}: {name!r} given twice")
        out[name] = value
    return out


def _is_jpeg(real) -> bool:
    import datasets

    first = real.train.cast_column("image", datasets.Image(decode=False))[0]["image"]
    data = first["bytes"] or Path(first["path"]).read_bytes()
    return data[:2] == b"\xff\xd8"


def _check_corrupt(folders: dict[str, Path], skip: bool) -> dict[str, frozenset[Path]]:
    corrupt = {name: find_corrupt(path) for name, path in folders.items()}
    listed = [f"{p}" for paths in corrupt.values() for p in paths]
    if listed and not skip:
        raise BuildError(
            f"{len(listed)} unreadable image(s) (pass --skip-corrupt to drop them): "
            + ", ".join(listed[:20])
        )
    return {name: frozenset(paths) for name, paths in corrupt.items()}


def build(args: argparse.Namespace) -> dict[str, int] | None:
    """Build the benchmark; returns its split sizes (None on non-main generation ranks)."""
    import datasets
    import torch

    datasets.disable_progress_bars()
    from accelerate import PartialState

    out: Path = args.out
    if out.exists():
        raise BuildError(f"--out {out}: exists already (choose a new folder)")
    imports = _pairs(args.synthetic, "--synthetic")
    models = _pairs(args.generator_model, "--generator-model")
    clash = sorted(set(imports) & set(args.generate))
    if clash:
        raise BuildError(f"--synthetic and --generate both name {clash}")
    try:
        specs = synth.resolve_generators(args.generate, models)
        if args.lightning_unet and "sdxl_lightning" in specs:
            specs["sdxl_lightning"] = synth.replace(
                specs["sdxl_lightning"], unet=args.lightning_unet
            )
    except ValueError as e:
        raise BuildError(str(e)) from None
    real = load_real(args.real)
    names = real.class_names
    split = SplitSpec(
        args.labels_per_class, args.replace_ratio, args.unlabeled_per_class, args.seed
    )
    labels = np.asarray(real.train["label"])
    if args.replace_ratio > 0 and not (imports or specs):
        raise BuildError(f"--replace-ratio={args.replace_ratio} needs --synthetic or --generate")
    need = required_per_generator(labels, len(names), split, sorted([*imports, *specs]))

    # imported sources: layout, classes, readability and counts, before any generation
    folders = {g: Path(v.removeprefix("cifake:")) for g, v in imports.items()}
    saved = {g for g, p in folders.items() if (p / "dataset_info.json").is_file()}
    for g, path in folders.items():
        if not path.is_dir():
            raise BuildError(f"--synthetic {g}={path}: not a folder")
        if not imports[g].startswith("cifake:") and g not in saved:
            missing = sorted(set(names) - {p.name for p in path.iterdir() if p.is_dir()})
            if missing:
                raise BuildError(f"--synthetic {g}={path}: missing class folders {missing}")
    skipped = _check_corrupt(
        {g: p for g, p in folders.items() if g not in saved}, args.skip_corrupt
    )
    synthetic = {}
    for g, path in folders.items():
        if g in saved:
            synthetic[g] = load_synthetic(str(path), names)
        elif imports[g].startswith("cifake:"):
            synthetic[g] = read_cifake_folder(path, names, exclude=skipped[g])
        else:
            synthetic[g] = read_class_folder(path, names, exclude=skipped[g])
        have = np.bincount(np.asarray(synthetic[g]["label"]), minlength=len(names))
        if have.min() < need[g]:
            c = int(have.argmin())
            raise BuildError(
                f"--synthetic {g}: {have[c]} images of class {names[c]!r}, the ratio needs {need[g]}"
            )
    per_class = args.images_per_class or max([need[g] for g in specs], default=0)
    short = [g for g in specs if per_class < need[g]]
    if short:
        raise BuildError(
            f"--images-per-class={per_class}: the ratio needs {max(need[g] for g in short)} per class"
        )

    # generation: resumable class folders, split across processes
    if specs:
        state = PartialState()
        size = int(real.train[0]["image"].size[0])
        quality = args.jpeg_quality if args.jpeg_quality >= 0 else (75 if _is_jpeg(real) else 0)
        gen_root = args.export_synthetic or out.with_name(out.name + ".synthetic")
        if args.prompts == "t5":
            prompts = synth.t5_prompts(names, args.prompts_per_class, args.prompt_model, args.seed)
        else:
            prompts = synth.template_prompts(names, 1)
        dtype = getattr(torch, args.dtype) if state.device.type != "cpu" else torch.float32
        for i, (g, spec) in enumerate(sorted(specs.items())):
            if args.resolution:
                spec = synth.replace(spec, resolution=args.resolution)
            jobs = synth.plan_jobs(
                gen_root / g, i, prompts, per_class, args.seed, ".jpg" if quality else ".png"
            )
            with state.split_between_processes(jobs) as mine:
                synth.generate(spec, mine, size, args.batch_size, quality, dtype, args.device or str(state.device),
                               desc=f"{g} [{state.process_index}]", show_progress=state.is_local_main_process)  # fmt: skip
            state.wait_for_everyone()
            if state.is_main_process:
                synth.write_prompt_index(gen_root / g, jobs)
            state.wait_for_everyone()
            synthetic[g] = read_class_folder(gen_root / g, names)
        if not state.is_main_process:
            return None

    dd = build_split(real, synthetic, split)
    meta = {
        "real": args.real,
        "synthetic": {
            **{g: str(p) for g, p in folders.items()},
            **{g: s.model for g, s in specs.items()},
        },
        **split.__dict__,
        "prompts": args.prompts if specs else None,
        "skipped_corrupt": {g: sorted(map(str, p)) for g, p in skipped.items() if p},
        "command": args.command,
    }
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_benchmark(dd, tmp, meta)
    (tmp / "README.md").write_text(dataset_card(dd, meta))
    preview(dd, tmp / "preview.png")
    tmp.rename(out)
    if args.push_to_hub:
        push(out, dd, args.push_to_hub, args.private)
    return {split: len(dd[split]) for split in dd}


def dataset_card(dd, meta: dict) -> str:
    counts = summary(dd)
    names = dd["test"].features["label"].names
    lines = [
        "---", "task_categories:", "- image-classification", "tags:", "- rs-ssl", "- synthetic-data", "---", "",
        "# RS-SSL benchmark", "",
        f"Real source `{meta['real']}`; {meta['labels_per_class']} labels per class; replace ratio "
        f"r = {meta['replace_ratio']} of each class's unlabeled pool"
        + (f" (capped at {meta['unlabeled_per_class']} per class)" if meta["unlabeled_per_class"] else "")
        + f"; split seed {meta['seed']}. Built by `rsmatch-build-benchmark` with:", "",
        "```", " ".join(meta["command"]), "```", "",
        "Splits: `labeled` (real), `unlabeled` (real and synthetic, unmarked for training), `test` (real).",
        "Columns: `image`, `label`, `prompt`, and provenance that training must never read: "
        "`is_synthetic`, `generator`, `source_id`.", "",
        "| split | total | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names),
    ]  # fmt: skip
    for split in ("labeled", "unlabeled", "test"):
        row = counts[split]
        lines.append(
            f"| {split} | {row['total']} | "
            + " | ".join(str(row["per_class"][n]) for n in names)
            + " |"
        )
    lines += [
        "",
        "Unlabeled images per generator: "
        + ", ".join(f"{g}: {n}" for g, n in counts["unlabeled"]["per_generator"].items()),
        "",
    ]
    lines += [
        "Synthetic sources: " + ", ".join(f"`{g}` ({s})" for g, s in meta["synthetic"].items())
        if meta["synthetic"]
        else "No synthetic sources.",
        "",
    ]
    skipped = sum(len(v) for v in meta["skipped_corrupt"].values())
    lines += [f"Unreadable images skipped: {skipped}.", "", "![preview](preview.png)", ""]
    return "\n".join(lines)


def preview(dd, path: Path, per_kind: int = 4) -> None:
    """A grid: one row per class, real unlabeled images then synthetic ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unl = dd["unlabeled"]
    names = unl.features["label"].names
    labels = np.asarray(unl["label"])
    synthetic = np.asarray(unl["is_synthetic"])
    generators = np.asarray(unl["generator"])
    fig, axes = plt.subplots(
        len(names), 2 * per_kind, figsize=(2 * per_kind * 0.9, len(names) * 0.95), squeeze=False
    )
    for c, name in enumerate(names):
        for k, is_syn in enumerate((False, True)):
            rows = np.flatnonzero((labels == c) & (synthetic == is_syn))
            by_gen = [rows[generators[rows] == g] for g in sorted(set(generators[rows].tolist()))]
            rows = (
                [r for group in zip(*by_gen) for r in group][:per_kind] if by_gen else []
            )  # interleave
            for j in range(per_kind):
                ax = axes[c, k * per_kind + j]
                ax.axis("off")
                if j < len(rows):
                    ax.imshow(unl[int(rows[j])]["image"])
                    if c == 0:
                        ax.set_title(unl[int(rows[j])]["generator"], fontsize=6)
        axes[c, 0].text(
            -0.1, 0.5, name, transform=axes[c, 0].transAxes, ha="right", va="center", fontsize=7
        )
    fig.suptitle("real (left) vs synthetic (right)", fontsize=8)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def push(folder: Path, dd, repo: str, private: bool) -> None:
    """Dataset shards through `datasets`, then the card, preview and metadata files."""
    from huggingface_hub import HfApi

    try:
        dd.push_to_hub(repo, private=private)
        api = HfApi()
        for name in ("README.md", "preview.png", "rsmatch_benchmark.json"):
            api.upload_file(
                path_or_fileobj=str(folder / name),
                path_in_repo=name,
                repo_id=repo,
                repo_type="dataset",
            )
    except Exception as e:  # network, auth, offline mode: the local build stays valid
        raise PushError(f"{type(e).__name__}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        sizes = build(args)
    except (BuildError, SourceError) as e:
        print(f"rsmatch-build-benchmark: error: {e}", file=sys.stderr)
        return 2
    except PushError as e:
        print(
            f"rsmatch-build-benchmark: built {args.out}, but the push failed: {e}", file=sys.stderr
        )
        return 1
    if sizes is not None:
        print(json.dumps({"out": str(args.out), **sizes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
