"""``newton_gate`` (on by default): ``newton_steps=1`` takes ``"auto"``'s further steps where the damping search's
least-damped trial raised the energy the quadratic model said it would lower (the removal is far outside the
model's reach) *and* a sampled estimate of the bank's gap to equilibrium is clearly below
``NEWTON_AUTO_BANK_GAP·‖G‖``; elsewhere the request is the influence step's to the bit.

The far removal: a pseudo-Huber linear regression whose removed rows are the majority, fitted by another line, so
the old mode sits where the kept rows' loss is flat (its curvature far below the curvature on the way to the new
mode) and the undamped step overshoots; the modes are found in float64 by damped Newton."""

from __future__ import annotations

import math

import pytest
import torch

import mcmc_unlearner.unlearner as U
from mcmc_unlearner import MCMCUnlearner, RemovableDataset
from mcmc_unlearner.step import DampingControl
from test_newton_auto import _forget, _map, region  # noqa: F401 (a fixture)

pytestmark = [
    pytest.mark.filterwarnings("ignore:this request removes"),  # a large removal, on purpose
    pytest.mark.filterwarnings("ignore:the bank holds one sample"),  # the modes' one-sample banks, on purpose
]

_DELTA = 0.1  # the pseudo-Huber loss's width


_CAUCHY = 0.5  # the Cauchy loss's width


class _Line(torch.nn.Module):
    """A line's two weights (float64), prior N(0, 1); the loss is the subclass's ``nll``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def log_prior(self) -> torch.Tensor:
        return -0.5 * (self.w**2).sum()


class _Cauchy(_Line):
    """Linear regression with the Cauchy loss ``log(1 + (r/δ)²)`` (its curvature negative beyond ``|r| = δ``),
    prior N(0, 1)."""

    def nll(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return torch.log1p(((y - x @ self.w) / _CAUCHY) ** 2)


class _Huber(_Line):
    """Linear regression with the pseudo-Huber loss ``δ²(√(1 + (r/δ)²) − 1)``, prior N(0, 1)."""

    def nll(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return _DELTA**2 * (torch.sqrt(1 + ((y - x @ self.w) / _DELTA) ** 2) - 1)


def _energy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _DELTA**2 * (torch.sqrt(1 + ((y - x @ w) / _DELTA) ** 2) - 1).sum() + 0.5 * (w**2).sum()


def _hessian(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.hessian(lambda v: _energy(x, y, v), w)


def _cauchy_energy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.log1p(((y - x @ w) / _CAUCHY) ** 2).sum() + 0.5 * (w**2).sum()


def _mode(x: torch.Tensor, y: torch.Tensor, energy=_energy, start: torch.Tensor | None = None) -> torch.Tensor:
    """The posterior's mode by Newton's method with backtracking, its Hessian shifted to 1.5 times its most negative
    eigenvalue where indefinite (float64, to machine precision: at most 200 steps)."""
    w = torch.zeros(2, dtype=torch.float64) if start is None else start.clone()
    for _ in range(200):
        grad = torch.autograd.functional.jacobian(lambda v: energy(x, y, v), w)
        hess = torch.autograd.functional.hessian(lambda v: energy(x, y, v), w)
        shift = max(0.0, -1.5 * float(torch.linalg.eigvalsh(hess)[0]))
        step, t = torch.linalg.solve(hess + shift * torch.eye(2, dtype=w.dtype), grad), 1.0
        while energy(x, y, w - t * step) > energy(x, y, w) and t > 1e-12:
            t /= 2
        w = w - t * step
        if float(step.norm()) < 1e-14:  # converged: further steps change nothing
            break
    return w


@pytest.fixture(scope="module")
def far():
    """100 kept rows on one line, 150 removed rows on another: the old mode is near the removed rows' line."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(250, 2, generator=g, dtype=torch.float64)
    w_kept, w_removed = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([-1.0, 1.5], dtype=torch.float64)
    y = torch.cat([x[:100] @ w_kept, x[100:] @ w_removed]) + 0.05 * torch.randn(250, generator=g, dtype=torch.float64)
    removed = torch.arange(100, 250)
    return x, y, removed, _mode(x, y), _mode(x[:100], y[:100])


def _forget_far(far, bank: torch.Tensor, steps, model=_Huber, **kw) -> tuple[torch.Tensor, dict]:
    x, y, removed, _, _ = far
    kw = {"curvature_draws": 1, **kw}
    un = MCMCUnlearner(model(), bank=bank.clone(), solver="exact", newton_steps=steps, **kw)
    report = un.forget(removed, RemovableDataset(x, y, batch_size=x.shape[0], seed=0))
    assert report.converged
    return un.bank[0].clone(), report.info


def _trial(info: dict) -> tuple[float, float]:
    """The least-damped trial's (damping, ratio) from ``info["damping_history"]`` (``shape damping:ratio;...``)."""
    trials = [t.split(" ")[1].split(":") for t in info["damping_history"].split(";")]
    low = min(trials, key=lambda t: float(t[0]))
    return float(low[0]), float(low[1])


def test_the_default_takes_further_steps_where_the_undamped_step_overshoots_and_lands_on_the_new_mode(far) -> None:
    """A bank at the old mode (gap 0) whose undamped step raises the energy: the gate fires, and the default
    request reaches the exact new mode that the influence step alone (the gate off, as before) misses by 20%."""
    _, _, _, old, new = far
    one, info1 = _forget_far(far, old[None], 1, newton_gate=0)
    gated, info = _forget_far(far, old[None], 1)
    assert _trial(info1)[0] == 0 and _trial(info1)[1] < 0  # the undamped step raised the energy
    err1 = float((one - new).norm() / (new - old).norm())
    assert err1 > 0.1
    assert info["newton_gate"].startswith("fired"), info
    assert info["newton_steps_taken"] >= 2
    assert float((gated - new).norm() / (new - old).norm()) < 1e-3
    auto, _ = _forget_far(far, old[None], "auto")
    assert torch.equal(gated, auto)  # "auto"'s steps, to the bit


def test_an_indefinite_curvature_counts_as_the_signal_and_the_default_lands_on_the_new_mode(far) -> None:
    """The far removal under the Cauchy loss: at the old mode the kept rows' residuals lie beyond the loss's width,
    so the remaining data's Hessian is indefinite and no undamped step exists; the search's least damped trial sits
    just above its most negative eigenvalue, and raised the energy by less than its predicted fall. That trial said
    nothing about an undamped step, yet the gate read it as its signal and never estimated (stop 66: one step 63%
    short of the new mode); now the estimate decides (gap 0: fired) and the default lands on the mode as "auto"."""
    x, y, removed, _, _ = far
    old = _mode(x, y, _cauchy_energy, torch.tensor([-1.0, 1.5], dtype=torch.float64))
    new = _mode(x[:100], y[:100], _cauchy_energy, old)
    kept = torch.autograd.functional.hessian(lambda v: _cauchy_energy(x[:100], y[:100], v), old)
    assert float(torch.linalg.eigvalsh(kept)[0]) < 0  # indefinite where the request starts
    one, info1 = _forget_far(far, old[None], 1, _Cauchy, newton_gate=0)
    gated, info = _forget_far(far, old[None], 1, _Cauchy)
    low_damping, low_ratio = _trial(info1)
    assert low_damping > 0 and -1 < low_ratio < 0  # rose, but less than predicted to fall: not the old signal
    assert float((one - new).norm() / (new - old).norm()) > 0.3
    assert info.get("newton_gate_signal", "").startswith("the curvature is indefinite"), info
    assert info["newton_gate"].startswith("fired"), info
    assert float((gated - new).norm() / (new - old).norm()) < 1e-3
    auto, _ = _forget_far(far, old[None], "auto", _Cauchy)
    assert torch.equal(gated, auto)  # "auto"'s steps, to the bit
    un = MCMCUnlearner(_Cauchy(), bank=old[None].clone(), solver="exact", curvature_draws=1, check_rows=50)
    batches = iter([(x[i : i + 25], y[i : i + 25]) for i in range(0, 100, 25)] * 1000)
    streamed = un.remove((x[removed], y[removed]), batches, n_remaining=100).info
    # through a plain iterator the signal starts the sampled estimate too (stop 66's iterator gate): the rows read
    # stand for the remaining rows, and a gap of 0 fires there as well
    assert streamed.get("newton_gate_signal", "").startswith("the curvature is indefinite"), streamed
    assert streamed["newton_gate"].startswith("fired") and "sampled from the stream" in streamed["newton_gate"]
    assert float((un.bank[0] - new).norm() / (new - old).norm()) < float((one - new).norm() / (new - old).norm())


