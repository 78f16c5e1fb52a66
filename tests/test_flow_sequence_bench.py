"""benchmarks/flow_sequence.py: a version run beside itself takes the same decisions to the bit, one that decides
otherwise is caught, and the printed ratios are the sequence's CPU over the retrain chain's."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

from _bench_helpers import load_bench
from mcmc_unlearner import MCMCUnlearner

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["--model", "mlp", "--requests", "2", "--steps", "60", "--draws", "6"]


@pytest.fixture(scope="module")
def bench():
    return load_bench("flow_sequence")


def test_this_tree_beside_itself_is_equal_to_the_bit(bench, tmp_path: Path) -> None:
    out = tmp_path / "flow.json"
    assert bench.main([*TINY, "--base", str(SRC), "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["same_to_the_bit"] is True
    base, this = d["versions"]["base"], d["versions"]["this"]
    assert base["decisions"] == this["decisions"]
    assert len(this["request_cpu"]) == 2 and len(d["retrain_cpu"]) == 2
    unit = statistics.mean(d["retrain_cpu"])
    assert this["ratio"] == pytest.approx(this["sequence_cpu"] / unit)
    assert this["ratio_with_imports"] == pytest.approx((this["sequence_cpu"] + d["imports_cpu"]) / unit)


class _FixedDamping(MCMCUnlearner):
    """Another 'version': a fixed damping instead of the one chosen per request."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, damping=50.0, **kwargs)


def test_a_version_deciding_otherwise_is_caught(bench, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bench, "_load_base", lambda src, into: SimpleNamespace(MCMCUnlearner=_FixedDamping))
    out = tmp_path / "flow.json"
    assert bench.main([*TINY, "--base", str(SRC), "--json", str(out)]) == 1
    d = json.loads(out.read_text())
    assert d["same_to_the_bit"] is False
    assert d["versions"]["base"]["decisions"] != d["versions"]["this"]["decisions"]


class _RefusesFirst(MCMCUnlearner):
    """Refuses its first request (as the safety check may), applies the later ones."""

    def remove(self, *args, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 1:
            raise RuntimeError("refused")
        return super().remove(*args, **kwargs)


def test_a_refused_request_is_recorded_and_the_sequence_goes_on(bench, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bench, "MCMCUnlearner", _RefusesFirst)
    monkeypatch.setattr(bench, "_load_base", lambda src, into: SimpleNamespace(MCMCUnlearner=_RefusesFirst))
    out = tmp_path / "flow.json"
    assert bench.main([*TINY, "--base", str(SRC), "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["same_to_the_bit"] is True
    for v in d["versions"].values():
        assert v["refused"] == 1 and len(v["request_cpu"]) == 2  # the second request still ran


def test_the_networks_have_the_parameters_the_docs_quote(bench) -> None:
    """docs/performance.md 'Stop 64' and the script's docstring quote 830 (the CNN; 1,228 until the review of stop
    64) and 2,410 (the MLP) parameters, and the CNN's dense curvature as 830 x 830."""
    assert sum(p.numel() for p in bench.build("cnn").parameters()) == 830
    assert sum(p.numel() for p in bench.build("mlp").parameters()) == 2410
    assert "830 parameters" in bench.__doc__
