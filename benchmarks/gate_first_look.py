"""The Newton gate's first look at the library's ``NEWTON_GATE_FIRST_DRAWS`` draws against another count, one process.

For each model and seed: the model-matrix origin chain (``--chain-cache``) and its first request (the forgotten set),
the remaining rows a ``DataLoader`` over a ``TensorDataset`` (listed: the gate's estimate runs where the undamped step
overshoots), on a fresh unlearner with the library's defaults, ``--repeats`` times per count, the counts alternating
which goes first. Prints per count the gate's verdict (``info["newton_gate"]``), its CPU seconds
(``info["newton_gate_cpu_seconds"]``) and the request's (median over the repeats), whether the two counts' banks are
equal to the bit, and the gate's CPU at the library's count over the other's. One torch thread (``--threads``)::

    OMP_NUM_THREADS=1 python benchmarks/gate_first_look.py --models resnet,transformer,lenet --seeds 0 --other 8 \
        --chain-cache /tmp/mm/cache
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchargs as A
import mcmc_unlearner.unlearner as U
import model_matrix as mm
from mcmc_unlearner import MCMCUnlearner


def first_request(p: mm.Problem, origin: mm.Chain, draws: int) -> tuple[dict, float, torch.Tensor]:
    """The first request on a fresh unlearner with the gate's first look at ``draws`` draws: its report's info, its
    CPU seconds and the bank after it."""
    model = copy.deepcopy(origin.model)
    torch.nn.utils.vector_to_parameters(origin.bank[-1], model.parameters())
    un = MCMCUnlearner(model, None, nll=p.nll, log_prior=p.log_prior, bank=origin.bank.clone())
    rows, keep = p.forget, p.keep_mask
    saved, U.NEWTON_GATE_FIRST_DRAWS = U.NEWTON_GATE_FIRST_DRAWS, draws
    try:
        c0 = time.process_time()
        report = un.remove(
            (p.x_train[rows], p.y_train[rows]), mm.loader(p.x_train[keep], p.y_train[keep], p.batch, 0), int(keep.sum())
        )
        cpu = time.process_time() - c0
    finally:
        U.NEWTON_GATE_FIRST_DRAWS = saved
    return report.info, cpu, un.bank.clone()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=A.name_list(mm.BUILDERS), default="resnet,transformer,lenet")
    ap.add_argument("--seeds", type=A.int_list(0), default="0")
    ap.add_argument("--other", type=A.positive_int, default=8, help="the first look's draws to compare (stop 65's 8)")
    ap.add_argument("--repeats", type=A.positive_int, default=2)
    ap.add_argument("--threads", type=A.positive_int, default=1)
    ap.add_argument("--chain-cache", type=Path, default=None, help="model_matrix.py's chain cache folder")
    args = ap.parse_args(argv)
    if args.other == U.NEWTON_GATE_FIRST_DRAWS:  # one count against itself: one set of runs, banks "equal" trivially
        ap.error(f"--other must differ from the library's NEWTON_GATE_FIRST_DRAWS ({U.NEWTON_GATE_FIRST_DRAWS})")
    torch.set_num_threads(args.threads)
    counts = (U.NEWTON_GATE_FIRST_DRAWS, args.other)
    for seed in (int(s) for s in args.seeds.split(",")):
        for p in mm.build_problems(args.models.split(","), True, seed):
            origin = mm.train_chain(p, torch.arange(len(p.x_train)), 100 * seed, args.chain_cache)
            gate: dict[int, list[float]] = {c: [] for c in counts}
            cpu: dict[int, list[float]] = {c: [] for c in counts}
            verdict, banks = {}, {}
            for r in range(args.repeats):
                for c in counts if r % 2 == 0 else counts[::-1]:
                    info, spent, banks[c] = first_request(p, origin, c)
                    verdict[c] = info.get("newton_gate", "not consulted")
                    gate[c].append(info.get("newton_gate_cpu_seconds") or 0.0)
                    cpu[c].append(spent)
            print(f"{p.name} seed {seed} ({p.n_params():,} params), {args.repeats} repeat(s), medians:")
            for c in counts:
                print(f"  first look at {c} draws: gate {statistics.median(gate[c]):.3f} s CPU of the request's "
                      f"{statistics.median(cpu[c]):.2f} s; {verdict[c]}")  # fmt: skip
            same = torch.equal(banks[counts[0]], banks[counts[1]])
            ratio = statistics.median(gate[counts[0]]) / max(statistics.median(gate[counts[1]]), 1e-12)
            print(f"  banks equal to the bit: {same}; gate CPU {counts[0]} / {counts[1]} draws: {ratio:.2f}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
