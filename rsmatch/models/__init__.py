"""Networks: timm backbones (WRNs registered in `wrn`), heads, and the classifier."""

from __future__ import annotations

import timm
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from rsmatch.models import wrn  # noqa: F401  (registers wrn28_2, wrn28_8, ... with timm)


class Normalize(nn.Module):
    """uint8 NCHW images -> normalised floats, so data, queue and export all stay uint8."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        self.channels_last = False  # set by the trainer with train.channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:  # floats in [0, 1] would be normalised as 0-255: wrong, silently
            raise TypeError(f"the model takes uint8 images (0-255), got {x.dtype}")
        x = (x.float() - self.mean) / self.std
        # Both ways explicitly: the augmented batches come out channels_last-strided, and
        # without this the convolutions ran channels_last with NCHW weights even when off.
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=layout)


def create_encoder(
    name: str, small_stem: bool = False, bn_momentum: float | None = None
) -> nn.Module:
    """A timm backbone returning pooled features (`num_classes=0`); random init, no download."""
    try:
        encoder = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as e:  # timm raises RuntimeError for unknown names
        raise ValueError(f"unknown backbone {name!r}: {e}") from None
    if small_stem:
        if not (hasattr(encoder, "conv1") and hasattr(encoder, "maxpool")):
            raise ValueError(f"small_stem needs a ResNet-style model (conv1 + maxpool): {name!r}")
        old = encoder.conv1
        encoder.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False)
        encoder.maxpool = nn.Identity()
    if bn_momentum is not None:
        for m in encoder.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = bn_momentum
    return encoder


def linear_head(cin: int, cout: int) -> nn.Linear:
    layer = nn.Linear(cin, cout)
    nn.init.xavier_normal_(layer.weight)  # USB's head init
    nn.init.zeros_(layer.bias)
    return layer


class Classifier(nn.Module, PyTorchModelHubMixin, library_name="rsmatch", tags=["rsmatch"]):
    """Encoder f + real head h_r (+ fake head h_f for RSMatch, + projection for SimMatch).

    forward(uint8 images) -> {"logits", "feat"[, "fake_logits"][, "proj"]}.
    Only normalize, encoder and head are needed for inference (`inference_state_dict`).
    `save_pretrained` / `from_pretrained` (a folder or a Hub id) come from huggingface_hub's
    mixin, which records the constructor's arguments in config.json.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        mean: list[float],
        std: list[float],
        small_stem: bool = False,
        bn_momentum: float | None = None,
        fake_head: bool = False,
        proj_size: int = 0,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.backbone_name, self.class_names = backbone, class_names
        self.normalize = Normalize(mean, std)
        self.encoder = create_encoder(backbone, small_stem, bn_momentum)
        width = self.encoder.num_features
        self.head = linear_head(width, num_classes)
        self.fake_head = linear_head(width, num_classes) if fake_head else None
        # SimMatch's projection: Linear -> ReLU -> Linear, L2-normalised in forward.
        self.proj = (
            nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, proj_size))
            if proj_size
            else None
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.encoder(self.normalize(x))
        out = {"logits": self.head(feat), "feat": feat}
        if self.fake_head is not None:
            out["fake_logits"] = self.fake_head(feat)
        if self.proj is not None:
            out["proj"] = nn.functional.normalize(self.proj(feat), dim=1)
        return out

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder + real head only: RSMatch adds no inference cost."""
        return {
            k: v for k, v in self.state_dict().items() if k.split(".")[0] in ("encoder", "head")
        }


class Detector(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="rsmatch",
    tags=["rsmatch", "synthetic-image-detection"],
):
    """Deepfake detector: its own light encoder g and a binary head d (0 real, 1 synthetic).

    The keyword arguments make an export self-describing (config.json): the input size images
    are resized to, the threshold on the synthetic score above which an image is called
    synthetic (0.5 = the argmax RSMatch routes by), and the real set it was trained on.
    """

    def __init__(
        self,
        backbone: str,
        mean: list[float],
        std: list[float],
        bn_momentum: float | None = None,
        image_size: list[int] | None = None,
        threshold: float = 0.5,
        class_names: list[str] | None = None,
        real_set: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone_name, self.image_size, self.threshold = backbone, image_size, threshold
        self.class_names, self.real_set = class_names, real_set
        self.mean, self.std = list(mean), list(std)
        self.normalize = Normalize(mean, std)
        self.encoder = create_encoder(backbone, bn_momentum=bn_momentum)
        self.head = linear_head(self.encoder.num_features, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.normalize(x)))

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Synthetic score: softmax probability of the synthetic class, in fp32 (inference: no
        autograd graph is kept, whatever the batch size)."""
        return self(x).float().softmax(-1)[:, 1]
