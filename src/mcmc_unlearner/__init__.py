"""mcmc-unlearner: remove deleted training data from SG-MCMC posteriors without retraining.

Public API:

* samplers: :class:`SGLD`, :class:`SGHMC`;
* the unlearner: :class:`MCMCUnlearner` (ours) and :class:`sgmcmcUnlearner` (the seed's subclass API);
* data: :class:`RemovableDataset`;
* solvers: :func:`solve`, :class:`SolverName`;
* errors: :class:`UnlearningError` and its subclasses :class:`InvalidRequestError`, :class:`QualityError`,
  :class:`SolverDivergedError`.
"""

import importlib
import importlib.util
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# the public names are imported on first use (PEP 562), so that ``mcmc-unlearner --version`` or a bad option
# is answered without loading torch (1.4 s); ``from mcmc_unlearner import MCMCUnlearner`` works as before
_LAZY = {
    "sgmcmcUnlearner": "compat",
    "RemovableDataset": "data",
    "InvalidRequestError": "errors",
    "QualityError": "errors",
    "SolverDivergedError": "errors",
    "UnlearningError": "errors",
    "SGHMC": "samplers",
    "SGLD": "samplers",
    "SolveResult": "solvers",
    "SolverName": "solvers",
    "solve": "solvers",
    "BankShift": "unlearner",
    "Expectation": "unlearner",
    "FitReport": "unlearner",
    "HessianKind": "unlearner",
    "MCMCUnlearner": "unlearner",
    "RemovalReport": "unlearner",
}

if TYPE_CHECKING:
    from .compat import sgmcmcUnlearner
    from .data import RemovableDataset
    from .errors import InvalidRequestError, QualityError, SolverDivergedError, UnlearningError
    from .samplers import SGHMC, SGLD
    from .solvers import SolveResult, SolverName, solve
    from .unlearner import BankShift, Expectation, FitReport, HessianKind, MCMCUnlearner, RemovalReport


def __getattr__(name: str) -> Any:
    """A public name, imported on first use (with the module that defines it)."""
    module = _LAZY.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # a submodule, as when __init__ imported them all
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
