"""The CLI of the deletion service: ``mcmc-unlearner forget``, ``status`` and ``verify``.

Every subcommand prints one line on stderr and exits with a documented code when it refuses
(:class:`mcmc_unlearner.cli.ExitCode`); stdout carries only results, and a closed pipe after a commit is not
an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

from ..cli import COMMAND_HELP, EXIT_CODES_HELP, ExitCode, add_quiet_flag, add_threads_flag, emit, one_line
from ..errors import InvalidRequestError
from ..experiments.options import _json_or_str, unlearner_keyword
from ..options import (
    DEFAULT_REPAIR_STEPS,
    MAX_REPAIR_STEPS,
    BankShift,
    EmptiedLabel,
    HessianKind,
    OnFailure,
    SolverName,
    shown_value,
)
from . import integrity, requests

# torch and the modules that need it (deletion, distributed) are imported by the commands themselves, after the
# arguments and the request's settings are checked: a bad option is refused without loading them (it took 2-3 s)

__all__ = ["register"]


#: The unlearner options ``forget`` has a flag of its own for (the others: ``--unlearner-kw KEY=VALUE``).
_FLAGGED = (
    "solver",
    "scaling",
    "damping",
    "iter_T",
    "tol",
    "curvature_draws",
    "bank_shift",
    "hessian",
    "emptied_label",
)


def _request_keyword(v: str) -> tuple[str, Any]:
    """``forget --unlearner-kw KEY=VALUE``: :func:`unlearner_keyword`, but ``seed`` is left to the service's refusal
    (:func:`requests.check_settings`: a saved model's requests draw from its saved generator state); ``bnn``'s
    "seed is the run's --seed" named a flag ``forget`` has not."""
    key, sep, raw = v.partition("=")
    if sep and key == "seed":
        return key, _json_or_str(raw)
    return unlearner_keyword(v)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    # an absent flag is None: left out, as "not given" (a request's None of some options is a value of the library)
    given = {k: getattr(args, k) for k in _FLAGGED if getattr(args, k, None) is not None}
    extra: dict[str, Any] = {}
    for key, value in getattr(args, "unlearner_kw", None) or ():
        if key in _FLAGGED:  # two spellings of one setting: the flag's
            flag = requests.FLAGS[key]
            # quoted: as_flags spells an unquoted key=... as its flag ("--unlearner-kw --tol ... sets what --tol sets")
            raise InvalidRequestError(
                f"--unlearner-kw '{key}=...' sets what {flag} sets; use {flag} {shown_value(value)}"
            )
        if key in extra and extra[key] != value:  # the last one silently won
            raise InvalidRequestError(
                f"--unlearner-kw {key}={shown_value(extra[key])} and --unlearner-kw {key}={shown_value(value)} set "
                f"{key} to different values; give it once"
            )
        extra[key] = value
    return requests.check_settings({**given, **extra}, interface="cli")


def _num(v: Any, fmt: str) -> str:
    """A ledger number for display (``n/a`` for a missing or non-finite one, stored as null)."""
    return "n/a" if not isinstance(v, (int, float)) else format(v, fmt)


def _key(args: argparse.Namespace) -> integrity.Key | None:
    return integrity.resolve_key(getattr(args, "key_file", None))


@contextlib.contextmanager
def _progress_to_stderr(verbose: int) -> Iterator[None]:
    """``forget -v``/``-vv``: the library's progress lines (``mcmc_unlearner`` logger) on stderr while the command
    runs, one line each; the logger is put back as it was afterwards."""
    if verbose <= 0:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mcmc-unlearner forget: %(message)s"))
    logger = logging.getLogger("mcmc_unlearner")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose == 1 else logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _cmd_forget(args: argparse.Namespace) -> int:
    with _progress_to_stderr(getattr(args, "verbose", 0)):
        return _forget(args)


def _forget(args: argparse.Namespace) -> int:
    # everything about the request is checked before the folder is touched
    ids = requests.read_ids(args.ids, max_bytes=args.max_request_bytes, unique=True)
    rid = None if args.request_id is None else requests.check_request_id(args.request_id)
    overrides = _overrides(args)
    key = _key(args)
    from .. import distributed
    from . import deletion

    kwargs = dict(
        request_id=rid,
        overrides=overrides,
        on_failure=args.on_failure,
        repair_steps=args.repair_steps,
        key=key,
        wait=args.wait,
        threads=args.threads,
        interface="cli",  # the ledger's quality problems name the flags, as this command's errors do
    )
    if distributed.launched():  # torchrun: all ranks compute, rank 0 commits and prints
        out = distributed.run_forget(deletion.forget, args.model, ids, **kwargs)
        if out is None:
            return ExitCode.OK
    else:
        out = deletion.forget(args.model, ids, **kwargs)
    if args.quiet:
        return ExitCode.OK
    rolled = out.recovered.get("rolled_back") or []
    if rolled:
        print(
            f"recovered: rolled back {len(rolled)} uncommitted ledger line(s) from an interrupted request",
            file=sys.stderr,
        )
    e = out.entry
    # the entry's quality and whether it is degraded as `status` says them (problems named as flags, whoever sent the
    # request: --json printed the entry alone, its problems as recorded, Python's keywords for a resent request)
    shown = deletion.shown_entry(e, "cli")
    if args.json:
        emit(
            json.dumps(
                {
                    "applied": out.applied,
                    "request_id": out.request_id,
                    "ledger_head": out.head,
                    "entry": e,  # as the ledger records it
                    **shown,
                    "recovered": out.recovered,  # what an interrupted request left, rolled back or removed first
                },
                indent=2,
            )
        )
        return ExitCode.OK
    if not out.applied:
        k = len(e.get("ids", []))
        debris = out.recovered.get("removed_files") or []
        # the model is unchanged; files an interrupted request left behind were deleted on the way (said so)
        cleaned = (
            f"; the model is unchanged (removed {len(debris)} file(s) an interrupted request left: "
            f"{', '.join(map(one_line, debris[:5]))})"
            if debris
            else "; nothing changed"
        )
        # a resent request committed with failed checks says so (it said "already applied" alone, exit 0), with the
        # problems status lists for it, named as flags (a request sent from Python recorded them as keywords)
        q = e.get("quality")
        how = f" and was committed under --on-failure {q.get('policy', 'accept')}" if isinstance(q, dict) else ""
        degraded = (
            f"; it FAILED its quality checks{how}: model DEGRADED ({'; '.join(map(one_line, shown['problems']))}; "
            "see status)"
            if shown["degraded"]
            else ""
        )
        emit(
            f"already applied: request {one_line(out.request_id)} ({k} id{'' if k == 1 else 's'}) is ledger entry "
            f"{e.get('seq')} from {e.get('time')}{degraded}{cleaned}\nledger head: {out.head}"
        )
        return ExitCode.OK
    q = out.quality
    verdict = "quality checks passed"
    if q.get("repaired"):
        rep = q.get("repair", {})
        verdict = (
            f"quality checks FAILED ({'; '.join(q.get('problems', []))}); repaired by {rep.get('steps')} SG-MCMC steps"
        )
    elif not q.get("passed", True):
        verdict = f"quality checks FAILED, accepted: model DEGRADED ({'; '.join(q.get('problems', []))})"
    info = e.get("info") if isinstance(e.get("info"), dict) else {}
    if info.get("unresolved"):  # said in the ledger only, before (stop 43's probe)
        verdict += "; the removal changes nothing measurable (info.unresolved in the ledger)"
    emit(
        f"applied request {one_line(out.request_id)}: removed {e['n_removed']} id{'' if e['n_removed'] == 1 else 's'}, "
        f"{e['n_remaining']} remain; "
        f"solver {e['solver']} ({e['iterations']} iterations, residual {_num(e['residual'], '.2e')}), "
        f"shift {_num(e['shift_norm'], '.4g')} ± {_num(e['shift_stderr'], '.2g')}, {e['seconds']:.2f} s; {verdict}; "
        f"ledger entry {e['seq']}\nledger head: {out.head}"
    )
    return ExitCode.OK


def _cmd_status(args: argparse.Namespace) -> int:
    from ..unlearner import CUMULATIVE_REMOVAL
    from . import deletion

    # the recorded quality problems it lists name the flags, whoever sent the request
    st = deletion.status(args.model, key=_key(args), wait=args.wait, threads=args.threads, interface="cli")
    if args.quiet:
        return ExitCode.OK
    if args.json:
        emit(json.dumps(st, indent=2))
        return ExitCode.OK
    last = st["last_request"]
    signature = {"verified": "verified (HMAC)", "unsigned": "unsigned", "unchecked": "signed, NOT checked (no key)"}
    lines = [
        f"model:            {one_line(st['model'])} ({st['model_kind']}, data {st['data_kind']}, "
        f"format {st['format_version']})",
        f"examples:         {st['n_remaining']} remaining, {st['n_removed']} removed of {st['n_total']}",
        f"requests applied: {st['requests_applied']}",
        "last request:     "
        + ("none" if last is None else f"{one_line(last['request_id'])} at {last['time']} ({last['n_removed']} ids)"),
        "last residual:    " + ("n/a" if last is None else f"{_num(last['residual'], '.2e')} ({last['solver']})"),
        f"bank size:        {st['bank_size']}",
        f"finite params:    {'yes' if st['params_finite'] else 'NO'}",
        f"state hash ok:    {'yes' if st['state_hash_ok'] else 'NO'}",
        "ledger vs state:  "
        + ("ok" if st["ledger_matches_state"] else f"MISMATCH: {one_line('; '.join(st['ledger_state_problems']))}"),
        f"signature:        {signature.get(st['signature'], st['signature'])}",
    ]
    if st["degraded"]:
        names = ", ".join(f"{one_line(d['request_id'])} (entry {d['seq']})" for d in st["degraded_requests"][:10])
        lines.append(f"quality:          DEGRADED: committed with failed quality checks: {names}")
        for d in st["degraded_requests"][:10]:  # what failed (the DEGRADED line of forget says "see status")
            problems = d.get("problems")
            listed = problems if isinstance(problems, list) else [] if problems is None else [problems]
            shown = "; ".join(map(one_line, listed))
            lines.append(f"  {one_line(d['request_id'])}: {shown or 'no problem recorded'}")
    else:
        lines.append("quality:          ok (every request passed the quality checks or was repaired)")
    if st.get("unresolved_requests"):
        names = ", ".join(f"{one_line(d['request_id'])} (entry {d['seq']})" for d in st["unresolved_requests"][:10])
        lines.append(f"no effect:        applied, changing nothing measurable (info.unresolved in the ledger): {names}")
    gone = st.get("removed_since_samples")
    if gone is not None:
        past = gone > CUMULATIVE_REMOVAL
        lines.append(
            f"sample bank:      {100 * gone:.1f}% of the rows its samples were drawn on removed since"
            + (
                " (over half: each step is linearised around samples of data now mostly gone; retrain, or continue "
                "the chain and save a new model)"
                if past
                else ""
            )
        )
    removed = st["removed_ids"]
    shown = ", ".join(map(str, removed[:20])) + (f", ... ({len(removed)} in all)" if len(removed) > 20 else "")
    lines.append(f"removed ids:      {shown or 'none'}")
    if st["pending_uncommitted_lines"]:
        lines.append(f"note:             {st['pending_uncommitted_lines']} uncommitted ledger line(s) (interrupted)")
    if st["defaulted_options"]:
        names = ", ".join(f"{k}={v!r}" for k, v in st["defaulted_options"].items())
        lines.append(
            f"defaults:         not in the saved configuration (saved by an earlier version), so this version's "
            f"defaults apply: {names}"
        )
    lines.append(f"ledger head:      {st['ledger_head']}")
    emit("\n".join(lines))
    return ExitCode.OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from . import deletion
    from .requests import as_flags

    res = deletion.verify(
        args.model, key=_key(args), expect_head=args.expect_head, wait=args.wait, threads=args.threads
    )
    res.notes = [as_flags(n) for n in res.notes]  # the library's advice names the keyword (key=): say the flag
    if args.json:
        if not args.quiet:
            emit(
                json.dumps(
                    {
                        "ok": res.ok,
                        "problems": res.problems,
                        "notes": res.notes,
                        "requests": res.requests,
                        "ledger_head": res.head,
                        "signature": res.signature,
                    }
                )
            )
        return ExitCode.OK if res.ok else ExitCode.VERIFY_FAILED
    if res.ok:
        if not args.quiet:
            sig = {"verified": "; HMAC verified", "unchecked": "; signature NOT checked (no key)"}.get(
                res.signature, ""
            )
            notes = "".join(f"note: {one_line(n)}\n" for n in res.notes)
            emit(
                f"{notes}OK: {res.requests} request(s); ledger hash chain intact; state matches the ledger{sig}\n"
                f"ledger head: {res.head}"
            )
        return ExitCode.OK
    print(f"mcmc-unlearner verify: FAILED: {len(res.problems)} problem(s)", file=sys.stderr)
    for p in res.problems:
        print(f"  - {one_line(p)}", file=sys.stderr)
    return ExitCode.VERIFY_FAILED


def _seconds(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        s = float("nan")
    if not 0 <= s <= 86400:
        raise argparse.ArgumentTypeError(f"--wait must be a number of seconds in [0, 86400], got {ascii(value)[:30]}")
    return s


def _positive_int(name: str, hi: int):
    def parse(value: str) -> int:
        v = value.strip()
        if not v.isascii() or not v.isdigit() or len(v) > 12 or not 1 <= int(v) <= hi:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number in [1, {hi}], got {ascii(value)[:30]}")
        return int(v)

    return parse


def _add_common(p: argparse.ArgumentParser, wait_default: float, wait_help: str) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="model folder (from demo/bnn --save-model)")
    p.add_argument(
        "--key-file",
        default=None,
        metavar="FILE",
        help=f"integrity key (HMAC-SHA256) of a signed folder; default: ${integrity.KEY_ENV} if set",
    )
    p.add_argument("--wait", type=_seconds, default=wait_default, metavar="SECONDS", help=wait_help)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_quiet_flag(p, help="print nothing on stdout; the exit code tells the outcome (errors still go to stderr)")
    add_threads_flag(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``forget``, ``status`` and ``verify``."""
    fmt = argparse.RawDescriptionHelpFormatter
    f = subparsers.add_parser(
        "forget",
        help=COMMAND_HELP["forget"],
        description=(
            "Remove training examples from a saved model. The request is applied exactly once (a rerun is a\n"
            "no-op) and committed only if the removal passes the quality checks (solver residual within\n"
            "tolerance, the library's safety check, a finite, non-trivial shift, and a removed class no longer\n"
            "predicted for its rows: --emptied-label); see --on-failure.\n"
            "Prints the ledger head hash: record it and check it later with verify --expect-head."
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=fmt,
    )
    _add_common(
        f,
        0.0,
        "wait up to SECONDS for another process writing to the folder (default 0: exit 3 at once when busy)",
    )
    f.add_argument(
        "--ids",
        required=True,
        metavar="FILE|-",
        help="0-based training-row ids (ASCII digits): text separated by spaces, commas or new lines ('#' comments), "
        'or JSON [3, 14] / {"ids": [3, 14]}; "-" reads standard input',
    )
    f.add_argument(
        "--request-id",
        default=None,
        metavar="ID",
        help="idempotency key, 1-128 printable ASCII characters (default: SHA-256 of the sorted ids); an ID that "
        "begins with '-' is written --request-id=ID",
    )
    f.add_argument(
        "--max-request-bytes",
        type=_positive_int("--max-request-bytes", 1 << 34),
        default=requests.DEFAULT_MAX_REQUEST_BYTES,
        metavar="N",
        help=f"refuse larger requests before parsing them (default {requests.DEFAULT_MAX_REQUEST_BYTES})",
    )
    f.add_argument(
        "--on-failure",
        choices=[p.value for p in OnFailure],
        default=OnFailure.REFUSE.value,
        help="when the removal fails its quality checks: refuse (default: nothing written, exit 4), accept (commit, "
        "record the failure, status reports the model as degraded), or repair (commit, then run --repair-steps "
        "SG-MCMC steps on the remaining data and refresh the sample bank from that chain)",
    )
    f.add_argument(
        "--repair-steps",
        type=_positive_int("--repair-steps", MAX_REPAIR_STEPS),
        default=DEFAULT_REPAIR_STEPS,
        metavar="N",
        help=f"SG-MCMC steps of --on-failure repair (default {DEFAULT_REPAIR_STEPS}; at least twice the bank "
        "size: the bank is refreshed from the run's second half)",
    )
    g = f.add_argument_group("solver settings for this request (validated first; recorded in the ledger)")
    g.add_argument(
        "--solver",
        choices=["auto", *(s.value for s in SolverName)],
        default=None,
        help="inverse-Hessian solver (default: the saved one): auto, exact (dense), ggn (dense Gauss-Newton), cg "
        "(conjugate gradients), lissa (the paper's), lowrank (Lanczos), kfac (Kronecker-factored; BNN models)",
    )
    g.add_argument("--scaling", default=None, metavar="S|auto", help="LiSSA scaling s (positive) or 'auto'")
    g.add_argument(
        "--damping",
        default=None,
        metavar="D|auto",
        help="added to the Hessian's diagonal: auto (chosen per request by the step control) or a number >= 0",
    )
    g.add_argument(
        "--iter-T", dest="iter_T", default=None, metavar="T", help="LiSSA rounds / CG iteration cap (whole number >= 0)"
    )
    g.add_argument("--tol", default=None, metavar="TOL", help="relative residual the solve must reach, in (0, 1)")
    g.add_argument(
        "--curvature-draws", default=None, metavar="K", help="posterior draws averaged for the Hessian (>= 1)"
    )
    g.add_argument(
        "--bank-shift",
        choices=[b.value for b in BankShift],
        default=None,
        help="how stored samples move: mean (one common shift), sample (per-sample), affine (exact or ggn solver only)",
    )
    g.add_argument(
        "--hessian",
        choices=[h.value for h in HessianKind],
        default=None,
        help="Newton step on the remaining-data energy (remaining, default) or the full-data one (full, the paper's)",
    )
    g.add_argument(
        "--emptied-label",
        choices=[e.value for e in EmptiedLabel],
        default=None,
        help="a request that removes a class's last rows: draw the class's output-layer row from its conditional "
        "given the remaining rows (always, default), draw it only where the samples still give those rows that "
        "class (resample), or refuse where they do (refuse)",
    )
    g.add_argument(
        "--unlearner-kw",
        type=_request_keyword,
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="another MCMCUnlearner option for this request (VALUE read as JSON, else a string), e.g. "
        "emptied_max_row_evals=8388608 or refresh_every=null; repeatable; an option with a flag of its own above "
        "takes that flag",
    )
    f.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="the library's progress on stderr: -v one line per phase of the request (gradient, curvature, step, "
        "correction), -vv also one per damping trial",
    )
    f.set_defaults(func=_cmd_forget)

    s = subparsers.add_parser(
        "status",
        help=COMMAND_HELP["status"],
        description="Summarise a saved model (read-only, no lock: one consistent snapshot).",
        epilog=EXIT_CODES_HELP,
        formatter_class=fmt,
    )
    _add_common(s, 10.0, "keep retrying up to SECONDS while writers commit (default 10; then exit 3)")
    s.set_defaults(func=_cmd_status)

    v = subparsers.add_parser(
        "verify",
        help=COMMAND_HELP["verify"],
        description=(
            "Re-check the folder on one consistent snapshot: manifest checksum and HMAC, state file hash,\n"
            "ledger hash chain and head, the state against the ledger's removals. Exit 0 if intact, 1 if not."
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=fmt,
    )
    _add_common(v, 10.0, "keep retrying up to SECONDS while writers commit (default 10; then exit 3)")
    v.add_argument(
        "--expect-head",
        default=None,
        metavar="HASH",
        help="a ledger head recorded earlier (64 hex digits from forget/status): fail unless it is the current head "
        "or an earlier committed line (detects a rollback of the whole folder)",
    )
    v.set_defaults(func=_cmd_verify)
