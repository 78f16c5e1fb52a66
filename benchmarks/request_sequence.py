"""Cost of a *sequence* of deletion requests with the defaults, in SGLD epochs of the same model (issue 11's cost
target: one request of 64 rows on a >= 1M-parameter residual network at most 0.25 epochs over 10k rows).

``model_matrix.py`` times one request, which pays the one-off costs (the K-FAC build and eigendecompositions, the
first damping search from zero). A user serving deletions pays those once; later requests reuse the curvature
(``refresh_every``) and start from the accepted damping. This script runs ``--requests`` sequential requests of 64
rows on a model-matrix chain — the forgotten set of the matrix first, then random kept rows — with the library's
defaults, one process, one torch thread (``--threads``), and prints each request's CPU seconds next to an SGLD epoch
over 10k rows timed in the same process before the first request and again after every request
(``_timing.Baseline``): a request's epochs are its CPU over the epochs timed on either side of it, and the epoch's
first time, median, range and total are printed (until stop 59 it was timed once, before the requests). The modules
a request imports (torch's lazy imports: on the ResNet the first double backward's sympy, 0.2-0.3 s CPU; on networks
whose check runs ``torch.func.jvp`` also ``torch._dynamo``) are timed as they load (:class:`ImportTimer`) and
counted apart, as one-offs, in the total.

    OMP_NUM_THREADS=1 python benchmarks/request_sequence.py --model resnet --requests 5 --chain-cache /tmp/mm/cache \
        --json docs/runs/request-sequence-resnet.json
"""

from __future__ import annotations

import argparse
import importlib.abc
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchargs as A
import _timing as T
import model_matrix as mm
from mcmc_unlearner import MCMCUnlearner, RemovableDataset


def summary_line(rows: list[dict], warmup: float, fit_cpu: float | None, ep_cpu: float) -> str:
    """The closing line: the first request, the later ones' range and the total with the one-offs (the modules the
    requests imported, ``warmup``, and with ``--fit`` the fit), each in seconds CPU and epochs; also for one request.
    """
    total = sum(r["cpu_seconds"] for r in rows) + warmup + (fit_cpu or 0.0)
    later = [r["epochs"] for r in rows[1:]]
    cause = "after the fit" if fit_cpu is not None else "its own one-off costs"
    first = f"first request {rows[0]['epochs']:.2f} epochs ({cause}"
    return (
        first
        + "; the modules it imported are timed apart, in the total)"
        + (f"; later requests {min(later):.2f}-{max(later):.2f} epochs" if later else "")
        + f"; one-offs: import {warmup:.2f} s CPU"
        + (f", fit {fit_cpu:.2f} s CPU = {fit_cpu / ep_cpu:.2f} epochs" if fit_cpu is not None else "")
        + f"; total {total:.1f} s CPU = {total / ep_cpu:.2f} epochs for {len(rows)} request"
        + ("s" if len(rows) > 1 else "")
        + f" and the one-off import{' and fit' if fit_cpu is not None else ''}"
    )


