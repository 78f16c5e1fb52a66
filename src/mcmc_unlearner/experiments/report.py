"""Shared helpers for experiment outputs: run folders, ``metrics.json``, Markdown tables, figures, timers.

Generic on purpose: the GMM and BNN experiments both write a folder holding ``metrics.json`` (machine
readable), ``report.md`` (a person reads it in seconds) and PNG figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RUN_MARKER",
    "SEED_LIMIT",
    "Stopwatch",
    "cannot_create",
    "claimed_out_dir",
    "fmt",
    "jsonable",
    "make_folders",
    "markdown_table",
    "new_run_dir",
    "out_dir_problem",
    "out_folder_arg",
    "prepare_out_dir",
    "save_figure",
    "seed_arg",
    "summarize",
    "write_json",
    "write_text",
]

#: Present in an output folder while a run writes to it (created exclusively: two runs never share a folder).
RUN_MARKER = ".mcmc-unlearner-run"
#: Seeds are in ``[0, SEED_LIMIT)``: scikit-learn's ``random_state`` (the digits split) takes nothing else, and
#: ``1000 * seed + k`` (the chains' torch generators) then stays far inside torch's 64-bit range.
SEED_LIMIT = 2**32


def new_run_dir(prefix: str, root: str | Path = "runs") -> Path:
    """A fresh, not yet existing folder ``root/<prefix>-<YYYYmmdd-HHMMSS>[-k]`` (created)."""
    root = Path(root)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    k = 0
    while True:
        path = root / (f"{prefix}-{stamp}" + (f"-{k}" if k else ""))
        try:
            path.mkdir()  # atomic: a run started in the same second gets the next suffix
            return path
        except FileExistsError:
            k += 1


def out_dir_problem(out: str | Path) -> str | None:
    """Why ``out`` cannot take a new run's results (``None``: it can), without touching anything.

    Accepted: a path that does not exist yet under a writable folder, or an existing empty, writable folder.
    Refused: a file, a folder holding another run's results (or anything else: they would mix), a folder
    another run is writing to, a path that cannot be created. The message starts with the path.
    """
    if not str(out).strip():
        return "--out is empty: name a new folder for the run's results (e.g. --out runs/demo)"
    p = Path(out)
    fix = f"choose a new folder (or remove it first: rm -r {str(p)!a})"
    if os.path.lexists(p):
        if not p.is_dir():
            return f"{str(p)!a} exists and is not a folder; choose a new folder"
        names = sorted(e.name for e in os.scandir(p))
        if RUN_MARKER in names:
            return _marker_problem(p, fix)
        if "metrics.json" in names:
            return f"{str(p)!a} already holds a run's results (metrics.json); {fix}"
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            return f"{str(p)!a} is not empty (holds {shown}); {fix}"
        if not os.access(p, os.W_OK | os.X_OK):
            return f"{str(p)!a} is not writable; choose another folder"
        return None
    parent = p.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {str(p)!a}: {str(parent)!a} is not a writable folder"
    return None


def _pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` exists on this host (``None``: cannot tell)."""
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    except (OSError, OverflowError, ValueError):
        return None
    return True


def _marker_problem(p: Path, fix: str) -> str:
    """Why a folder holding :data:`RUN_MARKER` is refused: the run holding it is alive, or was killed there (its
    process is gone from this host: the folder holds a partial run), or, when the marker cannot be read or names
    another host, that one of those is the case."""
    try:
        fields = (p / RUN_MARKER).read_text(encoding="utf-8", errors="replace")[:300].split()
    except OSError:
        fields = []
    pid = int(fields[0]) if fields and fields[0].isascii() and fields[0].isdigit() and len(fields[0]) < 10 else None
    host = fields[1] if len(fields) > 1 else None
    here = socket.gethostname()
    alive = _pid_alive(pid) if pid is not None and (host is None or host == here) else None
    if alive is False:
        return (
            f"{str(p)!a} holds an unfinished run: the process that was writing to it ({pid}) is no longer running on "
            f"this host (killed or crashed), so its files are partial; remove the folder (rm -r {str(p)!a}) or "
            "choose a new folder"
        )
    if alive is True:
        return f"{str(p)!a} is in use: another run is writing to it (process {pid}); {fix}"
    where = f" (process {pid} on {host!a})" if pid is not None and host not in (None, here) else ""
    return f"{str(p)!a} is in use: another run is writing to it{where} (or one was killed there); {fix}"


def out_folder_arg(value: str) -> str:
    """``--out`` of the experiments, checked at parse time (before any work): see :func:`out_dir_problem`."""
    problem = out_dir_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def seed_arg(value: str) -> int:
    """``--seed`` value: a whole number in ``[0, 2**32)`` (every consumer of the seed takes that range)."""
    try:
        seed = int(value)
    except ValueError:
        seed = None
    if seed is None or not 0 <= seed < SEED_LIMIT:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 0 to {SEED_LIMIT - 1} (2**32 - 1), got {ascii(value)[:40]}"
        )
    return seed


