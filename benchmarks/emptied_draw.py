"""The emptied label's row draw (``mcmc_unlearner.emptied``, README step 6): its CPU time, and Newton's with the
steps' curvature summed in float32 (the default since stop 59) or float64 (as before).

The draw's cost is the ``d × d`` curvature ``Σ_i p_i(1 − p_i) φ̃_i φ̃_iᵀ`` over the ``n`` remaining rows at each
Newton step (about 11 a sample), ``d`` the output layer's inputs; stop 59's probe found it 70% of a class-removal
request on CNNs with a 257-input head. Printed: the whole draw (``resample_label_rows``) of ``--samples`` samples
of an MLP whose head reads ``--width`` features over ``--rows`` rows, CPU seconds (one call, then ``--reps``);
then one chunk's Newton both ways (:mod:`_timing`'s interleaved repetitions), and how far apart their modes are in
the conditional's standard deviations.

    OMP_NUM_THREADS=1 python benchmarks/emptied_draw.py                 # about a minute, one torch thread
    OMP_NUM_THREADS=1 python benchmarks/emptied_draw.py --rows 400 --reps 3   # seconds
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import _benchargs as A
import _timing as T
from mcmc_unlearner.curvature import ParamSpec, functionalize
from mcmc_unlearner.emptied import (
    _BlockPrior,
    _ChunkPrior,
    _Conditional,
    _features,
    _mode,
    output_rows,
    resample_label_rows,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=A.positive_int, default=1350, help="remaining rows (default 1350)")
    ap.add_argument("--width", type=A.positive_int, default=256, help="the head's inputs (default 256)")
    ap.add_argument("--samples", type=A.positive_int, default=50, help="stored samples (default 50)")
    ap.add_argument("--reps", type=A.positive_int, default=3, help="repetitions after the first call")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    C, n, h = 10, args.rows, args.width
    model = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, C))
    x, y = torch.randn(n, 64), torch.randint(0, C - 1, (n,))  # label C - 1 emptied
    spec, theta = ParamSpec.of(model), ParamSpec.flatten_module(model).detach()
    thetas = theta + 0.05 * torch.randn(args.samples, theta.numel())
    lp_f = functionalize(model, lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()))

    def draw() -> None:
        out = resample_label_rows(model, spec, lp_f, thetas, (x, y), [C - 1], torch.Generator().manual_seed(1))
        assert not isinstance(out, str), out

    times = []
    for _ in range(1 + args.reps):
        t0 = time.process_time()
        draw()
        times.append(time.process_time() - t0)
    sp = T.spread(times[1:])
    print(
        f"torch {torch.__version__}, 1 thread; {args.samples} samples, {n} rows, head {h} + bias -> {C}: draw "
        f"{sp['median']:.2f} s CPU ({sp['min']:.2f}-{sp['max']:.2f}; first {times[0]:.2f})"
    )
    rows = output_rows(model, spec, thetas[0], x)
    B, d = 3, h + 1
    phi, logits = torch.zeros(B, d, n, dtype=torch.float64), torch.empty(B, n, C, dtype=torch.float64)
    for j in range(B):
        _features(model, spec, rows, thetas[j], x, phi[j], logits[j])
    gens = [torch.Generator().manual_seed(j) for j in range(B)]
    cond = _Conditional(_ChunkPrior(_BlockPrior(lp_f, rows.index(C - 1)), thetas[:B], gens), phi, logits, y, C - 1)
    v0 = thetas[:B, rows.index(C - 1)].double()
    t = T.interleaved(
        {"float32": lambda: _mode(cond, v0), "float64": lambda: _mode(cond, v0, single=False)},
        args.reps,
        clock=time.process_time,
    )
    modes = [_mode(cond, v0, single=s)[0] for s in (True, False)]
    H = cond.hessian(modes[1], cond(modes[1])[2], torch.arange(B))
    r = (modes[0] - modes[1]).unsqueeze(2)
    apart = float((r.mT @ H @ r).sqrt().max())
    print(
        f"Newton, a chunk of {B}: float32 curvature {t['float32']['median'] * 1e3:.0f} ms, float64 "
        f"{t['float64']['median'] * 1e3:.0f} ms (medians of {args.reps}); float32/float64 "
        f"{t['ratio']['median']:.2f}x ({t['ratio']['min']:.2f}-{t['ratio']['max']:.2f}); modes {apart:.1e} "
        "conditional standard deviations apart"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
