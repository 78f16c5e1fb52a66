"""Option values of ``bnn`` and ``demo`` checked at parse time: one line, exit 2, the allowed values named, no
work started and no output folder made; ``--threads`` the same in every subcommand; a dead run's marker."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import pytest
import torch

from mcmc_unlearner.cli import ExitCode, build_parser, main
from mcmc_unlearner.experiments import bnn, gmm
from mcmc_unlearner.experiments.report import RUN_MARKER, claimed_out_dir


@pytest.fixture
def no_run(monkeypatch):
    """Any start of the demo's or bnn's work fails the test."""

    def fail(*a, **k):
        raise AssertionError("the run started")

    monkeypatch.setattr(bnn, "run_bnn", fail)
    monkeypatch.setattr(gmm, "run_demo", fail)
    build_parser()


def _refused(cmd: str, flags: list[str], tmp_path, capsys) -> str:
    """``cmd FLAGS --out DIR``: exit 2, one stderr line naming the CLI, nothing on stdout, no folder made."""
    out = tmp_path / "run"
    rc = main([cmd, *(["--quick"] if cmd == "bnn" else []), "--quiet", "--out", str(out), *flags])
    o, err = capsys.readouterr()
    assert rc == ExitCode.REFUSED and not o, (rc, o, err)
    assert err.count("\n") == 1 and err.startswith(f"mcmc-unlearner {cmd}: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    assert not out.exists()
    return err


def _subparser(name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def _help(cmd: str, flag: str) -> str:
    (action,) = [a for a in _subparser(cmd)._actions if flag in a.option_strings]
    return action.help


# ------------------------------------------------------------------ C1: --device
@pytest.mark.parametrize("device", ["foo", "cpu:1", "cuda:x", "", "meta"])
def test_bnn_unknown_device_refused_at_parse_time(device, tmp_path, capsys, no_run):
    """Was: ``bnn --quick --device foo`` ended in "internal error (RuntimeError: Expected one of cpu, ...)", 70."""
    err = _refused("bnn", ["--device", device], tmp_path, capsys)
    assert "error: --device must be cpu, cuda, cuda:N (N = 0, 1, ...) or mps, got " in err, err


def test_bnn_device_values():
    assert build_parser().parse_args(["bnn", "--device", "cpu"]).device == "cpu"
    assert "cpu, cuda, cuda:N" in _help("bnn", "--device")
    with pytest.raises(ValueError, match="--device must be cpu, cuda"):
        bnn.run_bnn(bnn.BNNConfig(device="foo"))  # the Python API refuses it before any work too


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bnn_cuda_without_a_gpu_refused_at_parse_time(tmp_path, capsys, no_run):
    err = _refused("bnn", ["--device", "cuda:0"], tmp_path, capsys)
    assert "error: --device cuda:0 requested but torch sees no CUDA device; use --device cpu" in err, err


# ------------------------------------------------------------------ C2/C3: number options of bnn and demo
BNN_REFUSALS = [
    ("--eval-max", "-1", ">= 0 (0: all points)"),
    ("--langevin-steps", "-1", ">= 0 (0: the default, paper's samp_T + 2 x iter_T)"),
    ("--repair-steps", "-1", ">= 0 (0: no repair steps, as --on-refusal skip)"),
    ("--max-requests", "-1", ">= 0 (0: all requests)"),
    ("--eval-samples", "-1", ">= 0 (0: all samples)"),
    ("--eval-every", "0", ">= 1"),
    ("--remove-class", "-1", ">= 0"),
    ("--request-size", "0", ">= 1"),
    ("--retrain-chains", "1", ">= 2 (the noise floor is the spread between retrain chains)"),
    ("--explore-steps", "-1", ">= 0 (0: no exploration steps)"),
    ("--sample-steps", "1", ">= 2"),
    ("--bank-size", "1", ">= 2"),
    ("--batch-size", "0", ">= 1"),
    ("--pretrain-steps", "-5", ">= 0 (0: no pre-training steps)"),
    ("--paper-iter-T", "0", ">= 1"),
    ("--paper-samp-T", "0", ">= 1"),
    ("--progress-max", "-1", ">= 0 (0: all points)"),
    ("--progress-samples", "0", ">= 1"),
    ("--extra-finetune-steps", "-1", ">= 0 (0: no unlearn+finetune)"),
    ("--eval-max", "1.5", ">= 0 (0: all points)"),
]


@pytest.mark.parametrize(("flag", "value", "allowed"), BNN_REFUSALS, ids=[f"{f}={v}" for f, v, _ in BNN_REFUSALS])
def test_bnn_whole_number_options_refused_at_parse_time(flag, value, allowed, tmp_path, capsys, no_run):
    """Was: --eval-max -1 dropped a point per split, --langevin-steps -1 became 129, --repair-steps -1 and
    --max-requests -1 were accepted; the rest were refused after parsing, naming other flags."""
    err = _refused("bnn", [flag, value], tmp_path, capsys)
    kind = "a whole number " if value == "1.5" else ""  # not a whole number at all, or one below the least
    assert f"error: {flag} must be {kind}{allowed}, got '{value}' (see mcmc-unlearner bnn --help)" in err, err


@pytest.mark.parametrize("flag", ["--explore-lr", "--sample-lr", "--init-scaling", "--paper-init-scaling"])
@pytest.mark.parametrize("value", ["0", "-0.1", "nan", "inf", "x"])
def test_bnn_step_sizes_and_scalings_must_be_positive(flag, value, tmp_path, capsys, no_run):
    err = _refused("bnn", [flag, value], tmp_path, capsys)
    assert f"error: {flag} must be a positive finite number, got '{value}'" in err, err


def test_bnn_zero_where_it_means_all_or_default_is_accepted():
    flags = ["--eval-max", "0", "--max-requests", "0", "--repair-steps", "0", "--langevin-steps", "0"]
    ns = build_parser().parse_args(["bnn", *flags, "--eval-samples", "0", "--progress-max", "0", "--remove-class", "0"])
    assert (ns.eval_max, ns.max_requests, ns.repair_steps, ns.langevin_steps) == (0, 0, 0, 0)
    assert (ns.eval_samples, ns.progress_max, ns.remove_class) == (0, 0, 0)
    ns = build_parser().parse_args(["bnn", "--explore-lr", "1e-3", "--eval-max", "300", "--retrain-chains", "2"])
    assert (ns.explore_lr, ns.eval_max, ns.retrain_chains) == (1e-3, 300, 2)
    cfg = bnn._resolve(bnn.config_from_args(build_parser().parse_args(["bnn", "--quick", "--langevin-steps", "0"])))
    assert cfg.langevin_steps == cfg.paper_samp_T + 2 * cfg.paper_iter_T  # 0: the documented default


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("eval_max", -1, "--eval-max must be a whole number >= 0 (0: all points), got -1"),
        ("langevin_steps", -1, "--langevin-steps must be a whole number >= 0"),
        ("repair_steps", -1, "--repair-steps must be a whole number >= 0"),
        ("max_requests", -1, "--max-requests must be a whole number >= 0 (0: all requests)"),
        ("eval_samples", -1, "--eval-samples must be a whole number >= 0 (0: all samples), got -1"),
        ("progress_samples", 0, "--progress-samples must be a whole number >= 1, got 0"),
        ("sample_lr", 0.0, "--sample-lr must be a positive finite number"),
        ("remove_class", -1, "--remove-class must be a class number >= 0"),
        ("methods", (), "--methods is empty; name at least one of unlearn,paper"),
        ("threads", -1, "--threads must be 'auto'"),
    ],
)
def test_bnn_api_refuses_the_same_values_naming_one_flag(setting, value, message):
    """Was: the API's message for --eval-samples -1 listed --progress-samples and --progress-max as well."""
    with pytest.raises(ValueError) as info:
        bnn._resolve(bnn.BNNConfig(**{setting: value}))
    assert message in str(info.value), str(info.value)
    if setting == "eval_samples":
        assert "--progress" not in str(info.value)


