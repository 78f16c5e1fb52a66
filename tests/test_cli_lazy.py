"""The CLI refuses a bad option before it loads torch (2-3 s), and its lazy parser is the full one."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")

# each: (argv, exit code); none of them may import torch
REFUSALS = [
    (["--version"], 0),
    (["--help"], 0),
    (["nosuch"], 2),
    (["forget", "--model", "M", "--ids", "I", "--solver", "foo"], 2),
    (["forget", "--model", "M", "--ids", "I", "--wait", "-5"], 2),
    (["forget", "--model", "M", "--ids", "IDS", "--damping", "-1"], 2),
    (["forget", "--model", "M", "--ids", "IDS", "--solver", "kfac", "--hessian", "full"], 2),
    (["status", "--model", "M", "--wait", "x"], 2),
    (["verify", "--model", "M", "--threads", "x"], 2),
    (["forget", "--help"], 0),
]


def test_refusals_do_not_import_torch(tmp_path):
    (tmp_path / "IDS").write_text("3\n4\n")
    script = (
        "import contextlib, io, json, sys\n"
        "from mcmc_unlearner.cli import main\n"
        "out = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:\n"
        "        out.append([main(argv), err.getvalue()])\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'codes': out}))\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    res = subprocess.run(
        [sys.executable, "-c", script, json.dumps([a for a, _ in REFUSALS])],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert [c for c, _ in got["codes"]] == [c for _, c in REFUSALS], got["codes"]
    assert "--solver kfac supports --hessian remaining only" in got["codes"][6][1]
    assert not got["torch"], "an argument error imported torch (1.4 s) before it was refused"


def _help(argv: list[str], lazy: bool) -> str:
    from mcmc_unlearner.cli import build_parser

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        build_parser(argv, lazy=lazy).parse_args(argv)
    return buf.getvalue()


@pytest.mark.parametrize("argv", [["--help"], ["forget", "--help"], ["status", "--help"], ["summary", "--help"]])
def test_lazy_parser_is_the_full_one(argv):
    assert _help(argv, lazy=True) == _help(argv, lazy=False)


def test_lazy_parser_parses_as_the_full_one():
    from mcmc_unlearner.cli import build_parser

    argv = ["forget", "--model", "M", "--ids", "I", "--solver", "cg", "--on-failure", "repair", "-v"]
    assert vars(build_parser(argv, lazy=True).parse_args(argv)) == vars(build_parser().parse_args(argv))


def test_package_names_resolve():
    import mcmc_unlearner
    from mcmc_unlearner.solvers import SolverName
    from mcmc_unlearner.unlearner import MCMCUnlearner

    assert mcmc_unlearner.MCMCUnlearner is MCMCUnlearner
    assert mcmc_unlearner.SolverName is SolverName
    assert set(mcmc_unlearner.__all__) <= set(dir(mcmc_unlearner))
    with pytest.raises(AttributeError):
        mcmc_unlearner.no_such_name  # noqa: B018
