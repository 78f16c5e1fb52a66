"""Deletion requests against saved models: ``forget``, ``status`` and ``verify``.

A request is a list of 0-based training-row ids (:mod:`mcmc_unlearner.service.requests`). Each request is
applied **exactly once** and only when the removal **worked**:

1. ids, request id and solver settings are validated before the folder is touched;
2. the folder's writer lock is taken (``wait`` seconds at most, else :class:`~.fsio.BusyError`), and one
   snapshot is read and checked in full (manifest fields and names, checksum, HMAC, state and ledger) — a
   damaged or tampered folder is refused here, before anything changes;
3. the model is rebuilt; a request id already in the committed ledger is "already applied" (nothing to do);
4. the removal is computed in memory and passed through the quality gate (:mod:`mcmc_unlearner.service.gate`);
   under the default policy a failing removal is refused with nothing written;
5. only then is crash debris of an earlier interrupted request rolled back
   (:func:`~.checkpoint.recover`) and the update committed (:func:`~.checkpoint.commit_update`): a crash at
   any point leaves the request fully applied or not at all.

``status`` and ``verify`` take no lock: they read one consistent snapshot. ``status`` and ``forget`` report the
ledger **head** (SHA-256 of the last committed line); ``verify --expect-head HASH`` confirms an externally
recorded head, which detects a rollback of the whole folder to an older, self-consistent state.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..curvature import ParamSpec
from ..data import as_id_tensor
from ..errors import InvalidRequestError, SolverDivergedError, all_finite
from ..options import shown_value
from ..solvers import SolverName
from ..unlearner import RemovalReport, _evenly
from . import checkpoint, fsio, gate, integrity, requests, state
from . import ledger as ledger_mod
from .fsio import StoreError
from .gate import OnFailure, QualityGateError
from .integrity import Key
from .snapshot import DamagedFolderError

__all__ = [
    "ForgetOutcome",
    "VerifyResult",
    "auto_threads",
    "forget",
    "shown_entry",
    "status",
    "threads_for",
    "torch_threads",
    "verify",
]

_HEX64 = re.compile(r"[0-9a-f]{64}")
SMALL_MODEL_PARAMS = 1_000_000


# ---------------------------------------------------------------------------------------------- threads
def auto_threads(n_params: int) -> int | None:
    """Torch threads for a model of ``n_params`` parameters: 1 below a million (start-up and contention costs
    of a thread pool dominate such models), ``None`` (torch's default) above, or when ``OMP_NUM_THREADS`` is
    set explicitly."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return 1 if n_params < SMALL_MODEL_PARAMS else None


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads and restore the previous count (``None``: unchanged)."""
    if n is None or n <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_for(threads: int | str | None, n_params: int) -> int | None:
    """Resolve a ``threads`` argument: a count >= 1, ``"auto"`` (:func:`auto_threads`) or ``None`` (unchanged)."""
    if threads is None:
        return None
    if threads == "auto":
        return auto_threads(n_params)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidRequestError(f"threads must be 'auto' or a whole number >= 1, got {ascii(threads)[:30]}")
    return threads


def _threads_for(threads: int | str | None, snap: checkpoint.Snapshot) -> int | None:
    state = snap.state or {}
    return threads_for(threads, sum(t.numel() for k, t in state.items() if k.startswith("model/")))


def state_vs_ledger(entries: Sequence[Mapping[str, Any]], loaded: checkpoint.LoadedModel) -> list[str]:
    """Problems between the committed ledger and the stored state (empty: they agree): the last entry's
    ``after_sha256`` is the state's digest, the removed rows are exactly the ledger's, the last entry's
    ``n_remaining`` is the remaining count. Unkeyed hashes alone do not tie the ledger to the state this way."""
    problems: list[str] = []
    if entries and entries[-1].get("after_sha256") != loaded.model_sha256:
        problems.append("the last ledger entry's after_sha256 differs from the stored state's digest")
    forgets = [e for e in entries[1:] if e.get("event") == "forget"]
    seen: set[int] = set()
    for ids in [entries[0].get("removed_before_save", []) if entries else []] + [e.get("ids", []) for e in forgets]:
        if isinstance(ids, list):
            seen.update(i for i in ids if isinstance(i, int) and not isinstance(i, bool))
    removed = set(loaded.data.removed_ids.tolist())
    if removed != seen:
        extra = sorted(removed - seen)[:5]
        missing = sorted(seen - removed)[:5]
        problems.append(
            f"remaining set differs from all ids minus the ledger's removals (removed but not in ledger: {extra}; "
            f"in ledger but still present: {missing})"
        )
    if forgets and forgets[-1].get("n_remaining") != len(loaded.data):
        problems.append("the last entry's n_remaining differs from the stored remaining count")
    return problems


# ---------------------------------------------------------------------------------------------- forget
@dataclass
class ForgetOutcome:
    """What :func:`forget` did.

    Attributes:
        applied: True if the request was applied now; False if it had been applied before.
        request_id: The request id.
        entry: Its ledger entry (the earlier one when already applied).
        report: The unlearner's report (``None`` when already applied).
        recovered: What :func:`~mcmc_unlearner.service.checkpoint.recover` rolled back first.
        head: The ledger head hash after the request (record it for ``verify --expect-head``).
        quality: The quality record written to the ledger (``passed``, ``problems``, ``policy``, ...), its
            problems spelled for the caller (:func:`~.requests.shown_as`; ``entry`` holds them as recorded).
    """

    applied: bool
    request_id: str
    entry: dict[str, Any]
    report: RemovalReport | None = None
    recovered: dict[str, Any] = field(default_factory=dict)
    head: str = ""
    quality: dict[str, Any] = field(default_factory=dict)


def _check_ids(ids: Sequence[int] | torch.Tensor) -> list[int]:
    """The request's ids, checked before the folder is touched: not empty, no negative id, no id twice (so a
    repeated id is named as such, not as a request id "already used for different ids")."""
    t = as_id_tensor(ids)
    id_list = [int(i) for i in t.tolist()]
    if not id_list:
        raise InvalidRequestError("deletion request is empty: pass at least one training-example id")
    bad = [i for i in id_list if not 0 <= i <= requests.MAX_ID]
    if bad:
        raise InvalidRequestError(f"deletion request: unknown id(s) {bad[:5]}; ids are non-negative row numbers")
    uniq, counts = torch.unique(t, return_counts=True)
    if (counts > 1).any():
        raise InvalidRequestError(
            f"deletion request: id(s) {uniq[counts > 1][:5].tolist()} appear more than once; list each id once"
        )
    return id_list


def _check_writable(root: Path) -> None:
    """Refuse a folder this process cannot write (before any work, so nothing is left half-written)."""
    eff = {"effective_ids": True} if os.access in os.supports_effective_ids else {}
    ledger = root / ledger_mod.LEDGER_NAME
    if os.lstat(ledger).st_nlink > 1:
        raise StoreError(
            f"{str(ledger)!a} has other hard links (a hard-linked backup?); appending would change them too: "
            "copy the folder (cp -r) instead of hard-linking it (nothing was changed)"
        )
    for p in (root, ledger):
        if not os.access(p, os.W_OK, **eff):
            what = "folder" if p == root else "ledger"
            raise StoreError(
                f"the model {what} {str(p)!a} is read-only for this user; nothing was changed: run as the "
                "folder's owner or make it writable"
            )


def _json_number(v: Any) -> Any:
    """``v``, or ``None`` for a non-finite float (JSON has no NaN; a failed step accepted by policy can have one)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _entry(rid: str, id_list: list[int], report: RemovalReport, un: Any, settings: dict, quality: dict) -> dict:
    info = report.to_dict()
    step = (
        "damping",
        "damping_trials",
        "damping_relative",
        "step_shortfall",
        "predicted_change",
        "actual_change",
        "actual_stderr",
        "model_ratio",
        "remaining_nll_change",
        "safe",
    )
    # the step control's numbers; a non-finite one (a refused step accepted by policy) is stored as null
    extra = {
        k: (None if isinstance(info[k], float) and not math.isfinite(info[k]) else info[k]) for k in step if k in info
    }
    config = checkpoint.unlearner_config(un)
    return {
        "event": "forget",
        "request_id": rid,
        "ids": sorted(id_list),
        "time": fsio.utc_now(),
        "n_removed": report.n_removed,
        "n_remaining": report.n_remaining,
        "solver": report.solver,
        "iterations": report.iterations,
        "residual": _json_number(report.residual),
        "converged": report.converged,
        "shift_norm": _json_number(report.shift_norm),
        "shift_stderr": _json_number(report.shift_stderr),
        "seconds": report.seconds,
        "bank_size": report.bank_size,
        "expectation": report.expectation,
        "hessian": report.hessian,
        "bank_shift": report.bank_shift,
        # what ran: under torchrun the ranks' unlearner, without the folder's newton_gate (distributed.ran_config)
        "config": distributed.ran_config(config) if distributed.launched() else config,
        "overrides": dict(settings),
        "info": {k: _json_number(v) for k, v in info.get("info", {}).items()},
        "quality": quality,
        **extra,
    }


