r"""Kronecker-factored curvature (K-FAC) of a Bayesian classifier's energy, built once and inverted cheaply.

For a network whose likelihood is a softmax over ``model(x)`` logits, the data term of the energy
``F = −log p(θ) + n·mean_i CE_i`` has Fisher / generalised Gauss-Newton curvature ``n·E_i[F_i]``. K-FAC
(Martens & Grosse, 2015; for convolutions Grosse & Martens, 2016) approximates each layer's block by a Kronecker
product ``L·A ⊗ G`` of the second moments of the layer's (bias-augmented) inputs ``a`` and of the gradients
``g`` of the loss w.r.t. its outputs (``L`` spatial locations for a convolution, 1 for a linear layer). With
the Gaussian prior's precision ``1/σ²`` and a damping ``λ`` on the diagonal, each block inverts through the
eigenbases of ``A`` and ``G``::

    (n·L·A⊗G + (1/σ² + λ)·I)⁻¹ vec(V) = Q_G [ (Q_Gᵀ V Q_A) / (n·L·λ_G λ_Aᵀ + 1/σ² + λ) ] Q_Aᵀ

The expectation over labels is exact (a weighted backward pass per class, no label sampling), and the factors
are averaged over posterior draws (the unlearner uses its curvature draws, each with its curvature minibatch).
The approximation is positive definite, unlike a network's Hessian, and a deletion request then costs the
removed points' gradient plus a few small matrix products. Parameters outside
``nn.Linear``/``nn.Conv2d`` layers get the diagonal ``1/σ² + λ``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .curvature import ParamSpec

__all__ = ["KFAC"]

Batch = tuple[torch.Tensor, ...]


@dataclass
class _Block:
    module: nn.Module
    w_slice: slice
    b_slice: slice | None
    w_shape: torch.Size
    locations: int = 1
    A: torch.Tensor | None = None
    G: torch.Tensor | None = None
    QA: torch.Tensor | None = None
    lA: torch.Tensor | None = None
    QG: torch.Tensor | None = None
    lG: torch.Tensor | None = None

    def to_matrix(self, v: torch.Tensor) -> torch.Tensor:
        """Flat weight (+ bias) entries of ``v`` as an ``[out, in (+1)]`` matrix."""
        W = v[self.w_slice].reshape(self.w_shape[0], -1)
        if self.b_slice is None:
            return W
        return torch.cat([W, v[self.b_slice][:, None]], dim=1)

    def from_matrix(self, M: torch.Tensor, out: torch.Tensor) -> None:
        if self.b_slice is None:
            out[self.w_slice] = M.reshape(-1)
        else:
            out[self.w_slice] = M[:, :-1].reshape(-1)
            out[self.b_slice] = M[:, -1]


def _inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Bias-augmented layer inputs, one row per (example, location)."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # [B, Ck², L]
        a = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        a = x.reshape(-1, x.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
    return a


def _outputs(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output gradients, one row per (example, location)."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


class KFAC:
    """Kronecker-factored approximation of ``E_θ[∇²F]`` for ``F = −log N(θ; 0, σ²I) + n·mean CE``.

    Build with :meth:`build`; ``solve(v)`` applies the damped inverse, ``kfac @ v`` the approximation itself.
    """

    def __init__(self, blocks: list[_Block], dim: int, prior_precision: float, damping: float, n: int) -> None:
        self.blocks, self.dim = blocks, dim
        self.prior_precision, self.damping, self.n = float(prior_precision), float(damping), int(n)
        covered = torch.zeros(dim, dtype=torch.bool)
        for b in blocks:
            covered[b.w_slice] = True
            if b.b_slice is not None:
                covered[b.b_slice] = True
        self._uncovered = ~covered

    @classmethod
    def build(
        cls,
        model: nn.Module,
        thetas: torch.Tensor,
        batches: Sequence[Batch],
        n: int,
        prior_precision: float,
        damping: float = 0.0,
    ) -> KFAC:
        """Average the Kronecker factors over posterior draws ``thetas[s]`` with minibatches ``batches[s]``.

        Args:
            model: A classifier: ``model(x)`` returns logits; its ``nn.Linear``/``nn.Conv2d`` layers are factored.
            thetas: Posterior draws ``[S, D]`` (flat parameters, :class:`~mcmc_unlearner.curvature.ParamSpec`).
            batches: ``S`` minibatches ``(x, y)`` (labels unused: the expectation over labels is exact).
            n: Number of data points the energy is scaled to.
            prior_precision: ``1/σ²`` of the Gaussian prior on every parameter.
            damping: Added to the diagonal.
        """
        spec = ParamSpec.of(model)
        offsets, pos = {}, 0
        for name, shape in zip(spec.names, spec.shapes):
            offsets[name] = slice(pos, pos + math.prod(shape))
            pos += math.prod(shape)
        blocks = []
        for mname, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.requires_grad:
                bias = f"{mname}.bias" if module.bias is not None else None
                blocks.append(_Block(module, offsets[f"{mname}.weight"], offsets.get(bias), module.weight.shape))
        saved = ParamSpec.flatten_module(model)
        store: dict[nn.Module, dict[str, torch.Tensor]] = {}
        hooks = []
        for b in blocks:
            hooks.append(
                b.module.register_forward_hook(lambda m, i, o: store.setdefault(m, {}).update(a=i[0].detach()))
            )
            hooks.append(
                b.module.register_full_backward_hook(
                    lambda m, gi, go: store.setdefault(m, {}).setdefault("g", []).append(go[0].detach())
                )
            )
        params = ParamSpec.params(model)
        try:
            for theta, batch in zip(thetas, batches):
                ParamSpec.assign(model, theta)
                x = batch[0]
                store.clear()
                with torch.enable_grad(), warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    logits = model(x)
                    probs = torch.softmax(logits.detach(), -1)
                    logp = torch.log_softmax(logits, -1)
                    for c in range(logits.shape[1]):
                        # per-example gradients of −log p_c, weighted by sqrt(p_c): Σ_c of their outer products
                        # is the exact expectation over labels of the Fisher (the hooks record them; .grad untouched)
                        w = probs[:, c].sqrt()
                        torch.autograd.grad(-(w * logp[:, c]).sum(), params, retain_graph=c < logits.shape[1] - 1)
                for b in blocks:
                    a = _inputs(b.module, store[b.module]["a"])
                    b.locations = a.shape[0] // x.shape[0]
                    rows = a.shape[0]
                    A = a.T @ a / rows
                    G = sum(_outputs(b.module, g).T @ _outputs(b.module, g) for g in store[b.module]["g"]) / rows
                    b.A = A if b.A is None else b.A + A
                    b.G = G if b.G is None else b.G + G
        finally:
            for h in hooks:
                h.remove()
            ParamSpec.assign(model, saved)
        S = len(thetas)
        for b in blocks:
            b.A, b.G = b.A / S, b.G / S
            b.lA, b.QA = torch.linalg.eigh(b.A)
            b.lG, b.QG = torch.linalg.eigh(b.G)
            b.lA, b.lG = b.lA.clamp_min(0), b.lG.clamp_min(0)
        return cls(blocks, spec.dim, prior_precision, damping, n)

    def _apply(self, v: torch.Tensor, inverse: bool) -> torch.Tensor:
        out = torch.empty_like(v)
        diag = self.prior_precision + self.damping
        for b in self.blocks:
            V = b.QG.T @ b.to_matrix(v) @ b.QA
            eig = self.n * b.locations * b.lG[:, None] * b.lA[None, :] + diag
            V = V / eig if inverse else V * eig
            b.from_matrix(b.QG @ V @ b.QA.T, out)
        rest = self._uncovered
        out[rest] = v[rest] / diag if inverse else v[rest] * diag
        return out

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """Damped inverse applied to ``v`` (``[D]`` or ``[D, k]``)."""
        if v.ndim == 2:
            return torch.stack([self._apply(v[:, j], True) for j in range(v.shape[1])], 1)
        return self._apply(v, True)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        if v.ndim == 2:
            return torch.stack([self._apply(v[:, j], False) for j in range(v.shape[1])], 1)
        return self._apply(v, False)
