"""Cost of building and applying the Kronecker-factored curvature, in SGLD steps of the same model.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/kronecker.py [--models digits,lenet5,mlp,resnet]
        [--draws 4] [--rows 128] [--max-locations auto|none|N] [--repeats 3] [--threads 1]
        [--compare-subsampling] [--compare-sampling]

For each model: the median time of one SGLD step (energy forward + backward on ``--rows`` rows + update), of
``KroneckerCurvature.build`` over ``--draws`` draws × ``--rows`` rows (one sampled label per row), split into the
label passes and the eigendecompositions, of one ``solve(v, damping)`` and one ``K @ v``, and the build's memory
estimate. The build is run ``--repeats`` times: its median (for an even count the lower one, a build that ran, so
that its parts add up), min-max, the first build's time (the process's one-off costs land there) and the total of
all builds are printed. Inputs are random (the cost does not depend on the values). ``--threads`` torch threads
(default 1), printed in the header.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.kronecker import KroneckerCurvature
from mcmc_unlearner.models.bnn import MLP, DigitsNet, LeNet5

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder: _benchargs
import _benchargs as A


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN + (1x1 conv-BN) shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResNetSmall(nn.Module):
    """Stem conv 3→64, residual blocks of 64, 128 (stride 2) and 256 (stride 2) channels, pool, fc: 1.2M params."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(64, 64, 1), BasicBlock(64, 128, 2), BasicBlock(128, 256, 2))
        self.fc = nn.Linear(256, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


MODELS = {
    "digits": (lambda: DigitsNet(1, 10, input_size=8), (1, 8, 8)),
    "lenet5": (lambda: LeNet5(1, 10, input_size=32), (1, 32, 32)),
    "mlp": (lambda: MLP(784, hidden=(1024, 1024), n_classes=10), (1, 28, 28)),
    "resnet": (ResNetSmall, (3, 32, 32)),
}


def nll(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def log_prior(model: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in model.parameters()) / 0.1**2


def rss(field: str) -> int:
    """``VmRSS``/``VmHWM`` of this process in bytes (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field))
    except OSError:
        return 0


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs``), so the next peak is the build's."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def timings(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Call ``fn`` ``repeats`` times; its ``times`` (s), the ``first`` (one-off costs included), ``total``,
    ``min``/``max``, the lower ``median`` (a call that ran) at ``index``, and the last call's ``result``."""
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    index = sorted(range(repeats), key=times.__getitem__)[(repeats - 1) // 2]
    return {"times": times, "first": times[0], "total": sum(times), "min": min(times), "max": max(times),
            "median": times[index], "index": index, "result": result}  # fmt: skip


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(name: str, args: argparse.Namespace, max_locations: int | str | None, g: torch.Generator) -> None:
    """Time one model and print one line."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    theta = ParamSpec.flatten_module(model)
    thetas = theta[None] + 0.01 * torch.randn(args.draws, theta.numel(), generator=g)
    batches = [
        (torch.randn(args.rows, *shape, generator=g), torch.randint(0, 10, (args.rows,), generator=g))
        for _ in range(args.draws)
    ]

    def sgld_step() -> None:
        model.zero_grad(set_to_none=True)
        energy = 10_000 * nll(model, batches[0]).mean() - log_prior(model)
        energy.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-1e-7).add_(torch.randn(p.shape, generator=g), alpha=1e-4)

    step = median_time(sgld_step, args.repeats + 2)
    ParamSpec.assign(model, theta)
    model.zero_grad(set_to_none=True)
    estimate = KroneckerCurvature.memory_estimate(model, args.rows, batches[0])
    parts: list[dict[str, float]] = []

    def build_once() -> KroneckerCurvature:
        K = KroneckerCurvature.build(
            model, thetas, batches, 10_000, nll=nll, log_prior=log_prior, max_locations=max_locations,
            max_factor_dim=args.max_factor_dim,
        )  # fmt: skip
        parts.append(K.info["seconds"])
        return K

    reset_peak()
    base = rss("VmRSS")
    builds = timings(build_once, args.repeats)
    peak = rss("VmHWM") - base
    K, build = builds["result"], builds["median"]
    solve = median_time(lambda: K.solve(torch.randn(K.dim, generator=g), 1.0), 5)  # fresh vectors: no cache
    matvec = median_time(lambda: K @ torch.randn(K.dim, generator=g), 5)
    v = torch.randn(K.dim, generator=g)
    K.solve(v, 1.0)
    resolve = median_time(lambda: K.quad(K.solve(v, 2.0)), 5)  # another damping for the same v, then quad
    dims = [max(b["A_dim"], b["G_dim"]) for b in K.info["kronecker"].values()]
    split = ", ".join(f"{k} {v:.2f}" for k, v in parts[builds["index"]].items())
    print(
        f"{name:7s} D={K.dim:>9,d}  SGLD step {step * 1e3:8.1f} ms | build median {build:7.2f} s = {build / step:5.1f} "
        f"steps [{split}], range {builds['min']:.2f}-{builds['max']:.2f} s, first {builds['first']:.2f} s, total "
        f"{builds['total']:.2f} s for {args.repeats} | solve {solve * 1e3:7.1f} ms, K@v {matvec * 1e3:7.1f} ms, "
        f"re-solve+quad {resolve * 1e3:7.1f} ms"
        f" | backward passes {K.info['backward_passes']} | diag params {K.info['diagonal_params']:,d} | "
        f"memory estimate {estimate / 2**20:7.1f} MiB, peak RSS growth {peak / 2**20:7.1f} MiB | "
        f"largest factor {max(dims)}",
        flush=True,
    )


def compare_subsampling(name: str, g: torch.Generator) -> None:
    """How far the step moves when A is subsampled (max_locations="auto") vs when the labels are redrawn.

    For ``v`` = the summed-NLL gradient of 64 other rows (a deletion request's right-hand side) prints the relative
    error ``‖x − x_ref‖_K / ‖x_ref‖_K`` of ``x = K⁻¹v`` against the full build (every location, sample seed 0).
    """
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    theta = ParamSpec.flatten_module(model)
    thetas = theta[None] + 0.01 * torch.randn(4, theta.numel(), generator=g)
    batches = [(torch.randn(128, *shape, generator=g), torch.randint(0, 10, (128,), generator=g)) for _ in range(4)]
    removed = (torch.randn(64, *shape, generator=g), torch.randint(0, 10, (64,), generator=g))
    grads = torch.autograd.grad(nll(model, removed).sum(), ParamSpec.params(model))
    v = torch.cat([t.reshape(-1) for t in grads])
    settings = {
        "full, sample seed 0": {"max_locations": None},
        "full, exact label expectation": {"max_locations": None, "exact_expectation": True},
        "full, sample seed 1": {"max_locations": None, "generator": torch.Generator().manual_seed(1)},
        "auto, sample seed 0": {},
        "auto, sample seed 1": {"generator": torch.Generator().manual_seed(1)},
    }
    built = {}
    for label, kw in settings.items():
        built[label] = KroneckerCurvature.build(model, thetas, batches, 10_000, nll=nll, log_prior=log_prior, **kw)
    ref = built["full, sample seed 0"]
    x_ref = ref.solve(v)
    norm = ref.quad(x_ref) ** 0.5
    for label, K in built.items():
        x = K.solve(v)
        err = ref.quad(x - x_ref) ** 0.5 / norm
        cos = float(x @ x_ref / (x.norm() * x_ref.norm()))
        print(f"{name}: {label}: build {K.info['build_seconds']:.1f} s, rel. K-norm error {err:.3f}, cosine {cos:.4f}")


def compare_sampling(arch: str, rows: int, g: torch.Generator) -> None:
    """Label sampling vs the Gaussian square-root sketch on a TRAINED (confident) classifier of the digits data:
    relative K-norm error of ``K⁻¹v`` against the exact label expectation, 5 seeds each, one sample per row."""
    from mcmc_unlearner.image_data import load_dataset
    from mcmc_unlearner.models.bnn import build_model

    ds = load_dataset("digits", seed=0)
    x, y = ds.x_train, ds.y_train
    torch.manual_seed(0)
    model = build_model(arch, ds.in_shape, ds.n_classes)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        idx = torch.randint(0, len(x), (128,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    acc, conf = float((p.argmax(1) == y).float().mean()), float(p.max(1).values.mean())
    theta = ParamSpec.flatten_module(model)
    thetas = theta[None] + 0.002 * torch.randn(4, theta.numel(), generator=g)
    batches = [(x[i], y[i]) for i in torch.randint(0, len(x), (4, rows), generator=g)]
    grads = torch.autograd.grad(nll(model, (x[:64], y[:64])).sum(), ParamSpec.params(model))
    v = torch.cat([t.reshape(-1) for t in grads])
    kw = {"nll": nll, "log_prior": log_prior}
    ref = KroneckerCurvature.build(model, thetas, batches, len(x), exact_expectation=True, **kw)
    x_ref = ref.solve(v)
    norm = ref.quad(x_ref) ** 0.5
    for sampling in ("labels", "gaussian"):
        errs = []
        for seed in range(5):
            K = KroneckerCurvature.build(
                model, thetas, batches, len(x), sampling=sampling, generator=torch.Generator().manual_seed(seed), **kw
            )
            errs.append(ref.quad(K.solve(v) - x_ref) ** 0.5 / norm)
        print(
            f"{arch} (train acc {acc:.3f}, mean max prob {conf:.3f}), {rows} rows x 4 draws, sampling={sampling}: "
            f"error vs exact expectation median {statistics.median(errs):.3f} (range {min(errs):.3f}-{max(errs):.3f})"
        )


def max_locations_arg(text: str) -> str:
    """``--max-locations``: ``auto``, ``none`` or an integer >= 1 (returned as given; :func:`main` converts it)."""
    if text.lower() in ("auto", "none"):
        return text
    try:
        ok = int(text) >= 1
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'none' or an integer >= 1, got {text!r}")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=A.name_list(MODELS), default="digits,lenet5,mlp,resnet")
    parser.add_argument("--draws", type=A.positive_int, default=4)
    parser.add_argument("--rows", type=A.positive_int, default=128)
    parser.add_argument("--max-locations", type=max_locations_arg, default="auto", help="an int, 'auto' or 'none'")
    parser.add_argument("--max-factor-dim", type=A.positive_int, default=4096)
    parser.add_argument("--repeats", type=A.positive_int, default=3, help="builds per model")
    parser.add_argument("--threads", type=A.positive_int, default=1, help="torch threads (default 1)")
    parser.add_argument("--compare-subsampling", action="store_true", help="accuracy of max_locations='auto'")
    parser.add_argument(
        "--compare-sampling", action="store_true", help="labels vs Gaussian sketch on trained digits_net and mlp"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) (set by --threads)", flush=True)
    choice = args.max_locations.lower()
    max_locations = "auto" if choice == "auto" else None if choice == "none" else int(choice)
    g = torch.Generator().manual_seed(0)
    if args.compare_sampling:
        for arch in ("digits_net", "mlp"):
            compare_sampling(arch, args.rows, g)
        return
    for name in args.models.split(","):
        if args.compare_subsampling:
            compare_subsampling(name, g)
        else:
            bench(name, args, max_locations, g)


if __name__ == "__main__":
    main()
