"""Typed run configuration: YAML file first, then ``key=value`` overrides that win.

Hand-written rather than OmegaConf/Hydra: the loader is ~80 lines, and owning it lets every
error be one line naming the dotted key and the bad value (exit code 2, nothing written),
which is what users of a long-running trainer need before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rsmatch import registry

# torch.compile's modes (torch._inductor.list_mode_options, plus its `default`)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ConfigError(ValueError):
    """A bad config key or value; the message names the dotted key."""


def option(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its documentation (docs/config.md is generated from these)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class DataConfig:
    benchmark: str | None = option(
        None,
        "RS-SSL benchmark: the folder `rsmatch-build-benchmark` writes, or the Hub dataset id it "
        "was pushed to (or a download of that repo). When set, `real`, "
        "`synthetic`, `labels_per_class`, `replace_ratio`, `unlabeled_per_class` and "
        "`split_seed` are read from it instead of the keys below.",
    )
    real: str = option(
        "data/demo/real",
        "Real images: a Hub id (`uoft-cs/cifar10`, `uoft-cs/cifar100`), a folder with "
        "`train/` and `test/` holding one subfolder per class, or a saved DatasetDict.",
    )
    synthetic: dict[str, str] = option(
        {},
        "Synthetic sources, generator name -> folder with one subfolder per class "
        "(or a saved Dataset with `image`, `label`). Replacements use all generators in "
        "equal shares.",
    )
    labels_per_class: int = option(25, "Labeled real images per class, chosen by `split_seed`.")
    replace_ratio: float = option(
        0.5, "Fraction r of each class's unlabeled reals replaced by synthetic images."
    )
    unlabeled_per_class: int | None = option(
        None, "Cap on the real unlabeled pool per class before replacement (None = all)."
    )
    split_seed: int = option(0, "Seed of the labeled/unlabeled/replacement split.")
    real_only: bool = option(
        False,
        "Oracle 'real only': drop synthetic images from the unlabeled pool by ground truth. "
        "The only training path allowed to read `is_synthetic`.",
    )
    exclude_scores: str | None = option(
        None,
        "Filter-first baseline: an `rsmatch-filter` scores.parquet of this benchmark; unlabeled "
        "rows scored above `exclude_above` are dropped before training. Rows are matched by "
        "`source_id`; detector scores only, never `is_synthetic` (docs/filter.md).",
    )
    exclude_above: float = option(
        0.5, "Threshold of `exclude_scores`: rows with a higher synthetic score are dropped."
    )
    mean: list[float] = option(
        [0.485, 0.456, 0.406],
        "Normalisation mean. USB normalises CIFAR-10 with ImageNet statistics (kept), CIFAR-100 "
        "with its own: set [0.5071, 0.4867, 0.4408] and data.std [0.2675, 0.2565, 0.2761] there "
        "(as the CIFAR-100 grids do).",
    )
    std: list[float] = option([0.229, 0.224, 0.225], "Normalisation std.")


@dataclass
class ModelConfig:
    backbone: str = option(
        "wrn28_2", "Classifier encoder: any timm model name (`wrn28_2`, `wrn28_8` are ours)."
    )
    small_stem: bool = option(
        False, "For timm ResNet-style models: 3x3 stride-1 stem, no max-pool (32x32 inputs)."
    )
    bn_momentum: float = option(
        0.001,
        "Momentum of every BatchNorm in the encoders (classifier and detector, any timm "
        "backbone; timm's own default is 0.1). USB uses 0.001 for its WRNs, which leaves running "
        "statistics near their initial values for thousands of steps: short runs want 0.1.",
    )


@dataclass
class TrainConfig:
    output_dir: str = option("runs/demo", "Run directory: config, metrics, checkpoints, logs.")
    seed: int = option(0, "Training seed: init, batch order, augmentation, queue picks.")
    steps: int = option(1_048_576, "Training iterations K (USB: 2^20).")
    batch_size: int = option(
        64, "Global labeled batch B; each of N processes takes B/N (must divide)."
    )
    uratio: int = option(7, "Unlabeled ratio mu: the global unlabeled batch is mu*B.")
    lr: float = option(0.03, "SGD learning rate.")
    momentum: float = option(0.9, "SGD momentum (Nesterov).")
    weight_decay: float = option(5e-4, "Weight decay, not applied to BatchNorm and biases.")
    cosine_cycles: float = option(
        7 / 16, "lr(k) = lr * cos(pi * cosine_cycles * k / steps); USB's 7/16."
    )
    ema_decay: float = option(0.999, "EMA decay of the weights used for evaluation.")
    ema_warmup: bool = option(
        False,
        "Ramp the EMA decay up as min(ema_decay, 1 - 1/(1+k)) so short runs evaluate sensibly.",
    )
    eval_every: int = option(5120, "Evaluate the EMA model on the test split every N steps.")
    log_every: int = option(256, "Log losses and metrics to TensorBoard every N steps.")
    save_every: int = option(5120, "Write a checkpoint every N steps (and at the end).")
    keep_checkpoints: int = option(2, "How many checkpoints to keep.")
    eval_batch_size: int = option(256, "Global evaluation batch size.")
    mixed_precision: str = option(
        "auto",
        "`auto` (bf16 on GPUs and CPUs that compute it natively, fp16 on older GPUs (fp32 "
        "under DeepSpeed), fp32 on other CPUs; run.json records the choice and why), `no`, "
        "`fp16` (GPU only, not under DeepSpeed) or `bf16`. Autocast, under DeepSpeed too (fp32 "
        "weights; rsmatch sets the engine's `torch_autocast`).",
    )
    channels_last: bool | str = option(
        "auto", "channels_last memory format for convolutions: `auto` (on), true or false."
    )
    keep_host_memory: bool | str = option(
        "auto",
        "Keep freed host memory in the process (glibc: no mmap per large tensor, no trimming), "
        "so a CPU step stops page-faulting every activation: 1.35x (bf16) to 1.4-1.5x (fp32) "
        "faster on a 2-core AMD EPYC (docs/speed.md). `auto`: on when the model runs on the CPU; "
        "the resident memory then stays at its peak.",
    )
    prefetch: bool | str = option(
        "auto",
        "Make the next step's batch in a background thread, on its own CUDA stream, while the "
        "current step runs (same batches). `auto`: on CUDA, where the step is bound by the host "
        "issuing kernels; off on CPUs, where the step keeps every core busy and batch making "
        "is a few percent of it.",
    )
    graph_batches: bool | str = option(
        "auto",
        "Make each batch by replaying one CUDA graph of the augmentation: one graph launch, a "
        "copy per input tensor and a clone per view instead of ~600 kernel launches (same "
        "pixels; every RandAugment op runs on every image and each keeps its own op's result). "
        "`auto`: on CUDA, where it made FixMatch steps 1.38-1.44x and RSMatch steps 1.18-1.20x "
        "faster on two H200s (docs/speed.md); true needs CUDA.",
    )
    sync_bn: bool | str = option(
        "auto",
        "SyncBatchNorm across processes, as USB converts BatchNorm before DDP. `auto`: on with "
        "several CUDA processes; on CPU (where SyncBatchNorm does not run) each rank normalises "
        "its slice and the running statistics are averaged over ranks before every evaluation "
        "and checkpoint, so all ranks evaluate and save the same buffers.",
    )
    clip_grad_norm: float = option(0.0, "Clip the gradient norm to this value (0 = off).")
    compile: bool = option(
        False,
        "torch.compile the trained model (not the EMA copy): fewer, fused kernels per step after "
        "a one-off compile of a few minutes; see docs/speed.md for where it pays. Not under "
        "DeepSpeed (refused at start).",
    )
    compile_mode: str = option(
        "default",
        "torch.compile's mode with train.compile: `default`, `reduce-overhead` (CUDA graphs: "
        "the compiled network replayed without launching each kernel; on an H200 from no gain "
        "to 1.37x, depending on the host: docs/speed.md), `max-autotune` or "
        "`max-autotune-no-cudagraphs`.",
    )
    progress: bool = option(True, "Show a progress bar on the main process.")


@dataclass
class SSLConfig:
    threshold: float = option(0.95, "Confidence threshold tau of pseudo-labels.")
    lambda_u: float = option(1.0, "Weight lambda_u of the unlabeled loss.")


@dataclass
class Config:
    """The sections every run has; `config_class()` adds one per registered algorithm."""

    algorithm: str = option("rsmatch", "A registered algorithm (see the sections below).")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)


def config_class() -> type[Config]:
    """Config with a section `<name>` for every registered algorithm that has keys."""
    sections = [
        (name, entry.config, field(default_factory=entry.config))
        for name, entry in sorted(registry.algorithms().items())
        if entry.config is not None
    ]
    return dataclasses.make_dataclass("Config", sections, bases=(Config,))


# --- loading -------------------------------------------------------------------------------


class YamlLoader(yaml.SafeLoader):
    """The YAML of configs (training, grids, the builder's --config): a SafeLoader with YAML 1.2
    booleans, integers and floats. Only true/false are booleans, so `mixed_precision: no` stays
    the string; `010` is ten (YAML 1.1: eight, octal); `1e-3` is a float (YAML 1.1: a string);
    `1:30`, `1:30.5` and `0b101` are not numbers."""


_BOOL, _INT, _FLOAT = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int",
                       "tag:yaml.org,2002:float")  # fmt: skip
YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# decimal (digit groups may be separated by _, as in Python), 0x hexadecimal, 0o octal
YamlLoader.add_implicit_resolver(
    _INT,
    re.compile(
        r"^(?:[-+]?[0-9]+(?:_[0-9]+)*|0x[0-9a-fA-F]+(?:_[0-9a-fA-F]+)*|0o[0-7]+(?:_[0-7]+)*)$"
    ),
    list("-+0123456789"),
)


def _yaml_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    base = {"0x": 16, "0o": 8}.get(text[:2], 10)
    try:
        return int(text if base == 10 else text[2:], base)
    except ValueError:  # an explicit !!int tag on something else
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is not an integer", node.start_mark
        ) from None


YamlLoader.add_constructor(_INT, _yaml_int)

# decimal with a point or an exponent (an integer matched first), .inf and .nan; digit groups
# as in integers. SafeLoader's own constructor reads them.
_DIGITS = r"[0-9]+(?:_[0-9]+)*"
YamlLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        rf"^(?:[-+]?(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][-+]?{_DIGITS})?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)


class YamlDumper(yaml.SafeDumper):
    """Writes configs that read back the same with YamlLoader and with `yaml.safe_load`:
    SafeDumper quotes a text that YAML 1.1 would read as something else (`no`, `1.5`); this
    also quotes one that YAML 1.2 would (`1e5`, `0o17`), so a run's config.yaml serves as a
    --config."""


_STR = "tag:yaml.org,2002:str"
_READER = YamlLoader("")


def _represent_str(dumper: YamlDumper, text: str) -> yaml.ScalarNode:
    if _READER.resolve(yaml.ScalarNode, text, (True, False)) != _STR:
        return dumper.represent_scalar(_STR, text, style="'")
    return dumper.represent_str(text)


YamlDumper.add_representer(str, _represent_str)


def dump_yaml(data: Any) -> str:
    """`data` as YAML, keys in their order, every text read back as text (YamlDumper)."""
    return yaml.dump(data, Dumper=YamlDumper, sort_keys=False)


def parse_yaml(text: str, where: str, marks: bool = True) -> Any:
    """Parse YAML; any error becomes one line `WHERE:LINE:COL: problem` (or `WHERE: problem`)."""
    try:
        return yaml.load(text, Loader=YamlLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark and marks else where
        raise ConfigError(_one_line(f"{at}: {e.problem or e.context}")) from None
    except (yaml.YAMLError, ValueError, OverflowError) as e:  # e.g. a date like 2024-13-45
        raise ConfigError(_one_line(f"{where}: {e}")) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _shown(name: str) -> str:
    """A key or override as typed, escaped when it holds a newline or control character, so
    the error that names it stays on one line."""
    return name if name.isprintable() else repr(name)


def did_you_mean(word: str, choices: list[str], prefix: str = "") -> str:
    """`; did you mean PREFIX+X?` for a near miss (difflib), else an empty string."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _coerce(key: str, value: Any, tp: Any, in_union: bool = False) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        for inner in options[:-1]:  # e.g. bool | str: the first type that fits wins
            try:
                return _coerce(key, value, inner, in_union=True)
            except ConfigError:
                continue
        return _coerce(key, value, options[-1], in_union=True)
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
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key}: {value} is too large for a float") from None
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is str and not in_union and isinstance(value, (bool, int, float)):
        # YAML reads 1e3, 007 or yes as numbers or switches; quoted, the text stays text
        raise ConfigError(f"{key}: expected text, got the {type(value).__name__} {value!r} "
                          f"(quote it to keep it as text)")  # fmt: skip
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            hint = did_you_mean(str(key), sorted(names), prefix)
            raise ConfigError(
                f"{prefix}{_shown(str(key))}: unknown key{hint} (valid: {', '.join(sorted(names))})"
            )
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
        hint = f"; a config file is --config {text}" if text.endswith((".yaml", ".yml")) else ""
        raise ConfigError(f"{_shown(text)}: overrides are key=value, e.g. train.lr=0.01{hint}")
    if not key.isprintable():  # checked once here: every later error names the key as typed
        raise ConfigError(f"{key!r}: not a config key (dotted names, e.g. train.lr=0.01)")
    where = f"{key.strip()}: cannot parse {raw!r}"
    return key.strip(), parse_yaml(raw, where, marks=False) if raw != "" else ""


