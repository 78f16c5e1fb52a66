"""``mcmc-unlearner summary``: aggregation over synthetic metrics files with known statistics."""

from __future__ import annotations

import json
import math

import pytest

from mcmc_unlearner.cli import main
from mcmc_unlearner.experiments.summary import load_metrics, numeric_leaves, summarize_runs, summary_table


def _run(tmp_path, name: str, metrics: dict) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(metrics))
    return str(d)


def _metrics(seed: int, kl: float, met: bool, sampler: str = "sgld") -> dict:
    return {
        "seed": seed,
        "sampler": sampler,
        "methods": {
            "unlearn": {"vs_exact": {"kl_forward": kl, "gauss_kl": 2 * kl}, "seconds": 1.0 + seed, "note": "x"},
            "retrain": {"kl_to_retrain": None, "per_request": [1.0, 2.0]},
        },
        "retrain_chains": {"vs_exact": {"kl_forward": {"median": kl + 1, "values": [kl, kl + 1, kl + 2]}}},
        "targets": {"t": {"met": met}},
        "out_dir": f"/runs/{seed}",
    }


def test_numeric_leaves_walks_nested_dicts():
    leaves = numeric_leaves(_metrics(0, 1.5, True))
    assert leaves["methods.unlearn.vs_exact.kl_forward"] == 1.5
    assert leaves["retrain_chains.vs_exact.kl_forward.median"] == 2.5
    assert leaves["targets.t.met"] is True
    assert "methods.retrain.kl_to_retrain" not in leaves  # null
    assert not any(k.endswith("values") or k.endswith("per_request") for k in leaves)  # lists skipped
    assert "sampler" not in leaves and "methods.unlearn.note" not in leaves  # strings skipped
    assert numeric_leaves({"a": float("nan"), "b": 2}) == {"b": 2.0}


def test_summarize_runs_matches_hand_computed_statistics():
    kls = [1.0, 2.0, 4.0]
    runs = [_metrics(i, kl, met=i != 1) for i, kl in enumerate(kls)]
    s = summarize_runs(runs)
    assert s["n_runs"] == 3
    st = s["stats"]["methods.unlearn.vs_exact.kl_forward"]
    mean = sum(kls) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in kls) / 2)
    assert st == pytest.approx({"mean": mean, "sd": sd, "min": 1.0, "max": 4.0, "n": 3})
    assert s["stats"]["methods.unlearn.vs_exact.gauss_kl"]["mean"] == pytest.approx(2 * mean)
    assert s["stats"]["targets.t.met"]["true"] == 2 and s["stats"]["targets.t.met"]["mean"] == pytest.approx(2 / 3)
    assert s["differing"] == {}  # out_dir differs but is expected to
    # a leaf present in only some runs counts only those runs; one run has no sd
    runs[0]["extra"] = {"x": 5.0}
    s = summarize_runs(runs, keys=["extra.*", "seed"])
    assert set(s["stats"]) == {"seed", "extra.x"}
    assert s["stats"]["extra.x"] == {"mean": 5.0, "sd": None, "min": 5.0, "max": 5.0, "n": 1}
    # runs that differ in a string setting are flagged
    mixed = summarize_runs([_metrics(0, 1.0, True), _metrics(1, 2.0, True, sampler="sghmc")])
    assert mixed["differing"] == {"sampler": ["sgld", "sghmc"]}
    table = summary_table(summarize_runs(runs[:2]))
    assert "| methods.unlearn.vs_exact.kl_forward | 1.5 ± 0.707 | 1–2 | 2 |" in table
    assert "| targets.t.met | 1/2 true |  | 2 |" in table
    with pytest.raises(ValueError, match="at least one run"):
        summarize_runs([])


def test_cli_summary_prints_and_writes(tmp_path, capsys):
    dirs = [_run(tmp_path, f"s{i}", _metrics(i, kl, True)) for i, kl in enumerate([1.0, 3.0])]
    out_json = tmp_path / "summary.json"
    assert main(["summary", *dirs, "--out", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "2 runs" in printed and "| methods.unlearn.vs_exact.kl_forward | 2 ± 1.41 | 1–3 | 2 |" in printed
    data = json.loads(out_json.read_text())
    assert data["stats"]["methods.unlearn.seconds"] == {"mean": 1.5, "sd": pytest.approx(0.7071, abs=1e-4),
                                                        "min": 1.0, "max": 2.0, "n": 2}  # fmt: skip
    assert data["runs"] == [str(tmp_path / "s0" / "metrics.json"), str(tmp_path / "s1" / "metrics.json")]
    out_md = tmp_path / "summary.md"
    assert main(["summary", dirs[0], str(tmp_path / "s1" / "metrics.json"), "--out", str(out_md),
                 "--keys", "retrain_chains.*"]) == 0  # fmt: skip
    md = out_md.read_text()
    assert "retrain_chains.vs_exact.kl_forward.median" in md and "methods.unlearn" not in md
    capsys.readouterr()


def test_cli_summary_refuses_bad_input(tmp_path, capsys):
    assert main(["summary", str(tmp_path / "missing")]) == 2
    assert "no metrics file" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text("[1, 2]")
    assert main(["summary", str(bad)]) == 2
    assert "expected an object" in capsys.readouterr().err
    (bad / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_metrics(bad)
    good = _run(tmp_path, "good", _metrics(0, 1.0, True))
    assert main(["summary", good, "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
