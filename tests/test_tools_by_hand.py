"""The measurement tools by hand: medians, ratios and their names, interleaving, argument
round trips, the GPU check's step budgets, statuses and JSON summary, the study summary
(a mutation audit of tools/*.py; no benchmark is run: workers and steps are stubbed)."""

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import pytest
import torch

from .conftest import ROOT, load_tool

bench = load_tool("bench_vs_usb")
gpu_check = load_tool("gpu_check")
summarize = load_tool("summarize_study")
profile_step = load_tool("profile_step")


# -- bench_vs_usb.py ------------------------------------------------------------------------------
class FakeWorker:
    """A worker process answering `run N` with the next of its seconds; writes are logged."""

    def __init__(self, name, seconds, log):
        self.name, self.seconds, self.log = name, iter(seconds), log
        self.stdin = self.stdout = self
        self.closed = False

    def write(self, text):
        self.log.append((self.name, text))

    def flush(self):
        pass

    def close(self):
        self.closed = True

    def wait(self):
        return 0

    def __iter__(self):
        return self

    def __next__(self):
        return f"seconds {next(self.seconds)}\n"


def _bench_args(**kw):
    base = dict(only=list(bench.CONTENDERS), variant=None, rounds=3, steps=5, batch_size=64,
                uratio=7, threads=2, precision="auto", compile=None, usb_keep_host_memory=False,
                backbone=bench.USB_BACKBONE)  # fmt: skip
    return argparse.Namespace(**(base | kw))


def _drive(monkeypatch, tmp_path, seconds, **kw):
    """drive() over fake workers with these seconds per round; (summary, write log, started)."""
    log, started = [], []
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "bin" / "python").write_text("", encoding="utf-8")
    monkeypatch.setattr(bench, "USB_VENV", tmp_path)

    def start(kind, args, override=None):
        started.append((kind, override))
        name = f"{kind} {override}" if override else kind
        return FakeWorker(name, seconds[name], log)

    monkeypatch.setattr(bench, "_start", start)
    monkeypatch.setattr(bench, "_warm_up", lambda workers: None)
    monkeypatch.setattr(bench, "_machine", lambda: "a test machine")
    return bench.drive(_bench_args(**kw)), log, started


def test_drive_reports_medians_and_each_ratio_the_right_way_up(monkeypatch, tmp_path, capsys):
    """Medians (not means, not first or last), and bare/fixmatch, usb/fixmatch,
    rsmatch/fixmatch with fixmatch as the denominator; the round lines on stdout."""
    seconds = {"bare": [0.12344, 0.9, 0.2], "usb": [2.0, 1.0, 9.0],
               "fixmatch": [0.4, 0.5, 3.0], "rsmatch": [0.6, 0.7, 0.1]}  # fmt: skip
    got, _, _ = _drive(monkeypatch, tmp_path, seconds)
    assert got["median_s_per_step"] == {"bare": 0.2, "usb": 2.0, "fixmatch": 0.5, "rsmatch": 0.6}
    assert got["ratios"] == {
        "bare / rsmatch fixmatch (>= 0.9 wanted)": 0.4,
        "usb / rsmatch fixmatch (speed-up over USB)": 4.0,
        "rsmatch / rsmatch fixmatch (<= 1.2 wanted)": 1.2,
    }
    assert got["machine"] == "a test machine" and got["rounds"] == 3
    assert got["steps_per_round"] == 5 and got["batch_size"] == 64 and got["uratio"] == 7
    assert got["threads"] == 2 and got["rsmatch_precision"] == "auto"
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"round": 0, "step": "bare", "s_per_step": 0.1234}
    assert lines[-1] == {"round": 2, "step": "rsmatch", "s_per_step": 0.1}
    assert len(lines) == 12


def test_drive_median_of_two_rounds_is_their_mean(monkeypatch, tmp_path):
    """With an even number of rounds the median is the middle pair's mean, to 4 digits."""
    seconds = {"bare": [0.2, 0.4], "fixmatch": [0.80004, 0.80012]}
    got, _, _ = _drive(monkeypatch, tmp_path, seconds, only=["bare", "fixmatch"], rounds=2)
    assert got["median_s_per_step"] == {"bare": 0.3, "fixmatch": 0.8001}
    assert got["ratios"] == {"bare / rsmatch fixmatch (>= 0.9 wanted)": 0.375}  # 3 places


def test_gpu_scale_steps_keep_four_significant_digits(monkeypatch, tmp_path, capsys):
    """A GPU step of ~0.016 s: 0.016034 is printed 0.01603 (4 decimals gave 0.016), so a ratio
    taken from the printed medians is within 0.01%, not 0.6%."""
    seconds = {"fixmatch": [0.016034], "rsmatch": [0.025249]}
    got, _, _ = _drive(monkeypatch, tmp_path, seconds, only=["fixmatch", "rsmatch"], rounds=1)
    assert got["median_s_per_step"] == {"fixmatch": 0.01603, "rsmatch": 0.02525}
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["s_per_step"] for x in lines] == [0.01603, 0.02525]


def test_drive_gives_no_ratio_without_fixmatch(monkeypatch, tmp_path):
    """Every ratio is over FixMatch: without it (bare and usb only) there are none."""
    got, _, _ = _drive(
        monkeypatch, tmp_path, {"bare": [1.0], "usb": [2.0]}, only=["bare", "usb"], rounds=1
    )
    assert got["ratios"] == {} and got["median_s_per_step"] == {"bare": 1.0, "usb": 2.0}


def test_drive_variant_repeats_only_the_chosen_rsmatch_contenders(monkeypatch, tmp_path):
    seconds = {"bare": [1.0], "fixmatch": [2.0], "fixmatch a=b": [4.0]}
    got, _, started = _drive(
        monkeypatch, tmp_path, seconds, only=["bare", "fixmatch"], rounds=1, variant="a=b"
    )
    assert started == [("bare", None), ("fixmatch", None), ("fixmatch", "a=b")]
    assert got["median_s_per_step"] == {"bare": 1.0, "fixmatch": 2.0, "fixmatch a=b": 4.0}


