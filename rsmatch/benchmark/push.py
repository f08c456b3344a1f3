"""Push a built benchmark to a Hub dataset repository."""

from __future__ import annotations

from pathlib import Path

import datasets

from rsmatch.benchmark.errors import PushError
from rsmatch.benchmark.store import META_FILE

FILES = ("README.md", "preview.png", META_FILE)  # beside the shards `datasets` uploads


def push_benchmark(folder: Path, dd: datasets.DatasetDict, repo: str, private: bool) -> None:
    """Dataset shards through `datasets`, then the card, preview and metadata files."""
    from huggingface_hub import HfApi

    try:
        dd.push_to_hub(repo, private=private)
        api = HfApi()
        for name in FILES:
            api.upload_file(
                path_or_fileobj=str(folder / name),
                path_in_repo=name,
                repo_id=repo,
                repo_type="dataset",
            )
    except Exception as e:  # network, auth, offline mode: the local build stays valid
        raise PushError(f"{type(e).__name__}: {e}") from None
