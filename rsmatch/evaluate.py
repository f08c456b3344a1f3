"""Evaluation: classifier accuracy, and the detector judged against the provenance columns.

This module (with the real-only oracle in `data.loaders`) is where `is_synthetic` may be read.
Nothing here feeds back into training: results go to logs and metrics files only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rsmatch.data.batch import Provenance

Gather = Callable[[torch.Tensor], torch.Tensor]


def shard(n: int, rank: int, world: int) -> tuple[range, int]:
    """This rank's contiguous rows of n, and the size of the buffer every rank fills,
    ceil(n / world) (the last ranks hold fewer rows, or none); `gather_shards` joins them."""
    per_rank = -(-n // world)
    return range(rank * per_rank, min((rank + 1) * per_rank, n)), per_rank


def gather_shards(local: torch.Tensor, n: int, world: int, gather: Gather) -> torch.Tensor:
    """Every rank's padded buffer, in rank order, cut to the n rows: the same on every rank."""
    return gather(local)[:n] if world > 1 else local[:n]


@torch.no_grad()  # no graph: the EMA copy's parameters still require grad
def predict(
    fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    gather: Gather = lambda t: t,
) -> torch.Tensor:
    """argmax of fn over all images, each rank doing a contiguous shard; result on every rank."""
    n = len(images)
    rows, size = shard(n, rank, world)
    preds = torch.full((size,), -1, dtype=torch.long, device=device)
    for start in range(rows.start, rows.stop, batch_size):
        chunk = images[start : min(start + batch_size, rows.stop)].to(device)
        preds[start - rows.start : start - rows.start + len(chunk)] = fn(chunk).argmax(-1)
    return gather_shards(preds, n, world, gather)


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    return float((preds.cpu() == labels.cpu()).float().mean())


def detector_metrics(
    pred_synthetic: torch.Tensor, prov: Provenance, prefix: str = "detector"
) -> dict[str, float]:
    """Accuracy, precision and recall (synthetic = positive), and accuracy per generator.
    Precision without a call of synthetic, and recall without a synthetic image (a real-only
    pool), are undefined: left out, as a generator absent from the pool has no accuracy."""
    pred = pred_synthetic.cpu().bool()
    truth = prov.is_synthetic.cpu()
    tp = float((pred & truth).sum())
    out = {f"{prefix}_acc": float((pred == truth).float().mean())}
    if pred.any():
        out[f"{prefix}_precision"] = tp / float(pred.sum())
    if truth.any():
        out[f"{prefix}_recall"] = tp / float(truth.sum())
    out[f"{prefix}_called_synthetic"] = float(pred.float().mean())
    gens = prov.generator
    for g in sorted(set(gens)):
        sel = torch.tensor([x == g for x in gens])
        out[f"{prefix}_acc/{g}"] = float((pred[sel] == truth[sel]).float().mean())
    return out


def queue_purity(sources: torch.Tensor, prov: Provenance) -> float | None:
    """Share of queued items that are truly synthetic (None while the queue is empty: a NaN
    made metrics.json invalid JSON)."""
    if len(sources) == 0:
        return None
    return float(prov.is_synthetic[sources.cpu()].float().mean())


def batch_detector_acc(
    pred_synthetic: torch.Tensor, idx_ulb: torch.Tensor, prov: Provenance
) -> torch.Tensor:
    """Per-step detector accuracy on this rank's unlabeled batch (evaluation only)."""
    truth = prov.is_synthetic.to(idx_ulb.device)[idx_ulb]  # no copy if already on the device
    return (pred_synthetic.bool() == truth).float().mean()


def collapse_warning(pool_called_synthetic: float, labeled_called_synthetic: float) -> str | None:
    """The failure docs/method.md section 3 warns of: everything unlabeled looks synthetic."""
    if pool_called_synthetic > 0.9 and labeled_called_synthetic < 0.05:
        return (
            f"detector may be collapsing: it calls {pool_called_synthetic:.0%} of the unlabeled "
            f"pool synthetic but {labeled_called_synthetic:.0%} of labeled reals (it may be "
            "memorising the labeled set); consider rsmatch.strong_labeled=true"
        )
    return None
