"""The report's figures: curves over training steps, mean and a ±1 std band over seeds.

Evaluation curves come from ``evals.jsonl``; per-step training scalars (mask rates) from the
run's TensorBoard events under ``tb/``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from rsmatch.report import Cell, RunInfo, column_title, columns, methods  # noqa: E402

Series = dict[int, float]  # step -> value
MASK_TAGS = ("mask_rate", "mask_real_rate", "mask_fake_rate")


def eval_series(key: str) -> Callable[[RunInfo], Series]:
    def get(run: RunInfo) -> Series:
        return {e["step"]: float(e[key]) for e in run.evals if e.get(key) is not None}

    return get


_TB_CACHE: dict[Path, dict[str, Series]] = {}


def tb_scalars(run: Path) -> dict[str, Series]:
    """Every scalar of the run's TensorBoard log; a step logged twice (after a resume) keeps
    the last value."""
    if run not in _TB_CACHE:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        out: dict[str, Series] = {}
        if (run / "tb").is_dir():
            ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
            ea.Reload()
            for tag in ea.Tags()["scalars"]:
                out[tag] = {e.step: e.value for e in ea.Scalars(tag)}
        _TB_CACHE[run] = out
    return _TB_CACHE[run]


def tb_series(tag: str) -> Callable[[RunInfo], Series]:
    return lambda run: tb_scalars(run.path).get(tag, {})


def band(
    runs: list[RunInfo], get: Callable[[RunInfo], Series]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean and std over the runs that logged each step (std 0 where only one did)."""
    series = [s for s in map(get, runs) if s]
    steps = sorted({k for s in series for k in s})
    values = [[s[k] for s in series if k in s and not math.isnan(s[k])] for k in steps]
    keep = [i for i, v in enumerate(values) if v]
    steps = np.array([steps[i] for i in keep])
    mean = np.array([np.mean(values[i]) for i in keep])
    std = np.array([np.std(values[i], ddof=1) if len(values[i]) > 1 else 0.0 for i in keep])
    return steps, mean, std


def _plot(ax: Axes, runs: list[RunInfo], get: Callable[[RunInfo], Series], label: str,
          color: str | tuple, scale: float = 100.0) -> bool:  # fmt: skip
    """One method's mean over its runs, and a band of one std clipped to what a rate can be
    (every series drawn is a fraction: accuracies, purity, mask rates)."""
    steps, mean, std = band(runs, get)
    if not len(steps):
        return False
    ax.plot(
        steps,
        scale * mean,
        color=color,
        label=label,
        lw=1.5,
        marker="." if len(steps) < 12 else None,
    )
    low, high = np.clip(mean - std, 0.0, 1.0), np.clip(mean + std, 0.0, 1.0)
    ax.fill_between(steps, scale * low, scale * high, color=color, alpha=0.2, lw=0)
    return True


def _grid(nrows: int, ncols: int) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    return fig, axes


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _colors(names: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def accuracy_figure(cells: list[Cell], path: Path) -> bool:
    """Test accuracy over steps, one panel per ratio x labels, one line per method."""
    cols, names = columns(cells), methods(cells)
    colors = _colors(names)
    fig, axes = _grid(1, len(cols))
    drawn = False
    for ax, col in zip(axes[0], cols):
        for c in cells:
            if (c.labels, c.ratio) == col:
                drawn |= _plot(ax, c.done, eval_series("test_acc"), c.method, colors[c.method])
        ax.set(title=column_title(col), xlabel="step", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.has_data():  # a column with no finished run yet has nothing to label
            ax.legend(fontsize=8)
    _save(fig, path)
    return drawn


def detector_figure(cells: list[Cell], path: Path) -> bool:
    """Detector accuracy on the unlabeled pool per generator over steps (paper Figure 4a)."""
    cells = [c for c in cells if any(r.metrics and "detector_acc" in r.metrics for r in c.done)]
    if not cells:
        return False
    gens = sorted({k for c in cells for r in c.done for e in r.evals for k in e
                   if k.startswith("detector_acc/")})  # fmt: skip
    colors = _colors(["detector_acc", *gens])
    fig, axes = _grid(1, len(cells))
    for ax, c in zip(axes[0], cells):
        _plot(ax, c.done, eval_series("detector_acc"), "all", colors["detector_acc"])
        for g in gens:
            _plot(ax, c.done, eval_series(g), g.split("/", 1)[1], colors[g])
        ax.set(title=f"{c.method}, {column_title((c.labels, c.ratio))}", xlabel="step",
               ylabel="detector accuracy (%)")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="generator", title_fontsize=8)
    _save(fig, path)
    return True


def routing_figure(cells: list[Cell], path: Path) -> bool:
    """Queue purity (evaluations) and mask rates (training steps) per method."""
    rows = [("queue purity (%)", eval_series("queue_purity")),
            *((f"{t} (%)", tb_series(t)) for t in MASK_TAGS)]  # fmt: skip
    rows = [(t, g) for t, g in rows if any(g(r) for c in cells for r in c.done)]
    if not rows:
        return False
    cols, colors = columns(cells), _colors(methods(cells))
    fig, axes = _grid(len(rows), len(cols))
    for i, (title, get) in enumerate(rows):
        for j, col in enumerate(cols):
            ax = axes[i][j]
            for c in cells:
                if (c.labels, c.ratio) == col:
                    _plot(ax, c.done, get, c.method, colors[c.method])
            ax.set(title=column_title(col), xlabel="step", ylabel=title)
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=8)
    _save(fig, path)
    return True


def write_all(cells: list[Cell], out: Path) -> list[tuple[str, str]]:
    """Write every figure the cells' runs have data for; returns (file, caption) pairs."""
    _TB_CACHE.clear()  # runs may have logged more since an earlier report in this process
    made = []
    specs = [
        ("accuracy.png", "Test accuracy over training (mean ± std over seeds)", accuracy_figure),
        ("detector.png", "Detector accuracy per generator over training (paper Figure 4a)",
         detector_figure),
        ("routing.png", "Queue purity and mask rates (all, routed real, routed fake)",
         routing_figure),
    ]  # fmt: skip
    for file, caption, draw in specs:
        if draw(cells, out / file):
            made.append((file, caption))
        else:
            (out / file).unlink(missing_ok=True)
    return made
