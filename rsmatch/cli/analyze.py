"""Analysis figures of a finished run: `rsmatch-analyze RUN_DIR [--out DIR]`.

t-SNE of the classifier's encoder features on a seeded sample of the unlabeled pool, and
GradCAM++ maps of the classifier (and of the detector when the run exported one). Run it from
the folder the run was trained from: the run's config names its data by relative paths.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from rsmatch.benchmark.errors import SourceError
from rsmatch.cli import HelpWithDefaults, at_least
from rsmatch.runfolder import exported_model_problem

VIZ_MODULES = ("sklearn", "pytorch_grad_cam")  # the `viz` extra: t-SNE, GradCAM++


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="rsmatch-analyze",
        description=__doc__.splitlines()[0],
        formatter_class=HelpWithDefaults,
    )
    ap.add_argument("run", type=Path, help="a finished run folder (with model/)")
    ap.add_argument("--out", type=Path, help="output folder (default RUN/analysis)")
    ap.add_argument(
        "--samples", type=at_least(2), default=1000, help="unlabeled images in the t-SNE"
    )
    ap.add_argument(
        "--per-class",
        type=at_least(1),
        default=2,
        help="real and synthetic images per class in the GradCAM++ grid",
    )
    ap.add_argument(
        "--classes",
        type=at_least(1),
        default=None,
        help="classes (rows) in the GradCAM++ grid (default: up to 10)",
    )
    ap.add_argument("--seed", type=at_least(0), default=0, help="seed of the samples and of t-SNE")
    args = ap.parse_args(argv)
    # before torch and the figures' libraries load (~9 s on 2 cores): a mistyped path at once
    if problem := exported_model_problem(args.run):
        print(f"rsmatch-analyze: error: {problem}", file=sys.stderr)
        return 2
    # checked before any figure is drawn: a missing GradCAM++ came after t-SNE's was written
    missing = [m for m in VIZ_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        print(f"rsmatch-analyze: error: {', '.join(missing)} missing: the viz extra, "
              f"pip install -e '.[viz]' in the repository", file=sys.stderr)  # fmt: skip
        return 2
    from rsmatch.analysis import analyze  # torch, sklearn and grad-cam after parsing
    from rsmatch.config import ConfigError

    try:
        made = analyze(args.run, args.out or args.run / "analysis", args.samples,
                       args.per_class, args.classes, args.seed)  # fmt: skip
    except (FileNotFoundError, ConfigError, SourceError) as e:
        print(f"rsmatch-analyze: error: {e}", file=sys.stderr)
        return 2
    for path in made:
        print(path)
    if not (args.run / "detector").is_dir():
        print(f"no detector exported in {args.run} (not an RSMatch run, or an older one): "
              "GradCAM++ of the classifier only", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
