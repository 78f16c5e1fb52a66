"""The safety check's forward pass through ``functionalize`` with and without ``functional_call``'s untying pass, in
one process (stop 61).

``functional_call`` (``tie_weights=True``, torch's default) walks every parameter and buffer of the module on each
call to give tensors registered under several names the value passed for one of them; ``functionalize`` skips that
walk where the model has no such tensors (``curvature.tied_tensors``). For each model-matrix network (``--models``,
the quick sizes, weights as initialised) this times ``f(θ, *rows)`` without autograd, as the check and its second
measurement call it, over ``--rows`` rows, the two ways alternating for ``--reps`` repetitions after one first call
each, and prints each way's CPU time (median, range, first call, total), the untying call's time over the other's
per repetition and of the totals, and whether their per-row values are identical to every bit (they must be: the
script exits 1 otherwise). One torch thread (``--threads``)::

    OMP_NUM_THREADS=1 python benchmarks/functional_ties.py --reps 15
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchargs as A
import _timing as T
import model_matrix as mm
from mcmc_unlearner.curvature import ParamSpec, _Call, call_with, functionalize


def time_model(p: mm.Problem, rows_list: list[int], reps: int) -> bool:
    """Print one line per row count for ``p``'s network; whether the two ways' values were identical throughout."""
    model = p.make_model(0)
    if p.batchnorm:
        model.eval()

    def nll(m: torch.nn.Module, *batch: torch.Tensor) -> torch.Tensor:
        return p.nll(m, batch)

    skipped = functionalize(model, nll)
    wrapper, spec = _Call(model, nll), ParamSpec.of(model)
    theta = ParamSpec.flatten_module(model)

    def untying(*batch: torch.Tensor) -> torch.Tensor:  # the call before stop 61
        return call_with(wrapper, {"m." + k: v for k, v in spec.unflatten(theta).items()}, batch, strict=False)

    identical = True
    for rows in rows_list:
        batch = (p.x_train[:rows], p.y_train[:rows])
        with torch.no_grad():
            same = torch.equal(untying(*batch), skipped(theta, *batch))
            ways = {"untying": lambda b=batch: untying(*b), "skipped": lambda b=batch: skipped(theta, *b)}
            res = T.interleaved(ways, reps, clock=time.process_time)
        identical &= same
        print(
            f"{p.name:<12} {rows:>5} rows: untying {T.describe(res['untying'])} | skipped "
            f"{T.describe(res['skipped'])} | untying/skipped {T.describe_ratio(res['ratio'])} | "
            f"values identical: {same}",
            flush=True,
        )
    return identical


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=A.name_list(mm.BUILDERS), default="mlp,lenet,bncnn,resnet,transformer")
    ap.add_argument("--rows", type=A.int_list(1), default="256,1024", help="rows per call (the check's, its second)")
    ap.add_argument("--reps", type=A.positive_int, default=9)
    ap.add_argument("--threads", type=A.positive_int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    results = [time_model(p, rows, args.reps) for p in mm.build_problems(args.models.split(","), True, 0)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
