r"""Bayesian neural networks on image data: the paper's class-removal protocol, baselines and evaluation.

``mcmc-unlearner bnn`` trains a Bayesian classifier by SG-MCMC (prior :math:`N(0, σ²)`, σ = 0.1;
:math:`F = -\log p(θ) + n·\mathrm{mean\,CE}`, :math:`h` = CE of one example), removes the training points
of one class in requests of ``--request-size`` and compares six methods that all start from the same
trained chain (except the retrains, which start from the same initial weights):

* ``origin``: the chain trained on all data, untouched;
* ``retrain``: the whole training procedure on the remaining data (the target);
* ``retrain-b``: a second, independent retrain (its distance to ``retrain`` is the noise floor);
* ``unlearn``: :class:`~mcmc_unlearner.unlearner.MCMCUnlearner` (MCMC influence step per request,
  shifting the live chain and the stored sample bank);
* ``finetune``: plain SG-MCMC on the remaining data, given the same wall time as ``unlearn`` per request;
* ``importance``: the stored samples reweighted by :math:`1/p(S'|θ)` (self-normalised in log space), i.e.
  importance sampling from the old posterior to the new one.

Training follows the paper: optional pre-training on another data set (SGD with momentum), an exploration
phase of plain SGD on :math:`F/n` (the mean loss), then the sampler with step size
:math:`(\mathrm{lr}/n)·t^{-0.5005}` (:math:`t` counted from 1), minibatches of 128, keeping ``bank_size``
thinned samples.

Evaluation (every method): error on the remaining training set, the removed set, the test set and the test
set without the removed class, for the posterior predictive (mean of the stored samples' softmax; weighted
for ``importance``) and for one chain state (the last sample; ``importance``: its highest-weight sample);
a confidence-threshold membership attack; 1-NN KL between parameter-sample sets (method vs ``retrain``,
``retrain-b`` as the noise floor); the L1 prediction difference to ``retrain``; wall time. Results go to
``metrics.json``, ``report.md`` and ``progress.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import time
from collections.abc import Iterator, Sequence
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
from ..samplers import SGHMC, SGLD, run_chain
from ..unlearner import MCMCUnlearner

__all__ = [
    "METHODS",
    "PRESETS",
    "BNNConfig",
    "confidence_attack",
    "importance_weights",
    "register",
    "run_bnn",
    "weighted_knn_kl",
]

#: The methods every run evaluates (extra variants may follow them in ``metrics.json``).
METHODS = ("origin", "retrain", "retrain-b", "unlearn", "finetune", "importance")

_DEFAULT_ARCH = {
    "digits": "digits_net",
    "mnist": "lenet5",
    "fashion-mnist": "lenet5",
    "cifar10": "small_cnn",
    "cifar100": "small_cnn",
}
_SETS = ("remaining", "removed", "test", "test_kept")


@dataclass
class BNNConfig:
    """Settings of one BNN unlearning experiment (defaults: the digits run).

    Attributes:
        dataset: Data set name (see :func:`mcmc_unlearner.image_data.load_dataset`).
        arch: Architecture (``None``: ``digits_net`` for digits, ``lenet5`` for (Fashion-)MNIST,
            ``small_cnn`` for CIFAR).
        remove_class: Class whose training points are removed.
        remove_count: ``"all"`` or how many points of that class (a seeded random subset).
        sampler: ``"sgld"`` or ``"sghmc"`` (friction 0.9).
        request_size: Points per deletion request.
        seed: Seed of everything random (initial weights, chains, subsets).
        device: Torch device.
        data_dir, download: Where image files live / fetch them with torchvision.
        pretrain: Data set to pre-train the initial weights on (``None``: random initial weights).
        pretrain_steps, pretrain_lr, pretrain_momentum: SGD pre-training (paper: 2,000, 0.1, 0.9).
        explore_steps, explore_lr: Plain SGD on the mean loss ``F/n`` before sampling.
        sample_steps, sample_lr: Sampler steps and ``lr`` of the step size ``(lr/n)·t^-0.5005``.
        batch_size: Minibatch size.
        bank_size: Stored samples, thinned evenly from the sampling phase.
        prior_std: Prior standard deviation.
        solver, damping, iter_T, tol, curvature_draws, expectation, hessian, bank_shift, samp_T,
        init_scaling: :class:`~mcmc_unlearner.unlearner.MCMCUnlearner` settings (LiSSA scaling is
            ``init_scaling / n_remaining``, as in the paper).
        eval_every: Evaluate ``unlearn`` and ``finetune`` after every this many requests (progress figure).
        eval_max: At most this many points per evaluation set (seeded subset; ``0``: all).
        extra_finetune_steps: If positive, also report ``unlearn+finetune``: the unlearned chain followed by
            this many sampler steps on the remaining data (samples of those steps form its bank).
        threads: Torch intra-op threads during the run (``0``: leave as is; restored afterwards).
        save_model: Folder to save the chain trained on all data (with its bank and unlearner settings) with
            :func:`mcmc_unlearner.store.save_model`, ready for ``mcmc-unlearner forget``.
        progress: Show tqdm progress bars.
    """

    dataset: str = "digits"
    arch: str | None = None
    remove_class: int = 0
    remove_count: str | int = "all"
    sampler: str = "sgld"
    request_size: int = 64
    seed: int = 0
    device: str = "cpu"
    data_dir: str | None = None
    download: bool = False
    pretrain: str | None = None
    pretrain_steps: int = 2000
    pretrain_lr: float = 0.1
    pretrain_momentum: float = 0.9
    explore_steps: int = 1000
    explore_lr: float = 0.3
    sample_steps: int = 9000
    sample_lr: float = 1.0
    batch_size: int = 128
    bank_size: int = 200
    prior_std: float = 0.1
    solver: str = "kfac"
    damping: float = 300.0
    iter_T: int = 100
    tol: float = 1e-2
    curvature_draws: int = 8
    grad_draws: int | None = 24
    precondition_rank: int = 20
    drift_tol: float = 3.0
    check_draws: int | None = 2
    expectation: str = "bank"
    hessian: str = "remaining"
    bank_shift: str = "mean"
    samp_T: int = 1
    init_scaling: float = 0.05
    eval_every: int = 1
    eval_max: int = 5000
    extra_finetune_steps: int = 0
    threads: int = 1
    progress: bool = True
    save_model: str | None = None
    notes: list[str] = field(default_factory=list)


#: The paper's protocol, shared by both presets: its LiSSA unlearner with sampler-step expectations.
_PAPER_PROTOCOL: dict[str, Any] = {
    "explore_lr": 0.01,
    "sample_lr": 0.01,
    "remove_class": 0,
    "remove_count": "all",
    "request_size": 64,
    "solver": "lissa",
    "expectation": "chain",
    "hessian": "full",
    "iter_T": 64,
    "samp_T": 1,
    "damping": 0.0,
    "threads": 0,
    "bank_size": 100,
    "eval_every": 10,
}

#: Named settings that reproduce the paper's protocols (they override the defaults, CLI flags override them).
PRESETS: dict[str, dict[str, Any]] = {
    "paper-fmnist": {
        **_PAPER_PROTOCOL,
        "dataset": "fashion-mnist",
        "arch": "lenet5",
        "pretrain": "mnist",
        "pretrain_steps": 2000,
        "explore_steps": 1000,
        "sample_steps": 9000,
        "init_scaling": 0.05,
    },
    "paper-cifar10": {
        **_PAPER_PROTOCOL,
        "dataset": "cifar10",
        "arch": "small_cnn",
        "pretrain": "cifar100",
        "pretrain_steps": 10000,
        "explore_steps": 5000,
        "sample_steps": 15000,
        "init_scaling": 0.08,
    },
}


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Set torch's intra-op thread count for the block and restore it afterwards (``n <= 0``: no change)."""
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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


