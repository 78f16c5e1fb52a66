"""A Gibbs step for embedding rows that only the removed rows read (README, "What one request does", step 6).

A request that removes every row reading one row ``r`` of an ``nn.Embedding`` (a user's or an item's own ID
vector, a category no remaining row has) leaves the remaining data's likelihood independent of that row. Under the
*retrained* posterior its conditional given everything else is then the prior's conditional alone,

    p(e_r | θ₋r, S∖S′) = p(e_r | θ₋r),

and replacing the row of every stored sample (and the live chain) by a draw from it is a Gibbs update of the
retrained posterior: it leaves that posterior invariant and puts the row exactly where retraining would, whatever
the influence step did there. The influence step cannot: with no remaining row reading the row, its remaining-data
curvature is the prior's alone, and the step there, ``G / prior precision``, moves the row to the prior's mean only
if the user's chain was at equilibrium; a short chain is not (a tabular model whose category 7 went: its row moved
~5 prior sd past the prior's mean, the removed rows' NLL 0.53 → 7.31 where retraining gives 0.61, every check
passed: the safety check's remaining rows do not read the row).

Which rows: those the removed rows' forward pass feeds to the embedding (a forward hook on the module, reading the
indices by position or as ``input=``; a module called without them is not checked) that no remaining row feeds to
it, and along which the remaining rows' NLL has an exactly zero gradient (a weight that is also read outside the
module, ``F.linear(h, emb.weight)``, is read by every row). A weight shared by several modules (tied), and a
``padding_idx`` row, are never drawn.

The draw: the prior along the rows is measured as in :class:`mcmc_unlearner.emptied._BlockPrior`, a diagonal
precision ``P`` from ``log_prior``'s gradient at the sample's own rows and at the rows moved along a random ±1
direction, its mean ``b / P`` from ``b = P v − ∇(−log p)(v)`` (the gradient at zero, for a quadratic), verified at a
third, random point; then ``e_r ~ N(b / P, 1 / P)`` entry by entry. Where the prior is not measurably Gaussian and
independent across the rows' entries there, nothing is drawn and the caller says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .curvature import ParamSpec

Batch = tuple[torch.Tensor, ...]

#: Remaining rows the check that no remaining row reads an embedding row may read (one forward and backward pass
#: over every remaining row at one sample); beyond that it is not checked, and the report says so.
UNREAD_MAX_ROWS = 2**22
#: Rows per forward pass.
UNREAD_ROWS = 1024
#: Relative tolerance of the prior's gradient against the measured quadratic (as ``emptied._BlockPrior``).
PRIOR_FIT_TOL = 1e-4


class UnreadIndexError(ValueError):
    """An embedding module was called without an integer index tensor the forward hook can read."""


@dataclass(frozen=True)
class EmbeddingTable:
    """An ``nn.Embedding``/``nn.EmbeddingBag`` weight in the flat parameter vector.

    Attributes:
        name: The weight's parameter name.
        module: The module.
        offset: Where the weight starts in ``θ``.
        rows: Its number of rows (``num_embeddings``).
        width: Its row length (``embedding_dim``).
        padding_idx: The row never drawn (``None``: none).
    """

    name: str
    module: nn.Module
    offset: int
    rows: int
    width: int
    padding_idx: int | None

    def index(self, rows: torch.Tensor) -> torch.Tensor:
        """The flat indices of ``rows`` (a 1-D integer tensor), row by row."""
        start = self.offset + rows.long()[:, None] * self.width
        return (start + torch.arange(self.width)).flatten()


def embedding_tables(model: nn.Module, spec: ParamSpec) -> list[EmbeddingTable]:
    """The trainable embedding weights of ``model`` held by one module each (not tied), located in ``θ``."""
    offsets, at = {}, 0
    for name, numel in zip(spec.names, spec.numels):
        offsets[name] = at
        at += numel
    names = {id(p): n for n, p in model.named_parameters()}
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    out = []
    for m in model.modules():
        if not isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            continue
        w = m.weight
        name = names.get(id(w))
        if name is None or name not in offsets or owners.get(id(w), 0) != 1 or w.dim() != 2:
            continue
        out.append(EmbeddingTable(name, m, offsets[name], int(w.shape[0]), int(w.shape[1]), m.padding_idx))
    return out


def rows_read(
    tables: list[EmbeddingTable],
    f: Callable[..., torch.Tensor],
    theta: torch.Tensor,
    rows: Batch,
    chunk: int = UNREAD_ROWS,
    watch: list[torch.Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[torch.Tensor]:
    """Which rows of each table the forward pass of ``f(θ, *rows)`` feeds to its module (a forward hook).

    Args:
        tables: The embedding weights (:func:`embedding_tables`).
        f: The per-row NLL as a function of the flat parameters and a batch's fields.
        theta: Where to evaluate it.
        rows: The data rows, read ``chunk`` at a time.
        chunk: Rows per forward pass.
        watch: A boolean mask per table: stop reading once every row marked there has been read.
        progress: Called with the rows read and the rows given after each pass (``None``: not called).

    Returns:
        A boolean mask ``[rows]`` per table (the ``padding_idx`` row never marked).

    Raises:
        UnreadIndexError: a module was called without an integer index tensor as ``input`` (by position or keyword).
    """
    seen = [torch.zeros(t.rows, dtype=torch.bool) for t in tables]

    def keeper(j: int) -> Callable[..., None]:
        def keep(_m: nn.Module, args: tuple, kwargs: dict, _out: torch.Tensor) -> None:
            # the indices by position or by keyword (``emb(input=ids)``: ``args`` is empty)
            given = args[0] if args else kwargs.get("input")
            if not isinstance(given, torch.Tensor) or given.is_floating_point() or given.is_complex():
                raise UnreadIndexError(f"{tables[j].name}'s module was called without an index tensor")
            idx = given.detach().flatten().long().cpu()
            seen[j][idx[(idx >= 0) & (idx < tables[j].rows)]] = True

        return keep

    handles = [t.module.register_forward_hook(keeper(j), with_kwargs=True) for j, t in enumerate(tables)]
    try:
        with torch.no_grad():
            for i in range(0, int(rows[0].shape[0]), chunk):
                f(theta, *(r[i : i + chunk] for r in rows))
                if progress is not None:
                    progress(min(i + chunk, int(rows[0].shape[0])), int(rows[0].shape[0]))
                if watch is not None and all(bool((s | ~w).all()) for s, w in zip(seen, watch)):
                    break
    finally:
        for h in handles:
            h.remove()
    for s, t in zip(seen, tables):
        if t.padding_idx is not None:
            s[t.padding_idx] = False
    return seen


def rows_with_gradient(
    f: Callable[..., torch.Tensor],
    theta: torch.Tensor,
    rows: Batch,
    index: torch.Tensor,
    width: int,
    chunk: int,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Which of the embedding rows whose flat entries are ``index`` (``width`` per row, row by row) the summed NLL
    ``Σ f(θ, *rows)`` has a gradient other than exactly zero along (NaN counts as not zero): a weight read outside
    its module. Stops once every row has one. ``chunk`` rows per forward and backward pass; ``progress`` is called
    with the rows done and the rows given after each."""
    found = torch.zeros(index.numel() // max(width, 1), dtype=torch.bool)
    for i in range(0, int(rows[0].shape[0]), chunk):
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(f(t, *(r[i : i + chunk] for r in rows)).sum(), t, allow_unused=True)
        if g is None:
            break
        found |= (g[index.to(g.device)].detach().cpu() != 0).view(-1, width).any(1)
        if progress is not None:
            progress(min(i + chunk, int(rows[0].shape[0])), int(rows[0].shape[0]))
        if bool(found.all()):
            break
    return found


class DiagonalGaussianPrior:
    """``−log p(θ)`` along the flat entries ``index`` with the rest of ``θ`` fixed, measured as the quadratic
    ``½ Σ P_i v_i² − b_i v_i`` (a Gaussian independent across those entries), or found not to be one."""

    def __init__(self, lp_f: Callable[[torch.Tensor], torch.Tensor], index: torch.Tensor) -> None:
        self.lp_f, self.index = lp_f, index
        self.P: torch.Tensor | None = None
        self.b: torch.Tensor | None = None

    def _gradient(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``∇_v −log p(θ with the entries set to v)`` in float64."""
        with torch.enable_grad():
            vv = v.to(theta.dtype).detach().clone().requires_grad_(True)
            u = -self.lp_f(theta.index_put((self.index.to(theta.device),), vv))
            (g,) = torch.autograd.grad(u, vv)
        return g.detach().double().cpu()

    def _fits(self, theta: torch.Tensor, v: torch.Tensor) -> bool:
        g = self._gradient(theta, v)
        want = self.P * v - self.b
        return bool(torch.isfinite(g).all()) and float((g - want).norm()) <= PRIOR_FIT_TOL * (
            float(g.norm()) + float((self.P * v).norm()) + 1e-12
        )

    def measure(self, theta: torch.Tensor, gen: torch.Generator) -> bool:
        """For the sample ``θ``: keep the quadratic if it still fits at its own entries, else measure it again.

        Returns:
            Whether the prior is a Gaussian independent across the entries there (``P > 0`` finite, and the
            quadratic predicting the gradient at the sample's entries and at a random point to ``PRIOR_FIT_TOL``).
        """
        theta = theta.detach()
        v0 = theta[self.index.to(theta.device)].double().cpu()
        if self.P is not None and self._fits(theta, v0):
            return True
        scale = max(float(v0.abs().mean()), 1.0) if v0.numel() else 1.0
        sign = torch.randint(0, 2, v0.shape, generator=gen).double() * 2 - 1
        g0 = self._gradient(theta, v0)
        g1 = self._gradient(theta, v0 + scale * sign)
        self.P = (g1 - g0) / scale * sign
        self.b = self.P * v0 - g0
        v1 = v0 + torch.randn(v0.shape, generator=gen, dtype=torch.float64) * scale
        if not (bool(torch.isfinite(self.P).all()) and bool((self.P > 0).all()) and self._fits(theta, v1)):
            self.P = self.b = None
            return False
        return True

    def draw(self, gen: torch.Generator) -> torch.Tensor:
        """One draw of the entries from the measured Gaussian, ``N(b / P, 1 / P)``, in float64."""
        assert self.P is not None and self.b is not None
        z = torch.randn(self.P.shape, generator=gen, dtype=torch.float64)
        return self.b / self.P + z / self.P.sqrt()


def draw_unread_rows(
    lp_f: Callable[[torch.Tensor], torch.Tensor],
    thetas: torch.Tensor,
    index: torch.Tensor,
    gen: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]] | None:
    """Each of ``thetas`` (``[S, D]``, not written into) with the entries ``index`` drawn from the prior's
    conditional given the rest of it (module docstring); ``None`` where the prior is not measurably a Gaussian
    independent across those entries at one of the samples.

    Returns:
        The new ``[S, D]`` samples and the prior measured (at the last sample): ``prior_sd`` and ``prior_mean``,
        each the mean over the entries.
    """
    prior = DiagonalGaussianPrior(lp_f, index)
    out = thetas.clone()
    where = index.to(out.device)
    for s in range(out.shape[0]):
        if not prior.measure(out[s], gen):
            return None
        out[s, where] = prior.draw(gen).to(out.dtype).to(out.device)
    assert prior.P is not None and prior.b is not None
    return out, {
        "prior_sd": float((1 / prior.P.sqrt()).mean()),
        "prior_mean": float((prior.b / prior.P).mean()) if prior.P.numel() else math.nan,
    }
