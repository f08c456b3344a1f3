"""FlexMatch, FreeMatch and SimMatch against values computed by hand from USB's formulas."""

import math

import pytest
import torch

from rsmatch.algorithms import make_algorithm
from rsmatch.algorithms.base import StepContext, Views
from rsmatch.config import load_config
from rsmatch.data.batch import Batch


def _algo(name, num_unlabeled=6, num_labeled=2, **overrides):
    args = [f"algorithm={name}", "ssl.threshold=0.95", *[f"{k}={v}" for k, v in overrides.items()]]
    return make_algorithm(load_config(None, args), 3, num_labeled, num_unlabeled, (3, 32, 32))


def _views(probs_w, logits_s=None, **extra_w):
    logits_w = torch.tensor(probs_w).log()
    logits_s = torch.tensor(logits_s) if logits_s is not None else logits_w.clone()
    return Views({}, {"logits": logits_w, **extra_w}, {"logits": logits_s})


def _ctx(step=0):
    return StepContext(step=step, generator=torch.Generator())


def _batch(idx_ulb, **kw):
    fields = {"x_lb": torch.zeros(1), "y_lb": torch.zeros(1, dtype=torch.long),
              "idx_lb": torch.zeros(1, dtype=torch.long), "idx_ulb": torch.tensor(idx_ulb)}  # fmt: skip
    return Batch(**{**fields, **kw})


# --- FlexMatch -------------------------------------------------------------------------------


def test_flexmatch_learning_effect_with_and_without_warmup():
    selected = torch.tensor([-1, -1, -1, -1, 0, 1, 1])  # 4 unused, one class 0, two class 1
    warm = _algo("flexmatch", num_unlabeled=7)
    assert warm.learning_effect(selected).tolist() == [0.25, 0.5, 0.0]  # divided by 4 (the -1s)
    cold = _algo("flexmatch", num_unlabeled=7, **{"flexmatch.thresh_warmup": False})
    assert cold.learning_effect(selected).tolist() == [0.5, 1.0, 0.0]  # divided by 2
    # all in one bucket (none selected, or all one class): sigma is left as it was
    warm.classwise_acc = torch.tensor([0.1, 0.2, 0.3])
    assert warm.learning_effect(torch.full((7,), -1)).tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert warm.learning_effect(torch.full((7,), 2)).tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_flexmatch_convex_threshold_and_selection():
    algo = _algo("flexmatch", num_unlabeled=6)
    algo.classwise_acc = torch.tensor([0.25, 0.5, 0.0])
    # thresholds: class 0: 0.95*0.25/1.75 = 0.135714; class 1: 0.95*0.5/1.5 = 0.316667; class 2: 0
    probs = [
        [0.13, 0.5, 0.37],
        [0.4, 0.3, 0.3],
        [0.98, 0.01, 0.01],
        [0.35, 0.31, 0.34],
        [0.1, 0.3, 0.6],
    ]
    out = algo.pseudo_labels(_views(probs), _batch([0, 1, 2, 3, 4]), _ctx())
    assert out.targets.tolist() == [1, 0, 0, 0, 2]
    # .5 >= .3167 yes; .4 >= .1357 yes; .98 yes; .35 >= .1357 yes; class 2 threshold 0: yes
    assert out.mask.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0]
    out = algo.pseudo_labels(_views([[0.1, 0.31, 0.59], [0.2, 0.3, 0.5]]), _batch([5, 0]), _ctx())
    # sigma is now [1/5, 0, 0] (one selection): class 2 threshold 0 -> both pass
    assert out.mask.tolist() == [1.0, 1.0]
    algo.classwise_acc = torch.tensor([0.25, 0.5, 0.0])
    out = algo.pseudo_labels(_views([[0.3, 0.31, 0.39], [0.2, 0.5, 0.3]]), _batch([1, 3]), _ctx())
    assert out.mask.tolist() == [1.0, 1.0]
    out = algo.pseudo_labels(_views([[0.34, 0.33, 0.33]]), _batch([4]), _ctx())
    sigma0 = float(algo.classwise_acc[0])
    assert out.mask.tolist() == [float(0.95 * sigma0 / (2 - sigma0) <= 0.34)]
    # only the sample with max p >= 0.95 was ever recorded (index 2 -> class 0)
    assert algo.selected_label.tolist() == [-1, -1, 0, -1, -1, -1]
    assert algo.classwise_acc.tolist() == pytest.approx([1 / 5, 0.0, 0.0])


# --- FreeMatch -------------------------------------------------------------------------------


def test_freematch_self_adaptive_threshold_by_hand():
    algo = _algo("freematch")
    probs = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]
    out = algo.pseudo_labels(_views(probs), _batch([0, 1]), _ctx())
    m = 0.999
    time_p = m / 3 + (1 - m) * (0.7 + 0.6) / 2
    p_model = [m / 3 + (1 - m) * v for v in (0.4, 0.25, 0.35)]
    label_hist = [m / 3 + (1 - m) * v for v in (0.5, 0.0, 0.5)]
    assert float(algo.time_p) == pytest.approx(time_p)
    assert algo.p_model.tolist() == pytest.approx(p_model)
    assert algo.label_hist.tolist() == pytest.approx(label_hist)
    thresholds = [time_p * p_model[0] / max(p_model), time_p * p_model[2] / max(p_model)]
    assert (
        out.mask.tolist()
        == [float(thresholds[0] <= 0.7), float(thresholds[1] <= 0.6)]
        == [1.0, 1.0]
    )


