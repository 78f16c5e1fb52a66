"""benchmarks/paper_deviations.py's "one minibatch" variant really takes one minibatch per sampler step and product,
while the faithful procedure draws a second one for the product (the seed's ``mcmc_unlearner.py``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def pd():
    sys.path.insert(0, str(BENCH))  # the script imports run.py
    try:
        spec = importlib.util.spec_from_file_location("bench_paper_deviations", BENCH / "paper_deviations.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def _unlearner(pd, same: bool, samp_T: int = 3):
    from mcmc_unlearner.models.linreg import MultiChainLinearRegression
    from mcmc_unlearner.samplers import SGLD

    torch.manual_seed(0)
    model = MultiChainLinearRegression(2, 3, n=40)
    sampler = SGLD(model.parameters(), lr=1e-4, generator=torch.Generator().manual_seed(1))
    pu = pd.P.PaperUnlearner(model, sampler, iter_T=2, samp_T=samp_T, init_scaling=1.0)
    pu._un.n = 40
    if same:
        pu._un.__class__ = pd.SameBatch
    return pu._un


def _batches(count: list[int]):
    g = torch.Generator().manual_seed(2)
    while True:
        count[0] += 1
        x = torch.randn(8, 3, generator=g)
        yield x, x.sum(1) + torch.randn(8, generator=g)


@pytest.mark.parametrize(("same", "draws_per_sample"), [(True, 1), (False, 2)])
def test_one_minibatch_variant_draws_one_batch_per_sample(pd, same: bool, draws_per_sample: int) -> None:
    un = _unlearner(pd, same)
    stepped, producted = [], []
    step, fun = un._apply_sample, un._fun
    un._apply_sample = lambda z: (stepped.append(z), step(z))[1]
    un._fun = lambda z: (producted.append(z), fun(z))[1]
    count = [0]
    v = torch.ones(sum(p.numel() for p in un.params))
    hv = un._sampled_hvp(v, _batches(count))
    assert count[0] == 3 * draws_per_sample and len(stepped) == len(producted) == 3
    assert all((a is b) == same for a, b in zip(stepped, producted))
    assert torch.isfinite(hv).all() and hv.shape == v.shape