def test_drive_interleaves_the_contenders_round_by_round(monkeypatch, tmp_path):
    """Every round asks each contender once, in --only order, for --steps steps."""
    seconds = {k: [1.0, 1.0] for k in ("bare", "usb", "fixmatch", "rsmatch")}
    _, log, started = _drive(monkeypatch, tmp_path, seconds, rounds=2, steps=7)
    order = ["bare", "usb", "fixmatch", "rsmatch"]
    assert log == [(k, "run 7\n") for k in order * 2]
    assert started == [(k, None) for k in order]


def test_drive_variant_adds_rsmatch_contenders_and_their_ratios(monkeypatch, tmp_path):
    """--variant starts fixmatch and rsmatch once more with the override, timed in the same
    rounds; their ratios are over the variant's own fixmatch; usb/bare are not doubled."""
    v = "train.prefetch=false"
    seconds = {"bare": [1.0], "fixmatch": [2.0], "rsmatch": [3.0],
               f"fixmatch {v}": [4.0], f"rsmatch {v}": [5.0]}  # fmt: skip
    got, log, started = _drive(
        monkeypatch, tmp_path, seconds, only=["bare", "fixmatch", "rsmatch"], rounds=1, variant=v
    )
    assert started == [("bare", None), ("fixmatch", None), ("rsmatch", None),
                       ("fixmatch", v), ("rsmatch", v)]  # fmt: skip
    assert [name for name, _ in log] == [
        "bare",
        "fixmatch",
        "rsmatch",
        f"fixmatch {v}",
        f"rsmatch {v}",
    ]
    assert got["variant"] == v
    assert got["ratios"] == {
        "bare / rsmatch fixmatch (>= 0.9 wanted)": 0.5,
        "rsmatch / rsmatch fixmatch (<= 1.2 wanted)": 1.5,
        f"bare / rsmatch fixmatch {v} (>= 0.9 wanted)": 0.25,
        f"rsmatch {v} / rsmatch fixmatch {v} (<= 1.2 wanted)": 1.25,
    }


def test_drive_closes_every_worker_even_when_one_dies(monkeypatch, tmp_path):
    """A worker that stops answering ends the drive with an error, every stdin closed."""
    workers = {}

    def start(kind, args, override=None):
        workers[kind] = FakeWorker(kind, [] if kind == "rsmatch" else [1.0], [])
        return workers[kind]

    monkeypatch.setattr(bench, "_start", start)
    monkeypatch.setattr(bench, "_warm_up", lambda w: None)
    with pytest.raises(SystemExit, match="^bench_vs_usb: the rsmatch worker died in round 0$"):
        bench.drive(_bench_args(only=["bare", "rsmatch"], rounds=1))
    assert all(w.closed for w in workers.values())


def test_drive_without_a_usb_venv_says_how_to_make_one(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "USB_VENV", tmp_path / "none")
    monkeypatch.setattr(bench, "_start", lambda *a, **k: pytest.fail("started a worker"))
    with pytest.raises(SystemExit, match="no USB venv at .*none; run with --setup-usb first"):
        bench.drive(_bench_args(only=["usb"]))


def test_drive_refuses_another_backbone_beside_usb(monkeypatch, tmp_path):
    """USB's step trains WRN-28-2: a ratio against another classifier would mean nothing."""
    monkeypatch.setattr(bench, "_start", lambda *a, **k: pytest.fail("started a worker"))
    with pytest.raises(SystemExit, match="--backbone wrn10_1 beside usb, whose step is wrn28_2"):
        bench.drive(_bench_args(only=["bare", "usb"], backbone="wrn10_1"))


def test_shared_flags_round_trip_through_the_worker_parser(monkeypatch):
    """What the driver passes its workers parses back to the same settings."""
    args = argparse.Namespace(batch_size=3, uratio=4, threads=5, warmup=6, pool=7, usb_workers=8,
                              precision="bf16", steps=9, rounds=10, compile="reduce-overhead",
                              usb_keep_host_memory=True, backbone="wrn10_1")  # fmt: skip
    seen = []
    monkeypatch.setattr(bench, "worker", seen.append)
    assert bench.main(["--worker", "rsmatch", *bench._shared_flags(args)]) == 0
    (got,) = seen
    for key, value in vars(args).items():
        assert getattr(got, key) == value, key
    assert got.worker == "rsmatch"


