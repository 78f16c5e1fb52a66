"""An explicit ``likelihood=`` that the probe rows contradict is refused, naming ``likelihood='auto'`` (stop 70's
review): ``likelihood="categorical"`` on a mean squared error over float targets was accepted without a word, and
K-FAC took the softmax Fisher of a regression's outputs as its curvature; so were ``"bernoulli"`` on a
cross-entropy and ``"categorical"`` on a binary cross-entropy. Only a positive identification by the detector
contradicts the likelihood named: an nll it cannot read (the empirical Fisher under ``"auto"``) keeps it."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from mcmc_unlearner import MCMCUnlearner, RemovableDataset
from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.kronecker import KroneckerCurvature


def _prior(m: torch.nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _mse(m: torch.nn.Module, b: tuple) -> torch.Tensor:
    return F.mse_loss(m(b[0]), b[1], reduction="none").sum(-1)


def _ce(m: torch.nn.Module, b: tuple) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def _bce(m: torch.nn.Module, b: tuple) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(m(b[0]), b[1], reduction="none").sum(-1)


def _ce_penalised(m: torch.nn.Module, b: tuple) -> torch.Tensor:
    """A cross-entropy plus a logit penalty: no likelihood the detector reads (the empirical Fisher under 'auto')."""
    z = m(b[0])
    return F.cross_entropy(z, b[1], reduction="none") + 0.1 * z.square().sum(-1)


def _setup(target: str) -> tuple[torch.nn.Module, torch.Tensor, RemovableDataset]:
    """120 rows of 4 features, a 4-8-3 tanh network, a bank of 4 around it; targets: a 3-output regression's
    floats, class labels, or 3 binary targets."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4, generator=g)
    reg = x[:, :3] + 0.1 * torch.randn(120, 3, generator=g)
    y = {"float": reg, "labels": (x[:, 0] > 0).long() + (x[:, 1] > 0).long(), "binary": (reg > 0).float()}[target]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.01 * torch.randn(4, theta.numel(), generator=g)
    return model, bank, RemovableDataset(x, y, batch_size=32, seed=1)


CONTRADICTED = [
    ("categorical", _mse, "float", "a Gaussian NLL"),
    ("bernoulli", _mse, "float", "a Gaussian NLL"),
    ("bernoulli", _ce, "labels", "a cross-entropy over the model's output's classes"),
    ("categorical", _bce, "binary", "a binary cross-entropy with logits"),
]


@pytest.mark.parametrize(
    ("lik", "nll", "target", "read"), CONTRADICTED, ids=[f"{c[0]}-{c[1].__name__}" for c in CONTRADICTED]
)
def test_an_explicit_likelihood_the_probe_contradicts_is_refused_naming_auto(lik, nll, target, read) -> None:
    model, bank, data = _setup(target)
    un = MCMCUnlearner(model, nll=nll, log_prior=_prior, bank=bank.clone(), solver="kfac", likelihood=lik)
    params = torch.nn.utils.parameters_to_vector(model.parameters()).clone()
    ids = data.remaining_ids.clone()
    with pytest.raises(ValueError, match=rf"likelihood='{lik}' but nll reads, on the probe rows, as"):
        un.forget([0, 1, 2, 3], data)  # (a fresh process's first request: about 1.2 CPU s of one-time start-up)
    c0 = time.process_time()
    with pytest.raises(ValueError, match=rf"likelihood='{lik}' but nll reads, on the probe rows, as") as e:
        un.forget([0, 1, 2, 3], data)  # refused again, nothing having changed: 0.03 CPU s
    assert time.process_time() - c0 < 1.0
    said = str(e.value)
    assert read in said and "likelihood='auto'" in said and "nothing was changed" in said
    assert torch.equal(un.bank, bank)
    assert torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()), params)
    assert torch.equal(data.remaining_ids, ids)
    # the fix named works: likelihood='auto' reads the nll's own likelihood
    auto = MCMCUnlearner(model, nll=nll, log_prior=_prior, bank=bank.clone(), solver="kfac")
    report = auto.forget([0, 1, 2, 3], data, strict=False)
    assert report.info["kfac_likelihood"] != lik


@pytest.mark.parametrize(
    ("lik", "nll", "target"),
    [("categorical", _ce, "labels"), ("bernoulli", _bce, "binary"), ("categorical", _ce_penalised, "labels")],
)
def test_an_explicit_likelihood_the_probe_does_not_contradict_is_taken(lik, nll, target) -> None:
    model, bank, data = _setup(target)
    un = MCMCUnlearner(model, nll=nll, log_prior=_prior, bank=bank.clone(), solver="kfac", likelihood=lik)
    report = un.forget([0, 1, 2, 3], data, strict=False)
    assert report.info["kfac_likelihood"] == lik


def test_ranks_agree_on_a_contradicted_likelihood() -> None:
    """A rank told through ``reduce`` that another rank's rows contradict the likelihood refuses too (none waits in a
    collective the refusing rank never reaches); the flag rides the explicit reading's one all-reduce."""
    model, _, _ = _setup("labels")
    theta = ParamSpec.flatten_module(model)[None]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = (x[:, 0] > 0).long()
    sent: list[torch.Tensor] = []

    def other_rank_contradicted(t: torch.Tensor) -> torch.Tensor:
        sent.append(t.clone())
        return t + torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=t.dtype) if len(sent) == 1 else t

    with pytest.raises(ValueError, match="another rank's probe rows read nll as another likelihood"):
        KroneckerCurvature.build(
            model,
            theta,
            [(x, y)],
            32,
            nll=_ce,
            log_prior=None,
            likelihood="categorical",
            reduce=other_rank_contradicted,
        )
    assert sent[0].tolist() == [0.0, 0.0, 0.0, 0.0]
