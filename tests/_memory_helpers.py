"""Peak memory of code run in a fresh process: the environment of a measured child and the JSON it prints
(``test_memory``, ``test_request_bank_copies``, ``test_second_derivative_memory``, ``test_forward_check_memory``,
``test_dense_memory``).

A measured script starts with :data:`STATUS` (``status(field)``: a ``/proc/self/status`` field in bytes;
``reset_peak()``: the high-water mark ``VmHWM`` starts again from the current size) and prints its result as JSON
on its last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

STATUS = r"""
def status(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))


def reset_peak():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # the high-water mark starts again from the current size
"""


def opening(imports: str = "") -> str:
    """The first lines of a measured script: ``json``, ``sys``, ``torch``, ``nn`` and ``MCMCUnlearner`` imported (then
    the lines ``imports``), one torch thread, :data:`STATUS`, ``budget`` read from its first argument, seed 0."""
    return (
        r"""
import json, sys
import torch
from torch import nn
from mcmc_unlearner import MCMCUnlearner
"""
        + imports
        + r"""
torch.set_num_threads(1)
"""
        + STATUS
        + r"""
budget = int(sys.argv[1])
torch.manual_seed(0)
"""
    )


#: After :func:`opening`: a 1.1M-parameter MLP (4.5 MB a copy of its parameters), 8 rows for it and its ``nll``.
MLP = r"""
model = nn.Sequential(nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 10))
x, y = torch.randn(8, 64), torch.randint(10, (8,))
nll = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
"""


def measure_env(default_allocator: bool = False) -> dict[str, str]:
    """The environment of a measured child: this source tree, one thread, large buffers returned to the system at
    once (``MALLOC_MMAP_THRESHOLD_``) so the resident set follows what is held, or with ``default_allocator`` glibc's
    defaults (every ``MALLOC_`` variable left out: what a user runs); skips where the peak cannot be reset."""
    import mcmc_unlearner

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set size")
    src = os.path.dirname(os.path.dirname(mcmc_unlearner.__file__))
    if default_allocator:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        return dict(env, PYTHONPATH=src, OMP_NUM_THREADS="1")
    return dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")


def measured(script: str, *args: str, timeout: float, default_allocator: bool = False) -> dict:
    """Run ``script`` (``python -c``) in a fresh process (:func:`measure_env`) and return the JSON of its last line
    of output."""
    env = measure_env(default_allocator)
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
