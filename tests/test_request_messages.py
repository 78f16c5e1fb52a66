"""Requests at their extremes: a boolean mask, a single id, and removing every row through remove()."""

import numpy as np
import pytest
import torch

from mcmc_unlearner import MCMCUnlearner, RemovableDataset
from mcmc_unlearner.errors import InvalidRequestError
from mcmc_unlearner.models.linreg import BayesianLinearRegression

torch.set_num_threads(1)


def _setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g)
    y = x.sum(1) + torch.randn(50, generator=g)
    model = BayesianLinearRegression(3)
    bank = torch.randn(40, 3, generator=g) * 0.1
    un = MCMCUnlearner(model, nll=lambda m, b: m.nll(b), log_prior=lambda m: m.log_prior(), bank=bank)
    return x, y, un


@pytest.mark.parametrize("as_np", [False, True])
def test_a_boolean_mask_is_refused_naming_the_conversion(as_np):
    x, y, un = _setup()
    data = RemovableDataset(x, y, batch_size=16)
    mask = torch.zeros(50, dtype=torch.bool)
    mask[[3, 7]] = True
    bank = un.bank.clone()
    with pytest.raises(InvalidRequestError, match=r"nonzero"):  # was: "ids must be integers, got dtype torch.bool"
        un.forget(mask.numpy() if as_np else mask, data)
    assert torch.equal(un.bank, bank) and len(data) == 50
    assert un.forget(mask.nonzero().flatten(), data).passed  # the fix the message names works


@pytest.mark.parametrize("single", [5, np.int64(5), torch.tensor(5)])
def test_a_single_id_is_refused_naming_the_list_form(single):
    x, y, un = _setup()
    data = RemovableDataset(x, y, batch_size=16)
    with pytest.raises(InvalidRequestError, match=r"pass \[5\]"):  # was: "got shape ()"
        un.forget(single, data)


def test_removing_every_row_through_remove_says_so():
    x, y, un = _setup()
    bank = un.bank.clone()
    empty = torch.zeros(50, dtype=torch.bool)
    # the remaining rows as empty tensors: was "pass n_remaining=", then n_remaining=0 "must be >= 1"
    with pytest.raises(InvalidRequestError, match="no data would remain"):
        un.remove((x, y), (x[empty], y[empty]))
    assert torch.equal(un.bank, bank)


@pytest.mark.parametrize(
    "ids",
    [torch.tensor([3, 7]).to_sparse(), np.array([3, 7], dtype=">i8"), np.array([3, 7], dtype=">u4")],
    ids=["sparse", "big-endian int64", "big-endian uint32"],
)
def test_ids_in_a_sparse_tensor_or_a_big_endian_array_are_read(ids):
    """were a raw NotImplementedError ('aten::lt.Scalar' on SparseCPU) and torch.from_numpy's byte-order ValueError"""
    x, y, un = _setup()
    data = RemovableDataset(x, y, batch_size=16)
    assert un.forget(ids, data).passed
    assert data.removed_ids.tolist() == [3, 7]
