"""Entry point: `python launch/throughput.py --config configs/fixmatch.yaml ...`."""

from rsmatch.cli.throughput import run

if __name__ == "__main__":
    run()
