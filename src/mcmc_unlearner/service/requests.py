"""Deletion requests as they arrive: ids (file, stdin or JSON), request ids and per-request solver settings.

Everything here is checked **before** the model folder is touched, and every refusal is an
:class:`~mcmc_unlearner.errors.InvalidRequestError` whose message names the problem and the fix.

* **Ids** are 0-based training-row numbers written in ASCII digits (``0``–``9``; no signs, no Unicode digits,
  no underscores), below 2^63. Text requests separate them by ASCII whitespace or commas (``#`` starts a
  comment); JSON requests are a list or ``{"ids": [...]}`` — no other keys, no duplicate keys, nesting at
  most two levels. The size is checked before anything is parsed (``max_bytes``); a file or standard input
  may start with a UTF-8 byte-order mark (dropped). Text requests are read vectorised (:func:`parse_ids`), and
  the CLI refuses a repeated id while parsing, before any per-id Python object exists.
* **Request ids** are 1–128 printable ASCII characters without leading or trailing spaces (so echoing them
  cannot move the cursor or fake output).
* **Settings** (:func:`check_settings`) are validated with messages naming the fix: ``damping`` ``"auto"``
  or finite and ``>= 0``; ``tol`` finite in ``(0, 1)``; ``iter_T`` a whole number in ``[0, 10^6]``;
  ``curvature_draws`` in ``[1, 10^5]``; ``scaling`` ``"auto"`` or finite ``> 0``; solver, Hessian and bank
  shift from their enums; the messages name the Python keyword (``tol``) or, for the command line, the flag
  (``--tol``). ``None`` means "not given" (the folder's setting is kept), except for the options whose ``None``
  is a value in the library: ``grad_draws``, ``curvature_draws``, ``refresh_every``, ``memory_budget`` and
  ``expectation`` pass it on (every bank draw; the solver's default draws and reuse; the default budget; the bank
  where there is one), and ``slope_eta=None`` (``newton_gate=None``, ``direct_z=None``), the slope test (the gate,
  the direct test) off in the library, is refused naming ``slope_eta=0`` (``newton_gate=0``, ``direct_z=0``), which
  turns it off for the request.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np

from ..errors import InvalidRequestError
from ..options import BankShift, EmptiedLabel, HessianKind, SolverName, is_integer, shown_value
from .ledger import strict_loads

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "FLAGS",
    "MAX_ID",
    "MAX_REQUEST_ID_LENGTH",
    "as_flags",
    "as_keywords",
    "check_request_id",
    "check_settings",
    "check_wait",
    "parse_ids",
    "parse_ids_file",
    "read_ids",
    "shown_as",
    "spelling",
]

DEFAULT_MAX_REQUEST_BYTES = 16 << 20  # 16 MiB: about two million ids

#: A request's options: the Python keyword (``forget(..., on_failure=)``, ``overrides=``) and the command line's flag.
FLAGS = {
    "on_failure": "--on-failure",
    "repair_steps": "--repair-steps",
    "max_request_bytes": "--max-request-bytes",
    "solver": "--solver",
    "scaling": "--scaling",
    "damping": "--damping",
    "iter_T": "--iter-T",
    "tol": "--tol",
    "curvature_draws": "--curvature-draws",
    "bank_shift": "--bank-shift",
    "hessian": "--hessian",
    "emptied_label": "--emptied-label",
    # the service's other arguments (forget, status, verify): advice that names them is spelled the same way
    "request_id": "--request-id",
    "expect_head": "--expect-head",
    "model_dir": "--model",
    "wait": "--wait",
}
#: Advice whose Python keyword and flag differ in more than their spelling: ``key=`` takes the key itself, the
#: command line a file holding it.
_PHRASES = {"pass key=": "pass --key-file"}
_KEYWORD = {flag: key for key, flag in FLAGS.items()}
_KEYS = "|".join(sorted(FLAGS, key=len, reverse=True))
# key=value (value quoted or not; a list such as solver='kfac'/'cg' is left as it is) or, for a keyword no English
# word spells, the bare keyword ("raise iter_T")
# (not a chain such as tol=bank_shift=x: its value would be spelled again by a second pass)
_KEY_VALUE = re.compile(rf"(?<![\w.=-])({_KEYS})=(?:'([^'\s]*+)'|([^\s,;:()'\"/=]++))(?![\w/'\"=])")
_BARE_KEY = re.compile(
    r"(?<![\w.-])(on_failure|repair_steps|max_request_bytes|iter_T|curvature_draws|bank_shift|emptied_label|request_id"
    r"|expect_head|model_dir)\b(?!=)"
)
# a flag and, when it is a word the option takes or a number, its value ("--iter-T or use" has none)
_WORDS = "auto|refuse|accept|repair|lissa|cg|exact|ggn|lowrank|kfac|remaining|full|mean|sample|affine|resample|always"
_FLAG = re.compile(rf"(?<![\w-])({'|'.join(map(re.escape, _KEYWORD))})(?![\w-])(?: ({_WORDS}|\d[\d.eE+-]*)(?![\w-]))?")


def as_flags(message: str) -> str:
    """``message`` as the command line spells a request's options: ``iter_T=0`` reads ``--iter-T 0``,
    ``on_failure='repair'`` ``--on-failure repair`` and ``raise iter_T`` ``raise --iter-T``."""
    message = _KEY_VALUE.sub(
        lambda m: f"{FLAGS[m.group(1)]} {m.group(2) if m.group(2) is not None else m.group(3)}", message
    )
    for keyword, flag in _PHRASES.items():
        message = message.replace(keyword, flag)
    return _BARE_KEY.sub(lambda m: FLAGS[m.group(1)], message)


def as_keywords(message: str) -> str:
    """``message`` as Python spells a request's options (the inverse of :func:`as_flags`): ``--on-failure repair``
    reads ``on_failure='repair'``, ``--iter-T 1`` ``iter_T=1`` and ``raise --repair-steps`` ``raise repair_steps``."""

    def keyword(m: re.Match[str]) -> str:
        key, value = _KEYWORD[m.group(1)], m.group(2)
        if value is None:
            return key
        return f"{key}={value}" if value[0].isdigit() else f"{key}={value!r}"

    for key, flag in _PHRASES.items():
        message = message.replace(flag, key)
    return _FLAG.sub(keyword, message)


def _as_cli(message: str) -> str:
    return as_flags(as_keywords(message))


def spelling(interface: str) -> Callable[[str], str]:
    """How the service spells its advice to a caller of ``interface``: ``"python"`` names the keyword
    (:func:`as_keywords`), ``"cli"`` the flag (:func:`as_keywords`, then :func:`as_flags`), as its errors do."""
    if interface == "python":
        return as_keywords
    if interface == "cli":
        return _as_cli
    raise InvalidRequestError(f"interface must be 'python' or 'cli', got {ascii(interface)[:40]}")


def shown_as(interface: str) -> Callable[[str], str]:
    """How text the ledger recorded (a request's quality problems, in the spelling of whoever sent it) is shown to
    a reader on ``interface``: ``"python"`` names the keyword (:func:`as_keywords`), ``"cli"`` the flag
    (:func:`as_flags`). Text that names no option is shown as it is, and the problems the library records
    read the same when shown again; the ledger itself is never rewritten."""
    if interface == "python":
        return as_keywords
    if interface == "cli":
        return as_flags  # a record made for the command line is already this; the round trip could lose a flag
    raise InvalidRequestError(f"interface must be 'python' or 'cli', got {ascii(interface)[:40]}")


MAX_ID = 2**63 - 1
MAX_REQUEST_ID_LENGTH = 128
_SEP = re.compile(r"[ \t\n\r\f\v,]+")
_DIGITS = re.compile(r"[0-9]+")
_REQUEST_ID = re.compile(r"[!-~](?:[ -~]*[!-~])?")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_COMMENT = re.compile(rb"#[^\n]*")
_SEP_TO_SPACE = bytes.maketrans(b"\t\n\r\f\v,", b"      ")
_FAST_CHUNK = 1 << 18  # bytes per vectorised piece: its temporaries stay below about 8 MB
_NOT_SPACE = re.compile(rb"[^ \t\n\r\f\v]")
_TWENTY_DIGITS = re.compile(rb"[0-9]{20}")
_NINETEEN_DIGITS = re.compile(rb"[0-9]{19}")
UTF8_BOM = b"\xef\xbb\xbf"


def _show(text: str, n: int = 40) -> str:
    """A short, ASCII-only, quoted rendering of untrusted text (control characters escaped)."""
    return ascii(text[:n]) + ("..." if len(text) > n else "")


def _to_id(tok: str, where: str) -> int:
    if not _DIGITS.fullmatch(tok):
        raise InvalidRequestError(
            f"{where}: {_show(tok)} is not an id; ids are 0-based row numbers written with the ASCII digits 0-9"
        )
    if len(tok.lstrip("0")) > 19 or int(tok) > MAX_ID:
        raise InvalidRequestError(f"{where}: id {_show(tok, 24)} is too large; ids are row numbers below 2^63")
    return int(tok)


def _json_depth(raw: bytes) -> int:
    """Deepest ``[``/``{`` nesting of JSON text, strings skipped (vectorised: no recursion, linear time)."""
    bare = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    step = (np.isin(bare, (ord("["), ord("{")))).astype(np.int64) - np.isin(bare, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def _parse_json(raw: bytes, source: str) -> list[int]:
    if _json_depth(raw) > 2:
        raise InvalidRequestError(f'{source}: JSON nested too deeply; write a list [1, 2] or {{"ids": [1, 2]}}')
    try:
        obj = strict_loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{source} is not UTF-8 text; write the ids as text or JSON") from None
    except ValueError as exc:
        msg = getattr(exc, "msg", None) or str(exc)
        line = getattr(exc, "lineno", None)
        at = f" at line {line}" if line else ""
        if "Exceeds the limit" in msg or "integer string conversion" in msg:
            raise InvalidRequestError(f"{source}: an id is too large; ids are row numbers below 2^63") from None
        raise InvalidRequestError(f"{source} is not valid JSON ({ascii(msg)[1:-1][:80]}{at}); fix it") from None
    if isinstance(obj, dict):
        extra = sorted(k for k in obj if k != "ids")
        if extra:
            raise InvalidRequestError(
                f'{source}: unknown key(s) {_show(", ".join(extra), 60)}; a JSON request holds only "ids"'
            )
        if "ids" not in obj:
            raise InvalidRequestError(f'{source}: a JSON object must hold the ids under "ids"')
        obj = obj["ids"]
    if not isinstance(obj, list):
        raise InvalidRequestError(f"{source}: ids must be a JSON list of integers")
    out = []
    for v in obj:
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidRequestError(f"{source}: id {_show(repr(v))} is not an integer; ids are 0-based row numbers")
        if v < 0:
            raise InvalidRequestError(f"{source}: id {v} is negative; ids are 0-based row numbers")
        if v > MAX_ID:
            raise InvalidRequestError(f"{source}: id {_show(str(v), 24)} is too large; ids are row numbers below 2^63")
        out.append(v)
    return out


def _fast_text_ids(body: bytes, unique: bool = False) -> np.ndarray | None:
    """The ids of a text request whose tokens are all ASCII-digit ids below 2^63 written with at most 19 digits,
    read vectorised in pieces of about 256 KiB (a 16 MiB request in well under a second, without a Python object
    per id); ``None`` for anything else (a bad token, an id written with 20 or more digits, not UTF-8), which the
    line-by-line reader then reads or refuses with its message. Both read the same grammar: ``#`` to the end of
    the line is a comment, tokens are separated by ASCII whitespace and commas.

    With ``unique`` a piece holding an id twice is refused at once (every token was checked first, so a
    malformed id is still refused before a repeated one); repeats across pieces are the caller's check.
    """
    if b"#" in body:
        try:
            body.decode("utf-8")  # the comments too must be UTF-8, as the line reader requires
        except UnicodeDecodeError:
            return None
        body = _COMMENT.sub(b"", body)
    flat = body.translate(_SEP_TO_SPACE)
    whole = np.frombuffer(flat, dtype=np.uint8)
    for i in range(0, whole.size, _FAST_CHUNK):  # in pieces: no full-size temporaries
        c = whole[i : i + _FAST_CHUNK]
        if (((c - np.uint8(48)) > 9) & (c != 32)).any():
            return None  # anything but digits and separators: the line reader's case
    if _TWENTY_DIGITS.search(flat):
        return None  # an id written with 20 or more digits (leading zeros): the line reader's case
    if any(int(m.group()) > MAX_ID for m in _NINETEEN_DIGITS.finditer(flat)):
        return None  # too large: the line reader words the refusal
    parts: list[np.ndarray] = []
    pos, n = 0, len(flat)
    while pos < n:
        end = flat.find(b" ", min(pos + _FAST_CHUNK, n))
        end = n if end < 0 else end  # pieces end at a separator: no token is cut
        a = np.frombuffer(flat, dtype=np.uint8, count=end - pos, offset=pos)
        edge = np.diff((a != 32).view(np.int8), prepend=np.int8(0), append=np.int8(0))
        starts, ends = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
        lengths = ends - starts
        if lengths.size:
            vals = np.zeros(lengths.size, dtype=np.uint64)  # < 10^19 < 2^64: no overflow
            for k in range(int(lengths.max())):
                m = lengths > k
                vals[m] = vals[m] * np.uint64(10) + (a[starts[m] + k] - np.uint8(48))
            part = vals.astype(np.int64)
            if unique:
                _refuse_duplicates(part)
            parts.append(part)
        pos = end + 1
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _refuse_duplicates(ids: np.ndarray) -> None:
    """Refuse ids that appear more than once, naming the smallest five (as :meth:`RemovableDataset.validate`)."""
    if ids.size < 2:
        return
    s = np.sort(ids)
    found: list[int] = []
    for i in range(0, s.size - 1, _FAST_CHUNK):  # in pieces: no array of every repeat
        piece = s[i : i + _FAST_CHUNK + 1]
        for v in np.unique(piece[1:][piece[1:] == piece[:-1]])[:5].tolist():
            if not found or found[-1] != v:
                found.append(v)
        if len(found) >= 5:
            break
    if found:
        raise InvalidRequestError(f"deletion request: id(s) {found[:5]} appear more than once; list each id once")


def parse_ids(text: str | bytes, source: str = "request", *, unique: bool = False) -> list[int]:
    """Parse a deletion request: a JSON list / ``{"ids": [...]}``, or ids separated by whitespace/commas/lines.

    Args:
        text: The request.
        source: How messages name it (e.g. ``"ids file 'req.txt'"``).
        unique: Also refuse ids that appear more than once (as :func:`~.deletion.forget` does), checked on the
            parsed ids before the Python list is built: a 16 MiB request of one repeated id is refused in
            about a second. A malformed id is refused first, as without ``unique``.

    Raises:
        InvalidRequestError: Empty, not UTF-8, malformed or too deeply nested JSON, duplicate or extra JSON keys,
            or any id that is not ASCII digits below 2^63; with ``unique``, a repeated id.
    """
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    first = _NOT_SPACE.search(raw)
    if first is None:
        raise InvalidRequestError(f"{source} is empty: list at least one training-example id")
    if raw[first.start() : first.start() + 1] in (b"[", b"{"):
        ids = _parse_json(raw.strip(b" \t\n\r\f\v"), source)
    else:
        fast = _fast_text_ids(raw, unique)  # outer whitespace separates nothing: no stripped copy needed
        if fast is not None:
            if not fast.size:
                raise InvalidRequestError(f"{source} is empty: list at least one training-example id")
            if unique:
                _refuse_duplicates(fast)
            return fast.tolist()
        body = raw.strip(b" \t\n\r\f\v")  # line numbers count from the first non-blank line, as before
        try:
            decoded = body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError(f"{source} is not UTF-8 text; write the ids as text or JSON") from None
        ids = []
        for lineno, line in enumerate(decoded.split("\n"), start=1):
            for tok in _SEP.split(line.split("#", 1)[0]):
                if tok:
                    ids.append(_to_id(tok, f"{source} line {lineno}"))
    if not ids:
        raise InvalidRequestError(f"{source} is empty: list at least one training-example id")
    if unique:
        _refuse_duplicates(np.asarray(ids, dtype=np.int64))
    return ids


def _read_limited(stream: BinaryIO | TextIO, max_bytes: int, source: str, size: int = 0) -> bytes:
    """At most ``max_bytes`` of ``stream`` (else refused); ``size``: the file's size, read in one piece then. A text
    stream's characters are counted and returned as UTF-8 bytes."""
    chunks: list[bytes] = []
    total = 0
    while True:
        want = min(size + 1, max_bytes + 1) if size and not chunks else min(1 << 20, max_bytes + 1 - total)
        chunk = stream.read(want)
        if isinstance(chunk, str):  # a text stream (io.StringIO): its UTF-8 bytes
            chunk = chunk.encode("utf-8")
        if not chunk:
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)  # one piece: no copy
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise InvalidRequestError(
                f"{source} is larger than {max_bytes} bytes; split the request or raise --max-request-bytes"
            )


def _strip_bom(raw: bytes) -> bytes:
    """``raw`` without a leading UTF-8 byte-order mark (Windows editors write one at the start of text files)."""
    return raw[len(UTF8_BOM) :] if raw.startswith(UTF8_BOM) else raw


def read_ids(
    path: str | os.PathLike,
    *,
    max_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    stdin: BinaryIO | TextIO | None = None,
    unique: bool = False,
) -> list[int]:
    """Read and parse the ids of a request from a file, or from standard input when ``path`` is ``"-"``.

    The size is checked before parsing (a regular file by its size, stdin while reading). Only regular files
    are read (a FIFO would block; use ``-`` for pipes). A leading UTF-8 byte-order mark is dropped.

    Args:
        path: The ids file, or ``"-"``.
        max_bytes: Largest request accepted.
        stdin: Stream read for ``"-"`` (default: standard input's byte buffer): binary, or text (``io.StringIO``),
            read as UTF-8.
        unique: Refuse ids that appear more than once (see :func:`parse_ids`).

    Raises:
        InvalidRequestError: Missing, not a regular file, too large, or malformed (see :func:`parse_ids`); for
            ``"-"``, standard input closed or unreadable.
    """
    if str(path) == "-":
        stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", None)
        if stream is None:  # `forget --ids - <&-`: Python sets sys.stdin to None (was: internal error, exit 70)
            why = (
                "standard input is closed"
                if sys.stdin is None
                else f"standard input ({type(sys.stdin).__name__}) is a text stream without a byte buffer"
            )  # e.g. replaced by io.StringIO in an embedding program or a notebook
            raise InvalidRequestError(
                f"--ids - reads the ids from standard input, but {why}; pipe the ids in "
                "(e.g. `cat ids.txt | mcmc-unlearner forget ... --ids -`) or pass --ids FILE"
                + ("" if sys.stdin is None else " (from Python: read_ids('-', stdin=a binary or text stream))")
            )
        try:
            raw = _strip_bom(_read_limited(stream, max_bytes, "standard input"))
        except InvalidRequestError:
            raise
        except (OSError, ValueError) as exc:  # a closed descriptor (EBADF) or stream
            raise InvalidRequestError(
                f"cannot read the ids from standard input ({getattr(exc, 'strerror', None) or exc}); pipe the ids in "
                "or pass --ids FILE"
            ) from None
        return parse_ids(raw, "standard input", unique=unique)
    p = Path(path)
    shown = _show(str(p), 120)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InvalidRequestError(
            f"ids file {shown} not found; pass --ids FILE with one id per line or a JSON list (or --ids - for stdin)"
        ) from None
    except OSError as exc:
        raise InvalidRequestError(f"cannot read ids file {shown}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidRequestError(f"ids file {shown} is not a regular file; to pipe ids in, use --ids -")
    if st.st_size > max_bytes:
        raise InvalidRequestError(
            f"ids file {shown} has {st.st_size} bytes, more than --max-request-bytes {max_bytes}; split the request "
            "or raise the limit"
        )
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InvalidRequestError(f"cannot read ids file {shown}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise InvalidRequestError(f"ids file {shown} is not a regular file; to pipe ids in, use --ids -")
        raw = _strip_bom(_read_limited(f, max_bytes, f"ids file {shown}", size=st.st_size))
    return parse_ids(raw, f"ids file {shown}", unique=unique)


def parse_ids_file(path: str | os.PathLike) -> list[int]:
    """Read and parse a request file (:func:`read_ids` with the default size limit)."""
    return read_ids(path)


def check_request_id(rid: object, name: str = "--request-id") -> str:
    """Return ``rid`` if it is a valid request id (1–128 printable ASCII, no outer spaces), else refuse it.

    Args:
        rid: The request id.
        name: How the caller sets it, for the message: ``"--request-id"`` (the CLI) or ``"request_id"`` (Python).
    """
    if not isinstance(rid, str):  # was "--request-id is empty" for request_id=5 from Python (stop 56's probe)
        raise InvalidRequestError(
            f"{name} must be a string, got {type(rid).__name__} {_show(repr(rid))}; give a printable ASCII id such as "
            "'ticket-0001'"
        )
    if not rid:
        raise InvalidRequestError(f"{name} is empty; give a non-empty id such as ticket-0001")
    if len(rid) > MAX_REQUEST_ID_LENGTH:
        raise InvalidRequestError(
            f"{name} has {len(rid)} characters; use at most {MAX_REQUEST_ID_LENGTH} (e.g. a ticket number)"
        )
    if not _REQUEST_ID.fullmatch(rid):
        raise InvalidRequestError(
            f"{name} {_show(rid)} must be printable ASCII without control characters or outer spaces (e.g. ticket-0001)"
        )
    return rid


MAX_WAIT = 86400.0


def check_wait(wait: object, name: str = "wait") -> float:
    """Return ``wait`` as seconds if it is a real number (Python's or numpy's, not a bool) in [0, :data:`MAX_WAIT`]
    (as ``--wait`` takes), else refuse it.

    ``nan`` and negative values were taken as 0 and a string reached the lock as a raw ``TypeError`` (stop 56's
    probe)."""
    # numbers.Real: numpy integers and floats too (np.int64(5) was refused); bool is not a number of seconds
    ok = isinstance(wait, numbers.Real) and not isinstance(wait, (bool, np.bool_)) and 0 <= wait <= MAX_WAIT
    if not ok:
        raise InvalidRequestError(
            f"{name} must be a number of seconds in [0, {MAX_WAIT:g}], got {_show(repr(wait))}; e.g. {name}=30 to "
            "wait for another writer"
        )
    return float(wait)


# ---------------------------------------------------------------------------------------------- settings
MAX_ITER_T = 10**6
MAX_DRAWS = 10**5


def _given(value: Any) -> str:
    """A setting's value as a refusal shows it: an integer by :func:`~mcmc_unlearner.options.shown_value` (``10**400``
    by its size: Python refuses to print one past 4,300 digits), anything else as its text, cut (:func:`_show`)."""
    if is_integer(value):
        return shown_value(value)
    try:
        return _show(str(value))
    except ValueError:  # e.g. a Fraction of an integer past the limit
        return shown_value(value)


def _number(name: str, value: Any, fix: str) -> float:
    if isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a number, got {_show(repr(value))}; {fix}")
    try:
        x = float(value)
    except OverflowError:  # an integer past a float's range (10**400) is as far from finite as inf
        x = math.inf
    except (TypeError, ValueError):
        raise InvalidRequestError(f"{name} must be a number, got {_given(value)}; {fix}") from None
    if not math.isfinite(x):
        raise InvalidRequestError(f"{name} must be finite, got {_given(value)}; {fix}")
    return x


def _whole(name: str, value: Any, lo: int, hi: int, fix: str) -> int:
    if isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a whole number, got {_show(repr(value))}; {fix}")
    if isinstance(value, int):
        k = value
    elif isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]{1,12}", value.strip()):
        k = int(value)
    elif isinstance(value, float) and value.is_integer() and abs(value) < 1e12:
        k = int(value)
    else:
        raise InvalidRequestError(f"{name} must be a whole number, got {_given(value)}; {fix}")
    if not lo <= k <= hi:
        raise InvalidRequestError(f"{name} must be between {lo} and {hi}, got {shown_value(k)}; {fix}")
    return k


def _choice(name: str, value: Any, enum: Any, extra: tuple[str, ...] = ()) -> str:
    allowed = [*extra, *(e.value for e in enum)]
    v = value.value if hasattr(value, "value") else value
    if v not in allowed:
        raise InvalidRequestError(f"{name} must be one of {', '.join(allowed)}, got {_given(v)}")
    return str(v)


def check_settings(overrides: Mapping[str, Any] | None, interface: str = "python") -> dict[str, Any]:
    """Validate per-request solver settings before any work; returns them normalised (numbers as numbers).

    Known keys are checked here with messages naming the fix; other unlearner options are passed on and
    checked by :class:`~mcmc_unlearner.unlearner.MCMCUnlearner` itself.

    Args:
        overrides: The settings (``forget(..., overrides=)``, or the command line's flags by keyword).
        interface: Who asks: ``"python"`` (the messages name the keyword, ``tol``) or ``"cli"`` (the flag,
            ``--tol``). Stop 56: ``overrides={"tol": True}`` from Python was refused naming ``--tol``.

    Raises:
        InvalidRequestError: A setting is out of range or of the wrong type, or ``interface`` is unknown.
    """
    spell = as_keywords if spelling(interface) is as_keywords else None  # (spelling refuses an unknown interface)
    try:
        return _check_settings(overrides)
    except InvalidRequestError as e:  # the messages are written with the flags
        if spell is None:
            raise
        raise InvalidRequestError(spell(str(e))) from None


#: Unlearner options whose ``None`` is a value in :class:`~mcmc_unlearner.unlearner.MCMCUnlearner` other than the
#: folder's setting, with what it means there and how a request says it.
_NONE_IS_A_VALUE = {
    "slope_eta": "the slope test off: give slope_eta=0 to turn it off for this request",
    "newton_gate": "the gate off: give newton_gate=0 to turn it off for this request",
    "direct_z": "the direct test off: give direct_z=0 to turn it off for this request",
}
#: Unlearner options whose ``None`` a request passes on to :class:`~mcmc_unlearner.unlearner.MCMCUnlearner`, where it
#: is a value: every bank draw for ``G`` (``grad_draws``), the solver's default number of curvature draws and reuse
#: (``curvature_draws``, ``refresh_every``), the default memory budget (``memory_budget``), the bank where there is
#: one (``expectation``). Skipped as "not given" (stop 63), the request ran with the folder's setting instead. The
#: command line leaves an absent flag out.
_NONE_PASSED_ON = ("grad_draws", "curvature_draws", "refresh_every", "memory_budget", "expectation")


def _check_settings(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """:func:`check_settings`'s checks, their messages naming the command line's flags."""
    out: dict[str, Any] = {}
    for key, value in dict(overrides or {}).items():
        if value is None and key in _NONE_IS_A_VALUE:
            # None is "not given" here (the command line's flags left out), but a value of these options in the
            # library: skipped, slope_eta=None (the test off in MCMCUnlearner) ran the request with the test on
            raise InvalidRequestError(
                f"{key}=None cannot be given per request: a request's None means 'not given' (the folder's setting "
                f"is kept), while the library reads it as {_NONE_IS_A_VALUE[key]}"
            )
        if value is None:
            if key in _NONE_PASSED_ON:
                out[key] = None
            continue
        if key == "seed":
            # a saved model's requests draw from its saved generator state, which replaces what a seed would set:
            # taken, the ledger recorded a seed that changed nothing (stop 43)
            raise InvalidRequestError(
                f"seed={shown_value(value)} cannot be set per request: a saved model's requests draw from its saved "
                "generator state (what makes a request reproducible from the folder), so it would change nothing; "
                "leave it out (the seed is set when the model is saved)"
            )
        if key == "damping":
            if value == "auto":
                out[key] = "auto"
                continue
            d = _number("--damping", value, "use 'auto' (chosen per request), 0, or a small positive value")
            if d < 0:
                raise InvalidRequestError(
                    f"--damping must be 'auto' or >= 0, got {d:g}; negative damping makes the curvature indefinite: "
                    "use auto (chosen per request) or a small positive value"
                )
            out[key] = d
        elif key == "tol":
            t = _number("--tol", value, "use a relative residual tolerance such as 1e-4")
            if not 0 < t < 1:
                raise InvalidRequestError(
                    f"--tol must be in (0, 1), got {t:g}: it is the relative residual the solve must reach; "
                    "use e.g. 1e-4"
                )
            out[key] = t
        elif key == "iter_T":
            out[key] = _whole("--iter-T", value, 0, MAX_ITER_T, "use e.g. 100 (LiSSA rounds / CG iterations)")
        elif key == "curvature_draws":
            out[key] = _whole("--curvature-draws", value, 1, MAX_DRAWS, "use e.g. 16 (posterior draws averaged for H)")
        elif key == "scaling":
            if value == "auto":
                out[key] = "auto"
            else:
                s = _number("--scaling", value, "use 'auto' or a positive number")
                if s <= 0:
                    raise InvalidRequestError(f"--scaling must be 'auto' or a positive number, got {s:g}")
                out[key] = s
        elif key == "solver":
            out[key] = _choice("--solver", value, SolverName, ("auto",))
        elif key == "bank_shift":
            out[key] = _choice("--bank-shift", value, BankShift)
        elif key == "emptied_label":
            out[key] = _choice("--emptied-label", value, EmptiedLabel)
        elif key == "hessian":
            out[key] = _choice("--hessian", value, HessianKind)
        else:
            out[key] = value
    if out.get("solver") == SolverName.KFAC.value and out.get("hessian") == HessianKind.FULL.value:
        # judged here, before the folder is loaded (it was refused only after loading the saved model)
        raise InvalidRequestError(
            "--solver kfac supports --hessian remaining only: for --hessian full use --solver cg (or auto, which "
            "picks it above exact_max_dim), or exact on a small model"
        )
    return out
