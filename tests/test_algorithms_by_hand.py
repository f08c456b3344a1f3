"""The training equations by hand: what the other algorithm tests left unpinned (a mutation
audit of rsmatch/algorithms/*.py and rsmatch/csqueue.py).

Expected values come from the formulas of docs/method.md section 2 and USB's recipes, worked
out with Python's math on 1-3 samples and 2-3 classes, never from the code under test.
"""

import math

import pytest
import torch

from rsmatch.algorithms.base import BatchViews

from .test_base_steps import algorithm
from .test_baseline_edges import _algo, _batch, _ctx, _views


def _softmax(row):
    total = sum(math.exp(v) for v in row)
    return [math.exp(v) / total for v in row]


# --- base.py ---------------------------------------------------------------------------------


def test_views_ask_for_unlabeled_images_only_where_they_are_used():
    """Supervised needs no weak/strong unlabeled views; FixMatch does; neither needs x_lb's
    strong view."""
    assert algorithm("supervised").views == BatchViews(unlabeled=False, strong_labeled=False)
    assert algorithm("fixmatch").views == BatchViews(unlabeled=True, strong_labeled=False)


# --- FlexMatch -------------------------------------------------------------------------------


def test_flexmatch_threshold_is_the_convex_map_not_the_linear_one():
    """sigma = 0.8 for class 1: convex tau*s/(2-s) = 0.76/1.2 = 0.63333 (linear would be
    0.76). max p 0.7 passes, 0.6 does not."""
    algo = _algo("flexmatch", num_unlabeled=4)
    algo.classwise_acc = torch.tensor([0.0, 0.8, 0.0])
    probs = [[0.15, 0.7, 0.15], [0.2, 0.6, 0.2]]
    logits = [[math.log(v) for v in row] for row in probs]
    out = algo.pseudo_labels(_views(logits), _batch([0, 1]), _ctx())
    assert out.targets.tolist() == [1, 1]
    assert out.mask.tolist() == [1.0, 0.0]


# --- SimMatch --------------------------------------------------------------------------------
# Two labeled bank items e1 (label 0) and e2 (label 1), two classes, T = 0.5, one unlabeled
# image with weak feature e1 and strong feature e2. With da_len 1 the alignment window holds
# this batch alone, so the aligned weak probabilities are uniform [0.5, 0.5] (up to 1e-6).
# q = softmax([1/T, 0]) = softmax([2, 0]); teacher = q (uniform unfolding);
# student = log_softmax([0, 2]); L_in = -sum(teacher * student).
Q = _softmax([2.0, 0.0])
L_IN = -sum(t * math.log(s) for t, s in zip(Q, _softmax([0.0, 2.0])))


def _simmatch(step, **overrides):
    opts = {"simmatch.da_len": 1, "simmatch.temperature": 0.5, "simmatch.warmup_steps": 5}
    algo = _algo("simmatch", num_classes=2, num_labeled=2, **{**opts, **overrides})
    algo.bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    algo.bank_labels = torch.tensor([0, 1])
    feat_w = torch.tensor([[1.0, 0.0]], requires_grad=True)
    feat_s = torch.tensor([[0.0, 1.0]], requires_grad=True)
    views = _views([[math.log(0.8), math.log(0.2)]], lb=[[0.6, 0.8]])
    views.w["proj"], views.s["proj"] = feat_w, feat_s
    out = algo.pseudo_labels(views, _batch([0], y_lb=(1,), idx_lb=(1,)), _ctx(step=step))
    return algo, out, feat_w, feat_s


def test_simmatch_loss_in_by_hand_weighted_by_lambda_in():
    assert round(L_IN, 4) == 1.8885  # 0.8808 * 2.1269 + 0.1192 * 0.1269
    _, out, _, _ = _simmatch(step=5)
    assert out.losses["loss_in"].item() == pytest.approx(L_IN, rel=1e-5)
    _, out, _, _ = _simmatch(step=5, **{"simmatch.lambda_in": 0.5})
    assert out.losses["loss_in"].item() == pytest.approx(0.5 * L_IN, rel=1e-5)


def test_simmatch_warmup_targets_are_the_aligned_weak_probs_without_aggregation():
    """Before warmup_steps: targets = aligned p_w; from then on 0.9 * p_w + 0.1 * q by label."""
    _, out, _, _ = _simmatch(step=4)
    assert out.targets.tolist()[0] == pytest.approx([0.5, 0.5], rel=1e-5)
    assert out.losses["loss_in"].item() == 0.0
    _, out, _, _ = _simmatch(step=5)
    expected = [0.9 * 0.5 + 0.1 * Q[0], 0.9 * 0.5 + 0.1 * Q[1]]  # [0.53808, 0.46192]
    assert out.targets.tolist()[0] == pytest.approx(expected, rel=1e-5)


