r"""The paper's Gaussian-mixture experiment end to end: ``mcmc-unlearner demo``.

Fu, He & Tao (ICLR 2022), Sec. 6.1: a 4-component, unit-variance Gaussian mixture (prior N(0, 1) on the
means) is sampled with SG-MCMC on 2,000 2-D points; 800 points (the tails of clusters 0 and 2) are then
removed in 200 sequential deletion requests of 4 points. Every run compares six sample sets of the
8-D cluster-mean parameter, all aligned to the retrained chain's labels (Hungarian matching):

* ``origin``: the chain on all data (what we start from);
* ``retrain``: a chain on the remaining data only (the target);
* ``retrain-b``: a second independent retrain chain; its KL to ``retrain`` is the noise floor;
* ``unlearn``: the origin chain's stored samples after MCMC unlearning (Algorithm 1: every stored sample is
  moved, no new sampling);
* ``unlearn-continued``: the live chain after the last request, sampling on the remaining data again;
* ``finetune``: plain SG-MCMC on the remaining data from the origin state, for the wall time ``unlearn``
  took (no influence step), then the same number of kept samples as the others.

Distances are 1-NN KL estimates (:func:`mcmc_unlearner.metrics.knn_kl`) on thinned chains, always read
against the noise floor (two chains of the same posterior do not score 0).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..curvature import ParamSpec
from ..data import RemovableDataset
from ..datasets import gmm_removal_indices, make_gmm_2d
from ..metrics import align_mixture_samples, knn_kl, thin
from ..models.gmm import GaussianMixture
from ..samplers import SGHMC, SGLD
from ..unlearner import MCMCUnlearner
from .report import Stopwatch, fmt, markdown_table, prepare_out_dir, save_figure, summarize, write_json, write_text

__all__ = ["METHODS", "gmm_energy", "register", "run_demo"]

#: Methods compared in every run, in report order.
METHODS = ("origin", "retrain", "retrain-b", "unlearn", "unlearn-continued", "finetune")

_DESCRIPTIONS = {
    "origin": "chain on all 2,000 points (before any deletion)",
    "retrain": "new chain on the remaining points: the target",
    "retrain-b": "second independent retrain chain: the noise floor",
    "unlearn": "origin's stored samples after MCMC unlearning (no new sampling)",
    "unlearn-continued": "live chain after unlearning, sampling on the remaining points",
    "finetune": "origin chain + plain SG-MCMC on the remaining points for unlearn's wall time",
}

#: Reference implementation (paper's code) on a 2-core CPU, for context in the report.
_PAPER = {
    "unlearn_seconds": 68.0,
    "retrain_seconds": 11.0,
    "seconds_per_request": 0.31,
    "kl_unlearn_continued_unthinned": 16.3,
    "kl_floor_unthinned": 15.1,
    "kl_origin_unthinned": 34.9,
    "kl_finetune_4k_unthinned": 19.6,
}


def gmm_energy(model: nn.Module, batch: tuple[torch.Tensor, ...], n: int) -> torch.Tensor:
    """Minibatch energy ``F = −log p(μ) + (n/|B|)·Σ_B −log p(x|μ)``."""
    return model.nll(batch).sum() * (n / batch[0].shape[0]) - model.log_prior()


def _lr_schedule(n: int, lr0: float, decay: float, offset: int) -> Callable[[int], float]:
    """Step size ``lr0/n · (t + offset + 1)^(−decay)`` (the paper's polynomial decay)."""
    return lambda t: lr0 / n * (t + offset + 1) ** (-decay)


@dataclass
class _Chain:
    model: GaussianMixture
    sampler: torch.optim.Optimizer
    data: RemovableDataset
    samples: torch.Tensor  # [S, 8]
    seconds: float
    steps: int


def _make_sampler(kind: str, model: nn.Module, lr: float, alpha: float, gen: torch.Generator) -> torch.optim.Optimizer:
    if kind == "sgld":
        return SGLD(model.parameters(), lr=lr, generator=gen)
    if kind == "sghmc":
        return SGHMC(model.parameters(), lr=lr, alpha=alpha, generator=gen)
    raise ValueError(f"unknown sampler {kind!r}; choose 'sgld' or 'sghmc'")


def _run_steps(
    model: nn.Module,
    sampler: torch.optim.Optimizer,
    data: RemovableDataset,
    steps: int | None,
    schedule: Callable[[int], float],
    *,
    keep: bool,
    seconds: float | None = None,
    desc: str | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor | None, int]:
    """SG-MCMC steps on ``gmm_energy`` for ``steps`` steps or until ``seconds`` of wall time have passed."""
    from tqdm.auto import tqdm

    n = len(data)
    params = [p for p in model.parameters() if p.requires_grad]
    kept: list[torch.Tensor] = []
    bar = tqdm(total=steps, desc=desc, leave=False, mininterval=0.5, disable=not progress)
    t0 = time.perf_counter()
    t = 0
    while (steps is None or t < steps) and (seconds is None or time.perf_counter() - t0 < seconds):
        lr = schedule(t)
        for group in sampler.param_groups:
            group["lr"] = lr
        sampler.zero_grad(set_to_none=False)
        gmm_energy(model, next(data), n).backward()
        sampler.step()
        if keep:
            kept.append(torch.cat([p.detach().reshape(-1) for p in params]))
        t += 1
        bar.update(1)
    bar.close()
    sampler.zero_grad()
    return (torch.stack(kept) if kept else None), t


def _chain(
    x: torch.Tensor,
    removed: torch.Tensor | None,
    kind: str,
    seed: int,
    burnin: int,
    samples: int,
    batch_size: int,
    lr0: float,
    decay: float,
    alpha: float,
    label: str,
    progress: bool,
) -> _Chain:
    """A fresh chain from a prior draw: ``burnin`` steps, then ``samples`` kept steps (decaying step size)."""
    gen = torch.Generator().manual_seed(seed)
    model = GaussianMixture(k=4, dim=2, prior_std=1.0, generator=gen)
    data = RemovableDataset(x, batch_size=batch_size, seed=seed)
    if removed is not None:
        data.remove(removed)
    n = len(data)
    model.n = n
    sampler = _make_sampler(kind, model, lr0 / n, alpha, gen)
    t0 = time.perf_counter()
    _run_steps(model, sampler, data, burnin, _lr_schedule(n, lr0, decay, 0), keep=False,
               desc=f"{label}: burn-in", progress=progress)  # fmt: skip
    kept, _ = _run_steps(model, sampler, data, samples, _lr_schedule(n, lr0, decay, burnin), keep=True,
                         desc=f"{label}: sampling", progress=progress)  # fmt: skip
    return _Chain(model, sampler, data, kept, time.perf_counter() - t0, burnin + samples)


def _store_hook(path: str | Path, un: MCMCUnlearner, data: RemovableDataset, extra: dict[str, Any]) -> str:
    """Save the origin model through ``mcmc_unlearner.store.save_model`` when that function exists."""
    try:
        store = importlib.import_module("mcmc_unlearner.store")
    except ImportError:
        return "skipped: mcmc_unlearner.store is not available in this version"
    fn = getattr(store, "save_model", None)
    if fn is None:
        return "skipped: mcmc_unlearner.store.save_model is not available in this version"
    saved = fn(
        path,
        model=un.model,
        sampler=un.sampler,
        data=data,
        unlearner=un,
        model_spec=store.gmm_model_spec(un.model),
        data_spec=store.gmm_data_spec(data.n_total, fields=("x",)),
        extra=extra,
    )
    return f"saved the origin model (chain, sampler, {un.bank.shape[0]} stored samples, data state) to {saved}"


def _kl_block(p: np.ndarray, q: np.ndarray, every: int) -> tuple[float, float]:
    return knn_kl(thin(p, every), thin(q, every)), knn_kl(p, q)


def run_demo(
    sampler: str = "sgld",
    seed: int = 0,
    out: str | Path | None = None,
    request_size: int = 4,
    burnin: int = 4000,
    samples: int = 4000,
    thin: int = 10,
    *,
    n: int = 2000,
    per_cluster: int = 400,
    batch_size: int = 64,
    lr0: float = 4.0,
    decay: float = 0.5005,
    alpha: float = 0.9,
    bank_shift: str = "affine",
    refresh_every: int = 10,
    curvature_draws: int = 4,
    grad_draws: int | None = 256,
    curvature_batch: int | None = None,
    save_model: str | Path | None = None,
    threads: int | None = 1,
    warmup: bool = True,
    progress: bool = True,
    write: bool = True,
) -> dict[str, Any]:
    """Run the GMM unlearning experiment and write ``metrics.json``, ``report.md`` and figures.

    Args:
        sampler: ``"sgld"`` or ``"sghmc"`` (friction ``alpha``).
        seed: Master seed (chains, shuffling and initialisation derive from it).
        out: Output folder (default: a fresh ``runs/demo-<sampler>-<timestamp>``).
        request_size: Points per deletion request (800 points → ``800 / request_size`` requests).
        burnin: Burn-in steps of every fresh chain.
        samples: Kept samples per chain (also the ``unlearn-continued`` and ``finetune`` sampling phases).
        thin: Keep every ``thin``-th sample for the KL estimates (autocorrelation inflates the estimator).
        n: Data-set size (the paper: 2,000).
        per_cluster: Removed points per cluster (clusters 0 and 2; the paper: 400).
        batch_size: Minibatch size of the chains.
        lr0: Step size ``lr0/n · (t+1)^(−decay)``.
        decay: Step-size decay exponent.
        alpha: SGHMC friction.
        bank_shift: Unlearner's bank update (``"affine"``, ``"mean"`` or ``"sample"``).
        refresh_every: Requests between rebuilds of the dense remaining-data Hessian.
        curvature_draws: Bank samples averaged for the Hessian.
        grad_draws: Bank samples averaged for the removed points' gradient (``None``: all).
        curvature_batch: Minibatch size for Hessian rebuilds (``None``: all remaining points).
        save_model: Folder to save the origin model through ``mcmc_unlearner.store.save_model`` (if present).
        threads: Torch intra-op threads during the run (restored afterwards). The model has 8 parameters,
            so one thread is fastest; extra threads only add synchronisation (and stall on a busy machine).
            ``None`` keeps the current setting.
        warmup: Run one throw-away deletion request on copies before timing ``unlearn``, so the one-time
            start-up of ``torch.func`` (first trace, lazy imports) is reported apart (``warmup_seconds``).
        progress: Show progress bars.
        write: Write the output folder (``False``: only return the metrics).

    Returns:
        The metrics dict (as written to ``metrics.json``).
    """
    if request_size < 1:
        raise ValueError(f"--request-size must be >= 1, got {request_size}")
    if thin < 1 or samples // thin < 10:
        raise ValueError(f"thin={thin} leaves {samples // max(thin, 1)} samples; need >= 10 for the KL estimate")
    if burnin < 0 or samples < 1:
        raise ValueError(f"burn-in must be >= 0 and samples >= 1, got {burnin} and {samples}")
    kind = sampler.lower()
    if kind not in ("sgld", "sghmc"):
        raise ValueError(f"unknown sampler {sampler!r}; choose 'sgld' or 'sghmc'")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None), got {threads}")
    out_dir = prepare_out_dir(out, f"demo-{kind}") if write else None
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(
            kind, seed, request_size, burnin, samples, thin, n=n, per_cluster=per_cluster, batch_size=batch_size,
            lr0=lr0, decay=decay, alpha=alpha, bank_shift=bank_shift, refresh_every=refresh_every,
            curvature_draws=curvature_draws, grad_draws=grad_draws, curvature_batch=curvature_batch,
            save_model=save_model, warmup=warmup, progress=progress, out_dir=out_dir,
        )  # fmt: skip
    finally:
        torch.set_num_threads(old_threads)


