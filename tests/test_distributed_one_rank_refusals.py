"""Refusals that only one rank sees (stop 34, probe M): a rank whose sampler was built on another copy of the model,
and a rank whose remaining-data loader draws by unequal weights. Both checks are new and ran on one rank before the
ranks agreed, so the other rank waited in a collective until gloo's timeout (or died with "Connection closed by
peer"); now every rank refuses at once, naming the cause on the rank that has it. Also: which loaders the
fixed-order warning judges."""

from __future__ import annotations

import copy
import json
import time
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset, WeightedRandomSampler

from _distributed_helpers import ce_nll, gaussian_log_prior, small_classifier, spawn
from mcmc_unlearner import SGLD, MCMCUnlearner
from mcmc_unlearner.distributed import DistributedUnlearner

_nll, _log_prior = ce_nll, gaussian_log_prior


def _setup():
    return small_classifier(200)


def _worker(rank: int, world: int, out: str) -> None:
    x, y, model, bank = _setup()
    found = {}
    for case in ("foreign", "weights"):
        t0 = time.perf_counter()
        try:
            if case == "foreign":
                other = copy.deepcopy(model) if rank == 1 else model
                sampler = SGLD(other.parameters(), lr=1e-4)
                DistributedUnlearner(model, sampler, bank=bank, nll=_nll, log_prior=_log_prior, solver="exact")
            else:
                un = DistributedUnlearner(model, bank=bank, nll=_nll, log_prior=_log_prior, solver="exact")
                keep = torch.arange(10, 200)
                ds = TensorDataset(x[keep], y[keep], torch.full((len(keep),), 1 / (32 * world)))
                if rank == 1:  # this rank's shard balanced by class weights
                    w = torch.where(y[keep] == 1, 1.0, 2.0)
                    s = WeightedRandomSampler(w, len(keep) // world, generator=torch.Generator().manual_seed(1))
                else:
                    s = DistributedSampler(ds, num_replicas=world, rank=rank, seed=0)
                mine = torch.arange(rank, 10, world)
                batch = (x[mine], y[mine], torch.ones(len(mine)))
                un.remove(batch, DataLoader(ds, batch_size=32, sampler=s), n_remaining=190)
            found[case] = ["accepted", time.perf_counter() - t0]
        except Exception as e:
            found[case] = [f"{type(e).__name__}: {e}", time.perf_counter() - t0]
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(found, f)


def test_a_refusal_on_one_rank_is_every_ranks_refusal_at_once(tmp_path):
    spawn(_worker, str(tmp_path))
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert "not the model's" in r1["foreign"][0]
    assert r0["foreign"][0].startswith("ValueError: another rank refused to build the unlearner")
    assert "WeightedRandomSampler with unequal weights" in r1["weights"][0]
    assert r0["weights"][0].startswith("InvalidRequestError: another rank refused this request")
    assert max(r0["foreign"][1], r0["weights"][1]) < 30  # not gloo's timeout (was 60 s here, 10 min by default)


def _warned(loader) -> bool:
    x, y, model, bank = _setup()
    un = MCMCUnlearner(model, bank=bank, nll=_nll, log_prior=_log_prior, solver="exact")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        un.propose((x[:5], y[:5]), loader, n_remaining=195)
    return any("fixed order" in str(w.message) for w in caught)


def test_the_fixed_order_warning_judges_the_sampler_the_loader_uses():
    """A shuffling ``batch_sampler`` of the user's own was warned about as ``shuffle=False`` (``DataLoader`` reports
    a ``SequentialSampler`` it never uses); ``DistributedSampler(shuffle=False)``, the fixed order a DDP user
    writes, was not."""
    x, y, _, _ = _setup()
    ds = TensorDataset(x[5:], y[5:])

    class RandomBatches:
        def __iter__(self):
            p = torch.randperm(len(ds)).tolist()
            return iter([p[i : i + 32] for i in range(0, len(p), 32)])

        def __len__(self):
            return -(-len(ds) // 32)

    assert not _warned(DataLoader(ds, batch_sampler=RandomBatches()))
    fixed = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=False)
    assert _warned(DataLoader(ds, batch_size=32, sampler=fixed))
    assert _warned(DataLoader(ds, batch_size=32))
    assert not _warned(DataLoader(ds, batch_size=32, shuffle=True))


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
