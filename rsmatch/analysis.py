"""Analysis figures of a finished run: t-SNE of the classifier's features, GradCAM++ maps.

Both read the run's exported classifier (`RUN/model`), its config (to rebuild the same RS-SSL
split, so run from the folder the run was trained from) and, when present, the exported
detector (`RUN/detector`). Ground truth (class, real or synthetic) is used for colouring only.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from rsmatch.config import ConfigError, load_config  # noqa: E402
from rsmatch.data.decode import decode  # noqa: E402
from rsmatch.data.loaders import load_benchmark_from_config  # noqa: E402
from rsmatch.export import load_classifier, load_detector  # noqa: E402
from rsmatch.runfolder import exported_model_problem  # noqa: E402


class Pool:
    """A seeded sample of the run's unlabeled pool with its ground truth."""

    def __init__(self, run: Path, samples: int, seed: int) -> None:
        datasets.disable_progress_bars()
        cfg = load_config(run / "config.yaml")
        dd, _ = load_benchmark_from_config(cfg.data)
        ds = dd["unlabeled"]
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(ds), size=min(samples, len(ds)), replace=False))
        ds = ds.select(idx.tolist())
        self.images = decode(ds)
        self.labels = np.asarray(ds["label"])
        self.synthetic = np.asarray(ds["is_synthetic"], dtype=bool)
        self.generator = np.asarray(ds["generator"])
        self.class_names = dd["test"].features["label"].names


