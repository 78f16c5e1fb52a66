"""Options and inputs in the types users pass them (numpy scalars, sets, strings where a flag belongs): read as
meant, or refused naming the option and what it takes. Each case was a raw error, a misleading message or a silent
misreading before (stop 34)."""

from __future__ import annotations

import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import folder_state, save_gmm, tiny_gmm
from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.cli import main
from mcmc_unlearner.data import as_id_tensor
from mcmc_unlearner.errors import InvalidRequestError
from mcmc_unlearner.memory import resolve_budget


def _nll(model, batch):
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y) ** 2


def _log_prior(model):
    return -0.5 * sum((p**2).sum() for p in model.parameters())


def _setup(**opts):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g)
    y = x @ torch.tensor([1.0, -0.5, 0.3]) + 0.1 * torch.randn(60, generator=g)
    model = nn.Linear(3, 1)
    bank = torch.randn(16, 4, generator=g) * 0.05 + torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    kw = dict(nll=_nll, log_prior=_log_prior, bank=bank, solver="exact", seed=0)
    kw.update(opts)
    return x, y, model, kw


@pytest.mark.parametrize(
    ("option", "value", "listed"),
    [
        ("solver", "EXACT", "'auto', 'lissa', 'cg', 'exact'"),
        ("bank_shift", "MEAN", "'auto', 'mean', 'sample', 'affine'"),
        ("expectation", "BANK", "'bank', 'chain'"),
        ("hessian", None, "'remaining', 'full'"),
    ],
)
def test_enum_options_name_themselves_and_their_choices(option, value, listed):
    """Was ``'EXACT' is not a valid SolverName``: neither the option nor what it takes."""
    _, _, model, kw = _setup(**{option: value})
    with pytest.raises(ValueError, match=rf"^{option} must be one of \[{listed}.*got {value!r}"):
        MCMCUnlearner(model, **kw)


def test_numpy_scalars_are_read_as_the_numbers_they_hold():
    """``damping=np.float32(0.1)``, ``carry_deficit=np.False_`` (numpy 2's ``np.bool``), ``check_screen=np.True_``
    and ``seed=np.int64(1)`` were refused (the seed with a bare ``TypeError: an integer is required``)."""
    _, _, model, kw = _setup()
    ref = MCMCUnlearner(model, **{**kw, "damping": 0.25, "carry_deficit": False, "check_screen": True, "seed": 1})
    un = MCMCUnlearner(
        model,
        **{
            **kw,
            "damping": np.float32(0.25),
            "carry_deficit": np.False_,
            "check_screen": np.True_,
            "seed": np.int64(1),
        },
    )
    assert un.config() == ref.config()
    assert torch.equal(un.generator.get_state(), ref.generator.get_state())
    assert MCMCUnlearner(model, **{**kw, "damping": np.int64(2)}).config()["damping"] == 2.0


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("damping", True, "damping must be 'auto' or a finite number >= 0, got True"),  # was read as 1.0
        ("rescale_lr", "no", "rescale_lr must be True or False, got 'no'"),  # was read as True
        ("rescale_lr", None, "rescale_lr must be True or False, got None"),  # was read as False
        ("seed", "1", "seed must be an integer"),  # was torch's "manual_seed expected a long"
        ("seed", 2**70, "seed must be an integer"),  # was "Overflow when unpacking long long"
        ("seed", 1.5, "seed must be an integer"),
        # stop 47's probe: read as 2, as 1, or failed inside a comparison or float()
        ("max_damping_trials", 2.5, "max_damping_trials must be an integer >= 1, got 2.5"),
        ("max_damping_trials", "5", "max_damping_trials must be an integer >= 1, got '5'"),
        ("max_damping_trials", float("nan"), "max_damping_trials must be an integer >= 1"),
        ("tol", "5", r"tol must be a number in \(0, 1\)"),
        ("tol", True, r"tol must be a number in \(0, 1\)"),
        ("tol", None, r"tol must be a number in \(0, 1\)"),
        ("tol", 1.0, r"tol must be a number in \(0, 1\)"),  # met by the zero step
        ("damping_shape", ["data"], "damping_shape must be 'auto', 'identity' or 'data'"),  # was "unhashable"
    ],
)
def test_values_of_the_wrong_kind_are_refused_by_name(option, value, match):
    _, _, model, kw = _setup(**{option: value})
    with pytest.raises(ValueError, match=match):
        MCMCUnlearner(model, **kw)


