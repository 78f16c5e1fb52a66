r"""Kronecker-factored curvature of a Bayesian network's energy, Monte-Carlo over labels, for any PyTorch model.

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
``info``). A factor larger than ``max_factor_dim`` keeps only its diagonal (``Q = I``, recorded). A factor seen on
fewer rows than its dimension (wide MLP layers, few draws) is decomposed through the Gram matrix of its rows; its
eigenbasis is then incomplete and ``K`` is ``p + λ`` on the missing directions. ``A`` is a mean over locations, so
by default (``max_locations="auto"``) each convolution's ``A`` is estimated from a random subset of rows with
``max(1024, 2·dim A)`` locations per draw: the full sum costs ``C_in·k²/C_out`` forward passes of the layer.

**Sampling.** The expectation over labels is Monte-Carlo estimated with ONE backward pass per sample:
with ``s_i`` a random vector in output space whose covariance is the loss's output Hessian ``H_i``
(``E[s_i s_iᵀ] = H_i``), the backward pass of ``Σ_i ⟨out_i, s_i⟩`` gives every layer the per-row output gradients
``g_i = J_iᵀ s_i`` (rows do not interact), and ``E[g_i g_iᵀ] = J_iᵀ H_i J_i`` is the row's GGN. The cost is
O(draws × mc_samples) backward passes whatever the number of classes. Two samplers:

* ``sampling="gaussian"`` (default): ``s = (I − p1ᵀ)(√p ⊙ ε)``, ``ε ~ N(0, I)`` for the softmax, since
  ``(I − p1ᵀ) diag(p) (I − 1pᵀ) = diag(p) − ppᵀ = H``; ``s = ε/σ`` for the Gaussian likelihood;
  ``s = √(p(1 − p)) ⊙ ε``, ``p = sigmoid(z)``, for the Bernoulli one (``H = diag(p(1 − p))``, independent logits).
* ``sampling="labels"``: K-FAC practice (Martens & Grosse, 2015), ``ŷ ~ softmax(model(x))`` and
  ``s = p − e_ŷ`` (the gradient of ``−log p_ŷ``), also with ``E[s sᵀ] = H`` (Bernoulli: ``ŷ ~ Bernoulli(p)`` per
  logit, ``s = p − ŷ``). For a confident model this is far
  noisier: a class of probability ``p_a`` contributes only when it is drawn, so ``s_a²`` has relative standard
  deviation ``≈ 1/√p_a``, against ``√2`` for the Gaussian sketch. On trained digits classifiers (4 draws × 128
  rows, one sample, ``benchmarks/kronecker.py --compare-sampling``) the error of ``K⁻¹v`` against the exact
  expectation has median 89% (CNN) / 49% (MLP) with labels and 36% / 17% with the Gaussian sketch.

When the model has at most ``mc_samples`` outputs per row (e.g. scalar regression) the exact expectation costs no
more and is used instead (one backward per output, ``√p_c``-weighted for the softmax). What
:func:`detect_likelihood` finds beyond the plain forms (one tensor of a tuple/dict/dataclass output, a temperature
``T``, per-row weights ``w``) enters as ``z = out/T`` and each row's sample times ``√w``. With
``Likelihood.EMPIRICAL`` (any other ``nll``) the gradients of the user's ``nll`` at the TRUE labels are used: the
*empirical* Fisher, a weaker approximation of the curvature (Kunstner et al., 2019) - ``info["fisher"]`` says so.

**Diagonal fallback.** Every other parameter (BatchNorm/LayerNorm affine terms, embeddings, raw parameters such
as ``MultiheadAttention.in_proj_weight``, and Linear/Conv layers whose forward hook does not fire because their
weight is used through ``F.linear`` directly, like ``MultiheadAttention.out_proj``, and those whose weight or
bias the first forward's autograd graph reads more often than their hook saw them called - a read outside the
module, e.g. a tied decoder's ``F.linear(h, enc.weight.t())``, counted structurally by :func:`_graph_uses`) gets
the diagonal
``P + n·diag(E[C_i])``, estimated WITHOUT per-example gradients: the samples have mean zero (``E[s_i] = 0``; for
labels, the score ``E_ŷ[∇ log p(ŷ|x_i)] = 0``) and are independent across rows, so ``E[g_i] = 0`` and

    E[(Σ_i g_i)²] = Σ_i E[g_i²] + Σ_{i≠j} E[g_i]·E[g_j] = Σ_i E[g_i²]   (elementwise),

i.e. the square of the ONE minibatch gradient of the sampled loss, divided by the number of rows, is an
unbiased estimate of the mean row diagonal. For the exact expectation and the empirical Fisher (where the
gradients do not have mean zero) each row's loss is multiplied by an independent random sign ``r_i = ±1``,
which gives the same identity through ``E[r_i r_j] = δ_ij``.

**Distributed building.** Every statistic is a sum (second-moment sums, location, row and squared-gradient
sums) until it is finalised, and ``reduce`` is applied to each, so ranks holding different rows can all-reduce
them (``reduce=lambda t: (dist.all_reduce(t), t)[1]``). The Kronecker factors then equal the single-process ones
(in expectation when ``A`` is subsampled); the diagonal estimate differs by zero-mean cross terms (its square is
taken per rank). With a ``reduce`` the rows of wide layers are summed rather than kept (no Gram-matrix shortcut).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import math
import sys
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .curvature import ParamSpec, functionalize
from .errors import SolverDivergedError, outside_stacklevel
from .options import Likelihood, shown_value

__all__ = [
    "KroneckerCurvature",
    "Likelihood",
    "cross_entropy_misfit",
    "detect_likelihood",
    "field_rows",
    "gaussian_in_targets",
    "labelled",
    "learned_variance",
    "likelihood_and_columns",
    "preserved",
    "prior_precision",
    "read_outside_layers",
    "row_weights",
    "rows_per_label",
    "select_output",
]

Batch = tuple[Tensor, ...]
NLL = Callable[[nn.Module, Batch], Tensor]

_KINDS: tuple[tuple[type[nn.Module], str], ...] = ((nn.Linear, "linear"), (nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"))
_PROBE_ROWS = 8
_AUTO_MIN_LOCATIONS = 1024  # max_locations="auto": at least this many locations per layer and draw for A ...
_AUTO_LOCATIONS_PER_DIM = 2  # ... and at least this many per dimension of A


# ------------------------------------------------------------------------------------------------- helpers
def _first_forward_hook(by_module: dict, hook: Callable) -> Any:
    """Register ``hook`` for the modules in ``by_module`` so that it runs before every other forward hook.

    torch runs global forward hooks (``register_module_forward_hook``) before a module's own ones, so a module
    hook registered with ``prepend=True`` still sees an output that a user's global hook has already transformed
    (a temperature ``out / T`` made the output-gradient factor T² too large, silently). A global hook moved to the
    front runs first of all.
    """
    from torch.nn.modules import module as _mod

    def first(module: nn.Module, args: tuple, out: Any) -> Any:
        return hook(module, args, out) if module in by_module else None

    handle = _mod.register_module_forward_hook(first)
    _mod._global_forward_hooks.move_to_end(handle.id, last=False)
    return handle


def _version(t: Tensor) -> int | None:
    """``t``'s version counter (bumped by every in-place write through ``t`` or a view), ``None`` where it has none
    (an inference-mode tensor)."""
    try:
        return int(t._version)
    except Exception:
        return None


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are strided tensors of one device, dtype and shape with bit-identical values
    (``-0.0`` is not ``0.0``; a NaN equals the same NaN). ``False`` where that cannot be told (another layout: torch
    compares no sparse tensors); never raises."""
    try:
        if a.layout != torch.strided or b.layout != torch.strided:
            return False
        if a.device != b.device or a.dtype != b.dtype or a.shape != b.shape:
            return False
        a, b = a.detach().reshape(-1), b.detach().reshape(-1)
        if a.is_floating_point() or a.is_complex():
            return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        return torch.equal(a, b)
    except Exception:
        return False


