"""Deletion requests against saved models (compatibility module): see :mod:`mcmc_unlearner.service.deletion`.

``forget``, ``status`` and ``verify`` live in :mod:`mcmc_unlearner.service.deletion`, request parsing in
:mod:`mcmc_unlearner.service.requests`, the quality gate in :mod:`mcmc_unlearner.service.gate` and the CLI in
:mod:`mcmc_unlearner.service.commands`.
"""

from __future__ import annotations

from .service.commands import register
from .service.deletion import ForgetOutcome, VerifyResult, forget, status, verify
from .service.gate import OnFailure, QualityGateError
from .service.requests import check_request_id, check_settings, parse_ids, parse_ids_file, read_ids

__all__ = [
    "ForgetOutcome",
    "OnFailure",
    "QualityGateError",
    "VerifyResult",
    "check_request_id",
    "check_settings",
    "forget",
    "parse_ids",
    "parse_ids_file",
    "read_ids",
    "register",
    "status",
    "verify",
]