def _thin_to(samples: torch.Tensor, k: int) -> torch.Tensor:
    """At most ``k`` rows of ``samples``, evenly spaced, first and last included."""
    return samples[torch.linspace(0, samples.shape[0] - 1, min(k, samples.shape[0])).round().long()]


def _flat(model: nn.Module) -> torch.Tensor:
    return ParamSpec.flatten_module(model).detach().clone()


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


def _auc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(pos) == 0 or len(neg) == 0:
        return None
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


# ---------------------------------------------------------------------------------------------- experiment
class _Experiment:
    """One run: data, initial weights, the trained chains and the evaluation helpers."""

    def __init__(self, cfg: BNNConfig) -> None:
        self.cfg = cfg
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
        if cfg.remove_count != "all":
            k = int(cfg.remove_count)
            if not 0 < k <= cls_ids.numel():
                raise ValueError(
                    f"--remove-count {k}: class {cfg.remove_class} has {cls_ids.numel()} training points; "
                    "pass a number in that range or 'all'"
                )
            cls_ids = cls_ids[torch.randperm(cls_ids.numel(), generator=gen)[:k]].sort().values
        if cls_ids.numel() >= data.n_train:
            raise ValueError("the removal would leave no training data")
        self.removed_ids = cls_ids
        order = cls_ids[torch.randperm(cls_ids.numel(), generator=gen)]
        self.requests = [order[i : i + cfg.request_size] for i in range(0, order.numel(), cfg.request_size)]
        keep = torch.ones(data.n_train, dtype=torch.bool)
        keep[cls_ids] = False
        self.kept_ids = torch.nonzero(keep).flatten()
        self.n_full, self.n_kept = data.n_train, int(keep.sum())
        # evaluation sets (seeded subsets when larger than eval_max)
        rem = self._cap(self.kept_ids, gen)
        test_ids = self._cap(torch.arange(data.n_test), gen)
        y_te = data.y_test[test_ids]
        self.eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
            "remaining": (self.x_train[rem.to(self.device)], self.y_train[rem.to(self.device)]),
            "removed": (self.x_train[cls_ids.to(self.device)], self.y_train[cls_ids.to(self.device)]),
            "test": (self.x_test[test_ids.to(self.device)], self.y_test[test_ids.to(self.device)]),
        }
        kept_test = test_ids[y_te != cfg.remove_class].to(self.device)
        self.eval_sets["test_kept"] = (self.x_test[kept_test], self.y_test[kept_test])
        removed_test = test_ids[y_te == cfg.remove_class].to(self.device)
        self.eval_sets["test_removed_class"] = (self.x_test[removed_test], self.y_test[removed_test])
        self.init = self._initial_weights()
        self.dim = self.init.numel()

    def _cap(self, ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        m = self.cfg.eval_max
        if m and ids.numel() > m:
            return ids[torch.randperm(ids.numel(), generator=gen)[:m]].sort().values
        return ids

    # ------------------------------------------------------------------ models
    def new_model(self, n_classes: int | None = None) -> BayesianNet:
        """A fresh network of the configured architecture on the device (weights to be assigned)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            m = build_model(self.arch, self.data.in_shape, n_classes or self.data.n_classes, self.cfg.prior_std)
        return m.to(self.device)

    def _initial_weights(self) -> torch.Tensor:
        cfg = self.cfg
        model = self.new_model()
        if cfg.pretrain:
            pre = load_dataset(cfg.pretrain, cfg.data_dir, cfg.download, seed=cfg.seed)
            if tuple(pre.in_shape) != tuple(self.data.in_shape):
                raise ValueError(
                    f"pre-training set {pre.name} has images {pre.in_shape}, {self.data.name} has "
                    f"{self.data.in_shape}; pick a pre-training set of the same shape"
                )
            src = self.new_model(pre.n_classes)
            ds = RemovableDataset(
                pre.x_train.to(self.device), pre.y_train.to(self.device), batch_size=cfg.batch_size, seed=cfg.seed
            )
            opt = torch.optim.SGD(src.parameters(), lr=cfg.pretrain_lr, momentum=cfg.pretrain_momentum)
            for _ in _bar(range(cfg.pretrain_steps), f"pretrain {pre.name}", cfg.progress):
                opt.zero_grad()
                src.nll(next(ds)).mean().backward()
                opt.step()
            # copy every tensor whose shape matches (all but the output layer when the class counts differ)
            own = model.state_dict()
            copied = {k: v for k, v in src.state_dict().items() if k in own and own[k].shape == v.shape}
            model.load_state_dict({**own, **copied})
            cfg.notes.append(f"initial weights pre-trained on {pre.name} ({len(copied)}/{len(own)} tensors copied)")
        return _flat(model)

    # ------------------------------------------------------------------ training
    def train(self, ids: torch.Tensor, chain_seed: int, label: str) -> dict[str, Any]:
        """Exploration SGD then sampling on the training points ``ids``; returns model, sampler, bank, timing."""
        cfg = self.cfg
        t0 = time.perf_counter()
        model = self.new_model()
        ParamSpec.assign(model, self.init)
        dev_ids = ids.to(self.device)
        ds = RemovableDataset(self.x_train[dev_ids], self.y_train[dev_ids], batch_size=cfg.batch_size, seed=chain_seed)
        n = len(ds)
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
        return {"model": model, "sampler": sampler, "bank": bank, "seconds": time.perf_counter() - t0, "data": ds}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def probs(self, thetas: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Predictive probabilities on every evaluation set: (weighted) mean softmax over ``thetas``."""
        model = self.new_model()
        w = torch.full((thetas.shape[0],), 1.0 / thetas.shape[0], dtype=torch.float64) if weights is None else weights
        out = {
            k: torch.zeros(x.shape[0], self.data.n_classes, dtype=torch.float64, device=self.device)
            for k, (x, _) in self.eval_sets.items()
        }
        for theta, ws in zip(thetas, w.tolist()):
            if ws == 0.0:
                continue
            ParamSpec.assign(model, theta)
            for k, (x, _) in self.eval_sets.items():
                if x.shape[0]:
                    for i in range(0, x.shape[0], 4096):
                        out[k][i : i + 4096] += ws * model(x[i : i + 4096]).softmax(1).double()
        return out

    def errors(self, probs: dict[str, torch.Tensor]) -> dict[str, float | None]:
        """Classification error (argmax) per evaluation set."""
        res: dict[str, float | None] = {}
        for k in _SETS:
            _, y = self.eval_sets[k]
            res[k] = float((probs[k].argmax(1) != y).double().mean()) if y.numel() else None
        return res

    def attack(self, probs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Confidence-threshold membership attack (members: remaining train; non-members: test)."""

        def true_p(k: str) -> np.ndarray:
            _, y = self.eval_sets[k]
            return probs[k].gather(1, y[:, None]).squeeze(1).cpu().numpy()

        res = confidence_attack(true_p("remaining"), true_p("test"), true_p("removed"))
        out: dict[str, Any] = {
            "threshold": res["threshold"],
            "removed_share": res["target_share"],
            "remaining_share": res["member_share"],
            "test_share": res["nonmember_share"],
            "auc_remaining_vs_test": res["auc"],
            "auc_removed_vs_test_same_class": _auc(true_p("removed"), true_p("test_removed_class")),
        }
        return out


def _pred_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Mean L1 distance between two predictive distributions, per evaluation set."""
    return {k: (float((a[k] - b[k]).abs().sum(1).mean()) if a[k].shape[0] else None) for k in _SETS}


def _resolve(cfg: BNNConfig) -> BNNConfig:
    if cfg.sampler not in ("sgld", "sghmc"):
        raise ValueError(f"unknown sampler {cfg.sampler!r}; choose 'sgld' or 'sghmc'")
    if cfg.request_size < 1:
        raise ValueError("--request-size must be at least 1")
    if cfg.explore_steps < 0 or cfg.sample_steps < 2 or cfg.bank_size < 2:
        raise ValueError("need --explore-steps >= 0, --sample-steps >= 2 and --bank-size >= 2")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA device; use --device cpu")
    return cfg


def run_bnn(cfg: BNNConfig, out: str | Path | None = None) -> dict[str, Any]:
    """Run the experiment; returns the metrics dict (and writes metrics.json, report.md, figures to ``out``).

    Args:
        cfg: Settings.
        out: Output folder (created); ``None`` writes nothing.
    """
    cfg = _resolve(replace(cfg, notes=list(cfg.notes)))
    with _torch_threads(cfg.threads):
        metrics = _run(cfg)
    if out is not None:
        _write_outputs(metrics, Path(out))
    return metrics


def _run(cfg: BNNConfig) -> dict[str, Any]:
    ex = _Experiment(cfg)
    all_ids = torch.arange(ex.n_full)
    s = cfg.seed * 1000
    origin = ex.train(all_ids, s + 1, "origin")
    retrain = ex.train(ex.kept_ids, s + 2, "retrain")
    retrain_b = ex.train(ex.kept_ids, s + 3, "retrain-b")
    methods: dict[str, dict[str, Any]] = {}
    banks: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    lasts: dict[str, torch.Tensor] = {}
    for name, run in (("origin", origin), ("retrain", retrain), ("retrain-b", retrain_b)):
        banks[name], lasts[name] = run["bank"], _flat(run["model"])
        methods[name] = {"seconds": run["seconds"]}
    methods["origin"]["seconds_note"] = "training on all data"
    if cfg.save_model:
        _save_origin(cfg, ex, origin)
    t_after = cfg.sample_steps + 1  # next step index of the origin chain's schedule
    progress: dict[str, list[dict[str, Any]]] = {"unlearn": [], "finetune": []}
    eval_points = {i for i in range(len(ex.requests)) if (i + 1) % cfg.eval_every == 0} | {len(ex.requests) - 1}

    def snapshot(name: str, thetas: torch.Tensor, removed: int) -> None:
        errs = ex.errors(ex.probs(thetas))
        progress[name].append({"removed": removed, "error": errs})

    # --------------------------------------------------------------- unlearn
    model = copy.deepcopy(origin["model"])
    sampler = _make_sampler(cfg, model, _step_size(cfg.sample_lr, ex.n_full, t_after), s + 4)
    sampler.load_state_dict(origin["sampler"].state_dict())
    data = RemovableDataset(ex.x_train, ex.y_train, batch_size=cfg.batch_size, seed=s + 4)
    un = _unlearner(cfg, model, sampler, origin["bank"])
    snapshot("unlearn", un.bank, 0)
    progress["finetune"].append(copy.deepcopy(progress["unlearn"][0]))
    reports = []
    removed = 0
    for i, ids in enumerate(_bar(ex.requests, "unlearn: requests", cfg.progress)):
        un.scaling = cfg.init_scaling / (len(data) - ids.numel())
        rep = un.forget(ids, data)
        reports.append(rep.to_dict())
        removed += ids.numel()
        if i in eval_points:
            snapshot("unlearn", un.bank, removed)
    req_seconds = [r["seconds"] for r in reports]
    banks["unlearn"], lasts["unlearn"] = un.bank, _flat(model)
    methods["unlearn"] = {
        "seconds": float(sum(req_seconds)),
        "seconds_per_request": float(np.mean(req_seconds)),
        "requests": reports,
    }

    # --------------------------------------------------------------- finetune (same wall time per request)
    model_f = copy.deepcopy(origin["model"])
    sampler_f = _make_sampler(cfg, model_f, _step_size(cfg.sample_lr, ex.n_full, t_after), s + 5)
    sampler_f.load_state_dict(origin["sampler"].state_dict())
    data_f = RemovableDataset(ex.x_train, ex.y_train, batch_size=cfg.batch_size, seed=s + 5)
    t_step, states, steps_f, removed = t_after, [], 0, 0
    spent = 0.0
    for i, ids in enumerate(_bar(ex.requests, "finetune: requests", cfg.progress)):
        t0 = time.perf_counter()
        data_f.remove(ids)
        n = len(data_f)
        budget = req_seconds[i]
        k = 0
        states = []  # finetune's bank after a request: its states since that request, thinned to bank_size
        while k < 2 or time.perf_counter() - t0 < budget:
            lr = _step_size(cfg.sample_lr, n, t_step)
            run_chain(model_f, sampler_f, data_f, _energy, 1, n, lr_schedule=lambda _t, lr=lr: lr)
            states.append(_flat(model_f))
            t_step, k = t_step + 1, k + 1
        spent += time.perf_counter() - t0
        steps_f += k
        removed += ids.numel()
        if i in eval_points:
            snapshot("finetune", _thin_to(torch.stack(states), cfg.bank_size), removed)
    banks["finetune"] = _thin_to(torch.stack(states), cfg.bank_size)
    lasts["finetune"] = _flat(model_f)
    methods["finetune"] = {"seconds": spent, "sampler_steps": steps_f}

    # --------------------------------------------------------------- importance reweighting
    t0 = time.perf_counter()
    scratch = ex.new_model()
    rx, ry = ex.eval_sets["removed"]
    log_w = torch.empty(origin["bank"].shape[0], dtype=torch.float64)
    with torch.no_grad():
        for j, theta in enumerate(origin["bank"]):
            ParamSpec.assign(scratch, theta)
            log_w[j] = scratch.nll((rx, ry)).double().sum().cpu()
    w, ess = importance_weights(log_w)
    banks["importance"], weights["importance"] = origin["bank"], w
    lasts["importance"] = origin["bank"][int(w.argmax())]
    methods["importance"] = {
        "seconds": time.perf_counter() - t0,
        "ess": ess,
        "max_weight": float(w.max()),
        "n_samples": int(w.numel()),
    }
    if ess < 10:
        cfg.notes.append(
            f"importance: ESS {ess:.2f} of {w.numel()} samples, so its weighted KL rests on about one sample "
            "and its predictive on the highest-weight sample(s); treat its KL as unreliable"
        )

    # --------------------------------------------------------------- unlearn + extra sampling (optional)
    if cfg.extra_finetune_steps > 0:
        t0 = time.perf_counter()
        n = len(data)
        extra = run_chain(
            model,
            sampler,
            data,
            _energy,
            cfg.extra_finetune_steps,
            n,
            lr_schedule=lambda t: _step_size(cfg.sample_lr, n, t_after + t),
            keep_every=max(1, cfg.extra_finetune_steps // cfg.bank_size),
            progress="unlearn+finetune" if cfg.progress else None,
        )
        name = "unlearn+finetune"
        banks[name] = extra if extra is not None and extra.shape[0] >= 2 else un.bank
        lasts[name] = _flat(model)
        methods[name] = {
            "seconds": methods["unlearn"]["seconds"] + time.perf_counter() - t0,
            "sampler_steps": cfg.extra_finetune_steps,
        }

    # --------------------------------------------------------------- evaluation
    preds = {name: ex.probs(banks[name], weights.get(name)) for name in methods}
    for name, m in methods.items():
        last_p = ex.probs(lasts[name][None])
        m["error"] = ex.errors(preds[name])
        m["error_last"] = ex.errors(last_p)
        m["mia"] = ex.attack(preds[name])
        m["mia_last"] = ex.attack(last_p)
        m["pred_diff"] = _pred_diff(preds[name], preds["retrain"])
        if name == "retrain":
            m["kl_to_retrain"] = 0.0
        elif name in weights:
            m["kl_to_retrain"] = weighted_knn_kl(banks[name], weights[name], banks["retrain"])
        else:
            m["kl_to_retrain"] = knn_kl(banks[name].cpu(), banks["retrain"].cpu(), k=1)
        m["n_samples"] = int(banks[name].shape[0])
    metrics: dict[str, Any] = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "notes"},
        "notes": cfg.notes,
        "dataset": {
            "name": ex.data.name,
            "n_train": ex.n_full,
            "n_test": ex.data.n_test,
            "n_removed": int(ex.removed_ids.numel()),
            "n_remaining": ex.n_kept,
            "n_requests": len(ex.requests),
            "eval_sizes": {k: int(v[1].numel()) for k, v in ex.eval_sets.items()},
        },
        "model": {"arch": ex.arch, "n_params": ex.dim, "prior_std": cfg.prior_std},
        "kl": {"n_samples_retrain": int(banks["retrain"].shape[0]), "dim": ex.dim, "k": 1, "noise_floor": "retrain-b"},
        "methods": methods,
        "progress": progress,
    }
    metrics["targets"] = _targets(metrics)
    return metrics


def _unlearner(cfg: BNNConfig, model: nn.Module, sampler: torch.optim.Optimizer, bank: torch.Tensor) -> MCMCUnlearner:
    return MCMCUnlearner(
        model,
        sampler,
        bank=bank,
        solver=cfg.solver,
        expectation=cfg.expectation,
        hessian=cfg.hessian,
        bank_shift=cfg.bank_shift,
        damping=cfg.damping,
        iter_T=cfg.iter_T,
        tol=cfg.tol,
        samp_T=cfg.samp_T,
        curvature_draws=cfg.curvature_draws,
        precondition_rank=cfg.precondition_rank,
        grad_draws=cfg.grad_draws,
        drift_tol=cfg.drift_tol,
        check_draws=cfg.check_draws,
        negative_curvature="truncate" if cfg.solver == "cg" else "raise",
        # rebuilt only when the drift check fails (lowrank); a stale preconditioner stays correct for cg
        refresh_every=10**6 if cfg.precondition_rank > 0 else 1,
        seed=cfg.seed,
    )


def _save_origin(cfg: BNNConfig, ex: _Experiment, origin: dict[str, Any]) -> None:
    """Save the all-data chain (model, sampler, bank, data state, unlearner settings) as a model folder."""
    from .. import store

    model = copy.deepcopy(origin["model"])
    sampler = _make_sampler(cfg, model, origin["sampler"].param_groups[0]["lr"], 0)
    sampler.load_state_dict(origin["sampler"].state_dict())
    sampler.generator.set_state(origin["sampler"].generator.get_state())
    data = RemovableDataset(ex.data.x_train, ex.data.y_train, batch_size=cfg.batch_size, seed=cfg.seed)
    un = _unlearner(cfg, model, sampler, origin["bank"])
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
    """The issue's acceptance targets for ``unlearn``, measured against ``retrain``."""
    me, un, re = m["methods"], m["methods"]["unlearn"], m["methods"]["retrain"]

    def gap(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else abs(a - b)

    out: dict[str, dict[str, Any]] = {}
    g = gap(un["error"]["removed"], re["error"]["removed"])
    out["removed_error_within_10pts"] = {"gap": g, "met": g is not None and g <= 0.10}
    g = gap(un["error"]["test_kept"], re["error"]["test_kept"])
    out["test_kept_error_within_2pts"] = {"gap": g, "met": g is not None and g <= 0.02}
    g = gap(un["mia"]["removed_share"], re["mia"]["removed_share"])
    out["attack_share_within_5pts"] = {"gap": g, "met": g is not None and g <= 0.05}
    floor = me["retrain-b"]["kl_to_retrain"]
    dist = {k: abs(me[k]["kl_to_retrain"] - floor) for k in ("unlearn", "origin", "finetune")}
    out["kl_nearer_floor_than_origin_and_finetune"] = {
        "distance_to_floor": dist,
        "met": dist["unlearn"] < dist["origin"] and dist["unlearn"] < dist["finetune"],
    }
    ratio = un["seconds"] / re["seconds"]
    out["time_at_most_5pct_of_retrain"] = {"ratio": ratio, "met": ratio <= 0.05}
    return out


# ---------------------------------------------------------------------------------------------- outputs
def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{100 * v:.1f}" if pct else (f"{v:.3g}" if isinstance(v, float) else str(v))


def _report(m: dict[str, Any]) -> str:
    d, c = m["dataset"], m["config"]
    lines = [
        f"# BNN unlearning: {d['name']}, {m['model']['arch']} ({m['model']['n_params']:,} parameters)",
        "",
        f"Removed {d['n_removed']} training points (class {c['remove_class']}) of {d['n_train']} in "
        f"{d['n_requests']} requests of {c['request_size']}; {d['n_remaining']} remain. Sampler {c['sampler']}, "
        f"{c['explore_steps']} exploration + {c['sample_steps']} sampling steps, bank of {c['bank_size']}, "
        f"seed {c['seed']}. Unlearner: solver {c['solver']}, expectation {c['expectation']}, hessian "
        f"{c['hessian']}, bank shift {c['bank_shift']}, damping {c['damping']:g}.",
        "",
        "Errors in % (posterior predictive / last chain state); attack = share of removed points judged members "
        "by the confidence-threshold attack; KL = 1-NN KL of the parameter samples to retrain's "
        f"({m['kl']['n_samples_retrain']} samples, {m['kl']['dim']:,} dimensions; retrain-b is the noise floor); "
        "AUC train/test: attack AUC, remaining-train vs test points; AUC removed/test: removed points vs test points "
        "of the same class (0.5 = indistinguishable). "
        "pred. diff = mean L1 distance of predictive probabilities to retrain's (test set).",
        "",
        "| method | remaining | removed | test | test (kept classes) | attack share | AUC train/test "
        "| AUC removed/test | KL | pred. diff | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in m["methods"].items():
        e, el = r["error"], r["error_last"]
        cells = [f"{_fmt(e[k], True)} / {_fmt(el[k], True)}" for k in _SETS]
        lines.append(
            f"| {name} | {' | '.join(cells)} | {_fmt(r['mia']['removed_share'], True)} | "
            f"{_fmt(r['mia']['auc_remaining_vs_test'])} | {_fmt(r['mia']['auc_removed_vs_test_same_class'])} | "
            f"{_fmt(r['kl_to_retrain'])} | "
            f"{_fmt(r['pred_diff']['test'])} | {r['seconds']:.2f} |"
        )
    un = m["methods"]["unlearn"]
    lines += [
        "",
        f"Unlearn: {un['seconds_per_request']:.3f} s per request. "
        f"Finetune: {m['methods']['finetune']['sampler_steps']} "
        f"sampler steps in the same time. Importance sampling: ESS {m['methods']['importance']['ess']:.2f} of "
        f"{m['methods']['importance']['n_samples']} samples.",
        "",
        "## Targets (unlearn vs retrain)",
        "",
    ]
    for k, v in m["targets"].items():
        detail = {kk: vv for kk, vv in v.items() if kk != "met"}
        lines.append(f"- {k}: {'met' if v['met'] else 'MISSED'} ({json.dumps(detail, default=float)})")
    if m["notes"]:
        lines += ["", "## Notes", "", *[f"- {n}" for n in m["notes"]]]
    lines += ["", "![progress](progress.png)", ""]
    return "\n".join(lines)


def _figure(m: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "removed", "removed-set error"), (axes[1], "test", "test error")):
        for name, style in (("unlearn", "o-"), ("finetune", "s--")):
            pts = m["progress"][name]
            ax.plot([p["removed"] for p in pts], [100 * p["error"][key] for p in pts], style, label=name)
        ax.axhline(100 * m["methods"]["retrain"]["error"][key], color="k", ls=":", label="retrain")
        ax.set_xlabel("points removed")
        ax.set_ylabel("error (%)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_outputs(metrics: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    (out / "report.md").write_text(_report(metrics))
    _figure(metrics, out / "progress.png")


# ---------------------------------------------------------------------------------------------- CLI
def _count(v: str) -> str | int:
    if v == "all":
        return v
    try:
        k = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or a positive integer, got {v!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected 'all' or a positive integer, got {v!r}")
    return k


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bnn`` subcommand."""
    from ..cli import add_quiet_flag, new_folder

    p = subparsers.add_parser(
        "bnn",
        help="Bayesian neural networks: remove a class, compare unlearning with retraining and baselines",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    d = BNNConfig()
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="the paper's settings")
    p.add_argument("--dataset", default=None, help=f"data set (default {d.dataset})")
    p.add_argument("--arch", default=None, choices=sorted(ARCHITECTURES), help="architecture (default: per data set)")
    p.add_argument("--remove-class", type=int, default=None, help=f"class to remove (default {d.remove_class})")
    p.add_argument("--remove-count", type=_count, default=None, help="'all' (default) or a number of points")
    p.add_argument("--sampler", choices=("sgld", "sghmc"), default=None, help="SG-MCMC sampler (default sgld)")
    p.add_argument("--request-size", type=int, default=None, help=f"points per request (default {d.request_size})")
    p.add_argument("--pretrain", default=None, help="pre-train the initial weights on this data set")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument("--data-dir", default=None, help="folder with the image files (torchvision layout)")
    p.add_argument("--download", action="store_true", default=None, help="fetch missing files with torchvision")
    p.add_argument("--out", default="runs/bnn", help="output folder (default runs/bnn)")
    p.add_argument(
        "--save-model",
        type=new_folder,
        default=None,
        metavar="DIR",
        help="save the all-data chain to DIR (new/empty)",
    )
    add_quiet_flag(p, dest="no_progress", help="no progress bars")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help=argparse.SUPPRESS)  # old spelling
    adv = p.add_argument_group("advanced (shrink or tune the run)")
    for flag, typ in (
        ("explore-steps", int),
        ("explore-lr", float),
        ("sample-steps", int),
        ("sample-lr", float),
        ("bank-size", int),
        ("batch-size", int),
        ("pretrain-steps", int),
        ("solver", str),
        ("damping", float),
        ("iter-T", int),
        ("curvature-draws", int),
        ("precondition-rank", int),
        ("grad-draws", int),
        ("drift-tol", float),
        ("check-draws", int),
        ("expectation", str),
        ("hessian", str),
        ("bank-shift", str),
        ("init-scaling", float),
        ("eval-every", int),
        ("eval-max", int),
        ("extra-finetune-steps", int),
        ("threads", int),
    ):
        adv.add_argument(f"--{flag}", type=typ, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_main)


def config_from_args(args: argparse.Namespace) -> BNNConfig:
    """Defaults, then the preset, then explicit flags."""
    values: dict[str, Any] = dict(PRESETS[args.preset]) if args.preset else {}
    for f in BNNConfig.__dataclass_fields__:
        v = getattr(args, f, None)
        if v is not None and f != "notes":
            values[f] = v
    values["progress"] = not args.no_progress
    return BNNConfig(**values)


def _main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    metrics = run_bnn(cfg, args.out)
    un, re = metrics["methods"]["unlearn"], metrics["methods"]["retrain"]
    print(
        f"bnn: removed {metrics['dataset']['n_removed']} points; removed-set error unlearn "
        f"{100 * un['error']['removed']:.1f}% vs retrain {100 * re['error']['removed']:.1f}%; "
        f"time {un['seconds']:.2f} s vs {re['seconds']:.2f} s; wrote {args.out}/metrics.json, report.md"
    )
    return 0
