"""RSMatch: the CSQueue, the losses' routing and gradient isolation, ablations, the detector."""

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from rsmatch.algorithms import make_algorithm
from rsmatch.algorithms.base import StepContext
from rsmatch.algorithms.rsmatch import RSMatch
from rsmatch.config import load_config
from rsmatch.csqueue import CSQueue
from rsmatch.data.batch import Batch

SHAPE = (3, 4, 4)


def _images(ids: list[int]) -> torch.Tensor:
    """Images whose pixels all equal their id, so queue contents can be read back."""
    return torch.tensor(ids, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, *SHAPE).clone()


def _queued_ids(q: CSQueue, row: int) -> list[int]:
    """Ids held by a sub-queue, oldest first (slots are a ring written at pushed % capacity)."""
    pushed = int(q.pushed[row])
    slots = [k % q.capacity for k in range(max(0, pushed - q.capacity), pushed)]
    return [int(q.images[row, s, 0, 0, 0]) for s in slots]


def test_queue_is_fifo_with_capacity():
    q = CSQueue(num_classes=2, length=3, picks=2, topk=1, image_shape=SHAPE)
    g = torch.Generator().manual_seed(0)
    for i in range(5):  # each step: class 0 gets candidate 10+i
        q.update(
            torch.tensor([0.9]), torch.tensor([0]), _images([10 + i]), torch.tensor([10 + i]), g
        )
    assert _queued_ids(q, 0) == [12, 13, 14]  # oldest dropped first
    assert q.fill().tolist() == [3, 0] and len(q) == 3
    assert sorted(q.held_sources().tolist()) == [12, 13, 14]


def test_queue_pushes_classwise_topk_of_picked_classes():
    q = CSQueue(num_classes=3, length=4, picks=3, topk=2, image_shape=SHAPE)
    scores = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.7, 0.2, 0.95])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    ids = list(range(7))
    q.update(scores, labels, _images(ids), torch.tensor(ids), torch.Generator().manual_seed(0))
    assert sorted(_queued_ids(q, 0)) == [1, 2]  # top-2 scores of class 0
    assert sorted(_queued_ids(q, 1)) == [3, 6]  # top-2 of class 1
    assert _queued_ids(q, 2) == []  # no candidate


def test_queue_picks_m_random_classes():
    q = CSQueue(num_classes=10, length=40, picks=3, topk=1, image_shape=SHAPE)
    g = torch.Generator().manual_seed(1)
    picked = []
    for _ in range(20):  # every class has a candidate each step
        before = q.pushed.clone()
        q.update(torch.rand(10), torch.arange(10), _images(list(range(10))), torch.arange(10), g)
        picked.append(frozenset(torch.nonzero(q.pushed > before).flatten().tolist()))
    assert all(len(p) == 3 for p in picked)  # M sub-queues per step...
    assert len(set(picked)) > 10 and set().union(*picked) == set(range(10))  # ...at random


def test_single_queue_mode_takes_global_top():
    q = CSQueue(num_classes=2, length=2, picks=2, topk=1, image_shape=SHAPE, class_wise=False)
    assert q.capacity == 4 and q.images.shape[0] == 1
    scores = torch.tensor([0.1, 0.9, 0.8, 0.3])
    q.update(
        scores,
        torch.tensor([0, 0, 0, 1]),
        _images([0, 1, 2, 3]),
        torch.arange(4),
        torch.Generator(),
    )
    assert _queued_ids(q, 0) == [1, 2]  # M*k = 2 best overall, easy class dominates


def test_queue_state_roundtrip_and_shape_check():
    q = CSQueue(2, 3, 2, 1, SHAPE)
    q.update(
        torch.tensor([0.5]), torch.tensor([1]), _images([7]), torch.tensor([7]), torch.Generator()
    )
    r = CSQueue(2, 3, 2, 1, SHAPE)
    r.load_state_dict(q.state_dict())
    assert _queued_ids(r, 1) == [7] and torch.equal(r.pushed, q.pushed)
    with pytest.raises(ValueError, match="queue_length"):
        CSQueue(2, 4, 2, 1, SHAPE).load_state_dict(q.state_dict())


