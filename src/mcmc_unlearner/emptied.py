"""A Gibbs step for a class label that no remaining row carries (README, "What one request does", step 6).

A request that removes the last rows of a label ``c`` from a plain cross-entropy classifier leaves, under
retraining, that label's row of the output layer (its weights ``w_c`` and bias ``b_c``) with the conditional

    p(w_c, b_c | θ₋c, S∖S′) ∝ p(θ) · Π_{i ∈ S∖S′} softmax(z_i)_{y_i},   z_ic = w_c·φ_i + b_c,

where ``φ_i`` is the output layer's input on remaining row ``i`` and every other logit is fixed by ``θ₋c``. No
remaining row has ``y_i = c``, so each row only pushes ``z_ic`` down; the prior keeps the row proper. Replacing the
row of every stored sample by a draw from this conditional is a Gibbs update of the *retrained* posterior: it leaves
that posterior invariant, so it moves the samples toward it in this block however far the influence step left them.
Logits that are a fixed multiple ``α`` of a sum of ``nn.Linear`` outputs (heads averaged, one head mean-pooled over
tokens, a constant or learned temperature; :class:`OutputRows` ``pooled``) are ``z_ic = v·φ̃_i`` for the heads' rows
``c`` stacked in ``v`` and their inputs summed over calls, times ``α``, in ``φ̃_i``: the same conditional. A
cross-entropy times a factor ``ω_i`` per row (``weight=`` class weights) weights each row's term by it.
The influence step cannot get there itself: the removed rows were well fit, so their gradient is small, and the
label's output directions are damped with every other direction (a user's digits MLP whose class 0 went in 17
requests of 8 kept p = 0.99 on the class's rows; after the draw p = 0.004, the kept classes' test error unchanged).

The draw, per stored sample (and the live chain): quasi-Newton iterations to the conditional's mode (the data term's
Hessian ``Σ p_ic(1 − p_ic) φ̃_i φ̃_iᵀ`` summed in float32, the draw's main cost, then in float64 for the last step, the
prior's as a measured diagonal; each step halved until ``U`` falls), then preconditioned MALA (Langevin proposals with
the inverse of that Hessian as covariance, Metropolis–Hastings corrected, the proposal densities' ratio in closed form)
for ``steps`` steps from the mode; its step size is adapted during the first fifth
(× 1.1 on an accepted proposal, × 0.87 on a rejected one) and then fixed. After that fifth, where the row's prior is
Gaussian (the quadratic below), three of every four steps are elliptical slice steps (Murray, Adams & MacKay 2010:
the ellipse through the row and a draw from its prior, exact for a Gaussian prior times any likelihood): the remaining
rows only push ``z_ic`` down, so along those directions only the prior bounds the row, and MALA's proposal, the mode's
curvature, is far narrower than the conditional there (stop 60: on a BN-CNN sample the forgotten rows' mean ``z_c``
was −46 after 40 MALA steps, −104 after 400); a slice step's ellipse is prior-wide. Elsewhere, MALA throughout.
The label's logits ``z_ic`` at the rows are kept as the chains move: the logits on a slice step's ellipse are
``z`` at its centre, the row and the prior draw combined by the angle, so a slice step reads the features once
whatever the angles it tries (it read them at every angle until stop 61), and the gradient after it once.
Every sample's chain starts at the step size a tuning run on the first sample's conditional ended at (``steps`` steps
from ``1.4 d^(−1/6)``, every one adapting; its draw is dropped): the same row, a similar conditional. (Until stop 58
each sample started where the previous one's warm-up ended: a fresh start at ``1.4 d^(−1/6)`` with 8 adapting steps had
left a ResNet's acceptance at 0.14–0.20, docs/model-matrix.md.)

The samples' conditionals are independent, so a chunk of samples is drawn at once: their features ``[B, d, n]``,
Newton's solves batched (each sample halves its own step), and their chains advanced together, each with its own
step size, accept/reject and random numbers (a generator per sample and label, seeded from ``gen``). A sample's draw
is therefore the same whatever the chunk, which the memory budget and a cache-sized cap
(``RESAMPLE_CHUNK_BYTES``) choose (one at a time, as before stop 58, the digits BNN's 200 samples took about 7 CPU s).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from .curvature import ParamSpec

Batch = tuple[torch.Tensor, ...]

#: Steps per stored sample after the conditional's mode: MALA's (the first fifth adapt its step size), then mostly
#: slice ones.
RESAMPLE_STEPS = 40
#: After the MALA warm-up, every this many steps is a MALA step and the others are elliptical slice steps, where the
#: row's prior is Gaussian (stop 60): MALA's proposal, the mode's curvature, is far narrower than the conditional along
#: the directions only the prior bounds (the remaining rows push the label's logit down only); a slice step's ellipse
#: is prior-wide. (MALA's steps keep the acceptance rate a measure of its step size.)
RESAMPLE_MALA_EVERY = 4
#: Angles an elliptical slice step tries (its bracket shrunk after each) before it leaves the row where it was (its
#: random numbers: the level and one per angle).
RESAMPLE_SLICE_TRIES = 7
#: Stored samples × remaining rows the draw may read (one forward pass of the model per sample over every remaining
#: row) by default (``MCMCUnlearner(emptied_max_row_evals=...)``); beyond that the draw is not done, with the reason.
RESAMPLE_MAX_ROW_EVALS = 2**22
#: Remaining rows per forward pass.
RESAMPLE_ROWS = 1024
#: Features (float64 bytes) of the samples drawn at once, at most: a chunk that stays in cache (the chains read them
#: twice a step; the digits BNN's 200 samples at once, 126 MB, took 7.1 CPU s against 4.3-5.0 s 12 at a time).
RESAMPLE_CHUNK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class OutputRows:
    """Where the output layer's rows sit in the flat parameter vector: its weight ``[C, h]`` and its bias ``[C]``
    (``None`` without one), as offsets into ``θ``; ``more``: further heads, the same for each, and ``pooled``:
    the logits are a multiple ``α`` (measured at each sample) of the sum of these heads' outputs over their calls
    and positions, up to a per-row shift (logits averaged over heads or over the positions one head is applied
    to): ``z_ic = α Σ_heads (w_c·Σ_calls h + b_c·calls)``, the plain conditional of the heads' rows ``c`` together,
    on the features ``α Σ_calls [h; 1]`` of each head."""

    module: nn.Linear
    weight: int
    bias: int | None
    more: tuple[tuple[nn.Linear, int, int | None], ...] = ()
    pooled: bool = False

    @property
    def heads(self) -> tuple[tuple[nn.Linear, int, int | None], ...]:
        """Every head: ``(module, weight offset, bias offset)``, the first the one ``module`` names."""
        return ((self.module, self.weight, self.bias), *self.more)

    @property
    def width(self) -> int:
        """Entries of one label's row over every head (the conditional's dimension)."""
        return sum(m.in_features + (b is not None) for m, _, b in self.heads)

    def index(self, c: int) -> torch.Tensor:
        """The flat indices of row ``c``: its ``h`` weights, then its bias (head after head)."""
        parts = []
        for module, weight, bias in self.heads:
            h = module.in_features
            parts.append(torch.arange(weight + c * h, weight + (c + 1) * h))
            if bias is not None:
                parts.append(torch.tensor([bias + c]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _scale_of(out: torch.Tensor, total: torch.Tensor, alpha: float | None = None) -> float | None:
    """The ``α`` with ``out = α·total`` up to a per-row shift (``[B, C]`` both), to ``1e3`` epsilons of ``out``'s
    dtype, or ``None`` where there is none (``alpha``: whether that one fits)."""
    o, t = out.double(), total.double()
    oc, tc = o - o.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    den = float((tc * tc).sum())
    if not (math.isfinite(den) and den > 0.0) or not bool(torch.isfinite(oc).all()):
        return None
    alpha = float((oc * tc).sum()) / den if alpha is None else alpha
    size = 1 + float(o.abs().max()) + abs(alpha) * float(t.abs().max())
    ok = alpha != 0.0 and float((oc - alpha * tc).abs().max()) <= 1e3 * torch.finfo(out.dtype).eps * size
    return alpha if ok else None


def _pooled_heads(outputs: list[tuple[nn.Linear, Any]], out: Any) -> list[nn.Linear] | None:
    """The ``nn.Linear`` modules whose last calls' outputs, summed over the calls and the positions between the
    rows and the classes (``[B, ..., C]``) and scaled, are ``out`` up to a per-row shift: the shortest such run of
    calls ending at the last one (their modules in the order first called), or ``None``."""
    if not (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] > 1 and out.is_floating_point()):
        return None
    B, C = out.shape
    total, run = None, []
    for mod, o in reversed(outputs):
        if not (isinstance(o, torch.Tensor) and o.dim() >= 2 and o.shape[0] == B and o.shape[-1] == C):
            return None
        part = o.detach().double().reshape(B, -1, C).sum(1)
        total = part if total is None else total + part
        run.append(mod)
        if _scale_of(out, total) is not None:
            return list(dict.fromkeys(reversed(run)))
    return None


def _locate(model: nn.Module, spec: ParamSpec, layer: nn.Linear) -> tuple[int, int | None] | str:
    """The offsets of ``layer``'s weight and bias in ``θ``, or why its rows cannot be drawn."""
    owners = sum(p is layer.weight for m in model.modules() for p in m._parameters.values())
    if owners > 1:  # a tied head (an LM's embedding): its row is also an input, not this conditional's alone
        return "the output layer's weight is shared with another layer (tied)"
    offsets, at = {}, 0
    for name, numel in zip(spec.names, spec.numels):
        offsets[name] = at
        at += numel
    names = {id(p): n for n, p in model.named_parameters()}
    w = offsets.get(names.get(id(layer.weight), ""))
    b = None if layer.bias is None else offsets.get(names.get(id(layer.bias), ""))
    if w is None or (layer.bias is not None and b is None):
        # (stop 58's probe: a weight_norm head was reported as not trainable); the tensors named are those the
        # layer reads but does not hold as parameters (a parametrized bias alone was called a computed weight)
        computed = [
            t
            for t in ("weight", "bias")
            if parametrize.is_parametrized(layer, t)
            or (getattr(layer, t, None) is not None and not isinstance(layer._parameters.get(t), torch.Tensor))
        ]
        if computed:
            return (
                f"the output layer's {' and '.join(computed)} {'is' if len(computed) == 1 else 'are'} computed by a "
                "parametrization (weight_norm, spectral_norm, parametrize.register_parametrization), so its rows are "
                "not parameters this draw can sample"
            )
        return "the output layer's parameters are not all trainable"
    return w, b


