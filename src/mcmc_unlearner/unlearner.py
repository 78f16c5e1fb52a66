r"""MCMC unlearning: the MCMC influence function of Fu, He & Tao (ICLR 2022), and its refinements.

This is the one place the algorithm lives; the seed API (:mod:`mcmc_unlearner.compat`), the CLI and the
experiments call it.

**The step.** The posterior is :math:`p(θ|S) ∝ \exp(-F(θ,S))` with
:math:`F(θ,S) = -\log p(θ) + \sum_{z∈S} h(θ,z)` and :math:`h(θ,z) = -\log p(z|θ)`. To forget :math:`S'⊂S`,
every posterior sample is moved by the MCMC influence function (paper, Thm. 1 and Alg. 1)

.. math::  θ ← θ + H^{-1} G,\qquad G = E_θ[∇_θ \textstyle\sum_{z∈S'} h(θ,z)],\qquad H = E_θ[∇²_θ F(θ,·)].

The paper takes :math:`H` on the full data :math:`S` (``hessian="full"``). Its Newton-type refinement
``hessian="remaining"`` (default) uses :math:`F(θ, S∖S')`, whose Hessian is :math:`H - E[∇²\sum_{S'} h]`:
for a Gaussian posterior this step lands exactly on the new mean, where the paper's undershoots by the
removed fraction of the curvature.

**Expectations** are Monte-Carlo averages over posterior draws: ``expectation="bank"`` uses the stored
sample bank (no new sampling: the influence step alone does the removal), ``expectation="chain"`` takes
``samp_T`` sampler steps on the remaining data first and uses those states (the paper's protocol).

**Spread.** Removing data also widens the posterior. ``bank_shift="mean"`` moves every stored sample by
the same vector (the paper's shift); ``"sample"`` moves each sample by :math:`H^{-1}∇h(θ_s)` (paper's
Alg. 1 read per sample; over-widens); ``"affine"`` applies the exact Gaussian transport
:math:`θ' = μ' + A'^{-1/2}A^{1/2}(θ - μ)` from the old precision :math:`A` to the new one :math:`A'`
(dense solver only), which maps old samples to new ones exactly when the posteriors are Gaussian.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import nn
from torch.func import grad, jacrev, vmap

from .curvature import LowRankPreconditioner, ParamSpec, SampleAveragedHessian, functionalize, stack_batches
from .errors import InvalidRequestError, SolverDivergedError, all_finite
from .kfac import KFAC
from .samplers import scale_lr
from .solvers import SolveResult, SolverName, solve

__all__ = ["BankShift", "Expectation", "HessianKind", "MCMCUnlearner", "RemovalReport", "check_finite_batch"]

Batch = tuple[torch.Tensor, ...]

_LOOP_DRAWS = 4  # residual checks at up to this many draws use double-backward loops (see _check_operator)


class Expectation(str, Enum):
    """Where the posterior expectations of G and H come from."""

    BANK = "bank"
    CHAIN = "chain"


class HessianKind(str, Enum):
    """Which energy's Hessian is inverted: the paper's full-data one or the remaining-data one (Newton)."""

    REMAINING = "remaining"
    FULL = "full"


class BankShift(str, Enum):
    """How stored samples move: one common vector, per-sample influence, or exact Gaussian transport."""

    MEAN = "mean"
    SAMPLE = "sample"
    AFFINE = "affine"


@dataclass
class RemovalReport:
    """What one deletion request did.

    Attributes:
        n_removed: Points removed by this request.
        n_remaining: Points left afterwards.
        solver: Inverse-HVP solver used.
        iterations: Solver iterations.
        residual: Final relative residual of the solve.
        converged: Whether the solve met its tolerance.
        shift_norm: Norm of the (mean) parameter shift ``H⁻¹G``.
        shift_stderr: Monte-Carlo standard error of the shift (norm): ``‖H⁻¹(Ḡ_A − Ḡ_B)/2‖`` for the two
            halves A, B of the gradient draws (for cg/lowrank, ``H⁻¹`` is the preconditioner's).
        seconds: Wall time of the request.
        n_draws: Posterior draws averaged for ``G``; ``n_curvature_draws`` for ``H``.
        bank_size: Stored samples shifted (0 without a bank).
        hessian_products: Single-draw Hessian-vector products spent (dense builds included).
        info: Solver extras (LiSSA scaling, top eigenvalue, Hessian cache use).
    """

    n_removed: int
    n_remaining: int
    solver: str
    iterations: int
    residual: float
    converged: bool
    shift_norm: float
    shift_stderr: float
    seconds: float
    n_draws: int
    n_curvature_draws: int
    bank_size: int
    expectation: str
    hessian: str
    bank_shift: str
    hessian_products: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["info"] = {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))}
        return d


def check_finite_batch(batch: Batch, what: str = "removed data") -> None:
    """Refuse NaN or infinite values in a batch, naming the offending rows."""
    for i, t in enumerate(batch):
        if t.is_floating_point() and not all_finite(t):
            rows = torch.nonzero(~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)).flatten()[:5].tolist()
            raise InvalidRequestError(
                f"{what}: field {i} has NaN or infinite values in row(s) {rows} of the request; "
                "the data must be finite to compute its influence: fix or drop those rows"
            )


def _as_batch(batch: Any) -> Batch:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    return tuple(batch)


def _default_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model.nll(batch)


def _evenly(n: int, k: int | None) -> torch.Tensor:
    if k is None or k >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, k).round().long()


def _sym_pow(M: torch.Tensor, p: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(M)
    if (evals <= 0).any():
        raise SolverDivergedError(
            "bank_shift='affine' needs a positive-definite Hessian (smallest eigenvalue "
            f"{float(evals.min()):.3g}); add damping or use bank_shift='mean'"
        )
    return (evecs * evals**p) @ evecs.T


class MCMCUnlearner:
    """Remove training points from an SG-MCMC posterior (chain state and stored samples) without retraining.

    Args:
        model: The model; by default it provides ``nll(batch) -> [B]`` and ``log_prior()``.
        sampler: The SG-MCMC optimizer driving the live chain (needed for ``expectation="chain"`` and to
            rescale its step size after a removal).
        nll: ``nll(model, batch) -> Tensor[B]``, per-datum negative log-likelihood ``h``.
        log_prior: ``log_prior(model) -> scalar``; default ``model.log_prior()`` (0 if absent).
        energy: ``energy(model, batch, n) -> scalar`` minibatch estimate of ``F``; default
            ``-log_prior + n/|B|·Σ nll``.
        bank: Stored posterior samples ``[S, D]`` (flat parameters, see :meth:`collect`).
        solver: ``"exact"``, ``"cg"``, ``"lissa"``, ``"lowrank"`` (saddle-free step on a reused Lanczos
            approximation; needs ``precondition_rank``), ``"kfac"`` (Kronecker-factored curvature of a
            classifier with a Gaussian prior ``model.prior_std``, built once and reused) or ``"auto"``
            (exact up to ``exact_max_dim`` parameters, else cg with a rank-20 Lanczos preconditioner).
        expectation: ``"bank"`` or ``"chain"``; ``None`` picks bank when a bank is present.
        hessian: ``"remaining"`` (Newton step on the remaining-data energy) or ``"full"`` (paper).
        bank_shift: ``"mean"``, ``"sample"`` or ``"affine"`` (see module docstring).
        damping: Added to the Hessian's diagonal.
        scaling: LiSSA scaling ``s`` or ``"auto"``.
        iter_T: LiSSA rounds / CG iteration cap.
        tol: Solver tolerance (relative residual).
        samp_T: Sampler steps for ``expectation="chain"``.
        grad_draws: Bank samples averaged for ``G`` (``None``: all).
        curvature_draws: Draws averaged for ``H``.
        refresh_every: Curvature reuse across sequential requests. With ``solver="exact"`` the dense
            remaining-data Hessian is rebuilt every ``refresh_every`` requests and in between updated by
            subtracting the removed points' Hessian; with ``solver="cg"`` and ``precondition_rank > 0`` the
            low-rank preconditioner is rebuilt every ``refresh_every`` requests. ``1`` rebuilds every time.
        precondition_rank: For ``solver="cg"``: Lanczos rank of a low-rank-plus-scalar preconditioner
            (:class:`~mcmc_unlearner.curvature.LowRankPreconditioner`); CG starts from its answer, so with
            ``iter_T=0`` a request costs one gradient over the bank and one residual check.
        drift_tol: With ``solver="lowrank"``, a reused approximation is rebuilt at once when the request's
            relative residual against the current Hessian exceeds this (the cheap drift check).
        check_draws: With ``solver="lowrank"``/``"kfac"``: measure that residual on only the first this-many
            curvature draws (``None``: all); the approximation itself is built from all of them.
        negative_curvature: With ``solver="cg"``: ``"raise"`` refuses an indefinite Hessian; ``"truncate"``
            stops CG at the first negative-curvature direction and keeps the iterate (truncated Newton-CG).
        newton_steps: ``1``: the influence step alone. ``k > 1``: ``k − 1`` further Newton corrections
            ``x ← x − H⁻¹ E_bank[∇F(θ + x, S∖S')]`` on all remaining points, zeroing the sample-averaged
            remaining-data gradient (the first-moment identity of the new posterior); for large removals.
        curvature_data: ``"minibatch"``: each curvature draw gets one fresh minibatch of the remaining data;
            ``"full"``: each draw uses every remaining point (needs ``remaining.remaining()``, e.g. a
            :class:`~mcmc_unlearner.data.RemovableDataset`), so only the draws are Monte Carlo;
            ``"auto"``: full for the dense solver while (remaining points × curvature draws) <= 32,768,
            minibatch otherwise.
        rescale_lr: Multiply the sampler's step size by ``n_old / n_new`` after each removal (the energy
            grows with ``n``, so the stable step size shrinks with it).
        backend: ``"auto"``, ``"func"`` or ``"autograd"`` for derivatives.
        seed: Seed of the unlearner's own generator (power iteration).
    """

    def __init__(
        self,
        model: nn.Module,
        sampler: torch.optim.Optimizer | None = None,
        *,
        nll: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
        log_prior: Callable[[nn.Module], torch.Tensor] | None = None,
        energy: Callable[[nn.Module, Batch, int], torch.Tensor] | None = None,
        bank: torch.Tensor | None = None,
        solver: SolverName | str = "auto",
        expectation: Expectation | str | None = None,
        hessian: HessianKind | str = HessianKind.REMAINING,
        bank_shift: BankShift | str = BankShift.MEAN,
        damping: float = 0.0,
        scaling: float | str = "auto",
        iter_T: int = 100,
        tol: float = 1e-4,
        samp_T: int = 5,
        grad_draws: int | None = None,
        curvature_draws: int = 16,
        refresh_every: int = 1,
        precondition_rank: int = 0,
        drift_tol: float = 2.0,
        check_draws: int | None = None,
        negative_curvature: str = "raise",
        newton_steps: int = 1,
        curvature_data: str = "auto",
        exact_max_dim: int = 2000,
        rescale_lr: bool = True,
        backend: str = "auto",
        seed: int = 0,
    ) -> None:
        self.model = model
        self.sampler = sampler
        self.spec = ParamSpec.of(model)
        if nll is None and not hasattr(model, "nll"):
            raise TypeError("pass nll=callable(model, batch) or give the model an nll(batch) method")
        self.nll = nll or _default_nll
        if log_prior is None:
            log_prior = (lambda m: m.log_prior()) if hasattr(model, "log_prior") else None
        self.log_prior = log_prior
        self.energy = energy or self._default_energy
        self.bank = None if bank is None else bank.detach().clone()
        if solver == "auto":
            solver = SolverName.EXACT if self.spec.dim <= exact_max_dim else SolverName.CG
            if solver is SolverName.CG and precondition_rank <= 0:
                precondition_rank = 20
        self.solver = SolverName(solver)
        self.expectation = None if expectation is None else Expectation(expectation)
        self.hessian = HessianKind(hessian)
        self.bank_shift = BankShift(bank_shift)
        if self.bank_shift is BankShift.AFFINE and self.solver is not SolverName.EXACT:
            raise ValueError("bank_shift='affine' needs solver='exact' (dense Hessians)")
        self.damping = float(damping)
        self.scaling = scaling
        self.iter_T = int(iter_T)
        self.tol = float(tol)
        self.samp_T = int(samp_T)
        self.grad_draws = grad_draws
        self.curvature_draws = int(curvature_draws)
        self.refresh_every = max(1, int(refresh_every))
        self.precondition_rank = int(precondition_rank)
        self.drift_tol = float(drift_tol)
        self.check_draws = None if check_draws is None else max(1, int(check_draws))
        if negative_curvature not in ("raise", "truncate"):
            raise ValueError(f"negative_curvature must be 'raise' or 'truncate', got {negative_curvature!r}")
        self.negative_curvature = negative_curvature
        if newton_steps < 1:
            raise ValueError(f"newton_steps must be >= 1, got {newton_steps}")
        self.newton_steps = int(newton_steps)
        if curvature_data not in ("auto", "minibatch", "full"):
            raise ValueError(f"curvature_data must be 'auto', 'minibatch' or 'full', got {curvature_data!r}")
        self.curvature_data = curvature_data
        self.rescale_lr = rescale_lr
        self.backend = backend
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[RemovalReport] = []
        self._cache: torch.Tensor | None = None  # dense remaining-data Hessian after the last request
        self._cache_age = 0
        self._precond: LowRankPreconditioner | KFAC | None = None
        self._request_n = 0  # remaining points of the request being processed (scales cached K-FAC factors)
        self._precond_age = 0

    # ------------------------------------------------------------------ energies
    def _default_energy(self, model: nn.Module, batch: Batch, n: int) -> torch.Tensor:
        data = self.nll(model, batch).sum() * (n / batch[0].shape[0])
        return data - self.log_prior(model) if self.log_prior is not None else data

    def _energy_f(self, n: int) -> Callable[..., torch.Tensor]:
        return functionalize(self.model, lambda m, *b: self.energy(m, b, n))

    def _h_f(self) -> Callable[..., torch.Tensor]:
        return functionalize(self.model, lambda m, *b: self.nll(m, b).sum())

    # ------------------------------------------------------------------ bank
    def collect(self) -> None:
        """Append the live chain's current parameters to the sample bank."""
        theta = ParamSpec.flatten_module(self.model)[None]
        self.bank = theta if self.bank is None else torch.cat([self.bank, theta])

    def _per_draw_grads(self, f: Callable, thetas: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.backend != "autograd":
            try:
                return vmap(grad(f), in_dims=(0, *([None] * len(batch))), chunk_size=1024)(thetas, *batch)
            except (RuntimeError, NotImplementedError, TypeError):
                if self.backend == "func":
                    raise
                self.backend = "autograd"
        out = []
        for t in thetas:
            with torch.enable_grad():
                tt = t.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(f(tt, *batch), tt)
            out.append(g)
        return torch.stack(out)

    def _dense_hessian(self, f: Callable, thetas: torch.Tensor, batch: Batch, shared: bool) -> torch.Tensor:
        """Mean over draws of the dense Hessian of ``f`` (small models)."""
        if self.backend != "autograd":
            try:
                dims = (0, *([None if shared else 0] * len(batch)))
                hs = vmap(jacrev(grad(f)), in_dims=dims, chunk_size=256)(thetas, *batch)
                return hs.mean(0)
            except (RuntimeError, NotImplementedError, TypeError):
                if self.backend == "func":
                    raise
                self.backend = "autograd"
        op = SampleAveragedHessian(f, thetas, batch, shared_args=shared, backend="autograd")
        return op.dense()

    # ------------------------------------------------------------------ draws
    def _chain_draws(self, remaining: Iterator[Batch], n: int) -> torch.Tensor:
        if self.sampler is None:
            raise ValueError("expectation='chain' needs the sampler (pass sampler=...)")
        params = ParamSpec.params(self.model)
        draws = []
        for _ in range(self.samp_T):
            z = _as_batch(next(remaining))
            self.sampler.zero_grad()
            self.energy(self.model, z, n).backward()
            self.sampler.step()
            draws.append(torch.cat([p.detach().reshape(-1) for p in params]))
        self.sampler.zero_grad()
        return torch.stack(draws)

    def _snapshot(self) -> tuple[torch.Tensor, dict | None]:
        theta = ParamSpec.flatten_module(self.model)
        opt = copy.deepcopy(self.sampler.state_dict()) if self.sampler is not None else None
        return theta, opt

    def _restore(self, snap: tuple[torch.Tensor, dict | None]) -> None:
        ParamSpec.assign(self.model, snap[0])
        if snap[1] is not None:
            self.sampler.load_state_dict(snap[1])

    # ------------------------------------------------------------------ the request
    def remove(
        self, batch: Batch | torch.Tensor, remaining: Iterator[Batch], n_remaining: int | None = None
    ) -> RemovalReport:
        """Forget ``batch`` (the removed points) given an endless iterator over the *remaining* data.

        Args:
            batch: The removed points, a tuple of tensors like the minibatches.
            remaining: Iterator of minibatches of the remaining data (after removal), e.g. a
                :class:`~mcmc_unlearner.data.RemovableDataset` from which the points were removed.
            n_remaining: Size of the remaining set (default ``len(remaining)``).

        Returns:
            A :class:`RemovalReport`. On any error the model, optimizer state and bank are unchanged.
        """
        t0 = time.perf_counter()
        batch = _as_batch(batch)
        if batch[0].shape[0] == 0:
            raise InvalidRequestError("deletion request is empty: pass at least one removed point")
        check_finite_batch(batch)
        n = int(n_remaining if n_remaining is not None else len(remaining))
        if n <= 0:
            raise InvalidRequestError("no data would remain: the posterior would be the prior; retrain instead")
        k = batch[0].shape[0]
        expectation = self.expectation or (Expectation.BANK if self.bank is not None else Expectation.CHAIN)
        if expectation is Expectation.BANK and self.bank is None:
            raise ValueError("expectation='bank' needs a sample bank: call collect() while sampling or pass bank=")
        snap = self._snapshot() if expectation is Expectation.CHAIN else None
        cached = (self._cache, self._cache_age, self._precond, self._precond_age, self.generator.get_state())
        try:
            report, new_live, new_bank = self._influence(batch, remaining, n, expectation)
        except BaseException:
            if snap is not None:
                self._restore(snap)
            self._cache, self._cache_age, self._precond, self._precond_age = cached[:4]
            self.generator.set_state(cached[4])
            raise
        # commit: nothing above touched the model except chain draws (kept on success)
        ParamSpec.assign(self.model, new_live)
        if new_bank is not None:
            self.bank = new_bank
        if self.rescale_lr and self.sampler is not None:
            scale_lr(self.sampler, (n + k) / n)
        report.seconds = time.perf_counter() - t0
        self.history.append(report)
        return report

    def forget(self, ids: Sequence[int] | torch.Tensor, data: Any) -> RemovalReport:
        """Validate ids against a :class:`~mcmc_unlearner.data.RemovableDataset`, unlearn them, then remove.

        The data set's state (mask and shuffling) is restored if unlearning fails, so a refused request
        leaves model, bank and data exactly as they were.
        """
        ids = data.validate(ids)
        batch = data.get(ids)  # remove() refuses non-finite rows; the data state is restored below
        state = data.state_dict()
        data.remove(ids)
        try:
            return self.remove(batch, data, len(data))
        except BaseException:
            data.load_state_dict(state)
            raise

    def _influence(
        self, batch: Batch, remaining: Iterator[Batch], n: int, expectation: Expectation
    ) -> tuple[RemovalReport, torch.Tensor, torch.Tensor | None]:
        h_f = self._h_f()
        e_f = self._energy_f(n)
        live = ParamSpec.flatten_module(self.model)
        if expectation is Expectation.CHAIN:
            draws = self._chain_draws(remaining, n)
            live = draws[-1]
            g_thetas, c_thetas = draws, draws
        else:
            g_thetas = self.bank[_evenly(self.bank.shape[0], self.grad_draws)]
            c_thetas = self.bank[_evenly(self.bank.shape[0], self.curvature_draws)]
        grads = self._per_draw_grads(h_f, g_thetas, batch)
        G = grads.mean(0)
        half = grads.shape[0] // 2
        dev = 0.5 * (grads[:half].mean(0) - grads[half:].mean(0)) if half >= 1 else torch.zeros_like(G)
        if not all_finite(G):
            raise SolverDivergedError(
                "the gradient of the removed points' negative log-likelihood is not finite at the current "
                "samples; nothing was changed. Check the model and data for overflow"
            )
        info: dict[str, Any] = {}
        products = 0
        n_curv = c_thetas.shape[0]
        precond_or_none: Any = None
        if self.solver is SolverName.EXACT:
            A_new, A_old, products, info = self._dense_system(h_f, e_f, c_thetas, batch, remaining)
            M = A_new if self.hessian is HessianKind.REMAINING else A_old
            res = solve(SolverName.EXACT, M, torch.stack([G, dev], 1), damping=self.damping)
        else:
            if self.curvature_data == "full":
                op: Any = SampleAveragedHessian(
                    e_f, c_thetas, _as_batch(remaining.remaining()), shared_args=True, backend=self.backend
                )
            else:
                stacked = self._curvature_batches(remaining, n_curv)
                op = SampleAveragedHessian(e_f, c_thetas, stacked, backend=self.backend)
            if self.hessian is HessianKind.FULL:
                op = op + SampleAveragedHessian(h_f, c_thetas, batch, shared_args=True, backend=self.backend)
            approximate = self.solver in (SolverName.LOWRANK, SolverName.KFAC)
            self._request_n = n
            precond = self._preconditioner(op, info) if approximate or self.solver is SolverName.CG else None
            check = self._check_operator(op) if approximate else op  # residual / drift check of an approximation
            if approximate and info["preconditioner_reused"]:
                # drift check: a reused approximation whose residual grew past drift_tol is rebuilt here
                res = solve(self.solver, check, G, preconditioner=precond, tol=self.tol, divergence_tol=math.inf)
                if res.residual > self.drift_tol:
                    self._precond = None
                    precond = self._preconditioner(op, info)
                    info["preconditioner_refreshed_for_drift"] = True
                    res = self._iterative(check, G, precond)
            else:
                res = self._iterative(check, G, precond)
            res.x = torch.stack([res.x, self._stderr_solve(op, dev, precond)], 1)
            products = op.n_products + (check.n_products if check is not op else 0)
            precond_or_none = precond
        x, x_dev = res.x[:, 0], res.x[:, 1]
        info.update(res.info)
        new_bank = None
        if self.bank_shift is BankShift.MEAN:
            new_live = live + x
            if self.bank is not None:
                new_bank = self.bank + x
        elif self.bank_shift is BankShift.SAMPLE:
            pts = live[None] if self.bank is None else torch.cat([live[None], self.bank])
            g_all = self._per_draw_grads(h_f, pts, batch)
            shifts = self._solve_many(M if self.solver is SolverName.EXACT else op, g_all)
            moved = pts + shifts
            new_live, new_bank = moved[0], (moved[1:] if self.bank is not None else None)
        else:  # AFFINE: exact Gaussian transport A^{-1/2}... from old to new precision
            T = _sym_pow(A_new, -0.5) @ _sym_pow(A_old, 0.5)
            ref = self.bank if self.bank is not None else live[None]
            mu = ref.mean(0)
            new_live = mu + x + (live - mu) @ T.T
            new_bank = mu + x + (self.bank - mu) @ T.T if self.bank is not None else None
        if self.newton_steps > 1:
            system = M if self.solver is SolverName.EXACT else op
            new_live, new_bank = self._newton_corrections(
                e_f, system, precond_or_none, remaining, new_live, new_bank, info
            )
        if not all_finite(new_live) or (new_bank is not None and not all_finite(new_bank)):
            raise SolverDivergedError("the shifted parameters are not finite; nothing was changed")
        report = RemovalReport(
            n_removed=batch[0].shape[0],
            n_remaining=n,
            solver=res.solver,
            iterations=res.iterations,
            residual=res.residual,
            converged=res.converged,
            shift_norm=float(x.norm()),
            shift_stderr=float(x_dev.norm()),
            seconds=0.0,
            n_draws=g_thetas.shape[0],
            n_curvature_draws=n_curv,
            bank_size=0 if self.bank is None else self.bank.shape[0],
            expectation=expectation.value,
            hessian=self.hessian.value,
            bank_shift=self.bank_shift.value,
            hessian_products=products,
            info=info,
        )
        return report, new_live, new_bank

    @staticmethod
    def _curvature_batches(remaining: Iterator[Batch], count: int) -> Batch:
        """``count`` fresh minibatches, cut to a common size and stacked on a leading dimension."""
        batches = [_as_batch(next(remaining)) for _ in range(count)]
        bsz = min(b[0].shape[0] for b in batches)
        return stack_batches([tuple(t[:bsz] for t in b) for b in batches])

    def _preconditioner(self, op: Any, info: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if self.solver is SolverName.KFAC:
            return self._kfac(op, info)
        lowrank = self.solver is SolverName.LOWRANK
        if self.precondition_rank <= 0:
            if lowrank:
                raise ValueError("solver='lowrank' needs precondition_rank > 0 (the Lanczos rank)")
            return None
        reused = self._precond is not None and self._precond_age < self.refresh_every
        if reused:
            self._precond_age += 1
        else:
            damped = (lambda v: op @ v + self.damping * v) if self.damping else (lambda v: op @ v)
            self._precond = LowRankPreconditioner.build(
                damped,
                op.dim,
                self.precondition_rank,
                generator=self.generator,
                dtype=op.thetas.dtype if hasattr(op, "thetas") else torch.float32,
                absolute=lowrank,
                device=op.thetas.device if hasattr(op, "thetas") else None,
            )
            self._precond_age = 1
        info["preconditioner_reused"] = reused
        return self._precond if lowrank else self._precond.solve

    def _check_operator(self, op: Any) -> Any:
        """The operator a low-rank or K-FAC step is checked against: the first ``check_draws`` draws of ``op``.

        With ``backend="auto"`` and at most :data:`_LOOP_DRAWS` check draws the products prefer a loop of
        double-backward passes: for one vector at a few draws that is cheaper than vmapped forward-over-reverse
        (digits CNN, 2 draws × 128 points: 6 ms vs 12 ms); both agree to float rounding (tested).
        """
        k = self.check_draws
        if k is None or not isinstance(op, SampleAveragedHessian) or k >= op.n_draws:
            return op
        args = op.args if op.shared_args else tuple(a[:k] for a in op.args)
        backend = "auto" if self.backend == "auto" else op.backend
        prefer = "autograd" if k <= _LOOP_DRAWS else "func"
        return SampleAveragedHessian(
            op.f, op.thetas[:k], args, shared_args=op.shared_args, backend=backend, prefer=prefer
        )

    def _kfac(self, op: Any, info: dict[str, Any]) -> KFAC:
        reused = self._precond is not None and self._precond_age < self.refresh_every
        if reused:
            self._precond_age += 1
            self._precond.n = self._request_n
        else:
            if not isinstance(op, SampleAveragedHessian):
                raise ValueError("solver='kfac' supports hessian='remaining' only")
            std = getattr(self.model, "prior_std", None)
            if std is None:
                raise ValueError("solver='kfac' needs a Gaussian prior N(0, σ²): give the model a prior_std attribute")
            # factors at the curvature draws, each with its curvature minibatch (or all remaining points)
            S = op.thetas.shape[0]
            batches = [tuple(op.args)] * S if op.shared_args else [tuple(a[s] for a in op.args) for s in range(S)]
            self._precond = KFAC.build(self.model, op.thetas, batches, self._request_n, 1.0 / std**2, self.damping)
            self._precond_age = 1
        info["preconditioner_reused"] = reused
        return self._precond

    def _iterative(self, op: Any, rhs: torch.Tensor, precond: Any = None) -> SolveResult:
        if self.solver in (SolverName.LOWRANK, SolverName.KFAC):
            return solve(self.solver, op, rhs, preconditioner=precond, tol=self.tol)
        if self.solver is SolverName.CG:
            return solve(
                SolverName.CG,
                op,
                rhs,
                damping=self.damping,
                max_iter=self.iter_T,
                tol=self.tol,
                preconditioner=precond,
                negative_curvature=self.negative_curvature,
            )
        return solve(
            SolverName.LISSA,
            op,
            rhs,
            damping=self.damping,
            scaling=self.scaling,
            iters=self.iter_T,
            tol=self.tol,
            generator=self.generator,
        )

    def _newton_corrections(
        self,
        e_f: Callable,
        system: Any,
        precond: Any,
        remaining: Any,
        live: torch.Tensor,
        bank: torch.Tensor | None,
        info: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Further Newton steps ``x ← x − H⁻¹ E[∇F(θ + x, S∖S')]`` on the whole remaining data.

        At the new posterior ``E_θ[∇F(θ, S∖S')] = 0`` (integration by parts), so each step moves every
        sample by the same vector to zero the sample-averaged gradient of the remaining-data energy; the
        Hessian is the one of the first step (reused, not rebuilt).
        """
        if not hasattr(remaining, "remaining"):
            raise ValueError("newton_steps > 1 needs the remaining data as a RemovableDataset (remaining())")
        full = _as_batch(remaining.remaining())
        norms = []
        for _ in range(self.newton_steps - 1):
            pts = bank if bank is not None else live[None]
            g = self._per_draw_grads(e_f, pts[_evenly(pts.shape[0], self.grad_draws)], full).mean(0)
            if isinstance(system, torch.Tensor):
                dx = solve(SolverName.EXACT, system, -g, damping=self.damping).x
            else:
                dx = self._iterative(system, -g, precond).x
            live = live + dx
            bank = None if bank is None else bank + dx
            norms.append(float(dx.norm()))
        info["newton_step_norms"] = ",".join(f"{v:.3g}" for v in norms)
        return live, bank

    def _stderr_solve(self, op: Any, dev: torch.Tensor, precond: Any) -> torch.Tensor:
        """``H⁻¹·dev`` for the Monte-Carlo error bar: the preconditioner's answer when there is one (no extra
        products), else a solve with the same solver; ``nan`` if that solve fails (the error bar is advisory)."""
        if precond is not None:
            return precond.solve(dev) if hasattr(precond, "solve") else precond(dev)
        try:
            return self._iterative(op, dev).x
        except SolverDivergedError:
            return torch.full_like(dev, float("nan"))

    def _solve_many(self, M: Any, g_all: torch.Tensor) -> torch.Tensor:
        if isinstance(M, torch.Tensor):
            return solve(SolverName.EXACT, M, g_all.T, damping=self.damping).x.T
        return self._iterative(M, g_all.T).x.T

    def _dense_system(
        self, h_f: Callable, e_f: Callable, thetas: torch.Tensor, batch: Batch, remaining: Iterator[Batch]
    ) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, Any]]:
        """Dense remaining-data Hessian ``A'`` and full-data Hessian ``A = A' + E[∇²Σh]`` at the draws.

        ``A'`` is rebuilt from fresh minibatches every ``refresh_every`` requests; in between it is the
        previous request's ``A'`` minus this request's removed-points Hessian (exact bookkeeping of
        ``F(θ, S∖S') = F(θ, S) − Σ_{S'} h``, ignoring the drift of the draws).
        """
        d = thetas.shape[1]
        H_r = self._dense_hessian(h_f, thetas, batch, shared=True)
        products = thetas.shape[0] * d
        reused = self._cache is not None and self._cache_age < self.refresh_every
        if reused:
            A_new = self._cache - H_r
            self._cache_age += 1
        else:
            full = self.curvature_data == "full" or (
                self.curvature_data == "auto"
                and hasattr(remaining, "remaining")
                and len(remaining) * thetas.shape[0] <= 32_768
            )
            if full:
                A_new = self._dense_hessian(e_f, thetas, _as_batch(remaining.remaining()), shared=True)
            else:
                A_new = self._dense_hessian(
                    e_f, thetas, self._curvature_batches(remaining, thetas.shape[0]), shared=False
                )
            products += thetas.shape[0] * d
            self._cache_age = 1
        A_new = 0.5 * (A_new + A_new.T)
        self._cache = A_new
        return A_new, A_new + H_r, products, {"hessian_reused": reused}

    def curvature_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Cached curvature as tensors plus JSON metadata (for checkpoints; see :meth:`load_curvature_state`)."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"cache_age": int(self._cache_age), "precond_age": int(self._precond_age)}
        if self._cache is not None:
            tensors["cache"] = self._cache
        if isinstance(self._precond, LowRankPreconditioner):  # a K-FAC factorisation is rebuilt after loading
            tensors["precond_U"], tensors["precond_lam"] = self._precond.U, self._precond.lam
            meta["precond_c"] = self._precond.c
        return tensors, meta

    def load_curvature_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`curvature_state` returned (tensors are cloned)."""
        cache = tensors.get("cache")
        self._cache = None if cache is None else cache.clone()
        self._cache_age = int(meta.get("cache_age", 0))
        if "precond_U" in tensors and "precond_c" in meta:
            self._precond = LowRankPreconditioner(
                tensors["precond_U"].clone(), tensors["precond_lam"].clone(), float(meta["precond_c"])
            )
        else:
            self._precond = None
        self._precond_age = int(meta.get("precond_age", 0))

    def reset_curvature(self) -> None:
        """Forget cached curvature (dense Hessian, preconditioner); call after the chain moved a lot."""
        self._cache = None
        self._cache_age = 0
        self._precond = None
        self._precond_age = 0
