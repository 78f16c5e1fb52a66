"""Evaluation metrics for sample sets: k-NN KL divergence, thinning, mixture label alignment.

The k-NN KL estimator is the one used in the paper's evaluation (1-NN KL between flattened parameter samples
of the unlearned and the retrained chains).
"""

from __future__ import annotations

import math
from typing import Literal, TypeVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

__all__ = [
    "align_mixture_samples",
    "align_permutation",
    "gaussian_kl",
    "knn_distances",
    "knn_kl",
    "thin",
]

KnnMethod = Literal["auto", "kdtree", "brute"]
_T = TypeVar("_T")

#: Largest dimension for which ``method="auto"`` uses a k-d tree; above it exact chunked brute force is used.
KDTREE_MAX_DIM = 32
#: Default memory budget (bytes) of one float64 block in the brute-force path.
_BLOCK_BYTES = 128 * 2**20
#: The float64 copy of the reference set is kept (not rebuilt per query block) if it fits in this budget.
_CACHE_BYTES = 2 * 2**30


def _as_2d(a: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim == 1:
        a = a[:, None]
    elif a.ndim > 2:
        a = a.reshape(a.shape[0], -1)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values")
    return a


def _brute_knn(a: np.ndarray, b: np.ndarray, k: int, exclude_self: bool, chunk_size: int | None) -> np.ndarray:
    """Exact distance from each row of ``a`` to its ``k``-th nearest row of ``b`` (float64, chunked).

    Candidates are ranked with the ``‖u‖² + ‖v‖² − 2u·v`` expansion (one matrix product per block) on data
    centred on the mean of ``a``, which keeps the round-off small when samples sit far from the origin but
    close to each other (typical for MCMC chains). The distances to the ``k`` selected neighbours are then
    recomputed directly from the differences, so e.g. exact duplicates give exactly 0.
    With ``exclude_self`` (``a is b``) the pair ``(i, i)`` is skipped by index, so duplicates still count.
    """
    n, d = a.shape
    m = b.shape[0]
    if chunk_size is None:
        chunk_size = max(1, min(4096, _BLOCK_BYTES // (8 * max(d, 1))))
    centre = torch.from_numpy(a.mean(axis=0, dtype=np.float64))

    def block(arr: np.ndarray, lo: int, hi: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arr[lo:hi])).to(torch.float64)

    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    use_cache = m * d * 8 <= _CACHE_BYTES

    def ref_block(j0: int, j1: int) -> tuple[torch.Tensor, torch.Tensor]:
        if j0 in cache:
            return cache[j0]
        tb = block(b, j0, j1) - centre
        res = (tb, (tb * tb).sum(dim=1))
        if use_cache:
            cache[j0] = res
        return res

    out = np.empty(n, dtype=np.float64)
    for i0 in range(0, n, chunk_size):
        i1 = min(n, i0 + chunk_size)
        ta = block(a, i0, i1) - centre
        na = (ta * ta).sum(dim=1)
        best = torch.full((i1 - i0, k), math.inf, dtype=torch.float64)
        best_idx = torch.zeros((i1 - i0, k), dtype=torch.long)
        for j0 in range(0, m, chunk_size):
            j1 = min(m, j0 + chunk_size)
            tb, nb = ref_block(j0, j1)
            d2 = (na[:, None] + nb[None, :] - 2.0 * (ta @ tb.T)).clamp_min_(0.0)
            if exclude_self and i0 < j1 and j0 < i1:
                rows = torch.arange(max(i0, j0), min(i1, j1))
                d2[rows - i0, rows - j0] = math.inf
            cols = torch.arange(j0, j1).expand(i1 - i0, -1)
            vals, pos = torch.cat([best, d2], dim=1).topk(k, dim=1, largest=False)
            best_idx = torch.cat([best_idx, cols], dim=1).gather(1, pos)
            best = vals
        # exact distances to the selected neighbours
        raw_a = block(a, i0, i1)
        exact = torch.stack(
            [(raw_a - torch.from_numpy(b[best_idx[:, r].numpy()]).to(torch.float64)).norm(dim=1) for r in range(k)],
            dim=1,
        )
        out[i0:i1] = exact.sort(dim=1).values[:, k - 1].numpy()
    return out


def knn_distances(
    a: np.ndarray,
    b: np.ndarray | None = None,
    k: int = 1,
    method: KnnMethod = "auto",
    chunk_size: int | None = None,
) -> np.ndarray:
    """Euclidean distance from each row of ``a`` to its ``k``-th nearest neighbour among the rows of ``b``.

    Args:
        a: Query points ``[n, d]`` (trailing dimensions are flattened).
        b: Reference points ``[m, d]``; when ``None`` the neighbours are taken in ``a`` itself, excluding
            each point (by index, so exact duplicates give distance 0).
        k: Neighbour order (1 = nearest).
        method: ``"kdtree"`` (scipy ``cKDTree``), ``"brute"`` (exact chunked float64 torch matrix products) or
            ``"auto"`` (k-d tree for ``d <= 32``, brute force otherwise).
        chunk_size: Rows per block in the brute-force path (default: about 128 MiB of float64 per block).

    Returns:
        float64 array ``[n]`` of distances.
    """
    self_query = b is None
    a2 = _as_2d(a, "a")
    b2 = a2 if self_query else _as_2d(b, "b")
    if a2.shape[1] != b2.shape[1]:
        raise ValueError(f"dimension mismatch: {a2.shape[1]} vs {b2.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    available = b2.shape[0] - (1 if self_query else 0)
    if available < k:
        raise ValueError(f"need at least k={k} neighbours, have {available}")
    if method == "auto":
        method = "kdtree" if a2.shape[1] <= KDTREE_MAX_DIM else "brute"
    if method == "kdtree":
        tree = cKDTree(b2.astype(np.float64, copy=False))
        kk = k + 1 if self_query else k
        dist, idx = tree.query(a2.astype(np.float64, copy=False), k=kk, workers=-1)
        dist = dist.reshape(a2.shape[0], kk)
        if not self_query:
            return dist[:, k - 1]
        # Drop each point's own entry (by index when found; ties at distance 0 make the choice irrelevant).
        idx = idx.reshape(a2.shape[0], kk)
        own = idx == np.arange(a2.shape[0])[:, None]
        no_own = ~own.any(axis=1)
        own[no_own, -1] = True  # own point tied beyond the k+1 returned: the first k+1 are all at distance 0
        return dist[~own].reshape(a2.shape[0], k)[:, k - 1]
    if method == "brute":
        return _brute_knn(a2, b2, k, self_query, chunk_size)
    raise ValueError(f"unknown method {method!r}")


def knn_kl(
    p: np.ndarray,
    q: np.ndarray,
    k: int = 1,
    method: KnnMethod = "auto",
    eps: float = 1e-12,
    chunk_size: int | None = None,
) -> float:
    """k-NN estimate of ``KL(P ‖ Q)`` from samples (Wang, Kulkarni & Verdú, 2009).

    ``D ≈ (d / n) Σ_i log(ν_k(i) / ρ_k(i)) + log(m / (n − 1))``, where ``ρ_k(i)`` is the distance from
    ``p_i`` to its ``k``-th nearest neighbour among the other points of ``p`` and ``ν_k(i)`` the distance to
    its ``k``-th nearest neighbour in ``q``. The estimator is consistent but biased for finite samples (the
    bias shrinks roughly like ``n^{-1/d}``), and it assumes i.i.d. samples: autocorrelated MCMC draws inflate
    it, so compare against a noise floor (e.g. an independent chain of the same posterior) rather than 0.

    Args:
        p: Samples of ``P``, ``[n, d]``; higher-rank arrays are flattened per sample (e.g. ``[S, K, d]``).
        q: Samples of ``Q``, ``[m, d]``.
        k: Neighbour order.
        method: Nearest-neighbour search, see :func:`knn_distances` (``"auto"``: k-d tree up to 32 dimensions,
            exact chunked brute force above, which handles tens of thousands of dimensions).
        eps: Distances are clamped below at ``eps`` before taking logs, so exact duplicates (e.g. a stuck
            chain or repeated samples) give a large finite value instead of ``±inf``/NaN.
        chunk_size: Rows per block in the brute-force path.

    Returns:
        The estimate (nats) as a Python float.
    """
    p2 = _as_2d(p, "p")
    q2 = _as_2d(q, "q")
    n, d = p2.shape
    m = q2.shape[0]
    if q2.shape[1] != d:
        raise ValueError(f"dimension mismatch: p has {d}, q has {q2.shape[1]}")
    if n < k + 1 or m < k:
        raise ValueError(f"need n >= k + 1 and m >= k samples (n={n}, m={m}, k={k})")
    rho = knn_distances(p2, None, k=k, method=method, chunk_size=chunk_size)
    nu = knn_distances(p2, q2, k=k, method=method, chunk_size=chunk_size)
    log_ratio = np.log(np.maximum(nu, eps)) - np.log(np.maximum(rho, eps))
    return float(d * log_ratio.mean() + math.log(m / (n - 1)))


def thin(samples: _T, every: int) -> _T:
    """Keep every ``every``-th sample along the first axis, starting with the first (``samples[::every]``).

    Works for NumPy arrays, tensors and sequences.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return samples[::every]  # type: ignore[index]


def align_permutation(samples: np.ndarray, reference_means: np.ndarray) -> np.ndarray:
    """Component permutation that best matches a mixture sample set to reference means.

    One permutation is found for the whole set: the average over samples of each component's mean is matched
    to ``reference_means`` by the Hungarian algorithm on squared Euclidean distances.

    Args:
        samples: Samples of the component means, ``[S, K, d]`` (or ``[K, d]`` for a single sample).
        reference_means: Reference means, ``[K, d]``.

    Returns:
        int64 array ``perm`` of length ``K`` such that ``samples[:, perm]`` puts at position ``j`` the
        component matched to ``reference_means[j]``.
    """
    s = np.asarray(samples, dtype=np.float64)
    ref = np.asarray(reference_means, dtype=np.float64)
    if s.ndim == 2:
        s = s[None]
    if s.ndim != 3 or ref.ndim != 2 or s.shape[1:] != ref.shape:
        raise ValueError(f"expected samples [S, K, d] and reference [K, d], got {s.shape} and {ref.shape}")
    avg = s.mean(axis=0)
    cost = ((avg[:, None, :] - ref[None, :, :]) ** 2).sum(axis=-1)  # [K (sample comp), K (reference)]
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(ref.shape[0], dtype=np.int64)
    perm[cols] = rows
    return perm


def align_mixture_samples(samples: np.ndarray, reference_means: np.ndarray) -> np.ndarray:
    """Relabel the components of a mixture sample set to match ``reference_means``.

    See :func:`align_permutation`.

    Args:
        samples: ``[S, K, d]`` samples of the component means.
        reference_means: ``[K, d]`` reference means.

    Returns:
        The permuted samples ``samples[:, perm]`` (same shape).
    """
    s = np.asarray(samples)
    perm = align_permutation(s, reference_means)
    return s[:, perm] if s.ndim == 3 else s[perm]


def gaussian_kl(mu0: np.ndarray, cov0: np.ndarray, mu1: np.ndarray, cov1: np.ndarray) -> float:
    """Closed-form ``KL(N(mu0, cov0) ‖ N(mu1, cov1))`` in nats.

    Covariances are ``[d, d]`` matrices; a 1-D array is read as a diagonal of variances and a scalar as an
    isotropic variance.
    """
    mu0 = np.atleast_1d(np.asarray(mu0, dtype=np.float64))
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    d = mu0.shape[0]

    def as_matrix(c: np.ndarray) -> np.ndarray:
        c = np.asarray(c, dtype=np.float64)
        if c.ndim == 0:
            return np.eye(d) * c
        if c.ndim == 1:
            return np.diag(c)
        return c

    c0 = as_matrix(cov0)
    c1 = as_matrix(cov1)
    l1 = np.linalg.cholesky(c1)
    diff = mu1 - mu0
    sol = np.linalg.solve(l1, diff)
    trace = np.trace(np.linalg.solve(c1, c0))
    _, logdet0 = np.linalg.slogdet(c0)
    logdet1 = 2.0 * np.log(np.diag(l1)).sum()
    return float(0.5 * (trace + sol @ sol - d + logdet1 - logdet0))
