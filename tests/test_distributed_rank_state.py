"""What one rank does alone between or during requests (stop 59's probe): the unlearner's generator drawn from
unevenly by K-FAC's build on ranks holding unequal shares of the rows, ``reset_curvature()`` or ``fit()`` called on
one rank only, and an ``nll`` that raises on one rank's remaining rows. Each left the ranks in disagreement (their
generators, hence their saved curvature states, differed) or waiting: gloo aborted both processes (SIGABRT), or the
rank that did not fail waited in an all-reduce until gloo's timeout. Now the ranks agree, or all refuse at once."""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings

import torch

from _distributed_helpers import ce_nll, gaussian_log_prior, spawn
from mcmc_unlearner import distributed
from mcmc_unlearner.distributed import DistributedUnlearner, ShardedDataset
from test_distributed_uneven_ranks import _setup

KW = dict(nll=ce_nll, log_prior=gaussian_log_prior, solver="kfac", refresh_every=1)


def _unlearner(rank: int, world: int, **kw) -> tuple[DistributedUnlearner, ShardedDataset, torch.Tensor]:
    x, y, model, bank = _setup(6)
    data = ShardedDataset.from_global(x, y, rank=rank, world=world, batch_size=8, seed=4)
    return DistributedUnlearner(model, bank=bank, **{**KW, **kw}), data, bank


def _digest(g: torch.Generator) -> str:
    return hashlib.sha256(g.get_state().numpy().tobytes()).hexdigest()


