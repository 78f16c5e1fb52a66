"""Synthetic data sets used in the paper's experiments.

The 2-D Gaussian-mixture set reproduces, bit for bit, the data of the reference implementation of
Fu, He & Tao (ICLR 2022): the legacy NumPy Mersenne-Twister stream is consumed in exactly the same order.
A private :class:`numpy.random.RandomState` is used, so the global NumPy random state is never touched
(``RandomState(seed)`` yields the same stream as ``np.random.seed(seed)`` followed by global calls).
"""

from __future__ import annotations

import numbers

import numpy as np

from .options import shown_value

__all__ = ["GMM_CLUSTER_COVS", "gmm_removal_indices", "make_gmm_2d"]

#: Per-cluster covariance matrices of the synthetic 2-D mixture (clusters 0..3).
GMM_CLUSTER_COVS: tuple[np.ndarray, ...] = (
    np.diag([1.0, 0.05]),
    np.eye(2),
    np.diag([0.05, 1.0]),
    np.eye(2),
)


def make_gmm_2d(n: int = 2000, seed: int = 23498353) -> tuple[np.ndarray, np.ndarray]:
    """Generate the synthetic 4-cluster 2-D Gaussian-mixture data set of the paper.

    Recipe (order of random draws matters): ``coef = rand() * 4``; the four cluster centres are one draw
    ``multivariate_normal(0, [[4, coef], [coef, 4]], size=4)``; centre 1 is shifted by ``[-1, 2.5]`` and
    centre 3 by ``[1, 0]``; then for each point a label ``k = randint(4)`` followed by one draw
    ``multivariate_normal(centre_k, cov_k)``.

    Args:
        n: Number of points.
        seed: Seed of the legacy NumPy generator.

    Returns:
        ``(x, y)``: points as float32 array ``[n, 2]`` and cluster labels as int64 array ``[n]``.
    """
    rs = np.random.RandomState(seed)  # legacy stream, needed for bit-exact reproduction
    coef = rs.rand() * 2 * 2
    centres = rs.multivariate_normal([0.0, 0.0], [[4.0, coef], [coef, 4.0]], size=4)
    centres[1] += np.array([-1.0, 2.5])
    centres[3] += np.array([1.0, 0.0])
    x = np.empty((n, 2), dtype=np.float64)
    y = np.empty(n, dtype=np.int64)
    for i in range(n):
        k = rs.randint(4)
        y[i] = k
        x[i] = rs.multivariate_normal(centres[k], GMM_CLUSTER_COVS[k])
    return x.astype(np.float32), y


def gmm_removal_indices(x: np.ndarray, y: np.ndarray, per_cluster: int = 400) -> np.ndarray:
    """Indices of the points removed in the paper's GMM experiment (tails of clusters 0 and 2).

    Selects the ``per_cluster`` cluster-0 points with the largest first coordinate and the ``per_cluster``
    cluster-2 points with the smallest second coordinate.

    Args:
        x: Points, shape ``[n, 2]``.
        y: Cluster labels, shape ``[n]``.
        per_cluster: Number of points taken from each of the two clusters.

    Returns:
        Sorted int64 array of ``2 * per_cluster`` indices into ``x``.

    Raises:
        ValueError: ``per_cluster`` is not a whole number >= 0, or exceeds a cluster's size.
    """
    if isinstance(per_cluster, (bool, np.bool_)) or not isinstance(per_cluster, numbers.Integral) or per_cluster < 0:
        raise ValueError(
            f"per_cluster must be a whole number >= 0 (points per cluster), got {shown_value(per_cluster)}"
        )
    per_cluster = int(per_cluster)
    x = np.asarray(x)
    y = np.asarray(y)
    idx0 = np.flatnonzero(y == 0)
    idx2 = np.flatnonzero(y == 2)
    if per_cluster > len(idx0) or per_cluster > len(idx2):
        raise ValueError(
            f"per_cluster={per_cluster} exceeds cluster sizes ({len(idx0)} in cluster 0, {len(idx2)} in cluster 2)"
        )
    top0 = idx0[np.argsort(-x[idx0, 0], kind="stable")[:per_cluster]]
    low2 = idx2[np.argsort(x[idx2, 1], kind="stable")[:per_cluster]]
    return np.sort(np.concatenate([top0, low2])).astype(np.int64)
