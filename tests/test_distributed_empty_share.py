"""A rank whose share of a deletion request is empty (every removed row lives on another rank), the remaining data
given as each rank's ``DataLoader`` (2 gloo processes against one process on the union of the rows).

Before (stop 70; also at 0e9dae4): the rank with no removed rows crashed in the removed-rows-kept check
(``_flat_real``'s ``reshape(0, -1)`` of its empty removed rows: "cannot reshape tensor of 0 elements"), and the other
rank stopped with ``RankFailedError``. A rank with no removed rows now takes part in the request as any other (its
``G`` contribution zero): the shifted bank is the one-process request's on the union of the rows. A request empty on
every rank is refused on every rank with the "empty request" message, nothing changed.

A Poisson regression whose batches are ``(x, counts, exposure)``: the rank without removed rows skipped the label
probe and kept no output width, where the other rank read it (1) and left the spread rule's label counts uncounted
(counts above the width are no labels); the first all-reduced the counts alone, and gloo aborted both processes
("Received data size doesn't match expected size"). The ranks now agree on the width."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from _distributed_helpers import ce_nll, gaussian_log_prior, spawn
from mcmc_unlearner import MCMCUnlearner
from test_distributed_uneven_ranks import _setup as _uneven_setup

N, BATCH = 120, 16  # BATCH rows a rank's loader yields: global minibatches of 2·BATCH rows
REMOVED = [0, 2, 4, 6, 8, 10, 12, 14]  # rows 0-14 even: every one on rank 0 (row i lives on rank i % 2)
SOLVERS = {
    "auto": {},
    "kfac": dict(solver="kfac", mc_samples=3),  # 3 labels ≤ mc_samples: the exact expectation, one process's factors
    "exact": dict(solver="exact"),
}


def _setup() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module, torch.Tensor]:
    """Three labels from two features, a 5-6-3 tanh network fitted a little, and a bank of 6 samples around it
    (`test_distributed_uneven_ranks`'s setup on ``N`` rows)."""
    return _uneven_setup(6, N)


def _kept(rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s remaining rows (``i % world == rank``, the removed rows left out)."""
    rows = torch.arange(rank, N, world)
    return rows[~torch.isin(rows, torch.tensor(REMOVED))]


def _one_process_loader(x: torch.Tensor, y: torch.Tensor, world: int) -> DataLoader:
    """The union of the ranks' loaders: global minibatch ``i`` is every rank's minibatch ``i`` (rank 0's rows
    first), as one process reads it."""
    kept = [_kept(r, world) for r in range(world)]
    order = []
    for i in range(0, max(len(k) for k in kept), BATCH):
        order += [k[i : i + BATCH] for k in kept]
    rows = torch.cat(order)
    return DataLoader(TensorDataset(x[rows], y[rows]), batch_size=BATCH * world)


def _forget(solver: str, rank: int, world: int, removed: list[int]) -> dict:
    from mcmc_unlearner.distributed import DistributedUnlearner

    x, y, model, bank = _setup()
    kw = dict(nll=ce_nll, log_prior=gaussian_log_prior, **SOLVERS[solver])
    ids = torch.tensor(removed, dtype=torch.long)
    n = N - len(removed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the fixed-order loader's warning is not what is tested)
        if world == 1:
            un = MCMCUnlearner(model, bank=bank, **kw)
            report = un.remove((x[ids], y[ids]), _one_process_loader(x, y, 2), n_remaining=n, strict=False)
            return {"bank": un.bank.tolist(), "shift": (un.bank - bank).norm().item(), "removed": report.n_removed}
        un = DistributedUnlearner(model, bank=bank, **kw)
        mine = ids[ids % world == rank]
        kept = _kept(rank, world)
        loader = DataLoader(TensorDataset(x[kept], y[kept], torch.full((len(kept),), 1.0 / (BATCH * world))),
                            batch_size=BATCH)  # fmt: skip
        params = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        try:
            report = un.remove((x[mine], y[mine], torch.ones(len(mine))), loader, n_remaining=n, strict=False)
        except Exception as e:  # the message is what is compared
            same = torch.equal(un.bank, bank) and torch.equal(
                torch.nn.utils.parameters_to_vector(model.parameters()), params
            )
            return {"error": f"{type(e).__name__}: {e}", "unchanged": same}
        return {"bank": un.bank.tolist(), "shift": (un.bank - bank).norm().item(), "removed": report.n_removed}


def _worker(rank: int, world: int, out: str) -> None:
    found = {s: _forget(s, rank, world, REMOVED) for s in SOLVERS}
    found["none"] = _forget("auto", rank, world, [])
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(found, f)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("empty-share")
    spawn(_worker, str(out), timeout_s=120)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_a_rank_with_no_removed_rows_takes_part_and_matches_one_process(two_ranks, solver) -> None:
    r0, r1 = (r[solver] for r in two_ranks)
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))
    assert r0 == r1  # every rank computed the same removal, to the bit
    one = _forget(solver, 0, 1, REMOVED)
    assert r0["removed"] == one["removed"] == len(REMOVED)
    gap = (torch.tensor(r0["bank"]) - torch.tensor(one["bank"])).norm().item()
    assert one["shift"] > 1e-3
    assert gap < 1e-4 * one["shift"], (gap, one["shift"])


def test_a_request_empty_on_every_rank_is_refused_on_every_rank(two_ranks) -> None:
    for r in two_ranks:
        assert "deletion request is empty on every rank" in r["none"]["error"], r["none"]["error"]
        assert r["none"]["unchanged"]


def _poisson_nll(m: torch.nn.Module, b: tuple) -> torch.Tensor:
    """A Poisson log-rate regression with an exposure: ``(x, counts, exposure)`` rows."""
    return torch.nn.functional.poisson_nll_loss(m(b[0]).squeeze(-1) + b[2].log(), b[1].float(), reduction="none")


def _poisson_forget(rank: int, world: int) -> dict:
    """Rows 0-10 even (all on rank 0 of 2) forgotten from a Poisson regression, through a ``ShardedDataset``."""
    from mcmc_unlearner import RemovableDataset
    from mcmc_unlearner.distributed import DistributedUnlearner, ShardedDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, generator=g)
    exposure = 0.5 + torch.rand(N, generator=g)
    y = torch.poisson(exposure * torch.exp(0.8 * x[:, 0] + 0.5), generator=g).long()
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.05 * torch.randn(6, theta.numel(), generator=g)
    kw = dict(nll=_poisson_nll, log_prior=gaussian_log_prior, solver="kfac")
    if world == 1:
        un, data = MCMCUnlearner(model, bank=bank, **kw), RemovableDataset(x, y, exposure, batch_size=16, seed=4)
    else:
        un = DistributedUnlearner(model, bank=bank, **kw)
        data = ShardedDataset.from_global(x, y, exposure, rank=rank, world=world, batch_size=16, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        un.forget([0, 2, 4, 6, 8, 10], data, strict=False)
    return {"bank": un.bank.tolist(), "shift": (un.bank - bank).norm().item()}


def _poisson_worker(rank: int, world: int, out: str) -> None:
    with open(f"{out}/poisson-rank{rank}.json", "w") as f:
        json.dump(_poisson_forget(rank, world), f)


def test_a_rank_with_no_removed_rows_agrees_on_the_output_width_of_a_count_regression(tmp_path) -> None:
    spawn(_poisson_worker, str(tmp_path), timeout_s=60)
    r0, r1 = (json.loads((tmp_path / f"poisson-rank{r}.json").read_text()) for r in range(2))
    assert r0 == r1
    one = _poisson_forget(0, 1)
    gap = (torch.tensor(r0["bank"]) - torch.tensor(one["bank"])).norm().item()
    assert one["shift"] > 1e-3
    assert gap < 1e-4 * one["shift"], (gap, one["shift"])
