"""Backbones, heads and optimizer groups."""

import pytest
import timm
import torch
from timm.optim import param_groups_weight_decay

from rsmatch.models import Classifier, create_encoder

from .conftest import failure, tiny_overrides

MEAN, STD = [0.5] * 3, [0.25] * 3


def test_any_timm_backbone_with_a_small_image_stem():
    plain = create_encoder("resnet18")
    small = create_encoder("resnet18", small_stem=True)
    x = torch.randn(2, 3, 32, 32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    feats = {}
    for name, m in (("plain", plain), ("small", small)):
        m(x)  # both run; the small stem keeps 4x more spatial resolution inside
        feats[name] = m.forward_features(x).shape[-1]
    assert feats == {"plain": 1, "small": 4}
    with pytest.raises(ValueError, match="small_stem needs a ResNet-style model"):
        create_encoder("wrn28_2", small_stem=True)
    with pytest.raises(ValueError, match="unknown backbone 'wrn99_9'"):
        create_encoder("wrn99_9")


def test_bn_momentum_applies_to_every_batchnorm():
    enc = create_encoder("wrn10_1", bn_momentum=0.1)
    bns = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.1 for m in bns)
    assert all(
        m.momentum == 0.001
        for m in timm.create_model("wrn10_1").modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    )


def test_no_weight_decay_on_batchnorm_and_biases():
    model = Classifier("wrn10_1", 3, MEAN, STD, fake_head=True)
    groups = param_groups_weight_decay(model, 5e-4)  # what the trainer uses
    (decay,) = [g for g in groups if g["weight_decay"] > 0]
    (plain,) = [g for g in groups if g["weight_decay"] == 0]
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    assert {names[id(p)] for p in plain["params"]} >= {
        "encoder.conv1.bias",
        "head.bias",
        "fake_head.bias",
        "encoder.bn1.weight",
    }
    assert len(decay["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_classifier_outputs_and_inference_weights():
    model = Classifier("wrn10_1", 3, MEAN, STD, fake_head=True, proj_size=16)
    out = model(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    assert out["logits"].shape == out["fake_logits"].shape == (4, 3)
    assert out["proj"].shape == (4, 16) and torch.allclose(out["proj"].norm(dim=1), torch.ones(4))
    assert not any(k.startswith(("fake_head", "proj")) for k in model.inference_state_dict())


def test_float_images_are_refused_not_misread():
    """A float tensor in [0, 1] (torchvision's ToTensor) would be normalised as if 0-255."""
    model = Classifier("wrn10_1", 3, MEAN, STD).eval()
    with pytest.raises(TypeError, match="uint8 images .*got torch.float32"):
        model(torch.rand(2, 3, 32, 32))


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm", ["supervised", "fixmatch", "flexmatch", "freematch", "simmatch", "rsmatch"]
)
def test_bf16_channels_last_run(sources, tmp_path, algorithm, train_in_process):
    args = tiny_overrides(sources, tmp_path / "run", algorithm=algorithm,
                          **{"train.mixed_precision": "bf16", "train.channels_last": True})  # fmt: skip
    res = train_in_process(args, tmp_path)
    assert res.returncode == 0, failure(res)
    assert '"step": 4' in res.stdout


def test_normalize_scales_uint8_pixels_by_hand():
    from rsmatch.models import Normalize

    norm = Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    want = torch.tensor([-2.0, -1.2, 2.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)  # (x/255 - .5)/.25
    torch.testing.assert_close(norm(x), want)
