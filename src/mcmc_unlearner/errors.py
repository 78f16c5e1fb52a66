"""Exceptions raised by mcmc-unlearner. Every one names the problem and the fix."""

from __future__ import annotations


class UnlearningError(RuntimeError):
    """Base class of the library's errors."""


class InvalidRequestError(UnlearningError, ValueError):
    """A deletion request is malformed (unknown, repeated or already-removed ids, empty, non-finite data)."""


class SolverDivergedError(UnlearningError):
    """An inverse-Hessian-vector solve diverged or produced non-finite values; nothing was changed."""
