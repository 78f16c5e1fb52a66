"""Saved models on disk: crash-safe checkpoints of chain, sampler, sample bank and remaining data.

**Format** (``FORMAT_VERSION`` 1). A model folder holds

* ``state-<k>.safetensors`` — every tensor: the model's ``state_dict`` (``model/<name>``), the sample bank
  (``bank``), the remaining-data mask and shuffling state (``data/alive``, ``data/order``, ``data/pos``,
  ``data/generator``), the sampler's tensors (``sampler/state/<i>/<key>``, e.g. SGHMC momentum, and
  ``sampler/generator``), the unlearner's generator (``unlearner/generator``) and cached dense Hessian
  (``unlearner/cache``) and low-rank curvature (``unlearner/precond_*``);
* ``manifest.json`` — the commit point: format version, the current state file and its SHA-256, the model's
  digest (see :func:`model_digest`), model spec, data spec and data fingerprint, sampler config (class, param
  groups with the current step size), unlearner config, the ledger's committed length and head hash, the last
  applied request id, ``extra`` (free JSON), and ``manifest_sha256`` over all of that;
* ``ledger.jsonl`` — the audit trail (:mod:`mcmc_unlearner.ledger`);
* ``data.safetensors`` — only for data spec kind ``"tensors"`` (the training data itself, tensors ``"0"``,
  ``"1"``, ...).

No pickle anywhere: tensors go through safetensors and everything else through JSON (a legacy ``torch.save``
file can be read with :func:`read_torch_checkpoint`, which uses ``weights_only=True``).

**Commit protocol.** Every file is written atomically (temporary file in the same folder, fsync, rename,
fsync of the folder). An update writes the new state file, appends its ledger line (fsync), then replaces
the manifest — the single commit point — and finally deletes the old state file. A crash therefore leaves the
old manifest naming the old, intact state, possibly with an orphan state file and an uncommitted ledger
tail, which :func:`recover` removes (it runs before every update, under the folder's lock).

**Replays are deterministic:** all generator states travel with the state, so the same model, request and
configuration give bit-identical state files on the same machine.

Test hook: with the environment variable ``MCMC_UNLEARNER_SLOW_COMMIT=<seconds>`` every commit step prints a
``[commit] <phase>`` marker to stderr and sleeps that long (and ledger lines are written in two halves), so
crash tests can kill the process inside each write window; ``MCMC_UNLEARNER_SLOW_PHASE=<phase>`` limits the
sleep to that one phase. Never set them in production.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from . import ledger as ledger_mod
from .curvature import ParamSpec
from .data import RemovableDataset
from .errors import UnlearningError
from .samplers import SGHMC, SGLD
from .unlearner import MCMCUnlearner, _default_nll

__all__ = [
    "DATA_FILE",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "LoadedModel",
    "StoreError",
    "atomic_write_bytes",
    "bnn_model_spec",
    "build_from_spec",
    "commit_update",
    "gmm_data_spec",
    "gmm_model_spec",
    "image_data_spec",
    "load_model",
    "model_digest",
    "read_torch_checkpoint",
    "recover",
    "save_model",
    "store_lock",
    "tensors_digest",
    "unlearner_config",
    "utc_now",
    "with_config",
]

FORMAT_VERSION = 1
FORMAT_NAME = "mcmc-unlearner-model"
MANIFEST_NAME = "manifest.json"
DATA_FILE = "data.safetensors"
LOCK_NAME = ".lock"
SLOW_COMMIT_ENV = "MCMC_UNLEARNER_SLOW_COMMIT"
SLOW_PHASE_ENV = "MCMC_UNLEARNER_SLOW_PHASE"

_SAMPLERS: dict[str, type[torch.optim.Optimizer]] = {"SGLD": SGLD, "SGHMC": SGHMC}
_MODEL_KINDS = ("gmm", "bnn")
_DATA_KINDS = ("gmm-2d", "image", "tensors")


class StoreError(UnlearningError):
    """A model folder is missing pieces, corrupted, tampered with, or cannot hold the given objects."""


# ---------------------------------------------------------------------------------------------- utilities
def utc_now() -> str:
    """Current UTC time, ISO 8601 with microseconds and a ``Z`` suffix."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _slow() -> float:
    raw = os.environ.get(SLOW_COMMIT_ENV)
    if not raw:
        return 0.0
    try:
        return max(0.0, float(raw))
    except ValueError:
        return 0.0


