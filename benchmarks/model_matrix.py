r"""The library's defaults on networks it has never seen: issue 11's "test matrix of your own".

    python benchmarks/model_matrix.py [--models mlp,regression,lenet,bncnn,resnet,transformer] [--quick]
        [--seeds 0[,1,...]] [--retrains 2] [--layout tensor|list|dict] [--threads 1] [--mem-cap-gb 4]
        [--timeout 900] [--json OUT.json]

Everything on the *user side* is written here, as a new user would write it, without any of the library's
samplers, models, data classes or helpers: plain ``nn.Sequential``/``nn.Module`` networks, data as plain
tensors through ``torch.utils.data.DataLoader``, and a ten-line SGLD loop

.. math::  θ ← θ − \tfrac{ε}{2}∇\hat F(θ) + \mathcal N(0, ε I),\qquad
           \hat F(θ) = −\log p(θ) + \tfrac{n}{|B|}\textstyle\sum_{z∈B} h(θ, z),

keeping every ``thin``-th state after burn-in as the sample bank. The library is then called with its
defaults and nothing else::

    un = MCMCUnlearner(model, None, nll=nll, log_prior=log_prior, bank=bank)
    report = un.remove(removed_batch, remaining_iterator, n_remaining=N)

For every model: one origin chain on all training rows, ``--retrains`` retrain chains on the remaining rows
(same schedule, other seeds), one unlearning request with the defaults, and the issue's targets:

* no refusal, no exception (a refusal is a failure of the target);
* the forgotten rows' posterior-predictive NLL moves ``fraction = (unlearn − origin) / (retrain − origin)``
  with ``0.5 ≤ fraction ≤ 2`` (``retrain`` = mean over the retrain chains; the retrain pair's own fraction
  ``(retrain_b − origin)/(retrain_a − origin)`` is printed as the noise of that number);
* kept-data test error within 1.5 points of retraining (classification) or clean-test RMSE within 10%
  (regression), against the mean of the retrain chains (the retrain pair's distance is printed beside it);
* peak memory of the request (``VmHWM − VmRSS`` of a forked child process whose peak was reset just before
  the request) below 2 GB for models under 1M parameters; the child runs under ``RLIMIT_AS`` = its size at
  the fork + ``--mem-cap-gb`` so a blow-up is recorded as a failure instead of taking the machine down;
* time of the request over the time of one SGLD epoch over 10k rows of the same model and batch size,
  measured in the same child process just before the request and again just after it, the request over their
  mean (``epoch_cpu_seconds``; both in ``epoch_cpu_seconds_runs``: timed once, before, until stop 59) (target
  ≤ 0.25 epochs for the ≥1M-parameter residual network).

The request runs in a forked child (``fork`` start method: the child inherits the trained chains), which is
also what makes the memory measurement clean. The user's bank is checked bit for bit after the request: the
live model's parameters are loaded with ``vector_to_parameters(bank[-1], ...)`` (views into the user's bank,
as a user would do), so a library that writes into the live model in place without copying rewrites the
user's stored sample.

Choices per model (see :func:`build_problems`): which rows are forgotten (random rows of a class-structured
task, or the corrupted rows of the regression task), prior, step size, chain length. BatchNorm layers run in
eval mode throughout sampling and unlearning, with running statistics computed once at initialisation from the
chain's own training rows (so the likelihood is per-datum and the statistics are buffers, not parameters).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder: _benchargs
import _benchargs as A
import _timing as T

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
GB = 2**30

# ------------------------------------------------------------------------------------------------ targets
FRACTION_RANGE = (0.5, 2.0)  # forgotten rows' NLL: fraction of the way from origin to retrain
ERROR_POINTS = 1.5  # kept-data test error within this many percentage points of retraining
RMSE_REL = 0.10  # regression: clean-test RMSE within 10% of retraining
MEMORY_GB = 2.0  # peak memory of one request, models under 1M parameters
EPOCH_FRACTION = 0.25  # one request on the >=1M-parameter residual net: at most this many 10k-row SGLD epochs
BIG_MODEL = 1_000_000


# ------------------------------------------------------------------------------------------------ user side
Batch = tuple[torch.Tensor, torch.Tensor]


def gaussian_log_prior(std: float) -> Callable[[nn.Module], torch.Tensor]:
    """``log N(θ; 0, std²I)`` up to a constant, over every parameter of the model."""

    def log_prior(m: nn.Module) -> torch.Tensor:
        return -0.5 * sum((p**2).sum() for p in m.parameters()) / std**2

    return log_prior


def classification_nll(m: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-row ``−log softmax(m(x))[y]``."""
    x, y = batch
    return F.cross_entropy(m(x), y, reduction="none")


