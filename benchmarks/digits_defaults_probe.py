"""Per-request step control of the library defaults vs the former tuned settings on the digits benchmark case.

    PYTHONPATH=src python benchmarks/digits_defaults_probe.py [--quick]

Prints, after each of the 3 requests, the bank's removed-point and kept-class test errors and the step-control
record (damping, predicted/actual change of the bank-averaged remaining-data energy, mean NLL change of held
remaining rows, checks).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import run as B
from mcmc_unlearner import SGLD, MCMCUnlearner, RemovableDataset
from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.models.bnn import build_model


def main(quick: bool) -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); quick={quick}", flush=True)
    setup = B._digits_setup(quick)
    ds = setup["ds"]
    x, y = ds.x_train, ds.y_train
    removed = torch.nonzero(y == 0).flatten()
    requests = list(removed.split(64))
    model, sampler, bank = B._digits_chain(setup, RemovableDataset(x, y, batch_size=128, seed=0), seed=10)
    ev = build_model("digits_net", ds.in_shape, ds.n_classes)
    tk = ds.y_test != 0

    def errors(b: torch.Tensor) -> str:
        pr = pt = 0
        for th in b:
            ParamSpec.assign(ev, th)
            with torch.no_grad():
                pr = pr + torch.softmax(ev(x[removed]), -1)
                pt = pt + torch.softmax(ev(ds.x_test[tk]), -1)
        er = float((pr.argmax(-1) != y[removed]).float().mean())
        et = float((pt.argmax(-1) != ds.y_test[tk]).float().mean())
        return f"removed error {er:.3f}, kept-class test error {et:.3f}"

    print("origin:", errors(bank))
    make = lambda p: SGLD(p, lr=1.0, generator=torch.Generator().manual_seed(5))  # noqa: E731
    for name, kw in [("defaults", {}), ("tuned", B.OURS_TUNED["digits"])]:
        m, s = B._clone_chain(model, sampler, make)
        un = MCMCUnlearner(m, s, bank=bank, **kw)
        data = RemovableDataset(x, y, batch_size=128, seed=0)
        for i, ids in enumerate(requests):
            r = un.forget(ids, data)
            print(
                f"{name} request {i}: {errors(un.bank)}; damping {r.damping:.3g}, predicted {r.predicted_change:.3g}, "
                f"actual {r.actual_change:.3g} ± {r.actual_stderr:.2g}, remaining NLL change "
                f"{r.remaining_nll_change:+.3g} per row, shift {r.shift_norm:.3g}, problems {r.problems}"
            )


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter chains")
    main(ap.parse_args().quick)
