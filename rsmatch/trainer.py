"""The one Accelerate training loop shared by every algorithm.

It owns everything around the algorithm: devices and processes, mixed precision, backward,
clipping, the optimizer step and the schedule, EMA, evaluation, logging, progress, checkpoints,
resume and signals. The trajectory is a function of (seed, step) and the saved state, so a
resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedDataParallelKwargs,
    DistributedType,
    gather_object,
    set_seed,
)
from timm.optim import param_groups_weight_decay
from timm.utils import distribute_bn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from rsmatch import checkpoint, evaluate, hardware, runfolder
from rsmatch.algorithms import make_algorithm
from rsmatch.algorithms.base import EvalContext, StepContext
from rsmatch.atomic import replace_path, write_folder, write_text_atomic
from rsmatch.config import Config, ConfigError, check_world_size, flatten, to_dict
from rsmatch.data.batch import Provenance, TrainData
from rsmatch.data.check import check_sources
from rsmatch.data.loaders import ALGORITHM, BatchMaker, load_train_data, step_generator
from rsmatch.data.prefetch import Prefetcher
from rsmatch.ema import ModelEma
from rsmatch.launcher import deepspeed_launch
from rsmatch.models import Normalize
from rsmatch.runinfo import trim_evals, write_run_record


def make_accelerator(
    cfg: Config, mixed_precision: str, deepspeed_plugin: DeepSpeedPlugin | None = None
) -> Accelerator:
    deepspeed = deepspeed_plugin is not None
    accelerator = Accelerator(
        # Without a GPU, cpu=True is what turns several launched processes into gloo DDP;
        # it would also switch DeepSpeed off, so a DeepSpeed launch keeps its own path.
        cpu=not torch.cuda.is_available() and not deepspeed,
        # Under DeepSpeed Accelerate does not autocast: the trainer does (`_autocast`), and the
        # engine's forward through its torch_autocast (`deepspeed_plugin`)
        mixed_precision="no" if deepspeed else mixed_precision,
        log_with="tensorboard",
        project_dir=cfg.train.output_dir,
        step_scheduler_with_optimizer=False,  # our schedule counts iterations, not processes
        # USB's WRN leaves some BN parameters unused (see models/wrn.py). Buffers are not
        # broadcast every forward: SyncBatchNorm keeps them equal, or they are averaged before
        # each evaluation and checkpoint (Trainer._sync_bn_statistics).
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)
        ],
        deepspeed_plugin=deepspeed_plugin,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # N copies each training alone would be silent
        how = (
            "without GPUs Accelerate forms none for DeepSpeed; on CPU use DDP:"
            if accelerator.distributed_type == DistributedType.DEEPSPEED
            and not torch.cuda.is_available()
            else "on CPU launch with"
        )
        raise ConfigError(
            f"WORLD_SIZE={launched}: but Accelerate formed a group of {accelerator.num_processes}; "
            f"{how} `accelerate launch --multi_gpu --num_processes N` or torchrun"
        )
    return accelerator


def deepspeed_plugin(cfg: Config, mixed_precision: str) -> DeepSpeedPlugin:
    """The plugin Accelerate makes from a DeepSpeed launch's environment, its config completed
    (`hardware.complete_deepspeed_config`) and what does not run under DeepSpeed refused: made
    before the Accelerator, so a refusal comes before any process group or file."""
    plugin = DeepSpeedPlugin()
    hardware.complete_deepspeed_config(
        plugin.deepspeed_config, mixed_precision, cfg.train.clip_grad_norm
    )
    if cfg.train.compile:  # tried with deepspeed 0.19.8: its engine.compile() path too
        raise ConfigError(
            "train.compile=true: not under DeepSpeed (ZeRO-2's gradient hooks got no gradient "
            "from the compiled model in our trial); set train.compile=false"
        )
    return plugin


def cosine_schedule(steps: int, cycles: float) -> Callable[[int], float]:
    """USB's learning-rate factor at step k: max(0, cos(pi * cycles * k / steps)); the floor
    holds the rate at 0 past cos's first zero (cycles > 0.5), where it would turn negative."""
    return lambda k: max(0.0, math.cos(math.pi * cycles * k / steps))


T = TypeVar("T")
BEST_RECORD = "best.json"  # in best/: the step and test accuracy of its models


@dataclass
class TrainerState:
    step: int = 0
    best_acc: float = 0.0
    best_step: int = 0
    seconds: float = 0.0
    last_eval: dict = field(default_factory=dict)
    world_size: int = 0  # how the checkpoint trained (0: a checkpoint from before they were kept)
    mixed_precision: str = ""