def _claim(path: Path) -> None:
    """Create ``path/RUN_MARKER`` exclusively, then make sure nothing else is there (else undo and refuse)."""
    marker = path / RUN_MARKER
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise ValueError(f"--out {out_dir_problem(path) or f'{str(path)!a} is in use by another run'}") from None
    except OSError as exc:
        raise ValueError(
            f"--out cannot write into {str(path)!a}: {exc.strerror or exc}; choose another folder"
        ) from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")  # read by _marker_problem
    others = [e.name for e in os.scandir(path) if e.name != RUN_MARKER]
    if others:
        marker.unlink()
        raise ValueError(f"--out {out_dir_problem(path) or f'{str(path)!a} is not empty; choose a new folder'}")


def prepare_out_dir(out: str | Path | None, prefix: str, root: str | Path = "runs") -> Path:
    """Return the output folder, creating it; ``None`` gives a fresh one under ``root``.

    Raises:
        ValueError: if ``out`` is a file, already holds files (another run's results would mix with this
            one's), or cannot be created.
    """
    if out is None:
        try:
            return new_run_dir(prefix, root)
        except OSError as exc:
            raise ValueError(f"--out not given and {cannot_create(root, exc)}; pass --out DIR") from None
    problem = out_dir_problem(out)
    if problem is not None:
        raise ValueError(f"--out {problem}")
    path = Path(out)
    make_folders(path)
    return path


def cannot_create(path: str | Path, exc: OSError, what: str = "folder") -> str:
    """``cannot create folder '<path>': <the system's reason>`` for an ``OSError`` (one line, no errno)."""
    return f"cannot create {what} {str(path)!a}: {exc.strerror or type(exc).__name__}"


def make_folders(path: Path) -> None:
    """``path.mkdir(parents=True, exist_ok=True)``, undone on failure: the folders it created are removed again.

    Raises:
        ValueError: A folder cannot be created (``/proc/x``, a read-only file system): the message names
            ``path`` and the system's reason.
    """
    missing = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    made: list[Path] = []
    try:
        for p in reversed(missing):
            p.mkdir()
            made.append(p)
        if not path.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(path))
    except OSError as exc:
        for p in reversed(made):
            _remove_if_empty(p)
        raise ValueError(f"--out {cannot_create(path, exc)}; choose a folder you can write to") from None


@contextmanager
def claimed_out_dir(out: str | Path | None, prefix: str, root: str | Path = "runs") -> Iterator[Path]:
    """:func:`prepare_out_dir`, held for the block: a marker file keeps a second run out of the folder.

    On leaving the block the marker is removed; a folder this call created that is still empty (the run
    failed before writing anything) is removed too. A run writes ``metrics.json`` last, so a folder holding
    ``metrics.json`` is a finished run.
    """
    path = Path(out) if out is not None else None
    created = path is None or not os.path.lexists(path)
    path = prepare_out_dir(out, prefix, root)
    try:
        _claim(path)
    except BaseException:
        if created:
            _remove_if_empty(path)
        raise
    try:
        yield path
    finally:
        try:
            (path / RUN_MARKER).unlink()
        except FileNotFoundError:
            pass
        if created:
            _remove_if_empty(path)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:  # not empty (or gone): leave it
        pass


def jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays, paths and tuples to JSON types; NaN and ±inf become ``None``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy arrays/scalars, torch tensors
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    return str(obj)


@contextmanager
def _atomic(path: Path, mode: str = "w") -> Iterator[Any]:
    """An open temporary file in ``path``'s folder that replaces ``path`` (``os.replace``) when the block ends
    without an error; on an error (or Ctrl-C) the temporary file is removed and ``path`` is untouched."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (strict: no NaN tokens) atomically and return the path."""
    path = Path(path)
    text = json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"
    with _atomic(path) as f:
        f.write(text)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically (a temporary file in the same folder, then ``os.replace``); return the path."""
    path = Path(path)
    with _atomic(path) as f:
        f.write(text)
    return path


def fmt(value: Any, digits: int = 3) -> str:
    """Human formatting for tables: ``None``/NaN → ``—``, floats to ``digits`` significant figures."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return "—"
        if v != 0 and (abs(v) >= 10 ** (digits + 2) or abs(v) < 10 ** (-digits)):
            return f"{v:.{max(digits - 1, 1)}e}"
        return f"{v:.{digits}g}" if abs(v) < 10**digits else f"{v:.0f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table; cells are formatted with :func:`fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c, digits) for c in row) + " |")
    return "\n".join(lines)


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """Median, mean, min, max and total of a list of numbers (``None`` entries for an empty list)."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return {"median": None, "mean": None, "min": None, "max": None, "total": None}
    return {
        "median": float(np.median(arr)),
        "mean": float(arr.mean()),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "total": float(arr.sum()),
    }


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG.

    Build figures with ``matplotlib.figure.Figure`` (not ``pyplot``): no GUI backend and no global figure
    registry are involved, so this works headless and leaks nothing. Written atomically, like :func:`write_text`.
    """
    path = Path(path)
    with _atomic(path, "wb") as f:  # never a truncated PNG under the final name
        fig.savefig(f, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi, bbox_inches="tight")
    return path


class Stopwatch:
    """Named wall-clock timers: ``with sw("retrain"): ...`` then ``sw.seconds["retrain"]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
