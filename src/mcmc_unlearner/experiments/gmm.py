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

**Distance to the exact posterior.** The model is conditionally conjugate, so a Gibbs sampler
(:func:`mcmc_unlearner.experiments.references.gmm_gibbs`) gives effectively independent draws of the exact
posterior on the remaining data. Every sample set is scored against it (``methods.<m>.vs_exact``) by forward and
reverse 1-NN KL, Gaussian-fit KL, mean absolute error in the posterior sd, error of the posterior mean in sds and
per-cluster spread (:func:`mcmc_unlearner.metrics.sample_set_distances`), next to its effective sample size. The
yardstick is ``retrain_chains``: ``--retrain-chains`` independent retrain chains (``retrain`` and ``retrain-b``
are the first two) scored the same way; their median and range is what one retraining achieves. Optionally
(``--with-paper``) the paper's procedure as its reference code runs it
(:mod:`mcmc_unlearner.experiments.paper`) is scored too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import numbers
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
from ..errors import UnlearningError
from ..metrics import align_mixture_samples, effective_sample_size, knn_kl, sample_set_distances, thin
from ..models.gmm import GaussianMixture
from ..options import shown_value
from ..samplers import SGHMC, SGLD
from ..unlearner import MCMCUnlearner
from .options import register_demo as register
from .options import thin_problem
from .references import GibbsPosterior, gmm_gibbs
from .report import (
    SEED_LIMIT,
    Stopwatch,
    claimed_out_dir,
    fmt,
    markdown_table,
    save_figure,
    summarize,
    write_json,
    write_text,
)

__all__ = ["DISTANCES", "METHODS", "gmm_energy", "paper_available", "register", "run_demo"]

#: Methods compared in every run, in report order.
METHODS = ("origin", "retrain", "retrain-b", "unlearn", "unlearn-continued", "finetune")

_DESCRIPTIONS = {
    "origin": "chain on all 2,000 points (before any deletion)",
    "retrain": "new chain on the remaining points: the target",
    "retrain-b": "second independent retrain chain: the noise floor",
    "unlearn": "origin's stored samples after MCMC unlearning (no new sampling)",
    "unlearn-continued": "live chain after unlearning, sampling on the remaining points",
    "finetune": "origin chain + plain SG-MCMC on the remaining points for unlearn's wall time",
    "paper": "origin's stored samples moved by the paper's procedure as its reference code runs it",
}

#: Distances to the exact posterior reported per method (lower is better for each), in report order.
DISTANCES = ("kl_forward", "kl_reverse", "gauss_kl", "mean_err_sd", "mean_shift_sd", "spread_log_err")

_DISTANCE_NAMES = {
    "kl_forward": "1-NN KL(method ‖ exact)",
    "kl_reverse": "1-NN KL(exact ‖ method)",
    "gauss_kl": "Gaussian-fit KL(method ‖ exact)",
    "mean_err_sd": "mean |sd − exact sd| per coordinate",
    "mean_shift_sd": "mean |mean − exact mean| / exact sd",
    "spread_log_err": "mean over clusters of |log spread ratio|",
}


def paper_available() -> bool:
    """Whether the paper baseline (:mod:`mcmc_unlearner.experiments.paper`) is part of this installation."""
    try:
        importlib.import_module("mcmc_unlearner.experiments.paper")
    except ImportError:
        return False
    return True


