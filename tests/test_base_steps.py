"""The shared algorithm base (FixMatch's step, the supervised step, soft CE) by hand."""

import math

import pytest
import torch
from torch import nn

from rsmatch.algorithms import make_algorithm
from rsmatch.algorithms.base import StepContext, cross_entropy
from rsmatch.config import load_config
from rsmatch.data.batch import Batch

SHAPE = (3, 4, 4)
# labeled 1, 2; weak 10-12 (conf 0.965 / 0.909 / 0.987: mask [1, 0, 1], yhat [0, 1, 2]); strong 20-22
LOGITS = {1: [2.0, 0.0, 1.0], 2: [0.0, 1.0, 0.0],
          10: [4.0, 0.0, 0.0], 11: [0.0, 3.0, 0.0], 12: [0.0, 0.0, 5.0],
          20: [1.0, 2.0, 0.0], 21: [0.0, 1.0, 2.0], 22: [2.0, 0.0, 0.5]}  # fmt: skip


def ce(logits: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in logits)) - logits[target]


class Replay(nn.Module):
    def __init__(self, rows: dict[int, list[float]]) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(256, 3))
        with torch.no_grad():
            for i, row in rows.items():
                self.table[i] = torch.tensor(row)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.table[x[:, 0, 0, 0].long()]}


def images(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, *SHAPE).clone()


def algorithm(name: str, **overrides):
    opts = {"algorithm": name, "ssl.lambda_u": 0.5, **overrides}
    cfg = load_config(None, [f"{k}={v}" for k, v in opts.items()])
    return make_algorithm(cfg, num_classes=3, num_labeled=2, num_unlabeled=3, image_shape=SHAPE)


BATCH = Batch(x_lb=images([1, 2]), y_lb=torch.tensor([0, 2]), idx_lb=torch.arange(2),
              u_w=images([10, 11, 12]), u_s=images([20, 21, 22]), idx_ulb=torch.arange(3))  # fmt: skip
CTX = StepContext(step=0, generator=torch.Generator())


def test_fixmatch_step_by_hand():
    out = algorithm("fixmatch").step(Replay(LOGITS), BATCH, CTX)
    assert out.losses["loss_s"].item() == pytest.approx((ce(LOGITS[1], 0) + ce(LOGITS[2], 2)) / 2)
    loss_u = (ce(LOGITS[20], 0) + ce(LOGITS[22], 2)) / 3  # sample 11 under tau
    assert out.losses["loss_u"].item() == pytest.approx(0.5 * loss_u)
    assert out.metrics["mask_rate"].item() == pytest.approx(2 / 3)


def test_fixmatch_keeps_a_confidence_equal_to_tau():
    rows = {**LOGITS, 11: [0.0, 1.0986122, -100.0]}  # max p == 0.75 exactly in fp32
    assert torch.tensor(rows[11]).softmax(-1).max() == 0.75
    out = algorithm("fixmatch", **{"ssl.threshold": 0.75}).step(Replay(rows), BATCH, CTX)
    loss_u = (ce(LOGITS[20], 0) + ce(LOGITS[21], 1) + ce(LOGITS[22], 2)) / 3
    assert out.losses["loss_u"].item() == pytest.approx(0.5 * loss_u)


def test_supervised_step_by_hand():
    batch = Batch(x_lb=images([1, 2, 11]), y_lb=torch.tensor([0, 2, 1]), idx_lb=torch.arange(3))
    out = algorithm("supervised").step(Replay(LOGITS), batch, CTX)
    assert list(out.losses) == ["loss_s"]
    expected = (ce(LOGITS[1], 0) + ce(LOGITS[2], 2) + ce(LOGITS[11], 1)) / 3
    assert out.losses["loss_s"].item() == pytest.approx(expected)
    assert out.metrics["train_acc"].item() == pytest.approx(2 / 3)  # 2 -> 1 is wrong


@pytest.mark.parametrize("name", ["flexmatch", "freematch"])
def test_the_step_hands_batch_and_context_to_the_pseudo_labels(name):
    out = algorithm(name).step(Replay(LOGITS), BATCH, CTX)  # they read idx_ulb / ctx
    assert torch.isfinite(out.losses["loss_u"])


def test_soft_cross_entropy_by_hand():
    logits, targets = torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([[0.25, 0.75], [1, 0]])
    expected = [0.25 * ce([1, 2], 0) + 0.75 * ce([1, 2], 1), ce([0, 1], 0)]
    assert cross_entropy(logits, targets).tolist() == pytest.approx(expected)
    hard = cross_entropy(logits, torch.tensor([1, 0])).tolist()
    assert hard == pytest.approx([ce([1, 2], 1), ce([0, 1], 0)])


def test_forward_images():
    assert algorithm("fixmatch").forward_images(2, 3) == 2 + 6
    assert algorithm("supervised").forward_images(2, 3) == 2


def test_build_model_passes_the_model_options():
    model = algorithm("fixmatch", **{"model.backbone": "resnet18", "model.small_stem": True,
                                     "model.bn_momentum": 0.01}).build_model()  # fmt: skip
    assert model.fake_head is None  # only RSMatch asks for one
    assert isinstance(model.encoder.maxpool, nn.Identity)
    assert {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {0.01}
