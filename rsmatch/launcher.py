"""What a launcher (`accelerate launch`) tells this process through its environment, read as
Accelerate and DeepSpeed read it. Imports nothing heavy: commands ask before importing torch."""

from __future__ import annotations

import os


def is_true(value: object) -> bool:
    """A boolean as Accelerate and DeepSpeed read one from the environment or a JSON: True, or
    the string "true" in any case."""
    return str(value).lower() == "true"


def deepspeed_launch() -> bool:
    """Whether Accelerate will run DeepSpeed."""
    return is_true(os.environ.get("ACCELERATE_USE_DEEPSPEED"))
