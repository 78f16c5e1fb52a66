"""The safety check's linear term by central differences (``EnergyCheck(linear="difference")``, used from
``CHECK_DIFFERENCE_FROM_DIM`` parameters) against forward mode and closed forms."""

from __future__ import annotations

import pytest
import torch

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import functionalize
from mcmc_unlearner.step import DIFFERENCE_STEP, EnergyCheck
from mcmc_unlearner.unlearner import CHECK_DIFFERENCE_FROM_DIM, LOOP_DRAWS_FROM_DIM, loop_over_draws
from test_step import _blr_check_parts

FIELDS = ("actual", "stderr", "nll_change", "direct", "direct_stderr", "nll_scale")


E = DIFFERENCE_STEP
#: The rounding of the ``h`` values a difference takes, amplified into its linear term, counted in the
#: resolution: central, each ``h``'s by ``1/2ε``; one-sided, ``h(θ + εx)``'s and ``h(θ + x)``'s by ``1/ε(1 − ε)``
#: and ``ε²/ε(1 − ε)``.
RESOLUTION_FACTOR = {"difference": 1 + 1 / (2 * E), "onesided": 1 + (1 + E * E) / (E * (1 - E))}


@pytest.mark.parametrize("linear", list(RESOLUTION_FACTOR))
@pytest.mark.parametrize("vectorise", [True, False])
def test_the_difference_is_exact_on_a_quadratic_energy(vectorise, linear) -> None:
    """Linear-Gaussian regression (float64): every ``h_i`` and the prior are quadratic, so the central difference
    is their derivative, and the quadratic through ``h(θ)``, ``h(θ + εx)``, ``h(θ + x)`` is ``h`` itself: the
    measurement is the closed form ``−G·x + ½xᵀH_r x``, as forward mode's."""
    f, lp, rows, n, thetas, G = _blr_check_parts(4)
    H_r = torch.eye(3, dtype=torch.float64) + rows[0].T @ rows[0]
    diff = EnergyCheck(f, lp, thetas, rows, n, G, vectorise=vectorise, linear=linear)
    fwd = EnergyCheck(f, lp, thetas, rows, n, G, vectorise=vectorise)
    for x in (torch.tensor([0.01, 0.02, -0.03]), torch.tensor([1.0, -2.0, 0.5])):
        x = x.double()
        md, mf = diff(x), fwd(x)
        assert md.actual == pytest.approx(-float(G @ x) + 0.5 * float(x @ H_r @ x), rel=1e-9, abs=1e-9)
        for name in FIELDS:
            assert getattr(md, name) == pytest.approx(getattr(mf, name), rel=1e-8, abs=1e-10), name
        assert md.resolution == pytest.approx(mf.resolution * RESOLUTION_FACTOR[linear], rel=1e-12)


