"""Inputs stop 63's probe of a new user's usages found mishandled.

*A model that is not a module.* ``MCMCUnlearner(lambda x: net(x), ...)`` failed with Python's bare "'function' object
has no attribute 'named_parameters'"; it is refused naming ``torch.nn.Module`` and the way out.
"""

from __future__ import annotations

import pytest
import torch

from mcmc_unlearner import MCMCUnlearner
from test_probe62_inputs import _setup, chain  # noqa: F401 (a fixture)


def test_a_function_around_the_model_is_refused_naming_the_module(chain: tuple) -> None:  # noqa: F811
    model, nll, log_prior, bank, _, _ = _setup(chain)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module.*got function.*pass the module itself"):
        MCMCUnlearner(lambda x: model(x), nll=nll, log_prior=log_prior, bank=bank)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
