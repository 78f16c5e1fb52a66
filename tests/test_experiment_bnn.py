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


def test_contract_keys_for_scripts(tiny_run):
    # the keys issue 12's scripts read, for every method of the contract, and the retrain-pair floor
    _, m = tiny_run
    for name in ("retrain", "unlearn", "paper", "finetune"):
        r = m["methods"][name]
        assert r["status"] == "ok"
        for value in (
            r["error"]["removed"],
            r["error"]["test_kept"],
            r["pred_diff"]["test_kept"],
            r["mia"]["auc_removed"],
            r["seconds"],
        ):
            assert isinstance(value, float) and math.isfinite(value), name
        assert 0.0 <= r["mia"]["auc_removed"] <= 1.0
    assert m["floor"]["pred_diff"]["test_kept"] > 0
    assert m["floor"]["pairs"] == 3 and m["retrain_chains"]["names"] == ["retrain", "retrain-b", "retrain-c"]


def test_distances_are_medians_over_the_other_retrain_chains(tiny_run):
    _, m = tiny_run
    me = m["methods"]
    # retrain's own distance is measured to the OTHER chains, so it is not 0 and sits at the floor's scale
    assert me["retrain"]["pred_diff"]["test_kept"] > 0
    chain_d = [me[c]["pred_diff"]["test_kept"] for c in ("retrain", "retrain-b", "retrain-c")]
    assert min(chain_d) <= m["floor"]["pred_diff"]["test_kept"] <= max(chain_d)
    # origin never saw the removal: far from retraining on the removed points, at least as far as any retrain chain
    assert me["origin"]["error_gap"]["removed"] > 0.5
    assert me["origin"]["pred_diff"]["removed"] > max(me[c]["pred_diff"]["removed"] for c in ("retrain", "retrain-b"))
    # digits: no subsampling, so the held-out points of the class are exactly the test set's
    sizes = m["dataset"]["eval_sizes"]
    assert sizes["test_kept"] + sizes["test_removed_class"] == sizes["test"]


def test_per_request_times_add_up(tiny_run):
    _, m = tiny_run
    for name in ("unlearn", "paper", "finetune", "langevin"):
        r = m["methods"][name]
        assert len(r["request_seconds"]) == m["dataset"]["n_requests"]
        assert r["seconds"] == pytest.approx(sum(r["request_seconds"]))
        assert r["n_remaining_after"] == m["dataset"]["n_remaining"]
    assert m["methods"]["langevin"]["sampler_steps"] == 129 * m["dataset"]["n_requests"]


def test_metrics_keys(tiny_run):
    _, m = tiny_run
    for name in METHODS:
        r = m["methods"][name]
        assert set(r["error"]) >= {"remaining", "removed", "test"}
        for key in ("mia", "kl_to_retrain", "pred_diff", "seconds"):
            assert key in r, (name, key)
        assert all(0.0 <= r["error"][k] <= 1.0 for k in ("remaining", "removed", "test", "test_kept"))
        assert math.isfinite(r["kl_to_retrain"])
    assert m["methods"]["retrain"]["kl_to_retrain"] == 0.0
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
    # no budget given: none saved (the loading machine's default), not the bytes this run judged its settings with
    assert loaded.manifest["unlearner"]["memory_budget"] is None


# ------------------------------------------------------------------------------------------------ refusals
def _refusing_forget(monkeypatch, refuse: set[int]):
    """Make the ``unlearn`` method's unlearner (the only MCMCUnlearner of a run) refuse the listed requests (0-based),
    like a failed solve."""
    from mcmc_unlearner.errors import SolverDivergedError
    from mcmc_unlearner.unlearner import MCMCUnlearner

    original = MCMCUnlearner.forget
    calls = {"n": 0}

    def forget(self, ids, data, **kw):
        calls["n"] += 1
        if calls["n"] - 1 in refuse:
            raise SolverDivergedError("injected: the solve diverged")
        return original(self, ids, data, **kw)

    monkeypatch.setattr(MCMCUnlearner, "forget", forget)


SMALL = [*TINY, "--methods", "unlearn,importance", "--retrain-chains", "2"]
SMALL[SMALL.index("--explore-steps") + 1] = "20"
SMALL[SMALL.index("--sample-steps") + 1] = "40"
SMALL[SMALL.index("--bank-size") + 1] = "6"


