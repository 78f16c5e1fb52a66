"""The defaults on networks no test or benchmark uses (stop 70): one plain SGLD loop per network, then only
``MCMCUnlearner(model, None, nll=..., log_prior=..., bank=...).remove(...)``.

Each case runs in its own process (its peak memory is that process's). Networks chosen for code paths that can
break: one encoder applied to both halves of each image (``siamese``), a weight used as ``W`` and ``Wᵀ``
(``transposed``), input-normalisation buffers + a frozen random projection + eval-mode BatchNorm1d (``frozenbuf``),
pre-LayerNorm residual blocks with GELU and Dropout sampled in train mode and unlearned in eval mode
(``prelnres``), a grouped dilated Conv2d (``grouped``), a dilated, strided, grouped Conv1d over token sequences
(``dilated1d``), a 3-output regression with MSE (``multireg``), ``F.poisson_nll_loss`` counts (``poisson``) and a
forward returning ``(logits, features)`` (``tupleout``). ``frozenbuf-class`` removes one class whole; every other
case removes a random 5% of the training rows. Per case: an origin chain on all training rows and a retrain chain on
the remaining ones (same loop, initialisation and generator), banks kept as ``state_dict`` copies (buffers and frozen
weights in them, as a user keeps them); then one request with the defaults through a shuffled ``DataLoader`` and one
through an endless plain iterator over it (``n_remaining=``), each from a fresh unlearner on the same bank. Scored
as the model matrix scores: the forgotten rows' posterior-predictive NLL as a fraction of the way from origin to
retraining (band 0.5-2; one retrain chain, a noisy reference), the kept test error (points; outside the removed
class) or RMSE against retraining's, CPU seconds of the request, the process's peak RSS, any refusal (with whether
the bank, the rows and the live model were left unchanged), and whether frozen parameters and buffers came back
bit-identical in every returned sample.

    OMP_NUM_THREADS=1 python benchmarks/unseen_models.py --json unseen.json              # all ten cases
    OMP_NUM_THREADS=1 python benchmarks/unseen_models.py --models tupleout,multireg --seed 1

``--threads`` torch threads per process (default 1), set with ``torch.set_num_threads`` before any work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder: _benchargs
import _benchargs as A

MODELS = ("siamese", "transposed", "frozenbuf", "frozenbuf-class", "prelnres", "grouped", "dilated1d", "multireg",
          "poisson", "tupleout")  # fmt: skip


class Siamese(nn.Module):
    """One encoder applied to the top and the bottom half of each 8×8 image (a module called twice per row)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.head = nn.Linear(32, 24), nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = x[:, :32], x[:, 32:]
        return self.head(torch.cat([torch.tanh(self.enc(top)), torch.tanh(self.enc(bottom))], 1))


class Transposed(nn.Module):
    """An encoder's weight read again, transposed, as a decoder (``F.linear(h, W.T)``), then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.head = nn.Linear(64, 24), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc(x))
        return self.head(torch.tanh(F.linear(h, self.enc.weight.t())))


class FrozenBuf(nn.Module):
    """Input standardisation buffers, a frozen random projection, eval-mode BatchNorm1d and a non-persistent
    buffer (a fixed logit scale)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.register_buffer("scale", torch.tensor(1.5), persistent=False)
        self.proj = nn.Linear(64, 64)
        self.proj.requires_grad_(False)
        self.hid, self.bn, self.out = nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj((x - self.mean) / self.std))
        return self.out(F.relu(self.bn(self.hid(h)))) * self.scale


class PreLNRes(nn.Module):
    """Two pre-LayerNorm residual blocks (GELU, Dropout 0.2), a final LayerNorm without affine weights."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(64, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Dropout(0.2)) for _ in range(2)
        )
        self.norm, self.out = nn.LayerNorm(d, elementwise_affine=False), nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(self.norm(h))


class Grouped(nn.Module):
    """Conv2d, then a grouped (4 groups, 2 outputs per input channel) dilated Conv2d, GELU, average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=4)
        self.out = nn.Linear(16 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.c2(F.relu(self.c1(x.view(-1, 1, 8, 8)))))
        return self.out(F.adaptive_avg_pool2d(h, 2).flatten(1))


