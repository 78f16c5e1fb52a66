"""Peak memory of code run in a fresh process: the environment of a measured child and the JSON it prints
(``test_memory``, ``test_request_bank_copies``, ``test_second_derivative_memory``, ``test_forward_check_memory``).

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


def measure_env() -> dict[str, str]:
    """The environment of a measured child: this source tree, one thread, large buffers returned to the system at
    once (``MALLOC_MMAP_THRESHOLD_``) so the resident set follows what is held; skips where the peak cannot be reset."""
    import mcmc_unlearner

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set size")
    src = os.path.dirname(os.path.dirname(mcmc_unlearner.__file__))
    return dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")


def measured(script: str, *args: str, timeout: float) -> dict:
    """Run ``script`` (``python -c``) in a fresh process and return the JSON of its last line of output."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=measure_env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
