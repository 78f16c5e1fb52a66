"""The remaining training set: an in-memory view that forgets rows and draws minibatches forever.

Rows are identified by their 0-based position in the original tensors (the *id*). Removing ids never
copies data: a boolean mask marks what is left. Minibatches are drawn without worker processes, so a
sampler step costs an index-select, not a DataLoader start-up.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .errors import InvalidRequestError, all_finite

__all__ = ["RemovableDataset", "as_id_tensor", "epoch_samplers", "new_pass"]

Batch = tuple[torch.Tensor, ...]


def epoch_samplers(source: Any) -> list[Any]:
    """The shuffling ``DistributedSampler``s a ``DataLoader`` draws its rows from (its sampler, or its batch
    sampler's), each once: they shuffle by ``seed + epoch`` and give the same order on every pass until
    ``set_epoch`` is called."""
    from torch.utils.data import DistributedSampler

    found: list[Any] = []
    for obj in (getattr(source, "sampler", None), getattr(getattr(source, "batch_sampler", None), "sampler", None)):
        if isinstance(obj, DistributedSampler) and obj.shuffle and all(obj is not s for s in found):
            found.append(obj)
    return found


def new_pass(source: Iterable) -> Iterator:
    """``iter(source)``, first advancing the epoch of each shuffling ``DistributedSampler`` it draws from.

    A ``DataLoader(shuffle=True)`` draws a new order on every pass; over a ``DistributedSampler(shuffle=True)`` the
    order changes only with ``set_epoch``, so without it every pass (every request, and every restart within one)
    read the same minibatches. The epoch is advanced by one before each pass, identically on every rank (the ranks
    keep reading disjoint parts of one shared order); ``set_epoch`` by the caller still applies (the next pass reads
    the epoch after it).
    """
    for s in epoch_samplers(source):
        s.set_epoch(int(s.epoch) + 1)
    return iter(source)


_MAX_ID = 2**63 - 1
_UNSIGNED_WIDE = tuple(getattr(torch, n) for n in ("uint32", "uint64") if hasattr(torch, n))


def _python_int_ids(values: list, shape: tuple[int, ...]) -> np.ndarray:
    """Integer ids given as Python/numpy integer objects, as an int64 array (refusing what int64 cannot hold)."""
    vals = [int(v) for v in values]
    if max(vals) > _MAX_ID:  # Python ints numpy cannot hold as int64: too large, not "not integers"
        raise InvalidRequestError(f"deletion request: id {max(vals)} is too large; ids are row numbers below 2^63")
    if min(vals) < -_MAX_ID - 1:
        raise InvalidRequestError(f"deletion request: id {min(vals)} is negative; ids are row numbers from 0")
    return np.asarray(vals, dtype=np.int64).reshape(shape)


def as_id_tensor(ids: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Convert ids to a 1-D int64 tensor, refusing floats, booleans (also one among integers) and nested shapes.

    Python and numpy integers may be mixed (``[1, np.uint64(2)]``), read exactly (numpy alone would promote them to
    float64).

    Raises:
        InvalidRequestError: if ``ids`` are not integers or not one-dimensional.
    """
    if isinstance(ids, torch.Tensor) and ids.is_meta:
        raise InvalidRequestError("deletion request: the ids are a meta tensor (shapes only, no values): pass real ids")
    if isinstance(ids, (set, frozenset)) or isinstance(ids, Iterator):  # np.asarray made them one object
        ids = sorted(ids) if isinstance(ids, (set, frozenset)) else list(ids)  # a set has no order: ascending
    if isinstance(ids, torch.Tensor):
        t = ids.detach().cpu()
        if t.layout != torch.strided:  # a sparse tensor of ids: its values, as a plain tensor
            t = t.to_dense()
        if t.dtype in _UNSIGNED_WIDE and t.numel():  # torch has no max() for uint64: through numpy
            top = int(t.numpy().max())
            if top > _MAX_ID:  # would wrap to a negative int64
                raise InvalidRequestError(f"deletion request: id {top} is too large; ids are row numbers below 2^63")
    else:
        arr = np.asarray(ids)
        if arr.size and arr.dtype.kind != "b" and (not isinstance(ids, np.ndarray) or arr.dtype == object):
            try:  # the elements as given: numpy reads a bool among integers as 0/1, and int + uint64 as float64
                elems = np.asarray(ids, dtype=object).ravel().tolist() if arr.dtype != object else arr.ravel().tolist()
            except ValueError:  # a ragged nesting: refused below by its shape
                elems = []
            flag = next((v for v in elems if isinstance(v, (bool, np.bool_))), None)
            if flag is not None:
                raise InvalidRequestError(
                    f"deletion request: ids must be integers (row numbers), got the boolean {flag!r} among them; "
                    "pass row numbers only"
                )
            if arr.dtype.kind in "fO" and elems and all(isinstance(v, numbers.Integral) for v in elems):
                arr = _python_int_ids(elems, arr.shape)  # integer objects (mixed kinds, or beyond int64): exactly
        if arr.dtype.kind not in "iub" and arr.size:
            raise InvalidRequestError(f"deletion request: ids must be integers, got values of type {arr.dtype}")
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) > _MAX_ID:  # uint64 would wrap to negative
            raise InvalidRequestError(
                f"deletion request: id {int(arr.max())} is too large; ids are row numbers below 2^63"
            )
        if arr.dtype.byteorder not in "=|":  # big-endian ids (read from a file): torch.from_numpy refuses them
            arr = arr.astype(arr.dtype.newbyteorder("="))
        t = torch.from_numpy(arr.copy()) if arr.size else torch.empty(0, dtype=torch.int64)
        if arr.dtype.kind == "b":
            t = t.to(torch.bool)
    if t.dtype == torch.bool:  # a mask is not a list of ids; bools are not row numbers either
        raise InvalidRequestError(
            f"deletion request: ids must be integers (row numbers), got booleans of shape {tuple(t.shape)}; for a "
            "boolean mask over the rows pass its positions: mask.nonzero().flatten() (torch) or np.flatnonzero(mask)"
        )
    if t.is_floating_point() or t.is_complex():
        raise InvalidRequestError(f"deletion request: ids must be integers, got dtype {t.dtype}")
    if t.ndim == 0:
        raise InvalidRequestError(
            f"deletion request: ids must be a flat list, got the single number {t.item()}: pass [{t.item()}]"
        )
    if t.ndim != 1:
        raise InvalidRequestError(f"deletion request: ids must be a flat list, got shape {tuple(t.shape)}")
    return t.to(torch.int64)


