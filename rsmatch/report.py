"""Paper-style tables from a folder of runs, read only from the files each run wrote.

A run is a folder with ``config.yaml``; it counts when it has ``metrics.json`` and is *missing*
otherwise. Runs a grid expected (``experiment.json``, written by ``rsmatch-experiment``) that
have no folder are missing too, so an unfinished grid never looks complete.

A cell is (method, replace ratio, labels per class); its runs differ only by seed. Means are over
seeds, stds are sample standard deviations (n - 1), n/a for one seed.
"""

from __future__ import annotations

import csv
import math
import re
import shutil
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rsmatch.config import flat_config
from rsmatch.experiment import MANIFEST, RESULT_NEUTRAL
from rsmatch.registry import algorithms
from rsmatch.runfolder import read_json_object
from rsmatch.runinfo import eval_entries

SEED_KEYS = ("train.seed", "data.split_seed")  # what a cell averages over
# Keys the row and column already name, or that cannot change a result.
IGNORED_IN_COMPARISON = (*SEED_KEYS, *RESULT_NEUTRAL)
# RSMatch's ablation switches (paper Table 3): the value that removes a part, and its name
ABLATIONS = {"rsmatch.shared_encoder": (True, "w/o ind. models"),
             "rsmatch.class_wise": (False, "w/o class-wise queue"),
             "rsmatch.fake_head": (False, "w/o fake head")}  # fmt: skip
# Axis keys that the method, ratio, labels and seed already cover; other axes split rows.
COVERED_AXIS_KEYS = {"algorithm", "rsmatch.base", "data.real_only", "data.replace_ratio",
                     "data.labels_per_class", "data.benchmark", "data.exclude_scores",
                     "data.exclude_above", *ABLATIONS, *SEED_KEYS}  # fmt: skip


@dataclass
class RunInfo:
    name: str
    path: Path
    method: str
    ratio: float
    labels: int
    seed: int
    config: dict[str, Any]  # flat dotted keys
    commit: str | None = None
    metrics: dict[str, Any] | None = None  # None: missing
    evals: list[dict[str, Any]] = field(default_factory=list)
    state: str = "not started"

    @property
    def cell(self) -> tuple[str, tuple[int, float]]:
        return self.method, (self.labels, self.ratio)


def method_name(cfg: dict[str, Any], extras: tuple[str, ...] = ()) -> str:
    """`fixmatch`, `fixmatch (real only)`, `fixmatch (filter-first at 0.5)`, `rsmatch`,
    `rsmatch (flexmatch)`, `rsmatch (w/o fake head)`, plus other axes."""
    name = str(cfg.get("algorithm", "?"))
    if name == "rsmatch" and cfg.get("rsmatch.base", "fixmatch") != "fixmatch":
        name += f" ({cfg['rsmatch.base']})"
    if name.startswith("rsmatch"):
        for key, (removed, label) in ABLATIONS.items():
            if cfg.get(key, not removed) == removed:
                name += f" ({label})"
    if cfg.get("data.real_only"):
        name += " (real only)"
    if cfg.get("data.exclude_scores"):  # another method: trained on a filtered pool
        name += f" (filter-first at {cfg.get('data.exclude_above', 0.5):g})"
    return " ".join((name, *extras))


def _method_order(method: str) -> tuple:
    algo, _, rest = method.partition(" ")
    names = list(algorithms())  # registration order: supervised, the SSL baselines, RSMatch
    rank = names.index(algo) if algo in names else len(names)
    bases = [i for i, b in enumerate(names) if f"({b})" in rest]
    return rank, "real only" not in rest, bases, rest


def read_evals(run: Path) -> list[dict[str, Any]]:
    """evals.jsonl, one entry per step. The trainer writes each step once (a resume trims what
    it will redo); should a file hold a step twice (a hand-made copy, older versions), the last
    wins."""
    by_step = {}
    for entry in eval_entries(run):
        by_step[entry["step"]] = entry
    return [by_step[s] for s in sorted(by_step)]


def _split(cfg: dict[str, Any], record: dict[str, Any]) -> tuple[float, int]:
    """Ratio and labels the run trained on: its run record, else a saved benchmark, else config."""
    split = record.get("split") or {}
    bench = cfg.get("data.benchmark")
    if not split and bench:
        split = _benchmark_meta(str(bench))
    ratio = split.get("replace_ratio", cfg.get("data.replace_ratio", float("nan")))
    labels = split.get("labels_per_class", cfg.get("data.labels_per_class", 0))
    return float(ratio), int(labels)


