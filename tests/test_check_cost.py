"""The safety check made cheaper without changing what it measures (stop 59): its batched forward passes pool
2x2 through strided views (``models.bnn.MaxPool2x2`` under ``vmap`` alone), and its prior change reads the values of
``log p(θ_s + x)`` its remainders just took instead of evaluating the prior again one draw at a time. Every
``Measurement`` field, and so every decision of the damping search, is the same to the bit as the full path's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner.curvature import functionalize
from mcmc_unlearner.models.bnn import MaxPool2x2, build_model
from mcmc_unlearner.step import DampingControl, EnergyCheck


def _digits_problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model("digits_net", (1, 8, 8), 10)
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    thetas = flat + 0.05 * torch.randn(6, flat.numel(), generator=g)
    rows = (torch.rand(48, 1, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g))
    G = 0.1 * torch.randn(flat.numel(), generator=g)
    return model, thetas, rows, G


def _check(model: nn.Module, thetas: torch.Tensor, rows: tuple, G: torch.Tensor, **kw) -> EnergyCheck:
    f = functionalize(model, lambda m, x, y: F.cross_entropy(m(x), y, reduction="none"))
    lp = functionalize(model, lambda m: m.log_prior())
    return EnergyCheck(f, lp, thetas, rows, 500, G, **kw)


def _torch_pooling(model: nn.Module) -> nn.Module:
    for module in model.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, MaxPool2x2):
                setattr(module, name, nn.MaxPool2d(2))
    return model


@pytest.mark.parametrize("linear", ["jvp", "onesided"])
def test_the_batched_checks_strided_pooling_gives_torchs_measurements_to_the_bit(linear, monkeypatch) -> None:
    """The check vmaps the network over its draws without autograd: there the pooling takes the four strided views
    (torch's kernel is called only inside forward mode, for its tangent), and every field of every measurement, on
    the screen and the full check, equals the one with torch's ``nn.MaxPool2d``."""
    model, thetas, rows, G = _digits_problem()
    theirs = _torch_pooling(build_model("digits_net", (1, 8, 8), 10))
    theirs.load_state_dict(model.state_dict())
    kernel: list[bool] = []
    real = F.max_pool2d

    def counted(*args, **kwargs):
        kernel.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "max_pool2d", counted)
    ours_c = _check(model, thetas, rows, G, linear=linear, screen=(3, 16))
    theirs_c = _check(theirs, thetas, rows, G, linear=linear, screen=(3, 16))
    g = torch.Generator().manual_seed(1)
    for scale in (1e-3, 1e-2, 1e-1):
        x = scale * torch.randn(G.numel(), generator=g)
        for measure in ("screen", "__call__"):
            kernel.clear()
            a = getattr(ours_c, measure)(x)
            ours_calls = len(kernel)
            kernel.clear()
            b = getattr(theirs_c, measure)(x)
            assert dataclasses.asdict(a) == dataclasses.asdict(b)
            assert ours_calls < len(kernel)  # the batched forward passes no longer call torch's kernel
            if linear == "onesided":
                assert ours_calls == 0


def test_the_damping_search_takes_the_same_trials_with_the_strided_pooling() -> None:
    """A whole damping search (a scaled identity as the curvature) on the two networks: the same trials, dampings,
    measurements and accepted step."""
    from mcmc_unlearner.solvers import SolveResult

    class Scaled:
        damping_shapes = ("identity",)
        damping_shape = "identity"
        cheap_damping = True

        def solve(self, b: torch.Tensor, lam: float) -> SolveResult:
            return SolveResult(b / (0.02 + lam), "test", 0, 0.0, True)

        def quad(self, x: torch.Tensor) -> float:
            return 0.02 * float(x @ x)

        def damping_quad(self, x: torch.Tensor, lam: float) -> float:
            return lam * float(x @ x)

        def scale(self) -> float:
            return 0.02

        def min_damping(self) -> float:
            return 0.0

    model, thetas, rows, G = _digits_problem(3)
    theirs = _torch_pooling(build_model("digits_net", (1, 8, 8), 10))
    theirs.load_state_dict(model.state_dict())
    outs = []
    for net in (model, theirs):
        check = _check(net, thetas, rows, G, screen=(3, 16))
        outs.append(DampingControl(screen_accepts=False).step(Scaled(), G, check))
    a, b = outs
    assert a.history == b.history and len(a.history) > 1
    assert (a.damping, a.safe, a.actual, a.stderr) == (b.damping, b.safe, b.actual, b.stderr)
    assert torch.equal(a.x, b.x)


@pytest.mark.parametrize("vectorise", [True, False])
def test_the_prior_change_reads_the_remainders_values_and_equals_one_draw_at_a_time(vectorise, monkeypatch) -> None:
    """``_prior_change`` after a measurement evaluates the prior no more (batched or looped, the remainders took
    ``log p(θ_s + x)`` already), and its value, the measurement's ``direct`` and ``prior_per_row``, equal those from
    the prior evaluated one draw at a time."""
    from mcmc_unlearner import step as S

    model, thetas, rows, G = _digits_problem(2)
    check = _check(model, thetas, rows, G, vectorise=vectorise)
    x = 0.02 * torch.randn(G.numel(), generator=torch.Generator().manual_seed(4))
    part = check._part("full")
    calls = []
    real_measure = S._Part.measure

    def measure(self, x):
        lp = self.c.lp

        def counting(t):
            calls.append(True)
            return lp(t)

        r, d, p = self._remainders(x)
        self.c.lp = counting
        try:
            self._remainders = lambda _x: (r, d, p)
            return real_measure(self, x)
        finally:
            self.c.lp = lp
            del self._remainders

    monkeypatch.setattr(S._Part, "measure", measure)
    meas = check(x)
    assert calls == []  # no evaluation of the prior after the remainders
    with torch.no_grad():
        one_at_a_time = float(torch.stack([-check.lp(t + x) for t in thetas]).mean() + part.lp0.mean())
    assert part._prior_change(x) == one_at_a_time
    n = check.n
    assert meas.prior_per_row == one_at_a_time / n
    assert meas.direct == one_at_a_time + n * meas.nll_change
