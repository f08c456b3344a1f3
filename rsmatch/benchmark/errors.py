"""The benchmark builder's and the data readers' errors, in a module that imports nothing heavy:
command-line tools catch them without loading torch or datasets first."""

from __future__ import annotations


class BuildError(ValueError):
    """Bad input, found before any work."""


class SourceError(ValueError):
    """A source that cannot be used; the message names the path or id."""


class ModelLoadError(ValueError):
    """A prompt or generator model that cannot be loaded (offline, a wrong id, a broken folder)."""


class PushError(RuntimeError):
    """The benchmark was built but could not be pushed to the Hub."""
