"""Run under torchrun by a test: rsmatch-train whose checkpoint load fails on rank 1 alone, as
a checkpoint file missing on one node would make it."""

import os

from rsmatch import checkpoint
from rsmatch.cli import train


def _fail(*args: object, **kwargs: object) -> None:
    raise checkpoint.CheckpointError("cannot be loaded here (this test's failure on rank 1)")


if os.environ["RANK"] == "1":
    checkpoint.load = _fail
train.run()
