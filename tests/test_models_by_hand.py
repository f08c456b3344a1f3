"""rsmatch/models pinned by hand (WRN arithmetic and USB's quirks, init, heads, Normalize):
behaviour a mutation audit found the other tests left free."""

import math

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from torch import nn

from rsmatch.models import Classifier, Detector, Normalize, create_encoder, linear_head
from rsmatch.models.wrn import WideResNet

MEAN, STD = [0.5] * 3, [0.25] * 3
BLOCK_EPS, FINAL_EPS = 1e-5, 1e-3  # USB's BatchNorm eps: PyTorch's in the blocks, 0.001 at the end


def _bn_eval(x: torch.Tensor, eps: float = BLOCK_EPS) -> torch.Tensor:
    """A fresh BatchNorm in eval mode (running mean 0, var 1, weight 1, bias 0), by hand."""
    return x / math.sqrt(1 + eps)


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    """USB's LeakyReLU(0.1), by hand."""
    return torch.where(x >= 0, x, 0.1 * x)


def _wrn_params(depth: int, k: int, num_classes: int) -> int:
    """WRN-depth-k parameter count from USB's layout, by hand: a biased 3x3 stem, n blocks per
    stage of bn-conv3x3-bn-conv3x3 (+ a 1x1 shortcut where the width changes), a final bn, fc."""
    n = (depth - 4) // 6
    c = [16, 16 * k, 32 * k, 64 * k]
    total = 3 * 16 * 9 + 16
    for s in range(3):
        for j in range(n):
            cin, cout = (c[s] if j == 0 else c[s + 1]), c[s + 1]
            total += 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout
            total += cin * cout if cin != cout else 0
    total += 2 * c[3]
    return total + (c[3] * num_classes + num_classes if num_classes else 0)


# --- Normalize -------------------------------------------------------------------------------


def test_normalize_uses_each_channels_own_mean_and_std():
    """Per-channel mean/std, in RGB order (kills a flipped mean or std)."""
    norm = Normalize([0.1, 0.5, 0.9], [0.1, 0.2, 0.5])
    x = torch.full((1, 3, 1, 1), 51, dtype=torch.uint8)  # 51 / 255 = 0.2
    want = torch.tensor([1.0, -1.5, -1.4]).view(1, 3, 1, 1)  # (0.2-.1)/.1, (0.2-.5)/.2, (0.2-.9)/.5
    torch.testing.assert_close(norm(x), want)


# --- create_encoder and heads ----------------------------------------------------------------


def test_small_stem_conv_is_bias_free_and_keeps_channels():
    """The 3x3 stride-1 stem replaces ResNet's conv1 with no bias (a BN follows)."""
    conv = create_encoder("resnet18", small_stem=True).conv1
    assert conv.bias is None and (conv.in_channels, conv.out_channels) == (3, 64)
    assert conv.padding == (1, 1)


def test_bn_momentum_zero_is_applied_not_ignored():
    """momentum 0.0 (frozen running stats) is a value, not 'unset'."""
    enc = create_encoder("wrn10_1", bn_momentum=0.0)
    assert {m.momentum for m in enc.modules() if isinstance(m, nn.BatchNorm2d)} == {0.0}


def test_linear_head_is_xavier_normal_with_zero_bias():
    """USB's head init: xavier *normal* weights (std sqrt(2/(in+out))) and zero bias."""
    torch.manual_seed(0)
    layer = linear_head(512, 512)
    assert torch.equal(layer.bias, torch.zeros(512))
    std = math.sqrt(2 / (512 + 512))  # 0.0442
    assert abs(layer.weight.std().item() / std - 1) < 0.03
    # a uniform init of the same std is bounded by sqrt(3) * std; a normal one is not
    assert layer.weight.abs().max().item() > 2.5 * std


def test_simmatch_projection_is_linear_relu_linear_at_encoder_width():
    """SimMatch's projection: Linear(w, w) -> ReLU -> Linear(w, proj_size), w = 64 for WRN-10-1."""
    proj = Classifier("wrn10_1", 3, MEAN, STD, proj_size=16).proj
    assert [type(m) for m in proj] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (proj[0].in_features, proj[0].out_features) == (64, 64)
    assert (proj[2].in_features, proj[2].out_features) == (64, 16)


