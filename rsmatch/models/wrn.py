"""WideResNet exactly as USB defines it (semilearn/nets/wrn/wrn.py), registered with timm.

`timm.create_model("wrn28_2", num_classes=10)` works once this module is imported (importing
`rsmatch.models` does it). Kept from USB on purpose: pre-activation blocks, LeakyReLU(0.1),
BatchNorm momentum 0.001 (eps 0.001 on the final BatchNorm only; the blocks keep PyTorch's 1e-5,
as USB's have since semilearn 0.3.0), a bias on the stem conv only, activation before the residual in
stage 1 only, and USB's quirk that the first block of stages 2 and 3 feeds its *raw* input to
conv1 (its bn1 output is unused; it still counts as a parameter and updates running stats).
"""

from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, register_model
from torch import nn

BN_MOMENTUM = 0.001
BLOCK_EPS, FINAL_EPS = 1e-5, 1e-3  # USB's: PyTorch's default in the blocks, 0.001 at the end


def _bn(channels: int, eps: float = BLOCK_EPS) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=eps)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool) -> None:
        super().__init__()
        self.bn1, self.relu1 = _bn(cin), nn.LeakyReLU(0.1)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = _bn(cout), nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal_in_out = cin == cout
        self.shortcut = (
            None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        )
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.equal_in_out and self.activate_before_residual:
            x = self.relu1(self.bn1(x))
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equal_in_out else x)))
        out = self.conv2(out)
        return (x if self.equal_in_out else self.shortcut(x)) + out


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 inputs; `forward` returns logits, `forward_features` maps."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 2,
        num_classes: int = 10,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, 1, 1, bias=True)
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [
                BasicBlock(
                    channels[i] if j == 0 else channels[i + 1],
                    channels[i + 1],
                    stride if j == 0 else 1,
                    activate_before_residual=i == 0,
                )
                for j in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn1, self.relu = _bn(channels[3], eps=FINAL_EPS), nn.LeakyReLU(0.1)
        self.num_features = channels[3]
        self.num_classes = num_classes
        self.fc = nn.Linear(channels[3], num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                m.bias.data.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn1(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if "bn" in name or "bias" in name}


def _create(variant: str, depth: int, width: int, pretrained: bool, **kwargs: object) -> WideResNet:
    kwargs.pop("pretrained_cfg", None)  # none exist: no weights are published for these
    kwargs.pop("pretrained_cfg_overlay", None)
    return build_model_with_cfg(
        WideResNet,
        variant,
        pretrained,
        pretrained_cfg={"num_classes": 10, "input_size": (3, 32, 32), "mean": None, "std": None},
        depth=depth,
        widen_factor=width,
        **kwargs,
    )


@register_model
def wrn28_2(pretrained: bool = False, **kwargs: object) -> WideResNet:
    """USB's CIFAR backbone (1.47 M parameters with 10 classes)."""
    return _create("wrn28_2", 28, 2, pretrained, **kwargs)


@register_model
def wrn28_8(pretrained: bool = False, **kwargs: object) -> WideResNet:
    """TorchSSL's CIFAR-100 backbone."""
    return _create("wrn28_8", 28, 8, pretrained, **kwargs)


@register_model
def wrn16_2(pretrained: bool = False, **kwargs: object) -> WideResNet:
    """A lighter classifier for CPU demos and studies."""
    return _create("wrn16_2", 16, 2, pretrained, **kwargs)


@register_model
def wrn16_1(pretrained: bool = False, **kwargs: object) -> WideResNet:
    """The default deepfake detector encoder (ours): about 1/8 of WRN-28-2's FLOPs."""
    return _create("wrn16_1", 16, 1, pretrained, **kwargs)


@register_model
def wrn10_1(pretrained: bool = False, **kwargs: object) -> WideResNet:
    """The smallest member: tests, and a detector at about half WRN-16-1's cost (docs/speed.md)."""
    return _create("wrn10_1", 10, 1, pretrained, **kwargs)
