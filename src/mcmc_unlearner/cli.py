"""Command-line interface: ``mcmc-unlearner``.

Thin by design: each subcommand lives next to the code it drives and registers itself here through a
``register(subparsers)`` function that sets ``func`` (``args -> exit code``):

* ``demo`` — the paper's Gaussian-mixture experiment (:mod:`mcmc_unlearner.experiments.gmm`; its options in
  :mod:`mcmc_unlearner.experiments.options`);
* ``bnn`` — Bayesian neural networks (:mod:`mcmc_unlearner.experiments.bnn`; its options there too);
* ``summary`` — mean ± sd over runs of an experiment's ``metrics.json`` (:mod:`mcmc_unlearner.experiments.summary`);
* ``forget``, ``status``, ``verify`` — deletion requests against saved models
  (:mod:`mcmc_unlearner.service.commands`).

:func:`main` imports only the named subcommand's module (:func:`build_parser` with ``lazy=True``): ``--version``,
``--help`` and a bad option or setting of any subcommand (``demo`` and ``bnn``: their options are parsed by
:mod:`mcmc_unlearner.experiments.options`, a missing data set's files found there too) are refused before torch is
loaded (0.2 s, was 2-3 s).

Shared here: the one-line error contract (:class:`Parser`, :func:`main`, :func:`flat`: every refusal is one line on
stderr and a documented exit code, :class:`ExitCode`; never a traceback), the flags every subcommand spells
the same way (:func:`add_quiet_flag`, :func:`add_threads_flag`, :func:`new_folder` for ``--save-model``), the
checked number types (:func:`whole_number`, :func:`positive_number`), and
:func:`emit`, which survives a closed pipe (``... | head``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from enum import IntEnum
from pathlib import Path
from typing import Any

from . import __version__
from .errors import UnlearningError

__all__ = [
    "COMMAND_HELP",
    "EXIT_CODES_HELP",
    "QUIET_HELP",
    "THREADS_VALUES",
    "ExitCode",
    "Parser",
    "add_quiet_flag",
    "add_threads_flag",
    "build_parser",
    "emit",
    "flat",
    "main",
    "max_threads",
    "new_folder",
    "one_line",
    "positive_number",
    "threads_arg",
    "whole_number",
]

DEBUG_ENV = "MCMC_UNLEARNER_DEBUG"

#: Each subcommand, in ``--help``'s order: the module that registers it (``register(subparsers)``).
COMMAND_MODULES = {
    "demo": "experiments.options",
    "bnn": "experiments.options",
    "summary": "experiments.summary",
    "forget": "service.commands",
    "status": "service.commands",
    "verify": "service.commands",
}

#: Each subcommand's line in ``mcmc-unlearner --help`` (here, so that it is listed without importing its module).
COMMAND_HELP = {
    "demo": "the paper's Gaussian-mixture experiment: unlearn 800 of 2,000 points, compare with retraining",
    "bnn": "Bayesian neural networks: remove a class, compare unlearning with retraining and baselines",
    "summary": "aggregate metrics.json over several runs (e.g. seeds): mean ± sd, min–max and n per metric",
    "forget": "apply a deletion request to a saved model (exactly once, only if the removal passes its checks)",
    "status": "what a saved model has forgotten, whether it is healthy or degraded, and its ledger head",
    "verify": "re-check a saved model's ledger against its stored state (and an expected head)",
}


class ExitCode(IntEnum):
    """Exit codes of every subcommand."""

    OK = 0  # done (for forget: applied, or already applied before)
    VERIFY_FAILED = 1  # verify found problems (listed on stderr)
    REFUSED = 2  # bad input, damaged/tampered/read-only folder, diverging solver: nothing changed
    BUSY = 3  # another process is writing to the model folder: retry, or pass --wait SECONDS
    QUALITY = 4  # the removal failed the quality checks (policy refuse): nothing changed
    INTERNAL = 70  # a bug: please report it
    INTERRUPTED = 130  # Ctrl-C: nothing half-written
    TERMINATED = 143  # SIGTERM during demo, bnn or forget: handled as Ctrl-C


class Terminated(KeyboardInterrupt):
    """SIGTERM during an experiment, raised where the process is, so that its output folder is cleaned up as after
    Ctrl-C (a scheduler's or ``timeout``'s SIGTERM left a run marker and said nothing; stop 45's probe)."""


EXIT_CODES_HELP = """exit codes:
  0  done (forget: applied now, or already applied before; nothing changed then); a write error after the
     commit point is a warning: the request IS applied
  1  verify found problems (each listed on stderr)
  2  refused: bad request, option or folder (one line on stderr; nothing changed, except a rare write error
     during the manifest's rename that cannot be read back: "... is applied is UNKNOWN; nothing was rolled
     back": run status, then resend); bnn: a method refused its work (its metrics null, the others written)
  3  busy: another process is writing to the model folder (retry, or pass --wait SECONDS)
  4  quality gate: the removal failed its checks and --on-failure is refuse (nothing changed)
  70 internal error (a bug; set MCMC_UNLEARNER_DEBUG=1 for the traceback); bnn: a method failed otherwise
     (its metrics null, the others written; one line on stderr per failed method)
  130 interrupted (nothing half-written; applied only if the message says so; if it says UNKNOWN: run status)
  143 terminated (SIGTERM during demo, bnn or forget: handled as Ctrl-C, the message says what was applied)"""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def one_line(message: object) -> str:
    """``message`` as one printable line: control characters (newlines, escapes, bidi overrides) escaped."""
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], str(message))