def _restore(t: Tensor, saved: Tensor) -> None:
    """Write ``saved`` (a private copy) back into ``t``: in place where device, dtype, shape and layout still fit
    (every alias sees it), else by resetting ``t.data``. An inference-mode tensor (written only under inference
    mode) is written under it."""
    if t.layout == saved.layout and t.device == saved.device and t.dtype == saved.dtype and t.shape == saved.shape:
        with torch.inference_mode() if t.is_inference() else contextlib.nullcontext():
            t.copy_(saved)
    else:
        t.data = saved


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore every parameter, buffer and ``.grad`` of ``model`` and the global RNG states on exit.

    A tensor is written back where it may have been written to: its version counter changed (an in-place write; an
    inference-mode tensor has none and is compared by its bits alone), it changed device, dtype, shape or layout, it
    is not strided (torch compares no sparse tensors), or its bits differ (a write through ``.data``, which bumps no
    counter; ``-0.0`` for ``0.0``); an unchanged tensor keeps its version counter. A module entry reassigned during
    the block (``self.mu = 0.9 * self.mu + ...``, a parameter replaced or deleted) is set back to the original
    object, and so is a child module or an entry's place in its dict (the flat layout follows that order); an RNN's
    ``_flat_weights`` is rebuilt where its entries were. ``.grad`` is ``None`` inside the block (a backward there
    does not add into the caller's gradient) and the caller's is put back. A tensor that cannot be written back is
    named in a ``RuntimeError`` after all others have been restored (chained to the block's own error, if any).
    """
    params = list(model.parameters())
    buffers = list(model.buffers())
    saved = [(t, _version(t), t.detach().clone()) for t in itertools.chain(params, buffers)]
    saved_g = [p.grad for p in params]
    for p in params:  # a backward in the block accumulates into new tensors, not into the caller's in place
        p.grad = None
    slots = [
        (
            m,
            (dict(m._parameters), dict(m._buffers), dict(m._modules)),
            dict(m.__dict__),
            set(getattr(m, "_non_persistent_buffers_set", ())),
        )
        for m in model.modules()
    ]
    cuda = sorted({t.device.index or 0 for t in itertools.chain(params, buffers) if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        failed: list[str] = []
        body_error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            body_error = exc
            raise
        finally:
            for m, entries, attrs, nonpersistent in slots:
                _restore_entries(m, entries, attrs)
                if hasattr(m, "_non_persistent_buffers_set") and m._non_persistent_buffers_set != nonpersistent:
                    m._non_persistent_buffers_set = nonpersistent
            with torch.no_grad():
                for t, version, v in saved:
                    try:
                        unchanged = (
                            (version is None or _version(t) == version) and t.layout == torch.strided
                        ) and same_bits(t, v)
                        if not unchanged:
                            _restore(t, v)
                    except Exception as exc:  # e.g. a tensor resized to another storage type: say so below
                        failed.append(f"{tuple(v.shape)} {v.dtype} ({type(exc).__name__}: {exc})")
            for p, g in zip(params, saved_g):
                p.grad = g
            if failed:
                msg = (
                    f"could not restore {len(failed)} parameter(s)/buffer(s) of the model after evaluating it: "
                    f"{'; '.join(failed[:3])}; the model was changed by its own forward pass: reload it"
                )
                if body_error is not None and not isinstance(body_error, Exception):
                    body_error.add_note(msg)  # an interrupt stays one
                else:
                    raise RuntimeError(msg) from body_error


@contextlib.contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Put ``model``'s buffers back on exit, entries and values, where the block wrote to them (:func:`preserved`'s
    test: a version counter moved, the bits differ, an entry reassigned). The forwards that tell shared locations
    (:func:`_shared_codes`) run between the build's own: a buffer they moved was read by the build's later forwards
    (``spectral_norm``'s power-iteration vectors, a running statistic the forward updates and uses)."""
    entries = [(m, dict(m._buffers)) for m in model.modules()]
    saved = [(t, _version(t), t.detach().clone()) for _, bufs in entries for t in bufs.values() if t is not None]
    try:
        yield
    finally:
        for m, bufs in entries:
            if list(m._buffers) != list(bufs) or any(m._buffers[k] is not v for k, v in bufs.items()):
                m._buffers.clear()
                m._buffers.update(bufs)
        with torch.no_grad():
            for t, version, v in saved:
                if version is None or _version(t) != version or not same_bits(t, v):
                    fits = t.shape == v.shape and t.dtype == v.dtype and t.device == v.device
                    if fits and not t.is_inference() and t.layout == torch.strided:
                        # (through .data: no version bump, the build's graph saved BatchNorm's running statistics,
                        # which its forward updates without one)
                        t.data.copy_(v)
                    else:
                        _restore(t, v)


_MISSING = object()


def _restore_entries(m: nn.Module, entries: tuple[dict, dict, dict], attrs: dict) -> None:
    """Put ``m``'s ``_parameters``, ``_buffers`` and ``_modules`` back to ``entries`` (:func:`preserved`): keys,
    order (the flat layout follows it) and objects, where any of them differ; a name that moved between those and a
    plain attribute (``self.head = None`` in ``__init__``, a module assigned to it in the block) gets its attribute
    back, and an RNN rebuilds ``_flat_weights``, which its forward reads instead of ``_parameters``."""
    moved: set[str] = set()
    for live, orig in zip((m._parameters, m._buffers, m._modules), entries):
        if list(live) != list(orig) or any(live[k] is not v for k, v in orig.items()):
            moved.update(live, orig)
            live.clear()
            live.update(orig)
    if not moved:
        return
    for k in moved:
        if k in attrs:
            m.__dict__[k] = attrs[k]
        else:
            m.__dict__.pop(k, None)
    if isinstance(m, nn.RNNBase):
        m._init_flat_weights()


def _slices(model: nn.Module) -> tuple[ParamSpec, dict[str, slice], dict[int, str]]:
    """The flat layout: spec, ``{name: slice}`` and ``{id(param): name}`` of trainable parameters."""
    spec = ParamSpec.of(model)
    offsets, pos = {}, 0
    for name, numel in zip(spec.names, spec.numels):
        offsets[name] = slice(pos, pos + numel)
        pos += numel
    by_id = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    return spec, offsets, by_id


def field_rows(batch: Batch) -> int:
    """The batch's number of rows: the first field's leading dimension."""
    return int(batch[0].shape[0])


class _LivePeak(TorchDispatchMode):
    """The most bytes the tensors made by the ops run under it held at once (``peak``): each op's output storage
    counted from the op until the storage itself is freed (views, in-place results and ``.data`` aliases of a storage
    counted once, and for as long as any of them lives: counting the op's tensors instead dropped a storage whose
    only holder left was a ``.data`` alias; storages from before, the batch's and the parameters', not at all).
    Kernels' own workspaces are not seen. Used by :meth:`KroneckerCurvature.memory_estimate` for the forward without
    gradients on the rows twice over (:func:`_shared_codes`), whose activations are freed as it goes: what autograd
    saves does not bound it."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """``False``: ``__torch_dispatch__`` is not wrapped in ``torch._disable_dynamo`` at class creation, whose first
        call imports ``torch._dynamo`` (797 modules, sympy among them: 1.1 s CPU, a tenth of a 1.2M-parameter
        ResNet's first request; stop 68). Where ``torch._dynamo`` is loaded already (a compiled
        model or function may run under the mode) :func:`_live_peak` gives :class:`_LivePeakDynamo`, which is."""
        return False

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # storage address: bytes
        self.now = 0
        self.peak = 0

    def _drop(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    @staticmethod
    def _storage(t: Any) -> tuple[torch.UntypedStorage, int] | None:
        """``t``'s storage and its address; ``None`` for what has none to read (not a tensor, meta, sparse, nested,
        a wrapper subclass, whose storage's address raises: not counted)."""
        if not isinstance(t, Tensor) or t.device.type == "meta":
            return None
        try:
            storage = t.untyped_storage()
            return storage, storage.data_ptr()
        except (NotImplementedError, RuntimeError):
            return None

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        before = {got[1] for got in map(self._storage, tree_leaves((args, kwargs))) if got is not None}
        for t in tree_leaves(out):
            got = self._storage(t)
            if got is None:
                continue
            storage, key = got
            if key == 0 or key in before or key in self.live:  # (empty, a view / in-place result, or counted)
                continue
            self.live[key] = storage.nbytes()
            self.now += self.live[key]
            self.peak = max(self.peak, self.now)
            # the storage's own lifetime (its Python object lives as long as the storage does), not a tensor's
            weakref.finalize(storage, self._drop, key)
        return out


class _LivePeakDynamo(_LivePeak):
    """:class:`_LivePeak` with its ``__torch_dispatch__`` kept out of ``torch.compile``'s tracing, as torch does for
    every dispatch mode by default: used where ``torch._dynamo`` is loaded (:func:`_live_peak`)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """``True``: torch's default (``__init_subclass__`` wraps the ``__torch_dispatch__`` below)."""
        return True

    __torch_dispatch__ = _LivePeak.__torch_dispatch__


def _live_peak() -> _LivePeak:
    """A :class:`_LivePeak`; a :class:`_LivePeakDynamo` where ``torch._dynamo`` is imported already (a process that
    compiles: the mode's frames are then kept from its tracing at no import cost)."""
    return _LivePeakDynamo() if "torch._dynamo" in sys.modules else _LivePeak()


def _head(batch: Batch, rows: int) -> Batch:
    """The first ``rows`` rows of every field that has the batch's leading dimension."""
    b = field_rows(batch)
    return tuple(t[:rows] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == b else t for t in batch)


#: Remaining rows per label on which a categorical likelihood read on the removed rows is verified.
CHECK_ROWS_PER_LABEL = 4


def rows_per_label(batch: Batch, k: int = CHECK_ROWS_PER_LABEL) -> Batch | None:
    """Up to ``k`` rows of each non-negative integer label ``batch[1]``, in rounds (one of each label, then a second
    ...), so that the first rows cover many labels; ``None`` when the batch has no such labels."""
    y = batch[1] if len(batch) > 1 else None
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.is_complex():
        return None
    if y.dtype == torch.bool or y.numel() == 0:
        return None
    idx = (y >= 0).nonzero().flatten()
    if idx.numel() == 0:
        return None
    lab = y[idx].long()
    order = torch.argsort(lab, stable=True)
    first = torch.searchsorted(lab[order], lab[order])
    rank = torch.arange(order.numel(), device=y.device) - first  # the row's place among its label's rows
    keep = rank < k
    rows, rank, lab = idx[order][keep], rank[keep], lab[order][keep]
    pick = rows[torch.argsort(rank * (int(lab.max()) + 1) + lab, stable=True)]
    b = y.shape[0]
    return tuple(t[pick] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b else t for t in batch)


def labelled(batch: Batch, empty: bool = False) -> Batch:
    """The rows whose integer label ``batch[1]`` is not negative, when some are (``cross_entropy``'s
    ``ignore_index=-100`` rows: among the probe rows they made a plain cross-entropy read as another loss, and K-FAC
    fall back to the empirical Fisher; stop 47's probe); else ``batch``. ``empty``: no rows (not ``batch``) when
    every label is negative (the categorical Fisher's rows: an ignored row has no likelihood term)."""
    y = batch[1] if len(batch) > 1 else None
    if not isinstance(y, Tensor) or y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        return batch
    keep = y >= 0
    if bool(keep.all()) or not (empty or bool(keep.any())):
        return batch
    b = field_rows(batch)
    return tuple(t[keep] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == b else t for t in batch)


def _span(batch: Batch, r0: int, r1: int) -> Batch:
    """Rows ``r0:r1`` of every field that has the batch's leading dimension."""
    b = field_rows(batch)
    return tuple(t[r0:r1] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == b else t for t in batch)


class _Draws:
    """The random numbers of one minibatch drawn once, whole, and replayed for each of its row chunks.

    A chunked build (``build(row_chunk=)``) must consume the generator exactly as the one-pass build does: each
    draw (a layer's location subset, the Monte-Carlo noise or signs) is made for the whole minibatch when the first
    chunk reaches it, in the same order, and every later chunk reads the same values (its rows of them)."""

    def __init__(self) -> None:
        self.values: list[Tensor] = []
        self.at = 0

    def restart(self) -> None:
        self.at = 0

    def get(self, make: Callable[[], Tensor]) -> Tensor:
        if self.at == len(self.values):
            self.values.append(make())
        out = self.values[self.at]
        self.at += 1
        return out


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps


# ------------------------------------------------------------------------------------------- likelihood
#: Keys of ``detect_likelihood``'s extras that change the curvature (the rest are notes): which tensor of a tuple,
#: dict or dataclass output is the likelihood's, its temperature, a constant factor on the loss, a per-row weight field
#: and per-class weights (``cross_entropy(..., weight=w)``).
_LINK_KEYS = ("output", "temperature", "scale", "weights", "class_weights", "variance")
#: Most classes for which ``nll`` is probed at every label (one call each) to find per-class weights.
CLASS_WEIGHT_MAX_CLASSES = 128
#: Factors of more dimensions than this keep only their diagonal (no eigendecomposition: a vocabulary head's
#: output factor, a layer's input factor beyond 4,095 inputs); the K-FAC backend warns once per unlearner.
MAX_FACTOR_DIM = 4096


def output_items(out: Any) -> list[tuple[Any, Any]] | None:
    """``(key, value)`` for each field of a tuple/list (by position), a dict (by key) or a ``@dataclass`` instance
    (by field name: a forward returning ``Output(logits=...)`` was read as no tensor at all, so K-FAC fell back to
    the empirical Fisher and the emptied-label check did not run), ``("logits", out.logits)`` for a
    ``torch.distributions.Categorical``; ``None`` for any other output."""
    if isinstance(out, Mapping):
        return list(out.items())
    if isinstance(out, (tuple, list)):
        return list(enumerate(out))
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    if isinstance(out, torch.distributions.Categorical):
        # a forward returning Categorical(logits=...) (nll = -dist.log_prob(y)) was read as no tensor at all:
        # K-FAC fell back to the empirical Fisher and the emptied-label check did not run (stop 63's probe)
        return [("logits", out.logits)]
    return None


def output_field(out: Any, key: Any) -> Any:
    """``out[key]`` of a tuple/list/dict output, ``getattr(out, key)`` of a ``@dataclass`` or ``Categorical`` one
    (:func:`output_items`)."""
    if (dataclasses.is_dataclass(out) and not isinstance(out, type) and not isinstance(out, Mapping)) or isinstance(
        out, torch.distributions.Categorical
    ):
        return getattr(out, key)
    return out[key]


def _output_candidates(out: Any, rows: int) -> list[tuple[Any, Tensor]]:
    """``(key, tensor)`` for the model's output (key ``None``) or each ``[rows, ...]`` tensor of a tuple/list/dict or
    dataclass output (:func:`output_items`)."""
    if isinstance(out, Tensor):
        return [(None, out)] if out.dim() >= 1 and out.shape[0] == rows else []
    items = output_items(out)
    if items is None:
        return []
    return [(k, v) for k, v in items if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == rows]


def select_output(out: Any, extra: dict[str, Any]) -> Tensor:
    """The tensor the likelihood is of: ``out[extra["output"]]`` for a tuple/dict output (the field of that name for a
    dataclass output), divided by the detected temperature (categorical), else ``out`` itself (``extra`` as
    :func:`detect_likelihood` returns it)."""
    if extra.get("output") is not None:
        out = output_field(out, extra["output"])
    if not isinstance(out, Tensor):
        raise ValueError(
            f"the model's output is a {type(out).__name__}, not a tensor: pass likelihood='empirical', or return "
            "the logits / means (or a tuple, dict or dataclass holding them, which likelihood='auto' detects)"
        )
    t = extra.get("temperature")
    return out / t if t is not None else out


def row_weights(batch: Batch, extra: dict[str, Any]) -> Tensor | None:
    """Per-row factors ``scale·batch[weights]·class_weights[y]`` on the loss (``None`` when there are none); with
    class weights, 0 on a row labelled negative (``cross_entropy``'s ``ignore_index=-100``: no loss term)."""
    w = batch[extra["weights"]] if extra.get("weights") is not None else None
    if extra.get("class_weights") is not None:  # cross_entropy(..., weight=w_c): the row's label's weight
        y = batch[1].long()
        # an ignored row (label -100) has weight 0: it indexed the class weights at -100 (IndexError)
        cw = torch.as_tensor(extra["class_weights"], dtype=torch.float64, device=y.device)[y.clamp_min(0)]
        cw = cw.masked_fill(y < 0, 0.0)
        w = cw if w is None else torch.as_tensor(w) * cw.to(torch.as_tensor(w).dtype)
    scale = extra.get("scale")
    if scale is not None:
        w = scale if w is None else scale * w
    return None if w is None else torch.as_tensor(w).expand(field_rows(batch))


def cross_entropy_misfit(
    model: nn.Module,
    nll: NLL,
    rows: Batch,
    extra: dict[str, Any],
    *,
    failed: str,
    differs: str,
    plain: bool = False,
    flatten: bool = False,
) -> str | None:
    """Why ``nll`` on ``rows`` is not the cross-entropy of ``select_output(model(rows[0]), extra)`` with labels
    ``rows[1]``, or ``None`` where it is to ``1e3`` epsilons of the logits' dtype relative to ``1 + |loss|``.
    Parameters, buffers (BatchNorm statistics) and the RNG are as they were after it (:func:`preserved`).

    Args:
        model: The model (the parameters it holds are those compared at).
        nll: The per-row NLL; a result that is not a tensor of one value per row does not match.
        rows: The rows compared on.
        extra: The likelihood's details, as :func:`detect_likelihood` returns them.
        failed: The reason where the comparison raises; ``{}`` is replaced by the error's type name.
        differs: The reason where ``nll`` does not match.
        plain: Compare with the plain cross-entropy (else ``extra``'s ``label_smoothing`` and :func:`row_weights`
            enter it).
        flatten: Flatten the logits past the first dimension before the cross-entropy.
    """
    try:
        with preserved(model), torch.no_grad():
            h = nll(model, rows)
            logits = select_output(model(rows[0]), extra)
            if flatten:
                logits = logits.flatten(1)
            smoothing = 0.0 if plain else extra.get("label_smoothing", 0.0)
            want = F.cross_entropy(logits, rows[1].long(), reduction="none", label_smoothing=smoothing).double()
            w = None if plain else row_weights(rows, extra)
            if w is not None:
                want = torch.as_tensor(w).to(want.device, torch.float64) * want
    except Exception as err:  # a probe: any failure means "not shown to be this loss"
        return failed.format(type(err).__name__)
    tol = 1e3 * torch.finfo(logits.dtype if logits.is_floating_point() else torch.float32).eps
    if isinstance(h, Tensor) and h.shape == want.shape:
        if bool(((h.double() - want).abs() <= tol * (1 + want.abs())).all()):
            return None
    return differs


def _weight_fields(
    probe: Batch, rows: int, base: Tensor, call: Callable[[Batch], Tensor], close: Callable[[Tensor, Tensor], bool]
) -> tuple[list[tuple[int | None, Tensor | None]], str]:
    """Which floating ``[rows]`` field after the labels multiplies ``nll`` row by row, found by probing ``nll``
    with the field scaled by random factors ``r_i ∈ [0.5, 1.5]``: a weight field gives ``r·nll``, an unused one
    ``nll``. Returns ``[(index, field)]`` for the one weight field, ``[(None, None)]`` for none, and ``[]`` (with
    the reason) when several fields scale ``nll`` or one enters it otherwise (its likelihood is then not one of
    ``model(x)`` and ``y`` alone).
    """
    found: list[tuple[int | None, Tensor | None]] = []
    gen = torch.Generator().manual_seed(1)
    for j, t in enumerate(probe[2:], start=2):
        if not (isinstance(t, Tensor) and t.is_floating_point() and t.shape == (rows,)):
            continue
        r = (0.5 + torch.rand(rows, generator=gen, dtype=torch.float64)).to(t.device, t.dtype)
        try:
            other = call((*probe[:j], t * r, *probe[j + 1 :]))
        except Exception:  # a probe
            continue
        if isinstance(other, Tensor) and other.shape == base.shape and not close(other, base):
            if not close(other, r.to(base.dtype) * base):
                return [], f"nll depends on batch field {j} other than as a per-row weight"
            found.append((j, t))
    if len(found) > 1:
        return [], f"several batch fields scale nll row by row ({[j for j, _ in found]})"
    return (found or [(None, None)]), ""


def _categorical_fit(
    out: Tensor,
    labels: list[Tensor],
    values: list[Tensor],
    weight: Tensor | None,
    close: Callable[[Tensor, Tensor], bool],
    tol: float,
) -> tuple[dict[str, Any] | None, str]:
    """``{temperature, scale, label_smoothing}`` (each only when it is not the neutral value) such that every probed
    ``nll = scale·weight·cross_entropy(out/temperature, labels, label_smoothing)`` to float tolerance, else ``None``
    (with a reason when several fit).

    The slope of ``nll`` in the logit of the label, ``k = scale·weight·(1 − ε)/T`` per row, is read off the
    differences between label sets; then three one-parameter hypotheses are tried and each verified on every
    probed label set: a temperature (``T = 1/k``), a constant factor (``scale = k``, a tempered likelihood) and
    label smoothing (``ε = 1 − k``). Each leaves the output Hessian ``(scale·weight/T²)(diag p − ppᵀ)``,
    ``p = softmax(out/T)``: the GGN, and so the Fisher, is exact for it (the targets do not enter).
    """
    o = out.double()
    w = torch.ones(o.shape[0], dtype=torch.float64) if weight is None else weight.double().to("cpu")
    o = o.to("cpu")
    picked = [o.gather(1, lab.long().to("cpu")[:, None])[:, 0] for lab in labels]
    num = torch.zeros_like(w)
    den = torch.zeros_like(w)
    for v, z in zip(values[1:], picked[1:]):
        d_nll, d_z = values[0].double().cpu() - v.double().cpu(), z - picked[0]
        num, den = num + d_nll * d_z, den + d_z * d_z
    use = (den > 0) & (w > 0)
    if not bool(use.any()):
        return None, ""
    kappa = float(((num[use] / den[use]) / w[use]).mean())
    if not (kappa > 0 and math.isfinite(kappa)):
        return None, ""
    if abs(kappa - 1.0) <= tol:  # plain cross-entropy (with per-row weights): nothing to report
        kappa = 1.0
    fits = []
    for T, scale, eps in dict.fromkeys(((1.0 / kappa, 1.0, 0.0), (1.0, kappa, 0.0), (1.0, 1.0, 1.0 - kappa))):
        if not 0.0 <= eps < 1.0:
            continue
        ok = all(
            close(v.cpu(), scale * w * F.cross_entropy(o / T, lab.long().cpu(), reduction="none", label_smoothing=eps))
            for v, lab in zip(values, labels)
        )
        if ok:
            fit = {"temperature": T, "scale": scale, "label_smoothing": eps}
            fits.append({k: val for k, val in fit.items() if val != (0.0 if k == "label_smoothing" else 1.0)})
    if len(fits) > 1:  # e.g. confident probe rows, where lse(2z) ≈ 2·lse(z): the probe cannot tell T from scale
        return None, f"nll fits several of {fits} on the probe rows (confident predictions?)"
    return (fits[0], "") if fits else (None, "")


def _class_weight_fit(
    out: Tensor,
    y: Tensor,
    base: Tensor,
    nll_at: Callable[[Tensor, tuple[int, ...]], Tensor],
    close: Callable[[Tensor, Tensor], bool],
) -> list[float] | None:
    """Per-class weights ``w`` with ``nll = w[labels]·cross_entropy(out, labels)`` (``cross_entropy(...,
    weight=w)``) on every label set ``(y + k) mod C``, ``k < C`` (so each probe row is tried at every class; one
    ``nll`` call each), not all equal (a common factor is the categorical fit's ``scale``); else ``None``. Each
    class's weight is the least-squares ratio over the rows that carry it; the fit is then verified on every set.
    The output Hessian is ``w_y(diag p − ppᵀ)``: a per-row weight, so the GGN stays exact."""
    C = out.shape[1]
    o = out.double().cpu()
    num = torch.zeros(C, dtype=torch.float64)
    den = torch.zeros(C, dtype=torch.float64)
    sets = []
    for k in range(C):
        lab = (y.long() + k) % C
        try:
            v = base if k == 0 else nll_at(lab.to(y.dtype), (k, C))
        except Exception:  # a probe: any failure means "not this likelihood"
            return None
        if not (isinstance(v, Tensor) and v.shape == base.shape):
            return None
        ce = F.cross_entropy(o, lab.cpu(), reduction="none")
        v = v.double().cpu()
        num.index_add_(0, lab.cpu(), v * ce)
        den.index_add_(0, lab.cpu(), ce * ce)
        sets.append((lab.cpu(), v, ce))
    if not bool((den > 0).all()):
        return None
    w = num / den
    if not (bool(torch.isfinite(w).all()) and bool((w >= 0).all())) or float(w.max() - w.min()) <= 1e-6 * float(
        w.abs().max()
    ):
        return None
    if not all(close(v, w[lab] * ce) for lab, v, ce in sets):
        return None
    return [float(c) for c in w]


def empirical_fallback_message(reason: str, output: tuple[int, ...] | str | None = None, dim: int | None = None) -> str:
    """What K-FAC says when ``likelihood="auto"`` did not recognise ``nll`` and it uses the empirical Fisher.

    Args:
        reason: Why :func:`detect_likelihood` did not recognise ``nll``.
        output: What ``model(batch[0])`` returned (:func:`plain_output`): its shape, or the type it is where not a
            tensor; ``likelihood='categorical'`` is suggested only for a ``[B, C]`` tensor, the one it takes.
        dim: The model's parameter count (the dense Hessian's cost, said with ``solver='ggn'``).
    """
    if reason == _RANDOM:  # not the likelihood's form: the forward's noise
        fix = "Fix: call model.eval() first, or make the forward deterministic (the likelihood is then read); "
    elif reason.startswith(_UNCALLABLE):
        # likelihood='categorical' calls model(batch[0]) too: offered here, it failed with the forward's own TypeError
        # (stop 45's probes: forward(ids, mask), forward(dict))
        fix = (
            "Fix: K-FAC's categorical and Gaussian likelihoods take the output from model(batch[0]), so let forward "
            "take the first field alone (e.g. compute a padding mask from the token ids inside forward, ids != pad) "
            "and nll call model(b[0]) (a forward(a, b) on rows (a, b, y) is read as it is where a and b have one "
            "dtype and the same shapes in every minibatch: K-FAC packs them into one field); "
        )
    elif isinstance(output, tuple) and len(output) == 2:
        fix = "Fix: if model(x) returns the logits of nll's softmax cross-entropy, pass likelihood='categorical'; "
    else:
        # offered for a sequence model's [B, T, V] logits it failed: "needs model(x) of shape [B, C]" (stop 51)
        if isinstance(output, tuple):
            got = "is of shape [" + ", ".join(["B", *map(str, output[1:])]) + "]"
            if len(output) == 3:
                got += (
                    " (a cross-entropy at every position of [B, T, V] logits, summed or averaged per row, is read as "
                    "categorical; this nll is another loss, e.g. one skipping padded positions)"
                )
        else:
            got = "could not be called on a minibatch's first field" if output is None else f"is a {output}"
        fix = (
            "likelihood='categorical' does not apply: it takes model(x) itself as [B, C] logits (one row of C "
            f"classes per row of the minibatch, nll their cross-entropy), and model(x) {got}. Fix: "
        )
    cost = f"D = {dim:,} parameters here" if dim else "D the parameter count"
    return (
        "K-FAC uses the EMPIRICAL Fisher (gradients of nll at the true labels), which can be far from the "
        "curvature (0.09-0.63 relative off the dense GGN on probed models), because likelihood='auto' did not "
        f"recognise nll as a categorical or Gaussian likelihood of the model's output ({reason}). Recognised: "
        "cross-entropy or a Gaussian NLL of model(x) or of one tensor of a tuple/dict/dataclass output, with a "
        "temperature, "
        "label smoothing, a constant factor, per-class weight= or per-row weights from a batch field (batch[2:]). "
        f"{fix}for the exact curvature use solver='cg' (Hessian-vector products, no dense matrix), or "
        "solver='ggn' on small models only: for a likelihood it does not recognise it builds the dense Hessian, "
        f"D Hessian-vector products over the remaining rows and a D x D matrix ({cost}; a 2,712-parameter GRU "
        "took over 400 s a request where cg took 22 s); likelihood='empirical' keeps this choice without the "
        "warning"
    )


def plain_output(model: nn.Module, batch: Batch) -> tuple[int, ...] | str | None:
    """The shape of ``model(batch[0])`` on a few rows, the type's name where it is no tensor, ``None`` where it
    cannot be called (the model, its RNG states and gradients left as they were)."""
    probe = _head(tuple(batch), _PROBE_ROWS)
    with preserved(model), torch.no_grad():
        try:
            out = model(probe[0])
        except Exception:  # a probe: detect_likelihood says why
            return None
    return tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__


def input_fields(model: nn.Module, batch: Batch) -> int | None:
    """The number ``k >= 2`` of leading batch fields a model of several inputs takes (``forward(a, b)``, a Siamese
    pair, rows ``(a, b, y)``): where ``model(batch[0])`` raises a ``TypeError`` (a missing argument) and
    ``model(*batch[:k])`` runs on a few rows, the first ``k`` fields being tensors of one dtype and device with the
    batch's rows and a further field (the labels) following; else ``None``. K-FAC then packs those fields into one
    (:func:`packed_inputs`, where every minibatch's fields have the first's shapes) and reads the likelihood as for a
    one-input model. The model is left as it was."""
    probe = _head(tuple(batch), _PROBE_ROWS)
    if len(probe) < 3 or not all(isinstance(t, Tensor) for t in probe[:2]):
        return None
    if _required_inputs(model) in (0, 1):  # read off forward's signature: no probe forward (nor the user's hooks)
        return None
    with preserved(model), torch.no_grad():
        try:
            model(probe[0])
        except TypeError:
            pass
        except Exception:  # another failure: not a missing input
            return None
        else:
            return None
        rows = field_rows(probe)
        for k in range(2, len(probe)):
            head = probe[:k]
            if not all(
                isinstance(t, Tensor)
                and t.dim() > 0
                and t.shape[0] == rows
                and t.dtype == head[0].dtype
                and t.device == head[0].device
                for t in head
            ):
                return None
            try:
                model(*head)
            except TypeError:
                continue
            except Exception:  # the forward itself fails on these fields: not read
                return None
            return k
    return None


def _required_inputs(model: nn.Module) -> int | None:
    """How many positional arguments ``model.forward`` requires (those without a default); ``None`` where its
    signature cannot tell (no signature, or ``*args``): then :func:`input_fields` calls the model to find out."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional and p.default is inspect.Parameter.empty for p in params)


@contextlib.contextmanager
def packed_inputs(model: nn.Module, nll: NLL, batches: Sequence[Batch], k: int) -> Iterator[tuple[list[Batch], NLL]]:
    """Within the block, ``model`` also takes the first ``k`` fields of a minibatch packed into one ``[B, Σ d_i]``
    tensor (each field flattened per row, in order), so K-FAC's forward ``model(batch[0])``, its label field
    ``batch[1]`` and its weight fields ``batch[2:]`` read a model of several inputs as a one-input one: yields the
    packed minibatches and ``nll`` on them (unpacking the field before calling the user's). The model's other calls
    are its own; its ``forward`` is restored on exit."""
    shapes = [tuple(t.shape[1:]) for t in batches[0][:k]]
    widths = [math.prod(sh) for sh in shapes]
    total = sum(widths)

    def unpack(x: Tensor) -> list[Tensor]:
        return [part.reshape(x.shape[0], *sh) for part, sh in zip(x.split(widths, 1), shapes)]

    def pack(b: Batch) -> Batch:
        return (torch.cat([t.reshape(t.shape[0], -1) for t in b[:k]], 1), *b[k:])

    inner = model.forward
    own = model.__dict__.get("forward")

    def forward(*args: Any, **kwargs: Any) -> Any:
        x = args[0] if len(args) == 1 and not kwargs else None
        if isinstance(x, Tensor) and x.dim() == 2 and x.shape[1] == total:  # (one field: the forward takes k)
            return inner(*unpack(x))
        return inner(*args, **kwargs)

    model.forward = forward
    try:
        yield [pack(b) for b in batches], lambda m, b: nll(m, (*unpack(b[0]), *b[1:]))
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


_UNCALLABLE = "model(batch[0]) cannot be called on its own"
_RANDOM = (
    "nll gives different values on two calls on the same rows: the forward pass is random (in training mode, dropout "
    "makes forwards differ: nn.Dropout, or F.dropout(h, p, training=self.training)), so no likelihood can be read "
    "from it"
)


class _Given:
    """A stand-in for the model in ``nll(model, batch)``: returns the given output, whatever it is called with."""

    def __init__(self, out: Tensor) -> None:
        self.out = out

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.out


def gaussian_in_targets(nll: NLL, out: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """The mean ``m`` and variance ``v`` of a Gaussian NLL in a scalar target (one per row), as functions of ``out``.

    ``nll`` is called on ``out`` itself (through :class:`_Given`) at the targets ``y`` and ``y ± 1``; for
    ``nll_i = ½log v_i + (y_i − m_i)²/(2v_i) + c`` the second difference is ``1/v_i`` and the central one
    ``(y_i − m_i)/v_i``, exact for any ``m``, ``v`` of the output (a learned variance head through any link).
    Computed in float64 where ``out`` requires gradients: ``m``, ``v`` are then differentiable in ``out``.

    Args:
        nll: ``nll(model, batch) -> [B]``, calling ``model`` on ``batch[0]`` only.
        out: The model's output ``[B, ...]``.
        batch: ``(x, y, ...)`` with ``y`` floating, one value per row.

    Returns:
        ``(m, v)``, each ``[B]`` float64.
    """
    x, y = batch[0], batch[1]
    y0 = y.detach().to(torch.float64)
    given = _Given(out)
    lo, mid, hi = (nll(given, (x, (y0 + t).reshape(y.shape), *batch[2:])).double() for t in (-1.0, 0.0, 1.0))
    inv = hi + lo - 2 * mid
    v = 1 / inv
    return y0.reshape(-1) - v * (hi - lo) / 2, v


def learned_variance(model: nn.Module, nll: NLL, batch: Batch) -> dict[str, Any] | None:
    """``{"variance": "learned"}`` where ``nll`` is, row by row, a normalised Gaussian NLL in a scalar target
    whose mean and variance are functions of the tensor ``model(x)`` (:func:`gaussian_in_targets`;
    ``F.gaussian_nll_loss`` on a mean head and a variance head); else ``None``. Read on the first
    ``_PROBE_ROWS`` rows, checked at ``y + 2`` (the quadratic's prediction) and by ``nll(m) − ½log(1/v)`` being one
    constant across the rows and on the output shifted by ½ (a scaled NLL, whose Fisher is not the Gaussian's,
    differs where the variances do: across the rows, or under the shift where they are equal on every row).
    K-FAC and the GGN backend (``solver="ggn"``) take this Gaussian's Fisher where :func:`detect_likelihood` finds no
    likelihood (its other readers keep their fallbacks). The model, its RNG states and gradients are left as they
    were."""
    probe = _head(tuple(batch), _PROBE_ROWS)
    y = probe[1] if len(probe) > 1 else None
    if not (isinstance(y, Tensor) and y.is_floating_point()):
        return None
    with preserved(model), torch.no_grad():
        try:
            out = model(probe[0])
        except Exception:  # a probe: only nll knows how to call the model
            return None
    if not (isinstance(out, Tensor) and out.dim() >= 2 and y.numel() == out.shape[0] >= 1):
        return None
    try:
        o = out.detach().to(torch.float64)
        m, v = gaussian_in_targets(nll, o, probe)
        y0 = y.detach().to(torch.float64).reshape(-1)
        far = nll(_Given(o), (probe[0], (y0 + 2).reshape(y.shape), *probe[2:])).double()
        at = nll(_Given(o), (probe[0], m.reshape(y.shape), *probe[2:])).double()
        base = nll(_Given(o), (probe[0], y0.reshape(y.shape), *probe[2:])).double()
    except Exception:  # a probe: any failure means "not this likelihood"
        return None
    if any(t.shape != (y.numel(),) for t in (v, far, at, base)):  # not one value per row (a mean or sum reduction)
        return None
    if not (bool(torch.isfinite(v).all()) and bool((v > 0).all()) and bool(torch.isfinite(far).all())):
        return None
    tol = 1e3 * _eps(torch.float32)
    quad = at + (y0 + 2 - m).square() / (2 * v)
    const = at + 0.5 * torch.log(1 / v)
    if not bool(((far - quad).abs() <= tol * (1 + far.abs())).all()):
        return None
    if not bool(((base - at - (y0 - m).square() / (2 * v)).abs() <= tol * (1 + base.abs())).all()):
        return None
    if not bool(((const - const[0]).abs() <= tol * (1 + const.abs())).all()):
        return None
    # the same constant on the output shifted by ½, where the variances move: a scaled NLL k·N whose variances are
    # equal on the probe rows (a homoscedastic learned variance, one parameter broadcast) read as N(m, v/k) there,
    # its variance term's Fisher 1/k of the NLL's (stop 69's review)
    try:
        m2, v2 = gaussian_in_targets(nll, o + 0.5, probe)
        at2 = nll(_Given(o + 0.5), (probe[0], m2.reshape(y.shape), *probe[2:])).double()
    except Exception:  # a probe: any failure means "not this likelihood"
        return None
    if not (bool(torch.isfinite(v2).all()) and bool((v2 > 0).all())):
        return None
    moved = at2 + 0.5 * torch.log(1 / v2)
    if not bool(((moved - const[0]).abs() <= tol * (1 + moved.abs())).all()):
        return None
    return {"variance": "learned"}


def gaussian_refusal(learned: bool) -> str:
    """The refusal of ``likelihood="gaussian"`` where ``nll`` is no Gaussian NLL of ``model(x)`` with one noise
    scale, naming the fix: ``likelihood="auto"``, which reads a Gaussian whose variance the model learns
    (``learned``: ``F.gaussian_nll_loss`` on a mean and a variance head, since stop 69) and takes the empirical Fisher
    for another nll. ``sigma=`` is ``KroneckerCurvature.build``'s alone (``MCMCUnlearner`` has no such option: the
    message named it to every user, stop 70)."""
    if learned:
        return (
            "likelihood='gaussian' reads a Gaussian NLL with one noise scale (a mean squared error), but nll is a "
            "Gaussian whose variance the model learns (F.gaussian_nll_loss on a mean and a variance head): leave "
            "likelihood='auto' (the default), which takes that Gaussian's Fisher; nothing was changed"
        )
    return (
        "likelihood='gaussian' but nll is not a Gaussian NLL in model(x): leave likelihood='auto' (the default: it "
        "reads a Gaussian NLL, one whose variance the model learns, and takes the empirical Fisher for another nll) "
        "or pass likelihood='empirical' (KroneckerCurvature.build: or sigma=..., the noise scale); nothing was "
        "changed"
    )


#: what :func:`detect_likelihood` found, in words (the refusal of an explicit likelihood that the probe contradicts)
_READ_AS = {
    Likelihood.CATEGORICAL: "a cross-entropy over the model's output's classes (likelihood='categorical')",
    Likelihood.GAUSSIAN: "a Gaussian NLL, a squared error (likelihood='gaussian')",
    Likelihood.BERNOULLI: "a binary cross-entropy with logits (likelihood='bernoulli')",
}


def contradicted_likelihood(model: nn.Module, nll: NLL | None, batch: Batch, lik: Likelihood) -> str:
    """The refusal of an explicit ``likelihood="categorical"`` or ``"bernoulli"`` that the probe rows contradict
    (empty where they do not): :func:`detect_likelihood` identifies ``nll`` as another likelihood (or
    :func:`learned_variance` as a Gaussian whose variance the model learns). Only a positive identification
    contradicts it: an ``nll`` the detector cannot read (``EMPIRICAL``: a focal loss, a ``pos_weight``, ``[B, L, V]``
    logits) keeps the likelihood the user named. Before (stop 70): a mean squared error on float targets with
    ``likelihood="categorical"`` was accepted without a word and K-FAC took the softmax Fisher of a regression's
    outputs as its curvature. The model is left as it was (the detector's probe)."""
    if nll is None or lik not in (Likelihood.CATEGORICAL, Likelihood.BERNOULLI):
        return ""
    try:
        kind, _ = detect_likelihood(model, nll, batch)
        read = _READ_AS.get(kind)
        if kind is Likelihood.EMPIRICAL and learned_variance(model, nll, batch) is not None:
            kind, read = Likelihood.GAUSSIAN, "a Gaussian whose variance the model learns (F.gaussian_nll_loss)"
    except Exception:  # a probe: the likelihood's own build says what fails
        return ""
    if kind is lik or kind is Likelihood.EMPIRICAL or read is None:
        return ""
    return (
        f"likelihood='{lik.value}' but nll reads, on the probe rows, as {read}: K-FAC would take the "
        f"{lik.value} Fisher, another loss's curvature. Leave likelihood='auto' (the default), which reads nll and "
        "takes its likelihood's Fisher, or pass likelihood='empirical'; nothing was changed"
    )


def detect_likelihood(model: nn.Module, nll: NLL, batch: Batch) -> tuple[Likelihood, dict[str, Any]]:
    """Identify the user's per-row NLL from a few probe rows (:func:`likelihood_and_columns` without the width).

    Args:
        model: The user's model.
        nll: ``nll(model, batch) -> [B]``.
        batch: A minibatch; its first rows are probed.

    Returns:
        The likelihood and its extras, as :func:`likelihood_and_columns` finds them.

    Raises:
        ValueError: if ``nll`` does not return one value per row.
    """
    kind, extra, _ = likelihood_and_columns(model, nll, batch)
    return kind, extra


def likelihood_and_columns(model: nn.Module, nll: NLL, batch: Batch) -> tuple[Likelihood, dict[str, Any], int | None]:
    """Identify the user's per-row NLL from a few probe rows, and how wide the model's output is.

    * ``CATEGORICAL`` if ``y = batch[1]`` holds integer class labels, ``model(x)`` is ``[B, C]`` and
      ``nll(model, batch) == cross_entropy(model(x), y)`` row by row (also checked with shifted labels); also,
      with the fitted value in the extras, ``scale·w·cross_entropy(model(x)/temperature, y, label_smoothing=ε)``
      for one of a temperature, a constant factor ``scale`` or label smoothing ``ε``, and per-row weights ``w``
      taken from a floating ``[B]`` batch field (``{"weights": index}``); per-class weights ``cross_entropy(...,
      weight=w)`` (``{"class_weights": w}``, up to ``CLASS_WEIGHT_MAX_CLASSES`` classes, ``nll`` probed at every
      label); and for class-probability targets;
    * ``GAUSSIAN`` with ``{"sigma": σ}`` if ``nll_i = w_i·(a·Σ_out (model(x)_i − y_i)² + c)`` for the true labels
      and two perturbed label sets (``w_i = 1`` or a batch field as above): ``a`` and ``c`` are fitted by least
      squares on all probe rows, the fit must be exact to float tolerance and ``a > 0``; then ``σ² = 1/(2a)``;
    * ``BERNOULLI`` if ``nll_i = scale·w_i·Σ_k binary_cross_entropy_with_logits(model(x)_ik, y_ik)`` for targets in
      ``[0, 1]`` (integer or floating, hard or soft) with as many values per row as the output (``[B]`` or
      ``[B, 1]`` logits, or multi-label ``[B, K]``), on the true and the flipped targets ``1 − y`` (``scale`` a
      constant factor such as a mean over ``K``, only when not 1; ``w_i`` a weight field as above);
      ``pos_weight=``, a focal loss or any other function of the logits differs on one of them;
    * when ``model(x)`` is a tuple, list or dict, each of its ``[B, ...]`` tensors is tried in turn
      (``{"output": key}`` names the one found);
    * ``EMPIRICAL`` otherwise (``{"reason": ...}`` says why).

    Every fit is verified against ``nll`` on every probed label set, so what is found is the loss (up to float
    tolerance) and its output Hessian, hence the GGN/Fisher, is exact. :func:`select_output` and
    :func:`row_weights` apply the extras. Runs without gradients on at most 8 rows; the model (parameters,
    buffers, ``.grad``) and the global RNG states are left exactly as they were.

    The width is read from the same forward ``model(x)``, none of its own (a user's forward hook fired once more
    than needed where a second probe read it: review): the most values per row of any ``[B, ...]`` tensor
    ``model(x)`` gives (the output itself, or one in a tuple, list or dict). An integer target ``batch[1]`` above it
    indexes no class of the model's output (a count regression's targets). ``None`` where ``model(x)`` cannot be
    called alone (only ``nll`` knows how) or gives no such tensor.

    Args:
        model: The user's model.
        nll: ``nll(model, batch) -> [B]``.
        batch: A minibatch; its first rows are probed.

    Returns:
        ``(likelihood, extras, columns)``: the likelihood found, its extras (above) and the output's width.

    Raises:
        ValueError: if ``nll`` does not return one value per row.
    """
    batch = tuple(batch)
    probe = _head(labelled(batch), _PROBE_ROWS)
    rows = field_rows(probe)
    x, y = probe[0], probe[1] if len(probe) > 1 else None
    with preserved(model), torch.no_grad():
        base = nll(model, probe)
        if not isinstance(base, Tensor) or base.shape != (rows,):
            shape = tuple(base.shape) if isinstance(base, Tensor) else type(base).__name__
            raise ValueError(f"nll(model, batch) must return one value per row, shape [{rows}], got {shape}")
        again = nll(model, probe)
        tol0 = 1e3 * _eps(base.dtype if base.is_floating_point() else torch.float32)
        if isinstance(again, Tensor) and again.shape == base.shape and bool(torch.isfinite(base).all()):
            if not bool(((again.double() - base.double()).abs() <= tol0 * (1 + base.double().abs())).all()):
                # dropout in training mode (F.dropout(h, p, training=self.training)): every probe sees other masks,
                # and the likelihood's form was blamed (stop 55's probe: "pass likelihood='categorical'")
                return Likelihood.EMPIRICAL, {"reason": _RANDOM}, None
        try:
            raw = model(x)
        except (TypeError, RuntimeError, ValueError, IndexError, KeyError, AttributeError) as e:
            # e.g. a model of several inputs, forward(x1, x2): only nll knows how to call it
            why = f"{_UNCALLABLE} ({type(e).__name__}: {str(e)[:80]}); nll calls it{_label_hint(probe)}"
            return Likelihood.EMPIRICAL, {"reason": why}, None
        candidates = _output_candidates(raw, rows)
        columns = max((int(t.shape[1:].numel()) for _, t in candidates), default=None)
        if not candidates or y is None or not isinstance(y, Tensor):
            return (
                Likelihood.EMPIRICAL,
                {
                    "reason": "model(x) is not a [B, ...] tensor (nor a tuple, dict, dataclass or Categorical holding "
                    "one) or the batch has no labels"
                },
                columns,
            )
        cache: dict[tuple[int, ...], Tensor | Exception] = {}

        def nll_at(labels: Tensor, key: tuple[int, ...]) -> Tensor:
            """``nll`` with ``labels`` in place of ``y``, cached by ``key`` (the label set; shifted labels depend on the
            class count of the output tried); re-raises its failure."""
            if key not in cache:
                try:
                    cache[key] = nll(model, (x, labels, *probe[2:]))
                except Exception as err:  # a probe: any failure means "not this likelihood"
                    cache[key] = err
            if isinstance(cache[key], Exception):
                raise cache[key]
            return cache[key]

        tol = 1e3 * _eps(base.dtype if base.is_floating_point() else torch.float32)
        weights, why = _weight_fields(
            probe,
            rows,
            base,
            lambda b: nll(model, b),
            lambda a, b: bool(((a.double() - b.double()).abs() <= tol * (1 + b.double().abs())).all()),
        )
        if not weights:
            return Likelihood.EMPIRICAL, {"reason": why}, columns
        reasons = []
        for key, out in candidates:
            kind, extra = _detect_in(model, out, y, base, nll_at, weights)
            if kind is not Likelihood.EMPIRICAL:
                return kind, ({"output": key, **extra} if key is not None else extra), columns
            reasons.append(extra["reason"] if key is None else f"output {key!r}: {extra['reason']}")
        return Likelihood.EMPIRICAL, {"reason": "; ".join(reasons) + _label_hint(probe)}, columns


def positions_fit(model: nn.Module, nll: NLL, batch: Batch) -> dict[str, Any] | None:
    """K-FAC's reading of a per-position cross-entropy (a language model's head): ``{"positions": L}`` (with
    ``"scale": 1/L`` for a mean over positions) where ``batch[1]`` holds integer labels ``[B, L]``, ``model(x)`` is
    ``[B, L, V]`` and ``nll`` is ``Σ_l cross_entropy(model(x)[:, l], y[:, l])`` (or the mean) row by row, on the true
    and the shifted labels, also with ``label_smoothing=ε`` (``"label_smoothing": ε``, fitted: the output Hessian is
    the plain one's), times a per-row weight field where one scales it (``"weights": index``), and reads no
    per-position field (``[B, L, ...]``, e.g. a padding mask, whose zeros past the probe rows the Fisher would count);
    else ``None``.
    Each position's output Hessian is ``diag p − ppᵀ``, so labels sampled per position give the GGN's factors. The
    model, its RNG states and gradients are left as they were."""
    probe = _head(tuple(batch), _PROBE_ROWS)
    y = probe[1] if len(probe) > 1 else None
    if not isinstance(y, Tensor) or y.dim() != 2 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        return None
    with preserved(model), torch.no_grad():
        try:
            out = model(probe[0])
        except Exception:  # a probe: only nll knows how to call the model
            return None
        if not (isinstance(out, Tensor) and out.dim() == 3 and out.shape[:2] == y.shape and y.numel()):
            return None
        V = out.shape[2]
        if not (0 <= int(y.min()) and int(y.max()) < V):
            return None
        tol = 1e3 * _eps(out.dtype)
        sums, values = [], []
        for labels in (y, (y + 1) % V):
            try:
                v = nll(model, (probe[0], labels, *probe[2:]))
            except Exception:  # a probe
                return None
            if not isinstance(v, Tensor) or v.shape != y.shape[:1]:
                return None
            ce = F.cross_entropy(out.reshape(-1, V).double(), labels.reshape(-1).long(), reduction="none")
            sums.append(ce.reshape(y.shape).sum(1))
            values.append(v.double())
        # label smoothing's term, the same for every label set: Σ_l mean_v(−log p_v) per row
        smooth = (-torch.log_softmax(out.double(), -1)).mean(-1).sum(1)

        def close(a: Tensor, b: Tensor) -> bool:
            return bool(((a.double() - b.double()).abs() <= tol * (1 + a.double().abs())).all())

        for j, t in enumerate(probe[2:], start=2):  # a per-position field nll reads (a padding mask): not read
            if isinstance(t, Tensor) and t.dim() >= 2 and t.shape[:2] == y.shape:
                moved = (
                    t.logical_not() if t.dtype == torch.bool else (t * 0.5 + 0.25 if t.is_floating_point() else t + 1)
                )
                try:
                    other = nll(model, (*probe[:j], moved, *probe[j + 1 :]))
                except Exception:  # a probe
                    return None
                if not (isinstance(other, Tensor) and other.shape == values[0].shape and close(values[0], other)):
                    return None
        # a per-row weight field (DistributedUnlearner's nll is w·h with w = 1/|B_global|)
        weights, _ = _weight_fields(probe, y.shape[0], values[0], lambda b: nll(model, b), close)
    L = y.shape[1]
    for smoothed in (False, True):
        for j, w in weights:
            factor = 1.0 if w is None else w.double()
            for scale in (1.0, 1.0 / L):
                eps = _smoothing_fit(values, sums, smooth, scale * factor, close) if smoothed else 0.0
                if eps is None or not (smoothed or all(close(v, scale * factor * c) for v, c in zip(values, sums))):
                    continue
                found: dict[str, Any] = {"positions": L} if scale == 1.0 else {"positions": L, "scale": scale}
                found = found if eps == 0.0 else {**found, "label_smoothing": eps}
                return found if j is None else {**found, "weights": j}
    return None


def _smoothing_fit(
    values: list[Tensor],
    sums: list[Tensor],
    smooth: Tensor,
    factor: Tensor | float,
    close: Callable[[Tensor, Tensor], bool],
) -> float | None:
    """The label smoothing ``ε ∈ (0, 1]`` for which every probed ``nll = factor·Σ_l cross_entropy(out_l, y_l,
    label_smoothing=ε)`` row by row (``values`` and the plain sums ``sums`` per label set, ``smooth`` the rows'
    ``Σ_l mean_v(−log p_v)``), else ``None``. Its output Hessian is the plain cross-entropy's (the targets do not
    enter it): only the scale must be known. ``ε`` is read off the difference between the label sets, then verified
    on each of them."""
    a = torch.as_tensor(factor, dtype=torch.float64)
    d_nll, d_ce = values[0] - values[1], a * (sums[0] - sums[1])
    den = float((d_ce * d_ce).sum())
    if not den > 0:
        return None
    eps = 1.0 - float((d_nll * d_ce).sum()) / den
    if not (0.0 < eps <= 1.0):
        return None
    if all(close(v, a * ((1.0 - eps) * c + eps * smooth)) for v, c in zip(values, sums)):
        return eps
    return None


def _ignored_positions(batches: Sequence[Batch]) -> bool:
    """Whether a minibatch's integer labels ``batch[1]`` of shape ``[B, L]`` hold a negative one (cross-entropy's
    ``ignore_index=-100``: a padded position), which :func:`positions_fit`'s probe rows may not show."""
    for b in batches:
        y = b[1] if len(b) > 1 else None
        if isinstance(y, Tensor) and y.dim() == 2 and not y.is_floating_point() and y.dtype != torch.bool:
            if y.numel() and bool((y < 0).any()):
                return True
    return False


def explicit_positions(model: nn.Module, nll: NLL | None, batch: Batch, batches: Sequence[Batch]) -> dict[str, Any]:
    """The per-position reading of ``likelihood="categorical"`` given explicitly: :func:`positions_fit`'s extras
    (the same curvature as ``likelihood="auto"``'s reading) where ``batch[1]`` holds integer labels ``[B, L]`` and
    ``model(x)`` is ``[B, L, V]``; ``{"positions": L}`` (the labels' likelihood at every position) without ``nll``;
    ``{}`` for other shapes (the ``[B, C]`` categorical). Where it cannot be read: ``{"refuse": why}``.

    It took the curvature of a sum over every position: ``L`` times too large for a mean over positions, and padded
    positions (label ``-100``, which the cross-entropy skips) counted. The model is left as it was."""
    probe = _head(tuple(batch), _PROBE_ROWS)
    y = probe[1] if len(probe) > 1 else None
    if not isinstance(y, Tensor) or y.dim() != 2 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        return {}
    with preserved(model), torch.no_grad():
        try:
            out = model(probe[0])
        except Exception:  # the categorical likelihood's own call says what failed
            return {}
    if not (isinstance(out, Tensor) and out.dim() == 3 and out.shape[:2] == y.shape):
        return {}
    what = "likelihood='categorical' on [B, L, V] logits with labels [B, L]"
    fix = (
        "Fix: leave likelihood='auto' (the empirical Fisher where the per-position likelihood cannot be read: it "
        "reads nll), or use solver='cg' for the exact curvature; nothing was changed"
    )
    if _ignored_positions([*batches, probe]):
        return {
            "refuse": f"{what}: some labels are negative (ignore_index positions, e.g. padding), which the "
            f"cross-entropy skips and K-FAC's per-position Fisher would count (the curvature of every position "
            f"labelled; it does not mask them). Fix: give minibatches of sequences of one length (rows bucketed by "
            f"length, so that no label is negative: each bucket is then read per position as it is), or "
            f"{fix.removeprefix('Fix: ')}"
        }
    if nll is None:
        return {"positions": y.shape[1]}
    found = positions_fit(model, nll, batch)
    if found is None:
        return {
            "refuse": f"{what}: nll is not read as the cross-entropy at every position summed or averaged per row "
            "(label-smoothed or not, times a per-row weight field at most, reading no per-position field such as a "
            "padding mask), so the "
            f"likelihood's scale over the positions is unknown (a mean taken as a sum is L times too large). {fix}"
        }
    return found


def _label_hint(batch: Batch) -> str:
    """Where ``batch[1]`` holds no integer labels but a later field does (``(ids, mask, y)``): that the labels are read
    from the second field (stop 45's text probe: the mask was taken as the labels, silently)."""

    def labels(t: Any) -> bool:
        return isinstance(t, Tensor) and t.dim() == 1 and not (t.is_floating_point() or t.is_complex())

    if len(batch) < 3 or labels(batch[1]):
        return ""
    later = [i for i in range(2, len(batch)) if labels(batch[i]) and batch[i].dtype != torch.bool]
    if not later:
        return ""
    return (
        f" (the labels are read from a minibatch's second field, batch[1], which holds no integer labels here; "
        f"batch[{later[0]}] does: put the labels second, e.g. (ids, y, mask) with nll reading b[1])"
    )


def _detect_in(
    model: nn.Module,
    out: Tensor,
    y: Tensor,
    base: Tensor,
    nll_at: Callable[[Tensor, tuple[int, ...]], Tensor],
    weights: list[tuple[int | None, Tensor | None]],
) -> tuple[Likelihood, dict[str, Any]]:
    """:func:`detect_likelihood`'s checks for one output tensor ``out`` (``base = nll`` at the true labels)."""
    rows = out.shape[0]
    tol = 1e3 * _eps(out.dtype)
    base64 = base.double()

    def close(a: Tensor, b: Tensor) -> bool:
        return bool(((a.double() - b.double()).abs() <= tol * (1 + b.double().abs())).all())

    found = _bernoulli_fit(out, y, base, nll_at, weights)
    if found is not None:
        return Likelihood.BERNOULLI, found
    integer = not (y.is_floating_point() or y.is_complex())
    if integer and out.dim() == 2 and y.shape == (rows,) and 0 <= int(y.min()) and int(y.max()) < out.shape[1]:
        C = out.shape[1]
        shifted = (y + 1) % C
        try:
            other = nll_at(shifted, (1, C))
        except Exception as err:  # a probe: any failure means "not the plain CE"
            return Likelihood.EMPIRICAL, {"reason": f"nll failed on shifted labels: {err}"}
        # labels of any integer dtype (int32 too: cross_entropy takes int64 only; the user's nll may convert)
        if (
            weights[0][0] is None  # with a weight field the fit below says so, even where it is 1 on the probe rows
            and close(base, F.cross_entropy(out, y.long(), reduction="none"))
            and close(other, F.cross_entropy(out, shifted.long(), reduction="none"))
        ):
            return Likelihood.CATEGORICAL, {}
        labels, values = [y, shifted], [base, other]
        if C >= 3:
            with contextlib.suppress(Exception):
                values.append(nll_at((y + 2) % C, (2, C)))
                labels.append((y + 2) % C)
        ambiguous = ""
        if all(isinstance(v, Tensor) and v.shape == (rows,) for v in values):
            for j, w in weights:
                fit, ambiguous = _categorical_fit(out, labels, values, w, close, tol)
                if fit is not None:
                    return Likelihood.CATEGORICAL, (fit if j is None else {**fit, "weights": j})
        if ambiguous:
            return Likelihood.EMPIRICAL, {"reason": ambiguous}
        if weights[0][0] is None and C <= CLASS_WEIGHT_MAX_CLASSES:
            found = _class_weight_fit(out, y, base, nll_at, close)
            if found is not None:
                return Likelihood.CATEGORICAL, {"class_weights": found}
        drops = (m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd))
        dropout = any(m.training and m.p > 0 for m in drops)
        hint = " (the model is in training mode: dropout makes forwards differ)" if dropout else ""
        return Likelihood.EMPIRICAL, {
            "reason": "integer labels, but nll is not cross_entropy(model(x), y) (nor with a temperature, label "
            f"smoothing, a constant factor, per-class weight= or weights from a batch field){hint}"
        }
    if (
        y.is_floating_point()
        and out.dim() == 2
        and y.shape == out.shape
        and bool((y >= 0).all())
        and bool(((y.double().sum(1) - 1.0).abs() <= 1e-4).all())
    ):  # class probabilities as targets (one-hot or soft): the categorical Fisher does not depend on them
        rolled = y.roll(1, dims=1)
        try:
            other = nll_at(rolled, (3,))
        except Exception:  # a probe
            other = None
        if (
            other is not None
            and close(base, F.cross_entropy(out, y, reduction="none"))
            and close(other, F.cross_entropy(out, rolled, reduction="none"))
        ):
            return Likelihood.CATEGORICAL, {"targets": "class probabilities"}
    if y.is_floating_point() and y.numel() == out.numel():
        gen = torch.Generator().manual_seed(0)
        scale = float(y.double().std()) if y.numel() > 1 else 1.0
        u = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y) * (scale if scale > 0 else 1.0)
        rs, vs = [], []
        for i, t in enumerate((0.0, 1.0, -0.5)):
            yt = y + t * u
            try:
                v = base64 if t == 0.0 else nll_at(yt, (4, i)).double()
            except Exception as err:  # a probe
                return Likelihood.EMPIRICAL, {"reason": f"nll failed on perturbed targets: {err}"}
            rs.append((out.double() - yt.double().reshape(out.shape)).pow(2).reshape(rows, -1).sum(1))
            vs.append(v.reshape(-1))
        r, v = torch.cat(rs).cpu(), torch.cat(vs).cpu()
        resid = math.inf
        for j, w in weights:  # nll_i = w_i·(a·r_i + c): least squares in (a, c)
            wr = torch.ones_like(r) if w is None else w.double().cpu().repeat(3)
            design = torch.stack([wr * r, wr], 1)
            coef = torch.linalg.lstsq(design, v[:, None]).solution[:, 0]
            a, c = float(coef[0]), float(coef[1])
            resid = min(resid, float((design @ coef - v).abs().max()))
            if (
                a > 0
                and math.isfinite(a)
                and float((design @ coef - v).abs().max()) <= tol * max(1.0, float(v.abs().max()))
            ):
                found = {"sigma": math.sqrt(0.5 / a), "constant": c}
                return Likelihood.GAUSSIAN, (found if j is None else {**found, "weights": j})
        return Likelihood.EMPIRICAL, {"reason": f"nll is not a·Σ(model(x) − y)² + c (fit residual {resid:.3g})"}
    return Likelihood.EMPIRICAL, {"reason": "labels fit neither the categorical, Bernoulli nor the Gaussian check"}


def _bernoulli_nll(z: Tensor, y: Tensor) -> Tensor:
    """``Σ_k binary_cross_entropy_with_logits(z_k, y_k)`` per row, in float64 (``z`` and ``y`` of one number of
    values per row: ``[B]``, ``[B, 1]`` or ``[B, K]``)."""
    rows = z.shape[0]
    zz = z.double().reshape(rows, -1)
    yy = y.double().reshape(rows, -1).to(zz.device)
    return F.binary_cross_entropy_with_logits(zz, yy, reduction="none").sum(1)


def _bernoulli_fit(
    out: Tensor,
    y: Tensor,
    base: Tensor,
    nll_at: Callable[[Tensor, tuple[int, ...]], Tensor],
    weights: list[tuple[int | None, Tensor | None]],
) -> dict[str, Any] | None:
    """The extras of a Bernoulli likelihood ``nll_i = scale·w_i·Σ_k BCE(model(x)_ik, y_ik)`` on logits (targets in
    ``[0, 1]``, hard or soft, as many per row as the output has values: ``[B]``/``[B, 1]`` or multi-label ``[B, K]``),
    ``{}`` for the plain one, ``None`` where ``nll`` is not that loss on the true AND the flipped targets ``1 − y``
    (``pos_weight=``, a focal loss or a mean over labels with a per-row weight differ on one of them).

    ``scale`` (a constant factor, e.g. ``.mean(1)`` over ``K`` labels) is fitted from the true targets and verified
    on the flipped ones; ``w_i`` is a per-row weight field (``{"weights": index}``). The output Hessian is then
    ``scale·w_i·diag(p(1 − p))``, ``p = sigmoid(model(x))``, whatever the targets.
    """
    rows = out.shape[0]
    # the looser of the logits' and the loss's dtypes: float64 logits against y.float() give a float32 loss
    tol = 1e3 * max(_eps(out.dtype), _eps(base.dtype if base.is_floating_point() else torch.float32))

    def close(a: Tensor, b: Tensor) -> bool:
        return bool(((a.double() - b.double()).abs() <= tol * (1 + b.double().abs())).all())

    if not (out.is_floating_point() and y.numel() == out.numel() and y.shape[:1] == (rows,) and y.numel()):
        return None
    if y.dtype == torch.bool or y.is_complex() or not bool(((y >= 0) & (y <= 1)).all()):
        return None
    flipped = 1 - y
    try:
        other = nll_at(flipped, (5,))
    except Exception:  # a probe: any failure means "not this loss"
        return None
    if not (isinstance(other, Tensor) and other.shape == base.shape):
        return None
    want, want_flip = _bernoulli_nll(out, y), _bernoulli_nll(out, flipped)
    for j, w in weights:
        ww = torch.ones_like(want) if w is None else w.double().to(want.device)
        den = (ww * want).square().sum()
        if not bool(den > 0):
            continue
        scale = float((ww * want * base.double().to(want.device)).sum() / den)
        if not (scale > 0 and math.isfinite(scale)):
            continue
        if abs(scale - 1.0) <= 1e-6:
            scale = 1.0
        if close(base, scale * ww * want) and close(other, scale * ww * want_flip):
            found: dict[str, Any] = {} if scale == 1.0 else {"scale": scale}
            return found if j is None else {**found, "weights": j}
    return None


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
    with preserved(model), torch.enable_grad():
        t = theta.detach().clone().requires_grad_(True)
        value = f(t)
        if not isinstance(value, Tensor) or not value.requires_grad:
            notes["independent"] = True
            notes["source"] = "log_prior does not depend on the parameters: zero precision"
            return P, notes
        (g,) = torch.autograd.grad(value, t, create_graph=True)
        if not g.requires_grad:  # linear in θ: zero curvature
            notes["source"] = "log_prior is linear in the parameters: zero precision"
            notes["flat"] = bool(g.detach().any())
            return P, notes

        def quotients(v: Tensor, names: Sequence[str]) -> Tensor:
            # v through g·v's sum (the same hv to every bit: 1·v is v), not grad_outputs=v, whose first use in a
            # process imports sympy (torch.autograd's _make_grads: 485 modules, 0.4 s CPU of a first request; stop 68)
            (hv,) = torch.autograd.grad((g * v).sum(), t, retain_graph=True, allow_unused=True)
            if hv is None:
                return torch.zeros(len(names), dtype=torch.float64)
            f64 = torch.float64
            return torch.stack(
                [
                    -(v[offsets[k]] * hv[offsets[k]]).sum(dtype=f64) / v[offsets[k]].square().sum(dtype=f64)
                    for k in names
                ]
            ).cpu()

        def probe(names: Sequence[str]) -> Tensor:
            v = torch.zeros_like(t)
            for k in names:
                sl = offsets[k]
                v[sl] = torch.randn(sl.stop - sl.start, generator=gen, dtype=v.dtype).to(v.device)
            return v

        # fast path: two probes over all tensors at once. For a prior that is separable across tensors and
        # isotropic on each, every tensor's Rayleigh quotient is its precision whatever the probe, so the two
        # agree; otherwise (cross-tensor terms, anisotropy) fall back to one probe per tensor.
        q1, q2 = (quotients(probe(spec.names), spec.names) for _ in range(2))
        if torch.allclose(q1, q2, rtol=1e-5, atol=1e-12):
            precisions, notes["probes"] = q1, "joint (separable, isotropic per tensor)"
        else:
            precisions = torch.cat([quotients(probe([k]), [k]) for k in spec.names])
            notes["probes"] = "one per tensor"
        notes["curved"] = sum(1 for prec in precisions.tolist() if prec != 0)
        notes["flat"] = notes["curved"] == 0 and bool(g.detach().any())  # e.g. a Laplace prior: |θ| has no curvature
        for name, prec in zip(spec.names, precisions.tolist()):
            if prec < 0:
                notes["clamped"][name] = prec
                prec = 0.0
            P[offsets[name]] = prec
    notes["source"] = "−vᵀ∇²log p(θ)v/‖v‖² per parameter tensor (random probe, double backward)"
    return P, notes


def prior_precision(model: nn.Module, log_prior: Callable[[nn.Module], Tensor] | None, theta: Tensor) -> Tensor:
    """Precision of the prior along each parameter, measured from ``log_prior`` at the flat parameters ``theta``.

    For each parameter tensor ``k``: ``−vᵀ∇²log p(θ)v / ‖v‖²`` for a random Gaussian probe ``v`` supported on that
    tensor (double backward through ``log_prior(model)`` evaluated at ``theta`` by ``functional_call``). This is
    exact for Gaussian priors that are isotropic on each tensor (``N(μ_k, σ_k² I)``, any ``σ_k`` and mean) and a
    local (probe-direction) curvature at ``theta`` otherwise. Two probes spread over all tensors at once are tried
    first: for a prior separable across tensors and isotropic on each, every tensor's quotient is its precision
    whatever the probe, so they agree and two double-backward passes suffice; otherwise one probe per tensor is
    used. Returns zeros when ``log_prior`` is ``None`` or does not depend on the parameters. Negative values (a
    locally non-convex prior) are clamped to 0 and a :class:`RuntimeWarning` names the tensors. The model is not
    changed.

    Returns:
        ``[D]`` tensor in ``theta``'s dtype/device.
    """
    P, notes = _measure_prior(model, log_prior, theta)
    _warn_clamped(notes)
    return P


def _warn_clamped(notes: dict[str, Any]) -> None:
    """Warn about the tensors along which ``log_prior`` curves upwards (their precision clamped to 0); when it does
    along every tensor it curves along, most likely its sign is flipped, and the warning says so (stop 44's probe:
    a flipped Gaussian log-density was taken by K-FAC as a flat prior without a word)."""
    if notes.get("flat"):
        warnings.warn(
            "log_prior depends on the parameters but has no curvature at the samples (a Laplace prior, -|θ|/b, or "
            "another piecewise-linear or linear one): the Kronecker-factored and GGN curvatures take no prior term "
            "from it, and in directions the data do not curve only the damping stands in for it (stop 46). A "
            "smooth prior, e.g. a Gaussian, gives them its precision",
            RuntimeWarning,
            stacklevel=outside_stacklevel(),
        )
    if not notes.get("clamped"):
        return
    flipped = len(notes["clamped"]) == notes.get("curved", -1)
    warnings.warn(
        f"prior curvature is negative along {sorted(notes['clamped'])}: precision clamped to 0 there"
        + (
            "; log_prior curves upwards along every parameter tensor it depends on: is its sign flipped? "
            "log_prior(model) is the log-density, e.g. -0.5 * sum((p ** 2).sum() for p in model.parameters()) "
            "/ sigma ** 2 for a Gaussian N(0, sigma^2), not its negative"
            if flipped
            else ""
        ),
        RuntimeWarning,
        stacklevel=outside_stacklevel(),
    )


# ----------------------------------------------------------------------------------------------- blocks
class _Moment:
    """``Σ x xᵀ`` over rows ``x`` (or its diagonal), kept as the raw rows while there are fewer rows than dimensions.

    With ``N < d`` rows the factor has rank ``≤ N``: its eigenpairs come from the ``N×N`` Gram matrix (cheaper than a
    ``d×d`` eigendecomposition, and products then cost ``O(d·N)`` per side instead of ``O(d²)``; e.g. the 1024-wide
    layers of an MLP seen on 4 draws × 128 rows, or a late 3×3 convolution over 256 channels, 2,305 patch dimensions,
    seen at 1,024 locations: its eigendecomposition took 3.5 s of a 5.5 s build as a full factor). Rows are folded
    into the sum as soon as they reach ``d``, or when the sums must be reduced across processes.
    """

    def __init__(self, dim: int, full: bool, keep_rows: bool) -> None:
        self.dim, self.full, self.keep_rows = dim, full, keep_rows and full
        self.rows: list[Tensor] = []
        self.n_rows = 0
        self.sum: Tensor | None = None

    def can_keep(self, n: int) -> bool:
        return self.keep_rows and self.n_rows + n < self.dim

    def add_rows(self, x: Tensor) -> None:
        if self.can_keep(x.shape[0]):
            self.rows.append(x.clone())
            self.n_rows += x.shape[0]
        else:
            self.add_sum(_second_moment(x, self.full))

    def add_sum(self, stat: Tensor) -> None:
        self.fold()
        self.sum = stat if self.sum is None else self.sum + stat

    def fold(self) -> None:
        """Turn kept rows into the sum (from now on only sums are kept)."""
        self.keep_rows = False
        if self.rows:
            X = torch.cat(self.rows)
            self.rows = []
            self.add_sum(_second_moment(X, self.full))

    def eig(self, scale: float, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Eigenvalues and eigenvectors of ``scale·Σ x xᵀ``: ``Q`` is ``[d, r]`` (``r < d`` from kept rows), or
        ``None`` for a diagonal factor (the eigenvalues are then its diagonal)."""
        if self.rows and self.sum is None:
            X = torch.cat(self.rows).to(dtype)
            self.rows = []
            gram = scale * (X @ X.T)
            mu, W = _psd_eigh(0.5 * (gram + gram.T))
            keep = mu > float(mu.max()) * X.shape[0] * torch.finfo(dtype).eps if mu.numel() else mu > 0
            mu, W = mu[keep], W[:, keep]
            U = (X.T @ W) * (scale / mu).sqrt()
            U, R = torch.linalg.qr(U)  # orthonormal to float precision (R ≈ I up to signs)
            U = U * torch.sign(torch.diagonal(R))
            return mu.to(dtype), U.to(dtype).contiguous()
        self.fold()
        if self.sum is None:
            shape = (self.dim, self.dim) if self.full else (self.dim,)
            self.sum = torch.zeros(shape, dtype=dtype, device=device)
        M, self.sum = self.sum * scale, None
        if not self.full:
            return M.clamp_min(0), None
        lam, Q = _psd_eigh(0.5 * (M + M.T))
        return lam.clamp_min(0), Q.contiguous()


#: A float32 factor (or Gram matrix) at least this wide is decomposed in float32 first (:func:`_psd_eigh`), 2.2×
#: faster than float64 at 577-1,153 (one thread): the model matrix's ResNet's factors of 577 and 1,153 and Gram
#: matrices of 1,024, 0.95 s of float64 ``eigh`` per build. Every factor of the default experiments is narrower
#: (LeNet-5 on 28×28 Fashion-MNIST: 401 at most; the digits networks and the quick model matrix's others: fewer)
#: and stays on the float64 path, bit for bit.
EIGH_FLOAT32_FROM_DIM = 512
#: The float32 decomposition is kept when, on :data:`EIGH_FLOAT32_PROBES` seeded Gaussian probes ``z``,
#: ``‖(MQ − QΛ)z‖ ≤ tol·‖M‖₂‖z‖`` and ``‖(QᵀQ − I)z‖ ≤ tol·‖z‖``; otherwise (or when float32 ``eigh`` fails to
#: converge) the factor is decomposed in float64. Measured: 1-2e-7 and 1.4e-6 at 577-1,153 dimensions.
EIGH_FLOAT32_TOL = 1e-4
EIGH_FLOAT32_PROBES = 8


def _eigh_float32(M: Tensor) -> tuple[Tensor, Tensor] | None:
    """``eigh`` of a float32 symmetric ``M`` in float32, or ``None`` when it fails to converge or its residual or
    orthogonality error on seeded probes exceeds :data:`EIGH_FLOAT32_TOL` (the factor is already rounded to float32,
    so a backward-stable float32 decomposition is as accurate as its input)."""
    try:
        lam, Q = torch.linalg.eigh(M)
    except torch.linalg.LinAlgError:
        return None
    gen = torch.Generator(device=M.device).manual_seed(0)  # not the global stream
    Z = torch.randn(M.shape[0], EIGH_FLOAT32_PROBES, generator=gen, dtype=M.dtype, device=M.device)
    QZ = Q @ Z
    norm_z, top = float(Z.norm()), float(lam.abs().max())
    residual = float((M @ QZ - Q @ (lam[:, None] * Z)).norm())
    orthogonality = float((Q.T @ QZ - Z).norm())
    if not (residual <= EIGH_FLOAT32_TOL * top * norm_z and orthogonality <= EIGH_FLOAT32_TOL * norm_z):
        return None  # also NaN
    return lam, Q


def _psd_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric positive semi-definite factor, robust to LAPACK's convergence failures.

    ``eigh`` runs in float64 (float32 ``syevd`` fails to converge on ill-conditioned factors with many repeated
    eigenvalues: measured on Fashion-MNIST LeNet-5 factors); if it still fails, the singular value decomposition
    gives the same decomposition for a PSD matrix (eigenvalues = singular values, eigenvectors = left singular
    vectors) by a different, more robust algorithm. A float32 ``M`` at least :data:`EIGH_FLOAT32_FROM_DIM` wide is
    first decomposed in float32 (:func:`_eigh_float32`), and in float64 where that fails its checks. A factor with
    NaN or infinite entries is refused.

    Returns:
        Eigenvalues (ascending) and eigenvectors, in ``M``'s dtype.
    """
    if not bool(torch.isfinite(M).all()):
        raise SolverDivergedError(
            "a Kronecker factor has NaN or infinite entries (the model's activations or output gradients overflowed "
            "at the stored samples); nothing was changed. Check the samples with unlearner.samples() and the data"
        )
    if M.dtype == torch.float32 and M.shape[0] >= EIGH_FLOAT32_FROM_DIM:
        done = _eigh_float32(M)
        if done is not None:
            return done
    M64 = M.double()
    try:
        lam, Q = torch.linalg.eigh(M64)
    except torch.linalg.LinAlgError:
        U, S, _ = torch.linalg.svd(M64)
        lam, Q = S.flip(0), U.flip(1)
    return lam.to(M.dtype), Q.to(M.dtype)


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
    A_mom: _Moment | None = None
    G_mom: _Moment | None = None
    loc: float = 0.0  # locations seen (rows × locations per row)
    loc_A: float = 0.0  # locations whose inputs entered A (fewer when subsampled)
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


def _whole(value: Any) -> bool:
    """Whether ``value`` is a whole number (an int, or a float without a fraction), not a bool or a string."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


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
    users: dict[int, list[str]] = {}
    for full, p in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(p), []).append(full)

    def used_as(p: Tensor) -> str:
        """Every name a shared tensor is used under, with the module holding it."""
        named = []
        for full in users[id(p)]:
            owner = full.rpartition(".")[0]
            named.append(f"'{full}' ({type(model.get_submodule(owner)).__name__} '{owner}')")
        return ", ".join(named[:-1]) + " and " + named[-1]

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
            # tied weights: the tied tensor's reason names every module using it (the last module's name alone was
            # given, and an untied bias was called tied too); the layer's other parameter is left out with it
            both = [(attr, n, p) for attr, n, p in (("weight", wname, w), ("bias", bname, b)) if n is not None]
            tied = [(attr, n) for attr, n, p in both if uses[id(p)] > 1]
            for attr, n, p in both:
                if (attr, n) in tied:
                    reasons[n] = (
                        f"tied weights: one tensor used as {used_as(p)}; a Kronecker block cannot hold a tensor "
                        "several layers use"
                    )
                else:
                    other = ", ".join(f"{a} (tied, see '{t}')" for a, t in tied)
                    reasons[n] = f"{type(m).__name__} '{mname}': not tied itself, left out with the layer's {other}"
            continue
        elif kind != "linear" and m.groups != 1:
            why = f"grouped convolution (groups={m.groups})"
        elif w.numel() == 0:
            why = "a layer without weights (a zero-size dimension)"
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
    if block.kind == "linear" or x.dim() <= (2 if block.kind == "conv1d" else 3):  # linear, or unbatched
        yield x
        return
    per_row = x[0].numel() * math.prod(block.module.kernel_size) * x.element_size()
    yield from x.split(max(1, _CHUNK_BYTES // max(per_row, 1)))


def _chunk_subset(x: Tensor, seen: int, cap: int, span: tuple[int, int, int, _Draws], gen: torch.Generator) -> Tensor:
    """The rows of a chunk's layer input ``x`` (``seen`` locations) that the one-pass build's subset of the whole
    minibatch keeps: the permutation is drawn once for the whole minibatch, as in one pass. A leading dimension equal
    to the chunk's rows is the minibatch's rows; any other (a sequence-first layout) is the same in every chunk."""
    r0, r1, B, draws = span
    by_row = x.shape[0] == r1 - r0
    whole = B if by_row else x.shape[0]
    seen = seen // (r1 - r0) * B  # the whole minibatch's locations (the rows do not interact)
    if not (seen > cap and whole > 1):
        return x
    keep = math.ceil(cap * whole / seen)
    pick = draws.get(lambda: torch.randperm(whole, generator=gen, device=gen.device))[:keep]
    if by_row:
        pick = pick[(pick >= r0) & (pick < r1)] - r0
    return x[pick.to(x.device)]


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


def _factor_form(Q: Tensor | None, dim: int) -> str:
    if Q is None:
        return "diagonal (dim > max_factor_dim)"
    if Q.shape[1] < dim:
        return f"eigenbasis of rank {Q.shape[1]} (fewer rows than dimensions; the rest is prior only)"
    return "full eigenbasis"


#: Autograd nodes that only view, transpose, broadcast or cast their one input (``TBackward0``, ``ToCopyBackward0``,
#: ...): a parameter read through one is used where the node's own consumers read it (autocast casts a leaf weight
#: once and hands the cached cast to every later call, so k calls of a layer share one ``ToCopyBackward0``).
_PASS_THROUGH = frozenset(
    ("T", "Transpose", "Permute", "View", "UnsafeView", "ReshapeAlias", "Expand", "ToCopy", "Alias", "Squeeze",
     "Unsqueeze", "AsStrided", "Clone", "Conj")
)  # fmt: skip


def _pass_through(node: Any) -> bool:
    return type(node).__name__.rstrip("0123456789").removesuffix("Backward") in _PASS_THROUGH


def _graph_uses(root: Tensor, params: Mapping[str, Tensor]) -> dict[str, int]:
    """How many times the autograd graph of ``root`` reads each of ``params`` (its leaf tensor's ``AccumulateGrad``
    node): every consumer of the leaf is one use, a consumer that only views or casts it (:data:`_PASS_THROUGH`)
    stands for the uses of its own consumers. Structural: the count depends on which operations ran, not on any
    value, dtype or rounding. A parameter the graph does not reach (or one that needs no gradient) has 0 uses.
    """
    fn = root.grad_fn if isinstance(root, Tensor) else None
    if fn is None:
        return dict.fromkeys(params, 0)
    consumers: dict[Any, list[Any]] = {fn: []}  # node -> the nodes that read its output (one entry per edge)
    leaves: dict[int, Any] = {}
    stack = [fn]
    while stack:
        node = stack.pop()
        if type(node).__name__ == "AccumulateGrad":
            leaves.setdefault(id(node.variable), node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            if nxt not in consumers:
                consumers[nxt] = []
                stack.append(nxt)
            consumers[nxt].append(node)

    def count(node: Any, seen: set) -> int:
        total = 0
        for c in consumers.get(node, ()):
            if _pass_through(c) and c not in seen:
                seen.add(c)
                total += count(c, seen)
            elif not _pass_through(c):
                total += 1
        return total

    return {name: (count(leaves[id(p)], set()) if id(p) in leaves else 0) for name, p in params.items()}


def _read_outside(
    root: Tensor,
    blocks: Sequence[_Block],
    named: Mapping[str, Tensor],
    ncalls: Mapping[str, int],
    reduce: Callable[[Tensor], Tensor] | None,
) -> dict[str, str]:
    """The factored layers whose weight or bias the forward that made ``root`` reads more often than the layer's
    forward hook saw it called (``ncalls``): a read outside the module (a tied decoder's
    ``F.linear(h, enc.weight.t())``) that the hooks cannot see, so the layer's Kronecker block would be built from
    part of its uses. Returns each such layer's reason (for its parameters' entry in ``info["diagonal"]``).

    Structural (:func:`_graph_uses`): counts of graph nodes, not a comparison of numbers, so neither the dtype
    (bf16, TF32) nor autocast changes it. With ``reduce`` (distributed ranks) the flags are summed over the ranks
    (one all-reduce, every rank the same blocks): a forward whose reads depend on the data could differ.
    """
    if not blocks:
        return {}
    pnames = [p for b in blocks for p in (b.weight, b.bias) if p is not None]
    uses = _graph_uses(root, {p: named[p] for p in pnames})
    found: dict[str, tuple[int, int]] = {}
    for b in blocks:
        most = max(uses[p] for p in (b.weight, b.bias) if p is not None)
        if most > ncalls.get(b.name, 0):
            found[b.name] = (most, ncalls.get(b.name, 0))
    if reduce is not None:
        flags = torch.tensor([float(b.name in found) for b in blocks], dtype=torch.float64, device=root.device)
        flags = reduce(flags)
        for b, f in zip(blocks, flags.tolist()):
            if f > 0 and b.name not in found:
                found[b.name] = (-1, ncalls.get(b.name, 0))
    out = {}
    for b in blocks:
        if b.name not in found:
            continue
        most, calls = found[b.name]
        seen = (
            f"the forward's autograd graph reads its parameters {most} times, its module was called {calls}"
            if most >= 0
            else "another rank's forward reads its parameters more often than its module was called"
        )
        out[b.name] = (
            f"{type(b.module).__name__} '{b.name}': read outside its module ({seen}, e.g. a tied decoder's "
            "F.linear(h, enc.weight.t())); a Kronecker block built from the module's calls alone would miss those "
            "reads. solver='cg' (Hessian products through autograd) sees every read"
        )
    return out


def read_outside_layers(model: nn.Module, nll: NLL, batch: Batch, unbatched: list[str] | None = None) -> list[str]:
    """The layers K-FAC would factor whose weight or bias ``nll(model, batch)``'s forward (on the first
    ``_PROBE_ROWS`` rows, fewer rows repeated to that many) reads more often than the module is called (see
    :func:`_read_outside`): what ``solver="auto"`` looks for before it builds K-FAC. One forward, no backward; the
    model is left as it was. The layers called on an input without the batch's rows (a shared code:
    :func:`_unbatched_candidates`, :func:`_fixed_inputs`; the build leaves them to the diagonal) are appended to
    ``unbatched`` where it is given, and left out of the result."""
    _, offsets, by_id = _slices(model)
    blocks, _ = _candidates(model, offsets, by_id, max_factor_dim=1)
    by_module = {b.module: b for b in blocks}
    ncalls: Counter[str] = Counter()
    covered: Counter[str] = Counter()  # each layer's rows covered by its calls (:func:`_rows_covered`)
    on_rows: set[str] = set()  # layers with a call that covers the rows (besides any unbatched one)
    probe = _head(tuple(batch), _PROBE_ROWS)
    k = field_rows(probe)
    if 0 < k < _PROBE_ROWS:
        # a request of fewer rows, repeated to _PROBE_ROWS: a hypernetwork's [1, 4] code covers one row, which
        # is every row of a one-row probe (solver='auto' kept K-FAC where the first request removed one row)
        at = torch.arange(_PROBE_ROWS, device=probe[0].device) % k
        probe = tuple(t[at] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == k else t for t in probe)

    first: dict[str, Tensor] = {}
    log: dict[str, list[Tensor]] = {}  # each layer's call inputs, in order
    reversing = [False]

    def hook(module: nn.Module, args: tuple, out: Any) -> None:
        blk = by_module[module]
        if reversing[0] or not isinstance(out, Tensor) or not args or not isinstance(args[0], Tensor):
            return  # (the build does not factor such a call either)
        covered[blk.name] += _rows_covered(blk.kind, args[0])
        if args[0].numel() == 0:
            pass  # no location (a routed subset no row reaches): neither the rows nor a code (_unbatched_candidates)
        elif not _off_rows_call(blk.kind, args[0], field_rows(probe)):
            on_rows.add(blk.name)
        elif blk.name not in first:
            first[blk.name] = _logged(args[0], copy=True)  # its first unbatched call's input (for _fixed_inputs)
        if all(
            by_id.get(id(module._parameters.get(slot))) == pname
            for slot, pname in (("weight", blk.weight), ("bias", blk.bias))
            if pname is not None
        ):  # (a call with other tensors, torch.func.functional_call inside forward, is not the block's)
            ncalls[blk.name] += 1
            log.setdefault(blk.name, []).append(_logged(args[0]))  # (for _shared_codes)

    handle = _first_forward_hook(by_module, hook)
    try:
        with preserved(model), torch.enable_grad():
            values = nll(model, probe)
            if not isinstance(values, Tensor):
                return []
            named = dict(model.named_parameters())
            old = _unbatched_candidates(covered, field_rows(probe), first, on_rows)
            reversing[0] = True
            flat = sorted(_shared_codes(lambda b: nll(model, b), probe, by_module, by_id, log, old, first))
            fired = [b for b in blocks if ncalls[b.name] and b.name not in flat]
            if unbatched is not None:
                unbatched.extend(flat)
            return sorted(_read_outside(values.sum(), fired, named, ncalls, None))
    finally:
        handle.remove()
        for b in blocks:
            b.module = None


def _rows_covered(kind: str, x: Tensor) -> int:
    """The rows of the batch one call of a factored layer on input ``x`` can cover: one where ``x`` has fewer
    dimensions than a batched call of its kind (a ``Linear`` on a ``[6]`` row, a ``Conv2d`` on a ``[C, H, W]``
    image), else its leading rows (a ``Linear``'s locations, ``[T, B, d]`` counting every one)."""
    need = 2 if kind == "linear" else 3 if kind == "conv1d" else 4
    if x.dim() < need:
        return 1
    return x.numel() // max(int(x.shape[-1]), 1) if kind == "linear" else int(x.shape[0])


def _fixed_inputs(
    forward: Callable[[Batch], Any], batch: Batch, by_module: dict, names: set[str], first: dict[str, Tensor]
) -> set[str]:
    """The layers among ``names`` whose first input off the rows (:func:`_off_rows_call`) in ``forward`` over
    ``batch``'s rows reversed is the one they had on ``batch`` (``first``): a code every row shares (a
    hypernetwork's, also where the layer is applied to the rows in the same forward), not a subset of the rows
    (experts a model routes rows to, ``self.a(x[m])``, which also cover fewer rows than the batch). One forward
    without gradients; every name where it fails (the old verdict: all shared)."""
    k = field_rows(batch)
    at = torch.arange(k - 1, -1, -1, device=batch[0].device)  # (a roll keeps a subset's order)
    flipped = tuple(t[at] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == k else t for t in batch)
    seen: dict[str, Tensor] = {}

    def record(module: nn.Module, args: tuple, out: Any) -> None:
        blk = by_module[module]
        if blk.name in names and blk.name not in seen and args and isinstance(args[0], Tensor):
            if args[0].numel() and _off_rows_call(blk.kind, args[0], k):  # (not a call on the rows, nor an empty one)
                seen[blk.name] = args[0].detach().clone()

    handle = _first_forward_hook({m: b for m, b in by_module.items() if b.name in names}, record)
    try:
        with torch.no_grad():
            forward(flipped)
    except Exception:  # (the rows' own forward ran: the layers stay as counted)
        return set(names)
    finally:
        handle.remove()
    return {n for n in names if n in seen and seen[n].shape == first[n].shape and torch.equal(seen[n], first[n])}


def _rows_at(batch: Batch, at: Tensor) -> Batch:
    """Every field that has the batch's leading dimension, indexed by ``at`` on it (other fields unchanged)."""
    k = field_rows(batch)
    return tuple(t[at.to(t.device)] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == k else t for t in batch)


def _call_inputs(
    forward: Callable[[Batch], Any], batch: Batch, by_module: dict, by_id: dict, keep: Mapping[str, set[int]]
) -> dict[str, list[tuple[tuple[int, ...], Tensor | None]]]:
    """Each factored layer's calls in one forward over ``batch`` without gradients, in order: the input's shape, and
    a copy of the input for the calls ``keep`` names (layer: call indices; the others ``None``). A call counts as
    the build's hook counts it (a tensor output and input, the layer's own parameters)."""
    got: dict[str, list[tuple[tuple[int, ...], Tensor | None]]] = {}

    def record(module: nn.Module, args: tuple, out: Any) -> None:
        blk = by_module[module]
        if not isinstance(out, Tensor) or not args or not isinstance(args[0], Tensor):
            return
        if any(
            pname is not None and by_id.get(id(module._parameters.get(slot))) != pname
            for slot, pname in (("weight", blk.weight), ("bias", blk.bias))
        ):
            return  # (a swapped call: torch.func.functional_call inside forward; the build does not count it)
        calls = got.setdefault(blk.name, [])
        i = len(calls)
        calls.append((tuple(args[0].shape), args[0].detach().clone() if i in keep.get(blk.name, ()) else None))

    handle = _first_forward_hook(by_module, record)
    cuda = sorted({t.device.index or 0 for t in batch if isinstance(t, Tensor) and t.device.type == "cuda"})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):  # (a dropout's draws stay the build's)
            forward(batch)
    finally:
        handle.remove()
    return got


