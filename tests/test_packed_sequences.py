"""Variable-length sequences handed over packed (stop 54's probe): ``(PackedSequence, y)`` was refused with "field 0
is a PackedSequence", which named the problem but not the way out; padding to ``[B, L, F]`` and packing inside
``forward`` is accepted."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_sequence
from torch.utils.data import DataLoader, TensorDataset

from mcmc_unlearner import MCMCUnlearner

torch.set_num_threads(1)


class _PaddedLSTM(nn.Module):
    """An LSTM regressor on padded sequences ``[B, L, 2]`` (value, validity flag), packed inside ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(1, 3, batch_first=True)
        self.out = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor | nn.utils.rnn.PackedSequence) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            lengths = x[..., 1].sum(1).long().clamp(min=1)
            x = pack_padded_sequence(x[..., :1], lengths.cpu(), batch_first=True, enforce_sorted=False)
        return self.out(self.rnn(x)[1][0][-1]).squeeze(-1)


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return 0.5 * ((m(b[0]) - b[1]) / 0.5) ** 2


def _log_prior(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _problem() -> tuple[nn.Module, list[torch.Tensor], torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randn(int(n), 1, generator=g) for n in torch.randint(2, 7, (120,), generator=g)]
    y = torch.stack([s.sum() / 3 for s in seqs]) + 0.1 * torch.randn(120, generator=g)
    padded = torch.zeros(120, 6, 2)
    for i, s in enumerate(seqs):
        padded[i, : len(s), 0], padded[i, : len(s), 1] = s[:, 0], 1.0
    torch.manual_seed(0)
    model = _PaddedLSTM()
    bank = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()} for _ in range(8)]
    return model, seqs, padded, y, bank


def test_packed_sequences_are_refused_naming_the_padding_that_works() -> None:
    model, seqs, padded, y, bank = _problem()
    un = MCMCUnlearner(copy.deepcopy(model), nll=_nll, log_prior=_log_prior, bank=bank)
    before = un.bank.clone()
    fix = r"pad the sequences to one tensor \[B, L, F\].*validity channel.*pack_padded_sequence\(x, lengths"
    packed = pack_sequence(seqs[:4], enforce_sorted=False)
    with pytest.raises(
        TypeError, match=r"removed data must be a tuple of tensors .*field 0 is a PackedSequence; .*" + fix
    ):
        un.remove((packed, y[:4]), (padded[4:], y[4:]))
    with pytest.raises(TypeError, match=r"removed data is a PackedSequence, not a tuple of tensors.*" + fix):
        un.remove(packed, (padded[4:], y[4:]))  # a namedtuple of four tensors, none of them one per row

    def collate(rows: list[tuple[torch.Tensor, ...]]) -> tuple[nn.utils.rnn.PackedSequence, torch.Tensor]:
        x = torch.stack([r[0] for r in rows])
        return pack_padded_sequence(x[..., :1], x[..., 1].sum(1).long(), batch_first=True, enforce_sorted=False), (
            torch.stack([r[1] for r in rows])
        )

    loader = DataLoader(TensorDataset(padded[4:], y[4:]), batch_size=32, shuffle=True, collate_fn=collate)
    with pytest.raises(
        TypeError, match=r"remaining-data minibatch must be a tuple of tensors .*PackedSequence; .*" + fix
    ):
        un.remove((padded[:4], y[:4]), loader, n_remaining=116)
    assert torch.equal(un.bank, before)  # every refusal left the bank as it was
    # the way out the message names: the padded rows with a validity channel, packed inside forward
    assert pad_sequence(seqs[:4], batch_first=True).shape[:2] == (4, padded[:4, :, 1].sum(1).max())
    report = un.remove((padded[:4], y[:4]), (padded[4:], y[4:]))
    assert report.passed and report.n_remaining == 116 and not torch.equal(un.bank, before)