def flat(message: object) -> str:
    """A multi-line message (a library error listing the folders it searched, say) as one readable line: its
    lines, stripped, joined by ``"; "`` (by a space after a line that ends in ``:`` or ``.``); then
    :func:`one_line` for any other control character."""
    lines = [line.strip() for line in str(message).split("\n")]
    out = ""
    for line in filter(None, lines):
        out += ("" if not out else " " if out.endswith((":", ".")) else "; ") + line
    return one_line(out)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit code 2), like every other refusal.

    Negative numbers in any notation (``-1e6``, ``-.5``, ``-inf``) are read as option values, so that the
    option's own validation can name the fix (plain argparse reads ``--damping -1e6`` as a missing value).
    Options are matched by their full names only (``allow_abbrev=False``, every subcommand's parser too): argparse
    took ``--remove-clas 3`` as ``--remove-class`` and a shortened flag in a script would change meaning when a
    later version adds an option sharing its prefix (stop 57).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^-(?:inf|nan)$", re.I)

    def error(self, message: str) -> None:  # type: ignore[override]
        # "argument --eval-max: must be >= 0 ..." reads "--eval-max must be >= 0 ..." (and "argument --wait: --wait
        # must be ..." loses its first "--wait"): a value's refusal starts with the flag, as the library's do
        m = re.fullmatch(r"argument (--[A-Za-z0-9_-]+)(?:/-[^:]*)?: (.*)", message, re.S)
        if m is not None and m.group(2).startswith(f"{m.group(1)} "):
            message = m.group(2)
        elif m is not None and m.group(2).startswith(("must be ", "is empty")):
            message = f"{m.group(1)} {m.group(2)}"
        self.exit(ExitCode.REFUSED, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _silence_stdout() -> None:
    """Point stdout at /dev/null (after EPIPE), so that the interpreter's final flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # pragma: no cover - stdout without a file descriptor
        pass


def emit(text: str) -> bool:
    """Print ``text`` on stdout; a closed pipe (``| head``) is not an error. Returns False if it was lost."""
    try:
        print(text, flush=True)
        return True
    except BrokenPipeError:
        _silence_stdout()
        return False


#: ``--quiet`` of ``demo`` and ``bnn``: their report still goes to stdout, the thread count to ``metrics.json``.
QUIET_HELP = (
    "no progress bars and no thread-count line on stderr (only errors and warnings; the thread count is still "
    "recorded in metrics.json)"
)


def add_quiet_flag(p: argparse.ArgumentParser, dest: str = "quiet", help: str | None = None) -> None:
    """``--quiet``, spelled the same in every subcommand: no progress bars or reports on stdout."""
    p.add_argument(
        "--quiet",
        dest=dest,
        action="store_true",
        help=help or "print nothing on stdout (no progress bars or reports); errors still go to stderr",
    )


#: What ``--threads`` takes, in every subcommand (help texts and refusals quote it).
THREADS_VALUES = (
    "'auto' (1 thread for models under a million parameters, where a thread pool only adds overhead; torch's "
    "setting above that or when OMP_NUM_THREADS is set), 0 (leave torch's setting, e.g. from OMP_NUM_THREADS) or "
    "a whole number of threads >= 1 (at most 4x the machine's CPUs)"
)


def max_threads() -> int:
    """The most ``--threads`` takes: 4× this machine's CPUs (more threads than that only contend for the cores)."""
    return 4 * (os.cpu_count() or 1)


def threads_arg(value: str) -> int | str:
    """``--threads`` value: ``auto``, ``0`` (leave torch's setting) or a whole number of threads from 1 to
    :func:`max_threads` (``--threads 9999`` was taken, and torch asked for that many threads)."""
    if value == "auto":
        return value
    if re.fullmatch(r"[0-9]{1,9}", value):
        n, cap = int(value), max_threads()
        if n > cap:
            raise argparse.ArgumentTypeError(
                f"must be at most {cap} (4x this machine's {cap // 4} CPUs; more threads only contend for the "
                f"cores), 'auto' or 0, got {ascii(value)[:30]}"
            )
        return n
    raise argparse.ArgumentTypeError(
        f"must be 'auto' (by model size), 0 (leave torch's setting) or a whole number >= 1, got {ascii(value)[:30]}"
    )


def add_threads_flag(
    p: argparse.ArgumentParser, default: Any = "auto", zero: Any = None, default_help: str | None = None
) -> None:
    """``--threads N|auto|0``, the same values with the same meaning in every subcommand (default ``auto``).

    ``0`` (leave torch's setting) is stored as ``zero``: ``None`` (the default) for the library calls that take
    ``threads=None`` as "unchanged"."""

    def parse(value: str) -> Any:
        n = threads_arg(value)
        return zero if n == 0 else n

    parse.__name__ = "threads"
    p.add_argument(
        "--threads",
        type=parse,
        default=default,
        metavar="N|auto",
        help=f"torch threads: {THREADS_VALUES} (default {default_help or default})",
    )


def whole_number(minimum: int, note: str | None = None) -> Callable[[str], int]:
    """``type=`` of an integer option: a whole number >= ``minimum``; ``note`` (shown in parentheses) says what
    0 means when it is allowed (``"0: all"``), or why the minimum.

    A refusal names the allowed values: ``--flag must be >= 0 (0: all), got '-1'`` (see :meth:`Parser.error`)."""

    what = f" ({note})" if note else ""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a whole number >= {minimum}{what}, got {ascii(value)[:30]}"
            ) from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{what}, got {ascii(value)[:30]}")
        return n

    parse.__name__ = "whole number"
    return parse


def positive_number(value: str) -> float:
    """``type=`` of a float option that must be a positive finite number (a step size, a scaling)."""
    try:
        x: float | None = float(value)
    except ValueError:
        x = None
    if x is None or not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {ascii(value)[:30]}")
    return x


def new_folder(value: str) -> str:
    """``--save-model`` value, checked before any work: a new path or an empty folder (never partial work)."""
    p = Path(value)
    if os.path.lexists(p):
        if p.is_symlink() or not p.is_dir():
            raise argparse.ArgumentTypeError(f"{value!a} exists and is not a folder; choose a new folder")
        if any(os.scandir(p)):
            raise argparse.ArgumentTypeError(
                f"{value!a} is not empty; choose a new folder (or delete it first: rm -r {value!a})"
            )
        if not os.access(p, os.W_OK):
            raise argparse.ArgumentTypeError(f"{value!a} is not writable; choose another folder")
        return value
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot create {value!a}: {str(parent)!a} is not a writable folder")
    return value


class _Only:
    """The subparsers of :func:`build_parser` as one module's ``register`` sees them: only ``name`` is added."""

    def __init__(self, sub: argparse._SubParsersAction, name: str | None) -> None:
        self.sub, self.name = sub, name

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if name == self.name:
            return self.sub.add_parser(name, **kwargs)
        return Parser(prog=name)  # another subcommand of the module: listed by name only, never parsed


def _command_in(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (its first word that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None, *, lazy: bool = False) -> argparse.ArgumentParser:
    """The argument parser with every subcommand.

    Args:
        argv: The arguments to be parsed (default ``sys.argv[1:]``); read only when ``lazy``.
        lazy: Import only the module of the subcommand ``argv`` names, and list the others by name and help line:
            ``--version``, ``--help`` and a bad option of any subcommand are answered without importing torch (2-3 s
            before).
    """
    wanted = _command_in(sys.argv[1:] if argv is None else argv) if lazy else None
    p = Parser(
        prog="mcmc-unlearner",
        description="Remove deleted training data from SG-MCMC Bayesian models without retraining.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"mcmc-unlearner {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    registered: set[str] = set()
    for name, module in COMMAND_MODULES.items():
        if lazy and name != wanted:
            sub.add_parser(name, help=COMMAND_HELP[name])
        elif module not in registered:
            registered.add(module)
            importlib.import_module(f".{module}", __package__).register(_Only(sub, wanted) if lazy else sub)
    return p


def _code_for(exc: BaseException) -> int:
    from . import errors
    from .service.fsio import BusyError

    # the quality gate's module loads torch: an error raised before it was imported is none of its
    gate = sys.modules.get(f"{__package__}.service.gate")
    quality = (
        *((gate.QualityGateError,) if gate else ()),
        *((errors.QualityError,) if hasattr(errors, "QualityError") else ()),
    )
    if isinstance(exc, BusyError):
        return ExitCode.BUSY
    if isinstance(exc, quality):
        return ExitCode.QUALITY
    return ExitCode.REFUSED


def _launched() -> bool:
    """Whether torchrun started this process (:func:`~mcmc_unlearner.distributed.launched`; that module, which
    loads torch, is imported only when ``WORLD_SIZE`` is set)."""
    if "WORLD_SIZE" not in os.environ:
        return False
    from . import distributed

    return distributed.launched()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser(argv, lazy=True)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a one-line usage error (already printed)
        return int(exc.code or 0) if not isinstance(exc.code, str) else ExitCode.REFUSED
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    launched = _launched()
    if launched:
        from . import distributed
    if launched and distributed.env_rank() != 0 and args.command in ("status", "verify"):
        return 0  # read-only commands under torchrun: rank 0 answers
    if launched and args.command in ("demo", "bnn"):
        # the experiments are single-process: rank 0 runs them, the other ranks would only duplicate the work
        if distributed.env_rank() != 0:
            return 0
        print(f"mcmc-unlearner {args.command}: single-process experiment; running on rank 0 only", file=sys.stderr)

    # a request's warnings are said once it is applied: a refused one prints its error alone, the one line the
    # deletion guide promises (stop 45's probe: a quality-gate refusal printed the sequence warning too)
    held: list[str] | None = [] if args.command == "forget" else None

    # the library's and the service's messages spell a request's options as Python does (iter_T=0,
    # on_failure='repair'): the deletion commands say the flag (--iter-T 0, --on-failure repair)
    spell: Callable[[str], str] = str
    if args.command in ("forget", "status", "verify"):
        from .service.requests import as_flags as spell

    def one_line_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None):
        text = f"mcmc-unlearner {args.command}: warning: {flat(spell(str(message)))}"
        if held is None:
            print(text, file=sys.stderr)
        else:
            held.append(text)

    previous_sigterm, sigterm = None, []
    if args.command in ("demo", "bnn", "forget") and threading.current_thread() is threading.main_thread():
        # a scheduler's or timeout's SIGTERM is handled as Ctrl-C: an experiment cleans its folder, a forget says
        # whether its request is applied (it exited 143 without a word; stop 46's probe)
        def terminated(signum: int, frame: Any) -> None:
            sigterm.append(signum)
            raise Terminated("terminated (SIGTERM); nothing half-written")

        previous_sigterm = signal.signal(signal.SIGTERM, terminated)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning  # one line on stderr, as every message of the CLI
            code = int(args.func(args) or 0)
        for text in held or ():
            print(text, file=sys.stderr)
        return code
    except (UnlearningError, FileNotFoundError, ValueError, OSError, MemoryError) as exc:
        if isinstance(exc, BrokenPipeError):
            _silence_stdout()
            return 141  # 128 + SIGPIPE, as a shell reports a process killed by it
        what = exc
        if isinstance(exc, MemoryError):  # the library's budget refusals say what was needed and the fix
            what = f"{exc}; nothing was changed" if str(exc) else "out of memory; nothing was changed"
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.strerror:
            what = f"{exc.strerror}: {ascii(exc.filename) if exc.filename else ''}".rstrip(": ")
        print(f"mcmc-unlearner {args.command}: error: {flat(spell(str(what)))}", file=sys.stderr)
        return _code_for(exc)
    except KeyboardInterrupt as exc:
        # Ctrl-C after a commit point says that the update is in place; anywhere else nothing was changed
        print(f"mcmc-unlearner {args.command}: {exc if str(exc) else 'interrupted'}", file=sys.stderr)
        # (after a forget's commit point the interrupt is re-raised saying the request is applied)
        return ExitCode.TERMINATED if isinstance(exc, Terminated) or sigterm else ExitCode.INTERRUPTED
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        print(
            f"mcmc-unlearner {args.command}: internal error ({type(exc).__name__}: {one_line(exc)[:300]}); this is a "
            f"bug, please report it (set {DEBUG_ENV}=1 for the traceback)",
            file=sys.stderr,
        )
        return ExitCode.INTERNAL
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _exit(code: int) -> None:
    """Exit with ``code``; under torchrun skip interpreter finalisation, during which gloo's worker threads
    can abort the process (SIGABRT) after the command itself succeeded."""
    if _launched():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