def _run(
    kind: str,
    seed: int,
    request_size: int,
    burnin: int,
    samples: int,
    thin: int,
    *,
    n: int,
    per_cluster: int,
    batch_size: int,
    lr0: float,
    decay: float,
    alpha: float,
    bank_shift: str,
    refresh_every: int,
    curvature_draws: int,
    grad_draws: int | None,
    curvature_batch: int | None,
    save_model: str | Path | None,
    warmup: bool,
    progress: bool,
    out_dir: Path | None,
) -> dict[str, Any]:
    """The body of :func:`run_demo` (arguments validated, thread count set)."""
    t_start = time.perf_counter()
    sw = Stopwatch()

    x_np, y_np = make_gmm_2d(n)
    rem_np = gmm_removal_indices(x_np, y_np, per_cluster=per_cluster)
    x = torch.from_numpy(x_np)
    removed = torch.from_numpy(rem_np)
    n_rem = n - removed.numel()
    chain_args = dict(kind=kind, burnin=burnin, samples=samples, batch_size=batch_size, lr0=lr0, decay=decay,
                      alpha=alpha, progress=progress)  # fmt: skip

    # ---------------------------------------------------------------- chains
    origin = _chain(x, None, seed=1000 * seed + 1, label="origin", **chain_args)
    origin_velocity = _velocity_snapshot(origin)  # before unlearning moves on with the live chain
    retrain = _chain(x, removed, seed=1000 * seed + 2, label="retrain", **chain_args)
    retrain_b = _chain(x, removed, seed=1000 * seed + 3, label="retrain-b", **chain_args)

    unlearn_cfg = dict(solver="exact", expectation="bank", hessian="remaining", bank_shift=bank_shift,
                       refresh_every=refresh_every, curvature_draws=curvature_draws, grad_draws=grad_draws,
                       curvature_batch=curvature_batch if curvature_batch is not None else "all remaining",
                       rescale_lr=True)  # fmt: skip

    # ---------------------------------------------------------------- unlearning (Algorithm 1 on the bank)
    from tqdm.auto import tqdm

    model, data = origin.model, origin.data
    core_cfg = {k: v for k, v in unlearn_cfg.items() if k != "curvature_batch"}
    core_cfg["curvature_data"] = "full" if curvature_batch is None else "minibatch"
    un = MCMCUnlearner(model, origin.sampler, bank=origin.samples, **core_cfg)  # default energy == gmm_energy
    store_note = None
    if save_model is not None:
        extra = {"experiment": "gmm-demo", "sampler": kind, "seed": seed, "removal_ids": "gmm_removal_indices"}
        store_note = _store_hook(save_model, un, data, extra)
        print(f"mcmc-unlearner demo: --save-model: {store_note}", file=sys.stderr)

    order = removed[torch.randperm(removed.numel(), generator=torch.Generator().manual_seed(1000 * seed + 4))]
    chunks = list(torch.split(order, request_size))
    warmup_seconds = _warm_up(model, origin, x, removed, chunks[0], unlearn_cfg) if warmup else 0.0
    if curvature_batch is not None:
        data.batch_size = curvature_batch  # curvature minibatches only
    reports = []
    t0 = time.perf_counter()
    for ids in tqdm(chunks, desc="unlearn: deletion requests", leave=False, mininterval=0.5, disable=not progress):
        reports.append(un.forget(ids, data))
    unlearn_seconds = time.perf_counter() - t0
    data.batch_size = batch_size
    unlearn_bank = un.bank.clone()

    # ---------------------------------------------------------------- continued chain and fine-tuning
    steps_done = burnin + samples
    with sw("unlearn-continued"):
        cont, _ = _run_steps(model, un.sampler, data, samples, _lr_schedule(n_rem, lr0, decay, steps_done),
                             keep=True, desc="unlearn-continued: sampling", progress=progress)  # fmt: skip

    ft_model = GaussianMixture(k=4, dim=2, init=origin.samples[-1].view(4, 2))
    ft_model.n = n_rem
    ft_data = RemovableDataset(x, batch_size=batch_size, seed=1000 * seed + 5)
    ft_data.remove(removed)
    ft_gen = torch.Generator().manual_seed(1000 * seed + 6)
    ft_sampler = _make_sampler(kind, ft_model, lr0 / n_rem, alpha, ft_gen)
    if origin_velocity is not None:  # SGHMC: the fine-tuned chain continues the origin chain's velocity
        ft_sampler.state[ft_model.means]["momentum_buffer"] = origin_velocity.clone()
    with sw("finetune"):
        _, ft_steps = _run_steps(ft_model, ft_sampler, ft_data, None, _lr_schedule(n_rem, lr0, decay, steps_done),
                                 keep=False, seconds=unlearn_seconds, desc="finetune: adapting",
                                 progress=progress)  # fmt: skip
        ft_samples, _ = _run_steps(ft_model, ft_sampler, ft_data, samples,
                                   _lr_schedule(n_rem, lr0, decay, steps_done + ft_steps), keep=True,
                                   desc="finetune: sampling", progress=progress)  # fmt: skip

    # ---------------------------------------------------------------- evaluation
    ref_means = retrain.samples.view(-1, 4, 2).mean(0).numpy()

    def aligned(s: torch.Tensor) -> np.ndarray:
        return align_mixture_samples(s.view(-1, 4, 2).numpy().astype(np.float64), ref_means).reshape(s.shape[0], -1)

    sets = {
        "origin": aligned(origin.samples),
        "retrain": aligned(retrain.samples),
        "retrain-b": aligned(retrain_b.samples),
        "unlearn": aligned(unlearn_bank),
        "unlearn-continued": aligned(cont),
        "finetune": aligned(ft_samples),
    }
    seconds = {
        "origin": origin.seconds,
        "retrain": retrain.seconds,
        "retrain-b": retrain_b.seconds,
        "unlearn": unlearn_seconds,
        "unlearn-continued": unlearn_seconds + sw.seconds["unlearn-continued"],
        "finetune": sw.seconds["finetune"],
    }
    q = sets["retrain"]
    q_mean, q_std = q.mean(0), q.std(0)
    methods: dict[str, dict[str, Any]] = {}
    for name in METHODS:
        s = sets[name]
        kl, kl_full = (None, None) if name == "retrain" else _kl_block(s, q, thin)
        methods[name] = {
            "kl_to_retrain": kl,
            "kl_to_retrain_unthinned": kl_full,
            "seconds": seconds[name],
            "n_samples": int(s.shape[0]),
            "mean_distance": float(np.linalg.norm(s.mean(0) - q_mean)),
            "mean_error_in_std": float(np.max(np.abs(s.mean(0) - q_mean) / q_std)),
            "std_ratio": float(np.exp(np.mean(np.log(s.std(0) / q_std)))),
            "description": _DESCRIPTIONS[name],
        }
    methods["retrain"]["note"] = "the target; its KL to itself is not estimated"
    methods["finetune"]["adapt_steps"] = ft_steps
    methods["finetune"]["adapt_seconds"] = unlearn_seconds
    methods["unlearn-continued"]["sampling_seconds"] = sw.seconds["unlearn-continued"]
    per_req = [r.seconds for r in reports]
    methods["unlearn"].update(
        {
            "seconds_per_request_median": float(np.median(per_req)),
            "n_requests": len(reports),
            "seconds_in_forget": float(sum(per_req)),
            "warmup_seconds": warmup_seconds,
        }
    )
    floor = methods["retrain-b"]["kl_to_retrain"]
    kl_un = methods["unlearn"]["kl_to_retrain"]
    kl_ft = methods["finetune"]["kl_to_retrain"]
    targets = {
        "unlearn_kl_within_1.2x_noise_floor": {
            "value": kl_un,
            "limit": 1.2 * floor if floor is not None and floor > 0 else None,
            "met": bool(floor is not None and floor > 0 and kl_un <= 1.2 * floor),
        },
        "unlearn_time_within_10pct_of_retrain": {
            "value": unlearn_seconds / retrain.seconds,
            "limit": 0.10,
            "met": bool(unlearn_seconds <= 0.10 * retrain.seconds),
        },
        "unlearn_kl_below_finetune_at_equal_time": {
            "value": kl_un,
            "limit": kl_ft,
            "met": bool(kl_un < kl_ft),
        },
    }
    mode_gap = float(np.max(np.linalg.norm((sets["retrain-b"].mean(0) - q_mean).reshape(4, 2), axis=1)))
    metrics: dict[str, Any] = {
        "experiment": "gmm",
        "version": __version__,
        "sampler": kind,
        "seed": seed,
        "n_train": n,
        "n_removed": int(removed.numel()),
        "n_remaining": n_rem,
        "request_size": request_size,
        "n_requests": len(chunks),
        "thin": thin,
        "noise_floor_kl": floor,
        "methods": methods,
        "targets": targets,
        "chain_config": {
            "burnin": burnin,
            "samples": samples,
            "batch_size": batch_size,
            "lr": f"{lr0}/n * (t+1)^-{decay}",
            "alpha": alpha if kind == "sghmc" else None,
            "init": "prior draw per chain (independent)",
        },
        "unlearn_config": {**unlearn_cfg, "request_order": "random permutation of the removed ids (seeded)"},
        "unlearn_requests": {
            "seconds": summarize(per_req),
            "residual": summarize([r.residual for r in reports]),
            "iterations": summarize([r.iterations for r in reports]),
            "shift_norm": summarize([r.shift_norm for r in reports]),
            "shift_stderr": summarize([r.shift_stderr for r in reports]),
            "converged_all": all(r.converged for r in reports),
            "hessian_rebuilds": sum(1 for r in reports if not r.info.get("hessian_reused", False)),
            "per_request": {
                "seconds": per_req,
                "residual": [r.residual for r in reports],
                "shift_norm": [r.shift_norm for r in reports],
                "shift_stderr": [r.shift_stderr for r in reports],
            },
        },
        "retrain_b_mode_gap": mode_gap,
        "save_model": store_note,
        "paper_reference": _PAPER,
        "platform": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
        },
    }
    metrics["total_seconds"] = time.perf_counter() - t_start
    if out_dir is not None:
        figs = _figures(out_dir, x_np, rem_np, sets, methods, floor, thin)
        metrics["figures"] = [p.name for p in figs]
        metrics["total_seconds"] = time.perf_counter() - t_start
        metrics["out_dir"] = str(out_dir)
        write_json(out_dir / "metrics.json", metrics)
        write_text(out_dir / "report.md", _report(metrics))
    return metrics


