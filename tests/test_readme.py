"""The README's code examples run as written (docs that match the code)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_our_api_example_runs_and_removes_the_points() -> None:
    block = next(b for b in _python_blocks() if "MCMCUnlearner(model, sampler" in b)
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)
    report, data = ns["report"], ns["data"]
    assert report.n_removed == 4 and len(data) == 1996
    assert report.converged and report.shift_norm > 0


def test_quick_start_commands_are_the_ci_commands() -> None:
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install "torch==2.13.0" -e . && mcmc-unlearner demo' in text
    assert "python -m pytest -q" in text and "python -m pytest -q" in ci
