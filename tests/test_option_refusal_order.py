"""A bad option is refused before the model's bank is read (copying a large bank took 1-2 s before the refusal)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner


class _Untouched(list):
    """A bank (one state_dict) that records whether the unlearner read it."""

    read = False

    def __iter__(self):
        type(self).read = True
        return super().__iter__()

    def __getitem__(self, i):
        type(self).read = True
        return super().__getitem__(i)

    def __len__(self):
        type(self).read = True
        return super().__len__()


BAD = [
    ({"solver": "nosuch"}, "solver must be one of"),
    ({"damping": -1.0}, "damping must be"),
    ({"memory_budget": 0.25}, "memory_budget 0.25"),
    ({"hessian": "half"}, "hessian must be one of"),
    ({"solver": "kfac", "hessian": "full"}, "supports hessian='remaining' only"),
    ({"iter_T": -3}, "iter_T must be"),
    ({"curvature_data": "everything"}, "curvature_data must be"),
    ({"newton_target": "x"}, "newton_target must be"),
    ({"expectation": "chain"}, "needs the sampler"),
    ({"solver": "exact", "memory_budget": 1000}, "over the memory budget"),
    ({"seed": "1"}, "seed must be an integer"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[next(iter(k)) + str(i) for i, (k, _) in enumerate(BAD)])
def test_bad_option_is_refused_before_the_bank_is_read(kwargs, message):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    nll = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    bank = _Untouched([{k: v.clone() for k, v in model.state_dict().items()}])
    _Untouched.read = False
    with pytest.raises((ValueError, MemoryError), match=message):
        MCMCUnlearner(model, nll=nll, bank=bank, **kwargs)
    assert not _Untouched.read, "the bank was read (copied and checked) before the bad option was refused"


def test_option_error_wins_over_a_bad_bank():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="solver must be one of"):
        MCMCUnlearner(model, nll=lambda m, b: m(b[0]).sum(1), bank=[], solver="nosuch")


COMBINATIONS = [
    {"solver": "kfac", "hessian": "full"},
    {"solver": "cg", "bank_shift": "affine"},
    {"solver": "kfac", "bank_shift": "affine", "hessian": "full"},  # the bank shift's rule comes first
    {"solver": "lowrank", "hessian": "full", "damping_shape": "data"},  # the Hessian's before the damping's
    {"solver": "ggn", "damping_shape": "data"},
    {"solver": "auto", "hessian": "full", "damping_shape": "data"},  # auto: judged on the model only
    {"solver": "kfac", "damping_shape": "data", "bank_shift": "mean"},  # accepted
]


@pytest.mark.parametrize("kwargs", COMBINATIONS)
def test_the_torch_free_combination_check_says_what_the_constructor_says(kwargs):
    """:func:`~mcmc_unlearner.options.check_combinations` (the command line's check before torch) refuses exactly
    what the constructor refuses whatever the model, with its message and in its order; with ``solver='auto'``
    nothing (what it picks depends on the model)."""
    from mcmc_unlearner.options import check_combinations

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    nll = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    bank = torch.randn(3, sum(p.numel() for p in model.parameters()))
    try:
        MCMCUnlearner(model, nll=nll, bank=bank, **kwargs)
    except ValueError as exc:
        library = str(exc)
    else:
        library = None
    try:
        check_combinations(kwargs)
    except ValueError as exc:
        assert str(exc) == library
    else:
        assert library is None or kwargs["solver"] == "auto", library