def _generator_worker(rank: int, world: int, out: str) -> None:
    un, data, _ = _unlearner(rank, world)  # mc_samples=1: Monte-Carlo noise drawn row by row
    found = {"generators": [], "banks": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a third of the rows goes: the large-removal warning is not what is tested
        # rank 1's rows go first: rank 0 then holds 15 more of the remaining rows than rank 1
        for ids in (list(range(1, 31, 2)), [0, 2, 4], [10, 12, 50]):
            un.forget(ids, data, strict=False)
            found["generators"].append(_digest(un.generator))
            found["banks"].append(un.bank.tolist())
        un.load_curvature_state(*un.curvature_state())  # each rank resumes from its own checkpoint
        try:
            un.forget([36, 38, 41], data, strict=False)
            found["resumed"] = "accepted"
        except Exception as e:  # the message is what is compared
            found["resumed"] = f"{type(e).__name__}: {e}"
    with open(f"{out}/gen-rank{rank}.json", "w") as f:
        json.dump(found, f)


def test_ranks_of_unequal_shares_keep_one_generator(tmp_path):
    """K-FAC's build draws its noise row by row: rank 0, holding more of the rows, drew more numbers from the
    unlearner's generator than rank 1, whose generator came out of every request different (the banks still agreed:
    the build's draws are each rank's own). Each rank's own checkpoint then held another generator, and resuming
    from it was refused as different curvature states. Now the build draws from a generator of the rank's own,
    seeded from one draw of the shared one: the generators agree after every request, and so do the banks."""
    spawn(_generator_worker, str(tmp_path), world=2)
    r0, r1 = (json.loads((tmp_path / f"gen-rank{r}.json").read_text()) for r in range(2))
    assert r0["generators"] == r1["generators"]
    assert len(set(r0["generators"])) == 3  # the build drew from it at every request
    assert r0["banks"] == r1["banks"]
    assert r0["resumed"] == r1["resumed"] == "accepted"


def _calls_worker(rank: int, world: int, out: str) -> None:
    un, data, _ = _unlearner(rank, world)
    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        un.forget([1, 3, 5, 7, 9, 11], data, strict=False)
        n = len(data)
        if rank == 1:
            un.reset_curvature()
        before = un.bank.clone()
        t0 = time.perf_counter()
        try:
            un.forget([0, 2, 4, 21], data, strict=False)
            found["reset_on_rank1"] = "accepted"
        except Exception as e:  # the message is what is compared
            found["reset_on_rank1"] = f"{type(e).__name__}: {e}"
        found["seconds"] = time.perf_counter() - t0
        found["kept"] = bool(torch.equal(un.bank, before)) and len(data) == n
        un.reset_curvature()  # the fix the message names: on every rank
        un.forget([0, 2, 4, 21], data, strict=False)
        found["bank"] = un.bank.tolist()
        before = un.bank.clone()
        try:  # rank 0 fits while rank 1 sends the next request
            if rank == 0:
                un.fit(data)
            else:
                un.forget([30, 31], data, strict=False)
            found["fit_on_rank0"] = "accepted"
        except Exception as e:
            found["fit_on_rank0"] = f"{type(e).__name__}: {e}"
        found["kept_after_fit"] = bool(torch.equal(un.bank, before)) and not un._fitted
    with open(f"{out}/calls-rank{rank}.json", "w") as f:
        json.dump(found, f)


def test_reset_curvature_or_fit_on_one_rank_is_refused_on_every_rank(tmp_path):
    """``reset_curvature()`` on rank 1 alone: rank 1 rebuilt its K-FAC factors while rank 0 reused its own, and
    ``fit()`` on rank 0 while rank 1 sent a request paired the fit's all-reduces with the request's; gloo aborted
    both processes each time (SIGABRT). Now the first exchange of a request or a fit compares the call and a
    fingerprint of the curvature state: both ranks refuse at once, naming what each rank called, nothing changed;
    ``reset_curvature()`` on every rank then lets the request through."""
    spawn(_calls_worker, str(tmp_path), world=2, timeout_s=30)
    ranks = [json.loads((tmp_path / f"calls-rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        msg = r["reset_on_rank1"]
        assert msg.startswith("InvalidRequestError: the ranks hold different curvature states before this request")
        assert "rank 1: reset_curvature() x1" in msg and "rank 0: none of them" in msg
        assert "call reset_curvature() on every rank" in msg
        assert r["kept"] and r["seconds"] < 15  # refused at once, not at the timeout
        assert r["fit_on_rank0"].startswith(
            "InvalidRequestError: the ranks called different methods together (rank 0 fit(), rank 1 forget())"
        )
        assert r["kept_after_fit"]
    assert ranks[0]["bank"] == ranks[1]["bank"]


def _raising_nll(m: torch.nn.Module, b: tuple) -> torch.Tensor:
    if bool((b[0][:, 0] > 100).any()):
        raise RuntimeError("nll: a row out of range")
    return ce_nll(m, b)


def _failing_worker(rank: int, world: int, out: str) -> None:
    x, y, model, bank = _setup(6)
    x[41, 0] = 1000.0  # a remaining row of rank 1 (41 % 2)
    data = ShardedDataset.from_global(x, y, rank=rank, world=world, batch_size=8, seed=4)
    un = DistributedUnlearner(model, bank=bank, **{**KW, "nll": _raising_nll})
    n, state = len(data), data.state_dict()["generator"]
    try:
        un.forget([0, 1, 2, 3], data, strict=False)
        found = {"error": "accepted"}
    except Exception as e:  # the message is what is compared
        found = {"error": f"{type(e).__name__}: {e}"}
    found["at"] = time.time()  # one clock: both processes run on this machine
    found["kept"] = bool(torch.equal(un.bank, bank)) and len(data) == n
    found["kept"] = found["kept"] and torch.equal(data.state_dict()["generator"], state)
    with open(f"{out}/fail-rank{rank}.json", "w") as f:
        json.dump(found, f)


def test_an_nll_failing_on_one_ranks_rows_stops_every_rank_at_once(tmp_path):
    """Rank 1's ``nll`` raises on one of its remaining rows: rank 0 waited in its next all-reduce until gloo's
    timeout (15 s in the probe, 10 minutes by default), and the teardown failed. Now every all-reduce of a request
    is preceded by an exchange of which ranks failed: rank 0 raises ``RankFailedError`` naming rank 1 within
    moments of rank 1's own error, and neither changed anything."""
    spawn(_failing_worker, str(tmp_path), world=2, timeout_s=40)
    r0, r1 = (json.loads((tmp_path / f"fail-rank{r}.json").read_text()) for r in range(2))
    assert r1["error"] == "RuntimeError: nll: a row out of range"
    assert r0["error"].startswith("RankFailedError: rank 1 of the group failed during this request")
    assert abs(r0["at"] - r1["at"]) < 10  # not the 40 s timeout
    assert r0["kept"] and r1["kept"]


def _fit_fails_worker(rank: int, world: int, out: str) -> None:
    x, y, model, bank = _setup(6)
    x[1::2, 0] = 1000.0  # every row of rank 1 (id % 2 == 1): its nll raises in fit's curvature build
    data = ShardedDataset.from_global(x, y, rank=rank, world=world, batch_size=8, seed=4)
    un = DistributedUnlearner(model, bank=bank, **{**KW, "nll": _raising_nll})
    try:
        un.fit(data)
        found = {"error": "accepted"}
    except Exception as e:  # the message is what is compared
        found = {"error": f"{type(e).__name__}: {e}"}
    found["kept"] = bool(torch.equal(un.bank, bank))
    with open(f"{out}/fit-rank{rank}.json", "w") as f:
        json.dump(found, f)


def test_a_rank_failing_in_fit_is_named_as_failing_in_fit(tmp_path):
    """Rank 1's ``nll`` raises in ``fit()``: rank 0's ``RankFailedError`` said rank 1 "failed during this request"
    and to "send the request again", in a fit (stop 59's review). Now it names the fit and says to call it again."""
    spawn(_fit_fails_worker, str(tmp_path), world=2, timeout_s=40)
    r0, r1 = (json.loads((tmp_path / f"fit-rank{r}.json").read_text()) for r in range(2))
    assert "nll: a row out of range" in r1["error"], r1
    assert r0["error"].startswith("RankFailedError: rank 1 of the group failed during this fit() ("), r0
    assert "call fit() again on every rank" in r0["error"] and "request" not in r0["error"], r0
    assert r0["kept"] and r1["kept"]


def _moving_fails_worker(rank: int, world: int, out: str) -> None:
    x, y, model, bank = _setup(6)
    data = ShardedDataset.from_global(x, y, rank=rank, world=world, batch_size=8, seed=4)
    un = DistributedUnlearner(model, bank=bank, **KW)
    real, moves = distributed._comm_device, [0]

    def failing(group: object) -> torch.device:
        """Rank 1's third move of a buffer to the backend's device during the request fails."""
        if sys._getframe(1).f_code.co_name == "_all_reduce" and distributed._WATCHES:
            moves[0] += 1
            if moves[0] == 3:
                raise MemoryError("moving the buffer to the backend's device failed")
        return real(group)

    if rank == 1:
        distributed._comm_device = failing
    try:
        un.forget([0, 1, 2, 3], data, strict=False)
        found = {"error": "accepted"}
    except Exception as e:  # the message is what is compared
        found = {"error": f"{type(e).__name__}: {e}"}
    finally:
        distributed._comm_device = real
    found["at"] = time.time()
    found["kept"] = bool(torch.equal(un.bank, bank))
    with open(f"{out}/move-rank{rank}.json", "w") as f:
        json.dump(found, f)


def test_an_error_moving_a_buffer_before_an_all_reduce_stops_every_rank_at_once(tmp_path):
    """Rank 1 failed after the failure exchange that precedes an all-reduce and before the all-reduce itself (the
    move of the buffer to the backend's device: a device out of memory): its failure exchange paired with rank 0's
    all-reduce, and rank 0 waited until gloo's timeout (15 s in the review's probe). The buffer is now moved before
    the exchange: rank 0 raises ``RankFailedError`` at once."""
    spawn(_moving_fails_worker, str(tmp_path), world=2, timeout_s=20)
    r0, r1 = (json.loads((tmp_path / f"move-rank{r}.json").read_text()) for r in range(2))
    assert r1["error"] == "MemoryError: moving the buffer to the backend's device failed"
    assert r0["error"].startswith("RankFailedError: rank 1 of the group failed during this request")
    assert abs(r0["at"] - r1["at"]) < 10  # not the 20 s timeout
    assert r0["kept"] and r1["kept"]
