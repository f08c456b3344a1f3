"""The class-wise synthetic queue (CSQueue, RSMATCH.md section 3).

C first-in first-out sub-queues of length L hold weak views of unlabeled images that the
detector scores as most synthetic among those the classifier assigns to each class. Each step
M sub-queues are picked at random and each takes its top-k candidates. With several processes
every rank all-gathers the candidates (in rank order, i.e. the global batch order) and uses a
pick generator seeded identically, so all ranks push the same items: the queue is identical
everywhere and equal to a one-process run on the same global batch.

`class_wise=False` is the ablation: one FIFO of length C*L fed with the top M*k of the batch.
The queue also remembers each item's index in the unlabeled pool (`sources`), which lets the
evaluation measure queue purity; training never looks those indices up. Its contents are
buffers of an `nn.Module`, so they move, save and load with the algorithm that owns it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Gather = Callable[[torch.Tensor], torch.Tensor]


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
        """n queued images drawn uniformly with replacement (empty tensor if the queue is)."""
        rows, slots = torch.nonzero(self.sources >= 0, as_tuple=True)
        if len(rows) == 0:
            return self.images.new_zeros((0, *self.images.shape[2:]))
        pick = torch.randint(0, len(rows), (n,), generator=generator).to(rows.device)
        return self.images[rows[pick], slots[pick]]

    # -- writing ------------------------------------------------------------------------------
    def _push(self, row: int, images: torch.Tensor, sources: torch.Tensor) -> None:
        for image, source in zip(images, sources):
            slot = int(self.pushed[row]) % self.capacity
            self.images[row, slot] = image
            self.sources[row, slot] = source
            self.pushed[row] += 1

    @torch.no_grad()
    def update(
        self,
        scores: torch.Tensor,
        pseudo_labels: torch.Tensor,
        images: torch.Tensor,
        sources: torch.Tensor,
        generator: torch.Generator,
        gather: Gather = lambda t: t,
    ) -> None:
        """Push the most synthetic-looking candidates of M random classes (see module doc)."""
        scores, labels = gather(scores.float()), gather(pseudo_labels)
        images, sources = gather(images), gather(sources)
        if not self.class_wise:
            top = torch.topk(scores, min(self.picks * self.topk, len(scores))).indices
            self._push(0, images[top], sources[top])
            return
        order = torch.randperm(self.num_classes, generator=generator)
        for c in order[: min(self.picks, self.num_classes)].tolist():
            candidates = torch.nonzero(labels == c).flatten()
            if len(candidates):
                best = candidates[
                    torch.topk(scores[candidates], min(self.topk, len(candidates))).indices
                ]
                self._push(c, images[best], sources[best])

    def _load_from_state_dict(self, state: dict, prefix: str, *args, **kwargs) -> None:
        for name, current in self.named_buffers(recurse=False):
            saved = state.get(prefix + name)
            if saved is not None and saved.shape != current.shape:
                raise ValueError(
                    f"CSQueue {name}: checkpoint shape {tuple(saved.shape)} != "
                    f"{tuple(current.shape)} (queue_length, class_wise or image size changed?)"
                )
        super()._load_from_state_dict(state, prefix, *args, **kwargs)
