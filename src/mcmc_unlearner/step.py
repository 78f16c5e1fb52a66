r"""Step control: the damping of each request chosen by a Levenberg–Marquardt rule, and the safety check.

**What is checked.** The influence step moves the bank by the common vector ``x = (H + λI)^{-1} G``; it is meant
to minimise the bank-averaged energy of the *remaining* data, :math:`φ(x) = E_s[F(θ_s + x, S∖S')]`. Its
curvature model predicts

.. math::  \mathrm{pred}(x) = -G·x + ½\,xᵀHx \quad(<0),

because :math:`E_s[∇F(θ_s, S∖S')] = -G` at the current posterior (integration by parts,
:math:`E_p[∇F(θ,S)] = 0`, minus the removed points' term). The measured change uses the same identity as a
control variate, so only the *curvature and higher-order* part is estimated from data:

.. math::  \mathrm{actual}(x) = -G·x + E_s\Big[R_{\mathrm{prior}}(θ_s, x) + n · \mathrm{mean}_{i∈M} R_i(θ_s, x)\Big],
           \qquad R_i(θ, x) = h_i(θ + x) - h_i(θ) - ∇h_i(θ)·x,

on ``check_draws`` posterior draws and ``check_rows`` held remaining rows ``M`` (one forward pass at
:math:`θ_s + x` and one forward-mode derivative at :math:`θ_s` per draw, or on large and convolutional networks a
one-sided difference from one more forward pass, ``EnergyCheck(linear="onesided")``; the linear term's large
minibatch noise never enters). ``actual/pred`` near 1 means the quadratic model holds over the step; a step that
runs into curvature the model missed (an indefinite or noisy Hessian, an overshooting approximation) makes ``actual``
larger than ``pred`` — the fit of the remaining data got worse than promised.

**The rule** (Levenberg 1944, Marquardt 1963; as adapted for K-FAC by Martens & Grosse 2015): a step is accepted
when ``pred < 0`` and ``actual/pred ≥ η`` (default 0.25) — the curvature model predicts what the step does — and
the held rows' mean negative log-likelihood, measured directly, rises by at most ``max_nll_increase`` (5%) of its
size beyond two standard errors — the safety net. The control variate above removes the bank's Monte-Carlo
noise from the energy test, but it also hides a bank that is not at equilibrium along ``x`` (finite SG-MCMC banks
in thousands of dimensions are not); the direct measurement does not hide it. A rejected step's damping grows
(×10, from ``1e-2 ×`` the mean curvature) until a step is accepted, then is refined once geometrically; the next
request starts from the accepted damping, and a first step with ratio above 0.75 (``TRUSTED_RATIO``: the model is
trusted) is followed by one at a tenth of its damping. That tenth is speculative — the step it follows was already
accepted — and replaces it only when the model is still trusted at it (its own ratio above 0.75) and it lowers the
measured energy by more than two standard errors of the two measurements combined: a longer step that passes the
ratio test within the check's noise is not taken, nor one the model predicts worse, as it sets the damping the
next requests start from (the digits BNN's class removed in 17 requests of 8, seeds 0 and 2: late tenths with
ratios 0.55–0.67 took steps 3–6× their neighbours' and ended 1.82 and 2.12× the retrain-pair distance; 1.21 and
1.43× with the rule; docs/fashion-mnist.md, "The speculative tenth"). On Fashion-MNIST, accepting it whenever it passed
— e.g. seed 3's request 90: ratio 0.56 on a measured change of −101 ± 65, a step five times the length of its
neighbours' — made much of the damage that accumulated over the last requests; with the rule and the correction
across requests ``MCMCUnlearner(recenter_every=...)`` seeds 0, 2, 3 ended at 1.89, 1.55 and 2.02× the retrain-pair
distance on one machine, with the correction alone at 2.22, 2.80 and 1.97×, docs/fashion-mnist.md. The refinement
after a rejected step is the search's own bracketing and is taken when it passes (requiring it to win too left
single requests on small networks short of retraining: a BatchNorm CNN's class removal 0.06 → 0.01 of the way,
docs/fashion-mnist.md). A step whose predicted and measured changes are both below the measurement's floating-point
resolution (``Measurement.resolution``) is judged by the NLL safety net alone: its ratio is rounding noise. A
request whose steps all fail is refused. A fixed ``damping`` disables the search, not the checks.

**The bank's own slope** (``DampingControl(slope_eta=...)``, the requests' :data:`SLOPE_ETA` = 0.25). The direct and
controlled measurements share the step's remainders, so ``G·x + actual − direct`` is the bank's own decrease of the
remaining energy per unit step, which the model takes to be ``G·x``. A step whose bank slope is clearly (3 standard
errors, the rows' and the draws') below a quarter of ``G·x`` is rejected like a failed ratio: the bank is not at
equilibrium along it (a chain too short to have moved where only the removed rows pulled, or ``G``'s Monte-Carlo
error pointing where the bank's energy does not fall), and the step would undo a pull the chain never made
(stop 62: 30 inverted digits with random labels forgotten from a CELU MLP, K-FAC's data-shape step at ratio 0.99 took
their NLL 3.8× and 5.9× as far as retraining did, the bank's slope 3% of ``G·x``; rejected, the identity shape's step
moved them 1.07× and 0.88×). A search every step of which fails, some by this test alone, is searched again without
it and its step cut to the bank's own minimum along it, or refused where the bank's energy does not fall along it.

**Across requests** each applied step's measured rise of the held rows' NLL (less the prior's credit) is added up
(:meth:`DampingControl.record`; the requests' errors in quadrature; each request measures other rows, so the sum
telescopes to the rise since the first request) and reported, not judged: every request of a sequence can pass its
own check while the fit creeps up (eight requests of 25 random rows on a regression MLP: +9–15%, its test RMSE
0.906 against retraining's 0.779; digits MLPs +13–41%, stop 43's probe). Holding the sum to 5% of the first
request's NLL was tried (stop 43) and not kept: retraining itself raises the remaining rows' NLL where a large share
of small data goes (+25% and +81% on two seeds of a digits MLP losing 37% of its rows), and the bound then held the
removal back (0.46 of the way to retraining instead of 1.09 on the second seed, the remaining NLL further from
retraining's) and cost a ResNet's later requests two or three trials each.

**Damping shapes** (``CurvatureBackend.damping_shapes``; K-FAC offers two). ``H + λI`` shrinks every direction by
``λ``, also those the remaining data barely constrain, where the curvature is the prior's alone (a forgotten
class's output weights, a backdoor trigger's embedding): a damping chosen for the directions where the model
overshoots drowns them. The ``"data"`` shape damps the data term alone, ``H_prior + (1 + λ/s)·H_data`` (``s`` =
the mean curvature), and leaves them their full Newton step. On a freshly built curvature the identity shape is
searched and the data shape tried once at the damping it accepted; that step replaces the identity step only when
its measured energy change, less the credit the check gives a step for following ``G``'s Monte-Carlo error, is
lower by more than two standard errors (:meth:`DampingControl.step`); requests that reuse the curvature keep the
shape accepted last. Without that credit taken off, the longer step won on noise alone (the digits BNN's first
request: 97% of the identity step's measured gain and 82% of the data step's were the credit). The unlearner
offers the data shape only until its first correction across requests (``MCMCUnlearner(recenter_every=...)``);
after it, requests are searched as ``H + λI``, the corrections' shape. Those are a class removal's rules: a request
whose removed labels are spread like the remaining rows' (:func:`labels_spread`: random rows) is searched in the data
shape first, the identity tried once, also after corrections (a digits MLP losing random rows in 100 requests of 1-8:
0.07 of the way to retraining under the class rules, 0.80 so; stop 44).

**Screening** (a sequential test: ``EnergyCheck(screen=...)``, ``MCMCUnlearner(check_screen=...)``). A step is
measured first on half the check draws and a quarter of its rows, an eighth of the full check's cost. When both
criteria are met, or one is failed, by more than three standard errors of that measurement, it decides; only a
step near a threshold pays for the full check, whose point estimates decide as above. A damping search from zero
rejects its first, grossly overshooting steps this way (the energy *rises* by many standard errors). The default
(``check_screen="reject"``, ``DampingControl(screen_accepts=False)``) lets the screen only *reject*, and screens
only the trials a search expects to fail — those of a search from scratch (no carried damping), up to its first
accepted step — so a taken step is always measured by the full check and a request that starts from a carried
damping pays nothing for screening. ``check_screen=True`` also accepts on the screen; such a step carries the
screen's noisier measurement into ``measured_deficit`` (on Fashion-MNIST two seeds ended farther from retraining
that way).

**Step length** (``MCMCUnlearner(shorten_steps=True)``, the default). The check gives the measured energy along
the accepted step as a quadratic in its length, ``φ(αx) ≈ −α G·x + α²(actual + G·x)``; when its minimum, taken
with the curvature at its lower confidence bound (``actual − 2·stderr``), lies short of the step (``α̂ < 1``: the
step overshoots by more than the measurement's error; ``α̂ ≥ 4/7`` for an accepted step), the bank moves by
``α̂x`` instead (:meth:`StepOutcome.shortened`; no extra passes). A step that stops short of the minimum is not
lengthened: its deficit is carried (below).

**Carried influence.** An accepted step with damping ``λ`` leaves the first-moment condition of the new posterior
unmet by ``λx`` (``E[∇F(θ + x, S∖S')] ≈ Hx − G = −λx``); the unlearner adds it to the next request's gradient,
so influence held back while the curvature model was not trusted is applied once it is (a class removed in many
requests is forgotten by the end; see ``MCMCUnlearner(carry_deficit=...)``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.func import grad, vmap

from .backends.base import CurvatureBackend, NegativeCurvatureError
from .curvature import jvp
from .options import DampingShape, ScreenMode, check_damping, check_option, is_bool, is_integer, is_number  # noqa: F401
from .solvers import SolveResult

log = logging.getLogger(__name__)  # each damping trial at DEBUG; a long search's progress at INFO

#: The requests' ``DampingControl(slope_eta=...)``: the bank's own slope of the remaining-data energy along a step
#: must not be clearly below this share of the model's ``G·x`` (the trust ratio's ``eta``).
SLOPE_ETA = 0.25
#: Standard errors by which the slope test (``DampingControl._slope_fails``) must be clear (the screen's ``screen_z``).
SLOPE_Z = 3.0
#: ``MCMCUnlearner(direct_z=...)``'s value measured at stop 67 (the option is off by default): a request's step whose
#: *direct* measurement of the remaining energy's change (no control variate) rises by more than this many of its
#: standard errors, the rows' and the check draws', is rejected. The taken steps of the GMM demo (402), the digits BNN
#: and three of the four flows read at most 4.2; it changes the MLP flow of seed 1 (three steps at 5.9-7.0) and not
#: the gaussian_nll_loss sequence's step that made the kept fit worse (4.4 with the draws' spread; 7.6 on the rows'
#: alone), docs/model-matrix.md "Stop 67: a request's direct rise refused".
DIRECT_Z = 5.0

#: Seconds between the INFO lines of a long pass that otherwise logs at INFO only when it ends: a damping search
#: running this long since it began or since its last such line says at INFO what its latest trial measured (each
#: trial is also a DEBUG line); the unread embedding rows' check says how many rows it read. Requests on a
#: 16.8M-parameter Linear went 41-105 s between INFO lines, all inside the damping search.
PROGRESS_EVERY_S = 10.0

__all__ = ["DampingControl", "DampingShape", "EnergyCheck", "Measurement", "ScreenMode", "StepOutcome", "labels_spread"]

Batch = tuple[torch.Tensor, ...]

#: ``ε`` of :class:`EnergyCheck`'s ``linear="difference"``: the central difference misses ``ε²/6`` of the third
#: derivative along the step (``ε² = 1/64`` of the cubic part of ``R_i``) and amplifies the forward passes' rounding by
#: ``1/2ε`` (4): the measurement's ``resolution`` is ``1 + 1/2ε`` (5) times forward mode's.
DIFFERENCE_STEP = 0.125


def unit_of(size: float, spread: float) -> float:
    """The safety net's unit from a NLL's size (mean ``|h|``) and the rows' spread of it: the spread where it is
    finite, positive and smaller, else the size (:func:`nll_unit`)."""
    return min(size, spread) if math.isfinite(spread) and spread > 0 else size


def nll_unit(h: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
    """The held rows' NLL size and the safety net's unit for it, from ``h`` (``[draws, rows]``; ``reduce`` sums
    over ranks): ``(mean |h|, unit)``, the unit the mean ``|h|`` or, where smaller, the rows' standard deviation
    of ``h`` (each draw's, averaged over the draws; from sums, so across ranks it is the one process's).

    A constant added to ``nll`` (a Gaussian's ``log σ√2π``, ``gaussian_nll_loss(full=True)``, the units of ``y``)
    changes neither the posterior nor the right step, but it changed the mean ``|h|``: a regression network's
    nll + 30 (or − 3) let through a step that raised the remaining rows' NLL by 14-51% (stop 47's probe). The
    spread does not move with a constant; for exponentially distributed NLLs (a cross-entropy's, roughly) it equals
    their mean and for a squared error without constants it is √2 times it, so there the mean stays the unit, as
    before."""
    h = h.double()
    # one reduction: the rows, their summed mean |h|, and each draw's sums of h and h² (over every rank)
    sums = reduce(torch.cat([torch.stack([h.new_tensor(float(h.shape[1])), h.abs().mean(0).sum()]), h.sum(1),
                             h.square().sum(1)]))  # fmt: skip
    m = max(float(sums[0]), 1.0)
    magnitude = float(sums[1]) / m
    per_draw = sums[2:].reshape(2, -1)  # [2, K]
    spread = float((per_draw[1] / m - (per_draw[0] / m) ** 2).clamp_min(0.0).sqrt().mean()) if m > 1 else math.nan
    return magnitude, unit_of(magnitude, spread)


@dataclass
class Measurement:
    """Measured effect of a common shift ``x`` on the remaining data (see the module docstring).

    Attributes:
        actual: Change of the bank-averaged remaining-data energy (negative = better fit).
        stderr: Its Monte-Carlo standard error over the check rows.
        nll_change: Mean change of the per-row negative log-likelihood of the check rows.
        direct, direct_stderr: The same energy change measured without the control variate (prior change plus
            ``n·mean Δh`` over the check rows), and its standard error.
        nll_scale: The damage tolerance's unit (:func:`nll_unit`): the check rows' mean ``|h|`` before the step, or
            their standard deviation of ``h`` where smaller.
        nll_stderr: Standard error of ``nll_change``.
        draws, rows: Posterior draws and held rows (summed over ranks) it was measured on.
        resolution: The smallest energy change the measurement can resolve in its floating-point type,
            ``ε·n·mean|h|/√(rows·draws)`` (the rounding of each ``h(θ+x) − h(θ)``, averaged).
        nll_draw_stderr: The part of ``nll_change``'s error that comes from measuring on ``draws`` of the bank's
            :attr:`EnergyCheck.population` samples (the spread of the draws' own mean changes, with the finite
            population's correction; 0 where every sample is measured or the population is not known).
        slope_draw_stderr: The draws' part of the error of the bank's own slope ``direct − actual`` (the spread of
            the draws' own ``∇E(θ_s)·x``, prior included, over ``√draws``), which ``stderr`` and ``direct_stderr``,
            spreads over the rows, do not see: along a direction the remaining rows do not touch they are 0 and
            the slope's whole error is the draws' (:meth:`DampingControl._bank_slope`).
        direct_draw_stderr: The draws' part of the error of ``direct`` as a measurement of the bank's change (the
            spread of the draws' own direct changes, prior included, over ``√draws``, with the finite population's
            correction where :attr:`EnergyCheck.population` is known: 0 where every sample is measured), which
            ``direct_stderr`` does not see (:meth:`DampingControl._direct_rise`).
    """

    actual: float
    stderr: float
    nll_change: float
    direct: float = math.nan
    direct_stderr: float = math.nan
    nll_scale: float = math.nan
    nll_stderr: float = math.nan
    draws: int = 0
    rows: int = 0
    resolution: float = 0.0
    prior_per_row: float = 0.0
    nll_draw_stderr: float = 0.0
    slope_draw_stderr: float = 0.0
    direct_draw_stderr: float = 0.0


def _draws_tensor(thetas: Any) -> torch.Tensor:
    """``thetas`` as a tensor: itself, or the copy of draws read in place (the unlearner's ``_BankRows``)."""
    return thetas if isinstance(thetas, torch.Tensor) else thetas.tensor()


def _directional(f: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``∇f(θ)·x`` for a vector-valued ``f`` (forward mode; double backward when ``torch.func`` is unsupported)."""
    try:
        return jvp(f, (theta,), (x,))[1].detach()
    except (RuntimeError, NotImplementedError, TypeError):
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            out = f(t)
            u = torch.zeros_like(out, requires_grad=True)
            (g,) = torch.autograd.grad(out, t, grad_outputs=u, create_graph=True)
            (d,) = torch.autograd.grad(g, u, grad_outputs=x)
        return d.detach()


class EnergyCheck:
    """Measures ``actual(x)`` of the module docstring on fixed draws and held rows.

    Args:
        nll_rows: ``f(θ_flat, *batch) -> [B]`` per-row negative log-likelihood.
        log_prior: ``f(θ_flat) -> scalar`` (``None``: flat prior).
        thetas: Check draws ``[K, D]``.
        rows: Held remaining rows.
        n: Remaining data points (the energy's scale).
        G: The request's gradient ``E[∇Σ_{S'}h]``.
        reduce: Sums tensors across ranks (``torch.distributed``); ``None`` in one process.
        screen: ``(draws, rows)`` of a first, cheaper measurement (:meth:`screen`: evenly spaced draws among
            ``thetas``, the first rows; with ``reduce``, this rank's first rows, which may be none); ``None``: no
            screening. The full check's forward passes are then only
            made when a step needs them.
        vectorise: Batch the draws through ``torch.func.vmap`` (``True``) or take them one at a time (the same
            values; faster for convolutional networks with few channels, whose batched weights ``vmap`` runs as
            grouped convolutions: :func:`~mcmc_unlearner.unlearner.loop_over_draws`).
        chunk: Draws batched together when vectorised (``None``: all): the unlearner sizes it to its memory budget
            (all draws × all rows at once took 2.4 GB on a 1M-parameter CNN under a 400 MB budget).
        row_chunk: Held rows per pass (``None``: every row at once, and the draws' gradients ``[K, D]`` formed at
            once). Given, the check also sums the draws' gradients chunk by chunk instead of forming them all: what
            a tight memory budget needs (the same values to rounding; the unlearner sets it only then).
        linear: How the rows' linear term ``∇h_i(θ_s)·x`` is taken: ``"jvp"`` (forward mode, exact) or
            ``"difference"``, the central difference ``(h_i(θ_s + εx) − h_i(θ_s − εx))/2ε`` with ``ε =
            DIFFERENCE_STEP`` (two forward passes; for a smooth ``h`` it is off by ``ε²/6`` of the third derivative
            along ``x``, so ``R_i`` is measured to ``ε² = 1/64`` of its cubic part). On a 1.2M-parameter ResNet torch's
            forward mode costs 5.3 forward passes. ``"onesided"``: from ``h_i(θ_s)``, ``h_i(θ_s + x)`` (both measured
            anyway) and one forward pass at ``θ_s + εx``, the linear term of the quadratic through the three,
            ``(E_ε − ε²E_1)/(ε(1 − ε))`` with ``E_t = h_i(θ_s + tx) − h_i(θ_s)``: exact on quadratics, one forward
            pass per draw fewer than the central difference, and it measures ``R_i`` to ``ε = 1/8`` of its cubic
            part (the unlearner's rule from ``CHECK_DIFFERENCE_FROM_DIM`` parameters, and from
            ``CHECK_ONESIDED_CONV_FROM_DIM`` with a convolution: ``check_linear_rule``).
    """

    def __init__(
        self,
        nll_rows: Callable[..., torch.Tensor],
        log_prior: Callable[[torch.Tensor], torch.Tensor] | None,
        thetas: torch.Tensor,
        rows: Batch,
        n: int,
        G: torch.Tensor,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        screen: tuple[int, int] | None = None,
        vectorise: bool = True,
        chunk: int | None = None,
        row_chunk: int | None = None,
        linear: str = "jvp",
    ) -> None:
        if linear not in ("jvp", "difference", "onesided"):
            raise ValueError(f"linear must be 'jvp', 'difference' or 'onesided', got {linear!r}")
        self.linear = linear
        self.f, self.lp, self.thetas, self.rows, self.n, self.G = nll_rows, log_prior, thetas, rows, n, G
        self.vectorise = bool(vectorise)
        self.chunk = None if chunk is None or chunk >= thetas.shape[0] else max(1, int(chunk))
        self.row_chunk = None if row_chunk is None else max(1, int(row_chunk))
        self.reduce = reduce or (lambda t: t)
        self._parts: dict[str, _Part] = {}
        self._screen_size: tuple[int, int] | None = None
        if screen is not None:
            k, m = min(int(screen[0]), thetas.shape[0]), min(int(screen[1]), rows[0].shape[0])
            if reduce is not None:  # the screen's rows and the check's, over the ranks (a rank may hold none)
                total, held = self.reduce(torch.tensor([m, rows[0].shape[0]], dtype=torch.float64)).tolist()
            else:
                total, held = m, rows[0].shape[0]
            if k < 1 or total < 1:
                raise ValueError(f"screen needs at least one draw and one row, got {screen}")
            if (k, total) != (thetas.shape[0], held):
                self._screen_size = (k, m)
        self._g0: torch.Tensor | None = None
        #: Fresh held rows for :meth:`confirm` (a function giving them, read on first use), or ``None``: no second
        #: measurement. The unlearner sets it for a request's influence step.
        self.confirm_rows: Callable[[], Batch] | None = None
        #: Further stored samples at which :meth:`confirm` measures too (besides :attr:`thetas`; or a function giving
        #: them, read on first use), or ``None``.
        self.confirm_thetas: torch.Tensor | Callable[[], torch.Tensor] | None = None
        #: The number of stored samples :attr:`thetas` are drawn from (``None``: unknown, the draws taken as fixed).
        self.population: int | None = None
        self._confirm: tuple[Batch, torch.Tensor, torch.Tensor | None] | None = None  # rows, h at the draws, extra

    def confirm(self, x: torch.Tensor) -> tuple[float, float, int, int] | None:
        """The held rows' mean NLL change under the shift ``x`` measured again on :attr:`confirm_rows` (other
        rows than the check's; the check's own where there are none) at the check's draws and
        :attr:`confirm_thetas`: ``(change, standard error, rows, draws)`` summed over ranks, or ``None`` with
        neither further rows nor further draws. A per-row NLL change can be heavy-tailed (a few rows of one class
        carrying most of it), and 256 rows then read it low: a step on a 1,000-class head measured +5% of the NLL
        on the check's rows where every remaining row gave +39%. So can a per-draw change: a step along directions
        some samples barely use (a mixture-density network's components) read +0.007 at 8 of 30 samples where
        every sample gave +0.067 (stop 50's probe)."""
        if self.confirm_rows is None and self.confirm_thetas is None:
            return None
        if self._confirm is None:
            rows = self.rows if self.confirm_rows is None else self.confirm_rows()
            extra = self.confirm_thetas() if callable(self.confirm_thetas) else self.confirm_thetas
            draws = list(self.thetas) + ([] if extra is None else list(extra))
            with torch.no_grad():
                h0 = torch.stack([self._rows_h(t, rows) for t in draws])
            self._confirm = (rows, h0, extra)
        rows, h0, extra = self._confirm
        thetas = [self.thetas] if extra is None else [self.thetas, extra]  # not joined: no copy
        with torch.no_grad():
            dh = (torch.stack([self._rows_h(t + x, rows) for part in thetas for t in part]) - h0).double().mean(0)
        sums = self.reduce(torch.stack([dh.sum(), (dh**2).sum(), torch.tensor(float(dh.numel()), dtype=torch.float64)]))
        m = float(sums[2])
        if m < 1:
            return None
        mean = float(sums[0]) / m
        stderr = math.sqrt(max(float(sums[1]) / m - mean**2, 0.0) / max(m - 1, 1))
        return mean, stderr, int(m), sum(int(part.shape[0]) for part in thetas)

    @property
    def confirm_covers_check(self) -> bool:
        """Whether :meth:`confirm` measures the check's own rows (no further rows: at the check's draws and further
        ones), so that its measurement contains the check's and is judged alone rather than pooled with it."""
        return self.confirm_rows is None

    def _rows_h(self, theta: torch.Tensor, rows: Batch) -> torch.Tensor:
        """``h_i(θ)`` on ``rows``, in parts of ``row_chunk`` rows."""
        return torch.cat([self.f(theta, *part).detach() for part in self.row_parts(rows)])

    def at(self, thetas: torch.Tensor, G: torch.Tensor) -> EnergyCheck:
        """The same check (rows, ``n``, likelihood, prior, reduction, batching) at other draws and gradient, without
        screening: what the unlearner's further Newton steps and corrections measure from the moved bank."""
        return EnergyCheck(
            self.f,
            self.lp,
            thetas,
            self.rows,
            self.n,
            G,
            self.reduce,
            vectorise=self.vectorise,
            chunk=self.chunk,
            row_chunk=self.row_chunk,
            linear=self.linear,
        )

    def row_parts(self, rows: Batch) -> list[Batch]:
        """``rows`` in parts of ``row_chunk`` rows (one part when it is ``None``)."""
        m, step = rows[0].shape[0], self.row_chunk
        if step is None or step >= m:
            return [rows]
        return [tuple(t[i : i + step] for t in rows) for i in range(0, m, step)]

    def _part(self, which: str) -> _Part:
        if which not in self._parts:
            if which == "full":
                thetas, rows = self.thetas, self.rows
            else:
                k, m = self._screen_size  # type: ignore[misc]
                K = self.thetas.shape[0]
                idx = torch.linspace(0, K - 1, k).round().long().unique() if k > 1 else torch.tensor([K - 1])
                thetas, rows = self.thetas[idx.to(self.thetas.device)], tuple(t[:m] for t in self.rows)
            self._parts[which] = _Part(self, thetas, rows)
        return self._parts[which]

    @property
    def m(self) -> int:
        return self._part("full").m

    @property
    def screening(self) -> bool:
        """Whether :meth:`screen` measures on fewer draws or rows than the full check."""
        return self._screen_size is not None

    def _energy_grads(self, x: torch.Tensor) -> torch.Tensor:
        """``E_s[∇(−log p + n·mean_rows h)(θ_s + x)]`` on the check rows (the data part summed across ranks)."""
        f, rows, lp = self.f, self.rows, self.lp
        m = self.m
        if self.row_chunk is not None:
            return self._energy_grads_summed(x)

        def data(t: torch.Tensor) -> torch.Tensor:
            return f(t, *rows).sum()

        g_data: torch.Tensor | None = None
        thetas = _draws_tensor(self.thetas)  # (draws read in place: the check's plan counts this copy)
        if self.vectorise:
            try:
                g_data = vmap(grad(data), chunk_size=self.chunk)(thetas + x).mean(0)
                g_prior = vmap(grad(lambda t: -lp(t)))(thetas + x).mean(0) if lp is not None else 0.0
            except (RuntimeError, NotImplementedError, TypeError):
                g_data = None
        if g_data is None:  # one draw at a time
            g_data, g_prior = torch.zeros_like(x), torch.zeros_like(x)
            for t in thetas + x:
                with torch.enable_grad():
                    tt = t.detach().requires_grad_(True)
                    g_data = g_data + torch.autograd.grad(data(tt), tt)[0]
                    if lp is not None:
                        g_prior = g_prior + torch.autograd.grad(-lp(tt), tt)[0]
            g_data, g_prior = g_data / len(self.thetas), g_prior / len(self.thetas)
        return self.reduce(g_data.detach()) * (self.n / m) + g_prior

    def _energy_grads_summed(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_energy_grads` summed over chunks of draws and parts of rows: never the ``[K, D]`` gradients."""
        f, lp, K = self.f, self.lp, self.thetas.shape[0]
        step = self.chunk or K
        g_data, g_prior = torch.zeros_like(x), torch.zeros_like(x)
        for s0 in range(0, K, step):
            th = _draws_tensor(self.thetas[s0 : s0 + step]) + x
            for part in self.row_parts(self.rows):

                def data(t: torch.Tensor, part: Batch = part) -> torch.Tensor:
                    return f(t, *part).sum()

                done = False
                if self.vectorise:
                    try:
                        g_data += vmap(grad(data))(th).sum(0)
                        done = True
                    except (RuntimeError, NotImplementedError, TypeError):
                        pass
                if not done:
                    for t in th:
                        with torch.enable_grad():
                            tt = t.detach().requires_grad_(True)
                            g_data += torch.autograd.grad(data(tt), tt)[0]
            if lp is not None:
                for t in th:
                    with torch.enable_grad():
                        tt = t.detach().requires_grad_(True)
                        g_prior += torch.autograd.grad(-lp(tt), tt)[0]
            del th
        return self.reduce(g_data / K) * (self.n / self.m) + g_prior / K

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        """``∇φ(x) = −G + E_s[∇F(θ_s + x, S∖S') − ∇F(θ_s, S∖S')]``: the gradient of the control-variate energy
        whose change ``__call__`` measures (paired differences on the check rows, so the rows' noise mostly
        cancels). It vanishes where the new bank's mean energy gradient equals the old bank's
        (``E[∇F(θ', S∖S')] = E[∇F(θ, S)]``, which is 0 at an exact posterior)."""
        if self._g0 is None:
            self._g0 = self._energy_grads(torch.zeros_like(x))
        return -self.G + (self._energy_grads(x) - self._g0)

    def __call__(self, x: torch.Tensor) -> Measurement:
        """The full check: every draw, every held row."""
        return self._part("full").measure(x)

    def screen(self, x: torch.Tensor) -> Measurement:
        """The same measurement on the screening subset (the full check when there is none)."""
        return self._part("screen" if self._screen_size is not None else "full").measure(x)


class _Part:
    """One measurement set of an :class:`EnergyCheck`: draws, rows and their values before the step.

    The rows' negative log-likelihood at the unmoved draws, ``h(θ_s)``, is the primal output of the first
    measurement's forward-mode derivative (``jvp`` returns it with the tangent), not a forward pass of its own: one
    forward pass fewer per check (on a 1.2M-parameter ResNet about a tenth of a request that reuses its curvature).
    One draw at a time it is bit-identical to a plain forward pass; batched through ``vmap`` it is the same
    batched computation that gives ``h(θ_s + x)``, so their difference carries no rounding of two different kernels.
    """

    def __init__(self, check: EnergyCheck, thetas: torch.Tensor, rows: Batch) -> None:
        self.c, self.thetas, self.rows = check, thetas, rows
        lp = check.lp
        with torch.no_grad():
            self.lp0 = None if lp is None else torch.stack([lp(t).detach() for t in thetas])
        self.m = int(check.reduce(torch.tensor(float(rows[0].shape[0]), dtype=torch.float64)))
        self.h0: torch.Tensor | None = None  # [K, m], set by the first measurement (:meth:`_start`)
        # (x, its version, log p(θ_s + x) per draw, batched or one at a time) of the last remainders, for
        # :meth:`_prior_change`
        self._lp1: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self.scale = self.magnitude = math.nan

    def _start(self, h0: torch.Tensor) -> None:
        """Keep the unmoved draws' values, their mean size (for the measurement's rounding) and the tolerance's unit
        (:func:`nll_unit`)."""
        self.h0 = h0.detach()
        self.magnitude, self.scale = nll_unit(self.h0, self.c.reduce)

    def _remainders(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[float, torch.Tensor]]:
        """Per draw and row ``R`` and ``h(θ+x) − h(θ)``, and the summed prior remainder with the prior's linear term
        ``∇(−log p)(θ_s)·x`` per draw (for the slope's error; ``torch.func``: vmapped
        over draws, or one draw at a time when the check does not vectorise; the rows in parts of ``row_chunk``,
        joined along the rows, when it is set)."""
        f, lp = self.c.f, self.c.lp
        parts = self.c.row_parts(self.rows)
        difference, first, e = self.c.linear in ("difference", "onesided"), self.h0 is None, DIFFERENCE_STEP
        onesided = self.c.linear == "onesided"
        ex = e * x if difference else None  # the moved draws, formed once per draw for the rows and the prior
        outs = []
        lp1s, self._lp1 = None, None
        for i, rows in enumerate(parts):

            def one(
                t: torch.Tensor, lp0: torch.Tensor | None = None, rows: Batch = rows, prior: bool = i == 0
            ) -> tuple[torch.Tensor, ...]:
                tx = t + x
                h1 = f(tx, *rows)
                if onesided:  # h(θ + εx) here; the linear term below, from the kept h(θ)
                    tp = t + ex
                    lin = f(tp, *rows)
                    h0 = f(t, *rows) if first else h1
                elif difference:  # h(θ) only at the first measurement: later ones read the kept values
                    tp, tm = t + ex, t - ex
                    lin = (f(tp, *rows) - f(tm, *rows)) / (2 * e)
                    h0 = f(t, *rows) if first else h1
                else:
                    h0, lin = jvp(lambda u: f(u, *rows), (t,), (x,))
                if lp is None or not prior:  # the prior's remainder does not depend on the rows: the first part's
                    zero = torch.zeros((), dtype=h1.dtype)
                    return h1, h0, lin, zero, zero, zero
                lp1 = lp(tx)
                if difference:  # the prior's too (forward mode on D numbers cost 20 ms a draw on a 1.2M ResNet)
                    # one draw at a time log p(θ_s) is the value kept at the start (the same call on the same θ_s)
                    lp0 = lp(t) if lp0 is None else lp0
                    if onesided:
                        dlp = (lp(tp) - lp0 - e * e * (lp1 - lp0)) / (e * (1 - e))
                    else:
                        dlp = (lp(tp) - lp(tm)) / (2 * e)
                else:
                    lp0, dlp = jvp(lp, (t,), (x,))
                return h1, h0, lin, -lp1 + lp0 + dlp, lp1, -dlp  # R of the energy's prior term −log p, its ∇·x

            with torch.no_grad():
                if self.c.vectorise and not isinstance(self.thetas, torch.Tensor):
                    # draws read in place (the unlearner's ``_BankRows``): a chunk copied at a time, as vmap's
                    # chunk_size would split a tensor of them
                    step, K = self.c.chunk or len(self.thetas), len(self.thetas)
                    pieces = [vmap(one)(_draws_tensor(self.thetas[s0 : s0 + step])) for s0 in range(0, K, step)]
                    out = tuple(torch.cat(v) for v in zip(*pieces))
                elif self.c.vectorise:
                    out = vmap(one, chunk_size=self.c.chunk)(self.thetas)
                else:
                    kept = [None] * len(self.thetas) if self.lp0 is None else list(self.lp0)
                    out = tuple(torch.stack(v) for v in zip(*(one(t, l0) for t, l0 in zip(self.thetas, kept))))
                if i == 0 and lp is not None:  # log p(θ_s + x) of every draw, for _prior_change
                    lp1s = out[4]
                if i == 0:
                    prior_lin = out[5]
                outs.append(out[:4])
        self._lp1 = None if lp1s is None else (x, x._version, lp1s)
        if len(outs) == 1:
            h1, h0, lin, rp = outs[0]
        else:
            h1, h0, lin = (torch.cat([o[k] for o in outs], dim=1) for k in range(3))
            rp = outs[0][3]
        if self.h0 is None:
            self._start(h0)
        if onesided:  # lin holds h(θ + εx): the quadratic through h(θ), h(θ + εx), h(θ + x)
            lin = (lin - self.h0 - e * e * (h1 - self.h0)) / (e * (1 - e))
        return h1 - self.h0 - lin, h1 - self.h0, (float(rp.sum()), prior_lin.double().reshape(-1))

    def _remainders_loop(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[float, torch.Tensor]]:
        """The same one draw at a time, with double-backward directional derivatives (no ``torch.func``)."""
        f, lp, rows = self.c.f, self.c.lp, self.rows
        parts = self.c.row_parts(rows)

        def at(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([f(t, *p).detach() for p in parts]) if len(parts) > 1 else f(t, *rows).detach()

        def lin(t: torch.Tensor) -> torch.Tensor:
            if len(parts) == 1:
                return _directional(lambda u: f(u, *rows), t, x)
            return torch.cat([_directional(lambda u, p=p: f(u, *p), t, x) for p in parts])

        if self.h0 is None:
            with torch.no_grad():
                self._start(torch.stack([at(t) for t in self.thetas]))
        R, dh, prior = torch.zeros_like(self.h0), torch.zeros_like(self.h0), 0.0
        prior_lin = torch.zeros(len(self.thetas), dtype=torch.float64)
        for s, t in enumerate(self.thetas):
            with torch.no_grad():
                h1 = at(t + x)
            R[s] = h1 - self.h0[s] - lin(t)
            dh[s] = h1 - self.h0[s]
            if lp is not None:
                with torch.no_grad():
                    lp1 = float(lp(t + x))
                dlp = float(_directional(lambda u: lp(u).reshape(1), t, x)[0])
                prior += -lp1 + float(self.lp0[s]) + dlp
                prior_lin[s] = -dlp
        return R, dh, (prior, prior_lin)

    def measure(self, x: torch.Tensor) -> Measurement:
        try:
            R, dh, (prior, prior_lin) = self._remainders(x)
        except (RuntimeError, NotImplementedError, TypeError):
            R, dh, (prior, prior_lin) = self._remainders_loop(x)
        K, n = self.thetas.shape[0], self.c.n
        per_row = R.double().mean(0)  # [m]: each held row's remainder averaged over the draws
        dh_row = dh.double().mean(0)
        lin_draw = (dh.double() - R.double()).sum(1)  # [K]: each draw's ∇h·x summed over this rank's rows
        dh_draw = dh.double().sum(1)  # [K]: each draw's change of h summed over this rank's rows
        sums = torch.stack([per_row.sum(), (per_row**2).sum(), dh_row.sum(), (dh_row**2).sum()])
        # one reduction: the rows' sums, the draws' slopes and their changes
        sums = self.c.reduce(torch.cat([sums, lin_draw, dh_draw]))
        slope_se = direct_draw_se = 0.0
        if K > 1:  # the draws' own ∇E(θ_s)·x (prior included): their spread is the slope's error the rows miss
            per_draw = n * sums[4 : 4 + K] / max(self.m, 1) + prior_lin.to(sums.device)
            slope_se = math.sqrt(float(per_draw.var()) / K)
            # and their own direct changes: the spread the direct measurement's rows miss
            pop = self.c.population
            share = 1.0 if pop is None else max(1.0 - K / pop, 0.0)
            changes = n * sums[4 + K :] / max(self.m, 1) + self._prior_changes(x).to(sums.device)
            direct_draw_se = math.sqrt(float(changes.var()) / K * share)
        mean, dmean = float(sums[0]) / self.m, float(sums[2]) / self.m
        denom = max(self.m - 1, 1)
        stderr = n * math.sqrt(max(float(sums[1]) / self.m - mean**2, 0.0) / denom)
        pop = self.c.population
        draw_se = 0.0
        if pop is not None and 1 < K < pop:  # the draws' own mean changes: a sample of the bank's
            per_draw = sums[4 + K :] / max(self.m, 1)  # each draw's change, reduced above with the rows' sums
            draw_se = math.sqrt(float(per_draw.var()) / K * (1 - K / pop))
        dstderr = n * math.sqrt(max(float(sums[3]) / self.m - dmean**2, 0.0) / denom)
        actual = -float(self.c.G @ x) + prior / K + n * mean
        prior_change = float(self._prior_change(x))
        direct = prior_change + n * dmean
        resolution = torch.finfo(self.h0.dtype).eps * n * self.magnitude / math.sqrt(max(self.m * K, 1))
        if self.c.linear == "difference":  # the difference's rounding: each h's, divided by 2ε
            resolution *= 1 + 1 / (2 * DIFFERENCE_STEP)
        elif self.c.linear == "onesided":  # h(θ + εx)'s and h(θ + x)'s, divided by ε(1 − ε) and times ε² of it
            e = DIFFERENCE_STEP
            resolution *= 1 + (1 + e * e) / (e * (1 - e))
        return Measurement(
            actual, stderr, dmean, direct, dstderr, self.scale, dstderr / n, K, self.m, resolution, prior_change / n,
            draw_se, slope_se, direct_draw_se,
        )  # fmt: skip

    def _prior_changes(self, x: torch.Tensor) -> torch.Tensor:
        """Each draw's ``−log p(θ_s + x) + log p(θ_s)`` (``[K]``, float64; zeros without a prior), from the values
        :meth:`_remainders` just took where it kept them (as :meth:`_prior_change`)."""
        if self.c.lp is None:
            return torch.zeros(len(self.thetas), dtype=torch.float64)
        kept = getattr(self, "_lp1", None)
        with torch.no_grad():
            if kept is not None and kept[0] is x and kept[1] == x._version:
                lp1 = kept[2]
            else:
                lp1 = torch.stack([self.c.lp(t + x) for t in self.thetas])
            return (self.lp0.double() - lp1.double()).reshape(-1)

    def _prior_change(self, x: torch.Tensor) -> float:
        """``E_s[−log p(θ_s + x) + log p(θ_s)]``: from the values of ``log p(θ_s + x)`` that :meth:`_remainders` just
        took for the same ``x`` (batched through ``vmap`` where the check vectorises, one draw at a time where it
        does not), else one draw at a time. Batched, the values were those of one draw at a time to every bit on
        the digits BNN's and the GMM's priors (the equal-to-rounding sums of squares of one tensor); one draw at a
        time they cost 15 more calls of the prior per request sequence there, 0.05 s of its 1.1 s (stop 59)."""
        if self.c.lp is None:
            return 0.0
        kept = getattr(self, "_lp1", None)
        with torch.no_grad():
            if kept is not None and kept[0] is x and kept[1] == x._version:  # as the remainders just took them
                return float((-kept[2]).mean() + self.lp0.mean())
            return float(torch.stack([-self.c.lp(t + x) for t in self.thetas]).mean() + self.lp0.mean())


@dataclass
class StepOutcome:
    """The accepted (or last tried) step of one request.

    Attributes:
        x: The common shift ``(H + λI)⁻¹G``.
        solve: The solver result of that step.
        damping: ``λ`` of that step.
        trials: Steps tried (each one checked).
        predicted, actual, ratio, stderr, nll_change: The check of that step (module docstring); ``nll_change`` is
            the held rows' mean NLL change pooled with the second measurement where there was one
            (:meth:`DampingControl._confirm`; the first alone in ``history``).
        safe: Whether the step passed the check.
        history: ``(damping, predicted, actual, ratio)`` of every trial.
        note: Why the last trial failed, if it did.
        scale: The backend's mean curvature ``tr H / D`` (the unit of the damping), when it was needed.
        gx: ``G·x``.
        length: Fraction of the solver's step taken (:meth:`shortened`; 1 = the whole step).
        shape: The damping's shape (``CurvatureBackend.damping_shapes``): ``"identity"`` (``H + λI``) or
            ``"data"`` (``H + (λ/s)·H_data``, the data term scaled up and the prior left alone).
        damping_quad: ``xᵀDx`` of the damping term ``D`` (``λ‖x‖²`` for the identity shape).
        shape_scores: When several shapes were tried: each accepted one's measured energy change, less the
            credit for ``G``'s Monte-Carlo error (:meth:`DampingControl.step`).
        nll_rise, nll_stderr, nll_scale: The held rows' NLL rise as the safety net judges it (less the prior's
            credit; pooled with the second measurement where there was one), its standard error, and the rows' NLL
            before the step: what :meth:`DampingControl.record` adds up across requests.
        negligible: Whether the step's predicted and measured energy changes were both below the check's
            floating-point resolution (:meth:`DampingControl._negligible`), or the step was zero.
    """

    x: torch.Tensor
    solve: SolveResult
    damping: float
    trials: int
    predicted: float
    actual: float
    ratio: float
    stderr: float
    nll_change: float
    safe: bool
    history: list[dict[str, float]] = field(default_factory=list)
    note: str = ""
    scale: float = 1.0
    gx: float = math.nan
    length: float = 1.0
    shape: str = "identity"
    damping_quad: float = math.nan
    shape_scores: dict[str, float] = field(default_factory=dict)
    nll_rise: float = math.nan
    nll_stderr: float = math.nan
    nll_scale: float = math.nan
    negligible: bool = False
    #: the measurement the step was judged on, and whether the screen decided it (``_saturated`` reads them)
    measurement: Measurement | None = field(default=None, repr=False, compare=False)
    screened: bool = field(default=False, repr=False, compare=False)
    #: ``(check, x)`` of a step passed on its first measurement whose second one (:meth:`DampingControl._confirm`)
    #: is deferred until the search needs its verdict (:meth:`DampingControl._settle`)
    pending: tuple[Any, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    #: this step's own entry in ``history`` (the same dict), which marks the taken trial in ``damping_history``
    record: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    #: refused by the slope test: the step the search again without it accepted, along which the bank's own energy
    #: does not fall (:meth:`DampingControl._along_bank_slope`); ``None`` otherwise
    slope_refused: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def shortened(self) -> StepOutcome:
        """The step cut back towards the measured minimum of the energy along it, when it clearly overshoots it.

        Along ``x`` the check's quadratic ``φ(αx) ≈ −α G·x + α²(actual + G·x)`` (slope ``−G·x`` at 0 from the
        identity of the module docstring, value ``actual`` measured at ``α = 1``) is smallest at
        ``G·x / (2(actual + G·x))``. The curvature is taken at its *lower* confidence bound (``actual − 2·stderr``),
        so the returned length ``α̂`` is the longest the measurement allows: a step is shortened only when the
        overshoot is larger than the check's Monte-Carlo error (an exact Newton step on a Gaussian, whose ratio
        is 1 up to that error, stays whole). With ``α̂ < 1`` the returned outcome moves by ``α̂x`` (``length``
        times α̂), with ``predicted``, ``actual`` and ``stderr`` those of the quadratics at ``α̂`` (``nll_change`` stays
        the one measured at the full step, an upper bound for a convex fit). Unchanged when ``α̂ ≥ 1``, the step
        was rejected, or the energy is not clearly convex along it. With ``η = 0.25`` an accepted step has
        ``α̂ ≥ 4/7``.
        """
        gx = self.gx
        stderr = self.stderr if math.isfinite(self.stderr) else 0.0
        c2 = self.actual + self.gx  # ½·(curvature along x)·‖x‖², point estimate
        c2_low = c2 - 2.0 * stderr
        if not (self.safe and math.isfinite(gx) and math.isfinite(c2)) or gx <= 0 or c2_low <= 0:
            return self
        a = gx / (2.0 * c2_low)
        if a >= 1.0:
            return self
        half_quad = self.predicted + gx
        predicted = -a * gx + a * a * half_quad
        actual = -a * gx + a * a * c2
        return replace(
            self,
            x=a * self.x,
            predicted=predicted,
            actual=actual,
            ratio=actual / predicted if predicted < 0 else self.ratio,
            stderr=a * a * self.stderr,
            gx=a * gx,
            length=self.length * a,  # of the solver's step: a step already cut (_along_bank_slope) is cut further
            damping_quad=a * a * self.damping_quad,
        )

    def shortfall(self) -> float:
        """How many times longer the step could be before the *measured* energy stops falling along it.

        Along ``x`` the check measures ``φ(αx) ≈ −α G·x + ½α² c‖x‖²`` with ``c‖x‖² = 2(actual + G·x)``, whose
        minimum is at ``α* = G·x / (c‖x‖²)``. This returns ``α*`` with the curvature at its upper confidence bound
        (``actual + 2·stderr``), so a noisy check does not inflate it; ``inf`` when even that bound is not
        positive (the measured energy is not convex along the step: no finite optimum there, no verdict). About 1
        (or below) when the curvature model set the step's length; ``≫ 1`` when the damping did: the step is then
        a short gradient step that leaves most of the influence unapplied.
        """
        if not (math.isfinite(self.gx) and math.isfinite(self.actual)) or self.gx <= 0:
            return math.nan
        stderr = self.stderr if math.isfinite(self.stderr) else 0.0
        q_hi = 2.0 * (self.actual + 2.0 * stderr + self.gx)
        return self.gx / q_hi if q_hi > 0 else math.inf


def measured_deficit(G: torch.Tensor, out: StepOutcome) -> torch.Tensor | None:
    """The first-moment deficit a damped step leaves, as far as the energy check measured it.

    A step ``x = (H + λI)⁻¹G`` leaves ``E[∇F(θ + x, S∖S')] = −G + H_true x``. Under the model ``H_true = H``
    that is ``−λx`` (the influence not yet applied); but the damping was needed because the model over-predicted
    the decrease, i.e. the energy curves more than ``H`` along ``x``. The check measures that curvature:
    ``actual = −G·x + ½ c‖x‖²`` gives ``c``, and the deficit along ``x`` is ``(G·x − c‖x‖²)/‖x‖² · x
    = −(G·x + 2·actual)/‖x‖² · x``, clipped to ``[0, λx]`` (``λx`` exactly when the model was right; 0 when the
    energy curves as much as the damped model ``H + λ``). For another damping shape ``D`` the upper end is the
    model's deficit along ``x``, ``xᵀDx/‖x‖² · x``. Carrying ``λx`` unmeasured compounds across requests
    when the damping is large (measured on Fashion-MNIST: 94 requests at ``λ ≈ 300×`` the mean curvature carried
    almost all of every request's ``G`` forward, the shift grew each request and the kept classes degraded).

    Returns:
        The deficit to carry to the next request, or ``None`` when there is none (undamped or unsafe step).
    """
    if out.damping <= 0 or not out.safe or not math.isfinite(out.actual):
        return None
    x = out.x
    xx = float(x @ x)
    if xx == 0.0:
        return None
    coef = -(float(G @ x) + 2.0 * out.actual) / xx
    cap = out.damping if out.shape == "identity" else out.damping_quad / xx  # λ exactly, not λ‖x‖²/‖x‖²
    coef = min(max(coef, 0.0), cap)
    return coef * x if coef > 0 else None


#: ``actual/pred`` above which the curvature model is trusted: an accepted first step this good is followed by one at a
#: tenth of its damping, which replaces it only when it is this good too (and clearly lower in energy).
TRUSTED_RATIO = 0.75

#: A damping search stops, as a failed search of its shape, when two consecutive rejected steps differ by less than
#: this fraction of the step's norm and no damping it could still try moves the step farther than that
#: (:meth:`DampingControl._saturated`): the data shape's step tends to the prior-only step as its damping grows.
SATURATION_RTOL = 0.01


def _slope_share_falls(prev: StepOutcome, out: StepOutcome) -> str | None:
    """Why a data-shape search may stop after consecutive trials ``prev`` and ``out`` that both failed the slope test
    (:meth:`DampingControl._slope_fails`), the later one's bank slope a smaller share of its ``G·x``; else ``None``.

    As its damping grows, the data shape's step tends to the prior-only step: the directions the remaining rows do
    not constrain, where the slope test's failure lives (a chain that never balanced what only the removed rows
    pull). A share falling with the damping is that limit showing: the far-rows case's search ran its last eight
    trials to damping 2.8·10⁹, the share falling from 4.3% to 1.1% of ``G·x`` (stop 63), before the identity shape
    was searched. The fall must exceed one standard error of the later share: read on the point estimates, a
    measurement half an error low stopped a search whose share rose, and whose data step the search then took
    anyway, at twice the trials (the review of stop 64; the far-rows case's falls, 4.3% -> 2.8% ± 1.2% and 3.9% ->
    3.1% ± 0.6%, are beyond it)."""
    a, b = prev.record, out.record
    if not (a.get("slope_failed") and b.get("slope_failed") and prev.gx > 0 and out.gx > 0):
        return None
    was, now = a["slope"] / prev.gx, b["slope"] / out.gx
    error = b.get("slope_stderr", 0.0) / out.gx
    if not now + (error if math.isfinite(error) else 0.0) < was:
        return None
    return (
        f"the step failed the slope test at damping {prev.damping:.3g} and {out.damping:.3g}, the bank's own slope "
        f"falling from {was:.2g} to {now:.2g} of G·x: more damping of the data shape leaves the directions only the "
        "removed rows pull"
    )


#: A request's removed labels are "spread like the remaining data's" unless some label is over-represented among them
#: at this significance (a binomial upper tail, Bonferroni over the labels): :func:`labels_spread`.
LABEL_SPREAD_ALPHA = 0.01


def labels_spread(removed: torch.Tensor, remaining: torch.Tensor) -> bool:
    """Whether the removed rows' label counts ``removed`` (``[L]``) look like a random draw from the remaining rows'
    label distribution, estimated from the counts ``remaining`` (``[L]``, a sample of the remaining rows): no label is
    over-represented among the removed rows at :data:`LABEL_SPREAD_ALPHA` (for each over-represented label, the
    probability that a binomial draw of as many rows holds at least as many of it, bounded above by Chernoff's
    ``exp(−k·KL(a/k ‖ p))``, times the number of labels).

    A class removal (every row of one label: Fashion-MNIST's requests of 64, the digits BNN's) is not spread; random
    rows, or a single row, are."""
    removed, remaining = removed.double(), remaining.double()
    k, m, labels = float(removed.sum()), float(remaining.sum()), removed.numel()
    if k < 1 or m < 1:
        return True
    p = ((remaining + 0.5) / (m + 0.5 * labels)).clamp(max=1 - 1e-12)  # smoothed: a label the sample lacks
    present = torch.nonzero(removed > p * k).flatten()  # over-represented only
    if present.numel() == 0:
        return True
    # the Chernoff bound on the binomial upper tail, P(X ≥ a) ≤ exp(−k·KL(a/k ‖ p)): O(labels) whatever the request's
    # size, and never below the exact tail, so random rows are judged concentrated at most at the stated level
    q, pp = removed[present] / k, p[present]
    kl = q * torch.log(q / pp) + torch.where(q < 1, (1 - q) * torch.log((1 - q) / (1 - pp)), torch.zeros_like(q))
    return float(torch.exp(-k * kl).min()) * labels > LABEL_SPREAD_ALPHA


def _clearly_lower(value: float, stderr: float, than: float, than_stderr: float) -> bool:
    """Whether a measured energy change ``value`` is below ``than`` by more than two standard errors of the two
    measurements combined: what another damping shape, or the tenth of a trusted step's damping, must show to
    replace an accepted step."""
    return value + 2.0 * math.hypot(stderr, than_stderr) < than


class DampingControl:
    """The Levenberg–Marquardt damping of the module docstring, carried from request to request.

    Args:
        damping: ``"auto"`` (adapted) or a fixed value ``>= 0`` (checked, not adapted).
        eta: Smallest accepted ``actual/pred``.
        grow: Factor by which a rejected step's damping grows.
        max_trials: Steps tried per request before it is refused.
        max_nll_increase: Largest accepted rise of the held remaining rows' mean NLL, relative to its size.
        screen_z: Standard errors by which a step's screening measurement (``EnergyCheck.screen``) must clear
            both criteria to decide without the full check; ``None``: every step gets the full check.
        screen_accepts: Whether the screen may also *accept* a step (``True``; then every trial is screened). With
            ``False`` it only rejects, and only the trials of a search from scratch (no damping carried from an
            earlier request) up to its first accepted step, whose least damped steps mostly overshoot by far. A
            taken step is then always measured by the full check, and a request that starts from a carried
            damping makes no screening pass (after a rejection there the next, ten times more damped step is
            mostly accepted: screening it would only add its cost).
        accept_z: Standard errors by which the full check's measured energy change must meet the ratio test
            (``actual + accept_z·stderr ≤ η·pred``). ``0`` (default): the point estimate, the requests' rule (a
            request must move; its damping finds a step). The unlearner's corrections across requests, which are
            optional, use 2: a correction is taken only when its benefit is clear of the check's noise.
        direct_z: Reject a step whose *direct* measurement of the energy change (``Measurement.direct``: the
            plain difference of the held rows' energies, without the control variate) shows a rise by more than
            ``direct_z`` standard errors (``None``: no such test). The control variate replaces the first-order
            term by ``−G·x``, exact only when ``G`` is the bank's own mean remaining-data gradient; a ``G`` with
            Monte-Carlo error credits the step for following that error, which the direct measurement does not.
            The unlearner's corrections across requests, whose ``G`` is measured at as few as one draw, use 2;
            its requests the option ``direct_z`` (off by default) with ``direct_draws``. A trial failing it marks
            the search as one failing the slope test (:meth:`_along_bank_slope`; with ``slope_eta`` off, none).
        slope_eta: Reject a step along which the bank's own slope of the remaining-data energy is clearly less than
            ``slope_eta`` of the slope ``−G·x`` the model assumes (``None`` or ``0``: no such test; see
            :meth:`_slope_fails`). The unlearner's requests use :data:`SLOPE_ETA`.
        direct_draws: Whether ``direct_z``'s standard error counts the check draws' spread too
            (:attr:`Measurement.direct_draw_stderr`; the requests') or the rows' alone (the corrections', as stop 35
            set them). Along a direction the remaining rows do not touch the rows' error is 0 and the prior's change
            over 8 draws is all the noise: counting the rows alone failed an exact bank's request there.
    """

    def __init__(
        self,
        damping: float | str = "auto",
        eta: float = 0.25,
        grow: float = 10.0,
        max_trials: int = 12,
        max_nll_increase: float = 0.05,
        screen_z: float | None = 3.0,
        accept_z: float = 0.0,
        screen_accepts: bool = True,
        direct_z: float | None = None,
        slope_eta: float | None = None,
        direct_draws: bool = False,
    ):
        self.fixed: float | None = check_damping(damping)  # (shared with the CLI's parse-time check)
        if not 0 < eta < 1:
            raise ValueError(f"eta must be in (0, 1), got {eta}")
        if not grow > 1:
            raise ValueError(f"the damping growth factor must be > 1, got {grow}")
        if max_trials < 1:
            raise ValueError(f"max_trials must be >= 1, got {max_trials}")
        self.eta, self.grow, self.max_trials = float(eta), float(grow), int(max_trials)
        self.max_nll_increase = float(max_nll_increase)
        if screen_z is not None and not screen_z > 0:
            raise ValueError(f"screen_z must be > 0 or None, got {screen_z}")
        self.screen_z = None if screen_z is None else float(screen_z)
        self.screen_accepts = bool(screen_accepts)
        if not (math.isfinite(accept_z) and accept_z >= 0):
            raise ValueError(f"accept_z must be a finite number >= 0, got {accept_z}")
        self.accept_z = float(accept_z)
        if direct_z is not None and not (math.isfinite(direct_z) and direct_z >= 0):
            raise ValueError(f"direct_z must be a finite number >= 0 or None, got {direct_z}")
        self.direct_z = None if direct_z is None else float(direct_z)
        self.direct_draws = bool(direct_draws)
        self.slope_eta = slope_eta  # (checked and kept by the property: 0 is off, as None)
        self._slope_failed = False  # whether a trial of the current step() failed the slope or the direct test
        self._undamped: StepOutcome | None = None  # step()'s rejected undamped trial (the same in every shape)
        self.shape = "identity"  # the damping shape the last request accepted
        self._relatives: dict[str, float] = {}  # per shape: the damping carried to the next request (× scale)
        #: the applied steps' summed NLL rise, its variance and the first request's NLL scale (:meth:`record`;
        #: reported, not judged)
        self.drift: tuple[float, float, float] | None = None
        self._search_start: float | None = None  # when the current search began (:meth:`_progress`)
        self._progress_at: float | None = None  # its last INFO line, or its start

    @property
    def adaptive(self) -> bool:
        return self.fixed is None

    @property
    def relative(self) -> float:
        """The damping carried to the next request for the current :attr:`shape`, in units of the curvature
        scale (0: start from the least damping)."""
        return self._relatives.get(self.shape, 0.0)

    @relative.setter
    def relative(self, value: float) -> None:
        self._relatives[self.shape] = float(value)

    @property
    def slope_eta(self) -> float | None:
        """The slope test's share of ``G·x`` (:meth:`_slope_fails`), ``None`` when off. Set on a built control (the
        unlearner's ``un.control.slope_eta``) it is checked as the unlearner's option is: a number in ``[0, 1)``,
        ``0`` or ``None`` off (kept as ``None``). A ``0`` kept as ``0.0`` ran a test at η = 0 (a request on a bank
        whose slope was clearly negative refused) while ``config()`` stored 0.0, which a saved folder reloads as
        off; a ``1.5`` was taken as it was."""
        return self._slope_eta

    @slope_eta.setter
    def slope_eta(self, value: float | None) -> None:
        self._slope_eta: float | None = check_option("slope_eta", value) or None

    def state(self) -> dict[str, Any]:
        """What the control carries between requests (JSON-able; :meth:`set_state` restores it)."""
        out: dict[str, Any] = {"shape": self.shape, "relatives": dict(self._relatives)}
        if self.drift is not None:
            out["drift"] = list(self.drift)
        return out

    def set_state(self, state: dict[str, Any]) -> None:
        self.shape = str(state.get("shape", "identity"))
        self._relatives = {str(k): float(v) for k, v in state.get("relatives", {}).items()}
        drift = state.get("drift")
        self.drift = None if drift is None else (float(drift[0]), float(drift[1]), float(drift[2]))

    def record(self, out: StepOutcome) -> None:
        """Add an applied step's measured rise of the held rows' NLL (less the prior's credit, as the net judges
        it; pooled with its second measurement where it had one) to the sum reported across requests."""
        if out.safe:
            self.record_rise(out.nll_rise, out.nll_stderr, out.nll_scale)

    def record_rise(self, rise: float, stderr: float, scale: float, variance: float | None = None) -> None:
        """Add a rise of the remaining rows' mean NLL (``stderr`` its standard error; ``scale`` the NLL it rose
        from) to the sum :meth:`record` keeps; the first one's NLL is kept as the sum's unit. ``variance``, where
        given, is what the rise adds to the sum's variance instead of ``stderr²`` (a rise whose error is correlated
        with the last one's: negative where they partly cancel)."""
        if not (math.isfinite(rise) and math.isfinite(stderr)):
            return
        total, var, first = self.drift if self.drift is not None else (0.0, 0.0, scale)
        if not math.isfinite(first):
            return
        added = stderr**2 if variance is None or not math.isfinite(variance) else variance
        self.drift = (total + rise, max(var + added, 0.0), first)

    def _verdict(self, pred: float, gx: float, meas: Measurement, z: float | None) -> bool | None:
        """Accept (``True``) or reject (``False``) a step from its measurement, or ``None`` when undecided.

        ``z=None`` is the full check's rule: ``pred < 0``, ``actual/pred ≥ η`` (with ``accept_z``: ``(actual +
        accept_z·stderr)/pred ≥ η``) and the held rows' mean NLL rising by at most ``max_nll_increase`` of its size
        beyond two standard errors. A screening measurement (``z``
        standard errors) decides only when the whole confidence interval is on one side: accepted when even
        ``actual + z·stderr`` meets the ratio and ``nll_change + z·nll_stderr`` stays under the limit without its
        allowance; rejected when even ``actual − z·stderr`` fails the ratio, or ``nll_change − z·nll_stderr``
        exceeds the full rule's limit.
        """
        if (gx == 0.0 and pred == 0.0) or self._negligible(pred, meas):  # nothing (measurable) to remove
            energy_ok: bool | None = True
        elif not pred < 0:
            energy_ok = False
        elif z is None:  # with accept_z: even the upper confidence bound meets the ratio (no error: never)
            bound = meas.actual
            if self.accept_z > 0:
                bound = bound + self.accept_z * meas.stderr if math.isfinite(meas.stderr) else math.inf
            energy_ok = bound >= -math.inf and bound / pred >= self.eta
        elif not (math.isfinite(meas.actual) and math.isfinite(meas.stderr)):
            energy_ok = None
        elif meas.actual + z * meas.stderr <= self.eta * pred:
            energy_ok = True
        elif meas.actual - z * meas.stderr > self.eta * pred:
            energy_ok = False
        else:
            energy_ok = None
        # the safety net: the held rows' mean NLL, measured directly (no measurement: nan, no verdict), less the
        # prior's per-row share of the step's change where the prior's energy fell: a removal hands weight back to
        # the prior, and the posterior it moves to fits the remaining rows less closely where the prior pulls (a
        # conjugate regression, prior sd 0.1: NLL +12-25% at the exact answer, which the net damped to 0.03-0.5 of
        # its length). A rise of the prior's energy is not counted against the step: moving the forgotten class's
        # logits away from the prior's 0 is what a class removal does (a transformer: 1.05 of the way to retraining,
        # 0.005 when counted)
        allowance = self.max_nll_increase * meas.nll_scale
        limit = allowance + 2 * meas.nll_stderr
        rise = meas.nll_change + min(meas.prior_per_row, 0.0)
        if z is None:
            nll_ok: bool | None = not rise > limit
        elif rise - z * meas.nll_stderr > limit:
            nll_ok = False
        elif not rise + z * meas.nll_stderr > allowance:
            nll_ok = True
        else:
            nll_ok = None
        if z is None and not (gx == 0.0 and pred == 0.0) and self._slope_fails(gx, meas):
            self._slope_failed = True
            return False
        if z is None and self._direct_rise(meas):
            # the bank's own energy rises along the step: it is not at equilibrium along it, as where the slope
            # test fails, and a search failing so is searched again as one failing that test (_along_bank_slope)
            self._slope_failed = True
            return False
        if energy_ok is False or nll_ok is False:
            return False
        if energy_ok and nll_ok:
            return True
        return None

    def _confirm(self, check: Any, x: torch.Tensor, meas: Measurement) -> dict[str, Any] | None:
        """A passed step whose held rows' NLL rise is not clearly within the tolerance (``rise + 2·stderr`` above
        ``max_nll_increase`` of the NLL, the standard error with the draws' part, ``nll_draw_stderr``) measured again
        on the check's further rows and draws (``check.confirm``) and judged on both measurements pooled, weighted
        by draws × rows: taken only when the pooled rise, less the prior's credit, is at most the allowance itself
        (its point estimate; ``None`` when no second measurement was made).

        The step is measured again because the first measurement could not show it within the tolerance; crediting
        the pooled measurement with two more standard errors passed steps that clearly made the fit worse (a tanh
        regression's step read +0.078 ± 0.031 against a limit of 0.038 + 0.061 where every remaining row and
        sample gave +0.138, +17% of the NLL: the rows' standard error is normal theory on a heavy-tailed change,
        6% of the rows carrying 86% of it, and the draws' part is not in it)."""
        confirm = getattr(check, "confirm", None)
        if not callable(confirm) or not (math.isfinite(meas.nll_change) and math.isfinite(meas.nll_stderr)):
            return None
        allowance = self.max_nll_increase * meas.nll_scale
        credit = min(meas.prior_per_row, 0.0)
        if not meas.nll_change + credit + 2 * math.hypot(meas.nll_stderr, meas.nll_draw_stderr) > allowance:
            return None
        more = confirm(x)
        if more is None:
            return None
        change, stderr, rows, draws = more
        if getattr(check, "confirm_covers_check", False):  # the same rows at more draws: not a second sample
            pooled, pooled_se = change, stderr
        else:
            m1, m2 = max(meas.rows, 1) * max(meas.draws, 1), rows * draws
            pooled = (m1 * meas.nll_change + m2 * change) / (m1 + m2)
            pooled_se = math.sqrt((m1 * meas.nll_stderr) ** 2 + (m2 * stderr) ** 2) / (m1 + m2)
        return {
            "confirm_rows": rows,
            "confirm_draws": draws,
            "confirm_nll_change": change,
            "pooled_nll_change": pooled,
            "pooled_nll_stderr": pooled_se,
            "confirm_passed": not pooled + credit > allowance,
        }

    def _direct_error(self, meas: Measurement | dict[str, Any]) -> float:
        """The standard error the direct test judges a measurement (or a trial's record) by: the rows' and, with
        ``direct_draws``, the draws' (:attr:`Measurement.direct_draw_stderr`)."""
        get = meas.get if isinstance(meas, dict) else lambda k, d=0.0: getattr(meas, k, d)
        rows, draws = get("direct_stderr", math.nan), get("direct_draw_stderr", 0.0)
        return math.hypot(rows, draws) if self.direct_draws else rows

    def _direct_rise(self, meas: Measurement | dict[str, Any]) -> bool:
        """Whether a measurement's (or a trial's record's) direct energy change shows a rise by more than
        ``direct_z`` of its standard errors (:meth:`_direct_error`)."""
        direct = meas["direct"] if isinstance(meas, dict) else meas.direct
        stderr = self._direct_error(meas)
        if self.direct_z is None or not (math.isfinite(direct) and math.isfinite(stderr)):
            return False
        return direct - self.direct_z * stderr > 0

    def _slope_fails(self, gx: float, meas: Measurement) -> bool:
        """Whether the bank's own slope of the remaining-data energy along the step is clearly less than
        ``slope_eta`` of the model's ``G·x``: the bank is not at equilibrium along the step.

        The direct and controlled measurements share the step's remainders, so ``direct − actual − (−G·x)`` is the
        bank's mean remaining-energy gradient along ``x``, ``E_s[∇F(θ_s, S∖S')]·x``, which the model takes to be
        ``−G·x`` (the removed rows' pull balanced by the rest at equilibrium). A chain too short to have moved
        where only the removed rows pulled (first-layer weights of inputs that only they light up) has not
        balanced that pull: ``G`` points there anyway, the remaining energy is flat there, and the step undoes a
        pull the chain never made, pushing the removed rows far past retraining (30 inverted digits with random
        labels: their NLL 1.9 → 35.6 nats against retraining's 10.8; the bank's slope along the step was 2.7% of
        ``G·x``). Fails when even ``slope + z·stderr`` (``z`` = :data:`SLOPE_Z`; the error of :meth:`_bank_slope`)
        is below ``slope_eta·G·x``; no test where ``G·x`` itself is within ``z·stderr`` of zero (the
        measurement cannot tell the model's slope from none: 2σ failed 23 of a GMM run's 785 such tests, all on
        steps 40× smaller than their error) or without a direct measurement."""
        if self.slope_eta is None or not gx > 0:
            return False
        slope, err = self._bank_slope(gx, meas)
        if not math.isfinite(slope + err):
            return False
        return gx > err and slope + err < self.slope_eta * gx

    def carry_contradicted(self, out: StepOutcome, carry: torch.Tensor) -> str | None:
        """Why an accepted step whose ``G`` holds ``carry``, a deficit carried from earlier requests, is refused by
        the slope test after all (``None`` where it is not): its ``G·x`` within the test's error of 0, where
        :meth:`_slope_fails` abstains, mostly the carry's (``carry·x`` above ``1 − slope_eta`` of it, the share at
        which ``MCMCUnlearner._without_carry`` searches again without the carry), and the bank's own slope along
        it clearly below zero (``slope + z·stderr < 0``: the bank's energy clearly rises along the step).

        The carry is the model's extrapolation of what earlier damped steps left; a bank that clearly contradicts it
        sends the request to the search without it. An exact conjugate bank given a carry of −1.5·``G`` took its
        step at damping 377, ``G·x`` 5.6, the bank's slope −9.9 ± 2.0, and moved the mean away from the remaining
        posterior's. Judged on the accepted step only, the search unchanged: failing such trials inside the
        search shrank a digits MLP flow's step (request 17, seed 1) to damping 1.2·10⁵, where its slope's error
        swamped it; failing them in every request refused 11 that other tests accept (stop 64). Requests without a
        carry are judged as before."""
        meas = out.measurement
        if self.slope_eta is None or not out.safe or meas is None or out.length < 1 or not out.gx > 0:
            return None
        slope, err = self._bank_slope(out.gx, meas)
        carried = float(carry @ out.x)
        if not (math.isfinite(slope + err) and out.gx <= err and carried > (1.0 - self.slope_eta) * out.gx):
            return None
        if not slope + err < 0:
            return None
        return (
            f"damping {out.damping:.3g}: the bank's own energy rises along the step (its slope {slope:.4g} ± "
            f"{err / SLOPE_Z:.2g} against the model's {out.gx:.4g}, {carried / out.gx:.0%} of it the deficit carried "
            "from earlier requests)"
        )

    def _slope_untested(self, out: StepOutcome) -> bool:
        """Whether an accepted step escaped the slope test by its size alone, after a larger one of the same search
        failed it: its ``G·x`` within the test's error of 0, its change below the check's floating-point
        resolution, or its bank slope no larger a share of ``G·x`` than a failed trial's (passed on its larger error
        alone). The search's damping shrinks a step whose slope share it cannot raise (along ``G`` itself) until the
        error, whose floor is the rounding's, swamps it: on exact-posterior banks (tests/test_slope_check.py) such a
        search ended at damping 10⁵–10⁷, taking a step of nothing or refused as below the parameters' resolution
        ("more check rows or another solver"), where the bank's own energy rose along the step; the quick matrix's
        LeNet-5 (seed 1) took a step of norm 3·10⁻⁷ at 10⁸ × the mean curvature, its bank slope −0.28 ± 0.24 of
        ``G·x`` where the six trials that failed had measured −0.01 to −0.21 (errors 0.07–0.10)."""
        meas = out.measurement
        if meas is None or not out.gx > 0:
            return out.negligible
        slope, err = self._bank_slope(out.gx, meas)
        if out.negligible or (math.isfinite(err) and not out.gx > err):
            return True
        failed = [h["slope"] / h["gx"] for h in out.history if h.get("slope_failed") and "slope" in h and h["gx"] > 0]
        return bool(failed) and math.isfinite(slope) and slope / out.gx <= max(failed)

    @staticmethod
    def _bank_slope(gx: float, meas: Measurement) -> tuple[float, float]:
        """The bank's own slope ``G·x + actual − direct`` (``−E_s[∇F]·x``: the decrease per unit step the bank
        itself shows) and :data:`SLOPE_Z` of its standard errors: the rows' (the two measurements' combined) and
        the draws' (:attr:`Measurement.slope_draw_stderr`). Counting the rows alone, 12 of 100 banks of 8 exact
        draws of a conjugate posterior failed the test along a weight only the removed rows touch, where the rows'
        errors are 0 (tests/test_slope_check.py); the draws' spread brings that to none. ``nan`` without a direct
        measurement."""
        if not all(math.isfinite(v) for v in (meas.direct, meas.direct_stderr, meas.actual, meas.stderr)):
            return math.nan, math.nan
        draws = meas.slope_draw_stderr if math.isfinite(meas.slope_draw_stderr) else 0.0
        err = SLOPE_Z * math.sqrt(meas.direct_stderr**2 + meas.stderr**2 + draws**2)
        return gx + meas.actual - meas.direct, err

    def _saturated(
        self, backend: CurvatureBackend, G: torch.Tensor, prev: StepOutcome, out: StepOutcome, reach: float
    ) -> str | None:
        """Why the search may stop after two consecutive rejected steps ``prev`` and ``out``, or ``None``.

        It stops when (1) the two were judged on the same measurement (rows, draws; both on the screen or both on
        the full check; no second measurement); (2) their steps differ by ``d ≤ SATURATION_RTOL·‖x‖``; (3) their
        predicted and measured energy changes and held rows' NLL changes differ by at most the last one's standard
        errors; (4) the last step stays rejected with every one of those moved by that difference towards passing;
        and (5) the step at ``reach`` (the most damped the search could still try) is within ``d`` of the last one.
        On a backend whose damping shares the curvature's eigenbasis (``λI``; K-FAC's data shape), each coordinate
        of the step moves monotonically with the damping, so every step still to try is within ``d`` of a rejected
        one: nearer than the previous step, whose measurements were the same within their errors. Only on backends
        where a solve costs no Hessian products (``cheap_damping``).
        """
        ma, mb = prev.measurement, out.measurement
        if not getattr(backend, "cheap_damping", False) or ma is None or mb is None or prev.shape != out.shape:
            return None
        if (ma.rows, ma.draws) != (mb.rows, mb.draws) or prev.screened != out.screened or prev.note or out.note:
            return None
        d, size = float((out.x - prev.x).norm()), float(out.x.norm())
        if not (size > 0 and d <= SATURATION_RTOL * size):
            return None
        dp, da = abs(out.predicted - prev.predicted), abs(mb.actual - ma.actual)
        dn, dq = abs(mb.nll_change - ma.nll_change), abs(mb.prior_per_row - ma.prior_per_row)
        if not (dp <= mb.stderr and da <= mb.stderr and dn <= mb.nll_stderr and dq <= mb.nll_stderr):
            return None
        dd = abs(mb.direct - ma.direct)
        # the most favourable within the two trials' differences: the bank's slope G·x + actual − direct too (with
        # actual lowered by da, direct by dd + 2·da: the slope raised by da + dd, not changed by dd − da)
        worst = replace(
            mb,
            actual=mb.actual - da,
            nll_change=mb.nll_change - dn,
            prior_per_row=mb.prior_per_row - dq,
            direct=mb.direct - dd - 2 * da if math.isfinite(dd) else mb.direct,
        )
        z = self.screen_z if out.screened else None
        slope_failed = self._slope_failed  # a verdict on this hypothetical measurement is no trial's
        try:
            if any(self._verdict(p, out.gx, worst, z) is not False for p in (out.predicted - dp, out.predicted + dp)):
                return None
        finally:
            self._slope_failed = slope_failed
        try:
            far = backend.solve(G, reach).x
        except NegativeCurvatureError:
            return None
        rest = float((far - out.x).norm())
        log.debug(
            "damping search (%s shape): the step moved by %.3g of its norm, by at most %.3g more up to damping %.3g",
            out.shape, d / size, rest / size, reach,
        )  # fmt: skip
        if not rest <= d:
            return None
        return (
            f"the step saturated: at damping {out.damping:.3g} it moved by {d / size:.2g} of its norm from the last "
            f"one's, by at most {rest / size:.2g} more up to damping {reach:.3g}, and its measurements stayed within "
            "their standard errors"
        )

    @staticmethod
    def _negligible(pred: float, meas: Measurement) -> bool:
        """Whether a step's predicted and measured energy changes are both below the measurement's floating-point
        resolution (removed points that carry next to no gradient): its ratio is rounding noise, not evidence, and
        only the safety net on the held rows' NLL decides."""
        res = meas.resolution
        if not (res > 0 and math.isfinite(meas.actual)):
            return False
        stderr = meas.stderr if math.isfinite(meas.stderr) else 0.0
        return abs(pred) <= res and abs(meas.actual) <= res + 2.0 * stderr

    def _try(
        self,
        backend: CurvatureBackend,
        G: torch.Tensor,
        check: Callable[[torch.Tensor], Any],
        lam: float,
        expect_reject: bool = False,
        defer: bool = False,
    ) -> StepOutcome | None:
        """One checked step at damping ``lam`` of the backend's current ``damping_shape`` (``None`` when the damped
        curvature is not positive definite). ``expect_reject``: a trial the search expects to fail, which a
        reject-only screen (``screen_accepts=False``) measures on the screen first. ``defer``: a step passed on its
        first measurement is returned as passed with its second measurement pending (``out.pending``), made by
        :meth:`_settle` when the search needs the verdict."""
        try:
            res = backend.solve(G, lam)
        except NegativeCurvatureError:
            if self.fixed is not None:
                raise
            return None
        x = res.x
        gx = float(G @ x)
        quad = backend.quad(x)
        shape = backend.damping_shape
        pred = -gx + 0.5 * quad
        meas, ok, decided = None, None, False
        screen = getattr(check, "screen", None)
        screened = self.screen_accepts or expect_reject
        if screened and self.screen_z is not None and screen is not None and getattr(check, "screening", False):
            meas = screen(x)
            ok = self._verdict(pred, gx, meas, self.screen_z)
            if ok and not self.screen_accepts:
                ok = None  # a reject-only screen: a step is taken on the full check's measurement alone
            decided = ok is not None
        if ok is None:
            meas = check(x)
            ok = self._verdict(pred, gx, meas, None)
        nothing = (gx == 0.0 and pred == 0.0) or self._negligible(pred, meas)
        ratio = 1.0 if nothing else (meas.actual / pred if pred < 0 else -math.inf)
        dq = backend.damping_quad(x, lam)
        out = StepOutcome(x, res, lam, 0, pred, meas.actual, ratio, meas.stderr, meas.nll_change, ok, gx=gx)
        out.shape, out.damping_quad, out.negligible = shape, dq, nothing
        out.measurement, out.screened = meas, decided
        out.nll_rise, out.nll_stderr = meas.nll_change + min(meas.prior_per_row, 0.0), meas.nll_stderr
        out.nll_scale = meas.nll_scale
        out.history = [
            {"damping": lam, "predicted": pred, "actual": meas.actual, "stderr": meas.stderr, "ratio": ratio, "gx": gx,
             "direct": meas.direct, "direct_stderr": meas.direct_stderr,
             "direct_draw_stderr": meas.direct_draw_stderr, "nll_scale": meas.nll_scale,
             "quad": quad, "xx": float(x @ x), "check_draws": meas.draws, "check_rows": meas.rows,
             "nll_change": meas.nll_change, "nll_stderr": meas.nll_stderr, "shape": shape}
        ]  # fmt: skip
        # whether the step failed the slope test (judged on the full check only) and, where the check measured it
        # directly, the bank's own slope along it (no NaN: a trial's record compares equal to itself)
        out.history[0]["slope_failed"] = not decided and self._slope_fails(gx, meas)
        # the direct test's own rejections: step() judges the slope test first
        out.history[0]["direct_failed"] = not decided and not out.history[0]["slope_failed"] and self._direct_rise(meas)
        slope, slope_err = self._bank_slope(gx, meas)
        if math.isfinite(slope) and math.isfinite(slope_err):
            out.history[0].update(slope=slope, slope_stderr=slope_err / SLOPE_Z)
        out.record = out.history[0]
        if ok:
            out.pending = (check, x)
            if not defer:
                ok = self._settle(out)
        log.debug(
            "damping trial (%s shape): damping %.3g, predicted %.4g, measured %.4g ± %.2g on %d draw(s) × %d rows, "
            "ratio %.3g: %s",
            shape, lam, pred, meas.actual, meas.stderr, meas.draws, meas.rows, ratio, "passed" if ok else "rejected",
        )  # fmt: skip
        self._progress(shape, lam, pred, meas, ratio, ok)
        return out

    def _progress(self, shape: str, lam: float, pred: float, meas: Measurement, ratio: float, ok: bool) -> None:
        """One INFO line for a trial made ``PROGRESS_EVERY_S`` or more after the search began or its last INFO
        line (none in a short search): what the trial measured and how long the search has run."""
        now = time.perf_counter()
        if self._search_start is None or self._progress_at is None:  # a trial outside step()
            self._search_start = self._progress_at = now
        if now - self._progress_at < PROGRESS_EVERY_S:
            return
        self._progress_at = now
        log.info(
            "damping search (%s shape), %.1f s in: damping %.3g, predicted %.4g, measured %.4g ± %.2g, ratio %.3g: %s",
            shape, now - self._search_start, lam, pred, meas.actual, meas.stderr, ratio,
            "passed" if ok else "rejected",
        )  # fmt: skip

    def _settle(self, out: StepOutcome) -> bool:
        """Make a passed step's pending second measurement (:meth:`_confirm`), if any, and apply its verdict to ``out``
        (``safe``, the pooled NLL change and rise, ``history``, ``note``); returns ``out.safe``."""
        if out.pending is None:
            return out.safe
        (check, x), out.pending = out.pending, None
        meas = out.measurement
        confirmed = self._confirm(check, x, meas)
        if confirmed is None:
            return out.safe
        out.safe = confirmed["confirm_passed"]
        out.nll_change = confirmed["pooled_nll_change"]  # what the verdict was taken on, not the first 256 rows'
        out.nll_rise = confirmed["pooled_nll_change"] + min(meas.prior_per_row, 0.0)
        out.nll_stderr = confirmed["pooled_nll_stderr"]
        out.history[0].update(confirmed)
        if not out.safe:
            out.note = (
                f"damping {out.damping:.3g}: the held remaining rows' mean NLL, measured again on "
                f"{confirmed['confirm_rows']} rows at {confirmed['confirm_draws']} draws, rose by "
                f"{confirmed['confirm_nll_change']:+.4g} (with the check's rows "
                f"{confirmed['pooled_nll_change']:+.4g} ± {confirmed['pooled_nll_stderr']:.2g}; limit "
                f"{100 * self.max_nll_increase:g}% of {meas.nll_scale:.3g})"
            )
        return out.safe

    def step(
        self,
        backend: CurvatureBackend,
        G: torch.Tensor,
        check: Callable[[torch.Tensor], Any],
        shapes: Sequence[str] | None = None,
        noise: torch.Tensor | None = None,
    ) -> StepOutcome:
        """Find the least-damped accepted step for gradient ``G``; the outcome says if none was found.

        The search starts from the damping the last request accepted. A rejected step's damping grows ×``grow``
        (from ``1e-2`` of the mean curvature, or just above the most negative eigenvalue when the backend knows
        it) until a step is accepted, and is then refined once halfway (geometrically) back towards the last
        rejected value (kept when it passes). An accepted first step whose ratio exceeds ``TRUSTED_RATIO`` (0.75:
        a trustworthy model) is followed by a step with ``1/grow`` of its damping, kept only if it passes, its own
        ratio exceeds ``TRUSTED_RATIO`` too, and it lowers the measured energy below the accepted step's by more
        than two standard errors of the two measurements combined (:func:`_clearly_lower`). Every tried step
        counts towards ``max_trials`` (a refinement tried while the accepted step's second measurement was deferred,
        which then failed, too: marked ``"abandoned"``, as are the rungs below it that a search from a predicted
        start tried then, :meth:`_predicted_rung`). A search whose rejected step has saturated
        (:meth:`_saturated`: the data shape's step tends to the prior-only one as its damping grows) stops there, a
        failed search of that shape, as does a data-shape search whose step failed the slope test at two consecutive
        dampings, the bank's slope a share of ``G·x`` falling beyond its error (:func:`_slope_share_falls`); its last
        trial says why (``"stopped"``). The undamped step, the same in every shape, is measured once per request: a
        shape searched after another rejected it starts above it.

        ``shapes``: the damping shapes to try (``backend.damping_shapes``; default: the one the last request
        accepted). The first is searched as above; the others are tried once, at the damping it accepted (or
        searched in turn when it accepted none). The first shape's accepted step stands unless another's lowers
        the *measured* remaining-data energy (the objective the step minimises, measured on the same draws and
        rows) by more than two standard errors of the two measurements combined: the check's noise does not pick
        the longer step; a fixed damping takes the first shape asked. ``noise``: a draw of ``G``'s Monte-Carlo
        error (e.g. half the difference of the means over two halves of the draws). The measured change credits a
        step for following that error (its linear term is ``−G·x``); before shapes are compared, each one's
        expected credit, the predicted change of the step the noise alone would take (``−ε·x_ε + ½x_εᵀHx_ε``,
        ``x_ε`` its damped solve), is taken off.
        """
        self._search_start = self._progress_at = time.perf_counter()
        self._slope_failed = False
        self._undamped = None
        carried = dict(self._relatives)  # the search again without the slope test starts where this one did
        offered = tuple(getattr(backend, "damping_shapes", ("identity",)))
        asked = (self.shape,) if shapes is None else tuple(shapes)
        wanted = [sh for sh in asked if sh in offered] or ["identity"]
        if self.fixed is not None:  # a fixed damping is one step, in the first shape asked
            wanted = wanted[:1]
        results: list[StepOutcome] = []
        error: NegativeCurvatureError | None = None
        for shape in wanted:
            first = results[0] if results else None
            if first is not None and first.safe and first.damping == 0:
                break  # the undamped step was accepted: it is the same step in every shape
            backend.damping_shape = shape
            try:
                if first is not None and first.safe:  # one step, at the damping the first shape accepted
                    out = self._try(backend, G, check, first.damping)
                    if out is None:
                        continue
                    out.trials, out.scale = 1, first.scale
                    if out.safe:
                        self._relatives[shape] = first.damping / first.scale
                    results.append(out)
                else:
                    results.append(self._search(backend, G, check, shape))
            except NegativeCurvatureError as exc:
                if len(wanted) == 1:
                    raise
                error = error or exc
        if not results:
            assert error is not None
            raise error
        accepted = [r for r in results if r.safe]
        scores = {r.shape: r.actual for r in accepted}
        if len(accepted) > 1 and noise is not None:
            for r in accepted:
                backend.damping_shape = r.shape
                x_n = backend.solve(noise, r.damping).x
                scores[r.shape] = r.actual - (-float(noise @ x_n) + 0.5 * backend.quad(x_n))
        best = accepted[0] if accepted else results[0]
        for other in accepted[1:]:  # another shape must be better by more than the measurements' noise
            if _clearly_lower(scores[other.shape], other.stderr, scores[best.shape], best.stderr):
                best = other
        if len(results) > 1:
            history = [h for r in results for h in r.history]
            best = replace(best, history=history, trials=len(history), shape_scores=scores)
            if not accepted:
                best.note = "; ".join(f"{r.shape} damping: {r.note}" for r in results if r.note)
        backend.damping_shape = best.shape
        if self._slope_failed and self.slope_eta is not None and (not best.safe or self._slope_untested(best)):
            self._relatives = carried
            return self._along_bank_slope(backend, G, check, shapes, noise, best)
        if best.safe and self.fixed is None:
            self.shape = best.shape
        return best

    def _along_bank_slope(
        self,
        backend: CurvatureBackend,
        G: torch.Tensor,
        check: Callable[[torch.Tensor], Any],
        shapes: Sequence[str] | None,
        noise: torch.Tensor | None,
        failed: StepOutcome,
    ) -> StepOutcome:
        """A search every step of which failed, some by the slope test or the direct test (``direct_z``: the bank's
        energy measured directly rising along the step) alone: searched again without both, and the step it accepts
        cut to the minimiser of the bank's *own* energy along it.

        Damping cannot remove the part of ``G`` the bank has not balanced when it dominates (as the damping grows
        the step tends to ``G`` itself, whose slope share stays below ``slope_eta``). Along the step the bank's
        energy is ``φ(αx) ≈ −α·slope + α²(actual + G·x)``; the step is cut to ``α̂ = (slope + z·stderr) / (2(actual
        + G·x − 2·stderr))`` (the longest the two measurements allow; :meth:`StepOutcome.shortened` with the bank's
        slope in place of ``G·x``) when that is below 1. The failed search's trials stay in the history."""
        eta, self.slope_eta = self.slope_eta, None
        direct_z, self.direct_z = self.direct_z, None
        try:
            again = self.step(backend, G, check, shapes=shapes, noise=noise)
        finally:
            self.slope_eta, self.direct_z = eta, direct_z
        history = failed.history + again.history
        meas = again.measurement
        if not again.safe or meas is None:
            return replace(again, history=history, trials=len(history))
        slope, err = self._bank_slope(again.gx, meas)
        c2_low = meas.actual + again.gx - 2.0 * (meas.stderr if math.isfinite(meas.stderr) else 0.0)
        if not math.isfinite(slope + err):  # no direct measurement of the step taken: the model's step
            return replace(again, history=history, trials=len(history))
        # the bank's energy does not fall along the step at any length: refused (also where its curvature is not
        # resolved, c2_low <= 0, which leaves no finite minimum to cut to but no fall either)
        a = (slope + err) / (2.0 * c2_low) if c2_low > 0 else math.inf if slope + err > 0 else 0.0
        if not a > 0:
            why = (
                f"the bank's own energy does not fall along the step (its slope {slope:.4g} ± {err / SLOPE_Z:.2g} "
                f"against the model's {again.gx:.4g}): its draws are not at equilibrium along it (a chain too short "
                "to have moved where only the removed rows pulled), or G's Monte-Carlo error points the step where "
                "they are; longer chains or more draws for G (grad_draws, a larger bank) help, and the unlearner's "
                "option slope_eta=0 (on a built one, `unlearner.control.slope_eta = None`) takes the model's step "
                "anyway"
            )
            if direct_z is not None and any(h.get("direct_failed") for h in failed.history):
                why += " (with direct_z=0 too, `unlearner.control.direct_z = None`: the direct test failed steps too)"
            note = f"{failed.note}; {why}" if failed.note and not failed.safe else why
            return replace(failed, safe=False, note=note, history=history, trials=len(history), slope_refused=again.x)
        if not (math.isfinite(a) and a < 1):
            return replace(again, history=history, trials=len(history))
        log.info("the bank's own slope along the step is %.3g of G·x: the step is cut to %.3g of its length",
                 slope / again.gx, a)  # fmt: skip
        c2 = meas.actual + again.gx
        actual = -a * again.gx + a * a * c2
        predicted = -a * again.gx + a * a * (again.predicted + again.gx)
        return replace(
            again, x=a * again.x, predicted=predicted, actual=actual, stderr=a * a * again.stderr, gx=a * again.gx,
            ratio=actual / predicted if predicted < 0 else again.ratio, length=a,
            damping_quad=a * a * again.damping_quad, history=history, trials=len(history),
        )  # fmt: skip

    def _predicted_rung(
        self, backend: CurvatureBackend, G: torch.Tensor, undamped: StepOutcome, rungs: list[float]
    ) -> int | None:
        """The first rung of a fresh search's ladder (``rungs``: its dampings above 0) at which the rejected undamped
        step's own measurement predicts the step to pass, or ``None`` where that is the ladder's first rung, none
        is predicted to pass, or the undamped step says nothing about the step's length.

        The undamped step ``x₀`` measured an energy change ``actual₀`` against the model's ``pred₀`` and a rise
        ``r₀`` of the held rows' mean NLL (less the prior's credit). Both misses are taken to scale as the step's
        quadratic form in the curvature model, ``q(λ) = x(λ)ᵀHx(λ)``, of which ``q₀`` is the undamped step's: a
        rung ``λ`` is predicted to pass where ``pred(λ) + (actual₀ − pred₀)·q(λ)/q₀ ≤ η·pred(λ)`` and ``r₀·q(λ)/q₀``
        is within ``max_nll_increase`` of the NLL. Only the start moves: the search is the ladder's wherever its
        verdicts grow monotonically with the damping, the prediction's error costing trials, not a worse step
        (from a rung that passes the rungs below are tried down to the first that fails, and the step refined
        between the two as the ladder does; from a rung that fails its energy or NLL check the ladder from its
        bottom, that rung's measurement standing: stop 69's integration, where climbing on from it refused a request
        the ladder accepted). Where the verdicts are not monotone (a noisy check passing a low rung and failing a
        higher one) the step can still be more damped than the ladder's where the predicted rung passes: the rungs
        below the first that fails under it are never tried; and a predicted rung refused by its second measurement
        climbs on from there, as where that measurement is deferred. The rungs' solves,
        found by bisection (the model's ``q`` falls as the damping grows), are the cost: for backends whose solve at
        a new damping is cheap (``cheap_damping``)."""
        meas = undamped.measurement
        if meas is None or undamped.damping != 0 or undamped.safe or undamped.negligible:
            return None
        rec = undamped.record
        q0, pred0, act0, rise = float(rec["quad"]), undamped.predicted, undamped.actual, undamped.nll_rise
        allowance = self.max_nll_increase * meas.nll_scale
        if not (all(map(math.isfinite, (q0, pred0, act0, rise, allowance))) and q0 > 0 and pred0 < 0):
            return None
        excess = max(act0 - pred0, 0.0)
        if act0 <= self.eta * pred0 and rise <= allowance:
            return None  # neither miss explains the rejection (the slope or the direct test): the ladder as it was

        def passes(i: int) -> bool:
            try:
                x = backend.solve(G, rungs[i]).x
            except NegativeCurvatureError:
                return False
            q = backend.quad(x)
            pred = -float(G @ x) + 0.5 * q
            share = q / q0
            return pred < 0 and pred + excess * share <= self.eta * pred and max(rise, 0.0) * share <= allowance

        lo, hi = 0, len(rungs) - 1  # the least rung predicted to pass lies in [lo, hi] (hi: where it is checked)
        if not passes(hi):
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            if passes(mid):
                hi = mid
            else:
                lo = mid + 1
        return hi if hi > 0 else None

    def _search(
        self, backend: CurvatureBackend, G: torch.Tensor, check: Callable[[torch.Tensor], Any], shape: str
    ) -> StepOutcome:
        """The damping search of :meth:`step` for one shape (the backend's ``damping_shape`` is set to it)."""
        scales: list[float] = []

        def scale() -> float:  # the curvature scale costs products on matrix-free backends: only when needed
            if not scales:
                scales.append(abs(backend.scale()) or 1.0)
            return scales[0]

        floor = backend.min_damping()
        low = max(floor * 1.5, 1e-30) if floor > 0 else 0.0
        history: list[dict[str, float]] = []
        tried: list[StepOutcome] = []
        note = ""

        def attempt(lam: float, expect_reject: bool = False, defer: bool = False) -> StepOutcome | None:
            nonlocal note
            out = self._try(backend, G, check, lam, expect_reject, defer)
            if out is None:
                note = f"the curvature plus damping {lam:.3g} is not positive definite"
                log.debug("damping trial (%s shape): damping %.3g: %s", shape, lam, note)
                history.append(
                    {"damping": lam, "predicted": math.nan, "actual": math.nan, "ratio": math.nan, "shape": shape}
                )
                return None
            history.extend(out.history)
            tried.append(out)
            if lam == 0 and not out.safe:
                self._undamped = out
            if out.note:  # a second measurement of the held rows' NLL refused it
                note = out.note
            elif not out.safe:
                h = out.history[0]
                note = (
                    f"damping {lam:.3g}: the model predicted an energy change of {out.predicted:.4g}, the check "
                    f"measured {out.actual:.4g} ± {out.stderr:.2g} (ratio {out.ratio:.3g}, needs >= {self.eta}); the "
                    f"held remaining rows' mean NLL changed by {out.nll_change:+.4g} (limit "
                    f"{100 * self.max_nll_increase:g}% of {h['nll_scale']:.3g})"
                )
                if h.get("direct_failed"):  # the ratio may have passed: the direct rise is what refused the step
                    note = (
                        f"damping {lam:.3g}: measured directly, without the control variate, the remaining data's "
                        f"energy rose by {h['direct']:.4g} ± {self._direct_error(h):.2g} (more than {self.direct_z:g} "
                        f"standard errors; the control variate, which credits the step with −G·x, measured "
                        f"{out.actual:.4g} ± {out.stderr:.2g} against the model's {out.predicted:.4g})"
                    )
                elif self._direct_rise(h):
                    note += (
                        f"; measured directly, without the control variate, the energy rose by {h['direct']:.4g} ± "
                        f"{self._direct_error(h):.2g} (more than {self.direct_z:g} standard errors)"
                    )
            return out

        def start() -> float:
            return max(1e-2 * scale(), low)

        if self.fixed is not None:
            attempt(self.fixed)
        else:
            carried = self._relatives.get(shape, 0.0)
            lam = max(carried * scale(), low) if carried > 0 else low
            best: StepOutcome | None = None
            failed: float | None = None
            fresh = not carried > 0  # a search from scratch: its first, least damped steps mostly overshoot
            undamped = self._undamped if lam == 0 else None
            if undamped is not None and undamped.shape != shape:
                # the undamped step is the same in every shape: another shape's search measured and rejected it (the
                # far-rows case measured it twice, stop 63); not a trial of this search
                out: StepOutcome | None = replace(undamped, shape=shape, history=[], pending=None)
            else:
                out = attempt(lam, expect_reject=fresh)
            if out is not None and out.safe:
                best = out
                if len(history) < self.max_trials and best.ratio > TRUSTED_RATIO and best.damping > 0:
                    lower = best.damping / self.grow
                    lower = 0.0 if lower < start() else max(lower, low)
                    # (not below the damping the backend knows the curvature needs: that trial cannot be solved)
                    nxt = attempt(lower, defer=True) if low <= lower < best.damping else None
                    # the lower damping is taken only where the model is still trusted at it, and only for a
                    # clear gain: it is what the next request starts from (its second measurement, which can only
                    # refuse it, is made only then)
                    if nxt is not None and nxt.safe and nxt.ratio > TRUSTED_RATIO:
                        if _clearly_lower(nxt.actual, nxt.stderr, best.actual, best.stderr) and self._settle(nxt):
                            best = nxt
            else:
                deferring = True  # at most once per search: a deferral that fails costs its refinement's trial
                rungs: list[float] = []  # the ladder's dampings, each the last times grow, as the climb below
                pending_at: tuple[int, int] | None = None  # where the trials made while best's verdict is pending begin
                passed: dict[float, StepOutcome] = {}  # rungs above best that passed their first measurement, pending
                refused: dict[float, StepOutcome] = {}  # a predicted rung that failed: the ladder's climb reuses it
                if fresh and lam == 0 and out is not None and getattr(backend, "cheap_damping", False):
                    for _ in range(self.max_trials - len(history) - 1):  # the rungs the ladder could reach
                        rung = rungs[-1] * self.grow if rungs else start()
                        if math.isinf(rung):  # (max_damping_trials=10**400 filled memory with infinite rungs)
                            break
                        rungs.append(rung)
                k = self._predicted_rung(backend, G, out, rungs) if rungs and out is not None else None
                if k is not None:  # the ladder from its predicted rung, bracketed from above where that passes
                    lam, down, below = rungs[k], attempt(rungs[k], expect_reject=fresh, defer=True), 0.0
                    while down is not None and down.safe:
                        if best is not None:
                            passed[best.damping] = best
                        best, pending_at = down, (len(history), len(tried))
                        if k == 0 or len(history) + 2 > self.max_trials:
                            break  # below: the undamped step, rejected (or no trial left for the rung and the mid)
                        k -= 1
                        down = attempt(rungs[k], expect_reject=fresh, defer=True)
                        if down is None or not down.safe:
                            below = rungs[k]  # the rung below failed: refined between it and the best as the ladder
                    if best is None:  # the rung failed: the ladder from its bottom, the failed rung not measured
                        # again (verdicts need not grow with the damping: a rung below may pass where the ladder
                        # would have taken it; climbing on from the failed rung refused a request the ladder accepted,
                        # tests/test_bernoulli_likelihood.py, stop 69's integration)
                        if down is not None and down.note:  # its second measurement refused it: the ladder
                            out = None  # climbs on from it, as where that measurement is deferred
                        else:
                            if down is not None:
                                refused[lam] = down
                            out, lam = None, 0.0
                    else:
                        lam = failed = below
                        if below == 0:  # no refinement follows: the pending second measurement is made now; a
                            # step failing it is a rejected rung, and the ladder climbs on from it
                            if not self._settle(best):
                                out, lam, note, best, deferring = best, best.damping, best.note, None, False
                                pending_at = None
                deferring = deferring and best is None
                while True:
                    while best is None and len(history) < self.max_trials:
                        failed, prev = lam, out
                        lam = start() if lam < start() else lam * self.grow
                        # a step refined below (a rejected damping above 0 before it, a trial left) has its
                        # second measurement deferred: it is needed only where the refined step fails
                        later = deferring and failed > 0 and len(history) + 1 < self.max_trials
                        if lam in passed:  # a rung the bracketing passed on its first measurement: not measured again
                            out = passed.pop(lam)
                            if not self._settle(out):
                                note = out.note
                        elif lam in refused:  # the predicted rung, failed: its measurement stands
                            out = refused.pop(lam)
                        else:
                            out = attempt(lam, expect_reject=fresh, defer=later)
                        if out is not None and out.safe:
                            best = out
                            break
                        left = self.max_trials - len(history)
                        if out is None or prev is None or left < 1:
                            continue
                        reach = lam  # the most damped step the search could still try
                        for _ in range(left):
                            reach = start() if reach < start() else reach * self.grow
                            if math.isinf(reach):  # (max_damping_trials=10**400 looped on for ever)
                                break
                        why = _slope_share_falls(prev, out) if shape == "data" else None
                        why = why or self._saturated(backend, G, prev, out, reach)
                        if why is not None:  # a failed search of this shape, as if it had tried every damping left
                            out.history[0]["stopped"] = why
                            note = f"{note}; the search stopped: {why}"
                            log.debug("damping search (%s shape) stopped: %s", shape, why)
                            break
                    if best is not None and failed is not None and failed > 0 and len(history) < self.max_trials:
                        mid = math.sqrt(failed * best.damping)  # refine once between the rejected and accepted
                        kept = pending_at or (len(history), len(tried))  # (from above: the rungs below it too)
                        out = attempt(mid)
                        if out is not None and out.safe:
                            best = out
                        elif not self._settle(best):
                            # the accepted step fails its second measurement: the search goes on from it, measuring
                            # each passed step at once; the refinement stays in the history, marked, and counts
                            # towards max_trials (its work was done)
                            why = f"the accepted step at damping {best.damping:.3g} failed its second measurement"
                            for h in history[kept[0] :]:
                                h["abandoned"] = why
                            del tried[kept[1] :]
                            out, lam, best, note, deferring = best, best.damping, None, best.note, False
                            pending_at = None
                            continue
                    break
            if best is not None:
                best.history, best.trials = history, len(history)
                if best.damping > 0:
                    best.scale = scale()
                self._relatives[shape] = best.damping / scale() if best.damping > 0 else 0.0
                return best
        if not tried:
            raise NegativeCurvatureError(
                f"no damping up to {history[-1]['damping']:.3g} made the curvature positive definite; nothing was "
                "changed. Use a positive-definite curvature (solver='kfac') or negative_curvature='truncate'"
            )
        last = tried[-1]
        last.history, last.trials, last.note = history, len(history), note
        if last.damping > 0:
            last.scale = scale()
        return last