def test_detector_normalises_with_its_own_mean_and_std():
    """Detector's forward is head(encoder((x/255 - mean) / std)), not a plain x/255."""
    torch.manual_seed(0)
    det = Detector("wrn10_1", [0.2, 0.4, 0.6], [0.5, 0.25, 0.125]).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = det.head(det.encoder((x.float() / 255 - mean) / std))
        torch.testing.assert_close(det(x), want, rtol=1e-4, atol=1e-5)


# --- WideResNet ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, depth, k",
    [("wrn28_2", 28, 2), ("wrn28_8", 28, 8), ("wrn16_2", 16, 2), ("wrn16_1", 16, 1),
     ("wrn10_1", 10, 1)],
)  # fmt: skip
def test_registered_wrns_have_their_depth_and_width(name, depth, k):
    """Each timm name builds WRN-depth-k: features 64k, parameters counted by hand."""
    model = timm.create_model(name, num_classes=10)
    assert model.num_features == 64 * k
    assert sum(p.numel() for p in model.parameters()) == _wrn_params(depth, k, 10)
    assert len(model.block1) == len(model.block2) == len(model.block3) == (depth - 4) // 6


def test_wrn28_2_has_usbs_parameter_count():
    """USB's WRN-28-2 with 10 classes: 1,467,626 parameters (the '1.47 M' of its paper)."""
    # stem 448 + stages 70,112 + 279,488 + 1,116,032 + final bn 256 + fc 1,290
    model = timm.create_model("wrn28_2", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 1_467_626


def test_wrn_speaks_timms_model_interface():
    """What timm's own utilities call on a model: the head to replace (get_classifier,
    reset_classifier) and the parameters to keep out of weight decay (no_weight_decay, read by
    timm's create_optimizer_v2). WRN-10-1: one block per stage, so 16 such parameters by hand:
    the stem's bias, bn1 and bn2 (weight, bias) of three blocks, the final bn's two, fc's bias."""
    model = timm.create_model("wrn10_1", num_classes=10)
    assert model.get_classifier() is model.fc
    x = torch.zeros(2, 3, 32, 32, dtype=torch.float32)
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(x).shape == (2, 3)
    model.reset_classifier(0)  # no head: forward gives the pooled features
    assert isinstance(model.get_classifier(), nn.Identity) and model(x).shape == (2, 64)
    model.reset_classifier(10)
    blocks = [
        f"block{s}.0.bn{b}.{t}" for s in (1, 2, 3) for b in (1, 2) for t in ("weight", "bias")
    ]
    assert model.no_weight_decay() == {
        "conv1.bias", *blocks, "bn1.weight", "bn1.bias", "fc.bias"
    }  # fmt: skip
    # filter_bias_and_bn=False: timm would otherwise exclude every 1-D parameter by its rule
    groups = create_optimizer_v2(
        model, "sgd", lr=0.1, weight_decay=5e-4, filter_bias_and_bn=False
    ).param_groups
    plain = [g for g in groups if g["weight_decay"] == 0]
    assert len(plain) == 1 and len(plain[0]["params"]) == 16


def test_wrn_depth_must_be_6n_plus_4():
    """Depth 26 (26 - 4 = 22, not a multiple of 6) is refused."""
    with pytest.raises(ValueError, match=r"6n\+4, got 26"):
        WideResNet(depth=26)


def test_wrn_batchnorm_eps_is_usbs():
    """As USB's WRN (semilearn >= 0.3.0): the final BatchNorm's eps is 0.001, the blocks' keep
    PyTorch's 1e-5 (an eps of 0.001 everywhere was semilearn 0.2's)."""
    enc = create_encoder("wrn10_1")
    eps = {name: m.eps for name, m in enc.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert eps.pop("bn1") == FINAL_EPS
    assert len(eps) == 6 and set(eps.values()) == {BLOCK_EPS}  # 3 blocks x (bn1, bn2)


def test_wrn_downsamples_32_to_8_in_the_first_block_of_stages_2_and_3():
    """Strides 1, 2, 2 on each stage's first block only: 32x32 in, 8x8 maps of 64k channels."""
    enc = create_encoder("wrn16_1").eval()  # two blocks per stage
    with torch.no_grad():
        assert enc.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 64, 8, 8)


def test_wrn_pooled_features_are_the_spatial_mean():
    """The encoder (num_classes=0) returns the global average of the final maps."""
    enc = create_encoder("wrn10_1").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc.forward_features(x).mean(dim=(2, 3)))


