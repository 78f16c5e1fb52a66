"""A model with float32 and float64 trainable parameters crashed inside the request (a dtype mismatch in the
user's forward or in the affine transport) after the bank had been rounded to float32: refused when built."""

import pytest
import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner

torch.set_num_threads(1)


def test_mixed_dtype_parameters_refused_at_construction():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[2].double()
    bank = [{k: v + 0.01 * i for k, v in model.state_dict().items()} for i in range(4)]
    nll = lambda m, b: nn.functional.cross_entropy(m[2](m[1](m[0](b[0])).double()), b[1], reduction="none")  # noqa: E731
    lp = lambda m: -0.5 * sum((p.double() ** 2).sum() for p in m.parameters())  # noqa: E731
    with pytest.raises(ValueError, match="different dtypes"):
        MCMCUnlearner(model, nll=nll, log_prior=lp, bank=bank)
