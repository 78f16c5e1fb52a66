"""The model zoo's 2x2 max-pooling (``models.bnn.MaxPool2x2``) against ``nn.MaxPool2d(2)``, in one process.

For each network (``--models``) the script builds it twice with the same weights, once with torch's
``nn.MaxPool2d(2)`` in place of every ``MaxPool2x2``, and times a forward pass without autograd (the unlearner's
safety check and every prediction run so) and a forward + backward pass of the summed cross-entropy, the two
versions alternating which goes first for ``--reps`` repetitions after one first call each (timed apart; the
bit-for-bit comparison's passes run before it). It prints each one's CPU time per row (median and range of the
repetitions, and the first call), the CPU seconds of all its timed passes (first included), ``nn.MaxPool2d``'s time
over ``MaxPool2x2``'s per repetition (median and range) and of the totals, and whether the logits and the
parameters' gradients are identical to every bit (they must be: the script exits 1 otherwise). One torch thread
(``--threads``)::

    OMP_NUM_THREADS=1 python benchmarks/maxpool.py --reps 7
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchargs as A
import _timing as T
from mcmc_unlearner.models.bnn import LeNet5, MaxPool2x2, SmallCNN

MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "lenet5": (LeNet5, (1, 32, 32)),
    "small_cnn": (SmallCNN, (3, 32, 32)),
}


def with_torch_pooling(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``MaxPool2x2`` layers are torch's ``nn.MaxPool2d(2)``."""
    other = type(model)()
    other.load_state_dict(model.state_dict())
    for module in list(other.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, MaxPool2x2):
                setattr(module, child_name, nn.MaxPool2d(2))
    return other


def _line(t: dict, rows: int) -> str:
    """One pass's line: each version's CPU time per row (median and range of the repetitions, the first call) and
    the CPU seconds of all passes, then ``nn.MaxPool2d`` over ``MaxPool2x2`` per repetition and of the totals."""
    us = 1e6 / rows
    ours, theirs = (T.describe(t[k], "us/row", us, 2) for k in ("ours", "theirs"))
    r = T.paired_ratio(t["theirs"], t["ours"])
    return f"MaxPool2x2 {ours} | nn.MaxPool2d {theirs} | nn.MaxPool2d / MaxPool2x2 {T.describe_ratio(r)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="lenet5,small_cnn", help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--rows", type=A.positive_int, default=256, help="rows per pass")
    ap.add_argument("--reps", type=A.positive_int, default=7)
    ap.add_argument("--threads", type=A.positive_int, default=1, help="torch threads (default 1: README, 'Threads')")
    args = ap.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.rows} rows per pass, CPU time")
    same = True
    for name in names:
        build, shape = MODELS[name]
        torch.manual_seed(0)
        ours = build()
        theirs = with_torch_pooling(ours)
        x, y = torch.rand(args.rows, *shape), torch.randint(0, 10, (args.rows,))
        with torch.no_grad():
            equal_out = torch.equal(ours(x), theirs(x))
        grads = []
        for m in (ours, theirs):
            m.zero_grad()
            F.cross_entropy(m(x), y, reduction="sum").backward()
            grads.append([p.grad.clone() for p in m.parameters()])
        equal_grad = all(torch.equal(a, b) for a, b in zip(*grads))
        same &= equal_out and equal_grad

        def forward(m: nn.Module, x: torch.Tensor = x) -> None:
            with torch.no_grad():
                m(x)

        def backward(m: nn.Module, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            F.cross_entropy(m(x), y, reduction="sum").backward()

        for label, fn in (("forward, no autograd", forward), ("forward + backward", backward)):
            fns = {"ours": lambda fn=fn, m=ours: fn(m), "theirs": lambda fn=fn, m=theirs: fn(m)}
            t = T.interleaved(fns, args.reps, clock=time.process_time)
            print(f"{name:10s} {label:22s} {_line(t, args.rows)}")
        print(f"{name:10s} logits identical: {equal_out}; parameter gradients identical: {equal_grad}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
