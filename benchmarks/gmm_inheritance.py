"""Why the unlearned GMM bank is (or is not) closer to the exact posterior than a retrain chain.

For each seed this rebuilds the demo's origin chain (same seeds and settings as ``mcmc-unlearner demo``), unlearns
the 800 points with the demo's settings and with other ``bank_shift`` choices, and compares with

* ``origin vs exact(all data)``: how well the origin chain itself samples *its* posterior (its Monte-Carlo error,
  which the bank carries into unlearning);
* ``unlearn[affine]``, ``unlearn[affine:newton2]``, ...: the demo's unlearner with the given ``bank_shift`` and,
  after ``:newtonK``, ``newton_steps=K`` (``K − 1`` Newton corrections zeroing the bank-averaged gradient of the
  remaining-data energy after each request);
* ``mean_err_coord``: per coordinate, the signed error of the set's mean in units of the exact posterior's sd
  (origin against the full-data posterior, the others against the remaining-data one). For a conjugate
  Gaussian the influence step maps a bank-mean error ``δ`` to ``δ·(n_k + 1)/(n'_k + 1)`` (``n_k``, ``n'_k``: the
  cluster's points before and after), i.e. ``sqrt((n_k + 1)/(n'_k + 1))`` times more in units of the new sd:
  about 2.6 and 2.0 for the two thinned clusters here;
* ``retrain+newton``: each retrain chain with the same Newton correction applied once to its samples
  (``θ ← θ − H⁻¹ E_s[∇F(θ_s, S∖S')]``, ``H`` the sample-averaged remaining-data Hessian): the fair yardstick for
  ``newton2``, since that correction also removes the Monte-Carlo error of a chain's mean, whoever made the chain;
* ``oracle``: the origin bank moved by the exact optimal affine transport between Gaussian fits of the exact
  full-data and remaining-data posteriors (Gibbs draws): ``T(θ) = m_r + A (θ − m_f)``,
  ``A = C_f^{-1/2} (C_f^{1/2} C_r C_f^{1/2})^{1/2} C_f^{-1/2}``. No bank-moving unlearner can be expected to do
  better than this: what remains is the origin chain's own error, transported.

Usage (from the repository root, ``PYTHONPATH=src``)::

    OMP_NUM_THREADS=1 python benchmarks/gmm_inheritance.py --seeds 0 1 2 3 4 [--sampler sgld] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import sqrtm

from mcmc_unlearner.datasets import gmm_removal_indices, make_gmm_2d
from mcmc_unlearner.experiments.gmm import DISTANCES, _chain
from mcmc_unlearner.experiments.references import gmm_gibbs
from mcmc_unlearner.metrics import align_mixture_samples, effective_sample_size, sample_set_distances
from mcmc_unlearner.unlearner import MCMCUnlearner

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder: _benchargs
import _benchargs as A


def _aligned(s: np.ndarray, centre: np.ndarray) -> np.ndarray:
    return align_mixture_samples(s.reshape(-1, 4, 2).astype(np.float64), centre).reshape(len(s), -1)


def _oracle(bank: np.ndarray, full: np.ndarray, rem: np.ndarray) -> np.ndarray:
    mf, mr = full.mean(0), rem.mean(0)
    cf, cr = np.cov(full, rowvar=False), np.cov(rem, rowvar=False)
    cf_h = np.real(sqrtm(cf))
    cf_ih = np.linalg.inv(cf_h)
    a = cf_ih @ np.real(sqrtm(cf_h @ cr @ cf_h)) @ cf_ih
    return mr + (bank - mf) @ a.T


def _newton_correct(samples: np.ndarray, x_rem: torch.Tensor) -> np.ndarray:
    """Shift every sample by ``−H⁻¹ ḡ``: ``ḡ`` the mean over 256 evenly spaced samples of ``∇F(θ, S∖S')`` (all
    remaining points), ``H`` the mean Hessian over 4 of them (dense, float64)."""
    from torch.func import grad, hessian

    from mcmc_unlearner.models.gmm import GaussianMixture

    xr = x_rem.to(torch.float64)

    def energy(flat: torch.Tensor) -> torch.Tensor:
        mu = flat.view(4, 2)
        sq = ((xr[:, None, :] - mu[None]) ** 2).sum(-1)
        nll = -torch.logsumexp(-0.5 * sq, dim=-1).sum()
        return nll + 0.5 * (mu**2).sum()  # constants dropped; prior N(0, 1)

    assert GaussianMixture().prior_std == 1.0
    th = torch.from_numpy(samples).to(torch.float64)
    pick = torch.linspace(0, len(th) - 1, 256).round().long()
    g = torch.stack([grad(energy)(t) for t in th[pick]]).mean(0)
    h = torch.stack([hessian(energy)(t) for t in th[torch.linspace(0, len(th) - 1, 4).round().long()]]).mean(0)
    return samples - torch.linalg.solve(h, g).numpy()


def _coord_err(s: np.ndarray, ref: np.ndarray) -> list[float]:
    return [float(v) for v in (s.mean(0) - ref.mean(0)) / ref.std(0, ddof=1)]


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
    out["mean_err_coord"] = {}
    for variant in shifts:
        shift, _, extra = variant.partition(":")
        newton = int(extra.removeprefix("newton")) if extra else 1
        origin = _chain(x, None, seed=1000 * seed + 1, label="origin", **args)
        if origin_bank is None:
            origin_bank = origin.samples.numpy().astype(np.float64)
        order = removed[torch.randperm(removed.numel(), generator=torch.Generator().manual_seed(1000 * seed + 4))]
        un = MCMCUnlearner(origin.model, origin.sampler, bank=origin.samples, solver="exact", expectation="bank",
                           hessian="remaining", bank_shift=shift, refresh_every=10, curvature_draws=4,
                           grad_draws=256, curvature_data="full", rescale_lr=True, newton_steps=newton)  # fmt: skip
        for ids in torch.split(order, 4):
            un.forget(ids, origin.data)
        bank = _aligned(un.bank.numpy(), c_rem)
        out[f"unlearn[{variant}]"] = sample_set_distances(bank, exact_rem.flat, every=10, mixture=(4, 2))
        out["mean_err_coord"][f"unlearn[{variant}]"] = _coord_err(bank, exact_rem.flat)
    assert origin_bank is not None
    ob_full = _aligned(origin_bank, c_full)
    out["origin_vs_exact_full"] = sample_set_distances(ob_full, full_flat, every=10, mixture=(4, 2))
    out["origin_ess_min"] = float(effective_sample_size(ob_full).min())
    out["mean_err_coord"]["origin"] = _coord_err(ob_full, full_flat)
    out["oracle"] = sample_set_distances(_oracle(ob_full, full_flat, exact_rem.flat), exact_rem.flat, every=10,
                                         mixture=(4, 2))  # fmt: skip
    retrain = [_chain(x, removed, seed=1000 * seed + s, label="retrain", **args).samples.numpy() for s in (2, 3)]
    retrain = [_aligned(r.astype(np.float64), c_rem) for r in retrain]
    out["retrain"] = [sample_set_distances(r, exact_rem.flat, every=10, mixture=(4, 2)) for r in retrain]
    x_rem = x[torch.from_numpy(keep)]
    out["retrain+newton"] = [
        sample_set_distances(_newton_correct(r, x_rem), exact_rem.flat, every=10, mixture=(4, 2)) for r in retrain
    ]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--sampler", default="sgld")
    p.add_argument("--shifts", nargs="+", default=["affine", "affine:newton2"])
    p.add_argument("--out", type=A.output_file, default=None, help="write the results here (its folder is created)")
    a = p.parse_args()
    torch.set_num_threads(1)  # before any work (run_seed sets it again for a caller of its own)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); sampler {a.sampler}, seeds {a.seeds}")
    results = []
    for seed in a.seeds:
        r = run_seed(seed, a.sampler, a.shifts)
        results.append(r)
        rows = [k for k in r if isinstance(r[k], dict) and k != "mean_err_coord"]
        print(f"seed {seed}: origin ESS(min) {r['origin_ess_min']:.1f}")
        for k in rows:
            print(f"  {k:24s} " + " ".join(f"{key}={r[k][key]:.3f}" for key in DISTANCES))
        for name in ("retrain", "retrain+newton"):
            for i, rr in enumerate(r[name]):
                print(f"  {name + ' ' + str(i):24s} " + " ".join(f"{key}={rr[key]:.3f}" for key in DISTANCES))
        for k, v in r["mean_err_coord"].items():
            print(f"  mean error / sd {k:24s} " + " ".join(f"{e:+.2f}" for e in v))
        if a.out:  # after every seed, so an interrupted run keeps what it measured
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
