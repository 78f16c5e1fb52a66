r"""Kronecker-factored curvature of a Bayesian network's energy, with Monte-Carlo labels, for any PyTorch model.

Approximates the sample-averaged curvature of the MCMC influence function (Fu, He & Tao, ICLR 2022, eq. 7)

    K ≈ E_θ[∇²F(θ, S)],   F(θ, S) = −log p(θ) + Σ_{i∈S} h_i(θ),

by ``K = P + n·E_{θ, i}[C_i(θ)]``: ``P`` is the prior precision (a diagonal measured from ``log_prior``, see
:func:`prior_precision`), ``n`` the number of data points the data term is scaled to, and ``C_i`` the generalised
Gauss-Newton (GGN) matrix of one row, which for the likelihoods handled here (softmax cross-entropy, Gaussian)
equals its Fisher ``E_{ŷ~p(y|x_i,θ)}[∇ log p(ŷ|x_i,θ) ∇ log p(ŷ|x_i,θ)ᵀ]`` (Martens, 2020). The expectation over
draws uses the posterior draws ``θ_s`` with their minibatches (pooled over all their rows).

**Kronecker blocks** (K-FAC; Martens & Grosse, 2015; convolutions: Grosse & Martens, 2016). For ``nn.Linear``,
``nn.Conv1d`` and ``nn.Conv2d`` layers the row Fisher of the weight (and bias, via an input column of ones) is
``Σ_{l,l'} (a_l a_{l'}ᵀ) ⊗ E[g_l g_{l'}ᵀ]`` over the layer's locations ``l`` (positions of a sequence, pixels of
a feature map, every leading index of a linear layer's input), with ``a_l`` the (unfolded) layer input and
``g_l`` the gradient of the row's loss w.r.t. the layer output. Treating locations as independent and
factorising the expectation (the "expand" setting of Eschenhagen et al., NeurIPS 2023) gives

    n·E[C_i] ≈ n·L·A ⊗ G,   A = mean_{i,l} a_{il} a_{il}ᵀ,   G = mean_{i,l} E_ŷ[g_{il} g_{il}ᵀ],

``L`` the number of locations per row. It is exact for one row at one location. With eigenbases
``A = Q_A Λ_A Q_Aᵀ``, ``G = Q_G Λ_G Q_Gᵀ`` and the block's prior precision ``p`` on the diagonal, any damping
``λ`` inverts in closed form::

    (n·L·A⊗G + (p + λ)·I)⁻¹ vec(V) = vec(Q_G [(Q_Gᵀ V Q_A) / (n·L·λ_G λ_Aᵀ + p + λ)] Q_Aᵀ).

``p`` is exact when the prior precision is constant on the block; otherwise its mean is used (recorded in
``info``). A factor larger than ``max_factor_dim`` keeps only its diagonal (``Q = I``, recorded).

**Labels.** The expectation over ``ŷ`` is sampled (``mc_samples`` labels per row: categorical ``ŷ ~
softmax(model(x))``, Gaussian ``ŷ = μ + σε``) with ONE backward pass of ``Σ_i loss(out_i, ŷ_i)`` per sample;
since rows do not interact, the gradient w.r.t. a layer output at row ``i`` is that row's own ``g_i``. The cost
is O(draws × mc_samples) backward passes whatever the number of classes. When the model has at most
``mc_samples`` outputs per row (e.g. scalar regression) the exact expectation costs no more and is used instead
(one backward per output, ``√p_c``-weighted for the softmax). With ``Likelihood.EMPIRICAL`` (any other ``nll``)
the gradients of the user's ``nll`` at the TRUE labels are used: the *empirical* Fisher, a weaker approximation
of the curvature (Kunstner et al., 2019) - ``info["fisher"]`` says so.

**Diagonal fallback.** Every other parameter (BatchNorm/LayerNorm affine terms, embeddings, raw parameters such
as ``MultiheadAttention.in_proj_weight``, and Linear/Conv layers whose forward hook does not fire because their
weight is used through ``F.linear`` directly, like ``MultiheadAttention.out_proj``) gets the diagonal
``P + n·diag(E[C_i])``, estimated WITHOUT per-example gradients: with sampled labels
``E_ŷ[g_i] = E_ŷ[∇ log p(ŷ|x_i)] = 0`` (the score has mean zero) and labels of different rows are independent, so

    E[(Σ_i g_i)²] = Σ_i E[g_i²] + Σ_{i≠j} E[g_i]·E[g_j] = Σ_i E[g_i²]   (elementwise),

i.e. the square of the ONE minibatch gradient of the sampled-label loss, divided by the number of rows, is an
unbiased estimate of the mean row diagonal. For the exact expectation and the empirical Fisher (where the
gradients do not have mean zero) each row's loss is multiplied by an independent random sign ``r_i = ±1``,
which gives the same identity through ``E[r_i r_j] = δ_ij``.

**Distributed building.** Every statistic is a sum (second-moment sums, location, row and squared-gradient
sums) until it is finalised, and ``reduce`` is applied to each, so ranks holding different rows can all-reduce
them (``reduce=lambda t: (dist.all_reduce(t), t)[1]``). The Kronecker factors then equal the single-process ones;
the diagonal estimate differs by zero-mean cross terms (its square is taken per rank).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .curvature import ParamSpec, functionalize

__all__ = ["KroneckerCurvature", "Likelihood", "detect_likelihood", "prior_precision"]

Batch = tuple[Tensor, ...]
NLL = Callable[[nn.Module, Batch], Tensor]

_KINDS: tuple[tuple[type[nn.Module], str], ...] = ((nn.Linear, "linear"), (nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"))
_PROBE_ROWS = 8


class Likelihood(str, Enum):
    """Which per-row loss the curvature's label expectation is taken for."""

    AUTO = "auto"
    CATEGORICAL = "categorical"
    GAUSSIAN = "gaussian"
    EMPIRICAL = "empirical"


