"""``MCMCUnlearner.fit``: a first request's one-off work (curvature, damping) done ahead of it, nothing else changed."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mcmc_unlearner import SGLD, FitReport, MCMCUnlearner, RemovableDataset
from mcmc_unlearner.image_data import load_dataset
from mcmc_unlearner.models.bnn import build_model
from mcmc_unlearner.samplers import run_chain


@pytest.fixture(scope="module")
def chain():
    """A small MLP on 400 digits, its bank of 20 SGLD samples and the rows."""
    ds = load_dataset("digits", seed=0)
    x, y = ds.x_train[:400], ds.y_train[:400]
    torch.manual_seed(0)
    model = build_model("mlp", ds.in_shape, ds.n_classes, prior_std=0.3, hidden=(16,))
    data = RemovableDataset(x, y, batch_size=100, seed=0)
    sampler = SGLD(model.parameters(), lr=1e-4, generator=torch.Generator().manual_seed(1))
    un = MCMCUnlearner(model, sampler)
    run_chain(model, sampler, data, un.energy, 300, len(data))
    bank = run_chain(model, sampler, data, un.energy, 40, len(data), keep_every=2)
    return model, bank, x, y


def _state(un: MCMCUnlearner) -> tuple:
    live = torch.cat([p.detach().flatten() for p in un.model.parameters()])
    return un.bank.clone(), live, un.generator.get_state(), torch.get_rng_state()


def test_fit_builds_exactly_the_curvature_a_request_builds_and_changes_nothing_else(chain) -> None:
    model, bank, x, y = chain
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[torch.nonzero(y == 3).flatten()[:20]] = False
    remaining = (x[keep], y[keep])
    a = MCMCUnlearner(model, bank=bank, solver="kfac")
    before = _state(a)
    fitted = a.fit(remaining)
    for u, v in zip(before, _state(a)):
        assert torch.equal(u, v)  # samples, live parameters, the unlearner's and torch's generators
    assert isinstance(fitted, FitReport) and fitted.curvature_kept and fitted.solver == "kfac"
    assert fitted.seconds > 0 and fitted.to_dict()["curvature_kept"] is True
    # a fresh unlearner's request on the same data builds the same factors, to the bit (same draws, same rows,
    # same Monte-Carlo labels from the same generator state)
    b = MCMCUnlearner(model, bank=bank, solver="kfac")
    prop = b.propose((x[~keep], y[~keep]), remaining)
    built = prop._backend_state["_pending"][0]
    kept, want = a.curvature.kfac.state_dict()[0], built.state_dict()[0]
    assert kept.keys() == want.keys()
    for k in want:
        assert torch.equal(kept[k], want[k]), k


def test_the_request_after_fit_is_the_request_without_it(chain) -> None:
    """fit only moves the build out of the request: the same removal, the same samples, to the bit."""
    model, bank, x, y = chain
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[torch.nonzero(y == 3).flatten()[:20]] = False
    removed, remaining = (x[~keep], y[~keep]), (x[keep], y[keep])
    fitted = MCMCUnlearner(model, bank=bank, solver="kfac")
    fitted.fit(remaining)
    after_fit = fitted.remove(removed, remaining)
    plain = MCMCUnlearner(model, bank=bank, solver="kfac")
    alone = plain.remove(removed, remaining)
    assert after_fit.info["preconditioner_reused"] is True and after_fit.info["curvature_built_by_fit"] is True
    assert alone.info["preconditioner_reused"] is False
    # the same search (from scratch, every damping shape), the same step
    assert after_fit.info["damping_history"] == alone.info["damping_history"]
    assert torch.equal(fitted.bank, plain.bank)
    # the next request reuses the curvature as after any request (no longer "built by fit")
    more = (x[keep][:10], y[keep][:10]), (x[keep][10:], y[keep][10:])
    r2 = fitted.remove(*more)
    assert r2.info["preconditioner_reused"] is True and "curvature_built_by_fit" not in r2.info


def test_fit_builds_nothing_for_the_dense_backend(chain) -> None:
    model, bank, x, y = chain
    un = MCMCUnlearner(model, bank=bank, solver="exact")
    fitted = un.fit((x, y))
    assert not fitted.curvature_kept and "built from each request's removed rows" in fitted.info["fit"]
    assert un.curvature.cache is None


def test_fit_through_a_dataloader_puts_its_generators_back(chain) -> None:
    model, bank, x, y = chain
    gen = torch.Generator().manual_seed(5)
    loader = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True, generator=gen)
    un = MCMCUnlearner(model, bank=bank, solver="kfac")
    g_before, rng_before = gen.get_state(), torch.get_rng_state()
    fitted = un.fit(loader)
    assert torch.equal(gen.get_state(), g_before) and torch.equal(torch.get_rng_state(), rng_before)
    assert fitted.curvature_kept and un.curvature.kfac is not None


def test_fit_without_a_bank_or_within_a_tight_budget_changes_nothing(chain) -> None:
    model, bank, x, y = chain
    with pytest.raises(ValueError, match="bank"):
        MCMCUnlearner(model, solver="kfac").fit((x, y))
    un = MCMCUnlearner(model, bank=bank, solver="kfac", memory_budget=2_000)
    with pytest.raises(MemoryError, match="memory budget"):
        un.fit((x, y))
    assert un.curvature.kfac is None and not un._fitted


def test_a_proposal_made_before_fit_is_stale_after_it(chain) -> None:
    model, bank, x, y = chain
    un = MCMCUnlearner(model, bank=bank, solver="kfac")
    prop = un.propose((x[:10], y[:10]), (x[10:], y[10:]))
    un.fit((x[10:], y[10:]))
    with pytest.raises(ValueError, match="stale proposal"):
        un.apply(prop)


def test_a_failed_fit_leaves_the_curvature_an_earlier_request_cached(chain, monkeypatch) -> None:
    model, bank, x, y = chain
    un = MCMCUnlearner(model, bank=bank, solver="kfac")
    un.remove((x[:10], y[:10]), (x[10:], y[10:]))
    cached, relative = un.curvature.kfac, un.control.relative
    assert cached is not None

    def broken(problem):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(un.curvature, "prepare", broken)
    with pytest.raises(RuntimeError, match="injected"):
        un.fit((x[10:], y[10:]))
    assert un.curvature.kfac is cached and un.control.relative == relative and not un._fitted


def test_a_fitted_curvature_saved_and_loaded_is_still_the_request_s_own_build(chain) -> None:
    """A service fits, checkpoints, and serves the request in another process: the loaded curvature is searched as
    fit's build (every damping shape from scratch), the same step as without the checkpoint; once a request used it,
    a saved state is a reused one."""
    model, bank, x, y = chain
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[torch.nonzero(y == 3).flatten()[:20]] = False
    removed, remaining = (x[~keep], y[~keep]), (x[keep], y[keep])
    fitted = MCMCUnlearner(model, bank=bank, solver="kfac")
    fitted.fit(remaining)
    tensors, meta = fitted.curvature_state()
    assert meta["built_by_fit"] is True
    loaded = MCMCUnlearner(model, bank=bank, solver="kfac")
    loaded.load_curvature_state(tensors, meta)
    after_load = loaded.remove(removed, remaining)
    plain = MCMCUnlearner(model, bank=bank, solver="kfac")
    alone = plain.remove(removed, remaining)
    assert after_load.info["curvature_built_by_fit"] is True
    assert after_load.info["damping_history"] == alone.info["damping_history"]
    assert torch.equal(loaded.bank, plain.bank)
    assert "built_by_fit" not in loaded.curvature_state()[1]  # used by a request: reused from now on
    again = MCMCUnlearner(model, bank=bank, solver="kfac")
    again.load_curvature_state(*loaded.curvature_state())
    assert not again._fitted
