"""The benchmark scripts refuse bad arguments while parsing them: exit 2, one ``error:`` line naming the flag, no
traceback, within seconds (before any training); ``--json``/``--out`` paths are checked before any work."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
UNWRITABLE = "/proc/x/y.json"  # /proc takes no new folders, even for root

CASES = [
    ("run.py", ["--threads", "0"], "--threads"),
    ("run.py", ["--quick", "--cases", "conjugate", "--reps", "1", "--json", UNWRITABLE], "--json"),
    ("model_matrix.py", ["--retrains", "0"], "--retrains"),
    ("model_matrix.py", ["--seeds", "x"], "--seeds"),
    ("model_matrix.py", ["--threads", "-3"], "--threads"),
    ("check_linear.py", ["--requests", "1"], "--requests"),
    ("check_linear.py", ["--model", "bogus"], "--model"),
    ("check_linear.py", ["--requests", "3", "--from", "3"], "--from"),
    ("request_sequence.py", ["--requests", "0"], "--requests"),
    ("request_sequence.py", ["--source", "loader"], "--source"),
    ("request_sequence.py", ["--rows", "0"], "--rows"),
    ("request_sequence.py", ["--model", "bogus"], "--model"),
    ("request_sequence.py", ["--json", UNWRITABLE], "--json"),
    ("request_ab.py", ["--base", "/nonexistent"], "--base"),
    ("flow_sequence.py", ["--model", "bogus"], "--model"),
    ("flow_sequence.py", ["--base", "/nonexistent"], "--base"),
    ("flow_sequence.py", ["--requests", "200"], "--requests"),
    ("flow_sequence.py", ["--json", UNWRITABLE], "--json"),
    ("request_ab.py", ["--base", "src", "--requests", "3", "--from", "3"], "--from"),
    ("stream_seeds.py", ["--models", "bogus"], "--models"),
    ("stream_seeds.py", ["--stream-seeds", ""], "--stream-seeds"),
    ("layer_zoo.py", ["--models", "bogus"], "--models"),
    ("layer_zoo.py", ["--options", "notjson"], "--options"),
    ("layer_zoo.py", ["--json", UNWRITABLE], "--json"),
    ("layer_zoo.py", ["--threads", "0"], "--threads"),
    ("unseen_models.py", ["--models", "bogus"], "--models"),
    ("unseen_models.py", ["--options", "notjson"], "--options"),
    ("unseen_models.py", ["--steps", "0"], "--steps"),
    ("unseen_models.py", ["--json", UNWRITABLE], "--json"),
    ("kronecker.py", ["--draws", "0"], "--draws"),
    ("kronecker.py", ["--models", "bogus"], "--models"),
    ("kronecker.py", ["--threads", "0"], "--threads"),
    ("draw_batching.py", ["--reps", "0"], "--reps"),
    ("draw_batching.py", ["--networks", "bogus"], "--networks"),
    ("distributed.py", ["--json", UNWRITABLE], "--json"),
    ("distributed.py", ["--reps", "0"], "--reps"),
    ("distributed.py", ["--damping", "-1"], "--damping"),
    ("distributed.py", ["--damping", "fast"], "--damping"),
    ("service_checks.py", ["threads", "--model", "/nonexistent"], "--model"),
    ("service_checks.py", ["verify-race", "--json", UNWRITABLE], "--json"),
    ("gmm_seed_table.py", ["docs/runs/digits-s0"], "runs"),
    ("gmm_inheritance.py", ["--out", UNWRITABLE], "--out"),
    ("regression_newton.py", ["--variants", "bogus"], "--variants"),
    ("regression_newton.py", ["--seeds", "x"], "--seeds"),
    ("regression_newton.py", ["--threads", "0"], "--threads"),
    ("gate_first_look.py", ["--other", "2"], "--other"),  # the library's own count: compared with itself
    ("gate_first_look.py", ["--models", "bogus"], "--models"),
]


def _run(script: str, args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60
    )
    return out, time.perf_counter() - t0


def _assert_refused(out: subprocess.CompletedProcess, seconds: float, flag: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == out.stderr.strip().splitlines()[-1], out.stderr
    assert flag in errors[0], errors[0]
    assert seconds < 20, f"took {seconds:.1f} s: work was done before the refusal"  # imports only (~1-2 s)


@pytest.mark.parametrize(("script", "args", "flag"), CASES, ids=[f"{s}:{' '.join(a)}" for s, a, _ in CASES])
def test_bad_argument_is_refused_at_once(script: str, args: list[str], flag: str) -> None:
    out, seconds = _run(script, args)
    _assert_refused(out, seconds, flag)


def test_fmnist_variants_run_on_an_empty_cache_is_refused(tmp_path: Path) -> None:
    out, seconds = _run("fmnist_variants.py", ["run", "--cache", str(tmp_path / "empty")])
    _assert_refused(out, seconds, "--cache")
    assert "train --seed 0" in out.stderr


def test_curvlinops_check_help_works_without_curvlinops() -> None:
    out, _ = _run("curvlinops_check.py", ["--help"])
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_output_file_creates_the_folder_and_leaves_no_file(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("_benchargs", ROOT / "benchmarks" / "_benchargs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    target = tmp_path / "new" / "deeper" / "x.json"
    assert mod.output_file(str(target)) == target
    assert target.parent.is_dir() and list(target.parent.iterdir()) == []  # the probe file is gone
    target.write_text("kept")
    assert mod.output_file(str(target)) == target and target.read_text() == "kept"  # an existing file untouched
    with pytest.raises(Exception, match="is a folder"):
        mod.output_file(str(tmp_path))


def test_fmnist_variants_decompose_takes_one_saved_bank(tmp_path: Path) -> None:
    (tmp_path / "chains-s0.pt").write_bytes(b"")  # the refusals come before the chains are read
    out, seconds = _run("fmnist_variants.py", ["decompose", "--cache", str(tmp_path)])
    _assert_refused(out, seconds, "decompose takes exactly one saved bank name, got 0")
    out, seconds = _run("fmnist_variants.py", ["decompose", "--cache", str(tmp_path), "nosuch"])
    _assert_refused(out, seconds, "no saved bank(s) nosuch")


def test_gmm_seed_table_warns_about_a_seed_given_twice() -> None:
    """fmnist_table.py and `summary` warn when a seed is given twice; gmm_seed_table.py printed "seeds [0, 1, 1]" and
    a mean ± sd over them without a word (stop 45's probe)."""
    runs = ["docs/runs/gmm-0", "docs/runs/gmm-1", "docs/runs/gmm-1"]
    out, _ = _run("gmm_seed_table.py", runs)
    assert out.returncode == 0, out.stderr
    assert "warning: seed 1 given 2 times" in out.stderr and "seed 0 given" not in out.stderr
    out, _ = _run("gmm_seed_table.py", runs[:2])
    assert out.returncode == 0 and "warning" not in out.stderr
