"""Data and banks fed to MCMCUnlearner.remove the way users feed them (stop 32's probe; each test failed on c809a09)."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

from mcmc_unlearner import MCMCUnlearner, unlearner
from mcmc_unlearner.errors import InvalidRequestError

torch.set_num_threads(1)
nll = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
log_prior = lambda m: -0.5 * sum((p**2).sum() for p in m.parameters())  # noqa: E731


def _setup(hidden=8, n=300, S=12):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 2))
    samples = []
    for t in range(600):
        i = torch.randint(n, (50,))
        F = n * nll(model, (x[i], y[i])).mean() - log_prior(model)
        model.zero_grad()
        F.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(-0.5 * 1e-3 * p.grad + 1e-3**0.5 * torch.randn_like(p))
        if t >= 600 - 10 * S and t % 10 == 0:
            samples.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, samples, x, y


def test_a_subset_random_sampler_over_the_full_dataset_counts_the_rows_it_draws():
    """DataLoader(full, sampler=SubsetRandomSampler(keep)): n was len(full) (here twice the remaining rows)."""
    model, samples, x, y = _setup()
    keep = list(range(150, 300))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = []
    for n in (None, len(keep)):
        loader = DataLoader(
            TensorDataset(x, y), batch_size=64, sampler=SubsetRandomSampler(keep, torch.Generator().manual_seed(0))
        )
        un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=samples, solver="exact", damping=50.0)
        un.remove((x[140:150], y[140:150]), loader, n)
        out.append(un.bank)
        model.load_state_dict(state)
    assert torch.allclose(out[0], out[1], atol=1e-6)


def test_a_batch_sampler_of_the_users_own_is_not_read_as_drawing_every_row(monkeypatch):
    """DataLoader(full, batch_sampler=own batches of the remaining ids): DataLoader reports a SequentialSampler over
    the full dataset that it never uses, which was read as the sampler: n was len(full) and the emptied-label check
    read the full dataset's labels, so emptying class 0 was not seen (stop 45's probe). Since stop 69 the rows such a
    loader gives are read for the emptied label (every remaining row each pass: found, checked and drawn on); stop
    66's warning, where they are not read (``EMPTIED_STREAM_PASSES = 0``)."""
    model, samples, x, y = _setup()
    keep = (y == 1).nonzero().flatten()  # every row of class 0 is removed

    class OwnBatches:
        def __init__(self) -> None:
            self.g = torch.Generator().manual_seed(0)

        def __iter__(self):
            order = keep[torch.randperm(len(keep), generator=self.g)]
            return iter([order[i : i + 64].tolist() for i in range(0, len(order), 64)])

        def __len__(self) -> int:
            return -(-len(keep) // 64)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=samples)
    bank = un.bank.clone()
    with pytest.raises(ValueError, match=r"pass n_remaining=.*batch_sampler of its own \(OwnBatches\)"):
        un.remove((x[y == 0], y[y == 0]), DataLoader(TensorDataset(x, y), batch_sampler=OwnBatches()))

    class Subclassed(torch.utils.data.BatchSampler):  # torch's class, its own __iter__: its .sampler goes unused
        def __iter__(self):
            order = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(0))]
            return iter([order[i : i + 64].tolist() for i in range(0, len(order), 64)])

    sub = Subclassed(torch.utils.data.SequentialSampler(range(len(x))), 64, False)
    with pytest.raises(ValueError, match=r"batch_sampler of its own \(Subclassed\)"):
        un.remove((x[y == 0], y[y == 0]), DataLoader(TensorDataset(x, y), batch_sampler=sub))
    assert torch.equal(un.bank, bank) and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # the class removed whole through it is named (stop 66), and the fix named is torch's own samplers: the warning
    # said "a DataLoader over a TensorDataset", which this loader is (the once-per-unlearner note it replaces named
    # the batch_sampler)
    with monkeypatch.context() as mp:
        mp.setattr(unlearner, "EMPTIED_STREAM_PASSES", 0)
        with pytest.warns(UserWarning, match="which none of the") as caught:
            report = un.remove(
                (x[y == 0], y[y == 0]),
                DataLoader(TensorDataset(x, y), batch_sampler=OwnBatches()),
                len(keep),
                strict=False,
            )
    named = [str(w.message) for w in caught if "which none of the" in str(w.message)]
    assert len(named) == 1 and "drawing with torch's own samplers" in named[0], named
    assert report.n_remaining == len(keep)
    assert str(report.info["emptied_labels"]).startswith("not checked")  # was None: "no label emptied"
    # read for the emptied label (stop 69): its rows are every remaining row, so class 0 is checked, and not warned of
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=samples)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = un.remove(
            (x[y == 0], y[y == 0]), DataLoader(TensorDataset(x, y), batch_sampler=OwnBatches()), len(keep), strict=False
        )
    assert not [w for w in caught if "which none of the" in str(w.message)]
    assert report.info["emptied_labels_stream"].startswith(f"every remaining row: the {len(keep):,} distinct rows")
    assert isinstance(report.info["emptied_labels"], dict) and set(report.info["emptied_labels"]) == {"0"}


