"""The timing bookkeeping of benchmarks/draw_batching.py and benchmarks/kronecker.py: first calls (one-off costs)
reported beside the medians, totals that include them, interleaved repetitions with the order alternating, and
per-repetition ratios with their ranges. A fake clock makes every duration known."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from _bench_helpers import FakeClock, load_bench


def _timed(clock: FakeClock, calls: list[str], name: str, durations: list[float]):
    it = iter(durations)

    def fn() -> None:
        calls.append(name)
        clock.now += next(it)

    return fn


def test_draw_batching_interleaves_and_reports_first_total_and_ratio_ranges(monkeypatch) -> None:
    db = load_bench("draw_batching")
    clock, calls = FakeClock(), []
    monkeypatch.setattr(db, "time", clock)
    fns = {
        "vmap": _timed(clock, calls, "vmap", [5.0, 1.0, 2.0, 4.0, 3.0]),  # first call 5 s: the one-off costs
        "loop": _timed(clock, calls, "loop", [0.5, 2.0, 2.0, 2.0, 1.0]),
    }
    res = db.interleaved(fns, reps=4)
    assert calls == ["vmap", "loop"] + ["vmap", "loop", "loop", "vmap"] * 2
    v, lp, r = res["vmap"], res["loop"], res["ratio"]
    assert v["first"] == 5.0 and v["times"] == [1.0, 2.0, 4.0, 3.0]
    assert (v["median"], v["min"], v["max"], v["total"]) == (2.5, 1.0, 4.0, 15.0)
    assert lp["first"] == 0.5 and (lp["median"], lp["total"]) == (2.0, 7.5)
    assert r["times"] == [0.5, 1.0, 2.0, 3.0]  # per repetition, not a ratio of best times
    assert (r["median"], r["min"], r["max"]) == (1.5, 0.5, 3.0) and r["total"] == pytest.approx(2.0)


def test_kronecker_timings_keep_the_first_build_and_the_total(monkeypatch) -> None:
    kr = load_bench("kronecker")
    clock, calls = FakeClock(), []
    monkeypatch.setattr(kr, "time", clock)
    res = kr.timings(_timed(clock, calls, "build", [9.0, 1.0, 3.0, 2.0]), repeats=4)
    assert res["times"] == [9.0, 1.0, 3.0, 2.0] and res["first"] == 9.0 and res["total"] == 15.0
    # the median is a build that ran (the lower one of an even count), so that its printed parts add up to it
    assert (res["median"], res["min"], res["max"], res["index"]) == (2.0, 1.0, 9.0, 3)
    assert res["result"] is None and calls == ["build"] * 4


def test_layer_zoo_threads_are_set_before_any_work_passed_on_printed_and_saved(
    monkeypatch, tmp_path: Path, capsys
) -> None:
    import json
    import subprocess

    import torch

    zoo = load_bench("layer_zoo")
    seen: dict[str, object] = {}

    def fake_run_one(name: str, seed: int, options: dict) -> dict:
        seen["run_one"] = torch.get_num_threads()
        return {"model": name, "status": "ok"}

    def fake_subprocess_run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
        seen["parent"], seen["cmd"] = torch.get_num_threads(), cmd
        row = {"model": cmd[cmd.index("--one") + 1], "status": "ok", "threads": int(cmd[cmd.index("--threads") + 1])}
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(row) + "\n", stderr="")

    monkeypatch.setattr(zoo, "run_one", fake_run_one)
    monkeypatch.setattr(zoo.subprocess, "run", fake_subprocess_run)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        assert zoo.main(["--one", "tied", "--threads", "2"]) == 0
        assert seen["run_one"] == 2 and json.loads(capsys.readouterr().out)["threads"] == 2
        torch.set_num_threads(1)
        out = tmp_path / "zoo.json"
        assert zoo.main(["--models", "tied", "--threads", "3", "--json", str(out)]) == 0
        assert seen["parent"] == 3  # set before the first network's process starts
        assert seen["cmd"][seen["cmd"].index("--threads") + 1] == "3"  # and passed on to it
        assert "3 thread(s)" in capsys.readouterr().out.splitlines()[0]
        saved = json.loads(out.read_text())
        assert saved["threads"] == 3 and saved["rows"][0]["threads"] == 3
        torch.set_num_threads(1)
        zoo.main(["--one", "tied"])
        assert seen["run_one"] == 1  # the default
    finally:
        torch.set_num_threads(before)


def test_request_sequence_prints_the_one_offs_also_for_one_request() -> None:
    rs = load_bench("request_sequence")
    one = [{"cpu_seconds": 4.0, "epochs": 2.0}]
    line = rs.summary_line(one, 1.0, 3.0, 2.0)
    assert "import 1.00 s CPU" in line and "fit 3.00 s CPU = 1.50 epochs" in line
    assert "total 8.0 s CPU = 4.00 epochs for 1 request and the one-off import and fit" in line
    line = rs.summary_line([*one, {"cpu_seconds": 1.0, "epochs": 0.5}], 1.0, None, 2.0)
    assert "fit" not in line and "later requests 0.50-0.50 epochs" in line
    assert "total 6.0 s CPU = 3.00 epochs for 2 requests and the one-off import" in line


def test_request_sequence_times_the_modules_a_request_imports(tmp_path, monkeypatch) -> None:
    """The imports made inside a request are timed as they load (CPU of the outermost module, its nested imports
    counted once) and counted, so the benchmark takes them out of the request's number; a module already loaded
    costs nothing."""
    import time

    rs = load_bench("request_sequence")
    spin = "import time\nc0 = time.process_time()\nwhile time.process_time() - c0 < {}:\n    pass\n"
    (tmp_path / "rs_outer_mod.py").write_text("import rs_inner_mod\n" + spin.format(0.05))
    (tmp_path / "rs_inner_mod.py").write_text(spin.format(0.05))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        c0 = time.process_time()
        with rs.ImportTimer() as timer:
            __import__("rs_outer_mod")
        spent = time.process_time() - c0
        assert timer.modules == 2 and 0.1 <= timer.cpu <= spent
        assert timer not in sys.meta_path and "exec_module" not in vars(sys.modules["rs_outer_mod"].__spec__.loader)
        with rs.ImportTimer() as again:
            __import__("rs_outer_mod")
        assert (again.modules, again.cpu) == (0, 0.0)
    finally:
        sys.modules.pop("rs_outer_mod", None)
        sys.modules.pop("rs_inner_mod", None)


def test_baseline_ratios_are_taken_against_the_units_timed_beside_each_call() -> None:
    tm = load_bench("_timing")
    units = iter([(20.0, 2.0), (40.0, 4.0), (60.0, 6.0), (10.0, 1.0)])
    base = tm.Baseline(lambda: next(units))
    for _ in range(4):
        base.measure()
    assert base.around(0) == 3.0 and base.around(2) == 3.5 and base.around(3) == 1.0
    s = base.summary()
    assert s["first"] == 2.0 and s["times"] == [4.0, 6.0, 1.0] and (s["median"], s["min"], s["max"]) == (4.0, 1.0, 6.0)
    assert s["total"] == 13.0 and base.median(wall=True) == 40.0
    r = tm.per_call_ratios([3.0, 7.0, 7.0], base, start=1)
    assert r["first"] == 1.0 and r["times"] == [1.4, 2.0] and r["median"] == pytest.approx(1.7)
    assert r["total"] == pytest.approx(17.0 / ((3.0 + 5.0 + 3.5) / 3))
    assert "timed 4x between the requests: 4.00 s CPU (1.00-6.00) of the 3 after the first, first 2.00 s" in (
        tm.baseline_line(base)
    )
    with pytest.raises(ValueError, match="no measurement"):
        base.around(4)


def test_request_sequence_times_the_epoch_between_the_requests(tmp_path, monkeypatch, capsys) -> None:
    """The SGLD epoch was timed once, before the requests: every request's epochs were over that one early epoch.
    It is now timed before the first request and after each one, a request's epochs over the two beside it."""
    import json
    from types import SimpleNamespace

    import torch

    rs = load_bench("request_sequence")
    mm = rs.mm
    clock, calls = FakeClock(), []
    fake_time = SimpleNamespace(process_time=clock, perf_counter=clock)
    monkeypatch.setattr(rs, "time", fake_time)
    epochs = iter([(20.0, 2.0), (40.0, 4.0), (60.0, 6.0)])

    def epoch(*a, **k):
        calls.append("epoch")
        clock.now += 100.0  # an epoch takes time too: not the request's
        return next(epochs)

    x, y = torch.zeros(10, 2), torch.zeros(10, dtype=torch.long)
    problem = SimpleNamespace(x_train=x, y_train=y, batch=5, nll=None, log_prior=None, description="fake",
                              n_params=lambda: 3, name="fake")  # fmt: skip
    chain = SimpleNamespace(model=torch.nn.Linear(1, 1, bias=True), bank=torch.zeros(2, 2))
    durations = iter([1.0, 3.0])

    class FakeUnlearner:
        check_rows = 0

        def __init__(self, *a, **k) -> None:
            pass

        def remove(self, *a, **k):
            calls.append("request")
            clock.now += next(durations)
            return SimpleNamespace(damping_trials=1, damping_relative=0.0, step_shortfall=0.0, model_ratio=1.0, info={})

    monkeypatch.setattr(mm, "build_problems", lambda *a, **k: [problem])
    monkeypatch.setattr(mm, "train_chain", lambda *a, **k: chain)
    monkeypatch.setattr(mm, "time_sgld_epoch", epoch)
    monkeypatch.setattr(mm, "sequence_requests", lambda *a, **k: [torch.tensor([0]), torch.tensor([1])])
    monkeypatch.setattr(mm, "loader", lambda *a, **k: None)
    monkeypatch.setattr(mm, "forever", lambda it: it)
    monkeypatch.setattr(rs, "MCMCUnlearner", FakeUnlearner)
    out = tmp_path / "seq.json"
    torch_threads = torch.get_num_threads()
    try:
        assert rs.main(["--model", "mlp", "--requests", "2", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(torch_threads)
    assert calls == ["epoch", "request", "epoch", "request", "epoch"]
    saved = json.loads(out.read_text())
    # request 0 over the epochs before and after it (2 and 4 s), request 1 over 4 and 6 s
    assert [r["epochs"] for r in saved["requests"]] == [pytest.approx(1.0 / 3.0), pytest.approx(3.0 / 5.0)]
    assert [r["wall_seconds"] for r in saved["requests"]] == [1.0, 3.0]  # (was 101 and 103: the epoch after it)
    meta = saved["meta"]
    assert meta["epoch_cpu_seconds"] == 5.0 and meta["epoch_wall_seconds"] == 50.0  # the median after the first
    assert meta["epoch_cpu_seconds_runs"] == [2.0, 4.0, 6.0] and meta["epoch"]["first"] == 2.0
    assert meta["epochs_per_request"]["first"] == pytest.approx(1.0 / 3.0)
    printed = capsys.readouterr().out
    assert "timed 3x between the requests: 5.00 s CPU (4.00-6.00) of the 2 after the first, first 2.00 s" in printed
