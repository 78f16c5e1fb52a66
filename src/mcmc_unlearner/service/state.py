"""What a state file holds and how it is read back: tensors of chain, sampler, bank, data state, unlearner.

A state file ``state-<k>.safetensors`` holds every tensor of a saved model: the model's ``state_dict``
(``model/<name>``), the sample bank (``bank``), the remaining-data mask and shuffling state (``data/alive``,
``data/order``, ``data/pos``, ``data/generator``), the sampler's tensors (``sampler/state/<i>/<key>``, e.g.
SGHMC momentum, and ``sampler/generator``: the noise generator's state, torch's global one for a sampler without its
own), the unlearner's generator (``unlearner/generator``) and cached
curvature (``unlearner/...``). Non-tensor configuration (sampler hyper-parameters, unlearner settings) goes
into the manifest as JSON (:func:`unlearner_config`, :func:`sampler_config`). No pickle anywhere.

:func:`model_digest` is the model's identity in the ledger: SHA-256 over the flat parameters, the bank and the
remaining-data mask.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..curvature import ParamSpec
from ..data import RemovableDataset
from ..options import check_option
from ..samplers import SGHMC, SGLD
from ..unlearner import MCMCUnlearner, _default_nll, default_curvature_draws, default_refresh_every
from . import fsio, specs
from .fsio import StoreError

__all__ = [
    "DATA_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "STATE_RE",
    "model_digest",
    "read_tensors",
    "read_torch_checkpoint",
    "rebuild_as_auto",
    "saved_config",
    "tensors_digest",
    "unlearner_config",
]

FORMAT_VERSION = 1
FORMAT_NAME = "mcmc-unlearner-model"
DATA_FILE = "data.safetensors"
STATE_RE = re.compile(r"state-[0-9]{6,}\.safetensors")
_SAMPLERS: dict[str, type[torch.optim.Optimizer]] = {"SGLD": SGLD, "SGHMC": SGHMC}


# ---------------------------------------------------------------------------------------------- digests
def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


def tensors_digest(named: Sequence[tuple[str, torch.Tensor | None]]) -> str:
    """SHA-256 over named tensors: for each, ``name|dtype|shape|`` followed by the raw little-endian bytes.

    ``None`` entries are hashed as ``name|none|``.
    """
    h = hashlib.sha256()
    for name, t in named:
        if t is None:
            h.update(f"{name}|none|".encode())
            continue
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def model_digest(model: nn.Module, bank: torch.Tensor | None, alive: torch.Tensor) -> str:
    """The model's identity in the ledger: SHA-256 of flat parameters, sample bank and remaining-data mask."""
    return tensors_digest([("params", ParamSpec.flatten_module(model)), ("bank", bank), ("alive", alive)])


def data_fingerprint(tensors: Sequence[torch.Tensor]) -> str:
    return tensors_digest([(str(i), t) for i, t in enumerate(tensors)])


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a legacy ``torch.save`` file safely (``weights_only=True``: tensors and plain containers only)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise StoreError(
            f"{path}: not a weights-only torch checkpoint ({type(exc).__name__}); arbitrary pickles are refused: "
            "re-export the tensors with safetensors"
        ) from None
    if not isinstance(obj, dict):
        raise StoreError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def parse_tensors(raw: bytes, where: Path) -> dict[str, torch.Tensor]:
    try:
        return st_load(raw)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise StoreError(f"{where} is not a readable safetensors file ({exc}); restore it from a backup") from None


def read_tensors(root: Path, name: str) -> tuple[bytes, dict[str, torch.Tensor]]:
    """Read and parse the safetensors file ``root/name`` (confined, regular file)."""
    try:
        raw = fsio.read_regular(root, name, what="tensor file")
    except FileNotFoundError:
        raise StoreError(
            f"{root / name} is missing: the model folder is incomplete; restore it from a backup"
        ) from None
    return raw, parse_tensors(raw, root / name)