def gaussian_nll(sigma: float) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """Per-row ``−log N(y; m(x), σ²)`` with a known noise level σ."""
    const = math.log(sigma) + 0.5 * math.log(2 * math.pi)

    def nll(m: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return 0.5 * ((m(x).squeeze(-1) - y) / sigma) ** 2 + const

    return nll


def forever(loader: DataLoader) -> Iterator[Batch]:
    """An endless iterator over a DataLoader's minibatches (reshuffled every pass)."""
    while True:
        yield from loader


def loader(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> DataLoader:
    return DataLoader(
        TensorDataset(x, y),
        batch_size=batch,
        shuffle=True,
        drop_last=len(x) > batch,
        generator=torch.Generator().manual_seed(seed),
    )


def remaining_data(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int, form: str) -> Any:
    """The data as the user passes it: ``"iterator"``, an endless generator over a shuffled ``DataLoader``'s
    minibatches (the library cannot list its rows); ``"loader"``, that ``DataLoader`` over a ``TensorDataset`` itself
    (listable: the library reads its tensors); ``"rows"``, the tuple ``(x, y)``."""
    if form == "iterator":
        return forever(loader(x, y, batch, seed))
    if form == "loader":
        return loader(x, y, batch, seed)
    if form == "rows":
        return x, y
    raise ValueError(f"unknown remaining-data form {form!r}: choose iterator, loader or rows")


def sgld_step(
    model: nn.Module,
    nll: Callable,
    log_prior: Callable,
    xb: torch.Tensor,
    yb: torch.Tensor,
    n: int,
    lr: float,
    gen: torch.Generator,
) -> None:
    """One SGLD step ``θ ← θ − (ε/2)∇F̂ + N(0, ε)`` with ``F̂ = −log p(θ) + n/|B| Σ nll``."""
    params = [p for p in model.parameters() if p.requires_grad]
    energy = -log_prior(model) + (n / xb.shape[0]) * nll(model, (xb, yb)).sum()
    grads = torch.autograd.grad(energy, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(-0.5 * lr * g + math.sqrt(lr) * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def sgld_chain(
    model: nn.Module,
    nll: Callable,
    log_prior: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    burn_lr: float,
    burn: int,
    keep: int,
    thin: int,
    batch: int,
    seed: int,
) -> torch.Tensor:
    """Run a plain SGLD chain and return its bank ``[keep, D]`` (every ``thin``-th state after burn-in).

    The step size decays geometrically from ``burn_lr`` to ``lr`` over the burn-in and stays at ``lr`` after.
    """
    gen = torch.Generator().manual_seed(10_000 + seed)
    it = forever(loader(x, y, batch, seed))
    bank = []
    for t in range(burn + keep * thin):
        lr_t = lr if t >= burn else burn_lr * (lr / burn_lr) ** (t / max(1, burn))
        xb, yb = next(it)
        sgld_step(model, nll, log_prior, xb, yb, len(x), lr_t, gen)
        if t >= burn and (t - burn + 1) % thin == 0:
            bank.append(parameters_to_vector(model.parameters()).detach().clone())
    return torch.stack(bank)


@torch.no_grad()
def per_sample_outputs(model: nn.Module, bank: torch.Tensor, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``model(x)`` at every bank row: ``[S, N, C]`` (classification logits) or ``[S, N, 1]``."""
    m = copy.deepcopy(model)
    outs = []
    for theta in bank:
        vector_to_parameters(theta.clone(), m.parameters())
        outs.append(torch.cat([m(x[i : i + chunk]) for i in range(0, len(x), chunk)]))
    return torch.stack(outs)


def predictive_stats(problem: Problem, model: nn.Module, bank: torch.Tensor) -> dict[str, float]:
    """Posterior-predictive NLL of the forgotten rows and the kept-data test error / RMSE of a bank."""
    xf, yf = problem.x_train[problem.forget], problem.y_train[problem.forget]
    xt, yt = problem.x_test[problem.test_keep], problem.y_test[problem.test_keep]
    out_f = per_sample_outputs(model, bank, xf)
    out_t = per_sample_outputs(model, bank, xt)
    S = bank.shape[0]
    if problem.kind == "classification":
        lp = torch.log_softmax(out_f, -1).gather(2, yf[None, :, None].expand(S, -1, 1))[..., 0]
        nll_f = -(torch.logsumexp(lp, 0) - math.log(S))
        probs = torch.softmax(out_t, -1).mean(0)
        err = float((probs.argmax(-1) != yt).float().mean()) * 100
        err_f = float((torch.softmax(out_f, -1).mean(0).argmax(-1) != yf).float().mean()) * 100
        return {"nll_forgot": float(nll_f.mean()), "test_error": err, "error_forgot": err_f}
    sigma = problem.sigma
    lp = -0.5 * ((out_f[..., 0] - yf) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    nll_f = -(torch.logsumexp(lp, 0) - math.log(S))
    rmse = float(((out_t[..., 0].mean(0) - yt) ** 2).mean().sqrt())
    return {"nll_forgot": float(nll_f.mean()), "test_rmse": rmse}


# ------------------------------------------------------------------------------------------------ models
class Residual(nn.Module):
    """``x + body(x)`` (optionally a 1×1 projection on the skip path)."""

    def __init__(self, body: nn.Module, skip: nn.Module | None = None) -> None:
        super().__init__()
        self.body, self.skip = body, skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x if self.skip is None else self.skip(x)) + self.body(x))


def resnet(widths: tuple[int, ...] = (64, 128, 256), in_ch: int = 1, classes: int = 10, stem: int = 4) -> nn.Module:
    """A BatchNorm-free ResNet-style network: a ``stem×stem`` stride-``stem`` patch convolution, one basic block
    per stage (3×3 convolutions, stride 2 between stages, 1×1 projections on the skip path where the shape
    changes), global average pooling and a linear head. 1.23M parameters with the default widths.

    The second convolution of every block starts at 0.1× its default initialisation (a Fixup-style scaled
    residual branch), which keeps the un-normalised residual stack well conditioned. The patch stem keeps the
    feature maps small (28×28 → 7×7) so that CPU chains stay affordable.
    """
    layers: list[nn.Module] = [nn.Conv2d(in_ch, widths[0], stem, stride=stem), nn.ReLU()]
    c = widths[0]
    for i, w in enumerate(widths):
        stride = 1 if i == 0 else 2
        conv2 = nn.Conv2d(w, w, 3, padding=1)
        with torch.no_grad():
            conv2.weight.mul_(0.1)
        body = nn.Sequential(nn.Conv2d(c, w, 3, stride=stride, padding=1), nn.ReLU(), conv2)
        skip = None if (stride == 1 and c == w) else nn.Conv2d(c, w, 1, stride=stride)
        layers.append(Residual(body, skip))
        c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


def lenet5(side: int) -> nn.Module:
    """LeNet-5 (6-16 convolutions, 120-84 dense), ``padding=2`` on the first convolution as for 28×28 inputs."""
    s = ((side // 2) - 4) // 2
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * s * s, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


def bn_cnn(widths: tuple[int, int] = (16, 32), side: int = 8) -> nn.Module:
    """Two conv-BatchNorm-ReLU-maxpool stages and a linear head."""
    a, b = widths
    return nn.Sequential(
        nn.Conv2d(1, a, 3, padding=1),
        nn.BatchNorm2d(a),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(a, b, 3, padding=1),
        nn.BatchNorm2d(b),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(b * (side // 4) ** 2, 10),
    )


class TinyTransformer(nn.Module):
    """Token + learned position embeddings, ``nn.TransformerEncoderLayer(batch_first=True)``, mean pool, head.

    With ``math_attention`` the forward pass runs under ``sdpa_kernel(SDPBackend.MATH)`` (eager attention):
    torch's fused CPU attention kernel has neither a double-backward nor a forward-mode derivative, so
    curvature products through it fail; the math kernel has both.
    """

    def __init__(
        self, vocab: int, length: int, d: int = 32, heads: int = 4, ff: int = 64, layers: int = 1, math_attention=True
    ) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(length, d))
        self.enc = nn.Sequential(
            *[nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True) for _ in range(layers)]
        )
        self.head = nn.Linear(d, 2)
        self.math_attention = math_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos
        if self.math_attention:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                h = self.enc(h)
        else:
            h = self.enc(h)
        return self.head(h.mean(1))


@torch.no_grad()
def freeze_batchnorm_stats(model: nn.Module, x: torch.Tensor, chunk: int = 512) -> None:
    """Set every BatchNorm's running statistics to the exact mean/variance over ``x``, then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes below
    model.train()
    for i in range(0, len(x), chunk):
        model(x[i : i + chunk])
    model.eval()


# ------------------------------------------------------------------------------------------------ data
def digits_data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """scikit-learn's digits (8×8, scaled to [0, 1]), stratified 1,347 / 450 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(
        d.data.astype(np.float32) / 16.0, d.target, test_size=0.25, random_state=seed, stratify=d.target
    )
    return torch.from_numpy(xtr), torch.from_numpy(ytr).long(), torch.from_numpy(xte), torch.from_numpy(yte).long()


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (``.gz``) as a numpy array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_data(n_train: int, n_test: int) -> tuple[torch.Tensor, ...] | None:
    """The first ``n_train`` / ``n_test`` Fashion-MNIST rows ``[N, 1, 28, 28]``, standardised; None if absent."""
    files = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"]
    files.append("t10k-labels-idx1-ubyte.gz")
    if not all((FASHION_DIR / f).exists() for f in files):
        return None
    xtr, ytr, xte, yte = (read_idx(FASHION_DIR / f) for f in files)
    xtr = torch.from_numpy(xtr[:n_train].astype(np.float32) / 255.0)[:, None]
    xte = torch.from_numpy(xte[:n_test].astype(np.float32) / 255.0)[:, None]
    mu, sd = xtr.mean(), xtr.std()
    return (
        (xtr - mu) / sd,
        torch.from_numpy(ytr[:n_train].astype(np.int64)),
        (xte - mu) / sd,
        torch.from_numpy(yte[:n_test].astype(np.int64)),
    )


def digits_images(side: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Digits as ``[N, 1, side, side]`` images (bilinear upsampling from 8×8), standardised."""
    xtr, ytr, xte, yte = digits_data(seed)

    def img(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8)
        return x if side == 8 else F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)

    xtr, xte = img(xtr), img(xte)
    mu, sd = xtr.mean(), xtr.std()
    return (xtr - mu) / sd, ytr, (xte - mu) / sd, yte


def regression_data(n_train: int, n_test: int, n_bad: int, sigma: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``y = sin(2x₁)·cos(x₂) + 0.5·x₁ + N(0, σ²)`` on ``x ∈ [−2, 2]²``; the last ``n_bad`` training rows get
    ``y`` shifted by ±(2…4) (wildly wrong: 20–40σ). Test rows are clean."""
    g = torch.Generator().manual_seed(1000 + seed)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(2 * x[:, 0]) * torch.cos(x[:, 1]) + 0.5 * x[:, 0]

    xtr = 4 * torch.rand(n_train, 2, generator=g) - 2
    xte = 4 * torch.rand(n_test, 2, generator=g) - 2
    ytr = f(xtr) + sigma * torch.randn(n_train, generator=g)
    yte = f(xte) + sigma * torch.randn(n_test, generator=g)
    sign = torch.where(torch.rand(n_bad, generator=g) < 0.5, -1.0, 1.0)
    ytr[n_train - n_bad :] += sign * (2 + 2 * torch.rand(n_bad, generator=g))
    return xtr, ytr, xte, yte


def sequence_data(n_train: int, n_test: int, vocab: int, length: int, n_poison: int, seed: int = 0):
    """Token sequences of odd ``length`` over tokens ``0 … vocab−1``; label 1 iff most tokens come from the lower
    half of the vocabulary. The last ``n_poison`` training rows are a backdoor: one position holds the extra
    trigger token ``vocab`` and the label is forced to 1 (the model has ``vocab + 1`` embeddings). Test rows are
    clean."""
    g = torch.Generator().manual_seed(2000 + seed)
    x = torch.randint(0, vocab, (n_train + n_test, length), generator=g)
    y = ((x < vocab // 2).sum(1) > length // 2).long()
    xtr, ytr = x[:n_train].clone(), y[:n_train].clone()
    rows = torch.arange(n_train - n_poison, n_train)
    xtr[rows, torch.randint(0, length, (n_poison,), generator=g)] = vocab
    ytr[rows] = 1
    return xtr, ytr, x[n_train:], y[n_train:]


# ------------------------------------------------------------------------------------------------ problems
@dataclass
class Problem:
    """One model of the matrix: data, the user's model/likelihood/prior, the SGLD schedule, the request."""

    name: str
    description: str
    kind: str  # "classification" | "regression"
    make_model: Callable[[int], nn.Module]  # seed -> freshly initialised model
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    forget: torch.Tensor  # training-row indices of the request
    forget_rule: str
    prior_std: float
    lr: float
    burn_lr: float
    burn: int
    keep: int
    thin: int
    batch: int
    sigma: float | None = None
    batchnorm: bool = False
    test_keep: torch.Tensor | None = None  # test rows scored as kept data (default: all)
    data_source: str = ""
    max_retrains: int | None = None  # cap on retrain chains (expensive models)

    def __post_init__(self) -> None:
        if self.test_keep is None:
            self.test_keep = torch.arange(len(self.x_test))

    @property
    def nll(self) -> Callable[[nn.Module, Batch], torch.Tensor]:
        return classification_nll if self.kind == "classification" else gaussian_nll(self.sigma)

    @property
    def log_prior(self) -> Callable[[nn.Module], torch.Tensor]:
        return gaussian_log_prior(self.prior_std)

    @property
    def keep_mask(self) -> torch.Tensor:
        m = torch.ones(len(self.x_train), dtype=torch.bool)
        m[self.forget] = False
        return m

    def n_params(self) -> int:
        return sum(p.numel() for p in self.make_model(0).parameters())


def random_rows(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(3000 + seed))[:k].sort().values


def class_request(
    xtr: torch.Tensor, ytr: torch.Tensor, yte: torch.Tensor, k: int, mode: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str, torch.Tensor]:
    """The request of a class-structured task: ``(x_train, y_train, forget, rule, test_keep)``.

    ``mode="class"``: class ``c = seed mod 10`` keeps only ``k`` (random) training rows, the others are dropped
    from the training set, and the request forgets all ``k``: the retrained posterior has never seen the class,
    so the forgotten rows' NLL moves far (a clear signal), and kept-data test error is scored on the other
    classes' test rows. ``mode="random"``: ``k`` random training rows (the signal is only the memorisation gap,
    often smaller than the spread between chains on these small networks), scored on every test row.
    """
    if mode == "random":
        return xtr, ytr, random_rows(len(xtr), k, seed), f"{k} random training rows", torch.arange(len(yte))
    if mode != "class":
        raise ValueError(f"unknown forget mode {mode!r}: use class or random")
    c = seed % 10
    rows_c = torch.nonzero(ytr == c).flatten()
    if len(rows_c) < k:
        raise ValueError(f"class {c} has only {len(rows_c)} training rows, fewer than the request's {k}")
    g = torch.Generator().manual_seed(3000 + seed)
    chosen = rows_c[torch.randperm(len(rows_c), generator=g)[:k]]
    keep = ytr != c
    keep[chosen] = True
    xtr, ytr = xtr[keep], ytr[keep]
    forget = torch.nonzero(ytr == c).flatten()
    rule = f"class {c}: all {k} of its training rows (its other {len(rows_c) - k} dropped beforehand)"
    return xtr, ytr, forget, rule, torch.nonzero(yte != c).flatten()


def build_problems(names: list[str], quick: bool, seed: int = 0, forget: str = "class") -> list[Problem]:
    """The six models of issue 11 (``quick``: the reduced sizes the tests use)."""
    return [BUILDERS[name](quick, seed, forget) for name in names]


def _mlp(quick: bool, seed: int, forget: str = "class") -> Problem:
    xtr, ytr, xte, yte = digits_data()
    xtr, ytr, forget_rows, rule, test_keep = class_request(xtr, ytr, yte, 50, forget, seed)

    def make(s: int) -> nn.Module:
        torch.manual_seed(s)
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    return Problem(
        name="mlp",
        description="MLP 64-32-10 ReLU (digits)",
        kind="classification",
        make_model=make,
        x_train=xtr,
        y_train=ytr,
        x_test=xte,
        y_test=yte,
        forget=forget_rows,
        forget_rule=rule,
        test_keep=test_keep,
        prior_std=1.0,
        lr=2e-4 if quick else 1e-4,
        burn_lr=1e-3,
        burn=1500 if quick else 4000,
        keep=50 if quick else 100,
        thin=20,
        batch=64,
        data_source="sklearn digits 1,347/450",
    )


def _regression(quick: bool, seed: int, forget: str = "class") -> Problem:
    del forget  # the request is fixed: the corrupted/backdoor rows
    sigma = 0.1
    n_train = 800 if quick else 2000
    xtr, ytr, xte, yte = regression_data(n_train, 1000, 64, sigma, seed)

    def make(s: int) -> nn.Module:
        torch.manual_seed(s)
        return nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))

    return Problem(
        name="regression",
        description="MLP 2-32-32-1 tanh regression, σ=0.1 known",
        kind="regression",
        make_model=make,
        x_train=xtr,
        y_train=ytr,
        x_test=xte,
        y_test=yte,
        forget=torch.arange(n_train - 64, n_train),
        forget_rule="the 64 corrupted rows (y off by 20-40σ)",
        prior_std=1.0,
        sigma=sigma,
        lr=2e-6 if quick else 1e-6,  # the energy's curvature grows with n: 2e-5 diverges at 2,000 rows
        burn_lr=2e-5 if quick else 8e-6,
        burn=2000 if quick else 5000,
        keep=50 if quick else 100,
        thin=20,
        batch=64,
        data_source=f"synthetic, {n_train} train (64 corrupted) / 1000 clean test",
    )


def _lenet(quick: bool, seed: int, forget: str = "class") -> Problem:
    data = None if quick else fashion_data(10_000, 2_000)
    if data is None:
        side = 16 if quick else 28
        xtr, ytr, xte, yte = digits_images(side)
        source = f"digits upsampled to {side}×{side}"
    else:
        side = 28
        xtr, ytr, xte, yte = data
        source = "Fashion-MNIST 10,000/2,000 (first rows)"
    xtr, ytr, forget_rows, rule, test_keep = class_request(xtr, ytr, yte, 64, forget, seed)

    def make(s: int) -> nn.Module:
        torch.manual_seed(s)
        return lenet5(side)

    return Problem(
        name="lenet",
        description=f"LeNet-5 on {side}×{side}",
        kind="classification",
        make_model=make,
        x_train=xtr,
        y_train=ytr,
        x_test=xte,
        y_test=yte,
        forget=forget_rows,
        forget_rule=rule,
        test_keep=test_keep,
        prior_std=1.0,
        lr=5e-5 if data is None else 1e-5,
        burn_lr=5e-5 if data is None else 3e-5,
        burn=1500 if quick else 4000,
        keep=50 if quick else 100,
        thin=20,
        batch=64 if quick else 128,
        data_source=source,
    )


def _bncnn(quick: bool, seed: int, forget: str = "class") -> Problem:
    xtr, ytr, xte, yte = digits_images(8)
    xtr, ytr, forget_rows, rule, test_keep = class_request(xtr, ytr, yte, 64, forget, seed)
    widths = (8, 16) if quick else (16, 32)

    def make(s: int) -> nn.Module:
        torch.manual_seed(s)
        return bn_cnn(widths, 8)

    return Problem(
        name="bncnn",
        description=f"CNN conv{widths[0]}-BN-conv{widths[1]}-BN (digits 8×8), BN eval mode",
        kind="classification",
        make_model=make,
        x_train=xtr,
        y_train=ytr,
        x_test=xte,
        y_test=yte,
        forget=forget_rows,
        forget_rule=rule,
        test_keep=test_keep,
        prior_std=1.0,
        # 16-32 widths: 1e-4 and 5e-5 diverge (NaN) within 6,000 steps; the quick size's former 1e-4 diverged in
        # retrain chain 0 (seed 0) on an AVX-512 CPU while passing on another: 5e-5 keeps a margin
        lr=5e-5 if quick else 2e-5,
        burn_lr=5e-5 if quick else 2e-5,
        burn=1000 if quick else 4000,
        keep=50 if quick else 100,
        thin=10 if quick else 20,
        batch=64,
        batchnorm=True,
        data_source="sklearn digits 1,347/450 as 8×8 images",
    )


def _resnet(quick: bool, seed: int, forget: str = "class") -> Problem:
    data = None if quick else fashion_data(10_000, 2_000)
    if data is None:
        xtr, ytr, xte, yte = digits_images(16)
        source = "digits upsampled to 16×16"
    else:
        xtr, ytr, xte, yte = data
        source = "Fashion-MNIST 10,000/2,000 (first rows)"
    xtr, ytr, forget_rows, rule, test_keep = class_request(xtr, ytr, yte, 64, forget, seed)

    def make(s: int) -> nn.Module:
        torch.manual_seed(s)
        return resnet((64, 128, 256))

    return Problem(
        name="resnet",
        description="ResNet-style, 3 residual stages 64-128-256, no BN",
        kind="classification",
        make_model=make,
        x_train=xtr,
        y_train=ytr,
        x_test=xte,
        y_test=yte,
        forget=forget_rows,
        forget_rule=rule,
        test_keep=test_keep,
        prior_std=1.0,
        lr=1e-5,  # the quick sizes' former 5e-5 (burn-in 2e-4) diverged to NaN within 300 steps (seed 0)
        burn_lr=5e-5,
        burn=300 if quick else 1500,
        keep=20 if quick else 50,
        thin=10,
        batch=128,
        data_source=source,
    )


def _transformer(quick: bool, seed: int, forget: str = "class", math_attention: bool = True) -> Problem:
    del forget  # the request is fixed: the corrupted/backdoor rows
    vocab, length = 8, 9
    d, heads, ff = (16, 2, 32) if quick else (32, 4, 64)
    n_train = 1000 if quick else 4000
    xtr, ytr, xte, yte = sequence_data(n_train, 1000, vocab, length, n_poison=64, seed=seed)

    def make(s: int) -> nn.Module:
        torch.manual_seed(s)
        return TinyTransformer(vocab + 1, length, d=d, heads=heads, ff=ff, math_attention=math_attention).eval()

    return Problem(
        name="transformer" if math_attention else "transformer-fused",
        description=f"1-layer TransformerEncoder d={d} h={heads} "
        + ("(math attention)" if math_attention else "(torch's default fused attention kernel)"),
        kind="classification",
        make_model=make,
        x_train=xtr,
        y_train=ytr,
        x_test=xte,
        y_test=yte,
        forget=torch.arange(n_train - 64, n_train),
        forget_rule="the 64 backdoor rows (trigger token, label forced to 1)",
        prior_std=1.0,
        lr=1e-4,
        burn_lr=5e-4,
        burn=1000 if quick else 4000,
        keep=50 if quick else 100,
        thin=10 if quick else 20,
        batch=64,
        data_source=f"synthetic majority-of-tokens + backdoor, {n_train}/1000",
    )


BUILDERS: dict[str, Callable[[bool, int, str], Problem]] = {
    "mlp": _mlp,
    "regression": _regression,
    "lenet": _lenet,
    "bncnn": _bncnn,
    "resnet": _resnet,
    "transformer": _transformer,
}
#: Not in the default list: the same transformer with torch's default (fused) CPU attention kernel, which has no
#: second derivatives; what a user gets without knowing to ask for eager attention.
EXTRA_BUILDERS: dict[str, Callable[[bool, int, str], Problem]] = {
    "transformer-fused": lambda quick, seed, forget="class": _transformer(quick, seed, forget, math_attention=False),
}


# ------------------------------------------------------------------------------------------------ chains
@dataclass
class Chain:
    """A trained chain: its model (at the last state) and its bank ``[S, D]``."""

    model: nn.Module
    bank: torch.Tensor
    seconds: float
    stats: dict[str, float] = field(default_factory=dict)
    cpu_seconds: float = math.nan


def _cache_key(problem: Problem, rows: torch.Tensor, seed: int) -> str:
    """A file name that changes with everything the chain depends on (schedule, data, rows, seed)."""
    import hashlib

    h = hashlib.sha256()
    for t in (problem.x_train, problem.y_train, rows):
        h.update(t.contiguous().numpy().tobytes())
    sched = (problem.lr, problem.burn_lr, problem.burn, problem.keep, problem.thin, problem.batch, problem.prior_std)
    h.update(repr((sched, problem.description, problem.sigma, problem.n_params())).encode())
    return f"{problem.name}-seed{seed}-{h.hexdigest()[:16]}.pt"


def train_chain(problem: Problem, rows: torch.Tensor, seed: int, cache: Path | None = None) -> Chain:
    """Initialise the model with ``seed`` and run the SGLD schedule on training ``rows``.

    With ``cache`` (a folder; benchmark only) a chain with the same key is loaded instead of re-run (read with
    ``torch.load(weights_only=True)``: tensors and plain numbers only), and a new one is saved there.
    """
    path = None if cache is None else cache / _cache_key(problem, rows, seed)
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=True)
        model = problem.make_model(seed)
        model.load_state_dict(saved["state"])
        if problem.batchnorm:
            model.eval()
        chain = Chain(model, saved["bank"], float(saved["seconds"]), cpu_seconds=float(saved["cpu_seconds"]))
        chain.stats = {k: float(v) for k, v in saved["stats"].items()}
        return chain
    t0, c0 = time.perf_counter(), time.process_time()
    model = problem.make_model(seed)
    x, y = problem.x_train[rows], problem.y_train[rows]
    if problem.batchnorm:
        freeze_batchnorm_stats(model, x)
    bank = sgld_chain(
        model,
        problem.nll,
        problem.log_prior,
        x,
        y,
        lr=problem.lr,
        burn_lr=problem.burn_lr,
        burn=problem.burn,
        keep=problem.keep,
        thin=problem.thin,
        batch=problem.batch,
        seed=seed,
    )
    chain = Chain(model, bank, time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)
    chain.stats = predictive_stats(problem, model, bank)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"state": model.state_dict(), "bank": bank, "stats": chain.stats}
        payload.update(seconds=chain.seconds, cpu_seconds=chain.cpu_seconds)
        torch.save(payload, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    return chain


# ------------------------------------------------------------------------------------------------ bank layouts
def to_layout(bank: torch.Tensor, model: nn.Module, layout: str) -> Any:
    """The user's bank in one of the layouts a user might keep: ``tensor`` ``[S, D]``; ``list`` of
    ``state_dict``s (buffers included, as ``model.state_dict()`` gives them); ``dict`` of stacked parameter
    tensors ``{name: [S, *shape]}`` (the ``posteriors`` library's layout)."""
    if layout == "tensor":
        return bank.clone()
    m = copy.deepcopy(model)
    states = []
    for theta in bank:
        vector_to_parameters(theta.clone(), m.parameters())
        states.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    if layout == "list":
        return states
    if layout == "dict":
        return {n: torch.stack([s[n] for s in states]) for n, _ in model.named_parameters()}
    raise ValueError(f"unknown bank layout {layout!r}: use tensor, list or dict")


def as_matrix(bank: Any, model: nn.Module) -> torch.Tensor:
    """Any of the three layouts back to ``[S, D]`` in ``model.parameters()`` order."""
    names = [n for n, _ in model.named_parameters()]
    if isinstance(bank, torch.Tensor):
        return bank
    if isinstance(bank, dict):
        S = next(iter(bank.values())).shape[0]
        return torch.cat([bank[n].reshape(S, -1) for n in names], 1)
    return torch.stack([torch.cat([sd[n].reshape(-1) for n in names]) for sd in bank])


def clone_layout(bank: Any) -> Any:
    if isinstance(bank, torch.Tensor):
        return bank.clone()
    if isinstance(bank, dict):
        return {k: v.clone() for k, v in bank.items()}
    return [{k: v.clone() for k, v in sd.items()} for sd in bank]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN (a diverged chain's bank must not read as "modified")."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def same_layout(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return _same(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------ measuring
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (``VmHWM``) to its current size (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def sequence_requests(problem: Problem, rows: int, count: int, seed: int) -> list[torch.Tensor]:
    """A request sequence's row indices: the forgotten set, then ``count − 1`` disjoint sets of ``rows`` random kept
    rows (consecutive slices of one permutation seeded by ``seed``; the first as before), as ``request_sequence.py``,
    ``check_linear.py`` and ``request_ab.py`` send them. Until stop 62 each set was drawn afresh, so later sets shared
    rows with earlier ones, which the library has refused since stop 61 (a row removed twice)."""
    kept = problem.keep_mask.nonzero().squeeze(1)
    if (count - 1) * rows > len(kept):
        need = (count - 1) * rows
        raise ValueError(f"{count - 1} requests of {rows} rows need {need} kept rows; {len(kept)} are kept")
    order = kept[torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed))]
    return [problem.forget] + [order[i * rows : (i + 1) * rows] for i in range(count - 1)]


def time_sgld_epoch(
    problem: Problem, model: nn.Module, rows: int = 10_000, max_steps: int | None = None
) -> tuple[float, float]:
    """Wall and CPU seconds of one SGLD epoch over ``rows`` rows (``ceil(rows / batch)`` steps of the problem's
    batch size on training rows drawn with replacement); with ``max_steps`` only that many steps are timed and
    scaled up. One untimed warm-up step first."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(7)
    steps = math.ceil(rows / problem.batch)
    timed = steps if max_steps is None else min(steps, max_steps)
    nll, log_prior = problem.nll, problem.log_prior
    idx = torch.randint(0, len(problem.x_train), (timed + 1, problem.batch), generator=g)
    batches = [(problem.x_train[i], problem.y_train[i]) for i in idx]
    sgld_step(m, nll, log_prior, *batches[0], rows, problem.lr, g)
    t0, c0 = time.perf_counter(), time.process_time()
    for xb, yb in batches[1:]:
        sgld_step(m, nll, log_prior, xb, yb, rows, problem.lr, g)
    return (time.perf_counter() - t0) * steps / timed, (time.process_time() - c0) * steps / timed


def _is_memory_error(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "can't allocate memory" in str(e) or "std::bad_alloc" in str(e)


def unlearn_request(
    problem: Problem,
    origin: Chain,
    *,
    layout: str = "tensor",
    alias: bool = True,
    mem_cap_gb: float = 4.0,
    epoch_steps: int | None = 0,
    remaining_seed: int = 99,
    return_bank: bool = False,
    options: dict[str, Any] | None = None,
    strict: bool = True,
    remaining_as: str = "iterator",
    fit: bool = False,
) -> dict[str, Any]:
    """One deletion request with the library's defaults, in *this* process (call it in a child, see
    :func:`run_isolated`). Returns status, error, report fields, seconds, peak memory, the unlearned bank's
    predictive statistics and whether the user's bank survived unmodified.

    ``epoch_steps``: ``0`` skips the SGLD-epoch timing, ``None`` times a full 10k-row epoch, ``k`` times k steps.
    ``options`` (diagnostics only, *not* the defaults under test): extra ``MCMCUnlearner`` keyword arguments;
    ``strict=False`` applies a removal that fails the library's checks (to score it anyway). ``remaining_as``: the
    remaining data as the user's endless minibatch iterator (``"iterator"``, default), the ``DataLoader`` over a
    ``TensorDataset`` it iterates (``"loader"``) or the rows themselves (``"rows"``, a tuple ``(x, y)``); the last two
    are listable, so a class removal's emptied-label check runs (:func:`remaining_data`). ``fit``: call
    ``MCMCUnlearner.fit`` on all training rows (in the same form) before the request, timed apart
    (``fit_seconds``, ``fit_cpu_seconds``; the request's own seconds exclude it, its peak memory includes it).
    """
    from mcmc_unlearner import MCMCUnlearner
    from mcmc_unlearner.errors import UnlearningError

    out: dict[str, Any] = {"layout": layout, "alias": alias and layout == "tensor"}
    model = origin.model
    user_bank = to_layout(origin.bank, model, layout)
    if out["alias"]:
        vector_to_parameters(user_bank[-1], model.parameters())  # the live model's parameters view the bank
    snapshot = clone_layout(user_bank)
    keep = problem.keep_mask
    xr, yr = problem.x_train[keep], problem.y_train[keep]
    remaining = remaining_data(xr, yr, problem.batch, remaining_seed, remaining_as)
    removed = (problem.x_train[problem.forget], problem.y_train[problem.forget])
    epochs = T.Baseline(lambda: time_sgld_epoch(problem, model, max_steps=epoch_steps))
    if epoch_steps != 0:
        epochs.measure()  # before the request; again after it, below
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _status_kb("VmSize") * 1024 + int(mem_cap_gb * GB)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    out["peak_reset"] = reset_peak_rss()
    rss0 = _status_kb("VmRSS")
    report = None
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        un = MCMCUnlearner(model, None, nll=problem.nll, log_prior=problem.log_prior, bank=user_bank, **(options or {}))
        if fit:  # before the request arrives: every training row is still in the data
            full = problem.x_train, problem.y_train
            data = remaining_data(*full, problem.batch, remaining_seed + 1, remaining_as)
            fitted = un.fit(data, n_remaining=len(problem.x_train))
            out["fit_seconds"], out["fit_cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
            out["fit"] = fitted.to_dict()
            t0, c0 = time.perf_counter(), time.process_time()
        report = un.remove(removed, remaining, n_remaining=len(xr), **({} if strict else {"strict": False}))
        out["status"] = "ok"
    except UnlearningError as e:
        out["status"] = "refused"
        out["error"] = f"{type(e).__name__}: {e}"
        report = getattr(e, "report", None)
    except BaseException as e:  # the harness records every failure of the target
        out["status"] = "memory-cap" if _is_memory_error(e) else "error"
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc(limit=-6)
    out["seconds"], out["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    out["peak_gb"] = (_status_kb("VmHWM") - rss0) / 2**20 if out["peak_reset"] else None
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    if epoch_steps != 0:  # the epoch after the request: the request is over the mean of the two beside it
        epochs.measure()
        out["epoch_cpu_seconds"] = epochs.around(0)
        out["epoch_seconds"] = sum(epochs.wall) / len(epochs.wall)
        out["epoch_cpu_seconds_runs"], out["epoch_seconds_runs"] = epochs.cpu, epochs.wall
    if report is not None:
        out["report"] = report.to_dict() if hasattr(report, "to_dict") else dict(vars(report))
    out["user_bank_intact"] = same_layout(snapshot, user_bank)
    if out["status"] == "ok":
        returned = un.samples() if hasattr(un, "samples") else un.bank  # the user's layout, where supported
        out["returned_layout"] = type(returned).__name__
        out["layout_preserved"] = type(returned) is type(user_bank)
        new_bank = as_matrix(returned, model)
        if return_bank:  # as numpy: a tensor sent through a Pipe travels as a shared-memory handle that dies with
            out["bank"] = new_bank.numpy().copy()  # the child process
        if not torch.isfinite(new_bank).all():
            out["stats"] = {"nll_forgot": math.inf, "test_error": 100.0, "test_rmse": math.inf}
        else:
            out["stats"] = predictive_stats(problem, model, new_bank)
        out["shift_rms"] = float((new_bank - origin.bank).pow(2).mean().sqrt())
    return out


def _child(conn: Any, fn: Callable[[], dict[str, Any]]) -> None:
    try:
        result = fn()
    except BaseException as e:
        result = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    conn.send(result)
    conn.close()


def run_isolated(fn: Callable[[], dict[str, Any]], timeout: float) -> dict[str, Any]:
    """Run ``fn`` in a forked child process and return its dict; a timeout or a killed child is recorded."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn))
    t0 = time.perf_counter()
    proc.start()
    send.close()
    result: dict[str, Any]
    if recv.poll(timeout):
        try:
            result = recv.recv()
        except EOFError:
            result = {"status": "killed", "error": "the child process died without a result"}
    else:
        result = {"status": "timeout", "error": f"no result within {timeout:.0f} s", "seconds": timeout}
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if proc.exitcode not in (0, None) and result.get("status") in ("ok", None):
        result["status"] = "killed"
    if result.get("status") == "killed":
        result["error"] = f"{result.get('error', '')} (exit code {proc.exitcode})".strip()
    result.setdefault("wall_seconds", time.perf_counter() - t0)
    return result


# ------------------------------------------------------------------------------------------------ one model
def train_chains(
    problem: Problem,
    *,
    seed: int = 0,
    retrains: int = 2,
    cache: Path | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[Chain, list[Chain]]:
    """The origin chain (all training rows, chain seed ``100·seed``) and the retrain chains (remaining rows,
    seeds ``100·seed + 1, 2, …``; at most ``problem.max_retrains``)."""
    rows = torch.arange(len(problem.x_train))
    keep = rows[problem.keep_mask]
    origin = train_chain(problem, rows, 100 * seed, cache)
    log(f"  origin chain: {origin.seconds:.1f} s ({origin.cpu_seconds:.1f} s CPU)  {origin.stats}")
    rchains = []
    for r in range(min(retrains, problem.max_retrains or retrains)):
        c = train_chain(problem, keep, 100 * seed + r + 1, cache)
        log(f"  retrain chain {r}: {c.seconds:.1f} s ({c.cpu_seconds:.1f} s CPU)  {c.stats}")
        rchains.append(c)
    return origin, rchains


def evaluate(
    problem: Problem,
    *,
    seed: int = 0,
    retrains: int = 2,
    layout: str = "tensor",
    alias: bool = True,
    mem_cap_gb: float = 4.0,
    timeout: float = 900.0,
    epoch_steps: int | None = None,
    floor: int = 0,
    cache: Path | None = None,
    return_bank: bool = False,
    options: dict[str, Any] | None = None,
    strict: bool = True,
    remaining_as: str = "iterator",
    fit: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Origin chain, ``retrains`` retrain chains and one unlearning request for ``problem``; targets checked.

    ``floor > 0`` trains that many further retrain chains and scores each exactly like the unlearned bank
    (fraction and accuracy distance against the mean of the ``retrains`` reference chains): what a perfect
    method, an independent retrain, scores on these metrics.
    """
    origin, rchains = train_chains(problem, seed=seed, retrains=retrains, cache=cache, log=log)
    keep = torch.arange(len(problem.x_train))[problem.keep_mask]
    req = run_isolated(
        lambda: unlearn_request(
            problem,
            origin,
            layout=layout,
            alias=alias,
            mem_cap_gb=mem_cap_gb,
            epoch_steps=epoch_steps,
            return_bank=return_bank,
            options=options,
            strict=strict,
            remaining_as=remaining_as,
            fit=fit,
        ),
        timeout,
    )
    log(f"  request: {req.get('status')} in {req.get('seconds', float('nan')):.2f} s {req.get('error', '')[:300]}")
    res = summarize(problem, origin, rchains, req, seed)
    if floor > 0:
        res["floor"] = []
        for f in range(floor):
            c = train_chain(problem, keep, 100 * seed + 50 + f, cache)
            as_req = {"status": "ok", "stats": c.stats, "peak_gb": 0.0, "user_bank_intact": True}
            s = summarize(problem, origin, rchains, as_req, seed)
            res["floor"].append({"fraction": s["fraction"], "accuracy_distance": s["accuracy_distance"]})
            log(f"  floor chain {f}: {c.seconds:.1f} s  {c.stats} -> {res['floor'][-1]}")
    return res


def summarize(problem: Problem, origin: Chain, retrains: list[Chain], req: dict[str, Any], seed: int) -> dict:
    """Metrics and targets from the chains' and the request's numbers."""
    n_params = int(origin.bank.shape[1])
    acc_key = "test_error" if problem.kind == "classification" else "test_rmse"
    o_nll = origin.stats["nll_forgot"]
    r_nll = [c.stats["nll_forgot"] for c in retrains]
    r_acc = [c.stats[acc_key] for c in retrains]
    r_nll_mean, r_acc_mean = statistics.fmean(r_nll), statistics.fmean(r_acc)
    res: dict[str, Any] = {
        "model": problem.name,
        "description": problem.description,
        "params": n_params,
        "data": problem.data_source,
        "n_train": len(problem.x_train),
        "forget": problem.forget_rule,
        "n_forget": len(problem.forget),
        "seed": seed,
        "bank_size": int(origin.bank.shape[0]),
        "chain_seconds": {"origin": origin.seconds, "retrain": [c.seconds for c in retrains]},
        "chain_cpu_seconds": {"origin": origin.cpu_seconds, "retrain": [c.cpu_seconds for c in retrains]},
        "metric": acc_key,
        "origin": dict(origin.stats),
        "retrain": [dict(c.stats) for c in retrains],
        "request": req,
    }
    bad = [
        name
        for name, c in [("origin", origin)] + [(f"retrain {i}", c) for i, c in enumerate(retrains)]
        if not bool(torch.isfinite(c.bank).all())
    ]
    if bad:
        res["invalid"] = f"chain(s) {', '.join(bad)} diverged (non-finite samples): lower the step size"
    denom = r_nll_mean - o_nll
    res["nll_gap"] = denom
    if len(retrains) >= 2:
        d0 = r_nll[0] - o_nll
        res["retrain_pair_fraction"] = (r_nll[1] - o_nll) / d0 if d0 != 0 else math.nan
        res["retrain_pair_distance"] = (
            abs(r_acc[1] - r_acc[0]) if acc_key == "test_error" else abs(r_acc[1] - r_acc[0]) / r_acc_mean
        )
    ok = req.get("status") == "ok"
    targets: dict[str, bool | None] = {"no_failure": ok}
    if ok:
        u = req["stats"]
        res["unlearn"] = u
        res["fraction"] = (u["nll_forgot"] - o_nll) / denom if denom != 0 else math.nan
        targets["fraction"] = FRACTION_RANGE[0] <= res["fraction"] <= FRACTION_RANGE[1]
        if acc_key == "test_error":
            res["accuracy_distance"] = abs(u["test_error"] - r_acc_mean)
            targets["accuracy"] = res["accuracy_distance"] <= ERROR_POINTS
        else:
            res["accuracy_distance"] = abs(u["test_rmse"] - r_acc_mean) / r_acc_mean
            targets["accuracy"] = res["accuracy_distance"] <= RMSE_REL
    else:
        targets["fraction"] = targets["accuracy"] = False
    peak = req.get("peak_gb")
    if n_params < BIG_MODEL:
        status = req.get("status")
        targets["memory"] = (peak is not None and peak < MEMORY_GB) and status not in ("memory-cap", "killed")
    epoch = req.get("epoch_cpu_seconds")
    if epoch and "cpu_seconds" in req:
        # CPU time of one thread: on a loaded machine wall times inflate, CPU time much less
        res["epochs_per_request"] = req["cpu_seconds"] / epoch
        res["epochs_per_request_wall"] = req["seconds"] / req["epoch_seconds"]
        if "fit_cpu_seconds" in req:  # the one-off fit before the request (--fit), reported beside it
            res["fit_epochs"] = req["fit_cpu_seconds"] / epoch
        if n_params >= BIG_MODEL:
            targets["time"] = ok and res["epochs_per_request"] <= EPOCH_FRACTION
    targets["user_bank_intact"] = req.get("user_bank_intact")
    res["targets"] = targets
    res["all_met"] = all(v is not False for v in targets.values()) and "invalid" not in res
    return res


# ------------------------------------------------------------------------------------------------ report
def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


REPORT_KEYS = (
    "solver",
    "damping",
    "damping_relative",
    "damping_trials",
    "residual",
    "converged",
    "iterations",
    "predicted_change",
    "actual_change",
    "model_ratio",
    "remaining_nll_change",
    "safe",
    "shift_norm",
    "n_curvature_draws",
)


def report_fields(req: dict[str, Any]) -> str:
    """The request report's key fields (those that exist in this library version) in one line."""
    rep = req.get("report") or {}
    if not rep:
        return "no report"
    parts = []
    for k in REPORT_KEYS:
        if k in rep:
            v = rep[k]
            parts.append(f"{k}={_fmt(v, '.3g') if isinstance(v, float) else v}")
    if rep.get("problems"):
        parts.append("problems=[" + "; ".join(rep["problems"]) + "]")
    return " ".join(parts)


def print_table(results: list[dict[str, Any]], out: Any = sys.stdout) -> None:
    """One row per model and seed; targets marked; report fields and failures listed below with their messages.

    Columns: forgotten rows' NLL fraction (and the retrain pair's own fraction), kept-data test error (points)
    or RMSE for origin / mean retrain / unlearn, distance to retrain (and between the two retrain chains),
    forgotten rows' error for origin / retrain / unlearn (classification), the request's peak memory, wall and
    CPU seconds, the CPU seconds of one 10k-row SGLD epoch (the mean of the two timed just before and after the
    request) and the request in epochs (CPU over CPU); with ``--fit``
    also the one-off fit before the request, CPU seconds and epochs (not in the request's columns).
    """
    fits = any("fit_cpu_seconds" in r["request"] for r in results)
    head = (
        f"{'model':<12}{'params':>10} {'status':<11}{'fraction':>9}{'[pair]':>7}  {'metric':<5}{'origin':>7}"
        f"{'retrain':>8}{'unlearn':>8}{'|Δ|':>7}{'[pair]':>7}  {'forgot err o/r/u':>17}{'mem GB':>7}{'req s':>7}"
        f"{'cpu s':>7}{'epoch':>7}{'req/ep':>7}" + (f"{'fit cpu s':>10}{'fit/ep':>7}" if fits else "") + "  targets"
    )
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in results:
        req = r["request"]
        acc = r["metric"]
        rmean = statistics.fmean(x[acc] for x in r["retrain"])
        un = r.get("unlearn", {})
        dist, pair = r.get("accuracy_distance"), r.get("retrain_pair_distance")
        if acc == "test_rmse":
            metric = "rmse"
            dist_s = f"{100 * dist:.1f}%" if dist is not None else "—"
            pair_s = f"{100 * pair:.1f}%" if pair is not None else "—"
            forgot = "—"
        else:
            metric = "err%"
            dist_s, pair_s = _fmt(dist, ".1f"), _fmt(pair, ".1f")
            rf = statistics.fmean(x.get("error_forgot", math.nan) for x in r["retrain"])
            forgot = f"{r['origin'].get('error_forgot', math.nan):.0f}/{rf:.0f}/{_fmt(un.get('error_forgot'), '.0f')}"
        missed = [k for k, v in r["targets"].items() if v is False]
        print(
            f"{r['model']:<12}{r['params']:>10,} {req.get('status', '?'):<11}{_fmt(r.get('fraction')):>9}"
            f"{_fmt(r.get('retrain_pair_fraction')):>7}  {metric:<5}{_fmt(r['origin'][acc]):>7}{_fmt(rmean):>8}"
            f"{_fmt(un.get(acc)):>8}{dist_s:>7}{pair_s:>7}  {forgot:>17}{_fmt(req.get('peak_gb')):>7}"
            f"{_fmt(req.get('seconds'), '.1f'):>7}{_fmt(req.get('cpu_seconds'), '.1f'):>7}"
            f"{_fmt(req.get('epoch_cpu_seconds'), '.1f'):>7}{_fmt(r.get('epochs_per_request')):>7}"
            + (f"{_fmt(req.get('fit_cpu_seconds'), '.1f'):>10}{_fmt(r.get('fit_epochs')):>7}" if fits else "")
            + "  "
            + (
                "INVALID: a chain diverged"
                if r.get("invalid")
                else "all met"
                if not missed
                else "MISSED: " + ",".join(missed)
            ),
            file=out,
        )
    print(file=out)
    for r in results:
        req = r["request"]
        line = f"{r['model']} (seed {r['seed']}, forget {r['forget']}): {report_fields(req)}"
        if r.get("invalid"):
            line += f"\n    INVALID RUN: {r['invalid']}"
        if req.get("error"):
            line += f"\n    {req['status']}: {req['error'][:600]}"
        if req.get("user_bank_intact") is False:
            line += "\n    the user's bank was modified by the request (live model loaded with vector_to_parameters)"
        for f in r.get("floor", []):
            line += f"\n    floor (an independent retrain chain scored the same way): {f}"
        print(line, file=out)


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The results as a Markdown table (for the README notes); with ``--fit`` a column of the one-off fit's cost."""
    fits = any("fit_cpu_seconds" in r["request"] for r in results)
    rows = [
        "| model | params | status | fraction (pair) | kept-data metric: origin / retrain / unlearn (distance; pair) "
        "| forgotten-row error o / r / u | peak GB | request s (CPU) | epoch CPU s | request / epoch | "
        + ("one-off fit s (CPU; epochs) | " if fits else "")
        + "report |",
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if fits else ""),
    ]
    for r in results:
        req = r["request"]
        acc = r["metric"]
        rmean = statistics.fmean(x[acc] for x in r["retrain"])
        un = r.get("unlearn", {})
        dist, pair = r.get("accuracy_distance"), r.get("retrain_pair_distance")
        if acc == "test_rmse":
            metric = (
                f"RMSE {_fmt(r['origin'][acc], '.3f')} / {_fmt(rmean, '.3f')} / {_fmt(un.get(acc), '.3f')} "
                f"({'—' if dist is None else f'{100 * dist:.1f}%'}; {'—' if pair is None else f'{100 * pair:.1f}%'})"
            )
            forgot = "—"
        else:
            metric = (
                f"err {_fmt(r['origin'][acc], '.1f')} / {_fmt(rmean, '.1f')} / {_fmt(un.get(acc), '.1f')} "
                f"({_fmt(dist, '.1f')}; {_fmt(pair, '.1f')})"
            )
            rf = statistics.fmean(x.get("error_forgot", math.nan) for x in r["retrain"])
            forgot = (
                f"{r['origin'].get('error_forgot', math.nan):.0f} / {rf:.0f} / {_fmt(un.get('error_forgot'), '.0f')}"
            )
        status = req.get("status", "?")
        if r.get("invalid"):
            status += " (INVALID: chain diverged)"
        elif req.get("error"):
            status += ": " + req["error"].split("\n")[0][:160].replace("|", "/")
        rep = report_fields(req).replace("|", "/")
        rows.append(
            f"| {r['model']} | {r['params']:,} | {status} | {_fmt(r.get('fraction'))} "
            f"({_fmt(r.get('retrain_pair_fraction'))}) | {metric} | {forgot} | {_fmt(req.get('peak_gb'))} | "
            f"{_fmt(req.get('seconds'), '.1f')} ({_fmt(req.get('cpu_seconds'), '.1f')}) | "
            f"{_fmt(req.get('epoch_cpu_seconds'), '.2f')} | {_fmt(r.get('epochs_per_request'))} | "
            + (
                f"{_fmt(req.get('fit_seconds'), '.1f')} ({_fmt(req.get('fit_cpu_seconds'), '.1f')}; "
                f"{_fmt(r.get('fit_epochs'))}) | "
                if fits
                else ""
            )
            + f"{rep} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--models",
        default=",".join(BUILDERS),
        help=f"comma-separated subset of {','.join(BUILDERS)} (also: {','.join(EXTRA_BUILDERS)})",
    )
    ap.add_argument("--quick", action="store_true", help="the reduced sizes the tests use (minutes, not hours)")
    ap.add_argument(
        "--seeds", type=A.int_list(0), default="0", help="comma-separated seeds (chains and the forgotten rows)"
    )
    ap.add_argument(
        "--forget",
        choices=("class", "random"),
        default="class",
        help="class-structured tasks: forget all rows of one (thinned) class, or random rows",
    )
    ap.add_argument(
        "--retrains", type=A.positive_int, default=2, help="retrain chains per model (>= 2 gives the pair spread)"
    )
    ap.add_argument("--layout", choices=("tensor", "list", "dict"), default="tensor", help="the user's bank layout")
    ap.add_argument(
        "--remaining",
        choices=("iterator", "loader", "rows"),
        default="iterator",
        help="the remaining data as the user's endless minibatch iterator (default), as the shuffled DataLoader over "
        "a TensorDataset itself, or as the rows (x, y); the library can list the last two (then a class removal's "
        "emptied-label check runs)",
    )
    ap.add_argument(
        "--fit",
        action="store_true",
        help="call MCMCUnlearner.fit on all training rows before the request (its one-off curvature, timed apart: "
        "the request's time is then what a request after the one-off work costs)",
    )
    ap.add_argument("--no-alias", action="store_true", help="do not load the live model from the bank's last row")
    ap.add_argument("--threads", type=A.positive_int, default=1, help="torch threads (default 1)")
    ap.add_argument("--mem-cap-gb", type=float, default=4.0, help="address-space cap of the request's child")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds before the request's child is killed")
    ap.add_argument(
        "--epoch-steps", type=int, default=None, help="time only this many SGLD steps of the 10k-row epoch (scaled)"
    )
    ap.add_argument(
        "--floor", type=int, default=0, help="extra retrain chains scored like the unlearned bank (the noise floor)"
    )
    ap.add_argument(
        "--chain-cache",
        type=Path,
        default=None,
        help="folder to keep trained chains in and reuse them (same schedule, data and seed): re-runs then only "
        "repeat the requests",
    )
    ap.add_argument(
        "--options",
        type=A.json_object,
        default=None,
        help="DIAGNOSTICS ONLY (not the defaults under test): JSON dict of extra MCMCUnlearner options",
    )
    ap.add_argument(
        "--no-strict", action="store_true", help="DIAGNOSTICS ONLY: apply removals that fail the library's checks"
    )
    ap.add_argument("--json", type=A.output_file, default=None, help="write the results here (its folder is created)")
    ap.add_argument("--render", type=Path, default=None, help="print the tables of a saved --json file and exit")
    ap.add_argument("--markdown", action="store_true", help="with --render: a Markdown table")
    args = ap.parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())["results"]
        if args.markdown:
            print(markdown_table(saved))
        else:
            print_table(saved)
        return 0
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    builders = {**BUILDERS, **EXTRA_BUILDERS}
    unknown = sorted(set(names) - set(builders))
    if unknown:
        ap.error(f"unknown model(s) {unknown}: choose from {','.join(builders)}")
    import mcmc_unlearner

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) (set by --threads), "
        f"mcmc_unlearner from {Path(mcmc_unlearner.__file__).parent}, {platform.node()}"
    )
    if args.options or args.no_strict:
        print(f"DIAGNOSTIC RUN, not the defaults: options={args.options}, strict={not args.no_strict}")
    results = []
    t_all = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in names:
            problem = builders[name](args.quick, seed, args.forget)
            print(
                f"[{name}] seed {seed}: {problem.description}, {problem.n_params():,} params, {problem.data_source}; "
                f"forget {problem.forget_rule}",
                flush=True,
            )
            r = evaluate(
                problem,
                seed=seed,
                retrains=args.retrains,
                layout=args.layout,
                alias=not args.no_alias,
                mem_cap_gb=args.mem_cap_gb,
                timeout=args.timeout,
                epoch_steps=args.epoch_steps,
                floor=args.floor,
                cache=args.chain_cache,
                options=args.options,
                strict=not args.no_strict,
                remaining_as=args.remaining,
                fit=args.fit,
                log=lambda s: print(s, flush=True),
            )
            results.append(r)
    print()
    print_table(results)
    met = sum(r["all_met"] for r in results)
    print(f"\ntargets met on {met} of {len(results)} runs; total {time.perf_counter() - t_all:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "quick": args.quick,
            "layout": args.layout,
            "remaining": args.remaining,
            "fit": args.fit,
            "alias": not args.no_alias,
            "mem_cap_gb": args.mem_cap_gb,
            "options": args.options,
            "strict": not args.no_strict,
            "targets": {
                "fraction": FRACTION_RANGE,
                "error_points": ERROR_POINTS,
                "rmse_rel": RMSE_REL,
                "memory_gb": MEMORY_GB,
                "epoch_fraction_big": EPOCH_FRACTION,
            },
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
