"""Build an RS-SSL benchmark: real images with a fraction of the unlabeled pool replaced by
synthetic ones, generated with diffusers from T5 prompts or imported from folders.

    rsmatch-build-benchmark --real uoft-cs/cifar10 --generate sd14 sdxl_lightning glide \\
        --images-per-class 3500 --labels-per-class 25 --replace-ratio 0.5 --out benchmarks/c10
    rsmatch-build-benchmark --real ../cifar10 --synthetic ddpm=../synth/ddpm \\
        --synthetic cifake=cifake:../CIFAKE/train/FAKE --replace-ratio 0.3 --out benchmarks/mine
    rsmatch-build-benchmark --real ../cifar10 --replace-ratio 0 --out benchmarks/real-only

Everything that can be checked is checked before any work (unknown generators, missing
classes, images per class against the ratio, then every unreadable image, real or synthetic,
in one listing); the output folder appears only once complete. The trainer reads it with
`data.benchmark=OUT`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from rsmatch.benchmark.errors import BuildError, ModelLoadError, PushError, SourceError
from rsmatch.benchmark.options import GENERATORS, BuildOptions
from rsmatch.cli import HelpWithDefaults, Once
from rsmatch.config import YamlLoader, did_you_mean

PROG = "rsmatch-build-benchmark"


def parser() -> argparse.ArgumentParser:
    d = BuildOptions()
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpWithDefaults, epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    add = ap.add_argument
    add("--config", action=Once, overrides="these options (e.g. --seed 1)",
        help="YAML file whose keys are these options' names (flags win)")  # fmt: skip
    add("--real", help="Hub id, folder with train/ and test/ class folders, or saved DatasetDict")
    add("--synthetic", action="append", default=[], metavar="NAME=[cifake:]FOLDER",
        help="import a folder of generated images (one subfolder per class, a saved Dataset, or CIFAKE naming); repeatable")  # fmt: skip
    add(
        "--generate",
        nargs="*",
        default=[],
        metavar="GEN",
        help=f"generate with {sorted(GENERATORS)}",
    )
    add("--generator-model", action="append", default=[], metavar="GEN=PATH_OR_ID",
        help="use other weights for a generator (a local copy, a fine-tune)")  # fmt: skip
    add("--lightning-unet", default=d.lightning_unet, metavar="REPO/FILE_OR_PATH",
        help="SDXL-Lightning UNet weights (default ByteDance/SDXL-Lightning 4-step)")  # fmt: skip
    add("--images-per-class", type=int, default=d.images_per_class,
        help="images to generate per class and generator (default: what the ratio needs)")  # fmt: skip
    add("--prompts", choices=["t5", "template"], default=d.prompts,
        help="T5 word-to-sentence prompts or 'a photo of a {class}'")  # fmt: skip
    add("--prompt-model", default=d.prompt_model, help="T5 checkpoint (Hub id or folder)")
    add("--prompts-per-class", type=int, default=d.prompts_per_class,
        help="distinct prompts per class (He et al.: 200)")  # fmt: skip
    add("--batch-size", type=int, default=d.batch_size, help="generation batch size")
    add("--dtype", choices=["float32", "float16", "bfloat16"], default=d.dtype,
        help="generation dtype (float32 on CPU)")  # fmt: skip
    add(
        "--device",
        default=d.device,
        help="generation device (default: this process's accelerator device)",
    )
    add("--resolution", type=int, default=d.resolution,
        help="generate at this size instead of the model's native one")  # fmt: skip
    add("--jpeg-quality", type=int, default=d.jpeg_quality,
        help="store synthetic images as JPEG of this quality; 0 = PNG; -1 (default): JPEG 75 if the real set is JPEG, else PNG")  # fmt: skip
    add("--export-synthetic", type=Path, default=d.export_synthetic,
        help="where generated class folders go (default OUT.synthetic); reruns resume here")  # fmt: skip
    add("--labels-per-class", type=int, default=d.labels_per_class,
        help="labeled real images per class (the rest of each class is the unlabeled pool)")  # fmt: skip
    add("--unlabeled-per-class", type=int, default=d.unlabeled_per_class,
        help="cap the unlabeled pool per class (default: every remaining real image)")  # fmt: skip
    add("--replace-ratio", type=float, default=d.replace_ratio,
        help="share r of each class's unlabeled pool replaced by synthetic images (0: real only)")  # fmt: skip
    add("--seed", type=int, default=d.seed, help="split, prompt and generation seed")
    add("--skip-corrupt", action="store_true",
        help="drop unreadable images, real or synthetic (listed in rsmatch_benchmark.json, counted in the card)")  # fmt: skip
    add("--out", type=Path, help="output folder (must not exist)")
    add("--push-to-hub", metavar="REPO", default=d.push_to_hub,
        help="push the dataset, card and preview to this Hub dataset repo")  # fmt: skip
    add("--private", action="store_true", help="create the Hub repo private")
    return ap


def _config_values(path: str, actions: dict[str, argparse.Action]) -> dict:
    """The --config file's options, or one BuildError naming the file (and line for YAML)."""
    try:
        values = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=YamlLoader)  # noqa: S506 (safe)
    except OSError as e:
        raise BuildError(f"--config {path}: cannot read ({e.strerror or e})") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BuildError(f"--config {path}: invalid YAML{where}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise BuildError(f"--config {path}: invalid YAML: {' '.join(str(e).split())}") from None
    values = values or {}
    if not isinstance(values, dict):
        raise BuildError(f"--config {path}: expected a mapping of option names to values")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        hint = did_you_mean(unknown[0], sorted(actions)) if len(unknown) == 1 else ""
        raise BuildError(f"--config {path}: unknown keys {unknown}{hint}")
    return {k: _config_value(path, actions[k], v) for k, v in values.items()}


def _config_value(path: str, action: argparse.Action, value: object) -> object:
    """One --config value as its flag would take it: a repeated option a list or one value
    (`synthetic` and `generator_model` also a NAME: VALUE mapping), a switch true or false,
    other text through the flag's type, each value among the flag's choices. Numbers keep their
    YAML type for the flags' range checks (`_check_ranges`)."""
    where = f"--config {path}: {action.dest}"
    if isinstance(action.default, bool):  # a switch
        if not isinstance(value, bool):
            raise BuildError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(action.default, list):  # repeated, or several values
        if isinstance(value, dict) and action.dest in ("synthetic", "generator_model"):
            value = [f"{name}={v}" for name, v in value.items()]
        elif isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise BuildError(f"{where}: expected a list of text, got {value!r}")
        items = value
    else:
        if action.type not in (int, float):  # `out: 5` names the folder 5
            if isinstance(value, int | float) and not isinstance(value, bool):
                value = str(value)
            if value is not None and not isinstance(value, str):
                raise BuildError(f"{where}: expected text, got {value!r}")
        if isinstance(value, str) and action.type is not None:  # `replace_ratio: 5e-1` too
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                kind = getattr(action.type, "__name__", "value")
                raise BuildError(f"{where}: {value!r} is not a valid {kind}") from None
        items = [value]
    if action.choices is not None:
        for item in items:
            if item not in action.choices:
                raise BuildError(f"{where}: {item!r} is not one of {list(action.choices)}")
    return value


def parse_args(argv: list[str] | None) -> BuildOptions:
    ap = parser()
    args = ap.parse_args(argv)
    if args.config:
        actions = {a.dest: a for a in ap._actions if a.dest not in ("help", "config")}
        ap.set_defaults(**_config_values(args.config, actions))
        args = ap.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k != "config"}
    return BuildOptions(**options, command=[PROG, *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    options = None
    try:
        options = parse_args(argv)
        from rsmatch.benchmark.build import build  # torch and datasets: not for --help

        sizes = build(options)
    except (BuildError, SourceError, ModelLoadError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {_what_is_left(options)}", file=sys.stderr)
        return 130
    except PushError as e:
        print(f"{PROG}: built {options.out}, but the push failed: {e}; retry with rsmatch-push "
              f"{options.out} {options.push_to_hub}", file=sys.stderr)  # fmt: skip
        return 1
    if sizes is not None:
        print(json.dumps({"out": str(options.out), **sizes}))
    return 0


def _what_is_left(options: BuildOptions | None) -> str:
    if options is not None and options.out.is_dir():  # built, then stopped while pushing
        return f"{options.out} is built; push it with rsmatch-push {options.out} REPO"
    kept = (
        " (generated images are kept and reused by a rerun)" if options and options.generate else ""
    )
    return f"the benchmark was not written{kept}"


if __name__ == "__main__":
    sys.exit(main())