def _quality_error(message: str, problems: Sequence[str], report: RemovalReport) -> QualityGateError:
    """The refusal of a removal that failed its checks, its advice spelled for Python (``on_failure='repair'``;
    the command line spells it back as ``--on-failure repair``: :func:`~.requests.as_flags`). ``problems`` are as
    the ledger records them (in the caller's spelling: :func:`~.requests.spelling`)."""
    return QualityGateError(requests.as_keywords(message), problems, report)


def forget(
    model_dir: str | os.PathLike,
    ids: Sequence[int] | torch.Tensor,
    *,
    request_id: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    on_failure: OnFailure | str = OnFailure.REFUSE,
    repair_steps: int = gate.DEFAULT_REPAIR_STEPS,
    key: Key | bytes | str | None = None,
    wait: float = 0.0,
    threads: int | str | None = None,
    interface: str = "python",
) -> ForgetOutcome:
    """Apply one deletion request to a saved model, exactly once, if the removal passes the quality gate.

    Args:
        model_dir: The model folder.
        ids: 0-based training-row ids to forget.
        request_id: Idempotency key (1–128 printable ASCII); default: SHA-256 of the sorted ids.
        overrides: Unlearner settings for this request only (e.g. ``{"solver": "cg"}``); validated before any
            work (:func:`~mcmc_unlearner.service.requests.check_settings`) and recorded in the ledger entry.
        on_failure: Policy for a removal that fails the quality checks (:class:`~.gate.OnFailure`).
        repair_steps: SG-MCMC steps of the ``repair`` policy.
        key: Integrity key (``None``: ``$MCMC_UNLEARNER_KEY`` if set).
        wait: Seconds to wait for another writer to finish, in [0, 86400].
        threads: Torch threads for the computation (``"auto"``: by model size; ``None``: unchanged).
        interface: Who asks: ``"python"`` or ``"cli"`` (the command line); the quality problems recorded in the
            ledger and raised name the options as that caller sets them (``on_failure='repair'`` or
            ``--on-failure repair``), as the errors' advice does.

    Returns:
        A :class:`ForgetOutcome`.

    Raises:
        InvalidRequestError: The request, ``request_id``, ``wait`` or a setting is refused (nothing changed).
        QualityGateError: The removal failed the quality checks under ``refuse`` (nothing changed).
        SolverDivergedError: The solve failed (nothing changed).
        BusyError: Another writer holds the folder (nothing changed).
        StoreError / FileNotFoundError: The folder is missing, damaged, tampered, signed with another key or
            read-only (nothing changed).
    """
    id_list = _check_ids(ids)
    rid = requests.check_request_id(
        request_id if request_id is not None else ledger_mod.request_id_for(id_list),
        "--request-id" if interface == "cli" else "request_id",
    )
    wait = requests.check_wait(wait, "--wait" if interface == "cli" else "wait")
    settings = requests.check_settings(overrides, interface)
    try:
        policy = OnFailure(on_failure)
    except ValueError:
        raise InvalidRequestError(
            f"on_failure must be one of {', '.join(p.value for p in OnFailure)}, got {ascii(on_failure)[:40]}"
        ) from None
    if (
        isinstance(repair_steps, bool)
        or not isinstance(repair_steps, int)
        or not 1 <= repair_steps <= gate.MAX_REPAIR_STEPS
    ):
        raise InvalidRequestError(f"repair_steps must be a whole number in [1, {gate.MAX_REPAIR_STEPS}]")
    threads_for(threads, 0)  # validated before the folder is touched
    spell = requests.spelling(interface)  # the recorded problems' spelling: the one the caller's errors use
    k = integrity.as_key(key)
    root = checkpoint.check_folder(model_dir)  # nothing is created in a folder without a model
    with fsio.folder_lock(root, wait=wait) as locked:
        snap = checkpoint.read_snapshot(root, key=k, wait=0.0)  # integrity first: nothing has changed yet
        fsio.check_same_folder(root, locked)  # the snapshot is of the folder this process holds
        if snap.signature == "unchecked":
            raise StoreError(
                f"{str(root)!a} is signed: set {integrity.KEY_ENV} or pass key= to write to it (nothing was changed)"
            )
        with torch_threads(_threads_for(threads, snap)):
            loaded = checkpoint.build_loaded(snap)
            mismatch = state_vs_ledger(loaded.entries, loaded)
            if mismatch:  # what verify reports: never commit a request on top of it
                raise StoreError(
                    f"{str(root)!a}: the ledger does not match the stored state ({mismatch[0]}): the folder was "
                    "tampered with; run `mcmc-unlearner verify` and restore the folder from a backup (nothing was "
                    "changed)"
                )
            fsio.phase("loaded")
            for e in loaded.requests:
                if e.get("request_id") == rid:
                    if sorted(e.get("ids", [])) != sorted(id_list):
                        raise InvalidRequestError(
                            f"request id {rid!a} was already used (ledger entry {e.get('seq')}) for different "
                            "ids; choose a new request_id"
                        )
                    fsio.check_same_folder(root, locked)
                    if checkpoint.has_debris(snap):  # otherwise nothing to write: a read-only replica answers too
                        _check_writable(root)
                    recovered = checkpoint.recover(root, snap)  # crash debris only; the folder was checked above
                    # its problems as this caller spells them (the entry may have come from the other interface)
                    quality = _shown_quality(e.get("quality") or {}, requests.shown_as(interface))
                    return ForgetOutcome(False, rid, e, None, recovered, loaded.head, quality)
            fsio.check_same_folder(root, locked)  # still the locked folder (not moved/replaced while loading)?
            _check_writable(root)  # before any work, so nothing is left half-written
            try:
                un = checkpoint.with_config(loaded, settings)
            except ValueError as exc:
                raise InvalidRequestError(str(exc)) from None
            if distributed.launched() and settings.get("newton_gate"):  # the ranks run without it (apply_request)
                raise InvalidRequestError(
                    f"newton_gate={shown_value(settings['newton_gate'])} runs in one process (its estimate lists every "
                    "remaining row, which a rank's shard cannot); leave it out under torchrun, or run the request "
                    "without torchrun"
                )
            if un.solver is SolverName.LISSA and un.iter_T < 1:  # the solver refuses it mid-request (a ValueError)
                raise InvalidRequestError(
                    f"iter_T={un.iter_T} leaves the lissa solver no round of its recursion; use iter_T=1 or more "
                    "(e.g. 100)"
                )
            if policy is OnFailure.REPAIR:
                if loaded.sampler is None:
                    raise InvalidRequestError(
                        "on_failure='repair' needs the model's SG-MCMC sampler, and this model was saved without one; "
                        "use on_failure='refuse' or on_failure='accept'"
                    )
                size = 0 if un.bank is None else int(un.bank.shape[0])
                problem = gate.repair_steps_problem(repair_steps, size)
                if problem:
                    raise InvalidRequestError(problem)
                if distributed.launched():
                    raise InvalidRequestError("on_failure='repair' runs in one process; run it without torchrun")
            # the samples before the request, which a repair's result is compared with (gate.repaired_problems)
            before = None
            if policy is OnFailure.REPAIR and un.bank is not None:
                before = un.bank[_evenly(int(un.bank.shape[0]), 16)].clone()
            report = distributed.apply_request(un, id_list, loaded.data)  # in memory only
            flat = ParamSpec.flatten_module(loaded.model)
            if not all_finite(flat) or (un.bank is not None and not all_finite(un.bank)):
                raise SolverDivergedError("the updated parameters are not finite; nothing was written")
            problems = [spell(p) for p in gate.quality_problems(report, un)]
            quality: dict[str, Any] = {"passed": not problems, "problems": problems, "policy": policy.value}
            if problems and policy is OnFailure.REFUSE:
                raise _quality_error(
                    f"removal failed the quality checks: {'; '.join(problems)}; nothing was written (to commit "
                    "anyway: --on-failure accept, or repair with SG-MCMC: --on-failure repair)",
                    problems,
                    report,
                )
            if problems and policy is OnFailure.REPAIR:
                rec = gate.repair_chain(un, loaded.sampler, loaded.data, repair_steps)
                if not rec["ok"]:
                    raise _quality_error(
                        "the repair run produced non-finite parameters; nothing was written: lower the sampler step "
                        "size or use --on-failure refuse",
                        problems,
                        report,
                    )
                still, measured = gate.repaired_problems(un, id_list, loaded.data, before, repair_steps)
                still = [spell(p) for p in still]
                rec.update(measured)
                if still:  # the repair did not fix it: refused as under refuse (it was recorded as passed)
                    raise _quality_error(
                        f"removal failed the quality checks ({'; '.join(problems)}) and the repair run of "
                        f"{repair_steps} SG-MCMC steps did not fix it: {'; '.join(still)}; nothing was written "
                        "(raise --repair-steps, e.g. tenfold, or commit it recorded as degraded: --on-failure accept)",
                        problems + still,
                        report,
                    )
                quality.update(passed=True, repaired=True, repair=rec)
            fsio.phase("solved")
            entry = _entry(rid, id_list, report, un, settings, quality)
            rebuilt = checkpoint.curvature_settings_changed(loaded.unlearner, un)
            if rebuilt:  # the ledger says which curvature was used (was: the saved one, reused, under the override)
                entry["info"]["curvature_rebuilt"] = (
                    "built for this request's "
                    + ", ".join(f"{k}={new!a}" for k, (_, new) in rebuilt.items())
                    + " (the folder's configuration, whose curvature is not used for it: "
                    + ", ".join(f"{k}={old!a}" for k, (old, _) in rebuilt.items())
                    + "); not kept for later requests"
                )
            fsio.check_same_folder(root, locked)  # writes go by path: still the locked folder (not moved/replaced)?
            recovered = checkpoint.recover(root, snap)  # roll back crash debris, now that the request is good
            try:
                written = checkpoint.commit_update(loaded, entry, unlearner=un)
            except StoreError as exc:
                raise _with_recovery(exc, recovered) from None
    return ForgetOutcome(True, rid, written, report, recovered, loaded.head, quality)