def _shared_codes(
    forward: Callable[[Batch], Any],
    batch: Batch,
    by_module: dict,
    by_id: dict,
    log: Mapping[str, Sequence[Tensor]],
    old: set[str],
    first: Mapping[str, Tensor],
    notes: list[str] | None = None,
) -> dict[str, tuple[int, ...]]:
    """The layers ``forward`` over ``batch`` called on a code without the batch's rows, with that input's shape.

    ``log`` holds each layer's call inputs in that forward, in order. One more forward without gradients on the
    rows twice over pairs the calls: a call whose input keeps its shape (a learned code, prototypes, a hidden state
    not per row, whatever their count; a per-row input, a ``[T, B, d]`` sequence or a routed subset of the rows,
    down to a single row, doubles) is a candidate, and a candidate whose input is the same once more with the rows
    reversed is a shared location (:func:`_fixed_inputs`' test: a fixed slice ``x[:4]`` moves). A shared input that
    is a constant exactly zero (an RNN's ``h0 = torch.zeros(1, H)``) contributes to the weight's curvature nothing
    and to the bias's one location: it does not count, and its layer stays factored (:func:`_counts_as_shared`).
    Layers whose calls do not pair (a loop over the rows calls them once per row) and every layer where the doubled
    forward fails (a model written for a fixed batch size) keep the count-based verdict on ``old``
    (:func:`_unbatched_candidates`, :func:`_fixed_inputs`) for their calls off the rows; where the doubled forward
    fails, the calls read as on the rows (a ``[B, k]`` input, which a model's own ``[B, k]`` code is too) are
    candidates for the rows reversed as well: one that stays as it was is a shared location, one that forward does not
    call as often (it fails too, or a fast path without gradients skips the layer) keeps that verdict. Where the rows
    reversed are the rows (more than one row, all alike in reverse order) the test cannot tell, and such a layer goes
    to the diagonal (the safe reading: a code read as rows was 0.9 off its dense block). What happened is appended to
    ``notes``."""
    k = field_rows(batch)
    at = torch.arange(k, device=batch[0].device)
    kinds = {b.name: b.kind for b in by_module.values()}

    def by_count(names: set[str]) -> dict[str, tuple[int, ...]]:
        shared = _fixed_inputs(forward, batch, by_module, names, first) if names else set()
        return {n: tuple(first[n].shape) for n in sorted(shared) if _counts_as_shared(first[n])}

    failed: str | None = None
    try:
        doubled = _call_inputs(forward, _rows_at(batch, torch.cat([at, at])), by_module, by_id, {})
    except Exception as err:  # (a model written for a fixed batch size)
        doubled, failed = {}, f"{type(err).__name__}: {str(err)[:200]}"
    fixed: dict[str, list[int]] = {}
    unpaired: set[str] = set()
    for name, inputs in log.items():
        again = doubled.get(name, [])
        if failed is not None:
            unpaired.add(name)
            # a call read as on the rows: the rows or a code of as many locations (one row: one location either way)
            rowlike = [i for i, x in enumerate(inputs) if k > 1 and x.numel() and not _off_rows_call(kinds[name], x, k)]
            if rowlike:
                fixed[name] = rowlike
            continue
        if len(again) != len(inputs):  # (a per-row loop; a fast path without gradients that skips the layer)
            unpaired.add(name)
            continue
        same = [i for i, (x, (shape, _)) in enumerate(zip(inputs, again)) if x.numel() and tuple(x.shape) == shape]
        if same:
            fixed[name] = same
    out = by_count(old & unpaired)
    ambiguous = {n for n in fixed if n in unpaired}  # (the forward on the rows twice over failed)
    if ambiguous and all(
        torch.equal(t, u) for t, u in zip(batch, _rows_at(batch, at.flip(0))) if isinstance(t, Tensor)
    ):  # the rows reversed are the rows: a code cannot be told from them
        for name in sorted(ambiguous):
            x = log[name][fixed.pop(name)[0]]
            out.setdefault(name, tuple(x.shape))
        if notes is not None:
            notes.append(
                f"the layers {sorted(ambiguous)} were called on an input of as many locations as the batch has rows, "
                f"and the forward on the rows twice over failed ({failed}); the rows reversed are the same rows, "
                "so a code of the model's own (e.g. a learned [B, k] input of a model written for a fixed batch "
                "size) cannot be told from the rows: left to the diagonal"
            )
        ambiguous = set()
    if fixed:
        try:
            keep = {n: set(i) for n, i in fixed.items()}
            flipped = _call_inputs(forward, _rows_at(batch, at.flip(0)), by_module, by_id, keep)
        except Exception:  # (the rows' own forward ran: each candidate stays as counted, shared)
            flipped = {}
        untold: list[str] = []
        for name, same in fixed.items():
            again = flipped.get(name, [])
            if name in ambiguous and len(again) != len(log[name]):
                # (the rows reversed failed too, or a fast path without gradients skipped the layer: nothing tells
                # its calls on the rows from a code, and nothing marked them as one: the count-based verdict stands)
                untold.append(name)
                continue
            for i in same:
                x = log[name][i]
                y = again[i][1] if len(again) == len(log[name]) else x
                if y is not None and y.shape == x.shape and torch.equal(y, x.detach()) and _counts_as_shared(x):
                    out[name] = tuple(x.shape)
                    break
        told = sorted(n for n in ambiguous if n in out)
        if told and notes is not None:
            notes.append(
                f"the layers {told} were called on an input of as many locations as the batch has rows, where the "
                f"forward on the rows twice over failed ({failed}), and the rows reversed left that input as it was "
                "(a code of the model's own, e.g. a learned [B, k] input): shared locations, left to the diagonal"
            )
        if untold and notes is not None:
            notes.append(
                f"the layers {sorted(untold)} were called on an input of as many locations as the batch has rows, "
                f"where the forward on the rows twice over failed ({failed}), and the forward on the rows reversed "
                "did not call them as often (it failed, or a fast path without gradients skipped them): not told "
                "from a code of the model's own, they keep the count of the rows their calls cover"
            )
    return out


