"""README "Beyond one machine": `torchrun --nproc-per-node 2 -m mcmc_unlearner.cli forget --model DIR --ids FILE`
on a folder saved as `mcmc-unlearner demo --save-model` saves it (newton_steps=2, equilibrium target) or with the
library's defaults on a K-FAC model (recenter_every resolved to 10 and stored) is refused with a fix the CLI
cannot apply ("pass newton_target='relative' or newton_steps=1" / "pass recenter_every=0": forget has no such
option). The refusal must say what the command-line user can do, and the folder must stay unchanged."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mcmc_unlearner import SGLD, MCMCUnlearner, RemovableDataset
from mcmc_unlearner.datasets import make_gmm_2d
from mcmc_unlearner.distributed import GATE_OFF
from mcmc_unlearner.models.gmm import GaussianMixture
from mcmc_unlearner.samplers import run_chain
from mcmc_unlearner.service.checkpoint import save_model
from mcmc_unlearner.service.deletion import forget
from mcmc_unlearner.service.specs import gmm_data_spec, gmm_model_spec
from mcmc_unlearner.unlearner import NEWTON_GATE_Z


def _save(path: Path, **options) -> Path:
    x, y = make_gmm_2d()
    data = RemovableDataset(torch.from_numpy(x), torch.from_numpy(y), batch_size=64, seed=0)
    model = GaussianMixture(k=4, dim=2, generator=torch.Generator().manual_seed(0))
    sampler = SGLD(model.parameters(), lr=1e-3, generator=torch.Generator().manual_seed(1))
    un = MCMCUnlearner(model, sampler, **options)
    run_chain(model, sampler, data, un.energy, 200, len(data))
    un.bank = run_chain(model, sampler, data, un.energy, 40, len(data), keep_every=2)
    save_model(
        path,
        model=model,
        sampler=sampler,
        data=data,
        unlearner=un,
        model_spec=gmm_model_spec(model),
        data_spec=gmm_data_spec(),
    )
    return path


@pytest.mark.parametrize("options", [{"newton_steps": 2}, {"recenter_every": 3}])
def test_torchrun_forget_refusal_names_a_command_line_fix(tmp_path, options):
    folder = _save(tmp_path / "m", **options)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    run = _torchrun_forget(folder, tmp_path, "3 14 15")
    assert run.returncode != 0
    assert "without torchrun" in run.stderr, run.stderr[-1500:]  # a fix a command-line user can apply
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def _torchrun_forget(folder: Path, tmp_path: Path, ids: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m mcmc_unlearner.cli forget --model folder --ids FILE` (``ids`` in FILE)."""
    file = tmp_path / "ids.txt"
    file.write_text(ids)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # the launcher's store binds a port the system picks: no race with concurrent tests
        "--nproc-per-node",
        "2",
        "-m",
        "mcmc_unlearner.cli",
        "forget",
        "--model",
        str(folder),
        "--ids",
        str(file),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def test_a_torchrun_request_leaves_autos_dense_weighing_pending(tmp_path):
    """A folder whose ``solver='auto'`` took the dense Hessian and has not weighed it yet (saved before its first
    request): a request under torchrun runs the dense solver unweighed (the weighing runs in one process), and
    the folder's flag came out False, so no later request weighed it (stop 59's review). Now it stays pending, and
    the next request in one process weighs it.

    The same request's ledger entry records the ``newton_gate`` that ran: 0 (off), with the reason in its info; it
    said the folder's 3, which no rank ran (stop 66's review). The folder keeps its 3 for requests in one process."""
    folder = _save(tmp_path / "m")
    pending = json.loads((folder / "manifest.json").read_text())["unlearner_state"]["dense_weigh_pending"]
    assert pending == {"curvature_draws": True, "recenter_every": True, "refresh_every": True}
    run = _torchrun_forget(folder, tmp_path, "3 14 15")
    assert run.returncode == 0, run.stderr[-1500:]
    state = json.loads((folder / "manifest.json").read_text())["unlearner_state"]
    assert state["grad_draw_round"] == 1 and state["dense_weigh_pending"] == pending  # was False: never weighed
    (entry,) = [
        e for e in map(json.loads, (folder / "ledger.jsonl").read_text().splitlines()) if e["event"] == "forget"
    ]
    assert entry["config"]["newton_gate"] == 0.0, entry["config"]  # was 3.0
    assert entry["info"]["newton_gate"] == GATE_OFF, entry["info"]
    assert json.loads((folder / "manifest.json").read_text())["unlearner"]["newton_gate"] == NEWTON_GATE_Z
    out = forget(folder, [4, 5], request_id="one-process")
    assert "dense_cost" in out.report.info, out.report.info  # weighed (and kept: the estimate is recorded)
    assert json.loads((folder / "manifest.json").read_text())["unlearner_state"]["dense_weigh_pending"] is False


def test_a_torchrun_request_names_the_gate_off_only_where_one_process_would_have_looked(tmp_path):
    """A folder saved with ``newton_target='relative'``: its gate is never consulted, in one process or under
    torchrun (it decides ``"auto"``'s further steps toward equilibrium). Its torchrun request's ledger entry said
    ``info.newton_gate`` "off: not under DistributedUnlearner", a reason the request in one process does not have
    (it says nothing), where ``DistributedUnlearner`` itself says so only for the equilibrium target (stop 67's
    review). The entry's ``config.newton_gate`` is 0, what ran."""
    folder = _save(tmp_path / "m", newton_target="relative")
    run = _torchrun_forget(folder, tmp_path, "3 14 15")
    assert run.returncode == 0, run.stderr[-1500:]
    (entry,) = [
        e for e in map(json.loads, (folder / "ledger.jsonl").read_text().splitlines()) if e["event"] == "forget"
    ]
    assert entry["config"]["newton_gate"] == 0.0 and entry["config"]["newton_target"] == "relative", entry["config"]
    assert "newton_gate" not in entry["info"], entry["info"]
    assert "newton_gate" not in forget(folder, [4, 5], request_id="one-process").report.info
