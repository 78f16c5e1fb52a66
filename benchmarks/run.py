"""Side-by-side benchmark: the paper's unlearning procedure vs our default path, in one process.

    python benchmarks/run.py [--quick] [--cases conjugate,gmm,digits] [--json OUT.json]

For every case both methods start from the same chain state and stored samples and receive the same
sequence of deletion requests:

* ``paper``: a faithful re-implementation of Fu, He & Tao's procedure through the seed API
  (:class:`mcmc_unlearner.sgmcmcUnlearner`): ``G`` from ``samp_T`` sampler steps, the LiSSA recursion with
  ``iter_T`` rounds, each Hessian-vector product by double backward after a fresh sampler step,
  ``scaling = init_scaling / n_remaining``, and the SGLD step size multiplied by ``n_old / n_new`` after each
  request. Algorithm 1 moves every stored sample by the shift of the live chain.
* ``ours``: :class:`mcmc_unlearner.MCMCUnlearner` with the case's default settings (expectations over the
  stored bank, remaining-data Hessian, curvature reused across requests).

Each method first processes the first request once on a fresh copy of the state (an untimed warm-up, so that
one-off costs of the process do not land in either method's timings), then the whole sequence from the same
start, timed. It prints, per case, the median seconds per deletion request, the total seconds, an accuracy
measure and the ratios, and writes the same as JSON (``cases.<case>.{paper,ours}.seconds_per_request``,
``cases.<case>.speedup`` = paper ÷ ours, ``cases.<case>.ratios_ours_over_paper`` for time and accuracy,
``cases.conjugate.{paper,ours}.undone``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

import mcmc_unlearner
from mcmc_unlearner import SGLD, MCMCUnlearner, RemovableDataset, sgmcmcUnlearner
from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.metrics import align_mixture_samples, knn_kl, thin
from mcmc_unlearner.samplers import run_chain, scale_lr


class PaperUnlearner(sgmcmcUnlearner):
    """The seed README's subclass: one SGLD step per ``_apply_sample``, ``model.F`` and ``model.h``."""

    def _apply_sample(self, z: Any) -> None:
        lo = self.model.F(z)
        self.optimizer.zero_grad()
        lo.backward()
        self.optimizer.step()

    def _fun(self, z: Any) -> torch.Tensor:
        return self.model.F(z)

    def _z_fun(self, z: Any) -> torch.Tensor:
        return self.model.h(z)


def energy(model: nn.Module, batch: tuple[torch.Tensor, ...], n: int) -> torch.Tensor:
    """``F = −log prior + n/|B|·Σ nll``, for models with ``log_prior`` and ``nll``."""
    return model.nll(batch).sum() * (n / batch[0].shape[0]) - model.log_prior()


def _clone_chain(model: nn.Module, sampler: torch.optim.Optimizer, make_sampler: Callable) -> tuple:
    import copy

    m = copy.deepcopy(model)
    s = make_sampler(m.parameters())
    s.load_state_dict(copy.deepcopy(sampler.state_dict()))
    return m, s


def run_paper(
    model: nn.Module,
    sampler: torch.optim.Optimizer,
    data: RemovableDataset,
    bank: torch.Tensor,
    requests: Sequence[torch.Tensor],
    iter_T: int,
    samp_T: int,
    init_scaling: float,
) -> dict[str, Any]:
    """The paper's procedure over a request sequence; returns timings and the Algorithm-1 shifted bank."""
    un = PaperUnlearner(
        model=model, optimizer=sampler, params=model.parameters(), cpu=True, iter_T=iter_T, samp_T=samp_T
    )
    bank = bank.clone()
    seconds = []
    for ids in requests:
        t0 = time.perf_counter()
        batch = data.get(ids)
        n_old = len(data)
        data.remove(ids)  # the paper's remaining sampler; its F uses model.n = remaining points
        model.n = len(data)
        un.param_dict["scaling"] = init_scaling / len(data)
        res = un.remove(list(batch), data)
        bank += res.x  # Algorithm 1: every stored sample moves by the same shift
        scale_lr(sampler, n_old / len(data))
        seconds.append(time.perf_counter() - t0)
    return {"seconds": seconds, "bank": bank}


