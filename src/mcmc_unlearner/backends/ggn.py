"""Dense generalized Gauss-Newton curvature (``solver="ggn"``), for small networks whose weights are shared.

The remaining-data curvature is taken as

    H = P + (1/S) Σ_s (n/|B_s|) Σ_{r∈B_s} J_rᵀ Λ_r J_r,

``J_r = ∂z_r/∂θ`` the Jacobian of row ``r``'s network output ``z_r = model(x_r)`` at draw ``θ_s``, ``Λ_r`` the
Hessian of the per-row NLL in ``z`` (softmax covariance ``diag(p) − ppᵀ`` for the categorical likelihood,
``diag(p(1 − p))``, ``p = sigmoid(z)``, for a Bernoulli one (``binary_cross_entropy_with_logits``), ``I/σ²`` for a
Gaussian one, as :func:`~mcmc_unlearner.kronecker.detect_likelihood` finds them; for a Gaussian whose variance the
model learns, :func:`~mcmc_unlearner.kronecker.learned_variance`, its Fisher ``∇m∇mᵀ/v + ∇v∇vᵀ/(2v²)``) and ``P`` the
prior's Hessian ``−(1/S) Σ_s ∇²log p(θ_s)``, dense, its negative eigenvalues clamped to 0: the
generalized Gauss-Newton matrix (Schraudolph 2002; Martens, "New insights and perspectives on the natural
gradient method", JMLR 2020), the Hessian with the network linearised at each draw. It is positive
semi-definite, and it is what K-FAC approximates by Kronecker factors (``kfac``), here without that
approximation. Everything else — eigendecomposition, damped solves, downdates across requests, the Gaussian
transport of the bank — is :class:`~mcmc_unlearner.backends.dense.DenseBackend`'s.

Its cost is ``C`` backward passes per row (``C`` outputs, vmapped over rows) and a ``(rows·C) × D × D`` product,
where the dense Hessian takes ``D`` Hessian-vector products over every row. Where each parameter acts at many
positions (convolutions, recurrences) one Hessian column costs a whole network's worth of them: one request on a
954-parameter CNN took 278 s CPU with the dense Hessian, 4.4 s with this (``benchmarks/layer_zoo.py``). For other
likelihoods (``detect_likelihood`` says ``empirical``) it falls back to the exact dense Hessian and says so
(``ggn_curvature: "hessian"``, ``ggn_likelihood: None``, ``ggn_fallback``): no empirical Fisher is involved.
The likelihood is read on the removed rows and, when categorical, verified on a few remaining rows of each label
(read again there, or the fallback, where it does not hold). Rows labelled ``-100`` (``cross_entropy``'s
``ignore_index``) have no likelihood term: they enter no ``J_rᵀ Λ_r J_r`` but are counted in ``|B_s|``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.functional import jacobian
from torch.func import jacrev, vmap

from ..curvature import functionalize, load_forward_decompositions
from ..kronecker import (
    Likelihood,
    cross_entropy_misfit,
    detect_likelihood,
    field_rows,
    gaussian_in_targets,
    labelled,
    learned_variance,
    prior_precision,
    row_weights,
    rows_per_label,
    select_output,
)
from ..memory import chunk_for
from .base import Problem
from .dense import DenseBackend

__all__ = ["GGNBackend", "output_ggn", "output_ggn_draws"]


def output_ggn(
    model: torch.nn.Module,
    theta: torch.Tensor,
    x: torch.Tensor,
    likelihood: Likelihood,
    sigma: float = 1.0,
    budget: int = 2**28,
    link: dict[str, Any] | None = None,
    weights: torch.Tensor | None = None,
    plan: Callable[[int], None] | None = None,
    nll: Callable | None = None,
    targets: torch.Tensor | tuple | None = None,
) -> torch.Tensor:
    """``Σ_r w_r J_rᵀ Λ_r J_r`` over the rows of ``x`` at the flat trainable parameters ``theta`` (float64 ``[D, D]``).

    Args:
        model: The network; ``model(x)`` gives ``[R, C]`` logits (categorical), ``[R]``/``[R, K]`` logits of independent
            Bernoulli labels (Bernoulli) or ``[R, ...]`` means (Gaussian).
        theta: Flat trainable parameters (``ParamSpec`` order).
        x: Input rows ``[R, ...]``.
        likelihood: ``CATEGORICAL``, ``BERNOULLI`` or ``GAUSSIAN``.
        sigma: The Gaussian likelihood's noise standard deviation.
        budget: Bytes the per-row Jacobians of one chunk of rows may take.
        link: :func:`~mcmc_unlearner.kronecker.detect_likelihood`'s extras: ``z_r`` is the tensor
            :func:`~mcmc_unlearner.kronecker.select_output` takes from the output (one of a tuple/dict, over a
            temperature).
        weights: Per-row factors ``w_r`` on the loss (``[R]``; default 1).
        plan: Called with the bytes one chunk's Jacobians were planned at (its rows times ``3 · C · D`` items of
            ``theta``'s size), once the chunk is known (``report.info["memory"]["planned"]["ggn_jacobians"]``).
        nll: The user's ``nll``, for a Gaussian with a learned variance (``link["variance"] == "learned"``): ``Λ_r``
            is its Fisher ``∇m∇mᵀ/v + ∇v∇vᵀ/(2v²)`` in ``z_r`` (:func:`~mcmc_unlearner.kronecker.gaussian_in_targets`).
        targets: The rows' targets ``y`` for that ``nll`` call (their values do not enter ``Λ_r``), or every field of
            the batch after ``x`` (``batch[1:]``: an ``nll`` may read a third field, e.g. a per-row variance floor);
            each cut to a chunk's rows where it has ``x``'s rows. ``nll`` sees ``z_r`` in ``model(x)``'s shape.
    """
    link = link or {}
    # through functionalize's wrapper module: torch's functional_call refuses an nn.DataParallel at the top level
    f = functionalize(model, lambda m, r: select_output(m(r), link))

    def out(t: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        return f(t, row.unsqueeze(0)).reshape(-1)

    # the same one-row forward passes as ``out`` row by row, inside one functional call: the parameters are swapped
    # in once per chunk rather than once per row (stop 64: 0.2-0.5 ms a row, 9% of a digits CNN's request sequence)
    rows_out = functionalize(
        model, lambda m, xs: torch.stack([select_output(m(r.unsqueeze(0)), link).reshape(-1) for r in xs])
    )

    with torch.no_grad():
        C = out(theta, x[0]).numel()
    d = theta.numel()
    per_row = 3 * C * d * theta.element_size()
    rows = chunk_for(budget, per_row, x.shape[0])
    if plan is not None:
        plan(rows * per_row)
    G: torch.Tensor | None = None
    vectorise = True
    for i in range(0, x.shape[0], rows):
        xc = x[i : i + rows]
        if vectorise:
            try:
                J = vmap(jacrev(out), in_dims=(None, 0))(theta, xc).double()  # [R, C, D]
            except (RuntimeError, NotImplementedError):  # no batching rule (e.g. nn.LSTM): one row at a time
                vectorise = False
        if not vectorise:
            J = torch.stack([jacobian(lambda t, r=r: out(t, r), theta) for r in xc]).double()
        learned = link.get("variance") == "learned"
        if learned and likelihood not in (Likelihood.CATEGORICAL, Likelihood.BERNOULLI):
            # Λ = ∇m∇mᵀ/v + ∇v∇vᵀ/(2v²) in z, m and v read off nll
            # nll on the output in model(x)'s shape ([R, 2, 1] was passed as [R, 2]: IndexError) and on every field
            # of the rows (a third one, e.g. a variance floor nll reads, was dropped: IndexError; stop 69's review)
            fields = (targets,) if isinstance(targets, torch.Tensor) else tuple(targets or ())
            cut = tuple(
                t[i : i + rows] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == x.shape[0] else t
                for t in fields
            )
            with torch.no_grad():
                shape = f(theta, x[:1]).shape[1:]
            with torch.enable_grad():
                z = rows_out(theta, xc).detach().double().reshape(len(xc), *shape).requires_grad_(True)
                m, v = gaussian_in_targets(nll, z, (xc, *cut))
                dm = torch.autograd.grad(m.sum(), z, retain_graph=True, allow_unused=True, materialize_grads=True)[0]
                dv = torch.autograd.grad(v.sum(), z, allow_unused=True, materialize_grads=True)[0]
            vd = v.detach()
            a, b = dm.reshape(len(xc), -1) * vd.rsqrt()[:, None], dv.reshape(len(xc), -1) / (2**0.5 * vd)[:, None]
            LJ = a[:, :, None] * torch.einsum("rc,rcd->rd", a, J)[:, None, :]
            LJ += b[:, :, None] * torch.einsum("rc,rcd->rd", b, J)[:, None, :]
        elif likelihood is Likelihood.GAUSSIAN:
            LJ = _lambda_j(J, None, likelihood, sigma)
        else:
            with torch.no_grad():
                z = rows_out(theta, xc)
            LJ = _lambda_j(J, z, likelihood, sigma)
        if weights is not None:
            LJ = weights[i : i + rows].to(LJ.device, LJ.dtype)[:, None, None] * LJ
        part = J.reshape(-1, d).T @ LJ.reshape(-1, d)
        # the sum in place: a new [D, D] matrix per chunk cost as much as the product at a few rows (fresh pages);
        # ``part + 0`` is ``0 + part`` to the bit (a -0 entry becomes +0 as the zeros' sum made it)
        G = part.add_(0.0) if G is None else G.add_(part)
    if G is None:  # no rows
        G = torch.zeros(d, d, dtype=torch.float64, device=theta.device)
    return (G + G.T).mul_(0.5)


def _lambda_j(J: torch.Tensor, z: torch.Tensor | None, likelihood: Likelihood, sigma: float) -> torch.Tensor:
    """``Λ_r J_r`` for float64 Jacobians ``J`` ``[R, C, D]`` and the rows' outputs ``z`` ``[R, C]`` (unused for a
    Gaussian)."""
    if likelihood is Likelihood.CATEGORICAL:
        p = torch.softmax(z.double(), -1)
        return p[:, :, None] * (J - torch.einsum("rc,rcd->rd", p, J)[:, None, :])
    if likelihood is Likelihood.BERNOULLI:  # independent logits: Λ = diag(p(1 − p)), p = sigmoid(z)
        p = torch.sigmoid(z.double())
        return (p * (1 - p))[:, :, None] * J
    return J / sigma**2


def output_ggn_draws(
    model: torch.nn.Module,
    thetas: torch.Tensor,
    x: torch.Tensor,
    likelihood: Likelihood,
    sigma: float = 1.0,
    budget: int = 2**28,
    link: dict[str, Any] | None = None,
    weights: torch.Tensor | None = None,
    plan: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """``Σ_s output_ggn(model, θ_s, x, …)`` over the draws ``thetas`` ``[S, D]`` on the same rows ``x`` (float64
    ``[D, D]``; arguments as :func:`output_ggn`'s).

    The draws whose Jacobians of every row fit ``budget`` are taken together, in one vmap over draws and rows (stop
    69: a few removed rows at 16 draws of an 830-parameter CNN, 0.18 s as one :func:`output_ggn` call a draw, most of
    it the calls' overhead, 0.09 s so). The Jacobians, and the outputs read with them, then differ from the one-draw
    calls' by float32 rounding (the network's batched forward and backward): each draw's product is summed as there.
    Where a draw's rows do not fit, or the network has no batching rule, one :func:`output_ggn` call a draw.
    """
    link = link or {}
    f = functionalize(model, lambda m, r: select_output(m(r), link))

    def out(t: torch.Tensor, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = f(t, row.unsqueeze(0)).reshape(-1)
        return z, z.detach()

    S, d, R = thetas.shape[0], thetas.shape[1], x.shape[0]
    with torch.no_grad():
        C = out(thetas[0], x[0])[0].numel()
    per_draw = 3 * C * d * R * thetas.element_size()
    step = chunk_for(budget, per_draw, S) if R > 0 else 1
    G: torch.Tensor | None = None
    done = 0  # draws summed
    if step > 1:
        if plan is not None:
            plan(step * per_draw)
        batched = vmap(vmap(jacrev(out, has_aux=True), in_dims=(None, 0)), in_dims=(0, None))
        try:
            for i in range(0, S, step):
                J, z = batched(thetas[i : i + step], x)  # [s, R, C, D], [s, R, C]
                for Jd, zs in zip(J.double(), z):  # each draw's product as output_ggn forms it
                    LJ = _lambda_j(Jd, zs, likelihood, sigma)
                    if weights is not None:
                        LJ = weights.to(LJ.device, LJ.dtype)[:, None, None] * LJ
                    g = (Jd.reshape(-1, d).T @ LJ.reshape(-1, d)).add_(0.0)
                    g = (g + g.T).mul_(0.5)
                    G = g if G is None else G.add_(g)
                    done += 1
        except (RuntimeError, NotImplementedError):  # no batching rule (e.g. nn.LSTM): one draw at a time
            pass
    for theta in thetas[done:]:
        g = output_ggn(model, theta, x, likelihood, sigma, budget, link, weights, plan)
        G = g if G is None else G.add_(g)
    return G


def _misfit(model: torch.nn.Module, nll: Any, rows: tuple, info: dict[str, Any]) -> str | None:
    """Why ``nll`` on ``rows`` is not the categorical loss ``info`` describes (``row_weights ·
    cross_entropy(select_output(model(x)), y, label_smoothing)``), or ``None`` where it is, to float tolerance."""
    return cross_entropy_misfit(
        model,
        nll,
        rows,
        info,
        failed="nll could not be compared with the detected loss on the remaining rows ({})",
        differs="nll is not, on the remaining rows, the cross-entropy read on the removed rows",
    )


def _remaining_rows(problem: Problem) -> tuple:
    """The request's remaining (curvature) rows, without weights: the shared rows, or every draw's minibatch."""
    if problem.shared:
        return problem.raw(problem.batch)
    if all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in problem.batch):
        # one minibatch per draw, stacked on a leading S dimension: all of them
        return problem.raw(tuple(t.flatten(0, 1) for t in problem.batch))
    return problem.draw_batches()[0]


def _learned_on_remaining(problem: Problem, removed: tuple) -> tuple[Likelihood, dict[str, Any]] | None:
    """The Gaussian with a learned variance read on the removed rows, verified on the remaining rows' first probe
    rows (:func:`~mcmc_unlearner.kronecker.learned_variance`); ``None`` where it is not read on the removed rows.
    Where it does not hold there, ``EMPIRICAL`` with the reason (the exact dense Hessian is used): a Huber loss
    (``delta=5``) read as a Gaussian of variance 1 on removed rows inside its quadratic zone gave ``v = ∞`` on
    remaining rows past it, a NaN Gauss-Newton matrix, and the request was refused as "non-finite entries ... check
    the model and data for overflow" (stop 70). A variance head that differs on the remaining rows is read there row
    by row already (0.03-0.57 removed against 0.9-7.4 remaining: 6·10⁻¹⁶ off the dense float64 Fisher)."""
    reading = learned_variance(problem.model, problem.nll, removed)
    if reading is None:
        return None
    rows = _remaining_rows(problem)
    if not rows or not rows[0].shape[0] or learned_variance(problem.model, problem.nll, rows) is not None:
        return Likelihood.GAUSSIAN, reading
    return Likelihood.EMPIRICAL, {
        "reason": "nll reads as a Gaussian whose variance the model learns on the removed rows, but not on the "
        "remaining rows"
    }


def _checked_on_remaining(
    problem: Problem, removed: tuple, found: tuple[Likelihood, dict[str, Any]]
) -> tuple[Likelihood, dict[str, Any]]:
    """``found``, the categorical likelihood read on the removed rows, verified on up to
    ``kronecker.CHECK_ROWS_PER_LABEL`` remaining rows of each label: the removed rows often carry one label, and a
    class-weighted cross-entropy whose weights are 1 on the labels probed there read as plain (the GGN then took
    every class's weight as 1). Where it does not hold there, the likelihood is read again on those rows and
    verified on both; where that fails too, ``EMPIRICAL`` with the reason (the exact dense Hessian is used)."""
    rows = rows_per_label(_remaining_rows(problem))
    if rows is None or _misfit(problem.model, problem.nll, rows, found[1]) is None:
        return found
    again = detect_likelihood(problem.model, problem.nll, rows)
    if again[0] is Likelihood.CATEGORICAL:
        why = _misfit(problem.model, problem.nll, rows, again[1])
        if why is None:
            kept = labelled(removed, empty=True)
            why = _misfit(problem.model, problem.nll, kept, again[1]) if field_rows(kept) else None
        if why is None:
            return again
    else:
        why = again[1].get("reason", "likelihood not recognised")
    return Likelihood.EMPIRICAL, {
        "reason": f"the likelihood read on the removed rows ({found[0].value}, {found[1] or 'plain'}) does not "
        f"hold on the remaining rows, and none found holds on both ({why})"
    }


class GGNBackend(DenseBackend):
    """Dense generalized Gauss-Newton (see the module docstring).

    Args:
        refresh_every: Rebuild from data every this many requests; downdate in between (1: always rebuild).
    """

    name = "ggn"

    def __init__(self, refresh_every: int = 1) -> None:
        super().__init__(refresh_every)
        self._likelihood: tuple[Likelihood, dict[str, Any]] | None = None
        self._prior: torch.Tensor | None = None
        self.prior_clamped = 0  # eigenvalues of the prior's Hessian clamped to 0 by the last build

    def _detect(self, problem: Problem) -> tuple[Likelihood, dict[str, Any]]:
        if self._likelihood is None:
            removed = problem.raw(problem.removed)
            found = detect_likelihood(problem.model, problem.nll, removed)
            # only the categorical read is checked again on remaining rows of each label: its per-class weights can
            # read as 1 where the removed rows carry one label; a Bernoulli read is verified on the flipped targets
            # too, so a pos_weight (a weight per target value) differs there already, and a Gaussian has no labels
            if found[0] is Likelihood.CATEGORICAL:
                found = _checked_on_remaining(problem, removed, found)
            elif found[0] is Likelihood.EMPIRICAL:
                # a Gaussian whose variance the model learns (F.gaussian_nll_loss on two heads): its Fisher, as K-FAC
                # takes it (stop 69), not the dense Hessian
                found = _learned_on_remaining(problem, removed) or found
            self._likelihood = found
            self._prior = prior_precision(problem.model, problem.log_prior, problem.thetas[0])
        return self._likelihood

    def _ggn(self, problem: Problem, batches: list, weights: list[float], same: bool = False) -> torch.Tensor:
        """``(1/S) Σ_s w_s G_s`` of each draw's batch; ``same``: every draw's batch is ``batches[0]`` with weight 1
        (the removed rows: the draws taken together by :func:`output_ggn_draws`)."""
        lik, info = self._likelihood
        budget = max(problem.budget // 4, 2**20)
        record = getattr(problem, "plan", None)  # a stand-in problem may have none
        plan = None if record is None else (lambda nbytes: record("ggn_jacobians", nbytes))
        G = None
        if same and info.get("variance") != "learned":  # (a learned variance reads nll on each draw's rows)
            b = batches[0]
            if lik is Likelihood.CATEGORICAL:
                b = labelled(b, empty=True)
            if lik is not Likelihood.CATEGORICAL or field_rows(b) > 0:
                rw = row_weights(b, info)
                sigma = info.get("sigma", 1.0)
                G = output_ggn_draws(problem.model, problem.thetas, b[0], lik, sigma, budget, info, rw, plan)
            batches = []  # summed
        for theta, b, w in zip(problem.thetas, batches, weights):
            if lik is Likelihood.CATEGORICAL:
                # an ignore_index row (label -100) has no likelihood term: it stays counted in the rows the draw's
                # weight n/|B| divides by, but enters no Jacobian product (every row was taken as labelled: 1.54x
                # the GGN with a third of the rows ignored)
                b = labelled(b, empty=True)
                if field_rows(b) == 0:
                    continue
            rw = row_weights(b, info)
            g = output_ggn(
                problem.model, theta, b[0], lik, info.get("sigma", 1.0), budget, info, rw, plan, problem.nll, b[1:]
            )
            if w != 1.0:  # w·g in place (1·g is g to the bit)
                g.mul_(w)
            G = g if G is None else G.add_(g)
        self.products += len(weights)  # one curvature build per draw (C backward passes per row each)
        if G is None:  # every row ignored
            return torch.zeros(problem.dim, problem.dim, dtype=problem.thetas.dtype, device=problem.thetas.device)
        return G.div_(len(weights)).to(problem.thetas.dtype)

    def prepare(self, problem: Problem) -> dict[str, Any]:
        self._detect(problem)
        out = super().prepare(problem)
        lik, info = self._likelihood  # (the build may have fallen back: _energy_curvature)
        if lik is Likelihood.EMPIRICAL:  # no likelihood is used: the exact Hessian of the user's nll
            out["ggn_likelihood"] = None
            out["ggn_curvature"] = "hessian"
            out["ggn_fallback"] = (
                f"the dense Hessian (exact), since nll is not a likelihood the GGN knows: "
                f"{info.get('reason', 'likelihood not recognised')}"
            )
        else:
            out["ggn_likelihood"] = lik.value
            out["ggn_curvature"] = "ggn"
            if self.prior_clamped:
                out["ggn_prior_clamped"] = self.prior_clamped
            notes = {k: v for k, v in info.items() if k not in ("sigma", "constant")}
            if notes:
                out["ggn_likelihood_detected"] = notes
        return out

    def _energy_curvature(self, problem: Problem) -> torch.Tensor:
        lik, _ = self._likelihood
        if lik is Likelihood.EMPIRICAL:
            return super()._energy_curvature(problem)
        batches = problem.draw_batches()
        weights = [problem.n / b[0].shape[0] for b in batches]
        A = self._ggn(problem, batches, weights) + self._prior_hessian(problem).to(problem.thetas.dtype)
        if self._likelihood[1].get("variance") == "learned" and not bool(torch.isfinite(A).all()):
            # the learned-variance Gaussian is verified on the remaining rows' first probe rows only
            # (_learned_on_remaining): a Huber loss whose rows past its quadratic zone lie beyond them read v = ∞
            # there, and the NaN matrix was refused as "overflow" (stop 70's review). The exact dense Hessian then,
            # as where the check fails (its overflow, if any, is refused by the dense build as before)
            self._likelihood = (
                Likelihood.EMPIRICAL,
                {
                    "reason": "nll reads as a Gaussian whose variance the model learns on the probe rows, but its "
                    "Gauss-Newton matrix on the remaining rows is not finite (a variance read as infinite or zero "
                    "on some row)"
                },
            )
            return super()._energy_curvature(problem)
        return A

    def _prior_hessian(self, problem: Problem) -> torch.Tensor:
        """``−E_s ∇² log p(θ_s)`` over the draws, dense, its negative eigenvalues clamped to 0 (the GGN stays positive
        semi-definite). Until stop 46 the prior was :func:`~mcmc_unlearner.kronecker.prior_precision`'s one number
        per tensor at the first draw: exact for a Gaussian isotropic on each tensor, 0.56 off the matrix for a
        per-element Gaussian prior and 0.08 for a Student-t one (stop 46's probe), where the dense Hessian backend
        was exact."""
        d = problem.dim
        if problem.log_prior is None or not bool(self._prior.any()):  # flat, or not a function of the parameters
            return torch.zeros(d, d, dtype=torch.float64, device=problem.thetas.device)
        log_prior = problem.log_prior
        f = functionalize(problem.model, lambda m: -log_prior(m))
        P = torch.zeros(d, d, dtype=torch.float64, device=problem.thetas.device)
        load_forward_decompositions()  # torch.func.hessian is forward-over-reverse: its warnings silenced first
        thetas = problem.thetas.detach()
        # several draws per call, vmapped (stop 69: a call's overhead was most of its cost, 0.65 s for 16 draws of an
        # 830-parameter CNN's Gaussian prior one at a time, 0.13 s vmapped, the same bits); the draws' Hessians and
        # the forward-over-reverse intermediates (about four [D, D] a draw) within a quarter of the budget
        per_draw = 4 * d * d * thetas.element_size()
        step = max(1, min(thetas.shape[0], max(problem.budget // 4, 2**20) // per_draw))
        vectorise = step > 1
        for i in range(0, thetas.shape[0], step):
            if vectorise:
                try:
                    for h in torch.func.vmap(torch.func.hessian(f))(thetas[i : i + step]):
                        P += h.double()
                    continue
                except (RuntimeError, NotImplementedError):  # no batching rule (e.g. data-dependent control flow)
                    vectorise = False
            for theta in thetas[i : i + step]:
                P += torch.func.hessian(f)(theta).double()
        P = 0.5 * (P + P.T) / problem.thetas.shape[0]
        diag = torch.diagonal(P)
        if torch.count_nonzero(P - torch.diag(diag)) == 0:  # separable: clamp the diagonal
            self.prior_clamped = int((diag < 0).sum())
            return torch.diag(diag.clamp_min(0))
        w, Q = torch.linalg.eigh(P)
        self.prior_clamped = int((w < 0).sum())
        return (Q * w.clamp_min(0)) @ Q.T

    def _removed_curvature(self, problem: Problem) -> torch.Tensor:
        lik, _ = self._likelihood
        if lik is Likelihood.EMPIRICAL:
            return super()._removed_curvature(problem)
        removed = problem.raw(problem.removed)
        return self._ggn(problem, [removed] * problem.thetas.shape[0], [1.0] * problem.thetas.shape[0], same=True)