def test_simmatch_loss_in_trains_the_strong_projection_through_the_pre_update_bank():
    """L_in's gradient reaches the strong feature only (the weak one is the teacher), and the
    step's bank update (labeled item 1 moves) does not break its backward."""
    algo, out, feat_w, feat_s = _simmatch(step=5)
    assert algo.bank[:, 1].tolist() != [0.0, 1.0]  # the bank did move
    out.losses["loss_in"].backward()
    assert feat_w.grad is None
    # d L_in / d feat_s = (softmax([0, 2]) - q) @ bank.T / T, bank = identity
    student = _softmax([0.0, 2.0])
    grad = [(student[c] - Q[c]) / 0.5 for c in range(2)]
    assert feat_s.grad[0].tolist() == pytest.approx(grad, rel=1e-5)


# --- RSMatch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("with_detector", [False, True])
def test_the_model_takes_a_detector_or_a_shared_head_exactly_one(with_detector):
    """Neither leaves forward nothing to call; both would train a head nothing reads."""
    from torch import nn

    from rsmatch.algorithms.rsmatch import RSMatchModel

    head = nn.Identity() if with_detector else None
    with pytest.raises(ValueError, match="a detector or a shared head, exactly one"):
        RSMatchModel(nn.Identity(), head, head)


def test_export_writes_the_ema_classifier_and_the_live_detector_with_its_card(
    monkeypatch, tmp_path
):
    """The classifier comes from the EMA model, the detector from the live one (the one the
    metrics measured); the card records the paper's defaults L, M, k = 16, 10, 1, tau 0.95,
    the sizes and the generators (sorted), or the benchmark they come from."""
    from types import SimpleNamespace

    from rsmatch import export

    from .test_rsmatch_equations import make

    seen = {}  # the algorithms import the exporters when they export
    monkeypatch.setattr(export, "export_classifier", lambda *a: seen.update(cls=a))
    monkeypatch.setattr(export, "export_detector", lambda *a: seen.update(det=a))
    ema = SimpleNamespace(classifier="ema-cls", detector="ema-det")
    live = SimpleNamespace(classifier="live-cls", detector="live-det")
    names = ["a", "b", "c"]
    algo = make(**{"data.synthetic": "{cgan: /c, ddpm: /d}", "train.steps": 7, "train.seed": 5})
    algo.export(ema, live, tmp_path, names, {"x": 1.0})
    mean, std = algo.cfg.data.mean, algo.cfg.data.std
    small_stem = algo.cfg.model.small_stem
    assert seen["cls"] == ("ema-cls", tmp_path / "model", names, mean, std, small_stem, "rsmatch")
    training = {
        "real set (labeled + unlabeled)": "`data/demo/real`",
        "unlabeled pool generators": "cgan, ddpm",
        "synthetic labels used": "none",
        "labeled images": 3,
        "unlabeled pool": 4,
        "steps (train.steps)": 7,
        "RSMatch base": "fixmatch",
        "detector pseudo-label tau": 0.95,
        "queue (L, M, k)": "16, 10, 1",
        "seed": 5,
    }
    assert seen["det"] == ("live-det", tmp_path / "detector", mean, std, [4, 4], names,
                           "data/demo/real", training, {"x": 1.0})  # fmt: skip

    make(**{"data.synthetic": "{}"}).export(ema, live, tmp_path, names, {})
    assert seen["det"][7]["unlabeled pool generators"] == "none"
    make(**{"data.benchmark": "you/bench"}).export(ema, live, tmp_path, names, {})
    assert seen["det"][6] == "you/bench"
    assert seen["det"][7]["real set (labeled + unlabeled)"] == "`you/bench`"
    assert seen["det"][7]["unlabeled pool generators"] == "see the benchmark"

    seen.clear()  # the shared-encoder ablation has no detector of its own: the classifier only
    make().export(ema, SimpleNamespace(detector=None), tmp_path, names, {})
    assert list(seen) == ["cls"]


def test_rsmatch_asks_for_x_lb_strong_view_only_with_strong_labeled():
    """Loss (2) reads batch.x_lb_s with `rsmatch.strong_labeled`: the trainer must build it."""
    from .test_rsmatch_equations import make

    assert make().views == BatchViews(unlabeled=True, strong_labeled=False)
    strong = make(**{"rsmatch.strong_labeled": True})
    assert strong.views == BatchViews(unlabeled=True, strong_labeled=True)


