"""Evaluation against provenance: hand-computed detector metrics, purity, collapse warning."""

import pytest
import torch

from rsmatch.data.batch import Provenance
from rsmatch.evaluate import (
    collapse_warning,
    detector_metrics,
    gather_shards,
    predict,
    queue_purity,
)

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
    # rank 0 with the collective (here: the other ranks' shards after its own): padding cut
    gather = lambda local: torch.cat([local, *shards[1:]])  # noqa: E731
    joined = predict(fn, images, 2, torch.device("cpu"), 0, 3, gather)
    assert joined.tolist() == [0, 0, 1, 0, 1, 0, 1]


def test_predict_on_one_process_batches_every_image_without_a_graph():
    """Defaults (rank 0 of 1): all 7 images in order, in chunks of at most batch_size, and no
    autograd graph: the EMA copy evaluated here keeps requires_grad on its parameters."""
    images = torch.tensor([[0.0], [1], [-1], [2], [-2], [3], [-3]])
    weight = torch.ones(1, requires_grad=True)
    seen = []

    def fn(x):
        seen.append((len(x), torch.is_grad_enabled()))
        return torch.cat([x * weight, -x * weight], 1)

    preds = predict(fn, images, 3, torch.device("cpu"))
    assert preds.tolist() == [0, 0, 1, 0, 1, 0, 1]
    assert seen == [(3, False), (3, False), (1, False)]


def test_gather_shards_joins_ranks_in_order_and_cuts_the_padding():
    """Two ranks, n = 3, buffers of 2 (rank 1 padded with -1): the gathered [r0, r1] cut to 3
    rows; one process never calls the collective."""
    rank_1 = torch.tensor([7, -1])
    gather = lambda local: torch.cat([local, rank_1])  # noqa: E731  (all_gather, seen by rank 0)
    assert gather_shards(torch.tensor([5, 6]), 3, 2, gather).tolist() == [5, 6, 7]

    def no_collective(local):
        raise AssertionError("one process needs no gather")

    assert gather_shards(torch.tensor([5, 6, -1]), 2, 1, no_collective).tolist() == [5, 6]