def _with_recovery(exc: StoreError, recovered: Mapping[str, Any]) -> StoreError:
    """A failed commit's error, saying what :func:`~.checkpoint.recover` removed before it: "nothing was changed"
    alone was said after the crash debris of an earlier request had been rolled back (stop 56's probe)."""
    rolled, removed = recovered.get("rolled_back") or [], recovered.get("removed_files") or []
    text = str(exc)
    if not (rolled or removed) or "nothing was changed" not in text:
        return exc
    done = []
    if rolled:
        done.append(f"rolled back {len(rolled)} uncommitted ledger line(s) ({', '.join(map(ascii, rolled[:3]))})")
    if removed:
        done.append(f"removed {', '.join(map(ascii, removed[:5]))}")
    said = (
        "the model is unchanged, but first the crash debris of an interrupted earlier request was cleaned up ("
        + "; ".join(done)
        + ")"
    )
    return type(exc)(text.replace("nothing was changed", said, 1))


# ---------------------------------------------------------------------------------------------- status
def _shown_problems(problems: Any, show: Callable[[str], str]) -> Any:
    """A recorded ``problems`` list as ``show`` spells it, in a new list (anything but text is left as it is)."""
    if not isinstance(problems, list):
        return problems
    return [show(p) if isinstance(p, str) else p for p in problems]


