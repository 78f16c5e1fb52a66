"""Measurements of the deletion service (issue "Deletion requests you can trust").

    python benchmarks/service_checks.py verify-race [--runs 500] [--json OUT.json]
    python benchmarks/service_checks.py threads --model DIR [--repeats 5] [--threads 2] [--json OUT.json]

``verify-race``: saves a small GMM model (2,000 points, SGHMC, 20-sample bank, exact solver), starts a writer
process that keeps applying one-id deletion requests through :func:`mcmc_unlearner.service.deletion.forget`,
and runs ``verify`` ``--runs`` times in this process meanwhile (lock-free snapshot reads). Reports the number
of FAILED verdicts (the target is 0), the number of distinct ledger heads the verdicts saw (how many commits
they interleaved with) and the writer's commits; ``raced`` is false (and a warning printed) when no verdict ran
beside a commit, where 0 failures shows nothing.

``threads``: applies the same request to fresh copies of a saved model with ``--threads N`` (default: torch's
default count) and with one thread, alternating which goes first, ``--repeats`` times each; reports the
computation's seconds (``RemovalReport.seconds``: G, curvature and solve) and the whole ``forget`` call's seconds
(load, compute, commit): the first repetition's apart (the ``N``-thread call runs first and pays the process's
one-off costs), the median and range of the later repetitions, the sum of all, and the ``N``-thread time over the
one-thread time per later repetition (median and range) and of the sums (``--repeats`` 2 or more). The thread
counts are the results' labels. ``--on-failure accept`` is used so that a removal failing the quality gate is still
timed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder: _benchargs
import _benchargs as A
import _timing as T

WRITER = """
import sys
from mcmc_unlearner.service.deletion import forget
from mcmc_unlearner.service.fsio import BusyError
model, stop = sys.argv[1], sys.argv[2]
import os
i = 0
while not os.path.exists(stop) and i < 1900:
    forget(model, [i], wait=60)
    i += 1
