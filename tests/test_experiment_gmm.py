"""The GMM demo end to end, at reduced length (fewer sampler steps, larger deletion requests)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mcmc_unlearner.cli import main
from mcmc_unlearner.experiments.gmm import METHODS, run_demo
from mcmc_unlearner.experiments.report import fmt, jsonable, markdown_table, summarize

SMALL = dict(burnin=600, samples=600, thin=5, request_size=20, progress=False)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    metrics = run_demo(sampler="sgld", seed=0, out=out, **SMALL)
    assert torch.get_num_threads() == threads  # the run restores the caller's thread count
    return out, metrics


def test_metrics_file_has_the_documented_keys(small_run):
    out, metrics = small_run
    on_disk = json.loads((out / "metrics.json").read_text())  # strict JSON (NaN would not parse back equal)
    for key in ("n_train", "n_removed", "request_size", "sampler", "seed", "noise_floor_kl", "unlearn_config"):
        assert key in on_disk, key
    assert (on_disk["n_train"], on_disk["n_removed"], on_disk["request_size"]) == (2000, 800, 20)
    assert on_disk["sampler"] == "sgld" and on_disk["n_requests"] == 40
    assert set(on_disk["methods"]) == set(METHODS)
    for name in METHODS:
        m = on_disk["methods"][name]
        assert m["seconds"] > 0
        assert (m["kl_to_retrain"] is None) == (name == "retrain")
    assert on_disk["noise_floor_kl"] == on_disk["methods"]["retrain-b"]["kl_to_retrain"]
    un = on_disk["methods"]["unlearn"]
    assert 0 < un["seconds_per_request_median"] < un["seconds"]
    reqs = on_disk["unlearn_requests"]
    assert len(reqs["per_request"]["seconds"]) == 40
    assert reqs["converged_all"] and reqs["residual"]["max"] < 1e-3
    assert reqs["shift_stderr"]["median"] < reqs["shift_norm"]["median"]  # the shift is not Monte-Carlo noise
    assert on_disk["methods"]["finetune"]["adapt_steps"] > 0
    assert on_disk["methods"] == json.loads(json.dumps(jsonable(metrics["methods"])))


def test_unlearning_moves_the_samples_to_the_retrained_posterior(small_run):
    _, metrics = small_run
    meth = metrics["methods"]
    kl_origin, kl_unlearn = meth["origin"]["kl_to_retrain"], meth["unlearn"]["kl_to_retrain"]
    # Origin sits ~25 nats away at this length; the noise floor is ~5-10. Unlearning must close most of the gap.
    assert kl_unlearn < 0.6 * kl_origin, (kl_unlearn, kl_origin)
    # The affine bank update widens the two thinned-out clusters: spread closer to retraining than origin's.
    assert abs(math.log(meth["unlearn"]["std_ratio"])) < abs(math.log(meth["origin"]["std_ratio"]))
    assert meth["unlearn"]["mean_distance"] < 0.4 * meth["origin"]["mean_distance"]


def test_report_and_figures_are_written(small_run):
    out, metrics = small_run
    report = (out / "report.md").read_text()
    assert "| unlearn |" in report and "noise floor" in report
    assert ("**met**" in report) or ("**missed**" in report)
    for name in metrics["figures"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    assert {"samples.png", "kl.png"} <= set(metrics["figures"])


def test_cli_demo_runs_sghmc_and_refuses_bad_arguments(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["demo", "--sampler", "sghmc", "--out", str(out), "--seed", "1", "--request-size", "40", "--quiet"]
    saved = tmp_path / "model"
    assert main([*argv, "--burnin", "400", "--samples", "400", "--thin", "4", "--save-model", str(saved)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sampler"] == "sghmc" and metrics["seed"] == 1 and metrics["n_requests"] == 20
    store = pytest.importorskip("mcmc_unlearner.store")
    if hasattr(store, "load_model"):  # the saved origin model reloads with its 400-sample bank and all data
        loaded = store.load_model(saved)
        assert len(loaded.data) == 2000 and metrics["save_model"].startswith("saved")
    assert "unlearn" in capsys.readouterr().out

    assert main(["demo", "--request-size", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--request-size must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["demo", "--out", str(a_file), "--quiet"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_report_helpers():
    assert fmt(None) == "—" and fmt(float("nan")) == "—" and fmt(True) == "yes"
    assert fmt(3.14159) == "3.14" and fmt(12345.6) == "12346" and fmt(1e-6) == "1.00e-06"
    table = markdown_table(["a", "b"], [[1, 2.5], [None, 0.001234]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2.5 |", "| — | 0.00123 |"]
    s = summarize([3.0, 1.0, 2.0])
    assert s == {"median": 2.0, "mean": 2.0, "min": 1.0, "max": 3.0, "total": 6.0}
    assert summarize([])["median"] is None
    assert jsonable({"x": float("inf"), "t": torch.tensor([1.5]), 3: (1, 2)}) == {"x": None, "t": [1.5], "3": [1, 2]}