def run_ours(un: MCMCUnlearner, data: RemovableDataset, requests: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Our unlearner over a request sequence."""
    seconds, reports = [], []
    for ids in requests:
        t0 = time.perf_counter()
        reports.append(un.forget(ids, data))
        seconds.append(time.perf_counter() - t0)
    return {"seconds": seconds, "bank": un.bank, "reports": reports}


def warm_then_time(run: Callable[[Sequence[torch.Tensor]], dict], requests: Sequence[torch.Tensor]) -> dict:
    """``run(requests[:1])`` on a fresh copy of the state (untimed warm-up: first-call costs of torch's
    dispatch, allocator and ``torch.func`` transforms), then ``run(requests)`` from the same start, timed."""
    run(requests[:1])
    return run(requests)


#: Per-case numbers compared as ours ÷ paper (time: lower is faster; accuracy measures: lower is better).
RATIO_KEYS = ("seconds_per_request", "seconds_total", "undone", "kl_to_retrain", "test_kept_error")


def ratios(paper: dict[str, Any], ours: dict[str, Any]) -> dict[str, float]:
    """``ours / paper`` for every measure both report (a removed-set error is compared by its gap instead)."""
    out = {k: ours[k] / paper[k] for k in RATIO_KEYS if k in ours and k in paper and paper[k]}
    if "removed_error" in ours and "removed_error" in paper:
        out["removed_error_difference"] = ours["removed_error"] - paper["removed_error"]
    return out


def _timing(seconds: list[float]) -> dict[str, float]:
    return {
        "seconds_per_request": statistics.median(seconds),
        "seconds_total": float(sum(seconds)),
        "requests": len(seconds),
    }


# ----------------------------------------------------------------------------------------------- cases
def case_conjugate(quick: bool) -> dict[str, Any]:
    """Bayesian linear regression, 5% of the points removed; exact posterior known in closed form."""
    from mcmc_unlearner.models.linreg import MultiChainLinearRegression, exact_posterior

    n, d, chains = 2000, 10, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, generator=g) + torch.randn(n, generator=g)
    removed = torch.argsort(y, descending=True)[: n // 20]  # 5%: the largest targets (a biased removal)
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    m0, c0 = exact_posterior(x, y)
    m1, _ = exact_posterior(x[keep], y[keep])
    delta = m1 - m0
    requests = list(removed.split(10))

    def setup():
        model = MultiChainLinearRegression(chains, d, n=n)
        model.start_at(m0, c0, torch.Generator().manual_seed(1))
        sampler = SGLD(model.parameters(), lr=0.001 / n, generator=torch.Generator().manual_seed(2))
        data = RemovableDataset(x, y, batch_size=64, seed=3)
        bank = run_chain(model, sampler, data, energy, 100, n, keep_every=1)
        return model, sampler, data, bank

    def undone(bank_before: torch.Tensor, bank_after: torch.Tensor) -> float:
        mean = lambda b: b.reshape(-1, chains, d).mean((0, 1)).double()  # noqa: E731
        return float((delta - (mean(bank_after) - mean(bank_before))).norm() / delta.norm())

    def paper_run(reqs):
        model, sampler, data, bank = setup()
        return run_paper(model, sampler, data, bank, reqs, iter_T=32, samp_T=5, init_scaling=1.0)

    def ours_run(reqs):
        model, sampler, data, bank = setup()
        # a linear-Gaussian model's Hessian does not depend on θ: 4 draws (each with all remaining points) suffice
        un = MCMCUnlearner(model, sampler, bank=bank, solver="exact", refresh_every=len(requests), curvature_draws=4)
        return run_ours(un, data, reqs)

    bank = setup()[3]
    paper = warm_then_time(paper_run, requests)
    ours = warm_then_time(ours_run, requests)
    return {
        "setup": f"n={n}, d={d}, {chains} chains x 100 stored samples, remove {len(removed)} (5%) in requests of 10",
        "paper": {**_timing(paper["seconds"]), "undone": undone(bank, paper["bank"]), "iter_T": 32, "samp_T": 5},
        "ours": {**_timing(ours["seconds"]), "undone": undone(bank, ours["bank"]), "solver": "exact"},
    }


def case_gmm(quick: bool) -> dict[str, Any]:
    """The paper's Gaussian mixture: 800 of 2,000 points removed in 200 requests of 4."""
    from mcmc_unlearner.datasets import gmm_removal_indices, make_gmm_2d
    from mcmc_unlearner.models.gmm import GaussianMixture

    xs, ys = make_gmm_2d()
    x, y = torch.from_numpy(xs), torch.from_numpy(ys)
    removed = torch.from_numpy(gmm_removal_indices(xs, ys))
    requests = list(removed[torch.randperm(removed.numel(), generator=torch.Generator().manual_seed(0))].split(4))
    steps = 2000 if quick else 4000
    n = x.shape[0]

    def chain(data: RemovableDataset, seed: int):
        model = GaussianMixture(generator=torch.Generator().manual_seed(seed), n=len(data))
        sampler = SGLD(model.parameters(), lr=4.0 / len(data), generator=torch.Generator().manual_seed(seed + 1))
        sched = lambda t: 4.0 / len(data) * (t + 1) ** -0.5005  # noqa: E731
        run_chain(model, sampler, data, energy, steps, len(data), lr_schedule=sched)
        bank = run_chain(
            model, sampler, data, energy, steps, len(data), lr_schedule=lambda t: sched(t + steps), keep_every=1
        )
        return model, sampler, bank

    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    kept = torch.nonzero(keep).flatten()
    t0 = time.perf_counter()
    _, _, retrain = chain(RemovableDataset(x[kept], y[kept], batch_size=64, seed=10), seed=20)
    retrain_seconds = time.perf_counter() - t0
    _, _, retrain_b = chain(RemovableDataset(x[kept], y[kept], batch_size=64, seed=11), seed=30)
    ref = retrain.reshape(-1, 4, 2).mean(0).numpy()

    def kl(bank: torch.Tensor) -> float:
        s = align_mixture_samples(bank.reshape(-1, 4, 2).numpy(), ref)
        return knn_kl(thin(s.reshape(len(s), -1), 10), thin(retrain.numpy(), 10))

    data0 = RemovableDataset(x, y, batch_size=64, seed=0)
    model, sampler, bank = chain(data0, seed=0)
    make = lambda p: SGLD(p, lr=1.0, generator=torch.Generator().manual_seed(5))  # noqa: E731

    def paper_run(reqs):
        m_p, s_p = _clone_chain(model, sampler, make)
        d_p = RemovableDataset(x, y, batch_size=64, seed=0)
        return run_paper(m_p, s_p, d_p, bank, reqs, iter_T=32, samp_T=5, init_scaling=1.0)

    def ours_run(reqs):
        m_o, s_o = _clone_chain(model, sampler, make)
        d_o = RemovableDataset(x, y, batch_size=64, seed=0)
        # the demo's default (mcmc-unlearner demo): dense Hessian on all remaining points at 4 bank draws, rebuilt
        # every 10 requests; G from 256 evenly spaced bank samples; exact Gaussian transport of the bank
        un = MCMCUnlearner(
            m_o, s_o, bank=bank, solver="exact", bank_shift="affine", refresh_every=10, curvature_draws=4,
            grad_draws=256, curvature_data="full",
        )  # fmt: skip
        return run_ours(un, d_o, reqs)

    paper = warm_then_time(paper_run, requests)
    ours = warm_then_time(ours_run, requests)
    floor = kl(retrain_b)
    return {
        "setup": f"2,000 points, remove 800 in {len(requests)} requests of 4; chains {steps}+{steps} SGLD steps",
        "retrain_seconds": retrain_seconds,
        "kl_noise_floor": floor,
        "kl_origin": kl(bank),
        "paper": {**_timing(paper["seconds"]), "kl_to_retrain": kl(paper["bank"]), "iter_T": 32, "samp_T": 5},
        "ours": {
            **_timing(ours["seconds"]),
            "kl_to_retrain": kl(ours["bank"]),
            "solver": "exact",
            "bank_shift": "affine",
        },
    }


def _digits_setup(quick: bool) -> dict[str, Any]:
    from mcmc_unlearner.image_data import load_dataset

    ds = load_dataset("digits", seed=0)
    explore, sample, bank_size = (500, 3000, 100) if quick else (1000, 9000, 200)
    return {"ds": ds, "explore": explore, "sample": sample, "bank_size": bank_size}


def _digits_chain(setup: dict[str, Any], data: RemovableDataset, seed: int):
    """The BNN experiment's defaults: plain SGD on the mean loss (lr 0.3), then SGLD at (1.0/n)·t^−0.5005."""
    from mcmc_unlearner.models.bnn import build_model

    ds, n = setup["ds"], len(data)
    torch.manual_seed(seed)
    model = build_model("digits_net", ds.in_shape, ds.n_classes)
    model.n = n
    sgd = torch.optim.SGD(model.parameters(), lr=0.3 / n)
    run_chain(model, sgd, data, energy, setup["explore"], n)
    sampler = SGLD(model.parameters(), lr=1.0 / n, generator=torch.Generator().manual_seed(seed))
    sched = lambda t: 1.0 / n * (t + 1) ** -0.5005  # noqa: E731
    every = setup["sample"] // setup["bank_size"]
    bank = run_chain(model, sampler, data, energy, setup["sample"], n, lr_schedule=sched, keep_every=every)
    return model, sampler, bank


def _digits_ours(model, sampler, bank, variant: str = "kfac") -> MCMCUnlearner:
    """The BNN experiment's default (``kfac``), or the damped-CG alternative (``cg``) reported beside it.

    kfac: Kronecker-factored curvature of the remaining-data energy (exact expectation over labels, 8 bank draws,
    damping 300), built at the first request and reused; G from 24 evenly spaced bank samples; the residual
    (drift) check on 2 of the 8 draws. cg: damped
    Newton-CG to 1e-2 on the Hessian at 8 draws (truncated at negative curvature), preconditioned by a reused
    Lanczos rank-20 approximation; G over the whole bank.
    """
    if variant == "kfac":
        cfg = dict(solver="kfac", damping=300.0, refresh_every=10**6, curvature_draws=8, grad_draws=24, check_draws=2)
    else:
        cfg = dict(solver="cg", damping=300.0, tol=1e-2, precondition_rank=20, refresh_every=10**6, curvature_draws=8)
        cfg.update(negative_curvature="truncate")
    return MCMCUnlearner(model, sampler, bank=bank, **cfg)


def case_digits(quick: bool) -> dict[str, Any]:
    """A Bayesian CNN on scikit-learn's digits; forget all of class 0 in requests of 64."""
    from mcmc_unlearner.models.bnn import build_model

    setup = _digits_setup(quick)
    ds = setup["ds"]
    x, y = ds.x_train, ds.y_train
    n = x.shape[0]
    removed = torch.nonzero(y == 0).flatten()
    requests = list(removed.split(64))
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    kept = torch.nonzero(keep).flatten()
    t0 = time.perf_counter()
    _, _, retrain = _digits_chain(setup, RemovableDataset(x[kept], y[kept], batch_size=128, seed=1), seed=11)
    retrain_seconds = time.perf_counter() - t0
    _, _, retrain_b = _digits_chain(setup, RemovableDataset(x[kept], y[kept], batch_size=128, seed=2), seed=12)
    model, sampler, bank = _digits_chain(setup, RemovableDataset(x, y, batch_size=128, seed=0), seed=10)
    evaluator = build_model("digits_net", ds.in_shape, ds.n_classes)
    test_kept = ds.y_test != 0

    def errors(bank_: torch.Tensor) -> dict[str, float]:
        p_rem = p_test = 0
        for theta in bank_:
            ParamSpec.assign(evaluator, theta)
            with torch.no_grad():
                p_rem = p_rem + torch.softmax(evaluator(x[removed]), -1)
                p_test = p_test + torch.softmax(evaluator(ds.x_test[test_kept]), -1)
        return {
            "removed_error": float((p_rem.argmax(-1) != y[removed]).float().mean()),
            "test_kept_error": float((p_test.argmax(-1) != ds.y_test[test_kept]).float().mean()),
        }

    make = lambda p: SGLD(p, lr=1.0, generator=torch.Generator().manual_seed(5))  # noqa: E731

    def paper_run(reqs):
        m_p, s_p = _clone_chain(model, sampler, make)
        return run_paper(m_p, s_p, RemovableDataset(x, y, batch_size=128, seed=0), bank, reqs, 64, 1, 0.05)

    def ours_run(reqs, variant="kfac"):
        m_o, s_o = _clone_chain(model, sampler, make)
        return run_ours(_digits_ours(m_o, s_o, bank, variant), RemovableDataset(x, y, batch_size=128, seed=0), reqs)

    paper = warm_then_time(paper_run, requests)
    ours = warm_then_time(ours_run, requests)
    alt = warm_then_time(lambda reqs: ours_run(reqs, "cg"), requests)
    return {
        "setup": f"digits_net ({bank.shape[1]} params), n={n}, remove class 0 ({len(removed)}) in requests of 64; "
        f"{setup['explore']} SGD + {setup['sample']} SGLD steps, bank {bank.shape[0]}",
        "retrain_seconds": retrain_seconds,
        "kl_noise_floor": knn_kl(retrain_b.numpy(), retrain.numpy()),
        "kl_origin": knn_kl(bank.numpy(), retrain.numpy()),
        **{f"{k}_retrain": v for k, v in errors(retrain).items()},
        **{f"{k}_origin": v for k, v in errors(bank).items()},
        "paper": {
            **_timing(paper["seconds"]),
            "kl_to_retrain": knn_kl(paper["bank"].numpy(), retrain.numpy()),
            **errors(paper["bank"]),
        },
        "ours": {
            **_timing(ours["seconds"]),
            "kl_to_retrain": knn_kl(ours["bank"].numpy(), retrain.numpy()),
            **errors(ours["bank"]),
            "residuals": [r.residual for r in ours["reports"]],
        },
        "ours_cg": {
            **_timing(alt["seconds"]),
            "kl_to_retrain": knn_kl(alt["bank"].numpy(), retrain.numpy()),
            **errors(alt["bank"]),
            "residuals": [r.residual for r in alt["reports"]],
        },
    }


def _digits_memory_phase(phase: str, quick: bool) -> None:
    """Child process body for --memory: train only, or train then unlearn with our default."""
    setup = _digits_setup(quick)
    x, y = setup["ds"].x_train, setup["ds"].y_train
    model, sampler, bank = _digits_chain(setup, RemovableDataset(x, y, batch_size=128, seed=0), seed=10)
    if phase == "unlearn":
        data = RemovableDataset(x, y, batch_size=128, seed=0)
        run_ours(_digits_ours(model, sampler, bank), data, list(torch.nonzero(y == 0).flatten().split(64)))


def measure_memory(quick: bool, threads: int) -> dict[str, Any]:
    """Peak resident memory (ru_maxrss of a child process) of training alone vs training + unlearning."""
    import os
    import subprocess

    peaks = {}
    for phase in ("train", "unlearn"):
        cmd = [sys.executable, __file__, "--memory-phase", phase, "--threads", str(threads)] + (["--quick"] * quick)
        proc = subprocess.Popen(cmd)
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise RuntimeError(f"memory phase {phase} failed with status {status}")
        peaks[phase] = usage.ru_maxrss / 1024  # KiB -> MiB on Linux
    return {
        "train_peak_mib": peaks["train"],
        "unlearn_peak_mib": peaks["unlearn"],
        "ratio": peaks["unlearn"] / peaks["train"],
    }


CASES = {"conjugate": case_conjugate, "gmm": case_gmm, "digits": case_digits}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter chains (same request sequences)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run fastest on 1)")
    p.add_argument("--memory", action="store_true", help="also measure peak memory of the digits case (2 processes)")
    p.add_argument("--memory-phase", choices=("train", "unlearn"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_phase:
        _digits_memory_phase(args.memory_phase, args.quick)
        return 0
    out: dict[str, Any] = {
        "version": mcmc_unlearner.__version__,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "threads": args.threads,
        "quick": args.quick,
        "cases": {},
    }
    for name in args.cases.split(","):
        t0 = time.perf_counter()
        print(f"[{name}] running ...", file=sys.stderr, flush=True)
        res = CASES[name](args.quick)
        res["speedup"] = res["paper"]["seconds_per_request"] / res["ours"]["seconds_per_request"]
        res["ratios_ours_over_paper"] = ratios(res["paper"], res["ours"])
        if "ours_cg" in res:
            res["speedup_cg"] = res["paper"]["seconds_per_request"] / res["ours_cg"]["seconds_per_request"]
        res["wall_seconds"] = time.perf_counter() - t0
        out["cases"][name] = res
        print(f"\n== {name}: {res['setup']}")
        for key in ("paper", "ours", "ours_cg"):
            if key not in res:
                continue
            r = res[key]
            acc = {k: v for k, v in r.items() if k in ("undone", "kl_to_retrain", "removed_error", "test_kept_error")}
            accs = ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
            per, total = r["seconds_per_request"] * 1e3, r["seconds_total"]
            print(f"  {key:9s} median {per:9.2f} ms/request, total {total:8.2f} s, {accs}")
        extra = {
            k: v for k, v in res.items() if k.startswith(("kl_", "removed_error_", "test_kept_", "retrain_seconds"))
        }
        if extra:
            print("  " + ", ".join(f"{k} {v:.3f}" for k, v in extra.items()))
        print(f"  speedup (paper / ours, median per request): {res['speedup']:.1f}x")
        if "speedup_cg" in res:
            print(f"  speedup (paper / ours_cg, median per request): {res['speedup_cg']:.1f}x")
        print("  ours / paper: " + ", ".join(f"{k} {v:.3g}" for k, v in res["ratios_ours_over_paper"].items()))
    if args.memory:
        out["memory"] = mem = measure_memory(args.quick, args.threads)
        print(
            f"\n== memory (digits): peak RSS train {mem['train_peak_mib']:.0f} MiB, train + unlearn "
            f"{mem['unlearn_peak_mib']:.0f} MiB, ratio {mem['ratio']:.2f}"
        )
    if args.json:

        def clean(o):
            if isinstance(o, dict):
                return {k: clean(v) for k, v in o.items() if not isinstance(v, torch.Tensor)}
            if isinstance(o, (list, tuple)):
                return [clean(v) for v in o]
            if isinstance(o, (np.floating, np.integer)):
                return o.item()
            return o

        with open(args.json, "w") as f:
            json.dump(clean(out), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