def test_main_defaults(monkeypatch, capsys):
    """The documented defaults (B = 64, mu = 7, 5 steps x 2 rounds, a 50k pool, all four)."""
    seen = []
    monkeypatch.setattr(bench, "drive", lambda a: seen.append(a) or {"ok": 1})
    assert bench.main([]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": 1}
    a = seen[0]
    assert (a.batch_size, a.uratio, a.steps, a.rounds, a.warmup) == (64, 7, 5, 2, 2)
    assert (a.pool, a.usb_workers, a.precision, a.compile) == (50_000, 0, "auto", None)
    assert a.only == ["bare", "usb", "fixmatch", "rsmatch"] and a.variant is None
    assert a.usb_keep_host_memory is False and a.override == [] and a.backbone == "wrn28_2"
    bench.main(["--compile", "--only", "bare"])
    assert seen[1].compile == "default" and seen[1].only == ["bare"]


def test_start_runs_usb_in_its_venv_and_the_others_on_this_checkout(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(bench, "USB_VENV", tmp_path)
    monkeypatch.setattr(bench.subprocess, "Popen", lambda cmd, **kw: calls.append((cmd, kw)))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    args = _bench_args(threads=3, warmup=1, pool=8, usb_workers=0)
    bench._start("usb", args)
    bench._start("fixmatch", args, "train.prefetch=false")
    (usb_cmd, usb_kw), (fm_cmd, fm_kw) = calls
    assert usb_cmd[0] == str(tmp_path / "bin" / "python")
    assert usb_kw["env"]["PYTHONPATH"] == str(tmp_path / "stubs")
    assert usb_cmd[2:4] == ["--worker", "usb"] and not usb_cmd[-1].startswith("--override")
    assert fm_cmd[0] == sys.executable and fm_cmd[2:4] == ["--worker", "fixmatch"]
    assert fm_cmd[-1] == "--override=train.prefetch=false"
    assert fm_kw["env"]["PYTHONPATH"] == f"{ROOT}:/elsewhere"
    for kw in (usb_kw, fm_kw):
        assert kw["env"]["OMP_NUM_THREADS"] == kw["env"]["MKL_NUM_THREADS"] == "3"


def test_the_bare_step_trains_the_backbone_asked_for():
    """A 10-layer WRN dispatches fewer operators per step than the default 28-layer one."""
    args = argparse.Namespace(batch_size=1, uratio=1, pool=8, precision="no", compile=None)
    ops = {name: profile_step._counted(bench._bare_step(argparse.Namespace(**vars(args), backbone=name)), 0)[0]
           for name in ("wrn10_1", "wrn28_2")}  # fmt: skip
    assert 0 < ops["wrn10_1"] < 0.5 * ops["wrn28_2"], ops


def test_a_worker_trains_with_the_override_it_is_started_with(monkeypatch):
    """`--worker fixmatch --override=KEY=VALUE` (as `_start` writes it for a --variant) builds
    its trainer with that override."""
    built = []
    monkeypatch.setattr(bench, "_serve", lambda step, args: built.append(step.__self__))
    flags = ["--batch-size", "2", "--uratio", "1", "--pool", "48", "--precision", "no",
             "--threads", "1", "--backbone", "wrn10_1"]  # fmt: skip
    assert bench.main(["--worker", "fixmatch", *flags, "--override=train.prefetch=true"]) == 0
    (trainer,) = built
    assert trainer.cfg.train.prefetch is True  # the default is "auto"
    assert trainer.cfg.model.backbone == "wrn10_1"
    assert trainer.cfg.algorithm == "fixmatch" and trainer.cfg.train.batch_size == 2


def test_expect_passes_other_lines_through_to_stderr(capsys):
    lines = iter(["a warning\n", "seconds 0.5\n", "after\n"])
    proc = argparse.Namespace(stdout=lines)
    assert bench._expect(proc, "seconds") == "seconds 0.5\n"
    assert capsys.readouterr().err == "a warning\n"
    assert bench._expect(argparse.Namespace(stdout=iter(["x\n"])), "ready") is None


def test_machine_line_names_the_cpu_count():
    import os

    assert f", {os.cpu_count()} CPUs, " in bench._machine()


# -- profile_step.py ------------------------------------------------------------------------------
def test_timed_waits_for_the_device_before_and_after():
    events = []
    seconds, result = profile_step._timed(lambda: events.append("sync"), lambda x: x * 2, 21)
    assert result == 42 and events == ["sync", "sync"] and seconds >= 0


def test_on_made_batch_hands_the_batch_and_restores_the_maker():
    trainer = argparse.Namespace(batches=lambda step: f"made {step}")
    with pytest.raises(RuntimeError), profile_step._on_made_batch(trainer, "premade"):
        assert trainer.batches(3) == "premade"
        raise RuntimeError
    assert trainer.batches(3) == "made 3"


def test_main_profiles_each_algorithm_then_each_with_the_variant(monkeypatch, capsys):
    """Every contender with the shared overrides (prefetch off: parts timed on one thread); the
    variant's contenders with its override last; one JSON line each, named by the contender;
    each its own run folder, in a temporary folder removed at the end."""
    seen, outs = [], []
    monkeypatch.setattr(profile_step, "profile",
                        lambda args, name, algorithm, sync, out: outs.append(Path(out))
                        or seen.append((name, algorithm, args.override))
                        or {"median_s": len(seen)})  # fmt: skip
    monkeypatch.setattr(profile_step.bench, "_machine", lambda: "M")
    argv = ["--algorithm", "fixmatch", "rsmatch", "--override", "a=1", "--variant", "b=2"]
    assert profile_step.main(argv) == 0
    shared = ["train.prefetch=false", "a=1"]
    assert seen == [("fixmatch", "fixmatch", shared), ("rsmatch", "rsmatch", shared),
                    ("fixmatch b=2", "fixmatch", [*shared, "b=2"]),
                    ("rsmatch b=2", "rsmatch", [*shared, "b=2"])]  # fmt: skip
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["profiled"], x["machine"], x["median_s"]) for x in lines] == [
        ("fixmatch", "M", 1), ("rsmatch", "M", 2), ("fixmatch b=2", "M", 3), ("rsmatch b=2", "M", 4)
    ]  # fmt: skip
    assert len(set(outs)) == 4 and len({o.parent for o in outs}) == 1
    assert not outs[0].parent.exists()


def test_counted_counts_each_dispatched_operator():
    """One aten add is one operator; a multiply then a sum are two."""
    a = torch.ones(3)
    assert profile_step._counted(torch.add, a, a)[0] == 1
    count, result = profile_step._counted(lambda x: (x * 2).sum(), a)
    assert count == 2 and result.item() == 6


