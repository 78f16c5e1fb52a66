"""What one rank alone sees, under torch.distributed (stop 47's probe): a non-finite remaining row of a rank's shard,
a share that is not a tuple of tensors, a shard built for another world size, a bank in another row order, and one
request given in two orders. Each was found on one rank inside the collectives (the other ranks waited until the
timeout), passed the checks silently (a shift 20% off one process's), or named the wrong id; now every rank refuses
at once, naming the cause."""

from __future__ import annotations

import json
import time

import pytest
import torch

from _distributed_helpers import ce_nll, gaussian_log_prior, small_classifier, spawn
from mcmc_unlearner.distributed import DistributedUnlearner, ShardedDataset

_nll, _log_prior = ce_nll, gaussian_log_prior


def _setup():
    return small_classifier(80)


def _worker(rank: int, world: int, out: str) -> None:
    found = {}
    for case in ("nan_remaining", "world", "share", "permuted", "order"):
        x, y, model, bank = _setup()
        if case == "nan_remaining":
            x[9, 2] = float("nan")  # row 9 lives on rank 1
        if case == "order":
            x[9, 0] = float("nan")
        if case == "permuted" and rank == 1:
            bank = bank[[1, 0, *range(2, bank.shape[0])]]  # the same samples, two swapped
        data = ShardedDataset.from_global(x, y, rank=rank, world=3 if case == "world" else world, batch_size=16)
        un, before = None, bank.clone()
        t0 = time.perf_counter()
        try:
            un = DistributedUnlearner(model, bank=bank, nll=_nll, log_prior=_log_prior, solver="exact")  # checks banks
            if case == "share":
                share = None if rank == 1 else (x[:2], y[:2], torch.ones(2))
                un.remove(share, data, n_remaining=78)
            else:
                un.forget([8, 9] if case == "order" and rank == 0 else [9, 8] if case == "order" else [0, 2], data)
            found[case] = ["accepted", 0.0, True]
        except Exception as e:
            kept = un is None or bool(torch.equal(un.bank, before))
            found[case] = [f"{type(e).__name__}: {e}", time.perf_counter() - t0, kept]
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(found, f)


def test_what_one_rank_sees_is_refused_by_every_rank_at_once(tmp_path):
    spawn(_worker, str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    agreed = "InvalidRequestError: another rank refused this request"
    assert "NaN or infinite values in the rows with id(s) [9]" in r1["nan_remaining"][0]
    assert r0["nan_remaining"][0].startswith(agreed)
    for r in (r0, r1):
        assert "the ShardedDataset is rank" in r["world"][0] and "of 3, but this process is rank" in r["world"][0]
        assert "different sample banks" in r["permuted"][0]
        assert r["order"][0].startswith("InvalidRequestError: removed data: id(s) [9] have NaN")
    assert r1["share"][0].startswith("TypeError: the removed data must be") and r0["share"][0].startswith(agreed)
    for r in (r0, r1):
        for case, (_, seconds, unchanged) in r.items():
            assert unchanged, case
            assert seconds < 30, case  # not gloo's timeout (60 s here, 10 min by default)


def test_a_float64_shard_weights_in_float64_and_an_empty_share_is_padded_with_a_stored_row():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, dtype=torch.float64, generator=g) + 5.0  # no row is zero
    y = torch.zeros(10, dtype=torch.long)
    data = ShardedDataset.from_global(x, y, rank=0, world=1, batch_size=4)
    assert data.weight_dtype == torch.float64 and next(data)[-1].dtype == torch.float64
    model = torch.nn.Linear(3, 2).double()
    un = DistributedUnlearner(model, nll=_nll, log_prior=_log_prior, solver="exact")
    pad = un._local_share((x[:0], y[:0], torch.ones(0, dtype=torch.float64)), data)
    assert pad[0].shape == (1, 3) and bool((pad[0] != 0).all()) and float(pad[-1][0]) == 0.0


def test_a_shards_non_finite_rows_are_read_from_inference_tensors_and_again_after_a_fix():
    """The review of stop 47: inference-mode tensors keep no version counter (every request was refused with torch's
    RuntimeError), and a row fixed through ``.numpy()`` (no version bump) was refused on as still bad."""
    with torch.inference_mode():
        x = torch.randn(20, 3)
    y = torch.zeros(20, dtype=torch.long)
    assert ShardedDataset.from_global(x, y, rank=0, world=1, batch_size=4).nonfinite_ids().numel() == 0
    x = torch.randn(20, 3)
    x[9, 1] = float("nan")
    data = ShardedDataset.from_global(x, y, rank=0, world=1, batch_size=4)
    assert data.nonfinite_ids().tolist() == [9]
    x.numpy()[9, 1] = 0.0
    assert data.nonfinite_ids().numel() == 0


def test_remaining_rows_as_a_tuple_are_refused_with_a_from_global_call_of_as_many_fields():
    """Under torch.distributed (``rows_as_data=False``) a tuple of remaining rows is refused with the
    ``ShardedDataset.from_global`` call that shards it: ``(x,)`` was told ``from_global(x, y, ...)``, a field it
    does not have. The call named for one field builds a shard."""
    from mcmc_unlearner.stream import _Stream

    x, y = torch.randn(8, 3), torch.arange(8) % 2
    for rows, names in (((x,), "x"), ((x, y), "x, y"), ((x, y, y.double()), "t0, t1, t2")):
        with pytest.raises(TypeError) as refused:
            _Stream(rows, None, rows_as_data=False)
        said = str(refused.value)
        assert f"ShardedDataset.from_global({names}, rank=rank" in said, said
        assert f"a tuple of {len(rows)} tensor" in said, said
    shard = ShardedDataset.from_global(x, rank=0, world=1, batch_size=4)
    assert len(shard) == 8
