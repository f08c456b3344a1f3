"""Every RSMatch equation (docs/method.md section 2) against values computed by hand.

A replay model returns given logits per image: each image's pixels all equal its id, so the
classifier's and detector's outputs, and the queue's contents, are known exactly. Ids: labeled
1-3 (strong views 4-6); unlabeled weak views 10-13 and strong views 20-23 (same samples,
different logits); queued items 30-33.
Expected values use Python's math only, never the code under test.
"""

import math

import pytest
import torch
from torch import nn

from rsmatch.algorithms import make_algorithm
from rsmatch.algorithms.base import StepContext
from rsmatch.config import ConfigError, load_config
from rsmatch.data.batch import Batch, Provenance

from .test_csqueue_ranks import _NoHostSync as NoHostSync

SHAPE = (3, 4, 4)
C = 3
LAMBDA_U = 0.5

# Classifier, real head. Weak views: conf 0.965 / 0.909 / 0.987 / 0.576 at tau = 0.95, so the
# confidence mask m is [1, 0, 1, 0] and yhat is [0, 1, 2, 0].
CLS = {1: [2.0, 0.0, 1.0], 2: [0.0, 1.0, 0.0], 3: [0.0, 0.5, 2.0],
       10: [4.0, 0.0, 0.0], 11: [0.0, 3.0, 0.0], 12: [0.0, 0.0, 5.0], 13: [1.0, 0.0, 0.0],
       20: [1.0, 2.0, 0.0], 21: [0.0, 1.0, 2.0], 22: [2.0, 0.0, 0.5], 23: [1.0, 1.5, 0.0]}  # fmt: skip
# Classifier, fake head (strong views only matter).
FAKE = {20: [0.0, 0.0, 1.0], 21: [2.0, 1.0, 0.0], 22: [1.0, 3.0, 0.0], 23: [0.0, 2.0, 2.5]}
# Detector. Weak views: zhat = [real, synthetic, synthetic, real], detector confidence
# 0.881 / 0.731 / 0.982 / 0.953, so its mask at tau = 0.95 is [0, 0, 1, 1]. Strong views call
# the opposite of the weak ones, so routing by the strong view changes (5) and (6). Labeled:
# one of three called synthetic.
DET = {1: [1.0, 0.0], 2: [-0.5, -0.2], 3: [0.3, 0.0], 4: [0.0, 1.5], 5: [2.0, 0.0], 6: [0.5, 0.5],
       30: [0.2, 1.0], 31: [1.0, -1.0], 32: [0.0, 3.0], 33: [-2.0, 0.5],
       10: [2.0, 0.0], 11: [0.0, 1.0], 12: [0.0, 4.0], 13: [3.0, 0.0],
       20: [0.0, 2.0], 21: [1.0, 0.0], 22: [3.0, 0.0], 23: [0.0, 1.0]}  # fmt: skip
MASK, YHAT = [1, 0, 1, 0], [0, 1, 2, 0]
ZHAT = [0, 1, 1, 0]


def ce(logits: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in logits)) - logits[target]


def _table(rows: dict[int, list[float]], width: int) -> nn.Parameter:
    t = torch.zeros(256, width)
    for i, row in rows.items():
        t[i] = torch.tensor(row)
    return nn.Parameter(t)


class Replay(nn.Module):
    """forward(x_cls, x_det, shared) as RSMatchModel, with logits looked up by image id."""

    def __init__(self, cls: dict[int, list[float]], det: dict[int, list[float]]) -> None:
        super().__init__()
        self.cls, self.fake, self.det = _table(cls, C), _table(FAKE, C), _table(det, 2)

    def forward(self, x_cls: torch.Tensor, x_det: torch.Tensor, shared: int):
        ic, id_ = x_cls[:, 0, 0, 0].long(), x_det[:, 0, 0, 0].long()
        return {"logits": self.cls[ic], "fake_logits": self.fake[ic]}, self.det[id_]


def images(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, *SHAPE).clone()


