"""Baseline edges the USB parity tests do not reach: config messages and bounds, threshold
boundaries, constants, normalisation axes and state layout of FlexMatch, FreeMatch, SimMatch."""

import math

import pytest
import torch

from rsmatch.algorithms import make_algorithm
from rsmatch.algorithms.base import StepContext, Views, last_occurrence
from rsmatch.algorithms.freematch import _safe_inverse, fairness_loss
from rsmatch.config import ConfigError, load_config
from rsmatch.data.batch import Batch

from .conftest import ON_CUDA


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("freematch.ema_p", -0.5, "freematch.ema_p=-0.5: not in [0, 1]"),
     ("freematch.ema_p", 1.5, "freematch.ema_p=1.5: not in [0, 1]"),
     ("simmatch.temperature", 0, "simmatch.temperature=0.0: must be positive"),
     ("simmatch.da_len", 0, "simmatch.da_len=0: must be >= 1"),
     ("simmatch.smoothing_alpha", -0.5, "simmatch.smoothing_alpha=-0.5: not in [0, 1]"),
     ("simmatch.smoothing_alpha", 1.5, "simmatch.smoothing_alpha=1.5: not in [0, 1]"),
     ("simmatch.proj_size", 0, "simmatch.proj_size=0: must be >= 1"),
     ("simmatch.lambda_in", -1, "simmatch.lambda_in=-1.0: must be >= 0"),
     ("simmatch.warmup_steps", -1, "simmatch.warmup_steps=-1: must be >= 0"),
     ("simmatch.bank_momentum", 1.5, "simmatch.bank_momentum=1.5: not in [0, 1]"),
     ("freematch.ent_loss_ratio", -0.1, "freematch.ent_loss_ratio=-0.1: must be >= 0"),
     ("train.momentum", 1, "train.momentum=1.0: not in [0, 1)"),
     ("train.weight_decay", -1e-4, "train.weight_decay=-0.0001: must be >= 0"),
     ("train.cosine_cycles", -0.5, "train.cosine_cycles=-0.5: must be >= 0"),
     ("data.std", "[0.2, 0.2]", "data.std=[0.2, 0.2]: needs 3 values (R, G, B)")],
)  # fmt: skip
def test_bad_values_name_the_key(key, value, message):
    algorithm = key.split(".")[0] if key.split(".")[0] in ("freematch", "simmatch") else "fixmatch"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"algorithm={algorithm}", f"{key}={value}"])
    assert str(err.value) == message


@pytest.mark.parametrize(
    "override",
    ["freematch.ema_p=0", "freematch.ema_p=1", "simmatch.da_len=1",
     "simmatch.smoothing_alpha=0", "simmatch.smoothing_alpha=1", "simmatch.warmup_steps=0",
     "simmatch.bank_momentum=0", "simmatch.bank_momentum=1", "freematch.ent_loss_ratio=0",
     "simmatch.proj_size=1", "simmatch.lambda_in=0"],
)  # fmt: skip
def test_bounds_are_allowed(override):
    load_config(None, [f"algorithm={override.split('.')[0]}", override])


def test_safe_inverse_maps_zero_and_nan_to_zero():
    x = torch.tensor([0.0, -0.0, float("nan"), 2.0, -4.0])
    assert _safe_inverse(x).tolist() == [0.0, 0.0, 0.0, 0.5, -0.25]


# --- The points USB parity does not reach: boundaries, constants, axes, state layout ---------
# Inputs are tiny and chosen so that each value is computed by hand (in float64 below) or is
# exact in float32; the comments give the arithmetic.

THREE_QUARTERS = [1.0986122, 0.0, -100.0]  # softmax: class 0 at 0.75 exactly in float32


def _algo(name, num_classes=3, num_labeled=2, num_unlabeled=6, **overrides):
    cfg = load_config(None, [f"algorithm={name}", *[f"{k}={v}" for k, v in overrides.items()]])
    return make_algorithm(cfg, num_classes, num_labeled, num_unlabeled, (3, 32, 32))


