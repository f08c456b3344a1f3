"""DeepSpeed ZeRO-2 on CPU (one process): the one-engine model trains like plain PyTorch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rsmatch.config import ConfigError, load_config
from rsmatch.trainer import deepspeed_plugin

from .conftest import ROOT, failure, tiny_overrides
from .deepspeed_probe import record_engine
from .torchrun import free_port


def test_deepspeed_imports():
    import deepspeed  # noqa: F401
    from accelerate.utils import DeepSpeedPlugin

    assert (
        DeepSpeedPlugin(hf_ds_config=str(ROOT / "configs" / "deepspeed" / "zero2.json")).zero_stage
        == 2
    )


def _launched(args, deepspeed_json: Path, probe: Path | None = None):
    """launch/train.py launched by `accelerate launch --use_deepspeed` with the JSON; with
    `probe`, through tests/deepspeed_probe.py (the GPU's autocast path; the parameters'
    alignment and the engine's clipping written to `probe`). It runs with this process's thread
    count, as the in-process run it is compared with does: bf16 sums round differently with
    another (a suite started under OMP_NUM_THREADS=1 had 1 here, torch's default 2 there)."""
    script = ROOT / ("tests/deepspeed_probe.py" if probe else "launch/train.py")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
              str(deepspeed_json), "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no",
              str(script)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    if probe:
        env["RSMATCH_PROBE_OUT"] = str(probe)
    return subprocess.run([*launch, *args], capture_output=True, text=True, timeout=600, env=env)


def _launcher_env(deepspeed_json: Path) -> dict[str, str]:
    """What `accelerate launch --use_deepspeed` hands rank 0 of 1: DeepSpeed's and the process
    group's variables."""
    return {"ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(deepspeed_json),
            "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip


@pytest.fixture
def deepspeed_here(train_in_process, monkeypatch):
    """`run(args, cwd, deepspeed_json, probe=None)`: launch/train.py as `accelerate launch
    --use_deepspeed` runs it as rank 0 of 1, in this process (a launch's two fresh processes
    spend ~15 s on imports here); `probe` as for `_launched`. The process group is left down."""

    def run(args: list[str], cwd: Path, deepspeed_json: Path, probe: Path | None = None):
        from deepspeed.utils import groups

        with monkeypatch.context() as this_run:
            # DeepSpeed caches its clone of the world's process group (ZeRO's data-parallel
            # group): an earlier run's would be a group destroyed with its run
            this_run.setattr(groups, "_WORLD_GROUP", None)
            if probe:
                record_engine(probe, this_run.setattr)
            return train_in_process(args, cwd, _launcher_env(deepspeed_json))

    yield run
    if torch.distributed.is_initialized():  # a run that failed midway
        torch.distributed.destroy_process_group()


def _ds_config(tmp_path: Path, **extra: object) -> Path:
    """A ZeRO-2 JSON for the tiny runs (micro batch 6, no gradient_clipping), with `extra` keys
    on top."""
    path = tmp_path / "ds.json"
    config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 6, **extra}
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def train_deepspeed_and_plain(
    sources,
    tmp_path: Path,
    train_plain,
    probe: Path | None = None,
    deepspeed_here=None,
    **extra: object,
) -> tuple[dict, dict, dict]:
    """2 steps with ZeRO-2 (launched, or by the `deepspeed_here` fixture when given; through the
    probe when given) and 2 without, by `train_plain` (the `train_in_process` fixture); EMA decay
    0, so the saved EMA is the weights: the weights of each, and the DeepSpeed run's run.json."""
    extra = {"train.steps": 2, "train.ema_decay": 0.0, **extra}
    deepspeed, plain = tmp_path / "deepspeed", tmp_path / "plain"
    args = tiny_overrides(sources, deepspeed, **extra)
    if deepspeed_here:
        res = deepspeed_here(args, tmp_path, _ds_config(tmp_path), probe)
    else:
        res = _launched(args, _ds_config(tmp_path), probe)
    assert res.returncode == 0, failure(res)
    res = train_plain(tiny_overrides(sources, plain, **extra), tmp_path)
    assert res.returncode == 0, failure(res)
    ema = lambda out: load_file(str(out / "checkpoints" / "step_00000002" / "ema.safetensors"))  # noqa: E731
    return (
        ema(deepspeed),
        ema(plain),
        json.loads((deepspeed / "run.json").read_text(encoding="utf-8")),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm, precision, launched",
    [("supervised", "no", False), ("rsmatch", "no", False), ("rsmatch", "bf16", True)],
)
def test_zero2_matches_plain_training(
    sources, tmp_path, algorithm, precision, launched, train_in_process, deepspeed_here
):
    """bf16 with channels_last, as `auto` picks them on a GPU, on the engine's GPU path (the
    probe): DeepSpeed used to crash on channels_last weights, to train fp32 whatever
    train.mixed_precision said, and to leave parameters off 16-byte boundaries (a CUDA fault).
    That run goes through `accelerate launch` itself; the others emulate it in this process."""
    overrides = {"algorithm": algorithm, "train.mixed_precision": precision,
                 "train.channels_last": precision == "bf16"}  # fmt: skip
    probe = tmp_path / "offsets.json"
    here = None if launched else deepspeed_here
    deepspeed, plain, run = train_deepspeed_and_plain(
        sources, tmp_path, train_in_process, probe, here, **overrides
    )
    probed = json.loads(probe.read_text(encoding="utf-8"))
    misaligned = {name: at for name, at in probed["offsets"].items() if at}
    assert not misaligned, misaligned
    # the JSON leaves gradient_clipping out: DeepSpeed's default, 1.0, unless rsmatch sets it
    assert probed["gradient_clipping"] == 0.0
    assert (tmp_path / "deepspeed" / "checkpoints" / "step_00000002" / "pytorch_model").is_dir()
    assert run["mixed_precision"] == precision and "DeepSpeed" in run["precision"]["reason"]
    for k, v in plain.items():
        torch.testing.assert_close(deepspeed[k], v, rtol=1e-5, atol=1e-6, msg=k)


def _refused(train_in_process, sources, tmp_path: Path, overrides: list[str], **ds_extra: object):
    """launch/train.py as `accelerate launch --use_deepspeed` starts rank 0 of 1, run in this
    process: a refusal comes before the Accelerator forms the process group, and before anything
    is written."""
    env = _launcher_env(_ds_config(tmp_path, **ds_extra))
    res = train_in_process([*tiny_overrides(sources, tmp_path / "run"), *overrides], tmp_path, env)
    assert res.returncode != 0
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()
    return res.stderr


def test_deepspeed_clipping_must_match_the_config(sources, tmp_path, train_in_process):
    """Refused before the data is read: an empty real folder, which the sources check would
    report first, is never looked at (the check ran after the whole dataset was decoded)."""
    (tmp_path / "empty").mkdir()
    err = _refused(train_in_process, sources, tmp_path, [f"data.real={tmp_path / 'empty'}"],
                   gradient_clipping=1.0)  # fmt: skip
    assert (
        "train.clip_grad_norm=0.0: the DeepSpeed config clips at 1.0; "
        'set "gradient_clipping": 0.0 there, or leave it out'
    ) in err


def test_deepspeed_whole_model_bf16_is_refused(sources, tmp_path, train_in_process):
    """DeepSpeed's own bf16 casts the model (BatchNorm too) and then met fp32 images: a crash
    deep in the first forward. Now refused at start, naming the setting."""
    err = _refused(train_in_process, sources, tmp_path, [], bf16={"enabled": True})
    assert 'the DeepSpeed config enables "bf16"' in err


def test_compile_under_deepspeed_is_refused_at_start(sources, tmp_path, train_in_process):
    """The model.compile(mode=) call was a TypeError on DeepSpeed's engine, and its own
    compile() then failed in ZeRO-2's gradient hooks: refused before anything is written."""
    err = _refused(train_in_process, sources, tmp_path, ["train.compile=true"])
    assert "train.compile=true: not under DeepSpeed" in err


@pytest.mark.slow
def test_resume_under_deepspeed_is_exact(sources, tmp_path, deepspeed_here):
    """4 straight steps == 2 steps + resume + 2 steps, through DeepSpeed's own checkpoint
    (bf16 autocast and channels_last activations, as `auto` runs on a GPU)."""
    ds = _ds_config(tmp_path)
    extra = {"algorithm": "rsmatch", "train.steps": 4, "train.save_every": 2,
             "train.eval_every": 2, "train.keep_checkpoints": 5, "train.ema_decay": 0.0,
             "train.mixed_precision": "bf16", "train.channels_last": True}  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    res = deepspeed_here(tiny_overrides(sources, straight, **extra), tmp_path, ds)
    assert res.returncode == 0, failure(res)
    step2 = "step_00000002"
    shutil.copytree(straight / "checkpoints" / step2, resumed / "checkpoints" / step2)
    (resumed / "checkpoints" / "latest").write_text(step2 + "\n", encoding="utf-8")
    res = deepspeed_here([*tiny_overrides(sources, resumed, **extra), "--resume"], tmp_path, ds)
    assert res.returncode == 0, failure(res)
    for name in ("ema.safetensors", "algorithm.safetensors"):  # EMA = the weights (decay 0)
        a = load_file(str(straight / "checkpoints" / "step_00000004" / name))
        b = load_file(str(resumed / "checkpoints" / "step_00000004" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# -- DeepSpeed: what the trainer hands on -----------------------------------------------------


def _plugin(cfg, ds_config: dict, mixed_precision: str, tmp_path, monkeypatch) -> dict:
    """deepspeed_plugin under a DeepSpeed launch of the JSON `ds_config`: the config it completed
    (what Accelerate adds itself removed)."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **ds_config}), encoding="utf-8")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    completed = deepspeed_plugin(cfg, mixed_precision).deepspeed_config
    for accelerates in ("zero_optimization", "gradient_accumulation_steps", "steps_per_print"):
        completed.pop(accelerates)
    return completed


def test_deepspeed_plugin_clips_and_autocasts_as_the_config_says(tmp_path, monkeypatch):
    """train.clip_grad_norm and the resolved precision go into the engine's JSON."""
    cfg = load_config(None, ["train.clip_grad_norm=0.5"])
    assert _plugin(cfg, {}, "bf16", tmp_path, monkeypatch) == {
        "torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "gradient_clipping": 0.5,
    }  # fmt: skip
    with pytest.raises(ConfigError) as error:
        _plugin(cfg, {"gradient_clipping": 1.0}, "no", tmp_path, monkeypatch)
    assert str(error.value) == (
        "train.clip_grad_norm=0.5: the DeepSpeed config clips at 1.0; "
        'set "gradient_clipping": 0.5 there, or leave it out'
    )


def test_deepspeed_plugin_refuses_compile(tmp_path, monkeypatch):
    cfg = load_config(None, ["train.compile=true"])
    with pytest.raises(ConfigError, match=r"^train.compile=true: not under DeepSpeed"):
        _plugin(cfg, {}, "no", tmp_path, monkeypatch)
