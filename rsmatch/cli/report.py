"""Tables and figures from a folder of runs: `rsmatch-report RUNS_DIR [--out DIR]`.

Writes DIR/README.md (tables and figures on one page), tables.md, table.csv and PNG figures.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rsmatch.cli import HelpWithDefaults


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="rsmatch-report", description=__doc__.splitlines()[0], formatter_class=HelpWithDefaults
    )
    ap.add_argument("runs_dir", type=Path, help="folder holding run folders (searched recursively)")
    ap.add_argument("--out", type=Path, help="report folder (default RUNS_DIR/report)")
    ap.add_argument(
        "--repo-url",
        help="link commits to REPO_URL/commit/SHA (e.g. https://github.com/you/rsmatch)",
    )
    args = ap.parse_args(argv)
    if not args.runs_dir.is_dir():
        print(f"rsmatch-report: error: {args.runs_dir}: no such folder", file=sys.stderr)
        return 2
    from rsmatch.report import ReportError, write_report  # matplotlib, tensorboard: after checks
    from rsmatch.runfolder import unwritable

    out = args.out or args.runs_dir / "report"
    if problem := unwritable(out):
        print(f"rsmatch-report: error: --out {out}: {problem}", file=sys.stderr)
        return 2
    command = shlex.join(["rsmatch-report", *(sys.argv[1:] if argv is None else argv)])
    try:
        readme = write_report(args.runs_dir, out, args.repo_url, command)
    except (FileNotFoundError, ReportError) as e:
        print(f"rsmatch-report: error: {e}", file=sys.stderr)
        return 2
    print(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
