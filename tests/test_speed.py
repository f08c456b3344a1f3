"""A steady-state training step never waits for the device.

On a GPU every read of a device value on the host (`.item()`, `if tensor`, a boolean-mask
index whose size depends on the data, `bincount`, `nonzero`, ...) stalls the CPU until the
queued kernels finish, so the next step cannot be queued behind the current one. On CPU such
reads cost nothing and cannot be timed, so `SyncCounter` intercepts the calls that would sync
on a GPU; on a GPU, `torch.cuda.set_sync_debug_mode("error")` checks the same step directly.

The batch is built before counting there: batch making reads its host-side draws on purpose
(op grouping, index streams). It is checked apart, with its device work on the `meta` device,
which holds no data: any read of a device value raises, host-side reads run as usual, and
`DeviceWaits` counts what else would make the host wait (blocking copies, masked writes).
"""

from __future__ import annotations

import collections
import contextlib
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from rsmatch.data import augment
from rsmatch.trainer import Trainer

from .conftest import needs_cuda, tiny_config

# Calls that read a device value on the host, or whose output size depends on the data.
SYNCING = {
    "item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__",
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount",
    "repeat_interleave",
}  # fmt: skip


def _has_mask(index: object) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool
    return isinstance(index, (tuple, list)) and any(_has_mask(i) for i in index)


def _site() -> str:
    """The innermost rsmatch line on the stack: where the call was made."""
    stack = traceback.extract_stack()[:-2]
    frame = next((f for f in reversed(stack) if "/rsmatch/" in f.filename), None)
    return f"{frame.filename.rsplit('/rsmatch/', 1)[1]}:{frame.lineno}" if frame else "?"


