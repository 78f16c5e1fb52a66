"""Every sampler passes the same known-Gaussian test against the exact stationary law of its recursion.

For a quadratic energy ``F(θ) = ½(θ−μ)ᵀA(θ−μ)`` both samplers are linear recursions
``s' = M s + c + ξ`` with Gaussian noise, so their stationary covariance solves the discrete Lyapunov
equation ``P = M P Mᵀ + Q`` exactly (discretisation bias included). 4,000 independent chains run at once
(one parameter row each); their final states are independent draws, so the Monte-Carlo standard errors are
known: the mean's is ``sqrt(diag Σ / N)``, a variance's is ``σ²·sqrt(2/N)``; we allow 5 of them.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from mcmc_unlearner import SGHMC, SGLD
from mcmc_unlearner.metrics import gaussian_kl

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.8], [0.8, 1.5]], dtype=torch.float64)
A = torch.linalg.inv(COV)
N_CHAINS = 4000
LR = 0.02


def _stationary_cov(name: str) -> np.ndarray:
    a = A.numpy()
    eye = np.eye(2)
    if name == "sgld":
        M = eye - LR * a
        Q = 2 * LR * eye
        return scipy.linalg.solve_discrete_lyapunov(M, Q)
    alpha = 0.9
    # state (θ, v): v' = (1-α)v - lr·A(θ-μ) + ξ;  θ' = θ + v'
    M = np.block([[eye - LR * a, (1 - alpha) * eye], [-LR * a, (1 - alpha) * eye]])
    Qv = 2 * alpha * LR * eye
    Q = np.block([[Qv, Qv], [Qv, Qv]])
    return scipy.linalg.solve_discrete_lyapunov(M, Q)[:2, :2]


def _run(name: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    theta = torch.nn.Parameter(MU + 15.0 + 0.1 * torch.randn(N_CHAINS, 2, generator=g, dtype=torch.float64))
    start = theta.detach().clone()
    opt = SGLD([theta], lr=LR, generator=g) if name == "sgld" else SGHMC([theta], lr=LR, alpha=0.9, generator=g)
    A_ = A.to(theta.dtype)
    for _ in range(steps):
        opt.zero_grad()
        d = theta - MU
        (0.5 * ((d @ A_) * d).sum()).backward()
        opt.step()
    return start, theta.detach()


@pytest.mark.parametrize("name", ["sgld", "sghmc"])
def test_known_gaussian(name: str) -> None:
    start, samples = _run(name, 1500)
    target_cov = torch.from_numpy(_stationary_cov(name))
    # discretisation bias is small at this step size: the recursion's law is within 6% of the target
    assert torch.allclose(target_cov, COV, rtol=0.06)
    mean = samples.mean(0)
    se_mean = (target_cov.diagonal() / N_CHAINS).sqrt()
    assert ((mean - MU).abs() <= 5 * se_mean).all(), (mean, MU, se_mean)
    emp = torch.cov(samples.T)
    se_cov = target_cov.diagonal().outer(target_cov.diagonal()).sqrt() * math.sqrt(2.0 / N_CHAINS)
    assert ((emp - target_cov).abs() <= 5 * se_cov).all(), (emp, target_cov)
    kl_start = gaussian_kl(start.mean(0).numpy(), torch.cov(start.T).numpy(), MU.numpy(), COV.numpy())
    kl_end = gaussian_kl(mean.numpy(), emp.numpy(), MU.numpy(), COV.numpy())
    assert kl_end < 1e-3 * kl_start and kl_end < 0.05


def test_sghmc_state_dict_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = SGHMC([p], lr=0.1, alpha=0.5, generator=g)
    for _ in range(3):
        opt.zero_grad()
        (p**2).sum().backward()
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    v = state["state"][0]["momentum_buffer"].clone()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = SGHMC([q], lr=1.0, alpha=0.1)
    opt2.load_state_dict(state)
    assert torch.equal(opt2.state[q]["momentum_buffer"], v)
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["alpha"] == 0.5
    # identical next step from identical generator states
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    opt.generator, opt2.generator = g1, g2
    for o, t in ((opt, p), (opt2, q)):
        o.zero_grad()
        (t**2).sum().backward()
        o.step()
    assert torch.equal(p, q)


def test_sgld_step_is_the_seed_formula() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = SGLD([p], lr=0.01, generator=torch.Generator().manual_seed(3))
    (p**2).sum().backward()
    noise = torch.randn(2, generator=torch.Generator().manual_seed(3)) * math.sqrt(0.02)
    expected = torch.tensor([1.0, 2.0]) - 0.01 * torch.tensor([2.0, 4.0]) + noise
    opt.step()
    assert torch.allclose(p.detach(), expected)


def test_sghmc_first_step_draws_velocity() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = SGHMC([p], lr=0.04, alpha=0.9, generator=torch.Generator().manual_seed(7))
    (p**2).sum().backward()
    opt.step()
    v = torch.randn(2, generator=torch.Generator().manual_seed(7)) * 0.2
    assert torch.allclose(p.detach(), v)
    assert torch.allclose(opt.state[p]["momentum_buffer"], v)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_bad_lr_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="lr must be positive"):
        SGLD([torch.nn.Parameter(torch.zeros(1))], lr=bad)
    with pytest.raises(ValueError, match="lr must be positive"):
        SGHMC([torch.nn.Parameter(torch.zeros(1))], lr=bad)


def test_parameter_groups_are_checked_like_the_defaults() -> None:
    """A group's ``weight_decay``/``momentum`` were accepted and silently ignored (a zero-gradient step left p at 1
    where decay 1e6 would send it to about -999), a group's ``alpha=5`` and ``lr=-1`` were accepted although the
    constructor refuses them."""
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['momentum', 'weight_decay'\].*log prior"):
        SGLD([{"params": [p], "weight_decay": 1e6, "momentum": 0.9}], lr=1e-3)
    with pytest.raises(ValueError, match="alpha must lie in"):
        SGHMC([{"params": [p], "alpha": 5.0}], lr=1e-3)
    with pytest.raises(ValueError, match="lr must be positive"):
        SGLD([{"params": [p], "lr": -1.0}], lr=1e-3)
    q = torch.nn.Parameter(torch.ones(2))
    opt = SGHMC([{"params": [p], "lr": 2e-3, "alpha": 0.5}], lr=1e-3)
    with pytest.raises(ValueError, match="alpha must lie in"):
        opt.add_param_group({"params": [q], "alpha": 0.0})
    assert len(opt.param_groups) == 1  # nothing added by the refused call
    opt.add_param_group({"params": [q]})
    assert [(g["lr"], g["alpha"]) for g in opt.param_groups] == [(2e-3, 0.5), (1e-3, 0.9)]
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)  # a scheduler's initial_lr is its own key
    sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(5e-4)


def test_run_chain_restarts_a_dataloader_and_samplers_refuse_odd_step_sizes() -> None:
    """run_chain over a DataLoader ended in a bare StopIteration once an epoch was used up (the unlearner itself
    restarts DataLoaders); SGLD(lr=inf) and SGLD(lr=True) were accepted."""
    import pytest
    from torch.utils.data import DataLoader, TensorDataset

    from mcmc_unlearner import SGLD
    from mcmc_unlearner.samplers import run_chain

    torch.manual_seed(0)
    x, y = torch.randn(40, 2), torch.randn(40)
    model = torch.nn.Linear(2, 1)
    sampler = SGLD(model.parameters(), lr=1e-4, generator=torch.Generator().manual_seed(0))

    def energy(m, b, n):
        return n * ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean() / 2

    bank = run_chain(model, sampler, DataLoader(TensorDataset(x, y), batch_size=16), energy, 10, 40, keep_every=1)
    assert bank.shape[0] == 10  # 3 minibatches per epoch: restarted twice
    with pytest.raises(ValueError, match="ran out after 3 of 10 steps"):
        run_chain(model, sampler, iter(DataLoader(TensorDataset(x, y), batch_size=16)), energy, 10, 40)
    for lr in (float("inf"), True, 0.0):
        with pytest.raises(ValueError, match="positive and finite"):
            SGLD(model.parameters(), lr=lr)


class _MySGLD:
    """A user's Langevin sampler (no torch Optimizer): ``zero_grad()`` without torch's ``set_to_none``."""

    def __init__(self, params, lr: float, generator: torch.Generator) -> None:
        self.params, self.gen = list(params), generator
        self.param_groups = [{"params": self.params, "lr": lr}]

    def zero_grad(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        lr = self.param_groups[0]["lr"]
        for p in self.params:
            p.add_(p.grad, alpha=-lr).add_(torch.randn(p.shape, generator=self.gen, dtype=p.dtype) * math.sqrt(2 * lr))


class _MySGLDKwargs(_MySGLD):
    def zero_grad(self, **kw) -> None:  # takes set_to_none through **kw
        super().zero_grad()


@pytest.mark.parametrize("cls", [_MySGLD, _MySGLDKwargs])
def test_run_chain_drives_a_users_sampler_whose_zero_grad_has_no_set_to_none(cls) -> None:
    """run_chain called ``zero_grad(set_to_none=False)``: a user's sampler with a plain ``zero_grad()`` failed
    with a TypeError. The same Langevin step written by a user draws the library SGLD's chain to the bit."""
    from torch.utils.data import DataLoader, TensorDataset

    from mcmc_unlearner.samplers import run_chain

    def energy(m, b, n):
        return n * ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean() / 2

    torch.manual_seed(0)
    x, y = torch.randn(40, 2), torch.randn(40)
    chains = []
    for make in (SGLD, cls):
        torch.manual_seed(1)
        model = torch.nn.Linear(2, 1)
        sampler = make(model.parameters(), lr=1e-3, generator=torch.Generator().manual_seed(5))
        chains.append(run_chain(model, sampler, DataLoader(TensorDataset(x, y), batch_size=16), energy, 12, 40,
                                keep_every=3))  # fmt: skip
    assert chains[1].shape == (4, 3) and torch.equal(chains[0], chains[1])


