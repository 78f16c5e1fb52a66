"""The data a request reads: its removed rows checked as a batch (a tuple of finite tensors, one row per data point),
and the remaining data as an endless stream of minibatches (:class:`_Stream`), with what a source says without a pass
over it: its row count, its labels (the emptied-label check), whether its order is a uniform sample, and the
generators it draws from (put back after a discarded proposal)."""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .curvature import stack_batches
from .data import new_pass
from .errors import InvalidRequestError, all_finite, outside_stacklevel
from .memory import format_bytes
from .options import shown_value
from .step import is_integer

Batch = tuple[torch.Tensor, ...]


def check_finite_batch(
    batch: Batch, what: str = "removed data", where: str = "of the request", ids: torch.Tensor | None = None
) -> None:
    """Refuse NaN or infinite values in a batch, naming the offending rows (by their ``ids`` when given: a data
    set's row ids, which a position among its remaining rows was mistaken for)."""
    for i, t in enumerate(batch):
        if t.is_floating_point() and not all_finite(t):
            rows = torch.nonzero(~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)).flatten()[:5]
            named = f"row(s) {rows.tolist()} {where}" if ids is None else f"the rows with id(s) {ids[rows].tolist()}"
            raise InvalidRequestError(
                f"{what}: field {i} has NaN or infinite values in {named}; "
                "the data must be finite to compute its influence: fix or drop those rows"
            )


#: The way out for variable-length sequences handed over packed (the unlearner selects, joins and stacks rows).
PACKED_FIX = (
    "; a PackedSequence cannot be split into rows or joined with other minibatches: pad the sequences to one tensor "
    "[B, L, F] of one fixed length L for every row (torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True), then "
    "zeros up to L), give their lengths as another field, (x_padded, lengths, y), or as a validity channel of 1s and "
    "0s in F, and pack inside forward: pack_padded_sequence(x, lengths.cpu(), batch_first=True, "
    "enforce_sorted=False); nothing was changed"
)


#: The way out for data handed over as numpy arrays (the unlearner indexes, joins and differentiates through tensors).
NUMPY_FIX = (
    "convert each array with torch.from_numpy(a) (torch.as_tensor(a, dtype=...) to change its dtype: the dtypes the "
    "model was trained on, e.g. float32 features and int64 class labels), as the minibatches your nll reads are "
    "tensors; nothing was changed"
)


#: The way out for sparse batch fields (the unlearner selects, hashes and joins rows of dense tensors).
SPARSE_FIX = (
    "the unlearner selects, joins and hashes rows of dense tensors; pass the field dense (t.to_dense()), and turn it "
    "sparse again inside forward if the model needs it (x.to_sparse()); nothing was changed"
)


def _numpy_fields(batch: Any) -> list[int]:
    """The positions of a tuple's or list's fields that are numpy arrays (``[0]`` for a bare array)."""
    if isinstance(batch, np.ndarray):
        return [0]
    if isinstance(batch, (tuple, list)):
        return [i for i, t in enumerate(batch) if isinstance(t, np.ndarray)]
    return []


def _sparse(t: Any) -> bool:
    """Whether ``t`` is a tensor of a layout other than dense (strided): sparse, sparse CSR, ..."""
    return isinstance(t, torch.Tensor) and t.layout != torch.strided


def _refuse_numpy_source(source: Any) -> None:
    """Refuse remaining data given as numpy arrays (a tuple of arrays, or a list of minibatches of arrays), naming the
    conversion: it was asked for ``n_remaining=``, then told to pass the rows as one batch; and a tuple of rows with a
    sparse field, naming ``to_dense``."""
    if not isinstance(source, (tuple, list)):
        return
    sparse = [i for i, t in enumerate(source) if _sparse(t)]
    if sparse:  # (its finiteness test crashed in torch: aten::aminmax has no sparse kernel)
        raise TypeError(f"field(s) {sparse} of the remaining data are sparse tensors: {SPARSE_FIX}")
    sparse = [i for i, b in enumerate(source) if isinstance(b, (tuple, list)) and any(_sparse(t) for t in b)]
    if sparse:  # (joined as the remaining rows, a list of them failed in torch: "reshape is not implemented")
        shown = f"{sparse[:5]}{' and more' if len(sparse) > 5 else ''}"
        raise TypeError(f"the remaining data's minibatch(es) {shown} hold sparse tensor(s): {SPARSE_FIX}")
    fields = _numpy_fields(source)
    where = f"field(s) {fields} of the remaining data are" if fields else ""
    if not fields:
        listed = [i for i, b in enumerate(source) if _numpy_fields(b)]
        if not listed:
            return
        where = f"the remaining data's minibatch(es) {listed[:5]}{' and more' if len(listed) > 5 else ''} hold"
    raise TypeError(f"{where} numpy array(s), not tensors: {NUMPY_FIX}")


def _as_batch(batch: Any, what: str = "a batch") -> Batch:
    """``batch`` as a tuple of tensors with one row per data point (a bare tensor is one field).

    Raises:
        TypeError: a mapping (e.g. ``{"x": ..., "y": ...}``) or a field that is not a tensor (a ``PackedSequence``:
            the message says how to pad the sequences instead).
        ValueError: fields with different numbers of rows.
    """
    if isinstance(batch, torch.Tensor):
        return (_plain(batch, what, 0),)
    if isinstance(batch, torch.nn.utils.rnn.PackedSequence):  # a namedtuple of tensors, none of them one per row
        raise TypeError(f"{what} is a PackedSequence, not a tuple of tensors (one row per data point){PACKED_FIX}")
    if isinstance(batch, Mapping):
        keys = ", ".join(repr(k) for k in list(batch)[:4])
        raise TypeError(
            f"{what} is a dict (keys {keys}); the unlearner takes batches as tuples of tensors, one row per data "
            "point, in the order your nll reads them: e.g. remaining = [(b['x'], b['y']) for b in loader] (a list "
            "is read again as often as a request needs) with n_remaining=len(loader.dataset) (a list of minibatches "
            "has no row count), or a DataLoader whose collate_fn returns a tuple; nll = lambda m, b: "
            "...(m(b[0]), b[1]), and the removed rows as (x, y)"
        )
    numpy_fields = _numpy_fields(batch)
    if numpy_fields:  # (an array is iterable: it was told to pass its rows as one batch, next(iter(loader)))
        bare = isinstance(batch, np.ndarray)
        named = "is a numpy array" if bare else f"has numpy array(s) in field(s) {numpy_fields}"
        raise TypeError(f"{what} {named}, not tensors: {NUMPY_FIX}")
    if not isinstance(batch, (tuple, list)):
        hint = (
            ": pass its rows as one batch, e.g. (x[ids], y[ids]) or next(iter(loader))"
            if isinstance(batch, Iterable)
            else ""
        )
        raise TypeError(f"{what} must be a tensor or a tuple of tensors, got {type(batch).__name__}{hint}")
    out = tuple(batch)
    bad = [f"field {i} is a {type(t).__name__}" for i, t in enumerate(out) if not isinstance(t, torch.Tensor)]
    if bad or not out:
        packed = any(isinstance(t, torch.nn.utils.rnn.PackedSequence) for t in out)
        raise TypeError(
            f"{what} must be a tuple of tensors (one row per data point): {', '.join(bad) or 'empty'}"
            + (PACKED_FIX if packed else "")
        )
    rows = [t.shape[0] if t.ndim else None for t in out]
    if len(set(rows)) != 1 or rows[0] is None:
        one = " (a single row keeps its row dimension: x[i:i+1], not x[i])" if None in rows else ""
        raise ValueError(f"{what}: its fields must share their first (row) dimension, got rows {rows}{one}")
    return tuple(_plain(t, what, i) for i, t in enumerate(out))