class Trainer:
    def __init__(
        self, cfg: Config, accelerator: Accelerator | None = None, data: TrainData | None = None
    ) -> None:
        datasets.disable_progress_bars()
        self.deepspeed = deepspeed_launch()  # known before the Accelerator: precision depends on it
        self.precision = hardware.resolve(
            cfg.train.mixed_precision, cfg.train.channels_last, deepspeed=self.deepspeed
        )
        plugin = deepspeed_plugin(cfg, self.precision.mixed_precision) if self.deepspeed else None
        self.accelerator = acc = accelerator or make_accelerator(
            cfg, self.precision.mixed_precision, plugin
        )
        if self.precision.warning:
            self._note(f"warning: {self.precision.warning}")
        if acc.device.type == "cpu":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
            note = hardware.idle_cores_note(torch.get_num_threads(), hardware.usable_cores(), local)
            if note:
                self._note(note)
        check_world_size(cfg, acc.num_processes)  # batch sizes against the real world size
        self.rank, self.world = acc.process_index, acc.num_processes
        # settings the device refuses, refused before any data is read
        self.sync_bn = self._resolve_sync_bn(cfg.train.sync_bn, acc.device.type)
        self.graph_batches = self._resolve_graph_batches(cfg.train.graph_batches, acc.device.type)
        self.host_memory = hardware.keep_host_memory(cfg.train.keep_host_memory, acc.device.type)
        self.cfg, t = cfg, cfg.train
        self.out = Path(t.output_dir)
        self.lock = runfolder.RunLock(self.out)  # taken by prepare_output, for the whole run
        if data is None:
            check_sources(cfg.data)  # counts by listing, then every undecodable image listed
            data = load_train_data(cfg.data)
        self.data = data
        if "excluded" in data.split_meta:  # filter-first: say how much of the pool is left
            left, meta = len(data.unlabeled), data.split_meta
            self._note(f"data.exclude_scores: {meta['excluded']} of {meta['excluded'] + left} "
                       f"unlabeled images excluded (score > {meta['exclude_above']}), {left} left")  # fmt: skip
        set_seed(t.seed)  # identical initial weights on every rank
        self.algorithm = make_algorithm(
            cfg, self.data.num_classes, len(self.data.labeled), len(self.data.unlabeled),
            tuple(self.data.unlabeled.shape[1:]),
        )  # fmt: skip
        model = self.algorithm.build_model()
        if self.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.precision.channels_last:
            # DeepSpeed views parameters as bytes: their rows must stay contiguous
            if not self.deepspeed:
                model = model.to(memory_format=torch.channels_last)
            for m in model.modules():  # the inputs, so every convolution runs channels_last
                if isinstance(m, Normalize):
                    m.channels_last = True
        optimizer = torch.optim.SGD(  # USB: no weight decay on BatchNorm and biases (1-d)
            param_groups_weight_decay(model, t.weight_decay), lr=t.lr, momentum=t.momentum,
            nesterov=True,
        )  # fmt: skip
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_schedule(t.steps, t.cosine_cycles)
        )
        with warnings.catch_warnings():
            # torch renamed DDP's broadcast_buffers (forward_sync_buffers), which Accelerate's
            # DDP kwargs cannot pass yet; either keeps buffers out of every forward, as wanted.
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
            self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        # the trained module inside Accelerate's wrappers (DDP, DeepSpeed), found once: each
        # unwrap_model call reads package metadata (~0.6 ms, one core of a 2-core EPYC). Not
        # Accelerate's unwrap_model outside DeepSpeed: it imports DeepSpeed whenever installed
        # (~1 s, and DeepSpeed's "Setting accelerator to CPU" warning on every CPU run).
        if self.deepspeed:
            self.live_model = acc.unwrap_model(self.model)
        elif isinstance(self.model, DistributedDataParallel):
            self.live_model = self.model.module
        else:
            self.live_model = self.model
        self.ema = ModelEma(
            self.live_model, decay=t.ema_decay, use_warmup=t.ema_warmup,
            warmup_power=1.0, exclude_buffers=True,
        )  # fmt: skip
        if t.compile:  # in place, after the EMA copy: names, unwrapping and checkpoints unchanged
            # dynamic=False: RSMatch's detector batch grows once, when the queue first holds
            # items; an automatic dynamic-shape recompile there cost all of compile's gain
            self.model.compile(mode=t.compile_mode, dynamic=False)
        self.algorithm.to(acc.device)
        views = self.algorithm.views
        make = BatchMaker(
            self.data, t.batch_size, t.uratio, t.seed, self.rank, self.world, acc.device,
            unlabeled=views.unlabeled, strong_labeled=views.strong_labeled,
            graphed=self.graph_batches,
        )  # fmt: skip
        self.prefetch = t.prefetch is True or (t.prefetch == "auto" and acc.device.type == "cuda")
        self.batches = Prefetcher(make, acc.device, ahead=self.prefetch, stop=t.steps)
        prov = self.data.provenance  # for per-step probes, on the device once (no copy per step)
        self._probe_provenance = Provenance(prov.is_synthetic.to(acc.device), prov.generator)
        self.state = TrainerState()
        self.ckpt_root = self.out / "checkpoints"
        self._stop = False

    def _note(self, message: str) -> None:
        """A note to the user, from one process, on stderr: stdout keeps the metrics' JSON line."""
        self.accelerator.print(message, file=sys.stderr)

    @staticmethod
    def _resolve_graph_batches(graph_batches: bool | str, device: str) -> bool:
        if graph_batches is True and device != "cuda":
            raise ConfigError(f"train.graph_batches=true: CUDA graphs need CUDA (device {device})")
        return graph_batches is True or (graph_batches == "auto" and device == "cuda")

    def _resolve_sync_bn(self, sync_bn: bool | str, device: str) -> bool:
        if self.world == 1 or sync_bn is False:
            return False
        if device != "cuda":
            if sync_bn is True:
                raise ConfigError(f"train.sync_bn=true: SyncBatchNorm needs CUDA (device {device})")
            return False
        return True

    def _sync_bn_statistics(self) -> None:
        """Average BatchNorm running statistics over ranks (live and EMA), so every rank
        evaluates and checkpoints the same buffers and a resumed run continues exactly.
        Training is unaffected: in train mode BatchNorm normalises with batch statistics."""
        if self.world > 1 and not self.sync_bn:
            distribute_bn(self.model, self.world, reduce=True)
            distribute_bn(self.ema.module, self.world, reduce=True)

    # -- lifecycle ----------------------------------------------------------------------------
    def prepare_output(self, resume: runfolder.Resume = False) -> None:
        """Lock the run folder, verify and load the checkpoint, and only then write to the folder
        (run record, evaluations, trackers): a refused resume leaves the folder as it was."""
        acc = self.accelerator
        if acc.is_main_process:  # rsmatch-train checked it before decoding data, too
            runfolder.check_writable(self.out)
            self.lock.acquire()
        try:
            # Every rank learns of another's failure before rank 0 writes anything: after the
            # checks (a file missing on one node fails its verification), before any rank
            # enters a load; and after the load, except under DeepSpeed, whose load holds
            # collectives of its own (a rank failing inside it exits, as any failure did).
            found, skipped = self._agreed(lambda: runfolder.check_run_folder(self.cfg, resume))
            if found is not None and self.deepspeed:
                self._load(found)
            elif found is not None:
                self._agreed(lambda: self._load(found))
        except BaseException:
            if acc.is_main_process:
                self.lock.release(keep_folder=False)
            raise
        if acc.is_main_process:
            for note in skipped:
                self._note(f"skipping a broken checkpoint: {note}")
            if found is not None:
                for path in checkpoint.set_aside(self.ckpt_root, found):
                    self._note(f"{path.name}: newer than the checkpoint resumed from, set aside")
                if self._set_aside_newer_best() and self.state.best_step == self.state.step:
                    self._export_best()  # the loaded EMA is the restored best: best/ again
            # evaluations after the step we start from (all, for a run that died before its
            # first checkpoint) will be repeated: each step appears once
            dropped = trim_evals(self.out, self.state.step)
            if dropped:
                self._note(f"dropped {dropped} evaluations after step {self.state.step}")
            write_run_record(self.out, self.cfg, {
                "world_size": self.world, "device": str(acc.device), "mixed_precision": self.precision.mixed_precision,
                "precision": self.precision.record(), "host_memory": self.host_memory, "prefetch": self.prefetch, "graph_batches": self.graph_batches, "threads": torch.get_num_threads(), "split": self.data.split_meta,
                "counts": {"labeled": len(self.data.labeled), "unlabeled": len(self.data.unlabeled), "test": len(self.data.test)},
            }, resumed_from=str(found) if found else None)  # fmt: skip
        acc.wait_for_everyone()
        acc.init_trackers("tb", config=_hparams(self.cfg))
        if found is not None:
            self._note(f"resumed from {found} at step {self.state.step}")
            self._warn_if_trained_otherwise()
            self._follow_new_schedule_length(checkpoint.saved_config(found)["train"]["steps"])
        self.state.world_size = self.world  # what the next checkpoints trained with
        self.state.mixed_precision = self.precision.mixed_precision

    def _load(self, found: Path) -> None:
        algo_state, trainer_state = checkpoint.load(self.accelerator, found, self.ema.module)
        try:
            self.algorithm.load_state_dict(algo_state)
            self.state = TrainerState(**trainer_state)
        except (RuntimeError, TypeError, KeyError) as e:
            why = " ".join(str(e).split())
            raise checkpoint.CheckpointError(f"{found}: does not fit this run ({why})") from None

    def _agreed(self, work: Callable[[], T]) -> T:
        """`work()` on every rank, raising on all of them when it failed on any: this rank's
        error, else the first other rank's, named by its rank."""
        problem, result = None, None
        try:
            result = work()
        except Exception as e:
            problem = e
        if self.world > 1:
            mine = (str(problem) or type(problem).__name__) if problem is not None else ""
            messages = gather_object([mine])  # "" for success: a failure's text is never empty
            failed = [(rank, message) for rank, message in enumerate(messages) if message]
            if problem is None and failed:
                problem = checkpoint.CheckpointError("[rank {}] {}".format(*failed[0]))
        if problem is not None:
            raise problem
        return result

    def _warn_if_trained_otherwise(self) -> None:
        """The config cannot say everything a resume changes: the process count, and what
        `auto` precision resolves to on this machine. Either makes the run go on, but not as
        the uninterrupted run would have."""
        s, now = self.state, {"processes": self.world, "precision": self.precision.mixed_precision}
        before = {"processes": s.world_size, "precision": s.mixed_precision}
        changed = [f"{k} {before[k]} -> {now[k]}" for k in now if before[k] and before[k] != now[k]]
        if changed:
            self._note(
                f"WARNING: resumed with {', '.join(changed)}: training goes on, but not as the "
                "uninterrupted run (BatchNorm statistics and some losses are per process; "
                "another precision rounds differently)"
            )

    def _follow_new_schedule_length(self, saved_steps: int) -> None:
        """A resume may change train.steps (to extend or shorten a run); the cosine schedule
        then follows the new length from the resumed step on (the restored optimizer still
        holds the old schedule's rate for it). Says how far the learning rate moves."""
        t, k = self.cfg.train, self.state.step
        if saved_steps == t.steps:
            return
        lr = {n: t.lr * cosine_schedule(n, t.cosine_cycles)(k) for n in (saved_steps, t.steps)}
        for group in self.optimizer.param_groups:  # every group starts at train.lr
            group["lr"] = lr[t.steps]
        self._note(
            f"note: train.steps {saved_steps} -> {t.steps}: the cosine learning rate follows "
            f"the new length (at step {k}: {lr[saved_steps]:.5g} -> {lr[t.steps]:.5g})"
        )

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop = True
        self.accelerator.set_trigger()  # all ranks learn of it at the next step's check

    def _stopping(self) -> bool:
        # Several ranks must agree on the step to stop at, which takes a collective (and a
        # device round trip); one process reads its own flag and never waits for the device.
        return self.accelerator.check_trigger() if self.world > 1 else self._stop

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, resume: runfolder.Resume = False) -> dict:
        self.prepare_output(resume)
        acc, t = self.accelerator, self.cfg.train
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=t.steps, initial=self.state.step, disable=not (t.progress and acc.is_local_main_process),
                   dynamic_ncols=True, desc=self.cfg.algorithm)  # fmt: skip
        window: dict[str, list[torch.Tensor]] = {}
        start = time.time() - self.state.seconds
        interrupted = False
        try:
            while self.state.step < t.steps:
                self._collect(window, self.train_step(self.state.step))
                self.state.step += 1
                step = self.state.step
                self.state.seconds = time.time() - start
                if step % t.log_every == 0 or step == t.steps:
                    logs = self._reduce(window)
                    window.clear()
                    acc.log(logs, step=step)
                    bar.set_postfix(
                        {
                            k: f"{v:.3g}"
                            for k, v in logs.items()
                            if k in ("loss", *self.algorithm.progress_metrics)
                        }
                    )
                if step % t.eval_every == 0 or step == t.steps:
                    self._evaluate(step)
                    bar.set_postfix(acc=f"{self.state.last_eval['test_acc']:.4f}")
                if step < t.steps and self._stopping():  # a signal in the last step: it finishes
                    interrupted = True
                    self._save(step)
                    self._note(f"\nstopped by signal at step {step}; checkpoint saved. Continue with "
                               "--resume (in a grid: rerun the grid's command)")  # fmt: skip
                    break
                if step % t.save_every == 0 or step == t.steps:
                    self._save(step)
                bar.update(1)
            if not interrupted and self.state.last_eval.get("step") != self.state.step:
                self._evaluate(self.state.step)  # resumed at its new last step
        except BaseException:  # a crashed run frees its folder (an inline grid goes on)
            self.lock.release()
            raise
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.batches.close()  # the batch made ahead is dropped
            for tracker in acc.trackers:  # the process group stays up for the caller
                tracker.finish()
        if interrupted:
            self.lock.release()
            return {"interrupted": True, "step": self.state.step}
        return self._finish()

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        """One optimisation step; returns detached losses and metrics for logging."""
        acc, t = self.accelerator, self.cfg.train
        self.model.train()
        batch = self.batches(step)
        ctx = StepContext(
            step=step, generator=step_generator(t.seed, ALGORITHM, step), gather=acc.gather,
            rank=self.rank, world=self.world,
        )  # fmt: skip
        with self._autocast():
            out = self.algorithm.step(self.model, batch, ctx)
            loss = sum(out.losses.values())
        acc.backward(loss)
        if t.clip_grad_norm > 0 and not self.deepspeed:  # DeepSpeed clips in its own step
            acc.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # the warm-up reads the step count; without it the decay holds from the first update,
        # as USB's EMA (timm given a step would copy the weights at the first)
        self.ema.update(self.live_model, step=step + 1 if t.ema_warmup else None)
        logged = {
            "loss": loss.detach(),
            **{k: v.detach() for k, v in out.losses.items()},
            **out.metrics,
        }
        if out.probes:  # evaluation only: the algorithm compares its probes with provenance
            logged.update(
                self.algorithm.probe_metrics(out.probes, batch.idx_ulb, self._probe_provenance)
            )
        return logged

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Accelerate's autocast; under DeepSpeed, which Accelerate does not autocast, torch's own
        in the resolved precision (bf16 or none; inside the engine's forward its torch_autocast
        section, set to the same by `deepspeed_plugin`)."""
        if not self.deepspeed:
            return self.accelerator.autocast()
        bf16 = self.precision.mixed_precision == "bf16"
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=bf16)

    def _collect(
        self, window: dict[str, list[torch.Tensor]], logged: dict[str, torch.Tensor]
    ) -> None:
        """Keep a step's values on the device until the next log.

        Every rank must reduce the same keys in the same order, so an algorithm logs a fixed key
        set: a key that comes or goes between steps is an error here, not a hang in `_reduce`.
        """
        if window and logged.keys() != window.keys():
            raise RuntimeError(
                f"algorithm {self.cfg.algorithm!r} logged {sorted(logged)} at step "
                f"{self.state.step}, but {sorted(window)} before: log the same keys every step"
            )
        for k, v in logged.items():
            if v.requires_grad:  # kept until the log, it would keep the step's whole graph
                raise RuntimeError(
                    f"algorithm {self.cfg.algorithm!r} logged {k!r} with its autograd graph "
                    "attached: log a detached value"
                )
            window.setdefault(k, []).append(v)

    def _reduce(self, window: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """Window means over steps and ranks: one collective and one device-to-host copy."""
        keys = sorted(window)  # the same order on every rank, whatever order keys came in
        device = self.accelerator.device
        means = torch.stack([torch.stack(window[k]).float().mean().to(device) for k in keys])
        means = self.accelerator.reduce(means, "mean").tolist()
        return {**dict(zip(keys, means)), "lr": self.scheduler.get_last_lr()[0]}

    # -- evaluation ---------------------------------------------------------------------------
    def _predict(
        self, fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor
    ) -> torch.Tensor:
        acc = self.accelerator
        with self._autocast():
            return evaluate.predict(fn, images, self.cfg.train.eval_batch_size // self.world,
                                    acc.device, self.rank, self.world, acc.gather)  # fmt: skip

    def _evaluate(self, step: int) -> None:
        acc = self.accelerator
        self._sync_bn_statistics()
        ema, live = self.ema.module, self.live_model
        ema.eval()
        classifier = self.algorithm.classifier(ema)
        test_acc = evaluate.accuracy(
            self._predict(lambda x: classifier(x)["logits"], self.data.test), self.data.test_y
        )
        results = {"step": step, "test_acc": test_acc}
        live.eval()
        warn = lambda message: self._note(f"\nWARNING step {step}: {message}")  # noqa: E731
        results.update(
            self.algorithm.evaluate(EvalContext(ema, live, self._predict, self.data, warn))
        )
        live.train()
        # the first evaluation is the best so far whatever it scores (0% included: best_acc
        # starts at 0, and a strict > alone left such a run without best/ and at best_step 0)
        improved = self.state.best_step == 0 or test_acc > self.state.best_acc
        if improved:
            self.state.best_acc, self.state.best_step = test_acc, step
        results.update(best_acc=self.state.best_acc, best_step=self.state.best_step)
        self.state.last_eval = results  # before the export: the model cards read it
        if improved and acc.is_main_process:
            self._export_best()
        acc.log({f"eval/{k}": v for k, v in results.items() if k != "step"}, step=step)
        if acc.is_main_process:
            with open(self.out / "evals.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(results) + "\n")

    # -- saving -------------------------------------------------------------------------------
    def _save(self, step: int) -> None:
        self._sync_bn_statistics()
        checkpoint.save(
            self.accelerator, self.ckpt_root, step, self.ema.module, self.algorithm.state_dict(),
            self.state.__dict__, to_dict(self.cfg), self.cfg.train.keep_checkpoints,
        )  # fmt: skip

    def export(self, folder: Path | None = None) -> Path:
        """The algorithm's inference models (the EMA classifier at least) for `rsmatch-push`."""
        folder = folder or self.out
        self.algorithm.export(self.ema.module, self.live_model, folder, self.data.class_names,
                              self._algorithm_metrics())  # fmt: skip
        return folder

    def _algorithm_metrics(self) -> dict[str, float]:
        """The algorithm's part of the last evaluation (RSMatch: the detector's metrics). From
        the trainer's state, which a checkpoint keeps: a resume that exports before evaluating
        again (a finished run, or one stopped at its last step) still has them."""
        ev = self.state.last_eval
        return {
            k: v for k, v in ev.items() if k not in ("step", "test_acc", "best_acc", "best_step")
        }

    def _export_best(self) -> None:
        """Keep the models behind `best_acc` in `best/`, replaced whole (never half-written),
        with the step and accuracy they were evaluated at (`best.json`)."""
        record = {"step": self.state.best_step, "test_acc": self.state.best_acc}

        def fill(folder: Path) -> None:
            self.export(folder)
            (folder / BEST_RECORD).write_text(json.dumps(record) + "\n", encoding="utf-8")

        write_folder(self.out / "best", fill)

    def _set_aside_newer_best(self) -> bool:
        """`best/` evaluated after the step resumed from belongs to the trajectory left behind
        (`--resume-from` an older step, auto-fallback): kept, renamed `set_aside_best_step_N`,
        as newer checkpoints are; the resumed run exports its own best again. True if moved."""
        record = self.out / "best" / BEST_RECORD
        try:
            step = int(json.loads(record.read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):  # none, from before best.json, broken
            return False
        if step > self.state.step:
            target = self.out / f"set_aside_best_step_{step:08d}"
            replace_path(self.out / "best", target)
            self._note(f"best/ (step {step}): newer than the checkpoint resumed from, set aside "
                       f"as {target.name}")  # fmt: skip
            return True
        return False

    def _finish(self) -> dict:
        ev = self.state.last_eval
        metrics = {
            "algorithm": self.cfg.algorithm,
            "test_acc": ev["test_acc"],
            "best_acc": self.state.best_acc,
            "best_step": self.state.best_step,
            "step": self.state.step,
            "seconds": round(self.state.seconds, 2),
            **self._algorithm_metrics(),
        }
        if self.accelerator.is_main_process:
            self.export()
            # last, and whole: a grid counts a run with metrics.json as done
            write_text_atomic(self.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
            self.lock.release()
        return metrics


def _hparams(cfg: Config) -> dict[str, int | float | str | bool]:
    """TensorBoard hparams take flat scalars and strings."""
    scalar = (int, float, str, bool)
    return {k: v if isinstance(v, scalar) else str(v) for k, v in flatten(to_dict(cfg)).items()}
