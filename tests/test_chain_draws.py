"""expectation='chain' must move the live chain by the exact posterior-mean shift on a conjugate model.

The samp_T sampler steps of the chain expectation ran on the remaining data alone, so the chain drifted part of the
way to the new posterior during the draws and the full influence shift was then added to the last draw: at
lr·λ_max = 0.19 and samp_T = 5 the live chains moved 1.65× the exact shift (every check passed).
"""

import warnings

import torch

from mcmc_unlearner import SGLD, MCMCUnlearner, RemovableDataset
from mcmc_unlearner.models.linreg import MultiChainLinearRegression, exact_posterior
from mcmc_unlearner.samplers import run_chain


def test_chain_expectation_moves_live_chain_by_exact_shift() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", DeprecationWarning)
    C, d, n, k = 100, 3, 400, 40
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64)
    y[:k] += 10.0
    mu0, _ = exact_posterior(x, y)
    mu1, _ = exact_posterior(x[k:], y[k:])
    ex = mu1 - mu0
    model = MultiChainLinearRegression(C, d).double()
    data = RemovableDataset(x, y, batch_size=n, seed=0)  # full batch: the exact gradient
    s = SGLD(model.parameters(), lr=5e-4, generator=torch.Generator().manual_seed(1))  # lr·λ_max ≈ 0.19
    un = MCMCUnlearner(model, s, expectation="chain", solver="exact", samp_T=5)
    run_chain(model, s, data, un.energy, 1000, len(data))
    before = model.w.detach().mean(0).clone()
    report = un.forget(torch.arange(k), data)
    assert not report.problems
    moved = float((model.w.detach().mean(0) - before) @ ex / (ex @ ex))
    assert 0.9 < moved < 1.1, moved  # pooled over 100 chains: Monte-Carlo error ≈ 0.02
