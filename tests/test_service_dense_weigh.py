"""The deletion service makes ``solver='auto'``'s dense-build choice as the library does (stop 58's weighing).

A saved folder stores the solver auto resolved (``ggn``), and the service rebuilt its unlearner from it as if that
solver had been asked for by name: the weighing of the dense build's cost never ran. A convolutional net of 64
outputs per row (668 parameters) ran the dense Gauss-Newton matrix at every request, 3.3 s CPU, where the library's
own unlearner took K-FAC, 0.35 s (stop 59's probe). The service now rebuilds such an unlearner as ``auto`` while the
weighing is pending, and a switch is stored as the folder's configuration, so a restart keeps it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from mcmc_unlearner import SGLD, MCMCUnlearner, RemovableDataset
from mcmc_unlearner.models.bnn import build_model
from mcmc_unlearner.samplers import run_chain
from mcmc_unlearner.service.checkpoint import load_model, save_model
from mcmc_unlearner.service.deletion import forget
from mcmc_unlearner.service.specs import bnn_model_spec

torch.set_num_threads(1)
KW = {"channels": 2, "hidden": 8}


def _saved(tmp_path: Path, classes: int) -> tuple[Path, MCMCUnlearner, RemovableDataset]:
    """A digits_net of ``classes`` outputs on 4x4 inputs, its SGLD bank, saved before any request."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 1, 4, 4, generator=g)
    y = torch.randint(0, classes, (120,), generator=g)
    torch.manual_seed(0)
    model = build_model("digits_net", [1, 4, 4], classes, prior_std=1.0, **KW)
    s = SGLD(model.parameters(), lr=1e-4, generator=torch.Generator().manual_seed(1))
    data = RemovableDataset(x, y, batch_size=40, seed=0)
    un = MCMCUnlearner(model, s)
    un.bank = run_chain(model, s, data, un.energy, 30, len(data), keep_every=3)
    path = tmp_path / "m"
    save_model(
        path,
        model=model,
        sampler=s,
        data=data,
        unlearner=un,
        model_spec=bnn_model_spec("digits_net", [1, 4, 4], classes, prior_std=1.0, **KW),
        data_spec={"kind": "tensors"},
    )
    return path, un, data


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.simplefilter("ignore")


def test_service_takes_autos_kfac_and_a_restart_keeps_it(tmp_path: Path) -> None:
    path, un, data = _saved(tmp_path, classes=64)
    assert un.solver.value == "ggn" and _manifest(path)["unlearner"]["solver"] == "ggn"
    # the library's own unlearner and one loaded from the folder: the weighing switches both to K-FAC
    direct = un.forget([3, 14, 15], data, strict=False)
    lib = load_model(path)
    loaded = lib.unlearner.forget([3, 14, 15], lib.data, strict=False)
    assert direct.solver == loaded.solver == "kfac"
    out = forget(path, [3, 14, 15], request_id="t1")
    assert out.entry["solver"] == "kfac"  # was ggn: the dense build, 10x the CPU
    assert out.entry["shift_norm"] == pytest.approx(loaded.shift_norm, rel=1e-6)
    assert out.entry["config"]["curvature_draws"] == 8  # K-FAC's default: it was not given
    man = _manifest(path)
    # not given: saved as None, K-FAC's default at the load (the resolved 8 was saved, and read back as given)
    assert man["unlearner"]["solver"] == "kfac" and man["unlearner"]["curvature_draws"] is None
    assert man["unlearner_state"]["dense_weigh_pending"] is False
    # a restart: the next request runs K-FAC from the stored configuration
    restart = load_model(path).unlearner
    assert restart.solver.value == "kfac" and restart.curvature_draws == 8
    again = forget(path, [4], request_id="t2")
    assert again.entry["solver"] == "kfac"


