"""``newton_steps="auto"``: further equilibrium Newton steps only where the bank's own gap to equilibrium is small
against the removal's gradient, and only while they are cheap (a counted budget of row-draw gradients).

A Bayesian logistic regression (prior N(0, 1)) whose mode moves nonlinearly when a region of rows is removed; its
new mode is found by Newton's method in float64, so how far a bank at a single point lands from it is exact.
"""

from __future__ import annotations

import pytest
import torch

import mcmc_unlearner.unlearner as U
from mcmc_unlearner import MCMCUnlearner, RemovableDataset


class _LogReg(torch.nn.Module):
    """Bayesian logistic regression, prior N(0, 1)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))

    def log_prior(self) -> torch.Tensor:
        return -0.5 * (self.w**2).sum()

    def nll(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(x @ self.w, y, reduction="none")


def _map(x: torch.Tensor, y: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """The logistic posterior's mode by Newton's method (float64, to machine precision)."""
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(x @ w)
        H = x.T @ (x * (p * (1 - p))[:, None]) + torch.eye(x.shape[1], dtype=torch.float64)
        w = w - torch.linalg.solve(H, x.T @ (p - y) + w)
    return w


def _grad(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, prior: bool = True) -> torch.Tensor:
    """``∇F(w)``: the rows' NLL gradient, plus the prior's where asked."""
    g = x.T @ (torch.sigmoid(x @ w) - y)
    return g + w if prior else g


@pytest.fixture
def region():
    """300 rows; the removed ones are a whole region (``x₀ > 0.8``), so one influence step is not exact."""
    g = torch.Generator().manual_seed(0)
    n, d = 300, 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    p = torch.sigmoid(x @ torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64))
    y = (torch.rand(n, generator=g, dtype=torch.float64) < p).double()
    removed = torch.nonzero(x[:, 0] > 0.8).flatten()
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    return x, y, removed, keep


def _forget(x, y, removed, bank: torch.Tensor, steps, **kw) -> tuple[torch.Tensor, dict]:
    """Forget ``removed`` with ``newton_steps=steps`` (``newton_gate`` off unless given: the rule tested here is
    ``"auto"``'s own)."""
    kw = {"newton_gate": 0, "curvature_draws": 1, **kw}
    un = MCMCUnlearner(_LogReg(x.shape[1]), bank=bank.clone(), solver="exact", newton_steps=steps, **kw)
    report = un.forget(removed, RemovableDataset(x, y, batch_size=x.shape[0], seed=0))
    assert report.converged
    return un.bank[0].clone(), report.info


@pytest.mark.filterwarnings("ignore:this request removes")  # a large removal, on purpose
def test_auto_takes_further_steps_where_the_bank_is_at_equilibrium_and_lands_on_the_new_mode(
    region, monkeypatch
) -> None:
    """A bank at the old mode is at equilibrium (``E[∇F(θ, S)] = 0``: gap 0): the rule takes further steps, and they
    reach the exact new mode that one step misses."""
    x, y, removed, keep = region
    old, new = _map(x, y), _map(x[keep], y[keep])
    monkeypatch.setattr(U, "NEWTON_AUTO_PASSES", 10**6)  # the budget apart: tested below
    one, _ = _forget(x, y, removed, old[None], 1)
    auto, info = _forget(x, y, removed, old[None], "auto")
    err1 = float((one - new).norm() / (new - old).norm())
    err_auto = float((auto - new).norm() / (new - old).norm())
    assert err1 > 0.02  # one step is not exact on this nonlinear problem
    assert info["newton_bank_gap"] < 1e-6  # the mode zeroes the full data's gradient
    assert info["newton_steps_taken"] >= 2
    assert err_auto < 0.05 * err1


@pytest.mark.filterwarnings("ignore:this request removes")
def test_auto_takes_no_further_step_where_the_banks_own_gap_dominates(region) -> None:
    """A bank off the old mode by more than the removal moves it: its own gap to equilibrium ``e₀ = ∇F(θ, S)``
    (measured, checked against the closed form) exceeds ``NEWTON_AUTO_BANK_GAP·‖G‖``, further steps would chase it,
    and the request is the influence step's to the bit; an integer ``newton_steps`` does move on."""
    x, y, removed, keep = region
    old = _map(x, y)
    bank = (old + torch.tensor([1.5, -1.0, 1.0], dtype=torch.float64))[None]
    gap = float(_grad(x, y, bank[0]).norm() / _grad(x[removed], y[removed], bank[0], prior=False).norm())
    assert gap > 2 * U.NEWTON_AUTO_BANK_GAP  # the case is what it says
    one, _ = _forget(x, y, removed, bank, 1)
    auto, info = _forget(x, y, removed, bank, "auto")
    four, _ = _forget(x, y, removed, bank, 4)
    assert info["newton_bank_gap"] == pytest.approx(gap, rel=1e-6)
    assert info["newton_steps_taken"] == 1 and info["newton_stop"].startswith("not needed"), info
    assert info["newton_row_gradients"] == int(keep.sum())  # the gap's pass: every remaining row
    assert torch.equal(auto, one)
    assert float((four - one).norm()) > 0.1 * float((one - bank[0]).norm())


@pytest.mark.filterwarnings("ignore:this request removes")
def test_auto_stops_at_its_budget(region, monkeypatch) -> None:
    """The further steps' gradient passes, the gap's included, take at most ``NEWTON_AUTO_PASSES·NEWTON_ROW_DRAWS``
    row-draw gradients: with room for two and a half passes over the remaining rows (one draw), the gap's pass and
    one further step are taken, as ``newton_steps=2`` takes them, and the report says why it stopped."""
    x, y, removed, keep = region
    old = _map(x, y)
    rows = int(keep.sum())
    monkeypatch.setattr(U, "NEWTON_AUTO_PASSES", 2.5 * rows / U.NEWTON_ROW_DRAWS)
    two, _ = _forget(x, y, removed, old[None], 2)
    auto, info = _forget(x, y, removed, old[None], "auto")
    assert info["newton_steps_taken"] == 2 and info["newton_stop"].startswith("budget: "), info
    assert info["newton_row_gradients"] == 2 * rows
    assert torch.equal(auto, two)
    monkeypatch.setattr(U, "NEWTON_AUTO_PASSES", 1.5 * rows / U.NEWTON_ROW_DRAWS)  # the gap's pass alone
    one, _ = _forget(x, y, removed, old[None], 1)
    auto, info = _forget(x, y, removed, old[None], "auto")
    assert info["newton_steps_taken"] == 1 and info["newton_row_gradients"] == rows, info
    assert torch.equal(auto, one)


def test_auto_is_validated_and_needs_the_equilibrium_target() -> None:
    model = _LogReg(3)
    bank = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match="newton_steps must be 'auto' or an integer >= 1"):
        MCMCUnlearner(model, bank=bank, newton_steps="Auto")
    with pytest.raises(ValueError, match="newton_target='equilibrium'"):
        MCMCUnlearner(model, bank=bank, newton_steps="auto", newton_target="relative")
    assert MCMCUnlearner(model, bank=bank, newton_steps="auto").newton_steps == "auto"