def queued_ids(q, row: int) -> list[int]:
    """Ids held by a sub-queue, oldest first."""
    pushed = int(q.pushed[row])
    slots = [k % q.capacity for k in range(max(0, pushed - q.capacity), pushed)]
    return [int(q.images[row, s, 0, 0, 0]) for s in slots]


def make(**overrides):
    opts = {"algorithm": "rsmatch", "ssl.lambda_u": LAMBDA_U, **overrides}
    cfg = load_config(None, [f"{k}={v}" for k, v in opts.items()])
    return make_algorithm(cfg, num_classes=C, num_labeled=3, num_unlabeled=4, image_shape=SHAPE)


def batch() -> Batch:
    return Batch(x_lb=images([1, 2, 3]), y_lb=torch.tensor([0, 1, 2]), idx_lb=torch.arange(3),
                 x_lb_s=images([4, 5, 6]), u_w=images([10, 11, 12, 13]),
                 u_s=images([20, 21, 22, 23]), idx_ulb=torch.tensor([110, 111, 112, 113]))  # fmt: skip


def run_step(cls=CLS, det=DET, queue=(30,), ctx: StepContext | None = None, **overrides):
    """One step on the fixed batch, the queue holding `queue` under class 0 beforehand."""
    algo = make(**overrides)
    for i in queue:
        algo.queue.update(torch.tensor([1.0]), torch.tensor([0]), images([i]),
                          torch.tensor([100 + i]), torch.Generator())  # fmt: skip
    ctx = ctx or StepContext(step=0, generator=torch.Generator())
    return algo, algo.step(Replay(cls, det), batch(), ctx)


def test_the_hand_computed_scenario_is_what_the_comments_say():
    """Guards the fixture: masks and calls computed from the tables with math only."""
    soft = lambda row: [math.exp(v) / sum(math.exp(w) for w in row) for v in row]  # noqa: E731
    assert [int(max(soft(CLS[10 + j])) >= 0.95) for j in range(4)] == MASK
    assert [int(soft(DET[10 + j])[1] > 0.5) for j in range(4)] == ZHAT
    assert [int(soft(DET[20 + j])[1] > 0.5) for j in range(4)] == [1 - z for z in ZHAT]


def test_eq1_queue_takes_the_weak_view_most_synthetic_on_the_weak_view():
    algo, _ = run_step()
    # class 0 candidates u0 (margin -2) and u3 (margin -3): u0's weak view (id 10) is pushed
    # after the item already there; classes 1 and 2 have one candidate each.
    assert queued_ids(algo.queue, 0) == [30, 10]
    assert queued_ids(algo.queue, 1) == [11] and queued_ids(algo.queue, 2) == [12]
    assert sorted(algo.queue.held_sources().tolist()) == [110, 111, 112, 130]


def test_eq1_ranks_by_logit_margin_where_probabilities_saturate():
    # Both class-2 candidates have p(synthetic) == 1.0 in fp32; the later one is more synthetic.
    det = {**DET, 11: [0.0, 30.0], 12: [0.0, 40.0]}
    cls = {**CLS, 11: CLS[12]}  # u1 now also pseudo-labelled class 2
    assert torch.tensor([0.0, 30.0]).softmax(-1)[1] == 1.0
    algo, _ = run_step(cls, det)
    assert queued_ids(algo.queue, 2) == [12] and queued_ids(algo.queue, 1) == []


def test_eq2_detector_supervised_loss_labeled_real_queued_synthetic():
    _, out = run_step()
    labeled = (ce(DET[1], 0) + ce(DET[2], 0) + ce(DET[3], 0)) / 3
    queued = ce(DET[30], 1)  # every draw is the one queued item
    assert out.losses["loss_ds"].item() == pytest.approx(labeled + queued, rel=1e-6)


def test_eq2_strong_labeled_feeds_the_strong_labeled_view():
    _, out = run_step(**{"rsmatch.strong_labeled": True})
    labeled = (ce(DET[4], 0) + ce(DET[5], 0) + ce(DET[6], 0)) / 3
    assert out.losses["loss_ds"].item() == pytest.approx(labeled + ce(DET[30], 1), rel=1e-6)