def _pause_for(name: str) -> float:
    pause = _slow()
    only = os.environ.get(SLOW_PHASE_ENV)
    return pause if pause > 0 and (not only or only == name) else 0.0


def phase(name: str) -> None:
    """Test hook: announce a commit phase on stderr and pause (only with ``MCMC_UNLEARNER_SLOW_COMMIT``)."""
    if _slow() > 0:
        print(f"[commit] {name}", file=sys.stderr, flush=True)
        time.sleep(_pause_for(name))


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, hook: str | None = None) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename, fsync the folder.

    A crash at any point leaves either the old file or the new one, never a mix.

    Args:
        path: Destination.
        data: Bytes to write.
        hook: Phase name announced (test hook, see module docstring) after the temp file is durable.
    """
    p = Path(path)
    tmp = p.parent / f".{p.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if hook:
            phase(hook)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    ledger_mod.fsync_dir(p.parent)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def _manifest_checksum(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return _sha256(ledger_mod.canonical_json(body).encode())


def _json_ok(obj: Any, what: str) -> Any:
    try:
        return json.loads(ledger_mod.canonical_json(obj))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} must be JSON-serialisable (finite numbers, strings, lists, dicts): {exc}") from None


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


# ---------------------------------------------------------------------------------------------- specs
def gmm_model_spec(model: nn.Module) -> dict[str, Any]:
    """Model spec of a :class:`~mcmc_unlearner.models.gmm.GaussianMixture`."""
    return {"kind": "gmm", "k": int(model.k), "dim": int(model.dim), "prior_std": float(model.prior_std)}


def bnn_model_spec(
    arch: str, in_shape: Sequence[int], n_classes: int, prior_std: float = 0.1, **kwargs: Any
) -> dict[str, Any]:
    """Model spec for :func:`mcmc_unlearner.models.bnn.build_model` (``kwargs``: extra architecture options)."""
    spec: dict[str, Any] = {
        "kind": "bnn",
        "arch": arch,
        "in_shape": [int(s) for s in in_shape],
        "n_classes": int(n_classes),
        "prior_std": float(prior_std),
    }
    if kwargs:
        spec["kwargs"] = _json_ok(kwargs, "bnn model kwargs")
    return spec


def gmm_data_spec(n: int = 2000, seed: int = 23498353, fields: Sequence[str] = ("x", "y")) -> dict[str, Any]:
    """Data spec of :func:`mcmc_unlearner.datasets.make_gmm_2d` (``fields``: ``("x",)`` or ``("x", "y")``)."""
    return {"kind": "gmm-2d", "n": int(n), "seed": int(seed), "fields": list(fields)}


def image_data_spec(
    name: str, seed: int = 0, data_dir: str | os.PathLike | None = None, n: int | None = None
) -> dict[str, Any]:
    """Data spec of an image training split (:func:`mcmc_unlearner.image_data.load_dataset`).

    Args:
        name: Data set name.
        seed: Split seed (digits).
        data_dir: Root of the files (stored as an absolute path).
        n: Use only the first ``n`` training rows (``None``: all).
    """
    return {
        "kind": "image",
        "name": name,
        "seed": int(seed),
        "data_dir": None if data_dir is None else str(Path(data_dir).resolve()),
        "n": None if n is None else int(n),
        "fields": ["x", "y"],
    }


def _build_model(model_spec: Mapping[str, Any]) -> nn.Module:
    kind = model_spec.get("kind")
    opts = {k: v for k, v in model_spec.items() if k != "kind"}
    try:
        if kind == "gmm":
            from .models.gmm import GaussianMixture

            return GaussianMixture(**opts, generator=torch.Generator().manual_seed(0))
        if kind == "bnn":
            from .models.bnn import build_model

            kwargs = opts.pop("kwargs", None) or {}
            with torch.random.fork_rng(devices=[]):  # initial weights are overwritten; keep global RNG untouched
                return build_model(
                    opts["arch"], opts["in_shape"], opts["n_classes"], opts.get("prior_std", 0.1), **kwargs
                )
    except (TypeError, KeyError) as exc:
        raise StoreError(
            f"model spec {dict(model_spec)} is invalid ({exc}); see store.gmm_model_spec/bnn_model_spec"
        ) from None
    raise StoreError(f"unknown model spec kind {kind!r}; known kinds: {', '.join(_MODEL_KINDS)}")


def _read_tensors_file(path: Path, sha256: str | None = None) -> tuple[bytes, dict[str, torch.Tensor]]:
    if not path.exists():
        raise StoreError(f"{path} is missing: the model folder is incomplete; restore it from a backup")
    raw = path.read_bytes()
    if sha256 is not None and _sha256(raw) != sha256:
        raise StoreError(
            f"{path} does not match the SHA-256 in manifest.json (truncated or tampered); "
            "restore the folder from a backup"
        )
    try:
        return raw, st_load(raw)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise StoreError(f"{path} is not a readable safetensors file ({exc}); restore it from a backup") from None


def _build_data(data_spec: Mapping[str, Any], root: Path | None) -> tuple[torch.Tensor, ...]:
    kind = data_spec.get("kind")
    fields = list(data_spec.get("fields") or ["x", "y"])
    if kind == "gmm-2d":
        from .datasets import make_gmm_2d

        x, y = make_gmm_2d(n=int(data_spec.get("n", 2000)), seed=int(data_spec.get("seed", 23498353)))
        cols = {"x": torch.from_numpy(x), "y": torch.from_numpy(y)}
    elif kind == "image":
        from .image_data import load_dataset

        ds = load_dataset(data_spec["name"], data_dir=data_spec.get("data_dir"), seed=int(data_spec.get("seed", 0)))
        n = data_spec.get("n")
        sl = slice(None) if n is None else slice(0, int(n))
        cols = {"x": ds.x_train[sl], "y": ds.y_train[sl]}
    elif kind == "tensors":
        if root is None:
            raise StoreError("data spec kind 'tensors' needs the model folder (the data lives in data.safetensors)")
        _, tensors = _read_tensors_file(root / DATA_FILE)
        return tuple(tensors[str(i)] for i in range(len(tensors)))
    else:
        raise StoreError(f"unknown data spec kind {kind!r}; known kinds: {', '.join(_DATA_KINDS)}")
    bad = [f for f in fields if f not in cols]
    if bad:
        raise StoreError(f"data spec fields {bad} unknown for kind {kind!r}; use a subset of {sorted(cols)}")
    return tuple(cols[f] for f in fields)


def build_from_spec(
    model_spec: Mapping[str, Any], data_spec: Mapping[str, Any], *, root: str | os.PathLike | None = None
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build a fresh model and the full training tensors from JSON specs.

    Model specs: ``{"kind": "gmm", **GaussianMixture kwargs}`` or ``{"kind": "bnn", "arch", "in_shape",
    "n_classes", "prior_std", "kwargs"?}``. Data specs: ``{"kind": "gmm-2d", "n", "seed", "fields"?}``,
    ``{"kind": "image", "name", "seed", "data_dir"?, "n"?}`` (rows = 0-based rows of the training split) or
    ``{"kind": "tensors"}`` (data stored in ``<root>/data.safetensors``).

    Returns:
        ``(model, tensors)``; the model's parameters are placeholders (the global RNG is not touched).
    """
    return _build_model(model_spec), _build_data(data_spec, None if root is None else Path(root))