def test_request_arguments_of_the_wrong_kind_change_nothing():
    """``strict="no"`` was truthy, ``n_remaining=True`` one row and ``2.7`` two (the prior's weight silently off),
    ``apply(None)`` an AttributeError."""
    x, y, model, kw = _setup()
    un = MCMCUnlearner(model, **kw)
    bank = un.bank.clone()
    live = torch.cat([p.detach().flatten() for p in model.parameters()])
    with pytest.raises(ValueError, match="strict must be True or False, got 'no'"):
        un.remove((x[:4], y[:4]), (x[4:], y[4:]), strict="no")
    for n in (True, 2.7, 0, -3):
        with pytest.raises(ValueError, match="n_remaining must be the number of remaining data points"):
            un.remove((x[:4], y[:4]), [(x[4:], y[4:])], n_remaining=n)
    with pytest.raises(TypeError, match="apply\\(\\) takes the Proposal that propose\\(\\) returned, got NoneType"):
        un.apply(None)
    assert torch.equal(un.bank, bank)
    assert torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), live)
    assert not un.history
    # the plain spellings still work, and a numpy count is a count
    report = un.remove((x[:4], y[:4]), [(x[4:], y[4:])], n_remaining=np.int64(56))
    assert report.n_remaining == 56


def test_ids_in_the_containers_users_hold():
    """An object array of small ints was "id 2 is too large", a set or a generator "ids must be integers", a meta
    tensor a raw ``NotImplementedError``."""
    assert as_id_tensor(np.array([4, 1, 2], dtype=object)).tolist() == [4, 1, 2]
    assert as_id_tensor({9, 3, 5}).tolist() == [3, 5, 9]  # a set has no order: ascending
    assert as_id_tensor(frozenset({2})).tolist() == [2]
    assert as_id_tensor(i for i in (7, 6)).tolist() == [7, 6]
    with pytest.raises(InvalidRequestError, match="too large"):
        as_id_tensor(np.array([1, 2**64], dtype=object))
    with pytest.raises(InvalidRequestError, match="meta tensor"):
        as_id_tensor(torch.arange(3, device="meta"))
    with pytest.raises(InvalidRequestError, match="must be integers"):
        as_id_tensor({1.5, 2.5})


def test_memory_budget_in_scientific_notation():
    """``'1e-3GB'`` was refused as unreadable (only positive exponents parsed)."""
    assert resolve_budget("1e-3GB") == 10**6
    assert resolve_budget("1.5e+3MB") == 1_500_000_000
    assert resolve_budget("2E3KiB") == 2000 * 1024


