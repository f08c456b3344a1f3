"""Typed run configuration: YAML file first, then ``key=value`` overrides that win.

Hand-written rather than OmegaConf/Hydra: the loader is ~80 lines, and owning it lets every
error be one line naming the dotted key and the bad value (exit code 2, nothing written),
which is what users of a long-running trainer need before any work starts.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ALGORITHMS = ("supervised", "fixmatch", "flexmatch", "freematch", "simmatch", "rsmatch")
SSL_BASES = ("fixmatch", "flexmatch", "freematch", "simmatch")


class ConfigError(ValueError):
    """A bad config key or value; the message names the dotted key."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class DataConfig:
    benchmark: str | None = _f(
        None,
        "Saved RS-SSL benchmark (output of `rsmatch-build-benchmark`). When set, `real`, "
        "`synthetic`, `labels_per_class`, `replace_ratio`, `unlabeled_per_class` and "
        "`split_seed` are read from it instead of the keys below.",
    )
    real: str = _f(
        "data/demo/real",
        "Real images: a Hub id (`uoft-cs/cifar10`, `uoft-cs/cifar100`), a folder with "
        "`train/` and `test/` holding one subfolder per class, or a saved DatasetDict.",
    )
    synthetic: dict[str, str] = _f(
        {},
        "Synthetic sources, generator name -> folder with one subfolder per class "
        "(or a saved Dataset with `image`, `label`). Replacements use all generators in "
        "equal shares.",
    )
    labels_per_class: int = _f(25, "Labeled real images per class, chosen by `split_seed`.")
    replace_ratio: float = _f(
        0.5, "Fraction r of each class's unlabeled reals replaced by synthetic images."
    )
    unlabeled_per_class: int | None = _f(
        None, "Cap on the real unlabeled pool per class before replacement (None = all)."
    )
    split_seed: int = _f(0, "Seed of the labeled/unlabeled/replacement split.")
    real_only: bool = _f(
        False,
        "Oracle 'real only': drop synthetic images from the unlabeled pool by ground truth. "
        "The only training path allowed to read `is_synthetic`.",
    )
    mean: list[float] = _f(
        [0.485, 0.456, 0.406],
        "Normalisation mean. USB normalises CIFAR-10 with ImageNet statistics (kept).",
    )
    std: list[float] = _f([0.229, 0.224, 0.225], "Normalisation std.")


@dataclass
class ModelConfig:
    backbone: str = _f(
        "wrn28_2", "Classifier encoder: any timm model name (`wrn28_2`, `wrn28_8` are ours)."
    )
    small_stem: bool = _f(
        False, "For timm ResNet-style models: 3x3 stride-1 stem, no max-pool (32x32 inputs)."
    )
    bn_momentum: float = _f(
        0.001,
        "BatchNorm momentum of the WRN backbones. USB uses 0.001, which leaves running "
        "statistics near their initial values for thousands of steps: short runs want 0.1.",
    )


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/demo", "Run directory: config, metrics, checkpoints, logs.")
    seed: int = _f(0, "Training seed: init, batch order, augmentation, queue picks.")
    steps: int = _f(1_048_576, "Training iterations K (USB: 2^20).")
    batch_size: int = _f(64, "Global labeled batch B; each of N processes takes B/N (must divide).")
    uratio: int = _f(7, "Unlabeled ratio mu: the global unlabeled batch is mu*B.")
    lr: float = _f(0.03, "SGD learning rate.")
    momentum: float = _f(0.9, "SGD momentum (Nesterov).")
    weight_decay: float = _f(5e-4, "Weight decay, not applied to BatchNorm and biases.")
    cosine_cycles: float = _f(
        7 / 16, "lr(k) = lr * cos(pi * cosine_cycles * k / steps); USB's 7/16."
    )
    ema_decay: float = _f(0.999, "EMA decay of the weights used for evaluation.")
    ema_warmup: bool = _f(
        False,
        "Ramp the EMA decay up as min(ema_decay, 1 - 1/(1+k)) so short runs evaluate sensibly.",
    )
    eval_every: int = _f(5120, "Evaluate the EMA model on the test split every N steps.")
    log_every: int = _f(256, "Log losses and metrics to TensorBoard every N steps.")
    save_every: int = _f(5120, "Write a checkpoint every N steps (and at the end).")
    keep_checkpoints: int = _f(2, "How many checkpoints to keep.")
    eval_batch_size: int = _f(256, "Global evaluation batch size.")
    mixed_precision: str = _f("no", "`no`, `fp16` (GPU) or `bf16`.")
    channels_last: bool = _f(False, "Run convolutions in channels_last memory format.")
    sync_bn: bool = _f(
        False, "SyncBatchNorm across processes (USB: off; each rank normalises its slice)."
    )
    clip_grad_norm: float = _f(0.0, "Clip the gradient norm to this value (0 = off).")
    progress: bool = _f(True, "Show a progress bar on the main process.")


