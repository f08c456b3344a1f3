"""The algorithm interface: a batch in, named losses and metrics out.

An algorithm builds its model, turns a batch into losses (already weighted; the trainer sums
them) and detached metrics, and keeps its own state (thresholds, banks, queues) as buffers: it
is an `nn.Module`, so `state_dict`, device moves and checkpoints come from PyTorch. It never
calls backward, steps an optimizer or touches Accelerate: what it needs from the distributed
world comes through `StepContext`. Everything the trainer would otherwise have to know about a
particular algorithm is asked here: the batch views it needs (`views`), the images a step pushes
through networks (`forward_images`), the network that classifies (`classifier`), what it
evaluates beyond test accuracy (`evaluate`, `probe_metrics`) and what it exports (`export`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from rsmatch.config import Config
from rsmatch.data.batch import Batch, Provenance, TrainData
from rsmatch.registry import algorithms, register_algorithm

# The models (timm, which imports torchvision and torch._dynamo) and the export (the Hub) are
# imported where a model is built or exported: loading a config imports every algorithm module
# for its dataclass, and a typo in a key should not wait for them (~6 s on 2 cores).
if TYPE_CHECKING:
    from rsmatch.models import Classifier


@dataclass(frozen=True)
class DataInfo:
    """What an algorithm may know of the data: sizes, never provenance."""

    num_classes: int
    num_labeled: int
    num_unlabeled: int
    image_shape: tuple[int, ...]


@dataclass(frozen=True)
class BatchViews:
    """Which parts of a batch the trainer must build."""

    unlabeled: bool = True  # weak and strong views of the unlabeled images
    strong_labeled: bool = False  # a strong view of the labeled images


@dataclass
class StepContext:
    step: int
    generator: torch.Generator  # seeded by (seed, step): identical on every rank
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # all-gather, rank order
    rank: int = 0
    world: int = 1


@dataclass
class StepOutput:
    losses: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    # Per-unlabeled-sample outputs aligned with batch.idx_ulb (e.g. the detector's calls),
    # handed back to the algorithm's `probe_metrics` with provenance, for evaluation only.
    probes: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class EvalContext:
    """What an algorithm's extra evaluation may use. Results go to logs only."""

    ema: nn.Module  # the EMA model, in eval mode
    live: nn.Module  # the trained model, unwrapped, in eval mode
    predict: Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]
    data: TrainData
    warn: Callable[[str], None]


@dataclass
class PseudoLabels:
    targets: torch.Tensor  # [N] class ids or [N, C] soft targets
    mask: torch.Tensor  # [N] float weights in [0, 1]
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # extra weighted losses
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def class_counts(labels: torch.Tensor, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Float histogram of `labels` in [0, n) (optionally weighted), like `bincount(...).float()`.

    `bincount` reads its input's maximum back to the host on CUDA; a scatter-add does not.
    """
    ones = torch.ones_like(labels, dtype=torch.float) if weights is None else weights.float()
    return torch.zeros(n, device=labels.device).index_add_(0, labels, ones)


def last_occurrence(
    idx: torch.Tensor, size: int, among: torch.Tensor | None = None
) -> torch.Tensor:
    """For each position of `idx` (values in [0, size)), the position of the last occurrence of
    its value (only positions where `among` is true count; -1 where there is none).

    An index repeats in a global batch that spans two epochs. A scatter that writes
    `values[last_occurrence(idx, size)]` writes the same value at every copy, so the last one
    wins on any device: a plain index_put leaves which copy wins undefined on CUDA, and ranks
    could then hold different states.
    """
    pos = torch.arange(len(idx), device=idx.device)
    if among is not None:
        pos = torch.where(among, pos, -1)
    return idx.new_full((size,), -1).scatter_reduce_(0, idx, pos, "amax")[idx]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample CE for hard (long [N]) or soft (float [N, C]) targets."""
    if targets.dtype == torch.long:
        return F.cross_entropy(logits, targets, reduction="none")
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1)


