"""Independent cross-check of our Kronecker curvature against curvlinops-for-pytorch (optional; not a dependency).

    OMP_NUM_THREADS=1 python benchmarks/curvlinops_check.py [rows] [mlp cnn reg]

Builds K-FAC with the exact output expectation at one parameter vector and one batch of ``rows`` rows, both with
:class:`mcmc_unlearner.kronecker.KroneckerCurvature` and with curvlinops' ``KFACLinearOperator`` (type-2 Fisher,
KFAC-expand, weight and bias in one block, loss ``reduction="sum"``; exact damping for the inverse), and prints
the relative difference of ``K·v`` and ``(K + λI)⁻¹v`` per layer for random ``v``, plus the difference to
curvlinops' other conventions (separate weight/bias blocks, KFAC-reduce, EKFAC, heuristic damping). Models: a
softmax MLP and the project's DigitsNet CNN on scikit-learn's digits, a Gaussian-regression MLP on the diabetes
data (all briefly trained with Adam so the curvature is realistic).

curvlinops is not installed by the project: its dependency backpack-for-pytorch pulls torchvision, which beside a
CPU-only torch either replaces torch with a CUDA build or fails to import. To run this check, install it beside
the CPU torch without dependencies (what it needs for KFAC)::

    python -m venv --system-site-packages .venv-cl
    .venv-cl/bin/pip install --no-deps curvlinops-for-pytorch==3.0.1 einops==0.8.2 einconv==0.1.0 \
        opt-einsum==3.4.0 linear_operator==0.6.1
    OMP_NUM_THREADS=1 .venv-cl/bin/python benchmarks/curvlinops_check.py

Measured 2026-12-01 (torch 2.13 CPU, float64): matched settings agree to 1e-14 relative on all three models.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes, load_digits
from torch import nn
from torch.nn.utils import parameters_to_vector

from mcmc_unlearner.kronecker import KroneckerCurvature
from mcmc_unlearner.models.bnn import build_model, log_gaussian_prior

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder: _benchargs
from _benchargs import one_of, positive_int

try:
    from curvlinops import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator
except ImportError:  # pragma: no cover - optional; main() says so after parsing the arguments (--help works)
    HAVE_CURVLINOPS = False
    EKFACLinearOperator = KFACInverseLinearOperator = KFACLinearOperator = None  # type: ignore[assignment,misc]
else:
    HAVE_CURVLINOPS = True

warnings.filterwarnings("ignore")
rows = 256
CASES = ("mlp", "cnn", "reg")


def digits(rows: int, image: bool, dtype: torch.dtype, seed: int = 0):
    d = load_digits()
    x = torch.tensor(d.data, dtype=dtype) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)
    x, y = x[idx], y[idx]
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return x, y, x[:rows], y[:rows]


def diabetes(rows: int, dtype: torch.dtype, seed: int = 0):
    d = load_diabetes()
    x = torch.tensor(d.data, dtype=dtype)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(d.target, dtype=dtype)[:, None]
    y = (y - y.mean()) / y.std()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)
    x, y = x[idx], y[idx]
    return x, y, x[:rows], y[:rows]


def make(case: str, rows: int, dtype: torch.dtype = torch.float64, train_steps: int = 300):
    """Return (model, x, y, nll, loss_kind) with the model trained briefly (Adam) so curvature is realistic."""
    torch.manual_seed(0)
    if case == "mlp":
        X, Y, x, y = digits(rows, False, dtype)
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        kind = "ce"
    elif case == "cnn":
        X, Y, x, y = digits(rows, True, dtype)
        model = build_model("digits_net", (1, 8, 8), 10)
        kind = "ce"
    elif case == "reg":
        X, Y, x, y = diabetes(rows, dtype)
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
        kind = "mse"
    else:
        raise ValueError(case)
    model = model.to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(train_steps):
        opt.zero_grad()
        out = model(X)
        loss = F.cross_entropy(out, Y) if kind == "ce" else F.mse_loss(out, Y)
        loss.backward()
        opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    if kind == "ce":

        def nll(m, b):
            return F.cross_entropy(m(b[0]), b[1], reduction="none")

    else:
        # Gaussian NLL with sigma^2 = 1/2, i.e. exactly MSELoss(reduction="sum") per row (up to a constant)
        def nll(m, b):
            return (m(b[0]) - b[1]).pow(2).sum(-1)

    return model, x, y, nll, kind


def layer_slices(model: nn.Module) -> dict[str, slice]:
    """{module name: slice of the flat parameter vector} (weight+bias of one module together)."""
    out, pos = {}, 0
    for name, p in model.named_parameters():
        mod = name.rsplit(".", 1)[0]
        s = out.get(mod)
        out[mod] = slice(s.start if s else pos, pos + p.numel())
        pos += p.numel()
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


DAMP = 1.0
PRIOR_STD = 0.3  # prior precision p = 1/0.09 ≈ 11.1 when the prior is on


def theirs(model, x, y, kind, cls=KFACLinearOperator, reduction="sum", sep=False, approx="expand"):
    loss = nn.CrossEntropyLoss(reduction=reduction) if kind == "ce" else nn.MSELoss(reduction=reduction)
    params = [p for p in model.parameters() if p.requires_grad]
    return cls(
        model,
        loss,
        params,
        [(x, y)],
        fisher_type="type-2",
        separate_weight_and_bias=sep,
        kfac_approx=approx,
        check_deterministic=False,
        num_data=x.shape[0],
        num_per_example_loss_terms=1,
    )


def report(name, model, a, b):
    parts = {k: rel(a[s], b[s]) for k, s in layer_slices(model).items()}
    whole = rel(a, b)
    print(f"    {name:<34s} all {whole:.2e} | " + "  ".join(f"{k}:{v:.1e}" for k, v in parts.items()))
    return whole


def run(case: str) -> None:
    model, x, y, nll, kind = make(case, rows)
    theta = parameters_to_vector(model.parameters()).detach()
    D = theta.numel()
    g = torch.Generator().manual_seed(1)
    V = torch.randn(D, 4, generator=g, dtype=theta.dtype)
    print(f"== {case}: D={D}, rows={rows}, float64, exact expectation")
    for prior in (False, True):
        p = 1.0 / PRIOR_STD**2 if prior else 0.0
        lp = (lambda m: log_gaussian_prior(m, PRIOR_STD)) if prior else None
        ours = KroneckerCurvature.build(
            model, theta[None], [(x, y)], n=rows, nll=nll, log_prior=lp, exact_expectation=True, max_locations=None
        )
        print(f"  prior precision p={p:.3g}  (ours: likelihood={ours.info['likelihood']}, sigma={ours.info['sigma']})")
        K = theirs(model, x, y, kind)
        KV_t = K @ V + p * V
        KV_o = ours @ V
        report("K v   (KFAC, joint W|b)", model, KV_o, KV_t)
        Kinv = KFACInverseLinearOperator(K, damping=p + DAMP, use_exact_damping=True)
        report(f"(K+{DAMP}I)^-1 v (KFAC, exact damping)", model, ours.solve(V, DAMP), Kinv @ V)
        if not prior:
            Km = theirs(model, x, y, kind, reduction="mean")
            report("K v vs rows * K_mean v", model, KV_o, rows * (Km @ V))
            Ks = theirs(model, x, y, kind, sep=True)
            report("K v vs separate W,b (default)", model, KV_o, Ks @ V)
            if case == "cnn":
                Kr = theirs(model, x, y, kind, approx="reduce")
                report("K v vs KFAC-reduce", model, KV_o, Kr @ V)
            Ke = theirs(model, x, y, kind, cls=EKFACLinearOperator)
            report("K v vs EKFAC (joint)", model, KV_o, Ke @ V)
            Kei = KFACInverseLinearOperator(Ke, damping=DAMP, use_exact_damping=True)
            report(f"(K+{DAMP}I)^-1 v vs EKFAC", model, ours.solve(V, DAMP), Kei @ V)
            # heuristic (factor-wise) damping, curvlinops' other option: a different matrix
            Kh = KFACInverseLinearOperator(K, damping=DAMP, use_heuristic_damping=True)
            report("(K+1I)^-1 v vs heuristic dmp", model, ours.solve(V, DAMP), Kh @ V)


def main(argv: list[str] | None = None) -> int:
    global rows
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="?", type=positive_int, default=256, help="rows of the batch (default 256)")
    ap.add_argument("cases", nargs="*", type=one_of(CASES), help=f"models (default: {' '.join(CASES)})")
    args = ap.parse_args(argv)
    if not HAVE_CURVLINOPS:
        sys.exit("curvlinops is not installed; see this script's docstring for how to install it beside the CPU torch")
    rows = args.rows
    torch.set_num_threads(1)  # small models: one thread (also set OMP_NUM_THREADS=1)
    from importlib.metadata import version

    print(f"torch {torch.__version__}, 1 thread, curvlinops {version('curvlinops-for-pytorch')}")
    for c in args.cases or CASES:
        run(c)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
