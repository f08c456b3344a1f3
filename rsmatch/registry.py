"""Algorithms register themselves by name with their config section, as timm registers models.

The config schema, its validation and docs/config.md are built from this registry, so adding
an algorithm touches one module (plus its tests and config) and no list of names anywhere else.
The built-in algorithms register when `rsmatch.algorithms` is imported; `algorithms()` does
that first. This module imports nothing of rsmatch, so the config can use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    config: type | None  # dataclass of the section `cfg.<name>`, or None for no keys


_REGISTRY: dict[str, Entry] = {}


def register_algorithm(name: str, config: type | None = None) -> Callable[[type], type]:
    """Class decorator: `@register_algorithm("fixmatch")`, optionally with a config dataclass."""

    def wrap(cls: type) -> type:
        known = _REGISTRY.get(name)
        if known is not None and known.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"algorithm {name!r} is registered already by {known.cls.__name__}")
        cls.name = name
        _REGISTRY[name] = Entry(name, cls, config)
        return cls

    return wrap


def algorithms() -> dict[str, Entry]:
    """Every registered algorithm, the built-in ones included."""
    importlib.import_module("rsmatch.algorithms")
    return dict(_REGISTRY)
