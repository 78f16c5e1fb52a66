"""The defaults on layer types the library was never tuned on: one plain SGLD loop per network, then only
``MCMCUnlearner(model, None, nll=..., log_prior=..., bank=...).remove(...)``.

Each network runs in its own process (its peak memory is that process's), on scikit-learn's digits (8×8 images)
or on synthetic token sequences (label: does token 3 occur; the tied-embedding model: the next token). Per
network: an origin chain on all training rows and a retrain chain on the remaining ones (the same SGLD loop and
seed), 50 samples each; one request with the defaults; the forgotten rows' posterior-predictive NLL as a fraction
of the way from origin to retraining (one retrain chain: a noisy reference, the model matrix measures that noise)
and the test NLL of all three.

    OMP_NUM_THREADS=1 python benchmarks/layer_zoo.py --json zoo.json          # all 23 networks, ~8 CPU-min
    OMP_NUM_THREADS=1 python benchmarks/layer_zoo.py --models depthwise --options '{"solver": "exact"}'

``--threads`` torch threads per process (default 1; README, "Threads"), set with ``torch.set_num_threads`` before
any work in the parent and in every network's process, printed in the header and saved in the JSON (top level and
each row, as the network's process read it back).
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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder: _benchargs
import _benchargs as A

MODELS = ("layernorm", "tied", "frozen", "depthwise", "groupnorm", "convtranspose", "conv1d", "lstm", "gru",
          "binary", "hetero", "poisson", "tiedlm", "mha", "temperature", "bilinear", "dictout", "float64",
          "weightnorm", "orthogonal", "spectral", "scripted", "hooked")  # fmt: skip


class _Img(nn.Module):
    def __init__(self, body: nn.Module, feat: int) -> None:
        super().__init__()
        self.body, self.out = body, nn.Linear(feat, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x.view(-1, 1, 8, 8)).flatten(1))


class _Tied(nn.Module):
    """One hidden layer applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mid(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.mid(h)))


