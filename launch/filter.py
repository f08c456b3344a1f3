"""Entry point for `accelerate launch launch/filter.py --detector ... --images ... --out ...`."""

import sys

from rsmatch.cli.filter import main

if __name__ == "__main__":
    sys.exit(main())
