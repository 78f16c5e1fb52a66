"""Kronecker-factored curvature (K-FAC) as a backend: built once at the request's draws, reused across
requests (its data term rescaled to the remaining count), and inverted in closed form for any damping.

The factors themselves live in :mod:`mcmc_unlearner.kronecker`; this file only decides when to (re)build them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..errors import all_finite
from ..memory import format_bytes
from ..solvers import SolveResult
from .base import CurvatureBackend, NegativeCurvatureError, Problem

__all__ = ["KFACBackend", "kfac_row_need", "scale_probe_bytes"]

#: Rademacher probes of :meth:`KFACBackend.scale`.
SCALE_PROBES = 4
#: Copies of a chunk of probe columns one product ``K z`` holds besides the probes themselves (their coordinates in
#: the eigenbases, the scaled ones, the product, a layer's columns rotated back and reshaped into it, ``z * K z``,
#: and for a layer whose eigenbasis misses directions its data part and prior part apart): a 4096x4096 Linear's four
#: columns at once grew the resident set by 1270 MiB, five times the 256 MiB probe matrix; a 1.1M-parameter MLP
#: with such a layer, two columns at once, by 5.6 copies of them.
SCALE_COLUMN_COPIES = 6


def scale_probe_bytes(column: int, cols: int) -> int:
    """Bytes :meth:`KFACBackend.scale` holds with ``cols`` probe columns per product, ``column`` bytes each: the
    :data:`SCALE_PROBES` probes, :data:`SCALE_COLUMN_COPIES` copies of the product's columns, one more where they are
    a slice of the probes (their contiguous copy), and one column of eigenvalues (``n·L·λ_G λ_Aᵀ`` of every layer,
    whatever the columns). The plan without the last two was 85.6 MB where 105 MB was reached (1.1M-parameter MLP,
    three columns per product)."""
    copies = SCALE_COLUMN_COPIES + (1 if cols < SCALE_PROBES else 0)
    return (SCALE_PROBES + copies * cols + 1) * column


def kfac_row_need(estimate: Callable[[int], int], dim: int, itemsize: int, mc_samples: int) -> int:
    """Bytes a K-FAC build needs in row chunks of one row: ``estimate(1)``
    (:meth:`~mcmc_unlearner.kronecker.KroneckerCurvature.memory_estimate`) and what the chunks add, each Monte-Carlo
    label's gradient of the parameters."""
    return estimate(1) + mc_samples * dim * itemsize