class Dilated1d(nn.Module):
    """Token embeddings, a dilated Conv1d and a strided grouped Conv1d, max over time."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.c1, self.c2 = nn.Conv1d(8, 16, 3, dilation=2), nn.Conv1d(16, 16, 3, stride=2, groups=2)
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c2(F.relu(self.c1(self.emb(x).transpose(1, 2)))))
        return self.out(h.amax(-1))


class TupleOut(nn.Module):
    """Returns ``(logits, features)``; the user's ``nll`` reads element 0."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(64, 32), nn.Tanh()), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return self.head(f), f


SIGMA = 0.3  # multireg's noise scale, known to the likelihood


def problem(name: str, g: torch.Generator) -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    """(model, x, y, likelihood kind) for one case, data drawn from ``g``."""
    if name == "dilated1d":  # label: token 3 occurs more often than token 7
        x = torch.randint(0, 12, (1200, 16), generator=g)
        return Dilated1d(), x, ((x == 3).sum(1) > (x == 7).sum(1)).long(), "cls"
    if name in ("multireg", "poisson"):
        x = torch.randn(1200, 8, generator=g)
        if name == "multireg":
            f = torch.stack([torch.sin(2 * x[:, 0]), x[:, 1] * x[:, 2], torch.tanh(x[:, 3] - x[:, 4])], 1)
            m = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
            return m, x, f + SIGMA * torch.randn(f.shape, generator=g), "mse"
        rate = torch.exp(0.8 * torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1] + 0.5)
        m = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        return m, x, torch.poisson(rate, generator=g), "poisson"
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = torch.randperm(len(d.target), generator=g)
    x, y = (torch.tensor(d.data, dtype=torch.float32) / 16.0)[perm], torch.tensor(d.target)[perm]
    if name.startswith("frozenbuf"):
        return FrozenBuf(x.mean(0), x.std(0) + 0.1), x, y, "cls"
    make = {"siamese": Siamese, "transposed": Transposed, "prelnres": PreLNRes, "grouped": Grouped,
            "tupleout": TupleOut}  # fmt: skip
    if name not in make:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return make[name](), x, y, "cls"


def make_nll(kind: str):
    """The user's per-row negative log-likelihood for a likelihood kind."""

    def nll(m: nn.Module, b) -> torch.Tensor:
        xb, yb = b
        out = m(xb)
        out = out[0] if isinstance(out, tuple) else out
        if kind == "cls":
            return F.cross_entropy(out, yb, reduction="none")
        if kind == "mse":
            return F.mse_loss(out, yb, reduction="none").sum(-1) / (2 * SIGMA**2)
        return F.poisson_nll_loss(out.squeeze(-1), yb, log_input=True, reduction="none")

    return nll


def forever(loader: DataLoader) -> Iterator:
    """An endless iterator over a DataLoader's minibatches (reshuffled every pass)."""
    while True:
        yield from loader


