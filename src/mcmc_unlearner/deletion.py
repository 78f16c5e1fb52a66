"""Deletion requests against saved models: ``mcmc-unlearner forget``, ``status`` and ``verify``.

A request is a file of 0-based training-row ids: plain text (ids separated by whitespace, commas or new
lines; ``#`` starts a comment) or JSON (a list, or ``{"ids": [...]}``). Each request is applied exactly once:

* it is identified by ``--request-id`` or, by default, by the SHA-256 of its sorted ids; a request id already
  in the committed ledger is reported as "already applied" (exit 0) and nothing changes;
* the update is committed by the manifest rename (:mod:`mcmc_unlearner.store`), so a crash at any point leaves
  the request fully applied or not at all; the next ``forget`` first rolls back a torn ledger tail
  (:func:`mcmc_unlearner.store.recover`) and then applies the request;
* every bad input (unknown, repeated or already-removed ids, empty requests, requests removing all data,
  malformed files, damaged folders, diverging solvers, non-finite data) is refused with one line and the
  folder is left byte-for-byte unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed, store
from . import ledger as ledger_mod
from .curvature import ParamSpec
from .data import as_id_tensor
from .errors import InvalidRequestError, SolverDivergedError, all_finite
from .unlearner import RemovalReport

__all__ = [
    "ForgetOutcome",
    "VerifyResult",
    "forget",
    "parse_ids",
    "parse_ids_file",
    "register",
    "status",
    "verify",
]

_INT = re.compile(r"[+-]?\d+")


# ---------------------------------------------------------------------------------------------- requests
def parse_ids(text: str, source: str = "request") -> list[int]:
    """Parse a deletion request: JSON list / ``{"ids": [...]}``, or integers separated by spaces/commas/lines.

    Raises:
        InvalidRequestError: empty, malformed JSON, or any id that is not a plain integer.
    """
    body = text.strip()
    if not body:
        raise InvalidRequestError(f"{source} is empty: list at least one training-example id")
    if body[0] in "[{":
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno}); fix it") from None
        if isinstance(obj, dict):
            if "ids" not in obj:
                raise InvalidRequestError(f'{source}: a JSON object must hold the ids under "ids"')
            obj = obj["ids"]
        if not isinstance(obj, list):
            raise InvalidRequestError(f"{source}: ids must be a JSON list of integers")
        bad = [v for v in obj if isinstance(v, bool) or not isinstance(v, int)]
        if bad:
            raise InvalidRequestError(f"{source}: id {bad[0]!r} is not an integer; ids are 0-based row numbers")
        ids = [int(v) for v in obj]
    else:
        ids = []
        for lineno, line in enumerate(body.splitlines(), start=1):
            for tok in re.split(r"[\s,]+", line.split("#", 1)[0]):
                if not tok:
                    continue
                if not _INT.fullmatch(tok):
                    raise InvalidRequestError(
                        f"{source} line {lineno}: {tok[:40]!r} is not an integer id; ids are 0-based row numbers"
                    )
                ids.append(int(tok))
    if not ids:
        raise InvalidRequestError(f"{source} is empty: list at least one training-example id")
    return ids


def parse_ids_file(path: str | Path) -> list[int]:
    """Read and parse a request file (see :func:`parse_ids`)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ids file {p} not found; pass --ids FILE with one id per line or a JSON list")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(f"ids file {p} is not UTF-8 text; write the ids as text or JSON") from None
    return parse_ids(text, f"ids file {p}")


@dataclass
class ForgetOutcome:
    """What :func:`forget` did.

    Attributes:
        applied: True if the request was applied now; False if it had been applied before.
        request_id: The request id.
        entry: Its ledger entry (the earlier one when already applied).
        report: The unlearner's report (``None`` when already applied).
        recovered: What :func:`~mcmc_unlearner.store.recover` rolled back first.
    """

    applied: bool
    request_id: str
    entry: dict[str, Any]
    report: RemovalReport | None = None
    recovered: dict[str, Any] = field(default_factory=dict)


