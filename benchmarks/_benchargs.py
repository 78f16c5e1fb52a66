"""Argument checks shared by the benchmark scripts: bad input is refused while the arguments are parsed.

Each function is an ``argparse`` ``type=``: it raises :class:`argparse.ArgumentTypeError`, so argparse prints the
usage and one ``error: argument --flag: ...`` line and exits 2, before any training. The list and JSON checks
return the text unchanged (the scripts parse it as before); :func:`output_file` returns a :class:`~pathlib.Path`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


positive_int = int_at_least(1)


def int_list(low: int | None = None) -> Callable[[str], str]:
    """Comma-separated integers (at least one, each ``>= low``); the text is returned unchanged."""
    what = "comma-separated integers" + (f" >= {low}" if low is not None else "")

    def parse(text: str) -> str:
        try:
            values = [int(s) for s in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        bad = [v for v in values if low is not None and v < low]
        if bad:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return text

    parse.__name__ = "int_list"
    return parse


def name_list(choices: Iterable[str]) -> Callable[[str], str]:
    """A comma-separated subset of ``choices`` (at least one name); the text is returned unchanged."""
    allowed = list(choices)

    def parse(text: str) -> str:
        unknown = [s for s in text.split(",") if s not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown name(s) {', '.join(map(repr, unknown))}; choose a comma-separated subset of "
                f"{','.join(allowed)}"
            )
        return text

    parse.__name__ = "name_list"
    return parse


def one_of(choices: Iterable[str]) -> Callable[[str], str]:
    """One of ``choices`` (like ``choices=``, with the allowed names in the one-line message)."""
    allowed = list(choices)

    def parse(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"unknown name {text!r}; choose one of {','.join(allowed)}")
        return text

    parse.__name__ = "one_of"
    return parse


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f'expected a JSON object such as \'{{"solver": "exact"}}\' ({exc})') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object (a dict), got a JSON {type(value).__name__}")
    return value


def json_object_text(text: str) -> str:
    """A JSON object (dict); the text is returned unchanged."""
    _json_object(text)
    return text


def json_object(text: str) -> dict[str, Any]:
    """A JSON object (dict), parsed."""
    return _json_object(text)


def output_file(text: str) -> Path:
    """A file the results can be written to, checked before any work: its folder is created when missing; a
    folder that cannot be created or written to, or a path that is a folder, is refused."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; expected a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with open(path, "a"):  # writable, contents untouched
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
                pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {exc.strerror or exc}") from None
    return path


def existing_dir(text: str) -> Path:
    """An existing folder."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing folder")
    return path


def add_request_sequence_args(ap: argparse.ArgumentParser, models: Iterable[str], requests: int) -> None:
    """The options of a script timing a model-matrix request sequence (``check_linear.py``, ``request_ab.py``):
    ``--model --requests --from --rows --seed --threads --chain-cache``; check them with :func:`check_from`."""
    ap.add_argument("--model", type=one_of(models), default="resnet", help="a model_matrix.py model name")
    ap.add_argument("--requests", type=int_at_least(2), default=requests)
    ap.add_argument("--from", dest="start", type=int_at_least(0), default=2, help="first request summed")
    ap.add_argument("--rows", type=int_at_least(1), default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int_at_least(1), default=1)
    ap.add_argument("--chain-cache", type=Path, default=None, help="model_matrix.py's chain cache folder")


def check_from(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a ``--from`` that leaves no request of ``--requests`` to sum (argparse's error, exit 2)."""
    if args.start >= args.requests:
        ap.error(f"--from {args.start} leaves no request of {args.requests} to sum")
