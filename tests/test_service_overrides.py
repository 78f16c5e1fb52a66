"""A saved model whose unlearner transports the bank affinely (the GMM demo's, solver exact) accepts a per-request
--solver cg/kfac/lissa/lowrank override as docs/deletion-service.md documents (it refused it with
"bank_shift='affine' needs solver='exact' or 'ggn'")."""

import warnings

import pytest
import torch

from conftest import save_gmm, tiny_gmm
from mcmc_unlearner import SGLD, MCMCUnlearner, RemovableDataset
from mcmc_unlearner.datasets import make_gmm_2d
from mcmc_unlearner.models.gmm import GaussianMixture
from mcmc_unlearner.samplers import run_chain
from mcmc_unlearner.service.checkpoint import load_model, save_model
from mcmc_unlearner.service.deletion import forget, status, verify
from mcmc_unlearner.service.specs import gmm_data_spec, gmm_model_spec


def test_solver_override_on_an_affine_bank_model(tmp_path) -> None:
    torch.set_num_threads(1)
    x, y = make_gmm_2d()
    data = RemovableDataset(torch.from_numpy(x), torch.from_numpy(y), batch_size=64, seed=0)
    model = GaussianMixture(k=4, dim=2, generator=torch.Generator().manual_seed(0))
    sampler = SGLD(model.parameters(), lr=1e-3, generator=torch.Generator().manual_seed(1))
    un = MCMCUnlearner(model, sampler, solver="exact", bank_shift="affine")
    run_chain(model, sampler, data, un.energy, 500, len(data))
    un.bank = run_chain(model, sampler, data, un.energy, 200, len(data), keep_every=1)
    save_model(
        tmp_path / "m",
        model=model,
        sampler=sampler,
        data=data,
        unlearner=un,
        model_spec=gmm_model_spec(model),
        data_spec=gmm_data_spec(n=2000, seed=23498353),
    )
    out = forget(tmp_path / "m", [40, 41], overrides={"solver": "cg"})
    assert out is not None
    assert status(tmp_path / "m")["n_remaining"] == 1998


@pytest.mark.parametrize(("saved", "override"), [("exact", "kfac"), ("kfac", "exact"), ("lowrank", "auto")])
def test_a_solver_override_leaves_a_folder_every_later_command_loads(tmp_path, saved, override) -> None:
    # stop 47's probe: the override's curvature cache was written into the state file under the saved configuration,
    # whose layout check then refused the folder in every later status, verify and forget (10 of 21 pairs), the
    # state before it already deleted
    folder = save_gmm(tmp_path / "m", tiny_gmm(0, bank=10, burn=60, solver=saved))
    before = load_model(folder).unlearner.bank.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert forget(folder, [1, 2], request_id="r1", overrides={"solver": override}).applied
        assert verify(folder).ok
        after = load_model(folder)
        assert after.unlearner.solver.value == saved  # the saved configuration, with the override's result
        assert not torch.equal(after.unlearner.bank, before)
        assert status(folder)["n_remaining"] == len(after.data)
        assert forget(folder, [3], request_id="r2").applied
    assert verify(folder).ok


