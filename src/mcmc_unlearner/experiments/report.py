"""Shared helpers for experiment outputs: run folders, ``metrics.json``, Markdown tables, figures, timers.

Generic on purpose: the GMM and BNN experiments both write a folder holding ``metrics.json`` (machine
readable), ``report.md`` (a person reads it in seconds) and PNG figures.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Stopwatch",
    "fmt",
    "jsonable",
    "markdown_table",
    "new_run_dir",
    "prepare_out_dir",
    "save_figure",
    "summarize",
    "write_json",
    "write_text",
]


def new_run_dir(prefix: str, root: str | Path = "runs") -> Path:
    """A fresh, not yet existing folder ``root/<prefix>-<YYYYmmdd-HHMMSS>[-k]`` (created)."""
    root = Path(root)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = root / f"{prefix}-{stamp}"
    k = 1
    while path.exists():
        path = root / f"{prefix}-{stamp}-{k}"
        k += 1
    path.mkdir(parents=True)
    return path


def prepare_out_dir(out: str | Path | None, prefix: str, root: str | Path = "runs") -> Path:
    """Return the output folder, creating it; ``None`` gives a fresh one under ``root``.

    Raises:
        ValueError: if ``out`` exists and is not a folder.
    """
    if out is None:
        return new_run_dir(prefix, root)
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output path {str(path)!r} exists and is not a folder; pass a folder path to --out")
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (strict: no NaN tokens) and return the path."""
    path = Path(path)
    path.write_text(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text and return the path."""
    path = Path(path)
    path.write_text(text, encoding="utf-8")
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
    registry are involved, so this works headless and leaks nothing.
    """
    path = Path(path)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
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