@pytest.mark.parametrize("rank", [0, 1])
def test_eq2_each_rank_takes_its_slice_of_one_global_queue_draw(rank):
    """Two ranks, B = 3 each: one draw of 6 with the step's generator; rank r takes [3r, 3r+3)."""
    algo = make()
    for i in (30, 31, 32, 33):
        algo.queue.update(torch.tensor([1.0]), torch.tensor([0]), images([i]), torch.tensor([i]),
                          torch.Generator())  # fmt: skip
    drawn = algo.queue.sample(6, torch.Generator().manual_seed(5))[:, 0, 0, 0].tolist()
    mine = drawn[3 * rank : 3 * rank + 3]
    torch.manual_seed(1234)  # the draw must not depend on the global RNG
    ctx = StepContext(step=0, generator=torch.Generator().manual_seed(5), rank=rank, world=2)
    out = algo.step(Replay(CLS, DET), batch(), ctx)
    labeled = (ce(DET[1], 0) + ce(DET[2], 0) + ce(DET[3], 0)) / 3
    queued = sum(ce(DET[i], 1) for i in mine) / 3
    assert out.losses["loss_ds"].item() == pytest.approx(labeled + queued, rel=1e-6)


def test_eq3_detector_unsupervised_loss_with_a_partly_zero_mask():
    _, out = run_step()
    # detector mask [0, 0, 1, 1]; targets zhat from the weak view, CE on the strong view
    expected = (ce(DET[22], ZHAT[2]) + ce(DET[23], ZHAT[3])) / 4
    assert out.losses["loss_du"].item() == pytest.approx(expected, rel=1e-6)


def test_eq3_confidence_equal_to_tau_is_kept():
    det = {**DET, 12: [0.0, 1.0986122]}  # p(synthetic) == 0.75 exactly in fp32
    assert torch.tensor(det[12]).softmax(-1)[1] == 0.75
    _, out = run_step(det=det, **{"rsmatch.detector_threshold": 0.75})
    # confidences 0.881 / 0.731 / 0.75 / 0.953: mask [1, 0, 1, 1]
    expected = (ce(DET[20], 0) + ce(DET[22], 1) + ce(DET[23], 0)) / 4
    assert out.losses["loss_du"].item() == pytest.approx(expected, rel=1e-6)


def test_eq4_classifier_supervised_loss():
    _, out = run_step()
    expected = (ce(CLS[1], 0) + ce(CLS[2], 1) + ce(CLS[3], 2)) / 3
    assert out.losses["loss_s"].item() == pytest.approx(expected, rel=1e-6)


def test_eq5_eq6_routing_by_the_weak_view_with_confidence_mask():
    _, out = run_step()
    # real route (zhat 0): u0 kept (m 1), u3 masked; synthetic route: u1 masked, u2 kept
    loss_ur = MASK[0] * ce(CLS[20], YHAT[0]) / 4
    loss_uf = MASK[2] * ce(FAKE[22], YHAT[2]) / 4
    assert out.losses["loss_ur"].item() == pytest.approx(LAMBDA_U * loss_ur, rel=1e-6)
    assert out.losses["loss_uf"].item() == pytest.approx(LAMBDA_U * loss_uf, rel=1e-6)
    assert out.probes["synthetic_pred"].tolist() == ZHAT
    assert out.metrics["mask_rate"].item() == 0.5
    assert out.metrics["mask_real_rate"].item() == out.metrics["mask_fake_rate"].item() == 0.25


def test_no_fake_head_ablation_drops_the_samples_called_synthetic():
    _, out = run_step(**{"rsmatch.fake_head": False})
    assert "loss_uf" not in out.losses
    expected = LAMBDA_U * ce(CLS[20], YHAT[0]) / 4
    assert out.losses["loss_ur"].item() == pytest.approx(expected, rel=1e-6)


def test_single_queue_ablation_takes_the_top_m_k_of_the_whole_batch():
    algo, out = run_step(**{"rsmatch.class_wise": False, "rsmatch.queue_picks": 1,
                          "rsmatch.queue_topk": 2})  # fmt: skip
    # margins -2, 1, 4, -3: the two most synthetic, best first, whatever their class
    assert algo.queue.capacity == C * 16
    assert queued_ids(algo.queue, 0) == [30, 12, 11]
    assert not any(k.startswith("queue_fill/") for k in out.metrics)


