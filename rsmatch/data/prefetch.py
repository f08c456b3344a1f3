"""The next step's batch made while the current step runs (`train.prefetch`).

A GPU step is bound by the host issuing kernels (docs/speed.md): batch making's few hundred
small kernels and the network's queue up one after the other when one thread issues both. Here
a worker thread makes batch k+1 on its own CUDA stream while the main thread issues step k;
torch releases the GIL while it dispatches an operator, so the two threads issue side by side.
The main stream waits for the batch's event before using it (a wait on the device, not on
the host), and the batch's tensors are marked as used there so that their memory is not
handed back to the worker's stream too early.

A batch is a pure function of its step (every draw is seeded by the step), so prefetching
changes no pixel; all batches are made by the one worker, in the order asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import fields

import torch

from rsmatch.data.batch import Batch

MakeBatch = Callable[[int], Batch]


class Prefetcher:
    """`prefetcher(k)` returns `make(k)` and, when `ahead`, starts making `make(k + 1)` in the
    background unless k + 1 is `stop`, the step after the last (the worker starts at the first
    call and stops at `close`)."""

    def __init__(
        self, make: MakeBatch, device: torch.device, ahead: bool, stop: int | None = None
    ) -> None:
        self.make, self.device, self.ahead, self.stop = make, device, ahead, stop
        self.stream = torch.cuda.Stream(device) if ahead and device.type == "cuda" else None
        self.worker: ThreadPoolExecutor | None = None
        self.pending: tuple[int, Future] | None = None

    def __call__(self, step: int) -> Batch:
        if not self.ahead:
            return self.make(step)
        if self.worker is None:
            self.worker = ThreadPoolExecutor(1, thread_name_prefix="rsmatch-batches")
        if self.pending is None or self.pending[0] != step:  # first step, or a jump
            if self.pending is not None:
                self.pending[1].cancel()  # not wanted: unless already started, never made
            self.pending = (step, self.worker.submit(self._make, step))
        future, self.pending = self.pending[1], None
        batch, ready = future.result()  # an error is raised here; asking again remakes it
        if self.stop is None or step + 1 < self.stop:
            self.pending = (step + 1, self.worker.submit(self._make, step + 1))
        if ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            for f in fields(batch):
                t = getattr(batch, f.name)
                if isinstance(t, torch.Tensor):
                    t.record_stream(stream)
        return batch

    def _make(self, step: int) -> tuple[Batch, torch.cuda.Event | None]:
        if self.stream is None:
            return self.make(step), None
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            batch = self.make(step)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return batch, ready

    def close(self) -> None:
        """Drop the batch being made ahead and stop the worker (a later call starts a new one)."""
        if self.worker is not None:
            self.worker.shutdown(wait=True, cancel_futures=True)
        self.worker, self.pending = None, None
