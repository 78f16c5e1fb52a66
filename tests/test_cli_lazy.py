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

#: ``KEY=VALUE`` of MCMCUnlearner options whose value the library refuses
LIBRARY_REFUSED = (
    "memory_budget=0.25", "damping_shape=bogus", "emptied_label=bogus", "tol=2", "samp_T=0", "likelihood=x",
    "check_screen=x", "backend=x", "drift_tol=0", "refresh_every=0", "exact_max_dim=-1", "turn_draws=1",
    "slope_eta=1.5", "emptied_max_row_evals=0", "emptied_max_row_evals=2.5", "newton_gate=-1",
)  # fmt: skip

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
    # demo and bnn: a bad choice, number, device name, unlearner option value or missing data files (2-5 s before)
    (["demo", "--sampler", "foo"], 2),
    (["demo", "--seed", "-1"], 2),
    (["demo", "--thin", "0"], 2),
    (["demo", "--retrain-chains", "x"], 2),
    (["bnn", "--arch", "foo"], 2),
    (["bnn", "--eval-max", "-1"], 2),
    (["bnn", "--sample-lr", "0"], 2),
    (["bnn", "--device", "cuda:x"], 2),
    (["bnn", "--methods", "foo"], 2),
    (["bnn", "--solver", "foo"], 2),
    (["bnn", "--damping", "-1"], 2),
    (["bnn", "--unlearner-kw", "iter_T=-1"], 2),
    (["bnn", "--unlearner-kw", "bogus=1"], 2),
    # values only the library's checks refused, after torch and the data were loaded (2-5 s before)
    *((["bnn", "--unlearner-kw", kw], 2) for kw in LIBRARY_REFUSED),
    (["demo", "--burnin", "10", "--samples", "5", "--thin", "10"], 2),
    (["bnn", "--preset", "paper-fmnist", "--data-dir", "NODATA"], 2),
    (["bnn", "--help"], 0),
    (["demo", "--help"], 0),
]


def _cli_in_a_fresh_process(argvs: list[list[str]], cwd) -> subprocess.CompletedProcess:
    """Run ``main(argv)`` for each of ``argvs`` in one fresh interpreter; its stdout is JSON: whether torch was
    imported, and each command's exit code and stderr."""
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
    return subprocess.run(
        [sys.executable, "-c", script, json.dumps(argvs)], capture_output=True, text=True, cwd=cwd, env=env, timeout=60
    )


def test_refusals_do_not_import_torch(tmp_path):
    (tmp_path / "IDS").write_text("3\n4\n")
    res = _cli_in_a_fresh_process([a for a, _ in REFUSALS], tmp_path)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert [c for c, _ in got["codes"]] == [c for _, c in REFUSALS], got["codes"]
    assert "--solver kfac supports --hessian remaining only" in got["codes"][6][1]
    said = {" ".join(a): err for (a, _), (_, err) in zip(REFUSALS, got["codes"])}
    assert "argument --damping: damping must be 'auto' or a finite number >= 0" in said["bnn --damping -1"]
    assert "dataset 'fashion-mnist' not found" in said["bnn --preset paper-fmnist --data-dir NODATA"]
    assert "MCMCUnlearner has no keyword argument 'bogus'; choose from backend, " in said["bnn --unlearner-kw bogus=1"]
    assert all(err.count("\n") == 1 for (_, code), (_, err) in zip(REFUSALS, got["codes"]) if code == 2), said
    assert not got["torch"], "an argument error imported torch (1.4 s) before it was refused"


@pytest.mark.parametrize("kw", LIBRARY_REFUSED)
def test_a_value_the_library_refuses_is_refused_at_parse_time_with_its_message(kw, capsys):
    """The command line's refusal (before torch is loaded, :func:`test_refusals_do_not_import_torch`) says what
    ``MCMCUnlearner`` says of the same value."""
    import torch
    from torch import nn

    from mcmc_unlearner.cli import main
    from mcmc_unlearner.unlearner import MCMCUnlearner

    key, _, raw = kw.partition("=")
    value = json.loads(raw) if raw[0].isdigit() or raw[0] == "-" else raw
    model = nn.Linear(2, 2)
    bank = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError) as library:
        MCMCUnlearner(model, nll=lambda m, b: m(b[0]).sum(1), bank=bank, **{key: value})
    assert main(["bnn", "--unlearner-kw", kw]) == 2
    err = capsys.readouterr().err
    assert f"argument --unlearner-kw: {library.value} (see mcmc-unlearner bnn --help)" in err, err


#: ``--unlearner-kw`` pairs of options ``MCMCUnlearner`` refuses together whatever the model (a solver given)
COMBINATIONS_REFUSED = (
    ("solver=kfac", "hessian=full"),
    ("solver=cg", "bank_shift=affine"),
    ("solver=lissa", "bank_shift=affine"),
    ("damping_shape=data", "solver=cg"),
    ("solver=lowrank", "damping_shape=data"),  # (exact on bnn's network: its memory first, NETWORK_REFUSED)
)