def test_an_override_request_leaves_the_weighing_pending(tmp_path: Path) -> None:
    path, _, _ = _saved(tmp_path, classes=64)
    # iter_T given: auto does not weigh (a solver's own option set), and the folder's ggn runs unweighed
    out = forget(path, [3], request_id="t1", overrides={"iter_T": 50})
    assert out.entry["solver"] == "ggn"
    man = _manifest(path)
    assert man["unlearner"]["solver"] == "ggn"
    assert man["unlearner_state"]["dense_weigh_pending"] == {
        "curvature_draws": True,
        "refresh_every": True,
        "recenter_every": True,
    }
    # the folder's next request weighs it (before: the override's state had dropped the pending weighing)
    assert forget(path, [4], request_id="t2").entry["solver"] == "kfac"


def test_a_kept_dense_build_is_weighed_once(tmp_path: Path) -> None:
    path, un, _ = _saved(tmp_path, classes=8)  # 8 outputs x 164 parameters / 16: within exact_max_dim
    assert un.solver.value == "ggn"
    first = forget(path, [3], request_id="t1")
    assert first.entry["solver"] == "ggn"
    assert "within the 1000 of exact_max_dim" in first.entry["info"]["dense_cost"]
    assert _manifest(path)["unlearner_state"]["dense_weigh_pending"] is False  # was True, merged into every commit
    second = forget(path, [4], request_id="t2")
    assert "dense_cost" not in second.entry["info"]


def test_an_override_that_leaves_the_weighing_on_weighs_it(tmp_path: Path) -> None:
    """An override auto weighs with (``tol``: not one of a solver's own options) takes K-FAC as the library's own
    ``auto`` with that option does; the switch is the request's, the folder keeps its dense configuration and its
    weighing pending. Before, the override's unlearner loaded the folder's state with its solver popped, which
    dropped the pending weighing: the request ran the dense build unweighed."""
    path, _, _ = _saved(tmp_path, classes=64)
    lib = load_model(path)
    own = MCMCUnlearner(lib.model, lib.sampler, bank=lib.unlearner.bank.clone(), tol=1e-5)
    assert own.forget([3], lib.data, strict=False).solver == "kfac"  # the library's auto with tol given
    out = forget(path, [3], request_id="t1", overrides={"tol": 1e-5})
    assert out.entry["solver"] == "kfac" and out.entry["config"]["tol"] == 1e-5  # was ggn
    man = _manifest(path)
    assert man["unlearner"]["solver"] == "ggn" and man["unlearner_state"]["dense_weigh_pending"] == {
        "curvature_draws": True,
        "refresh_every": True,
        "recenter_every": True,
    }
    assert forget(path, [4], request_id="t2").entry["solver"] == "kfac"


def test_a_stale_pending_flag_of_a_folder_that_took_requests_is_not_weighed(tmp_path: Path, monkeypatch) -> None:
    """A folder saved by stop 58's code says ``dense_weigh_pending: true`` forever: its service never weighed the
    dense build and merged the save's flag into every commit. After requests ran with that build, auto's weighing
    (before the first build only) is not due: the folder keeps its dense solver, options and cached curvature."""
    from mcmc_unlearner.service import state

    real = MCMCUnlearner.curvature_state

    def stop58_state(self: MCMCUnlearner) -> tuple[dict, dict]:
        tensors, meta = real(self)
        pending = meta.pop("dense_weigh_pending")
        return tensors, ({**meta, "dense_weigh_pending": True} if pending else meta)

    with monkeypatch.context() as mp:  # stop 58's code: the flag written only while pending, the service unweighed
        mp.setattr(state, "rebuild_as_auto", lambda *a: a[-1])
        mp.setattr(MCMCUnlearner, "curvature_state", stop58_state)
        path, _, _ = _saved(tmp_path, classes=64)
        for k, ids in enumerate(([3], [4])):
            assert forget(path, ids, request_id=f"r{k}").entry["solver"] == "ggn"
    man = _manifest(path)
    assert man["unlearner_state"]["dense_weigh_pending"] is True and man["unlearner_state"]["grad_draw_round"] > 0
    out = forget(path, [5], request_id="r2")
    assert out.entry["solver"] == "ggn" and out.entry["config"]["curvature_draws"] == 16  # was kfac, 8
    assert out.entry["info"].get("hessian_reused")  # the cached dense curvature (refresh_every 10), not dropped
    man = _manifest(path)
    assert man["unlearner"]["solver"] == "ggn" and man["unlearner_state"]["dense_weigh_pending"] is False