def _linear_calls(
    model: nn.Module, spec: ParamSpec, theta: torch.Tensor, x: torch.Tensor
) -> tuple[list[tuple[nn.Linear, Any]], Any]:
    """Every ``nn.Linear`` call's module and output in ``model(x)`` at ``θ``, in order, and ``model(x)`` (a
    ``Categorical``'s logits)."""
    outputs: list[tuple[nn.Linear, Any]] = []
    handles = [
        m.register_forward_hook(lambda mod, _i, out: outputs.append((mod, out)))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        with torch.no_grad():
            out = functional_call(model, spec.unflatten(theta), (x,))
    finally:
        for h in handles:
            h.remove()
    if isinstance(out, torch.distributions.Categorical):  # its logits: the last linear output, shifted per row
        out = out.logits
    return outputs, out


def output_rows(model: nn.Module, spec: ParamSpec, theta: torch.Tensor, x: torch.Tensor) -> OutputRows | str:
    """The ``nn.Linear`` whose output *is* ``model(x)`` (the logits), or the last one whose output ``model(x)``
    shifts by a constant per row (an ``nn.LogSoftmax`` head: the same softmax), located in the flat vector; else the
    heads whose outputs, summed over their last calls and positions and scaled, are ``model(x)`` up to a per-row
    shift (:class:`OutputRows` ``pooled``: heads averaged, a head mean-pooled over tokens, logits times a constant),
    the logits linear in the heads' rows (:func:`_linear_in_rows`); or why there is none (the logits come from
    another operation, the layer's parameters are not trainable, ...)."""
    outputs, out = _linear_calls(model, spec, theta, x[:2])
    layer = next((mod for mod, o in outputs if o is out and isinstance(o, torch.Tensor)), None)
    if layer is None and isinstance(out, torch.Tensor) and outputs:
        # the forms below are read at parameters moved at random: where heads coincide (copies of one head, heads
        # initialised alike) the last one's output alone equals their mean, and its row alone was taken for the
        # logits' (the same moves at every call: no generator of the caller's is read)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(theta.shape, generator=g, dtype=torch.float64).to(theta.device, theta.dtype)
        theta = theta + 0.1 * (1 + theta.abs()) * noise
        outputs, out = _linear_calls(model, spec, theta, x[:2])
    if layer is None and isinstance(out, torch.Tensor) and outputs:
        # model(x) = log_softmax(Linear(φ)) (an nn.LogSoftmax head for nll_loss), or any other per-row shift of the
        # last linear layer's output: the same softmax, so the same conditional, with that output as the logits
        mod, o = outputs[-1]
        if isinstance(o, torch.Tensor) and o.shape == out.shape and out.dim() == 2 and out.shape[1] > 1:
            shift = (out.double() - o.double()).detach()
            size = 1 + float(o.double().abs().max()) + float(out.double().abs().max())
            tol = 1e3 * torch.finfo(out.dtype).eps * size
            if bool(torch.isfinite(shift).all()) and float((shift - shift[:, :1]).abs().max()) <= tol:
                layer = mod
    pooled: list[nn.Linear] | None = None
    if layer is None:
        # model(x) = α Σ of Linear outputs (heads averaged, one head's positions mean-pooled, a fixed scale), up to a
        # per-row shift: one linear map of the heads' rows, the plain conditional on the pooled features
        pooled = _pooled_heads(outputs, out)
        if pooled is None:
            return (
                "the logits are not the output of an nn.Linear (model(x) is computed after its last linear layer, "
                "and is no fixed multiple of a sum of its last linear layers' outputs up to a per-row shift)"
            )
    heads = []
    for mod in pooled or [layer]:
        at = _locate(model, spec, mod)
        if isinstance(at, str):
            return at
        heads.append((mod, *at))
    if pooled is None:
        return OutputRows(*heads[0])
    rows = OutputRows(*heads[0], more=tuple(heads[1:]), pooled=True)
    why = _linear_in_rows(model, spec, rows, theta, x[:2])
    return rows if why is None else why


def _linear_in_rows(
    model: nn.Module, spec: ParamSpec, rows: OutputRows, theta: torch.Tensor, x: torch.Tensor
) -> str | None:
    """Why ``model(x)`` is not, up to a per-row shift, ``z_ic = φ̃_i·v_c`` for the features ``φ̃`` (with ``α``) read at
    ``θ`` and the heads' rows ``v_c`` moved at random (every label's, every head's), or ``None``. The pooled form is
    read at one point; a head whose input is another head's output (``a(h) + b(a(h))``) or a multiple computed from
    the heads' own weights (``fc(h) / ‖W‖``) matched it there, and their rows were drawn from a conditional that is not
    the model's (the review of stop 64: 7 and 12 nats off at a row moved by N(0, I))."""
    C, n = rows.module.out_features, x.shape[0]
    phi = torch.zeros(rows.width, n, dtype=torch.float64)
    logits = torch.empty(n, C, dtype=torch.float64)
    why = _features(model, spec, rows, theta, x, phi, logits)
    if why is not None:
        return why
    index = torch.stack([rows.index(c) for c in range(C)])  # [C, d]: every label's row over every head
    at = index.flatten().to(theta.device)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(at.numel(), generator=g, dtype=torch.float64).to(theta.device)
    moved = theta.clone()
    moved[at] = (theta[at].double() + (1 + theta[at].double().abs()) * noise).to(theta.dtype)
    _, out = _linear_calls(model, spec, moved, x)
    want = phi.T @ moved[index.to(theta.device)].double().cpu().T  # [n, C]
    if not (isinstance(out, torch.Tensor) and out.shape == (n, C) and _scale_of(out.cpu(), want, 1.0) is not None):
        return (
            "the logits are not linear in the output heads' rows (a head's input or the logits' multiple moves "
            "with them: a head on another head's output, a scale computed from the heads' weights)"
        )
    return None


def _features(
    model: nn.Module,
    spec: ParamSpec,
    rows: OutputRows,
    theta: torch.Tensor,
    x: torch.Tensor,
    phi: torch.Tensor,
    logits: torch.Tensor,
) -> str | None:
    """Write the output layer's inputs ``φ̃`` (with a row of ones for the bias) into ``phi`` (``[d, n]``: a row per
    input, the layout the chains read fastest) and its outputs, the logits, into ``logits`` (``[n, C]``), both
    float64, on every row of ``x`` at ``θ`` (pooled heads: :func:`_pooled_features`, which may say why not)."""
    if rows.pooled:
        return _pooled_features(model, spec.unflatten(theta), rows, x, phi, logits)
    at = [0]

    def keep(_m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        k = inp[0].shape[0]
        phi[: rows.module.in_features, at[0] : at[0] + k] = inp[0].detach().flatten(1).T
        logits[at[0] : at[0] + k] = out.detach()
        at[0] += k

    handle = rows.module.register_forward_hook(keep)
    try:
        params = spec.unflatten(theta)
        with torch.no_grad():
            for i in range(0, x.shape[0], RESAMPLE_ROWS):
                functional_call(model, params, (x[i : i + RESAMPLE_ROWS],))
    finally:
        handle.remove()
    if rows.bias is not None:
        phi[-1] = 1.0
    return None


def _pooled_features(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    rows: OutputRows,
    x: torch.Tensor,
    phi: torch.Tensor,
    logits: torch.Tensor,
) -> str | None:
    """:func:`_features` for pooled heads (:class:`OutputRows` ``pooled``): each head's inputs summed over its calls
    and positions, with their count for the bias, times ``α`` (``[d, n]``, head after head), and ``α`` times the
    heads' outputs summed so (``[n, C]``), where ``model(x)`` is that up to a per-row shift on every row, ``α``
    measured on the first rows; else why not (nothing is written then that the caller keeps)."""
    heads = {id(m): k for k, (m, _, _) in enumerate(rows.heads)}
    starts = [0]
    for m, _, b in rows.heads:
        starts.append(starts[-1] + m.in_features + (b is not None))
    C = logits.shape[1]
    acc: dict[str, Any] = {}

    def keep(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        k, h = acc["rows"], inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
        if h is None or h.shape[0] != k or out.shape[0] != k or out.shape[-1] != C:
            acc["bad"] = True
            return
        j, start = heads[id(mod)], starts[heads[id(mod)]]
        # summed in float64 as read (no float64 copy of a call's [k, T, h] inputs)
        h = h.detach().reshape(k, -1, mod.in_features)
        acc["phi"][start : start + mod.in_features] += h.sum(1, dtype=torch.float64).T
        if rows.heads[j][2] is not None:
            acc["phi"][starts[j + 1] - 1] += h.shape[1]
        acc["total"] += out.detach().reshape(k, -1, C).sum(1, dtype=torch.float64)

    handles = [m.register_forward_hook(keep) for m, _, _ in rows.heads]
    alpha = None
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], RESAMPLE_ROWS):
                k = min(RESAMPLE_ROWS, x.shape[0] - i)
                acc.update(rows=k, bad=False, phi=phi[:, i : i + k], total=logits[i : i + k])
                acc["phi"].zero_()
                acc["total"].zero_()
                out = functional_call(model, params, (x[i : i + k],))
                if isinstance(out, torch.distributions.Categorical):
                    out = out.logits
                if acc["bad"] or not isinstance(out, torch.Tensor) or out.shape != (k, C):
                    return "an output head is called on inputs whose first dimension is not the rows'"
                if alpha is None:
                    alpha = _scale_of(out, acc["total"])
                if alpha is None or _scale_of(out, acc["total"], alpha) is None:
                    return (
                        "the logits are no fixed multiple of the sum of the output heads' outputs at every sample and "
                        "row (up to a per-row shift)"
                    )
    finally:
        for h in handles:
            h.remove()
    phi *= alpha
    logits *= alpha
    return None


class _BlockPrior:
    """``−log p(θ)`` as a function of one output row ``v``, the rest of ``θ`` fixed. Where the prior is Gaussian
    along the row with independent entries (its diagonal Hessian ``P`` there, measured once, predicts its gradient
    at the sample's own row and at a random point to float tolerance) it is the quadratic ``½vᵀPv − bᵀv``;
    otherwise ``log_prior`` is called, through autograd, at every evaluation."""

    def __init__(self, lp_f: Callable[[torch.Tensor], torch.Tensor], index: torch.Tensor) -> None:
        self.lp_f, self.index = lp_f, index
        self.P: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.theta: torch.Tensor | None = None
        self.batched = True  # until log_prior is found not to run under torch.func.vmap

    def exact_at(self, theta: torch.Tensor, v: torch.Tensor) -> tuple[float, torch.Tensor]:
        """``−log p`` and its gradient along the row at ``θ`` with the row set to ``v``, through ``log_prior``."""
        with torch.enable_grad():
            vv = v.detach().clone().requires_grad_(True)
            u = -self.lp_f(theta.index_put((self.index,), vv.to(theta.dtype)))
            (g,) = torch.autograd.grad(u, vv)
        return float(u.detach()), g.double()

    def exact(self, v: torch.Tensor) -> tuple[float, torch.Tensor]:
        """:meth:`exact_at` the sample :meth:`prepare` was given."""
        return self.exact_at(self.theta, v)

    def _fits(self, v: torch.Tensor) -> bool:
        _, g = self.exact(v)
        return self._agrees(g, v)

    def _agrees(self, g: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether the gradient ``g`` at the row ``v`` is the quadratic's, to ``1e-4`` of its size."""
        want = self.P @ v - self.b
        return float((g - want).norm()) <= 1e-4 * (float(g.norm()) + float((self.P @ v).norm()) + 1e-12)

    def fits_own_rows(self, thetas: torch.Tensor) -> list[bool] | None:
        """Whether the quadratic fits the prior at each sample's own row (``thetas``: ``[B, D]``): the check
        :meth:`prepare` makes first, its ``B`` values in one ``torch.func.vmap``-ed call and their gradients in one
        backward pass (one ``log_prior`` gradient a sample took 1 ms: 0.2 of the digits BNN's 3.3 CPU s draw, stop
        60); ``None`` without a quadratic, or where ``log_prior`` does not run under ``vmap`` (random numbers,
        ``.item()``, data-dependent branches: then :meth:`prepare` checks one sample at a time, as before)."""
        if self.P is None or not self.batched:
            return None
        if thetas.shape[0] == 0:  # (vmap over no samples raises)
            return []
        rows = thetas.detach()[:, self.index].double()

        def u_at(theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return -self.lp_f(theta.index_put((self.index,), v.to(theta.dtype)))

        # a few copies of θ per sample (the row put in, log_prior's terms, their gradient): samples at a time up to
        # RESAMPLE_CHUNK_BYTES of them, so a large model's check holds about one sample's, as one at a time did.
        # The gradients by autograd through the vmapped values (the samples' terms are apart, so the sum's gradient
        # is each one's): torch.func.grad's first call imports torch._dynamo, 1.6 CPU s and 76 MiB once a process
        at_once = max(1, RESAMPLE_CHUNK_BYTES // (4 * thetas.shape[1] * thetas.element_size()))
        grads = []
        try:
            with torch.enable_grad():
                for i in range(0, thetas.shape[0], at_once):
                    v = rows[i : i + at_once].clone().requires_grad_(True)
                    u = torch.func.vmap(u_at)(thetas[i : i + at_once].detach(), v)
                    grads.append(torch.autograd.grad(u.sum(), v)[0].double())
        except Exception:  # whatever log_prior raised under vmap: the one-sample checks make their own calls
            self.batched = False
            return None
        g = torch.cat(grads)
        return [self._agrees(g[j], rows[j]) for j in range(rows.shape[0])]

    def prepare(self, theta: torch.Tensor, gen: torch.Generator) -> None:
        """For the sample ``θ``: keep the quadratic if it still fits there, else measure it again (or give it up).

        The Hessian is measured as a diagonal, from the gradient at the row and at the row moved along a random ±1
        direction (exact for a prior that is Gaussian and independent across the row's entries, the usual
        ``N(0, σ²)`` per parameter; two gradients, no ``d × D`` Jacobian); a prior it does not fit at a random point
        near the row, at the row's mirror image ``−v`` and eight times further out on the other side (a Laplace
        term's kink at 0 lies between) is evaluated through ``log_prior`` instead."""
        self.theta = theta.detach()
        v0 = theta[self.index].double()
        if self.P is not None and self._fits(v0):
            return
        scale = max(float(v0.abs().mean()), 1.0)
        sign = torch.randint(0, 2, v0.shape, generator=gen).double() * 2 - 1
        _, g0 = self.exact(v0)
        _, g1 = self.exact(v0 + scale * sign)
        self.P = torch.diag((g1 - g0) / scale * sign)
        self.b = self.P @ v0 - g0
        v1 = v0 + torch.randn(v0.shape, generator=gen, dtype=torch.float64) * scale
        # a prior quadratic only near the sample (a Laplace term beside a Gaussian one: the measurement and a nearby
        # point in one orthant fit it exactly) is tested across every entry's zero (-v0) and far out too: on rows of
        # d <= 4 entries those two points alone kept a wrong quadratic for 13-137 of 400 samples (stop 59's probe)
        far = v0 - 8 * (v1 - v0)  # (drawn from no generator: the chains' random numbers stay as they were)
        if not (
            bool(torch.isfinite(self.P).all())
            and bool((torch.diagonal(self.P) > 0).all())
            and all(self._fits(v) for v in (v1, -v0, far))
        ):
            self.P = self.b = None


class _ChunkPrior:
    """The row's prior at every sample of a chunk (``v``: ``[B, d]``): the quadratic ``½vᵀP_sv − b_sᵀv`` of the
    samples where :meth:`_BlockPrior.prepare` kept one (``P_s`` diagonal), ``log_prior`` at the others."""

    def __init__(self, prior: _BlockPrior, thetas: torch.Tensor, gens: Sequence[torch.Generator]) -> None:
        B, d = thetas.shape[0], prior.index.numel()
        self.prior, self.thetas = prior, thetas
        self.P = torch.zeros(B, d, dtype=torch.float64)
        self.b = torch.zeros(B, d, dtype=torch.float64)
        self.exact: list[int] = []  # the samples without a quadratic
        # the samples are checked a window at a time: the whole chunk first, then, after each measurement, 2 samples,
        # twice as many each time a window fits. Checking every later sample after each measurement took B²/2
        # evaluations where the quadratic changes at every sample (a hierarchical prior; 200 samples: 19,900, 2.2x the
        # draw's CPU time); a window's samples past a measurement are at most those checked since the one before
        fits: dict[int, bool] = {}
        P, window = prior.P, B
        for j in range(B):
            if j not in fits and prior.P is P:
                got = prior.fits_own_rows(thetas[j : j + window])
                fits, window = ({} if got is None else {j + k: f for k, f in enumerate(got)}), 2 * window
            if fits.get(j, False) and prior.P is P:  # what prepare would find, without its own call
                prior.theta = thetas[j].detach()
            else:
                prior.prepare(thetas[j], gens[j])
                if prior.P is not P:  # measured again (or given up): the later samples' checks are against it
                    fits, P, window = {}, prior.P, 2
            if prior.P is None:
                self.exact.append(j)
            else:
                self.P[j], self.b[j] = torch.diagonal(prior.P), prior.b

    def __call__(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``U_prior`` (``[B]``) and its gradient (``[B, d]``)."""
        Pv = self.P * v
        u, g = (0.5 * Pv - self.b).mul(v).sum(1), Pv - self.b
        for j in self.exact:
            u_j, g_j = self.prior.exact_at(self.thetas[j], v[j])
            u[j], g[j] = u_j, g_j
        return u, g

    def curvature(self, v: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """The prior's Hessian on the row at the samples ``which`` (``v``: their rows), as diagonals: exact for a
        Gaussian one; otherwise that of the quadratic about 0 with the same gradient, ``∇U_prior(v)/v`` (a
        preconditioner only: the Metropolis step corrects the rest)."""
        P = self.P[which]
        for k, j in enumerate(which.tolist()):
            if j in self.exact:
                _, g = self.prior.exact_at(self.thetas[j], v[k])
                vj = torch.where(v[k].abs() > 1e-12, v[k], torch.full_like(v[k], 1e-12))
                P[k] = (g / vj).clamp_min(1e-8)
        return P


class _Conditional:
    """``U_s(v) = −log p(θ_s with row c = v) + Σ_i [logsumexp(z_si) − z_{si,y_i}]``, its gradient and the softmax
    probability of label ``c`` on every row, ``z_sic = φ̃_si·v``, for the ``B`` samples ``s`` of a chunk at once
    (``v``: ``[B, d]``; ``phi``: ``[B, d, n]``). Only ``z_sic`` moves: the other labels' logits enter through their
    ``logsumexp``. ``weights``: a factor ``ω_i`` on each row's term (``cross_entropy(..., weight=w)``: ``ω_i =
    w[y_i]``), in the data term, its gradient and its Hessian alike."""

    w: torch.Tensor | None = None  # (the class's: an instance built without __init__ weighs every row 1)

    def __init__(
        self,
        prior: _ChunkPrior,
        phi: torch.Tensor,
        logits: torch.Tensor,
        y: torch.Tensor,
        c: int,
        weights: torch.Tensor | None = None,
    ) -> None:
        self.prior, self.phi = prior, phi
        self.w = weights  # [n] float64: each row's factor on its cross-entropy (class weights w[y_i]), or None: 1
        # [B, n]: logsumexp over the labels k ≠ c, a sample at a time with its column c masked in place (one
        # [n, C] temporary: a chunk's copy of the other labels' logits and logsumexp's temporary of it took 3× the
        # chunk's logits, beyond the memory plan)
        self.rest = torch.empty(logits.shape[:2], dtype=logits.dtype)
        for j in range(logits.shape[0]):
            col = logits[j, :, c].clone()
            logits[j, :, c] = -math.inf
            torch.logsumexp(logits[j], 1, out=self.rest[j])
            logits[j, :, c] = col
        self.fixed = logits.gather(2, y.expand(logits.shape[:2]).unsqueeze(2)).squeeze(2)  # z_{si,y_i}: y_i ≠ c

    def logits(self, v: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        """``z_sic = φ̃_si·v_s`` on every remaining row (``[len(v), n]``): one pass over the features, at every sample
        (``which=None``) or at the samples ``which`` (``v``: their rows; their features gathered when not most of
        them, the others' rows put at 0 otherwise: no copy of the features)."""
        B = self.phi.shape[0]
        if which is None or len(which) == B:
            return torch.bmm(v.unsqueeze(1), self.phi).squeeze(1)
        if 2 * len(which) >= B:
            at = torch.zeros(B, v.shape[1], dtype=v.dtype)
            at[which] = v
            return torch.bmm(at.unsqueeze(1), self.phi).squeeze(1)[which]
        return torch.bmm(v.unsqueeze(1), self.phi[which]).squeeze(1)

    def data_of(self, z: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        """The data term ``Σ_i [logsumexp(z_si) − z_{si,y_i}]`` (no prior) of the label's logits ``z`` (``[len(z), n]``,
        at every sample or at the samples ``which``): no pass over the features."""
        rest, fixed = (self.rest, self.fixed) if which is None else (self.rest[which], self.fixed[which])
        if z.dim() == 3:  # [len(z), k, n]: k points per sample
            rest, fixed = rest.unsqueeze(1), fixed.unsqueeze(1)
        if self.w is not None:
            return ((torch.logaddexp(rest, z) - fixed) * self.w).sum(-1)
        return (torch.logaddexp(rest, z) - fixed).sum(-1)

    def __call__(
        self, v: torch.Tensor, z: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``U(v)`` (``[B]``), ``∇U(v)`` (``[B, d]``) and ``p_sic`` (``[B, n]``); ``z``: the label's logits at ``v``
        where already known (:meth:`logits`; then one pass over the features, the gradient's, instead of two)."""
        z = self.logits(v) if z is None else z
        lse = torch.logaddexp(self.rest, z)
        p = torch.exp(z - lse)
        u_prior, g_prior = self.prior(v)
        if self.w is not None:
            data, pw = ((lse - self.fixed) * self.w).sum(1), p * self.w
            return data + u_prior, torch.bmm(pw.unsqueeze(1), self.phi.mT).squeeze(1) + g_prior, p
        return (lse - self.fixed).sum(1) + u_prior, torch.bmm(p.unsqueeze(1), self.phi.mT).squeeze(1) + g_prior, p

    def hessian(
        self, v: torch.Tensor, p: torch.Tensor, which: torch.Tensor, single: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``Σ_i ω_i p_sic(1 − p_sic) φ̃_si φ̃_siᵀ`` plus the prior's curvature at the samples ``which`` (``v``, ``p``:
        theirs; ``[len(which), d, d]``, float64). ``single``: the features in float32 (``[len(which), d, n]``), the
        data term's sum taken in float32 (a Newton step's curvature only: the mode is where the float64 gradient
        vanishes whatever the curvature that led there)."""
        curv = p * (1 - p) if self.w is None else p * (1 - p) * self.w
        if single is not None:
            w = curv.float().unsqueeze(1)
            H = torch.bmm(single * w, single.mT).double()
            H = 0.5 * (H + H.mT)
        else:
            phi = self.phi if len(which) == self.phi.shape[0] else self.phi[which]
            H = torch.bmm(phi * curv.unsqueeze(1), phi.mT)
        return H + torch.diag_embed(self.prior.curvature(v, which))


def _mode(
    cond: _Conditional, v0: torch.Tensor, single: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Newton to each sample's mode from ``v0`` (``[B, d]``): the steps of all samples solved at once, each halved
    until its own ``U`` falls (30 halvings at most; a sample that cannot fall, or whose step is below ``1e-8`` of
    its row, stops there); 50 steps at most. Returns the modes and ``U``, ``∇U``, ``p`` there.

    The steps' curvature sums the data term in float32 (the draw's main cost, the ``d × d`` sum over the rows, in
    less than half the time; ``U`` and ``∇U``, hence the mode, stay float64) until a sample's step is small, cannot
    make ``U`` fall or its float32 curvature is singular; it then goes on with the float64 curvature, and only a
    float64 step stops it (the mode to Newton's accuracy, as with float64 steps throughout, but for the cap of 50
    steps; ``single=False``: those throughout)."""
    v = v0.clone()
    u, g, p = cond(v)
    B = v.shape[0]
    active = torch.ones(B, dtype=torch.bool)
    exact = torch.full((B,), not single)  # the samples on the float64 curvature
    # (with its weighted copy: the float64 one's memory, which the plan counts)
    phi32 = cond.phi.float() if single else cond.phi
    for _ in range(50):
        step = torch.zeros_like(v)  # the Hessian and solve of the samples still moving only
        fast = torch.nonzero(active & ~exact).squeeze(1)
        if len(fast):
            H = cond.hessian(v[fast], p[fast], fast, phi32 if len(fast) == B else phi32[fast])
            s32, info = torch.linalg.solve_ex(H, g[fast])
            # a float32 curvature that is singular (features of a float64 model that coincide in float32 under a
            # weak prior: the batched solve raised for the whole chunk) takes its step with float64's, below
            bad = info != 0
            step[fast] = torch.where(bad[:, None], 0.0, s32)
            exact[fast[bad]] = True
        for j in torch.nonzero(active & exact).squeeze(1).tolist():  # one at a time: one float64 weighted copy
            at = torch.tensor([j])
            step[j] = torch.linalg.solve(cond.hessian(v[at], p[at], at)[0], g[j])
        pending = active.clone()
        for _ in range(30):
            u_new, g_new, p_new = cond(v - step)
            ok = pending & (u_new <= u)
            if bool(ok.any()):
                v = torch.where(ok[:, None], v - step, v)
                u, g, p = (
                    torch.where(ok, u_new, u),
                    torch.where(ok[:, None], g_new, g),
                    torch.where(ok[:, None], p_new, p),
                )
                small = ok & (step.norm(dim=1) <= 1e-8 * v.norm(dim=1).clamp_min(1.0))
                active &= ~(small & exact)
                exact |= small  # a float32 curvature's small step is followed by a float64 one: Newton's accuracy
                pending &= ~ok
            if not bool(pending.any()):
                break
            step = torch.where(pending[:, None], 0.5 * step, step)
        # U did not fall in 30 halvings: a float32 curvature's sample tries again with float64's; a float64 one's
        # mode is where it is
        active &= ~(pending & exact)
        exact |= pending
        if not bool(active.any()):
            break
    return v, u, g, p


def _slice_step(
    cond: _Conditional,
    v: torch.Tensor,
    u: torch.Tensor,
    z: torch.Tensor,
    z_m: torch.Tensor,
    gauss: torch.Tensor,
    xi: torch.Tensor,
    r: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One elliptical slice sampling step (Murray, Adams & MacKay 2010) at the samples ``gauss`` (those whose prior
    on the row is the Gaussian ``N(m, P⁻¹)``, ``m = P⁻¹b``; the others stay): the ellipse through the current row
    and a prior draw ``m + P^(−½)ξ`` (``xi``: ``[B, d]``), a level below the current likelihood (``r[:, 0]``), an
    angle uniform on the ellipse (``r[:, 1]``), its bracket shrunk toward 0 at each angle below the level (the next
    angles from ``r[:, 2:]``: ``r.shape[1] − 1`` angles in all; after them the sample stays where it is, which
    leaves the conditional invariant as the unbounded loop does: the reverse path meets the same rejected angles).
    Exact for any likelihood: its moves are prior-wide, the conditional's scale along the directions only the prior
    bounds. ``z``, ``z_m``: the label's logits at the rows and at ``m`` (:meth:`_Conditional.logits`); the logits on
    the ellipse are ``z_m + (z − z_m) cos α + z_ν sin α``, so a step makes one pass over the features (``z_ν``)
    whatever the angles it tries (stop 61: each angle took one). Returns the rows, ``U`` and the logits there, and
    which samples moved."""
    P, b = cond.prior.P, cond.prior.b
    m, sd = b / P.clamp_min(1e-300), P.clamp_min(1e-300).rsqrt()
    x, nu = v - m, sd * xi
    data = u - ((0.5 * P * v - b) * v).sum(1)  # the current data term (U less the prior's quadratic)
    level = data - torch.log(r[:, 0] + 1e-300)  # accept where the data term is below it
    # the angles a sample tries, each after all before it were rejected: fixed by its random numbers, so known
    # before any is tried (the first uniform on the ellipse, its bracket [α − 2π, α] shrunk toward 0 after each)
    tries = r.shape[1] - 1
    angles = torch.empty(r.shape[0], tries, dtype=r.dtype)
    angle = 2 * math.pi * r[:, 1]
    lo, hi = angle - 2 * math.pi, angle.clone()
    for k in range(tries):
        angles[:, k] = angle
        if k + 1 < tries:
            left = angle < 0
            lo, hi = torch.where(left, angle, lo), torch.where(left, hi, angle)
            angle = lo + (hi - lo) * r[:, k + 2]
    moved = gauss & torch.isfinite(data)  # (the samples that may move; those that do, below)
    v, u, z = v.clone(), u.clone(), z.clone()
    which = torch.nonzero(moved).squeeze(1)
    moved[:] = False
    if not len(which):
        return v, u, z, moved
    z_x, z_nu = (z - z_m)[which], cond.logits(nu[which], which)  # [len(which), n]: the ellipse's logits
    # the first angle, then the others at once where it was rejected (a slice step took 6.5 passes of the angle
    # loop on the digits BNN's chunks of 13 where a sample tried 3.5 angles: the loop's per-angle overhead)
    for first, last in ((0, 1), (1, tries)):
        at = torch.arange(len(which))
        if first:
            at = at[~moved[which]]
        if not len(at) or first >= last:
            break
        k = which[at]
        c, s = torch.cos(angles[k, first:last]).unsqueeze(2), torch.sin(angles[k, first:last]).unsqueeze(2)
        z_p = z_m[k].unsqueeze(1) + z_x[at].unsqueeze(1) * c + z_nu[at].unsqueeze(1) * s  # [len(k), angles, n]
        d_p = cond.data_of(z_p, k)
        ok = torch.isfinite(d_p) & (d_p < level[k].unsqueeze(1))
        hit = ok.any(1)
        j = ok.to(torch.int8).argmax(1)[hit]  # the first angle below the level
        k, rows = k[hit], torch.arange(len(j))
        c, s = c[hit][rows, j], s[hit][rows, j]
        prop = m[k] + x[k] * c + nu[k] * s
        v[k], z[k] = prop, z_p[hit][rows, j]
        u[k] = d_p[hit][rows, j] + ((0.5 * P[k] * prop - b[k]) * prop).sum(1)
        moved[k] = True
    return v, u, z, moved


def _draw(
    cond: _Conditional,
    v0: torch.Tensor,
    steps: int,
    gens: Sequence[torch.Generator],
    eps: torch.Tensor,
    warm: int | None = None,
    slices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One draw from the conditional per sample of the chunk (``v0``: ``[B, d]``): :func:`_mode`, then ``steps``
    steps with the samples' generators ``gens``: preconditioned MALA with the step sizes ``eps`` (``[B]``), adapted
    during the first ``warm`` steps (a fifth by default); after them, at the samples whose prior on the row is
    Gaussian, elliptical slice steps (:func:`_slice_step`) but for every ``RESAMPLE_MALA_EVERY``-th step, MALA's
    (``slices=False``: MALA throughout, the draw until stop 60). Returns the draws, each sample's MALA acceptance
    rate after the warm-up, and the step size each warm-up ended at."""
    B, d = v0.shape
    v, u, g, p = _mode(cond, v0)
    H = cond.hessian(v, p, torch.arange(B))
    L = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)))  # C = H⁻¹ = L Lᵀ
    noise = torch.stack([torch.randn(steps, d, generator=gen, dtype=torch.float64) for gen in gens], 1)  # [T, B, d]
    uniform = torch.stack([torch.rand(steps, generator=gen, dtype=torch.float64) for gen in gens], 1)  # [T, B]
    warm = steps // 5 if warm is None else warm
    gauss = torch.ones(B, dtype=torch.bool)
    gauss[cond.prior.exact] = False
    every = RESAMPLE_MALA_EVERY
    sliced = [slices and bool(gauss.any()) and t >= warm and (t - warm) % every != every - 1 for t in range(steps)]
    eps = eps.clone()
    accepted, mala_steps = torch.zeros(B), torch.zeros(B)

    def Lt(w: torch.Tensor) -> torch.Tensor:
        return (L.mT @ w.unsqueeze(2)).squeeze(2)

    # With C = H⁻¹ = LLᵀ and a = Lᵀ∇U: the proposal v − ½ε²C∇U(v) + εLξ is v + εL(ξ − ½εa), and the proposal
    # densities' log ratio, −½|r_b|²_H/ε² + ½|r_f|²_H/ε² (r_f = εLξ forward, r_b = −εLξ + ½ε²L(a + a′) back), is
    # ½εξᵀ(a + a′) − ⅛ε²|a + a′|²: two triangular products a step (L·, Lᵀ∇U′) where it took five d × d ones
    a = Lt(g)
    stale = torch.zeros(B, dtype=torch.bool)  # rows a slice step moved since their gradient
    # the label's logits at the rows, and at the slice steps' ellipse centres m = P⁻¹b (the prior's mean, fixed):
    # kept as the rows move, so a slice step makes one pass over the features and the gradient after it one
    z = cond.logits(v)
    z_m = cond.logits(cond.prior.b / cond.prior.P.clamp_min(1e-300)) if any(sliced) else None
    for t in range(steps):
        mala = torch.ones(B, dtype=torch.bool)  # the samples this step moves by MALA
        if sliced[t]:
            # each slice step's random numbers drawn as it comes (after the chains': those stay as they were; the
            # memory plan's as before), from each sample's own generator
            xi = torch.stack([torch.randn(d, generator=gen, dtype=torch.float64) for gen in gens])
            r = torch.stack([torch.rand(1 + RESAMPLE_SLICE_TRIES, generator=gen, dtype=torch.float64) for gen in gens])
            v, u, z, moved = _slice_step(cond, v, u, z, z_m, gauss, xi, r)
            stale |= moved
            mala = ~gauss
            if not bool(mala.any()):
                continue
        elif bool(stale.any()):  # the MALA drift at the rows slice steps moved (a gradient, no slice step needs it)
            _, g_new, _ = cond(v, z)
            a = torch.where(stale[:, None], Lt(g_new), a)
            stale[:] = False
        e = eps[:, None]
        prop = v + e * (L @ (noise[t] - 0.5 * e * a).unsqueeze(2)).squeeze(2)
        z_p = cond.logits(prop)
        u_p, g_p, _ = cond(prop, z_p)
        a_p = Lt(g_p)
        m = a + a_p
        log_a = -(u_p - u) + 0.5 * eps * (noise[t] * m).sum(1) - 0.125 * eps**2 * (m * m).sum(1)
        ok = mala & torch.isfinite(log_a) & (torch.log(uniform[t] + 1e-300) < log_a)
        v, u, z = torch.where(ok[:, None], prop, v), torch.where(ok, u_p, u), torch.where(ok[:, None], z_p, z)
        a = torch.where(ok[:, None], a_p, a)
        if t >= warm:
            accepted += ok
            mala_steps += mala
        else:  # toward an acceptance rate of about 0.57 (1.1 up, 0.87 down)
            eps = eps * torch.where(ok, 1.1, 0.87)
    return v, accepted / mala_steps.clamp_min(1), eps


def resample_label_rows(
    model: nn.Module,
    spec: ParamSpec,
    lp_f: Callable[[torch.Tensor], torch.Tensor],
    thetas: torch.Tensor,
    remaining: Batch,
    labels: Sequence[int],
    gen: torch.Generator,
    steps: int = RESAMPLE_STEPS,
    max_bytes: float = math.inf,
    plan: Callable[[int], None] | None = None,
    chunk: int | None = None,
    weights: torch.Tensor | None = None,
    max_row_evals: int = RESAMPLE_MAX_ROW_EVALS,
) -> tuple[torch.Tensor, dict[str, Any]] | str:
    """Each of ``thetas`` (``[S, D]``) with the output-layer rows of ``labels`` drawn from their conditional given
    the rest of it and the ``remaining`` rows (module docstring); or why it cannot be done.

    ``max_bytes``: the memory the features may hold (refused above one sample's, before any work; as many samples
    at once as fit, at most ``RESAMPLE_CHUNK_BYTES`` of features, or ``chunk``); ``plan`` is told the bytes they
    hold once they fit. The draws do not depend on the chunk. ``weights``: each remaining row's factor on its
    cross-entropy (``[n]``: a class-weighted one's ``w[y_i]``, :func:`~.kronecker.row_weights`), in the conditional
    and the NLL measured. ``max_row_evals``: samples × remaining rows it may read (refused above, before any work).

    Returns:
        The new ``[S, D]`` samples, and what was measured: the acceptance rate, the remaining rows' mean NLL over the
        samples before and after, the mean ``|NLL|`` and the rows' standard deviation of it before (averaged over the
        samples: the safety net's unit is :func:`~.step.unit_of` of the two), the seconds.
    """
    x, y = remaining[0], remaining[1].long()
    w = None if weights is None else torch.as_tensor(weights).double().expand(y.shape[0])
    if bool((y < 0).any()):  # cross_entropy's ignore_index rows carry no label: no term of the conditional (their
        # label -100 was gathered and crashed the draw; stop 47's probe)
        x, y, w = x[y >= 0], y[y >= 0], None if w is None else w[y >= 0]
    if w is not None and not (bool(torch.isfinite(w).all()) and bool((w >= 0).all())):
        return "the rows' weights on the cross-entropy are not all finite and non-negative"
    if bool((y.unsqueeze(1) == torch.tensor(list(labels)).unsqueeze(0)).any()):
        return "a remaining row carries the label"
    if x.shape[0] == 0:  # (it raised: torch.cat of no features, then a division by zero sizing the chunk)
        return "no remaining row has a label (none left, or only ignore_index ones): no NLL to check the draw against"
    if thetas.shape[0] * x.shape[0] > max_row_evals:
        return (
            f"{thetas.shape[0]} samples × {x.shape[0]:,} remaining rows is more than the "
            f"{max_row_evals:,} row evaluations it may take (emptied_max_row_evals; raise it to draw the row: "
            "one forward pass of the model per sample over the remaining rows)"
        )
    rows = output_rows(model, spec, thetas[0], x)
    if isinstance(rows, str):
        return rows
    S, n, C, d = thetas.shape[0], x.shape[0], rows.module.out_features, rows.width
    # per sample of a chunk, float64: its features and the Hessian's weighted copy of them, its logits, eight
    # [n] working vectors (the other labels' logsumexp, z_{i,y_i}, z_ic, its logsumexp, p, and a trial's), four the
    # slice steps keep (z_ic at the row, at the prior's mean, along the ellipse's two axes) and three per angle they
    # try at once beyond the first (its logits, their logsumexp, less z_{i,y_i}), and its chain's random numbers;
    # beside them, one sample's float64 [n, C] temporaries (logsumexp's over the other labels, the cross-entropy's
    # log-probabilities: a sample at a time) and hooked features (counted in the model's dtype until stop 58: a
    # float32 model's draw peaked 1.27x its plan)
    per = 8 * (n * (2 * d + C + 12 + 3 * (RESAMPLE_SLICE_TRIES - 1)) + steps * (d + 1))
    reserve = 8 * n * (d + C)
    if reserve + per > max_bytes:
        return f"its features on the {n:,} remaining rows ({(reserve + per) / 2**20:.0f} MB) exceed the memory budget"
    if chunk is None:
        cap = max(1, RESAMPLE_CHUNK_BYTES // (8 * n * d))
        chunk = min(cap, int(max(1, (max_bytes - reserve) // per)) if math.isfinite(max_bytes) else cap)
    chunk = max(1, min(chunk, S))
    if plan is not None:
        plan(reserve + chunk * per)
    t0 = time.perf_counter()
    out = thetas.clone()
    # a generator per sample and label, and one per label for the step size's tuning run
    seeds = torch.randint(0, 2**62, (S + 1, len(labels)), generator=gen).tolist()
    priors = {c: _BlockPrior(lp_f, rows.index(c)) for c in labels}
    nll = torch.zeros(4, S, dtype=torch.float64)  # per sample: mean NLL before, after, mean |NLL|, its spread
    acc = torch.zeros(S, len(labels), dtype=torch.float64)
    eps0 = {c: torch.tensor([1.4 * d ** (-1 / 6)], dtype=torch.float64) for c in labels}
    # the first sample alone: a tuning run on its conditional (every step adapts the step size; its draw is
    # dropped) gives every sample's chain its start
    for lo, hi in [(0, 1), *((a, min(a + chunk, S)) for a in range(1, S, chunk))]:
        B = hi - lo
        phi = torch.zeros(B, d, n, dtype=torch.float64)
        logits = torch.empty(B, n, C, dtype=torch.float64)
        for j in range(B):
            why = _features(model, spec, rows, thetas[lo + j], x, phi[j], logits[j])
            if why is not None:
                return why
        nll[[0, 2, 3], lo:hi] = _nll_stats(logits, y, w)
        for k, c in enumerate(labels):
            index = rows.index(c)
            gens = [torch.Generator().manual_seed(seeds[lo + j][k]) for j in range(B)]
            cond = _Conditional(_ChunkPrior(priors[c], out[lo:hi], gens), phi, logits, y, c, w)
            v0 = out[lo:hi, index].double()
            if lo == 0:
                tune = [torch.Generator().manual_seed(seeds[S][k])]
                eps0[c] = _draw(cond, v0, steps, tune, eps0[c], warm=steps)[2]
            v, acc[lo:hi, k], _ = _draw(cond, v0, steps, gens, eps0[c].expand(B))
            out[lo:hi, index] = v.to(out.dtype)
            logits[:, :, c] = torch.bmm(v.unsqueeze(1), phi).squeeze(1)
        nll[1, lo:hi] = _nll_stats(logits, y, w)[0]
        phi = logits = cond = None  # freed before the next chunk's: two chunks' features at once were beyond the plan
    before, after, size, spread = nll.mean(1).tolist()
    return out, {
        "acceptance": float(acc.mean()),
        "remaining_nll_before": before,
        "remaining_nll_after": after,
        "remaining_nll_abs": size,
        "remaining_nll_spread": spread,
        "seconds": time.perf_counter() - t0,
    }


def _nll_stats(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample of ``logits`` (``[B, n, C]``): the rows' mean NLL, mean ``|NLL|`` and standard deviation of the NLL
    (``[3, B]``); ``w``: each row's factor on its NLL."""
    B, n, _ = logits.shape
    # a sample at a time: cross_entropy's log-probabilities are an [n, C] temporary (the memory plan's reserve)
    h = (
        torch.stack([F.cross_entropy(logits[j], y, reduction="none") for j in range(B)])
        if B
        else logits.new_empty(0, n)
    )
    if w is not None:
        h = h * w
    spread = h.var(1, correction=0).sqrt() if n > 1 else torch.full((B,), math.nan, dtype=torch.float64)
    size = h.abs().mean(1) if n else torch.zeros(B, dtype=torch.float64)
    return torch.stack([h.mean(1), size, spread])