# -- gpu_check.py ---------------------------------------------------------------------------------
def test_overall_status():
    """All ok: ok; all skipped: skipped; any ok with anything else: partial; none ok: failed."""
    s = lambda *names: [{"status": n} for n in names]  # noqa: E731
    assert gpu_check.overall(s("ok", "ok")) == "ok"
    assert gpu_check.overall(s("skipped")) == "skipped"
    assert gpu_check.overall(s("ok", "timeout")) == "partial"
    assert gpu_check.overall(s("ok", "skipped")) == "partial"
    assert gpu_check.overall(s("failed", "timeout")) == "failed"
    assert gpu_check.overall(s("skipped", "failed")) == "failed"


def test_trailing_json_is_the_last_indented_object():
    text = 'log\n{\n  "a": 1\n}\nmore\n{\n  "b": {\n    "c": 2\n  }\n}'
    assert gpu_check.trailing_json(text) == {"b": {"c": 2}}
    assert gpu_check.trailing_json('{"inline": 1}\nno block') is None
    assert gpu_check.trailing_json('{"round": 0, "s_per_step": 0.5}\n') is None  # a round line
    assert gpu_check.trailing_json("{\n  broken") is None


def test_last_json_line(tmp_path):
    log = tmp_path / "env.log"
    log.write_text(
        '$ python -c ...\n{"gpu": "A"}\n{"gpu": "B"}\ntrailing words\n', encoding="utf-8"
    )
    assert gpu_check.last_json_line(log) == {"gpu": "B"}
    log.write_text('{"gpu": "A"}\n{not json\n', encoding="utf-8")
    assert gpu_check.last_json_line(log) is None


def test_run_logs_the_command_appends_and_skips_only_under_five_seconds(tmp_path):
    log = tmp_path / "step.log"
    log.write_text("earlier\n", encoding="utf-8")
    ok = gpu_check.run([sys.executable, "-c", "print('hi')"], log, 5, {})
    assert ok["status"] == "ok" and ok["rc"] == 0 and ok["limit_s"] == 5
    text = log.read_text(encoding="utf-8")
    assert text.startswith("earlier\n$ ") and text.endswith("-c print('hi')\nhi\n")
    assert gpu_check.run(["false"], log, 4.9, {}) == {
        "status": "skipped",
        "reason": "no time left in the budget",
    }


class FixedClock:
    def __init__(self, left):
        self.seconds = left

    def left(self):
        return self.seconds


def _check(tmp_path, left=1000.0, dry=False, keep=100.0, variant=None, precision="auto"):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    sizes = gpu_check.TINY if dry else gpu_check.GPU
    return gpu_check.Check(dry, sizes, out, work, FixedClock(left), {}, precision, "auto", keep,
                           variant=variant, py="PY")  # fmt: skip


def test_check_properties(tmp_path):
    c = _check(tmp_path, precision="fp16", variant="train.prefetch=false")
    assert c.tool_precision == "auto"
    assert c.variant_flags == ["--variant", "train.prefetch=false"] and c.variant_share == 1.5
    assert c.precision_keys == ["train.mixed_precision=fp16", "train.channels_last=auto"]
    for p in ("no", "bf16"):
        assert _check(tmp_path, precision=p).tool_precision == p
    plain = _check(tmp_path)
    assert plain.variant_flags == [] and plain.variant_share == 1.0
    assert plain.limits["throughput"] == 120


def _recording(monkeypatch, answers, stands_for="run_for_json"):
    """gpu_check's `stands_for` (run_for_json or run_and_read) replaced: each call recorded,
    answered in turn from `answers`."""
    calls = []

    def fake(cmd, log, limit, env):
        calls.append({"cmd": cmd, "log": log, "limit": limit})
        return answers.pop(0)

    monkeypatch.setattr(gpu_check, stands_for, fake)
    return calls


def test_bench_records_each_contender_from_the_medians(monkeypatch, tmp_path):
    measured = {"median_s_per_step": {"bare": 0.25, "fixmatch": 0.5, "rsmatch": 0.8},
                "ratios": {"r": 0.5}, "machine": "M", "backbone": "B"}  # fmt: skip
    calls = _recording(monkeypatch, [({"status": "ok"}, measured)])
    got = gpu_check.bench(_check(tmp_path, precision="bf16"), tmp_path / "t.log", 60, ["--x"])
    assert got["bare"] == {"status": "ok", "s_per_step": 0.25, "it_per_s": 4.0}
    assert got["rsmatch"] == {"status": "ok", "s_per_step": 0.8, "it_per_s": 1.25}
    assert got["ratios"] == {"r": 0.5} and got["bench_machine"] == "M" and got["backbone"] == "B"
    cmd = calls[0]["cmd"]
    assert cmd[:6] == ["PY", "tools/bench_vs_usb.py", "--only", "bare", "fixmatch", "rsmatch"]
    assert "--precision=bf16" in cmd and cmd[-1] == "--x" and calls[0]["limit"] == 60


def test_bench_without_a_summary_gives_each_contender_the_run_status(monkeypatch, tmp_path):
    _recording(monkeypatch, [({"status": "timeout", "rc": None}, None)])
    got = gpu_check.bench(_check(tmp_path), tmp_path / "t.log", 60, [])
    for name in ("bare", "fixmatch", "rsmatch"):
        assert got[name] == {"status": "timeout"}
    assert "ratios" not in got


def test_a_bench_that_exits_0_without_its_summary_failed(monkeypatch, tmp_path):
    """Exit code 0 but no JSON summary (cut off, or printed nothing): no contender is `ok`."""
    _recording(monkeypatch, [({"status": "ok", "rc": 0}, None)])
    got = gpu_check.bench(_check(tmp_path), tmp_path / "t.log", 60, [])
    assert got["status"] == "failed"
    assert [got[n] for n in ("bare", "fixmatch", "rsmatch")] == [{"status": "failed"}] * 3


