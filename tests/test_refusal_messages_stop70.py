"""Refusals that named no working fix (stop 70): ``likelihood="gaussian"`` on a Gaussian whose variance the model
learns (``F.gaussian_nll_loss`` on a mean and a variance head, which ``likelihood="auto"`` reads since stop 69) said
"pass sigma=... or likelihood='empirical'" (``MCMCUnlearner`` has no ``sigma=``); ``solver="lowrank"``'s direct solve,
its residual over ``tol`` by float32 rounding, said "raise iter_T" (which no direct solve reads: iter_T=1000 changed
nothing). Each message now names the fix, the fix works, and the refused request changed nothing."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from mcmc_unlearner import MCMCUnlearner, RemovableDataset
from mcmc_unlearner.errors import QualityError


def _prior(m: torch.nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _learned_variance(m: torch.nn.Module, b: tuple) -> torch.Tensor:
    z = m(b[0])
    return F.gaussian_nll_loss(z[:, 0], b[1], F.softplus(z[:, 1]) + 1e-3, full=True, reduction="none")


def _huber(m: torch.nn.Module, b: tuple) -> torch.Tensor:
    return F.huber_loss(m(b[0])[:, 0], b[1], reduction="none")


def _ce(m: torch.nn.Module, b: tuple) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def _setup(labels: bool) -> tuple[torch.nn.Module, torch.Tensor, RemovableDataset]:
    """200 rows of 4 features (a regression target, or ``labels``: the first feature's sign), a 4-8-2 tanh network
    and a bank of 6 around its weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    y = (x[:, 0] > 0).long() if labels else x[:, 0] + 0.3 * torch.randn(200, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.05 * torch.randn(6, theta.numel(), generator=g)
    return model, bank, RemovableDataset(x, y, batch_size=32, seed=1)


def _state(un: MCMCUnlearner, data: RemovableDataset) -> tuple[torch.Tensor, ...]:
    return un.bank.clone(), torch.nn.utils.parameters_to_vector(un.model.parameters()).clone(), data.remaining_ids


def _unchanged(before: tuple[torch.Tensor, ...], after: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("nll", [_learned_variance, _huber], ids=["learned_variance", "huber"])
def test_likelihood_gaussian_on_another_nll_names_likelihood_auto(nll) -> None:
    model, bank, data = _setup(labels=False)
    un = MCMCUnlearner(model, bank=bank, nll=nll, log_prior=_prior, solver="kfac", likelihood="gaussian")
    before = _state(un, data)
    with pytest.raises(ValueError, match=re.escape("leave likelihood='auto'")) as exc:
        un.forget([0, 1, 2], data)
    assert "pass sigma=" not in str(exc.value)  # no option of MCMCUnlearner's
    if nll is _learned_variance:
        assert "F.gaussian_nll_loss" in str(exc.value)
    assert _unchanged(before, _state(un, data))
    # the fix named: likelihood='auto' (the default) takes the learned-variance Gaussian's Fisher
    if nll is _learned_variance:
        model, bank, data = _setup(labels=False)
        un = MCMCUnlearner(model, bank=bank, nll=nll, log_prior=_prior, solver="kfac")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = un.forget([0, 1, 2], data, strict=False)
        assert report.info["kfac"]["likelihood"] == "gaussian"
        assert report.info["kfac"]["likelihood_detected"] == {"variance": "learned"}


def test_a_direct_solves_residual_over_tol_names_tol_not_iter_t() -> None:
    model, bank, data = _setup(labels=True)
    un = MCMCUnlearner(model, bank=bank, nll=_ce, log_prior=_prior, solver="lowrank")
    before = _state(un, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(QualityError) as exc:
            un.forget([0, 1, 2], data)
    report = exc.value.report
    assert report.iterations == 0 and 1e-4 < report.residual < 1e-3  # 1.3e-4 measured (1.3e-13 in float64)
    said = [p for p in report.problems if "solve stopped" in p]
    assert len(said) == 1 and "raise iter_T" not in said[0] and "iter_T does not apply" in said[0], said
    assert "tol=0.001" in said[0]
    assert _unchanged(before, _state(un, data))
    # the fix named: the tol it suggests (iter_T=1000 is refused as before, with the same residual)
    model, bank, data = _setup(labels=True)
    un = MCMCUnlearner(model, bank=bank, nll=_ce, log_prior=_prior, solver="lowrank", tol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = un.forget([0, 1, 2], data)
    assert report.problems == [] and report.residual == pytest.approx(exc.value.report.residual)


def test_a_direct_solves_residual_far_above_rounding_names_no_tol() -> None:
    """A direct solve's residual far above its dtype's rounding is a nearly singular damped system, not rounding
    (stop 70's review): a three-layer linear network's ``lowrank`` solve at ``damping=1e-6`` stopped at residual
    0.23, and the message named ``tol=1``, a value ``tol`` refuses, for a step 23% off its own equation. It now names
    the damping, not a tol."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    y = x[:, 0] + 0.3 * torch.randn(200, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 1))
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.01 * torch.randn(4, theta.numel(), generator=g)
    un = MCMCUnlearner(
        model,
        nll=lambda m, b: 0.5 * (m(b[0])[:, 0] - b[1]) ** 2,
        log_prior=lambda m: -1e-6 * sum((p**2).sum() for p in m.parameters()),
        bank=bank.clone(),
        solver="lowrank",
        damping=1e-6,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(QualityError) as exc:
            un.remove((x[:10], y[:10]), (x[10:], y[10:]))
    report = exc.value.report
    assert report.iterations == 0 and report.residual > 1e-2  # 0.23 measured
    said = [p for p in report.problems if "solve stopped" in p]
    assert len(said) == 1 and "iter_T does not apply" in said[0], said
    assert "tol=" not in said[0] and "nearly singular" in said[0] and "damping='auto'" in said[0], said
    assert torch.equal(un.bank, bank)  # refused: nothing changed