# Keys a saved benchmark (data.benchmark) fixes: set beside it, they are not read.
BENCHMARK_FIXED = ("data.real", "data.synthetic", "data.labels_per_class", "data.replace_ratio",
                   "data.unlabeled_per_class", "data.split_seed")  # fmt: skip


def fixed_by_benchmark(key: str) -> bool:
    """`key` (e.g. `data.synthetic.ddpm`) is one that `data.benchmark` fixes."""
    return ".".join(key.split(".")[:2]) in BENCHMARK_FIXED


def ignored_overrides(cfg: Config, overrides: Sequence[str]) -> dict[str, str]:
    """The overrides (of a loaded `cfg`) that this run does not read, each with the reason: a
    section of an algorithm it does not use (`rsmatch.*` when training FixMatch, `flexmatch.*`
    under RSMatch on FixMatch), or a split key that `data.benchmark` fixes."""
    shared = {f.name for f in dataclasses.fields(Config)}
    sections = {f.name for f in dataclasses.fields(cfg)} - shared
    used, name = set(), cfg.algorithm
    while isinstance(name, str) and name not in used:  # the algorithm, the base it wraps, ...
        used.add(name)
        name = getattr(getattr(cfg, name), "base", None) if name in sections else None
    ignored = {}
    for key in (o.partition("=")[0].strip() for o in overrides):
        if key.split(".")[0] in sections - used:
            ignored[key] = f"algorithm={cfg.algorithm} does not read that section"
        elif cfg.data.benchmark and fixed_by_benchmark(key):
            ignored[key] = "data.benchmark fixes the split (its rsmatch_benchmark.json says how)"
    return ignored


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults < YAML file < overrides, then :func:`validate`."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "a folder, not a YAML file" if path.is_dir() else "no such file"
            raise ConfigError(f"--config: {what} {str(path)!r}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"--config: cannot read {str(path)!r} ({_one_line(str(e))})"
            ) from None
        tree = parse_yaml(text, str(path)) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"--config: {path} must hold a mapping at top level")
    for item in overrides:
        _set_dotted(tree, *parse_override(item))
    cfg = _build(config_class(), tree)
    validate(cfg)
    return cfg