class _Seq(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.emb, self.out = kind, nn.Embedding(20, 12), nn.Linear(16, 2)
        rnn = getattr(nn, kind.upper(), None)
        self.body = nn.Conv1d(12, 16, 3, padding=1) if kind == "conv1d" else rnn(12, 16, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        if self.kind == "conv1d":
            return self.out(F.relu(self.body(e.transpose(1, 2))).mean(-1))
        return self.out(self.body(e)[0][:, -1])


class _TiedLM(nn.Module):
    """Next-token prediction with the output layer's weight tied to the input embedding (as language models do)."""

    def __init__(self, vocab: int = 20, d: int = 16) -> None:
        super().__init__()
        self.emb, self.mix = nn.Embedding(vocab, d), nn.Linear(d, d)
        self.out = nn.Linear(d, vocab)
        self.out.weight = self.emb.weight  # state_dict() lists the shared tensor under both names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(x[:, -2:]).sum(1))))


class _Attention(nn.Module):
    """``nn.MultiheadAttention`` on torch's default (fused) kernel, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.att = nn.Embedding(20, 12), nn.MultiheadAttention(12, 2, batch_first=True)
        self.out = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        return self.out(self.att(h, h, h, need_weights=False)[0].mean(1))


class _Temperature(nn.Module):
    """An MLP whose logits are scaled by a learned temperature (a bare scalar ``nn.Parameter``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.log_t = (
            nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
            nn.Parameter(torch.zeros(())),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.log_t.exp()


class _Bilinear(nn.Module):
    """A PReLU hidden layer (learned slopes) read out by ``nn.Bilinear``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Linear(64, 16), nn.PReLU(16), nn.Bilinear(16, 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.a(x))
        return self.b(h, h)


class _DictOut(nn.Module):
    """Returns a dict, as many library models do; the user's ``nll`` reads its ``"logits"``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.body(x), "features": None}


def _parametrized(name: str) -> nn.Module:
    from torch.nn.utils import parametrizations as P

    if name == "orthogonal":
        return nn.Sequential(
            nn.Linear(64, 32), nn.Tanh(), P.orthogonal(nn.Linear(32, 32)), nn.Tanh(), nn.Linear(32, 10)
        )
    wrap = P.weight_norm if name == "weightnorm" else P.spectral_norm
    return nn.Sequential(wrap(nn.Linear(64, 32)), nn.ReLU(), nn.Linear(32, 10))


def _problem(name: str, g: torch.Generator):
    """(model, x, y, likelihood kind)."""
    if name in ("lstm", "gru", "conv1d", "mha"):
        x = torch.randint(1, 20, (1200, 12), generator=g)
        return (_Attention() if name == "mha" else _Seq(name)), x, (x == 3).any(1).long(), "cls"
    if name == "tiedlm":  # the next token is the sum of the last two mod 20, one in ten replaced at random
        x = torch.randint(0, 20, (1200, 12), generator=g)
        y = (x[:, -1] + x[:, -2]) % 20
        noise = torch.rand(1200, generator=g) < 0.1
        y[noise] = torch.randint(0, 20, (int(noise.sum()),), generator=g)
        return _TiedLM(), x, y, "cls"
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = torch.randperm(len(d.target), generator=g)
    x, y = (torch.tensor(d.data, dtype=torch.float32) / 16.0)[perm], torch.tensor(d.target)[perm]
    mlp = lambda out, act=nn.ReLU: nn.Sequential(nn.Linear(64, 32), act(), nn.Linear(32, out))  # noqa: E731
    if name == "depthwise":
        body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                             nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))  # fmt: skip
        return _Img(body, 64), x, y, "cls"
    if name == "groupnorm":
        body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 16, 3, stride=2), nn.ReLU())  # fmt: skip
        return _Img(body, 16), x, y, "cls"
    if name == "convtranspose":
        body = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                             nn.ConvTranspose2d(8, 4, 2, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(3))  # fmt: skip
        return _Img(body, 36), x, y, "cls"
    if name in ("temperature", "bilinear", "dictout"):
        return {"temperature": _Temperature, "bilinear": _Bilinear, "dictout": _DictOut}[name](), x, y, "cls"
    if name == "float64":
        return mlp(10, nn.Tanh).double(), x.double(), y, "cls"
    if name in ("weightnorm", "orthogonal", "spectral"):
        return _parametrized(name), x, y, "cls"
    if name == "scripted":  # TorchScript (its optimised graph gave second derivatives of 0 before stop 31)
        return torch.jit.script(mlp(10, nn.Tanh)), x, y, "cls"
    if name == "hooked":  # the hidden tanh applied by a forward hook of the user's on the first layer
        m = nn.Sequential(nn.Linear(64, 32), nn.Identity(), nn.Linear(32, 10))
        m[0].register_forward_hook(lambda module, args, out: torch.tanh(out))
        return m, x, y, "cls"
    if name == "layernorm":
        m = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 10))
        return m, x, y, "cls"
    if name == "tied":
        return _Tied(), x, y, "cls"
    if name == "frozen":  # a frozen feature layer; the bank keeps every parameter (parameters_to_vector)
        m = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
        m[0].requires_grad_(False)
        return m, x, y, "cls"
    if name == "binary":
        return mlp(1), x, (y >= 5).long(), "binary"
    if name == "hetero":  # Gaussian with a predicted log-variance
        return mlp(2, nn.Tanh), x, y.float() / 9.0, "hetero"
    if name == "poisson":
        return mlp(1, nn.Tanh), x, y.float(), "poisson"
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def _nll(kind: str):
    def nll(m: nn.Module, b) -> torch.Tensor:
        xb, yb = b
        out = m(xb)
        out = out["logits"] if isinstance(out, dict) else out
        if kind == "cls":
            return F.cross_entropy(out, yb, reduction="none")
        if kind == "binary":
            return F.binary_cross_entropy_with_logits(out.squeeze(-1), yb.float(), reduction="none")
        if kind == "hetero":
            mu, log_sd = out[:, 0], out[:, 1].clamp(-6, 6)
            return 0.5 * ((yb - mu) / log_sd.exp()) ** 2 + log_sd
        f = out.squeeze(-1)  # Poisson, log link
        return f.exp() - yb * f

    return nll


