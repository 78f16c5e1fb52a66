"""Usage flows stop 63's flows probe found mishandled (a user's own networks, many calls on one unlearner).

*A model switched to training mode between calls.* The unlearner refuses a model in training mode with active dropout
(or batch statistics) when it is built, but a user continuing the chain (``model.train()``) and sending the next
request without ``model.eval()`` had every pass of that request drop units at random: random rows were accepted with
``problems=[]``, and a class's last rows were refused blaming the ``nll``'s form. Each request and ``fit()`` now check
the mode again, naming the layers and ``model.eval()``.

*A model converted or frozen between calls* (``model.float()``, ``requires_grad_(False)`` on a layer) crashed the
next request with torch's "mat1 and mat2 must have the same dtype" or "split_with_sizes expects split_sizes to sum
exactly to ...": the samples and state are in the old dtype and layout. It is refused naming what changed and the way
back.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.errors import InvalidRequestError
from test_probe62_inputs import chain  # noqa: F401 (a fixture)


def _with_dropout(chain: tuple) -> tuple:  # noqa: F811
    """The softmax regression behind a Dropout layer (eval mode: the same likelihood), its bank renamed to match."""
    model, nll, log_prior, bank, removed, remaining = chain
    net = nn.Sequential(nn.Dropout(0.3), copy.deepcopy(model)).eval()
    return net, nll, log_prior, [{f"1.{k}": v.clone() for k, v in s.items()} for s in bank], removed, remaining


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(s[k], t[k]) for s, t in zip(a, b) for k in s)


def _split(removed: tuple, remaining: tuple) -> tuple:
    """Two requests: the first five removed rows, then the other five (the remaining rows as the second sees them)."""
    (xr, yr), (xk, yk) = removed, remaining
    first, second = (xr[:5], yr[:5]), (xr[5:], yr[5:])
    return first, (torch.cat([xr[5:], xk]), torch.cat([yr[5:], yk])), second, remaining


def test_a_model_switched_to_training_mode_between_requests_is_refused(chain: tuple) -> None:  # noqa: F811
    net, nll, log_prior, bank, removed, remaining = _with_dropout(chain)
    first, after_first, second, after_second = _split(removed, remaining)
    ref = MCMCUnlearner(copy.deepcopy(net), nll=nll, log_prior=log_prior, bank=bank, seed=0)
    ref.remove(first, after_first)
    ref.remove(second, after_second)

    un = MCMCUnlearner(net, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    un.remove(first, after_first)
    kept = un.samples()
    net.train()  # the user continued the chain and forgot model.eval()
    said = r"propose\(\): the model is in training mode with Dropout.*model\.eval"
    with pytest.raises(InvalidRequestError, match=said):
        un.remove(second, after_second)
    assert net.training and _same(kept, un.samples())
    net.eval()
    un.remove(second, after_second)
    assert _same(ref.samples(), un.samples())  # the refusal changed nothing the next request reads


def test_fit_on_a_model_switched_to_training_mode_is_refused(chain: tuple) -> None:  # noqa: F811
    net, nll, log_prior, bank, _, remaining = _with_dropout(chain)
    un = MCMCUnlearner(net, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    net.train()
    with pytest.raises(InvalidRequestError, match=r"fit\(\): the model is in training mode with Dropout.*model\.eval"):
        un.fit(remaining)
    tensors, _ = un.curvature_state()
    assert not any(k.startswith("kfac/") for k in tensors)  # nothing built


@pytest.mark.parametrize(
    ("change", "undo", "said"),
    [
        (lambda m: m.float(), lambda m: m.double(), r"parameters are float32, but .* float64 model.*model\.double\(\)"),
        (
            lambda m: m.bias.requires_grad_(False),
            lambda m: m.bias.requires_grad_(True),
            r"trainable parameters changed .*no longer trainable or gone: bias.*requires_grad_\(True\)",
        ),
    ],
    ids=["float", "frozen"],
)
def test_a_model_converted_or_frozen_between_requests_is_refused(chain: tuple, change, undo, said: str) -> None:  # noqa: F811
    model, nll, log_prior, bank, removed, remaining = chain
    first, after_first, second, after_second = _split(removed, remaining)
    ref = MCMCUnlearner(copy.deepcopy(model), nll=nll, log_prior=log_prior, bank=bank, seed=0)
    ref.remove(first, after_first)
    ref.remove(second, after_second)

    net = copy.deepcopy(model)
    un = MCMCUnlearner(net, nll=nll, log_prior=log_prior, bank=bank, seed=0)
    un.remove(first, after_first)
    kept = un.samples()
    change(net)
    with pytest.raises(InvalidRequestError, match=f"propose\\(\\): .*{said}.*nothing was changed"):
        un.remove(second, after_second)
    with pytest.raises(InvalidRequestError, match=f"fit\\(\\): .*{said}"):
        un.fit(after_second)
    assert _same(kept, un.samples())
    undo(net)
    un.remove(second, after_second)
    assert _same(ref.samples(), un.samples())