def test_resent_request_on_a_read_only_replica_answers_already_applied(tmp_path, capsys, monkeypatch):
    """A retry of an applied request on a folder this user cannot write was refused as read-only (exit 2): nothing
    needs writing, so it is answered "already applied" (exit 0); a new request there is still refused."""
    model = save_gmm(tmp_path / "m", tiny_gmm(bank=10))
    ids = tmp_path / "ids.txt"
    ids.write_text("5 6")
    assert main(["forget", "--model", str(model), "--ids", str(ids), "--request-id", "t-1", "--quiet"]) == 0
    capsys.readouterr()
    before = folder_state(model)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == model else real(p, mode, **kw))
    assert main(["forget", "--model", str(model), "--ids", str(ids), "--request-id", "t-1"]) == 0
    out, err = capsys.readouterr()
    assert "already applied" in out and not err
    assert folder_state(model) == before
    other = tmp_path / "other.txt"
    other.write_text("7")
    assert main(["forget", "--model", str(model), "--ids", str(other), "--request-id", "t-2"]) == 2
    assert "read-only" in capsys.readouterr().err
    assert folder_state(model) == before
    # with crash debris to roll back, the retry must write: refused as read-only, nothing changed
    shutil.copy(model / "ledger.jsonl", tmp_path / "ledger.bak")
    with open(model / "ledger.jsonl", "ab") as f:
        f.write(b'{"partial": ')
    debris = folder_state(model)
    assert main(["forget", "--model", str(model), "--ids", str(ids), "--request-id", "t-1"]) == 2
    assert "read-only" in capsys.readouterr().err
    assert folder_state(model) == debris


def test_a_request_inside_inference_mode_is_refused_naming_the_way_out():
    """Was torch's "`inputs` argument to `grad()` cannot be empty" from inside the K-FAC build; under
    ``torch.no_grad()`` the unlearner works (it enables gradients itself)."""
    x, y, model, kw = _setup()
    un = MCMCUnlearner(model, **kw)
    bank = un.bank.clone()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside that block"):
        un.remove((x[:4], y[:4]), (x[4:], y[4:]))
    assert torch.equal(un.bank, bank) and not un.history
    with torch.no_grad():
        assert un.remove((x[:4], y[:4]), (x[4:], y[4:])).passed


def test_configurations_that_cannot_work_are_refused_when_built():
    """Stop 47's probe: K-FAC with a custom energy= left the energy out (a prior 200x log_prior's) and took a step 15x
    too long, every check passed; chain mode without a sampler was refused only at the first request."""
    _, _, model, kw = _setup()

    def energy(m, batch, n):
        return n * _nll(m, batch).mean() - 200 * _log_prior(m)

    with pytest.raises(ValueError, match="solver='kfac' builds its curvature from nll and log_prior"):
        MCMCUnlearner(model, **{**kw, "solver": "kfac", "energy": energy})
    with pytest.raises(ValueError, match="expectation='chain' draws from the live chain and needs the sampler"):
        MCMCUnlearner(model, **{**kw, "expectation": "chain"})


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("damping", 1e300, "not finite"),
        ("damping", 1e39, "not finite"),
        ("scaling", 1e39, "not finite"),
        ("scaling", 1e-50, "zero or subnormal"),
    ],
)
def test_a_value_finite_in_float64_but_not_in_the_parameters_dtype_is_refused_when_built(option, value, said):
    """``damping=1e300`` is a float64 number but infinite in float32 parameters: it was refused at the request as a
    solve that "stopped after 0 iterations: raise iter_T" (and ``scaling=1e-50``, zero there, after ``iter_T``). It
    is refused when built, naming the dtype; float64 parameters take it, and a damping that rounds to zero is 0."""
    _, _, model, kw = _setup(solver="lissa")
    with pytest.raises(ValueError, match=rf"{option}=.* is {said} in the parameters' dtype float32 .*{option}='auto'"):
        MCMCUnlearner(model, **{**kw, option: value})
    assert MCMCUnlearner(model.double(), **{**kw, option: value, "bank": kw["bank"].double()}).config()[option] == value
    MCMCUnlearner(model.float(), **{**kw, "damping": 1e-50})


