"""Data without labels (an autoencoder's): the remaining rows as a one-field tuple ``(x,)`` (stop 54's probe).

Before, ``remove((x[:20],), (x[20:],))`` raised "pass n_remaining= ... it cannot be read from a tuple"; with
``n_remaining=`` the tuple was one minibatch of every row repeated, and ``report.info["recenter"]`` told the caller to
pass the rows as a tuple, which they had done.
"""

import copy

import pytest
import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner, RemovableDataset

torch.set_num_threads(1)


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return 0.5 * ((m(b[0]) - b[0]) ** 2).sum(1)


def _log_prior(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _autoencoder() -> tuple[nn.Module, torch.Tensor, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    torch.manual_seed(0)
    ae = nn.Sequential(nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 8))
    bank = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in ae.state_dict().items()} for _ in range(12)]
    return ae, x, bank


def test_a_one_field_tuple_is_read_as_the_rows_as_a_removable_dataset_of_them_is() -> None:
    ae, x, bank = _autoencoder()
    banks = []
    for remaining in ((x[20:],), RemovableDataset(x[20:], batch_size=128, seed=0)):
        un = MCMCUnlearner(copy.deepcopy(ae), nll=_nll, log_prior=_log_prior, bank=bank, recenter_every=1)
        report = un.remove((x[:20],), remaining)  # was "pass n_remaining= ... cannot be read from a tuple"
        assert report.passed and report.n_remaining == 580
        assert report.info["recenter"] != "off" and not str(report.info["recenter"]).startswith("off")
        banks.append(un.bank)
    assert torch.equal(banks[0], banks[1])
    # n_remaining= equal to the row count reads the same; another count is refused, as it is for (x, y)
    un = MCMCUnlearner(copy.deepcopy(ae), nll=_nll, log_prior=_log_prior, bank=bank, recenter_every=1)
    before = un.bank.clone()
    with pytest.raises(ValueError, match=r"n_remaining=1000 but the remaining rows given as a tuple are 580"):
        un.remove((x[:20],), (x[20:],), n_remaining=1000)
    assert torch.equal(un.bank, before)
    assert un.remove((x[:20],), (x[20:],), n_remaining=580).passed
    assert torch.equal(un.bank, banks[0])


def test_one_field_data_through_forget_and_the_messages_name_what_was_not_done() -> None:
    ae, x, bank = _autoencoder()
    un = MCMCUnlearner(copy.deepcopy(ae), nll=_nll, log_prior=_log_prior, bank=bank, recenter_every=1)
    with pytest.raises(TypeError, match=r"RemovableDataset\(x, batch_size=64\) for data without labels"):
        un.forget(torch.arange(20), (x,))
    data = RemovableDataset(x, batch_size=128, seed=0)
    assert un.forget(torch.arange(20), data).passed and len(data) == 580
    # two tensors of one shape stay one-field minibatches; the recentring, off, no longer says "pass a tuple"
    un = MCMCUnlearner(copy.deepcopy(ae), nll=_nll, log_prior=_log_prior, bank=bank, recenter_every=1)
    report = un.remove((x[:20],), (x[20:310], x[310:]), n_remaining=580)
    why = report.info["recenter"]
    assert why.startswith("off: the remaining data cannot list its rows: a tuple of 2 tensors of one shape is read")
    assert "RemovableDataset(x, y, batch_size=128)" in why and "(x,)" in why
    assert "pass them as a tuple" not in why


def test_a_remaining_tuple_of_one_shape_is_refused_before_any_forward_pass(monkeypatch) -> None:
    """``(x, y)`` of one shape as the remaining rows is refused from its form alone, before the removed rows' nll
    and forward checks run (they ran first: 3.3 s and 623 MiB into a request on a 16.8M-parameter Linear)."""
    ae, x, bank = _autoencoder()
    un = MCMCUnlearner(copy.deepcopy(ae), nll=_nll, log_prior=_log_prior, bank=bank)
    ran = []
    for name in ("_check_nll", "_check_forward", "_take_cg_if_read_outside"):
        real = getattr(un, name)
        monkeypatch.setattr(un, name, lambda *a, _n=name, _r=real, **k: ran.append(_n) or _r(*a, **k))
    before = un.bank.clone()
    with pytest.raises(ValueError, match=r"a tuple of 2 tensors of one shape"):
        un.remove((x[:20],), (x[20:310], x[310:]))
    assert ran == [], ran
    assert torch.equal(un.bank, before)
    assert un.remove((x[:20],), (x[20:],)).passed and "_check_forward" in ran  # the checks still run