# ---------------------------------------------------------------------------------------------- state
def unlearner_config(un: MCMCUnlearner) -> dict[str, Any]:
    """The JSON configuration that rebuilds ``un`` (callables must be the defaults)."""
    return un.config()


def _sampler_config(sampler: torch.optim.Optimizer | None) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
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
    if gen is not None:
        tensors["sampler/generator"] = gen.get_state()
    cfg = {"name": name, "param_groups": sd["param_groups"], "state": plain, "generator": gen is not None}
    return _json_ok(cfg, "sampler configuration"), tensors


def _state_tensors(
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
    out.update(_sampler_config(sampler)[1])
    out["unlearner/generator"] = un.generator.get_state()
    out.update({f"unlearner/{k}": v for k, v in un.curvature_state()[0].items()})
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def _state_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    # one metadata key only: safetensors writes a multi-key metadata map in hash order (not reproducible)
    return st_save(tensors, metadata={"format": f"{FORMAT_NAME}/{FORMAT_VERSION}"})


def _check_saveable(model: nn.Module, sampler: torch.optim.Optimizer | None, un: MCMCUnlearner) -> None:
    if un.model is not model:
        raise StoreError("the unlearner drives a different model object than `model`; pass the same model")
    if sampler is not None and un.sampler is not None and un.sampler is not sampler:
        raise StoreError("the unlearner drives a different sampler than `sampler`; pass the same sampler")
    if un.nll is not _default_nll:
        raise StoreError("cannot save an unlearner with a custom nll callable; give the model an nll() method")
    if getattr(un.energy, "__func__", None) is not MCMCUnlearner._default_energy:
        raise StoreError("cannot save an unlearner with a custom energy callable; use the default energy")


def _data_fingerprint(tensors: Sequence[torch.Tensor]) -> str:
    return tensors_digest([(str(i), t) for i, t in enumerate(tensors)])


# ---------------------------------------------------------------------------------------------- loaded
@dataclass
class LoadedModel:
    """A saved model rebuilt from its folder.

    Attributes:
        path: The model folder.
        manifest: The committed manifest.
        model, sampler, data, unlearner: Live objects, ready to take the next request.
        model_spec, data_spec, extra: As saved.
        entries: Committed ledger entries (line 1 = save event).
        ledger_lines: Their raw bytes.
        pending: Uncommitted ledger lines after them (a torn request; :func:`recover` rolls them back).
        model_sha256: :func:`model_digest` of the state.
    """

    path: Path
    manifest: dict[str, Any]
    model: nn.Module
    sampler: torch.optim.Optimizer | None
    data: RemovableDataset
    unlearner: MCMCUnlearner
    model_spec: dict[str, Any]
    data_spec: dict[str, Any]
    extra: dict[str, Any]
    entries: list[dict[str, Any]] = field(default_factory=list)
    ledger_lines: list[bytes] = field(default_factory=list)
    pending: int = 0
    model_sha256: str = ""

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Applied deletion requests (forget entries), oldest first."""
        return [e for e in self.entries if e.get("event") == "forget"]

    def digest(self) -> str:
        """Current :func:`model_digest` of the live objects."""
        return model_digest(self.model, self.unlearner.bank, self.data.state_dict()["alive"])


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(
            f"model folder {path} not found; save a model there first (mcmc-unlearner demo --save-model {path})"
        )
    if not path.is_dir():
        raise StoreError(f"{path} is not a folder; --model takes the folder a model was saved into")
    mpath = path / MANIFEST_NAME
    if not mpath.exists():
        raise StoreError(
            f"{path} holds no saved model (manifest.json missing: never saved, or the save was interrupted); "
            "save the model again"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{mpath} is corrupted (not valid JSON: {exc}); restore the folder from a backup") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{mpath} is not an mcmc-unlearner manifest")
    if manifest.get("manifest_sha256") != _manifest_checksum(manifest):
        raise StoreError(f"{mpath} was modified (checksum mismatch); restore the folder from a backup")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(
            f"{path} uses store format {version!r}; this mcmc-unlearner reads format <= {FORMAT_VERSION}: upgrade it"
        )
    return manifest


def _committed_ledger(path: Path, manifest: Mapping[str, Any]) -> tuple[ledger_mod.LedgerRead, int]:
    read = ledger_mod.read_ledger(path / ledger_mod.LEDGER_NAME)
    count = int(manifest["ledger_entries"])
    if len(read.lines) < count:
        raise StoreError(
            f"{path / ledger_mod.LEDGER_NAME} has {len(read.lines)} complete lines but {count} are committed: "
            "the ledger was truncated or deleted; restore the folder from a backup"
        )
    if count and ledger_mod.line_sha256(read.lines[count - 1]) != manifest["ledger_head"]:
        raise StoreError(
            f"{path / ledger_mod.LEDGER_NAME}: committed line {count} does not match the manifest's ledger head: "
            "the ledger was modified; run `mcmc-unlearner verify` and restore the folder from a backup"
        )
    try:
        problems = ledger_mod.check_chain(read.lines[:count], read.entries(count))
    except ledger_mod.LedgerError as exc:
        raise StoreError(f"{path / ledger_mod.LEDGER_NAME}: {exc}; restore the folder from a backup") from None
    if problems:
        raise StoreError(
            f"{path / ledger_mod.LEDGER_NAME} was modified ({problems[0]}); run `mcmc-unlearner verify` and restore "
            "the folder from a backup"
        )
    return read, count


def load_model(path: str | os.PathLike, *, check_data: bool = True) -> LoadedModel:
    """Load a saved model and rebuild model, sampler, remaining data and unlearner.

    Verifies the manifest checksum, the SHA-256 of the state file (and of ``data.safetensors``), the ledger
    head, and (``check_data``) that the data spec reproduces the training data the model was saved with.
    Read-only: an uncommitted ledger tail is ignored (counted in ``pending``), not removed.

    Raises:
        FileNotFoundError: The folder does not exist.
        StoreError: Missing, truncated, tampered or unreadable pieces.
    """
    root = Path(path)
    manifest = _read_manifest(root)
    state_path = root / manifest["state_file"]
    _, tensors = _read_tensors_file(state_path, manifest["state_sha256"])
    read, count = _committed_ledger(root, manifest)
    entries = read.entries(count)  # parsed and chain-checked above
    pending = len(read.lines) - count + (1 if read.partial else 0)

    model_spec, data_spec = manifest["model_spec"], manifest["data_spec"]
    if data_spec.get("kind") == "tensors":
        data_raw, _ = _read_tensors_file(root / DATA_FILE)
        if _sha256(data_raw) != manifest.get("data_file_sha256"):
            raise StoreError(f"{root / DATA_FILE} does not match manifest.json (tampered); restore it from a backup")
    model, data_tensors = build_from_spec(model_spec, data_spec, root=root)
    if check_data and _data_fingerprint(data_tensors) != manifest["data_sha256"]:
        raise StoreError(
            f"the data spec {data_spec} no longer reproduces the training data this model was saved with "
            "(fingerprint mismatch); point it at the original data"
        )
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
    except RuntimeError as exc:
        raise StoreError(f"state file does not fit the model spec: {str(exc).splitlines()[0]}") from None

    dcfg = manifest["data_config"]
    data = RemovableDataset(*data_tensors, batch_size=int(dcfg["batch_size"]), seed=0)
    try:
        data.load_state_dict(
            {
                "alive": tensors["data/alive"],
                "order": tensors["data/order"],
                "pos": tensors["data/pos"][0],
                "generator": tensors["data/generator"],
            }
        )
    except (KeyError, ValueError) as exc:
        raise StoreError(f"state file has no valid data state ({exc}); restore the folder from a backup") from None

    sampler = _rebuild_sampler(model, manifest.get("sampler"), tensors)
    ustate = manifest.get("unlearner_state", {})
    un = _rebuild_unlearner(
        model, sampler if ustate.get("with_sampler", True) else None, manifest["unlearner"], tensors, ustate
    )
    if hasattr(model, "n"):
        model.n = len(data)

    loaded = LoadedModel(
        path=root,
        manifest=manifest,
        model=model,
        sampler=sampler,
        data=data,
        unlearner=un,
        model_spec=model_spec,
        data_spec=data_spec,
        extra=manifest.get("extra") or {},
        entries=entries,
        ledger_lines=read.lines[:count],
        pending=pending,
    )
    loaded.model_sha256 = loaded.digest()
    if loaded.model_sha256 != manifest["model_sha256"]:
        raise StoreError(f"{state_path}: model digest differs from manifest.json; restore the folder from a backup")
    return loaded


def _rebuild_sampler(
    model: nn.Module, cfg: Mapping[str, Any] | None, tensors: Mapping[str, torch.Tensor]
) -> torch.optim.Optimizer | None:
    if cfg is None:
        return None
    cls = _SAMPLERS.get(cfg["name"])
    if cls is None:
        raise StoreError(f"unknown sampler {cfg['name']!r} in manifest; known: {', '.join(_SAMPLERS)}")
    group = cfg["param_groups"][0]
    hyper = {k: group[k] for k in ("lr", "alpha") if k in group}
    gen = torch.Generator()
    if "sampler/generator" in tensors:
        gen.set_state(tensors["sampler/generator"])
    sampler = cls(list(model.parameters()), generator=gen, **hyper)
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith("sampler/state/"):
            _, _, idx, name = key.split("/", 3)
            state.setdefault(int(idx), {})[name] = val
    for idx, extra in (cfg.get("state") or {}).items():
        state.setdefault(int(idx), {}).update(extra)
    try:
        sampler.load_state_dict({"state": state, "param_groups": copy.deepcopy(cfg["param_groups"])})
    except (ValueError, KeyError) as exc:
        raise StoreError(f"sampler state does not fit the model: {exc}") from None
    return sampler


def _rebuild_unlearner(
    model: nn.Module,
    sampler: torch.optim.Optimizer | None,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    ustate: Mapping[str, Any],
) -> MCMCUnlearner:
    try:
        un = MCMCUnlearner(model, sampler, bank=tensors.get("bank"), **config)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"unlearner configuration is invalid: {exc}") from None
    un.generator.set_state(tensors["unlearner/generator"])
    prefix = "unlearner/"
    curv = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and k != "unlearner/generator"}
    un.load_curvature_state(curv, ustate)
    return un


def with_config(loaded: LoadedModel, overrides: Mapping[str, Any]) -> MCMCUnlearner:
    """An unlearner on ``loaded``'s objects with config ``overrides`` (same bank, generator and cache)."""
    if not overrides:
        return loaded.unlearner
    base = loaded.unlearner
    cfg = {**unlearner_config(base), **overrides}
    try:
        un = MCMCUnlearner(loaded.model, loaded.sampler, bank=base.bank, **cfg)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"configuration override {dict(overrides)} is invalid: {exc}") from None
    un.generator.set_state(base.generator.get_state())
    un.load_curvature_state(*base.curvature_state())
    return un


