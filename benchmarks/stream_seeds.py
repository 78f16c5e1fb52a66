"""How much of a model-matrix outcome is the draw of the remaining-data stream.

``model_matrix.py`` runs one request per model with the remaining rows streamed by a ``DataLoader`` seeded 99. That
stream decides which minibatches the curvature and the safety check see. This script repeats the same request on
the same cached chains with other stream seeds and prints, per model, the fraction of the way to retraining
(target 0.5–2), the kept-data distance to retraining, and the damping the defaults chose.

    OMP_NUM_THREADS=1 python benchmarks/stream_seeds.py --models mlp,regression,bncnn,transformer \
        --stream-seeds 99,0,1,2,3,4,5,6 --chain-cache /tmp/mm/cache --json docs/runs/stream-seeds-quick-s0.json

One torch thread (``--threads``); the chains are ``model_matrix.py --quick``'s (trained once, then cached).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchargs as A
import model_matrix as mm


def one_request(problem: mm.Problem, origin: mm.Chain, stream_seed: int, options: dict) -> dict:
    """``model_matrix.py``'s request (:func:`model_matrix.unlearn_request`) with the remaining rows streamed under
    ``stream_seed``, in this process."""
    req = mm.unlearn_request(problem, origin, epoch_steps=0, remaining_seed=stream_seed, options=options)
    row = {"stream_seed": stream_seed, "status": req["status"] if req["status"] == "ok" else req.get("error", "")}
    if req["status"] == "ok":
        rep = req["report"]
        row.update(stats=req["stats"], damping_relative=rep["damping_relative"], damping_trials=rep["damping_trials"])
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models", type=A.name_list({**mm.BUILDERS, **mm.EXTRA_BUILDERS}), default="mlp,regression,bncnn,transformer"
    )
    ap.add_argument("--stream-seeds", type=A.int_list(), default="99,0,1,2,3,4,5,6", help="99 is model_matrix.py's")
    ap.add_argument("--seed", type=int, default=0, help="chains and forgotten rows (model_matrix.py --seeds)")
    ap.add_argument("--full", action="store_true", help="the full sizes (default: --quick sizes)")
    ap.add_argument(
        "--options",
        type=A.json_object_text,
        default="{}",
        help="extra MCMCUnlearner options as JSON (diagnostics only)",
    )
    ap.add_argument("--threads", type=A.positive_int, default=1)
    ap.add_argument("--chain-cache", type=Path, default=None)
    ap.add_argument("--json", type=A.output_file, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    options = json.loads(args.options)
    seeds = [int(s) for s in args.stream_seeds.split(",")]
    out: dict[str, list[dict]] = {}
    for problem in mm.build_problems(args.models.split(","), not args.full, args.seed):
        origin, retrains = mm.train_chains(problem, seed=args.seed, retrains=2, cache=args.chain_cache)
        key = "test_error" if problem.kind == "classification" else "test_rmse"
        o_nll = origin.stats["nll_forgot"]
        r_nll = statistics.fmean(c.stats["nll_forgot"] for c in retrains)
        r_acc = statistics.fmean(c.stats[key] for c in retrains)
        rows = []
        for s in seeds:
            row = one_request(problem, origin, s, options)
            if row["status"] == "ok":
                u = row["stats"]
                row["fraction"] = (u["nll_forgot"] - o_nll) / (r_nll - o_nll)
                gap = abs(u[key] - r_acc)
                row["accuracy_distance"] = gap if key == "test_error" else gap / r_acc
            rows.append(row)
            nan = float("nan")
            print(
                f"{problem.name:12s} stream {s:3d}: {row['status'][:60]:4s} fraction {row.get('fraction', nan):6.3f}"
                f"  kept-data distance {row.get('accuracy_distance', nan):.3f}"
                f"  damping {row.get('damping_relative', nan):.3g}x in {row.get('damping_trials')} trial(s)",
                flush=True,
            )
        fr = [r["fraction"] for r in rows if "fraction" in r]
        inside = sum(mm.FRACTION_RANGE[0] <= f <= mm.FRACTION_RANGE[1] for f in fr)
        span = f"{min(fr):.3g}-{max(fr):.3g}" if fr else "none ran"
        print(f"{problem.name}: fraction in [0.5, 2] on {inside} of {len(rows)} streams (range {span})")
        out[problem.name] = rows
    if args.json:
        args.json.write_text(json.dumps({"options": options, "seed": args.seed, "results": out}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