# ---------------------------------------------------------------------------------------------- configs
def unlearner_config(un: MCMCUnlearner) -> dict[str, Any]:
    """The JSON configuration that rebuilds ``un`` (callables must be the defaults)."""
    return specs.json_ok(un.config(), "unlearner configuration")


def saved_config(un: MCMCUnlearner) -> dict[str, Any]:
    """The configuration a model folder keeps for ``un`` and that rebuilds it as built: :func:`unlearner_config`
    (what a request ran with, as a ledger entry records it) with ``curvature_draws=None`` (and ``refresh_every=None``)
    where none was given (the
    solver's default; the resolved number was saved, and the reloaded unlearner took it as asked for by name: a
    bank smaller than it was then warned about, and the draws on full rows were no longer capped) and
    ``memory_budget`` as given (not saved before: every load took the default budget of the machine loading it)."""
    cfg = unlearner_config(un)
    # not given and still the solver's default (a number set on the built unlearner since is kept, as before)
    if not un._curvature_draws_given and un.curvature_draws == default_curvature_draws(un.solver):
        cfg["curvature_draws"] = None
    # refresh_every likewise: the resolved 20 (K-FAC's) was saved, and a request overriding the solver to CG reused
    # its curvature 20 times, not CG's 10
    if not un._refresh_every_given and un.refresh_every == default_refresh_every(un.solver):
        cfg["refresh_every"] = None
    # as given (None, "25%": the machine's share where the folder is loaded) unless set on the built unlearner since
    budget = un._memory_budget_option if un.memory_budget == un._memory_budget_built else int(un.memory_budget)
    return {**cfg, "memory_budget": budget}


def _constructor_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A stored unlearner configuration as constructor arguments, including ones written by earlier versions:
    options the constructor no longer takes are dropped, and so are ``None`` values of options that refuse ``None``
    (e.g. ``check_draws``, whose meaning changed), which then take their current default. A ``None`` the option
    takes is kept: ``grad_draws=None`` (every bank draw) was dropped as its default is not ``None``, and the folder
    reloaded with ``'auto'``."""
    params = inspect.signature(MCMCUnlearner.__init__).parameters
    out = {}
    for k, v in config.items():
        p = params.get(k)
        if p is None or p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or k in ("model", "sampler", "bank"):
            continue
        if v is None and p.default is not None and not _takes_none(k):
            continue
        out[k] = v
    return out


def _takes_none(key: str) -> bool:
    """Whether the unlearner's check of option ``key`` takes ``None`` as a value."""
    try:
        check_option(key, None)
    except (KeyError, TypeError, ValueError):
        return False
    return True


def _json_kind(v: Any) -> str:
    """``"number"`` for int and float (not bool), else the JSON type's name."""
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return type(v).__name__


def defaulted_options(config: Mapping[str, Any], un: MCMCUnlearner) -> dict[str, Any]:
    """The options a stored configuration does not hold (saved by an earlier version, before they existed, or
    ``None`` where the option no longer takes it), with the current defaults they take when the folder is loaded."""
    kept = _constructor_config(config)
    return {k: v for k, v in un.config().items() if k not in kept}


def sampler_config(sampler: torch.optim.Optimizer | None) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    if sampler is None:
        return None, {}
    name = type(sampler).__name__
    if name not in _SAMPLERS or type(sampler) is not _SAMPLERS[name]:
        raise StoreError(f"cannot save sampler {name}: only {', '.join(_SAMPLERS)} are supported")
    sd = sampler.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"sampler/state/{idx}/{key}"] = val
            else:
                plain.setdefault(str(idx), {})[key] = val
    gen = getattr(sampler, "generator", None)
    # a sampler without a generator of its own (generator=None) draws its noise from torch's global generator: its
    # state is saved, so the rebuilt sampler's private generator continues the noise the uninterrupted chain would
    # have drawn next (nothing was saved before, and every such folder came back at torch's default seed)
    tensors["sampler/generator"] = gen.get_state() if gen is not None else torch.get_rng_state()
    cfg = {
        "name": name,
        "param_groups": sd["param_groups"],
        "state": plain,
        "generator": True if gen is not None else "global",
    }
    return specs.json_ok(cfg, "sampler configuration"), tensors


