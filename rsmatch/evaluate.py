"""Evaluation: classifier accuracy, and the detector judged against the provenance columns.

This module (with the real-only oracle in `data.loaders`) is where `is_synthetic` may be read.
Nothing here feeds back into training: results go to logs and metrics files only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rsmatch.data.batch import Provenance

Gather = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
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
    per_rank = -(-n // world)
    lo, hi = rank * per_rank, min((rank + 1) * per_rank, n)
    preds = torch.full((per_rank,), -1, dtype=torch.long, device=device)
    for start in range(lo, hi, batch_size):
        chunk = images[start : min(start + batch_size, hi)].to(device)
        preds[start - lo : start - lo + len(chunk)] = fn(chunk).argmax(-1)
    return gather(preds)[:n] if world > 1 else preds[: hi - lo]


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    return float((preds.cpu() == labels.cpu()).float().mean())


def detector_metrics(
    pred_synthetic: torch.Tensor, prov: Provenance, prefix: str = "detector"
) -> dict[str, float]:
    """Accuracy, precision and recall (synthetic = positive), and accuracy per generator."""
    pred = pred_synthetic.cpu().bool()
    truth = prov.is_synthetic.cpu()
    tp = float((pred & truth).sum())
    out = {
        f"{prefix}_acc": float((pred == truth).float().mean()),
        f"{prefix}_precision": tp / max(float(pred.sum()), 1.0),
        f"{prefix}_recall": tp / max(float(truth.sum()), 1.0),
        f"{prefix}_called_synthetic": float(pred.float().mean()),
    }
    gens = prov.generator
    for g in sorted(set(gens)):
        sel = torch.tensor([x == g for x in gens])
        out[f"{prefix}_acc/{g}"] = float((pred[sel] == truth[sel]).float().mean())
    return out


def queue_purity(sources: torch.Tensor, prov: Provenance) -> float:
    """Share of queued items that are truly synthetic (nan while the queue is empty)."""
    if len(sources) == 0:
        return float("nan")
    return float(prov.is_synthetic[sources.cpu()].float().mean())


def batch_detector_acc(
    pred_synthetic: torch.Tensor, idx_ulb: torch.Tensor, prov: Provenance
) -> torch.Tensor:
    """Per-step detector accuracy on this rank's unlabeled batch (evaluation only)."""
    truth = prov.is_synthetic.to(idx_ulb.device)[idx_ulb]  # no copy if already on the device
    return (pred_synthetic.bool() == truth).float().mean()


def collapse_warning(pool_called_synthetic: float, labeled_called_synthetic: float) -> str | None:
    """The failure RSMATCH.md section 6 warns of: everything unlabeled looks synthetic."""
    if pool_called_synthetic > 0.9 and labeled_called_synthetic < 0.05:
        return (
            f"detector may be collapsing: it calls {pool_called_synthetic:.0%} of the unlabeled "
            f"pool synthetic but {labeled_called_synthetic:.0%} of labeled reals (it may be "
            "memorising the labeled set); consider rsmatch.strong_labeled=true"
        )
    return None
