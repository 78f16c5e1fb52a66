r"""Bayesian neural networks on image data: the paper's class-removal protocol, baselines and evaluation.

``mcmc-unlearner bnn`` trains a Bayesian classifier by SG-MCMC (prior :math:`N(0, σ²)`, σ = 0.1;
:math:`F = -\log p(θ) + n·\mathrm{mean\,CE}`, :math:`h` = CE of one example), removes the training points
of one class in requests of ``--request-size`` and compares, side by side:

* ``origin``: the chain trained on all data, untouched;
* ``retrain``, ``retrain-b``, ``retrain-c``, ...: ``--retrain-chains`` independent runs of the whole training
  procedure on the remaining data (the target; the spread between them is the noise floor);
* ``unlearn``: :class:`~mcmc_unlearner.unlearner.MCMCUnlearner` with the library's settings (shifting the
  live chain and the stored sample bank at every request);
* ``paper``: the paper's algorithm as its reference code runs it
  (:class:`~mcmc_unlearner.experiments.paper.PaperUnlearner`: LiSSA on the full-data Hessian with the request's
  points still in, sampler-step expectations, ``iter_T`` 64, ``samp_T`` 1, scaling ``0.05 / n``, step size
  rescaled by ``n_old / n_new``); the stored samples move by the live chain's shift (Algorithm 1);
* ``finetune``: SG-MCMC on the remaining data, given ``unlearn``'s wall time per request;
* ``langevin``: noisy-gradient unlearning in the style of Langevin unlearning (Chien, Wang & Li, NeurIPS
  2024): after every request the chain takes ``--langevin-steps`` SGLD steps on the remaining data (default
  ``samp_T + 2·iter_T`` = 129: at the paper's ``samp_T`` 1 its 65 sampler steps and 64 Hessian-vector products
  per request, each counted as one gradient evaluation; an HVP costs about two, which would make it 193);
* ``importance``: the stored samples reweighted by :math:`1/p(S'|θ)` (self-normalised).

Every method after ``origin`` starts from the same trained chain (the retrains from the same initial
weights). Training follows the paper: optional pre-training on another data set (SGD with momentum; with
``--preset paper-fmnist`` MNIST when its files are found; when they are not, the shared initial weights are
pre-trained the same way on a seeded half of the test set, which then leaves the evaluation, and the report says
so), plain SGD on :math:`F/n` for ``explore_steps``, then the sampler with step size
:math:`(\mathrm{lr}/n)·t^{-0.5005}`.

A request that the unlearner refuses (any :class:`~mcmc_unlearner.errors.UnlearningError`) is recorded and
handled by ``--on-refusal``: ``skip`` removes the points from the data anyway and leaves the posterior
unshifted; ``sgld`` additionally moves the live chain ``--repair-steps`` sampler steps on the remaining data.
The run goes on and always ends with ``metrics.json`` and ``report.md``.

Evaluation (:mod:`mcmc_unlearner.experiments.evaluation`): predictives computed once per sample set (up to
``--eval-samples`` evenly thinned samples) on seeded subsets of at most ``--eval-max`` points per split; errors
of the posterior predictive and of the last chain state; distance to retraining as the median over retrain
chains of ``|error − retrain error|``, the mean L1 and KL between predictives, with the floor = the median over
pairs of retrain chains; a per-example likelihood-ratio membership attack (removed points vs held-out test points
of the same class, calibrated by the retrain chains other than ``retrain``) beside the confidence-threshold
attack; wall times (total over all requests). Progress snapshots every ``--eval-every`` requests use small
subsets (``--progress-max`` points, ``--progress-samples`` samples) and are not counted in any method's time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..curvature import ParamSpec
from ..data import RemovableDataset
from ..errors import UnlearningError
from ..image_data import class_indices, load_dataset
from ..metrics import knn_distances, knn_kl
from ..models.bnn import ARCHITECTURES, BayesianNet, build_model
from ..options import shown_value
from ..samplers import SGHMC, SGLD, run_chain
from ..unlearner import MCMCUnlearner
from . import evaluation as ev
from .options import (
    _COUNT_LIMITS,
    _POSITIVE,
    OPTIONAL_METHODS,
    PRESETS,
    QUICK,
    BNNConfig,
    RefusalPolicy,
    check_kwarg,
    check_settings,
    config_from_args,
    device_problem,
)
from .options import DEFAULT_ARCH as _DEFAULT_ARCH
from .options import register_bnn as register
from .options import unlearner_overrides as _unlearner_overrides
from .report import claimed_out_dir, write_json, write_text

__all__ = [
    "METHODS",
    "OPTIONAL_METHODS",
    "PRESETS",
    "QUICK",
    "BNNConfig",
    "RefusalPolicy",
    "confidence_attack",
    "importance_weights",
    "register",
    "run_bnn",
    "weighted_knn_kl",
]

#: The methods a default run evaluates, in report order (with three retrain chains).
METHODS = ("origin", "retrain", "retrain-b", "retrain-c", *OPTIONAL_METHODS)
#: Methods that process the requests one by one (progress snapshots, refusals, per-request times).
_SEQUENTIAL = ("unlearn", "paper", "finetune", "langevin")

#: Splits every method is scored on.
_SPLITS = ("remaining", "removed", "test", "test_kept")


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _torch_threads(n: int | str) -> Iterator[None]:
    """Set torch's intra-op thread count for the block and restore it afterwards (``0``: no change; ``"auto"``:
    set once the network's size is known, by :func:`_apply_threads`)."""
    old = torch.get_num_threads()
    if isinstance(n, int) and n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _apply_threads(cfg: BNNConfig, n_params: int) -> None:
    """Resolve ``threads="auto"`` for a network of ``n_params`` parameters (run inside :func:`_torch_threads`,
    which restores the count), then announce the torch thread count once on stderr before the first progress bar
    (nothing with ``--quiet``); after the checks of the data and the requests, so that a refusal stays one line."""
    how = "--threads"
    if cfg.threads == "auto":
        from ..service.deletion import auto_threads

        n = auto_threads(n_params)
        if n is not None:
            torch.set_num_threads(n)
        how = f"--threads auto: {n_params:,} parameters" if n is not None else "--threads auto: torch's setting"
    elif cfg.threads == 0:
        how = "torch's setting, --threads 0"
    if cfg.progress:
        k = torch.get_num_threads()
        print(f"mcmc-unlearner bnn: {k} torch thread{'s' if k != 1 else ''} ({how})", file=sys.stderr)


def _bar(iterable: Any, desc: str, enabled: bool, total: int | None = None) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, mininterval=0.5)