def test_freematch_fairness_loss_by_hand():
    algo = _algo("freematch")
    algo.p_model = torch.tensor([0.5, 0.3, 0.2])
    algo.label_hist = torch.tensor([0.6, 0.2, 0.2])
    algo.cfg.freematch.ema_p = 1.0  # freeze the statistics to check the loss alone
    logits_s = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0]]
    out = algo.pseudo_labels(
        _views([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.4, 0.3, 0.3]], logits_s),
        _batch([0, 1, 2]),
        _ctx(),
    )
    # time_p = 1/3 (frozen): masked rows pass when p >= 1/3 * p_model[c] / 0.5
    assert out.mask.tolist() == [1.0, 1.0, 1.0]
    sm = lambda row: [math.exp(v) / sum(math.exp(u) for u in row) for v in row]  # noqa: E731
    ps = [sm(r) for r in logits_s]
    mean_ps = [sum(p[c] for p in ps) / 3 for c in range(3)]
    hist_s = [1 / 3, 1 / 3, 1 / 3]  # strong argmax: 0, 1, 2
    target = [a / b for a, b in zip([0.5, 0.3, 0.2], [0.6, 0.2, 0.2])]
    target = [t / sum(target) for t in target]
    est = [a / b for a, b in zip(mean_ps, hist_s)]
    est = [e / sum(est) for e in est]
    expected = 0.001 * sum(t * math.log(e + 1e-12) for t, e in zip(target, est))
    assert float(out.losses["loss_fair"]) == pytest.approx(expected, rel=1e-5)


# --- SimMatch --------------------------------------------------------------------------------


def test_simmatch_alignment_unfolding_and_aggregation_by_hand():
    algo = _algo("simmatch", num_labeled=2, **{"simmatch.da_len": 2, "simmatch.warmup_steps": 0})
    algo.bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two items, 2-d features
    algo.bank_labels = torch.tensor([0, 2])
    probs = [[0.6, 0.3, 0.1]]
    feat_w = torch.tensor([[1.0, 0.0]])
    views = _views(probs, proj=feat_w)
    views.s["proj"] = torch.tensor([[0.0, 1.0]])
    views.lb["proj"] = torch.tensor([[0.6, 0.8]])
    batch = _batch([0], y_lb=torch.tensor([1]))
    batch.idx_lb = torch.tensor([1])
    out = algo.pseudo_labels(views, batch, _ctx(step=5))
    # alignment: history = [[.6,.3,.1],[0,0,0]] -> mean [.3,.15,.05]; p * (1/3+1e-6)/(mean+1e-6)
    aligned = [0.6 / 0.3, 0.3 / 0.15, 0.1 / 0.05]
    aligned = [a / sum(aligned) for a in aligned]  # = uniform
    assert aligned == pytest.approx([1 / 3] * 3)
    # similarities feat_w @ bank = [1, 0] / T=0.1 -> q = softmax([10, 0])
    q = [math.exp(10) / (math.exp(10) + 1), 1 / (math.exp(10) + 1)]
    agg = [q[0], 0.0, q[1]]  # scattered by the bank labels 0 and 2
    expected = [0.9 * a + 0.1 * g for a, g in zip(aligned, agg)]
    assert out.targets[0].tolist() == pytest.approx(expected, rel=1e-4)
    assert out.mask.tolist() == [0.0]  # max 0.39 < 0.95
    # unfolding: teacher = q * aligned[label] normalised = q (aligned is uniform)
    student = [
        0.0 - math.log(1 + math.exp(10)),
        10 - math.log(1 + math.exp(10)),
    ]  # log softmax([0,10])
    loss_in = -(q[0] * student[0] + q[1] * student[1])
    assert float(out.losses["loss_in"]) == pytest.approx(loss_in, rel=1e-4)
    # the bank slot of labeled item 1 moved towards its feature and took its label
    mixed = torch.tensor([0.7 * 0.0 + 0.3 * 0.6, 0.7 * 1.0 + 0.3 * 0.8])
    assert algo.bank[:, 1].tolist() == pytest.approx((mixed / mixed.norm()).tolist())
    assert algo.bank_labels.tolist() == [0, 1]


def test_simmatch_warmup_switches_off_in_loss_and_aggregation():
    algo = _algo("simmatch", num_labeled=2, **{"simmatch.warmup_steps": 1024})
    views = _views([[0.6, 0.3, 0.1]], proj=torch.tensor([[1.0, 0.0] + [0.0] * 126]))
    views.s["proj"] = views.w["proj"].clone()
    views.lb["proj"] = views.w["proj"].clone()
    out = algo.pseudo_labels(views, _batch([0]), _ctx(step=1023))
    assert float(out.losses["loss_in"]) == 0.0
    assert out.targets.sum().item() == pytest.approx(1.0)  # the aligned weak probs alone


@pytest.mark.parametrize("name", ["flexmatch", "freematch", "simmatch"])
def test_baseline_runs_as_rsmatch_base(name):
    cfg = load_config(None, ["algorithm=rsmatch", f"rsmatch.base={name}", "model.backbone=wrn10_1",
                             "rsmatch.detector_backbone=wrn10_1"])  # fmt: skip
    algo = make_algorithm(cfg, 3, 4, 8, (3, 32, 32))
    model = algo.build_model()
    g = torch.Generator().manual_seed(0)
    img = lambda n: torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)  # noqa: E731
    batch = Batch(
        img(4), torch.tensor([0, 1, 2, 0]), torch.arange(4), None, img(8), img(8), torch.arange(8)
    )
    out = algo.step(model, batch, StepContext(step=2000, generator=torch.Generator()))
    assert algo.base.name == name and {"loss_ur", "loss_uf", "loss_ds"} <= set(out.losses)
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert any(k.startswith("base.") for k in algo.state_dict())
