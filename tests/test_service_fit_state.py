"""A folder saved after ``fit()`` (K-FAC's curvature built on the remaining data before any request): its state says
``built_by_fit``, which the unlearner writes only while the flag is set. The deletion service merges a commit's state
into the last one's, so the flag stayed in the manifest after the first request used the curvature: every later
request, loaded, took the cached curvature as fit's own build (searched from scratch, no drift test) where the
library's unlearner reused it (stop 60's probe: a 4-class digits_net's second request tried one more damping shape
than the library's, ``identity 24.5:0.604``). Now the commit drops it."""

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


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.simplefilter("ignore")


def test_a_fit_curvature_used_by_a_request_is_not_taken_as_fits_again(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 1, 4, 4, generator=g)
    y = torch.randint(0, 4, (120,), generator=g)
    torch.manual_seed(0)
    model = build_model("digits_net", [1, 4, 4], 4, prior_std=1.0, **KW)
    s = SGLD(model.parameters(), lr=1e-4, generator=torch.Generator().manual_seed(1))
    data = RemovableDataset(x, y, batch_size=40, seed=0)
    un = MCMCUnlearner(model, s, solver="kfac")
    un.bank = run_chain(model, s, data, un.energy, 30, len(data), keep_every=3)
    un.fit(data)
    path = tmp_path / "m"
    spec = bnn_model_spec("digits_net", [1, 4, 4], 4, prior_std=1.0, **KW)
    save_model(path, model=model, sampler=s, data=data, unlearner=un, model_spec=spec, data_spec={"kind": "tensors"})

    def state() -> dict:
        return json.loads((path / "manifest.json").read_text())["unlearner_state"]

    assert state()["built_by_fit"] is True
    lib = load_model(path)  # the library's own unlearner, from the same folder: two requests in one process
    first = forget(path, [3, 14, 15], request_id="t1")
    assert first.report.info["curvature_built_by_fit"] is True  # the first request uses fit's curvature
    assert "built_by_fit" not in state() and "fit_data_nll" not in state()  # was: True, stale
    assert not load_model(path).unlearner._fitted
    second = forget(path, [4, 5], request_id="t2")
    lib.unlearner.forget([3, 14, 15], lib.data, strict=False)
    own = lib.unlearner.forget([4, 5], lib.data, strict=False)
    assert "curvature_built_by_fit" not in second.report.info and "curvature_built_by_fit" not in own.info
    assert second.report.info["damping_history"] == own.info["damping_history"]
    assert second.report.shift_norm == own.shift_norm