# ---------------------------------------------------------------------------------------------- save / commit
def save_model(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    sampler: torch.optim.Optimizer | None = None,
    data: RemovableDataset,
    unlearner: MCMCUnlearner,
    model_spec: Mapping[str, Any],
    data_spec: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    check_data: bool = True,
) -> Path:
    """Save a model (chain, sampler, bank, remaining data, unlearner config) into a new model folder.

    Args:
        path: Folder to create (or empty folder).
        model: The live model (its parameters are the chain state).
        sampler: Its SG-MCMC sampler (default: ``unlearner.sampler``); SGLD and SGHMC are supported.
        data: The :class:`RemovableDataset` of the training data (removals so far are kept).
        unlearner: The :class:`MCMCUnlearner` holding the sample bank and configuration.
        model_spec: JSON spec rebuilding the model (:func:`gmm_model_spec`, :func:`bnn_model_spec`).
        data_spec: JSON spec rebuilding the full training tensors (:func:`gmm_data_spec`,
            :func:`image_data_spec`, or ``{"kind": "tensors"}`` to store the data in the folder).
        extra: Free JSON stored in the manifest (e.g. experiment settings).
        overwrite: Replace a model already saved in ``path`` (its ledger is discarded).
        check_data: Rebuild the data from ``data_spec`` and check it equals ``data``'s tensors.

    Returns:
        The folder path.

    Raises:
        StoreError: The folder already holds a model, the specs do not reproduce the objects, or an object
            cannot be saved (custom callables or sampler class).
    """
    root = Path(path)
    sampler = sampler if sampler is not None else unlearner.sampler
    _check_saveable(model, sampler, unlearner)
    model_spec = _json_ok(dict(model_spec), "model_spec")
    data_spec = _json_ok(dict(data_spec), "data_spec")
    extra = _json_ok(dict(extra or {}), "extra")
    if model_spec.get("kind") not in _MODEL_KINDS:
        raise StoreError(f"unknown model spec kind {model_spec.get('kind')!r}; known kinds: {', '.join(_MODEL_KINDS)}")
    if data_spec.get("kind") not in _DATA_KINDS:
        raise StoreError(f"unknown data spec kind {data_spec.get('kind')!r}; known kinds: {', '.join(_DATA_KINDS)}")
    if data_spec["kind"] != "tensors" and "fields" not in data_spec:
        data_spec["fields"] = ["x", "y"][: len(data.tensors)]
    fresh = _build_model(model_spec)
    if ParamSpec.of(fresh) != ParamSpec.of(model):
        raise StoreError("model_spec builds a model whose parameters differ in names or shapes from `model`")
    fingerprint = _data_fingerprint(data.tensors)
    if check_data and data_spec["kind"] != "tensors":
        _, rebuilt = build_from_spec(model_spec, data_spec)
        if _data_fingerprint(rebuilt) != fingerprint:
            raise StoreError(
                f"data_spec {data_spec} does not reproduce the training tensors of `data` (dtype, shape or values "
                "differ); fix the spec, or use {'kind': 'tensors'} to store the data in the model folder"
            )
    sampler_cfg, _ = _sampler_config(sampler)

    if root.exists() and not root.is_dir():
        raise StoreError(f"{root} exists and is not a folder; choose another --save-model path")
    root.mkdir(parents=True, exist_ok=True)
    with store_lock(root):
        if (root / MANIFEST_NAME).exists():
            if not overwrite:
                raise StoreError(f"{root} already holds a saved model; choose another folder (or overwrite=True)")
            (root / MANIFEST_NAME).unlink()  # first: a crash from here on leaves "no saved model"
            ledger_mod.fsync_dir(root)
        for p in root.iterdir():
            if p.name in (ledger_mod.LEDGER_NAME, DATA_FILE) or _is_state_file(p.name) or ".tmp-" in p.name:
                p.unlink()
        data_file_sha = None
        if data_spec["kind"] == "tensors":
            blob = st_save({str(i): t.detach().cpu().contiguous().clone() for i, t in enumerate(data.tensors)})
            atomic_write_bytes(root / DATA_FILE, blob)
            data_file_sha = _sha256(blob)
        state_name = _state_name(0)
        blob = _state_bytes(_state_tensors(model, sampler, data, unlearner))
        atomic_write_bytes(root / state_name, blob)
        digest = model_digest(model, unlearner.bank, data.state_dict()["alive"])
        now = utc_now()
        from . import __version__

        entry = {
            "event": "save",
            "seq": 0,
            "time": now,
            "n_total": data.n_total,
            "n_remaining": len(data),
            "removed_before_save": data.removed_ids.tolist(),
            "bank_size": 0 if unlearner.bank is None else int(unlearner.bank.shape[0]),
            "before_sha256": None,
            "after_sha256": digest,
            "prev_sha256": ledger_mod.GENESIS,
            "software_version": __version__,
            "format_version": FORMAT_VERSION,
        }
        head, _ = ledger_mod.append_entry(root / ledger_mod.LEDGER_NAME, entry)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "software_version": __version__,
            "created": now,
            "updated": now,
            "sequence": 0,
            "state_file": state_name,
            "state_sha256": _sha256(blob),
            "model_sha256": digest,
            "model_spec": model_spec,
            "data_spec": data_spec,
            "data_sha256": fingerprint,
            "data_file_sha256": data_file_sha,
            "data_config": {"batch_size": data.batch_size, "n_total": data.n_total},
            "sampler": sampler_cfg,
            "unlearner": unlearner_config(unlearner),
            "unlearner_state": {**unlearner.curvature_state()[1], "with_sampler": unlearner.sampler is not None},
            "ledger_entries": 1,
            "ledger_head": head,
            "last_request_id": None,
            "extra": extra,
        }
        _write_manifest(root, manifest)
    return root