def state_tensors(
    model: nn.Module, sampler: torch.optim.Optimizer | None, data: RemovableDataset, un: MCMCUnlearner
) -> dict[str, torch.Tensor]:
    """The state file's tensors (copies)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in _state_views(model, sampler, data, un).items()}


def state_layout(
    model: nn.Module, sampler: torch.optim.Optimizer | None, data: RemovableDataset, un: MCMCUnlearner
) -> dict[str, torch.dtype]:
    """The names and dtypes of the state file's tensors, as :func:`state_tensors` writes them (no copies)."""
    return {k: v.dtype for k, v in _state_views(model, sampler, data, un).items()}


def _state_views(
    model: nn.Module, sampler: torch.optim.Optimizer | None, data: RemovableDataset, un: MCMCUnlearner
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in model.state_dict().items()}
    if un.bank is not None:
        out["bank"] = un.bank
    ds = data.state_dict()
    out["data/alive"] = ds["alive"]
    out["data/order"] = ds["order"]
    out["data/pos"] = ds["pos"].reshape(1).to(torch.int64)
    out["data/generator"] = ds["generator"]
    out.update(sampler_config(sampler)[1])
    out["unlearner/generator"] = un.generator.get_state()
    out.update({f"unlearner/{k}": v for k, v in un.curvature_state()[0].items()})
    return out


#: Prefixes of the state file's tensors that :func:`nonfinite_state` checks (the parameters and the bank have their
#: own checks: ``params_finite``, the bank setter).
CHECKED_STATE = ("sampler/state/", "unlearner/")