@pytest.mark.parametrize("value", ["", ",", " , "])
def test_bnn_empty_methods_refused(value, tmp_path, capsys, no_run):
    """Was: ``bnn --methods=`` ran with no methods and printed a matplotlib warning."""
    err = _refused("bnn", [f"--methods={value}"], tmp_path, capsys)
    assert "error: --methods is empty; name at least one of unlearn,paper,finetune,langevin,importance" in err


DEMO_REFUSALS = [
    ("--thin", "0", ">= 1 (1: keep every sample)"),
    ("--thin", "-1", ">= 1 (1: keep every sample)"),
    ("--request-size", "0", ">= 1"),
    ("--retrain-chains", "1", ">= 2 (a median needs several chains)"),
    ("--newton-steps", "0", ">= 1"),
    ("--grad-draws", "1", ">= 2"),
    ("--burnin", "-1", ">= 0"),
    ("--samples", "0", ">= 1"),
]


@pytest.mark.parametrize(("flag", "value", "allowed"), DEMO_REFUSALS, ids=[f"{f}={v}" for f, v, _ in DEMO_REFUSALS])
def test_demo_whole_number_options_refused_at_parse_time(flag, value, allowed, tmp_path, capsys, no_run):
    """Was: ``demo --thin 0`` said "thin=0 leaves 4000 samples; need >= 10"."""
    err = _refused("demo", [flag, value], tmp_path, capsys)
    assert f"error: {flag} must be {allowed}, got '{value}' (see mcmc-unlearner demo --help)" in err, err
    assert "leaves" not in err