class Algorithm(nn.Module):
    name = "base"  # set by @register_algorithm
    uses_unlabeled = True
    proj_size = 0  # > 0 adds a projection head to the classifier (SimMatch)
    progress_metrics: tuple[str, ...] = ("mask_rate",)  # shown on the progress bar

    def __init__(self, cfg: Config, info: DataInfo) -> None:
        super().__init__()
        self.cfg, self.info = cfg, info
        self.num_classes = info.num_classes

    def build_model(self, fake_head: bool = False) -> nn.Module:
        from rsmatch.models import Classifier

        m, d = self.cfg.model, self.cfg.data
        return Classifier(
            m.backbone, self.num_classes, d.mean, d.std, m.small_stem, m.bn_momentum,
            fake_head=fake_head, proj_size=self.proj_size,
        )  # fmt: skip

    def step(self, model: nn.Module, batch: Batch, ctx: StepContext) -> StepOutput:
        raise NotImplementedError

    # -- what the trainer asks instead of knowing algorithms by name -------------------------
    @property
    def views(self) -> BatchViews:
        return BatchViews(unlabeled=self.uses_unlabeled)

    def forward_images(self, labeled: int, unlabeled: int) -> int:
        """Images pushed through networks per step: one forward over (x, u_w, u_s)."""
        return labeled + 2 * unlabeled if self.uses_unlabeled else labeled

    def classifier(self, model: nn.Module) -> Classifier:
        """The network that classifies (evaluated and exported)."""
        return model

    @torch.no_grad()
    def evaluate(self, ev: EvalContext) -> dict[str, float]:
        """Metrics beyond test accuracy, at each evaluation."""
        return {}

    def probe_metrics(
        self, probes: dict[str, torch.Tensor], idx_ulb: torch.Tensor, provenance: Provenance
    ) -> dict[str, torch.Tensor]:
        """Per-step metrics of `StepOutput.probes` against provenance (evaluation only)."""
        return {}

    def export(
        self, ema: nn.Module, live: nn.Module, out: Path, class_names: list[str],
        metrics: dict[str, float],
    ) -> None:  # fmt: skip
        """Write the inference model(s) into `out` (the classifier goes to `out/model`);
        `metrics`: this algorithm's part of the last evaluation, for model cards."""
        from rsmatch.export import export_classifier

        d = self.cfg.data
        export_classifier(self.classifier(ema), out / "model", class_names, d.mean, d.std,
                          self.cfg.model.small_stem, self.cfg.algorithm)  # fmt: skip


@register_algorithm("supervised")
class Supervised(Algorithm):
    """Labeled images only: L_s."""

    uses_unlabeled = False

    def step(self, model: nn.Module, batch: Batch, ctx: StepContext) -> StepOutput:
        logits = model(batch.x_lb)["logits"]
        loss_s = F.cross_entropy(logits, batch.y_lb)
        acc = (logits.argmax(1) == batch.y_lb).float().mean()
        return StepOutput({"loss_s": loss_s}, {"train_acc": acc.detach()})


@dataclass
class Views:
    """Classifier outputs of one forward over cat(x_lb, u_w, u_s), split back apart."""

    lb: dict[str, torch.Tensor]
    w: dict[str, torch.Tensor]
    s: dict[str, torch.Tensor]


class SSLAlgorithm(Algorithm):
    """FixMatch and its family: supervised CE + masked consistency on strong views.

    Subclasses change only `pseudo_labels` (thresholds, soft targets, extra losses); RSMatch
    wraps any of them by reusing `split` and `pseudo_labels`.
    """

    @staticmethod
    def split(out: dict[str, torch.Tensor], b: int, u: int) -> Views:
        """Cut the outputs of one forward over cat(x_lb, u_w, u_s) back into three views."""
        cut = lambda lo, hi: {k: v[lo:hi] for k, v in out.items()}  # noqa: E731
        return Views(cut(0, b), cut(b, b + u), cut(b + u, b + 2 * u))

    def pseudo_labels(self, views: Views, batch: Batch, ctx: StepContext) -> PseudoLabels:
        raise NotImplementedError

    def supervised_loss(self, views: Views, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(views.lb["logits"], batch.y_lb)

    def step(self, model: nn.Module, batch: Batch, ctx: StepContext) -> StepOutput:
        # One forward, as USB: BatchNorm sees labeled and unlabeled images together.
        out = model(torch.cat([batch.x_lb, batch.u_w, batch.u_s]))
        views = self.split(out, len(batch.x_lb), len(batch.u_w))
        pl = self.pseudo_labels(views, batch, ctx)
        loss_u = (cross_entropy(views.s["logits"], pl.targets) * pl.mask).mean()
        losses = {
            "loss_s": self.supervised_loss(views, batch),
            "loss_u": self.cfg.ssl.lambda_u * loss_u,
        }
        return StepOutput(
            {**losses, **pl.losses}, {"mask_rate": pl.mask.mean().detach(), **pl.metrics}
        )


@register_algorithm("fixmatch")
class FixMatch(SSLAlgorithm):
    """Hard pseudo-labels from the weak view kept when max p >= tau."""

    def pseudo_labels(self, views: Views, batch: Batch, ctx: StepContext) -> PseudoLabels:
        probs = views.w["logits"].detach().float().softmax(-1)
        conf, targets = probs.max(-1)
        return PseudoLabels(targets, (conf >= self.cfg.ssl.threshold).float())


def ssl_bases() -> list[str]:
    """Registered algorithms RSMatch can wrap: the SSL family."""
    return sorted(n for n, e in algorithms().items() if issubclass(e.cls, SSLAlgorithm))
