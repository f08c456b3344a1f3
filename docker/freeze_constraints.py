"""Print pip constraints pinning rsmatch's dependencies, with the extras the image installs, at
the versions of this environment (the one the tests ran in).

    python docker/freeze_constraints.py > docker/constraints.txt
"""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

EXTRAS = ("deepspeed", "generate")  # as in the Dockerfile's `pip install ".[deepspeed,generate]"`
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def roots() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def pins(reqs: list[Requirement]) -> dict[str, str]:
    """Installed versions of the requirements and everything they need here, extras included."""
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = list(reqs)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            sys.exit(f"{req.name} is not installed: install rsmatch[{','.join(EXTRAS)}] first")
        found[name] = dist.version
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(
                sub.marker.evaluate({"extra": e}) for e in {"", *req.extras}
            ):
                todo.append(sub)
    return found


def main() -> None:
    print(
        f"# Tested versions (Python {platform.python_version()}, {sys.platform}); regenerate with"
    )
    print("#   python docker/freeze_constraints.py > docker/constraints.txt")
    for name, version in sorted(pins(roots()).items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
