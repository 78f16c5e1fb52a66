"""The first-moment pass (``recenter_every``'s corrections, ``newton_steps``): rows per pass by the cache rule
(``MOMENT_CHUNK_BYTES``) against the former fixed ``RECENTER_ROW_CHUNK`` rows, in one process.

Each model's ``MCMCUnlearner._moment`` runs over ``--rows`` random rows at one stored sample, the two rules
alternating which goes first for ``--reps`` repetitions; the script prints each rule's CPU time per row (median and
range), the ratio, the rows per pass each rule took, and the largest relative difference between the two gradients
(they sum the same rows in other groupings, so they agree to rounding). One torch thread (``--threads``)::

    OMP_NUM_THREADS=1 python benchmarks/moment_chunk.py --rows 20000 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchargs as A
import mcmc_unlearner.unlearner as U
from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.models.bnn import LeNet5


def _models() -> dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple[torch.Tensor, ...]]]]:
    def images(n: int) -> tuple[torch.Tensor, ...]:
        return torch.rand(n, 1, 32, 32), torch.randint(0, 10, (n,))

    def digits(n: int) -> tuple[torch.Tensor, ...]:
        return torch.rand(n, 64), torch.randint(0, 10, (n,))

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    return {"lenet5": (LeNet5, images), "digits-mlp": (mlp, digits)}


def _nll(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _log_prior(model: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in model.parameters()) / 0.1**2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=A.positive_int, default=20000)
    ap.add_argument("--reps", type=A.positive_int, default=3)
    ap.add_argument("--threads", type=A.positive_int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads}; {args.rows} rows, {args.reps} interleaved repetitions")
    cache_rule = U.MOMENT_CHUNK_BYTES
    for name, (build, data) in _models().items():
        torch.manual_seed(0)
        model = build()
        rows = data(args.rows)
        theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        bank = theta + 0.01 * torch.randn(4, theta.numel())
        un = MCMCUnlearner(model, None, nll=_nll, log_prior=_log_prior, bank=bank)
        un._bytes_per_row(un._energy_f(args.rows), theta, tuple(t[:8] for t in rows))
        h_f = un._h_f()
        times: dict[str, list[float]] = {"cache rule": [], "fixed": []}
        passes: dict[str, int] = {}
        grads: dict[str, torch.Tensor] = {}
        for rep in range(args.reps):
            order = ["cache rule", "fixed"] if rep % 2 == 0 else ["fixed", "cache rule"]
            for rule in order:
                U.MOMENT_CHUNK_BYTES = cache_rule if rule == "cache rule" else 2**62
                passes[rule] = un._moment_rows()
                t0 = time.process_time()
                grads[rule] = un._moment(h_f, bank[:1], rows)
                times[rule].append((time.process_time() - t0) / args.rows * 1e6)
        U.MOMENT_CHUNK_BYTES = cache_rule
        new, old = statistics.median(times["cache rule"]), statistics.median(times["fixed"])
        rel = float((grads["cache rule"] - grads["fixed"]).abs().max() / grads["fixed"].abs().max())
        print(
            f"{name}: {un._row_bytes:,} bytes saved a row; cache rule {passes['cache rule']} rows a pass "
            f"{new:.1f} us/row ({min(times['cache rule']):.1f}-{max(times['cache rule']):.1f}), "
            f"fixed {passes['fixed']} rows a pass {old:.1f} us/row "
            f"({min(times['fixed']):.1f}-{max(times['fixed']):.1f}); fixed / cache rule = {old / new:.2f}x; "
            f"largest gradient difference {rel:.1e} of the largest entry"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
