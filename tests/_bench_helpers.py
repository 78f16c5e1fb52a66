"""Shared by the benchmark scripts' tests: load a script from benchmarks/ as a module, and a clock whose every
duration is known."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_bench(name: str) -> ModuleType:
    """``benchmarks/NAME.py`` as a module (the scripts import their neighbours: _benchargs, _timing, model_matrix)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


class FakeClock:
    """A clock (callable, or as ``time.perf_counter``) that advances only when a timed function 'runs' for a chosen
    duration."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now