def test_queue_sample_draws_only_held_items():
    q = CSQueue(2, 3, 2, 1, SHAPE)
    assert len(q.sample(5, torch.Generator())) == 0
    q.update(
        torch.tensor([0.5]), torch.tensor([1]), _images([7]), torch.tensor([7]), torch.Generator()
    )
    assert (q.sample(6, torch.Generator())[:, 0, 0, 0] == 7).all()


# --- the algorithm ---------------------------------------------------------------------------


def _setup(**overrides):
    # Thresholds 0.01 keep every sample in every loss: these tests follow gradient paths; the
    # masks' values are pinned by hand in test_rsmatch_equations.py.
    base = {"algorithm": "rsmatch", "model.backbone": "wrn10_1", "rsmatch.detector_backbone": "wrn10_1",
            "ssl.threshold": 0.01, "rsmatch.detector_threshold": 0.01, "model.bn_momentum": 0.1}  # fmt: skip
    base.update(overrides)
    cfg = load_config(None, [f"{k}={v}" for k, v in base.items()])
    algo = make_algorithm(
        cfg, num_classes=3, num_labeled=6, num_unlabeled=20, image_shape=(3, 32, 32)
    )
    model = algo.build_model()
    g = torch.Generator().manual_seed(0)
    img = lambda n: torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)  # noqa: E731
    batch = Batch(x_lb=img(4), y_lb=torch.tensor([0, 1, 2, 0]), idx_lb=torch.arange(4),
                  x_lb_s=img(4), u_w=img(8), u_s=img(8), idx_ulb=torch.arange(8))  # fmt: skip
    # prime the queue so loss (2) has synthetic items
    algo.queue.update(
        torch.rand(8), torch.arange(8) % 3, batch.u_w, batch.idx_ulb, torch.Generator()
    )
    return algo, model, batch


def _ctx():
    return StepContext(step=0, generator=torch.Generator().manual_seed(0))


def _changed(model, loss, prefix):
    model.zero_grad()
    loss.backward(retain_graph=True)
    return {
        n
        for n, p in model.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0 and n.startswith(prefix)
    }