def _energy(model: nn.Module, batch: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """Minibatch energy ``F = -log p(θ) + n·mean CE``."""
    return -model.log_prior() + n * model.nll(batch).mean()


def _step_size(lr: float, n: int, t: int) -> float:
    """The paper's sampler step size ``(lr/n)·t^-0.5005`` at step ``t >= 1``."""
    return lr / n * t**-0.5005


def _make_sampler(cfg: BNNConfig, model: nn.Module, lr: float, seed: int) -> torch.optim.Optimizer:
    gen = torch.Generator(device=cfg.device).manual_seed(seed)
    if cfg.sampler == "sgld":
        return SGLD(model.parameters(), lr=lr, generator=gen)
    if cfg.sampler == "sghmc":
        return SGHMC(model.parameters(), lr=lr, alpha=0.9, generator=gen)
    raise ValueError(f"unknown sampler {cfg.sampler!r}; choose 'sgld' or 'sghmc'")


def _sgd(
    model: BayesianNet, data: RemovableDataset, steps: int, lr: float, momentum: float, label: str, bar: bool
) -> None:
    """Pre-training: ``steps`` SGD steps with momentum on the mean cross-entropy (no prior), as the paper's code."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for _ in _bar(range(steps), label, bar):
        opt.zero_grad()
        model.nll(next(data)).mean().backward()
        opt.step()


#: Pre-trainings at least this long that end at chance accuracy are refused (see :func:`_check_pretraining`).
PRETRAIN_CHECK_STEPS = 100


def _check_pretraining(
    model: BayesianNet, x: torch.Tensor, y: torch.Tensor, n_classes: int, name: str, cfg: Any
) -> None:
    """Refuse shared initial weights that pre-training collapsed (accuracy on its own data at most 1.5× chance
    after at least ``PRETRAIN_CHECK_STEPS`` steps; shorter pre-trainings are too short to judge and only noted).

    Every chain — origin and retrains — starts from them, so a collapsed start voids every comparison of the run
    (measured: Fashion-MNIST seed 1 of the paper preset, 89% error for every chain after 40 minutes of work).
    """
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(1024), y.split(1024), strict=True))
    acc = hits / max(int(y.numel()), 1)
    if acc <= 1.5 / n_classes and cfg.pretrain_steps >= PRETRAIN_CHECK_STEPS:
        raise ValueError(
            f"pre-training on {name} collapsed: accuracy {acc:.1%} on its own {y.numel()} images (chance "
            f"{1 / n_classes:.1%}) after {cfg.pretrain_steps} SGD steps at lr {cfg.pretrain_lr:g}, momentum "
            f"{cfg.pretrain_momentum:g}; every chain would start from it. Rerun with another --seed, fewer "
            "--pretrain-steps, or --no-pretrain"
        )
    cfg.notes.append(f"pre-training on {name}: accuracy {acc:.1%} on its own data (chance {1 / n_classes:.1%})")


def _thin_to(samples: torch.Tensor, k: int) -> torch.Tensor:
    """At most ``k`` rows of ``samples`` (``k <= 0``: all), evenly spaced, first and last included."""
    if k <= 0 or samples.shape[0] <= k:
        return samples
    return samples[torch.linspace(0, samples.shape[0] - 1, k).round().long()]


def _flat(model: nn.Module) -> torch.Tensor:
    return ParamSpec.flatten_module(model).detach().clone()


def _retrain_names(k: int) -> list[str]:
    """``retrain``, ``retrain-b``, ``retrain-c``, ... (``retrain-b`` keeps its old meaning: the second chain)."""
    return ["retrain"] + [f"retrain-{chr(ord('a') + i)}" for i in range(1, k)]


# ---------------------------------------------------------------------------------------------- metrics
def importance_weights(log_ratios: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Self-normalised importance weights from unnormalised log weights, and their effective sample size.

    For removal, ``log w_s = Σ_{z∈S'} h(θ_s, z) = -log p(S'|θ_s)``: old-posterior samples reweighted to the
    posterior without ``S'``. Normalised with log-sum-exp, so huge log weights do not overflow.

    Args:
        log_ratios: Unnormalised log weights ``[S]``.

    Returns:
        ``(w, ess)``: weights summing to 1 and ``ESS = 1 / Σ w²`` in ``[1, S]``.
    """
    lw = log_ratios.detach().to(torch.float64).flatten()
    if lw.numel() == 0 or not torch.isfinite(lw).all():
        raise ValueError("importance weights need a non-empty set of finite log weights")
    w = torch.exp(lw - torch.logsumexp(lw, 0))
    return w, float(1.0 / (w * w).sum())


def weighted_knn_kl(p: torch.Tensor | np.ndarray, w: torch.Tensor | np.ndarray, q: torch.Tensor | np.ndarray) -> float:
    r"""1-NN estimate of ``KL(P_w ‖ Q)`` for a weighted sample set ``(p, w)`` (weights sum to 1).

    The density of ``P_w`` at ``p_i`` is that of the unweighted sample set times ``n·w_i``, so the Wang et al.
    estimator becomes :math:`\sum_i w_i\,[d\log(ν_i/ρ_i) + \log(n w_i)] + \log(m/(n-1))`. With equal weights
    it equals :func:`mcmc_unlearner.metrics.knn_kl`.
    """
    pa = torch.as_tensor(p).detach().cpu().double().numpy()
    qa = torch.as_tensor(q).detach().cpu().double().numpy()
    wa = torch.as_tensor(w).detach().cpu().double().numpy()
    n, d = pa.shape
    m = qa.shape[0]
    if wa.shape != (n,) or abs(wa.sum() - 1.0) > 1e-6 or (wa < 0).any():
        raise ValueError("weights must be non-negative, one per sample, and sum to 1")
    rho = np.maximum(knn_distances(pa, None, k=1), 1e-12)
    nu = np.maximum(knn_distances(pa, qa, k=1), 1e-12)
    pos = wa > 0
    terms = d * (np.log(nu[pos]) - np.log(rho[pos])) + np.log(n * wa[pos])
    return float((wa[pos] * terms).sum() + math.log(m / (n - 1)))


def confidence_attack(
    member_scores: np.ndarray, nonmember_scores: np.ndarray, target_scores: np.ndarray
) -> dict[str, float]:
    """Confidence-threshold membership inference (scores: probability of the true class).

    The threshold is the one of :func:`sklearn.metrics.roc_curve` that best separates known members from
    known non-members (maximal ``TPR − FPR``); a point is judged a member when its score is ``>=`` the
    threshold.

    Returns:
        ``threshold``, ``auc`` (members vs non-members, :func:`sklearn.metrics.roc_auc_score`),
        ``member_share`` / ``nonmember_share`` (judged members among those sets) and ``target_share``.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    mem, non, tgt = (np.asarray(a, dtype=np.float64).ravel() for a in (member_scores, nonmember_scores, target_scores))
    if mem.size == 0 or non.size == 0:
        raise ValueError("the membership attack needs at least one member and one non-member score")
    labels = np.r_[np.ones(mem.size), np.zeros(non.size)]
    scores = np.r_[mem, non]
    fpr, tpr, thr = roc_curve(labels, scores)
    best = int(np.argmax(tpr - fpr))
    t = float(thr[best])
    return {
        "threshold": t,
        "auc": float(roc_auc_score(labels, scores)),
        "member_share": float((mem >= t).mean()),
        "nonmember_share": float((non >= t).mean()),
        "target_share": float((tgt >= t).mean()) if tgt.size else float("nan"),
    }


# ---------------------------------------------------------------------------------------------- experiment
class _Experiment:
    """One run: data, requests, evaluation sets, initial weights, training and prediction helpers;
    ``memory_budget``: the bytes the run's settings were judged with (:func:`check_settings`), its unlearner's."""

    def __init__(self, cfg: BNNConfig, memory_budget: int | None = None) -> None:
        self.cfg = cfg
        self.memory_budget = memory_budget
        self.device = torch.device(cfg.device)
        data = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, seed=cfg.seed)
        self.data = data
        arch = cfg.arch or _DEFAULT_ARCH[data.name]
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
        self.arch = arch
        if not 0 <= cfg.remove_class < data.n_classes:
            raise ValueError(
                f"--remove-class {cfg.remove_class} is not a class of {data.name} (0..{data.n_classes - 1})"
            )
        self.x_train, self.y_train = data.x_train.to(self.device), data.y_train.to(self.device)
        self.x_test, self.y_test = data.x_test.to(self.device), data.y_test.to(self.device)
        gen = torch.Generator().manual_seed(cfg.seed)
        cls_ids = class_indices(data.y_train, cfg.remove_class)
        if cls_ids.numel() == 0:
            raise ValueError(
                f"--remove-class {cfg.remove_class}: {data.name}'s training data holds no point of that class, "
                "so there is nothing to remove; choose a class present in the training data"
            )
        if data.n_test == 0:
            raise ValueError(f"{data.name}'s test split is empty: the evaluation needs test points")
        count: str | int = cfg.remove_count
        if count != "all":
            k = int(count)
            if not 0 < k <= cls_ids.numel():
                raise ValueError(
                    f"--remove-count {k}: class {cfg.remove_class} has {cls_ids.numel()} training points; "
                    "pass a number in that range or 'all'"
                )
        cap = cfg.max_requests * cfg.request_size
        if cap > 0 and (cls_ids.numel() if count == "all" else int(count)) > cap:
            count = cap
        if count != "all" and int(count) < cls_ids.numel():
            cls_ids = cls_ids[torch.randperm(cls_ids.numel(), generator=gen)[: int(count)]].sort().values
        if cls_ids.numel() >= data.n_train:
            raise ValueError("the removal would leave no training data")
        self.removed_ids = cls_ids
        order = cls_ids[torch.randperm(cls_ids.numel(), generator=gen)]
        self.requests = [order[i : i + cfg.request_size] for i in range(0, order.numel(), cfg.request_size)]
        last = len(self.requests) - 1
        self.progress_points = {i for i in range(len(self.requests)) if (i + 1) % cfg.eval_every == 0} | {last}
        keep = torch.ones(data.n_train, dtype=torch.bool)
        keep[cls_ids] = False
        self.kept_ids = torch.nonzero(keep).flatten()
        self.n_full, self.n_kept = data.n_train, int(keep.sum())
        # pre-training source (may hold out half of the test set, which then leaves the evaluation)
        self.self_pretrain = cfg.pretrain == "self"
        self.heldout_ids: torch.Tensor | None = None
        self.pre = self._pretraining_set() if cfg.pretrain and not self.self_pretrain else None
        test_pool = torch.arange(data.n_test)
        if self.heldout_ids is not None:
            perm = torch.randperm(data.n_test, generator=torch.Generator().manual_seed(cfg.seed))
            self.heldout_ids, test_pool = perm[: data.n_test // 2].sort().values, perm[data.n_test // 2 :].sort().values
        self.n_test_eval = int(test_pool.numel())
        # final evaluation sets: seeded subsets of at most eval_max points; the attack's held-out points (all
        # evaluation test points of the removed class) are kept whole
        test_ids = self._cap(test_pool, cfg.eval_max, gen)
        self.test_kept_mask = (data.y_test[test_ids] != cfg.remove_class).to(self.device)
        ids = {
            "remaining": ("train", self._cap(self.kept_ids, cfg.eval_max, gen)),
            "removed": ("train", self._cap(cls_ids, cfg.eval_max, gen)),
            "test": ("test", test_ids),
            "test_removed_class": ("test", test_pool[data.y_test[test_pool] == cfg.remove_class]),
        }
        self.eval_ids = ids
        self.sets = {k: self._take(src, i) for k, (src, i) in ids.items()}
        self.labels = {k: y for k, (_, y) in self.sets.items()}
        self.labels["test_kept"] = self.labels["test"][self.test_kept_mask]
        # progress snapshots: small subsets of the final sets
        p = cfg.progress_max
        kept_test = torch.nonzero(self.test_kept_mask.cpu()).flatten()
        sub = {
            "remaining": self._cap(torch.arange(self.labels["remaining"].numel()), p, gen),
            "removed": self._cap(torch.arange(self.labels["removed"].numel()), p, gen),
            "test_kept": self._cap(kept_test, p, gen),
        }
        src = {"remaining": "remaining", "removed": "removed", "test_kept": "test"}
        self.progress_sets = {k: tuple(t[i.to(self.device)] for t in self.sets[src[k]]) for k, i in sub.items()}
        self.scratch = self.new_model()  # (a forked random state: the draws below are unchanged)
        # the data and the requests are checked: the work (pre-training, chains) starts
        _apply_threads(cfg, sum(t.numel() for t in self.scratch.parameters()))
        self.init = self._initial_weights()
        self.dim = self.init.numel()

    @staticmethod
    def _cap(ids: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
        if m and ids.numel() > m:
            return ids[torch.randperm(ids.numel(), generator=gen)[:m]].sort().values
        return ids

    def _take(self, src: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (self.x_train, self.y_train) if src == "train" else (self.x_test, self.y_test)
        i = ids.to(self.device)
        return x[i], y[i]

    # ------------------------------------------------------------------ models
    def new_model(self, n_classes: int | None = None) -> BayesianNet:
        """A fresh network of the configured architecture on the device (weights to be assigned)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            m = build_model(self.arch, self.data.in_shape, n_classes or self.data.n_classes, self.cfg.prior_std)
        return m.to(self.device)

    def _pretraining_set(self) -> Any:
        """The pre-training data set, or ``None`` when it is absent and a fallback applies (said in the notes)."""
        cfg = self.cfg
        try:
            pre = load_dataset(cfg.pretrain, cfg.data_dir, cfg.download, seed=cfg.seed)
            # the same files found again (MNIST and Fashion-MNIST share file names): the pre-training set is absent
            k = min(16, pre.n_train, self.data.n_train)
            if k and pre.in_shape == self.data.in_shape and torch.equal(pre.y_train[:k], self.data.y_train[:k]):
                if torch.equal(pre.x_train[:k], self.data.x_train[:k]):
                    same = (
                        f"the files found for {cfg.pretrain} hold the {self.data.name} training images (the first "
                        f"{k} images and labels are equal), so {cfg.pretrain} counts as absent"
                    )
                    if cfg.pretrain_fallback is None:
                        raise ValueError(f"{same}; put the pre-training set in its own folder or pass --no-pretrain")
                    raise FileNotFoundError(same)
        except (FileNotFoundError, ImportError) as exc:
            if cfg.pretrain_fallback is None:
                raise
            first = str(exc).splitlines()[0].rstrip(".:")
            self.self_pretrain = cfg.pretrain_fallback == "self"
            opt = f"{cfg.pretrain_steps} SGD steps, lr {cfg.pretrain_lr:g}, momentum {cfg.pretrain_momentum:g}"
            if cfg.pretrain_fallback == "heldout":
                self.heldout_ids = torch.empty(0, dtype=torch.long)  # drawn by the caller
                instead = (
                    f"the shared initial weights are pre-trained the same way ({opt}) on a seeded half of the "
                    f"{self.data.name} test set ({self.data.n_test // 2} images), which is then left out of every "
                    "evaluation: like MNIST in the paper it is data no chain trains on, the same for origin and "
                    "the retrains; it includes images of the removed class, but never the removed training points"
                )
            elif self.self_pretrain:
                instead = (
                    f"every chain first runs the same optimiser ({opt}) on its own training data (origin: all "
                    "data; retrain: the remaining data), from shared random (seeded) initial weights, then the SGD "
                    "exploration and sampling phases; these steps count in each chain's training time"
                )
            else:
                instead = "the initial weights are random (seeded)"
            cfg.notes.append(
                f"pre-training on {cfg.pretrain} (the paper's initial weights: {cfg.pretrain_steps} SGD steps on it) "
                f"skipped: {first}. Instead {instead}"
            )
            return None
        if tuple(pre.in_shape) != tuple(self.data.in_shape):
            raise ValueError(
                f"pre-training set {pre.name} has images {pre.in_shape}, {self.data.name} has "
                f"{self.data.in_shape}; pick a pre-training set of the same shape"
            )
        return pre

    def _initial_weights(self) -> torch.Tensor:
        """The shared initial weights: random (seeded), then pre-trained on ``self.pre`` or the held-out test half."""
        cfg = self.cfg
        model = self.new_model()
        if self.self_pretrain and cfg.pretrain == "self":
            cfg.notes.append(
                f"pre-training on each chain's own data: {cfg.pretrain_steps} SGD steps (lr {cfg.pretrain_lr:g}, "
                f"momentum {cfg.pretrain_momentum:g}) from shared random initial weights, counted in training time"
            )
        if self.pre is not None:
            name, n_classes = self.pre.name, self.pre.n_classes
            x, y = self.pre.x_train.to(self.device), self.pre.y_train.to(self.device)
        elif self.heldout_ids is not None:
            name, n_classes = f"{self.data.name} (held-out test half)", self.data.n_classes
            i = self.heldout_ids.to(self.device)
            x, y = self.x_test[i], self.y_test[i]
        else:
            return _flat(model)
        src = self.new_model(n_classes)
        ds = RemovableDataset(x, y, batch_size=cfg.batch_size, seed=cfg.seed)
        _sgd(src, ds, cfg.pretrain_steps, cfg.pretrain_lr, cfg.pretrain_momentum, f"pretrain {name}", cfg.progress)
        _check_pretraining(src, x, y, n_classes, name, cfg)
        # copy every tensor whose shape matches (all but the output layer when the class counts differ)
        own = model.state_dict()
        copied = {k: v for k, v in src.state_dict().items() if k in own and own[k].shape == v.shape}
        model.load_state_dict({**own, **copied})
        cfg.notes.append(f"initial weights pre-trained on {name} ({len(copied)}/{len(own)} tensors copied)")
        return _flat(model)

    # ------------------------------------------------------------------ training
    def train(self, ids: torch.Tensor, chain_seed: int, label: str) -> dict[str, Any]:
        """Exploration SGD then sampling on the training points ``ids``; returns model, sampler, bank, timing."""
        cfg = self.cfg
        c0, t0 = time.process_time(), time.perf_counter()
        model = self.new_model()
        ParamSpec.assign(model, self.init)
        dev_ids = ids.to(self.device)
        ds = RemovableDataset(self.x_train[dev_ids], self.y_train[dev_ids], batch_size=cfg.batch_size, seed=chain_seed)
        n = len(ds)
        if self.self_pretrain:
            _sgd(
                model,
                ds,
                cfg.pretrain_steps,
                cfg.pretrain_lr,
                cfg.pretrain_momentum,
                f"{label}: pretrain",
                cfg.progress,
            )
        opt = torch.optim.SGD(model.parameters(), lr=cfg.explore_lr)
        for _ in _bar(range(cfg.explore_steps), f"{label}: explore", cfg.progress):
            opt.zero_grad()
            (_energy(model, next(ds), n) / n).backward()
            opt.step()
        sampler = _make_sampler(cfg, model, _step_size(cfg.sample_lr, n, 1), chain_seed)
        keep = max(1, cfg.sample_steps // max(1, cfg.bank_size))
        bank = run_chain(
            model,
            sampler,
            ds,
            _energy,
            cfg.sample_steps,
            n,
            lr_schedule=lambda t: _step_size(cfg.sample_lr, n, t + 1),
            keep_every=keep,
            progress=f"{label}: sample" if cfg.progress else None,
        )
        if bank is None or bank.shape[0] < 2:
            raise ValueError("too few stored samples: raise --sample-steps or --bank-size (need at least 2)")
        bank = bank[-cfg.bank_size :]
        if not torch.isfinite(bank).all():
            raise UnlearningError(f"{label}: the chain diverged (non-finite parameters); lower --sample-lr")
        return {
            "model": model,
            "sampler": sampler,
            "bank": bank,
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
        }

    # ------------------------------------------------------------------ prediction
    def predict(
        self, thetas: torch.Tensor, weights: torch.Tensor | None = None, snapshot: bool = False
    ) -> dict[str, torch.Tensor]:
        """Posterior predictive on the final evaluation sets (with ``test_kept`` taken from ``test``) or on the
        progress subsets (``snapshot=True``)."""
        sets = self.progress_sets if snapshot else self.sets
        probs = ev.predictive(self.scratch, ParamSpec.assign, thetas, {k: x for k, (x, _) in sets.items()}, weights)
        if not snapshot:
            probs["test_kept"] = probs["test"][self.test_kept_mask]
        return probs


class _Chain:
    """A live chain continued from the origin chain, with its own copy of the data index (one per method).

    Its sampler continues the origin's schedule ``(lr/n)·t^-0.5005`` (``t`` counted on from the end of training,
    ``n`` the current number of remaining points).
    """

    def __init__(self, ex: _Experiment, origin: dict[str, Any], seed: int) -> None:
        cfg = ex.cfg
        self.cfg = cfg
        self.model = copy.deepcopy(origin["model"])
        self.t = cfg.sample_steps + 1
        self.data = RemovableDataset(ex.x_train, ex.y_train, batch_size=cfg.batch_size, seed=seed)
        self.sampler = _make_sampler(cfg, self.model, self._lr(), seed)
        self.sampler.load_state_dict(_without_generator(origin["sampler"].state_dict()))
        self.steps = 0

    def _lr(self) -> float:
        return _step_size(self.cfg.sample_lr, len(self.data), self.t)

    def remove(self, ids: torch.Tensor) -> None:
        """Remove the points from this chain's data and set the step size for the new ``n``."""
        self.data.remove(ids)
        for g in self.sampler.param_groups:
            g["lr"] = self._lr()

    def run(self, steps: int = 0, seconds: float = 0.0) -> list[torch.Tensor]:
        """At least ``steps`` sampler steps on the remaining data, continuing until ``seconds`` have passed.

        Returns:
            The states visited (flat parameters).
        """
        t0 = time.perf_counter()
        states: list[torch.Tensor] = []
        n = len(self.data)
        while len(states) < steps or time.perf_counter() - t0 < seconds:
            for g in self.sampler.param_groups:
                g["lr"] = self._lr()
            self.sampler.zero_grad(set_to_none=False)
            _energy(self.model, next(self.data), n).backward()
            self.sampler.step()
            states.append(_flat(self.model))
            self.t += 1
        self.sampler.zero_grad()
        self.steps += len(states)
        return states


@dataclass
class _Result:
    """What a method leaves for the final evaluation."""

    bank: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    last: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


class _Progress:
    """Cheap progress snapshots (small subsets, few samples), timed apart from every method."""

    def __init__(self, ex: _Experiment, reference: torch.Tensor) -> None:
        self.ex = ex
        self.seconds = 0.0
        self.count = 0
        t0 = time.perf_counter()
        self.reference = ex.predict(_thin_to(reference, ex.cfg.progress_samples), snapshot=True)
        labels = {k: y for k, (_, y) in ex.progress_sets.items()}
        self.seconds += time.perf_counter() - t0
        # retrain on the same subsets and samples count: the level the curves should reach
        n_removed = int(ex.removed_ids.numel())
        self.points: dict[str, list[dict[str, Any]]] = {
            "retrain": [{"removed": n_removed, "error": ev.error_rates(self.reference, labels)}]
        }

    def take(self, name: str, thetas: torch.Tensor, removed: int) -> None:
        t0 = time.perf_counter()
        probs = self.ex.predict(_thin_to(thetas, self.ex.cfg.progress_samples), snapshot=True)
        labels = {k: y for k, (_, y) in self.ex.progress_sets.items()}
        point = {
            "removed": removed,
            "error": ev.error_rates(probs, labels),
            "pred_diff_test_kept": ev.pred_l1(self.reference["test_kept"], probs["test_kept"])
            if labels["test_kept"].numel()
            else None,
        }
        self.points.setdefault(name, []).append(point)
        self.seconds += time.perf_counter() - t0
        self.count += 1


# ---------------------------------------------------------------------------------------------- methods
def check_unlearner_kwarg(key: str, value: Any) -> Any:
    """Check one ``MCMCUnlearner`` keyword argument before any work (the library's own check of its value,
    :func:`~mcmc_unlearner.experiments.options.check_kwarg`); returns it as given.

    Raises:
        ValueError: An unknown keyword, or a value ``MCMCUnlearner`` would refuse (its message).
    """
    return check_kwarg(key, value)


def _unlearner(ex: _Experiment, model: nn.Module, sampler: torch.optim.Optimizer, bank: torch.Tensor) -> MCMCUnlearner:
    """``unlearn``: the library's unlearner, its defaults unless settings were given, with the memory budget in
    bytes that the run's settings were judged with before training (``ex.memory_budget``, where known)."""
    kw = _unlearner_overrides(ex.cfg)
    if ex.memory_budget is not None:
        kw["memory_budget"] = ex.memory_budget
    return MCMCUnlearner(model, sampler, bank=bank, seed=ex.cfg.seed, **kw)


def _sequence(
    ex: _Experiment,
    name: str,
    chain: _Chain,
    request: Callable[[int, torch.Tensor], dict[str, Any]],
    bank: Callable[[], torch.Tensor],
    progress: _Progress,
) -> dict[str, Any]:
    """Feed every request to ``request``; a refused one (:class:`UnlearningError`) is recorded and handled by the
    configured :class:`RefusalPolicy`. Returns timings (total over all requests, refusal handling included),
    refusals and per-request reports."""
    cfg = ex.cfg
    policy = RefusalPolicy(cfg.on_refusal)
    seconds: list[float] = []
    refusals: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []
    removed = repaired = 0
    cpu = 0.0
    for i, ids in enumerate(_bar(ex.requests, f"{name}: requests", cfg.progress)):
        c0, t0 = time.process_time(), time.perf_counter()
        try:
            rep = request(i, ids)
        except UnlearningError as exc:
            refusal = {"request": i, "error": type(exc).__name__, "message": str(exc)}
            report = getattr(exc, "report", None)  # QualityError: what the refused proposal would have done
            if report is not None and hasattr(report, "to_dict"):
                refusal["report"] = report.to_dict()
            refusals.append(refusal)
            chain.remove(ids)
            if policy is RefusalPolicy.SGLD and cfg.repair_steps > 0:
                repaired += len(chain.run(cfg.repair_steps))
            rep = {"refused": True}
        seconds.append(time.perf_counter() - t0)
        cpu += time.process_time() - c0
        reports.append(rep)
        removed += ids.numel()
        if i in ex.progress_points:
            progress.take(name, bank(), removed)
    return {
        "seconds": float(sum(seconds)),
        "cpu_seconds": cpu,
        "seconds_per_request": float(np.mean(seconds)),
        "seconds_median": float(np.median(seconds)),
        "seconds_max": float(max(seconds)),
        "request_seconds": seconds,
        "refused": len(refusals),
        "refusals": refusals,
        "on_refusal": policy.value,
        "repair_steps": repaired,
        "n_remaining_after": len(chain.data),
        "requests": reports,
    }


def _run_unlearner(ex: _Experiment, origin: dict[str, Any], progress: _Progress, seed: int) -> tuple[_Result, _Chain]:
    """``unlearn``: the library's :class:`MCMCUnlearner` on a live chain and the stored bank."""
    cfg = ex.cfg
    chain = _Chain(ex, origin, seed)
    un = _unlearner(ex, chain.model, chain.sampler, origin["bank"])

    def request(i: int, ids: torch.Tensor) -> dict[str, Any]:
        if cfg.solver == "lissa":
            un.scaling = cfg.init_scaling / (len(chain.data) - ids.numel())
        return un.forget(ids, chain.data).to_dict()

    info = _sequence(ex, "unlearn", chain, request, lambda: un.bank, progress)
    return _Result(bank=un.bank, last=_flat(chain.model), info=info), chain


def _run_paper(ex: _Experiment, origin: dict[str, Any], progress: _Progress, seed: int) -> _Result:
    """``paper``: the reference procedure (:class:`~mcmc_unlearner.experiments.paper.PaperUnlearner`) with the
    BNN scripts' settings; every stored sample moves by the live chain's influence shift (Algorithm 1)."""
    from .paper import PaperUnlearner

    cfg = ex.cfg
    chain = _Chain(ex, origin, seed)
    pu = PaperUnlearner(
        chain.model,
        chain.sampler,
        iter_T=cfg.paper_iter_T,
        samp_T=cfg.paper_samp_T,
        init_scaling=cfg.paper_init_scaling,
        rescale_lr=True,
        bank=origin["bank"],
    )

    def request(i: int, ids: torch.Tensor) -> dict[str, Any]:
        return {k: v for k, v in pu.forget(ids, chain.data).items() if k != "shift"}

    info = _sequence(ex, "paper", chain, request, lambda: pu.bank, progress)
    return _Result(bank=pu.bank, last=_flat(chain.model), info=info)


def _run_noisy(
    ex: _Experiment,
    origin: dict[str, Any],
    progress: _Progress,
    seed: int,
    name: str,
    budget: Callable[[int], tuple[int, float]],
) -> _Result:
    """``finetune`` / ``langevin``: after each request, sampler steps on the remaining data (``budget(i)`` gives
    the minimum steps and the seconds to fill); the states since the latest request form the bank."""
    cfg = ex.cfg
    chain = _Chain(ex, origin, seed)
    states: list[torch.Tensor] = [_flat(chain.model)]

    def request(i: int, ids: torch.Tensor) -> dict[str, Any]:
        chain.remove(ids)
        steps, seconds = budget(i)
        states[:] = chain.run(steps, seconds)
        return {"sampler_steps": len(states)}

    info = _sequence(ex, name, chain, request, lambda: _thin_to(torch.stack(states), cfg.bank_size), progress)
    info["sampler_steps"] = chain.steps
    return _Result(bank=_thin_to(torch.stack(states), cfg.bank_size), last=_flat(chain.model), info=info)


def _run_importance(ex: _Experiment, origin: dict[str, Any]) -> _Result:
    """Reweight the stored samples by ``1/p(S'|θ)`` over all removed points."""
    c0, t0 = time.process_time(), time.perf_counter()
    x, y = ex.x_train[ex.removed_ids.to(ex.device)], ex.y_train[ex.removed_ids.to(ex.device)]
    bank = origin["bank"]
    log_w = torch.empty(bank.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for j, theta in enumerate(bank):
            ParamSpec.assign(ex.scratch, theta)
            log_w[j] = sum(
                ex.scratch.nll((x[i : i + 500], y[i : i + 500])).double().sum() for i in range(0, len(y), 500)
            )
    w, ess = importance_weights(log_w)
    info = {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "ess": ess,
        "max_weight": float(w.max()),
        "n_samples": int(w.numel()),
    }
    if ess < 10:
        ex.cfg.notes.append(
            f"importance: ESS {ess:.2f} of {w.numel()} samples, so its weighted KL rests on about one sample "
            "and its predictive on the highest-weight sample(s); treat its KL as unreliable"
        )
    return _Result(bank=bank, weights=w, last=bank[int(w.argmax())], info=info)


# ---------------------------------------------------------------------------------------------- the run


def _check_device(device: str) -> None:
    """Refuse a ``--device`` that is not one of :data:`DEVICES`, or that this machine does not have."""
    problem = device_problem(device)
    if problem:
        raise ValueError(problem)
    m = re.fullmatch(r"(cpu|cuda|mps)(?::([0-9]{1,3}))?", device)
    assert m is not None  # (checked above)
    kind, index = m.group(1), m.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} requested but torch sees no CUDA device; use --device cpu")
        if index is not None and int(index) >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s) (cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1})"
            )
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("--device mps requested but torch sees no MPS device; use --device cpu")


