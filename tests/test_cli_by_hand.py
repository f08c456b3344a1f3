"""The command-line entry points by hand: parsing, defaults, exit codes, one-line errors,
checks before work, stdout against stderr (a mutation audit of rsmatch/cli/*.py)."""

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from rsmatch.cli import HelpWithDefaults, at_least, run_process, stdout_to_stderr
from rsmatch.cli import analyze as analyze_cli
from rsmatch.cli import build_benchmark as bb
from rsmatch.cli import experiment as experiment_cli
from rsmatch.cli import filter as filter_cli
from rsmatch.cli import report as report_cli
from rsmatch.cli import throughput as throughput_cli
from rsmatch.cli import train as train_cli
from rsmatch.config import ConfigError

from .conftest import ROOT, loaded_in_a_fresh_process, tiny_overrides


class StubTrainer:
    """rsmatch-train's Trainer up to fit, recording what the CLI passes it."""

    seen: dict = {}

    def __init__(self, cfg):
        print("library noise")  # what a library prints while the trainer is built
        StubTrainer.seen["cfg"] = cfg
        self.accelerator = SimpleNamespace(is_main_process=True, end_training=lambda: None)

    def fit(self, resume=None):
        StubTrainer.seen["resume"] = resume
        return {"step": 4}


@pytest.fixture
def stub_train(monkeypatch):
    StubTrainer.seen = {}
    monkeypatch.setattr("rsmatch.trainer.Trainer", StubTrainer)
    monkeypatch.delenv("RANK", raising=False)
    return StubTrainer.seen


# ---------------------------------------------------------------- rsmatch-train


def test_train_resume_and_resume_from_exclude_each_other(capsys):
    """--resume with --resume-from is argparse's one-line error naming both, exit 2."""
    with pytest.raises(SystemExit) as e:
        train_cli.parse_args(["--resume", "--resume-from", "3"])
    assert e.value.code == 2
    assert "error: --resume and --resume-from exclude each other" in capsys.readouterr().err


def test_train_resume_takes_only_its_two_modes(capsys):
    """--resume=auto-fallback is kept; --resume=newest is refused with exit 2 naming --resume."""
    assert train_cli.parse_args(["--resume=auto-fallback"]).resume == "auto-fallback"
    assert train_cli.parse_args([]).resume is None
    with pytest.raises(SystemExit) as e:
        train_cli.parse_args(["--resume=newest"])
    assert e.value.code == 2 and "argument --resume: invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, resume",
    [([], None), (["--resume"], "latest"), (["--resume-from", "2"], 2),
     (["--resume=auto-fallback"], "auto-fallback")],
)  # fmt: skip
def test_train_passes_the_resume_choice_to_fit(
    stub_train, sources, tmp_path, monkeypatch, flags, resume
):
    """fit gets None, 'latest', the step number, or 'auto-fallback' as the flags say."""
    checked = []  # a resumed run needs a checkpoint: the folder check is not the CLI's
    monkeypatch.setattr("rsmatch.runfolder.check_run_folder", lambda cfg, r: checked.append(r))
    assert train_cli.main([*flags, *tiny_overrides(sources, tmp_path / "run")]) == 0
    assert stub_train["resume"] == resume and checked == [resume]


def test_train_stdout_is_the_metrics_line_only(stub_train, sources, tmp_path, capfd):
    """The metrics JSON is the only stdout; what the trainer prints goes to stderr."""
    capfd.readouterr()
    assert train_cli.main(tiny_overrides(sources, tmp_path / "run")) == 0
    out, err = capfd.readouterr()
    assert out == '{"step": 4}\n'
    assert "library noise" in err


def test_train_other_processes_print_no_metrics(stub_train, sources, tmp_path, capfd, monkeypatch):
    """Only the main process prints the metrics line: another exits 0 with empty stdout."""
    monkeypatch.setattr(StubTrainer, "fit", lambda self, resume=None: {"step": 4})
    orig = StubTrainer.__init__

    def not_main(self, cfg):
        orig(self, cfg)
        self.accelerator.is_main_process = False

    monkeypatch.setattr(StubTrainer, "__init__", not_main)
    capfd.readouterr()
    assert train_cli.main(tiny_overrides(sources, tmp_path / "run")) == 0
    assert capfd.readouterr().out == ""