def test_demo_thin_too_large_names_the_limit():
    with pytest.raises(ValueError, match=r"--thin 500 keeps 8 of the 4000 samples; the KL estimate needs >= 10 "
                       r"\(--thin at most 400\)"):  # fmt: skip
        gmm.run_demo(thin=500, write=False, progress=False)
    with pytest.raises(ValueError, match=r"--thin must be a whole number >= 1 \(1: keep every sample\), got 0"):
        gmm.run_demo(thin=0, write=False, progress=False)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--solver", "exact", "--unlearner-kw", "solver=cg"], "--solver exact and --unlearner-kw solver=cg"),
        (["--damping", "0.5", "--unlearner-kw", "damping=2"], "--damping 0.5 and --unlearner-kw damping=2"),
        (
            ["--unlearner-kw", "solver=cg", "--unlearner-kw", "solver=exact"],
            "solver=cg and --unlearner-kw solver=exact",
        ),
    ],
)
def test_an_unlearner_option_given_two_ways_is_refused_naming_both(flags, named, tmp_path, capsys, monkeypatch):
    """Was: ``--solver exact --unlearner-kw solver=cg`` ran CG without a word (the last of two --unlearner-kw too)."""

    def started(*a, **k):
        raise AssertionError("the run started")

    monkeypatch.setattr(bnn, "_Experiment", started)
    err = _refused("bnn", flags, tmp_path, capsys)
    assert named in err and "give it once" in err, err
    # the same value both ways is one setting, not a conflict
    cfg = bnn.config_from_args(build_parser().parse_args(["bnn", "--solver", "cg", "--unlearner-kw", "solver=cg"]))
    assert bnn._unlearner_overrides(bnn._resolve(cfg))["solver"] == "cg"


