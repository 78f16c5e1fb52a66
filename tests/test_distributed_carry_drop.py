"""The slope test's retry with the carried deficit dropped (``MCMCUnlearner._without_carry``) over two gloo ranks:
whether it runs, and what it takes or refuses, is decided from all-reduced quantities only (``G``, the carry, the
step), so every rank makes the same retry and ends with the same bank, carry, damping state and generator."""

from __future__ import annotations

import json
import warnings

from _distributed_helpers import spawn
from mcmc_unlearner.distributed import DistributedUnlearner, ShardedDataset
from mcmc_unlearner.models.linreg import BayesianLinearRegression
from test_slope_check import _float_bank, _pulled


def _run(rank: int, world: int, x, y, removed, bank, carry) -> dict:
    data = ShardedDataset.from_global(x.float(), y.float(), rank=rank, world=world, batch_size=50, seed=0)
    un = DistributedUnlearner(BayesianLinearRegression(3), bank=bank.clone())
    un._carry = carry.clone()
    found: dict = {}
    try:
        report = un.forget(removed.tolist(), data)
        found["record"] = report.info.get("carry_dropped")
    except Exception as e:  # the message is what is compared
        found["refused"] = f"{type(e).__name__}: {e}"
    found.update(
        bank=un.bank.tolist(),
        carry=None if un._carry is None else un._carry.tolist(),
        control=un.control.state(),
        generator=un.generator.get_state().tolist(),
    )
    return found


def _worker(rank: int, world: int, out: str) -> None:
    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, y, removed, bank, m_all, m_kept, _, H_r = _pulled()
        found["taken"] = _run(rank, world, x, y, removed, bank, (-2.0 * H_r @ (m_kept - m_all)).float())
        # −1.5·G: the slope test abstains on the accepted step and the carry is contradicted (stop 65)
        found["contradicted"] = _run(rank, world, x, y, removed, bank, (-1.5 * H_r @ (m_kept - m_all)).float())
        x, y, removed, bank, _ = _float_bank(15)
        rows = x[removed]
        carry = (4.0 * rows.T @ (rows @ bank.double().mean(0) - y[removed])).float()
        found["refused"] = _run(rank, world, x, y, removed, bank, carry)
        found["refused"]["bank_kept"] = found["refused"]["bank"] == bank.tolist()
    with open(f"{out}/carry-rank{rank}.json", "w") as f:
        json.dump(found, f)


def test_every_rank_makes_the_same_retry_without_the_carry(tmp_path) -> None:
    """Taken (the exact bank given a carry of −2·G): both ranks retry and record the same, the bank moved alike;
    contradicted (the same bank given −1.5·G, whose accepted step the slope test abstains on): both refuse it as
    contradicting the carry (``DampingControl.carry_contradicted``), retry and take the same step;
    refused (the wrong-sign bank with a carry of 80% of G·x): both retry, refuse with the same words, and keep the
    bank, the carry and the damping state."""
    spawn(_worker, str(tmp_path), world=2)
    r0, r1 = (json.loads((tmp_path / f"carry-rank{r}.json").read_text()) for r in range(2))
    assert r0 == r1
    taken, refused, contradicted = r0["taken"], r0["refused"], r0["contradicted"]
    assert taken["record"]["accepted"] and taken["record"]["slope_test"] == "passed"
    assert taken["record"]["refused_by"] == "slope_test"
    assert contradicted["record"]["accepted"] and contradicted["record"]["refused_by"] == "carry_contradicted"
    assert "searched again with the deficit carried from earlier requests dropped" in refused["refused"]
    assert refused["bank_kept"]
