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
        ([True, 5], "boolean True among them"),
        ([np.True_, 5], "boolean np.True_ among them"),
        ([-(2**70)], "is negative"),
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


def test_mixed_python_and_numpy_integer_ids_are_read_exactly() -> None:
    ds = _ds()
    assert ds.remove([1, np.uint64(7), np.int32(3)]).tolist() == [1, 7, 3]  # numpy alone made them float64
    assert ds.removed_ids.tolist() == [1, 3, 7]


def _bad_states(good: dict) -> list[tuple[dict, str]]:
    none_alive = {**good, "alive": torch.zeros(20, dtype=torch.bool)}
    removed_in_order = good["order"][~good["alive"][good["order"]]]
    assert removed_in_order.numel() == 0
    stale = {**good, "alive": good["alive"].clone()}
    stale["alive"][int(good["order"][-1])] = False  # a row removed after the order was drawn
    return [
        ({k: v for k, v in good.items() if k != "pos"}, r"lacks \['pos'\]"),
        ({**good, "alive": good["alive"][:19]}, "bool mask of this data set's 20 rows"),
        ({**good, "alive": good["alive"].to(torch.uint8)}, "bool mask"),
        (none_alive, "marks every row removed"),
        (stale, "'order' holds removed row"),
        ({**good, "order": good["order"].float()}, "1-D integer tensor"),
        ({**good, "order": torch.tensor([0, 20])}, r"outside \[0, 20\)"),
        ({**good, "order": torch.tensor([5, 5])}, "more than once"),
        ({**good, "pos": torch.tensor(good["order"].numel() + 1)}, "'pos' .* is outside"),
        ({**good, "pos": torch.tensor(-1)}, "'pos' .* is outside"),
        ({**good, "pos": 1.5}, "'pos' must be one integer"),
        ({**good, "generator": torch.zeros(3, dtype=torch.uint8)}, "'generator' is not a CPU generator state"),
        ({**none_alive, "generator": torch.zeros(3, dtype=torch.uint8)}, "marks every row removed"),
    ]


def test_load_state_dict_checks_everything_and_changes_nothing_on_a_bad_state() -> None:
    ds = _ds()
    next(ds)
    ds.remove([2, 4])
    next(ds)
    good = _snapshot(ds)
    for bad, message in _bad_states(good):
        target = _ds()
        target.load_state_dict(good)
        before = _snapshot(target)
        with pytest.raises(ValueError, match=message) as refused:
            target.load_state_dict(bad)
        assert "state_dict() returned" in str(refused.value), message  # every message names the fix
        after = _snapshot(target)
        for k, v in before.items():
            assert torch.equal(v, after[k]), (message, k)
    # and a good state still loads: the same batches follow
    target = _ds()
    target.load_state_dict(good)
    assert all(torch.equal(next(ds)[1], next(target)[1]) for _ in range(5))
