"""The seed repository's README demo runs verbatim against our package and unlearns a conjugate model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import MultiChainBLR, start_at_posterior
from mcmc_unlearner import SGHMC, SGLD, RemovableDataset, SolverDivergedError, sgmcmcUnlearner


# ---- the seed README's demo code, verbatim (cpu=True on this machine) ----------------------------
class myUnlearner(sgmcmcUnlearner):
    def _apply_sample(self, z):
        x, y = z
        if not self.cpu:
            x, y = x.cuda(), y.cuda()
        self.model.train()
        lo = self.model.F(z)
        self.optimizer.zero_grad()
        lo.backward()
        self.optimizer.step()

    def _fun(self, z):
        x, y = z
        if not self.cpu:
            x, y = x.cuda(), y.cuda()
        self.model.train()
        return self.model.F(z)

    def _z_fun(self, z):
        x, y = z
        if not self.cpu:
            x, y = x.cuda(), y.cuda()
        self.model.train()
        return self.model.h(z)


# ---------------------------------------------------------------------------------------------------

CHAINS = 64


def _run(blr, sampler: str, init_scaling: float, iter_T: int = 64, samp_T: int = 5):
    n = blr.x.shape[0]
    model = MultiChainBLR(CHAINS, 3, n)
    start_at_posterior(model, blr, seed=3)
    g = torch.Generator().manual_seed(0)
    # lr·λ ≈ 1e-4: the 325 sampler steps inside remove() move the chains by only ~3% of Δ (they would otherwise
    # add to the influence step and overshoot), so the test isolates the influence step
    lr = 0.0001 / n
    optimizer = (
        SGLD(model.parameters(), lr=lr, generator=g)
        if sampler == "sgld"
        else SGHMC(model.parameters(), lr=lr, alpha=0.9, generator=g)
    )
    unlearner = myUnlearner(
        model=model, optimizer=optimizer, params=model.parameters(), cpu=True, iter_T=iter_T, scaling=0.1, samp_T=samp_T
    )
    data = RemovableDataset(blr.x, blr.y, batch_size=100, seed=0)
    xx, yy = data.get(blr.removed)
    remaining_n = len(data) - len(blr.removed)
    before = model.w.detach().double().mean(0).clone()
    unlearner.param_dict["scaling"] = init_scaling / remaining_n
    # README's order (the seed's forget.py): the sampler still holds the removed rows while remove runs; they leave
    # it, and model.n drops, afterwards
    unlearner.remove([xx, yy], data)
    data.remove(blr.removed)
    model.n = remaining_n
    after = model.w.detach().double().mean(0)
    return float((blr.exact_shift - (after - before)).norm() / blr.exact_shift.norm()), unlearner


@pytest.mark.parametrize("sampler", ["sgld", "sghmc"])
def test_seed_demo_unlearns_conjugate_model(blr, sampler: str) -> None:
    undone, unlearner = _run(blr, sampler, init_scaling=1.0)
    assert undone < 0.25
    assert unlearner.last_result is not None and unlearner.last_result.iterations == 64
    # control: the same procedure with the influence step scaled to nothing leaves (almost) everything undone,
    # so the sampler steps inside remove() are not what moved the chains
    undone_control, _ = _run(blr, sampler, init_scaling=1e-6)
    assert undone_control > 0.8


def test_param_dict_changes_take_effect(blr) -> None:
    _, un = _run(blr, "sgld", init_scaling=1.0, iter_T=5, samp_T=1)
    assert un.last_result.iterations == 5


def test_diverging_lissa_raises_and_restores_bit_identical(blr) -> None:
    n = blr.x.shape[0]
    model = MultiChainBLR(CHAINS, 3, n)
    start_at_posterior(model, blr, seed=3)
    opt = SGHMC(model.parameters(), lr=0.002 / n, alpha=0.9, generator=torch.Generator().manual_seed(0))
    data = RemovableDataset(blr.x, blr.y, batch_size=50, seed=0)
    for _ in range(3):  # give SGHMC a velocity state
        opt.zero_grad()
        model.F(next(data)).backward()
        opt.step()
    un = myUnlearner(model=model, optimizer=opt, params=model.parameters(), cpu=True, iter_T=32, scaling=0.1, samp_T=2)
    un.param_dict["scaling"] = 20.0 / n  # scaling·λ_max ≫ 2
    w_before = model.w.detach().clone()
    state_before = copy.deepcopy(opt.state_dict())
    data_before = copy.deepcopy(data.state_dict())
    with pytest.raises(SolverDivergedError, match="scaling") as refused:
        un.remove(list(data.get(blr.removed)), data)
    # the seed API has no solver option: its message offered solver='cg', a TypeError there (stop 45's probe)
    assert "solver=" not in str(refused.value) and "param_dict['scaling'] = 'auto'" in str(refused.value)
    assert torch.equal(model.w.detach(), w_before)
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], state_before["state"][0]["momentum_buffer"])
    assert torch.isfinite(model.w).all()
    # the remaining data's order, position and generator too (stop 43: left advanced by the failed recursion)
    after = data.state_dict()
    for k, v in data_before.items():
        assert torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v, k


def test_nan_in_removed_batch_is_refused(blr) -> None:
    model = MultiChainBLR(2, 3, 400)
    opt = SGLD(model.parameters(), lr=1e-5)
    un = myUnlearner(model=model, optimizer=opt, params=model.parameters(), cpu=True, iter_T=2, scaling=0.1, samp_T=1)
    x = blr.x[:3].clone()
    x[1, 0] = float("inf")
    w = model.w.detach().clone()
    with pytest.raises(ValueError, match="NaN or infinite"):
        un.remove([x, blr.y[:3]], iter([]))
    assert torch.equal(model.w.detach(), w)


def test_removed_fields_of_different_lengths_are_refused_naming_the_rows(blr) -> None:
    # stop 57's probe: the seed API crashed with torch's "shape '[5, -1]' is invalid" from inside its repeated-row
    # check; the native API's check names the fields' row counts, and nothing moves
    model = MultiChainBLR(2, 3, 400)
    opt = SGLD(model.parameters(), lr=1e-5, generator=torch.Generator().manual_seed(0))
    un = myUnlearner(model=model, optimizer=opt, params=model.parameters(), cpu=True, iter_T=2, scaling=0.1, samp_T=1)
    data = RemovableDataset(blr.x, blr.y, batch_size=50, seed=0)
    w = model.w.detach().clone()
    state = copy.deepcopy(data.state_dict())
    with pytest.raises(ValueError, match=r"first \(row\) dimension, got rows \[5, 4\]"):
        un.remove([blr.x[:5], blr.y[:4]], data)
    assert torch.equal(model.w.detach(), w)
    after = data.state_dict()
    for k, v in state.items():
        assert torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v, k


def test_the_seed_api_works_on_attention_with_torchs_default_kernel() -> None:
    """A user's nn.MultiheadAttention on torch's default fused kernel (no double backward): the seed API's
    Hessian-vector products crashed; they now run on the math kernel and give what the math kernel gives."""
    from torch import nn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class Attend(nn.Module):
        def __init__(self, math: bool) -> None:
            super().__init__()
            self.math = math
            self.inp, self.att, self.out = nn.Linear(1, 4), nn.MultiheadAttention(4, 1), nn.Linear(4, 2)

        def forward(self, x):
            h = self.inp(x.unsqueeze(-1)).transpose(0, 1)
            if self.math:
                with sdpa_kernel(SDPBackend.MATH):
                    return self.out(self.att(h, h, h, need_weights=False)[0].mean(0))
            return self.out(self.att(h, h, h, need_weights=False)[0].mean(0))

    class Seed(sgmcmcUnlearner):
        def _apply_sample(self, z):
            self.optimizer.zero_grad()
            self._fun(z).backward()
            self.optimizer.step()

        def _fun(self, z):
            return 100 * torch.nn.functional.cross_entropy(self.model(z[0]), z[1]) + sum(
                0.5 * (p**2).sum() for p in self.model.parameters()
            )

        def _z_fun(self, z):
            return torch.nn.functional.cross_entropy(self.model(z[0]), z[1], reduction="sum")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, generator=g)
    y = (x.sum(1) > 0).long()
    shifts = []
    for math in (False, True):
        torch.manual_seed(0)
        model = Attend(math)
        before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        opt = SGLD(model.parameters(), lr=1e-5, generator=torch.Generator().manual_seed(1))
        un = Seed(model=model, optimizer=opt, params=model.parameters(), cpu=True, iter_T=8, scaling=1e-3, samp_T=1)
        un.remove([x[:4], y[:4]], RemovableDataset(x[4:], y[4:], batch_size=32, seed=0))
        shifts.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach() - before)
    assert shifts[0].norm() > 0
    torch.testing.assert_close(shifts[0], shifts[1], rtol=1e-4, atol=1e-7)


def test_a_dataloader_is_restarted_and_a_finite_iterator_that_runs_out_is_refused(blr) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from mcmc_unlearner import InvalidRequestError

    n = blr.x.shape[0]
    keep = torch.ones(n, dtype=torch.bool)
    keep[blr.removed] = False
    loader = DataLoader(TensorDataset(blr.x[keep], blr.y[keep]), batch_size=100, shuffle=True)
    model = MultiChainBLR(CHAINS, 3, n)
    start_at_posterior(model, blr, seed=3)
    opt = SGLD(model.parameters(), lr=0.0001 / n, generator=torch.Generator().manual_seed(0))
    un = myUnlearner(model=model, optimizer=opt, params=model.parameters(), cpu=True, iter_T=64, scaling=0.1, samp_T=5)
    model.n = int(keep.sum())
    un.param_dict["scaling"] = 1.0 / model.n
    before = model.w.detach().double().mean(0).clone()
    torch.manual_seed(0)
    un.remove([blr.x[blr.removed], blr.y[blr.removed]], loader)  # 645 minibatches from a loader of 4 per epoch
    moved = model.w.detach().double().mean(0) - before
    assert float((blr.exact_shift - moved).norm() / blr.exact_shift.norm()) < 0.25  # as with the endless sampler
    w, state = model.w.detach().clone(), copy.deepcopy(opt.state_dict())
    per_epoch = len(loader)
    with pytest.raises(InvalidRequestError, match=rf"ran out after {per_epoch} minibatches.*iter_T\) = 645"):
        un.remove([blr.x[blr.removed], blr.y[blr.removed]], iter(loader))  # one epoch only
    assert torch.equal(model.w.detach(), w)
    assert opt.state_dict()["state"].keys() == state["state"].keys()


# ------------------------------------------------ the seed repository's own samplers (stop 33 probe)


class _Mean(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.n = n

    def F(self, z):
        return 0.5 * (self.theta**2).sum() / 100 + self.n * 0.5 * ((z[0] - self.theta) ** 2).sum(1).mean()

    def h(self, z):
        return 0.5 * ((z[0] - self.theta) ** 2).sum()


class _Unlearner(sgmcmcUnlearner):
    def _apply_sample(self, z):
        lo = self.model.F(z)
        self.optimizer.zero_grad()
        lo.backward()
        self.optimizer.step()

    def _fun(self, z):
        return self.model.F(z)

    def _z_fun(self, z):
        return self.model.h(z)


class _SeedDataSampler:
    """fshp971/mcmc-unlearning BNN/utils/data.py DataSampler, reduced: __next__ and __len__, no __iter__."""

    def __init__(self, x, bs):
        self.x, self.bs, self.rng, self.it = x, bs, np.random.RandomState(0), None

    def _epoch(self):
        p = self.rng.permutation(len(self.x))
        for i in range(0, len(p) - self.bs + 1, self.bs):
            yield self.x[p[i : i + self.bs]], torch.zeros(self.bs)

    def __next__(self):
        if self.it is None:
            self.it = self._epoch()
        try:
            return next(self.it)
        except StopIteration:
            self.it = self._epoch()
            return next(self.it)

    def __len__(self):
        return len(self.x)


def _setup(n=400):
    torch.manual_seed(0)
    x = torch.randn(n, 2, dtype=torch.float64)
    model = _Mean(n)
    opt = SGHMC(model.parameters(), lr=0.05 / n, alpha=0.9)  # no generator: torch's global RNG, as the seed's
    return x, model, opt


def test_seed_api_takes_the_papers_own_data_sampler() -> None:
    """The seed repository's utils.DataSampler defines __next__ but no __iter__: it was refused."""
    x, model, opt = _setup()
    un = _Unlearner(model=model, optimizer=opt, params=model.parameters(), cpu=True, iter_T=8, scaling=0.1, samp_T=2)
    un.param_dict["scaling"] = 0.5 / len(x)
    res = un.remove([x[:5], torch.zeros(5)], _SeedDataSampler(x, 64))
    assert torch.isfinite(res.x).all() and res.x.abs().sum() > 0


