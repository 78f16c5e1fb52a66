"""A long sequence of small deletion requests on a user's own small network, against one retrain chain, timed in one
process (stop 63's usage flows, docs/model-matrix.md 'Stop 63: usage flows'; stop 64's cost work).

The user's setup as stop 63's probe had it: a 64-32-10 MLP (2,410 parameters) or a two-conv CNN (Conv 1→6, Conv 6→8,
max-pools, Linear 32→10; 830 parameters, the dense ``ggn`` by default) on 1,000 training rows of scikit-learn's
digits split by ``--seed``, sampled by a hand-written SGLD loop outside the library (ε = 10⁻⁴, minibatches of 64,
``--steps`` steps, ``--draws`` ``state_dict`` copies from the second half), the library's defaults, ``--requests``
requests of ``--rows`` random rows on one unlearner, the remaining rows given as the tuple ``(x[keep], y[keep])``.
The retrain chain is the same loop on the rows left once every request has removed its rows (not on the rows
removed), from the same initialisation and seed (its cost does not depend on which rows: a refused request's rows
stay in the unlearner's data, not in the chain's).

Printed: each request's CPU seconds (``time.process_time``, one torch thread), the modules the requests import
(torch's lazy ``torch._dynamo`` at the first ``torch.func`` gradient: a one-off per process, counted apart), the
sequence's total against the retrain chain's CPU, and ``decisions``: a digest of every request's damping and shift
norm and of the final bank, equal between two versions of the library exactly when they took the same decisions
and moved the samples to the same bits.

With ``--base SRC`` (another version's ``src`` folder, e.g. ``git archive <commit> src | tar -x -C /tmp/base``,
loaded beside this tree's as ``request_ab.py`` loads it) a second unlearner of that version takes the same requests
on a copy of the same model and bank, the two alternating which goes first; every request's damping and shift norm
must be equal to the bit, and the banks at the end (checked), and both sequences are printed against the retrain
chain, timed before and after the requests (their mean is the unit).

    OMP_NUM_THREADS=1 python benchmarks/flow_sequence.py --model cnn --requests 40
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchargs as A
from mcmc_unlearner import MCMCUnlearner
from request_ab import _folder_with_package, _load_base
from request_sequence import ImportTimer


class SmallCNN(nn.Module):
    """Two 3x3 convolutions with max-pools and a linear head on 8x8 digits (830 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.c1(x.view(-1, 1, 8, 8))), 2)
        x = torch.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


def build(kind: str) -> nn.Module:
    """The user's network: ``mlp`` (64-32-10) or ``cnn`` (:class:`SmallCNN`)."""
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return SmallCNN()


def digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows of scikit-learn's digits (pixels over 16) in an order drawn from ``seed``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order][:n], y[order][:n]


