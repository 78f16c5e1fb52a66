"""A remaining row whose class label the model's output has no column for (label 9 of a 4-class softmax regression)
past the first minibatch's first rows is refused before the request's work where the remaining labels can be read
without a pass (a DataLoader over a TensorDataset, a list of minibatches), naming the row, the label and the width;
from an iterator, torch's bare "Target 9 is out of bounds." is named as such where it surfaces. Valid labels outside
the removed rows' are read by nll once and change nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from mcmc_unlearner import MCMCUnlearner
from test_emptied_label import _softmax_regression

BAD = 150  # a row past the first minibatches (row 140 of the remaining rows, in minibatch 4 of 32 rows)


@pytest.fixture(scope="module")
def problem():
    """The softmax regression (4 classes, 200 rows), its samples, and its labels with row ``BAD`` labelled 9."""
    model, nll, log_prior, bank, x, y = _softmax_regression(0, classes=4)
    bad = y.clone()
    bad[BAD] = 9
    return model, nll, log_prior, bank, x, bad


def _request(problem, remaining, n_remaining=None, removed=slice(0, 10)):
    """An unlearner on the problem and its proposal for the removed rows ``x[removed]`` against ``remaining``;
    the refusal's error, the unlearner, and the model's state before."""
    model, nll, log_prior, bank, x, y = problem
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    before = (un.bank.clone(), {k: v.clone() for k, v in model.state_dict().items()})
    with pytest.raises(IndexError) as caught:
        un.propose((x[removed], y[removed]), remaining, n_remaining=n_remaining)
    assert torch.equal(un.bank, before[0])
    assert all(torch.equal(v, before[1][k]) for k, v in model.state_dict().items())
    return caught.value


def _torch_said(cause: BaseException | None) -> bool:
    """Whether ``cause`` is torch's own error for label 9."""
    return isinstance(cause, IndexError) and str(cause) == "Target 9 is out of bounds."


def _remaining(problem):
    _, _, _, _, x, y = problem
    return x[10:], y[10:]


def _shuffled(x: torch.Tensor, y: torch.Tensor, seed: int) -> DataLoader:
    """A shuffling DataLoader of 32 rows over ``(x, y)``, its order drawn from ``seed``."""
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))


def test_loader_label_out_of_range_refused_before_work(problem):
    xr, yr = _remaining(problem)
    loader = _shuffled(xr, yr, 0)
    assert int(next(iter(_shuffled(xr, yr, 0)))[1].max()) < 4  # not in the first minibatch, which is checked
    err = _request(problem, loader)
    said = str(err)
    assert "class label 9" in said and "row 140 of the DataLoader's dataset" in said and "4 classes" in said, said
    assert _torch_said(err.__cause__)
    assert torch.equal(loader.dataset.tensors[1], yr)  # the data as they were


def test_list_label_out_of_range_names_minibatch(problem):
    xr, yr = _remaining(problem)
    listed = [(xr[i : i + 32], yr[i : i + 32]) for i in range(0, xr.shape[0], 32)]
    said = str(_request(problem, listed))
    assert "class label 9" in said and "row 12 of minibatch 4 of the remaining list" in said, said
    assert "labels 0 to 3" in said, said


def test_iterator_label_out_of_range_named_where_it_surfaces(problem):
    xr, yr = _remaining(problem)

    def minibatches():
        while True:
            for i in range(0, xr.shape[0], 32):
                yield xr[i : i + 32], yr[i : i + 32]

    err = _request(problem, minibatches(), n_remaining=xr.shape[0])
    said = str(err)
    assert "class label 9" in said and "first minibatch's first rows" in said and "4 classes" in said, said
    assert _torch_said(err.__cause__)  # torch's own error, chained


def test_valid_labels_read_once_and_bank_unchanged(problem, monkeypatch):
    """Removed rows of labels 0 and 1 only: the remaining labels 2 and 3 are read by nll on one row each before the
    work; the proposal is the same to the bit as with that reading switched off."""
    model, nll, log_prior, bank, x, y = problem
    y = torch.arange(200) % 4
    removed = torch.nonzero(y < 2).flatten()[:10]
    keep = torch.ones(200, dtype=torch.bool)
    keep[removed] = False

    def propose(check: bool):
        if not check:
            monkeypatch.setattr(MCMCUnlearner, "_check_remaining_labels", lambda self, batch, stream: None)
        un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
        return un, un.propose((x[removed], y[removed]), _shuffled(x[keep], y[keep], 1))

    un, checked = propose(True)
    assert un._labels_read == {2, 3}
    _, unchecked = propose(False)
    assert torch.equal(checked.bank, unchecked.bank)
    assert checked.report.problems == unchecked.report.problems


def test_ignored_label_value_not_refused(problem):
    """A label cross_entropy skips (ignore_index=255) is read by nll without error: no refusal."""
    model, _, log_prior, bank, x, y = problem
    y = (torch.arange(200) % 4).masked_fill(torch.arange(200) == BAD, 255)

    def nll(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none", ignore_index=255)

    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    prop = un.propose((x[:10], y[:10]), _shuffled(x[10:], y[10:], 2))
    assert 255 in un._labels_read
    assert prop.bank.shape == un.bank.shape and bool(torch.isfinite(prop.bank).all())


def test_label_out_of_range_refused_beside_ignored_value(problem):
    """An ignore_index (255) read in the removed rows, or by an earlier request, bounds no class: label 9 of the
    4-class output is still refused before the work, the row named (review: with 255 read it was left to the build,
    torch's error named as in an iterator's minibatch)."""
    model, _, log_prior, bank, x, y = problem  # y[BAD] == 9

    def nll(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none", ignore_index=255)

    y = y.clone()
    y[3] = 255  # a removed row
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    with pytest.raises(IndexError) as caught:
        un.propose((x[:10], y[:10]), _shuffled(x[10:], y[10:], 0))
    said = str(caught.value)
    assert "class label 9" in said and "row 140 of the DataLoader's dataset" in said, said
    assert 255 not in un._labels_read  # (read from the removed rows, not probed)


def test_subset_loader_row_named_in_its_dataset(problem):
    """A DataLoader over a Subset: the row named is the one of the dataset under it (review: 'row 150 of the
    DataLoader's dataset' named the base dataset's row 150, the Subset's row 140)."""
    _, _, _, _, x, y = problem
    sub = torch.utils.data.Subset(TensorDataset(x, y), list(range(10, 200)))
    said = str(_request(problem, DataLoader(sub, batch_size=32, shuffle=True)))
    assert "row 150 of the dataset under the DataLoader's Subset" in said, said
