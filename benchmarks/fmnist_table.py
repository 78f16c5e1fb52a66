"""The README's Fashion-MNIST table from several ``mcmc-unlearner bnn --preset paper-fmnist`` runs (one per seed).

Usage::

    python benchmarks/fmnist_table.py runs/fmnist-s0 runs/fmnist-s1 runs/fmnist-s2 [--markdown]

Per method, mean ± sd over the seeds (min–max for the distances): error on the removed points and on kept-class
test points (%), their distance to the retrain chains (points), the mean per-example L1 distance between
predictive distributions on kept-class test points as a multiple of the retrain-pair floor, the
likelihood-ratio attack's AUC on the removed points, CPU seconds (all requests; training for the retrains) and
refused requests; then issue 12's targets per seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

METHODS = ("origin", "retrain", "unlearn", "paper", "finetune", "langevin", "importance")


def _ms(values: list[float], fmt: str = "{:.1f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


class RunError(Exception):
    """A run folder this script cannot read (the message names the file)."""


def load_run(folder: Path) -> dict[str, Any]:
    """``folder/metrics.json`` of a finished ``mcmc-unlearner bnn`` run (or the file itself).

    Raises:
        RunError: no such file, not valid JSON (a truncated file), or not a ``bnn`` run's metrics.
    """
    if not folder.exists():
        raise RunError(f"{str(folder)!a} does not exist; pass folders written by mcmc-unlearner bnn --out")
    file = folder / "metrics.json" if folder.is_dir() else folder
    if not file.is_file():
        raise RunError(f"no metrics file at {str(file)!a} (an unfinished run?); pass finished mcmc-unlearner bnn runs")
    try:
        run = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{str(file)!a} is not valid JSON ({exc}); a truncated file? rerun that seed") from None
    except OSError as exc:
        raise RunError(f"cannot read {str(file)!a}: {exc.strerror}") from None
    if not isinstance(run, dict):
        raise RunError(f"{str(file)!a} holds a JSON {type(run).__name__}, not a run's metrics")
    lacking = [
        k for k, kind in (("config", dict), ("methods", dict), ("floor", dict)) if not isinstance(run.get(k), kind)
    ]
    if lacking:
        what = f"a {run['experiment']} run" if isinstance(run.get("experiment"), str) else "not a bnn run"
        raise RunError(f"{str(file)!a} is {what} (no {', '.join(lacking)}); pass folders written by mcmc-unlearner bnn")
    return run


def duplicate_seeds(runs: list[dict[str, Any]], folders: list[Path]) -> dict[Any, list[str]]:
    """Seed -> the folders sharing it, for every seed given more than once."""
    by_seed: dict[Any, list[str]] = {}
    for r, folder in zip(runs, folders):
        by_seed.setdefault(r["config"].get("seed"), []).append(str(folder))
    return {seed: names for seed, names in by_seed.items() if len(names) > 1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args(argv)
    try:
        runs = [load_run(p) for p in args.runs]
    except RunError as exc:
        print(f"{ap.prog}: error: {exc}", file=sys.stderr)
        return 2
    for seed, names in duplicate_seeds(runs, args.runs).items():
        print(
            f"{ap.prog}: warning: seed {seed} given {len(names)} times ({', '.join(map(ascii, names))}): the mean ± sd "
            "counts the same draw more than once",
            file=sys.stderr,
        )
    print(f"{len(runs)} seed(s): {[r['config'].get('seed') for r in runs]}")
    head = (
        "| method | removed err % | test-kept err % | \\|Δ\\| removed (pts) | \\|Δ\\| test-kept (pts) "
        "| L1 test-kept × floor | LR-attack AUC | CPU s | refused |"
    )
    print(head)
    print("|" + "---|" * 9)
    for m in METHODS:
        pairs = [(x, r) for r in runs if isinstance(x := r["methods"].get(m), dict) and x.get("status") != "failed"]
        pairs = [(x, r) for x, r in pairs if x.get("error") and x["error"].get("removed") is not None]
        rows = [x for x, _ in pairs]
        if not rows:
            continue
        ratio = [
            x["pred_diff"]["test_kept"] / r["floor"]["pred_diff"]["test_kept"]
            for x, r in pairs
            if (x.get("pred_diff") or {}).get("test_kept") is not None
        ]
        cpu = [x["cpu_seconds"] for x in rows if x.get("cpu_seconds") is not None]
        cells = [
            _ms([100 * x["error"]["removed"] for x in rows]),
            _ms([100 * x["error"]["test_kept"] for x in rows]),
            _ms([100 * x["error_gap"]["removed"] for x in rows if x.get("error_gap")]),
            _ms([100 * x["error_gap"]["test_kept"] for x in rows if x.get("error_gap")]),
            _ms(ratio, "{:.2f}") + (f" ({min(ratio):.2f}–{max(ratio):.2f})" if len(ratio) > 1 else ""),
            _ms([x["mia"]["auc_removed"] for x in rows if x.get("mia")], "{:.3f}"),
            _ms(cpu, "{:.0f}" if max(cpu, default=0) >= 10 else "{:.2f}"),  # digits runs take well under 10 s
            _ms([x.get("refused") for x in rows if x.get("refused") is not None], "{:.0f}"),
        ]
        print(f"| {m} ({len(rows)} seed{'s' if len(rows) != 1 else ''}) | " + " | ".join(cells) + " |")
    floor = [r["floor"]["pred_diff"]["test_kept"] for r in runs]
    print(f"\nretrain-pair floor, L1 test-kept: {_ms(floor, '{:.4f}')}")
    print("\nissue 12's targets for unlearn, per seed:")
    for r in runs:
        failed = [k for k, v in r["methods"].items() if isinstance(v, dict) and v.get("status") == "failed"]
        if failed:
            print(f"  seed {r['config'].get('seed')}: failed methods {failed}")
        t = r.get("targets", {})
        verdicts = "; ".join(f"{k} {'met' if v.get('met') else 'MISSED'}" for k, v in t.items())
        print(f"  seed {r['config'].get('seed')}: {verdicts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
