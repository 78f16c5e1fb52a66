"""Append-only audit ledger of a saved model: one JSON line per event, hash-chained.

The ledger lives in the model folder as ``ledger.jsonl``. Line 1 records the save (``"event": "save"``), every
later line one applied deletion request (``"event": "forget"``). Each line is canonical JSON (sorted keys, no
spaces, ASCII; :func:`canonical_json`) and carries ``prev_sha256``, the SHA-256 of the previous line's bytes
(64 zeros for the first), so editing, dropping or reordering any line breaks the chain. The manifest names the
number of committed lines and the SHA-256 of the last one (the **head**); lines after those are the torn tail
of an interrupted request and are rolled back (truncated) by :func:`mcmc_unlearner.service.checkpoint.recover`.

Every forget entry holds ``before_sha256`` and ``after_sha256``, the
:func:`~mcmc_unlearner.service.checkpoint.model_digest` of the state before and after the request, so the
entries chain the stored states as well, and ``quality`` (what the quality gate found and which policy
committed it).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UnlearningError
from . import fsio
from .fsio import fsync_dir

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

LEDGER_NAME = "ledger.jsonl"
GENESIS = "0" * 64


class LedgerError(UnlearningError):
    """The ledger cannot be read or does not match the committed state."""


def canonical_json(obj: Any) -> str:
    """Canonical JSON text: sorted keys, compact separators, ASCII only, no NaN/inf."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {ascii(k)[:60]}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def strict_loads(text: str | bytes) -> Any:
    """``json.loads`` that refuses duplicate keys and ``NaN``/``Infinity``.

    Raises:
        ValueError: Invalid JSON, a duplicate key, a non-finite constant, or nesting too deep to parse.
    """
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def line_sha256(line: bytes) -> str:
    """SHA-256 (hex) of one ledger line, without its trailing newline."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def request_id_for(ids: Iterable[int]) -> str:
    """Default request id: SHA-256 of the sorted ids written as canonical JSON (``"sha256:<hex>"``)."""
    return "sha256:" + hashlib.sha256(canonical_json(sorted(int(i) for i in ids)).encode()).hexdigest()


@dataclass
class LedgerRead:
    """A ledger file split into lines.

    Attributes:
        lines: Complete lines (newline stripped), in order.
        offsets: Byte offset of the end of each complete line (newline included).
        partial: Trailing bytes without a newline (a line cut by a crash), ``b""`` if none.
    """

    lines: list[bytes] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    partial: bytes = b""

    def entries(self, count: int | None = None) -> list[dict[str, Any]]:
        """Parse the first ``count`` lines (all when ``None``) as JSON objects in canonical form."""
        out = []
        for i, line in enumerate(self.lines[:count]):
            try:
                obj = strict_loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "msg", str(exc))
                raise LedgerError(f"ledger line {i + 1} is not valid JSON ({reason})") from None
            if not isinstance(obj, dict):
                raise LedgerError(f"ledger line {i + 1} is not a JSON object")
            if canonical_json(obj).encode("ascii") != line:
                raise LedgerError(f"ledger line {i + 1} is not in canonical form (it was rewritten by hand)")
            out.append(obj)
        return out

    def end_of(self, count: int) -> int:
        """Byte offset just after the first ``count`` lines."""
        return 0 if count == 0 else self.offsets[count - 1]


def parse_ledger(data: bytes) -> LedgerRead:
    """Split ledger bytes into complete lines and a partial tail."""
    out = LedgerRead()
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            out.partial = data[pos:]
            break
        out.lines.append(data[pos:nl])
        out.offsets.append(nl + 1)
        pos = nl + 1
    return out


def read_ledger(path: str | os.PathLike) -> LedgerRead:
    """Read a ledger file (missing file: empty ledger; links and non-regular files are refused)."""
    p = Path(path)
    try:
        data = fsio.read_regular(p.parent, p.name, what="ledger")
    except FileNotFoundError:
        return LedgerRead()
    return parse_ledger(data)


def append_entry(
    path: str | os.PathLike, entry: dict[str, Any], *, pause: float = 0.0, on_half: Callable[[], None] | None = None
) -> tuple[str, bytes]:
    """Append one entry as a canonical JSON line and fsync the file.

    Args:
        path: Ledger file (created if missing; its folder is fsynced then).
        entry: JSON-ready dict (must already hold ``prev_sha256``).
        pause: Test hook: seconds to sleep between writing the two halves of the line.
        on_half: Test hook called after the first half is written.

    Returns:
        ``(sha256 of the line, line bytes)``.
    """
    line = canonical_json(entry).encode("ascii")
    p = Path(path)
    fsio.append_bytes(p.parent, p.name, line + b"\n", pause=pause, on_half=on_half)
    return line_sha256(line), line


def truncate_ledger(path: str | os.PathLike, size: int) -> None:
    """Cut the ledger back to ``size`` bytes (rolls back a torn tail) and fsync it."""
    p = Path(path)
    fsio.truncate_file(p.parent, p.name, size)


def check_chain(lines: Sequence[bytes], entries: Sequence[dict[str, Any]]) -> list[str]:
    """Problems with the hash chain and the state chain of committed ledger lines (empty list: intact).

    Checks that line 1 is the save event with ``prev_sha256`` = 64 zeros, that each line's ``prev_sha256`` is
    the SHA-256 of the line before, that each later line is a forget event with ``seq`` equal to its line
    index, and that each forget entry's ``before_sha256`` equals the previous entry's ``after_sha256``.
    """
    problems: list[str] = []
    prev_hash = GENESIS
    prev_after: str | None = None
    for i, (line, e) in enumerate(zip(lines, entries), start=1):
        if e.get("prev_sha256") != prev_hash:
            problems.append(f"ledger line {i}: hash chain broken (prev_sha256 does not match line {i - 1})")
        if i == 1:
            if e.get("event") != "save":
                problems.append("ledger line 1 is not the save event")
        else:
            if e.get("event") != "forget":
                problems.append(f"ledger line {i}: unexpected event {ascii(e.get('event'))[:40]}")
            if e.get("seq") != i - 1:
                problems.append(f"ledger line {i}: sequence number {ascii(e.get('seq'))[:24]} should be {i - 1}")
            if e.get("before_sha256") != prev_after:
                problems.append(f"ledger line {i}: before_sha256 differs from the after_sha256 of line {i - 1}")
        prev_after = e.get("after_sha256")
        prev_hash = line_sha256(line)
    return problems
