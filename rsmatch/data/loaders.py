"""Training data in RAM as uint8 tensors, and batches that are a pure function of the step.

The global batch at step k is drawn from generators seeded by (seed, stream, k or epoch), and
each rank takes its contiguous slice. So resuming needs only the step counter, and the global
batch (indices and augmentation draws) is the same for any number of processes. Everything is
drawn on the host and reaches the device by copies that never block the host
(`rsmatch.data.transfer`); the augmentation then runs on the device (`rsmatch.data.augment`).
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np
import torch

from rsmatch.benchmark.sources import SourceError, load_real, load_synthetic
from rsmatch.benchmark.split import SplitSpec, build_split
from rsmatch.benchmark.store import load_benchmark
from rsmatch.config import DataConfig
from rsmatch.data import augment
from rsmatch.data.batch import Batch, Provenance, TrainData
from rsmatch.data.decode import decode
from rsmatch.data.exclude import kept_rows
from rsmatch.data.graphed import Capture, Graphed, capture_cuda_graph
from rsmatch.data.transfer import Movable

# Stream ids keep the random draws of different consumers independent.
LABELED, UNLABELED, AUG_LABELED, AUG_UNLABELED, ALGORITHM = range(5)


def step_generator(*keys: int) -> torch.Generator:
    """A torch generator seeded from an arbitrary tuple of ints (e.g. seed, stream, step)."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def load_benchmark_from_config(cfg: DataConfig) -> tuple[datasets.DatasetDict, dict]:
    """A saved benchmark (`data.benchmark`) or one built from the sources by `split_seed`."""
    if cfg.benchmark:
        return load_benchmark(cfg.benchmark)
    real = load_real(cfg.real)
    synthetic = {g: load_synthetic(p, real.class_names) for g, p in sorted(cfg.synthetic.items())}
    spec = SplitSpec(
        cfg.labels_per_class, cfg.replace_ratio, cfg.unlabeled_per_class, cfg.split_seed
    )
    meta = {"real": cfg.real, "synthetic": dict(cfg.synthetic), **spec.__dict__}
    return build_split(real, synthetic, spec), meta


def load_train_data(cfg: DataConfig) -> TrainData:
    dd, meta = load_benchmark_from_config(cfg)
    unlabeled = dd["unlabeled"]
    is_synthetic = torch.tensor(unlabeled["is_synthetic"], dtype=torch.bool)
    generators = list(unlabeled["generator"])
    if cfg.real_only:  # the oracle: the single training path allowed to read provenance
        keep = torch.nonzero(~is_synthetic).flatten()
        if not len(keep):
            raise SourceError(
                f"data.real_only=true: the unlabeled pool holds no real image "
                f"(replace_ratio={meta.get('replace_ratio')})"
            )
        unlabeled = unlabeled.select(keep.tolist())
        is_synthetic = is_synthetic[keep]
        generators = [generators[i] for i in keep.tolist()]
    if cfg.exclude_scores:  # filter-first: detector scores keyed by source_id, no provenance
        n = len(unlabeled)
        keep = kept_rows(unlabeled["source_id"], cfg.exclude_scores, cfg.exclude_above)
        unlabeled = unlabeled.select(keep)
        is_synthetic = is_synthetic[keep]
        generators = [generators[i] for i in keep]
        meta = {**meta, "exclude_scores": cfg.exclude_scores, "exclude_above": cfg.exclude_above,
                "excluded": n - len(keep)}  # fmt: skip
    return TrainData(
        labeled=decode(dd["labeled"]),
        labeled_y=torch.tensor(dd["labeled"]["label"]),
        unlabeled=decode(unlabeled),
        test=decode(dd["test"]),
        test_y=torch.tensor(dd["test"]["label"]),
        class_names=dd["test"].features["label"].names,
        provenance=Provenance(is_synthetic, generators),
        split_meta={**meta, "real_only": cfg.real_only},
    )


class IndexStream:
    """Endless epochs of a seeded permutation of range(n); batch k is a pure function of k."""

    def __init__(self, n: int, batch: int, seed: int, stream: int) -> None:
        self.n, self.batch, self.seed, self.stream = n, batch, seed, stream
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(
                self.n, generator=step_generator(self.seed, self.stream, epoch)
            )
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        positions = torch.arange(step * self.batch, (step + 1) * self.batch)
        out = torch.empty(self.batch, dtype=torch.long)
        for epoch in positions.div(self.n, rounding_mode="floor").unique().tolist():
            sel = positions // self.n == epoch
            out[sel] = self._permutation(epoch)[positions[sel] % self.n]
        return out


