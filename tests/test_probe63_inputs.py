"""Inputs stop 63's probe of a new user's usages found mishandled.

*A model that is not a module.* ``MCMCUnlearner(lambda x: net(x), ...)`` failed with Python's bare "'function' object
has no attribute 'named_parameters'"; it is refused naming ``torch.nn.Module`` and the way out.

*An nll that is NaN or inf on some rows* (a constant NaN term: the gradients stayed finite) ran the request's 24
damping trials, 2.3 s, and was refused as "the check measured nan ± nan", naming neither the rows nor the ``nll``. The
first check of ``nll`` (the removed rows, then the first remaining minibatch) now refuses it at once, naming how many
rows and which.

*An nll that writes into its batch in place* (``b[0].mul_(1.5)``, harmless in a user's loop over ``f[idx]`` copies)
was given the caller's own rows: a refused request left the removed rows scaled by 1.5² and said "the forward pass is
random ... nothing was changed". The first check now calls ``nll`` on copies and refuses a changed copy, naming the
field and the out-of-place form; the caller's rows stay as they were.

*A forward returning ``Categorical(logits=...)``* (``nll = -dist.log_prob(y)``) was read as no tensor: K-FAC fell back
to the empirical Fisher and the emptied-label check did not run (both warned); a class removal was accepted with the
class still the top prediction on 75% of its test digits (retraining 0%). Its logits are now read as a dataclass
output's are.

*Labels of another integer dtype* (``torch.from_numpy`` keeps numpy's int32) were refused with torch's "expected target
dtype to be Long or Byte, but got Int" alone; the message now names the field and ``y.long()``.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from mcmc_unlearner import MCMCUnlearner
from test_probe62_inputs import _setup, chain  # noqa: F401 (a fixture)


def _unchanged(before: list[dict], un: MCMCUnlearner) -> bool:
    return all(torch.equal(a[k], b[k]) for a, b in zip(before, un.samples()) for k in a)


def test_a_function_around_the_model_is_refused_naming_the_module(chain: tuple) -> None:  # noqa: F811
    model, nll, log_prior, bank, _, _ = _setup(chain)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module.*got function.*pass the module itself"):
        MCMCUnlearner(lambda x: model(x), nll=nll, log_prior=log_prior, bank=bank)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize(("bad", "said"), [(math.nan, "NaN"), (math.inf, r"\+inf")])
def test_an_nll_not_finite_on_removed_rows_is_refused_naming_them(chain: tuple, bad: float, said: str) -> None:  # noqa: F811
    model, nll, log_prior, bank, removed, remaining = _setup(chain)
    marked = removed[0][[2, 7], 0]  # two removed rows' first feature: the nll is not finite there

    def broken(m, b):
        hit = (b[0][:, :1] == marked).any(1)
        return nll(m, b) + torch.where(hit, bad, 0.0).to(b[0].dtype)  # a constant term: gradients stay finite

    before = [{k: v.clone() for k, v in s.items()} for s in bank]
    un = MCMCUnlearner(model, nll=broken, log_prior=log_prior, bank=bank, seed=0)
    with pytest.raises(ValueError, match=f"is {said} on 2 of the 10 removed rows \\(rows 2, 7 of the removed batch\\)"):
        un.remove(removed, remaining)
    assert _unchanged(before, un)
    # the same rows under the finite nll: accepted
    assert MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0).remove(removed, remaining).passed


def test_an_nll_nan_on_the_first_remaining_minibatch_is_refused_naming_it(chain: tuple) -> None:  # noqa: F811
    model, nll, log_prior, bank, removed, remaining = _setup(chain)
    marked = remaining[0][3, 0]

    def broken(m, b):
        return nll(m, b) + torch.where(b[0][:, 0] == marked, math.nan, 0.0).to(b[0].dtype)

    before = [{k: v.clone() for k, v in s.items()} for s in bank]
    un = MCMCUnlearner(model, nll=broken, log_prior=log_prior, bank=bank, seed=0)
    with pytest.raises(ValueError, match=r"is NaN on 1 of the \d+ rows read from the first remaining minibatch"):
        un.remove(removed, remaining)
    assert _unchanged(before, un)


@pytest.mark.parametrize("how", ["mul_", "data", "numpy"])
def test_an_nll_writing_into_its_batch_is_refused_and_the_rows_kept(chain: tuple, how: str) -> None:  # noqa: F811
    """Also a write through ``.data`` or ``.numpy()``, which leaves the tensor's version counter as it was: it was
    missed, the caller's removed rows scaled, and the request refused as a random forward pass."""
    model, nll, log_prior, bank, removed, remaining = _setup(chain)
    rows, rest = tuple(t.clone() for t in removed), tuple(t.clone() for t in remaining)

    def scaling(m, b):
        if how == "mul_":
            b[0].mul_(1.5)  # in place
        elif how == "data":
            b[0].data.mul_(1.5)
        else:
            b[0].numpy()[:] *= 1.5
        return nll(m, b)

    before = [{k: v.clone() for k, v in s.items()} for s in bank]
    un = MCMCUnlearner(model, nll=scaling, log_prior=log_prior, bank=bank, seed=0)
    with pytest.raises(ValueError, match=r"writes into field 0 of its batch in place.*x = b\[0\]\.clone\(\)"):
        un.remove(rows, rest)
    assert torch.equal(rows[0], removed[0]) and torch.equal(rest[0], remaining[0]) and _unchanged(before, un)
    # writing the values it read (a no-op clamp) changes nothing: accepted as before

    def clamping(m, b):
        b[0].clamp_(-1e9, 1e9)
        return nll(m, b)

    assert MCMCUnlearner(model, nll=clamping, log_prior=log_prior, bank=bank, seed=0).remove(rows, rest).passed


