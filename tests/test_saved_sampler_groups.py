"""Fails on main 18db16e, passes with fix-saved-sampler-groups.patch."""

import torch

from mcmc_unlearner import SGHMC, MCMCUnlearner, RemovableDataset
from mcmc_unlearner.models.bnn import build_model
from mcmc_unlearner.samplers import run_chain
from mcmc_unlearner.service.checkpoint import load_model, save_model
from mcmc_unlearner.service.fsio import StoreError
from mcmc_unlearner.service.specs import bnn_model_spec

torch.set_num_threads(1)
SPEC = bnn_model_spec("mlp", [4], 3, prior_std=1.0, hidden=[8, 8])


def _setup(make_groups):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    torch.manual_seed(0)
    model = build_model("mlp", [4], 3, prior_std=1.0, hidden=[8, 8])
    s = SGHMC(make_groups(model), lr=1e-4, generator=torch.Generator().manual_seed(1))
    data = RemovableDataset(x, y, batch_size=40, seed=0)
    un = MCMCUnlearner(model, s)
    run_chain(model, s, data, un.energy, 30, len(data))
    un.bank = run_chain(model, s, data, un.energy, 40, len(data), keep_every=4)
    return model, s, data, un


def test_sampler_with_a_step_size_per_layer_saves_and_loads(tmp_path):
    def groups(m):
        ps = list(m.parameters())
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 5e-5}]

    model, s, data, un = _setup(groups)
    save_model(
        tmp_path / "m", model=model, sampler=s, data=data, unlearner=un, model_spec=SPEC, data_spec={"kind": "tensors"}
    )
    loaded = load_model(tmp_path / "m")  # main: StoreError "different number of parameter groups"
    assert [g["lr"] for g in loaded.sampler.param_groups] == [g["lr"] for g in s.param_groups]
    for (_, p), (_, q) in zip(model.named_parameters(), loaded.model.named_parameters()):
        assert torch.equal(s.state[p]["momentum_buffer"], loaded.sampler.state[q]["momentum_buffer"])


def test_sampler_in_another_parameter_order_does_not_swap_velocities(tmp_path):
    def swapped(m):  # the two hidden biases (both [8]) listed in the other order
        named = dict(m.named_parameters())
        order = ["net.1.weight", "net.3.bias", "net.3.weight", "net.1.bias", "net.5.weight", "net.5.bias"]
        return [named[k] for k in order]

    model, s, data, un = _setup(swapped)
    named = dict(model.named_parameters())
    try:
        save_model(
            tmp_path / "m",
            model=model,
            sampler=s,
            data=data,
            unlearner=un,
            model_spec=SPEC,
            data_spec={"kind": "tensors"},
        )
    except StoreError:
        return  # refused at save (the fix)
    loaded = load_model(tmp_path / "m")
    for name, q in loaded.model.named_parameters():  # main: net.1.bias and net.3.bias get each other's velocity
        assert torch.equal(loaded.sampler.state[q]["momentum_buffer"], s.state[named[name]]["momentum_buffer"]), name