def test_seed_api_refused_request_restores_the_global_rng_its_sampler_draws_from() -> None:
    """A sampler without a generator of its own (the seed's, or ours built without one) draws from torch's global
    RNG: a refused request left it advanced, so a retry differed from the same request on an untouched copy."""
    x, model, opt = _setup()
    s = iter([(x[i : i + 64], torch.zeros(64)) for i in range(0, 320, 64)] * 100)
    for _ in range(3):
        _Unlearner._apply_sample(type("U", (), {"model": model, "optimizer": opt})(), next(s))
    un = _Unlearner(model=model, optimizer=opt, params=model.parameters(), cpu=True, iter_T=16, scaling=1.0, samp_T=2)
    un.param_dict["scaling"] = 40.0 / len(x)  # diverges
    rng = torch.get_rng_state().clone()
    theta = model.theta.detach().clone()
    with pytest.raises(SolverDivergedError):
        un.remove([x[:5], torch.zeros(5)], s)
    assert torch.equal(model.theta.detach(), theta)
    assert torch.equal(torch.get_rng_state(), rng)


_BAD_PARAMS = [
    ("scaling", 10**400, "finite number > 0"),  # Python's OverflowError from float() before
    ("scaling", 0.0, "finite number > 0"),
    ("scaling", -0.1, "finite number > 0"),
    ("scaling", float("nan"), "finite number > 0"),
    ("scaling", float("inf"), "finite number > 0"),
    ("scaling", "0.1", "finite number > 0"),
    ("iter_T", 0, "integer >= 1"),
    ("iter_T", -3, "integer >= 1"),
    ("iter_T", 2.5, "integer >= 1"),  # ran 2 rounds before
    ("iter_T", float("nan"), "integer >= 1"),
    ("samp_T", 0, "integer >= 1"),
    ("samp_T", float("inf"), "integer >= 1"),
    ("samp_T", True, "integer >= 1"),
]