def test_remaining_rows_as_a_list_or_fields_of_unequal_length_are_named():
    """[x, y] was read as one-field minibatches: "pass n_remaining=", and with it "minibatches differ in shape"; a
    tuple whose y is a row short got the same two messages (stop 45's probe). The list is not taken as the tuple:
    one-field minibatches padded to their own lengths look the same."""
    model, samples, x, y = _setup()
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=samples)
    bank = un.bank.clone()
    for n in (None, 290):
        with pytest.raises(
            TypeError, match=r"list of 2 tensors of 290 rows each .* as a tuple, \(x, y\).* fixed length"
        ):
            un.remove((x[:10], y[:10]), [x[10:], y[10:]], n)
        with pytest.raises(ValueError, match=r"tuple of 2 tensors of different shapes and row counts \(290, 289\)"):
            un.remove((x[:10], y[:10]), (x[10:], y[11:]), n)
    assert torch.equal(un.bank, bank)
    assert un.remove((x[:10], y[:10]), (x[10:], y[10:])).passed  # the fix named


def test_minibatches_padded_to_their_own_length_are_refused_with_the_fix_and_nothing_changes():
    torch.manual_seed(0)
    seqs = [torch.randint(1, 9, (int(L),)) for L in torch.randint(2, 12, (200,))]
    labels = torch.tensor([int((s == 1).any()) for s in seqs])

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(9, 4), nn.Linear(4, 2)

        def forward(self, tok, mask):
            return self.out((self.emb(tok) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))

    def collate(items):
        toks = pad_sequence([t for t, _ in items], batch_first=True)
        return toks, (toks != 0).float(), torch.stack([lab for _, lab in items])

    nllv = lambda m, b: nn.functional.cross_entropy(m(b[0], b[1]), b[2], reduction="none")  # noqa: E731
    model = Bag()
    bank = torch.randn(6, sum(p.numel() for p in model.parameters())) * 0.1
    data = [(seqs[i], labels[i]) for i in range(10, 200)]
    loader = DataLoader(data, batch_size=8, shuffle=True, collate_fn=collate)  # lengths vary between minibatches
    before = bank.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    un = MCMCUnlearner(model, nll=nllv, log_prior=log_prior, bank=bank, solver="kfac")
    with pytest.raises(InvalidRequestError, match="pad every minibatch to one fixed length"):
        un.remove(collate([(seqs[i], labels[i]) for i in range(10)]), loader)
    assert torch.equal(bank, before) and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_minibatches_of_one_row_give_the_curvature_as_many_rows_as_full_minibatches():
    """A batch_size=1 DataLoader gave each curvature draw one row (16 rows in all for the dense Hessian)."""
    model, samples, x, y = _setup()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    for bs in (1, 32):
        loader = DataLoader(
            TensorDataset(x[12:], y[12:]), batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(0)
        )
        un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=samples, solver="exact", damping=20.0)
        un.remove((x[:12], y[:12]), loader)  # 288 rows: 9 minibatches of 32
        out[bs] = un.bank.clone()
        model.load_state_dict(state)
    # the same rows in the same order: pooled into draws of at least 32 rows, the two curvature estimates coincide
    assert torch.allclose(out[1], out[32], atol=1e-5)


