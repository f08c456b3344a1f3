"""Summarise a study folder of runs named METHOD-seedN: a markdown table and a curves plot.

    python tools/summarize_study.py runs/study

Writes OUT/summary.md (test accuracy mean and std per method, detector numbers for RSMatch)
and OUT/curves.png (test accuracy, detector accuracy and queue purity over steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _purity(evaluation: dict) -> str:
    """Queue purity, n/a where the queue held nothing yet (the trainer leaves the key out)."""
    return f"{evaluation['queue_purity']:.3f}" if "queue_purity" in evaluation else "n/a"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f} (n={len(values)})"


def late_means(run: Path, tags: tuple[str, ...], last: int = 100) -> dict[str, float]:
    """Mean of TensorBoard scalars over the last `last` steps of a run."""
    from rsmatch.figures import tb_scalars

    out = {}
    for tag, series in tb_scalars(run).items():
        if tag in tags:
            end = max(series)
            out[tag] = statistics.mean(v for step, v in series.items() if step > end - last)
    return out


MASK_TAGS = (
    "mask_rate",
    "mask_real_rate",
    "mask_fake_rate",
    "batch_detector_acc",
    "labeled_called_synthetic",
)


def main(root: Path) -> None:
    from rsmatch.runinfo import eval_entries

    runs = sorted(p.parent for p in root.glob("*-seed*/metrics.json"))
    by_method: dict[str, list[dict]] = defaultdict(list)
    curves: dict[str, list[list[dict]]] = defaultdict(list)
    for run in runs:
        method = run.name.rsplit("-seed", 1)[0]
        by_method[method].append(json.loads((run / "metrics.json").read_text(encoding="utf-8")))
        curves[method].append(eval_entries(run))
    lines = [
        f"# Study: {root}",
        "",
        "| method | final test acc % | best test acc % | detector acc % | queue purity % | s/run |",
        "|---|---|---|---|---|---|",
    ]
    for method, ms in by_method.items():
        det = [m["detector_acc"] for m in ms if "detector_acc" in m]
        pur = [m["queue_purity"] for m in ms if "queue_purity" in m]
        secs = statistics.mean(m["seconds"] for m in ms)
        lines.append(
            f"| {method} | {_mean_std([m['test_acc'] for m in ms])} | "
            f"{_mean_std([m['best_acc'] for m in ms])} | {_mean_std(det)} | {_mean_std(pur)} | {secs:.0f} |"
        )
    lines += ["", "Mean over the last 100 steps (share of the unlabeled batch passing the confidence mask, "
              "and how it was routed):", "", "| run | " + " | ".join(MASK_TAGS) + " |",
              "|---|" + "---|" * len(MASK_TAGS)]  # fmt: skip
    for run in runs:
        late = late_means(run, MASK_TAGS)
        lines.append(
            f"| {run.name} | "
            + " | ".join(f"{late[t]:.4f}" if t in late else "-" for t in MASK_TAGS)
            + " |"
        )
    lines += [
        "",
        "Per-run detector trajectory (step: detector acc / queue purity / pool called synthetic):",
        "",
    ]
    for method, seeds in curves.items():
        for i, evals in enumerate(seeds):
            if evals and "detector_acc" in evals[0]:
                points = ", ".join(
                    f"{e['step']}: {e['detector_acc']:.3f}/{_purity(e)}/{e['detector_called_synthetic']:.3f}"
                    for e in evals
                )
                lines.append(f"- {method} run {i}: {points}")
    (root / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method, seeds in curves.items():
        for i, evals in enumerate(seeds):
            steps = [e["step"] for e in evals]
            label = f"{method} s{i}"
            axes[0].plot(steps, [e["test_acc"] for e in evals], label=label)
            if evals and "detector_acc" in evals[0]:
                axes[1].plot(steps, [e["detector_acc"] for e in evals], label=label)
                held = [e for e in evals if "queue_purity" in e]  # none while the queue is empty
                axes[2].plot(
                    [e["step"] for e in held], [e["queue_purity"] for e in held], label=label
                )
    for ax, title in zip(axes, ("test accuracy", "detector accuracy (pool)", "queue purity")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "curves.png", dpi=100)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, nargs="?", default=Path("runs/study"),
                    help="the study folder (default runs/study); OUT is this folder")  # fmt: skip
    root = ap.parse_args().root
    sys.stdout.reconfigure(errors="backslashreplace")  # an ASCII console still gets the summary
    if not root.is_dir():
        print(f"summarize_study: error: {root}: no such folder", file=sys.stderr)
        sys.exit(2)
    main(root)
