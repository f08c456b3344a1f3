"""SimMatch (Zheng et al. 2022) as in USB's CIFAR setting (no EMA teacher), vanilla (no EPASS).

A projection head gives L2-normalised embeddings; a labeled memory bank (one slot per labeled
image, features and labels, filled from the labeled batches as they come) turns each weak view
into similarities q = softmax(feat_w @ bank / T). Label unfolding: the teacher distribution is q
scaled by the (distribution-aligned) class probabilities of each bank item's label; label
aggregation: p_hat = alpha * p_w + (1 - alpha) * q summed by label. L_in = CE(teacher,
softmax(feat_s @ bank / T)); L_u = soft CE(strong logits, p_hat) masked by max p_hat >= tau.
L_in and aggregation are off for the first `simmatch.warmup_steps` steps (USB's epoch 0).

Distribution alignment keeps the mean weak probabilities of the last `da_len` global batches
and rescales towards the uniform target. Bank update: normalize(m * bank + (1 - m) * feat) per
item; USB normalises the [dim, n] slab along its sample axis instead (`simmatch.usb_bank_norm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rsmatch.algorithms.base import (
    DataInfo,
    PseudoLabels,
    SSLAlgorithm,
    StepContext,
    Views,
    last_occurrence,
)
from rsmatch.config import Config, check, option
from rsmatch.data.batch import Batch
from rsmatch.registry import register_algorithm


@dataclass
class SimMatchConfig:
    temperature: float = option(0.1, "Temperature T of the similarity distributions.")
    proj_size: int = option(128, "Output size of the projection head.")
    smoothing_alpha: float = option(0.9, "Label aggregation weight alpha.")
    da_len: int = option(32, "Distribution-alignment window, in batches.")
    lambda_in: float = option(1.0, "Weight of the similarity loss L_in.")
    warmup_steps: int = option(
        1024,
        "L_in and aggregation are off for the first N steps: USB's first epoch, 1/1024 of its "
        "2^20 steps (a fixed count here; USB's epoch shrinks with a shorter schedule).",
    )
    bank_momentum: float = option(0.7, "Labeled bank update: normalize(m*bank + (1-m)*feat).")
    usb_bank_norm: bool = option(
        False,
        "Reproduce USB's bank update, which L2-normalises the [dim, n] slab along the sample "
        "axis instead of each item's feature vector.",
    )

    def validate(self) -> None:
        check(self.temperature > 0, "simmatch.temperature", self.temperature, "must be positive")
        check(self.da_len >= 1, "simmatch.da_len", self.da_len, "must be >= 1")
        alpha = self.smoothing_alpha
        check(0 <= alpha <= 1, "simmatch.smoothing_alpha", alpha, "not in [0, 1]")
        check(self.proj_size >= 1, "simmatch.proj_size", self.proj_size, "must be >= 1")
        check(self.lambda_in >= 0, "simmatch.lambda_in", self.lambda_in, "must be >= 0")
        check(self.warmup_steps >= 0, "simmatch.warmup_steps", self.warmup_steps, "must be >= 0")
        m = self.bank_momentum
        check(0 <= m <= 1, "simmatch.bank_momentum", m, "not in [0, 1]")


@register_algorithm("simmatch", SimMatchConfig)
class SimMatch(SSLAlgorithm):
    bank: torch.Tensor
    bank_labels: torch.Tensor
    da_history: torch.Tensor
    da_ptr: torch.Tensor

    def __init__(self, cfg: Config, info: DataInfo) -> None:
        super().__init__(cfg, info)
        s = cfg.simmatch
        self.proj_size = s.proj_size
        gen = torch.Generator().manual_seed(cfg.train.seed)
        bank = F.normalize(torch.randn(s.proj_size, info.num_labeled, generator=gen), dim=0)
        self.register_buffer("bank", bank)
        self.register_buffer("bank_labels", torch.zeros(info.num_labeled, dtype=torch.long))
        self.register_buffer("da_history", torch.zeros(s.da_len, self.num_classes))
        self.register_buffer("da_ptr", torch.zeros(1, dtype=torch.long))

    def align(self, probs: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Distribution alignment towards uniform over the last da_len global batches."""
        history = self.da_history  # the pointer stays a tensor: no host round trip
        history.index_copy_(0, self.da_ptr, ctx.gather(probs).mean(0, keepdim=True))
        self.da_ptr.copy_((self.da_ptr + 1) % len(history))
        aligned = probs * (1.0 / self.num_classes + 1e-6) / (history.mean(0) + 1e-6)
        return aligned / aligned.sum(-1, keepdim=True)

    def update_bank(
        self, feat: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, ctx: StepContext
    ) -> None:
        feat, labels, idx = ctx.gather(feat), ctx.gather(labels), ctx.gather(idx)
        last = last_occurrence(idx, len(self.bank_labels))  # an image twice: its last feature
        feat, labels = feat[last], labels[last]
        m, bank = self.cfg.simmatch.bank_momentum, self.bank
        mixed = m * bank[:, idx] + (1 - m) * feat.t()
        bank[:, idx] = F.normalize(mixed, dim=1 if self.cfg.simmatch.usb_bank_norm else 0)
        self.bank_labels[idx] = labels

    def pseudo_labels(self, views: Views, batch: Batch, ctx: StepContext) -> PseudoLabels:
        # Similarities to the bank in fp32: under bf16/fp16 autocast the matmuls would not be.
        with torch.autocast(views.w["logits"].device.type, enabled=False):
            return self._pseudo_labels(views, batch, ctx)

    def _pseudo_labels(self, views: Views, batch: Batch, ctx: StepContext) -> PseudoLabels:
        s, tau = self.cfg.simmatch, self.cfg.ssl.threshold
        bank, bank_labels = self.bank.clone(), self.bank_labels
        probs_w = self.align(views.w["logits"].detach().float().softmax(-1), ctx)
        feat_w, feat_s = views.w["proj"].detach().float(), views.s["proj"].float()
        labels = bank_labels.expand(len(feat_w), -1)
        with torch.no_grad():
            q = (feat_w @ bank / s.temperature).softmax(-1)
            teacher = q * probs_w.gather(1, labels)  # label unfolding
            teacher = teacher / teacher.sum(-1, keepdim=True)
            aggregated = torch.zeros_like(probs_w).scatter_add(1, labels, q)
            targets = s.smoothing_alpha * probs_w + (1 - s.smoothing_alpha) * aggregated
        student = F.log_softmax(feat_s @ bank / s.temperature, dim=-1)
        loss_in = -(teacher * student).sum(-1).mean()
        if ctx.step < s.warmup_steps:  # USB's first epoch: no L_in, no aggregation
            loss_in, targets = loss_in * 0.0, probs_w
        self.update_bank(views.lb["proj"].detach().float(), batch.y_lb, batch.idx_lb, ctx)
        mask = (targets.max(-1).values >= tau).float()
        return PseudoLabels(targets, mask, {"loss_in": s.lambda_in * loss_in})
