r"""MCMC unlearning: the MCMC influence function of Fu, He & Tao (ICLR 2022), and its refinements.

This is the one place the algorithm lives; the seed API (:mod:`mcmc_unlearner.compat`), the CLI, the deletion
service and the experiments call it. One request reads as the math:

1. **Validate** the removed points (non-empty, finite) and the remaining data (an endless stream, its size ``n``).
2. **Gradient** :math:`G = E_θ[∇_θ \sum_{z∈S'} h(θ,z)]`, averaged over posterior draws.
3. **Curvature** :math:`H = E_θ[∇²_θ F(θ, S∖S')]` from a backend (:mod:`mcmc_unlearner.backends`: dense,
   K-FAC, CG, LiSSA, low-rank), built or reused.
4. **Step control** (:mod:`mcmc_unlearner.step`): :math:`x = (H + λI)^{-1}G` with the damping :math:`λ` chosen
   by a Levenberg–Marquardt rule and every step checked against the measured change of the remaining-data
   energy; a step that would make the fit worse is never applied.
5. **Shift** the live chain and the stored samples, then **commit** (or report what failed).

**The step.** The posterior is :math:`p(θ|S) ∝ \exp(-F(θ,S))` with :math:`F(θ,S) = -\log p(θ) + \sum_{z∈S} h(θ,z)`
and :math:`h(θ,z) = -\log p(z|θ)`. To forget :math:`S'⊂S`, every posterior sample is moved by the MCMC influence
function (paper, Thm. 1 and Alg. 1), :math:`θ ← θ + H^{-1} G`. The paper takes :math:`H` on the full data
(``hessian="full"``); ``hessian="remaining"`` (default) uses :math:`F(θ, S∖S')` — a Newton step on the new energy,
exact for a Gaussian posterior where the paper's undershoots by the removed fraction of the curvature.

**Expectations** are Monte-Carlo averages over posterior draws: ``expectation="bank"`` uses the stored sample
bank (no new sampling), ``expectation="chain"`` takes ``samp_T`` sampler steps first, on the data before the
removal (the paper's protocol: the removed points stay in the sampler until the shift).

**Spread.** ``bank_shift="mean"`` moves every stored sample by the same vector (the paper's shift); ``"sample"``
moves each by :math:`(H+λ)^{-1}∇h(θ_s)` (over-widens); ``"affine"`` applies the exact Gaussian transport
:math:`θ' = μ' + A'^{-1/2}A^{1/2}(θ - μ)` from the old precision :math:`A` to the new :math:`A'` (dense solver only).

**Across requests** (``recenter_every``: every 10 requests with K-FAC by default, else off). Each step keeps the
bank's first moment, :math:`E_θ[∇F(θ, S∖S')] = E_θ[∇F(θ, S)]`, only to first order and with approximate curvature;
every ``K`` requests
:meth:`MCMCUnlearner._recenter` measures what has accumulated on every remaining row (a pass over the remaining data
per stored sample, at as many samples as make it clear of its Monte-Carlo error, else no step) and takes one checked
Newton step back. Once one has been applied, the requests are damped as ``H + λI`` like the corrections, and it
clears the influence carried between requests.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import functools
import hashlib
import importlib
import itertools
import logging
import math
import re
import sys
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import torch
from torch import nn
from torch.func import grad, jacrev, vjp, vmap
from torch.multiprocessing.reductions import StorageWeakRef

from . import step as step_module
from .backends import CurvatureBackend, DenseBackend, Problem, dense_memory, make_backend
from .backends.base import NegativeCurvatureError
from .backends.kfac import kfac_row_need
from .bank import BankLayout, bad_rows, check_finite, to_flat
from .curvature import (
    ParamSpec,
    SampleAveragedHessian,
    dense_embedding_grads,
    eager,
    functionalize,
    quiet_vmap_fallbacks,
    second_derivative_gap,
)
from .data import epoch_samplers
from .emptied import RESAMPLE_MAX_ROW_EVALS
from .errors import InvalidRequestError, QualityError, SolverDivergedError, all_finite, outside_stacklevel
from .memory import chunk_for, format_bytes, release_free_heap, resident_bytes, row_and_call_bytes
from .options import (
    DAMPING_FIX,
    SCALING_FIX,
    BankShift,
    EmptiedLabel,
    Expectation,
    HessianKind,
    ModelFacts,
    auto_solver_reason,
    check_bank_shift_solver,
    check_damping_shape_solver,
    check_hessian_solver,
    check_option,
    dense_memory_refusal,
    representable_refusal,
    shown_value,
    weigh_dense_build,
)
from .options import flag as _flag
from .samplers import scale_lr
from .solvers import SolverName
from .step import (
    SLOPE_ETA,
    SLOPE_Z,
    DampingControl,
    DampingShape,
    EnergyCheck,
    ScreenMode,
    StepOutcome,
    is_integer,
    is_number,
    labels_spread,
    measured_deficit,
    nll_unit,
    unit_of,
)
from .stream import (
    MIN_CURVATURE_ROWS,
    IteratorRanOut,
    _as_batch,
    _JoinedList,
    _loader_labels,
    _loader_selection,
    _loader_tensors,
    _minibatch_list,
    _removed_rows_held,
    _repeated_rows,
    _same_state,
    _source_generators,
    _Stream,
    check_finite_batch,
)

#: Progress of long requests (phases at INFO, damping trials at DEBUG in ``mcmc_unlearner.step``); silent unless the
#: caller configures logging, e.g. ``logging.basicConfig(level=logging.INFO)``.
log = logging.getLogger(__name__)

__all__ = [
    "BankShift",
    "Expectation",
    "HessianKind",
    "MCMCUnlearner",
    "Proposal",
    "RemovalReport",
    "check_finite_batch",
    "quality_problems",
]

Batch = tuple[torch.Tensor, ...]

#: A damped step is "made by the damping" when the measured remaining-data energy keeps falling along it for more
#: than this many times its length (:meth:`StepOutcome.shortfall`, at the curvature's upper confidence bound): it
#: is then a short gradient step that applies a negligible part of the influence. (The damping in units of the
#: mean curvature ``tr H / D`` is no test of that: on large networks the trace is dominated by the prior, and the
#: curvature along ``G`` was measured at 10³–10⁴× the mean on a 1.2M-parameter ResNet.)
MAX_STEP_SHORTFALL = 100.0
#: A *fixed* damping above this many times the mean curvature is refused as well: its step can be so short that
#: the check measures floating-point noise (the adaptive control raises the damping only on measured evidence).
MAX_RELATIVE_DAMPING = 1e4
#: Forward-over-reverse products keep about this many times the activations a backward pass saves.
_HVP_MEMORY_FACTOR = 3
#: The dense Hessian's column chunks, when there are several, are planned at this many times their bytes: within
#: one chunk glibc's heap grows to 2.0-2.2x what the chunk holds at once (its freed intermediates are not reused
#: inside the chunk; measured from a trimmed heap, a 1,012-parameter float64 MLP over 2,000 rows). The growth
#: across chunks is handed back between them (``_dense_hessian_chunked``); with a margin of 2 the build still
#: reached 0.99-1.05x a 200 MB budget.
_DENSE_CHUNK_MARGIN = 3
#: The dense Hessian over rows shared by every draw is built a draw at a time where one draw's build is planned at
#: this many bytes or more (:meth:`MCMCUnlearner._dense_hessian`): batched over the draws its intermediates left
#: the cache (a 467-parameter MLP over 80 rows, 16 draws: 4x slower); below it one batched call saves the per-call
#: overhead.
_DENSE_DRAW_LOOP_BYTES = 2**20
#: A dense Hessian build planned (with the dense matrices) within this fraction of the memory budget skips handing
#: the heap's free pages back around it (:func:`~mcmc_unlearner.memory.release_free_heap`, ~1 ms a call).
_DENSE_TRIM_FRACTION = 16
#: One vmapped forward-over-reverse product at one draw of the iterative solvers' operator holds about this many
#: times what a backward pass saves (tangents of every activation, the batched copies; measured 5-14x through
#: convolutions and attention, the factor 3 above ran 3-11x over the budget) ...
_HVP_PRODUCT_FACTOR = 12
#: ... and this many copies of the parameters (the draw's unflattened weights, their tangents, the gradient and
#: its tangent, the product, its share of the ``[S, D]`` result): 20-30 measured on a 301k-parameter MLP.
_HVP_D_COPIES = 24
#: One Hessian-vector product by double backward (the first request's check that ``nll`` can be differentiated twice,
#: :meth:`MCMCUnlearner._once_differentiable`) holds about this many copies of the parameters (the gradient kept
#: with its graph, its derivatives, the product, the check's saved copy of the model: 3.85 measured on a 4.3M-parameter
#: MLP, 6.8 before the seeded vector and the sample's clone were dropped), beside ``_HVP_PRODUCT_FACTOR`` times what
#: its rows' backward pass saves (1.1x measured through convolutions, 6.9x through attention).
_ONCE_D_COPIES = 5
#: The first request's other checks of ``nll`` (:meth:`MCMCUnlearner._check_forward`: its writes, the rows alone
#: and together, its gradient through the functional path and with the sample loaded; the mixed-rows test) hold at
#: most this many copies of the parameters (the check's saved copy of the model, the sample's clone, two gradients
#: and the one being assembled: 4.8 measured on a 1.1M-parameter MLP, 10.7 before the gradients' float64 copies and
#: a held flat copy of the model were dropped, stop 59) beside ``GRAD_SAVED_FACTOR`` times what their rows save.
_FORWARD_D_COPIES = 5
#: Layers whose weights act at many positions or time steps: for a small model with one ``auto`` takes the dense
#: Gauss-Newton matrix instead of the dense Hessian (one request on 574-954-parameter CNNs took 33-278 s CPU with
#: the Hessian, 2.8-6.0 s with the Gauss-Newton matrix; the chains trained in 4-10 s).
_WEIGHT_SHARING = (nn.modules.conv._ConvNd, nn.RNNBase)
#: ``curvature_data="auto"`` reads every remaining row (``exact`` only) while remaining rows × draws is at most
#: ``FULL_ROWS_MAX``; where rows × draws × parameters, what the dense build's cost grows with, is over
#: ``FULL_ROWS_DRAWS_WORK`` and ``curvature_draws`` was not given, it reads them at fewer draws,
#: ``max(1, FULL_ROWS_DRAWS_WORK // (rows × parameters))`` evenly among the usual ones. A 322-parameter
#: negative-binomial MLP's build over 1,552 rows × 16 draws took 10 s of a 12.3 s request (4.0 s at 4 draws,
#: forgetting fraction 0.48/0.49/0.48 against 0.47/0.48/0.46 at 16; 460-parameter digits MLPs 5.6-6.2 s -> 2.1-2.7 s,
#: test-set KL to the retrained chain no higher beyond 0.0002); a minibatch per draw instead (2.6 s) left a conjugate
#: regression's exact posterior-mean shift 4.9% undone (0.72% with every row, at 16 draws or at 6).
FULL_ROWS_MAX = 32_768
FULL_ROWS_DRAWS_WORK = 2**21
#: The backends that hold the curvature as a dense matrix (affine bank transport, full-data curvature).
_DENSE = (SolverName.EXACT, SolverName.GGN)
#: options CG reads and K-FAC does not (said to apply if ``solver='auto'`` switches from K-FAC to CG)
_CG_READS = ("iter_T", "precondition_rank", "negative_curvature")
#: The backends built on Hessian-vector products (second derivatives through the model).
_HESSIAN_PRODUCTS = (SolverName.EXACT, SolverName.CG, SolverName.LISSA, SolverName.LOWRANK)
#: The matrix-free backends: the curvature only through Hessian-vector products (``MCMCUnlearner._operator``).
_MATRIX_FREE = (SolverName.CG, SolverName.LISSA, SolverName.LOWRANK)


@dataclass
class RemovalReport:
    """What one deletion request did (or, when ``problems`` is not empty, would have done).

    Attributes:
        n_removed: Points removed by this request.
        n_remaining: Points left afterwards.
        solver: Curvature backend used.
        iterations: Solver iterations of the accepted step.
        residual: Relative residual of the accepted step's solve of ``(H + λI)x = G``. ``kfac`` and ``lowrank``
            solve their own approximation of ``H`` exactly (residual 0 up to rounding): how well the approximation
            models the energy is what the safety check measures (``damping_history``, ``step_shortfall``).
        converged: Whether that solve met its tolerance.
        shift_norm: Norm of the (mean) parameter shift ``x``.
        shift_stderr: Monte-Carlo standard error of the shift (norm): ``‖(H+λ)⁻¹(Ḡ_A − Ḡ_B)/2‖`` for the two halves
            A, B of the gradient draws; NaN when every draw is the same sample (a bank of one: not estimable).
        seconds: Wall time of the request.
        n_draws: Posterior draws averaged for ``G``; ``n_curvature_draws`` for ``H``.
        bank_size: Stored samples shifted (0 without a bank).
        hessian_products: Single-draw Hessian-vector products spent (dense builds included).
        damping: The damping ``λ`` of the accepted step (chosen by the step control unless fixed).
        damping_trials: Steps tried (each one checked).
        damping_relative: ``λ / (tr H / D)``: the damping in units of the mean curvature.
        step_shortfall: How many times longer the accepted step could be before the measured remaining-data
            energy stops falling along it (lower confidence bound; :meth:`StepOutcome.shortfall`): ``≈ 1`` or
            below when the curvature set the step's length, ``≫ 1`` when the damping did; ``inf`` when the
            measured energy is not convex along the step (no verdict).
        step_length: Fraction of the solver's step applied (< 1 when ``shorten_steps`` cut an overshooting step
            back to the measured minimum along it; the step's predicted/actual changes are then those at that
            length).
        predicted_change, actual_change: Model-predicted and measured change of the bank-averaged remaining-data
            energy (negative = the fit of the remaining data improved); ``actual_stderr`` is the measurement's
            Monte-Carlo error and ``model_ratio`` = actual/predicted (see :mod:`mcmc_unlearner.step`).
        remaining_nll_change: Mean change of the per-row negative log-likelihood of the held remaining rows: the
            common step's, plus the measured change of the move of the samples' spread where one was applied
            (``info["spread_check"]``; ``info["remaining_nll_rise"]`` likewise). Where the safety net measured the
            step a second time on further rows, the step's change is the two measurements pooled, the value it
            judged the step on (``info["trials"]``' ``pooled_nll_change``); unlike ``info["remaining_nll_rise"]``
            it is not credited with the prior's fall.
        safe: Whether the step passed the safety check.
        problems: What failed (empty when the removal passed every check; see :func:`quality_problems`).
        info: Backend extras (reuse of cached curvature, eigenvalues, K-FAC likelihood, damping history:
            ``info["trials"]``, one dict per trial, and ``info["damping_history"]``, each trial as ``shape
            damping:ratio`` joined by ``;``, the taken one ``shape damping (taken):ratio``; see
            :func:`damping_history`).
    """

    n_removed: int
    n_remaining: int
    solver: str
    iterations: int
    residual: float
    converged: bool
    shift_norm: float
    shift_stderr: float
    seconds: float
    n_draws: int
    n_curvature_draws: int
    bank_size: int
    expectation: str
    hessian: str
    bank_shift: str
    hessian_products: int = 0
    damping: float = 0.0
    damping_trials: int = 1
    damping_relative: float = 0.0
    step_shortfall: float = math.nan
    step_length: float = 1.0
    predicted_change: float = 0.0
    actual_change: float = 0.0
    actual_stderr: float = 0.0
    model_ratio: float = 1.0
    remaining_nll_change: float = 0.0
    safe: bool = True
    problems: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Whether the removal passed every check."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats kept as Python floats; ``info`` reduced to scalars)."""
        d = asdict(self)
        d["info"] = {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))}
        return d


@dataclass
class FitReport:
    """What :meth:`MCMCUnlearner.fit` built for the next request.

    Attributes:
        seconds: Wall time of the fit (the one-off work the first request would otherwise do).
        solver: Curvature backend.
        curvature_kept: Whether a curvature was built and kept for the next request (K-FAC; the dense and
            matrix-free backends build theirs in the request, from its removed rows).
        info: The build's details (as a request's ``report.info`` gives them), or why nothing was built.
    """

    seconds: float
    solver: str
    curvature_kept: bool
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``info`` reduced to scalars)."""
        d = asdict(self)
        d["info"] = {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))}
        return d


#: torch's words where operands' dtypes differ ("mat1 and mat2 must have the same dtype", "Input type (double) and
#: bias type (float) should be the same", "RNN input dtype ... does not match", "mixed dtype (CPU)", "Found dtype
#: Double but expected Float", "to have the same type as tensor"); not where an integer dtype was expected (float class
#: labels: "expected target dtype to be Long or Byte", cast to int64, not to the model's dtype)
_DTYPE_ERROR = re.compile(r"dtype|datatype|scalar type|same type|type \(", re.IGNORECASE)
_INTEGER_WANTED = re.compile(r"\b(Long|Int|Byte)\b")

#: Where an nll differentiates with respect to its rows (a physics-informed residual) and torch said "does not require
#: grad": rows given requiring grad are read detached (stream._plain), and such an nll was accepted before that.
_DETACHED_HINT = (
    "Every field is read detached from the caller's graph, one that requires grad too: an nll that differentiates "
    "with respect to its rows turns that on itself, x = b[0].detach().requires_grad_() under torch.enable_grad(). "
)


@contextlib.contextmanager
def _source_states_kept(remaining: Any) -> Iterator[tuple[list[torch.Generator], list[Any]]]:
    """On exit (normal or not) torch's global generator, the remaining data's own generators and its
    ``DistributedSampler`` epochs are as they were on entry; yields the generators and the samplers.

    A ``DataLoader`` (or its sampler) with a generator of its own draws its shuffling and iterator seed from it, not
    from torch's; a ``DistributedSampler``'s order is its epoch, advanced on each pass (``data.new_pass``)."""
    rng = torch.get_rng_state()
    gens = _source_generators(remaining)
    gen_states = [g.get_state() for g in gens]
    samplers = epoch_samplers(remaining)
    epochs = [s.epoch for s in samplers]
    try:
        yield gens, samplers
    finally:
        torch.set_rng_state(rng)
        for g, state in zip(gens, gen_states):
            g.set_state(state)
        for s, epoch in zip(samplers, epochs):
            s.set_epoch(epoch)


def resolution_floor(shift_norm: float, theta: torch.Tensor) -> float | None:
    """``ε·max(‖θ‖, 1)`` when a non-zero, finite shift is below it (adding it to ``θ`` changes nothing); else None."""
    if not (math.isfinite(shift_norm) and shift_norm > 0.0 and theta.is_floating_point()):
        return None
    floor = torch.finfo(theta.dtype).eps * max(float(theta.double().norm()), 1.0)
    return floor if shift_norm < floor else None


def autocast_in_effect(device: torch.device) -> str | None:
    """``"<device type> <dtype>"`` when ``torch.autocast`` is on for ``device`` (``None``: it is not)."""
    kind = device.type
    try:
        on = torch.is_autocast_enabled(kind)
        dtype = torch.get_autocast_dtype(kind) if on else None
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4: per-device functions
        if kind == "cpu":
            on, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        else:
            on, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return f"{kind} {str(dtype)[6:]}" if on else None


class _Ticker:
    """Logs ``what``'s progress at INFO, at most one line per ``step.PROGRESS_EVERY_S`` seconds (read at each
    call; none for a short pass).

    Called with the rows done and the rows of the current pass after each chunk."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last >= step_module.PROGRESS_EVERY_S:  # read at call time: the README's setting
            self.last = now
            log.info("%s: %d of %d rows read in this pass (%.1f s so far)", self.what, done, total, now - self.t0)


def _log_curvature(solver: str, info: Mapping[str, Any], draws: int, seconds: float) -> None:
    """One progress line for the curvature a request prepared: reused from an earlier request, or built."""
    if info.get("preconditioner_reused") or info.get("hessian_reused"):
        log.info("curvature (%s): reused from an earlier request", solver)
    else:
        log.info("curvature (%s): built over %d draw(s) in %.2f s", solver, draws, seconds)


def _direct_fix(trials: Any) -> str | None:
    """What a request whose last trial the direct test (``direct_z``) rejected can do (``None``: not the case).
    Damping cannot help there: along a step the bank's own energy rises on, the rise shrinks with the step as its
    error does."""
    if not (isinstance(trials, list) and trials and isinstance(trials[-1], dict) and trials[-1].get("direct_failed")):
        return None
    failed = sum(bool(isinstance(t, dict) and t.get("direct_failed")) for t in trials)
    return (
        f"the remaining data's energy, measured directly, rose by more than direct_z standard errors along {failed} "
        f"of the {len(trials)} steps tried, the last among them: the bank is not at equilibrium along them (a "
        "curvature approximation's error accumulated "
        "over earlier requests, or a chain too short), which more damping cannot remove; a correction across "
        "requests (recenter_every, with rows it can list), longer chains or more draws help, and the unlearner's "
        "option direct_z=0 (on a built one, `unlearner.control.direct_z = None`) takes the step anyway"
    )


def _record_carry_dropped(info: dict[str, Any], record: dict[str, Any]) -> None:
    """``info["carry_dropped"]`` (:meth:`MCMCUnlearner._without_carry`), and its scalars as ``carry_dropped_accepted``,
    ``carry_dropped_refused_by``, ``carry_dropped_share`` and ``carry_dropped_slope_test``, which
    ``report.to_dict()`` and the deletion service's ledger keep (they keep scalars only: the record alone left the
    ledger no trace of the retry)."""
    info["carry_dropped"] = record
    info["carry_dropped_accepted"] = bool(record["accepted"])
    info["carry_dropped_refused_by"] = str(record["refused_by"])
    if record.get("carried_share") is not None:
        info["carry_dropped_share"] = float(record["carried_share"])
    if record.get("slope_test") is not None:
        info["carry_dropped_slope_test"] = str(record["slope_test"])


#: the solvers whose solve is direct, no iterations (``iter_T`` does not reach them): a residual over ``tol`` is the
#: rounding of their arithmetic
_DIRECT_SOLVES = ("exact", "ggn", "kfac", "lowrank")


def _direct_residual_fix(residual: float, dtype: torch.dtype | None = None) -> str:
    """The fix of a direct solve's residual over ``tol``: ``iter_T`` reads no direct solve (``solver="lowrank"`` at its
    defaults on a 66-parameter MLP in float32: residual 1.3e-4 over tol 1e-4 at damping 0.23, 1.3e-13 in float64,
    and "raise iter_T" sent the user where iter_T=1000 changed nothing: stop 70).

    A tol above the residual is named only where the residual is within ``√ε`` of the parameters' dtype (3.5e-4 in
    float32, the default where the dtype is not known): rounding amplified by a moderate condition number. Above it
    the damped system is nearly singular and the step inexact: a three-layer linear network's ``lowrank`` solve at
    ``damping=1e-6`` stopped at residual 0.23, and the message named ``tol=1`` (an option value refused: tol lies in
    (0, 1)) for a step 23% off its own equation (stop 70's review); it names the damping, float64 and ``auto``."""
    floor = math.sqrt(torch.finfo(dtype if dtype is not None and dtype.is_floating_point else torch.float32).eps)
    if not (math.isfinite(residual) and 0 < residual <= floor):
        return (
            "the solve is direct, no iterations (iter_T does not apply), and its residual is above the rounding of "
            f"its arithmetic (√ε of the parameters' dtype, {floor:.2g}): the damped system is nearly singular and "
            "the step inexact (raising tol would accept it): pass damping='auto' (the default) or a larger damping, "
            "a float64 model and bank, or solver='auto'"
        )
    top = 10.0 ** math.ceil(math.log10(residual))
    return (
        "the solve is direct, no iterations (iter_T does not apply), and its residual is the rounding of its "
        f"arithmetic: pass a tol above the residual (e.g. tol={top:g}), a float64 model and bank, or solver='auto'"
    )


def quality_problems(
    report: RemovalReport,
    tol: float,
    note: str = "",
    fixed_damping: bool = False,
    theta: torch.Tensor | None = None,
) -> list[str]:
    """The checks a removal must pass before it is applied, as one message per failure (empty: passed).

    * the solve of ``(H + λI)x = G`` met its tolerance;
    * the step passed the safety check (its measured effect on the remaining-data energy matched the model);
    * the shift is finite and not trivial: not zero while the removed points have a gradient, not damped below
      the floating-point resolution of the parameters ``theta`` (when given: by a fixed damping, or by the search
      when a less damped trial was above it; when even the least damped step tried is that small, the removal
      legitimately changes nothing), and not made by the damping alone (a
      damped step's ``step_shortfall <= MAX_STEP_SHORTFALL``; a fixed damping at most ``MAX_RELATIVE_DAMPING``
      times the mean curvature).
    """
    out = []
    if not math.isfinite(report.shift_norm):
        out.append("the shift is not finite")
    if not report.converged:
        autocast = report.info.get("autocast")
        fix = (
            # the products ran in the autocast dtype (bfloat16: about 3 significant digits): no number of
            # iterations reaches tol, and "raise iter_T" sent the user the wrong way
            f"the request ran under torch.autocast ({autocast}), which computes the model's products in lower "
            "precision than the solve's tolerance needs; run the request outside autocast (inside it: with "
            f"torch.autocast('{autocast.split()[0]}', enabled=False): unlearner.forget(...))"
            if autocast
            else _direct_residual_fix(report.residual, None if theta is None else theta.dtype)
            if report.iterations == 0 and report.solver in _DIRECT_SOLVES
            else "raise iter_T, or use solver='auto'"
        )
        out.append(
            f"the {report.solver} solve stopped at relative residual {report.residual:.3g} > tol {tol:g} after "
            f"{report.iterations} iterations: {fix}"
        )
    if not report.safe:
        fix = (
            # a fixed damping is one trial: the search the default makes is the fix (stop 44's probe: damping=0 was
            # told to draw more curvature)
            f"the fixed damping={report.damping:g} is the only step tried: pass damping='auto' (the default), which "
            "searches for a damping the check accepts, or a larger fixed damping"
            if fixed_damping
            else _direct_fix(report.info.get("trials"))
            or "more curvature draws (curvature_draws), more check rows, or another solver may help"
        )
        out.append(
            f"the step failed the safety check after {report.damping_trials} damping trial(s): "
            f"{note or 'the measured change of the remaining-data energy did not match the model'}; {fix}"
        )
    if report.shift_norm == 0.0 and report.info.get("gradient_norm", 0.0) > 0.0:
        out.append("the shift is zero although the removed points have a non-zero gradient")
    elif report.damping > 0 and (
        (short := math.isfinite(report.step_shortfall) and report.step_shortfall > MAX_STEP_SHORTFALL)
        or (fixed_damping and report.damping_relative > MAX_RELATIVE_DAMPING)
    ):
        measured = (
            f"; the measured remaining-data energy keeps falling along the step to {report.step_shortfall:.3g}× its "
            "length"
            if short
            else ""
        )
        fix = (
            "lower the damping or use damping='auto'"
            if fixed_damping
            else "the curvature model does not predict the remaining-data energy at a lower damping: more "
            "curvature draws (curvature_draws), another solver, or retraining"
        )
        carried, own = report.info.get("carried_norm", 0.0), report.info.get("gradient_norm", 0.0)
        dropped = report.info.get("carry_dropped")
        if isinstance(dropped, dict) and dropped.get("accepted"):  # the step taken had the carry dropped
            carried = 0.0
        if not fixed_damping and carried > own:
            # one request whose rows the model never fitted (outliers, rows outside its training data) leaves a
            # large undone part that every later request carries: a user serving a sequence sees refusals only
            fix += (
                f"; this request carries the undone part of earlier requests (norm {carried:.3g} against its own "
                f"gradient's {own:.3g}): if an earlier request removed rows the model never fitted, "
                "reset_curvature() clears what is carried"
            )
        out.append(
            f"the step is made by the damping, not the curvature (damping {report.damping:.3g}, "
            f"{report.damping_relative:.3g}× the mean curvature{measured}); {fix}"
        )
    floor = resolution_floor(report.shift_norm, theta) if report.damping > 0 and theta is not None else None
    tried = [math.sqrt(t["xx"]) for t in report.info.get("trials", []) if math.isfinite(t.get("xx", math.nan))]
    damped_away = floor is not None and (fixed_damping or max(tried, default=0.0) >= floor)
    # a removal whose effect is below what the check resolves ("unresolved"): changing nothing is what it measured
    if damped_away and (fixed_damping or "unresolved" not in report.info):
        out.append(
            f"the shift {report.shift_norm:.2g} is below the parameters' floating-point resolution ({floor:.2g}): "
            f"the removal changes nothing (damping {report.damping:.3g}); "
            + ("lower the damping or use damping='auto'" if fixed_damping else "more check rows or another solver")
        )
    return out


def _backward_hooks(model: nn.Module) -> list[str]:
    """The backward hooks that run on ``model``'s modules, named by module and registering call (global ones
    too): each can change the gradients the unlearner differentiates."""
    from torch.nn.modules import module as torch_module

    found = []
    for name, m in model.named_modules():
        where = f"'{name}'" if name else "the model"
        if getattr(m, "_backward_hooks", None):
            found.append(f"{where}: a backward hook")
        if getattr(m, "_backward_pre_hooks", None):
            found.append(f"{where}: a backward pre-hook")
    if getattr(torch_module, "_global_backward_hooks", None):
        found.append("a global backward hook (register_module_full_backward_hook)")
    if getattr(torch_module, "_global_backward_pre_hooks", None):
        found.append("a global backward pre-hook (register_module_full_backward_pre_hook)")
    return found


def _sampler_generators(sampler: Any) -> dict[str, torch.Generator]:
    """The ``torch.Generator`` s a sampler holds as attributes: ``SGLD(..., generator=g)``'s ``generator``, and a
    sampler of the user's own that keeps its noise generator under another name (``self.rng``, ``self._gen``)."""
    found = getattr(sampler, "__dict__", None) or {}
    return {k: v for k, v in found.items() if isinstance(v, torch.Generator)}


def _sampler_generator_state(sampler: Any) -> dict[str, torch.Tensor] | None:
    """The states of a sampler's own noise generators, which ``state_dict`` omits (``None``: it has none)."""
    gens = _sampler_generators(sampler)
    return {k: g.get_state() for k, g in gens.items()} or None


def _uses_global_rng(sampler: Any) -> bool:
    """Whether a sampler draws its noise from torch's global generator (it has no generator of its own)."""
    return sampler is not None and not _sampler_generators(sampler)


def _set_sampler_generator_state(sampler: Any, state: dict[str, torch.Tensor] | torch.Tensor | None) -> None:
    if state is None:
        return
    if isinstance(state, torch.Tensor):  # a single state: the ``generator`` attribute's
        state = {"generator": state}
    gens = _sampler_generators(sampler)
    for k, st in state.items():
        if k in gens:
            gens[k].set_state(st)


def _check_sampler(sampler: Any, rescale_lr: bool, model: nn.Module | None = None) -> None:
    """What the unlearner needs of a sampler, checked when it is built: every request snapshots and restores it
    (``state_dict``/``load_state_dict``), and ``rescale_lr`` multiplies its groups' ``lr`` after a removal. Checked
    here, not in :meth:`MCMCUnlearner.apply`, where a failure came after the model and bank had been changed."""
    if sampler is None:
        return
    name = type(sampler).__name__
    missing = [
        a for a in ("step", "zero_grad", "state_dict", "load_state_dict") if not callable(getattr(sampler, a, None))
    ]
    if missing:
        raise TypeError(
            f"sampler {name} has no {', '.join(missing)}: the unlearner needs a torch.optim.Optimizer-like sampler "
            "(a request snapshots its state with state_dict() and restores it with load_state_dict()); subclass "
            "torch.optim.Optimizer, or pass sampler=None (stored samples only) and rescale your sampler's step size "
            "yourself"
        )
    groups = getattr(sampler, "param_groups", None)
    if model is not None and isinstance(groups, (list, tuple)):
        own = {id(p) for p in model.parameters()}
        foreign = sum(
            1
            for g in groups
            if isinstance(g, dict)
            for p in g.get("params", ())
            if isinstance(p, torch.Tensor) and p.requires_grad and id(p) not in own
        )
        if foreign:
            raise ValueError(
                f"sampler {name} drives {foreign} parameter(s) that are not the model's (built on another copy of "
                "the model, e.g. before copy.deepcopy(model)): its steps would not move the model the unlearner "
                "evaluates (expectation='chain' drew one point samp_T times, nothing flagged). Build the sampler on "
                "the parameters of the model you pass to the unlearner"
            )
    if rescale_lr:
        ok = isinstance(groups, (list, tuple)) and all(
            isinstance(g, dict)
            and (is_number(g.get("lr")) or (isinstance(g.get("lr"), torch.Tensor) and g["lr"].numel() == 1))
            for g in groups
        )
        if not ok:
            raise TypeError(
                f"rescale_lr=True multiplies the step size in sampler.param_groups[i]['lr'] after every removal, and "
                f"sampler {name} has no such groups: pass rescale_lr=False (and rescale it yourself by n_old/n_new), "
                "or keep the step size in param_groups as torch.optim does"
            )


#: A request removing more than this share of the data gets a warning: one influence step moves the samples only
#: part of the way to retraining there (a digits MLP: 0.12 of the way at half the data, 0.02 at nine tenths).
LARGE_REMOVAL = 0.2
#: The share of a request's removed rows that, found among every remaining row, is warned about as removed rows left
#: in the remaining data (fewer are rows the data repeat: noted, :meth:`MCMCUnlearner._removed_rows_kept`).
KEPT_ROWS_SHARE = 0.9
#: A request after which more than this share of the rows the samples were drawn on is gone (counted from the
#: remaining rows at the first request since the bank was set: requests and rows removed outside them) gets a
#: warning, each such request until one is applied (then no more until the count restarts: a new bank,
#: ``reset_curvature()``). Each request linearises around samples of a posterior ever
#: further from the current one: a digits MLP's 300 requests of 1-8 random rows (90% of its rows) ended 1.40 of the
#: way to retraining, its remaining rows' NLL 0.23 against retraining's 0.16-0.17, every request passing; at 30%
#: (100 requests) 0.80 of the way, and 37% in 8 requests 0.54 and 1.09 on two seeds (stops 43-44).
CUMULATIVE_REMOVAL = 0.5


#: A classifier request that removes the last remaining rows of a label is refused when the moved samples still give
#: those rows their (now absent) label with at least this mean posterior-predictive probability: given the remaining
#: data, where no row carries the label, the posterior puts little mass there (every remaining row pushes it down),
#: and a user's digits MLP whose class was removed in 17 requests of 8 still gave its last rows p = 0.99 after every
#: request before had passed (tests/test_unlearner.py).
EMPTIED_LABEL_MAX_PROB = 0.5
#: ... and, where the label's output-layer row could not be drawn (``emptied_label_resample`` "not done" or "not kept":
#: a head computed by ``spectral_norm`` or another parametrization, logits that are no ``nn.Linear``'s output, no
#: ``log_prior``, ...), when the label is still the top class of the moved samples' posterior predictive (the argmax of
#: their averaged softmax) on this share of those rows or more: a label spread against nine others can keep the argmax
#: at a low mean probability (a spectral-normed digits MLP under CG: the top class on 63% of its rows at a mean
#: probability of 0.17, and the request passed; stop 59's probe). A drawn row is not judged so: it is a draw from the
#: retrained conditional, which can leave the label the top class on half its rows (tests/test_label_encodings.py's
#: blobs: 52% at p = 0.39); ``emptied_label="refuse"``, which draws none, refuses such a label too.
EMPTIED_LABEL_MAX_TOP = 0.5
#: The likelihood extras (:func:`~.kronecker.detect_likelihood`) under which the emptied label's draw still applies: a
#: cross-entropy times a factor per row (``weight=`` class weights, a weight field, a constant), whose conditional is
#: the plain one with each remaining row's term times its factor.
_WEIGHTED_LINK = frozenset({"output", "scale", "weights", "class_weights"})
#: ``emptied_label="resample"`` (not the default since stop 61) draws the label's output-layer row
#: (:mod:`mcmc_unlearner.emptied`) only where the moved samples still give its removed rows this much of their own
#: label or more; below it the label is mostly forgotten (the digits BNN's class 0 in one request: 0.04; retrained
#: digits MLPs give 0.0000–0.003) and the draw's cost is saved. A label that is the top class on
#: ``EMPTIED_LABEL_MAX_TOP`` of its rows or more is drawn too, whatever its probability. The default, ``"always"``,
#: draws every emptied label's row: the draw is a Gibbs step of the retrained posterior whatever the probability, and
#: the threshold made the bank depend on which side of it a request fell (the quick model matrix's MLP seed 2 at
#: p = 0.026: 0.39 of the way to retraining undrawn, 0.69 drawn; docs/model-matrix.md, stop 61).
EMPTIED_RESAMPLE_PROB = 0.1
#: Rows, as a multiple of the safety check's, on which a passed step's held-row NLL rise is measured again when
#: it is not clearly within the tolerance (:meth:`EnergyCheck.confirm`); at most the remaining rows beyond the check's.
CONFIRM_ROWS_FACTOR = 4
#: That second measurement reads every stored sample, not only as many further ones as the check's, where its distinct
#: rows at every sample are at most this many times the check's rows × draws, twice its usual size (a small data set
#: or bank: the draws' part of its error then vanishes). Judged on its point estimate
#: (``step.DampingControl._confirm``), 16 of 200 samples read a 3-row conjugate regression's exact step as a rise
#: beyond the tolerance, and 16 of 50 a tanh regression's +0.138 as +0.078 (stop 51). At 32 LeNet-5's request in the
#: quick model matrix took 2.3 s CPU instead of 1.2 s, the same step.
CONFIRM_ALL_DRAWS_GRID = 16
#: Remaining rows that cannot be listed (a plain iterator of minibatches) where the request empties a label as far
#: as the rows it read show (:meth:`MCMCUnlearner._unseen_labels`): the emptied-label check and draw read at most this
#: many times ``n`` further rows from the stream (:meth:`MCMCUnlearner._streamed_remaining`), looking for the label
#: (then it remains: nothing emptied) or for every remaining row (``n`` distinct rows, byte for byte, and then at
#: least ``n`` more rows all among them), read then as the listed rows; 0: none read (stop 66's warning alone).
EMPTIED_STREAM_PASSES = 8
#: Stored samples (evenly spaced) over which that probability is averaged, and removed rows per forward pass.
EMPTIED_LABEL_DRAWS = 16
EMPTIED_LABEL_ROWS = 512
#: Most rows of an emptied label that earlier requests removed (through :meth:`MCMCUnlearner.forget`, from the same
#: ``RemovableDataset``) judged with the request's own, evenly spaced by id: a class removed 16 rows at a time gave
#: its last request's rows p = 0.097 (no draw) while all its removed rows gave 0.14 and 21% of its test digits kept
#: their label (stop 48's probe).
EMPTIED_LABEL_EARLIER_ROWS = 512


def _representable(name: str, value: float, dtype: torch.dtype, fix: str, zero_ok: bool = False) -> None:
    """Refuse an option ``value`` that is infinite (or, unless ``zero_ok``, nonzero but rounded to zero) in the
    parameters' ``dtype``, in which the solves apply it; ``fix`` says what to pass instead
    (:func:`~mcmc_unlearner.options.representable_refusal`, the command line's torch-free check)."""
    info = torch.finfo(dtype)
    limits = (info.max, info.smallest_normal)
    problem = representable_refusal(name, value, str(dtype).removeprefix("torch."), limits, fix, zero_ok)
    if problem:
        raise ValueError(problem)


def _still_held(label: str, probability: float, info: dict[str, Any]) -> bool:
    """Whether ``emptied_label="resample"`` draws the output-layer row of an emptied ``label``: the moved samples give
    its removed rows ``EMPTIED_RESAMPLE_PROB`` of its probability or more, or make it the top class on
    ``EMPTIED_LABEL_MAX_TOP`` of them or more (``info["emptied_labels_top_share"]``)."""
    tops = info.get("emptied_labels_top_share")
    top = tops.get(label, 0.0) if isinstance(tops, dict) else 0.0
    return not probability < EMPTIED_RESAMPLE_PROB or not top < EMPTIED_LABEL_MAX_TOP


#: The fix named where an emptied label's output-layer row could not be drawn.
_DRAWABLE = (
    "give the model an output layer the draw can sample (a final nn.Linear giving the logits, or several, or one "
    "over several positions, whose outputs are averaged, its weight and bias plain trainable parameters: no "
    "spectral_norm, weight_norm or other parametrization), with a log_prior and remaining rows it can list"
)


#: Why an emptied label's row was not drawn, where no output layer, ``log_prior`` or remaining-data form lets it be:
#: the ranks under ``torch.distributed``, an ``nll`` other than the plain or row-weighted cross-entropy (label
#: smoothing: the head may already be a plain ``nn.Linear``), the memory budget, the limit on sample-row evaluations,
#: the labels themselves (:func:`_head_would_draw`).
_NOT_THE_HEAD = (
    "torch.distributed",
    "cross-entropy",
    "memory budget",
    "row evaluations",
    "a remaining row carries",
    "no remaining row",
)


def _head_would_draw(why: str) -> bool:
    """Whether the draw, ``"not done"`` for reason ``why``, would be done with a head it can sample, a ``log_prior``
    and remaining rows it can list (:data:`_DRAWABLE`)."""
    return why.startswith("not done") and not any(k in why for k in _NOT_THE_HEAD)


def _with_undrawn_reason(problem: str, info: dict[str, Any]) -> str:
    """``problem`` (the emptied-label check's, a label still at ``EMPTIED_LABEL_MAX_PROB`` or more) with why the
    label's output-layer row was not drawn (``info["emptied_label_resample"]``) and, where another head would let the
    draw be done, that fix (a probe's learned-temperature head, ``Linear(h) / T``, was refused naming only
    retraining and continuing the chain)."""
    why = str(info.get("emptied_label_resample", "not done"))
    drawable = _head_would_draw(why)  # (no head lets the ranks draw it, nor an nll the draw cannot take)
    fix = f"; or {_DRAWABLE}, and the default draws that row" if drawable else ""
    return f"{problem}. The label's output-layer row, which would be drawn from its conditional, was {why}{fix}"


def _undrawn_top_problem(info: dict[str, Any], refuse: bool = False, checked: bool = False) -> str | None:
    """The problem to report when an emptied label's output-layer row was not drawn (``info["emptied_label_resample"]``
    says why; ``refuse``: ``emptied_label="refuse"`` draws none; ``checked``: the check of
    :meth:`MCMCUnlearner.emptied_label_problem`, on the samples as they are, draws none) and the moved samples still
    make the label the top class on ``EMPTIED_LABEL_MAX_TOP`` of its removed rows or more
    (``info["emptied_labels_top_share"]``) at a mean probability under ``EMPTIED_LABEL_MAX_PROB`` (a label at that
    probability or more is named by the check's own problem); ``None`` otherwise."""
    probs, tops = info.get("emptied_labels"), info.get("emptied_labels_top_share")
    if not isinstance(probs, dict) or not isinstance(tops, dict):
        return None
    still = {c: t for c, t in tops.items() if not t < EMPTIED_LABEL_MAX_TOP and probs[c] < EMPTIED_LABEL_MAX_PROB}
    if not still:
        return None
    said = ", ".join(
        f"{100 * t:.0f}% of them at a mean probability of {probs[c]:.2f} (label {c})" for c, t in still.items()
    )
    if checked:
        why, fix = "not drawn (this check of the samples as they are draws none)", ""
    elif refuse:
        why = "not drawn (emptied_label='refuse' draws none)"
        fix = (
            "; or pass emptied_label='always' (the default) or emptied_label='resample', which draw that row where "
            "the draw can sample it (a "
            "final nn.Linear giving the logits, or several, or one over several positions, whose outputs are "
            "averaged, its weight and bias plain trainable parameters: no spectral_norm, weight_norm or other "
            "parametrization, with a log_prior, a plain or class-weighted cross-entropy nll and remaining rows it "
            "can list, not under torch.distributed); where it cannot, the default refuses this request too"
        )
    else:
        why = str(info.get("emptied_label_resample", "not done"))
        fix = f"; or {_DRAWABLE}" if _head_would_draw(why) else ""
    return (
        f"this request removes the last rows of {'a label' if len(still) == 1 else 'labels'} from the remaining "
        f"data, but the moved samples still make {'it' if len(still) == 1 else 'each'} the top class of their "
        f"posterior predictive on {said} (at least {EMPTIED_LABEL_MAX_TOP:.0%} of the rows; spread against the other "
        "labels, a class stays predicted below a mean probability of one half), and the label's output-layer row, "
        f"which would be drawn from its conditional given the remaining rows, was {why}. Retrain, or continue the "
        "chain on the remaining data for at least a burn-in's worth of steps (your own sampler, run_chain, or the "
        f"deletion service's --on-failure repair with --repair-steps that long){fix}"
    )


class _BatchWritten(ValueError):
    """``nll`` wrote into the rows it was given (:meth:`MCMCUnlearner._nll_on_copies`)."""


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``b`` still holds ``a``'s shape, dtype and values (NaN where ``a`` has NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a, b) or (a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all()))


def _per_row(out: Any, rows: int) -> bool:
    """Whether ``nll``'s ``out`` holds one value per row of ``rows`` (shape ``[rows]``, or ``[rows, 1, ...]``)."""
    return isinstance(out, torch.Tensor) and out.numel() == rows and (out.ndim <= 1 or out.shape[0] == rows)


def _same_kind(exc: BaseException, message: str) -> Exception:
    """An exception of ``exc``'s class carrying ``message``, or a ``ValueError`` where that class cannot be built
    from a message alone (torch raised a ``UnicodeDecodeError``, whose constructor takes five arguments, for a uint8
    label of 255 in ``cross_entropy``: re-raising it failed with "function takes exactly 5 arguments")."""
    try:
        out = type(exc)(message)
    except Exception:
        return ValueError(message)
    return out if isinstance(out, Exception) else ValueError(message)


def _percent(share: float) -> str:
    """``share`` as a percentage that never rounds up to 100% (or down to 0%) when it is not."""
    pct = 100 * share
    text = f"{pct:.3g}%"
    if float(text[:-1]) >= 100 > pct:
        return "over 99.9%"
    return text


def _sorted_name_order(spec: ParamSpec) -> torch.Tensor | None:
    """Index that reads a flat vector laid out in sorted-name order (optree's ``tree_ravel`` of a
    ``{name: tensor}`` dict, as ``posteriors`` gives it) in ``named_parameters`` order; ``None`` when the two agree."""
    if list(spec.names) == sorted(spec.names):
        return None
    offsets, at = {}, 0
    for name in sorted(spec.names):
        offsets[name] = at
        at += spec.numels[spec.names.index(name)]
    return torch.cat([torch.arange(offsets[nm], offsets[nm] + k) for nm, k in zip(spec.names, spec.numels)])


def _warn_if_bank_fits_worse(
    rows_f: Callable[..., torch.Tensor],
    live: torch.Tensor,
    thetas: torch.Tensor,
    rows: Batch,
    spec: ParamSpec | None = None,
    row_chunk: int | None = None,
) -> None:
    """Warn when the stored samples fit held remaining rows far worse than the model's own parameters: a flat
    ``[S, D]`` bank carries no names, and one flattened in another order than ``model.named_parameters()`` (optree's
    ``tree_ravel``, which ``posteriors`` uses, sorts the names: ``0.bias`` before ``0.weight``) is read as other
    parameters entirely (a fitted MLP's sample read so: NLL 2.48 per row against 0.002). Two forward passes."""
    m = rows[0].shape[0]
    step = m if row_chunk is None else max(1, int(row_chunk))

    def nll_at(t: torch.Tensor) -> torch.Tensor:  # under a tight budget the rows in parts (``row_chunk``)
        if step >= m:
            return rows_f(t, *rows)
        return torch.cat([rows_f(t, *(f[i : i + step] for f in rows)) for i in range(0, m, step)])

    with torch.no_grad():
        at_model = float(nll_at(live).double().mean())
        at_bank = float(torch.stack([nll_at(t).double().mean() for t in (thetas[0], thetas[-1])]).mean())
    order = None if spec is None else _sorted_name_order(spec)
    if order is not None:
        # the model's own parameters are no reference where they were never set from the samples (posteriors is
        # functional: the model keeps its initialisation); the bank read in sorted-name order is
        with torch.no_grad():
            at_sorted = float(
                torch.stack([nll_at(t[order.to(t.device)]).double().mean() for t in (thetas[0], thetas[-1])]).mean()
            )
        if math.isfinite(at_sorted) and at_bank > 10.0 * abs(at_sorted) + 0.5:
            warnings.warn(
                f"the stored samples fit the remaining data far worse as given (mean NLL {at_bank:.3g} per row) than "
                f"with their columns read in sorted-name order ({at_sorted:.3g}), the order of optree's tree_ravel "
                "(used by posteriors). A [S, D] bank's columns must follow model.named_parameters(), as "
                "parameters_to_vector gives them. Pass the samples as a dict of stacked tensors {name: [S, ...]} or "
                "a list of state_dicts, which carry their names",
                stacklevel=outside_stacklevel(),
            )
            return
    if math.isfinite(at_model) and at_bank > 10.0 * abs(at_model) + 0.5:
        warnings.warn(
            f"the stored samples fit the remaining data far worse than the model's current parameters (mean NLL "
            f"{at_bank:.3g} per row at the samples against {at_model:.3g} at the model, on {rows[0].shape[0]} held "
            "rows). A [S, D] bank's columns must follow model.named_parameters(), as parameters_to_vector gives them; "
            "optree's tree_ravel (used by posteriors) sorts the names instead. Pass the samples as a dict of stacked "
            "tensors {name: [S, ...]} or a list of state_dicts, which carry their names",
            stacklevel=outside_stacklevel(),
        )


def _default_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model.nll(batch)


def _several_per_row(rows: int, shape: list[int] | str) -> bool:
    """Whether an ``nll`` result of ``shape`` on ``rows`` rows holds several values per row (``[B, 3]`` from an
    unsummed multi-output ``mse_loss(..., reduction="none")``), not a broadcast ``[B, B]`` or a batch reduction."""
    return (
        isinstance(shape, list)
        and len(shape) >= 2
        and shape[0] == rows
        and shape[1] != rows
        and math.prod(shape) > rows
    )


#: The fix :func:`_not_per_row` names for several values per row (stop 70: "without reducing over the batch" was
#: named to a multi-output regression whose ``nll`` already had ``reduction="none"``).
SUM_PER_ROW = (
    "it gives several values per row: sum each row's terms over the other dimensions (e.g. "
    "F.mse_loss(out, y, reduction='none').sum(-1) for a multi-output regression, the same .sum(-1) for a multi-label "
    "binary_cross_entropy_with_logits), a row's negative log-likelihood being the sum of its outputs' terms"
)


def _square_per_row(rows: int, shape: list[int] | str) -> str:
    """For an ``nll`` result ``[rows, rows]``: the sum over each row's terms as a second fix (as many outputs as rows:
    a 3-output regression's unsummed ``mse_loss`` on 3 removed rows gives ``[3, 3]``, read as a broadcast alone and
    told "reduction='none'", what it already did: stop 70's review); else ``""``."""
    if not (isinstance(shape, list) and len(shape) == 2 and shape[0] == shape[1] == rows > 1):
        return ""
    return "; or, where it gives several values per row, sum them: " + SUM_PER_ROW.split(": ", 1)[1]


def _not_per_row(rows: int, shape: list[int]) -> str:
    """What :func:`_one_per_row` says of an ``nll`` that gave ``shape`` for ``rows`` rows."""
    head = f"nll(model, batch) must return one value per row (shape [{rows}] for a batch of {rows} rows), got {shape}: "
    if _several_per_row(rows, shape):
        return head + SUM_PER_ROW
    return head + (
        "compute it without reducing over the batch (e.g. reduction='none'), and give every batch (removed rows and "
        "remaining minibatches) the fields in the same shapes (a label column y[:, None] against outputs [B] "
        "broadcasts to [B, B])" + _square_per_row(rows, shape)
    )


def _one_per_row(nll: Callable[[nn.Module, Batch], torch.Tensor]) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """``nll`` with a ``[B, 1]`` output (``mse_loss(out, y, reduction="none")`` on ``[B, 1]`` outputs) read as
    ``[B]``; any other shape is passed on (a wrong one is refused by the first request's check)."""

    @functools.wraps(nll)
    def rows(model: nn.Module, batch: Batch) -> torch.Tensor:
        out = nll(model, batch)
        if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] == 1:
            return out.reshape(out.shape[0])
        rows_in = batch[0].shape[0] if len(batch) and isinstance(batch[0], torch.Tensor) and batch[0].ndim else None
        if (
            rows_in is not None
            and isinstance(out, torch.Tensor)
            and (out.numel() != rows_in or (out.ndim > 1 and out.shape[0] != rows_in))
        ):
            # checked on every call, not only on the first request's removed rows: a label given as a column [B, 1]
            # later (or in the remaining data) broadcasts to [B, B] and silently changed every energy and gradient
            err = ValueError(_not_per_row(rows_in, list(out.shape)))
            err.nll_shape = list(out.shape)  # type: ignore[attr-defined]  # (_check_nll's passes: the whole's words)
            raise err
        return out

    return rows


#: ``info["unresolved"]`` (:meth:`MCMCUnlearner._unresolved`): the least damped step's measured change is "clear", a
#: measurement and not noise, beyond the rounding and this many of the check's standard errors. That error is the rows'
#: alone (the check's few draws add theirs): 80 steps below the float32 resolution of a digits MLP (their predicted
#: changes 10⁻¹⁶–10⁻⁵ of an error) measured ``actual/stderr`` spread 1.3, up to ±3.8 (tests/test_gate.py); the quick
#: matrix's LeNet-5 (seed 1), rejected on a measurement, read a rise of 5.0·10⁸ against errors of 1.8–3.7·10⁷ (14–27).
UNRESOLVED_MEASURED_Z = 5.0

#: Posterior draws of the safety check by default (``MCMCUnlearner(check_draws=...)``; fewer where the bank is smaller,
#: recorded as ``report.info["check_draws_capped"]``).
CHECK_DRAWS = 8


#: ``backend="auto"`` takes per-draw derivatives one draw at a time rather than batched through ``vmap`` where the
#: loop is faster (``benchmarks/draw_batching.py``, one thread, best of 5; :func:`loop_over_draws`). The removed
#: rows' gradients (16 draws × 64 rows): from this many parameters, where the work per draw dominates (a
#: 1.2M-parameter ResNet 1.4× faster looped; MLPs of 8,970-85,002 parameters 1.5-2.3× faster vmapped) ...
LOOP_DRAWS_FROM_DIM = 2**17
#: ... and from this many with a convolution, which ``vmap`` runs with batched weights as one grouped convolution,
#: slow when the channels are few (LeNet-5, 61,706 parameters: 1.4× faster looped; at 21,386 about even, 0.9×). The
#: safety check (a forward pass and a forward-mode derivative at 8 draws × 256 rows per trial) loops for a
#: convolutional network between the two thresholds: LeNet-5 1.5× faster looped (at 21,386 parameters 1.1-1.2×),
#: while MLPs below ``LOOP_DRAWS_FROM_DIM`` are 1.45-1.9× faster vmapped and a 994-parameter CNN 1.3×. On
#: Fashion-MNIST's 94 requests (LeNet-5) both loops took 12% less CPU time in all.
LOOP_CONV_DRAWS_FROM_DIM = 2**14
#: From this many parameters the safety check takes its rows' linear term by a one-sided difference (stop 37,
#: ``EnergyCheck(linear="onesided")``: one forward pass at ``θ_s + εx`` beside the two the check makes anyway; on the
#: model matrix's ResNet, eight requests interleaved with central differences took the same trials and dampings, the
#: one-trial requests 0.59 against 0.67 s CPU, ``benchmarks/request_ab.py``). Stop 36 took central differences
#: (``EnergyCheck(linear="difference")``: two forward passes, where torch's forward mode cost 5.3 forward passes on a
#: 1.2M-parameter ResNet, and its prior term's forward mode 20 ms a draw there in making the dual tensor) and loops
#: over draws like the removed rows' gradients. In a request sequence on that ResNet, interleaved with the previous
#: rule in one process (``benchmarks/check_linear.py``): the first request 4.07 against 5.87 s CPU, steady-state
#: requests 0.94 against 1.00 s (the check 0.34 against 0.39 s), the same trials and dampings; one trial
#: timed apart on MLPs of 0.20M / 0.30M / 1.3M parameters 35 / 66 / 247 ms against 46 / 91 / 405 ms (one thread; the
#: measured energy change within 0.29 of its standard error of forward mode's, untrained ResNet, random steps).
CHECK_DIFFERENCE_FROM_DIM = LOOP_DRAWS_FROM_DIM
#: ... and from this many with a convolution, where the check loops over draws (stop 37): on LeNet-5 (61,706
#: parameters, 8 draws × 256 rows, one thread) a trial took 134 ms (206 ms the first, which also measures ``h(θ_s)``)
#: against forward mode's 303 ms (``check_linear_rule``).
CHECK_ONESIDED_CONV_FROM_DIM = LOOP_CONV_DRAWS_FROM_DIM


def mean_and_half_difference(grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of per-draw gradients ``[S, D]`` and half the difference of the means of their first and second
    halves (a draw of the mean's Monte-Carlo error; zero for one draw)."""
    G = grads.mean(0)
    half = grads.shape[0] // 2
    return G, (0.5 * (grads[:half].mean(0) - grads[half:].mean(0)) if half >= 1 else torch.zeros_like(G))


def lag_sums(grads: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
    """``[Σ‖g_{t+1} − g_t‖², pairs, Σ‖g_t‖², draws]`` of consecutive draws ``grads`` ``[S, D]``, in float64,
    counting only pairs that end in ``grads`` when ``before`` holds the draw that precedes them, so that chunks of
    draws add up to the sums over all draws (see :func:`chain_error_factor`)."""
    g = grads.double()
    out = torch.zeros(4, dtype=torch.float64)
    d = g[1:] - g[:-1]
    if before is not None:
        d = torch.cat([g[:1] - before[-1:].double(), d])
    out[0], out[1] = float((d**2).sum()), d.shape[0]
    out[2], out[3] = float((g**2).sum()), g.shape[0]
    return out


def _ar1_weights(S: int, rho: float) -> tuple[float, float]:
    """For ``S`` draws of a stationary AR(1) sequence of lag-1 correlation ``rho`` and unit variance: the variance
    of their mean ``wᵀRw`` and that of half the difference of their halves' means ``dᵀRd``."""
    i = torch.arange(S, dtype=torch.float64)
    R = rho ** (i[:, None] - i[None]).abs()
    half = S // 2
    w = torch.full((S,), 1.0 / S, dtype=torch.float64)
    d = torch.cat(
        [torch.full((half,), 0.5 / half, dtype=w.dtype), torch.full((S - half,), -0.5 / (S - half), dtype=w.dtype)]
    )
    return float(w @ R @ w), float(d @ R @ d)


def chain_error_factor(sums: torch.Tensor, mean: torch.Tensor) -> tuple[float, float]:
    """How much larger the Monte-Carlo error of the mean of ``S`` consecutive states of one chain is than the
    half-difference of their two halves says (which assumes independent draws), and the lag-1 correlation ρ it
    reads, from the draws' own :func:`lag_sums` and their mean gradient ``mean``.

    The draws are taken as a stationary AR(1) sequence (consecutive SG-MCMC states: ρ ≈ 1 − lr·λ along a
    curvature λ): with ``V = E‖g_{t+1} − g_t‖² = 2σ²(1 − ρ)`` and the spread about the draws' mean
    ``E Σ‖g_t − ḡ‖² = Sσ²(1 − wᵀRw)`` (``R_ij = ρ^|i−j|``, ``w`` the mean's weights), their ratio is a function of ρ
    alone, increasing from ``(S − 1)/2`` at ρ = 0 to ``(S² − 1)/6`` for a random walk; ρ is read off it, and the
    factor is ``√(wᵀRw / dᵀRd)``, ``d`` the half-difference's weights. The half-difference of consecutive states sees
    only how far the chain moved during the draws: on a conjugate regression at ``samp_T=5`` it was 6.6× under the
    shift's spread over 40 chains. The draws cannot tell a correlation time beyond about ``S²`` steps from a random
    walk, whose error they do not bound at all: ρ is at most ``1 − 1/S²`` (a factor of 5.2 at S = 5, 11 at S = 20).
    Fewer than 3 draws: 1 (nothing to read ρ from)."""
    v, pairs, sq, S = (float(t) for t in sums)
    S = int(S)
    spread = sq - S * float((mean.double() ** 2).sum())
    if S < 3 or pairs == 0 or not v > 0 or not math.isfinite(v + spread):
        return 1.0, math.nan
    q = max(spread, 0.0) / (S * 0.5 * v / pairs)  # Σ‖g − ḡ‖² / (S·V/2) = (1 − wᵀRw)/(1 − ρ)

    def ratio(rho: float) -> float:
        return (1.0 - _ar1_weights(S, rho)[0]) / (1.0 - rho)

    lo, hi = 0.0, 1.0 - 1.0 / S**2
    if q <= ratio(lo):
        rho = lo
    elif q >= ratio(hi):
        rho = hi
    else:
        for _ in range(50):  # the ratio increases with ρ
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if ratio(mid) < q else (lo, mid)
        rho = 0.5 * (lo + hi)
    m, h = _ar1_weights(S, rho)
    return math.sqrt(m / h), rho


#: Copies of one draw's gradient (``D`` numbers) a per-draw gradient holds besides what autograd saves: the
#: parameters' gradients, their flat concatenation and the chunk's result (see ``MCMCUnlearner._grad_plan``).
GRAD_COPIES = 3
#: What one draw's gradient holds per byte autograd saves in an unbatched call (the saved tensors and the backward
#: pass's own): an attention layer under ``vmap`` measured 1.4× twice its saved bytes (its batched kernels keep
#: more than the unbatched ones the probe sees), MLPs and CNNs about 1×.
GRAD_SAVED_FACTOR = 3


def check_linear_rule(model: nn.Module, dim: int) -> str:
    """How the safety check takes its rows' linear term (``EnergyCheck(linear=...)``): the one-sided difference
    from ``CHECK_DIFFERENCE_FROM_DIM`` parameters, or ``CHECK_ONESIDED_CONV_FROM_DIM`` with a convolution (where the
    check loops over draws and forward mode's per-call cost is not shared by a batch of draws), else forward mode."""
    conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return "onesided" if dim >= CHECK_DIFFERENCE_FROM_DIM or (conv and dim >= CHECK_ONESIDED_CONV_FROM_DIM) else "jvp"


def loop_over_draws(model: nn.Module, dim: int, check: bool = False) -> bool:
    """Whether ``backend="auto"`` takes per-draw derivatives of ``model`` (``dim`` parameters) one draw at a time:
    from ``LOOP_DRAWS_FROM_DIM`` parameters, or ``LOOP_CONV_DRAWS_FROM_DIM`` with a convolution (the safety
    ``check`` alike: there its linear term is a one-sided difference, :func:`check_linear_rule`, looped faster)."""
    conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    if check:
        return (conv and LOOP_CONV_DRAWS_FROM_DIM <= dim) or dim >= CHECK_DIFFERENCE_FROM_DIM
    return dim >= LOOP_DRAWS_FROM_DIM or (conv and dim >= LOOP_CONV_DRAWS_FROM_DIM)


#: Row-draw gradients one equilibrium Newton step may take on every remaining row (fewer bank draws, not fewer rows,
#: when the data set is large: a gradient on a subset of rows scaled to ``n`` is far noisier than one on fewer draws).
NEWTON_ROW_DRAWS = 2**18
#: ``newton_steps="auto"``: at most this many steps (the influence step included) ...
NEWTON_AUTO_STEPS = 100
#: ... taken only where the bank's own first-moment gap to equilibrium, ``‖E_s[∇F(θ_s, S)]‖`` on every row, is at most
#: this fraction of the removal's ``‖G‖`` (the quick model matrix: a tanh regression losing 64 gross outliers 0.07-0.17,
#: where the steps bring its kept-data RMSE from 52% off retraining's to 9-13%; the class removals and the backdoor
#: 0.55-2.2, where the steps chase the bank's own gap: the digits MLP's kept error 0.5 -> 2.0 points) ...
NEWTON_AUTO_BANK_GAP = 1 / 3
#: ... and while their gradient passes over every remaining row (the gap's pass included) take at most this many times
#: ``NEWTON_ROW_DRAWS`` row-draw gradients in all: a counted budget, so that the same request on the same data gives the
#: same bank on a loaded machine as on an idle one (a budget of 3x the influence step's CPU time stopped the quick
#: matrix's regression after 54-72 steps from run to run). There each pass is 736 rows at 50 draws: at 10 (stops 60-67)
#: the gap's pass and 70 steps, kept RMSE 11.3% / 13.2% off retraining's (seeds 0 / 2, rows listed), not converged;
#: at 20 (stop 67) ``NEWTON_AUTO_STEPS`` stops them first, 9.0% / 8.8% (30 gives the same bank), the further steps
#: 2.8-3.7x the request's CPU before them (``NEWTON_AUTO_COST``'s cap, off by default, set to 6x leaves them).
#: Where two draws fill ``NEWTON_ROW_DRAWS`` on every row: the gap's pass and 19 steps.
NEWTON_AUTO_PASSES = 20
#: ... and while their gradient passes (the gap's included) take at most this many FLOPs in all, counted once per
#: request by ``torch.utils.flop_counter.FlopCounterMode`` on one draw's gradient over a few rows
#: (:meth:`MCMCUnlearner._row_draw_flops`) and multiplied by the passes' row-draw gradients (a draw's own FLOPs, its
#: prior's, counted apart and multiplied by the passes' draws; stop 68's review): the budget above counts
#: row-draw gradients, not what one costs (stop 66's GRU regression: 72 passes of 600 rows x 60 draws, 39 CPU s
#: against the quick matrix regression's 5 s for 100 passes of 736 x 50). Counted, so the same request on the same data
#: gives the same bank on any machine's load (stop 67's timed cap, ``NEWTON_AUTO_COST``, did not). Stop 68 (one
#: torch thread): the quick matrix regression (2-32-32-1 tanh MLP) counts 6,592 FLOPs a row-draw gradient, its gap's
#: pass and 99 steps 2.43e10 (a pass of 736 rows x 50 draws 2.43e8), so 3e10 leaves it its 100 steps and its bank
#: (kept RMSE 9.0% / 8.8% off retraining with its rows listed); a two-layer GRU regression (8 hidden units, 10-step
#: sequences, 600 rows x 60 draws) counts 34,800 (1.25e9 a pass): 23 steps, not 100, its request 62.3 -> 24.3 CPU s
#: (the gate's steps; 24.8 with newton_steps='auto') against a 14.7 s retrain chain, kept RMSE 0.198 -> 0.219
#: (retraining 0.231). FLOPs miss a recurrence's per-operation cost (5.3x the MLP's row in FLOPs, ~12x in time): a
#: bound on counted work, not on seconds.
#: ``None``: no FLOP budget.
NEWTON_AUTO_FLOPS: float | None = 3e10
#: The rows :meth:`MCMCUnlearner._row_draw_flops` counts one draw's gradient on (FLOPs grow with the rows; and on
#: half of them, which parts a row's FLOPs from a draw's own).
NEWTON_FLOP_ROWS = 16
#: ``newton_gate``'s further steps (taken on the library's own decision, not asked for) also stop before their CPU
#: time (the gap's pass and each step's pass and damping search, measured) would pass this many times the request's
#: CPU time before them (its gradient, curvature, first step and gate), or ``NEWTON_AUTO_COST_FLOOR`` CPU seconds
#: where that is more: a cost cap where a row-draw gradient is dear. Stop 66's probe: a GRU regression's 71 further
#: steps took 39 CPU s (0.41 s a pass of 600 rows at 60 draws, 12x the quick matrix regression's at the same count)
#: after 7 s before them, against a 4.3 s retrain chain (6x; ~10x at 100 steps; at 6x: 68 steps, 41 s after 6.9 s,
#: a 49 s request, kept RMSE 0.193 against 0.197 at 4x's 35 steps and 33 s). The quick matrix regression's 99
#: (``NEWTON_AUTO_PASSES`` = 20) take 2.8-3.2x the request's before them with its rows listed and 3.5-3.7x through an
#: iterator (stop 67, shared cores): the factor sits between the two, ~1.6x from each, so the cap leaves the regression
#: alone (at 4x, stop 67's first value, its iterator runs came within 7% of it). Timed, not counted: where it binds,
#: the number of steps (and so the bank) can differ from run to run with the machine's load (``info["newton_stop"]``);
#: ``newton_steps="auto"``, asked for, keeps the counted budget alone and the same bank on any machine.
#: **Off by default** (``None``; set a factor, e.g. 6.0, to cap): stop 67's CI on a clean clone, its 2 cores shared by
#: two test workers and torchrun ranks, gave the quick matrix regression a different bank in two runs of one process
#: (``tests/test_model_matrix.py``'s layouts test, max difference 0.014), where every run alone or beside busy loops
#: gave the same 100 steps at 3.5x: a default whose bank depends on the machine's load is not one to keep.
NEWTON_AUTO_COST: float | None = None
#: ... the cap's least CPU seconds: a few seconds are not what the cap is for, and below them the ratio is the
#: timer's noise and one-off costs (a 300-row logistic regression's gap pass took 1.5x its 0.03 s request).
NEWTON_AUTO_COST_FLOOR = 5.0
#: ``newton_gate`` (the default ``newton_steps=1``): ``"auto"``'s further steps are taken where a sampled estimate of
#: the bank's gap, ``‖e₀‖²`` on ``NEWTON_GATE_SHARE`` of the remaining rows in ``NEWTON_GATE_GROUPS`` groups at
#: ``"auto"``'s draws, each row's gradient less its gradient at the draws' mean (a control variate whose sum over
#: every row is one draw's pass), lies ``newton_gate`` standard errors below ``(NEWTON_AUTO_BANK_GAP·‖G‖)²``. Stop 64
#: (one torch thread): the quick matrix's regression (gap 0.17 / 0.07) fired on every subsample, the heteroscedastic
#: Gaussian (0.17) on 80%; the class removals (gap 0.55-2.8: the sampled estimate's error is larger than the
#: threshold) and the next-token model (0.88) on none, at 2-7% of a request.
NEWTON_GATE_SHARE = 0.1
NEWTON_GATE_GROUPS = 8
#: The share of each group the estimate looks at first (:meth:`MCMCUnlearner._gap_gate`): it decides there where it
#: fires, where the gap is clearly large, and where even the whole group's smaller error could not fire. Stop 65
#: (quick matrix seed 0): LeNet-5's class removal, whose estimate's error is ~170× the threshold, spent 1.43 CPU s
#: (31% of its request) on the whole groups.
NEWTON_GATE_FIRST = 0.25
#: ... at this many of the draws: a draw costs more than its few rows (each draw's call on a group's 4 rows ~40-60
#: rows' worth of one draw's pass, LeNet-5 and the ResNet alike), so the first look's draws, not its rows, were its
#: cost. Stop 66 (quick matrix seed 0, `--remaining loader`): 8 -> 2 cut the gate's CPU on the ResNet 1.58 -> 0.84 s,
#: the transformer 0.22 -> 0.08 s, LeNet-5 0.13 -> 0.08 s, every verdict the same (fewer draws only add their
#: Monte-Carlo error to ``‖e₀‖²``: firing stays conservative)
NEWTON_GATE_FIRST_DRAWS = 2
#: ... and through a stream (rows that cannot be listed), where the groups are read one at a time and stopped once
#: the verdict is clear (:func:`_gap_early_stop`): there a pass of a group's rows at ``θ̄`` costs more than the first
#: look's draws, and fewer draws widen the first look's error so that more groups are read (the far removal's Laplace
#: bank through an iterator: 3 groups at 8 draws, 5 at 2)
NEWTON_GATE_SAMPLED_FIRST_DRAWS = 8
#: ``newton_gate``'s default
NEWTON_GATE_Z = 3.0
#: Remaining rows that cannot be listed (a plain iterator of minibatches): the gate's estimate reads this many times
#: ``n`` rows from the stream, taken as a with-replacement sample of the remaining rows
#: (:meth:`MCMCUnlearner._gap_sample`), each at the draws' mean (one draw; the groups' term there), ``n`` of them at the
#: draws (the further steps' rows)
NEWTON_GATE_STREAM_PASSES = 8
#: Most bytes :func:`_distinct_rows` holds at a time (a chunk of rows' 16-bit words as float64, 4 per byte, and the
#: chunk's rows gathered for the comparison)
DISTINCT_CHUNK_BYTES = 2**26
#: :meth:`MCMCUnlearner.fit` records its data's mean NLL at this many evenly spaced stored samples, on at most
#: ``FIT_DATA_ROWS`` rows; the request after it rebuilds the curvature when its remaining rows' clearly differs (by
#: more than ``FIT_DATA_REL`` of the larger and ``FIT_DATA_Z`` standard errors): fit was given other data.
FIT_DATA_DRAWS = 4
FIT_DATA_ROWS = 256
#: Removed rows the first request's forward check (:meth:`MCMCUnlearner._check_forward`) evaluates ``nll`` on.
FORWARD_CHECK_ROWS = 4
#: Its tolerance, in epsilons of the parameters' dtype: two evaluations of the same operations agree to rounding.
FORWARD_CHECK_EPS = 1e3
#: The rows-alone test (:meth:`MCMCUnlearner._row_check`) refuses only above this gap, relative to ``1 +`` the
#: largest value (and above ``FORWARD_CHECK_EPS`` epsilons): the defects it exists for gave 0.093–1.4 (a per-row
#: loss divided by the batch size; 0.093 on one well-fitted row, doubled), 0.41–0.75 (an in-batch softmax) and up to
#: 0.79 (batch-counted class weights) on the tests' MLP, 0.25–15 in stop 56's probe, while a per-row regression on
#: unstandardised targets gives rounding gaps that grow with the prediction's size (float32, a 32-256-256-1 MLP,
#: 50 requests of 4 rows, stop 56's review: at most 1.7e-4 at |y| ~ 3e3, 6.9e-4 at 1e4, 5.5e-3 at 1e5, and 0.064 at
#: 1e6, where 21 of 50 were refused). A larger gap without the batch-size pattern is measured again in float64
#: (:meth:`MCMCUnlearner._row_check_double`: rounding shrinks 2^29-fold, a row reading its batch does not; at 1e6
#: the float64 gaps were at most 8.7e-11, 0 of 50 refused) and refused only if still above this threshold (or
#: where float64 cannot run: the float32 verdict stands). A smaller gap above the float tolerance is reported
#: (``report.info["forward_row_gap"]``, and ``"forward_row_gap_float64"`` where float64 cleared one above this),
#: not refused, unless the rows follow the batch-size pattern (each row's value alone the batch size times its
#: value in the batch: refused whatever the gap; removed rows fitted to 2.7e-3-6.5e-3 nats gave
#: ``nll / len(batch)`` a gap of 4.8e-3, stop 56's second review).
FORWARD_ROWS_REFUSE = 1e-2
#: Rows of the first remaining minibatch that the removed check rows are mixed with, or, where the two cannot be
#: joined, that are compared among themselves (:meth:`MCMCUnlearner._check_mixed_rows`).
MIXED_CHECK_ROWS = 28
FIT_DATA_REL = 1 / 3  # the larger 1.5x the smaller
FIT_DATA_Z = 3.0

#: ``recenter_every="auto"``: a correction every this many requests with ``solver="kfac"`` (else none).
RECENTER_AUTO_EVERY = 10
#: The Gaussian transport of the bank's spread (``bank_shift="affine"``) is not applied when the remaining-data energy
#: it adds at the check's draws exceeds the curvature's prediction by this many standard errors and by
#: ``TRANSPORT_SLACK`` of the spread's energy (:meth:`MCMCUnlearner._spread_refused`, stop 46).
TRANSPORT_Z = 3.0
TRANSPORT_SLACK = 0.1
#: Stored samples (evenly spaced; at least the check's draws) at which ``bank_shift="sample"``'s own terms are
#: measured.
SPREAD_CHECK_DRAWS = 32

#: Fewest anchored samples at which ``recenter_every`` accumulates the removed points' gradient (as a request's ``G``).
RECENTER_REMOVED_DRAWS = 16
#: ``recenter_draws="auto"``: the paired first moment is measured draw by draw, from 2 up to this many stored samples,
#: until its Monte-Carlo standard error is at most ``RECENTER_REL_SE`` of the deviation's norm (the deviation is then
#: clear of its noise); a deviation that never gets there is not corrected. Later corrections start from one draw and
#: take its error from the spread the last measurement found (``_carried_spread``), for at most
#: ``RECENTER_CARRY_MAX`` corrections in a row: the one after measures again (on Fashion-MNIST the measured one-draw
#: error grew 1.6–2.6× over a sequence's eight later corrections, the carried one 1.1–1.4×: the carried model's
#: shortfall compounds, so it is refreshed every third correction; re-measured there after two carried corrections it
#: had fallen behind by a median 1.27×, 11 times of 12).
RECENTER_MAX_DRAWS = 8
RECENTER_REL_SE = 0.5
RECENTER_CARRY_MAX = 2
#: A correction's step is taken only when its measured energy change meets the ratio test at its upper
#: ``RECENTER_ACCEPT_Z``-standard-error bound (``DampingControl(accept_z=...)``); else its damping grows. A request must
#: move, a correction need not: on Fashion-MNIST (seed 0, stop 28) a last correction at one draw was accepted at ratio
#: 0.35 on a measured change of −620 ± 592, a step five times longer than any before it, and took the kept classes
#: from 1.66 to 3.92× the retrain-pair distance.
RECENTER_ACCEPT_Z = 2.0
#: ... and only when the energy change measured directly (without the control variate, which credits a step for
#: following the deviation's Monte-Carlo error) does not show a rise by more than ``RECENTER_DIRECT_Z`` standard
#: errors (``DampingControl(direct_z=...)``). On Fashion-MNIST (seed 8, stop 35) a last correction at one draw passed
#: the ratio test at −1409 ± 282 while the direct measurement read +1412 ± 618, and took the kept classes from 1.79
#: to 2.82× the retrain-pair distance.
RECENTER_DIRECT_Z = 2.0
#: Copies of every check draw's gradient the safety check forms when it takes every row at once (the moved draws,
#: their gradients, the prior's: ``MCMCUnlearner._check_plan``).
CHECK_D_COPIES = 3
#: Copies of the parameters the smallest request holds (live draw, ``G``, its error, the step, a summed gradient,
#: the per-draw gradient, the draw moved, a solve's workspace): with one row's derivatives, the floor below which a
#: request is refused before anything runs (``MCMCUnlearner._request_floor``).
REQUEST_D_COPIES = 8
#: Copies of the bank (``[S + 1, D]``: the samples and the live draw) ``bank_shift="sample"`` holds when it solves
#: every sample at once (their gradients, the solve's right-hand sides, solutions and workspace, the moved samples):
#: 8.6-9.5 measured (K-FAC, 64 samples of a 301k-parameter MLP: 730 MB against a 64 MB budget). Beyond the budget
#: the samples are solved in chunks beside ``SAMPLE_SHIFT_RESERVE`` copies (the samples with the live draw, the
#: moved ones and the request's checks on them: 3.6 measured). The mean shift's one copy, ``bank + x``, is the
#: request's result (0.3 copies beside it measured), as a gradient's output is.
SAMPLE_SHIFT_COPIES = 10
SAMPLE_SHIFT_RESERVE = 4
#: Rows per pass of its first-moment measurement, at most (bounds its memory; on LeNet-5, 512–2,048-row chunks were no
#: slower than 4,096 on an earlier machine) ...
RECENTER_ROW_CHUNK = 1024
#: ... and fewer where one pass would save more than this for its backward pass (``MCMCUnlearner._moment_rows``): a
#: pass whose activations outgrow the CPU's last-level cache is slower per row (LeNet-5 saves 49 kB a row; on a 32 MiB
#: L3, one thread, 1,024-row passes took 97–112 µs a row against 59–64 µs at 128–512 rows; the ResNet of the model
#: matrix, 20 kB a row, was fastest at 256–512). ``benchmarks/moment_chunk.py`` times both.
MOMENT_CHUNK_BYTES = 16 * 2**20
#: The fewest rows per pass of the first-moment measurement that the cache rule may leave (per-call costs).
MOMENT_MIN_ROWS = 32


@dataclass(frozen=True)
class _Anchor:
    """What ``recenter_every`` restores (:meth:`MCMCUnlearner._recenter`), fixed at the first request.

    Attributes:
        index: Bank rows ``M`` at which the removed points' gradient is accumulated.
        thetas: Those samples as they were before the first request, ``θ⁰`` ``[M, D]``.
        pair: Positions in ``index`` of the paired samples ``P``, in the order they are measured (spread over the
            chain first: consecutive samples are correlated).
        removed: ``Σ_requests E_{s∈M}[Σ_{z∈batch} ∇h(θ⁰_s, z)]``.
        moment: ``∇F(θ⁰_s, ·)`` for each paired sample ``s`` ``[P, D]``, on the rows that remained when it was
            measured (``None`` before the first correction: a sequence that never reaches one never pays for the pass
            over the data; a row is zero until its draw is first used).
        removed_pair: ``Σ_{z∈batch} ∇h(θ⁰_s, z)`` summed over the requests since that draw's ``moment`` ``[P, D]``.
        measured_draws: Which rows of ``moment`` hold a measurement ``[P]``.
        applied: Corrections applied so far (skipped ones not counted).
        spread: Monte-Carlo standard deviation of one paired draw's difference (the trace's square root), as the
            last correction that measured two or more draws found it (``None`` before).
        spread_shift: The anchored samples' mean displacement ``‖θ'_s − θ⁰_s‖`` when ``spread`` was measured.
        carried: Corrections since ``spread`` was measured that stopped at one draw on it (at most
            ``RECENTER_CARRY_MAX``; the next one measures again).
        count: Requests since the last correction (a tensor, so it is saved with the state: a service that loads
            the unlearner for each request keeps counting).
        removed_noise: ``Σ_requests √f·Σ_{z∈batch} ∇h(θ⁰_s, z)`` per anchored sample ``[M, D]``, ``f`` the factor by
            which the variance of ``removed`` (a mean over the ``M`` anchored samples) differs from that of the
            request's ``G`` (a mean over its own draws): its spread is the Monte-Carlo error the deviation carries
            from comparing the two (``None`` while every request's ``G`` used the anchored samples themselves).
        drawn: Flat indices of the entries drawn from the prior's conditional since the anchor was set (embedding
            rows no remaining row reads, README step 6; ``None``: none), where the correction is zero: along them
            ``θ⁰`` still holds the rows before the draw, and the target there (a prior-gradient identity) pulled a
            drawn row back toward where the influence step had left it.
    """

    index: torch.Tensor
    thetas: torch.Tensor
    pair: torch.Tensor
    removed: torch.Tensor
    moment: torch.Tensor | None = None
    removed_pair: torch.Tensor | None = None
    measured_draws: torch.Tensor | None = None
    applied: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    spread: torch.Tensor | None = None
    spread_shift: torch.Tensor | None = None
    carried: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    count: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    removed_noise: torch.Tensor | None = None
    drawn: torch.Tensor | None = None

    def drawing(self, index: torch.Tensor) -> _Anchor:
        """With the flat entries ``index`` (drawn from the prior this request) added to ``drawn``."""
        index = index.long().cpu()
        both = index if self.drawn is None else torch.cat([self.drawn, index])
        return replace(self, drawn=torch.unique(both))

    def removing(self, grads: torch.Tensor, g_index: torch.Tensor | None) -> _Anchor:
        """With one more request's per-sample removed gradients ``[M, D]`` at ``thetas`` accumulated.

        ``g_index``: the bank samples the request's ``G`` averaged (``None``: draws of the live chain, none of them
        anchored). The two means differ by Monte-Carlo error of variance ``f·σ²/M`` with
        ``f = 1 + M/g − 2·o/g`` (``g`` draws, ``o`` of them anchored): 0 when they are the same samples.
        """
        pair = None if self.moment is None else self.removed_pair + grads[self.pair]
        m = self.index.numel()
        if g_index is None:
            g, o = math.inf, 0
        else:
            g, o = g_index.numel(), int(torch.isin(g_index, self.index).sum())
        f = max(0.0, 1.0 + m / g - 2.0 * o / g)
        noise = self.removed_noise
        if f > 1e-12:
            noise = math.sqrt(f) * grads if noise is None else noise + math.sqrt(f) * grads
        return replace(
            self, removed=self.removed + grads.mean(0), removed_pair=pair, count=self.count + 1, removed_noise=noise
        )

    def removed_stderr(self) -> float:
        """Monte-Carlo standard error (norm) of ``removed`` against the requests' own ``G`` (see ``removed_noise``),
        the ``drawn`` entries left out as every other measurement of the deviation leaves them (no correction
        there, so their noise is none of the deviation's)."""
        q = self.removed_noise
        if q is None or q.shape[0] < 2:
            return 0.0
        if self.drawn is not None:
            q = q.index_fill(-1, self.drawn.to(q.device), 0.0)
        return float((q.var(0).sum() / q.shape[0]).sqrt())

    def measured(self, j: int, moment: torch.Tensor) -> _Anchor:
        """With paired draw ``j``'s ``∇F(θ⁰_s, ·)`` measured on the rows that remain now."""
        if self.moment is None:
            m = moment.new_zeros(self.pair.numel(), moment.numel())
            rp, done = torch.zeros_like(m), torch.zeros(self.pair.numel(), dtype=torch.bool)
        else:
            m, rp, done = self.moment.clone(), self.removed_pair.clone(), self.measured_draws.clone()
        m[j], rp[j], done[j] = moment, 0.0, True
        return replace(self, moment=m, removed_pair=rp, measured_draws=done)

    def target(self, j: int) -> torch.Tensor:
        """``∇F(θ⁰_s, S∖S')`` of paired draw ``j``: what ``∇F(θ'_s, S∖S')`` is compared with."""
        return self.moment[j] - self.removed_pair[j]

    def not_finite(self) -> list[str]:
        """The floating-point parts holding NaN or infinite values (a saved state with one is refused at the load)."""
        parts = ((f.name, getattr(self, f.name)) for f in fields(self))
        return [k for k, v in parts if v is not None and v.is_floating_point() and not all_finite(v)]


def _spread_order(k: int) -> torch.Tensor:
    """``0..k-1`` in an order that halves the gaps first (0, k/2, k/4, 3k/4, …)."""
    keys = [int(f"{i:016b}"[::-1], 2) for i in range(k)]
    return torch.tensor(sorted(range(k), key=lambda i: (keys[i], i)), dtype=torch.long)


def _carried_spread(anchor: _Anchor, shift: float) -> float | None:
    """One paired draw's Monte-Carlo standard error as the last correction measured it, scaled to the anchored
    samples' displacement since (never down), or ``None`` where there is none to carry.

    To first order the paired difference of one draw is ``∇F(θ⁰_s + Δ) − ∇F(θ⁰_s) ≈ H_s Δ`` for the displacement
    ``Δ`` the bank has taken since the first request, so its spread over draws, ``(H_s − E H) Δ``, grows in
    proportion to ``‖Δ‖``.
    """
    if anchor.spread is None or anchor.spread_shift is None or not float(anchor.spread_shift) > 0:
        return None
    return float(anchor.spread) * max(1.0, shift / float(anchor.spread_shift))


def _gap_gate_bytes(pts: torch.Tensor) -> int:
    """Memory the Newton gate's estimate may hold at once, checked against ``memory_budget`` before it is made: a
    pass of :meth:`MCMCUnlearner._moment` (``MOMENT_CHUNK_BYTES`` of rows' saved activations) twice over, and four
    copies of the draws' gradients (``[draws, parameters]``: the draws, their gradients, the sums and the groups').
    Stop 65's CI: without it a K-FAC request under a 16 MB (8 MB) budget peaked at 19.7 MB (10.2 MB)."""
    return 2 * MOMENT_CHUNK_BYTES + 4 * pts.numel() * pts.element_size()


def _gap_estimate(us: torch.Tensor, per: int, rows: int) -> tuple[float, float]:
    """``‖e₀‖²`` from ``B`` disjoint groups' estimates ``us`` (``B × d``) of ``e₀``, each on ``per`` of ``rows``
    rows: ``Σ_{b≠c} u_b·u_c / (B(B−1))`` plus the finite-population term (``per/rows`` times the groups' spread;
    disjoint groups are anticorrelated: ``E[u_b·u_c] = ‖e₀‖² + C`` with ``C = −σ²/(rows−1)``, the rows' variance
    ``σ²`` scaled to ``u``, and the spread estimates ``V − C = σ²·rows/((rows−1)·per)``, ``V`` a group's variance, so
    ``per/rows`` of it is ``−C``; groups covering every row give ``‖e₀‖²`` exactly), and its jackknife standard error
    over the groups."""
    B = us.shape[0]
    tot, sq = us.sum(0), (us * us).sum(1)

    def cross(tot: torch.Tensor, sq: float, k: int) -> float:
        return float(tot @ tot - sq) / (k * (k - 1))

    spread = float(((us - us.mean(0)) ** 2).sum()) / (B - 1)
    est = cross(tot, float(sq.sum()), B) + per / rows * spread
    loo = torch.tensor([cross(tot - us[b], float(sq.sum() - sq[b]), B - 1) for b in range(B)], dtype=torch.float64)
    return est, float(((B - 1) / B * ((loo - loo.mean()) ** 2).sum()).sqrt())


def _upper_quantile(sf: Callable[[float], float], p: float) -> float:
    """The ``x ≥ 0`` where a decreasing survival function ``sf`` equals ``p`` (bisection to double precision)."""
    if not p > 0:  # (Φ(−z) underflows only past z ≈ 38): no finite bound
        return math.inf
    lo, hi = 0.0, 1.0
    while sf(hi) > p:
        if hi > 1e300:  # p below what a finite x reaches in double precision
            return math.inf
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sf(mid) > p else (lo, mid)
        if hi - lo <= 1e-15 * hi:
            break
    return (lo + hi) / 2


def _chi2_sf(df: int, x: float) -> float:
    """``P(χ²_df > x)``, the regularized upper incomplete gamma ``Q(df/2, x/2)``."""
    return float(
        torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64))
    )


def _t_sf(df: int, t: float) -> float:
    """``P(T_df > t)`` for ``t ≥ 0`` and a whole number of degrees of freedom: ``(1 − A)/2`` with ``A = P(|T| ≤ t)``
    in closed form (Abramowitz and Stegun 26.7.3-4: a finite series in ``cos θ``, ``θ = atan(t/√df)``). In the tail
    (``cos²θ < 1/2``) ``1 − A`` is summed directly, as the rest of the series whose whole sum makes ``A`` one
    (``sin θ·Σ c_j cos^{2j}θ = 1``, ``sin θ cos θ·Σ d_j cos^{2j}θ = π/2 − θ``): ``1 − A`` taken by subtraction
    loses every digit below 1e-16 (stop 66's review: the quantile 51% low at ``df = 1``, ``p`` = 6e-17)."""
    th, r = math.atan(t / math.sqrt(df)), math.hypot(math.sqrt(df), t)
    c2, term, total = math.cos(th) ** 2, 1.0, 1.0
    if c2 < 0.5:  # (sin θ, cos θ from t, not θ: cos θ near π/2 had no digits below 6e-17)
        sin, cos = t / r, math.sqrt(df) / r
        c2 = cos * cos
        even = df % 2 == 0
        j0 = df // 2 if even else (df - 1) // 2
        for j in range(1, j0 + 1):  # the series' coefficient at j0: Π (2i−1)/(2i) or Π 2i/(2i+1)
            term *= ((2 * j - 1) / (2 * j) if even else (2 * j) / (2 * j + 1)) * c2
        total, j = term, j0
        while term > 1e-17 * total:
            j += 1
            term *= ((2 * j - 1) / (2 * j) if even else (2 * j) / (2 * j + 1)) * c2
            total += term
        rest = sin * total if even else 2 / math.pi * sin * cos * total
        return rest / 2
    if df % 2 == 0:
        for j in range(1, df // 2):  # 1 + (1/2)c² + (1·3)/(2·4)c⁴ + … up to c^(df−2)
            term *= (2 * j - 1) / (2 * j) * c2
            total += term
        a = math.sin(th) * total
    else:
        for j in range(1, (df - 1) // 2):  # 1 + (2/3)c² + (2·4)/(3·5)c⁴ + … up to c^(df−3)
            term *= (2 * j) / (2 * j + 1) * c2
            total += term
        a = 2 / math.pi * (th + (math.sin(th) * math.cos(th) * total if df > 1 else 0.0))
    return (1 - a) / 2


def _row_hashes(rows: Batch) -> tuple[torch.Tensor, list[torch.Tensor], int] | None:
    """Each row's two hashes (``[m, 2]`` float64, equal for rows equal byte for byte in every tensor of the batch,
    in any summation order), the rows' byte views and the rows a chunk compares at a time; ``None`` where a tensor
    cannot be read as bytes (not a strided tensor, or empty rows). Each row's bytes, read as 16-bit integers, are
    hashed twice by a float64 product with fixed integer coefficients small enough that every sum is an integer
    below ``2⁵³``. :func:`_distinct_rows`, :func:`_hash_order`."""
    m = int(rows[0].shape[0])
    if m == 0 or not all(isinstance(t, torch.Tensor) and t.layout == torch.strided for t in rows):
        return None
    if any(t.shape[0] != m or t[:1].numel() == 0 for t in rows):  # (rows of no bytes: nothing to tell them apart)
        return None
    views = [t.detach().reshape(m, -1).contiguous().view(torch.uint8) for t in rows]
    words = sum((v.shape[1] + 1) // 2 for v in views)  # whole 16-bit words (an odd row padded chunk by chunk)
    bits = 53 - 15 - max(1, math.ceil(math.log2(words + 1)))  # |word| ≤ 2^15: every sum below 2^53
    if bits < 8:  # rows of 2^30 bytes: no hash worth the name
        return None
    gen = torch.Generator().manual_seed(0)
    h = torch.zeros(m, 2, dtype=torch.float64, device=rows[0].device)
    # a chunk's 16-bit words as float64 (4 bytes a byte) and its rows gathered for the comparison: within
    # DISTINCT_CHUNK_BYTES and within the rows' own bytes (the gate counted the sample twice against memory_budget)
    # (a row of an odd number of bytes is padded a chunk at a time: padded whole, a uint8 image of 3x15x15 took
    # 1.65x the sample's bytes; stop 68's review)
    width = sum(v.shape[1] for v in views)
    chunk = min(DISTINCT_CHUNK_BYTES, 4 * m * width // 5)
    step = max(1, chunk // (5 * (width + len(views))))
    for v in views:
        coef = torch.randint(0, 2**bits, ((v.shape[1] + 1) // 2, 2), generator=gen).double().to(h.device)
        for i in range(0, m, step):
            c = v[i : i + step]
            if c.shape[1] % 2:
                c = torch.cat([c, c.new_zeros(c.shape[0], 1)], 1)
            h[i : i + step] += c.view(torch.int16).double() @ coef
    return h, views, step


def _hash_groups(h: torch.Tensor) -> torch.Tensor:
    """Each row of the hashes ``h`` (``[m, 2]``)'s group: its index among the distinct hash pairs sorted
    lexicographically, what ``torch.unique(h, dim=0, return_inverse=True)`` gives, by two stable sorts (on the
    quick matrix's 9,712-row gate sample 0.0013 s CPU, the row-wise unique's 0.013 s)."""
    m = int(h.shape[0])
    order = torch.argsort(h[:, 1], stable=True)
    order = order[torch.argsort(h[order, 0], stable=True)]
    pairs = h[order]
    new = torch.ones(m, dtype=torch.bool, device=h.device)
    new[1:] = (pairs[1:] != pairs[:-1]).any(1)
    inverse = torch.empty(m, dtype=torch.int64, device=h.device)
    inverse[order] = torch.cumsum(new, 0) - 1
    return inverse


def _distinct_rows(rows: Batch) -> torch.Tensor | None:
    """Indices of the first copy of each distinct row of ``rows`` (equal byte for byte in every tensor of the
    batch), in the order they first appear; ``None`` where a tensor cannot be read as bytes (not a strided tensor,
    or empty rows) or where two different rows shared a hash (then nothing is claimed). The rows are hashed
    (:func:`_row_hashes`: equal rows, equal hashes), and every row is then compared with its group's first, so the
    answer is exact. :meth:`MCMCUnlearner._gap_gate`: the rows a stream gave that hold each remaining row."""
    hashed = _row_hashes(rows)
    if hashed is None:
        return None
    h, views, step = hashed
    m = int(h.shape[0])
    inverse = _hash_groups(h)
    first = torch.full((int(inverse.max()) + 1,), m, dtype=torch.int64, device=h.device)
    first = first.scatter_reduce(0, inverse, torch.arange(m, device=h.device), "amin")
    for v in views:
        for i in range(0, m, step):
            if not torch.equal(v[i : i + step], v[first[inverse[i : i + step]]]):
                return None  # a hash shared by two different rows
    return first.sort().values


def _hash_order(rows: Batch) -> Batch:
    """The distinct rows ``rows`` (as :func:`_distinct_rows` keeps them) in the order of their hashes
    (:func:`_row_hashes`, sorted as ``torch.unique`` sorts): an order that depends on the rows alone, not on the
    order a stream gave them in, so every remaining row found in any stretch of a stream is drawn on in one order
    (the emptied label's draw sums over the rows: another order moved its samples by float rounding, amplified
    through its slice iterations to 1.6e-8). As given where they cannot be hashed or two share a hash."""
    hashed = _row_hashes(rows)
    if hashed is None:
        return rows
    inverse = _hash_groups(hashed[0])
    if int(inverse.max()) + 1 != int(inverse.numel()):
        return rows
    order = torch.argsort(inverse)
    return tuple(t[order] for t in rows)


@functools.cache
def _plain_flop_mode() -> type | None:
    """``torch.utils.flop_counter``'s dispatch mode with its ``__torch_dispatch__`` not wrapped in
    ``torch._disable_dynamo``, whose first call imports ``torch._dynamo`` and sympy (830 modules, 1.1 s CPU: what
    stop 68 cut from a large model's first request, :class:`~mcmc_unlearner.kronecker._LivePeak`); ``None`` where
    this torch's module does not have the parts it is made of (then ``FlopCounterMode`` itself counts)."""
    from torch.utils import flop_counter

    base = getattr(flop_counter, "_FlopCounterMode", None)
    raw = getattr(getattr(base, "__torch_dispatch__", None), "__wrapped__", None)
    if base is None or raw is None:
        return None

    class _PlainFlopCounterMode(base):  # type: ignore[misc, valid-type]
        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            return False

        __torch_dispatch__ = raw

    return _PlainFlopCounterMode


def _count_flops(run: Callable[[], Any], plain: bool | None = None) -> int:
    """The FLOPs ``torch.utils.flop_counter.FlopCounterMode`` counts while ``run()`` runs (its module hierarchy
    apart: the total alone). ``plain`` (by default where ``torch._dynamo`` is not imported yet): through the same mode
    not wrapped in ``torch._disable_dynamo`` (:func:`_plain_flop_mode`), which imports neither it nor sympy; where
    ``torch._dynamo`` is loaded (a process that compiles) ``FlopCounterMode`` itself, kept from dynamo's tracing."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    mode = _plain_flop_mode() if (plain if plain is not None else "torch._dynamo" not in sys.modules) else None
    if mode is None:
        with counter:
            run()
    else:
        counter.flop_counts.clear()
        with mode(counter):
            run()
    return int(counter.get_total_flops())


def _gate_signal(info: dict[str, Any]) -> str:
    """Which of ``newton_gate``'s first signals fired (:meth:`MCMCUnlearner._undamped_overshoots` records it in
    ``info["newton_gate_signal"]``), as the gate's "not fired" messages name it."""
    indefinite = str(info.get("newton_gate_signal", "")).startswith("the curvature is indefinite")
    return "the curvature is indefinite" if indefinite else "the undamped step overshot"


def _split_error(z: float, groups: int) -> float:
    """Each look's, each rule's share of the error ``Φ(−z)`` in :func:`_gap_early_stop` (looks at ``k = 3 …
    groups−1``, two rules): ``Φ(−z)`` by ``erfc``, accurate in the far tail (``statistics.NormalDist().cdf(−z)``,
    ``(1 + erf)/2``, kept one digit at ``z = 8`` and read 0 from ``z ≈ 8.3``)."""
    return 0.5 * math.erfc(z / math.sqrt(2)) / (2 * (groups - 3))


def _gap_early_stop(
    us: torch.Tensor, at_means: Sequence[torch.Tensor], groups: int, limit: float, z: float, project: float
) -> str | None:
    """Why the Newton gate's first look on a sample from the stream can stop before its last group (the verdict
    "not fired"), ``None`` where it cannot yet: ``us`` (``k × d``) and ``at_means`` are the first ``k`` of ``groups``
    groups' first-look estimates and terms at ``θ̄``, ``limit`` the threshold on ``‖e₀‖²``, ``z`` ``newton_gate``,
    ``project`` the full look's standard error over the first look's, ``√(first/per · few/draws)``.

    Every rule only ever stops with "not fired", so the gate fires no more often than on the full evidence, and where
    it goes on to the last group it computes what it did (bit for bit). Three rules:

    * *certain*: the ``k`` terms' sum of squares about their mean, which never falls as groups are added, over
      ``groups(groups−1)`` is already above ``limit``: the full sample's own error is, and the gate would not fire;
    * *hopeless*: even a lower confidence bound of the full look's standard error, times ``z``, is above ``limit``;
    * *clearly large*: the estimate's lower bound, ``est − t·se`` with Student's ``t`` quantile for ``k−1`` degrees
      of freedom (a standard error from ``k`` groups), is above ``limit``.

    The last two are tests at ``k = 3 … groups−1`` (the jackknife needs three groups), the error ``Φ(−z)`` split
    evenly (Bonferroni) over those looks and the two rules, so a bank the full look would have fired on is stopped
    with at most that probability in all, under the normal approximation the gate already uses: for the hopeless
    rule ``k`` groups' squared standard error read as ``χ²`` with ``k−1`` degrees of freedom (the true one's lower
    bound from that distribution's upper quantile at the split error), projected to ``groups`` by
    ``√(k(k−1)/(groups(groups−1)))`` (the smaller of the ways a pair statistic's error falls with its groups: the
    projection that stops least). With so few groups the bounds are wide (``t`` = 61 at three groups, 7.6 at seven,
    for ``z = 3``): the clearly-large rule stops only far above the threshold; the other two stop the class
    removals (stop 66: LeNet-5, BN-CNN, transformer, ResNet), whose error is far above the threshold."""
    k = us.shape[0]
    terms = torch.stack([a.double() for a in at_means])
    ss = float(((terms - terms.mean(0)) ** 2).sum())
    if ss / (groups * (groups - 1)) > limit * (1 + 1e-6):  # (the margin: the full rule's rounding)
        return "the sample's own error is already above the threshold"
    if k < 3 or z <= 0:
        return None
    split = _split_error(z, groups)
    est, se = _gap_estimate(us, 1, math.inf)
    low = se * math.sqrt((k - 1) / _upper_quantile(functools.partial(_chi2_sf, k - 1), split))  # the true one's bound
    if low * math.sqrt(k * (k - 1) / (groups * (groups - 1))) * project * z > limit:
        return "even the full look's standard error would be too large to fire"
    if est - _upper_quantile(functools.partial(_t_sf, k - 1), split) * se > limit:
        return "the gap is clearly above the threshold"
    return None


def _counted(k: int, noun: str) -> str:
    """``k`` and ``noun``, plural unless ``k`` is 1 (``"1 row"``, ``"2 rows"``)."""
    return f"{k} {noun}{'' if k == 1 else 's'}"


def _early_stop_said(
    signal: str,
    why: str,
    k: int,
    groups: int,
    whole: int,
    first: int,
    rows: int,
    n: int,
    gap: tuple[float, float] | None,
    g2: float,
    limit: float,
) -> str:
    """``info["newton_gate"]`` where :func:`_gap_early_stop` stopped the sample's estimate after ``k`` of ``groups``
    groups (``why``, its rule): ``whole`` rows at ``θ̄`` each, the first look on ``first`` of them, ``rows`` sampled
    from the stream for ``n`` remaining rows; ``gap`` the estimate and its standard error (from three groups, else
    ``None``), ``g2`` ``‖G‖²``. Before one or two groups' stop it read "but on 800 rows sampled from the stream for
    100 stopped after 2 of 8 groups", with no estimate and no word of why (stop 66's review)."""
    stopped = f"stopped after {k} of {groups} groups ({_counted(k * whole, 'row')} at θ̄"
    if gap is None:  # the jackknife needs three groups: no estimate to report
        return (
            f"not fired: {signal}, but the bank's gap was not estimated: its sample of {rows} rows from the stream "
            f"for {n} {stopped}; an estimate needs 3 groups): {why}"
        )
    est, se = gap
    return (
        f"not fired: the bank's gap estimated at ‖e₀‖² = {est / g2:.3g} ± {se / g2:.3g} ·‖G‖² on {k * first} of "
        f"{rows} sampled from the stream for {n} rows (threshold {limit:.3g}); {stopped}): {why}"
    )


def damping_history(outcome: StepOutcome) -> str:
    """Every damping trial of a request as ``shape damping:ratio``, joined by ``;``, the taken step's marked
    ``shape damping (taken):ratio`` (``report.info["damping_history"]``).

    A trial whose curvature plus damping could not be solved (not positive definite) reads ``not solvable`` for its
    ratio (it read "nan" with no reason given, stop 45's probe, cg). The shape and the mark were missing before stop
    54: where a rejected ``data``-shape trial at the accepted damping came last, the string read as if the accepted
    step had measured that trial's ratio (``...;1.88e+04:0.519;5.93e+03:-0.094;1.88e+04:-1.72e+03``, the taken
    ``identity`` step at 1.88e+04 with 0.519). No trial is marked where none passed the check.
    """
    taken = outcome.record if outcome.safe else None
    return ";".join(
        f"{h.get('shape', outcome.shape)} {h['damping']:.3g}{' (taken)' if h is taken else ''}:"
        + ("not solvable" if math.isnan(h["predicted"]) else f"{h['ratio']:.3g}")
        for h in outcome.history
    )


def _unlisted_why(source: Any) -> str:
    """Why the recentring is off for remaining data that cannot list its rows, with the fix
    (``report.info["recenter"]``): a tuple of tensors of one shape (read as one-field minibatches) is told how to pass
    its rows instead of being told to pass a tuple, as it was (stop 54's probe)."""
    if isinstance(source, tuple) and source and all(isinstance(t, torch.Tensor) for t in source):
        return (
            f"the remaining data cannot list its rows: a tuple of {len(source)} tensors of one shape is read as "
            "one-field minibatches, not as the rows (x, y); pass the rows as RemovableDataset(x, y, batch_size=128), "
            "or the rows of data without labels as a tuple of one tensor, (x,)"
        )
    return (
        "the remaining data cannot list its rows (pass them as a tuple (x, y) or a RemovableDataset, or as (x,) for "
        "data without labels; a DataLoader or an iterator of minibatches cannot)"
    )


def _refuse_inference_mode() -> None:
    """Refuse a request or a fit inside ``torch.inference_mode()`` (torch said only "`inputs` argument to `grad()`
    cannot be empty")."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "the unlearner differentiates the model (gradients and Hessian products) and cannot run inside "
            "torch.inference_mode(): call it outside that block (torch.no_grad() around it is fine)"
        )


_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _integer_rows(y: Any) -> bool:
    """Whether ``y`` is a ``[B]`` tensor of integers (not bool, float or complex): what may hold class labels."""
    return (
        isinstance(y, torch.Tensor)
        and y.ndim == 1
        and not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
    )


#: torch's words (``F.cross_entropy``, ``F.nll_loss``) for a class label the output has no column for
_TARGET_OUT_OF_BOUNDS = re.compile(r"Target (-?\d+) is out of bounds\.?")

#: Distinct remaining labels outside those already read (the removed rows', earlier requests') whose first row's
#: ``nll`` a request evaluates before its work (:meth:`MCMCUnlearner._check_remaining_labels`), largest first.
LABEL_RANGE_PROBES = 8


def _label_out_of_bounds(exc: BaseException) -> int | None:
    """The label in torch's ``IndexError`` "Target 9 is out of bounds." (a class label outside a cross-entropy's
    output); ``None`` for any other error."""
    if not isinstance(exc, IndexError):
        return None
    found = _TARGET_OUT_OF_BOUNDS.fullmatch(str(exc).strip())
    return int(found.group(1)) if found else None


def _spread_nll_change(info: dict[str, Any]) -> float:
    """The held rows' mean NLL change that an applied move of the samples' spread added to the common step's
    (``info["spread_check"]``; 0 where no such move was applied)."""
    moved = info.get("spread_check")
    return float(moved["nll_change"]) if isinstance(moved, dict) and moved.get("applied") else 0.0


#: A later integer batch field is read as possible class labels (:meth:`MCMCUnlearner._later_labels_emptied`) where
#: its rows hold at most one distinct value per this many rows (row ids, one value per row, are not labels).
LATER_LABEL_ROWS_PER_VALUE = 4

#: Bytes of a part's posterior predictive (float64 ``[rows, classes]``) in the emptied-label check's top share: a
#: 50,000-word vocabulary's parts after the first are 83 rows.
EMPTIED_TOP_PART_BYTES = 32 * 2**20


def _top_rows(logits_f: Callable[..., torch.Tensor], draws: torch.Tensor, rows: Batch, label: int) -> torch.Tensor:
    """On the rows ``rows`` of an emptied ``label``: how many have it as the top class of the posterior predictive
    (the softmax of ``logits_f``, the model's logits ``[rows, classes]``, averaged over the samples ``draws``), and how
    many could not be read so (logits of another shape, or an output :func:`~mcmc_unlearner.kronecker.select_output`
    cannot read: no top share is reported then), as float64 ``[2]``."""
    out = torch.zeros(2, dtype=torch.float64)
    m, part = int(rows[0].shape[0]), EMPTIED_LABEL_ROWS
    i = 0
    while i < m:
        piece = tuple(f[i : i + part] for f in rows)
        k = int(piece[0].shape[0])
        mean = None
        for t in draws:
            try:
                logits = logits_f(t, *piece)
            except ValueError:  # an output select_output cannot read (a rank that has not seen the output's field)
                logits = None
            if logits is None or logits.dim() != 2 or logits.shape[0] != k or logits.shape[1] <= label:
                out[1] += m - i
                return out
            p = torch.softmax(logits.double(), 1)
            mean = p if mean is None else mean.add_(p)
        if mean is not None:
            out[0] += float((mean.argmax(1) == label).sum())
        i += k
        part = max(1, min(EMPTIED_LABEL_ROWS, EMPTIED_TOP_PART_BYTES // (8 * max(int(mean.shape[1]), 1))))
    return out


def _cpu_seconds() -> float:
    """The process's CPU clock (``NEWTON_AUTO_COST``'s cap reads it; a test replaces it with a counted one)."""
    return time.process_time()


def _evenly(n: int, k: int | None) -> torch.Tensor:
    if k is None or k >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, k).round().long()


def _turned(n: int, k: int | None, r: int) -> torch.Tensor:
    """:func:`_evenly` turned by a share ``frac(r·φ)`` (φ the golden ratio's conjugate) of its spacing, wrapped:
    request ``r``'s draws for ``G``. The same subset in every request made its Monte-Carlo error add up in one
    direction (a conjugate regression, 16 of 400 draws, 12 requests: the bank's mean 0.15-0.54 posterior sd from
    where every draw takes it, every check passed); turned, successive requests use other draws and the errors
    average out (0.05-0.12; request 0's draws are :func:`_evenly`'s). Not under ``recenter_every``
    (:meth:`MCMCUnlearner._g_turn`)."""
    if k is None or k >= n or r == 0:
        return _evenly(n, k)
    # spaced round the circle (floor(i·n/k)), then shifted: _evenly's both ends, 0 and n - 1, wrapped next to each
    # other (two neighbouring samples of the chain in every request; the review of stop 47)
    shift = int((r * _GOLDEN % 1.0) * n / k)
    index = (torch.arange(k, dtype=torch.float64) * (n / k)).floor().long()
    return ((index + shift) % n).sort().values


def _spread_among(pool: torch.Tensor, taken: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` of the sorted indices ``pool``: evenly among those not in ``taken``, and where they are fewer than ``k``
    every one of them and the rest evenly among those in ``taken``; sorted."""
    mine = torch.isin(pool, taken)
    free, used = pool[~mine], pool[mine]
    if free.numel() >= k:
        return free[_evenly(free.numel(), k)]
    return torch.cat([free, used[_evenly(used.numel(), k - free.numel())]]).sort().values


def _held_out(n: int, c: int | None, k: int) -> torch.Tensor:
    """Indices of the safety check's ``k`` draws among ``n``: evenly among those that are not the curvature's
    ``_evenly(n, c)`` where the bank has that many more, else every such draw and the rest evenly among the
    curvature's. Checked on the draws the curvature was built from, a step that moves directions flat there and
    steep at the other samples passed unseen (stop 50's probe: a mixture-density network, 30 samples, K-FAC and the
    check on the same 8; the check read +0.0045 on the held rows' NLL, every sample and remaining row +0.20 against
    a limit of about +0.02; the 22 other samples up to +0.89)."""
    if k >= n or c is None or c >= n:
        return _evenly(n, k)
    return _spread_among(torch.arange(n), _evenly(n, c), k)


def _further_draws(n: int, c: int | None, check: torch.Tensor, k: int) -> torch.Tensor:
    """Up to ``k`` draws for the safety net's second measurement (:meth:`EnergyCheck.confirm`) that are not the
    check's ``check``: evenly among those that are not the curvature's either, then among the curvature's."""
    pool = torch.arange(n)[~torch.isin(torch.arange(n), check)]
    curvature = torch.arange(n) if c is None or c >= n else _evenly(n, c)
    return _spread_among(pool, curvature, min(k, pool.numel()))


#: the second measurement copies its further stored samples where the copy is at most this share of the memory
#: budget, and reads them in place beyond it
FURTHER_COPY_SHARE = 4


def _further_samples(bank: torch.Tensor, index: torch.Tensor, budget: int) -> torch.Tensor | _BankRows:
    """The safety net's further stored samples ``bank[index]``: a copy where it takes at most
    ``1/FURTHER_COPY_SHARE`` of the memory budget (the default experiments' banks, bit for bit as before), else read
    in place (:class:`_BankRows`: the same numbers, rounded as BLAS does at the bank's alignment), since reading
    every stored sample could copy most of a large model's bank outside the memory plan (stop 51's review: 24 of 32
    samples of a 25M-parameter model, 2.4 GB)."""
    if index.numel() * bank.shape[1] * bank.element_size() <= budget // FURTHER_COPY_SHARE:
        return bank[index]
    return _BankRows(bank, index)


#: bytes in a removed row's digest (:func:`_row_digests`; a saved state's ``removed_digests`` rows)
_DIGEST_BYTES = 16


def _row_digests(batch: Batch) -> list[bytes]:
    """A BLAKE2b digest of each row of ``batch``: its bytes (−0.0 as 0.0), dtype and shape in every field (a field
    without one row per row of ``batch[0]`` is hashed whole into every row's)."""
    b = int(batch[0].shape[0])
    hashes = [hashlib.blake2b(digest_size=_DIGEST_BYTES) for _ in range(b)]
    for t in batch:
        per_row = t.ndim > 0 and t.shape[0] == b
        raw = t.detach().cpu()
        raw = (raw + 0.0 if raw.is_floating_point() else raw).contiguous()
        head = f"{raw.dtype}{tuple(raw.shape[1:] if per_row else raw.shape)}".encode()
        flat = raw.reshape(b, -1) if per_row else raw.reshape(1, -1)
        data = (flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)).numpy()
        if per_row:  # (numpy rows, no copies: 6,000 rows of 784 floats 0.06 s, against 0.11 s indexed as tensors)
            for h, row in zip(hashes, data):
                h.update(head)
                h.update(row)
        else:
            whole = head + data[0].tobytes()
            for h in hashes:
                h.update(whole)
    return [h.digest() for h in hashes]


def _draws(bank: torch.Tensor, k: int | None) -> torch.Tensor:
    """``bank[_evenly(S, k)]``: the same numbers, without a copy when that is every draw."""
    return bank if k is None or k >= bank.shape[0] else bank[_evenly(bank.shape[0], k)]


def default_curvature_draws(solver: SolverName) -> int:
    """``curvature_draws`` where none is given: 8 for ``kfac``, 16 for the other solvers."""
    return 8 if solver is SolverName.KFAC else 16


def default_refresh_every(solver: SolverName) -> int:
    """``refresh_every`` where none is given: 20 for ``kfac``, 10 for the other solvers."""
    return 20 if solver is SolverName.KFAC else 10


def _draw_count(bank: torch.Tensor, k: int | None) -> int:
    """``_draws(bank, k).shape[0]`` without the copy."""
    return int(bank.shape[0]) if k is None else min(int(k), int(bank.shape[0]))


class _BankRows:
    """``bank[index]`` read in place, for code that takes per-draw derivatives one draw at a time: iterating gives
    the rows of ``bank`` (views holding the copy's numbers; derivatives there equal the copy's to rounding, which
    BLAS kernels may do differently at another alignment), :meth:`tensor` the copy where a batched transform needs
    one. On a 1.2M-parameter ResNet the copy of 16 of 20 draws cost 40 ms of a 0.9 s request, mostly
    in first touches of its 78 MB."""

    def __init__(self, bank: torch.Tensor, index: torch.Tensor) -> None:
        self.bank, self.index = bank, index
        self.shape = torch.Size((index.numel(), bank.shape[1]))
        self.dtype, self.device = bank.dtype, bank.device

    def element_size(self) -> int:
        return self.bank.element_size()

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, s: slice | int | torch.Tensor) -> _BankRows | torch.Tensor:
        """A slice or an index tensor of draws: those draws, read in place; an int: that draw (a view)."""
        if isinstance(s, int):
            return self.bank[int(self.index[s])]
        if isinstance(s, torch.Tensor) and s.dtype == torch.long and s.dim() == 1:
            return _BankRows(self.bank, self.index[s.to(self.index.device)])
        if not isinstance(s, slice):
            raise TypeError(f"_BankRows takes a slice of draws, an int or a 1-D index tensor, got {type(s).__name__}")
        return _BankRows(self.bank, self.index[s])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self.bank[i] for i in self.index.tolist())

    def tensor(self) -> torch.Tensor:
        """The copy ``bank[index]``."""
        return self.bank[self.index]


def _one_grad(f: Callable, t: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``∇f(θ, batch)`` at one draw ``t`` by autograd."""
    with torch.enable_grad():
        tt = t.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(tt, *batch), tt)
    return g


def _as_tensor(thetas: torch.Tensor | _BankRows) -> torch.Tensor:
    return thetas.tensor() if isinstance(thetas, _BankRows) else thetas


def _distinct_draws(thetas: torch.Tensor | _BankRows) -> bool:
    """Whether any draw differs from the first (``(thetas != thetas[0]).any()``, row by row: draws of a bank differ
    from the second on, and one row's comparison is 1/S of the ``[S, D]`` boolean temporary's cost)."""
    rows = iter(thetas)
    first = next(rows, None)
    return first is not None and any(bool((t != first).any()) for t in rows)


def _check_log_prior(model: nn.Module, log_prior: Callable[[nn.Module], torch.Tensor] | None) -> None:
    """Refuse a ``log_prior`` the unlearner cannot evaluate at other parameter values.

    The unlearner evaluates ``log_prior(model)`` with the trainable parameters passed in through
    ``torch.func.functional_call``: inside the call they are plain tensors (``requires_grad=False`` outside
    autograd) and not the ``nn.Parameter`` objects. A prior that selects parameters by ``p.requires_grad`` then
    sees none of them, and one that captured the parameter objects (``params = list(model.parameters())``) sees
    the old values: both silently give the energy a wrong prior term. Compared here at the model's parameters
    and at ``0.9·θ`` (the model is restored exactly).
    """
    if log_prior is None:
        return
    spec = ParamSpec.of(model)
    theta = ParamSpec.flatten_module(model)
    if not bool(torch.isfinite(theta).all()):
        bad = int((~torch.isfinite(theta)).sum())
        raise ValueError(
            f"the model's parameters hold {bad:,} non-finite values (NaN/inf): load a finite sample into the model "
            "(a chain that diverged cannot be unlearned)"
        )
    swapped = functionalize(model, lambda m: torch.as_tensor(log_prior(m)))
    points = (theta, 0.9 * theta)
    values = []
    try:
        with torch.no_grad():
            direct = log_prior(model)
            if not isinstance(direct, torch.Tensor) or direct.numel() != 1:
                raise TypeError(
                    f"log_prior(model) must return a scalar tensor computed from the model's parameters, got "
                    f"{type(direct).__name__}{'' if not isinstance(direct, torch.Tensor) else list(direct.shape)}; "
                    "for a flat prior pass log_prior=None"
                )
            passed = [float(swapped(t)) for t in points]  # the model still holds θ
            ParamSpec.assign(model, points[1])
            values = list(zip((float(direct), float(log_prior(model))), passed))
    finally:
        with torch.no_grad():
            ParamSpec.assign(model, theta)
    first = values[0][0]
    if not math.isfinite(first):
        raise ValueError(f"log_prior(model) is {first} at the model's parameters; it must be finite there")
    for direct, passed in values:
        if not math.isclose(direct, passed, rel_tol=1e-4, abs_tol=1e-6 * (1.0 + abs(first))):
            raise ValueError(
                f"log_prior gives {direct:.6g} on the model but {passed:.6g} when the unlearner passes the "
                f"{spec.dim:,} trainable parameters in as tensors (torch.func.functional_call, as it does for every "
                "sample). Does it select parameters with `p.requires_grad` (plain tensors report False there), or "
                "use parameter objects captured beforehand (`params = list(model.parameters())`)? Compute it from "
                "the module it is given and select by name: `names = {n for n, p in model.named_parameters() if "
                "p.requires_grad}`, then `log_prior = lambda m: sum(-0.5 * (p**2).sum() for n, p in "
                "m.named_parameters() if n in names) / s**2`"
            )


def _first_float(out: Any) -> torch.Tensor:
    """The model's output tensor, or the first floating-point tensor of a tuple, list or dict of outputs."""
    if isinstance(out, torch.Tensor):
        return out
    items = out.values() if isinstance(out, dict) else out
    for t in items:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t
    raise TypeError("the model's output holds no floating-point tensor")


def _refuse_lazy(model: nn.Module) -> None:
    """Refuse a model with uninitialized (lazy) parameters or buffers, e.g. ``nn.LazyLinear`` before its first
    forward pass: they have no shape yet, so no flat parameter vector, bank or curvature can be laid out (torch's
    own "Can't access the shape of an uninitialized parameter" came from the constructor before)."""
    lazy = [
        n
        for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        if nn.parameter.is_lazy(t)
    ]
    if lazy:
        kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.lazy.LazyModuleMixin)})
        raise ValueError(
            f"the model has uninitialized (lazy) parameters or buffers: {', '.join(lazy[:4])}"
            f"{', ...' if len(lazy) > 4 else ''}{' (' + ', '.join(kinds) + ')' if kinds else ''}: their shapes are "
            "only fixed by the first forward pass, so the unlearner cannot lay out the parameters, the bank or the "
            "curvature. Run one forward pass on a batch first to materialise them (with torch.no_grad(): "
            "model(x_batch)), before training or sampling, then build the unlearner; nothing was changed"
        )


def _check_mode(model: nn.Module) -> None:
    """Refuse a model whose forward pass in its current (training) mode uses and updates batch statistics, or
    drops units at random."""
    norms = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if m.training
            and (
                isinstance(m, nn.modules.batchnorm._BatchNorm)
                or (isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats)
            )
        }
    )
    batch_stats = sorted(
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if not m.training and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
    )
    if batch_stats:
        raise ValueError(
            f"{', '.join(batch_stats)} has no running statistics (track_running_stats=False), so even in eval mode "
            "it normalises by the statistics of the batch it is given: a row's likelihood depends on the other rows "
            "of its batch (a single removed row cannot even be evaluated). Build it with track_running_stats=True "
            "and sample in eval mode, or use a per-row normalisation (LayerNorm, GroupNorm)"
        )
    if norms:
        raise ValueError(
            f"the model is in training mode with {'/'.join(norms)} layers: their forward pass normalises by the "
            "batch's statistics and updates the running ones, so a row's likelihood depends on its batch and every "
            "evaluation the unlearner makes would change the model. Call model.eval() first (freeze the running "
            "statistics before sampling: the bank's posterior is the eval-mode network's)"
        )
    drops = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if m.training
            and (
                (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
                or (isinstance(m, nn.MultiheadAttention) and m.dropout > 0)
                or (isinstance(m, nn.RNNBase) and m.dropout > 0 and m.num_layers > 1)
            )
        }
    )
    if drops:
        raise ValueError(
            f"the model is in training mode with {'/'.join(drops)} layers (dropout probability > 0): every forward "
            "pass drops a fresh random set of units, so the removed points' gradient, the curvature and the safety "
            "check's energy differences (two passes, two different masks) would measure dropout noise. Call "
            "model.eval() first: the unlearner works on the eval-mode network's likelihood"
        )
    spectral = getattr(torch.nn.utils.parametrizations, "_SpectralNorm", ())
    hooked = importlib.import_module("torch.nn.utils.spectral_norm").SpectralNorm  # the attribute is the function
    if any(
        m.training and (isinstance(m, spectral) or any(isinstance(h, hooked) for h in m._forward_pre_hooks.values()))
        for m in model.modules()
    ):
        raise ValueError(
            "the model is in training mode with spectral normalisation: every forward pass takes a power-iteration "
            "step and writes its vectors into the module's buffers, so each evaluation the unlearner makes would "
            "change the model and the function it evaluates. Call model.eval() first"
        )
    renorm = sorted(
        f"{name} ({type(m).__name__}, max_norm={m.max_norm})"
        for name, m in model.named_modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None and m.weight.requires_grad
    )
    if renorm:
        raise ValueError(
            f"{', '.join(renorm)} rescales its weight in place during every forward pass, so the likelihood is not "
            "a function of the parameters a sample holds, and derivatives cannot pass through the rescaling. Build "
            "the embedding with max_norm=None (renormalise rows out of place in forward if the model needs it, e.g. "
            "torch.renorm(weight, 2, 0, max_norm) before F.embedding), or freeze its weight"
        )
    bags = sorted(
        name for name, m in model.named_modules() if isinstance(m, nn.EmbeddingBag) and m.weight.requires_grad
    )
    if bags:
        raise ValueError(
            f"{', '.join(bags)} (EmbeddingBag) has no second derivative or forward-mode derivative in torch, which "
            "the curvature and the safety check need (they failed inside the request). Use nn.Embedding and reduce "
            "each bag in forward, e.g. emb(tokens).mean(1) for bags of equal length (the same function as "
            "EmbeddingBag(mode='mean') and the same parameters: load its weight; with a padding_idx, which the bag "
            "leaves out of its mean, divide the sum by the count of other tokens: (emb(t) * (t != pad)[..., None])"
            ".sum(1) / (t != pad).sum(1, keepdim=True)), or freeze the bag's weight"
        )


def _check_mode_at_call(model: nn.Module, call: str) -> None:
    """:func:`_check_mode` again at a request or ``fit()``: a model switched to training mode after the unlearner was
    built (``model.train()`` to continue its chain) ran dropout in every pass of the request (stop 63's flows probe:
    random rows accepted with ``problems=[]``; a class's last rows refused as "nll is not the plain cross-entropy").

    Raises:
        InvalidRequestError: naming the layers and ``model.eval()``; nothing is changed.
    """
    try:
        _check_mode(model)
    except ValueError as exc:
        raise InvalidRequestError(
            f"{call}: {exc} (the model was switched to training mode after the unlearner was built, which checked it "
            "then); nothing was changed"
        ) from None


def _check_state_meta(meta: Mapping[str, Any], corrupt: str) -> None:
    """Refuse :meth:`MCMCUnlearner.load_curvature_state` metadata of the wrong type (counts that are not
    non-negative integers, a damping state that is not a dict of finite non-negative dampings): loaded, they raised
    ``AttributeError`` or ``int()``'s error part way through the load, or set a NaN damping."""
    for key in ("precond_age", "cache_age", "cache_n", "grad_draw_round", "rows_at_samples"):
        v = meta.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"load_curvature_state: the saved {key!r} is {ascii(v)[:40]}, not a count: {corrupt}")
    if "damping_relative" in meta:
        v = meta["damping_relative"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"load_curvature_state: the saved 'damping_relative' is {ascii(v)[:40]}: {corrupt}")
    fit_nll = meta.get("fit_data_nll")
    if fit_nll is not None and not (
        isinstance(fit_nll, (list, tuple))
        and len(fit_nll) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in fit_nll)
    ):
        # (read after the curvature was loaded: float()'s error left the load half done)
        raise ValueError(f"load_curvature_state: the saved 'fit_data_nll' is {ascii(fit_nll)[:40]}: {corrupt}")
    state = meta.get("damping_state")
    if state is None:
        return
    rel = state.get("relatives", {}) if isinstance(state, Mapping) else None
    ok = isinstance(rel, Mapping) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in rel.values()
    )
    drift = state.get("drift") if isinstance(state, Mapping) else None
    ok = ok and (
        drift is None
        or (
            isinstance(drift, (list, tuple))
            and len(drift) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in drift)
        )
    )
    if not ok or not isinstance(state.get("shape", "identity"), str):
        raise ValueError(
            f"load_curvature_state: the saved 'damping_state' is {ascii(state)[:120]}, where a dict with 'shape' (a "
            "name), 'relatives' (finite non-negative dampings by shape) and optionally 'drift' (three numbers) is "
            f"expected: {corrupt}"
        )


def _vmap_fallbacks_noted(method: Callable[..., FitReport]) -> Callable[..., FitReport]:
    """Run an :class:`MCMCUnlearner` method returning a :class:`FitReport` inside :func:`quiet_vmap_fallbacks`,
    recording the operations in its ``info`` (:meth:`MCMCUnlearner._note_vmap_fallbacks`)."""

    @functools.wraps(method)
    def wrapped(self: MCMCUnlearner, *args: Any, **kwargs: Any) -> FitReport:
        with quiet_vmap_fallbacks() as ops:
            out = method(self, *args, **kwargs)
        self._note_vmap_fallbacks(ops, out.info)
        return out

    return wrapped


def _check_complex_parameters(model: nn.Module) -> None:
    """Refuse trainable complex parameters (stop 57's probe): every parameter complex crashed inside the request
    with torch's raw "value cannot be converted to type double without overflow", and complex mixed with real
    parameters was refused with advice (``model.float()``) that leaves complex tensors as they are.

    Raises:
        ValueError: naming the complex parameters and the way out; nothing is changed.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.is_complex()]
    if names:
        raise ValueError(
            f"complex parameters are not supported ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}): the "
            "unlearner's samples, curvature and safety check are real-valued, and model.float() or model.double() "
            "leave complex tensors complex. Hold the real and imaginary parts as real Parameters and build the "
            "complex tensor in forward (torch.complex(self.w_re, self.w_im)), or freeze them (requires_grad=False); "
            "nothing was changed"
        )


def _not_differentiable_op(exc: BaseException) -> str | None:
    """The operation named by torch's "derivative for OP is not implemented" in ``exc``, else ``None``."""
    what = re.search(r"derivative for '?([\w.:]+?)'? is not implemented", str(exc))
    return what.group(1) if what is not None else None


# torch's name of an operation without a second derivative -> the same values from operations that have one (stop
# 60's probe: a MobileNet-style block's nn.Hardsigmoid gate was refused with the CTC, EmbeddingBag and cdist examples)
_ONCE_ONLY_REWRITES = {
    "hardsigmoid_backward": "F.relu6(x + 3) / 6 for F.hardsigmoid / nn.Hardsigmoid (the same values)",
    "_pdist_backward": "the pairs written out, i, j = torch.triu_indices(n, n, 1), then ((a[i] - a[j]) ** 2)"
    ".sum(-1).sqrt(), for F.pdist",
    "multi_margin_loss_backward": "the hinge written out, (margin - x.gather(1, y[:, None]) + x).clamp(min=0) summed "
    "over the other classes and divided by their count, for F.multi_margin_loss",
    "multilabel_margin_loss_backward": "the hinges written out over (target, other) class pairs for "
    "F.multilabel_margin_loss",
}


def _second_derivative_refusal(op: str) -> ValueError:
    """The refusal of an ``nll`` through an operation torch differentiates once but not twice (``op``, as torch
    names it): before any work on the first request (:meth:`MCMCUnlearner._check_forward`), or where the request
    meets it. Names a rewrite of that operation where one is known (``_ONCE_ONLY_REWRITES``)."""
    known = [fix for name, fix in _ONCE_ONLY_REWRITES.items() if op.split("::")[-1] == name]
    first = f"For this operation: {known[0]}. Otherwise write" if known else "Write"
    return ValueError(
        f"the model uses an operation torch cannot differentiate a second time ({op}), which every curvature "
        f"backend and the safety check need; nothing was changed. {first} the model and the loss with operations "
        "torch differentiates twice (e.g. the CTC forward recursion over log-probabilities with torch.logsumexp for "
        "F.ctc_loss; F.embedding followed by a sum or mean for F.embedding_bag; ((a[:, None] - b[None]) ** 2)"
        ".sum(-1).sqrt() for torch.cdist), or freeze the parameters that flow through it "
        "(requires_grad=False)"
    )


def _row_gap(
    together: torch.Tensor, alone: torch.Tensor, n: int, tol: float, pattern_tol: float | None = None
) -> tuple[float, bool]:
    """The rows-alone gap (:meth:`MCMCUnlearner._row_check`): the largest difference between rows' values in a batch
    of ``n`` rows (``together``) and each alone, relative to ``1 +`` the largest value together, 0 within ``tol``;
    and whether every row showing a difference has its value alone ``n`` times its value together (the batch-size
    pattern, to ``tol`` relative to the row's own value; a row within ``tol * (1 + max|together|)`` both ways shows
    nothing and is passed over; at least one must show it; ``pattern_tol`` in place of ``tol`` there where given)."""
    floor = tol * (1.0 + float(together.abs().max()))
    gap = float((together - alone).abs().max()) / (1.0 + float(together.abs().max()))
    if gap <= tol:
        return 0.0, False
    shows = torch.maximum(together.abs(), alone.abs()) > floor
    fits = (alone - n * together).abs() <= (tol if pattern_tol is None else pattern_tol) * alone.abs()
    return gap, bool(shows.any()) and bool((fits | ~shows).all())


def _norms64(a: torch.Tensor, b: torch.Tensor, chunk: int = 2**16) -> tuple[float, float, float] | None:
    """``(|a|, |b|, |a − b|)`` of two flat tensors in float64, a chunk of ``chunk`` entries at a time (float64 copies
    of the whole vectors took six copies of the parameters' bytes); ``None`` where an entry is not finite."""
    sums = torch.zeros(3, dtype=torch.float64)
    for i in range(0, a.numel(), chunk):
        x, y = a[i : i + chunk].double(), b[i : i + chunk].double()
        if not bool(torch.isfinite(x).all() and torch.isfinite(y).all()):
            return None
        sums += torch.stack([x.square().sum(), y.square().sum(), (x - y).square().sum()])
    return sums[0].sqrt().item(), sums[1].sqrt().item(), sums[2].sqrt().item()


def _mixed_batch(removed: Batch, remaining: Batch, rows: int) -> Batch | None:
    """``removed``'s rows followed by up to ``rows`` rows of the minibatch ``remaining``, field by field
    (:meth:`MCMCUnlearner._check_mixed_rows`): fields with each batch's leading dimension concatenated (the same
    trailing shape, dtype and device), fields without it taken from ``remaining`` where both batches hold the same
    value; ``None`` where the two cannot be mixed (other fields, shapes, or shared values)."""
    from .kronecker import field_rows, same_bits

    if len(removed) != len(remaining) or not removed or not isinstance(remaining[0], torch.Tensor):
        return None
    kr, kb = field_rows(removed), field_rows(remaining)
    out: list[Any] = []
    for a, b in zip(removed, remaining):
        a_rows = isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == kr
        b_rows = isinstance(b, torch.Tensor) and b.dim() > 0 and b.shape[0] == kb
        if a_rows and b_rows:
            if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype or a.device != b.device or a.layout != b.layout:
                return None
            out.append(torch.cat([a, b[:rows]]))
        elif not a_rows and not b_rows:
            try:
                same = a is b or (
                    same_bits(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else bool(a == b)
                )
            except Exception:  # values that do not compare: not mixed
                same = False
            if not same:
                return None
            out.append(b)
        else:
            return None
    return tuple(out)


class _Protected:
    """The memory of tensors the caller holds: every bank the unlearner was given and every tensor
    :meth:`MCMCUnlearner.samples` handed out. Each storage is held by a weak reference (for liveness) with the
    address range it covers (for membership): a parameter whose storage overlaps the memory of a live protected
    storage gets its own storage before the library writes (:func:`_own_parameters`), also where it reaches that
    memory through another storage object (``torch.from_numpy`` of the same array twice, DLPack,
    ``torch.frombuffer``, a piece of a row of the bank). A storage is protected while it lives: a weak reference
    does not keep it alive, and a freed storage's address taken by a new tensor is not mistaken for it.

    One exception: memory torch did not allocate (a non-resizable storage: numpy's, DLPack's, a buffer's) outlives
    the tensors over it, so the last bank given keeps such ranges after its tensors are freed (e.g. a bank given as
    ``torch.from_numpy(arr)`` inline), against parameters on such memory too (a later ``torch.from_numpy(arr)``);
    memory torch allocated there is a reuse and is not mistaken for it. An earlier bank's ranges are forgotten
    when freed, so the set stays bounded by what the caller holds plus one bank.

    A copy (``copy.deepcopy`` of an unlearner, whose model then holds copies) starts empty."""

    def __init__(self) -> None:
        self._refs: dict[int, tuple[StorageWeakRef, torch.device]] = {}  # storage id (``_cdata``) -> reference
        # per device: storage id -> (first byte, one past the last byte); no empty or meta storage (no memory)
        self._spans: dict[torch.device, dict[int, tuple[int, int]]] = {}
        self._kept: set[int] = set()  # the last bank's storages on memory torch did not allocate (kept when freed)
        self._moved = 0  # the last key a freed kept storage was moved to (negative: no storage has that id)
        # per device: the first bytes (sorted), ends, running maximum of the ends, ids (built when asked)
        self._index: dict[torch.device, tuple[list[int], list[int], list[int], list[int]]] | None = None

    def add(self, value: Any, bank: bool = False) -> None:
        """Protect the storage of every tensor in ``value`` (a tensor, a mapping or a sequence, nested); freed
        storages are forgotten first, so the set holds what the caller still holds plus ``value``.

        Args:
            value: The caller's tensors.
            bank: ``value`` is a bank given (its storages on memory torch did not allocate are kept when freed,
                replacing the previous bank's).
        """
        if bank:
            self._kept = set()
        self.prune()
        stack = [value]
        while stack:
            v = stack.pop()
            if isinstance(v, torch.Tensor):
                if v.layout == torch.strided:  # a sparse buffer has no storage to share (and parameters are dense)
                    self._add_storage(v.untyped_storage(), bank)
            elif isinstance(v, Mapping):
                stack.extend(v.values())
            elif isinstance(v, (list, tuple)):
                stack.extend(v)

    def _add_storage(self, storage: torch.UntypedStorage, bank: bool) -> None:
        """Record one storage (once) with its memory range."""
        ref = StorageWeakRef(storage)
        key = ref.cdata
        known = self._refs.get(key)
        if known is not None and known[0].expired():  # a kept, freed storage's id, taken by a new one: move it
            self._moved -= 1
            self._refs[self._moved] = self._refs.pop(key)
            spans = self._spans.get(known[1], {})
            if key in spans:
                spans[self._moved] = spans.pop(key)
            self._kept.discard(key)
            self._kept.add(self._moved)
            known = None
        if known is None:
            device = storage.device
            self._refs[key] = (ref, device)
            start = storage.data_ptr()
            end = start + storage.nbytes()
            if end > start and device.type != "meta":
                self._spans.setdefault(device, {})[key] = (start, end)
            self._index = None
        if bank and not storage.resizable():
            self._kept.add(key)

    def prune(self) -> None:
        """Forget freed storages (the set stays as large as what the caller still holds, plus the last bank's
        storages on memory torch did not allocate)."""
        dead = [k for k, (ref, _) in self._refs.items() if ref.expired() and k not in self._kept]
        for k in dead:
            _, device = self._refs.pop(k)
            self._spans.get(device, {}).pop(k, None)
        if dead:
            self._index = None

    def _ranges(self) -> dict[torch.device, tuple[list[int], list[int], list[int], list[int]]]:
        """Per device, the ranges: first bytes (sorted), ends, running maximum of the ends, ids."""
        if self._index is None:
            self._index = {}
            for device, spans in self._spans.items():
                rows = sorted((start, end, k) for k, (start, end) in spans.items())
                ends = [r[1] for r in rows]
                reach = list(itertools.accumulate(ends, max))
                self._index[device] = ([r[0] for r in rows], ends, reach, [r[2] for r in rows])
        return self._index

    def overlaps(self, storage: torch.UntypedStorage) -> bool:
        """Whether ``storage``'s memory overlaps the memory of a live protected storage (the same storage object
        or another one over the same bytes), or, for memory torch did not allocate, the last bank's."""
        index = (self._index if self._index is not None else self._ranges()).get(storage.device)
        if index is None:  # nothing protected on this device (a meta storage's neither)
            return False
        start = storage.data_ptr()
        end = start + storage.nbytes()
        if end <= start:  # an empty storage holds no memory to share
            return False
        starts, ends, reach, ids = index
        j = bisect.bisect_left(starts, end) - 1  # ranges 0..j begin before this storage ends
        freed = False
        while j >= 0 and reach[j] > start:  # some range among 0..j ends after this storage begins
            if ends[j] > start:
                k = ids[j]
                if not self._refs[k][0].expired():
                    return True
                if k not in self._kept:
                    freed = True  # a freed storage's memory, perhaps reused by this one: not the caller's
                elif not storage.resizable():
                    return True  # the last bank's external memory (a numpy array) reached through a new storage
            j -= 1
        if freed:
            self.prune()  # so the freed ranges are not scanned again
        return False

    def __len__(self) -> int:
        """How many storages are protected (freed ones forgotten first)."""
        self.prune()
        return len(self._refs)

    def __reduce__(self) -> tuple[type, tuple]:
        return (_Protected, ())  # a weak reference copied as an integer would be freed twice


def _own_parameters(model: nn.Module, caller: _Protected | None = None) -> None:
    """Give parameters their own storage where they are views of a larger tensor (e.g. loaded with
    ``vector_to_parameters(bank[-1], ...)``) or share memory with a tensor the caller holds (``caller``: a bank it
    gave, samples :meth:`MCMCUnlearner.samples` returned, e.g. after
    ``model.load_state_dict(unlearner.samples()[-1], assign=True)``, also through another storage object over the
    same memory, e.g. ``torch.from_numpy`` of the same array), so writing the live chain's new state never writes
    into the caller's tensors. Called before every write, not only when the unlearner is built: a model pointed at
    a sample later had it overwritten by the next request (stop 47's probe; stop 57's with the samples
    ``samples()`` returned)."""
    with torch.no_grad():
        for p in ParamSpec.params(model):
            storage = p.untyped_storage()
            whole = storage.nbytes()
            if p.data._base is not None or whole != p.numel() * p.element_size():
                p.data = p.data.clone()
            elif caller is not None and caller.overlaps(storage):
                p.data = p.data.clone()


def _unfactored_layers(model: nn.Module, layers: list[nn.Module]) -> list[nn.Module]:
    """Those of ``layers`` (trainable ``Linear``/``Conv`` layers) that K-FAC holds in its diagonal block although
    ``solver='auto'`` counts them: a weight computed by a parametrization (``weight_norm``, ``spectral_norm``,
    ``orthogonal``, ``register_parametrization``, the hook-based ``nn.utils.weight_norm``: no ``weight`` parameter
    of the layer's own), and ``MultiheadAttention.out_proj``, which attention reads through ``F.linear`` without
    calling it (stop 58's probe: a weight-normed MLP's reason said "2 Linear/Conv layers for Kronecker factors"
    where none was factored)."""
    unhooked = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [m for m in layers if id(m) in unhooked or not isinstance(m._parameters.get("weight"), torch.Tensor)]


@dataclass
class Proposal:
    """A computed removal, not yet applied (:meth:`MCMCUnlearner.propose`, :meth:`MCMCUnlearner.apply`).

    Attributes:
        report: What the removal does; ``report.problems`` lists failed checks (empty: passed).
        live: The live chain's new flat parameters.
        bank: The new sample bank (``None`` without a bank).
    """

    report: RemovalReport
    live: torch.Tensor
    bank: torch.Tensor | None
    _owner: Any = None
    _version: int = 0
    _sampler_state: dict | None = None
    _backend_state: dict | None = None
    _control_relative: float = 0.0
    _carry: torch.Tensor | None = None
    _generator_state: torch.Tensor | None = None
    _data: Any = None
    _data_state: Any = None
    _lr_scale: float = 1.0
    _anchor: _Anchor | None = None
    _rows_at_samples: int | None = None
    _cumulative_warned: bool = False


def _listed_count(stream: _Stream) -> int | None:
    """How many rows :func:`_listed_remaining` would list, counted without copying one (a ``RemovableDataset``'s
    remaining count, the indices a ``DataLoader`` over a ``TensorDataset`` reads); ``None`` where only listing
    them tells (a source of its own with ``remaining()``, or rows that cannot be listed at all)."""
    from .data import RemovableDataset

    if stream.listable:
        return len(stream.source) if isinstance(stream.source, RemovableDataset) else None
    selected = _loader_selection(stream.source)
    if selected is None or not isinstance(selected[0], torch.utils.data.TensorDataset):
        return None
    ds, index = selected
    return len(ds) if index is None else int(index.numel())


def _listed_remaining(stream: _Stream) -> Batch | None:
    """Every remaining row, where they can be listed without a pass over the data: the rows given as a tuple, a
    ``RemovableDataset`` (``stream.full()``), or a ``DataLoader`` over a ``TensorDataset`` (or a ``Subset`` of one;
    checked finite here); else ``None``."""
    listed = stream.full() if stream.listable else _loader_tensors(stream.source)
    if listed is not None and not stream.listable:
        check_finite_batch(listed, "the remaining data", "of the rows its DataLoader reads")
    return listed


#: what solver="auto" takes, where the caller gave none, when it switches from K-FAC to CG (a weight read outside
#: its module): CG's own defaults
_CG_SWITCH_DEFAULTS: dict[str, int] = {
    "curvature_draws": 16,
    "refresh_every": 10,
    "precondition_rank": 20,
    "recenter_every": 0,
}


class MCMCUnlearner:
    """Remove training points from an SG-MCMC posterior (chain state and stored samples) without retraining.

    With no options besides the model's likelihood and the stored samples it picks a curvature backend that fits
    the memory budget, measures the prior, chooses the damping of every request and checks every step::

        un = MCMCUnlearner(model, nll=lambda m, batch: ..., log_prior=lambda m: ..., bank=samples)
        report = un.remove(removed_batch, remaining_minibatches, n_remaining=n)

    Args:
        model: The model; by default it provides ``nll(batch) -> [B]`` and ``log_prior()``.
        sampler: The SG-MCMC optimizer driving the live chain (needed for ``expectation="chain"`` and to rescale
            its step size after a removal); ``None`` when only stored samples are shifted.
        nll: ``nll(model, batch) -> Tensor[B]``, per-datum negative log-likelihood ``h``.
        log_prior: ``log_prior(model) -> scalar``; default ``model.log_prior()`` (a flat prior if absent).
        energy: ``energy(model, batch, n) -> scalar`` minibatch estimate of ``F``; default
            ``-log_prior + n/|B|·Σ nll``.
        bank: Stored posterior samples: a tensor ``[S, D]`` (or a list of ``[D]`` vectors), a list of state_dicts
            or a dict of stacked tensors (copied; :meth:`samples` returns them in the same layout).
        solver: ``"auto"`` (default): ``"exact"`` (dense Hessian) when the model has at most ``exact_max_dim``
            parameters and its matrices fit ``memory_budget`` — ``"ggn"`` (the dense generalized Gauss-Newton
            matrix, :mod:`mcmc_unlearner.backends.ggn`) instead when such a model has convolution or recurrent
            layers, ``"kfac"`` when it has ``nn.MultiheadAttention``; else ``"kfac"`` (Kronecker-factored
            curvature, :mod:`mcmc_unlearner.kronecker`) when the model has ``nn.Linear``/``nn.Conv`` layers (in one
            process ``"cg"`` instead where the first request's or ``fit``'s rows show a factored weight also read
            outside its module: :meth:`_take_cg_if_read_outside`); else ``"cg"`` with a rank-20 Lanczos
            preconditioner. A dense pick is weighed again on the first request's or ``fit``'s rows, in one process
            with the solvers' own options at their defaults (:meth:`_weigh_dense_build`): where its build's
            estimated cost is over what ``exact_max_dim`` allows and K-FAC (or CG) is cheaper, that instead.
            Also ``"lissa"`` (the paper's) and ``"lowrank"``.
        expectation: ``"bank"`` or ``"chain"``; ``None`` picks bank when a bank is present.
        hessian: ``"remaining"`` (Newton step on the remaining-data energy) or ``"full"`` (paper).
        bank_shift: ``"auto"`` (``"affine"`` with the dense solvers ``exact``/``ggn``, else ``"mean"``), ``"mean"``,
            ``"sample"`` or ``"affine"`` (see module docstring).
        damping: ``"auto"`` (chosen per request, :mod:`mcmc_unlearner.step`) or a fixed value ``>= 0``, finite in
            the parameters' dtype (float32: at most 3.4e38).
        scaling: LiSSA scaling ``s`` or ``"auto"`` (a number normal in the parameters' dtype).
        iter_T: LiSSA rounds / CG iteration cap.
        tol: Solver tolerance (relative residual); a solve that misses it is refused by :meth:`remove`.
        samp_T: Sampler steps for ``expectation="chain"``.
        grad_draws: Bank samples averaged for ``G``: ``"auto"`` (all of at most ``max(16, ⌈1024/k⌉)`` for ``k``
            removed points, evenly spaced), ``None`` (all) or a number.
        turn_draws: Whether a subset of ``grad_draws`` turns from request to request (:func:`_turned`), so that
            its Monte-Carlo error averages out over a sequence instead of adding up: ``"auto"`` (turned unless
            ``recenter_every`` is on, whose corrections compare the bank with an anchor at fixed draws), ``True`` or
            ``False`` (the same evenly spaced draws in every request, as before stop 47).
        curvature_draws: Draws averaged for ``H`` (``None``: 8 for ``kfac``, 16 otherwise).
        refresh_every: Curvature reuse across sequential requests (``None``: 20 for ``kfac``, 10 otherwise).
            ``exact`` downdates its dense Hessian in between (exact for the data term; the draws' drift is caught by
            ``drift_tol``); ``kfac``/``lowrank``/``cg`` reuse their approximation or preconditioner.
        precondition_rank: Lanczos rank of CG's preconditioner / of ``lowrank``'s approximation.
        drift_tol: A reused approximation is rebuilt at once when its first step's ``|actual/predicted − 1|``
            exceeds this.
        check_draws: Posterior draws of the safety check.
        check_rows: Held remaining rows of the safety check.
        check_screen: ``"reject"`` (default): a trial the damping search expects to fail (those of a search from
            scratch, with no damping carried from an earlier request, up to its first accepted step) is measured
            first on half the check draws and a quarter of its rows (an eighth of the cost) and rejected there
            when it fails by three standard errors
            (:meth:`DampingControl._verdict <mcmc_unlearner.step.DampingControl._verdict>`); every step taken is
            measured by the full check, so the steps are the full check's unless the screen rejects one the full
            check would have taken. ``"both"`` (or
            ``True``) screens every trial and also accepts on the screen: on Fashion-MNIST the steps it accepts
            early carry a noisier measured deficit to the next request, and two seeds ended farther from
            retraining (docs/model-matrix.md). ``"off"`` (or ``False``): the full check only.
        negative_curvature: With ``solver="cg"`` and a fixed damping: ``"raise"`` refuses an indefinite Hessian;
            ``"truncate"`` stops CG at the first negative-curvature direction (truncated Newton-CG). With
            ``damping="auto"`` negative curvature raises the damping instead.
        newton_steps: At most this many damped Newton steps per request (1: the influence step alone; see
            :meth:`_newton_iterations`). Further steps continue while their target gradient is not met
            (``> 10⁻³‖G‖``), each step passes its check and none was negligible (its energy change below the
            check's floating-point resolution); ``report.info["newton_steps_taken"]`` and ``["newton_stop"]`` say
            how many ran and why they stopped. Each costs a gradient pass over every remaining row plus its damping
            trials' checks, with no other bound: a small MLP took all 1,000 steps asked (56 s), each a measured
            decrease. ``"auto"`` (with ``newton_target="equilibrium"``; opt-in): up to ``NEWTON_AUTO_STEPS``, taken
            only where the bank's own gap to equilibrium is small against the removal's gradient and while their
            gradient passes over the remaining rows (the gap's included) take at most ``NEWTON_AUTO_PASSES`` times
            ``NEWTON_ROW_DRAWS`` row-draw gradients and ``NEWTON_AUTO_FLOPS`` counted FLOPs (stop 68: a row-draw
            gradient's FLOPs counted once by ``FlopCounterMode``; both counted budgets: the same bank on a loaded
            machine; :meth:`_newton_iterations`; ``report.info["newton_bank_gap"]``, ``["newton_row_gradients"]``,
            ``["newton_row_flops"]``, ``["newton_flops"]``); skipped
            without a warning where the rows cannot be listed (rows as tensors, a ``RemovableDataset`` and a
            ``DataLoader`` over a ``TensorDataset`` list them; an iterator of minibatches cannot).
        newton_gate: With ``newton_steps=1`` (and ``newton_target="equilibrium"``): take ``"auto"``'s further steps
            where the damping search's least-damped trial raised the remaining-data energy beyond its predicted fall
            by this many standard errors, or where the exact Hessian is indefinite and no undamped step exists
            (:meth:`_undamped_overshoots`, free; ``report.info["newton_gate_signal"]``) and then a sampled estimate
            of the bank's gap to equilibrium lies this many standard errors below ``NEWTON_AUTO_BANK_GAP·‖G‖``
            (:meth:`_gap_gate`; a tenth of the remaining rows, its cost 2-6% of a first request where it runs, stop
            66; ``report.info["newton_gate"]``, ``["newton_gate_cpu_seconds"]``). Where the rows cannot be listed,
            the undamped step did not overshoot, or the estimate is not clearly small (a class removal's), only the
            influence step is taken, as before. A cost cap on its further steps, ``NEWTON_AUTO_COST`` times the
            request's CPU time before them, is off by default (timed: where it binds the bank follows the machine's
            load; :meth:`_newton_iterations`). ``0`` or ``None``: never;
            off on ``DistributedUnlearner``.
        newton_target: What further Newton steps zero: ``"equilibrium"`` — the bank-averaged gradient of the
            remaining-data energy, ``E[∇F(θ', S∖S')] = 0``, the first-moment identity of the new posterior, on every
            remaining row when the data can list them (also corrects the bank's own Monte-Carlo location error,
            which the influence step otherwise carries along and amplifies); ``"relative"`` — the control-variate
            energy's gradient, ``E[∇F(θ', S∖S')] = E[∇F(θ, S)]`` (only the removal, continued where its influence
            is not local: gross outliers, a nonlinear posterior).
        curvature_data: ``"minibatch"`` (one fresh minibatch per draw), ``"full"`` (every remaining point per draw;
            needs a data source with ``remaining()``, else it falls back to minibatches and says so in
            ``report.info``) or ``"auto"`` (full for ``solver="exact"`` while remaining points × draws <= 32,768 and
            it fits the memory budget; at fewer curvature draws, unless ``curvature_draws`` is given, where points ×
            draws × parameters > 2,097,152).
        exact_max_dim: Largest parameter count for which ``"auto"`` picks the dense solver.
        memory_budget: Bytes (or ``"2GB"``, ``"25%"``) any curvature computation may hold; ``None``: a quarter of
            the memory available when the unlearner is built, at most 1 GiB. Chunks of draws, rows and Hessian
            columns are sized from it before any work; a path that cannot fit is refused before it starts.
        likelihood: For ``kfac``: ``"auto"`` (detected by probing ``nll``; a fallback to the empirical Fisher is
            warned about once and reported in ``report.info["kfac_likelihood_fallback"]``), ``"categorical"``,
            ``"gaussian"``, ``"bernoulli"`` (logits of ``binary_cross_entropy_with_logits``) or ``"empirical"``;
            ``mc_samples``: Monte-Carlo labels per example.
        max_damping_trials: Steps tried per damping shape before a request is refused (a request that tries both
            shapes, step 3 of the README, makes up to one more trial, or a second search when the first shape
            accepted none). The damping grows ×10 per rejected
            step from 1/100 of the mean curvature, so 12 trials reach 10⁸× it (a 1.2M-parameter ResNet needed
            10⁴×, the eighth trial, on its first request).
        rescale_lr: Multiply the sampler's step size by ``n_old / n_new`` after each removal.
        backend: ``"auto"``, ``"func"`` or ``"autograd"`` for derivatives (``"auto"``: ``torch.func`` transforms,
            autograd where they fail; per-draw derivatives taken one draw at a time where that is faster:
            :func:`loop_over_draws`).
        seed: Seed of the unlearner's own generator (probes, Lanczos starts, Monte-Carlo labels).
        carry_deficit: Add the first-moment deficit a damped step leaves (the part of ``λx`` the energy check did
            not measure as curvature; :func:`~mcmc_unlearner.step.measured_deficit`) to the next request's ``G``,
            so damped sequential requests still add up to the whole removal. Saved with the curvature state.
        shorten_steps: Cut an accepted step that overshoots the measured minimum of the remaining data's energy
            along it back to that minimum (:meth:`StepOutcome.shortened <mcmc_unlearner.step.StepOutcome.shortened>`:
            a line search on the check's own measurement, no extra passes); ``report.step_length`` says how much.
        recenter_every: Every this many requests (0: never) restore the first moment the influence steps keep
            only to first order, :math:`E_s[∇F(θ'_s, S∖S')] = E_s[∇F(θ_s, S)]`, on every remaining row
            (:meth:`_recenter`; needs a bank and a data source with ``remaining()``, else it is off and
            ``report.info["recenter"]`` says why). It corrects what accumulates across many requests: approximate
            curvature (K-FAC), damping and nonlinearity. Each correction costs about ``recenter_draws`` gradient
            passes over the remaining data (twice that the first time: the original samples' side), and every
            request one more gradient of its removed points at 16 samples. ``"auto"`` (default): every
            ``RECENTER_AUTO_EVERY`` = 10 requests with ``solver="kfac"`` in one process without a custom energy,
            never otherwise. Measured on Fashion-MNIST's 94 requests (seeds 0, 2, 3, one machine): 3.49 ± 1.08 →
            1.82 ± 0.24× the retrain-pair distance at 1.8× the CPU time (78–98 → 136–172 s); correcting after
            every one of the digits BNN's 3 requests made that result worse, and so did this default's one
            correction when the class was removed in 17 requests until it was measured at enough draws to tell it
            from noise (``recenter_draws``; docs/fashion-mnist.md). Once a correction has been applied, the
            requests are damped as ``H + λI`` (``damping_shape``), and it clears the carried influence
            (:meth:`_recenter`).
        recenter_draws: Stored samples (evenly spaced, the same ones every time) at which the first moment is measured
            on every remaining row, each a pass over it. ``"auto"`` (default): draw by draw, from 2 up to
            ``RECENTER_MAX_DRAWS`` = 8, until the Monte-Carlo standard error of the measured deviation is at most
            ``RECENTER_REL_SE`` = 0.5 of its norm (``report.info["recenter_draws"]``, ``["recenter_stderr"]``); a
            deviation that is not clear of its noise after 8 draws is not corrected (``info["recenter"]`` says so). Once
            a correction has measured the spread (two or more draws), the next ones start from one draw and stop there
            when that spread, scaled to how far the bank has moved since, is within the same bound
            (``info["recenter_noise"] = "carried"``; else they measure again), two corrections in a row at most
            (``RECENTER_CARRY_MAX``): the third measures again (``info["recenter_spread_stale"]``). The measured part
            is a paired difference, which one draw estimated well enough on Fashion-MNIST (1 and 2 draws ended
            equally near retraining) but not on the digits BNN, whose samples differ more from each other: there the
            deviation from one draw was 1.4–1.8× the four-draw value, and the correction taken on it ended the
            17-request class removal farther from retraining than no correction (docs/fashion-mnist.md, stop 26). An
            integer fixes the number of draws (1: the default before stop 26).
        damping_shape: ``"auto"`` (default): on a freshly built curvature the damping is searched as ``H + λI`` and
            the backend's other shapes (K-FAC: the data term damped alone, ``H_prior + (1 + λ/s)·H_data``) are tried
            once at the damping accepted, the other shape's step taken only when its measured energy change, less
            the credit for following ``G``'s Monte-Carlo error, is lower by more than two standard errors
            (:mod:`mcmc_unlearner.step`); once a correction across requests has been applied (``recenter_every``), only
            ``H + λI``, the corrections' own shape. A request whose removed rows' integer labels are spread like the
            remaining rows' (:func:`~mcmc_unlearner.step.labels_spread`: random rows, not a class removed in pieces)
            searches the data shape first and takes ``H + λI`` only where it is clearly better, also after
            corrections (``report.info["removed_labels_spread"]``). ``"identity"`` or ``"data"`` (K-FAC) fix it.
        emptied_label: ``"always"`` (default since stop 61): a request that removes the last rows of a label draws
            that label's output-layer row, in every sample, from its conditional given the remaining rows (a Gibbs
            step of the retrained posterior, :mod:`mcmc_unlearner.emptied`; README step 6; needs a final
            ``nn.Linear`` giving the logits (or a fixed multiple of a sum of ``nn.Linear`` outputs: heads averaged,
            a head mean-pooled over tokens), a plain or row-weighted cross-entropy (``weight=``), a ``log_prior``
            and remaining rows it can list: a tuple, a
            ``RemovableDataset``, a ``DataLoader`` over a ``TensorDataset``, and at most ``emptied_max_row_evals``
            sample-row evaluations) and checks again; where its row cannot be
            drawn (or the draw is not kept) a label still the top class of the posterior predictive on half those
            rows or more (``EMPTIED_LABEL_MAX_TOP``) is refused whatever its probability; ``"resample"``: the same,
            but only for a label the moved samples still give a tenth of the probability or more on those rows
            (``EMPTIED_RESAMPLE_PROB``) or make the top class on half of them or more (saves the draw's cost where
            the label reads forgotten); ``"refuse"``: no draw, a request leaving the label predicted (one half or
            more in mean probability, or the top class on half its rows or more,
            ``info["emptied_labels_top_share"]``) is refused.
        slope_eta: The slope test of the damping search (:meth:`DampingControl._slope_fails
            <mcmc_unlearner.step.DampingControl._slope_fails>`, since stop 63): a step along which the bank's own
            slope of the remaining data's energy is clearly (3 standard errors) below this share of the model's
            ``G·x`` is rejected, the bank not being at equilibrium along it (a chain too short to have moved where
            only the removed rows pull); a search every step of which fails, some by this test, is cut to the bank's
            own minimum along its step or refused. A number in ``[0, 1)``; ``0`` or ``None`` turns the test off
            (``un.control.slope_eta``; :data:`~mcmc_unlearner.step.SLOPE_ETA` = 0.25 by default).
        direct_z: Reject a request's step whose energy change measured *directly* (the held rows' energies and the
            prior's, without the control variate, which credits the step with ``−G·x`` as if the bank were at
            equilibrium along it) rises by more than this many of its standard errors; a search every step of which
            it rejects goes where one the slope test fails goes (searched again without both, cut to the bank's own
            minimum along its step or refused; with ``slope_eta=0`` refused as it stands;
            ``report.info["direct_rejected"]``: the trials it rejected). Its
            standard error counts the check draws' spread as well as the rows'. A number ``>= 0``; ``0`` (the
            default) or ``None`` turns the test off (``un.control.direct_z``; stop 67 measured
            :data:`~mcmc_unlearner.step.DIRECT_Z` = 5, docs/model-matrix.md "Stop 67: a request's direct rise
            refused", and did not make it the default; the corrections across requests use 2, the rows' error alone).
        emptied_max_row_evals: The bank's samples × remaining rows the emptied-class draw (``emptied_label``) may
            read, one forward pass of the model per sample over every remaining row (the live chain's sample, drawn
            apart, is held to it too: 1 × the rows); beyond it the row is not drawn (``info["emptied_label_resample"]``
            says so) and the request is judged as without the draw. An integer >= 1;
            :data:`~mcmc_unlearner.emptied.RESAMPLE_MAX_ROW_EVALS` = 2**22 by default (Fashion-MNIST's 100 samples ×
            54,000 rows need 5.4e6: docs/fashion-mnist.md, stop 65).

    Attributes:
        history: Every applied request's :class:`RemovalReport`, in order. It is never trimmed (about a kilobyte per
            request, its damping trials included): a process serving requests for weeks may ``history.clear()``
            after recording them (the deletion service writes each to its ledger).
    """

    def __init__(
        self,
        model: nn.Module,
        sampler: torch.optim.Optimizer | None = None,
        *,
        nll: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
        log_prior: Callable[[nn.Module], torch.Tensor] | None = None,
        energy: Callable[[nn.Module, Batch, int], torch.Tensor] | None = None,
        bank: Any = None,
        solver: SolverName | str = "auto",
        expectation: Expectation | str | None = None,
        hessian: HessianKind | str = HessianKind.REMAINING,
        bank_shift: BankShift | str = "auto",
        damping: float | str = "auto",
        scaling: float | str = "auto",
        iter_T: int = 100,
        tol: float = 1e-4,
        samp_T: int = 5,
        grad_draws: int | str | None = "auto",
        turn_draws: bool | str = "auto",
        curvature_draws: int | None = None,
        refresh_every: int | None = None,
        precondition_rank: int = 0,
        drift_tol: float = 2.0,
        check_draws: int = CHECK_DRAWS,
        check_rows: int = 256,
        check_screen: ScreenMode | str | bool = "reject",
        negative_curvature: str = "raise",
        newton_steps: int | str = 1,
        newton_target: str = "equilibrium",
        curvature_data: str = "auto",
        exact_max_dim: int = 1000,
        memory_budget: int | float | str | None = None,
        likelihood: str = "auto",
        mc_samples: int = 1,
        max_damping_trials: int = 12,
        rescale_lr: bool = True,
        backend: str = "auto",
        seed: int = 0,
        carry_deficit: bool = True,
        shorten_steps: bool = True,
        recenter_every: int | str = "auto",
        recenter_draws: int | str = "auto",
        damping_shape: DampingShape | str = "auto",
        emptied_label: EmptiedLabel | str = "always",
        slope_eta: float | None = SLOPE_ETA,
        emptied_max_row_evals: int = RESAMPLE_MAX_ROW_EVALS,
        newton_gate: float | None = NEWTON_GATE_Z,
        direct_z: float | None = 0.0,
    ) -> None:
        if not isinstance(model, nn.Module):
            # stop 63's probe: a function wrapping the model (``lambda x: net(x)``) failed with Python's bare
            # "'function' object has no attribute 'named_parameters'"
            raise TypeError(
                f"model must be a torch.nn.Module (the network whose parameters the bank holds), got "
                f"{type(model).__name__}: pass the module itself; a function around it (e.g. lambda x: net(x)) "
                "hides the parameters the unlearner moves. Put what the function adds into the module's forward or "
                "into nll(model, batch)"
            )
        if eager(model) is not model and any(
            getattr(model, k, None)
            for k in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        ):
            raise ValueError(
                "the torch.compile'd model has hooks registered on the compiled wrapper itself; the unlearner "
                "evaluates the module it wraps (model._orig_mod, the same parameters), where those hooks do not run, "
                "so it would unlearn another function. Register them on model._orig_mod instead (they run under "
                "torch.compile too)"
            )
        model = eager(model)  # a torch.compile'd model: the module it wraps (swapping parameters recompiled it)
        _refuse_lazy(model)
        _check_mode(model)
        self.model = model
        self.sampler = sampler
        self.spec = ParamSpec.of(model)
        if self.spec.dim == 0:
            raise ValueError("the model has no trainable parameters (requires_grad) to unlearn")
        _check_complex_parameters(model)
        self._param_dtype = ParamSpec.params(model)[0].dtype  # a request refuses a model converted since
        self._param_devices = tuple(p.device for p in ParamSpec.params(model))  # ... or moved since
        low = sorted({str(p.dtype) for p in ParamSpec.params(model) if p.dtype in (torch.float16, torch.bfloat16)})
        if low:
            raise ValueError(
                f"the model's parameters are {'/'.join(low)}: 8-11 significant bits cannot hold a removal's shift "
                "(typically far below a weight's rounding step) and make the solves and the safety check inexact. "
                "Unlearn in float32: model.float() and a float32 bank (cast back afterwards if you must)"
            )
        mixed = {p.dtype: n for n, p in reversed(list(model.named_parameters())) if p.requires_grad}
        if len(mixed) > 1:
            kinds = ", ".join(f"{str(t).removeprefix('torch.')} ({n!r}, ...)" for t, n in reversed(mixed.items()))
            raise ValueError(
                f"the model's trainable parameters have different dtypes: {kinds}. The unlearner keeps every sample as "
                "one flat vector and evaluates the model from it, so all trainable parameters need one dtype: cast "
                "the model (model.double() or model.float()) and the samples alike"
            )
        if nll is None and not hasattr(model, "nll"):
            raise TypeError("pass nll=callable(model, batch) or give the model an nll(batch) method")
        self.nll = _one_per_row(nll or _default_nll)
        if log_prior is None:
            log_prior = (lambda m: m.log_prior()) if hasattr(model, "log_prior") else None
        self.log_prior = log_prior
        self.custom_energy = energy is not None
        self.energy = energy or self._default_energy
        # every option is checked before the bank is read (copying and checking a large bank took 1-2 s, and a
        # misspelt option was refused only after it): a bad configuration is refused at once
        # (each value on its own by check_option, the command line's parse-time check too)
        self.memory_budget = check_option("memory_budget", memory_budget)
        # as given (None: the default budget, a percentage: of the memory available), which a saved folder keeps
        # while the budget is the one it resolved to here (service.state.saved_config)
        given_budget = memory_budget is None or isinstance(memory_budget, str)
        self._memory_budget_option: int | str | None = memory_budget if given_budget else self.memory_budget
        self._memory_budget_built = self.memory_budget
        self.exact_max_dim = check_option("exact_max_dim", exact_max_dim)
        self.hessian = check_option("hessian", hessian)  # before the choice: K-FAC builds "remaining" only
        # the rule solver='auto' follows is the command line's too (torch-free, on facts it states of a network)
        facts = self._model_facts()
        if solver == "auto":
            self.solver, self.solver_reason = auto_solver_reason(
                facts,
                self.hessian,
                self.exact_max_dim,
                self.memory_budget,
                self.custom_energy,
                self._reduce is not None,
            )
        else:
            self.solver, self.solver_reason = check_option("solver", solver), "chosen by the caller"
        # (torch-free, the command line's check of a network it knows: check_combinations); K-FAC named only where it
        # builds this curvature (stop 50's review: offered with hessian='full')
        problem = dense_memory_refusal(self.solver, facts.dim, facts.itemsize, self.memory_budget, self._kfac_builds())
        if problem:
            raise MemoryError(problem)
        self.expectation = check_option("expectation", expectation)
        if self.expectation is Expectation.CHAIN and sampler is None:  # was refused at the first request
            raise ValueError(
                "expectation='chain' draws from the live chain and needs the sampler: pass sampler=, or "
                "expectation='bank' with your stored samples as bank="
            )
        check_option("bank_shift", bank_shift)
        self._bank_shift_option = "auto" if bank_shift == "auto" else BankShift(bank_shift).value
        if bank_shift == "auto":
            bank_shift = BankShift.AFFINE if self.solver in _DENSE else BankShift.MEAN
        self.bank_shift = BankShift(bank_shift)
        check_bank_shift_solver(self.bank_shift, self.solver)  # (torch-free: the command line's check too)
        if self.solver is SolverName.GGN and self._reduce is not None:
            raise ValueError("solver='ggn' runs in one process; under torch.distributed use solver='kfac' or 'exact'")
        if self.solver is SolverName.GGN and self.custom_energy:
            raise ValueError(
                "solver='ggn' builds the curvature from nll and log_prior and cannot use a custom energy=; pass "
                "nll= and log_prior= instead, or solver='exact'"
            )
        if self.solver is SolverName.KFAC and self.custom_energy:
            # K-FAC's factors come from nll and log_prior: a custom energy (a prior 200x log_prior's) was left out
            # and the step taken 15x too long, every check passed (stop 47's probe)
            raise ValueError(
                "solver='kfac' builds its curvature from nll and log_prior and cannot use a custom energy=; pass "
                "nll= and log_prior= instead, or solver='exact' or 'cg' (Hessian products of the energy)"
            )
        check_hessian_solver(self.solver, self.hessian)
        self.check_screen = check_option("check_screen", check_screen)
        screen_accepts = self.check_screen is ScreenMode.BOTH
        max_damping_trials = check_option("max_damping_trials", max_damping_trials)
        slope_eta = check_option("slope_eta", slope_eta)
        direct_z = check_option("direct_z", direct_z)
        self.control = DampingControl(
            damping,
            max_trials=max_damping_trials,
            screen_accepts=screen_accepts,
            slope_eta=slope_eta or None,
            direct_z=direct_z or None,
            direct_draws=True,
        )
        self.damping_shape = check_option("damping_shape", damping_shape)
        check_damping_shape_solver(self.damping_shape, self.solver)
        if self.damping_shape is not DampingShape.AUTO:
            self.control.shape = self.damping_shape.value
        self.emptied_label = check_option("emptied_label", emptied_label)
        self.emptied_max_row_evals = check_option("emptied_max_row_evals", emptied_max_row_evals)
        self.damping = damping if isinstance(damping, str) else float(damping)
        check_option("scaling", scaling)
        # finite in float64 but not in the parameters' dtype: damping=1e300 in float32 was refused as a solve that
        # stopped after 0 iterations ("raise iter_T"), scaling=1e-50 as one that stopped after iter_T
        dtype = ParamSpec.params(model)[0].dtype
        if not isinstance(damping, str):  # (one that rounds to zero is damping=0, allowed)
            _representable("damping", self.damping, dtype, DAMPING_FIX, zero_ok=True)
        if not isinstance(scaling, str):
            _representable("scaling", float(scaling), dtype, SCALING_FIX)
        self.scaling = scaling
        self.iter_T = check_option("iter_T", iter_T)
        self.tol = check_option("tol", tol)
        self.samp_T = check_option("samp_T", samp_T)
        self.grad_draws = check_option("grad_draws", grad_draws)
        self.turn_draws: bool | str = check_option("turn_draws", turn_draws)
        self.curvature_draws = check_option("curvature_draws", curvature_draws) or default_curvature_draws(self.solver)
        if self.curvature_draws < 1:
            raise ValueError(f"curvature_draws must be >= 1, got {shown_value(curvature_draws)}")
        # asked for by name: a bank smaller than that is said once (the default is capped without a word)
        self._curvature_draws_given = curvature_draws is not None
        refresh = check_option("refresh_every", refresh_every)
        # given (a folder saves it as given: not given, the solver's default where it is loaded, as curvature_draws)
        self._refresh_every_given = refresh_given = bool(refresh)
        self.refresh_every = refresh or default_refresh_every(self.solver)
        precondition_rank = check_option("precondition_rank", precondition_rank)
        given_rank = precondition_rank  # (before auto's CG gets its default rank)
        if precondition_rank <= 0 and (
            self.solver is SolverName.LOWRANK or (self.solver is SolverName.CG and solver == "auto")
        ):
            precondition_rank = 20  # lowrank's approximation needs a rank; CG chosen by auto gets its preconditioner
        self.precondition_rank = int(precondition_rank)
        self.drift_tol = check_option("drift_tol", drift_tol)
        self.check_draws = check_option("check_draws", check_draws)
        self.check_rows = check_option("check_rows", check_rows)
        self.negative_curvature = check_option("negative_curvature", negative_curvature)
        self.newton_steps = check_option("newton_steps", newton_steps)
        self.newton_target = check_option("newton_target", newton_target)
        self.newton_gate = check_option("newton_gate", newton_gate)
        if self.newton_steps == "auto" and self.newton_target != "equilibrium":
            raise ValueError(
                "newton_steps='auto' decides from the bank's gap to equilibrium, which newton_target='relative' "
                "keeps: pass newton_target='equilibrium', or an integer newton_steps"
            )
        self.curvature_data = check_option("curvature_data", curvature_data)
        self.likelihood = check_option("likelihood", likelihood)
        self.mc_samples = check_option("mc_samples", mc_samples)
        self.rescale_lr = check_option("rescale_lr", rescale_lr)
        _check_sampler(sampler, self.rescale_lr, model)
        self.backend = check_option("backend", backend)
        self.generator = torch.Generator().manual_seed(check_option("seed", seed))
        self._caller_storages = _Protected()  # the caller's tensors: the banks given, the samples returned
        self._caller_storages.add(bank, bank=True)
        _own_parameters(model, self._caller_storages)
        _check_log_prior(model, log_prior)  # after: it writes 0.9·θ into the parameters (then θ back)
        self._layout: BankLayout | None = None
        self._set_bank(bank, fresh=True)  # copied, in the layout it came in; non-finite samples refused
        # solver='auto' took K-FAC: the first request (or fit) looks on a few rows for a factored weight also read
        # outside its module, and takes CG where it finds one (_auto_probe): the defaults that depend on the
        # solver and were not given are then CG's
        self._auto_probe: dict[str, bool] | None = None
        if solver == "auto" and self.solver is SolverName.KFAC and self._reduce is None:
            self._auto_probe = {
                "curvature_draws": not self._curvature_draws_given,
                "refresh_every": not refresh_given,
                "precondition_rank": given_rank <= 0,
                "recenter_every": recenter_every == "auto",  # (the option as given)
                "kfac_options": likelihood != "auto" or self.mc_samples != 1,
            }
        # solver='auto' took a dense solver: the first request (or fit) estimates its build's cost on the first rows
        # it reads and takes K-FAC or CG where that is over what auto accepts and they are cheaper
        # (_weigh_dense_build); only with the options that pick a path's behaviour at their defaults
        self._dense_probe: dict[str, bool] | None = None
        self._dense_cost = ""  # the estimate where the dense build was kept (report.info["dense_cost"])
        solver_options = (
            scaling != "auto",
            self.iter_T != 100,
            given_rank != 0,
            negative_curvature != "raise",
            likelihood != "auto",
            self.mc_samples != 1,
            self._bank_shift_option != "auto",
        )
        if solver == "auto" and self.solver in _DENSE and self._reduce is None and not any(solver_options):
            self._dense_probe = {
                "curvature_draws": not self._curvature_draws_given,
                "refresh_every": not refresh_given,
                "recenter_every": recenter_every == "auto",  # (the option as given)
            }
        self._warn_ineffective(
            {
                "scaling": scaling != "auto",
                "iter_T": self.iter_T != 100,
                "precondition_rank": given_rank != 0,
                "negative_curvature": negative_curvature != "raise",
                "likelihood": likelihood != "auto",
                "mc_samples": self.mc_samples != 1,
                "turn_draws": turn_draws != "auto",
            }
        )
        self.curvature: CurvatureBackend = self._new_backend()
        self.history: list[RemovalReport] = []
        self.carry_deficit = check_option("carry_deficit", carry_deficit)
        self.shorten_steps = check_option("shorten_steps", shorten_steps)
        recenter_every = check_option("recenter_every", recenter_every)
        if recenter_every == "auto":
            # Kronecker-factored curvature: its approximation error accumulates over a sequence of requests
            on = self.solver is SolverName.KFAC and not self.custom_energy and self._reduce is None
            recenter_every = RECENTER_AUTO_EVERY if on else 0
        self.recenter_every = recenter_every
        self.recenter_draws: int | str = check_option("recenter_draws", recenter_draws)
        if self.recenter_every and self.custom_energy:
            raise ValueError(
                "recenter_every measures F = -log prior + Σ nll on every row and cannot use a custom energy=; pass "
                "nll= and log_prior= instead, or recenter_every=0"
            )
        self._anchor: _Anchor | None = None  # the first moment recenter_every restores
        self._rows_at_samples: int | None = None  # rows at the first request since the bank was set
        self._cumulative_warned = False  # a request beyond CUMULATIVE_REMOVAL was applied (warned until then)
        self._carry: torch.Tensor | None = None  # λx of the last damped step: influence not yet applied
        self._plain_categorical: bool | None = None  # nll is a plain cross-entropy (found on the first request)
        self._categorical = False  # a cross-entropy with a temperature, scale, label smoothing or row weights
        self._label_link: tuple[dict[str, Any], str] = ({}, "")  # detect_likelihood's extras; why not categorical
        #: not categorical: the model's output values per row, which an integer target must index to be a class
        #: label (0: a Gaussian likelihood, a regression; ``None``: unknown)
        self._label_columns: int | None = None
        self._labels_read: set[int] = set()  # remaining labels nll was seen to read (_check_remaining_labels)
        self._unread_labels_warned = False  # the emptied-label check could not read the remaining labels (warned once)
        self._later_labels_read: bool | None = None  # later integer fields may hold the labels (nll unrecognised)
        self._output_width: int | None = None  # the model's output width, from that probe (None: not read)
        self._probed: tuple[list[weakref.ref], Any] | None = None  # _likelihood_probe's, this request's removed rows
        self._joined = _JoinedList()  # a list of minibatches' rows, kept while the list is unchanged (_stream)
        self._forward_checked = False  # _check_forward ran (on the first request)
        self._forward_row_gap: float | None = None  # its rows-alone gap above rounding, below refusal (reported once)
        self._forward_row_gap_float64: float | None = None  # that gap in float64, where float32's was above refusal
        #: the forward check's sample, rows and their values alone, for the mixed-batch test on the first remaining
        #: minibatch (:meth:`_check_mixed_rows`); ``None`` once it ran
        self._row_alone: tuple[torch.Tensor, Batch] | None = None
        self._mixed_checked = False  # _check_mixed_rows passed (on the first request it could mix the rows)
        self._mixed_skipped = False  # ... could not mix them on this request (report.info["forward_mixed_check"])
        #: where they could not be mixed: the remaining minibatch's own rows test (:meth:`_check_mixed_rows`) passed
        #: (``None``: not run; else the rows it compared, for the report)
        self._remaining_rows_checked: int | None = None
        #: the operation torch cannot differentiate twice that _check_forward found (every request is refused)
        self._once_differentiable_op: str | None = None
        # bytes the double-backward check needs on one row where the budget did not fit it (put off: _check_forward)
        self._once_deferred: int | None = None
        # bytes the first request's other checks of nll need on one row where the budget did not fit them (put off)
        self._forward_deferred: int | None = None
        self._check_cost = (0, 0, 0)  # (per row, per call, per copy of the parameters) of the forward check's rows
        self._vmap_fallbacks_seen: set[str] = set()  # operations vmap ran unbatched, recorded once (report.info)
        self._forward_mixed_gap: float | None = None  # its gap above rounding, below refusal (reported once)
        self._forward_mixed_gap_float64: float | None = None  # that gap in float64, where float32's was above refusal
        self._version = 0
        #: a digest of every row that applied requests removed since the caller's bank was set (never the rows; saved
        #: by :meth:`curvature_state`): a row sent again is refused (:meth:`_removed_before`)
        self._removed_digests = set()
        self._g_round = 0  # requests applied: which draws the next request's G reads (_turned)
        self._row_bytes: int | None = None
        #: the request being proposed (stream, remaining count, removed rows): what a memory refusal's suggested
        #: solvers are planned for (:meth:`_alternatives`); ``None`` between requests
        self._asked: tuple[_Stream, int, Batch] | None = None
        self._asked_chain = False  # the request draws from the live chain: its curvature rows are not a minibatch's
        self._call_bytes = 0  # saved per call whatever the rows (memory.row_and_call_bytes)
        self._planned: dict[str, int] = {}  # this request's planned bytes per path (report.info["memory"])
        self._request_cpu = 0.0  # the CPU clock at this request's start (_cpu_seconds)
        self._remaining_nll_checked = False  # nll read a remaining minibatch (fit's or a request's), once
        self._buffers_checked = False  # a training-mode model's buffers, checked once (_check_buffers_stable)
        self._order_checked = False  # a flat bank's column order, checked against the data on the first request
        self._hvp_checked = False  # Hessian products against finite differences, on the first request
        self._fitted = False  # the cached curvature was built by fit(): the next request takes it as its own build
        self._fit_data: tuple[float, float] | None = None  # fit's data: mean NLL and its standard error (_data_nll)
        #: (iterator, minibatches): the first minibatch fit() read from a plain iterator to probe, where auto then
        #: took CG and built nothing, or those a request refused before its work read ahead: the next request reading
        #: that iterator reads them first (read once, not lost)
        self._held_first: tuple[Any, list[Batch]] | None = None

    # ------------------------------------------------------------------ configuration
    def _warn_ineffective(self, given: Mapping[str, bool]) -> None:
        """Warn (once each) of options set away from their default that the chosen solver or expectation never
        reads (they were ignored without a word). ``given``: per option, whether it was set. Where ``solver='auto'``
        took K-FAC and may still switch to CG (:meth:`_take_cg_if_read_outside`), an option CG reads is said to
        apply then (and the switch's warning names it)."""
        self._applies_on_switch: list[str] = []  # given options CG reads that K-FAC does not: read once switched
        for name, (used, by) in {
            "scaling": (self.solver is SolverName.LISSA, "LiSSA's"),
            "iter_T": (self.solver in (SolverName.LISSA, SolverName.CG), "LiSSA's and CG's"),
            "precondition_rank": (self.solver in (SolverName.CG, SolverName.LOWRANK), "CG's and lowrank's"),
            "negative_curvature": (self.solver is SolverName.CG, "CG's"),
            "likelihood": (self.solver is SolverName.KFAC, "K-FAC's"),
            "mc_samples": (self.solver is SolverName.KFAC, "K-FAC's"),
        }.items():
            if given[name] and not used:
                auto = self.solver_reason != "chosen by the caller"
                how = " (what solver='auto' chose for this model)" if auto else ""
                then, instead = "", ""
                if name in _CG_READS and self._may_switch_to_cg():
                    # true either way: auto's probe may yet take CG, which reads it (stop 55's review: the warning
                    # said "no effect" and the option then took effect)
                    self._applies_on_switch.append(name)
                    how += (
                        ", unless solver='auto' switches to CG on the first rows it reads (it does where a factored "
                        "layer's weight is also read outside its module, e.g. a tied decoder's "
                        "F.linear(h, enc.weight.t()))"
                    )
                    then, instead = ", and applies then", " (solver='cg')"
                warnings.warn(
                    f"{name}={shown_value(getattr(self, name))} has no effect with solver={self.solver.value!r}{how}: "
                    f"it is {by} option{then}; leave it out, or pass a solver that reads it{instead}",
                    UserWarning,
                    stacklevel=outside_stacklevel(),
                )
        if given["turn_draws"] and self.expectation is Expectation.CHAIN:
            warnings.warn(
                f"turn_draws={shown_value(self.turn_draws)} has no effect with expectation='chain': it picks which "
                "stored samples G reads, and chain mode reads fresh chain draws instead; leave it out, or use "
                "expectation='bank'",
                UserWarning,
                stacklevel=outside_stacklevel(),
            )

    def _model_facts(self) -> ModelFacts:
        """What ``solver='auto'``'s rule reads of the model (:func:`~mcmc_unlearner.options.auto_solver_reason`)."""
        layers = self._kfac_layers()
        uses = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        shared = {
            type(m).__name__
            for m in self.model.modules()
            if isinstance(m, _WEIGHT_SHARING) and any(p.requires_grad for p in m.parameters(recurse=False))
        }
        return ModelFacts(
            dim=self.spec.dim,
            itemsize=ParamSpec.params(self.model)[0].element_size(),
            kfac_layers=len(layers),
            weight_sharing=tuple(sorted(shared)),
            attention=any(isinstance(m, nn.MultiheadAttention) for m in self.model.modules()),
            tied_layers=sum(uses[id(m.weight)] > 1 for m in layers),
            diagonal_layers=len(_unfactored_layers(self.model, layers)),
        )

    def _take_cg_if_read_outside(self, batch: Batch) -> None:
        """``solver="auto"`` took K-FAC: once, before the first build, look on a few rows of ``batch`` for a layer
        K-FAC would factor whose weight is also read outside its module (a tied decoder's
        ``F.linear(h, enc.weight.t())``; :func:`~mcmc_unlearner.kronecker.read_outside_layers`) and, where one is,
        take matrix-free CG instead (its defaults where the caller gave none): K-FAC can hold such a weight only in
        its diagonal (docs/curvature.md, stop 55: a tied autoencoder on digits, its 0 digits forgotten, went 0.01-0.04
        of the way to retraining with K-FAC, 0.27-0.63 with CG). Kept as K-FAC where an option given for it, or
        one CG does not take, would be lost. Not under torch.distributed (no probe there)."""
        if not self._may_switch_to_cg():
            self._auto_probe = None
            return
        probe = self._auto_probe
        assert probe is not None
        from .kronecker import read_outside_layers

        unbatched: list[str] = []
        try:
            outside = read_outside_layers(self.model, self._row_nll, batch, unbatched)
        except (RuntimeError, TypeError, ValueError, IndexError, KeyError):
            self._auto_probe = None
            return  # (the build says what is wrong with the rows, as it did)
        if not outside and not unbatched:
            self._auto_probe = None
            return
        if not outside:
            # a layer called on an input without the batch's rows (a hypernetwork's learned code; stop 57's probe:
            # K-FAC with it left to the diagonal still took undamped ratios -5.5, 0.50 of the way to retraining
            # against CG's 0.57)
            self._take_cg_for_unbatched(probe, unbatched)
            return
        names = ", ".join(repr(n) for n in outside)
        # said once, before the switch: a warning raised as an error leaves auto's probe pending and nothing changed
        # (before: only solver_reason told, and K-FAC's own warning where it had been built)
        self._announce_cg_switch(
            probe,
            f"the weights of {names} are also read outside their modules (e.g. a tied decoder's "
            "F.linear(h, enc.weight.t())), which K-FAC can hold only in its diagonal",
            "",
            f"; but the weights of {names} are also read outside their modules (e.g. a tied decoder's "
            "F.linear(h, enc.weight.t())), which K-FAC's blocks cannot hold (found on the first rows read): "
            "matrix-free CG",
        )

    def _take_cg_for_unbatched(self, probe: dict[str, Any], unbatched: list[str]) -> None:
        """:meth:`_take_cg_if_read_outside` found layers called on an input without the batch's rows (and none
        read outside its module): said once, then matrix-free CG as for a read outside."""
        names = ", ".join(repr(n) for n in unbatched)
        are = "is" if len(unbatched) == 1 else "are"
        self._announce_cg_switch(
            probe,
            f"{names} {are} called on an input without the batch's rows (e.g. a hypernetwork's learned code of shape "
            "[4]), one location shared by every row, which K-FAC's per-row factors cannot hold",
            " (those layers on its diagonal)",
            f"; but {names} {are} called on an input without the batch's rows (e.g. a hypernetwork's learned code), "
            "which K-FAC's per-row factors cannot hold (found on the first rows read): matrix-free CG",
        )

    def _announce_cg_switch(self, probe: dict[str, Any], why: str, keep: str, reason: str) -> None:
        """Say once why ``solver='auto'`` leaves the K-FAC it took (``why``; ``keep``: what ``solver='kfac'`` would
        do instead), naming CG's defaults and the options given that now apply, then take matrix-free CG
        (``reason``: appended to ``solver_reason``)."""
        defaults = ", ".join(f"{name}={shown_value(v)}" for name, v in _CG_SWITCH_DEFAULTS.items() if probe[name])
        applies = ", ".join(f"{name}={shown_value(getattr(self, name))}" for name in self._applies_on_switch)
        verb = "apply" if len(self._applies_on_switch) > 1 else "applies"
        warnings.warn(
            f"solver='auto' took K-FAC for this model, but {why}: solver='auto' now uses matrix-free CG"
            f"{f' (its defaults {defaults})' if defaults else ''}"
            f"{f'; {applies}, given and not read by K-FAC, now {verb}' if applies else ''}. "
            f"To keep K-FAC{keep}, pass solver='kfac'",
            UserWarning,
            stacklevel=outside_stacklevel(),
        )
        self._auto_probe = None
        self._switch_to_cg(probe, reason)

    def _may_switch_to_cg(self) -> bool:
        """Whether ``solver='auto'``'s pending probe may still take CG: not where an option given for K-FAC
        (``likelihood``, ``mc_samples``), or one CG does not take (``damping_shape='data'``), would be lost."""
        probe = self._auto_probe
        if probe is None or probe["kfac_options"]:
            return False
        try:
            check_bank_shift_solver(self.bank_shift, SolverName.CG)
            check_damping_shape_solver(self.damping_shape, SolverName.CG)
        except ValueError:
            return False
        return True

    def _new_backend(self) -> CurvatureBackend:
        """A fresh backend of ``self.solver`` with this unlearner's settings (``make_backend`` takes the ones it
        needs): built with the unlearner, and again at ``solver="auto"``'s switches away from its first pick."""
        return make_backend(
            self.solver,
            refresh_every=self.refresh_every,
            iter_T=self.iter_T,
            tol=self.tol,
            precondition_rank=self.precondition_rank,
            negative_curvature=self.negative_curvature,
            scaling=self.scaling,
            likelihood=self.likelihood,
            mc_samples=self.mc_samples,
        )

    def _switch_to_cg(self, probe: dict[str, bool], why: str) -> None:
        """``solver="auto"``'s switch from K-FAC to CG, with CG's defaults for what the caller did not give."""
        self.solver = SolverName.CG
        self.solver_reason += why
        for name, value in _CG_SWITCH_DEFAULTS.items():
            if probe[name]:
                setattr(self, name, value)
        self._fitted, self._fit_data = False, None  # a K-FAC fit() kept (a loaded state's switch) is not CG's
        self.curvature = self._new_backend()

    def _weigh_dense_build(self, batch: Batch, stream: _Stream | None) -> None:
        """``solver="auto"`` took a dense solver (``exact``/``ggn``): once, before the first build, estimate its cost
        on two of ``batch``'s rows (:func:`~mcmc_unlearner.options.weigh_dense_build`: the model's outputs per row,
        and whether the vectorised product the build takes runs on them) and take K-FAC, or matrix-free CG, where
        the dense build is over what auto accepts and they are cheaper (``solver_reason`` gives the estimates; where
        kept, ``report.info["dense_cost"]``). A ConvTranspose2d decoder with 64 outputs per row took 77 s CPU with
        the dense Gauss-Newton matrix, 8x its whole SGLD chain, and 2.2 s with K-FAC; a frozen ``nn.EmbeddingBag``
        fed by masked ids, whose vectorised product ``vmap`` cannot batch, 24 s with the dense Hessian's 9,792
        reverse-mode products (stop 58's probe)."""
        probe, self._dense_probe = self._dense_probe, None
        if probe is None or self.solver not in _DENSE:
            return
        draws = self.bank.shape[0] if self.bank is not None else self.curvature_draws
        try:
            shared = self._dense_probe_shared(stream, min(self.curvature_draws, draws))
            from .kronecker import preserved

            # the model's buffers (a step counter its forward keeps) and the global RNG as they were: the request's
            # snapshot is taken after this, and a discarded proposal left the counter moved (stop 58's review)
            with preserved(self.model):
                outputs, vectorized = self._dense_probe_rows(batch, shared)
                uses = self._dense_probe_uses(batch) if self.solver is SolverName.EXACT else 1.0
        except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError):
            return  # (the build says what is wrong with the rows, as it did)
        solver, why = weigh_dense_build(
            self.solver,
            self.spec.dim,
            outputs,
            vectorized,
            self.exact_max_dim,
            self._kfac_builds(),
            bool(self._model_facts().weight_sharing),
            self.iter_T,
            self.mc_samples,
            min(self.curvature_draws, draws),
            min(8 if probe["curvature_draws"] else self.curvature_draws, draws),
            uses,
        )
        if solver is self.solver:
            self._dense_cost = why
            return
        self._switch_from_dense(solver, why, probe)

    def _dense_probe_shared(self, stream: _Stream | None, draws: int) -> bool:
        """Whether the dense build reads every remaining row at every one of ``draws`` draws (shared, the product
        vectorised over draws alone) rather than a minibatch per draw, as :meth:`_curvature_data` decides it: ``auto``
        reads every row only for the dense Hessian where rows × draws is within ``FULL_ROWS_MAX`` (5,580 listed rows
        at 6 draws took a minibatch per draw, whose product ``vmap`` could not batch, while the estimate had taken
        them as shared: stop 58's review)."""
        if self.curvature_data == "minibatch" or stream is None or not stream.listable:
            return False
        if self.curvature_data == "full":
            return True
        return self.solver is SolverName.EXACT and stream.n * draws <= FULL_ROWS_MAX

    def _dense_probe_rows(self, batch: Batch, shared: bool) -> tuple[int, bool]:
        """The model's outputs per row on ``batch``'s first row, and whether the dense build's vectorised product
        (``vmap`` over draws, with each draw's rows where they are not ``shared``; over rows for the Gauss-Newton
        matrix's Jacobians) runs on two of its rows at two draws: one vector-Jacobian product of the gradient."""
        rows = tuple(t[:2] for t in self._raw(batch))
        theta = self.bank[:2].detach()
        outputs = 0  # (read for the Gauss-Newton matrix only: the model takes the rows' first field there)
        if self.solver is SolverName.GGN:
            with torch.no_grad():
                outputs = _first_float(self.model(rows[0][:1])).numel()
            f = functionalize(self.model, lambda m, x: _first_float(m(x)))

            def row_vjp(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                y, pull = vjp(lambda u: f(u, x.unsqueeze(0)).reshape(-1), t)
                return pull(torch.ones_like(y))[0]

            probe_fn, dims, args = row_vjp, (None, 0), (theta[0], rows[0])
        else:
            f = self._h_f()
            v = torch.ones_like(theta[0])

            def draw_vjp(t: torch.Tensor, *b: torch.Tensor) -> torch.Tensor:
                return vjp(lambda u: grad(f)(u, *b), t)[1](v)[0]

            k = theta.shape[0]
            args = rows if shared else tuple(t.unsqueeze(0).expand(k, *t.shape) for t in rows)
            probe_fn, dims = draw_vjp, (0, *([None if shared else 0] * len(rows)))
            args = (theta, *args)
        try:
            with quiet_vmap_fallbacks():
                vmap(probe_fn, in_dims=dims)(*args)
        except (RuntimeError, NotImplementedError, TypeError):
            return outputs, False
        return outputs, True

    def _dense_probe_uses(self, batch: Batch) -> float:
        """How many times a row's gradient uses each trainable parameter: the multiply-adds of the backward pass of
        one gradient of ``nll`` on ``batch``'s first two rows at the bank's first draw (counted by torch's
        ``FlopCounterMode``: matrix products and convolutions, a deterministic count: the gradient's less the forward
        pass's alone) per row, over ``4 × dim``, what a plain dense network's backward costs per row (each layer's
        weight and input gradients; 0.5-0.6 measured on MLPs). A vectorised Hessian column is one product over the
        row, so it costs this many times a dense layer's: weights applied at every position of a sequence (a
        612-parameter language model over 11 tokens, whose head is tied to its embedding: 10.4) or layers the
        gradient passes through without training them (a frozen layer between trained ones). That language model's
        dense Hessian took 36 s CPU, 8x its whole SGLD chain (stop 59's probe). A frozen backbone before the trained
        layers is not counted: its forward does not depend on the parameters, computed once for all the columns (a
        771-parameter head behind a frozen 32-256-256 backbone: 1.3 s for its dense Hessian, 1.2 s on the
        backbone's features; its whole gradient counted 32.5 and took K-FAC, stop 59's review). At least 1.

        Counted by :func:`_count_flops` on ``torch.autograd.grad`` (the same matrix products as ``torch.func.grad``,
        the same counts), which imports neither ``torch._dynamo`` nor sympy where they are not loaded yet:
        ``FlopCounterMode`` itself and ``torch.func.grad`` each import both (829 modules, 1.05 s CPU, stop 69)."""
        rows = tuple(t[:2] for t in self._raw(batch))
        n = int(rows[0].shape[0]) if rows and rows[0].dim() else 1
        theta = self.bank[0].detach().clone().requires_grad_(True)
        f = self._h_f()

        def gradient() -> None:
            with torch.enable_grad():
                torch.autograd.grad(f(theta, *rows), theta, allow_unused=True)

        try:
            counted = _count_flops(gradient)
            plain = theta.detach()  # (nothing requiring grad: the mode's module tracker hooks no parametrization)
            with torch.no_grad():
                forward = _count_flops(lambda: f(plain, *rows))
        except (RuntimeError, NotImplementedError, TypeError, AssertionError):  # (AssertionError: torch's tracker)
            return 1.0  # (not counted: the estimate as before)
        backward = max(counted - forward, 0)
        return max(1.0, backward / max(n, 1) / (4 * max(self.spec.dim, 1)))

    def _switch_from_dense(self, solver: SolverName, why: str, probe: dict[str, bool]) -> None:
        """``solver="auto"``'s switch from the dense solver it took to K-FAC or CG (:meth:`_weigh_dense_build`),
        with that solver's defaults for what the caller did not give (as ``solver="auto"`` sets them at
        construction); K-FAC then still looks for a weight read outside its module
        (:meth:`_take_cg_if_read_outside`)."""
        kfac = solver is SolverName.KFAC
        self.solver = solver
        self.solver_reason += why
        if probe["curvature_draws"]:
            self.curvature_draws = default_curvature_draws(solver)
        if probe["refresh_every"]:
            self.refresh_every = default_refresh_every(solver)
        if not kfac:
            self.precondition_rank = 20  # (auto's CG gets its preconditioner; none was given: _dense_probe)
        if probe["recenter_every"]:
            self.recenter_every = RECENTER_AUTO_EVERY if kfac and not self.custom_energy else 0
        self.bank_shift = BankShift.MEAN  # (bank_shift='auto': affine only with a dense solver)
        self._fitted, self._fit_data = False, None
        self.curvature = self._new_backend()
        if kfac:
            self._auto_probe = {
                "curvature_draws": probe["curvature_draws"],
                "refresh_every": probe["refresh_every"],
                "precondition_rank": True,
                "recenter_every": probe["recenter_every"],
                "kfac_options": False,
            }

    def _kfac_builds(self) -> bool:
        """Whether ``solver="kfac"`` builds this unlearner's curvature (what a refusal may suggest it for)."""
        return bool(self._kfac_layers()) and self.hessian is HessianKind.REMAINING and not self.custom_energy

    def _kfac_layers(self) -> list[nn.Module]:
        """The trainable ``Linear``/``Conv1d``/``Conv2d`` layers K-FAC would factor (what ``auto`` counts, and what a
        refusal that suggests ``solver='kfac'`` needs)."""
        return [
            m
            for m in self.model.modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.weight.requires_grad
        ]

    def config(self) -> dict[str, Any]:
        """The JSON configuration that rebuilds this unlearner (with the same model, sampler and bank)."""
        return {
            "solver": self.solver.value,
            "expectation": None if self.expectation is None else self.expectation.value,
            "hessian": self.hessian.value,
            "bank_shift": self._bank_shift_option,
            "damping": self.damping if isinstance(self.damping, str) else float(self.damping),
            "scaling": self.scaling if isinstance(self.scaling, str) else float(self.scaling),
            "iter_T": self.iter_T,
            "tol": self.tol,
            "samp_T": self.samp_T,
            "grad_draws": self.grad_draws if self.grad_draws in (None, "auto") else int(self.grad_draws),
            "turn_draws": self.turn_draws,
            "curvature_draws": self.curvature_draws,
            "refresh_every": self.refresh_every,
            "precondition_rank": self.precondition_rank,
            "drift_tol": self.drift_tol,
            "check_draws": self.check_draws,
            "check_rows": self.check_rows,
            "check_screen": self.check_screen.value,
            "negative_curvature": self.negative_curvature,
            "newton_steps": self.newton_steps,
            "newton_target": self.newton_target,
            "carry_deficit": self.carry_deficit,
            "shorten_steps": self.shorten_steps,
            "recenter_every": self.recenter_every,
            "recenter_draws": self.recenter_draws,
            "damping_shape": self.damping_shape.value,
            "emptied_label": self.emptied_label.value,
            "emptied_max_row_evals": self.emptied_max_row_evals,
            "curvature_data": self.curvature_data,
            "exact_max_dim": self.exact_max_dim,
            "likelihood": self.likelihood,
            "mc_samples": self.mc_samples,
            "max_damping_trials": self.control.max_trials,
            "slope_eta": self.control.slope_eta or 0.0,  # 0: off (a None would be read back as the default)
            "newton_gate": self.newton_gate,  # 0: off
            "direct_z": self.control.direct_z or 0.0,  # 0: off (a None would be read back as the default)
            "rescale_lr": bool(self.rescale_lr),
            "backend": self.backend,
        }

    def _default_energy(self, model: nn.Module, batch: Batch, n: int) -> torch.Tensor:
        data = self.nll(model, batch).sum() * (n / batch[0].shape[0])
        return data - self.log_prior(model) if self.log_prior is not None else data

    def _energy_f(self, n: int) -> Callable[..., torch.Tensor]:
        return functionalize(self.model, lambda m, *b: self.energy(m, b, n))

    def _h_f(self) -> Callable[..., torch.Tensor]:
        return functionalize(self.model, lambda m, *b: self.nll(m, b).sum())

    # ------------------------------------------------------------------ bank
    @property
    def bank(self) -> torch.Tensor | None:
        """The sample bank ``[S, D]`` (flat, the model's dtype; :meth:`samples` gives it in the layout it came in).

        Setting it replaces the samples, as ``bank=`` gives them: copied (the caller's tensor is never the
        unlearner's), :meth:`samples` then in the new value's layout, and what the unlearner carried for the old
        samples forgotten (:meth:`reset_curvature`: cached curvature, damping and the NLL rises summed across
        requests, carried influence, the first moment the corrections restore). Before stop 43 a ``[S, D]`` tensor
        was kept by reference and in the old layout, and the old samples' state was kept: after a continued chain's
        bank, 4 requests moved the removed rows 0.35 and 0.04 of the way to retraining (two seeds), 0.54 and 0.12 with
        that state reset. :meth:`collect` appends
        and keeps that state. Either makes earlier proposals stale: applying one would overwrite the bank."""
        return self._bank

    @bank.setter
    def bank(self, value: Any) -> None:
        self._set_bank(value, fresh=True)

    def _set_bank(self, value: Any, fresh: bool) -> None:
        """Set the bank: ``fresh``, the caller's samples (:attr:`bank`); else the library's own ``[S, D]`` tensor in
        the current layout (an applied proposal's bank, :meth:`collect`'s), kept as it is."""
        # what bank= takes, the same way (unlearner.bank = run_chain(...) is the README's; a list of state_dicts,
        # a float64 or wrongly sized bank set here crashed inside the next request)
        if value is None and fresh:
            self._layout = None  # no samples: collect() starts a flat bank (it revived the replaced one's layout)
        if value is not None:
            dtype = ParamSpec.params(self.model)[0].dtype
            layout = self._layout
            if fresh:  # non-finite samples refused on the caller's tensors, before the copy (it took 1-2 s first)
                caller = value
                value, layout = to_flat(value, self.spec, dtype=dtype, model=self.model)
            elif not all_finite(value):  # one reduction pass (a boolean [S, D] temporary cost 7% of a request)
                check_finite(bad_rows(value))
            if fresh:  # only now: a refused bank left its layout (and its buffers) for the kept samples' return
                self._layout = layout
                self._caller_storages.add(caller, bank=True)  # earlier banks stay protected while the caller holds them
        self._bank = value
        if fresh:  # the caller's own samples: which rows they were drawn without is theirs to know
            self._removed_digests: set[bytes] = set()
        self._version = getattr(self, "_version", 0) + 1
        if fresh and getattr(self, "_state_loaded", False):
            # a resumed service that set the bank after loading lost the checkpoint's curvature, damping, carried
            # influence and corrections' anchor without a word (stop 45's probe: banks 0.044 off the one-process run)
            warnings.warn(
                "setting the bank discards the state load_curvature_state() loaded (curvature, damping, carried "
                "influence, the corrections' first moment), as a new bank always does: to resume from a checkpoint, "
                "set the bank first (or pass bank= when building the unlearner), then load the state",
                stacklevel=outside_stacklevel(),
            )
            self._state_loaded = False
        if fresh and hasattr(self, "curvature"):
            self.reset_curvature()  # the old samples' state (fit's curvature too)
        elif getattr(self, "_fitted", False):
            # fit() built its curvature at draws of the bank just extended: the next request builds its own (kept,
            # it was taken as the request's own build at other samples: a 12th of the shift, every check passed)
            self.curvature.reset()
            self._fitted, self._fit_data = False, None

    def collect(self) -> None:
        """Append the live chain's current parameters to the sample bank."""
        theta = ParamSpec.flatten_module(self.model)[None]
        self._set_bank(theta if self.bank is None else torch.cat([self.bank, theta]), fresh=False)

    def _check_guard(self) -> contextlib.AbstractContextManager:
        """What :meth:`_check_nll`'s forward passes on the live model run in: a snapshot that puts parameters,
        buffers, ``.grad`` and the global RNG back (:func:`~mcmc_unlearner.kronecker.preserved`) until
        :meth:`_check_forward` has shown on the first request that the forward writes into none of them; after it,
        the RNG alone (the snapshot copies every parameter and buffer: 0.2 s a request on a 50M-parameter MLP)."""
        from .kronecker import preserved

        if self._forward_checked:
            return torch.random.fork_rng(devices=[])
        return preserved(self.model)

    def _dtype_hint(self, batch: Batch, said: str) -> str:
        """Where a failed ``nll``'s batch holds floating fields of a dtype other than the model's parameters' (rows in
        float16 or float64 for a float32 model: torch said only "mat1 and mat2 must have the same dtype"), the cast
        that fixes it; else ``""``. Only where torch's words ``said`` are about dtypes: an nll that casts such a field
        itself (a float32 weight column beside a float64 model) and failed otherwise (a label out of range, a field
        not there) was told to cast it, and float class labels to become float64 (stop 62's review)."""
        if not _DTYPE_ERROR.search(said):
            return ""
        if _INTEGER_WANTED.search(said):
            # labels of another integer dtype (torch.from_numpy of numpy's int32): torch said only "expected target
            # dtype to be Long or Byte, but got Int" (stop 63's probe)
            narrow = [
                i
                for i, t in enumerate(batch)
                if not t.is_floating_point()
                and not t.is_complex()
                and t.dtype not in (torch.int64, torch.uint8, torch.bool)
            ]
            if not narrow or "Long" not in said:
                return ""
            got = ", ".join(sorted({str(batch[i].dtype) for i in narrow}))
            return (
                f"Field(s) {narrow} are {got} where torch wants int64 labels: cast them (y.long(); torch.from_numpy "
                "keeps numpy's int32), as the chain was sampled. "
            )
        dtypes = {p.dtype for p in self.model.parameters() if p.is_floating_point()}
        if len(dtypes) != 1:
            return ""
        (want,) = dtypes
        off = [i for i, t in enumerate(batch) if t.is_floating_point() and t.dtype != want]
        if not off:
            return ""
        got = ", ".join(sorted({str(batch[i].dtype) for i in off}))
        return (
            f"Field(s) {off} are {got} where the model's parameters are {want}: cast them to the model's dtype "
            f"(x.to({want})) or the model to theirs, as the chain was sampled. "
        )

    def _check_nll(self, batch: Batch, role: str = "removed", again: bool = False) -> None:
        """On every request: ``nll(model, removed rows)`` gives one value per row.

        An ``nll`` that returns the batch mean (``reduction="mean"``) would make every gradient and energy wrong by
        the batch size, silently; one that fails on the removed rows (e.g. indices passed instead of data) is
        reported with what ``remove`` expects. One forward pass without gradients, on every request: a later
        request's malformed rows (a label column, another dtype) failed with torch's own words, or not at all (stop
        48's probe). Skipped for a model in training mode with buffers (a forward would update e.g. BatchNorm
        statistics; their two-pass probe runs once); the global RNG is left as it was, and so are the model's
        parameters, buffers and ``.grad`` until :meth:`_check_forward` has shown that a forward writes into none of
        them (:meth:`_check_guard`: a forward that writes into them in place changed the caller's weights by up to
        0.53 in stop 56's probe).
        ``role="remaining"``: a remaining-data minibatch, with messages about that data, once (``again``: also after
        that, as each :meth:`fit` does); the first request still checks its removed rows (:meth:`fit` had made it
        skip them, and rows given as indices then failed with torch's dtype error).
        """
        removed = role == "removed"
        if self._remaining_nll_checked and not removed and not again:
            return
        if any(m.training and next(m.buffers(recurse=False), None) is not None for m in self.model.modules()):
            if not self._buffers_checked:  # two forward passes: once, not on every request
                out = self._check_buffers_stable(batch)
                if isinstance(out, torch.Tensor):
                    # (its dtype too: an integer nll of a model in training mode with a buffer crashed in the
                    # safety check, after the request's work; refused on every request until it passes)
                    self._check_nll_dtype(out, batch[0].shape[0], role)
                self._buffers_checked = True
            return
        k = batch[0].shape[0]
        step = self._check_nll_rows(batch)  # rows per pass: all of them unless the budget asks for fewer
        rows = min(step, k)
        try:
            with self._check_guard(), torch.no_grad():
                if rows == k:  # one pass, as always
                    out = values = self._nll_on_copies(batch, role)
                else:
                    out, values = self._check_nll_passes(batch, rows, role)
        except _BatchWritten as e:  # (a ValueError of its own: not re-worded below as a failure of nll)
            raise ValueError(str(e)) from None
        except AttributeError as e:
            raise AttributeError(
                f"nll(model, {role} data) failed: {e}. The unlearner passes every batch to nll as a plain tuple of "
                "tensors (a namedtuple's or an object's fields in order: give the removed rows and the minibatches as "
                "tuples, e.g. (b.x, b.y)): read the fields by position in nll, b[0], b[1], ..."
            ) from e
        except (RuntimeError, TypeError, IndexError, KeyError, ValueError) as e:
            indices = removed and len(batch) == 1 and not batch[0].is_floating_point() and batch[0].ndim == 1
            said = str(e)
            if rows < k and getattr(e, "nll_shape", None) is not None:  # a pass's shape: as all rows at once give it
                said = _not_per_row(k, self._whole_shape(batch, e.nll_shape, rows, k))
            raise _same_kind(
                e,
                f"nll(model, {role} data) failed: {said}. "
                + self._dtype_hint(batch, str(e))
                + (_DETACHED_HINT if "does not require grad" in str(e) else "")
                + (
                    "remove() takes the removed rows' data as a batch shaped like the minibatches (e.g. (x, y)), not "
                    "their indices; to remove by index use forget(ids, RemovableDataset)"
                    if indices
                    else "remove() passes the removed rows to nll as they were given: they must be data that nll can "
                    "read as it reads a minibatch (the same fields, dtypes and label range)"
                    if removed
                    else "the remaining data's minibatches go to nll as the data gives them (in fit() and in every "
                    "request): they must be the data the model was trained on, as nll reads a minibatch (the same "
                    "fields, dtypes and label range)"
                ),
            ) from e
        if not _per_row(out, rows):
            shape = (
                self._whole_shape(batch, list(out.shape), rows, k)
                if isinstance(out, torch.Tensor)
                else type(out).__name__
            )
            fix = (
                SUM_PER_ROW
                if _several_per_row(k, shape)
                else "compute it without reducing over the batch (e.g. cross_entropy(..., reduction='none'))"
                + _square_per_row(k, shape)
            )
            raise ValueError(
                f"nll(model, batch) must return one value per row (shape [{k}] for these {k} {role} rows), got "
                f"{shape}: {fix}"
            )
        self._check_nll_dtype(out, k, role)
        # every pass's rows (the last pass's alone missed a NaN row in the others, and misnumbered its own)
        self._check_nll_finite(out if values is None else values, batch, k, role)
        self._remaining_nll_checked = self._remaining_nll_checked or not removed

    @staticmethod
    def _check_nll_dtype(out: torch.Tensor, k: int, role: str) -> None:
        """Refuses an ``nll`` result ``out`` on ``k`` rows that is not floating point."""
        if not out.is_floating_point():
            # stop 60's probe: an integer nll (a 0-1 error count) crashed in the safety check with torch's raw
            # "torch.finfo() requires a floating point input type" after the request's work
            raise TypeError(
                f"nll(model, batch) must return floating-point values (each row's negative log-likelihood, "
                f"differentiable in the parameters), got {out.dtype} on these {k} {role} rows: an integer "
                "or boolean result (e.g. a count of errors) has no gradient; return the likelihood the chain sampled, "
                "e.g. F.cross_entropy(model(b[0]), b[1], reduction='none'); nothing was changed"
            )

    def _check_nll_finite(self, out: torch.Tensor, batch: Batch, k: int, role: str) -> None:
        """Refuses an ``nll`` result ``out`` on the ``k`` rows of ``batch`` that holds NaN or inf at the model's
        parameters and, on those rows, at one of ``FIT_DATA_DRAWS`` evenly spaced stored samples.

        Stop 63's probe: an ``nll`` giving NaN on some rows (a constant NaN term, so the gradients stayed finite)
        ran 24 damping trials, 2.3 s, and was refused as "measured nan ± nan", naming neither the rows nor the
        ``nll``. The request reads ``nll`` at the stored samples, not at the live parameters, which need not be one
        of them (a fresh module beside a loaded bank): a naive ``-log(softmax(z)[y])``, +inf on two removed rows at
        such parameters and finite at every sample, was refused, where it had been accepted (stop 63's review).
        """
        bad = ~torch.isfinite(out.detach().reshape(-1))
        if not bool(bad.any()):
            return
        where = torch.nonzero(bad).reshape(-1).cpu()
        tried = _draws(self.bank, FIT_DATA_DRAWS) if self.bank is not None else torch.zeros(0, 0)
        hits, at = torch.zeros_like(where, dtype=torch.bool), 0
        if tried.shape[0]:
            aligned = all(isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == k for t in batch)
            rows = tuple(t[where.to(t.device)] for t in batch) if aligned else batch
            row_nll = self.nll
            rows_f = functionalize(self.model, lambda m, *b: row_nll(m, b))
            with self._check_guard(), torch.no_grad():
                for j, theta in enumerate(tried):
                    try:
                        v = rows_f(theta, *rows).detach().reshape(-1)
                    except (RuntimeError, TypeError, IndexError, KeyError, ValueError, AttributeError) as e:
                        # raw before: torch's or the nll's own words alone, nothing said of the check or the rows
                        called = f"those rows alone (a batch of {where.numel()})" if aligned else "the whole batch"
                        raise _same_kind(
                            e,
                            f"nll(model, batch) failed at stored sample {j + 1} of the {tried.shape[0]} read to "
                            f"check whether it is finite there, on {self._rows_said(where, k, role)}, where it is "
                            f"not finite at the model's parameters: {e}. The check calls nll on {called} at each "
                            "sample: make nll finite on every row the chain was trained on, and able to read any "
                            "number of rows at any stored sample; nothing was changed",
                        ) from e
                    hit = ~torch.isfinite(v if aligned else v[where.to(v.device)]).cpu()
                    hits |= hit
                    at += bool(hit.any())
            if not at:  # finite at every sample tried: the live parameters' alone (not a sample the request reads)
                return
            where = where[hits]
        live = out.detach().reshape(-1)[where.to(out.device)]
        kinds = "/".join(
            name
            for name, hit in (
                ("NaN", torch.isnan(live).any()),
                ("+inf", (live == math.inf).any()),
                ("-inf", (live == -math.inf).any()),
            )
            if bool(hit)
        )
        samples = f" and at {at} of {tried.shape[0]} stored samples" if tried.shape[0] else ""
        raise ValueError(
            f"nll(model, batch) is {kinds} on {self._rows_said(where, k, role)} at the model's parameters{samples}: "
            "every energy, gradient and check of the request would be undefined there. Make nll finite on every row "
            "the chain was trained on (a log of a value that can reach 0 or go negative: clamp it or use log_softmax "
            "/ softplus; NaN in the data: clean or drop those rows); nothing was changed"
        )

    @staticmethod
    def _rows_said(where: torch.Tensor, k: int, role: str) -> str:
        """The rows ``where`` of the ``k`` ``role`` rows :meth:`_check_nll_finite` read, as its messages name them."""
        first = ", ".join(str(int(i)) for i in where[:5]) + (", ..." if where.numel() > 5 else "")
        if role == "removed":
            return f"{where.numel()} of the {k} removed rows (rows {first} of the removed batch)"
        return f"{where.numel()} of the {k} rows read from the first remaining minibatch (rows {first} of it)"

    def _whole_shape(self, batch: Batch, shape: list[int], rows: int, k: int) -> list[int] | str:
        """The shape ``nll`` would give on all ``k`` rows of ``batch``, from the ``shape`` it gave a pass of ``rows``
        and the shape it gives ``rows − 1`` of them: each dimension extrapolated along its change with the rows (a
        label column broadcast to ``[B, B]``, ``[1, B]``, two terms concatenated ``[2B]``, a mean over the batch
        ``[C]``, ``[B, C]``). Mapping the pass's size by value quoted ``[43, 43]`` for ``[B, 3]`` in passes of 3 and
        two values per row for a batch mean of 16 in passes of 8 (stop 49's review). Where that second call does not
        give a comparable shape, the pass's own, said as such."""
        if rows >= k:
            return list(shape)
        try:
            with self._check_guard(), torch.no_grad():
                out = self.nll(self.model, tuple(t[: rows - 1] for t in batch))
            fewer = list(out.shape) if isinstance(out, torch.Tensor) else None
        except ValueError as e:  # _one_per_row's: the shape it refused
            fewer = getattr(e, "nll_shape", None)
        except Exception:  # a probe for the message only: the verdict stands
            fewer = None
        if fewer is None or len(fewer) != len(shape):
            return f"{list(shape)} for a pass of {rows} of them"
        return [d + (d - e) * (k - rows) for d, e in zip(shape, fewer)]

    def _nll_on_copies(self, batch: Batch, role: str) -> Any:
        """``nll(model, batch)`` on copies of ``batch``'s tensors; refuses an ``nll`` that changed a copy's values.

        Every later evaluation passes ``nll`` the caller's own rows (detached views, many times a request), so an
        ``nll`` that writes into its batch in place, harmless in a user's loop over ``f[idx]`` copies, changed the
        caller's data: stop 63's probe (``b[0].mul_(1.5)``) left the removed rows scaled by 1.5² and was refused as
        "the forward pass is random ... nothing was changed". The copies cost one pass of the rows this check
        reads (its passes' rows where it reads them in passes), and the comparison one read of them.
        """
        copies = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in batch)
        out = self.nll(self.model, copies)
        # values, not the version counter: a write through .data or .numpy() leaves it as it was (b[0].data.mul_(1.5)
        # was missed, scaled the caller's rows and was refused as a random forward pass)
        for i, (a, b) in enumerate(zip(batch, copies)):
            if isinstance(a, torch.Tensor) and not _same_values(a, b):
                raise _BatchWritten(
                    f"nll(model, batch) writes into field {i} of its batch in place (e.g. b[{i}].mul_(...), "
                    f"b[{i}] -= ..., b[{i}].clamp_(...)): the unlearner passes nll the caller's own {role} rows, many "
                    "times a request, so every call would change your data (your loop's minibatches, f[idx], were "
                    f"copies). Compute out of place (x = b[{i}] * c) or copy first (x = b[{i}].clone()); nothing "
                    "was changed"
                )
        return out

    def _check_nll_passes(self, batch: Batch, rows: int, role: str = "removed") -> tuple[Any, torch.Tensor | None]:
        """``nll`` on ``batch`` in passes of ``rows`` rows (the last as full as the others: a mean over one row
        would look per-row), with the verdict of one pass over all of them: a failure raised in any pass comes
        before a wrong shape (a whole pass raises before its shape is judged); else the first pass's output that
        is not one value per row, or the last pass's. Also the ``k`` rows' values, every pass's in its rows' places,
        where every pass gave one value per row (else ``None``): the finiteness check read the last pass's alone,
        missing a NaN row in any other and numbering the rows it found from that pass's first."""
        k, shape_error, wrong, values = int(batch[0].shape[0]), None, None, None
        for s0 in range(0, k, rows):
            s0 = min(s0, k - rows)
            try:
                out = self._nll_on_copies(tuple(t[s0 : s0 + rows] for t in batch), role)
            except ValueError as e:
                if getattr(e, "nll_shape", None) is None:
                    raise
                shape_error = shape_error or e  # (_one_per_row's: a shape) the later passes may still raise
                continue
            if wrong is None and not _per_row(out, rows):
                wrong = out
            elif wrong is None:
                if values is None:
                    values = out.new_zeros(k)
                values[s0 : s0 + rows] = out.detach().reshape(-1)
        if shape_error is not None:
            raise shape_error
        return (out, values) if wrong is None else (wrong, None)

    def _check_nll_rows(self, batch: Batch) -> int:
        """Rows per forward pass of :meth:`_check_nll`: as many as fit the memory budget beside what one call holds,
        each row at what it saves for a backward pass (``_row_bytes``; before that is measured, 64 times its
        inputs), at least 2; all rows when their fields are not row-aligned tensors. 50,000 removed rows went
        through one forward pass on every request, unplanned."""
        k = int(batch[0].shape[0])
        if k <= 2 or not all(isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == k for t in batch):
            return max(k, 1)
        per_row = self._row_bytes or 64 * sum(t[:1].numel() * t.element_size() for t in batch)
        return max(2, chunk_for(self.memory_budget, per_row, k, self._call_bytes))

    def _data_nll(self, batches: Sequence[Batch]) -> tuple[float, float] | None:
        """The mean per-row NLL of (at most ``FIT_DATA_ROWS`` rows of) ``batches`` at ``FIT_DATA_DRAWS`` evenly
        spaced stored samples and its standard error over rows, summed over ranks: what :meth:`fit` records of its
        data and the request after it compares with its own (``None`` below 16 rows, or for a model in training mode
        with buffers, whose forward pass would update them)."""
        if any(m.training and next(m.buffers(recurse=False), None) is not None for m in self.model.modules()):
            return None
        row_nll = self._row_nll
        rows_f = functionalize(self.model, lambda m, *b: row_nll(m, b))
        thetas = _draws(self.bank, FIT_DATA_DRAWS)
        parts, left = [], FIT_DATA_ROWS
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for batch in batches:
                for i in range(0, min(int(batch[0].shape[0]), left), 64):
                    rows = tuple(f[i : min(i + 64, left)] for f in batch)
                    parts.append(torch.stack([rows_f(t, *rows).detach() for t in thetas]).double().mean(0))
                left -= min(int(batch[0].shape[0]), left)
        # (a rank holding no rows sums nothing, but still takes part in the reduction)
        h = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        sums = torch.stack([h.sum(), (h**2).sum(), torch.tensor(float(h.numel()), dtype=torch.float64)])
        if self._reduce is not None:
            sums = self._reduce(sums)
        m = float(sums[2])
        if m < 16:
            return None
        mean = float(sums[0]) / m
        return mean, math.sqrt(max(float(sums[1]) / m - mean**2, 0.0) / (m - 1))

    def _fit_data_differs(self, rows: Batch) -> str | None:
        """Why fit()'s curvature was built on other data than this request's remaining ``rows`` (their mean NLL
        clearly differs from that of the rows fit read: by more than ``FIT_DATA_REL`` of the larger and
        ``FIT_DATA_Z`` standard errors), or ``None``."""
        if self._fit_data is None:
            return None
        here = self._data_nll([rows])
        if here is None:
            return None
        (a, se_a), (b, se_b) = self._fit_data, here
        gap = abs(b - a)
        if gap > FIT_DATA_Z * math.hypot(se_a, se_b) and gap > FIT_DATA_REL * max(abs(a), abs(b)):
            return (
                f"the remaining rows' mean NLL is {b:.4g} ± {se_b:.2g}, the rows fit() read gave {a:.4g} ± {se_a:.2g}: "
                "fit() was given other data than this request (pass it the same data, preprocessed the same way); "
                "the curvature was rebuilt on this request's"
            )
        return None

    def _check_forward(self, batch: Batch) -> None:
        """Once, on the first request, before any work: ``nll`` on ``FORWARD_CHECK_ROWS`` removed rows is a function
        of the parameters the unlearner passes in.

        Refused (``ValueError``, nothing changed) where

        * one call with the module holding a stored sample writes into a parameter in place (its values or its
          version counter change: ``with torch.no_grad(): self.l1.weight.clamp_(-c, c)``), or into a buffer of an
          eval-mode module that the output reads (an online normaliser's running mean; a counter the output ignores
          passes): under ``functional_call`` such a write changes the sample or fails (stop 56's probe: torch's raw
          view error, the caller's weight changed by 0.53; the buffer refused as "random" and left changed), named
          before the random-forward test below (:meth:`_forward_writes`);
        * two evaluations at the same parameters differ: the forward pass is random (``F.dropout(h, p,
          training=self.training)`` with the model in training mode, which :func:`_check_mode` cannot see by type:
          stop 55's probe passed with ``problems=[]``, the removed class's test error 0.40 against 1.00 in eval mode);
        * the gradient of ``nll`` at a stored sample through the library's functional path
          (``torch.func.functional_call``, as at every sample) changes when that sample is also loaded into the
          module's parameters (the same evaluation twice, the module holding its live parameters and then the
          sample: identical operations, autocast's casts included), or a live parameter appears in the
          evaluation's graph: the forward reads the module's own parameters outside the call
          (``torch.utils.checkpoint`` recomputes its block during backward, after ``functional_call`` has put the
          live parameters back: the gradient 1.13 relative off, the removal computed at a mix of two points; a
          parameter captured in a closure);
        * a row's value depends on the other rows of its batch: the rows evaluated together and each alone (one row
          doubled) at that sample through the functional path differ (:meth:`_row_check`; a per-row loss
          divided by the batch size, stop 56's probe: accepted with ``problems=[]``, the removed rows moved 0.09 /
          0.12 of the way to retraining against 0.79 / 0.41 with the correct ``nll``); the same rows mixed with
          rows of the first remaining minibatch are compared with their values alone before the removed rows'
          gradient (:meth:`_check_mixed_rows`: a batch-hard triplet loss gives a removed class 0 among its own rows,
          accepted as a no-op in stop 57's probe; where the two cannot be joined, the remaining rows among
          themselves).
        * one Hessian-vector product of ``nll`` on those rows by double backward fails with torch's "derivative for
          ... is not implemented": an operation torch differentiates once but not twice (``F.ctc_loss``, stop 57's
          probe: torch's raw error after seconds of work on every path; ``F.embedding_bag``), which every curvature
          backend and the safety check need (:meth:`_once_differentiable`; 2.0 ms on a 2,410-parameter MLP, 11 ms
          on LeNet-5).

        All compare to ``FORWARD_CHECK_EPS`` epsilons of the parameters' dtype (1.2e-4 in float32, 2.2e-13 in
        float64) relative to the values' size (the rows' test: to ``1 +`` the largest value): the same operations on
        the same numbers, so rounding at most (0 on every model probed; the rows alone, in batches of another size:
        at most 7.9e-7 in float32 and 1.6e-15 in float64, an MLP, an eval-mode BatchNorm, LeNet-5, a packed LSTM and
        attention with a padding mask), while the defects above differ by order one. The rows' test refuses only
        above ``FORWARD_ROWS_REFUSE`` (1e-2) too: rounding grows with the values' size (a float32 regression on
        targets ~1e4 gave 6.9e-4, refused on 14 of 50 requests before); a gap between the two is recorded in the
        first request's ``report.info["forward_row_gap"]``, unless every row's value alone is the batch size times
        its value together (to the tolerance, relative to the row's own value: :meth:`_row_check`), which is refused
        whatever its size (``nll / len(batch)`` on rows fitted to 2.7e-3-6.5e-3 nats: a gap of 4.8e-3). A gap above
        ``FORWARD_ROWS_REFUSE`` without that pattern in a lower precision is measured again in float64
        (:meth:`_row_check_double`; targets ~1e6 gave 0.064 in float32, refused on 21 of 50 requests, and at most
        8.7e-11 in float64) and refused only if still above it or with the pattern there; otherwise both gaps are
        recorded (``"forward_row_gap"``, ``"forward_row_gap_float64"``). Where the model cannot run in float64 the
        float32 verdict stands and the refusal says why. The sample
        is the first bank sample that differs from the live parameters, else the live parameters moved by a seeded
        tenth of their mean size.
        Parameters, their ``.grad``, buffers and the global RNG states are as they were afterwards
        (:func:`~mcmc_unlearner.kronecker.preserved`); an ``nll`` that fails here is left to the request to report.
        """
        if self._forward_checked:
            if self._once_deferred is not None:  # the double-backward check a budget too small for it put off
                self._deferred_once_check(batch)
            return
        from .kronecker import _head, preserved

        rows = _head(tuple(batch), FORWARD_CHECK_ROWS)
        live = ParamSpec.flatten_module(self.model)
        tol = FORWARD_CHECK_EPS * torch.finfo(live.dtype).eps
        theta = self._forward_check_sample(live)
        del live  # (a copy of the parameters: not held through the checks)
        fit = self._forward_plan(rows, theta)
        if not fit:  # not one row fits the budget: put off, and the request refused naming a budget that does
            self._once_check(rows, theta, run=False)  # (the double-backward check's need, named with it)
            return
        rows = _head(rows, fit)
        written, moved = self._forward_writes(rows, theta)
        # every rank refuses alike (a rank without removed rows has nothing to see)
        if float(self._reduce_max(torch.tensor([float(bool(written or moved))], dtype=torch.float64))[0]):
            names = written + moved
            raise ValueError(
                f"the forward pass writes into {', '.join(names[:4]) or 'a parameter or buffer'}"
                f"{', ...' if len(names) > 4 else ''} in place or by assigning it a new tensor: "
                + (
                    "the unlearner evaluates every stored sample through torch.func.functional_call, where such a "
                    "write changes the sample (or fails). Apply the constraint out of place (w = "
                    "self.layer.weight.clamp(-c, c), then F.linear(x, w, self.layer.bias), or "
                    "torch.nn.utils.parametrize)"
                    if written
                    else "the model is in eval mode and its output reads that buffer, so every evaluation the "
                    "unlearner makes would see another network. Update the buffer only in training mode (if "
                    "self.training: ...)"
                )
                + "; nothing was changed"
            )
        random_gap = grad_gap = row_gap = pattern_gap = (
            0.0  # 0: agrees (or not checkable here: the request reports a failing nll)
        )
        try:
            with preserved(self.model), torch.no_grad():
                a, b = (self.nll(self.model, rows).detach().double() for _ in range(2))
            if bool(torch.isfinite(a).all()) and not bool(((a - b).abs() <= tol * (1 + a.abs())).all()):
                random_gap = float((a - b).abs().max())
        except Exception:  # the request reports a failing nll with its own message
            pass
        # the float64 test's gap (-1: not run), whether it could not run (1.0) and why
        double_gap, double_failed, double_why = -1.0, 0.0, None
        if not random_gap:
            row_gap, pattern = self._row_check(rows, theta, tol)
            if row_gap > max(FORWARD_ROWS_REFUSE, tol) and not pattern and theta.dtype != torch.float64:
                # above the refusal threshold without the pattern: rounding of large values, or a row reading its
                # batch? float64 tells (rounding shrinks by 2^29 from float32, the defects do not)
                double_gap, pattern, double_why = self._row_check_double(rows, theta, row_gap, tol)
                if double_why is not None:
                    double_gap, double_failed = -1.0, 1.0
            pattern_gap = row_gap if pattern else 0.0
        if not random_gap:
            grad_gap = self._grad_gap(rows, theta, tol)
        # one Hessian-vector product by double backward: an operation torch differentiates once but not twice
        # (F.ctc_loss) died inside the request after seconds of work with torch's raw error (stop 57's probe); on as
        # many of the rows as the memory budget fits (every rank plans alike), put off where not one row fits
        once_only = self._once_check(rows, theta, run=not random_gap)
        # every rank refuses alike (a rank without removed rows has nothing to see)
        once_flag = float(once_only is not None)
        random_gap, grad_gap, row_gap, pattern_gap, double_gap, double_failed, once = self._reduce_max(
            torch.tensor(
                [random_gap, grad_gap, row_gap, pattern_gap, double_gap, double_failed, once_flag], dtype=torch.float64
            )
        ).tolist()
        if double_failed:  # on some rank the float64 test could not run: the first verdict stands
            double_gap = -1.0
        if once:
            # refused after the mixed-rows test (a batch-hard triplet loss through torch.cdist fails both: the loss's
            # form is the first thing to fix), on this request and every later one
            self._once_differentiable_op = once_only or "on another rank"
        if random_gap:
            raise ValueError(
                f"nll(model, rows) gives different values on two calls on the same removed rows with the same "
                f"parameters (largest difference {random_gap:.3g}): the forward pass is random, e.g. dropout written "
                "functionally, F.dropout(h, p, training=self.training), with the model in training mode, or noise "
                "drawn in forward. The removed rows' gradient, the curvature and the safety check's energy "
                "differences would measure that noise. Call model.eval() first (the unlearner works on the "
                "eval-mode network's likelihood), or make the forward deterministic; nothing was changed"
            )
        gap, gap64 = self._row_verdict(row_gap, pattern_gap, double_gap, double_why, tol, "together")
        if gap is not None:  # rounding, not a row reading its batch: reported with the first request
            self._forward_row_gap, self._forward_row_gap_float64 = gap, gap64
        if grad_gap:
            raise ValueError(
                f"the gradient of nll at a stored sample differs when the unlearner evaluates it through "
                f"torch.func.functional_call (as it does at every sample) from the gradient with that sample loaded "
                f"into the model's parameters ({grad_gap:.3g} relative): part of the forward pass reads the module's "
                "own (live) parameters instead of the ones passed in. Activation checkpointing does this "
                "(torch.utils.checkpoint recomputes its block during backward, after functional_call has put the "
                "live parameters back), as do parameters captured beforehand (a tensor or parameter list stored on "
                "the module or in a closure). Evaluate without checkpointing: call the block directly in the forward "
                "the unlearner uses (e.g. a flag that turns checkpointing off after training), and read parameters "
                "through the module's attributes; nothing was changed"
            )
        self._forward_checked = True

    def _grad_gap(self, rows: Batch, theta: torch.Tensor, tol: float) -> float:
        """:meth:`_check_forward`'s gradient test: the gradient of ``nll`` on ``rows`` at ``theta`` through the
        functional path, with the module holding its live parameters and then ``theta`` too, relative to its size
        (0 where they agree to ``tol``, or where ``nll`` cannot be differentiated here: the request reports that);
        1.0 at least where a live parameter is in the evaluation's graph. One clone of the sample (differentiated
        twice), each graph freed before the next, and the two gradients compared in float64 chunk by chunk:
        :data:`_FORWARD_D_COPIES` plans it (11.7 copies of the parameters before, the gradients' float64 copies, their
        difference and a second clone held at once; stop 59)."""
        from .kronecker import _graph_uses, preserved

        try:
            with preserved(self.model), torch.enable_grad():
                t = theta.clone().requires_grad_(True)
                value = self._h_f()(t, *rows)
                # structural: a live parameter in the functional evaluation's graph is read outside the call
                live_reads = any(_graph_uses(value, dict(self.model.named_parameters())).values())
                (g_f,) = torch.autograd.grad(value, t)
                del value
                ParamSpec.assign(self.model, theta)  # in place; preserved() puts the live values back exactly
                # the same functional evaluation with the module holding theta too: identical operations on
                # identical numbers (autocast's casts included), so any gap is the forward reading live parameters
                (g_m,) = torch.autograd.grad(self._h_f()(t, *rows), t)
                del t
        except Exception:  # not differentiable here: the request says so with its own message
            return 0.0
        norms = _norms64(g_f, g_m)
        if norms is None:  # not finite: the request reports that
            return 0.0
        n_f, n_m, gap = norms
        if live_reads or gap > tol * (n_m + n_f):
            return max(gap / max(n_m, 1e-300), float(live_reads))
        return 0.0

    def _row_verdict(
        self,
        row_gap: float,
        pattern_gap: float,
        double_gap: float,
        double_why: str | None,
        tol: float,
        how: str,
        rows_name: str = "the removed rows",
    ) -> tuple[float | None, float | None]:
        """The verdict on a rows test's gaps, agreed by every rank (:meth:`_check_forward`, :meth:`_check_mixed_rows`):
        ``(None, None)`` where there is no gap; the gap (and its float64 re-measurement, or ``None``) where it is
        rounding (below ``FORWARD_ROWS_REFUSE`` without the batch-size pattern, or cleared in float64: targets ~1e6
        gave 0.064 in float32, ~1e-10 in float64), to be reported with the first request; otherwise refused
        (:meth:`_refuse_row_gap`). ``rows_name``: which rows were evaluated (for the log and the refusal)."""
        if not row_gap:
            return None, None
        double_tol = max(FORWARD_ROWS_REFUSE, FORWARD_CHECK_EPS * torch.finfo(torch.float64).eps)
        if double_gap >= 0 and not pattern_gap and double_gap <= double_tol:
            log.info(
                "nll: %s evaluated %s and each alone differ by %.3g relative, %.3g in float64 (rounding "
                "of large values); not refused",
                rows_name,
                how,
                row_gap,
                double_gap,
            )
            return row_gap, double_gap
        if not pattern_gap and row_gap <= max(FORWARD_ROWS_REFUSE, tol):
            log.info(
                "nll: %s evaluated %s and each alone differ by %.3g relative, without the batch-size "
                "pattern (rounding of large values?); not refused",
                rows_name,
                how,
                row_gap,
            )
            return row_gap, None
        self._refuse_row_gap(row_gap, bool(pattern_gap), how, double_gap, double_why, rows_name)
        raise AssertionError("unreachable")  # _refuse_row_gap raises

    @staticmethod
    def _refuse_row_gap(
        row_gap: float,
        pattern: bool,
        how: str,
        double_gap: float = -1.0,
        double_why: str | None = None,
        rows_name: str = "the removed rows",
    ) -> None:
        """Refuse an ``nll`` whose row values depend on the other rows of their batch (:meth:`_check_forward`,
        :meth:`_check_mixed_rows`): ``how`` the removed rows were evaluated besides alone ("together", "mixed with
        remaining rows"); ``pattern``: each row's value alone was the batch size times its value in the batch;
        ``double_gap``: the gap in float64 (-1: not measured), ``double_why``: why float64 could not run;
        ``rows_name``: which rows were evaluated (the removed rows, or rows of the first remaining minibatch)."""
        raise ValueError(
            f"nll(model, rows) gives a row a different value when the other rows of its batch change ("
            f"{rows_name} evaluated {how} and each alone differ by {row_gap:.3g} relative"
            + (", each row's value alone being the batch size times its value in the batch" if pattern else "")
            + "): a row's value depends on the other rows of its batch, e.g. a per-row loss divided by the "
            "batch size (reduction='none' then / len(batch)), class weights counted in the batch, batch "
            "statistics, or an in-batch softmax. The unlearner sums per-row values over "
            "batches of every size (the removed rows, minibatches, single rows), so every gradient and energy "
            "would be scaled wrongly. Losses defined over pairs or triplets of rows (contrastive, triplet, "
            "batch-hard mining) are not per-row likelihoods and cannot be unlearned row by row: a row's term "
            "depends on which other rows it is paired with. Compute each row's value from that row alone, e.g. "
            "cross_entropy(..., reduction='none') with no division by the batch size and no batch statistics"
            + (
                ""
                if pattern
                else f" (evaluated in float64 too, the gap is still {double_gap:.3g}: not rounding)"
                if double_gap >= 0
                else " (if each row's value already is its own, e.g. a regression, the gap is rounding of very "
                "large values: float32 reaches 1e-2 near |y| ~ 1e6; standardise the targets"
                + (f"; {double_why}, which would have told rounding from a row reading its batch" if double_why else "")
                + ")"
            )
            + "; nothing was changed"
        )

    def _once_check(self, rows: Batch, theta: torch.Tensor, run: bool = True) -> str | None:
        """:meth:`_once_differentiable` on as many of ``rows`` as :meth:`_once_plan` fits in the memory budget
        (``run``: else only planned, every rank planning alike). Where not one row fits, the check is put off
        (``_once_deferred``: its bytes on one row): the request's own refusal names a budget that covers it
        (:meth:`_propose`), and the first request under a budget that fits it takes it
        (:meth:`_deferred_once_check`)."""
        from .kronecker import _head

        fit = self._once_plan(rows, theta)
        if not fit or not run:
            return None
        return self._once_differentiable(_head(rows, fit), theta)

    def _deferred_once_check(self, batch: Batch) -> None:
        """The double-backward check of :meth:`_check_forward` on a later request, where the first one's budget
        did not fit it (on this request's first rows, at the first request's sample where the bank is unchanged); the
        operation it finds is refused before any work, as on the first request."""
        from .kronecker import _head

        rows = _head(tuple(batch), FORWARD_CHECK_ROWS)
        theta = self._forward_check_sample(ParamSpec.flatten_module(self.model))
        once_only = self._once_check(rows, theta)
        if self._once_deferred is None and float(
            self._reduce_max(torch.tensor([float(once_only is not None)], dtype=torch.float64))[0]
        ):
            self._once_differentiable_op = once_only or "on another rank"

    def _check_rows_cost(self, rows: Batch, theta: torch.Tensor) -> tuple[int, int]:
        """``(per row, per call)``: what a backward pass of ``nll`` on ``rows`` at ``theta`` saves besides the
        parameters (:func:`~mcmc_unlearner.memory.row_and_call_bytes` with ``skip_parameters``, measured on one and two
        rows), the largest over the ranks; 64 times the rows' inputs where ``nll`` fails here (the request reports
        that). Measured on a clone of ``theta`` (a view of a stored sample): a forward that writes into its
        parameters in place, which :meth:`_forward_writes` refuses after this or not at all where the checks are
        put off, wrote into the bank (stop 59's review: a row moved by 0.49 under a refusal saying nothing changed)."""
        from .kronecker import preserved

        try:
            with preserved(self.model):  # a training-mode forward's buffer writes (a call counter) put back
                per_row, per_call = row_and_call_bytes(self._h_f(), theta.clone(), rows, skip_parameters=True)
        except Exception:  # the request reports a failing nll with its own message
            per_row = sum(t[:1].numel() * t.element_size() for t in rows if isinstance(t, torch.Tensor)) * 64
            per_call = 0
        per_row, per_call = (
            int(v) for v in self._reduce_max(torch.tensor([float(per_row), float(per_call)], dtype=torch.float64))
        )
        return per_row, per_call

    def _forward_plan(self, rows: Batch, theta: torch.Tensor) -> int:
        """How many of ``rows`` (the first ones) :meth:`_check_forward`'s tests take within the memory budget:
        ``_FORWARD_D_COPIES`` copies of the parameters beside ``GRAD_SAVED_FACTOR`` times what the rows' backward
        pass saves (:meth:`_check_rows_cost`), recorded as ``info["memory"]["planned"]["forward_check"]`` (the
        mixed-rows test's remaining rows are fitted within it: :meth:`_mixed_plan`). 0 where not even one row fits:
        the checks are put off (their bytes on one row in ``_forward_deferred``), and the request is refused naming a
        budget that covers them (:meth:`_propose`). Unplanned, they took 10.7 copies of a 1.1M-parameter MLP's
        parameters (48 MB under a 24 MB budget) before stop 59 cut them to 4.8."""
        fit, one, cost = self._early_check_plan(rows, theta, _FORWARD_D_COPIES, GRAD_SAVED_FACTOR, "forward_check")
        self._check_cost = cost  # (the mixed-rows test's plan: _mixed_plan)
        self._forward_deferred = None if fit else one
        return fit

    def _once_plan(self, rows: Batch, theta: torch.Tensor) -> int:
        """How many of ``rows`` (the first ones) :meth:`_once_differentiable`'s product takes within the memory
        budget: ``_ONCE_D_COPIES`` copies of the parameters beside ``_HVP_PRODUCT_FACTOR`` times what the rows'
        backward pass saves besides the parameters (measured here on one and two rows, the largest over the ranks;
        :func:`~mcmc_unlearner.memory.row_and_call_bytes` with ``skip_parameters``), recorded as
        ``info["memory"]["planned"]["second_derivative_check"]``; 0 where not even one row fits (its bytes on one
        row kept in ``_once_deferred``, else ``None``). The product on a 52.7M-parameter MLP took 1,414 MiB (7.0
        copies of the parameters) beside the request's 1,610 MiB before it was planned (stop 58)."""
        fit, one, _ = self._early_check_plan(
            rows, theta, _ONCE_D_COPIES, _HVP_PRODUCT_FACTOR, "second_derivative_check"
        )
        self._once_deferred = None if fit else one
        return fit

    def _early_check_plan(
        self, rows: Batch, theta: torch.Tensor, copies: int, factor: int, path: str
    ) -> tuple[int, int, tuple[int, int, int]]:
        """The plan of a first-request check (:meth:`_forward_plan`, :meth:`_once_plan`): ``copies`` copies of the
        parameters beside ``factor`` times what the rows' backward pass saves (:meth:`_check_rows_cost`), on as many
        of ``rows`` (the first ones) as fit the memory budget, recorded under ``path`` where one does.

        Returns:
            ``(rows that fit (0: not one), its bytes on one row, (per row, per call, per copy of the parameters))``.
        """
        from .kronecker import field_rows

        total = field_rows(rows)
        d_bytes = self.spec.dim * theta.element_size()
        per_row, per_call = self._check_rows_cost(rows, theta)  # (on a clone of the stored sample)

        def need(r: int) -> int:
            return copies * d_bytes + factor * (r * per_row + per_call)

        fit = max((r for r in range(1, max(total, 1) + 1) if need(r) <= self.memory_budget), default=0)
        if fit:
            self._plan(path, need(fit))
        return fit, need(1), (per_row, per_call, d_bytes)

    def _once_differentiable(self, rows: Batch, theta: torch.Tensor) -> str | None:
        """The operation torch names when one Hessian-vector product of ``nll`` on ``rows`` at ``theta`` by double
        backward fails with its "derivative for ... is not implemented" (``F.ctc_loss``: ``aten::_ctc_loss_backward``;
        ``F.embedding_bag``), else ``None`` (any other failure is left to the request to report). The product is of
        the gradient's sum (the direction does not matter: a missing derivative fails whatever it is), at ``theta``
        itself (not copied), the gradient freed before the second backward: 3.85 copies of the parameters instead of
        6.8 with a seeded vector (:meth:`_once_plan` plans them). The model is put back as it was
        (:func:`~mcmc_unlearner.kronecker.preserved`)."""
        from .kronecker import preserved

        try:
            with preserved(self.model), torch.enable_grad():
                t = theta.detach().requires_grad_(True)  # read, never written: no copy
                (g,) = torch.autograd.grad(self._h_f()(t, *rows), t, create_graph=True)
                if g.requires_grad:
                    total = g.sum()
                    del g  # its graph keeps what the second backward needs
                    torch.autograd.grad(total, t, allow_unused=True)
        except (NotImplementedError, RuntimeError) as exc:
            return _not_differentiable_op(exc)
        except Exception:  # the request reports a failing nll with its own message
            return None
        return None

    def _forward_writes(self, rows: Batch, theta: torch.Tensor) -> tuple[list[str], list[str]]:
        """The parameters, and the buffers, one ``nll`` call on ``rows`` writes into, the module holding the
        stored sample ``theta`` (:meth:`_check_forward`): a parameter whose values or version counter change (a
        write that leaves its values as they were still writes into the sample under ``functional_call``) or that
        is replaced by another object; a buffer of a module in eval mode whose values change, in place or by
        assigning it a new tensor (``self.mu = 0.9 * self.mu + ...``: missed and refused as a "random forward" in
        stop 56's review), and whose change moves a second call's output (a counter the output ignores passes; a
        training-mode module's buffers are :meth:`_check_buffers_stable`'s). Everything is put back
        (:func:`~mcmc_unlearner.kronecker.preserved`); an ``nll`` that fails here is left to the request."""
        from .kronecker import _version, preserved, same_bits

        def entries() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
            params = dict(self.model.named_parameters(remove_duplicate=False))
            buffers = {
                f"{name}.{b}" if name else b: t
                for name, m in self.model.named_modules(remove_duplicate=False)
                if not m.training
                for b, t in m._buffers.items()
                if t is not None and t.layout == torch.strided
            }
            return params, buffers

        with preserved(self.model), torch.no_grad():
            try:
                ParamSpec.assign(self.model, theta)
            except Exception:  # the request reports a model it cannot load
                return [], []
            params, buffers = entries()
            before = {k: (t, _version(t), t.detach().clone()) for k, t in {**params, **buffers}.items()}
            rng = torch.get_rng_state()
            try:
                first = self.nll(self.model, rows)
            except Exception:  # the request reports a failing nll with its own message
                return [], []
            params_now, buffers_now = entries()
            now = {**params_now, **buffers_now}

            def changed(k: str, by_version: bool) -> bool:
                t, version, values = before[k]
                new = now.get(k)
                if new is not t:  # reassigned (or removed)
                    return new is None or not same_bits(new, values) or by_version
                return (by_version and _version(t) != version) or not same_bits(t, values)

            written = [k for k in params if changed(k, True)]
            moved = [k for k in buffers if changed(k, False)]
            if moved:
                torch.set_rng_state(rng)  # the same random draws: only the buffers differ
                try:
                    second = self.nll(self.model, rows)
                except Exception:
                    second = None
                if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor) and torch.equal(first, second):
                    moved = []
        return written, moved

    def _row_check(
        self,
        rows: Batch,
        theta: torch.Tensor,
        tol: float,
        double: bool = False,
        pattern_tol: float | None = None,
        company: Batch | None = None,
        remember: bool = True,
    ) -> tuple[float, bool]:
        """How far a row's ``nll`` value depends on the other rows of its batch (:meth:`_check_forward`), and whether
        the rows follow the batch-size pattern.

        ``rows`` (one row given twice where there is only one) are evaluated together and each alone at the stored
        sample ``theta`` through the functional path; the gap is the largest difference relative to ``1 +`` the
        largest value, 0 within ``tol`` (rounding: a row's operations may be blocked differently in a batch of
        another size), or where ``nll`` fails here (the request reports that); fields without the rows' leading
        dimension are passed whole. Alone, a per-row loss divided by the batch size gives a row its whole value
        where the batch gave it a ``k``-th, so the gap is about the row's own value (rows all fitted below ``tol``
        nats cannot show it); batch-counted class weights and in-batch softmaxes differ by order one. The pattern:
        every row's value alone is ``n`` times its value together, ``n`` the rows evaluated together (``k``, or 2
        for one row doubled), to ``tol`` relative to the row's own value (a row whose values alone and together are
        both within the gap's own tolerance ``tol * (1 + max|together|)`` shows nothing and is passed over; at least
        one must show it): a per-row loss divided by the batch size, whatever its size. The caller refuses above
        ``FORWARD_ROWS_REFUSE``, or with the pattern. ``(0.0, False)`` where the gap is 0.

        ``double``: the same test in float64 (:meth:`_row_check_double`): float64 copies of the sample, of the
        other floating parameters and buffers and of the rows' floating fields through the same functional path;
        raises (``RuntimeError``) where the model cannot run so or its ``nll`` does not return float64 values.
        ``pattern_tol``: the pattern's relative tolerance where it is not ``tol`` (the float64 test keeps the first
        test's: the pattern is an exact factor ``n``, and a row's value is a difference of large numbers whose float64
        rounding, relative to it, can exceed ``tol``: |y| ~ 1e6 and a row of 5e-3 nats gave 1.7e-9 against 2.2e-13).
        ``company``: a remaining minibatch; the rows are evaluated together with up to ``MIXED_CHECK_ROWS`` of its
        rows (:func:`_mixed_batch`, :meth:`_check_mixed_rows`) instead of among themselves; ``(0.0, False)`` where
        the two cannot be mixed. ``remember``: keep ``theta`` and ``rows`` for the mixed test (the removed rows';
        not the remaining rows that test compares among themselves)."""
        from .kronecker import field_rows, preserved

        k = field_rows(rows)
        mixed = None if company is None else _mixed_batch(rows, company, MIXED_CHECK_ROWS)
        if company is not None and mixed is None:
            return 0.0, False
        n = field_rows(mixed) if mixed is not None else 2 if k == 1 else k  # rows evaluated together

        def aligned(t: Any) -> bool:
            return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == k

        if double:
            f = self._float64_path()
            theta = theta.double()
            rows = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in rows)
            if mixed is not None:
                mixed = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in mixed)
        else:
            f = functionalize(self.model, lambda m, *b: self.nll(m, b))
        try:
            with preserved(self.model), torch.no_grad():
                # (clones of the sample: no write could reach the bank)
                whole = f(
                    theta.clone(),
                    *(
                        mixed
                        if mixed is not None
                        else (torch.cat([t, t]) if k == 1 and aligned(t) else t for t in rows)
                    ),
                )
                alone = [f(theta.clone(), *(t[i : i + 1] if aligned(t) else t for t in rows)) for i in range(k)]
            if double and any(v.dtype != torch.float64 for v in [whole, *alone]):
                raise RuntimeError(f"nll returned {whole.dtype} values from float64 parameters and inputs")
            whole = whole.detach().double().reshape(-1)[:k]
            alone = torch.cat([a.detach().double().reshape(-1) for a in alone])
        except Exception as e:  # the request reports a failing nll with its own message
            if double:
                raise RuntimeError(str(e) or type(e).__name__) from e
            return 0.0, False
        if whole.shape != alone.shape or not bool(torch.isfinite(whole).all() and torch.isfinite(alone).all()):
            if double:
                raise RuntimeError("no finite values of one per row in float64")
            return 0.0, False
        if not double and company is None and remember:
            self._row_alone = (theta, rows)  # for the mixed-batch test on the first remaining minibatch
        return _row_gap(whole, alone, n, tol, pattern_tol)

    def _check_mixed_rows(self, remaining: Batch) -> None:
        """Once, on the first request, before the removed rows' gradient: the removed rows the forward check
        evaluated alone (:meth:`_row_check`) keep their values in a batch mixed with up to ``MIXED_CHECK_ROWS`` rows
        of the first remaining minibatch ``remaining``.

        The rows-alone test compares the removed rows only among themselves: a batch-hard triplet loss gave a removed
        class 0 there (no other class in the batch to be a negative) and 3.1 a row in the training's mixed batches,
        and the request was accepted as a no-op, ``problems=[]`` (stop 57's probe). The mixed batch is the removed
        rows followed by the remaining rows, field by field as the remaining minibatch gives them (a field without
        the rows' leading dimension must be the same in both, else nothing is checked); gap, tolerance and
        batch-size pattern as :meth:`_row_check`'s (``n`` the mixed batch's rows), a gap above the refusal threshold
        without the pattern measured again in float64 as there (rounding of large regression targets), refused
        alike (:meth:`_refuse_row_gap`), a gap below refusal recorded in ``report.info["forward_mixed_gap"]`` (and
        ``"forward_mixed_gap_float64"`` where float64 cleared one above it). Every rank takes part (a rank without
        removed rows has nothing to see). Marked done only once passed: a refused request sent again is refused
        again (stop 57's review: the retry was accepted as a no-op).

        Where no rank could join the rows and the minibatch (sequences padded to other lengths, fields of other
        trailing shapes), the minibatch's own first ``MIXED_CHECK_ROWS`` rows are compared together and each alone
        instead, once, judged alike (:meth:`_remaining_rows_test`): a batch dependence shows wherever a batch holds
        rows that read each other (the triplet loss on padded sequences of another length than the removed ones:
        accepted as a no-op before, stop 58's probe), so a removed class among themselves and the remaining rows
        among themselves leave out only a dependence that neither group shows on its own (a remaining minibatch of
        one class under a triplet loss). The mixed test runs again on the next request
        (``report.info["forward_mixed_check"]`` says it did not run, and what was compared instead)."""
        if self._mixed_checked or self._forward_deferred is not None:  # (put off with the forward check)
            return
        from .kronecker import _head, field_rows

        stash = self._row_alone
        tol = FORWARD_CHECK_EPS * torch.finfo(next(iter(ParamSpec.params(self.model))).dtype).eps
        mixed = own = (0.0, 0.0, -1.0, 0.0, None)
        mixable = own_rows = 0.0
        company = MIXED_CHECK_ROWS if stash is None else self._mixed_plan(field_rows(stash[1]))
        if stash is not None and _mixed_batch(stash[1], remaining, company) is not None:
            mixable = 1.0
            mixed = self._rows_test(stash[1], stash[0], tol, company=_head(tuple(remaining), company))
        elif stash is not None and self._remaining_rows_checked is None:
            rows = _head(tuple(remaining), max(company, 2))
            if field_rows(rows) >= 2:  # (one row has no other row to read)
                own_rows = float(field_rows(rows))
                own = self._rows_test(rows, stash[0], tol)
        agreed = self._reduce_max(
            torch.tensor(
                [*mixed[:4], *own[:4], mixable, own_rows, float(stash is not None)],
                dtype=torch.float64,
            )
        ).tolist()
        for (gap, pattern_gap, double_gap, double_failed), why, how, rows_name in (
            (agreed[0:4], mixed[4], "mixed with remaining rows", "the removed rows"),
            (agreed[4:8], own[4], "together", "rows of the first remaining minibatch"),
        ):
            verdict = self._row_verdict(
                gap, pattern_gap, -1.0 if double_failed else double_gap, why, tol, how, rows_name
            )
            if verdict[0] is not None and rows_name == "the removed rows":
                self._forward_mixed_gap, self._forward_mixed_gap_float64 = verdict
        mixable, own_rows, held = agreed[8:]
        if held and not mixable:  # the rows and this minibatch could not be joined: tried again on the next request
            if own_rows:
                self._remaining_rows_checked = int(own_rows)
            log.info(
                "nll: the removed rows could not be mixed with the remaining minibatch (fields of other shapes, "
                "dtypes or devices)%s; the mixed-batch test is tried again on the next request",
                f"; its first {int(own_rows)} rows evaluated together and each alone agree" if own_rows else "",
            )
            self._mixed_skipped = True
            return
        # passed (a refusal above leaves the test to run again: a request sent again is refused again)
        self._mixed_checked, self._row_alone = True, None

    def _mixed_plan(self, k: int) -> int:
        """Remaining rows the mixed-rows test (:meth:`_check_mixed_rows`) evaluates beside the ``k`` removed ones:
        ``MIXED_CHECK_ROWS``, or as many as fit the memory budget beside two copies of the parameters (the check's
        saved copy of the model, the sample's clone), each row at what its backward pass saves
        (:meth:`_forward_plan`'s measurement; a forward pass without gradients holds less), at least one: within
        :meth:`_forward_plan`'s plan, as which it is recorded (``info["memory"]["planned"]["forward_check"]``)."""
        per_row, per_call, d_bytes = self._check_cost
        room = self.memory_budget - 2 * d_bytes - per_call
        company = int(max(1, min(MIXED_CHECK_ROWS, room // max(per_row, 1) - k)))
        self._plan("forward_check", 2 * d_bytes + (k + company) * per_row + per_call)
        return company

    def _rows_test(
        self, rows: Batch, theta: torch.Tensor, tol: float, company: Batch | None = None
    ) -> tuple[float, float, float, float, str | None]:
        """One rank's share of a rows test (:meth:`_check_mixed_rows`): ``rows`` evaluated with ``company`` (or
        among themselves) and each alone at ``theta`` (:meth:`_row_check`), a gap above the refusal threshold
        without the batch-size pattern measured again in float64 (:meth:`_row_check_double`). Returns the gap, the
        gap where the rows show the pattern (else 0), the float64 gap (-1: not measured), 1.0 where float64 could
        not run, and why; to be agreed by every rank and judged by :meth:`_row_verdict`."""
        double_gap, double_failed, double_why = -1.0, 0.0, None
        row_gap, pattern = self._row_check(rows, theta, tol, company=company, remember=False)
        if row_gap > max(FORWARD_ROWS_REFUSE, tol) and not pattern and theta.dtype != torch.float64:
            double_gap, pattern, double_why = self._row_check_double(rows, theta, row_gap, tol, company=company)
            if double_why is not None:
                double_gap, double_failed = -1.0, 1.0
        return row_gap, row_gap if pattern else 0.0, double_gap, double_failed, double_why

    def _float64_path(self) -> Callable[..., torch.Tensor]:
        """``f(θ_flat, *rows)``: ``nll`` through the functional path with float64 copies of the model's other
        floating parameters (frozen ones) and buffers in place of their own (:meth:`_row_check`'s float64 test;
        the model itself is not touched: ``functional_call`` swaps the copies in for the call)."""
        from .curvature import _Call, aliased_parameters, call_with

        spec = ParamSpec.of(self.model)
        wrapper = _Call(self.model, lambda m, *b: self.nll(m, b))
        aliased = aliased_parameters(self.model)
        trained = set(spec.names)
        others = {
            "m." + k: t.detach().double()
            for k, t in [*self.model.named_parameters(), *self.model.named_buffers()]
            if k not in trained and t.is_floating_point() and t.dtype != torch.float64 and t.layout == torch.strided
        }

        def f(theta: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
            params = {**others, **{"m." + k: v for k, v in spec.unflatten(theta).items()}}
            return call_with(wrapper, params, args, aliased, strict=False)

        return f

    def _row_check_double(
        self, rows: Batch, theta: torch.Tensor, gap: float, pattern_tol: float, company: Batch | None = None
    ) -> tuple[float, bool, str | None]:
        """The rows-alone test again in float64, where the float32 (or half-precision) ``gap`` is above the
        refusal threshold without the batch-size pattern (:meth:`_check_forward`): rounding shrinks by the
        epsilons' ratio (2^29 from float32), a row reading its batch does not. Returns the float64 gap (0 within
        its tolerance), whether its rows follow the batch-size pattern, and ``None``; or, where the model cannot
        run in float64 (an op without a float64 kernel, a device without float64, a forward that casts to float32
        itself) or gives no finite comparable values, ``gap`` itself, ``False`` and why: the caller keeps the
        first verdict. ``pattern_tol``: the first test's tolerance, kept for the batch-size pattern
        (:meth:`_row_check`); ``company``: as there."""
        tol = FORWARD_CHECK_EPS * torch.finfo(torch.float64).eps
        try:
            gap64, pattern = self._row_check(rows, theta, tol, double=True, pattern_tol=pattern_tol, company=company)
        except Exception as e:  # (_row_check's RuntimeError: the float64 evaluation failed)
            return gap, False, f"the float64 re-evaluation failed ({str(e).splitlines()[0][:200]})"
        return gap64, pattern, None

    def _forward_check_sample(self, live: torch.Tensor) -> torch.Tensor:
        """A point other than ``live`` to compare gradients at (:meth:`_check_forward`): the first bank sample that
        differs from it, else ``live`` moved by a seeded tenth of its mean size."""
        if self.bank is not None:
            for s in self.bank[: min(int(self.bank.shape[0]), 8)]:
                s = s.to(live.device, live.dtype)
                if not torch.equal(s, live):
                    return s
        g = torch.Generator().manual_seed(0)
        step = 0.1 * (float(live.abs().mean()) + 1e-3)
        return live + step * torch.randn(live.shape, generator=g, dtype=live.dtype).to(live.device)

    def _check_buffers_stable(self, batch: Batch) -> Any:
        """A model in training mode whose forward pass updates buffers that its output depends on (a running mean
        of its own, like BatchNorm's, which :func:`_check_mode` refuses by type): every evaluation the request makes
        would see another network. Two forward passes on the removed rows tell: refused when a buffer changed and
        the second pass's output differs from the first's (a step counter that the output ignores passes). The
        buffers and the global RNG are left as they were. Returns the first pass's ``nll`` (``None`` where it
        failed)."""
        from .kronecker import preserved

        before = {
            k: b.detach().clone()
            for k, b in self.model.named_buffers(remove_duplicate=False)
            if b.layout == torch.strided
        }
        try:
            with preserved(self.model), torch.no_grad():
                rng = torch.get_rng_state()  # the second pass draws the same dropout masks as the first
                first = self.nll(self.model, batch)
                changed = [
                    k
                    for k, b in self.model.named_buffers(remove_duplicate=False)
                    if k in before and not torch.equal(b, before[k])
                ]
                if changed:
                    torch.set_rng_state(rng)
                second = self.nll(self.model, batch) if changed else first
        except Exception:  # the request itself reports a failing nll, with its own message
            return None
        finally:
            with torch.no_grad():
                for k, b in self.model.named_buffers(remove_duplicate=False):
                    if k in before and b.shape == before[k].shape and not torch.equal(b, before[k]):
                        b.copy_(before[k])
        if changed and isinstance(first, torch.Tensor) and not torch.equal(first, second):
            raise ValueError(
                f"the model is in training mode and its forward pass updates buffers that its output depends on "
                f"({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''}): two passes on the same rows gave "
                "different likelihoods, so every evaluation the unlearner makes would see another network. Call "
                "model.eval() first (or keep those statistics fixed while sampling): the bank's posterior is that of "
                "the network with its statistics frozen"
            )
        return first

    def samples(self) -> Any:
        """The stored samples in the layout they were given in (new tensors; a ``[S, D]`` tensor by default).

        A sequence of samples (of ``[D]`` vectors or of state_dicts) comes back as a list, a tuple included
        (:mod:`mcmc_unlearner.bank`)."""
        if self.bank is None:
            return None
        out = self.bank.clone() if self._layout is None else self._layout.restore(self.bank)
        # the caller's now: a model loaded from them (load_state_dict(..., assign=True)) gets its own storage
        # before the next write (the next request wrote into samples()[-1], up to 0.017 on stop 57's probe)
        self._caller_storages.add(out)
        return out

    # ------------------------------------------------------------------ hooks of the data-parallel version
    #: Sum across ranks (``None`` in one process; :class:`~mcmc_unlearner.distributed.DistributedUnlearner`).
    _reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum across ranks (``t`` itself in one process)."""
        return t

    @property
    def _row_nll(self) -> Callable[[nn.Module, Batch], torch.Tensor]:
        """The per-row negative log-likelihood of plain batches (the safety check, K-FAC)."""
        return self.nll

    def _raw(self, batch: Batch) -> Batch:
        """A data batch as the user's ``nll`` takes it (the data-parallel version drops its weight column)."""
        return batch

    def _removed_rows(self, batch: Batch) -> int:
        """The request's number of removed rows (the data-parallel version: over all ranks)."""
        return int(batch[0].shape[0])

    def _stacked(self, stream: Any, count: int) -> Batch:
        """``count`` fresh minibatches of the remaining data, stacked on a leading dimension."""
        return stream.stacked(count)

    # ------------------------------------------------------------------ memory-bounded derivatives
    def _bytes_per_row(self, f: Callable, theta: torch.Tensor, batch: Batch) -> int:
        if self._row_bytes is None:
            try:
                self._row_bytes, self._call_bytes = row_and_call_bytes(f, theta, batch)
            except (RuntimeError, NotImplementedError, TypeError):
                self._row_bytes = sum(t[:1].numel() * t.element_size() for t in batch) * 64
        return self._row_bytes

    def _call_cost(self, rows: int) -> int:
        """Bytes one call over ``rows`` rows saves for its backward pass (``rows · per row + per call``)."""
        return rows * (self._row_bytes or 1) + self._call_bytes

    def _vectorise(self, dim: int, check: bool = False) -> bool:
        """Whether per-draw derivatives (of the safety ``check``) go through ``vmap`` (``backend``;
        :func:`loop_over_draws` for ``"auto"``)."""
        return self.backend == "func" or (self.backend == "auto" and not loop_over_draws(self.model, dim, check))

    def _check_draws(self, index: torch.Tensor, screened: bool) -> tuple[torch.Tensor | _BankRows, int]:
        """The safety check's draws ``bank[index]`` and the bytes of the copies they hold (planned by
        :meth:`_check_plan`): the bank itself where they are every sample, else a copy; and the screen's copy of half
        of them. Read in place instead (:class:`_BankRows`, a chunk of draws copied at a time within the check's
        plan) where those copies would take over ``1/FURTHER_COPY_SHARE`` of the budget: 8 draws of a
        1.1M-parameter MLP are 36 MB (stop 59)."""
        S, k = int(self.bank.shape[0]), int(index.numel())
        row = self.spec.dim * self.bank.element_size()
        held = (0 if k == S else k * row) + (math.ceil(k / 2) * row if screened else 0)
        if held <= self.memory_budget // FURTHER_COPY_SHARE:
            return (self.bank if k == S else self.bank[index]), held
        return _BankRows(self.bank, index), 0

    def _check_plan(self, thetas: torch.Tensor | _BankRows, rows: int, held: int = 0) -> dict[str, int | None]:
        """``chunk`` (draws per pass) and ``row_chunk`` (rows per pass; ``None``: all, and the draws' gradients
        formed at once) of the safety check within the budget.

        Every draw over all its rows at once is planned at ``_HVP_MEMORY_FACTOR`` times what one call saves; the
        check's gradient also holds ``CHECK_D_COPIES`` copies of every draw's gradient (the moved draws, their
        gradients, the prior's). When that does not fit, the gradients are summed chunk by chunk and the rows are
        split until one draw fits beside its ``D`` numbers (an 85k-parameter MLP's 8 check draws took 8.7 MB
        under an 8 MB budget, a 10k-parameter CNN's 256 rows 18 MB). ``held``: bytes of copies of the draws the
        check holds meanwhile (:meth:`_check_draws`); draws read in place (:class:`_BankRows`) are copied a chunk at
        a time, one more copy of every draw where the gradients are formed at once."""
        K, D = thetas.shape
        d_bytes = D * thetas.element_size()
        per_draw = _HVP_MEMORY_FACTOR * self._call_cost(rows)
        chunk = chunk_for(self.memory_budget, per_draw, K, held)
        copies = CHECK_D_COPIES + (0 if isinstance(thetas, torch.Tensor) else 1)
        if held + copies * K * d_bytes + chunk * per_draw <= self.memory_budget:
            self._plan("check", held + copies * K * d_bytes + chunk * per_draw)
            return {"chunk": chunk, "row_chunk": None}  # as always: every row at once
        reserve = held + CHECK_D_COPIES * d_bytes  # x, the summed data and prior gradients, G
        room = self.memory_budget - reserve - CHECK_D_COPIES * d_bytes
        step = rows
        if per_draw > room:
            step = int(max(1, (room - _HVP_MEMORY_FACTOR * self._call_bytes) // (_HVP_MEMORY_FACTOR * self._row_bytes)))
        per = _HVP_MEMORY_FACTOR * self._call_cost(step) + CHECK_D_COPIES * d_bytes
        chunk = chunk_for(self.memory_budget, per, K, reserve)
        self._plan("check", reserve + chunk * per)
        return {"chunk": chunk, "row_chunk": min(step, rows)}

    def _plan(self, path: str, nbytes: int) -> None:
        """Record ``nbytes`` planned by ``path`` in this request (the largest of its plans; ``info["memory"]``)."""
        self._planned[path] = max(self._planned.get(path, 0), int(nbytes))

    def _memory_info(self) -> dict[str, Any]:
        """``report.info["memory"]``: the budget, the bytes each planning path of the request planned at most
        (``planned``, keyed by path: ``gradients``, ``check``, ``hessian_products``, ``dense_hessian``,
        ``dense_matrices``, ``ggn_jacobians``, ``kfac_build``, ``kfac_probes``, ``sample_shift``,
        ``emptied_label_resample``, ``unread_embedding_rows``, ``second_derivative_check``, ``forward_check``), their
        largest (``planned_peak``) and what is held outside the plans (``not_planned``, with this request's bytes per
        ``[S, D]`` copy)."""
        S = 0 if self.bank is None else int(self.bank.shape[0])
        D = int(self.spec.dim)
        item = self.bank.element_size() if self.bank is not None else ParamSpec.params(self.model)[0].element_size()
        copy = S * D * item
        return {
            "budget": int(self.memory_budget),
            "planned": dict(self._planned),
            "planned_peak": max(self._planned.values(), default=0),
            "not_planned": (
                f"beside the bank itself, the shifted bank (the request's result), an [S, D] copy of "
                f"{format_bytes(copy)} here (S = {S}, D = {D:,}, {item} bytes a number), and the moved copy of the "
                "check's draws (at most S of them) that further Newton steps (newton_target='equilibrium') and the "
                "affine shift's spread check hold besides the check's plan (the damping search's trials move the "
                "check's draws within it)"
            ),
        }

    def _request_floor(self, rows: int = 1) -> int:
        """Bytes the smallest request needs: ``REQUEST_D_COPIES`` copies of the parameters (the live draw, ``G``
        and its error, the step, the gradients being summed) and one draw's derivatives over ``rows`` rows."""
        item = ParamSpec.params(self.model)[0].element_size()
        return REQUEST_D_COPIES * self.spec.dim * item + _HVP_MEMORY_FACTOR * self._call_cost(rows)

    def _grad_plan(self, thetas: torch.Tensor, rows: int, rowwise: bool, reserve: int) -> tuple[int, int, int, int]:
        """``(draws per chunk, rows per part, planned bytes, planned bytes per draw)`` for per-draw gradients over
        ``rows`` rows within the budget less ``reserve`` (what the caller holds meanwhile, e.g. the output; planned
        bytes: ``reserve + draws per chunk · per draw``). The caller records what it runs once its chunk is final
        (``_plan("gradients", ...)``: the ranks' agreed chunk, or one draw where it loops over them).

        Each draw of a chunk holds what one call saves ``GRAD_SAVED_FACTOR`` times over (``_call_cost``) and its
        gradient ``GRAD_COPIES`` times (the parameters' gradients, their flat concatenation, the chunk's result):
        sized by twice the saved bytes alone, a 34k-parameter transformer's 64 draws of 8 rows measured 18 MB
        against a planned 7 MB (an 8 MB budget), mostly the gradients themselves.
        """
        d_bytes = GRAD_COPIES * thetas.shape[1] * thetas.element_size()
        room = self.memory_budget - reserve
        step = rows
        f = GRAD_SAVED_FACTOR
        if rowwise and rows > 1 and f * self._call_cost(rows) + d_bytes > room:
            step = int(max(1, (room - d_bytes - f * self._call_bytes) // (f * (self._row_bytes or 1))))
        per_draw = f * self._call_cost(step) + d_bytes
        if step < rows:  # the chunk's running sum over the row parts
            per_draw += thetas.shape[1] * thetas.element_size()
        chunk = chunk_for(self.memory_budget, per_draw, thetas.shape[0], reserve)
        return chunk, step, reserve + chunk * per_draw, per_draw

    def _grad_chunks(
        self, f: Callable, thetas: torch.Tensor, batch: Batch, rowwise: bool, reserve: int, agree: bool = False
    ) -> Iterator:
        """``(s0, s1, ∇f(θ_s, batch) for s in s0:s1)`` chunk by chunk, within the budget less ``reserve``
        (``rowwise``: ``f`` is a sum over rows, split into parts when one draw over all of them would not fit;
        ``agree``: the same chunks on every rank, for a caller that all-reduces each chunk)."""
        rows = batch[0].shape[0]
        chunk, step, _, per_draw = self._grad_plan(thetas, rows, rowwise, reserve)
        if agree and self._reduce is not None:
            # the same chunks on every rank (the smallest): ranks removing different numbers of rows planned
            # different chunks, and all-reducing each chunk (chain mode's lag sums) aborted gloo on their sizes
            chunk = int(-self._reduce_max(torch.tensor([-float(chunk)], dtype=torch.float64))[0])
        self._plan("gradients", reserve + chunk * per_draw)  # the chunk as it runs (after the ranks agree)
        parts = [batch] if step >= rows else [tuple(t[i : i + step] for t in batch) for i in range(0, rows, step)]
        for s0 in range(0, thetas.shape[0], chunk):
            th = thetas[s0 : s0 + chunk]
            g = None
            for part in parts:  # summed in the order of the parts, draw by draw (as one pass over each part)
                gp = self._draw_grads(f, th, part)
                g = gp if g is None else g.add_(gp)
                del gp
            yield s0, s0 + th.shape[0], g

    def _draw_grads(self, f: Callable, thetas: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``∇f(θ_s, batch)`` for the draws ``thetas``, at once through ``vmap`` or one draw at a time."""
        if self._vectorise(thetas.shape[1]):
            try:
                return vmap(grad(f), in_dims=(0, *([None] * len(batch))))(_as_tensor(thetas), *batch)
            except (RuntimeError, NotImplementedError, TypeError):
                if self.backend == "func":
                    raise
                self.backend = "autograd"
        out = torch.empty(thetas.shape, dtype=thetas.dtype, device=thetas.device)
        for i, t in enumerate(thetas):
            out[i] = _one_grad(f, t, batch)
        return out

    def _looped_grads(self, f: Callable, thetas: torch.Tensor | _BankRows, batch: Batch, reserve: int) -> Iterator:
        """``(s, ∇f(θ_s, batch))`` one draw at a time (``f`` a sum over rows, in the parts :meth:`_grad_chunks`
        plans within the budget less ``reserve``, summed in their order as there)."""
        rows = batch[0].shape[0]
        _, step, _, per_draw = self._grad_plan(thetas, rows, True, reserve)
        self._plan("gradients", reserve + per_draw)  # one draw at a time
        parts = [batch] if step >= rows else [tuple(t[i : i + step] for t in batch) for i in range(0, rows, step)]
        for s, t in enumerate(thetas):
            g = None
            for part in parts:
                gp = _one_grad(f, t, part)
                g = gp if g is None else g.add_(gp)
                del gp
            yield s, g

    def _per_draw_grads(self, f: Callable, thetas: torch.Tensor, batch: Batch, rowwise: bool = False) -> torch.Tensor:
        """``∇f(θ_s, batch)`` for every draw, in chunks of draws that fit the budget beside the ``[S, D]`` result;
        ``rowwise`` (``f`` is a sum over rows) also splits the rows when one draw over all of them would not fit."""
        S, D = thetas.shape
        out = None
        for s0, s1, g in self._grad_chunks(f, thetas, batch, rowwise, S * D * thetas.element_size()):
            if s0 == 0 and s1 == S:  # one chunk of every draw: its own fresh result, not copied once more
                return g
            if out is None:
                out = torch.empty((S, D), dtype=thetas.dtype, device=thetas.device)
            out[s0:s1] = g
            del g
        return torch.empty((S, D), dtype=thetas.dtype, device=thetas.device) if out is None else out

    def _grad_means(
        self, f: Callable, thetas: torch.Tensor | _BankRows, batch: Batch, lags: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean over draws of ``∇f(θ_s, batch)`` (``f`` a sum over rows) and half the difference of the means
        of the first and the second half of the draws (its Monte-Carlo error), summed chunk by chunk when every
        draw's gradient would take over half the budget (64 draws of an 85k-parameter MLP: 22 MB, held twice, took
        43 MB under an 8 MB budget), or draw by draw when the draws are looped over. ``lags`` (4 numbers, zeroed
        here) receives the draws' :func:`lag_sums`."""
        S, D = thetas.shape
        half = S // 2
        out = S * D * thetas.element_size()
        if lags is None and not self._vectorise(D):
            # one draw at a time: each gradient added to its half's sum as it comes, never the [S, D] gradients
            # (on a 1.2M-parameter ResNet their 78 MB, written once and averaged three times, were 40 ms of a 0.7 s
            # request); the same sums as the chunks below, to rounding of the means (float32: ~1e-7 relative)
            sums = torch.zeros(2, D, dtype=thetas.dtype, device=thetas.device)
            for s, g in self._looped_grads(f, thetas, batch, sums.numel() * sums.element_size()):
                sums[0 if s < half else 1] += g
                del g
            return self._half_sums_mean(sums, S)
        if 2 * out <= self.memory_budget:  # every draw's gradient fits easily: the same numbers as one pass
            grads = self._per_draw_grads(f, thetas, batch, rowwise=True)
            if lags is not None:
                lags.copy_(lag_sums(grads))
            return mean_and_half_difference(grads)
        sums = torch.zeros(2, D, dtype=thetas.dtype, device=thetas.device)
        if lags is not None:
            lags.zero_()
        before = None
        reserve = sums.numel() * sums.element_size()
        for s0, s1, g in self._grad_chunks(f, thetas, batch, True, reserve, agree=lags is not None):
            cut = min(max(half - s0, 0), s1 - s0)
            if cut:
                sums[0] += g[:cut].sum(0)
            if cut < s1 - s0:
                sums[1] += g[cut:].sum(0)
            if lags is not None:  # on the draws' whole gradients: data-parallel ranks hold their rows' parts
                whole = g if self._reduce is None else self._reduce(g.clone())
                lags += lag_sums(whole, before)
                before = whole[-1:].clone()
                del whole
            del g
        return self._half_sums_mean(sums, S)

    def _half_sums_mean(self, sums: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``G`` and half the difference of the halves' means from the sums ``[2, D]`` of the first ``S // 2`` and
        the other draws' gradients (data-parallel: the ranks' sums, one all-reduce of 2·D numbers)."""
        half = S // 2
        if self._reduce is not None:
            sums = self._reduce(sums)
        G = sums.sum(0) / S
        dev = 0.5 * (sums[0] / half - sums[1] / (S - half)) if half >= 1 else torch.zeros_like(G)
        return G, dev

    def _dense_hessian(
        self, f: Callable, thetas: torch.Tensor, batch: Batch, shared: bool, every_row: bool = False
    ) -> torch.Tensor:
        """Mean over draws of the dense Hessian of ``f``, built in column chunks that fit the memory budget
        (``every_row``: ``batch`` is every remaining row, ``curvature_data="full"``)."""
        d = thetas.shape[1]
        rows = batch[0].shape[1 if not shared else 0] if batch else 1
        per_col = _HVP_MEMORY_FACTOR * self._call_cost(rows)
        reserve = dense_memory(d, thetas.element_size())
        if per_col > self.memory_budget - reserve:
            # a minibatch per draw is suggested only where the rows are every remaining row (stop 50's probe: said
            # over minibatches already, where it changed nothing)
            raise MemoryError(
                f"the dense Hessian needs {format_bytes(reserve + per_col, up=True)} for one column over {rows} rows, "
                f"over the memory budget of {format_bytes(self.memory_budget)}: raise memory_budget to at least "
                f"{format_bytes(reserve + per_col, up=True)}"
                + (", use curvature_data='minibatch'" if every_row else "")
                + self._alternatives(SolverName.KFAC, SolverName.CG)
                + "; nothing was changed"
            )
        cols = chunk_for(self.memory_budget, per_col, d, reserve)
        if cols < d:  # chunked: the margin for the heap's growth across the chunks (one chunk has none)
            cols = chunk_for(self.memory_budget, _DENSE_CHUNK_MARGIN * per_col, d, reserve)
        S = thetas.shape[0]
        draws = chunk_for(self.memory_budget, per_col * d, S, reserve) if cols == d else 1
        self._plan(
            "dense_hessian", reserve + (cols * _DENSE_CHUNK_MARGIN * per_col if cols < d else draws * per_col * d)
        )
        # the plan counts what is alive; glibc keeps freed heap pages resident, so what earlier steps freed is handed
        # back first, and what the build freed after it (a no-op where there is no malloc_trim). Not for a build
        # planned within a sixteenth of the budget: each trim took ~1 ms, 2-3% of a GMM demo request (4 rows, 8
        # parameters), and what such a build frees cannot carry the process near its budget
        trim = cols < d or reserve + per_col * d * min(draws, S) > self.memory_budget // _DENSE_TRIM_FRACTION
        if self.backend != "autograd":
            try:  # reverse-over-reverse, ``cols`` Hessian columns and ``draws`` draws at a time
                if trim:
                    release_free_heap()
                if cols < d:
                    H = self._dense_hessian_chunked(f, thetas, batch, shared, cols, _DENSE_CHUNK_MARGIN * per_col)
                else:
                    hess = vmap(jacrev(grad(f)), in_dims=(0, *([None if shared else 0] * len(batch))))
                    H = torch.zeros(d, d, dtype=thetas.dtype, device=thetas.device)
                    # rows shared by every draw: one draw at a time into the chunk's [k, D, D] (what the vmapped
                    # chunk returns), summed as before (the same numbers on linear layers, to rounding on others,
                    # e.g. convolutions: up to 6e-7 on a Conv1d network); all draws at once ran out of cache
                    # (a 467-parameter MLP's 16 draws over 80 rows: 0.73 s against 0.18 s a draw at a time)
                    one = shared and draws > 1 and per_col * d >= _DENSE_DRAW_LOOP_BYTES
                    for s0 in range(0, S, draws):
                        th = thetas[s0 : s0 + draws]
                        if one:
                            block = torch.empty((th.shape[0], d, d), dtype=thetas.dtype, device=thetas.device)
                            for i in range(th.shape[0]):
                                block[i : i + 1] = hess(th[i : i + 1], *batch)
                        else:
                            block = hess(th, *(batch if shared else tuple(t[s0 : s0 + draws] for t in batch)))
                        H += block.sum(0)
                        del block
                    H = H / S
                if trim:
                    release_free_heap()
                return H
            except (RuntimeError, NotImplementedError, TypeError):
                if self.backend == "func":
                    raise
                self.backend = "autograd"
        op = SampleAveragedHessian(f, thetas, batch, shared_args=shared, backend="autograd")
        return op.dense()

    def _dense_hessian_chunked(
        self, f: Callable, thetas: torch.Tensor, batch: Batch, shared: bool, cols: int, chunk_bytes: int
    ) -> torch.Tensor:
        """The dense Hessian ``cols`` columns at a time at one draw at a time, planned at ``chunk_bytes`` a chunk.

        The same numbers, bit for bit, as ``jacrev(grad(f), chunk_size=cols)`` at each draw, which kept every
        chunk's result until it concatenated them: small buffers left between the chunks' large ones split glibc's
        heap, which grew across the chunks (a 1,012-parameter float64 MLP over 2,000 rows peaked at 1.1-1.3x a
        200 MB budget). Each chunk is written into the draw's ``[D, D]`` matrix, allocated before the chunks, and
        where the resident set has grown past what leaves room for the next chunk, the heap's free pages are handed
        back first (:func:`release_free_heap`: glibc keeps them resident; elsewhere a no-op)."""
        d, S = thetas.shape[1], thetas.shape[0]
        dims = (0, *([None if shared else 0] * len(batch)))
        start = resident_bytes()
        room = self.memory_budget - chunk_bytes  # resident growth that leaves room for one more chunk

        def draw(t: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
            _, vjp_fn = vjp(lambda u: grad(f)(u, *args), t)
            out = t.new_zeros(d, d)
            for c0 in range(0, d, cols):
                now = resident_bytes()
                if start is not None and now is not None and now - start > room:
                    release_free_heap()
                k = min(cols, d - c0)
                basis = t.new_zeros(k, d)  # rows c0..c0+k of the identity, as jacrev's chunk
                basis.diagonal(c0).fill_(1)
                out[c0 : c0 + k] = vmap(vjp_fn)(basis)[0]
            return out

        H = torch.zeros(d, d, dtype=thetas.dtype, device=thetas.device)
        for s in range(S):
            args = batch if shared else tuple(t[s : s + 1] for t in batch)
            H += vmap(draw, in_dims=dims)(thetas[s : s + 1], *args).sum(0)
        return H / S

    def _operator_plan(self, thetas: torch.Tensor, rows: int) -> tuple[int, int]:
        """``(draws per batch, products at once)`` of the iterative solvers' Hessian-vector products within the
        budget: each single-draw product over ``rows`` rows is planned at ``_HVP_PRODUCT_FACTOR`` times what one
        call saves plus ``_HVP_D_COPIES`` copies of the parameters (a 301k-parameter MLP's 3 draws per batch,
        planned at 3x the saved bytes alone, peaked at 183 MB under a 16 MB budget)."""
        S, D = thetas.shape
        per = self._product_bytes(rows, D, thetas.element_size())
        # agreed across ranks (their minibatches can differ by a row): one rank's refusal left the others waiting
        need = int(self._reduce_max(torch.tensor([float(per)], dtype=torch.float64))[0])
        if need > self.memory_budget:  # before any product (propose puts everything back)
            self._refuse_product(need, rows)
        products = max(1, self.memory_budget // max(per, 1))
        return min(S, products), products

    def _product_bytes(self, rows: int, dim: int | None = None, item: int | None = None) -> int:
        """Planned bytes of one single-draw Hessian-vector product over ``rows`` rows (:meth:`_operator_plan`), for
        ``dim`` numbers of ``item`` bytes (default: the model's trainable parameters)."""
        dim = self.spec.dim if dim is None else dim
        item = item or ParamSpec.params(self.model)[0].element_size()
        return _HVP_PRODUCT_FACTOR * self._call_cost(rows) + _HVP_D_COPIES * dim * item

    def _refuse_product(self, need: int, rows: int | None, how: str = "") -> None:
        """Refuse a matrix-free solver whose single-draw Hessian-vector product (``need`` bytes over ``rows`` rows,
        which ``how`` explains; ``None``: rows not known before they are read, ``need`` over one) does not fit the
        memory budget."""
        per_row = _HVP_PRODUCT_FACTOR * (self._row_bytes or 1)
        if rows is None:
            where = "even over one row"
            more = (
                f" plus {format_bytes(per_row, up=True)} for each further row of a curvature minibatch (as many rows "
                f"as one minibatch of the data source, pooled to at least {MIN_CURVATURE_ROWS} per draw when smaller)"
            )
        else:
            where, more = f"over its {rows:,} rows" + (f" ({how})" if how else ""), ""
        raise MemoryError(
            f"solver={self.solver.value!r}: one Hessian-vector product at one draw needs {format_bytes(need, up=True)} "
            f"{where}, planned at {_HVP_D_COPIES} copies of the {self.spec.dim:,} parameters and "
            f"{_HVP_PRODUCT_FACTOR}x what one call saves, over the memory budget of {format_bytes(self.memory_budget)}"
            f": raise memory_budget to at least {format_bytes(need, up=True)}{more}"
            + self._alternatives(SolverName.KFAC)
            + "; nothing was changed"
        )

    def _curvature_count(self, solver: SolverName) -> int:
        """The curvature's draws with ``solver`` (its default ``curvature_draws`` unless one was given; chain mode's
        not counted yet: 1)."""
        if self.bank is None:
            return 1
        given = self.curvature_draws if self._curvature_draws_given else None
        return _draw_count(self.bank, given or default_curvature_draws(solver))

    def _minibatch_rows(self, stream: _Stream, solver: SolverName | None = None) -> tuple[int | None, str]:
        """The most rows of one draw's curvature minibatch (:meth:`_Stream.stacked`) with ``solver`` (default: this
        one), read from the data source's ``batch_size`` before any minibatch is, and how they follow from it
        (``None``: no ``batch_size``, or under ``torch.distributed``, where a rank's share of a minibatch is known
        once it is read, or in chain mode, whose draws read the sampler's minibatches)."""
        bs = getattr(stream.source, "batch_size", None)
        if self._reduce is not None or self._asked_chain or not (is_integer(bs) and int(bs) >= 1):
            return None, ""
        bs = int(bs)
        try:  # a minibatch holds no more rows than a pass draws: a DataLoader's sampler, a RemovableDataset's rows
            if isinstance(stream.source, torch.utils.data.DataLoader) and stream.source.sampler is not None:
                bs = max(1, min(bs, len(stream.source.sampler)))
            elif stream.listable:
                bs = max(1, min(bs, len(stream.source)))
        except TypeError:
            pass
        if stream.from_rows:
            return bs, f"the remaining rows given as a tuple are read in minibatches of {bs}"
        if bs >= MIN_CURVATURE_ROWS:
            return bs, f"the data source's minibatches of {bs} rows"
        # smaller minibatches are pooled until every draw holds MIN_CURVATURE_ROWS, then split evenly among the
        # draws: at most one minibatch beyond that
        count = self._curvature_count(solver or self.solver)
        rows = (count * MIN_CURVATURE_ROWS + bs - 1) // count
        return rows, (
            f"the data source's minibatches of {bs} rows, pooled to at least {MIN_CURVATURE_ROWS} rows per draw: at "
            f"most {rows}"
        )

    def _product_need(
        self, stream: _Stream, n: int, removed: int, solver: SolverName | None = None
    ) -> tuple[int, int | None, str]:
        """``(bytes, rows, how)``: the least budget under which a matrix-free ``solver``'s single-draw product
        (:meth:`_operator_plan`) fits over the most rows it will read (``rows``; ``None``: not known before they
        are read, and ``bytes`` is one row's), and how those rows follow from the data source."""
        least = removed if self.hessian is HessianKind.FULL else 1  # hessian="full": the removed rows' operator
        mb, how = self._minibatch_rows(stream, solver)
        if mb is None:
            return self._product_bytes(least), None, how
        rows = max(mb, least)
        if self.curvature_data == "full" and stream.listable and n > mb:
            # every row where they fit beside the plan (_curvature_data), else a minibatch per draw
            if self._full_rows_fit(n, self._product_bytes(rows), dense=False):
                rows, how = max(n, least), "every remaining row: curvature_data='full', and they fit"
        elif least > mb:
            how = "the removed rows: hessian='full' adds their curvature"
        return self._product_bytes(rows), rows, how

    def _solver_need(self, name: SolverName) -> int | None:
        """The least budget this request needs with solver ``name`` (``kfac`` or a matrix-free one) by the plans
        that solver's run checks first (``None``: not known before its rows are read, or ``kfac`` cannot build
        this curvature)."""
        if self._asked is None:
            return None
        stream, n, batch = self._asked
        floor = self._request_floor()
        if name is SolverName.KFAC:
            return self._kfac_need(stream, n, batch, floor)
        need, rows, _ = self._product_need(stream, n, int(batch[0].shape[0]), name)
        return None if rows is None else max(floor, need)

    def _kfac_need(self, stream: _Stream, n: int, batch: Batch, floor: int) -> int | None:
        """The least budget of this request with ``solver="kfac"``: the request's ``floor`` and K-FAC's build in row
        chunks of one row (:class:`~mcmc_unlearner.backends.kfac.KFACBackend`), estimated as it estimates it, on a
        minibatch of the curvature data's shape and storage (the estimate counts the storage its rows are a view
        of) whose rows are the removed ones (``None``: the rows are not known before they are read, or ``kfac``
        cannot build this curvature)."""
        from .kronecker import KroneckerCurvature

        rows, _ = self._minibatch_rows(stream, SolverName.KFAC)
        if rows is None or not self._kfac_builds():
            return None
        count = self._curvature_count(SolverName.KFAC)
        item = ParamSpec.params(self.model)[0].element_size()

        def need(count: int, rows: int) -> int:
            probe = []
            for t in batch:
                buf = t.new_empty((count, rows, *t.shape[1:]))  # only the first draw's rows are read
                buf[0] = t[torch.arange(rows) % t.shape[0]]
                probe.append(buf[0])
            estimate = KroneckerCurvature.memory_estimate(self.model, None, tuple(probe), nll=self._row_nll)
            return max(floor, kfac_row_need(estimate, self.spec.dim, item, self.mc_samples))

        try:
            least = need(count, rows)
            if self.curvature_data == "full" and stream.listable and self._full_rows_fit(n, least, dense=False):
                least = need(1, n)  # every remaining row, shared by the draws, where they fit (_curvature_data)
            return least
        except (RuntimeError, TypeError, ValueError, IndexError, NotImplementedError):
            return None

    def _alternatives(self, *names: SolverName | str) -> str:
        """``", or use solver=X"`` for the solvers in ``names`` that this request fits the memory budget with, and
        ``", or solver=X with memory_budget at least Y"`` for one that needs more (``kfac`` only where it builds this
        curvature; ``""``: none)."""
        fits, more = [], ""
        for name in map(SolverName, names):
            if name is self.solver or (name is SolverName.KFAC and not self._kfac_builds()):
                continue
            need = self._solver_need(name)
            if need is None:
                more += f", or solver={name.value!r} (its need is not known before its rows are read)"
            elif need <= self.memory_budget:
                fits.append(repr(name.value))
            else:
                more += f", or solver={name.value!r} with memory_budget at least {format_bytes(need, up=True)}"
        return (f", or use solver={' or '.join(fits)}" if fits else "") + more

    def _operator(self, f: Callable, thetas: torch.Tensor, batch: Batch, shared: bool) -> Any:
        rows = batch[0].shape[0 if shared else 1]
        chunk, products = self._operator_plan(thetas, rows)
        self._plan("hessian_products", chunk * self._product_bytes(rows, thetas.shape[1], thetas.element_size()))
        return SampleAveragedHessian(
            f, thetas, batch, shared_args=shared, backend=self.backend, chunk_size=chunk, max_products=products
        )

    # ------------------------------------------------------------------ draws
    def _chain_draws(self, remaining: _Stream, n: int, removed: Batch | None = None) -> torch.Tensor:
        """``samp_T`` sampler steps whose states are the request's posterior draws.

        The steps sample the posterior the chain is in, which still holds the removed rows (the paper keeps them in
        the sampler during the solve): the remaining data's minibatch energy plus the removed rows' exact ``Σ h``.
        On the remaining data alone the chain would already drift part of the way to the new posterior during the
        draws, and the influence shift added to the last draw would overshoot by that drift.
        """
        if self.sampler is None:
            if self.bank is None:
                raise ValueError(
                    "there are no stored samples to average over (bank=None) and no sampler to draw them: pass "
                    "bank= (your stored samples: a [S, D] tensor, a list of state_dicts or a dict of stacked "
                    "tensors), or sampler= for the paper's chain expectation"
                )
            raise ValueError("expectation='chain' needs the sampler (pass sampler=...)")
        params = ParamSpec.params(self.model)
        draws = []
        for _ in range(self.samp_T):
            z = next(remaining)
            self.sampler.zero_grad()
            energy = self.energy(self.model, z, n)
            if removed is not None:
                energy = energy + self.nll(self.model, removed).sum()
            energy.backward()
            self.sampler.step()
            draws.append(torch.cat([p.detach().reshape(-1) for p in params]))
        self.sampler.zero_grad()
        return torch.stack(draws)

    def _note_curvature_cap(self, used: int, info: dict[str, Any]) -> None:
        """Record that ``curvature_draws`` was capped at the bank's size (``info["curvature_draws_capped"]``) and,
        when the user asked for that many draws by name, warn once per unlearner naming the cap."""
        self._note_cap(
            "curvature_draws", self.curvature_draws, used, self._curvature_draws_given, info,
            "the curvature is averaged over all {used} (capped at the bank's size; the report's n_curvature_draws "
            "says so)",
        )  # fmt: skip

    def _note_one_sample(self, info: dict[str, Any]) -> None:
        """Say (``info["one_sample_bank"]``, and a warning once per unlearner) what a bank of one sample leaves out:
        it was accepted without a word (stop 60's probe), its expectations and checks degenerate."""
        told = (
            "the bank holds one sample, so every expectation over the posterior is that one sample's: the shift's "
            "Monte-Carlo error cannot be estimated (report.shift_stderr is NaN) and the safety check measures the "
            "step at the draw its curvature was built from (no held-out draw, no second measurement on other "
            f"draws). Store more samples of the chain (e.g. every k-th state of its second half; the defaults read "
            f"{CHECK_DRAWS} for the check and up to {self.curvature_draws} others for the curvature)"
        )
        info["one_sample_bank"] = told
        warned = self.__dict__.setdefault("_warned_caps", set())
        if "one_sample_bank" not in warned:
            warned.add("one_sample_bank")
            warnings.warn(told, stacklevel=outside_stacklevel())

    def _note_cap(self, name: str, asked: int, used: int, given: bool, info: dict[str, Any], what: str) -> None:
        """Record that the option ``name`` (``asked`` draws) was capped at the bank's ``used`` samples
        (``info[name + "_capped"]``) and, when the user asked for that many by name (``given``), warn once per
        unlearner and option, saying ``what`` the capped draws measure."""
        info[f"{name}_capped"] = used
        warned = self.__dict__.setdefault("_warned_caps", set())
        if given and name not in warned:
            warned.add(name)
            warnings.warn(
                f"{name}={asked} is more than the bank's {used} samples: {what.format(used=used)}. Collect a larger "
                f"bank for more draws, or pass {name}<={used} to silence this",
                stacklevel=outside_stacklevel(),
            )

    def _g_turn(self) -> int:
        """Which turn of the draws the next request's ``G`` reads (:func:`_turned`): the requests applied so far,
        or always the first with ``turn_draws=False`` or, under ``"auto"``, with ``recenter_every`` on (K-FAC's
        default), whose corrections compare the bank with an anchor at fixed draws (an exact removal is their fixed
        point only when ``G`` reads them too); turned there, Fashion-MNIST seed 0 went from 1.76x to 2.01x the
        retrain-pair floor (stop 47)."""
        on = not self.recenter_every if self.turn_draws == "auto" else self.turn_draws
        return self._g_round if on else 0

    def _grad_draw_count(self, k: int) -> int | None:
        if self.grad_draws == "auto":
            return max(16, math.ceil(1024 / max(k, 1)))
        return None if self.grad_draws is None else int(self.grad_draws)

    def _problem(
        self,
        stream: _Stream,
        n: int,
        batch: Batch,
        c_thetas: torch.Tensor,
        e_f: Callable,
        h_f: Callable,
        info: dict[str, Any],
    ) -> Problem:
        """The request as the curvature backend sees it: its draws ``c_thetas``, the curvature data read from
        ``stream`` (:meth:`_curvature_data`) and the removed rows ``batch``."""
        curv_batch, shared = self._curvature_data(stream, n, c_thetas.shape[0], info)
        c_thetas = self._full_rows_draws(c_thetas, n, shared, info)
        return Problem(
            model=self.model,
            energy_f=e_f,
            nll_f=h_f,
            nll=self._row_nll,
            log_prior=self.log_prior,
            n=n,
            removed=batch,
            thetas=c_thetas,
            batch=curv_batch,
            shared=shared,
            hessian=self.hessian.value,
            generator=self.generator,
            budget=self.memory_budget,
            dense_hessian=lambda f, thetas, b, shared: self._dense_hessian(
                f, thetas, b, shared, every_row=shared and b is curv_batch
            ),
            operator=lambda: self._full_or_remaining_operator(e_f, h_f, c_thetas, curv_batch, shared, batch),
            reduce=self._reduce,
            raw=self._raw,
            alternatives=self._alternatives,
            plan=self._plan,
        )

    def _full_rows_fit(self, n: int, budget: int, dense: bool | None = None) -> bool:
        """Whether ``curvature_data="full"`` reads all ``n`` rows at once under ``budget`` (else a minibatch per
        draw): their derivatives beside the dense matrices (``dense``; default: this solver's), in the parameters'
        item size (float64: 8 bytes; stop 48's memory probe)."""
        dense = self.solver in _DENSE if dense is None else dense
        item = ParamSpec.params(self.model)[0].element_size()
        return _HVP_MEMORY_FACTOR * self._call_cost(n) <= budget - dense_memory(self.spec.dim if dense else 0, item)

    def _full_rows_draws(self, c_thetas: torch.Tensor, n: int, shared: bool, info: dict[str, Any]) -> torch.Tensor:
        """``c_thetas``, or fewer of them (evenly spaced) where ``curvature_data="auto"`` read every one of ``n``
        rows and rows × draws × parameters is over ``FULL_ROWS_DRAWS_WORK`` without ``curvature_draws`` given
        (``info["curvature_draws_capped"]`` and ``info["curvature_draws_reason"]``)."""
        draws, dim = int(c_thetas.shape[0]), self.spec.dim
        if not shared or self.curvature_data != "auto" or self._curvature_draws_given or self._asked_chain:
            return c_thetas
        work = n * draws * dim
        k = max(1, FULL_ROWS_DRAWS_WORK // max(1, n * dim))
        if k >= draws:
            return c_thetas
        info["curvature_draws_capped"] = k
        info["curvature_draws_reason"] = (
            f"every remaining row at {k} of {draws} draws: {n:,} rows × {draws} draws × {dim:,} parameters = "
            f"{work:,}, over {FULL_ROWS_DRAWS_WORK:,} (curvature_draws={draws} reads them all)"
        )
        return c_thetas[_evenly(draws, k)]

    def _curvature_data(self, stream: _Stream, n: int, draws: int, info: dict[str, Any]) -> tuple[Batch, bool]:
        """Every remaining row shared by all draws, or one fresh minibatch per draw (see ``curvature_data``)."""
        want = self.curvature_data
        if want == "auto":
            # every row only for the dense Hessian of a small problem: the Gauss-Newton matrix's cost grows as
            # rows · outputs · D² (a minibatch per draw is what benchmarks/layer_zoo.py measured)
            # (at fewer draws where rows × draws × parameters is large: _full_rows_draws)
            small = n * draws <= FULL_ROWS_MAX and self.solver is SolverName.EXACT
            want = "full" if small else "minibatch"
        if want == "full":
            full = stream.full()
            fits = self._full_rows_fit(n, self.memory_budget)
            if full is not None and fits:
                info["curvature_data"] = "full"
                return full, True
            why = "its data source has no remaining()" if full is None else "all rows do not fit the memory budget"
            # (said for 'auto' as what it chose, not as the user's request: stop 44's probe)
            asked = "full requested" if self.curvature_data == "full" else "'auto' chose every row"
            info["curvature_data"] = f"minibatch ({asked}, but {why})"
            if self.curvature_data == "full" and not getattr(self, "_warned_full", False):
                self._warned_full = True  # asked for by name: say once that it was not done
                fix = (
                    "pass the remaining rows as tensors, (x, y), or a RemovableDataset, which can list every row "
                    "(a DataLoader cannot)"
                    if full is None
                    else "raise memory_budget"
                )
                warnings.warn(
                    f"curvature_data='full': the curvature uses one minibatch per draw instead, since {why}; {fix}",
                    stacklevel=outside_stacklevel(),
                )
        info.setdefault("curvature_data", "minibatch")
        return self._stacked(stream, draws), False

    # ------------------------------------------------------------------ snapshots
    def _snapshot(self) -> tuple[torch.Tensor, dict | None, dict[str, torch.Tensor]]:
        """Parameters, sampler state and buffers (a forward pass in training mode may update buffers, e.g. a step
        counter the model keeps: the request's own evaluations must not)."""
        theta = ParamSpec.flatten_module(self.model)
        opt = copy.deepcopy(self.sampler.state_dict()) if self.sampler is not None else None
        if opt is not None:
            # a sampler's own noise generator: in the library's SGLD/SGHMC state_dict since stop 46, not in other
            # samplers' (a user's optimizer with a generator attribute)
            opt = {"state_dict": opt, "generator": _sampler_generator_state(self.sampler)}
        buffers = {
            k: b.detach().clone()
            for k, b in self.model.named_buffers(remove_duplicate=False)
            if b.layout == torch.strided
        }
        return theta, opt, buffers

    def _restore(self, snap: tuple[torch.Tensor, dict | None, dict[str, torch.Tensor]]) -> None:
        _own_parameters(self.model, self._caller_storages)
        ParamSpec.assign(self.model, snap[0])
        if snap[1] is not None:
            self.sampler.load_state_dict(snap[1]["state_dict"])
            _set_sampler_generator_state(self.sampler, snap[1]["generator"])
        with torch.no_grad():
            for k, b in self.model.named_buffers(remove_duplicate=False):
                old = snap[2].get(k)
                if old is None or b.layout != torch.strided or old.layout != torch.strided or b.shape != old.shape:
                    continue  # sparse buffers (a graph's adjacency) are not updated in place by a forward pass
                if not torch.equal(b, old):
                    b.copy_(old)

    # ------------------------------------------------------------------ the request
    def _check_model_unchanged(self, call: str) -> None:
        """Refuse a request or ``fit()`` on a model whose trainable parameters were converted to another dtype
        (``model.double()``), moved to another device (``model.to("meta")``) or changed in which are trainable
        (``requires_grad_(False)``) or their shapes since the unlearner was built: its bank, curvature and state are
        in the parameters' old dtype, device and layout, and the request crashed with torch's "mat1 and mat2 must
        have the same dtype", "split_with_sizes expects split_sizes to sum exactly to ..." (stop 63's flows probe) or
        "Tensor on device meta is not on the expected device cpu!".

        Raises:
            InvalidRequestError: naming what changed and the way back; nothing is changed.
        """
        spec = ParamSpec.of(self.model)
        fix = (
            "; nothing was changed. Put the model back as it was, or build a new unlearner for the model as it is "
            "now, with its samples in that form (e.g. from unlearner.samples())"
        )
        if spec != self.spec:
            was, now = dict(zip(self.spec.names, self.spec.shapes)), dict(zip(spec.names, spec.shapes))
            parts = []
            if was.keys() - now.keys():
                gone = sorted(was.keys() - now.keys())
                parts.append(f"no longer trainable or gone: {', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''}")
            if now.keys() - was.keys():
                new = sorted(now.keys() - was.keys())
                parts.append(f"trainable since: {', '.join(new[:5])}{' ...' if len(new) > 5 else ''}")
            shaped = [f"{n} {tuple(was[n])} -> {tuple(now[n])}" for n in was.keys() & now.keys() if was[n] != now[n]]
            if shaped:
                parts.append(f"other shapes: {', '.join(sorted(shaped)[:5])}")
            if not parts:
                parts.append("the same parameters in another order")
            raise InvalidRequestError(
                f"{call}: the model's trainable parameters changed since the unlearner was built ({'; '.join(parts)}): "
                "its samples, curvature and state hold the parameters it was built with (requires_grad_(True) "
                f"puts a frozen one back){fix}"
            )
        params = ParamSpec.params(self.model)
        was_dtype = self._param_dtype
        # every parameter: one layer converted (model[2].double()) failed inside nll, blaming the removed rows
        other = [(n, p.dtype) for n, p in zip(self.spec.names, params) if p.dtype != was_dtype]
        if other:
            back = {torch.float32: "model.float()", torch.float64: "model.double()"}.get(
                was_dtype, f"model.to({was_dtype})"
            )
            now = sorted({str(d)[6:] for _, d in other})
            names = ", ".join(n for n, _ in other[:5]) + (" ..." if len(other) > 5 else "")
            part = "" if len(other) == len(params) else f" ({names})"
            raise InvalidRequestError(
                f"{call}: the model's parameters are {'/'.join(now)}{part}, but the unlearner was built on a "
                f"{str(was_dtype)[6:]} model and holds its samples and state in {str(was_dtype)[6:]}: the model was "
                f"converted since ({back} converts it back, and the rows with it){fix}"
            )
        # a model moved to another device (model.to("meta"), .cuda()) was used as it is: the bank and state stayed on
        # the old device, and the request failed inside torch or ran on parameters without values
        moved = [(n, p.device, d) for n, p, d in zip(self.spec.names, params, self._param_devices) if p.device != d]
        if moved:
            was = sorted({str(d) for _, _, d in moved})
            now = sorted({str(p) for _, p, _ in moved})
            names = ", ".join(n for n, _, _ in moved[:5]) + (" ..." if len(moved) > 5 else "")
            part = "" if len(moved) == len(params) else f" ({names})"
            built = sorted({str(d) for d in self._param_devices})
            if len(built) == 1:
                back = f"model.to('{built[0]}') moves it back"
            else:  # model.to(one device) would move the parameters that stayed where they were too
                pairs = ", ".join(f"{n} to {d}" for n, _, d in moved[:5]) + (" ..." if len(moved) > 5 else "")
                back = (
                    f"its parameters were on {'/'.join(built)}: move each back to its own device, {pairs}; "
                    "model.to() puts every one on one device"
                )
            raise InvalidRequestError(
                f"{call}: the model's parameters are on {'/'.join(now)}{part}, but the unlearner was built with them "
                f"on {'/'.join(was)} and holds its samples and state there: the model was moved since ({back}){fix}"
            )

    def propose(self, batch: Batch | torch.Tensor, remaining: Any, n_remaining: int | None = None) -> Proposal:
        """Compute the removal of ``batch`` without changing anything; :meth:`apply` commits it (see
        :meth:`_propose_unguarded` for the arguments). torch's global generator, too, is as it was when this returns
        or raises: a ``DataLoader`` draws its iterator's seed from it, and chain-mode draws of a sampler without a
        generator of its own draw their noise from it; :meth:`apply` sets the state the computation left. So are the
        remaining data's own generators and a ``DistributedSampler``'s epoch (advanced on each pass)."""
        _refuse_inference_mode()
        _check_mode_at_call(self.model, "propose()")
        self._check_model_unchanged("propose()")
        _own_parameters(self.model, self._caller_storages)  # the curvature's build writes draws into the model
        # torch's vmap fallback warnings ("performance drop ... batching rule for aten::mish_backward", 12 a request)
        # are the library's business: kept from the caller, the operations recorded once in the report
        with _source_states_kept(remaining) as (gens, epoch_samps), quiet_vmap_fallbacks() as slow_ops:
            prop = self._propose_unguarded(batch, remaining, n_remaining)
            prop._global_rng_after = torch.get_rng_state()
            prop._source_generators_after = [(g, g.get_state()) for g in gens]
            prop._source_epochs_after = [(s, s.epoch) for s in epoch_samps]
        self._note_vmap_fallbacks(slow_ops, prop.report.info)
        return prop

    def _note_vmap_fallbacks(self, ops: set[str], info: dict[str, Any]) -> None:
        """Record the operations torch's ``vmap`` ran without a batching rule (:func:`quiet_vmap_fallbacks`) in
        ``info["vmap_fallbacks"]`` the first time they are seen (logged at DEBUG every time)."""
        if not ops:
            return
        log.debug("vmap ran without a batching rule (one draw at a time): %s", ", ".join(sorted(ops)))
        new = sorted(ops - self._vmap_fallbacks_seen)
        if new:
            self._vmap_fallbacks_seen |= ops
            info["vmap_fallbacks"] = new

    def _removed_before(self, batch: Batch) -> tuple[list[bytes], str | None]:
        """A digest of each row of ``batch``, and what to say where some equal rows an applied request removed.

        A row sent again (a retried or resent deletion list) had its influence removed once already: removing it
        again moved the samples past retraining with every check passed (stop 61: 20 of a second request's 40
        digits rows repeated, their NLL 0.125 → 0.269 against retraining's 0.153). A row's digest is a BLAKE2b hash
        of its bytes (−0.0 as 0.0), dtype and shape in every field; only digests are kept (in memory and in
        :meth:`curvature_state`), never the rows. Rows equal within one request are warned about elsewhere. Not
        looked for under torch.distributed (nor computed: none are kept), where each rank holds its own rows and a
        refusal on one rank alone would leave the others waiting, nor in :meth:`forget`, whose data set refuses an id
        removed before: a row of another id equal to one removed is another data point with the same values (it was
        refused, telling the caller to leave it out; its digests are kept for later requests).
        """
        if self._reduce is not None:  # never compared: not computed (6,000 rows of 784 floats: 0.06 s a request)
            return [], None
        b = int(batch[0].shape[0])
        digests = _row_digests(batch)
        seen = self._removed_digests
        by_id = self._forget_request is not None  # forget(ids, data): the ids were checked, not the values
        looked = seen and not by_id
        again = [i for i, d in enumerate(digests) if d in seen] if looked else []
        if not again:
            return digests, None
        shown = ", ".join(str(i) for i in again[:8]) + (", ..." if len(again) > 8 else "")
        return digests, (
            f"{len(again)} of the {b} rows of this request (positions {shown}) are identical to rows an earlier "
            "request removed: removing a row again removes its influence twice and moves the samples past "
            "retraining. Leave the rows already removed out of the request; if they are other data points with the "
            "same values, remove them with strict=False"
        )

    def _propose_unguarded(
        self, batch: Batch | torch.Tensor, remaining: Any, n_remaining: int | None = None
    ) -> Proposal:
        """Compute the removal of ``batch`` without changing anything; :meth:`apply` commits it.

        Model, sampler state, bank, cached curvature, damping state, the unlearner's generator and the state of
        ``remaining`` (if it has ``state_dict``) are all as they were when this returns or raises.

        Args:
            batch: The removed points, a tuple of tensors like the minibatches.
            remaining: The remaining data (after removal): a :class:`~mcmc_unlearner.data.RemovableDataset`, any
                iterator of minibatches, a re-iterable such as a ``DataLoader``, or the rows themselves as a tuple of
                tensors ``(x, y)`` of different shapes, or ``(x,)`` for data without labels (read in shuffled
                minibatches of 128, seed 0; two or more tensors of one shape are read as one-field minibatches).
            n_remaining: Size of the remaining set (read from ``remaining`` when it can be).

        Raises:
            InvalidRequestError: empty request, non-finite data, nothing would remain.
            SolverDivergedError, MemoryError: the computation could not be done (nothing changed).
        """
        t0 = time.perf_counter()
        self._request_cpu = _cpu_seconds()  # the further Newton steps' cost cap reads it
        self._planned = {}
        self._probed = None  # the likelihood's probe, read once a request (_likelihood_probe)
        batch = _as_batch(batch, "the removed data")
        if batch[0].shape[0] == 0:
            raise InvalidRequestError("deletion request is empty: pass at least one removed point")
        check_finite_batch(batch)
        digests, again = self._removed_before(batch)
        # the remaining data's form before any forward pass: a tuple (x, y) of one shape was refused 3.3 s and
        # 623 MiB into a request on a 16.8M-parameter Linear, after the removed rows' checks
        stream = self._stream(remaining, n_remaining)
        if again and self._refuse_again:  # after the data's form (its errors name the call), before any work
            raise InvalidRequestError(f"the removal was refused, nothing was changed: {again}")
        self._check_nll(batch)
        self._check_forward(batch)
        held, self._held_first = self._held_first, None
        if held is not None and held[0] is remaining and stream.plain_iterator:
            stream.put_back(*held[1])  # fit() read it from this iterator to probe, and built nothing (auto took CG)
        # a refusal from here on leaves the minibatches read ahead of their use to the next request reading a plain
        # iterator (_unread_kept), those an earlier refusal left, put back above, among them: a refusal before this
        # request's own reading (a large removal's warning raised as an error) took them from the caller
        with self._unread_kept(stream):
            return self._propose_read(batch, stream, t0, digests, again)

    def _propose_read(
        self, batch: Batch, stream: _Stream, t0: float, digests: list[bytes], again: str | None
    ) -> Proposal:
        """:meth:`_propose_unguarded` once the remaining data are a stream and the removed rows are checked."""
        self._check_remaining_labels(batch, stream)
        if (
            self._dense_probe is not None
            and self.solver in _DENSE
            and not self._remaining_nll_checked
            and stream.peek_keeps_state
        ):
            # a remaining source nll cannot read (float16 rows for a float32 model) was refused only after the
            # dense cost's probe below, whose first torch.func transform imports torch's compiler stack: 1.2 s CPU
            # instead of 0.03 s in a fresh process (stop 62's probe); the minibatch is left to be read again. Not
            # for a loader with a state, which the peek moves on before the request's snapshot of it: a refusal
            # and a discarded proposal left it a minibatch late (stop 62's review; checked below, after the snapshot)
            self._check_nll(tuple(t[:FIT_DATA_ROWS] for t in stream.peek()), role="remaining")
        if self._once_differentiable_op is None:  # else refused below, after the mixed-rows test, before any work
            # (stop 60's probe: a Hardsigmoid gate was refused only after the dense cost's vmapped probe, whose first
            # torch.func transform imports torch's compiler stack: 1.8 s instead of 0.03 s)
            self._weigh_dense_build(batch, stream)  # (solver='auto' took a dense solver: its build's cost, once)
            self._take_cg_if_read_outside(batch)  # before the backend's snapshot: a discarded proposal keeps CG whole
        managed = not stream.from_rows and (
            hasattr(stream.source, "remaining_ids") or hasattr(stream.source, "remaining")
        )
        repeated = 0 if managed else _repeated_rows(batch)  # forget(ids, ...): distinct ids, true duplicates
        if repeated:
            warnings.warn(
                f"the removed data holds {repeated} row(s) identical in every field to another removed row: each row "
                "is removed as often as it is given (its influence counted that many times). If the data set holds "
                "such a row once, pass it once",
                stacklevel=outside_stacklevel(),
            )
        n = stream.n
        if n <= 0:
            raise InvalidRequestError("no data would remain: the posterior would be the prior; retrain instead")
        k = self._removed_rows(batch)
        share = k / (n + k)
        if share > LARGE_REMOVAL:
            warnings.warn(
                f"this request removes {_percent(share)} of the data ({k:,} of {n + k:,} "
                "rows). The influence step is a local approximation around the old posterior: for removals this "
                "large it moves the samples only part of the way to retraining (a digits MLP, random rows: a tenth of "
                "the way with half the data removed, a fiftieth with nine tenths) while passing every check, since "
                "the step does not harm the remaining data. Retrain on the remaining data, or continue the chain on "
                "it after this request (your own sampler, or the library's SGLD/SGHMC with run_chain, for at least "
                "a burn-in's worth of steps; the deletion service's on_failure='repair' does this only for a "
                "request that fails its checks)",
                stacklevel=outside_stacklevel(),
            )
        start = self._rows_at_samples or n + k
        gone = 1.0 - n / start  # of the rows the samples were drawn on, once this request is applied
        if gone > CUMULATIVE_REMOVAL and not self._cumulative_warned and share <= LARGE_REMOVAL:
            warnings.warn(
                f"after this request {_percent(gone)} of the rows the samples were drawn on will have been "
                f"removed ({start - n:,} of {start:,}, counted from the first request since the bank was set, rows "
                "removed outside requests included). Every request moves the "
                "samples by a step linearised around them, and these samples were drawn for data that is now mostly "
                "gone: over a long sequence the moves add up to less or more than retraining would do (a digits MLP, "
                "300 requests removing 90% of its rows: 1.4 times retraining's move, the remaining rows fitted worse "
                "than retraining fits them) while every request passes its checks. Continue the chain on the "
                "remaining data and set its samples as the new bank (unlearner.bank = ..., which restarts this "
                "count), or retrain",
                stacklevel=outside_stacklevel(),
            )
        expectation = self.expectation or (Expectation.BANK if self.bank is not None else Expectation.CHAIN)
        if expectation is Expectation.BANK and self.bank is None:
            raise ValueError("expectation='bank' needs a sample bank: call collect() while sampling or pass bank=")
        snap = self._snapshot()
        backend_snap = self.curvature.snapshot()
        control_state = self.control.state()
        gen = self.generator.get_state()
        data_state = stream.state()
        # chain mode with a sampler drawing its noise from torch's global generator (no generator= of its own): the
        # draws advance it, so a discarded proposal must put it back (apply() sets the post-draw state)
        global_rng = (
            torch.get_rng_state() if expectation is Expectation.CHAIN and _uses_global_rng(self.sampler) else None
        )
        try:
            if not self._remaining_nll_checked:
                # before the removed rows' gradient: a process's first torch.func transform imports torch's compiler
                # stack (1-3 s), and a remaining-data source nll cannot read was refused only after it (stop 45).
                # The minibatch is read again by the request (peek leaves it to be read)
                self._check_nll(tuple(t[:FIT_DATA_ROWS] for t in stream.peek()), role="remaining")
            if not self._mixed_checked:
                self._check_mixed_rows(stream.peek())  # the removed rows in a remaining minibatch's company
            if self._once_differentiable_op is not None:  # found by _check_forward
                raise _second_derivative_refusal(self._once_differentiable_op)
            try:
                with dense_embedding_grads(self.model):
                    prop = self._propose(batch, stream, n, expectation, k)
            except IndexError as exc:
                label = _label_out_of_bounds(exc)
                if label is None:
                    raise
                # a label out of range past the first request's checked rows (an iterator, whose labels cannot be
                # read before the work): torch said only "Target 9 is out of bounds." from inside the curvature
                where = (
                    "in a remaining minibatch this request read: its labels cannot be read before the work, and the "
                    "first request checks only its first minibatch's first rows"
                )
                raise IndexError(self._label_refusal(label, where, batch)) from exc
            except (NotImplementedError, RuntimeError) as exc:
                what = _not_differentiable_op(exc)
                if what is None:
                    raise
                # an operation torch differentiates once but not twice (or not in forward mode), used functionally
                # where construction cannot see it (F.embedding_bag on a trainable weight): torch's own words named
                # neither the cause nor a way out (the first request's forward check catches double backward)
                raise _second_derivative_refusal(what) from exc
            prop.report.info["removed_share"] = share
            prop.report.info["memory"] = self._memory_info()
            prop.report.info["removed_since_samples"] = gone
            prop._rows_at_samples = start
            prop._cumulative_warned = self._cumulative_warned or gone > CUMULATIVE_REMOVAL
            prop._backend_state = self.curvature.snapshot()
            # a damping searched on the check's noise alone (see _unresolved) is not carried to the next request
            prop._control_state = self.control.state()
            if "unresolved" in prop.report.info:  # the damping is not carried; the step's NLL rise is summed
                prop._control_state = {**control_state, "drift": prop._control_state.get("drift")}
            prop._generator_state = self.generator.get_state()
            prop._data, prop._data_state = stream, stream.state()
        finally:
            self._asked, self._asked_chain = None, False
            self._restore(snap)
            self.curvature.restore(backend_snap)
            self.control.set_state(control_state)
            self.generator.set_state(gen)
            stream.set_state(data_state)
            if global_rng is not None:
                torch.set_rng_state(global_rng)
        prop._owner, prop._version = self, self._version
        prop._row_digests = digests
        if again:  # listed, so that remove(strict=False) and apply() are the caller's decision
            prop.report.problems.append(again)
        # what apply() overwrites beyond the unlearner's own state: the live parameters (a sampler step or a
        # load_state_dict in between would be undone) and the data set's state (rows removed in between revived)
        prop._live_before, prop._data_before = snap[0], data_state
        prop._lr_scale = (n + batch[0].shape[0]) / n
        prop.report.seconds = time.perf_counter() - t0
        log.info(
            "request computed in %.2f s: shift %.4g, %s",
            prop.report.seconds, prop.report.shift_norm,
            "every check passed" if not prop.report.problems else "problems: " + "; ".join(prop.report.problems),
        )  # fmt: skip
        return prop

    def apply(self, proposal: Proposal) -> RemovalReport:
        """Commit a :meth:`propose`-d removal (even one whose report lists problems: the caller decided).

        Raises:
            ValueError: the proposal belongs to another unlearner or the unlearner changed since it was made.
            InvalidRequestError: the model was converted, moved or changed in its trainable parameters since the
                unlearner was built (as :meth:`propose` refuses it); nothing is changed.
        """
        if not isinstance(proposal, Proposal):
            raise TypeError(f"apply() takes the Proposal that propose() returned, got {type(proposal).__name__}")
        if proposal._owner is not self or proposal._version != self._version:
            raise ValueError("stale proposal: it was made by another unlearner or before a later change; propose again")
        # a model moved since propose() failed in torch.equal below (meta tensors), and one converted was committed
        self._check_model_unchanged("apply()")
        before = getattr(proposal, "_live_before", None)
        if before is not None and not torch.equal(ParamSpec.flatten_module(self.model), before):
            raise ValueError(
                "stale proposal: the model's parameters changed since propose() (sampler steps or a load_state_dict), "
                "and applying it would put them back; propose again"
            )
        if proposal._data is not None and not _same_state(
            proposal._data.state(), getattr(proposal, "_data_before", None)
        ):
            raise ValueError(
                "stale proposal: the remaining data changed since propose() (rows removed, or minibatches drawn), and "
                "applying it would restore its earlier state; propose again"
            )
        _check_sampler(
            self.sampler, self.rescale_lr, self.model
        )  # before anything changes: scale_lr below must not fail
        t0 = time.perf_counter()
        _own_parameters(self.model, self._caller_storages)
        ParamSpec.assign(self.model, proposal.live)
        after = getattr(proposal, "_global_rng_after", None)
        if after is not None:
            torch.set_rng_state(after)
        for g, state in getattr(proposal, "_source_generators_after", ()):
            g.set_state(state)
        for s, epoch in getattr(proposal, "_source_epochs_after", ()):
            s.set_epoch(epoch)
        if proposal._sampler_state is not None and self.sampler is not None:
            self.sampler.load_state_dict(proposal._sampler_state["state_dict"])
            _set_sampler_generator_state(self.sampler, proposal._sampler_state["generator"])
            if proposal._sampler_state.get("global_rng") is not None:
                torch.set_rng_state(proposal._sampler_state["global_rng"])
        self._fitted, self._fit_data = False, None
        if proposal.bank is not None:
            self._set_bank(proposal.bank, fresh=False)
        self.curvature.restore(proposal._backend_state)
        self.curvature.commit()
        self.control.set_state(proposal._control_state)
        self._carry = proposal._carry
        self._anchor = proposal._anchor
        self._rows_at_samples = proposal._rows_at_samples
        self._cumulative_warned = proposal._cumulative_warned
        self._state_loaded = False
        self.generator.set_state(proposal._generator_state)
        if proposal._data is not None:
            proposal._data.set_state(proposal._data_state)
        if self.rescale_lr and self.sampler is not None:
            scale_lr(self.sampler, proposal._lr_scale)
        proposal.report.seconds += time.perf_counter() - t0
        self.history.append(proposal.report)
        self._removed_digests.update(getattr(proposal, "_row_digests", ()))
        self._g_round += 1  # the next request's G at other draws (_turned)
        self._version += 1
        return proposal.report

    def remove(
        self, batch: Batch | torch.Tensor, remaining: Any, n_remaining: int | None = None, *, strict: bool = True
    ) -> RemovalReport:
        """Forget ``batch`` given the *remaining* data: :meth:`propose`, check, :meth:`apply`.

        Args:
            batch: The removed points, a tuple of tensors like the minibatches.
            remaining: The remaining data (see :meth:`propose`).
            n_remaining: Size of the remaining set (read from ``remaining`` when it can be).
            strict: Refuse a removal that fails a check (:func:`quality_problems`); ``False`` applies it anyway
                (its report still lists the problems).

        Returns:
            A :class:`RemovalReport`.

        Raises:
            QualityError: the removal failed a check (``strict``); nothing was changed.
            InvalidRequestError, SolverDivergedError: see :meth:`propose`; nothing was changed.
        """
        strict = _flag("strict", strict)  # strict="no" was truthy
        self._refuse_again = strict  # a row removed before: refused before any work (_propose_unguarded)
        try:
            prop = self.propose(batch, remaining, n_remaining)
        finally:
            self._refuse_again = False
        if strict and prop.report.problems:
            raise QualityError(
                "the removal was refused, nothing was changed: " + "; ".join(prop.report.problems), prop.report
            )
        return self.apply(prop)

    @_vmap_fallbacks_noted
    def fit(self, remaining: Any, n_remaining: int | None = None) -> FitReport:
        """Build the curvature ahead of the first deletion request, as ``laplace-torch``'s ``fit`` does, so that the
        request does not pay for it.

        Where the curvature depends on the samples and the remaining data alone (K-FAC, the default on networks),
        it is built at the bank's draws on minibatches of ``remaining`` exactly as a request builds it, and kept: the
        next request uses it as if it had built it itself (every damping shape tried, its damping searched as after
        its own build: from scratch before any request, from the damping carried from earlier requests after them),
        and it counts as that request's build for ``refresh_every``; later ones reuse it as they reuse a request's
        build (``refresh_every``, ``drift_tol``). Two things undo the fit, so that the request builds its own
        curvature: a bank replaced after it (``bank=``, :meth:`collect`), and a request whose remaining rows'
        mean NLL at ``FIT_DATA_DRAWS`` stored samples is clearly not that of the rows fit read (by more than
        ``FIT_DATA_REL`` of it and ``FIT_DATA_Z`` standard errors: other data, e.g. other preprocessing;
        ``report.info["curvature_rebuilt_after_fit"]`` says so). Either, kept, moved the samples a twelfth of the
        way of the request's own build, every check passed. On a
        1.2M-parameter ResNet the first request then costs 0.97 SGLD epochs over 10k rows instead of 1.33, after a
        fit of 0.58 (``benchmarks/request_sequence.py --fit``). Built on the data before the removal, the curvature
        holds the removed rows' own curvature, as one reused across requests does: on a transformer's backdoor
        removal that damped the trigger token's directions (0.005 of the way to retraining instead of 1.05;
        ``docs/model-matrix.md``, stop 42). The dense and matrix-free backends build theirs inside the first
        request and keep it (the dense Hessian downdated by later requests' removed rows): ``fit`` builds nothing
        for them (the report says ``curvature_kept=False``), but checks ``remaining`` and ``n_remaining`` as it does for
        K-FAC. The damping is not
        carried: a damping found on rows of another kind (a probe of random rows) was too large for a whole class
        or a backdoor, and left those removals a hundredth of their way (``docs/model-matrix.md``, stop 42).

        Where ``solver="auto"`` took K-FAC, fit first runs its probe (:meth:`_take_cg_if_read_outside`) on the
        first minibatch it reads and builds nothing where that takes CG; from a plain iterator that minibatch is
        read once: the build's first, or (CG) the first the next request reads if it reads that iterator (a
        request on another source drops it).

        Samples, live parameters, the remaining data's state and every generator are as they were (a plain iterator
        of minibatches is read from, as a request reads it). Needs a bank (``bank=`` or :meth:`collect`); under
        ``torch.distributed`` every rank calls it, as it calls :meth:`remove`.

        Args:
            remaining: The remaining data, as :meth:`propose` takes it (before a request: all of the training data).
            n_remaining: Size of the remaining set (read from ``remaining`` when it can be).

        Returns:
            A :class:`FitReport`.

        Raises:
            ValueError: no bank; data that ``nll`` cannot read (nothing was changed).
            IndexError: a remaining row's class label the model's output has no class for, the row named where the
                labels are read without a pass (nothing was changed).
            MemoryError: the curvature does not fit the memory budget (nothing was changed).
            RuntimeError: called inside ``torch.inference_mode()``.

        On any of these the minibatches ``fit`` read from a plain iterator are consumed (unlike a refused request,
        which leaves its read-ahead to the next one): pass a ``DataLoader`` or the rows to lose none.
        """
        t0 = time.perf_counter()
        _refuse_inference_mode()
        _check_mode_at_call(self.model, "fit()")
        self._check_model_unchanged("fit()")
        _own_parameters(self.model, self._caller_storages)  # the curvature's build writes draws into the model
        if self.bank is None:
            raise ValueError("fit() builds the curvature at the bank's samples: pass bank= or collect() samples first")
        info: dict[str, Any] = {}
        probe_first = False  # a plain iterator: probed on the first minibatch the build reads (read once)
        if self._dense_probe is not None:  # solver='auto' took a dense solver: its build's cost, before it is built
            with _source_states_kept(remaining):
                stream = self._stream(remaining, n_remaining)
                # a plain iterator: a minibatch read to weigh it would be lost, and the dense solver builds nothing
                # here: the first request weighs it on its removed rows (before: never, the dense pick kept)
                if not stream.plain_iterator:
                    data_state = stream.state()
                    try:
                        self._weigh_dense_build(stream.peek(), stream)
                    finally:
                        stream.set_state(data_state)
        if self._auto_probe is not None:  # before K-FAC is built: CG's, built inside the request, is not kept
            with _source_states_kept(remaining):
                stream = self._stream(remaining, n_remaining)
                if stream.plain_iterator:
                    probe_first = self._may_switch_to_cg()
                else:
                    data_state = stream.state()
                    try:
                        self._take_cg_if_read_outside(stream.peek())
                    finally:
                        stream.set_state(data_state)
        kept = bool(self.curvature.removed_free) and self.expectation is not Expectation.CHAIN
        if kept:
            gen = self.generator.get_state()
            with _source_states_kept(remaining):
                stream = self._stream(remaining, n_remaining)
                data_state = stream.state()
                if probe_first:  # held by the stream (peek): the build's first minibatch, or the next request's
                    first = stream.peek()
                    try:
                        self._take_cg_if_read_outside(first)
                    except BaseException:  # (the switch's warning raised as an error): nothing built, none lost
                        self._held_first = (remaining, [first])
                        raise
                    kept = self.solver is SolverName.KFAC
                    if not kept:  # read once from the caller's iterator: the next request that reads it takes it
                        self._held_first = (remaining, [first])
                if kept:
                    backend = self.curvature.snapshot()  # a curvature cached by earlier requests, put back on failure
                    try:
                        n = stream.n
                        e_f = self._energy_f(n)
                        first = next(stream)  # for the checks and the memory plan; read again below where it can be
                        read = [first]  # and FIT_DATA_ROWS rows for what the request after fit compares (_data_nll)
                        # (at most the data's n rows: a small data set was read over and over, its rows counted 8 times)
                        while sum(int(b[0].shape[0]) for b in read) < min(FIT_DATA_ROWS, n) and len(read) < 8:
                            read.append(next(stream))
                        stream.set_state(data_state)
                        self._check_nll(first, role="remaining", again=True)
                        # a class label nll cannot read, refused before the build as a request refuses it, the row
                        # named (stop 62's notes: torch's bare "Target 9 is out of bounds." from inside the build)
                        self._check_remaining_labels(first, stream)
                        self._bytes_per_row(e_f, ParamSpec.flatten_module(self.model), first)
                        c_thetas = _draws(self.bank, self.curvature_draws)
                        with dense_embedding_grads(self.model):
                            problem = self._problem(stream, n, first, c_thetas, e_f, self._h_f(), info)
                            c_thetas = problem.thetas  # fewer where every row is read at fewer draws
                            self.curvature.reset()
                            info.update(self.curvature.prepare(problem))
                        fit_data = self._data_nll(read)
                    except BaseException as exc:
                        self.curvature.restore(backend)
                        label = _label_out_of_bounds(exc)
                        if label is None:
                            raise
                        # (a source whose labels cannot be read before the build: an iterator)
                        where = "in a remaining minibatch fit() read: its labels cannot be read before the build"
                        raise IndexError(self._label_refusal(label, where, first)) from exc
                    finally:  # the remaining data and the unlearner's generator as they were (the rest: the with)
                        stream.set_state(data_state)
                        self.generator.set_state(gen)
            if kept:
                self.curvature.commit_ahead()  # the next request is its first use, as of a request's own build
                self._fitted = True  # the next request takes it as its own build (every shape, a fresh search)
                self._fit_data = fit_data
                self._version += 1  # an earlier proposal would put back the curvature it saw
                _log_curvature(self.solver.value, info, c_thetas.shape[0], time.perf_counter() - t0)
        if not kept:
            self._check_fit_data(remaining, n_remaining)
            why = (
                "its curvature is drawn at the chain's own states during each request"
                if self.expectation is Expectation.CHAIN
                else "fit() builds K-FAC's curvature only (solver='kfac', the default on networks); this backend "
                "builds its own inside the first request and keeps it for the next"
            )
            info["fit"] = f"nothing to build ahead for solver={self.solver.value}: {why}"
        return FitReport(seconds=time.perf_counter() - t0, solver=self.solver.value, curvature_kept=kept, info=info)

    def _check_fit_data(self, remaining: Any, n_remaining: int | None) -> None:
        """:meth:`fit`'s checks of its arguments where it builds nothing: the remaining data and its size as a
        request reads them, and ``nll`` on a first minibatch where it can be read and put back (not from a plain
        iterator, whose minibatch would be lost to the next request). Every state is left as it was."""
        with _source_states_kept(remaining):
            stream = self._stream(remaining, n_remaining)
            if stream.plain_iterator:
                return  # a plain iterator: its first minibatch is checked by the request that reads it
            data_state = stream.state()
            try:
                self._check_nll(tuple(t[:FIT_DATA_ROWS] for t in stream.peek()), role="remaining", again=True)
            finally:
                stream.set_state(data_state)

    def forget(self, ids: Sequence[int] | torch.Tensor, data: Any, *, strict: bool = True) -> RemovalReport:
        """Validate ids against a :class:`~mcmc_unlearner.data.RemovableDataset`, unlearn them, then remove.

        The data set's state (mask and shuffling) is restored if unlearning fails, so a refused request leaves
        model, bank and data exactly as they were.

        Raises:
            TypeError: ``data`` is not a data set that removes rows by id (a ``DataLoader``, a tuple of tensors, a
                ``TensorDataset``): wrap the tensors in a ``RemovableDataset``, or pass the rows to :meth:`remove`.
        """
        missing = [m for m in ("validate", "get", "remove", "state_dict", "load_state_dict") if not hasattr(data, m)]
        if missing:
            raise TypeError(
                f"forget(ids, data) needs a RemovableDataset, which removes rows by id and restores itself when a "
                f"request is refused; got a {type(data).__name__} (it has no {', '.join(missing)}): wrap your tensors, "
                "data = RemovableDataset(x, y, batch_size=64) (RemovableDataset(x, batch_size=64) for data without "
                "labels), or pass the rows themselves, unlearner.remove((x[ids], y[ids]), remaining)"
            )
        self._check_model_unchanged("forget()")  # before the rows are read and removed from ``data``
        ids = data.validate(ids)
        batch = data.get(ids)
        check_finite_batch(_as_batch(batch, "the removed data"), "removed data", ids=ids)  # named by id, not position
        state = data.state_dict()
        data.remove(ids)
        self._forget_request = (data, ids)  # the emptied-label check also reads earlier requests' rows of the label
        try:
            return self.remove(batch, data, len(data), strict=strict)
        except BaseException:
            data.load_state_dict(state)
            raise
        finally:
            self._forget_request = None

    #: whether the request being proposed refuses rows removed before (``remove(strict=True)``) or lists them.
    _refuse_again = False

    #: ``(data, ids)`` while :meth:`forget` runs its request (:meth:`_earlier_removed`).
    _forget_request: tuple[Any, torch.Tensor] | None = None

    def _earlier_removed(self, stream: _Stream, labels: list[int]) -> dict[int, Batch]:
        """Per label of ``labels``, the rows that earlier requests removed from the ``RemovableDataset`` this
        :meth:`forget` request reads (at most ``EMPTIED_LABEL_EARLIER_ROWS``, evenly spaced by id); empty outside
        :meth:`forget` (rows given by :meth:`remove` carry no ids) and under ``torch.distributed``."""
        held = self._forget_request
        if held is None or held[0] is not stream.source or self._reduce is not None:
            return {}
        data, ids = held
        tensors = getattr(data, "tensors", None)
        gone = getattr(data, "removed_ids", None)
        if not isinstance(tensors, tuple) or len(tensors) < 2 or not isinstance(gone, torch.Tensor):
            return {}
        gone = gone[~torch.isin(gone, torch.as_tensor(ids, dtype=gone.dtype))]
        y = tensors[1][gone]
        out = {}
        for c in labels:
            pick = gone[y == c]
            if pick.numel():
                pick = pick[_evenly(pick.numel(), EMPTIED_LABEL_EARLIER_ROWS)]
                out[c] = self._raw(tuple(t[pick] for t in tensors))
        return out

    @contextlib.contextmanager
    def _unread_kept(self, stream: _Stream) -> Iterator[None]:
        """On a refusal (any exception) from inside the block, keep the minibatches a plain iterator gave ahead of
        their use (:meth:`~mcmc_unlearner.stream._Stream.unread`) for the next request reading that iterator, which
        reads them first: a refusal saying "nothing was changed" took them from the caller (a non-finite G's 24
        minibatches, stop 62's review; K-FAC's memory refusal in its build, after the curvature's minibatches were
        used: 20 of the 20 read ahead, stop 62's notes)."""
        try:
            yield
        except BaseException:
            if stream.plain_iterator:
                self._held_first = (stream.source, stream.unread())
            raise
        stream.used()  # (returned: the proposal holds the stream, not the minibatches it used)

    def _stream(self, remaining: Any, n_remaining: int | None) -> _Stream:
        """The remaining data as a request reads them (:class:`~mcmc_unlearner.stream._Stream`): a list of minibatches
        joined into its rows within ``memory_budget``, those rows kept for the next request while the list is
        unchanged."""
        return _Stream(
            remaining, n_remaining, rows_as_data=self._reduce is None, budget=self.memory_budget, joined=self._joined
        )

    def _propose(self, batch: Batch, stream: _Stream, n: int, expectation: Expectation, k: int) -> Proposal:
        t0 = time.perf_counter()
        h_f = self._h_f()
        e_f = self._energy_f(n)
        live = ParamSpec.flatten_module(self.model)
        self._bytes_per_row(e_f, live, batch)
        self._asked = (stream, n, batch)  # what a memory refusal's suggested solvers are planned for
        self._asked_chain = expectation is Expectation.CHAIN
        # before anything runs, the needs known now; the largest is named, and its figure covers the others
        floor = self._request_floor()
        product, rows, how = 0, None, ""
        if self.solver in _MATRIX_FREE:
            # one draw's product over the rows the curvature will read (_operator_plan checks the rows read);
            # agreed across ranks, whose shares' saved bytes can differ
            need, rows, how = self._product_need(stream, n, int(batch[0].shape[0]))
            product = int(self._reduce_max(torch.tensor([float(need)], dtype=torch.float64))[0])
        shift = 0
        if self.bank_shift is BankShift.SAMPLE and self.bank is not None:
            # the per-sample shift's copies of the bank, in chunks of samples when they do not fit at once, but at
            # least the reserve and one sample's (no need when they fit at once: a larger budget fits them too)
            total, row = self.bank.shape[0] + 1, self.spec.dim * self.bank.element_size()
            if self._sample_shift_chunk() <= self.bank.shape[0]:
                shift = (SAMPLE_SHIFT_RESERVE * total + SAMPLE_SHIFT_COPIES) * row
        once = self._once_deferred or 0  # the first request's double-backward check, put off: not one row fitted
        forward = self._forward_deferred or 0  # its other checks of nll, put off likewise
        least = max(floor, product, shift, once, forward)
        if least > self.memory_budget and self.solver is SolverName.KFAC:
            # refused anyway: K-FAC's own build (KFACBackend.prepare checks it) named too, where it is the larger
            kfac = self._kfac_need(stream, n, batch, floor) or 0
            if kfac > least:
                raise MemoryError(
                    f"K-FAC needs about {format_bytes(kfac, up=True)} for one row at a time, over the memory budget "
                    f"of {format_bytes(self.memory_budget)}: raise memory_budget to at least "
                    f"{format_bytes(kfac, up=True)}{self._alternatives(SolverName.CG)}; nothing was changed"
                )
        if least > self.memory_budget and product == least:
            self._refuse_product(product, rows, how)
        if least > self.memory_budget and floor == least:  # no chunking fits one draw's derivatives on one row
            raise MemoryError(
                f"the request needs at least {format_bytes(floor, up=True)} ({REQUEST_D_COPIES} copies of the "
                f"{self.spec.dim:,} parameters and one row's derivatives, {format_bytes(self._call_cost(1))} saved "
                f"per call), over the memory budget of {format_bytes(self.memory_budget)}: raise memory_budget to at "
                f"least {format_bytes(floor, up=True)}; nothing was changed"
            )
        if least > self.memory_budget and once == least:
            raise MemoryError(
                f"the check that nll can be differentiated twice (one Hessian-vector product by double backward, "
                f"which every curvature backend and the safety check need; taken once, before the first request's "
                f"work) needs at least {format_bytes(once, up=True)} on one row ({_ONCE_D_COPIES} copies of the "
                f"{self.spec.dim:,} parameters and the row's second derivatives), over the memory budget of "
                f"{format_bytes(self.memory_budget)}: raise memory_budget to at least {format_bytes(once, up=True)}; "
                "nothing was changed"
            )
        if least > self.memory_budget and forward == least:
            raise MemoryError(
                f"the first request's checks of nll (its writes, its rows alone and together, its gradient at a stored "
                f"sample; taken once, before any work) need at least {format_bytes(forward, up=True)} on one row "
                f"({_FORWARD_D_COPIES} copies of the {self.spec.dim:,} parameters and the row's derivatives), over the "
                f"memory budget of {format_bytes(self.memory_budget)}: raise memory_budget to at least "
                f"{format_bytes(forward, up=True)}; nothing was changed"
            )
        if least > self.memory_budget:
            raise MemoryError(
                f"bank_shift='sample' needs at least {format_bytes(shift, up=True)} ({SAMPLE_SHIFT_RESERVE} copies of "
                f"the bank's {self.bank.shape[0]} samples of {self.spec.dim:,} parameters and one sample's solve), "
                f"over the memory budget of {format_bytes(self.memory_budget)}: raise memory_budget to at least "
                f"{format_bytes(shift, up=True)}, use bank_shift='mean', or keep fewer samples in the bank; "
                "nothing was changed"
            )
        if expectation is not Expectation.CHAIN and self._reduce is None and stream.plain_iterator:
            # the fewest minibatches the request reads (the curvature's, then the check's rows), read now and given
            # in order where it reads them: an iterator that runs out is refused before the work (stop 61: a
            # one-epoch generator after 1.5 s); after the memory refusals above, which read none of them (a
            # refusal before them took 22 minibatches from a plain iterator, and "nothing was changed"). A source
            # that lists its rows may give the curvature every one
            curvature = 0 if stream.listable else _draw_count(self.bank, self.curvature_draws)
            stream.read_ahead(curvature, self._check_row_count(n))
        sampler_state = None
        if expectation is Expectation.CHAIN:
            draws = self._chain_draws(stream, n, batch)
            live = draws[-1]
            g_thetas = c_thetas = k_thetas = draws
            sampler_state = {
                "state_dict": copy.deepcopy(self.sampler.state_dict()),
                "generator": _sampler_generator_state(self.sampler),
                "global_rng": torch.get_rng_state() if _uses_global_rng(self.sampler) else None,
            }
        else:
            # every draw: the bank itself, not a copy (each copy of a 64-draw bank of an 85k-parameter MLP is 22 MB);
            # G's draws looped over are read in place; the check's draws are others than the curvature's where the
            # bank has them (_held_out), the same ones only where the bank is every draw of both
            S, g_count = self.bank.shape[0], self._grad_draw_count(k)  # k: removed rows, over all ranks
            g_index = _turned(S, g_count, self._g_turn())
            if (
                g_count is not None
                and g_count < S
                and (
                    not self._vectorise(self.spec.dim)
                    or g_count * self.spec.dim * self.bank.element_size() > self.memory_budget // FURTHER_COPY_SHARE
                )
            ):
                # read in place, a chunk of draws copied at a time where vmap takes them (within the gradients'
                # plan): the copy of 128 of 256 draws of an 85k-parameter MLP (44 MB) was held through the whole
                # request, outside the plan, under a 16 MB budget (stop 58)
                g_thetas = _BankRows(self.bank, g_index)
            else:
                g_thetas = self.bank if g_count is None or g_count >= S else self.bank[g_index]
            c_thetas = _draws(self.bank, self.curvature_draws)
            k_index = _held_out(S, self.curvature_draws, self.check_draws)
            # read (or copied) where the check is built: a copy here was held through the gradients and the
            # curvature outside their plans (8 draws of a 1.1M-parameter MLP, 36 MB: a request's peak 135 MB
            # under a 100 MB budget; stop 59)
            k_thetas = None
            more_draws = _further_draws(S, self.curvature_draws, k_index, k_index.numel())
        # chain mode: consecutive states, whose half-difference understates G's error (chain_error_factor)
        lags = torch.zeros(4, dtype=torch.float64) if expectation is Expectation.CHAIN else None
        # (a refusal from here on leaves the minibatches read ahead to the next request: _unread_kept)
        G, dev = self._grad_means(h_f, g_thetas, batch, lags)
        if not all_finite(G):
            raise SolverDivergedError(
                "the gradient of the removed points' negative log-likelihood is not finite at the current "
                "samples; nothing was changed. Check the model and data for overflow"
            )
        info: dict[str, Any] = {"gradient_norm": float(G.norm()), "solver_reason": self.solver_reason}
        if self._dense_cost:  # solver='auto''s estimate of the dense build it kept (_weigh_dense_build)
            info["dense_cost"] = self._dense_cost
        if not bool(G.any()):
            # every draw's gradient of the removed rows is exactly 0 (a hinge or triplet loss at 0 on every removed
            # row, rows the likelihood does not read): the request moves nothing, which passed with problems=[]
            warnings.warn(
                f"nothing to remove: the gradient of the removed rows' nll is exactly 0 at every one of the "
                f"{int(g_thetas.shape[0])} draw(s), so the request leaves the samples where they are. Their nll "
                "does not depend on the parameters there (a hinge, margin or triplet loss at 0 on every removed row, "
                "or a likelihood that does not read these rows): if the rows did influence training, their nll "
                "is not the term the training summed for them",
                stacklevel=outside_stacklevel(),
            )
            info["zero_gradient"] = True
        log.info(
            "request: %d removed row(s), %d remaining; their gradient G over %d draw(s) (%.2f s)",
            k, n, g_thetas.shape[0], time.perf_counter() - t0,
        )  # fmt: skip
        error_factor = 1.0
        if lags is not None:
            error_factor, rho = chain_error_factor(lags, G)
            info.update(chain_error_factor=error_factor, chain_lag1_correlation=rho)
        autocast = autocast_in_effect(live.device)
        if autocast is not None:
            info["autocast"] = autocast
        if self._forward_row_gap is not None:  # the first request's rows-alone gap, not refused (_check_forward)
            info["forward_row_gap"], self._forward_row_gap = self._forward_row_gap, None
        if self._forward_row_gap_float64 is not None:  # ... above refusal in float32, rounding in float64
            info["forward_row_gap_float64"], self._forward_row_gap_float64 = self._forward_row_gap_float64, None
        if self._forward_mixed_gap is not None:  # the same in a batch mixed with remaining rows (_check_mixed_rows)
            info["forward_mixed_gap"], self._forward_mixed_gap = self._forward_mixed_gap, None
        if self._mixed_skipped:  # _check_mixed_rows could not join the removed rows and the remaining minibatch
            info["forward_mixed_check"] = (
                "not run: the removed rows and the remaining minibatch could not be joined"
                + (
                    f"; the minibatch's first {self._remaining_rows_checked} rows evaluated together and each alone "
                    "agree instead"
                    if self._remaining_rows_checked
                    else ""
                )
            )
            self._mixed_skipped = False
        if self._forward_mixed_gap_float64 is not None:  # ... above refusal in float32, rounding in float64
            info["forward_mixed_gap_float64"], self._forward_mixed_gap_float64 = self._forward_mixed_gap_float64, None
        if expectation is not Expectation.CHAIN and self.bank is not None and self.bank.shape[0] == 1:
            self._note_one_sample(info)
        if expectation is not Expectation.CHAIN and c_thetas.shape[0] < self.curvature_draws:
            self._note_curvature_cap(int(c_thetas.shape[0]), info)
        k_count = int(k_index.numel()) if k_thetas is None else int(k_thetas.shape[0])
        if expectation is not Expectation.CHAIN and k_count < self.check_draws:
            # the default 8 capped silently at a smaller bank (recorded); a number asked for by name warned
            self._note_cap(
                "check_draws", self.check_draws, k_count, self.check_draws != CHECK_DRAWS, info,
                "the safety check measures every step at all {used}",
            )  # fmt: skip
        if (
            expectation is not Expectation.CHAIN
            and isinstance(self.grad_draws, int)
            and (g_thetas.shape[0] < self.grad_draws)
        ):
            self._note_cap(
                "grad_draws", self.grad_draws, int(g_thetas.shape[0]), True, info,
                "the removed points' gradient G is averaged over all {used}",
            )  # fmt: skip
        if not self._hvp_checked and self.solver in _HESSIAN_PRODUCTS:
            self._hvp_checked = True
            self._check_second_derivatives(h_f, live, batch, info)
        carried = self._carry if self.carry_deficit else None
        G_own, control_start = G, None
        if carried is not None:
            # the last request's damped step left E[∇F] = −λx: its unapplied influence joins this request's
            info["carried_norm"] = float(carried.norm())
            G = G + carried
            control_start = self.control.state()  # where a retry without the carry starts (_without_carry)
        problem = self._problem(stream, n, batch, c_thetas, e_f, h_f, info)
        c_thetas = problem.thetas  # fewer where every row is read at fewer draws (_full_rows_draws)
        held = getattr(self.curvature, "cache_n", None)
        if held is not None and held != n + k:
            # a dense curvature is downdated by each request's removed rows: rows removed outside requests (an
            # experiment's refusal policy, a data set edited by hand) stayed in it (stop 44's probe: one cluster's
            # diagonal 477 against 184 after 300 rows went that way)
            self.curvature.reset()
            info["curvature_rebuilt"] = (
                f"the remaining data changed outside requests: the cached curvature holds {held:,} rows, this request "
                f"starts from {n + k:,}"
            )
        if not self._remaining_nll_checked:
            # a remaining minibatch nll cannot read (float labels, other fields) is said as such, once: torch's own
            # error came from inside the curvature's memory plan, naming no data (stop 44's probe). Rows already
            # read: the data stream is not advanced
            # (as the data give them: the data-parallel nll reads its weight column itself, as fit()'s check does)
            first = problem.batch if problem.shared else tuple(t[0] for t in problem.batch)
            self._check_nll(tuple(t[:FIT_DATA_ROWS] for t in first), role="remaining")
        t_c = time.perf_counter()
        info.update(self.curvature.prepare(problem))
        _log_curvature(self.solver.value, info, c_thetas.shape[0], time.perf_counter() - t_c)
        row_nll = self._row_nll
        rows_f = functionalize(self.model, lambda m, *b: row_nll(m, b))
        lp_f = None if self.log_prior is None else functionalize(self.model, lambda m: self.log_prior(m))
        screened = self.check_screen is not ScreenMode.OFF
        check_rows, screen_rows = self._check_rows(
            stream,
            self._check_row_count(n),
            -(-self.check_rows // 4),  # exact for any int
        )
        screen = (math.ceil(k_count / 2), screen_rows) if screened else None
        held = 0  # bytes of the check draws' copies (the draws, the screen's): planned with the check
        if k_thetas is None:
            k_thetas, held = self._check_draws(k_index, screen is not None)
        m_rows = int(check_rows[0].shape[0])
        if self._fitted and info.get("preconditioner_reused"):
            other = self._fit_data_differs(check_rows)
            if other is not None:  # fit() read other data: the request builds its own curvature, as without fit
                log.info("fit()'s curvature was built on other data: rebuilding it (%s)", other)
                t_c = time.perf_counter()
                self.curvature.reset()
                info.update(self.curvature.prepare(problem))
                _log_curvature(self.solver.value, info, c_thetas.shape[0], time.perf_counter() - t_c)
                info["curvature_rebuilt_after_fit"] = other
        # (a data set the library removes from, forget(ids, ...), may hold true duplicates of a removed row: not this)
        managed = not stream.from_rows and (
            hasattr(stream.source, "remaining_ids") or hasattr(stream.source, "remaining")
        )
        if not managed:
            self._removed_rows_kept(batch, stream, check_rows, n, info)
        if not self._order_checked and self._layout is not None and self._layout.kind in ("flat", "flat_list"):
            self._order_checked = True
            _warn_if_bank_fits_worse(
                rows_f, live, k_thetas, check_rows, self.spec, self._check_plan(k_thetas, m_rows, held)["row_chunk"]
            )
        check = EnergyCheck(
            rows_f,
            lp_f,
            k_thetas,
            check_rows,
            n,
            G,
            self._reduce,
            screen=screen,
            vectorise=self._vectorise(G.numel(), check=True),
            # draws batched per forward pass and forward-mode derivative (and the rows split, and the draws'
            # gradients summed, when a tight budget needs it): within the memory budget
            linear=check_linear_rule(self.model, G.numel()),
            **self._check_plan(k_thetas, m_rows, held),
        )
        info["check_linear"] = check.linear
        # a passed step whose held rows' NLL rise is not clearly within the tolerance is measured again on further
        # rows (step.DampingControl._confirm): up to CONFIRM_ROWS_FACTOR times the check's, read when first needed
        # counted over the ranks, as _check_rows reads them (this rank's count read W times fewer on W ranks)
        m_all = m_rows if self._reduce is None else int(self._reduce(torch.tensor(float(m_rows), dtype=torch.float64)))
        more = min(CONFIRM_ROWS_FACTOR * m_all, n - m_all)
        if more >= m_all:
            check.confirm_rows = lambda: self._check_rows(stream, more, 0)[0]
        if expectation is not Expectation.CHAIN:
            # ... and at as many further stored samples (EnergyCheck.confirm): the check's draws are a sample of
            # the bank's, whose spread the second measurement is triggered by too (EnergyCheck.population)
            check.population = int(self.bank.shape[0])
            rows2 = more if more >= m_all else min(m_all, n)  # the further rows, or the check's (repeats where n < m)
            if S * rows2 <= CONFIRM_ALL_DRAWS_GRID * k_index.numel() * m_all:
                more_draws = _further_draws(S, self.curvature_draws, k_index, S)  # every other stored sample
            if more_draws.numel():  # read only where a second measurement runs
                check.confirm_thetas = lambda bank=self.bank, budget=self.memory_budget: _further_samples(
                    bank, more_draws, budget
                )
        # a freshly built curvature tries every damping shape; a reused one keeps the shape accepted last
        # (built by fit() and not yet used by an applied request: as if this request had built it)
        reused = bool(info.get("preconditioner_reused") or info.get("hessian_reused")) and not self._fitted
        if self._fitted and info.get("preconditioner_reused"):
            info["curvature_built_by_fit"] = True
        auto = self.damping_shape is DampingShape.AUTO
        spread = None
        if auto and "data" in self.curvature.damping_shapes:
            width = self._spread_label_width(batch)
            counts = None if width is False else self._label_counts(batch, check_rows, width)
            spread = None if counts is None else labels_spread(*counts)
            if spread is not None:
                info["removed_labels_spread"] = spread
        if spread:
            # rows drawn across the labels like the remaining data's (random rows, one row): the data-term shape is
            # searched first, also after a correction. The rules below are a class removal's: the data shape's long
            # steps along the emptied class's prior-only directions are what Fashion-MNIST's corrections took back,
            # but a user's digits MLP losing random rows in 100 requests of 1-8 went 0.07 of the way to retraining
            # with them (its damping shape locked on the identity), 0.80 with this rule, 0.58 with the data shape alone
            # (stop 44)
            all_shapes = (DampingShape.DATA.value, DampingShape.IDENTITY.value)
        elif auto and self._anchor is not None and int(self._anchor.applied) > 0:
            # after the first applied correction across requests the requests are damped as H + λI, like the
            # corrections: the data-term shape's full Newton steps along directions the remaining data barely
            # constrain are what the corrections had to take back (Fashion-MNIST: steps 30-250x longer; with the
            # carry cleared after corrections, a seed where that shape kept winning went from 3.70x to 1.94x the
            # retrain-pair distance; docs/fashion-mnist.md). A skipped correction changes nothing.
            auto, all_shapes = False, (DampingShape.IDENTITY.value,)
        else:
            all_shapes = self.curvature.damping_shapes if auto else (self.damping_shape.value,)
        outcome = self.control.step(self.curvature, G, check, shapes=None if reused and auto else all_shapes, noise=dev)
        if reused:
            first = outcome.history[0]
            if not outcome.safe or not abs(first["ratio"] - 1.0) <= self.drift_tol:
                # the reused curvature drifted from the current posterior: rebuild once and redo the step
                log.info("the reused curvature drifted (first trial's ratio %.3g): rebuilding it", first["ratio"])
                t_c = time.perf_counter()
                self.curvature.reset()
                info.update(self.curvature.prepare(problem))
                _log_curvature(self.solver.value, info, c_thetas.shape[0], time.perf_counter() - t_c)
                info["curvature_rebuilt_for_drift"] = True
                outcome = self.control.step(self.curvature, G, check, shapes=all_shapes, noise=dev)
        if carried is not None and outcome.slope_refused is None and control_start is not None:
            contradicted = self.control.carry_contradicted(outcome, carried)
            if contradicted is not None:  # taken where the slope test abstains: the carry is what the bank refutes
                outcome = replace(outcome, safe=False, note=contradicted, slope_refused=outcome.x)
                info["carry_contradicted"] = contradicted
        searched = 0  # the trials before the search whose step is taken (newton_gate reads that search's)
        if carried is not None and outcome.slope_refused is not None and control_start is not None:
            refused_trials = len(outcome.history)
            outcome, G = self._without_carry(outcome, G, G_own, carried, check, all_shapes, dev, control_start, info)
            searched = refused_trials if G is G_own else 0  # the retry's step taken: its trials follow the refused
        if outcome.safe and not (self._newton_limit > 1 and self.newton_target == "relative"):
            self.control.record(outcome)  # the NLL rises summed across requests (a relative Newton run: its last)
        # as the net judged it: less the prior's credit, pooled with a second measurement where there was one
        info.update(remaining_nll_rise=outcome.nll_rise, remaining_nll_rise_stderr=outcome.nll_stderr)
        if self.shorten_steps:
            outcome = outcome.shortened()
        log.info(
            "step: %s after %d damping trial(s), damping %.3g (%.3g× the mean curvature, %s shape), ratio %.3g "
            "(%.2f s so far)",
            "accepted" if outcome.safe else "no step accepted", len(outcome.history), outcome.damping,
            outcome.damping / outcome.scale if outcome.damping > 0 and outcome.scale else 0.0, outcome.shape,
            outcome.ratio, time.perf_counter() - t0,
        )  # fmt: skip
        if self.control.adaptive and outcome.safe and resolution_floor(float(outcome.x.norm()), live) is not None:
            unresolved = self._unresolved(check, G)  # damped away: was there anything the check could measure?
            if unresolved is not None:
                info["unresolved"] = unresolved
        x, lam, carry = outcome.x, outcome.damping, None
        # the rows the gate sampled from a stream that cannot list them, where it fired, and their control variate
        sample: list[tuple[Batch, torch.Tensor | None]] = []
        gated = (
            outcome.safe
            and self._newton_limit == 1
            and self._undamped_overshoots(outcome.history[searched:], info)
            and self._gap_gate(check, G, info, stream, n, k_thetas, sample, removed=self._raw(batch)[1:2])
        )
        if outcome.safe and (self._newton_limit > 1 or gated):
            x, carry = self._newton_iterations(
                check, G, outcome, info, stream, e_f, n, k_thetas, gated, sample[0] if sample else None
            )
        elif self.carry_deficit:
            carry = measured_deficit(G, outcome)
        x_dev = outcome.length * error_factor * self._error_bar(dev, lam)  # the Monte-Carlo error of the step taken
        before = (outcome.nll_rise, outcome.nll_stderr, outcome.nll_scale)
        new_live, new_bank = self._shift(live, x, lam, h_f, batch, info, outcome.length, check, before)
        moved = info.get("spread_check")
        if isinstance(moved, dict) and moved.get("applied"):
            # the spread's move is part of the step applied: its measured NLL rise joins the request's and the sum
            # (they held the common step's alone: a mixture of experts read -0.012 where every row and sample rose
            # +0.058, the transport's +0.044 left out)
            info["remaining_nll_rise"] = outcome.nll_rise + moved["nll_rise"]
            joint = moved["combined_nll_stderr"]  # the two errors correlated
            if not math.isfinite(moved.get("combined_nll_correlation", math.nan)):  # not judged together
                joint = math.hypot(outcome.nll_stderr, moved["nll_stderr"])
            info["remaining_nll_rise_stderr"] = joint
            if outcome.safe:
                # its error correlated with the common step's, recorded just before: the pair's variance in all
                added = joint**2 - outcome.nll_stderr**2
                self.control.record_rise(moved["nll_rise"], moved["nll_stderr"], outcome.nll_scale, added)
        anchor = self._anchor
        if self.recenter_every:
            if anchor is None or anchor.index.max() >= (0 if self.bank is None else self.bank.shape[0]):
                anchor = self._new_anchor(stream, info)
            if anchor is not None:
                g_index = (
                    None
                    if expectation is Expectation.CHAIN
                    else _turned(self.bank.shape[0], g_thetas.shape[0], self._g_turn())
                )
                anchor = anchor.removing(self._per_draw_grads(h_f, anchor.thetas, batch, rowwise=True), g_index)
                if outcome.safe and int(anchor.count) >= self.recenter_every:
                    new_live, new_bank, carry, anchor = self._recenter(
                        anchor, new_live, new_bank, h_f, check, stream, info, carry
                    )
                bad = anchor.not_finite()
                if bad:
                    # kept, the unlearner's own checkpoint (curvature_state) was refused at the load, and every later
                    # correction skipped as "the measured first moment is not finite"
                    raise SolverDivergedError(
                        "the corrections' anchor (recenter_every) would hold values that are not finite ("
                        + ", ".join(bad)
                        + "): the gradient of the nll at the anchored samples (the bank as it was before the first "
                        "request), on the removed rows or on the remaining ones, overflowed; nothing was changed. "
                        "Check the model and data for overflow at those samples, or build the unlearner with "
                        "recenter_every=0 (no corrections)"
                    )
        if not all_finite(new_live) or (new_bank is not None and not all_finite(new_bank)):
            raise SolverDivergedError("the shifted parameters are not finite; nothing was changed")
        info.update(outcome.solve.info)
        info["damping_shape"] = outcome.shape
        if outcome.shape_scores:
            info["damping_shape_scores"] = outcome.shape_scores
        info["trials"] = outcome.history
        info["damping_history"] = damping_history(outcome)
        direct = sum(bool(h.get("direct_failed")) for h in outcome.history)
        if direct:  # trials whose directly measured energy clearly rose (DampingControl(direct_z=...))
            info["direct_rejected"] = direct
        new_live, new_bank, drawn_index = self._draw_unread_embedding_rows(batch, stream, new_live, new_bank, info)
        if anchor is not None and drawn_index is not None:
            anchor = anchor.drawing(drawn_index)  # no first-moment correction along the drawn rows from now on
        emptied = self._emptied_label_problem(batch, stream, new_bank if new_bank is not None else new_live[None], info)
        measured = info.get("emptied_labels") if isinstance(info.get("emptied_labels"), dict) else {}
        always = self.emptied_label is EmptiedLabel.ALWAYS and bool(measured)
        held = any(_still_held(c, q, info) for c, q in measured.items())
        undrawn = None
        if always or (held and self.emptied_label is EmptiedLabel.RESAMPLE):
            drawn = self._resample_emptied(stream, new_live, new_bank, info, every=always)
            if drawn is not None:
                new_live, new_bank = drawn
                if isinstance(info.get("emptied_labels_top_share"), dict):
                    info["emptied_labels_top_share_before_resample"] = dict(info["emptied_labels_top_share"])
                    info["emptied_label_max_top_share_before_resample"] = info["emptied_label_max_top_share"]
                emptied = self._emptied_label_problem(
                    batch, stream, new_bank if new_bank is not None else new_live[None], info
                )
            else:  # the row could not be drawn (or its draw was not kept): is the label still the top class?
                undrawn = _undrawn_top_problem(info)
                if emptied:  # still at a probability the check refuses: say why no draw took it down
                    emptied = _with_undrawn_reason(emptied, info)
        elif self.emptied_label is EmptiedLabel.REFUSE:  # no draw asked: judged by its top share too
            undrawn = _undrawn_top_problem(info, refuse=True)
        if self.control.drift is not None:  # the measured NLL rises summed across requests (reported, not judged)
            total, var, first = self.control.drift
            info.update(remaining_nll_drift=total, remaining_nll_drift_stderr=math.sqrt(var))
            info["remaining_nll_drift_scale"] = first  # the first request's NLL: the sum's unit
        report = self._report(batch, n, outcome, x, x_dev, g_thetas, c_thetas, expectation, info)
        report.problems = quality_problems(
            report, self.tol, outcome.note, fixed_damping=not self.control.adaptive, theta=live
        )
        if emptied:
            report.problems.append(emptied)
        if undrawn:
            report.problems.append(undrawn)
        stored = new_bank if new_bank is not None else new_live
        before = self.bank if new_bank is not None else live
        stored_dtype = str(stored.dtype)[6:]
        if new_bank is not None and self._layout is not None:
            # the samples are given back in the dtypes they came in (a bfloat16 bank of a float32 model): judge the
            # shift there, where the caller gets it (rounded there it was returned unchanged, silently)
            low = sorted({str(d)[6:] for d in self._layout.returned_dtypes(stored.dtype)} - {stored_dtype})
            if low:
                moved = new_bank - self.bank
                r_moved = self._layout.as_returned(new_bank) - self._layout.as_returned(self.bank)
                kept = float((r_moved.mean(0) - moved.mean(0)).norm()) / max(float(moved.mean(0).norm()), 1e-300)
                info["returned_shift_error"] = kept
                stored, before, stored_dtype = r_moved, torch.zeros_like(r_moved), "/".join(low) + " bank's"
                if kept > 0.1 and not bool(torch.equal(stored, before)) and not report.problems:
                    warnings.warn(
                        f"the samples are given back in {'/'.join(low)}, the bank's dtype: rounded there, their mean "
                        f"shift is {100 * kept:.0f}% off the computed one (norm {report.shift_norm:.3g}). Keep the "
                        "bank in the model's dtype (float32 or float64) to get the removal as computed",
                        stacklevel=outside_stacklevel(),
                    )
        if report.shift_norm > 0 and bool(torch.equal(stored, before)):
            # the shift rounds to nothing where it is stored (weights near 1e4 in float32: one rounding step 1.2e-3):
            # say so, and why, instead of reporting a step the bank does not hold (a refused request says why)
            info["stored_shift"] = 0.0
        if info.get("stored_shift") == 0.0 and not report.problems:
            warnings.warn(
                f"the shift (norm {report.shift_norm:.3g}) rounds to nothing in the {stored_dtype} "
                "parameters: the samples are unchanged. Their floating-point resolution is coarser than this "
                "removal; "
                + (
                    "keep the bank in the model's dtype to apply it"
                    if stored_dtype.endswith("bank's")
                    else "unlearn in float64 (model.double() and a float64 bank) to apply it"
                ),
                stacklevel=outside_stacklevel(),
            )
        prop = Proposal(report, new_live, new_bank)
        prop._sampler_state = sampler_state
        prop._carry = carry
        prop._anchor = anchor
        return prop

    def _without_carry(
        self,
        refused: StepOutcome,
        G: torch.Tensor,
        G_own: torch.Tensor,
        carried: torch.Tensor,
        check: EnergyCheck,
        shapes: Sequence[str],
        noise: torch.Tensor | None,
        start: dict[str, Any],
        info: dict[str, Any],
    ) -> tuple[StepOutcome, torch.Tensor]:
        """A request refused by the slope test, searched once more with the deficit carried from earlier requests
        dropped (this request's own ``G``), every check as usual: the outcome to use and the ``G`` it solved. Only
        where the carry could be what failed the test: its share of ``G·x`` along the refused step above
        ``1 − slope_eta`` (a bank showing the request's own pull along it, and not the carry, fails the test then);
        otherwise the refusal stands as it is.

        The carry (``carry_deficit``) is the model's extrapolation of what earlier damped steps left unapplied; the
        slope test measures the bank's own slope along the step. Where most of the ``G·x`` the test judges is the
        carry's and the bank does not show it (stop 63's digits MLP flow, seed 1, request 14: 92-96% of ``G·x``,
        the bank's energy rising along the step), the measurement contradicts the extrapolation, not the request:
        the carry is dropped for good (the accepted step's own deficit is carried on), as keeping it would put the
        same contradicted deficit to the next request. Refused again, the request is refused with the first search's
        reasons and the retry said. Recorded in ``info["carry_dropped"]``: the carry's share of the refused step's
        ``G·x``, what refused the step with the carry (``refused_by``: ``"slope_test"``, or
        ``"carry_contradicted"`` where the test abstained and :meth:`DampingControl.carry_contradicted` refused it,
        its words in ``info["carry_contradicted"]``, or ``"direct_test"`` where only the direct test, ``direct_z``,
        failed its trials), and the retried step's ``G·x``, bank slope and its standard
        error, and how it met the slope test
        (``"passed"``: measured, ``G·x`` beyond the slope's error, and the slope not clearly below ``slope_eta`` of
        it; ``"abstained"``: ``G·x`` within the slope's error, no test; ``"cut"``: the retry failed it too and its
        step was cut to the bank's own slope, or taken whole where the bank's minimum along it lies beyond it). Judged
        on the step taken: a trial the retry's search rejected by the test before it accepted one is not counted."""
        x = refused.slope_refused
        gx = float(G @ x) if x is not None else math.nan
        share = float(carried @ x) / gx if gx > 0 else math.nan
        if not share > 1.0 - (self.control.slope_eta or 0.0):
            # a bank that showed this request's own pull along the step would have passed the test: the carry
            # cannot be what failed it, and another search would only look at the same bank again
            return refused, G
        log.info(
            "the step failed the slope test with a carried deficit %.3g of its G·x: searching again without it",
            share,
        )  # fmt: skip
        # a retry refused too leaves the refused step, carry kept: the damping state it goes with is the first
        # search's (a proposal applied anyway with strict=False committed the retry's, searched for another G)
        refused_state, refused_shape = self.control.state(), getattr(self.curvature, "damping_shape", None)
        self.control.set_state(start)
        check.G = G_own  # the step's linear term: kept for the checks after the step where the retry is taken
        try:
            retry = self.control.step(self.curvature, G_own, check, shapes=shapes, noise=noise)
        except BaseException:
            check.G = G
            raise
        history = refused.history + retry.history
        record: dict[str, Any] = {
            "accepted": bool(retry.safe),
            "carried_share": None if math.isnan(share) else share,
            # what refused the step with the carry: the slope test, the direct test alone (stop 67), or, where the
            # slope test abstained, the bank's slope contradicting the carry (DampingControl.carry_contradicted)
            "refused_by": "carry_contradicted"
            if "carry_contradicted" in info
            else "slope_test"
            if any(h.get("slope_failed") for h in refused.history)
            else "direct_test",
        }
        if not retry.safe:
            check.G = G
            self.control.set_state(refused_state)
            if refused_shape is not None:
                self.curvature.damping_shape = refused_shape
            _record_carry_dropped(info, record)
            why = (
                "the bank's own energy does not fall along its step either"
                if retry.slope_refused is not None
                else retry.note or "no step passed"
            )
            note = (
                f"{refused.note}; searched again with the deficit carried from earlier requests dropped ({share:.0%} "
                f"of the refused step's G·x): refused too ({why})"
            )
            return replace(refused, note=note, history=history, trials=len(history)), G
        taken = retry.record or {}
        slope, stderr, gx = taken.get("slope"), taken.get("slope_stderr"), taken.get("gx", retry.gx)
        measured = slope is not None and stderr is not None and gx > SLOPE_Z * stderr
        # judged on the step taken, not on the search's rejected trials (a trial rejected by the slope test and a
        # more damped one passing it, measured and whole, is "passed"): cut to the bank's own slope where its
        # length is below 1, or taken by that rule whole where the test, off for it, would have failed it
        eta = self.control.slope_eta or 0.0
        if retry.length < 1 or (measured and slope + SLOPE_Z * stderr < eta * gx):
            how = "cut"
        elif measured:
            how = "passed"
        else:
            how = "abstained"
        record.update(gx=gx, slope=slope, slope_stderr=stderr, slope_test=how)
        _record_carry_dropped(info, record)
        log.info(
            "accepted with the carried deficit dropped: G·x %.3g, the bank's slope %s (slope test %s)",
            gx, "not measured" if slope is None else f"{slope:.3g} ± {stderr:.2g}", how,
        )  # fmt: skip
        return replace(retry, history=history, trials=len(history)), G_own

    def _emptied_label_problem(
        self, batch: Batch, stream: _Stream, moved: torch.Tensor, info: dict[str, Any]
    ) -> str | None:
        """The problem to report when this request removes the last remaining rows of a class label and the moved
        samples still predict that label for them (``None``: not the case, or not checkable).

        Checked for a plain categorical likelihood (``nll`` is the cross-entropy of ``model(x)`` against integer
        labels ``batch[1]``, so ``exp(−h)`` is the predictive probability of a row's own label) when the labels of
        the remaining data can be read without a pass over it (:meth:`_remaining_labels`). For each label no
        remaining row carries any more, the posterior-predictive probability of that label on the removed rows
        holding it (through :meth:`forget`, also the label's rows that earlier requests removed from the same
        ``RemovableDataset``, up to ``EMPTIED_LABEL_EARLIER_ROWS``: ``info["emptied_label_earlier_rows"]``) is
        averaged over ``EMPTIED_LABEL_DRAWS`` moved samples (``info["emptied_labels"]``); at
        ``EMPTIED_LABEL_MAX_PROB`` or more the removal did not forget the class: one local influence step from a fit
        that predicts it cannot move that far (a user's digits MLP, its class removed in 17 requests of 8: p = 0.99
        at the last request, every request before it passed). Where the labels cannot be read (an iterator, a
        ``DataLoader`` over another kind of dataset) ``info["emptied_labels"]`` says it was not checked, as it does
        for a loss not recognised as a cross-entropy, unless the integer targets cannot be the model's class labels
        (a Gaussian likelihood's, or targets larger than the values the model outputs per row: a count
        regression's, read by :func:`~mcmc_unlearner.kronecker.likelihood_and_columns` from its probe's forward).
        Under ``torch.distributed`` every decision is taken on all-reduced counts (:meth:`_reduce_max`,
        ``_reduce``), so the ranks agree and the result equals one process's.
        """
        y = batch[1] if len(batch) > 1 else None
        integer = isinstance(y, torch.Tensor) and not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
        if not integer or y.dim() != 1:
            # one-hot or probability targets, class labels stored as floats, labels in another field: said, not
            # silent (stop 47's probe: a removed class still the top prediction on 58% of its test digits, every
            # check passed and nothing in the report)
            # (whole numbers stored as floats are a regression's targets as often as labels: not said)
            probabilities = (
                isinstance(y, torch.Tensor)
                and y.is_floating_point()
                and y.dim() == 2
                and y.shape[1] >= 2  # one column is a binary target, not a one-hot row
                and bool((y >= 0).all())
                and bool(torch.allclose(y.sum(1), torch.ones((), dtype=y.dtype)))
            )
            if probabilities:
                info["emptied_labels"] = (
                    "not checked: batch[1] holds one-hot or probability targets, not a [B] tensor of integer class "
                    "labels; whether the request removes a class's last rows is checked with integer labels there "
                    "(pass the targets' argmax in batch[1])"
                )
            else:
                self._later_labels_emptied(batch, stream, info)
            return None
        summed = self._reduce or (lambda t: t)
        raw = self._raw(batch)
        y = raw[1]
        self._probe_labels(raw)
        if not self._categorical and not self._plain_categorical:
            # a request that empties a label says it was not checked (it said nothing: a class-weighted, smoothed
            # cross-entropy left a removed class the top prediction on 78-94% of its test digits, every check passed)
            left = self._remaining_labels(stream)
            if left is not None and self._reduce is None and y.numel():
                labels = torch.unique(y[y >= 0].long())
                gone = labels[~torch.isin(labels, left.long().to(labels.device))].tolist()
                # targets larger than the model's output is wide index none of its values: counts of a Poisson or
                # negative-binomial regression, no class labels (a probe's int64 counts were said to empty "labels
                # [35, 39, ...]"); a Gaussian likelihood's are a regression's. Equal to the width is still a label:
                # a single logit's 0/1 (BCE), classes numbered 1..C (review)
                top = max([int(y.max())] + ([int(left.max())] if left.numel() else []))
                if gone and (self._label_columns is None or top <= self._label_columns):
                    why = self._label_link[1] or "another loss"
                    info["emptied_labels"] = (
                        f"not checked: the request removes the last rows of label(s) {gone}, but nll is not "
                        f"recognised as a cross-entropy of the model's output ({why}), so the labels' probability "
                        "cannot be read from it"
                    )
                    self._warn_emptied_unchecked(info["emptied_labels"])
                else:  # batch[1] empties no value, or only values above the output's width (lengths, counts)
                    self._later_labels_emptied(batch, stream, info)
            elif left is None and self._reduce is None and y.numel():
                top = int(y.max())
                if self._label_columns is None or top <= self._label_columns:  # the targets may be class labels
                    why = self._label_link[1] or "another loss"
                    info["emptied_labels"] = (
                        "not checked: which labels remain cannot be read from the remaining data without a pass over "
                        f"it, and nll is not recognised as a cross-entropy of the model's output ({why})"
                    )
                    if not self._unread_labels_warned:
                        self._unread_labels_warned = True
                        self._warn_emptied_unchecked(info["emptied_labels"])
            return None
        left = self._remaining_labels(stream)
        if left is None and self._reduce is None:  # a plain iterator: its rows, where reading it finds every one
            found = self._streamed_remaining(y, stream, info)
            if found is True:  # every removed label that the rows read before lacked is among further rows read
                return None
            if found is not None:
                left = self._raw(found)[1]
        if bool(self._reduce_max(torch.tensor([float(left is None)]))[0] > 0):
            info["emptied_labels"] = (
                "not checked: which labels remain cannot be read from the remaining data without a pass over it "
                "(pass the rows as a tuple (x, y), a RemovableDataset, or a DataLoader over a TensorDataset or a "
                "dataset with torchvision's targets, drawing with torch's own samplers: a batch_sampler of your own "
                "may leave any rows out)"
            )
            if self._unseen_labels(y, stream, info):  # warned, naming the labels: at every such request
                self._unread_labels_warned = True
            elif not self._unread_labels_warned:  # once per unlearner: every request on such data is unchecked alike
                self._unread_labels_warned = True
                self._warn_emptied_unchecked(info["emptied_labels"])
            return None
        y, left = y.long(), left.long().to(y.device)
        top = max(int(y.max()) if y.numel() else -1, int(left.max()) if left.numel() else -1)
        classes = int(self._reduce_max(torch.tensor([float(top)]))[0]) + 1
        if classes <= 0:
            return None
        seen = torch.zeros(2, classes, dtype=torch.float64)  # removed here / still remaining, per label
        seen[0, y[y >= 0]] = 1.0  # a negative label is no class (cross_entropy's ignore_index=-100: h = 0)
        seen[1, left[left >= 0]] = 1.0
        seen = self._reduce_max(seen)
        emptied = torch.nonzero((seen[0] > 0) & (seen[1] == 0)).flatten()
        if emptied.numel() == 0:
            return None
        from .kronecker import select_output

        link = self._label_link[0]

        def label_logits(m: nn.Module, *b: torch.Tensor) -> torch.Tensor:
            return select_output(m(b[0]), link).flatten(1)

        logits_f = functionalize(self.model, label_logits)
        if self._plain_categorical:
            rows_f = functionalize(self.model, lambda m, *b: self._row_nll(m, b))
        else:  # temperature, scale, label smoothing, row weights: the label's probability from the logits

            def label_nll(m: nn.Module, *b: torch.Tensor) -> torch.Tensor:
                return torch.nn.functional.cross_entropy(label_logits(m, *b), b[1].long(), reduction="none")

            rows_f = functionalize(self.model, label_nll)
        draws = moved[_evenly(moved.shape[0], min(moved.shape[0], EMPTIED_LABEL_DRAWS))]
        # Σ exp(−h) over rows and draws; rows·draws; rows whose posterior predictive has the label as its top class;
        # rows whose logits could not be read as [rows, classes] (no top share then)
        totals = torch.zeros(4, emptied.numel(), dtype=torch.float64)
        # the label's rows removed by earlier forget() requests too: a class removed a few rows at a time was judged
        # on its last request's rows alone
        earlier = self._earlier_removed(stream, emptied.tolist())
        with torch.no_grad():
            for j, c in enumerate(emptied.tolist()):
                for rows in (tuple(f[y == c] for f in raw), earlier.get(c)):
                    if rows is None:
                        continue
                    m = int(rows[0].shape[0])
                    # in parts of EMPTIED_LABEL_ROWS rows: a class of many rows is one forward pass of a few MB at a
                    # time
                    for t in draws:
                        for i in range(0, m, EMPTIED_LABEL_ROWS):
                            h = rows_f(t, *(f[i : i + EMPTIED_LABEL_ROWS] for f in rows))
                            totals[0, j] += torch.exp(-h.double()).sum().cpu()
                    totals[1, j] += m * draws.shape[0]
                    totals[2:, j] += _top_rows(logits_f, draws, rows, c)
        totals = summed(totals)
        if earlier:
            info["emptied_label_earlier_rows"] = sum(int(b[0].shape[0]) for b in earlier.values())
        probs = {str(c): float(totals[0, j] / totals[1, j]) for j, c in enumerate(emptied.tolist())}
        info["emptied_labels"] = probs
        # scalars too, which report.to_dict() and the deletion service's ledger keep
        info["emptied_label_max_probability"] = max(probs.values())
        info["emptied_label_ids"] = ",".join(probs)
        # the share of the label's rows on which it is the posterior predictive's top class (the row's draw is also
        # made, or the request refused where it cannot be, at EMPTIED_LABEL_MAX_TOP or more: _undrawn_top_problem)
        counted = totals[1] / draws.shape[0]
        tops = {str(c): float(totals[2, j] / counted[j]) for j, c in enumerate(emptied.tolist()) if totals[3, j] == 0}
        info.pop("emptied_labels_top_share", None)
        info.pop("emptied_label_max_top_share", None)
        if tops:
            info["emptied_labels_top_share"] = tops
            info["emptied_label_max_top_share"] = max(tops.values())
        still = {c: p for c, p in probs.items() if not p < EMPTIED_LABEL_MAX_PROB}
        if not still:
            return None
        said = ", ".join(f"{p:.2f} (label {c})" for c, p in still.items())
        return (
            f"this request removes the last rows of {'a label' if len(still) == 1 else 'labels'} from the remaining "
            f"data, but the moved samples still give those rows their own label with mean probability {said} (at "
            f"least {EMPTIED_LABEL_MAX_PROB:g}; a posterior given the remaining data, where no row carries the label, "
            "puts little mass there): one influence step from a fit that predicts the class does not forget it. "
            "Continue the chain on the remaining data for at least a burn-in's worth of steps (your own sampler, "
            "run_chain, or the deletion service's --on-failure repair with --repair-steps that long), or retrain"
        )

    def _streamed_remaining(self, y: torch.Tensor, stream: _Stream, info: dict[str, Any]) -> Batch | bool | None:
        """Where the remaining rows cannot be listed (a plain iterator) and the removed labels ``y`` hold one that
        none of the rows this request read holds (:meth:`~mcmc_unlearner.stream._Stream.seen_labels`), read further
        rows from the stream, whole minibatches of about ``n / 2`` rows at a time, keeping its distinct rows
        (:func:`_distinct_rows`, byte for byte in every field): ``True`` as soon as every such label shows among them
        (it remains: nothing is emptied, nothing said); every remaining row (the distinct rows, in their hashes' order:
        :func:`_hash_order`; stop 69's, the order first read) where they are ``n`` and at least ``n`` further
        rows read after that are all among them (an endless iterator reshuffling a ``DataLoader`` each pass: 2-3
        passes' rows, 3-6 where each pass drops its last partial minibatch), read then as the listed rows by the
        check and the draw; else ``None`` (more than ``n`` distinct rows: augmented, or not the remaining rows; fewer
        after ``EMPTIED_STREAM_PASSES·n`` rows: duplicated rows, a sampler that leaves some out; a one-pass iterator
        that ran out; over the memory budget), stop 66's warning then given, ``info["emptied_labels_stream"]`` saying
        why. Bounded: at most ``EMPTIED_STREAM_PASSES·n`` rows read, and at most ``n`` distinct rows and one read of
        about ``n / 2`` held, with their joined copy and the hash's temporaries (at most 0.8 of it), planned as
        ``emptied_label_stream_rows`` at four times ``n + n / 2`` rows' bytes (the first minibatch's per row) and
        not read where that exceeds ``memory_budget``. Read once per request (kept with the stream for the draw and
        the check after it). ``True`` with nothing read where every removed label is among the rows this request
        read (``info["emptied_labels_stream"]`` says so; stop 69 warned there that the check had not run). Where the
        Newton gate's sample holds every remaining row (:meth:`_keep_every_row`), those rows, with nothing read
        (stop 70). Single-process: the caller asks only there."""
        if not y.numel():
            return None
        m, seen = stream.seen_labels()
        if seen is None or m == 0:
            return None
        gone = set(torch.unique(y[y >= 0]).tolist()) - seen
        if not gone:
            # every removed label is among the remaining rows this request read: none is emptied, as listed rows
            # would show (nothing said then either). Stop 69's quick matrix warned here that the check had not run
            # (the transformer's backdoor rows, label 1, on every iterator run): true of no measurement, and nothing
            # it could measure (the check measures emptied labels only)
            info["emptied_labels_rows_read"] = m
            info["emptied_labels_stream"] = f"not emptied: every removed label is among the {m:,} rows read"
            return True
        if EMPTIED_STREAM_PASSES < 1:
            return None
        every = stream.once("gate_every_row", lambda: None)  # (kept by the Newton gate: _keep_every_row)
        if every is not None:
            return stream.once("streamed_remaining", lambda: self._gate_remaining(every, gone, stream.n, info))
        return stream.once("streamed_remaining", lambda: self._read_remaining(stream, gone, info))

    def _keep_every_row(self, stream: _Stream, rows: Batch, y: Any, n: int) -> None:
        """Keep with ``stream`` (``once("gate_every_row")``) every remaining row where the Newton gate's sample
        ``rows`` (read from a plain iterator: :meth:`_gap_sample`) holds them by :meth:`_read_remaining`'s criterion,
        and the removed labels ``y`` (``batch[1]``) hold one that none of the rows this request read holds: then
        :meth:`_streamed_remaining` would read the stream again for the emptied label (``EMPTIED_STREAM_PASSES·n``
        rows at most; 5,120 rows, 0.06-0.12 s CPU on the quick matrix's LeNet-5 and BN-CNN, stop 69) and find the
        rows the sample holds. The criterion: among its first ``EMPTIED_STREAM_PASSES·n`` rows exactly ``n`` distinct
        rows (byte for byte, :func:`_distinct_rows`), and at least ``n`` rows after the first copy of the last of
        them (the reading counts them from the end of the read of about ``n / 2`` rows that completed them), within
        the same memory budget. Kept ``n`` rows, in :func:`_hash_order`'s order, as the reading keeps them: the
        check and the draw on them are those of the reading to the bit. A sample of more or fewer distinct rows
        (augmented, duplicated, a sampler that leaves rows out) keeps nothing, and the stream is read as before."""
        if EMPTIED_STREAM_PASSES < 1 or not isinstance(y, torch.Tensor) or y.dim() != 1 or not _integer_rows(y):
            return
        _, seen = stream.seen_labels()
        if not y.numel() or seen is None or not set(torch.unique(y[y >= 0]).tolist()) - seen:
            return
        rows = tuple(t[: EMPTIED_STREAM_PASSES * n] for t in rows)
        per_row = sum(t[:1].numel() * t.element_size() for t in rows if isinstance(t, torch.Tensor))
        if 4 * (n + max(1, -(-n // 2))) * per_row > self.memory_budget:
            return
        distinct = _distinct_rows(rows)
        if distinct is None or int(distinct.numel()) != n or int(rows[0].shape[0]) - int(distinct[-1]) - 1 < n:
            return
        every = _hash_order(tuple(t[distinct] for t in rows))
        stream.once("gate_every_row", lambda: (every, int(rows[0].shape[0])))

    def _gate_remaining(
        self, every: tuple[Batch, int], gone: set[int], n: int, info: dict[str, Any]
    ) -> Batch | bool | None:
        """:meth:`_read_remaining`'s answer from every remaining row the Newton gate's sample held
        (:meth:`_keep_every_row`), nothing read from the stream."""
        c0 = time.process_time()
        rows, sampled = every
        per_row = sum(t[:1].numel() * t.element_size() for t in rows if isinstance(t, torch.Tensor))
        self._plan("emptied_label_stream_rows", min(4 * (n + max(1, -(-n // 2))) * per_row, self.memory_budget))
        labels = rows[1] if len(rows) > 1 else None
        found: Batch | bool = rows
        if isinstance(labels, torch.Tensor) and labels.dim() == 1 and not gone - set(torch.unique(labels).tolist()):
            found = True  # (the sample's labels were counted among the rows read: not reached)
        info["emptied_labels_stream_rows_read"] = 0
        info["emptied_labels_stream_cpu_seconds"] = time.process_time() - c0
        info["emptied_labels_stream"] = (
            "not emptied: the removed label(s) the rows read lacked are among the Newton gate's sample"
            if found is True
            else f"every remaining row: the {n:,} distinct rows of the Newton gate's {sampled:,} rows sampled from "
            "the stream (none read further)"
        )
        log.info("emptied label(s) through a stream: %s", info["emptied_labels_stream"])
        return found

    def _read_remaining(self, stream: _Stream, gone: set[int], info: dict[str, Any]) -> Batch | bool | None:
        """The reading of :meth:`_streamed_remaining` for the labels ``gone``."""
        n, c0, read = stream.n, time.process_time(), 0
        limit, chunk = EMPTIED_STREAM_PASSES * n, max(1, -(-n // 2))
        kept: Batch | None = None
        whole_at: int | None = None  # rows read when the distinct rows first numbered n
        found: Batch | bool | None = None
        why = None
        source_rows = stream.rows_read  # (rows taken from the source: a read that runs out is counted from them)
        try:
            first = self._raw(stream.peek())
            per_row = sum(t[:1].numel() * t.element_size() for t in first if isinstance(t, torch.Tensor))
            need = 4 * (n + chunk) * per_row
            self._plan("emptied_label_stream_rows", min(need, self.memory_budget))
            if need > self.memory_budget:
                why = (
                    f"its {n:,} rows, held to find every remaining row, would take {need / 1e6:.3g} MB, over the "
                    f"memory budget's {self.memory_budget / 1e6:.3g} MB"
                )
            while why is None and found is None and read < limit:
                part = self._raw(stream.rows(min(chunk, limit - read)))
                read += int(part[0].shape[0])
                labels = part[1] if len(part) > 1 else None
                if isinstance(labels, torch.Tensor) and labels.dim() == 1:
                    gone -= set(torch.unique(labels).tolist())
                if not gone:
                    found = True
                    break
                joined = part if kept is None else tuple(torch.cat([a, b]) for a, b in zip(kept, part))
                first_rows = _distinct_rows(joined)
                if first_rows is None:
                    why = "its rows could not be told apart byte for byte (or two different rows shared a hash)"
                    break
                kept = tuple(t[first_rows] for t in joined)
                distinct = int(kept[0].shape[0])
                if distinct > n:
                    why = (
                        f"{read:,} rows read from it hold {distinct:,} distinct rows, more than the {n:,} remaining "
                        "(augmented rows, or not the remaining rows)"
                    )
                elif distinct == n:
                    whole_at = read if whole_at is None else whole_at
                    if read - whole_at >= n:
                        found = _hash_order(kept)  # (in an order of the rows alone: as the gate's sample gives them)
            if why is None and found is None:
                have = 0 if kept is None else int(kept[0].shape[0])
                why = (
                    f"{read:,} rows read from it ({EMPTIED_STREAM_PASSES}·n) hold {have:,} distinct rows, not all "
                    f"{n:,} remaining (duplicated rows, or a sampler that leaves some out)"
                )
        except IteratorRanOut:  # (the read that ran out took minibatches too: counted, not lost from the count)
            read = max(read, stream.rows_read - source_rows)
            why = f"the iterator ran out after {read:,} further rows"
        info["emptied_labels_stream_rows_read"] = read
        info["emptied_labels_stream_cpu_seconds"] = time.process_time() - c0
        if found is True:
            info["emptied_labels_stream"] = (
                f"not emptied: the removed label(s) the rows read lacked are among {read:,} further rows read"
            )
        elif found is not None:
            info["emptied_labels_stream"] = (
                f"every remaining row: the {n:,} distinct rows of {read:,} further rows read from the stream"
            )
        else:
            info["emptied_labels_stream"] = f"not found: {why}"
        log.info("emptied label(s) through a stream: %s", info["emptied_labels_stream"])
        return found

    def _unseen_labels(self, y: torch.Tensor, stream: _Stream, info: dict[str, Any]) -> bool:
        """Where the remaining labels cannot be listed (a plain iterator), whether the removed labels ``y`` (read by
        a cross-entropy from ``batch[1]``) hold one that none of the remaining rows this request read holds
        (:meth:`~mcmc_unlearner.stream._Stream.seen_labels`, counted from the minibatches it used: no further pass;
        a row read twice counts twice, so the rows read may outnumber ``n_remaining``); if so, warn naming them, the
        rows read and the fix, and record ``info["emptied_labels_unseen"]`` (the labels, comma-joined: a ledger
        scalar) beside ``info["emptied_labels_rows_read"]``. Nothing is measured (the
        labels may remain on rows not read; the samples' predictions are not read), so the step is applied as
        computed: stop 61's quick matrix through an iterator left a removed class predicted on 78-100% of its rows
        on 7 of its 9 CNN runs (LeNet-5, BN-CNN, ResNet; retraining: none) with ``problems=[]`` and one warning, at
        the unlearner's first request, that the check had not run. Single-process."""
        m, seen = stream.seen_labels()
        if self._reduce is not None or seen is None or m == 0:
            return False
        info["emptied_labels_rows_read"] = m
        gone = sorted(set(torch.unique(y[y >= 0]).tolist()) - seen)
        if not gone:
            return False
        info["emptied_labels_unseen"] = ",".join(map(str, gone))
        one = len(gone) == 1
        whose = "that label's" if one else "those labels'"
        warnings.warn(
            f"the emptied-label check did not run, and the removed rows hold label{'' if one else 's'} "
            f"{', '.join(map(str, gone))}, which none of the {m:,} rows this request read from the {stream.n:,} "
            f"remaining rows holds (a row read again counted again): it likely removes {whose} last rows (were the "
            f"minibatches drawn at random, a label on {3 / m:.2%} (3/m) of the remaining rows or more would have "
            "shown among the rows read with probability 95%). Where a class is "
            "removed whole, one influence step often leaves it predicted (on 78-100% of its rows in 7 of 9 runs of "
            "the model matrix's CNNs), and the draw of its output-layer row that forgets it needs every remaining "
            "row: from this data neither that draw nor the check of the class's predictions could run, and the step "
            "is applied as computed. Pass the remaining rows listable to have them run: a tuple (x, y), a "
            "RemovableDataset, or a DataLoader over a TensorDataset (or a dataset with torchvision's targets) drawing "
            "with torch's own samplers (a batch_sampler of your own may leave any rows out), the loader itself rather "
            "than an endless iterator over it (a request restarts a DataLoader that runs out); or check the removed "
            "class's predictions yourself (report.info['emptied_labels_unseen'] records this)",
            stacklevel=outside_stacklevel(),
        )
        return True

    def _probe_labels(self, raw: Batch) -> None:
        """Probe once (on the first request whose ``batch[1]`` is a ``[B]`` integer tensor) whether ``nll`` is a
        cross-entropy of ``model(batch[0])`` reading its class labels from ``batch[1]`` (``_plain_categorical``,
        ``_categorical``), the output's width an integer target above which is no label (``_label_columns``), and
        whether later fields may hold the labels (``_later_labels_read``); the ranks agree on the result."""
        if self._plain_categorical is not None:
            return
        y = raw[1]
        # on the first request; a rank without removed rows has nothing to probe and defers to the others
        plain = categorical = True
        if y.numel():
            from .kronecker import Likelihood

            # the output's width from the probe's own forward (a second probe fired a user's hook once more)
            kind, extra, columns = self._likelihood_probe(raw)
            categorical = kind is Likelihood.CATEGORICAL
            plain = categorical and set(extra) <= {"output"}
            # a Bernoulli likelihood (binary cross-entropy) is left unchecked too: the check reads the softmax
            # probability of each removed label, which one or K independent logits do not give
            why = "a binary cross-entropy, whose labels are no softmax classes" if kind is Likelihood.BERNOULLI else ""
            self._label_link = (extra, str(extra.get("reason", "")) or why)
            # a later field is read as possible labels where nll is unrecognised (this probe's kind: a second
            # probe fired a user's forward hooks once more)
            self._later_labels_read = kind is Likelihood.EMPIRICAL
            self._output_width = columns
            if not categorical:  # are the integer targets class labels at all? (a count regression's are not)
                self._label_columns = 0 if kind is Likelihood.GAUSSIAN else columns
        has = float(y.numel() > 0)
        # the width too (+1, 0 for none): a rank without removed rows kept None where the others read the output's
        # width, and the spread rule's label counts (_label_counts) all-reduced on that rank alone (gloo aborted both
        # ranks, "Received data size doesn't match expected size": a Poisson regression, stop 70)
        width = float(self._label_columns + 1) if y.numel() and self._label_columns is not None else 0.0
        flags = self._reduce_max(torch.tensor([has, has * float(not plain), has * float(not categorical), width]))
        self._plain_categorical = bool(flags[0] > 0) and not bool(flags[1] > 0)
        self._categorical = bool(flags[0] > 0) and not bool(flags[2] > 0)
        self._label_columns = int(flags[3]) - 1 if flags[3] > 0 else None

    def _later_labels_emptied(self, batch: Batch, stream: _Stream, info: dict[str, Any]) -> None:
        """Say (``info["emptied_labels"]`` and a warning) that the emptied-label check did not run where ``batch[1]``
        is not verified as the class labels and a later integer ``[B]`` field looks like them: a few values shared by
        many rows (at most one per ``LATER_LABEL_ROWS_PER_VALUE`` rows, so row ids are not taken for labels), none
        above the model's output width (which they could not index as classes: a regression's site ids), one of
        which this request removes the last remaining rows of, and ``nll`` is none of the likelihoods
        :func:`~mcmc_unlearner.kronecker.likelihood_and_columns` recognises (a Gaussian's reads no class labels).
        Stop 61's probe: a GRU classifier whose batches are ``(x, lengths, y)`` had its class removed with
        ``problems=[]`` and nothing said, the class still predicted on 44% of its test digits (retraining: none),
        the lengths read as the labels. Single-process, with the remaining rows listable (:meth:`_remaining_field`);
        nothing is measured, so the report is not refused."""
        raw = self._raw(batch)
        if self._reduce is not None or len(raw) < 3 or not raw[0].shape[0]:
            return
        if self._later_labels_read is None:  # a likelihood recognised (a Gaussian's) reads no class labels at all
            from .kronecker import Likelihood

            kind, _, self._output_width = self._likelihood_probe(raw)
            self._later_labels_read = kind is Likelihood.EMPIRICAL
        if not self._later_labels_read:
            return
        for k in range(2, len(raw)):
            y = raw[k]
            if not _integer_rows(y) or not y.numel():
                continue
            left = self._remaining_field(stream, k)
            if left is None or left.dim() != 1:
                continue
            top = max(int(y.max()), int(left.max()) if left.numel() else -1)
            if self._output_width is not None and top > self._output_width:
                # values above the output's width index none of its classes (a regression's group or site ids,
                # 5 sites of a one-output model): the check could not read them as labels in batch[1] either
                continue
            values = torch.unique(torch.cat([y.long(), left.long().to(y.device)]))
            if values.numel() * LATER_LABEL_ROWS_PER_VALUE > y.numel() + left.numel():
                continue
            labels = torch.unique(y[y >= 0].long())
            gone = labels[~torch.isin(labels, left.long().to(labels.device))].tolist()
            if gone:
                info["emptied_labels"] = (
                    f"not checked: the check reads class labels from batch[1], which is not verified as them here, "
                    f"and the request removes the last rows whose batch[{k}] is {gone[:10]}; if batch[{k}] holds the "
                    f"class labels, put them in batch[1] (e.g. (x, y, ...) with nll reading b[1]): the check reads "
                    "them there, and measures a removed class where nll is the cross-entropy of model(batch[0])"
                )
                self._warn_emptied_unchecked(info["emptied_labels"])
                return

    def _remaining_field(self, stream: _Stream, k: int) -> torch.Tensor | None:
        """Field ``k`` of every remaining row, read without a pass over the data (as :meth:`_remaining_labels`
        reads field 1); ``None`` where it cannot be read so."""
        src = stream.source
        if isinstance(getattr(src, "tensors", None), tuple) and hasattr(src, "remaining_ids"):
            return src.tensors[k][src.remaining_ids] if k < len(src.tensors) else None
        if stream.listable:
            rows = self._raw(stream.full())
            return rows[k] if k < len(rows) else None
        selected = _loader_selection(src)
        if selected is None or not isinstance(selected[0], torch.utils.data.TensorDataset):
            return None
        tensors, index = selected[0].tensors, selected[1]
        if k >= len(tensors):
            return None
        return tensors[k] if index is None else tensors[k][index]

    def _warn_emptied_unchecked(self, said: str) -> None:
        """Warn that the emptied-label check (README step 6) did not run, with ``said``, its ``info["emptied_labels"]``
        line: a request that removes a class's last rows passed with ``problems=[]`` while the samples still predicted
        the class (a dataclass output: error 0.21 on the removed class's test digits, retraining's 1.00), and only
        ``info`` said the check had not run. Not a problem of the report: nothing was measured to fail, and a loss the
        check cannot read (or data whose labels it cannot list) would refuse every request."""
        warnings.warn(
            f"the emptied-label check did not run ({said.removeprefix('not checked: ')}). Whether the moved samples "
            "still predict a label the remaining data no longer carries is not measured, and the report passes "
            "without it (report.info['emptied_labels'] says so): check the removed class's predictions yourself, "
            "or continue the chain on the remaining data when a request removes a class's last rows",
            stacklevel=outside_stacklevel(),
        )

    def emptied_label_problem(
        self, removed: Batch | torch.Tensor, remaining: Any, ids: Sequence[int] | torch.Tensor | None = None
    ) -> tuple[str | None, dict[str, Any]]:
        """The emptied-label check of a request (README step 6) on the samples as they are now: whether the rows
        ``removed`` carry a label no row of ``remaining`` carries and the stored samples (the live chain without a
        bank) still give them that label: a mean probability of one half or more, or (drawing no row) the top class
        on half its rows or more. What the deletion service's repair checks again after its chain run.

        Args:
            removed: The request's rows.
            remaining: The remaining data.
            ids: The request's ids in ``remaining``, a ``RemovableDataset`` they were removed from: the label's rows
                that earlier requests removed from it are judged too, as :meth:`forget` judges them.

        Returns:
            The problem (``None``: none, or not checkable) and what was measured (``"emptied_labels"``, ...).
        """
        batch = _as_batch(removed, "the removed data")
        stream = self._stream(remaining, None)
        moved = self.bank if self.bank is not None else ParamSpec.flatten_module(self.model)[None]
        info: dict[str, Any] = {}
        held, self._forget_request = (
            self._forget_request,
            None if ids is None else (remaining, torch.as_tensor(ids, dtype=torch.long)),
        )
        try:
            found = self._emptied_label_problem(batch, stream, moved, info)
        finally:
            self._forget_request = held
        # the top-share rule too (README step 6): a label still the top class on half its rows at a mean probability
        # under one half was passed here (the deletion service's repair gate) while the request's own check refuses it
        top = _undrawn_top_problem(info, checked=True)
        return (found if top is None else top if found is None else f"{found} Also: {top}"), info

    def _resample_emptied(
        self, stream: _Stream, live: torch.Tensor, bank: torch.Tensor | None, info: dict[str, Any], every: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Draw the output-layer rows of the labels the moved samples still give mass (``info["emptied_labels"]``
        at ``EMPTIED_RESAMPLE_PROB`` or more; ``every``: all) from their conditional given the remaining rows, in
        every stored sample and the live chain (:mod:`mcmc_unlearner.emptied`, a Gibbs step of the retrained
        posterior); ``None``, with
        ``info["emptied_label_resample"]`` saying why, where it cannot be done or it raised the remaining rows' mean
        NLL by more than the safety check allows."""
        from .emptied import resample_label_rows

        still = [int(c) for c, p in info["emptied_labels"].items() if every or _still_held(c, p, info)]
        link = self._label_link[0]
        # a cross-entropy times a factor per row (class weights w[y_i], a weight field, a constant): the same
        # conditional with each row's term weighted, exactly (:func:`~.kronecker.row_weights`)
        weighted = not self._plain_categorical and bool(self._categorical) and set(link) <= _WEIGHTED_LINK
        if not (self._plain_categorical or weighted):
            extras = ", ".join(sorted(set(link) - {"output"})) or "not a plain cross-entropy"
            why = (
                "the draw's conditional is a plain or row-weighted (weight=, a weight field, a constant factor) "
                f"cross-entropy's, and nll has {extras}"
            )
        elif self._reduce is not None:
            why = "not under torch.distributed (each rank holds part of the remaining rows)"
        elif self.log_prior is None:
            why = "no log_prior: with a flat prior the label's row has no proper conditional"
        else:
            why = None
        listed = None
        if why is None:
            listed = _listed_remaining(stream)
            if listed is None:  # a plain iterator whose rows the emptied-label check found: every remaining row
                streamed = stream.once("streamed_remaining", lambda: None)
                listed = streamed if isinstance(streamed, tuple) else None
            if listed is None:
                why = (
                    "the remaining rows cannot be listed without a pass over the data (pass them as a tuple (x, y), a "
                    "RemovableDataset, or a DataLoader over a TensorDataset)"
                )
        if why is not None:
            info["emptied_label_resample"] = f"not done: {why}"
            return None
        rows = self._raw(listed)
        why = self._not_plain_on(rows, link, weighted)
        if why is not None and not weighted:
            # read on the removed rows, class weights that are 1 on their labels (and on those the probe shifts them
            # to) read as plain: read again on the remaining rows, a row-weighted cross-entropy is drawn as such
            again = self._weighted_link_on(rows, link)
            if again is not None:
                link, weighted = again, True
                why = self._not_plain_on(rows, link, True)
        if why is not None:
            info["emptied_label_resample"] = f"not done: {why}"
            return None
        from .kronecker import row_weights

        weights = row_weights(rows, link) if weighted else None
        lp_f = functionalize(self.model, lambda m: self.log_prior(m))
        parts = [live[None]] if bank is None else [bank, live[None]]  # drawn apart: no third copy of the bank
        stats = dict.fromkeys(("acceptance", "remaining_nll_before", "remaining_nll_after", "seconds"), 0.0)
        stats.update(remaining_nll_abs=0.0, remaining_nll_spread=0.0)
        outs = []
        for part in parts:
            drawn = resample_label_rows(
                self.model,
                self.spec,
                lp_f,
                part,
                rows,
                still,
                self.generator,
                max_bytes=self.memory_budget,
                plan=lambda nbytes: self._plan("emptied_label_resample", nbytes),
                weights=weights,
                max_row_evals=self.emptied_max_row_evals,
            )
            if isinstance(drawn, str):
                info["emptied_label_resample"] = f"not done: {drawn}"
                return None
            outs.append(drawn[0])
            share = part.shape[0] / sum(p.shape[0] for p in parts)
            for k, v in drawn[1].items():
                stats[k] += v if k == "seconds" else share * v
        rise = stats["remaining_nll_after"] - stats["remaining_nll_before"]
        # the safety net's unit (step.unit_of): the mean |NLL|, or where smaller the rows' spread of it (it was the
        # mean NLL alone, a looser limit than the safety net's wherever the rows' NLLs are alike)
        size, spread = stats.pop("remaining_nll_abs"), stats.pop("remaining_nll_spread")
        stats["remaining_nll_unit"] = unit_of(size, spread)
        info.update({f"emptied_label_resample_{k}": v for k, v in stats.items()})
        info["emptied_labels_before_resample"] = dict(info["emptied_labels"])
        info["emptied_label_max_probability_before_resample"] = max(info["emptied_labels"].values())  # a ledger scalar
        if not all(all_finite(o) for o in outs) or rise > self.control.max_nll_increase * stats["remaining_nll_unit"]:
            info["emptied_label_resample"] = (
                f"not kept: the remaining rows' mean NLL went from {stats['remaining_nll_before']:.4g} to "
                f"{stats['remaining_nll_after']:.4g}"
            )
            return None
        info["emptied_label_resample"] = "drawn: " + ",".join(map(str, still))
        # measured on every remaining row at every sample: no row sampling error in the summed NLL rises
        self.control.record_rise(rise, 0.0, stats["remaining_nll_unit"])
        log.info(
            "emptied label(s) %s: output-layer row(s) drawn from their conditional in %d sample(s) (acceptance %.2f, "
            "remaining NLL %.4g -> %.4g, %.2f s)",
            ",".join(map(str, still)), sum(p.shape[0] for p in parts), stats["acceptance"],
            stats["remaining_nll_before"], stats["remaining_nll_after"], stats["seconds"],
        )  # fmt: skip
        return outs[-1][0], (None if bank is None else outs[0])

    def _unread_rows_chunk(self) -> int:
        """Rows per pass of the unread embedding rows' check (:func:`mcmc_unlearner.unread.rows_read`, a no-grad
        forward pass, and :func:`~mcmc_unlearner.unread.rows_with_gradient`, a forward and backward pass): planned
        as a per-draw gradient is, ``GRAD_SAVED_FACTOR`` times what one call saves (``_call_cost``) beside the
        gradient's ``GRAD_COPIES`` copies of the parameters. What a call saves includes its largest outputs where
        the NLL keeps them for its backward pass (cross-entropy keeps the ``[rows, T, V]`` log-probabilities); the
        forward pass holds the logits beside them and the backward pass their gradients. Sized at once what a
        call saves, a 50,000-word head's 670-row chunks took +3067 MiB under a 1 GiB budget."""
        item = ParamSpec.params(self.model)[0].element_size()
        reserve = GRAD_COPIES * self.spec.dim * item + GRAD_SAVED_FACTOR * self._call_bytes
        per_row = GRAD_SAVED_FACTOR * (self._row_bytes or 1)
        from .unread import UNREAD_ROWS

        chunk = chunk_for(self.memory_budget, per_row, UNREAD_ROWS, reserve)
        self._plan("unread_embedding_rows", reserve + chunk * per_row)
        return chunk

    def _draw_unread_embedding_rows(
        self, batch: Batch, stream: _Stream, live: torch.Tensor, bank: torch.Tensor | None, info: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Draw the embedding rows that the removed rows read and no remaining row reads from the prior's
        conditional, in every stored sample and the live chain (:mod:`mcmc_unlearner.unread`, a Gibbs step of the
        retrained posterior; README step 6). Returns the samples, new tensors where rows were drawn (the ones given
        are not written into), else the ones given, and the flat indices of the entries drawn (``None``: none; the
        first-moment correction leaves them alone from then on, ``_Anchor.drawn``).

        ``info["embedding_rows"]`` says what was found and done wherever the removed rows read a row of a trainable
        ``nn.Embedding`` (not tied): ``"drawn: name[rows]"`` (``info["embedding_rows_drawn"]``, a dict of the rows,
        and ``embedding_rows_drawn_count``), ``"none unread"``, or ``"not checked: ..."`` (remaining rows that cannot
        be listed without a pass, as for the emptied label's draw; over ``UNREAD_MAX_ROWS``; and, said wherever the
        model has such an embedding and told before any pass over the data, ``torch.distributed`` and a custom
        ``energy=``, whose conditional ``log_prior`` need not be)
        or ``"not drawn: ..."`` (no ``log_prior``; a prior that is not measurably a Gaussian independent across
        the rows' entries, also warned about, naming the rows and the fix)."""
        from .unread import (
            UNREAD_MAX_ROWS,
            UnreadIndexError,
            draw_unread_rows,
            embedding_tables,
            rows_read,
            rows_with_gradient,
        )

        tables = embedding_tables(self.model, self.spec)
        if not tables:
            return live, bank, None
        # answers that no pass changes come before any: a forward pass over the removed rows (and one at a stored
        # sample) ran before these refused the draw anyway
        if self.custom_energy:
            # the posterior is exp(-energy): log_prior alone is not the conditional of a row no remaining row reads
            # (an energy weighting its prior 16x: rows drawn with sd 0.517 where its conditional's is 0.125)
            info["embedding_rows"] = (
                "not checked: a custom energy= defines the posterior, and the conditional of an embedding row no "
                "remaining row reads is the energy's, which log_prior need not be, so no row is drawn (pass nll= and "
                "log_prior= instead of energy= for the draw)"
            )
            return live, bank, None
        if self._reduce is not None:
            info["embedding_rows"] = "not checked: under torch.distributed (each rank holds part of the remaining rows)"
            return live, bank, None
        rows_f = functionalize(self.model, lambda m, *b: self._row_nll(m, b))
        removed = self._raw(batch)
        chunk = self._unread_rows_chunk()
        progress = _Ticker("embedding rows")
        try:
            read = rows_read(tables, rows_f, live, removed, chunk, progress=progress)
        except UnreadIndexError as e:
            info["embedding_rows"] = f"not checked: {e}, so which rows the removed rows read cannot be told"
            return live, bank, None
        if not any(bool(r.any()) for r in read):
            return live, bank, None

        def named(masks: Sequence[torch.Tensor]) -> dict[str, list[int]]:
            return {t.name: torch.nonzero(m).flatten().tolist() for t, m in zip(tables, masks) if bool(m.any())}

        def said(rows: dict[str, list[int]]) -> str:
            return ", ".join(f"{name}{r}" for name, r in rows.items())

        why = None
        if bank is not None and bank.shape[0]:
            # which rows are read must not depend on θ (a codebook looked up by nearest neighbour): the removed
            # rows read the same rows at another sample
            try:
                again = rows_read(tables, rows_f, bank[0], removed, chunk, progress=progress)
            except UnreadIndexError as e:
                again, why = read, f"not checked: {e}, so which rows the removed rows read cannot be told"
            if why is None and any(not torch.equal(a, b) for a, b in zip(read, again)):
                why = "not checked: which embedding rows the removed rows read depends on the parameters"
        count = None if why is not None else _listed_count(stream)
        if why is None and count is not None and count > UNREAD_MAX_ROWS:  # refused before the rows are copied
            why = f"not checked: more than {UNREAD_MAX_ROWS:,} remaining rows to read"
        listed = None if why is not None else _listed_remaining(stream)
        if why is None and listed is None:
            why = (
                "not checked: the remaining rows cannot be listed without a pass over the data (pass them as a tuple, "
                "a RemovableDataset, or a DataLoader over a TensorDataset), so whether any of them reads the rows "
                "the removed rows read cannot be told"
            )
        if why is None and int(listed[0].shape[0]) > UNREAD_MAX_ROWS:  # a source whose rows only listing counts
            why = f"not checked: more than {UNREAD_MAX_ROWS:,} remaining rows to read"
        if why is not None:
            info["embedding_rows"] = why
            return live, bank, None
        rows = self._raw(listed)
        try:
            kept = rows_read(tables, rows_f, live, rows, chunk, watch=read, progress=progress)
        except UnreadIndexError as e:
            info["embedding_rows"] = f"not checked: {e}, so which rows the remaining rows read cannot be told"
            return live, bank, None
        unread = [r & ~k for r, k in zip(read, kept)]
        if not any(bool(u.any()) for u in unread):
            info["embedding_rows"] = "none unread: a remaining row reads every embedding row the removed rows read"
            return live, bank, None
        # a weight also read outside its module (F.linear(h, emb.weight)) is read by every row: an exactly zero
        # gradient of the remaining rows' NLL along the row, too
        other = []
        for t, u in zip(tables, unread):
            if bool(u.any()):
                r = torch.nonzero(u).flatten()
                hit = rows_with_gradient(rows_f, live, rows, t.index(r), t.width, chunk, progress=progress)
                u[r[hit]] = False
                other.append((t.name, r[hit].tolist()))
        otherwise = {name: r for name, r in other if r}
        if otherwise:
            info["embedding_rows_read_otherwise"] = otherwise
        found = named(unread)
        if not found:
            info["embedding_rows"] = "none unread: the remaining rows' NLL depends on every row the removed rows read"
            return live, bank, None
        info["embedding_rows_unread"] = found
        if self.log_prior is None:
            info["embedding_rows"] = (
                f"not drawn: {said(found)} no remaining row reads, but without a log_prior (a flat prior) their "
                "conditional is improper"
            )
            return live, bank, None
        lp_f = functionalize(self.model, lambda m: self.log_prior(m))
        parts = [live[None]] if bank is None else [bank, live[None]]
        outs: list[list[torch.Tensor]] = [[p] for p in parts]
        drawn: dict[str, list[int]] = {}
        failed: dict[str, list[int]] = {}
        prior: dict[str, dict[str, float]] = {}
        drawn_index: list[torch.Tensor] = []
        for t, u in zip(tables, unread):
            if not bool(u.any()):
                continue
            index = t.index(torch.nonzero(u).flatten())
            results = [draw_unread_rows(lp_f, o[-1], index, self.generator) for o in outs]
            if any(r is None for r in results):
                failed[t.name] = found[t.name]
                continue
            for o, r in zip(outs, results):
                o[-1] = r[0]
            drawn[t.name] = found[t.name]
            drawn_index.append(index)
            prior[t.name] = results[-1][1]
        if failed:
            info["embedding_rows_not_drawn"] = failed
            warnings.warn(
                f"this request removes every row that reads embedding row(s) {said(failed)}: no remaining row reads "
                "them, so retraining leaves them at their prior, but log_prior is not measurably a Gaussian "
                "independent across their entries there, and they were not drawn from it: the influence step alone "
                "moved them, which puts them at the prior's mean only from a chain at equilibrium. Use a Gaussian "
                "prior on that weight, or continue the chain on the remaining data (run_chain), or retrain",
                stacklevel=outside_stacklevel(),
            )
        if not drawn:
            info["embedding_rows"] = (
                f"not drawn: log_prior is not measurably a Gaussian independent across the entries of {said(failed)}"
            )
            return live, bank, None
        info["embedding_rows"] = "drawn: " + said(drawn)
        info["embedding_rows_drawn"] = drawn
        info["embedding_rows_drawn_count"] = sum(len(r) for r in drawn.values())
        info["embedding_rows_prior"] = prior
        log.info("embedding row(s) no remaining row reads, drawn from the prior: %s", said(drawn))
        new_live = outs[-1][-1][0]
        return new_live, (None if bank is None else outs[0][-1]), torch.cat(drawn_index)

    def _not_plain_on(self, rows: Batch, link: dict[str, Any], weighted: bool = False) -> str | None:
        """Why ``nll`` is not the plain cross-entropy of the logits on ``rows`` (``rows_per_label``'s, at the live
        parameters), or ``None``. The likelihood was read on the removed rows, often of one label: a class-weighted
        cross-entropy whose weights are 1 on the labels probed there read as plain, and the draw took the unweighted
        conditional. ``link``: the likelihood's extras; ``weighted``: the cross-entropy times the row weights they
        give (:func:`~.kronecker.row_weights`)."""
        from .kronecker import cross_entropy_misfit, rows_per_label

        sub = rows_per_label(rows)
        if sub is None:
            return None
        return cross_entropy_misfit(
            self.model,
            lambda m, b: self._row_nll(m, b).double(),  # a result that is not a tensor: "could not be compared"
            sub,
            link,
            failed="nll could not be compared with the cross-entropy on the remaining rows ({})",
            differs=(
                "nll is not the row-weighted cross-entropy found on the removed rows, on the remaining rows"
                if weighted
                else "nll is not the plain cross-entropy of the logits on the remaining rows (e.g. per-class weights "
                "on labels the removed rows do not carry), and the draw's conditional is a plain cross-entropy's"
            ),
            plain=not weighted,
            flatten=True,
        )

    def _weighted_link_on(self, rows: Batch, link: dict[str, Any]) -> dict[str, Any] | None:
        """The extras of a row-weighted cross-entropy (class weights, a weight field, a constant factor:
        ``_WEIGHTED_LINK``) that ``nll`` is on ``rows_per_label(rows)``, read from the same output as ``link``; or
        ``None`` (another loss there, or the plain one)."""
        from .kronecker import Likelihood, likelihood_and_columns, rows_per_label

        sub = rows_per_label(rows)
        if sub is None:
            return None
        try:
            kind, extra, _ = likelihood_and_columns(self.model, self._row_nll, sub)
        except Exception:  # a probe: nll fails or gives no value per row there, no cross-entropy the draw can weigh
            return None
        if kind is not Likelihood.CATEGORICAL or not set(extra) <= _WEIGHTED_LINK or set(extra) <= {"output"}:
            return None
        return extra if extra.get("output") == link.get("output") else None

    def _remaining_labels(self, stream: _Stream) -> torch.Tensor | None:
        """The second field (labels) of every remaining row, read without a pass over the data: from a
        ``RemovableDataset`` (or the rows given as a tuple), a listable source, or a ``DataLoader`` over tensors or
        a dataset with torchvision's ``targets`` (:func:`_loader_labels`); ``None`` where they cannot be read so."""
        src = stream.source
        if isinstance(getattr(src, "tensors", None), tuple) and hasattr(src, "remaining_ids"):
            return self._kept_labels(stream)  # the labels alone: not a copy of every remaining row
        if stream.listable:
            return self._raw(stream.full())[1]
        return stream.once("loader_labels", lambda: _loader_labels(src))

    @staticmethod
    def _kept_labels(stream: _Stream) -> torch.Tensor:
        """The labels (second tensor) of the rows a ``RemovableDataset`` (or the rows given) still holds, gathered
        once per request: the label-range check and the emptied-label check both read them (they were gathered
        twice: 0.2 ms CPU each on 54k rows)."""
        src = stream.source
        return stream.once("kept_labels", lambda: src.tensors[1][src.remaining_ids])

    def _check_remaining_labels(self, batch: Batch, stream: _Stream) -> None:
        """Refuse, before the request's work, remaining data holding a class label ``nll`` cannot read, naming the
        row, the label, the output's width and the fix. The remaining labels are read as the emptied-label check
        reads them, without a pass over the rows (:meth:`_remaining_label_rows`); the labels the removed rows hold
        (their ``nll`` was read) and those read before pass; for each other value (at most ``LABEL_RANGE_PROBES``,
        largest first) ``nll`` is evaluated on its first row, and torch's "Target 9 is out of bounds." there is
        refused (any other outcome passes: a label ``ignore_index`` skips, a count regression's target). Stop 62's
        probe: label 9 of a 4-class model past the first minibatch's first rows failed with torch's bare
        ``IndexError`` from inside the curvature build, 1.6 s CPU into the request. Single-process; a model in
        training mode with buffers (a forward would update them) is left to the request."""
        raw = self._raw(batch)
        y = raw[1] if len(raw) > 1 else None
        if self._reduce is not None or not _integer_rows(y) or not y.numel():
            return
        located = self._remaining_label_rows(stream)
        if located is None:
            return
        left, row_of = located
        if not _integer_rows(left) or not left.numel():
            return
        left = left.long()
        read = torch.tensor(sorted(self._labels_read | set(torch.unique(y.long()).tolist())), dtype=torch.long)
        unseen = ~torch.isin(left, read)
        odd = ((left > read.max()) | (left < 0)) & unseen
        below = unseen & (left >= 0) & (left < read.max())
        if bool(below.any()):
            # one value read beyond the output's width is an ignore_index (255), not a class: it bounds nothing
            # below it (a review: with 255 read, label 9 of a 4-class output was left to torch's bare error)
            width = self._label_width(batch)
            if width and int((read >= width).sum()) == 1:
                odd |= below & (left >= width)
        if not bool(odd.any()):
            return
        if any(m.training and next(m.buffers(recurse=False), None) is not None for m in self.model.modules()):
            return
        for value in torch.unique(left[odd]).flip(0)[:LABEL_RANGE_PROBES].tolist():
            where = ""
            try:  # (the row read inside the guard too: a dataset's random transform draws from the global RNG)
                with self._check_guard(), torch.no_grad():
                    row, where = row_of(int(torch.nonzero(left == value)[0, 0]))
                    self.nll(self.model, row)
            except Exception as exc:  # a probe of the label alone: any other failure is left to the request
                if _label_out_of_bounds(exc) is not None:
                    raise IndexError(self._label_refusal(value, where, batch)) from exc
                continue
            self._labels_read.add(value)

    def _remaining_label_rows(self, stream: _Stream) -> tuple[torch.Tensor, Callable[[int], tuple[Batch, str]]] | None:
        """The remaining rows' labels where they are read without a pass (a ``RemovableDataset``, the rows or a
        list of minibatches given, read as its rows or as minibatches, a ``DataLoader`` over a ``TensorDataset`` or a
        dataset with torchvision's ``targets``), with a function giving the row at a position of them as a one-row
        batch and where it is; ``None`` for other sources."""
        src = stream.source
        parts = _minibatch_list(src)  # a list read as minibatches (n_remaining= counts other rows, or a row repeats)
        if parts is not None:
            if len(parts[0]) < 2:
                return None
            starts = list(itertools.accumulate((int(b[0].shape[0]) for b in parts), initial=0))

            def in_list(i: int) -> tuple[Batch, str]:
                b = bisect.bisect_right(starts, i) - 1
                r = i - starts[b]
                return tuple(t[r : r + 1] for t in parts[b]), f"in row {r} of minibatch {b} of the remaining list"

            # (labels of a list read as a sample of a larger set: checked for their range only, not for which remain)
            return torch.cat([b[1] for b in parts]), in_list
        tensors = getattr(src, "tensors", None)
        if isinstance(tensors, tuple) and hasattr(src, "remaining_ids"):
            if len(tensors) < 2:
                return None
            ids, sizes = src.remaining_ids, stream.joined_sizes
            starts = list(itertools.accumulate(sizes, initial=0)) if sizes else None

            def in_rows(i: int) -> tuple[Batch, str]:
                j = int(ids[i])
                if starts is not None:
                    b = bisect.bisect_right(starts, j) - 1
                    where = f"in row {j - starts[b]} of minibatch {b} of the remaining list, row {j} of its rows"
                else:
                    where = f"in row {j} of the remaining rows" if stream.from_rows else f"in the row with id {j}"
                return tuple(t[j : j + 1] for t in tensors), where

            return self._kept_labels(stream), in_rows
        labels = stream.once("loader_labels", lambda: _loader_labels(src))
        if labels is None:
            return None
        dataset, index = _loader_selection(src)

        def in_loader(i: int) -> tuple[Batch, str]:
            j = i if index is None else int(index[i])
            row = _as_batch(torch.utils.data.default_collate([dataset[j]]), "a remaining-data row")
            # (j indexes the dataset under the loader's Subsets, as _loader_selection unwraps them)
            under = "the DataLoader's dataset"
            if dataset is not src.dataset:
                under = "the dataset under the DataLoader's Subset"
            return row, f"in row {j} of {under}"

        return labels, in_loader

    def _label_width(self, batch: Batch) -> int | None:
        """The model's output width as the removed rows ``batch`` show it (their ``nll`` was read); ``None`` where
        it cannot be read."""
        try:
            return self._likelihood_probe(self._raw(batch))[2]
        except Exception:
            return None

    def _likelihood_probe(self, raw: Batch) -> tuple[Any, dict[str, Any], int | None]:
        """:func:`~mcmc_unlearner.kronecker.likelihood_and_columns` on the rows ``raw`` (the likelihood, its extras,
        the output's width), probed once a request: the label-range check (twice where it refuses), the first
        request's label probe and the later-label check each probed the same removed rows (each probe runs ``nll``
        several times and the model once, firing a user's hooks). Kept for the same tensors only (held weakly),
        until the next request."""
        from .kronecker import likelihood_and_columns

        memo = self._probed
        if memo is not None and len(memo[0]) == len(raw) and all(r() is t for r, t in zip(memo[0], raw)):
            return memo[1]
        found = likelihood_and_columns(self.model, self._row_nll, raw)
        self._probed = ([weakref.ref(t) for t in raw], found)
        return found

    def _label_refusal(self, label: int, where: str, batch: Batch) -> str:
        """The refusal of a remaining row whose class ``label`` ``nll`` cannot read (torch's "Target 9 is out of
        bounds."), found in ``where``: the output's width where the removed rows ``batch`` show it, and the fix."""
        width = self._label_width(batch)  # for the message only: the refusal stands without it
        wide = f"the model's output has {width} classes (labels 0 to {width - 1})" if width else "no such class"
        return (
            f"the remaining data holds class label {label} ({where}), which nll cannot read: {wide}, and torch said "
            f"'Target {label} is out of bounds.'. Fix the label (or leave the row out of the remaining data), or "
            "give the model as many outputs as the data has classes, as the chain was sampled (a DataLoader over a "
            "TensorDataset, a list of minibatches or the rows (x, y) have their labels checked before the request's "
            "work, the row named); nothing was changed"
        )

    def _spread_label_width(self, removed: Batch) -> int | Literal[False] | None:
        """Whether the spread rule (``info["removed_labels_spread"]``) may read ``batch[1]`` as the class labels, as
        the emptied-label check decides it: ``False`` where a batch of three or more fields has ``batch[1]`` not
        verified as the labels (``nll`` no cross-entropy of ``model(batch[0])`` reading it) and a later integer
        ``[B]`` field may hold them (stop 61's probe: a GRU's ``(x, lengths, y)``, the lengths read as the labels,
        said a class removal's rows were spread like the remaining rows'); else the output's width, an integer
        target above which is no label (a count regression's), where it is known; else ``None``. ``(x, y)`` batches
        are read as before, without a probe."""
        raw = self._raw(removed)
        if len(raw) < 3 or not _integer_rows(raw[1]):
            return None
        self._probe_labels(raw)
        if self._categorical or self._plain_categorical:
            return None
        return False if any(_integer_rows(f) for f in raw[2:]) else self._label_columns

    def _label_counts(
        self, removed: Batch, rows: Batch, width: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The removed rows' and the check's remaining rows' integer labels (field 1, one non-negative integer per
        row) counted per label, summed over ranks; ``None`` when either has no such labels (on any rank), or one is
        above ``width``, the model output's (no label then: a count regression's target)."""
        r = self._raw(removed)
        ys = [b[1] if len(b) > 1 else None for b in (r, rows)]
        fits = all(_integer_rows(y) and (y.numel() == 0 or int(y.min()) >= 0) for y in ys)
        top = max((int(y.max()) for y in ys if fits and y.numel()), default=-1)
        agreed = self._reduce_max(torch.tensor([0.0 if fits else 1.0, float(top)], dtype=torch.float64))
        labels = int(agreed[1]) + 1
        if bool(agreed[0] > 0) or not 1 < labels <= 100_000 or (width is not None and labels - 1 > width):
            return None
        counts = torch.stack([torch.bincount(y.cpu(), minlength=labels) for y in ys]).double()
        if self._reduce is not None:
            counts = self._reduce(counts)
        return counts[0], counts[1]

    def _removed_rows_kept(self, batch: Batch, stream: _Stream, check_rows: Batch, n: int, info: dict) -> None:
        """Warn where the remaining data seem still to hold the removed rows (``remove`` takes the data after the
        removal): at least ``KEPT_ROWS_SHARE`` of the removed rows found among every remaining row given as a tuple,
        or, for other sources, among the check's rows at least half as many as a sample of that size from data
        still holding them would show. Fewer coinciding by value (real data repeat rows: a Markov chain's states)
        are noted in ``info["removed_rows_coinciding"]`` alone (every such match was warned about: a passage of a
        Markov-chain text, 9 of its 30 rows repeating rows kept elsewhere)."""
        removed, k = self._raw(batch), int(batch[0].shape[0])
        every = stream.given is not None
        held = _removed_rows_held(removed, self._raw(stream.given) if every else check_rows)
        if not held:
            return
        m = int(check_rows[0].shape[0])
        expected = k if every else k * min(1.0, m / max(n, 1))  # where the removed rows were left in
        where = "every remaining row given" if every else f"the {m:,} remaining rows the safety check drew"
        if held >= (KEPT_ROWS_SHARE if every else 0.5) * expected:
            said = "" if every else f" (data still holding every removed row would show about {expected:.3g})"
            warnings.warn(
                f"rows identical to removed rows are among {where}: {held} of the {k} removed rows{said}. "
                "remove(rows, remaining) takes the data after the removal, so the remaining data seem still to hold "
                "the removed rows (their influence is then only partly removed). Leave them out of the remaining "
                "data, or use forget(ids, RemovableDataset), which removes them",
                stacklevel=outside_stacklevel(),
            )
        else:  # rows the data hold more than once, by value: not a sign of rows left in
            info["removed_rows_coinciding"] = {"rows": held, "removed": k, "compared": where}
            log.info("%d of the %d removed rows equal, by value, rows among %s", held, k, where)

    def _check_row_count(self, n: int) -> int:
        """The rows the safety check reads of ``n`` remaining: ``check_rows``, at most 4 passes over them (the default
        256 always): check_rows=10**7 over 195 rows read 10**7 repeated rows (3.2 GB, still running after 25 s)."""
        return min(self.check_rows, max(4 * n, 256))

    def _check_rows(self, stream: _Stream, m: int, screen: int) -> tuple[Batch, int]:
        """The safety check's rows (whole minibatches holding at least ``m`` rows) and how many of them, the first,
        its screen measures (``screen``; the data-parallel version: this rank's share of both)."""
        return self._raw(stream.rows(m)), screen

    def _check_second_derivatives(self, h_f: Callable, theta: torch.Tensor, batch: Batch, info: dict) -> None:
        """Warn when the removed rows' Hessian product by autograd disagrees with finite differences of their
        gradient (:func:`~mcmc_unlearner.curvature.second_derivative_gap`; one random direction from a private
        generator, three gradients and one product)."""
        v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(theta)
        try:
            gap = second_derivative_gap(h_f, theta, batch, v / v.norm())
        except (RuntimeError, NotImplementedError, TypeError):
            return
        if gap is not None and gap > 0.25:
            info["second_derivatives"] = f"autograd's Hessian products differ from finite differences by {gap:.2g}"
            gap_said = (
                f"the model's second derivatives by autograd differ from finite differences of its gradient (relative "
                f"gap {gap:.2g} along a random direction)"
            )
            hooks = _backward_hooks(self.model)
            if hooks:
                # a backward hook that rescales gradients was blamed on "a custom torch.autograd.Function"
                why = (
                    f"{gap_said}, and the model has backward hooks ({', '.join(hooks)}): a hook that changes "
                    "gradients makes them differ from the derivatives of the model's energy, and double backward does "
                    f"not follow the change, so the removed points' gradient and the {self.solver.value} backend's "
                    "Hessian products are not those of the model. Remove the hooks while unlearning (handle.remove()) "
                    "or make them leave the gradients unchanged"
                )
            else:
                why = (
                    f"{gap_said}: something in the model is not differentiable twice through autograd, e.g. a custom "
                    "torch.autograd.Function whose backward runs under no_grad or detaches, so the "
                    f"{self.solver.value} backend's Hessian products miss those terms. Make the backward "
                    "differentiable (or give the Function a jvp), or use solver='kfac' or 'ggn', which need first "
                    "derivatives only"
                )
            warnings.warn(why, stacklevel=outside_stacklevel())

    def _unresolved(self, check: EnergyCheck, G: torch.Tensor) -> str | None:
        """Why a request whose search damped its step below the parameters' resolution has no effect the safety
        check can resolve, or ``None``: the least damped step's predicted change of the remaining-data energy is
        within two of the standard errors with which the check measures that very step, and the change the check
        measured there is within :data:`UNRESOLVED_MEASURED_Z` of them, less the rounding (a few rows from many: the
        check cannot tell the influence step from no step, so the search damps it on noise). Such a request changes
        nothing measurable and is not refused for it (``quality_problems``); one more check measurement. A least
        damped step whose measured change is clear (the quick matrix's LeNet-5, seed 1: K-FAC's undamped step raised
        the energy by 5.0·10⁸ ± 3.7·10⁷ against a predicted −7.1·10⁴) was rejected on a measurement, not on noise: a
        search that then damps its step away has not found an effect too small to measure, and the request is
        refused as changing nothing."""
        floor = self.curvature.min_damping()
        lam = floor * 1.5 if floor > 0 else 0.0
        try:
            x0 = self.curvature.solve(G, lam).x
        except (NegativeCurvatureError, SolverDivergedError):  # no least damped step to measure: the gate decides
            return None
        if not all_finite(x0):
            return None
        pred = -float(G @ x0) + 0.5 * self.curvature.quad(x0)
        meas = check(x0)
        res = meas.resolution if math.isfinite(meas.resolution) else 0.0  # (a change below it is rounding)
        if not (
            math.isfinite(meas.stderr)
            and abs(pred) <= 2.0 * meas.stderr
            and abs(meas.actual) <= res + UNRESOLVED_MEASURED_Z * meas.stderr
        ):
            return None
        return (
            f"the removal's effect is below what the safety check resolves: the least damped step (damping "
            f"{lam:.3g}) predicts a change of the remaining-data energy of {pred:.3g}, within two of the standard "
            f"errors ({meas.stderr:.3g}) with which the check measures that step; the step taken changes nothing "
            "measurable (more check rows, check_rows, would resolve it)"
        )

    def _report(
        self,
        batch: Batch,
        n: int,
        outcome: StepOutcome,
        x: torch.Tensor,
        x_dev: torch.Tensor,
        g_thetas: torch.Tensor | _BankRows,
        c_thetas: torch.Tensor,
        expectation: Expectation,
        info: dict[str, Any],
    ) -> RemovalReport:
        res = outcome.solve
        return RemovalReport(
            n_removed=batch[0].shape[0],
            n_remaining=n,
            solver=self.solver.value,
            iterations=res.iterations,
            residual=res.residual,
            converged=bool(res.converged and res.residual <= self.tol),
            shift_norm=float(x.norm()),
            # one distinct draw (a bank of one sample): no second draw to estimate the Monte-Carlo error from
            shift_stderr=float(x_dev.norm()) if _distinct_draws(g_thetas) else math.nan,
            seconds=0.0,
            n_draws=g_thetas.shape[0],
            n_curvature_draws=c_thetas.shape[0],
            bank_size=0 if self.bank is None else self.bank.shape[0],
            expectation=expectation.value,
            hessian=self.hessian.value,
            bank_shift=self.bank_shift.value,
            hessian_products=self.curvature.products,
            damping=outcome.damping,
            damping_trials=len(outcome.history),
            damping_relative=outcome.damping / outcome.scale if outcome.damping > 0 else 0.0,
            step_shortfall=outcome.shortfall(),
            step_length=outcome.length,
            predicted_change=outcome.predicted,
            actual_change=outcome.actual,
            actual_stderr=outcome.stderr,
            model_ratio=outcome.ratio,
            remaining_nll_change=outcome.nll_change + _spread_nll_change(info),
            safe=outcome.safe,
            info=info,
        )

    def _full_or_remaining_operator(
        self, e_f: Callable, h_f: Callable, thetas: torch.Tensor, data: Batch, shared: bool, removed: Batch
    ) -> Any:
        op = self._operator(e_f, thetas, data, shared)
        if self.hessian is HessianKind.FULL:
            op = op + self._operator(h_f, thetas, removed, True)
        return op

    def _error_bar(self, dev: torch.Tensor, damping: float) -> torch.Tensor:
        """``(H + λ)⁻¹·dev`` for the Monte-Carlo error bar (the backend's cheapest answer, e.g. CG's
        preconditioner); ``nan`` if that solve fails (the error bar is advisory)."""
        try:
            return self.curvature.approximate_solve(dev, damping)
        except SolverDivergedError:
            return torch.full_like(dev, float("nan"))

    def _sample_shift_chunk(self) -> int:
        """Samples ``bank_shift="sample"`` solves at once: all (with the live draw) when their
        ``SAMPLE_SHIFT_COPIES`` copies fit the budget, else as many as fit beside ``SAMPLE_SHIFT_RESERVE`` copies
        of the bank (at least 1; :meth:`_propose` refuses a budget that holds not even that)."""
        if self.bank is None:
            return 1
        total = self.bank.shape[0] + 1
        row = self.bank.shape[1] * self.bank.element_size()
        if SAMPLE_SHIFT_COPIES * total * row <= self.memory_budget:
            return total
        reserve = SAMPLE_SHIFT_RESERVE * total * row
        return chunk_for(self.memory_budget, SAMPLE_SHIFT_COPIES * row, total - 1, reserve)

    def _shift(
        self,
        live: torch.Tensor,
        x: torch.Tensor,
        damping: float,
        h_f: Callable,
        batch: Batch,
        info: dict[str, Any],
        length: float = 1.0,
        check: EnergyCheck | None = None,
        before: tuple[float, float, float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The live draw and bank moved by the common step ``x`` and, as ``bank_shift`` says, their spread (checked
        by :meth:`_spread_refused`; ``before``: the common step's held-rows NLL rise, its standard error and
        unit)."""
        if self.bank_shift is BankShift.MEAN:
            return live + x, (None if self.bank is None else self.bank + x)
        # the spread's NLL change is paired with the common step's on the same rows and draws where ``x`` is the step
        # the safety net judged (``before``); further Newton steps moved it on (the review of stop 52: the pairing
        # then read a correlation of -0.50 off the whole move and applied it to the first step's error)
        paired = int(info.get("newton_steps_taken", 1)) <= 1
        if self.bank_shift is BankShift.SAMPLE:
            # each sample's own influence about the common shift x: x is what the check measured and carries the
            # further Newton steps and the carried influence of earlier requests, which per-sample gradients of the
            # removed rows alone would drop
            step = self._sample_shift_chunk()
            pts = live[None] if self.bank is None else torch.cat([live[None], self.bank])
            row = pts.shape[1] * pts.element_size()  # the samples' copies as _sample_shift_chunk plans them
            held = (
                SAMPLE_SHIFT_COPIES * row * pts.shape[0]
                if step >= pts.shape[0]
                else (SAMPLE_SHIFT_RESERVE * pts.shape[0] + SAMPLE_SHIFT_COPIES * step) * row
            )
            self._plan("sample_shift", held)
            if step >= pts.shape[0]:  # every sample at once (within the budget): as always
                g_all = self._per_draw_grads(h_f, pts, batch, rowwise=True)
                own = self.curvature.solve(g_all.T, damping).x.T
                mean = own[1:].mean(0) if self.bank is not None else own[0]
                moved = pts + x + length * (own - mean)
            else:  # ``step`` samples at a time: their gradients, solve and move, beside one [S+1, D] result
                info["bank_shift_chunks"] = math.ceil(pts.shape[0] / step)
                moved = torch.empty_like(pts)
                for s0 in range(0, pts.shape[0], step):
                    g = self._per_draw_grads(h_f, pts[s0 : s0 + step], batch, rowwise=True)
                    moved[s0 : s0 + step] = self.curvature.solve(g.T, damping).x.T
                    del g
                mean = moved[1:].mean(0)
                for s0 in range(0, pts.shape[0], step):  # the same elementwise steps as above, in place
                    own = moved[s0 : s0 + step]
                    own.copy_(pts[s0 : s0 + step] + x + length * (own - mean))
                del own
            if check is not None and self.bank is not None:
                # each sample's own term was applied unmeasured until stop 46 (a digits MLP, 150 random rows: the
                # remaining rows' NLL over every sample +22-76%, every check passed)
                # at more draws than the check's 8: each sample's own term is what is measured, and 8 draws read a
                # digits MLP's rise as +0.014 ± 0.0055 on an NLL of 0.095 (within the tolerance), 32 as +0.016 ± 0.004
                idx = _evenly(self.bank.shape[0], max(check.thetas.shape[0], SPREAD_CHECK_DRAWS))
                base = self.bank[idx] + x
                refused = self._spread_refused(
                    check, moved[idx + 1], base, None, info, "per-sample", before, self.bank[idx] if paired else None
                )
                if refused is not None:
                    info["bank_shift_fallback"] = f"mean shift: {refused}"
                    return live + x, self.bank + x
            return moved[0], (moved[1:] if self.bank is not None else None)
        assert isinstance(self.curvature, DenseBackend)
        # the exact Gaussian transport from the old to the new precision: undamped when both are positive definite
        # (the damping regularises the step, it is not part of the posterior), else with the step's damping; applied
        # to the rows it moves at once (the check's draws, the live draw, the bank), the [D, D] matrix never formed
        ref = self.bank if self.bank is not None else live[None]
        mu = ref.mean(0)
        checked = check is not None and self.bank is not None
        k_thetas = _as_tensor(check.thetas) if checked else None
        parts = (
            ([k_thetas - mu] if checked else [])
            + [(live - mu)[None]]
            + ([self.bank - mu] if self.bank is not None else [])
        )
        rows = torch.cat(parts)
        try:
            try:
                moved = self.curvature.transport_rows(0.0, rows)
            except NegativeCurvatureError:
                if damping <= 0:
                    raise
                moved = self.curvature.transport_rows(damping, rows)
                info["bank_shift_damped"] = damping
        except NegativeCurvatureError as exc:
            # no Gaussian to transport between (an indefinite precision, e.g. a mixture's): move by the mean shift
            info["bank_shift_fallback"] = f"mean shift: {exc}"
            return live + x, (None if self.bank is None else self.bank + x)
        finally:
            self.curvature.release_transport()  # the old Hessian's eigenvectors: no further use
        n_check = parts[0].shape[0] if checked else 0
        refused = None
        if checked:
            delta, Tdelta = parts[0], moved[:n_check]
            refused = self._spread_refused(
                check, mu + x + Tdelta, k_thetas + x, (delta, Tdelta), info, "Gaussian", before,
                k_thetas if paired else None,
            )  # fmt: skip
        if refused is not None:
            info["bank_shift_fallback"] = f"mean shift: {refused}"
            return live + x, self.bank + x
        new_live = mu + x + moved[n_check]
        new_bank = mu + x + moved[n_check + 1 :] if self.bank is not None else None
        return new_live, new_bank

    def _spread_refused(
        self,
        check: EnergyCheck,
        moved: torch.Tensor,
        base: torch.Tensor,
        deltas: tuple[torch.Tensor, torch.Tensor] | None,
        info: dict[str, Any],
        kind: str,
        before: tuple[float, float, float] | None = None,
        start: torch.Tensor | None = None,
    ) -> str | None:
        """Why the bank's spread is not moved as ``bank_shift`` says (``None``: it is), measured at the check's draws
        and held rows: the remaining-data energy and the rows' NLL at the draws so moved (``moved``) against at the
        draws moved by the checked common step alone (``base``). The common step is what the safety check measured;
        the spread's move was applied unmeasured until stop 46: on a Poisson regression network the Gaussian
        transport raised the remaining rows' energy by 38 ± 4 where the curvature predicted -4 (test NLL 1.67 → 1.85,
        retraining 1.73), and ``bank_shift="sample"`` raised a digits MLP's remaining rows' NLL by 22-76%, every
        check passed. Refused (the common step then moves every sample) where

        * for ``bank_shift="sample"``'s terms (no prediction), the held rows' NLL rises by more than the safety
          net's ``max_nll_increase`` of its size beyond two standard errors (the transport widens the samples, and
          the held rows' NLL rises as much as it should: +5% on a conjugate regression losing half its rows), or
        * for the Gaussian transport (``deltas``: ``δ_s = θ_s − μ`` and ``Tδ_s``), the energy rises beyond what the
          curvature predicts, ``½ E_s[(Tδ_s)ᵀA'(Tδ_s) − δ_sᵀA'δ_s]`` (about 0 on a Gaussian posterior, where the
          transport is exact), by more than ``TRANSPORT_Z`` standard errors and ``TRANSPORT_SLACK`` of the spread's
          energy ``½ E_s[δ_sᵀA'δ_s]``, or
        * for either, with ``before`` (the common step's held-rows NLL rise as the net judged it, its standard error
          and the net's unit), the combined rise (the common step's plus the spread's, less the prior's credit where
          the spread's move lowers the prior's energy) exceeds the safety net's limit,
          ``max_nll_increase`` of the unit plus two standard errors (measured again on further rows: the point
          estimate beyond the allowance, as the net's second measurement): the move applied is the two together (a
          mixture of experts: the common step -0.012, the transport +0.044, every row and sample +0.058 of 1.11, the
          transport judged on the energy alone).

        The combined rise's standard error joins the two with their correlation, read from the common step's own
        per-row and per-draw NLL changes (``base`` against the unmoved draws ``start``) paired with the spread's on
        the same rows and draws: both are measured there, so their errors are correlated (a spread move that undoes
        part of the common step row by row was judged with the two errors in quadrature, too wide: 2.2x where it
        undid half; one that repeats it, too narrow). Without ``start`` they are taken as independent.

        A measurement not clear on the check's rows is repeated with the safety net's further rows (read then).
        ``info["spread_check"]`` records the measurement, the combined rise (``combined_nll_rise``,
        ``combined_nll_stderr``, ``combined_nll_correlation``) and whether the move was ``applied``.
        """
        predicted = spread = None
        if deltas is not None:
            A = getattr(self.curvature, "A_new", None)
            if A is None:
                return None
            A64 = A.double()
            delta, Tdelta = (d.double() for d in deltas)
            quad_new = 0.5 * torch.einsum("sd,de,se->s", Tdelta, A64, Tdelta)
            quad_old = 0.5 * torch.einsum("sd,de,se->s", delta, A64, delta)
            predicted, spread = float((quad_new - quad_old).mean()), float(quad_old.abs().mean())
        n, K = check.n, moved.shape[0]
        with torch.no_grad():
            if check.lp is not None:
                prior = torch.stack([-check.lp(a) + check.lp(b) for a, b in zip(moved, base)]).double()
            else:
                prior = torch.zeros(K, dtype=torch.float64)

        limit_nll = self.control.max_nll_increase
        b_rise, b_se, b_scale = before if before is not None else (math.nan, math.nan, math.nan)
        joined = all(math.isfinite(v) for v in (b_rise, b_se, b_scale))

        def mean_se(E: torch.Tensor) -> tuple[float, float]:
            """The mean of per-draw, per-row changes ``E`` ([K, m]) and its standard error (rows' and draws' parts)."""
            per_row = E.mean(0)
            sums = check.reduce(torch.stack([per_row.new_tensor(float(E.shape[1])), per_row.sum(), (per_row**2).sum()]))
            m = max(float(sums[0]), 1.0)
            mean = float(sums[1]) / m
            var = max(float(sums[2]) / m - mean**2, 0.0) / max(m - 1, 1)
            if K > 1:
                var += float((check.reduce(E.sum(1)) / m).var()) / K
            return mean, math.sqrt(var)

        def measure(rows: Batch) -> tuple[float, float, float, float, float, float]:
            parts = check.row_parts(rows)

            def h(t: torch.Tensor) -> torch.Tensor:
                return torch.cat([check.f(t, *p) for p in parts]).double()

            with torch.no_grad():
                hb = torch.stack([h(b) for b in base])  # [K, m]
                D = torch.stack([h(a) for a in moved]) - hb  # each held row's NLL change, moved against base
                # the common step's own change on these rows and draws, paired with the spread's
                B = hb - torch.stack([h(s) for s in start]) if joined and start is not None else None
            per_row = D.mean(0)
            sums = check.reduce(torch.stack([per_row.new_tensor(float(D.shape[1])), per_row.sum(), (per_row**2).sum()]))
            m = max(float(sums[0]), 1.0)
            draws = n * check.reduce(D.sum(1)) / m + prior  # [K]: each draw's energy change
            row_mean = float(sums[1]) / m
            row_var = max(float(sums[2]) / m - row_mean**2, 0.0) / max(m - 1, 1)
            draw_var = float(draws.var()) / K if K > 1 else 0.0
            nll_se = math.sqrt(row_var + float((draws - prior).var()) / (K * n * n) if K > 1 else row_var)
            unit = nll_unit(hb, check.reduce)[1]  # the safety net's unit: a constant in nll does not loosen it
            corr = 0.0
            if B is not None:  # the correlation of the two measured changes' errors, from their paired values
                se_b, se_d, se_c = mean_se(B)[1], nll_se, mean_se(B + D)[1]  # nll_se: mean_se(D)'s, as above
                if se_b > 0 and se_d > 0:
                    corr = min(max((se_c**2 - se_b**2 - se_d**2) / (2 * se_b * se_d), -1.0), 1.0)
            return float(draws.mean()), math.sqrt(draw_var + n * n * row_var), row_mean, nll_se, unit, corr

        credit = min(float(prior.mean()) / n, 0.0) if K else 0.0  # as the net credits the prior's fall

        def combined(meas: tuple[float, float, float, float, float, float]) -> tuple[float, float]:
            rise, rise_se, corr = meas[2], meas[3], meas[5]
            if not joined:
                return rise + credit, rise_se
            return b_rise + rise + credit, math.sqrt(max(b_se**2 + rise_se**2 + 2 * corr * b_se * rise_se, 0.0))

        def verdict(meas: tuple[float, float, float, float, float, float], again: bool = False) -> tuple[bool, bool]:
            energy, stderr, rise, rise_se, scale, _ = meas
            total, total_se = combined(meas)
            # the safety net's rule on the move applied, the common step's and the spread's together (measured
            # again: its point estimate within the allowance, as the net's second measurement)
            joint = joined and total > limit_nll * b_scale + (0.0 if again else 2 * total_se)
            joint_unclear = joined and total > limit_nll * b_scale and not joint
            # the NLL rule judges a move the curvature has no prediction for (bank_shift="sample"): the Gaussian
            # transport widens the samples, raising the held rows' NLL by as much as it should (a conjugate
            # regression, d = 40, half its rows removed: +0.05 ± 0.005 of 1, the exact answer; stop 46's review)
            net = predicted is None and rise - 2 * rise_se > self.control.max_nll_increase * scale
            excess = None if predicted is None else energy - predicted
            model = excess is not None and excess > TRANSPORT_Z * stderr and excess > TRANSPORT_SLACK * spread
            unclear = (predicted is None and rise > self.control.max_nll_increase * scale and not net) or (
                excess is not None and excess > stderr and excess > TRANSPORT_SLACK * spread and not model
            )
            return net or model or joint, unclear or joint_unclear

        meas = measure(check.rows)
        refused, unclear = verdict(meas)
        again = False
        if unclear:  # not clear on the check's rows (a per-row change is heavy-tailed): again with further rows
            more = (  # further rows only: without them the second measurement read the check's own (stop 50)
                None
                if check.confirm_rows is None
                else (check._confirm[0] if check._confirm is not None else check.confirm_rows())
            )
            if more is not None:
                meas = measure(tuple(torch.cat([a, b]) for a, b in zip(check.rows, more)))
                refused, _ = verdict(meas, again=True)
                again = True
        energy, stderr, rise, rise_se, scale, corr = meas
        total, total_se = combined(meas)
        info["spread_check"] = {
            "kind": kind, "energy_change": energy, "energy_stderr": stderr, "predicted": predicted,
            "spread_energy": spread, "nll_change": rise, "nll_stderr": rise_se, "nll_scale": scale,
            "nll_rise": rise + credit, "combined_nll_rise": total, "combined_nll_stderr": total_se,
            "combined_nll_correlation": corr if joined and start is not None else math.nan,  # nan: not paired
            "applied": not refused, "measured_again": again,
        }  # fmt: skip
        if not refused:
            return None
        said = f"the held rows' NLL {rise:+.4g} ± {rise_se:.2g} (of {scale:.4g})"
        if predicted is not None:
            said += f", the energy {energy:+.4g} ± {stderr:.2g} where the curvature predicted {predicted:+.4g}"
        if joined and total > limit_nll * b_scale + (0.0 if again else 2 * total_se):
            said += (
                f"; with the common step's {b_rise:+.4g} ± {b_se:.2g} the held rows' NLL rose {total:+.4g} ± "
                f"{total_se:.2g} (limit {100 * limit_nll:g}% of {b_scale:.4g}"
                + (", measured again on further rows)" if again else " plus two standard errors)")
            )
        return f"the {kind} move of the samples' spread changed, at the check's draws, {said}: not applied"

    def _newton_iterations(
        self,
        check: EnergyCheck,
        G: torch.Tensor,
        first: StepOutcome,
        info: dict[str, Any],
        stream: _Stream,
        e_f: Callable,
        n: int,
        k_thetas: torch.Tensor,
        gated: bool = False,
        sampled: tuple[Batch, torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Damped Newton steps after the influence step, each checked like the first (same rule, same safety net).

        ``newton_target="equilibrium"``: steps ``p = −(H + λ)⁻¹ E_s[∇F(θ_s + x, S∖S')]`` zero the bank-averaged
        remaining-data gradient (at the new posterior ``E_θ[∇F(θ, S∖S')] = 0``, by integration by parts); the
        gradient is taken on every remaining row, at as many evenly spaced draws as fit ``NEWTON_ROW_DRAWS``
        row-draws (at least 2); the rows are listed from tensors, a ``RemovableDataset``, or a ``DataLoader`` over a
        ``TensorDataset`` (:func:`_listed_remaining`). Where the data cannot list their rows (an iterator of
        minibatches, a ``DataLoader`` over another dataset), or two draws do not fit, the further steps are
        skipped with a warning (on a subset of rows the target is that subset's noise, which the check on the same
        rows cannot see). Each step is checked from the shifted bank.

        ``newton_target="relative"``: steps on the control-variate energy ``φ`` of the first step,
        ``∇φ(x) = −G + E_s[∇F(θ_s + x, S∖S') − ∇F(θ_s, S∖S')]`` (paired differences on the check rows), which
        vanishes where the shifted bank's mean gradient equals the old one, checked against the original bank.

        The curvature is the first step's (not rebuilt). Steps stop when the target gradient is below
        ``10⁻³‖G‖``, a step fails its check, a step taken was negligible (its predicted and measured energy changes
        both below the check's floating-point resolution, :meth:`DampingControl._negligible
        <mcmc_unlearner.step.DampingControl._negligible>`) while its target gradient did not fall from the step
        before's (the target is at its rounding floor, and further steps would repeat it), or ``newton_steps`` steps
        were taken. ``info["newton_steps_taken"]`` counts the steps
        taken (the influence step included), ``info["newton_stop"]`` says why they stopped; each step is logged
        at INFO.

        ``newton_steps="auto"`` (equilibrium target): up to ``NEWTON_AUTO_STEPS`` steps, taken only where they are
        needed and cheap. First the bank's own gap to equilibrium, ``e₀ = E_s[∇F(θ_s, S∖S')] + G`` (the full data's
        mean energy gradient at the bank as it was, on every row at the same draws), is measured: where ``‖e₀‖ >
        NEWTON_AUTO_BANK_GAP·‖G‖`` the equilibrium target is mostly the bank's own departure from equilibrium (an
        SG-MCMC bank, and a chain retrained the same way, are not at equilibrium), which further steps would chase,
        and only the influence step is taken (``info["newton_bank_gap"]`` is ``‖e₀‖/‖G‖``). Else the steps continue
        while their gradient passes, the gap's included, take at most ``NEWTON_AUTO_PASSES · NEWTON_ROW_DRAWS``
        row-draw gradients (rows times draws; the damping trials' checks, on the check's rows, are not counted)
        and at most ``NEWTON_AUTO_FLOPS`` FLOPs (a row-draw gradient's FLOPs counted once, before the first
        further step, :meth:`_row_draw_flops`, times those row-draw gradients; ``info["newton_row_flops"]``,
        ``["newton_flops"]``, ``newton_stop`` "work: ..."): counted, not timed, so a loaded machine gives the same
        bank. ``info["newton_row_gradients"]`` is what the
        passes took, ``info["newton_cpu_seconds"]`` their CPU time (each step's search included) and
        ``info["newton_cpu_before"]`` the request's before them. Where the rows cannot be listed the steps are
        skipped without a warning. ``gated`` (:meth:`_gap_gate` fired for ``newton_steps=1``): as ``"auto"``, and the
        steps, not asked for, also stop, where ``NEWTON_AUTO_COST`` is set (off by default), where another would take
        their CPU time past that many times the request's before them (at least ``NEWTON_AUTO_COST_FLOOR`` s; timed:
        where it binds, the count varies with the machine's load); ``sampled``: ``n`` rows the gate sampled from
        a stream that cannot list them, read (scaled to ``n``) in place of every remaining row, and the offset added to
        their gradient: the larger sample's term at the draws' mean less theirs (:meth:`_gap_gate`); an offset of
        ``None``: the rows are every remaining row (the sample's distinct rows), read as listed rows are.

        Returns:
            The total shift, and the influence to carry to the next request (``relative`` only).
        """
        auto = gated or self.newton_steps == "auto"
        limit = NEWTON_AUTO_STEPS if auto else self._newton_limit
        spent, per_pass, budget = 0, 0, NEWTON_AUTO_PASSES * NEWTON_ROW_DRAWS
        # counted FLOPs of one row-draw gradient, of a draw's own part (its prior's) and of one pass (NEWTON_AUTO_FLOPS)
        row_flops, draw_flops, pass_flops = 0.0, 0.0, 0.0
        cpu, before = 0.0, math.inf  # the further steps' CPU and the request's before them (NEWTON_AUTO_COST)
        c0: float | None = None
        x, phi = first.x, first.actual
        carry = measured_deficit(G, first)
        norms: list[float] = []
        equilibrium = self.newton_target == "equilibrium"
        last = first  # a relative run's last accepted step (its NLL rise is the request's whole)
        if equilibrium:
            full = _listed_remaining(stream) if sampled is None else sampled[0]  # a DataLoader's rows without a pass
            on_check = full is None and check.m >= n  # the check holds every remaining row
            full = check.rows if on_check else full
            pts = self._gap_points(k_thetas, n)
            if full is None or pts is None:
                # the target on a subset of rows (the check's, until stop 33) is that subset's sampling noise scaled
                # to n, and the check on the same rows cannot see it: a conjugate regression through a DataLoader
                # moved 6-10 posterior sd off the exact answer, every check passed, against 0.2-0.3 for one step
                why = (
                    "its data source cannot list its rows"
                    if full is None
                    else f"the gradient on all {n} rows at two draws exceeds {NEWTON_ROW_DRAWS} row-gradients"
                )
                info["newton_data"] = f"skipped: {why}"
                info["newton_step_norms"] = ""
                info.update(newton_steps_taken=1, newton_stop=f"skipped: {why}")
                if auto:  # the rule's own decision: where the target cannot be measured, none is needed
                    return x, (carry if self.carry_deficit else None)
                warnings.warn(
                    f"newton_steps={shown_value(self.newton_steps)} (newton_target='equilibrium') needs the "
                    f"gradient on every remaining row, but {why}: only the influence step was taken. Pass the "
                    "remaining rows as tensors, a RemovableDataset or a DataLoader over a TensorDataset, or "
                    "newton_target='relative' (or newton_steps=1)",
                    stacklevel=outside_stacklevel(),
                )
                return x, (carry if self.carry_deficit else None)  # as newton_steps=1 would
            data = full
            info["newton_data"] = (
                f"all {n} remaining rows at {pts.shape[0]} draws"
                if sampled is None
                else f"all {n} remaining rows (the distinct rows of the gate's sample from the stream) at "
                f"{pts.shape[0]} draws"
                if sampled[1] is None
                else f"{int(full[0].shape[0])} rows sampled from the stream (scaled to {n}) at {pts.shape[0]} draws"
            )
            energy = self._energy_f(n) if on_check else e_f  # both scale their batch to n
            # a sample's control variate (_gap_gate); none where its distinct rows are every remaining row
            offset = 0.0 if sampled is None or sampled[1] is None else sampled[1]
            if auto:
                per_pass = int(data[0].shape[0]) * int(pts.shape[0])  # row-draw gradients of one pass
                g0 = _cpu_seconds()
                before = g0 - self._request_cpu  # the request's CPU before the further steps: the cost cap's unit
                gap = float((self._equilibrium_gradient(energy, pts, data, n) + offset + G).norm()) / float(G.norm())
                spent, cpu = per_pass, _cpu_seconds() - g0
                info.update(newton_bank_gap=gap, newton_row_gradients=spent)
                info.update(newton_cpu_before=before, newton_cpu_seconds=cpu)
                log.info(
                    "newton steps: the bank's own gap to equilibrium is %.3g·‖G‖ (one pass, %d row-draw gradients)",
                    gap, per_pass,
                )  # fmt: skip
                if not gap <= NEWTON_AUTO_BANK_GAP:  # (NaN: not measured, no steps)
                    stop = (
                        f"not needed: the bank's own gap to equilibrium is {gap:.3g}·‖G‖ (> {NEWTON_AUTO_BANK_GAP:.3g}"
                        "): further steps would chase it, not the removal"
                    )
                    info.update(newton_steps_taken=1, newton_stop=stop, newton_step_norms="")
                    log.info("newton steps: 1 taken; %s", stop)
                    return x, (carry if self.carry_deficit else None)  # as newton_steps=1 would
            carry = None
        target = 1e-3 * float(G.norm())
        r_last = float(G.norm())  # the influence step's target gradient, −G
        stop, t0 = f"newton_steps={shown_value(self.newton_steps)} reached", time.perf_counter()
        if auto:
            stop = f"newton_steps='auto' reached its {limit} steps"
        for k in range(2, limit + 1):
            if auto and spent + per_pass > budget:
                stop = (
                    f"budget: another pass ({per_pass} row-draw gradients) would take the further steps past "
                    f"{NEWTON_AUTO_PASSES}·{NEWTON_ROW_DRAWS} (spent {spent}, the gap's pass included)"
                )
                break
            if auto and equilibrium and NEWTON_AUTO_FLOPS is not None and k == 2:
                # counted where a further step would be taken, not on a request whose gap says none is needed
                row_flops, draw_flops = self._row_draw_flops(energy, pts, data, n)
                pass_flops = row_flops * per_pass + draw_flops * int(pts.shape[0])
                info.update(newton_row_flops=row_flops, newton_draw_flops=draw_flops)
                info.update(newton_flops=pass_flops * spent / per_pass)
            if (
                auto
                and equilibrium
                and NEWTON_AUTO_FLOPS is not None
                and pass_flops * (spent / per_pass + 1) > NEWTON_AUTO_FLOPS
            ):
                stop = (
                    f"work: another pass ({pass_flops:.3g} counted FLOPs: {per_pass} row-draw gradients of "
                    f"{row_flops:.3g}, {int(pts.shape[0])} draws' own {draw_flops:.3g}) would take the further steps "
                    f"past NEWTON_AUTO_FLOPS = {NEWTON_AUTO_FLOPS:.3g} "
                    f"(spent {pass_flops * spent / per_pass:.3g}, the gap's pass included)"
                )
                break
            if (
                gated
                and equilibrium
                and NEWTON_AUTO_COST is not None
                and cpu + cpu / (k - 1) > max(NEWTON_AUTO_COST * before, NEWTON_AUTO_COST_FLOOR)
            ):
                stop = (
                    f"cost: another step (~{cpu / (k - 1):.3g} CPU s, the mean of the {k - 1} pass(es) so far) would "
                    f"take the further steps past {NEWTON_AUTO_COST:g}x the request's {before:.3g} CPU s before them "
                    f"(at least {NEWTON_AUTO_COST_FLOOR:g} s; spent {cpu:.3g} s, the gap's pass included; timed: the "
                    "count can vary with the machine's load; newton_steps='auto' or an integer pins it)"
                )
                break
            c0 = _cpu_seconds()
            if equilibrium:
                r = self._equilibrium_gradient(energy, pts + x, data, n) + offset
                if auto:
                    spent += per_pass
                    info["newton_row_gradients"] = spent
                    if NEWTON_AUTO_FLOPS is not None:
                        info["newton_flops"] = pass_flops * spent / per_pass
            else:
                r = check.gradient(x)
            if not all_finite(r):
                stop = "the target gradient is not finite"
                break
            if not equilibrium:
                carry = -r
            if float(r.norm()) <= target:
                stop = f"converged: the target gradient {float(r.norm()):.3g} <= 1e-3·‖G‖ = {target:.3g}"
                break
            if equilibrium:  # the energy change from the shifted bank, with its measured gradient as control variate
                here = check.at(_as_tensor(check.thetas) + x, -r)
                step = self.control.step(self.curvature, -r, here)
            else:
                base: list[float] = []  # the direct energy change at x, measured once (the slope test's)

                def shifted(p: torch.Tensor, x: torch.Tensor = x, phi: float = phi, base: list[float] = base) -> Any:
                    m = check(x + p)  # the change of φ from here; the NLL change from the original bank
                    m.actual -= phi
                    if self.control.slope_eta is not None:
                        # the direct change from here too: the slope test reads G·p + actual − direct as the bank's
                        # own slope along p, and the change from the original bank added −direct(x) to it (stop 62's
                        # review: 0.0142 read for an exact bank's 0.0068, its first step's fall; one more check a step)
                        if not base:
                            base.append(check(x).direct)
                        m.direct -= base[0]
                    return m

                step = self.control.step(self.curvature, -r, shifted)
            if not step.safe:
                stop = f"step {k} refused by its check: {step.note or 'not accepted'}"
                log.info("newton step %d/%d: refused by its check (%.2f s)", k, limit, time.perf_counter() - t0)
                break
            # the NLL rises summed across requests: a step from the shifted bank adds its own rise; a relative step
            # measured the rise from the original bank, the request's whole, recorded once after the last
            if equilibrium:
                self.control.record(step)
            else:
                last = step
            if self.shorten_steps:
                step = step.shortened()
            x, phi = x + step.x, phi + step.actual
            if not equilibrium:
                carry = measured_deficit(-r, step)
            norms.append(float(step.x.norm()))
            log.info(
                "newton step %d/%d: accepted after %d damping trial(s), damping %.3g, step norm %.3g, target "
                "gradient %.3g (converged at %.3g), predicted energy change %.3g (%.2f s)",
                k, limit, step.trials, step.damping, norms[-1], float(r.norm()), target, step.predicted,
                time.perf_counter() - t0,
            )  # fmt: skip
            # taken, as before; at the target's rounding floor (it no longer falls) the next would be the same noise
            # again. A negligible change alone is not that: the check's resolution grows with the NLL's size, which a
            # constant in nll raises without changing any gradient (stop 49's probe: nll + 720 stopped a conjugate
            # regression's steps at 11 of 50 while the target still fell by 7.5% a step, 0.196 posterior sd off the
            # exact mean against 0.0099)
            if step.negligible and float(r.norm()) >= r_last:
                stop = (
                    f"negligible: step {k}'s energy change ({step.predicted:.3g} predicted, {step.actual:.3g} "
                    "measured) is below the check's floating-point resolution, and its target gradient "
                    f"{float(r.norm()):.3g} no longer fell ({r_last:.3g} at the step before)"
                )
                break
            r_last = float(r.norm())
            if auto and equilibrium and c0 is not None:
                cpu, c0 = cpu + _cpu_seconds() - c0, None
                info["newton_cpu_seconds"] = cpu
        if auto and equilibrium and c0 is not None:  # a pass whose step was not taken
            info["newton_cpu_seconds"] = cpu + _cpu_seconds() - c0
        info["newton_step_norms"] = ",".join(f"{v:.3g}" for v in norms)
        info.update(newton_steps_taken=1 + len(norms), newton_stop=stop)
        log.info("newton steps: %d of at most %d taken; %s", 1 + len(norms), limit, stop)
        if not equilibrium:
            self.control.record(last)
        return x, (carry if self.carry_deficit else None)

    def _row_draw_flops(self, energy: Callable, pts: torch.Tensor, data: Batch, n: int) -> tuple[float, float]:
        """FLOPs of one row-draw gradient of the further steps' passes and those of one draw's own (its prior's, or a
        custom energy's part that does not grow with the rows), counted (not timed) by
        ``torch.utils.flop_counter.FlopCounterMode`` on one draw's gradient over the first ``NEWTON_FLOP_ROWS`` rows
        and over half of them (the difference, divided by the rows it adds, is a row's; what is left of the first
        count, a draw's): the same data and draws give the same count on any machine (``NEWTON_AUTO_FLOPS``). Divided
        by the rows alone, a prior's matrix products were counted once a row and not once a draw (a prior of 36,000
        FLOPs a draw, 2,250 a row: a pass of 227 rows counted 13x its FLOPs; stop 68's review). Where the data hold
        at most ``NEWTON_FLOP_ROWS`` rows they are counted once, whole (a row's FLOPs their mean, a draw's 0). Only
        the operations torch counts (matrix products, convolutions, attention) are in it, not elementwise ones nor an
        operation's own overhead (a recurrent row's many small products cost more time per counted FLOP).
        ``(0.0, 0.0)`` where counting fails (the FLOP budget then never binds; the row-draw one still does)."""
        total = int(data[0].shape[0])
        rows = min(total, NEWTON_FLOP_ROWS)
        if rows <= 0:
            return 0.0, 0.0

        def count(k: int) -> float:
            part = tuple(t[:k] if torch.is_tensor(t) and t.dim() > 0 else t for t in data)

            def run() -> None:  # _equilibrium_gradient's work, not one of its passes
                if self.custom_energy:
                    self._per_draw_grads(energy, pts[:1], part)
                else:
                    self._moment(self._h_f(), pts[:1], part, scale=n / k)

            return float(_count_flops(run))

        try:  # (FlopCounterMode as it is imported torch._dynamo and sympy: 830 modules, 1.1 s CPU; _count_flops)
            whole = count(rows)
            if rows == total:  # every row counted: the pass's FLOPs a draw, exactly
                return whole / rows, 0.0
            half = count(rows // 2)
        except Exception as e:  # a count is a budget's input, never a reason to refuse the request
            log.info("newton steps: the row-draw gradient's FLOPs could not be counted (%s)", e)
            return 0.0, 0.0
        row = max(whole - half, 0.0) / (rows - rows // 2)
        return row, max(whole - rows * row, 0.0)

    def _gap_points(self, k_thetas: torch.Tensor, n: int) -> torch.Tensor | None:
        """The draws the equilibrium target is taken at: ``grad_draws``' evenly spaced bank samples (``k_thetas``
        without a bank), no more than fit ``NEWTON_ROW_DRAWS`` row-draw gradients on ``n`` rows; ``None`` where
        fewer than two draws (of at least two) fit: the further steps are not taken then."""
        pts = k_thetas if self.bank is None else self.bank[_evenly(self.bank.shape[0], self._grad_draw_count(1))]
        fit = min(pts.shape[0], NEWTON_ROW_DRAWS // max(n, 1))  # draws whose gradients on every row fit the cap
        if fit < min(2, pts.shape[0]):
            return None
        return pts[_evenly(pts.shape[0], fit)] if fit < pts.shape[0] else pts

    def _undamped_overshoots(self, trials: list[dict[str, Any]], info: dict[str, Any]) -> bool:
        """``newton_gate``'s first signal, free: did the damping search's least-damped measured trial (the undamped
        step in a fresh search) *raise* the remaining-data energy by more than its quadratic model predicted it to
        fall, and by more than ``newton_gate`` standard errors? Then the energy is quadratic only within a small
        part of the undamped step, which one linearised step cannot cross (stop 64: the regression's +4.3·10⁵ ±
        6.1·10⁴ against −7,159 predicted), while an affine model's exact step (the conjugate regression) measures
        what it predicts. Only where it fires is :meth:`_gap_gate`'s estimate made; ``info["newton_gate"]`` says
        why not where it does not. ``trials``: the damping trials of the search whose step is taken (after a retry
        without the carried deficit, :meth:`_without_carry`, the retry's: the refused search's undamped step, on the
        carried ``G``, is not the one taken).

        Where the curvature is indefinite (the exact Hessian's least eigenvalue below zero) no undamped step exists:
        the search starts just above that eigenvalue (:meth:`DampingControl._search`), and a trial there fitting its
        model says nothing about the undamped step. Stop 66: on small tanh, GELU and Poisson regressions (the exact
        solver, 369-746 parameters) the gate never estimated; now the estimate fired on 5 of their 6 runs and the
        kept RMSE went from +15% to +164% off retraining's to -16% to +80% (the tanh network's seed 0, not fired,
        stayed at +80%; docs/model-matrix.md, stop 66's probe). There the signal counts as fired and the estimate
        decides (``info["newton_gate_signal"]`` says which)."""
        if not self.newton_gate or self.newton_target != "equilibrium" or self.custom_energy:
            return False
        measured = [h for h in trials if math.isfinite(h.get("actual", math.nan))]
        if not measured:
            return False
        low = min(measured, key=lambda h: h["damping"])
        floor = self.curvature.min_damping()
        # DampingControl._search's least damping, where the curvature is clearly indefinite: a positive semi-definite
        # one whose zero eigenvalue rounded below zero also starts the search above 0, but at a damping that leaves
        # its trial the undamped step's on every direction the removal moves
        at_floor = floor > 0 and low["damping"] <= 1.5 * floor * (1 + 1e-9)
        if at_floor and self.curvature.clear_negative_eigenvalue() > 0:
            info["newton_gate_signal"] = (
                f"the curvature is indefinite (no undamped step: the least-damped trial, damping {low['damping']:.3g}, "
                f"sat just above its most negative eigenvalue)"
            )
            return True
        pred, actual, se = low["predicted"], low["actual"], low.get("stderr", math.nan)
        se = se if math.isfinite(se) else 0.0
        fires = actual > abs(pred) and actual > self.newton_gate * se
        if fires:
            info["newton_gate_signal"] = (
                f"the least-damped trial (damping {low['damping']:.3g}) measured {actual:.4g} ± {se:.2g} against "
                f"{pred:.4g} predicted"
            )
        else:
            info["newton_gate"] = (
                f"not fired: the least-damped trial (damping {low['damping']:.3g}) measured {actual:.4g} ± {se:.2g} "
                f"against {pred:.4g} predicted"
            )
        return fires

    def _gap_sample(
        self, check: EnergyCheck, stream: _Stream, n: int, pts: torch.Tensor | None, info: dict[str, Any]
    ) -> Batch | None:
        """``NEWTON_GATE_STREAM_PASSES·n`` rows read from a stream whose rows cannot be listed (whole minibatches,
        as the safety check's further rows are read: :meth:`_check_rows`; cut to that count), for :meth:`_gap_gate`;
        ``None``, with ``info["newton_gate"]`` saying why, where two draws' gradients on ``n`` rows, or one draw's on
        the sample, exceed ``NEWTON_ROW_DRAWS`` row-gradients, where they and the estimate would not fit the memory
        budget (counted before any is read, at the check's rows' bytes per row, twice: the minibatches and their
        joined copy), or where a one-pass iterator ran out
        (the minibatches it gave are spent, nothing else changed: the request goes on as with the gate off).
        ``pts``: :meth:`_gap_points` as the gate took them (a copy of the bank's rows: taken once, stop 70)."""
        m = NEWTON_GATE_STREAM_PASSES * n
        why = None
        if pts is None or m > NEWTON_ROW_DRAWS:
            why = (
                f"the gradient on {n} rows at two draws exceeds {NEWTON_ROW_DRAWS} row-gradients"
                if pts is None
                else f"the {m} rows it samples from the stream exceed {NEWTON_ROW_DRAWS} row-gradients at one draw"
            )
        else:
            # the rows twice: the minibatches read and their joined copy are held together (torch.cat); after it, the
            # sample and a group's copy of n rows (stop 66's review: counted once, the estimate added 342 MB to a
            # request where it counted 243)
            per_row = sum(t[:1].numel() * t.element_size() for t in check.rows)
            need = _gap_gate_bytes(pts) + 2 * m * per_row
            if need > self.memory_budget:
                why = (
                    f"the estimate's {need / 1e6:.3g} MB ({m} rows sampled from the stream, a pass of them and the "
                    f"draws' gradients) is over the memory budget's {self.memory_budget / 1e6:.3g} MB"
                )
        if why is None:
            try:
                rows = self._check_rows(stream, m, 0)[0]
            except IteratorRanOut:
                why = (
                    f"the remaining-data iterator ran out before the {m} rows the estimate samples "
                    f"({NEWTON_GATE_STREAM_PASSES}·n) were read (pass an endless iterator, a DataLoader or the rows)"
                )
        if why is not None:
            info["newton_gate"] = f"not fired: {_gate_signal(info)}, but {why}"
            return None
        return tuple(t[:m] for t in rows)

    def _gap_gate(
        self,
        check: EnergyCheck,
        G: torch.Tensor,
        info: dict[str, Any],
        stream: _Stream,
        n: int,
        k_thetas: torch.Tensor,
        sample: list[Batch],
        removed: tuple = (),
    ) -> bool:
        """``newton_gate``: is the bank's own gap to equilibrium, ``e₀ = E_s[∇F(θ_s, S∖S')] + G``, clearly small
        (``‖e₀‖ ≤ NEWTON_AUTO_BANK_GAP·‖G‖`` by ``newton_gate`` standard errors), so that ``"auto"``'s further
        steps would close the removal's nonlinearity, not chase the bank?

        Estimated on ``NEWTON_GATE_SHARE`` of the remaining rows (a fixed generator: the request's randomness is
        untouched), split into ``NEWTON_GATE_GROUPS`` groups. Each row's draw-averaged gradient less its gradient at
        the draws' mean ``θ̄`` is what is sampled; their sum over every row at ``θ̄`` (one draw's pass) is added
        back, so the estimate's error is that of the rows' departure from ``θ̄``'s gradient (stop 64: without it a
        fifth of the regression's rows gave a standard error 17× the threshold). Each group gives an estimate
        ``u_b`` of ``e₀``, and :func:`_gap_estimate` ``‖e₀‖²`` and its standard error. The first
        ``NEWTON_GATE_FIRST`` of each group is looked at first: the whole groups are measured only where it neither
        fired nor showed that they could not (a class removal's error, hundreds of times the threshold). Where the
        first, free signal (:meth:`_undamped_overshoots`, which also checks that the gate is on and the target the
        equilibrium) did not fire, this is not called. ``info["newton_gate"]`` records the estimate over ``‖G‖²`` and
        the verdict, ``info["newton_gate_cpu_seconds"]`` its CPU seconds (this process's). ``removed``: the
        removed rows' second field (none: an empty tuple), for :meth:`_keep_every_row`.

        Rows that cannot be listed (a plain iterator of minibatches; not under ``torch.distributed``):
        :meth:`_gap_sample` reads ``NEWTON_GATE_STREAM_PASSES·n`` rows from the stream, *assumed a with-replacement
        sample of the remaining rows*. The groups are then independent: each group's own rows at ``θ̄`` stand for
        every row's (scaled to ``n``), so the standard error holds their sampling error too, and no finite-population
        term is added. Where it fires the further steps read ``n`` of the sampled rows in place of every row, their
        term at ``θ̄`` replaced by the whole sample's (appended to ``sample`` with that offset), so their target
        carries the sample's error at ``θ̄``: the gate fires only where its expected ``‖·‖²`` (the groups' spread at
        ``θ̄`` over ``B``, ``noise``) is within the threshold, and ``est + noise + z·se`` is too. Where the sample
        holds exactly ``n`` distinct rows (byte for byte, :func:`_distinct_rows`: an endless iterator reshuffling each
        pass, or a with-replacement one that happened to give every row) they are every remaining row, and the
        further steps read them once each with no offset, as listed rows (stop 68). The pair estimate is
        ``‖ū‖²`` less ``noise`` (an identity): on a with-replacement sample ``est + noise`` estimates
        ``E‖e₀ + ε‖²``, the gap the further steps chase on the sample (``ε`` their target's error); on a stream
        giving each row once a pass (an endless iterator reshuffling each pass: *not* a with-replacement sample, the
        ``8·n`` rows nearly 8 copies of the data, the groups' terms at ``θ̄`` summing to the whole data's) ``est``
        alone reads ``‖e₀‖² − noise`` and ``est + noise`` reads ``‖e₀‖²`` (stop 66's review: a linear regression
        whose exact ``‖e₀‖²`` was 0.119·‖G‖², over the threshold, fired at ``newton_gate=1`` on ``est`` alone).
        A sample's groups are measured one at a time (each its ``n`` rows at ``θ̄``, ``NEWTON_GATE_STREAM_PASSES``
        gradient passes over ``n`` rows in all, and its first look), and the estimate stops, not fired, as soon as
        :func:`_gap_early_stop` finds the verdict clear; where it does not stop, every number is the full estimate's."""
        signal = _gate_signal(info)  # which first signal fired: the refusals below name it
        if not float(G.double().norm()) > 0:  # the threshold is a share of ‖G‖²: no gap can be judged against 0
            info["newton_gate"] = f"not fired: {signal}, but the removed rows' gradient G is exactly zero"
            return False
        pts = self._gap_points(k_thetas, n)
        need = 0 if pts is None else _gap_gate_bytes(pts)
        if need > self.memory_budget:
            info["newton_gate"] = (
                f"not fired: {signal}, but the estimate's {need / 1e6:.3g} MB (a pass of rows and "
                f"the draws' gradients) is over the memory budget's {self.memory_budget / 1e6:.3g} MB"
            )
            return False
        full = _listed_remaining(stream)
        if full is None and check.m >= n:
            full = check.rows
        c0 = time.process_time()
        sampled = full is None and self._reduce is None
        if sampled:  # a plain iterator's minibatches, read as a with-replacement sample of the remaining rows
            full = self._gap_sample(check, stream, n, pts, info)
            if full is None:
                return False
            if removed:  # every remaining row, kept for the emptied label's check and draw
                self._keep_every_row(stream, full, removed[0], n)
        rows = 0 if full is None else int(full[0].shape[0])
        per = math.ceil((n if sampled else rows) * NEWTON_GATE_SHARE / NEWTON_GATE_GROUPS)
        if full is None or per < 1 or per * NEWTON_GATE_GROUPS > rows or pts is None:
            # (no draws fit: the estimate divided by zero; one: it was made and fired, and "auto" skipped its steps)
            info["newton_gate"] = (
                f"not fired: {signal}, but the remaining rows cannot be listed (pass them as a tuple, "
                "a RemovableDataset or a DataLoader over a TensorDataset)"
                if full is None
                else f"not fired: {signal}, but {rows} remaining rows are too few for the estimate"
                if per < 1 or per * NEWTON_GATE_GROUPS > rows
                else f"not fired: {signal}, but the gradient on all {rows} remaining rows at two "
                f"draws exceeds {NEWTON_ROW_DRAWS} row-gradients (the further steps could not be taken)"
            )
            return False
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
        h_f, mean = self._h_f(), pts.mean(0, keepdim=True)
        whole = rows // NEWTON_GATE_GROUPS  # a sample's group at θ̄: its share of the sample
        B = NEWTON_GATE_GROUPS

        def group_u(b: int, draws: torch.Tensor, size: int, prior: torch.Tensor) -> torch.Tensor:
            """Group ``b``'s estimate on its first ``size`` rows at ``draws``: their draw-averaged gradients less
            those at ``θ̄``, scaled to ``n``, plus every row's at ``θ̄`` (a sample's: the group's own) and the draws'
            prior term ``prior``."""
            s, start = n / size, b * (whole if sampled else per)
            part = tuple(t[order[start : start + size]] for t in full)
            d = self._moment(h_f, draws, part, scale=s, prior=False) - self._moment(h_f, mean, part, s, prior=False)
            return (d + at_means[b] - prior + G).double()

        def estimate(draws: torch.Tensor, size: int) -> tuple[float, float]:
            """The estimate on the first ``size`` rows of each group at ``draws`` (:func:`group_u`)."""
            prior = self._prior_moment(draws, full)
            u = [group_u(b, draws, size, prior) for b in range(B)]
            # a sample's groups are independent (drawn with replacement): no finite-population term
            return _gap_estimate(torch.stack(u), size, math.inf if sampled else rows)

        g2, limit, z = float(G.double().norm()) ** 2, NEWTON_AUTO_BANK_GAP**2, self.newton_gate
        # a first look on a share of each group's rows at a few of the draws: a draw's gradient costs more than its
        # rows (LeNet-5: 50 draws on 4 rows 0.1 s, one draw on 1,214 rows 0.06 s). Fewer draws add their Monte-Carlo
        # error to the gap (E‖ê₀‖² grows), so firing there is conservative
        first = max(1, math.ceil(per * NEWTON_GATE_FIRST))
        looks = NEWTON_GATE_SAMPLED_FIRST_DRAWS if sampled else NEWTON_GATE_FIRST_DRAWS
        few = pts[_evenly(pts.shape[0], min(pts.shape[0], looks))]
        if sampled:
            # each group's own rows at θ̄, scaled to n (the groups independent estimates of the whole term), and its
            # first look, one group at a time: a pass of n rows each, stopped once the verdict is "not fired" either
            # way (_gap_early_stop; a class removal's after 3 of the 8, stop 66's review)
            at_means, u, project = [], [], math.sqrt(first / per * few.shape[0] / pts.shape[0])
            prior = self._prior_moment(few, full)
            for b in range(B):
                own = tuple(t[order[b * whole : (b + 1) * whole]] for t in full)
                at_means.append(self._moment(h_f, mean, own, n / whole, False))
                u.append(group_u(b, few, first, prior))
                why = _gap_early_stop(torch.stack(u), at_means, B, limit * g2, z, project) if b + 1 < B else None
                if why is not None:
                    gap = _gap_estimate(torch.stack(u), first, math.inf) if len(u) >= 3 else None
                    said = _early_stop_said(signal, why, len(u), B, whole, first, rows, n, gap, g2, limit)
                    info["newton_gate"] = said
                    info["newton_gate_cpu_seconds"] = time.process_time() - c0
                    log.info("newton gate: %s (%.2f s CPU)", info["newton_gate"], info["newton_gate_cpu_seconds"])
                    return False
            (est, se), used = _gap_estimate(torch.stack(u), first, math.inf), first
        else:  # every row at the draws' mean
            at_means = [self._moment(h_f, mean, full, scale=n / rows, prior=False)] * B
            (est, se), used = estimate(few, first), first
        at_mean = sum(at_means) / B
        # the further steps' target on the sample: its expected squared sampling error, that of the groups' mean
        noise = sum(float(((a - at_mean).double() ** 2).sum()) for a in at_means) / ((B - 1) * B) if sampled else 0.0
        quiet = noise <= limit * g2  # a sample's: the further steps' target no noisier than the gap allowed
        # ... and the gap with it: the pair estimate is ‖ū‖² less the groups' spread over B(B−1) (an identity), so on
        # a stream giving each row once a pass (8 passes: the groups' terms at θ̄ sum to the whole data's) it reads
        # ‖e₀‖² − noise; on a with-replacement sample, est + noise estimates E‖e₀ + ε‖², ε the further steps'
        # target error at θ̄ (0.0 where the rows are listed: bit for bit as before)
        fires = est + noise + z * se <= limit * g2 and quiet
        # it decides where it fires, and where even the whole groups at every draw could not: their error taken as at
        # least this one's times √(first/per · few/draws) (a class removal's, hundreds of times the threshold, stop
        # 65); else the whole groups at every draw. Not a bound at fewer draws than the whole: the few draws' own
        # Monte-Carlo error is in this estimate and its error, not in theirs (a removal that fires at every draw can
        # be ruled out here: tests/test_newton_gate.py's strict xfail, docs/model-matrix.md, stop 66's review)
        hopeless = se * math.sqrt(first / per * few.shape[0] / pts.shape[0]) * z > limit * g2 or not quiet
        if not fires and not hopeless and (first < per or few.shape[0] < pts.shape[0]):
            (est, se), used = estimate(pts, per), per
            fires = est + noise + z * se <= limit * g2
        of = f"{rows} sampled from the stream for {n}" if sampled else f"{rows}"
        info["newton_gate"] = (
            f"{'fired' if fires else 'not fired'}: the bank's gap estimated at ‖e₀‖² = {est / g2:.3g} ± {se / g2:.3g}"
            f" ·‖G‖² on {used * NEWTON_GATE_GROUPS} of {of} rows (threshold {limit:.3g})"
            + (f"; the sample's own error ‖·‖² = {noise / g2:.3g} ·‖G‖², judged with the gap" if sampled else "")
        )
        if fires and sampled:  # the further steps' rows (_newton_iterations)
            distinct = _distinct_rows(full)
            if distinct is not None and int(distinct.numel()) == n:
                # the sample holds n distinct rows, as many as remain: every remaining row, listed by reading the
                # stream (an endless iterator reshuffling each pass gives each row ~8 times), read once each and
                # with no control variate, as where the rows are listed (stop 68: n of the sample, their term at θ̄
                # replaced, left the quick matrix regression 17.0% / 14.9% off retraining's kept RMSE, 9.0% / 8.8%
                # on these rows, the loader's numbers)
                sample.append((tuple(t[distinct] for t in full), None))
            else:  # n of the sample, their term at θ̄ replaced by the whole sample's
                steps = tuple(t[order[:n]] for t in full)
                sample.append((steps, at_mean - self._moment(h_f, mean, steps, scale=1.0, prior=False)))
        info["newton_gate_cpu_seconds"] = time.process_time() - c0
        log.info("newton gate: %s (%.2f s CPU)", info["newton_gate"], info["newton_gate_cpu_seconds"])
        return bool(fires)

    @property
    def _newton_limit(self) -> int:
        """The most steps a request takes (the influence step included): ``newton_steps``, or
        ``NEWTON_AUTO_STEPS`` with ``"auto"``."""
        return NEWTON_AUTO_STEPS if self.newton_steps == "auto" else int(self.newton_steps)

    def _equilibrium_gradient(self, energy: Callable, thetas: torch.Tensor, data: Batch, n: int) -> torch.Tensor:
        """``E_s[∇F(θ_s, S∖S')]`` on every row of ``data`` (scaled to ``n``): with the default energy the rows' sum
        ``Σ ∇h`` is taken :meth:`_moment_rows` rows at a time (fewer when the memory budget asks), as
        :meth:`_moment` does; one draw over every remaining row at once peaked at 616 MB under a 400 MB budget (a
        small CNN, 3,936 rows). A custom ``energy`` is not a sum over rows and is taken whole."""
        if self.custom_energy:
            return self._per_draw_grads(energy, thetas, data).mean(0)
        rows = int(data[0].shape[0])
        return self._moment(self._h_f(), thetas, data, scale=n / max(rows, 1))

    # ------------------------------------------------------------------ first-moment correction
    def _moment_rows(self) -> int:
        """Rows per pass of :meth:`_moment`: ``RECENTER_ROW_CHUNK``, fewer (not below ``MOMENT_MIN_ROWS``) where a
        pass would save more than ``MOMENT_CHUNK_BYTES`` for its backward pass (the rows' bytes as measured for the
        request; ``RECENTER_ROW_CHUNK`` before any measurement)."""
        if not self._row_bytes:
            return RECENTER_ROW_CHUNK
        return int(min(RECENTER_ROW_CHUNK, max(MOMENT_MIN_ROWS, MOMENT_CHUNK_BYTES // self._row_bytes)))

    def _moment(
        self, h_f: Callable, thetas: torch.Tensor, rows: Batch, scale: float = 1.0, prior: bool = True
    ) -> torch.Tensor:
        """``E_s[∇F(θ_s)] = E_s[Σ_rows ∇h(θ_s) − ∇log p(θ_s)]`` over ``rows``, :meth:`_moment_rows` rows at a
        time (fewer when the memory budget asks); ``scale`` multiplies the rows' sum; ``prior=False``: the rows'
        term alone."""
        n, step = rows[0].shape[0], self._moment_rows()
        g = sum(
            self._per_draw_grads(h_f, thetas, tuple(t[i : i + step] for t in rows), rowwise=True)
            for i in range(0, n, step)
        ).mean(0)
        if scale != 1.0:
            g = g * scale
        return g - self._prior_moment(thetas, rows) if prior and self.log_prior is not None else g

    def _prior_moment(self, thetas: torch.Tensor, rows: Batch) -> torch.Tensor | float:
        """``E_s[∇log p(θ_s)]`` (``0.0`` without a ``log_prior``); ``rows`` give the batch's form (none is read)."""
        if self.log_prior is None:
            return 0.0
        lp_f = functionalize(self.model, lambda m, *_: self.log_prior(m))
        if thetas.shape[0] == 1:  # the corrections' paired moments: one draw at a time
            with torch.enable_grad():
                tt = thetas[0].detach().requires_grad_(True)
                return torch.autograd.grad(lp_f(tt), tt)[0]
        # every draw at once where the gradients are vectorised (newton_steps' equilibrium gradient: one autograd call
        # per draw took a fifth of the GMM demo's 200 requests, 256 draws each)
        return self._per_draw_grads(lp_f, thetas, tuple(t[:0] for t in rows)).mean(0)

    def _new_anchor(self, stream: _Stream, info: dict[str, Any]) -> _Anchor | None:
        """The samples :meth:`_recenter` pairs with, kept as they are before the first request."""
        if self.bank is None or not stream.listable:
            why = (
                "it needs a sample bank (pass bank=, or collect() samples)"
                if self.bank is None
                else _unlisted_why(stream.source)
            )  # "pass bank= and ..." was said to callers who had passed a bank, with a DataLoader
            info["recenter"] = f"off: {why}"
            return None
        most = RECENTER_MAX_DRAWS if self.recenter_draws == "auto" else self.recenter_draws
        index = _evenly(self.bank.shape[0], max(RECENTER_REMOVED_DRAWS, most))
        thetas = self.bank[index]  # indexing by a tensor copies (a clone after it held the draws twice)
        info["recenter"] = "anchored"
        return _Anchor(index, thetas, self._pair_positions(index.numel()), torch.zeros_like(thetas[0]))

    def _pair_positions(self, m: int) -> torch.Tensor:
        """Positions among ``m`` anchored samples of the paired draws, in the order they are measured."""
        pair = _evenly(m, RECENTER_MAX_DRAWS if self.recenter_draws == "auto" else self.recenter_draws)
        return pair[_spread_order(pair.numel())]

    @staticmethod
    def _deviation(paired: list[torch.Tensor], removed: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The deviation ``d`` from the paired draws' differences and its Monte-Carlo standard error (norm; NaN
        from one draw)."""
        q = torch.stack(paired)
        se = float((q.var(0).sum() / q.shape[0]).sqrt()) if q.shape[0] > 1 else math.nan
        return q.mean(0) - removed, se

    def _recenter(
        self,
        anchor: _Anchor,
        live: torch.Tensor,
        bank: torch.Tensor,
        h_f: Callable,
        check: EnergyCheck,
        stream: _Stream,
        info: dict[str, Any],
        carry: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, _Anchor]:
        """Restore the first moment the influence steps keep only to first order (``recenter_every``).

        Each influence step solves ``E_s[∇F(θ_s + x, S∖S')] = E_s[∇F(θ_s, S)]`` to first order with an
        approximate, damped curvature; what it misses accumulates over requests (on Fashion-MNIST the bank came
        to over-predict a kept class by thousands of training points' worth of probability). With ``θ⁰`` the bank
        when the first request was made, ``θ'`` the bank now (the same samples, moved) and ``S'`` every point
        removed since, the deviation is

        .. math::  d = E_{s∈P}[∇F(θ'_s, S∖S') − ∇F(θ⁰_s, S∖S')] − E_{s∈M}[Σ_{z∈S'} ∇h(θ⁰_s, z)],

        the first term on every remaining row at paired samples ``P`` (each draw's ``θ⁰`` side measured the first time
        the draw is used and then kept up to date by the removed points' gradients), the removed points' term
        accumulated request by request at ``M`` ⊇ ``P`` (16 or more) samples of ``θ⁰``. Where a request's ``G`` averaged
        other or more samples than those ``M`` (``grad_draws="auto"`` takes up to ``⌈1024/k⌉`` for ``k`` removed rows),
        the two means differ by Monte-Carlo error that ``d`` carries whatever the paired draws show (with a common shift
        they do not spread at all); it joins ``d``'s standard error (``_Anchor.removed_noise``;
        ``info["recenter_removed_stderr"]``): uncounted, a correction on that noise alone moved an exact Gaussian
        removal off its fixed point (0.055 posterior sd; over 150 small requests 0.62 against 0.28 sd without the
        corrections). ``recenter_draws="auto"`` measures the paired term draw by draw, from 2 up to
        ``RECENTER_MAX_DRAWS``, until its Monte-Carlo standard error is at most ``RECENTER_REL_SE`` of ``‖d‖``, and
        skips the correction when that never happens (``‖d‖`` is then mostly noise: ``E‖d̂‖² = ‖d‖² + se²``). After a
        correction that measured the spread of one draw's difference, the next takes one draw's error from it, scaled up
        by the growth of the bank's displacement from ``θ⁰`` (:func:`_carried_spread`), and stops at one draw when that
        is clear; else it measures as above (on Fashion-MNIST a second pass per correction had cost +60% CPU; carried:
        −19%, docs/fashion-mnist.md). The carried spread is an extrapolation that fell behind the measured one over a
        long sequence, so after ``RECENTER_CARRY_MAX`` corrections in a row on it the next measures again. From a single
        draw the digits BNN's deviation measured 1.4–1.8× its four-draw value, and the step it took on that noise made
        the requests after it remove the class further than retraining does (docs/fashion-mnist.md, stop 26).
        The target is the original bank's moment, not 0: an SG-MCMC bank is not at
        equilibrium, and neither is a chain retrained the same way. Bank and live chain then move by ``p = −(H +
        λ)⁻¹d``, a Newton step on ``φ(X) = E_s[F(θ⁰_s + X, S∖S') − X·∇F(θ⁰_s, S)]``, through the same damping control
        and safety check as a request (measured from the moved bank, on the request's check rows), damped as ``H + λI``
        whatever shape the requests accepted unless ``damping_shape`` fixes one, and taken only when its measured energy
        change meets the ratio test at its upper ``RECENTER_ACCEPT_Z``-standard-error bound (a request must move, a
        correction need not). An applied correction clears the
        carried influence (:func:`~mcmc_unlearner.step.measured_deficit`): ``d`` contains the request's deficit, and
        what the damped correction leaves undone is measured again by the next correction; carried into the next
        request, it was applied a second time there, in the requests' damping shape and without the correction's damping
        (Fashion-MNIST seed 2, the requests in the data-term shape: carried norms of 1,100–2,000, the next requests'
        shifts 1.3–2.2 against 0.1–0.3 for their neighbours; one of them took the kept-class distance to retraining from
        0.088 to 0.097). On a Gaussian posterior an exact removal is a fixed point (``d = 0``); an approximate one is
        moved to it. A correction whose every damping fails its check is skipped (the request stands); ``report.info``
        says what happened.
        """
        t0 = time.perf_counter()
        anchor = replace(anchor, count=torch.zeros_like(anchor.count))
        rows = self._raw(stream.full())
        log.info(
            "first-moment correction across requests: one gradient pass over %d remaining rows per stored sample "
            "(up to %d samples; two passes the first time a sample is used)",
            rows[0].shape[0], anchor.pair.numel(),
        )  # fmt: skip
        auto = self.recenter_draws == "auto"
        drawn = None if anchor.drawn is None else anchor.drawn.to(bank.device)

        def undrawn(t: torch.Tensor) -> torch.Tensor:
            """``t`` with the entries drawn from the prior since anchoring zeroed (no correction there: every
            measurement of the deviation leaves them out, not only its last value; review)."""
            return t if drawn is None else t.index_fill(-1, drawn, 0.0)

        shift = float(undrawn(bank[anchor.index] - anchor.thetas).norm(dim=1).mean())
        stale = int(anchor.carried) >= RECENTER_CARRY_MAX  # carried too often since it was measured: measure again
        carried = _carried_spread(anchor, shift) if auto and not stale else None
        paired: list[torch.Tensor] = []
        noise = "measured"
        # 0 when every request's G averaged the anchored samples themselves; the drawn entries left out
        se_removed = anchor.removed_stderr()
        for j, k in enumerate(anchor.pair.tolist()):
            if anchor.moment is None or not bool(anchor.measured_draws[j]):
                anchor = anchor.measured(j, self._moment(h_f, anchor.thetas[k : k + 1], rows))
            paired.append(undrawn(self._moment(h_f, bank[anchor.index[k : k + 1]], rows) - anchor.target(j)))
            d, se_pair = self._deviation(paired, undrawn(anchor.removed))
            log.info("correction: stored sample %d measured (%.1f s)", j + 1, time.perf_counter() - t0)
            se = math.hypot(se_pair, se_removed) if se_removed else se_pair
            if len(paired) == 1 and carried is not None:
                # one draw's error, as the last measured spread scaled to the displacement since
                se = math.hypot(carried, se_removed) if se_removed else carried
                if se <= RECENTER_REL_SE * float(d.norm()):
                    noise = "carried"
                    anchor = replace(anchor, carried=anchor.carried + 1)
                    break
            if auto and len(paired) >= 2 and se <= RECENTER_REL_SE * float(d.norm()):
                break
            if auto and len(paired) >= 2 and se_removed > RECENTER_REL_SE * float(d.norm()):
                break  # the removed points' term alone is too noisy: more paired draws cannot make d clear
        if auto and len(paired) >= 2 and math.isfinite(se_pair):  # (a moment not finite here: skipped below)
            spread = torch.tensor(se_pair * math.sqrt(len(paired)), dtype=torch.float64)
            shifted = torch.tensor(shift, dtype=torch.float64)
            anchor = replace(anchor, spread=spread, spread_shift=shifted, carried=torch.zeros_like(anchor.carried))
        info.update(recenter_deviation=float(d.norm()), recenter_draws=len(paired), recenter_stderr=se)
        info["recenter_removed_stderr"] = se_removed
        info.update(recenter_noise=noise, recenter_anchor_shift=shift, recenter_spread_stale=stale)
        if not all_finite(d):
            info["recenter"] = "skipped: the measured first moment is not finite"
            return live, bank, carry, anchor
        if auto and not se <= RECENTER_REL_SE * float(d.norm()):
            # no more than Monte-Carlo noise: a step on it moves the bank at random (digits BNN: the requests after
            # such a correction removed the class further than retraining does)
            info["recenter"] = (
                f"skipped: the deviation ({float(d.norm()):.4g}) is within twice its Monte-Carlo standard error "
                f"({se:.4g}) after {len(paired)} draws"
                if len(paired) > 1
                else "skipped: one stored sample cannot measure the deviation's Monte-Carlo error (store more "
                "samples, or pass recenter_draws=1 to correct without it)"
            )
            info["recenter_seconds"] = time.perf_counter() - t0
            log.info("correction %s (%.1f s)", info["recenter"], info["recenter_seconds"])
            return live, bank, carry, anchor
        # not the curvature's; read in place where their copy would take over a quarter of the budget (stop 59)
        held_out = _held_out(bank.shape[0], self.curvature_draws, self.check_draws)
        thetas = _further_samples(bank, held_out, self.memory_budget)
        here = check.at(thetas, -d)
        control = DampingControl(
            self.damping,
            eta=self.control.eta,
            max_trials=self.control.max_trials,
            accept_z=RECENTER_ACCEPT_Z,
            direct_z=RECENTER_DIRECT_Z,
        )
        control.set_state(self.control.state())
        if self.damping_shape is DampingShape.AUTO:
            # λI: the deviation is largest where the data barely curve (the forgotten class's directions), which
            # the data-term shape leaves undamped (Fashion-MNIST seed 3: corrections of norm 4-9, 5.1x the
            # retrain-pair distance; 2.0x with the identity shape)
            control.shape = DampingShape.IDENTITY.value
        step = control.step(self.curvature, -d, here)
        info.update(
            recenter_damping=step.damping,
            recenter_ratio=step.ratio,
            recenter_trials=len(step.history),
            recenter_shape=step.shape,
        )
        if not step.safe:
            info["recenter"] = f"skipped: {step.note or 'every damping failed its check'}"
        else:
            step = step.shortened() if self.shorten_steps else step
            info.update(recenter="applied", recenter_shift=float(step.x.norm()), recenter_step_length=step.length)
            self.control.record(step)  # the NLL rises summed across requests
            # the shifted bank is the request's own copy: moved in place, not copied once more (two [S, D] copies
            # at once, outside the memory plan)
            live, bank = live + step.x, (bank + step.x if bank is self.bank else bank.add_(step.x))
            carry = None
            anchor = replace(anchor, applied=anchor.applied + 1)
        info["recenter_seconds"] = time.perf_counter() - t0
        log.info("correction %s (%.1f s)", info["recenter"], info["recenter_seconds"])
        return live, bank, carry, anchor

    # ------------------------------------------------------------------ checkpoints
    def curvature_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Cached curvature, the damping state, the carried influence, the unlearner's generator, the anchored
        first moment (``recenter_every``) and the digests of the rows applied requests removed (``removed_digests``,
        uint8 ``[rows, 16]``) as tensors plus JSON metadata (for checkpoints; see :meth:`load_curvature_state`)."""
        tensors, meta = self.curvature.state_dict()
        meta = {**meta, "damping_relative": float(self.control.relative), "damping_state": self.control.state()}
        # the solver the state belongs to: solver="auto" may have switched from K-FAC to CG on the first request
        meta["solver"] = self.solver.value
        # always written (null when unset): the deletion service merges a commit's state into the last one's, and a
        # count restarted by a repair's new bank kept the old one's start (stop 45's probe)
        meta["rows_at_samples"] = self._rows_at_samples
        meta["cumulative_warned"] = self._cumulative_warned
        meta["grad_draw_round"] = self._g_round
        # solver='auto''s dense pick not weighed yet: a loaded state weighs it too. The value names the options the
        # switch may set to K-FAC's or CG's defaults (not given: the deletion service, which rebuilds its unlearner
        # from the resolved configuration, rebuilds it as auto from them); always written (False once weighed), as
        # the service merges a commit's state into the last one's and a stale True was weighed again at every load
        pending = self._dense_probe
        meta["dense_weigh_pending"] = dict(pending) if pending is not None else False
        if self._fitted:  # built by fit() and not yet used: the request after loading takes it as its own build
            meta["built_by_fit"] = True
            if self._fit_data is not None:
                meta["fit_data_nll"] = list(self._fit_data)
        # the unlearner's own generator (K-FAC's Monte-Carlo labels, probes, Lanczos starts): without it a run
        # continued from a checkpoint draws other curvature than the uninterrupted run from the next rebuild on
        tensors = {**tensors, "generator": self.generator.get_state()}
        if self._carry is not None:
            tensors = {**tensors, "carry": self._carry}
        if self._anchor is not None:
            kept = {f"recenter_{k}": v for k, v in asdict(self._anchor).items() if v is not None}
            tensors = {**tensors, **kept}
        # the removed rows' digests (sorted: the same set saves the same bytes): without them a row removed before a
        # checkpoint and sent again after reloading it was removed a second time (stop 63's flows probe). Always
        # written, empty included: a loaded state's set replaces the unlearner's
        seen = sorted(self._removed_digests)
        digests = torch.frombuffer(bytearray(b"".join(seen)), dtype=torch.uint8) if seen else torch.empty(0)
        tensors["removed_digests"] = digests.to(torch.uint8).reshape(len(seen), _DIGEST_BYTES)
        return tensors, meta

    def load_curvature_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`curvature_state` returned (tensors are cloned).

        A state saved after ``solver="auto"`` switched to CG (a weight read outside its module), or from a dense
        pick to K-FAC or CG (its build's estimated cost), is loaded into an ``auto`` unlearner that has not probed yet
        by making the same switch; one saved before its dense pick was weighed leaves it to be weighed.

        Raises:
            ValueError: the state was saved for a model of another parameter count or dtype, its
                ``recenter_drawn`` is not 1-D int64 flat indices within the parameter count, or it was saved by
                another solver; or it is damaged or edited (non-finite tensors, K-FAC factors missing, of other
                shapes or with negative eigenvalues, CG's preconditioner in parts that do not fit together, part
                of the corrections' anchor, a generator state of another size, removed rows' digests that are not
                uint8 ``[rows, 16]``, metadata of the wrong type:
                :meth:`_check_curvature_state`). Nothing is loaded.
            TypeError: ``tensors`` or ``meta`` is not a dict.
        """
        self._check_curvature_state(tensors, meta)
        saved = meta.get("solver")  # absent in states saved before stop 55: taken as this unlearner's
        from_dense = self._dense_probe is not None and saved in (SolverName.KFAC.value, SolverName.CG.value)
        if saved is not None and saved != self.solver.value and not from_dense:
            # refused before solver='auto''s pending weighing is dropped below (stop 63's review: a refused state
            # left an auto unlearner's dense pick unweighed for good)
            auto = self._auto_probe
            if not (saved == SolverName.CG.value and auto is not None and not auto["kfac_options"]):
                raise ValueError(
                    f"load_curvature_state: the state was saved by solver={saved!r}, this unlearner uses "
                    f"solver={self.solver.value!r}; nothing was loaded (build the unlearner with solver={saved!r}, "
                    "or start without the saved state)"
                )
        probe, self._dense_probe = self._dense_probe, None  # solver='auto''s dense choice: the state's settles it
        if from_dense:
            self._switch_from_dense(
                SolverName(saved), f"; {saved} as in the loaded state (the dense build estimated costlier there)", probe
            )
        elif probe is not None and saved == self.solver.value and meta.get("dense_weigh_pending"):
            # saved before the first request or fit weighed it (a checkpoint of a fresh unlearner): weighed on the
            # first rows read after loading, as in the run it was saved from (before: never, the dense solver kept)
            self._dense_probe = probe
        if saved is not None and saved != self.solver.value:  # (auto's K-FAC that takes CG: allowed above)
            probe = self._auto_probe
            self._auto_probe = None
            self._switch_to_cg(probe, "; CG as in the loaded state (a weight read outside its module there)")
        self._state_loaded = True  # until a request is applied: a bank set now discards what is loaded
        if self.solver is SolverName.KFAC:
            self.curvature.load_state_dict(tensors, meta, model=self.model)
        else:
            self.curvature.load_state_dict(tensors, meta)
        self._version += 1  # an earlier proposal would overwrite what was just loaded
        # a curvature fit() built and no request has used yet is searched as the request's own build after loading
        # too (every damping shape, no drift test); without the flag it was taken as reused
        self._fitted = bool(meta.get("built_by_fit", False)) and self.curvature.removed_free
        data = meta.get("fit_data_nll")
        self._fit_data = (float(data[0]), float(data[1])) if self._fitted and data is not None else None
        if "damping_state" in meta:
            self.control.set_state(meta["damping_state"])
        else:  # saved before damping shapes existed
            self.control.set_state({"relatives": {"identity": float(meta.get("damping_relative", 0.0))}})
        rows = meta.get("rows_at_samples")
        self._rows_at_samples = None if rows is None else int(rows)
        self._cumulative_warned = bool(meta.get("cumulative_warned", False))
        self._g_round = int(meta.get("grad_draw_round", 0))
        if tensors.get("generator") is not None:
            self.generator.set_state(tensors["generator"].clone())
        carry = tensors.get("carry")
        self._carry = None if carry is None else carry.clone()
        digests = tensors.get("removed_digests")
        if digests is not None:  # absent from states saved before stop 63: the unlearner's own are kept
            self._removed_digests = {bytes(row) for row in digests.contiguous().numpy().tolist()}
        saved = {f.name: tensors.get(f"recenter_{f.name}") for f in fields(_Anchor)}
        parts = {k: v.clone() for k, v in saved.items() if v is not None}
        whole = {"index", "thetas", "pair", "removed"} <= parts.keys()
        if whole and parts.get("moment") is not None and "applied" not in parts:
            parts["applied"] = torch.ones((), dtype=torch.int64)  # saved when a measured moment meant a correction ran
        if whole and parts.get("moment") is not None and "measured_draws" not in parts:
            # saved before the moment was kept per draw (its mean over the paired draws): measured again at the next
            # correction, on the rows remaining then (the target stays the original bank's moment)
            for k in ("moment", "removed_pair"):
                parts.pop(k, None)
            parts["pair"] = self._pair_positions(parts["index"].numel())
        self._anchor = _Anchor(**parts) if whole else None

    def _check_curvature_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
        """Refuse, before anything is loaded, a state whose per-parameter tensors do not fit this model: loaded
        anyway, a carried influence, anchored samples or a dense Hessian of another size failed inside the next
        request with torch's size-mismatch error, and float32 anchored samples in a float64 model with a dtype error.
        Since stop 63 (the flows probe's edited checkpoints) also a state that is not whole or not finite: NaN in the
        carried influence (accepted: every later request refused as "the shifted parameters are not finite"), K-FAC
        factors of other shapes (torch's "mat1 and mat2 shapes cannot be multiplied" at the next request), a missing
        factor (a bare ``KeyError``), part of the corrections' anchor (dropped without a word), a generator state of
        another size, and metadata of the wrong type (``AttributeError``, ``int()``'s error) or a non-finite damping."""
        corrupt = (
            "the state is corrupt or was edited; nothing was loaded (load the state as curvature_state() gave it, or "
            "start without it)"
        )
        if not isinstance(tensors, Mapping) or not isinstance(meta if meta is not None else {}, Mapping):
            raise TypeError(
                "load_curvature_state takes the (tensors, meta) pair curvature_state() returned: a dict of tensors "
                f"and a dict, got {type(tensors).__name__} and {type(meta).__name__}"
            )
        odd = sorted(str(k) for k, t in tensors.items() if not isinstance(t, torch.Tensor))
        if odd:
            raise ValueError(
                f"load_curvature_state: the saved {', '.join(map(repr, odd[:5]))} is not a tensor: {corrupt}"
            )
        bad = sorted(
            k
            for k, t in tensors.items()
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())
        )
        if bad:
            raise ValueError(
                f"load_curvature_state: the saved {', '.join(map(repr, bad[:5]))} hold{'s' if len(bad) == 1 else ''} "
                f"NaN or infinite values: {corrupt}"
            )
        gen = tensors.get("generator")
        want = self.generator.get_state()
        if gen is not None and (gen.dtype != want.dtype or gen.shape != want.shape):
            raise ValueError(
                f"load_curvature_state: the saved 'generator' is a {str(gen.dtype)[6:]} tensor of shape "
                f"{tuple(gen.shape)}, where a generator's state is {str(want.dtype)[6:]} of shape {tuple(want.shape)}: "
                f"{corrupt}"
            )
        self._check_anchor_state(tensors, corrupt)
        digests = tensors.get("removed_digests")
        if digests is not None and (
            digests.dtype != torch.uint8 or digests.ndim != 2 or digests.shape[1] != _DIGEST_BYTES
        ):
            raise ValueError(
                f"load_curvature_state: the saved 'removed_digests' is a {str(digests.dtype)[6:]} tensor of shape "
                f"{tuple(digests.shape)}, where the removed rows' digests are a uint8 tensor of shape [rows, "
                f"{_DIGEST_BYTES}]: {corrupt}"
            )
        if meta is not None:
            _check_state_meta(meta, corrupt)
            if self.solver is SolverName.KFAC or any(k.startswith("kfac/") for k in tensors) or "kfac" in meta:
                from .backends.kfac import KFACBackend

                KFACBackend.check_state(self.model, tensors, meta, corrupt)
            U, c = tensors.get("precond_U"), meta.get("precond_c")
            if U is not None and "precond_c" in meta:  # CG's preconditioner (loaded only with its precond_c)
                lam = tensors.get("precond_lam")
                if (
                    lam is None
                    or U.ndim != 2
                    or tuple(lam.shape) != (U.shape[1],)
                    or isinstance(c, bool)
                    or not isinstance(c, (int, float))
                    or not math.isfinite(c)
                ):
                    shown = "missing" if lam is None else tuple(lam.shape)
                    raise ValueError(
                        f"load_curvature_state: CG's preconditioner does not fit together (precond_U "
                        f"{tuple(U.shape)}, precond_lam {shown}, precond_c {ascii(c)[:20]}): {corrupt}"
                    )
        dim = self.spec.dim
        dtype = ParamSpec.flatten_module(self.model).dtype
        # name -> which dimensions must equal the parameter count
        expected = {
            "carry": (0,),
            "cache": (0, 1),
            "precond_U": (0,),
            "recenter_thetas": (-1,),
            "recenter_removed": (-1,),
            "recenter_moment": (-1,),
            "recenter_removed_pair": (-1,),
            "recenter_removed_noise": (-1,),
        }
        for name, dims in expected.items():
            t = tensors.get(name)
            if t is None:
                continue
            if t.ndim < max(len(dims), 1) or any(t.shape[d] != dim for d in dims):
                raise ValueError(
                    f"load_curvature_state: the saved {name!r} has shape {tuple(t.shape)}, but this model has {dim} "
                    "parameters: the state was saved for another model; nothing was loaded (build the unlearner "
                    "for the model it was saved with, or start without it: reset_curvature())"
                )
            if t.is_floating_point() and t.dtype != dtype:
                raise ValueError(
                    f"load_curvature_state: the saved {name!r} is {str(t.dtype)[6:]}, the model's parameters "
                    f"{str(dtype)[6:]}: the state was saved under another dtype; nothing was loaded (convert the "
                    "state's tensors, or start without it)"
                )
        self._check_drawn_state(tensors.get("recenter_drawn"), dim)

    @staticmethod
    def _check_anchor_state(tensors: Mapping[str, torch.Tensor], corrupt: str) -> None:
        """Refuse part of the corrections' anchor (``recenter_*``; :meth:`load_curvature_state` dropped a partial
        one without a word) or one whose parts disagree in their numbers of samples."""
        parts = {f.name: tensors.get(f"recenter_{f.name}") for f in fields(_Anchor)}
        have = {k for k, v in parts.items() if v is not None}
        if not have:
            return
        missing = sorted({"index", "thetas", "pair", "removed"} - have)
        if missing:
            raise ValueError(
                "load_curvature_state: the state holds part of the corrections' anchor (recenter_every) without "
                f"{', '.join(f'recenter_{k}' for k in missing)}: {corrupt}"
            )
        index, pair = parts["index"], parts["pair"]
        m = index.numel()
        measured = parts["measured_draws"]
        rows = {"thetas": m, "removed_noise": m, "moment": pair.numel(), "removed_pair": pair.numel()}
        # saved before the moment was kept per draw: one [D] mean, no measured_draws (measured again when loaded)
        old = {"moment", "removed_pair"} if measured is None else set()
        wrong = [
            f"recenter_{k} {tuple(parts[k].shape)}"
            for k, r in rows.items()
            if parts[k] is not None
            and not (k in old and parts[k].ndim == 1)
            and (parts[k].ndim != 2 or parts[k].shape[0] != r)
        ]
        if index.ndim != 1 or index.dtype != torch.int64:
            wrong.append(f"recenter_index {str(index.dtype)[6:]} {tuple(index.shape)}")
        if (
            pair.ndim != 1
            or pair.dtype != torch.int64
            or (pair.numel() and not 0 <= int(pair.min()) <= int(pair.max()) < m)
        ):
            wrong.append(f"recenter_pair {str(pair.dtype)[6:]} {tuple(pair.shape)}")
        if measured is not None and measured.shape != pair.shape:
            wrong.append(f"recenter_measured_draws {tuple(measured.shape)}")
        if wrong:
            raise ValueError(
                f"load_curvature_state: the corrections' anchor does not fit together ({'; '.join(wrong)}; its "
                f"{m} samples' index a 1-D int64 tensor, {pair.numel()} paired positions among them): {corrupt}"
            )

    @staticmethod
    def _check_drawn_state(drawn: torch.Tensor | None, dim: int) -> None:
        """Refuse a saved ``recenter_drawn`` (``_Anchor.drawn``) that is not a 1-D int64 tensor of flat parameter
        indices in ``[0, dim)``: loaded anyway, it failed inside the next correction (``index_fill``'s dtype or
        range error) or masked other entries than the ones drawn. ``None`` (saved before the key existed, or no
        row drawn) passes."""
        if drawn is None:
            return
        fix = (
            "the state is corrupt or was saved for another model; nothing was loaded (drop the key "
            "'recenter_drawn' from the state only if no embedding row was drawn since the first request, else start "
            "without the state: reset_curvature())"
        )
        if drawn.ndim != 1 or drawn.dtype != torch.int64:
            raise ValueError(
                f"load_curvature_state: the saved 'recenter_drawn' is a {str(drawn.dtype)[6:]} tensor of shape "
                f"{tuple(drawn.shape)}, where the flat indices of the entries drawn from the prior (a 1-D int64 "
                f"tensor) are expected: {fix}"
            )
        if drawn.numel() and (int(drawn.min()) < 0 or int(drawn.max()) >= dim):
            raise ValueError(
                f"load_curvature_state: the saved 'recenter_drawn' holds flat indices from {int(drawn.min())} to "
                f"{int(drawn.max())}, but this model's parameter indices run from 0 to {dim - 1}: {fix}"
            )

    def drop_curvature(self) -> None:
        """Forget the cached curvature alone (a :meth:`fit`'s build included), so that the next request builds its
        own; the damping, carried influence, first moment and removal count stay (:meth:`reset_curvature` forgets
        those too). The deletion service calls it when a request's override changed what the curvature is built
        with."""
        self.curvature.reset()
        self._fitted, self._fit_data = False, None
        self._version += 1  # an earlier proposal would put back the curvature just dropped

    def reset_curvature(self) -> None:
        """Forget cached curvature, the carried damping, carried influence, the first moment ``recenter_every``
        restores and the count of rows removed since the samples were set (:data:`CUMULATIVE_REMOVAL`); call after
        the chain moved a lot."""
        self.curvature.reset()
        self._fitted, self._fit_data = False, None
        self.control.set_state({})
        self._carry = None
        self._anchor = None
        self._rows_at_samples, self._cumulative_warned = None, False
        self._state_loaded = False  # discarded on purpose: a bank set next does not warn
        self._version += 1  # an earlier proposal would restore what was just forgotten