def test_a_combination_the_library_refuses_whatever_the_model_is_refused_without_torch(tmp_path):
    """``bnn`` judged these by building the library's unlearner on a stand-in model after loading torch (3.1-3.6 s);
    now the library's own torch-free rules (:func:`mcmc_unlearner.options.check_combinations`) refuse them at once,
    with the library's message after the settings."""
    argvs = [["bnn", "--unlearner-kw", a, "--unlearner-kw", b] for a, b in COMBINATIONS_REFUSED]
    res = _cli_in_a_fresh_process(argvs, tmp_path)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    import torch
    from torch import nn

    from mcmc_unlearner.unlearner import MCMCUnlearner

    for (a, b), (code, err) in zip(COMBINATIONS_REFUSED, got["codes"]):
        kw = dict(x.split("=") for x in (a, b))
        with pytest.raises(ValueError) as library:
            MCMCUnlearner(nn.Linear(2, 2), nll=lambda m, b: m(b[0]).sum(1), bank=torch.randn(3, 6), **kw)
        assert code == 2 and err.startswith("mcmc-unlearner bnn: error: the unlearner's settings ("), err
        assert err.endswith(f"): {library.value}\n"), (err, str(library.value))
    assert not got["torch"], "a combination the library refuses whatever the model imported torch before its refusal"


#: ``bnn`` arguments whose refusal depends on the run's network (digits: the 8,986-parameter digits_net, or ``--arch
#: mlp``'s 7,510 parameters): what ``solver='auto'`` picks for it, the dense solvers' memory, float32's range
NETWORK_REFUSED = (
    ("--hessian", "full", "--unlearner-kw", "damping_shape=data"),  # auto: cg
    ("--bank-shift", "affine"),  # auto: kfac (the stand-in accepted it: refused after the chains were trained)
    ("--bank-shift", "affine", "--unlearner-kw", "damping_shape=data"),
    ("--hessian", "full", "--bank-shift", "affine"),
    ("--unlearner-kw", "exact_max_dim=100000", "--unlearner-kw", "memory_budget=100GB", "--unlearner-kw",
     "damping_shape=data"),  # auto: ggn (convolutions)
    ("--arch", "mlp", "--unlearner-kw", "exact_max_dim=100000", "--unlearner-kw", "memory_budget=100GB",
     "--unlearner-kw", "damping_shape=data"),  # auto: exact
    ("--solver", "exact", "--unlearner-kw", "memory_budget=1GB"),  # 2.8 GiB of dense matrices
    ("--solver", "exact", "--unlearner-kw", "memory_budget=100GB", "--unlearner-kw", "damping_shape=data"),
    ("--solver", "ggn", "--unlearner-kw", "memory_budget=2GB", "--unlearner-kw", "hessian=full"),
    ("--damping", "1e300"),
    ("--solver", "cg", "--unlearner-kw", "scaling=1e-50"),
)  # fmt: skip


def _run_network_unlearner(argv: tuple[str, ...]) -> str | None:
    """The message of ``MCMCUnlearner``'s refusal of ``bnn argv``'s settings on the run's own network, as the run
    builds it (``None``: accepted)."""
    import warnings

    import torch

    from mcmc_unlearner.cli import build_parser
    from mcmc_unlearner.experiments import bnn
    from mcmc_unlearner.image_data import load_dataset
    from mcmc_unlearner.models.bnn import build_model
    from mcmc_unlearner.samplers import SGLD
    from mcmc_unlearner.unlearner import MCMCUnlearner

    cfg = bnn.config_from_args(build_parser().parse_args(["bnn", *argv]))
    data = load_dataset(cfg.dataset)
    torch.manual_seed(0)
    model = build_model(cfg.arch or bnn._DEFAULT_ARCH[data.name], data.in_shape, data.n_classes)
    dim = sum(p.numel() for p in model.parameters())
    bank = 0.01 * torch.randn(2, dim, generator=torch.Generator().manual_seed(0))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            MCMCUnlearner(model, SGLD(model.parameters(), lr=1e-4), bank=bank, **bnn._unlearner_overrides(cfg))
    except (ValueError, MemoryError) as exc:
        return str(exc)
    return None


def test_a_combination_that_depends_on_the_network_is_refused_without_torch(tmp_path):
    """``bnn`` judged these by building the unlearner on a 15-parameter stand-in after loading torch (4-6 s), which
    took whatever one of kfac/exact/cg took under ``solver='auto'``: ``--bank-shift affine`` and ``--solver exact``
    passed and failed ``unlearn`` after the chains were trained, ``--hessian full`` with ``damping_shape=data`` was
    refused with K-FAC's message. Now the library's rules on the run's network, stated without torch
    (:func:`mcmc_unlearner.experiments.options.run_network`), refuse them at once with the message
    ``MCMCUnlearner`` gives on that network."""
    res = _cli_in_a_fresh_process([["bnn", *a] for a in NETWORK_REFUSED], tmp_path)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert not got["torch"], "a combination refused for the run's network imported torch before its refusal"
    for argv, (code, err) in zip(NETWORK_REFUSED, got["codes"]):
        library = _run_network_unlearner(argv)
        assert library is not None, argv
        assert code == 2 and err.startswith("mcmc-unlearner bnn: error: the unlearner's settings ("), (argv, err)
        assert err.endswith(f"): {library}\n"), (argv, err, library)


