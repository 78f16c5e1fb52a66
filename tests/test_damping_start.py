"""The first damping search's start (stop 69): the rung of the ladder the rejected undamped step predicts to pass.

A search from scratch used to climb the whole ladder ``0, 1e-2·s, 1e-1·s, ...`` (``s`` the mean curvature) to the
first rung that passes; on the quick ResNet that was 10 trials to the eighth rung. It now starts at the rung the
undamped step's own measurement predicts (both misses scaled by the model's ``xᵀHx``) and brackets from there:
down to the first rung that fails where the start passes, up as before where it fails. Wherever the verdicts grow
monotonically with the damping the step taken is the ladder's, to every bit; these tests compare the two on closed
forms.
"""

from __future__ import annotations

import math

import pytest
import torch

from mcmc_unlearner.step import DampingControl, Measurement
from test_step import _QuadraticBackend


class _Backend(_QuadraticBackend):
    """A curvature model ``B`` (dense solves, tests/test_step.py's; ``cheap`` sets ``cheap_damping``), counting its
    solves."""

    def __init__(self, B: torch.Tensor, cheap: bool = True) -> None:
        super().__init__(B)
        self.cheap_damping = cheap  # (an instance attribute over the class's)


class _Ladder(DampingControl):
    """The search as before stop 69: every fresh search climbs the ladder from its first rung."""

    def _predicted_rung(self, backend, G, undamped, rungs):
        return None


def _check(H: torch.Tensor, G: torch.Tensor, nll_coef: float = 0.0, nll_power: float = 2.0, se: float = 0.0):
    """The true energy change of a quadratic with Hessian ``H`` (standard error ``se``) and a held-rows NLL rise
    ``nll_coef·‖x‖^nll_power`` against an NLL of 1 (allowance 0.05), measured exactly."""

    def check(x: torch.Tensor) -> Measurement:
        actual = -float(G @ x) + 0.5 * float(x @ H @ x)
        nll = nll_coef * float(x.norm()) ** nll_power
        return Measurement(actual, se, nll, nll_scale=1.0, nll_stderr=0.0, draws=8, rows=256)

    return check