def _cubic_model():
    """A logistic model with a cubic feature map (float64): ``h_i`` is far from quadratic along a long step."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    f = functionalize(net, lambda m, x, y: torch.nn.functional.cross_entropy(m(x), y, reduction="none"))
    lp = functionalize(net, lambda m: -2.0 * sum((p**2).sum() ** 1.5 for p in m.parameters()))  # non-quadratic
    theta = torch.cat([p.detach().flatten() for p in net.parameters()])
    thetas = theta + 0.1 * torch.randn(6, theta.numel(), dtype=torch.float64)
    rows = (torch.randn(80, 5, dtype=torch.float64), torch.randint(0, 3, (80,)))
    return f, lp, thetas, rows, torch.randn(theta.numel(), dtype=torch.float64)


def _cubic_measurements(scale: float, linear: str, vectorise: bool):
    """:func:`_cubic_model`, a step of size ``scale`` along a seeded direction, and the check's measurement of it
    with ``linear`` and with forward mode."""
    f, lp, thetas, rows, G = _cubic_model()
    x = scale * torch.randn(G.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    m = EnergyCheck(f, lp, thetas, rows, 1000, G, vectorise=vectorise, linear=linear)(x)
    mf = EnergyCheck(f, lp, thetas, rows, 1000, G, vectorise=vectorise)(x)
    return f, lp, thetas, rows, x, m, mf


def third_difference(fn, t: torch.Tensor, x: torch.Tensor, d: float) -> torch.Tensor:
    """The third directional derivative of ``fn`` at ``t`` along ``x``, over 6, by a central difference (step ``d``)."""
    return (fn(t + 2 * d * x) - 2 * fn(t + d * x) + 2 * fn(t - d * x) - fn(t - 2 * d * x)) / (2 * d**3) / 6


@pytest.mark.parametrize("vectorise", [True, False])
def test_the_difference_misses_only_eps_squared_of_the_cubic_part(vectorise) -> None:
    """On a smooth nonlinear model the per-row remainders of the two checks differ by ``ε²`` times the cubic
    part of ``h_i`` along ``x`` (Taylor: the central difference is ``∇h·x + ε²·h'''/6 + O(ε⁴)``), measured here
    from a finer difference: so the measured energy changes agree to that, not merely to the check's noise."""
    f, lp, thetas, rows, x, md, mf = _cubic_measurements(0.3, "difference", vectorise)
    # the cubic parts c_i(θ) = h_i'''(θ; x)/6 by a fine third difference, summed as the check sums the remainders
    d = 1e-2

    def third(fn, t):
        return third_difference(fn, t, x, d)

    cubic_rows = torch.stack([third(lambda u: f(u, *rows), t) for t in thetas]).mean(0)  # [m]
    cubic_prior = torch.stack([third(lambda u: -lp(u).reshape(1), t) for t in thetas]).mean()
    expected = -(DIFFERENCE_STEP**2) * (1000 * float(cubic_rows.mean()) + float(cubic_prior))
    gap = md.actual - mf.actual
    assert abs(gap - expected) <= 0.05 * abs(expected) + 1e-9
    assert abs(gap) > 1e-6  # the cubic part is not negligible here, so the comparison means something
    assert md.direct == pytest.approx(mf.direct, rel=1e-12)  # the direct measurement needs no linear term


@pytest.mark.parametrize("linear, first, later", [("difference", 4, 3), ("onesided", 3, 2)])
def test_a_difference_check_counts_its_forward_passes_per_draw_and_keeps_the_unmoved_values(linear, first, later):
    """The first measurement evaluates ``h`` at ``θ``, ``θ + x`` and ``θ ± εx`` per draw (central differences: four
    passes; one-sided, ``θ + εx`` only: three); later ones reuse ``h(θ)`` (three passes each, one-sided two), and a
    bad mode name is refused."""
    f, lp, rows, n, thetas, G = _blr_check_parts(4)
    calls: list[int] = []

    def counted(t: torch.Tensor, *b: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return f(t, *b)

    check = EnergyCheck(counted, lp, thetas, rows, n, G, vectorise=False, linear=linear)
    x = torch.tensor([0.01, 0.02, -0.03], dtype=torch.float64)
    check(x)
    assert len(calls) == first * thetas.shape[0]
    check(2 * x)
    assert len(calls) == (first + later) * thetas.shape[0]
    assert torch.equal(check._part("full").h0, torch.stack([f(t, *rows) for t in thetas]))
    assert check.at(thetas, G).linear == linear
    with pytest.raises(ValueError, match="linear must be"):
        EnergyCheck(f, lp, thetas, rows, n, G, linear="finite")


def test_the_unlearner_takes_the_difference_and_loops_from_the_threshold() -> None:
    """Below ``CHECK_DIFFERENCE_FROM_DIM`` parameters the check takes forward mode (the recorded runs' numbers
    unchanged), from it the one-sided difference one draw at a time; the report says which."""
    assert CHECK_DIFFERENCE_FROM_DIM == LOOP_DRAWS_FROM_DIM
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 3))
    assert not loop_over_draws(mlp, CHECK_DIFFERENCE_FROM_DIM - 1, check=True)
    assert loop_over_draws(mlp, CHECK_DIFFERENCE_FROM_DIM, check=True)
    reports = {}
    for width in (8, CHECK_DIFFERENCE_FROM_DIM // 10 + 1):  # 10 inputs: about 11·width parameters
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(10, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
        dim = sum(p.numel() for p in model.parameters())
        x, y = torch.randn(300, 10), torch.randn(300)
        base = torch.cat([p.detach().flatten() for p in model.parameters()])
        bank = base + 0.01 * torch.randn(12, dim)

        def nll(m, batch):
            return 0.5 * (m(batch[0]).squeeze(-1) - batch[1]) ** 2

        def log_prior(m):
            return -0.5 * sum((p**2).sum() for p in m.parameters())

        un = MCMCUnlearner(model, None, nll=nll, log_prior=log_prior, bank=bank, solver="kfac")
        reports[dim >= CHECK_DIFFERENCE_FROM_DIM] = un.remove((x[:8], y[:8]), (x[8:], y[8:]))
    assert reports[False].info["check_linear"] == "jvp"
    assert reports[True].info["check_linear"] == "onesided"