def _shown_quality(quality: Any, show: Callable[[str], str]) -> Any:
    """A copy of a recorded ``quality`` record whose problems ``show`` spells (the entry itself is not changed)."""
    if not isinstance(quality, dict) or "problems" not in quality:
        return quality
    return {**quality, "problems": _shown_problems(quality["problems"], show)}


def _degraded_record(e: Mapping[str, Any], show: Callable[[str], str]) -> dict[str, Any] | None:
    """A forget entry committed with failed quality (policy accept, or before the gate: not converged) as
    :func:`status` lists it, its problems as ``show`` spells them; ``None`` for any other entry."""
    if e.get("event") != "forget":
        return None
    q = e.get("quality")
    if isinstance(q, dict):
        if q.get("passed", True):
            return None
        problems = _shown_problems(q.get("problems", []), show)
    elif e.get("converged") is False or not math.isfinite(float(e.get("residual", 0.0) or 0.0)):
        problems = [f"committed before the quality gate with an unconverged solve (residual {e.get('residual')})"]
    else:
        return None
    return {"request_id": e.get("request_id"), "seq": e.get("seq"), "problems": problems}


def _degraded(entries: Sequence[Mapping[str, Any]], show: Callable[[str], str]) -> list[dict[str, Any]]:
    """Forget entries committed with failed quality (:func:`_degraded_record`), their problems as ``show`` spells
    them."""
    return [r for r in (_degraded_record(e, show) for e in entries) if r is not None]