class _Twin(_Huber):
    """The pseudo-Huber regression on three inputs, the third a copy of the first, the prior N(0, 1) on the second
    weight only: the Hessian is positive semi-definite with an exact zero eigenvalue (along ``(1, 0, −1)``) that
    rounding leaves at or just below zero."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def log_prior(self) -> torch.Tensor:
        return -0.5 * self.w[1] ** 2


def test_a_positive_semidefinite_curvature_is_not_read_as_indefinite(far) -> None:
    """A zero eigenvalue that rounding puts at or below zero makes the damping search start above 0 (no damping is
    solvable below the eigendecomposition's rounding level), as an indefinite one does; but the curvature is not
    indefinite, and the least-damped trial (10⁻⁶ of the largest eigenvalue) is the undamped step along every
    direction the removal moves. The signal stays the undamped step's: not "the curvature is indefinite" (which it
    read before, firing the estimate)."""
    x, y, removed, old, _ = far
    x3 = torch.cat([x, x[:, :1]], 1)
    bank = torch.cat([old, torch.zeros(1, dtype=old.dtype)])[None]
    un = MCMCUnlearner(_Twin(), bank=bank, solver="exact", newton_steps=1, curvature_draws=1)
    info = un.forget(removed, RemovableDataset(x3, y, batch_size=x.shape[0], seed=0)).info
    w = un.curvature._eig[0]
    assert float(w[0]) <= un.curvature._eig_floor() and un.curvature.min_damping() > 0  # the search starts above 0
    assert float(w[0]) > -1e-9 * float(w[-1])  # at the rounding level: not a negative curvature
    assert _trial(info)[0] <= 1.5 * un.curvature.min_damping() * (1 + 1e-9)  # its least-damped trial at that floor
    assert not info.get("newton_gate_signal", "").startswith("the curvature is indefinite"), info
    assert un.curvature.clear_negative_eigenvalue() == 0


def test_the_default_is_the_influence_step_where_the_quadratic_model_holds(region) -> None:  # noqa: F811
    """The logistic region removal: one step is 2% short, but its undamped step measured what the model predicted,
    so no gap estimate is made (the conjugate case's exact step likewise) and the bank is the influence step's."""
    x, y, removed, _ = region
    old = _map(x, y)
    one, _ = _forget(x, y, removed, old[None], 1)
    gated, info = _forget(x, y, removed, old[None], 1, newton_gate=U.NEWTON_GATE_Z)
    assert info["newton_gate"].startswith("not fired: the least-damped trial"), info
    assert "newton_row_gradients" not in info and "newton_gate_cpu_seconds" not in info  # no estimate made
    assert torch.equal(gated, one)


def test_the_default_is_the_influence_step_where_the_banks_own_gap_dominates(far) -> None:
    """A bank off the old mode (its gap, in closed form, above twice the threshold) whose undamped step overshoots
    too: the estimate (one draw: every group's is the exact gap) says so, not fired, the influence step's bank."""
    x, y, _, old, _ = far
    bank = (old + torch.tensor([0.0, -0.4], dtype=torch.float64))[None]
    wv = bank[0].clone().requires_grad_(True)
    e0 = torch.autograd.grad(_energy(x, y, wv), wv)[0]  # the old posterior's: zero at its mode
    G = torch.autograd.grad(_energy(x[100:], y[100:], wv) - 0.5 * (wv**2).sum(), wv)[0]
    gap = float(e0.norm() / G.norm())
    assert gap > 2 * U.NEWTON_AUTO_BANK_GAP
    one, _ = _forget_far(far, bank, 1, newton_gate=0)
    gated, info = _forget_far(far, bank, 1)
    assert info["newton_gate"].startswith("not fired: the bank's gap"), info
    est = float(info["newton_gate"].split("= ")[1].split(" ")[0])
    assert est == pytest.approx(gap**2, rel=1e-3)
    assert info.get("newton_steps_taken", 1) == 1
    assert torch.equal(gated, one)


def _draws(far, batches: int | None):
    """The far removal's 100 remaining rows as a plain iterator of minibatches of 25 rows, reshuffled every pass
    (``batches`` of them, ``None``: endless; a seeded generator)."""
    x, y, _, _, _ = far
    g, k = torch.Generator().manual_seed(7), 0
    while batches is None or k < batches:
        order = torch.randperm(100, generator=g)
        for i in order.view(4, 25)[: None if batches is None else batches - k]:
            yield x[i], y[i]
        k += 4


def _iterator_unlearner(far, bank: torch.Tensor, **kw) -> MCMCUnlearner:
    """The far removal's unlearner for a request through :func:`_draws`, the check holding half of its rows."""
    kw = {"curvature_draws": 1, "check_rows": 50, **kw}
    return MCMCUnlearner(_Huber(), bank=bank.clone(), solver="exact", **kw)


def _from_iterator(far, bank: torch.Tensor, batches: int | None, **kw) -> tuple[torch.Tensor, dict]:
    """The far removal through :func:`_draws` (``batches`` minibatches, ``None``: endless): the bank after, and
    the report's info."""
    x, y, removed, _, _ = far
    un = _iterator_unlearner(far, bank, **kw)
    report = un.remove((x[removed], y[removed]), _draws(far, batches), n_remaining=100)
    return un.bank.clone(), report.info


def test_an_endless_iterator_is_sampled_and_its_steps_land_near_the_new_mode(far, monkeypatch) -> None:
    """Rows that cannot be listed: the estimate reads ``NEWTON_GATE_STREAM_PASSES·n`` rows from the stream as a
    with-replacement sample (here an iterator reshuffling every pass; the exact gap at the old mode is 0: the
    estimate lies within three of its standard errors), fires, and the further steps on the sample land ten times
    closer to the new mode than the influence step alone (the gate off), which misses it by 20%. (Since stop 68 the
    steps read the sample's distinct rows where they are every remaining row, as here: the sample's own rows, the
    path of a stream whose distinct rows are not ``n``, are forced by finding no distinct rows.)"""
    _, _, _, old, new = far
    monkeypatch.setattr(U, "_distinct_rows", lambda rows: None)
    gated, info = _from_iterator(far, old[None], None)
    off, info_off = _from_iterator(far, old[None], None, newton_gate=0)
    assert (
        info["newton_gate"].startswith("fired") and "of 800 sampled from the stream for 100 rows" in info["newton_gate"]
    )
    est, se = (float(v) for v in info["newton_gate"].split("= ")[1].split(" ·")[0].split(" ± "))
    assert abs(est) < 3 * se, (est, se)
    assert info["newton_steps_taken"] >= 2 and info["newton_data"].startswith("100 rows sampled from the stream")
    err, err_off = (float((b[0] - new).norm() / (new - old).norm()) for b in (gated, off))
    assert err_off > 0.1 and err < 0.1 * err_off, (err, err_off)
    assert "newton_gate" not in info_off


def test_an_iterators_estimate_takes_its_draws_from_the_bank_once(far, monkeypatch) -> None:
    """The sampled estimate's draws (``_gap_points``: a copy of the bank's rows, 98 MB on the quick ResNet) are
    taken once by the gate and handed to ``_gap_sample`` (it took them again, stop 70), and once more by the further
    steps where it fires: two calls for a request that fires on an endless iterator, not three."""
    _, _, _, old, _ = far
    calls = []
    real = U.MCMCUnlearner._gap_points
    monkeypatch.setattr(U.MCMCUnlearner, "_gap_points", lambda self, *a: calls.append(a[1]) or real(self, *a))
    _, info = _from_iterator(far, old[None], None)
    assert info["newton_gate"].startswith("fired") and "sampled from the stream" in info["newton_gate"]
    assert info["newton_steps_taken"] >= 2
    assert calls == [100, 100], calls


def test_an_endless_iterators_steps_read_every_remaining_row_and_land_on_the_new_mode(far) -> None:
    """The reshuffling iterator's ``8·n`` rows hold each of the ``n`` remaining rows: the further steps read those
    ``n`` distinct rows once each (no control variate), as listed rows, and land on the new mode (the float64 closed
    form by Newton's method) to 1e-4 of the way there; on ``n`` rows of the sample (before stop 68) they missed it by
    1.4%, the sample's own mode."""
    _, _, _, old, new = far
    gated, info = _from_iterator(far, old[None], None)
    assert (
        info["newton_gate"].startswith("fired") and "of 800 sampled from the stream for 100 rows" in info["newton_gate"]
    )
    assert info["newton_data"].startswith("all 100 remaining rows (the distinct rows of the gate's sample"), info
    assert info["newton_stop"].startswith("converged"), info["newton_stop"]
    err = float((gated[0] - new).norm() / (new - old).norm())
    assert err < 1e-4, err


def test_a_stream_whose_distinct_rows_are_not_every_row_keeps_the_samples_rows(far) -> None:
    """The remaining rows holding one row twice (row 1 a copy of row 0: 99 distinct of 100): the sample's distinct
    rows are not every remaining row, and the further steps read ``n`` of the sample with its control variate."""
    x, y, removed, old, _ = far
    xr, yr = x[:100].clone(), y[:100].clone()
    xr[1], yr[1] = xr[0], yr[0]

    def draws():
        g = torch.Generator().manual_seed(7)
        while True:
            for i in torch.randperm(100, generator=g).view(4, 25):
                yield xr[i], yr[i]

    un = _iterator_unlearner(far, old[None])
    info = un.remove((x[removed], y[removed]), draws(), n_remaining=100).info
    assert info["newton_gate"].startswith("fired"), info
    assert info["newton_data"].startswith("100 rows sampled from the stream (scaled to 100)"), info


def test_distinct_rows_are_exact_and_in_the_order_they_first_appear() -> None:
    """Rows equal byte for byte in every tensor are one row (a label, an image, a float and an integer tensor);
    ``-0.0`` and ``0.0`` differ in a byte and are two; rows wider than one hashed part (2¹⁴ bytes) too; the first
    copy of each, in order."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 2, generator=g), torch.arange(6)
    pick = torch.tensor([4, 1, 4, 0, 5, 1, 1, 2, 0, 4])
    assert U._distinct_rows((x[pick], y[pick])).tolist() == [0, 1, 3, 4, 7]
    y2 = y[pick].clone()
    y2[2] = 9  # the same image, another label: another row
    assert U._distinct_rows((x[pick], y2)).tolist() == [0, 1, 2, 3, 4, 7]
    assert U._distinct_rows((torch.tensor([0.0, -0.0, 0.0]),)).tolist() == [0, 1]
    wide = torch.randn(3, 5000, generator=g, dtype=torch.float64)  # 40 kB a row: three hashed parts
    again = wide[[0, 1, 0, 2, 1]].clone()
    again[4, -1] += 1.0  # differs only in its last part
    assert U._distinct_rows((again,)).tolist() == [0, 1, 3, 4]
    assert U._distinct_rows((torch.zeros(3, 0), torch.arange(3))) is None  # rows of no bytes: nothing claimed


def test_hash_groups_are_torch_uniques_and_the_hash_order_depends_on_the_rows_alone(monkeypatch) -> None:
    """:func:`_hash_groups` (two stable sorts, stop 70) gives ``torch.unique(h, dim=0, return_inverse=True)``'s
    groups, ties in either column included, one row and all rows equal too; :func:`_hash_order` puts the same
    distinct rows given in any order in one order, and where two different rows share a hash pair it claims
    nothing: :func:`_distinct_rows` answers ``None`` (the rows are compared, not only their hashes) and
    :func:`_hash_order` gives the rows as given (stop 70's review)."""
    g = torch.Generator().manual_seed(0)
    for case in range(200):
        m = int(torch.randint(1, 40, (1,), generator=g))
        h = torch.randint(0, 3, (m, 2), generator=g).double() * 2.0**40
        if case % 4 == 0:
            h[:, 0] = 7.0  # the first column tied throughout
        assert torch.equal(U._hash_groups(h), torch.unique(h, dim=0, return_inverse=True)[1]), h
    x, y = torch.randn(7, 3, generator=g), torch.arange(7) % 3
    first = U._hash_order((x, y))
    for _ in range(3):
        p = torch.randperm(7, generator=g)
        assert all(torch.equal(a, b) for a, b in zip(U._hash_order((x[p], y[p])), first))
    real = U._row_hashes
    monkeypatch.setattr(U, "_row_hashes", lambda rows: (torch.zeros_like(real(rows)[0]), *real(rows)[1:]))
    assert U._distinct_rows((x[[0, 1, 0]], y[[0, 1, 0]])) is None  # a shared hash: nothing claimed
    shared = U._hash_order((x, y))
    assert torch.equal(shared[0], x) and torch.equal(shared[1], y)


def test_an_iterators_estimate_finds_the_closed_form_gap(far) -> None:
    """The bank off the old mode (its gap in closed form above twice the threshold) through the iterator: the sampled
    estimate is within three of its standard errors of the exact ``‖e₀‖²``, not fired, the gate-off bank."""
    x, y, _, old, _ = far
    bank = (old + torch.tensor([0.0, -0.4], dtype=torch.float64))[None]
    wv = bank[0].clone().requires_grad_(True)
    e0 = torch.autograd.grad(_energy(x, y, wv), wv)[0]
    G = torch.autograd.grad(_energy(x[100:], y[100:], wv) - 0.5 * (wv**2).sum(), wv)[0]
    gap2 = float(e0.norm() / G.norm()) ** 2
    gated, info = _from_iterator(far, bank, None)
    off, _ = _from_iterator(far, bank, None, newton_gate=0)
    assert info["newton_gate"].startswith("not fired: the bank's gap"), info
    est, se = (float(v) for v in info["newton_gate"].split("= ")[1].split(" ·")[0].split(" ± "))
    assert se > 0 and abs(est - gap2) < 3 * se, (est, se, gap2)
    assert torch.equal(gated, off)


def test_a_one_pass_iterator_that_runs_out_gets_the_influence_step_and_says_why(far) -> None:
    """Twelve minibatches: enough for the request, not for the estimate's sample. No error: the gate says the
    iterator ran out, and the bank is the gate-off one on the same minibatches."""
    _, _, _, old, _ = far
    gated, info = _from_iterator(far, old[None], 12)
    off, _ = _from_iterator(far, old[None], 12, newton_gate=0)
    assert info["newton_gate"].startswith("not fired: the undamped step overshot, but the remaining-data iterator ran")
    assert "newton_gate_cpu_seconds" not in info
    assert torch.equal(gated, off)


def test_a_one_pass_iterator_the_gate_spent_is_refused_at_the_next_request_naming_why(far) -> None:
    """The twelve minibatches again: the gate's sample reads them to the end, and a second request through the same
    iterator finds none. It is refused saying the iterator was read to the end before it (by the gate's sample) and
    how to pass the data instead (it said only that the iterator "ran out"); the bank and the model are unchanged."""
    x, y, removed, old, _ = far
    un, source = _iterator_unlearner(far, old[None]), _draws(far, 12)
    first = un.remove((x[removed], y[removed]), source, n_remaining=100)
    assert "the remaining-data iterator ran out before" in first.info["newton_gate"], first.info
    bank, weights, history, state = (
        un.bank.clone(),
        un.model.w.detach().clone(),
        len(un.history),
        un.generator.get_state(),
    )
    with pytest.raises(
        ValueError, match="gave no minibatch: it is empty, or was read to the end before this request"
    ) as err:
        un.remove((x[:5], y[:5]), source, n_remaining=95)
    assert "newton_gate" in str(err.value) and "a new iterator over the remaining data" in str(err.value)
    assert str(err.value).endswith("nothing was changed")
    assert torch.equal(un.bank, bank) and torch.equal(un.model.w, weights) and len(un.history) == history
    assert torch.equal(un.generator.get_state(), state)


def test_an_iterator_that_gave_only_minibatches_put_back_is_not_said_to_have_given_none(far, monkeypatch) -> None:
    """A request refused after its read-ahead leaves those minibatches to the next request through the same plain
    iterator (put back); the iterator held no more. The next request, reading more check rows, reads the four put
    back and then finds the iterator at its end: it ran out in this request, after giving it minibatches. It was
    told the iterator "gave no minibatch: it is empty, or was read to the end before this request (an earlier
    request's newton_gate ...); nothing was changed" (stop 67's review), where the four it was given are gone."""
    x, y, removed, old, _ = far
    un, source = _iterator_unlearner(far, old[None]), _draws(far, 4)  # 4: what the request reads ahead

    def refused(*_):
        raise ValueError("refused after the read-ahead (a stand-in); nothing was changed")

    with monkeypatch.context() as m:
        m.setattr(MCMCUnlearner, "_grad_draw_count", refused)
        with pytest.raises(ValueError, match="a stand-in"):
            un.remove((x[removed], y[removed]), source, n_remaining=100)
    assert un._held_first is not None and len(un._held_first[1]) == 4  # all four kept for the next request
    un.check_rows = 100  # two more minibatches than the iterator holds
    with pytest.raises(ValueError, match="the remaining-data iterator ran out") as err:
        un.remove((x[removed], y[removed]), source, n_remaining=100)
    assert "gave no minibatch" not in str(err.value) and "nothing was changed" not in str(err.value)


def test_a_sampled_bank_estimates_the_full_passs_gap_within_its_error(far) -> None:
    """256 draws of the old posterior's Laplace approximation (not its equilibrium: the posterior is far from
    Gaussian): the first look (a quarter of each group, 2 draws) neither fires nor rules firing out, and the whole
    groups at every draw estimate ``‖e₀‖²`` within three standard errors of ``"auto"``'s pass over every row (gap
    0.76: not fired); 256 draws of a tenfold narrower one (gap 0.006) fire at the first look."""
    x, y, _, old, _ = far
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    root = torch.linalg.cholesky(torch.linalg.inv(_hessian(x, y, old))).T
    kw = {"curvature_draws": 8, "grad_draws": 256}
    _, info = _forget_far(far, old + z @ root, 1, **kw)
    _, auto = _forget_far(far, old + z @ root, "auto", newton_gate=0, **kw)
    assert info["newton_gate"].startswith("not fired") and " on 16 of 100 rows" in info["newton_gate"], info
    est, se = (float(v) for v in info["newton_gate"].split("= ")[1].split(" ·")[0].split(" ± "))
    assert se > 0
    assert abs(est - auto["newton_bank_gap"] ** 2) < 3 * se, (est, se, auto["newton_bank_gap"])
    _, narrow = _forget_far(far, old + 0.1 * z @ root, 1, **kw)
    assert narrow["newton_gate"].startswith("fired") and " on 8 of 100 rows" in narrow["newton_gate"], narrow


def test_newton_gate_is_validated() -> None:
    model = torch.nn.Linear(2, 1)
    bank = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    for bad in (-1, float("nan"), "3"):
        with pytest.raises(ValueError, match="newton_gate must be a number >= 0"):
            U.MCMCUnlearner(model, nll=lambda m, b: m(b[0]).squeeze(-1) ** 2, bank=bank, newton_gate=bad)
    assert U.MCMCUnlearner(model, nll=lambda m, b: m(b[0]).squeeze(-1), bank=bank, newton_gate=None).newton_gate == 0


@pytest.mark.parametrize("mean", [0.0, 0.3])
def test_the_gap_estimate_is_exact_where_the_groups_cover_every_row(mean: float) -> None:
    """Disjoint groups are anticorrelated; the finite-population term must take back exactly that: where the
    ``B`` groups of ``per`` rows cover all ``rows``, every grouping's estimate is ``‖e₀‖²`` itself (the rows' mean,
    here ``mean`` in each of 3 coordinates). The term was ``per/(rows − per)`` of the spread (a group's variance
    alone, not its difference from the anticorrelated covariance): above a zero gap here, and biased upward by
    ``per/(rows − per)`` of the correction wherever the groups are drawn."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    x = x - x.mean(0) + mean
    for _ in range(5):
        us = x[torch.randperm(16, generator=g)].reshape(8, 2, 3).mean(1)
        est, _ = U._gap_estimate(us, 2, 16)
        assert est == pytest.approx(3 * mean**2, abs=1e-12)


@pytest.mark.parametrize("cap", [150, 50])
def test_no_estimate_where_two_draws_on_every_row_exceed_the_cap(far, monkeypatch, cap: int) -> None:
    """Where two draws' gradients on every remaining row exceed ``NEWTON_ROW_DRAWS`` (here lowered: 100 rows, room
    for one draw or none), ``"auto"`` skips its steps; the gate makes no estimate either and says why, the bank the
    gate-off one. The estimate was made on one draw (fired, then no step: CPU spent for nothing) or on none (a
    ZeroDivisionError in a default request, over 2¹⁸ remaining rows)."""
    x, y, _, old, _ = far
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bank = old + 0.1 * z @ torch.linalg.cholesky(torch.linalg.inv(_hessian(x, y, old))).T  # fires at the full cap
    monkeypatch.setattr(U, "NEWTON_ROW_DRAWS", cap)
    kw = {"curvature_draws": 8, "grad_draws": 256}
    gated, info = _forget_far(far, bank, 1, **kw)
    off, _ = _forget_far(far, bank, 1, newton_gate=0, **kw)
    assert info["newton_gate"].startswith("not fired: the undamped step overshot, but the gradient on all 100"), info
    assert "newton_gate_cpu_seconds" not in info and info.get("newton_steps_taken", 1) == 1
    assert torch.equal(gated, off)


def test_a_gate_that_estimates_and_does_not_fire_leaves_the_sequence_as_the_gate_off(far) -> None:
    """A 64-sample bank off the old mode: the first request's undamped step overshoots, the gap is estimated (the
    whole groups) and found large; that request, the next one (its damping search and draws from the same data
    stream) and everything the unlearner carries between them (damping state, carried deficit), and the global
    generator, are the gate-off run's to the bit: the estimate draws from its own generator and changes no state."""
    x, y, _, old, _ = far
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    root = torch.linalg.cholesky(torch.linalg.inv(_hessian(x, y, old))).T
    bank = old + torch.tensor([0.0, -0.4], dtype=torch.float64) + 0.3 * z @ root

    def run(**kw) -> tuple:
        torch.manual_seed(5)
        un = MCMCUnlearner(_Huber(), bank=bank.clone(), solver="exact", curvature_draws=8, grad_draws=32, **kw)
        data = RemovableDataset(x, y, batch_size=x.shape[0], seed=0)
        first = un.forget(torch.arange(100, 250), data).info
        un.forget(torch.arange(0, 10), data)
        return un.bank.clone(), first, torch.random.get_rng_state(), un.control.state(), un._carry

    gated, off = run(), run(newton_gate=0)
    assert (
        gated[1]["newton_gate"].startswith("not fired: the bank's gap") and " on 16 of 100" in gated[1]["newton_gate"]
    )
    assert "newton_gate" not in off[1]
    assert torch.equal(gated[0], off[0]) and torch.equal(gated[2], off[2]) and gated[3] == off[3]
    assert (gated[4] is None and off[4] is None) or torch.equal(gated[4], off[4])


def test_after_a_retry_without_the_carry_the_gate_reads_the_retrys_own_trials(monkeypatch) -> None:
    """A carried deficit the bank contradicts (``test_slope_check``'s conjugate regression, the carry 1.1 times the
    request's ``G`` against it): the search with the carry is refused and the retry without it takes the request's
    own step. The gate judges the step taken: its verdict quotes the retry's undamped trial (``G·x`` the request's
    own), not the refused search's, whose trials come first in the history (it quoted -0.2453 measured against
    -0.2377 predicted, the carried step's, where the step taken measured -23.08 against -22.43)."""
    from test_slope_check import BayesianLinearRegression, _pulled

    x, y, removed, bank, m_all, m_kept, _, H_r = _pulled()
    un = MCMCUnlearner(BayesianLinearRegression(3), bank=bank.clone())
    un._carry = (-1.1 * H_r @ (m_kept - m_all)).float()
    report = un.forget(removed, RemovableDataset(x.float(), y.float(), batch_size=50, seed=0))
    assert report.info["carry_dropped"]["accepted"]
    trials = report.info["trials"]
    retry = trials[-1]  # the retry: one undamped trial, accepted
    assert trials[0]["damping"] == retry["damping"] == 0 and trials[0]["gx"] < 0.1 * retry["gx"]
    assert report.info["newton_gate"] == (
        f"not fired: the least-damped trial (damping 0) measured {retry['actual']:.4g} ± {retry['stderr']:.2g} "
        f"against {retry['predicted']:.4g} predicted"
    )


def test_no_estimate_where_it_would_not_fit_the_memory_budget(far) -> None:
    """The estimate's memory (a pass of rows' activations twice and the draws' gradients) is checked against
    ``memory_budget`` before any row is listed: under a budget it would not fit, the far removal's overshooting step
    is the influence step alone (the gate off's bank, to the bit) and the report says why (stop 65's CI: a K-FAC
    request under a 16 MB budget peaked at 19.7 MB with the gate's estimate)."""
    _, _, _, old, _ = far
    budget = U._gap_gate_bytes(old[None]) - 1  # one draw: the estimate needs one byte more than the budget
    gated, info = _forget_far(far, old[None], 1, memory_budget=budget)
    off, _ = _forget_far(far, old[None], 1, memory_budget=budget, newton_gate=0)
    assert info["newton_gate"].startswith("not fired: the undamped step overshot, but the estimate's"), info
    assert "over the memory budget" in info["newton_gate"] and "newton_gate_cpu_seconds" not in info
    assert torch.equal(gated, off)
    _, info_fits = _forget_far(far, old[None], 1, memory_budget=budget + 1)
    assert info_fits["newton_gate"].startswith("fired"), info_fits


def test_distributed_unlearner_refuses_the_gate_by_name_and_says_why_it_is_off(far) -> None:
    """``DistributedUnlearner`` cannot list every remaining row for the gate's estimate: ``newton_gate=3`` given by
    name is refused naming the fix (it was set to 0 without a word); not given (or 0, None) it is off, and on the far
    removal, where one process's default fires, the report says why and the bank is the gate-off one's."""
    from mcmc_unlearner.distributed import DistributedUnlearner, ShardedDataset

    x, y, removed, old, _ = far
    for given in (3, 0.5, U.NEWTON_GATE_Z):
        with pytest.raises(ValueError, match=rf"does not support newton_gate={given:g}.*pass newton_gate=0"):
            DistributedUnlearner(_Huber(), bank=old[None].clone(), newton_gate=given)
    for kw in ({}, {"newton_gate": 0}, {"newton_gate": None}):
        un = DistributedUnlearner(_Huber(), bank=old[None].clone(), solver="exact", curvature_draws=1, **kw)
        assert un.newton_gate == 0 and un.config()["newton_gate"] == 0
    shard = ShardedDataset.from_removable(RemovableDataset(x, y, batch_size=x.shape[0], seed=0), 0, 1)
    report = un.forget(removed, shard)
    assert report.info["newton_gate"] == "off: not under DistributedUnlearner (a shard cannot list every remaining row)"
    _, single = _forget_far(far, old[None], 1)
    assert single["newton_gate"].startswith("fired"), single
    off, _ = _forget_far(far, old[None], 1, newton_gate=0)
    assert torch.allclose(un.bank[0], off, rtol=1e-10, atol=1e-12)


def _moment_rows(monkeypatch) -> list[int]:
    """Row-draw gradients the unlearner's moments take (rows times draws, each call's), recorded as they run."""
    taken: list[int] = []
    moment = U.MCMCUnlearner._moment

    def counted(self, h_f, draws, rows, *args, **kw):
        taken.append(int(rows[0].shape[0]) * int(draws.shape[0]))
        return moment(self, h_f, draws, rows, *args, **kw)

    monkeypatch.setattr(U.MCMCUnlearner, "_moment", counted)
    return taken


def test_an_iterators_estimate_stops_early_where_the_gap_is_clearly_large(far, monkeypatch) -> None:
    """64 draws of the old posterior's Laplace approximation through the iterator (its gap over every row, by
    ``"auto"``'s pass, well above the threshold): the groups are measured one at a time and the estimate stops after
    three of the eight, its lower bound (Student's ``t`` for two degrees of freedom) above the threshold: not fired,
    the gate-off bank to the bit, its row-draw gradients three groups' (100 rows at ``θ̄`` and the first look's row
    at 8 draws and ``θ̄`` each: 327) where the estimate over every group takes more than ``8·n = 800``."""
    x, y, _, old, _ = far
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bank = old + z @ torch.linalg.cholesky(torch.linalg.inv(_hessian(x, y, old))).T
    kw = {"curvature_draws": 8, "grad_draws": 64}
    _, auto = _forget_far(far, bank, "auto", newton_gate=0, **kw)
    assert auto["newton_bank_gap"] ** 2 > 4 * U.NEWTON_AUTO_BANK_GAP**2, auto["newton_bank_gap"]
    taken = _moment_rows(monkeypatch)

    def gate_rows(**kw_gate) -> tuple[torch.Tensor, dict, int]:
        """The request's bank, info, and its row-draw gradients beyond the gate-off request's."""
        start = len(taken)
        bank_after, info = _from_iterator(far, bank, None, **kw, **kw_gate)
        return bank_after, info, sum(taken[start:])

    off, _, off_rows = gate_rows(newton_gate=0)
    gated, info, rows = gate_rows()
    assert info["newton_gate"].startswith("not fired: the bank's gap"), info
    assert "stopped after 3 of 8 groups (300 rows at θ̄): the gap is clearly above the threshold" in info["newton_gate"]
    assert rows - off_rows == 3 * 100 + 3 * (8 + 1)
    assert torch.equal(gated, off)
    monkeypatch.setattr(U, "_gap_early_stop", lambda *a: None)
    _, full, full_rows = gate_rows()
    assert full["newton_gate"].startswith("not fired: the bank's gap") and "stopped" not in full["newton_gate"]
    assert full_rows - off_rows > 8 * 100


def test_the_early_stop_rules() -> None:
    """``_gap_early_stop`` on groups of known spread: terms at ``θ̄`` whose partial sum of squares over ``B(B−1)``
    already exceeds the threshold stop at the second group (the full sample's can only be larger); a gap
    estimate whose error is far above the threshold stops as hopeless; none stops before three groups otherwise."""
    g = torch.Generator().manual_seed(0)
    quiet = [torch.zeros(3, dtype=torch.float64)] * 3
    spread = [torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([8.0, 0.0, 0.0], dtype=torch.float64)]
    # ss = 32 over 56 = 0.57 > 0.5: certain; at 0.6 it is not
    assert "own error" in U._gap_early_stop(torch.zeros(2, 3), spread, 8, 0.5, 3.0, 1.0)
    assert U._gap_early_stop(torch.zeros(2, 3), spread, 8, 0.6, 3.0, 1.0) is None
    noisy = 100 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    assert "too large" in U._gap_early_stop(noisy, quiet, 8, 0.1, 3.0, 1.0)
    small = 0.01 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    assert U._gap_early_stop(small, quiet, 8, 0.1, 3.0, 1.0) is None


def _rule_texts() -> dict[str, str]:
    """Each early-stop rule's own reason, as ``_gap_early_stop`` gives it on groups that stop by that rule alone."""
    g = torch.Generator().manual_seed(0)
    quiet = [torch.zeros(3, dtype=torch.float64)] * 3
    spread = [torch.zeros(3, dtype=torch.float64), torch.tensor([8.0, 0.0, 0.0], dtype=torch.float64)]
    large = 100 + 0.01 * torch.randn(3, 3, generator=g, dtype=torch.float64)  # est ≈ 3·10⁴, se ≈ 1
    texts = {
        "certain": U._gap_early_stop(torch.zeros(2, 3), spread, 8, 0.5, 3.0, 1.0),
        "hopeless": U._gap_early_stop(100 * torch.randn(3, 3, generator=g, dtype=torch.float64), quiet, 8, 0.1, 3, 1),
        "clearly large": U._gap_early_stop(large, quiet, 8, 0.1, 3.0, 0.0),
    }
    assert len(set(texts.values())) == 3 and None not in texts.values(), texts
    return texts


@pytest.mark.parametrize("rule", ["certain", "hopeless", "clearly large"])
def test_the_early_stops_message_reads_for_every_count(rule: str) -> None:
    """``info["newton_gate"]`` of an early stop, for one group, two (no estimate: the jackknife needs three; it read
    "but on 800 rows sampled from the stream for 100 stopped after 2 of 8 groups") and three, a single row at
    ``θ̄`` counted as one, each with the rule's own reason at the end."""
    why, signal = _rule_texts()[rule], "the undamped step overshot"
    said = U._early_stop_said(signal, why, 1, 8, 1, 1, 8, 1, None, 4.0, 0.111)
    assert said == (
        "not fired: the undamped step overshot, but the bank's gap was not estimated: its sample of 8 rows from the "
        f"stream for 1 stopped after 1 of 8 groups (1 row at θ̄; an estimate needs 3 groups): {why}"
    )
    said = U._early_stop_said(signal, why, 2, 8, 100, 25, 800, 100, None, 4.0, 0.111)
    assert said == (
        "not fired: the undamped step overshot, but the bank's gap was not estimated: its sample of 800 rows from "
        f"the stream for 100 stopped after 2 of 8 groups (200 rows at θ̄; an estimate needs 3 groups): {why}"
    )
    said = U._early_stop_said(signal, why, 3, 8, 100, 25, 800, 100, (2.0, 0.5), 4.0, 0.111)
    assert said == (
        "not fired: the bank's gap estimated at ‖e₀‖² = 0.5 ± 0.125 ·‖G‖² on 75 of 800 sampled from the stream for "
        f"100 rows (threshold 0.111); stopped after 3 of 8 groups (300 rows at θ̄): {why}"
    )


def test_an_iterators_estimate_stopped_at_two_groups_says_so(far, monkeypatch) -> None:
    """The far removal through the iterator, its estimate stopped by the certain rule after two of its eight groups
    (the rule forced there): the request's message names the count, the rows read and the reason, no estimate."""
    _, _, _, old, _ = far
    why = _rule_texts()["certain"]
    monkeypatch.setattr(U, "_gap_early_stop", lambda us, *a: why if us.shape[0] == 2 else None)
    _, info = _from_iterator(far, old[None], None)
    assert info["newton_gate"] == (
        "not fired: the undamped step overshot, but the bank's gap was not estimated: its sample of 800 rows from "
        f"the stream for 100 stopped after 2 of 8 groups (200 rows at θ̄; an estimate needs 3 groups): {why}"
    )


@pytest.mark.parametrize("gap", [0.0, 0.5])
def test_early_stops_lose_at_most_the_gates_error_rate(gap: float) -> None:
    """The looks' Bonferroni split: Gaussian group estimates (``B = 8``, 4 coordinates, unit spread, ``‖e₀‖²`` 0 or
    at the threshold 0.5) with ``z = 1`` (error ``Φ(−1) = 0.159``, the first look the whole evidence: ``project =
    1``), stopped early (any look at ``k = 3 … 7``, either statistical rule) where the full look fires, in at most
    that share of 1,000 seeded trials plus three Monte-Carlo errors (0.13 and 0.06 here; each look's ``est − z·se``
    without the split and Student's ``t`` stops 0.24 of the banks at the threshold)."""
    from statistics import NormalDist

    g = torch.Generator().manual_seed(0)
    z, limit, trials, lost = 1.0, 0.5, 1000, 0
    quiet = [torch.zeros(4, dtype=torch.float64)] * 8
    e0 = torch.tensor([gap**0.5, 0.0, 0.0, 0.0], dtype=torch.float64)
    for _ in range(trials):
        us = e0 + torch.randn(8, 4, generator=g, dtype=torch.float64)
        est, se = U._gap_estimate(us, 1, math.inf)
        stops = any(U._gap_early_stop(us[:k], quiet[:k], 8, limit, z, 1.0) is not None for k in range(3, 8))
        lost += stops and est + z * se <= limit
    alpha = NormalDist().cdf(-z)
    assert lost / trials <= alpha + 3 * (alpha * (1 - alpha) / trials) ** 0.5, lost / trials


@pytest.mark.parametrize("df", [1, 2, 3, 6, 7])
def test_the_early_stops_quantiles_match_scipys(df: int) -> None:
    """The looks' quantiles (bisection on closed forms, so a request imports no SciPy: 0.2 s CPU) against SciPy's
    ``chdtri``/``stdtrit`` to 1e-9 relative, from 0.3 to 1e-7 (the split error at ``z = 3`` is 1.35e-4)."""
    import functools

    from scipy.special import chdtri, stdtrit

    for p in (0.3, 1e-2, 1.35e-4, 1e-7):
        assert U._upper_quantile(functools.partial(U._t_sf, df), p) == pytest.approx(stdtrit(df, 1 - p), rel=1e-9)
        assert U._upper_quantile(functools.partial(U._chi2_sf, df), p) == pytest.approx(chdtri(df, p), rel=1e-9)


@pytest.mark.xfail(
    strict=True,
    reason="the first look's 'could not fire' rule scales the look's error by √(first/per · draws_look/draws) as a "
    "lower bound on the whole groups' error; at fewer draws the look's ‖e₀‖² and its error carry the draws' own "
    "Monte-Carlo error, which the whole groups at every draw do not (review of stop 66)",
)
def test_the_first_looks_not_fired_agrees_with_the_whole_groups_at_every_draw(monkeypatch) -> None:
    """A conjugate regression (10 weights, 400 rows, 60 removed at random: 340 remain), a bank of 256 exact draws of
    the full posterior, the estimate made whatever the first signal says (an affine model's step never overshoots):
    at every draw and the whole groups the gap is 0.058 ± 2·10⁻⁷ ·‖G‖², below the threshold 0.111 (fired; the rows'
    gradients are affine in θ, so at every draw each row's term less its term at θ̄ is zero); the look at
    ``NEWTON_GATE_FIRST_DRAWS`` = 2 draws reads 17 ± 13 (the two draws' mean is off the bank's by their Monte-Carlo
    error, which every group shares: in the estimate, not in its error) and rules the whole groups out: not fired.
    Stop 65's look at 8 draws likewise (4.2 ± 3.1); over 36 such banks (3 or 10 weights, 5/20/60 removed), the look
    at 2 draws said "not fired" on 11 of the 15 the whole groups fire on, at 8 draws on 11 too."""
    from mcmc_unlearner.models.linreg import BayesianLinearRegression, exact_posterior

    monkeypatch.setattr(MCMCUnlearner, "_undamped_overshoots", lambda self, trials, info: True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 10, generator=g, dtype=torch.float64)
    y = x @ torch.randn(10, generator=g, dtype=torch.float64) + torch.randn(400, generator=g, dtype=torch.float64)
    mean, cov = exact_posterior(x, y)
    bank = (mean + torch.randn(256, 10, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T).float()
    removed = torch.randperm(400, generator=g)[:60]

    def verdict() -> str:
        un = MCMCUnlearner(BayesianLinearRegression(10), bank=bank.clone(), grad_draws=256, curvature_draws=8)
        return un.forget(removed, RemovableDataset(x.float(), y.float(), batch_size=400, seed=0)).info["newton_gate"]

    look = verdict()
    monkeypatch.setattr(U, "NEWTON_GATE_FIRST", 1.0)  # no look: the whole groups at every draw
    monkeypatch.setattr(U, "NEWTON_GATE_FIRST_DRAWS", 10**6)
    whole = verdict()
    assert whole.startswith("fired") and " on 40 of 340 rows" in whole, whole
    assert look.startswith("fired"), look


def test_a_stream_giving_each_row_once_a_pass_fires_only_where_the_exact_gap_is_within(monkeypatch) -> None:
    """A linear regression (20 parameters, 200 remaining rows) through an iterator giving every row once a pass, a
    one-sample bank off the old mode with ``‖e₀‖²`` in closed form just over the threshold (0.119·‖G‖²), the first
    signal forced: the ``8·n`` rows are 8 copies of the data, so the groups' terms at ``θ̄`` sum to the whole data's
    and the pair estimate reads ``‖e₀‖²`` less the sample's own error (0.039 = 0.119 − 0.081, to the printed digits).
    At ``newton_gate=1`` that fired (0.039 + 0.069 below 0.111); judged with the sample's error it does not, and the
    bank is the gate-off one."""
    d, n, r = 20, 200, 20
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + r, d, generator=g, dtype=torch.float64)
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    y = x @ w_true + 0.6 * torch.randn(n + r, generator=g, dtype=torch.float64)
    y[n:] += 3.0  # the removed rows off the line

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))

        def log_prior(self) -> torch.Tensor:
            return -0.5 * (self.w**2).sum()

        def nll(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return 0.5 * (batch[1] - batch[0] @ self.w) ** 2

    w_old = torch.linalg.solve(x.T @ x + torch.eye(d, dtype=torch.float64), x.T @ y)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    bank = (w_old + 0.059 * v / v.norm())[None]
    e0 = (x.T @ x + torch.eye(d, dtype=torch.float64)) @ (bank[0] - w_old)  # ∇F(θ, S) at the bank
    G = x[n:].T @ (x[n:] @ bank[0] - y[n:])  # the removed rows' gradient
    gap2 = float(e0.norm() / G.norm()) ** 2
    assert U.NEWTON_AUTO_BANK_GAP**2 < gap2 < 0.12, gap2
    monkeypatch.setattr(U.MCMCUnlearner, "_undamped_overshoots", lambda self, trials, info: True)

    def run(**kw) -> tuple[torch.Tensor, dict]:
        def passes():  # every remaining row once a pass, in one order
            while True:
                for i in range(0, n, 25):
                    yield x[i : i + 25], y[i : i + 25]

        un = MCMCUnlearner(Linear(), bank=bank.clone(), solver="exact", curvature_draws=1, check_rows=50, **kw)
        return un.bank, un.remove((x[n:], y[n:]), passes(), n_remaining=n).info

    (gated, info), (off, _) = run(newton_gate=1), run(newton_gate=0)
    said = info["newton_gate"]
    assert said.startswith("not fired: the bank's gap") and "judged with the gap" in said, said
    est = float(said.split("= ")[1].split(" ±")[0])
    noise = float(said.split("own error ‖·‖² = ")[1].split(" ·")[0])
    assert est + noise == pytest.approx(gap2, rel=0.01), (est, noise, gap2)
    assert torch.equal(gated, off)


@pytest.mark.parametrize("df", [1, 2, 3, 6, 7])
def test_the_early_stops_quantiles_hold_at_a_large_newton_gate(df: int) -> None:
    """``newton_gate`` is any number ``>= 0``: at ``z`` = 6 to 15 the looks' split error ``Φ(−z)/10`` is 1e-10 to
    4e-52, and it and the quantiles there match SciPy's (``norm.sf``, ``t.isf``, ``chi2.isf``) to 1e-9 relative. It
    was ``NormalDist().cdf(−z)`` (``(1 + erf)/2``: one digit at ``z = 8``, 0 from ``z ≈ 8.3``) and the ``t`` tail
    ``(1 − A)/2`` by subtraction (no digit below 1e-16: the quantile 51% low at ``df = 1``, ``z = 8``); a split error
    of 0 has no finite quantile."""
    import functools

    from scipy import stats

    for z in (3.0, 6.0, 8.0, 10.0, 15.0):
        p = U._split_error(z, 8)
        assert p == pytest.approx(stats.norm.sf(z) / 10, rel=1e-12), z
        t = U._upper_quantile(functools.partial(U._t_sf, df), p)
        assert t == pytest.approx(stats.t.isf(p, df), rel=1e-9), (z, t)
        c = U._upper_quantile(functools.partial(U._chi2_sf, df), p)
        assert c == pytest.approx(stats.chi2.isf(p, df), rel=1e-9), (z, c)
    assert U._upper_quantile(functools.partial(U._t_sf, df), 0.0) == math.inf


_SAMPLED_MEMORY = r"""
sys.path.insert(0, sys.argv[3])
import warnings
warnings.filterwarnings("ignore")
import test_newton_gate as T
x, y, removed, old, _ = T.far.__wrapped__()
W = 32768  # an unused field of 128 KiB a row: the sample's bytes dominate


class Padded(T._Huber):
    def nll(self, batch):
        return super().nll(batch[:2])


def passes():
    g = torch.Generator().manual_seed(7)
    while True:
        for i in torch.randperm(100, generator=g).view(4, 25):
            yield x[i], y[i], torch.zeros(25, W)


un = MCMCUnlearner(Padded(), bank=old[None].clone(), solver="exact", curvature_draws=1, check_rows=50,
                   newton_gate=float(sys.argv[2]), memory_budget=budget)
start = status("VmRSS")
reset_peak()
info = un.remove((x[removed], y[removed], torch.zeros(150, W)), passes(), n_remaining=100).info
print(json.dumps({"added": status("VmHWM") - start, "gate": info.get("newton_gate", "")}))
"""


def test_the_sample_from_the_stream_counts_what_it_holds_against_the_memory_budget() -> None:
    """The far removal through a reshuffling iterator whose rows carry 128 KiB each (a fresh process, the peak
    resident set): the estimate's ``8·n`` rows are held twice while they are read (the minibatches and their joined
    copy), so the request's peak with the gate exceeds the gate-off one's by more than the rows once. Under a budget
    of 0.9 of what the gate added, the estimate is not made and the report says why (counting the rows once, 138 MB,
    it ran under a ~160 MB budget and added ~178 MB; twice: 243 MB)."""
    from pathlib import Path

    from _memory_helpers import measured, opening

    script = opening() + _SAMPLED_MEMORY
    here = str(Path(__file__).resolve().parent)
    off = measured(script, str(2**40), "0", here, timeout=300)
    on = measured(script, str(2**40), "3", here, timeout=300)
    assert on["gate"].startswith("fired"), on
    added = on["added"] - off["added"]
    assert added > 800 * 32768 * 4, added  # more than the sample's rows once
    tight = measured(script, str(int(0.9 * added)), "3", here, timeout=300)
    assert tight["gate"].startswith("not fired: the undamped step overshot, but the estimate's"), tight
    assert "over the memory budget" in tight["gate"], tight


class _Gaussian(_Twin):
    """Linear regression on three inputs, unit Gaussian noise, prior N(0, 1): every row's gradient is linear in the
    weights."""

    def log_prior(self) -> torch.Tensor:
        return -0.5 * (self.w**2).sum()

    def nll(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return 0.5 * (y - x @ self.w) ** 2


@pytest.mark.xfail(
    strict=True,
    reason="stop 66: the sound rule (rule out at the look only where it looked at every draw) was measured and not "
    "taken: it sent every class removal to the whole groups at every draw (the quick matrix's LeNet-5 / BN-CNN / "
    "transformer gate 0.10-0.14 -> 0.23-0.80 CPU s, verdicts the same; the ResNet not measured, an estimated 1-2 "
    "epochs more); the old rule "
    "errs toward the influence step alone (docs/model-matrix.md, 'a cheaper first look')",
)
def test_a_few_draws_look_does_not_rule_out_the_whole_groups(monkeypatch) -> None:
    """Closed form: with gradients linear in the weights and a bank of pairs ``mode ± v`` about the posterior mode,
    every row's gradient averaged over the bank is its gradient at the mode, so the whole groups at every draw
    estimate the gap exactly (0: it fires). The first look's two draws are not such a pair: their Monte-Carlo error,
    shared by the groups, puts its estimate at 32 ± 18 ·‖G‖², and the old rule (this error times
    √(first/per · few/draws)) read that the whole groups could not fire either and stopped, not fired."""
    looks: list[tuple[float, float]] = []
    estimate = U._gap_estimate

    def spy(us: torch.Tensor, per: int, rows: float) -> tuple[float, float]:
        looks.append(estimate(us, per, rows))
        return looks[-1]

    def forced(self, trials, info) -> bool:  # the quadratic model is exact here: the first signal never fires
        info["newton_gate_signal"] = "forced"
        return True

    monkeypatch.setattr(U, "_gap_estimate", spy)
    monkeypatch.setattr(U.MCMCUnlearner, "_undamped_overshoots", forced)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64) + torch.randn(400, generator=g, dtype=torch.float64)
    mode = torch.linalg.solve(x.T @ x + torch.eye(3, dtype=torch.float64), x.T @ y)
    v = 0.1 * torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    un = MCMCUnlearner(_Gaussian(), bank=torch.cat([mode + v, mode - v]), solver="exact", curvature_draws=1)
    info = un.forget(torch.arange(360, 400), RemovableDataset(x, y, batch_size=400, seed=0)).info
    assert info["newton_gate"].startswith("fired"), info["newton_gate"]
    assert len(looks) == 2  # the first look, then the whole groups at every draw
    (est1, se1), (est, se) = looks
    per, first, few, draws = 5, 2, U.NEWTON_GATE_FIRST_DRAWS, 16  # 360 rows: groups of 5; the bank's 16 draws
    xr, yr = x[360:], y[360:]
    scale = float((xr.T @ (xr @ mode - yr)).norm()) ** 2  # ‖G‖²: the removed rows' gradient, at the mode
    assert est1 > 10 * scale  # the first look: inflated by its two draws' shared error (32 ± 18 ·‖G‖²)
    # the whole groups: the gap (0) to rounding, their error with it
    assert abs(est) <= 1e-20 * scale and se <= 1e-20 * scale
    # ... where the old rule read the first look as hopeless
    assert se1 * math.sqrt(first / per * few / draws) * 3.0 > U.NEWTON_AUTO_BANK_GAP**2 * scale


class _CountedClock:
    """A CPU clock that advances by counted costs, not time (``U._cpu_seconds``): the request before the further
    steps (charged at its first damping search) costs ``before`` s and each gradient pass over the remaining rows
    ``per_pass`` s, so the cost cap decides the same on any machine."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, per_pass: float, before: float = 1.0) -> None:
        self.t, self.searched = 0.0, False
        step, gradient = DampingControl.step, U.MCMCUnlearner._equilibrium_gradient

        def counted_step(*a: object, **k: object) -> object:
            self.t += 0.0 if self.searched else before
            self.searched = True
            return step(*a, **k)

        def counted_gradient(*a: object, **k: object) -> torch.Tensor:
            self.t += per_pass
            return gradient(*a, **k)

        monkeypatch.setattr(U, "_cpu_seconds", lambda: self.t)
        monkeypatch.setattr(U, "NEWTON_AUTO_COST_FLOOR", 0.0)  # counted seconds: the ratio alone
        monkeypatch.setattr(DampingControl, "step", counted_step)
        monkeypatch.setattr(U.MCMCUnlearner, "_equilibrium_gradient", counted_gradient)

    def reset(self) -> None:
        """A new request: its first search is charged again."""
        self.searched = False


def test_the_gates_steps_stop_at_their_cost_cap_where_a_pass_is_dear(far, monkeypatch) -> None:
    """Passes dear against the request before them (a GRU's rows, in counted seconds): the gate's further steps stop
    where another would take their CPU (its mean so far added) past ``NEWTON_AUTO_COST`` times the request's before
    them, before they converge; the steps taken are ``newton_steps=k``'s to the bit, closer to the new mode than the
    influence step alone, and the report says why they stopped. ``"auto"``, asked for, keeps its counted budget."""
    _, _, _, old, new = far
    free, info_free = _forget_far(far, old[None], 1)
    assert info_free["newton_gate"].startswith("fired") and info_free["newton_stop"].startswith("converged")
    assert U.NEWTON_AUTO_COST is None  # off by default: where it would bind, the bank would follow the load
    clock = _CountedClock(monkeypatch, per_pass=2.25)  # the gap's pass 2.25 s, a step's 4.5 s: 4.5 + 2.25 > 6·1.0
    default, info_default = _forget_far(far, old[None], 1)
    assert torch.equal(default, free) and info_default["newton_stop"] == info_free["newton_stop"]  # not capped
    clock.reset()
    monkeypatch.setattr(U, "NEWTON_AUTO_COST", 6.0)  # the counted costs below are set against it
    capped, info = _forget_far(far, old[None], 1)
    assert info["newton_cpu_before"] == 1.0 and info["newton_cpu_seconds"] == 4.5, info
    assert info["newton_steps_taken"] == 2 < info_free["newton_steps_taken"], info
    assert info["newton_stop"].startswith("cost: another step (~2.25 CPU s, the mean of the 2 pass(es) so far)")
    two, _ = _forget_far(far, old[None], 2, newton_gate=0)
    one, _ = _forget_far(far, old[None], 1, newton_gate=0)
    assert torch.equal(capped, two)
    assert float((capped - new).norm()) < 0.5 * float((one - new).norm())
    clock.reset()
    auto, info_auto = _forget_far(far, old[None], "auto")
    assert torch.equal(auto, free) and info_auto["newton_stop"] == info_free["newton_stop"]  # not capped
    # each request's CPU before its further steps is read from its own start, not the clock's (or the first's)
    assert info_auto["newton_cpu_before"] == 1.0 and info_auto["newton_cpu_seconds"] > 4.0, info_auto


def test_a_cost_cap_that_does_not_bind_changes_nothing(far, monkeypatch) -> None:
    """Cheaper passes (0.1 s against the request's 1 s before them): the cap does not bind, and the bank and every
    decision are those without a cap, to the bit."""
    _, _, _, old, _ = far
    clock = _CountedClock(monkeypatch, per_pass=0.1)
    monkeypatch.setattr(U, "NEWTON_AUTO_COST", 6.0)
    capped, info = _forget_far(far, old[None], 1)
    monkeypatch.setattr(U, "NEWTON_AUTO_COST", None)
    clock.reset()
    free, info_free = _forget_far(far, old[None], 1)
    assert torch.equal(capped, free)
    assert info["newton_cpu_before"] == info_free["newton_cpu_before"] == 1.0  # each from its own request's start
    assert {k: v for k, v in info.items() if "cpu" not in k} == {k: v for k, v in info_free.items() if "cpu" not in k}
    assert info["newton_stop"].startswith("converged")
    assert info["newton_cpu_seconds"] == pytest.approx(0.1 * (info["newton_steps_taken"] + 1))  # the last: converged


def test_distinct_rows_hold_at_most_four_fifths_of_the_samples_bytes_with_rows_of_odd_bytes() -> None:
    """``DISTINCT_CHUNK_BYTES``' other bound, 0.8 of the rows' own bytes (the gate counts the sample twice against
    ``memory_budget``), holds where a tensor's row is an odd number of bytes (a uint8 image of 3x15x15): its rows were
    padded to whole 16-bit words in one copy of the whole field, 1.65x the sample's bytes at once."""
    from mcmc_unlearner.kronecker import _LivePeak

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (4096, 3, 15, 15), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (4096,), generator=g)
    pick = torch.cat([torch.arange(4096), torch.arange(0, 4096, 3)])
    rows = (x[pick], y[pick])
    with _LivePeak() as live:
        got = U._distinct_rows(rows)
    assert got is not None and got.tolist() == list(range(4096))
    sample = sum(t.nbytes for t in rows)
    assert live.peak <= 0.8 * sample + 64 * pick.numel(), (live.peak, sample)  # (+ the hashes and indices, a row)
