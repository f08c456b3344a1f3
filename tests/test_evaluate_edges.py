"""Evaluation helpers at their edges: denominators, single items, warning thresholds."""

import pytest
import torch

from rsmatch.data.batch import Provenance
from rsmatch.evaluate import (
    accuracy,
    batch_detector_acc,
    collapse_warning,
    detector_metrics,
    queue_purity,
)

PROV = Provenance(torch.tensor([False, True, False, False]), ["real", "a", "real", "real"])


def test_accuracy_by_hand():
    assert accuracy(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_precision_and_recall_with_a_single_positive():
    m = detector_metrics(torch.tensor([0, 1, 0, 0]), PROV)  # one call, one truth, both right
    assert m["detector_precision"] == 1.0 and m["detector_recall"] == 1.0
    # no call of synthetic: precision undefined, left out (it read 0); recall 0 of 1
    none = detector_metrics(torch.tensor([0, 0, 0, 0]), PROV)
    assert "detector_precision" not in none and none["detector_recall"] == 0.0
    # a real-only pool: recall undefined, left out (it read 0); precision 0 of 1 call
    real_only = Provenance(torch.tensor([False, False]), ["real", "real"])
    m = detector_metrics(torch.tensor([1, 0]), real_only)
    assert m == {"detector_acc": 0.5, "detector_precision": 0.0, "detector_called_synthetic": 0.5,
                 "detector_acc/real": 0.5}  # fmt: skip


def test_queue_purity_of_one_item():
    assert queue_purity(torch.tensor([1]), PROV) == 1.0
    assert queue_purity(torch.tensor([0]), PROV) == 0.0
    assert queue_purity(torch.tensor([], dtype=torch.long), PROV) is None


def test_batch_detector_acc_reads_provenance_at_the_batch_indices():
    acc = batch_detector_acc(torch.tensor([1, 0, 1]), torch.tensor([1, 2, 3]), PROV)
    assert acc.item() == pytest.approx(2 / 3)  # truth [T, F, F]


def test_collapse_warning_thresholds_are_strict():
    assert collapse_warning(0.9, 0.0) is None  # "more than 90%"
    assert collapse_warning(0.95, 0.05) is None  # "under 5%"
    assert collapse_warning(0.95, 0.04) == (
        "detector may be collapsing: it calls 95% of the unlabeled pool synthetic but 4% of "
        "labeled reals (it may be memorising the labeled set); consider "
        "rsmatch.strong_labeled=true"
    )