def test_throughput_limit_and_rsmatch_over_fixmatch(monkeypatch, tmp_path):
    """Limit: min(share x 120 s, left - kept for training); the ratio is rsmatch / fixmatch."""
    measured = {"median_s_per_step": {"bare": 0.1, "fixmatch": 0.4, "rsmatch": 0.5},
                "ratios": {}, "machine": "M", "backbone": "B"}  # fmt: skip
    calls = _recording(monkeypatch, [({"status": "ok"}, measured)] * 3)
    got = gpu_check.throughput(_check(tmp_path, left=1000, keep=100))
    assert got["rsmatch_over_fixmatch"] == 1.25 and calls[0]["limit"] == 120
    assert calls[0]["log"].name == "throughput.log"
    gpu_check.throughput(_check(tmp_path, left=1000, keep=100, variant="a=b"))
    assert calls[1]["limit"] == 180 and calls[1]["cmd"][-2:] == ["--variant", "a=b"]
    gpu_check.throughput(_check(tmp_path, left=150, keep=100))
    assert calls[2]["limit"] == 50


def test_profile_runs_each_algorithm_and_the_variant_in_one_process(monkeypatch, tmp_path):
    """One profile_step.py run for all; stopped after two of the four, it keeps those two."""
    line = '{"profiled": "%s", "machine": "M", "median_s": {"bare": 0.1}, "aten_ops": {"bare": 9}}'
    text = "\n".join(
        ["warming up", line % "fixmatch", '{"precision": "no"}', line % "fixmatch a=b"]
    )
    calls = _recording(monkeypatch, [({"status": "timeout", "rc": None}, text)], "run_and_read")
    got = gpu_check.profile(_check(tmp_path, left=300, keep=150, variant="a=b"))
    assert got["fixmatch"] == {"status": "ok", "median_s": {"bare": 0.1}, "aten_ops": {"bare": 9}}
    assert got["fixmatch a=b"]["status"] == "ok"
    assert got["rsmatch"] == got["rsmatch a=b"] == {"status": "timeout"}
    assert got["status"] == "partial" and got["rc"] is None
    assert len(calls) == 1 and calls[0]["log"].name == "profile.log"
    assert calls[0]["cmd"][1:5] == ["tools/profile_step.py", "--algorithm", "fixmatch", "rsmatch"]
    assert calls[0]["cmd"][-2:] == ["--variant", "a=b"]
    assert calls[0]["limit"] == 150  # 4 x 60 s, held to what the trainings leave
    # exited 0 without a contender's line: that one failed; without a variant, 2 x 60 s
    calls = _recording(monkeypatch, [({"status": "ok"}, line % "rsmatch")], "run_and_read")
    got = gpu_check.profile(_check(tmp_path, left=1000))
    assert got["fixmatch"] == {"status": "failed"} and got["rsmatch"]["status"] == "ok"
    assert got["status"] == "partial" and calls[0]["limit"] == 120
    assert "--variant" not in calls[0]["cmd"]


def test_compiled_times_each_mode_in_its_own_bench(monkeypatch, tmp_path):
    measured = {"median_s_per_step": {"bare": 0.5}, "ratios": {}, "machine": "M", "backbone": "B"}
    answers = [({"status": "ok"}, measured), ({"status": "timeout"}, None)]
    calls = _recording(monkeypatch, answers)
    got = gpu_check.compiled(_check(tmp_path), ["default", "reduce-overhead"])
    assert [c["cmd"][-1] for c in calls] == ["--compile=default", "--compile=reduce-overhead"]
    assert got["default"]["bare"]["s_per_step"] == 0.5
    assert got["reduce-overhead"]["fixmatch"] == {"status": "timeout"}
    assert got["status"] == "partial" and calls[0]["limit"] == 150
    assert "--variant" not in calls[0]["cmd"]


def _recording_run(monkeypatch, status="ok"):
    calls = []

    def fake(cmd, log, limit, env):
        calls.append({"cmd": cmd, "log": log, "limit": limit})
        return {"status": status}

    monkeypatch.setattr(gpu_check, "run", fake)
    return calls


def test_train_steps_fit_the_measured_throughput(monkeypatch, tmp_path):
    """1000 s left, 100 s wanted each: fixmatch's share 500 s, loop 100 s, limit 100 + 45 + 45;
    steps = 100 s / measured s/step (0.25 s when nothing was measured), at least 20."""
    calls = _recording_run(monkeypatch)
    c = _check(tmp_path, left=1000)
    got = gpu_check.train(c, tmp_path / "data", {"fixmatch": 0.05}, 100)
    assert [x["limit"] for x in calls] == [190, 190]
    assert got["fixmatch"]["steps_planned"] == 2000 and got["rsmatch"]["steps_planned"] == 400
    assert got["status"] == "ok"
    cmd = calls[0]["cmd"]
    assert cmd[:5] == ["PY", "-m", "rsmatch.cli.train", "--config", "configs/fixmatch.yaml"]
    for key in ("train.steps=2000", "train.eval_every=1000", "train.save_every=2000",
                f"train.output_dir={tmp_path / 'work' / 'train-fixmatch'}",
                "train.mixed_precision=auto", "data.replace_ratio=0.5"):  # fmt: skip
        assert key in cmd, key
    assert calls[1]["cmd"][4] == "configs/rsmatch.yaml"
    assert calls[1]["log"] == tmp_path / "out" / "train-rsmatch.log"
    calls.clear()
    got = gpu_check.train(c, tmp_path / "data", {"fixmatch": 10.0, "rsmatch": 0.5}, 100)
    assert got["fixmatch"]["steps_planned"] == 20 and got["rsmatch"]["steps_planned"] == 200


def test_train_shortens_the_loop_to_the_share_left(monkeypatch, tmp_path):
    """300 s left: fixmatch's share 150 s, loop 150 - 45 - 15 = 90 s, limit min(150, 180)."""
    calls = _recording_run(monkeypatch, status="timeout")
    got = gpu_check.train(_check(tmp_path, left=300), tmp_path, {"fixmatch": 0.5}, 100)
    assert calls[0]["limit"] == 150 and got["fixmatch"]["steps_planned"] == 180
    assert calls[1]["limit"] == 190  # the last algorithm's share is all that is left
    assert got["status"] == "failed"


