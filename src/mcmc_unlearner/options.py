"""The option names shared by the API and the CLI, in a module that imports neither torch nor numpy.

The command line parses and checks its arguments against these before it loads torch, so that a bad option is
refused at once; :mod:`~mcmc_unlearner.solvers`, :mod:`~mcmc_unlearner.unlearner` and
:mod:`~mcmc_unlearner.service.gate` re-export them under their usual names. :func:`check_option` is
``MCMCUnlearner``'s own check of each keyword argument's value (the constructor calls it), so the command line
refuses a bad value with the library's message without loading torch; :func:`check_combinations` is its refusal of
option combinations that do not depend on the model (the constructor calls its rules one by one), and, given what
:class:`ModelFacts` says of a model, those that do: what ``solver='auto'`` picks for it (:func:`auto_solver`), the
dense solvers' memory and the options' range in its dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any, NamedTuple

__all__ = [
    "DEFAULT_REPAIR_STEPS",
    "FLOAT_LIMITS",
    "MAX_REPAIR_STEPS",
    "BankShift",
    "DampingShape",
    "EmptiedLabel",
    "Expectation",
    "HessianKind",
    "Likelihood",
    "ModelFacts",
    "OnFailure",
    "ScreenMode",
    "SolverName",
    "auto_solver",
    "auto_solver_reason",
    "check_bank_shift_solver",
    "check_combinations",
    "check_damping",
    "check_damping_shape_solver",
    "check_hessian_solver",
    "check_option",
    "dense_memory_refusal",
    "is_bool",
    "is_integer",
    "is_number",
    "representable_refusal",
    "shown_value",
    "weigh_dense_build",
]


class SolverName(str, Enum):
    """Inverse-HVP solvers, shared by the API and the CLI."""

    LISSA = "lissa"
    CG = "cg"
    EXACT = "exact"
    GGN = "ggn"
    LOWRANK = "lowrank"
    KFAC = "kfac"


class HessianKind(str, Enum):
    """Which energy's Hessian is inverted: the paper's full-data one or the remaining-data one (Newton)."""

    REMAINING = "remaining"
    FULL = "full"


class Expectation(str, Enum):
    """Where the posterior expectations of G and H come from."""

    BANK = "bank"
    CHAIN = "chain"


class EmptiedLabel(str, Enum):
    """What a request does when it removes the last rows of a label the moved samples still predict (README step
    6): draw that label's output-layer row from its conditional given the remaining data (a Gibbs step of the
    retrained posterior; :mod:`mcmc_unlearner.emptied`) and check again, for every emptied label (``always``, the
    default since stop 61) or only for one the moved samples still give a tenth of the probability or make the top
    class on half its rows (``resample``); or refuse at once (``refuse``). A label still the top class on half its
    rows whose row cannot be drawn (or, under ``refuse``, is not drawn) is refused whatever its probability."""

    RESAMPLE = "resample"
    ALWAYS = "always"
    REFUSE = "refuse"


class BankShift(str, Enum):
    """How stored samples move: one common vector, per-sample influence, or exact Gaussian transport."""

    MEAN = "mean"
    SAMPLE = "sample"
    AFFINE = "affine"


class OnFailure(str, Enum):
    """What to do with a removal that fails the quality checks (shared by the API and ``--on-failure``)."""

    REFUSE = "refuse"
    REPAIR = "repair"
    ACCEPT = "accept"


DEFAULT_REPAIR_STEPS = 1000
MAX_REPAIR_STEPS = 10**7


#: An integer of more digits than this is shown by its size in a refusal, not digit by digit (``damping=10**400``
#: printed all 401 digits, and past 4,300 Python's own limit on int-to-str conversion raised its ValueError in
#: place of the refusal: review).
SHOWN_DIGITS = 30
#: A value whose ``repr`` is longer than this many characters is shown cut, with its length.
SHOWN_CHARS = 100


def _digits(n: int) -> int:
    """How many decimal digits ``abs(n)`` has, found without converting it to a string (which Python refuses past
    4,300 digits)."""
    n = abs(n)
    if n == 0:
        return 1
    d = int(math.log10(n)) + 1  # log10 takes an int of any size; corrected below where the float rounds
    if n >= 10**d:
        d += 1
    elif n < 10 ** (d - 1):
        d -= 1
    return d


def shown_value(value: Any) -> str:
    """An option's value as a refusal shows it: its ``repr``, but an integer of more than ``SHOWN_DIGITS`` digits as
    its size and its value to three significant digits, rounded (``10**400``: ``an integer of 401 digits
    (1.00e+400)``; ``10**31 - 1``: ``an integer of 31 digits (1.00e+31)``) and a ``repr`` longer than
    ``SHOWN_CHARS`` cut, with its length; never Python's ValueError for an integer past 4,300 digits.

    Args:
        value: The value refused.

    Returns:
        A short rendering of ``value`` for a message.
    """
    if isinstance(value, numbers.Integral) and not is_bool(value):
        n = int(value)
        d = _digits(n)
        if d > SHOWN_DIGITS:
            unit = 10 ** (d - 3)
            lead, rest = divmod(abs(n), unit)  # the three leading digits
            if 2 * rest >= unit:  # rounded half up (cut, 10**31 - 1 read 9.99e+30)
                lead += 1
            exponent = d - 1
            if lead == 1000:  # rounded up to the next power of ten
                lead, exponent = 100, d
            sign = "-" if n < 0 else ""
            return f"an integer of {d} digits ({sign}{lead // 100}.{lead % 100:02d}e+{exponent})"
    try:
        text = repr(value)
    except ValueError:  # e.g. a Fraction of an integer past Python's digit limit
        return f"a {type(value).__name__} too large to show"
    if len(text) > SHOWN_CHARS:
        return f"{text[: SHOWN_CHARS - 20]}... ({len(text):,} characters)"
    return text


def check_damping(damping: Any) -> float | None:
    """The ``damping`` option: ``"auto"`` (``None``: searched per request) or a finite number >= 0 (that number).

    Raises:
        ValueError: Any other value (the message names the valid ones).
    """
    if isinstance(damping, str):
        if damping != "auto":
            raise ValueError(f"damping must be 'auto' or a number >= 0, got {shown_value(damping)}")
        return None
    real = isinstance(damping, numbers.Real) and not isinstance(damping, bool)  # numpy numbers too
    if not (real and finite(damping) and damping >= 0):
        raise ValueError(f"damping must be 'auto' or a finite number >= 0, got {shown_value(damping)}")
    return float(damping)


class DampingShape(str, Enum):
    """The damping term's form (module docstring): searched automatically, ``λI``, or the data term alone."""

    AUTO = "auto"
    IDENTITY = "identity"
    DATA = "data"