#: Quoted (not measured by a demo run): the paper's reference code (``GMM/forget.py``) once on a 2-core CPU of this
#: project. ``--with-paper`` measures the paper's procedure in the run itself (method ``paper``).
_PAPER = {
    "source": "quoted, not measured by this run: the paper's reference GMM/forget.py once on a 2-core CPU",
    "unlearn_seconds": 68.0,
    "retrain_seconds": 11.0,
    "seconds_per_request": 0.31,
    "seconds_per_request_later_median": 0.41,  # paper-facts.md, 2026-12: 20 requests, 0.36-0.56 s
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
    cpu_seconds: float = 0.0


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
    t0, c0 = time.perf_counter(), time.process_time()
    _run_steps(model, sampler, data, burnin, _lr_schedule(n, lr0, decay, 0), keep=False,
               desc=f"{label}: burn-in", progress=progress)  # fmt: skip
    kept, _ = _run_steps(model, sampler, data, samples, _lr_schedule(n, lr0, decay, burnin), keep=True,
                         desc=f"{label}: sampling", progress=progress)  # fmt: skip
    return _Chain(model, sampler, data, kept, time.perf_counter() - t0, burnin + samples, time.process_time() - c0)


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
    newton_steps: int = 2,
    save_model: str | Path | None = None,
    retrain_chains: int = 4,
    exact_draws: int = 4000,
    with_paper: bool = False,
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
        newton_steps: The unlearner's ``newton_steps`` (at most this many damped Newton steps per request; see
            :class:`~mcmc_unlearner.unlearner.MCMCUnlearner`).
        save_model: Folder to save the origin model through ``mcmc_unlearner.store.save_model`` (if present).
        retrain_chains: Independent retrain chains (>= 2; the first two are ``retrain`` and ``retrain-b``); their
            distances to the exact posterior give the median and range one retraining achieves.
        exact_draws: Draws of the exact (Gibbs) reference posterior on the remaining data.
        with_paper: Also run the paper's procedure (:mod:`mcmc_unlearner.experiments.paper`, the reference
            code's settings for this experiment) on a copy of the origin chain and bank, as method ``paper``.
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
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"--seed must be a whole number from 0 to {SEED_LIMIT - 1}, got {shown_value(seed)}")
    if isinstance(per_cluster, bool) or not isinstance(per_cluster, numbers.Integral) or per_cluster < 1:
        raise ValueError(
            f"per_cluster must be a whole number >= 1 (removed points per cluster), got {shown_value(per_cluster)}"
        )
    if request_size < 1:
        raise ValueError(f"--request-size must be >= 1, got {shown_value(request_size)}")
    if burnin < 0 or samples < 1:
        raise ValueError(f"burn-in must be >= 0 and samples >= 1, got {shown_value(burnin)} and {shown_value(samples)}")
    if thin < 1:
        raise ValueError(f"--thin must be a whole number >= 1 (1: keep every sample), got {shown_value(thin)}")
    problem = thin_problem(samples, thin)
    if problem:
        raise ValueError(problem)
    kind = sampler.lower()
    if kind not in ("sgld", "sghmc"):
        raise ValueError(f"unknown sampler {sampler!r}; choose 'sgld' or 'sghmc'")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None), got {threads}")
    if grad_draws is not None and grad_draws < 2:
        raise ValueError(f"--grad-draws must be >= 2, got {grad_draws}")
    if newton_steps < 1:
        raise ValueError(f"--newton-steps must be >= 1, got {newton_steps}")
    if retrain_chains < 2:
        raise ValueError(f"--retrain-chains must be >= 2 (a median needs several chains), got {retrain_chains}")
    if exact_draws < 100:
        raise ValueError(f"exact_draws must be >= 100, got {exact_draws}")
    if with_paper and not paper_available():
        raise ValueError(
            "--with-paper needs mcmc_unlearner.experiments.paper (the faithful paper baseline), which this version "
            "does not include; run without --with-paper or install a version that has it"
        )
    if save_model is not None and out is not None:
        from .bnn import _check_save_model_vs_out

        _check_save_model_vs_out(save_model, out)
    # the output folder is held (a marker file) for the whole run: a second run into it is refused at once
    with claimed_out_dir(out, f"demo-{kind}") if write else contextlib.nullcontext() as out_dir:
        old_threads = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            if progress:
                k = torch.get_num_threads()
                how = "--threads" if threads is not None else "torch's setting"
                print(f"mcmc-unlearner demo: {k} torch thread{'s' if k != 1 else ''} ({how})", file=sys.stderr)
            return _run(
                kind, seed, request_size, burnin, samples, thin, n=n, per_cluster=per_cluster, batch_size=batch_size,
                lr0=lr0, decay=decay, alpha=alpha, bank_shift=bank_shift, refresh_every=refresh_every,
                curvature_draws=curvature_draws, grad_draws=grad_draws, curvature_batch=curvature_batch,
                newton_steps=newton_steps, save_model=save_model, retrain_chains=retrain_chains,
                exact_draws=exact_draws, with_paper=with_paper,
                warmup=warmup, progress=progress, out_dir=out_dir,
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
    newton_steps: int,
    save_model: str | Path | None,
    retrain_chains: int,
    exact_draws: int,
    with_paper: bool,
    warmup: bool,
    progress: bool,
    out_dir: Path | None,
) -> dict[str, Any]:
    """The body of :func:`run_demo` (arguments validated, thread count set)."""
    t_start = time.perf_counter()
    cpu_start = time.process_time()
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
    extra_seeds = [1000 * seed + 10 + i for i in range(retrain_chains - 2)]
    extra_retrains = [
        _chain(x, removed, seed=sd, label=f"retrain-{i + 3}", **chain_args) for i, sd in enumerate(extra_seeds)
    ]
    paper_ctx = _paper_snapshot(origin, x, kind, alpha, batch_size, seed) if with_paper else None

    unlearn_cfg = dict(solver="exact", expectation="bank", hessian="remaining", bank_shift=bank_shift,
                       refresh_every=refresh_every, curvature_draws=curvature_draws, grad_draws=grad_draws,
                       curvature_batch=curvature_batch if curvature_batch is not None else "all remaining",
                       rescale_lr=True, newton_steps=newton_steps)  # fmt: skip

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
    t0, c0 = time.perf_counter(), time.process_time()
    refusals: list[dict[str, Any]] = []
    for i, ids in enumerate(
        tqdm(chunks, desc="unlearn: deletion requests", leave=False, mininterval=0.5, disable=not progress)
    ):
        t_req = time.perf_counter()
        try:
            reports.append(un.forget(ids, data))
        except UnlearningError as exc:  # refused (quality gate): the points are deleted, the bank is not moved
            data.remove(ids)
            refusals.append({"request": i, "seconds": time.perf_counter() - t_req, "error": str(exc)[:300]})
    unlearn_seconds = time.perf_counter() - t0
    unlearn_cpu = time.process_time() - c0
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

    # ---------------------------------------------------------------- the paper's procedure (optional)
    paper_run = _run_paper(paper_ctx, chunks, progress) if paper_ctx is not None else None

    # ---------------------------------------------------------------- exact reference posterior (Gibbs)
    keep_mask = np.ones(n, dtype=bool)
    keep_mask[rem_np] = False
    # labels of the reference = the data's cluster labels (component k sits on data cluster k)
    x_keep, y_keep = x_np[keep_mask].astype(np.float64), y_np[keep_mask]
    label_means = (
        np.stack([x_keep[y_keep == k].mean(0) for k in range(4)]) if np.all(np.bincount(y_keep, minlength=4)) else None
    )
    exact = gmm_gibbs(x_keep, k=4, prior_std=1.0, n_draws=exact_draws, reference_means=label_means,
                      seed=1000 * seed + 7)  # fmt: skip

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
    if paper_run is not None:
        sets["paper"] = aligned(paper_run["bank"])
    names = tuple(sets)
    seconds = {
        "origin": origin.seconds,
        "retrain": retrain.seconds,
        "retrain-b": retrain_b.seconds,
        "unlearn": unlearn_seconds,
        "unlearn-continued": unlearn_seconds + sw.seconds["unlearn-continued"],
        "finetune": sw.seconds["finetune"],
    }
    if paper_run is not None:
        seconds["paper"] = paper_run["seconds"]
    q = sets["retrain"]
    q_mean, q_std = q.mean(0), q.std(0)
    methods: dict[str, dict[str, Any]] = {}
    for name in names:
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
    raw = {
        "origin": origin.samples,
        "retrain": retrain.samples,
        "retrain-b": retrain_b.samples,
        "unlearn": unlearn_bank,
        "unlearn-continued": cont,
        "finetune": ft_samples,
    }
    if paper_run is not None:
        raw["paper"] = paper_run["bank"]
        methods["paper"].update({k: v for k, v in paper_run.items() if k not in ("bank", "seconds")})
    retrain_sets = [retrain.samples, retrain_b.samples] + [c.samples for c in extra_retrains]
    vs_exact, retrain_summary = _exact_evaluation(exact, raw, retrain_sets, thin)
    for name in names:
        methods[name].update(vs_exact[name])
    retrain_summary.update(
        {
            "seeds": [1000 * seed + 2, 1000 * seed + 3, *extra_seeds],
            "seconds": [retrain.seconds, retrain_b.seconds] + [c.seconds for c in extra_retrains],
            "cpu_seconds": [retrain.cpu_seconds, retrain_b.cpu_seconds] + [c.cpu_seconds for c in extra_retrains],
            "names": ["retrain", "retrain-b"] + [f"retrain-{i + 3}" for i in range(len(extra_retrains))],
        }
    )
    methods["finetune"]["adapt_steps"] = ft_steps
    methods["finetune"]["adapt_seconds"] = unlearn_seconds
    methods["unlearn-continued"]["sampling_seconds"] = sw.seconds["unlearn-continued"]
    per_req = [r.seconds for r in reports] + [r["seconds"] for r in refusals]
    methods["unlearn"].update(
        {
            "seconds_per_request_median": float(np.median(per_req)),
            "n_requests": len(chunks),
            "seconds_in_forget": float(sum(per_req)),
            "warmup_seconds": warmup_seconds,
            "cpu_seconds": unlearn_cpu,
        }
    )
    for name, chain in (("origin", origin), ("retrain", retrain), ("retrain-b", retrain_b)):
        methods[name]["cpu_seconds"] = chain.cpu_seconds
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
    per_key = {
        key: {
            "value": methods["unlearn"]["vs_exact"][key],
            "limit": retrain_summary["vs_exact"][key]["median"],
            "met": bool(methods["unlearn"]["vs_exact"][key] <= retrain_summary["vs_exact"][key]["median"]),
        }
        for key in DISTANCES
    }
    targets["unlearn_vs_exact_at_or_below_median_retrain_chain"] = {
        "value": sum(v["met"] for v in per_key.values()),
        "limit": len(per_key),
        "met": all(v["met"] for v in per_key.values()),
        "per_distance": per_key,
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
        "retrain_chains": retrain_summary,
        "exact_reference": {
            **exact.summary(),
            "method": "two-block Gibbs sampler over assignments and means (conditionally conjugate model), "
            "chains at the posterior mode, thinned by 2x the integrated autocorrelation time",
            "draws_mean": exact.samples.mean(0).tolist(),
            "draws_sd": exact.samples.std(0, ddof=1).tolist(),
        },
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
        # what the run compares with (--retrain-chains, --with-paper): summary refuses runs that differ here
        "comparison_config": {"retrain_chains": retrain_chains, "with_paper": with_paper},
        "unlearn_requests": {
            "seconds": summarize(per_req),
            "residual": summarize([r.residual for r in reports]),
            "iterations": summarize([r.iterations for r in reports]),
            "shift_norm": summarize([r.shift_norm for r in reports]),
            "shift_stderr": summarize([r.shift_stderr for r in reports]),
            "converged_all": all(r.converged for r in reports),
            "refused": len(refusals),
            "refusals": refusals[:10],
            "damping": summarize([getattr(r, "damping", 0.0) for r in reports]),
            "damping_trials_total": sum(getattr(r, "damping_trials", 1) for r in reports),
            "safe_all": all(getattr(r, "safe", True) for r in reports),
            "model_ratio": summarize([getattr(r, "model_ratio", 1.0) for r in reports]),
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
    metrics["total_cpu_seconds"] = time.process_time() - cpu_start  # wall time inflates on a busy machine
    if out_dir is not None:
        figs = _figures(out_dir, x_np, rem_np, sets, methods, floor, thin, retrain_summary)
        metrics["figures"] = [p.name for p in figs]
        metrics["total_seconds"] = time.perf_counter() - t_start
        metrics["total_cpu_seconds"] = time.process_time() - cpu_start
        metrics["out_dir"] = str(out_dir)
        write_text(out_dir / "report.md", _report(metrics))
        write_json(out_dir / "metrics.json", metrics)  # last: a folder with metrics.json is a finished run
    return metrics


def _warm_up(
    model: nn.Module, origin: _Chain, x: torch.Tensor, removed: torch.Tensor, ids: torch.Tensor, cfg: dict
) -> float:
    """One throw-away request on copies (first ``torch.func`` trace and lazy imports); returns its seconds. Its bank
    is the first 16 samples, so draw counts above that are capped here (asked for by name, they warned about the
    warm-up's bank in the main job's output)."""
    t0 = time.perf_counter()
    m = GaussianMixture(k=4, dim=2, init=ParamSpec.flatten_module(model).view(4, 2))
    data = RemovableDataset(x, batch_size=x.shape[0], seed=0)
    bank = origin.samples[:16]
    kw = {k: v for k, v in cfg.items() if k != "curvature_batch"}
    for name in ("grad_draws", "curvature_draws", "check_draws"):
        if isinstance(kw.get(name), int):
            kw[name] = min(kw[name], bank.shape[0])
    un = MCMCUnlearner(m, None, bank=bank, **kw)
    un.forget(ids, data)
    return time.perf_counter() - t0


def _velocity_snapshot(chain: _Chain) -> torch.Tensor | None:
    state = chain.sampler.state.get(chain.model.means, {})
    v = state.get("momentum_buffer")
    return None if v is None else v.detach().clone()


def _ess_summary(ess: np.ndarray) -> dict[str, Any]:
    return {"min": float(ess.min()), "median": float(np.median(ess)), "per_coordinate": [float(v) for v in ess]}


def _spread(values: list[float]) -> dict[str, Any]:
    return {
        "median": float(np.median(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "values": [float(v) for v in values],
    }


def _exact_evaluation(
    exact: GibbsPosterior, raw: dict[str, torch.Tensor], retrain_sets: list[torch.Tensor], every: int
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Distances of every sample set to the exact posterior, and the retrain chains' median and range.

    Each set (``[S, 8]``) is relabelled by one permutation matching the exact draws' mean (as the demo aligns
    everything) and scored by :func:`mcmc_unlearner.metrics.sample_set_distances` (k-NN estimators on the set
    thinned by ``every``, moments on all of it) against the Gibbs draws; its effective sample size per
    coordinate is measured on the unthinned set in chain order.
    """
    centre = exact.samples.mean(0)
    ref = exact.flat

    def score(s: torch.Tensor) -> dict[str, Any]:
        a = align_mixture_samples(s.reshape(-1, 4, 2).numpy().astype(np.float64), centre).reshape(s.shape[0], -1)
        return {
            "vs_exact": sample_set_distances(a, ref, every=every, mixture=(4, 2)),
            "ess": _ess_summary(effective_sample_size(a)),
        }

    per_method = {name: score(s) for name, s in raw.items()}
    chains = [score(s) for s in retrain_sets]
    summary: dict[str, Any] = {
        "n": len(chains),
        "vs_exact": {key: _spread([c["vs_exact"][key] for c in chains]) for key in DISTANCES},
        "spread_ratio": [c["vs_exact"]["spread_ratio"] for c in chains],
        "ess": {
            "min": _spread([c["ess"]["min"] for c in chains]),
            "median": _spread([c["ess"]["median"] for c in chains]),
        },
    }
    return per_method, summary


@dataclass
class _PaperContext:
    model: GaussianMixture
    sampler: torch.optim.Optimizer
    data: RemovableDataset
    bank: torch.Tensor


def _paper_snapshot(
    origin: _Chain, x: torch.Tensor, kind: str, alpha: float, batch_size: int, seed: int
) -> _PaperContext:
    """A copy of the origin chain (state, step size, velocity, all data, stored samples) for the paper baseline."""
    model = GaussianMixture(k=4, dim=2, init=origin.model.means.detach().clone())
    model.n = len(origin.data)
    data = RemovableDataset(x, batch_size=batch_size, seed=1000 * seed + 8)
    # the reference keeps the step size training ended with. Not the reference's own schedule (stop 47's probe):
    # its train.py decays the step over the 4,000 burn-in steps only and samples at that constant step
    # (4/2000·4000^-0.5005 = 3.15e-5); the demo's chain decays it through sampling too, so this is 2.23e-5, 1.41x
    # smaller (measured effect within the seeds' spread: kl_forward 6.02 / 5.66 against 5.96 / 5.65, docs/gmm.md)
    lr = float(origin.sampler.param_groups[0]["lr"])
    sampler = _make_sampler(kind, model, lr, alpha, torch.Generator().manual_seed(1000 * seed + 9))
    velocity = _velocity_snapshot(origin)
    if velocity is not None:
        sampler.state[model.means]["momentum_buffer"] = velocity
    return _PaperContext(model, sampler, data, origin.samples.clone())


def _run_paper(ctx: _PaperContext, chunks: list[torch.Tensor], progress: bool) -> dict[str, Any]:
    """The paper's procedure (reference settings for this experiment) over the same requests as ``unlearn``.

    A refused request (LiSSA diverged: the reference code would write NaN) deletes its points without a shift
    and is counted in ``refused``.
    """
    from dataclasses import asdict

    from tqdm.auto import tqdm

    from .paper import GMM_REFERENCE, PaperUnlearner

    pu = PaperUnlearner(ctx.model, ctx.sampler, **GMM_REFERENCE.kwargs(), bank=ctx.bank)
    per_req: list[float] = []
    refusals: list[dict[str, Any]] = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i, ids in enumerate(tqdm(chunks, desc="paper: deletion requests", leave=False, disable=not progress)):
        t_req = time.perf_counter()
        try:
            pu.forget(ids, ctx.data)
        except UnlearningError as exc:
            ctx.data.remove(ids)
            ctx.model.n = len(ctx.data)
            refusals.append({"request": i, "error": str(exc)[:200]})
        per_req.append(time.perf_counter() - t_req)
    seconds = time.perf_counter() - t0
    assert pu.bank is not None
    return {
        "bank": pu.bank,
        "seconds": seconds,
        "cpu_seconds": time.process_time() - c0,
        "seconds_per_request_median": float(np.median(per_req)),
        "n_requests": len(chunks),
        "refused": len(refusals),
        "refusals": refusals[:10],
        "settings": asdict(GMM_REFERENCE),
    }


# -------------------------------------------------------------------- figures and report
def _figures(
    out_dir: Path,
    x: np.ndarray,
    removed: np.ndarray,
    sets: dict[str, np.ndarray],
    methods: dict[str, dict[str, Any]],
    floor: float | None,
    every: int,
    retrain_chains: dict[str, Any],
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
    names = [m for m in methods if methods[m]["kl_to_retrain"] is not None]
    vals = [methods[m]["kl_to_retrain"] for m in names]
    ax.bar(names, vals, color=["0.6" if m != "unlearn" else "tab:green" for m in names])
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=1, label="noise floor (retrain-b)")
        ax.axhline(1.2 * floor, color="k", ls=":", lw=1, label="1.2 × noise floor")
        ax.legend(fontsize=8)
    ax.set_ylabel(f"1-NN KL to retrain (thinned ×{every})")
    ax.tick_params(axis="x", labelsize=8)
    p2 = save_figure(fig, out_dir / "kl.png")
    return [p1, p2, _exact_figure(out_dir, methods, retrain_chains)]


def _exact_figure(out_dir: Path, methods: dict[str, dict[str, Any]], rc: dict[str, Any]) -> Path:
    """One panel per distance to the exact posterior: methods as bars, the retrain chains' range as a band."""
    from matplotlib.figure import Figure

    names = [n for n in ("unlearn", "paper", "finetune", "unlearn-continued") if n in methods]
    fig = Figure(figsize=(13, 6.5))
    axes = fig.subplots(2, 3)
    for ax, key in zip(axes.flat, DISTANCES):
        spread = rc["vs_exact"][key]
        ax.axhspan(spread["min"], spread["max"], color="0.85", label=f"{rc['n']} retrain chains: range")
        ax.axhline(spread["median"], color="k", ls="--", lw=1, label="retrain chains: median")
        vals = [methods[n]["vs_exact"][key] for n in names]
        ax.bar(names, vals, color=["tab:green" if n == "unlearn" else "0.55" for n in names])
        ax.set_title(_DISTANCE_NAMES[key], fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Distance to the exact (Gibbs) posterior, lower is better")
    return save_figure(fig, out_dir / "vs_exact.png")


def _range(spread: dict[str, Any]) -> str:
    return f"{fmt(spread['median'])} ({fmt(spread['min'])}–{fmt(spread['max'])})"


def _exact_section(m: dict[str, Any]) -> list[str]:
    """The report's headline: every method's distance to the exact posterior next to the retrain chains'."""
    meth = m["methods"]
    rc = m["retrain_chains"]
    ex = m["exact_reference"]
    names = [n for n in ("unlearn", "paper", "finetune", "unlearn-continued", "origin") if n in meth]
    rows = [
        [f"**{n}**" if n == "unlearn" else n]
        + [meth[n]["vs_exact"][k] for k in DISTANCES]
        + [meth[n]["ess"]["min"], meth[n]["seconds"]]
        for n in names
    ]
    rows.append(
        [f"retrain chains: median (min–max), {rc['n']} chains"]
        + [_range(rc["vs_exact"][k]) for k in DISTANCES]
        + [_range(rc["ess"]["min"]), _range(_spread(rc["seconds"]))]
    )
    table = markdown_table(["method", *DISTANCES, "ESS (min coord.)", "seconds"], rows)
    un = meth["unlearn"]["vs_exact"]
    med = {k: rc["vs_exact"][k]["median"] for k in DISTANCES}
    worse = [k for k in DISTANCES if un[k] > med[k]]
    lines = [
        "## Distance to the exact posterior",
        "",
        f"Reference: {ex['n_draws']} draws of the exact posterior on the remaining {m['n_remaining']} points from "
        f"a Gibbs sampler over assignments and means ({ex['chains']} chains, thinned every {ex['thin']} sweeps = "
        f"2× the integrated autocorrelation time; ESS ≥ {fmt(ex['ess_min'])}; {fmt(ex['seconds'])} s). Each set "
        f"of 4,000 samples is relabelled to the reference and compared by: "
        + "; ".join(f"`{k}` = {_DISTANCE_NAMES[k]}" for k in DISTANCES)
        + f". k-NN estimates use every {m['thin']}th sample, moments all of them. Lower is better for all six. "
        "ESS is the effective sample size of the worst-mixing coordinate (of 4,000 draws). The yardstick is not "
        f"0 but what one retraining achieves: {rc['n']} independent retrain chains, median and range.",
        "",
        table,
        "",
    ]
    if worse:
        lines.append(
            "**Where ours is not better** than the median retrain chain: "
            + "; ".join(f"`{k}` {fmt(un[k])} vs median {fmt(med[k])}" for k in worse)
            + f". Ours is at or below the median on {len(DISTANCES) - len(worse)} of {len(DISTANCES)} distances."
        )
    else:
        lines.append(f"Ours is at or below the median retrain chain on all {len(DISTANCES)} distances.")
    worse_ft = [k for k in DISTANCES if un[k] > meth["finetune"]["vs_exact"][k]]
    if worse_ft:
        lines.append(
            "Fine-tuning (more wall time: it adapts for unlearn's time and then draws 4,000 samples) is closer on: "
            + ", ".join(f"`{k}` ({fmt(meth['finetune']['vs_exact'][k])} vs ours {fmt(un[k])})" for k in worse_ft)
            + "."
        )
    if "paper" in meth:
        pa = meth["paper"]
        worse_pa = [k for k in DISTANCES if un[k] > pa["vs_exact"][k]]
        lines.append(
            f"The paper's procedure (measured in this run, reference settings {pa['settings']}): "
            f"{fmt(pa['seconds'])} s for all requests (median {1000 * pa['seconds_per_request_median']:.0f} ms), "
            f"{pa['refused']} refused. "
            + (
                "It is closer than ours on: " + ", ".join(f"`{k}`" for k in worse_pa) + "."
                if worse_pa
                else "Ours is at least as close on every distance."
            )
        )
    ratio = meth["unlearn"]["vs_exact"]["spread_ratio"]
    lines += [
        "",
        f"Spread per cluster (0–3, the data's labels) relative to the exact posterior (1 is right; clusters 0 and 2 "
        f"lost points): "
        f"unlearn {', '.join(fmt(r) for r in ratio)}; retrain chains "
        + "; ".join("[" + ", ".join(fmt(r) for r in c) + "]" for c in rc["spread_ratio"])
        + ".",
        "",
    ]
    return lines


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
        for name in meth
    ]
    table = markdown_table(
        ["method", "KL to retrain ↓", "KL unthinned", "seconds", "spread / retrain", "what it is"], rows
    )

    def mark(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    t1, t2, t3, t4 = (
        tg["unlearn_kl_within_1.2x_noise_floor"],
        tg["unlearn_time_within_10pct_of_retrain"],
        tg["unlearn_kl_below_finetune_at_equal_time"],
        tg["unlearn_vs_exact_at_or_below_median_retrain_chain"],
    )
    ur = m["unlearn_requests"]
    cfg = m["unlearn_config"]
    lines = [
        f"# MCMC unlearning on the 2-D Gaussian mixture ({m['sampler'].upper()}, seed {m['seed']})",
        "",
        f"{m['n_removed']} of {m['n_train']} points were removed in {m['n_requests']} deletion requests of "
        f"{m['request_size']}. Each method is a set of 4,000 posterior samples of the 4 cluster means (8 numbers). "
        f"One seed is one draw: compare seeds with `mcmc-unlearner summary RUN_DIR ...`.",
        "",
        *_exact_section(m),
        "## Time",
        "",
        f"All {m['n_requests']} requests together: **{fmt(un['seconds'])} s** (median "
        f"{1000 * un['seconds_per_request_median']:.1f} ms per request; plus a one-off warm-up of "
        f"{fmt(un['warmup_seconds'])} s before the first request), against {fmt(meth['retrain']['seconds'])} s to "
        f"retrain one chain; CPU time {fmt(un.get('cpu_seconds'))} s for all requests vs "
        f"{fmt(meth['retrain'].get('cpu_seconds'))} s for one retrain chain. Whole run: "
        f"{fmt(m['total_seconds'])} s wall, {fmt(m['total_cpu_seconds'])} s CPU ({_cpu_note(m)}).",
        "",
        "## Targets",
        "",
        f"- At or below the median retrain chain on every distance to the exact posterior: {mark(t4['met'])} — "
        f"{t4['value']} of {t4['limit']}.",
        f"- All {m['n_requests']} requests in at most 10% of retraining time: {mark(t2['met'])} — "
        f"{fmt(un['seconds'])} s = {100 * t2['value']:.0f}% of {fmt(meth['retrain']['seconds'])} s.",
        f"- (Older, retrain-chain based) KL to `retrain` within 1.2× the noise floor: {mark(t1['met'])} — "
        f"{fmt(t1['value'])} vs limit {fmt(t1['limit'])}; below fine-tuning: {mark(t3['met'])} — "
        f"{fmt(t3['value'])} vs {fmt(t3['limit'])}.",
        "",
        "## KL to one retrain chain (the paper's measure)",
        "",
        "**KL** is the 1-NN estimate of KL(method ‖ retrain) in nats on chains thinned to every "
        f"{m['thin']}th sample; a second independent retrain chain scores **{fmt(floor)}** (`retrain-b`), not 0. "
        "This measure compares against one finite chain and rewards sets that mix better than that chain (the "
        "forward 1-NN KL grows when consecutive draws sit close together), so read it with the exact-posterior "
        "table above. **seconds**: wall time (for `unlearn`: all requests; `unlearn-continued` adds its "
        "sampling; `finetune` adapted for unlearn's time and then drew its samples).",
        "",
        table,
        "",
        f"- Labels: each sample set is relabelled by Hungarian matching of its mean to the retrain chain's means. "
        f"Largest cluster-mean gap between the two retrain chains: {fmt(m['retrain_b_mode_gap'])}"
        + (
            " (the retrain chains found different modes: KLs are not comparable)."
            if m["retrain_b_mode_gap"] > 0.5
            else " (same mode)."
        ),
        "- Quoted, not measured by this run (the paper's code, `GMM/forget.py`, once on a 2-core CPU of this "
        f"project): {fmt(m['paper_reference']['unlearn_seconds'])} s to unlearn "
        f"({fmt(m['paper_reference']['seconds_per_request'])} s per request) vs "
        f"{fmt(m['paper_reference']['retrain_seconds'])} s to retrain; unthinned KL "
        f"{fmt(m['paper_reference']['kl_unlearn_continued_unthinned'])} after unlearning (+ continued sampling) vs "
        f"noise floor {fmt(m['paper_reference']['kl_floor_unthinned'])}"
        + (
            f"; a later measurement of 20 of its requests: median {fmt(later)} s per request. "
            if (later := m["paper_reference"].get("seconds_per_request_later_median")) is not None
            else ". "  # a run stored before it was quoted
        )
        + (
            "This run measured the paper's procedure itself: method `paper` above."
            if "paper" in m["methods"]
            else "Run with `--with-paper` to measure the paper's procedure here."
        ),
        "",
        "## Unlearning",
        "",
        f"`MCMCUnlearner(solver='exact', expectation='bank', hessian='remaining', bank_shift='{cfg['bank_shift']}', "
        f"curvature_draws={cfg['curvature_draws']}, grad_draws={cfg['grad_draws']}, "
        f"refresh_every={cfg['refresh_every']}, newton_steps={cfg['newton_steps']})`, Hessian rebuilt on "
        f"{cfg['curvature_batch']} points "
        f"({ur['hessian_rebuilds']} rebuilds). Per request: median {1000 * ur['seconds']['median']:.1f} ms "
        f"(max {1000 * ur['seconds']['max']:.1f} ms), solver residual max {fmt(ur['residual']['max'])}, "
        f"shift norm median {fmt(ur['shift_norm']['median'])}, Monte-Carlo standard error of the shift median "
        f"{fmt(ur['shift_stderr']['median'])}; all solves converged: {fmt(ur['converged_all'])}; damping (chosen "
        f"per request) median {fmt(ur['damping']['median'])}, max {fmt(ur['damping']['max'])}, "
        f"{ur['damping_trials_total']} trials for {m['n_requests']} requests; every step passed the safety check: "
        f"{fmt(ur['safe_all'])}; refused by the quality gate (points deleted, samples not moved): {ur['refused']}.",
        "",
        "![samples](samples.png)",
        "",
        "![vs exact](vs_exact.png)",
        "",
        "![kl](kl.png)",
        "",
    ]
    if m.get("save_model"):
        lines += [f"--save-model: {m['save_model']}", ""]
    return "\n".join(lines)


def _cpu_note(m: dict[str, Any]) -> str:
    """The report's reading of wall vs CPU time, for the run's actual torch thread count."""
    k = (m.get("platform") or {}).get("threads")
    if k == 1:
        return "wall times grow on a busy machine; the CPU time of this single-threaded run much less"
    if not k:
        return "wall times grow on a busy machine; the CPU time much less"
    return (
        f"wall times grow on a busy machine, the CPU time much less; this run used {k} torch threads, "
        "whose CPU times add up, so its CPU time can exceed its wall time"
    )


# -------------------------------------------------------------------- CLI
def _cmd_demo(args: argparse.Namespace) -> int:
    from ..service.deletion import threads_for

    metrics = run_demo(
        sampler=args.sampler,
        seed=args.seed,
        out=args.out,
        request_size=args.request_size,
        burnin=args.burnin,
        samples=args.samples,
        thin=args.thin,
        save_model=args.save_model,
        retrain_chains=args.retrain_chains,
        with_paper=args.with_paper,
        newton_steps=args.newton_steps,
        grad_draws=args.grad_draws,
        progress=not args.quiet,
        threads=threads_for(args.threads, 8),  # forget's rule: 8 parameters, so "auto" is one thread; 0 is None
    )
    meth = metrics["methods"]
    rc = metrics["retrain_chains"]["vs_exact"]
    print(f"wrote {metrics['out_dir']}/report.md, metrics.json, {', '.join(metrics['figures'])}")
    print(f"  distance to the exact posterior ({' / '.join(DISTANCES)}):")
    for name in meth:
        vals = " ".join(f"{meth[name]['vs_exact'][k]:7.3f}" for k in DISTANCES)
        print(f"  {name:18s} {vals}   {meth[name]['seconds']:7.2f} s")
    medians = " ".join(f"{rc[k]['median']:7.3f}" for k in DISTANCES)
    print(f"  {'retrain median':18s} {medians}")
    for name in meth:
        kl = meth[name]["kl_to_retrain"]
        print(f"  {name:18s} KL to retrain {'—' if kl is None else f'{kl:6.2f}'}")
    for key, t in metrics["targets"].items():
        print(f"  target {key}: {'met' if t['met'] else 'MISSED'} ({fmt(t['value'])} vs {fmt(t['limit'])})")
    return 0
