"""The safety check's linear term from a one-sided difference (``EnergyCheck(linear="onesided")``, the unlearner's
rule from ``CHECK_DIFFERENCE_FROM_DIM`` parameters): the quadratic through ``h(θ)``, ``h(θ + εx)`` and
``h(θ + x)``, against closed forms, forward mode and its Taylor expansion."""

from __future__ import annotations

import pytest
import torch

from mcmc_unlearner.step import DIFFERENCE_STEP, EnergyCheck
from test_check_difference import FIELDS, _cubic_model
from test_step import _blr_check_parts

E = DIFFERENCE_STEP


@pytest.mark.parametrize("vectorise", [True, False])
def test_the_one_sided_difference_is_exact_on_a_quadratic_energy(vectorise) -> None:
    """Linear-Gaussian regression (float64): every ``h_i`` and the prior are quadratic, so the quadratic through
    the three points is ``h`` itself and the measurement is the closed form ``−G·x + ½xᵀH_r x``."""
    f, lp, rows, n, thetas, G = _blr_check_parts(4)
    H_r = torch.eye(3, dtype=torch.float64) + rows[0].T @ rows[0]
    one = EnergyCheck(f, lp, thetas, rows, n, G, vectorise=vectorise, linear="onesided")
    fwd = EnergyCheck(f, lp, thetas, rows, n, G, vectorise=vectorise)
    for x in (torch.tensor([0.01, 0.02, -0.03]), torch.tensor([1.0, -2.0, 0.5])):
        x = x.double()
        mo, mf = one(x), fwd(x)
        assert mo.actual == pytest.approx(-float(G @ x) + 0.5 * float(x @ H_r @ x), rel=1e-9, abs=1e-9)
        for name in FIELDS:
            assert getattr(mo, name) == pytest.approx(getattr(mf, name), rel=1e-8, abs=1e-10), name
        # the rounding of h(θ + εx) and h(θ + x), amplified by 1/ε(1 − ε) and ε²/ε(1 − ε), is in the resolution
        assert mo.resolution == pytest.approx(mf.resolution * (1 + (1 + E * E) / (E * (1 - E))), rel=1e-12)


