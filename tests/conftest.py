"""Shared fixtures: tiny offline image sources and configs that train in seconds."""

import os

# Hub variables are read at import time: no test may reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# torch.compile's on-disk cache (torch 2.14.1) is not keyed on the vector ISA that ATen and
# inductor use: kernels compiled under ATEN_CPU_CAPABILITY=avx2 crashed a later run without
# it, and the reverse trained to NaN. Each session compiles into its own folder, as on a fresh
# CI machine (its processes inherit it), unless one was chosen.
import tempfile  # noqa: E402

INDUCTOR_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    INDUCTOR_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(
        prefix="rsmatch-tests-inductor-"
    )

# Every torchrun or `accelerate launch` leaves a torchelastic_* log folder in its temporary
# directory (13 per suite run): the processes tests start get one folder, removed at the end.
# This process keeps its own, read now, before TMPDIR changes.
tempfile.gettempdir()
CHILD_TMP = os.environ["TMPDIR"] = tempfile.mkdtemp(prefix="rsmatch-tests-tmp-")

import importlib.util  # noqa: E402
import io  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from rsmatch.config import Config, load_config  # noqa: E402

CLASSES = ["cat", "dog", "ship"]
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def pytest_unconfigure(config: pytest.Config) -> None:
    if INDUCTOR_CACHE is not None:
        shutil.rmtree(INDUCTOR_CACHE, ignore_errors=True)
    shutil.rmtree(CHILD_TMP, ignore_errors=True)


def needs_cuda(test):
    """A test that runs only on a CUDA GPU: skipped without one, and selected by `-m gpu`
    (tools/gpu_check.sh runs `pytest -m gpu tests/`)."""
    import torch

    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.gpu(skip(test))


# A `device` parameter that runs only on a CUDA GPU (selected by `-m gpu`, like `needs_cuda`).
ON_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])  # fmt: skip


def load_tool(name: str):
    """tools/NAME.py as a module (tools/ is not a package; registered first, as @dataclass
    looks its module up)."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_bytes(
    size: tuple[int, int], fill: int | tuple[int, ...] | None = None, mode: str = "RGB"
) -> bytes:
    """A PNG, `size` = (height, width): random RGB pixels, or every pixel `fill` in `mode`."""
    if fill is None:
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    else:
        image = Image.new(mode, size[::-1], fill)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(rng: np.random.Generator, colour: int, synthetic: bool) -> bytes:
    """A 32x32 image whose dominant channel encodes the class; synthetic ones are smoother."""
    pixels = rng.integers(0, 90, (32, 32, 3))
    pixels[..., colour] += 120
    if synthetic:
        pixels = (pixels + np.roll(pixels, 1, axis=0) + np.roll(pixels, 1, axis=1)) // 3 + 30
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=75)
    return buf.getvalue()


def write_class_folder(root: Path, per_class: int, seed: int, synthetic: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i:04d}.jpg").write_bytes(_jpeg(rng, c, synthetic))
    return root


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    write_class_folder(root / "real" / "train", 30, seed=0)
    write_class_folder(root / "real" / "test", 10, seed=1)
    write_class_folder(root / "gen_a", 12, seed=2, synthetic=True)
    write_class_folder(root / "gen_b", 12, seed=3, synthetic=True)
    return {"real": root / "real", "gen_a": root / "gen_a", "gen_b": root / "gen_b"}


@pytest.fixture(autouse=True)
def _in_the_repository(monkeypatch):
    """Tests name the shipped configs and tools as the README's commands do (`configs/demo.yaml`):
    run from the repository's root wherever pytest was started."""
    monkeypatch.chdir(ROOT)


@pytest.fixture(autouse=True)
def _no_thread_note(monkeypatch):
    """The trainer notes on stderr when OMP_NUM_THREADS holds it below the cores' share; a
    suite started with it set (tools/mutation.sh sets 1) would see that note beside the one
    error line many tests expect. This process's threads are set already; processes a test
    starts take torch's default."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Each test builds its Accelerator with its own precision; Accelerate keeps one global
    state per process, which a later Accelerator with another precision may not change."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_overrides(sources: dict[str, Path], out: Path, **extra: object) -> list[str]:
    """A config that trains a few steps in seconds on the tiny sources."""
    base = {
        "data.real": str(sources["real"]),
        "data.synthetic": f"{{a: {sources['gen_a']}, b: {sources['gen_b']}}}",
        "data.labels_per_class": 4,
        "data.replace_ratio": 0.5,
        "model.backbone": "wrn10_1",
        "model.bn_momentum": 0.1,
        "rsmatch.detector_backbone": "wrn10_1",
        "rsmatch.queue_length": 4,
        "rsmatch.queue_picks": 2,
        "train.output_dir": str(out),
        "train.steps": 4,
        "train.batch_size": 6,
        "train.uratio": 2,
        "train.eval_every": 2,
        "train.log_every": 1,
        "train.save_every": 2,
        "train.eval_batch_size": 16,
        "train.progress": False,
        "train.mixed_precision": "no",  # the same arithmetic on every CI machine
        "train.channels_last": False,
        "ssl.threshold": 0.5,
        "rsmatch.detector_threshold": 0.5,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_config(sources: dict[str, Path], out: Path, **extra: object) -> Config:
    return load_config(None, tiny_overrides(sources, out, **extra))


def loaded_in_a_fresh_process(
    module: str, watched: tuple[str, ...], cwd: Path, argv: list[str] | None = None
) -> tuple[str, str]:
    """Import `module` in a fresh interpreter and, given `argv`, call its `main(argv)`:
    ("[EXIT_CODE ][the watched modules loaded by then]", its stderr). For what must happen
    before a heavy import."""
    call = "" if argv is None else f"print(cli.main({argv!r}), end=' ')\n"
    code = (
        f"import sys, {module} as cli\n{call}print([m for m in {watched!r} if m in sys.modules])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    return res.stdout.strip(), res.stderr


def failure(res: subprocess.CompletedProcess) -> str:
    """The lines naming an error first (a crash's cause is far above its C++ stack), then the tail."""
    errors = [line for line in res.stderr.splitlines() if "Error" in line or "error:" in line]
    return "\n".join([*errors[:12], "...", res.stderr[-1500:]])


@pytest.fixture
def train_in_process(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture):
    """`rsmatch-train ARGS` run in this process from `cwd`: its exit code and what it wrote on
    file descriptors 1 and 2, as `subprocess.run` returns them. A fresh process spends ~7 s on
    imports before its first check; this takes well under one. What only a fresh process shows
    (what libraries print at import) is left to the tests that launch one.

    Warnings: pytest records them instead of printing them, so they are caught here under a
    fresh interpreter's filters (each shown once, DeprecationWarning and its kin hidden) and
    added to stderr, where a user would see them."""
    import warnings

    from rsmatch.experiment import train_in_process as train_here  # a fresh Accelerate state

    def run(args: list[str], cwd: Path, env: dict[str, str] | None = None):
        """`env`: set for this run only."""
        monkeypatch.chdir(cwd)
        capfd.readouterr()
        with monkeypatch.context() as only_this_run, warnings.catch_warnings(record=True) as caught:
            for key, value in (env or {}).items():
                only_this_run.setenv(key, value)
            warnings.resetwarnings()
            warnings.simplefilter("default")
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                          ResourceWarning):  # fmt: skip
                warnings.simplefilter("ignore", quiet)
            try:
                code = train_here(args)
            except SystemExit as e:  # argparse's usage errors
                code = e.code
        out, err = capfd.readouterr()
        err += "".join(
            warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught
        )
        return subprocess.CompletedProcess(args, code, out, err)

    return run