@pytest.mark.parametrize(
    ("solver", "option", "value"),
    [
        ("exact", "scaling", 0.1),
        ("kfac", "iter_T", 50),
        ("kfac", "precondition_rank", 5),
        ("cg", "likelihood", "categorical"),
        ("lissa", "mc_samples", 3),
        ("exact", "negative_curvature", "truncate"),
        ("auto", "iter_T", 7),  # auto picks exact for this model
    ],
)
def test_an_option_the_solver_never_reads_is_warned_about_when_built(solver, option, value):
    """Options of another solver were ignored without a word (``scaling`` with ``exact``, ``iter_T`` with ``kfac``):
    one UserWarning names the option and the solver; the solvers that read it, and every default, say nothing."""
    _, _, model, kw = _setup(solver=solver)
    with pytest.warns(UserWarning, match=rf"^{option}=.* has no effect with solver='(exact|kfac|cg|lissa)'") as got:
        MCMCUnlearner(model, **{**kw, option: value})
    assert len([w for w in got if "has no effect" in str(w.message)]) == 1
    reader = {"scaling": "lissa", "iter_T": "cg", "precondition_rank": "lowrank", "negative_curvature": "cg"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MCMCUnlearner(model, **{**kw, option: value, "solver": reader.get(option, "kfac")})


def test_defaults_and_their_saved_configurations_warn_of_nothing():
    """Every solver (``auto`` too, whose CG gets a preconditioner rank of its own) and chain mode at their defaults,
    and an unlearner rebuilt from its ``config()``, warn of nothing; ``turn_draws`` given in chain mode is said."""
    from mcmc_unlearner import SGLD

    _, _, model, kw = _setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for solver in ("auto", "exact", "ggn", "kfac", "cg", "lissa", "lowrank"):
            un = MCMCUnlearner(model, **{**kw, "solver": solver, "exact_max_dim": 0})
            MCMCUnlearner(model, bank=kw["bank"], nll=_nll, log_prior=_log_prior, **un.config())
        MCMCUnlearner(model, SGLD(model.parameters(), lr=1e-4), **{**kw, "expectation": "chain"})
        MCMCUnlearner(model, **{**kw, "turn_draws": False})
    with pytest.warns(UserWarning, match=r"turn_draws=False has no effect with expectation='chain'"):
        MCMCUnlearner(model, SGLD(model.parameters(), lr=1e-4), **{**kw, "expectation": "chain", "turn_draws": False})


@pytest.mark.parametrize("key", ["damping", "scaling", "tol"])
def test_an_integer_too_large_for_a_float_is_refused_with_the_option_s_message(key):
    """``damping=10**400`` (``--unlearner-kw damping=1000...``) raised a bare ``OverflowError`` from
    ``math.isfinite``; it is refused as any other value out of range, naming the option."""
    from mcmc_unlearner.options import check_option

    with pytest.raises(ValueError, match=key):
        check_option(key, 10**400)


def test_an_integer_too_large_for_a_float_is_an_unbounded_drift_tol():
    from mcmc_unlearner.options import check_option

    assert check_option("drift_tol", 10**400) == math.inf


@pytest.mark.parametrize("key", ["check_rows", "max_damping_trials"])
def test_an_integer_too_large_for_a_float_as_a_count_runs_as_a_very_large_one(key):
    """``check_rows=10**400`` is accepted (any integer >= its minimum), and a request then died of a bare
    ``OverflowError`` (``math.ceil(check_rows / 4)``); ``max_damping_trials=10**400`` made the damping search loop
    on for ever, growing its reach past infinity. Both now run as a very large count does."""
    torch.manual_seed(0)
    x = torch.randn(60, 2, dtype=torch.float64)
    y = x[:, 0] + 0.1 * torch.randn(60, dtype=torch.float64)
    model = nn.Linear(2, 1).double()
    bank = torch.cat([p.detach().flatten() for p in model.parameters()]) + 0.05 * torch.randn(8, 3, dtype=torch.float64)

    def nll(m, b):
        return 0.5 * (m(b[0]).squeeze(-1) - b[1]) ** 2

    un = MCMCUnlearner(model, None, nll=nll, bank=bank.clone(), **{key: 10**400})
    ref = MCMCUnlearner(model, None, nll=nll, bank=bank.clone(), **{key: 10**6})
    got, want = (u.propose((x[:3], y[:3]), (x[3:], y[3:])) for u in (un, ref))
    assert torch.equal(got.bank, want.bank)
