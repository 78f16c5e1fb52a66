"""Cost of reading a list of minibatch tuples ``[(x1, y1), ...]`` as the remaining rows, per request (stop 62).

Until stop 62 every request joined the list into its rows and looked for repeated rows with ``torch.unique`` over
them (60,000 x 784 floats: 0.7-0.85 CPU s and ~370 MiB beside the copy, outside ``memory_budget``). Now the search
hashes the rows in chunks (``_repeated_rows_hashed``), the join is planned against the budget, and the joined rows
are kept for the next request while the list is unchanged (``_JoinedList``). This script times, in one process and
one thread, per repetition: the former search (``_repeated_rows`` over the joined rows), the new one, and the
remaining data's reading on a first request (join and search) and on a later one (the list unchanged), and prints
their ratios; then each search's peak resident memory above the joined rows, in a fresh child process each.

    OMP_NUM_THREADS=1 python benchmarks/list_rows.py --rows 60000 --width 784 --reps 3
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from mcmc_unlearner.stream import _concat, _JoinedList, _repeated_rows, _repeated_rows_hashed, _Stream


def _data(rows: int, width: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(rows, width, generator=g), torch.randint(0, 10, (rows,), generator=g)
    return [(x[i : i + batch].clone(), y[i : i + batch].clone()) for i in range(0, rows, batch)]


def _cpu(fn) -> tuple[float, object]:
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def _peak(args: argparse.Namespace, search: str) -> float:
    """MiB of peak resident memory (``VmHWM``, Linux) the ``search`` adds above the rows (a fresh child process, the
    rows drawn whole; ``ru_maxrss`` would carry the parent's peak over ``exec``)."""
    code = (
        "import torch; torch.set_num_threads(1);"
        "from mcmc_unlearner.stream import _repeated_rows, _repeated_rows_hashed;"
        f"g = torch.Generator().manual_seed(0); rows = (torch.rand({args.rows}, {args.width}, generator=g), "
        f"torch.randint(0, 10, ({args.rows},), generator=g));"
        "hwm = lambda: int(next(x for x in open('/proc/self/status') if x.startswith('VmHWM')).split()[1]);"
        f"base = hwm(); {search}(rows); print((hwm() - base) / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=60000)
    p.add_argument("--width", type=int, default=784)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = _data(args.rows, args.width, args.batch)
    rows = _concat(data)
    print(f"{args.rows:,} rows of {args.width} floats in {len(data)} minibatches; CPU s, {args.threads} thread(s)")
    print("rep  old search  new search  ratio | first request  later request  ratio")
    for rep in range(args.reps):
        old, a = _cpu(lambda: _repeated_rows(rows))
        new, b = _cpu(lambda: _repeated_rows_hashed(rows))
        assert a == b, (a, b)
        kept = _JoinedList()
        first, _ = _cpu(lambda kept=kept: _Stream(data, None, budget=2**30, joined=kept))
        later, _ = _cpu(lambda kept=kept: _Stream(data, None, budget=2**30, joined=kept))
        print(
            f"{rep:3d}  {old:10.3f}  {new:10.3f}  {old / new:5.1f} | {first:13.3f}  {later:13.4f}  {first / later:5.0f}"
        )
    twice = _concat(data[: len(data) // 2] * 2)  # every row repeated: the search's worst case
    old, a = _cpu(lambda: _repeated_rows(twice))
    new, b = _cpu(lambda: _repeated_rows_hashed(twice))
    assert a == b, (a, b)
    print(f"every row listed twice: old {old:.3f}, new {new:.3f} CPU s ({a:,} repeated)")
    print(
        f"peak resident memory above the rows: old search {_peak(args, '_repeated_rows'):.0f} MiB, "
        f"new {_peak(args, '_repeated_rows_hashed'):.0f} MiB"
    )


if __name__ == "__main__":
    main()