def _problem(seed: int, flat: float, dim: int = 6):
    """A curvature model ``flat``× flatter than the true Hessian ``H`` (eigenvalues spread over 3 decades)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    H = Q @ torch.diag(torch.logspace(0, 3, dim, dtype=torch.float64)) @ Q.T
    G = 10 * torch.randn(dim, generator=g, dtype=torch.float64)
    return H, H / flat, G


def test_a_model_far_too_flat_is_searched_from_its_predicted_rung_to_the_ladders_step() -> None:
    """A model 10⁴× too flat: from the undamped step the ladder climbs 7 rungs (0.01·s ... 10⁴·s) to the first that
    passes and refines once; the predicted start is that rung, whose rung below fails, and the same refinement is
    tried (it fails here): the same step to every bit in 4 trials instead of 9."""
    H, B, G = _problem(0, 1e4)
    ladder = _Ladder().step(_Backend(B), G, _check(H, G))
    out = DampingControl().step(_Backend(B), G, _check(H, G))
    assert ladder.safe and out.safe and ladder.trials == 9
    assert out.damping == ladder.damping and torch.equal(out.x, ladder.x) and out.actual == ladder.actual
    lams = [h["damping"] for h in out.history]
    rung, below = lams[1], lams[2]
    assert lams[0] == 0 and rung == [h["damping"] for h in ladder.history][-2]  # the ladder's passing rung
    assert below == pytest.approx(rung / 10) and lams[3] == pytest.approx(math.sqrt(rung * below))
    assert out.trials == 4 and [h["ratio"] >= 0.25 for h in out.history] == [False, True, False, False]


def test_an_nll_bound_search_is_started_from_the_rung_the_undamped_rise_predicts() -> None:
    """Where the held rows' NLL, not the ratio, limits the step (the quick ResNet's case: the undamped step raised
    it 8,000× its allowance) the predicted rung is where ``r₀·q(λ)/q₀`` meets the allowance: exact for a rise
    proportional to ``xᵀBx`` (here ``B = I``: ``‖x‖²``), so the start is the ladder's passing rung."""
    dim = 4
    B = torch.eye(dim, dtype=torch.float64)
    G = torch.tensor([3.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    check = _check(B, G, nll_coef=400.0)  # an exact energy model: only the NLL net rejects
    ladder = _Ladder().step(_Backend(B), G, check)
    out = DampingControl().step(_Backend(B), G, check)
    assert ladder.safe and out.safe and out.damping == ladder.damping and torch.equal(out.x, ladder.x)
    passing = min(h["damping"] for h in ladder.history if h["damping"] > 0 and h["nll_change"] <= 0.05)
    assert out.history[1]["damping"] == passing  # started where the ladder first passed
    assert out.history[0]["nll_change"] == pytest.approx(400.0 * float(G @ G))  # the undamped x = G
    assert out.trials == 4 < ladder.trials == 8


def test_a_start_predicted_too_low_falls_back_to_the_ladder() -> None:
    """A rise growing more slowly than the model's quadratic form as the step shrinks (``‖x‖``): the prediction is
    too low and its rung fails; the search then takes the ladder from its bottom, the failed rung's measurement
    standing (not measured again): the ladder's step in the ladder's trials. (It climbed on from the failed rung at
    first, never trying the rungs below: where the verdicts do not grow with the damping that refused a request the
    ladder accepted, tests/test_bernoulli_likelihood.py, stop 69's integration.)"""
    B = torch.eye(3, dtype=torch.float64)
    G = torch.tensor([20.0, -10.0, 5.0], dtype=torch.float64)
    check = _check(B, G, nll_coef=1.0, nll_power=1.0)
    ladder = _Ladder().step(_Backend(B), G, check)
    out = DampingControl().step(_Backend(B), G, check)
    assert out.safe and out.damping == ladder.damping and torch.equal(out.x, ladder.x)
    lams = [h["damping"] for h in out.history]
    assert out.history[1]["nll_change"] > 0.05  # the predicted rung failed
    rest = [h["damping"] for h in ladder.history if h["damping"] != lams[1]]
    assert lams[:2] == [0.0, lams[1]] and lams[2:] == rest[1:]  # the ladder from its bottom, the failed rung reused
    assert out.trials == ladder.trials


def test_a_start_predicted_too_high_brackets_down_to_the_ladders_step() -> None:
    """A rise falling faster than the model's quadratic form as the step shrinks (``‖x‖⁴``): the prediction is too
    high; from a rung that passes the search tries the rungs below down to the first that fails and refines between
    them, as the ladder does: the same step, one trial fewer."""
    B = torch.eye(3, dtype=torch.float64)
    G = torch.tensor([20.0, -10.0, 5.0], dtype=torch.float64)
    check = _check(B, G, nll_coef=1.0, nll_power=4.0)
    ladder = _Ladder().step(_Backend(B), G, check)
    out = DampingControl().step(_Backend(B), G, check)
    assert out.safe and out.damping == ladder.damping and torch.equal(out.x, ladder.x)
    lams = [h["damping"] for h in out.history]
    assert lams[1:5] == [1e4, pytest.approx(1e3), pytest.approx(1e2), pytest.approx(10)]  # down to a rung that fails
    assert [h["nll_change"] <= 0.05 for h in out.history[1:5]] == [True, True, True, False]
    assert out.trials == ladder.trials - 1 == 6


_RISES = [(0.0, 2.0), (0.5, 2.0), (0.05, 1.0), (5e-3, 3.0)]  # the held rows' NLL rise: coefficient, power of ‖x‖


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("flat", [3.0, 1e2, 1e4])
@pytest.mark.parametrize("nll", _RISES)
def test_the_step_taken_is_the_ladders_wherever_the_verdicts_are_monotone(seed, flat, nll) -> None:
    """Exact checks (verdicts monotone in the damping on these problems) over models 3 to 10⁴× too flat and NLL rises
    of powers 0-3 of the step (none; the model's form; slower; faster): the step taken and the damping carried are
    the ladder's, to every bit."""
    H, B, G = _problem(seed, flat)
    check = _check(H, G, *nll)
    runs = [(c, c.step(_Backend(B), G, check)) for c in (_Ladder(), DampingControl())]
    (lc, ladder), (nc, out) = runs
    assert out.safe is ladder.safe and out.damping == ladder.damping and torch.equal(out.x, ladder.x)
    assert nc.state() == lc.state()


def test_the_predicted_start_saves_trials_over_the_ladder_in_all() -> None:
    """Over the grid above: 114 / 129 / 128 / 122 trials of the ladder against 66 / 89 / 85 / 106 from the predicted
    start (rises none, quadratic, linear, cubic in ‖x‖; the linear rise's 85 was 72 while a failed predicted rung
    climbed on instead of falling back to the ladder's bottom); a start too high can cost trials on one problem (a
    cubic rise falls faster than the prediction: 4 of its 18 problems took more trials than the ladder, 1 of the
    quadratic's). The step is the ladder's on all 72
    (``test_the_step_taken_is_the_ladders_wherever_the_verdicts_are_monotone``)."""
    for nll, (ladder_total, total) in zip(_RISES, [(114, 66), (129, 89), (128, 85), (122, 106)], strict=True):
        counts = []
        for flat in (3.0, 1e2, 1e4):
            for seed in range(6):
                H, B, G = _problem(seed, flat)
                check = _check(H, G, *nll)
                counts.append(
                    (_Ladder().step(_Backend(B), G, check).trials, DampingControl().step(_Backend(B), G, check).trials)
                )
        assert (sum(c[0] for c in counts), sum(c[1] for c in counts)) == (ladder_total, total)


def test_no_prediction_where_a_solve_at_a_new_damping_is_not_cheap_or_the_search_is_carried() -> None:
    """A backend whose damped solves cost Hessian products (``cheap_damping=False``: conjugate gradients) climbs the
    ladder as before, and so does a search starting from a carried damping: the prediction's solves are made only
    where they are free."""
    H, B, G = _problem(0, 1e4)
    ladder = _Ladder().step(_Backend(B), G, _check(H, G))
    dear = _Backend(B, cheap=False)
    out = DampingControl().step(dear, G, _check(H, G))
    assert [h["damping"] for h in out.history] == [h["damping"] for h in ladder.history]
    assert dear.solves == ladder.trials  # one solve a trial, none for a prediction
    carried = DampingControl()
    carried.set_state({"shape": "identity", "relatives": {"identity": 1e-6}})
    backend = _Backend(B)
    out = carried.step(backend, G, _check(H, G))
    assert out.history[0]["damping"] > 0 and backend.solves == out.trials


def test_an_undamped_step_rejected_by_neither_miss_gives_no_prediction() -> None:
    """An undamped step whose ratio and NLL pass but which is rejected otherwise (here: ``direct_z``, the energy
    measured directly rising) says nothing about the step's length: no start is predicted, and the search climbs the
    ladder as before. One rejected by its ratio is predicted a rung."""
    B = torch.eye(2, dtype=torch.float64)
    G = torch.tensor([1.0, 0.5], dtype=torch.float64)

    def rising(x: torch.Tensor) -> Measurement:  # the model's change exactly, but a clear direct rise
        actual = -float(G @ x) + 0.5 * float(x @ x)
        return Measurement(actual, 0.0, 0.0, direct=1.0, direct_stderr=0.01, nll_scale=1.0, nll_stderr=0.0)

    control = DampingControl(direct_z=2.0)
    undamped = control._try(_Backend(B), G, rising, 0.0)
    assert undamped is not None and not undamped.safe and undamped.ratio == 1.0
    rungs = [0.01 * 10.0**k for k in range(8)]
    assert control._predicted_rung(_Backend(B), G, undamped, rungs) is None
    overshooting = DampingControl()._try(_Backend(B), G, _check(100 * B, G), 0.0)
    assert overshooting is not None and not overshooting.safe
    assert DampingControl()._predicted_rung(_Backend(B), G, overshooting, rungs) is not None


class _ConfirmedCheck:
    """The true energy of ``B`` itself and a held-rows NLL rise ``‖x‖⁴`` with a standard error that leaves every
    step above 0.01 to a second measurement, which passes only the steps no longer than ``limit``; counting them."""

    def __init__(self, G: torch.Tensor, limit: float) -> None:
        self.G, self.limit, self.confirmed = G, limit, []

    def __call__(self, x: torch.Tensor) -> Measurement:
        actual = -float(self.G @ x) + 0.5 * float(x @ x)
        return Measurement(actual, 0.0, float(x.norm()) ** 4, nll_scale=1.0, nll_stderr=0.03, draws=8, rows=256)

    def confirm(self, x: torch.Tensor) -> tuple[float, float, int, int]:
        self.confirmed.append(float(x.norm()))
        return (0.0 if float(x.norm()) <= self.limit else 1.0), 0.001, 1024, 8


def test_a_rung_the_bracketing_passed_is_not_measured_again_when_the_ladder_climbs_back_to_it() -> None:
    """A start too high (the rise ``‖x‖⁴`` falls faster than the model's form): the rungs 10⁴, 10³, 10² pass their
    first measurement with their verdicts pending, 10 fails, and the refinement between 10 and 10² fails; 10² then
    fails its second measurement and the search climbs back as the ladder does. The rung 10³ it reaches was measured
    on the way down: it is measured again only by its second measurement, not a new trial. The step is the
    ladder's (10³ refined to 316), the rung 10³ in the history once."""
    B = torch.eye(3, dtype=torch.float64)
    G = torch.tensor([20.0, -10.0, 5.0], dtype=torch.float64)
    limit = 0.1  # the step at 10² (norm 0.227) fails its second measurement, at 10³ (0.0229) passes
    ladder_check, check = _ConfirmedCheck(G, limit), _ConfirmedCheck(G, limit)
    ladder = _Ladder().step(_Backend(B), G, ladder_check)
    out = DampingControl().step(_Backend(B), G, check)
    assert ladder.safe and out.safe and out.damping == ladder.damping and torch.equal(out.x, ladder.x)
    assert out.damping == pytest.approx(math.sqrt(1e2 * 1e3))
    lams = [h["damping"] for h in out.history]
    assert lams[:4] == [0.0, 1e4, pytest.approx(1e3), pytest.approx(1e2)]
    assert sum(1 for lam in lams if lam == pytest.approx(1e3)) == 1  # not tried again on the climb
    assert [h["damping"] for h in out.history if "abandoned" in h] == [pytest.approx(10.0), pytest.approx(10**1.5)]
    assert next(h for h in out.history if h["damping"] == pytest.approx(1e3))["confirm_passed"] is True
    assert out.trials == len(out.history) == 7 < ladder.trials == 9
    assert len(check.confirmed) == len(ladder_check.confirmed) == 3  # 10², 10³, 316 measured again in both


def test_where_the_verdicts_are_not_monotone_a_failed_prediction_falls_back_to_the_ladder() -> None:
    """A check that passes the first rung (damping 0.01), fails the rungs above it up to 100 and passes from 1,000 on
    (a noisy check's verdicts, made deterministic here): the ladder takes 0.01 in 2 trials; the undamped step's NLL
    rise predicts the rung 10, which fails, and the search falls back to the ladder from its bottom: 0.01, in 3
    trials. (Stop 69's review found it climbing on from the failed rung to 1,000, a step 10⁵ times shorter; the
    same order refused a sound request in tests/test_bernoulli_likelihood.py.) Where the predicted rung passes and
    a rung below it fails while one further below would pass, the bracketing still stops above: not the ladder's."""
    B = torch.eye(3, dtype=torch.float64)
    G = torch.tensor([20.0, -10.0, 5.0], dtype=torch.float64)
    size = float(G.norm())

    def check(x: torch.Tensor) -> Measurement:  # the model's energy exactly; the NLL net decides by 1 + damping
        actual = -float(G @ x) + 0.5 * float(x @ x)
        r = size / float(x.norm())
        ok = 1.005 < r < 1.05 or r > 999.0
        return Measurement(actual, 0.0, 0.0 if ok else 1.0, nll_scale=1.0, nll_stderr=0.0, draws=8, rows=256)

    ladder = _Ladder().step(_Backend(B), G, check)
    out = DampingControl().step(_Backend(B), G, check)
    assert ladder.safe and ladder.damping == pytest.approx(0.01) and ladder.trials == 2
    assert out.safe and out.damping == ladder.damping and torch.equal(out.x, ladder.x)
    assert [h["damping"] for h in out.history] == [0.0, pytest.approx(10.0), pytest.approx(0.01)]


def test_a_huge_trial_budget_predicts_from_the_finite_rungs_alone() -> None:
    """``max_damping_trials=10**400`` (accepted: it runs as a very large count, tests/test_option_types.py) made the
    prediction list a rung for every trial the budget allows, infinite ones beyond ``10³⁰⁸``: a fresh search whose
    undamped step was rejected filled memory (MemoryError after 15 s under a 1.5 GB limit; stop 69's review). The
    rungs end where the damping would be infinite: the same step as a budget of 12."""
    H, B, G = _problem(0, 1e4)
    huge = DampingControl(max_trials=10**400).step(_Backend(B), G, _check(H, G))
    usual = DampingControl().step(_Backend(B), G, _check(H, G))
    assert huge.safe and huge.damping == usual.damping and torch.equal(huge.x, usual.x)
    assert [h["damping"] for h in huge.history] == [h["damping"] for h in usual.history]
