"""Layers whose weight a parametrization computes (``weight_norm``, ``orthogonal``, ``register_parametrization``).

K-FAC can factor only a layer that holds its weight as a parameter of its own; a parametrized layer's parameters
(``parametrizations.weight.original0/1``) go to K-FAC's diagonal block, as does ``MultiheadAttention.out_proj``.
``solver='auto'``'s reason counted such layers as factored (stop 58's probe: a weight-normed MLP, every layer on the
diagonal, "2 Linear/Conv layers for Kronecker factors" and no other word); it now says which of them K-FAC holds in
its diagonal, and the emptied-label draw names the parametrization where it cannot draw a parametrized head's rows.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.emptied import output_rows

torch.set_num_threads(1)


def _prior(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


class _Positive(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return F.softplus(w)


def _mlp(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    for i in (0, 2, 4):
        if kind == "weight_norm":
            parametrizations.weight_norm(m[i])
        elif kind == "hooked_weight_norm":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's deprecation of the hook-based form
                nn.utils.weight_norm(m[i])
        elif kind == "positive":
            parametrize.register_parametrization(m[i], "weight", _Positive())
    if kind == "orthogonal":  # one of three layers
        parametrizations.orthogonal(m[2])
    return m


def _unlearner(model: nn.Module) -> MCMCUnlearner:
    theta = ParamSpec.flatten_module(model).detach()
    bank = theta[None] + 0.01 * torch.randn(4, theta.numel(), generator=torch.Generator().manual_seed(1))
    return MCMCUnlearner(model, None, nll=_nll, log_prior=_prior, bank=bank)


@pytest.mark.parametrize("kind", ["weight_norm", "hooked_weight_norm", "positive"])
def test_autos_reason_says_parametrized_layers_are_kfacs_diagonal(kind: str) -> None:
    """Every Linear's weight is computed: K-FAC factors none of them (every parameter in its diagonal block), and
    the reason says so (it said "3 Linear/Conv layers for Kronecker factors" and nothing else). The choice stays
    K-FAC: on stop 58's probe CG did better on a weight-normed MLP's random rows (0.47 / 0.54 of the way against
    0.16 / 0.21) and worse on a spectral-normed MLP's class removal (0.06 against 0.26)."""
    un = _unlearner(_mlp(kind))
    assert un.spec.dim > 1000  # above exact_max_dim: K-FAC or CG
    assert un.solver.value == "kfac"
    assert (
        "3 Linear/Conv layers for Kronecker factors (3 of them with a weight computed by a parametrization"
        in un.solver_reason
    ), un.solver_reason
    assert "which K-FAC holds in its diagonal block" in un.solver_reason


def test_autos_reason_counts_the_one_parametrized_layer_of_three() -> None:
    un = _unlearner(_mlp("orthogonal"))
    assert un.solver.value == "kfac"
    assert "3 Linear/Conv layers for Kronecker factors (1 of them with a weight computed" in un.solver_reason


def test_a_plain_mlps_reason_is_unchanged() -> None:
    un = _unlearner(_mlp("plain"))
    assert un.solver.value == "kfac"
    assert un.solver_reason.endswith("; 3 Linear/Conv layers for Kronecker factors"), un.solver_reason


def test_the_emptied_label_draw_names_a_parametrized_head() -> None:
    """A weight-normed output layer's rows are not parameters the draw can sample: the reason names the
    parametrization (it said "the output layer's parameters are not all trainable")."""
    model = _mlp("weight_norm")
    spec = ParamSpec.of(model)
    why = output_rows(model, spec, ParamSpec.flatten_module(model).detach(), torch.randn(3, 20))
    assert isinstance(why, str) and "parametrization" in why and "not all trainable" not in why


class _Attention(nn.Module):
    """Token ids → embedding → MultiheadAttention (its ``out_proj`` read by ``F.linear``) → mean → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 32)
        self.att = nn.MultiheadAttention(32, 2, batch_first=True)
        self.out = nn.Linear(32, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.out(self.att(h, h, h, need_weights=False)[0].mean(1))


def test_attentions_out_proj_is_said_to_be_kfacs_diagonal() -> None:
    """``MultiheadAttention`` never calls its ``out_proj`` module (K-FAC holds it in the diagonal): the reason says so
    of the one of its two counted layers."""
    torch.manual_seed(0)
    un = _unlearner(_Attention())
    assert un.solver.value == "kfac"
    assert "2 Linear/Conv layers for Kronecker factors (1 of them with a weight" in un.solver_reason, un.solver_reason


@pytest.mark.parametrize("kind", ["weight_norm", "hooked_weight_norm", "bias"])
def test_the_emptied_label_draw_names_the_parametrized_tensor_of_the_head(kind: str) -> None:
    """The reason names the head's tensor a parametrization computes: its weight (``parametrizations.weight_norm``,
    the hook-based ``nn.utils.weight_norm``), or its bias alone (a positive bias by ``register_parametrization``),
    which was called a computed weight."""
    model = _mlp("plain")
    head = model[4]
    if kind == "weight_norm":
        parametrizations.weight_norm(head)
    elif kind == "hooked_weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation of the hook-based form
            nn.utils.weight_norm(head)
    else:
        parametrize.register_parametrization(head, "bias", _Positive())
    spec = ParamSpec.of(model)
    why = output_rows(model, spec, ParamSpec.flatten_module(model).detach(), torch.randn(3, 20))
    tensor = "bias" if kind == "bias" else "weight"
    assert isinstance(why, str) and f"the output layer's {tensor} is computed by a parametrization" in why, why