def test_train_dry_run_takes_two_steps_and_no_data_is_skipped(monkeypatch, tmp_path):
    calls = _recording_run(monkeypatch)
    got = gpu_check.train(_check(tmp_path, dry=True), tmp_path, {}, 100)
    assert got["fixmatch"]["steps_planned"] == 2
    assert {"train.steps=2", "train.eval_every=1", "train.save_every=2"} <= set(calls[0]["cmd"])
    calls.clear()
    got = gpu_check.train(_check(tmp_path), None, {}, 100)
    assert calls == [] and got["status"] == "skipped"
    assert got["rsmatch"] == {"status": "skipped", "reason": "no data"}


def test_run_results_reads_what_the_run_wrote(tmp_path):
    assert gpu_check.run_results(tmp_path) == {}
    metrics = {"test_acc": 0.5, "detector_acc": 0.75, "seconds": 10.0, "step": 4}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (tmp_path / "evals.jsonl").write_text('{"step": 2}\n{"step": 4}\n', encoding="utf-8")
    (tmp_path / "run.json").write_text('{"counts": {"labeled": 12}, "other": 1}', encoding="utf-8")
    got = gpu_check.run_results(tmp_path)
    assert got == {"test_acc": 0.5, "detector_acc": 0.75, "loop_seconds": 10.0,
                   "loop_s_per_step": 2.5, "metrics": metrics,
                   "evals": [{"step": 2}, {"step": 4}], "counts": {"labeled": 12}}  # fmt: skip
    (tmp_path / "metrics.json").write_text('{"seconds": 3.0, "step": 0}', encoding="utf-8")
    assert gpu_check.run_results(tmp_path)["loop_s_per_step"] == 3.0
    # a run stopped by the check's time budget may leave a last line cut off mid-write
    (tmp_path / "evals.jsonl").write_text(
        '{"step": 2}\n{"step": 4}\n{"step": 6, "te', encoding="utf-8"
    )
    assert gpu_check.run_results(tmp_path)["evals"] == [{"step": 2}, {"step": 4}]


def test_data_overrides():
    assert gpu_check.data_overrides(Path("/d")) == [
        "data.real=/d/real",
        "data.synthetic={ddpm: /d/synthetic/ddpm, cgan: /d/synthetic/cgan}",
        "data.replace_ratio=0.5",
    ]


def test_unpack_data_folder_tarball_and_refusals(tmp_path):
    src = tmp_path / "src"
    (src / "real").mkdir(parents=True)
    data, status = gpu_check.unpack_data(src, tmp_path)
    assert data is None and status == {
        "status": "failed",
        "error": f"{src}: needs real/ and synthetic/",
    }
    (src / "synthetic").mkdir()
    data, status = gpu_check.unpack_data(src, tmp_path)
    assert data == src and status["status"] == "ok" and status["from"] == str(src)
    packed = tmp_path / "packed"
    packed.mkdir()
    with tarfile.open(packed / "gpudata.tar.gz", "w:gz") as tar:
        tar.add(src / "real", arcname="real")
        tar.add(src / "synthetic", arcname="synthetic")
    work = tmp_path / "work"
    work.mkdir()
    data, status = gpu_check.unpack_data(packed, work)
    assert data == work / "data" and (work / "data" / "synthetic").is_dir()
    assert status["from"] == str(packed / "gpudata.tar.gz")
    (packed / "gpudata.tar.gz").write_bytes(b"not a tarball")
    work2 = tmp_path / "work2"
    work2.mkdir()
    data, status = gpu_check.unpack_data(packed, work2)
    assert data is None and status["status"] == "failed"
    assert "gzip" in status["error"] and "needs real/" not in status["error"]


def test_gpu_tests_leaves_time_for_the_steps_after_it(monkeypatch, tmp_path):
    """pytest gets min(210 s, left - kept for training - one throughput run)."""
    calls = _recording_run(monkeypatch)
    gpu_check.gpu_tests(_check(tmp_path, left=400, keep=100))
    assert calls[0]["limit"] == 180 and calls[0]["log"] == tmp_path / "out" / "pytest.log"
    assert calls[0]["cmd"][1:6] == ["-m", "pytest", "-m", "gpu", "tests/"]
    gpu_check.gpu_tests(_check(tmp_path, left=1000, keep=100))
    assert calls[1]["limit"] == 210


def test_digest_lists_failed_tests_and_the_numbers():
    summary = {
        "machine": {"gpu": "H100", "packages": {"torch": "2.5"}},
        "steps": {
            "gpu_tests": {"status": "partial", "counts": {"passed": 1},
                          "tests": {"t": {"a": "passed", "b": "failure: x", "c": "error: y",
                                          "d": "skipped: z"}}},
            "throughput": {"status": "ok", "fixmatch": {"status": "ok", "s_per_step": 0.5, "x": 1}},
        },
    }  # fmt: skip
    lines = gpu_check.digest(summary)
    assert lines[0] == "machine: H100 torch 2.5"
    assert "  t[b] failure: x" in lines and "  t[c] error: y" in lines
    assert not any("t[a]" in x or "t[d]" in x for x in lines)
    assert "  throughput fixmatch: {'status': 'ok', 's_per_step': 0.5}" in lines