def _ctx(step=0):
    return StepContext(step=step, generator=torch.Generator())


def _batch(idx_ulb, y_lb=(0,), idx_lb=(0,)):
    return Batch(x_lb=torch.zeros(len(y_lb)), y_lb=torch.tensor(y_lb),
                 idx_lb=torch.tensor(idx_lb), idx_ulb=torch.tensor(idx_ulb))  # fmt: skip


def _views(logits_w, logits_s=None, **proj):
    """Views from weak (and strong) logits; proj={"w": ..., "s": ..., "lb": ...} features."""
    logits_w = torch.tensor(logits_w)
    logits_s = logits_w.clone() if logits_s is None else torch.tensor(logits_s)
    views = Views({}, {"logits": logits_w}, {"logits": logits_s})
    for name, feat in proj.items():
        getattr(views, name)["proj"] = torch.tensor(feat)
    return views


def test_three_quarters_is_exact():
    assert torch.tensor(THREE_QUARTERS).softmax(-1).max() == 0.75


# FlexMatch


def test_flexmatch_without_warmup_divides_by_the_most_selected_class():
    selected = torch.tensor([-1] * 5 + [0, 0, 0, 1])  # 5 unused, three class 0, one class 1
    cold = _algo("flexmatch", num_unlabeled=9, **{"flexmatch.thresh_warmup": False})
    assert cold.learning_effect(selected).tolist() == pytest.approx([1.0, 1 / 3, 0.0])  # / 3
    warm = _algo("flexmatch", num_unlabeled=9)
    assert warm.learning_effect(selected).tolist() == pytest.approx([0.6, 0.2, 0.0])  # / 5


def test_flexmatch_keeps_a_confidence_on_its_thresholds():
    algo = _algo("flexmatch", **{"ssl.threshold": 0.75})
    algo.classwise_acc = torch.tensor([1.0, 0.5, 0.0])
    # class 0: 0.75 * 1 / (2 - 1) = 0.75 exactly; row 1 has p = 0.75, row 2 p = 0.5 (fails)
    half = [math.log(2.0), 0.0, 0.0]
    out = algo.pseudo_labels(_views([THREE_QUARTERS, half]), _batch([3, 4]), _ctx())
    assert out.targets.tolist() == [0, 0]
    assert out.mask.tolist() == [1.0, 0.0]
    # max p = 0.75 = tau is selected: recorded as class 0 (the 0.5 is not)
    assert algo.selected_label.tolist() == [-1, -1, -1, 0, -1, -1]


# FreeMatch


def _freematch(time_p, p_model, label_hist=(0.6, 0.2, 0.2), **overrides):
    """FreeMatch with frozen statistics (ema_p = 1: the update leaves them exactly)."""
    algo = _algo("freematch", **{"freematch.ema_p": 1.0, **overrides})
    algo.time_p = torch.tensor([time_p])
    algo.p_model = torch.tensor(p_model)
    algo.label_hist = torch.tensor(label_hist)
    return algo


def test_freematch_keeps_a_confidence_on_the_self_adaptive_threshold():
    algo = _freematch(0.75, [0.5, 0.3, 0.2])
    # thresholds: class 0: 0.75 * 0.5 / 0.5 = 0.75 exactly; class 1: 0.75 * 0.3 / 0.5 = 0.45
    logits = [THREE_QUARTERS, [math.log(0.3), math.log(0.4), math.log(0.3)]]
    out = algo.pseudo_labels(_views(logits), _batch([0, 1]), _ctx())
    assert out.targets.tolist() == [0, 1]
    assert out.mask.tolist() == [1.0, 0.0]  # 0.75 >= 0.75; 0.4 < 0.45
    assert list(out.metrics) == ["time_p"] and out.metrics["time_p"].item() == 0.75


