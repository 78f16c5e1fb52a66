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


class _Embedded(torch.nn.Module):
    """A category's 2-wide embedding and a linear head (an ``nn.Embedding`` the draw of unread rows looks at)."""

    def __init__(self) -> None:
        super().__init__()
        self.e = torch.nn.Embedding(5, 2)
        self.head = torch.nn.Linear(2, 2)

    def forward(self, xc: torch.Tensor) -> torch.Tensor:
        return self.head(self.e(xc))


def _embedding_worker(rank: int, world: int, out: str) -> None:
    import mcmc_unlearner.unread as unread

    passes = []
    real = unread.rows_read
    unread.rows_read = lambda *a, **k: passes.append(1) or real(*a, **k)
    xc = torch.arange(40) % 5
    y = (xc > 2).long()
    torch.manual_seed(0)
    model = _Embedded()
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.05 * torch.randn(8, theta.numel(), generator=torch.Generator().manual_seed(1))
    data = ShardedDataset.from_global(xc, y, rank=rank, world=world, batch_size=8)
    un = DistributedUnlearner(model, bank=bank, nll=_nll, log_prior=_log_prior, solver="exact")
    report = un.forget(torch.nonzero(xc == 4).flatten()[:4], data)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"said": report.info.get("embedding_rows"), "passes": len(passes)}, f)


def test_under_torch_distributed_the_embedding_draw_is_said_not_checked_before_any_pass(tmp_path):
    """Under torch.distributed the draw of unread embedding rows is "not checked" whatever the rows read, so no
    ``rows_read`` forward-hook pass runs on any rank (two ran before the answer was given)."""
    spawn(_embedding_worker, str(tmp_path))
    for r in (0, 1):
        found = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert found["said"] == "not checked: under torch.distributed (each rank holds part of the remaining rows)"
        assert found["passes"] == 0, found