def shown_entry(entry: Mapping[str, Any], interface: str = "python") -> dict[str, Any]:
    """What :func:`status` says of one request's ledger entry to a reader on ``interface`` (``"python"`` or
    ``"cli"``), whoever sent the request: the entry itself is shown as recorded, these as the reader spells them.

    Args:
        entry: A ``forget`` entry of the ledger (e.g. :attr:`ForgetOutcome.entry`).
        interface: Who reads it (:func:`~.requests.shown_as`).

    Returns:
        ``{"quality": ..., "degraded": ..., "problems": [...]}``: the entry's quality record with its problems
        spelled for the reader (``status``'s ``last_request.quality``; ``None`` where the entry has none), whether
        ``status`` lists the request among ``degraded_requests``, and the problems it lists for it there (``[]``
        when it does not: a request repaired or passed).

    Raises:
        InvalidRequestError: ``interface`` is neither ``"python"`` nor ``"cli"``.
    """
    show = requests.shown_as(interface)
    record = _degraded_record(entry, show)
    return {
        "quality": _shown_quality(entry.get("quality"), show),
        "degraded": record is not None,
        "problems": [] if record is None else record["problems"],
    }


def status(
    model_dir: str | os.PathLike,
    *,
    key: Key | bytes | str | None = None,
    wait: float = 10.0,
    threads: int | str | None = None,
    interface: str = "python",
) -> dict[str, Any]:
    """Summary of a saved model: removals, requests, last residual, quality, bank size, health and head hash.

    Read-only and lock-free (one consistent snapshot). The recorded quality problems it lists name the options as
    a caller of ``interface`` (``"python"`` or ``"cli"``) sets them, whoever sent the request
    (:func:`~.requests.shown_as`).
    """
    show = requests.shown_as(interface)
    wait = requests.check_wait(wait, "--wait" if interface == "cli" else "wait")
    snap = checkpoint.read_snapshot(model_dir, key=key, wait=wait)
    with torch_threads(_threads_for(threads, snap)):
        loaded = checkpoint.build_loaded(snap)
    flat = ParamSpec.flatten_module(loaded.model)
    bank = loaded.unlearner.bank
    reqs = loaded.requests
    last = reqs[-1] if reqs else None
    save = loaded.entries[0] if loaded.entries else {}
    removed = loaded.data.removed_ids.tolist()
    degraded = _degraded(loaded.entries, show)
    # applied requests whose removal changed nothing measurable (info.unresolved; said in the ledger only until
    # stop 43): listed, as a reader of status could take them for removals that moved the samples
    unresolved = [
        {"request_id": e.get("request_id"), "seq": e.get("seq")}
        for e in reqs
        if isinstance(e.get("info"), dict) and e["info"].get("unresolved")
    ]
    mismatch = state_vs_ledger(loaded.entries, loaded)
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
        else {
            **{k: last.get(k) for k in ("request_id", "time", "n_removed", "solver", "residual", "converged")},
            "quality": _shown_quality(last.get("quality"), show),
        },
        "last_residual": None if last is None else last.get("residual"),
        "bank_size": 0 if bank is None else int(bank.shape[0]),
        "params_finite": all_finite(flat) and (bank is None or all_finite(bank)),
        "state_hash_ok": True,  # the snapshot verified state file, manifest checksum and ledger head
        # verify's ledger-against-state checks (a state put back under its ledger showed "state hash ok: yes")
        "ledger_matches_state": not mismatch,
        "ledger_state_problems": mismatch,
        "signature": snap.signature,
        "degraded": bool(degraded),
        "degraded_requests": degraded,
        "unresolved_requests": unresolved,
        # of the rows the bank's samples were drawn on (counted from the first request since they were set), the
        # share removed: past CUMULATIVE_REMOVAL every request was warned about on stderr only (stop 45's probe)
        "removed_since_samples": _removed_since_samples(loaded),
        "ledger_head": loaded.head,
        "model_sha256": loaded.model_sha256,
        "pending_uncommitted_lines": loaded.pending,
        # the configuration requests run with: as saved, options added since at this version's defaults
        "unlearner_config": loaded.unlearner.config(),
        "defaulted_options": state.defaulted_options(loaded.manifest["unlearner"], loaded.unlearner),
    }


