"""Scaling of data-parallel sampling and one deletion request from 1 to N gloo processes on this machine.

    python benchmarks/distributed.py [--procs 1,2] [--reps 3] [--n 8000] [--hidden 32] [--json OUT.json]

Each process runs with one thread (``torch.set_num_threads(1)``), so ``N`` processes use ``N`` cores. Every
run (``--reps`` repetitions of each process count, interleaved: 1, 2, then 2, 1, ...): a Bayesian MLP on synthetic
64-feature, 10-class data (the training set sharded over the ranks),
``--steps`` SGLD steps, a bank of ``--bank`` samples, then one deletion request of ``--removed`` ids with the
saddle-free low-rank solver on full-data curvature (``curvature_data="full"``: every curvature draw uses every
remaining point, so the Hessian-vector products dominate and split across shards) and ``--damping`` (default
``auto``, the library's damping control: at the script's defaults the request passes its quality checks; a request
that fails them is timed anyway and marked in the table). Timings are rank 0's wall
time between barriers: the median and range over the repetitions of the time per SGLD step, of the request and of
the run's total (all steps plus the request), and of the speed-ups (each repetition's ratio to the first process
count's run of the same repetition). The request's parameters are compared with the first process count's run
(relative difference: floating-point summation order only). Communication is counted, not computed: rank 0 wraps
``torch.distributed.all_reduce``/``broadcast``/``all_gather`` (:class:`CollectiveCounter`) around the steps and
around the request and records the elements of every tensor passed to them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.distributed import DistributedUnlearner, ShardedDataset
from mcmc_unlearner.models.bnn import build_model
from mcmc_unlearner.samplers import SGLD

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder: _benchargs
import _benchargs as A


def _data(n: int, features: int = 64, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=g) / features**0.5
    y = torch.distributions.Categorical(logits=3 * x @ w).sample()  # global RNG, seeded below
    return x, y


COLLECTIVES = ("all_reduce", "broadcast", "all_gather")


class CollectiveCounter:
    """Counts the calls and elements of ``torch.distributed`` collectives made while it is active.

    As a context manager it replaces ``all_reduce``, ``broadcast`` and ``all_gather`` of the ``torch.distributed``
    module (the library calls them through that module) with wrappers that record the tensor each rank passes
    (``all_gather``: the tensor it sends), then call the original. ``counts[op]`` holds ``calls``, ``floats``
    (elements of floating-point tensors) and ``other`` (elements of integer or boolean tensors).
    """

    def __init__(self) -> None:
        self.counts = {op: {"calls": 0, "floats": 0, "other": 0} for op in COLLECTIVES}
        self._saved: dict[str, Callable[..., Any]] = {}

    def _wrap(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            sent = (
                (args[1] if len(args) > 1 else kwargs["tensor"])
                if op == "all_gather"
                else (args[0] if args else kwargs["tensor"])
            )
            c = self.counts[op]
            c["calls"] += 1
            c["floats" if sent.is_floating_point() else "other"] += sent.numel()
            return fn(*args, **kwargs)

        return counted

    def __enter__(self) -> CollectiveCounter:
        for op in COLLECTIVES:
            self._saved[op] = getattr(dist, op)
            setattr(dist, op, self._wrap(op, self._saved[op]))
        return self

    def __exit__(self, *exc: object) -> None:
        for op, fn in self._saved.items():
            setattr(dist, op, fn)
        self._saved.clear()

    def as_tensor(self) -> torch.Tensor:
        """``[len(COLLECTIVES), 3]`` float64: calls, floats, other elements per collective."""
        return torch.tensor([[self.counts[op][k] for k in ("calls", "floats", "other")] for op in COLLECTIVES],
                            dtype=torch.float64)  # fmt: skip


def counts_from_tensor(t: torch.Tensor) -> dict[str, dict[str, int]]:
    """The inverse of :meth:`CollectiveCounter.as_tensor`."""
    return {op: {k: int(v) for k, v in zip(("calls", "floats", "other"), row)} for op, row in zip(COLLECTIVES, t)}


def _worker(rank: int, world: int, init_method: str, out: str, cfg: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        x, y = _data(cfg["n"])
        model = build_model("mlp", (64,), 10, prior_std=1.0, hidden=(cfg["hidden"],))
        torch.manual_seed(1)
        for p in model.parameters():  # identical initialisation on every rank
            torch.nn.init.normal_(p, std=0.1)
        sampler = SGLD(model.parameters(), lr=cfg["lr"], generator=torch.Generator().manual_seed(2))
        data = ShardedDataset.from_global(x, y, rank=rank, world=world, batch_size=cfg["batch"], seed=3)
        un = DistributedUnlearner(
            model,
            sampler,
            solver="lowrank",
            precondition_rank=cfg["rank"],
            curvature_draws=cfg["draws"],
            curvature_data="full",
            damping=cfg["damping"],
        )
        dist.barrier()
        t0 = time.perf_counter()
        with CollectiveCounter() as comm_steps:
            for i in range(cfg["steps"]):
                un.step(data)
                if i >= cfg["steps"] - cfg["bank"]:
                    un.collect()
        dist.barrier()
        t_steps = time.perf_counter() - t0
        ids = torch.arange(0, cfg["n"], cfg["n"] // cfg["removed"])[: cfg["removed"]]
        dist.barrier()
        t0 = time.perf_counter()
        # a timing benchmark: time the request even when it fails the quality checks (reported below)
        with CollectiveCounter() as comm_request:
            report = un.forget(ids, data, strict=False)
        dist.barrier()
        t_req = time.perf_counter() - t0
        if rank == 0:
            save_file(
                {
                    "theta": ParamSpec.flatten_module(model),
                    "bank": un.bank,
                    "times": torch.tensor([t_steps / cfg["steps"], t_req], dtype=torch.float64),
                    "comm_steps": comm_steps.as_tensor(),
                    "comm_request": comm_request.as_tensor(),
                    "report": torch.tensor(
                        [
                            report.hessian_products,
                            report.iterations,
                            report.residual,
                            un.spec.dim,
                            len(report.problems),
                        ],
                        dtype=torch.float64,
                    ),
                },
                f"{out}/w{world}-r{cfg['rep']}.safetensors",
            )
        dist.barrier()  # tear down together: gloo aborts a process whose peer exits mid-teardown
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalisation: gloo's worker threads can abort the process (SIGABRT) while Python tears
    # down (as in tests/test_distributed.py); the results are already on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def comm_floats(dim: int, bank: int, rank: int, removed: int, probes: int = 4) -> dict[str, int]:
    """The README table's floats all-reduced per request for the lowrank solver on full-data curvature (bank mode),
    without the ranks' agreement flags and the safety check's sums (a few floats); kept for comparison: the
    benchmark reports what it counts (:class:`CollectiveCounter`)."""
    grads = bank * dim  # per-draw gradients of the removed points: [S, D]
    hvps = (rank + probes) * dim  # Lanczos steps + Hutchinson probes, D each; the residual is against the approximation
    finite = removed  # the removed rows' finiteness flags
    return {"gradients": grads, "hessian_vector_products": hvps, "finiteness": finite, "total": grads + hvps + finite}


def _damping(text: str) -> float | str:
    """``--damping``: ``auto`` or a finite number >= 0."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a finite number >= 0, got {text!r}")
    return value


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of one quantity over the repetitions."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _fmt(sp: dict[str, float], width: int, digits: int) -> str:
    return f"{sp['median']:>{width}.{digits}f} ({sp['min']:.{digits}f}-{sp['max']:.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=A.int_list(1), default="1,2", help="comma-separated process counts")
    ap.add_argument("--reps", type=A.positive_int, default=3, help="repetitions of each process count, interleaved")
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--bank", type=int, default=8)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--rank", type=int, default=10, help="Lanczos rank of the low-rank solver")
    ap.add_argument("--removed", type=int, default=80)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument(
        "--damping",
        type=_damping,
        default="auto",
        help="the request's damping: 'auto' (the library's default; at the other defaults the request passes its "
        "quality checks) or a fixed value >= 0 (1.0 before 2026-12-05: that request failed its checks, timed anyway)",
    )
    ap.add_argument("--json", type=A.output_file, default=None)
    args = ap.parse_args(argv)
    keys = ("n", "hidden", "batch", "steps", "bank", "draws", "rank", "removed", "lr", "damping")
    cfg = {k: getattr(args, k) for k in keys}
    procs = [int(p) for p in args.procs.split(",")]
    runs: dict[int, list[dict]] = {w: [] for w in procs}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")  # other jobs, measured before ours
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        for rep in range(args.reps):
            for world in procs if rep % 2 == 0 else procs[::-1]:  # interleaved, the order alternating
                t0 = time.perf_counter()
                # the ranks meet through a new file (no TCP port picked free, then bound: another process could take it)
                store = "file://" + str(Path(out) / f"rendezvous-w{world}-r{rep}")
                mp.spawn(_worker, args=(world, store, out, {**cfg, "rep": rep}), nprocs=world, join=True)
                r = load_file(str(Path(out) / f"w{world}-r{rep}.safetensors"))
                r["wall"] = torch.tensor(time.perf_counter() - t0)
                runs[world].append(r)
    wall_all = time.perf_counter() - t_all
    base = runs[procs[0]]
    dim = int(base[0]["report"][3])
    rows = []
    print(
        f"MLP 64-{cfg['hidden']}-10 (D = {dim}), n = {cfg['n']}, batch {cfg['batch']}, bank {cfg['bank']}, "
        f"{cfg['draws']} curvature draws on all remaining data, lowrank rank {cfg['rank']}, damping {cfg['damping']}; "
        "one thread per process"
    )
    print(
        f"{os.cpu_count()} CPUs ({platform.machine()}), load average before the runs {load:.2f} "
        "(other jobs on the same cores shrink the speedup)"
    )
    print(
        f"{args.reps} interleaved repetitions per process count: median (min-max); speed-ups are per-repetition "
        f"ratios to {procs[0]} process(es); total = {cfg['steps']} SGLD steps + the request"
    )
    print(
        f"{'procs':>5} {'s/SGLD step':>22} {'speedup':>17} {'s/request':>19} {'speedup':>17} {'s total':>19} "
        f"{'speedup':>17} {'rel. diff':>9} {'floats all-reduced/request':>27} {'/step':>6}"
    )
    for world in procs:
        rs = runs[world]
        step = [float(r["times"][0]) for r in rs]
        req = [float(r["times"][1]) for r in rs]
        total = [s * cfg["steps"] + q for s, q in zip(step, req)]
        b_step = [float(r["times"][0]) for r in base]
        b_req = [float(r["times"][1]) for r in base]
        b_total = [s * cfg["steps"] + q for s, q in zip(b_step, b_req)]
        diff = max(float((r["theta"] - b["theta"]).norm() / b["theta"].norm()) for r, b in zip(rs, base))
        comm_req = [counts_from_tensor(r["comm_request"]) for r in rs]
        comm_steps = [counts_from_tensor(r["comm_steps"]) for r in rs]
        if any(c != comm_req[0] for c in comm_req) or any(c != comm_steps[0] for c in comm_steps):
            print(f"  note: {world} process(es): the counted communication differs between repetitions")
        floats_req = comm_req[0]["all_reduce"]["floats"]
        floats_step = comm_steps[0]["all_reduce"]["floats"] / cfg["steps"]
        sp = {
            "step": spread([b / s for b, s in zip(b_step, step)]),
            "request": spread([b / q for b, q in zip(b_req, req)]),
            "total": spread([b / t for b, t in zip(b_total, total)]),
        }
        row = {
            "procs": world,
            "seconds_per_step": statistics.median(step),
            "seconds_per_request": statistics.median(req),
            "step_speedup": sp["step"]["median"],
            "request_speedup": sp["request"]["median"],
            "relative_param_diff_vs_first": diff,
            "hessian_products_local": int(rs[0]["report"][0]),
            "request_failed_checks": max(int(r["report"][4]) for r in rs),
            "reps": len(rs),
            "seconds_per_step_spread": spread(step),
            "seconds_per_request_spread": spread(req),
            "seconds_total_spread": spread(total),
            "speedup_spread": sp,
            "seconds_per_step_runs": step,
            "seconds_per_request_runs": req,
            "wall_seconds_per_run": [float(r["wall"]) for r in rs],  # spawn, imports, data, steps, request
            "request_floats_all_reduced": floats_req,
            "step_floats_all_reduced": floats_step,
            "request_comm": comm_req[0],
            "steps_comm": comm_steps[0],
        }
        rows.append(row)
        print(
            f"{world:>5} {_fmt(spread(step), 6, 4)} {_fmt(sp['step'], 5, 2)} {_fmt(spread(req), 5, 3)} "
            f"{_fmt(sp['request'], 5, 2)} {_fmt(spread(total), 5, 3)} {_fmt(sp['total'], 5, 2)} {diff:>9.1e} "
            f"{floats_req:>27,d} {floats_step:>6,.0f}"
            + ("  (the request failed its quality checks; timed anyway)" if row["request_failed_checks"] else "")
        )
    comm = comm_floats(dim, cfg["bank"], cfg["rank"], cfg["removed"])
    counted = [r for r in rows if r["procs"] > 1]
    if counted:
        c = counted[0]["request_comm"]
        print(
            f"counted on rank 0 of {counted[0]['procs']} processes, per request: all_reduce {c['all_reduce']['calls']} "
            f"calls, {c['all_reduce']['floats']:,d} floats ({c['all_reduce']['floats'] * 4 / 1e6:.2f} MB float32) + "
            f"{c['all_reduce']['other']:,d} other elements; all_gather {c['all_gather']['calls']} calls, "
            f"{c['all_gather']['floats'] + c['all_gather']['other']:,d} elements; broadcast {c['broadcast']['calls']} "
            f"calls (the README's table: {comm['total']:,d} floats, plus a few agreement flags and safety-check sums); "
            "one process communicates nothing"
        )
    print(f"total wall time {wall_all:.1f} s for {args.reps * len(procs)} runs (process start-up included)")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "config": cfg,
                    "dim": dim,
                    "cpus": os.cpu_count(),
                    "threads_per_process": 1,
                    "load_average": load,
                    "reps": args.reps,
                    "rows": rows,
                    "comm_floats": comm,  # the README's formula, kept for comparison; counts: rows[*]["request_comm"]
                    "wall_seconds": wall_all,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
