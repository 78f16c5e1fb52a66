r"""Distance to retraining for classifiers sampled by SG-MCMC: predictives, error gaps, floors, membership attacks.

The target of unlearning is the posterior on the remaining data, which only *independent retrain chains*
approximate; a method is judged by how far it lands from them, measured on the same scale as the distance
between two retrain chains (the **floor**), never by "lower error is better". Everything here works on
posterior predictive probabilities computed **once per sample set** (:func:`predictive`) and then reused by
every metric:

* error rates per split and :func:`error_gaps` ``|error − retrain error|``;
* :func:`pred_l1` / :func:`pred_kl`: per-example distance between two predictive distributions, averaged;
  :func:`distance_to_chains` gives a method's median distance to the retrain chains and :func:`pair_floor` the
  median distance over pairs of retrain chains (the noise floor of the same quantity);
* :func:`likelihood_ratio_auc`: a per-example likelihood-ratio membership attack (calibrated by reference
  models that never saw the points) scored by ROC AUC, and :func:`loss_auc`, the uncalibrated loss attack
  (equivalent to a confidence threshold).
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "auc",
    "distance_to_chains",
    "error_gaps",
    "error_rates",
    "likelihood_ratio_auc",
    "log_true_prob",
    "loss_auc",
    "pair_floor",
    "pooled",
    "pred_kl",
    "pred_l1",
    "predictive",
    "spread",
]

Probs = dict[str, torch.Tensor]
_EPS = 1e-12


def _median(vals: Sequence[float]) -> float:
    """``statistics.median`` that returns NaN when any value is NaN (it silently returns an order-dependent
    element otherwise: ``median([nan, 0.3, 0.1])`` is 0.1, ``median([0.3, nan, 0.1])`` NaN)."""
    if any(v != v for v in vals):
        return float("nan")
    return statistics.median(vals)


@torch.no_grad()
def predictive(
    model: nn.Module,
    assign: Callable[[nn.Module, torch.Tensor], None],
    thetas: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    weights: torch.Tensor | None = None,
    batch_size: int = 500,
) -> Probs:
    r"""Posterior predictive :math:`\hat p(y|x) = \sum_s w_s\,\mathrm{softmax}(f_{θ_s}(x))` on every input set.

    Each sample's network is evaluated once per input set (in chunks of ``batch_size``); zero-weight samples are
    skipped. The result (float64) is meant to be computed once per sample set and shared by all metrics.

    Args:
        model: A network returning logits; its parameters are overwritten by ``assign``.
        assign: ``assign(model, theta)`` loads flat parameters (e.g. ``ParamSpec.assign``).
        thetas: Parameter samples ``[S, D]``.
        inputs: Named input tensors ``[N_k, ...]``.
        weights: Sample weights ``[S]`` summing to 1 (default uniform).
        batch_size: Rows per forward pass.

    Returns:
        ``{name: [N_k, C]}`` probabilities.
    """
    if thetas.ndim != 2 or thetas.shape[0] == 0:
        raise ValueError(f"thetas must be a non-empty [S, D] tensor, got shape {tuple(thetas.shape)}")
    s = thetas.shape[0]
    w = torch.full((s,), 1.0 / s, dtype=torch.float64) if weights is None else weights.detach().double().cpu()
    if w.shape != (s,) or abs(float(w.sum()) - 1.0) > 1e-6 or bool((w < 0).any()):
        raise ValueError("weights must be non-negative, one per sample, and sum to 1")
    out: dict[str, torch.Tensor | None] = dict.fromkeys(inputs)
    for theta, ws in zip(thetas, w.tolist()):
        if ws == 0.0:
            continue
        assign(model, theta)
        for name, x in inputs.items():
            if x.shape[0] == 0:
                continue
            # in float64: a float32 softmax is exactly 0 past a logit gap of about 104, and the attacks' log p(y|x)
            # of a confidently wrong prediction then tied with every other such (stop 46's probe)
            p = torch.cat([model(x[i : i + batch_size]).double().softmax(1) for i in range(0, x.shape[0], batch_size)])
            out[name] = p * ws if out[name] is None else out[name] + p * ws
    n_classes = next((v.shape[1] for v in out.values() if v is not None), 0)
    return {
        k: (v if v is not None else torch.zeros(inputs[k].shape[0], n_classes, dtype=torch.float64))
        for k, v in out.items()
    }


def error_rates(probs: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor]) -> dict[str, float | None]:
    """Argmax classification error per split (``None`` for an empty split)."""
    res: dict[str, float | None] = {}
    for k, y in labels.items():
        p = probs[k]
        if not y.numel():
            res[k] = None
        elif not bool(torch.isfinite(p).all()):  # argmax would read a NaN row as class 0
            res[k] = float("nan")
        else:
            res[k] = float((p.argmax(1) != y).double().mean())
    return res


def error_gaps(
    errors: Mapping[str, float | None], references: Sequence[Mapping[str, float | None]]
) -> dict[str, float | None]:
    """``median_k |error − error_k|`` over reference chains ``k``, per split (distance to retrain, not a score)."""
    out: dict[str, float | None] = {}
    for split, e in errors.items():
        vals = [abs(e - r[split]) for r in references if e is not None and r.get(split) is not None]
        out[split] = _median(vals) if vals else None
    return out


def pred_l1(p: torch.Tensor, q: torch.Tensor) -> float:
    r"""Mean over examples of :math:`\sum_c |p_c - q_c|` (in ``[0, 2]``; the paper's prediction difference)."""
    _check_pair(p, q)
    return float((p - q).abs().sum(1).mean())


def pred_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    r"""Mean over examples of :math:`\mathrm{KL}(p\,\|\,q) = \sum_c p_c \log(p_c / q_c)`, ``p`` the reference.

    Probabilities are clipped at 1e-12 (a sample-set predictive rarely has exact zeros; this bounds the
    penalty of one that does at :math:`p_c \log(p_c/10^{-12})`).
    """
    _check_pair(p, q)
    pc, qc = p.clamp_min(_EPS), q.clamp_min(_EPS)
    return float((p * (pc.log() - qc.log())).sum(1).mean())


def _check_pair(p: torch.Tensor, q: torch.Tensor) -> None:
    if p.shape != q.shape or p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"need two non-empty [N, C] predictives of the same shape, got {p.shape} and {q.shape}")


