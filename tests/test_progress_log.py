"""Progress of long requests on the ``mcmc_unlearner`` logger: each phase at INFO, each damping trial at DEBUG.

The lines must say what the request did (the same numbers as its :class:`RemovalReport`) and must not change it: a
sequence run with DEBUG logging gives the same samples, bit for bit, as one run without.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mcmc_unlearner
from mcmc_unlearner import MCMCUnlearner


def _sequence(requests: int = 4) -> tuple[list, list[torch.Tensor]]:
    """A user's MLP classifier (2,003 parameters: K-FAC with corrections every 2 requests) on three Gaussian
    blobs, sampled by a plain SGLD loop; class 0 removed in ``requests`` requests of 10 rows; the corrections
    measure one stored sample (``recenter_draws=1``), so both are applied."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 2, generator=g) + 2.5 * torch.stack([torch.cos(2.1 * y), torch.sin(2.1 * y)], 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 3))

    def nll(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    def log_prior(m):
        return -0.5 * sum((p**2).sum() for p in m.parameters())

    lr, bank = 1e-3, []
    for t in range(1200):
        i = torch.randint(300, (50,), generator=g)
        energy = 300 * nll(model, (x[i], y[i])).mean() - log_prior(model)
        model.zero_grad()
        energy.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(-0.5 * lr * p.grad + lr**0.5 * torch.randn(p.shape, generator=g))
        if t >= 600 and t % 20 == 0:
            bank.append({k: v.clone() for k, v in model.state_dict().items()})
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0, recenter_every=2, recenter_draws=1)
    keep = torch.ones(300, dtype=torch.bool)
    reports = []
    for r in range(requests):
        ids = torch.nonzero(y == 0).flatten()[10 * r : 10 * (r + 1)]
        keep[ids] = False
        reports.append(un.remove((x[ids], y[ids]), (x[keep], y[keep])))
    return reports, [torch.cat([v.flatten() for v in s.values()]) for s in un.samples()]


def test_the_package_logger_is_silent_unless_configured() -> None:
    """A library must not print progress by default: the package's logger holds a NullHandler (no "No handlers
    could be found" fallback) and no level of its own, so the caller's logging configuration decides."""
    logger = logging.getLogger("mcmc_unlearner")
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)
    assert logger.level == logging.NOTSET and mcmc_unlearner.__name__ == "mcmc_unlearner"


def test_progress_lines_follow_the_reports_and_change_nothing(caplog: pytest.LogCaptureFixture) -> None:
    _, quiet = _sequence()
    with caplog.at_level(logging.DEBUG, logger="mcmc_unlearner"):
        reports, loud = _sequence()
    assert all(torch.equal(a, b) for a, b in zip(quiet, loud)), "logging changed the samples"
    assert all(r.passed for r in reports)

    msgs = [(rec.name, rec.levelno, rec.getMessage()) for rec in caplog.records if rec.name.startswith("mcmc_unl")]
    starts = [m for _, _, m in msgs if m.startswith("request: ")]
    ends = [m for _, _, m in msgs if m.startswith("request computed in ")]
    assert len(starts) == len(ends) == len(reports)
    for r, start, end in zip(reports, starts, ends):
        assert start.startswith(f"request: 10 removed row(s), {r.n_remaining} remaining")
        shift = float(re.search(r"shift ([0-9.e+-]+),", end).group(1))
        assert shift == pytest.approx(r.shift_norm, rel=1e-3)
        assert end.endswith("every check passed")

    curv = [m for _, _, m in msgs if m.startswith("curvature (kfac)")]
    assert len(curv) == len(reports)
    built = [i for i, m in enumerate(curv) if "built over" in m]
    assert built and built[0] == 0, curv  # built by the first request, reused after unless rebuilt for drift
    assert sum(bool(r.info.get("curvature_rebuilt_for_drift")) for r in reports) == len(built) - 1

    # every damping trial a report lists is one DEBUG line of the step module, in order (then the correction's)
    trials = [m for name, lvl, m in msgs if name == "mcmc_unlearner.step" and lvl == logging.DEBUG]
    expected = []
    for r in reports:
        expected += [h["damping"] for h in r.info["trials"]] + [None] * r.info.get("recenter_trials", 0)
    assert len(trials) == len(expected)
    for line, lam in zip(trials, expected):
        if lam is not None:
            assert float(re.search(r"damping ([0-9.e+-]+)[,:]", line).group(1)) == pytest.approx(lam, rel=1e-2)
    steps = [m for _, _, m in msgs if m.startswith("step: accepted after")]
    assert [int(re.search(r"after (\d+) damping", m).group(1)) for m in steps] == [r.damping_trials for r in reports]

    # the corrections across requests (every 2 requests here) say how many stored samples they measured
    for r in reports:
        if r.info.get("recenter", "").startswith(("applied", "skipped")):
            break
    else:
        pytest.fail(f"no correction ran: {[r.info.get('recenter') for r in reports]}")
    corr = [m for _, _, m in msgs if m.startswith("correction: stored sample")]
    ran = [r for r in reports if r.info.get("recenter", "").startswith(("applied", "skipped"))]
    assert len(corr) == sum(r.info["recenter_draws"] for r in ran)
    done = [m for _, _, m in msgs if m.startswith(("correction applied", "correction skipped"))]
    assert [m.split(" (")[0] for m in done] == [f"correction {r.info['recenter']}".split(" (")[0] for r in ran]


