"""Four leftovers of stop 61's notes (issue 11), each found by a probe of a request's cost or its warnings.

* A plain iterator too short for a request (a one-epoch generator) was refused only at the safety check's rows,
  after the removed rows' gradient and the curvature: the fewest minibatches a request reads are now read first.
* A list of minibatch tuples was joined and searched for repeated rows on every request, outside ``memory_budget``.
* A regression's integer group field drew the "emptied-label check did not run" warning on every request.
* Row digests were computed under ``torch.distributed``, where they are never compared.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import pytest
import torch

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.errors import SolverDivergedError
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


def test_row_digests_are_computed_only_where_they_are_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    # under torch.distributed a row sent again is not looked for (a refusal on one rank would leave the others
    # waiting): its digests were computed on every request anyway and never compared (0.06 s per 6,000 x 784 rows)
    from mcmc_unlearner import unlearner
    from mcmc_unlearner.distributed import DistributedUnlearner, ShardedDataset
    from mcmc_unlearner.errors import InvalidRequestError

    model, nll, log_prior, bank, x, y = _softmax_regression()
    hashed: list[int] = []
    real = unlearner._row_digests
    monkeypatch.setattr(unlearner, "_row_digests", lambda b: hashed.append(int(b[0].shape[0])) or real(b))
    shard = ShardedDataset.from_global(x, y, rank=0, world=1, batch_size=32)  # one process, no process group
    dist_un = DistributedUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    dist_un.forget(torch.arange(10), shard)
    assert hashed == [] and dist_un._removed_digests == set()
    # single-process: computed, kept once applied, and a row sent again refused (remove(): strict)
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    un.apply(un.propose((x[:10], y[:10]), (x[10:], y[10:])))
    assert hashed == [10] and len(un._removed_digests) == 10
    with pytest.raises(InvalidRequestError, match="1 of the 2 rows of this request"):
        un.remove((x[9:11], y[9:11]), (x[11:], y[11:]))


def _laplace_nll(m: torch.nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return (m(b[0]).squeeze(-1) - b[1]).abs()  # no likelihood the library recognises: read as an empirical loss


def _focal_nll(m: torch.nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    ce = torch.nn.functional.cross_entropy(m(b[0]), b[-1], reduction="none")
    return b[1] * (1 - torch.exp(-ce)) ** 2 * ce  # a weighted focal loss, labels in the last field


def test_the_later_label_warning_needs_a_field_that_can_be_the_models_classes() -> None:
    # (x, t, site): a regression with an integer group field (5 sites) and an unrecognised nll was told on every
    # request removing a site that "the emptied-label check did not run", to move batch[2] into batch[1]: the model
    # has one output, which no site above 1 indexes, so the check could not run on them wherever they were
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g, dtype=torch.float64)
    site = torch.arange(200) % 5
    t = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.1 * torch.randn(
        200, generator=g, dtype=torch.float64
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    bank = [
        {k: v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in model.state_dict().items()}
        for _ in range(8)
    ]
    gone = site == 2
    un = MCMCUnlearner(model, nll=_laplace_nll, bank=bank, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = un.propose((x[gone], t[gone], site[gone]), (x[~gone], t[~gone], site[~gone])).report
    assert not [w for w in caught if "emptied-label check did not run" in str(w.message)]
    assert "emptied_labels" not in report.info, report.info.get("emptied_labels")
    # the other side: (x, w, y), a weighted focal loss on a 4-class softmax regression, a class's last rows removed:
    # the labels in batch[2] index the model's 4 outputs, and the warning still names the field to move
    model, _, log_prior, bank, x, y = _softmax_regression()
    w = torch.ones(200, dtype=torch.float64)
    gone = y == 3
    un = MCMCUnlearner(model, nll=_focal_nll, log_prior=log_prior, bank=bank, seed=0)
    with pytest.warns(UserWarning, match=r"emptied-label check did not run .*batch\[2\] is \[3\]"):
        report = un.propose((x[gone], w[gone], y[gone]), (x[~gone], w[~gone], y[~gone])).report
    assert report.info["emptied_labels"].startswith("not checked: the check reads class labels from batch[1]")


def test_the_hashed_search_counts_repeated_rows_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    from mcmc_unlearner import stream
    from mcmc_unlearner.stream import _repeated_rows, _repeated_rows_hashed

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 40, generator=g)
    z = torch.randn(300, 2, generator=g, dtype=torch.complex64)
    y = torch.randint(0, 3, (300,), generator=g)
    x[7], z[7], y[7] = x[3], z[3], y[3]  # a row repeated in every field
    x[8], z[8] = x[4], z[4]  # equal but for y: not repeated, unless y[8] == y[4]
    x[5, 0], x[6] = 0.0, x[5]
    x[6, 0] = -0.0  # equal by value (-0.0 == 0.0)
    z[6], y[6] = z[5], y[5]
    cases = [(x, z, y), (x, y), (x,), (x[150:].repeat(2, 1),), (x[:1],)]
    expected = [_repeated_rows(rows) for rows in cases]
    assert expected[0] == 2 + int(y[8] == y[4]) and expected[3] == 150  # (the reference itself)
    assert [_repeated_rows_hashed(rows) for rows in cases] == expected
    # every row sharing every hash (collisions everywhere): still exact
    monkeypatch.setattr(stream, "_row_hashes", lambda t: torch.zeros(t.shape[0], dtype=torch.int64))
    assert [_repeated_rows_hashed(rows) for rows in cases] == expected


def test_a_list_of_minibatches_is_joined_once_while_it_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    # the list was joined and searched for repeated rows on every request (60,000 x 784 floats: 0.7-0.85 CPU s and
    # 370 MiB beside the copy, outside memory_budget): now kept while the list, its tensors and their _version
    # counters are unchanged, the same samples to the bit as the tuple (x, y)
    from mcmc_unlearner import stream

    model, nll, log_prior, bank, x, y = _softmax_regression()
    gone = y == 3
    xk, yk = x[~gone].clone(), y[~gone].clone()
    as_list = [(xk[i : i + 40].clone(), yk[i : i + 40].clone()) for i in range(0, xk.shape[0], 40)]
    joins: list[int] = []
    real = stream._repeated_rows_hashed
    monkeypatch.setattr(stream, "_repeated_rows_hashed", lambda rows: joins.append(1) or real(rows))
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    removed = (x[gone], y[gone])

    def same_as_tuple(rows: tuple[torch.Tensor, torch.Tensor]) -> bool:
        ref = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0).propose(removed, rows).bank
        return torch.equal(un.propose(removed, as_list).bank, ref)

    assert same_as_tuple((xk, yk)) and len(joins) == 1
    assert same_as_tuple((xk, yk)) and len(joins) == 1  # the list unchanged: not joined again
    as_list[1][0][0, 0] += 1.0  # an in-place write (its _version advances): joined again, the new value read
    xk[40, 0] += 1.0
    assert same_as_tuple((xk, yk)) and len(joins) == 2
    as_list[2] = (as_list[2][0].clone(), as_list[2][1])  # another tensor (equal values): joined again
    assert same_as_tuple((xk, yk)) and len(joins) == 3
    as_list.append((x[gone][:5], y[gone][:5]))  # another minibatch: joined again, its rows read
    assert same_as_tuple((torch.cat([xk, x[gone][:5]]), torch.cat([yk, y[gone][:5]]))) and len(joins) == 4


def test_joining_a_list_is_planned_within_the_memory_budget() -> None:
    from mcmc_unlearner.stream import _Stream

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 300, generator=g), torch.randint(0, 5, (2000,), generator=g)
    as_list = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 2000, 100)]
    with pytest.raises(MemoryError, match=r"list of 20 minibatches holding 2,000 rows: .*pass n_remaining=2000"):
        _Stream(as_list, None, budget=3 * 2**20)  # the copy alone 2.4 MB, with the search over 3 MiB
    data = _Stream(as_list, 2000, budget=3 * 2**20)  # n_remaining= given: read as minibatches, nothing copied
    assert not data.from_rows and data.n == 2000 and next(data)[0] is as_list[0][0]
    assert _Stream(as_list, None, budget=2**30).from_rows  # within the budget: the rows it joins


def _one_buffer(x: torch.Tensor, y: torch.Tensor, size: int) -> Iterator:
    """Endless minibatches of ``size`` rows in order, every one written into the same two tensors (a loader that
    reuses its output buffer): a minibatch is valid until the next is read."""
    bx, by = x[:size].clone(), y[:size].clone()
    while True:
        for i in range(0, x.shape[0] - size + 1, size):
            bx.copy_(x[i : i + size])
            by.copy_(y[i : i + size])
            yield bx, by


def test_the_read_ahead_keeps_minibatches_an_iterator_writes_over(monkeypatch: pytest.MonkeyPatch) -> None:
    # the read-ahead holds the curvature's minibatch while it reads the check's: an iterator writing each minibatch
    # into one buffer gave the curvature the check's rows (samples moved by up to 4.1 against the same iterator
    # without the read-ahead, which reads one minibatch before using it here)
    from mcmc_unlearner.stream import _Stream

    model, nll, log_prior, bank, x, y = _softmax_regression()
    gone = y == 3
    xk, yk = x[~gone], y[~gone]
    banks = []
    for ahead in (True, False):
        if not ahead:
            monkeypatch.setattr(_Stream, "read_ahead", lambda *a: None)
        for solver in ("kfac", "cg"):
            un = MCMCUnlearner(
                model, nll=nll, log_prior=log_prior, bank=bank, seed=0, solver=solver, curvature_draws=1, check_rows=50
            )
            data = _one_buffer(xk, yk, 75)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for part in (slice(0, 20), slice(20, 50)):
                    un.apply(un.propose((x[gone][part], y[gone][part]), data, n_remaining=xk.shape[0]))
            banks.append(un.bank.clone())
    assert torch.equal(banks[0], banks[2]) and torch.equal(banks[1], banks[3])


def test_a_memory_refusal_before_the_work_reads_nothing_ahead() -> None:
    # the read-ahead ran before the request's memory refusals ("nothing was changed"): one refused for solver='cg'
    # took 22 minibatches of a plain iterator, against the one it peeks before (which the refusal keeps as before)
    model, nll, log_prior, bank, x, y = _softmax_regression()
    gone = y == 3
    xk, yk = x[~gone], y[~gone]
    un, taken = (
        MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0, solver="cg", memory_budget=2000),
        [0],
    )
    with pytest.raises(MemoryError, match="solver='cg': one Hessian-vector product"):
        un.propose((x[gone][:10], y[gone][:10]), _minibatches(xk, yk, 30, None, taken), n_remaining=xk.shape[0])
    assert taken[0] == 1


def test_a_non_finite_gradient_refusal_leaves_the_minibatches_read_ahead_to_the_next_request() -> None:
    # the read-ahead runs before the removed rows' gradient (a fresh process's first torch.func transform: 1.1 s),
    # whose non-finite refusal says "nothing was changed": it took 24 minibatches of a plain iterator (the one
    # peeked, 1, before the read-ahead). They are read first by the next request reading that iterator: the refused
    # request then the next one read the iterator and move the samples as the next one alone (stop 62's review)
    torch.manual_seed(0)
    x = torch.randn(600, 3)
    y = x @ torch.tensor([1.0, -1.0, 0.5]) + 0.1 * torch.randn(600)
    w = torch.randn(1, 3)

    def nll(m: torch.nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.sqrt((m(b[0]).squeeze(-1) - b[1]) ** 2)  # 0/0 in its gradient at a residual of 0

    bank = w.flatten()[None] + 0.01 * torch.randn(16, 3, generator=torch.Generator().manual_seed(1))

    def make() -> MCMCUnlearner:
        model = torch.nn.Linear(3, 1, bias=False)
        model.weight.data.copy_(w)
        return MCMCUnlearner(model, nll=nll, bank=bank.clone(), solver="cg", seed=0)

    def refuse(un: MCMCUnlearner, data: Iterator) -> None:
        with pytest.raises(SolverDivergedError, match="not finite"):
            un.propose((torch.zeros(2, 3), torch.zeros(2)), data, n_remaining=600)

    _refused_then_applied(make, lambda taken: _minibatches(x, y, 32, None, taken), refuse, (x[:5], y[:5]), 595)


def _refused_then_applied(
    make: Callable[[], MCMCUnlearner],
    data: Callable[[list[int]], Iterator],
    refuse: Callable[[MCMCUnlearner, Iterator], None],
    removed: tuple[torch.Tensor, ...],
    n: int,
) -> None:
    """A refused request (``refuse(un, iterator)``, which raises) then the request for ``removed`` applied, both
    reading one plain iterator ``data(taken)`` (minibatches counted in ``taken[0]``), against that request alone on
    a fresh unlearner ``make()`` and iterator: the refusal leaves the samples as they were, and the two read the
    iterator as far and move the samples to the bit alike (nothing the refused request read is lost)."""
    banks, reads = [], []
    for refused_first in (True, False):
        un, taken = make(), [0]
        start, stream = un.bank.clone(), data(taken)
        if refused_first:
            refuse(un, stream)
            assert torch.equal(un.bank, start)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            un.apply(un.propose(removed, stream, n_remaining=n))
        banks.append(un.bank.clone())
        reads.append(taken[0])
    assert reads[0] == reads[1] and torch.equal(banks[0], banks[1]), reads
    assert not torch.equal(banks[1], start)  # the request moved the samples


def test_a_list_of_inference_tensors_is_read_as_its_rows() -> None:
    # minibatches made under torch.inference_mode have no _version counter: the list's cache key raised
    # "Inference tensors do not track version counter" on a list read as its rows before (stop 61) the cache
    model, nll, log_prior, bank, x, y = _softmax_regression()
    gone = y == 3
    xk, yk = x[~gone], y[~gone]
    with torch.inference_mode():
        as_list = [(xk[i : i + 40].clone(), yk[i : i + 40].clone()) for i in range(0, xk.shape[0], 40)]
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    ref = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0).propose((x[gone], y[gone]), (xk, yk))
    for _ in range(2):  # joined, then kept
        assert torch.equal(un.propose((x[gone], y[gone]), as_list).bank, ref.bank)


def test_a_kept_list_is_compared_with_its_rows_by_value() -> None:
    # the list's rows were kept while its tensors' _version counters stood still: a write the counter does not see
    # (into the numpy array under torch.from_numpy, through .data, through another tensor on the same storage) was
    # read as the rows kept before it, the samples those of the old values
    model, nll, log_prior, bank, x, y = _softmax_regression()
    gone = y == 3
    removed = (x[gone], y[gone])
    xn, yk = x[~gone].numpy().copy(), y[~gone]
    as_list = [(torch.from_numpy(xn[i : i + 40]), yk[i : i + 40]) for i in range(0, xn.shape[0], 40)]
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    un.propose(removed, as_list)
    writes = [
        lambda: xn.__setitem__((45, 0), xn[45, 0] + 3.0),
        lambda: as_list[2][0].data[5, 1].add_(3.0),
        lambda: torch.empty(0, dtype=torch.float64).set_(as_list[0][0].untyped_storage(), 0, (40, 3))[7, 2].add_(3.0),
    ]
    for write in writes:
        version = as_list[1][0]._version, as_list[2][0]._version, as_list[0][0]._version
        write()
        assert (as_list[1][0]._version, as_list[2][0]._version, as_list[0][0]._version) == version  # unseen
        ref = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
        assert torch.equal(un.propose(removed, as_list).bank, ref.propose(removed, (torch.from_numpy(xn), yk)).bank)


def test_a_changed_list_lets_the_old_copy_go_before_joining(monkeypatch: pytest.MonkeyPatch) -> None:
    # the copy kept for the list was held while a changed list was joined: two copies at once where the plan
    # (memory_budget) counts one
    from mcmc_unlearner import stream
    from mcmc_unlearner.stream import _JoinedList, _Stream

    x, y = torch.randn(200, 5), torch.randint(0, 3, (200,))
    as_list = [(x[i : i + 50].clone(), y[i : i + 50].clone()) for i in range(0, 200, 50)]
    kept = _JoinedList()
    _Stream(as_list, None, budget=2**30, joined=kept)
    first = kept.rows
    assert first is not None
    held: list[bool] = []
    real = stream._concat
    monkeypatch.setattr(stream, "_concat", lambda parts: held.append(kept.rows is not None) or real(parts))
    as_list[0][0][0, 0] += 1.0
    assert _Stream(as_list, None, budget=2**30, joined=kept).given[0][0, 0] == as_list[0][0][0, 0]
    assert held == [False] and kept.rows is not first


def test_a_list_copy_is_not_kept_past_the_lists_use() -> None:
    # a list's joined copy (188 MB for 60,000 x 784 floats) stayed held by the unlearner after later requests read
    # other sources (a tuple, a DataLoader), outside memory_budget, for as long as the unlearner lived
    model, nll, log_prior, bank, x, y = _softmax_regression()
    gone = y == 3
    xk, yk = x[~gone], y[~gone]
    as_list = [(xk[i : i + 40].clone(), yk[i : i + 40].clone()) for i in range(0, xk.shape[0], 40)]
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    un.propose((x[gone], y[gone]), as_list)
    assert un._joined.rows is not None
    un.propose((x[gone], y[gone]), (xk, yk))
    assert un._joined.rows is None
