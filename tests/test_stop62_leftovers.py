"""Four leftovers of stop 61's notes (issue 11), each found by a probe of a request's cost or its warnings.

* A plain iterator too short for a request (a one-epoch generator) was refused only at the safety check's rows,
  after the removed rows' gradient and the curvature: the fewest minibatches a request reads are now read first.
* A list of minibatch tuples was joined and searched for repeated rows on every request, outside ``memory_budget``.
* A regression's integer group field drew the "emptied-label check did not run" warning on every request.
* Row digests were computed under ``torch.distributed``, where they are never compared.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import ParamSpec
from test_emptied_label import _softmax_regression

pytestmark = pytest.mark.filterwarnings("ignore:this request removes")


def _minibatches(x: torch.Tensor, y: torch.Tensor, size: int, epochs: int | None, taken: list[int]) -> Iterator:
    """Minibatches of ``size`` rows in order, for ``epochs`` passes (``None``: endless), counted in ``taken[0]``."""
    epoch = 0
    while epochs is None or epoch < epochs:
        epoch += 1
        for i in range(0, x.shape[0], size):
            taken[0] += 1
            yield x[i : i + size], y[i : i + size]


@pytest.mark.parametrize("size", [30, 7])  # 7 rows: the curvature pools further minibatches per draw
def test_a_plain_iterator_too_short_is_refused_before_the_work(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    from mcmc_unlearner import unlearner
    from mcmc_unlearner.stream import _Stream

    model, nll, log_prior, bank, x, y = _softmax_regression()
    gone = y == 3
    xk, yk = x[~gone], y[~gone]
    grads: list[int] = []
    real = unlearner.MCMCUnlearner._grad_means
    monkeypatch.setattr(unlearner.MCMCUnlearner, "_grad_means", lambda *a: grads.append(1) or real(*a))

    def make() -> MCMCUnlearner:
        return MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0, curvature_draws=4, check_rows=100)

    un, taken = make(), [0]
    before = un.bank.clone(), ParamSpec.flatten_module(model).clone()
    with pytest.raises(ValueError, match="iterator ran out"):  # 150 rows: fewer than 4 minibatches and 100 rows
        un.propose((x[gone], y[gone]), _minibatches(xk, yk, size, 1, taken), n_remaining=xk.shape[0])
    assert grads == []  # before: refused after the removed rows' gradient and the curvature's build
    assert torch.equal(un.bank, before[0]) and torch.equal(ParamSpec.flatten_module(model), before[1])
    # an endless iterator is read as without the read-ahead: the same minibatches taken, the same samples to the
    # bit, over two applied requests
    banks, reads = [], []
    for ahead in (True, False):
        if not ahead:
            monkeypatch.setattr(_Stream, "read_ahead", lambda *a: None)
        un, taken = make(), [0]
        data = _minibatches(xk, yk, size, None, taken)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for part in (slice(0, 20), slice(20, 50)):  # (the stream stands in for the remaining rows)
                un.apply(un.propose((x[gone][part], y[gone][part]), data, n_remaining=xk.shape[0]))
        banks.append(un.bank.clone())
        reads.append(taken[0])
    assert torch.equal(banks[0], banks[1]) and reads[0] == reads[1], reads