@dataclass
class Draws(Movable):
    """Everything a rank's batch is made from, drawn on the host: the images and labels its
    indices select, and the augmentation draws of each view (None where no view is made)."""

    x_lb: torch.Tensor
    y_lb: torch.Tensor
    idx_lb: torch.Tensor
    weak_lb: augment.WeakParams
    strong_lb: augment.StrongParams | augment.FixedStrongParams | None = None
    u: torch.Tensor | None = None
    weak_u: augment.WeakParams | None = None
    strong_u: augment.StrongParams | augment.FixedStrongParams | None = None
    idx_ulb: torch.Tensor | None = None


def _strong_view(
    x: torch.Tensor, p: augment.StrongParams | augment.FixedStrongParams
) -> torch.Tensor:
    if isinstance(p, augment.FixedStrongParams):
        return augment.apply_strong_fixed(x, p)
    return augment.apply_strong(x, p)


def views(d: Draws) -> Batch:
    """The batch's augmented views, made where `d`'s tensors live."""
    batch = Batch(augment.apply_weak(d.x_lb, d.weak_lb), d.y_lb, d.idx_lb)
    if d.strong_lb is not None:
        batch.x_lb_s = _strong_view(d.x_lb, d.strong_lb)
    if d.u is not None:
        batch.u_w = augment.apply_weak(d.u, d.weak_u)  # own crop and flip, as in USB
        batch.u_s = _strong_view(d.u, d.strong_u)
        batch.idx_ulb = d.idx_ulb
    return batch


class BatchMaker:
    """Builds the batch of step k for one rank of `world` processes: draws on the host, views on
    `device`; with `graphed`, the views come from one CUDA graph replayed for every step."""

    def __init__(
        self,
        data: TrainData,
        batch_size: int,
        uratio: int,
        seed: int,
        rank: int,
        world: int,
        device: torch.device,
        unlabeled: bool = True,
        strong_labeled: bool = False,
        graphed: bool = False,
        capture: Capture = capture_cuda_graph,
    ) -> None:
        self.data, self.seed, self.device = data, seed, device
        self.b, self.ub = batch_size, batch_size * uratio
        self.lo, self.hi = rank * batch_size // world, (rank + 1) * batch_size // world
        self.ulo, self.uhi = self.lo * uratio, self.hi * uratio
        self.use_unlabeled, self.strong_labeled = unlabeled, strong_labeled
        self.lb_stream = IndexStream(len(data.labeled), batch_size, seed, LABELED)
        self.ulb_stream = IndexStream(len(data.unlabeled), self.ub, seed, UNLABELED)
        self.graph = Graphed(views, device, capture) if graphed else None

    def draws(self, step: int) -> Draws:
        """The host side of step k's batch."""
        d = self.data
        gen = step_generator(self.seed, AUG_LABELED, step)
        idx = self.lb_stream.indices(step)[self.lo : self.hi]
        x = d.labeled[idx]
        weak = augment.sample_weak(self.b, gen, x.shape[2:])[self.lo : self.hi]
        out = Draws(x, d.labeled_y[idx], idx, weak)
        if self.strong_labeled:  # drawn after the weak params, so those never depend on it
            out.strong_lb = self._strong_draws(x, self.b, gen, self.lo, self.hi)
        if self.use_unlabeled:
            gen = step_generator(self.seed, AUG_UNLABELED, step)
            out.idx_ulb = self.ulb_stream.indices(step)[self.ulo : self.uhi]
            out.u = d.unlabeled[out.idx_ulb]
            out.weak_u = augment.sample_weak(self.ub, gen, out.u.shape[2:])[self.ulo : self.uhi]
            out.strong_u = self._strong_draws(out.u, self.ub, gen, self.ulo, self.uhi)
        return out

    def _strong_draws(
        self, x: torch.Tensor, n: int, gen: torch.Generator, lo: int, hi: int
    ) -> augment.StrongParams | augment.FixedStrongParams:
        """Strong draws for the global batch of n, this rank's rows lo:hi of them; laid out
        with fixed shapes for a graph, which replays one sequence of kernels."""
        p = augment.sample_strong(n, gen, x.shape[2:])[lo:hi]
        return augment.fixed(p, *x.shape[2:]) if self.graph is not None else p

    def __call__(self, step: int) -> Batch:
        draws = self.draws(step)
        if self.graph is not None:
            return self.graph(draws)
        return views(draws.to(self.device))
