"""The benchmark's bookkeeping: totals, first-request and one-off costs, interleaving and ratios are what they claim."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(seconds, bank=None):
    return {"seconds": list(seconds), "cpu": list(seconds), "bank": torch.zeros(2) if bank is None else bank,
            "refused": []}  # fmt: skip


def test_timing_summary_reports_totals_first_and_one_off(bench) -> None:
    runs = [_run([1.0, 0.1, 0.2, 0.1]), _run([2.0, 0.3, 0.1, 0.1]), _run([1.5, 0.2, 0.2, 0.2])]
    s = bench.timing_summary({"runs": runs, "cold_first_request": 9.0, "reproducible": True})
    totals = [1.4, 2.5, 2.1]
    assert s["total"]["median"] == pytest.approx(2.1) and s["total"]["min"] == pytest.approx(1.4)
    assert s["total"]["max"] == pytest.approx(2.5) and s["seconds_total"] == pytest.approx(statistics.median(totals))
    assert s["first"] == {"median": 1.5, "min": 1.0, "max": 2.0}
    # one-off = first − median of the other requests, per repetition: 0.9, 1.9, 1.3
    assert s["one_off"]["median"] == pytest.approx(1.3) and s["one_off"]["max"] == pytest.approx(1.9)
    # the per-request median includes the first request (it is one of the requests)
    assert s["seconds_per_request"] == pytest.approx(statistics.median([0.15, 0.2, 0.2]))
    assert s["cold_first_request"] == 9.0 and s["reps"] == 3 and s["requests"] == 4


def test_speedups_are_per_repetition_ratios_of_totals_then_medians(bench) -> None:
    paper = {"runs": [_run([1.0, 1.0, 1.0]), _run([2.0, 2.0, 2.0])]}
    ours = {"runs": [_run([1.0, 0.1, 0.1]), _run([0.2, 0.2, 0.2])]}
    sp = bench.speedups(paper, ours)
    assert sp["total"]["min"] == pytest.approx(3.0 / 1.2) and sp["total"]["max"] == pytest.approx(10.0)
    assert sp["median"]["min"] == pytest.approx(10.0) and sp["median"]["max"] == pytest.approx(10.0)
    assert sp["cpu_total"] == sp["total"]  # the fake runs' CPU times equal their wall times


def test_interleaved_alternates_methods_from_identical_states_after_a_warm_up(bench) -> None:
    calls = []

    def make(name):
        def run(reqs):
            calls.append((name, len(reqs)))
            return _run([0.1] * len(reqs), bank=torch.ones(3))

        return run

    res = bench.interleaved({"paper": make("paper"), "ours": make("ours")}, [1, 2, 3], reps=3)
    assert calls == [("paper", 1), ("ours", 1)] + [("paper", 3), ("ours", 3)] * 3
    assert len(res["paper"]["runs"]) == 3 and res["ours"]["reproducible"]


def test_ratios_compare_distances_not_raw_errors(bench) -> None:
    paper = {"seconds_total": 10.0, "test_kept_error": 0.08, "test_kept_error_distance": 0.02, "undone": 0.1}
    ours = {"seconds_total": 1.0, "test_kept_error": 0.06, "test_kept_error_distance": 0.01, "undone": 0.01}
    r = bench.ratios(paper, ours)
    assert r == {"seconds_total": 0.1, "test_kept_error_distance": 0.5, "undone": pytest.approx(0.1)}


def test_ours_switch_to_library_defaults_is_one_flag(bench, monkeypatch) -> None:
    monkeypatch.setattr(bench, "OURS_LIBRARY_DEFAULTS", True)
    assert bench.ours_settings("digits") == {}
    assert set(bench.ours_variants("digits", extra=True)) == {"ours", "ours_tuned", "ours_cg"}
    monkeypatch.setattr(bench, "OURS_LIBRARY_DEFAULTS", False)
    assert bench.ours_settings("digits") == bench.OURS_TUNED["digits"]
    assert set(bench.ours_variants("gmm", extra=True)) == {"ours"}


def test_ours_details_count_curvature_builds_and_failed_checks(bench) -> None:
    from types import SimpleNamespace

    def rep(reused: bool | None, problems=()):
        info = {} if reused is None else {"hessian_reused": reused}
        return SimpleNamespace(solver="exact", residual=1e-8, damping=0.0, problems=list(problems), info=info)

    d = bench.ours_details({"reports": [rep(False), rep(True), rep(True, ["unsafe"]), rep(None)]})
    assert d["curvature_builds"] == 2 and d["failed_checks"] == ["unsafe"] and d["solver"] == ["exact"]


def test_memory_child_reports_its_own_peak_not_the_parents(bench) -> None:
    """``ru_maxrss`` of a child (``wait4``) carries the parent's peak over on Linux; the child's VmHWM does not."""
    import inspect
    import resource
    import sys

    if not Path("/proc/self/status").exists():
        pytest.skip("VmHWM needs Linux /proc")
    x = torch.ones(100_000_000)  # 400 MB touched: the parent's peak
    x.add_(1)
    del x
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert parent > 400
    # a bare interpreter running the benchmark's own reader, nothing else (a few MiB)
    code = inspect.getsource(bench.own_peak_kib) + f"\nprint({bench.PEAK_MARK!r}, own_peak_kib())\n"
    child = bench.child_peak_mib([sys.executable, "-c", code])
    assert 0 < child < 100 < parent - 300


def test_measure_memory_returns_each_childs_own_peak(bench, monkeypatch) -> None:
    seen = []

    def fake(cmd):
        seen.append(cmd[cmd.index("--memory-phase") + 1])
        return {"train": 400.0, "unlearn": 450.0}[seen[-1]]

    monkeypatch.setattr(bench, "child_peak_mib", fake)
    mem = bench.measure_memory(True, 1)
    assert seen == ["train", "unlearn"]
    assert (mem["train_peak_mib"], mem["unlearn_peak_mib"]) == (400.0, 450.0) and mem["ratio"] == pytest.approx(1.125)


def test_report_prints_which_total_speedup_it_is_and_the_ratio_of_the_printed_totals(bench, capsys) -> None:
    def method(totals):
        runs = [_run([t / 2, t / 2]) for t in totals]
        return {"runs": runs, "cold_first_request": 0.1, "reproducible": True}

    paper, ours = method([1.0, 1.2, 3.0]), method([2.0, 1.0, 1.5])
    methods = {"paper": bench.timing_summary(paper), "ours": bench.timing_summary(ours)}
    res = {"setup": "s", "methods": methods, "speedups": {"ours": bench.speedups(paper, ours)}, "accuracy_measure": "a"}
    bench.report("case", res)
    out = capsys.readouterr().out
    # per-repetition ratios 0.5, 1.2, 2.0 (median 1.2); median totals 1.2 and 1.5 (ratio 0.8)
    assert "(median [min-max] of per-repetition ratios): total 1.2 [0.5-2.0]x" in out
    assert "ratio of the median totals above 0.80x" in out
    assert "first-median(rest) ms" in out
