"""benchmarks/distributed.py must produce its table: a timing benchmark whose request fails the quality checks
(as it does at HEAD with the script's own defaults) must not crash with a QualityError traceback."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(os.environ.get("REPO_ROOT", Path(__file__).resolve().parents[1]))


def test_distributed_benchmark_runs_to_its_table() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "distributed.py"),
        "--procs",
        "1",
        "--n",
        "1000",
        "--steps",
        "50",
        "--bank",
        "10",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "s/request" in r.stdout
    assert "QualityError" not in r.stderr
