"""Entry point: `python launch/experiment.py configs/experiments/cpu_demo.yaml ...`."""

import sys

from rsmatch.cli.experiment import main

if __name__ == "__main__":
    sys.exit(main())