def _version(t: torch.Tensor) -> int | None:
    """A tensor's in-place version counter (``None`` for an inference-mode tensor, which keeps none)."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


def cached_nonfinite(
    owner: Any, tensors: Sequence[torch.Tensor], alive: torch.Tensor, to_ids: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Sorted ids (``to_ids`` of the row positions) of the rows of ``tensors`` holding a NaN or an infinite value in
    a floating-point field, those ``alive`` (a mask over the ids) only; cached on ``owner``. The tensors are scanned
    once, again after one of them was changed in place, and on every call while a row found bad is alive: fixed
    through ``.data`` or ``.numpy()``, which leave the version counter alone, it was refused on as still bad (stop 45's
    review; an inference-mode tensor keeps no counter and is scanned every time)."""
    key = tuple((id(t), _version(t)) for t in tensors)
    stale = getattr(owner, "_nonfinite_key", None) != key or any(v is None for _, v in key)
    if stale or bool(alive[getattr(owner, "_nonfinite", torch.empty(0, dtype=torch.long))].any()):
        bad = torch.zeros(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
        for t in tensors:
            if t.is_floating_point() and not all_finite(t):
                bad |= ~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
        owner._nonfinite_key, owner._nonfinite = key, to_ids(bad.nonzero().flatten().cpu())
    ids = owner._nonfinite
    return ids[alive[ids]]


class RemovableDataset:
    """In-memory data set whose rows can be removed, with an endless shuffled minibatch iterator.

    ``next(ds)`` returns a tuple of tensors (one per input tensor) holding ``batch_size`` remaining rows;
    every remaining row is visited once per pass and the order is reshuffled each pass (the final partial
    batch of a pass is dropped, so all batches have the same size, unless fewer rows than ``batch_size``
    remain).

    Args:
        *tensors: Tensors sharing their first dimension (e.g. ``x, y``).
        batch_size: Minibatch size.
        seed: Seed of the shuffling generator (a private ``torch.Generator``; global RNG untouched).
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int = 64, seed: int = 0) -> None:
        if not tensors:
            raise ValueError("RemovableDataset needs at least one tensor")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError(f"all tensors must share their first dimension; got {[t.shape[0] for t in tensors]}")
        if n == 0:
            raise ValueError("RemovableDataset needs at least one row")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tensors: Batch = tuple(tensors)
        self.batch_size = int(batch_size)
        self.n_total = int(n)
        self.generator = torch.Generator().manual_seed(seed)
        self._alive = torch.ones(n, dtype=torch.bool)
        self._order = torch.empty(0, dtype=torch.int64)
        self._pos = 0

    # ----------------------------------------------------------------- bookkeeping
    def __len__(self) -> int:
        """Number of remaining rows."""
        return int(self._alive.sum())

    @property
    def remaining_ids(self) -> torch.Tensor:
        """Sorted ids of the rows still in the data set."""
        return torch.nonzero(self._alive).flatten()

    @property
    def removed_ids(self) -> torch.Tensor:
        """Sorted ids of the removed rows."""
        return torch.nonzero(~self._alive).flatten()

    def validate(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Check a deletion request without changing anything.

        Returns:
            The ids as a 1-D int64 tensor (request order kept).

        Raises:
            InvalidRequestError: empty request, non-integer ids, ids outside ``[0, n_total)``, ids repeated
                inside the request, ids already removed, or a request that would leave no data.
        """
        t = as_id_tensor(ids)
        if t.numel() == 0:
            raise InvalidRequestError("deletion request is empty: pass at least one training-example id")
        bad = t[(t < 0) | (t >= self.n_total)]
        if bad.numel():
            raise InvalidRequestError(
                f"deletion request: unknown id(s) {bad[:5].tolist()}; ids are row numbers in [0, {self.n_total})"
            )
        uniq, counts = torch.unique(t, return_counts=True)
        if (counts > 1).any():
            raise InvalidRequestError(
                f"deletion request: id(s) {uniq[counts > 1][:5].tolist()} appear more than once; list each id once"
            )
        gone = t[~self._alive[t]]
        if gone.numel():
            raise InvalidRequestError(
                f"deletion request: id(s) {gone[:5].tolist()} were already removed; drop them from the request"
            )
        if t.numel() >= len(self):
            raise InvalidRequestError(
                f"deletion request would remove all {len(self)} remaining examples; "
                "the posterior would be the prior: retrain from the prior instead"
            )
        return t

    def get(self, ids: Sequence[int] | torch.Tensor) -> Batch:
        """Rows ``ids`` of every tensor (removed rows included: use it to fetch data before removing)."""
        t = as_id_tensor(ids)
        return tuple(x[t] for x in self.tensors)

    def remove(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Remove rows after validating the request; on any error nothing changes.

        Returns:
            The removed ids as an int64 tensor.
        """
        t = self.validate(ids)
        self._alive[t] = False
        self._order = torch.empty(0, dtype=torch.int64)
        self._pos = 0
        return t

    def nonfinite_ids(self) -> torch.Tensor:
        """Sorted ids of the remaining rows holding a NaN or an infinite value in a floating-point field.

        The tensors are scanned once, again after one of them was changed in place, and on every call while a
        remaining row was found bad: a request reads only some minibatches, and a NaN row in none of them was used
        silently (or named by its place in a minibatch)."""
        return cached_nonfinite(self, self.tensors, self._alive, lambda rows: rows)

    # ----------------------------------------------------------------- sampling
    def _reshuffle(self) -> None:
        ids = self.remaining_ids
        self._order = ids[torch.randperm(ids.numel(), generator=self.generator)]
        self._pos = 0

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        bs = min(self.batch_size, len(self))
        if self._pos + bs > self._order.numel():
            self._reshuffle()
        idx = self._order[self._pos : self._pos + bs]
        self._pos += bs
        return tuple(x[idx] for x in self.tensors)

    def next_batches(self, count: int) -> list[Batch]:
        """Draw ``count`` consecutive minibatches."""
        return [next(self) for _ in range(count)]

    def remaining(self) -> Batch:
        """All remaining rows, in id order."""
        ids = self.remaining_ids
        return tuple(x[ids] for x in self.tensors)

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Mask and shuffling state (tensors only, safe to store)."""
        return {
            "alive": self._alive.clone(),
            "order": self._order.clone(),
            "pos": torch.tensor(self._pos),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned. Every entry is checked first; on any error nothing changes.

        Raises:
            ValueError: naming the entry that is missing or does not fit this data set, and the fix.
        """
        try:
            alive, order, pos, gen = self._checked_state(state)
        except ValueError as e:
            if "state_dict() returned" in str(e):
                raise
            raise ValueError(f"{e}: pass what this data set's state_dict() returned, unedited") from None
        self.generator.set_state(gen)
        self._alive = alive.clone()
        self._order = order.clone()
        self._pos = pos

    def _checked_state(self, state: dict) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """:meth:`load_state_dict`'s checks: the mask, order, position and generator state, as they will be set."""
        where = "data set state"
        absent = [k for k in ("alive", "order", "pos", "generator") if k not in state]
        if absent:
            raise ValueError(f"{where} lacks {absent}: pass what state_dict() returned")
        alive, order, pos, gen = (state[k] for k in ("alive", "order", "pos", "generator"))
        if not isinstance(alive, torch.Tensor) or alive.dtype != torch.bool or tuple(alive.shape) != (self.n_total,):
            got = (
                f"dtype {alive.dtype}, shape {tuple(alive.shape)}"
                if isinstance(alive, torch.Tensor)
                else type(alive).__name__
            )
            raise ValueError(
                f"{where}: 'alive' must be a bool mask of this data set's {self.n_total} rows (dtype torch.bool), "
                f"got {got}"
            )
        alive = alive.detach().cpu()
        if not bool(alive.any()):
            raise ValueError(f"{where}: 'alive' marks every row removed; a data set keeps at least one row")
        if (
            not isinstance(order, torch.Tensor)
            or order.ndim != 1
            or order.is_floating_point()
            or order.is_complex()
            or order.dtype == torch.bool
        ):
            got = f"{order.dtype} {tuple(order.shape)}" if isinstance(order, torch.Tensor) else type(order).__name__
            raise ValueError(f"{where}: 'order' must be a 1-D integer tensor of row ids, got {got}")
        order = order.detach().cpu().to(torch.int64)
        if order.numel() and (int(order.min()) < 0 or int(order.max()) >= self.n_total):
            raise ValueError(f"{where}: 'order' holds ids outside [0, {self.n_total})")
        if order.numel() and not bool(alive[order].all()):
            raise ValueError(
                f"{where}: 'order' holds removed row(s) {order[~alive[order]][:5].tolist()}: it must come from the "
                "same state_dict() as 'alive'"
            )
        if torch.unique(order).numel() != order.numel():
            raise ValueError(f"{where}: 'order' lists a row more than once")
        if isinstance(pos, torch.Tensor):
            if pos.numel() != 1 or pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
                raise ValueError(f"{where}: 'pos' must be one integer, got {pos.dtype} {tuple(pos.shape)}")
            pos = int(pos.reshape(()).item())
        elif isinstance(pos, numbers.Integral) and not isinstance(pos, (bool, np.bool_)):
            pos = int(pos)
        else:
            raise ValueError(f"{where}: 'pos' must be one integer, got {type(pos).__name__}")
        if not 0 <= pos <= order.numel():
            raise ValueError(f"{where}: 'pos' {pos} is outside [0, {order.numel()}] (the length of 'order')")
        try:  # torch checks the generator state's size and content; on a scratch generator first
            torch.Generator().set_state(gen)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"{where}: 'generator' is not a CPU generator state ({e})") from e
        return alive, order, pos, gen
