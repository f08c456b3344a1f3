"""Score, filter and report on an image set with a trained RSMatch detector.

    rsmatch-filter --detector runs/demo --images data/demo/synthetic/ddpm --out filtered/ddpm
    accelerate launch launch/filter.py --detector you/rsmatch-detector --images FOLDER --out OUT

Writes OUT/scores.parquet, OUT/dataset (a saved DatasetDict with `synthetic_score`), and a
report (OUT/README.md, histogram and image grids, report.json). See docs/filter.md.
Bad input exits with code 2 and one line naming it; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rsmatch.benchmark.errors import SourceError
from rsmatch.cli import HelpWithDefaults, at_least, name_value_pairs
from rsmatch.config import ConfigError
from rsmatch.hub import repo_id_problem
from rsmatch.runfolder import unwritable

if TYPE_CHECKING:  # imported late: --help stays fast
    from accelerate import Accelerator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="rsmatch-filter", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpWithDefaults,
                                 epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    ap.add_argument("--detector", required=True, metavar="RUN_DIR|EXPORT_DIR|HUB_ID",
                    help="an RSMatch run folder, its exported detector/ folder, or a Hub model id")  # fmt: skip
    ap.add_argument("--images", metavar="FOLDER|SAVED_DATASET|HUB_ID",
                    help="images to score (folders nested or flat, any image size)")  # fmt: skip
    ap.add_argument("--labels", nargs="+", metavar="NAME=SOURCE",
                    help="instead of --images: real=SOURCE and GENERATOR=SOURCE ... give provenance")  # fmt: skip
    ap.add_argument("--split", action="append", metavar="NAME",
                    help="score only this split of a DatasetDict (repeatable), e.g. unlabeled")  # fmt: skip
    ap.add_argument("--out", required=True, type=Path, help="output folder (must not exist)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, help="call synthetic above this score (default: the detector's, 0.5)")  # fmt: skip
    group.add_argument("--keep-fraction", type=float, help="threshold calling this fraction of the images real")  # fmt: skip
    ap.add_argument("--keep", choices=["all", "real"], default="all",
                    help="rows of the saved dataset: all scored images, or those called real")  # fmt: skip
    ap.add_argument("--skip-corrupt", action="store_true", help="list and skip files that do not decode")  # fmt: skip
    ap.add_argument(
        "--batch-size", type=at_least(1), default=256, help="images per batch and process"
    )
    ap.add_argument("--workers", type=at_least(0), default=0, help="DataLoader decoding workers")
    ap.add_argument("--precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                    help="autocast of the scoring: auto (as the trainer picks it), no, fp16 (GPU), bf16")  # fmt: skip
    ap.add_argument("--push-to-hub", metavar="REPO", help="push the saved dataset and report")
    ap.add_argument(
        "--private", action="store_true", help="with --push-to-hub: create the repo private"
    )
    return ap.parse_args(argv)


def check(args: argparse.Namespace) -> dict[str, str]:
    """Option checks that need no data; returns `--labels` as {NAME: SOURCE}."""
    if (args.images is None) == (args.labels is None):
        raise ConfigError("--images or --labels: give exactly one")
    if args.out.exists():
        raise ConfigError(f"--out {args.out}: exists; choose a new folder")
    if problem := unwritable(args.out):  # before the scoring, not after it
        raise ConfigError(f"--out {args.out}: {problem}")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise ConfigError(f"--threshold {args.threshold}: not in [0, 1]")
    if args.keep_fraction is not None and not 0 < args.keep_fraction <= 1:
        raise ConfigError(f"--keep-fraction {args.keep_fraction}: not in (0, 1]")
    if args.push_to_hub and (problem := repo_id_problem(args.push_to_hub)):
        raise ConfigError(f"--push-to-hub {args.push_to_hub!r}: {problem}")
    return name_value_pairs(args.labels or [], "--labels", ConfigError, "SOURCE")


def _error(e: Exception) -> int:
    print(f"rsmatch-filter: error: {e}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        labelled = check(args)
    except ConfigError as e:  # before the imports below: an option error comes at once
        return _error(e)
    from rsmatch import filter as flt  # torch, torchvision, datasets: not for --help

    flt.datasets.disable_progress_bars()
    try:
        det = flt.resolve_detector(args.detector)
        dd = flt.load_labelled(labelled) if args.labels else flt.load_images(args.images)
        if args.split:
            dd = flt.select_splits(dd, args.split)
        accelerator = make_accelerator(args.precision)
        result = flt.run_filter(
            det, dd, accelerator, args.batch_size, args.threshold, args.keep_fraction,
            args.keep == "real", args.skip_corrupt, args.workers,
        )  # fmt: skip
    except (ConfigError, SourceError, flt.FilterError) as e:
        return _error(e)
    except KeyboardInterrupt:
        print(f"rsmatch-filter: interrupted; nothing written to {args.out}", file=sys.stderr)
        return 130
    if not accelerator.is_main_process:
        return 0
    from rsmatch.filter_report import format_metric, provenance_metrics, write_report

    metrics = None
    if flt.provenance(result.scored):
        metrics = provenance_metrics(
            result.table["synthetic_score"], flt.concat_column(result.scored, "is_synthetic"),
            flt.concat_column(result.scored, "generator"), result.threshold,
        )  # fmt: skip
    source = args.images or " ".join(args.labels)
    try:  # written whole into a temporary folder, then moved: an interruption leaves nothing
        flt.write_outputs(result, args.out, lambda folder: write_report(
            folder, result, args.detector, source, det.image_size, metrics, args.keep == "real"))  # fmt: skip
    except KeyboardInterrupt:
        print(f"rsmatch-filter: interrupted; nothing written to {args.out}", file=sys.stderr)
        return 130
    c = result.table["call"]
    print(f"scored {len(c)} images: {c.count('synthetic')} called synthetic at threshold "
          f"{result.threshold:.4g}; wrote {args.out}")  # fmt: skip
    if metrics is not None:
        print(f"ROC AUC {format_metric(metrics['roc_auc'])}, "
              f"accuracy {format_metric(metrics['accuracy'])}")  # fmt: skip
    if args.push_to_hub:
        try:
            flt.push(args.out, result.dataset, args.push_to_hub, args.private)
        except Exception as e:  # network, auth, offline mode: the local outputs stay valid
            print(f"rsmatch-filter: push failed ({type(e).__name__}: {e}); outputs are in "
                  f"{args.out}", file=sys.stderr)  # fmt: skip
            return 1
        print(f"pushed {args.push_to_hub}")
    return 0


def make_accelerator(precision: str) -> Accelerator:
    import torch
    from accelerate import Accelerator

    from rsmatch.hardware import resolve

    chosen = resolve(precision, False, key="--precision").mixed_precision
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=chosen)


if __name__ == "__main__":
    sys.exit(main())
