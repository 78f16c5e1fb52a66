"""Curvature as linear operators on flat parameter vectors.

* :class:`ParamSpec` flattens a module's parameters to one vector and back (views, no copies).
* :func:`functionalize` turns ``fn(model, *args)`` into ``f(θ_flat, *args)`` with ``torch.func.functional_call``.
* :class:`SampleAveragedHessian` is ``v ↦ (1/S) Σ_s ∇²f(θ_s, B_s)·v`` (+ damping) over a fixed set of
  posterior draws ``θ_s`` and minibatches ``B_s``: the ``E_θ[∇²F(θ, S)]`` of the MCMC influence function
  (Fu, He & Tao, ICLR 2022, eq. 7). Products are forward-over-reverse (``jvp`` of ``grad``) vmapped over draws;
  if the model does not support ``torch.func`` they fall back to double backward, one draw at a time.
* :func:`top_eigenvalue` is power iteration on such an operator; :func:`lanczos` and
  :class:`LowRankPreconditioner` give a reusable low-rank-plus-scalar approximation of it.

Every operator is checked against a dense float64 reference in ``tests/test_curvature.py``.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

_JVP_DECOMPOSITIONS = False


def jvp(func: Callable[..., Any], primals: tuple, tangents: tuple, **kwargs: Any) -> Any:
    """:func:`torch.func.jvp`, with torch's forward-mode decompositions loaded first with their deprecation warnings
    silenced. torch (2.13) imports ``torch._decomp.decompositions_for_jvp`` on the first ``make_dual`` of a process,
    under the same condition as here, and that module scripts 18 functions with ``torch.jit.script``, each warning
    "``torch.jit.script`` is deprecated" from inside torch (a first request showed 18 of them). The same module,
    imported a moment earlier: the numbers are the same; only that warning, during that import, is silenced."""
    load_forward_decompositions()
    return torch.func.jvp(func, primals, tangents, **kwargs)


def load_forward_decompositions() -> None:
    """Import torch's forward-mode decompositions once, their ``torch.jit.script`` deprecation warnings silenced
    (:func:`jvp`): call before any forward-mode transform, ``torch.func.jvp``, ``jacfwd`` or ``torch.func.hessian``
    (the Gauss-Newton backend's prior Hessian leaked the 18 warnings to a caller's first request until stop 59)."""
    global _JVP_DECOMPOSITIONS
    if not _JVP_DECOMPOSITIONS:
        _JVP_DECOMPOSITIONS = True
        if os.environ.get("PYTORCH_JIT", "1") == "1" and __debug__:  # torch.autograd.forward_ad's own condition
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"`torch\.jit\.script` is deprecated", DeprecationWarning)
                try:
                    importlib.import_module("torch._decomp.decompositions_for_jvp")
                except Exception:  # torch imports it itself at the first forward-mode product, as before
                    pass


__all__ = [
    "LowRankPreconditioner",
    "ParamSpec",
    "SampleAveragedHessian",
    "aliased_parameters",
    "autograd_hvp",
    "call_with",
    "functionalize",
    "lanczos",
    "stack_batches",
    "top_eigenvalue",
]

Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class ParamSpec:
    """Names and shapes of a module's trainable parameters, in ``named_parameters`` order."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParamSpec:
        """Spec of ``model``'s parameters that require grad."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def dim(self) -> int:
        """Total number of scalar parameters."""
        return sum(self.numels)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into a ``{name: tensor}`` dict of views."""
        parts = torch.split(theta, self.numels)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes)}

    @staticmethod
    def flatten_module(model: nn.Module) -> torch.Tensor:
        """The module's trainable parameters as one detached flat vector (a copy)."""
        return torch.cat([p.detach().reshape(-1) for p in ParamSpec.params(model)])

    @staticmethod
    def params(model: nn.Module) -> list[nn.Parameter]:
        """The module's trainable parameters, in the order of the flat vector (``named_parameters`` order, as
        :meth:`of`: a module that overrides ``parameters()`` with another order must not scramble the vector)."""
        return [p for _, p in model.named_parameters() if p.requires_grad]

    @staticmethod
    @torch.no_grad()
    def assign(model: nn.Module, theta: torch.Tensor) -> None:
        """Copy a flat vector into the module's trainable parameters in place."""
        offset = 0
        for p in ParamSpec.params(model):
            k = p.numel()
            p.copy_(theta[offset : offset + k].view_as(p))
            offset += k