# target = SumNorm(p_model / label_hist) = SumNorm([5/6, 3/2, 1]) = [0.25, 0.45, 0.3]
TARGET = [0.25, 0.45, 0.3]


def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_fairness_loss_reads_only_the_masked_rows():
    logits_s = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0]]  # strong argmax 0, 1, 2
    loss = fairness_loss(torch.tensor(logits_s), torch.tensor([1.0, 1.0, 0.0]),
                         torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.6, 0.2, 0.2]))  # fmt: skip
    # masked rows 0 and 1: histogram [1/2, 1/2, 0], mean p_s over them; class 2 estimate 0
    p0, p1 = _softmax(logits_s[0]), _softmax(logits_s[1])
    mean = [(a + b) / 2 for a, b in zip(p0, p1)]
    est = [mean[0] * 2, mean[1] * 2, 0.0]
    est = [e / sum(est) for e in est]
    expected = sum(t * math.log(e + 1e-12) for t, e in zip(TARGET, est))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_freematch_fairness_loss_needs_one_passing_row_and_none_is_zero():
    algo = _freematch(0.9, [0.5, 0.3, 0.2])  # thresholds 0.9, 0.54, 0.36
    logits_s = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    weak = [[math.log(0.95), math.log(0.03), math.log(0.02)], [0.0, 0.0, 0.0]]
    out = algo.pseudo_labels(_views(weak, logits_s), _batch([0, 1]), _ctx())
    assert out.mask.tolist() == [1.0, 0.0]
    # one row passes: its strong prediction alone, histogram [1, 0, 0] -> estimate [1, 0, 0]
    expected = 0.001 * (TARGET[1] + TARGET[2]) * math.log(1e-12)
    assert out.losses["loss_fair"].item() == pytest.approx(expected, rel=1e-6)
    out = algo.pseudo_labels(_views(weak[1:] * 2, logits_s), _batch([0, 1]), _ctx())
    assert out.mask.tolist() == [0.0, 0.0]
    assert out.losses["loss_fair"].item() == 0.0  # finite and weighted by 0, as USB skips it


def test_last_occurrence_by_hand():
    idx = torch.tensor([3, 1, 3, 2, 1])
    assert last_occurrence(idx, 5).tolist() == [2, 4, 2, 3, 4]
    among = torch.tensor([True, False, False, True, False])  # no counted copy of 1: -1
    assert last_occurrence(idx, 5, among).tolist() == [0, -1, 0, 3, -1]


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_flexmatch_records_the_last_selected_prediction_of_a_repeated_image(device):
    """Image 2 three times in one batch (it spans two epochs): selected as class 0, selected as
    class 1, then not selected (argmax class 0). The last selected prediction is recorded, on
    any device (a plain index_put lets any copy win on CUDA)."""
    algo = _algo("flexmatch", **{"ssl.threshold": 0.75}).to(device)
    class_1 = [0.0, 1.0986122, -100.0]  # 0.75 on class 1
    weak = [THREE_QUARTERS, class_1, class_1, [0.0, 0.0, 0.0]]
    batch = _batch([2, 5, 2, 2])
    batch.idx_ulb = batch.idx_ulb.to(device)
    views = _views(weak)
    views.w["logits"] = views.w["logits"].to(device)
    algo.pseudo_labels(views, batch, _ctx())
    assert algo.selected_label.tolist() == [-1, -1, 1, -1, -1, 1]


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_simmatch_bank_takes_the_last_feature_of_a_repeated_labeled_image(device):
    """(On a CPU a plain index_put happens to let the last copy win too; on CUDA it need not.)"""
    algo = _algo("simmatch", **{"simmatch.proj_size": 2}).to(device)
    algo.bank[:, 1] = torch.tensor([1.0, 0.0])
    feat = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # image 1 twice: first [1, 0], last [0, 1]
    labels, idx = torch.tensor([0, 2]), torch.tensor([1, 1])
    algo.update_bank(feat.to(device), labels.to(device), idx.to(device), _ctx())
    # 0.7 * [1, 0] + 0.3 * [0, 1] = [0.7, 0.3], over its norm sqrt(0.58)
    assert algo.bank[:, 1].tolist() == pytest.approx([0.919145, 0.393919], abs=1e-6)
    assert algo.bank_labels[1].item() == 2