def test_train_config_error_is_one_stderr_line_exit_2(stub_train, sources, tmp_path, capfd):
    """A bad value: exit 2, one stderr line naming the key, nothing on stdout, no trainer."""
    capfd.readouterr()
    argv = tiny_overrides(sources, tmp_path / "run", **{"train.seed": -1})
    assert train_cli.main(argv) == 2
    out, err = capfd.readouterr()
    assert out == "" and err == "rsmatch-train: error: train.seed=-1: must be in [0, 2**32)\n"
    assert "cfg" not in stub_train and not (tmp_path / "run").exists()


def test_train_rank_0_reports_at_once(stub_train, sources, tmp_path, capsys, monkeypatch):
    """Rank 0 (RANK unset or 0) prints its error without the other ranks' wait."""
    monkeypatch.setattr(train_cli, "OTHER_RANKS_WAIT_S", 3.0)
    monkeypatch.setenv("RANK", "0")
    start = time.monotonic()
    argv = tiny_overrides(sources, tmp_path / "run", **{"train.seed": -1})
    assert train_cli.main(argv) == 2
    assert time.monotonic() - start < 2.5
    assert capsys.readouterr().err.startswith("rsmatch-train: error: train.seed=-1")


def test_train_ignored_override_warnings_only_on_rank_0(stub_train, tmp_path, capsys, monkeypatch):
    """Rank 1 does not repeat the ignored-override warnings rank 0 prints."""
    monkeypatch.setenv("RANK", "1")
    argv = ["--config", "configs/demo.yaml", f"train.output_dir={tmp_path / 'run'}",
            "algorithm=fixmatch", "rsmatch.queue_length=8"]  # fmt: skip
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert train_cli.main(argv) == 0
    assert "warning" not in capsys.readouterr().err


# ---------------------------------------------------------------- rsmatch-throughput


class StubThroughputTrainer:
    seen: dict = {}

    def __init__(self, cfg):
        print("deepspeed noise")
        StubThroughputTrainer.seen["cfg"] = cfg
        self.algorithm = SimpleNamespace(
            views=SimpleNamespace(unlabeled=True), forward_images=lambda b, u: b + 2 * u
        )
        self.precision = SimpleNamespace(mixed_precision="no", channels_last=False)
        self.world = 1
        self.accelerator = SimpleNamespace(is_main_process=True, end_training=lambda: None)


@pytest.fixture
def stub_throughput(monkeypatch):
    seen = StubThroughputTrainer.seen = {}
    monkeypatch.setattr("rsmatch.trainer.Trainer", StubThroughputTrainer)

    def time_steps(trainer, warmup, steps):
        seen["warmup"], seen["steps"] = warmup, steps
        return 2.0

    monkeypatch.setattr(throughput_cli, "_time_steps", time_steps)
    return seen


def test_throughput_defaults_and_arithmetic(stub_throughput, sources, tmp_path, capfd):
    """Defaults 5 warm-up and 20 measured steps; B=6, mu=2 in 2 s: 18*20/2 samples/s."""
    capfd.readouterr()
    argv = tiny_overrides(sources, tmp_path / "run", **{"train.progress": True})
    assert throughput_cli.main(argv) == 0
    out, err = capfd.readouterr()
    assert (stub_throughput["warmup"], stub_throughput["steps"]) == (5, 20)
    assert stub_throughput["cfg"].train.progress is False  # the bar is forced off
    result = json.loads(out)  # the one stdout line; the trainer's prints went to stderr
    assert out.count("\n") == 1 and "deepspeed noise" in err
    assert result["s_per_step"] == 0.1 and result["samples_per_s"] == 180.0
    assert result["forward_images_per_s"] == 300.0  # (6 + 2*12) * 20 / 2
    assert (result["batch_size"], result["uratio"], result["processes"]) == (6, 2, 1)


def test_throughput_config_error_is_exit_2_on_stderr(stub_throughput, sources, tmp_path, capfd):
    """A bad override: exit 2, one stderr line, empty stdout, no step timed."""
    capfd.readouterr()
    argv = tiny_overrides(sources, tmp_path / "run", **{"train.seed": -1})
    assert throughput_cli.main(argv) == 2
    out, err = capfd.readouterr()
    assert out == ""
    assert err == "rsmatch-throughput: error: train.seed=-1: must be in [0, 2**32)\n"
    assert "steps" not in stub_throughput


