"""mcmc-unlearner: remove deleted training data from SG-MCMC posteriors without retraining.

Public API:

* samplers: :class:`SGLD`, :class:`SGHMC`;
* the unlearner: :class:`MCMCUnlearner` (ours) and :class:`sgmcmcUnlearner` (the seed's subclass API);
* data: :class:`RemovableDataset`;
* solvers: :func:`solve`, :class:`SolverName`;
* errors: :class:`UnlearningError` and its subclasses :class:`InvalidRequestError`, :class:`QualityError`,
  :class:`SolverDivergedError`.
"""

import logging

from .compat import sgmcmcUnlearner
from .data import RemovableDataset
from .errors import InvalidRequestError, QualityError, SolverDivergedError, UnlearningError
from .samplers import SGHMC, SGLD
from .solvers import SolveResult, SolverName, solve
from .unlearner import BankShift, Expectation, FitReport, HessianKind, MCMCUnlearner, RemovalReport

__version__ = "0.1.0"

# progress of long requests goes to the "mcmc_unlearner" logger: silent unless the caller configures logging
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "SGHMC",
    "SGLD",
    "BankShift",
    "Expectation",
    "FitReport",
    "HessianKind",
    "InvalidRequestError",
    "MCMCUnlearner",
    "QualityError",
    "RemovableDataset",
    "RemovalReport",
    "SolveResult",
    "SolverDivergedError",
    "SolverName",
    "UnlearningError",
    "__version__",
    "sgmcmcUnlearner",
    "solve",
]
