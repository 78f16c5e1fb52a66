"""The K-FAC backend in the unlearner against the dense Newton step (the factors themselves: test_kronecker.py)."""

from __future__ import annotations

import torch

from mcmc_unlearner.models.bnn import build_model


def test_kfac_solver_in_the_unlearner_tracks_the_exact_newton_step() -> None:
    """On a softmax regression (650 parameters) the K-FAC step points where the dense Newton step points."""
    from mcmc_unlearner import SGLD, MCMCUnlearner, RemovableDataset
    from mcmc_unlearner.image_data import load_dataset
    from mcmc_unlearner.samplers import run_chain

    ds = load_dataset("digits", seed=0)
    x, y = ds.x_train[:400], ds.y_train[:400]
    torch.manual_seed(0)
    model = build_model("mlp", ds.in_shape, ds.n_classes, prior_std=0.3, hidden=())
    data = RemovableDataset(x, y, batch_size=100, seed=0)
    sampler = SGLD(model.parameters(), lr=1e-4, generator=torch.Generator().manual_seed(1))
    un = MCMCUnlearner(model, sampler)
    run_chain(model, sampler, data, un.energy, 300, len(data))
    bank = run_chain(model, sampler, data, un.energy, 40, len(data), keep_every=5)
    removed = torch.nonzero(y == 3).flatten()[:20]
    shifts, reports = {}, {}
    for solver in ("exact", "kfac"):
        d = RemovableDataset(x, y, batch_size=100, seed=0)
        u = MCMCUnlearner(model, bank=bank, solver=solver, curvature_draws=4, curvature_data="full")
        reports[solver] = u.forget(removed, d)
        shifts[solver] = (u.bank - bank).mean(0)
    a, b = shifts["exact"], shifts["kfac"]
    cosine = float(a @ b / (a.norm() * b.norm()))
    assert cosine > 0.9, cosine
    assert 0.5 < float(b.norm() / a.norm()) < 2.0
    assert reports["kfac"].solver == "kfac" and reports["kfac"].residual < 1.0