# ---------------------------------------------------------------- rsmatch-filter


def test_filter_defaults():
    """--keep all, batch 256, 0 workers, precision auto, no threshold, not private."""
    a = filter_cli.parse_args(["--detector", "d", "--images", "i", "--out", "o"])
    assert (a.keep, a.batch_size, a.workers, a.precision) == ("all", 256, 0, "auto")
    assert (a.threshold, a.keep_fraction, a.skip_corrupt, a.private) == (None, None, False, False)
    assert a.out == Path("o") and a.split is None


def test_filter_threshold_and_keep_fraction_exclude_each_other(capsys):
    """Both given: argparse's exit 2 naming the two flags."""
    with pytest.raises(SystemExit) as e:
        filter_cli.parse_args(["--detector", "d", "--images", "i", "--out", "o",
                               "--threshold", "0.5", "--keep-fraction", "0.5"])  # fmt: skip
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def _check(tmp_path, *extra):
    base = ["--detector", "d", "--out", str(tmp_path / "out"), *extra]
    return filter_cli.check(filter_cli.parse_args(base))


@pytest.mark.parametrize(
    "extra, message",
    [([], "--images or --labels: give exactly one"),
     (["--images", "i", "--labels", "real=r"], "--images or --labels: give exactly one"),
     (["--images", "i", "--threshold", "1.5"], "--threshold 1.5: not in [0, 1]"),
     (["--images", "i", "--threshold", "-0.1"], "--threshold -0.1: not in [0, 1]"),
     (["--images", "i", "--keep-fraction", "0"], "--keep-fraction 0.0: not in (0, 1]"),
     (["--images", "i", "--keep-fraction", "1.01"], "--keep-fraction 1.01: not in (0, 1]"),
     (["--labels", "real=r", "ddpm"], "--labels 'ddpm': expected NAME=SOURCE"),
     (["--labels", "real=r", "ddpm=a", "ddpm=b"], "--labels: 'ddpm' given twice")],
)  # fmt: skip
def test_filter_option_checks_name_the_flag(tmp_path, extra, message):
    """Each option error is a ConfigError whose text names the flag and value."""
    with pytest.raises(ConfigError) as e:
        _check(tmp_path, *extra)
    assert str(e.value) == message


@pytest.mark.parametrize(
    "extra",
    [["--threshold", "0"], ["--threshold", "1"], ["--keep-fraction", "1"]],
)
def test_filter_range_ends_are_accepted(tmp_path, extra):
    """Threshold 0 and 1 and keep-fraction 1 are valid."""
    _check(tmp_path, "--images", "i", *extra)


