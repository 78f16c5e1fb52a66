"""``mcmc-unlearner summary RUN_DIR [RUN_DIR ...]``: aggregate the ``metrics.json`` of several runs (e.g. seeds).

Generic: every numeric leaf of the (nested) ``metrics.json`` dicts is aggregated under its dotted path (``a.b.c``
for ``{"a": {"b": {"c": 1.0}}}``), whatever experiment wrote it. Per leaf: mean, sample standard deviation
(``ddof = 1``; ``None`` for a single run), min, max and ``n`` (the runs that have a finite value there).
Booleans count as 0/1 (``mean`` is then the fraction of runs where it is true, and ``true`` the count); lists
and strings are not aggregated (per-request lists have their own summaries in the files), but string leaves
whose value differs between runs (e.g. runs with different samplers) are reported, since averaging such runs is
rarely intended.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .report import fmt, markdown_table, write_json, write_text

__all__ = ["load_metrics", "numeric_leaves", "register", "summarize_runs", "summary_table"]


def load_metrics(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Read ``path/metrics.json`` (or ``path`` itself when it is a file) as a dict.

    Raises:
        FileNotFoundError: neither exists (the message names the paths tried).
        ValueError: the file is not a JSON object.
    """
    p = Path(path)
    file = p / "metrics.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(
            f"no metrics file at {str(file)!r}; pass a run folder holding metrics.json (or the file itself)"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(file)!r} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{str(file)!r} holds a JSON {type(data).__name__}, expected an object of metrics")
    return file, data


def numeric_leaves(obj: Any, prefix: str = "") -> dict[str, float | bool]:
    """Dotted path → value for every int, float or bool leaf reachable through nested dicts (lists skipped)."""
    out: dict[str, float | bool] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(numeric_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, bool):
        out[prefix] = obj
    elif isinstance(obj, (int, float)) and math.isfinite(float(obj)):
        out[prefix] = float(obj)
    return out


def _string_leaves(obj: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(_string_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, str):
        out[prefix] = obj
    return out


def summarize_runs(runs: Sequence[dict[str, Any]], keys: Iterable[str] | None = None) -> dict[str, Any]:
    """Aggregate numeric leaves over runs.

    Args:
        runs: Parsed ``metrics.json`` dicts.
        keys: Optional glob patterns (``fnmatch``, e.g. ``"methods.*.vs_exact.*"``); only matching leaves are kept.

    Returns:
        ``{"n_runs", "stats": {path: {"mean", "sd", "min", "max", "n"[, "true"]}}, "differing": {path: [values]}}``
        with ``stats`` in first-seen order.
    """
    if not runs:
        raise ValueError("no runs to summarise; pass at least one run folder")
    patterns = list(keys) if keys is not None else None
    leaves = [numeric_leaves(r) for r in runs]
    order: dict[str, None] = {}
    for lv in leaves:
        order.update(dict.fromkeys(lv))
    stats: dict[str, dict[str, Any]] = {}
    for path in order:
        if patterns is not None and not any(fnmatch.fnmatchcase(path, p) for p in patterns):
            continue
        values = [lv[path] for lv in leaves if path in lv]
        arr = np.asarray([float(v) for v in values], dtype=np.float64)
        entry: dict[str, Any] = {
            "mean": float(arr.mean()),
            "sd": float(arr.std(ddof=1)) if arr.size > 1 else None,
            "min": float(arr.min()),
            "max": float(arr.max()),
            "n": int(arr.size),
        }
        if all(isinstance(v, bool) for v in values):
            entry["true"] = int(sum(values))
        stats[path] = entry
    strings = [_string_leaves(r) for r in runs]
    differing: dict[str, list[str | None]] = {}
    for path in dict.fromkeys(p for s in strings for p in s):
        vals = [s.get(path) for s in strings]
        if len(set(vals)) > 1 and not path.endswith(("out_dir", "description")):
            differing[path] = vals
    return {"n_runs": len(runs), "stats": stats, "differing": differing}


def summary_table(summary: dict[str, Any], digits: int = 3) -> str:
    """Markdown table ``leaf | mean ± sd | min–max | n`` (booleans as ``k/n true``)."""
    rows = []
    for path, s in summary["stats"].items():
        if "true" in s:
            rows.append([path, f"{s['true']}/{s['n']} true", "", s["n"]])
            continue
        mean = fmt(s["mean"], digits) + ("" if s["sd"] is None else f" ± {fmt(s['sd'], digits)}")
        rows.append([path, mean, f"{fmt(s['min'], digits)}–{fmt(s['max'], digits)}", s["n"]])
    return markdown_table(["metric", "mean ± sd", "min–max", "n"], rows)


def _cmd_summary(args: argparse.Namespace) -> int:
    loaded = [load_metrics(p) for p in args.runs]
    summary = summarize_runs([m for _, m in loaded], keys=args.keys)
    summary["runs"] = [str(f) for f, _ in loaded]
    text = summary_table(summary)
    lines = [f"{summary['n_runs']} runs: " + ", ".join(summary["runs"]), "", text]
    if summary["differing"]:
        lines += ["", "Runs differ in: " + "; ".join(f"{k} = {v}" for k, v in summary["differing"].items())]
    out = "\n".join(lines) + "\n"
    print(out, end="")
    if args.out is not None:
        dest = Path(args.out)
        if dest.is_dir():
            raise ValueError(f"--out {str(dest)!r} is a folder; pass a file name (.json for JSON, else Markdown)")
        if dest.suffix.lower() == ".json":
            write_json(dest, summary)
        else:
            write_text(dest, out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``summary`` subcommand."""
    p = subparsers.add_parser(
        "summary",
        help="aggregate metrics.json over several runs (e.g. seeds): mean ± sd, min–max and n per metric",
        description=(
            "Read RUN_DIR/metrics.json of every run and print, for every numeric leaf of the nested metrics, the "
            "mean ± sample sd, min–max and the number of runs. Works on the output of any experiment."
        ),
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (or metrics.json files)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the summary (.json: JSON, else Markdown)")
    p.add_argument(
        "--keys", nargs="+", default=None, metavar="GLOB",
        help="only metrics whose dotted path matches one of these patterns, e.g. 'methods.*.vs_exact.*'",
    )  # fmt: skip
    p.set_defaults(func=_cmd_summary)
