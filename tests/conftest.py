"""Shared fixtures: a conjugate Bayesian linear regression run as many independent chains at once."""

from __future__ import annotations

import os
import platform

# One set of CPU kernels on every x86 machine (before torch is imported; subprocesses inherit it): the model
# matrix's one-seed targets sit on knife edges that rounding moves. The BatchNorm CNN's kept-data error is 0.99 points
# from retraining's with AVX2 kernels and 2.10 points (over the 1.5 target) with AVX-512's (AMD EPYC, stop 36): the
# same code and seeds, different roundings of the same chains. An explicit $ATEN_CPU_CAPABILITY wins.
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from mcmc_unlearner import SGHMC, SGLD, MCMCUnlearner, RemovableDataset
from mcmc_unlearner.datasets import make_gmm_2d
from mcmc_unlearner.models.gmm import GaussianMixture
from mcmc_unlearner.models.linreg import MultiChainLinearRegression, exact_posterior
from mcmc_unlearner.samplers import run_chain
from mcmc_unlearner.store import gmm_data_spec, gmm_model_spec, save_model


@pytest.fixture(autouse=True)
def _no_ambient_integrity_key(monkeypatch):
    """Tests choose their integrity keys explicitly: an operator's $MCMC_UNLEARNER_KEY must not leak in."""
    monkeypatch.delenv("MCMC_UNLEARNER_KEY", raising=False)


# The test models are tiny: one thread avoids OpenMP start-up and contention costs that dominate at this size.
torch.set_num_threads(1)


MultiChainBLR = MultiChainLinearRegression


@dataclass
class BLRProblem:
    x: torch.Tensor
    y: torch.Tensor
    removed: torch.Tensor
    keep: torch.Tensor
    mean_all: torch.Tensor
    cov_all: torch.Tensor
    mean_kept: torch.Tensor
    cov_kept: torch.Tensor

    @property
    def exact_shift(self) -> torch.Tensor:
        return self.mean_kept - self.mean_all


def make_blr(n: int = 400, dim: int = 3, removed: int = 40, seed: int = 0) -> BLRProblem:
    """Data whose last ``removed`` rows are corrupted (y + 3), so forgetting them moves the posterior."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, generator=g)
    y = x @ w + torch.randn(n, generator=g)
    ids = torch.arange(n - removed, n)
    y[ids] += 3.0 * torch.sign(x[ids, 0])
    keep = torch.ones(n, dtype=torch.bool)
    keep[ids] = False
    m0, c0 = exact_posterior(x, y)
    m1, c1 = exact_posterior(x[keep], y[keep])
    return BLRProblem(x, y, ids, keep, m0, c0, m1, c1)


@pytest.fixture(scope="session")
def blr() -> BLRProblem:
    return make_blr()


def start_at_posterior(model: MultiChainLinearRegression, prob: BLRProblem, seed: int = 1) -> None:
    """Put every chain at an exact draw of the full-data posterior (no burn-in needed)."""
    model.start_at(prob.mean_all, prob.cov_all, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ tiny saved GMM models
GMM_N = 200


def tiny_gmm(
    seed: int = 0,
    *,
    bank: int = 20,
    burn: int = 150,
    sampler: str = "sghmc",
    lr: float = 1e-3,
    solver: str = "exact",
    refresh_every: int = 1,
):
    """A short chain on 200 GMM points (data seed 1) with a small bank: the model the store tests save."""
    x, y = make_gmm_2d(n=GMM_N, seed=1)
    model = GaussianMixture(k=4, dim=2, generator=torch.Generator().manual_seed(seed), n=GMM_N)
    data = RemovableDataset(torch.from_numpy(x), torch.from_numpy(y), batch_size=32, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    if sampler == "sghmc":
        opt = SGHMC(model.parameters(), lr=lr, alpha=0.5, generator=gen)
    else:
        opt = SGLD(model.parameters(), lr=lr, generator=gen)
    un = MCMCUnlearner(model, opt, solver=solver, curvature_draws=4, refresh_every=refresh_every)
    run_chain(model, opt, data, un.energy, burn, GMM_N)
    for _ in range(bank):
        run_chain(model, opt, data, un.energy, 3, GMM_N)
        un.collect()
    return model, opt, data, un


def save_gmm(path, objs, data_spec=None, **kwargs):
    """Save ``tiny_gmm``'s objects as a model folder; returns ``path``."""
    model, sampler, data, un = objs
    spec = data_spec or gmm_data_spec(GMM_N, 1)
    save_model(
        path, model=model, sampler=sampler, data=data, unlearner=un, model_spec=gmm_model_spec(model), data_spec=spec,
        **kwargs,
    )  # fmt: skip
    return path


