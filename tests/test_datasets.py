"""Tests for the synthetic data sets (pinned to the reference implementation's bytes)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from mcmc_unlearner.datasets import gmm_removal_indices, make_gmm_2d

X_SHA = "c15adc28f7be00ce590fe24b1157e314aafedee5ba08108de7a80428062ca715"
Y_SHA = "0136f4b1ea6e9d8f4e4fc86d63de10d8afe5d091d25a4bc1014aff1ec68441c1"
IDX_SHA = "ad996dc940dcfca42cf627ff96beb5a48b8755956cb7f80d36f1b660adc64088"
REFERENCE_NPZ = Path(__file__).resolve().parents[2] / "shared" / "reference" / "gmm-2d-syn-set.npz"


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()


def test_make_gmm_2d_matches_reference_hashes() -> None:
    x, y = make_gmm_2d()
    assert x.shape == (2000, 2) and x.dtype == np.float32
    assert y.shape == (2000,) and y.dtype == np.int64
    assert _sha(x) == X_SHA
    assert _sha(y) == Y_SHA


def test_make_gmm_2d_does_not_touch_global_state() -> None:
    np.random.seed(7)  # noqa: NPY002
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    make_gmm_2d(n=10)
    after = np.random.get_state()[1]  # noqa: NPY002
    np.testing.assert_array_equal(before, after)


def test_make_gmm_2d_prefix_and_seed() -> None:
    x_full, y_full = make_gmm_2d()
    x_small, y_small = make_gmm_2d(n=100)
    np.testing.assert_array_equal(x_small, x_full[:100])
    np.testing.assert_array_equal(y_small, y_full[:100])
    x_other, _ = make_gmm_2d(n=100, seed=1)
    assert not np.array_equal(x_other, x_small)


def test_gmm_removal_indices_hash() -> None:
    x, y = make_gmm_2d()
    idx = gmm_removal_indices(x, y)
    assert idx.dtype == np.int64 and idx.shape == (800,)
    assert np.all(np.diff(idx) > 0)
    assert _sha(idx) == IDX_SHA
    assert set(np.unique(y[idx])) == {0, 2}
    assert (y[idx] == 0).sum() == 400


def test_gmm_removal_indices_selects_tails() -> None:
    x, y = make_gmm_2d()
    idx = gmm_removal_indices(x, y, per_cluster=50)
    sel0 = idx[y[idx] == 0]
    rest0 = np.setdiff1d(np.flatnonzero(y == 0), sel0)
    assert x[sel0, 0].min() >= x[rest0, 0].max()
    sel2 = idx[y[idx] == 2]
    rest2 = np.setdiff1d(np.flatnonzero(y == 2), sel2)
    assert x[sel2, 1].max() <= x[rest2, 1].min()
    with pytest.raises(ValueError):
        gmm_removal_indices(x, y, per_cluster=10_000)


@pytest.mark.skipif(not REFERENCE_NPZ.exists(), reason="reference npz not available")
def test_make_gmm_2d_matches_reference_npz() -> None:
    ref = np.load(REFERENCE_NPZ)
    x, y = make_gmm_2d()
    np.testing.assert_array_equal(x, ref["x"])
    np.testing.assert_array_equal(y, ref["y"])


@pytest.mark.parametrize("bad", [-1, -100, 2.5, 3.0, True, "4"])
def test_gmm_removal_indices_refuses_a_bad_per_cluster(bad) -> None:
    x, y = make_gmm_2d(n=400)
    with pytest.raises(ValueError, match="per_cluster must be a whole number >= 0"):
        gmm_removal_indices(x, y, per_cluster=bad)
    assert gmm_removal_indices(x, y, per_cluster=np.int64(3)).shape == (6,)