class SyncCounter(TorchFunctionMode):
    """Counts host syncs by the calls that cause them, with the line that made each."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        masked = name in ("__getitem__", "__setitem__") and _has_mask(args[1])
        if name in SYNCING or masked:
            self.hits[f"{name}{'[bool mask]' if masked else ''} at {_site()}"] += 1
        return func(*args, **(kwargs or {}))


def _tensors(args: object) -> list[torch.Tensor]:
    if isinstance(args, torch.Tensor):
        return [args]
    if isinstance(args, (tuple, list)):
        return [t for a in args for t in _tensors(a)]
    return []


def _on_device(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


class DeviceWaits(TorchFunctionMode):
    """For device work run on `meta`, which raises on reading a device value: counts, with their
    lines, the calls that make the host wait on CUDA but that `meta` lets through:
    - a copy from the host (`to`, `cuda`, `copy_`) without `non_blocking=True` as a keyword;
    - a device tensor built from host data (`tensor`, `as_tensor`, `new_tensor`);
    - a host tensor other than a 0-dim scalar meeting device tensors in one call (a host index,
      say), which torch copies over behind the scenes;
    - a boolean-mask assignment into a device tensor (`meta` does it without the mask's data).
    Whether the host memory is pinned cannot be seen on a CPU: the GPU tests check that."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if name in ("to", "cuda", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0] if name == "copy_" else out
            if _on_device(dst) and not _on_device(src) and kwargs.get("non_blocking") is not True:
                self.hits[f"blocking {name} at {_site()}"] += 1
        elif name in ("tensor", "as_tensor", "new_tensor"):
            data = args[1] if name == "new_tensor" else args[0]
            if _on_device(out) and not _on_device(data):
                self.hits[f"{name} from host data at {_site()}"] += 1
        elif name == "__setitem__" and _on_device(args[0]) and _has_mask(args[1]):
            self.hits[f"__setitem__[bool mask] at {_site()}"] += 1
        else:
            tensors = _tensors((args, list(kwargs.values())))
            if any(map(_on_device, tensors)) and any(
                not _on_device(t) and t.dim() > 0 for t in tensors
            ):
                self.hits[f"host tensor in {name} at {_site()}"] += 1
        return out


def test_counter_sees_every_kind_of_sync():
    t, mask = torch.tensor([1.0, 2.0]), torch.tensor([True, False])
    calls = [
        lambda: t[0].item(), t.tolist, lambda: bool(t[0]), lambda: int(t[0]),
        lambda: float(t[0]), lambda: [0, 1][t.long()[0]], t.nonzero, lambda: t[mask],
        lambda: t.__setitem__(mask, 0.0), lambda: torch.bincount(t.long()), t.numpy, t.cpu,
    ]  # fmt: skip
    for call in calls:
        with SyncCounter() as counter:
            call()
        assert sum(counter.hits.values()) == 1, counter.hits
    with SyncCounter() as counter:  # indexing by positions, masks as weights: no sync
        t[torch.tensor([1, 0])] = torch.where(mask, t, 0.0)
    assert not counter.hits


def test_meta_device_refuses_every_read_of_a_device_value():
    """The premise of the batch-making test: what would sync on a GPU raises on `meta`, but a
    masked assignment, which `DeviceWaits` counts."""
    t = torch.ones(2, 3, device="meta")
    mask = t > 0
    calls = [
        lambda: t[0, 0].item(), t.tolist, lambda: bool(t[0, 0]), lambda: int(t[0, 0]),
        lambda: float(t[0, 0]), lambda: [0, 1][t.long()[0, 0]], t.nonzero, lambda: t[mask],
        t.cpu, t.numpy,
        lambda: torch.bincount(t.long().flatten()), t.unique, lambda: t.masked_select(mask),
        lambda: torch.repeat_interleave(t.long().flatten()), lambda: torch.argwhere(t),
    ]  # fmt: skip
    for call in calls:
        with pytest.raises((RuntimeError, NotImplementedError, TypeError)):
            call()


def test_device_waits_sees_what_meta_lets_through():
    meta, host = torch.device("meta"), torch.ones(2)
    blocking = [
        lambda: host.to(meta), lambda: host.to(meta, non_blocking=False),
        lambda: torch.empty(2, device=meta).copy_(host), lambda: torch.tensor([1.0], device=meta),
        lambda: torch.as_tensor(1.0, device=meta), lambda: host.new_tensor([1.0], device=meta),
        lambda: torch.ones(3, device=meta).index_select(0, torch.tensor([0, 2])),
        lambda: torch.ones(3, device=meta)[torch.tensor([True, False, True])],
        lambda: torch.ones(3, device=meta).__setitem__(torch.ones(3, device=meta) > 0, 0.0),
    ]  # fmt: skip
    for call in blocking:
        with DeviceWaits() as counter:
            call()
        assert sum(counter.hits.values()) == 1, counter.hits
    with DeviceWaits() as counter:  # asynchronous copies, fills, host-side and scalar work
        dev = host.to(meta, non_blocking=True)
        torch.empty(2, device=meta).copy_(host, non_blocking=True)
        torch.full((2,), 5.0, device=meta) + dev * torch.tensor(2.0) + 1.0
        torch.as_tensor(dev, device=meta), host.to(torch.float64), host.index_select(0, host.long())
    assert not counter.hits, counter.hits


def test_batch_making_never_waits_for_the_device(sources, tmp_path, monkeypatch):
    """`trainer.batches(step)` with every view (RSMatch's strong labeled view included) and the
    device work on `meta`: no read of a device value (it would raise), no blocking copy."""
    cfg = tiny_config(sources, tmp_path / "run", algorithm="rsmatch",  # made on this thread,
                      **{"rsmatch.strong_labeled": True, "train.prefetch": False})  # fmt: skip
    trainer = Trainer(cfg)
    trainer.batches.make.device = torch.device("meta")
    ops = set()
    for table in ("_OP_FNS", "_SOURCES"):  # the pixel ops; the geometric ops' maps (on the host)
        monkeypatch.setattr(augment, table, {
            name: lambda *a, name=name, fn=fn: ops.add(name) or fn(*a)
            for name, fn in getattr(augment, table).items()})  # fmt: skip
    with DeviceWaits() as counter:
        batches = [trainer.batches(step) for step in range(2)]
    assert not counter.hits, f"blocking transfers in batch making: {dict(counter.hits)}"
    assert ops == set(augment.OPS) - {"identity"}  # every op ran
    views = [v for batch in batches for v in vars(batch).values()]
    assert all(v is not None and v.device.type == "meta" for v in views), views


ALGORITHMS = ["supervised", "fixmatch", "flexmatch", "freematch", "simmatch", "rsmatch"]


def _warm_trainer(sources, tmp_path, algorithm: str, device: str = "cpu") -> Trainer:
    """A trainer past its first steps, whose next step reuses one prebuilt batch."""
    cfg = tiny_config(sources, tmp_path / "run", algorithm=algorithm, **{
        "simmatch.warmup_steps": 1, "freematch.ent_loss_ratio": 0.5, "ssl.threshold": 0.95})  # fmt: skip
    trainer = Trainer(cfg)
    for step in range(2):
        trainer.train_step(step)
    batch = trainer.batches(2)
    trainer.batches = lambda step: batch
    return trainer


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_training_step_has_no_host_sync(sources, tmp_path, algorithm):
    trainer = _warm_trainer(sources, tmp_path, algorithm)
    with SyncCounter() as counter:
        logged = trainer.train_step(2)
    assert not counter.hits, f"host syncs in a {algorithm} step: {dict(counter.hits)}"
    assert all(v.device == trainer.accelerator.device for v in logged.values())


@contextlib.contextmanager
def cuda_syncs_raise():
    """Inside, any synchronising CUDA call raises (work queued before is waited for first)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_training_step_has_no_cuda_sync(sources, tmp_path, algorithm):
    trainer = _warm_trainer(sources, tmp_path, algorithm)
    with cuda_syncs_raise():
        trainer.train_step(2)


@needs_cuda
@pytest.mark.parametrize("graphed", [False, True])
def test_batch_making_has_no_cuda_sync(sources, tmp_path, graphed):
    """The GPU side of `test_batch_making_never_waits_for_the_device`: pinned, asynchronous
    copies included (a blocking copy is a sync there), eager and replayed from a CUDA graph."""
    cfg = tiny_config(sources, tmp_path / "run", algorithm="rsmatch",
                      **{"rsmatch.strong_labeled": True, "train.graph_batches": graphed})  # fmt: skip
    make = Trainer(cfg).batches.make  # made here, not ahead in the prefetching thread
    assert make.device.type == "cuda" and (make.graph is not None) == graphed
    make(0)  # first pinned allocations
    with cuda_syncs_raise():
        make(1)


@needs_cuda
def test_prefetched_steps_have_no_cuda_sync(sources, tmp_path):
    """With the next batch made in the worker thread on its own stream (`train.prefetch`, on
    by default on CUDA): neither thread syncs, and the stream handover is a device-side wait."""
    cfg = tiny_config(sources, tmp_path / "run", algorithm="rsmatch")
    trainer = Trainer(cfg)
    assert trainer.prefetch and trainer.batches.stream is not None
    for step in range(2):  # first pinned allocations, first kernels
        trainer.train_step(step)
    with cuda_syncs_raise():
        for step in range(2, 4):  # batches 3 and 4 are made in the worker meanwhile
            trainer.train_step(step)
        trainer.batches(4)  # batch 4's outcome: an error in the worker is raised here
    trainer.batches.close()


def test_logs_reduce_in_sorted_order_and_refuse_a_changing_key_set(sources, tmp_path):
    trainer = _warm_trainer(sources, tmp_path, "freematch")
    one = {"b": torch.tensor(2.0), "a": torch.tensor(1.0)}
    window: dict[str, list[torch.Tensor]] = {}
    trainer._collect(window, one)
    trainer._collect(window, dict(reversed(one.items())))  # the same keys in another order
    logs = trainer._reduce(window)
    assert list(logs) == ["a", "b", "lr"] and logs["a"] == 1.0 and logs["b"] == 2.0
    with pytest.raises(RuntimeError, match=r"logged \['a'\] at step"):
        trainer._collect(window, {"a": torch.tensor(1.0)})
    # FreeMatch logs its fairness loss on every step, also when nothing passes the mask
    trainer.algorithm.time_p.fill_(2.0)
    trainer.algorithm.cfg.freematch.ema_p = 1.0  # freeze the threshold above every confidence
    logged = trainer.train_step(2)
    assert float(logged["mask_rate"]) == 0.0 and float(logged["loss_fair"]) == 0.0


@pytest.mark.parametrize("channels_last", [False, True])
def test_convolutions_get_the_configured_memory_format(sources, tmp_path, channels_last):
    """The augmented batches are channels_last-strided: `false` must still reach NCHW."""
    cfg = tiny_config(sources, tmp_path / "run", algorithm="fixmatch",
                      **{"train.channels_last": channels_last})  # fmt: skip
    trainer = Trainer(cfg)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    seen = []
    for m in trainer.accelerator.unwrap_model(trainer.model).modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1):  # 1x1 fits both
            m.register_forward_pre_hook(lambda m, args: seen.append(
                (args[0].is_contiguous(memory_format=layout),
                 m.weight.is_contiguous(memory_format=layout))))  # fmt: skip
    trainer.train_step(0)
    assert seen and all(x and w for x, w in seen), seen


def test_compile_mode_reaches_torch_compile(sources, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append(kw))
    overrides = {"train.compile": True, "train.compile_mode": "reduce-overhead"}
    Trainer(tiny_config(sources, tmp_path / "run", algorithm="rsmatch", **overrides))
    # the trained model only, not the EMA copy; static shapes, or RSMatch's detector batch,
    # which grows once when the queue first holds items, is recompiled with a symbolic size
    assert calls == [{"mode": "reduce-overhead", "dynamic": False}]


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(sources, tmp_path):
    """RSMatch's model holds the classifier every algorithm trains (with the fake head) and the
    detector, and the trainer compiles every algorithm's model alike: one algorithm serves (with
    a cold inductor cache this test alone takes ~85 s on a 2-core Zen 3).

    Compiled kernels round differently, and 4 steps of training amplify that by an amount that
    depends on the CPU's kernels, so each tensor is compared with how far eager training moved it
    from the shared start. Measured, largest share of that move: the classifier 0.1% (Xeon, AMX
    kernels) and 0.6% (oneDNN held to AVX2), RSMatch's detector 3.9% (it starts as a coin flip,
    so rounding flips a few of its early pseudo-labels and queue picks). A learning rate 10% off
    in the compiled run put a classifier tensor 13% of its move away (tried, and caught)."""
    from safetensors.torch import load_file

    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        trainer = Trainer(tiny_config(sources, out, algorithm="rsmatch",
                                      **{"train.compile": compiled}))  # fmt: skip
        if not compiled:
            start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.fit()
        step = out / "checkpoints" / "step_00000004"  # as saved: checkpoint names unchanged
        runs[compiled] = load_file(str(step / "model.safetensors"))
    assert runs[True].keys() == runs[False].keys() == start.keys()  # no `_orig_mod.` names
    for name, eager in runs[False].items():
        share = 0.1 if name.startswith("detector.") else 0.02
        moved = (eager - start[name]).abs().max().item()
        off = (runs[True][name] - eager).abs().max().item()
        assert off <= share * moved, f"{name}: {off:.2e} from eager, which moved {moved:.2e}"