def test_a_frozen_parameter_in_state_dicts_at_other_values_than_the_models_is_refused():
    model, samples, _x, _y = _setup()
    model[0].bias.requires_grad_(False)  # frozen at the last sample's value; the samples' values differ
    with pytest.raises(ValueError, match=r"frozen parameter '0\.bias'"):
        MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=samples)
    same = [{**sd, "0.bias": model[0].bias.detach().clone()} for sd in samples]
    MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=same)  # the model's frozen value: accepted


def test_namedtuple_batches_get_a_message_saying_batches_reach_nll_as_plain_tuples():
    from collections import namedtuple

    NT = namedtuple("NT", "x y")
    model, samples, x, y = _setup()
    un = MCMCUnlearner(model, nll=lambda m, b: nll(m, (b.x, b.y)), log_prior=log_prior, bank=samples)
    with pytest.raises(AttributeError, match="plain tuple of tensors"):
        un.remove(NT(x[:5], y[:5]), (x[5:], y[5:]))


def test_removed_rows_given_twice_or_still_in_the_remaining_data_are_warned_about():
    model, samples, x, y = _setup()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=samples)
    with pytest.warns(UserWarning, match="identical in every field to another removed row"):
        un.remove((torch.cat([x[:10]] * 2), torch.cat([y[:10]] * 2)), (x[10:], y[10:]))
    model.load_state_dict(state)
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=samples)
    with pytest.warns(UserWarning, match="identical to removed rows"):
        un.remove((x[:60], y[:60]), (x, y))
    # the count after the removal beside the rows before it: refused, naming both (stop 43; was the warning alone)
    with pytest.raises(ValueError, match=r"n_remaining=240 but the remaining rows given as a tuple are 300.*still"):
        un.remove((x[:60], y[:60]), (x, y), n_remaining=240)
    model.load_state_dict(state)
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=samples)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        un.remove((x[:10], y[:10]), (x[10:], y[10:]))  # a correct request: no warning


def _column_label_setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + torch.randn(200, generator=g)
    model = torch.nn.Linear(3, 1)
    bank = torch.randn(32, 4, generator=g) * 0.05 + torch.cat([model.weight.detach()[0], model.bias.detach()])
    un = MCMCUnlearner(
        model,
        nll=lambda m, b: 0.5 * (m(b[0]).squeeze(-1) - b[1]) ** 2,
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()),
        bank=bank,
        solver="exact",
        damping=1.0,
    )
    return x, y, un


@pytest.mark.parametrize("where", ["a later request's removed rows", "the remaining rows"])
def test_an_nll_that_broadcasts_is_refused_on_every_call(where) -> None:
    """The check that ``nll`` gives one value per row ran once, on the first request's removed rows: labels given as a
    column later broadcast ``nll`` to [B, B] and the request was applied (bank mean 0.36 off, posterior sd 0.07), and
    in the remaining rows it was never checked (0.010 off, no problem listed)."""
    x, y, un = _column_label_setup()
    if where.startswith("a later"):
        un.remove((x[195:], y[195:]), (x[:195], y[:195]), strict=False)
        removed, remaining = (x[:5], y[:5, None]), (x[5:195], y[5:195])
    else:
        removed, remaining = (x[:5], y[:5]), (x[5:], y[5:, None])
    before = un.bank.clone()
    with pytest.raises(ValueError, match="one value per row"):
        un.remove(removed, remaining, strict=False)
    assert torch.equal(un.bank, before)


