"""Steady-state requests of this source tree against another version of the library, interleaved in one process.

Another version's ``mcmc_unlearner`` (``--base``: a ``src`` folder, e.g. ``git archive <commit> src | tar -x -C
/tmp/base``) is loaded under another package name beside this tree's, and two unlearners on copies of one
model-matrix chain take the same requests (the forgotten set, then ``--rows`` random kept rows), alternating which
goes first. Each request asserts that both took the same damping trials and dampings, and prints how far the banks
apart are against the shift so far; the CPU time per request from ``--from`` on is given in SGLD epochs over 10k
rows timed in the same process before the first request and after every one (issue 11's unit; each request over the
epochs timed on either side of it: ``_timing.Baseline``); then the median and range of a request's CPU time from
``--from`` on, the first request's and the total of all requests (the first included), and this tree's time over the
base's per request (median and range) and of the totals (``_timing.sequence_lines``). One torch thread
(``--threads``)::

    git archive HEAD~2 src | tar -x -C /tmp/base
    OMP_NUM_THREADS=1 python benchmarks/request_ab.py --base /tmp/base/src --requests 12 --chain-cache /tmp/mm/cache
"""

from __future__ import annotations

import argparse
import copy
import importlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchargs as A
import _timing as T
import model_matrix as mm
from mcmc_unlearner import MCMCUnlearner


def _load_base(src: Path, into: Path) -> object:
    """``src/mcmc_unlearner`` imported as the package ``mcmc_unlearner_base`` (its imports are relative)."""
    shutil.copytree(src / "mcmc_unlearner", into / "mcmc_unlearner_base")
    sys.path.insert(0, str(into))
    return importlib.import_module("mcmc_unlearner_base")


def _folder_with_package(text: str) -> Path:
    path = Path(text)
    if not (path / "mcmc_unlearner" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{text} holds no mcmc_unlearner/__init__.py")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=_folder_with_package, required=True, help="a src folder of the other version")
    A.add_request_sequence_args(ap, mm.BUILDERS, requests=12)
    args = ap.parse_args(argv)
    A.check_from(ap, args)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    try:
        return _run(args, _load_base(args.base, tmp).MCMCUnlearner)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after the run: the base imports some modules when first used


def _run(args: argparse.Namespace, base_class: type) -> int:
    classes = {"base": base_class, "this": MCMCUnlearner}
    p = mm.build_problems([args.model], True, args.seed)[0]
    origin = mm.train_chain(p, torch.arange(len(p.x_train)), 100 * args.seed, args.chain_cache)
    epochs = T.Baseline(lambda: mm.time_sgld_epoch(p, origin.model, max_steps=None))
    epochs.measure()  # before the first request; again after each one (both ways)
    requests = mm.sequence_requests(p, args.rows, args.requests, args.seed)
    uns = {}
    for name, cls in classes.items():
        model = copy.deepcopy(origin.model)
        torch.nn.utils.vector_to_parameters(origin.bank[-1], model.parameters())
        uns[name] = cls(model, None, nll=p.nll, log_prior=p.log_prior, bank=origin.bank.clone())
    print(f"{p.description}: {p.n_params():,} params, {torch.get_num_threads()} thread(s), SGLD epoch over 10k rows "
          f"{epochs.cpu[0]:.2f} s CPU (first; timed again after every request); base {args.base}")  # fmt: skip
    cpu = dict.fromkeys(classes, 0.0)
    per_request: dict[str, list[float]] = {"this": [], "base": []}
    gone = torch.zeros(len(p.x_train), dtype=torch.bool)
    for k, rows in enumerate(requests):
        gone[rows] = True
        xr, yr = p.x_train[~gone], p.y_train[~gone]
        reps, spent = {}, {}
        for name in list(classes) if k % 2 == 0 else list(classes)[::-1]:
            stream = mm.forever(mm.loader(xr, yr, p.batch, k))
            c0 = time.process_time()
            reps[name] = uns[name].remove((p.x_train[rows], p.y_train[rows]), stream, n_remaining=len(xr))
            spent[name] = time.process_time() - c0
            per_request[name].append(spent[name])
            if k >= args.start:
                cpu[name] += spent[name]
        a, b = reps["base"], reps["this"]
        trials = [[t["damping"] for t in r.info["trials"]] for r in (a, b)]
        assert trials[0] == trials[1] and a.damping == b.damping, f"request {k}: trials differ {trials}"
        moved = float((uns["base"].bank - origin.bank).norm())
        apart = float((uns["base"].bank - uns["this"].bank).norm()) / max(moved, 1e-300)
        print(f"  request {k}: base {spent['base']:.3f} s, this {spent['this']:.3f} s; {b.damping_trials} trial(s), "
              f"damping {b.damping_relative:.3g}x; banks apart {apart:.2e} of the shift so far")  # fmt: skip
        sys.stdout.flush()
        epochs.measure()  # after the request: its epochs are over the epochs timed on either side of it
    n = args.requests - args.start
    print(T.baseline_line(epochs))
    print(f"requests {args.start}-{args.requests - 1}, per request (CPU s; SGLD epochs over 10k rows, each request's "
          "over the epochs timed beside it: median (min-max)):")  # fmt: skip
    for name in classes:
        e = T.per_call_ratios(per_request[name], epochs, start=args.start)
        print(f"  {name:5s} {cpu[name] / n:.3f} ({e['median']:.3f} ({e['min']:.3f}-{e['max']:.3f}) epochs)")
    print(f"this / base: {cpu['this'] / cpu['base']:.3f}")
    print("\n".join(T.sequence_lines(per_request, args.start, first_runner=next(iter(classes)))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
