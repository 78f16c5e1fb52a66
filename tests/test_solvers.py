"""Every solver agrees with ``torch.linalg.solve`` on a dense damped SPD system in float64."""

from __future__ import annotations

import pytest
import torch

from mcmc_unlearner import SolverDivergedError, solve
from mcmc_unlearner.solvers import cg, exact, lissa


def _spd(d: int, cond: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    evals = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), d, dtype=torch.float64)
    return (q * evals) @ q.T


@pytest.mark.parametrize("rhs_cols", [0, 3])
def test_all_solvers_match_dense_solve(rhs_cols: int) -> None:
    d, damping = 30, 0.5
    H = _spd(d, cond=50.0)
    g = torch.Generator().manual_seed(1)
    b = (
        torch.randn(d, generator=g, dtype=torch.float64)
        if rhs_cols == 0
        else torch.randn(d, rhs_cols, generator=g, dtype=torch.float64)
    )
    ref = torch.linalg.solve(H + damping * torch.eye(d, dtype=torch.float64), b)
    results = {
        "exact": solve("exact", H, b, damping=damping),
        "cg": solve("cg", lambda v: H @ v, b, damping=damping, tol=1e-12, max_iter=200),
        "lissa": solve("lissa", lambda v: H @ v, b, damping=damping, scaling="auto", iters=5000, tol=1e-11),
    }
    for name, res in results.items():
        assert res.converged, name
        assert torch.allclose(res.x, ref, rtol=1e-8, atol=1e-9), (name, (res.x - ref).abs().max())
        assert res.residual < 1e-8


def test_lissa_fixed_scaling_matches_recursion_fixed_point() -> None:
    H = _spd(5, cond=4.0, seed=2)
    b = torch.ones(5, dtype=torch.float64)
    res = lissa(H, b, scaling=0.2, iters=2000, tol=1e-13)
    assert torch.allclose(res.x, torch.linalg.solve(H, b), atol=1e-10)
    assert res.info["scaling"] == 0.2


def test_lissa_auto_scaling_estimates_top_eigenvalue() -> None:
    H = _spd(10, cond=20.0, seed=3)
    res = lissa(H, torch.ones(10, dtype=torch.float64), scaling="auto", iters=10)
    assert res.info["lambda_max"] == pytest.approx(20.0, rel=0.02)


def test_lissa_divergence_is_detected() -> None:
    H = _spd(6, cond=10.0, seed=4)  # lambda_max = 10: scaling 1 gives |1 - 10| > 1
    with pytest.raises(SolverDivergedError, match="lower the scaling"):
        lissa(H, torch.ones(6, dtype=torch.float64), scaling=1.0, iters=64)


def test_cg_negative_curvature_is_refused() -> None:
    H = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    with pytest.raises(SolverDivergedError, match="increase damping"):
        cg(H, torch.ones(3, dtype=torch.float64))
    res = cg(H, torch.ones(3, dtype=torch.float64), damping=3.0, tol=1e-12)
    assert torch.allclose(res.x, torch.tensor([0.25, 1.0, 1 / 6], dtype=torch.float64))


def test_exact_refuses_non_finite_matrix() -> None:
    H = torch.eye(3, dtype=torch.float64)
    H[0, 1] = float("nan")
    with pytest.raises(SolverDivergedError, match="non-finite"):
        exact(H, torch.ones(3, dtype=torch.float64))


def test_unknown_solver_name() -> None:
    with pytest.raises(ValueError, match="unknown solver 'newton'"):
        solve("newton", torch.eye(2), torch.ones(2))


def test_lowrank_is_saddle_free_newton_on_spiked_indefinite_matrix() -> None:
    from mcmc_unlearner.curvature import LowRankPreconditioner

    g = torch.Generator().manual_seed(5)
    d = 120
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    evals = torch.full((d,), 2.0, dtype=torch.float64)
    evals[:3] = torch.tensor([-40.0, -25.0, -9.0], dtype=torch.float64)
    evals[-4:] = torch.tensor([30.0, 80.0, 300.0, 1000.0], dtype=torch.float64)
    H = (q * evals) @ q.T
    P = LowRankPreconditioner.build(
        lambda v: H @ v, d, rank=20, probes=32, generator=g, dtype=torch.float64, absolute=True
    )
    b = torch.randn(d, generator=g, dtype=torch.float64)
    res = solve("lowrank", H, b, preconditioner=P)
    reference = (q / evals.abs()) @ (q.T @ b)  # |H|⁻¹ b
    assert torch.allclose(res.x, reference, rtol=1e-6, atol=1e-8)
    # the residual is measured against H itself: nonzero because of the negative directions
    assert res.residual == pytest.approx(float((b - H @ res.x).norm() / b.norm()), rel=1e-9)
    assert not res.converged