def _resolve(cfg: BNNConfig) -> BNNConfig:
    """The run's settings, checked and resolved (:func:`_resolve_run`'s)."""
    return _resolve_run(cfg)[0]


def _resolve_run(cfg: BNNConfig) -> tuple[BNNConfig, int | None]:
    """The run's settings, checked and resolved, with the memory budget in bytes its unlearner was judged with
    (:func:`check_settings`'s; ``None``: the run builds no unlearner)."""
    # torch-free (the command line's check before torch), through the unlearner's combinations on the run's network
    budget = check_settings(cfg)
    if cfg.pretrain_fallback not in (None, "heldout", "self", "none"):
        raise ValueError(
            f"pretrain_fallback must be None, 'heldout', 'self' or 'none', got {shown_value(cfg.pretrain_fallback)}"
        )
    for flag, least, note in _COUNT_LIMITS:
        v = getattr(cfg, flag.replace("-", "_"))
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            what = f" ({note})" if note else ""
            raise ValueError(f"--{flag} must be a whole number >= {least}{what}, got {shown_value(v)}")
    for flag in _POSITIVE:
        v = getattr(cfg, flag.replace("-", "_"))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise ValueError(f"--{flag} must be a positive finite number, got {shown_value(v)}")
    if isinstance(cfg.pretrain_lr, bool) or not isinstance(cfg.pretrain_lr, (int, float)) or not cfg.pretrain_lr > 0:
        raise ValueError(f"pretrain_lr must be a positive number, got {shown_value(cfg.pretrain_lr)}")
    if not cfg.methods:
        raise ValueError(f"--methods is empty; name at least one of {','.join(OPTIONAL_METHODS)}")
    if cfg.threads != "auto" and (isinstance(cfg.threads, bool) or not isinstance(cfg.threads, int) or cfg.threads < 0):
        from ..cli import THREADS_VALUES

        raise ValueError(f"--threads must be {THREADS_VALUES}; got {shown_value(cfg.threads)}")
    _check_device(cfg.device)
    if cfg.langevin_steps <= 0:
        cfg = replace(cfg, langevin_steps=cfg.paper_samp_T + 2 * cfg.paper_iter_T)
    return replace(cfg, methods=tuple(m for m in OPTIONAL_METHODS if m in cfg.methods)), budget


