"""Two (or more) gloo processes on this machine for the data-parallel tests: one place for the process group's
start, its teardown and the exit that skips interpreter finalisation.

The ranks meet through a file in a fresh temporary folder (``init_method="file://..."``), not a TCP port: a port
picked free and bound later by rank 0 can be taken in between by another test's process (``pytest -n 2`` runs two
test processes at once), which fails the start with "address already in use"."""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn(worker: Callable[..., Any], *args: Any, world: int = 2, timeout_s: float = 60.0) -> None:
    """Run ``worker(rank, world, *args)`` in ``world`` processes joined in a gloo process group (one thread each);
    returns when all have finished, raising if one failed. ``worker`` must be importable (a module's top-level
    function) and write its results to disk: the processes end with ``os._exit``."""
    with tempfile.TemporaryDirectory(prefix="gloo-rendezvous-") as folder:
        init_method = file_init_method(folder)
        mp.spawn(_rank, args=(worker, world, init_method, timeout_s, args), nprocs=world, join=True)


def file_init_method(folder: str | os.PathLike[str]) -> str:
    """A ``file://`` rendezvous for ``torch.distributed.init_process_group`` in ``folder`` (a fresh folder: the
    store's file must not exist yet); no TCP port is chosen, so concurrent test processes cannot collide."""
    return "file://" + os.path.join(os.path.abspath(folder), "rendezvous")


def _rank(rank: int, worker: Callable[..., Any], world: int, init_method: str, timeout_s: float, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        worker(rank, world, *args)
        dist.barrier()  # tear down together: gloo aborts a process whose peer exits mid-teardown
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalisation: gloo's worker threads can abort the process (SIGABRT, "terminate called
    # without an active exception") while Python tears down; every result is already on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def ce_nll(m: torch.nn.Module, b: tuple) -> torch.Tensor:
    """Per-row cross-entropy of ``m(x)`` against ``y``."""
    return torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")


def gaussian_log_prior(m: torch.nn.Module) -> torch.Tensor:
    """A standard normal prior on every parameter."""
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def small_classifier(rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module, torch.Tensor]:
    """``rows`` 5-feature rows labelled by their first feature's sign, a 5-4-2 tanh network and a bank of 8 samples
    around its initial weights (every rank builds the same)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 5, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    bank = theta + 0.05 * torch.randn(8, theta.numel(), generator=g)
    return x, y, model, bank
