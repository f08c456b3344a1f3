"""Bad numbers and names on the command line: one line naming the flag, exit 2, nothing written
(each of these was a traceback, a crash after partial output, or nonsense with exit 0)."""

import re

import pytest

from rsmatch import hub
from rsmatch.cli import analyze, build_benchmark, report, throughput, train
from rsmatch.cli import filter as filter_cli
from rsmatch.config import ConfigError
from rsmatch.hardware import resolve


@pytest.mark.parametrize(
    "tool, argv, message",
    [
        (throughput, ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (throughput, ["--steps", "-2"], "argument --steps: must be >= 1, got -2"),
        (throughput, ["--warmup", "x"], "argument --warmup: expected an integer, got 'x'"),
        (filter_cli, ["--detector", "d", "--out", "OUT", "--workers", "-1"], "argument --workers: must be >= 0"),
        (analyze, ["RUN", "--out", "OUT", "--per-class", "0"], "argument --per-class: must be >= 1"),
        (analyze, ["RUN", "--out", "OUT", "--samples", "0"], "argument --samples: must be >= 2"),
    ],
)  # fmt: skip
def test_counted_options_are_checked_by_argparse(tmp_path, capsys, tool, argv, message):
    argv = [
        str(tmp_path / "out") if a == "OUT" else str(tmp_path) if a == "RUN" else a for a in argv
    ]
    with pytest.raises(SystemExit) as exit_:
        tool.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_report_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    assert report.main([str(tmp_path), "--out", str(tmp_path / "afile")]) == 2
    assert (
        "--out" in capsys.readouterr().err
        and (tmp_path / "afile").read_text(encoding="utf-8") == "x"
    )


def test_push_checks_the_repo_id_before_staging(tmp_path, capsys):
    assert hub.main([str(tmp_path), "bad repo name!!"]) == 2
    assert "repo 'bad repo name!!'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_push_targets_are_checked_before_any_work(sources, tmp_path, capsys):
    """A bad --push-to-hub id used to fail only after the whole build or scoring."""
    out = tmp_path / "out"
    argv = ["--real", str(sources["real"]), "--replace-ratio", "0", "--labels-per-class", "4",
            "--out", str(out), "--push-to-hub", "bad id!"]  # fmt: skip
    assert build_benchmark.main(argv) == 2
    assert filter_cli.main(["--detector", "d", "--images", "i", "--out", str(out),
                            "--push-to-hub", "bad id!"]) == 2  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("--push-to-hub 'bad id!': " in line for line in err)
    assert not out.exists()


def test_precision_errors_name_the_tools_flag():
    with pytest.raises(ConfigError, match=r"^--precision='fp16': fp16 autocast needs a CUDA GPU"):
        resolve("fp16", False, cuda=False, key="--precision")
    warning = resolve("bf16", False, cuda=False, cpu_bf16=False, key="--precision").warning
    assert warning.startswith("--precision=bf16 on a ") and "--precision=auto picks" in warning


def test_overrides_may_come_before_and_after_the_options():
    """`rsmatch-train ... --resume train.steps=N`, as one appends to an earlier command line."""
    args = train.parse_args(["train.steps=3", "--config", "c.yaml", "train.seed=1", "--resume",
                             "train.lr=0.1"])  # fmt: skip
    assert args.config == "c.yaml" and args.resume == "latest"
    assert args.overrides == ["train.steps=3", "train.seed=1", "train.lr=0.1"]


@pytest.mark.parametrize(
    "argv, resume, overrides",
    [
        (["--resume", "latest"], "latest", []),
        (["--resume", "auto-fallback", "train.steps=8"], "auto-fallback", ["train.steps=8"]),
        (["--resume=auto-fallback"], "auto-fallback", []),
        (["train.lr=0.1", "--resume"], "latest", ["train.lr=0.1"]),
        (["--resume", "--config", "c.yaml"], "latest", []),
        (["train.seed=2"], None, ["train.seed=2"]),
    ],
)
def test_resume_takes_its_value_with_or_without_the_equals_sign(argv, resume, overrides):
    """`--resume latest` was read as `--resume` then an override named `latest` (exit 2)."""
    args = train.parse_args(argv)
    assert args.resume == resume and args.overrides == overrides


def test_a_resume_value_not_offered_names_the_choices(capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--resume", "oldest", "train.steps=8"])
    assert stop.value.code == 2
    # Python 3.11 quotes the choices, later ones do not
    choices = r"\(choose from '?latest'?, '?auto-fallback'?\)"
    err = capsys.readouterr().err
    assert re.search(rf"error: argument --resume: invalid choice: 'oldest' {choices}\n$", err)


@pytest.mark.parametrize(
    "parse, shown, hidden",
    [
        (lambda a: filter_cli.parse_args(a), "images per batch and process (default: 256)",
         "--out OUT             output folder (must not exist) (default"),
        (lambda a: build_benchmark.parse_args(a), "generation seed (default: 0)",  # 0 is a default
         "(default: False)"),
        (lambda a: throughput.main(a), "measured steps (default: 20)", "(default: None)"),
    ],
)  # fmt: skip
def test_help_shows_each_default_once(parse, shown, hidden, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(shown.split()) in text and " ".join(hidden.split()) not in text
    assert "(default: the detector's, 0.5) (default" not in text  # said in the help already