def test_a_step_has_no_host_sync_once_the_queue_holds_items():
    algo, _ = run_step()  # the queue is non-empty from here on
    with NoHostSync():
        ctx = StepContext(step=1, generator=torch.Generator())
        out = algo.step(Replay(CLS, DET), batch(), ctx)
    assert set(out.losses) == {"loss_s", "loss_ur", "loss_uf", "loss_ds", "loss_du"}


def test_step_metrics_by_hand():
    _, out = run_step()
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m == pytest.approx({
        "mask_rate": 0.5, "mask_real_rate": 0.25, "mask_fake_rate": 0.25,
        "detector_mask_rate": 0.5, "pool_called_synthetic": 0.5,
        "labeled_called_synthetic": 1 / 3,
        "queue_fill": 4 / 48, "queue_fill/0": 2 / 16, "queue_fill/1": 1 / 16, "queue_fill/2": 1 / 16,
    })  # fmt: skip


def test_step_metrics_by_hand_when_real_and_fake_differ():
    """u0's weak view called synthetic at 0.982: zhat [1, 1, 1, 0], detector confidence
    0.982 / 0.731 / 0.982 / 0.953, so its mask is [1, 0, 1, 1]. With m = [1, 0, 1, 0] every
    confident sample is routed to the fake head: real 0, fake 2/4 (the scenario above is
    symmetric, 1/4 each, and would not tell the two apart)."""
    _, out = run_step(det={**DET, 10: [0.0, 4.0]})
    m = {k: out.metrics[k].item() for k in
         ("mask_real_rate", "mask_fake_rate", "detector_mask_rate", "pool_called_synthetic")}  # fmt: skip
    assert m == pytest.approx({"mask_real_rate": 0.0, "mask_fake_rate": 0.5,
                               "detector_mask_rate": 0.75, "pool_called_synthetic": 0.75})  # fmt: skip


def test_other_ranks_candidates_compete_through_the_gather():
    """A fake second rank whose candidates are all more synthetic: its items win every class."""

    moved = []

    def with_other_rank(t: torch.Tensor) -> torch.Tensor:
        moved.append(t.shape[:3])
        shift = {torch.uint8: 100, torch.long: 1000}.get(t.dtype, 100.0)
        return torch.cat([t, t + shift])  # -inf (no candidate) stays -inf

    algo, _ = run_step(ctx=StepContext(step=0, generator=torch.Generator(), gather=with_other_rank))
    assert moved == [(1, C, 1)] * 3  # scores, pool indices, images: the top k of each class only
    assert [queued_ids(algo.queue, c) for c in range(C)] == [[30, 110], [111], [112]]
    assert sorted(algo.queue.held_sources().tolist()) == [130, 1110, 1111, 1112]


def test_picked_classes_follow_the_step_generator_only():
    def pushed_class(seed: int, global_seed: int) -> int:
        torch.manual_seed(global_seed)
        ctx = StepContext(step=0, generator=torch.Generator().manual_seed(seed))
        algo, _ = run_step(queue=(), ctx=ctx, **{"rsmatch.queue_picks": 1})
        return int(torch.nonzero(algo.queue.pushed).flatten())

    picks = [pushed_class(seed, 0) for seed in range(8)]
    assert picks == [pushed_class(seed, 99) for seed in range(8)]
    assert len(set(picks)) > 1


def test_forward_images_counts_both_networks():
    # classifier: 3 labeled + 4 weak + 4 strong; detector: 3 labeled + 3 queued + 4 + 4
    assert make().forward_images(3, 4) == 11 + 14
    # shared encoder: f sees the 3 queued too (and the 3 strong labeled views with strong_labeled)
    assert make(**{"rsmatch.shared_encoder": True}).forward_images(3, 4) == 11 + 3
    shared_strong = {"rsmatch.shared_encoder": True, "rsmatch.strong_labeled": True}
    assert make(**shared_strong).forward_images(3, 4) == 11 + 6


