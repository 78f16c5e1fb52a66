"""Two (or more) gloo processes on this machine for the data-parallel tests: one place for the process group's
start, its teardown and the exit that skips interpreter finalisation."""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Callable[..., Any], *args: Any, world: int = 2, timeout_s: float = 60.0) -> None:
    """Run ``worker(rank, world, *args)`` in ``world`` processes joined in a gloo process group (one thread each);
    returns when all have finished, raising if one failed. ``worker`` must be importable (a module's top-level
    function) and write its results to disk: the processes end with ``os._exit``."""
    mp.spawn(_rank, args=(worker, world, free_port(), timeout_s, args), nprocs=world, join=True)


def _rank(rank: int, worker: Callable[..., Any], world: int, port: int, timeout_s: float, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
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