@torch.no_grad()
def features(classifier: nn.Module, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    return torch.cat([classifier(images[i : i + batch])["feat"].float()
                      for i in range(0, len(images), batch)]).numpy()  # fmt: skip


def tsne_figure(pool: Pool, feats: np.ndarray, seed: int, path: Path) -> None:
    """Left: coloured by class, o real / x synthetic. Right: coloured by provenance."""
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (len(feats) - 1) / 3)
    xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(feats)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6))
    n_cls = len(pool.class_names)
    cmap = plt.get_cmap("tab10" if n_cls <= 10 else "tab20" if n_cls <= 20 else "hsv")
    for c in range(n_cls):
        colour = cmap(c % cmap.N if n_cls <= 20 else c / n_cls)
        for synth, marker in ((False, "o"), (True, "x")):
            sel = (pool.labels == c) & (pool.synthetic == synth)
            left.scatter(*xy[sel].T, s=10, marker=marker, color=colour, alpha=0.7, lw=0.8,
                         label=pool.class_names[c] if not synth and n_cls <= 20 else None)  # fmt: skip
    left.set_title("by class (o real, x synthetic)")
    if n_cls <= 20:
        left.legend(fontsize=7, markerscale=2, loc="best")
    sources = ["real", *sorted(set(pool.generator[pool.synthetic].tolist()))]
    for i, src in enumerate(sources):
        sel = ~pool.synthetic if src == "real" else pool.generator == src
        right.scatter(*xy[sel].T, s=10, marker="o" if src == "real" else "x", alpha=0.7, lw=0.8,
                      color=plt.get_cmap("Set1")(i), label=f"{src} ({sel.sum()})")  # fmt: skip
    right.set_title("by provenance")
    right.legend(fontsize=8, markerscale=2)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"t-SNE of encoder features, {len(feats)} unlabeled images (seed {seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _CamModel(nn.Module):
    """normalize -> timm forward_features -> (hook point) -> pooled -> head, on uint8 images.

    GradCAM++ needs the last spatial feature map of any timm backbone; `fmap` is an identity
    that exposes it (no gradient on the images is needed).
    """

    def __init__(self, normalize: nn.Module, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.normalize, self.encoder, self.head = normalize, encoder, head
        self.fmap = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fmap(self.encoder.forward_features(self.normalize(x)))
        return self.head(self.encoder.forward_head(f, pre_logits=True))


def cam_target(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(model on uint8 images -> logits, layer to explain) for an exported classifier or
    detector (each a Normalize, a timm encoder and a head): the encoder's last feature map."""
    wrapped = _CamModel(model.normalize, model.encoder, model.head).eval()
    return wrapped, wrapped.fmap


def pick_grid(pool: Pool, per_class: int, classes: int, seed: int) -> tuple[list[int], int]:
    """Indices of `per_class` real then `per_class` synthetic images for the first classes."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(min(classes, len(pool.class_names))):
        for synth in (False, True):
            idx = np.flatnonzero((pool.labels == c) & (pool.synthetic == synth))
            chosen = rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist()
            out.extend(chosen + [-1] * (per_class - len(chosen)))  # -1: an empty slot
    return out, min(classes, len(pool.class_names))


def gradcam_figure(model: nn.Module, pool: Pool, grid: list[int], rows: int, per_class: int,
                   target: str, path: Path, title: str) -> None:  # fmt: skip
    """GradCAM++ overlays: one row per class, real images left, synthetic right.

    target "class": the real head's logit of the true class; "synthetic": the detector's
    synthetic logit.
    """
    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net, layer = cam_target(model)
    used = [i for i in grid if i >= 0]
    images = pool.images[used]  # uint8, as the models take them
    labels = pool.labels[used] if target == "class" else np.ones(len(used), dtype=int)
    with GradCAMPlusPlus(net, target_layers=[layer]) as cam:
        maps = cam(images, targets=[ClassifierOutputTarget(int(y)) for y in labels])
    with torch.no_grad():
        probs = torch.softmax(net(images), -1).numpy()
    overlay = {i: (show_cam_on_image(pool.images[i].permute(1, 2, 0).numpy() / 255.0, m,
                                     use_rgb=True), probs[k, labels[k]])
               for k, (i, m) in enumerate(zip(used, maps))}  # fmt: skip
    cols = 2 * per_class
    fig, axes = plt.subplots(
        rows, cols, figsize=(1.3 * cols + 1.2, 1.35 * rows + 0.8), squeeze=False
    )
    for r in range(rows):
        for c in range(cols):
            ax, i = axes[r][c], grid[r * cols + c]
            ax.axis("off")
            if i >= 0:
                img, p = overlay[i]
                ax.imshow(img, interpolation="nearest")
                ax.set_title(f"{'syn' if c >= per_class else 'real'} p={p:.2f}", fontsize=6)
            if c == 0:
                ax.text(-0.1, 0.5, pool.class_names[r], transform=ax.transAxes, ha="right",
                        va="center", fontsize=7)  # fmt: skip
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def load_run_detector(run: Path) -> nn.Module | None:
    """The run's exported detector, or None when the run has none (non-RSMatch runs, or
    runs trained before detectors were exported)."""
    folder = run / "detector"
    return load_detector(folder) if folder.is_dir() else None


def analyze(run: Path, out: Path, samples: int = 1000, per_class: int = 2,
            classes: int | None = None, seed: int = 0) -> list[Path]:  # fmt: skip
    """Write tsne.png, gradcam_classifier.png and (with a detector) gradcam_detector.png; the
    GradCAM++ grids show `classes` classes (default: the run's first 10)."""
    if problem := exported_model_problem(run):  # else `run/model` could be read as a Hub id
        raise FileNotFoundError(problem)
    classifier = load_classifier(run / "model")
    pool = Pool(run, samples, seed)
    if classes is None:
        classes = min(10, len(pool.class_names))
    elif classes > len(pool.class_names):  # the grid would show fewer rows than asked for
        raise ConfigError(f"--classes {classes}: the run has {len(pool.class_names)} classes")
    out.mkdir(parents=True, exist_ok=True)
    made = [out / "tsne.png"]
    tsne_figure(pool, features(classifier, pool.images), seed, made[0])
    grid, rows = pick_grid(pool, per_class, classes, seed)
    made.append(out / "gradcam_classifier.png")
    gradcam_figure(classifier, pool, grid, rows, per_class, "class", made[-1],
                   "GradCAM++ of the classifier's real head (true class); p = its probability")  # fmt: skip
    detector = load_run_detector(run)
    if detector is not None:
        made.append(out / "gradcam_detector.png")
        gradcam_figure(detector, pool, grid, rows, per_class, "synthetic", made[-1],
                       "GradCAM++ of the detector (synthetic logit); p = P(synthetic)")  # fmt: skip
    return made