@pytest.fixture
def stubbed_check(monkeypatch, tmp_path):
    """gpu_check.main with every step stubbed; records the Check and what train was given."""
    seen = {}
    monkeypatch.setattr(gpu_check, "scratch_dir", lambda: str(tmp_path))
    monkeypatch.setattr(gpu_check, "run", lambda *a: {"status": "ok"})
    monkeypatch.setattr(gpu_check, "gpu_tests", lambda c: {"status": "ok"})

    def throughput(c):
        seen["check"] = c
        return {"status": seen.get("tp_status", "ok"), "fixmatch": {"s_per_step": 0.5},
                "rsmatch": {"status": "timeout"}}  # fmt: skip

    monkeypatch.setattr(gpu_check, "throughput", throughput)
    monkeypatch.setattr(gpu_check, "profile", lambda c: {"status": "ok"})
    monkeypatch.setattr(gpu_check, "compiled", lambda c, modes: {"status": "ok", "modes": modes})

    def unpack(source, work):
        seen["source"] = source
        return source, {"status": "ok"}

    monkeypatch.setattr(gpu_check, "unpack_data", unpack)

    def train(c, data, measured, seconds):
        seen["train"] = (data, measured, seconds)
        return {"status": "ok"}

    monkeypatch.setattr(gpu_check, "train", train)
    return seen


