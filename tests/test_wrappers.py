"""Models as users wrap and instrument them (stop 34, probe I): hooks on a compiled wrapper, a global forward hook
under K-FAC, ``nn.DataParallel`` with the Gauss-Newton backend, a module overriding ``parameters()``."""

import warnings

import pytest
import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner

T = 3.0


def _net(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


class _Scale(nn.Module):
    def forward(self, z):
        return z / T


def _nll(m, b):
    return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")


def _lp(m):
    return -0.5 * sum((p**2).sum() for p in m.parameters())


@pytest.fixture
def problem():
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    y = torch.randint(3, (300,), generator=g)
    plain = nn.Sequential(*_net(), _Scale())
    bank = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in plain.state_dict().items()} for _ in range(20)]
    keep = torch.ones(300, dtype=torch.bool)
    keep[:10] = False
    yield x, y, plain, bank, keep
    torch.set_default_dtype(torch.float32)


def _shift(model, bank, x, y, keep, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, **kw)
        p = un.propose((x[~keep], y[~keep]), (x[keep], y[keep]))
    return (p.bank - un.bank).mean(0)


def test_kfac_factor_hook_runs_before_a_users_global_forward_hook(problem):
    x, y, plain, bank, keep = problem
    ref = _shift(plain, bank, x, y, keep, solver="kfac", damping=30.0)
    m = _net()
    h = nn.modules.module.register_module_forward_hook(lambda mod, a, o: o / T if mod is m[2] else None)
    try:
        got = _shift(m, bank, x, y, keep, solver="kfac", damping=30.0)
    finally:
        h.remove()
    assert float((got - ref).norm() / ref.norm()) < 1e-10  # was 0.48


def test_overridden_parameters_order_does_not_scramble_live_chain_or_collect(problem):
    x, y, _plain, bank, keep = problem

    class HeadFirst(nn.Sequential):
        def parameters(self, recurse=True):
            yield from self[2].parameters()
            yield from self[0].parameters()

    shifts = []
    for model in (nn.Sequential(*_net(), _Scale()), HeadFirst(*_net(), _Scale())):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, solver="exact", damping=100.0)
            before = {k: v.clone() for k, v in model.state_dict().items()}
            un.apply(un.propose((x[~keep], y[~keep]), (x[keep], y[keep])))
        shifts.append(torch.cat([(model.state_dict()[k] - before[k]).reshape(-1) for k in before]))
        un.collect()
        last = un.samples()[-1]
        assert all(torch.equal(last[k], v) for k, v in model.state_dict().items())
    assert torch.allclose(shifts[0], shifts[1], rtol=0, atol=1e-12)


def test_ggn_on_a_dataparallel_model(problem):
    x, y, plain, bank, keep = problem
    ref = _shift(plain, bank, x, y, keep, solver="ggn", damping=30.0)
    dp = nn.DataParallel(nn.Sequential(*_net(), _Scale()))
    got = _shift(dp, [{"module." + k: v for k, v in s.items()} for s in bank], x, y, keep, solver="ggn", damping=30.0)
    assert (
        float((got - ref).norm() / ref.norm()) < 1e-10
    )  # crashed: "The stateless API can't be used with nn.DataParallel"


def test_hooks_on_a_compiled_wrapper_are_not_silently_dropped(problem):
    x, y, plain, bank, keep = problem
    cm = torch.compile(_net())
    cm.register_forward_hook(lambda mod, a, o: o / T)
    cbank = [{"_orig_mod." + k: v for k, v in s.items()} for s in bank]
    with pytest.raises(ValueError, match="_orig_mod"):
        MCMCUnlearner(cm, nll=_nll, log_prior=_lp, bank=cbank)
    inner_hooked = torch.compile(_net())
    inner_hooked._orig_mod.register_forward_hook(lambda mod, a, o: o / T)  # the documented way: runs in both
    ref = _shift(plain, bank, x, y, keep, solver="exact", damping=200.0)
    got = _shift(inner_hooked, cbank, x, y, keep, solver="exact", damping=200.0)
    assert float((got - ref).norm() / ref.norm()) < 1e-10
