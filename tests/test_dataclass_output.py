"""A forward returning a plain ``@dataclass`` (``Output(logits=...)``) is read as a dict output is: K-FAC finds the
categorical likelihood of its tensor field and the emptied-label check measures the removed label's probability.
It was read as no tensor at all (stop 55's probe): K-FAC fell back to the empirical Fisher, the emptied-label check
did not run, and a digits MLP's removed class stayed predicted (test error 0.21, retraining's 1.00) with
``problems=[]``. Where the check cannot run on a request that empties a label, a warning says so."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.kronecker import Likelihood, detect_likelihood, select_output
from test_emptied_label import _predictive, _softmax_regression

pytestmark = pytest.mark.filterwarnings("ignore:this request removes")


@dataclass
class Output:
    """What a forward returns: the logits under a field name, and something that is no tensor."""

    logits: torch.Tensor
    note: str = "plain dataclass"


class DataclassLinear(nn.Linear):
    """``nn.Linear`` (the same parameter names) whose forward returns :class:`Output`."""

    def forward(self, x: torch.Tensor) -> Output:  # type: ignore[override]
        return Output(super().forward(x))


def _dataclass_model(model: nn.Linear) -> DataclassLinear:
    out = DataclassLinear(model.in_features, model.out_features).double()
    out.load_state_dict(model.state_dict())
    return out


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(m(b[0]).logits, b[1], reduction="none")


def test_a_dataclass_output_is_detected_as_the_categorical_likelihood_of_its_tensor_field() -> None:
    model, _, _, _, x, y = _softmax_regression()
    dc = _dataclass_model(model)
    kind, extra = detect_likelihood(dc, _nll, (x[:16], y[:16]))
    assert kind is Likelihood.CATEGORICAL and extra.get("output") == "logits", extra
    assert torch.equal(select_output(dc(x[:5]), extra), model(x[:5]))


def test_the_emptied_label_check_reads_a_dataclass_output_as_it_reads_a_tensor() -> None:
    model, _, log_prior, bank, x, y = _softmax_regression()
    dc = _dataclass_model(model)
    gone = y == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "check did not run" warning, no empirical-Fisher fallback
        warnings.filterwarnings("ignore", "this request removes")
        un = MCMCUnlearner(dc, nll=_nll, log_prior=log_prior, bank=bank, seed=0, emptied_label="refuse")
        prop = un.propose((x[gone], y[gone]), (x[~gone], y[~gone]))
    measured = prop.report.info["emptied_labels"]
    assert isinstance(measured, dict) and set(measured) == {"3"}, measured
    assert measured["3"] == pytest.approx(float(_predictive(model, prop.bank, x[gone])[:, 3].mean()), rel=1e-10)
    assert prop.report.info.get("kfac_likelihood") in (None, "categorical"), prop.report.info.get("kfac_likelihood")


def test_a_request_emptying_a_label_the_check_cannot_read_warns() -> None:
    """A loss not recognised as a cross-entropy (class weights with label smoothing) on a request that removes label
    3's last rows: the check does not run, and a warning says so (it was an ``info`` line alone). Where no label is
    emptied there is no warning. Remaining rows whose labels cannot be listed (an iterator) warn once per
    unlearner, and at every request whose removed label none of the remaining rows it read holds; where every
    removed label is among those rows nothing is emptied and nothing is said (stop 70: it warned once per unlearner
    that the check had not run)."""
    model, nll, log_prior, bank, x, y = _softmax_regression()
    weights = torch.tensor([1.0, 2.0, 1.0, 3.0], dtype=torch.float64)

    def weighted(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1], weight=weights, reduction="none", label_smoothing=0.1)

    gone = y == 3
    un = MCMCUnlearner(model, nll=weighted, log_prior=log_prior, bank=bank, seed=0)
    with pytest.warns(UserWarning, match=r"the emptied-label check did not run \(the request removes the last rows"):
        un.propose((x[gone], y[gone]), (x[~gone], y[~gone]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        un.propose((x[:5], y[:5]), (x[5:], y[5:]))
    assert not [w for w in caught if "emptied-label check" in str(w.message)]

    def stream():
        while True:
            yield x[~gone][:50], y[~gone][:50]

    # the generic warning once per unlearner; a request whose removed label none of the rows read holds (label 3:
    # the stream gives other labels only) warns at every such request, naming it (it warned once: stop 66)
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    for removed in (gone, gone, torch.arange(200) < 3, torch.arange(200) < 3):  # then labels 0, 1, 2: all read
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prop = un.propose((x[removed], y[removed]), stream(), n_remaining=int((~gone).sum()))
        said = [str(w.message) for w in caught if "the emptied-label check did not run" in str(w.message)]
        named = removed is gone
        assert len(said) == int(named)
        info = prop.report.info
        if named:
            assert str(info["emptied_labels"]).startswith("not checked")
        else:  # labels 0, 1, 2 are among the rows read: none is emptied (stop 70: "not checked" and warned once)
            assert "emptied_labels" not in info and info["emptied_labels_stream"].startswith("not emptied: every")
        assert all("hold label 3, which none of the" in w for w in said)
    # where every removed label is among the rows read, nothing is said (stop 65 to 69: the generic warning once per
    # unlearner, though the request emptied no label: the quick matrix's transformer on every iterator run)
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prop = un.propose((x[:3], y[:3]), stream(), n_remaining=int((~gone).sum()))
        said = [str(w.message) for w in caught if "the emptied-label check did not run" in str(w.message)]
        assert not said and "emptied_labels" not in prop.report.info