def test_a_solver_override_says_only_what_the_override_sets_to_no_effect(tmp_path) -> None:
    """A saved lowrank unlearner's configuration holds its Lanczos rank (20), which an override to ``exact`` does
    not read: said neither there nor when the folder is loaded, since the request did not set it; an override that
    sets an option its solver ignores is said."""
    torch.set_num_threads(1)
    from mcmc_unlearner.service.checkpoint import with_config

    folder = save_gmm(tmp_path / "m", tiny_gmm(0, bank=10, burn=60, solver="lowrank"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_model(folder)
        assert loaded.unlearner.config()["precondition_rank"] == 20
        assert with_config(loaded, {"solver": "exact"}).solver.value == "exact"
    with pytest.warns(UserWarning, match=r"^iter_T=5 has no effect with solver='exact'") as got:
        with_config(loaded, {"solver": "exact", "iter_T": 5})
    assert [str(w.message).split("=")[0] for w in got if "has no effect" in str(w.message)] == ["iter_T"]


def test_a_curvature_override_builds_its_own_curvature_and_the_ledger_says_so(tmp_path) -> None:
    """Was: under refresh_every > 1 a request with --curvature-draws reused the Hessian saved with the folder's
    curvature_draws, while its ledger entry recorded the override (and the config) as what was used."""
    import json

    folder = save_gmm(tmp_path / "m", tiny_gmm(0, bank=10, burn=60, solver="exact", refresh_every=5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forget(folder, [1, 2], request_id="build")  # builds the Hessian with the saved curvature_draws=4
        forget(folder, [3, 4], request_id="override", overrides={"curvature_draws": 2})
        forget(folder, [5, 6], request_id="after")
        forget(folder, [7, 8], request_id="reuse", overrides={"tol": 1e-5})  # no curvature setting: reused
    entries = [json.loads(line) for line in (folder / "ledger.jsonl").read_text().splitlines()[1:]]
    build, override, after, reuse = (e["info"] for e in entries)
    assert build["hessian_reused"] is False
    assert entries[1]["overrides"] == {"curvature_draws": 2} and entries[1]["config"]["curvature_draws"] == 2
    assert override["hessian_reused"] is False  # built with the draws the entry records
    assert "curvature_draws=2" in override["curvature_rebuilt"] and "curvature_draws=4" in override["curvature_rebuilt"]
    assert after["hessian_reused"] is False and "curvature_rebuilt" not in after  # not the override's curvature
    assert reuse["hessian_reused"] is True and "curvature_rebuilt" not in reuse  # refresh_every holds as before
    assert load_model(folder).unlearner.curvature_draws == 4  # the saved configuration is kept
    assert verify(folder).ok


def test_a_solver_override_on_default_draws_takes_the_solvers_own_and_is_not_called_a_curvature_override(
    tmp_path,
) -> None:
    """A folder whose ``curvature_draws`` was not given (saved as ``None`` since stop 65): a request overriding the
    solver to or from K-FAC runs that solver's default draws, and its ledger entry said the request's curvature was
    "built for this request's curvature_draws=8 (the folder's configuration ...: curvature_draws=16)", a setting the
    request did not override (it named only the solver)."""
    model, sampler, data, base = tiny_gmm(0, bank=10, burn=60)
    for saved, override, draws in (("exact", "kfac", 8), ("kfac", "cg", 16)):
        un = MCMCUnlearner(model, sampler, bank=base.bank, solver=saved)
        folder = save_gmm(tmp_path / saved, (model, sampler, data, un))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = forget(folder, [1, 2], request_id="r1", overrides={"solver": override})
        assert out.entry["config"]["curvature_draws"] == draws, saved
        assert "curvature_rebuilt" not in out.entry["info"], out.entry["info"]["curvature_rebuilt"]
        # an override of the draws themselves is still said
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = forget(folder, [3], request_id="r2", overrides={"curvature_draws": 3})
        assert "curvature_draws=3" in out.entry["info"]["curvature_rebuilt"]


@pytest.mark.parametrize("option", ["slope_eta", "newton_gate", "direct_z"])
def test_an_option_off_at_none_is_refused_naming_zero_and_zero_turns_it_off(tmp_path, option: str) -> None:
    """``None`` in a request's settings means "not given" (the command line's flags left out), so
    ``overrides={"slope_eta": None}``, the slope test off in the library, was dropped without a word and the request
    ran with the folder's test on. It is refused before any work, naming ``slope_eta=0``, which turns it off; the
    Newton gate's ``newton_gate=None`` and the direct test's ``direct_z=None`` likewise."""
    import json

    from mcmc_unlearner.errors import InvalidRequestError
    from mcmc_unlearner.step import SLOPE_ETA
    from mcmc_unlearner.unlearner import NEWTON_GATE_Z

    folder = save_gmm(tmp_path / "m", tiny_gmm(0, bank=10, burn=60, solver="exact"))
    files = {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    with pytest.raises(InvalidRequestError, match=rf"^{option}=None cannot be given per request.*give {option}=0"):
        forget(folder, [1, 2], request_id="r1", overrides={option: None})
    assert {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} == files  # nothing written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert forget(folder, [1, 2], request_id="r1", overrides={option: 0}).applied
    entry = json.loads((folder / "ledger.jsonl").read_text().splitlines()[-1])
    assert entry["overrides"] == {option: 0} and entry["config"][option] == 0.0  # the request ran it off
    back = load_model(folder).unlearner
    # the folder's own settings kept (the direct test off by default)
    assert (back.control.slope_eta, back.newton_gate, back.control.direct_z) == (SLOPE_ETA, NEWTON_GATE_Z, None)


def test_a_requests_direct_z_is_what_the_request_ran_and_the_folder_keeps_its_own(tmp_path) -> None:
    """The direct test is off by default, so ``overrides={"direct_z": 0}`` above cannot show an override reaching the
    unlearner: ``direct_z=5`` per request is what its ledger entry ran, and the folder's own setting (off) stays."""
    import json

    folder = save_gmm(tmp_path / "m", tiny_gmm(0, bank=10, burn=60, solver="exact"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert forget(folder, [1, 2], request_id="r1", overrides={"direct_z": 5}).applied
    entry = json.loads((folder / "ledger.jsonl").read_text().splitlines()[-1])
    assert entry["overrides"] == {"direct_z": 5} and entry["config"]["direct_z"] == 5.0
    back = load_model(folder).unlearner
    assert back.control.direct_z is None and back.config()["direct_z"] == 0.0


def test_a_none_that_is_a_library_value_reaches_the_library(tmp_path) -> None:
    """Stop 63: a request's ``None`` of ``grad_draws`` (every bank draw), ``curvature_draws``/``refresh_every`` (the
    solver's default) and ``memory_budget`` (the default budget) was skipped as "not given", and the request ran with
    the folder's setting (curvature_draws=4, refresh_every=1, grad_draws='auto'). It now reaches the unlearner; other
    options' ``None`` is still "not given", as is an absent command-line flag."""
    import json

    from mcmc_unlearner.service.requests import check_settings

    given = {"grad_draws": None, "curvature_draws": None, "refresh_every": None, "memory_budget": None}
    assert check_settings({**given, "tol": None, "damping": None}) == given
    assert check_settings({**given, "tol": None}, interface="cli") == given
    folder = save_gmm(tmp_path / "m", tiny_gmm(0, bank=10, burn=60, solver="exact"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert forget(folder, [1, 2], request_id="r1", overrides=given).applied
    entry = json.loads((folder / "ledger.jsonl").read_text().splitlines()[-1])
    assert entry["overrides"] == given
    config = entry["config"]
    assert (config["grad_draws"], config["curvature_draws"], config["refresh_every"]) == (None, 16, 10)
    saved = load_model(folder).unlearner.config()  # the folder's own settings kept
    assert (saved["grad_draws"], saved["curvature_draws"], saved["refresh_every"]) == ("auto", 4, 1)
    assert verify(folder).ok


def test_a_requests_expectation_none_reaches_the_library(tmp_path) -> None:
    """``expectation=None`` (the library's default: the bank where there is one) is a value of the option, as
    ``grad_draws=None`` is: a request giving it on a folder saved with ``expectation='chain'`` ran with the chain (it
    was skipped as "not given"); the folder keeps its own setting."""
    import json

    model, sampler, data, base = tiny_gmm(0, bank=10, burn=60, solver="exact")
    un = MCMCUnlearner(model, sampler, bank=base.bank, solver="exact", expectation="chain")
    folder = save_gmm(tmp_path / "m", (model, sampler, data, un))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert forget(folder, [1, 2], request_id="r1", overrides={"expectation": None}).applied
    entry = json.loads((folder / "ledger.jsonl").read_text().splitlines()[-1])
    assert entry["overrides"] == {"expectation": None} and entry["config"]["expectation"] is None
    assert load_model(folder).unlearner.config()["expectation"] == "chain"
    # every option whose None the unlearner takes is passed on or refused, none skipped as "not given"
    import inspect

    from mcmc_unlearner.service import requests
    from mcmc_unlearner.service.state import _takes_none

    takes = {k for k in inspect.signature(MCMCUnlearner.__init__).parameters if _takes_none(k)}
    assert takes == {*requests._NONE_PASSED_ON, *requests._NONE_IS_A_VALUE}, takes


def test_the_emptied_draws_row_budget_is_a_request_override_checked_before_any_work(tmp_path) -> None:
    """``overrides={"emptied_max_row_evals": N}`` (passed on to ``MCMCUnlearner``, which checks it): a value that is
    no integer >= 1 is refused naming the option with nothing written; a valid one runs the request with it (the
    ledger entry's config) and the folder keeps its own budget."""
    import json

    from mcmc_unlearner.emptied import RESAMPLE_MAX_ROW_EVALS
    from mcmc_unlearner.errors import InvalidRequestError

    folder = save_gmm(tmp_path / "m", tiny_gmm(0, bank=10, burn=60, solver="exact"))
    files = {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    for bad in (0, -1, 2.5, True, "big"):
        with pytest.raises(InvalidRequestError, match=r"emptied_max_row_evals must be an integer >= 1"):
            forget(folder, [1, 2], request_id="r1", overrides={"emptied_max_row_evals": bad})
    assert {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} == files  # nothing written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert forget(folder, [1, 2], request_id="r1", overrides={"emptied_max_row_evals": 10**7}).applied
    entry = json.loads((folder / "ledger.jsonl").read_text().splitlines()[-1])
    assert entry["overrides"] == {"emptied_max_row_evals": 10**7} and entry["config"]["emptied_max_row_evals"] == 10**7
    assert load_model(folder).unlearner.emptied_max_row_evals == RESAMPLE_MAX_ROW_EVALS  # the folder's own kept


def test_a_newton_gate_override_under_torchrun_is_refused_naming_the_fix(tmp_path, monkeypatch) -> None:
    """Under torchrun the ranks run without the Newton gate (its estimate lists every remaining row): a request that
    asks for it by name (``newton_gate=3``) is refused before any work, nothing written; it was dropped without a
    word. (``newton_gate=0`` is what the ranks run: not refused.)"""
    from mcmc_unlearner import distributed
    from mcmc_unlearner.errors import InvalidRequestError

    folder = save_gmm(tmp_path / "m", tiny_gmm(0, bank=10, burn=60, solver="exact"))
    files = {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    monkeypatch.setattr(distributed, "launched", lambda: True)
    with pytest.raises(InvalidRequestError, match=r"^newton_gate=3 runs in one process.*leave it out under torchrun"):
        forget(folder, [1, 2], request_id="r1", overrides={"newton_gate": 3})
    assert {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} == files  # nothing written