class ImportTimer(importlib.abc.MetaPathFinder):
    """Times the modules imported while it is installed (first in ``sys.meta_path``): ``cpu`` is the CPU seconds
    spent executing them (nested imports counted once, in the outermost), ``modules`` how many were loaded. Finding
    a module's file is not timed; built-in and frozen modules are not wrapped."""

    def __init__(self) -> None:
        self.cpu, self.modules, self._depth = 0.0, 0, 0

    def __enter__(self) -> ImportTimer:
        sys.meta_path.insert(0, self)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.meta_path.remove(self)

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or isinstance(loader, type) or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: object) -> None:
            self._depth += 1
            c0 = time.process_time()
            try:
                run(module)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.cpu += time.process_time() - c0
                self.modules += 1
                if vars(loader).get("exec_module") is exec_module:
                    del loader.exec_module  # the loader as it was

        loader.exec_module = exec_module  # this module's own loader object
        return spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        type=A.one_of({**mm.BUILDERS, **mm.EXTRA_BUILDERS}),
        default="resnet",
        help="a model_matrix.py model name",
    )
    ap.add_argument("--full", action="store_true", help="the full sizes (default: model_matrix.py --quick sizes)")
    ap.add_argument("--requests", type=A.positive_int, default=5)
    ap.add_argument(
        "--rows", type=A.positive_int, default=64, help="rows per request after the first (the forgotten set)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=A.positive_int, default=1, help="torch threads (default 1: see README, 'Threads')"
    )
    ap.add_argument("--chain-cache", type=Path, default=None, help="model_matrix.py's chain cache folder")
    ap.add_argument(
        "--source",
        type=A.one_of(["iterator", "removable"]),
        default="iterator",
        help="the remaining data: a plain iterator over a DataLoader (the model matrix's; no correction across "
        "requests can run) or a RemovableDataset (the deletion service's; corrections every recenter_every requests)",
    )
    ap.add_argument(
        "--fit",
        action="store_true",
        help="call MCMCUnlearner.fit on the full training data before the first request (its one-off curvature), "
        "timed apart and counted in the total",
    )
    ap.add_argument("--json", type=A.output_file, default=None)
    ap.add_argument(
        "--options",
        type=A.json_object_text,
        default="{}",
        help="extra MCMCUnlearner options as JSON (default: the defaults)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    p = mm.build_problems([args.model], not args.full, args.seed)[0]
    origin = mm.train_chain(p, torch.arange(len(p.x_train)), 100 * args.seed, args.chain_cache)
    model = origin.model
    epoch = T.Baseline(lambda: mm.time_sgld_epoch(p, model, max_steps=None))
    epoch.measure()  # before the first request; again after each one
    torch.nn.utils.vector_to_parameters(origin.bank[-1], model.parameters())
    print(
        f"{p.description}: {p.n_params():,} params; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"SGLD epoch over 10k rows: {epoch.cpu[0]:.2f} s CPU (first; timed again after every request)",
        flush=True,
    )
    requests = mm.sequence_requests(p, args.rows, args.requests, args.seed)
    gone = torch.zeros(len(p.x_train), dtype=torch.bool)
    # one-off per process: the modules a request imports (torch's lazy imports), timed as they load and taken out of
    # the request's number (so the first request's number is the request's), added to the total below
    warmup = 0.0
    options = json.loads(args.options)
    un = MCMCUnlearner(model, None, nll=p.nll, log_prior=p.log_prior, bank=origin.bank.clone(), **options)
    fit_cpu, fitted = 0.0, None
    if args.fit:  # before any request arrives: the data are still all of the training rows
        c0 = time.process_time()
        if args.source == "removable":
            data = RemovableDataset(p.x_train, p.y_train, batch_size=p.batch, seed=10_000)
        else:
            data = mm.forever(mm.loader(p.x_train, p.y_train, p.batch, 10_000))
        fitted = un.fit(data, n_remaining=len(p.x_train))
        fit_cpu = time.process_time() - c0
        print(
            f"one-off: fit {fit_cpu:.2f} s CPU = {fit_cpu / epoch.cpu[0]:.2f} epochs (the first epoch's) "
            f"(curvature kept {fitted.curvature_kept})",
            flush=True,
        )
    rows_out = []
    for k, rows in enumerate(requests):
        gone[rows] = True
        xr, yr = p.x_train[~gone], p.y_train[~gone]
        if args.source == "removable":
            remaining = RemovableDataset(xr, yr, batch_size=p.batch, seed=k)
        else:
            remaining = mm.forever(mm.loader(xr, yr, p.batch, k))
        c0, t0 = time.process_time(), time.perf_counter()
        status, report = "ok", None
        with ImportTimer() as imports:
            try:
                report = un.remove((p.x_train[rows], p.y_train[rows]), remaining, n_remaining=len(xr))
            except Exception as e:  # recorded, the sequence goes on (the user would retrain or repair)
                status = f"{type(e).__name__}: {e}"
                report = getattr(e, "report", None)
        cpu = time.process_time() - c0 - imports.cpu
        wall = time.perf_counter() - t0  # (before the epoch below: it is not the request's)
        warmup += imports.cpu
        epoch.measure()  # after the request: its epochs are over the epochs timed on either side of it
        row = {
            "request": k,
            "rows": len(rows),
            "status": status,
            "cpu_seconds": cpu,  # without the imports
            "wall_seconds": wall,
            "epochs": cpu / epoch.around(k),
            "epoch_cpu_seconds": epoch.around(k),
            "import_cpu_seconds": imports.cpu,
            "modules_imported": imports.modules,
        }
        if report is not None:
            info = report.info
            row.update(
                damping_trials=report.damping_trials,
                damping_relative=report.damping_relative,
                step_shortfall=report.step_shortfall,
                model_ratio=report.model_ratio,
                curvature_reused=bool(info.get("preconditioner_reused") or info.get("hessian_reused")),
                rebuilt_for_drift=bool(info.get("curvature_rebuilt_for_drift")),
                screened_trials=sum(1 for t in info.get("trials", []) if 0 < t.get("check_rows", 0) < un.check_rows),
                kfac_build_seconds=info.get("kfac_build_seconds"),
                recenter=str(info.get("recenter", ""))[:60],  # "applied", "skipped: ...", "off: ...", ...
                recenter_seconds=info.get("recenter_seconds"),
                newton_gate=info.get("newton_gate"),  # None: not consulted (newton_steps above 1, or the gate off)
                newton_gate_cpu_seconds=info.get("newton_gate_cpu_seconds"),  # None: no gap estimated
            )
        rows_out.append(row)
        print(
            f"  request {k}: {status:<4} {cpu:6.2f} s CPU = {row['epochs']:.2f} epochs; trials "
            f"{row.get('damping_trials')}, damping {row.get('damping_relative', math.nan):.3g}x mean curvature, "
            f"shortfall {row.get('step_shortfall', math.nan):.3g}, curvature reused {row.get('curvature_reused')}"
            f"{' (rebuilt: drift)' if row.get('rebuilt_for_drift') else ''}, screened {row.get('screened_trials')}"
            f"{'; correction ' + row['recenter'] if row.get('recenter_seconds') is not None else ''}"
            f"{'; newton gate ' + row['newton_gate'][:40] if row.get('newton_gate') else ''}"
            f"{f' ({g:.2f} s CPU)' if (g := row.get('newton_gate_cpu_seconds')) is not None else ''}"
            f"{f'; imported {imports.modules} modules, {imports.cpu:.2f} s CPU apart' if imports.modules else ''}",
            flush=True,
        )
    ep_cpu, ep_wall = epoch.median(), epoch.median(wall=True)
    ratios = T.per_call_ratios([r["cpu_seconds"] for r in rows_out], epoch, start=1)
    print(T.baseline_line(epoch))
    print(
        f"epochs per request, each over the epochs timed beside it: {ratios['median']:.3f} "
        f"({ratios['min']:.3f}-{ratios['max']:.3f}) of requests {min(1, len(rows_out) - 1)}-{len(rows_out) - 1}, "
        f"first {ratios['first']:.3f}; all requests {ratios['total']:.3f} epochs (imports apart)"
    )
    print(summary_line(rows_out, warmup, fit_cpu if args.fit else None, ep_cpu))
    if args.json:
        meta = {"model": p.name, "description": p.description, "params": p.n_params(), "quick": not args.full,
                "seed": args.seed, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "source": args.source, "epoch_cpu_seconds": ep_cpu, "epoch_wall_seconds": ep_wall,
                "epoch": epoch.summary(), "epoch_cpu_seconds_runs": epoch.cpu, "epoch_wall_seconds_runs": epoch.wall,
                "epochs_per_request": ratios,
                "warmup_cpu_seconds": warmup, "options": options, "fit_cpu_seconds": fit_cpu if args.fit else None,
                "fit": None if fitted is None else fitted.to_dict()}  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "requests": rows_out}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