def test_a_combination_refused_for_the_saved_unlearner_is_refused_without_torch(tmp_path):
    """``--save-model`` saves the run's unlearner even where ``unlearn`` is not in ``--methods``: its settings were
    checked only when the model was saved, after the chains were trained. They are refused at once too, with the
    message they get with ``unlearn``; the same run without ``--save-model`` builds no unlearner and is not."""
    refused = ("--bank-shift", "affine")  # auto: kfac on digits_net (NETWORK_REFUSED)
    tiny = ("--explore-steps", "20", "--sample-steps", "40", "--bank-size", "6", "--retrain-chains", "2")
    argvs = [
        ["bnn", "--methods", "importance", "--save-model", str(tmp_path / "m"), *refused, *tiny],
        ["bnn", "--methods", "unlearn", *refused, *tiny],
    ]
    res = _cli_in_a_fresh_process(argvs, tmp_path)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert not got["torch"], "a combination refused for the saved unlearner imported torch before its refusal"
    (saved, err), (with_unlearn, expected) = got["codes"]
    assert saved == with_unlearn == 2 and err.startswith("mcmc-unlearner bnn: error: the unlearner's settings ("), err
    assert err == expected and err.endswith(f"): {_run_network_unlearner(refused)}\n"), (err, expected)
    assert not (tmp_path / "m").exists() and not (tmp_path / "runs").exists()
    from mcmc_unlearner.experiments.options import BNNConfig, check_settings

    assert check_settings(BNNConfig(methods=("importance",), bank_shift="affine")) is None  # no unlearner built


def _help(argv: list[str], lazy: bool) -> str:
    from mcmc_unlearner.cli import build_parser

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        build_parser(argv, lazy=lazy).parse_args(argv)
    return buf.getvalue()


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["forget", "--help"],
        ["status", "--help"],
        ["summary", "--help"],
        ["demo", "--help"],
        ["bnn", "--help"],
    ],
)
def test_lazy_parser_is_the_full_one(argv):
    assert _help(argv, lazy=True) == _help(argv, lazy=False)


def test_lazy_parser_parses_as_the_full_one():
    from mcmc_unlearner.cli import build_parser

    argv = ["forget", "--model", "M", "--ids", "I", "--solver", "cg", "--on-failure", "repair", "-v"]
    assert vars(build_parser(argv, lazy=True).parse_args(argv)) == vars(build_parser().parse_args(argv))


def test_bnn_parses_as_before():
    from mcmc_unlearner.cli import build_parser
    from mcmc_unlearner.experiments import bnn

    argv = ["bnn", "--quick", "--solver", "cg", "--damping", "0.5", "--unlearner-kw", "tol=0.01", "--device", "cpu"]
    args = build_parser().parse_args(argv)
    cfg = bnn.config_from_args(args)
    assert (cfg.solver, cfg.damping, cfg.unlearner_kwargs, cfg.device) == ("cg", 0.5, {"tol": 0.01}, "cpu")
    assert args.func.__module__ == "mcmc_unlearner.experiments.options"


def test_the_torch_free_lists_are_the_library_s():
    import inspect

    from mcmc_unlearner.experiments import bnn
    from mcmc_unlearner.experiments.options import ARCHITECTURE_NAMES, BNN_DESCRIPTION, UNLEARNER_KEYWORDS
    from mcmc_unlearner.models.bnn import ARCHITECTURES
    from mcmc_unlearner.unlearner import MCMCUnlearner

    assert ARCHITECTURE_NAMES == tuple(sorted(ARCHITECTURES))

    taken = set(inspect.signature(MCMCUnlearner.__init__).parameters) - {"self", "model", "sampler", "bank"}
    assert UNLEARNER_KEYWORDS == tuple(sorted(taken))
    assert bnn.__doc__.split("\n\n")[0] == BNN_DESCRIPTION


def test_the_missing_files_check_is_load_dataset_s(tmp_path):
    from mcmc_unlearner.image_data import load_dataset, missing_dataset

    with pytest.raises(FileNotFoundError) as exc:
        load_dataset("fashion-mnist", tmp_path)
    assert missing_dataset("fashion-mnist", tmp_path) == str(exc.value)
    assert missing_dataset("digits", tmp_path) is None


def test_package_names_resolve():
    import mcmc_unlearner
    from mcmc_unlearner.solvers import SolverName
    from mcmc_unlearner.unlearner import MCMCUnlearner

    assert mcmc_unlearner.MCMCUnlearner is MCMCUnlearner
    assert mcmc_unlearner.SolverName is SolverName
    assert set(mcmc_unlearner.__all__) <= set(dir(mcmc_unlearner))
    with pytest.raises(AttributeError):
        mcmc_unlearner.no_such_name  # noqa: B018