def _plain(t: torch.Tensor, what: str, i: int) -> torch.Tensor:
    """A batch field as the unlearner reads it: refused where it is not a dense (strided) tensor, detached from the
    caller's graph where it requires grad (every gradient taken through it, the removed rows' ``G`` included, held
    a graph back to the caller's tensor, and torch warned on reading ``G``'s norm); the caller's tensor untouched."""
    if t.layout != torch.strided:
        raise TypeError(f"{what}: field {i} is a {t.layout} tensor: {SPARSE_FIX}")
    return t.detach() if t.requires_grad else t


def _row_ids(batch: Batch) -> torch.Tensor:
    """One integer per row, equal for rows identical in every field (for finding repeated rows)."""
    k = batch[0].shape[0]
    keys = torch.zeros(k, 0, dtype=torch.int64)
    for t in batch:
        _, inv = torch.unique(_flat_real(t), dim=0, return_inverse=True)  # (torch.unique(dim=0) has no complex)
        keys = torch.cat([keys, inv.reshape(k, 1)], 1)
    return torch.unique(keys, dim=0, return_inverse=True)[1]


def _repeated_rows(removed: Batch, held: Batch | None = None) -> int:
    """How many removed rows repeat an earlier one (``held`` None), or how many of ``held`` equal a removed row."""
    k = removed[0].shape[0]
    if held is None:
        return k - int(torch.unique(_row_ids(removed)).numel())
    if len(held) != len(removed) or any(
        a.shape[1:] != b.shape[1:] or a.dtype != b.dtype for a, b in zip(removed, held)
    ):
        return 0  # not comparable (e.g. padded to other lengths)
    ids = _row_ids(tuple(torch.cat([a, b]) for a, b in zip(removed, held)))
    return int(torch.isin(ids[k:], ids[:k]).sum())


_HASH_ROWS = 4096  # rows hashed at a time (an int64 copy of that many rows)
_KEY_COLUMNS = 16  # the columns of each field a row's hash reads (the removed rows' most varied)


