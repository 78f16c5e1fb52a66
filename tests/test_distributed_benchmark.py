"""benchmarks/distributed.py must produce its table: a timing benchmark whose request fails the quality checks
(as it did with the script's former fixed damping=1.0; its defaults now pass) must not crash with a QualityError
traceback. Its communication is counted (the tensors passed to the collectives), not computed from a formula, and it
runs repetitions whose spread it reports."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from _distributed_helpers import spawn

ROOT = Path(os.environ.get("REPO_ROOT", Path(__file__).resolve().parents[1]))


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_distributed", ROOT / "benchmarks" / "distributed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _counter_worker(rank: int, world: int, out: str) -> None:
    bench = _bench_module()
    from mcmc_unlearner.distributed import _all_reduce

    original = dist.all_reduce
    sums = []
    with bench.CollectiveCounter() as c:
        for t in (torch.ones(3), torch.ones(5, dtype=torch.float64)):
            dist.all_reduce(t)
            sums.append(t)
        dist.all_reduce(torch.ones(2, dtype=torch.int64), op=dist.ReduceOp.MAX)
        dist.all_reduce(tensor=torch.ones(2, 2))
        sums.append(_all_reduce(torch.ones(4, 3).t(), None))  # the library's path: a non-contiguous tensor
        b = torch.full((6,), float(rank))
        dist.broadcast(b, src=0)
        gathered = [torch.zeros(2) for _ in range(world)]
        dist.all_gather(gathered, torch.full((2,), float(rank)))
    dist.all_reduce(torch.ones(100))  # after the block: not counted
    save_file(
        {
            "counts": c.as_tensor(),
            "restored": torch.tensor([float(dist.all_reduce is original)]),
            "sums": torch.cat([s.reshape(-1).double() for s in sums]),
            "broadcast": b,
            "gathered": torch.cat(gathered),
        },
        f"{out}/rank{rank}.safetensors",
    )


def test_collective_counter_counts_the_tensors_passed_in_a_two_process_gloo_run(tmp_path: Path) -> None:
    spawn(_counter_worker, str(tmp_path), timeout_s=1800)
    bench = _bench_module()
    for rank in range(2):
        r = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        counts = bench.counts_from_tensor(r["counts"])
        # all_reduce: 3 + 5 + 4 (2x2) + 12 (the library's 4x3 buffer) floats in 4 calls, 2 int64 elements in 1
        assert counts["all_reduce"] == {"calls": 5, "floats": 3 + 5 + 4 + 12, "other": 2}
        assert counts["broadcast"] == {"calls": 1, "floats": 6, "other": 0}
        assert counts["all_gather"] == {"calls": 1, "floats": 2, "other": 0}  # the tensor this rank sends
        assert r["restored"].item() == 1.0
        assert torch.equal(r["sums"], torch.full((20,), 2.0, dtype=torch.float64))  # the originals still ran
        assert torch.equal(r["broadcast"], torch.zeros(6))
        assert torch.equal(r["gathered"], torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_distributed_benchmark_runs_to_its_table(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "d.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--procs", "2", "--reps", "1",
           "--n", "600", "--steps", "20", "--bank", "10", "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "s/request" in r.stdout
    assert "QualityError" not in r.stderr
    res = json.loads(out.read_text())
    (two,) = res["rows"]
    dim = res["dim"]
    # an SGLD step all-reduces its gradient once: D floats (README, "Beyond one machine")
    assert two["step_floats_all_reduced"] == dim and two["steps_comm"]["all_reduce"]["calls"] == 20
    # the request: G (bank x D), one D-vector per Lanczos step and Hutchinson probe, the 80 ids' finiteness flags
    # (README, "Beyond one machine"; comm_floats), and a few agreement flags and check sums: under one more D-vector
    formula = res["comm_floats"]
    assert formula["total"] == 10 * dim + (10 + 4) * dim + 80
    assert 0 <= two["request_floats_all_reduced"] - formula["total"] < dim
    assert two["request_floats_all_reduced"] == two["request_comm"]["all_reduce"]["floats"]
    assert two["reps"] == 1 and two["seconds_per_request"] == two["seconds_per_request_spread"]["median"]
    total = two["seconds_total_spread"]["median"]
    assert abs(total - (20 * two["seconds_per_step"] + two["seconds_per_request"])) < 1e-9
    assert two["speedup_spread"]["request"] == {"median": 1.0, "min": 1.0, "max": 1.0}  # against itself


def test_distributed_benchmark_default_request_passes_its_quality_checks(tmp_path: Path) -> None:
    """The timed request at the script's defaults (one process) is one the library accepts, not a refused one."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "d.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--procs", "1", "--reps", "1",
           "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["config"]["damping"] == "auto"
    assert res["rows"][0]["request_failed_checks"] == 0
    assert "failed its quality checks" not in r.stdout