@pytest.mark.parametrize(("key", "value", "allowed"), _BAD_PARAMS, ids=lambda v: repr(v)[:12])
def test_out_of_range_params_are_refused_at_construction_naming_them(key, value, allowed) -> None:
    """The constructor's ``iter_T``, ``samp_T`` and ``scaling`` are range-checked: a ValueError names the argument,
    the value and the allowed range."""
    model = MultiChainBLR(2, 3, 400)
    opt = SGLD(model.parameters(), lr=1e-5)
    kw = {"iter_T": 4, "scaling": 0.1, "samp_T": 1, key: value}
    with pytest.raises(ValueError, match=rf"sgmcmcUnlearner: {key} must be .*{allowed}") as refused:
        myUnlearner(model=model, optimizer=opt, params=model.parameters(), cpu=True, **kw)
    assert "got " in str(refused.value)


@pytest.mark.parametrize(("key", "value", "allowed"), _BAD_PARAMS, ids=lambda v: repr(v)[:12])
def test_out_of_range_param_dict_is_refused_by_remove_before_anything_moves(blr, key, value, allowed) -> None:
    """The seed sets its scaling through ``param_dict`` after construction: ``remove`` checks it again and refuses
    before a sampler step, a minibatch draw or a change to the parameters, the sampler or torch's generator."""
    n = blr.x.shape[0]
    model = MultiChainBLR(2, 3, n)
    opt = SGLD(model.parameters(), lr=1e-5)
    un = myUnlearner(model=model, optimizer=opt, params=model.parameters(), cpu=True, iter_T=4, scaling=0.1, samp_T=1)
    un.param_dict[key] = value
    data = RemovableDataset(blr.x, blr.y, batch_size=50, seed=0)
    w, data_state, rng = model.w.detach().clone(), copy.deepcopy(data.state_dict()), torch.get_rng_state()
    with pytest.raises(ValueError, match=rf"param_dict\['{key}'\] must be .*{allowed}"):
        un.remove([blr.x[:3], blr.y[:3]], data)
    assert torch.equal(model.w.detach(), w) and torch.equal(torch.get_rng_state(), rng)
    assert not opt.state_dict()["state"] and un.last_result is None
    after = data.state_dict()
    for k, v in data_state.items():
        assert torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v, k


def test_a_one_element_tensor_scaling_and_numpy_counts_are_still_taken(blr) -> None:
    """``init_scaling / remaining_n`` with a tensor count, and numpy integers, run as before the range checks."""
    _, un = _run(blr, "sgld", init_scaling=1.0, iter_T=np.int64(3), samp_T=np.int64(1))
    assert un.last_result.iterations == 3
    un.param_dict["scaling"] = torch.tensor(1.0) / torch.tensor(blr.x.shape[0])
    un.param_dict["iter_T"] = 2
    data = RemovableDataset(blr.x, blr.y, batch_size=100, seed=0)
    un.remove([blr.x[:2], blr.y[:2]], data)
    assert un.last_result.iterations == 2 and un.last_result.info["scaling"] == pytest.approx(1.0 / blr.x.shape[0])