class _CategoricalHead(torch.nn.Module):
    """A softmax regression whose forward returns ``Categorical(logits=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 4).double()

    def forward(self, x: torch.Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self.lin(x))


def test_a_categorical_distribution_output_is_read_as_its_logits(chain: tuple) -> None:  # noqa: F811
    """A forward returning ``Categorical(logits=...)`` with ``nll = -dist.log_prob(y)`` gets what the same model
    returning the logits gets (the emptied-label check and its draw, the categorical likelihood), to rounding (the
    normalised logits differ by it: 1.7e-9 apart after the draw)."""
    model, nll, log_prior, bank, _, _ = _setup(chain)
    x = torch.cat([chain[4][1], chain[5][1]])  # every label; remove class 0 whole
    rows = torch.cat([chain[4][0], chain[5][0]])
    gone = x == 0
    removed, remaining = (rows[gone], x[gone]), (rows[~gone], x[~gone])
    dist_model = _CategoricalHead()
    dist_model.lin.load_state_dict(model.state_dict())
    dist_bank = [{f"lin.{k}": v for k, v in s.items()} for s in bank]
    results = []
    for m, f, b in ((model, nll, bank), (dist_model, lambda m, b: -m(b[0]).log_prob(b[1]), dist_bank)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            un = MCMCUnlearner(m, nll=f, log_prior=log_prior, bank=b, seed=0)
            report = un.remove(removed, remaining)
        assert not [w for w in caught if "did not run" in str(w.message) or "EMPIRICAL" in str(w.message)]
        results.append((report, un.samples()))
    (plain, plain_samples), (dist, dist_samples) = results
    assert dist.passed and "0" in str(dist.info.get("emptied_labels")) and dist.solver == plain.solver
    for a, b in zip(plain_samples, dist_samples):
        assert all(torch.allclose(a[k], b[f"lin.{k}"], atol=1e-7, rtol=0) for k in a)


@pytest.mark.parametrize("where", ["removed", "remaining"])
def test_int32_labels_are_refused_naming_the_cast(chain: tuple, where: str) -> None:  # noqa: F811
    model, nll, log_prior, bank, removed, remaining = _setup(chain)
    if where == "removed":
        removed = (removed[0], removed[1].to(torch.int32))
    else:
        remaining = (remaining[0], remaining[1].to(torch.int32))
    before = [{k: v.clone() for k, v in s.items()} for s in bank]
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    with pytest.raises(
        RuntimeError, match=rf"nll\(model, {where} data\) failed.*Field\(s\) \[1\] are torch\.int32.*y\.long\(\)"
    ):
        un.remove(removed, remaining)
    assert _unchanged(before, un)


def test_an_nll_not_finite_is_found_in_every_pass_of_the_check(chain: tuple) -> None:  # noqa: F811
    """Rows read in passes (a memory budget below one pass over all of them): a NaN row in any pass is refused,
    numbered in the removed batch (the last pass's values alone were read: row 1 was missed, row 30 called 19)."""
    model, nll, log_prior, bank, (xr, yr), (xk, yk) = _setup(chain)
    x, y = torch.cat([xr, xk]), torch.cat([yr, yk])
    removed, remaining = (x[:40], y[:40]), (x[40:], y[40:])
    marked = removed[0][[1, 30], 0]

    def broken(m, b):
        return nll(m, b) + torch.where((b[0][:, :1] == marked).any(1), math.nan, 0.0).to(b[0].dtype)

    before = [{k: v.clone() for k, v in s.items()} for s in bank]
    un = MCMCUnlearner(model, nll=broken, log_prior=log_prior, bank=bank, seed=0, memory_budget=60_000, solver="cg")
    assert un._check_nll_rows(removed) < 30  # passes: rows 1 and 30 not in one, row 1 not in the last
    with pytest.raises(ValueError, match=r"is NaN on 2 of the 40 removed rows \(rows 1, 30 of the removed batch\)"):
        un.remove(removed, remaining)
    assert _unchanged(before, un)


def test_an_nll_not_finite_at_the_live_parameters_alone_is_accepted(chain: tuple) -> None:  # noqa: F811
    """The request reads ``nll`` at the stored samples: live parameters that are none of them (a module beside a
    loaded bank, here its weight × 1000) where a naive ``-log(softmax(z)[y])`` is +inf on two removed rows, finite at
    every sample, were refused; the request is accepted as it was before the check, and a term that is NaN at every
    parameter is still refused."""
    model, _, log_prior, bank, removed, remaining = _setup(chain)

    def naive(m, b):
        return -torch.log(F.softmax(m(b[0]), -1).gather(1, b[1][:, None])[:, 0])

    with torch.no_grad():
        model.weight.mul_(1000)
        assert not bool(torch.isfinite(naive(model, removed)).all())  # what the check sees at the live parameters
    assert MCMCUnlearner(model, nll=naive, log_prior=log_prior, bank=bank, seed=0).remove(removed, remaining).passed
    marked = removed[0][[2], 0]

    def broken(m, b):
        return naive(m, b) + torch.where((b[0][:, :1] == marked).any(1), math.nan, 0.0).to(b[0].dtype)

    un = MCMCUnlearner(model, nll=broken, log_prior=log_prior, bank=bank, seed=0)
    with pytest.raises(
        ValueError,
        match=r"is NaN on 1 of the 10 removed rows \(rows 2 of the removed batch\) at "
        r"the model's parameters and at 4 of 4 stored samples",
    ):
        un.remove(removed, remaining)


def test_an_nll_failing_at_the_stored_samples_in_the_finite_check_is_said_and_nothing_changes(chain: tuple) -> None:  # noqa: F811
    """Where ``nll`` is not finite at the live parameters the check reads it on those rows at up to 4 stored samples;
    an ``nll`` that raises there (here one written for batches of 10 rows, given the 2 rows alone) came out as torch's
    bare "shape '[10, -1]' is invalid": now the same error type, naming the check, the rows and the fix."""
    model, nll, log_prior, bank, removed, remaining = _setup(chain)
    marked = removed[0][[2, 7], 0]

    def fixed_size(m, b):
        x = b[0].reshape(10, -1)  # the batch size it was written for
        return nll(m, (x, b[1])) + torch.where((x[:, :1] == marked).any(1), math.nan, 0.0).to(x.dtype)

    before, state = [{k: v.clone() for k, v in s.items()} for s in bank], copy.deepcopy(model.state_dict())
    un = MCMCUnlearner(model, nll=fixed_size, log_prior=log_prior, bank=bank, seed=0)
    with pytest.raises(
        RuntimeError,
        match=r"nll\(model, batch\) failed at stored sample 1 of the 4 read to check whether it is finite there, on "
        r"2 of the 10 removed rows \(rows 2, 7 of the removed batch\), where it is not finite at the model's "
        r"parameters: shape '\[10, -1\]' is invalid.*on those rows alone \(a batch of 2\).*nothing was changed",
    ):
        un.remove(removed, remaining)
    assert _unchanged(before, un)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
