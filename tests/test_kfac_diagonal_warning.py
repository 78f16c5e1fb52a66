"""K-FAC keeps only the diagonal of a factor over ``MAX_FACTOR_DIM`` (4,096) dimensions, e.g. a vocabulary head's
output factor: that was recorded only in ``report.info["kfac"]["kronecker"]`` (stop 56's closing note). It is
warned once per unlearner, naming the layer, the factor, what is approximated and ``solver='cg'``; a model whose
factors are all within the limit gets no such warning."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.kronecker import MAX_FACTOR_DIM

torch.set_num_threads(1)


def _nll(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def _prior(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for p in m.parameters())


def _diagonal_warnings(classes: int) -> tuple[list[str], list[dict]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, classes)).eval()
    x, y = torch.randn(120, 8), torch.randint(classes, (120,))
    live = ParamSpec.flatten_module(model)
    bank = torch.stack([live + 0.01 * torch.randn_like(live) for _ in range(4)])
    un = MCMCUnlearner(model, None, nll=_nll, log_prior=_prior, bank=bank, solver="kfac", refresh_every=1)
    infos = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(2):  # two requests, the factors rebuilt for each (refresh_every=1)
            rows = slice(3 * k, 3 * k + 3)
            keep = torch.ones(120, dtype=torch.bool)
            keep[: 3 * k + 3] = False
            infos.append(un.remove((x[rows], y[rows]), (x[keep], y[keep])).info)
    return [str(w.message) for w in caught if "keeps only the diagonal" in str(w.message)], infos


def test_a_vocabulary_heads_diagonal_output_factor_is_warned_once() -> None:
    said, infos = _diagonal_warnings(MAX_FACTOR_DIM + 904)
    assert len(said) == 1, said
    assert "the output factor of layer '2' (5,000 dimensions)" in said[0]
    assert "over 4,096 dimensions" in said[0] and "solver='cg'" in said[0]
    for info in infos:  # still recorded on every request
        assert info["kfac"]["kronecker"]["2"]["G"] == "diagonal (dim > max_factor_dim)"
        assert info["kfac"]["kronecker"]["2"]["A"] == "full eigenbasis"


def test_factors_within_the_limit_are_not_warned() -> None:
    said, infos = _diagonal_warnings(MAX_FACTOR_DIM)
    assert said == [] and "eigenbasis" in infos[0]["kfac"]["kronecker"]["2"]["G"]  # (of rank < 4,096 here)


@pytest.mark.parametrize("dims", [[], [("0", "input", 5000)] * 6])
def test_the_message_lists_at_most_four_factors(dims) -> None:
    from mcmc_unlearner.backends.kfac import diagonal_factor_message, diagonal_factors

    info = {"kronecker": {str(i): {"A": "diagonal (dim > max_factor_dim)", "A_dim": 5000, "G": "full eigenbasis"}
                          for i in range(len(dims))}}  # fmt: skip
    assert diagonal_factors(info) == [(str(i), "input", 5000) for i in range(len(dims))]
    if dims:
        assert diagonal_factor_message(diagonal_factors(info)).count("input factor of layer") == 4
        assert "and 2 more" in diagonal_factor_message(diagonal_factors(info))