def test_filter_checks_options_before_the_detector(tmp_path, capsys):
    """Both --images and --labels with a missing detector: the option error, not the detector."""
    argv = ["--detector", str(tmp_path / "nodet"), "--images", "i", "--labels", "real=r",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert filter_cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == "rsmatch-filter: error: --images or --labels: give exactly one\n"
    assert captured.out == "" and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- rsmatch-experiment


def test_experiment_refuses_to_run_under_a_launcher(tmp_path, capsys, monkeypatch):
    """WORLD_SIZE > 1: exit 2 before the grid is even read (a missing grid is not named)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert experiment_cli.main([str(tmp_path / "nogrid.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "rsmatch-experiment: error: rsmatch-experiment runs under accelerate launch"
    )


def test_experiment_arguments_after_the_double_dash_go_to_the_launcher():
    """Everything after `--` is the launcher's, unparsed; --launcher defaults to inline."""
    args, rest = experiment_cli.parse_args(
        ["g.yaml", "--launcher", "accelerate", "--", "--multi_gpu", "--num_processes", "4"]
    )
    assert (args.grid, args.launcher, rest) == (
        "g.yaml",
        "accelerate",
        ["--multi_gpu", "--num_processes", "4"],
    )
    args, rest = experiment_cli.parse_args(["g.yaml"])
    assert (args.launcher, args.dry_run, args.only, rest) == ("inline", False, [], [])


# ---------------------------------------------------------------- rsmatch-analyze


@pytest.fixture
def stub_analyze(monkeypatch, tmp_path):
    """rsmatch.analysis.analyze recording its arguments; tmp_path a run folder with model/."""
    (tmp_path / "model").mkdir()
    for name in ("config.json", "model.safetensors"):  # an export's files (analyze is stubbed)
        (tmp_path / "model" / name).write_text("", encoding="utf-8")
    seen = {}

    def analyze(run, out, samples, per_class, classes, seed):
        seen.update(run=run, out=out, samples=samples, per_class=per_class, classes=classes,
                    seed=seed)  # fmt: skip
        return [out / "tsne.png"]

    monkeypatch.setattr("rsmatch.analysis.analyze", analyze)
    return seen


def test_analyze_defaults_and_streams(stub_analyze, tmp_path, capsys):
    """Defaults RUN/analysis, 1000 samples, 2 per class, classes None, seed 0; paths on stdout,
    the no-detector note on stderr."""
    assert analyze_cli.main([str(tmp_path)]) == 0
    assert stub_analyze == dict(run=tmp_path, out=tmp_path / "analysis", samples=1000,
                                per_class=2, classes=None, seed=0)  # fmt: skip
    captured = capsys.readouterr()
    assert captured.out == f"{tmp_path / 'analysis' / 'tsne.png'}\n"
    assert captured.err.startswith(f"no detector exported in {tmp_path}")


def test_analyze_seed_zero_is_valid_and_negative_is_not(stub_analyze, tmp_path, capsys):
    """--seed 0 passes through; --seed -1 is argparse's exit 2 naming --seed."""
    (tmp_path / "detector").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "detector" / name).write_text("", encoding="utf-8")
    assert analyze_cli.main([str(tmp_path), "--seed", "0", "--classes", "3"]) == 0
    assert (stub_analyze["seed"], stub_analyze["classes"]) == (0, 3)
    assert capsys.readouterr().err == ""  # a detector: no note
    with pytest.raises(SystemExit) as e:
        analyze_cli.main([str(tmp_path), "--seed", "-1"])
    assert e.value.code == 2 and "argument --seed: must be >= 0, got -1" in capsys.readouterr().err


# ---------------------------------------------------------------- rsmatch-report


def test_report_passes_its_options_and_prints_the_readme(tmp_path, capsys, monkeypatch):
    """Default out RUNS/report, --repo-url and the command line passed on; README path on stdout."""
    seen = {}

    def write_report(runs, out, repo_url, command):
        seen.update(runs=runs, out=out, repo_url=repo_url, command=command)
        return out / "README.md"

    monkeypatch.setattr("rsmatch.report.write_report", write_report)
    assert report_cli.main([str(tmp_path), "--repo-url", "https://x/y"]) == 0
    assert seen == dict(runs=tmp_path, out=tmp_path / "report", repo_url="https://x/y",
                        command=f"rsmatch-report {shlex.quote(str(tmp_path))} --repo-url https://x/y")  # fmt: skip
    captured = capsys.readouterr()
    assert captured.out == f"{tmp_path / 'report' / 'README.md'}\n" and captured.err == ""