def forget(
    model_dir: str | Path,
    ids: Sequence[int] | torch.Tensor,
    *,
    request_id: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ForgetOutcome:
    """Apply one deletion request to a saved model, exactly once.

    Args:
        model_dir: The model folder.
        ids: 0-based training-row ids to forget.
        request_id: Idempotency key; default: SHA-256 of the sorted ids.
        overrides: Unlearner configuration for this request only (e.g. ``{"solver": "cg"}``); recorded in
            the ledger entry.

    Returns:
        A :class:`ForgetOutcome`.

    Raises:
        InvalidRequestError: The request is refused (nothing changed).
        SolverDivergedError: The solve failed (nothing changed).
        StoreError / FileNotFoundError: The folder is missing or damaged (nothing changed).
    """
    root = Path(model_dir)
    if not root.exists():
        raise FileNotFoundError(f"model folder {root} not found; save a model there first (--save-model {root})")
    id_list = [int(i) for i in as_id_tensor(ids).tolist()]
    if not id_list:
        raise InvalidRequestError("deletion request is empty: pass at least one training-example id")
    rid = request_id or ledger_mod.request_id_for(id_list)
    if not rid.strip() or "\n" in rid:
        raise InvalidRequestError("--request-id must be a non-empty single-line string")
    with store.store_lock(root):
        recovered = store.recover(root)
        loaded = store.load_model(root)
        store.phase("loaded")
        for e in loaded.requests:
            if e.get("request_id") == rid:
                if sorted(e.get("ids", [])) != sorted(id_list):
                    raise InvalidRequestError(
                        f"request id {rid!r} was already used (ledger entry {e.get('seq')}) for different ids; "
                        "choose a new --request-id"
                    )
                return ForgetOutcome(False, rid, e, None, recovered)
        un = store.with_config(loaded, dict(overrides or {}))
        report = distributed.apply_request(un, id_list, loaded.data)  # un.forget unless launched by torchrun
        flat = ParamSpec.flatten_module(loaded.model)
        if not all_finite(flat) or (un.bank is not None and not all_finite(un.bank)):
            raise SolverDivergedError("the updated parameters are not finite; nothing was written")  # pragma: no cover
        if not math.isfinite(report.residual):
            raise SolverDivergedError(
                f"{report.solver} returned a non-finite residual; nothing was written. Use another --solver"
            )
        store.phase("solved")
        entry = {
            "event": "forget",
            "request_id": rid,
            "ids": sorted(id_list),
            "time": store.utc_now(),
            "n_removed": report.n_removed,
            "n_remaining": report.n_remaining,
            "solver": report.solver,
            "iterations": report.iterations,
            "residual": report.residual,
            "converged": report.converged,
            "shift_norm": report.shift_norm,
            "shift_stderr": report.shift_stderr,
            "seconds": report.seconds,
            "bank_size": report.bank_size,
            "expectation": report.expectation,
            "hessian": report.hessian,
            "bank_shift": report.bank_shift,
            "config": store.unlearner_config(un),
            "overrides": dict(overrides or {}),
            "info": report.to_dict()["info"],
        }
        written = store.commit_update(loaded, entry, unlearner=un)
    return ForgetOutcome(True, rid, written, report, recovered)


# ---------------------------------------------------------------------------------------------- status / verify
def status(model_dir: str | Path) -> dict[str, Any]:
    """Summary of a saved model: removals, requests, last residual, bank size and health checks."""
    loaded = store.load_model(model_dir)
    flat = ParamSpec.flatten_module(loaded.model)
    bank = loaded.unlearner.bank
    reqs = loaded.requests
    last = reqs[-1] if reqs else None
    save = loaded.entries[0] if loaded.entries else {}
    removed = loaded.data.removed_ids.tolist()
    return {
        "model": str(loaded.path),
        "format_version": loaded.manifest["format_version"],
        "model_kind": loaded.model_spec.get("kind"),
        "data_kind": loaded.data_spec.get("kind"),
        "n_total": loaded.data.n_total,
        "n_remaining": len(loaded.data),
        "n_removed": len(removed),
        "removed_before_save": len(save.get("removed_before_save", [])),
        "removed_ids": removed,
        "requests_applied": len(reqs),
        "last_request": None
        if last is None
        else {k: last.get(k) for k in ("request_id", "time", "n_removed", "solver", "residual", "converged")},
        "last_residual": None if last is None else last.get("residual"),
        "bank_size": 0 if bank is None else int(bank.shape[0]),
        "params_finite": all_finite(flat) and (bank is None or all_finite(bank)),
        "state_hash_ok": True,  # load_model verified state file, manifest checksum and ledger head
        "model_sha256": loaded.model_sha256,
        "pending_uncommitted_lines": loaded.pending,
    }


@dataclass
class VerifyResult:
    """Outcome of :func:`verify`: ``ok`` when ``problems`` is empty; ``notes`` are informational."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    requests: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def verify(model_dir: str | Path) -> VerifyResult:
    """Re-check a model folder's ledger against its stored state.

    Checks: manifest checksum and format; state file SHA-256; the ledger's committed length and head; the hash
    chain and the before/after chain of the entries; the last after-hash equals the stored state's digest; no
    request id or removed id appears twice; all ids are valid rows; the remaining set equals all rows minus the
    removed ones; the parameters and bank are finite. An uncommitted ledger tail (an interrupted request, rolled
    back by the next ``forget``) is a note, not a problem.

    Raises:
        FileNotFoundError: The folder does not exist.
    """
    root = Path(model_dir)
    res = VerifyResult()
    try:
        manifest = store._read_manifest(root)
    except store.StoreError as exc:
        res.problems.append(str(exc))
        return res
    read = ledger_mod.read_ledger(root / ledger_mod.LEDGER_NAME)
    count = int(manifest.get("ledger_entries", 0))
    if len(read.lines) < count:
        res.problems.append(f"ledger has {len(read.lines)} complete lines but the manifest commits {count}")
        count = len(read.lines)
    try:
        entries = read.entries(count)
    except ledger_mod.LedgerError as exc:
        res.problems.append(str(exc))
        return res
    lines = read.lines[:count]
    res.problems += ledger_mod.check_chain(lines, entries)
    if count and ledger_mod.line_sha256(lines[-1]) != manifest.get("ledger_head"):
        res.problems.append("the last committed ledger line does not match the manifest's ledger head")
    pending = len(read.lines) - int(manifest.get("ledger_entries", 0)) + (1 if read.partial else 0)
    if pending > 0:
        res.notes.append(
            f"{pending} uncommitted ledger line(s) from an interrupted request; they are not part of the state "
            "and the next `forget` rolls them back"
        )
    forgets = [e for e in entries[1:] if e.get("event") == "forget"]
    res.requests = len(forgets)
    rids = [e.get("request_id") for e in forgets]
    dup_rids = sorted({r for r in rids if rids.count(r) > 1})
    if dup_rids:
        res.problems.append(f"request id(s) applied more than once: {dup_rids[:5]}")
    if forgets and manifest.get("last_request_id") != forgets[-1].get("request_id"):
        res.problems.append("manifest's last_request_id differs from the last ledger entry")
    seen: dict[int, int] = {}
    save = entries[0] if entries else {}
    n_total = save.get("n_total")
    for i in save.get("removed_before_save", []):
        seen[int(i)] = 0
    twice: set[int] = set()
    for e in forgets:
        for i in e.get("ids", []):
            if i in seen:
                twice.add(i)
            seen[i] = int(e.get("seq", -1))
    if twice:
        res.problems.append(f"id(s) removed more than once: {sorted(twice)[:5]}")
    if isinstance(n_total, int):
        out = sorted(i for i in seen if not 0 <= i < n_total)
        if out:
            res.problems.append(f"ledger removes id(s) outside [0, {n_total}): {out[:5]}")
    try:
        loaded = store.load_model(root)
    except (store.StoreError, ValueError, FileNotFoundError) as exc:
        res.problems.append(str(exc))
        return res
    digest = loaded.digest()
    if entries and entries[-1].get("after_sha256") != digest:
        res.problems.append("the last ledger entry's after_sha256 differs from the stored state's digest")
    removed = set(loaded.data.removed_ids.tolist())
    if removed != set(seen):
        extra = sorted(removed - set(seen))[:5]
        missing = sorted(set(seen) - removed)[:5]
        res.problems.append(
            f"remaining set differs from all ids minus the ledger's removals (removed but not in ledger: {extra}; "
            f"in ledger but still present: {missing})"
        )
    if isinstance(n_total, int) and loaded.data.n_total != n_total:
        res.problems.append(f"data has {loaded.data.n_total} rows, the ledger's save entry says {n_total}")
    if forgets and forgets[-1].get("n_remaining") != len(loaded.data):
        res.problems.append("the last entry's n_remaining differs from the stored remaining count")
    flat = ParamSpec.flatten_module(loaded.model)
    bank = loaded.unlearner.bank
    if not all_finite(flat) or (bank is not None and not all_finite(bank)):
        res.problems.append("stored parameters or sample bank contain NaN or infinite values")
    return res


# ---------------------------------------------------------------------------------------------- CLI
def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("solver", "damping", "iter_T", "tol", "curvature_draws", "bank_shift", "hessian"):
        val = getattr(args, key, None)
        if val is not None:
            out[key] = val
    if args.scaling is not None:
        if args.scaling == "auto":
            out["scaling"] = "auto"
        else:
            try:
                out["scaling"] = float(args.scaling)
            except ValueError:
                raise ValueError(f"--scaling must be a positive number or 'auto', got {args.scaling!r}") from None
    return out


def _cmd_forget(args: argparse.Namespace) -> int:
    ids = parse_ids_file(args.ids)
    if distributed.launched():  # torchrun: all ranks compute, rank 0 commits and prints
        out = distributed.run_forget(forget, args.model, ids, request_id=args.request_id, overrides=_overrides(args))
        if out is None:
            return 0
    else:
        out = forget(args.model, ids, request_id=args.request_id, overrides=_overrides(args))
    rolled = out.recovered.get("rolled_back") or []
    if rolled:
        print(f"recovered: rolled back {len(rolled)} uncommitted ledger line(s) from an interrupted request")
    e = out.entry
    if args.json:
        print(json.dumps({"applied": out.applied, "request_id": out.request_id, "entry": e}, indent=2))
        return 0
    if not out.applied:
        print(
            f"already applied: request {out.request_id} ({len(e.get('ids', []))} ids) is ledger entry "
            f"{e.get('seq')} from {e.get('time')}; nothing changed"
        )
        return 0
    print(
        f"applied request {out.request_id}: removed {e['n_removed']} ids, {e['n_remaining']} remain; "
        f"solver {e['solver']} ({e['iterations']} iterations, residual {e['residual']:.2e}), "
        f"shift {e['shift_norm']:.4g} ± {e['shift_stderr']:.2g}, {e['seconds']:.2f} s; ledger entry {e['seq']}"
    )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    st = status(args.model)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    last = st["last_request"]
    lines = [
        f"model:            {st['model']} ({st['model_kind']}, data {st['data_kind']}, format {st['format_version']})",
        f"examples:         {st['n_remaining']} remaining, {st['n_removed']} removed of {st['n_total']}",
        f"requests applied: {st['requests_applied']}",
        "last request:     "
        + ("none" if last is None else f"{last['request_id']} at {last['time']} ({last['n_removed']} ids)"),
        "last residual:    " + ("n/a" if last is None else f"{last['residual']:.2e} ({last['solver']})"),
        f"bank size:        {st['bank_size']}",
        f"finite params:    {'yes' if st['params_finite'] else 'NO'}",
        f"state hash ok:    {'yes' if st['state_hash_ok'] else 'NO'}",
    ]
    removed = st["removed_ids"]
    shown = ", ".join(map(str, removed[:20])) + (f", ... ({len(removed)} in all)" if len(removed) > 20 else "")
    lines.append(f"removed ids:      {shown or 'none'}")
    if st["pending_uncommitted_lines"]:
        lines.append(f"note:             {st['pending_uncommitted_lines']} uncommitted ledger line(s) (interrupted)")
    print("\n".join(lines))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    res = verify(args.model)
    if args.json:
        print(json.dumps({"ok": res.ok, "problems": res.problems, "notes": res.notes, "requests": res.requests}))
        return 0 if res.ok else 1
    for note in res.notes:
        print(f"note: {note}")
    if res.ok:
        print(f"OK: {res.requests} request(s); ledger hash chain intact; state matches the ledger")
        return 0
    print(f"mcmc-unlearner verify: FAILED: {len(res.problems)} problem(s)", file=sys.stderr)
    for p in res.problems:
        print(f"  - {p}", file=sys.stderr)
    return 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``forget``, ``status`` and ``verify``."""
    f = subparsers.add_parser(
        "forget",
        help="apply a deletion request to a saved model (exactly once)",
        description="Remove training examples from a saved model. A rerun of the same request is a no-op.",
    )
    f.add_argument("--model", required=True, metavar="DIR", help="model folder (from --save-model)")
    f.add_argument(
        "--ids", required=True, metavar="FILE", help="0-based training-row ids: text (space/comma/line) or JSON list"
    )
    f.add_argument("--request-id", default=None, help="idempotency key (default: SHA-256 of the sorted ids)")
    g = f.add_argument_group("configuration overrides for this request (recorded in the ledger)")
    g.add_argument("--solver", choices=["exact", "cg", "lissa"], default=None)
    g.add_argument("--scaling", default=None, help="LiSSA scaling s, or 'auto'")
    g.add_argument("--damping", type=float, default=None)
    g.add_argument("--iter-T", dest="iter_T", type=int, default=None, help="LiSSA rounds / CG iteration cap")
    g.add_argument("--tol", type=float, default=None)
    g.add_argument("--curvature-draws", type=int, default=None)
    g.add_argument("--bank-shift", choices=["mean", "sample", "affine"], default=None)
    g.add_argument("--hessian", choices=["remaining", "full"], default=None)
    f.add_argument("--json", action="store_true", help="print the ledger entry as JSON")
    f.set_defaults(func=_cmd_forget)

    s = subparsers.add_parser("status", help="what a saved model has forgotten and whether it is healthy")
    s.add_argument("--model", required=True, metavar="DIR")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_status)

    v = subparsers.add_parser("verify", help="re-check a saved model's ledger against its stored state")
    v.add_argument("--model", required=True, metavar="DIR")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_cmd_verify)
