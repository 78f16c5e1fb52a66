"""RemovableDataset: bookkeeping, endless shuffled minibatches, every bad request refused without change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcmc_unlearner import InvalidRequestError, RemovableDataset


def _ds(n: int = 20, bs: int = 6) -> RemovableDataset:
    return RemovableDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n), batch_size=bs, seed=0)


def _snapshot(ds: RemovableDataset) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in ds.state_dict().items()}


def test_each_pass_visits_every_remaining_row_once() -> None:
    ds = _ds(20, 5)
    ds.remove([3, 7])
    seen = torch.cat([next(ds)[1] for _ in range(18 // 5)])
    assert len(set(seen.tolist())) == seen.numel() == 15
    assert not ({3, 7} & set(seen.tolist()))
    # a pass reshuffles: two passes are (almost surely) in different orders, same size batches
    b = [next(ds)[1] for _ in range(6)]
    assert all(x.numel() == 5 for x in b)


def test_remove_and_lengths() -> None:
    ds = _ds()
    removed = ds.remove(np.array([0, 19, 5]))
    assert removed.tolist() == [0, 19, 5]
    assert len(ds) == 17
    assert ds.removed_ids.tolist() == [0, 5, 19]
    assert set(ds.remaining_ids.tolist()) == set(range(20)) - {0, 5, 19}
    _, y = ds.remaining()
    assert y.tolist() == ds.remaining_ids.tolist()


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([], "empty"),
        ([1, 1], "more than once"),
        ([25], "unknown id"),
        ([-1], "unknown id"),
        ([0.5], "must be integers"),
        ([True, False], "must be integers"),
        ([[1, 2]], "flat list"),
        (["a"], "integers"),
        ([i for i in range(20) if i not in (2, 4)], "remove all"),
        ([2], "already removed"),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(ids, message) -> None:
    ds = _ds()
    ds.remove([2, 4])
    before = _snapshot(ds)
    with pytest.raises(InvalidRequestError, match=message):
        ds.remove(ids)
    after = ds.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k], k


def test_state_dict_round_trip_reproduces_batches() -> None:
    ds = _ds()
    next(ds)
    ds.remove([1])
    next(ds)
    state = _snapshot(ds)
    a = [next(ds)[1] for _ in range(5)]
    ds2 = _ds()
    ds2.load_state_dict(state)
    b = [next(ds2)[1] for _ in range(5)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="first dimension"):
        RemovableDataset(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="batch_size"):
        RemovableDataset(torch.zeros(3), batch_size=0)
