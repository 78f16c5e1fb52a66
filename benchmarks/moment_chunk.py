"""The first-moment pass (``recenter_every``'s corrections, ``newton_steps``): rows per pass by the cache rule
(``MOMENT_CHUNK_BYTES``) against the former fixed ``RECENTER_ROW_CHUNK`` rows, in one process.

Each model's ``MCMCUnlearner._moment`` runs over ``--rows`` random rows at one stored sample, once per rule (the
first call, timed apart: the process's one-off costs land there), then the two rules alternating which goes first
for ``--reps`` repetitions; the script prints each rule's CPU time per row (median and range of the repetitions, the
first call) and CPU seconds in all (first included), the ratio per repetition (median and range) and of the totals,
the rows per pass each rule took, and the largest relative difference between the two gradients
(they sum the same rows in other groupings, so they agree to rounding). One torch thread (``--threads``)::

    OMP_NUM_THREADS=1 python benchmarks/moment_chunk.py --rows 20000 --reps 3
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchargs as A
import _timing as T
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
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) (set by --threads); {args.rows} rows; per "
        f"rule one first call, then {args.reps} repetitions interleaved (order alternating); CPU time"
    )
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
        passes: dict[str, int] = {}
        grads: dict[str, torch.Tensor] = {}

        def moment(rule: str, h_f=h_f, un=un, rows=rows, bank=bank, passes=passes, grads=grads) -> None:
            U.MOMENT_CHUNK_BYTES = cache_rule if rule == "cache rule" else 2**62
            passes[rule] = un._moment_rows()
            grads[rule] = un._moment(h_f, bank[:1], rows)

        try:
            fns = {"fixed": lambda: moment("fixed"), "cache rule": lambda: moment("cache rule")}
            t = T.interleaved(fns, args.reps, clock=time.process_time)
        finally:
            U.MOMENT_CHUNK_BYTES = cache_rule
        rel = float((grads["cache rule"] - grads["fixed"]).abs().max() / grads["fixed"].abs().max())
        us = 1e6 / args.rows
        print(
            f"{name}: {un._row_bytes:,} bytes saved a row; cache rule {passes['cache rule']} rows a pass "
            f"{T.describe(t['cache rule'], 'us/row', us, 1)}; fixed {passes['fixed']} rows a pass "
            f"{T.describe(t['fixed'], 'us/row', us, 1)}; fixed / cache rule {T.describe_ratio(t['ratio'])}; "
            f"largest gradient difference {rel:.1e} of the largest entry"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