def _removed_since_samples(loaded: Any) -> float | None:
    """The share of the rows the bank's samples were drawn on that is removed now (``None`` before any request)."""
    start = getattr(loaded.unlearner, "_rows_at_samples", None)
    return None if not start else max(0.0, 1.0 - len(loaded.data) / start)


# ---------------------------------------------------------------------------------------------- verify
@dataclass
class VerifyResult:
    """Outcome of :func:`verify`: ``ok`` when ``problems`` is empty; ``notes`` are informational."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    requests: int = 0
    head: str | None = None
    signature: str | None = None

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def check_head(expect_head: str) -> str:
    """Return ``expect_head`` lower-cased if it is 64 hex digits, else refuse it."""
    h = expect_head.strip().lower() if isinstance(expect_head, str) else ""
    if not _HEX64.fullmatch(h):
        raise InvalidRequestError(
            f"expect_head={ascii(expect_head)[:80]} is not a ledger head: give the 64 hex digits that forget or "
            "status printed"
        )
    return h


def verify(
    model_dir: str | os.PathLike,
    *,
    key: Key | bytes | str | None = None,
    expect_head: str | None = None,
    wait: float = 10.0,
    threads: int | str | None = None,
) -> VerifyResult:
    """Re-check a model folder's ledger against its stored state, on one consistent snapshot.

    Checks: manifest fields, names, checksum and (with a key) HMAC; state file SHA-256; the ledger's committed
    length, head, canonical form, hash chain and before/after chain; the last after-hash equals the stored
    state's digest; no request id or removed id appears twice; all ids are valid rows; the remaining set equals
    all rows minus the removed ones; parameters and bank are finite; with ``expect_head``, that the recorded
    head is the current head or an earlier committed line (otherwise the folder was rolled back or replaced).
    An uncommitted ledger tail is a note, not a problem.

    Raises:
        FileNotFoundError: The folder does not exist.
        StoreError: The folder holds no saved model (no manifest, and no ledger or state file; without a
            manifest but with them, the folder is damaged: that is a problem in the result, not an exception).
        InvalidRequestError: ``expect_head`` is not 64 hex digits, or ``wait`` not a number in [0, 86400].
        BusyError: No consistent snapshot within ``wait`` seconds.
    """
    expected = None if expect_head is None else check_head(expect_head)
    wait = requests.check_wait(wait)
    res = VerifyResult()
    try:
        checkpoint.check_folder(model_dir)  # not a model folder at all: refused (exit 2), not "FAILED"
    except DamagedFolderError as exc:  # the ledger and state are there, the manifest is not: a damaged folder
        res.problems.append(str(exc))
        return res
    try:
        snap = checkpoint.read_snapshot(model_dir, key=key, wait=wait, strict=False)
    except fsio.BusyError:
        raise
    except StoreError as exc:
        res.problems.append(str(exc))
        return res
    manifest = snap.manifest
    res.problems += snap.problems
    res.head = snap.head
    res.signature = snap.signature
    if snap.signature == "unchecked":
        res.notes.append(
            f"the folder is signed but no key was given: the HMAC was not checked (set {integrity.KEY_ENV} or pass "
            "key=)"
        )
    if snap.pending == 1:
        res.notes.append(
            "1 uncommitted ledger line(s) from an interrupted request; they are not part of the state and the next "
            "applied request rolls them back"
        )
    elif snap.pending > 1:  # was blamed on "an interrupted request" too (stop 56's probe: 3 appended garbage lines)
        res.notes.append(
            f"{snap.pending} uncommitted ledger lines after the committed ones: more than an interrupted request "
            "leaves (a crash leaves at most one line, complete or cut), so something else appended them (a hand "
            "edit, another program); they are not part of the state and the next applied request rolls them back "
            "(copy ledger.jsonl first to keep them)"
        )
    entries = snap.entries
    if expected is not None:
        hashes = [ledger_mod.line_sha256(line) for line in snap.ledger.lines[: snap.count]]
        if expected == snap.head:
            res.notes.append("ledger head matches the expected head")
        elif expected in hashes:  # found: no rollback past it (other problems, if any, are listed on their own)
            later = len(hashes) - 1 - hashes.index(expected)
            at = hashes.index(expected)
            res.notes.append(
                f"the expected head is ledger entry {at} (line {at + 1} of {ledger_mod.LEDGER_NAME}; entry 0 is the "
                f"save); {later} entr{'y' if later == 1 else 'ies'} came after"
            )
        else:
            res.problems.append(
                f"ledger head {snap.head} is not the expected head {expected} and the ledger does not contain it: the "
                "folder was rolled back to an older state or replaced; restore the folder from a trusted backup"
            )
    forgets = [e for e in entries[1:] if e.get("event") == "forget"]
    res.requests = len(forgets)
    rids = [e.get("request_id") for e in forgets]
    dup_rids = sorted({str(r) for r in rids if rids.count(r) > 1})
    if dup_rids:
        res.problems.append(f"request id(s) applied more than once: {dup_rids[:5]}")
    if forgets and manifest.get("last_request_id") != forgets[-1].get("request_id"):
        res.problems.append("manifest's last_request_id differs from the last ledger entry")
    for e in forgets:
        q = e.get("quality")
        if isinstance(q, dict) and not q.get("passed", True):
            res.notes.append(f"request {e.get('request_id')!a} was committed with failed quality checks (degraded)")
    seen: dict[int, int] = {}
    save = entries[0] if entries else {}
    n_total = save.get("n_total")
    twice: set[int] = set()
    malformed = False
    for ids, seq in [(save.get("removed_before_save", []), 0)] + [
        (e.get("ids", []), e.get("seq", -1)) for e in forgets
    ]:
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            malformed = True
            continue
        for i in ids:
            if i in seen and seq != 0:
                twice.add(i)
            seen[i] = seq if isinstance(seq, int) else -1
    if malformed:
        res.problems.append("a ledger entry's ids are not a list of integers")
    if twice:
        res.problems.append(f"id(s) removed more than once: {sorted(twice)[:5]}")
    if isinstance(n_total, int):
        out = sorted(i for i in seen if not 0 <= i < n_total)
        if out:
            res.problems.append(f"ledger removes id(s) outside [0, {n_total}): {out[:5]}")
    if res.problems:
        return res
    try:
        with torch_threads(_threads_for(threads, snap)):
            loaded = checkpoint.build_loaded(snap)
    except (StoreError, ValueError, FileNotFoundError) as exc:
        res.problems.append(str(exc))
        return res
    res.problems += state_vs_ledger(entries, loaded)
    if isinstance(n_total, int) and loaded.data.n_total != n_total:
        res.problems.append(f"data has {loaded.data.n_total} rows, the ledger's save entry says {n_total}")
    flat = ParamSpec.flatten_module(loaded.model)
    bank = loaded.unlearner.bank
    if not all_finite(flat) or (bank is not None and not all_finite(bank)):
        res.problems.append("stored parameters or sample bank contain NaN or infinite values")
    rows = loaded.data.nonfinite_ids()
    if rows.numel():  # verify said OK, and every request was refused, one for those rows too (stop 59's probe)
        res.problems.append(
            f"the remaining training data hold NaN or infinite values in the rows with id(s) {rows[:5].tolist()}"
            f"{' ...' if rows.numel() > 5 else ''}: every deletion request will be refused, one for those rows too; "
            "save the model again from finite data (save_model refuses such data since stop 59)"
        )
    return res
