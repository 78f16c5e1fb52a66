"""Per-draw derivatives batched through ``vmap`` or taken one draw at a time, on networks of several kinds.

The unlearner takes derivatives at many posterior draws at once: the removed rows' gradient ``G`` (16 draws × 64
rows by default) and the safety check (a forward pass and a forward-mode derivative, 8 draws × 256 rows, per
damping trial). ``vmap`` batches the draws; a convolution with batched weights then runs as one grouped convolution.
This script times both ways through the library's own code (``MCMCUnlearner._per_draw_grads`` with
``backend="func"`` / ``"autograd"``, ``EnergyCheck(vectorise=True/False)``) and prints what ``backend="auto"``
chooses for each (:func:`mcmc_unlearner.unlearner.loop_over_draws`). Each way is called once first (its one-off
costs: tracing, allocation), then ``--reps`` times interleaved with the other, the order alternating (vmap, loop,
then loop, vmap, ...). Printed per way: the median and min-max of the repetitions, the first call, and the total
(first call + repetitions); the ratio vmap/loop is taken per repetition, then its median and min-max.

    OMP_NUM_THREADS=1 python benchmarks/draw_batching.py            # a few minutes, one torch thread
    OMP_NUM_THREADS=1 python benchmarks/draw_batching.py --networks cnn,mlp64 --reps 3   # seconds
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

import _benchargs as A  # this folder, as model_matrix
import _timing as T
import model_matrix as mm  # the model matrix's networks (this folder)
from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import ParamSpec, functionalize
from mcmc_unlearner.step import EnergyCheck
from mcmc_unlearner.unlearner import loop_over_draws


def _lenet(side: int) -> nn.Module:
    """LeNet-5 (the paper's network) on ``side × side`` images."""
    flat = 16 * ((side // 2 - 4) // 2) ** 2
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )  # fmt: skip


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def _mlp(h: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))


NETWORKS = {  # --networks key: (label, builder, input shape)
    "resnet": ("ResNet 64-128-256, 16x16", lambda: mm.resnet((64, 128, 256)), (1, 16, 16)),
    "lenet28": ("LeNet-5, 28x28", lambda: _lenet(28), (1, 28, 28)),
    "lenet16": ("LeNet-5, 16x16", lambda: _lenet(16), (1, 16, 16)),
    "cnn": ("small CNN, 8x8", _small_cnn, (1, 8, 8)),
    "mlp64": ("MLP 64-64-64-10", lambda: _mlp(64), (1, 8, 8)),
    "mlp256": ("MLP 64-256-256-10", lambda: _mlp(256), (1, 8, 8)),
    "mlp512": ("MLP 64-512-512-10", lambda: _mlp(512), (1, 8, 8)),
}


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, dict]:
    """:func:`_timing.interleaved` on wall time (``time.perf_counter``, read when called)."""
    return T.interleaved(fns, reps, clock=time.perf_counter)


def _time(
    make: Callable[[], nn.Module], shape: tuple[int, ...], reps: int
) -> tuple[int, tuple[bool, bool], dict, dict]:
    """Parameters, ``auto``'s choice (loop?), and the vmapped / looped timings of ``G`` and of one check
    (:func:`interleaved`)."""
    model = make().eval()
    dim = sum(p.numel() for p in model.parameters())
    bank = ParamSpec.flatten_module(model).detach() + 0.01 * torch.randn(16, dim)
    un = MCMCUnlearner(model, bank=bank, nll=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"))
    rows_f = functionalize(model, lambda m, x, y: nn.functional.cross_entropy(m(x), y, reduction="none"))
    h_f = functionalize(model, lambda m, x, y: nn.functional.cross_entropy(m(x), y, reduction="none").sum())
    g_rows = (torch.randn(64, *shape), torch.randint(0, 10, (64,)))
    c_rows = (torch.randn(256, *shape), torch.randint(0, 10, (256,)))
    x = 1e-3 * torch.randn(dim)

    def grads(backend: str) -> None:
        un.backend = backend
        un._per_draw_grads(h_f, bank, g_rows)

    vec, loop = (EnergyCheck(rows_f, None, bank[:8], c_rows, 10_000, torch.zeros(dim), vectorise=v) for v in (1, 0))
    g = interleaved({"vmap": lambda: grads("func"), "loop": lambda: grads("autograd")}, reps)
    c = interleaved({"vmap": lambda: vec(x), "loop": lambda: loop(x)}, reps)
    return dim, (loop_over_draws(model, dim), loop_over_draws(model, dim, check=True)), g, c


def _ms(sp: dict[str, float]) -> str:
    return f"{sp['median'] * 1e3:.1f} ({sp['min'] * 1e3:.1f}-{sp['max'] * 1e3:.1f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=A.positive_int, default=5, help="interleaved repetitions after the first call")
    ap.add_argument("--threads", type=A.positive_int, default=1, help="torch threads (default 1)")
    ap.add_argument("--networks", type=A.name_list(NETWORKS), default=",".join(NETWORKS), help="comma-separated subset")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_all = time.perf_counter()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) (set by --threads); per way: one first call, "
        f"then {args.reps} repetitions interleaved with the other way (order alternating)"
    )
    print(
        "G: 16 draws x 64 rows; check: 8 draws x 256 rows. ms: median (min-max) of the repetitions; first: the first "
        "call; total: first + repetitions; vmap/loop: per-repetition ratio, median (min-max), and of the totals"
    )
    for key in args.networks.split(","):
        name, make, shape = NETWORKS[key]
        dim, looped, g, c = _time(make, shape, args.reps)
        print(f"{name} ({dim:,d} params)")
        for what, t, lp in zip(("G", "check"), (g, c), looped):
            print(
                f"  {what:5s} vmap {_ms(t['vmap'])} ms, first {t['vmap']['first'] * 1e3:.1f}, total "
                f"{t['vmap']['total']:.3f} s | loop {_ms(t['loop'])} ms, first {t['loop']['first'] * 1e3:.1f}, total "
                f"{t['loop']['total']:.3f} s | vmap/loop {t['ratio']['median']:.2f}x ({t['ratio']['min']:.2f}-"
                f"{t['ratio']['max']:.2f}), totals {t['ratio']['total']:.2f}x (auto: {'loop' if lp else 'vmap'})",
                flush=True,
            )
    print(
        "ratio > 1: the loop is faster. `auto` (loop_over_draws): G loops from 2**17 parameters, or 2**14 with a "
        "convolution; the check loops for a convolutional network from 2**14 to 2**17 parameters."
    )
    print(f"total wall time {time.perf_counter() - t_all:.1f} s (model construction included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