class _Call(nn.Module):
    """Wraps ``fn(model, *args)`` as a module so ``functional_call`` can swap the parameters.

    A ``torch.compile``d model is evaluated through the module it wraps (``_orig_mod``, the same parameters): every
    call here swaps the parameters, which fails the compiled graph's guards and would recompile it.
    :class:`~mcmc_unlearner.unlearner.MCMCUnlearner` unwraps such a model when it is built (docs/model-matrix.md).
    """

    def __init__(self, model: nn.Module, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.m = model
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(eager(self.m), *args)


def eager(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``d model wraps (the same parameters), else the model itself."""
    inner = getattr(model, "_orig_mod", None)
    return inner if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) else model


def aliased_parameters(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """The parameters of submodules registered under more than one name (``self.b2 = self.b``)."""
    seen: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
    return [
        (m, name, p) for m in model.modules() if seen[id(m)] > 1 for name, p in m._parameters.items() if p is not None
    ]


@contextmanager
def plain_attention() -> Iterator[None]:
    """Evaluate attention on torch's math kernel, without the inference fast path.

    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` pick a fused CPU kernel by default, which has neither a
    double backward nor a forward-mode derivative (curvature products and the safety check failed on a plain
    transformer), and in eval mode without gradients a fused inference path that ``vmap`` has no batching rule for
    (torch warns of a performance drop). The math kernel computes the same function (up to rounding) with both
    derivatives; models without attention are unaffected.
    """
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), plain_weight_norm():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


@contextmanager
def dense_embedding_grads(model: nn.Module) -> Iterator[None]:
    """Evaluate ``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=False`` and ``scale_grad_by_freq=False``.

    Neither flag changes the function the layer computes, only the gradient autograd returns for its weight:
    ``sparse=True`` gives a sparse COO gradient (which cannot be flattened, batched by ``vmap`` or squared into a
    diagonal: every request crashed with "reshape is not implemented for sparse tensors"), and
    ``scale_grad_by_freq=True`` divides each row's gradient by the token's count in the batch, which is not the
    gradient of ``nll`` (the removal then used other derivatives than those of the energy, silently). The flags are
    restored on exit.
    """
    mods = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    saved = [(m.sparse, m.scale_grad_by_freq) for m in mods]
    for m in mods:
        m.sparse = False
        m.scale_grad_by_freq = False
    try:
        yield
    finally:
        for m, (sp, sc) in zip(mods, saved):
            m.sparse, m.scale_grad_by_freq = sp, sc


def _composite_weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``torch._weight_norm`` as plain differentiable operations (its own non-fused formula)."""
    return v * (g / torch.norm_except_dim(v, 2, dim))


#: The start of torch's functorch warning that ``vmap`` runs an operation without a batching rule (one draw at a time).
VMAP_FALLBACK = "There is a performance drop because we have not yet implemented the batching rule for "


@contextmanager
def quiet_vmap_fallbacks() -> Iterator[set[str]]:
    """Keep torch's "performance drop ... batching rule for OP" warnings from the caller while the library runs
    (stop 57's probe: 12 a request for Mish, 4 for ``ctc_loss``, on every request): only that ``UserWarning``
    message, only inside the block and only on its thread; every other warning reaches the caller's filters and
    handlers as before. The yielded set collects the operations named (``"aten::mish_backward"``), for the report.

    The filters are not touched (``warnings.catch_warnings`` resets Python's record of warnings already shown, so
    a once-per-location warning from the user's own ``nll`` came back on every request: stop 57's review); only
    ``warnings.showwarning`` is wrapped, once while any thread is inside, and put back when the last one leaves
    (unless the caller replaced it meanwhile)."""
    ops: set[str] = set()
    outer = getattr(_QUIET, "ops", None)
    with _QUIET_LOCK:
        if _QUIET_STATE["depth"] == 0:
            _QUIET_STATE["shown"] = warnings.showwarning
            warnings.showwarning = _quiet_show
        _QUIET_STATE["depth"] += 1
    _QUIET.ops = ops
    try:
        yield ops
    finally:
        _QUIET.ops = outer
        with _QUIET_LOCK:
            _QUIET_STATE["depth"] -= 1
            if _QUIET_STATE["depth"] == 0:
                if warnings.showwarning is _quiet_show:
                    warnings.showwarning = _QUIET_STATE["shown"]
                _QUIET_STATE["shown"] = None


_QUIET_LOCK = threading.Lock()
_QUIET_STATE: dict[str, Any] = {"depth": 0, "shown": None}  # threads inside, the handler wrapped
_QUIET = threading.local()  # .ops: this thread's collecting set inside quiet_vmap_fallbacks, else None


def _quiet_show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None):
    """:func:`quiet_vmap_fallbacks`'s ``warnings.showwarning``: a vmap fallback warning on a thread inside it is
    collected, everything else goes to the handler it wrapped."""
    text = str(message)
    ops = getattr(_QUIET, "ops", None)
    if ops is not None and issubclass(category, UserWarning) and text.startswith(VMAP_FALLBACK):
        ops.add(text[len(VMAP_FALLBACK) :].split(". ")[0].rstrip("."))
        return
    shown = _QUIET_STATE["shown"] or warnings._showwarning_orig  # type: ignore[attr-defined]
    shown(message, category, filename, lineno, file, line)


@contextmanager
def plain_weight_norm() -> Iterator[None]:
    """Evaluate weight normalisation (``nn.utils.parametrizations.weight_norm`` and the hook-based
    ``nn.utils.weight_norm``) as plain operations.

    torch's fused ``_weight_norm`` (``_weight_norm_interface`` on CPU) has a wrong double backward in torch 2.13
    (``gradgradcheck`` fails: Hessian products of a weight-normed MLP 4-15% off finite differences, silently) and no
    forward-mode derivative. ``v · g / ‖v‖`` written out is the same function with correct derivatives of every
    order.
    """
    hooked = sys.modules.get("torch.nn.utils.weight_norm")
    saved = torch._weight_norm, getattr(hooked, "_weight_norm", None)
    torch._weight_norm = _composite_weight_norm
    if saved[1] is not None:
        hooked._weight_norm = _composite_weight_norm
    try:
        yield
    finally:
        torch._weight_norm = saved[0]
        if saved[1] is not None:
            hooked._weight_norm = saved[1]


def call_with(
    module: nn.Module,
    params: dict[str, torch.Tensor],
    args: tuple,
    aliased: list[tuple[nn.Module, str, nn.Parameter]] | None = None,
    **kwargs: Any,
) -> Any:
    """``torch.func.functional_call(module, params, args)`` that leaves ``module``'s parameters as they were.

    In torch 2.13 ``functional_call`` does not restore the parameters of a submodule registered under two names
    (``self.b2 = self.b``): the tensors passed in stay registered afterwards, so the model would silently stop
    using its own parameters. They are put back here (``aliased``: :func:`aliased_parameters` of ``module``,
    computed once by callers that call often).

    Attention runs as plain differentiable operations here (:func:`plain_attention`), and TorchScript modules on
    the interpreter: their optimised graph (from a module's second call on) gave forward-mode and
    reverse-over-reverse derivatives of its gradient as zeros, silently (Hessian-vector products of a scripted MLP
    were 0 from the second product on).
    """
    aliased = aliased_parameters(module) if aliased is None else aliased
    try:
        with plain_attention(), torch.jit.optimized_execution(False):
            return functional_call(module, params, args, **kwargs)
    finally:
        for m, name, p in aliased:
            if m._parameters.get(name) is not p:
                m._parameters[name] = p


def tied_tensors(module: nn.Module) -> bool:
    """Whether a parameter or buffer of ``module`` is registered under more than one name (a weight shared by two
    layers, a submodule registered twice): what ``functional_call``'s ``tie_weights`` gives the other names too."""
    seen: set[int] = set()
    named = (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False))
    for _, t in named:
        if id(t) in seen:
            return True
        seen.add(id(t))
    return False


def functionalize(model: nn.Module, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Turn ``fn(model, *args)`` into a pure function ``f(θ_flat, *args)`` of the flat parameters.

    Buffers keep their current values. The result works under ``torch.func`` transforms and autograd.

    ``functional_call`` ties the names of a tensor registered under several (``tie_weights``) by walking every
    parameter and buffer of the module on each call; a model without such tensors (:func:`tied_tensors`, read once
    here) is called without that walk, which changes no value: the tied names it adds are none (stop 61: 0.1-0.7 ms
    a call, 0-9% of a forward pass of the check's 256 rows on the model matrix's networks; within the noise of a
    whole request: ``benchmarks/functional_ties.py``).
    """
    spec = ParamSpec.of(model)
    wrapper = _Call(model, fn)
    aliased = aliased_parameters(model)
    tie = tied_tensors(wrapper)

    def f(theta: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        params = {"m." + k: v for k, v in spec.unflatten(theta).items()}
        return call_with(wrapper, params, args, aliased, strict=False, tie_weights=tie)

    return f


def stack_batches(batches: Sequence[Batch]) -> Batch:
    """Stack a list of equally sized minibatches field by field: ``[(x, y), ...] → (X[S,B,..], Y[S,B,..])``."""
    return tuple(torch.stack(fields) for fields in zip(*batches))


def autograd_hvp(f: Callable[..., torch.Tensor], theta: torch.Tensor, v: torch.Tensor, *args) -> torch.Tensor:
    """Hessian-vector product ``∇²f(θ)·v`` by double backward (the fallback path)."""
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(t, *args), t, create_graph=True)
        (hv,) = torch.autograd.grad(g, t, grad_outputs=v)
    return hv.detach()


def second_derivative_gap(
    f: Callable[..., torch.Tensor], theta: torch.Tensor, args: Sequence[torch.Tensor], v: torch.Tensor
) -> float | None:
    """Relative gap between ``∇²f(θ)·v`` by double backward and central differences of ``∇f`` along ``v``, or
    ``None`` when the differences are themselves unstable (two step sizes disagree by over 10%: kinks such as ReLU
    or max-pooling, or rounding). A large gap means the model's derivatives are not differentiable twice through
    autograd, e.g. a custom ``autograd.Function`` whose ``backward`` runs under ``no_grad``: every Hessian product
    then silently misses those terms."""

    def gradient(t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            tt = t.detach().requires_grad_(True)
            return torch.autograd.grad(f(tt, *args), tt)[0].detach().double()

    hv = autograd_hvp(f, theta, v, *args).double()
    step = torch.finfo(theta.dtype).eps ** (1 / 3) * max(float(theta.norm()), 1.0) / max(float(v.norm()), 1e-30)
    fd = [(gradient(theta + e * v) - gradient(theta - e * v)) / (2 * e) for e in (step, step / 2)]
    size = max(float(fd[0].norm()), float(fd[1].norm()), 1e-30)
    if float((fd[0] - fd[1]).norm()) > 0.1 * size:
        return None
    return float((hv - fd[1]).norm()) / max(size, float(hv.norm()))


def _func_hvp(f: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def hvp(theta: torch.Tensor, v: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        # torch.func can promote a float32 product to float64 (e.g. `0.5 * w.sum() * s` of two 0-dim tensors in a
        # hierarchical prior): keep the parameters' dtype
        return jvp(lambda t: grad(f)(t, *args), (theta,), (v,))[1].to(theta.dtype)

    return hvp


class SampleAveragedHessian:
    """Linear operator ``v ↦ (1/S) Σ_s ∇²_θ f(θ_s, *args_s)·v + damping·v``.

    Args:
        f: Pure function ``f(θ_flat, *args) -> scalar`` (see :func:`functionalize`).
        thetas: Posterior draws, shape ``[S, D]``.
        args: Per-draw arguments stacked on a leading ``S`` dimension (e.g. stacked minibatches), or
            arguments shared by all draws when ``shared_args`` is true.
        damping: Added multiple of the identity.
        shared_args: If true, ``args`` are the same for every draw (no leading ``S`` dimension).
        backend: ``"func"`` (forward-over-reverse, vmapped), ``"autograd"`` (double backward loop) or
            ``"auto"`` (the ``prefer``-red one, falling back to the other if the model does not support it).
        chunk_size: Draws processed together by ``vmap`` (bounds memory). When it is under the number of draws,
            the mean is summed batch by batch (never every draw's ``[S, D]`` products at once).
        prefer: Which backend ``"auto"`` tries first: ``"func"`` (many draws or vectors) or ``"autograd"``
            (one vector at a few draws of a larger network, where the loop is cheaper).
        max_products: Single-draw products that fit in memory at once (``None``: no bound beyond
            ``chunk_size``); a product with a ``[D, k]`` block then takes its columns in groups within it.
    """

    def __init__(
        self,
        f: Callable[..., torch.Tensor],
        thetas: torch.Tensor,
        args: Sequence[torch.Tensor] = (),
        damping: float = 0.0,
        shared_args: bool = False,
        backend: str = "auto",
        chunk_size: int | None = 64,
        prefer: str = "func",
        max_products: int | None = None,
    ) -> None:
        if prefer not in ("func", "autograd"):
            raise ValueError(f"prefer must be 'func' or 'autograd', got {prefer!r}")
        if thetas.ndim != 2:
            raise ValueError(f"thetas must have shape [S, D], got {tuple(thetas.shape)}")
        self.f = f
        self.thetas = thetas.detach()
        self.args = tuple(args)
        self.damping = float(damping)
        self.shared_args = shared_args
        self.backend = backend
        self.chunk_size = chunk_size
        self.prefer = prefer
        self.max_products = max_products
        self.n_products = 0  # single-draw Hessian-vector products computed so far

    @property
    def dim(self) -> int:
        return self.thetas.shape[1]

    @property
    def n_draws(self) -> int:
        return self.thetas.shape[0]

    def _mv_func(self, v: torch.Tensor) -> torch.Tensor:
        hvp = _func_hvp(self.f)
        arg_dims = (None,) * len(self.args) if self.shared_args else (0,) * len(self.args)
        S, step = self.n_draws, self.chunk_size
        if step is None or step >= S:  # every draw in one batch: the [S, D] products and their mean, as always
            batched = vmap(hvp, in_dims=(0, None, *arg_dims), chunk_size=step)
            return batched(self.thetas, v, *self.args).mean(0)
        batched = vmap(hvp, in_dims=(0, None, *arg_dims))
        total = None
        for s0 in range(0, S, step):  # summed batch by batch: one batch's products at a time, not [S, D]
            args = self.args if self.shared_args else tuple(a[s0 : s0 + step] for a in self.args)
            part = batched(self.thetas[s0 : s0 + step], v, *args).sum(0)
            total = part if total is None else total + part
            del part
        return total / S

    def _columns(self, k: int) -> int:
        """Columns of a ``[D, k]`` block multiplied at once (``max_products`` single-draw products in all)."""
        if self.max_products is None:
            return k
        draws = self.n_draws if self.chunk_size is None else min(self.n_draws, self.chunk_size)
        return max(1, min(k, self.max_products // max(draws, 1)))

    def _mv_autograd(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(v)
        for s in range(self.n_draws):
            args = self.args if self.shared_args else tuple(a[s] for a in self.args)
            out += autograd_hvp(self.f, self.thetas[s], v, *args)
        return out / self.n_draws

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        if self.backend == "func":
            return self._mv_func(v)
        if self.backend == "autograd":
            return self._mv_autograd(v)
        first, second = ("func", "autograd") if self.prefer == "func" else ("autograd", "func")
        matvecs = {"func": self._mv_func, "autograd": self._mv_autograd}
        try:
            out = matvecs[first](v)
            self.backend = first
            return out
        except (RuntimeError, NotImplementedError, TypeError):
            self.backend = second
            return matvecs[second](v)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        """``H @ v`` for ``v`` of shape ``[D]`` or ``[D, k]`` (columns treated separately)."""
        if v.ndim == 2:
            if self.backend == "func":
                self.n_products += self.n_draws * v.shape[1]
                k, cols = v.shape[1], self._columns(v.shape[1])
                mv = vmap(self._mv_func, in_dims=1, out_dims=1)
                if cols >= k:
                    out = mv(v.detach())
                else:  # the columns in groups: every column at every draw at once would pass the memory budget
                    out = torch.cat([mv(v[:, j : j + cols].detach()) for j in range(0, k, cols)], dim=1)
                return out + self.damping * v if self.damping else out
            return torch.stack([self @ v[:, j] for j in range(v.shape[1])], dim=1)
        self.n_products += self.n_draws
        out = self._matvec(v.detach())
        return out + self.damping * v if self.damping else out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Same as ``self @ v``."""
        return self @ v

    def dense(self, chunk: int = 256) -> torch.Tensor:
        """The operator as a dense ``[D, D]`` matrix (symmetrised), for small models.

        Its columns are taken ``chunk`` at a time, fewer where ``max_products`` holds fewer single-draw products
        (as ``self @ V`` takes a ``[D, k]`` block): every draw's product with all ``chunk`` columns at once is
        ``chunk`` times what the plan allows.
        """
        d = self.dim
        chunk = max(1, self._columns(min(chunk, d)))
        eye = torch.eye(d, dtype=self.thetas.dtype, device=self.thetas.device)
        cols = []
        for j0 in range(0, d, chunk):
            block = eye[:, j0 : j0 + chunk]
            if self.backend == "func" or (self.backend == "auto" and self.prefer == "func"):
                try:
                    cols.append(vmap(self.matvec, in_dims=1, out_dims=1)(block))
                    continue
                except (RuntimeError, NotImplementedError, TypeError):
                    self.backend = "autograd"
            cols.append(self @ block)
        h = torch.cat(cols, dim=1)
        return 0.5 * (h + h.T)

    def __add__(self, other: SampleAveragedHessian) -> SumOperator:
        return SumOperator([self, other])


class SumOperator:
    """Sum of linear operators (e.g. remaining-data Hessian + removed-points Hessian)."""

    def __init__(self, ops: Sequence) -> None:
        self.ops = list(ops)

    @property
    def dim(self) -> int:
        return self.ops[0].dim

    @property
    def thetas(self) -> torch.Tensor:
        """The first operator's draws (their dtype and device are the sum's): the iterative backends read them, and
        ``hessian="full"`` (remaining plus removed rows) failed there with an AttributeError (stop 45's probe)."""
        return self.ops[0].thetas

    @property
    def n_products(self) -> int:
        return sum(op.n_products for op in self.ops)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return sum(op @ v for op in self.ops)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self @ v

    def dense(self) -> torch.Tensor:
        return sum(op.dense() for op in self.ops)

    def __add__(self, other) -> SumOperator:
        return SumOperator([*self.ops, other])


def top_eigenvalue(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    iters: int = 30,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    tol: float = 1e-3,
    device: torch.device | str | None = None,
) -> float:
    """Largest-magnitude eigenvalue of a symmetric operator by power iteration.

    Returns the Rayleigh quotient after at most ``iters`` products (stops early when it changes by
    less than ``tol`` relative).
    """
    v = torch.randn(dim, generator=generator, dtype=dtype).to(device)  # CPU generator, then the device
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        w = matvec(v)
        new = float(v @ w)
        nrm = w.norm()
        if not torch.isfinite(nrm) or nrm == 0:
            return new
        v = w / nrm
        if abs(new - lam) <= tol * abs(new):
            return new
        lam = new
    return lam


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    k: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` steps of Lanczos with full re-orthogonalisation on a symmetric operator.

    Returns:
        Ritz values ``[m]`` (ascending) and Ritz vectors ``[D, m]``, ``m <= k`` (fewer on breakdown).
    """
    k = min(k, dim)
    Q = torch.zeros(dim, k, dtype=dtype, device=device)
    alphas, betas = [], []
    q = torch.randn(dim, generator=generator, dtype=dtype).to(device)
    q /= q.norm()
    beta = 0.0
    m = 0
    for j in range(k):
        Q[:, j] = q
        w = matvec(q)
        alpha = float(q @ w)
        w = w - alpha * q - (beta * Q[:, j - 1] if j > 0 else 0.0)
        w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)  # full re-orthogonalisation (twice is enough)
        w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        alphas.append(alpha)
        m = j + 1
        beta = float(w.norm())
        if beta <= 1e-10 * max(abs(a) for a in alphas) or j == k - 1:
            break
        betas.append(beta)
        q = w / beta
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    evals, S = torch.linalg.eigh(T)
    return evals.to(dtype=dtype, device=Q.device), Q[:, :m] @ S.to(dtype=dtype, device=Q.device)


class LowRankPreconditioner:
    """``P = U diag(λ) Uᵀ + c·(I − UUᵀ)``: top Lanczos eigenpairs of ``H`` plus a scalar for the rest.

    ``c`` is the average of the remaining eigenvalues, ``tr((I − UUᵀ)H)/(D − k)``, estimated as
    ``Σ zᵀHz / Σ zᵀz`` over Rademacher probes projected off ``U``. Eigenvalues below ``c`` are raised to
    ``c`` so ``P`` is positive definite; ``P⁻¹`` costs ``O(Dk)``. Built once and reused across deletion
    requests (the curvature of a posterior changes slowly).
    """

    def __init__(self, U: torch.Tensor, lam: torch.Tensor, c: float) -> None:
        self.U, self.c = U, float(c)
        self.lam = lam.clamp_min(self.c)

    @classmethod
    def build(
        cls,
        matvec: Callable[[torch.Tensor], torch.Tensor],
        dim: int,
        rank: int,
        probes: int = 4,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        absolute: bool = False,
        device: torch.device | str | None = None,
    ) -> LowRankPreconditioner:
        """Run ``rank`` Lanczos steps and ``probes`` Hutchinson products on ``matvec``.

        With ``absolute`` the Ritz values enter as ``|λ|`` (the saddle-free Newton metric of Dauphin et al.,
        2014, for indefinite Hessians such as a neural network's); otherwise non-positive ones are dropped.
        """
        evals, vecs = lanczos(matvec, dim, rank, generator, dtype, device)
        if absolute:
            evals = evals.abs()
        else:
            keep = evals > 0
            evals, vecs = evals[keep], vecs[:, keep]
        # Hutchinson on the deflated operator (I − UUᵀ)H(I − UUᵀ), as a ratio Σ zᵀHz / Σ zᵀz: only the bulk
        num = den = 0.0
        if vecs.shape[1] >= dim:  # U spans the whole space: there is no bulk (the probes would be rounding noise)
            floor = 1e-6 * float(evals.max()) if evals.numel() else 1e-6
            return cls(vecs, evals, max(float(evals.min()), floor))
        for _ in range(probes):
            z = (torch.randint(0, 2, (dim,), generator=generator) * 2 - 1).to(dtype=dtype, device=vecs.device)
            z = z - vecs @ (vecs.T @ z)
            num += float(z @ matvec(z))
            den += float(z @ z)
        c = num / max(den, 1e-30)
        floor = 1e-6 * float(evals.max()) if evals.numel() else 1e-6
        return cls(vecs, evals, max(c, floor))

    def solve(self, b: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        """``(P + damping·I)⁻¹ b`` for ``b`` of shape ``[D]`` or ``[D, k]``."""
        coef = self.U.T @ b
        lam = self.lam + damping
        inv = (1.0 / lam)[:, None] if b.ndim == 2 else 1.0 / lam
        return self.U @ (coef * inv) + (b - self.U @ coef) / (self.c + damping)

    def mean_eigenvalue(self) -> float:
        """``tr P / D``."""
        d, k = self.U.shape
        return (float(self.lam.sum()) + self.c * (d - k)) / d

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        coef = self.U.T @ v
        lam = self.lam[:, None] if v.ndim == 2 else self.lam
        return self.U @ (coef * lam) + self.c * (v - self.U @ coef)
