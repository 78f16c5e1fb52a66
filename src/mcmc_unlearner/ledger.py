"""Audit ledger (compatibility module): see :mod:`mcmc_unlearner.service.ledger`."""

from __future__ import annotations

from .service.ledger import (
    GENESIS,
    LEDGER_NAME,
    LedgerError,
    LedgerRead,
    append_entry,
    canonical_json,
    check_chain,
    fsync_dir,
    line_sha256,
    parse_ledger,
    read_ledger,
    request_id_for,
    strict_loads,
    truncate_ledger,
)

__all__ = [
    "GENESIS",
    "LEDGER_NAME",
    "LedgerError",
    "LedgerRead",
    "append_entry",
    "canonical_json",
    "check_chain",
    "fsync_dir",
    "line_sha256",
    "parse_ledger",
    "read_ledger",
    "request_id_for",
    "strict_loads",
    "truncate_ledger",
]
