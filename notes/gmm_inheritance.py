"""Why the unlearned GMM bank is (or is not) closer to the exact posterior than a retrain chain.

For each seed this rebuilds the demo's origin chain (same seeds and settings as ``mcmc-unlearner demo``), unlearns
the 800 points with the demo's settings and with other ``bank_shift`` choices, and compares with

* ``origin vs exact(all data)``: how well the origin chain itself samples *its* posterior (its Monte-Carlo error,
  which the bank carries into unlearning);
* ``oracle``: the origin bank moved by the exact optimal affine transport between Gaussian fits of the exact
  full-data and remaining-data posteriors (Gibbs draws): ``T(θ) = m_r + A (θ − m_f)``,
  ``A = C_f^{-1/2} (C_f^{1/2} C_r C_f^{1/2})^{1/2} C_f^{-1/2}``. No bank-moving unlearner can be expected to do
  better than this: what remains is the origin chain's own error, transported.

Usage (from the repository root, ``PYTHONPATH=src``)::

    OMP_NUM_THREADS=1 python notes/gmm_inheritance.py --seeds 0 1 2 3 4 [--sampler sgld] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.linalg import sqrtm

from mcmc_unlearner.datasets import gmm_removal_indices, make_gmm_2d
from mcmc_unlearner.experiments.gmm import DISTANCES, _chain
from mcmc_unlearner.experiments.references import gmm_gibbs
from mcmc_unlearner.metrics import align_mixture_samples, effective_sample_size, sample_set_distances
from mcmc_unlearner.unlearner import MCMCUnlearner


def _aligned(s: np.ndarray, centre: np.ndarray) -> np.ndarray:
    return align_mixture_samples(s.reshape(-1, 4, 2).astype(np.float64), centre).reshape(len(s), -1)


def _oracle(bank: np.ndarray, full: np.ndarray, rem: np.ndarray) -> np.ndarray:
    mf, mr = full.mean(0), rem.mean(0)
    cf, cr = np.cov(full, rowvar=False), np.cov(rem, rowvar=False)
    cf_h = np.real(sqrtm(cf))
    cf_ih = np.linalg.inv(cf_h)
    a = cf_ih @ np.real(sqrtm(cf_h @ cr @ cf_h)) @ cf_ih
    return mr + (bank - mf) @ a.T


def run_seed(seed: int, sampler: str, shifts: list[str]) -> dict:
    torch.set_num_threads(1)
    x_np, y_np = make_gmm_2d(2000)
    rem_np = gmm_removal_indices(x_np, y_np, per_cluster=400)
    x, removed = torch.from_numpy(x_np), torch.from_numpy(rem_np)
    args = dict(kind=sampler, burnin=4000, samples=4000, batch_size=64, lr0=4.0, decay=0.5005, alpha=0.9,
                progress=False)  # fmt: skip
    keep = np.ones(2000, dtype=bool)
    keep[rem_np] = False
    t0 = time.perf_counter()
    exact_rem = gmm_gibbs(x_np[keep], n_draws=4000, seed=1000 * seed + 7)
    exact_full = gmm_gibbs(x_np, n_draws=4000, seed=1000 * seed + 17)
    c_rem, c_full = exact_rem.samples.mean(0), exact_full.samples.mean(0)
    # match the labels of the full-data reference to the remaining-data one (same components, moved)
    full_flat = _aligned(exact_full.flat, c_rem)
    c_full = full_flat.reshape(-1, 4, 2).mean(0)
    out: dict = {"seed": seed, "sampler": sampler, "gibbs_seconds": time.perf_counter() - t0}
    origin_bank = None
    for shift in shifts:
        origin = _chain(x, None, seed=1000 * seed + 1, label="origin", **args)
        if origin_bank is None:
            origin_bank = origin.samples.numpy().astype(np.float64)
        order = removed[torch.randperm(removed.numel(), generator=torch.Generator().manual_seed(1000 * seed + 4))]
        un = MCMCUnlearner(origin.model, origin.sampler, bank=origin.samples, solver="exact", expectation="bank",
                           hessian="remaining", bank_shift=shift, refresh_every=10, curvature_draws=4,
                           grad_draws=256, curvature_data="full", rescale_lr=True)  # fmt: skip
        for ids in torch.split(order, 4):
            un.forget(ids, origin.data)
        bank = _aligned(un.bank.numpy(), c_rem)
        out[f"unlearn[{shift}]"] = sample_set_distances(bank, exact_rem.flat, every=10, mixture=(4, 2))
    assert origin_bank is not None
    ob_full = _aligned(origin_bank, c_full)
    out["origin_vs_exact_full"] = sample_set_distances(ob_full, full_flat, every=10, mixture=(4, 2))
    out["origin_ess_min"] = float(effective_sample_size(ob_full).min())
    out["oracle"] = sample_set_distances(_oracle(ob_full, full_flat, exact_rem.flat), exact_rem.flat, every=10,
                                         mixture=(4, 2))  # fmt: skip
    retrain = [_chain(x, removed, seed=1000 * seed + s, label="retrain", **args).samples.numpy() for s in (2, 3)]
    out["retrain"] = [
        sample_set_distances(_aligned(r, c_rem), exact_rem.flat, every=10, mixture=(4, 2)) for r in retrain
    ]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--sampler", default="sgld")
    p.add_argument("--shifts", nargs="+", default=["affine", "mean"])
    p.add_argument("--out", default=None)
    a = p.parse_args()
    results = []
    for seed in a.seeds:
        r = run_seed(seed, a.sampler, a.shifts)
        results.append(r)
        rows = [k for k in r if isinstance(r[k], dict)]
        print(f"seed {seed}: origin ESS(min) {r['origin_ess_min']:.1f}")
        for k in rows:
            print(f"  {k:24s} " + " ".join(f"{key}={r[k][key]:.3f}" for key in DISTANCES))
        for i, rr in enumerate(r["retrain"]):
            print(f"  {'retrain chain ' + str(i):24s} " + " ".join(f"{key}={rr[key]:.3f}" for key in DISTANCES))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
