"""Batch making as one CUDA graph (`train.graph_batches`).

On a GPU the step is bound by the host issuing kernels (docs/speed.md): eager batch making
issues about 600 small kernels per step, more host operators than the whole network's step.
Captured once, they are replayed by one graph launch (plus a pinned copy per input tensor and a
clone per view): FixMatch steps 1.38-1.44x faster on two H200s. A graph replays the kernels it
recorded on the memory it recorded, so the draws of each step are copied into the tensors the
capture read (`inputs`), and the views it wrote (`outputs`) are cloned before the next replay
overwrites them. The strong views must then launch the same kernels whatever the draws:
`augment.apply_strong_fixed`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from typing import Any

import torch

from rsmatch.data.transfer import copy_to

Replay = Callable[[], None]
# capture(fn, inputs) -> (replay, outputs): after replay(), outputs hold fn(inputs) for the
# values inputs hold at that time
Capture = Callable[[Callable[[Any], Any], Any], tuple[Replay, Any]]


def tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors of a tree of dataclasses, in field order (None fields have none)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if is_dataclass(tree):
        return [t for f in fields(tree) for t in tensors(getattr(tree, f.name))]
    if tree is None:
        return []
    raise TypeError(f"not a tensor or dataclass of tensors: {type(tree).__name__}")


def capture_cuda_graph(fn: Callable[[Any], Any], inputs: Any) -> tuple[Replay, Any]:
    """fn(inputs) recorded as a CUDA graph on the current device.

    Entering the capture synchronizes the device and empties the allocator's caches, so no other
    thread may be issuing work meanwhile: the capture runs at a trainer's first batch, which the
    main thread waits for (`Prefetcher`), or on the main thread when nothing is prefetched.
    Replays then run on the calling thread's current stream, from any thread."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up first, as torch asks: lazy inits, cuDNN's choices
        for _ in range(2):
            fn(inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: only this thread's calls are restricted while capturing, so another
    # thread's (a tracker's, the garbage collector's) cannot invalidate the capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        outputs = fn(inputs)
    return graph.replay, outputs


class Graphed:
    """`graphed(host_inputs)` is `fn(host_inputs on device)`, computed by replaying one capture."""

    def __init__(self, fn: Callable[[Any], Any], device: torch.device, capture: Capture) -> None:
        self.fn, self.device, self.capture = fn, device, capture
        self.inputs: Any = None
        self.outputs: Any = None
        self.replay: Replay | None = None

    def __call__(self, host_inputs: Any) -> Any:
        on_cuda = self.device.type == "cuda"
        with torch.cuda.device(self.device) if on_cuda else contextlib.nullcontext():
            if self.replay is None:
                self.inputs = host_inputs.to(self.device)
                self.replay, self.outputs = self.capture(self.fn, self.inputs)
            else:
                self._copy_in(host_inputs)
            self.replay()
            return _cloned(self.outputs)

    def _copy_in(self, host_inputs: Any) -> None:
        new = tensors(host_inputs)
        static = tensors(self.inputs)
        if [t.shape for t in new] != [t.shape for t in static]:  # copy_ would broadcast
            raise ValueError(
                "a graphed call needs inputs of the captured shapes: "
                f"{[tuple(t.shape) for t in static]}, got {[tuple(t.shape) for t in new]}"
            )
        for dst, src in zip(static, new, strict=True):
            copy_to(dst, src)


def _cloned(tree: Any) -> Any:
    """A copy of a dataclass of tensors, which the next replay will not overwrite."""
    return type(tree)(**{
        f.name: None if (v := getattr(tree, f.name)) is None else v.clone() for f in fields(tree)
    })  # fmt: skip
