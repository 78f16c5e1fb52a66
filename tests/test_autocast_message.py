"""Under ``torch.autocast(bfloat16)`` a CG request was refused with advice to raise ``iter_T`` (no number of
iterations reaches the tolerance in bfloat16): the refusal now names autocast and the fix, which works."""

import pytest
import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner, QualityError, RemovableDataset

torch.set_num_threads(1)


def _setup(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(80, 4)
    y = (x[:, 0] > 0).long()
    d = sum(p.numel() for p in model.parameters())
    bank = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) + 0.01 * torch.randn(8, d)
    un = MCMCUnlearner(
        model,
        nll=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"),
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()),
        bank=bank,
        solver="cg",
        **kw,
    )
    return un, RemovableDataset(x, y, batch_size=20, seed=0)


def test_cg_under_autocast_names_autocast_and_its_fix_works():
    un, data = _setup()
    bank = un.bank.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(QualityError) as err:
            un.forget([1, 2], data)
        msg = str(err.value)
        assert "torch.autocast (cpu bfloat16)" in msg and "iter_T" not in msg  # old: "raise iter_T, ..."
        assert torch.equal(un.bank, bank) and len(data) == 80
        with torch.autocast("cpu", enabled=False):  # the fix the message names
            inside = un.forget([1, 2], data)
    ref, ref_data = _setup()
    outside = ref.forget([1, 2], ref_data)
    assert inside.passed and "autocast" not in inside.info
    assert torch.equal(un.bank, ref.bank) and inside.damping == outside.damping


def test_cg_without_autocast_still_advises_iter_t():
    # too few iterations, no preconditioner: the solve stops short for a reason iter_T fixes
    un, data = _setup(iter_T=2, precondition_rank=0)
    with pytest.raises(QualityError, match=r"raise iter_T"):
        un.forget([1, 2], data)
