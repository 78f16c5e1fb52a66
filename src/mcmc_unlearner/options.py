"""The option names shared by the API and the CLI, in a module that imports neither torch nor numpy.

The command line parses and checks its arguments against these before it loads torch, so that a bad option is
refused at once; :mod:`~mcmc_unlearner.solvers`, :mod:`~mcmc_unlearner.unlearner` and
:mod:`~mcmc_unlearner.service.gate` re-export them under their usual names.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "DEFAULT_REPAIR_STEPS",
    "MAX_REPAIR_STEPS",
    "BankShift",
    "EmptiedLabel",
    "HessianKind",
    "OnFailure",
    "SolverName",
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
