"""Five leftovers of stop 62's notes (issue 11 polish), each found by a trace of a request or a probe of bad input.

* A K-FAC memory refusal inside its build took the minibatches read ahead from a plain iterator.
* ``fit()`` building K-FAC on data holding a class label out of the output's range raised torch's bare error.
* A list read as minibatches (a sample of a larger set) had such a label refused only from inside the work.
* A request read the remaining rows' labels twice (the label-range check, then the emptied-label check).
* The model's output width was probed on the removed rows by up to three probes a request.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from mcmc_unlearner import MCMCUnlearner
from test_emptied_label import _softmax_regression
from test_label_range import BAD, _shuffled, _torch_said
from test_stop62_leftovers import _minibatches, _refused_then_applied

pytestmark = pytest.mark.filterwarnings("ignore:this request removes")


@pytest.fixture(scope="module")
def regression():
    """The 4-class softmax regression (200 rows) and its 12 samples."""
    return _softmax_regression(0, classes=4)


def test_a_kfac_memory_refusal_in_its_build_leaves_the_minibatches_to_the_next_request(regression) -> None:
    # the refusal in K-FAC's build (its one-row need over the budget, planned on the curvature's minibatches, after
    # the read-ahead) said "nothing was changed" and took the 20 minibatches read ahead from the caller's iterator:
    # the refused request then the next one read the iterator and move the samples as the next one alone
    model, nll, log_prior, bank, x, y = regression

    def refuse(un: MCMCUnlearner, data: Iterator) -> None:
        budget, un.memory_budget = un.memory_budget, 4000  # the request's floor fits; K-FAC's one row does not
        with pytest.raises(MemoryError, match=r"K-FAC needs about .* for one row at a time"):
            un.propose((x[:10], y[:10]), data, n_remaining=190)
        un.memory_budget = budget

    def data(taken: list[int]) -> Iterator:
        return _minibatches(x[10:], y[10:], 30, None, taken)

    def make() -> MCMCUnlearner:
        return MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0, solver="kfac")

    taken = [0]
    refuse(make(), data(taken))
    assert taken[0] == 20  # read ahead before the build's refusal
    _refused_then_applied(make, data, refuse, (x[:10], y[:10]), 190)


@pytest.mark.parametrize("source", ["loader", "iterator"])
def test_fit_refuses_a_label_out_of_range_naming_it(regression, source: str) -> None:
    # fit(solver="kfac") raised torch's bare "Target 9 is out of bounds." from inside its build; now refused as a
    # request refuses it: before the build, the row named, where the labels can be read without a pass (a
    # DataLoader over a TensorDataset); torch's error named as such where an iterator's minibatch shows it
    model, nll, log_prior, bank, x, y = regression
    y = y.clone()
    y[BAD] = 9

    def minibatches():
        while True:
            for i in range(0, 200, 32):
                yield x[i : i + 32], y[i : i + 32]

    data = _shuffled(x, y, 0) if source == "loader" else minibatches()
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0, solver="kfac")
    start = un.bank.clone(), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IndexError, match="class label 9") as caught:
        un.fit(data, None if source == "loader" else 200)
    said = str(caught.value)
    assert "4 classes (labels 0 to 3)" in said and _torch_said(caught.value.__cause__), said
    where = f"row {BAD} of the DataLoader's dataset" if source == "loader" else "a remaining minibatch fit() read"
    assert where in said, said
    assert not un._fitted and un.curvature.kfac is None  # nothing built nor kept
    assert torch.equal(un.bank, start[0]) and all(torch.equal(v, start[1][k]) for k, v in model.state_dict().items())


def test_a_list_read_as_minibatches_has_its_labels_checked_before_the_work(regression, monkeypatch) -> None:
    # a list of minibatches of a larger set (n_remaining= counts other rows) is not joined as the remaining rows,
    # and a label out of range in its minibatch 4 was refused from inside the work (after the removed rows'
    # gradient and the curvature), the row not named; its labels are read without a pass like a joined list's
    from mcmc_unlearner import unlearner

    model, nll, log_prior, bank, x, y = regression
    y = y.clone()
    y[BAD] = 9
    xr, yr = x[10:], y[10:]
    listed = [(xr[i : i + 32], yr[i : i + 32]) for i in range(0, xr.shape[0], 32)]
    grads: list[int] = []
    real = unlearner.MCMCUnlearner._grad_means
    monkeypatch.setattr(unlearner.MCMCUnlearner, "_grad_means", lambda *a: grads.append(1) or real(*a))
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    start = un.bank.clone()
    with pytest.raises(IndexError, match="class label 9") as caught:
        un.propose((x[:10], y[:10]), listed, n_remaining=1000)
    said = str(caught.value)
    assert "in row 12 of minibatch 4 of the remaining list" in said and "4 classes" in said, said
    assert grads == [] and torch.equal(un.bank, start)  # before the work
    assert torch.equal(listed[4][1], yr[128:160])  # the data as they were
    # the valid labels of such a list pass, and the request runs: its labels are not read as those that remain
    listed[4][1][12] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prop = un.propose((x[:10], y[:10]), listed, n_remaining=1000)
    assert grads and bool(torch.isfinite(prop.bank).all()) and not torch.equal(prop.bank, start)


def test_a_request_reads_the_remaining_labels_once(regression, monkeypatch) -> None:
    # the label-range check and the emptied-label check each gathered the remaining labels (from a DataLoader's
    # dataset, or a RemovableDataset's kept rows): read once a request now, the same proposals to the bit
    from mcmc_unlearner import unlearner
    from mcmc_unlearner.data import RemovableDataset

    model, nll, log_prior, bank, x, y = regression
    real = unlearner._loader_labels
    reads: list[int] = []
    monkeypatch.setattr(unlearner, "_loader_labels", lambda src: reads.append(1) or real(src))
    gone = torch.arange(0, 40, 4)  # ten rows of class 0
    keep = torch.ones(200, dtype=torch.bool)
    keep[gone] = False
    data = RemovableDataset(x, y, batch_size=32, seed=0)
    data.remove(gone)
    props = []
    for once in (True, False):
        if not once:  # every read gathers again, as before
            monkeypatch.setattr(unlearner._Stream, "once", lambda self, name, read: read())
        reads.clear()
        un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
        for _ in range(2):  # two requests through a loader: each reads them once
            props.append(un.propose((x[gone], y[gone]), _shuffled(x[keep], y[keep], 3)))
        assert reads == [1, 1] if once else [1] * 4, reads
        props.append(un.propose((x[gone], y[gone]), data))
    for a, b in zip(props[:3], props[3:]):
        assert torch.equal(a.bank, b.bank) and a.report.problems == b.report.problems


def _ignoring_nll(m: torch.nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1], reduction="none", ignore_index=255)


@pytest.mark.parametrize("refused", [False, True])
def test_the_likelihood_is_probed_once_a_request(regression, monkeypatch, refused: bool) -> None:
    # removed rows holding an ignore_index (255): the label-range check reads the output's width (and again for its
    # refusal's message), the first request's label probe reads it once more, each a probe of nll and the model on
    # the removed rows; now one probe a request, the same proposal to the bit
    from mcmc_unlearner import kronecker

    model, _, log_prior, bank, x, y = regression
    y = y.clone()
    y[0] = 255  # a removed row; the others of label 0 alone, so that labels 1-3 are read beside the width
    if refused:
        y[BAD] = 9
    gone = torch.arange(0, 40, 4)
    keep = torch.ones(200, dtype=torch.bool)
    keep[gone] = False
    removed, remaining = (x[gone], y[gone]), (x[keep], y[keep])
    real = kronecker.likelihood_and_columns
    probes: list[int] = []
    monkeypatch.setattr(kronecker, "likelihood_and_columns", lambda *a: probes.append(1) or real(*a))
    banks = []
    for once in (True, False):
        if not once:  # every probe run, as before
            monkeypatch.setattr(
                MCMCUnlearner,
                "_likelihood_probe",
                lambda self, raw: kronecker.likelihood_and_columns(self.model, self._row_nll, raw),
            )
        probes.clear()
        un = MCMCUnlearner(model, nll=_ignoring_nll, log_prior=log_prior, bank=bank, seed=0)
        if refused:
            with pytest.raises(IndexError, match=r"class label 9 .*4 classes \(labels 0 to 3\)"):
                un.propose(removed, _shuffled(*remaining, 0))
        else:
            banks.append(un.propose(removed, _shuffled(*remaining, 0)).bank)
            assert un._output_width == 4
        assert len(probes) == (1 if once else 2), probes
    assert refused or torch.equal(banks[0], banks[1])


def test_a_refusal_before_a_requests_own_reading_keeps_what_an_earlier_refusal_left(regression) -> None:
    # a refused request leaves the minibatches it read ahead to the next request reading the iterator, which puts
    # them back first; a refusal of that next request before its own reading (here a large removal's warning raised
    # as an error, outside the blocks that kept them) took all 20 from the caller's iterator
    model, nll, log_prior, bank, x, y = regression

    def refuse(un: MCMCUnlearner, data: Iterator) -> None:
        budget, un.memory_budget = un.memory_budget, 4000
        with pytest.raises(MemoryError, match=r"K-FAC needs about .* for one row at a time"):
            un.propose((x[:10], y[:10]), data, n_remaining=190)
        un.memory_budget = budget
        with warnings.catch_warnings(), pytest.raises(UserWarning, match="this request removes"):
            warnings.simplefilter("error")
            un.propose((x[:100], y[:100]), data, n_remaining=100)

    def make() -> MCMCUnlearner:
        return MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0, solver="kfac")

    _refused_then_applied(
        make, lambda taken: _minibatches(x[10:], y[10:], 30, None, taken), refuse, (x[:10], y[:10]), 190
    )


def test_a_proposal_holds_none_of_the_minibatches_read_ahead(regression, monkeypatch) -> None:
    # the read-ahead's copies of a plain iterator's minibatches, kept while the request runs for a refusal to give
    # back, were kept by the proposal too (it holds the request's stream): 25 minibatches per proposal, freed after
    # their use before
    import gc
    import weakref

    from mcmc_unlearner.stream import _Stream

    model, nll, log_prior, bank, x, y = regression
    copies: list[weakref.ref] = []
    real = _Stream.read_ahead

    def read_ahead(self: _Stream, count: int, m: int) -> None:
        real(self, count, m)
        copies.extend(weakref.ref(t) for b in self._held for t in b)

    monkeypatch.setattr(_Stream, "read_ahead", read_ahead)
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    prop = un.propose((x[:10], y[:10]), _minibatches(x[10:], y[10:], 30, None, [0]), n_remaining=190)
    gc.collect()
    assert len(copies) >= 40 and [r for r in copies if r() is not None] == []
    assert prop._data is not None  # (the proposal does hold the stream)
    # nor the remaining labels a request gathered once (a RemovableDataset's kept rows: a copy of their labels)
    from mcmc_unlearner.data import RemovableDataset

    prop = un.propose((x[:10], y[:10]), RemovableDataset(x[10:], y[10:], batch_size=32, seed=0))
    assert prop._data._once == {}
