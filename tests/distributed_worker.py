"""Run by tests under torchrun: train (or resume with --resume), then record per-rank digests
of the algorithm state, the live model and the EMA model (buffers included). Runs separated by
`--then` train one after another in the same process group (a launch costs ~15 s of imports).

Also recorded (watched.json, one record per rank): at every BatchNorm sync, whether each rank's
running means became the mean over ranks (`bn_sync`: (checked, wrong)); at every evaluation, a
digest of the EMA and live models it evaluates (`evaluated`), so a rank evaluating before the
sync shows up even when a later save syncs again; at every log, the keys the rank logged in its
order (`keys`) and the reduced values (`logs`); and the reduction of a window whose keys this
rank met in its own order (`swapped`: rank 0 met a then b, rank 1 b then a)."""

import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate.utils import gather, gather_object

from rsmatch.cli import exit_process
from rsmatch.config import load_config
from rsmatch.trainer import Trainer


def digests(state: dict, prefix: str) -> dict[str, str]:
    return {
        f"{prefix}{k}": hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        for k, v in state.items()
    }


def running_means(trainer: Trainer) -> dict[str, torch.Tensor]:
    models = {"model.": trainer.live_model, "ema.": trainer.ema.module}
    return {
        prefix + k: v.detach().clone()
        for prefix, model in models.items()
        for k, v in model.state_dict().items()
        if k.endswith("running_mean")
    }


def watch(trainer: Trainer, record: dict) -> None:
    sync, predict = trainer._sync_bn_statistics, trainer._predict

    def checked_sync() -> None:
        before = running_means(trainer)
        sync()
        after = running_means(trainer)
        for k, v in before.items():
            record["bn_sync"][0] += 1
            if not torch.allclose(after[k], gather(v[None]).mean(0), rtol=1e-5, atol=1e-6):
                record["bn_sync"][1] += 1

    def recorded_predict(fn, images):
        state = {**digests(trainer.live_model.state_dict(), "model."),
                 **digests(trainer.ema.module.state_dict(), "ema.")}  # fmt: skip
        record["evaluated"].append(hashlib.sha256(json.dumps(state).encode()).hexdigest())
        return predict(fn, images)

    collect, reduce = trainer._collect, trainer._reduce

    def recorded_collect(window, logged) -> None:
        record["keys"].append(list(logged))
        collect(window, logged)

    def recorded_reduce(window) -> dict:
        record["logs"].append(reduce(window))
        return record["logs"][-1]

    trainer._sync_bn_statistics, trainer._predict = checked_sync, recorded_predict
    trainer._collect, trainer._reduce = recorded_collect, recorded_reduce


def reduce_swapped(trainer: Trainer) -> dict:
    """The same keys met in a rank-dependent order must still be reduced key by key."""
    r = float(trainer.rank)
    window = {"a": [torch.tensor(r)], "b": [torch.tensor(10 + r)]}
    if trainer.rank % 2:
        window = dict(reversed(window.items()))
    return Trainer._reduce(trainer, window)  # the trainer's own, not the recording one


def train_and_record(args: list[str], resume: bool) -> Trainer:
    trainer = Trainer(load_config(None, args))
    record = {"bn_sync": [0, 0], "evaluated": [], "keys": [], "logs": []}
    watch(trainer, record)
    trainer.fit(resume=resume)
    record["swapped"] = reduce_swapped(trainer)
    live = trainer.accelerator.unwrap_model(trainer.model)
    digest = {
        **digests(trainer.algorithm.state_dict(), ""),
        **digests(live.state_dict(), "model."),
        **digests(trainer.ema.module.state_dict(), "ema."),
    }
    ranks = gather_object([digest])
    records = gather_object([record])
    if trainer.accelerator.is_main_process:
        out = Path(trainer.cfg.train.output_dir)
        (out / "ranks.json").write_text(json.dumps(ranks), encoding="utf-8")
        (out / "watched.json").write_text(json.dumps(records), encoding="utf-8")
    return trainer


if __name__ == "__main__":
    resume = "--resume" in sys.argv
    runs = [[]]
    for arg in sys.argv[1:]:
        if arg == "--then":
            runs.append([])
        elif arg != "--resume":
            runs[-1].append(arg)
    for args in runs:
        trainer = train_and_record(args, resume)
    trainer.accelerator.end_training()  # the process group, shared by the runs
    exit_process(0)  # see there: a gloo worker may abort a finalising Python