def check(ok: bool, key: str, value: Any, why: str) -> None:
    """Raise a ConfigError naming `key=value` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Value checks that need no data; data-dependent checks happen when the split is built.

    Each algorithm section checks its own keys through its `validate()` method.
    """
    d, t = cfg.data, cfg.train
    names = sorted(registry.algorithms())
    check(cfg.algorithm in names, "algorithm", cfg.algorithm, f"one of {', '.join(names)}")
    check(0.0 <= d.replace_ratio <= 1.0, "data.replace_ratio", d.replace_ratio, "not in [0, 1]")
    check(d.labels_per_class >= 1, "data.labels_per_class", d.labels_per_class, "must be >= 1")
    for key, values in (("data.mean", d.mean), ("data.std", d.std)):
        check(len(values) == 3, key, values, "needs 3 values (R, G, B)")
    check(all(s > 0 for s in d.std), "data.std", d.std, "must be positive")
    check(0 <= d.exclude_above <= 1, "data.exclude_above", d.exclude_above, "not in [0, 1]")
    m = cfg.model.bn_momentum
    check(0 <= m <= 1, "model.bn_momentum", m, "not in [0, 1]")
    check(d.exclude_scores is None or Path(d.exclude_scores).is_file(), "data.exclude_scores",
          d.exclude_scores, "no such file")  # fmt: skip
    unl = d.unlabeled_per_class
    check(unl is None or unl >= 1, "data.unlabeled_per_class", unl, "must be >= 1 or null")
    for key, value in (("train.seed", t.seed), ("data.split_seed", d.split_seed)):
        check(0 <= value < 2**32, key, value, "must be in [0, 2**32)")  # numpy's seed range
    for key in ("steps", "batch_size", "uratio", "eval_every", "log_every", "save_every",
                "eval_batch_size"):  # fmt: skip
        check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "must be >= 1")
    check(t.lr > 0, "train.lr", t.lr, "must be positive")
    check(0 <= t.momentum < 1, "train.momentum", t.momentum, "not in [0, 1)")
    check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    check(t.cosine_cycles >= 0, "train.cosine_cycles", t.cosine_cycles, "must be >= 0")
    check(0 <= t.ema_decay < 1, "train.ema_decay", t.ema_decay, "not in [0, 1)")
    check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
    precisions = ("auto", "no", "fp16", "bf16")
    check(t.mixed_precision in precisions, "train.mixed_precision", t.mixed_precision,
          f"one of {', '.join(precisions)}")  # fmt: skip
    for key in ("channels_last", "sync_bn", "keep_host_memory", "prefetch", "graph_batches"):
        value = getattr(t, key)
        check(value in (True, False, "auto"), f"train.{key}", value, "true, false or auto")
    check(t.compile_mode in COMPILE_MODES, "train.compile_mode", t.compile_mode,
          f"one of {', '.join(COMPILE_MODES)}")  # fmt: skip
    check(t.compile or t.compile_mode == "default", "train.compile_mode", t.compile_mode,
          "needs train.compile=true")  # fmt: skip
    check(t.clip_grad_norm >= 0, "train.clip_grad_norm", t.clip_grad_norm, "must be >= 0 (0 = off)")
    check(0 < cfg.ssl.threshold <= 1, "ssl.threshold", cfg.ssl.threshold, "not in (0, 1]")
    check(cfg.ssl.lambda_u >= 0, "ssl.lambda_u", cfg.ssl.lambda_u, "must be >= 0")
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if hasattr(section, "validate"):
            section.validate()
    check_world_size(cfg, world_size)
    check_backbones(cfg)


