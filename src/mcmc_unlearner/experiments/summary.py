"""``mcmc-unlearner summary RUN_DIR [RUN_DIR ...]``: aggregate the ``metrics.json`` of several runs (e.g. seeds).

Generic: every numeric leaf of the (nested) ``metrics.json`` dicts is aggregated under its dotted path (``a.b.c``
for ``{"a": {"b": {"c": 1.0}}}``), whichever of this tool's experiments wrote it. Per leaf: mean, sample standard
deviation (``ddof = 1``; ``None`` for a single run), min, max and ``n`` (the runs that have a finite value there). A run
whose value there is NaN or ±inf (or ``null``, the spelling of NaN in files this package writes) is not averaged
but counted (``nan``; the table's ``n`` column reads ``1 (+1 NaN)``), and a leaf that is finite in some runs and
not in others is listed under the runs that differ, as a differing string is.
Booleans count as 0/1 (``mean`` is then the fraction of runs where it is true, and ``true`` the count); lists
and strings are not aggregated (per-request lists have their own summaries in the files), but string leaves
whose value differs between runs (e.g. runs with different samplers) are reported, since averaging such runs is
rarely intended.

Refused (exit 2, one line): a file that is not the ``metrics.json`` of one of this tool's runs (``demo`` or
``bnn``: :func:`check_run`), the same run given twice, runs of different experiments (a ``bnn`` run with a
``demo`` run), runs on different data sets (``dataset.name``, e.g. digits with fashion-mnist) unless
``--mixed-datasets`` is given (averaging them was only noted under "Runs differ in"), ``--keys`` that match no
metric, an ``--out`` that cannot be written (checked before anything is
printed), and runs whose settings differ (the sections :data:`_SETTINGS` names: ``demo``'s sampler, sizes, chain,
unlearner and ``comparison_config``, its ``--retrain-chains`` and ``--with-paper``; ``bnn``'s ``config``) unless
``--mixed-settings`` is given. A ``demo`` run written before ``comparison_config`` was recorded (stop 57; e.g.
``docs/runs/gmm-stop47-*``) has those settings unknown: they are compared among the runs that record them, with a
warning naming the others. Runs that share a seed are summarised with a warning on stderr (the same draw twice,
unless their settings differ).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .report import RUN_MARKER, fmt, markdown_table, write_json, write_text

__all__ = [
    "RUN_KINDS",
    "check_run",
    "experiment_kind",
    "load_metrics",
    "numeric_leaves",
    "register",
    "run_dataset",
    "run_seed",
    "summarize_runs",
    "summary_table",
]


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
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(file)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except (RecursionError, ValueError) as exc:  # nesting too deep; an integer of more than 4300 digits
        raise ValueError(f"{str(file)!r} cannot be read as metrics ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{str(file)!r} holds a JSON {type(data).__name__}, expected an object of metrics")
    return file, data


def experiment_kind(metrics: dict[str, Any]) -> str | None:
    """The experiment that wrote ``metrics`` (``"gmm"`` for demo, ``"bnn"``), ``None`` when unknown.

    Older ``bnn`` runs carry no ``experiment`` key; their ``config`` and ``dataset`` sections identify them.
    """
    kind = metrics.get("experiment")
    if isinstance(kind, str) and kind:
        return kind
    if isinstance(metrics.get("config"), dict) and isinstance(metrics.get("dataset"), dict):
        return "bnn"
    return None


#: The experiments whose ``metrics.json`` summary reads: ``experiment`` key → the command that writes it.
RUN_KINDS = {"gmm": "demo", "bnn": "bnn"}


def check_run(file: Path, metrics: dict[str, Any]) -> str:
    """The kind of run (a key of :data:`RUN_KINDS`) that wrote ``metrics``, read from ``file``.

    Runs mark themselves with ``experiment`` (older ``bnn`` runs with their ``config`` and ``dataset`` sections:
    :func:`experiment_kind`).

    Raises:
        ValueError: ``metrics`` is not the output of one of this tool's runs (the message names ``file``).
    """
    kind = experiment_kind(metrics)
    if kind in RUN_KINDS:
        return kind
    known = ", ".join(f"{k!a} (mcmc-unlearner {cmd})" for k, cmd in RUN_KINDS.items())
    given = metrics.get("experiment") if isinstance(metrics, dict) else None
    what = (
        f'its "experiment" is {ascii(kind if kind is not None else given)[:40]}, not one of {known}'
        if kind is not None or given is not None
        else f'it has no "experiment" key naming one of {known}'
    )
    raise ValueError(
        f"{str(file)!a} is not the metrics of an mcmc-unlearner run ({what}); pass the folders that "
        "`mcmc-unlearner demo` or `mcmc-unlearner bnn` wrote"
    )


def run_dataset(metrics: dict[str, Any]) -> str | None:
    """The data set the run used (``dataset.name``, or ``config.dataset``), ``None`` when it names none."""
    data = metrics.get("dataset")
    name = data.get("name") if isinstance(data, dict) else data
    if not isinstance(name, str) and isinstance(metrics.get("config"), dict):
        name = metrics["config"].get("dataset")
    return name if isinstance(name, str) and name else None


def run_seed(metrics: dict[str, Any]) -> int | None:
    """The run's seed (``seed`` at the top, or ``config.seed``), ``None`` when it has none."""
    seed = metrics.get("seed")
    if seed is None and isinstance(metrics.get("config"), dict):
        seed = metrics["config"].get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def numeric_leaves(obj: Any, prefix: str = "") -> dict[str, float | bool]:
    """Dotted path → value for every int, float or bool leaf reachable through nested dicts (lists skipped)."""
    out: dict[str, float | bool] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(numeric_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, bool):
        out[prefix] = obj
    elif isinstance(obj, (int, float)) and _finite(obj):
        out[prefix] = float(obj)
    return out