def _flat_real(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, columns]`` of real numbers (a complex number as two); zero rows too (``reshape(0, -1)``
    refused them: a rank whose share of a request is empty crashed in the removed-rows-kept check, stop 70)."""
    r, width = t.shape[0], math.prod(t.shape[1:])
    flat = t.detach().reshape(r, width)
    return torch.view_as_real(flat).reshape(r, 2 * width) if flat.is_complex() else flat


def _row_hashes(t: torch.Tensor) -> torch.Tensor:
    """One int64 per row, equal for rows equal by value (their bits times fixed odd weights, summed with wrap-around:
    exact integer arithmetic, so the same in any order); rows that differ rarely share one."""
    r = t.shape[0]
    flat = _flat_real(t)
    width = flat.shape[1]
    w = torch.randint(1, 2**62, (width,), generator=torch.Generator().manual_seed(0), dtype=torch.int64) | 1
    w = w.to(flat.device)
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    out = torch.empty(r, dtype=torch.int64, device=flat.device)
    for i in range(0, r, _HASH_ROWS):
        c = flat[i : i + _HASH_ROWS]
        if c.is_floating_point():  # + 0.0: −0.0 as 0.0 (equal by value); the data are finite (checked before)
            c = (c + 0.0).contiguous().view(ints[c.element_size()])
        out[i : i + _HASH_ROWS] = (c.to(torch.int64) * w).sum(1)
    return out


def _removed_rows_held(removed: Batch, held: Batch) -> int:
    """How many of the removed rows ``held`` holds by value, counted with multiplicity (a removed row given twice
    counts twice only where ``held`` has it twice): every removed row where the remaining data still hold the rows
    removed, few where some rows merely coincide by value (a Markov chain's repeated states). Every held row is
    compared, by an integer hash of its bits and then exactly; 0 where the fields are not comparable."""
    k = removed[0].shape[0]
    if (
        k == 0
        or len(held) != len(removed)
        or any(a.shape[1:] != b.shape[1:] or a.dtype != b.dtype for a, b in zip(removed, held))
    ):
        return 0  # none to find (a rank whose share is empty), or not comparable (e.g. padded to other lengths)
    keep = torch.ones(held[0].shape[0], dtype=torch.bool, device=held[0].device)
    for a, b in zip(removed, held):  # candidates: rows whose every field's hash is some removed row's ...
        a, b = _flat_real(a), _flat_real(b)
        if a.shape[1] > _KEY_COLUMNS:  # ... on the columns where the removed rows vary most (rows equal by value
            # are equal there): hashing every column of 60,000 x 784 rows took 0.86 s a request, these 0.02 s
            cols = a.double().var(0, correction=0).topk(_KEY_COLUMNS).indices  # one removed row: all 0, any
            a, b = a[:, cols], b[:, cols.to(b.device)]
        keep &= torch.isin(_row_hashes(b), _row_hashes(a).to(b.device))
    if not bool(keep.any()):
        return 0
    ids = _row_ids(tuple(torch.cat([a, b[keep].to(a.device)]) for a, b in zip(removed, held)))
    size = int(ids.max()) + 1
    have = torch.bincount(ids[:k], minlength=size), torch.bincount(ids[k:], minlength=size)
    return int(torch.minimum(*have).sum())


def _is_fields(source: Any) -> bool:
    """Whether ``source`` is a tuple of tensors with one row per data point (the data, not batches): ``(x, y)``, or
    ``(x,)`` for data without labels (an autoencoder's, a density model's), as the removed rows are given.

    Two or more tensors of identical shapes are not taken as fields: a tuple of one-field minibatches (``(b1, b2)``,
    each ``[B, d]``) was always read as minibatches, and reading it as the rows ``(x, y)`` would silently drop ``b2``.
    A single tensor drops nothing: ``(x,)`` was read as one minibatch repeated, and told to pass ``n_remaining=``
    (stop 54's probe).
    """
    return (
        isinstance(source, tuple)
        and len(source) >= 1
        and all(isinstance(t, torch.Tensor) and t.ndim > 0 for t in source)
        and len({t.shape[0] for t in source}) == 1
        and (len(source) == 1 or len({tuple(t.shape) for t in source}) > 1)
        and source[0].shape[0] > 0
    )


_UNKNOWN = object()


def _drawing_sampler(loader: Any) -> Any:
    """The sampler whose indices a ``DataLoader`` batches (``None`` without one), or ``_UNKNOWN`` for a
    ``batch_sampler`` of the user's own: the loader then reports a ``SequentialSampler`` over its whole dataset that
    it never uses (read as such, a loader whose own batches drew only the remaining ids counted every row of the
    full dataset as remaining and had its labels read from it, stop 45's probe)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    own = torch.utils.data.BatchSampler
    # a subclass with its own __iter__ may not draw from its .sampler at all (stop 45's review)
    if batch_sampler is not None and not (
        isinstance(batch_sampler, own) and type(batch_sampler).__iter__ is own.__iter__
    ):
        return _UNKNOWN
    return getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)


def _loader_selection(loader: Any) -> tuple[Any, torch.Tensor | None] | None:
    """The dataset under a ``DataLoader``'s ``Subset``s and the indices into it of every row the loader reads
    (``None``: all of them), where that can be told without a pass: the default collate function, and a random or
    sequential sampler (every row), a ``DistributedSampler`` (every row: the ranks split them), a
    ``SubsetRandomSampler`` (its indices) or a ``WeightedRandomSampler`` (the rows of non-zero weight); else
    ``None``."""
    data = torch.utils.data
    ds = getattr(loader, "dataset", None)
    if ds is None or getattr(loader, "collate_fn", None) is not data.default_collate:
        return None
    to_base = None  # the outermost dataset's positions in the dataset under the Subsets
    while isinstance(ds, data.Subset):
        sub = torch.as_tensor(list(ds.indices), dtype=torch.long)
        to_base, ds = (sub if to_base is None else sub[to_base]), ds.dataset
    inner = _drawing_sampler(loader)
    if isinstance(inner, data.SubsetRandomSampler):
        pick = torch.as_tensor(list(inner.indices), dtype=torch.long)
    elif isinstance(inner, data.WeightedRandomSampler):
        pick = torch.nonzero(torch.as_tensor(inner.weights) > 0).flatten()
    elif inner is None or isinstance(inner, (data.RandomSampler, data.SequentialSampler, data.DistributedSampler)):
        pick = None
    else:
        return None
    if pick is None:
        return ds, to_base
    return ds, pick if to_base is None else to_base[pick]


def _loader_labels(loader: Any) -> torch.Tensor | None:
    """The labels (second field) of every row a ``DataLoader`` reads, where that can be read without a pass
    (:func:`_loader_selection`) from a ``TensorDataset`` (its second tensor) or a dataset with torchvision's
    ``targets`` (one integer label per row: ``MNIST``, ``FashionMNIST``, ``CIFAR10``, ``ImageFolder``); else
    ``None``."""
    selected = _loader_selection(loader)
    labels = None if selected is None else _dataset_labels(selected[0])
    if labels is None:
        return None
    return labels if selected[1] is None else labels[selected[1]]


def _loader_tensors(loader: Any) -> Batch | None:
    """Every row a ``DataLoader`` over a ``TensorDataset`` (or a ``Subset`` of one) reads, all its fields, without a
    pass (:func:`_loader_selection`); ``None`` for other datasets, whose rows only a pass would read."""
    selected = _loader_selection(loader)
    if selected is None or not isinstance(selected[0], torch.utils.data.TensorDataset):
        return None
    ds, index = selected
    return tuple(ds.tensors) if index is None else tuple(t[index] for t in ds.tensors)


def _dataset_labels(ds: Any) -> torch.Tensor | None:
    """A dataset's labels, one per row, without reading a row: a ``TensorDataset``'s second tensor, or torchvision's
    ``targets`` attribute (a tensor or a list of integers as long as the dataset, and no ``target_transform``
    that would change them on reading); ``None`` otherwise."""
    if isinstance(ds, torch.utils.data.TensorDataset):
        return ds.tensors[1] if len(ds.tensors) > 1 else None
    targets = getattr(ds, "targets", None)
    if targets is None or isinstance(targets, (str, bytes)) or getattr(ds, "target_transform", None) is not None:
        return None
    try:
        labels = torch.as_tensor(targets)
        rows = len(ds)
    except (TypeError, ValueError, RuntimeError):
        return None
    if labels.dim() != 1 or labels.shape[0] != rows or labels.is_floating_point() or labels.dtype == torch.bool:
        return None
    return labels


def _loader_rows(loader: Any) -> int:
    """The number of distinct rows a ``DataLoader`` reads: its dataset's length, unless its sampler draws from a
    subset of it (``SubsetRandomSampler(keep)``, a ``WeightedRandomSampler`` with zero weights on the removed
    rows), the common ways of leaving deleted rows out of a loader over the full dataset.

    Raises:
        ValueError: a sampler of another kind that draws a different number of rows than the dataset holds, or a
            ``batch_sampler`` of the user's own (which of them remain cannot be read: pass ``n_remaining``).
    """
    rows = len(loader.dataset)
    inner = _drawing_sampler(loader)
    if inner is _UNKNOWN:
        raise ValueError(
            f"pass n_remaining= (the number of remaining data points): the DataLoader draws its minibatches with a "
            f"batch_sampler of its own ({type(loader.batch_sampler).__name__}), so how many of the dataset's "
            f"{rows:,} rows remain cannot be read from it"
        )
    if isinstance(inner, torch.utils.data.SubsetRandomSampler):
        return len({int(i) for i in inner.indices})
    if isinstance(inner, torch.utils.data.WeightedRandomSampler):
        return int((torch.as_tensor(inner.weights) > 0).sum())
    if isinstance(inner, (torch.utils.data.RandomSampler, torch.utils.data.SequentialSampler)) or inner is None:
        return rows
    try:
        drawn = len(inner)
    except TypeError:
        drawn = rows
    if drawn != rows:
        raise ValueError(
            f"pass n_remaining= (the number of remaining data points): the DataLoader's sampler "
            f"({type(inner).__name__}) draws {drawn:,} rows per epoch of a dataset of {rows:,}, so which of them "
            "remain cannot be read from it"
        )
    return rows


def _check_loader_order(loader: Any, warn: bool = True) -> None:
    """Refuse or warn about a ``DataLoader`` whose minibatches are not a uniform sample of the remaining rows.

    Each request draws a fixed number of minibatches from a fresh iterator over the loader, and treats them as a
    uniform sample of the remaining rows (``n/|B|`` times their sum). A ``WeightedRandomSampler`` drawing with
    replacement by unequal weights reweights the curvature and the safety check silently (a conjugate regression,
    half its rows at weight 2: 0.81 of the exact shift; at 0.01: 4.0x); a sequential sampler (``shuffle=False``,
    the ``DataLoader`` default) makes every request read the same first minibatches (1,000 of 3,600 rows: 0.37 of
    the exact shift), and with ``drop_last=True`` never reads the tail.

    A ``DistributedSampler(shuffle=False)`` is warned about as a sequential one. A ``batch_sampler`` of the user's
    own is not judged (``DataLoader`` then reports a ``SequentialSampler`` it never uses).

    Raises:
        ValueError: a ``WeightedRandomSampler`` with replacement and unequal positive weights.
    """
    if not (hasattr(loader, "dataset") and hasattr(loader, "batch_sampler")):
        return
    from torch.utils.data import DistributedSampler

    if loader.batch_sampler is None or _drawing_sampler(loader) is _UNKNOWN:
        return  # no batches (batch_size=None), or the user's own (or own __iter__): their sampler is unknown
    inner = loader.batch_sampler.sampler
    if isinstance(inner, torch.utils.data.WeightedRandomSampler) and inner.replacement:
        w = torch.as_tensor(inner.weights, dtype=torch.float64)
        w = w[w > 0]
        if w.numel() and bool((w != w[0]).any()):
            raise ValueError(
                "the remaining data's DataLoader draws rows by a WeightedRandomSampler with unequal weights "
                f"({float(w.min()):.3g} to {float(w.max()):.3g}): the unlearner reads its minibatches as a uniform "
                "sample of the remaining rows, so the curvature and the safety check would be silently reweighted. "
                "Pass a loader that draws every remaining row equally, e.g. DataLoader(dataset, batch_size=..., "
                "shuffle=True) or SubsetRandomSampler(remaining_ids) (a likelihood weighted per row belongs in nll)"
            )
    fixed = isinstance(inner, torch.utils.data.SequentialSampler) or (
        isinstance(inner, DistributedSampler) and not inner.shuffle
    )
    if warn and fixed:
        try:
            batches = len(loader)
        except TypeError:
            return
        if batches > 1:
            warnings.warn(
                "the remaining data's DataLoader reads its rows in a fixed order (shuffle=False): every request "
                "restarts it, so its curvature and safety check read the same first minibatches"
                + (" and never the rows drop_last leaves out" if getattr(loader, "drop_last", False) else "")
                + ", which are not a sample of all remaining rows when the data are ordered (e.g. by class). Pass "
                "DataLoader(..., shuffle=True), or the rows themselves as (x, y)",
                stacklevel=outside_stacklevel(),
            )


#: A request's stream reads the second field's values of the minibatches it counted (``_Stream.seen_labels``) once
#: this many rows are pending, else when asked or the request returns (``_Stream.used``): a bound on the copies held
#: (8 bytes a row for int64 labels)
LABELS_PENDING_ROWS = 1 << 20
#: Rows each curvature draw gets at least from a data source of small minibatches (pooled; see ``_Stream.stacked``).
MIN_CURVATURE_ROWS = 32


def _same_shapes(parts: Sequence[Batch]) -> None:
    """Refuse minibatches whose fields differ beyond the row dimension (sequences padded to each minibatch's own
    longest), which cannot be joined or stacked: torch's bare "Sizes of tensors must match" otherwise."""
    for i, field_parts in enumerate(zip(*parts)):
        shapes = {tuple(t.shape[1:]) for t in field_parts}
        if len(shapes) > 1:
            raise InvalidRequestError(
                f"the remaining data's minibatches differ in shape beyond the row dimension (field {i}: "
                f"{sorted(shapes)[:3]}), e.g. sequences padded to each minibatch's longest; the unlearner joins and "
                "stacks minibatches, so pad every minibatch to one fixed length in your collate_fn (with the mask "
                "marking the padding, as your nll reads it)"
            )


def _concat(parts: Sequence[Batch]) -> Batch:
    """Minibatches joined along their rows (checked by :func:`_same_shapes`)."""
    _same_shapes(parts)
    return tuple(torch.cat(f) for f in zip(*parts))


def _minibatch_list(source: Any) -> list[Batch] | None:
    """The minibatches of a list (or tuple) of them held in memory, ``[(x1, y1), (x2, y2), ...]``, each as a tuple;
    ``None`` for anything else. Every minibatch a tuple or list of as many tensors, each with one row per data point;
    a minibatch list whose fields differ beyond the row dimension is refused by :func:`_same_shapes` (stop 61's
    probe: such a list was told to pass ``n_remaining=``, though it holds every remaining row and its length is the
    sum of its minibatches'). :class:`_Stream` reads it as the rows it joins unless a row appears twice
    (:func:`_repeated_rows_hashed`)."""
    if not isinstance(source, (list, tuple)) or not source:
        return None
    if not all(isinstance(b, (tuple, list)) and b and all(isinstance(t, torch.Tensor) for t in b) for b in source):
        return None
    if len({len(b) for b in source}) > 1 or not all(
        all(t.ndim > 0 for t in b) and len({t.shape[0] for t in b}) == 1 for b in source
    ):
        return None
    parts = [tuple(b) for b in source]
    _same_shapes(parts)
    return parts


def _repeated_rows_hashed(rows: Batch) -> int:
    """:func:`_repeated_rows` of ``rows`` in memory bounded by :func:`_repeated_rows_bytes`. A row whose integer hash
    (:func:`_row_hashes`) on a few columns of each field (those of most variance among its first rows) no other row
    shares is distinct; the others are hashed on every column, and each compared exactly with the first row of its
    hash (all rows so compared, where two rows share a hash but differ). 60,000 rows of 784 floats: see
    ``benchmarks/list_rows.py`` (``torch.unique`` over the rows took 0.52-0.57 CPU s and 370 MiB)."""
    r = int(rows[0].shape[0])
    flats = [_flat_real(t) for t in rows]
    keys = []
    for f in flats:
        if f.shape[1] > _KEY_COLUMNS:
            cols = f[:_HASH_ROWS].double().var(0, correction=0).topk(_KEY_COLUMNS).indices
            f = f[:, cols]
        keys.append(_row_hashes(f))
    idx = torch.arange(r, device=flats[0].device)
    idx = idx[_shared(torch.stack(keys, 1))]  # rows that may repeat another
    if not idx.numel():
        return 0
    keys = [torch.cat([_row_hashes(f[c]) for c in idx.split(_HASH_ROWS)]) for f in flats]
    inv = torch.unique(_one_key(torch.stack(keys, 1)), return_inverse=True)[1]
    order = torch.arange(idx.numel(), device=idx.device)
    first = torch.full((int(inv.max()) + 1,), idx.numel(), dtype=torch.int64, device=idx.device)
    first = first.scatter_reduce(0, inv, order, "amin")[inv]  # each candidate's first of its hash
    later = torch.nonzero(first != order).flatten()
    for c in later.split(_HASH_ROWS):
        if not all(bool((f[idx[c]] == f[idx[first[c]]]).all()) for f in flats):
            return _repeated_rows(tuple(t[idx] for t in rows))  # rows that differ share every hash (rare)
    return int(later.numel())


def _one_key(keys: torch.Tensor) -> torch.Tensor:
    """One int64 per row of ``keys`` (``[rows, k]``), equal for equal rows (:func:`_row_hashes` of its columns):
    ``torch.unique`` over one column is several times faster than over rows."""
    return keys[:, 0] if keys.shape[1] == 1 else _row_hashes(keys)


def _shared(keys: torch.Tensor) -> torch.Tensor:
    """Which rows of ``keys`` (``[rows, k]``) share their key with another row."""
    _, inv, counts = torch.unique(_one_key(keys), return_inverse=True, return_counts=True)
    return counts[inv] > 1


def _repeated_rows_bytes(rows: int, fields: Sequence[tuple[int, int]]) -> int:
    """Bytes :func:`_repeated_rows_hashed` holds at most for ``rows`` rows of ``fields`` (values per row, bytes per
    value; without its rare exact fallback): a chunk of a field's rows gathered, copied (``+ 0.0``), as int64 and
    their products (three chunks of int64 at most: a float32 row's 4 + 4 + 8 + 8 bytes a value, a float64's 8 + 8 + 8),
    and a few int64 per row and field for the hashes and their order. Peak resident memory above the rows (glibc's
    mmap threshold fixed at 1 MiB, so freed chunks leave): 60,000 rows of 784 floats 26 MiB, with half of them
    repeated (every repeat a candidate, hashed on every column) 81-83 MiB, 79 MiB planned (54 MiB before a review,
    which counted two chunks); 2,000,000 narrow rows of 1-4 fields 56-112 bytes a row, 80-128 planned (64-112)."""
    widest = max(width * max(item, 8) for width, item in fields)
    return 3 * min(rows, _HASH_ROWS) * widest + 8 * rows * (2 * len(fields) + 8)


class _JoinedList:
    """The rows a list of minibatches joins (:class:`_Stream`), kept for the next request while the list is
    unchanged: the same list object and length, the same tensors (held weakly) of the same shapes, dtypes and
    devices, and equal to the rows kept. The values are compared every time, so no write goes unseen (a review: kept
    on the tensors' ``_version`` counters alone, writes into the numpy array under ``torch.from_numpy``, through
    ``.data`` or through another tensor on the same storage were read as the rows kept before them). A list in which
    a row repeats is not kept (its rows are not, to compare). 60,000 rows of 784 floats in minibatches of 128 were
    joined and searched on every request (0.7-0.85 CPU s); comparing the list with the rows kept costs a read of both
    (0.04-0.06 s)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._refs: list[weakref.ref] = []
        self.rows: Batch | None = None  # the joined rows (None: a row repeats, the list is read as minibatches)
        self.repeated = 0
        self.finite = False  # the joined rows were checked finite

    @staticmethod
    def _key_of(source: Any, tensors: list[torch.Tensor]) -> tuple:
        # (what torch.equal below does not tell: the values are compared there)
        return (id(source), len(source), *[(tuple(t.shape), t.dtype, t.device) for t in tensors])

    def get(self, source: Any, parts: list[Batch]) -> bool:
        """Whether the kept rows are those of ``source`` (its minibatches ``parts``)."""
        if self.rows is None:
            return False
        tensors = [t for b in parts for t in b]
        mine = list(self.rows)
        if not (
            self._key is not None
            and len(tensors) + len(mine) == len(self._refs)
            and all(r() is t for r, t in zip(self._refs, tensors + mine))
            and self._key == self._key_of(source, tensors + mine)
        ):
            return False
        start = 0
        for b in parts:
            end = start + int(b[0].shape[0])
            if not all(torch.equal(t, kept[start:end]) for t, kept in zip(b, mine)):
                return False
            start = end
        return True

    def drop(self) -> None:
        """Keep nothing."""
        self._key, self._refs, self.rows, self.repeated, self.finite = None, [], None, 0, False

    def put(self, source: Any, parts: list[Batch], rows: Batch | None, repeated: int) -> None:
        """Keep ``rows`` (or none) and ``repeated`` for ``source``."""
        tensors = [t for b in parts for t in b] + (list(rows) if rows is not None else [])
        self._refs = [weakref.ref(t) for t in tensors]
        self._key = self._key_of(source, tensors)
        self.rows, self.repeated, self.finite = rows, repeated, False


def _refuse_misshapen_fields(source: Any) -> None:
    """Refuse remaining data that looks like the rows' fields but cannot be read as them: a tuple or a list whose
    tensors differ in row shape and in row count, or a list ``[x, y]`` (it was told to pass ``n_remaining=``, then
    that its minibatches differ in shape; stop 45's probe)."""
    if not (
        isinstance(source, (list, tuple))
        and len(source) >= 2
        and all(isinstance(t, torch.Tensor) and t.ndim > 0 for t in source)
        and len({tuple(t.shape[1:]) for t in source}) > 1  # one-field minibatches share their row shape
    ):
        return
    rows = [int(t.shape[0]) for t in source]
    if len(set(rows)) > 1:
        raise ValueError(
            f"the remaining data is a {type(source).__name__} of {len(source)} tensors of different shapes and row "
            f"counts ({', '.join(f'{r:,}' for r in rows)}): if they are the remaining rows' fields (x, y), every "
            "field needs one row per remaining data point; nothing was changed"
        )
    if isinstance(source, list):
        # not taken as the tuple: a list of one-field minibatches padded to their own lengths looks the same
        raise TypeError(
            f"the remaining data is a list of {len(source)} tensors of {rows[0]:,} rows each and different row "
            "shapes: if they are the remaining rows' fields, pass them as a tuple, (x, y); if they are one-field "
            "minibatches padded to their own lengths, pad every minibatch to one fixed length (the unlearner joins "
            "and stacks minibatches); nothing was changed"
        )


def check_finite_source(source: Any) -> None:
    """Refuse a data source whose remaining rows hold a NaN or an infinite value, where it can list them
    (``source.nonfinite_ids()``: a :class:`~mcmc_unlearner.data.RemovableDataset`, a ``ShardedDataset``'s own rows)."""
    scan = getattr(source, "nonfinite_ids", None)
    if not callable(scan):
        return
    bad = scan()
    if bad.numel():
        fields = [i for i, t in enumerate(source.get(bad[:5])) if t.is_floating_point() and not all_finite(t)]
        more = f" and {bad.numel() - 5} more" if bad.numel() > 5 else ""
        raise InvalidRequestError(
            f"the remaining data: field {fields[0] if fields else 0} has NaN or infinite values in the rows "
            f"with id(s) {bad[:5].tolist()}{more}; the data must be finite to compute the influence: fix "
            "those rows in the data set's tensors (or build it without them) before the request; nothing "
            "was changed"
        )


def _ran_out(read_any: bool) -> str:
    """Why a plain remaining-data iterator gave no further minibatch, with the fix: one that gave none at all to this
    reader was empty or read to the end before (stop 66's review: an earlier request's Newton gate reads ``8·n`` rows
    from it, and the next request was told only that it "ran out")."""
    if read_any:
        return "the remaining-data iterator ran out; pass an endless iterator or a re-iterable (a DataLoader)"
    return (
        "the remaining-data iterator gave no minibatch: it is empty, or was read to the end before this request "
        "(an earlier request's newton_gate samples up to 8·n rows from a plain iterator; its "
        "report.info['newton_gate'] says where it ran out). Pass a new iterator over the remaining data, an endless "
        "iterator, or a re-iterable such as the DataLoader itself; nothing was changed"
    )


class IteratorRanOut(ValueError):
    """A plain remaining-data iterator (one that cannot be restarted) gave no further minibatch: a reader that can do
    without its rows (the Newton gate's sample, :meth:`~mcmc_unlearner.unlearner.MCMCUnlearner._gap_gate`) catches
    it; elsewhere it refuses the request as the ``ValueError`` it is."""


class _Stream:
    """Endless minibatches of the remaining data from a :class:`~mcmc_unlearner.data.RemovableDataset`, any
    iterator, a re-iterable such as a ``DataLoader`` (restarted when it runs out, a ``DistributedSampler``'s epoch
    advanced before each pass: :func:`~mcmc_unlearner.data.new_pass`), or the remaining rows themselves
    as a tuple of tensors ``(x, y)`` or ``(x,)`` (shuffled minibatches of 128; every row listable, as a
    ``RemovableDataset``); a list of minibatches ``[(x1, y1), ...]`` is read as the rows it joins (unless ``n``
    counts other rows: then as minibatches of a larger set)."""

    def __init__(
        self,
        source: Any,
        n: int | None,
        rows_as_data: bool = True,
        budget: int | None = None,
        joined: _JoinedList | None = None,
    ) -> None:
        """``budget``: the bytes a list of minibatches may take to be joined into its rows (``None``: unbounded);
        ``joined``: where those rows are kept for the next request while the list is unchanged."""
        _refuse_numpy_source(source)
        if (
            isinstance(source, tuple)
            and source
            and all(isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] == 0 for t in source)
        ):  # the remaining rows given as empty tensors: the request removes everything; it was told to pass
            # n_remaining=, which was then refused as not >= 1
            raise InvalidRequestError("no data would remain: the posterior would be the prior; retrain instead")
        repeated, listed, kept = 0, 0, None
        sizes: list[int] | None = None
        parts = _minibatch_list(source) if rows_as_data else None
        if parts is not None:
            listed = sum(int(b[0].shape[0]) for b in parts)
        # (the rows joined are fields as _is_fields reads them: one field, or fields of different row shapes)
        fields = parts is not None and (len(parts[0]) == 1 or len({tuple(t.shape[1:]) for t in parts[0]}) > 1)
        read_as_rows = fields and listed > 0 and (n is None or (is_integer(n) and int(n) == listed))
        if not read_as_rows and joined is not None:  # another source: a list's copy is not kept past its use
            joined.drop()
        if read_as_rows:
            # a list of minibatches in memory holding every remaining row: read as the tuple (x, y), unless a row
            # appears twice (the same minibatch listed twice, minibatches gathered over several epochs or redrawn
            # from a shuffling loader): its rows would be counted as many times as they appear (a review:
            # [(xa, ya), (xb, yb)] * 2 was read as twice the rows, nothing said); then read as minibatches
            cache = joined if joined is not None else _JoinedList()
            hit = cache.get(source, parts)
            if not hit:  # another list's copy, or this one's before a write, let go before the join (not planned)
                cache.drop()
            if not hit and self._join_fits(parts, listed, n, budget):
                rows = _concat(parts)
                found = _repeated_rows_hashed(rows)
                cache.put(source, parts, None if found else rows, found)
                hit = True
            if hit:
                repeated = cache.repeated
                if cache.rows is not None:
                    sizes = [int(b[0].shape[0]) for b in parts]
                    source, kept = cache.rows, cache
        _refuse_misshapen_fields(source)
        self.from_rows = _is_fields(source)  # the user's own rows (not a data set the library removes from)
        self.given: Batch | None = source if self.from_rows else None  # those rows, every one
        #: the rows of each minibatch of a list read as its joined rows (a row named by its minibatch); else None
        self.joined_sizes = sizes
        if _is_fields(source):  # the remaining rows themselves, (x, y) or (x,): shuffled minibatches of 128, listable
            if not rows_as_data:
                k = len(source)  # the call names as many tensors as the tuple holds: (x,) is not (x, y)
                names = "x" if k == 1 else "x, y" if k == 2 else ", ".join(f"t{i}" for i in range(k))
                raise TypeError(
                    f"remaining is a tuple of {k} tensor{'s' if k > 1 else ''} ({names}); under torch.distributed "
                    f"each rank passes its own shard with weights: ShardedDataset.from_global({names}, rank=rank, "
                    "world=world, batch_size=..., seed=...)"
                )
            from .data import RemovableDataset

            if kept is None or not kept.finite:  # (rows kept from an earlier request: checked there)
                check_finite_batch(source, "the remaining data", "of the rows given")
                if kept is not None:
                    kept.finite = True
            rows = int(source[0].shape[0])
            if n is not None and is_integer(n) and int(n) != rows:
                # taken as given, the energy's scale and the prior's weight were those of n rows while every row
                # listed was these (n_remaining=10**6 for 570 rows: the samples moved 200x less, every check passed)
                raise ValueError(
                    f"n_remaining={int(n)} but the remaining rows given as a tuple are {rows}: a tuple is read as "
                    "every remaining row. Leave n_remaining out (it is read from the rows); if the rows still hold "
                    "the removed ones, leave those out (remaining is the data after the removal); if they are a "
                    "sample of a larger remaining set, pass them as minibatches (a DataLoader or an iterator) with "
                    "n_remaining="
                )
            source = RemovableDataset(*source, batch_size=min(128, rows), seed=0)
        self.source = source
        if not self.from_rows:  # (rows given as a tuple were checked whole above)
            check_finite_source(source)
        _check_loader_order(source)
        if not isinstance(source, Iterable) and hasattr(source, "__getitem__") and hasattr(source, "__len__"):
            raise TypeError(
                f"remaining is a {type(source).__name__} (a dataset, not minibatches): pass "
                "DataLoader(dataset, batch_size=128, shuffle=True), or the remaining rows as a tuple (x, y)"
            )
        if hasattr(source, "__next__"):
            self._it, self._again = source, None
        elif isinstance(source, Iterable):
            self._it, self._again = new_pass(source), source
        else:
            raise TypeError(
                f"remaining must be an iterator or iterable of minibatches of the remaining data, "
                f"got {type(source).__name__}"
            )
        if n is None:
            if hasattr(source, "remaining_ids") or hasattr(source, "remaining"):
                n = len(source)
            elif hasattr(source, "dataset") and hasattr(source.dataset, "__len__"):
                n = _loader_rows(source)  # a DataLoader: len() counts batches, its dataset (or sampler) counts rows
            elif (
                isinstance(source, tuple)
                and len(source) >= 2
                and all(isinstance(t, torch.Tensor) and t.ndim > 0 for t in source)
                and len({tuple(t.shape) for t in source}) == 1
            ):
                raise ValueError(
                    f"remaining is a tuple of {len(source)} tensors of one shape {tuple(source[0].shape)}: such a "
                    "tuple is read as one-field minibatches, not as the rows (x, y) (token ids [n] or [n, L] with "
                    "labels of the same shape look alike). Pass the rows as RemovableDataset(x, y, batch_size=128) "
                    "or a DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True); if they really are "
                    "minibatches, pass n_remaining="
                )
            elif repeated:  # (it said only "cannot be read from a list", also where equal rows are distinct points)
                raise ValueError(
                    f"remaining is a list of minibatches whose {listed:,} rows hold {repeated:,} equal in "
                    "every field to an earlier one (a minibatch listed twice, minibatches gathered over several "
                    "epochs?), so it is not read as the remaining rows, which would count those rows twice: pass each "
                    "remaining row once, or the rows as a tuple (x, y) if equal rows are distinct data points, or "
                    "pass n_remaining= (the number of remaining data points) to read the list as minibatches"
                )
            else:
                raise ValueError(
                    "pass n_remaining= (the number of remaining data points): it cannot be read from a "
                    f"{type(source).__name__}"
                )
        elif not (is_integer(n) and int(n) >= 1):  # True was 1 row, 2.7 was 2: the prior's weight silently off
            raise ValueError(
                f"n_remaining must be the number of remaining data points, an integer >= 1; got {shown_value(n)}"
            )
        self.n = int(n)
        self._held: list[Batch] = []  # read from the source, given in order by the next next() calls
        self._copying = False  # read_ahead: every minibatch next() gives is a copy
        self._given: list[Batch] | None = None  # after read_ahead: the held minibatches given since (unread())
        self._once: dict[str, Any] = {}  # what once() read from the source, by name
        #: rows this request read from the source (or was given back: put_back), and the values of their second field
        #: while every minibatch's is a ``[B]`` integer tensor (``None`` from the first that is not): the labels where
        #: ``nll`` reads them there, what a request can say about labels it cannot list (:meth:`seen_labels`)
        self.rows_read = 0
        self._second: set[int] | None = set()
        #: second fields not yet in ``_second``: copies on their device, read at :meth:`seen_labels` (one
        #: synchronisation, not one a minibatch) or once they hold ``LABELS_PENDING_ROWS`` rows
        self._pending: list[torch.Tensor] = []
        self._pending_rows = 0
        #: a minibatch was read from the source, or given back to this request (:meth:`put_back`): a plain iterator
        #: that gives none is empty or spent before the request (:func:`_ran_out`)
        self._read_any = False

    def _tally(self, batch: Batch) -> Batch:
        """Count ``batch``, read from the source for this request, in :attr:`rows_read` and its second field's
        values; returns it. The values are kept as a copy on their device (a source may refill one label tensor in
        place) and read later (:meth:`_read_pending`): ``torch.unique`` here waited for the device at every
        minibatch (stop 66's review)."""
        self.rows_read += int(batch[0].shape[0])
        if self._second is not None:
            y = batch[1] if len(batch) > 1 else None
            whole = isinstance(y, torch.Tensor) and y.ndim == 1 and not (y.is_floating_point() or y.is_complex())
            if whole and y.dtype != torch.bool:
                self._pending.append(y.detach().clone())
                self._pending_rows += int(y.shape[0])
                if self._pending_rows >= LABELS_PENDING_ROWS:
                    self._read_pending()
            else:
                self._second, self._pending, self._pending_rows = None, [], 0
        return batch

    def _read_pending(self) -> None:
        """Move the pending second fields' values into ``_second``: one ``torch.unique`` (one synchronisation) per
        device and dtype they come in (joined as given: no conversion)."""
        by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for t in self._pending:
            by_device.setdefault((t.device, t.dtype), []).append(t)
        for parts in by_device.values():
            self._second.update(torch.unique(torch.cat(parts)).tolist())
        self._pending, self._pending_rows = [], 0

    def seen_labels(self) -> tuple[int, set[int] | None]:
        """The rows this request read from the source and the values of their second field (``None`` where a
        minibatch's was not a ``[B]`` integer tensor): read from the minibatches the request used, no further pass."""
        if self._second is None:
            return self.rows_read, None
        self._read_pending()
        return self.rows_read, set(self._second)

    def once(self, name: str, read: Callable[[], Any]) -> Any:
        """``read()``, called on the first use of ``name`` for this stream (one request's remaining data) and kept
        for the later ones: what several checks of a request read from the source alike (the remaining labels)."""
        if name not in self._once:
            self._once[name] = read()
        return self._once[name]

    @staticmethod
    def _join_fits(parts: list[Batch], rows: int, n: int | None, budget: int | None) -> bool:
        """Whether joining the list of minibatches ``parts`` (``rows`` rows) and looking for repeated rows fits
        ``budget``; where it does not, ``False`` with ``n_remaining=`` given (the list is read as minibatches, no
        copy), else refused with the fixes."""
        fields = [(int(t[0].numel()) * (2 if t.is_complex() else 1), t.element_size()) for t in parts[0]]
        copy = sum(int(t.numel()) * t.element_size() for b in parts for t in b)
        need = copy + _repeated_rows_bytes(rows, fields)
        if budget is None or need <= budget:
            return True
        if n is not None:
            return False
        raise MemoryError(
            f"remaining is a list of {len(parts):,} minibatches holding {rows:,} rows: reading it as the rows joins "
            f"them into one copy ({format_bytes(copy, up=True)}) and looks for repeated rows, "
            f"{format_bytes(need, up=True)} in all, over the memory budget of {format_bytes(budget)}: pass "
            f"n_remaining={rows} to read the list as minibatches (no copy; its rows are then neither listed nor "
            "shuffled), pass the rows as a tuple (x, y) or a RemovableDataset, or raise memory_budget to at least "
            f"{format_bytes(need, up=True)}; nothing was changed"
        )

    def peek(self) -> Batch:
        """The next minibatch, left to be read again: a source that is its own iterator with a state (a
        ``RemovableDataset``) is put back to where it was, any other's minibatch is held and given by the next
        ``next()``."""
        if self._held:
            return self._held[0]
        # rewound only where the source is its own iterator (a RemovableDataset): a re-iterable loader with a state
        # (torchdata's StatefulDataLoader) applies a loaded state at its next iter(), not to the live iterator, and
        # the request then started one minibatch late (stop 46's review)
        state = self.state() if self._it is self.source else None
        batch = next(self)
        if state is not None:
            self.set_state(state)
            self.rows_read -= int(batch[0].shape[0])  # read again from the source, and counted then
        else:
            self._held.append(batch)
        return batch

    def put_back(self, *batches: Batch) -> None:
        """Give ``batches`` (read from this source elsewhere and not used) at the next ``next()`` calls, in order,
        before the source's own next minibatch."""
        if self._held:
            raise RuntimeError("a minibatch is already held")
        self._held.extend(self._tally(b) for b in batches)
        # given to this request: a source that ends after them ran out in it, not "gave no minibatch" (_ran_out)
        self._read_any = self._read_any or bool(batches)

    def take_held(self) -> list[Batch]:
        """The minibatches read from the source and not yet given (:meth:`peek`, :meth:`read_ahead`), no longer
        held: for a plain iterator, what a refused request gives the next one (read once, not lost)."""
        held, self._held = self._held, []
        return held

    def unread(self) -> list[Batch]:
        """Every minibatch read from the source ahead of its use (:meth:`peek`, :meth:`read_ahead`,
        :meth:`put_back`) that a request either has not used yet or used after :meth:`read_ahead`, in the order read,
        no longer held: for a plain iterator, what a refused request gives the next one, so that the refusal took
        none of them (a minibatch the request read beyond them is not kept, and is lost to the next reader)."""
        given, self._given = self._given or [], None
        return given + self.take_held()

    def used(self) -> None:
        """Keep no more the minibatches given since :meth:`read_ahead` (for :meth:`unread`), nor what :meth:`once`
        read: the request that read them returned, and its proposal, which holds this stream, held every one of
        them (25 copies of a plain iterator's minibatches, freed after their use before; a data set's kept labels);
        nor the copies of the labels read (:meth:`_tally`): read now, up to ``LABELS_PENDING_ROWS`` rows held with
        the proposal otherwise (stop 67's review)."""
        self._given = None
        self._once = {}
        if self._second is not None:
            self._read_pending()

    def __next__(self) -> Batch:
        batch = self._next()
        return tuple(t.clone() for t in batch) if self._copying else batch

    def _next(self) -> Batch:
        if self._held:
            batch = self._held.pop(0)
            if self._given is not None:
                self._given.append(batch)
            return batch
        try:
            batch = _as_batch(next(self._it), "a remaining-data minibatch")
        except StopIteration:
            if self._again is None:
                raise IteratorRanOut(_ran_out(self._read_any)) from None
            self._it = new_pass(self._again)
            try:
                batch = _as_batch(next(self._it), "a remaining-data minibatch")
            except StopIteration:
                raise ValueError(
                    "the remaining data yields no minibatches (e.g. an empty list, or a DataLoader with "
                    "drop_last=True over fewer rows than its batch_size): pass a source that yields at least one"
                ) from None
        self._read_any = True
        check_finite_batch(batch, "the remaining data", "of a minibatch it gave (numbered within that minibatch)")
        return self._tally(batch)

    @property
    def peek_keeps_state(self) -> bool:
        """Whether :meth:`peek` leaves the source's state as it was: a source without one, or one that is its own
        iterator (rewound); a re-iterable loader with a state (torchdata's StatefulDataLoader) moves on by the
        minibatch held, and only a snapshot taken before the peek puts it back."""
        return self._it is self.source or self.state() is None

    @property
    def plain_iterator(self) -> bool:
        """Whether the source is read once, as given (an iterator that cannot be restarted or put back): a
        minibatch read from it is lost to whoever reads next."""
        return self._again is None and self.state() is None

    @property
    def listable(self) -> bool:
        """Whether :meth:`full` can list every remaining row."""
        return callable(getattr(self.source, "remaining", None))

    def full(self) -> Batch | None:
        """Every remaining row when the source can list them (``remaining()``), else ``None``."""
        fn = getattr(self.source, "remaining", None)
        if not callable(fn):
            return None
        batch = _as_batch(fn(), "the remaining data")
        ids = None if self.from_rows else getattr(self.source, "remaining_ids", None)
        ids = ids if isinstance(ids, torch.Tensor) and ids.numel() == batch[0].shape[0] else None
        check_finite_batch(batch, "the remaining data", "of its remaining rows (in their order)", ids=ids)
        return batch

    def rows(self, m: int) -> Batch:
        """Whole minibatches holding at least ``m`` rows (``⌈m / batch_size⌉`` of them when the source has a
        ``batch_size``, so a sharded source advances exactly as a single-process one)."""
        return _concat(self._rows_read(m)[0])

    def _rows_read(self, m: int) -> tuple[list[Batch], list[Batch]]:
        """The minibatches :meth:`rows` joins for ``m`` rows, and every one it reads (also an empty one, which ends
        the reading)."""
        bs = getattr(self.source, "batch_size", None)
        if isinstance(bs, int) and bs > 0:
            parts = [next(self) for _ in range(math.ceil(m / bs))]
            return parts, parts
        parts, read, have = [], [], 0
        while have < m:
            b = next(self)
            read.append(b)
            if b[0].shape[0] == 0:
                break
            parts.append(b)
            have += b[0].shape[0]
        return parts, read

    def read_ahead(self, count: int, m: int) -> None:
        """Read now, and give in order by the next ``next()`` calls, the minibatches :meth:`stacked` reads for
        ``count`` draws (none for 0) and then those :meth:`rows` reads for ``m`` rows: what a request reads from a
        plain iterator before its check (its curvature's minibatches, then its check's rows). An iterator too short
        for them is refused before the request's work (stop 61: a one-epoch generator was refused after 1.5 s of it),
        and the request reads the same minibatches, in the same order, as without. Each is copied as it is read (an
        iterator that writes every minibatch into one buffer gave the curvature the check's rows: samples moved by up
        to 4.1); the copies are of the rows the request reads anyway."""
        self._copying = True  # each copied as read: an iterator may write the next minibatch into this one's memory
        try:
            ahead = self._stacked_read(count) if count else []
            ahead += self._rows_read(m)[1]
        finally:
            self._copying = False
        self._held = ahead + self._held
        self._given = []  # the read-ahead minibatches given from now on, kept for a refusal (unread())

    def stacked(self, count: int) -> Batch:
        """``count`` fresh minibatches stacked on a leading dimension. Minibatches of different sizes (a
        ``DataLoader``'s last, partial one) are pooled and split evenly: cut to the smallest, the 19-row tail of an
        epoch made every draw's curvature batch 19 rows instead of 64."""
        batches = self._stacked_read(count)
        if len(batches) == count and len({b[0].shape[0] for b in batches}) == 1:
            _same_shapes(batches)  # the same shape beyond the row dimension, or refused with the fix
            return stack_batches(batches)
        rows = _concat(batches)
        bsz = rows[0].shape[0] // count
        return stack_batches([tuple(t[i * bsz : (i + 1) * bsz] for t in rows) for i in range(count)])

    def _stacked_read(self, count: int) -> list[Batch]:
        """The minibatches :meth:`stacked` reads for ``count`` draws."""
        batches = [next(self) for _ in range(count)]
        # minibatches of a few rows (a DataLoader with batch_size=1) would give each draw's curvature those few
        # rows: pool further minibatches until every draw has MIN_CURVATURE_ROWS (the rows an epoch holds at most);
        # sources whose minibatches reach that size are read as before
        have, limit = sum(b[0].shape[0] for b in batches), count * MIN_CURVATURE_ROWS
        small = max(b[0].shape[0] for b in batches) < MIN_CURVATURE_ROWS
        while small and have < limit and len(batches) < count * MIN_CURVATURE_ROWS and have < count * self.n:
            batches.append(next(self))
            have += batches[-1][0].shape[0]
        return batches

    def state(self) -> Any:
        return self.source.state_dict() if hasattr(self.source, "load_state_dict") else None

    def set_state(self, state: Any) -> None:
        if state is not None:
            self.source.load_state_dict(state)
            self._held = []


def _source_generators(source: Any) -> list[torch.Generator]:
    """The ``torch.Generator``s a remaining-data source draws from itself (a ``DataLoader``'s ``generator=``, its
    sampler's or batch sampler's), each once."""
    found: list[torch.Generator] = []
    for obj in (
        source,
        getattr(source, "sampler", None),
        getattr(getattr(source, "batch_sampler", None), "sampler", None),
    ):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


def _same_state(a: Any, b: Any) -> bool:
    """Whether two ``state_dict()`` values (tensors, numbers, nested containers) are equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # an object without a usable ==: cannot tell, assume unchanged
        return True