def check_backbones(cfg: Config) -> None:
    """Every `*backbone` key of every section names a timm model (ours are registered by
    importing rsmatch.models), so a typo stops the run before any data is decoded."""
    import timm

    import rsmatch.models  # noqa: F401  (registers the WRNs with timm)

    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        for g in dataclasses.fields(section):
            name = getattr(section, g.name)
            if g.name.endswith("backbone") and isinstance(name, str) and not timm.is_model(name):
                hint = did_you_mean(name, timm.list_models())
                check(False, f"{f.name}.{g.name}", name, f"not a timm model{hint}")


def check_world_size(cfg: Config, world_size: int) -> None:
    """Global batch sizes split evenly over the processes."""
    for key in ("batch_size", "eval_batch_size"):
        value = getattr(cfg.train, key)
        check(value % world_size == 0, f"train.{key}", value,
              f"global batch sizes must divide by the {world_size} processes")  # fmt: skip


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def as_saved(cfg: Config) -> dict[str, Any]:
    """`cfg` as its config.yaml reads back (`yaml.safe_load`): what a resume or a grid compares
    a run folder's file with."""
    return yaml.safe_load(dump_yaml(to_dict(cfg)))


def flatten(tree: dict, whole: tuple[str, ...] = (), prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}. The dotted keys in `whole` (a grid varies
    `data.synthetic` as one value) and empty mappings stay one value."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in whole:
            out.update(flatten(v, whole, f"{key}."))
        else:
            out[key] = v
    return out


def flat_config(tree: dict) -> dict[str, Any]:
    """A config's dotted keys with `data.synthetic` one value: a grid axis sets it whole, and a
    resume compares it whole."""
    return flatten(tree, whole=("data.synthetic",))


# --- docs ----------------------------------------------------------------------------------


def config_docs() -> str:
    """Markdown reference of every key, generated from the dataclasses (docs/config.md)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `python -m rsmatch.config` from `rsmatch/config.py` and the config",
        "dataclasses of the registered algorithms; do not edit.",
        "Set keys in YAML or override them on the command line as `section.key=value`.",
        "Values are read as YAML 1.2: only `true`/`false` are booleans (`no` is the text `no`),",
        "`010` is the integer 10, `1e-3` is a float, and `1:30`, `1:30.5` or `0b101` are text,",
        "not numbers. Float keys take finite numbers only (`.inf` and `.nan` are refused).",
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

    section(config_class(), "")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        prog="python -m rsmatch.config",
        description="Print the reference of every config key (docs/config.md), generated from "
        "the config dataclasses: python -m rsmatch.config > docs/config.md",
    ).parse_args()
    print(config_docs(), end="")