_DISTANCES = {"l1": pred_l1, "kl": pred_kl}


def distance_to_chains(
    probs: Mapping[str, torch.Tensor], chains: Sequence[Mapping[str, torch.Tensor]], splits: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """A method's distance to retraining: the median over retrain chains ``k`` of ``d(p_k, p_method)``.

    Returns:
        ``{"l1": {split: median}, "kl": {split: median}}`` (KL with the retrain chain as the reference).
    """
    out: dict[str, dict[str, float | None]] = {}
    for key, fn in _DISTANCES.items():
        out[key] = {}
        for split in splits:
            vals = [fn(c[split], probs[split]) for c in chains if c[split].shape[0]]
            out[key][split] = _median(vals) if vals else None
    return out


def pair_floor(
    chains: Sequence[Mapping[str, torch.Tensor]], splits: Sequence[str]
) -> dict[str, dict[str, float | None] | int]:
    """The noise floor: the same distances between every pair of independent retrain chains, median over pairs.

    KL is not symmetric; each pair contributes both directions (so the floor is the median of ``k(k−1)`` values).

    Returns:
        ``{"l1": {split: median}, "kl": {split: median}, "pairs": k(k−1)/2}``.
    """
    if len(chains) < 2:
        raise ValueError("the floor needs at least two independent retrain chains")
    out: dict[str, dict[str, float | None] | int] = {"pairs": len(chains) * (len(chains) - 1) // 2}
    for key, fn in _DISTANCES.items():
        per: dict[str, float | None] = {}
        for split in splits:
            if chains[0][split].shape[0] == 0:
                per[split] = None
                continue
            if key == "l1":
                vals = [fn(a[split], b[split]) for a, b in itertools.combinations(chains, 2)]
            else:
                vals = [fn(a[split], b[split]) for a, b in itertools.permutations(chains, 2)]
            per[split] = _median(vals)
        out[key] = per
    return out


def pooled(chains: Sequence[Mapping[str, torch.Tensor]]) -> Probs:
    """Equal-weight mixture of several predictives (e.g. reference retrain chains)."""
    if not chains:
        raise ValueError("need at least one predictive to pool")
    return {k: torch.stack([c[k] for c in chains]).mean(0) for k in chains[0]}


def log_true_prob(probs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """``log p(y_i | x_i)`` per example, as a float64 numpy array (clipped at float64's smallest normal number only:
    until stop 46 at 1e-12, which tied every example below it, e.g. a removed class that a method and the retrain
    chains both predict below 1e-12, and pulled the attacks' AUC to 0.5 whatever the order)."""
    tiny = torch.finfo(torch.float64).tiny
    return probs.double().gather(1, labels[:, None]).squeeze(1).clamp_min(tiny).log().cpu().numpy()


def auc(positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """ROC AUC = P(score of a positive > score of a negative) + ½ P(tie) (Mann–Whitney); ``None`` if a set is empty."""
    pos = np.asarray(positives, dtype=np.float64).ravel()
    neg = np.asarray(negatives, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(np.r_[pos, neg])  # average ranks: ties count one half
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def loss_auc(member_logp: np.ndarray, nonmember_logp: np.ndarray) -> float | None:
    """Uncalibrated loss attack: score ``log p(y|x)`` (higher = member). Same AUC as a confidence threshold."""
    return auc(member_logp, nonmember_logp)


def likelihood_ratio_auc(
    member_logp: np.ndarray,
    nonmember_logp: np.ndarray,
    member_ref_logp: np.ndarray,
    nonmember_ref_logp: np.ndarray,
) -> float | None:
    r"""Per-example likelihood-ratio membership attack, scored by ROC AUC (0.5 = the points look alike).

    Score of example :math:`(x, y)`: :math:`\log p_{\text{target}}(y|x) - \log p_{\text{ref}}(y|x)`, where
    :math:`p_{\text{ref}}` is the predictive of reference models trained *without* the example (here: retrain
    chains other than the one being compared). This calibrates each example by its own difficulty, which a
    global confidence threshold cannot do (the fixed-variance offline LiRA of Carlini et al., S&P 2022; the
    reference-model attack of Ye et al., CCS 2022). Members are the removed training points, non-members
    held-out test points of the same class.
    """
    m = np.asarray(member_logp, dtype=np.float64) - np.asarray(member_ref_logp, dtype=np.float64)
    n = np.asarray(nonmember_logp, dtype=np.float64) - np.asarray(nonmember_ref_logp, dtype=np.float64)
    return auc(m, n)


def spread(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation, min, max and count of the non-``None`` values (a NaN makes them NaN)."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    if any(x != x for x in v):
        nan = float("nan")
        return {"mean": nan, "sd": nan if len(v) > 1 else None, "min": nan, "max": nan, "n": len(v)}
    return {
        "mean": statistics.fmean(v),
        "sd": statistics.stdev(v) if len(v) > 1 else None,
        "min": min(v),
        "max": max(v),
        "n": len(v),
    }
