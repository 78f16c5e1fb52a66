"""The project's standard for the benchmark scripts' speed claims (issue 12, "benchmark honesty"): each way's first
call timed apart, repetitions interleaved with the order alternating, medians with ranges, totals with the first
call included, ratios measured per repetition and of the totals; and a clear refusal when data are absent."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from _bench_helpers import FakeClock, load_bench

ROOT = Path(__file__).resolve().parents[1]


def test_interleaved_takes_any_clock_and_keeps_the_first_call_apart() -> None:
    T = load_bench("_timing")
    clock, calls = FakeClock(), []

    def way(name: str, durations: list[float]):
        it = iter(durations)

        def fn() -> None:
            calls.append(name)
            clock.now += next(it)

        return fn

    res = T.interleaved({"a": way("a", [7.0, 2.0, 4.0, 6.0]), "b": way("b", [1.0, 1.0, 2.0, 2.0])}, 3, clock=clock)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert res["a"]["first"] == 7.0 and res["a"]["times"] == [2.0, 4.0, 6.0] and res["a"]["total"] == 19.0
    assert (res["a"]["median"], res["a"]["min"], res["a"]["max"]) == (4.0, 2.0, 6.0)
    assert res["ratio"]["times"] == [2.0, 2.0, 3.0] and res["ratio"]["median"] == 2.0
    assert res["ratio"]["total"] == pytest.approx(19.0 / 6.0)
    text = T.describe(res["a"], "ms", 1e3, 0)
    assert text == "4000 (2000-6000) ms, first 7000 ms; total 19.000 s"
    assert T.describe_ratio(res["ratio"]) == "2.00x (2.00-3.00) per repetition, totals 3.17x"


def test_sequence_summary_counts_every_request_in_the_total_and_ratios_per_request() -> None:
    T = load_bench("_timing")
    times = {"this": [5.0, 2.0, 1.0, 3.0], "base": [1.0, 2.0, 2.0, 2.0]}
    s = T.sequence_summary(times, start=2)
    assert s["this"]["first"] == 5.0 and s["this"]["times"] == [1.0, 3.0] and s["this"]["total"] == 11.0
    assert s["base"]["total"] == 7.0 and s["base"]["median"] == 2.0
    assert s["ratio"]["times"] == [0.5, 1.5] and (s["ratio"]["min"], s["ratio"]["max"]) == (0.5, 1.5)
    assert s["ratio"]["total"] == pytest.approx(11.0 / 7.0)
    lines = T.sequence_lines(times, 2, first_runner="base")
    assert lines[0] == "CPU s per request: median (min-max) of requests 2-3; first: request 0; total: all 4"
    assert "first 5.000 s; total 11.000 s" in lines[1] and lines[1].lstrip().startswith("this")
    assert lines[-1].startswith("this / base: 1.000x (0.500-1.500) per request 2-3, totals 1.571x (base ran first")
    with pytest.raises(ValueError, match="same requests"):
        T.sequence_summary({"this": [1.0], "base": [1.0, 2.0]}, 0)
    with pytest.raises(ValueError, match="leaves no request"):
        T.sequence_summary(times, 4)


def test_maxpool_prints_first_calls_totals_and_per_repetition_ratios(capsys) -> None:
    mp = load_bench("maxpool")
    import torch

    before = torch.get_num_threads()
    try:
        assert mp.main(["--models", "lenet5", "--rows", "2", "--reps", "3"]) == 0
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out.splitlines()
    assert "1 thread(s)" in out[0]
    timed = [line for line in out if "MaxPool2x2" in line and "identical" not in line]
    assert len(timed) == 2
    for line in timed:
        assert line.count("first ") == 2 and line.count("; total ") == 2, line
        assert "per repetition, totals" in line, line


def test_moment_chunk_prints_threads_first_calls_totals_and_ratio_ranges(capsys) -> None:
    mc = load_bench("moment_chunk")
    import torch

    import mcmc_unlearner.unlearner as U

    before, rule = torch.get_num_threads(), U.MOMENT_CHUNK_BYTES
    try:
        assert mc.main(["--rows", "16", "--reps", "3"]) == 0
    finally:
        torch.set_num_threads(before)
    assert U.MOMENT_CHUNK_BYTES == rule  # the module's rule restored
    out = capsys.readouterr().out.splitlines()
    assert "1 thread(s)" in out[0] and "3 repetitions interleaved" in out[0]
    assert len(out) == 3
    for line in out[1:]:
        assert line.count("first ") == 2 and line.count("; total ") == 2, line
        assert "fixed / cache rule" in line and "per repetition, totals" in line, line


def test_service_threads_alternates_and_reports_ratios_with_the_first_repetition(monkeypatch, tmp_path) -> None:
    sc = load_bench("service_checks")
    import mcmc_unlearner.service.deletion as deletion

    order: list[int] = []
    seconds = {2: iter([9.0, 4.0, 6.0]), 1: iter([1.0, 2.0, 2.0])}

    def fake_forget(path, ids, on_failure, threads):
        order.append(threads)
        return SimpleNamespace(report=SimpleNamespace(seconds=next(seconds[threads])))

    monkeypatch.setattr(deletion, "forget", fake_forget)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "x").write_text("x")
    res = sc.threads(tmp_path / "model", repeats=3, n_threads=2, ids=[5])
    assert order == [2, 1, 1, 2, 2, 1]  # alternating which goes first
    compute = res["results"]["2 threads"]["compute"]
    # the first repetition (9.0 s: the process's one-off costs) apart, the median and range of the later ones
    assert compute["first"] == 9.0 and compute["sum"] == 19.0 and compute["median"] == 5.0
    assert (compute["min"], compute["max"]) == (4.0, 6.0)
    ratio = res["results"]["2 threads / 1 thread"]["compute"]
    assert ratio["times"] == [2.0, 3.0] and ratio["median"] == 2.5
    assert ratio["total"] == pytest.approx(19.0 / 5.0)
    assert set(res["results"]["2 threads / 1 thread"]) == {"compute", "total"}


def test_fmnist_variants_without_the_data_is_refused_before_any_work(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "benchmarks/fmnist_variants.py", "train", "--cache", str(tmp_path / "cache"),
         "--data-dir", str(tmp_path / "none")],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "error: argument --data-dir: dataset 'fashion-mnist' not found" in out.stderr
    assert "To fix:" in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "cache").exists()  # nothing written
    assert time.perf_counter() - t0 < 60
