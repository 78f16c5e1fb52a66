"""Memory budgets: how much a curvature computation may take, and how much one data row costs.

Every path that could grow with parameters × rows × draws is planned before it runs: the unlearner measures
the bytes autograd saves per data row of the model's energy (:func:`bytes_per_row`, one probe on one and on
two rows), and sizes its chunks of draws, rows and Hessian columns so that the estimate stays under a budget
(:func:`resolve_budget`, by default a quarter of the memory available when the unlearner is built, at most 1 GiB).

torch is imported where it is used, so that the command line checks a budget (the library's
:func:`resolve_budget`) without loading it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import numbers
import os
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .options import shown_value

if TYPE_CHECKING:
    import torch

__all__ = [
    "available_memory",
    "bytes_per_row",
    "chunk_for",
    "dense_memory",
    "format_bytes",
    "release_free_heap",
    "resident_bytes",
    "resolve_budget",
    "row_and_call_bytes",
]

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
DEFAULT_FRACTION = 0.25
DEFAULT_CAP = 2**30  # the default's ceiling: a model under 1M parameters then peaks well under 2 GB


def dense_memory(dim: int, itemsize: int = 4) -> int:
    """Bytes of the dense path's matrices: the Hessian, the old Hessian, the cache and a float64 eigendecomposition
    (the per-row working memory of the build is bounded separately by the column chunks)."""
    return dim * dim * (3 * itemsize + 3 * 8)


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable`` on Linux; 8 GiB if unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def resolve_budget(budget: int | float | str | None) -> int:
    """Bytes from ``budget``: ``None`` (a quarter of the available memory, at most 1 GiB), a number of bytes, a
    string such as ``"2GB"``/``"512MiB"``, or a fraction of the available memory such as ``"40%"``.

    The ceiling of the default bounds the working memory, not the speed: on a 954-parameter convolutional
    network the exact path peaked at 4.4 GB with a quarter of 24 GB and at 1.1 GB with 1 GiB, in the same time
    (its Hessian columns are then built in smaller chunks). Pass a larger budget to allow more.

    Raises:
        ValueError: a budget that is not positive or cannot be read.
    """
    if budget is None:
        return int(min(DEFAULT_FRACTION * available_memory(), DEFAULT_CAP))
    if isinstance(budget, str):
        s = budget.strip().lower().replace(" ", "")
        if s.endswith("%"):
            try:
                frac = float(s[:-1]) / 100
            except ValueError:
                frac = float("nan")
            if not 0 < frac <= 1:
                raise ValueError(f"memory_budget {shown_value(budget)}: a percentage must be in (0, 100]")
            return int(frac * available_memory())
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)([a-z]*)", s)
        if m is None or m.group(2) not in _UNITS:
            raise ValueError(f"memory_budget {shown_value(budget)}: write bytes as e.g. 2GB, 512MiB or 25%")
        budget = float(m.group(1)) * _UNITS[m.group(2)]
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(
            f"memory_budget must be bytes, a string such as '2GB' or '25%', or None; got {shown_value(budget)}"
        )
    if not 0 < budget < float("inf"):
        raise ValueError(f"memory_budget must be a positive, finite number of bytes, got {shown_value(budget)}")
    if budget < 1:
        # 0.25 read as bytes is 0: every computation would be refused at request time; a fraction was meant
        raise ValueError(
            f"memory_budget {shown_value(budget)} is under one byte (a number is read as bytes): write a fraction of "
            "the available memory as '25%', or bytes as e.g. 2GB or 512MiB"
        )
    return int(budget)


def format_bytes(n: float, up: bool = False) -> str:
    """``1536 → '1.5 KiB'``; ``up``: rounded up to the digit shown, for an "at least" (a budget of the rounded
    figure was refused again: 121,652 bytes read "118.8 KiB", which is 121,651; stop 49's probe)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            if unit == "B":
                return f"{math.ceil(n) if up else n:.0f} {unit}"
            return f"{math.ceil(n * 10) / 10 if up else n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _saved_bytes(
    f: Callable[..., torch.Tensor], theta: torch.Tensor, batch: Sequence[torch.Tensor], skip_parameters: bool = False
) -> int:
    import torch

    seen: dict[tuple[int, int], int] = {}
    own: list[int] = []  # the storage of the parameters passed in (skip_parameters: not counted)

    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> None:
        try:
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if key[0] in own:
                kept.append(t)
                return None
            seen[key] = max(seen.get(key, 0), t.numel() * t.element_size())
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. functorch wrappers)
            pass
        # held here until the call ends, as autograd would hold it (a freed storage's address reused later would be
        # counted once), not by the graph: an output saved by its own node returned to autograd made a cycle through
        # its C++ graph that Python's collector cannot see (a leak per measurement, stop 44)
        kept.append(t)
        return None

    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
            t = theta.detach().requires_grad_(True)
            if skip_parameters:
                own.append(t.untyped_storage().data_ptr())
            f(t, *batch)
    finally:
        kept.clear()
    return sum(seen.values())


def bytes_per_row(f: Callable[..., torch.Tensor], theta: torch.Tensor, batch: Sequence[torch.Tensor]) -> int:
    """Bytes autograd saves for the backward pass of ``f(θ, *rows)`` per data row (activations).

    Measured on the first one and the first two rows of ``batch`` (the difference is the per-row cost, which
    excludes the parameters themselves); at least the size of one row's inputs.
    """
    return row_and_call_bytes(f, theta, batch)[0]


def row_and_call_bytes(
    f: Callable[..., torch.Tensor], theta: torch.Tensor, batch: Sequence[torch.Tensor], skip_parameters: bool = False
) -> tuple[int, int]:
    """``(per row, per call)``: what one call of ``f(θ, *rows)`` saves for its backward pass is about
    ``rows · per_row + per_call``. The per-call part is what does not grow with the rows: a few buffers on most
    models, but the whole graph's activations for a network that computes every node on every call (a graph
    network whose rows are node indices: 1.2 MB against 56 bytes per row), which sizing by rows alone missed.
    ``skip_parameters``: views of ``θ`` itself (a weight saved for a matrix product's backward) are not counted,
    for a caller that plans the parameters' copies on its own (they take no memory beside ``θ``)."""
    import torch

    floor = sum(t[:1].numel() * t.element_size() for t in batch if isinstance(t, torch.Tensor))
    if batch[0].shape[0] < 2:
        return max(_saved_bytes(f, theta, batch, skip_parameters), floor, 1), 0
    one = _saved_bytes(f, theta, tuple(t[:1] for t in batch), skip_parameters)
    two = _saved_bytes(f, theta, tuple(t[:2] for t in batch), skip_parameters)
    per_row = max(two - one, floor, 1)
    return per_row, max(one - per_row, 0)


def chunk_for(budget: int, per_item: int, total: int, reserve: int = 0) -> int:
    """How many items of ``per_item`` bytes fit in ``budget − reserve`` (at least 1, at most ``total``)."""
    room = max(budget - reserve, 0)
    return int(max(1, min(total, room // max(per_item, 1))))


def resident_bytes() -> int | None:
    """This process's resident set size in bytes (``/proc/self/statm``; ``None`` where it cannot be read)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without it): nothing to hand back
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim(0)``); ``False`` where there is none.

    glibc keeps memory freed inside its heap resident (the heap grows across a loop's allocations beyond what any
    one pass holds at once): a chunked computation calls this where the resident set would otherwise pass its
    budget. The numbers computed are not affected."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
