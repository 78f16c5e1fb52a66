"""DistributedUnlearner: what one rank alone could refuse must be agreed on by all ranks (2 gloo processes).

Before (stop 32's probes): an empty share on one rank was refused there while the other rank entered a collective
(gloo 'Connection reset' / hang); a bank on one rank and none on the other aborted the process (SIGABRT, gloo
EnforceNotMet) instead of the documented refusal; a DataLoader's local length was used as n on each rank (each rank
a different n, a 3x shift, every check passed); a bank differing by 1e-6 was not detected (float32 sums).
"""

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from _distributed_helpers import spawn

N = 200


def _setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.05 * torch.randn(20, theta.numel(), generator=g)
    return x, y, model, bank


def _nll(m, b):
    return torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")


def _lp(m):
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _worker(rank, world, out):
    from mcmc_unlearner.distributed import DistributedUnlearner, ShardedDataset
    from mcmc_unlearner.errors import InvalidRequestError

    res = []
    x, y, model, bank = _setup()
    kw = dict(nll=_nll, log_prior=_lp, solver="exact")
    # 1. rows on rank 0 only: rank 1's share is empty; the same removal as forget(ids, ShardedDataset)
    ids = torch.arange(0, 20, 2)
    ds = ShardedDataset.from_global(x, y, rank=rank, world=world, batch_size=32, seed=1)
    un = DistributedUnlearner(model, bank=bank, **kw)
    un.forget(ids, ds)
    ref_bank = un.bank.clone()
    x, y, model, bank = _setup()
    ds = ShardedDataset.from_global(x, y, rank=rank, world=world, batch_size=32, seed=1)
    un = DistributedUnlearner(model, bank=bank, **kw)
    mine = ids[ids % world == rank]
    xs, ys = ds.get_global(mine)
    ds.remove(ids)
    un.remove((xs, ys, torch.ones(len(mine))), ds)
    res.append(float((un.bank - ref_bank).norm() / (ref_bank - bank).norm()) < 1e-4)
    # 2. a bank on rank 1 only: refused on both ranks
    x, y, model, bank = _setup()
    try:
        DistributedUnlearner(model, bank=bank if rank == 1 else None, **kw)
        res.append(False)
    except InvalidRequestError:
        res.append(True)
    # 3. banks differing by 1e-6 in one value: refused on both ranks
    b2 = bank.clone()
    if rank == 1:
        b2[3, 0] += 1e-6
    try:
        DistributedUnlearner(model, bank=b2, **kw)
        res.append(False)
    except InvalidRequestError:
        res.append(True)
    # 4. a DataLoader of the rank's rows: its length is the rank's own, not the global count -> refused
    un = DistributedUnlearner(model, bank=bank, **kw)
    loc = torch.arange(rank, N, world)[10 // world :]
    loader = DataLoader(TensorDataset(x[loc], y[loc], torch.full((len(loc),), 1 / 64)), batch_size=32)
    try:
        un.remove((xs, ys, torch.ones(len(mine))), loader)
        res.append(False)
    except ValueError:
        res.append(torch.equal(un.bank, bank))
    # 5. memory budgets resolved from each rank's own free memory ("25%"): one rank refused the dense solver at
    # construction while the other waited in a collective; both now take the smallest budget (and refuse together)
    import mcmc_unlearner.memory as mem

    real = mem.available_memory
    mem.available_memory = lambda: [4 * 30_000, 4 * 200_000][rank]  # the dense matrices need 54,756 bytes
    try:
        DistributedUnlearner(model, bank=bank, memory_budget="25%", **kw)
        res.append(False)
    except MemoryError:
        res.append(True)
    finally:
        mem.available_memory = real
    # 6. nn.Embedding(sparse=True): the rank without the prior's dense term failed to flatten its sparse gradient in
    # allreduce_grads while the other waited in the all-reduce; sampling now matches one process
    res.append(_sparse_embedding_chain(rank, world) is not None)
    torch.save(res, f"{out}/rank{rank}.pt")


class _SparseEmbedding(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e, self.o = torch.nn.Embedding(12, 3, sparse=True), torch.nn.Linear(3, 2)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.o(self.e(t).mean(1))


def _sparse_embedding_chain(rank: int, world: int) -> torch.Tensor | None:
    """20 sampler steps of a sparse-embedding model: in one process, and (``world`` 2) through
    ``DistributedUnlearner.step``; ``None`` when the two-rank chain differs from the one-process chain."""
    from mcmc_unlearner import SGLD, MCMCUnlearner
    from mcmc_unlearner.data import RemovableDataset
    from mcmc_unlearner.distributed import DistributedUnlearner, ShardedDataset
    from mcmc_unlearner.samplers import run_chain

    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 12, (120, 5), generator=g)
    y = ((t < 4).sum(1) > 1).long()
    out = []
    for w in (1, world):
        torch.manual_seed(0)
        model = _SparseEmbedding()
        sampler = SGLD(model.parameters(), lr=1e-3, generator=torch.Generator().manual_seed(5))
        if w == 1:
            d = RemovableDataset(t, y, batch_size=16, seed=2)
            run_chain(model, sampler, d, MCMCUnlearner(model, sampler, nll=_nll, log_prior=_lp).energy, 20, len(d))
        else:
            d = ShardedDataset.from_global(t, y, rank=rank, world=w, batch_size=16, seed=2)
            un = DistributedUnlearner(model, sampler, nll=_nll, log_prior=_lp)
            for _ in range(20):
                un.step(d)
        out.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
    return out[1] if torch.allclose(out[0], out[1], rtol=1e-4, atol=1e-6) else None


def test_ranks_agree_on_what_one_rank_could_refuse(tmp_path):
    spawn(_worker, str(tmp_path))
    for r in range(2):
        assert torch.load(tmp_path / f"rank{r}.pt") == [True] * 6


def test_init_from_env_without_torchrun_is_one_process(monkeypatch) -> None:
    """The README's distributed snippet says the same code runs on one process without a process group, but
    `init_from_env()` refused outside torchrun; a partial torchrun environment is still refused."""
    import pytest

    from mcmc_unlearner.distributed import init_from_env
    from mcmc_unlearner.errors import UnlearningError

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    ctx = init_from_env()
    assert (ctx.rank, ctx.world) == (0, 1) and not dist.is_initialized()
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UnlearningError, match="WORLD_SIZE"):
        init_from_env()