def _benchmark_meta(bench: str) -> dict[str, Any]:
    """A benchmark's rsmatch_benchmark.json: its folder's, or a Hub id's from the local Hub
    cache (the report never goes to the network); {} when neither is here."""
    from huggingface_hub import try_to_load_from_cache

    from rsmatch.benchmark.sources import is_hub_id
    from rsmatch.benchmark.store import META_FILE

    file = Path(bench) / META_FILE
    if not file.is_file() and is_hub_id(bench):
        cached = try_to_load_from_cache(bench, META_FILE, repo_type="dataset")
        file = Path(cached) if isinstance(cached, str) else file  # else None or "not on the Hub"
    return _load_json(file)


def _extras(axes: dict[str, str], covered: set[str]) -> tuple[str, ...]:
    return tuple(f"{a}={v}" for a, v in axes.items() if a not in covered)


def _covered_axes(grid: dict[str, Any]) -> set[str]:
    """Axes (plain or named) whose keys are all named by method, ratio, labels or seed."""
    out = set()
    for axis, spec in (grid.get("axes") or {}).items():
        keys = {axis} if isinstance(spec, list) else {k for v in spec.values() for k in v or {}}
        if keys <= COVERED_AXIS_KEYS:
            out.add(axis)
    return out


class ReportError(ValueError):
    """A run folder the report cannot read; the message names the file."""


def _load_json(path: Path) -> dict[str, Any]:
    """The file's JSON object; {} where there is no file."""
    if not path.is_file():
        return {}
    try:
        return read_json_object(path)
    except ValueError as e:
        raise ReportError(str(e)) from None


def _run_config(path: Path, expected: dict[Path, tuple[dict, tuple[str, ...]]]) -> dict:
    """The run's config.yaml, flattened; a grid run's manifest entry where there is none (a run
    that never started) or where it is empty (one stopped while writing it)."""
    cfg_file = path / "config.yaml"
    if cfg_file.is_file():
        try:
            loaded = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ReportError(f"{cfg_file}: not YAML ({str(e).splitlines()[0]})") from None
        if loaded:
            return flat_config(loaded)
        if path not in expected:
            raise ReportError(f"{cfg_file}: empty, and no grid manifest lists this run (stopped "
                              "while writing it?): delete the folder or run it again")  # fmt: skip
    return expected[path][0]


def collect(runs_dir: Path) -> list[RunInfo]:
    """Every run folder under ``runs_dir``, plus grid runs that never started."""
    expected: dict[Path, tuple[dict, tuple[str, ...]]] = {}
    for manifest_file in sorted(runs_dir.rglob(MANIFEST)):
        manifest = _load_json(manifest_file)
        try:
            covered = _covered_axes(manifest.get("grid", {}))
            for entry in manifest["runs"]:
                path = (manifest_file.parent / entry["name"]).resolve()
                expected[path] = (flat_config(entry["config"]), _extras(entry["axes"], covered))
        except (KeyError, TypeError, AttributeError) as e:
            raise ReportError(
                f"{manifest_file}: not a grid manifest ({type(e).__name__}: {e})"
            ) from None
    root = runs_dir.resolve()
    with_config = {p.parent.resolve() for p in runs_dir.rglob("config.yaml")}
    # A run's checkpoints and the folders rsmatch-push stages (hub/, hub-detector/) keep a copy
    # of its config.yaml: a folder inside a run is no run.
    folders = {p for p in with_config if not with_config.intersection(p.parents)}
    runs = []
    for path in sorted(folders | set(expected)):
        cfg = _run_config(path, expected)
        record = _load_json(path / "run.json")
        ratio, labels = _split(cfg, record)
        git = record.get("git") or {}
        commit = git.get("commit")
        if commit and git.get("dirty"):
            commit += "+dirty"
        metrics = _load_json(path / "metrics.json") or None
        evals = read_evals(path)
        state = "done" if metrics else (f"stopped at step {evals[-1]['step']}" if evals else
                                        "started" if (path / "config.yaml").is_file() else "not started")  # fmt: skip
        extras = expected.get(path, ({}, ()))[1]
        # named from runs_dir: two grids under it may hold runs of the same name
        name = str(path.relative_to(root)) if path != root and root in path.parents else path.name
        runs.append(RunInfo(name, path, method_name(cfg, extras), ratio, labels,
                            int(cfg.get("train.seed", 0)), cfg, commit, metrics, evals, state))  # fmt: skip
    return runs


# --- cells -----------------------------------------------------------------------------------


@dataclass
class Stat:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.mean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else math.nan

    def text(self, scale: float = 100.0) -> str:
        if not self.values:
            return "–"
        std = "n/a" if self.n == 1 else f"{scale * self.std:.2f}"
        return f"{scale * self.mean:.2f} ± {std}"


