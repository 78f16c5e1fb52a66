"""Stop 69's cuts of the dense backend's per-request work (the usage flow's CNN): a downdated request's old Hessian
is the cache, whose eigendecomposition the previous request took (one ``eigh`` a request, not two), and the Gaussian
transport is applied to the rows it moves without forming its ``D × D`` matrix."""

from __future__ import annotations

import pytest
import torch

from mcmc_unlearner.backends.base import NegativeCurvatureError
from test_dense_refused_cache import _setup  # (the same exact-solver classifier)

torch.set_num_threads(1)


def _sym_pow(M: torch.Tensor, p: float) -> torch.Tensor:
    w, V = torch.linalg.eigh(M.double())
    return (V * w**p) @ V.T


@pytest.mark.parametrize("hessian", ["remaining", "full"])
def test_a_downdated_request_reuses_the_cache_s_eigendecomposition_as_its_old_hessian(monkeypatch, hessian) -> None:
    """On a downdate the old Hessian ``(C − H_r) + H_r`` is the cache ``C`` itself: its decomposition, taken by the
    request that built ``C``, is reused (one ``eigh`` for the request, not two), and the transport equals the float64
    reference ``(A' + λ)^{-1/2} C^{1/2}`` built from the cache and the request's Hessian by fresh decompositions."""
    un, x, y = _setup(3, hessian=hessian)
    un.remove((x[:10], y[:10]), (x[10:], y[10:]), strict=False)  # builds the cache (and its decomposition)
    b = un.curvature
    cache, cached = b.cache, b.cache_eigh
    assert cached is not None
    assert torch.equal(cached[0], torch.linalg.eigh(cache.double())[0])
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda M, *a, **k: calls.append(M.shape) or eigh(M, *a, **k))
    prop = un.propose((x[10:20], y[10:20]), (x[20:], y[20:]))
    monkeypatch.undo()
    assert prop.report.info["hessian_reused"] is True
    assert "bank_shift_fallback" not in prop.report.info
    assert len(calls) == 1  # the new Hessian's only (with hessian="full" the solves use the cache's: reused)
    b.restore(prop._backend_state)  # the proposal's curvature state
    assert b.old_hessian() is cache
    assert b._eighs["new"] is not None and (hessian == "full") == ("old" in b._eighs)
    T = b.transport(0.0)
    ref = _sym_pow(b.A_new, -0.5) @ _sym_pow(cache, 0.5)
    assert torch.allclose(T, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
    un.apply(prop)
    assert b.cache_eigh is not cached and torch.equal(b.cache_eigh[0], torch.linalg.eigh(b.cache.double())[0])


def test_the_cache_s_decomposition_is_dropped_with_the_cache() -> None:
    """``reset`` and a checkpoint's cache leave no decomposition of another matrix behind."""
    un, x, y = _setup(3)
    un.remove((x[:10], y[:10]), (x[10:], y[10:]), strict=False)
    b = un.curvature
    tensors, meta = b.state_dict()
    b.load_state_dict(tensors, meta)
    assert b.cache_eigh is None and b.cache is not None
    report = un.remove((x[10:20], y[10:20]), (x[20:], y[20:]), strict=False)  # takes the cache's again
    assert report.info["hessian_reused"] is True
    assert b.cache_eigh is not None
    b.reset()
    assert b.cache_eigh is None


def test_transport_rows_is_rows_times_the_transport_s_transpose() -> None:
    """:meth:`DenseBackend.transport_rows` is ``rows @ T.T`` (float64 reference, undamped and damped), and raises where
    :meth:`DenseBackend.transport` does."""
    un, x, y = _setup(1)
    prop = un.propose((x[:10], y[:10]), (x[10:], y[10:]))
    b = un.curvature
    b.restore(prop._backend_state)
    rows = torch.randn(7, b.A_new.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for damping in (0.0, 0.7):
        ref = rows @ b.transport(damping).T
        got = b.transport_rows(damping, rows)
        assert got.dtype == rows.dtype
        assert torch.allclose(got, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
    lo = float(torch.linalg.eigvalsh(b.A_new.double())[0])
    with pytest.raises(NegativeCurvatureError):
        b.transport(-lo - 1.0)
    with pytest.raises(NegativeCurvatureError):
        b.transport_rows(-lo - 1.0, rows)
