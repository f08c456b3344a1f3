"""FlexMatch (Zhang et al. 2021) as in USB: class-wise thresholds from learning effects.

sigma_c = (samples whose selected label is c) / max over buckets, where buckets include the
never-selected "-1" bucket while `flexmatch.thresh_warmup` (USB's default). The mask uses the
convex map tau * sigma / (2 - sigma) of the sample's predicted class, with sigma from the
previous step; then samples with max p >= tau record their prediction. Counting is a tensor
histogram (no Python Counter, no host round trip). Unlike USB (which updates each rank's copy
from its own samples only), the selections are all-gathered, so every rank holds the same
state as a one-process run.
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
    last_occurrence,
)
from rsmatch.config import Config, option
from rsmatch.data.batch import Batch
from rsmatch.registry import register_algorithm


@dataclass
class FlexMatchConfig:
    thresh_warmup: bool = option(
        True, "Count never-selected samples in the normaliser (USB default, warm-up)."
    )


@register_algorithm("flexmatch", FlexMatchConfig)
class FlexMatch(SSLAlgorithm):
    selected_label: torch.Tensor
    classwise_acc: torch.Tensor

    def __init__(self, cfg: Config, info: DataInfo) -> None:
        super().__init__(cfg, info)
        self.register_buffer("selected_label", torch.full((info.num_unlabeled,), -1))
        self.register_buffer("classwise_acc", torch.zeros(self.num_classes))

    def learning_effect(self, selected: torch.Tensor) -> torch.Tensor:
        """sigma_c; the current one while every sample sits in one bucket (USB leaves it)."""
        counts = class_counts(selected + 1, self.num_classes + 1)
        norm = counts.max() if self.cfg.flexmatch.thresh_warmup else counts[1:].max()
        # A tensor condition, not `if`: deciding on the host would wait for the device.
        return torch.where(counts.max() < len(selected), counts[1:] / norm, self.classwise_acc)

    def pseudo_labels(self, views: Views, batch: Batch, ctx: StepContext) -> PseudoLabels:
        tau = self.cfg.ssl.threshold
        probs = views.w["logits"].detach().float().softmax(-1)
        conf, pred = probs.max(-1)
        sigma = self.classwise_acc[pred]
        mask = (conf >= tau * sigma / (2.0 - sigma)).float()  # the convex mapping
        select = conf >= tau
        idx, pred_all, select_all = ctx.gather(batch.idx_ulb), ctx.gather(pred), ctx.gather(select)
        # Record the selected predictions without a boolean index (its size is data-dependent):
        # unselected ones go to a scratch slot past the end; of an image selected twice in the
        # batch, the last prediction.
        n = len(self.selected_label)
        labels = torch.cat([self.selected_label, self.selected_label.new_empty(1)])
        last = last_occurrence(idx, n, among=select_all).clamp(min=0)
        labels[torch.where(select_all, idx, n)] = pred_all[last]
        self.selected_label.copy_(labels[:-1])
        self.classwise_acc = self.learning_effect(self.selected_label)
        return PseudoLabels(pred, mask)
