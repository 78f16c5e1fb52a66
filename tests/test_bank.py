"""Bring your own samples and data: bank layouts, no writes into the caller's tensors, plain iterators."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.data import DataLoader, TensorDataset

from mcmc_unlearner import MCMCUnlearner, RemovableDataset
from mcmc_unlearner.bank import to_flat
from mcmc_unlearner.curvature import ParamSpec


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(240, 3, generator=g)
    y = (x @ torch.tensor([1.0, -2.0, 0.5]) > 0).long()
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5, generator=g)
    theta = parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.05 * torch.randn(12, theta.numel(), generator=g)
    return model, x, y, bank


def _nll(m, batch):
    return nn.functional.cross_entropy(m(batch[0]), batch[1], reduction="none")


def _log_prior(m):
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _layouts(model, bank):
    spec = ParamSpec.of(model)
    rows = [spec.unflatten(r) for r in bank]
    state_dicts = [{k: v.clone() for k, v in r.items()} for r in rows]
    stacked = {name: torch.stack([r[name] for r in rows]).clone() for name in spec.names}
    return {"flat": bank.clone(), "state_dicts": state_dicts, "stacked": stacked}


def test_every_bank_layout_gives_the_same_shift_returned_in_its_own_layout() -> None:
    model, x, y, bank = _problem()
    out = {}
    for kind, given in _layouts(model, bank).items():
        keep = {k: v.clone() for k, v in given.items()} if kind == "stacked" else None
        un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=given)
        un.forget([0, 1, 2, 3], RemovableDataset(x, y, batch_size=40, seed=0))
        out[kind] = un.samples()
        flat_back, _ = to_flat(out[kind], ParamSpec.of(model))
        assert torch.equal(flat_back, un.bank)
        assert type(out[kind]) is type(given)
        if kind == "stacked":  # the caller's tensors are not written
            assert all(torch.equal(keep[k], given[k]) for k in keep)
    ref = out["flat"]
    assert not torch.equal(ref, bank)  # something moved
    assert torch.equal(to_flat(out["state_dicts"], ParamSpec.of(model))[0], ref)
    assert torch.equal(to_flat(out["stacked"], ParamSpec.of(model))[0], ref)


def test_a_model_loaded_from_a_bank_row_does_not_write_into_the_callers_bank() -> None:
    model, x, y, bank = _problem(1)
    vector_to_parameters(bank[-1], model.parameters())  # the parameters now alias bank[-1]
    original = bank.clone()
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    report = un.forget([5, 6, 7], RemovableDataset(x, y, batch_size=40, seed=0))
    assert report.passed and report.shift_norm > 0
    assert torch.equal(bank, original)  # the user's stored samples are untouched
    assert not torch.equal(parameters_to_vector(model.parameters()), original[-1])  # the live chain moved


def test_bank_layout_errors_name_the_problem() -> None:
    model, *_ = _problem()
    spec = ParamSpec.of(model)
    with pytest.raises(ValueError, match=r"shape \[S, 26\]"):
        to_flat(torch.zeros(3, 5), spec)
    with pytest.raises(ValueError, match="lacks the model's parameter"):
        to_flat([{"weight": torch.zeros(2)}], spec)
    with pytest.raises(ValueError, match="list of state_dicts"):
        to_flat("samples.pt", spec)


def test_plain_iterators_and_dataloaders_work_and_size_errors_are_clear() -> None:
    model, x, y, bank = _problem(2)
    keep = torch.ones(240, dtype=torch.bool)
    keep[:6] = False
    removed = (x[:6], y[:6])
    loader = DataLoader(TensorDataset(x[keep], y[keep]), batch_size=40, shuffle=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    report = un.remove(removed, loader)  # n read from the DataLoader's data set; it restarts when exhausted
    assert report.n_remaining == 234 and report.passed
    un2 = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank)
    with pytest.raises(ValueError, match="n_remaining"):
        un2.remove(removed, iter(loader))
    batches = iter([(x[keep][:40], y[keep][:40])])
    with pytest.raises(ValueError, match="ran out"):
        un2.remove(removed, batches, n_remaining=234)


def test_full_curvature_data_falls_back_cleanly_for_plain_iterators() -> None:
    model, x, y, bank = _problem(3)
    loader = DataLoader(TensorDataset(x[10:], y[10:]), batch_size=30)
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank, curvature_data="full")
    report = un.remove((x[:10], y[:10]), loader)
    assert "has no remaining()" in report.info["curvature_data"] and report.passed
