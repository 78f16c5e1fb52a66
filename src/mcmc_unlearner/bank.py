"""Sample banks in the layouts users keep them in, converted to the flat ``[S, D]`` tensor the algorithm uses.

Accepted layouts (``D`` = the model's trainable parameters in ``named_parameters`` order, see
:class:`~mcmc_unlearner.curvature.ParamSpec`):

* a tensor ``[S, D]`` of flat parameter vectors (e.g. rows of ``parameters_to_vector``); on a model with frozen
  parameters also ``[S, D_all]``, rows of ``parameters_to_vector(model.parameters())`` with the frozen ones
  included (they must hold the model's frozen values; returned in that width, those columns unchanged);
* a list of ``state_dict``-like mappings ``{name: tensor}`` (buffers and other entries are carried along);
* a dict of stacked tensors ``{name: [S, *shape]}`` (the layout of the ``posteriors`` library).

:func:`to_flat` always copies, so the unlearner never writes into the caller's tensors; :class:`BankLayout`
turns a shifted flat bank back into the caller's layout (new tensors, same dtypes and devices).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .curvature import ParamSpec

__all__ = ["BankLayout", "to_flat"]


@dataclass(frozen=True)
class BankLayout:
    """How a bank was given: ``kind`` is ``"flat"``, ``"state_dicts"`` or ``"stacked"``."""

    kind: str
    spec: ParamSpec
    template: Any = None  # state_dicts: the original list (non-parameter entries are copied from it)
    trainable: torch.Tensor | None = None  # flat banks of every parameter: which columns are trainable
    frozen: torch.Tensor | None = None  # ... and the frozen columns' values

    def restore(self, flat: torch.Tensor) -> Any:
        """The flat bank ``[S, D]`` in this layout (new tensors)."""
        if self.kind == "flat":
            if self.trainable is None:
                return flat.clone()
            out = torch.empty(flat.shape[0], self.trainable.numel(), dtype=flat.dtype, device=flat.device)
            out[:, ~self.trainable] = self.frozen.to(flat)
            out[:, self.trainable] = flat
            return out
        rows = [self.spec.unflatten(r) for r in flat]
        if self.kind == "stacked":
            return {name: torch.stack([r[name] for r in rows]) for name in self.spec.names}
        out = []
        for i, r in enumerate(rows):
            orig = self.template[min(i, len(self.template) - 1)]  # samples collected later reuse the last one's extras
            d = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in orig.items()}
            for name in self.spec.names:
                d[name] = r[name].to(dtype=orig[name].dtype, device=orig[name].device).clone()
            out.append(type(orig)(d) if isinstance(orig, dict) else d)
        return out


def _missing(names: Sequence[str], have: Mapping[str, Any], what: str) -> None:
    lost = [n for n in names if n not in have]
    if lost:
        raise ValueError(
            f"bank: {what} lacks the model's parameter(s) {lost[:3]}; its keys must be the names of "
            "model.named_parameters() (as in model.state_dict())"
        )


def to_flat(
    bank: Any, spec: ParamSpec, dtype: torch.dtype | None = None, model: torch.nn.Module | None = None
) -> tuple[torch.Tensor, BankLayout]:
    """Convert ``bank`` (any layout of the module docstring) to a new ``[S, D]`` tensor and its layout.

    Args:
        bank: The samples.
        spec: The trainable parameters.
        dtype: The flat bank's dtype (default: the bank's).
        model: The model; with it a tensor bank may also hold every parameter, frozen ones included.

    Raises:
        ValueError: an unknown layout, a width other than ``D``, missing parameters or mismatched shapes.
    """
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
        flat, layout = bank.detach().clone(), BankLayout("flat", spec)
    elif isinstance(bank, Mapping):
        _missing(spec.names, bank, "the dict of stacked tensors")
        sizes = {int(bank[n].shape[0]) for n in spec.names}
        if len(sizes) != 1:
            raise ValueError(f"bank: stacked tensors disagree on the number of samples {sorted(sizes)}")
        parts = []
        for n, shape in zip(spec.names, spec.shapes):
            t = bank[n].detach()
            if tuple(t.shape[1:]) != tuple(shape):
                raise ValueError(f"bank: {n} has sample shape {tuple(t.shape[1:])}, the model's is {tuple(shape)}")
            parts.append(t.reshape(t.shape[0], -1))
        flat, layout = torch.cat(parts, 1).clone(), BankLayout("stacked", spec)
    elif isinstance(bank, Sequence) and not isinstance(bank, (str, bytes)) and len(bank) > 0:
        rows = []
        for i, sd in enumerate(bank):
            if not isinstance(sd, Mapping):
                raise ValueError(f"bank: item {i} is a {type(sd).__name__}, expected a state_dict (a mapping)")
            _missing(spec.names, sd, f"state_dict {i}")
            for n, shape in zip(spec.names, spec.shapes):
                if tuple(sd[n].shape) != tuple(shape):
                    got = tuple(sd[n].shape)
                    raise ValueError(f"bank: state_dict {i}: {n} has shape {got}, expected {tuple(shape)}")
            rows.append(torch.cat([sd[n].detach().reshape(-1) for n in spec.names]))
        flat, layout = torch.stack(rows), BankLayout("state_dicts", spec, list(bank))
    else:
        raise ValueError(
            "bank: give a tensor [S, D], a list of state_dicts, or a dict of stacked tensors {name: [S, ...]}; "
            f"got {type(bank).__name__}"
        )
    if flat.shape[0] == 0:
        raise ValueError("bank: it holds no samples")
    return (flat if dtype is None else flat.to(dtype)), layout


def _flat_with_frozen(
    bank: torch.Tensor, spec: ParamSpec, params: list[torch.nn.Parameter], dtype: torch.dtype | None
) -> tuple[torch.Tensor, BankLayout]:
    """A ``[S, D_all]`` bank of every parameter (``parameters_to_vector(model.parameters())``): its trainable
    columns, and a layout that puts the frozen ones back. The frozen columns must hold the model's values in every
    sample (the unlearner computes with those; a bank that sampled them needs them trainable)."""
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
    flat = bank.detach()[:, trainable.to(bank.device)].clone()
    if flat.shape[0] == 0:
        raise ValueError("bank: it holds no samples")
    layout = BankLayout("flat", spec, trainable=trainable.to(bank.device), frozen=frozen)
    return (flat if dtype is None else flat.to(dtype)), layout