@pytest.mark.filterwarnings("ignore:this request removes")
def test_auto_gives_the_same_bank_on_a_loaded_machine(region, monkeypatch) -> None:
    """The further steps' budget is counted, not timed: a CPU clock that runs ever longer between its reads (a
    machine ever busier, as the clock sees it) gives the same steps and the same bank to the bit. A budget in CPU time
    stopped the quick matrix's regression at 54-72 steps from run to run, and here after the influence step alone."""
    x, y, removed, _ = region
    old = _map(x, y)
    idle, info = _forget(x, y, removed, old[None], "auto")
    assert info["newton_steps_taken"] >= 2, info  # the case is what it says: further steps on an idle machine
    ticks = iter(range(10**6))
    monkeypatch.setattr(U.time, "process_time", lambda: 1000.0 * next(ticks) ** 2)
    loaded, again = _forget(x, y, removed, old[None], "auto")
    assert again["newton_steps_taken"] == info["newton_steps_taken"], again
    assert again["newton_stop"] == info["newton_stop"]
    assert torch.equal(loaded, idle)


class _LogRegMM(_LogReg):
    """The same logistic regression, its logits a matrix product ``x @ w[:, None]`` (an ``mm`` whose FLOPs torch
    counts: ``2·d`` a row forward and ``2·d`` for the weights' gradient)."""

    def nll(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.binary_cross_entropy_with_logits((x @ self.w[:, None])[:, 0], y, reduction="none")


def _forget_mm(x, y, removed, bank: torch.Tensor, steps, **kw) -> tuple[torch.Tensor, dict]:
    """:func:`_forget` on :class:`_LogRegMM`."""
    kw = {"newton_gate": 0, "curvature_draws": 1, **kw}
    un = MCMCUnlearner(_LogRegMM(x.shape[1]), bank=bank.clone(), solver="exact", newton_steps=steps, **kw)
    report = un.forget(removed, RemovableDataset(x, y, batch_size=x.shape[0], seed=0))
    assert report.converged
    return un.bank[0].clone(), report.info


@pytest.mark.filterwarnings("ignore:this request removes")
def test_auto_counts_a_row_draw_gradients_flops_in_closed_form(region) -> None:
    """The further steps' work is counted, not timed: one row-draw gradient of the logits' matrix product is ``4·d``
    FLOPs (``2·d`` forward, ``2·d`` for the weights' gradient; the data need none), and the passes' FLOPs are that
    times their row-draw gradients. The default budget leaves this converging run its steps."""
    x, y, removed, _ = region
    old = _map(x, y)
    _, info = _forget_mm(x, y, removed, old[None], "auto")
    assert info["newton_row_flops"] == 4 * x.shape[1]
    assert info["newton_flops"] == info["newton_row_flops"] * info["newton_row_gradients"]
    assert info["newton_flops"] < U.NEWTON_AUTO_FLOPS
    assert info["newton_stop"].startswith("converged"), info


@pytest.mark.filterwarnings("ignore:this request removes")
def test_auto_stops_at_its_counted_work(region, monkeypatch) -> None:
    """The passes stop before their counted FLOPs would pass ``NEWTON_AUTO_FLOPS`` (a row-draw gradient's cost, which
    the row-draw budget does not see): with room for two and a half passes, the gap's pass and one further step are
    taken, as ``newton_steps=2`` takes them, and the report says why; with room for one and a half, the gap's alone."""
    x, y, removed, keep = region
    old = _map(x, y)
    rows, d = int(keep.sum()), x.shape[1]
    monkeypatch.setattr(U, "NEWTON_AUTO_FLOPS", 2.5 * rows * 4 * d)
    two, _ = _forget_mm(x, y, removed, old[None], 2)
    auto, info = _forget_mm(x, y, removed, old[None], "auto")
    assert info["newton_steps_taken"] == 2 and info["newton_stop"].startswith("work: "), info
    assert info["newton_flops"] == 2 * rows * 4 * d
    assert torch.equal(auto, two)
    monkeypatch.setattr(U, "NEWTON_AUTO_FLOPS", 1.5 * rows * 4 * d)
    one, _ = _forget_mm(x, y, removed, old[None], 1)
    auto, info = _forget_mm(x, y, removed, old[None], "auto")
    assert info["newton_steps_taken"] == 1 and info["newton_stop"].startswith("work: "), info
    assert torch.equal(auto, one)


@pytest.mark.filterwarnings("ignore:this request removes")
def test_the_counted_work_gives_the_same_bank_on_a_loaded_machine(region, monkeypatch) -> None:
    """Where the FLOP budget binds, a CPU clock that runs ever longer between its reads gives the same steps, the
    same stop and the same bank to the bit (stop 67's timed cap did not: its count moved with the machine's load)."""
    x, y, removed, keep = region
    old = _map(x, y)
    monkeypatch.setattr(U, "NEWTON_AUTO_FLOPS", 3.5 * int(keep.sum()) * 4 * x.shape[1])
    idle, info = _forget_mm(x, y, removed, old[None], "auto")
    assert info["newton_steps_taken"] == 3 and info["newton_stop"].startswith("work: "), info
    ticks = iter(range(10**6))
    monkeypatch.setattr(U.time, "process_time", lambda: 1000.0 * next(ticks) ** 2)
    loaded, again = _forget_mm(x, y, removed, old[None], "auto")
    assert (again["newton_steps_taken"], again["newton_stop"]) == (info["newton_steps_taken"], info["newton_stop"])
    assert torch.equal(loaded, idle)


_NO_DYNAMO = r"""
import json, sys
import torch
import mcmc_unlearner.unlearner as U
from mcmc_unlearner import MCMCUnlearner, RemovableDataset

U.CHECK_DIFFERENCE_FROM_DIM = U.LOOP_DRAWS_FROM_DIM = 1  # a large model's path (a ResNet's: no torch.func)


class LogReg(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(d, 1, bias=False, dtype=torch.float64)

    def log_prior(self):
        return -0.5 * (self.lin.weight**2).sum()

    def nll(self, batch):
        x, y = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(self.lin(x)[:, 0], y, reduction="none")


g = torch.Generator().manual_seed(0)
x = torch.randn(300, 3, generator=g, dtype=torch.float64)
p = torch.sigmoid(x @ torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64))
y = (torch.rand(300, generator=g, dtype=torch.float64) < p).double()
removed = torch.nonzero(x[:, 0] > 0.8).flatten()
w = torch.zeros(3, dtype=torch.float64)
for _ in range(50):  # the posterior's mode: a bank at equilibrium (gap 0), so the further steps run
    p = torch.sigmoid(x @ w)
    w = w - torch.linalg.solve(x.T @ (x * (p * (1 - p))[:, None]) + torch.eye(3).double(), x.T @ (p - y) + w)
info = {}
for bank in (w[None], w[None] + 5.0):  # steps taken; not needed (the bank far from equilibrium)
    un = MCMCUnlearner(LogReg(3), bank=bank, solver="kfac", newton_steps="auto", newton_gate=0, curvature_draws=1)
    r = un.forget(removed, RemovableDataset(x, y, batch_size=300, seed=0))
    info[len(info)] = {k: str(v) for k, v in r.info.items() if k.startswith("newton_")}
loaded = sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules)
print(json.dumps({"loaded": loaded, "info": info}))
"""


def test_the_counted_work_imports_neither_dynamo_nor_sympy() -> None:
    """``FlopCounterMode``'s dispatch is wrapped by torch in ``torch._disable_dynamo``, whose first call imports
    ``torch._dynamo`` and sympy (830 modules, 1.1 s CPU), which stop 68 had cut from a large model's first request:
    on that path (no ``torch.func``), a request with ``newton_steps="auto"`` counts its row-draw gradient's FLOPs
    (4·d for this logistic regression, as in closed form) and imports neither; a request whose further steps are not
    needed does not count them at all."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _NO_DYNAMO], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    taken, skipped = got["info"]["0"], got["info"]["1"]
    assert float(taken["newton_row_flops"]) == 4 * 3 and int(taken["newton_steps_taken"]) > 1, got
    assert skipped["newton_stop"].startswith("not needed") and "newton_row_flops" not in skipped, got
    assert got["loaded"] == [], got


def test_the_plain_flop_count_is_flop_counter_modes() -> None:
    """The count that imports nothing (:func:`_count_flops` outside a process that loaded ``torch._dynamo``) counts
    what ``FlopCounterMode`` counts, through ``vmap(grad(...))`` and autograd, on a convolution and an MLP, and
    through autograd on a GRU."""
    from torch.func import functional_call, grad, vmap
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    models = [
        (torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 1)),
         torch.randn(5, 1, 8, 8)),
        (torch.nn.GRU(3, 8, num_layers=2, batch_first=True), torch.randn(5, 10, 3)),
        (torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)), torch.randn(5, 2)),
    ]  # fmt: skip
    for model, x in models:
        params = {k: v.detach() for k, v in model.named_parameters()}

        def f(p, x, model=model):
            out = functional_call(model, p, (x,))
            return (out[0] if isinstance(out, tuple) else out).pow(2).sum()

        def run(f=f, params=params, x=x, model=model):
            if isinstance(model, torch.nn.GRU):  # (its functional call under vmap is not batched by torch)
                model(x)[0].sum().backward()
            else:
                vmap(grad(f), in_dims=(None, 0))(params, x[:, None])
                model(x).sum().backward()

        with FlopCounterMode(display=False) as counter:
            run()
        plain = U._count_flops(run, plain=True)
        assert plain == counter.get_total_flops() > 0, (type(model).__name__, plain, counter.get_total_flops())


class _LogRegMMPrior(_LogRegMM):
    """:class:`_LogRegMM` whose N(0, 1) prior is taken through matrix products (``D`` copies of ``w`` times the
    identity): FLOPs a draw costs once, whatever its rows."""

    def __init__(self, d: int, copies: int) -> None:
        super().__init__(d)
        self.register_buffer("eye", torch.eye(d, dtype=torch.float64))
        self.copies = copies

    def log_prior(self) -> torch.Tensor:
        w = self.w[None].expand(self.copies, -1)
        return -0.5 * ((w @ self.eye) * w).sum() / self.copies


@pytest.mark.filterwarnings("ignore:this request removes")
def test_a_priors_flops_are_counted_once_a_draw_not_once_a_row(region) -> None:
    """A prior's matrix products run once a draw in a pass, not once a row: the count on 16 rows divided by 16 read
    them as a row's (a 1,000-copy prior: 2,262 FLOPs a row-draw gradient for the rows' 12, a pass counted 13x its
    FLOPs). A row's FLOPs are the closed form's ``4·d`` and a draw's its prior's, as ``FlopCounterMode`` counts that
    prior's gradient alone; the passes' FLOPs are both, and the bank is the one without a matrix-product prior."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y, removed, keep = region
    old, d = _map(x, y), x.shape[1]
    model = _LogRegMMPrior(d, 1000)
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(model.log_prior(), model.w)
    prior = counter.get_total_flops()
    assert prior > 1000 * d
    kw = {"newton_gate": 0, "curvature_draws": 1}
    un = MCMCUnlearner(model, bank=old[None].clone(), solver="exact", newton_steps="auto", **kw)
    info = un.forget(removed, RemovableDataset(x, y, batch_size=x.shape[0], seed=0)).info
    assert info["newton_row_flops"] == 4 * d, info
    assert info["newton_draw_flops"] == prior, info
    passes = info["newton_row_gradients"] // int(keep.sum())
    assert info["newton_flops"] == passes * (int(keep.sum()) * 4 * d + prior), info
    plain, _ = _forget_mm(x, y, removed, old[None], "auto")
    assert torch.allclose(un.bank[0], plain, rtol=0, atol=1e-12)
