"""FreeMatch (Wang et al. 2023) as in USB: self-adaptive thresholds and the fairness loss.

EMA (m = `freematch.ema_p`) of the mean confidence (global threshold time_p), of the mean
class probabilities (p_model) and of the hard-label histogram (label_hist), all from the weak
probabilities gathered over ranks, updated before masking. mask = max p >= time_p * p_model[c] /
max(p_model). The fairness term, weighted by `freematch.ent_loss_ratio` when something passes the
mask and by 0 otherwise, is USB's: sum_c SumNorm(p_model / label_hist)_c *
log SumNorm(mean p_s / hist_s)_c over the masked strong predictions (a negative cross-entropy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rsmatch.algorithms.base import (
    DataInfo,
    PseudoLabels,
    SSLAlgorithm,
    StepContext,
    Views,
    class_counts,
)
from rsmatch.config import Config, check, option
from rsmatch.data.batch import Batch
from rsmatch.registry import register_algorithm


@dataclass
class FreeMatchConfig:
    ema_p: float = option(0.999, "EMA momentum of the self-adaptive thresholds.")
    ent_loss_ratio: float = option(0.001, "Weight of the fairness loss (USB CIFAR configs).")

    def validate(self) -> None:
        check(0 <= self.ema_p <= 1, "freematch.ema_p", self.ema_p, "not in [0, 1]")
        ratio = self.ent_loss_ratio
        check(ratio >= 0, "freematch.ent_loss_ratio", ratio, "must be >= 0")


def _sum_norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum()


def _safe_inverse(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(1.0 / x, nan=0.0, posinf=0.0, neginf=0.0)


def fairness_loss(
    logits_s: torch.Tensor, mask: torch.Tensor, p_model: torch.Tensor, label_hist: torch.Tensor
) -> torch.Tensor:
    """USB's fairness term over the strong predictions of the rows with mask 1 (some must be).

    Rows are weighted by the 0/1 mask rather than selected, so the shapes do not depend on the
    data and the host never waits for the device; the mean then sums in another order than over
    the selected rows alone (float32 ulps).
    """
    probs_s = logits_s.float().softmax(-1)
    weights = mask.float()
    counts = class_counts(probs_s.argmax(-1), probs_s.shape[1], weights)
    mean_s = (probs_s * weights[:, None]).sum(0) / weights.sum()
    target = _sum_norm(p_model * _safe_inverse(label_hist))
    estimate = _sum_norm(mean_s * _safe_inverse(_sum_norm(counts)))
    return (target * torch.log(estimate + 1e-12)).sum()


@register_algorithm("freematch", FreeMatchConfig)
class FreeMatch(SSLAlgorithm):
    p_model: torch.Tensor
    label_hist: torch.Tensor
    time_p: torch.Tensor

    def __init__(self, cfg: Config, info: DataInfo) -> None:
        super().__init__(cfg, info)
        uniform = torch.full((self.num_classes,), 1.0 / self.num_classes)
        self.register_buffer("p_model", uniform.clone())
        self.register_buffer("label_hist", uniform.clone())
        self.register_buffer("time_p", uniform.mean().reshape(1))

    def update_thresholds(self, probs: torch.Tensor) -> None:
        m = self.cfg.freematch.ema_p
        conf, pred = probs.max(-1)
        self.time_p = m * self.time_p + (1 - m) * conf.mean()
        self.p_model = m * self.p_model + (1 - m) * probs.mean(0)
        hist = class_counts(pred, self.num_classes)
        self.label_hist = m * self.label_hist + (1 - m) * hist / hist.sum()

    def pseudo_labels(self, views: Views, batch: Batch, ctx: StepContext) -> PseudoLabels:
        probs = views.w["logits"].detach().float().softmax(-1)
        self.update_thresholds(ctx.gather(probs))
        conf, pred = probs.max(-1)
        p_model = self.p_model
        mask = (conf >= self.time_p * p_model[pred] / p_model.max()).float()
        # USB computes the fairness term only when something passes the mask; it is always
        # computed here (on every row when none passes, so it stays finite) and weighted by 0
        # then: every step logs the same keys and the total loss is unchanged.
        passed = mask.sum() > 0
        loss_fair = fairness_loss(
            views.s["logits"], torch.where(passed, mask, 1.0), p_model, self.label_hist
        )
        weight = torch.where(passed, self.cfg.freematch.ent_loss_ratio, 0.0)
        return PseudoLabels(
            pred, mask, {"loss_fair": weight * loss_fair}, {"time_p": self.time_p[0]}
        )
