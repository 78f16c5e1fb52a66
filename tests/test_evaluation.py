"""Tests of the distance-to-retraining metrics (:mod:`mcmc_unlearner.experiments.evaluation`) against hand-computed
values and brute-force definitions."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest
import torch
from torch import nn

from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.experiments import evaluation as ev


def _probs(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ predictive
def test_predictive_is_the_weighted_mean_softmax_and_chunking_does_not_matter():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    thetas = torch.randn(5, 16)
    x = {"a": torch.randn(7, 3), "b": torch.randn(2, 3), "empty": torch.zeros(0, 3)}
    w = torch.tensor([0.1, 0.0, 0.4, 0.3, 0.2], dtype=torch.float64)
    expected = {}
    for k, xs in x.items():
        acc = torch.zeros(xs.shape[0], 4, dtype=torch.float64)
        for theta, wi in zip(thetas, w):
            W, b = theta[:12].reshape(4, 3), theta[12:]
            acc += wi * torch.softmax(xs @ W.T + b, 1).double()
        expected[k] = acc
    for bs in (1, 3, 500):
        got = ev.predictive(model, ParamSpec.assign, thetas, x, w, batch_size=bs)
        for k in x:
            assert got[k].shape == expected[k].shape
            torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7)
    uniform = ev.predictive(model, ParamSpec.assign, thetas, {"a": x["a"]})
    torch.testing.assert_close(uniform["a"].sum(1), torch.ones(7, dtype=torch.float64))
    with pytest.raises(ValueError, match="sum to 1"):
        ev.predictive(model, ParamSpec.assign, thetas, x, torch.ones(5))


# ------------------------------------------------------------------------------------------------ errors
def test_error_rates_and_gaps_are_distances_not_scores():
    p = {"s": _probs([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]]), "e": torch.zeros(0, 2)}
    y = {"s": torch.tensor([0, 0, 1, 1]), "e": torch.zeros(0, dtype=torch.long)}
    errs = ev.error_rates(p, y)
    assert errs == {"s": 0.5, "e": None}
    # a method with LOWER error than every retrain chain is still at a positive distance from them
    gaps = ev.error_gaps({"s": 0.1}, [{"s": 0.3}, {"s": 0.2}, {"s": 0.6}])
    assert gaps["s"] == pytest.approx(0.2)  # median of 0.2, 0.1, 0.5
    assert ev.error_gaps({"s": None}, [{"s": 0.3}]) == {"s": None}


# ------------------------------------------------------------------------------------------------ distances
def test_l1_and_kl_by_hand():
    p = _probs([[0.5, 0.5], [1.0, 0.0]])
    q = _probs([[0.25, 0.75], [0.5, 0.5]])
    assert ev.pred_l1(p, q) == pytest.approx((0.5 + 1.0) / 2)
    kl = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 1.0 * math.log(1.0 / 0.5)) / 2
    assert ev.pred_kl(p, q) == pytest.approx(kl)
    assert ev.pred_kl(p, p) == pytest.approx(0.0, abs=1e-12) and ev.pred_l1(q, q) == 0.0
    # a zero in q where p has mass: finite (clipped at 1e-12), and large
    big = ev.pred_kl(_probs([[1.0, 0.0]]), _probs([[0.0, 1.0]]))
    assert big == pytest.approx(math.log(1e12), rel=1e-9)
    with pytest.raises(ValueError, match="same shape"):
        ev.pred_l1(p, q[:1])


def _rand_probs(gen: torch.Generator, n: int, c: int) -> torch.Tensor:
    return torch.softmax(torch.randn(n, c, generator=gen, dtype=torch.float64) * 2, 1)


def test_distance_to_chains_and_pair_floor_are_medians_of_the_brute_force_values():
    gen = torch.Generator().manual_seed(1)
    chains = [{"t": _rand_probs(gen, 30, 5), "z": torch.zeros(0, 5, dtype=torch.float64)} for _ in range(4)]
    method = {"t": _rand_probs(gen, 30, 5), "z": torch.zeros(0, 5, dtype=torch.float64)}
    d = ev.distance_to_chains(method, chains, ["t", "z"])
    assert d["l1"]["t"] == pytest.approx(statistics.median(ev.pred_l1(c["t"], method["t"]) for c in chains))
    assert d["kl"]["t"] == pytest.approx(statistics.median(ev.pred_kl(c["t"], method["t"]) for c in chains))
    assert d["l1"]["z"] is None
    f = ev.pair_floor(chains, ["t", "z"])
    assert f["pairs"] == 6
    pairs = list(itertools.combinations(chains, 2))
    assert f["l1"]["t"] == pytest.approx(statistics.median(ev.pred_l1(a["t"], b["t"]) for a, b in pairs))
    kls = [ev.pred_kl(a["t"], b["t"]) for a, b in itertools.permutations(chains, 2)]
    assert len(kls) == 12 and f["kl"]["t"] == pytest.approx(statistics.median(kls))
    assert f["l1"]["z"] is None
    with pytest.raises(ValueError, match="two independent"):
        ev.pair_floor(chains[:1], ["t"])
    pooled = ev.pooled(chains)
    torch.testing.assert_close(pooled["t"], sum(c["t"] for c in chains) / 4)


# ------------------------------------------------------------------------------------------------ attacks
def test_auc_equals_the_pair_count_with_half_ties():
    rng = np.random.default_rng(2)
    pos, neg = rng.integers(0, 6, 40).astype(float), rng.integers(0, 6, 55).astype(float)
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert ev.auc(pos, neg) == pytest.approx(brute, abs=1e-12)
    assert ev.auc(np.array([3.0]), np.array([1.0, 2.0])) == 1.0
    assert ev.auc(np.array([]), np.array([1.0])) is None


def test_likelihood_ratio_attack_sees_memorisation_that_the_loss_attack_misses():
    # members are intrinsically HARD examples (low reference likelihood), non-members easy; the target model
    # memorised the members (+1 nat over the reference). A loss/confidence threshold ranks members BELOW
    # non-members; the per-example likelihood ratio separates them perfectly.
    rng = np.random.default_rng(3)
    ref_m = rng.uniform(-5.0, -3.0, 200)
    ref_n = rng.uniform(-1.5, -0.1, 300)
    tgt_m, tgt_n = ref_m + 1.0, ref_n + rng.normal(0, 0.05, 300)
    assert ev.loss_auc(tgt_m, tgt_n) == 0.0
    assert ev.likelihood_ratio_auc(tgt_m, tgt_n, ref_m, ref_n) == 1.0
    # a target equal to the reference (a retrained model) scores exactly 0.5: every score is 0
    assert ev.likelihood_ratio_auc(ref_m, ref_n, ref_m, ref_n) == 0.5


def test_log_true_prob_and_spread():
    p = _probs([[0.25, 0.75], [1.0, 0.0]])
    lp = ev.log_true_prob(p, torch.tensor([1, 1]))
    # a probability of 0 is clipped at float64's smallest normal number (at 1e-12 until stop 46: see below)
    assert lp[0] == pytest.approx(math.log(0.75)) and lp[1] == pytest.approx(math.log(torch.finfo(torch.float64).tiny))
    s = ev.spread([1.0, None, 3.0])
    assert s == {"mean": 2.0, "sd": pytest.approx(math.sqrt(2.0)), "min": 1.0, "max": 3.0, "n": 2}
    assert ev.spread([None])["n"] == 0


def test_a_nan_predictive_makes_every_distance_nan_whatever_the_order() -> None:
    """A diverged method's NaN predictive read as finite numbers: ``argmax`` takes every NaN row as class 0 (error
    0.5 here; 0 on a removed class 0), ``statistics.median`` with a NaN returns an order-dependent element (the same
    chains gave 0.0 or 0.0599), and ``spread`` crashed in ``statistics.stdev``."""
    g = torch.Generator().manual_seed(0)
    good = torch.softmax(torch.randn(6, 3, generator=g, dtype=torch.float64), 1)
    other, bad = good * 0.9 + 0.1 / 3, torch.full((6, 3), float("nan"), dtype=torch.float64)
    for chains in ([bad, good, other], [good, other, bad]):
        assert math.isnan(ev.distance_to_chains({"s": good}, [{"s": c} for c in chains], ["s"])["l1"]["s"])
    assert math.isnan(ev.pair_floor([{"s": c} for c in (good, other, bad)], ["s"])["l1"]["s"])
    assert math.isnan(ev.error_rates({"s": bad}, {"s": torch.tensor([0, 0, 1, 2, 1, 0])})["s"])
    for refs in ([float("nan"), 0.3, 0.2], [0.3, float("nan"), 0.2]):
        assert math.isnan(ev.error_gaps({"s": 0.1}, [{"s": r} for r in refs])["s"])
    s = ev.spread([float("nan"), 1.0, 2.0])
    assert s["n"] == 3 and math.isnan(s["mean"]) and math.isnan(s["sd"])


def test_probabilities_far_below_1e_12_keep_their_order_for_the_attacks():
    """A float32 softmax is 0 past a logit gap of about 104 and log p(y|x) was clipped at 1e-12: members and
    non-members of a class that both models predict below that tied, and the attack's AUC read 0.50 where the
    likelihood ratio separates them (0.72 in stop 46's probe)."""
    model = nn.Linear(1, 2, bias=False)
    theta = torch.tensor([[0.0, -1.0]])  # logits (0, -x): p(class 1 | x) = sigmoid(-x)
    x = torch.tensor([[40.0], [44.0], [120.0], [130.0]])
    p = ev.predictive(model, ParamSpec.assign, theta, {"x": x})["x"]
    lp = ev.log_true_prob(p, torch.ones(4, dtype=torch.long))
    assert np.all(np.isfinite(lp)) and np.all(np.diff(lp) < 0)  # distinct and ordered, down to about e^-130
    np.testing.assert_allclose(lp, -x[:, 0].double().numpy(), rtol=1e-9)
    members, non_members = lp[[0, 2]], lp[[1, 3]]  # each member 4 nats above a non-member
    assert ev.loss_auc(members, non_members) == 0.75


def test_a_weighted_method_is_thinned_by_systematic_resampling():
    """``_weighted_thin`` kept the k highest weights, renormalised (a biased predictive): each sample's kept weight
    is now within 1/k of its own, and the weights sum to 1."""
    from mcmc_unlearner.experiments.bnn import _weighted_thin

    g = torch.Generator().manual_seed(0)
    w = torch.rand(100, generator=g) ** 4
    w = w / w.sum()
    for k in (8, 32, 64):
        keep, kw = _weighted_thin(w, k, g)
        full = torch.zeros(100, dtype=torch.float64)
        full[keep] = kw
        assert float(kw.sum()) == pytest.approx(1.0) and keep.numel() <= k
        assert float((full - w.double()).abs().max()) <= 1.0 / k + 1e-12
    keep, kw = _weighted_thin(w, 0, g)
    assert keep.numel() == 100 and torch.allclose(kw, w.double())


def _mean_thinned(w: torch.Tensor, k: int, calls: int) -> torch.Tensor:
    from mcmc_unlearner.experiments.bnn import _weighted_thin

    total = torch.zeros(w.numel(), dtype=torch.float64)
    for seed in range(calls):
        keep, kw = _weighted_thin(w, k, torch.Generator().manual_seed(seed))
        total[keep] += kw
    return total / calls


@pytest.mark.parametrize(
    "w, k",
    [
        (torch.tensor([0.2, 0.2, 0.6]), 2),  # the fixed offset 0.5 kept [0, 0.5, 0.5] on every call
        (torch.tensor([0.0, 0.3, 0.0, 0.05, 0.65]), 3),  # zero weights are never drawn
        (torch.rand(40, generator=torch.Generator().manual_seed(3)) ** 4, 8),
    ],
)
def test_weighted_thinning_is_unbiased_over_seeds(w, k):
    """``_weighted_thin`` thinned with the fixed offset 0.5: deterministic, so the kept weights were off by up to
    1/k on every call ([0.2, 0.2, 0.6] to 2 gave the third 0.5). With a seeded uniform offset each kept weight
    ``c_i / k`` takes the two values around ``w_i`` (variance ``f(1 - f) / k^2 <= 1 / (4k^2)``, ``f`` the fraction of
    ``k w_i``), so the mean of ``n`` calls is within 5 standard errors ``5 / (2k sqrt(n))`` of ``w_i``."""
    w = (w / w.sum()).double()
    calls = 2000
    mean = _mean_thinned(w, k, calls)
    tol = 5.0 / (2 * k * math.sqrt(calls))
    assert float((mean - w).abs().max()) <= tol, (mean, w, tol)
    assert bool((mean[w == 0] == 0).all())


def test_weighted_thinning_is_reproducible_per_seed():
    """The same seed gives the same thinning (the experiment's numbers are reproducible); another seed may not."""
    from mcmc_unlearner.experiments.bnn import _weighted_thin

    w = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    a = _weighted_thin(w, 2, torch.Generator().manual_seed(8))
    b = _weighted_thin(w, 2, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    outs = {tuple(_weighted_thin(w, 2, torch.Generator().manual_seed(s))[0].tolist()) for s in range(20)}
    assert len(outs) > 1


# ------------------------------------------------------------------------------------------ the experiment's wiring
def _brute_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float(np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg]))