# ------------------------------------------------------------------ C4: --threads alike; --quick described
@pytest.mark.parametrize("cmd", ["demo", "bnn", "forget", "status", "verify"])
def test_threads_takes_the_same_values_everywhere(cmd):
    """Was: demo took auto or N >= 1 and refused 0; bnn took N >= 0 and refused auto."""
    base = [
        cmd,
        *(["--model", "m"] if cmd in ("forget", "status", "verify") else []),
        *(["--ids", "1"] if cmd == "forget" else []),
    ]
    leave = 0 if cmd == "bnn" else None  # bnn's config takes 0; the library calls take None: "unchanged"
    assert build_parser().parse_args([*base, "--threads", "auto"]).threads == "auto"
    assert build_parser().parse_args([*base, "--threads", "0"]).threads == leave
    assert build_parser().parse_args([*base, "--threads", "3"]).threads == 3
    text = _help(cmd, "--threads")
    assert "'auto' (1 thread for models under a million parameters" in text
    assert "0 (leave torch's setting" in text and ">= 1" in text


@pytest.mark.parametrize("cmd", ["demo", "bnn"])
@pytest.mark.parametrize("value", ["-1", "x", "1.5"])
def test_threads_refusal_is_the_same_everywhere(cmd, value, tmp_path, capsys, no_run):
    err = _refused(cmd, ["--threads", value], tmp_path, capsys)
    assert (
        "error: --threads must be 'auto' (by model size), 0 (leave torch's setting) or a whole number >= 1, "
        f"got '{value}'" in err
    ), err


