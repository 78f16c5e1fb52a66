"""Embedding flags, recurrent dropout and token-id tuples: what tabular and sequence models bring (stop 33's probe)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner, RemovableDataset


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")


def _lp(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


@pytest.mark.parametrize("solver", ["exact", "kfac", "cg"])
@pytest.mark.parametrize("flag", ["sparse", "scale_grad_by_freq"])
def test_embedding_gradient_flags_do_not_change_the_removal(solver: str, flag: str) -> None:
    """Neither flag changes the function: ``sparse=True`` crashed every request ("reshape is not implemented for
    sparse tensors"), ``scale_grad_by_freq=True`` divided each row's gradient by its token's count, which is not the
    gradient of ``nll`` (the exact shift at cosine 0.58 to the right one, no problem listed). The removal must equal
    the one with the flag off, and the flag be left as the user set it."""
    torch.manual_seed(0)
    x = torch.randint(10, (120, 4))
    y = ((x < 3).sum(1) > 1).long()
    model = nn.Sequential(nn.Embedding(10, 3), nn.Flatten(), nn.Linear(12, 2)).eval()
    bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(12)]
    shifts = []
    for on in (False, True):
        setattr(model[0], flag, on)
        un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, solver=solver, damping=50.0, bank_shift="mean")
        un.remove((x[:6], y[:6]), (x[6:], y[6:]))
        assert getattr(model[0], flag) is on
        shifts.append(torch.cat([s["0.weight"].reshape(-1) for s in un.samples()]))
    torch.testing.assert_close(shifts[1], shifts[0], rtol=1e-5, atol=1e-6)


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.rnn = cell(3, 3, num_layers=2, dropout=0.5, batch_first=True)
        self.out = nn.Linear(3, 2)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        o, _ = self.rnn(self.emb(t))
        return self.out(o[:, -1])


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM, nn.RNN])
def test_recurrent_dropout_in_training_mode_is_refused(cell: type[nn.RNNBase]) -> None:
    """A stacked GRU/LSTM/RNN with ``dropout > 0`` in training mode draws a fresh mask between layers at every
    forward pass, as ``nn.Dropout`` does (refused in training mode): it was accepted, and a request "passed" at a
    damping 4e6x the mean curvature with a shift of 3e-7 (0.077 in eval mode)."""
    model = _Recurrent(cell)
    with pytest.raises(ValueError, match="dropout"):
        MCMCUnlearner(model, nll=_nll, log_prior=_lp)
    MCMCUnlearner(model.eval(), nll=_nll, log_prior=_lp)  # eval mode: accepted


def test_token_id_rows_of_one_shape_get_a_message_that_works() -> None:
    """``remove(rows, (x[keep], y[keep]))`` with ids and labels of one shape is read as one-field minibatches: the
    message said "pass n_remaining=", and doing so crashed with an IndexError inside the user's ``nll``."""
    torch.manual_seed(0)
    x = torch.randint(10, (100,))
    y = x % 2
    model = nn.Sequential(nn.Embedding(10, 3), nn.Linear(3, 2))
    bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(8)]
    un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank)
    with pytest.raises(ValueError, match=r"one-field minibatches.*RemovableDataset"):
        un.remove((x[:5], y[:5]), (x[5:], y[5:]))
    assert un.remove((x[:5], y[:5]), RemovableDataset(x[5:], y[5:], batch_size=95, seed=0)).passed


class _FunctionalBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table, self.fc = nn.Parameter(0.3 * torch.randn(12, 4)), nn.Linear(4, 2)

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(nn.functional.embedding_bag(i, self.table, mode="sum")))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's vmap fallback for embedding_bag
@pytest.mark.parametrize("solver", ["auto", "kfac"])
def test_an_operation_torch_cannot_differentiate_twice_is_named_with_the_way_out(solver: str) -> None:
    """``F.embedding_bag`` on a trainable weight (construction cannot see it: the nn.EmbeddingBag module is refused
    there) failed inside the request with torch's "the derivative for '_embedding_bag_backward' is not implemented";
    the request now says what it is and how to get round it, and leaves the bank as it was."""
    torch.manual_seed(0)
    model = _FunctionalBag()
    x, y = torch.randint(12, (60, 3)), torch.randint(2, (60,))
    bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(8)]
    un = MCMCUnlearner(model, nll=_nll, log_prior=_lp, bank=bank, solver=solver)
    before = un.bank.clone()
    with pytest.raises(
        ValueError, match=r"cannot differentiate a second time \(_embedding_bag_backward\).*F\.embedding"
    ):
        un.remove((x[:4], y[:4]), (x[4:], y[4:]))
    assert torch.equal(un.bank, before)