def test_the_experiment_reports_each_metric_as_the_docs_define_it():
    """``bnn._evaluate`` against the docs' definitions, computed by brute force from tiny predictive tables: error_gap
    = median over the retrain chains other than the method of |error - the chain's|, pred_diff / pred_kl = median of
    the mean per-example L1 / KL(retrain || method), floor = the same over pairs of retrain chains (KL both ways),
    mia.auc_removed = AUC of log p_method(y|x) - log p_ref(y|x), p_ref the pooled chains other than ``retrain``
    (other than the chain itself for a retrain chain), removed points against test points of the removed class."""
    from types import SimpleNamespace

    from mcmc_unlearner.experiments import bnn

    gen = torch.Generator().manual_seed(5)
    n, c = 5, 3
    labels = {
        "remaining": torch.tensor([0, 2, 0, 2, 0]),
        "removed": torch.ones(n, dtype=torch.long),
        "test": torch.tensor([1, 0, 2, 1, 0]),
        "test_removed_class": torch.ones(n, dtype=torch.long),
    }
    kept_mask = labels["test"] != 1
    labels["test_kept"] = labels["test"][kept_mask]
    chains = ["retrain", "retrain-b", "retrain-c"]
    names = [*chains, "unlearn"]
    # one predictive table per (method, split); ids 0-3 for the banks, 10-13 for the last states
    ids = [*range(4), *range(10, 14)]
    own = ("remaining", "removed", "test", "test_removed_class")
    table = {i: {s: _rand_probs(gen, n, c) for s in own} for i in ids}
    for t in table.values():
        t["test_kept"] = t["test"][kept_mask]

    def predict(thetas: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        w = torch.full((thetas.shape[0],), 1.0 / thetas.shape[0], dtype=torch.float64) if weights is None else weights
        return {s: sum(wi * table[int(th[0])][s] for th, wi in zip(thetas, w)) for s in labels}

    ex = SimpleNamespace(cfg=SimpleNamespace(eval_samples=0, progress=False, seed=0), labels=labels, predict=predict)
    results = {
        nm: bnn._Result(
            bank=torch.stack([torch.full((3,), float(i)), torch.randn(3, generator=gen)], 1),
            last=torch.tensor([10.0 + i, 0.0]),
            info={"seconds": 1.0, "cpu_seconds": 1.0},
        )
        for i, nm in enumerate(names)
    }
    out, floor, _ = bnn._evaluate(ex, results, chains)

    P = {nm: table[i] for i, nm in enumerate(names)}
    L = {nm: table[10 + i] for i, nm in enumerate(names)}

    def err(p, s):
        return float(np.mean(p[s].argmax(1).numpy() != labels[s].numpy()))

    def l1(a, b, s):
        return float(np.mean(np.abs(a[s].numpy() - b[s].numpy()).sum(1)))

    def kl(a, b, s):  # KL(a || b)
        a, b = a[s].numpy(), b[s].numpy()
        return float(np.mean((a * np.log(a / b)).sum(1)))

    def logp(p, s):
        return np.log(p[s].numpy()[np.arange(n), labels[s].numpy()])

    splits = ("remaining", "removed", "test", "test_kept")
    for nm in names:
        others = [ch for ch in chains if ch != nm]
        for s in splits:
            assert out[nm]["error"][s] == pytest.approx(err(P[nm], s))
            assert out[nm]["error_gap"][s] == pytest.approx(
                statistics.median(abs(err(P[nm], s) - err(P[ch], s)) for ch in others)
            )
            assert out[nm]["pred_diff"][s] == pytest.approx(statistics.median(l1(P[ch], P[nm], s) for ch in others))
            assert out[nm]["pred_kl"][s] == pytest.approx(statistics.median(kl(P[ch], P[nm], s) for ch in others))
            assert out[nm]["pred_diff_last"][s] == pytest.approx(
                statistics.median(l1(L[ch], L[nm], s) for ch in others)
            )
        refs = others if nm in chains else chains[1:]
        assert out[nm]["mia"]["reference_chains"] == refs
        ref = {s: sum(P[r][s] for r in refs) / len(refs) for s in ("removed", "test_removed_class")}
        members = logp(P[nm], "removed") - logp(ref, "removed")
        non_members = logp(P[nm], "test_removed_class") - logp(ref, "test_removed_class")
        assert out[nm]["mia"]["auc_removed"] == pytest.approx(_brute_auc(members, non_members))
        assert out[nm]["mia"]["auc_removed_vs_test_same_class"] == pytest.approx(
            _brute_auc(logp(P[nm], "removed"), logp(P[nm], "test_removed_class"))
        )
    pairs = list(itertools.combinations(chains, 2))
    for s in splits:
        assert floor["pred_diff"][s] == pytest.approx(statistics.median(l1(P[a], P[b], s) for a, b in pairs))
        assert floor["pred_kl"][s] == pytest.approx(
            statistics.median(kl(P[a], P[b], s) for a, b in itertools.permutations(chains, 2))
        )
        assert floor["error_gap"][s] == pytest.approx(
            statistics.median(abs(err(P[a], s) - err(P[b], s)) for a, b in pairs)
        )
    # the direction of pred_kl matters here: KL(method || retrain) would give another number
    s = "test"
    rev = statistics.median(kl(P["unlearn"], P[ch], s) for ch in chains)
    assert abs(out["unlearn"]["pred_kl"][s] - rev) > 1e-3


def test_likelihood_ratio_auc_by_hand():
    """Scores log p - log p_ref: members [0.5, -0.2], non-members [0.1, -0.5, 0.5]; pairs won 2 + 1 and one tie of
    six: AUC (3 + 0.5) / 6."""
    m, n = np.log([0.5, 0.2]), np.log([0.3, 0.1, 0.4])
    m_ref, n_ref = m - np.array([0.5, -0.2]), n - np.array([0.1, -0.5, 0.5])
    assert ev.likelihood_ratio_auc(m, n, m_ref, n_ref) == pytest.approx(3.5 / 6)