def _logged(x: Tensor, copy: bool = False) -> Tensor:
    """A layer call's input as :func:`_shared_codes` reads it: detached (no graph kept; ``copy``: a copy, which later
    in-place writes leave alone), with whether it required grad (computed from parameters) kept as its flag (the
    count-based verdict's first inputs too: a learned state zero at the first draw had kept its layer factored where
    the doubled forward fails)."""
    y = x.detach().clone() if copy else x.detach()
    return y.requires_grad_(x.requires_grad) if x.is_floating_point() or x.is_complex() else y


def _counts_as_shared(x: Tensor) -> bool:
    """Whether a shared input ``x`` found by :func:`_shared_codes` sends its layer to the diagonal: all but a constant
    zero (an input that does not require grad and is exactly zero). A learned state (computed from parameters) counts
    even where it is zero at the draw the build reads it on: its other draws need not be (a bank whose first sample
    is the initial ``nn.Parameter(torch.zeros(1, H))`` had kept the layer factored, with the later draws' nonzero
    state mixed into its per-row factors)."""
    return bool(x.requires_grad) or bool(x.any())


def _unbatched_candidates(
    covered: Mapping[str, int], rows: int, first: Mapping[str, Tensor], on_rows: set[str]
) -> set[str]:
    """The layers a forward over ``rows`` rows may have called on a code without the batch's rows, to be told from
    subsets of the rows by :func:`_fixed_inputs`: those whose calls, summed, cover fewer locations than the rows
    (``covered``: a hypernetwork's code, or routed experts), and those with both a call on the rows (``on_rows``)
    and a call off them (``first``, :func:`_off_rows_call`; a code of exactly as many locations as the rows reads
    as rows): a ``Linear`` applied to ``x`` and to a learned code in the same forward,
    whose calls cover the rows and more, yet whose per-row factors would mix the code's location, its output
    gradient summed over every row, with the rows' (stop 58's probe: xᵀKx of such a layer 2.8 relative off the
    dense GGN, 1.6e-7 without the code's call). A model looping over its rows (every call unbatched, one per row)
    is neither, nor a call on an empty input (``self.f(x[m])`` where no row is selected: no location, no code; its
    ``[0, d]`` input stays empty with the rows reversed, and such a layer went to the diagonal as 'one location
    shared by every row'), which ``first`` and ``on_rows`` leave out."""
    return {name for name, c in covered.items() if c < rows and name in first} | (set(first) & on_rows)


