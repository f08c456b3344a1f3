"""FreeMatch (Wang et al. 2023) as in USB: self-adaptive thresholds and the fairness loss.

EMA (m = `freematch.ema_p`) of the mean confidence (global threshold time_p), of the mean
class probabilities (p_model) and of the hard-label histogram (label_hist), all from the weak
probabilities gathered over ranks, updated before masking. mask = max p >= time_p * p_model[c] /
max(p_model). The fairness term, weighted by `freematch.ent_loss_ratio` and computed only when
something passes the mask, is USB's: sum_c SumNorm(p_model / label_hist)_c *
log SumNorm(mean p_s / hist_s)_c over the masked strong predictions (a negative cross-entropy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rsmatch.algorithms.base import DataInfo, PseudoLabels, SSLAlgorithm, StepContext, Views
from rsmatch.config import Config, check, option
from rsmatch.data.batch import Batch
from rsmatch.registry import register_algorithm


@dataclass
class FreeMatchConfig:
    ema_p: float = option(0.999, "EMA momentum of the self-adaptive thresholds.")
    ent_loss_ratio: float = option(0.001, "Weight of the fairness loss (USB CIFAR configs).")

    def validate(self) -> None:
        check(0 <= self.ema_p <= 1, "freematch.ema_p", self.ema_p, "not in [0, 1]")


def _sum_norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum()


def _safe_inverse(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(1.0 / x, nan=0.0, posinf=0.0, neginf=0.0)


def fairness_loss(
    logits_s: torch.Tensor, mask: torch.Tensor, p_model: torch.Tensor, label_hist: torch.Tensor
) -> torch.Tensor:
    probs_s = logits_s[mask.bool()].float().softmax(-1)
    hist_s = _sum_norm(torch.bincount(probs_s.argmax(-1), minlength=probs_s.shape[1]).float())
    target = _sum_norm(p_model * _safe_inverse(label_hist))
    estimate = _sum_norm(probs_s.mean(0) * _safe_inverse(hist_s))
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
        hist = torch.bincount(pred, minlength=self.num_classes).float()
        self.label_hist = m * self.label_hist + (1 - m) * hist / hist.sum()

    def pseudo_labels(self, views: Views, batch: Batch, ctx: StepContext) -> PseudoLabels:
        probs = views.w["logits"].detach().float().softmax(-1)
        self.update_thresholds(ctx.gather(probs))
        conf, pred = probs.max(-1)
        p_model = self.p_model
        mask = (conf >= self.time_p * p_model[pred] / p_model.max()).float()
        losses = {}
        if mask.sum() > 0:
            loss_fair = fairness_loss(views.s["logits"], mask, p_model, self.label_hist)
            losses["loss_fair"] = self.cfg.freematch.ent_loss_ratio * loss_fair
        return PseudoLabels(pred, mask, losses, {"time_p": self.time_p[0]})