def _check_save_model_vs_out(save_model: str | Path, out: str | Path) -> None:
    """Refuse ``--save-model`` naming ``--out`` or a folder above it (the run's own folder would make it
    non-empty, found only after training)."""
    sm, o = Path(save_model).resolve(), Path(out).resolve()
    if sm == o:
        raise ValueError("--save-model and --out name the same folder; choose two different folders")
    if sm in o.parents:
        raise ValueError(
            f"--save-model {str(save_model)!a} holds --out {str(out)!a}; a model is saved into a new or empty "
            "folder, so choose two folders that do not contain each other"
        )


def run_bnn(cfg: BNNConfig, out: str | Path | None = None) -> dict[str, Any]:
    """Run the experiment; returns the metrics dict (and writes metrics.json, report.md, figures to ``out``).

    Args:
        cfg: Settings.
        out: Output folder: new or empty (created; checked and held before any work, so that another run's
            results are never replaced or mixed with these); ``None`` writes nothing.
    """
    cfg, budget = _resolve_run(replace(cfg, notes=list(cfg.notes)))
    if out is not None and cfg.save_model is not None:
        _check_save_model_vs_out(cfg.save_model, out)
    # the output folder is checked and held (a marker file) before any work: a second run into it is refused
    with claimed_out_dir(out, "bnn") if out is not None else contextlib.nullcontext() as out_dir:
        with _torch_threads(cfg.threads):
            metrics = _run(cfg, budget)
        if out_dir is not None:
            _write_outputs(metrics, out_dir)
    return metrics