def _finite(x: int | float) -> bool:
    """Whether ``x`` is a finite number that a float holds (an integer beyond float range is not)."""
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _nonfinite_leaves(obj: Any, prefix: str = "") -> dict[str, str]:
    """Dotted path → ``"nan"``, ``"inf"``, ``"-inf"`` or ``"null"`` for every leaf that holds no finite number."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(_nonfinite_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    elif obj is None:
        out[prefix] = "null"
    elif isinstance(obj, float) and not math.isfinite(obj):
        out[prefix] = str(obj)
    elif isinstance(obj, int) and not isinstance(obj, bool) and not _finite(obj):
        out[prefix] = "inf" if obj > 0 else "-inf"  # beyond float range
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
        ``{"n_runs", "stats": {path: {"mean", "sd", "min", "max", "n"[, "true"][, "nan"]}}, "differing": {path:
        [values]}}`` with ``stats`` in first-seen order. ``nan``: the runs whose value there is NaN, ±inf or
        ``null`` (not averaged; a leaf with no finite value has ``n`` 0 and ``None`` statistics). A leaf finite in
        some runs and not in others is also in ``differing`` (per run: the number, ``"nan"``, ``"inf"``,
        ``"null"``, or ``None`` where the run lacks it).
    """
    if not runs:
        raise ValueError("no runs to summarise; pass at least one run folder")
    patterns = list(keys) if keys is not None else None
    leaves = [numeric_leaves(r) for r in runs]
    bad = [_nonfinite_leaves(r) for r in runs]
    order: dict[str, None] = {}
    for lv, bd in zip(leaves, bad):
        order.update(dict.fromkeys(p for p in (*lv, *bd) if p in lv or bd[p] != "null"))
    stats: dict[str, dict[str, Any]] = {}
    differing: dict[str, list[Any]] = {}
    for path in order:
        if patterns is not None and not any(fnmatch.fnmatchcase(path, p) for p in patterns):
            continue
        values = [lv[path] for lv in leaves if path in lv]
        arr = np.asarray([float(v) for v in values], dtype=np.float64)
        entry: dict[str, Any] = {
            "mean": float(arr.mean()) if arr.size else None,
            "sd": float(arr.std(ddof=1)) if arr.size > 1 else None,
            "min": float(arr.min()) if arr.size else None,
            "max": float(arr.max()) if arr.size else None,
            "n": int(arr.size),
        }
        if values and all(isinstance(v, bool) for v in values):
            entry["true"] = int(sum(values))
        nan = sum(path in bd for bd in bad)
        if nan:
            entry["nan"] = nan
            if values:  # finite in some runs, not in others: the runs differ there
                differing[path] = [lv[path] if path in lv else bd.get(path) for lv, bd in zip(leaves, bad)]
        stats[path] = entry
    strings = [_string_leaves(r) for r in runs]
    for path in dict.fromkeys(p for s in strings for p in s):
        vals = [s.get(path) for s in strings]
        if len(set(vals)) > 1 and not path.endswith(("out_dir", "description")):
            differing[path] = vals
    return {"n_runs": len(runs), "stats": stats, "differing": differing}


