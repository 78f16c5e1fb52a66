"""Under ``torch.distributed`` the emptied-label check of a request (README step 6) does not run: no rank holds
every remaining label. Every rank's report says so, and the request is applied on both ranks alike."""

from __future__ import annotations

import json

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from _distributed_helpers import spawn
from mcmc_unlearner.distributed import DistributedUnlearner


def _nll(m, b):
    return torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")


def _log_prior(m):
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _worker(rank: int, world: int, out: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 1.2).long()  # classes 0-3, class 2/3 rare
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.05 * torch.randn(8, theta.numel(), generator=g)
    un = DistributedUnlearner(model, bank=bank, nll=_nll, log_prior=_log_prior, solver="exact")
    gone = torch.nonzero(y >= 2).flatten()  # every row of classes 2 and 3
    keep = torch.nonzero(y < 2).flatten()
    ds = TensorDataset(x[keep], y[keep], torch.full((len(keep),), 1 / (32 * world)))
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, seed=0)
    mine = gone[rank::world]
    report = un.remove((x[mine], y[mine], torch.ones(len(mine))), DataLoader(ds, batch_size=32, sampler=sampler),
                       n_remaining=len(keep))  # fmt: skip
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"said": report.info.get("emptied_labels"), "passed": report.passed,
                   "shift": report.shift_norm}, f)  # fmt: skip


def test_every_rank_says_the_emptied_label_check_did_not_run(tmp_path):
    spawn(_worker, str(tmp_path))
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    for r in (r0, r1):
        assert r["said"].startswith("not checked under torch.distributed") and r["passed"]
    assert r0["shift"] == r1["shift"]
