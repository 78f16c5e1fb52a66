"""Timing bookkeeping shared by the benchmark scripts that compare two ways in one process.

The project's standard for a speed claim: each way's first call (where the process's one-off costs land) reported
apart, then at least three repetitions interleaved with the order alternating, their median and range, the total
(first call included) beside them, and the ratio measured per repetition (its median and range) and of the totals.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of ``values`` (at least one)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def interleaved(
    fns: dict[str, Callable[[], object]], reps: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, dict]:
    """Time each function once (its one-off costs), then ``reps`` rounds of all of them, the order alternating.

    Args:
        fns: The ways to time, by name (called with no arguments).
        reps: Rounds after the first calls.
        clock: The clock read around each call (``time.perf_counter`` for wall time, ``time.process_time`` for CPU).

    Returns:
        Per name: ``first`` (the first call), ``times`` (the repetitions), their ``median``/``min``/``max`` and
        ``total`` (first + repetitions); under ``"ratio"``, when there are exactly two functions, the first's time
        over the second's per repetition, with its ``median``/``min``/``max`` and the ratio of the totals.
    """
    names = list(fns)
    first: dict[str, float] = {}
    for k in names:
        t = clock()
        fns[k]()
        first[k] = clock() - t
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        for k in names if r % 2 == 0 else names[::-1]:
            t = clock()
            fns[k]()
            times[k].append(clock() - t)
    out: dict[str, dict] = {
        k: {"first": first[k], "times": times[k], **spread(times[k]), "total": first[k] + sum(times[k])} for k in names
    }
    if len(names) == 2:
        out["ratio"] = paired_ratio(*(out[k] for k in names))
    return out


def paired_ratio(a: dict, b: dict) -> dict:
    """``a``'s time over ``b``'s per repetition (``times``, matched by position), their median and range, and the
    ratio of the totals (``total``)."""
    ratios = [x / y for x, y in zip(a["times"], b["times"], strict=True)]
    return {"times": ratios, **spread(ratios), "total": a["total"] / b["total"]}


def sequence_summary(times: dict[str, list[float]], start: int) -> dict[str, dict]:
    """Two ways timed on the same sequence of requests (``times[name][k]``: request ``k``), summarised.

    Request ``start`` on are the steady state: their ``median``/``min``/``max`` per request; ``first`` is request 0
    (the one-off costs), ``total`` every request's time, the first ones included. Under ``"ratio"``: the first
    way's time over the second's per steady-state request (median and range) and the ratio of the totals.
    """
    names = list(times)
    if len(names) != 2 or len({len(v) for v in times.values()}) != 1:
        raise ValueError(f"expected two ways timed on the same requests, got {[(k, len(v)) for k, v in times.items()]}")
    n = len(times[names[0]])
    if not 0 <= start < n:
        raise ValueError(f"start {start} leaves no request of {n} to summarise")
    out: dict[str, dict] = {}
    for k in names:
        steady = times[k][start:]
        out[k] = {"first": times[k][0], "times": steady, **spread(steady), "total": sum(times[k])}
    out["ratio"] = paired_ratio(out[names[0]], out[names[1]])
    return out


def describe(sp: dict, unit: str = "ms", scale: float = 1e3, digits: int = 1) -> str:
    """``median (min-max) unit, first F unit; total T s`` of one way's :func:`interleaved`/:func:`sequence_summary`
    entry: the times (clock seconds) multiplied by ``scale`` for ``unit``, the total in seconds."""

    def f(x: float) -> str:
        return f"{x * scale:.{digits}f}"

    median = f"{f(sp['median'])} ({f(sp['min'])}-{f(sp['max'])}) {unit}"
    return f"{median}, first {f(sp['first'])} {unit}; total {sp['total']:.3f} s"


def describe_ratio(r: dict) -> str:
    """``median (min-max)x per repetition, totals Tx`` of a :func:`paired_ratio`."""
    return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}) per repetition, totals {r['total']:.2f}x"


def sequence_lines(times: dict[str, list[float]], start: int, first_runner: str) -> list[str]:
    """The printed summary of :func:`sequence_summary`: per way the median (range) of requests ``start`` on, the
    first request and the total of all requests; then the ratio (first way over second) per request and of the
    totals. ``first_runner`` is the way that ran first on request 0 (it pays the process's one-off costs)."""
    s = sequence_summary(times, start)
    n = len(next(iter(times.values())))
    a, b = list(times)
    lines = [f"CPU s per request: median (min-max) of requests {start}-{n - 1}; first: request 0; total: all {n}"]
    lines += [f"  {k:10s} {describe(s[k], 's', 1.0, 3)}" for k in (a, b)]
    lines.append(
        f"{a} / {b}: {s['ratio']['median']:.3f}x ({s['ratio']['min']:.3f}-{s['ratio']['max']:.3f}) per request "
        f"{start}-{n - 1}, totals {s['ratio']['total']:.3f}x ({first_runner} ran first on request 0, paying the "
        "process's one-off costs)"
    )
    return lines


class Baseline:
    """A unit of cost (the SGLD epoch) timed again between the measured calls, not once before them: each call's
    ratio to it is taken against the measurements on either side of it, in the same stretch of the run (a machine
    that slows down halfway moved every ratio measured against one early epoch), and the unit's own first
    measurement, median, range and total are printed beside the calls'.

    Args:
        measure: Times the unit once; returns ``(wall, cpu)`` seconds (e.g. ``model_matrix.time_sgld_epoch``).
    """

    def __init__(self, measure: Callable[[], tuple[float, float]]) -> None:
        self._measure = measure
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def measure(self) -> None:
        """Time the unit once more (before the first call, then after each one)."""
        w, c = self._measure()
        self.wall.append(w)
        self.cpu.append(c)

    def around(self, k: int) -> float:
        """CPU seconds of the unit around call ``k`` (0-based): the mean of measurements ``k`` and ``k + 1``, the
        ones just before and after it (``k`` alone where no later one was taken)."""
        near = self.cpu[k : k + 2]
        if not near:
            raise ValueError(f"call {k} has no measurement of the unit before it ({len(self.cpu)} taken)")
        return sum(near) / len(near)

    def summary(self, wall: bool = False) -> dict:
        """``first`` (the first measurement), ``times`` (the later ones, or the first where it is the only one),
        their ``median``/``min``/``max``, and ``total`` (every measurement), of CPU (or ``wall``) seconds."""
        xs = self.wall if wall else self.cpu
        if not xs:
            raise ValueError("the unit was never measured")
        later = xs[1:] or xs[:1]
        return {"first": xs[0], "times": later, **spread(later), "total": sum(xs)}

    def median(self, wall: bool = False) -> float:
        """The median of the measurements after the first (the first alone where it is the only one)."""
        return self.summary(wall)["median"]


def per_call_ratios(seconds: Sequence[float], base: Baseline, start: int = 0) -> dict:
    """Each call's CPU ``seconds`` over the unit measured around it (:meth:`Baseline.around`): ``first`` (call 0),
    ``times`` (calls ``start`` on), their ``median``/``min``/``max``, and ``total`` (all calls' seconds over the
    units' mean around them)."""
    ratios = [s / base.around(k) for k, s in enumerate(seconds)]
    later = ratios[start:] or ratios[:1]
    units = sum(base.around(k) for k in range(len(seconds))) / max(len(seconds), 1)
    return {"first": ratios[0], "times": later, **spread(later), "total": sum(seconds) / units}


def baseline_line(base: Baseline, name: str = "SGLD epoch over 10k rows") -> str:
    """``NAME: median (min-max) s CPU of the N after the first, first F s; total T s``."""
    s = base.summary()
    n = len(base.cpu)
    return (
        f"{name}, timed {n}x between the requests: {s['median']:.2f} s CPU ({s['min']:.2f}-{s['max']:.2f}) of the "
        f"{max(n - 1, 1)} after the first, first {s['first']:.2f} s; total {s['total']:.1f} s"
    )
