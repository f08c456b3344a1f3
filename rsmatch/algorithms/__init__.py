"""The built-in algorithms; importing this package registers them (see `rsmatch.registry`).

RSMatch wraps any registered SSL algorithm as its base (`rsmatch.base`).
"""

from __future__ import annotations

from rsmatch.algorithms import flexmatch, freematch, simmatch  # noqa: F401 (register)
from rsmatch.algorithms.base import Algorithm, DataInfo
from rsmatch.config import Config
from rsmatch.registry import algorithms


def make_algorithm(
    cfg: Config,
    num_classes: int,
    num_labeled: int,
    num_unlabeled: int,
    image_shape: tuple[int, ...],
) -> Algorithm:
    info = DataInfo(num_classes, num_labeled, num_unlabeled, tuple(image_shape))
    return algorithms()[cfg.algorithm].cls(cfg, info)


# Registered last, so the registry (and every report) lists the baselines before the method
# that wraps them.
from rsmatch.algorithms import rsmatch  # noqa: E402, F401