def _warm_up(
    model: nn.Module, origin: _Chain, x: torch.Tensor, removed: torch.Tensor, ids: torch.Tensor, cfg: dict
) -> float:
    """One throw-away request on copies (first ``torch.func`` trace and lazy imports); returns its seconds."""
    t0 = time.perf_counter()
    m = GaussianMixture(k=4, dim=2, init=ParamSpec.flatten_module(model).view(4, 2))
    data = RemovableDataset(x, batch_size=x.shape[0], seed=0)
    un = MCMCUnlearner(m, None, bank=origin.samples[:16], **{k: v for k, v in cfg.items() if k != "curvature_batch"})
    un.forget(ids, data)
    return time.perf_counter() - t0


def _velocity_snapshot(chain: _Chain) -> torch.Tensor | None:
    state = chain.sampler.state.get(chain.model.means, {})
    v = state.get("momentum_buffer")
    return None if v is None else v.detach().clone()


# -------------------------------------------------------------------- figures and report
def _figures(
    out_dir: Path,
    x: np.ndarray,
    removed: np.ndarray,
    sets: dict[str, np.ndarray],
    methods: dict[str, dict[str, Any]],
    floor: float | None,
    every: int,
) -> list[Path]:
    from matplotlib.figure import Figure

    keep = np.ones(len(x), dtype=bool)
    keep[removed] = False
    fig = Figure(figsize=(13, 8.5))
    axes = fig.subplots(2, 3, sharex=True, sharey=True)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    for ax, name in zip(axes.flat, METHODS):
        ax.scatter(x[keep, 0], x[keep, 1], s=3, c="0.75", label="remaining data")
        ax.scatter(x[removed, 0], x[removed, 1], s=6, c="tab:red", marker="x", linewidths=0.5, label="removed")
        s = thin(sets[name], every).reshape(-1, 4, 2)
        for k in range(4):
            ax.scatter(s[:, k, 0], s[:, k, 1], s=2, c=colors[k], alpha=0.6)
        kl = methods[name]["kl_to_retrain"]
        ax.set_title(f"{name}" + ("" if kl is None else f"  (KL {kl:.2f})"), fontsize=10)
    axes.flat[0].legend(loc="lower left", fontsize=7, markerscale=2)
    fig.suptitle("Samples of the 4 cluster means over the data (removed points: red ×)")
    p1 = save_figure(fig, out_dir / "samples.png")

    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    names = [m for m in METHODS if methods[m]["kl_to_retrain"] is not None]
    vals = [methods[m]["kl_to_retrain"] for m in names]
    ax.bar(names, vals, color=["0.6" if m != "unlearn" else "tab:green" for m in names])
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=1, label="noise floor (retrain-b)")
        ax.axhline(1.2 * floor, color="k", ls=":", lw=1, label="1.2 × noise floor")
        ax.legend(fontsize=8)
    ax.set_ylabel(f"1-NN KL to retrain (thinned ×{every})")
    ax.tick_params(axis="x", labelsize=8)
    p2 = save_figure(fig, out_dir / "kl.png")
    return [p1, p2]