# SimMatch


def test_simmatch_bank_starts_from_the_seed_with_unit_columns():
    banks, cfg = [], {"train.seed": 3, "simmatch.proj_size": 4}
    with torch.random.fork_rng():
        for global_seed in (1, 2):  # the global generator must not matter
            torch.manual_seed(global_seed)
            banks.append(_algo("simmatch", num_labeled=5, **cfg).bank)
    assert torch.equal(banks[0], banks[1])
    draw = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))  # USB: randn(dim, K)
    assert torch.allclose(banks[0], draw / draw.norm(dim=0), atol=1e-6)
    assert banks[0].norm(dim=0).tolist() == pytest.approx([1.0] * 5)
    other = _algo("simmatch", num_labeled=5, **{"train.seed": 4, "simmatch.proj_size": 4}).bank
    assert not torch.equal(other, banks[0])


def test_simmatch_alignment_window_is_a_ring_in_write_order():
    algo = _algo("simmatch", **{"simmatch.da_len": 3})
    batches = [torch.tensor([[0.1 * i, 1 - 0.1 * i, 0.0]]) for i in range(1, 5)]
    ptrs = []
    for probs in batches:
        algo.align(probs, _ctx())
        ptrs.append(algo.da_ptr.item())
    assert ptrs == [1, 2, 0, 1]  # USB's (ptr + 1) % len; slot 0 now holds the 4th batch
    assert torch.equal(algo.da_history, torch.cat([batches[3], batches[1], batches[2]]))


def test_simmatch_alignment_by_hand_with_a_rare_class():
    algo = _algo("simmatch", **{"simmatch.da_len": 2})
    probs = torch.tensor([[0.6, 0.399996, 4e-6], [0.2, 0.8, 0.0]])
    aligned = algo.align(probs, _ctx())
    # history: [batch mean, zeros] -> mean over the window = batch mean / 2 (class 2: 1e-6)
    p = probs.double().tolist()
    window = [(p[0][c] + p[1][c]) / 4 for c in range(3)]
    expected = []
    for row in p:
        scaled = [v / (w + 1e-6) for v, w in zip(row, window)]  # the target 1/C cancels
        expected.append([v / sum(scaled) for v in scaled])
    # rare class: 4e-6 / (1e-6 + 1e-6) = 2, where 4e-6 / 1e-6 would give 4
    assert aligned.tolist()[0] == pytest.approx(expected[0], rel=1e-6)
    assert aligned.tolist()[1] == pytest.approx(expected[1], rel=1e-6)


def test_simmatch_alignment_target_stays_positive_at_a_million_classes():
    # 1 / C + 1e-6 is a factor common to all classes (it cancels); at C = 10**6 it must not be 0
    algo = _algo("simmatch", num_classes=10**6, **{"simmatch.da_len": 1})
    probs = torch.full((1, 10**6), 1e-6)
    assert algo.align(probs, _ctx()).sum().item() == pytest.approx(1.0, rel=1e-4)


def _bank_after_update(usb_bank_norm):
    algo = _algo("simmatch", num_labeled=3, **{"simmatch.usb_bank_norm": usb_bank_norm})
    algo.bank = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # items [1,0], [0,1], [0,1]
    feat = torch.tensor([[0.6, 0.8], [0.0, 1.0]])  # for items 0 and 2
    algo.update_bank(feat, torch.tensor([2, 1]), torch.tensor([0, 2]), _ctx())
    assert algo.bank_labels.tolist() == [2, 0, 1]
    # mixed = 0.7 * bank + 0.3 * feat: item 0 [0.88, 0.24], item 2 [0, 1]
    return algo.bank.tolist()