def _unbatched_call(kind: str, x: Tensor, rows: int) -> bool:
    """Whether one call of a factored layer on input ``x`` covers fewer locations than a forward over ``rows`` rows
    has rows (:func:`_rows_covered`: a ``Linear`` on a ``[4]`` or ``[1, 4]`` code where the batch has 8 rows). A
    layer is taken as called on an input without the batch's rows when its calls in one forward, summed, cover
    fewer: a model that loops over its rows (``torch.stack([net(x_i) for x_i in x])``) calls it once per row and
    covers them all; a hypernetwork calls it once on a code shared by every row."""
    return _rows_covered(kind, x) < rows


def _off_rows_call(kind: str, x: Tensor, rows: int) -> bool:
    """Whether one call of a factored layer on input ``x`` does not hold a forward's ``rows`` rows on its row axis:
    an unbatched call (:func:`_unbatched_call`), or an input whose leading dimension (or, for a ``Linear`` on a
    ``[T, B, d]`` sequence, its second) is not the rows, e.g. ``k`` learned codes ``[k, d]`` with ``k`` at least the
    rows (a ``Linear`` on ``x`` and on 16 prototypes, 8 rows: its calls covered the rows and more, and K-FAC's
    xᵀKx was 0.53 relative off the dense GGN, unflagged), also a subset of the rows or their flattened locations,
    which :func:`_fixed_inputs` tells from a code (they move with the rows). ``[B, ...]`` calls are on the rows."""
    if _unbatched_call(kind, x, rows):
        return True
    if int(x.shape[0]) == rows:
        return False
    return not (kind == "linear" and x.dim() >= 3 and int(x.shape[1]) == rows)


