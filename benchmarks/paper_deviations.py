"""Effect of each deviation of the old benchmark's paper re-implementation (docs/performance.md).

    PYTHONPATH=src python benchmarks/paper_deviations.py [--quick]

Conjugate case (3 seeds): fraction of the exact mean shift left undone. Digits case (2 seeds): removed-point and
kept-class test error of the shifted bank. Variants: faithful (experiments/paper.py), the old benchmark (ids removed
before the solve + one minibatch for sampler step and product + step-size rescaling), and each deviation alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import run as B
from mcmc_unlearner import SGLD, RemovableDataset
from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.experiments import paper as P
from mcmc_unlearner.models.bnn import build_model
from mcmc_unlearner.models.linreg import MultiChainLinearRegression, exact_posterior
from mcmc_unlearner.samplers import run_chain, scale_lr


class SameBatch(P._ReferenceUnlearner):
    """The old benchmark's product: one minibatch ``z`` for both the sampler step and the Hessian-vector product
    (the faithful procedure, the seed class's ``_sampled_hvp`` since stop 46, draws a second minibatch for it)."""

    def _sampled_hvp(self, v: torch.Tensor, sampler) -> torch.Tensor:
        total = None
        for _ in range(self.param_dict["samp_T"]):
            z = next(sampler)
            self._apply_sample(z)
            flat = self._flat(self._grad(self._fun(z), create_graph=True))
            hv = self._flat(list(torch.autograd.grad(flat, self.params, grad_outputs=v, allow_unused=True)))
            total = hv.detach() if total is None else total + hv.detach()
        return total / self.param_dict["samp_T"]


def apply(pu: P.PaperUnlearner, data: RemovableDataset, requests, remove_first: bool, init: float, rescale: bool):
    for ids in requests:
        if remove_first:  # the old benchmark: remove, n and scaling from the remaining count, then solve
            batch, n_old = data.get(ids), len(data)
            data.remove(ids)
            pu._un.n = len(data)
            pu._un.param_dict["scaling"] = init / len(data)
            res = pu._un.remove(list(batch), data)
            pu.bank += res.x
            if rescale:
                scale_lr(pu.sampler, n_old / len(data))
        else:
            pu.forget(ids, data)


VARIANTS = {  # remove_first, same_batch, rescale
    "faithful": (False, False, None),
    "old benchmark (all three)": (True, True, True),
    "ids removed first, alone": (True, False, None),
    "one minibatch, alone": (False, True, None),
    "step size rescaled, alone": (False, False, True),
}


def conjugate(seeds: int = 3) -> None:
    n, d, chains = 2000, 10, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, generator=g) + torch.randn(n, generator=g)
    removed = torch.argsort(y, descending=True)[: n // 20]
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    m0, c0 = exact_posterior(x, y)
    delta = exact_posterior(x[keep], y[keep])[0] - m0
    requests = list(removed.split(10))
    for name, (first, same, rescale) in VARIANTS.items():
        out = []
        for seed in range(seeds):
            model = MultiChainLinearRegression(chains, d, n=n)
            model.start_at(m0, c0, torch.Generator().manual_seed(1))
            sampler = SGLD(model.parameters(), lr=0.001 / n, generator=torch.Generator().manual_seed(2 + 100 * seed))
            data = RemovableDataset(x, y, batch_size=64, seed=3 + 100 * seed)
            bank = run_chain(model, sampler, data, B.energy, 100, n, keep_every=1)
            settings = {**P.GMM_REFERENCE.kwargs(), "rescale_lr": bool(rescale)}
            pu = P.PaperUnlearner(model, sampler, bank=bank, **settings)
            if same:
                pu._un.__class__ = SameBatch
            apply(pu, data, requests, first, 1.0, bool(rescale))
            moved = (pu.bank - bank).reshape(-1, chains, d).mean((0, 1)).double()
            out.append(float((delta - moved).norm() / delta.norm()))
        print(f"conjugate  {name:28s} undone " + ", ".join(f"{u:.3f}" for u in out))


def digits(quick: bool, seeds: tuple[int, ...] = (5, 6)) -> None:
    setup = B._digits_setup(quick)
    ds = setup["ds"]
    x, y = ds.x_train, ds.y_train
    removed = torch.nonzero(y == 0).flatten()
    requests = list(removed.split(64))
    model, sampler, bank = B._digits_chain(setup, RemovableDataset(x, y, batch_size=128, seed=0), seed=10)
    ev = build_model("digits_net", ds.in_shape, ds.n_classes)
    tk = ds.y_test != 0

    def errors(b: torch.Tensor) -> tuple[float, float]:
        pr = pt = 0
        for th in b:
            ParamSpec.assign(ev, th)
            with torch.no_grad():
                pr = pr + torch.softmax(ev(x[removed]), -1)
                pt = pt + torch.softmax(ev(ds.x_test[tk]), -1)
        err_removed = float((pr.argmax(-1) != y[removed]).float().mean())
        return err_removed, float((pt.argmax(-1) != ds.y_test[tk]).float().mean())

    print(f"digits     origin: removed error {errors(bank)[0]:.3f}, kept-class test error {errors(bank)[1]:.3f}")
    for name, (first, same, _) in VARIANTS.items():
        if name == "step size rescaled, alone":  # the BNN reference rescales too: not a deviation here
            continue
        for seed in seeds:
            make = lambda p, s=seed: SGLD(p, lr=1.0, generator=torch.Generator().manual_seed(s))  # noqa: E731
            m, s = B._clone_chain(model, sampler, make)
            data = RemovableDataset(x, y, batch_size=128, seed=seed)
            pu = P.PaperUnlearner(m, s, bank=bank, **P.FMNIST_REFERENCE.kwargs())
            if same:
                pu._un.__class__ = SameBatch
            apply(pu, data, requests, first, 0.05, True)
            er, et = errors(pu.bank)
            shift = float((pu.bank - bank).mean(0).norm())
            print(f"digits     {name:28s} seed {seed}: removed error {er:.3f}, kept-class test error {et:.3f}, "
                  f"shift norm {shift:.3f}")  # fmt: skip


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter chains in the digits case")
    quick = ap.parse_args().quick
    torch.set_num_threads(1)
    print(f"torch threads {torch.get_num_threads()}; quick={quick}")
    conjugate()
    digits(quick)
