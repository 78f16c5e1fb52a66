"""Tests of the BNN unlearning experiment: metric helpers on hand-checkable inputs and a reduced end-to-end run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mcmc_unlearner.cli import main
from mcmc_unlearner.experiments.bnn import (
    METHODS,
    confidence_attack,
    importance_weights,
    weighted_knn_kl,
)
from mcmc_unlearner.metrics import knn_kl

TINY = [
    "--explore-steps",
    "150",
    "--sample-steps",
    "300",
    "--bank-size",
    "12",
    "--curvature-draws",
    "4",
    "--damping",
    "1000",
    "--no-progress",
]


# ------------------------------------------------------------------------------------------------ helpers
def test_attack_perfectly_separated_scores():
    members = np.array([0.9, 0.8, 0.95])
    nonmembers = np.array([0.1, 0.2, 0.3])
    target = np.array([0.85, 0.05, 0.5, 0.9])
    res = confidence_attack(members, nonmembers, target)
    assert res["auc"] == 1.0
    # roc_curve's best threshold is the lowest member score: every member in, every non-member out
    assert res["threshold"] == pytest.approx(0.8)
    assert res["member_share"] == 1.0 and res["nonmember_share"] == 0.0
    assert res["target_share"] == pytest.approx(0.5)  # 0.85 and 0.9 are >= 0.8


def test_attack_auc_by_hand():
    # pairs (member > non-member): 0.6>0.5, 0.6>0.3, 0.4<0.5, 0.4>0.3 -> 3 of 4
    res = confidence_attack(np.array([0.6, 0.4]), np.array([0.5, 0.3]), np.array([0.45]))
    assert res["auc"] == pytest.approx(0.75)
    assert 0.0 <= res["target_share"] <= 1.0


def test_attack_needs_both_groups():
    with pytest.raises(ValueError, match="at least one member"):
        confidence_attack(np.array([]), np.array([0.1]), np.array([0.2]))


def test_importance_weights_closed_form():
    lw = torch.tensor([1000.0, 1000.0 + math.log(3.0)], dtype=torch.float64)  # would overflow exp() unshifted
    w, ess = importance_weights(lw)
    assert torch.allclose(w, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert ess == pytest.approx(1.0 / (0.25**2 + 0.75**2))
    g = torch.Generator().manual_seed(0)
    lw = torch.randn(50, generator=g, dtype=torch.float64) * 3
    w, ess = importance_weights(lw)
    e = lw.exp()
    assert float(w.sum()) == pytest.approx(1.0)
    assert ess == pytest.approx(float(e.sum() ** 2 / (e * e).sum()))
    assert 1.0 <= ess <= 50.0
    _, ess_flat = importance_weights(torch.zeros(7))
    assert ess_flat == pytest.approx(7.0)
    with pytest.raises(ValueError):
        importance_weights(torch.tensor([0.0, float("nan")]))


def test_weighted_knn_kl_equals_unweighted_for_uniform_weights():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(60, 5, generator=g, dtype=torch.float64)
    q = torch.randn(70, 5, generator=g, dtype=torch.float64) + 0.5
    w = torch.full((60,), 1 / 60, dtype=torch.float64)
    assert weighted_knn_kl(p, w, q) == pytest.approx(knn_kl(p, q), rel=1e-9)
    # reweighting N(0, I) samples by q/p ∝ exp(Σx) turns them into samples of Q = N(1, I): the true KL drops from
    # |1|²/2 = 1 (d = 2) to 0; over seeds 0..7 the weighted estimate scattered within ±0.55 of 0 (n = 400)
    g = torch.Generator().manual_seed(1)
    p = torch.randn(400, 2, generator=g, dtype=torch.float64)
    q = torch.randn(400, 2, generator=g, dtype=torch.float64) + 1.0
    plain = knn_kl(p, q)
    tilted = weighted_knn_kl(p, torch.softmax(p.sum(1), 0), q)
    assert abs(plain - 1.0) < 0.3
    assert abs(tilted) < 0.6 and tilted < plain - 0.5


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bnn")
    code = main(["bnn", "--out", str(out), "--seed", "3", *TINY])
    assert code == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_cli_writes_outputs(tiny_run):
    out, m = tiny_run
    assert (out / "report.md").read_text().startswith("# BNN unlearning: digits")
    assert (out / "progress.png").stat().st_size > 0
    assert m["dataset"]["n_removed"] == m["dataset"]["eval_sizes"]["removed"] > 0
    assert m["dataset"]["n_requests"] == math.ceil(m["dataset"]["n_removed"] / 64)


def test_metrics_keys(tiny_run):
    _, m = tiny_run
    for name in METHODS:
        r = m["methods"][name]
        assert set(r["error"]) >= {"remaining", "removed", "test"}
        for key in ("mia", "kl_to_retrain", "pred_diff", "seconds"):
            assert key in r, (name, key)
        assert all(0.0 <= r["error"][k] <= 1.0 for k in ("remaining", "removed", "test", "test_kept"))
        assert math.isfinite(r["kl_to_retrain"])
    assert m["methods"]["retrain"]["pred_diff"]["test"] == 0.0
    un = m["methods"]["unlearn"]
    assert len(un["requests"]) == m["dataset"]["n_requests"]
    assert un["seconds_per_request"] > 0
    assert m["progress"]["unlearn"][-1]["removed"] == m["dataset"]["n_removed"]


def test_unlearn_raises_removed_error(tiny_run):
    _, m = tiny_run
    assert m["methods"]["unlearn"]["error"]["removed"] > m["methods"]["origin"]["error"]["removed"]


def test_importance_ess_in_range(tiny_run):
    _, m = tiny_run
    imp = m["methods"]["importance"]
    assert 1.0 - 1e-9 <= imp["ess"] <= imp["n_samples"] + 1e-9
    assert 0.0 < imp["max_weight"] <= 1.0


def test_bad_request_is_refused(tmp_path, capsys):
    code = main(["bnn", "--out", str(tmp_path / "x"), "--remove-count", "100000", *TINY])
    assert code == 2
    assert "--remove-count" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_save_model_writes_a_loadable_folder(tmp_path):
    store = pytest.importorskip("mcmc_unlearner.store")
    folder = tmp_path / "model"
    args = ["bnn", "--out", str(tmp_path / "o"), "--save-model", str(folder), "--remove-count", "10", *TINY]
    args[args.index("--sample-steps") + 1] = "40"
    args[args.index("--explore-steps") + 1] = "10"
    args[args.index("--bank-size") + 1] = "4"
    assert main(args) == 0
    loaded = store.load_model(folder)
    assert loaded.unlearner.bank.shape[0] == 4