@dataclass
class Cell:
    method: str
    labels: int
    ratio: float
    runs: list[RunInfo]

    @property
    def done(self) -> list[RunInfo]:
        return [r for r in self.runs if r.metrics is not None]

    @property
    def missing(self) -> list[RunInfo]:
        return [r for r in self.runs if r.metrics is None]

    def stat(self, key: str) -> Stat:
        return Stat([float(r.metrics[key]) for r in self.done if key in r.metrics])

    def warnings(self) -> list[str]:
        """Runs of one cell should differ only by seed: say where they do not."""
        out = []
        commits = sorted({r.commit or "unknown" for r in self.done})
        if len(commits) > 1:
            out.append(f"runs differ in commit ({', '.join(map(_short_commit, commits))})")
        if self.done:
            ref = self.done[0]
            for other in self.done[1:]:
                keys = sorted(
                    k for k in ref.config.keys() | other.config.keys()
                    if k not in IGNORED_IN_COMPARISON and ref.config.get(k) != other.config.get(k)
                )  # fmt: skip
                if keys:
                    out.append(
                        f"{ref.name} and {other.name} differ in config: {', '.join(keys[:5])}"
                    )
        return out


def make_cells(runs: list[RunInfo]) -> list[Cell]:
    groups: dict[tuple, list[RunInfo]] = defaultdict(list)
    for r in runs:
        groups[r.cell].append(r)
    cells = [Cell(m, lab, rat, sorted(rs, key=lambda r: (r.seed, r.name)))
             for (m, (lab, rat)), rs in groups.items()]  # fmt: skip
    return sorted(cells, key=lambda c: (_method_order(c.method), c.labels, c.ratio))


def columns(cells: list[Cell]) -> list[tuple[int, float]]:
    return sorted({(c.labels, c.ratio) for c in cells})


def methods(cells: list[Cell]) -> list[str]:
    return sorted({c.method for c in cells}, key=_method_order)


def column_title(col: tuple[int, float]) -> str:
    return f"r = {col[1]:g}, {col[0]} labels"


# --- tables ----------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _short_commit(commit: str, length: int = 12) -> str:
    """The hash shortened, its `+dirty` kept: a dirty tree is not the commit's code."""
    sha, plus, rest = commit.partition("+")
    return sha[:length] + plus + rest


def _commit_link(commit: str | None, repo_url: str | None) -> str:
    if not commit:
        return "unknown"
    short = _short_commit(commit, 7)
    if repo_url and commit != "unknown":
        return f"[`{short}`]({repo_url.rstrip('/')}/commit/{commit.split('+')[0]})"
    return f"`{short}`"


def _cell_text(cell: Cell | None, key: str, bold: bool) -> str:
    if cell is None:
        return ""
    stat = cell.stat(key)
    expected = len(cell.runs)
    missing = f", {len(cell.missing)} missing" if cell.missing else ""
    if not stat.values:
        return f"missing (0 of {expected})"
    value = f"**{stat.text()}**" if bold else stat.text()
    return f"{value} (n={stat.n}{missing})"


def accuracy_table(cells: list[Cell], key: str, links: dict[str, str]) -> str:
    """Markdown: rows methods, columns ratio x labels, the best mean of a column in bold."""
    cols, by = columns(cells), {(c.method, (c.labels, c.ratio)): c for c in cells}
    best = {}
    for col in cols:
        means = [by[m, col].stat(key).mean for m in methods(cells) if (m, col) in by]
        means = [x for x in means if not math.isnan(x)]
        best[col] = max(means) if means else None
    lines = ["| method | " + " | ".join(column_title(c) for c in cols) + " | runs |",
             "|---|" + "---|" * (len(cols) + 1)]  # fmt: skip
    for m in methods(cells):
        row = []
        for col in cols:
            cell = by.get((m, col))
            mean = cell.stat(key).mean if cell else math.nan
            row.append(_cell_text(cell, key, bold=mean == best[col]))
        lines.append(f"| {m} | " + " | ".join(row) + f" | {links[m]} |")
    return "\n".join(lines)


def detector_keys(cells: list[Cell]) -> list[str]:
    gens = sorted({k for c in cells for r in c.done for k in r.metrics
                   if k.startswith("detector_acc/")})  # fmt: skip
    return ["detector_acc", "detector_precision", "detector_recall", *gens]


