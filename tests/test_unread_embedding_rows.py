"""The Gibbs step for embedding rows that only the removed rows read (``mcmc_unlearner.unread``, README step 6).

A tabular model with an ``nn.Embedding`` per category: a request that removes every row of one category leaves its
embedding row read by no remaining row, so under retraining the row's conditional is the prior's. Checked in closed
form against a Gaussian prior with a non-zero mean (the draws' mean and variance within Monte-Carlo tolerances of
the bank's size), every other parameter against the same request without the step (``embedding_tables`` patched to
find no table), and what is not drawn: a row a remaining row reads, a weight read outside its module, remaining data
that cannot be listed, a prior that is not Gaussian.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mcmc_unlearner.step as step_module
import mcmc_unlearner.unread as unread
from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import ParamSpec

pytestmark = pytest.mark.filterwarnings(r"ignore:this request removes \d+% of the data")

PRIOR_MEAN, PRIOR_SD = 0.3, 0.5
CATEGORIES, WIDTH = 5, 3


class _Tab(nn.Module):
    """An embedding of a categorical column beside two numeric ones, and a linear head (``outside``: every row also
    reads the embedding's row 4 through the weight itself, outside the module)."""

    def __init__(self, outside: bool = False) -> None:
        super().__init__()
        self.e = nn.Embedding(CATEGORIES, WIDTH)
        self.head = nn.Linear(WIDTH + 2, 2)
        self.outside = outside

    def forward(self, xc: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.cat([self.e(xc), xn], 1))
        if self.outside:
            out = out + 0.1 * xn[:, :1] * self.e.weight[4].sum()
        return out


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(m(b[0], b[1]), b[2], reduction="none")


def _gaussian(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((((p - PRIOR_MEAN) / PRIOR_SD) ** 2).sum() for p in m.parameters())


def _laplace_on_embedding(m: nn.Module) -> torch.Tensor:
    rest = [p for n, p in m.named_parameters() if not n.startswith("e.")]
    return -m.e.weight.abs().sum() - 0.5 * sum((p**2).sum() for p in rest)


def _problem(outside: bool = False, samples: int = 100, prior=_gaussian):
    """200 float64 rows whose category sets the label's log-odds, a short SGLD loop's ``samples`` samples from an
    initialisation whose row 4 is far from the prior (2.0, four prior sd from its mean): a chain not at
    equilibrium there, as a user's short chain is."""
    g = torch.Generator().manual_seed(0)
    n = 200
    xc = torch.arange(n) % CATEGORIES
    xn = torch.randn(n, 2, generator=g, dtype=torch.float64)
    effect = torch.tensor([-1.5, -0.5, 0.0, 0.7, 1.5], dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(effect[xc] + xn[:, 0])).long()
    torch.manual_seed(0)
    model = _Tab(outside).double()
    with torch.no_grad():
        model.e.weight[4] = 2.0
    lr, bank = 1e-3, []
    for t in range(200 + 2 * samples):
        i = torch.randint(n, (50,), generator=g)
        energy = n * _nll(model, (xc[i], xn[i], y[i])).mean() - prior(model)
        model.zero_grad()
        energy.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(-0.5 * lr * p.grad + lr**0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if t >= 200 and t % 2 == 0:
            bank.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, bank, (xc, xn, y)


def _row(index: int) -> list[int]:
    """The flat indices of the embedding's row ``index`` (the embedding's weight comes first in ``θ``)."""
    return list(range(index * WIDTH, (index + 1) * WIDTH))


def _propose(model, bank, removed, remaining, monkeypatch=None, prior=_gaussian, un_kw=None, **kw):
    un = MCMCUnlearner(model, nll=_nll, log_prior=prior, bank=bank, seed=0, **(un_kw or {}))
    if monkeypatch is None:
        return un.propose(removed, remaining, **kw)
    with monkeypatch.context() as mp:  # the same request without the step: no embedding table found
        mp.setattr(unread, "embedding_tables", lambda *_a: [])
        return un.propose(removed, remaining, **kw)


def test_a_row_only_the_removed_rows_read_is_drawn_from_the_prior_and_nothing_else_moves(monkeypatch) -> None:
    """Category 4's rows all go (and a few of category 1's, whose row the remaining rows still read). Row 4's
    entries in the 100 stored samples have the prior's mean and variance (mean within 4 sd/√S, variance within 4
    standard errors of a sample variance, 4·σ²·√(2/(S−1))), where without the step they stay near the chain's 2.0;
    every other parameter (row 1 too) of every sample and the live chain is the request's without the step, to the
    bit; the caller's bank and model are not written into; and ``info`` says which rows were drawn."""
    model, bank, (xc, xn, y) = _problem()
    gone = (xc == 4) | ((xc == 1) & (torch.arange(200) < 40))
    removed = (xc[gone], xn[gone], y[gone])
    remaining = (xc[~gone], xn[~gone], y[~gone])
    bank_before = [{k: v.clone() for k, v in s.items()} for s in bank]
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    prop = _propose(model, bank, removed, remaining)
    plain = _propose(model, bank, removed, remaining, monkeypatch)
    info = prop.report.info
    assert info["embedding_rows"] == "drawn: e.weight[4]", info.get("embedding_rows")
    assert info["embedding_rows_drawn"] == {"e.weight": [4]} and info["embedding_rows_drawn_count"] == 1
    assert "embedding_rows" not in plain.report.info
    assert info["embedding_rows_prior"]["e.weight"] == pytest.approx({"prior_sd": PRIOR_SD, "prior_mean": PRIOR_MEAN})
    S = prop.bank.shape[0]
    assert S == 100
    draws = prop.bank[:, _row(4)]
    assert ((draws.mean(0) - PRIOR_MEAN).abs() <= 4 * PRIOR_SD / math.sqrt(S)).all(), draws.mean(0)
    var_se = PRIOR_SD**2 * math.sqrt(2 / (S - 1))
    assert ((draws.var(0) - PRIOR_SD**2).abs() <= 4 * var_se).all(), draws.var(0)
    # without the step the row stays where the short chain left it, far from the prior's mean
    assert (plain.bank[:, _row(4)].mean(0) - PRIOR_MEAN).abs().min() > 0.5  # 10 of the tolerance's sd/√S
    others = [i for i in range(prop.bank.shape[1]) if i not in _row(4)]
    assert torch.equal(prop.bank[:, others], plain.bank[:, others])
    assert torch.equal(prop.live[others], plain.live[others]) and not torch.equal(prop.live, plain.live)
    assert not torch.equal(prop.bank[:, _row(1)], torch.stack([s["e.weight"][1] for s in bank]))  # row 1 moved...
    assert not prop.report.problems
    for s, t in zip(bank, bank_before):
        assert all(torch.equal(s[k], t[k]) for k in s)
    assert all(torch.equal(v, model_before[k]) for k, v in model.state_dict().items())
    # the same through a DataLoader over a TensorDataset (its rows listed without a pass) and a seed: the same draws
    loader = DataLoader(TensorDataset(*remaining), batch_size=40, shuffle=True)
    via = _propose(model, bank, removed, loader)
    assert via.report.info["embedding_rows"] == "drawn: e.weight[4]"
    again = _propose(model, bank, removed, remaining)
    assert torch.equal(again.bank, prop.bank)


def test_a_row_a_remaining_row_reads_or_read_outside_its_module_is_not_drawn(monkeypatch) -> None:
    """Removing category 4's rows but one: a remaining row reads row 4, nothing is drawn and the samples are the
    request's without the step. A model whose every row also reads row 4 through the weight itself (outside the
    module, where the forward hook does not see it): the remaining rows' NLL has a gradient along the row, so it
    is not drawn either (``embedding_rows_read_otherwise``)."""
    model, bank, (xc, xn, y) = _problem()
    gone = xc == 4
    gone[int(torch.nonzero(gone)[0])] = False
    removed, remaining = (xc[gone], xn[gone], y[gone]), (xc[~gone], xn[~gone], y[~gone])
    prop = _propose(model, bank, removed, remaining)
    plain = _propose(model, bank, removed, remaining, monkeypatch)
    assert prop.report.info["embedding_rows"].startswith("none unread")
    assert "embedding_rows_drawn" not in prop.report.info
    assert torch.equal(prop.bank, plain.bank) and torch.equal(prop.live, plain.live)

    model, bank, (xc, xn, y) = _problem(outside=True, samples=20)
    gone = xc == 4
    removed, remaining = (xc[gone], xn[gone], y[gone]), (xc[~gone], xn[~gone], y[~gone])
    prop = _propose(model, bank, removed, remaining)
    plain = _propose(model, bank, removed, remaining, monkeypatch)
    assert prop.report.info["embedding_rows"].startswith("none unread")
    assert prop.report.info["embedding_rows_read_otherwise"] == {"e.weight": [4]}
    assert torch.equal(prop.bank, plain.bank)


def test_remaining_rows_that_cannot_be_listed_are_said_unchecked_and_nothing_is_drawn(monkeypatch) -> None:
    """A plain iterator of minibatches (``n_remaining`` given): whether a remaining row reads row 4 cannot be told
    without a pass, so nothing is drawn and ``info["embedding_rows"]`` says it was not checked."""
    model, bank, (xc, xn, y) = _problem(samples=20)
    gone = xc == 4
    removed, kept = (xc[gone], xn[gone], y[gone]), (xc[~gone], xn[~gone], y[~gone])

    def stream():
        while True:
            yield from DataLoader(TensorDataset(*kept), batch_size=40, shuffle=True)

    torch.manual_seed(5)
    prop = _propose(model, bank, removed, stream(), n_remaining=int((~gone).sum()))
    torch.manual_seed(5)
    plain = _propose(model, bank, removed, stream(), monkeypatch, n_remaining=int((~gone).sum()))
    said = prop.report.info["embedding_rows"]
    assert said.startswith("not checked") and "listed" in said, said
    assert torch.equal(prop.bank, plain.bank)


def test_a_prior_that_is_not_gaussian_there_is_not_drawn_and_is_warned_about(monkeypatch) -> None:
    """A Laplace prior on the embedding: its conditional is not measurably Gaussian, so the row is not drawn (the
    samples are the request's without the step), the report says so, and a warning names the row and the fix (and
    the same condition as the report, and no deletion-service repair, which never runs on a passing request)."""
    model, bank, (xc, xn, y) = _problem(samples=20, prior=_laplace_on_embedding)
    gone = xc == 4
    removed, remaining = (xc[gone], xn[gone], y[gone]), (xc[~gone], xn[~gone], y[~gone])
    with pytest.warns(UserWarning, match=r"e\.weight\[4\].*Gaussian prior") as caught:
        prop = _propose(model, bank, removed, remaining, prior=_laplace_on_embedding)
    plain = _propose(model, bank, removed, remaining, monkeypatch, prior=_laplace_on_embedding)
    said = [str(w.message) for w in caught if "embedding row" in str(w.message)]
    # no advice that does not act: the request passes, so a deletion service's --on-failure repair never runs
    assert prop.report.passed and said and not any("repair" in w for w in said), said
    assert prop.report.info["embedding_rows"].startswith("not drawn")
    # the report and the warning name the same condition
    assert "not measurably a Gaussian independent across" in prop.report.info["embedding_rows"]
    assert all("not measurably a Gaussian independent across" in w for w in said), said
    assert prop.report.info["embedding_rows_not_drawn"] == {"e.weight": [4]}
    assert torch.equal(prop.bank, plain.bank)


def test_tables_found_are_the_trainable_untied_embeddings_and_padding_is_never_read() -> None:
    """``embedding_tables`` locates a trainable ``nn.Embedding`` in ``θ`` and leaves out a tied one (its weight is
    also an output layer's); ``rows_read`` never marks the ``padding_idx`` row."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.e = nn.Embedding(4, 2, padding_idx=0)
            self.t = nn.Embedding(4, 2)
            self.out = nn.Linear(2, 4, bias=False)
            self.out.weight = self.t.weight

    m = Tied().double()
    spec = ParamSpec.of(m)
    tables = unread.embedding_tables(m, spec)
    assert [(t.name, t.offset, t.rows, t.width, t.padding_idx) for t in tables] == [("e.weight", 6, 4, 2, 0)]
    theta = ParamSpec.flatten_module(m)
    read = unread.rows_read(tables, lambda th, x: m.e(x).sum(1), theta, (torch.tensor([0, 2, 2]),))
    assert read[0].tolist() == [False, False, True, False]
    assert tables[0].index(torch.tensor([2])).tolist() == [10, 11]


def test_the_first_moment_correction_leaves_a_drawn_row_where_the_draw_put_it() -> None:
    """Two requests under K-FAC with ``recenter_every=2``: the first removes category 4 (its row drawn), the second
    a few of category 1's rows, after which the correction is applied (4 paired draws, whatever its noise). Its
    target along row 4 is measured on the samples before the first request (row 4 at the short chain's 2.0) and
    pulled the drawn row back toward there (the bank's mean 0.318 -> 0.575); the drawn entries are excluded from it,
    so row 4 of every sample is the run's without corrections to the bit, the removed term's Monte-Carlo error
    (``recenter_removed_stderr``) leaves them out as well, and the excluded entries survive
    ``curvature_state``/``load_curvature_state``."""
    from mcmc_unlearner.data import RemovableDataset

    runs = {}
    kw = {"solver": "kfac", "likelihood": "empirical", "recenter_draws": 4}  # 4: corrected whatever its noise
    for every in (0, 2):
        model, bank, (xc, xn, y) = _problem()
        data = RemovableDataset(xc, xn, y, batch_size=50, seed=0)
        un = MCMCUnlearner(model, nll=_nll, log_prior=_gaussian, bank=bank, seed=0, **kw, recenter_every=every)
        reports = [un.forget(ids, data) for ids in (torch.nonzero(xc == 4).flatten(), torch.nonzero(xc == 1)[:10, 0])]
        assert reports[0].info["embedding_rows"] == "drawn: e.weight[4]"
        runs[every] = (un, reports)
    un, reports = runs[2]
    assert reports[1].info["recenter"] == "applied", reports[1].info.get("recenter")
    plain = runs[0][0]
    assert torch.equal(un.bank[:, _row(4)], plain.bank[:, _row(4)])
    assert not torch.equal(un.bank[:, _row(1)], plain.bank[:, _row(1)])  # the correction moved the rest
    assert un._anchor.drawn.tolist() == _row(4)
    # the removed points' term's Monte-Carlo error leaves the drawn entries out too (it held row 4's variance)
    noise = un._anchor.removed_noise
    assert noise is not None and noise.shape[0] >= 2
    left_out = float((noise.index_fill(-1, torch.tensor(_row(4)), 0.0).var(0).sum() / noise.shape[0]).sqrt())
    whole = float((noise.var(0).sum() / noise.shape[0]).sqrt())
    assert reports[1].info["recenter_removed_stderr"] == pytest.approx(left_out, rel=1e-12)
    assert whole > 1.01 * left_out, (whole, left_out)  # the drawn row's variance would have changed it
    tensors, meta = un.curvature_state()
    model, bank, _ = _problem()
    fresh = MCMCUnlearner(model, nll=_nll, log_prior=_gaussian, bank=bank, seed=0, **kw, recenter_every=2)
    fresh.load_curvature_state(tensors, meta)
    assert fresh._anchor.drawn.tolist() == _row(4)


@pytest.mark.parametrize("log_prior", [_gaussian, None], ids=["log_prior", "no_log_prior"])
def test_a_custom_energy_draws_nothing_and_says_so(monkeypatch, log_prior) -> None:
    """With ``energy=`` the posterior is ``exp(-energy)``: one weighting its Gaussian prior 16x has a conditional of
    sd 0.125 along row 4, where a draw from ``log_prior`` alone had sd 0.5. Nothing is drawn (the samples are the
    request's without the step), ``info`` says it was not checked because of the custom energy, and without a
    ``log_prior`` it does not call the prior flat and improper."""
    model, bank, (xc, xn, y) = _problem(samples=20)
    gone = xc == 4
    removed, remaining = (xc[gone], xn[gone], y[gone]), (xc[~gone], xn[~gone], y[~gone])

    def energy(m: nn.Module, b: tuple[torch.Tensor, ...], n: int) -> torch.Tensor:
        return n * _nll(m, b).mean() - 16.0 * _gaussian(m)

    def propose():
        un = MCMCUnlearner(model, nll=_nll, log_prior=log_prior, energy=energy, bank=bank, seed=0, solver="exact")
        return un.propose(removed, remaining)

    prop = propose()
    with monkeypatch.context() as mp:
        mp.setattr(unread, "embedding_tables", lambda *_a: [])
        plain = propose()
    said = prop.report.info["embedding_rows"]
    assert said.startswith("not checked: a custom energy=") and "improper" not in said, said
    assert "embedding_rows_drawn" not in prop.report.info
    assert torch.equal(prop.bank, plain.bank) and torch.equal(prop.live, plain.live)


class _Ids(nn.Embedding):
    """An embedding whose forward names its indices ``ids``."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(ids)


class _Keyword(_Tab):
    """``_Tab`` calling its embedding by keyword, ``self.e(input=xc)`` (``odd``: an ``nn.Embedding`` subclass called
    as ``self.e(ids=xc)``, where the hook finds no index tensor by position or as ``input``)."""

    def __init__(self, odd: bool = False) -> None:
        super().__init__()
        if odd:
            self.e = _Ids(CATEGORIES, WIDTH)
        self.odd = odd

    def forward(self, xc: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
        h = self.e(ids=xc) if self.odd else self.e(input=xc)
        return self.head(torch.cat([h, xn], 1))


def test_an_embedding_called_by_keyword_is_read_and_drawn_and_one_without_indices_is_not_checked(monkeypatch) -> None:
    """A model calling its embedding as ``self.e(input=xc)`` (the forward hook's positional inputs are empty): its
    row 4 is drawn as the positional model's is, the same draws to the bit. A module called with no index tensor the
    hook can find (``self.e(ids=xc)``): the request still succeeds, ``info`` says the rows were not checked, and
    nothing is drawn."""
    model, bank, (xc, xn, y) = _problem(samples=20)
    gone = xc == 4
    removed, remaining = (xc[gone], xn[gone], y[gone]), (xc[~gone], xn[~gone], y[~gone])
    by_position = _propose(model, bank, removed, remaining)
    for odd in (False, True):
        other = _Keyword(odd).double()
        other.load_state_dict(model.state_dict())
        prop = _propose(other, bank, removed, remaining)
        said = prop.report.info["embedding_rows"]
        if not odd:
            assert said == "drawn: e.weight[4]", said
            assert torch.equal(prop.bank, by_position.bank) and torch.equal(prop.live, by_position.live)
        else:
            assert said.startswith("not checked: e.weight's module was called without an index tensor"), said
            plain = _propose(other, bank, removed, remaining, monkeypatch)
            assert torch.equal(prop.bank, plain.bank) and torch.equal(prop.live, plain.live)


@pytest.mark.parametrize("given", ["tuple", "loader"])
def test_too_many_remaining_rows_are_refused_before_they_are_listed(monkeypatch, given) -> None:
    """Over ``UNREAD_MAX_ROWS`` remaining rows the draw is not checked, and that is told from the rows' count
    (a ``RemovableDataset``'s, a ``DataLoader``'s selection) before any row is copied: ``_listed_remaining`` is
    never called (it listed, and checked finite, every remaining row only for the count to refuse them)."""
    import mcmc_unlearner.unlearner as unlearner_module

    model, bank, (xc, xn, y) = _problem(samples=20)
    gone = xc == 4
    removed, kept = (xc[gone], xn[gone], y[gone]), (xc[~gone], xn[~gone], y[~gone])
    listed = []
    real = unlearner_module._listed_remaining
    monkeypatch.setattr(unlearner_module, "_listed_remaining", lambda s: listed.append(1) or real(s))
    monkeypatch.setattr(unread, "UNREAD_MAX_ROWS", 100)  # 160 rows remain
    remaining = kept if given == "tuple" else DataLoader(TensorDataset(*kept), batch_size=40, shuffle=True)
    torch.manual_seed(5)
    # the Newton gate off: where the undamped step overshoots it lists the rows for its own estimate (stop 65)
    prop = _propose(model, bank, removed, remaining, un_kw={"newton_gate": 0})
    assert prop.report.info["embedding_rows"] == "not checked: more than 100 remaining rows to read"
    assert listed == [], "the remaining rows were listed before the count refused them"
    monkeypatch.setattr(unread, "UNREAD_MAX_ROWS", 160)  # at the limit: listed and checked
    remaining = kept if given == "tuple" else DataLoader(TensorDataset(*kept), batch_size=40, shuffle=True)
    torch.manual_seed(5)
    prop = _propose(model, bank, removed, remaining, un_kw={"newton_gate": 0})
    assert prop.report.info["embedding_rows"] == "drawn: e.weight[4]" and listed == [1]


def test_a_custom_energy_is_said_not_checked_before_any_pass(monkeypatch) -> None:
    """With ``energy=`` the draw is "not checked" whatever the rows read, so no ``rows_read`` forward-hook pass
    runs (one over the removed rows and one at a stored sample ran before the answer was given)."""
    model, bank, (xc, xn, y) = _problem(samples=20)
    gone = xc == 4
    removed, remaining = (xc[gone], xn[gone], y[gone]), (xc[~gone], xn[~gone], y[~gone])
    passes = []
    real = unread.rows_read
    monkeypatch.setattr(unread, "rows_read", lambda *a, **k: passes.append(1) or real(*a, **k))

    def energy(m: nn.Module, b: tuple[torch.Tensor, ...], n: int) -> torch.Tensor:
        return n * _nll(m, b).mean() - _gaussian(m)

    un = MCMCUnlearner(model, nll=_nll, log_prior=_gaussian, energy=energy, bank=bank, seed=0, solver="exact")
    prop = un.propose(removed, remaining)
    assert prop.report.info["embedding_rows"].startswith("not checked: a custom energy=")
    assert passes == [], f"{len(passes)} rows_read pass(es) before the answer 'not checked'"
    _propose(model, bank, removed, remaining)  # without energy= the passes run (the spy sees them)
    assert len(passes) >= 2


def test_the_removed_terms_error_leaves_the_drawn_entries_out() -> None:
    """``_Anchor.removed_stderr`` with noise only along drawn entries is 0; undrawn, the same noise counts."""
    from mcmc_unlearner.unlearner import _Anchor

    g = torch.Generator().manual_seed(0)
    noise = torch.zeros(6, 5, dtype=torch.float64)
    noise[:, 1:3] = torch.randn(6, 2, generator=g, dtype=torch.float64)  # variance on entries 1 and 2 alone
    base = _Anchor(
        index=torch.arange(6),
        thetas=torch.zeros(6, 5, dtype=torch.float64),
        pair=torch.arange(2),
        removed=torch.zeros(5, dtype=torch.float64),
        removed_noise=noise,
    )
    assert base.removed_stderr() > 0.1
    assert base.drawing(torch.tensor([1, 2])).removed_stderr() == 0.0
    one = base.drawing(torch.tensor([2])).removed_stderr()
    assert one == pytest.approx(float((noise[:, 1].var() / 6).sqrt()), rel=1e-12)


class _LM(nn.Module):
    """A next-token model with a wide head: what a call saves per row is its ``[T, V]`` log-probabilities."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 4)
        self.out = nn.Linear(4, vocab)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(t)))


def test_the_unread_rows_passes_are_planned_under_the_budget_as_a_gradient_is(monkeypatch, caplog) -> None:
    """The chunks of ``rows_read`` (no-grad forward over the ``[rows, T, V]`` logits) and ``rows_with_gradient``
    (forward and backward) are planned at ``GRAD_SAVED_FACTOR`` times what a call saves beside the gradient's
    copies of the parameters, within the budget: sized at once the saved bytes (``budget // row bytes``, 204 rows
    here), a 50,000-word head's chunks took 3x the budget. A pass running past ``PROGRESS_EVERY_S`` says how far
    it got at INFO."""
    import logging

    import mcmc_unlearner.unlearner as unlearner_module

    vocab, n = 500, 300
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 300, (n, 9), generator=g)
    x[:10, 4] = 0  # token 0: read by the removed rows alone

    def nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        logits = m(b[0][:, :-1])
        return F.cross_entropy(logits.reshape(-1, vocab), b[0][:, 1:].reshape(-1), reduction="none").view(-1, 8).sum(1)

    torch.manual_seed(0)
    model = _LM(vocab)
    bank = [{k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(2)]
    chunks: dict[str, list[int]] = {"read": [], "gradient": []}
    real_read, real_grad = unread.rows_read, unread.rows_with_gradient

    def read(*a, **k):
        chunks["read"].append(a[4])
        return real_read(*a, **k)

    def grad(*a, **k):
        chunks["gradient"].append(a[5])
        return real_grad(*a, **k)

    monkeypatch.setattr(unread, "rows_read", read)
    monkeypatch.setattr(unread, "rows_with_gradient", grad)
    monkeypatch.setattr(step_module, "PROGRESS_EVERY_S", 0.0)  # the README names step.PROGRESS_EVERY_S
    budget = 8 * 2**20
    un = MCMCUnlearner(
        model, nll=nll, log_prior=_gaussian, bank=bank, seed=0, memory_budget=budget, likelihood="empirical"
    )
    with caplog.at_level(logging.INFO, logger="mcmc_unlearner"):
        prop = un.propose((x[:10],), (x[10:],))
    assert prop.report.info["embedding_rows"].startswith("drawn: emb.weight[0"), prop.report.info["embedding_rows"]
    assert len(chunks["read"]) == 3 and len(chunks["gradient"]) == 1, chunks
    row, call = un._row_bytes, un._call_bytes
    assert row >= 8 * vocab * 4  # the [T, V] log-probabilities are among what a call saves
    chunk = chunks["read"][0]
    assert all(c == chunk for c in chunks["read"] + chunks["gradient"]), chunks
    planned = unlearner_module.GRAD_SAVED_FACTOR * (row * chunk + call) + unlearner_module.GRAD_COPIES * un.spec.dim * 4
    assert planned <= budget < planned + unlearner_module.GRAD_SAVED_FACTOR * row, (planned, budget, row, chunk)
    assert 3 * chunk <= budget // row  # the one-times sizing's chunk (three times this one)
    assert prop.report.info["memory"]["planned"]["unread_embedding_rows"] == planned
    # the 290 remaining rows take several passes, their progress logged at INFO
    lines = [r for r in caplog.records if r.getMessage().startswith("embedding rows:")]
    assert any(f"{chunk} of 290 rows read in this pass" in r.getMessage() for r in lines), [
        r.getMessage() for r in lines
    ]
    assert all(r.levelno == logging.INFO for r in lines)