def is_bool(v: Any) -> bool:
    """``True``/``False``, numpy's booleans included (``np.bool_``; ``np.bool`` under numpy 2)."""
    return isinstance(v, bool) or (type(v).__name__ in ("bool_", "bool") and type(v).__module__ == "numpy")


def finite(v: numbers.Real) -> bool:
    """Whether the real number ``v`` is finite as a float (an integer too large for one, ``10**400``, is not)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def is_number(v: Any) -> bool:
    """A real number that is not a bool or NaN (an option's value)."""
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        return False
    try:
        return not math.isnan(v)
    except OverflowError:  # an integer too large for a float is a number, and not NaN
        return True


def is_integer(v: Any) -> bool:
    """An integer that is not a bool (``True`` is no row count)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


class ScreenMode(str, Enum):
    """How the safety check is screened (module docstring, "Screening"): never, to reject only (the default), or to
    reject and accept."""

    OFF = "off"
    REJECT = "reject"
    BOTH = "both"

    @classmethod
    def parse(cls, value: ScreenMode | str | bool) -> ScreenMode:
        """A mode from its name, or ``True``/``False`` (the former switch: screening both ways, or none)."""
        if is_bool(value):
            return cls.BOTH if value else cls.OFF
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"check_screen must be one of {[m.value for m in cls]} (or True/False), got {shown_value(value)}"
            ) from None


class Likelihood(str, Enum):
    """Which per-row loss the curvature's label expectation is taken for."""

    AUTO = "auto"
    CATEGORICAL = "categorical"
    GAUSSIAN = "gaussian"
    BERNOULLI = "bernoulli"
    EMPIRICAL = "empirical"


def choice(enum: type[Enum], name: str, value: Any, extra: Sequence[str] = ()) -> Any:
    """``enum(value)``, refused with the option's name and its choices (``'EXACT' is not a valid SolverName``
    named neither)."""
    try:
        return enum(value)
    except ValueError:
        choices = [*extra, *(m.value for m in enum)]
        raise ValueError(f"{name} must be one of {choices}, got {shown_value(value)}") from None


def flag(name: str, v: Any) -> bool:
    """A True/False option; numpy's booleans count (``bool("no")`` is True, so strings and None are refused)."""
    if not is_bool(v):
        raise ValueError(f"{name} must be True or False, got {shown_value(v)}")
    return bool(v)


def whole(name: str, v: Any, minimum: int, what: str = "") -> int:
    """An integer option, refused with its name when it is not one (``newton_steps=2.5`` was read as 2,
    ``check_draws=True`` as 1, ``iter_T="5"`` as 5, ``NaN`` failed inside ``int()``) or is below ``minimum``
    (``what``: the message's wording after the name)."""
    if not is_integer(v) or int(v) < minimum:
        raise ValueError(f"{name} {what or f'must be an integer >= {minimum}'}, got {shown_value(v)}")
    return int(v)


def _damping_shape(v: Any) -> DampingShape:
    if not isinstance(v, str) or v not in {d.value for d in DampingShape}:
        raise ValueError(f"damping_shape must be 'auto', 'identity' or 'data', got {shown_value(v)}")
    return DampingShape(v)


def _scaling(v: Any) -> Any:
    if not (v == "auto" or (is_number(v) and finite(v) and float(v) > 0)):
        raise ValueError(f"scaling must be 'auto' or a finite number > 0, got {shown_value(v)}")
    return v


def _tol(v: Any) -> float:
    # a string, True or a tensor was taken by float(); tol >= 1 is met by the zero step (cg refused it later,
    # naming only the zero shift; stop 47's probe)
    if not (is_number(v) and finite(v) and 0 < float(v) < 1):
        raise ValueError(
            f"tol must be a number in (0, 1), the relative residual a solve must reach, got {shown_value(v)}"
        )
    return float(v)


def _grad_draws(v: Any) -> Any:
    if v not in (None, "auto") and not (is_integer(v) and int(v) >= 1):
        raise ValueError(f"grad_draws must be 'auto', None (all) or an integer >= 1, got {shown_value(v)}")
    return v


def _turn_draws(v: Any) -> bool | str:
    if not (v == "auto" or is_bool(v)):
        raise ValueError(f"turn_draws must be 'auto', True or False, got {shown_value(v)}")
    return v if v == "auto" else bool(v)


def _drift_tol(v: Any) -> float:
    if not (is_number(v) and v > 0):  # inf: never rebuild on drift
        raise ValueError(f"drift_tol must be a number > 0, got {shown_value(v)}")
    return float(v) if finite(v) else math.inf


def _one_of(name: str, allowed: Sequence[str], shown: str) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if v not in allowed:
            raise ValueError(f"{name} must be {shown}, got {shown_value(v)}")
        return v

    return check


def _likelihood(v: Any) -> Any:
    choices = [m.value for m in Likelihood]
    if v not in choices:
        raise ValueError(f"likelihood must be one of {choices}, got {shown_value(v)}")
    return v


def _mc_samples(v: Any) -> int:
    if not (is_integer(v) and int(v) >= 1):
        raise ValueError(f"mc_samples must be an integer >= 1 (sampled labels per row), got {shown_value(v)}")
    return int(v)


def _seed(v: Any) -> int:
    if not (is_integer(v) and -(2**63) <= int(v) < 2**64):  # np.int64 / "1" / 2**70: raw torch errors
        raise ValueError(f"seed must be an integer (a 64-bit generator seed), got {shown_value(v)}")
    return int(v)


def _recenter_every(v: Any) -> Any:
    if v == "auto":
        return v
    if isinstance(v, str):
        raise ValueError(f"recenter_every must be 'auto' or an integer >= 0, got {shown_value(v)}")
    return whole("recenter_every", v, 0, "must be >= 0 (0: off), an integer")


def _slope_eta(v: Any) -> float:
    if v is None:
        return 0.0
    if not (is_number(v) and finite(v) and 0 <= float(v) < 1):
        raise ValueError(
            "slope_eta must be a number in [0, 1), the share of the model's G·x the bank's own slope along a step "
            f"must not clearly fall below (0 or None: no slope test; the default 0.25), got {shown_value(v)}"
        )
    return float(v)


def _newton_gate(v: Any) -> float:
    if v is None:
        return 0.0
    if not (is_number(v) and finite(v) and float(v) >= 0):
        raise ValueError(
            "newton_gate must be a number >= 0, the standard errors by which a sampled estimate of the bank's gap to "
            "equilibrium must lie below a third of the removal's ‖G‖ before newton_steps=1 takes newton_steps='auto''s "
            f"further steps (0 or None: never; the default 3), got {shown_value(v)}"
        )
    return float(v)


def _direct_z(v: Any) -> float:
    if v is None:
        return 0.0
    if not (is_number(v) and finite(v) and float(v) >= 0):
        raise ValueError(
            "direct_z must be a number >= 0, the standard errors by which a step's directly measured change of the "
            f"remaining energy may rise before the step is rejected (0 (the default) or None: no such test; stop 67 "
            f"measured 5), got {shown_value(v)}"
        )
    return float(v)


def _memory_budget(v: Any) -> int:
    from .memory import resolve_budget  # (torch-free)

    return resolve_budget(v)


#: ``MCMCUnlearner``'s check of each keyword argument's value on its own (:func:`check_option`); what depends on
#: the model, the sampler or other options is checked by the constructor.
_OPTION_CHECKS: dict[str, Callable[[Any], Any]] = {
    "memory_budget": _memory_budget,
    "exact_max_dim": lambda v: whole("exact_max_dim", v, 0),
    "hessian": lambda v: choice(HessianKind, "hessian", v),
    "solver": lambda v: v if v == "auto" else choice(SolverName, "solver", v, extra=("auto",)),
    "expectation": lambda v: None if v is None else choice(Expectation, "expectation", v),
    "bank_shift": lambda v: v if v == "auto" else choice(BankShift, "bank_shift", v, extra=("auto",)),
    "check_screen": lambda v: ScreenMode.parse(v),
    "max_damping_trials": lambda v: whole("max_damping_trials", v, 1),  # 2.5 was read as 2, "5" failed in <
    "slope_eta": _slope_eta,
    "newton_gate": _newton_gate,
    "direct_z": _direct_z,
    "damping": check_damping,
    "damping_shape": _damping_shape,
    "emptied_label": lambda v: choice(EmptiedLabel, "emptied_label", v),
    "emptied_max_row_evals": lambda v: whole(
        "emptied_max_row_evals", v, 1, "must be an integer >= 1 (stored samples × remaining rows the draw may read)"
    ),
    "scaling": _scaling,
    "iter_T": lambda v: whole("iter_T", v, 0),
    "tol": _tol,
    "samp_T": lambda v: whole("samp_T", v, 1),
    "grad_draws": _grad_draws,
    "turn_draws": _turn_draws,
    "curvature_draws": lambda v: None if v is None else whole("curvature_draws", v, 1),
    "refresh_every": lambda v: None if v is None else whole("refresh_every", v, 1),
    "precondition_rank": lambda v: whole("precondition_rank", v, 0),
    "drift_tol": _drift_tol,
    "check_draws": lambda v: whole("check_draws", v, 1),
    "check_rows": lambda v: whole("check_rows", v, 1),
    "negative_curvature": _one_of("negative_curvature", ("raise", "truncate"), "'raise' or 'truncate'"),
    "newton_steps": lambda v: (
        v if isinstance(v, str) and v == "auto" else whole("newton_steps", v, 1, "must be 'auto' or an integer >= 1")
    ),
    "newton_target": _one_of("newton_target", ("equilibrium", "relative"), "'equilibrium' or 'relative'"),
    "curvature_data": _one_of("curvature_data", ("auto", "minibatch", "full"), "'auto', 'minibatch' or 'full'"),
    "likelihood": _likelihood,
    "mc_samples": _mc_samples,
    "rescale_lr": lambda v: flag("rescale_lr", v),  # "no" was read as True, None as False
    "backend": _one_of("backend", ("auto", "func", "autograd"), "'auto', 'func' or 'autograd'"),
    "seed": _seed,
    "carry_deficit": lambda v: flag("carry_deficit", v),
    "shorten_steps": lambda v: flag("shorten_steps", v),
    "recenter_every": _recenter_every,
    "recenter_draws": lambda v: (
        v if v == "auto" else whole("recenter_draws", v, 1, "must be 'auto' or an integer >= 1")
    ),
}


def check_option(key: str, value: Any) -> Any:
    """``MCMCUnlearner``'s check of the keyword argument ``key``'s value on its own; returns it as the unlearner
    keeps it (e.g. an Enum member, an ``int``). Imports no torch.

    Raises:
        ValueError: A value the unlearner refuses (the message names the option and its valid values).
        KeyError: ``key`` is no option with a value check (``nll``, ``log_prior``, ``energy`` or unknown).
    """
    return _OPTION_CHECKS[key](value)


def check_bank_shift_solver(bank_shift: Any, solver: Any) -> None:
    """Refuse ``bank_shift='affine'`` with a solver that keeps no dense curvature matrices (both checked values)."""
    if bank_shift == BankShift.AFFINE and solver not in (SolverName.EXACT, SolverName.GGN):
        raise ValueError("bank_shift='affine' needs solver='exact' or 'ggn' (dense curvature matrices)")


def check_hessian_solver(solver: Any, hessian: Any) -> None:
    """Refuse ``solver='kfac'`` with ``hessian='full'`` (K-FAC builds the remaining data's curvature only)."""
    if solver == SolverName.KFAC and hessian == HessianKind.FULL:
        raise ValueError(
            "solver='kfac' supports hessian='remaining' only: for hessian='full' use solver='cg' (or 'auto', "
            "which picks it above exact_max_dim), or 'exact' on a small model"
        )


def check_damping_shape_solver(damping_shape: Any, solver: Any) -> None:
    """Refuse ``damping_shape='data'`` with a solver other than K-FAC (the others damp with λI only)."""
    if damping_shape == DampingShape.DATA and solver != SolverName.KFAC:
        raise ValueError(
            f"damping_shape='data' needs solver='kfac' (the {SolverName(solver).value} backend damps with λI only); "
            "use damping_shape='auto' or 'identity'"
        )


#: ``(largest, smallest normal)`` number of each floating dtype the unlearner takes (``torch.finfo``'s; a test
#: holds them equal).
FLOAT_LIMITS: dict[str, tuple[float, float]] = {
    "float32": (3.4028234663852886e38, 1.1754943508222875e-38),
    "float64": (1.7976931348623157e308, 2.2250738585072014e-308),
}
#: The dtype of each item size :data:`FLOAT_LIMITS` holds (``ModelFacts.itemsize``'s range check).
_FLOAT_NAMES = {4: "float32", 8: "float64"}
_DENSE_SOLVERS = (SolverName.EXACT, SolverName.GGN)


class ModelFacts(NamedTuple):
    """What ``MCMCUnlearner`` reads of a model to pick ``solver='auto'`` and to judge option combinations: the
    constructor builds it from the model it is given, the command line states it without building the model
    (its check before torch, :func:`check_combinations`).

    Attributes:
        dim: Trainable parameters.
        itemsize: Bytes per parameter (4: float32, 8: float64): the dense matrices' size, and for these two the
            dtype whose range :func:`check_combinations` checks ``damping``/``scaling`` in.
        kfac_layers: Trainable ``Linear``/``Conv1d``/``Conv2d`` layers (K-FAC's factored layers).
        weight_sharing: Sorted type names of the trainable convolution and recurrent layers (``("Conv2d",)``).
        attention: Whether the model has ``nn.MultiheadAttention``.
        tied_layers: Those of the ``kfac_layers`` whose weight the model uses more than once (K-FAC holds them in
            its diagonal block; the choice's reason says so).
        diagonal_layers: Those of the ``kfac_layers`` whose weight a parametrization computes, or that attention
            reads without calling them (``MultiheadAttention.out_proj``): K-FAC's diagonal block too, said alike.
    """

    dim: int
    itemsize: int = 4
    kfac_layers: int = 0
    weight_sharing: tuple[str, ...] = ()
    attention: bool = False
    tied_layers: int = 0
    diagonal_layers: int = 0


def auto_solver(
    model: ModelFacts,
    hessian: Any,
    exact_max_dim: int,
    memory_budget: int,
    custom_energy: bool = False,
    distributed: bool = False,
) -> SolverName:
    """What ``solver='auto'`` picks for ``model`` (:func:`auto_solver_reason`'s solver)."""
    return auto_solver_reason(model, hessian, exact_max_dim, memory_budget, custom_energy, distributed)[0]


def auto_solver_reason(
    model: ModelFacts,
    hessian: Any,
    exact_max_dim: int,
    memory_budget: int,
    custom_energy: bool = False,
    distributed: bool = False,
) -> tuple[SolverName, str]:
    """What ``solver='auto'`` picks for ``model`` and why (``MCMCUnlearner``'s rule, its ``solver_reason``): a
    dense solver when the dense matrices are small (``dim <= exact_max_dim`` and, in the parameters' item size,
    within half of ``memory_budget`` bytes), else K-FAC on Linear/Conv layers, else CG. The unlearner weighs a
    dense pick again on the first rows it reads (:func:`weigh_dense_build`).

    Args:
        model: What the unlearner reads of the model.
        hessian: Which energy's Hessian is inverted (K-FAC builds ``"remaining"`` only).
        exact_max_dim: Largest parameter count for the dense solvers.
        memory_budget: Bytes.
        custom_energy: Whether a custom ``energy=`` is given (no K-FAC or GGN then).
        distributed: Whether the unlearner runs under torch.distributed (no GGN then).
    """
    from .memory import dense_memory, format_bytes  # (torch-free)

    d = model.dim
    # in the model's item size: float64 matrices take 4/3 of float32's (dense_memory's default), and 'auto' took
    # the exact path for a 993-parameter float64 model whose 47 MB passed half an 80 MB budget (peak 312 MB)
    need = dense_memory(d, model.itemsize)
    small = d <= exact_max_dim and need <= memory_budget // 2
    kfac_ok = not custom_energy and hessian == HessianKind.REMAINING
    shared = "/".join(model.weight_sharing)
    limit = shown_value(exact_max_dim)  # (10**5000 is no number Python will print)
    if small and model.attention and kfac_ok and not shared:
        return SolverName.KFAC, (
            f"{d} parameters <= exact_max_dim {limit}, but attention applies its projections at "
            "every position, so each dense Hessian column is a pass through attention over every row and draw "
            "(an 890-parameter attention classifier: 34 s per request against 1.4-1.8 s with K-FAC; the dense "
            "Gauss-Newton matrix raised its held-out NLL 20-30x): K-FAC (pass solver='exact' for the Hessian)"
        )
    if small and not shared:
        return SolverName.EXACT, f"{d} parameters <= exact_max_dim {limit}"
    if small and not custom_energy and not distributed:
        return SolverName.GGN, (
            f"{d} parameters <= exact_max_dim {limit}, but {shared} layers share their "
            "weights across positions or steps, which makes each dense Hessian column cost hundreds of times a "
            "dense layer's: the dense Gauss-Newton matrix instead (C backward passes per row; pass "
            "solver='exact' for the Hessian)"
        )
    if d > exact_max_dim:
        why = f"{d} parameters > exact_max_dim {limit}"
    elif need > memory_budget // 2:
        why = f"dense matrices need {format_bytes(need)}, over half the memory budget"
    else:
        why = (
            f"{d} parameters, but {shared} layers share their weights across positions or steps, "
            "which makes each dense Hessian column cost hundreds of times a dense layer's (pass solver='exact' "
            "to take it anyway)"
        )
    if model.kfac_layers and kfac_ok:
        # a tied weight is held in K-FAC's diagonal block (kronecker.py): the reason counted it as a factored
        # layer (stop 45's probe: "3 layers for Kronecker factors" where none was factored)
        tied = model.tied_layers
        held = [
            f"{tied} of them with tied weights" if tied else "",
            f"{model.diagonal_layers} of them with a weight computed by a parametrization (weight_norm, "
            "spectral_norm, ...) or read by attention without calling the layer (out_proj)"
            if model.diagonal_layers
            else "",
        ]
        held = [h for h in held if h]
        also = f" ({'; '.join(held)}, which K-FAC holds in its diagonal block)" if held else ""
        return SolverName.KFAC, f"{why}; {model.kfac_layers} Linear/Conv layers for Kronecker factors{also}"
    if model.kfac_layers and not custom_energy:  # hessian="full": the removed rows' curvature too, which K-FAC lacks
        # (auto picked K-FAC, which then refused hessian='full' without naming a solver that takes it; stop 45)
        return SolverName.CG, f"{why}; hessian='full', which K-FAC does not build: matrix-free CG"
    return SolverName.CG, f"{why}; no Linear/Conv layers (or a custom energy): matrix-free CG"


#: A dense build's products where the vectorised (``vmap``) product fails on the model (e.g. boolean-mask indexing,
#: which ``vmap`` cannot batch, or an operation without a batching rule) and falls back to one reverse-mode product
#: per column and per draw: each costs this many vectorised ones (measured 11-13x on 306-610-parameter MLPs; a
#: frozen ``nn.EmbeddingBag`` fed by masked ids: 9,792 such products, 23.5 s of a 24 s request).
UNVECTORIZED_PRODUCT_COST = 12
#: Outputs per row whose Gauss-Newton Gram product ``J_rᵀΛJ_r`` (``C·D²`` multiply-adds a row) costs as much as one
#: vectorised Hessian-vector product column over that row (measured 15-85x cheaper per output and column on
#: 610-1,060-parameter MLPs; the lower end taken).
GRAM_OUTPUTS_PER_PRODUCT = 16
#: Solves a request takes (damping trials), counted in CG's estimate.
CG_SOLVES_ESTIMATE = 3


def weigh_dense_build(
    solver: SolverName,
    dim: int,
    outputs: int,
    vectorized: bool,
    exact_max_dim: int,
    kfac: bool,
    weight_sharing: bool,
    iter_T: int = 100,
    mc_samples: int = 1,
    dense_draws: int = 16,
    kfac_draws: int = 8,
    uses: float = 1.0,
) -> tuple[SolverName, str]:
    """``solver='auto'``'s second look at the dense solver it took (``exact`` or ``ggn``), on the first rows read:
    the dense build's estimated cost against what auto accepts for one and against the alternative's.

    Costs are in row products, one Hessian-vector product (or gradient pass) over one row at one draw, per row and
    draw of the dense build (the rows and draws each path reads scale every estimate alike). The dense Hessian
    takes ``dim`` of them (one per column), the Gauss-Newton matrix ``outputs × dim / GRAM_OUTPUTS_PER_PRODUCT``
    (its Gram product), either ``UNVECTORIZED_PRODUCT_COST`` times more where the vectorised product fails on the
    model's rows (``vectorized``); the dense Hessian's columns ``uses`` times more where a row's gradient uses each
    parameter that many times a plain dense network's (weights applied at every position of a sequence, frozen layers
    the gradient passes through: a 612-parameter tied-head language model over 11 tokens, 10.4, took 36 s CPU for
    its dense Hessian, 8x its SGLD chain; stop 59's probe), and so do the alternatives' passes. Auto accepts up to
    ``exact_max_dim`` (a vectorised dense Hessian of ``exact_max_dim`` parameters of a plain dense network). Over
    that, K-FAC (``kfac``: it builds this curvature) costs ``1 + mc_samples``
    gradient passes per row at its ``kfac_draws`` draws; else matrix-free CG ``iter_T`` products per solve,
    ``CG_SOLVES_ESTIMATE`` solves (not offered on a model with convolution or recurrent layers, whose Hessian
    products cost hundreds of times a dense layer's). The alternative is taken where its estimate is lower.

    Args:
        solver: The dense solver auto took.
        dim: Trainable parameters.
        outputs: Model outputs per row (the Gauss-Newton matrix's ``C``).
        vectorized: Whether the vectorised product ran on a probe of the model's rows.
        exact_max_dim: The ``exact_max_dim`` option.
        kfac: Whether K-FAC builds this curvature.
        weight_sharing: Whether the model has trainable convolution or recurrent layers.
        iter_T: CG's iteration cap.
        mc_samples: K-FAC's sampled backward passes per row.
        dense_draws: Draws the dense build reads.
        kfac_draws: Draws K-FAC reads.
        uses: Multiply-adds of a row's backward pass over ``4 × dim`` (at least 1; the dense Hessian only).

    Returns:
        The solver to use (``solver`` where the dense build is kept) and why, with the estimates.
    """
    penalty = 1 if vectorized else UNVECTORIZED_PRODUCT_COST
    if solver is SolverName.GGN:
        base = max(1, math.ceil(outputs * dim / GRAM_OUTPUTS_PER_PRODUCT))
        what = (
            f"the dense Gauss-Newton matrix's Gram product ({outputs} outputs per row × {dim} parameters / "
            f"{GRAM_OUTPUTS_PER_PRODUCT})"
        )
    elif uses > 1:
        base = max(1, math.ceil(dim * uses))
        what = (
            f"the dense Hessian ({dim} columns × {uses:.3g}: a row's gradient uses each parameter {uses:.3g} times "
            "a dense layer's)"
        )
    else:
        base, what = dim, f"the dense Hessian ({dim} columns)"
    dense = base * penalty
    slow = (
        ""
        if vectorized
        else f" × {UNVECTORIZED_PRODUCT_COST} (the vectorised product failed on the model's rows: one reverse-mode "
        "product per column and draw)"
    )
    estimate = f"{what}{slow}: {dense:,} row products per row and draw"
    if dense <= exact_max_dim:
        return solver, f"{estimate}, within the {shown_value(exact_max_dim)} of exact_max_dim"
    if kfac:
        alt, cost = SolverName.KFAC, (1 + mc_samples) * kfac_draws / max(dense_draws, 1) * max(uses, 1.0)
        how = f"K-FAC's {1 + mc_samples} gradient passes per row at {kfac_draws} draws, not {dense_draws}"
    elif not weight_sharing:
        alt, cost = SolverName.CG, iter_T * CG_SOLVES_ESTIMATE * penalty * max(uses, 1.0)
        times = f" × {penalty}" if penalty > 1 else ""
        how = f"matrix-free CG about {iter_T} products × {CG_SOLVES_ESTIMATE} solves{times}"
    else:
        return solver, f"{estimate}, over exact_max_dim {shown_value(exact_max_dim)}, but no cheaper path builds it"
    if uses > 1:
        how += f", × {uses:.3g} as well"
    if cost >= dense:
        return (
            solver,
            f"{estimate}, over exact_max_dim {shown_value(exact_max_dim)}, but {how}, {cost:,.3g}, is no cheaper",
        )
    return alt, (
        f"; but {estimate}, over exact_max_dim {shown_value(exact_max_dim)}, and {how}, take {cost:,.3g}: "
        f"{'K-FAC' if alt is SolverName.KFAC else 'matrix-free CG'} (estimated on the first rows read; pass "
        f"solver={solver.value!r} to build it anyway)"
    )


def dense_memory_refusal(solver: SolverName, dim: int, itemsize: int, budget: int, kfac_builds: bool) -> str | None:
    """Why a dense ``solver``'s matrices of ``dim`` parameters do not fit ``budget`` bytes (``None``: they do, or
    the solver is not dense); ``kfac_builds``: whether K-FAC builds this curvature (then offered too)."""
    from .memory import dense_memory, format_bytes  # (torch-free)

    need = dense_memory(dim, itemsize)
    if solver not in _DENSE_SOLVERS or need <= budget:
        return None
    alternatives = "solver='kfac' or 'cg'" if kfac_builds else "solver='cg'"
    return (
        f"solver={solver.value!r}: the dense matrices of {dim:,} parameters need "
        f"{format_bytes(need, up=True)}, over the memory budget of {format_bytes(budget)}: "
        f"raise memory_budget to at least {format_bytes(need, up=True)}, or use {alternatives}, "
        "whose needs depend on the data (a request they do not fit is refused before any step, naming "
        "the budget each needs)"
    )


def representable_refusal(
    name: str, value: float, dtype: str, limits: tuple[float, float], fix: str, zero_ok: bool = False
) -> str | None:
    """Why an option ``value`` is infinite (or, unless ``zero_ok``, nonzero but rounded to zero) in the parameters'
    ``dtype`` (its ``limits``: largest and smallest normal number), in which the solves apply it (``None``: it is
    not); ``fix`` says what to pass instead."""
    largest, smallest = limits
    if not (value > largest or (not zero_ok and 0 < value < smallest)):
        return None
    return (
        f"{name}={value:g} is {'not finite' if value > largest else 'zero or subnormal'} in the parameters' "
        f"dtype {dtype} (normal numbers from {smallest:.3g} to {largest:.3g}), in which the solves apply it: {fix}"
    )


#: What a refusal of ``damping``/``scaling`` out of the dtype's range says to pass instead.
DAMPING_FIX = (
    "pass damping='auto' (searched per request) or a fixed value of the order of the curvature, far below that"
)
SCALING_FIX = "pass scaling='auto' (0.9/λ_max) or a value below 2/λ_max(H)"


def check_combinations(options: Mapping[str, Any], model: ModelFacts | None = None) -> None:
    """``MCMCUnlearner``'s refusals of option combinations, the rules in its order (its keyword arguments
    ``options``, the others at their defaults; of two bad single values, the one named may differ from the
    constructor's, which checks every value first). Imports no torch.

    Without ``model``, those that do not depend on the model; with ``solver='auto'`` (the default) nothing is then
    refused, as what it picks depends on the model. With ``model`` (what the constructor reads of the model it will
    be given), also ``solver='auto'``'s pick for it (:func:`auto_solver`), the dense solvers' memory (a
    ``memory_budget`` of ``None`` or a percentage: of the memory available now) and ``damping``/``scaling`` out of
    its dtype's range. Left to the constructor: a custom ``energy=``, ``expectation='chain'`` without a sampler,
    ``solver='ggn'`` under torch.distributed.

    Raises:
        ValueError: A combination the constructor refuses (its message), or a value it refuses
            (:func:`check_option`).
        MemoryError: ``model``'s dense matrices over the memory budget (the constructor's message).
    """
    hessian = check_option("hessian", options.get("hessian", HessianKind.REMAINING))
    solver = check_option("solver", options.get("solver", "auto"))
    if model is not None:
        if model.itemsize not in _FLOAT_NAMES:
            raise ValueError(f"ModelFacts.itemsize {model.itemsize!r}: the unlearner takes float32 (4) or float64 (8)")
        budget = check_option("memory_budget", options.get("memory_budget"))
        if solver == "auto":
            solver = auto_solver(
                model, hessian, check_option("exact_max_dim", options.get("exact_max_dim", 1000)), budget
            )
        kfac_builds = bool(model.kfac_layers) and hessian == HessianKind.REMAINING
        problem = dense_memory_refusal(solver, model.dim, model.itemsize, budget, kfac_builds)
        if problem:
            raise MemoryError(problem)
    if solver == "auto":
        return
    bank_shift = check_option("bank_shift", options.get("bank_shift", "auto"))
    check_bank_shift_solver(bank_shift, solver)  # ('auto' is 'affine' only with a dense solver)
    check_hessian_solver(solver, hessian)
    check_damping_shape_solver(check_option("damping_shape", options.get("damping_shape", "auto")), solver)
    if model is None:
        return
    dtype = _FLOAT_NAMES[model.itemsize]
    limits = FLOAT_LIMITS[dtype]
    scaling = check_option("scaling", options.get("scaling", "auto"))
    for name, value, fix, zero_ok in (
        ("damping", check_option("damping", options.get("damping", "auto")), DAMPING_FIX, True),  # (None: auto)
        ("scaling", None if isinstance(scaling, str) else float(scaling), SCALING_FIX, False),
    ):
        problem = None if value is None else representable_refusal(name, value, dtype, limits, fix, zero_ok)
        if problem:
            raise ValueError(problem)