def summary_table(summary: dict[str, Any], digits: int = 3) -> str:
    """Markdown table ``leaf | mean ± sd | min–max | n`` (booleans as ``k/n true``; runs with a NaN there as
    ``n (+k NaN)``)."""
    rows = []
    for path, s in summary["stats"].items():
        n = f"{s['n']} (+{s['nan']} NaN)" if s.get("nan") else s["n"]
        if "true" in s:
            rows.append([path, f"{s['true']}/{s['n']} true", "", n])
            continue
        if s["mean"] is None:
            rows.append([path, "NaN", "", n])
            continue
        mean = fmt(s["mean"], digits) + ("" if s["sd"] is None else f" ± {fmt(s['sd'], digits)}")
        rows.append([path, mean, f"{fmt(s['min'], digits)}–{fmt(s['max'], digits)}", n])
    return markdown_table(["metric", "mean ± sd", "min–max", "n"], rows)


def _shown(values: list[Any], width: int = 60) -> str:
    """Differing string values, each cut to ``width`` characters (a description can run to thousands)."""
    cut = [v if not isinstance(v, str) or len(v) <= width else v[: width - 1] + "…" for v in values]
    return str(cut)


def _split_runs_and_keys(runs: list[str], keys: list[str] | None) -> tuple[list[str], list[str] | None]:
    """``--keys`` takes several values, so it swallows run folders given after it (``--keys K RUN_DIR``):
    a ``--keys`` value naming an existing file or folder is a run (metric paths are dotted names, not files).
    A value may also hold several patterns separated by commas."""
    runs, patterns = list(runs), []
    for value in keys or []:
        if os.path.exists(value):
            runs.append(value)
        else:
            patterns += [k.strip() for k in value.split(",") if k.strip()]
    if not runs:
        took = f" (--keys took {', '.join(map(ascii, keys))})" if keys else ""
        raise ValueError(
            f"no run folders given{took}; pass RUN_DIR ... (folders holding metrics.json), e.g. mcmc-unlearner "
            "summary RUN_DIR RUN_DIR --keys GLOB"
        )
    if keys is None:
        return runs, None
    if not patterns:
        raise ValueError("--keys needs at least one pattern, e.g. --keys 'methods.*.seconds'")
    return runs, patterns


def _check_runs(loaded: list[tuple[Path, dict[str, Any]]], given: list[str], mixed_datasets: bool = False) -> None:
    """Refuse a run given twice, runs of different experiments and (unless ``mixed_datasets``) runs on different
    data sets; warn about runs sharing a seed."""
    seen: dict[Path, str] = {}
    for (file, _), arg in zip(loaded, given):
        real = file.resolve()
        if real in seen:
            raise ValueError(f"{arg!a} is the same run as {seen[real]!a} ({str(file)!a}); give each run once")
        seen[real] = arg
    kinds: dict[str, str] = {}
    for (_, m), arg in zip(loaded, given):
        kind = experiment_kind(m)
        if kind is not None:
            kinds.setdefault(kind, arg)
    if len(kinds) > 1:
        which = ", ".join(f"{arg!a} is a {kind} run" for kind, arg in kinds.items())
        raise ValueError(f"runs of different experiments cannot be summarised together ({which}); pass runs of one")
    datasets: dict[str, list[str]] = {}
    for (_, m), arg in zip(loaded, given):
        name = run_dataset(m)
        if name is not None:
            datasets.setdefault(name, []).append(arg)
    if len(datasets) > 1 and not mixed_datasets:
        # their mean and sd mix two populations (was: averaged, with only a "Runs differ in" note)
        which = "; ".join(f"{name}: {', '.join(map(ascii, args))}" for name, args in datasets.items())
        raise ValueError(
            f"the runs use different data sets ({which}); summarise each data set's runs separately, or pass "
            "--mixed-datasets to average them together"
        )
    by_seed: dict[int, list[str]] = {}
    for (_, m), arg in zip(loaded, given):
        seed = run_seed(m)
        if seed is not None:
            by_seed.setdefault(seed, []).append(arg)
    shared = {seed: args for seed, args in by_seed.items() if len(args) > 1}
    if shared:
        which = "; ".join(f"seed {seed}: {', '.join(map(ascii, args))}" for seed, args in shared.items())
        print(
            f"mcmc-unlearner summary: warning: runs share a seed ({which}): the same draw counted more than once "
            "unless their settings differ; the sd assumes independent runs",
            file=sys.stderr,
        )