class _Alternating(torch.nn.Module):
    """A trainable detector whose calls alternate real / synthetic (both routes non-empty)."""

    def __init__(self, detector: torch.nn.Module) -> None:
        super().__init__()
        self.inner = detector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        push = torch.tensor([[20.0, 0.0], [0.0, 20.0]]).repeat(len(x) // 2 + 1, 1)[: len(x)]
        return self.inner(x) + push


def test_gradient_isolation_between_detector_and_classifier():
    algo, model, batch = _setup()
    model.detector = _Alternating(model.detector)
    out = algo.step(model, batch, _ctx())
    assert out.losses["loss_uf"] > 0 and out.losses["loss_ur"] > 0  # both routes non-empty
    det_loss = out.losses["loss_ds"] + out.losses["loss_du"]
    cls_loss = out.losses["loss_s"] + out.losses["loss_ur"] + out.losses["loss_uf"]
    assert _changed(model, det_loss, "classifier") == set()
    assert _changed(model, det_loss, "detector")  # it does train the detector
    assert _changed(model, cls_loss, "detector") == set()
    assert _changed(model, cls_loss, "classifier.head")
    # (6) trains the encoder through the fake head, and leaves the real head h_r alone
    uf = _changed(model, out.losses["loss_uf"], "classifier")
    assert any(n.startswith("classifier.encoder.") for n in uf)
    assert any(n.startswith("classifier.fake_head.") for n in uf)
    assert not any(n.startswith("classifier.head.") for n in uf)


def test_model_parts_and_detect():
    algo, model, batch = _setup(**{"model.bn_momentum": 0.01})
    assert model.shared_head is None
    assert {
        m.momentum for m in model.detector.modules() if isinstance(m, torch.nn.BatchNorm2d)
    } == {0.01}
    model.eval()
    assert torch.equal(model.detect(batch.u_w), model.detector(batch.u_w))
    _, model, _ = _setup(**{"rsmatch.shared_encoder": True})
    model.eval()
    assert model.shared_head.out_features == 2
    feat = model.classifier(batch.u_w)["feat"]
    assert torch.equal(model.detect(batch.u_w), model.shared_head(feat))


@pytest.mark.parametrize("strong_labeled", [False, True])
def test_shared_encoder_sees_each_image_once_and_scores_each_part(strong_labeled):
    """The ablation's one forward of f: x_lb, u_w, u_s once, plus the queue sample (and x_lb's
    strong view); the binary head's logits for each part are its own images' (eval mode, so
    BatchNorm makes each row a function of its image alone)."""
    algo, model, batch = _setup(**{"rsmatch.shared_encoder": True,
                                   "rsmatch.strong_labeled": strong_labeled})  # fmt: skip
    model.eval()
    seen = []
    model.classifier.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    queued = algo.queue.sample(4, torch.Generator().manual_seed(1))
    x_lb_det = batch.x_lb_s if strong_labeled else batch.x_lb
    x_cls = torch.cat([batch.x_lb, batch.u_w, batch.u_s])
    x_det = torch.cat([queued, x_lb_det, batch.u_w, batch.u_s])
    with torch.no_grad():
        _, det = model(x_cls, x_det, 16 if strong_labeled else 20)
        assert seen == [20 + 4 + (4 if strong_labeled else 0)]
        for part, rows in ((queued, det[:4]), (x_lb_det, det[4:8]), (batch.u_w, det[8:16]),
                           (batch.u_s, det[16:])):  # fmt: skip
            want = model.shared_head(model.classifier(part)["feat"])
            torch.testing.assert_close(rows, want, rtol=1e-4, atol=1e-5)
    seen.clear()
    algo.step(model.train(), batch, _ctx())  # the step tells the model which rows are shared
    assert seen == [20 + 4 + (4 if strong_labeled else 0)]


def test_the_base_algorithms_extra_losses_are_kept():
    algo, model, batch = _setup(**{"rsmatch.base": "simmatch"})
    assert "loss_in" in algo.step(model, batch, _ctx()).losses


def test_ablation_switches():
    algo, model, batch = _setup(**{"rsmatch.fake_head": False})
    assert model.classifier.fake_head is None
    assert "loss_uf" not in algo.step(model, batch, _ctx()).losses
    algo, _, _ = _setup(**{"rsmatch.class_wise": False})
    assert not algo.queue.class_wise


def test_shared_encoder_ablation_gradient_path():
    algo, model, batch = _setup(**{"rsmatch.shared_encoder": True})
    assert model.detector is None and model.shared_head is not None
    out = algo.step(model, batch, _ctx())
    # "w/o ind. models": the detector's losses reach the shared encoder and the binary head,
    # never the class heads; the classifier's losses never reach the binary head.
    det = _changed(model, out.losses["loss_ds"] + out.losses["loss_du"], "")
    assert any(n.startswith("classifier.encoder.") for n in det)
    assert any(n.startswith("shared_head.") for n in det)
    assert not any(n.startswith(("classifier.head.", "classifier.fake_head.")) for n in det)
    cls = _changed(model, out.losses["loss_s"] + out.losses["loss_ur"] + out.losses["loss_uf"], "")
    assert any(n.startswith("classifier.encoder.") for n in cls)
    assert not any(n.startswith("shared_head.") for n in cls)


def test_rsmatch_composes_with_its_base():
    algo, _, _ = _setup()
    assert isinstance(algo, RSMatch) and algo.base.name == "fixmatch"


def test_detector_costs_at_most_a_quarter_of_the_classifier():
    def macs(name):
        with FlopCounterMode(display=False) as counter:
            timm.create_model(name, num_classes=0)(torch.randn(1, 3, 32, 32))
        return counter.get_total_flops()

    assert macs("wrn16_1") <= 0.25 * macs("wrn28_2")


def _parameters(num_classes: int) -> int:
    return sum(
        p.numel() for p in timm.create_model("wrn28_2", num_classes=num_classes).parameters()
    )


def test_wrn_matches_usb_parameter_counts():
    count = _parameters
    assert count(10) == 1_467_626 and count(100) == 1_479_236
    m = timm.create_model("wrn28_2", num_classes=0)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 128)
