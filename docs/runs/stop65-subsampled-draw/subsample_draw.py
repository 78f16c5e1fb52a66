"""The emptied-class draw on a subset of the remaining rows (likelihood reweighted per label) against the full draw.

Digits BNN (the ``bnn`` experiment's defaults, ``--seed S``): the origin chain's bank; class 0's output-layer row
drawn from its conditional given the remaining rows (``emptied.resample_label_rows``), exactly (``--repeats``
independent draws, 4: the Monte Carlo noise floor) and on a stratified random subset of ``f`` of the remaining rows
of each label, each row's cross-entropy weighted ``n_c / m_c`` (an unbiased estimate of the data term; the draw is
then one from a randomly perturbed conditional, no longer a Gibbs step of the retrained posterior). ``groups``
subsets per draw (samples split evenly; one subset shared by all samples at 1).

Run (``digits-s{0,1}.jsonl``): ``OMP_NUM_THREADS=1 PYTHONPATH=src python
docs/runs/stop65-subsampled-draw/subsample_draw.py --seed 0 --fracs 0.5,0.125``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mcmc_unlearner.curvature import ParamSpec, functionalize
from mcmc_unlearner.emptied import resample_label_rows
from mcmc_unlearner.experiments import bnn
from mcmc_unlearner.experiments.options import BNNConfig


def _subset(y: torch.Tensor, frac: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of a stratified random subset (``frac`` of each label's rows, at least one) and their weights."""
    idx, w = [], []
    for c in y.unique():
        rows = torch.nonzero(y == c).flatten()
        m = max(1, round(frac * rows.numel()))
        pick = rows[torch.randperm(rows.numel(), generator=gen)[:m]]
        idx.append(pick)
        w.append(torch.full((m,), rows.numel() / m, dtype=torch.float64))
    return torch.cat(idx), torch.cat(w)


def main() -> None:
    """Draw, measure and print one JSON line per draw."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fracs", default="0.5,0.25,0.125")
    ap.add_argument("--groups", default="1,10")
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = BNNConfig(seed=args.seed, methods=["unlearn"], retrain_chains=2, progress=False)
    ex = bnn._Experiment(cfg)
    origin = ex.train(torch.arange(ex.n_full), cfg.seed * 1000 + 1, "origin")
    model, bank = origin["model"], origin["bank"]
    un = bnn._unlearner(ex, model, origin["sampler"], bank)
    spec = ParamSpec.of(model)
    lp_f = functionalize(model, lambda m: un.log_prior(m))
    x, y = ex.x_train[ex.kept_ids], ex.y_train[ex.kept_ids]
    label = cfg.remove_class
    S = bank.shape[0]

    def draw(seed: int, frac: float = 1.0, groups: int = 1) -> tuple[torch.Tensor, float]:
        gen = torch.Generator().manual_seed(seed)
        c0 = time.process_time()
        if frac >= 1.0:
            out = resample_label_rows(model, spec, lp_f, bank, (x, y), [label], gen)
            assert not isinstance(out, str), out
            return out[0], time.process_time() - c0
        parts = []
        for part in torch.tensor_split(bank, groups):
            idx, w = _subset(y, frac, gen)
            out = resample_label_rows(model, spec, lp_f, part, (x[idx], y[idx]), [label], gen, weights=w)
            assert not isinstance(out, str), out
            parts.append(out[0])
        return torch.cat(parts), time.process_time() - c0

    rows_index = None

    def spec_rows(thetas: torch.Tensor) -> torch.Tensor:
        nonlocal rows_index
        if rows_index is None:
            from mcmc_unlearner.emptied import output_rows

            rows_index = output_rows(model, spec, bank[0], x[:4]).index(label)
        return thetas[:, rows_index].double()

    def measure(thetas: torch.Tensor, cpu: float) -> dict:
        probs = ex.predict(thetas)
        return {
            "cpu_s": cpu,
            "p_removed": float(probs["removed"][:, label].mean()),
            "p_test_class": float(probs["test"][~ex.test_kept_mask][:, label].mean()),
            "p_kept_test": float(probs["test_kept"][:, label].mean()),
            "row_mean": spec_rows(thetas).mean(0),
            "row_sd": float(spec_rows(thetas).std(0).mean()),
        }

    R = args.repeats
    runs: dict[str, list[dict]] = {"exact": [measure(*draw(1 + r)) for r in range(R)]}
    for groups in map(int, args.groups.split(",")):
        for frac in map(float, args.fracs.split(",")):
            runs[f"subset {frac:g}, {groups} group(s)"] = [
                measure(*draw(1000 * groups + int(1000 * frac) + 7 * r, frac, groups)) for r in range(R)
            ]
    exact_rows = torch.stack([m["row_mean"] for m in runs["exact"]])
    print(json.dumps({"seed": args.seed, "samples": S, "remaining_rows": int(x.shape[0]), "repeats": R}))
    print(json.dumps({"draw": "origin (no draw)", **{k: v for k, v in measure(bank, 0.0).items() if k != "row_mean"}}))
    for name, ms in runs.items():
        out: dict = {"draw": name}
        for k in ("cpu_s", "p_removed", "p_test_class", "p_kept_test", "row_sd"):
            v = torch.tensor([m[k] for m in ms], dtype=torch.float64)
            out[k] = f"{float(v.mean()):.5g} +- {float(v.std()) if len(v) > 1 else 0.0:.2g}"
        d = []
        for r, m in enumerate(ms):  # RMS over the row's coordinates of its mean minus the exact draws' (leave-one-out)
            others = [j for j in range(R) if not (name == "exact" and j == r)]
            d.append(float((m["row_mean"] - exact_rows[others].mean(0)).pow(2).mean().sqrt()))
        out["row_mean_rms_to_exact"] = f"{sum(d) / len(d):.4g}"
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
