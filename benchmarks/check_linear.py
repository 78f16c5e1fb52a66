"""The safety check's linear term: forward mode (stop 35's rule: batched through ``vmap`` from ``LOOP_DRAWS_FROM_DIM``
parameters) against the difference the unlearner takes from ``CHECK_DIFFERENCE_FROM_DIM`` parameters (and, for a
convolutional network, from ``CHECK_ONESIDED_CONV_FROM_DIM``), looped over draws (central differences in stop 36, the
one-sided difference since stop 37), on the same request sequence in one process. Each request's line prints the
linear term the request took (``jvp`` or ``onesided``).

Two unlearners on copies of one model-matrix chain take the same requests (the forgotten set first, then random
kept rows of ``--rows``), alternating which goes first; each request's CPU time, the check's (``_Part.measure``)
and the removed rows' gradient's (``_grad_means``) are summed per rule from ``--from`` on (the first requests pay
the one-off K-FAC build and the damping search from scratch). Then, per rule, the median and range of a request's
CPU time from ``--from`` on, the first request's and the total of all requests (the first included), and the
ratio per request (median and range) and of the totals (``_timing.sequence_lines``). The SGLD epoch the requests
are given in is timed before the first request and after every one, each request over the epochs on either side of
it (``_timing.Baseline``; until stop 59 it was timed once, before the requests). One torch thread
(``--threads``)::

    OMP_NUM_THREADS=1 python benchmarks/check_linear.py --model resnet --requests 10 --chain-cache /tmp/mm/cache
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchargs as A
import _timing as T
import mcmc_unlearner.step as st
import mcmc_unlearner.unlearner as U
import model_matrix as mm
from mcmc_unlearner import MCMCUnlearner

NEW_LOOP = U.loop_over_draws


def old_loop(model: torch.nn.Module, dim: int, check: bool = False) -> bool:
    """Stop 35's rule: the check looped only for a convolutional network between the two thresholds (forward mode
    batched through ``vmap`` above ``LOOP_DRAWS_FROM_DIM``)."""
    if not check:
        return NEW_LOOP(model, dim)
    conv = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
    return conv and U.LOOP_CONV_DRAWS_FROM_DIM <= dim < U.LOOP_DRAWS_FROM_DIM


#: per rule: (the thresholds the check's linear term reads, ``CHECK_DIFFERENCE_FROM_DIM`` and
#: ``CHECK_ONESIDED_CONV_FROM_DIM`` (:func:`~mcmc_unlearner.unlearner.check_linear_rule`), the draw-looping rule)
RULES = {
    "forward": (2**62, 2**62, old_loop),
    "difference": (U.CHECK_DIFFERENCE_FROM_DIM, U.CHECK_ONESIDED_CONV_FROM_DIM, NEW_LOOP),
}


def use_rule(name: str) -> None:
    """Set the unlearner's check rule to ``RULES[name]`` (``"difference"``: the library's own)."""
    U.CHECK_DIFFERENCE_FROM_DIM, U.CHECK_ONESIDED_CONV_FROM_DIM, U.loop_over_draws = RULES[name]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    A.add_request_sequence_args(ap, mm.BUILDERS, requests=10)
    args = ap.parse_args(argv)
    A.check_from(ap, args)
    torch.set_num_threads(args.threads)

    cpu: Counter = Counter()
    rule, counting = ["forward"], [False]

    def timed(owner: object, name: str, key: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*a, **k):
            c0 = time.process_time()
            try:
                return inner(*a, **k)
            finally:
                if counting[0]:
                    cpu[(rule[0], key)] += time.process_time() - c0

        setattr(owner, name, wrapper)

    timed(st._Part, "measure", "check")
    timed(U.MCMCUnlearner, "_grad_means", "G")

    p = mm.build_problems([args.model], True, args.seed)[0]
    origin = mm.train_chain(p, torch.arange(len(p.x_train)), 100 * args.seed, args.chain_cache)
    epochs = T.Baseline(lambda: mm.time_sgld_epoch(p, origin.model, max_steps=None))
    epochs.measure()  # before the first request; again after each one (both ways)
    requests = mm.sequence_requests(p, args.rows, args.requests, args.seed)
    uns = {}
    for name in RULES:
        model = copy.deepcopy(origin.model)
        torch.nn.utils.vector_to_parameters(origin.bank[-1], model.parameters())
        uns[name] = MCMCUnlearner(model, None, nll=p.nll, log_prior=p.log_prior, bank=origin.bank.clone())
    print(f"{p.description}: {p.n_params():,} params, {torch.get_num_threads()} thread(s), SGLD epoch over 10k rows "
          f"{epochs.cpu[0]:.2f} s CPU (first; timed again after every request)")  # fmt: skip
    per_request: dict[str, list[float]] = {"difference": [], "forward": []}
    gone = torch.zeros(len(p.x_train), dtype=torch.bool)
    for k, rows in enumerate(requests):
        gone[rows] = True
        xr, yr = p.x_train[~gone], p.y_train[~gone]
        line = []
        for name in list(RULES) if k % 2 == 0 else list(RULES)[::-1]:
            rule[0], counting[0] = name, k >= args.start
            use_rule(name)
            c0 = time.process_time()
            rep = uns[name].remove((p.x_train[rows], p.y_train[rows]), mm.forever(mm.loader(xr, yr, p.batch, k)),
                                   n_remaining=len(xr))  # fmt: skip
            spent = time.process_time() - c0
            per_request[name].append(spent)
            if k >= args.start:
                cpu[(name, "request")] += spent
            line.append(f"{name} {spent:.2f} s ({rep.damping_trials} trials, damping {rep.damping_relative:.3g}x, "
                        f"shortfall {rep.step_shortfall:.3g}, {rep.info['check_linear']})")  # fmt: skip
        print(f"  request {k}: " + "; ".join(line), flush=True)
        epochs.measure()  # after the request: its epochs are over the epochs timed on either side of it
    use_rule("difference")
    n = args.requests - args.start
    print(T.baseline_line(epochs))
    print(f"requests {args.start}-{args.requests - 1}, per request (CPU s; SGLD epochs over 10k rows, each request's "
          "over the epochs timed beside it: median (min-max)):")  # fmt: skip
    for name in RULES:
        r, c, gm = (cpu[(name, key)] / n for key in ("request", "check", "G"))
        e = T.per_call_ratios(per_request[name], epochs, start=args.start)
        print(f"  {name:10s} request {r:.3f} ({e['median']:.3f} ({e['min']:.3f}-{e['max']:.3f}) epochs), check "
              f"{c:.3f}, removed rows' gradient {gm:.3f}")  # fmt: skip
    f, d = (cpu[(name, "request")] for name in RULES)
    cf, cd = (cpu[(name, "check")] for name in RULES)
    print(f"difference / forward: request {d / f:.3f}, check {cd / cf:.3f}")
    print("\n".join(T.sequence_lines(per_request, args.start, first_runner=next(iter(RULES)))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
