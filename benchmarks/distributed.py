"""Scaling of data-parallel sampling and one deletion request from 1 to N gloo processes on this machine.

    python benchmarks/distributed.py [--procs 1,2] [--n 8000] [--hidden 64] [--json OUT.json]

Each process runs with one thread (``torch.set_num_threads(1)``), so ``N`` processes use ``N`` cores. Every
run: a Bayesian MLP on synthetic 64-feature, 10-class data (the training set sharded over the ranks),
``--steps`` SGLD steps, a bank of ``--bank`` samples, then one deletion request of ``--removed`` ids with the
saddle-free low-rank solver on full-data curvature (``curvature_data="full"``: every curvature draw uses every
remaining point, so the Hessian-vector products dominate and split across shards). Timings are rank 0's wall
time between barriers. The request's parameters are compared with the 1-process run (relative difference:
floating-point summation order only). Communication volume per request is counted from the algorithm
(see the README section "Beyond one machine") and reported next to the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

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


def _worker(rank: int, world: int, port: int, out: str, cfg: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
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
            damping=1.0,
        )
        dist.barrier()
        t0 = time.perf_counter()
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
        report = un.forget(ids, data, strict=False)
        dist.barrier()
        t_req = time.perf_counter() - t0
        if rank == 0:
            save_file(
                {
                    "theta": ParamSpec.flatten_module(model),
                    "bank": un.bank,
                    "times": torch.tensor([t_steps / cfg["steps"], t_req], dtype=torch.float64),
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
                f"{out}/w{world}.safetensors",
            )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comm_floats(dim: int, bank: int, rank: int, probes: int = 4) -> dict[str, int]:
    """Floats all-reduced per request for the lowrank solver on full-data curvature (bank mode)."""
    grads = bank * dim  # per-draw gradients of the removed points: [S, D]
    hvps = (rank + probes + 1) * dim  # Lanczos steps + Hutchinson probes + the residual check, D each
    stderr = 0  # the error bar uses the preconditioner: no products
    return {"gradients": grads, "hessian_vector_products": hvps, "total": grads + hvps + stderr}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=A.int_list(1), default="1,2", help="comma-separated process counts")
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--bank", type=int, default=8)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--rank", type=int, default=10, help="Lanczos rank of the low-rank solver")
    ap.add_argument("--removed", type=int, default=80)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--json", type=A.output_file, default=None)
    args = ap.parse_args(argv)
    cfg = {k: getattr(args, k) for k in ("n", "hidden", "batch", "steps", "bank", "draws", "rank", "removed", "lr")}
    procs = [int(p) for p in args.procs.split(",")]
    results: dict[int, dict] = {}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")  # other jobs, measured before ours
    with tempfile.TemporaryDirectory() as out:
        for world in procs:
            mp.spawn(_worker, args=(world, _free_port(), out, cfg), nprocs=world, join=True)
            results[world] = load_file(str(Path(out) / f"w{world}.safetensors"))
    base = results[procs[0]]
    dim = int(base["report"][3])
    rows = []
    print(
        f"MLP 64-{cfg['hidden']}-10 (D = {dim}), n = {cfg['n']}, batch {cfg['batch']}, bank {cfg['bank']}, "
        f"{cfg['draws']} curvature draws on all remaining data, lowrank rank {cfg['rank']}"
    )
    print(
        f"{os.cpu_count()} CPUs ({platform.machine()}), load average before the runs {load:.2f} "
        "(other jobs on the same cores shrink the speedup)"
    )
    print(f"{'procs':>5} {'s/SGLD step':>12} {'speedup':>8} {'s/request':>10} {'speedup':>8} {'rel. diff':>10}")
    for world in procs:
        r = results[world]
        step, req = (float(v) for v in r["times"])
        diff = float((r["theta"] - base["theta"]).norm() / base["theta"].norm())
        row = {
            "procs": world,
            "seconds_per_step": step,
            "seconds_per_request": req,
            "step_speedup": float(base["times"][0]) / step,
            "request_speedup": float(base["times"][1]) / req,
            "relative_param_diff_vs_first": diff,
            "hessian_products_local": int(r["report"][0]),
            "request_failed_checks": int(r["report"][4]),
        }
        rows.append(row)
        print(
            f"{world:>5} {step:>12.4f} {row['step_speedup']:>8.2f} {req:>10.3f} {row['request_speedup']:>8.2f} "
            f"{diff:>10.1e}"
            + ("  (the request failed its quality checks; timed anyway)" if row["request_failed_checks"] else "")
        )
    comm = comm_floats(dim, cfg["bank"], cfg["rank"])
    print(
        f"all-reduced per request: {comm['total']} floats ({comm['total'] * 4 / 1e6:.2f} MB float32); "
        f"per SGLD step: {dim} floats"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "config": cfg,
                    "dim": dim,
                    "cpus": os.cpu_count(),
                    "load_average": load,
                    "rows": rows,
                    "comm_floats": comm,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
