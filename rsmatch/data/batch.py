"""The training data in RAM and the batches cut from it: plain tensors, no `datasets` import.

Algorithms, evaluation and the trainer see only these types.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Provenance:
    """Ground truth about the unlabeled pool: evaluation and the real-only oracle only."""

    is_synthetic: torch.Tensor  # [N_u] bool
    generator: list[str]


@dataclass
class TrainData:
    labeled: torch.Tensor  # [N_l, 3, H, W] uint8
    labeled_y: torch.Tensor
    unlabeled: torch.Tensor  # [N_u, 3, H, W] uint8; labels are never loaded
    test: torch.Tensor
    test_y: torch.Tensor
    class_names: list[str]
    provenance: Provenance
    split_meta: dict

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class Batch:
    """A rank's share of the global batch; images are augmented uint8 views."""

    x_lb: torch.Tensor
    y_lb: torch.Tensor
    idx_lb: torch.Tensor
    x_lb_s: torch.Tensor | None = None  # strong labeled view (when the algorithm asks)
    u_w: torch.Tensor | None = None
    u_s: torch.Tensor | None = None
    idx_ulb: torch.Tensor | None = None
