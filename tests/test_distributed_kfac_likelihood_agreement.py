"""DistributedUnlearner with K-FAC: every rank uses the same likelihood (2 gloo processes).

``likelihood="auto"`` is identified on each rank's own rows (a rank holding none of the curvature rows: on its
weight-0 padding row). A scaled cross-entropy (``2·cross_entropy``, a tempered likelihood) reads as ambiguous on
confident rows (a temperature of 1/2 fits as well as the factor 2: the empirical Fisher) and as categorical on the
others, so one rank built the Monte-Carlo GGN and the other the empirical Fisher, and each divided the summed factors
by its own label passes (``mc_samples=2`` against 1; the output factor's eigenvalues 2x apart in a direct 2-rank
build): the ranks' requests then went apart and gloo aborted both processes on a collective of mismatched sizes
(SIGABRT, "Received data size doesn't match expected size"). The detected likelihoods are now all-reduced: where
they differ, every rank takes the empirical Fisher, and the ranks' banks agree to the bit."""

from __future__ import annotations

import json
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from _distributed_helpers import gaussian_log_prior, spawn


def _scaled_ce(m: torch.nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return 2.0 * F.cross_entropy(m(b[0]), b[1], reduction="none")


def _worker(rank: int, world: int, out: str) -> None:
    from mcmc_unlearner.curvature import ParamSpec
    from mcmc_unlearner.distributed import DistributedUnlearner
    from mcmc_unlearner.kronecker import detect_likelihood

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g)
    x[20:] *= 1000.0  # rank 1's remaining rows: confident predictions
    y = model(x).argmax(1).detach()
    theta = ParamSpec.flatten_module(model).detach()
    bank = theta[None] + 0.01 * torch.randn(6, theta.numel(), generator=torch.Generator().manual_seed(2))
    rem = torch.arange(4, 20) if rank == 0 else torch.arange(24, 40)
    mine = torch.arange(4 * rank, 4 * rank + 2) if rank == 0 else torch.arange(20, 22)
    alone = detect_likelihood(model, _scaled_ce, (x[rem], y[rem]))[0].value  # what this rank's rows identify
    un = DistributedUnlearner(
        model, bank=bank, nll=_scaled_ce, log_prior=gaussian_log_prior, solver="kfac", mc_samples=2
    )
    loader = DataLoader(TensorDataset(x[rem], y[rem], torch.full((16,), 1 / 32)), batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = un.remove((x[mine], y[mine], torch.ones(2)), loader, n_remaining=32, strict=False)
    found = {
        "alone": alone,
        "likelihood": report.info["kfac"]["likelihood"],
        "bank": un.bank.tolist(),
        "moved": float((un.bank - bank).norm()),
    }
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(found, f)


def test_ranks_whose_rows_identify_different_likelihoods_take_the_empirical_fisher_alike(tmp_path) -> None:
    spawn(_worker, str(tmp_path), timeout_s=60)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert (r0["alone"], r1["alone"]) == ("categorical", "empirical")  # the ranks' rows alone disagree
    assert r0["likelihood"] == r1["likelihood"] == "empirical"
    assert r0["moved"] > 0
    assert r0["bank"] == r1["bank"]  # the same removal on both ranks, to the bit
