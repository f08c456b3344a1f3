"""Entry point for `accelerate launch launch/train.py --config ... key=value ...`."""

import sys

from rsmatch.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
