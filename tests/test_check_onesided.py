"""The safety check's linear term from a one-sided difference (``EnergyCheck(linear="onesided")``, the unlearner's
rule from ``CHECK_DIFFERENCE_FROM_DIM`` parameters): the quadratic through ``h(θ)``, ``h(θ + εx)`` and
``h(θ + x)``, against closed forms, forward mode and its Taylor expansion."""

from __future__ import annotations

import pytest
import torch

from mcmc_unlearner.step import DIFFERENCE_STEP
from test_check_difference import _cubic_measurements, third_difference

E = DIFFERENCE_STEP


@pytest.mark.parametrize("vectorise", [True, False])
def test_the_one_sided_difference_misses_eps_of_the_cubic_part(vectorise) -> None:
    """Taylor: with ``E_t = h(θ + tx) − h(θ) = ta + t²b + t³c + t⁴q + …`` the estimate ``(E_ε − ε²E_1)/(ε(1 − ε))``
    is ``a − εc − ε(1 + ε)q − …``, so each remainder is over-measured by ``ε(c + (1 + ε)q)`` (central differences:
    ``−ε²c``). ``c`` and ``q`` from fine third and fourth differences, summed as the check sums the remainders; a
    short step, where the fifth-order terms are small."""
    f, lp, thetas, rows, x, mo, mf = _cubic_measurements(0.03, "onesided", vectorise)
    d = 3e-3

    def third(fn, t):
        return third_difference(fn, t, x, d)

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
