"""FlexMatch (Zhang et al. 2021) as in USB: class-wise thresholds from learning effects.

sigma_c = (samples whose selected label is c) / max over buckets, where buckets include the
never-selected "-1" bucket while `flexmatch.thresh_warmup` (USB's default). The mask uses the
convex map tau * sigma / (2 - sigma) of the sample's predicted class, with sigma from the
previous step; then samples with max p >= tau record their prediction. Counting uses bincount,
not a Python Counter. Unlike USB (which updates each rank's copy from its own samples only), the
selections are all-gathered, so every rank holds the same state as a one-process run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rsmatch.algorithms.base import DataInfo, PseudoLabels, SSLAlgorithm, StepContext, Views
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

    def learning_effect(self, selected: torch.Tensor) -> torch.Tensor | None:
        """sigma_c, or None while every sample sits in one bucket (USB leaves it unchanged)."""
        counts = torch.bincount(selected + 1, minlength=self.num_classes + 1).float()
        if counts.max() >= len(selected):
            return None
        norm = counts.max() if self.cfg.flexmatch.thresh_warmup else counts[1:].max()
        return counts[1:] / norm

    def pseudo_labels(self, views: Views, batch: Batch, ctx: StepContext) -> PseudoLabels:
        tau = self.cfg.ssl.threshold
        probs = views.w["logits"].detach().float().softmax(-1)
        conf, pred = probs.max(-1)
        sigma = self.classwise_acc[pred]
        mask = (conf >= tau * sigma / (2.0 - sigma)).float()  # the convex mapping
        select = conf >= tau
        idx, pred_all, select_all = ctx.gather(batch.idx_ulb), ctx.gather(pred), ctx.gather(select)
        self.selected_label[idx[select_all]] = pred_all[select_all]
        sigma_new = self.learning_effect(self.selected_label)
        if sigma_new is not None:
            self.classwise_acc = sigma_new
        return PseudoLabels(pred, mask)
