"""The algorithm interface: a batch in, named losses and metrics out.

An algorithm builds its model, turns a batch into losses (already weighted; the trainer sums
them) and detached metrics, and keeps its own state (thresholds, banks, queues) as tensors in
`state_dict`. It never calls backward, steps an optimizer or touches Accelerate: what it needs
from the distributed world comes through `StepContext`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rsmatch.config import Config
from rsmatch.data.loaders import Batch
from rsmatch.models import Classifier


@dataclass
class StepContext:
    step: int
    generator: torch.Generator  # seeded by (seed, step): identical on every rank
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # all-gather, rank order
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    rank: int = 0
    world: int = 1


@dataclass
class StepOutput:
    losses: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    # Per-unlabeled-sample outputs aligned with batch.idx_ulb (e.g. the detector's calls),
    # compared with provenance by the trainer for evaluation only.
    probes: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class PseudoLabels:
    targets: torch.Tensor  # [N] class ids or [N, C] soft targets
    mask: torch.Tensor  # [N] float weights in [0, 1]
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # extra weighted losses
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def portable(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (what safetensors saves), keys optionally prefixed."""
    return {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in state.items()}


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample CE for hard (long [N]) or soft (float [N, C]) targets."""
    if targets.dtype == torch.long:
        return F.cross_entropy(logits, targets, reduction="none")
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1)


class Algorithm:
    name = "base"
    uses_unlabeled = True
    proj_size = 0  # > 0 adds a projection head to the classifier (SimMatch)

    def __init__(self, cfg: Config, num_classes: int, num_labeled: int, num_unlabeled: int) -> None:
        self.cfg, self.num_classes = cfg, num_classes
        self.num_labeled, self.num_unlabeled = num_labeled, num_unlabeled
        self._state: dict[str, torch.Tensor] = {}

    def build_model(self, fake_head: bool = False) -> nn.Module:
        m, d = self.cfg.model, self.cfg.data
        return Classifier(
            m.backbone, self.num_classes, d.mean, d.std, m.small_stem, m.bn_momentum,
            fake_head=fake_head, proj_size=self.proj_size,
        )  # fmt: skip

    def step(self, model: nn.Module, batch: Batch, ctx: StepContext) -> StepOutput:
        raise NotImplementedError

    # -- state: named tensors, saved as safetensors with the checkpoint ----------------------
    def state(self, name: str) -> torch.Tensor:
        return self._state[name]

    def set_state(self, name: str, value: torch.Tensor) -> None:
        self._state[name] = value

    def state_dict(self) -> dict[str, torch.Tensor]:
        return portable(self._state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self._state) - set(state)
        if missing:
            raise KeyError(f"algorithm state is missing {sorted(missing)}")
        for k, v in state.items():
            if k in self._state:
                self._state[k] = v.to(self._state[k].device)

    def to(self, device: torch.device) -> Algorithm:
        self._state = {k: v.to(device) for k, v in self._state.items()}
        return self


class Supervised(Algorithm):
    """Labeled images only: L_s."""

    name = "supervised"
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
    wraps any of them by reusing `forward` and `pseudo_labels`.
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


class FixMatch(SSLAlgorithm):
    """Hard pseudo-labels from the weak view kept when max p >= tau."""

    name = "fixmatch"

    def pseudo_labels(self, views: Views, batch: Batch, ctx: StepContext) -> PseudoLabels:
        probs = views.w["logits"].detach().float().softmax(-1)
        conf, targets = probs.max(-1)
        return PseudoLabels(targets, (conf >= self.cfg.ssl.threshold).float())