def _capture(model: nn.Module, names: list[str]) -> dict:
    """Each named module's (input, output) on the next forward."""
    seen = {}
    for name in names:
        module = model.get_submodule(name)
        module.register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, (args[0].detach(), out.detach()))
        )
    return seen


def test_wrn_blocks_follow_usbs_preactivation_quirks():
    """USB's block wiring, each step by hand (eval-mode fresh BN, LeakyReLU 0.1):
    stage 1's first block activates before the shortcut, stages 2/3's first blocks feed the raw
    input to conv1 and the shortcut, other blocks add the identity, and the features end with
    bn + LeakyReLU(0.1)."""
    torch.manual_seed(0)
    model = create_encoder("wrn16_2").eval()  # 16 -> 32 -> 64 -> 128, two blocks per stage
    names = ["block1.0", "block1.0.conv1", "block1.0.conv2", "block1.0.shortcut",
             "block1.1", "block1.1.conv1", "block1.1.conv2",
             "block2.0", "block2.0.conv1", "block2.0.conv2", "block2.0.shortcut", "block3.1"]  # fmt: skip
    seen = _capture(model, names)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 32, 32))

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    x, _ = seen["block1.0"]  # 16 -> 32, activate_before_residual
    act = _lrelu(_bn_eval(x))
    close(seen["block1.0.conv1"][0], act)
    close(seen["block1.0.shortcut"][0], act)
    close(seen["block1.0.conv2"][0], _lrelu(_bn_eval(seen["block1.0.conv1"][1])))
    close(seen["block1.0"][1], seen["block1.0.shortcut"][1] + seen["block1.0.conv2"][1])

    x, out = seen["block1.1"]  # 32 -> 32: pre-activation, identity residual
    close(seen["block1.1.conv1"][0], _lrelu(_bn_eval(x)))
    close(out, x + seen["block1.1.conv2"][1])

    x, out = seen["block2.0"]  # 32 -> 64: the raw input to conv1 and to the shortcut
    close(seen["block2.0.conv1"][0], x)
    close(seen["block2.0.shortcut"][0], x)
    close(out, seen["block2.0.shortcut"][1] + seen["block2.0.conv2"][1])

    close(feats, _lrelu(_bn_eval(seen["block3.1"][1], FINAL_EPS)))


def test_wrn_conv_init_is_kaiming_normal_fan_out():
    """Convs: kaiming normal, fan_out, gain sqrt(2): std sqrt(2 / (cout * 9)) for a 64->128 conv
    (fan_in would give sqrt(2 / (64 * 9)))."""
    torch.manual_seed(0)
    conv = timm.create_model("wrn28_2").block3[0].conv1
    assert conv.weight.shape == (128, 64, 3, 3)
    want = math.sqrt(2 / (128 * 9))  # 0.0417
    assert abs(conv.weight.std().item() / want - 1) < 0.03


def test_wrn_fc_init_is_xavier_normal_with_zero_bias():
    """timm's WRN classifier layer: zero bias, xavier std sqrt(2 / (128 + 10)) = 0.120."""
    torch.manual_seed(0)
    fc = timm.create_model("wrn28_2", num_classes=10).fc
    assert torch.equal(fc.bias, torch.zeros(10))
    assert abs(fc.weight.std().item() / math.sqrt(2 / 138) - 1) < 0.15


def test_wrn_refuses_options_it_does_not_implement():
    """timm passes options such as drop_rate through; a WRN (no dropout) must not drop them."""
    with pytest.raises(TypeError, match="drop_rate"):
        timm.create_model("wrn16_1", drop_rate=0.3)