def test_non_finite_rows_of_a_data_set_are_named_by_their_ids():
    """A data set with a NaN in row id 150, after ids 0-1 were removed: the remaining data's check named position
    148 among the remaining rows, which a user then dropped by id (the wrong row); removing id 150 itself said
    "row 0 of the request" (stop 43's probe of the deletion service)."""
    from mcmc_unlearner import RemovableDataset
    from mcmc_unlearner.stream import _Stream

    model, samples, x, y = _setup()
    x = x.clone()
    x[150, 2] = float("nan")
    data = RemovableDataset(x, y, batch_size=50, seed=0)
    data.remove([0, 1])
    with pytest.raises(InvalidRequestError, match=r"the remaining data: field 0 .* the rows with id\(s\) \[150\]"):
        _Stream(data, None).full()
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=samples)
    state = data.state_dict()
    with pytest.raises(InvalidRequestError, match=r"removed data: field 0 .* the rows with id\(s\) \[150\]"):
        un.forget([7, 150], data)
    assert data.state_dict().keys() == state.keys() and len(data) == 298  # nothing removed


def _markov_text(n=400, V=8, L=3):
    """A Markov chain's text as rows (the last ``L`` tokens one-hot, the next token): the chain revisits its
    states, so rows repeat by value, as in real data."""
    g = torch.Generator().manual_seed(0)
    P = torch.softmax(1.5 * torch.randn(V, V, generator=g), 1)
    s = [0]
    for _ in range(n + L):
        s.append(int(torch.multinomial(P[s[-1]], 1, generator=g)))
    s = torch.tensor(s)
    x = nn.functional.one_hot(torch.stack([s[i : i + n] for i in range(L)], 1), V).reshape(n, -1).float()
    y = s[L : L + n]
    model = nn.Linear(L * V, V)
    bank = 0.1 * torch.randn(16, (L * V + 1) * V, generator=g)
    return x, y, model, bank


@pytest.mark.parametrize("source", ["rows", "loader"])
@pytest.mark.parametrize("left_in", [False, True])
def test_removed_rows_that_merely_repeat_remaining_ones_are_noted_not_warned_about(source, left_in):
    """The warning that the remaining data still hold the removed rows fired on any removed row equal by value to a
    remaining one: on a Markov chain's text 9 of 30 removed rows (a passage) repeat rows kept elsewhere, and every
    request there was warned about. It now warns where the removed rows look left in (all 30 found), and notes the
    9 otherwise; from a loader, on the check's sample of rows."""
    from mcmc_unlearner.stream import _removed_rows_held

    x, y, model, bank = _markov_text()
    gone = torch.zeros(x.shape[0], dtype=torch.bool)
    gone[:30] = True
    kept = (x, y) if left_in else (x[~gone], y[~gone])
    assert _removed_rows_held((x[gone], y[gone]), kept) == (30 if left_in else 9)  # the case at issue
    if source == "loader":
        kept = DataLoader(TensorDataset(*kept), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0))
    un = MCMCUnlearner(model, nll=nll, log_prior=log_prior, bank=bank)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        report = un.remove((x[gone], y[gone]), kept, strict=False)
    said = [str(w.message) for w in seen if "identical to removed rows" in str(w.message)]
    assert len(said) == int(left_in), said
    noted = report.info.get("removed_rows_coinciding")
    if left_in:
        assert noted is None and ("30 of the 30" in said[0] if source == "rows" else "of the 30" in said[0])
    else:
        assert noted["removed"] == 30 and 0 < noted["rows"] <= 9
        assert noted["rows"] == 9 if source == "rows" else noted["compared"].endswith("the safety check drew")


