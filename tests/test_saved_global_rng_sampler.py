"""A sampler built without a generator of its own (``generator=None``: torch's global generator) and saved into a
model folder came back with a private generator at torch's default seed: the resumed chain's noise differed from the
uninterrupted chain's, and every folder saved that way resumed with the same noise. The save now stores the global
generator's state the sampler's next noise would have come from, and the load gives it to the rebuilt sampler."""

import pytest
import torch

from mcmc_unlearner import SGHMC, SGLD, MCMCUnlearner, RemovableDataset
from mcmc_unlearner.models.bnn import build_model
from mcmc_unlearner.samplers import run_chain
from mcmc_unlearner.service.checkpoint import load_model, save_model
from mcmc_unlearner.service.specs import bnn_model_spec

torch.set_num_threads(1)
SPEC = bnn_model_spec("mlp", [4], 3, prior_std=1.0, hidden=[8])


def _chain(kind, seed: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    torch.manual_seed(0)
    model = build_model("mlp", [4], 3, prior_std=1.0, hidden=[8])
    s = kind(model.parameters(), lr=1e-4)  # no generator: torch's global one
    data = RemovableDataset(x, y, batch_size=30, seed=0)
    un = MCMCUnlearner(model, s)
    torch.manual_seed(seed)
    un.bank = run_chain(model, s, data, un.energy, 20, len(data), keep_every=4)
    return model, s, data, un


def _vec(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("kind", [SGLD, SGHMC])
def test_resumed_chain_draws_the_uninterrupted_chains_noise(tmp_path, kind) -> None:
    model, s, data, un = _chain(kind, seed=7)
    save_model(
        tmp_path / "m", model=model, sampler=s, data=data, unlearner=un, model_spec=SPEC, data_spec={"kind": "tensors"}
    )
    # the uninterrupted chain: the global generator continues from where the save found it
    run_chain(model, s, data, un.energy, 10, len(data))
    torch.manual_seed(123)  # the loading process's own global state must not matter
    loaded = load_model(tmp_path / "m")
    run_chain(loaded.model, loaded.sampler, loaded.data, loaded.unlearner.energy, 10, len(loaded.data))
    assert torch.equal(_vec(loaded.model), _vec(model))


def test_two_folders_saved_from_different_global_states_resume_with_different_noise(tmp_path) -> None:
    ends = []
    for seed in (7, 8):
        model, s, data, un = _chain(SGLD, seed=seed)
        # the same chain state in both folders, so only the saved noise state can differ
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        path = tmp_path / f"m{seed}"
        save_model(
            path, model=model, sampler=s, data=data, unlearner=un, model_spec=SPEC, data_spec={"kind": "tensors"}
        )
        loaded = load_model(path)
        run_chain(loaded.model, loaded.sampler, loaded.data, loaded.unlearner.energy, 1, len(loaded.data))
        ends.append(_vec(loaded.model))
    assert not torch.equal(ends[0], ends[1])
