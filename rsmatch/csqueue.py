"""The class-wise synthetic queue (CSQueue, docs/method.md section 2).

C first-in first-out sub-queues of length L hold weak views of unlabeled images that the
detector scores as most synthetic among those the classifier assigns to each class. Each step
M sub-queues are picked at random and each takes its top-k candidates. With several processes
every rank all-gathers only its own top k per picked class (score, pool index, image), in rank
order, and uses a pick generator seeded identically, so all ranks push the same items: the
queue is identical everywhere and equal to a one-process run on the same global batch. Push and
sample are tensor operations (no loop over items, no host sync in steady state).

`class_wise=False` is the ablation: one FIFO of length C*L fed with the top M*k of the batch.
The queue also remembers each item's index in the unlabeled pool (`sources`), which lets the
evaluation measure queue purity; training never looks those indices up. Its contents are
buffers of an `nn.Module`, so they move, save and load with the algorithm that owns it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from rsmatch.data.transfer import to_device

Gather = Callable[[torch.Tensor], torch.Tensor]


class _Top(NamedTuple):
    index: torch.Tensor  # [rows, k] columns, best first
    valid: torch.Tensor  # [rows, k] False where a row had fewer than k eligible columns


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a [rows, k] tensor over the trailing (image) dimensions of `like`."""
    trailing = like.shape[t.dim() :]
    return t.view(*t.shape, *[1] * len(trailing)).expand(*t.shape, *trailing)


class CSQueue(nn.Module):
    images: torch.Tensor
    sources: torch.Tensor
    pushed: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        length: int,
        picks: int,
        topk: int,
        image_shape: tuple[int, ...],
        class_wise: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.num_classes, self.picks, self.topk = num_classes, picks, topk
        self.class_wise = class_wise
        rows, self.capacity = (num_classes, length) if class_wise else (1, num_classes * length)
        shape = (rows, self.capacity, *image_shape)
        self.register_buffer("images", torch.zeros(shape, dtype=torch.uint8, device=device))
        self.register_buffer("sources", torch.full(shape[:2], -1, dtype=torch.long, device=device))
        self.register_buffer("pushed", torch.zeros(rows, dtype=torch.long, device=device))
        self._maybe_empty = True  # host-side; once False, never True again (FIFOs only grow)

    # -- reading ------------------------------------------------------------------------------
    def fill(self) -> torch.Tensor:
        """Items held per sub-queue."""
        return self.pushed.clamp(max=self.capacity)

    def __len__(self) -> int:
        return int(self.fill().sum())

    def held_sources(self) -> torch.Tensor:
        """Pool indices of every queued item (for purity; evaluation only)."""
        return self.sources[self.sources >= 0]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n queued images drawn uniformly with replacement (empty tensor if the queue is).

        Held slots are a prefix of each ring (pushes write slot `pushed % capacity`), so the
        k-th held item, row-major, is found by a search over the fill counts: no host sync
        once the queue has held anything (emptiness is checked on the host until then).
        """
        fill = self.fill()
        if self._maybe_empty:
            self._maybe_empty = bool(fill.sum() == 0)
            if self._maybe_empty:
                return self.images.new_zeros((0, *self.images.shape[2:]))
        # Exact integers: a 62-bit draw modulo the held count (bias < count / 2**62).
        draw = to_device(torch.randint(0, 2**62, (n,), generator=generator), fill.device)
        k = draw % fill.sum()
        ends = fill.cumsum(0)
        rows = torch.searchsorted(ends, k, right=True)
        slots = k - (ends - fill)[rows]
        return self.images[rows, slots]

    # -- writing ------------------------------------------------------------------------------
    def update(
        self,
        scores: torch.Tensor,
        pseudo_labels: torch.Tensor,
        images: torch.Tensor,
        sources: torch.Tensor,
        generator: torch.Generator,
        gather: Gather = lambda t: t,
    ) -> None:
        """Push the highest-scoring candidates of M random classes (see module doc).

        Each rank ranks its own candidates per picked class and all-gathers only the top k
        (score and pool index), in rank order; the global top k of those are the global
        batch's top k. Ties go to the lower global batch position (stable sorts), so ranks and
        a one-process run agree. Only the images of the local top k travel.
        """
        rows = to_device(self._picked_rows(generator), scores.device)  # drawn on the host
        if self.class_wise:
            k = min(self.topk, self.capacity)
            eligible = pseudo_labels[None, :] == rows[:, None]  # [M, N]
        else:  # one row, fed with the top M*k of the whole batch
            k = min(self.picks * self.topk, self.capacity)
            eligible = torch.ones(1, len(scores), dtype=torch.bool, device=scores.device)
        local = self._top(scores.float(), eligible, min(k, len(scores)))  # [M, <=k] this batch
        # -inf marks "no candidate"; real scores are finite logit margins.
        top_scores = torch.where(local.valid, scores.float()[local.index], -torch.inf)
        cand_scores = gather(top_scores[None]).transpose(0, 1).flatten(1)  # [M, world * local k]
        cand_sources = gather(sources[local.index][None]).transpose(0, 1).flatten(1)
        cand_images = gather(images[local.index][None]).transpose(0, 1).flatten(1, 2)
        # k of the global batch: above one rank's batch it may still fit the gathered ones
        win = self._top(cand_scores, cand_scores > -torch.inf, min(k, cand_scores.shape[1]))
        self._push(rows, cand_images.gather(1, _expand(win.index, cand_images)),
                   cand_sources.gather(1, win.index), win.valid)  # fmt: skip

    def _picked_rows(self, generator: torch.Generator) -> torch.Tensor:
        if not self.class_wise:
            return torch.zeros(1, dtype=torch.long)
        order = torch.randperm(self.num_classes, generator=generator)
        return order[: min(self.picks, self.num_classes)]

    @staticmethod
    def _top(scores: torch.Tensor, eligible: torch.Tensor, k: int) -> _Top:
        """Per row, the k eligible columns of highest score (ties: lower column first)."""
        keyed = torch.where(eligible, scores.expand_as(eligible), -torch.inf)
        order = torch.sort(keyed, dim=1, descending=True, stable=True).indices[:, :k]
        valid = eligible.gather(1, order)
        return _Top(order, valid)

    def _push(
        self, rows: torch.Tensor, images: torch.Tensor, sources: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """Write up to k items per row at the ring's next slots; valid items come first."""
        rows, images, sources, valid = (
            t.to(self.pushed.device) for t in (rows, images, sources, valid)
        )
        k = valid.shape[1]
        slots = (self.pushed[rows, None] + torch.arange(k, device=rows.device)) % self.capacity
        r = rows[:, None].expand_as(slots)
        self.images[r, slots] = torch.where(_expand(valid, images), images, self.images[r, slots])
        self.sources[r, slots] = torch.where(valid, sources, self.sources[r, slots])
        self.pushed.index_add_(0, rows, valid.sum(1))

    def _load_from_state_dict(self, state: dict, prefix: str, *args, **kwargs) -> None:
        for name, current in self.named_buffers(recurse=False):
            saved = state.get(prefix + name)
            if saved is not None and saved.shape != current.shape:
                raise ValueError(
                    f"CSQueue {name}: checkpoint shape {tuple(saved.shape)} != "
                    f"{tuple(current.shape)} (queue_length, class_wise or image size changed?)"
                )
        super()._load_from_state_dict(state, prefix, *args, **kwargs)
        self._maybe_empty = True