def test_main_writes_the_summary_and_passes_the_measured_steps(stubbed_check, tmp_path, capsys):
    out = tmp_path / "out"
    rc = gpu_check.main(["--out", str(out), "--started", "1000", "--train-seconds", "60",
                         "--compile", "default"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    assert summary["schema"] == 1 and summary["dry_run"] is False
    assert summary["settings"]["budget_s"] == 450 and summary["settings"]["precision"] == "auto"
    assert summary["settings"]["channels_last"] == "auto" and summary["settings"]["variant"] is None
    assert list(summary["steps"]) == ["install", "machine", "gpu_tests", "throughput", "profile",
                                      "compile", "data", "train"]  # fmt: skip
    assert summary["steps"]["install"]["status"] == "skipped"
    assert summary["steps"]["compile"]["modes"] == ["default"]
    assert stubbed_check["train"] == (ROOT / ".gpudata", {"fixmatch": 0.5}, 60.0)
    c = stubbed_check["check"]
    assert c.keep_for_train == 150.0 and c.sizes is gpu_check.GPU and c.clock.deadline == 1450
    assert capsys.readouterr().out.endswith("steps not ok: none\n")


def test_main_dry_run_defaults_and_a_failed_step_exits_1(stubbed_check, tmp_path, capsys):
    out = tmp_path / "out"
    stubbed_check["tp_status"] = "partial"
    rc = gpu_check.main(["--out", str(out), "--dry-run", "--skip-train", "--started", "0"])
    assert rc == 1
    summary = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    assert summary["dry_run"] is True and summary["settings"]["budget_s"] == 300
    assert (
        summary["settings"]["precision"] == "no" and summary["settings"]["channels_last"] == "false"
    )
    assert "train" not in summary["steps"] and "compile" not in summary["steps"]
    c = stubbed_check["check"]
    assert (
        c.keep_for_train == 0.0
        and c.sizes is gpu_check.TINY
        and c.env["CUDA_VISIBLE_DEVICES"] == ""
    )
    assert capsys.readouterr().out.endswith("steps not ok: throughput\n")


def test_main_dry_run_reads_the_demo_data_and_keeps_a_fifth(stubbed_check, tmp_path):
    gpu_check.main(["--out", str(tmp_path / "out"), "--dry-run", "--budget", "100"])
    assert stubbed_check["source"] == ROOT / "data" / "demo"
    assert stubbed_check["check"].keep_for_train == 20.0


def test_main_records_an_error_and_still_writes_the_summary(stubbed_check, monkeypatch, tmp_path):
    def boom(c):
        raise ValueError("bad")

    monkeypatch.setattr(gpu_check, "profile", boom)
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        gpu_check.main(["--out", str(out), "--skip-train"])
    summary = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    assert (
        summary["error"] == "ValueError: bad" and summary["steps"]["throughput"]["status"] == "ok"
    )


# -- summarize_study.py ---------------------------------------------------------------------------
def test_mean_std_in_percent():
    assert summarize._mean_std([0.5, 0.7]) == "60.00 ± 14.14 (n=2)"
    assert summarize._mean_std([0.25]) == "25.00 ± 0.00 (n=1)"
    assert summarize._mean_std([]) == "-"


def test_late_means_average_the_last_steps(monkeypatch, tmp_path):
    """Steps after end - 100 only (the step at exactly end - 100 is out); other tags dropped."""
    import rsmatch.figures

    series = {"mask_rate": {0: 1.0, 100: 0.9, 150: 0.2, 200: 0.4}, "other": {200: 5.0}}
    monkeypatch.setattr(rsmatch.figures, "tb_scalars", lambda run: series)
    assert summarize.late_means(tmp_path, ("mask_rate",)) == {"mask_rate": pytest.approx(0.3)}
    assert summarize.late_means(tmp_path, ("mask_rate",), last=200) == {
        "mask_rate": pytest.approx(0.5)
    }


def _study_run(folder, metrics, evals):
    """A finished run of a study folder: its metrics.json and evals.jsonl."""
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (folder / "evals.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in evals), encoding="utf-8"
    )


def test_study_summary_table(monkeypatch, tmp_path):
    import rsmatch.figures

    monkeypatch.setattr(rsmatch.figures, "tb_scalars", lambda run: {"mask_rate": {10: 0.5}})
    runs = {
        "fixmatch-seed0": {"test_acc": 0.5, "best_acc": 0.6, "seconds": 10},
        "fixmatch-seed1": {"test_acc": 0.7, "best_acc": 0.8, "seconds": 20},
        "rsmatch-ood-seed0": {
            "test_acc": 0.9,
            "best_acc": 0.9,
            "seconds": 30,
            "detector_acc": 0.8,
            "queue_purity": 0.75,
        },  # fmt: skip
    }
    for name, metrics in runs.items():
        evals = {"step": 5, "test_acc": metrics["test_acc"]}
        lines = [evals]
        if "detector_acc" in metrics:  # the first evaluation before the queue held anything
            lines = [{"step": 2, "test_acc": 0.1, "detector_acc": 0.4,
                      "detector_called_synthetic": 0.0},
                     evals | {"detector_acc": 0.8, "queue_purity": 0.75,
                              "detector_called_synthetic": 0.5}]  # fmt: skip
        _study_run(tmp_path / name, metrics, lines)
    summarize.main(tmp_path)
    text = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "| fixmatch | 60.00 ± 14.14 (n=2) | 70.00 ± 14.14 (n=2) | - | - | 15 |" in text
    assert "| rsmatch-ood | 90.00 ± 0.00 (n=1) | 90.00 ± 0.00 (n=1) | 80.00 ± 0.00 (n=1) | " in text
    assert "| fixmatch-seed1 | 0.5000 | - | - | - | - |" in text
    assert "- rsmatch-ood run 0: 2: 0.400/n/a/0.000, 5: 0.800/0.750/0.500" in text
    assert "fixmatch run" not in text
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_summarize_study_on_an_ascii_console(tmp_path):
    """A console that cannot print ± gets it escaped; summary.md and the plot are written."""
    _study_run(tmp_path / "fixmatch-seed0", {"test_acc": 0.5, "best_acc": 0.6, "seconds": 10},
               [{"step": 5, "test_acc": 0.5}])  # fmt: skip
    done = subprocess.run([sys.executable, "tools/summarize_study.py", str(tmp_path)], cwd=ROOT,
                          capture_output=True, env={**os.environ, "PYTHONIOENCODING": "ascii"})  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert b"| fixmatch | 50.00 \\xb1 0.00 (n=1) |" in done.stdout
    assert "50.00 ± 0.00" in (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_summarize_study_refuses_a_missing_folder(tmp_path):
    done = subprocess.run([sys.executable, "tools/summarize_study.py", str(tmp_path / "none")],
                          cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == f"summarize_study: error: {tmp_path / 'none'}: no such folder\n"


# -- make_demo_data.py ----------------------------------------------------------------------------
def test_subset_keeps_the_first_n_of_each_class_in_order():
    make_demo = load_tool("make_demo_data")
    ds = datasets.Dataset.from_dict({"label": [0, 1, 0, 0, 1, 2, 0], "i": list(range(7))})
    got = make_demo._subset(ds, 2)
    assert got["i"] == [0, 1, 2, 4, 5] and got["label"] == [0, 1, 0, 1, 2]
    assert make_demo._subset(ds, 0)["i"] == []
    assert (make_demo.REAL_TRAIN, make_demo.REAL_TEST, make_demo.SYNTH) == (225, 100, 100)


# -- the shell tools' --help ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "script, usage",
    [
        ("tools/gpu_check.sh", "bash tools/gpu_check.sh [--dry-run] [--out DIR]"),
        ("tools/gpu_wheels.sh", "bash tools/gpu_wheels.sh [PYTHON_VERSION]"),
        ("tools/prepare_gpu_data.sh", "bash tools/prepare_gpu_data.sh [SHARED_DATA] [OUT]"),
        ("studies/cpu_study.sh", "bash studies/cpu_study.sh [SHARED_DATA_DIR] [OUT_DIR] [STEPS]"),
        ("tools/mutation.sh", "tools/mutation.sh 'rsmatch.csqueue*'"),
    ],
)
def test_shell_tools_help_changes_nothing(tmp_path, script, usage):
    """gpu_check.sh --help pip-installed the checkout (re-pointing the user's editable install)
    before its Python part printed the help. PYTHON is a stand-in that logs each call."""
    log, out = tmp_path / "calls.log", tmp_path / "out"
    python = tmp_path / "python"
    python.write_text(
        f'#!/bin/sh\necho "$@" >> {log}\n[ "$1" = -m ] && exit 1\nexec {sys.executable} "$@"\n',
        encoding="utf-8",
    )
    python.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(python), "OUT": str(out), "HOME": str(tmp_path)}
    # from another folder, by a relative path: the scripts cd, and $0 must still lead to them
    done = subprocess.run(["bash", f"../{script}", "--help"], cwd=ROOT / "docs", env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert usage in done.stdout and not done.stdout.startswith("#")  # the comment marks gone
    assert ("usage: gpu_check.py" in done.stdout) == ("gpu_check" in script)  # its Python part
    assert not out.exists() and "-m pip" not in (
        log.read_text(encoding="utf-8") if log.exists() else ""
    )
    assert {p.name for p in tmp_path.iterdir()} <= {"python", "calls.log"}


def test_cpu_study_without_its_archives_writes_nothing(tmp_path):
    """... but a rerun finds the archives it unpacked already (their markers) and goes on."""
    done = subprocess.run(["bash", str(ROOT / "studies/cpu_study.sh"), str(tmp_path / "none"),
                           str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2
    assert (
        done.stderr
        == f"cpu_study: missing {tmp_path}/none/cifar10-jpeg.tar.gz (the first argument names the archives' folder: docs/studies.md)\n"
    )
    assert not (tmp_path / "out").exists()
    data = tmp_path / "out" / "data"
    data.mkdir(parents=True)
    for name in ("cifar10-jpeg", "synth-ddpm-jpeg", "synth-cgan-jpeg"):
        (data / f".{name}").touch()
    env = {**os.environ, "SEEDS": "0", "METHODS": "fixmatch"}
    env.pop("EXTRA", None)  # the study's own setting: a user's exported overrides stay out
    done = subprocess.run(["bash", "studies/cpu_study.sh", str(tmp_path / "none"), str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "cpu_study: missing" not in done.stderr
    assert f"rsmatch-train: error: data.real={data}/cifar10: no such folder" in done.stderr
