"""rsmatch: semi-supervised learning with synthetic-contaminated unlabeled data (RSMatch)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rsmatch")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
