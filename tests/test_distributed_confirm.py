"""Two gloo ranks against one process where stop 43's probe found them apart: the safety net's second measurement
(which read this rank's share of the check's rows as the whole, W times fewer rows on W ranks) and deletion requests
that differ between the ranks (ranks given different ids each removed their own; a rank refusing an unknown id left
the other waiting in an all-reduce, and gloo aborted both)."""

import torch
from safetensors.torch import load_file, save_file

from _distributed_helpers import spawn
from mcmc_unlearner.data import RemovableDataset
from mcmc_unlearner.distributed import DistributedUnlearner, ShardedDataset
from mcmc_unlearner.errors import InvalidRequestError
from mcmc_unlearner.samplers import SGLD, run_chain
from mcmc_unlearner.unlearner import MCMCUnlearner

N = 400


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, 5, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def _nll(m, b):
    return torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")


def _log_prior(m):
    return -0.5 * sum((p**2).sum() for p in m.parameters()) / 0.5**2


def _model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _bank() -> torch.Tensor:
    """16 samples of one process's SGLD chain (the same on every rank)."""
    x, y = _data()
    m = _model()
    s = SGLD(m.parameters(), lr=2e-4, generator=torch.Generator().manual_seed(11))
    d = RemovableDataset(x, y, batch_size=32, seed=99)
    u = MCMCUnlearner(m, s, nll=_nll, log_prior=_log_prior)
    run_chain(m, s, d, u.energy, 200, len(d))
    out = []
    for _ in range(16):
        run_chain(m, s, d, u.energy, 5, len(d))
        out.append(torch.nn.utils.parameters_to_vector(m.parameters()).detach().clone())
    return torch.stack(out)


def _setup(rank: int = 0, world: int = 1, sharded: bool = False):
    x, y = _data()
    model, bank = _model(), _bank()
    torch.nn.utils.vector_to_parameters(bank[-1].clone(), model.parameters())
    kw = dict(nll=_nll, log_prior=_log_prior, solver="kfac", mc_samples=3, check_rows=64, recenter_every=0)
    if sharded:
        return DistributedUnlearner(model, bank=bank, **kw), ShardedDataset.from_global(
            x, y, rank=rank, world=world, batch_size=64, seed=21
        )
    return MCMCUnlearner(model, bank=bank, **kw), RemovableDataset(x, y, batch_size=64, seed=21)


REQUESTS = (  # random rows; the first request's step is measured again (stop 43's probe)
    [211, 391, 365, 389, 210, 40, 88, 104, 218, 29, 9, 251],
    [318, 214, 143, 151, 260, 87, 206, 349, 294, 64, 228, 392, 351, 332, 291, 167, 22, 279, 109, 53],
)


def _run(rank: int = 0, world: int = 1, sharded: bool = False) -> dict[str, torch.Tensor]:
    un, data = _setup(rank, world, sharded)
    out: dict[str, torch.Tensor] = {}
    for i, ids in enumerate(REQUESTS):
        rep = un.forget(ids, data)
        confirmed = [t["confirm_rows"] for t in rep.info["trials"] if "confirm_rows" in t]
        out[f"bank{i}"] = un.bank.clone()
        out[f"numbers{i}"] = torch.tensor(
            [rep.damping, rep.info["remaining_nll_rise"], rep.info["remaining_nll_rise_stderr"], sum(confirmed)],
            dtype=torch.float64,
        )
    out["drift"] = torch.tensor(un.control.state()["drift"], dtype=torch.float64)
    return out


def _worker(rank: int, world: int, out: str) -> None:
    save_file(_run(rank, world, sharded=True), f"{out}/confirm-rank{rank}.safetensors")
    # requests that differ between the ranks: refused on every rank, nothing changed, nobody hangs
    un, data = _setup(rank, world, sharded=True)
    bank, alive = un.bank.clone(), data.state_dict()["alive"].clone()
    said = []
    # different ids, a different count, and ids of equal count, sum and sum of squares (0+4+5 = 1+2+6, 41 = 41)
    for ids in (
        [0, 1, 2, 3] if rank == 0 else [10, 11, 12, 13],
        [0, 1, 2] if rank == 0 else [0, 1, 2, 3],
        [0, 4, 5] if rank == 0 else [1, 2, 6],
    ):
        try:
            un.forget(ids, data)
        except InvalidRequestError as exc:
            said.append("given different deletion requests" in str(exc))
    try:  # an id one rank does not know: that rank says why, the other that it refused
        un.forget([4, 6] if rank == 0 else [4, N + 7], data)
    except InvalidRequestError as exc:
        said.append(("unknown id" if rank == 1 else "another rank refused") in str(exc))
    same = torch.equal(un.bank, bank) and torch.equal(data.state_dict()["alive"], alive)
    un.forget([4, 6], data)  # and the next, agreed request is applied
    save_file({"said": torch.tensor([*said, same], dtype=torch.float64)}, f"{out}/refuse-rank{rank}.safetensors")


def test_two_ranks_measure_again_on_the_rows_one_process_reads_and_refuse_requests_that_differ(tmp_path) -> None:
    spawn(_worker, str(tmp_path), timeout_s=120)
    ref = _run()
    r0, r1 = (load_file(str(tmp_path / f"confirm-rank{r}.safetensors")) for r in (0, 1))
    assert float(ref["numbers0"][3]) > 0  # the first request's step was measured again (256 further rows)
    for key in ref:
        assert torch.equal(r0[key], r1[key]), key
        assert torch.allclose(r0[key].double(), ref[key].double(), rtol=1e-4, atol=1e-6), (key, r0[key], ref[key])
    for rank in (0, 1):
        said = load_file(str(tmp_path / f"refuse-rank{rank}.safetensors"))["said"].tolist()
        assert said == [1.0, 1.0, 1.0, 1.0, 1.0], (rank, said)
