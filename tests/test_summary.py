"""``mcmc-unlearner summary``: aggregation over synthetic metrics files with known statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mcmc_unlearner.cli import main
from mcmc_unlearner.experiments.summary import load_metrics, numeric_leaves, summarize_runs, summary_table


def _run(tmp_path, name: str, metrics: dict) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(metrics))
    return str(d)


def _metrics(seed: int, kl: float, met: bool, sampler: str = "sgld") -> dict:
    """A demo run's metrics, in miniature (``experiment`` marks a run of this tool)."""
    return {
        "experiment": "gmm",
        "seed": seed,
        "sampler": sampler,
        "methods": {
            "unlearn": {"vs_exact": {"kl_forward": kl, "gauss_kl": 2 * kl}, "seconds": 1.0 + seed, "note": "x"},
            "retrain": {"kl_to_retrain": None, "per_request": [1.0, 2.0]},
        },
        "retrain_chains": {"vs_exact": {"kl_forward": {"median": kl + 1, "values": [kl, kl + 1, kl + 2]}}},
        "targets": {"t": {"met": met}},
        "comparison_config": {"retrain_chains": 4, "with_paper": False},  # recorded since stop 57
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


# ------------------------------------------------------------------ parsing and refusals (probe of the summary CLI)
def _bnn_metrics(seed: int) -> dict:
    """An older bnn run's metrics (no "experiment" key): config and dataset sections."""
    return {"config": {"seed": seed, "dataset": "digits"}, "dataset": {"name": "digits"},
            "methods": {"unlearn": {"seconds": 1.0 + seed}}, "floor": {"pred_diff": {"test_kept": 0.1}}}  # fmt: skip


def _one_line_error(args: list[str], capsys) -> str:
    rc = main(["summary", *args])
    out, err = capsys.readouterr()
    assert rc == 2 and not out, (rc, out, err)
    assert err.count("\n") == 1 and err.startswith("mcmc-unlearner summary: error: ") and "Traceback" not in err
    return err


def test_keys_before_or_between_the_run_folders(tmp_path, capsys):
    """Was: ``summary --keys K RUN_DIR ...`` (the usage line's own order) failed "required: RUN_DIR"."""
    dirs = [_run(tmp_path, f"s{i}", _metrics(i, kl, True)) for i, kl in enumerate([1.0, 3.0])]
    row = "| methods.unlearn.vs_exact.kl_forward | 2 ± 1.41 | 1–3 | 2 |"
    for args in (["--keys", "methods.*", *dirs], [dirs[0], "--keys", "methods.*", dirs[1]], [*dirs, "--keys", "m*"]):
        assert main(["summary", *args]) == 0, args
        out = capsys.readouterr().out
        assert out.startswith("2 runs: ") and row in out and "| seed |" not in out, args
    assert main(["summary", *dirs, "--keys", "seed,targets.*"]) == 0  # several patterns in one value
    out = capsys.readouterr().out
    assert "| seed |" in out and "| targets.t.met |" in out and "methods." not in out
    assert "summary RUN_DIR [RUN_DIR ...] [--keys GLOB" in _summary_parser().format_usage()
    err = _one_line_error(["--keys", "methods.*", str(tmp_path / "missing")], capsys)
    assert f"no run folders given (--keys took 'methods.*', '{tmp_path / 'missing'}')" in err


def _summary_parser():
    import argparse

    from mcmc_unlearner.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices["summary"]


def test_same_run_twice_is_refused(tmp_path, capsys):
    """Was: the same folder given twice counted as n=2."""
    d = _run(tmp_path, "s0", _metrics(0, 1.0, True))
    for twin in (d + "/", str(tmp_path / "s0" / "metrics.json"), str(tmp_path / "s0" / ".." / "s0")):
        err = _one_line_error([d, twin], capsys)
        assert "is the same run as" in err and "give each run once" in err, err


def test_runs_of_different_experiments_are_refused(tmp_path, capsys):
    """Was: a bnn run and a demo run summarised together: exit 0, n=1 everywhere, a huge "Runs differ" line."""
    demo = _run(tmp_path, "demo", {**_metrics(0, 1.0, True), "experiment": "gmm"})
    old_bnn = _run(tmp_path, "bnn", _bnn_metrics(1))
    err = _one_line_error([demo, old_bnn], capsys)
    assert "runs of different experiments" in err and "is a gmm run" in err and "is a bnn run" in err
    assert len(err) < 300
    new_bnn = _run(tmp_path, "bnn2", {**_bnn_metrics(2), "experiment": "bnn"})
    assert main(["summary", old_bnn, new_bnn]) == 0  # old and new bnn runs are one experiment
    capsys.readouterr()


def test_runs_sharing_a_seed_are_flagged(tmp_path, capsys):
    """Was: two runs of one seed were averaged silently."""
    a = _run(tmp_path, "a", _metrics(0, 1.0, True))
    b = _run(tmp_path, "b", _metrics(0, 2.0, True))
    c = _run(tmp_path, "c", _metrics(1, 2.0, True))
    assert main(["summary", a, b, c]) == 0
    out, err = capsys.readouterr()
    assert "3 runs" in out
    assert err.count("\n") == 1 and "warning: runs share a seed (seed 0: " in err and "'c'" not in err, err
    x, y = _run(tmp_path, "x", _bnn_metrics(4)), _run(tmp_path, "y", _bnn_metrics(4))  # bnn: config.seed
    assert main(["summary", x, y]) == 0 and "seed 4" in capsys.readouterr().err
    assert main(["summary", a, c]) == 0 and capsys.readouterr().err == ""


def test_keys_matching_nothing_are_refused(tmp_path, capsys):
    """Was: an empty table and exit 0."""
    d = _run(tmp_path, "s0", _metrics(0, 1.0, True))
    err = _one_line_error([d, "--keys", "method.*", "nope"], capsys)
    assert "--keys 'method.*' 'nope' match no metric" in err and "methods.*" in err and "seed" in err
    assert main(["summary", d, "--keys", "seed", "nope"]) == 0  # one pattern matched: a warning for the other
    out, err = capsys.readouterr()
    assert "| seed |" in out and "warning: --keys 'nope' matched no metric" in err


def test_out_checked_before_anything_is_printed(tmp_path, capsys):
    """Was: an unwritable --out printed the whole table, then failed."""
    d = _run(tmp_path, "s0", _metrics(0, 1.0, True))
    err = _one_line_error([d, "--out", str(tmp_path / "missing" / "s.md")], capsys)
    assert "cannot write" in err and "does not exist" in err
    metrics = tmp_path / "s0" / "metrics.json"
    before = metrics.read_text()
    assert "is one of the runs' metrics files" in _one_line_error([d, "--out", str(metrics)], capsys)
    assert metrics.read_text() == before


def test_long_differing_values_are_cut(tmp_path, capsys):
    a = _run(tmp_path, "a", {**_metrics(0, 1.0, True), "note": "x" * 5000})
    b = _run(tmp_path, "b", {**_metrics(1, 1.0, True), "note": "y" * 5000})
    assert main(["summary", a, b]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("Runs differ in"))
    assert len(line) < 300 and "note = " in line


# ------------------------------------------------------------------ benchmarks/fmnist_table.py
def _fmnist_table():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fmnist_table.py"
    spec = importlib.util.spec_from_file_location("fmnist_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fmnist_table_refuses_bad_folders_in_one_line(tmp_path, capsys):
    """Was: tracebacks (FileNotFoundError, JSONDecodeError without the file's name, KeyError: 'config')."""
    table = _fmnist_table()
    good = _run(tmp_path, "good", _bnn_metrics(0))
    truncated = tmp_path / "cut"
    truncated.mkdir()
    (truncated / "metrics.json").write_text(json.dumps(_bnn_metrics(1))[:40])
    demo = _run(tmp_path, "demo", {**_metrics(0, 1.0, True), "experiment": "gmm"})
    cases = [
        (str(tmp_path / "missing"), "does not exist"),
        (str(truncated), f"'{truncated / 'metrics.json'}' is not valid JSON"),
        (demo, f"'{tmp_path / 'demo' / 'metrics.json'}' is a gmm run"),
    ]
    for folder, needle in cases:
        assert table.main([good, folder]) == 2
        out, err = capsys.readouterr()
        assert not out and err.count("\n") == 1 and needle in err and "error:" in err, err


def test_fmnist_table_warns_about_duplicate_seeds(tmp_path, capsys):
    table = _fmnist_table()
    a, b = _run(tmp_path, "a", _bnn_metrics(3)), _run(tmp_path, "b", _bnn_metrics(3))
    assert table.main([a, b]) == 0
    out, err = capsys.readouterr()
    assert "2 seed(s): [3, 3]" in out and "warning: seed 3 given 2 times" in err
    assert table.main([a]) == 0 and capsys.readouterr().err == ""


# ------------------------------------------------------------------ NaN (and null) metrics are shown, not dropped
def test_nan_in_one_run_is_counted_and_listed_as_a_difference(tmp_path, capsys):
    """Was: a NaN metric in one run was silently dropped: the table said n=1 and nothing said why."""
    a, b = _metrics(0, 1.0, True), _metrics(1, 3.0, True)
    b["methods"]["unlearn"]["seconds"] = float("nan")
    b["methods"]["unlearn"]["vs_exact"]["gauss_kl"] = None  # how write_json spells a NaN
    s = summarize_runs([a, b])
    assert s["stats"]["methods.unlearn.seconds"] == {"mean": 1.0, "sd": None, "min": 1.0, "max": 1.0, "n": 1, "nan": 1}
    assert s["stats"]["methods.unlearn.vs_exact.gauss_kl"]["nan"] == 1
    assert s["differing"] == {
        "methods.unlearn.seconds": [1.0, "nan"],
        "methods.unlearn.vs_exact.gauss_kl": [2.0, "null"],
    }
    assert "nan" not in s["stats"]["methods.unlearn.vs_exact.kl_forward"]  # finite everywhere: as before
    assert "methods.retrain.kl_to_retrain" not in s["stats"]  # null in every run: not a number anywhere
    dirs = [_run(tmp_path, "a", a), _run(tmp_path, "b", b)]
    (tmp_path / "b" / "metrics.json").write_text(json.dumps(b))  # a literal NaN token, as json.dump writes it
    assert main(["summary", *dirs]) == 0
    out = capsys.readouterr().out
    assert "| methods.unlearn.seconds | 1 | 1–1 | 1 (+1 NaN) |" in out, out
    assert (
        "Runs differ in: methods.unlearn.vs_exact.gauss_kl = [2.0, 'null']; methods.unlearn.seconds = [1.0, 'nan']"
        in out
    )
    out_json = tmp_path / "s.json"
    assert main(["summary", *dirs, "--out", str(out_json)]) == 0
    data = json.loads(out_json.read_text())  # strict JSON: the NaN is counted, not written as a token
    assert data["stats"]["methods.unlearn.seconds"]["nan"] == 1
    assert data["differing"]["methods.unlearn.seconds"] == [1.0, "nan"]
    capsys.readouterr()


def test_nan_in_every_run_is_a_row(tmp_path, capsys):
    a, b = _metrics(0, 1.0, True), _metrics(1, 3.0, True)
    a["methods"]["unlearn"]["seconds"] = float("nan")
    b["methods"]["unlearn"]["seconds"] = float("inf")
    s = summarize_runs([a, b])
    assert s["stats"]["methods.unlearn.seconds"] == {"mean": None, "sd": None, "min": None, "max": None, "n": 0,
                                                      "nan": 2}  # fmt: skip
    assert "methods.unlearn.seconds" not in s["differing"]  # no run has a number there: nothing differs
    assert "| methods.unlearn.seconds | NaN |  | 0 (+2 NaN) |" in summary_table(s)
    assert summarize_runs([a, b], keys=["methods.unlearn.seconds"])["stats"]["methods.unlearn.seconds"]["nan"] == 2


def test_runs_on_different_data_sets_are_refused_unless_asked_for(tmp_path, capsys):
    """Was: a digits run and a fashion-mnist run averaged (exit 0), with only a "Runs differ in" note."""
    digits = _run(tmp_path, "d", {**_bnn_metrics(0), "experiment": "bnn"})
    fm = {**_bnn_metrics(1), "experiment": "bnn", "dataset": {"name": "fashion-mnist"}}
    fm["config"] = {**fm["config"], "dataset": "fashion-mnist"}
    fmnist = _run(tmp_path, "f", fm)
    err = _one_line_error([digits, fmnist], capsys)
    assert "different data sets" in err and f"digits: '{digits}'" in err and f"fashion-mnist: '{fmnist}'" in err
    assert "--mixed-datasets" in err
    assert main(["summary", digits, fmnist, "--mixed-datasets"]) == 0  # asked for by name: averaged as before
    out = capsys.readouterr().out
    assert "| methods.unlearn.seconds | 1.5 ± 0.707 | 1–2 | 2 |" in out and "dataset.name" in out
    # one data set (the demo's runs name none): summarised without the option
    assert main(["summary", digits, _run(tmp_path, "d2", {**_bnn_metrics(2), "experiment": "bnn"})]) == 0
    capsys.readouterr()
    assert "--mixed-datasets" in _summary_parser().format_help()


def test_runs_of_other_settings_are_refused_and_out_stays_outside_the_runs(tmp_path, capsys):
    """Was (stop 47's probe): newton_steps 2 averaged with 1, a --quick bnn run with a full one, exit 0 and no word;
    and --out inside a run's folder overwrote its report (or its metrics.json, which a later summary read as a run)."""
    a = {**_metrics(0, 1.0, True), "experiment": "gmm", "unlearn_config": {"newton_steps": 2}, "thin": 10}
    b = {**_metrics(1, 3.0, True), "experiment": "gmm", "unlearn_config": {"newton_steps": 1}, "thin": 10}
    dirs = [_run(tmp_path, "a", a), _run(tmp_path, "b", b)]
    err = _one_line_error(dirs, capsys)
    assert "settings differ in 1 place(s) (unlearn_config.newton_steps:" in err and "--mixed-settings" in err
    assert main(["summary", *dirs, "--mixed-settings"]) == 0
    capsys.readouterr()
    c = {**b, "seed": 2, "unlearn_config": {"newton_steps": 2}, "out_dir": "/elsewhere"}  # only where it ran differs
    assert main(["summary", dirs[0], _run(tmp_path, "c", c)]) == 0
    capsys.readouterr()
    bnn = [{**_bnn_metrics(s), "config": {**_bnn_metrics(s)["config"], "sample_steps": k, "threads": s + 1}}
           for s, k in ((0, 900), (1, 9000))]  # fmt: skip
    err = _one_line_error([_run(tmp_path, "q", bnn[0]), _run(tmp_path, "f", bnn[1])], capsys)
    assert "config.sample_steps" in err and "threads" not in err
    for inside in (tmp_path / "a" / "report.md", tmp_path / "a" / "summary.json"):
        assert "inside a run's folder" in _one_line_error([dirs[0], str(tmp_path / "c"), "--out", str(inside)], capsys)
    assert not (tmp_path / "a" / "report.md").exists()


def test_demo_runs_of_other_comparisons_are_refused_and_older_runs_are_unknown_there(tmp_path, capsys):
    """Was (stop 57's probe): demo runs with --retrain-chains 2 and 4, or with and without --with-paper, were
    averaged (those options were recorded nowhere summary compares). Runs written before comparison_config existed
    (docs/runs/gmm-stop47-*) are summarised with a warning that those settings are unknown."""
    base = {**_metrics(0, 1.0, True), "unlearn_config": {"newton_steps": 2}, "thin": 10}
    runs = {
        name: {**base, "seed": i, "comparison_config": {"retrain_chains": chains, "with_paper": paper}}
        for i, (name, chains, paper) in enumerate((("c4", 4, False), ("c2", 2, False), ("p4", 4, True)))
    }
    dirs = {name: _run(tmp_path, name, m) for name, m in runs.items()}
    err = _one_line_error([dirs["c4"], dirs["c2"]], capsys)
    assert "comparison_config.retrain_chains:" in err and f"'{dirs['c2']}'=2" in err and "--mixed-settings" in err
    err = _one_line_error([dirs["c4"], dirs["p4"]], capsys)
    assert "comparison_config.with_paper:" in err and f"'{dirs['p4']}'=true" in err
    assert main(["summary", dirs["c4"], dirs["c2"], "--mixed-settings"]) == 0
    capsys.readouterr()
    old = _run(tmp_path, "old", {k: v for k, v in base.items() if k != "comparison_config"} | {"seed": 5})
    assert main(["summary", dirs["c4"], old]) == 0
    err = capsys.readouterr().err
    assert f"'{old}' record(s) no comparison_config" in err and "--retrain-chains, --with-paper are unknown" in err
    assert f"'{dirs['c4']}'" not in err  # the run that records them is not named
    # the unknown run does not hide a difference between the runs that record it
    assert main(["summary", dirs["c4"], old, dirs["c2"]]) == 2
    err = capsys.readouterr().err
    assert "no comparison_config" in err and "error: the runs' settings differ in 1 place(s) (comparison_config" in err
    stored = [str(Path(__file__).parents[1] / "docs" / "runs" / f"gmm-stop47-{i}") for i in range(5)]
    assert main(["summary", *stored, "--keys", "methods.unlearn.seconds"]) == 0
    out, err = capsys.readouterr()
    assert "5 runs" in out and "record(s) no comparison_config" in err
    assert main(["summary", old]) == 0  # one run: compared with nothing, nothing to say
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("foreign", "said"),
    [
        ({"seed": 1, "accuracy": 0.9, "loss": 0.2}, 'it has no "experiment" key'),  # any tool's metrics.json
        ({"experiment": "resnet-train", "seed": 1, "accuracy": 0.9}, "its \"experiment\" is 'resnet-train'"),
        ({"experiment": 7, "seed": 1}, 'its "experiment" is 7, not one of'),
    ],
)
def test_a_json_object_no_run_of_this_tool_wrote_is_refused_naming_it(tmp_path, capsys, foreign, said):
    """Was: any JSON object beside a run was averaged in (its seed, its accuracy: 2 runs, exit 0)."""
    run = _run(tmp_path, "s0", _metrics(0, 1.0, True))
    other = _run(tmp_path, "other", foreign)
    out = tmp_path / "s.json"
    err = _one_line_error([run, other, "--out", str(out)], capsys)
    assert f"'{tmp_path / 'other' / 'metrics.json'}' is not the metrics of an mcmc-unlearner run" in err, err
    assert said in err and "mcmc-unlearner demo" in err, err
    assert not out.exists()
    assert main(["summary", run, _run(tmp_path, "bnn", _bnn_metrics(0))]) == 2  # a run of another experiment:
    assert "runs of different experiments" in capsys.readouterr().err  # accepted as a run, refused as before