@pytest.mark.parametrize("vectorise", [True, False])
def test_the_one_sided_difference_misses_eps_of_the_cubic_part(vectorise) -> None:
    """Taylor: with ``E_t = h(θ + tx) − h(θ) = ta + t²b + t³c + t⁴q + …`` the estimate ``(E_ε − ε²E_1)/(ε(1 − ε))``
    is ``a − εc − ε(1 + ε)q − …``, so each remainder is over-measured by ``ε(c + (1 + ε)q)`` (central differences:
    ``−ε²c``). ``c`` and ``q`` from fine third and fourth differences, summed as the check sums the remainders; a
    short step, where the fifth-order terms are small."""
    f, lp, thetas, rows, G = _cubic_model()
    x = 0.03 * torch.randn(G.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    mo = EnergyCheck(f, lp, thetas, rows, 1000, G, vectorise=vectorise, linear="onesided")(x)
    mf = EnergyCheck(f, lp, thetas, rows, 1000, G, vectorise=vectorise)(x)
    d = 3e-3

    def third(fn, t):
        return (fn(t + 2 * d * x) - 2 * fn(t + d * x) + 2 * fn(t - d * x) - fn(t - 2 * d * x)) / (2 * d**3) / 6

    def fourth(fn, t):
        return (fn(t + 2 * d * x) - 4 * fn(t + d * x) + 6 * fn(t) - 4 * fn(t - d * x) + fn(t - 2 * d * x)) / d**4 / 24

    def summed(taylor) -> float:
        rows_part = torch.stack([taylor(lambda u: f(u, *rows), t) for t in thetas]).mean()
        prior_part = torch.stack([taylor(lambda u: -lp(u).reshape(1), t) for t in thetas]).mean()
        return 1000 * float(rows_part) + float(prior_part)

    expected = E * (summed(third) + (1 + E) * summed(fourth))
    gap = mo.actual - mf.actual
    assert abs(gap - expected) <= 0.05 * abs(expected)
    assert abs(gap) > 1e-4 * abs(mf.actual)  # the cubic part is not negligible here, so the comparison means something
    assert mo.direct == pytest.approx(mf.direct, rel=1e-12)  # the direct measurement needs no linear term


def test_a_one_sided_check_evaluates_one_forward_pass_per_draw_fewer() -> None:
    """The first measurement evaluates ``h`` at ``θ``, ``θ + x`` and ``θ + εx`` per draw (central differences: four
    passes); later ones reuse ``h(θ)`` (two passes each, against three)."""
    f, lp, rows, n, thetas, G = _blr_check_parts(4)
    calls: list[int] = []

    def counted(t: torch.Tensor, *b: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return f(t, *b)

    check = EnergyCheck(counted, lp, thetas, rows, n, G, vectorise=False, linear="onesided")
    x = torch.tensor([0.01, 0.02, -0.03], dtype=torch.float64)
    check(x)
    assert len(calls) == 3 * thetas.shape[0]
    check(2 * x)
    assert len(calls) == 5 * thetas.shape[0]
    assert torch.equal(check._part("full").h0, torch.stack([f(t, *rows) for t in thetas]))
    assert check.at(thetas, G).linear == "onesided"


def test_convolutional_networks_take_the_one_sided_difference_where_the_check_loops() -> None:
    """From ``CHECK_ONESIDED_CONV_FROM_DIM`` parameters a convolutional network's check loops over draws, and there
    it takes the one-sided difference (LeNet-5: a trial about half of forward mode's); below it, and for networks
    without a convolution below ``CHECK_DIFFERENCE_FROM_DIM``, forward mode as before. The report says which."""
    from torch import nn

    from mcmc_unlearner import MCMCUnlearner
    from mcmc_unlearner.unlearner import (
        CHECK_DIFFERENCE_FROM_DIM,
        CHECK_ONESIDED_CONV_FROM_DIM,
        check_linear_rule,
        loop_over_draws,
    )

    def conv_net(width: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, width), nn.Tanh(),
                             nn.Linear(width, 3))  # fmt: skip

    mlp = nn.Sequential(nn.Linear(4, 3))
    assert check_linear_rule(mlp, CHECK_DIFFERENCE_FROM_DIM - 1) == "jvp"
    assert check_linear_rule(mlp, CHECK_DIFFERENCE_FROM_DIM) == "onesided"
    reports = {}
    for width in (8, CHECK_ONESIDED_CONV_FROM_DIM // 140 + 1):  # about 148·width parameters
        torch.manual_seed(0)
        model = conv_net(width)
        dim = sum(p.numel() for p in model.parameters())
        above = dim >= CHECK_ONESIDED_CONV_FROM_DIM
        assert loop_over_draws(model, dim, check=True) == above  # the premise: exactly where the check loops
        assert check_linear_rule(model, dim) == ("onesided" if above else "jvp")
        x, y = torch.randn(200, 1, 8, 8), torch.randint(0, 3, (200,))
        base = torch.cat([p.detach().flatten() for p in model.parameters()])
        bank = base + 0.01 * torch.randn(12, dim)

        def nll(m, batch):
            return nn.functional.cross_entropy(m(batch[0]), batch[1], reduction="none")

        def log_prior(m):
            return -0.5 * sum((p**2).sum() for p in m.parameters())

        un = MCMCUnlearner(model, None, nll=nll, log_prior=log_prior, bank=bank, solver="kfac")
        reports[above] = un.remove((x[:8], y[:8]), (x[8:], y[8:]))
    assert reports[False].info["check_linear"] == "jvp"
    assert reports[True].info["check_linear"] == "onesided"