@dataclass
class SSLConfig:
    threshold: float = _f(0.95, "Confidence threshold tau of pseudo-labels.")
    lambda_u: float = _f(1.0, "Weight lambda_u of the unlabeled loss.")


@dataclass
class FlexMatchConfig:
    thresh_warmup: bool = _f(
        True, "Count never-selected samples in the normaliser (USB default, warm-up)."
    )


@dataclass
class FreeMatchConfig:
    ema_p: float = _f(0.999, "EMA momentum of the self-adaptive thresholds.")
    ent_loss_ratio: float = _f(0.001, "Weight of the fairness loss (USB CIFAR configs).")


@dataclass
class SimMatchConfig:
    temperature: float = _f(0.1, "Temperature T of the similarity distributions.")
    proj_size: int = _f(128, "Output size of the projection head.")
    smoothing_alpha: float = _f(0.9, "Label aggregation weight alpha.")
    da_len: int = _f(32, "Distribution-alignment window, in batches.")
    lambda_in: float = _f(1.0, "Weight of the similarity loss L_in.")
    warmup_steps: int = _f(1024, "L_in and aggregation are off for the first N steps.")
    bank_momentum: float = _f(0.7, "Labeled bank update: normalize(m*bank + (1-m)*feat).")
    usb_bank_norm: bool = _f(
        False,
        "Reproduce USB's bank update, which L2-normalises the [dim, n] slab along the sample "
        "axis instead of each item's feature vector.",
    )


@dataclass
class RSMatchConfig:
    base: str = _f("fixmatch", "SSL algorithm whose pseudo-labels and masks RSMatch wraps.")
    detector_backbone: str = _f(
        "wrn16_1", "Deepfake detector encoder (any timm name); ignored with shared_encoder."
    )
    queue_length: int = _f(16, "L: length of each class sub-queue.")
    queue_picks: int = _f(10, "M: sub-queues updated per step (all when C <= M).")
    queue_topk: int = _f(1, "k: samples pushed per picked sub-queue.")
    class_wise: bool = _f(
        True, "Class-wise CSQueue; False = one FIFO of length C*L fed with the top M*k."
    )
    shared_encoder: bool = _f(
        False, "Ablation 'w/o ind. models': the detector head sits on the classifier encoder."
    )
    fake_head: bool = _f(
        True, "False = ablation 'w/o fake head': detected synthetic images are dropped."
    )
    detector_threshold: float = _f(0.95, "tau of the detector's pseudo-labels, loss (3).")
    strong_labeled: bool = _f(
        False, "Strongly augment labeled reals in the detector's supervised loss (2)."
    )
    pool_eval_every: int = _f(
        0, "Evaluate the detector on the whole unlabeled pool every N steps (0 = at eval)."
    )


@dataclass
class Config:
    algorithm: str = _f("rsmatch", f"One of {', '.join(ALGORITHMS)}.")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    flexmatch: FlexMatchConfig = field(default_factory=FlexMatchConfig)
    freematch: FreeMatchConfig = field(default_factory=FreeMatchConfig)
    simmatch: SimMatchConfig = field(default_factory=SimMatchConfig)
    rsmatch: RSMatchConfig = field(default_factory=RSMatchConfig)


# --- loading -------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false, so `mixed_precision: no` stays the string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)