def detector_table(cells: list[Cell]) -> str | None:
    """Markdown: one row per method and column with a detector; accuracy etc. in %."""
    cells = [c for c in cells if any("detector_acc" in r.metrics for r in c.done)]
    if not cells:
        return None
    keys = detector_keys(cells)
    heads = ["accuracy", "precision", "recall", *(f"acc. {k.split('/', 1)[1]}" for k in keys[3:])]
    lines = ["| method | setting | " + " | ".join(heads) + " | n |",
             "|---|---|" + "---|" * (len(keys) + 1)]  # fmt: skip
    for c in cells:
        stats = [c.stat(k) for k in keys]
        lines.append(f"| {c.method} | {column_title((c.labels, c.ratio))} | "
                     + " | ".join(s.text() for s in stats) + f" | {stats[0].n} |")  # fmt: skip
    return "\n".join(lines)


def write_csv(cells: list[Cell], out: Path) -> None:
    """Long form, one line per cell, accuracies in % unrounded."""
    keys = detector_keys(cells)
    fields = ["method", "replace_ratio", "labels_per_class", "n", "n_missing", "best_mean",
              "best_std", "final_mean", "final_std",
              *(f"{k}_{s}" for k in keys for s in ("mean", "std")), "commits", "warnings"]  # fmt: skip
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for c in cells:
            row = {"method": c.method, "replace_ratio": c.ratio, "labels_per_class": c.labels,
                   "n": len(c.done), "n_missing": len(c.missing),
                   "commits": " ".join(sorted({r.commit or "unknown" for r in c.done})),
                   "warnings": "; ".join(c.warnings())}  # fmt: skip
            for col, key in (("best", "best_acc"), ("final", "test_acc"), *((k, k) for k in keys)):
                stat = c.stat(key)
                row[f"{col}_mean"] = "" if not stat.n else 100 * stat.mean
                row[f"{col}_std"] = "" if stat.n < 2 else 100 * stat.std
            w.writerow(row)


def _row_links(cells: list[Cell], out: Path, repo_url: str | None) -> dict[str, str]:
    """Per method: the commit(s) of its runs and a copy of one run's config in the report."""
    (out / "configs").mkdir(exist_ok=True)
    links = {}
    for m in methods(cells):
        runs = [r for c in cells if c.method == m for r in c.done]
        commits = sorted({r.commit for r in runs if r.commit})
        text = ", ".join(_commit_link(c, repo_url) for c in commits) or "–"
        if runs:
            name = f"configs/{_slug(m)}.yaml"
            shutil.copyfile(runs[0].path / "config.yaml", out / name)
            text += f" · [config]({name})"
        links[m] = text
    return links


# --- the report ------------------------------------------------------------------------------


def write_report(runs_dir: Path, out: Path, repo_url: str | None = None,
                 command: str | None = None) -> Path:  # fmt: skip
    """Tables (Markdown and CSV), figures and a README.md in ``out``; returns the README."""
    from rsmatch import figures  # matplotlib only when a report is written

    runs = collect(runs_dir)
    if not runs:
        raise FileNotFoundError(f"{runs_dir}: no runs (folders with config.yaml) found")
    out.mkdir(parents=True, exist_ok=True)
    cells = make_cells(runs)
    links = _row_links(cells, out, repo_url)
    best = accuracy_table(cells, "best_acc", links)
    final = accuracy_table(cells, "test_acc", links)
    det = detector_table(cells)
    write_csv(cells, out / "table.csv")
    tables = ["## Best test accuracy (%)", "", best, "", "## Final test accuracy (%)", "", final]
    if det:
        tables += ["", "## Detector on the unlabeled pool (%, final evaluation)", "", det]
    (out / "tables.md").write_text("\n".join(tables) + "\n", encoding="utf-8")
    made = figures.write_all(cells, out)

    done = sum(r.metrics is not None for r in runs)
    lines = [f"# Report: `{runs_dir}`", ""]
    if command:
        lines += [f"Regenerate with `{command}`.", ""]
    lines += [
        f"{done} of {len(runs)} runs finished. Cells: mean ± sample std over seeds "
        "(n/a for one seed) and the number of finished runs n. Best = the highest test "
        "accuracy of the EMA model over the run's evaluations; final = at the last step. "
        "The best mean of each column is bold. Numbers also in [table.csv](table.csv).",
        "", *tables, "",
    ]  # fmt: skip
    warnings = [f"- {c.method}, {column_title((c.labels, c.ratio))}: {w}"
                for c in cells for w in c.warnings()]  # fmt: skip
    if warnings:
        lines += ["## Warnings", "", *warnings, ""]
    missing = [r for r in runs if r.metrics is None]
    if missing:
        lines += ["## Missing runs", "", *(f"- `{r.name}`: {r.state}" for r in missing), ""]
    if made:
        lines += ["## Figures", ""]
    for file, caption in made:
        lines += [f"**{caption}**", "", f"![{caption}]({file})", ""]
    readme = out / "README.md"
    readme.write_text("\n".join(lines), encoding="utf-8")
    return readme