#: What a failed method raised when the library refused to go on (a request it would not apply, a budget, an
#: invalid setting), as opposed to an internal error: ``bnn`` exits ``REFUSED`` or ``INTERNAL`` accordingly.
REFUSALS = (UnlearningError, MemoryError, ValueError)


def _guarded(name: str, cfg: BNNConfig, failures: dict[str, tuple[str, bool]], fn: Callable[[], Any]) -> Any:
    """Run one method; an unexpected error is recorded (and printed) instead of ending the whole run:
    ``failures[name]`` = (the error as one line, whether it is a refusal, :data:`REFUSALS`)."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        failures[name] = (error, isinstance(exc, REFUSALS))
        cfg.notes.append(f"{name} FAILED ({error}); its metrics are empty")
        from ..cli import DEBUG_ENV, flat

        if os.environ.get(DEBUG_ENV):
            print(f"mcmc-unlearner bnn: {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
        else:  # one line, as every refusal (the run goes on; the exit code says a method failed)
            print(f"mcmc-unlearner bnn: {name} failed: {flat(error)}", file=sys.stderr)
        return None


def _run(cfg: BNNConfig, memory_budget: int | None) -> dict[str, Any]:
    c_start, t_start = time.process_time(), time.perf_counter()
    ex = _Experiment(cfg, memory_budget)
    s = cfg.seed * 1000
    origin = ex.train(torch.arange(ex.n_full), s + 1, "origin")
    names = _retrain_names(cfg.retrain_chains)
    # chain seeds: retrain s+2, retrain-b s+3 (as before), further chains s+10, s+11, ...
    seeds = [s + 2, s + 3, *(s + 10 + i for i in range(cfg.retrain_chains - 2))]
    retrains = {nm: ex.train(ex.kept_ids, sd, nm) for nm, sd in zip(names, seeds)}
    t_train = time.perf_counter() - t_start
    results: dict[str, _Result] = {
        nm: _Result(
            bank=r["bank"], last=_flat(r["model"]), info={"seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"]}
        )
        for nm, r in {"origin": origin, **retrains}.items()
    }
    results["origin"].info["seconds_note"] = "training on all data"
    if cfg.save_model:
        _save_origin(cfg, ex, origin)
    progress = _Progress(ex, retrains["retrain"]["bank"])
    progress.take("origin", origin["bank"], 0)
    failures: dict[str, tuple[str, bool]] = {}

    if "unlearn" in cfg.methods:
        got = _guarded("unlearn", cfg, failures, lambda: _run_unlearner(ex, origin, progress, s + 4))
        if got is not None:
            results["unlearn"], chain_u = got
            if cfg.extra_finetune_steps > 0:
                t0 = time.perf_counter()
                extra = chain_u.run(cfg.extra_finetune_steps)
                results["unlearn+finetune"] = _Result(
                    bank=_thin_to(torch.stack(extra), cfg.bank_size),
                    last=_flat(chain_u.model),
                    info={
                        "seconds": results["unlearn"].info["seconds"] + time.perf_counter() - t0,
                        "sampler_steps": cfg.extra_finetune_steps,
                    },
                )
    if "finetune" in cfg.methods and "unlearn" in results:
        per = results["unlearn"].info["request_seconds"]
        results["finetune"] = _guarded(
            "finetune",
            cfg,
            failures,
            lambda: _run_noisy(ex, origin, progress, s + 5, "finetune", lambda i: (2, per[i])),
        )
    if "paper" in cfg.methods:
        results["paper"] = _guarded("paper", cfg, failures, lambda: _run_paper(ex, origin, progress, s + 6))
    if "langevin" in cfg.methods:
        k = cfg.langevin_steps
        results["langevin"] = _guarded(
            "langevin", cfg, failures, lambda: _run_noisy(ex, origin, progress, s + 7, "langevin", lambda i: (k, 0.0))
        )
    if "importance" in cfg.methods:
        results["importance"] = _guarded("importance", cfg, failures, lambda: _run_importance(ex, origin))
    for name in failures:
        error, refusal = failures[name]
        results[name] = _Result(info={"failed": error, "failed_refusal": refusal})
    results = {k: v for k, v in results.items() if v is not None}

    c0, t0 = time.process_time(), time.perf_counter()
    methods, floor, chains = _evaluate(ex, results, names)
    t_eval, c_eval = time.perf_counter() - t0, time.process_time() - c0
    metrics: dict[str, Any] = {
        "experiment": "bnn",
        "config": {k: v for k, v in asdict(cfg).items() if k != "notes"},
        "notes": cfg.notes,
        "dataset": {
            "name": ex.data.name,
            "n_train": ex.n_full,
            "n_test": ex.data.n_test,
            "n_test_evaluated_from": ex.n_test_eval,
            "n_removed": int(ex.removed_ids.numel()),
            "n_remaining": ex.n_kept,
            "n_requests": len(ex.requests),
            "eval_sizes": {k: int(v.numel()) for k, v in ex.labels.items()},
            "input": f"{ex.data.in_shape[1]}x{ex.data.in_shape[2]}"
            + (" (28x28 zero-padded by 2 pixels)" if ex.data.name in ("mnist", "fashion-mnist") else ""),
        },
        "model": {"arch": ex.arch, "n_params": ex.dim, "prior_std": cfg.prior_std},
        "unlearner_settings": ", ".join(f"{k}={v}" for k, v in _unlearner_overrides(cfg).items())
        or "with the library's defaults",
        "kl": {
            "n_samples_retrain": int(results["retrain"].bank.shape[0]),
            "dim": ex.dim,
            "k": 1,
            "noise_floor": "retrain-b",
        },
        "methods": methods,
        "floor": floor,
        "retrain_chains": chains,
        "refused": {k: v.get("refused", 0) for k, v in methods.items() if k in _SEQUENTIAL},
        "evaluation": {
            "seconds": t_eval,
            "cpu_seconds": c_eval,
            "samples": cfg.eval_samples or "all",
            "progress_seconds": progress.seconds,
            "progress_snapshots": progress.count,
            "progress_points": cfg.progress_max,
            "progress_samples": cfg.progress_samples,
            "attack": _ATTACK,
            "distance": _DISTANCE,
        },
        "timing": {
            "training_seconds": t_train,
            "total_seconds": time.perf_counter() - t_start,
            "total_cpu_seconds": time.process_time() - c_start,
            "threads": torch.get_num_threads(),
            "note": _cpu_note(torch.get_num_threads()),
        },
        "progress": progress.points,
    }
    metrics["targets"] = _targets(metrics)
    return metrics


def _cpu_note(threads: int) -> str:
    """How to read ``cpu_seconds`` for a run on ``threads`` torch threads."""
    if threads == 1:
        return "cpu_seconds = CPU time of this process (one torch thread): about the wall time on an idle core"
    return (
        f"cpu_seconds = CPU time of this process ({threads} torch threads): the threads' CPU times add up, so up to "
        f"{threads}x the wall time on idle cores"
    )


_ATTACK = (
    "likelihood-ratio attack: score(x, y) = log p_method(y|x) - log p_ref(y|x), p_ref = the pooled posterior "
    "predictive of the retrain chains other than 'retrain' (for a retrain chain: all other retrain chains); "
    "AUC of the removed training points (members) against all test points of the removed class (non-members). "
    "auc_removed_vs_test_same_class: the same without calibration (loss/confidence threshold)."
)
_DISTANCE = (
    "distance to retraining = median over the retrain chains (other than the method itself) of the per-example "
    "mean L1 (pred_diff) and KL(retrain || method) (pred_kl) between posterior predictives, and of |error - error of "
    "the chain| (error_gap); the floor is the median of the same quantity over pairs of retrain chains"
)


def _without_generator(state: dict[str, Any]) -> dict[str, Any]:
    """A sampler's state without its noise generator's: a method's chain continues the origin's step size and
    velocity with noise of its own."""
    return {k: v for k, v in state.items() if k != "generator"}


def _weighted_thin(w: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``k`` samples of a weighted set and their weights (summing to 1), by systematic resampling: sample
    ``i`` is kept with weight ``c_i / k``, ``c_i`` the number of the points ``(j + u) / k``, ``j < k``, of the
    weights' cumulative sum that fall on it, ``u`` uniform on [0, 1) from ``generator``: ``E[c_i / k] = w_i``
    (``k <= 0``, or no more samples than ``k``: all, as weighted). Until stop 46 the ``k`` highest weights,
    renormalised (a weighted predictive 0.114 off in L1 against 0.041, stop 46's probe); at stops 46-47 ``u = 0.5``,
    not random: biased per call (weights [0.2, 0.2, 0.6] to 2 samples gave [0, 0.5, 0.5])."""
    w = w.detach().double().cpu()
    if k <= 0 or w.numel() <= k:
        return torch.arange(w.numel()), w / w.sum()
    cum = torch.cumsum(w / w.sum(), 0)
    u = torch.rand((), dtype=torch.float64, generator=generator)
    points = (torch.arange(k, dtype=torch.float64) + u) / k
    # sample i owns [cum_{i-1}, cum_i): a zero weight owns nothing; rounding past the end goes to the last positive
    last = int(torch.nonzero(w > 0)[-1])
    idx = torch.searchsorted(cum, points, side="right").clamp_max(last)
    keep, counts = torch.unique(idx, return_counts=True)
    return keep, counts.double() / k


