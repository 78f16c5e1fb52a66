"""K-FAC's reason for a tied weight named only the last module using it (``Linear 'b'`` for a tensor registered as
``a.weight``), and the layers' untied biases were called tied too: the tied tensor's reason now names every module
using it, and an untied bias says it is not tied and is left out with its layer's tied weight."""

import torch
from torch import nn

from mcmc_unlearner.kronecker import KroneckerCurvature

torch.set_num_threads(1)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.mid, self.b, self.head = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.mid(torch.tanh(self.a(x)))))))


def test_a_tied_weights_reason_names_every_module_using_it_and_its_bias_is_not_called_tied():
    torch.manual_seed(0)
    model = Tied()
    x, y = torch.randn(32, 3), torch.randn(32)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    K = KroneckerCurvature.build(
        model,
        theta.expand(4, -1).clone(),
        [(x, y)],
        n=32,
        nll=lambda m, b: 0.5 * (b[1] - m(b[0]).squeeze(-1)) ** 2,
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()),
    )
    diag = K.info["diagonal"]
    assert set(diag) == {"a.weight", "a.bias", "b.bias"}  # one tensor under two names, both layers' biases
    assert set(K.info["kronecker"]) == {"mid", "head"}
    w = diag["a.weight"]
    assert "tied" in w and "'a.weight' (Linear 'a')" in w and "'b.weight' (Linear 'b')" in w  # old: "Linear 'b'" only
    for bias, layer in (("a.bias", "a"), ("b.bias", "b")):
        assert f"Linear '{layer}'" in diag[bias] and "not tied itself" in diag[bias], diag[bias]
        assert "a.weight" in diag[bias]  # names the tied tensor it is left out with


def test_the_solver_reason_counts_the_tied_layers_k_fac_holds_in_its_diagonal():
    """The automatic choice said "4 Linear/Conv layers for Kronecker factors" for a model whose tied layers K-FAC
    holds in its diagonal block (stop 45's probe: every factored layer of its model was tied)."""
    from mcmc_unlearner import MCMCUnlearner

    model = Tied()
    un = MCMCUnlearner(
        model,
        nll=lambda m, b: 0.5 * (b[1] - m(b[0]).squeeze(-1)) ** 2,
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()),
        bank=torch.randn(4, sum(p.numel() for p in model.parameters())),
        exact_max_dim=10,
    )
    assert un.solver.value == "kfac"
    assert un.solver_reason.endswith(
        "4 Linear/Conv layers for Kronecker factors (2 of them with tied weights, which "
        "K-FAC holds in its diagonal block)"
    ), un.solver_reason
