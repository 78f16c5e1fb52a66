"""The README's GMM table from several ``mcmc-unlearner demo`` runs (one per seed).

Usage (``PYTHONPATH=src``)::

    python benchmarks/gmm_seed_table.py runs/sgld-0 runs/sgld-1 ...

Prints, per distance to the exact posterior: each method's mean ± sd over seeds (min–max), the retrain chains'
per-seed median (mean ± sd over seeds) and in how many seeds ``unlearn`` is at or below that seed's median;
then times (total of all requests vs. per-request median, retraining one chain).
"""

from __future__ import annotations

import sys

import numpy as np

from mcmc_unlearner.experiments.gmm import DISTANCES
from mcmc_unlearner.experiments.summary import experiment_kind, load_metrics


def _ms(values: list[float], digits: int = 3) -> str:
    a = np.asarray(values, dtype=np.float64)
    sd = f" ± {a.std(ddof=1):.{digits}g}" if a.size > 1 else ""
    return f"{a.mean():.{digits}g}{sd} ({a.min():.{digits}g}–{a.max():.{digits}g})"


def main(paths: list[str]) -> None:
    runs = [load_metrics(p)[1] for p in paths]
    seeds = [r["seed"] for r in runs]
    for seed in sorted({s for s in seeds if seeds.count(s) > 1}, key=str):  # fmnist_table.py and `summary` say it
        names = [p for p, s in zip(paths, seeds) if s == seed]
        print(
            f"gmm_seed_table.py: warning: seed {seed} given {len(names)} times ({', '.join(map(ascii, names))}): the "
            "mean ± sd counts the same draw more than once",
            file=sys.stderr,
        )
    samplers = sorted({r["sampler"] for r in runs})
    methods = [m for m in ("unlearn", "paper", "finetune", "unlearn-continued") if all(m in r["methods"] for r in runs)]
    print(f"{len(runs)} runs, sampler {'/'.join(samplers)}, seeds {seeds}; mean ± sd over seeds (min–max)\n")
    header = ["distance", *methods, "retrain chains: median", "unlearn ≤ median (seeds)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key in DISTANCES:
        cells = [f"`{key}`"]
        for m in methods:
            cells.append(_ms([r["methods"][m]["vs_exact"][key] for r in runs]))
        med = [r["retrain_chains"]["vs_exact"][key]["median"] for r in runs]
        cells.append(_ms(med))
        wins = sum(
            r["methods"]["unlearn"]["vs_exact"][key] <= r["retrain_chains"]["vs_exact"][key]["median"] for r in runs
        )
        cells.append(f"{wins}/{len(runs)}")
        print("| " + " | ".join(cells) + " |")
    ess = ["ESS (worst coordinate, of 4,000)"]
    for m in methods:
        ess.append(_ms([r["methods"][m]["ess"]["min"] for r in runs]))
    ess.append(_ms([r["retrain_chains"]["ess"]["min"]["median"] for r in runs]))
    ess.append("")
    print("| " + " | ".join(ess) + " |")
    secs = ["seconds (all requests; retraining: one chain)"]
    for m in methods:
        secs.append(_ms([r["methods"][m]["seconds"] for r in runs]))
    secs.append(_ms([float(np.median(r["retrain_chains"]["seconds"])) for r in runs]))
    secs.append("")
    print("| " + " | ".join(secs) + " |")
    if all("cpu_seconds" in r["methods"]["unlearn"] for r in runs):
        cpu = ["CPU seconds (all requests; retraining: one chain)"]
        for m in methods:
            cpu.append(_ms([r["methods"][m]["cpu_seconds"] for r in runs]) if m in ("unlearn", "paper") else "")
        cpu.append(_ms([float(np.median(r["retrain_chains"]["cpu_seconds"])) for r in runs]))
        cpu.append("")
        print("| " + " | ".join(cpu) + " |")
    print()
    med_req = [r["methods"]["unlearn"]["seconds_per_request_median"] * 1000 for r in runs]
    print(f"unlearn per-request median (ms): {_ms(med_req)}; warm-up (s): "
          f"{_ms([r['methods']['unlearn']['warmup_seconds'] for r in runs])}")  # fmt: skip
    if "paper" in methods:
        pr = [r["methods"]["paper"]["seconds_per_request_median"] * 1000 for r in runs]
        print(f"paper per-request median (ms): {_ms(pr)}; refused: {[r['methods']['paper']['refused'] for r in runs]}")
    print(f"unlearn refused: {[r['unlearn_requests'].get('refused', 0) for r in runs]}")
    print(f"exact reference: seconds {_ms([r['exact_reference']['seconds'] for r in runs])}, "
          f"ESS min {_ms([r['exact_reference']['ess_min'] for r in runs])}")  # fmt: skip
    print(f"whole run (s): {_ms([r['total_seconds'] for r in runs])}", end="")
    if all("total_cpu_seconds" in r for r in runs):
        print(f"; CPU time of the process (s): {_ms([r['total_cpu_seconds'] for r in runs])}", end="")
    print()
    print(f"KL to retrain (old measure): unlearn {_ms([r['methods']['unlearn']['kl_to_retrain'] for r in runs])}, "
          f"retrain-b {_ms([r['methods']['retrain-b']['kl_to_retrain'] for r in runs])}")  # fmt: skip


#: what every ``mcmc-unlearner demo`` run's metrics hold (and this table reads)
_GMM_KEYS = ("seed", "sampler", "methods", "retrain_chains")


def _gmm_run(text: str) -> str:
    """``runs``: a ``mcmc-unlearner demo`` run folder (or its metrics.json); refused at parse time otherwise."""
    import argparse

    try:
        _, metrics = load_metrics(text)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc).splitlines()[0]) from None
    missing = [k for k in _GMM_KEYS if k not in metrics]
    if missing:
        kind = experiment_kind(metrics) or "unknown"
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a `mcmc-unlearner demo` (GMM) run (experiment {kind}; no {', '.join(missing)})"
        )
    return text


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=_gmm_run, help="folders of `mcmc-unlearner demo` runs (one per seed)")
    main(ap.parse_args().runs)