def test_detector_mask_rate_uses_the_configured_detector_threshold():
    """At tau_d = 0.75 the detector confidences 0.881 / 0.731 / 0.75 / 0.953 (the equations'
    scenario, u2 set to exactly 0.75) pass 3 of 4; at 0.95 only 1 of 4 would."""
    from .test_rsmatch_equations import DET, run_step

    det = {**DET, 12: [0.0, 1.0986122]}  # softmax [0.25, 0.75]
    _, out = run_step(det=det, **{"rsmatch.detector_threshold": 0.75})
    assert out.metrics["detector_mask_rate"].item() == 0.75
    _, out = run_step(det=det)
    assert out.metrics["detector_mask_rate"].item() == 0.25


# --- FreeMatch, FlexMatch state --------------------------------------------------------------


def test_freematch_masks_with_the_thresholds_updated_by_this_batch():
    """ema_p = 0: the thresholds become this batch's statistics before masking: time_p = mean
    max p = 0.6, p_model = [0.4, 0.35, 0.25]; class 0: 0.6 * 0.4 / 0.4 = 0.6 (0.7 passes),
    class 1: 0.6 * 0.35 / 0.4 = 0.525 (0.5 fails). The initial 1/3 would pass both."""
    algo = _algo("freematch", **{"freematch.ema_p": 0.0})
    probs = [[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]]
    logits = [[math.log(v) for v in row] for row in probs]
    out = algo.pseudo_labels(_views(logits), _batch([0, 1]), _ctx())
    assert out.mask.tolist() == [1.0, 0.0]
    assert out.metrics["time_p"].item() == pytest.approx(0.6)


def test_freematch_and_flexmatch_start_from_usb_initial_state():
    """FreeMatch: time_p, p_model, label_hist = 1/C; FlexMatch: sigma 0 (every sample passes at
    the start), nothing selected."""
    free = _algo("freematch")
    assert free.time_p.tolist() == pytest.approx([1 / 3])
    assert free.p_model.tolist() == pytest.approx([1 / 3] * 3)
    assert free.label_hist.tolist() == pytest.approx([1 / 3] * 3)
    flex = _algo("flexmatch", num_unlabeled=4)
    assert flex.classwise_acc.tolist() == [0.0, 0.0, 0.0]
    assert flex.selected_label.tolist() == [-1, -1, -1, -1]
    probs = [[0.4, 0.3, 0.3]]
    out = flex.pseudo_labels(_views([[math.log(v) for v in probs[0]]]), _batch([0]), _ctx())
    assert out.mask.tolist() == [1.0]


def test_defaults_are_the_papers_and_usb_cifar_recipes():
    """The paper (docs/method.md): L 16, M 10, k 1, tau 0.95; USB's recipes: FreeMatch m 0.999,
    lambda_e 0.001; SimMatch T 0.1, alpha 0.9, da_len 32, proj 128, bank m 0.7, epoch 0 = 1024
    steps."""
    from rsmatch.config import load_config

    cfg = load_config(None, ["algorithm=rsmatch"])
    r, f, s = cfg.rsmatch, cfg.freematch, cfg.simmatch
    assert (r.queue_length, r.queue_picks, r.queue_topk, r.detector_threshold) == (16, 10, 1, 0.95)
    assert (r.base, r.class_wise, r.fake_head, r.shared_encoder) == ("fixmatch", True, True, False)
    assert (cfg.ssl.threshold, cfg.ssl.lambda_u) == (0.95, 1.0)
    assert (f.ema_p, f.ent_loss_ratio, cfg.flexmatch.thresh_warmup) == (0.999, 0.001, True)
    assert (s.temperature, s.smoothing_alpha, s.da_len, s.proj_size) == (0.1, 0.9, 32, 128)
    assert (s.bank_momentum, s.warmup_steps, s.lambda_in, s.usb_bank_norm) == (
        0.7,
        1024,
        1.0,
        False,
    )


# --- CSQueue ---------------------------------------------------------------------------------


def test_queue_ties_among_many_candidates_go_to_the_earliest_batch_positions():
    """17 candidates of one class, all scored 0.5, k = 2: positions 0 and 1 are pushed, in
    that order (an unstable sort picks others from 17 items on: [8, 16] on CPU)."""
    from rsmatch.csqueue import CSQueue

    from .test_rsmatch import SHAPE, _images, _queued_ids

    q = CSQueue(num_classes=1, length=4, picks=1, topk=2, image_shape=SHAPE)
    ids = list(range(17))
    q.update(torch.full((17,), 0.5), torch.zeros(17, dtype=torch.long), _images(ids),
             torch.tensor(ids), torch.Generator())  # fmt: skip
    assert _queued_ids(q, 0) == [0, 1]
    assert sorted(q.held_sources().tolist()) == [0, 1]
