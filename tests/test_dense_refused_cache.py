"""A request refused after the dense backend's ``prepare`` leaves no stale eigendecomposition, removed rows' Hessian
or pending cache behind: the next request's numbers are those of an unlearner that never saw the refused one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.errors import SolverDivergedError

torch.set_num_threads(1)


def _setup(refresh_every: int, **options):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 3, generator=g, dtype=torch.float64)
    y = (x @ torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64) > 0).long()
    model = nn.Linear(3, 2).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    bank = theta + 0.1 * torch.randn(24, theta.numel(), generator=g, dtype=torch.float64)
    un = MCMCUnlearner(
        model,
        nll=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"),
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()),
        bank=bank,
        solver="exact",
        refresh_every=refresh_every,
        **options,
    )
    return un, x, y


@pytest.mark.parametrize("refresh_every", [1, 3])
def test_a_request_refused_after_prepare_leaves_no_stale_curvature(refresh_every, monkeypatch) -> None:
    """A request refused after `prepare` (here: once the bank is moved, as the non-finite-shift refusal is) leaves
    the next request the numbers of an unlearner that never saw it (both dense eigendecompositions taken, and with
    `refresh_every=3` the cached Hessian downdated by the refused request's rows)."""
    runs = []
    for refused_first in (False, True):
        un, x, y = _setup(refresh_every)
        un.remove((x[:10], y[:10]), (x[10:], y[10:]), strict=False)  # an applied request: the cache, downdated next
        if refused_first:
            shift, taken = type(un)._shift, []

            def refused(self, *args, shift=shift, taken=taken, **kwargs):
                shift(self, *args, **kwargs)  # the step solved and the spread transported, then refused
                taken.append(sorted(self.curvature._eighs))
                raise SolverDivergedError("refused after prepare (test)")

            monkeypatch.setattr(type(un), "_shift", refused)
            with pytest.raises(SolverDivergedError, match="refused after prepare"):
                un.remove((x[10:40], y[10:40]), (x[40:], y[40:]), strict=False)  # other rows: another Hessian
            monkeypatch.undo()
            assert taken == [["new"]]  # the refused request's own (the transport's old one released after use)
        report = un.remove((x[10:20], y[10:20]), (x[20:], y[20:]), strict=False)
        runs.append((un.bank.clone(), report.info.get("hessian_reused"), report.info["min_eigenvalue"]))
    (fresh, reused_f, w_f), (after, reused_a, w_a) = runs
    assert reused_f == reused_a == (refresh_every > 1)
    assert w_f == w_a
    assert torch.equal(fresh, after)


def test_the_transport_s_old_eigenvectors_are_released_once_used_with_the_same_numbers(monkeypatch) -> None:
    """The Gaussian transport's float64 eigenvectors of the old Hessian (D x D: 128 MB at D = 4,000) were kept until
    the request was applied, in every proposal's curvature state: released once the transport is formed, the
    request's numbers unchanged."""
    from mcmc_unlearner.backends.dense import DenseBackend

    banks = []
    for release in (True, False):
        if not release:
            monkeypatch.setattr(DenseBackend, "release_transport", lambda self: None)
        un, x, y = _setup(1)
        prop = un.propose((x[:10], y[:10]), (x[10:], y[10:]))
        assert "bank_shift_fallback" not in prop.report.info  # the transport applied
        assert sorted(prop._backend_state["_eighs"]) == (["new"] if release else ["new", "old"])
        un.apply(prop)
        banks.append(un.bank.clone())
    assert torch.equal(banks[0], banks[1])


def test_the_old_eigenvectors_the_solves_use_are_kept_with_hessian_full() -> None:
    """With ``hessian="full"`` the solves use the old Hessian's eigendecomposition: the transport's release keeps it
    (the first version compared a new tuple by identity and dropped it always, freeing nothing)."""
    un, x, y = _setup(1, hessian="full")
    prop = un.propose((x[:10], y[:10]), (x[10:], y[10:]))
    assert "bank_shift_fallback" not in prop.report.info
    assert "old" in prop._backend_state["_eighs"]