def _owner_reason(model: nn.Module, name: str) -> str:
    owner_name = name.rsplit(".", 1)[0] if "." in name else ""
    owner = model.get_submodule(owner_name) if owner_name else model
    if _kind(owner) is not None and owner._parameters.get("weight") is None:
        return (  # torch.nn.utils.weight_norm / spectral_norm: weight_g, weight_v, weight_orig
            f"{type(owner).__name__} '{owner_name}': its weight is computed from other parameters by a hook (e.g. "
            "torch.nn.utils.weight_norm or spectral_norm)"
        )
    if _kind(owner) is not None:
        return (
            f"{type(owner).__name__} '{owner_name}': its forward hook did not fire (the weight is used directly, "
            "e.g. through F.linear inside MultiheadAttention)"
        )
    return f"{type(owner).__name__} parameter: no Kronecker factorisation for this layer type"


# ----------------------------------------------------------------------------------------------- main class
def _doubled_peak(model: nn.Module, forward: Callable[[Batch], Any], head: Batch, inputs: int) -> int:
    """The most bytes a forward without gradients over ``head``'s rows twice over holds at once (:class:`_LivePeak`),
    as :func:`_shared_codes` runs it (the copied rows included); where that forward fails (a model written for a
    fixed batch size), the rows' own forward and a copy of the factored layers' call inputs (``inputs`` bytes),
    which the rows reversed keep there."""
    k = field_rows(head)
    at = torch.arange(k, device=head[0].device)
    cuda = sorted({t.device.index or 0 for t in head if isinstance(t, Tensor) and t.device.type == "cuda"})
    with preserved(model), torch.no_grad(), torch.random.fork_rng(devices=cuda):
        try:
            with _live_peak() as live:
                forward(_rows_at(head, torch.cat([at, at])))
            return live.peak
        except Exception:
            pass
        live = _live_peak()
        try:
            with live:
                forward(_rows_at(head, at.flip(0)))
        except Exception:  # (the rows' own forward ran with gradients: what it held until it failed here)
            pass
        return live.peak + inputs


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
        self._cache: list[tuple[weakref.ref, int, list[Tensor]]] = []

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
        max_factor_dim: int = MAX_FACTOR_DIM,
        max_locations: int | str | None = "auto",
        sigma: float | None = None,
        exact_expectation: bool | None = None,
        sampling: str = "gaussian",
        row_chunk: int | None = None,
        probe: Batch | None = None,
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
            likelihood: ``"auto"`` (detect from ``nll``, :func:`detect_likelihood`, what it found beyond the
                plain forms in ``info["likelihood_detected"]``, and where it falls back to the empirical Fisher the
                reason and what to do in ``info["likelihood_fallback"]``; without ``nll``: categorical for integer
                labels and ``[B, C]`` outputs), ``"categorical"``, ``"gaussian"``, ``"bernoulli"`` (logits of
                ``binary_cross_entropy_with_logits``) or ``"empirical"``.
            mc_samples: Sampled labels (one backward pass each) per draw.
            generator: Generator for the labels and random signs (default: a fresh one seeded 0); the global RNG
                is never used.
            reduce: Applied to every accumulated sum (factor sums, location/row counts, squared gradients) before
                finalising, e.g. an all-reduce over ``torch.distributed`` ranks; first (``likelihood="auto"``) to
                one flag per :class:`Likelihood`, the one this rank's rows identify (ranks that differ all take the
                empirical Fisher), or (``likelihood="categorical"``) to three flags, refused / a mean over positions /
                read per position (:func:`explicit_positions`: a rank refusing makes every rank refuse), then, at
                the first forward, to two flags per candidate layer (called on a shared code, called at all), then
                to one per factored layer read outside its module (so that every rank factors the same layers).
            max_factor_dim: Factors larger than this keep only their diagonal.
            max_locations: Estimate each layer's input factor ``A`` (per draw) from a uniformly drawn subset of
                rows with about this many locations; ``"auto"``: ``max(1024, 2·dim A)`` per layer and draw;
                ``None``: every location. ``A`` is a plain mean over locations, so the subset is unbiased; for a
                convolution (``B·H·W`` locations of dimension ``C·k²``) the full sum costs ``C·k²/C_out`` times its
                forward pass (9× for a 3×3 conv with equal channels). ``G`` always uses every location.
            sigma: Noise standard deviation for ``likelihood="gaussian"`` when it cannot be read off ``nll``.
            exact_expectation: Take the label expectation exactly (one backward per output dimension) instead of
                sampling; default: exactly when the model has at most ``mc_samples`` outputs per row.
            sampling: ``"gaussian"`` (output-Hessian square root times Gaussian noise) or ``"labels"`` (sampled
                labels, as in K-FAC practice; much noisier for confident classifiers): see the module docstring.
            row_chunk: Run each minibatch through the model this many rows at a time (``None``: all at once), so
                that its activations fit a memory budget. Every random draw (location subsets, noise, signs) is
                made for the whole minibatch first, as in one pass, and the diagonal's minibatch gradients are
                squared after the chunks are summed: the factors equal the one-pass ones to rounding (the rows must
                not interact: BatchNorm in training mode does; ``sampling="gaussian"`` only).
            probe: Rows to identify the likelihood on where no minibatch has any (a data-parallel rank holding none
                of the curvature rows; its statistics are then zero, and it joins every ``reduce``); default: the
                first minibatch that has rows.

        Raises:
            ValueError: on inconsistent shapes, an unknown likelihood, or a likelihood that cannot be used.
        """
        t_start = time.perf_counter()
        try:
            lik = Likelihood(likelihood)
        except ValueError:
            options = ", ".join(repr(k.value) for k in Likelihood)
            raise ValueError(f"unknown likelihood {shown_value(likelihood)}: use one of {options}") from None
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
            raise ValueError(f"mc_samples must be at least 1, got {shown_value(mc_samples)}")
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        if (
            max_locations is not None
            and max_locations != "auto"
            and not (isinstance(max_locations, int) and max_locations > 0)
        ):
            raise ValueError(f"max_locations must be a positive int, 'auto' or None, got {shown_value(max_locations)}")
        if max_factor_dim < 1:
            raise ValueError(f"max_factor_dim must be positive, got {max_factor_dim}")
        if sampling not in ("gaussian", "labels"):
            raise ValueError(f"sampling must be 'gaussian' or 'labels', got {shown_value(sampling)}")
        if row_chunk is not None and not (isinstance(row_chunk, int) and row_chunk > 0):
            raise ValueError(f"row_chunk must be a positive int or None, got {shown_value(row_chunk)}")
        mc_samples = int(mc_samples)
        info: dict[str, Any] = {"draws": S, "mc_samples": mc_samples, "model_training": bool(model.training)}
        if row_chunk is not None:
            info["row_chunk"] = row_chunk
        if model.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            info["warning"] = (
                "model in training mode: BatchNorm batch statistics couple the rows, so the per-row curvature is "
                "approximate; call model.eval() first"
            )

        # ---- likelihood
        detected: dict[str, Any] = {}
        auto = lik is Likelihood.AUTO
        seen = next((b for b in batches if field_rows(b) > 0), batches[0] if probe is None else tuple(probe))
        k = (
            input_fields(model, seen)
            if lik is not Likelihood.EMPIRICAL and nll is not None and reduce is None
            else None
        )
        given = [] if probe is None else [tuple(probe)]
        if k is not None and len({tuple(tuple(t.shape[1:]) for t in b[:k]) for b in [*batches, *given]}) > 1:
            # one packing for every minibatch: fields padded per minibatch to their own lengths were split as the
            # first minibatch's (each branch reading the other's values) or failed in the forward
            k = None
        if k is not None:
            # forward(a, b) with rows (a, b, y): model(batch[0]) failed, and K-FAC took the empirical Fisher (a Siamese
            # pair moved 0.12 of the way where its one-input rewrite's Bernoulli Fisher moved 0.50; stop 61)
            with packed_inputs(model, nll, [*batches, *given], k) as (packed, packed_nll):
                built = cls.build(
                    model,
                    thetas,
                    packed[: len(batches)],
                    n,
                    nll=packed_nll,
                    log_prior=log_prior,
                    likelihood=likelihood,
                    mc_samples=mc_samples,
                    generator=generator,
                    max_factor_dim=max_factor_dim,
                    max_locations=max_locations,
                    sigma=sigma,
                    exact_expectation=exact_expectation,
                    sampling=sampling,
                    row_chunk=row_chunk,
                    probe=packed[-1] if given else None,
                )
            built.info["input_fields"] = k
            return built
        # (seen: the likelihood is read off rows; a data-parallel rank holding none of the curvature rows (3 ranks, a
        # request removing every row of one) failed on an empty minibatch while the other ranks waited in a collective)
        if auto:
            if nll is not None:
                lik, detected = detect_likelihood(model, nll, seen)
                if lik is Likelihood.EMPIRICAL:  # a language model's head: labels [B, L], logits [B, L, V]
                    per_position = positions_fit(model, nll, seen)
                    if per_position is not None and _ignored_positions(batches):
                        # a label -100 past the probe's rows (padding): nll skips the position, the per-position
                        # Fisher does not (every position counted, the curvature of the unpadded labels)
                        detected["reason"] = (
                            "nll reads as a cross-entropy at every position of [B, L, V] logits, but some labels "
                            "are negative (ignore_index positions, e.g. padding), which it skips and K-FAC's "
                            "per-position Fisher would count"
                        )
                    elif per_position is not None:
                        lik, detected = Likelihood.CATEGORICAL, per_position
                    else:
                        # a Gaussian whose variance the model learns (F.gaussian_nll_loss on a mean and a variance
                        # head): its Fisher, not the empirical one (stop 69's probe: K-FAC of the empirical Fisher
                        # 0.91 off the dense Hessian in Frobenius norm, the dense Gaussian Fisher 0.07)
                        reading = learned_variance(model, nll, seen)
                        if reading is not None:
                            lik, detected = Likelihood.GAUSSIAN, reading
            else:
                lik = cls._guess_without_nll(model, seen)
            if reduce is not None:
                # every rank the same likelihood: each identifies it on its own rows (a rank without rows on its
                # weight-0 padding row), and confident rows read a scaled cross-entropy as ambiguous (the empirical
                # Fisher) where other rows identify it; the ranks then normalised the summed factors by different
                # label passes (G 2x apart across 2 ranks with mc_samples=2) and computed different removals
                kinds = list(Likelihood)
                votes = reduce(
                    torch.tensor([float(lik is k) for k in kinds], dtype=torch.float64, device=thetas.device)
                )
                found = [k.value for k, v in zip(kinds, votes.tolist()) if v > 0]
                if len(found) > 1:
                    why = f": {detected['reason']}" if detected.get("reason") else ""
                    detected = {
                        "reason": f"the ranks' rows identify different likelihoods ({', '.join(found)}; this rank's "
                        f"rows {lik.value}{why}), so every rank takes the empirical Fisher"
                    }
                    lik = Likelihood.EMPIRICAL
        elif lik in (Likelihood.CATEGORICAL, Likelihood.BERNOULLI):
            # an explicit likelihood the probe rows read as another is refused (an MSE regression's softmax Fisher
            # was taken without a word, stop 70); [B, L, V] logits: the per-position reading likelihood='auto' takes
            # (a mean's 1/L, a weight field), or a refusal (padding, an unread nll); the ranks agree, so none raises
            # while the others wait in a collective (one all-reduce, as before for 'categorical')
            contradicted = contradicted_likelihood(model, nll, seen, lik)
            detected = explicit_positions(model, nll, seen, batches) if lik is Likelihood.CATEGORICAL else {}
            if reduce is not None:
                refused, means, read, other = reduce(
                    torch.tensor(
                        [
                            float("refuse" in detected),
                            float("scale" in detected),
                            float(bool(detected)),
                            float(bool(contradicted)),
                        ],
                        dtype=torch.float64,
                        device=thetas.device,
                    )
                ).tolist()
                if other > 0 and not contradicted:
                    contradicted = (
                        f"likelihood='{lik.value}': another rank's probe rows read nll as another likelihood (its "
                        "error names it): leave likelihood='auto' (the default) or pass likelihood='empirical'; "
                        "nothing was changed"
                    )
                if refused > 0 and "refuse" not in detected:
                    detected = {
                        "refuse": "likelihood='categorical': another rank's rows cannot be read as a per-position "
                        "cross-entropy (its error says why); nothing was changed"
                    }
                elif 0 < means < read:
                    detected = {
                        "refuse": "likelihood='categorical': the ranks' rows read nll as a sum over the positions on "
                        "some ranks and as a mean on others; nothing was changed"
                    }
            if contradicted:
                raise ValueError(contradicted)
            if "refuse" in detected:
                raise ValueError(detected["refuse"])
        learned = lik is Likelihood.GAUSSIAN and detected.get("variance") == "learned"
        if lik is Likelihood.GAUSSIAN and sigma is None and not learned:
            if nll is not None and not detected:
                kind, detected = detect_likelihood(model, nll, seen)
                if kind is not Likelihood.GAUSSIAN:
                    raise ValueError(gaussian_refusal(learned_variance(model, nll, seen) is not None))
            sigma = detected.get("sigma")
            if sigma is None:
                raise ValueError("likelihood='gaussian' needs the noise scale: pass sigma=... or a Gaussian nll")
        if lik is Likelihood.EMPIRICAL and nll is None:
            raise ValueError("likelihood='empirical' needs nll(model, batch) -> [B]")
        if lik is Likelihood.GAUSSIAN and not learned and not (sigma > 0):
            raise ValueError(f"sigma must be positive, got {sigma}")
        info["likelihood"] = lik.value
        info["sigma"] = float(sigma) if lik is Likelihood.GAUSSIAN and not learned else None
        if detected.get("reason"):
            info["likelihood_reason"] = detected["reason"]
        if auto and lik is Likelihood.EMPIRICAL:
            info["likelihood_fallback"] = empirical_fallback_message(
                detected.get("reason", ""), plain_output(model, seen), int(thetas.shape[1])
            )
        link = {k: detected[k] for k in _LINK_KEYS if k in detected} if lik is not Likelihood.EMPIRICAL else {}
        notes = {k: v for k, v in detected.items() if k not in ("reason", "sigma", "constant")}
        if notes:
            info["likelihood_detected"] = notes

        # ---- prior
        clock = dict.fromkeys(("likelihood", "prior", "forward", "backward", "input_factors", "output_factors"), 0.0)
        clock["likelihood"] = time.perf_counter() - t_start
        P, prior_notes = _measure_prior(model, log_prior, thetas.mean(0))
        _warn_clamped(prior_notes)
        info["prior"] = prior_notes
        clock["prior"] = time.perf_counter() - t_start - clock["likelihood"]

        # ---- statistics
        blocks, reasons = _candidates(model, offsets, by_id, max_factor_dim)
        gen = generator if generator is not None else torch.Generator(device=thetas.device).manual_seed(0)
        dtype, device = thetas.dtype, thetas.device
        by_module = {b.module: b for b in blocks}
        calls: list[tuple[_Block, Tensor]] = []
        fired: set[str] = set()
        elsewhere: set[str] = set()  # layers called at the first forward on another rank only (kept, as there)
        ncalls: Counter[str] = Counter()  # each layer's calls the hook saw (one per location set it factors)
        swapped: set[str] = set()
        # layers called on an input without the batch's rows: its shape (None: seen on another rank only)
        unbatched: dict[str, tuple[int, ...] | None] = {}
        rows_seen: Counter[str] = Counter()  # each layer's rows covered by its calls in one forward (_rows_covered)
        on_rows: set[str] = set()  # layers with a call that covers the rows in one forward (_unbatched_candidates)
        first_input: dict[str, Tensor] = {}  # each layer's first input in one forward
        call_log: dict[str, list[Tensor]] = {}  # each layer's call inputs in the first forward, in order
        same_input: dict[str, list[tuple[Tensor, float, Tensor]]] = {}
        part: dict[str, Any] = {"span": None}  # (r0, r1, B, draws) while a minibatch runs in row chunks

        s_at = [0]  # the draw the forward is at; -1 while the rows run reversed (_fixed_inputs)

        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            blk = by_module[module]
            if s_at[0] < 0 or not isinstance(out, Tensor) or not args or not isinstance(args[0], Tensor):
                return None
            if any(
                pname is not None and by_id.get(id(module._parameters.get(slot))) != pname
                for slot, pname in (("weight", blk.weight), ("bias", blk.bias))
            ):
                # the layer ran with other tensors than its registered parameters (torch.func.functional_call inside
                # the model's forward, e.g. with 2·weight): its inputs and output gradients are not those of the
                # parameters' Kronecker block, so the block is left to the diagonal (autograd differentiates the
                # parameters through whatever the forward made of them)
                swapped.add(blk.name)
                return None
            if s_at[0] == 0 and part.get("r0", 0) == 0:
                call_log.setdefault(blk.name, []).append(_logged(args[0]))  # (every call, for _shared_codes)
            # the same layer called again on the same input in one evaluation (an nll that calls the model twice,
            # k*(y*exp(-m(x)) + m(x))): one use, not two locations — route it through the first call's output so
            # that the output gradients of both calls are summed before they are squared
            # (a layer applied to many different inputs, a recurrent cell, compares sums first: O(1) per earlier call)
            total = float(args[0].detach().sum())
            for prev_in, prev_total, prev_out in same_input.get(blk.name, ()):
                if (
                    prev_in.shape == args[0].shape
                    and prev_out.shape == out.shape
                    and (prev_in is args[0] or (prev_total == total and torch.equal(prev_in, args[0].detach())))
                ):
                    return prev_out.clone()
            same_input.setdefault(blk.name, []).append((args[0].detach(), total, out))
            fired.add(blk.name)
            ncalls[blk.name] += 1
            rows_seen[blk.name] += _rows_covered(blk.kind, args[0])  # (the first forward's calls decide unbatched)
            if s_at[0] == 0 and part.get("r0", 0) == 0 and args[0].numel():  # (an empty input: no location)
                if not _off_rows_call(blk.kind, args[0], part.get("rows", 0)):
                    on_rows.add(blk.name)
                elif blk.name not in first_input:  # its first unbatched call's input, kept for _fixed_inputs
                    first_input[blk.name] = _logged(args[0], copy=True)
            x = args[0].detach()
            seen = out.numel() // blk.out_dim
            batched = x.dim() >= (2 if blk.kind == "linear" else 3 if blk.kind == "conv1d" else 4)
            cap = (
                max(_AUTO_MIN_LOCATIONS, _AUTO_LOCATIONS_PER_DIM * blk.in_dim)
                if max_locations == "auto"
                else max_locations
            )
            if part["span"] is not None:
                if cap is not None and batched:
                    x = _chunk_subset(x, seen, cap, part["span"], gen)
            elif cap is not None and seen > cap and batched and x.shape[0] > 1:
                # A is a mean over locations: a uniform subset of rows (all of their locations) is unbiased for it
                keep = math.ceil(cap * x.shape[0] / seen)
                x = x[torch.randperm(x.shape[0], generator=gen, device=gen.device)[:keep].to(x.device)]
            t0 = time.perf_counter()
            if blk.kind == "linear":
                rows = x.numel() // x.shape[-1]
            else:  # locations of the (possibly subsampled) convolution input: output locations per input row
                rows = seen if not batched else (seen // args[0].shape[0]) * x.shape[0]
            if rows == 0:  # a row chunk none of whose rows is in the location subset
                count = 0
            elif blk.A_mom.can_keep(rows):  # fewer patches than dimensions so far: keep them (a low-rank factor)
                a = _patches(blk, x).to(dtype)
                if blk.bias is not None:
                    a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
                blk.A_mom.add_rows(a)
                count = a.shape[0]
            else:
                stat, count = _input_moment(blk, x, dtype)
                blk.A_mom.add_sum(stat)
            clock["input_factors"] += time.perf_counter() - t0
            blk.loc += seen
            blk.loc_A += count
            if not out.requires_grad:
                return None
            calls.append((blk, out))
            return out.clone()  # in-place ops downstream change the clone, not the tensor we differentiate

        for b in blocks:
            b.A_mom = _Moment(b.in_dim, b.eig_A, keep_rows=reduce is None)
            b.G_mom = _Moment(b.out_dim, b.eig_G, keep_rows=reduce is None)
        handles = [_first_forward_hook(by_module, hook)]
        diag_params: list[nn.Parameter] = []
        diag_names: list[str] = []
        diag_sum: Tensor | None = None
        rows = 0.0
        passes = forwards = 0
        record = {"mode": "empirical"}
        named = dict(model.named_parameters())
        try:
            with preserved(model), torch.enable_grad():
                for s in range(S):
                    ParamSpec.assign(model, thetas[s])
                    batch = batches[s if len(batches) > 1 else 0]
                    rows += field_rows(batch)
                    if lik is Likelihood.CATEGORICAL:
                        # an ignore_index row (label -100) has no likelihood term: it is counted in the rows the
                        # factors are averaged over (a zero there), but its activations and sampled-label gradients
                        # enter no factor (they made the curvature that of every row labelled: 1.5x the GGN with a
                        # third of the rows ignored)
                        batch = labelled(batch, empty=True)
                    B = field_rows(batch)
                    chunked = row_chunk is not None and row_chunk < B
                    parts = [(r0, min(r0 + row_chunk, B)) for r0 in range(0, B, row_chunk)] if chunked else [(0, B)]
                    draws = _Draws()
                    sums: list[Tensor] = []  # chunked: each loss's gradient of the diagonal parameters, summed
                    for r0, r1 in parts:
                        span = (r0, r1, B, draws) if chunked else None
                        part["span"] = span
                        part["rows"] = r1 - r0
                        part["r0"] = r0
                        s_at[0] = s
                        draws.restart()
                        calls.clear()
                        fired.clear()
                        ncalls.clear()
                        rows_seen.clear()
                        on_rows.clear()
                        first_input.clear()
                        call_log.clear()
                        same_input.clear()
                        losses = cls._losses(
                            model,
                            _span(batch, r0, r1) if chunked else batch,
                            lik,
                            nll,
                            mc_samples,
                            exact_expectation,
                            sigma,
                            gen,
                            record,
                            sampling,
                            link,
                            span,
                        )
                        t0 = time.perf_counter()
                        first = next(losses)  # runs the forward pass (hooks fire)
                        clock["forward"] += time.perf_counter() - t0
                        forwards += 1
                        if s == 0 and r0 == 0:
                            for b in blocks:
                                if b.name not in fired:
                                    for pname in (b.weight, b.bias):
                                        if pname is not None:
                                            reasons[pname] = (
                                                f"{type(b.module).__name__} '{b.name}': the forward ran it with other "
                                                "tensors than its parameters (torch.func.functional_call in the model)"
                                                if b.name in swapped
                                                else _owner_reason(model, pname)
                                            )
                            # a layer whose calls in the first forward cover fewer rows than it has: a Linear on
                            # a learned code of shape [4] (a hypernetwork generating a layer; stop 57's probe), one
                            # location shared by every row, whose summed output gradient K-FAC's per-row factors
                            # would take for one row's (undamped ratios -3.4 / -1.4): left to the diagonal, like a
                            # swapped call. A model looping over its rows calls it once per row: all covered
                            # (not experts a model routes rows to: their inputs move with the rows, a code's not)
                            # (also a layer applied to the rows and to such a code in the same forward, whose
                            # calls cover the rows: _unbatched_candidates)
                            # (and a code of as many locations as the rows, a routed expert given one row, a
                            # zero initial state: _shared_codes pairs the calls with those of the rows twice over)
                            # (the buffers as the build's own forward left them: spectral_norm's vectors)
                            s_at[0] = -1
                            notes: list[str] = []
                            with _buffers_kept(model):
                                shared = _shared_codes(
                                    lambda b: nll(model, b) if lik is Likelihood.EMPIRICAL else model(b[0]),
                                    _span(batch, r0, r1) if chunked else batch,
                                    by_module,
                                    by_id,
                                    call_log,
                                    _unbatched_candidates(rows_seen, part["rows"], first_input, on_rows),
                                    first_input,
                                    notes,
                                )
                            if notes:  # (a model written for a fixed batch size: how its layers were told)
                                info["unbatched_note"] = " ".join(notes)
                            s_at[0] = s
                            call_log.clear()
                            unbatched.update(shared)
                            if reduce is not None:
                                # every rank the same blocks: one rank's shard can show a layer on a shared code
                                # (or call a layer) where another's does not (a code applied where a shard holds
                                # some rows; until stop 59 also an expert given one row), and ranks factoring
                                # different layers aborted in the first reduce of mismatched sizes (gloo's
                                # timeout; stop 58's probe)
                                flags = torch.tensor(
                                    [float(b.name in unbatched) for b in blocks]
                                    + [float(b.name in fired) for b in blocks],
                                    dtype=torch.float64,
                                    device=device,
                                )
                                flags = reduce(flags).tolist()
                                for b, on_code, called in zip(blocks, flags[: len(blocks)], flags[len(blocks) :]):
                                    if on_code > 0 and b.name not in unbatched:
                                        unbatched[b.name] = None
                                    if called > 0 and b.name not in fired:
                                        elsewhere.add(b.name)
                                        fired.add(b.name)
                            for b in blocks:
                                if b.name in unbatched:
                                    for pname in (b.weight, b.bias):
                                        if pname is not None:
                                            shape = unbatched[b.name]
                                            reasons[pname] = (
                                                f"{type(b.module).__name__} '{b.name}': called on an input without "
                                                "the batch's rows ("
                                                + (f"shape {list(shape)}" if shape is not None else "on another rank")
                                                + ", e.g. a hypernetwork's learned code), one location shared by "
                                                "every row, which K-FAC's per-row factors cannot hold. solver='cg' "
                                                "(Hessian products through autograd) sees it"
                                            )
                                    by_module.pop(b.module, None)  # its later calls are not factored
                            if unbatched:
                                info["unbatched_input"] = sorted(unbatched)
                            blocks = [b for b in blocks if b.name in fired and b.name not in unbatched]
                            calls[:] = [(b, o) for b, o in calls if b.name not in unbatched]
                            outside = _read_outside(first, blocks, named, ncalls, reduce)
                            for b in blocks:
                                if b.name in outside:
                                    for pname in (b.weight, b.bias):
                                        if pname is not None:
                                            reasons[pname] = outside[b.name]
                                    del by_module[b.module]  # its later calls are not factored
                            if outside:
                                blocks = [b for b in blocks if b.name not in outside]
                                calls[:] = [(b, o) for b, o in calls if b.name not in outside]
                                info["read_outside_module"] = sorted(outside)
                            covered = {p for b in blocks for p in (b.weight, b.bias) if p is not None}
                            diag_names = [name for name in spec.names if name not in covered]
                            for name in diag_names:
                                reasons.setdefault(name, _owner_reason(model, name))
                            diag_params = [named[name] for name in diag_names]
                            diag_sum = torch.zeros(
                                sum(named[k].numel() for k in diag_names), dtype=dtype, device=device
                            )
                        missing = {b.name for b in blocks} - fired - elsewhere
                        if missing:
                            raise RuntimeError(
                                f"layers {sorted(missing)} ran at the first draw but not at draw {s}: the model's "
                                "control flow must not depend on the parameters"
                            )
                        loss: Tensor | None = first
                        index = 0
                        while loss is not None:
                            nxt = next(losses, None)
                            inputs = [o for _, o in calls] + diag_params
                            t0 = time.perf_counter()
                            grads = torch.autograd.grad(loss, inputs, retain_graph=nxt is not None, allow_unused=True)
                            t1 = time.perf_counter()
                            clock["backward"] += t1 - t0
                            passes += 1
                            for (blk, _), g in zip(calls, grads):
                                if g is None:
                                    continue
                                blk.G_mom.add_rows(_out_rows(blk, g.detach()).to(dtype))
                            if chunked and index == len(sums):
                                sums.append(torch.zeros_like(diag_sum))
                            pos = 0
                            for p, g in zip(diag_params, grads[len(calls) :]):
                                k = p.numel()
                                if g is not None and chunked:  # squared once the chunks are summed
                                    sums[index][pos : pos + k] += g.detach().reshape(-1).to(dtype)
                                elif g is not None:
                                    diag_sum[pos : pos + k] += g.detach().reshape(-1).to(dtype).square()
                                pos += k
                            clock["output_factors"] += time.perf_counter() - t1
                            del grads
                            loss = nxt
                            index += 1
                        calls.clear()
                    part["span"] = None
                    for total in sums:
                        diag_sum += total.square()
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
            for mom, dim in ((b.A_mom, b.in_dim), (b.G_mom, b.out_dim)):
                if reduce is not None:
                    mom.fold()
                    if mom.sum is None:  # e.g. no gradient reached the layer's output: zero curvature
                        shape = (dim, dim) if mom.full else (dim,)
                        mom.sum = torch.zeros(shape, dtype=dtype, device=device)
                    mom.sum = red(mom.sum)
            b.loc = float(red(torch.tensor(b.loc, dtype=torch.float64, device=device)))
            b.loc_A = float(red(torch.tensor(b.loc_A, dtype=torch.float64, device=device)))
        diag_sum = red(diag_sum)
        rows = float(red(torch.tensor(rows, dtype=torch.float64, device=device)))
        t_eig = time.perf_counter()
        notes_nonconst = []
        for b in blocks:
            b.lA, b.QA = b.A_mom.eig(1.0 / max(b.loc_A, 1.0), dtype, device)
            b.lG, b.QG = b.G_mom.eig(1.0 / (max(b.loc, 1.0) * passes_per_label), dtype, device)
            b.A_mom = b.G_mom = None
            b.locations = b.loc / max(rows, 1.0)
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
            "mc": f"GGN/Fisher, Monte Carlo: {mc_samples} {sampling} sample(s) per row and draw",
            "exact": "GGN/Fisher with the exact expectation over labels (one backward per output dimension)",
            "empirical": "EMPIRICAL Fisher: gradients of nll at the true labels (a weaker curvature approximation)",
        }[mode]
        info.update(
            fisher=fisher,
            label_expectation=mode,
            sampling=sampling if mode == "mc" else None,
            rows=rows,
            forward_passes=forwards,
            backward_passes=passes,
            kronecker={
                b.name: {
                    "params": [p for p in (b.weight, b.bias) if p is not None],
                    "A_dim": b.in_dim,
                    "G_dim": b.out_dim,
                    "A": _factor_form(b.QA, b.in_dim),
                    "G": _factor_form(b.QG, b.out_dim),
                    "locations": b.locations,
                    "A_locations_used": b.loc_A,
                }
                for b in blocks
            },
            diagonal=dict(sorted((k, reasons[k]) for k in diag_names)),
            kronecker_params=sum(b.out_dim * b.in_dim for b in blocks),
            diagonal_params=int(diag_index.numel()),
            eigh_seconds=eig_seconds,
            build_seconds=time.perf_counter() - t_start,
            seconds={**clock, "forward": clock["forward"] - clock["input_factors"], "eigh": eig_seconds},
        )
        return cls(blocks, spec.dim, P, diag_index, diag_fisher, n, info)

    @staticmethod
    def _guess_without_nll(model: nn.Module, batch: Batch) -> Likelihood:
        probe = _head(batch, _PROBE_ROWS)
        y = probe[1] if len(probe) > 1 else None
        with preserved(model), torch.no_grad():
            out = model(probe[0])
        if isinstance(out, Tensor) and out.dim() == 2 and isinstance(y, Tensor) and not y.is_floating_point():
            return Likelihood.CATEGORICAL
        raise ValueError(
            "cannot tell the likelihood without nll: pass nll=..., or likelihood='categorical' / 'bernoulli' / "
            "'gaussian' (sigma=...)"
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
        sampling: str = "gaussian",
        link: dict[str, Any] | None = None,
        span: tuple[int, int, int, _Draws] | None = None,
    ) -> Iterator[Tensor]:
        """Scalar losses whose backward passes give the statistics; the first item runs the forward pass.

        ``span = (r0, r1, B, draws)``: ``batch`` is rows ``r0:r1`` of a minibatch of ``B`` rows, and every random
        draw is made for all ``B`` rows (once, through ``draws``) and cut to these rows.

        ``record["mode"]`` is set to ``"mc"``, ``"exact"`` or ``"empirical"`` once the forward has run. ``link``
        (:func:`detect_likelihood`'s extras) picks the output tensor, its temperature and per-row weights ``w``:
        each row's sample is multiplied by ``√w``, so its outer product has the expectation ``w·H``.
        """
        link = link or {}
        B = field_rows(batch)

        def whole(make: Callable[[int], Tensor]) -> Tensor:
            """``make(rows)`` for this batch's rows, or for the whole minibatch (cut to this chunk's rows)."""
            if span is None:
                return make(B)
            r0, r1, full, draws = span
            return draws.get(lambda: make(full))[r0:r1]

        def signs(ref: Tensor) -> Tensor:
            r = whole(lambda k: torch.randint(0, 2, (k,), generator=gen, device=gen.device)).to(ref.device, ref.dtype)
            return 2 * r - 1

        if lik is Likelihood.EMPIRICAL:
            values = nll(model, batch)
            if not isinstance(values, Tensor) or values.shape != (B,):
                raise ValueError(f"nll(model, batch) must return shape [{B}]")
            record["mode"] = "empirical"
            yield (signs(values) * values).sum()
            return
        try:
            raw = model(batch[0])
        except (TypeError, RuntimeError, ValueError, IndexError, KeyError, AttributeError) as e:
            raise ValueError(
                f"likelihood={lik.value!r} takes the model's output from model(batch[0]), which failed "
                f"({type(e).__name__}: {str(e)[:120]}): let forward take the first field of a minibatch alone (e.g. "
                "compute a padding mask from the token ids inside forward), or leave likelihood='auto' (the "
                "empirical Fisher where the output cannot be read); nothing was changed"
            ) from e
        out = select_output(raw, link)
        w = row_weights(batch, link)
        rw = None if w is None else w.to(out.device, out.dtype).sqrt()
        if not isinstance(out, Tensor) or out.shape[:1] != (B,):
            raise ValueError(f"model(x) must return a tensor with {B} rows for likelihood={lik.value!r}")
        if lik is Likelihood.CATEGORICAL and out.dim() not in (2, 3):
            raise ValueError(
                f"likelihood='categorical' needs model(x) of shape [B, C] (the logits of nll's cross-entropy, one row "
                f"per row of the minibatch) or [B, L, C] (a cross-entropy at each of L positions), got "
                f"{tuple(out.shape)}: for another output leave likelihood='auto' (the "
                "empirical Fisher) or use solver='cg' for the exact curvature; nothing was changed"
            )
        width = math.prod(out.shape[1:])  # (an empty batch: every row ignore_index)
        use_exact = exact if exact is not None else width <= mc_samples
        record["mode"] = "exact" if use_exact else "mc"
        if lik is Likelihood.CATEGORICAL:
            logp = torch.log_softmax(out, -1)
            probs = logp.detach().exp()
            if use_exact:  # Σ_c p_c (p − e_c)(p − e_c)ᵀ = diag(p) − ppᵀ, the softmax's output Hessian
                r = signs(out) if rw is None else signs(out) * rw
                flat_p, flat_logp = probs.reshape(B, width), logp.reshape(B, width)  # [B, L·C]: a position's class each
                for c in range(width):
                    yield -(r * flat_p[:, c].sqrt() * flat_logp[:, c]).sum()
            elif sampling == "labels":  # ŷ ~ p: gradient p − e_ŷ, E[(p − e_ŷ)(p − e_ŷ)ᵀ] = diag(p) − ppᵀ
                if span is not None:  # the labels drawn depend on every row's probabilities at once
                    raise ValueError("a K-FAC build in row chunks needs sampling='gaussian', not 'labels'")
                C = probs.shape[-1]  # a label per row, or per row and position ([B, L, C] logits)
                for _ in range(mc_samples):
                    yhat = torch.multinomial(probs.reshape(-1, C).to(gen.device, torch.float64), 1, generator=gen)
                    at = yhat.to(out.device).reshape(B, width // C, 1)  # (no rows: every row ignore_index)
                    picked = logp.reshape(B, width // C, C).gather(2, at).sum((1, 2))
                    yield -(picked if rw is None else rw * picked).sum()
            else:  # s = (I − p1ᵀ)(√p ⊙ ε), ε ~ N(0, I): E[s sᵀ] = (I − p1ᵀ) diag(p) (I − 1pᵀ) = diag(p) − ppᵀ
                for _ in range(mc_samples):
                    eps = whole(
                        lambda k: torch.randn(
                            (k, *probs.shape[1:]), generator=gen, device=gen.device, dtype=probs.dtype
                        )
                    )
                    root = probs.sqrt() * eps.to(out.device)  # independent positions of [B, L, C] logits
                    if rw is not None:
                        root = rw.reshape(-1, *[1] * (root.dim() - 1)) * root
                    yield (out * (root - probs * root.sum(-1, keepdim=True))).sum()
        elif lik is Likelihood.BERNOULLI:  # independent logits: output Hessian diag(p(1 − p)), p = sigmoid(z)
            z = out.reshape(B, -1)
            probs = torch.sigmoid(z.detach())
            curv = probs * (1 - probs)
            if use_exact:  # Σ_k √h_k e_k (√h_k e_k)ᵀ = diag(h)
                r = signs(out) if rw is None else signs(out) * rw
                for k in range(width):
                    yield (r * curv[:, k].sqrt() * z[:, k]).sum()
            elif sampling == "labels":  # ŷ ~ Bernoulli(p): gradient p − ŷ, E[(p − ŷ)²] = p(1 − p) per logit
                if span is not None:
                    raise ValueError("a K-FAC build in row chunks needs sampling='gaussian', not 'labels'")
                for _ in range(mc_samples):
                    yhat = torch.bernoulli(probs.to(gen.device, torch.float64), generator=gen).to(z.device, z.dtype)
                    bce = F.binary_cross_entropy_with_logits(z, yhat, reduction="none").sum(1)
                    yield (bce if rw is None else rw * bce).sum()
            else:  # s = √(p(1 − p)) ⊙ ε, ε ~ N(0, I): E[s sᵀ] = diag(p(1 − p))
                for _ in range(mc_samples):
                    eps = whole(
                        lambda k: torch.randn((k, *curv.shape[1:]), generator=gen, device=gen.device, dtype=curv.dtype)
                    )
                    root = curv.sqrt() * eps.to(out.device)
                    if rw is not None:
                        root = rw[:, None] * root
                    yield (z * root).sum()
        elif link.get("variance") == "learned":
            # a Gaussian N(m, v) in the target with m, v functions of the output: its Fisher in the output is
            # ∇m∇mᵀ/v + ∇v∇vᵀ/(2v²) (exact, two backward passes), m and v read off nll (gaussian_in_targets)
            record["mode"] = "exact"
            with torch.enable_grad():
                leaf = out.detach().to(torch.float64).requires_grad_(True)
                m, v = gaussian_in_targets(nll, leaf, batch)
            dm, dv = (
                torch.autograd.grad(m.sum(), leaf, retain_graph=True, allow_unused=True, materialize_grads=True)[0],
                torch.autograd.grad(v.sum(), leaf, allow_unused=True, materialize_grads=True)[0],
            )
            r = signs(out) if rw is None else signs(out) * rw
            flat = out.reshape(B, -1)
            vd = v.detach()
            for d, scale in ((dm, vd.rsqrt()), (dv, 1 / (math.sqrt(2) * vd))):
                coef = (d.reshape(B, -1) * scale[:, None]).to(out.dtype)
                yield (r * (flat * coef).sum(1)).sum()
        else:
            if use_exact:  # Σ_k e_k e_kᵀ / σ² = I/σ², the Gaussian's output Hessian
                r = signs(out) if rw is None else signs(out) * rw
                flat = out.reshape(B, -1)
                for k in range(width):
                    yield (r * flat[:, k]).sum() / sigma
            else:
                mu = out.detach()
                for _ in range(mc_samples):
                    eps = whole(
                        lambda k: torch.randn((k, *mu.shape[1:]), generator=gen, device=gen.device, dtype=torch.float64)
                    )
                    yhat = mu + sigma * eps.to(mu.device, mu.dtype)
                    sq = (out - yhat).square().reshape(B, -1).sum(1)
                    yield (sq if rw is None else rw * sq).sum() / (2 * sigma**2)

    # ------------------------------------------------------------------------------------- products
    # Every product works in the eigenbasis: rotate v (Q_Gᵀ V Q_A per block), scale elementwise, rotate back. The
    # rotations are the only costly part (≈ 2·out·in·(out + in) flops per layer and direction), so the eigenbasis
    # coordinates of the last few inputs and outputs are cached (keyed by tensor identity and version counter,
    # through weak references): solve(g, λ) for several λ rotates g once, and quad(x) of a solve or matmul result
    # costs no rotation at all - the pattern of a damping search.
    _CACHE = 6

    def _data_eigvals(self, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """Eigenvalues of the data term per block (``n·L·λ_G λ_Aᵀ``, ``[r_G, r_A]``) and on the diagonal
        parameters (``n·d``, ``[Dd]``); the prior precision is added by the callers."""
        out = [
            self.n * b.locations * b.lG.to(device, dtype)[:, None] * b.lA.to(device, dtype)[None, :]
            for b in self.blocks
        ]
        out.append(self.n * self.diag_fisher.to(device, dtype))
        return out

    @staticmethod
    def _low_rank(b: _Block) -> bool:
        """Whether the block's eigenbasis misses directions (kept-rows factors): there ``K`` is the prior alone."""
        return any(Q is not None and Q.shape[1] < Q.shape[0] for Q in (b.QA, b.QG))

    def _lookup(self, v: Tensor) -> list[Tensor] | None:
        for ref, version, coords in self._cache:
            if ref() is v and v._version == version:
                return coords
        return None

    def _remember(self, v: Tensor, coords: list[Tensor]) -> None:
        self._cache = [e for e in self._cache if e[0]() is not None and e[0]() is not v][-(self._CACHE - 1) :]
        self._cache.append((weakref.ref(v), v._version, coords))

    def forget(self, v: Tensor | None = None) -> None:
        """Drop the cached coordinates of ``v`` and of every vector no longer alive (a dead vector's entry holds a
        copy of its columns until the next product would push it out): for products whose inputs are thrown away,
        as :meth:`~mcmc_unlearner.backends.kfac.KFACBackend.scale`'s probe columns. ``None``: the dead vectors'
        alone (a product's, its input's coordinates kept for another product with it)."""
        self._cache = [e for e in self._cache if e[0]() is not None and (v is None or e[0]() is not v)]

    def _coords(self, v: Tensor) -> list[Tensor]:
        """Eigenbasis coordinates of ``v`` (``[D]`` or ``[D, k]``): ``[k, out, in]`` per block, then ``[Dd, k]``."""
        coords = self._lookup(v)
        if coords is not None:
            return coords
        V = self._as_matrix(v)
        coords = []
        for b in self.blocks:
            M = b.to_matrix(V)
            if b.QG is not None:
                M = b.QG.to(V.device, V.dtype).T @ M
            if b.QA is not None:
                M = M @ b.QA.to(V.device, V.dtype)
            coords.append(M)
        coords.append(V[self.diag_index.to(V.device)])
        self._remember(v, coords)
        return coords

    def _as_matrix(self, v: Tensor) -> Tensor:
        if v.dim() not in (1, 2) or v.shape[0] != self.dim:
            raise ValueError(f"expected a vector [{self.dim}] or matrix [{self.dim}, k], got {tuple(v.shape)}")
        v = v.detach()
        return v[:, None] if v.dim() == 1 else v

    def _apply(self, v: Tensor, inverse: bool, damping: float, data_damping: float = 0.0) -> Tensor:
        """``K v`` or ``(K + damping·I + data_damping·K_data)⁻¹ v``. Per block with data eigenvalues ``Λ`` in the
        eigenbasis ``U`` and the prior ``p`` on the rest: ``f(K) v = f(p)·v + U (f(Λ + p) − f(p)) Uᵀ v``
        (``= U f(Λ + p) Uᵀ v`` when ``U`` is a complete basis)."""
        V = self._as_matrix(v)
        coords = self._coords(v)
        lams = self._data_eigvals(V.dtype, V.device)
        if inverse and data_damping:
            lams = [lam * (1.0 + data_damping) for lam in lams]
        scaled, rest = [], []
        for i, b in enumerate(self.blocks):
            low = self._low_rank(b)
            base = b.prior + (damping if inverse else 0.0)
            full = lams[i] + base
            if inverse:
                if (full.numel() and float(full.min()) <= 0) or (low and base <= 0):
                    raise ValueError(
                        f"K + {damping}·I is singular on layer '{b.name}': pass damping > 0 (or a log_prior)"
                    )
                f, f0 = 1.0 / full, 1.0 / base if low else 0.0
            else:
                f, f0 = full, base
            scaled.append(coords[i] * f)
            rest.append((coords[i] * (f - f0), f0) if low else None)
        diag = lams[-1][:, None] + self.prior[self.diag_index].to(V.device, V.dtype)[:, None]
        if inverse:
            diag = diag + damping
            if diag.numel() and float(diag.min()) <= 0:
                raise ValueError(f"K + {damping}·I is singular on the diagonal parameters: pass damping > 0")
            scaled.append(coords[-1] / diag)
        else:
            scaled.append(coords[-1] * diag)
        out = torch.empty_like(V)
        for b, C, extra in zip(self.blocks, scaled, rest):
            if extra is None:
                b.from_matrix(self._back(b, C, V), out)
            else:
                delta, f0 = extra
                b.from_matrix(f0 * b.to_matrix(V) + self._back(b, delta, V), out)
        out[self.diag_index.to(V.device)] = scaled[-1]
        result = out[:, 0] if v.dim() == 1 else out
        self._remember(result, scaled)  # Uᵀ f(K) v = f(Λ + p)·Uᵀ v also for an incomplete basis
        return result

    @staticmethod
    def _back(b: _Block, C: Tensor, like: Tensor) -> Tensor:
        if b.QG is not None:
            C = b.QG.to(like.device, like.dtype) @ C
        if b.QA is not None:
            C = C @ b.QA.to(like.device, like.dtype).T
        return C

    def solve(self, v: Tensor, damping: float = 0.0, data_damping: float = 0.0) -> Tensor:
        """``(K + damping·I + data_damping·K_data)⁻¹ v`` for ``v`` of shape ``[D]`` or ``[D, k]`` (closed form for
        any damping; ``K_data = K − P`` is the data term: ``data_damping`` scales it and leaves the prior alone).

        Raises:
            ValueError: if ``K + damping·I`` is singular (no prior precision and ``damping = 0``), or
                ``data_damping < 0``.
        """
        if not data_damping >= 0:
            raise ValueError(f"data_damping must be >= 0, got {data_damping}")
        return self._apply(v, True, float(damping), float(data_damping))

    def __matmul__(self, v: Tensor) -> Tensor:
        """``K v`` for ``v`` of shape ``[D]`` or ``[D, k]``."""
        return self._apply(v, False, 0.0)

    def matvec(self, v: Tensor) -> Tensor:
        """Same as ``self @ v``."""
        return self @ v

    def quad(self, x: Tensor, prior: bool = True) -> float:
        """``xᵀ K x`` for ``x`` of shape ``[D]`` (free for a result of :meth:`solve` or ``@``; else one rotation):
        ``Σ_blocks (p‖x_b‖² + Σ Λ·(Uᵀx_b)²) + Σ_diag (n·d + P)·x²``; ``prior=False``: the data term ``xᵀK_data x``
        alone."""
        if x.dim() != 1:
            raise ValueError(f"quad takes a vector [{self.dim}], got {tuple(x.shape)}")
        coords = self._coords(x)
        X = x.detach()[:, None]
        lams = self._data_eigvals(X.dtype, X.device)
        total = 0.0
        for b, C, lam in zip(self.blocks, coords, lams):
            p = b.prior * float(b.to_matrix(X).square().sum()) if prior else 0.0
            total += p + float((C.square() * lam).sum())
        diag = lams[-1] + (self.prior[self.diag_index].to(X.device, X.dtype) if prior else 0.0)
        return total + float((coords[-1][:, 0].square() * diag).sum())

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

    @staticmethod
    def check_state(model: nn.Module, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Refuse a saved curvature that :meth:`from_state_dict` cannot rebuild whole: another format, a block's
        factor missing (a bare ``KeyError`` before stop 63) or of another shape than its layer's (accepted, and the
        next request failed with torch's "mat1 and mat2 shapes cannot be multiplied"), a diagonal part whose index and
        values disagree; and metadata that does not fit ``model`` or lacks an entry :meth:`from_state_dict` reads (a
        block's ``locations``, ``prior``, ``kind``, layer names or parameter count of another model, ``n``, ``info``:
        stop 63's review found these still raised a bare ``KeyError`` or ``from_state_dict``'s error after
        :meth:`~mcmc_unlearner.unlearner.MCMCUnlearner.load_curvature_state` had begun, an ``auto`` unlearner's
        solver already switched to the state's). A block's ``kind`` none of ``linear``/``conv1d``/``conv2d`` and an
        ``out_dim``/``in_dim`` not a whole positive number are refused too (a hand-edited ``4.5`` was loaded as 4).

        Raises:
            ValueError: naming the entry.
        """
        if not isinstance(meta, dict) or meta.get("format") != "kronecker-curvature/1":
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"not a saved KroneckerCurvature (format {got!r})")
        blocks = meta.get("blocks")
        if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
            raise ValueError("saved curvature has no list of blocks in its metadata")
        spec, offsets, _ = _slices(model)
        try:
            n, dim_all = int(meta["n"]), int(meta["dim"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("saved curvature's metadata lacks its 'n' or 'dim' (or they are not counts)") from None
        if n < 0 or not isinstance(meta.get("info"), dict):
            raise ValueError("saved curvature's metadata has a negative 'n' or no 'info' dict")
        if dim_all != spec.dim:
            raise ValueError(f"saved curvature has {dim_all} parameters, the model {spec.dim}: wrong model")
        for i, bm in enumerate(blocks):
            try:
                out_dim, in_dim, eig_a, eig_g = int(bm["out_dim"]), int(bm["in_dim"]), bm["eig_A"], bm["eig_G"]
                located, prior = float(bm["locations"]), float(bm["prior"])
                names = (str(bm["name"]), str(bm["kind"]), bm["weight"], bm["bias"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(
                    f"saved curvature's block {i} metadata lacks out_dim, in_dim, eig_A, eig_G, locations, prior, "
                    "name, kind, weight or bias, or holds one of another type"
                ) from None
            if not (math.isfinite(located) and math.isfinite(prior) and located >= 0):
                raise ValueError(f"saved curvature's block {i} has locations {located} and prior {prior}")
            known = [k for _, k in _KINDS]
            if names[1] not in known:
                raise ValueError(
                    f"saved curvature's block {i} (layer {names[0]!r}) has kind {bm['kind']!r}, not one of {known}"
                )
            for key in ("out_dim", "in_dim"):
                # int() took 4.5 as 4 and "4" as 4: a hand-edited entry that happened to truncate to the layer's size
                if not (_whole(bm[key]) and bm[key] > 0):
                    raise ValueError(
                        f"saved curvature's block {i} (layer {names[0]!r}) has {key} {bm[key]!r}, not a whole "
                        "positive number"
                    )
            for pname in names[2:]:
                if pname is not None and (not isinstance(pname, str) or pname not in offsets):
                    raise ValueError(f"saved curvature refers to parameter {pname!r}, which the model lacks")
            if names[2] is None:
                raise ValueError(f"saved curvature's block {i} names no weight")
            w, bias = offsets[names[2]], offsets[names[3]] if names[3] is not None else None
            size = (w.stop - w.start) + (bias.stop - bias.start if bias is not None else 0)
            if size != out_dim * in_dim or (bias is not None and bias.stop - bias.start != out_dim):
                raise ValueError(f"layer {names[0]!r} has a different shape in the model than in the saved curvature")
            for side, dim, full in (("A", in_dim, eig_a), ("G", out_dim, eig_g)):
                lam, Q = tensors.get(f"block{i}.l{side}"), tensors.get(f"block{i}.Q{side}")
                for name, t in ((f"block{i}.l{side}", lam), (f"block{i}.Q{side}", Q)):
                    if t is None and (full or name.endswith(f"l{side}")):
                        raise ValueError(f"saved curvature lacks {name!r} (layer {bm.get('name')!r})")
                # an eigenbasis [dim, r] (r < dim where the build kept rows) with r eigenvalues; a diagonal: dim values
                rank = Q.shape[1] if full and Q.ndim == 2 else dim
                if full and (Q.ndim != 2 or Q.shape[0] != dim or Q.shape[1] > dim):
                    raise ValueError(
                        f"saved curvature's 'block{i}.Q{side}' has shape {tuple(Q.shape)}, layer {bm.get('name')!r} "
                        f"needs ({dim}, r) with r <= {dim}"
                    )
                if tuple(lam.shape) != (rank,):
                    raise ValueError(
                        f"saved curvature's 'block{i}.l{side}' has shape {tuple(lam.shape)}, layer {bm.get('name')!r} "
                        f"needs ({rank},)"
                    )
                if not lam.is_floating_point() or (full and not Q.is_floating_point()):
                    raise ValueError(f"saved curvature's block {i} factor {side} is not floating point")
                # negative beyond rounding: an eigendecomposition's eigenvalues are exact to about rank·eps·‖M‖ (the
                # build clamps its own at 0; a factor decomposed elsewhere may hold -1e-9·‖M‖)
                tol = lam.numel() * torch.finfo(lam.dtype).eps * float(lam.abs().max()) if lam.numel() else 0.0
                if lam.numel() and float(lam.min()) < -tol:
                    raise ValueError(
                        f"saved curvature's 'block{i}.l{side}' holds a negative eigenvalue ({float(lam.min()):.3g}, "
                        f"beyond rounding: {tol:.3g}); a factor's eigenvalues are never negative"
                    )
        for name in ("prior", "diag_index", "diag_fisher"):
            if tensors.get(name) is None:
                raise ValueError(f"saved curvature lacks {name!r}")
        d_index, d_fisher = tensors["diag_index"], tensors["diag_fisher"]
        if d_index.ndim != 1 or d_index.shape != d_fisher.shape:
            raise ValueError(
                f"saved curvature's 'diag_index' {tuple(d_index.shape)} and 'diag_fisher' {tuple(d_fisher.shape)} "
                "differ in shape"
            )
        if (
            d_index.is_floating_point()
            or d_index.is_complex()
            or (d_index.numel() and not 0 <= int(d_index.min()) <= int(d_index.max()) < spec.dim)
        ):
            raise ValueError(f"saved curvature's 'diag_index' is not integer indices below {spec.dim}")
        if tuple(tensors["prior"].shape) != (spec.dim,):
            raise ValueError(f"saved prior has shape {tuple(tensors['prior'].shape)}, expected [{spec.dim}]")

    @classmethod
    def from_state_dict(cls, model: nn.Module, tensors: dict[str, Tensor], meta: dict[str, Any]) -> KroneckerCurvature:
        """Rebuild from :meth:`state_dict` output; ``model`` must have the same trainable parameters.

        Raises:
            ValueError: if the saved curvature does not match the model's parameters.
        """
        cls.check_state(model, tensors, meta)  # every check, so that a caller can run them before loading anything
        spec, offsets, _ = _slices(model)
        blocks = []
        for i, bm in enumerate(meta["blocks"]):
            w, bias = offsets[bm["weight"]], offsets[bm["bias"]] if bm["bias"] is not None else None
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
        return cls(
            blocks,
            spec.dim,
            tensors["prior"],
            tensors["diag_index"].long(),
            tensors["diag_fisher"],
            int(meta["n"]),
            meta["info"],
        )

    # ---------------------------------------------------------------------------------------- memory
    @staticmethod
    def memory_estimate(
        model: nn.Module,
        batch_rows: int | None,
        example_batch: Batch,
        max_factor_dim: int = MAX_FACTOR_DIM,
        nll: Callable[[nn.Module, Batch], Tensor] | None = None,
    ) -> Any:
        """Peak bytes :meth:`build` will allocate for minibatches of ``batch_rows`` rows, estimated before building
        (``batch_rows=None``: the estimate as a function of the rows, e.g. to choose ``build(row_chunk=)``).

        Two tiny probe forward passes (with gradients, on 1-4 rows of ``example_batch``; through ``nll`` when given,
        which calls the model as the user does, else ``model(batch[0])``) measure the bytes autograd
        saves per row and in total (``saved_tensors_hooks``), the layer outputs that the build clones and
        differentiates, the largest unfolded layer input and the largest tensor the forward makes (not the batch's
        storage its rows are a view of), and a forward without gradients on the rows twice over measures the most
        its tensors hold at once (:class:`_LivePeak`): the build runs one beside its first forward's graph
        (:func:`_shared_codes`). The peak is the larger of that and the backward's (the graph, the layer outputs'
        gradients and two of the largest tensors). The factors add ``Σ (in² + out²)`` elements twice (sums and
        eigenbases) plus the eigen-solver's workspace, the parameters a few copies of ``D``. Activation memory is
        linear in rows, so the estimate is too; allocator overhead and fragmentation are not included.
        """
        batch = tuple(example_batch)
        have = field_rows(batch)
        sizes = (2, 4) if have >= 4 else (1, max(have, 1)) if have >= 2 else (1, 1)
        spec, offsets, by_id = _slices(model)
        blocks, _ = _candidates(model, offsets, by_id, max_factor_dim)
        by_module = {b.module: b for b in blocks}
        measured = []
        forward = (lambda b: nll(model, b)) if nll is not None else (lambda b: model(b[0]))
        # storages from before the probe (the batch's, which its rows are a view of, and the parameters'): saved
        # by autograd, but not made by the forward, so not the largest tensor the build's backward doubles
        ahead = {
            t.untyped_storage().data_ptr()
            for t in [*batch, *model.parameters(), *model.buffers()]
            if isinstance(t, Tensor) and t.device.type != "meta"
        }
        for rows in sizes:
            stats = {"saved": 0, "block_out": 0, "block_in": 0, "patch": 0, "largest": 0, "doubled": 0}
            seen: set[int] = set()

            kept: list[Tensor] = []

            def pack(t: Tensor, stats: dict = stats, seen: set = seen, kept: list = kept) -> None:
                key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
                if key not in seen and not isinstance(t, nn.Parameter):
                    seen.add(key)
                    stats["saved"] += t.untyped_storage().nbytes()
                    if key not in ahead:
                        stats["largest"] = max(stats["largest"], t.untyped_storage().nbytes())
                # held here until the probe ends, as autograd would hold it (a freed storage's address reused by a
                # later tensor would be counted once: the estimate read low), and not by the graph: an output saved by
                # its own node (a ReLU's, a log-softmax's) returned to autograd made a cycle through its C++ graph that
                # Python's collector cannot see, and every build leaked the probe's activations (stop 44's probe)
                kept.append(t)
                return None

            def hook(module: nn.Module, args: tuple, out: Any, stats: dict = stats) -> None:
                blk = by_module[module]
                if isinstance(out, Tensor) and args and isinstance(args[0], Tensor):
                    stats["block_out"] += out.numel() * out.element_size()
                    stats["block_in"] += args[0].numel() * args[0].element_size()
                    a = _patches(blk, args[0].detach())
                    stats["patch"] = max(stats["patch"], a.numel() * a.element_size())

            handles = [b.module.register_forward_hook(hook, prepend=True) for b in blocks]
            try:
                with (
                    preserved(model),
                    torch.enable_grad(),
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None),
                ):
                    head = _head(batch, rows)
                    forward(head)
            finally:
                for h in handles:
                    h.remove()
                kept.clear()
            stats["doubled"] = _doubled_peak(model, forward, head, stats["block_in"])
            measured.append((rows, stats))
        (r1, s1), (r2, s2) = measured
        per_row = {k: (s2[k] - s1[k]) / (r2 - r1) if r2 > r1 else s2[k] / r2 for k in s1}
        fixed = {k: max(s1[k] - per_row[k] * r1, 0.0) for k in s1}
        itemsize = next(model.parameters()).element_size()
        factors = sum((b.in_dim**2 if b.eig_A else b.in_dim) + (b.out_dim**2 if b.eig_G else b.out_dim) for b in blocks)
        largest_factor = max(
            [b.in_dim if b.eig_A else 0 for b in blocks] + [b.out_dim if b.eig_G else 0 for b in blocks] + [0]
        )
        eig = 3 * largest_factor**2 * itemsize
        params = 4 * spec.dim * itemsize

        def estimate(rows: int) -> int:
            est = {k: fixed[k] + per_row[k] * rows for k in s1}
            patch = min(est["patch"], _CHUNK_BYTES + per_row["patch"])  # unfolded in chunks of rows
            backward = est["saved"] + 2 * est["block_out"] + 2 * max(patch, est["largest"])
            shared = est["saved"] + est["block_out"] + est["doubled"]  # beside the graph, one forward on 2x rows
            passes = max(backward, shared)
            return int(passes + 2 * factors * itemsize + eig + params)

        return estimate if batch_rows is None else estimate(batch_rows)