def nonfinite_state(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the sampler's and unlearner's floating-point state tensors (SGHMC momentum, the carried influence,
    the cached curvature, ...) that hold NaN or infinite values, sorted.

    Such a state was never checked: saved, verified OK, and carried into every later request (stop 56's probe)."""
    return sorted(
        k
        for k, v in tensors.items()
        if k.startswith(CHECKED_STATE)
        and (v.is_floating_point() or v.is_complex())
        and v.numel()
        and not bool(torch.isfinite(v).all())
    )


def state_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    # one metadata key only: safetensors writes a multi-key metadata map in hash order (not reproducible)
    return st_save(tensors, metadata={"format": f"{FORMAT_NAME}/{FORMAT_VERSION}"})


def check_saveable(model: nn.Module, sampler: torch.optim.Optimizer | None, un: MCMCUnlearner) -> None:
    if un.model is not model:
        raise StoreError("the unlearner drives a different model object than `model`; pass the same model")
    if sampler is not None and un.sampler is not None and un.sampler is not sampler:
        raise StoreError("the unlearner drives a different sampler than `sampler`; pass the same sampler")
    if sampler is not None:
        listed = [p for g in sampler.param_groups for p in g["params"]]
        if [id(p) for p in listed] != [id(p) for p in model.parameters()]:
            # the state file numbers the sampler's parameters as torch does (0, 1, ... over its groups) and the load
            # gives number i to the i-th of model.parameters(): another order moved one parameter's SGHMC velocity
            # onto another of the same shape, silently
            raise StoreError(
                "the sampler must hold every parameter of the model, in model.parameters() order (in one or more "
                "groups): its saved state is matched to the rebuilt model by that order; build it as "
                "SGHMC(model.parameters(), ...) or with groups that split that list in order"
            )
    if getattr(un.nll, "__wrapped__", un.nll) is not _default_nll:  # the unlearner reads it through _one_per_row
        raise StoreError("cannot save an unlearner with a custom nll callable; give the model an nll() method")
    if getattr(un.energy, "__func__", None) is not MCMCUnlearner._default_energy:
        raise StoreError("cannot save an unlearner with a custom energy callable; use the default energy")


def state_name(seq: int) -> str:
    return f"state-{seq:06d}.safetensors"


def is_state_file(name: str) -> bool:
    return STATE_RE.fullmatch(name) is not None


# ---------------------------------------------------------------------------------------------- rebuild
def rebuild_sampler(
    model: nn.Module, cfg: Mapping[str, Any] | None, tensors: Mapping[str, torch.Tensor]
) -> torch.optim.Optimizer | None:
    if cfg is None:
        return None
    cls = _SAMPLERS.get(cfg.get("name"))
    if cls is None:
        raise StoreError(f"unknown sampler {ascii(cfg.get('name'))[:40]} in manifest; known: {', '.join(_SAMPLERS)}")
    group = cfg["param_groups"][0]
    hyper = {k: group[k] for k in ("lr", "alpha") if k in group}
    gen = torch.Generator()
    if "sampler/generator" in tensors:
        gen.set_state(tensors["sampler/generator"])
    # the saved groups, in order: torch numbers a sampler's parameters 0, 1, ... across its groups, which
    # check_saveable made model.parameters()' order (one group of all parameters was rebuilt before, and a sampler
    # saved with several groups, e.g. a step size per layer, could not be loaded)
    params = list(model.parameters())
    groups = []
    for g in cfg["param_groups"]:
        idx = g.get("params") if isinstance(g, Mapping) else None
        if not isinstance(idx, list) or not all(isinstance(i, int) and 0 <= i < len(params) for i in idx):
            raise StoreError(
                "sampler state does not fit the model: a parameter group names parameters it does not have"
            )
        groups.append({"params": [params[i] for i in idx], **{k: g[k] for k in ("lr", "alpha") if k in g}})
    try:
        sampler = cls(groups, generator=gen, **hyper)
    except ValueError as exc:
        raise StoreError(f"sampler state does not fit the model: {exc}") from None
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith("sampler/state/"):
            _, _, idx, name = key.split("/", 3)
            state.setdefault(int(idx), {})[name] = val
    for idx, extra in (cfg.get("state") or {}).items():
        state.setdefault(int(idx), {}).update(extra)
    named = {i for g in cfg["param_groups"] for i in g["params"]}
    stray = sorted(set(state) - named)
    if stray:  # torch keeps a state for an index no group names, and it was written back at the next save
        raise StoreError(
            f"sampler state does not fit the model: it holds state for parameter(s) {stray[:5]} that no parameter "
            "group names; restore the folder from a backup"
        )
    try:
        sampler.load_state_dict({"state": state, "param_groups": copy.deepcopy(cfg["param_groups"])})
    except (ValueError, KeyError) as exc:
        raise StoreError(f"sampler state does not fit the model: {exc}") from None
    return sampler


#: What ``solver='auto'`` sets the options its dense-build weighing may change to where they were not given (a
#: folder saved by stop 58's code recorded only that the weighing was pending, not which were given).
_DENSE_AUTO_DEFAULTS = {"curvature_draws": 16, "refresh_every": 10, "recenter_every": 0}
_DENSE_SOLVERS = ("exact", "ggn")


def rebuild_as_auto(
    model: nn.Module,
    sampler: torch.optim.Optimizer | None,
    bank: torch.Tensor | None,
    given: Mapping[str, Any],
    pending: Any,
    un: MCMCUnlearner,
) -> MCMCUnlearner:
    """``un`` rebuilt as ``solver='auto'`` where its saved state says auto's weighing of the dense build it took is
    still pending (:meth:`~mcmc_unlearner.unlearner.MCMCUnlearner._weigh_dense_build`), so that the next request
    weighs it as the library's own unlearner does; ``un`` itself otherwise.

    The configuration stores the solver auto resolved (``ggn``), which the library takes as asked for by name, so
    the service never weighed the build: a 668-parameter convolutional net of 64 outputs per row ran the dense
    Gauss-Newton matrix, 3.3 s CPU per request, where the library's own unlearner took K-FAC, 0.35 s (stop 59's
    probe). The options the weighing's switch sets to the new solver's defaults are left out where they were not
    given (``pending`` names them). The rebuild is used only where it resolves to the saved configuration exactly.
    """
    if not pending or given.get("solver") not in _DENSE_SOLVERS:
        return un
    if isinstance(pending, Mapping):
        defaulted = {k for k, v in pending.items() if v is True}
    else:  # saved as True: not given where the value is auto's default for the dense solver
        defaulted = {k for k, v in _DENSE_AUTO_DEFAULTS.items() if given.get(k) == v}
    auto = {k: v for k, v in given.items() if k not in defaulted}
    auto["solver"] = "auto"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = MCMCUnlearner(model, sampler, bank=bank, **auto)
    except (TypeError, ValueError):
        return un
    if again.config() != un.config() or getattr(again, "_dense_probe", None) is None:
        return un
    return again


def rebuild_unlearner(
    model: nn.Module,
    sampler: torch.optim.Optimizer | None,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    ustate: Mapping[str, Any],
) -> MCMCUnlearner:
    """The unlearner of a saved model: configuration, bank, generator and cached curvature.

    Cached curvature written by an earlier version that the current backends cannot read is dropped (it is a
    cache: the next request rebuilds it).
    """
    given = _constructor_config(config)
    try:
        with warnings.catch_warnings():  # the saved options: an ignored one was said when the unlearner was built
            warnings.filterwarnings("ignore", r"\w+=.* has no effect with ", UserWarning)
            un = MCMCUnlearner(model, sampler, bank=tensors.get("bank"), **given)
    except (TypeError, ValueError) as exc:
        params = inspect.signature(MCMCUnlearner.__init__).parameters
        odd = [
            k
            for k, v in given.items()
            if v is not None and params[k].default not in (None, inspect.Parameter.empty)
            and isinstance(params[k].default, (bool, int, float)) and _json_kind(v) != _json_kind(params[k].default)
        ]  # fmt: skip
        if odd:  # a value of another JSON kind (tol "0.0001"), which the unlearner now refuses when built
            raise StoreError(
                "unlearner configuration in manifest.json holds "
                + ", ".join(f"{k}={ascii(given[k])[:40]}" for k in odd[:3])
                + "; it was not written by this library: restore the folder from a backup"
            ) from None
        raise StoreError(
            f"unlearner configuration is invalid: {exc}; the manifest was edited or written otherwise: restore the "
            "folder from a backup"
        ) from None
    # a value of another JSON kind than the unlearner keeps (tol "0.001" for 0.001) was converted and the folder called
    # intact (stop 46's probe): nothing this library writes looks like that
    now = un.config()
    odd = [
        k
        for k, v in given.items()
        if k in now and v is not None and now[k] is not None and _json_kind(v) != _json_kind(now[k])
    ]
    if odd:
        raise StoreError(
            "unlearner configuration in manifest.json holds "
            + ", ".join(f"{k}={ascii(given[k])[:40]} (the unlearner keeps {ascii(now[k])[:40]})" for k in odd[:3])
            + "; it was not written by this library: restore the folder from a backup"
        )
    pending = ustate.get("dense_weigh_pending")
    if pending is True and int(ustate.get("grad_draw_round") or 0) > 0:
        # stop 58's service wrote True at the save and merged it into every later commit without weighing: requests
        # have run with the dense build since, and auto weighs only before its first one (weighed now, the folder's
        # solver and options changed in the middle of its sequence, its cached dense curvature dropped)
        pending = False
    un = rebuild_as_auto(model, sampler, tensors.get("bank"), given, pending, un)
    un.generator.set_state(tensors["unlearner/generator"])
    prefix = "unlearner/"
    curv = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and k != "unlearner/generator"}
    try:
        un.load_curvature_state(curv, dict(ustate))
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError):
        un.reset_curvature()
    return un