@pytest.mark.parametrize("cmd", ["demo", "bnn"])
def test_threads_over_four_per_cpu_is_refused_naming_the_bound(cmd, tmp_path, capsys, no_run, monkeypatch):
    """Was: ``--threads 9999`` was taken (torch was asked for that many threads); now 1 to 4x the CPUs."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    err = _refused(cmd, ["--threads", "9999"], tmp_path, capsys)
    assert "error: --threads must be at most 8 (4x this machine's 2 CPUs" in err and "got '9999'" in err, err
    err = _refused(cmd, ["--threads", "9"], tmp_path, capsys)
    assert "--threads must be at most 8" in err, err
    base = [cmd, *(["--quick"] if cmd == "bnn" else [])]
    assert build_parser().parse_args([*base, "--threads", "8"]).threads == 8  # the bound itself is taken


def test_threads_zero_and_auto_reach_the_runs(tmp_path, capsys, monkeypatch):
    seen: dict[str, object] = {}

    def demo(**kw):
        seen["demo"] = kw["threads"]
        raise ValueError("stopped by the test")

    def run(cfg, out):
        seen["bnn"] = cfg.threads
        raise ValueError("stopped by the test")

    monkeypatch.setattr(gmm, "run_demo", demo)
    monkeypatch.setattr(bnn, "run_bnn", run)
    assert main(["demo", "--threads", "0", "--out", str(tmp_path / "d")]) == 2
    assert main(["bnn", "--quick", "--threads", "0", "--out", str(tmp_path / "b")]) == 2
    assert seen == {"demo": None, "bnn": 0}  # 0: torch's setting is left alone
    assert main(["bnn", "--quick", "--threads", "auto", "--out", str(tmp_path / "b")]) == 2
    assert seen["bnn"] == "auto"
    assert capsys.readouterr().err.count("stopped by the test") == 3


def test_bnn_threads_auto_resolves_by_network_size(tmp_path, capsys, monkeypatch):
    """``bnn --threads auto``: one thread for its small networks (as ``demo`` and ``forget``), restored after."""
    seen: list[int] = []

    def stop(*a, **k):
        seen.append(torch.get_num_threads())
        raise ValueError("stopped by the test")

    monkeypatch.setattr(bnn._Experiment, "_initial_weights", stop)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["bnn", "--quick", "--threads", "auto", "--out", str(tmp_path / "a")]) == 2
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(old)
    err = capsys.readouterr().err
    assert seen == [1], (seen, err)
    assert err.startswith("mcmc-unlearner bnn: 1 torch thread (--threads auto: "), err
    assert " parameters)\n" in err.splitlines(keepends=True)[0]


def test_bnn_quick_help_says_what_it_does():
    """Was: "a reduced run to validate the pipeline (see QUICK)", a constant users cannot see."""
    text = _help("bnn", "--quick")
    assert "QUICK" not in text
    q = bnn.QUICK
    for part in (f"{q['sample_steps']} sampling steps", f"{q['retrain_chains']} retrain chains",
                 f"at most {q['max_requests']} requests", f"at most {q['eval_max']} points per split"):  # fmt: skip
        assert part in text, (part, text)


# ------------------------------------------------------------------ C6: the marker of a dead run
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("with_host", [True, False])
def test_marker_of_a_dead_process_says_so(with_host, tmp_path, capsys, no_run):
    """Was: "is in use: another run is writing to it (or one was killed there)" when no run was alive."""
    out = tmp_path / "killed"
    out.mkdir()
    pid = _dead_pid()
    (out / RUN_MARKER).write_text(f"{pid} {socket.gethostname()}\n" if with_host else f"{pid}\n")
    (out / "progress.png").write_bytes(b"partial")
    for cmd in ("demo", "bnn"):
        rc = main([cmd, "--quiet", "--out", str(out)])
        o, err = capsys.readouterr()
        assert rc == ExitCode.REFUSED and not o and err.count("\n") == 1, (rc, o, err)
        assert f"process that was writing to it ({pid}) is no longer running on this host" in err, err
        assert f"remove the folder (rm -r '{out}') or choose a new folder" in err and "is in use" not in err
    assert sorted(os.listdir(out)) == sorted([RUN_MARKER, "progress.png"])  # refused, nothing touched


def test_marker_of_a_live_or_remote_process(tmp_path):
    from mcmc_unlearner.experiments.report import out_dir_problem

    out = tmp_path / "held"
    with claimed_out_dir(out, "x"):
        assert (out / RUN_MARKER).read_text().split() == [str(os.getpid()), socket.gethostname()]
        problem = out_dir_problem(out)
        assert f"is in use: another run is writing to it (process {os.getpid()})" in problem, problem
        assert "killed" not in problem
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / RUN_MARKER).write_text("12345 some-other-host\n")
    problem = out_dir_problem(remote)
    assert "another run is writing to it (process 12345 on 'some-other-host') (or one was killed there)" in problem


@pytest.mark.parametrize(
    ("given", "key", "value"), [("iter_T=5.0", "iter_T", 5), ("exact_max_dim=1e3", "exact_max_dim", 1000)]
)
def test_a_whole_number_written_as_a_float_in_unlearner_kw_is_taken_as_an_int(given, key, value):
    """``--unlearner-kw iter_T=5.0`` ran with 5 until the parser took the library's own check (stop 52), which
    refuses a float; the dedicated flags take ``1e2``, so this does too, as the int the library accepts."""
    cfg = bnn.config_from_args(build_parser().parse_args(["bnn", "--unlearner-kw", given]))
    got = bnn._unlearner_overrides(bnn._resolve(cfg))[key]
    assert got == value and type(got) is int


@pytest.mark.parametrize(
    ("settings", "key", "value"),
    [
        ({"unlearner_kwargs": {"iter_T": 5.0}}, "iter_T", 5),
        ({"samp_T": 2.0}, "samp_T", 2),
        ({"unlearner_kwargs": {"exact_max_dim": 1e3}}, "exact_max_dim", 1000),
    ],
)
def test_a_whole_number_written_as_a_float_from_python_reaches_the_run_as_an_int(settings, key, value):
    """From Python (``BNNConfig``) too: ``check_settings`` accepts ``iter_T=5.0`` as 5 before training, so the run's
    unlearner must be built with that 5; it was built with 5.0 and refused it after the chains were trained."""
    cfg = bnn._resolve(bnn.BNNConfig(**settings))
    got = bnn._unlearner_overrides(cfg)[key]
    assert got == value and type(got) is int