def control_option_round_trips(path, name: str, values) -> None:
    """``un.control.<name>`` set on :func:`tiny_gmm`'s built unlearner to each of ``values`` is what its saved folder
    (under ``path``) loads with, and the loaded unlearner's ``config()`` is the built one's."""
    from mcmc_unlearner.store import load_model

    objs = tiny_gmm(bank=3, burn=5)
    for value in values:
        setattr(objs[3].control, name, value)
        loaded = load_model(save_gmm(path / f"m{value}", objs))
        assert getattr(loaded.unlearner.control, name) == value
        assert loaded.unlearner.config() == objs[3].config()


# ------------------------------------------------------------------------------ refusal-contract helpers
def folder_state(folder) -> tuple:
    """Everything observable about a folder: its mtime and, per entry, type, size, mtime, links and content hash.

    Equal before and after an operation means the folder was not changed (no file written, created, deleted or
    renamed; the folder's own mtime changes with any entry created or removed).
    """
    import hashlib
    import os
    import stat
    from pathlib import Path

    folder = Path(folder)
    entries = {}
    for name in sorted(os.listdir(folder)):
        p = folder / name
        st = os.lstat(p)
        if stat.S_ISREG(st.st_mode):
            content = hashlib.sha256(p.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(p)
        else:
            content = None
        entries[name] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_nlink, content)
    return os.lstat(folder).st_mtime_ns, entries


class FileAudit:
    """Records file-system events of this process (``sys.addaudithook``) while active.

    ``events`` holds ``(event, path, flags)`` for opens, removals, renames, truncations, listings and folder
    creation. Audit hooks cannot be removed, so one hook is installed once and switched on and off.
    """

    _installed = False
    _active: ClassVar[list] = []
    EVENTS = ("open", "os.remove", "os.rename", "os.truncate", "os.listdir", "os.scandir", "os.mkdir", "os.chmod")

    def __init__(self) -> None:
        self.events: list[tuple[str, str, int]] = []

    @classmethod
    def _hook(cls, event: str, args: tuple) -> None:
        if not cls._active or event not in cls.EVENTS:
            return
        import os

        path = args[0] if args else None
        if isinstance(path, (str, bytes, os.PathLike)):
            flags = args[2] if event == "open" and len(args) > 2 and isinstance(args[2], int) else 0
            for audit in cls._active:
                audit.events.append((event, os.fsdecode(path), flags))
            if event == "os.rename" and len(args) > 1 and isinstance(args[1], (str, bytes, os.PathLike)):
                for audit in cls._active:
                    audit.events.append((event, os.fsdecode(args[1]), 0))

    def __enter__(self) -> FileAudit:
        import sys

        if not FileAudit._installed:
            sys.addaudithook(FileAudit._hook)
            FileAudit._installed = True
        FileAudit._active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        FileAudit._active.remove(self)

    def touching(self, outside) -> list[tuple[str, str, int]]:
        """Events whose path lies in ``outside`` (a folder), resolved without following the final link."""
        import os

        out_real = os.path.realpath(outside)
        hits = []
        for ev in self.events:
            p = ev[1]
            parent = os.path.realpath(os.path.dirname(os.path.abspath(p)))
            if parent == out_real or parent.startswith(out_real + os.sep):
                hits.append(ev)
        return hits

    def followed_links(self) -> list[tuple[str, str, int]]:
        """Opens of a path that is a symbolic link without ``O_NOFOLLOW`` (reads through a link)."""
        import os

        return [
            ev
            for ev in self.events
            if ev[0] == "open" and os.path.islink(ev[1]) and not (ev[2] & getattr(os, "O_NOFOLLOW", 0))
        ]


class TinyRecurrent(nn.Module):
    """``kind`` (``"LSTM"``/``"GRU"``) over ``[B, T, inputs]`` sequences, a linear head on the last step."""

    def __init__(self, kind: str, inputs: int, hidden: int, classes: int = 2) -> None:
        super().__init__()
        self.rnn, self.out = getattr(nn, kind)(inputs, hidden, batch_first=True), nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0][:, -1])