def test_truncated_cg_stops_at_negative_curvature_with_a_descent_step() -> None:
    H = torch.diag(torch.tensor([4.0, 1.0, -2.0], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    res = cg(H, b, tol=1e-12, negative_curvature="truncate")
    assert res.info["truncated"] and not res.converged
    # the iterate decreases the quadratic model q(x) = ½xᵀHx − bᵀx below q(0) = 0
    q = 0.5 * res.x @ H @ res.x - b @ res.x
    assert q < 0 and torch.isfinite(res.x).all()
    # on a positive-definite system truncation never triggers and the answer is exact
    ok = cg(H.abs(), b, tol=1e-12, negative_curvature="truncate")
    assert not ok.info["truncated"] and torch.allclose(ok.x, b / H.diagonal().abs())


def test_all_finite_agrees_with_isfinite() -> None:
    from mcmc_unlearner.errors import all_finite

    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, 40, generator=g)
    assert all_finite(base) and all_finite(torch.tensor([3e38, -3e38])) and all_finite(torch.empty(0))
    assert all_finite(torch.arange(5))  # integer tensors are always finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        for pos in ((0, 0), (17, 23), (49, 39)):
            t = base.clone()
            t[pos] = bad
            assert not all_finite(t), (bad, pos)
            assert all_finite(t) == bool(torch.isfinite(t).all())


def test_cg_stopped_by_max_iter_reports_the_true_residual():
    """CG confirmed its recursive residual against ``b − (H + λ)x`` only when it fell below tol: a solve stopped by
    max_iter reported the drifted value (float32, condition 5e3: 1.4e-5 against a true 9.7e-5, stop 46's probe)."""
    from mcmc_unlearner import solvers

    g = torch.Generator().manual_seed(1)
    worst, stopped = 0.0, 0
    for _ in range(25):
        D = int(torch.randint(10, 60, (1,), generator=g))
        Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
        H = (Q * torch.logspace(0, 3.7, D, dtype=torch.float64)) @ Q.T
        H = (0.5 * (H + H.T)).float()
        b = torch.randn(D, generator=g)
        r = solvers.cg(H, b, damping=0.1, max_iter=10 * D, tol=1e-5)
        if r.converged:
            continue
        true = float((b - (H @ r.x + 0.1 * r.x)).norm() / b.norm())
        worst, stopped = max(worst, abs(true / r.residual - 1)), stopped + 1
    assert stopped >= 5 and worst < 1e-3, (stopped, worst)


def test_lissa_growing_slowly_below_the_divergence_limit_is_refused():
    """With s·λ_max a little above 2 the recursion grows by |1 − s·λ_max| per round, too slowly to pass
    divergence_tol within its rounds, and its answer was returned (s·λ_max 2.1, 32 rounds: 67% off the exact
    solve; stop 46's probe). At s·λ_max 1.9 it converges and is returned."""
    from mcmc_unlearner import solvers
    from mcmc_unlearner.errors import SolverDivergedError

    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    H = (Q * torch.tensor([0.5, 1.0, 2.0, 3.0, 5.0, 8.0], dtype=torch.float64)) @ Q.T
    b = torch.randn(6, generator=g, dtype=torch.float64)
    ok = solvers.lissa(H, b, scaling=1.9 / 8.0, iters=200, tol=0.0)
    torch.testing.assert_close(ok.x, torch.linalg.solve(H, b), rtol=1e-6, atol=1e-8)
    with pytest.raises(SolverDivergedError, match="rose in each of its last 8 rounds"):
        solvers.lissa(H, b, scaling=2.1 / 8.0, iters=32, tol=0.0)