# YAML 1.1 reads 1e-3 as a string; scientific notation without a dot is a float here.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping name: value, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _coerce(f"{key}.{k}", v, item) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a section, got {value!r}")
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=0.01`` -> ("train.lr", 0.01); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"{text}: overrides are key=value, e.g. train.lr=0.01")
    try:
        return key.strip(), _yaml(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r} ({e.problem})") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults < YAML file < overrides, then :func:`validate`."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file {str(path)!r}")
        try:
            tree = _yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path} is not valid YAML ({e})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--config: {path} must hold a mapping at top level")
    for item in overrides:
        _set_dotted(tree, *parse_override(item))
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Value checks that need no data; data-dependent checks happen when the split is built."""
    d, t, r = cfg.data, cfg.train, cfg.rsmatch
    _check(cfg.algorithm in ALGORITHMS, "algorithm", cfg.algorithm, f"one of {ALGORITHMS}")
    _check(r.base in SSL_BASES, "rsmatch.base", r.base, f"one of {SSL_BASES}")
    _check(0.0 <= d.replace_ratio <= 1.0, "data.replace_ratio", d.replace_ratio, "not in [0, 1]")
    _check(d.labels_per_class >= 1, "data.labels_per_class", d.labels_per_class, "must be >= 1")
    _check(len(d.mean) == 3 and len(d.std) == 3, "data.mean", d.mean, "mean/std need 3 values")
    _check(all(s > 0 for s in d.std), "data.std", d.std, "must be positive")
    for key in ("steps", "batch_size", "uratio", "eval_every", "log_every", "save_every"):
        _check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "must be >= 1")
    _check(t.lr > 0, "train.lr", t.lr, "must be positive")
    _check(0 <= t.ema_decay < 1, "train.ema_decay", t.ema_decay, "not in [0, 1)")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
    _check(
        t.mixed_precision in ("no", "fp16", "bf16"),
        "train.mixed_precision",
        t.mixed_precision,
        "one of no, fp16, bf16",
    )
    _check(0 < cfg.ssl.threshold <= 1, "ssl.threshold", cfg.ssl.threshold, "not in (0, 1]")
    _check(
        0 < r.detector_threshold <= 1,
        "rsmatch.detector_threshold",
        r.detector_threshold,
        "not in (0, 1]",
    )
    _check(cfg.ssl.lambda_u >= 0, "ssl.lambda_u", cfg.ssl.lambda_u, "must be >= 0")
    _check(0 <= cfg.freematch.ema_p <= 1, "freematch.ema_p", cfg.freematch.ema_p, "not in [0, 1]")
    _check(
        cfg.simmatch.temperature > 0,
        "simmatch.temperature",
        cfg.simmatch.temperature,
        "must be positive",
    )
    _check(cfg.simmatch.da_len >= 1, "simmatch.da_len", cfg.simmatch.da_len, "must be >= 1")
    _check(
        0 <= cfg.simmatch.smoothing_alpha <= 1,
        "simmatch.smoothing_alpha",
        cfg.simmatch.smoothing_alpha,
        "not in [0, 1]",
    )
    _check(
        t.clip_grad_norm >= 0, "train.clip_grad_norm", t.clip_grad_norm, "must be >= 0 (0 = off)"
    )
    unl = d.unlabeled_per_class
    _check(unl is None or unl >= 1, "data.unlabeled_per_class", unl, "must be >= 1 or null")
    for key in ("queue_length", "queue_picks", "queue_topk"):
        _check(getattr(r, key) >= 1, f"rsmatch.{key}", getattr(r, key), "must be >= 1")
    for key, value in (
        ("train.batch_size", t.batch_size),
        ("train.eval_batch_size", t.eval_batch_size),
    ):
        _check(
            value % world_size == 0,
            key,
            value,
            f"global batch sizes must divide by the {world_size} processes",
        )


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --- docs ----------------------------------------------------------------------------------


def config_docs() -> str:
    """Markdown reference of every key, generated from the dataclasses (docs/config.md)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `python -m rsmatch.config` from `rsmatch/config.py`; do not edit.",
        "Set keys in YAML or override them on the command line as `section.key=value`.",
        "",
    ]

    def section(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        rows, subs = [], []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                subs.append((hints[f.name], f"{prefix}{f.name}."))
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tp = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            rows.append(f"| `{prefix}{f.name}` | `{tp}` | `{default!r}` | {f.metadata['help']} |")
        if rows:
            lines.extend([f"## `{prefix.rstrip('.') or 'top level'}`", ""])
            lines.extend(["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        for sub, sub_prefix in subs:
            section(sub, sub_prefix)

    section(Config, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_docs(), end="")