def test_probe_metrics_score_the_detector_calls_against_provenance():
    prov = Provenance(torch.tensor([True, False, True, True]), ["a", "real", "a", "b"])
    probes = {"synthetic_pred": torch.tensor([0, 1, 1, 0])}
    acc = make().probe_metrics(probes, torch.tensor([1, 0, 2, 3]), prov)
    assert acc["batch_detector_acc"].item() == 0.75  # truth [F, T, T, T]


def test_tau_of_one_is_allowed():
    assert load_config(None, ["rsmatch.detector_threshold=1"]).rsmatch.detector_threshold == 1


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("rsmatch.base", "nope", "rsmatch.base='nope': one of fixmatch, flexmatch, freematch, simmatch"),
     ("rsmatch.detector_threshold", 0, "rsmatch.detector_threshold=0.0: not in (0, 1]"),
     ("rsmatch.detector_threshold", 1.5, "rsmatch.detector_threshold=1.5: not in (0, 1]"),
     ("rsmatch.queue_length", 0, "rsmatch.queue_length=0: must be >= 1"),
     ("rsmatch.queue_picks", 0, "rsmatch.queue_picks=0: must be >= 1"),
     ("rsmatch.queue_topk", 0, "rsmatch.queue_topk=0: must be >= 1")],
)  # fmt: skip
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["algorithm=rsmatch", f"{key}={value}"])
    assert str(err.value) == message


class CallsSynthetic(nn.Module):
    """A detector stand-in: `detect` calls the images of the given ids synthetic."""

    def __init__(self, ids: set[int]) -> None:
        super().__init__()
        self.ids = ids

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        synthetic = torch.tensor([int(i) in self.ids for i in x[:, 0, 0, 0]])
        return torch.stack([(~synthetic).float(), synthetic.float()], dim=1)


def _evaluate(live: set[int], ema: set[int]) -> tuple[dict[str, float], list[str]]:
    from rsmatch.algorithms.base import EvalContext
    from rsmatch.data.batch import TrainData

    data = TrainData(labeled=images([1, 2, 3]), labeled_y=torch.tensor([0, 1, 2]),
                     unlabeled=images([10, 11, 12, 13]), test=images([1]), test_y=torch.tensor([0]),
                     class_names=["a", "b", "c"],
                     provenance=Provenance(torch.tensor([True, True, False, False]),
                                           ["g", "g", "real", "real"]),
                     split_meta={})  # fmt: skip
    warnings = []
    ctx = EvalContext(ema=CallsSynthetic(ema), live=CallsSynthetic(live),
                      predict=lambda fn, x: fn(x).argmax(-1), data=data, warn=warnings.append)  # fmt: skip
    return make().evaluate(ctx), warnings


def test_evaluation_scores_the_live_detector_on_the_pool_and_the_labeled_set():
    """The pool is [synthetic, synthetic, real, real]. The live detector calls ids 10, 11 (the
    two synthetic ones) and labeled id 1 synthetic; the EMA detector the opposite."""
    results, warnings = _evaluate(live={10, 11, 1}, ema={12, 13})
    assert results["detector_acc"] == 1.0 and results["detector_precision"] == 1.0
    assert results["detector_called_synthetic"] == 0.5
    assert results["detector_acc/g"] == 1.0 and results["detector_acc/real"] == 1.0
    assert results["labeled_called_synthetic"] == pytest.approx(1 / 3)  # of 3 labeled, not 4
    assert "queue_purity" not in results and warnings == []  # nothing queued yet: undefined


def test_evaluation_warns_of_a_collapsing_detector():
    """Everything unlabeled called synthetic, no labeled real: the collapse warning."""
    results, warnings = _evaluate(live={10, 11, 12, 13}, ema=set())
    assert results["detector_called_synthetic"] == 1.0 and results["labeled_called_synthetic"] == 0
    assert len(warnings) == 1 and warnings[0].startswith(
        "detector may be collapsing: it calls 100%"
    )
