"""Entry point: `python launch/build_benchmark.py --real ... --out ...` (or accelerate launch)."""

import sys

from rsmatch.cli.build_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