def test_every_refused_request_is_recorded_and_skip_leaves_the_posterior_unshifted(tmp_path, monkeypatch):
    _refusing_forget(monkeypatch, {0, 1, 2})
    out = tmp_path / "r"
    assert main(["bnn", "--out", str(out), "--seed", "1", *SMALL]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (out / "report.md").exists()
    un, origin = m["methods"]["unlearn"], m["methods"]["origin"]
    assert un["refused"] == 3 == m["refused"]["unlearn"]
    assert [r["request"] for r in un["refusals"]] == [0, 1, 2]
    assert un["refusals"][0]["error"] == "SolverDivergedError" and "injected" in un["refusals"][0]["message"]
    assert un["requests"] == [{"refused": True}] * 3
    # the points left the data anyway, and the posterior is exactly the origin's
    assert un["n_remaining_after"] == m["dataset"]["n_remaining"]
    assert un["error"] == origin["error"] and un["error_last"] == origin["error_last"]
    assert un["pred_diff"] == origin["pred_diff"]
    assert "refused 3" in (out / "report.md").read_text()


def test_refusal_policy_sgld_repairs_the_live_chain(tmp_path, monkeypatch):
    _refusing_forget(monkeypatch, {1})
    out = tmp_path / "r"
    args = ["bnn", "--out", str(out), "--seed", "1", "--on-refusal", "sgld", "--repair-steps", "7", *SMALL]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    un = m["methods"]["unlearn"]
    assert un["refused"] == 1 and un["refusals"][0]["request"] == 1 and un["repair_steps"] == 7
    assert un["requests"][0] != {"refused": True} and un["requests"][1] == {"refused": True}
    assert un["on_refusal"] == "sgld" and un["n_remaining_after"] == m["dataset"]["n_remaining"]


def test_a_crashing_method_does_not_cost_the_report(tmp_path, monkeypatch):
    import mcmc_unlearner.experiments.bnn as bnn

    def boom(*a, **k):
        raise RuntimeError("injected crash")

    monkeypatch.setattr(bnn, "_run_importance", boom)
    out = tmp_path / "r"
    # the report is written; the exit code says a method failed (70: not a refusal), as stop 47 made it (it was 0)
    assert main(["bnn", "--out", str(out), *SMALL]) == 70
    m = json.loads((out / "metrics.json").read_text())
    assert m["methods"]["importance"]["status"] == "failed" and "injected crash" in m["methods"]["importance"]["failed"]
    assert m["methods"]["importance"]["error"]["removed"] is None
    assert m["methods"]["unlearn"]["status"] == "ok"
    assert "FAILED" in (out / "report.md").read_text()
    assert m["methods"]["importance"]["failed_refusal"] is False


def test_a_refusal_is_told_from_a_crash_by_its_type_not_its_name(tmp_path, monkeypatch):
    """Was: a failed method counted as a refusal when its recorded error started with one of five class names, so a
    refusal raised as another ``UnlearningError`` (or a subclass a user's ``nll`` raises) read as an internal error
    (exit 70, "please report it")."""
    import mcmc_unlearner.experiments.bnn as bnn
    from mcmc_unlearner.errors import UnlearningError

    class NotApplied(UnlearningError):
        pass

    def refuse(*a, **k):
        raise NotApplied("the request was not applied")

    monkeypatch.setattr(bnn, "_run_importance", refuse)
    out = tmp_path / "r"
    assert main(["bnn", "--out", str(out), *SMALL]) == 2
    m = json.loads((out / "metrics.json").read_text())
    assert m["methods"]["importance"]["status"] == "failed" and m["methods"]["importance"]["failed_refusal"] is True


def test_self_pretraining_never_shows_a_retrain_chain_the_removed_points(tmp_path, monkeypatch):
    import mcmc_unlearner.experiments.bnn as bnn

    seen: dict[str, tuple[int, torch.Tensor]] = {}
    original = bnn._sgd

    def spy(model, data, steps, lr, momentum, label, bar):
        seen[label.split(":")[0]] = (len(data), data.tensors[1].clone())
        return original(model, data, steps, lr, momentum, label, bar)

    monkeypatch.setattr(bnn, "_sgd", spy)
    out = tmp_path / "r"
    assert main(["bnn", "--out", str(out), "--pretrain", "self", "--pretrain-steps", "3", *SMALL]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(seen) == {"origin", "retrain", "retrain-b"}
    assert seen["origin"][0] == m["dataset"]["n_train"] and bool((seen["origin"][1] == 0).any())
    for chain in ("retrain", "retrain-b"):
        n, labels = seen[chain]
        assert n == m["dataset"]["n_remaining"] and not bool((labels == 0).any())  # class 0 was removed
    assert any("own data" in note for note in m["notes"])


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--retrain-chains", "1"], "--retrain-chains"),
        (["--methods", "finetune"], "needs unlearn"),
        (["--methods", "bogus"], "unknown method(s) ['bogus']"),
        (["--unlearner-kw", "bogus=1"], "no keyword argument"),
        (["--unlearner-kw", "nokey"], "expected KEY=VALUE"),
        (["--data-dir", "/nonexistent"], "the data set is digits"),  # was ignored, written into metrics.json
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path, capsys, flags, needle):
    """One stderr line naming the problem, exit code 2 (the CLI's refusal contract), no output folder."""
    assert main(["bnn", "--out", str(tmp_path / "x"), *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ Fashion-MNIST preset
def _write_fake_fmnist(folder, rng, per_class_train: int = 12, per_class_test: int = 3) -> None:
    """Small IDX files in the Debian layout: each class a noisy copy of its own random prototype."""
    import gzip
    import struct

    folder.mkdir(parents=True)
    protos = rng.integers(0, 256, (10, 28, 28))

    def images(n):
        y = np.repeat(np.arange(10), n)
        x = np.clip(protos[y] + rng.normal(0, 40, (len(y), 28, 28)), 0, 255).astype(np.uint8)
        return x, y.astype(np.uint8)

    for prefix, n in (("train", per_class_train), ("t10k", per_class_test)):
        x, y = images(n)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
            with gzip.open(folder / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + arr.tobytes())


def test_paper_fmnist_preset_runs_on_debian_layout_files_without_mnist(tmp_path):
    folder = tmp_path / "fashion-mnist"
    _write_fake_fmnist(folder, np.random.default_rng(0))
    out = tmp_path / "o"
    args = ["bnn", "--preset", "paper-fmnist", "--quick", "--data-dir", str(folder), "--out", str(out)]
    args += ["--explore-steps", "20", "--sample-steps", "40", "--bank-size", "4", "--batch-size", "16"]
    args += ["--request-size", "6", "--paper-iter-T", "4", "--langevin-steps", "3", "--pretrain-steps", "5"]
    args += ["--no-progress"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"]["name"] == "fashion-mnist" and m["model"]["arch"] == "lenet5"
    assert m["dataset"]["input"].startswith("32x32") and m["dataset"]["n_requests"] == 2
    # MNIST is absent: said so; the shared initial weights pre-train on half of the test set, which leaves evaluation
    assert any("pre-training on mnist" in n and "skipped" in n and "half of the" in n for n in m["notes"])
    assert m["dataset"]["n_test_evaluated_from"] == 15 == m["dataset"]["eval_sizes"]["test"]  # 30 test images
    assert m["dataset"]["eval_sizes"]["test_removed_class"] == int(m["dataset"]["eval_sizes"]["test"]) - int(
        m["dataset"]["eval_sizes"]["test_kept"]
    )
    assert m["config"]["retrain_chains"] == 2 and m["config"]["paper_init_scaling"] == 0.05
    for name in ("retrain", "unlearn", "paper", "finetune", "langevin", "importance"):
        assert m["methods"][name]["status"] == "ok", name
    report = (out / "report.md").read_text()
    assert "skipped: dataset 'mnist' not found" in report and "fashion-mnist, lenet5" in report
    # two retrain chains attack each other: AUCs summing to 1 are no spread (it was reported as the attack's noise)
    aucs = [m["methods"][c]["mia"]["auc_removed"] for c in m["retrain_chains"]["names"]]
    assert len(aucs) == 2 and aucs[0] + aucs[1] == pytest.approx(1.0, abs=1e-12)
    assert (
        m["retrain_chains"]["auc_removed"]["sd"] is None and "3 or more" in m["retrain_chains"]["auc_removed"]["note"]
    )
    assert m["targets"]["attack_auc_within_0.05_of_retrain"]["retrain_chains_sd"] is None


def test_heldout_pretraining_half_never_enters_the_evaluation(tmp_path):
    from mcmc_unlearner.experiments.bnn import PRESETS, BNNConfig, _Experiment

    folder = tmp_path / "fashion-mnist"
    _write_fake_fmnist(folder, np.random.default_rng(1), per_class_test=4)
    cfg = BNNConfig(**{**PRESETS["paper-fmnist"], "data_dir": str(folder), "pretrain_steps": 2, "progress": False})
    ex = _Experiment(cfg)
    held = set(ex.heldout_ids.tolist())
    assert len(held) == 20  # half of the 40 test images
    for split in ("test", "test_removed_class"):
        src, ids = ex.eval_ids[split]
        assert src == "test" and held.isdisjoint(ids.tolist())
    assert set(ex.eval_ids["test"][1].tolist()) | held == set(range(40))
    # the evaluation half's images of the removed class are all in the attack's non-member set
    test_ids = ex.eval_ids["test"][1]
    class0 = test_ids[ex.data.y_test[test_ids] == 0]
    assert torch.equal(class0, ex.eval_ids["test_removed_class"][1])


def test_fmnist_files_in_a_plain_folder_are_not_taken_for_mnist_pretraining(tmp_path):
    # MNIST and Fashion-MNIST share file names: found again under ./data, the Fashion files are the pre-training set
    # only by name; MNIST counts as absent and the documented fallback (the held-out test half) applies, with a note
    from mcmc_unlearner.experiments.bnn import PRESETS, BNNConfig, _Experiment

    folder = tmp_path / "data"
    _write_fake_fmnist(folder, np.random.default_rng(2), per_class_test=4)
    cfg = BNNConfig(**{**PRESETS["paper-fmnist"], "data_dir": str(folder), "pretrain_steps": 2, "progress": False})
    ex = _Experiment(cfg)
    assert ex.pre is None and len(ex.heldout_ids) == 20
    assert any("hold the fashion-mnist training images" in n for n in cfg.notes)
    no_fallback = {**PRESETS["paper-fmnist"], "data_dir": str(folder), "pretrain_fallback": None, "progress": False}
    with pytest.raises(ValueError, match="counts as absent; put the pre-training set in its own folder"):
        _Experiment(BNNConfig(**no_fallback))


def test_paper_fmnist_preset_names_the_missing_files(tmp_path, capsys):
    code = main(["bnn", "--preset", "paper-fmnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "train-images-idx3-ubyte" in err
    assert not (tmp_path / "o").exists()


def test_targets_measure_distance_to_retraining_and_cpu_time_ratios():
    from mcmc_unlearner.experiments.bnn import _targets

    def method(gap, pd, auc, wall, cpu):
        return {
            "status": "ok",
            "error_gap": {"removed": gap},
            "pred_diff": {"test_kept": pd},
            "mia": {"auc_removed": auc},
            "seconds": wall,
            "cpu_seconds": cpu,
        }

    m = {
        "methods": {
            "retrain": method(0.01, 0.10, 0.50, 1000.0, 100.0),
            "unlearn": method(0.04, 0.14, 0.54, 50.0, 1.5),
            "paper": method(0.02, 0.15, 0.51, 100.0, 20.0),
        },
        "floor": {"pred_diff": {"test_kept": 0.10}},
    }
    t = _targets(m)
    assert t["removed_error_within_5pts"]["met"]
    assert t["pred_diff_test_kept_within_1.5x_floor"]["ratio"] == pytest.approx(1.4)
    assert t["pred_diff_test_kept_within_1.5x_floor"]["met"]
    assert t["attack_auc_within_0.05_of_retrain"]["gap"] == pytest.approx(0.04)
    assert t["attack_auc_within_0.05_of_retrain"]["met"]
    # CPU seconds decide (1.5%), the wall-clock ratio (5%) is shown beside
    assert t["time_at_most_2pct_of_retrain"]["ratio"] == pytest.approx(0.015)
    assert t["time_at_most_2pct_of_retrain"]["ratio_wall"] == pytest.approx(0.05)
    assert t["time_at_most_2pct_of_retrain"]["met"]
    paper = t["10x_faster_than_paper_at_equal_or_better_distance"]
    assert paper["speedup"] == pytest.approx(20.0 / 1.5) and paper["met"]
    # 6 points from the retrain chains' removed error (either side) misses
    m["methods"]["unlearn"]["error_gap"]["removed"] = 0.06
    m["methods"]["unlearn"]["pred_diff"]["test_kept"] = 0.16  # now farther than the paper's 0.15
    t = _targets(m)
    assert not t["removed_error_within_5pts"]["met"]
    assert not t["pred_diff_test_kept_within_1.5x_floor"]["met"]
    assert not t["10x_faster_than_paper_at_equal_or_better_distance"]["met"]


def test_unlearner_keywords_reach_the_unlearner(tmp_path, monkeypatch):
    import functools

    from mcmc_unlearner.unlearner import MCMCUnlearner

    seen = {}
    original = MCMCUnlearner.__init__

    @functools.wraps(original)  # keeps the signature the option check reads
    def init(self, *a, **kw):
        seen.update(kw)
        original(self, *a, **kw)

    monkeypatch.setattr(MCMCUnlearner, "__init__", init)
    out = tmp_path / "r"
    flags = ["--unlearner-kw", "carry_deficit=false", "--unlearner-kw", "check_draws=3", "--damping", "50"]
    assert main(["bnn", "--out", str(out), *SMALL, *flags]) == 0
    assert seen["carry_deficit"] is False and seen["check_draws"] == 3 and seen["damping"] == 50.0
    m = json.loads((out / "metrics.json").read_text())
    assert "carry_deficit=False" in m["unlearner_settings"] and "damping=50.0" in m["unlearner_settings"]


def test_the_run_s_unlearners_get_the_memory_budget_judged_before_training(tmp_path, monkeypatch):
    """A percentage (or the default) ``memory_budget`` was resolved in the check before training and again by each
    unlearner the run built after it, each of the memory available then: the budget judged and the budget used
    could differ. The check's bytes are now given to the unlearners (here the saved one and ``unlearn``'s, the
    memory available falling by 1 MiB at each reading)."""
    import functools

    from mcmc_unlearner import memory
    from mcmc_unlearner.experiments import options
    from mcmc_unlearner.experiments.bnn import BNNConfig, run_bnn
    from mcmc_unlearner.store import load_model
    from mcmc_unlearner.unlearner import MCMCUnlearner

    readings = iter(range(8 * 2**30, 0, -(2**20)))
    monkeypatch.setattr(memory, "available_memory", lambda: next(readings))
    judged, used = [], []
    check = options.check_combinations

    def spy(kw, network):
        judged.append(kw["memory_budget"])
        return check(kw, network)

    monkeypatch.setattr(options, "check_combinations", spy)
    original = MCMCUnlearner.__init__

    @functools.wraps(original)  # keeps the signature the option check reads
    def init(self, *a, **kw):
        original(self, *a, **kw)
        used.append((kw["memory_budget"], self.memory_budget))

    monkeypatch.setattr(MCMCUnlearner, "__init__", init)
    cfg = BNNConfig(
        explore_steps=10, sample_steps=40, bank_size=4, remove_count=10, retrain_chains=2, methods=("unlearn",),
        progress=False, save_model=str(tmp_path / "model"), unlearner_kwargs={"memory_budget": "50%"},
    )  # fmt: skip
    run_bnn(cfg)
    assert len(judged) == 1 and isinstance(judged[0], int) and 4 * 2**30 - 2**24 < judged[0] <= 4 * 2**30, judged
    assert used == [(judged[0], judged[0])] * 2, (judged, used)  # the saved unlearner's and unlearn's
    # the folder keeps the budget as given (a share of the memory where it is loaded), not this machine's bytes
    assert load_model(tmp_path / "model").manifest["unlearner"]["memory_budget"] == "50%"


def test_collapsed_pretraining_is_refused_before_any_chain(tmp_path, monkeypatch):
    """Shared initial weights that predict one class (measured: the paper preset's seed 1) void every comparison:
    refused at once with the fix, instead of 40 minutes of chains that all sit at chance."""
    import mcmc_unlearner.experiments.bnn as B

    folder = tmp_path / "fashion-mnist"
    _write_fake_fmnist(folder, np.random.default_rng(1), per_class_test=4)
    # lr 0.01: at the preset's 0.1 (momentum 0.9) these 20 fake images reached 15% on one CPU (AVX-512) and passed
    # on another; at 0.01 every fake-data seed tried (1, 2, 3) reaches 45%, three times the refusal threshold
    settings = {
        **B.PRESETS["paper-fmnist"],
        "data_dir": str(folder),
        "pretrain_steps": 100,
        "pretrain_lr": 0.01,
        "progress": False,
    }
    cfg = B.BNNConfig(**settings)
    B._Experiment(cfg)  # a working pre-training passes and is reported
    assert any("accuracy" in note and "chance 10.0%" in note for note in cfg.notes)

    def collapse(model, *args, **kwargs):
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()  # every image gets the same logits: one class everywhere

    monkeypatch.setattr(B, "_sgd", collapse)
    cfg = B.BNNConfig(**settings)
    with pytest.raises(ValueError, match=r"pre-training on .* collapsed: accuracy 10\.0% .*--seed"):
        B._Experiment(cfg)


def test_the_report_describes_only_the_methods_that_ran(tmp_path) -> None:
    """`--methods unlearn,paper` described langevin's steps and importance sampling's sample, and the summary line
    printed a Python dict of refusals (stop 45's probe)."""
    from mcmc_unlearner.cli import main

    out = tmp_path / "run"
    assert main(["bnn", "--quick", "--quiet", "--seed", "1", "--methods", "unlearn,paper", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "paper: LiSSA" in text and "unlearn: MCMCUnlearner" in text
    assert "langevin" not in text and "importance" not in text