#: Where each experiment's metrics.json records its settings; every leaf there must agree across the runs (but the
#: seed, what only says where or how it ran, and the data set, which _check_runs judges with --mixed-datasets).
_SETTINGS = {
    "bnn": ("config",),
    "gmm": (
        "sampler", "request_size", "thin", "n_train", "n_removed", "chain_config", "unlearn_config",
        "comparison_config",
    ),
}  # fmt: skip
#: Sections a run of an older version does not record, with the options they hold: there they are unknown, neither
#: compared nor refused (stored runs such as docs/runs/gmm-stop47-* lack comparison_config), and summary says so.
_LATER_SETTINGS = {"comparison_config": "--retrain-chains, --with-paper"}
_RUN_ONLY = {
    "seed", "threads", "progress", "data_dir", "download", "save_model", "device", "out", "out_dir", "quiet", "dataset",
}  # fmt: skip


def _settings(metrics: dict[str, Any], kind: str | None) -> dict[str, str]:
    """The run's settings as ``{dotted path: JSON of the value}`` (empty for an experiment without a list)."""
    out: dict[str, str] = {}

    def walk(obj: Any, prefix: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k not in _RUN_ONLY:
                    walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = json.dumps(obj, sort_keys=True)

    for section in _SETTINGS.get(kind or "", ()):
        if section in metrics and section not in _RUN_ONLY:
            walk(metrics[section], section)
    return out


def _check_settings(loaded: list[tuple[Path, dict[str, Any]]], given: list[str]) -> None:
    """Refuse runs whose settings differ (their mean and sd would mix two experiments: a --quick run was averaged
    with a full one, newton_steps 1 with 2, another class with the first; stop 47's probe)."""
    settings = [_settings(m, experiment_kind(m)) for _, m in loaded]
    paths = dict.fromkeys(p for s in settings for p in s)
    values = {p: [(arg, s.get(p, "absent")) for arg, s in zip(given, settings)] for p in paths}
    kinds = {experiment_kind(m) for _, m in loaded}
    for section, options in _LATER_SETTINGS.items():
        if not any(section in _SETTINGS.get(kind or "", ()) for kind in kinds):
            continue
        unknown = [arg for (_, m), arg in zip(loaded, given) if section not in m]
        if unknown and len(loaded) > 1:  # one run is compared with nothing
            print(
                f"mcmc-unlearner summary: warning: {', '.join(map(ascii, unknown))} record(s) no {section} (written "
                f"by an older version): their {options} are unknown and not compared",
                file=sys.stderr,
            )
        for p in values:  # compared among the runs that record them
            if p == section or p.startswith(section + "."):
                values[p] = [(arg, v) for arg, v in values[p] if arg not in unknown]
    differ = {p: pairs for p, pairs in values.items() if len({v for _, v in pairs}) > 1}
    if differ:
        shown = "; ".join(f"{p}: {', '.join(f'{a!a}={v}' for a, v in pairs)}" for p, pairs in differ.items())
        raise ValueError(
            f"the runs' settings differ in {len(differ)} place(s) ({shown[:600]}): summarise runs of one setting "
            "(seeds of one command), or pass --mixed-settings to average them together"
        )


def _unmatched(patterns: list[str], stats: dict[str, Any]) -> list[str]:
    return [p for p in patterns if not any(fnmatch.fnmatchcase(k, p) for k in stats)]


def _cmd_summary(args: argparse.Namespace) -> int:
    runs, keys = _split_runs_and_keys(args.runs, args.keys)
    loaded = [load_metrics(p) for p in runs]
    for file, metrics in loaded:  # a JSON object that no run of this tool wrote is not averaged in
        check_run(file, metrics)
    _check_runs(loaded, runs, mixed_datasets=args.mixed_datasets)
    if not args.mixed_settings:
        _check_settings(loaded, runs)
    if args.out is not None:
        dest = Path(args.out).resolve()
        if any(dest == f.resolve() for f, _ in loaded):
            raise ValueError(f"--out {args.out!a} is one of the runs' metrics files; pass a new file name")
        # a run's own folder (its report.md, or another run's metrics.json) was overwritten (stop 47's probe)
        if (dest.parent / "metrics.json").exists() or (dest.parent / RUN_MARKER).exists():
            raise ValueError(
                f"--out {args.out!a} is inside a run's folder ({str(dest.parent)!a} holds a run's results): write the "
                "summary outside every run folder"
            )
    metrics = [m for _, m in loaded]
    summary = summarize_runs(metrics, keys=keys)
    if keys is not None:
        missing = _unmatched(keys, summary["stats"])
        if not summary["stats"]:
            available = list(summarize_runs(metrics)["stats"])
            tops = list(dict.fromkeys(k.split(".")[0] + (".*" if "." in k else "") for k in available))
            raise ValueError(
                f"--keys {' '.join(map(ascii, keys))} match no metric of these runs; available: "
                f"{', '.join(tops[:12])}{', ...' if len(tops) > 12 else ''} ({len(available)} metrics, e.g. "
                f"{', '.join(available[:3])})"
            )
        if missing:
            print(
                f"mcmc-unlearner summary: warning: --keys {' '.join(map(ascii, missing))} matched no metric",
                file=sys.stderr,
            )
    summary["runs"] = [str(f) for f, _ in loaded]
    text = summary_table(summary)
    lines = [f"{summary['n_runs']} runs: " + ", ".join(summary["runs"]), "", text]
    if summary["differing"]:
        lines += ["", "Runs differ in: " + "; ".join(f"{k} = {_shown(v)}" for k, v in summary["differing"].items())]
    out = "\n".join(lines) + "\n"
    if args.out is not None:  # written first (atomically): a failure prints nothing
        dest = Path(args.out)
        try:
            if dest.suffix.lower() == ".json":
                write_json(dest, summary)
            else:
                write_text(dest, out)
        except OSError as exc:  # /proc/x.json passes the parse-time check; the write's own temporary file is gone
            raise ValueError(
                f"--out cannot write {args.out!a}: {exc.strerror or type(exc).__name__}; choose a file in a folder "
                "you can write to"
            ) from None
    print(out, end="")
    return 0


def _out_file(value: str) -> str:
    """``--out`` of summary, checked at parse time: a file name in an existing, writable folder."""
    dest = Path(value)
    if dest.is_dir():
        raise argparse.ArgumentTypeError(f"{value!a} is a folder; pass a file name (.json for JSON, else Markdown)")
    parent = dest.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {value!a}: folder {str(parent)!a} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (dest.exists() and not os.access(dest, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {value!a}: not writable")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``summary`` subcommand."""
    from ..cli import COMMAND_HELP

    p = subparsers.add_parser(
        "summary",
        help=COMMAND_HELP["summary"],
        usage="%(prog)s RUN_DIR [RUN_DIR ...] [--keys GLOB [GLOB ...]] [--out FILE] [--mixed-datasets] "
        "[--mixed-settings]",
        description=(
            "Read RUN_DIR/metrics.json of every run and print, for every numeric leaf of the nested metrics, the "
            "mean ± sample sd, min–max and the number of runs. Works on the output of demo and bnn (a JSON file "
            "no run of this tool wrote is refused), one "
            "experiment and one data set at a time (runs on different data sets are refused unless "
            "--mixed-datasets is given); each run counts once, and runs that share a seed are flagged."
        ),
    )
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run folders (or metrics.json files)")
    p.add_argument(
        "--out", type=_out_file, default=None, metavar="FILE",
        help="also write the summary (.json: JSON, else Markdown); checked before anything is read",
    )  # fmt: skip
    p.add_argument(
        "--keys", nargs="+", default=None, metavar="GLOB",
        help="only metrics whose dotted path matches one of these patterns (several per value with commas), "
        "e.g. 'methods.*.vs_exact.*'; put it after the run folders",
    )  # fmt: skip
    p.add_argument(
        "--mixed-datasets", action="store_true",
        help="average runs on different data sets together (refused without it: their mean mixes two populations)",
    )  # fmt: skip
    p.add_argument(
        "--mixed-settings", action="store_true",
        help="average runs whose settings differ (refused without it: e.g. a --quick run beside a full one)",
    )  # fmt: skip
    p.set_defaults(func=_cmd_summary)
