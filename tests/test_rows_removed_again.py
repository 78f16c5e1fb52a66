"""A row sent again in a later request (stop 61's probe: a resent deletion list) is refused, not removed twice.

Before, the second request's repeated rows were removed a second time with every check passed: on a digits MLP 20 of
40 rows repeated moved their NLL from 0.125 to 0.269 against retraining's 0.153.
"""

import re

import pytest
import torch
from torch import nn

from conftest import make_blr
from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.errors import InvalidRequestError

torch.set_num_threads(1)


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return 0.5 * (m(b[0]).squeeze(-1) - b[1]) ** 2


def _log_prior(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _setup() -> tuple:
    """A Bayesian linear regression whose bank is 400 exact draws of the full-data posterior (float64)."""
    prob = make_blr()
    model = nn.Linear(3, 1, bias=False).double()
    g = torch.Generator().manual_seed(0)
    chol = torch.linalg.cholesky(prob.cov_all)
    bank = prob.mean_all + torch.randn(400, 3, generator=g, dtype=torch.float64) @ chol.T
    with torch.no_grad():
        model.weight.copy_(bank[-1])
    un = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=bank, solver="exact", newton_steps=1)
    x, y = prob.x.double(), prob.y.double()
    return prob, un, bank, x, y


def _rows(x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[ids], y[ids]


def _without(x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    keep[ids] = False
    return x[keep], y[keep]


def test_a_row_removed_before_is_refused_and_the_rest_lands_on_the_exact_posterior() -> None:
    prob, un, _, x, y = _setup()
    first, second = prob.removed[:20], prob.removed[20:]
    assert un.remove(_rows(x, y, first), _without(x, y, first)).passed
    after_first = un.bank.clone()
    resent = torch.cat([first[10:], second])  # 10 rows of the first request again, then the 20 new ones
    again = r"10 of the 30 rows of this request \(positions 0, 1, 2, .*, \.\.\.\) are identical to rows an earlier"
    with pytest.raises(InvalidRequestError, match=again + r".*remove them with strict=False"):
        un.remove(_rows(x, y, resent), _without(x, y, prob.removed))
    assert torch.equal(un.bank, after_first)  # nothing changed
    assert re.search(again, un.propose(_rows(x, y, resent), _without(x, y, prob.removed)).report.problems[-1])
    assert un.remove(_rows(x, y, second), _without(x, y, prob.removed)).passed
    # two exact Newton steps from exact draws: the bank's mean at the remaining data's posterior mean, within the
    # Monte Carlo error of 400 draws (sd of the mean about 0.05 of the removal's shift here); removing the 10 rows
    # twice would have left it a further 10 rows' influence away
    err = (un.bank.mean(0) - prob.mean_kept).norm() / prob.exact_shift.norm()
    assert err < 0.1


def test_rows_not_removed_before_are_accepted() -> None:
    prob, un, bank, x, y = _setup()
    ids = prob.removed[:20]
    un.propose(_rows(x, y, ids), _without(x, y, ids))  # proposed, never applied: not removed
    twice = torch.cat([ids, ids[:1]])  # one row twice in one request: warned (data can hold identical points)
    with pytest.warns(UserWarning, match="1 row"):
        assert un.remove(_rows(x, y, twice), _without(x, y, ids)).passed
    # other points with the same values: the caller's decision, the reason listed
    report = un.remove(_rows(x, y, ids[:1]), _without(x, y, ids), strict=False)
    assert len(report.problems) == 1 and "identical to rows an earlier request removed" in report.problems[0]
    un.bank = bank  # the caller's own samples again: which rows they hold is the caller's to say
    assert un.remove(_rows(x, y, ids), _without(x, y, ids)).passed


def test_forget_takes_another_id_whose_row_equals_one_removed_before() -> None:
    # forget(ids, data) checks the ids (an id removed before is refused by the data set), so a row equal to one
    # removed earlier is another data point with the same values (a duplicate in the data), not a resent row: it was
    # refused, strict=True, telling the caller to leave out rows that were never removed
    from mcmc_unlearner import RemovableDataset

    _, un, _, x, y = _setup()
    x, y = x.clone(), y.clone()
    x[1], y[1] = x[0], y[0]  # rows 0 and 1: two points with equal values
    data = RemovableDataset(x, y, batch_size=64)
    assert un.forget([0], data).passed
    report = un.forget([1], data)
    assert report.passed and not any("earlier request removed" in p for p in report.problems)
    with pytest.raises(InvalidRequestError, match=r"id\(s\) \[1\] were already removed"):
        un.forget([1], data)  # the id itself again: the data set's refusal
    # rows given by remove() carry no ids: the one removed by forget is still caught
    with pytest.raises(InvalidRequestError, match="identical to rows an earlier request removed"):
        un.remove(_rows(x, y, torch.tensor([0])), _without(x, y, torch.tensor([0, 1])))


def _reloaded(un: MCMCUnlearner, tensors: dict[str, torch.Tensor], meta: dict) -> MCMCUnlearner:
    """A new unlearner resumed from ``un``'s checkpoint as the README's checkpointing flow does (model state, bank,
    then ``load_curvature_state``)."""
    model = nn.Linear(3, 1, bias=False).double()
    model.load_state_dict(un.model.state_dict())
    again = MCMCUnlearner(model, nll=_nll, log_prior=_log_prior, bank=un.bank.clone(), solver="exact", newton_steps=1)
    again.load_curvature_state(tensors, meta)
    return again


def test_a_checkpoint_carries_the_removed_rows_so_a_row_sent_again_after_reloading_is_refused() -> None:
    # stop 63's flows probe: the digests were held in memory only, and after a reload the same rows were removed a
    # second time (shift 0.17, problems=[])
    prob, un, _, x, y = _setup()
    first, second = prob.removed[:20], prob.removed[20:]
    assert un.remove(_rows(x, y, first), _without(x, y, first)).passed
    tensors, meta = un.curvature_state()
    assert tensors["removed_digests"].dtype == torch.uint8 and tuple(tensors["removed_digests"].shape) == (20, 16)
    resumed = _reloaded(un, tensors, meta)
    kept = resumed.bank.clone()
    resent = torch.cat([first[10:], second])
    again = r"10 of the 30 rows of this request \(positions 0, 1, 2, .*, \.\.\.\) are identical to rows an earlier"
    for u in (un, resumed):  # refused alike, uninterrupted and resumed
        with pytest.raises(InvalidRequestError, match=again):
            u.remove(_rows(x, y, resent), _without(x, y, prob.removed))
    assert torch.equal(resumed.bank, kept)
    # the new rows alone: the resumed run lands where the uninterrupted one does
    assert un.remove(_rows(x, y, second), _without(x, y, prob.removed)).passed
    assert resumed.remove(_rows(x, y, second), _without(x, y, prob.removed)).passed
    torch.testing.assert_close(resumed.bank, un.bank, rtol=0, atol=1e-12)
    # saved again after both requests: all 40 rows' digests, the same bytes from either run
    assert torch.equal(resumed.curvature_state()[0]["removed_digests"], un.curvature_state()[0]["removed_digests"])
    assert un.curvature_state()[0]["removed_digests"].shape[0] == 40


def test_an_older_state_without_digests_loads_and_a_damaged_entry_is_refused_by_name() -> None:
    prob, un, _, x, y = _setup()
    first = prob.removed[:20]
    assert un.remove(_rows(x, y, first), _without(x, y, first)).passed
    tensors, meta = un.curvature_state()
    older = {k: v for k, v in tensors.items() if k != "removed_digests"}  # saved before stop 63: no digests
    resumed = _reloaded(un, older, meta)
    report = resumed.propose(_rows(x, y, first[:5]), _without(x, y, prob.removed[:25]))
    assert not any("earlier request removed" in p for p in report.report.problems)  # as before: nothing to compare with
    fresh = _reloaded(un, tensors, meta)
    before = fresh.curvature_state()[0]
    for bad in (
        tensors["removed_digests"].float(),
        tensors["removed_digests"][:, :8],
        torch.zeros(16, dtype=torch.uint8),
    ):
        with pytest.raises(ValueError, match=r"'removed_digests' is a .* where the removed rows' digests are a uint8"):
            fresh.load_curvature_state({**tensors, "removed_digests": bad}, meta)
    after = fresh.curvature_state()[0]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # nothing loaded
    with pytest.raises(InvalidRequestError, match="identical to rows an earlier request removed"):
        fresh.remove(_rows(x, y, first[:5]), _without(x, y, prob.removed[:25]))
