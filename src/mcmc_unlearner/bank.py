"""Sample banks in the layouts users keep them in, converted to the flat ``[S, D]`` tensor the algorithm uses.

Accepted layouts (``D`` = the model's trainable parameters in ``named_parameters`` order, see
:class:`~mcmc_unlearner.curvature.ParamSpec`):

* a tensor ``[S, D]`` of flat parameter vectors (e.g. rows of ``parameters_to_vector``), or a list (or tuple) of
  such ``[D]`` vectors (returned as a list); on a model with frozen parameters also ``[S, D_all]``, rows of
  ``parameters_to_vector(model.parameters())`` with the frozen ones included (they must hold the model's frozen
  values; returned in that width, those columns unchanged);
* a list (or tuple) of ``state_dict``-like mappings ``{name: tensor}`` (returned as a list, each sample in its own
  mapping type; buffers and other entries are carried along);
* a dict of stacked tensors ``{name: [S, *shape]}`` (the layout of the ``posteriors`` library; other entries, such
  as buffers, are carried along too).

A parameter shared by several modules (tied weights: ``decoder.weight = encoder.weight``) is one column block of
the flat bank; ``state_dict`` lists it under every name. Such entries must agree in every sample, and every name
present is returned holding the moved value (one tensor, as ``state_dict`` gives it): a returned sample whose
second name kept the old value would, loaded with ``load_state_dict``, put the old value back into the shared
parameter.

:func:`to_flat` always copies, so the unlearner never writes into the caller's tensors; it refuses samples holding
NaN or inf by reading the caller's tensors before any copy, and samples of integers or (for a model of real
parameters) complex numbers, whose cast would drop the imaginary parts. A list (of state_dicts or of vectors) or a
dict of stacked tensors is copied block by block into one preallocated ``[S, D]`` tensor: the build's peak is the
one copy.
:class:`BankLayout` turns a shifted flat bank back into the caller's layout (new tensors, same dtypes, devices and
memory formats: a ``channels_last`` convolution weight comes back ``channels_last``).
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .curvature import ParamSpec
from .errors import all_finite, outside_stacklevel

__all__ = ["BankLayout", "to_flat"]


@dataclass(frozen=True)
class BankLayout:
    """How a bank was given: ``kind`` is ``"flat"``, ``"flat_list"``, ``"state_dicts"`` or ``"stacked"``."""

    kind: str
    spec: ParamSpec
    template: Any = None  # state_dicts / stacked: the original list / dict (non-parameter entries are copied from it)
    trainable: torch.Tensor | None = None  # flat banks of every parameter: which columns are trainable
    frozen: torch.Tensor | None = None  # ... and the frozen columns' values
    tied: tuple[tuple[str, str], ...] = ()  # (second name, the name the flat bank uses) of shared parameters
    prefix: str = ""  # a wrapper's key prefix ("_orig_mod.", "module.") when the samples came from its state_dict
    dtype: torch.dtype | None = None  # flat banks: the dtype they were given in (returned in it)

    def returned_dtypes(self, default: torch.dtype) -> list[torch.dtype]:
        """The dtype each trainable parameter (``spec`` order) is given back in by :meth:`restore`."""
        if self.kind in ("flat", "flat_list"):
            return [self.dtype or default] * len(self.spec.names)
        if self.template is None:
            return [default] * len(self.spec.names)
        first = self.template if self.kind == "stacked" else self.template[0]
        return [
            first[self.prefix + n].dtype if isinstance(first.get(self.prefix + n), torch.Tensor) else default
            for n in self.spec.names
        ]

    def as_returned(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` rounded to the dtypes :meth:`restore` gives it back in (and back to ``flat``'s dtype)."""
        dts = self.returned_dtypes(flat.dtype)
        if all(d == flat.dtype for d in dts):
            return flat
        parts = torch.split(flat, self.spec.numels, dim=-1)
        return torch.cat([p.to(d).to(flat.dtype) for p, d in zip(parts, dts)], dim=-1)

    def restore(self, flat: torch.Tensor) -> Any:
        """The flat bank ``[S, D]`` in this layout (new tensors)."""
        if self.kind == "flat_list":
            return list(replace(self, kind="flat").restore(flat).unbind(0))
        if self.kind == "flat":
            dtype = self.dtype or flat.dtype
            if self.trainable is None:
                return flat.to(dtype).clone()
            out = torch.empty(flat.shape[0], self.trainable.numel(), dtype=dtype, device=flat.device)
            out[:, ~self.trainable] = self.frozen.to(out)
            out[:, self.trainable] = flat.to(dtype)
            return out
        rows = [self.spec.unflatten(r) for r in flat]
        if self.kind == "stacked":
            moved = {self.prefix + name: torch.stack([r[name] for r in rows]) for name in self.spec.names}
            if self.template is None:
                return moved
            # every entry in the caller's order: parameters moved, tied names sharing them, the rest copied
            # (samples beyond the given ones reuse the last one's extras)
            given = int(self.template[self.prefix + self.spec.names[0]].shape[0])
            pick = torch.arange(flat.shape[0]).clamp(max=given - 1)
            out = {}
            for k, v in self.template.items():
                if k in moved:
                    out[k] = _strided_like(v, moved[k].shape).copy_(moved[k])
                elif isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == given:
                    out[k] = v.detach()[pick.to(v.device)].clone()
                else:
                    out[k] = v.clone() if isinstance(v, torch.Tensor) else v
            for alias, name in self.tied:
                if self.prefix + alias in out:
                    out[self.prefix + alias] = out[self.prefix + name]
            return out
        out = []
        for i, r in enumerate(rows):
            orig = self.template[min(i, len(self.template) - 1)]  # samples collected later reuse the last one's extras
            d = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in orig.items()}
            for name in self.spec.names:
                key = self.prefix + name
                d[key] = _strided_like(orig[key], r[name].shape).copy_(r[name])
            for alias, name in self.tied:
                if self.prefix + alias in d:
                    d[self.prefix + alias] = d[self.prefix + name]
            out.append(type(orig)(d) if isinstance(orig, dict) else d)
        return out