def _report(m: dict[str, Any]) -> str:
    meth = m["methods"]
    tg = m["targets"]
    floor = m["noise_floor_kl"]
    un = meth["unlearn"]
    rows = [
        [
            name,
            meth[name]["kl_to_retrain"],
            meth[name]["kl_to_retrain_unthinned"],
            meth[name]["seconds"],
            meth[name]["std_ratio"],
            meth[name]["description"],
        ]
        for name in METHODS
    ]
    table = markdown_table(
        ["method", "KL to retrain ↓", "KL unthinned", "seconds", "spread / retrain", "what it is"], rows
    )

    def mark(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    t1, t2, t3 = (
        tg["unlearn_kl_within_1.2x_noise_floor"],
        tg["unlearn_time_within_10pct_of_retrain"],
        tg["unlearn_kl_below_finetune_at_equal_time"],
    )
    ur = m["unlearn_requests"]
    cfg = m["unlearn_config"]
    lines = [
        f"# MCMC unlearning on the 2-D Gaussian mixture ({m['sampler'].upper()}, seed {m['seed']})",
        "",
        f"{m['n_removed']} of {m['n_train']} points were removed in {m['n_requests']} deletion requests of "
        f"{m['request_size']}. Each row is a set of posterior samples of the 4 cluster means (8 numbers), "
        "compared with a chain retrained on the remaining data. **KL** is the 1-NN estimate of KL(method ‖ retrain) "
        f"in nats on chains thinned to every {m['thin']}th sample (lower is better); two independent chains of the "
        f"same posterior score about **{fmt(floor)}** (the noise floor, row `retrain-b`), not 0. "
        "**seconds** is wall time (for `unlearn`: all requests together; `unlearn-continued` adds its sampling).",
        "",
        table,
        "",
        "## Targets",
        "",
        f"- Unlearned samples within 1.2× the noise floor: {mark(t1['met'])} — KL {fmt(t1['value'])} vs "
        f"limit {fmt(t1['limit'])}.",
        f"- All {m['n_requests']} requests in at most 10% of retraining time: {mark(t2['met'])} — "
        f"{fmt(un['seconds'])} s = {100 * t2['value']:.0f}% of {fmt(meth['retrain']['seconds'])} s "
        f"(median {1000 * un['seconds_per_request_median']:.1f} ms per request).",
        f"- Better than fine-tuning for the same time: {mark(t3['met'])} — KL {fmt(t3['value'])} vs "
        f"{fmt(t3['limit'])} (`finetune` adapted for {meth['finetune']['adapt_steps']} steps in unlearn's "
        f"{fmt(un['seconds'])} s, then also drew {m['chain_config']['samples']} samples, so it had more time).",
        f"- Whole run: {fmt(m['total_seconds'])} s (target for the defaults: under 180 s on 2 cores).",
        "",
        "For comparison, the paper's code on the same CPU: 68 s to unlearn (0.31 s per request) vs 11 s to "
        "retrain; unthinned KL 16.3 after unlearning (+ continued sampling) vs noise floor 15.1, origin 34.9, "
        "4,000 fine-tuning steps 19.6.",
        "",
        "## How to read it",
        "",
        "- `spread / retrain` is the geometric mean over the 8 coordinates of the sample standard deviation "
        "relative to the retrained chain. Removing 800 points widens the posterior of the two thinned-out "
        "clusters; a plain shift keeps the old (too narrow) width. Finite chains mix slowly along the widened "
        "directions, so the retrain chains themselves can be narrower than the posterior they target.",
        f"- Thinning: KLs use every {m['thin']}th sample; consecutive SG-MCMC samples are strongly correlated, "
        "which inflates the 1-NN estimator (compare the unthinned column).",
        f"- Labels: each sample set is relabelled by Hungarian matching of its mean to the retrain chain's means. "
        f"Largest cluster-mean gap between the two retrain chains: {fmt(m['retrain_b_mode_gap'])}"
        + (
            " (the retrain chains found different modes: KLs are not comparable)."
            if m["retrain_b_mode_gap"] > 0.5
            else " (same mode)."
        ),
        "",
        "## Unlearning",
        "",
        f"`MCMCUnlearner(solver='exact', expectation='bank', hessian='remaining', bank_shift='{cfg['bank_shift']}', "
        f"curvature_draws={cfg['curvature_draws']}, grad_draws={cfg['grad_draws']}, "
        f"refresh_every={cfg['refresh_every']})`, Hessian rebuilt on {cfg['curvature_batch']} points "
        f"({ur['hessian_rebuilds']} rebuilds). Per request: median {1000 * ur['seconds']['median']:.1f} ms "
        f"(max {1000 * ur['seconds']['max']:.1f} ms), solver residual max {fmt(ur['residual']['max'])}, "
        f"shift norm median {fmt(ur['shift_norm']['median'])}, Monte-Carlo standard error of the shift median "
        f"{fmt(ur['shift_stderr']['median'])}; all solves converged: {fmt(ur['converged_all'])}.",
        "",
        "![samples](samples.png)",
        "",
        "![kl](kl.png)",
        "",
    ]
    if m.get("save_model"):
        lines += [f"--save-model: {m['save_model']}", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------- CLI
def _cmd_demo(args: argparse.Namespace) -> int:
    metrics = run_demo(
        sampler=args.sampler,
        seed=args.seed,
        out=args.out,
        request_size=args.request_size,
        burnin=args.burnin,
        samples=args.samples,
        thin=args.thin,
        save_model=args.save_model,
        progress=not args.quiet,
    )
    meth = metrics["methods"]
    print(f"wrote {metrics['out_dir']}/report.md, metrics.json, {', '.join(metrics['figures'])}")
    for name in METHODS:
        kl = meth[name]["kl_to_retrain"]
        print(f"  {name:18s} KL {'—' if kl is None else f'{kl:6.2f}'}   {meth[name]['seconds']:7.2f} s")
    for key, t in metrics["targets"].items():
        print(f"  target {key}: {'met' if t['met'] else 'MISSED'} ({fmt(t['value'])} vs {fmt(t['limit'])})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand (the paper's Gaussian-mixture experiment)."""
    from ..cli import add_quiet_flag, new_folder

    p = subparsers.add_parser(
        "demo",
        help="the paper's Gaussian-mixture experiment: unlearn 800 of 2,000 points, compare with retraining",
        description=(
            "Sample a 4-component Gaussian mixture with SG-MCMC, remove 800 points with MCMC unlearning and "
            "compare against retraining, a second retrain chain (noise floor) and fine-tuning. Writes "
            "metrics.json, report.md and PNG figures."
        ),
    )
    p.add_argument("--sampler", choices=("sgld", "sghmc"), default="sgld", help="SG-MCMC sampler (default sgld)")
    p.add_argument("--out", default=None, help="output folder (default: a fresh runs/demo-<sampler>-<time>)")
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument("--request-size", type=int, default=4, help="points per deletion request (default 4)")
    p.add_argument(
        "--save-model",
        type=new_folder,
        default=None,
        metavar="DIR",
        help="also save the origin model to DIR (new/empty)",
    )
    p.add_argument("--burnin", type=int, default=4000, help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, default=4000, help=argparse.SUPPRESS)
    p.add_argument("--thin", type=int, default=10, help="thinning for the KL estimates (default 10)")
    add_quiet_flag(p, help="no progress bars")
    p.set_defaults(func=_cmd_demo)