# ------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Restore every parameter, buffer and ``.grad`` of ``model`` and the global RNG states on exit."""
    params = list(model.parameters())
    saved_p = [p.detach().clone() for p in params]
    saved_g = [p.grad for p in params]
    buffers = list(model.buffers())
    saved_b = [b.detach().clone() for b in buffers]
    cuda = sorted({t.device.index or 0 for t in itertools.chain(params, buffers) if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(params, saved_p):
                    p.copy_(v)
                for b, v in zip(buffers, saved_b):
                    b.copy_(v)
            for p, g in zip(params, saved_g):
                p.grad = g


def _slices(model: nn.Module) -> tuple[ParamSpec, dict[str, slice], dict[int, str]]:
    """The flat layout: spec, ``{name: slice}`` and ``{id(param): name}`` of trainable parameters."""
    spec = ParamSpec.of(model)
    offsets, pos = {}, 0
    for name, numel in zip(spec.names, spec.numels):
        offsets[name] = slice(pos, pos + numel)
        pos += numel
    by_id = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    return spec, offsets, by_id


def _field_rows(batch: Batch) -> int:
    return int(batch[0].shape[0])


def _head(batch: Batch, rows: int) -> Batch:
    """The first ``rows`` rows of every field that has the batch's leading dimension."""
    b = _field_rows(batch)
    return tuple(t[:rows] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == b else t for t in batch)


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps


# ------------------------------------------------------------------------------------------- likelihood
def detect_likelihood(model: nn.Module, nll: NLL, batch: Batch) -> tuple[Likelihood, dict[str, Any]]:
    """Identify the user's per-row NLL from a few probe rows.

    * ``CATEGORICAL`` if ``y = batch[1]`` holds integer class labels, ``model(x)`` is ``[B, C]`` and
      ``nll(model, batch) == cross_entropy(model(x), y)`` row by row (also checked with shifted labels);
    * ``GAUSSIAN`` with ``{"sigma": σ}`` if ``nll_i = a·Σ_out (model(x)_i − y_i)² + c`` for the true labels and two
      perturbed label sets: ``a`` and ``c`` are fitted by least squares on all probe rows, the fit must be exact to
      float tolerance and ``a > 0``; then ``σ² = 1/(2a)``;
    * ``EMPIRICAL`` otherwise (``{"reason": ...}`` says why).

    Runs without gradients on at most 8 rows; the model (parameters, buffers, ``.grad``) and the global RNG
    states are left exactly as they were.

    Raises:
        ValueError: if ``nll`` does not return one value per row.
    """
    batch = tuple(batch)
    probe = _head(batch, _PROBE_ROWS)
    rows = _field_rows(probe)
    x, y = probe[0], probe[1] if len(probe) > 1 else None
    with _preserved(model), torch.no_grad():
        base = nll(model, probe)
        if not isinstance(base, Tensor) or base.shape != (rows,):
            shape = tuple(base.shape) if isinstance(base, Tensor) else type(base).__name__
            raise ValueError(f"nll(model, batch) must return one value per row, shape [{rows}], got {shape}")
        out = model(x)
        if not isinstance(out, Tensor) or y is None or not isinstance(y, Tensor) or out.shape[:1] != (rows,):
            return Likelihood.EMPIRICAL, {"reason": "model(x) is not a [B, ...] tensor or the batch has no labels"}
        tol = 1e3 * _eps(out.dtype)
        base64 = base.double()

        def close(a: Tensor, b: Tensor) -> bool:
            return bool(((a.double() - b.double()).abs() <= tol * (1 + b.double().abs())).all())

        integer = not (y.is_floating_point() or y.is_complex())
        if integer and out.dim() == 2 and y.shape == (rows,) and 0 <= int(y.min()) and int(y.max()) < out.shape[1]:
            shifted = (y + 1) % out.shape[1]
            try:
                other = nll(model, (x, shifted, *probe[2:]))
            except Exception as err:  # a probe: any failure means "not the plain CE"
                return Likelihood.EMPIRICAL, {"reason": f"nll failed on shifted labels: {err}"}
            if close(base, F.cross_entropy(out, y, reduction="none")) and close(
                other, F.cross_entropy(out, shifted, reduction="none")
            ):
                return Likelihood.CATEGORICAL, {}
            return Likelihood.EMPIRICAL, {"reason": "integer labels, but nll is not cross_entropy(model(x), y)"}
        if y.is_floating_point() and y.numel() == out.numel():
            gen = torch.Generator().manual_seed(0)
            scale = float(y.double().std()) if y.numel() > 1 else 1.0
            u = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y) * (scale if scale > 0 else 1.0)
            rs, vs = [], []
            for t in (0.0, 1.0, -0.5):
                yt = y + t * u
                try:
                    v = base64 if t == 0.0 else nll(model, (x, yt, *probe[2:])).double()
                except Exception as err:  # a probe
                    return Likelihood.EMPIRICAL, {"reason": f"nll failed on perturbed targets: {err}"}
                rs.append((out.double() - yt.double().reshape(out.shape)).pow(2).reshape(rows, -1).sum(1))
                vs.append(v.reshape(-1))
            r, v = torch.cat(rs), torch.cat(vs)
            design = torch.stack([r, torch.ones_like(r)], 1)
            coef = torch.linalg.lstsq(design, v[:, None]).solution[:, 0]
            a, c = float(coef[0]), float(coef[1])
            resid = float((design @ coef - v).abs().max())
            if a > 0 and math.isfinite(a) and resid <= tol * max(1.0, float(v.abs().max())):
                return Likelihood.GAUSSIAN, {"sigma": math.sqrt(0.5 / a), "constant": c}
            return Likelihood.EMPIRICAL, {"reason": f"nll is not a·Σ(model(x) − y)² + c (fit residual {resid:.3g})"}
        return Likelihood.EMPIRICAL, {"reason": "labels fit neither the categorical nor the Gaussian check"}


# ------------------------------------------------------------------------------------------------ prior
def _measure_prior(
    model: nn.Module, log_prior: Callable[[nn.Module], Tensor] | None, theta: Tensor
) -> tuple[Tensor, dict[str, Any]]:
    spec, offsets, _ = _slices(model)
    notes: dict[str, Any] = {"clamped": {}, "independent": False}
    P = torch.zeros(spec.dim, dtype=theta.dtype, device=theta.device)
    if log_prior is None:
        notes["source"] = "no log_prior: zero precision"
        return P, notes
    f = functionalize(model, lambda m: log_prior(m))
    gen = torch.Generator().manual_seed(0)
    with _preserved(model), torch.enable_grad():
        t = theta.detach().clone().requires_grad_(True)
        value = f(t)
        if not isinstance(value, Tensor) or not value.requires_grad:
            notes["independent"] = True
            notes["source"] = "log_prior does not depend on the parameters: zero precision"
            return P, notes
        (g,) = torch.autograd.grad(value, t, create_graph=True)
        if not g.requires_grad:  # linear in θ: zero curvature
            notes["source"] = "log_prior is linear in the parameters: zero precision"
            return P, notes
        for name in spec.names:
            sl = offsets[name]
            v = torch.zeros_like(t)
            v[sl] = torch.randn(sl.stop - sl.start, generator=gen, dtype=torch.float64).to(v)
            (hv,) = torch.autograd.grad(g, t, grad_outputs=v, retain_graph=True, allow_unused=True)
            prec = (
                0.0 if hv is None else -float(v[sl].double() @ hv[sl].double()) / float(v[sl].double().square().sum())
            )
            if prec < 0:
                notes["clamped"][name] = prec
                prec = 0.0
            P[sl] = prec
    notes["source"] = "−vᵀ∇²log p(θ)v/‖v‖² per parameter tensor (random probe, double backward)"
    return P, notes


def prior_precision(model: nn.Module, log_prior: Callable[[nn.Module], Tensor] | None, theta: Tensor) -> Tensor:
    """Precision of the prior along each parameter, measured from ``log_prior`` at the flat parameters ``theta``.

    For each parameter tensor ``k``: ``−vᵀ∇²log p(θ)v / ‖v‖²`` for a random Gaussian probe ``v`` supported on that
    tensor (double backward through ``log_prior(model)`` evaluated at ``theta`` by ``functional_call``). This is
    exact for Gaussian priors that are isotropic on each tensor (``N(0, σ_k² I)``, any ``σ_k``, any mean) and a
    local (probe-direction) curvature at ``theta`` otherwise. Returns zeros when ``log_prior`` is ``None`` or
    does not depend on the parameters. Negative values (a locally non-convex prior) are clamped to 0 and a
    :class:`RuntimeWarning` names the tensors. The model is not changed.

    Returns:
        ``[D]`` tensor in ``theta``'s dtype/device.
    """
    P, notes = _measure_prior(model, log_prior, theta)
    if notes["clamped"]:
        warnings.warn(
            f"prior curvature is negative along {sorted(notes['clamped'])}: precision clamped to 0 there",
            RuntimeWarning,
            stacklevel=2,
        )
    return P


# ----------------------------------------------------------------------------------------------- blocks
@dataclass
class _Block:
    """One Kronecker-factored layer: ``n·L·A⊗G + p`` on its weight (and bias) entries."""

    name: str
    kind: str
    weight: str
    bias: str | None
    w_slice: slice
    b_slice: slice | None
    out_dim: int
    in_dim: int  # including the bias column
    eig_A: bool
    eig_G: bool
    module: nn.Module | None = None
    # sums while building
    A_sum: Tensor | None = None
    G_sum: Tensor | None = None
    loc: float = 0.0
    # finalised
    lA: Tensor | None = None
    QA: Tensor | None = None
    lG: Tensor | None = None
    QG: Tensor | None = None
    locations: float = 1.0
    prior: float = 0.0

    def to_matrix(self, v: Tensor) -> Tensor:
        """Entries of ``v [D, k]`` as ``[k, out, in(+1)]``."""
        k = v.shape[1]
        W = v[self.w_slice].reshape(self.out_dim, -1, k)
        if self.b_slice is not None:
            W = torch.cat([W, v[self.b_slice][:, None, :]], dim=1)
        return W.permute(2, 0, 1)

    def from_matrix(self, M: Tensor, out: Tensor) -> None:
        M = M.permute(1, 2, 0)  # [out, in, k]
        k = M.shape[2]
        if self.b_slice is None:
            out[self.w_slice] = M.reshape(-1, k)
        else:
            out[self.w_slice] = M[:, :-1].reshape(-1, k)
            out[self.b_slice] = M[:, -1]

    def meta(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "weight": self.weight,
            "bias": self.bias,
            "out_dim": self.out_dim,
            "in_dim": self.in_dim,
            "eig_A": self.eig_A,
            "eig_G": self.eig_G,
            "locations": self.locations,
            "prior": self.prior,
        }


def _kind(module: nn.Module) -> str | None:
    for cls, kind in _KINDS:
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return kind
    return None


def _candidates(
    model: nn.Module, offsets: dict[str, slice], by_id: dict[int, str], max_factor_dim: int
) -> tuple[list[_Block], dict[str, str]]:
    """Layers that can be Kronecker-factored, and the reason for each trainable parameter they exclude."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    blocks, reasons = [], {}
    for mname, m in model.named_modules():
        kind = _kind(m)
        if kind is None:
            continue
        w, b = m._parameters.get("weight"), m._parameters.get("bias")
        wname = by_id.get(id(w)) if w is not None else None
        bname = by_id.get(id(b)) if b is not None else None
        why = None
        if wname is None:
            why = "its weight is frozen or parametrised"
        elif uses[id(w)] > 1 or (b is not None and uses[id(b)] > 1):
            why = "a parameter shared with another module (tied weights)"
        elif kind != "linear" and m.groups != 1:
            why = f"grouped convolution (groups={m.groups})"
        if why is not None:
            for pname in (wname, bname):
                if pname is not None:
                    reasons[pname] = f"{type(m).__name__} '{mname}': {why}"
            continue
        out_dim = w.shape[0]
        in_dim = w[0].numel() + (1 if bname is not None else 0)
        blocks.append(
            _Block(
                name=mname,
                kind=kind,
                weight=wname,
                bias=bname,
                w_slice=offsets[wname],
                b_slice=offsets[bname] if bname is not None else None,
                out_dim=out_dim,
                in_dim=in_dim,
                eig_A=in_dim <= max_factor_dim,
                eig_G=out_dim <= max_factor_dim,
                module=m,
            )
        )
    return blocks, reasons


_CHUNK_BYTES = 32 * 2**20  # unfolded convolution inputs are processed in chunks of rows of about this size


def _patches(block: _Block, x: Tensor) -> Tensor:
    """Layer inputs as rows ``[rows·locations, in]`` (unfolded for convolutions), without the bias column."""
    m = block.module
    if block.kind == "linear":
        return x.reshape(-1, x.shape[-1])
    spatial = 1 if block.kind == "conv1d" else 2
    if x.dim() == spatial + 1:  # unbatched input
        x = x[None]
    padding = m.padding
    if isinstance(padding, str) or m.padding_mode != "zeros":
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * spatial
    kernel, dilation, stride = m.kernel_size, m.dilation, m.stride
    if spatial == 1:
        x = x.unsqueeze(-1)
        kernel, dilation, stride, padding = (kernel[0], 1), (dilation[0], 1), (stride[0], 1), (padding[0], 0)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [B, C·k, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _chunks(block: _Block, x: Tensor) -> Iterator[Tensor]:
    """Row chunks of the layer input whose unfolded patches take about ``_CHUNK_BYTES`` each."""
    if block.kind == "linear" or x.dim() < 3:
        yield x
        return
    per_row = x[0].numel() * math.prod(block.module.kernel_size) * x.element_size()
    yield from x.split(max(1, _CHUNK_BYTES // max(per_row, 1)))


def _input_moment(block: _Block, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
    """``Σ_{i,l} a_{il} a_{il}ᵀ`` of the bias-augmented inputs (or its diagonal) and the number of locations.

    Unfolds convolution inputs chunk by chunk and appends the bias column algebraically (``Σa``, count), so the
    transient memory stays about ``2·_CHUNK_BYTES`` whatever the batch.
    """
    w_dim = block.in_dim - (1 if block.bias is not None else 0)
    full = block.eig_A
    M = torch.zeros((w_dim, w_dim) if full else (w_dim,), dtype=dtype, device=x.device)
    total = torch.zeros(w_dim, dtype=dtype, device=x.device)
    count = 0
    for part in _chunks(block, x):
        a = _patches(block, part).to(dtype)
        M += a.T @ a if full else a.square().sum(0)
        if block.bias is not None:
            total += a.sum(0)
        count += a.shape[0]
        del a
    if block.bias is None:
        return M, count
    if not full:
        return torch.cat([M, M.new_full((1,), float(count))]), count
    A = M.new_empty(w_dim + 1, w_dim + 1)
    A[:w_dim, :w_dim], A[:w_dim, w_dim], A[w_dim, :w_dim], A[w_dim, w_dim] = M, total, total, float(count)
    return A, count


def _out_rows(block: _Block, g: Tensor) -> Tensor:
    """Gradients w.r.t. the layer output as rows ``[rows·locations, out]``."""
    if block.kind == "linear":
        return g.reshape(-1, g.shape[-1])
    if g.dim() == (2 if block.kind == "conv1d" else 3):
        g = g[None]
    return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])


def _second_moment(x: Tensor, full: bool) -> Tensor:
    return x.T @ x if full else x.square().sum(0)


def _owner_reason(model: nn.Module, name: str) -> str:
    owner_name = name.rsplit(".", 1)[0] if "." in name else ""
    owner = model.get_submodule(owner_name) if owner_name else model
    if _kind(owner) is not None:
        return (
            f"{type(owner).__name__} '{owner_name}': its forward hook did not fire (the weight is used directly, "
            "e.g. through F.linear inside MultiheadAttention)"
        )
    return f"{type(owner).__name__} parameter: no Kronecker factorisation for this layer type"


# ----------------------------------------------------------------------------------------------- main class
class KroneckerCurvature:
    r"""``K = P + n·E[C_i]``: Kronecker blocks for Linear/Conv layers, a diagonal for every other parameter.

    Build with :meth:`build` (see the module docstring for the method). ``K @ v``, ``solve(v, damping)`` (the
    inverse of ``K + damping·I``, closed form for any damping) and ``quad(x)`` cost a few small matrix products per
    layer; ``n`` can be reset to a new number of remaining points without rebuilding. ``info`` records what was
    approximated how.
    """

    def __init__(
        self,
        blocks: list[_Block],
        dim: int,
        prior: Tensor,
        diag_index: Tensor,
        diag_fisher: Tensor,
        n: int,
        info: dict[str, Any],
    ) -> None:
        self.blocks = blocks
        self.dim = int(dim)
        self.prior = prior  # [D]
        self.diag_index = diag_index  # [Dd] long
        self.diag_fisher = diag_fisher  # [Dd]: mean per-row Fisher diagonal
        self.n = n
        self.info = info

    # -------------------------------------------------------------------------------------------- n
    @property
    def n(self) -> int:
        """Number of data points the data term is scaled to (settable)."""
        return self._n

    @n.setter
    def n(self, value: int) -> None:
        if int(value) != value or value < 0:
            raise ValueError(f"n must be a non-negative integer, got {value}")
        self._n = int(value)

    # ----------------------------------------------------------------------------------------- build
    @classmethod
    def build(
        cls,
        model: nn.Module,
        thetas: Tensor,
        batches: Sequence[Batch],
        n: int,
        *,
        nll: NLL | None = None,
        log_prior: Callable[[nn.Module], Tensor] | None = None,
        likelihood: Likelihood | str = "auto",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        max_factor_dim: int = 4096,
        sigma: float | None = None,
        exact_expectation: bool | None = None,
    ) -> KroneckerCurvature:
        """Accumulate the factors over posterior draws ``thetas[s]`` with minibatches ``batches[s]``.

        Args:
            model: Any ``nn.Module``; unchanged on return (parameters, buffers, ``.grad``, global RNG).
            thetas: Posterior draws ``[S, D]`` (flat trainable parameters, :class:`~.curvature.ParamSpec` order).
            batches: ``S`` minibatches ``(x, y, ...)`` (or one, used for every draw); ``x = batch[0]`` has the
                rows on its first dimension.
            n: Number of data points the data term is scaled to.
            nll: ``nll(model, batch) -> [B]``; probed by :func:`detect_likelihood` when ``likelihood="auto"``,
                and used directly for ``"empirical"``.
            log_prior: ``log_prior(model) -> scalar``; its curvature at the draws' mean gives ``P``
                (:func:`prior_precision`); ``None``: no prior term.
            likelihood: ``"auto"`` (detect from ``nll``; without ``nll``: categorical for integer labels and
                ``[B, C]`` outputs), ``"categorical"``, ``"gaussian"`` or ``"empirical"``.
            mc_samples: Sampled labels (one backward pass each) per draw.
            generator: Generator for the labels and random signs (default: a fresh one seeded 0); the global RNG
                is never used.
            reduce: Applied to every accumulated sum (factor sums, location/row counts, squared gradients) before
                finalising, e.g. an all-reduce over ``torch.distributed`` ranks.
            max_factor_dim: Factors larger than this keep only their diagonal.
            sigma: Noise standard deviation for ``likelihood="gaussian"`` when it cannot be read off ``nll``.
            exact_expectation: Take the label expectation exactly (one backward per output dimension) instead of
                sampling; default: exactly when the model has at most ``mc_samples`` outputs per row.

        Raises:
            ValueError: on inconsistent shapes, an unknown likelihood, or a likelihood that cannot be used.
        """
        t_start = time.perf_counter()
        try:
            lik = Likelihood(likelihood)
        except ValueError:
            options = ", ".join(repr(k.value) for k in Likelihood)
            raise ValueError(f"unknown likelihood {likelihood!r}: use one of {options}") from None
        spec, offsets, by_id = _slices(model)
        if thetas.dim() == 1:
            thetas = thetas[None]
        if thetas.dim() != 2 or thetas.shape[1] != spec.dim:
            raise ValueError(
                f"thetas must be [S, {spec.dim}] (the model's trainable parameters), got {tuple(thetas.shape)}"
            )
        S = thetas.shape[0]
        batches = [tuple(b) for b in batches]
        if len(batches) not in (1, S):
            raise ValueError(f"give one minibatch per draw ({S}) or one for all draws, got {len(batches)}")
        if int(mc_samples) < 1:
            raise ValueError(f"mc_samples must be at least 1, got {mc_samples}")
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        if max_factor_dim < 1:
            raise ValueError(f"max_factor_dim must be positive, got {max_factor_dim}")
        mc_samples = int(mc_samples)
        info: dict[str, Any] = {"draws": S, "mc_samples": mc_samples, "model_training": bool(model.training)}

        # ---- likelihood
        detected: dict[str, Any] = {}
        if lik is Likelihood.AUTO:
            if nll is not None:
                lik, detected = detect_likelihood(model, nll, batches[0])
            else:
                lik = cls._guess_without_nll(model, batches[0])
        if lik is Likelihood.GAUSSIAN and sigma is None:
            if nll is not None and not detected:
                kind, detected = detect_likelihood(model, nll, batches[0])
                if kind is not Likelihood.GAUSSIAN:
                    raise ValueError(
                        "likelihood='gaussian' but nll is not a Gaussian NLL in model(x): pass sigma=... or "
                        "likelihood='empirical'"
                    )
            sigma = detected.get("sigma")
            if sigma is None:
                raise ValueError("likelihood='gaussian' needs the noise scale: pass sigma=... or a Gaussian nll")
        if lik is Likelihood.EMPIRICAL and nll is None:
            raise ValueError("likelihood='empirical' needs nll(model, batch) -> [B]")
        if lik is Likelihood.GAUSSIAN and not (sigma > 0):
            raise ValueError(f"sigma must be positive, got {sigma}")
        info["likelihood"] = lik.value
        info["sigma"] = float(sigma) if lik is Likelihood.GAUSSIAN else None
        if detected.get("reason"):
            info["likelihood_reason"] = detected["reason"]

        # ---- prior
        P, prior_notes = _measure_prior(model, log_prior, thetas.mean(0))
        info["prior"] = prior_notes

        # ---- statistics
        blocks, reasons = _candidates(model, offsets, by_id, max_factor_dim)
        gen = generator if generator is not None else torch.Generator(device=thetas.device).manual_seed(0)
        dtype, device = thetas.dtype, thetas.device
        by_module = {b.module: b for b in blocks}
        calls: list[tuple[_Block, Tensor]] = []
        fired: set[str] = set()

        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            blk = by_module[module]
            if not isinstance(out, Tensor) or not args or not isinstance(args[0], Tensor):
                return None
            fired.add(blk.name)
            stat, count = _input_moment(blk, args[0].detach(), dtype)
            blk.A_sum = stat if blk.A_sum is None else blk.A_sum + stat
            blk.loc += count
            if not out.requires_grad:
                return None
            calls.append((blk, out))
            return out.clone()  # in-place ops downstream change the clone, not the tensor we differentiate

        handles = [b.module.register_forward_hook(hook) for b in blocks]
        diag_params: list[nn.Parameter] = []
        diag_names: list[str] = []
        diag_sum: Tensor | None = None
        rows = 0.0
        passes = forwards = 0
        record = {"mode": "empirical"}
        named = dict(model.named_parameters())
        try:
            with _preserved(model), torch.enable_grad():
                for s in range(S):
                    ParamSpec.assign(model, thetas[s])
                    batch = batches[s if len(batches) > 1 else 0]
                    B = _field_rows(batch)
                    calls.clear()
                    fired.clear()
                    losses = cls._losses(model, batch, lik, nll, mc_samples, exact_expectation, sigma, gen, record)
                    first = next(losses)  # runs the forward pass (hooks fire)
                    forwards += 1
                    if s == 0:
                        for b in blocks:
                            if b.name not in fired:
                                for pname in (b.weight, b.bias):
                                    if pname is not None:
                                        reasons[pname] = _owner_reason(model, pname)
                        blocks = [b for b in blocks if b.name in fired]
                        covered = {p for b in blocks for p in (b.weight, b.bias) if p is not None}
                        diag_names = [name for name in spec.names if name not in covered]
                        for name in diag_names:
                            reasons.setdefault(name, _owner_reason(model, name))
                        diag_params = [named[name] for name in diag_names]
                        diag_sum = torch.zeros(sum(named[k].numel() for k in diag_names), dtype=dtype, device=device)
                    missing = {b.name for b in blocks} - fired
                    if missing:
                        raise RuntimeError(
                            f"layers {sorted(missing)} ran at the first draw but not at draw {s}: the model's control "
                            "flow must not depend on the parameters"
                        )
                    rows += B
                    loss: Tensor | None = first
                    while loss is not None:
                        nxt = next(losses, None)
                        inputs = [o for _, o in calls] + diag_params
                        grads = torch.autograd.grad(loss, inputs, retain_graph=nxt is not None, allow_unused=True)
                        passes += 1
                        for (blk, _), g in zip(calls, grads):
                            if g is None:
                                continue
                            gr = _out_rows(blk, g.detach()).to(dtype)
                            stat = _second_moment(gr, blk.eig_G)
                            blk.G_sum = stat if blk.G_sum is None else blk.G_sum + stat
                        pos = 0
                        for p, g in zip(diag_params, grads[len(calls) :]):
                            k = p.numel()
                            if g is not None:
                                diag_sum[pos : pos + k] += g.detach().reshape(-1).to(dtype).square()
                            pos += k
                        del grads
                        loss = nxt
                    calls.clear()
        finally:
            for h in handles:
                h.remove()
            calls.clear()
        for b in blocks:
            b.module = None
        mode = record["mode"]
        passes_per_label = mc_samples if mode == "mc" else 1

        # ---- reduce and finalise
        red = reduce if reduce is not None else (lambda t: t)
        for b in blocks:
            if b.G_sum is None:  # no gradient reached the layer's output: zero curvature
                b.G_sum = (
                    torch.zeros(b.out_dim, b.out_dim, dtype=dtype, device=device)
                    if b.eig_G
                    else torch.zeros(b.out_dim, dtype=dtype, device=device)
                )
            b.A_sum = red(b.A_sum)
            b.G_sum = red(b.G_sum)
            b.loc = float(red(torch.tensor(b.loc, dtype=torch.float64, device=device)))
        diag_sum = red(diag_sum)
        rows = float(red(torch.tensor(rows, dtype=torch.float64, device=device)))
        t_eig = time.perf_counter()
        notes_nonconst = []
        for b in blocks:
            A = b.A_sum / max(b.loc, 1.0)
            G = b.G_sum / (max(b.loc, 1.0) * passes_per_label)
            b.A_sum = b.G_sum = None
            b.locations = b.loc / max(rows, 1.0)
            b.lA, b.QA = cls._eig(A, b.eig_A)
            b.lG, b.QG = cls._eig(G, b.eig_G)
            pb = P[b.w_slice] if b.b_slice is None else torch.cat([P[b.w_slice], P[b.b_slice]])
            b.prior = float(pb.mean()) if pb.numel() else 0.0
            if pb.numel() and float(pb.max() - pb.min()) > 1e-6 * max(abs(b.prior), 1e-30):
                notes_nonconst.append(b.name)
        eig_seconds = time.perf_counter() - t_eig
        diag_index = torch.cat(
            [torch.arange(offsets[k].start, offsets[k].stop, device=device) for k in diag_names]
            or [torch.zeros(0, dtype=torch.long, device=device)]
        )
        diag_fisher = diag_sum / (max(rows, 1.0) * passes_per_label)
        prior_notes["mean_used_on_blocks"] = notes_nonconst

        fisher = {
            "mc": f"GGN/Fisher with {mc_samples} sampled label(s) per row and draw",
            "exact": "GGN/Fisher with the exact expectation over labels (one backward per output dimension)",
            "empirical": "EMPIRICAL Fisher: gradients of nll at the true labels (a weaker curvature approximation)",
        }[mode]
        info.update(
            fisher=fisher,
            label_expectation=mode,
            rows=rows,
            forward_passes=forwards,
            backward_passes=passes,
            kronecker={
                b.name: {
                    "params": [p for p in (b.weight, b.bias) if p is not None],
                    "A_dim": b.in_dim,
                    "G_dim": b.out_dim,
                    "A": "eigh" if b.eig_A else "diagonal (dim > max_factor_dim)",
                    "G": "eigh" if b.eig_G else "diagonal (dim > max_factor_dim)",
                    "locations": b.locations,
                }
                for b in blocks
            },
            diagonal=dict(sorted((k, reasons[k]) for k in diag_names)),
            kronecker_params=sum(b.out_dim * b.in_dim for b in blocks),
            diagonal_params=int(diag_index.numel()),
            eigh_seconds=eig_seconds,
            build_seconds=time.perf_counter() - t_start,
        )
        return cls(blocks, spec.dim, P, diag_index, diag_fisher, n, info)

    @staticmethod
    def _guess_without_nll(model: nn.Module, batch: Batch) -> Likelihood:
        probe = _head(batch, _PROBE_ROWS)
        y = probe[1] if len(probe) > 1 else None
        with _preserved(model), torch.no_grad():
            out = model(probe[0])
        if isinstance(out, Tensor) and out.dim() == 2 and isinstance(y, Tensor) and not y.is_floating_point():
            return Likelihood.CATEGORICAL
        raise ValueError(
            "cannot tell the likelihood without nll: pass nll=..., or likelihood='categorical' / 'gaussian' (sigma=...)"
        )

    @staticmethod
    def _losses(
        model: nn.Module,
        batch: Batch,
        lik: Likelihood,
        nll: NLL | None,
        mc_samples: int,
        exact: bool | None,
        sigma: float | None,
        gen: torch.Generator,
        record: dict[str, str],
    ) -> Iterator[Tensor]:
        """Scalar losses whose backward passes give the statistics; the first item runs the forward pass.

        ``record["mode"]`` is set to ``"mc"``, ``"exact"`` or ``"empirical"`` once the forward has run.
        """
        B = _field_rows(batch)

        def signs(ref: Tensor) -> Tensor:
            r = torch.randint(0, 2, (B,), generator=gen, device=gen.device).to(ref.device, ref.dtype)
            return 2 * r - 1

        if lik is Likelihood.EMPIRICAL:
            values = nll(model, batch)
            if not isinstance(values, Tensor) or values.shape != (B,):
                raise ValueError(f"nll(model, batch) must return shape [{B}]")
            record["mode"] = "empirical"
            yield (signs(values) * values).sum()
            return
        out = model(batch[0])
        if not isinstance(out, Tensor) or out.shape[:1] != (B,):
            raise ValueError(f"model(x) must return a tensor with {B} rows for likelihood={lik.value!r}")
        if lik is Likelihood.CATEGORICAL and out.dim() != 2:
            raise ValueError(f"likelihood='categorical' needs model(x) of shape [B, C], got {tuple(out.shape)}")
        width = out[0].numel()
        use_exact = exact if exact is not None else width <= mc_samples
        record["mode"] = "exact" if use_exact else "mc"
        if lik is Likelihood.CATEGORICAL:
            logp = torch.log_softmax(out, -1)
            probs = logp.detach().exp()
            if use_exact:  # Σ_c p_c (p − e_c)(p − e_c)ᵀ = diag(p) − ppᵀ, the softmax's output Hessian
                r = signs(out)
                for c in range(width):
                    yield -(r * probs[:, c].sqrt() * logp[:, c]).sum()
            else:
                for _ in range(mc_samples):
                    yhat = torch.multinomial(probs.to(gen.device, torch.float64), 1, generator=gen)[:, 0]
                    yield -logp.gather(1, yhat.to(out.device)[:, None]).sum()
        else:
            if use_exact:  # Σ_k e_k e_kᵀ / σ² = I/σ², the Gaussian's output Hessian
                r = signs(out)
                flat = out.reshape(B, -1)
                for k in range(width):
                    yield (r * flat[:, k]).sum() / sigma
            else:
                mu = out.detach()
                for _ in range(mc_samples):
                    eps = torch.randn(mu.shape, generator=gen, device=gen.device, dtype=torch.float64)
                    yhat = mu + sigma * eps.to(mu.device, mu.dtype)
                    yield (out - yhat).square().sum() / (2 * sigma**2)

    @staticmethod
    def _eig(M: Tensor, full: bool) -> tuple[Tensor, Tensor | None]:
        if not full:
            return M.clamp_min(0), None
        lam, Q = torch.linalg.eigh(0.5 * (M + M.T))
        return lam.clamp_min(0), Q.contiguous()

    # ------------------------------------------------------------------------------------- products
    def _denominators(self, damping: float, dtype: torch.dtype, device: torch.device) -> Iterator[Tensor]:
        for b in self.blocks:
            lG, lA = b.lG.to(device, dtype), b.lA.to(device, dtype)
            yield self.n * b.locations * lG[:, None] * lA[None, :] + (b.prior + damping)
        yield self.n * self.diag_fisher.to(device, dtype) + self.prior[self.diag_index].to(device, dtype) + damping

    def _apply(self, v: Tensor, inverse: bool, damping: float) -> Tensor:
        if v.shape[0] != self.dim or v.dim() not in (1, 2):
            raise ValueError(f"expected a vector [{self.dim}] or matrix [{self.dim}, k], got {tuple(v.shape)}")
        V = v.detach()[:, None] if v.dim() == 1 else v.detach()
        out = torch.empty_like(V)
        dens = self._denominators(damping, V.dtype, V.device)
        for b, den in zip(self.blocks, dens):
            M = b.to_matrix(V)  # [k, out, in]
            QG = b.QG.to(V.device, V.dtype) if b.QG is not None else None
            QA = b.QA.to(V.device, V.dtype) if b.QA is not None else None
            if QG is not None:
                M = QG.T @ M
            if QA is not None:
                M = M @ QA
            if inverse:
                if float(den.min()) <= 0:
                    raise ValueError(f"K + {damping}·I is singular on layer '{b.name}': pass damping > 0")
                M = M / den
            else:
                M = M * den
            if QG is not None:
                M = QG @ M
            if QA is not None:
                M = M @ QA.T
            b.from_matrix(M, out)
        den = next(dens)
        idx = self.diag_index.to(V.device)
        if inverse and den.numel() and float(den.min()) <= 0:
            raise ValueError(f"K + {damping}·I is singular on diagonal parameters: pass damping > 0")
        out[idx] = V[idx] / den[:, None] if inverse else V[idx] * den[:, None]
        return out[:, 0] if v.dim() == 1 else out

    def solve(self, v: Tensor, damping: float = 0.0) -> Tensor:
        """``(K + damping·I)⁻¹ v`` for ``v`` of shape ``[D]`` or ``[D, k]`` (closed form for any damping)."""
        return self._apply(v, True, float(damping))

    def __matmul__(self, v: Tensor) -> Tensor:
        """``K v`` for ``v`` of shape ``[D]`` or ``[D, k]``."""
        return self._apply(v, False, 0.0)

    def matvec(self, v: Tensor) -> Tensor:
        """Same as ``self @ v``."""
        return self @ v

    def quad(self, x: Tensor) -> float:
        """``xᵀ K x`` for ``x`` of shape ``[D]``."""
        return float(x.detach().reshape(-1) @ (self @ x.detach().reshape(-1)))

    # ----------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors (eigenbases, eigenvalues, prior, diagonal) and JSON-able metadata, for safetensors + JSON."""
        tensors = {"prior": self.prior, "diag_index": self.diag_index, "diag_fisher": self.diag_fisher}
        for i, b in enumerate(self.blocks):
            tensors[f"block{i}.lA"], tensors[f"block{i}.lG"] = b.lA, b.lG
            if b.QA is not None:
                tensors[f"block{i}.QA"] = b.QA
            if b.QG is not None:
                tensors[f"block{i}.QG"] = b.QG
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        meta = {
            "format": "kronecker-curvature/1",
            "n": self.n,
            "dim": self.dim,
            "blocks": [b.meta() for b in self.blocks],
        }
        meta["info"] = self.info
        return tensors, meta

    @classmethod
    def from_state_dict(cls, model: nn.Module, tensors: dict[str, Tensor], meta: dict[str, Any]) -> KroneckerCurvature:
        """Rebuild from :meth:`state_dict` output; ``model`` must have the same trainable parameters.

        Raises:
            ValueError: if the saved curvature does not match the model's parameters.
        """
        if meta.get("format") != "kronecker-curvature/1":
            raise ValueError(f"not a saved KroneckerCurvature (format {meta.get('format')!r})")
        spec, offsets, _ = _slices(model)
        if int(meta["dim"]) != spec.dim:
            raise ValueError(f"saved curvature has {meta['dim']} parameters, the model {spec.dim}: wrong model")
        blocks = []
        for i, bm in enumerate(meta["blocks"]):
            for pname in (bm["weight"], bm["bias"]):
                if pname is not None and pname not in offsets:
                    raise ValueError(f"saved curvature refers to parameter '{pname}', which the model lacks")
            w, bias = offsets[bm["weight"]], offsets[bm["bias"]] if bm["bias"] is not None else None
            size = (w.stop - w.start) + (bias.stop - bias.start if bias is not None else 0)
            if size != bm["out_dim"] * bm["in_dim"]:
                raise ValueError(f"layer '{bm['name']}' has a different shape in the model than in the saved curvature")
            blk = _Block(
                name=bm["name"],
                kind=bm["kind"],
                weight=bm["weight"],
                bias=bm["bias"],
                w_slice=w,
                b_slice=bias,
                out_dim=int(bm["out_dim"]),
                in_dim=int(bm["in_dim"]),
                eig_A=bool(bm["eig_A"]),
                eig_G=bool(bm["eig_G"]),
                lA=tensors[f"block{i}.lA"],
                QA=tensors.get(f"block{i}.QA"),
                lG=tensors[f"block{i}.lG"],
                QG=tensors.get(f"block{i}.QG"),
                locations=float(bm["locations"]),
                prior=float(bm["prior"]),
            )
            blocks.append(blk)
        prior = tensors["prior"]
        if prior.shape != (spec.dim,):
            raise ValueError(f"saved prior has shape {tuple(prior.shape)}, expected [{spec.dim}]")
        return cls(
            blocks, spec.dim, prior, tensors["diag_index"].long(), tensors["diag_fisher"], int(meta["n"]), meta["info"]
        )

    # ---------------------------------------------------------------------------------------- memory
    @staticmethod
    def memory_estimate(model: nn.Module, batch_rows: int, example_batch: Batch, max_factor_dim: int = 4096) -> int:
        """Peak bytes :meth:`build` will allocate for minibatches of ``batch_rows`` rows, estimated before building.

        Two tiny probe forward passes (with gradients, on 1-4 rows of ``example_batch``) measure the bytes autograd
        saves per row and in total (``saved_tensors_hooks``), the layer outputs that the build clones and
        differentiates, and the largest unfolded layer input; the factors add ``Σ (in² + out²)`` elements twice
        (sums and eigenbases) plus the eigen-solver's workspace, the parameters a few copies of ``D``. Activation
        memory is linear in rows, so the estimate is too; allocator overhead and fragmentation are not included.
        """
        batch = tuple(example_batch)
        have = _field_rows(batch)
        sizes = (2, 4) if have >= 4 else (1, max(have, 1)) if have >= 2 else (1, 1)
        spec, offsets, by_id = _slices(model)
        blocks, _ = _candidates(model, offsets, by_id, max_factor_dim)
        by_module = {b.module: b for b in blocks}
        measured = []
        for rows in sizes:
            stats = {"saved": 0, "block_out": 0, "patch": 0, "largest": 0}
            seen: set[int] = set()

            def pack(t: Tensor, stats: dict = stats, seen: set = seen) -> Tensor:
                key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
                if key not in seen and not isinstance(t, nn.Parameter):
                    seen.add(key)
                    stats["saved"] += t.untyped_storage().nbytes()
                    stats["largest"] = max(stats["largest"], t.untyped_storage().nbytes())
                return t

            def hook(module: nn.Module, args: tuple, out: Any, stats: dict = stats) -> None:
                blk = by_module[module]
                if isinstance(out, Tensor) and args and isinstance(args[0], Tensor):
                    stats["block_out"] += out.numel() * out.element_size()
                    a = _patches(blk, args[0].detach())
                    stats["patch"] = max(stats["patch"], a.numel() * a.element_size())

            handles = [b.module.register_forward_hook(hook) for b in blocks]
            try:
                with (
                    _preserved(model),
                    torch.enable_grad(),
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
                ):
                    model(_head(batch, rows)[0])
            finally:
                for h in handles:
                    h.remove()
            measured.append((rows, stats))
        (r1, s1), (r2, s2) = measured
        per_row = {k: (s2[k] - s1[k]) / (r2 - r1) if r2 > r1 else s2[k] / r2 for k in s1}
        fixed = {k: max(s1[k] - per_row[k] * r1, 0.0) for k in s1}
        est = {k: fixed[k] + per_row[k] * batch_rows for k in s1}
        itemsize = next(model.parameters()).element_size()
        factors = sum((b.in_dim**2 if b.eig_A else b.in_dim) + (b.out_dim**2 if b.eig_G else b.out_dim) for b in blocks)
        largest_factor = max(
            [b.in_dim if b.eig_A else 0 for b in blocks] + [b.out_dim if b.eig_G else 0 for b in blocks] + [0]
        )
        patch = min(est["patch"], _CHUNK_BYTES + per_row["patch"])  # unfolded in chunks of rows
        passes = est["saved"] + 2 * est["block_out"] + 2 * max(patch, est["largest"])
        eig = 3 * largest_factor**2 * itemsize
        params = 4 * spec.dim * itemsize
        return int(passes + 2 * factors * itemsize + eig + params)
