"""Push a finished run to the Hugging Face Hub: the exported model, a model card, the record.

    rsmatch-push runs/demo you/rsmatch-cifar10 [--private]
    rsmatch-push runs/demo you/rsmatch-cifar10-detector --detector   # RSMatch's detector
    rsmatch-push benchmarks/local you/cifar10-rsssl    # a built benchmark, as a dataset repo
    rsmatch-push filtered/pool you/pool-scored         # rsmatch-filter's output, likewise

A benchmark or a filter output is pushed as `rsmatch-build-benchmark --push-to-hub` and
`rsmatch-filter --push-to-hub` would have, so a push that failed there can be retried here.

The folder is staged locally first (model.safetensors, config.json, README.md, config.yaml,
run.json, metrics.json, evals.jsonl), so it can be inspected with `--stage-only`; the upload is
`create_repo(exist_ok=True)` + `upload_folder`. The token comes from the environment or the
Hugging Face login and is never printed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id

from rsmatch.atomic import write_folder
from rsmatch.benchmark.errors import SourceError
from rsmatch.cli import HelpWithDefaults
from rsmatch.runfolder import read_json_object

RECORD_FILES = ("config.yaml", "run.json", "metrics.json", "evals.jsonl")


def repo_id_problem(repo: str) -> str | None:
    """Why `repo` is no valid Hub repo id (checked before any work that ends in a push), or None."""
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        return str(e)
    return None


def model_card(run: Path, repo: str) -> str:
    """The classifier's card with the run's data, seeds, commit and metrics."""
    from rsmatch.export import classifier_card  # torch: not for --help

    metrics, record, config = (
        read_json_object(run / name) for name in ("metrics.json", "run.json", "model/config.json")
    )
    split, git = record.get("split") or {}, record.get("git") or {}
    rows = "\n".join(
        f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in metrics.items()
    )
    results = (
        f"Data: real `{split.get('real', '?')}`, synthetic {split.get('synthetic', {})}, "
        f"{split.get('labels_per_class', '?')} labels per class, replace ratio "
        f"{split.get('replace_ratio', '?')}, split seed {split.get('seed', record.get('split_seed', '?'))}; "
        f"training seed {record.get('seed', '?')}; {record.get('world_size', 1)} process(es); git "
        f"{git.get('commit', 'unknown')[:12]}{' (dirty)' if git.get('dirty') else ''}.", "",
        "| metric | value |", "|---|---|", rows, "",
        "`test_acc` is the final EMA model's top-1 accuracy on the real test split; `best_acc` is "
        "the best over evaluations (optimistic, as in USB). The full config, package versions and "
        "per-evaluation metrics are in `config.yaml`, `run.json` and `evals.jsonl`.",
    )  # fmt: skip
    algorithm = metrics.get("algorithm", "unknown")
    card = classifier_card(config, algorithm, repo.split("/")[-1], repo, results)
    return str(card)


def _stage(run: Path, out: Path, export: str, card: str | None) -> Path:
    """`run/export`, the run record and `card` (README.md) staged in `out`, whole or not at all."""

    def fill(tmp: Path) -> None:
        shutil.copytree(run / export, tmp, dirs_exist_ok=True)
        for name in RECORD_FILES:
            shutil.copy2(run / name, tmp / name)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")

    write_folder(out, fill)
    return out


def _missing_records(run: Path, also: tuple[str, ...] = ()) -> None:
    missing = [p for p in (*also, *RECORD_FILES) if not (run / p).is_file()]
    if missing:
        raise FileNotFoundError(f"{run}: not a finished run (missing {', '.join(missing)})")


def stage(run: Path, repo: str, out: Path) -> Path:
    """The classifier export, the run record and its model card (built before `out` is
    touched: a record that cannot be read leaves a staged folder as it was)."""
    _missing_records(run, ("model/model.safetensors", "model/config.json"))
    return _stage(run, out, "model", model_card(run, repo))


def stage_detector(run: Path, out: Path) -> Path:
    """The detector export (weights, config, its model card) and the run record."""
    _missing_records(run)
    if not (run / "detector" / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{run}: no detector/ export (only RSMatch runs with a separate detector write one; "
            "rsmatch.shared_encoder=true and other algorithms do not)"
        )
    return _stage(run, out, "detector", None)


def push(folder: Path, repo: str, private: bool) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="rsmatch run")
    return str(getattr(info, "commit_url", info))


def data_folder_kind(folder: Path) -> str | None:
    """ "benchmark" (rsmatch-build-benchmark's --out), "filter" (rsmatch-filter's --out) or None."""
    from rsmatch.benchmark.store import META_FILE

    if (folder / META_FILE).is_file():
        return "benchmark"
    if (folder / "scores.parquet").is_file() and (folder / "dataset").is_dir():
        return "filter"
    return None


def push_data_folder(folder: Path, kind: str, repo: str, private: bool) -> None:
    """A benchmark or a filter output to a Hub dataset repo, as their commands push them."""
    from rsmatch.benchmark.sources import load_saved

    if kind == "benchmark":
        from rsmatch.benchmark.push import push_benchmark
        from rsmatch.benchmark.store import load_benchmark

        dd, _ = load_benchmark(folder)  # a SourceError names what is wrong with it
        push_benchmark(folder, dd, repo, private)
    else:
        from rsmatch import filter as flt

        flt.push(folder, load_saved(folder / "dataset", f"{folder}/dataset", False), repo, private)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="rsmatch-push", description=__doc__.splitlines()[0], formatter_class=HelpWithDefaults
    )
    ap.add_argument("run", type=Path, metavar="FOLDER",
                    help="a finished run (train.output_dir), a built benchmark or a filter output")  # fmt: skip
    ap.add_argument("repo", help="Hub repo, e.g. you/rsmatch-cifar10 (a dataset repo for data)")
    ap.add_argument("--private", action="store_true", help="create the Hub repo private")
    ap.add_argument(
        "--stage-only",
        action="store_true",
        help="write RUN/hub/ (RUN/hub-detector/ with --detector) and stop; run folders only",
    )
    ap.add_argument("--detector", action="store_true",
                    help="push RSMatch's detector (RUN/detector, staged in RUN/hub-detector) as its own model")  # fmt: skip
    args = ap.parse_args(argv)
    problem = repo_id_problem(args.repo)  # before staging: it would fail only at the upload
    if problem:
        print(f"rsmatch-push: error: repo {args.repo!r}: {problem}", file=sys.stderr)
        return 2
    kind = data_folder_kind(args.run)
    if kind:
        return _push_data(args, kind)
    try:
        if args.detector:
            folder = stage_detector(args.run, args.run / "hub-detector")
        else:
            folder = stage(args.run, args.repo, args.run / "hub")
    except (FileNotFoundError, ValueError) as e:  # ValueError: a record file, named
        print(f"rsmatch-push: error: {e}", file=sys.stderr)
        return 2
    if args.stage_only:
        print(f"staged {folder}")
        return 0
    try:
        print(f"pushed {push(folder, args.repo, args.private)}")
    except Exception as e:  # network, auth, offline mode
        print(
            f"rsmatch-push: push failed ({type(e).__name__}: {e}); staged files are in {folder}",
            file=sys.stderr,
        )
        return 1
    return 0


def _push_data(args: argparse.Namespace, kind: str) -> int:
    if args.detector or args.stage_only:
        flag = "--detector" if args.detector else "--stage-only"
        print(f"rsmatch-push: error: {flag}: for run folders; {args.run} is a {kind} output",
              file=sys.stderr)  # fmt: skip
        return 2

    try:
        push_data_folder(args.run, kind, args.repo, args.private)
    except SourceError as e:  # the folder's data cannot be read
        print(f"rsmatch-push: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # network, auth, offline mode
        print(f"rsmatch-push: push failed ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    print(f"pushed {args.repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
