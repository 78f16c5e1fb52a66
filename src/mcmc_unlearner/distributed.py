r"""Data-parallel SG-MCMC and unlearning on ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

Every rank holds a shard of the training data and an identical copy of the parameters. The math is the
single-process math on the union of the shards, up to floating-point summation order:

* **Data.** :class:`ShardedDataset` gives rank ``r`` of ``W`` the rows whose global id satisfies
  ``id % W == r``. Every rank keeps the same *global* index sampler (a
  :class:`~mcmc_unlearner.data.RemovableDataset` over ``arange(n)`` with the same seed), so every rank draws
  the same global minibatch and keeps the rows it owns. A weight column (``1/|B|`` of the *global* batch,
  ``0`` for padding) is appended to each local batch, so the energy's ``n/|B|`` factor is exact.
* **Energy.** ``F = −log p(θ) + n·Σ_{z∈B_local} w_z h(θ,z)`` on each rank, with the prior on group rank 0
  only; the sum over ranks is the single-process energy. One sampler step all-reduces the gradient (one
  all-reduce of ``D`` floats); the sampler's noise comes from identically seeded generators, so all ranks keep
  bit-identical parameters without broadcasting them.
* **Unlearning.** :class:`DistributedUnlearner` is :class:`~mcmc_unlearner.unlearner.MCMCUnlearner` with its
  data-touching building blocks all-reduced: per-draw gradients of the removed points, dense Hessians, and
  Hessian-vector products (an :class:`AllReducedOperator` around the local
  :class:`~mcmc_unlearner.curvature.SampleAveragedHessian`), K-FAC statistics and the safety check's sums. The
  algorithm itself (which draws, which backend, the damping control, how samples move) is inherited unchanged,
  so it lives in one place. Collectives cannot
  run inside ``torch.func`` transforms, so the reduction happens after each local vmapped product.
* **Requests** name global ids. Every rank validates the whole request against the global alive mask (all
  ranks hold the same one, because requests reach every rank), so all ranks accept or refuse together; the
  rank that owns an id contributes its row. The ledger is written by rank 0 only (:func:`run_forget`). A request's
  (or a fit's) first exchange compares the call and a fingerprint of each rank's curvature state, so that
  ``reset_curvature()`` or ``fit()`` on some ranks only is refused on every rank; an error on one rank during the
  computation makes every rank raise (:class:`RankFailedError` on the others) instead of leaving them waiting.
* **Ensembles.** :func:`ensemble_groups` splits the world into independent chains (one process group each);
  :func:`gather_banks` collects their sample banks for evaluation.

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
:func:`init_from_env` starts the process group from those variables.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .curvature import ParamSpec, stack_batches
from .data import RemovableDataset, as_id_tensor, cached_nonfinite
from .errors import InvalidRequestError, QualityError, UnlearningError
from .options import shown_value
from .stream import (
    MIN_CURVATURE_ROWS,
    _as_batch,
    _check_loader_order,
    _concat,
    _is_fields,
    _same_shapes,
    check_finite_batch,
    check_finite_source,
)
from .unlearner import MCMCUnlearner, Proposal, RemovalReport

__all__ = [
    "AllReducedOperator",
    "DistContext",
    "DistributedUnlearner",
    "RankFailedError",
    "ShardedDataset",
    "agree",
    "allreduce_grads",
    "apply_request",
    "distributed_step",
    "ensemble_groups",
    "env_rank",
    "gather_banks",
    "init_from_env",
    "launched",
    "params_in_sync",
    "run_forget",
]

Batch = tuple[torch.Tensor, ...]
Group = Any  # torch.distributed.ProcessGroup or None (the default group)


# ---------------------------------------------------------------------------------------------- launch
#: ``info["newton_gate"]`` under :class:`DistributedUnlearner`, where the gate is off
GATE_OFF = "off: not under DistributedUnlearner (a shard cannot list every remaining row)"


def ran_config(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration a request under torchrun ran with, as its ledger entry records it: the folder's
    ``config`` with ``newton_gate`` 0 (off: :func:`apply_request` builds the ranks' unlearner without it). The
    entry said the folder's 3 (the default), which no rank ran (stop 66's review); the folder keeps its value for
    requests in one process."""
    return {**config, "newton_gate": 0.0}


def launched() -> bool:
    """True when started by ``torchrun`` (or similar) with more than one process (``WORLD_SIZE > 1``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def env_rank() -> int:
    """This process's global rank from the launcher's ``RANK`` variable (0 when not launched)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: global rank, world size, local rank (GPU index) and device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device


