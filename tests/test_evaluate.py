"""Evaluation against provenance: hand-computed detector metrics, purity, collapse warning."""

import pytest
import torch

from rsmatch.data.batch import Provenance
from rsmatch.evaluate import collapse_warning, detector_metrics, predict, queue_purity

PROV = Provenance(
    torch.tensor([False, False, True, True, True, False]), ["real", "real", "a", "a", "b", "real"]
)


def test_detector_metrics_by_hand():
    pred = torch.tensor([0, 1, 1, 0, 1, 0])  # TP 2, FP 1, FN 1, TN 2
    m = detector_metrics(pred, PROV)
    expected = {"detector_acc": 4 / 6, "detector_precision": 2 / 3, "detector_recall": 2 / 3,
                "detector_called_synthetic": 0.5, "detector_acc/a": 0.5, "detector_acc/b": 1.0,
                "detector_acc/real": 2 / 3}  # fmt: skip
    assert m == pytest.approx(expected)
    # synthetic is the positive class: TP 3, FP 1, FN 0 tells precision from recall
    m = detector_metrics(torch.tensor([0, 1, 1, 1, 1, 0]), PROV)
    assert (m["detector_precision"], m["detector_recall"]) == pytest.approx((3 / 4, 1.0))


def test_queue_purity():
    assert queue_purity(torch.tensor([2, 3, 0, 4]), PROV) == 0.75
    assert queue_purity(torch.tensor([], dtype=torch.long), PROV) is None


def test_collapse_warning_pattern():
    assert collapse_warning(0.95, 0.01) is not None
    assert collapse_warning(0.95, 0.2) is None and collapse_warning(0.5, 0.0) is None


def test_predict_shards_cover_every_image_once():
    """Each of 3 ranks predicts a contiguous shard padded to equal length (-1), as all_gather
    needs; concatenating the shards in rank order and cutting to N gives every image once."""
    images = torch.tensor([[0.0], [1], [-1], [2], [-2], [3], [-3]])
    fn = lambda x: torch.cat([x, -x], 1)  # noqa: E731  (argmax: 0 if x >= 0 else 1)
    shards = [predict(fn, images, 2, torch.device("cpu"), r, 3) for r in range(3)]
    assert [s.tolist() for s in shards] == [[0, 0, 1], [0, 1, 0], [1, -1, -1]]
    assert torch.cat(shards)[:7].tolist() == [0, 0, 1, 0, 1, 0, 1]