def run_one(name: str, seed: int, options: dict) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model, x, y, kind = _problem(name, g)
    model.eval()  # dropout off: the posterior is the eval-mode network's
    nll = _nll(kind)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def log_prior(m: nn.Module) -> torch.Tensor:  # N(0, I) on the trainable parameters, selected by name
        return -0.5 * sum((p**2).sum() for n, p in m.named_parameters() if n in trainable)

    n_test = len(x) // 5
    xt, yt, xtr, ytr = x[:n_test], y[:n_test], x[n_test:], y[n_test:]
    N = len(xtr)
    if kind == "cls" and name not in ("lstm", "gru", "conv1d", "mha"):
        forget = (ytr == 3).nonzero().squeeze(1)[:64]  # most of one class (tiedlm: one next token)
    else:
        forget = torch.randperm(N, generator=g)[:48]
    keep = torch.ones(N, dtype=torch.bool)
    keep[forget] = False
    params = [p for p in model.parameters() if p.requires_grad]
    init = parameters_to_vector(model.parameters()).detach().clone()

    def sgld(rows: torch.Tensor) -> torch.Tensor:  # the user's loop: θ ← θ − ε/2 ∇F + N(0, ε)
        vector_to_parameters(init.clone(), model.parameters())
        model.train(name == "spectral")  # spectral norm's power iteration runs while sampling; eval mode after
        gen = torch.Generator().manual_seed(seed + 7)
        n, lr0, bank = len(rows), (0.05 if kind in ("hetero", "poisson") or name == "bilinear" else 0.5) / len(rows), []
        for t in range(3000):
            b = rows[torch.randint(0, n, (64,), generator=gen)]
            energy = n * nll(model, (xtr[b], ytr[b])).mean() - log_prior(model)
            grads = torch.autograd.grad(energy, params)
            lr = lr0 * (1 + t / 500) ** -0.55
            with torch.no_grad():
                for p, gr in zip(params, grads):
                    p.add_(-0.5 * lr * gr + math.sqrt(lr) * torch.randn(p.shape, generator=gen))
            if t >= 1500 and (t - 1500) % 30 == 0:
                bank.append(parameters_to_vector(model.parameters()).detach().clone())
        model.eval()
        return torch.stack(bank)

    def predictive_nll(bank: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> float:
        with torch.no_grad():
            per_draw = []
            for th in bank:
                vector_to_parameters(th, model.parameters())
                per_draw.append(nll(model, (xs, ys)))
        lp = -torch.stack(per_draw)
        return float(-(torch.logsumexp(lp, 0) - math.log(len(bank))).mean())

    c0 = time.process_time()
    bank = sgld(torch.arange(N))
    train_cpu = time.process_time() - c0
    rbank = sgld(keep.nonzero().squeeze(1))
    stats = {"origin": bank, "retrain": rbank}
    res = {"model": name, "seed": seed, "params": sum(p.numel() for p in model.parameters()),
           "trainable": sum(p.numel() for p in params), "chain_cpu_seconds": train_cpu, "options": options}  # fmt: skip
    vector_to_parameters(bank[-1], model.parameters())  # the live model aliases the user's bank, as users do
    user_bank = bank.clone()
    as_states = name == "tiedlm"  # kept as state_dicts (both names of the tied weight), read back by load_state_dict
    if as_states:
        user_bank = []
        for th in bank:
            vector_to_parameters(th.clone(), model.parameters())
            user_bank.append({k: v.clone() for k, v in model.state_dict().items()})
        vector_to_parameters(bank[-1].clone(), model.parameters())
        given = [{k: v.clone() for k, v in sd.items()} for sd in user_bank]
    from mcmc_unlearner import MCMCUnlearner

    try:
        c0 = time.process_time()
        un = MCMCUnlearner(model, None, nll=nll, log_prior=log_prior, bank=user_bank, **options)
        remaining = DataLoader(TensorDataset(xtr[keep], ytr[keep]), batch_size=64, shuffle=True,
                               generator=torch.Generator().manual_seed(1))  # fmt: skip
        report = un.remove((xtr[forget], ytr[forget]), remaining, n_remaining=int(keep.sum()))
        res["cpu_seconds"] = time.process_time() - c0
        res.update(status="ok", solver=un.solver.value, solver_reason=un.solver_reason,
                   damping_relative=report.damping_relative, model_ratio=report.model_ratio,
                   damping_trials=report.damping_trials, damping_shape=report.info.get("damping_shape"),
                   bank_untouched=bool(torch.equal(user_bank, bank)) if not as_states else all(
                       torch.equal(sd[k], old[k]) for sd, old in zip(user_bank, given) for k in sd))  # fmt: skip
        stats["unlearn"] = un.samples()
        if as_states:  # what the user gets back, loaded as the user loads it
            rows = []
            for sd in stats["unlearn"]:
                model.load_state_dict(sd)
                rows.append(parameters_to_vector(model.parameters()).detach().clone())
            stats["unlearn"] = torch.stack(rows)
    except Exception as e:  # recorded: the point is to see what fails
        res["status"] = f"{type(e).__name__}: {e}"
    for k, b in stats.items():
        res[k] = {"forgotten_nll": predictive_nll(b, xtr[forget], ytr[forget]), "test_nll": predictive_nll(b, xt, yt)}
    if "unlearn" in res:
        o, r, u = (res[k]["forgotten_nll"] for k in ("origin", "retrain", "unlearn"))
        res["fraction"] = (u - o) / (r - o) if abs(r - o) > 1e-9 else None
    res["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=A.name_list(MODELS), default=",".join(MODELS), help="comma-separated subset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--options", type=A.json_object_text, default="{}", help="MCMCUnlearner options as JSON (default: none)"
    )
    ap.add_argument("--json", type=A.output_file, default=None)
    ap.add_argument("--threads", type=A.positive_int, default=1, help="torch threads per process (default 1)")
    ap.add_argument(
        "--one", type=A.one_of(MODELS), default=None, help=argparse.SUPPRESS
    )  # internal: run one network in this process
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # the networks' processes inherit it
    options = json.loads(args.options)
    if args.one:
        print(json.dumps({**run_one(args.one, args.seed, options), "threads": torch.get_num_threads()}))
        return 0
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) per network's process (set by --threads)")
    print(f"{'model':<14}{'params':>7}  {'status':<8}{'solver':<7}{'fraction':>9}  test NLL o / r / u"
          f"{'':>9}{'request s':>10}{'chain s':>8}{'peak GB':>8}")  # fmt: skip
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--seed", str(args.seed), "--options", args.options,
               "--threads", str(args.threads)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            r = {"model": name, "status": f"crashed (exit {out.returncode}): {out.stderr.strip()[-300:]}"}
        else:
            r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        t = lambda k, r=r: r.get(k, {}).get("test_nll", math.nan)  # noqa: E731
        frac = r.get("fraction")
        print(f"{name:<14}{r.get('params', 0):>7,}  {r['status'][:7]:<8}{r.get('solver', '-'):<7}"
              f"{frac if frac is None else round(frac, 3)!s:>9}  {t('origin'):.4f} / {t('retrain'):.4f} / "
              f"{t('unlearn'):.4f}{r.get('cpu_seconds', math.nan):>10.1f}{r.get('chain_cpu_seconds', math.nan):>8.1f}"
              f"{r.get('peak_gb', math.nan):>8.2f}", flush=True)  # fmt: skip
        if not r["status"].startswith("ok"):
            print(f"    {r['status'][:400]}")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "threads": args.threads, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