def _evaluate(
    ex: _Experiment, results: dict[str, _Result], chain_names: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Final metrics of every method, the retrain-pair floor and the retrain chains' spread."""
    cfg = ex.cfg
    probs: dict[str, dict[str, torch.Tensor]] = {}
    last: dict[str, dict[str, torch.Tensor]] = {}
    evaluated: dict[str, int] = {}
    for name, r in _bar(list(results.items()), "evaluate", cfg.progress):
        if r.bank is None:
            continue
        if r.weights is None:
            probs[name] = ex.predict(_thin_to(r.bank, cfg.eval_samples))
        else:
            # the offset's own seed (s + 8, beside the methods' s + 1 ... s + 7): reproducible; every weighted method
            # gets the same offset
            keep, w = _weighted_thin(r.weights, cfg.eval_samples, torch.Generator().manual_seed(cfg.seed * 1000 + 8))
            probs[name] = ex.predict(r.bank[keep], w)
            evaluated[name] = int(keep.numel())
        last[name] = ex.predict(r.last[None])
    chains = [probs[c] for c in chain_names]
    chains_last = [last[c] for c in chain_names]
    errors = {k: ev.error_rates(p, ex.labels) for k, p in probs.items()}
    errors_last = {k: ev.error_rates(p, ex.labels) for k, p in last.items()}

    def refs(name: str) -> list[str]:
        # the attack's reference chains: all retrain chains but 'retrain' and the method itself
        others = [c for c in chain_names if c != name]
        return others if name in chain_names else chain_names[1:]

    def logp(p: dict[str, torch.Tensor], split: str) -> np.ndarray:
        return ev.log_true_prob(p[split], ex.labels[split])

    def attack(p: dict[str, torch.Tensor], name: str) -> dict[str, Any]:
        ref = ev.pooled([probs[c] for c in refs(name)])
        res = confidence_attack(logp(p, "remaining"), logp(p, "test"), logp(p, "removed"))
        return {
            "auc_removed": ev.likelihood_ratio_auc(
                logp(p, "removed"), logp(p, "test_removed_class"), logp(ref, "removed"), logp(ref, "test_removed_class")
            ),
            "auc_removed_vs_test_same_class": ev.loss_auc(logp(p, "removed"), logp(p, "test_removed_class")),
            "threshold": float(math.exp(res["threshold"])),
            "removed_share": res["target_share"],
            "remaining_share": res["member_share"],
            "test_share": res["nonmember_share"],
            "auc_remaining_vs_test": res["auc"],
            "reference_chains": refs(name),
        }

    out: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        m: dict[str, Any] = {"status": "failed" if name not in probs else "ok", **r.info}
        if name not in probs:
            for key in ("error", "error_last", "error_gap", "pred_diff", "pred_kl", "pred_diff_last"):
                m[key] = dict.fromkeys(_SPLITS)
            m["mia"] = {"auc_removed": None, "auc_removed_vs_test_same_class": None, "removed_share": None}
            m.setdefault("seconds", None)
            m["kl_to_retrain"] = None
            out[name] = m
            continue
        others = [i for i, c in enumerate(chain_names) if c != name]
        m["error"], m["error_last"] = errors[name], errors_last[name]
        m["error_gap"] = ev.error_gaps(errors[name], [errors[chain_names[i]] for i in others])
        m["error_gap_last"] = ev.error_gaps(errors_last[name], [errors_last[chain_names[i]] for i in others])
        dist = ev.distance_to_chains(probs[name], [chains[i] for i in others], _SPLITS)
        m["pred_diff"], m["pred_kl"] = dist["l1"], dist["kl"]
        m["pred_diff_last"] = ev.distance_to_chains(last[name], [chains_last[i] for i in others], _SPLITS)["l1"]
        m["mia"], m["mia_last"] = attack(probs[name], name), attack(last[name], name)
        if name == "retrain":
            m["kl_to_retrain"] = 0.0
        elif r.weights is not None:
            m["kl_to_retrain"] = weighted_knn_kl(r.bank, r.weights, results["retrain"].bank)
        else:
            m["kl_to_retrain"] = knn_kl(r.bank.cpu(), results["retrain"].bank.cpu(), k=1)
        m["n_samples"] = int(r.bank.shape[0])
        m["n_samples_evaluated"] = evaluated.get(name, int(min(r.bank.shape[0], cfg.eval_samples or r.bank.shape[0])))
        out[name] = m

    pf, pf_last = ev.pair_floor(chains, _SPLITS), ev.pair_floor(chains_last, _SPLITS)

    def pair_gaps(errs: list[dict[str, float | None]]) -> dict[str, float | None]:
        res: dict[str, float | None] = {}
        for split in _SPLITS:
            vals = [
                abs(a[split] - b[split])
                for i, a in enumerate(errs)
                for b in errs[i + 1 :]
                if a[split] is not None and b[split] is not None
            ]
            res[split] = ev._median(vals) if vals else None
        return res

    floor = {
        "pred_diff": pf["l1"],
        "pred_kl": pf["kl"],
        "pred_diff_last": pf_last["l1"],
        "error_gap": pair_gaps([errors[c] for c in chain_names]),
        "error_gap_last": pair_gaps([errors_last[c] for c in chain_names]),
        "pairs": pf["pairs"],
        "chains": len(chain_names),
    }
    spread = {
        "names": chain_names,
        "seconds": ev.spread([out[c]["seconds"] for c in chain_names]),
        "cpu_seconds": ev.spread([out[c]["cpu_seconds"] for c in chain_names]),
        "error": {k: ev.spread([errors[c][k] for c in chain_names]) for k in _SPLITS},
        "auc_removed": ev.spread([out[c]["mia"]["auc_removed"] for c in chain_names]),
    }
    if len(chain_names) < 3:
        # each retrain chain's attack reference is the other chain: two chains' likelihood ratios are exact
        # negatives, their AUCs sum to 1 (mean 0.5 always, sd √2·|AUC − 0.5|), which is no measure of the noise
        spread["auc_removed"].update(
            sd=None, note="two retrain chains attack each other (AUCs sum to 1): run 3 or more for a spread"
        )
    return out, floor, spread


def _save_origin(cfg: BNNConfig, ex: _Experiment, origin: dict[str, Any]) -> None:
    """Save the all-data chain (model, sampler, bank, data state, unlearner settings) as a model folder."""
    from .. import store

    model = copy.deepcopy(origin["model"])
    sampler = _make_sampler(cfg, model, origin["sampler"].param_groups[0]["lr"], 0)
    sampler.load_state_dict(_without_generator(origin["sampler"].state_dict()))
    sampler.generator.set_state(origin["sampler"].generator.get_state())
    data = RemovableDataset(ex.data.x_train, ex.data.y_train, batch_size=cfg.batch_size, seed=cfg.seed)
    un = _unlearner(ex, model, sampler, origin["bank"])
    # built with the bytes this run judged its settings with; the folder keeps the budget as given (None, "25%": the
    # share of the memory where it is loaded, as the library saves them), not this machine's bytes
    given = _unlearner_overrides(cfg).get("memory_budget")
    if given is None or isinstance(given, str):
        un._memory_budget_option = given
    store.save_model(
        cfg.save_model,
        model=model,
        sampler=sampler,
        data=data,
        unlearner=un,
        model_spec=store.bnn_model_spec(ex.arch, ex.data.in_shape, ex.data.n_classes, cfg.prior_std),
        data_spec=store.image_data_spec(ex.data.name, cfg.seed, cfg.data_dir),
        extra={"experiment": "bnn", "config": {k: v for k, v in asdict(cfg).items() if k != "notes"}},
    )
    cfg.notes.append(f"chain trained on all data saved to {cfg.save_model}")


def _targets(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 12's acceptance targets for ``unlearn``, against ``retrain`` and the retrain-pair floor (one seed;
    the issue asks for at least three)."""
    me = m["methods"]
    un, re, pa = me.get("unlearn"), me["retrain"], me.get("paper")
    if un is None or un["status"] != "ok":
        return {}
    out: dict[str, dict[str, Any]] = {}
    g = un["error_gap"]["removed"]
    out["removed_error_within_5pts"] = {"gap": g, "met": g is not None and g <= 0.05}
    fl = m["floor"]["pred_diff"]["test_kept"]
    d = un["pred_diff"]["test_kept"]
    ratio = d / fl if d is not None and fl else None
    out["pred_diff_test_kept_within_1.5x_floor"] = {
        "pred_diff": d,
        "floor": fl,
        "ratio": ratio,
        "met": ratio is not None and ratio <= 1.5,
    }
    a, b = un["mia"]["auc_removed"], re["mia"]["auc_removed"]
    g = None if a is None or b is None else abs(a - b)
    # the attack's own noise across retrain chains (None with two chains: see _evaluate)
    sd = m.get("retrain_chains", {}).get("auc_removed", {}).get("sd")
    out["attack_auc_within_0.05_of_retrain"] = {
        "auc": a,
        "retrain": b,
        "gap": g,
        "retrain_chains_sd": sd,
        "met": g is not None and g <= 0.05,
    }

    # times: CPU seconds of the one-thread process (about the wall time on an idle core; wall time on a busy
    # machine mostly measures the other processes), wall-clock ratios beside them
    def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
        return a[key] / b[key] if a.get(key) is not None and b.get(key) else None

    r_cpu, r_wall = ratio(un, re, "cpu_seconds"), ratio(un, re, "seconds")
    r = r_cpu if r_cpu is not None else r_wall
    out["time_at_most_2pct_of_retrain"] = {"ratio": r, "ratio_wall": r_wall, "met": r is not None and r <= 0.02}
    if pa is not None and pa["status"] == "ok":
        s_cpu, s_wall = ratio(pa, un, "cpu_seconds"), ratio(pa, un, "seconds")
        speedup = s_cpu if s_cpu is not None else s_wall
        dp = pa["pred_diff"]["test_kept"]
        out["10x_faster_than_paper_at_equal_or_better_distance"] = {
            "speedup": speedup,
            "speedup_wall": s_wall,
            "pred_diff": d,
            "pred_diff_paper": dp,
            "met": speedup is not None and speedup >= 10 and d is not None and dp is not None and d <= dp,
        }
    return out


# ---------------------------------------------------------------------------------------------- outputs
def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{100 * v:.1f}" if pct else (f"{v:.3g}" if isinstance(v, float) else str(v))


def _report(m: dict[str, Any]) -> str:
    d, c, fl, ev_ = m["dataset"], m["config"], m["floor"], m["evaluation"]
    fl_pd = fl["pred_diff"]["test_kept"]
    lines = [
        f"# BNN unlearning: {d['name']}, {m['model']['arch']} ({m['model']['n_params']:,} parameters)",
        "",
        f"Removed {d['n_removed']} training points (class {c['remove_class']}) of {d['n_train']} in "
        f"{d['n_requests']} requests of {c['request_size']}; {d['n_remaining']} remain. Input {d['input']}. "
        f"Sampler {c['sampler']}, {c['explore_steps']} SGD exploration + {c['sample_steps']} sampling steps, bank of "
        f"{c['bank_size']}, {fl['chains']} retrain chains, seed {c['seed']}."
        # only the methods that ran are described (stop 45's probe: `--methods unlearn,paper` described langevin)
        + (f" unlearn: MCMCUnlearner {m['unlearner_settings']}." if "unlearn" in m["methods"] else "")
        + (
            f" paper: LiSSA, iter_T {c['paper_iter_T']}, samp_T {c['paper_samp_T']}, scaling "
            f"{c['paper_init_scaling']:g}/n."
            if "paper" in m["methods"]
            else ""
        )
        + (f" langevin: {c['langevin_steps']} SGLD steps per request." if "langevin" in m["methods"] else "")
        + f" Refused requests: policy `{c['on_refusal']}`.",
        "",
        "## Distance to retraining (posterior predictive)",
        "",
        "Errors in %. |Δ| = median over retrain chains of |error − that chain's error| (points). L1 / KL = mean "
        "per-example distance between predictive distributions, median over retrain chains (test points of the kept "
        f"classes); floor = median over pairs of retrain chains: L1 {_fmt(fl_pd)}, "
        f"KL {_fmt(fl['pred_kl']['test_kept'])}"
        f", |Δ removed| {_fmt(fl['error_gap']['removed'], True)}, |Δ test kept| "
        f"{_fmt(fl['error_gap']['test_kept'], True)}. LR AUC = likelihood-ratio attack, removed points vs test points "
        "of the same class (0.5 = indistinguishable; see below); loss AUC = the same without calibration. Seconds: "
        "total over all requests (retrain/origin: training).",
        "",
        "| method | removed err | test-kept err | \\|Δ\\| removed | \\|Δ\\| test-kept | L1 test-kept (× floor) "
        "| KL test-kept | LR AUC | loss AUC | seconds | refused |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in m["methods"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | FAILED: {r.get('failed', '')} |||||||||| ")
            continue
        e, g = r["error"], r["error_gap"]
        pd = r["pred_diff"]["test_kept"]
        times = f"{_fmt(pd)} ({pd / fl_pd:.2f}×)" if pd is not None and fl_pd else _fmt(pd)
        lines.append(
            f"| {name} | {_fmt(e['removed'], True)} | {_fmt(e['test_kept'], True)} | {_fmt(g['removed'], True)} | "
            f"{_fmt(g['test_kept'], True)} | {times} | {_fmt(r['pred_kl']['test_kept'])} | "
            f"{_fmt(r['mia']['auc_removed'])} | {_fmt(r['mia']['auc_removed_vs_test_same_class'])} | "
            f"{_fmt(r['seconds'])} | {r.get('refused', '')} |"
        )
    lines += [
        "",
        "## Single chain state",
        "",
        "The last chain state"
        + (" (importance: its highest-weight sample). " if "importance" in m["methods"] else ". ")
        + f"Floor: L1 {_fmt(fl['pred_diff_last']['test_kept'])}"
        f", |Δ removed| {_fmt(fl['error_gap_last']['removed'], True)}.",
        "",
        "| method | removed err | test-kept err | \\|Δ\\| removed | L1 test-kept | LR AUC |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in m["methods"].items():
        if r["status"] != "ok":
            continue
        e = r["error_last"]
        lines.append(
            f"| {name} | {_fmt(e['removed'], True)} | {_fmt(e['test_kept'], True)} | "
            f"{_fmt(r['error_gap_last']['removed'], True)} | {_fmt(r['pred_diff_last']['test_kept'])} | "
            f"{_fmt(r['mia_last']['auc_removed'])} |"
        )
    lines += ["", "## Requests and costs", ""]
    for name in _SEQUENTIAL:
        r = m["methods"].get(name)
        if r is None or r["status"] != "ok":
            continue
        extra = f", {r['sampler_steps']} sampler steps in all" if "sampler_steps" in r else ""
        lines.append(
            f"- {name}: {_fmt(r['seconds'])} s ({_fmt(r['cpu_seconds'])} s CPU) for {d['n_requests']} requests "
            f"(median {_fmt(r['seconds_median'])} s, "
            f"max {_fmt(r['seconds_max'])} s){extra}; refused {r['refused']}"
            + (
                f" (first: request {r['refusals'][0]['request']}: {r['refusals'][0]['message'][:300]})"
                if r["refused"]
                else ""
            )
        )
    if "importance" in m["methods"] and m["methods"]["importance"]["status"] == "ok":
        imp = m["methods"]["importance"]
        lines.append(f"- importance: ESS {imp['ess']:.2f} of {imp['n_samples']} samples, {_fmt(imp['seconds'])} s")
    rc = m["retrain_chains"]
    lines += [
        f"- retrain chains: training {_fmt(rc['seconds']['mean'])} s each (sd {_fmt(rc['seconds']['sd'])}; "
        f"{_fmt(rc['cpu_seconds']['mean'])} s CPU); "
        f"removed error {_fmt(rc['error']['removed']['mean'], True)}% (sd {_fmt(rc['error']['removed']['sd'], True)}), "
        f"test-kept error {_fmt(rc['error']['test_kept']['mean'], True)}% "
        f"(sd {_fmt(rc['error']['test_kept']['sd'], True)}), "
        f"LR AUC {_fmt(rc['auc_removed']['mean'])} (sd {_fmt(rc['auc_removed']['sd'])})",
        f"- evaluation: {_fmt(ev_['seconds'])} s for the final metrics ({ev_['samples']} samples per method; sizes "
        f"{json.dumps(d['eval_sizes'])}); {ev_['progress_snapshots']} progress snapshots, "
        f"{_fmt(ev_['progress_seconds'])} s "
        "(not counted in any method's time)",
        f"- whole run: {_fmt(m['timing']['total_seconds'])} s, {_fmt(m['timing']['total_cpu_seconds'])} s CPU "
        f"(training {_fmt(m['timing']['training_seconds'])} s); CPU time of this process is about the wall time on "
        "an idle core",
        "",
        "## Targets (issue 12; unlearn vs retrain, one seed)",
        "",
    ]
    for k, v in m["targets"].items():
        detail = {kk: vv for kk, vv in v.items() if kk != "met"}
        lines.append(f"- {k}: {'met' if v['met'] else 'MISSED'} ({json.dumps(detail, default=float)})")
    lines += ["", "## Measures", "", f"- Attack: {ev_['attack']}", f"- Distance: {ev_['distance']}"]
    if m["notes"]:
        lines += ["", "## Notes", "", *[f"- {n}" for n in m["notes"]]]
    lines += ["", "![progress](progress.png)", ""]
    return "\n".join(lines)


def _figure(m: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    from .report import save_figure

    fig = Figure(figsize=(14, 4))
    axes = fig.subplots(1, 3)
    prog = m["progress"]
    panels = (
        (axes[0], lambda p: 100 * p["error"]["removed"], "removed-set error (%)", "removed"),
        (axes[1], lambda p: 100 * p["error"]["test_kept"], "test error, kept classes (%)", "test_kept"),
        (axes[2], lambda p: p["pred_diff_test_kept"], "L1 to retrain, kept classes", None),
    )
    for ax, get, title, key in panels:
        for name, style in zip(_SEQUENTIAL, ("o-", "s--", "^-.", "v:")):
            pts = prog.get("origin", []) + prog.get(name, [])
            if prog.get(name) and all(get(p) is not None for p in pts):
                ax.plot([p["removed"] for p in pts], [get(p) for p in pts], style, label=name, ms=3)
        if key is not None and prog.get("retrain"):
            ax.axhline(100 * prog["retrain"][0]["error"][key], color="k", ls=":", label="retrain")
        ax.set_xlabel("points removed")
        ax.set_title(title)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _write_outputs(metrics: dict[str, Any], out: Path) -> None:
    """Write the figure, report.md and, last, metrics.json (each atomically): a folder holding metrics.json is
    a finished run, and no file is ever left half-written under its final name."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        _figure(metrics, out / "progress.png")
    except Exception as exc:
        print(f"mcmc-unlearner bnn: progress figure not written ({exc})", file=sys.stderr)
    write_text(out / "report.md", _report(metrics))
    write_json(out / "metrics.json", metrics)


def _main(args: argparse.Namespace) -> int:
    from .report import cannot_create, new_run_dir

    cfg = config_from_args(args)
    _check_device(cfg.device)  # that this machine has it (its spelling was checked at parse time, without torch)
    fresh = args.out is None
    if fresh:
        _resolve(replace(cfg, notes=list(cfg.notes)))  # a bad setting is refused before the folder is made
        try:
            args.out = str(new_run_dir("bnn"))
        except OSError as exc:
            raise ValueError(f"--out not given and {cannot_create('runs', exc)}; pass --out DIR") from None
    try:
        metrics = run_bnn(cfg, args.out)
    except BaseException:
        if fresh:
            with contextlib.suppress(OSError):
                Path(args.out).rmdir()  # only if the run left it empty
        raise
    me = metrics["methods"]
    un, re = me.get("unlearn"), me["retrain"]
    parts = [f"bnn: removed {metrics['dataset']['n_removed']} points in {metrics['dataset']['n_requests']} requests"]
    if un is not None and un["status"] == "ok":
        parts.append(
            f"removed-set error unlearn {100 * un['error']['removed']:.1f}% vs retrain "
            f"{100 * re['error']['removed']:.1f}%"
            f"; L1 to retrain (kept-class test) {un['pred_diff']['test_kept']:.4f} vs floor "
            f"{metrics['floor']['pred_diff']['test_kept']:.4f}; time {un['seconds']:.2f} s vs {re['seconds']:.2f} s"
        )
    refused = {k: v for k, v in metrics["refused"].items() if v}
    if refused:
        parts.append("refused requests: " + ", ".join(f"{k} {v}" for k, v in refused.items()))
    ev_ = metrics["evaluation"]
    parts.append(
        f"evaluation {ev_['seconds']:.1f} s + {ev_['progress_snapshots']} progress snapshots "
        f"{ev_['progress_seconds']:.1f} s"
    )
    failed = {k: v.get("failed", "") for k, v in me.items() if isinstance(v, dict) and v.get("status") == "failed"}
    if failed:  # a run whose method failed exited 0 with its metrics null (stop 47's probe): scripts must see it
        parts.append("FAILED: " + ", ".join(failed))
    print("; ".join(parts) + f"; wrote {args.out}/metrics.json, report.md")
    if failed:
        from ..cli import ExitCode

        refused = all(me[k].get("failed_refusal", False) for k in failed)
        print(
            f"mcmc-unlearner bnn: {len(failed)} method(s) failed ({', '.join(failed)}): their metrics are null in "
            f"{args.out}/metrics.json" + ("" if refused else " (an internal error: please report it)"),
            file=sys.stderr,
        )
        return ExitCode.REFUSED if refused else ExitCode.INTERNAL
    return 0