print(i)
"""


def _save_gmm(path: Path) -> None:
    from mcmc_unlearner import SGHMC, MCMCUnlearner, RemovableDataset
    from mcmc_unlearner.datasets import make_gmm_2d
    from mcmc_unlearner.models.gmm import GaussianMixture
    from mcmc_unlearner.samplers import run_chain
    from mcmc_unlearner.service.checkpoint import save_model
    from mcmc_unlearner.service.specs import gmm_data_spec, gmm_model_spec

    n = 2000
    x, y = make_gmm_2d(n=n, seed=1)
    model = GaussianMixture(k=4, dim=2, generator=torch.Generator().manual_seed(0), n=n)
    data = RemovableDataset(torch.from_numpy(x), torch.from_numpy(y), batch_size=64, seed=1)
    opt = SGHMC(model.parameters(), lr=1e-4, alpha=0.5, generator=torch.Generator().manual_seed(2))
    un = MCMCUnlearner(model, opt, solver="exact", curvature_draws=4)
    run_chain(model, opt, data, un.energy, 300, n)
    for _ in range(20):
        run_chain(model, opt, data, un.energy, 3, n)
        un.collect()
    save_model(path, model=model, sampler=opt, data=data, unlearner=un, model_spec=gmm_model_spec(model),
               data_spec=gmm_data_spec(n, 1))  # fmt: skip


def verify_race(runs: int) -> dict[str, Any]:
    from mcmc_unlearner.service.deletion import verify

    tmp = Path(tempfile.mkdtemp(prefix="verify-race-"))
    model, stop = tmp / "m", tmp / "stop"
    _save_gmm(model)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(model), str(stop)], env=env, stdout=subprocess.PIPE)
    failed, heads, problems = 0, set(), []
    t0 = time.perf_counter()
    try:
        time.sleep(2.0)  # let the writer start committing
        for _ in range(runs):
            res = verify(model, wait=60)
            heads.add(res.head)
            if not res.ok:
                failed += 1
                problems.append(res.problems)
    finally:
        stop.touch()
        out, _ = writer.communicate(timeout=600)
    commits = int(out.decode().strip() or 0)
    final = verify(model)
    shutil.rmtree(tmp)
    return {
        "runs": runs,
        "failed": failed,
        "distinct_heads_seen": len(heads),
        "writer_commits": commits,
        "writer_exit": writer.returncode,
        "final_verify_ok": final.ok,
        "raced": commits > 0 and len(heads) > 1,
        "seconds": time.perf_counter() - t0,
        "problems": problems[:5],
    }


def threads(model: Path, repeats: int, n_threads: int | None, ids: list[int]) -> dict[str, Any]:
    from mcmc_unlearner.service.deletion import forget

    default = n_threads or torch.get_num_threads()
    labels = {f"{default} threads": default, "1 thread": 1}
    times: dict[str, dict[str, list[float]]] = {k: {"compute": [], "total": []} for k in labels}
    tmp = Path(tempfile.mkdtemp(prefix="threads-"))
    try:
        for r in range(repeats):
            for label in list(labels) if r % 2 == 0 else list(labels)[::-1]:  # alternating which goes first
                n = labels[label]
                copy = tmp / f"{r}-{n}"
                shutil.copytree(model, copy)
                t0 = time.perf_counter()
                out = forget(copy, ids, on_failure="accept", threads=n)
                total = time.perf_counter() - t0
                times[label]["compute"].append(out.report.seconds)
                times[label]["total"].append(total)
                shutil.rmtree(copy)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "model": str(model),
        "ids": ids,
        "repeats": repeats,
        "cpus": os.cpu_count(),
        "order": f"repetition 0: {default} threads first (it pays the process's one-off costs), then alternating",
        "results": summarise_threads(times),
    }


def summarise_threads(times: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Per label and part (``compute``, ``total``): the first repetition's time (the process's one-off costs land
    there), the median and range of the later repetitions, the sum over all repetitions and every time; under
    ``"<first label> / <second label>"``: the ratio per later repetition (median and range) and of the sums.
    (The first repetition sat inside the median, the range and the ratios: the standard keeps it apart.)"""
    summary: dict[str, Any] = {
        k: {part: {**T.spread(v[1:]), "first": v[0], "sum": sum(v), "all": v} for part, v in d.items()}
        for k, d in times.items()
    }
    a, b = list(times)
    summary[f"{a} / {b}"] = {
        part: T.paired_ratio({"times": times[a][part][1:], "total": sum(times[a][part])},
                             {"times": times[b][part][1:], "total": sum(times[b][part])})
        for part in times[a]
    }  # fmt: skip
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("verify-race")
    r.add_argument("--runs", type=A.positive_int, default=500)
    r.add_argument("--json", type=A.output_file, default=None)
    t = sub.add_parser("threads")
    t.add_argument("--model", type=A.existing_dir, required=True, help="a saved model's folder")
    t.add_argument(
        "--repeats", type=A.int_at_least(2), default=5, help="the first is reported apart (the one-off costs)"
    )
    t.add_argument(
        "--threads", type=A.positive_int, default=None, help="the multi-thread count (default: torch's default)"
    )
    t.add_argument("--ids", type=A.int_list(0), default="5,6,7")
    t.add_argument("--json", type=A.output_file, default=None)
    args = p.parse_args()
    if args.what == "verify-race":
        torch.set_num_threads(1)
        res = verify_race(args.runs)
    else:
        res = threads(Path(args.model), args.repeats, args.threads, [int(i) for i in args.ids.split(",")])
    print(json.dumps(res, indent=2))
    if args.what == "verify-race" and not res["raced"]:
        print(
            f"warning: the verdicts saw {res['distinct_heads_seen']} ledger head(s) and the writer committed "
            f"{res['writer_commits']} time(s): no verify ran beside a commit, so 0 failures shows nothing; "
            "raise --runs (the default 500 takes minutes)",
            file=sys.stderr,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