def _ranked_worker(rank: int, world: int, out: str) -> None:
    """One request under ``torch.distributed`` with the library's progress logged at DEBUG to the rank's own file."""
    from mcmc_unlearner.distributed import DistributedUnlearner, ShardedDataset
    from test_distributed_emptied_label import _setup
    from test_distributed_one_rank_refusals import _log_prior, _nll

    handler = logging.FileHandler(f"{out}/rank{rank}.log")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("mcmc_unlearner")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    x, y, model, bank, gone = _setup()
    un = DistributedUnlearner(model, bank=bank, nll=_nll, log_prior=_log_prior, solver="exact")
    un.forget(gone[:20], ShardedDataset.from_global(x, y, rank=rank, world=world, batch_size=32, seed=0))
    handler.close()


def test_under_torch_distributed_every_line_names_its_rank(tmp_path, caplog):
    """Two ranks report the same request to one terminal: each line starts ``[rank r/2]`` (stop 41; before, their
    lines were indistinguishable), and a single process's lines, after a distributed run in another process, do
    not."""
    from _distributed_helpers import spawn

    spawn(_ranked_worker, str(tmp_path))
    for rank in range(2):
        lines = (tmp_path / f"rank{rank}.log").read_text().splitlines()
        assert any("damping trial" in ln for ln in lines)
        assert any(ln.startswith(f"[rank {rank}/2] step:") for ln in lines)
        assert all(ln.startswith(f"[rank {rank}/2] ") for ln in lines), [ln for ln in lines if "[rank" not in ln][:3]
    import mcmc_unlearner.distributed  # the filter is on the loggers once a DistributedUnlearner was built here too
    from test_distributed_emptied_label import _setup
    from test_distributed_one_rank_refusals import _log_prior, _nll

    mcmc_unlearner.distributed._prefix_progress_with_rank()
    x, y, model, bank, gone = _setup()
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[gone[:20]] = False
    with caplog.at_level(logging.INFO, logger="mcmc_unlearner"):
        MCMCUnlearner(model, bank=bank, nll=_nll, log_prior=_log_prior, solver="exact").remove(
            (x[gone[:20]], y[gone[:20]]), (x[keep], y[keep])
        )
    said = [r.getMessage() for r in caplog.records if r.name.startswith("mcmc_unlearner")]
    assert any(m.startswith("step:") for m in said) and not any("[rank" in m for m in said)


def test_a_long_damping_search_says_at_info_what_its_trials_measured(monkeypatch, caplog) -> None:
    """A damping search running ``PROGRESS_EVERY_S`` since it began (or since its last such line) logs its latest
    trial at INFO with what it measured (requests on a 16.8M-parameter Linear went 41-105 s between INFO lines,
    all inside the search); a short one adds no INFO line, its trials DEBUG lines alone."""
    import mcmc_unlearner.step as step_module

    monkeypatch.setattr(step_module, "PROGRESS_EVERY_S", 0.0)  # every trial counts as long
    with caplog.at_level(logging.INFO, logger="mcmc_unlearner"):
        reports, _ = _sequence(requests=1)
    lines = [r for r in caplog.records if r.name == "mcmc_unlearner.step" and r.levelno == logging.INFO]
    trials = reports[0].info["trials"]
    assert len(lines) == len(trials), ([r.getMessage() for r in lines], trials)
    for rec, trial in zip(lines, trials):
        m = re.fullmatch(
            r"damping search \((\w+) shape\), ([0-9.]+) s in: damping ([0-9.e+-]+), predicted ([0-9.e+-]+), "
            r"measured ([0-9.e+-]+) ± [0-9.e+-]+, ratio ([0-9.e+-]+|nan): (passed|rejected)",
            rec.getMessage(),
        )
        assert m is not None, rec.getMessage()
        assert float(m.group(3)) == pytest.approx(trial["damping"], rel=1e-2)
        assert float(m.group(5)) == pytest.approx(trial["actual"], rel=1e-3, abs=1e-9)
    monkeypatch.setattr(step_module, "PROGRESS_EVERY_S", float("inf"))  # a short search: DEBUG only
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mcmc_unlearner"):
        _sequence(requests=1)
    assert not [r for r in caplog.records if r.name == "mcmc_unlearner.step" and r.levelno >= logging.INFO]