def test_one_removed_row_is_looked_for_without_a_warning():
    """One removed row of a field wider than the hashed columns: the columns' variance had zero degrees of freedom,
    and torch warned on every such request (failing runs under ``-W error``; the review of stop 52). The row is still
    found exactly where it is held, and only there."""
    from mcmc_unlearner.stream import _removed_rows_held

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(200, 20, generator=g), torch.randint(0, 3, (200,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _removed_rows_held((x[:1], y[:1]), (x, y)) == 1
        assert _removed_rows_held((x[:1], y[:1]), (x[1:], y[1:])) == 0


def _integer_nll_unlearner(model: nn.Module, dtype: torch.dtype, monkeypatch) -> tuple:
    """An unlearner whose ``nll`` is a 0-1 error count in ``dtype`` over a bank of 6 perturbed copies of ``model``
    (its buffers kept), its request work replaced by a failure; returns it, the rows and a copy of its samples."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4, generator=g)
    y = (x[:, 0] > 0).long()
    buffers = {k for k, _ in model.named_buffers()}
    bank = [
        {k: v if k in buffers else v + 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
        for _ in range(6)
    ]
    un = MCMCUnlearner(
        model,
        nll=lambda m, b: (m(b[0]).argmax(-1) != b[1]).to(dtype),
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()),
        bank=bank,
    )

    def no_work(*args, **kwargs):
        raise AssertionError("the request started its work")

    monkeypatch.setattr(un, "_propose", no_work)
    return un, x, y, [{k: v.clone() for k, v in s.items()} for s in un.samples()]


@pytest.mark.parametrize("dtype", [torch.long, torch.bool])
def test_an_nll_returning_integers_is_refused_before_any_work(dtype, monkeypatch) -> None:
    """Stop 60's probe: an ``nll`` returning a 0-1 error count as ``long`` crashed inside the safety check, after the
    request's work, with torch's raw "torch.finfo() requires a floating point input type"; now refused by the first
    check of ``nll``, naming the fix, nothing changed."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    un, x, y, before = _integer_nll_unlearner(model, dtype, monkeypatch)
    with pytest.raises(TypeError, match=rf"must return floating-point values .*got {dtype}.*reduction='none'"):
        un.remove((x[:8], y[:8]), (x[8:], y[8:]))
    assert not un.history
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, un.samples()) for k in a)


class _Scaled(nn.Module):
    """A fixed input scaling kept as a buffer (as a positional encoding is)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.full((4,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_an_nll_returning_integers_is_refused_for_a_model_in_training_mode_with_a_buffer(monkeypatch) -> None:
    """A model left in training mode (the default) with a buffer skips the per-request check of ``nll`` (its buffers
    are checked by two passes instead), and the integer refusal with it: the request ran its work and crashed with
    torch's raw "torch.finfo() requires a floating point input type" (3.6 s). Now refused there too, on every
    request, nothing changed."""
    model = nn.Sequential(_Scaled(), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    assert model.training
    un, x, y, before = _integer_nll_unlearner(model, torch.long, monkeypatch)
    for _ in range(2):
        with pytest.raises(TypeError, match=r"must return floating-point values .*got torch\.int64 on these 8 removed"):
            un.remove((x[:8], y[:8]), (x[8:], y[8:]))
    assert not un.history
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, un.samples()) for k in a)


def test_repeated_rows_of_a_complex_field_are_counted() -> None:
    """A complex field's rows are compared as their real and imaginary parts: torch.unique(dim=0) has no complex
    kernel, and counting a request's repeated removed rows (or a minibatch list's) raised NotImplementedError."""
    from mcmc_unlearner.stream import _repeated_rows

    z = torch.randn(50, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    z[1], z[5] = z[0], z[0].conj()  # a conjugate differs
    y = torch.arange(50) % 2
    assert _repeated_rows((z,)) == 1 and _repeated_rows((z, y)) == 0 and _repeated_rows((z[:2], y[:2] * 0)) == 1
    assert _repeated_rows((z[:10],), (z[10:],)) == 0 and _repeated_rows((z[:10],), (z[:3],)) == 3