def run_one(name: str, seed: int, steps: int, options: dict | None = None) -> dict:
    """Both chains and both requests of one case (``options``: MCMCUnlearner keywords beside the defaults); a
    JSON-able row."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model, x, y, kind = problem(name, g)
    nll = make_nll(kind)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}

    def log_prior(m: nn.Module) -> torch.Tensor:  # N(0, I) on the trainable parameters, selected by name
        return -0.5 * sum((p**2).sum() for n, p in m.named_parameters() if n in trainable)

    n_test = len(x) // 5
    xt, yt, xtr, ytr = x[:n_test], y[:n_test], x[n_test:], y[n_test:]
    N = len(xtr)
    if name.endswith("-class"):
        forget = (ytr == 3).nonzero().squeeze(1)
    else:
        forget = torch.randperm(N, generator=g)[: round(0.05 * N)]
    keep = torch.ones(N, dtype=torch.bool)
    keep[forget] = False
    if isinstance(model, FrozenBuf):  # the BatchNorm's running statistics, fitted once on the training rows
        with torch.no_grad():
            model.train()
            model.bn.momentum = None
            model(xtr)
    params = [p for p in model.parameters() if p.requires_grad]
    init = {k: v.clone() for k, v in model.state_dict().items()}
    train_mode = name == "prelnres"  # dropout on while sampling, as users train; eval mode at unlearning
    lr_base = 0.02 if kind in ("mse", "poisson") else 0.5

    def sgld(rows: torch.Tensor) -> list[dict]:  # the user's loop: θ ← θ − ε/2 ∇F + N(0, ε)
        model.load_state_dict(init)
        model.train(train_mode)
        if isinstance(model, FrozenBuf):
            model.eval()  # BatchNorm on its fitted statistics
        gen = torch.Generator().manual_seed(seed + 7)
        n, bank = len(rows), []
        for t in range(steps):
            b = rows[torch.randint(0, n, (64,), generator=gen)]
            energy = n * nll(model, (xtr[b], ytr[b])).mean() - log_prior(model)
            grads = torch.autograd.grad(energy, params)
            lr = lr_base / n * (1 + t / 500) ** -0.55
            with torch.no_grad():
                for p, gr in zip(params, grads):
                    p.add_(-0.5 * lr * gr + math.sqrt(lr) * torch.randn(p.shape, generator=gen))
            if t >= steps // 2 and (t - steps // 2) % 25 == 0:
                bank.append({k: v.clone() for k, v in model.state_dict().items()})
        model.eval()
        return bank

    def predictions(bank: list[dict], xs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            outs = []
            for sd in bank:
                model.load_state_dict(sd)
                out = model(xs)
                outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.stack(outs)

    def predictive_nll(bank: list[dict], xs: torch.Tensor, ys: torch.Tensor) -> float:
        with torch.no_grad():
            per_draw = []
            for sd in bank:
                model.load_state_dict(sd)
                per_draw.append(nll(model, (xs, ys)))
        lp = -torch.stack(per_draw)
        return float(-(torch.logsumexp(lp, 0) - math.log(len(bank))).mean())

    def kept_error(bank: list[dict]) -> float:
        """Test error (%) outside a removed class, or test RMSE of the mean prediction (rate, for Poisson)."""
        out = predictions(bank, xt)
        if kind == "cls":
            mask = yt != 3 if name.endswith("-class") else torch.ones(len(yt), dtype=torch.bool)
            pred = out.softmax(-1).mean(0).argmax(-1)
            return float(100 * (pred[mask] != yt[mask]).float().mean())
        mean = out.exp().mean(0).squeeze(-1) if kind == "poisson" else out.mean(0)
        return float(((mean - yt) ** 2).mean().sqrt())

    c0 = time.process_time()
    origin = sgld(torch.arange(N))
    chain_cpu = time.process_time() - c0
    retrain = sgld(keep.nonzero().squeeze(1))
    res: dict = {"model": name, "seed": seed, "params": sum(p.numel() for p in model.parameters()),
                 "trainable": sum(p.numel() for p in params), "rows": N, "forgotten": len(forget),
                 "chain_cpu_seconds": chain_cpu, "kind": kind, "options": options or {}}  # fmt: skip
    scores = {}
    for label, bank in (("origin", origin), ("retrain", retrain)):
        scores[label] = {"forgotten_nll": predictive_nll(bank, xtr[forget], ytr[forget]), "kept": kept_error(bank)}
    from mcmc_unlearner import MCMCUnlearner

    for form in ("loader", "iterator"):
        model.load_state_dict(origin[-1])
        model.eval()
        live = {k: v.clone() for k, v in model.state_dict().items()}
        user_bank = [{k: v.clone() for k, v in sd.items()} for sd in origin]
        rows_removed = (xtr[forget].clone(), ytr[forget].clone())
        loader = DataLoader(TensorDataset(xtr[keep], ytr[keep]), batch_size=64, shuffle=True,
                            generator=torch.Generator().manual_seed(1))  # fmt: skip
        remaining = loader if form == "loader" else forever(loader)
        r: dict = {}
        c0 = time.process_time()
        try:
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                un = MCMCUnlearner(model, None, nll=nll, log_prior=log_prior, bank=user_bank, **(options or {}))
                report = un.remove(rows_removed, remaining, n_remaining=int(keep.sum()))
            r["warnings"] = sorted({str(w.message)[:300] for w in said})
            r["cpu_seconds"] = time.process_time() - c0
            r.update(status="ok", solver=un.solver.value, damping_relative=report.damping_relative,
                     problems=list(report.problems))  # fmt: skip
            out = un.samples()
            r["frozen_and_buffers_kept"] = all(
                torch.equal(sd[k], origin[i][k]) for i, sd in enumerate(out) for k in sd if k in frozen | buffers
            )
            r["layout_kept"] = all(set(sd) == set(origin[0]) for sd in out)
            fn = predictive_nll(out, xtr[forget], ytr[forget])
            o, rt = scores["origin"]["forgotten_nll"], scores["retrain"]["forgotten_nll"]
            r.update(forgotten_nll=fn, fraction=(fn - o) / (rt - o) if abs(rt - o) > 1e-9 else None,
                     kept=kept_error(out))  # fmt: skip
        except Exception as e:  # recorded: the point is to see what fails
            r["cpu_seconds"] = time.process_time() - c0
            r["status"] = f"{type(e).__name__}: {e}"
            r["live_model_unchanged"] = all(torch.equal(v, live[k]) for k, v in model.state_dict().items())
        r["bank_unchanged"] = all(torch.equal(sd[k], o_[k]) for sd, o_ in zip(user_bank, origin) for k in sd)
        r["rows_unchanged"] = bool(torch.equal(rows_removed[0], xtr[forget]))
        res[form] = r
    res.update(scores)
    res["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=A.name_list(MODELS), default=",".join(MODELS), help="comma-separated subset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=A.positive_int, default=2000, help="SGLD steps per chain (default 2000)")
    ap.add_argument(
        "--options", type=A.json_object_text, default="{}", help="MCMCUnlearner options as JSON (default: none)"
    )
    ap.add_argument("--json", type=A.output_file, default=None)
    ap.add_argument("--threads", type=A.positive_int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--one", type=A.one_of(MODELS), default=None, help=argparse.SUPPRESS)  # internal: one case here
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # the cases' processes inherit it
    if args.one:
        row = run_one(args.one, args.seed, args.steps, json.loads(args.options))
        print(json.dumps({**row, "threads": torch.get_num_threads()}))
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) per case's process (set by --threads)")
    print(f"{'case':<16}{'params':>7}  {'form':<9}{'status':<8}{'solver':<7}{'fraction':>9}{'kept u/r/o':>20}"
          f"{'req s':>7}{'chain s':>8}{'peak GB':>8}")  # fmt: skip
    rows = []
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--seed", str(args.seed), "--steps", str(args.steps),
               "--threads", str(args.threads), "--options", args.options]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            rows.append({"model": name, "crashed": f"exit {out.returncode}: {out.stderr.strip()[-400:]}"})
            print(f"{name:<16} crashed: {out.stderr.strip()[-400:]}", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        for form in ("loader", "iterator"):
            f = r[form]
            frac = f.get("fraction")
            kept = f"{f.get('kept', math.nan):.3f}/{r['retrain']['kept']:.3f}/{r['origin']['kept']:.3f}"
            print(f"{name:<16}{r['params']:>7,}  {form:<9}{f['status'][:7]:<8}{f.get('solver', '-'):<7}"
                  f"{frac if frac is None else round(frac, 3)!s:>9}{kept:>20}{f['cpu_seconds']:>7.1f}"
                  f"{r['chain_cpu_seconds']:>8.1f}{r['peak_gb']:>8.2f}", flush=True)  # fmt: skip
            if not f["status"].startswith("ok"):
                print(f"    {f['status'][:400]} (bank unchanged: {f['bank_unchanged']}, "
                      f"live model unchanged: {f.get('live_model_unchanged')})")  # fmt: skip
            elif not (f["frozen_and_buffers_kept"] and f["bank_unchanged"] and f["layout_kept"]):
                print(f"    frozen/buffers kept {f['frozen_and_buffers_kept']}, bank unchanged {f['bank_unchanged']},"
                      f" layout kept {f['layout_kept']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "threads": args.threads, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