def _strided_like(template: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """An empty tensor of ``shape`` in ``template``'s dtype, device and memory format: its strides where the shapes
    agree (``torch.empty_like``: a ``channels_last`` convolution weight comes back ``channels_last``; before, every
    returned sample was standard-contiguous), else its dimensions' order by the strides ``torch.empty_like`` gives
    it (a stacked bank given fewer samples than it returns, e.g. after ``collect()``): a template that is not dense
    (expanded, stride 0 over the samples) orders them as a contiguous tensor does, not by its raw strides, which
    put the samples innermost (each sample's slice strided)."""
    if tuple(template.shape) == tuple(shape):
        return torch.empty_like(template, memory_format=torch.preserve_format)
    if template.dim() != len(shape):
        return torch.empty(tuple(shape), dtype=template.dtype, device=template.device)
    dense = torch.empty_like(template, device="meta").stride()  # torch's dense layout for it (no memory)
    order = sorted(range(template.dim()), key=lambda d: -dense[d])  # outermost first (stable on ties)
    out = torch.empty([shape[d] for d in order], dtype=template.dtype, device=template.device)
    return out.permute([order.index(d) for d in range(template.dim())])


def tied_names(model: torch.nn.Module | None, spec: ParamSpec) -> tuple[tuple[str, str], ...]:
    """``(second name, first name)`` of every trainable parameter registered under more than one name."""
    if model is None:
        return ()
    first: dict[int, str] = {}
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            if first[id(p)] in spec.names:
                out.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    return tuple(out)


def _check_tied(tied: tuple[tuple[str, str], ...], sample: Mapping[str, Any], what: str) -> None:
    for alias, name in tied:
        if alias in sample and not torch.equal(sample[alias].detach(), sample[name].detach()):
            raise ValueError(
                f"bank: {what} holds different values under {name!r} and {alias!r}, but the model shares one "
                f"parameter between them (tied weights), so a sample has one value there. Save the samples with "
                f"model.state_dict() (it lists the shared tensor under both names), or drop {alias!r}"
            )


def _check_frozen(model: torch.nn.Module | None, spec: ParamSpec, rows: Sequence[Mapping[str, Any]], what: str) -> None:
    """Refuse samples that hold a frozen parameter (``requires_grad=False``) at values other than the model's, as a
    flat bank of every parameter is refused (:func:`_flat_with_frozen`): the unlearner computes every sample with
    the model's frozen values and would return each sample's own, moved for another network than it describes."""
    if model is None:
        return
    trainable = set(spec.names)
    for name, p in model.named_parameters():
        if name in trainable:
            continue
        bad = [
            i
            for i, sd in enumerate(rows)
            if isinstance(sd.get(name), torch.Tensor)
            and (
                tuple(sd[name].shape) != tuple(p.shape)
                or not torch.equal(sd[name].detach(), p.detach().to(device=sd[name].device, dtype=sd[name].dtype))
            )
        ]
        if bad:
            raise ValueError(
                f"bank: {what}: in {len(bad)} of {len(rows)} samples the frozen parameter {name!r} "
                "(requires_grad=False) differs from the model's. The unlearner moves only trainable parameters and "
                "computes every sample with the model's frozen values: make the sampled parameters trainable, load "
                f"the samples' value into the model (model.load_state_dict(samples[0])) if it is one constant, or "
                f"drop {name!r} from the samples"
            )


#: Prefixes a wrapper adds to the parameter names of its ``state_dict``: ``torch.compile`` (``_orig_mod.``),
#: ``nn.DataParallel`` / ``DistributedDataParallel`` (``module.``), and both.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "module._orig_mod.", "_orig_mod.module.")


def _key_prefix(spec: ParamSpec, sample: Mapping[str, Any]) -> str:
    """The wrapper prefix (:data:`_WRAPPER_PREFIXES`) with which ``sample`` names the model's parameters, when it
    does not name them as the model does (samples from a compiled or data-parallel model's ``state_dict``)."""
    if all(n in sample for n in spec.names):
        return ""
    return next((p for p in _WRAPPER_PREFIXES if all(p + n in sample for n in spec.names)), "")


def _missing(names: Sequence[str], have: Mapping[str, Any], what: str) -> None:
    lost = [n for n in names if n not in have]
    if lost:
        more = f" and {len(lost) - 3} more" if len(lost) > 3 else ""
        unwrapped = next(
            (p for p in _WRAPPER_PREFIXES if all(n.startswith(p) and n[len(p) :] in have for n in names)), None
        )
        hint = (
            f"; it names them without the model's {unwrapped!r} prefix: the samples come from the wrapped module, so "
            "pass that module as the model (e.g. model.module of a DataParallel), or samples of the wrapper's "
            "state_dict"
            if unwrapped
            else ""
        )
        raise ValueError(
            f"bank: {what} lacks the model's parameter(s) {lost[:3]}{more}; its keys must be the names of "
            f"model.named_parameters() (as in model.state_dict()){hint}"
        )


def bad_rows(t: torch.Tensor) -> torch.Tensor:
    """Which samples (leading dimension) of ``t`` hold a NaN or inf: a boolean CPU tensor ``[S]``.

    Reads ``t`` in place, one reduction pass and no temporary of its size (``isfinite`` of a 1.9M-parameter bank of
    50 took 1.6 s in a fresh process).
    """
    t = t.detach()
    rows = t.shape[0] if t.ndim else 1
    if t.layout != torch.strided or (not t.is_complex() and all_finite(t)):  # the usual case: one aminmax pass
        return torch.zeros(rows, dtype=torch.bool)
    if t.is_complex() or t.ndim < 2:
        return ~torch.isfinite(t.reshape(rows, -1)).all(1).cpu()
    dims = tuple(range(1, t.ndim))  # NaN propagates, ±inf shows at the extremes (aminmax(dim=1) is 8x slower)
    lo, hi = t.amin(dim=dims), t.amax(dim=dims)
    return ~(torch.isfinite(lo) & torch.isfinite(hi)).cpu()


def _trainable_bad(
    bad: torch.Tensor, row: Callable[[int], torch.Tensor], params: list[torch.nn.Parameter]
) -> torch.Tensor:
    """``bad`` (:func:`bad_rows` of rows holding every parameter) narrowed to the samples whose *trainable* columns
    hold NaN or inf: a frozen parameter may hold ±inf (clamp bounds, masks) in every sample, as the model does.
    Only the flagged samples (``row(i)``: sample ``i`` as ``[1, D_all]``) are read again."""
    if not bool(bad.any()) or all(p.requires_grad for p in params):
        return bad
    trainable = torch.cat([torch.full((p.numel(),), p.requires_grad, dtype=torch.bool) for p in params])
    out = bad.clone()
    for i in bad.nonzero().flatten().tolist():
        r = row(i)
        out[i] = bool(bad_rows(r[:, trainable.to(r.device)]).any())
    return out


def check_finite(bad: torch.Tensor, after: str = "") -> None:
    """Refuse a bank whose samples ``bad`` (:func:`bad_rows`) hold NaN or inf, naming them and the fix."""
    if not bool(bad.any()):
        return
    index = bad.nonzero().flatten().tolist()
    named = f"{index[:10]}"[:-1] + (f", ... {len(index) - 10} more]" if len(index) > 10 else "]")
    raise ValueError(
        f"the bank has non-finite values (NaN or inf){after} in {len(index)} of its {bad.numel()} samples, the first "
        f"at index {index[0]} (samples {named}): drop those samples (a diverged chain's) before unlearning"
    )


def to_flat(
    bank: Any,
    spec: ParamSpec,
    dtype: torch.dtype | None = None,
    model: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, BankLayout]:
    """Convert ``bank`` (any layout of the module docstring) to a new ``[S, D]`` tensor and its layout.

    Args:
        bank: The samples.
        spec: The trainable parameters.
        dtype: The flat bank's dtype (default: the bank's).
        model: The model; with it a tensor bank may also hold every parameter, frozen ones included.

    Raises:
        ValueError: an unknown layout, a width other than ``D``, missing parameters, mismatched shapes, or samples
            holding NaN or inf (refused before any copy).
    """
    if isinstance(bank, (Sequence, Mapping)) and not isinstance(bank, (str, bytes)) and len(bank) == 0:
        # an empty list was "give ... a list of state_dicts ...; got list": what was given, not what was wrong
        raise ValueError(
            f"bank: it holds no samples (an empty {type(bank).__name__}); pass the stored samples, at least one (a "
            "list of state_dicts, a tensor [S, D] or a dict of stacked tensors), or bank=None with sampler= for the "
            "chain expectation"
        )
    _refuse_meta(bank)
    if isinstance(bank, torch.Tensor):
        everything = [] if model is None else list(model.parameters())
        width = sum(p.numel() for p in everything)
        if bank.ndim == 2 and bank.shape[1] == width != spec.dim:
            return _flat_with_frozen(bank, spec, everything, dtype)
        if bank.ndim != 2 or bank.shape[1] != spec.dim:
            also = f" or [S, {width}] (every parameter, frozen ones included)" if width != spec.dim and width else ""
            raise ValueError(
                f"bank: a tensor bank must have shape [S, {spec.dim}] (S samples of the {spec.dim} trainable "
                f"parameters){also}, got {tuple(bank.shape)}"
            )
        check_finite(bad_rows(bank))  # on the caller's tensor, before the copy
        flat = bank.detach().clone()
        layout = BankLayout("flat", spec, dtype=bank.dtype)
    elif isinstance(bank, Mapping):
        prefix = _key_prefix(spec, bank)
        if prefix:
            bank = {k.removeprefix(prefix): v for k, v in bank.items()}
        _missing(spec.names, bank, "the dict of stacked tensors")
        sizes = {int(bank[n].shape[0]) for n in spec.names}
        if len(sizes) != 1:
            raise ValueError(f"bank: stacked tensors disagree on the number of samples {sorted(sizes)}")
        for n, shape in zip(spec.names, spec.shapes):
            t = bank[n]
            if tuple(t.shape[1:]) != tuple(shape):
                raise ValueError(f"bank: {n} has sample shape {tuple(t.shape[1:])}, the model's is {tuple(shape)}")
        tied = tied_names(model, spec)
        _check_tied(tied, bank, "the dict of stacked tensors")
        S = sizes.pop()
        _check_frozen(
            model,
            spec,
            [
                {k: v[s] for k, v in bank.items() if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == S}
                for s in range(S)
            ],
            "the dict of stacked tensors",
        )
        _warn_varying_buffers(_stacked_rows(bank, spec, tied, S, model), spec, tied, model, stacked=True)
        check_finite(torch.stack([bad_rows(bank[n]) for n in spec.names]).any(0))
        if S == 0:
            raise ValueError("bank: it holds no samples")
        flat = _fill(_Samples([bank[n] for n in spec.names]), dtype)  # one [S, D] tensor, filled in place
        template = {prefix + k: v for k, v in bank.items()}
        return flat, BankLayout("stacked", spec, template, tied=tied, prefix=prefix)
    elif (
        isinstance(bank, Sequence)
        and not isinstance(bank, (str, bytes))
        and len(bank) > 0
        and all(isinstance(r, torch.Tensor) and r.ndim == 1 for r in bank)
    ):  # a list of flat vectors (rows of parameters_to_vector): stacked, returned as a list again
        if any(r.shape != bank[0].shape for r in bank):
            lengths = sorted({r.numel() for r in bank})
            raise ValueError(
                f"bank: the flat vectors have different lengths {lengths[:5]}; each must be one sample's [D] vector "
                "of the same parameters (e.g. parameters_to_vector(model.parameters()))"
            )
        bad = torch.cat([bad_rows(r[None]) for r in bank])  # before any copy
        everything = [] if model is None else list(model.parameters())
        width = sum(p.numel() for p in everything)
        if bool(bad.any()) and bank[0].numel() == width != spec.dim:
            bad = _trainable_bad(bad, lambda i: bank[i][None], everything)  # frozen columns may hold ±inf
        check_finite(bad)
        flat, layout = _flat_rows(list(bank), spec, everything, width, dtype)
        return flat, replace(layout, kind="flat_list")
    elif isinstance(bank, Sequence) and not isinstance(bank, (str, bytes)) and len(bank) > 0:
        tied = tied_names(model, spec)
        prefix = _key_prefix(spec, bank[0]) if isinstance(bank[0], Mapping) else ""
        given = list(bank)
        if prefix:
            bank = [
                {k.removeprefix(prefix): v for k, v in sd.items()} if isinstance(sd, Mapping) else sd for sd in given
            ]
        for i, sd in enumerate(bank):
            if not isinstance(sd, Mapping):
                raise ValueError(f"bank: item {i} is a {type(sd).__name__}, expected a state_dict (a mapping)")
            _missing(spec.names, sd, f"state_dict {i}")
            _check_tied(tied, sd, f"state_dict {i}")
            for n, shape in zip(spec.names, spec.shapes):
                if tuple(sd[n].shape) != tuple(shape):
                    got = tuple(sd[n].shape)
                    raise ValueError(f"bank: state_dict {i}: {n} has shape {got}, expected {tuple(shape)}")
        _check_not_aliased(bank, spec)
        _check_frozen(model, spec, bank, "the state_dicts")
        _warn_varying_buffers(bank, spec, tied, model)
        check_finite(torch.tensor([any(bool(bad_rows(sd[n].detach()[None])) for n in spec.names) for sd in bank]))
        flat = _fill([[sd[n] for n in spec.names] for sd in bank], dtype)  # one [S, D] tensor, filled in place
        return flat, BankLayout("state_dicts", spec, given, tied=tied, prefix=prefix)
    else:
        params = " (it has a .params attribute: pass that, e.g. bank=state.params)" if hasattr(bank, "params") else ""
        raise ValueError(
            "bank: give a tensor [S, D], a list of state_dicts, or a dict of stacked tensors {name: [S, ...]}; "
            f"got {type(bank).__name__}{params}"
        )
    if flat.shape[0] == 0:
        raise ValueError("bank: it holds no samples")
    _check_floating(flat.dtype, dtype)
    if _all_identical([[r] for r in flat], flat.dtype, flat.device):
        _refuse_identical(flat.shape[0])
    return _cast(flat, dtype), layout


def _check_floating(dtype: torch.dtype, target: torch.dtype | None = None) -> None:
    """Refuse a bank of integers (it was cast to the model's dtype and used, warned about only by the checks it then
    failed: stop 45's probe, "1272% off the computed one"), and a complex bank for a model of real parameters
    (``target``, the model's dtype: the cast dropped the imaginary parts with torch's warning only, stop 57's
    probe)."""
    name = str(dtype).removeprefix("torch.")
    if not (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(
            f"bank: the samples are {name}, not floating-point parameter values: "
            "pass the sampler's parameters as they were stored (e.g. parameters_to_vector(model.parameters()))"
        )
    if dtype.is_complex and target is not None and not target.is_complex:
        raise ValueError(
            f"bank: the samples are {name} (complex) but the model's parameters are "
            f"{str(target).removeprefix('torch.')} (real): casting would drop the imaginary parts. Pass the "
            "sampler's real parameters as they were stored (e.g. parameters_to_vector(model.parameters())), or "
            "bank.real if the imaginary parts are zero by construction; nothing was changed"
        )


def _as(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return t.detach().to(device=device, dtype=dtype)


def _refuse_meta(bank: Any) -> None:
    """Refuse samples on the ``meta`` device (shapes without values: a ``state_dict`` of a model built under
    ``torch.device("meta")``, or a checkpoint loaded with ``map_location="meta"``), naming the first. They were
    refused as "the same memory" (state_dicts: every meta tensor's address is 0) or crashed in ``Tensor.item()``
    (a tensor bank; stop 60's probe)."""
    if isinstance(bank, torch.Tensor):
        found = "the bank tensor" if bank.device.type == "meta" else None
    elif isinstance(bank, Mapping):
        found = next(
            (f"{k!r}" for k, v in bank.items() if isinstance(v, torch.Tensor) and v.device.type == "meta"), None
        )
    elif isinstance(bank, Sequence) and not isinstance(bank, (str, bytes)):
        found = None
        for i, item in enumerate(bank):
            values = item.items() if isinstance(item, Mapping) else [(None, item)]
            key = next((k for k, v in values if isinstance(v, torch.Tensor) and v.device.type == "meta"), False)
            if key is not False:
                found = f"sample {i}" + ("" if key is None else f"'s {key!r}")
                break
    else:
        return
    if found is not None:
        raise ValueError(
            f"bank: {found} is on the meta device, which holds shapes but no values, so there are no samples to "
            "move. Pass the stored samples' values on a real device (e.g. torch.load(path, map_location='cpu', "
            "weights_only=True)), not the state_dict of a model built on the meta device"
        )


def _all_identical(rows: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether every sample (``rows[i]``: its column blocks) equals the first, compared in ``dtype``; stops at the
    first difference (no ``[S, D]`` temporary)."""
    return len(rows) > 1 and all(
        all(torch.equal(_as(a, dtype, device), _as(b, dtype, device)) for a, b in zip(r, rows[0]))
        for r in itertools.islice(rows, 1, None)
    )


def _refuse_identical(S: int) -> None:
    raise ValueError(
        f"bank: all {S} samples are identical, so there is no posterior to average over. A sampler "
        "loop that stores model.state_dict() or model.parameters() without copying keeps references to the live "
        "parameters, and every stored sample is then the chain's last state: store copies, e.g. "
        "{k: v.clone() for k, v in model.state_dict().items()} or parameters_to_vector(model.parameters()).clone()"
    )


def _promoted(rows: Sequence[Sequence[torch.Tensor]]) -> torch.dtype:
    """The dtype ``torch.stack`` of the concatenated rows would have (type promotion over every block)."""
    return functools.reduce(torch.promote_types, (t.dtype for r in rows for t in r))


class _Samples(Sequence):
    """The samples of stacked tensors ``[S, *shape]`` (one per column block) as rows of blocks, each made (as views)
    when read: :func:`_fill` copies such a bank one column block at a time."""

    def __init__(self, stacked: Sequence[torch.Tensor]) -> None:
        self.stacked = list(stacked)

    def __len__(self) -> int:
        return int(self.stacked[0].shape[0])

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return [t[i] for t in self.stacked]


def _fill(rows: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype | None, checks: bool = True) -> torch.Tensor:
    """``torch.stack([torch.cat(blocks) for blocks in rows]).to(dtype)`` built into one preallocated ``[S, D]``
    tensor, each block copied into its slice (the peak is the result, not the rows, their stack and its cast).

    Values and checks as that expression and :func:`to_flat`'s: the blocks (any shape, flattened row-major) promoted
    to their common dtype, then cast to ``dtype`` (a block of another dtype goes through the common one, so it is
    rounded as before); with ``checks``, integers and identical samples refused in the common dtype first. The
    result is on the first block's device. ``rows`` given as :class:`_Samples` (a dict of stacked tensors) are
    copied one column block, every sample at once, at a time.
    """
    stacked = rows.stacked if isinstance(rows, _Samples) else None
    promoted = _promoted(rows if stacked is None else [stacked])
    first = rows[0]
    device = first[0].device
    if checks:
        _check_floating(promoted, dtype)
        if _all_identical(rows, promoted, device):
            _refuse_identical(len(rows))
    target = promoted if dtype is None else dtype
    widths = [t.numel() for t in first]
    out = torch.empty(len(rows), sum(widths), dtype=target, device=device)
    with torch.no_grad():
        # (rows of out, their blocks): one sample's blocks, or each block of every sample
        for i, blocks in enumerate(rows) if stacked is None else [(slice(None), stacked)]:
            at = 0
            for t, n in zip(blocks, widths):
                dst, src = out[i, at : at + n].view(t.shape), t.detach()
                if src.dtype != promoted and promoted != target:  # mixed dtypes: through the common one
                    for d, r in zip(dst, src) if stacked is not None else [(dst, src)]:
                        d.copy_(r.to(promoted))  # one sample's block as a temporary
                else:
                    dst.copy_(src)
                at += n
    _check_cast(out, promoted)
    return out


def _cast(flat: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``flat`` in ``dtype``; samples that overflow it (a float64 bank's 1e300 in float32) refused."""
    if dtype is None or dtype == flat.dtype:
        return flat
    out = flat.to(dtype)
    _check_cast(out, flat.dtype)
    return out


def _check_cast(out: torch.Tensor, given: torch.dtype) -> None:
    """Refuse samples that ``out``, a bank cast from ``given``, holds as inf though ``given`` held them finite."""
    if given.is_floating_point and out.is_floating_point() and torch.finfo(out.dtype).max < torch.finfo(given).max:
        check_finite(bad_rows(out), f" in {str(out.dtype).removeprefix('torch.')}, the model's dtype,")


def _stacked_rows(
    bank: Mapping[str, Any], spec: ParamSpec, tied: tuple[tuple[str, str], ...], S: int, model: torch.nn.Module | None
) -> list[dict[str, torch.Tensor]]:
    """The non-parameter entries of a dict of stacked tensors that carry one value per sample (leading dimension
    ``S``; with ``model``, the rest of the shape its buffer's), as ``S`` per-sample dicts."""
    skip = set(spec.names) | {alias for alias, _ in tied}
    own = {} if model is None else {k: tuple(v.shape) for k, v in model.state_dict().items()}
    keys = [
        k
        for k, v in bank.items()
        if k not in skip
        and isinstance(v, torch.Tensor)
        and v.ndim >= 1
        and v.shape[0] == S
        and (model is None or own.get(k) == tuple(v.shape[1:]))
    ]
    return [{k: bank[k][s] for k in keys} for s in range(S)] if keys else []


def _warn_varying_buffers(
    bank: Sequence[Mapping[str, Any]],
    spec: ParamSpec,
    tied: tuple[tuple[str, str], ...],
    model: torch.nn.Module | None = None,
    stacked: bool = False,
) -> None:
    """Warn when the samples carry different buffers (BatchNorm statistics collected while sampling in training
    mode), or the same ones in every sample but other than the model's (statistics re-estimated after sampling):
    every sample is evaluated with the model's current buffers, and each gets its own back unchanged."""
    if not bank:
        return
    skip = set(spec.names) | {alias for alias, _ in tied}
    first = bank[0]
    if model is not None:
        own = dict(model.named_buffers())
        stale = [
            k
            for k, v in first.items()
            if k not in skip
            and isinstance(v, torch.Tensor)
            and v.is_floating_point()
            and v.layout == torch.strided
            and isinstance(own.get(k), torch.Tensor)
            and own[k].shape == v.shape
            and own[k].layout == torch.strided
            and not torch.allclose(own[k].to(v.device, v.dtype), v, rtol=1e-5, atol=1e-8)
            and all(
                isinstance(sd.get(k), torch.Tensor) and sd[k].layout == torch.strided and torch.equal(sd[k], v)
                for sd in bank[1:]
            )
        ]
        if stale:
            # stop 45's probe: BatchNorm statistics re-estimated after sampling moved the removed rows 0.14 of the
            # way to retraining instead of 0.64, every check passing, the samples returned with their old statistics
            warnings.warn(
                f"bank: every sample holds the same {len(stale)} non-parameter entries (e.g. {stale[:3]}), but not "
                "the model's values of them: the unlearner evaluates every sample with the model's current buffers "
                "and returns each sample's own unchanged, so it moves the posterior of a network the samples were not "
                "drawn from. If the samples' values are the right ones, copy them into the model first (for name, b "
                f"in model.named_buffers(): b.copy_({'samples[name][0]' if stacked else 'samples[0][name]'})); if "
                "the model's are, store them in the samples",
                stacklevel=outside_stacklevel(),
            )
    if len(bank) < 2:
        return
    varying = [
        k
        for k, v in first.items()
        if k not in skip
        and isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and v.layout == torch.strided  # a sparse buffer (e.g. a graph's adjacency) has no torch.equal
        and any(
            isinstance(sd.get(k), torch.Tensor) and sd[k].layout == torch.strided and not torch.equal(sd[k], v)
            for sd in bank[1:]
        )
    ]
    if varying:
        warnings.warn(
            f"bank: the samples hold different values of {len(varying)} non-parameter entries (e.g. {varying[:3]}; "
            "buffers such as BatchNorm running statistics, collected while sampling in training mode). The unlearner "
            "evaluates every sample with the model's current buffers and returns each sample's own unchanged, so the "
            "posterior it moves is the network with those buffers; freeze the statistics before sampling for an exact "
            "match",
            stacklevel=outside_stacklevel(),
        )


def _check_not_aliased(bank: Sequence[Mapping[str, Any]], spec: ParamSpec) -> None:
    """Refuse state_dicts whose parameter tensors share memory across samples (references, not copies)."""
    seen: dict[int, int] = {}
    for i, sd in enumerate(bank):
        for name in spec.names:
            t = sd[name]
            if t.numel() == 0:
                continue
            key = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
            if seen.setdefault(key, i) != i:
                raise ValueError(
                    f"bank: state_dicts {seen[key]} and {i} hold the same tensor for {name!r} (the same memory), so "
                    "they are not two samples. model.state_dict() returns references to the live parameters: store "
                    "copies, e.g. samples.append({k: v.clone() for k, v in model.state_dict().items()})"
                )


def _flat_with_frozen(
    bank: torch.Tensor, spec: ParamSpec, params: list[torch.nn.Parameter], dtype: torch.dtype | None
) -> tuple[torch.Tensor, BankLayout]:
    """A ``[S, D_all]`` bank of every parameter (``parameters_to_vector(model.parameters())``): its trainable
    columns, and a layout that puts the frozen ones back. The frozen columns must hold the model's values in every
    sample (the unlearner computes with those; a bank that sampled them needs them trainable)."""
    _check_floating(bank.dtype, dtype)  # integers, complex for a real model: before the frozen columns' comparison
    trainable = torch.cat([torch.full((p.numel(),), p.requires_grad, dtype=torch.bool) for p in params])
    frozen = torch.cat([p.detach().reshape(-1) for p in params if not p.requires_grad]).to(bank.device)
    got = bank.detach()[:, ~trainable.to(bank.device)]
    if not torch.equal(got, frozen.to(got.dtype).expand_as(got)):
        bad = int((got != frozen.to(got.dtype)).any(1).sum())
        raise ValueError(
            f"bank: its rows hold all {trainable.numel():,} parameters, but in {bad} of {len(got)} samples the "
            f"{int((~trainable).sum()):,} frozen ones (requires_grad=False) differ from the model's. The unlearner "
            "moves only trainable parameters and computes with the model's frozen values: make the sampled "
            "parameters trainable, or pass only the trainable columns"
        )
    # before the copy (the frozen columns equal the model's, which may hold ±inf: clamp bounds)
    check_finite(_trainable_bad(bad_rows(bank), lambda i: bank[i : i + 1], params))
    flat = bank.detach()[:, trainable.to(bank.device)]  # a new tensor (boolean indexing copies)
    if flat.shape[0] == 0:
        raise ValueError("bank: it holds no samples")
    layout = BankLayout("flat", spec, trainable=trainable.to(bank.device), frozen=frozen, dtype=bank.dtype)
    return _cast(flat, dtype), layout


def _flat_rows(
    bank: list[torch.Tensor], spec: ParamSpec, params: list[torch.nn.Parameter], width: int, dtype: torch.dtype | None
) -> tuple[torch.Tensor, BankLayout]:
    """A list of ``[D]`` (or ``[D_all]``, every parameter: ``width``) vectors, checked for NaN/inf already, as
    :func:`to_flat` takes their ``torch.stack``, built into one ``[S, D]`` tensor without that stack."""
    promoted, device = _promoted([bank]), bank[0].device
    if bank[0].numel() != width or width == spec.dim:
        if bank[0].numel() != spec.dim:
            also = f" or [S, {width}] (every parameter, frozen ones included)" if width != spec.dim and width else ""
            raise ValueError(
                f"bank: a tensor bank must have shape [S, {spec.dim}] (S samples of the {spec.dim} trainable "
                f"parameters){also}, got {(len(bank), bank[0].numel())}"
            )
        return _fill([[r] for r in bank], dtype), BankLayout("flat", spec, dtype=promoted)
    # rows of every parameter: as _flat_with_frozen, one parameter's block at a time
    _check_floating(promoted, dtype)  # _fill's checks are off below
    trainable = torch.cat([torch.full((p.numel(),), p.requires_grad, dtype=torch.bool) for p in params])
    frozen = torch.cat([p.detach().reshape(-1) for p in params if not p.requires_grad]).to(device)
    keep, fixed, at, f = [], [], 0, 0  # (offset, length) of each trainable block; (offset, frozen's offset, length)
    for p in params:
        if p.requires_grad:
            keep.append((at, p.numel()))
        else:
            fixed.append((at, f, p.numel()))
            f += p.numel()
        at += p.numel()
    differ = sum(
        any(
            not torch.equal(_as(r.narrow(0, a, n), promoted, device), _as(frozen.narrow(0, b, n), promoted, device))
            for a, b, n in fixed
        )
        for r in bank
    )
    if differ:
        raise ValueError(
            f"bank: its rows hold all {trainable.numel():,} parameters, but in {differ} of {len(bank)} samples "
            f"the {int((~trainable).sum()):,} frozen ones (requires_grad=False) differ from the model's. The unlearner "
            "moves only trainable parameters and computes with the model's frozen values: make the sampled "
            "parameters trainable, or pass only the trainable columns"
        )
    flat = _fill([[r.narrow(0, a, n) for a, n in keep] for r in bank], dtype, checks=False)
    return flat, BankLayout("flat", spec, trainable=trainable.to(device), frozen=frozen, dtype=promoted)
