"""The option names shared by the API and the CLI, in a module that imports neither torch nor numpy.

The command line parses and checks its arguments against these before it loads torch, so that a bad option is
refused at once; :mod:`~mcmc_unlearner.solvers`, :mod:`~mcmc_unlearner.unlearner` and
:mod:`~mcmc_unlearner.service.gate` re-export them under their usual names.
"""

from __future__ import annotations

import math
import numbers
from enum import Enum
from typing import Any

__all__ = [
    "DEFAULT_REPAIR_STEPS",
    "MAX_REPAIR_STEPS",
    "BankShift",
    "EmptiedLabel",
    "Expectation",
    "HessianKind",
    "OnFailure",
    "SolverName",
    "check_damping",
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
    6): draw that label's output-layer row from its conditional given the remaining data (``resample``, a Gibbs step
    of the retrained posterior; :mod:`mcmc_unlearner.emptied`) and check again; draw it for every emptied label
    (``always``); or refuse at once (``refuse``)."""

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


def check_damping(damping: Any) -> float | None:
    """The ``damping`` option: ``"auto"`` (``None``: searched per request) or a finite number >= 0 (that number).

    Raises:
        ValueError: Any other value (the message names the valid ones).
    """
    if isinstance(damping, str):
        if damping != "auto":
            raise ValueError(f"damping must be 'auto' or a number >= 0, got {damping!r}")
        return None
    real = isinstance(damping, numbers.Real) and not isinstance(damping, bool)  # numpy numbers too
    if not (real and math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be 'auto' or a finite number >= 0, got {damping!r}")
    return float(damping)
