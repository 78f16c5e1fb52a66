"""The README's code examples run as written (docs that match the code)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _gmm_block() -> str:
    return next(b for b in _python_blocks() if "MCMCUnlearner(model, sampler" in b)


def test_our_api_example_runs_and_removes_the_points() -> None:
    block = _gmm_block()
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


def test_the_readme_test_command_is_the_ci_command_and_its_plugins_are_installed_by_the_extras() -> None:
    """The quick start's test command, the Development section's and ``.ci/run``'s are one command, and a plugin
    option in it (``-n``: pytest-xdist) comes with the ``test`` and ``dev`` extras the quick start installs."""
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    quick = re.search(r'pip install "torch==2\.13\.0" -e "\.\[test\]" && (python -m pytest[^\n`]*)\n', text)
    assert quick, "the quick start's `pip install ... && python -m pytest ...` line"
    command = quick.group(1).strip()
    ci_lines = ci.splitlines()
    ci_command = ci_lines[ci_lines.index("# README test command:") + 1].strip()
    assert ci_command == command
    development = text[text.index("## Development") :]
    assert re.search(r"`(python -m pytest[^`]*)`", development).group(1) == command
    pyproject = (README.parent / "pyproject.toml").read_text()
    for extra in ("test", "dev"):
        deps = re.search(rf"^{extra} = \[(.*)\]$", pyproject, flags=re.M).group(1)
        if re.search(r"(^| )-n ", command):
            assert '"pytest-xdist' in deps, f"the {extra} extra lacks pytest-xdist, which `{command}` needs"


def test_your_own_network_example_runs_and_returns_the_users_layout() -> None:
    """The first example: a plain nn.Sequential, the user's own SGLD loop, a list of state_dicts, a DataLoader."""
    import torch

    block = next(b for b in _python_blocks() if "MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=samples)" in b)
    ns: dict = {}
    threads = torch.get_num_threads()
    try:
        exec(compile(block, "README.md", "exec"), ns)
    finally:
        torch.set_num_threads(threads)
    report, samples, new = ns["report"], ns["samples"], ns["new_samples"]
    assert report.problems == [] and report.n_removed == 50 and report.n_remaining == 950
    assert isinstance(new, list) and len(new) == len(samples) and new[0].keys() == samples[0].keys()
    moved = [float((new[i][k] - samples[i][k]).norm()) for i in range(len(new)) for k in new[i]]
    assert max(moved) > 0  # the samples moved; the user's own state_dicts are separate objects


def test_the_deletion_service_pages_python_example_runs_on_the_gmm_example(tmp_path, monkeypatch) -> None:
    """docs/deletion-service.md's Python block, after the GMM example "up to its `unlearner.bank = ...` line" as it
    says: saved, one request applied and verified against the head it returned, the folder loaded back."""
    gmm = _gmm_block()
    gmm = gmm[: gmm.index("\n", gmm.index("unlearner.bank = "))]
    page = (README.parent / "docs" / "deletion-service.md").read_text()
    service = next(b for b in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "save_model(" in b)
    monkeypatch.chdir(tmp_path)  # the block saves into models/gmm
    ns: dict = {}
    exec(compile(gmm + "\n" + service, "docs/deletion-service.md", "exec"), ns)
    out, loaded = ns["out"], ns["loaded"]
    assert out.applied and out.quality["passed"] and re.fullmatch(r"[0-9a-f]{64}", out.head)
    assert ns["status"]("models/gmm")["n_remaining"] == 1997 and ns["verify"]("models/gmm", expect_head=out.head).ok
    assert len(loaded.data) == 1997 and 3 not in loaded.data.remaining_ids.tolist()


def _options_table() -> list[tuple[list[str], str, str]]:
    """The README's Options table: each row's option names, its default cell and what it says the options do."""
    text = README.read_text()
    table = text[text.index("### Options") : text.index("### Curvature backends")]
    rows = re.findall(r"^\| (`[^|]+`) \| ([^|]+) \| (.*) \|$", table, flags=re.M)
    return [(re.findall(r"`(\w+)`", names), default, what) for names, default, what in rows]


def _top_level_parts(cell: str) -> list[str]:
    """``cell`` cut at the commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(cell):
        depth += {"(": 1, ")": -1}.get(c, 0)
        if c == "," and depth == 0:
            parts.append(cell[start:i])
            start = i + 1
    return [p.strip() for p in [*parts, cell[start:]]]


def test_the_options_table_names_every_keyword_with_the_codes_default() -> None:
    """Every keyword of ``MCMCUnlearner`` is a row of the README's Options table (``exact_max_dim`` in ``solver``'s),
    no row names another, and a default the signature gives as a value is the one the row gives first (a default
    of ``None``, resolved per model, is described in words and left to the Options prose)."""
    import inspect
    from enum import Enum

    from mcmc_unlearner import MCMCUnlearner

    signature = inspect.signature(MCMCUnlearner.__init__).parameters
    rows = _options_table()
    named = [n for names, _, _ in rows for n in names]
    given = set(signature) - {"self", "model", "sampler", "nll", "log_prior", "energy", "bank", "exact_max_dim"}
    assert sorted(named) == sorted(given), "rows without a keyword, or keywords without a row"
    solver_row = next(what for names, _, what in rows if names == ["solver"])
    assert f"`exact` up to `exact_max_dim={signature['exact_max_dim'].default}` parameters" in solver_row
    compared = 0
    for names, cell, _ in rows:
        parts = _top_level_parts(cell)
        defaults = [signature[n].default for n in names]
        if None in defaults and len(parts) != len(names):
            continue  # e.g. memory_budget: "¼ of available RAM, at most 1 GiB"
        assert len(parts) == len(names), (names, cell)
        for name, default, part in zip(names, defaults, parts):
            if default is None:
                continue
            shown = part.split(" (")[0].strip("`\"' ")
            if isinstance(default, Enum):
                default = default.value
            if isinstance(default, (bool, str)):
                assert shown == str(default), (name, shown, default)
            else:
                assert float(shown) == default, (name, shown, default)
            compared += 1
    assert compared >= 30
