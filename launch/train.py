"""Entry point for `accelerate launch launch/train.py --config ... key=value ...`."""

from rsmatch.cli.train import run

if __name__ == "__main__":
    run()