def test_simmatch_bank_update_normalises_each_item():
    norm = math.hypot(0.88, 0.24)
    bank = _bank_after_update(False)
    assert bank[0] == pytest.approx([0.88 / norm, 0.0, 0.0])
    assert bank[1] == pytest.approx([0.24 / norm, 1.0, 1.0])


def test_simmatch_usb_bank_norm_normalises_the_slab_along_its_sample_axis():
    norm = math.hypot(0.24, 1.0)  # the slab [[0.88, 0], [0.24, 1]] normalised by rows
    bank = _bank_after_update(True)
    assert bank[0] == pytest.approx([1.0, 0.0, 0.0])
    assert bank[1] == pytest.approx([0.24 / norm, 1.0, 1.0 / norm])


def test_simmatch_two_rows_by_hand_from_the_warmup_step_on():
    algo = _algo("simmatch", **{"simmatch.da_len": 2, "simmatch.warmup_steps": 5})
    algo.da_history[1] = torch.tensor([0.5, 0.3, 0.2])  # an earlier batch's mean
    algo.bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    algo.bank_labels = torch.tensor([0, 2])
    probs = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]
    feat_w, feat_s = [[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [0.8, 0.6]]
    logits = [[math.log(v) for v in row] for row in probs]
    views = _views(logits, w=feat_w, s=feat_s, lb=[[1.0, 0.0]])
    out = algo.pseudo_labels(views, _batch([0, 1]), _ctx(step=5))  # the first step with L_in
    # alignment: p / (window mean + 1e-6), each row normalised; the window holds this batch's
    # mean [0.4, 0.25, 0.35] and the earlier one
    mean = [(a + b) / 4 + h / 2 for a, b, h in zip(*probs, [0.5, 0.3, 0.2])]
    aligned = [[v / (m + 1e-6) for v, m in zip(row, mean)] for row in probs]
    aligned = [[v / sum(row) for v in row] for row in aligned]
    loss_in, targets = 0.0, []
    for a, fw, fs in zip(aligned, feat_w, feat_s):
        q = _softmax([fw[0] / 0.1, fw[1] / 0.1])  # similarity to bank items 0 and 1
        teacher = [q[0] * a[0], q[1] * a[2]]  # unfolded by the items' labels 0 and 2
        teacher = [t / sum(teacher) for t in teacher]
        student = [math.log(v) for v in _softmax([fs[0] / 0.1, fs[1] / 0.1])]
        loss_in -= (teacher[0] * student[0] + teacher[1] * student[1]) / 2
        targets.append([0.9 * a[0] + 0.1 * q[0], 0.9 * a[1], 0.9 * a[2] + 0.1 * q[1]])
    assert out.losses["loss_in"].item() == pytest.approx(loss_in, rel=1e-6)
    assert out.targets.tolist()[0] == pytest.approx(targets[0], rel=1e-6)
    assert out.targets.tolist()[1] == pytest.approx(targets[1], rel=1e-6)


def test_simmatch_keeps_an_aggregated_confidence_on_the_threshold():
    overrides = {"ssl.threshold": 0.75, "simmatch.smoothing_alpha": 0, "simmatch.warmup_steps": 0}
    algo = _algo("simmatch", num_labeled=4, **overrides)
    algo.bank = torch.tensor([[1.0] * 4, [0.0] * 4])  # four equal items: q = 1/4 each, exactly
    algo.bank_labels = torch.tensor([0, 0, 0, 1])
    views = _views([[0.0, 0.0, 0.0]], w=[[1.0, 0.0]], s=[[1.0, 0.0]], lb=[[1.0, 0.0]])
    out = algo.pseudo_labels(views, _batch([0]), _ctx(step=1))
    assert out.targets.tolist() == [[0.75, 0.25, 0.0]]  # alpha 0: the aggregation alone
    assert out.mask.tolist() == [1.0]