def init_from_env(backend: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Start the default process group from ``torchrun``'s environment (no-op if already started).

    Args:
        backend: ``"gloo"``, ``"nccl"`` or ``"auto"`` (NCCL when CUDA is available, else gloo).
        timeout_s: Collective timeout; a rank that dies mid-request makes the others fail after this long
            instead of hanging forever.

    Without any of ``torchrun``'s variables (a plain ``python script.py``) it starts nothing and returns rank 0 of
    1, so the same script runs as one process without a process group.

    Raises:
        UnlearningError: some but not all of ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` are set.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        names = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        missing = [k for k in names if k not in os.environ]
        if len(missing) == len(names):  # not launched by torchrun: one process, no process group
            return DistContext(0, 1, 0, torch.device("cpu"))
        if missing:
            raise UnlearningError(
                f"distributed launch: environment variable(s) {missing} are not set; start the command with "
                "torchrun (e.g. `torchrun --nproc-per-node 2 -m mcmc_unlearner.cli ...`)"
            )
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    device = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _group_info(group: Group) -> tuple[int, int]:
    """(rank within group, group size); (0, 1) without a process group."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _comm_device(group: Group) -> torch.device:
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, group: Group, op: Any = None) -> torch.Tensor:
    """In-place sum (or ``op``) over the group, moving to the backend's device if needed; returns ``t``.

    Inside :func:`_watched` (a request or a fit of :class:`DistributedUnlearner`) the ranks first exchange whether one
    of them failed (:meth:`_Watch.check`), so that a rank's error stops the others here instead of leaving them
    waiting in this all-reduce until the timeout."""
    if _group_info(group)[1] == 1:
        return t
    watch = _WATCHES[-1] if _WATCHES and _WATCHES[-1].group is group else None
    # the buffer first: an error between the exchange and the all-reduce (moving t to the backend's device) paired
    # this rank's failure exchange with the others' all-reduce, and they waited until the timeout
    dev = _comm_device(group)
    buf = t if t.device == dev and t.is_contiguous() else t.to(dev).contiguous()
    if watch is not None:
        watch.check()
    try:
        dist.all_reduce(buf, op=op or dist.ReduceOp.SUM, group=group)
    except BaseException:
        if watch is not None:
            watch.failed = []  # the communication itself failed: no further exchange (it would wait again)
        raise
    if buf is not t:
        t.copy_(buf.to(t.device))
    return t


class RankFailedError(UnlearningError):
    """Another rank of the group failed during this request or ``fit()`` (its own error says why; the message names
    which); nothing was changed here."""


class _Watch:
    """Whether some rank of ``group`` failed during a watched call (:func:`_watched`).

    Every all-reduce of the call is preceded by one more of ``W`` numbers (:meth:`check`); a rank whose call raises
    sends its failure in one such exchange on its way out (:meth:`status`), which the other ranks meet in their next
    all-reduce or at the call's end: each then raises :class:`RankFailedError`, naming the rank, instead of waiting
    in a collective the failed rank never joins. ``failed`` is ``None`` while every rank is fine, else the failed
    ranks (``[]``: the communication itself broke); once set, no further exchange is made. ``call``: what is watched,
    ``"request"`` or ``"fit"``, which the error names."""

    def __init__(self, group: Group, call: str = "request") -> None:
        self.group = group
        self.call = call
        self.failed: list[int] | None = None

    def status(self, failed: bool) -> list[int]:
        """Exchange this rank's state; returns the ranks that failed (and remembers them when there are any)."""
        rank, world = _group_info(self.group)
        flags = torch.zeros(world, dtype=torch.float64, device=_comm_device(self.group))
        flags[rank] = float(failed)
        try:
            dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=self.group)
        except BaseException:
            self.failed = []
            raise
        bad = [r for r in range(world) if float(flags[r]) > 0]
        if bad:
            self.failed = bad
        return bad

    def error(self) -> RankFailedError:
        ranks = self.failed or []
        who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"
        # (it said "during this request" also in fit(), which the user then looked for among the requests)
        during, again = ("fit()", "call fit() again") if self.call == "fit" else ("request", "send the request again")
        return RankFailedError(
            f"{who} of the group failed during this {during} (its error there says why: fix that and {again} on "
            "every rank); this rank stopped with it, nothing was changed"
        )

    def check(self) -> None:
        """Before an all-reduce: raise :class:`RankFailedError` if another rank failed (known, or told now)."""
        if self.failed is not None or self.status(False):
            raise self.error()


_WATCHES: list[_Watch] = []

#: The calls :meth:`DistributedUnlearner._agree_entry` tells apart (its codes: index + 1; 0 is a failure).
_CALLS = ("forget", "remove", "fit")


@contextmanager
def _watched(group: Group, call: str = "request") -> Iterator[None]:
    """Run a collective call (a request, a fit) so that an error on one rank makes every rank raise promptly
    (:class:`_Watch`); a no-op in one process. Before (stop 59's probe), an ``nll`` that raised on one rank's remaining
    rows (a label out of range) left the other rank waiting in its next all-reduce until gloo's timeout (15 s there, 10
    minutes by default), and the next collective paired with the wrong one. ``call``: ``"request"`` or ``"fit"``,
    named by the other ranks' :class:`RankFailedError`."""
    if _group_info(group)[1] == 1:
        yield
        return
    watch = _Watch(group, call)
    _WATCHES.append(watch)
    try:
        yield
    except BaseException:
        _WATCHES.remove(watch)
        if watch.failed is None:  # this rank failed first: tell the others, who wait in an exchange
            try:
                watch.status(True)
            except Exception:  # (the communication broke: this rank's own error is the one to raise)
                pass
        raise
    _WATCHES.remove(watch)
    if watch.failed is not None or watch.status(False):  # (an error another rank sent was caught on the way)
        raise watch.error()


# ---------------------------------------------------------------------------------------------- data
class ShardedDataset:
    """One rank's shard of a removable data set; minibatches are the rank's part of a shared global batch.

    Rank ``r`` of ``W`` owns the rows with ``id % W == r``; it stores only those (``tensors[i][k]`` is global
    row ``r + k·W``). All ranks hold an identical global index sampler (same seed, same removals), so the
    global minibatch sequence equals that of a single-process ``RemovableDataset(*tensors, batch_size, seed)``.

    ``next(ds)`` returns ``(*fields, w)``: the owned rows of the next global minibatch and a weight column
    ``w = 1/|B_global|``; when the rank owns none of them, one padding row with weight 0 keeps shapes valid.

    Args:
        *local: The rank's rows (ids ``rank, rank + world, ...`` in order).
        n_total: Global number of rows.
        rank: Rank within the data-parallel group.
        world: Size of that group.
        batch_size: Global minibatch size.
        seed: Seed of the global shuffling generator (the same on all ranks).
        weight_dtype: dtype of the weight column (default: the first floating-point field's, else torch's default
            float dtype).
    """

    def __init__(
        self,
        *local: torch.Tensor,
        n_total: int,
        rank: int,
        world: int,
        batch_size: int = 64,
        seed: int = 0,
        weight_dtype: torch.dtype | None = None,
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank must lie in [0, world={world}), got {rank}")
        expected = len(range(rank, n_total, world))
        if not local or any(t.shape[0] != expected for t in local):
            raise ValueError(
                f"rank {rank} of {world} must hold {expected} rows of the {n_total} (ids {rank}, {rank + world}, "
                f"...); got {[t.shape[0] for t in local]}. Use ShardedDataset.from_global to slice global tensors"
            )
        self.local: Batch = tuple(local)
        self.rank, self.world, self.n_total = int(rank), int(world), int(n_total)
        self.index = RemovableDataset(torch.arange(n_total), batch_size=batch_size, seed=seed)
        # the data's own floating dtype: float64 rows with float32 weights (1/|B| rounded) gave float64 removals only
        # float32-accurate (2.4e-8 off one process, 1.4e-14 with float64 weights; stop 47's probe)
        floating = [t.dtype for t in local if t.is_floating_point()]
        self.weight_dtype = weight_dtype or (floating[0] if floating else torch.get_default_dtype())
        #: The global ids of the last global minibatch ``next`` gave, in their order: where one process reads this
        #: rank's rows (the safety check's screen and pooled curvature minibatches follow it).
        self.last_ids: torch.Tensor | None = None

    @classmethod
    def from_global(
        cls, *tensors: torch.Tensor, rank: int, world: int, batch_size: int = 64, seed: int = 0, **kw: Any
    ) -> ShardedDataset:
        """Keep rank ``rank``'s rows of global tensors (views, no copy)."""
        return cls(
            *(t[rank::world] for t in tensors),
            n_total=tensors[0].shape[0],
            rank=rank,
            world=world,
            batch_size=batch_size,
            seed=seed,
            **kw,
        )

    @classmethod
    def from_removable(cls, data: RemovableDataset, rank: int, world: int) -> ShardedDataset:
        """Shard a :class:`~mcmc_unlearner.data.RemovableDataset`, taking over its removals and shuffle state,
        so that the sharded data set continues exactly where ``data`` would."""
        out = cls.from_global(*data.tensors, rank=rank, world=world, batch_size=data.batch_size)
        out.load_state_dict(data.state_dict())
        return out

    # ------------------------------------------------------------------ bookkeeping
    def __len__(self) -> int:
        """Global number of remaining rows (the same on every rank)."""
        return len(self.index)

    @property
    def batch_size(self) -> int:
        return self.index.batch_size

    @property
    def remaining_ids(self) -> torch.Tensor:
        """Sorted global ids still present (all ranks)."""
        return self.index.remaining_ids

    @property
    def removed_ids(self) -> torch.Tensor:
        """Sorted global ids removed so far."""
        return self.index.removed_ids

    def validate(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Validate a request against the global alive mask (same answer on every rank); changes nothing."""
        return self.index.validate(ids)

    def remove(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Remove global ids (every rank calls it with the same request; each drops the rows it owns)."""
        return self.index.remove(ids)

    def nonfinite_ids(self) -> torch.Tensor:
        """Sorted global ids of this rank's remaining rows holding a NaN or an infinite value (its own rows only:
        :meth:`DistributedUnlearner.propose` agrees on the refusal across the ranks, before any collective)."""
        return cached_nonfinite(self, self.local, self.index._alive, lambda rows: rows * self.world + self.rank)

    def owned(self, ids: torch.Tensor) -> torch.Tensor:
        """The subset of global ``ids`` this rank holds (order kept)."""
        return ids[ids % self.world == self.rank]

    def _rows(self, gids: torch.Tensor, w: float) -> Batch:
        mine = self.owned(gids)
        wt = torch.full((mine.numel(),), w, dtype=self.weight_dtype)
        if mine.numel() == 0:  # padding row: a stored row (finite data) with weight 0
            alive = self.owned(self.remaining_ids)
            mine = (alive if alive.numel() else torch.tensor([self.rank]))[:1]
            wt = torch.zeros(1, dtype=self.weight_dtype)
        pos = mine // self.world
        return (*(t[pos] for t in self.local), wt.to(self.local[0].device))

    def get(self, ids: Sequence[int] | torch.Tensor) -> Batch:
        """This rank's rows of a request, with weight 1 (a weight-0 padding row if it owns none)."""
        return self._rows(as_id_tensor(ids), 1.0)

    def get_global(self, ids: Sequence[int] | torch.Tensor) -> Batch:
        """Rows of ``ids`` without the weight column; only the owned ones can be returned.

        Raises:
            ValueError: some id is held by another rank.
        """
        t = as_id_tensor(ids)
        if (t % self.world != self.rank).any():
            raise ValueError(f"rank {self.rank} holds only ids ≡ {self.rank} (mod {self.world})")
        return tuple(x[t // self.world] for x in self.local)

    # ------------------------------------------------------------------ sampling
    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        (gids,) = next(self.index)
        self.last_ids = gids
        return self._rows(gids, 1.0 / gids.numel())

    def remaining(self) -> Batch:
        """This rank's remaining rows with weight ``1/len(self)`` (so ``n·Σ w·h`` is the full-data sum)."""
        return self._rows(self.remaining_ids, 1.0 / len(self))

    def state_dict(self) -> dict:
        """The global sampler's state (same on every rank; equals a single-process RemovableDataset's)."""
        return self.index.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (or a :class:`RemovableDataset`'s state of the same data)."""
        self.index.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- sampling
def allreduce_grads(params: Sequence[torch.Tensor], group: Group = None) -> None:
    """Sum ``p.grad`` over the group with one all-reduce of a flat ``D``-float buffer."""
    if _group_info(group)[1] == 1:
        return
    # a sparse gradient (nn.Embedding(sparse=True)) is summed densely: it cannot be flattened, and a rank holding the
    # prior's dense term would otherwise wait in the all-reduce for a rank that failed to flatten it
    grads = [
        torch.zeros_like(p) if p.grad is None else p.grad.to_dense() if p.grad.is_sparse else p.grad for p in params
    ]
    flat = torch.cat([g.reshape(-1) for g in grads])
    _all_reduce(flat, group)
    off = 0
    for p, g in zip(params, grads):
        k = g.numel()
        if p.grad is None or p.grad.is_sparse:
            p.grad = g
        p.grad.copy_(flat[off : off + k].view_as(g))
        off += k


def distributed_step(
    model: nn.Module,
    sampler: torch.optim.Optimizer,
    batch: Batch,
    energy: Callable[[nn.Module, Batch, int], torch.Tensor],
    n: int,
    group: Group = None,
) -> None:
    """One SG-MCMC step on the group's summed energy: local backward, one gradient all-reduce, sampler step.

    ``energy`` must be the rank's share (e.g. :meth:`DistributedUnlearner.energy`); the sampler must draw its
    noise from a generator seeded identically on every rank.
    """
    sampler.zero_grad(set_to_none=False)
    energy(model, batch, n).backward()
    allreduce_grads(ParamSpec.params(model), group)
    sampler.step()


def params_in_sync(model: nn.Module, group: Group = None) -> float:
    """Largest spread (max − min over the group) of any parameter coordinate; 0.0 when all ranks agree exactly."""
    flat = ParamSpec.flatten_module(model)
    hi = _all_reduce(flat.clone(), group, dist.ReduceOp.MAX if dist.is_initialized() else None)
    lo = _all_reduce(flat.clone(), group, dist.ReduceOp.MIN if dist.is_initialized() else None)
    return float((hi - lo).abs().max()) if flat.numel() else 0.0


# ---------------------------------------------------------------------------------------------- unlearning
class AllReducedOperator:
    """``v ↦ Σ_ranks (local operator @ v)``: the Hessian of the group's summed energy from local shards.

    One all-reduce of ``D`` floats per product (``D × k`` for ``k`` right-hand sides).
    """

    def __init__(self, op: Any, group: Group = None) -> None:
        self.op, self.group = op, group

    @property
    def dim(self) -> int:
        return self.op.dim

    @property
    def n_products(self) -> int:
        return self.op.n_products

    def __getattr__(self, name: str) -> Any:  # thetas, n_draws, ...
        if name == "op":
            raise AttributeError(name)
        return getattr(self.op, name)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return _all_reduce((self.op @ v).contiguous(), self.group)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Same as ``self @ v``."""
        return self @ v

    def dense(self) -> torch.Tensor:
        """Dense ``[D, D]`` matrix, summed over ranks."""
        return _all_reduce(self.op.dense().contiguous(), self.group)


class _RankPrefix(logging.Filter):
    """Prefixes the library's progress lines (``mcmc_unlearner -v``, :mod:`logging`) with the process's rank while a
    process group of more than one process is running: every rank reports its own request, to one terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if not getattr(record, "rank_prefixed", False):
                record.msg = f"[rank {dist.get_rank()}/{dist.get_world_size()}] {record.msg}"
                record.rank_prefixed = True
        return True


_RANK_PREFIX = _RankPrefix()


def _prefix_progress_with_rank() -> None:
    """Put :class:`_RankPrefix` on the loggers the unlearner and its damping control write to (once)."""
    for name in ("mcmc_unlearner.unlearner", "mcmc_unlearner.step"):
        logger = logging.getLogger(name)
        if _RANK_PREFIX not in logger.filters:
            logger.addFilter(_RANK_PREFIX)


def _without_info(meta: Any) -> Any:
    """``meta`` without its ``"info"`` entries (a build's timings, which differ between two identical builds)."""
    if isinstance(meta, dict):
        return {k: _without_info(v) for k, v in meta.items() if k != "info"}
    if isinstance(meta, (list, tuple)):
        return [_without_info(v) for v in meta]
    return meta


class DistributedUnlearner(MCMCUnlearner):
    """:class:`~mcmc_unlearner.unlearner.MCMCUnlearner` over a data-parallel group.

    Every rank constructs it with the same arguments and seeds (parameters, bank and generators identical) and
    calls :meth:`forget` with the same request and its :class:`ShardedDataset`. Gradients, dense Hessians,
    Hessian-vector products, K-FAC statistics and the sums of the safety check are all-reduced over ``group``;
    everything else (draw selection, curvature backend, damping control, shift rule) is the inherited
    single-process algorithm, so every rank computes identical updates.

    Args:
        model: The model (``nll(batch) -> [B]`` and ``log_prior()``; or pass ``nll=``/``log_prior=``).
        sampler: The SG-MCMC optimizer (its noise generator must be seeded identically on all ranks).
        group: Process group of the data-parallel replicas (``None``: the default group).
        **kwargs: :class:`~mcmc_unlearner.unlearner.MCMCUnlearner` options. A custom ``energy`` is refused
            (only the ``−log prior + n/|B|·Σ nll`` form can be split across shards).
    """

    def __init__(
        self, model: nn.Module, sampler: torch.optim.Optimizer | None = None, *, group: Group = None, **kwargs: Any
    ) -> None:
        if kwargs.get("energy") is not None:
            raise ValueError(
                "DistributedUnlearner cannot split a custom energy across data shards; pass nll= and log_prior= "
                "(energy = -log prior + n/|B|·Σ nll)"
            )
        # the budget plans paths and refusals (solver choice, dense-matrix refusals, every-row curvature): resolved
        # from each rank's own free memory (None, "25%"), ranks would take different paths; all take the smallest
        if _group_info(group)[1] > 1:
            from .memory import resolve_budget

            budget = torch.tensor([float(resolve_budget(kwargs.get("memory_budget")))], dtype=torch.float64)
            _all_reduce(budget, group, dist.ReduceOp.MIN)
            kwargs["memory_budget"] = int(budget)
        err: BaseException | None = None
        try:
            super().__init__(model, sampler, **kwargs)
        except (ValueError, TypeError, MemoryError, RuntimeError) as e:  # e.g. one rank's sampler on another copy
            err = e
        if _group_info(group)[1] > 1:  # agreed before the next collective: one rank's refusal left the others waiting
            flag = torch.tensor([0.0 if err is None else 1.0], dtype=torch.float64)
            _all_reduce(flag, group, dist.ReduceOp.MAX)
            if err is None and float(flag) > 0:
                raise ValueError("another rank refused to build the unlearner (see its error); nothing was changed")
        if err is not None:
            raise err
        if self.newton_steps == "auto":  # the relative target, which the message below names, refuses "auto"
            raise ValueError(
                "DistributedUnlearner does not support newton_steps='auto' (it measures the bank's gap to equilibrium "
                "on every remaining row, which a shard cannot list); pass newton_steps=1, or an integer above 1 with "
                "newton_target='relative'"
            )
        # newton_gate's estimate and the steps it starts list every remaining row, which a shard cannot: asked for by
        # name, refused (it was set to 0 without a word); not given, off, the influence step alone as before, and
        # each request's report.info["newton_gate"] says why (_undamped_overshoots)
        if kwargs.get("newton_gate") is not None and self.newton_gate:
            raise ValueError(
                f"DistributedUnlearner does not support newton_gate={shown_value(kwargs['newton_gate'])} (its estimate "
                "of the bank's gap to equilibrium and the further Newton steps it starts list every remaining row, "
                "which a shard cannot); leave newton_gate out or pass newton_gate=0 (off, as it is by default here), "
                "or run the request in one process"
            )
        self.newton_gate = 0.0
        if self._newton_limit > 1 and self.newton_target == "equilibrium":
            raise ValueError(
                "DistributedUnlearner supports further Newton steps only with newton_target='relative' "
                "(the equilibrium target lists every remaining row, which a shard cannot); pass "
                "newton_target='relative' or newton_steps=1"
            )
        if self.recenter_every:
            raise ValueError(
                "DistributedUnlearner does not support recenter_every (it lists every remaining row, which a shard "
                "cannot); pass recenter_every=0"
            )
        self.group = group
        self.group_rank, self.group_size = _group_info(group)
        _prefix_progress_with_rank()
        self._local_nll = self.nll
        self.nll = self._weighted_nll
        self.energy = self._shard_energy
        # digest of the curvature state loaded since the last agreed request (none: zeros), agreed per request
        self._state_words = [0.0] * 4
        self._entered = False  # forget() agreed on its entry: the propose inside it does not again
        self._check_banks_agree()  # on every rank, with or without a bank: a collective every rank must join

    def _undamped_overshoots(self, trials: list[dict[str, Any]], info: dict[str, Any]) -> bool:
        """``newton_gate`` is off here (its estimate lists every remaining row): never fires, and where one process
        would have looked (``newton_target="equilibrium"``), ``info["newton_gate"]`` says why."""
        if self.newton_target == "equilibrium":
            info["newton_gate"] = GATE_OFF
        return False

    def load_curvature_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """:meth:`MCMCUnlearner.load_curvature_state`, remembering a digest of what was loaded: the next request
        refuses, on every rank, ranks that loaded different states or where only some ranks loaded one (one rank
        reusing its loaded K-FAC factors while another built its own aborted both in gloo, SIGABRT: stop 58's
        probe). The state itself does not depend on the world size: one saved by one process, or by 2 ranks, loads
        into any number of ranks."""
        super().load_curvature_state(tensors, meta)
        h = hashlib.sha256(json.dumps(_without_info(meta), sort_keys=True, default=str).encode())
        for k in sorted(tensors):
            t = tensors[k].detach().cpu().contiguous()
            h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        digest = h.digest()
        self._state_words = [float(1 + int.from_bytes(digest[i : i + 6], "big")) for i in (0, 6, 12, 18)]
        self._count_call("load_curvature_state")

    def reset_curvature(self) -> None:
        """:meth:`MCMCUnlearner.reset_curvature`; call it on every rank together (the next request refuses, on every
        rank, ranks whose curvature states differ: :meth:`_agree_entry`)."""
        super().reset_curvature()
        self._count_call("reset_curvature")

    def fit(self, remaining: Any, n_remaining: int | None = None) -> Any:
        """:meth:`MCMCUnlearner.fit` on every rank together: the ranks first agree that each of them called it
        with the same curvature state (:meth:`_agree_entry`; a fit on one rank while another sent a request paired
        the fit's all-reduces with the request's), and an error on one rank makes every rank raise."""
        self._agree_entry("fit")
        with _watched(self.group, "fit"):
            out = super().fit(remaining, n_remaining)
        self._count_call("fit")
        return out

    def _count_call(self, name: str) -> None:
        calls = self.__dict__.setdefault("_calls", {})
        calls[name] = calls.get(name, 0) + 1

    def _curvature_words(self) -> list[float]:
        """Four 48-bit words of a SHA-256 of what decides the next request's curvature and its collectives: the
        curvature state's metadata (cached curvature's age and layout, the damping carried, a fit's build), its
        tensors' names, dtypes and shapes, and the unlearner's generator."""
        tensors, meta = self.curvature_state()
        h = hashlib.sha256(json.dumps(_without_info(meta), sort_keys=True, default=str).encode())
        for k in sorted(tensors):
            t = tensors[k]
            h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(self.generator.get_state().numpy().tobytes())
        digest = h.digest()
        return [float(int.from_bytes(digest[i : i + 6], "big")) for i in (0, 6, 12, 18)]

    def _agree_entry(self, call: str) -> None:
        """The first collective of a request or a fit: every rank sends which call it is in and a fingerprint of its
        curvature state (:meth:`_curvature_words`), and all refuse, before anything else, when they differ. Before
        (stop 59's probe), ``reset_curvature()`` on one rank made that rank rebuild its curvature while the others
        reused theirs, and ``fit()`` on one rank paired its all-reduces with the others' request: the ranks computed
        different things or waited until the timeout.

        Raises:
            InvalidRequestError: the ranks are in different calls, or hold different curvature states (every rank
                raises; nothing was changed).
        """
        calls = self.__dict__.setdefault("_calls", {})
        if self.group_size == 1:
            calls.clear()
            return
        names = ("reset_curvature", "fit", "load_curvature_state")
        err: BaseException | None = None
        try:
            words = self._curvature_words()
        except Exception as e:  # (agreed below: a rank that cannot read its state refuses with the others)
            err, words = e, [0.0] * 4
        row = [0.0 if err else float(_CALLS.index(call) + 1), *words, *(float(calls.get(k, 0)) for k in names)]
        table = torch.zeros(self.group_size, len(row), dtype=torch.float64)
        table[self.group_rank] = torch.tensor(row, dtype=torch.float64)
        table = self._reduce(table).tolist()
        if err is not None:
            raise err
        if any(r[0] == 0 for r in table):
            bad = [i for i, r in enumerate(table) if r[0] == 0]
            raise InvalidRequestError(f"rank(s) {bad} could not read their curvature state (see their error); nothing "
                                      "was changed")  # fmt: skip
        if len({r[0] for r in table}) > 1:
            said = ", ".join(f"rank {i} {_CALLS[int(r[0]) - 1]}()" for i, r in enumerate(table))
            raise InvalidRequestError(
                f"the ranks called different methods together ({said}): every rank must call the same one at the "
                "same time (fit() on every rank, then each request with forget() or remove() on every rank); "
                "nothing was changed"
            )
        if any(r[1:5] != table[0][1:5] for r in table):

            def since(r: list[float]) -> str:
                done = [f"{k}() x{int(v)}" for k, v in zip(names, r[5:]) if v]
                return ", ".join(done) if done else "none of them"

            said = "; ".join(f"rank {i}: {since(r)}" for i, r in enumerate(table))
            if all(r[5:] == table[0][5:] for r in table):  # the same calls: seeds or generators set apart
                said += ", alike: the states drifted apart, e.g. an unlearner seeded differently (seed=) on some ranks"
            raise InvalidRequestError(
                "the ranks hold different curvature states before this "
                f"{'fit' if call == 'fit' else 'request'} (calls since they last agreed: {said}): reset_curvature(), "
                "fit() and load_curvature_state() must be called on every rank together, or on none; to go on, "
                "call reset_curvature() on every rank (each then builds its curvature afresh); nothing was changed"
            )
        calls.clear()

    # ------------------------------------------------------------------ the rank's share of the energy
    def _weighted_nll(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-row ``w·h`` of a ``(*fields, w)`` batch (padding rows have ``w = 0``)."""
        return self._local_nll(model, batch[:-1]) * batch[-1]

    def _shard_energy(self, model: nn.Module, batch: Batch, n: int) -> torch.Tensor:
        """``n·Σ w·h`` (``w = 1/|B_global|``), minus the log prior on group rank 0 only."""
        data = self._weighted_nll(model, batch).sum() * n
        if self.log_prior is not None and self.group_rank == 0:
            return data - self.log_prior(model)
        return data

    @property
    def _row_nll(self) -> Callable[[nn.Module, Batch], torch.Tensor]:
        return self._local_nll

    def _raw(self, batch: Batch) -> Batch:
        """The rank's real rows of a ``(*fields, w)`` batch, without the weight column."""
        keep = batch[-1] != 0
        return tuple(t[keep] for t in batch[:-1])

    def _removed_rows(self, batch: Batch) -> int:
        """The request's removed rows over all ranks (weight-1 rows): every rank must draw as many posterior samples
        for ``G``, whose per-draw gradients are all-reduced (a request split unevenly across the ranks aborted gloo
        with a size mismatch)."""
        return round(float(self._reduce((batch[-1] != 0).sum().to(torch.float64))))

    def _check_banks_agree(self) -> None:
        """Refuse, on every rank alike, sample banks that differ across the ranks (the ranks would silently compute
        different removals, or abort in a collective of mismatched sizes)."""
        bank = self.bank
        if bank is None:
            local = torch.zeros(5, dtype=torch.float64)
        else:
            b = bank.detach()  # no float64 copy of the bank: sums accumulated in float64
            w = torch.linspace(1.0, 2.0, b.shape[1], dtype=b.dtype, device=b.device)
            bw = b @ w
            # the rows weighted too: the same samples in another order passed the sums (stop 47's probe: a K-FAC
            # shift 20% off one process, every check passed)
            r = torch.linspace(1.0, 2.0, b.shape[0], dtype=torch.float64, device=b.device)
            total, weighted = float(b.sum(dtype=torch.float64)), float(bw.sum(dtype=torch.float64))
            ordered = float(r @ bw.double())
            local = torch.tensor([1.0 + b.shape[0], float(b.shape[1]), total, weighted, ordered], dtype=torch.float64)
        high, low = local.clone(), local.clone()
        _all_reduce(high, self.group, dist.ReduceOp.MAX)
        _all_reduce(low, self.group, dist.ReduceOp.MIN)
        if not torch.equal(high, low):
            raise InvalidRequestError(
                "the ranks hold different sample banks (their sizes, values or order differ): every rank must hold "
                "the same "
                "bank, e.g. collected with un.collect() after identically seeded sampler steps, or the same samples "
                "passed as bank=; nothing was changed"
            )

    def _local_share(self, batch: Any, remaining: Any = None) -> Batch:
        """The rank's share ``(*fields, w)``; an empty share (the request's rows all live on other ranks) becomes
        one weight-0 row: a stored row of ``remaining`` when it is a :class:`ShardedDataset` (an ``nll`` that is not
        finite at zeros, e.g. inputs normalised by their norm, made the weight-0 row's 0·NaN refuse a request one
        process accepts: stop 47's probe), else a row of zeros."""
        batch = _as_batch(batch, "the removed data")
        w = batch[-1]
        if len(batch) < 2 or w.ndim != 1 or not w.is_floating_point():
            raise TypeError(
                "DistributedUnlearner.remove takes the rank's share of the removed rows with a weight column, "
                "(*fields, w) with w = 1 for each real row (e.g. (x, y, torch.ones(len(x)))), got fields of dtypes "
                f"{[str(t.dtype) for t in batch]}; or call forget(ids, ShardedDataset)"
            )
        if batch[0].shape[0] == 0:
            if isinstance(remaining, ShardedDataset) and len(batch) == len(remaining.local) + 1:
                pad = remaining._rows(torch.zeros(0, dtype=torch.long), 0.0)
                batch = tuple(p.to(t.dtype) for p, t in zip(pad, batch))
            else:
                batch = tuple(t.new_zeros((1, *t.shape[1:])) for t in batch)
        return batch

    def propose(self, batch: Batch, remaining: Any, n_remaining: int | None = None) -> Proposal:
        """:meth:`MCMCUnlearner.propose` on every rank together, after checking that the ranks' banks agree.

        What one rank alone could refuse (a malformed or non-finite share, an ``nll`` failing on it, a remaining-data
        size it cannot read) is agreed on first, so that all ranks refuse together instead of one rank leaving the
        others blocked in a collective; so are the call itself and the curvature state (:meth:`_agree_entry`). An
        error on one rank during the computation (an ``nll`` failing on its remaining rows) makes every other rank
        raise :class:`RankFailedError` at its next all-reduce, naming the rank; nothing is changed on any rank."""
        entered, self._entered = self._entered, False
        if not entered:  # (forget agreed on its entry already)
            self._agree_entry("remove")
        with _watched(self.group):
            return self._propose_agreed(batch, remaining, n_remaining)

    def _propose_agreed(self, batch: Batch, remaining: Any, n_remaining: int | None) -> Proposal:
        """:meth:`propose`'s body, inside the watch."""
        self._check_banks_agree()
        err: BaseException | None = None
        n = n_remaining
        try:
            batch = self._local_share(batch, remaining)
            check_finite_batch(batch)
            self._check_nll(batch)
            _check_loader_order(remaining, warn=False)  # a refusal on one rank: agreed below, not a hang
            if isinstance(remaining, ShardedDataset):
                rank, world = _group_info(self.group)
                if (remaining.rank, remaining.world) != (rank, world):  # rows on no rank, or on two (stop 47)
                    raise ValueError(
                        f"the ShardedDataset is rank {remaining.rank} of {remaining.world}, but this process is rank "
                        f"{rank} of {world} in the unlearner's group: build it with rank= and world= of that group "
                        "(ShardedDataset.from_global(..., rank=dist.get_rank(group), world=dist.get_world_size(group)))"
                    )
                # a NaN row on one rank was found inside the collectives there, and the other ranks waited until
                # the timeout (stop 47's probe): refused here, agreed on below
                check_finite_source(remaining)
            if n is None and not _is_fields(remaining):  # (a tuple of rows is refused below, naming the shard)
                if not isinstance(remaining, ShardedDataset):
                    raise ValueError(
                        "pass n_remaining= (the global number of remaining rows, the same on every rank): under "
                        f"torch.distributed it cannot be read from a {type(remaining).__name__}, whose length is "
                        "this rank's own"
                    )
                n = len(remaining)
        except (InvalidRequestError, TypeError, ValueError, IndexError, KeyError, RuntimeError) as e:
            err = e
        same = [float(n or 0), *self._state_words]  # each the same on every rank: their max is minus the min of -x
        flags = torch.tensor(
            [
                0.0 if err is None else 1.0,
                float(batch[-1].ne(0).sum()) if err is None else 0.0,
                *same,
                *(-v for v in same),
            ],
            dtype=torch.float64,
        )
        flags[:2] = self._reduce(flags[:2].clone())
        flags[2:] = _all_reduce(flags[2:].clone(), self.group, dist.ReduceOp.MAX if dist.is_initialized() else None)
        high, low = flags[2:7], -flags[7:12]
        if err is not None:
            raise err
        if flags[0] > 0:
            raise InvalidRequestError("another rank refused this request (see its error); nothing was changed")
        if flags[1] == 0:
            raise InvalidRequestError("deletion request is empty on every rank: pass at least one removed point")
        if high[0] != low[0]:
            raise InvalidRequestError(
                f"the ranks give different numbers of remaining rows ({int(low[0])} to {int(high[0])}): "
                "n_remaining must be the global count, the same on every rank; nothing was changed"
            )
        if not torch.equal(high[1:], low[1:]):
            raise InvalidRequestError(
                "the ranks hold different curvature states (load_curvature_state was called on some ranks only, or "
                "with different states): load the same saved state on every rank, or none; nothing was changed"
            )
        # agreed: the digest stands for a load since the last agreed request, not for the state held since (a state
        # loaded on every rank, a request, then loaded again on rank 0 alone passed with the same digest, and rank 0
        # reused its reloaded K-FAC factors where rank 1 rebuilt them: gloo aborted both, SIGABRT)
        self._state_words = [0.0] * 4
        prop = super().propose(batch, remaining, n)
        prop._removed_total = round(float(flags[1]))  # the weight-1 rows over every rank
        return prop

    # ------------------------------------------------------------------ reduced building blocks
    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return _all_reduce(t.contiguous(), self.group)

    def _reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return _all_reduce(t.contiguous(), self.group, dist.ReduceOp.MAX if dist.is_initialized() else None)

    def _remaining_labels(self, stream: Any) -> torch.Tensor | None:
        """This rank's share of the remaining labels (the emptied-label check all-reduces which labels remain): the
        rows of a :class:`ShardedDataset` it owns, or what one process reads from this rank's source (its rows as a
        tuple, a ``RemovableDataset``, a ``DataLoader`` over a ``DistributedSampler``: every row of its dataset);
        ``None`` where they cannot be read so (then no rank checks)."""
        src = stream.source
        if isinstance(src, ShardedDataset):
            return src.local[1][src.owned(src.remaining_ids) // src.world] if len(src.local) > 1 else None
        return super()._remaining_labels(stream)

    def _per_draw_grads(self, f: Callable, thetas: torch.Tensor, batch: Batch, rowwise: bool = False) -> torch.Tensor:
        return self._reduce(super()._per_draw_grads(f, thetas, batch, rowwise))

    def _dense_hessian(
        self, f: Callable, thetas: torch.Tensor, batch: Batch, shared: bool, every_row: bool = False
    ) -> torch.Tensor:
        return self._reduce(super()._dense_hessian(f, thetas, batch, shared, every_row))

    def _bytes_per_row(self, f: Callable, theta: torch.Tensor, batch: Batch) -> int:
        """:meth:`MCMCUnlearner._bytes_per_row`, the same on every rank: measured on the rank's own share, a rank of
        one row (a single removed row, or a weight-0 padding row) counts the per-call bytes in every row (an MLP:
        2,616 bytes a row against 296 a row plus 2,320 a call), so the ranks planned the curvature data differently
        (every row on one rank, minibatches on the other) under one budget. Every rank takes the largest split
        measured on two rows or more (one process's measurement on the request's rows), else the largest single-row
        one; a single row larger than the split's rows (a longer sequence: one row of 400 tokens measured 29,084
        bytes against 376 a row plus 3,408 a call on rows of 4) raises the bytes per row to its measurement less
        the per-call bytes, so that no rank's rows are planned below what they were measured at."""
        if self._row_bytes is not None:
            return self._row_bytes
        super()._bytes_per_row(f, theta, batch)
        split = int(batch[0].shape[0]) >= 2
        row, call = float(self._row_bytes or 1), float(self._call_bytes)
        mine = [row, call, 0.0] if split else [0.0, 0.0, row]  # (a split, or a single row's whole measurement)
        most = self._reduce_max(torch.tensor(mine, dtype=torch.float64)).tolist()
        if most[0] > 0:
            self._row_bytes, self._call_bytes = max(int(most[0]), int(most[2] - most[1])), int(most[1])
        else:
            self._row_bytes, self._call_bytes = int(most[2]), 0
        return self._row_bytes

    def _problem(self, stream: Any, n: int, batch: Batch, c_thetas: torch.Tensor, *args: Any) -> Any:
        """:meth:`MCMCUnlearner._problem`, with the first row of the rank's curvature data (a weight-0 padding row
        where the rank owns none of it) as the rows K-FAC identifies the likelihood on when it has no real row: a
        rank holding no remaining row (3 ranks, a request removing all of one rank's rows) failed there while the
        other ranks waited in the factors' all-reduce until the timeout."""
        problem = super()._problem(stream, n, batch, c_thetas, *args)
        first = problem.batch[:-1] if problem.shared else tuple(t[0] for t in problem.batch[:-1])
        problem.probe = tuple(t[:1] for t in first)
        if self.group_size > 1 and getattr(self.curvature, "name", None) == "kfac":
            problem.generator = self._rank_generator()
        return problem

    def _rank_generator(self) -> torch.Generator:
        """A generator of this rank's own for K-FAC's build, seeded from one draw of the unlearner's generator.

        The build draws its Monte-Carlo noise, random signs and location subsets row by row, so a rank holding more
        of the curvature rows drew more numbers than another: the unlearner's generator, drawn from alike on every
        rank, came out of each request different on each rank (the ranks' curvature states then differed, and a
        later shared draw, a Lanczos start or a probe, would too: stop 59's probe). Every rank now draws the one
        seed from it (so it stays identical across the ranks) and mixes in its rank (so the ranks' noise is
        independent, where each rank's first rows took the same numbers before)."""
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        mixed = (seed + 0x9E3779B97F4A7C15 * (self.group_rank + 1)) % 2**63
        return torch.Generator(device=self.generator.device).manual_seed(mixed)

    def _operator(self, f: Callable, thetas: torch.Tensor, batch: Batch, shared: bool) -> Any:
        return AllReducedOperator(super()._operator(f, thetas, batch, shared), self.group)

    # ------------------------------------------------------------------ minibatches as one process reads them
    def _read(self, stream: Any, count: int) -> tuple[list[Batch], list[torch.Tensor], list[int]]:
        """``count`` local minibatches; for each, where this rank's real rows (weight ≠ 0) sit in the minibatch one
        process reads, and that minibatch's size (the real rows of all ranks).

        A :class:`ShardedDataset`'s minibatches are global: a rank's rows sit where their global ids do. Any other
        source (a ``DataLoader`` over a ``DistributedSampler``) gives each rank its own minibatches: one process
        reads the union of the ranks' ``i``-th minibatches, rank 0's rows first (their sizes: one all-reduce of
        ``count·W`` numbers)."""
        batches, where, sizes = [], [], []
        source = getattr(stream, "source", None)
        for _ in range(count):
            batches.append(_as_batch(next(stream)))
            if isinstance(source, ShardedDataset):
                gids = source.last_ids
                where.append((gids % self.group_size == self.group_rank).nonzero().flatten())
                sizes.append(int(gids.numel()))
        if not isinstance(source, ShardedDataset) and count:
            mine = [int((b[-1] != 0).sum()) for b in batches]
            counts = torch.zeros(count, self.group_size, dtype=torch.float64)
            counts[:, self.group_rank] = torch.tensor(mine, dtype=torch.float64)
            self._reduce(counts)
            before = counts[:, : self.group_rank].sum(1)
            where = [int(b0) + torch.arange(k) for b0, k in zip(before.tolist(), mine)]
            sizes = [round(float(c)) for c in counts.sum(1)]
        return batches, where, sizes

    @staticmethod
    def _positions(where: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
        """The rank's real rows' places in the concatenation of the minibatches one process reads."""
        starts = [0, *torch.tensor(sizes, dtype=torch.int64).cumsum(0).tolist()]
        return torch.cat([s + w for s, w in zip(starts, where)]) if where else torch.zeros(0, dtype=torch.int64)

    @staticmethod
    def _weighted(parts: list[Batch], weights: list[float], template: Batch) -> Batch:
        """Real rows ``parts[i]`` (fields without weights) with weight ``weights[i]``, padded with weight-0 copies
        of ``template``'s first row to a common size and stacked."""
        size = max(1, *(p[0].shape[0] for p in parts))
        dtype, device = template[-1].dtype, template[-1].device
        out = []
        for p, w in zip(parts, weights):
            k = p[0].shape[0]
            fields = tuple(torch.cat([t, r[:1].expand(size - k, *r.shape[1:])]) for t, r in zip(p, template[:-1]))
            wt = torch.zeros(size, dtype=dtype, device=device)
            wt[:k] = w
            out.append((*fields, wt))
        return stack_batches(out)

    def _stacked(self, remaining: Any, count: int) -> Batch:
        """``count`` curvature minibatches, one per draw, as one process reads them (:meth:`_Stream.stacked`): the
        next ``count`` minibatches, more while they are small, pooled and split evenly when their sizes differ
        (a ``DataLoader``'s last, partial minibatch); each rank holds its real rows of each, with weight
        ``1/|minibatch|`` of the whole, padded with weight-0 rows. A ``DataLoader``'s last minibatch kept the
        weight column of a full one: 2 ranks were 0.22 off one process on the union (both 15 rows in 60)."""
        batches, where, sizes = self._read(remaining, count)
        have, limit = sum(sizes), count * MIN_CURVATURE_ROWS
        small = max(sizes) < MIN_CURVATURE_ROWS
        while small and have < limit and len(batches) < limit and have < count * remaining.n:
            b, w, s = self._read(remaining, 1)
            batches, where, sizes, have = batches + b, where + w, sizes + s, have + s[0]
        _same_shapes(batches)
        real = [tuple(t[b[-1] != 0] for t in b[:-1]) for b in batches]
        if len(batches) == count and len(set(sizes)) == 1:
            return self._weighted(real, [1.0 / s for s in sizes], batches[0])
        bsz = have // count
        rows = tuple(torch.cat(f) for f in zip(*real))
        part = self._positions(where, sizes) // max(bsz, 1)
        parts = [tuple(t[part == i] for t in rows) for i in range(count)]
        return self._weighted(parts, [1.0 / max(bsz, 1)] * count, batches[0])

    def _check_rows(self, stream: Any, m: int, screen: int) -> tuple[Batch, int]:
        """The rank's share of the safety check's ``m`` rows and of its screen's first ``screen``, so that the union
        over the ranks is what one process reads. A :class:`ShardedDataset`'s minibatches are global (its
        ``batch_size`` too: every rank reads the ``⌈m/|B|⌉`` minibatches one process would); any other source with a
        ``batch_size`` (a ``DataLoader`` over a ``DistributedSampler``) gives each rank its own minibatches, and each
        reads ``⌈⌈m/W⌉/|B|⌉`` of them, one process's ``⌈m/(W·|B|)⌉`` of their union (the whole ``m`` on each rank
        made the check ``W`` times larger, and so ``W``-dependent: a digits MLP on two ranks checked 600 rows against
        one process's 360, and the next request's carried deficit, 1.44 against 1.09, put its shift 16% apart);
        without a ``batch_size``, minibatches until the ranks hold ``m`` rows together. The screen measures the rows
        among the first ``screen`` of the union (each rank read its own first ``screen``: 2 ranks screened on 120
        rows where one process did on 64)."""
        bs = getattr(stream.source, "batch_size", None)
        if isinstance(bs, int) and bs > 0:
            local = m if isinstance(stream.source, ShardedDataset) else -(-m // self.group_size)
            batches, where, sizes = self._read(stream, -(-local // bs))
        else:
            batches, where, sizes = [], [], []
            while sum(sizes) < m:
                b, w, s = self._read(stream, 1)
                if s[0] == 0:
                    break
                batches, where, sizes = batches + b, where + w, sizes + s
        rows = self._raw(_concat(batches))
        return rows, int((self._positions(where, sizes) < screen).sum())

    def _chain_draws(self, remaining: Iterator[Batch], n: int, removed: Batch | None = None) -> torch.Tensor:
        if self.sampler is None:
            raise ValueError("expectation='chain' needs the sampler (pass sampler=...)")
        energy = self.energy
        if removed is not None:  # the posterior before the removal: the rank's share of the removed rows' Σ w·h

            def energy(m: nn.Module, b: Batch, n_: int) -> torch.Tensor:
                return self.energy(m, b, n_) + self.nll(m, removed).sum()

        draws = []
        for _ in range(self.samp_T):
            if isinstance(remaining.source, ShardedDataset):  # global minibatches: their weights are exact
                batch = _as_batch(next(remaining))
            else:  # the rank's own minibatches: weight 1/|union| (a partial last one kept a full one's weights)
                (b,), _, (size,) = self._read(remaining, 1)
                batch = self._weighted([tuple(t[b[-1] != 0] for t in b[:-1])], [1.0 / max(size, 1)], b)
                batch = tuple(t[0] for t in batch)
            distributed_step(self.model, self.sampler, batch, energy, n, self.group)
            draws.append(ParamSpec.flatten_module(self.model))
        self.sampler.zero_grad()
        return torch.stack(draws)

    # ------------------------------------------------------------------ sampling and requests
    def step(self, data: ShardedDataset, n: int | None = None) -> None:
        """One data-parallel sampler step on the next global minibatch of ``data``."""
        if self.sampler is None:
            raise ValueError("step() needs the sampler (pass sampler=...)")
        distributed_step(self.model, self.sampler, next(data), self.energy, len(data) if n is None else n, self.group)

    def remove(
        self,
        batch: Batch,
        remaining: Iterator[Batch],
        n_remaining: int | None = None,
        n_removed: int | None = None,
        *,
        strict: bool = True,
    ) -> RemovalReport:
        """Forget the rank's share ``(*fields, w)`` of the removed points (``w = 1`` for real rows).

        Every rank of the group must call it together. ``n_removed`` (global count) defaults to the
        all-reduced number of weight-1 rows.
        """
        prop = self.propose(batch, remaining, n_remaining)  # a malformed share is agreed on there (counting its
        # rows here first, a collective, left the other ranks waiting on a rank that failed: stop 47's probe)
        if n_removed is None:
            n_removed = prop._removed_total
        prop.report.n_removed = n_removed
        prop._lr_scale = (prop.report.n_remaining + n_removed) / prop.report.n_remaining
        if strict and prop.report.problems:
            raise QualityError(
                "the removal was refused, nothing was changed: " + "; ".join(prop.report.problems), prop.report
            )
        return self.apply(prop)

    def _agreed_ids(self, ids: Sequence[int] | torch.Tensor, data: ShardedDataset) -> torch.Tensor:
        """``data.validate(ids)`` on every rank, agreed on before anything else: a rank that refuses makes every rank
        refuse, and ranks given different ids (the count and a SHA-256 of the sorted validated ids; sums of the ids,
        their squares and a multiplicative hash let {0, 4, 5} and {1, 2, 6} through) are refused on every rank.
        Before, a rank that refused an unknown id left the others waiting in the next all-reduce (gloo aborted both),
        and ranks given different ids of one count each removed their own and went on sharding different data sets
        (stop 43's probe)."""
        error: Exception | None = None
        try:
            ids = data.validate(ids)
            digest = hashlib.sha256(torch.sort(ids.detach().cpu().to(torch.int64))[0].numpy().tobytes()).digest()
            words = [float(ids.numel())] + [float(int.from_bytes(digest[i : i + 6], "big")) for i in (0, 6, 12, 18)]
            mark = torch.tensor(words, dtype=torch.float64)  # 48-bit words: exact in float64
        except (InvalidRequestError, ValueError, TypeError, IndexError, OverflowError) as exc:
            error, mark = exc, torch.zeros(5, dtype=torch.float64)
        refused = torch.tensor([float(error is not None)], dtype=torch.float64)
        flags = self._reduce_max(torch.cat([refused, mark, -mark]))
        if bool(flags[0] > 0):
            if error is not None:
                raise error
            raise InvalidRequestError(
                "another rank refused this deletion request (its message says why); nothing was changed: give every "
                "rank the same, valid ids"
            )
        if not torch.equal(flags[1:6], -flags[6:11]):
            raise InvalidRequestError(
                "the ranks were given different deletion requests (their ids differ); nothing was changed: every "
                "rank must be given the same global ids"
            )
        return ids

    def forget(self, ids: Sequence[int] | torch.Tensor, data: ShardedDataset, *, strict: bool = True) -> RemovalReport:
        """Validate global ids (identically on every rank), unlearn them over the group, then remove them.

        On any error (on every rank alike) model, bank, sampler and data are unchanged.
        """
        if not isinstance(data, ShardedDataset):
            raise TypeError("DistributedUnlearner.forget needs a ShardedDataset (see ShardedDataset.from_global)")
        self._agree_entry("forget")
        ids = self._agreed_ids(ids, data)
        batch = data.get(ids)
        # finiteness is checked per owner and agreed on, so that every rank refuses together; by the sorted ids,
        # the order the ranks agreed on (ranks given one request in two orders named the wrong id: stop 47's probe)
        agreed = torch.sort(ids).values
        bad = torch.zeros(agreed.numel(), dtype=torch.float64)
        mine = (agreed % data.world == data.rank).nonzero().flatten()
        for t in data.get(agreed)[:-1]:
            if t.is_floating_point() and mine.numel():
                rows = t[: mine.numel()].reshape(mine.numel(), -1)
                bad[mine[~torch.isfinite(rows).all(1).cpu()]] = 1.0
        self._reduce(bad)
        if bad.any():
            raise InvalidRequestError(
                f"removed data: id(s) {agreed[bad > 0][:5].tolist()} have NaN or infinite values; the data must be "
                "finite to compute its influence: fix or drop those rows"
            )
        state = data.state_dict()
        data.remove(ids)
        self._entered = True
        try:
            return self.remove(batch, data, len(data), n_removed=ids.numel(), strict=strict)
        except BaseException:
            data.load_state_dict(state)
            raise
        finally:
            self._entered = False


# ---------------------------------------------------------------------------------------------- ensembles
def ensemble_groups(chains: int) -> tuple[int, Group, int, int]:
    """Split the world into ``chains`` independent chains, each a data-parallel group of consecutive ranks.

    Every rank must call it (group creation is collective).

    Returns:
        ``(chain index, its process group, rank within it, its size)``.

    Raises:
        ValueError: the world size is not a multiple of ``chains``.
    """
    world = dist.get_world_size()
    if chains < 1 or world % chains:
        raise ValueError(f"cannot split {world} processes into {chains} equal chains; use a divisor of {world}")
    per = world // chains
    mine = None
    for c in range(chains):
        g = dist.new_group(ranks=list(range(c * per, (c + 1) * per)))
        if c == dist.get_rank() // per:
            mine = g
    chain = dist.get_rank() // per
    return chain, mine, dist.get_rank() % per, per


def gather_banks(bank: torch.Tensor | None, chains: int, dim: int) -> list[torch.Tensor]:
    """All-gather every chain's sample bank (``[S_c, D]``; sizes may differ) onto every rank.

    Call on every rank of the world after :func:`ensemble_groups` (ranks of one chain hold identical banks;
    the chain's first rank is the one read). Tensors only: no pickling.
    """
    world = dist.get_world_size()
    per = world // chains
    dev = _comm_device(None)
    local = torch.zeros(0, dim) if bank is None else bank.detach()
    size = torch.tensor([local.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    rows = max(int(s) for s in sizes)
    buf = torch.zeros(rows, dim, dtype=local.dtype, device=dev)
    buf[: local.shape[0]] = local.to(dev)
    out = [torch.zeros_like(buf) for _ in range(world)]
    dist.all_gather(out, buf)
    return [out[c * per][: int(sizes[c * per])].to(local.device) for c in range(chains)]


# ---------------------------------------------------------------------------------------------- CLI: forget
class _Stage:
    """Where this process is in a distributed request (drives the agreement protocol of :func:`run_forget`)."""

    value = "idle"


_STAGE = _Stage()

# agreement codes: every rank contributes one; all must be equal and non-zero to go on
FAIL, COMPUTE, NOTHING_TO_DO, COMMITTED = 0, 1, 2, 3


def agree(code: int, group: Group = None) -> int:
    """All-gather one integer per rank; return it when all ranks sent the same non-zero code.

    Raises:
        UnlearningError: some rank failed (sent 0) or the ranks disagree.
    """
    if _group_info(group)[1] == 1:
        return code
    dev = _comm_device(group)
    mine = torch.tensor([code], dtype=torch.int64, device=dev)
    codes = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(codes, mine, group=group)
    vals = [int(c) for c in codes]
    if code == FAIL:
        return FAIL
    failed = [r for r, v in enumerate(vals) if v == FAIL]
    if failed:
        raise UnlearningError(f"rank(s) {failed} failed this request (see their error); nothing was changed")
    if len(set(vals)) != 1:
        raise UnlearningError(f"ranks disagree on the request's state (codes {vals}); nothing was changed")
    return code


def apply_request(un: MCMCUnlearner, ids: Sequence[int], data: RemovableDataset) -> RemovalReport:
    """``un.forget(ids, data, strict=False)``, or its data-parallel version when launched by torchrun.

    The removal is applied in memory even when it fails a check (its report lists the problems): the deletion
    service's quality gate (:mod:`mcmc_unlearner.service.gate`) decides what is committed. Under torchrun every
    rank holds the full loaded model (same folder); the request is computed by a :class:`DistributedUnlearner`
    on the rank's shard, and the results (parameters, bank, sampler step size,
    shuffle state, unlearner generator and curvature cache) are written back into ``un`` and ``data``, so the
    caller commits exactly what a single process would have.
    """
    if not launched():
        from .service.gate import apply_removal

        return apply_removal(un, ids, data)
    from .service.checkpoint import unlearner_config
    from .service.state import saved_config

    cfg = unlearner_config(un)
    unsupported = []
    steps = cfg.get("newton_steps", 1)
    if (steps == "auto" or int(steps) > 1) and cfg.get("newton_target") == "equilibrium":
        unsupported.append(f"newton_steps={cfg['newton_steps']} with newton_target='equilibrium'")
    if cfg.get("recenter_every"):
        unsupported.append(f"recenter_every={cfg['recenter_every']}")
    if unsupported:
        raise ValueError(
            f"this model folder was saved with {' and '.join(unsupported)}, which a data-parallel request cannot "
            "run (each rank holds a shard, and these list every remaining row); run `mcmc-unlearner forget` in one "
            "process (without torchrun), or save the model with newton_steps=1 and recenter_every=0 for "
            "data-parallel requests; nothing was changed"
        )
    ctx = init_from_env(backend="gloo")  # the store loads on CPU: the CLI computes there
    _STAGE.value = "computing"
    agree(COMPUTE)
    shard = ShardedDataset.from_removable(data, ctx.rank, ctx.world)
    # the folder's newton_gate (on by default) runs in one process: left out, the ranks run without it (refused by
    # name; each report says why), and the folder keeps it for requests in one process
    cfg = {k: v for k, v in saved_config(un).items() if k != "newton_gate"}
    dun = DistributedUnlearner(un.model, un.sampler, bank=un.bank, **cfg)
    dun.generator.set_state(un.generator.get_state())
    dun.load_curvature_state(*un.curvature_state())
    report = dun.forget(ids, shard, strict=False)
    if un.newton_gate and un.newton_target == "equilibrium":
        # the folder's gate did not run: said where the search did not reach the gate (ran_config); only where one
        # process would have looked, as DistributedUnlearner says it (newton_target='relative' never looks)
        report.info.setdefault("newton_gate", GATE_OFF)
    data.load_state_dict(shard.state_dict())
    probe = un._dense_probe  # solver='auto''s weighing of its dense build, pending (it runs in one process only)
    un.reset_curvature()  # the state loaded with it is replaced by the request's below
    un.bank = dun.bank
    un.generator.set_state(dun.generator.get_state())
    tensors, meta = dun.curvature_state()
    if probe is not None:
        # the ranks ran the folder's dense solver unweighed: the weighing stays pending for its next request in one
        # process (loading the ranks' state, whose flag is False, had cleared it: never weighed from then on)
        meta = {**meta, "dense_weigh_pending": dict(probe)}
    un.load_curvature_state(tensors, meta)
    un.history.append(report)
    _STAGE.value = "computed"
    return report


def _follow_forget(model_dir: str, ids: Sequence[int], request_id: str | None, kwargs: dict[str, Any]) -> None:
    """What ranks other than 0 do for ``forget``: read one snapshot of the folder (no lock, nothing written)
    and join the computation."""
    from .service import checkpoint, requests
    from .service import ledger as ledger_mod
    from .service.deletion import threads_for, torch_threads

    id_list = [int(i) for i in as_id_tensor(ids).tolist()]
    rid = request_id or ledger_mod.request_id_for(id_list)
    overrides = requests.check_settings(kwargs.get("overrides"), kwargs.get("interface", "python"))
    loaded = checkpoint.load_model(model_dir, key=kwargs.get("key"))
    if any(e.get("request_id") == rid for e in loaded.requests):
        return  # already applied: rank 0 reports it (and refuses reused ids)
    un = checkpoint.with_config(loaded, overrides)
    with torch_threads(threads_for(kwargs.get("threads"), un.spec.dim)):
        apply_request(un, id_list, loaded.data)


def run_forget(
    forget_fn: Callable[..., Any],
    model_dir: str,
    ids: Sequence[int],
    *,
    request_id: str | None = None,
    **kwargs: Any,
) -> Any:
    """``mcmc-unlearner forget`` under torchrun: rank 0 runs ``forget_fn`` (lock, integrity check, load, gate,
    recovery, commit, ledger); the other ranks read one snapshot of the folder and join the collective
    computation.

    Ranks agree before computing and after rank 0's commit (:func:`agree`), so a failure on any rank makes all
    ranks fail with nothing written instead of hanging.

    Args:
        forget_fn: :func:`mcmc_unlearner.service.deletion.forget`.
        model_dir, ids, request_id: The request.
        kwargs: Further ``forget_fn`` arguments (``overrides``, ``on_failure``, ``key``, ``wait``, ...).

    Returns:
        ``forget_fn``'s result on rank 0, ``None`` on the other ranks.
    """
    owner = not dist.is_initialized()
    ctx = init_from_env(backend="gloo")  # the store loads on CPU: the CLI computes there
    try:
        out = _run_forget(ctx, forget_fn, model_dir, ids, request_id, kwargs)
        if owner:
            dist.barrier()  # tear down together: gloo aborts a process whose peer exits mid-teardown
        return out
    finally:
        if owner:
            dist.destroy_process_group()


def _run_forget(
    ctx: DistContext,
    forget_fn: Callable[..., Any],
    model_dir: str,
    ids: Sequence[int],
    request_id: str | None,
    kwargs: dict[str, Any],
) -> Any:
    # no recovery before the barrier: snapshots ignore crash debris, and rank 0 rolls it back only after the
    # folder's integrity was checked and the request computed
    dist.barrier()
    _STAGE.value = "loading"
    try:
        if ctx.rank == 0:
            out = forget_fn(model_dir, ids, request_id=request_id, **kwargs)
        else:
            out = None
            _follow_forget(model_dir, ids, request_id, kwargs)
    except BaseException:
        if _STAGE.value == "loading":
            agree(FAIL)
        elif _STAGE.value == "computed":
            agree(FAIL)  # rank 0's gate or commit failed after the computation
        _STAGE.value = "idle"
        raise
    stage, _STAGE.value = _STAGE.value, "idle"
    if stage == "loading":  # already applied: nothing computed
        agree(NOTHING_TO_DO)
    else:
        agree(COMMITTED)
    return out
