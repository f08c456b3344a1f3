"""Algorithms by name; RSMatch wraps any SSL base (`rsmatch.base`)."""

from __future__ import annotations

from rsmatch.algorithms.base import Algorithm, FixMatch, SSLAlgorithm, Supervised
from rsmatch.algorithms.flexmatch import FlexMatch
from rsmatch.algorithms.freematch import FreeMatch
from rsmatch.algorithms.rsmatch import RSMatch
from rsmatch.algorithms.simmatch import SimMatch
from rsmatch.config import Config

SSL_ALGORITHMS: dict[str, type[SSLAlgorithm]] = {
    "fixmatch": FixMatch,
    "flexmatch": FlexMatch,
    "freematch": FreeMatch,
    "simmatch": SimMatch,
}


def make_algorithm(
    cfg: Config,
    num_classes: int,
    num_labeled: int,
    num_unlabeled: int,
    image_shape: tuple[int, ...],
) -> Algorithm:
    sizes = (cfg, num_classes, num_labeled, num_unlabeled)
    if cfg.algorithm == "supervised":
        return Supervised(*sizes)
    if cfg.algorithm == "rsmatch":
        return RSMatch(
            *sizes, base=SSL_ALGORITHMS[cfg.rsmatch.base](*sizes), image_shape=image_shape
        )
    return SSL_ALGORITHMS[cfg.algorithm](*sizes)