def _state_name(seq: int) -> str:
    return f"state-{seq:06d}.safetensors"


def _is_state_file(name: str) -> bool:
    return name.startswith("state-") and name.endswith(".safetensors")


def _write_manifest(root: Path, manifest: dict[str, Any], hook: str | None = None) -> None:
    manifest["manifest_sha256"] = _manifest_checksum(manifest)
    text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(root / MANIFEST_NAME, text.encode("utf-8"), hook=hook)


def commit_update(
    loaded: LoadedModel, entry: Mapping[str, Any], *, unlearner: MCMCUnlearner | None = None
) -> dict[str, Any]:
    """Durably commit the live state of ``loaded`` together with one ledger entry.

    Order: new state file (atomic) → ledger line (appended, fsynced) → manifest (atomic; the commit point) →
    delete the old state file. Call it under :func:`store_lock` after :func:`recover`.

    Args:
        loaded: The loaded model whose live objects were changed (e.g. by ``unlearner.forget``).
        entry: Ledger fields of the event (``event``, ``request_id``, ...); hashes, sequence number and
            versions are added here.
        unlearner: The unlearner that did the work if it is not ``loaded.unlearner`` (config overrides); its
            generator state and Hessian cache are saved, the stored configuration is kept.

    Returns:
        The ledger entry as written.
    """
    from . import __version__

    un = unlearner or loaded.unlearner
    root = loaded.path
    old = loaded.manifest
    seq = int(old["sequence"]) + 1
    state_name = _state_name(seq)
    blob = _state_bytes(_state_tensors(loaded.model, loaded.sampler, loaded.data, un))
    atomic_write_bytes(root / state_name, blob, hook="state-temp-written")
    phase("state-written")
    after = model_digest(loaded.model, un.bank, loaded.data.state_dict()["alive"])
    full = {
        **dict(entry),
        "seq": seq,
        "before_sha256": old["model_sha256"],
        "after_sha256": after,
        "prev_sha256": old["ledger_head"],
        "software_version": __version__,
        "format_version": FORMAT_VERSION,
    }
    full = _json_ok(full, "ledger entry")
    slow = _pause_for("ledger-half")
    head, line = ledger_mod.append_entry(
        root / ledger_mod.LEDGER_NAME,
        full,
        pause=slow,
        on_half=(lambda: print("[commit] ledger-half", file=sys.stderr, flush=True)) if slow else None,
    )
    phase("ledger-appended")
    manifest = {k: v for k, v in old.items() if k != "manifest_sha256"}
    manifest.update(
        {
            "updated": full.get("time", utc_now()),
            "software_version": __version__,
            "sequence": seq,
            "state_file": state_name,
            "state_sha256": _sha256(blob),
            "model_sha256": after,
            "sampler": _sampler_config(loaded.sampler)[0],
            "unlearner_state": {**old.get("unlearner_state", {}), **un.curvature_state()[1]},
            "ledger_entries": int(old["ledger_entries"]) + 1,
            "ledger_head": head,
            "last_request_id": full.get("request_id", old.get("last_request_id")),
        }
    )
    _write_manifest(root, manifest, hook="manifest-temp-written")
    phase("committed")
    with contextlib.suppress(OSError):
        if old["state_file"] != state_name:
            (root / old["state_file"]).unlink()
    loaded.manifest = manifest
    loaded.entries.append(full)
    loaded.ledger_lines.append(line)
    loaded.model_sha256 = after
    if un is not loaded.unlearner:
        loaded.unlearner.bank = un.bank
        loaded.unlearner.generator.set_state(un.generator.get_state())
        loaded.unlearner.load_curvature_state(*un.curvature_state())
    return full


