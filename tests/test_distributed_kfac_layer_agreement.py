"""DistributedUnlearner with K-FAC: every rank factors the same layers (stop 58's probe, 2 gloo processes).

The build decides on its first forward which layers are called on an input without the batch's rows (a shared
code: left to the diagonal) and which layers were called at all, each rank on its own shard. An expert that a model
routes rows to read as a shared code where its input was a single row (until stop 59: reversing the rows left it as
it was), so a rank whose shard routed one row to it left it to the diagonal while the other factored it; a layer
applied to a learned code only where a shard holds a row of some kind is shared on that rank alone; and an expert
that no row of a shard reaches is not called there. Ranks with different blocks aborted in the first all-reduce of
mismatched sizes (gloo's timeout, 45 s in the probe). The flags are now all-reduced before the choice: every rank
the same blocks, the same bank."""

from __future__ import annotations

import json
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _distributed_helpers import gaussian_log_prior, spawn


class Routed(nn.Module):
    """Rows whose first feature exceeds 2 go to expert ``a``, the others to ``b`` (``a`` is not called where no row
    goes to it, with ``skip_empty``; with ``code``, ``a`` is also applied to a learned code where some row goes to
    it)."""

    def __init__(self, skip_empty: bool, code: bool = False) -> None:
        super().__init__()
        self.skip_empty = skip_empty
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)
        self.z = nn.Parameter(torch.randn(1, 6)) if code else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x[:, 0] > 2.0
        h = x.new_zeros(x.shape[0], 8)
        if m.any() or not self.skip_empty:
            h = h.index_put((m.nonzero().flatten(),), self.a(x[m]))
        h = h.index_put(((~m).nonzero().flatten(),), self.b(x[~m]))
        if self.z is not None and m.any():  # (each row's value its own: the code reaches the routed rows)
            h = h + m[:, None] * self.a(self.z)
        return self.head(torch.tanh(h))


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def _worker(rank: int, world: int, out: str) -> None:
    from mcmc_unlearner.curvature import ParamSpec
    from mcmc_unlearner.distributed import DistributedUnlearner

    found = {}
    # rank 0's remaining shard routes 3 rows to expert a; rank 1's one row ("one_row"), or none ("none", "code")
    for case, routed_on_1 in (("one_row", 1), ("none", 0), ("code", 0)):
        torch.manual_seed(0)
        model = Routed(skip_empty=case == "none", code=case == "code").eval()
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(80, 6, generator=g), torch.randint(0, 3, (80,), generator=g)
        x[:, 0] = -1.0
        shards = [torch.arange(8, 44), torch.arange(44, 80)]
        x[shards[0][:3], 0] = 3.0
        x[shards[1][:routed_on_1], 0] = 3.0
        theta = ParamSpec.flatten_module(model).detach()
        bank = theta[None] + 0.05 * torch.randn(6, theta.numel(), generator=torch.Generator().manual_seed(2))
        un = DistributedUnlearner(model, bank=bank, nll=_nll, log_prior=gaussian_log_prior, solver="kfac")
        mine, rem = torch.arange(4 * rank, 4 * rank + 4), shards[rank]
        loader = DataLoader(TensorDataset(x[rem], y[rem], torch.full((36,), 1 / 72)), batch_size=36)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = un.remove((x[mine], y[mine], torch.ones(4)), loader, n_remaining=72, strict=False)
            kfac = report.info["kfac"]
            found[case] = {
                "unbatched": kfac.get("unbatched_input", []),
                "kronecker": sorted(kfac["kronecker"]),
                "bank_sum": float(un.bank.double().sum()),
                "moved": float((un.bank - bank).norm()),
            }
        except Exception as e:
            found[case] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(found, f)


def test_ranks_agree_on_which_layers_kfac_factors(tmp_path) -> None:
    spawn(_worker, str(tmp_path), timeout_s=30)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for case in ("one_row", "none", "code"):
        assert "error" not in r0[case] and "error" not in r1[case], (r0[case], r1[case])
        assert r0[case] == r1[case]  # the same blocks and, to the bit, the same bank on both ranks
        assert r0[case]["moved"] > 0
    # rank 1 routes a single row to expert a: row data on both ranks (it read as a shared code there until stop 59)
    assert r0["one_row"]["unbatched"] == [] and r0["one_row"]["kronecker"] == ["a", "b", "head"]
    # one rank alone applied expert a to the learned code: both leave it to the diagonal
    assert r0["code"]["unbatched"] == ["a"] and r0["code"]["kronecker"] == ["b", "head"]
    # one rank alone called expert a: both factor it
    assert r0["none"]["unbatched"] == [] and r0["none"]["kronecker"] == ["a", "b", "head"]