def test_report_missing_folder_is_exit_2_on_stderr(tmp_path, capsys):
    """A missing RUNS_DIR: one stderr line naming it, nothing on stdout."""
    assert report_cli.main([str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"rsmatch-report: error: {tmp_path / 'nope'}: no such folder\n"


@pytest.mark.parametrize("out", ["afile", "afile/report"])
def test_report_out_that_cannot_be_a_folder_is_exit_2(tmp_path, capsys, out):
    """--out a file, or under one: a traceback (NotADirectoryError) before, one line now."""
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    out = tmp_path / out
    assert report_cli.main([str(tmp_path), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"rsmatch-report: error: --out {out}: {tmp_path / 'afile'} is a file, not a folder\n"
    )


# ---------------------------------------------------------------- rsmatch-build-benchmark


def test_build_config_keys_with_dashes_and_flags_win(tmp_path):
    """--config keys may be spelled with dashes; a flag beats the file; the command is kept."""
    cfg = tmp_path / "b.yaml"
    cfg.write_text("replace-ratio: 0.3\nseed: 7\nskip_corrupt: true\n", encoding="utf-8")
    argv = ["--config", str(cfg), "--replace-ratio", "0.5", "--out", "o"]
    opts = bb.parse_args(argv)
    assert (opts.replace_ratio, opts.seed, opts.skip_corrupt) == (0.5, 7, True)
    assert opts.command == ["rsmatch-build-benchmark", *argv]


def test_build_config_error_is_exit_2_on_stderr(tmp_path, capsys):
    """An unreadable --config: exit 2, one stderr line naming the file."""
    assert bb.main(["--config", str(tmp_path / "none.yaml")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(
        f"rsmatch-build-benchmark: error: --config {tmp_path / 'none.yaml'}: cannot read"
    )


# ---------------------------------------------------------------- rsmatch.cli helpers


def test_help_with_defaults_shows_only_real_defaults(capsys, monkeypatch):
    """0 and text defaults are shown; None, False, [] and a help that says 'default' are not."""
    monkeypatch.setenv("COLUMNS", "200")
    ap = argparse.ArgumentParser(prog="p", formatter_class=HelpWithDefaults)
    ap.add_argument("pos", nargs="?", default="P", help="positional")
    ap.add_argument("--zero", type=int, default=0, help="zero")
    ap.add_argument("--text", default="abc", help="text")
    ap.add_argument("--none", help="none")
    ap.add_argument("--flag", action="store_true", help="flag")
    ap.add_argument("--many", action="append", default=[], help="many")
    ap.add_argument("--said", default=5, help="five (default: five)")
    text = ap.format_help()
    assert "zero (default: 0)" in text and "text (default: abc)" in text
    assert "positional (default" not in text and "five (default: five)\n" in text
    assert text.count("(default:") == 3


def test_at_least_accepts_the_bound():
    """at_least(n) returns n itself and refuses n - 1 and non-integers."""
    assert at_least(0)("0") == 0 and at_least(2)("2") == 2
    with pytest.raises(argparse.ArgumentTypeError, match=r"^must be >= 2, got 1$"):
        at_least(2)("1")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^expected an integer, got '1.5'$"):
        at_least(0)("1.5")


def test_stdout_to_stderr_moves_file_descriptor_1_too(capfd):
    """Inside it, print and a raw write to fd 1 land on stderr; stdout works again after."""
    capfd.readouterr()
    with stdout_to_stderr():
        print("py")
        os.write(1, b"fd\n")
    print("after")
    out, err = capfd.readouterr()
    assert out == "after\n" and "py\n" in err and "fd\n" in err


def test_run_process_exit_codes(monkeypatch, capsys):
    """An entry's code is the exit code; a crash is a traceback and 1; SystemExit passes."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as e:
        run_process(lambda: 3)
    assert e.value.code == 3

    def crash():
        raise RuntimeError("boom")

    with pytest.raises(SystemExit) as e:
        run_process(crash)
    assert e.value.code == 1 and "RuntimeError: boom" in capsys.readouterr().err

    def usage():
        sys.exit(2)

    with pytest.raises(SystemExit) as e:
        run_process(usage)
    assert e.value.code == 2


@pytest.mark.parametrize(
    "cli", ["train", "filter", "report", "analyze", "experiment", "throughput", "build_benchmark"]
)
def test_help_and_usage_errors_load_neither_torch_nor_datasets(cli):
    """`--help` and a usage error are answered before the training stack is imported (which
    takes seconds of CPU): the module alone imports neither torch nor datasets."""
    out, err = loaded_in_a_fresh_process(f"rsmatch.cli.{cli}", ("torch", "datasets"), ROOT)
    assert out == "[]", out + err


# ---------------------------------------------------------------- --config given twice


@pytest.mark.parametrize("cli, prog, overrides", [
    (train_cli, "rsmatch-train", "key=value"),
    (throughput_cli, "rsmatch-throughput", "key=value"),
    (bb, "rsmatch-build-benchmark", "these options (e.g. --seed 1)"),  # it takes no key=value
])  # fmt: skip
def test_a_second_config_file_is_refused_not_silently_taken(capsys, cli, prog, overrides):
    """`--config a.yaml --config b.yaml` ran with b.yaml alone (files are not merged)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["--config", "a.yaml", "--config=b.yaml"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and err == (
        f"{prog}: error: --config given twice (a.yaml, b.yaml): one file per command; override "
        f"its keys with {overrides}"
    )