@contextlib.contextmanager
def store_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock on a model folder (``.lock``, released by the OS even if the process is killed)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks
        yield
        return
    fd = os.open(Path(path) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"another mcmc-unlearner process is writing to {path}; wait for it to finish and retry"
            ) from None
        yield
    finally:
        os.close(fd)


def recover(path: str | os.PathLike) -> dict[str, Any]:
    """Roll back what an interrupted update left behind (call under :func:`store_lock`).

    Truncates uncommitted ledger lines (a request whose manifest was never written: it was not applied and
    will be re-applied when resubmitted), and deletes state files the manifest does not name and temp files.

    Returns:
        ``{"rolled_back": [request ids or "partial line"], "removed_files": [...]}``.

    Raises:
        StoreError: The committed part of the folder is damaged (nothing is changed then).
    """
    root = Path(path)
    manifest = _read_manifest(root)
    read, count = _committed_ledger(root, manifest)
    rolled: list[str] = []
    if len(read.lines) > count or read.partial:
        for line in read.lines[count:]:
            try:
                rolled.append(str(json.loads(line).get("request_id")))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                rolled.append("unreadable line")
        if read.partial:
            rolled.append("partial line")
        ledger_mod.truncate_ledger(root / ledger_mod.LEDGER_NAME, read.end_of(count))
    removed = []
    for p in sorted(root.iterdir()):
        if (_is_state_file(p.name) and p.name != manifest["state_file"]) or ".tmp-" in p.name:
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p.name)
    if removed:
        ledger_mod.fsync_dir(root)
    return {"rolled_back": rolled, "removed_files": removed}
