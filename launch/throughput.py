"""Entry point: `python launch/throughput.py --config configs/fixmatch.yaml ...`."""

import sys

from rsmatch.cli.throughput import main

if __name__ == "__main__":
    sys.exit(main())
