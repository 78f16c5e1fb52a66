"""torch's forward mode imports its jvp decompositions on a process's first ``jvp``, scripting 18 functions with
``torch.jit.script``, each a ``DeprecationWarning`` from inside torch: a user's first request showed 18. The
library's :func:`mcmc_unlearner.curvature.jvp` imports that module first with only that warning silenced."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mcmc_unlearner.curvature as curvature
import mcmc_unlearner.step as step

SRC = str(Path(curvature.__file__).resolve().parents[1])

CODE = """
import warnings
import torch
from torch.func import vmap
warnings.simplefilter("always")
from mcmc_unlearner.curvature import jvp
f = lambda t: torch.nn.functional.cross_entropy(t.reshape(2, 3), torch.tensor([0, 2]), reduction="none")
t, x = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    ours = vmap(lambda a, b: jvp(f, (a,), (b,))[1])(t, x)
print("jit warnings", sum("jit.script" in str(m.message) for m in w))
theirs = vmap(lambda a, b: torch.func.jvp(f, (a,), (b,))[1])(t, x)
print("equal", torch.equal(ours, theirs))
"""


def test_a_first_jvp_emits_no_jit_script_deprecation_and_gives_torchs_numbers() -> None:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "jit warnings 0" in out.stdout and "equal True" in out.stdout, out.stdout
    assert step.jvp is curvature.jvp  # the safety check's forward mode goes through it


GGN_CODE = """
import warnings
import torch
from torch import nn
from mcmc_unlearner import MCMCUnlearner
torch.manual_seed(0)
model = nn.Sequential(nn.Conv1d(1, 2, 3, dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 2))
theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
bank = theta + 0.02 * torch.randn(6, theta.numel())
x, y = torch.randn(80, 1, 12), torch.randint(2, (80,))
nll = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
prior = lambda m: -0.5 * sum((p**2).sum() for p in m.parameters())
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    un = MCMCUnlearner(model, None, nll=nll, log_prior=prior, bank=bank)
    report = un.propose((x[:4], y[:4]), (x[4:], y[4:])).report
print("solver", report.solver)
print("jit warnings", sum("jit.script" in str(m.message) for m in w))
"""


def test_a_first_gauss_newton_request_emits_no_jit_script_deprecation() -> None:
    """The Gauss-Newton backend's prior Hessian (``torch.func.hessian``, forward over reverse) was a process's first
    forward-mode product on a small convolutional network, and its 18 warnings reached the caller (stop 59's
    probe: a dilated Conv1d classifier's first request)."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", GGN_CODE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "solver ggn" in out.stdout and "jit warnings 0" in out.stdout, out.stdout