def _quadratic_chain(cls, seed: int, **kw):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = cls([w], lr=1e-2, generator=torch.Generator().manual_seed(seed), **kw)

    def steps(k):
        for _ in range(k):
            opt.zero_grad()
            (0.5 * (w**2).sum()).backward()
            opt.step()

    return w, opt, steps


@pytest.mark.parametrize("cls", [SGLD, SGHMC])
def test_a_chain_resumed_from_state_dict_continues_bit_for_bit(cls) -> None:
    """state_dict() left the noise generator out: a chain resumed with a generator seeded afresh replayed the noise
    it had drawn (1.1 off after 100 steps; stop 46's probe). It is in the state now."""
    import copy

    w, opt, steps = _quadratic_chain(cls, 1)
    steps(100)
    saved_w, saved = w.detach().clone(), copy.deepcopy(opt.state_dict())
    steps(100)
    w2, opt2, steps2 = _quadratic_chain(cls, 1)  # a fresh process: the same seed, the checkpoint loaded
    with torch.no_grad():
        w2.copy_(saved_w)
    opt2.load_state_dict(saved)
    steps2(100)
    assert torch.equal(w2, w)


def test_set_learning_rate_and_a_seed_checkpoint_s_velocity() -> None:
    """The seed's optimizers have set_learning_rate; its SGHMC keeps the velocity under 'velocity', which was
    ignored on load (the first step drew a fresh one)."""
    w, opt, steps = _quadratic_chain(SGHMC, 2)
    opt.set_learning_rate(3e-3)
    assert all(g["lr"] == 3e-3 for g in opt.param_groups)
    with pytest.raises(ValueError, match="lr must be positive"):
        opt.set_learning_rate(-1.0)
    steps(10)
    seed_style = opt.state_dict()
    seed_style["state"] = {k: {"velocity": v["momentum_buffer"].clone()} for k, v in seed_style["state"].items()}
    w2, opt2, steps2 = _quadratic_chain(SGHMC, 2)
    with torch.no_grad():
        w2.copy_(w)
    opt2.load_state_dict(seed_style)
    assert torch.equal(opt2.state[w2]["momentum_buffer"], opt.state[w]["momentum_buffer"])
    steps(5)
    steps2(5)
    assert torch.equal(w2, w)