def nll(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-row cross-entropy."""
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def log_prior(model: nn.Module) -> torch.Tensor:
    """A standard normal prior on every parameter."""
    return -0.5 * sum((p**2).sum() for p in model.parameters())


def sgld(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, draws: int, seed: int) -> list[dict]:
    """The user's own SGLD loop (step 10⁻⁴, minibatches of 64): ``draws`` ``state_dict`` copies from the second
    half of ``steps``."""
    lr, g, n = 1e-4, torch.Generator().manual_seed(seed), len(x)
    bank, every = [], max(1, (steps // 2) // draws)
    for t in range(steps):
        i = torch.randint(n, (64,), generator=g)
        energy = n * nll(model, (x[i], y[i])).mean() - log_prior(model)
        model.zero_grad()
        energy.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(-0.5 * lr * p.grad + torch.randn(p.shape, generator=g, dtype=p.dtype) * lr**0.5)
        if t >= steps // 2 and (t - steps // 2) % every == 0 and len(bank) < draws:
            bank.append({k: v.clone() for k, v in model.state_dict().items()})
    return bank


def run_sequence(
    unlearners: dict[str, MCMCUnlearner], x: torch.Tensor, y: torch.Tensor, requests: list[torch.Tensor]
) -> tuple[dict[str, list[float]], dict[str, list], float]:
    """``requests`` on each unlearner in turn (alternating which goes first), the remaining rows as a tuple.

    A refused request (any exception) is recorded as ``["refused", its class name]`` and its rows stay; where one
    version refuses a request the other applies, the sequence stops there (their states differ from then on).

    Returns:
        Per unlearner the requests' CPU seconds (the modules they import taken out) and ``[damping, shift norm]``
        per request; the CPU seconds of those imports (a one-off per process, whichever unlearner met them).
    """
    keep = torch.ones(len(x), dtype=torch.bool)
    names = list(unlearners)
    cpu: dict[str, list[float]] = {k: [] for k in names}
    decisions: dict[str, list] = {k: [] for k in names}
    with ImportTimer() as imports:
        for i, r in enumerate(requests):
            keep[r] = False
            for k in names if i % 2 == 0 else names[::-1]:
                before = imports.cpu
                t0 = time.process_time()
                try:
                    report = unlearners[k].remove((x[r], y[r]), (x[keep], y[keep]))
                    decisions[k].append([report.damping, report.shift_norm])
                except Exception as e:  # recorded, the sequence goes on (the rows stay, as the user's would)
                    decisions[k].append(["refused", type(e).__name__])
                cpu[k].append(time.process_time() - t0 - (imports.cpu - before))
            refused = {decisions[k][-1][0] == "refused" for k in names}
            if len(refused) > 1:  # one version refused, the other applied: their states differ from here on
                break
            if refused == {True}:
                keep[r] = True
    return cpu, decisions, imports.cpu


def digest(decisions: list, samples: list[dict[str, torch.Tensor]]) -> str:
    """A digest of the requests' decisions and the final bank's bytes."""
    h = hashlib.sha256(json.dumps(decisions).encode())
    for s in samples:
        for k in sorted(s):
            h.update(s[k].detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=A.one_of(["mlp", "cnn"]), default="cnn")
    ap.add_argument("--requests", type=A.positive_int, default=40)
    ap.add_argument("--rows", type=A.positive_int, default=5, help="rows per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=A.positive_int, default=1500, help="SGLD steps of each chain")
    ap.add_argument("--draws", type=A.positive_int, default=30, help="samples kept of each chain")
    ap.add_argument("--json", type=A.output_file, default=None)
    ap.add_argument(
        "--base", type=_folder_with_package, default=None, help="a src folder of another version, run beside this one"
    )
    args = ap.parse_args(argv)
    if args.requests * args.rows >= 1000:
        ap.error(f"--requests x --rows = {args.requests * args.rows} would remove every one of the 1,000 rows")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the library's advice (one step moving part of the way) is not timed here
    x, y = digits(1000, args.seed)
    torch.manual_seed(args.seed)
    init = build(args.model)
    model = copy.deepcopy(init)
    bank = sgld(model, x, y, args.steps, args.draws, args.seed)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(100 + args.seed))
    requests = [order[args.rows * i : args.rows * (i + 1)] for i in range(args.requests)]

    tmp = Path(tempfile.mkdtemp())
    try:
        classes = {"this": MCMCUnlearner}
        if args.base is not None:
            classes = {"base": _load_base(args.base, tmp).MCMCUnlearner, **classes}
        return _run(args, classes, model, bank, init, x, y, requests)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(
    args: argparse.Namespace,
    classes: dict[str, type],
    model: nn.Module,
    bank: list[dict],
    init: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    requests: list[torch.Tensor],
) -> int:
    def retrain(keep: torch.Tensor) -> float:
        t0 = time.process_time()
        sgld(copy.deepcopy(init), x[keep], y[keep], args.steps, args.draws, args.seed)
        return time.process_time() - t0

    kept = torch.ones(len(x), dtype=torch.bool)
    for r in requests:
        kept[r] = False
    retrain_cpu = [retrain(kept)]
    unlearners = {
        k: c(copy.deepcopy(model), nll=nll, log_prior=log_prior, bank=copy.deepcopy(bank)) for k, c in classes.items()
    }
    cpu, decisions, imports = run_sequence(unlearners, x, y, requests)
    retrain_cpu.append(retrain(kept))
    unit = statistics.mean(retrain_cpu)
    out: dict = {"model": args.model, "seed": args.seed, "requests": args.requests, "rows": args.rows}
    out.update(retrain_cpu=retrain_cpu, imports_cpu=imports, versions={})
    print(
        f"{args.model} seed {args.seed}: {args.requests} requests of {args.rows} rows; one retrain chain "
        f"{retrain_cpu[0]:.2f} / {retrain_cpu[1]:.2f} s CPU (before / after the requests); the modules the requests "
        f"imported {imports:.2f} s (once per process, apart)"
    )
    for k in unlearners:
        c, total = cpu[k], sum(cpu[k])
        v = {
            "request_cpu": [round(t, 4) for t in c],
            "sequence_cpu": total,
            "ratio": total / unit,
            "ratio_with_imports": (total + imports) / unit,
            "decisions": digest(decisions[k], unlearners[k].samples()),
            "refused": sum(d[0] == "refused" for d in decisions[k]),
        }
        out["versions"][k] = v
        later = (
            f", later median {statistics.median(c[1:]):.3f} ({min(c[1:]):.3f}-{max(c[1:]):.3f}) s" if len(c) > 1 else ""
        )
        print(
            f"  {k}: {total:.2f} s CPU (first {c[0]:.2f} s{later}); sequence / retrain {v['ratio']:.2f}x "
            f"({v['ratio_with_imports']:.2f}x with the imports); {v['refused']} refused; decisions {v['decisions']}"
        )
    if "base" in unlearners:
        same = decisions["base"] == decisions["this"] and all(
            torch.equal(a[n], b[n])
            for a, b in zip(unlearners["base"].samples(), unlearners["this"].samples(), strict=True)
            for n in a
        )
        per = [a / b for a, b in zip(cpu["this"], cpu["base"], strict=True)]
        out["same_to_the_bit"] = same
        print(
            f"  this / base: total {sum(cpu['this']) / sum(cpu['base']):.3f}x, per request median "
            f"{statistics.median(per):.3f}x ({min(per):.3f}-{max(per):.3f}); every damping, shift norm and the final "
            f"bank equal to the bit: {same}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0 if out.get("same_to_the_bit", True) else 1


if __name__ == "__main__":
    sys.exit(main())