def diagonal_factors(info: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """The Kronecker factors a K-FAC build kept diagonal (``info["kronecker"]``: over
    :data:`~mcmc_unlearner.kronecker.MAX_FACTOR_DIM` dimensions), as ``(layer, "output" or "input", dimension)``."""
    out = []
    for layer, block in (info.get("kronecker") or {}).items():
        for which, form, dim in (("output", "G", "G_dim"), ("input", "A", "A_dim")):
            if str(block.get(form, "")).startswith("diagonal"):
                out.append((str(layer), which, int(block.get(dim, 0))))
    return out


def diagonal_factor_message(diagonal: Sequence[tuple[str, str, int]]) -> str:
    """The warning for :func:`diagonal_factors`: what was approximated and what the user can do."""
    from ..kronecker import MAX_FACTOR_DIM

    named = ", ".join(
        f"the {which} factor of layer {layer!r} ({dim:,} dimensions)" for layer, which, dim in diagonal[:4]
    )
    more = f" and {len(diagonal) - 4} more" if len(diagonal) > 4 else ""
    return (
        f"K-FAC keeps only the diagonal of {named}{more}: factors over {MAX_FACTOR_DIM:,} dimensions (e.g. a "
        "vocabulary or class head's outputs) get no eigendecomposition, so the correlations between those outputs "
        "(or inputs) are left out of the curvature, a coarser approximation than the other layers' full factors "
        "(report.info['kfac']['kronecker'] records each factor's form). solver='cg' uses exact curvature-vector "
        "products instead (no factor limit, more time per request); the limit is not an option of the unlearner"
    )


class KFACBackend(CurvatureBackend):
    """K-FAC of the remaining-data energy (see :mod:`mcmc_unlearner.kronecker`), rebuilt every
    ``refresh_every`` requests. Solves with either damping shape (:mod:`mcmc_unlearner.step`): ``K + λI`` or
    ``P + (1 + λ/s)·K_data`` (the data term damped alone; closed form in the eigenbasis either way).

    Args:
        refresh_every: Requests between rebuilds (the factors are reused in between, rescaled to ``n``).
        likelihood: ``"auto"`` (detected by probing ``nll``), ``"categorical"``, ``"gaussian"``, ``"bernoulli"`` or
            ``"empirical"``.
        mc_samples: Monte-Carlo labels per example and draw.
    """

    name = "kfac"
    cheap_damping = True
    removed_free = True  # built from the remaining data's minibatches at the bank's draws (prepare)
    damping_shapes = ("identity", "data")

    def __init__(self, refresh_every: int = 20, likelihood: str = "auto", mc_samples: int = 1) -> None:
        super().__init__()
        self.refresh_every = max(1, int(refresh_every))
        self.likelihood, self.mc_samples = likelihood, int(mc_samples)
        self.kfac: Any = None
        self.age = 0
        self._pending: tuple[Any, int] | None = None
        self._n = 0
        self._scale: float | None = None
        self._probes: tuple[Any, float, float, float] | None = None  # (factors, zᵀK₁z, zᵀPz, zᵀz): see scale()
        self._dtype = torch.float32
        self._budget: int | None = None  # the request's memory budget (scale()'s probe columns per product)
        self._plan: Callable[[str, int], None] = lambda path, nbytes: None  # the request's (Problem.plan)
        # what has been warned about, once per backend: the empirical-Fisher fallback ("fallback"), layers read
        # outside their modules ("outside"), factors kept diagonal over MAX_FACTOR_DIM ("diagonal") and layers called
        # on an input without the batch's rows ("unbatched"); report.info says each on every request
        self._warned: set[str] = set()

    def _warn_once(self, what: str, message: str) -> None:
        """A :class:`RuntimeWarning` at the caller's line, the first time this backend meets ``what``."""
        if what not in self._warned:
            from ..errors import outside_stacklevel

            self._warned.add(what)
            warnings.warn(message, RuntimeWarning, stacklevel=outside_stacklevel())

    def prepare(self, problem: Problem) -> dict[str, Any]:
        from ..kronecker import KroneckerCurvature

        if problem.hessian != "remaining":
            raise ValueError("solver='kfac' supports hessian='remaining' only")
        self.products = 0
        self._budget = problem.budget
        self._plan = getattr(problem, "plan", self._plan)  # a stand-in problem may have none
        reused = self.kfac is not None and self.age < self.refresh_every
        if reused:
            kfac, age = self.kfac, self.age + 1
        else:
            batches = problem.draw_batches()
            rows = batches[0][0].shape[0]
            estimate = KroneckerCurvature.memory_estimate(problem.model, None, batches[0], nll=problem.nll)
            row_chunk = None  # every minibatch in one pass when it fits (as always)
            whole = estimate(rows)
            if whole > problem.budget:
                # the minibatch in row chunks (the same factors to rounding): the most rows that fit beside what
                # the chunks add, each loss's gradient of the diagonal parameters kept until the chunks are summed
                extra = self.mc_samples * problem.dim * problem.thetas.element_size()
                lo, hi = 0, rows
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if estimate(mid) + extra <= problem.budget else (lo, mid - 1)
                if lo < 1:
                    need = kfac_row_need(estimate, problem.dim, problem.thetas.element_size(), self.mc_samples)
                    raise MemoryError(
                        f"K-FAC needs about {format_bytes(need, up=True)} for one row at a time, over the memory "
                        f"budget of {format_bytes(problem.budget)}: raise memory_budget to at least "
                        f"{format_bytes(need, up=True)}{problem.alternatives('cg')}; nothing was changed"
                    )
                row_chunk = lo
            extra = self.mc_samples * problem.dim * problem.thetas.element_size()
            self._plan("kfac_build", whole if row_chunk is None else estimate(row_chunk) + extra)
            kfac = KroneckerCurvature.build(
                problem.model,
                problem.thetas,
                batches,
                problem.n,
                nll=problem.nll,
                log_prior=problem.log_prior,
                likelihood=self.likelihood,
                mc_samples=self.mc_samples,
                generator=problem.generator,
                reduce=problem.reduce,  # None in one process (keeps the Gram-matrix path for wide layers)
                probe=problem.probe,  # a rank holding none of the curvature rows reads the likelihood here
                **({} if row_chunk is None else {"row_chunk": row_chunk}),
            )
            age = 1
            self._probes = None
        self._n = problem.n
        self._scale = None
        self._dtype = problem.thetas.dtype
        self._pending = (kfac, age)
        info: dict[str, Any] = {"preconditioner_reused": reused, "kfac": kfac.info}
        info.update({f"kfac_{k}": v for k, v in kfac.info.items() if isinstance(v, (int, float, str, bool))})
        fallback = kfac.info.get("likelihood_fallback")
        if fallback:
            self._warn_once("fallback", fallback)
        outside = kfac.info.get("read_outside_module")
        if outside:
            self._warn_once(
                "outside",
                f"K-FAC: the weights of {', '.join(repr(n) for n in outside)} are also read outside their modules "
                "(e.g. a tied decoder's F.linear(h, enc.weight.t())), so those layers get only a diagonal curvature; "
                "solver='cg' uses every read (a tied autoencoder on digits, its 0 digits forgotten: 0.27-0.63 of the "
                "way to retraining with cg, 0.01-0.04 with K-FAC; docs/curvature.md)",
            )
        diagonal = diagonal_factors(kfac.info)
        if diagonal:
            self._warn_once("diagonal", diagonal_factor_message(diagonal))
        unbatched = kfac.info.get("unbatched_input")
        if unbatched:
            self._warn_once(
                "unbatched",
                f"K-FAC: {', '.join(repr(n) for n in unbatched)} {'is' if len(unbatched) == 1 else 'are'} called "
                "on an input without the batch's rows (e.g. a hypernetwork's learned code of shape [4]): one "
                "location shared by every row, which K-FAC's per-row factors cannot hold (stop 57's probe: undamped "
                "ratios -3.4 / -1.4), so those layers get only a diagonal curvature "
                "(report.info['kfac']['unbatched_input']); solver='cg' uses Hessian products through autograd",
            )
        return info

    @property
    def _k(self) -> Any:
        k = self._pending[0]
        k.n = self._n
        return k

    def solve(self, rhs: torch.Tensor, damping: float) -> SolveResult:
        """``(K + λI)⁻¹ rhs``, or with ``damping_shape = "data"`` ``(K + (λ/s)·K_data)⁻¹ rhs`` (``s`` = :meth:`scale`:
        the data term scaled up by the relative damping, the prior precision left as it is)."""
        try:
            if self.damping_shape == "data":
                x = self._k.solve(rhs, 0.0, data_damping=damping / self.scale() if damping > 0 else 0.0)
            else:
                x = self._k.solve(rhs, damping)
        except ValueError as exc:  # singular: no prior precision and no damping on some directions
            raise NegativeCurvatureError(str(exc)) from None
        ok = all_finite(x)
        info = {"damping": damping, "damping_shape": self.damping_shape}
        return SolveResult(x, "kfac", 0, 0.0 if ok else float("nan"), ok, 0.0, info)

    def quad(self, x: torch.Tensor) -> float:
        return float(self._k.quad(x))

    def damping_quad(self, x: torch.Tensor, damping: float) -> float:
        if self.damping_shape == "data":
            return (damping / self.scale() if damping > 0 else 0.0) * float(self._k.quad(x, prior=False))
        return super().damping_quad(x, damping)

    def scale(self) -> float:
        """``tr K / D`` from Rademacher probes (a few cheap products with the factored matrix).

        ``K = n·K₁ + P`` (data term per row, prior), so the probes' ``zᵀK₁z`` and ``zᵀPz`` are kept with the
        factors and a reused curvature at another ``n`` costs no product (on a 1.2M-parameter ResNet the probes
        were a quarter of a request that reused its curvature). The probes are drawn in the working dtype, and
        multiplied all at once where :meth:`_probe_columns` plans that within the memory budget, else a few columns
        at a time (the same estimate to rounding).
        """
        if self._scale is None:
            k = self._k
            if self._probes is None or self._probes[0] is not k:
                g = torch.Generator().manual_seed(0)
                # drawn in the working dtype, ±1 in place: the same numbers as int64 draws mapped and cast (which
                # held three int64 copies, 1 GiB beside a 256 MiB float32 z on a 4096² Linear)
                z = torch.randint(0, 2, (k.dim, SCALE_PROBES), generator=g, dtype=self._dtype).mul_(2).sub_(1)
                cols = self._probe_columns(k.dim, z.element_size())
                self._plan("kfac_probes", scale_probe_bytes(k.dim * z.element_size(), cols))
                try:
                    prior, total = self._probe_sums(k, z, cols)
                finally:
                    k.n = self._n
                per_row = total - prior
                self._probes = (k, per_row, prior, float((z * z).sum()))
            _, per_row, prior, zz = self._probes
            self._scale = (self._n * per_row + prior) / zz
        return self._scale

    def _probe_columns(self, dim: int, itemsize: int) -> int:
        """Probe columns per product in :meth:`scale`: all ``SCALE_PROBES`` where :func:`scale_probe_bytes` of them
        fits the memory budget (29 columns: every float32 model up to ~9.2M parameters under 1 GiB, where the old
        plan's 24 took ~11M; the estimate as before, to the bit), else the most that fit, at least one."""
        column = dim * itemsize
        if self._budget is None or scale_probe_bytes(column, SCALE_PROBES) <= self._budget:
            return SCALE_PROBES
        fit = [c for c in range(1, SCALE_PROBES) if scale_probe_bytes(column, c) <= self._budget]
        return max(fit, default=1)

    @staticmethod
    def _probe_sums(k: Any, z: torch.Tensor, cols: int) -> tuple[float, float]:
        """``Σ zᵀPz`` and ``Σ zᵀ(K₁ + P)z`` over the probe columns (``k.n`` set to 0, then 1; the caller restores
        it), ``cols`` columns per product. A chunk's two products rotate it into the eigenbases once: the first
        product's coordinates of the chunk are kept for the second (the dead product's dropped before it, so no
        more is held than by one product; stop 70: one rotation of the ResNet's four probe columns saved, each sum
        to the bit), the chunk's dropped after both. Each sum adds its chunks in order, as one product a chunk did."""
        totals = [0.0, 0.0]
        for j in range(0, z.shape[1], cols):
            zc = z if cols >= z.shape[1] else z[:, j : j + cols].contiguous()
            for i, n in enumerate((0.0, 1.0)):
                k.n = n
                totals[i] += float((zc * (k @ zc)).sum())
                k.forget()  # the dead product's copy of the columns; zc's coordinates kept for its other product
            k.forget(zc)  # the cached coordinates of the chunk: a copy of its columns
        return totals[0], totals[1]

    def commit(self) -> None:
        if self._pending is not None:
            self.kfac, self.age = self._pending
        self._pending = None

    def snapshot(self) -> dict[str, Any]:
        # the cached factors' n is set to each request's (_k): a refused request left its own n in a checkpoint
        snap = super().snapshot()
        snap["_saved_kfac_n"] = None if self.kfac is None else self.kfac.n
        return snap

    def restore(self, snap: dict[str, Any]) -> None:
        snap = dict(snap)
        n = snap.pop("_saved_kfac_n", None)
        super().restore(snap)
        if n is not None and self.kfac is not None:
            self.kfac.n = n

    def commit_ahead(self) -> None:
        self.commit()
        self.age = 0  # unused: the next request reuses it as the build's first use (refresh_every counts from there)

    def reset(self) -> None:
        self.kfac, self.age, self._pending, self._probes = None, 0, None, None

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        meta: dict[str, Any] = {"precond_age": int(self.age)}
        if self.kfac is None:
            return {}, meta
        tensors, kmeta = self.kfac.state_dict()
        meta["kfac"] = kmeta
        return {f"kfac/{k}": v for k, v in tensors.items()}, meta

    @staticmethod
    def check_state(model: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any], corrupt: str) -> None:
        """Refuse a saved K-FAC state whose factors and metadata do not come together or do not fit the layers
        (:meth:`~mcmc_unlearner.kronecker.KroneckerCurvature.check_state`), before anything is loaded.

        Raises:
            ValueError: naming the entry and ``corrupt`` (what to do).
        """
        from ..kronecker import KroneckerCurvature

        sub = {k[len("kfac/") :]: v for k, v in tensors.items() if k.startswith("kfac/")}
        if bool(sub) != ("kfac" in meta):
            has = "factors (kfac/...) without their metadata ('kfac')" if sub else "metadata ('kfac') without factors"
            raise ValueError(f"load_curvature_state: the K-FAC state holds {has}: {corrupt}")
        if sub:
            try:
                KroneckerCurvature.check_state(model, sub, meta["kfac"])
            except ValueError as exc:
                raise ValueError(f"load_curvature_state: {exc}: {corrupt}") from None

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], model: Any = None) -> None:
        from ..kronecker import KroneckerCurvature

        age = int(meta.get("precond_age", 0))
        sub = {k[len("kfac/") :]: v for k, v in tensors.items() if k.startswith("kfac/")}
        if sub and "kfac" in meta and model is not None:
            self.kfac = KroneckerCurvature.from_state_dict(model, sub, meta["kfac"])  # raises before anything is set
            self.age = age
        else:
            self.kfac, self.age = None, 0
