"""Saved models on disk: crash-safe checkpoints of chain, sampler, sample bank and remaining data.

**Format** (``FORMAT_VERSION`` 1). A model folder holds

* ``state-<k>.safetensors`` — every tensor: the model's ``state_dict`` (``model/<name>``), the sample bank
  (``bank``), the remaining-data mask and shuffling state (``data/alive``, ``data/order``, ``data/pos``,
  ``data/generator``), the sampler's tensors (``sampler/state/<i>/<key>``, e.g. SGHMC momentum, and
  ``sampler/generator``), the unlearner's generator (``unlearner/generator``) and cached curvature
  (``unlearner/...``);
* ``manifest.json`` — the commit point: format version, the current state file (always
  ``state-<sequence>.safetensors``) and its SHA-256, the model's digest (:func:`model_digest`), model spec,
  data spec and data fingerprint, sampler config, unlearner config, the ledger's committed length and head
  hash, the last applied request id, ``extra`` (free JSON), ``manifest_sha256`` over all of that and, with an
  integrity key, ``manifest_hmac`` (:mod:`mcmc_unlearner.service.integrity`);
* ``ledger.jsonl`` — the audit trail (:mod:`mcmc_unlearner.service.ledger`);
* ``data.safetensors`` — only for data spec kind ``"tensors"``.

No pickle anywhere: tensors go through safetensors and everything else through JSON (a legacy ``torch.save``
file can be read with :func:`read_torch_checkpoint`, which uses ``weights_only=True``). Every manifest field
is type-checked and every file name confined to the folder before use (:mod:`mcmc_unlearner.service.fsio`).

**Commit protocol.** An update writes the new state file (atomically), appends its ledger line (fsync), then
replaces the manifest — the single commit point — and finally deletes the old state file. A crash leaves the
old manifest naming the old, intact state, possibly with an orphan state file and an uncommitted ledger tail;
an error before the commit point undoes both at once; an error after it (the manifest renamed into place) leaves
the update applied and is reported as a warning; a failure during the rename whose side of the commit point
cannot be told (the manifest unreadable) rolls nothing back. :func:`recover` removes crash debris; it runs only
under the writer's lock and only after the folder's integrity has been checked.

**Snapshots.** Readers take no lock: they read one consistent snapshot
(:func:`mcmc_unlearner.service.snapshot.read_snapshot`); :func:`build_loaded` rebuilds the live objects from it.

**Replays are deterministic:** all generator states travel with the state, so the same model, request and
configuration give bit-identical state files on the same machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from ..curvature import ParamSpec
from ..data import RemovableDataset
from ..options import shown_value
from ..unlearner import MCMCUnlearner
from . import fsio, integrity, specs
from . import ledger as ledger_mod
from .fsio import BusyError, StoreError, phase, sha256_hex, utc_now
from .integrity import Key
from .snapshot import (
    MANIFEST_NAME,
    Snapshot,
    _no_manifest_message,
    check_folder,
    history_files,
    manifest_bytes,
    read_snapshot,
)
from .state import (
    DATA_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    check_saveable,
    data_fingerprint,
    is_state_file,
    model_digest,
    nonfinite_state,
    read_tensors,
    read_torch_checkpoint,
    rebuild_as_auto,
    rebuild_sampler,
    rebuild_unlearner,
    sampler_config,
    saved_config,
    state_bytes,
    state_layout,
    state_name,
    state_tensors,
    tensors_digest,
    unlearner_config,
)

__all__ = [
    "CURVATURE_SETTINGS",
    "DATA_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "BusyError",
    "LoadedModel",
    "Snapshot",
    "StoreError",
    "build_loaded",
    "check_folder",
    "commit_update",
    "curvature_settings_changed",
    "load_model",
    "model_digest",
    "read_snapshot",
    "read_tensors",
    "read_torch_checkpoint",
    "recover",
    "save_model",
    "store_lock",
    "tensors_digest",
    "unlearner_config",
    "with_config",
]

LEGACY_LOCK_NAME = ".lock"  # written by earlier versions; ignored (the lock is on the folder itself)
TMP_RE = re.compile(
    r"\.(manifest\.json|ledger\.jsonl|data\.safetensors|state-[0-9]{6,}\.safetensors)\.tmp-[0-9]+-[0-9a-f]+"
)

store_lock = fsio.folder_lock


# ---------------------------------------------------------------------------------------------- loaded models
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
        snapshot: The snapshot it was built from.
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
    snapshot: Snapshot | None = None

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Applied deletion requests (forget entries), oldest first."""
        return [e for e in self.entries if e.get("event") == "forget"]

    @property
    def head(self) -> str:
        """The ledger head hash (SHA-256 of the last committed line)."""
        return str(self.manifest["ledger_head"])

    def digest(self) -> str:
        """Current :func:`model_digest` of the live objects."""
        return model_digest(self.model, self.unlearner.bank, self.data.state_dict()["alive"])


def build_loaded(snap: Snapshot, *, check_data: bool = True) -> LoadedModel:
    """Rebuild model, sampler, remaining data and unlearner from an intact snapshot.

    Raises:
        StoreError: The snapshot has integrity problems, its pieces do not fit together, or its sampler or
            unlearner state holds NaN or infinite values.
    """
    snap.raise_problems()
    manifest, tensors, root = snap.manifest, snap.state, snap.root
    assert tensors is not None
    bad = nonfinite_state(tensors)
    if bad:  # verified OK and carried into every request before (stop 56's probe); nothing is changed here
        raise StoreError(
            f"{root / manifest['state_file']}: saved sampler/unlearner state is not finite (NaN or infinite values in "
            f"{', '.join(bad[:5])}); restore the folder from a backup"
        )
    model_spec, data_spec = manifest["model_spec"], manifest["data_spec"]
    model, data_tensors = specs.build_from_spec(model_spec, data_spec, stored=snap.stored_data)
    if check_data and data_fingerprint(data_tensors) != manifest["data_sha256"]:
        raise StoreError(
            f"the data spec {ascii(data_spec)[:200]} no longer reproduces the training data this model was saved "
            "with (fingerprint mismatch); point it at the original data"
        )
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
        dcfg = manifest["data_config"]
        data = RemovableDataset(*data_tensors, batch_size=int(dcfg["batch_size"]), seed=0)
        data.load_state_dict(
            {
                "alive": tensors["data/alive"],
                "order": tensors["data/order"],
                "pos": tensors["data/pos"][0],
                "generator": tensors["data/generator"],
            }
        )
        if "n_total" in dcfg and dcfg["n_total"] != data.n_total:  # a stale field verify called intact (stop 46)
            raise StoreError(
                f"manifest.json says the data hold {ascii(dcfg['n_total'])[:40]} rows, the data have "
                f"{data.n_total}; restore the folder from a backup"
            )
        sampler = rebuild_sampler(model, manifest.get("sampler"), tensors)
        ustate = manifest.get("unlearner_state", {})
        un = rebuild_unlearner(
            model, sampler if ustate.get("with_sampler", True) else None, manifest["unlearner"], tensors, ustate
        )
    except StoreError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if isinstance(exc, KeyError) and exc.args:  # the bare name read as "'data/alive'" (stop 46's probe)
            first = f"tensor {exc.args[0]} is missing"
        elif lines and lines[0].startswith("Error(s) in loading state_dict"):  # the keys are on the next line
            first = " ".join(lines[:2])
        else:
            first = lines[0] if lines else type(exc).__name__
        raise StoreError(
            f"{root / manifest['state_file']} and manifest.json do not fit together ({ascii(first)[:200]}); "
            "restore the folder from a backup"
        ) from None
    # every tensor of the state file is one the rebuilt model, sampler, data and unlearner hold, in its dtype: an
    # extra tensor (a sampler state for a parameter the model does not have, an unknown unlearner entry) was dropped
    # at the next save and a wrong dtype converted, and verify said the folder was intact (stop 46's probe, with
    # the unkeyed checksums recomputed)
    layout = state_layout(model, sampler, data, un)
    extra = sorted(set(tensors) - set(layout))
    wrong = sorted(k for k in set(tensors) & set(layout) if tensors[k].dtype != layout[k])
    if extra or wrong:
        said = []
        if extra:
            said.append(f"tensors the model, sampler, data and unlearner do not hold: {ascii(extra[:5])[:200]}")
        if wrong:
            said.append(
                "tensors in another dtype than they are used in: "
                + ", ".join(f"{k} ({tensors[k].dtype}, not {layout[k]})" for k in wrong[:5])
            )
        raise StoreError(
            f"{root / manifest['state_file']} holds {'; and '.join(said)}; it was not written by this library as the "
            "manifest describes it: restore the folder from a backup"
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
        entries=snap.entries,
        ledger_lines=snap.ledger.lines[: snap.count],
        pending=snap.pending,
        snapshot=snap,
    )
    loaded.model_sha256 = loaded.digest()
    if loaded.model_sha256 != manifest["model_sha256"]:
        raise StoreError(
            f"{root / manifest['state_file']}: model digest differs from manifest.json; "
            "restore the folder from a backup"
        )
    return loaded


def load_model(
    path: str | os.PathLike, *, check_data: bool = True, key: Key | bytes | str | None = None, wait: float = 10.0
) -> LoadedModel:
    """Load a saved model and rebuild model, sampler, remaining data and unlearner.

    Verifies the manifest (types, names, checksum, HMAC), the SHA-256 of the state file and of
    ``data.safetensors``, the ledger's committed lines, and (``check_data``) that the data spec reproduces the
    training data the model was saved with. Read-only: an uncommitted ledger tail is ignored (counted in
    ``pending``), not removed.

    Raises:
        FileNotFoundError: The folder does not exist.
        StoreError: Missing, truncated, tampered or unreadable pieces.
    """
    return build_loaded(read_snapshot(path, key=key, wait=wait), check_data=check_data)


#: Unlearner settings a cached curvature (dense Hessian, K-FAC factors, Lanczos preconditioner) is built with.
CURVATURE_SETTINGS = ("hessian", "curvature_draws", "curvature_data", "precondition_rank", "likelihood", "mc_samples")


def curvature_settings_changed(base: MCMCUnlearner, other: MCMCUnlearner) -> dict[str, tuple[Any, Any]]:
    """The :data:`CURVATURE_SETTINGS` in which ``other`` differs from ``base``: name -> (base's, other's);
    ``curvature_draws`` not where neither was given (each solver's default)."""
    a, b = unlearner_config(base), unlearner_config(other)
    changed = {k: (a.get(k), b.get(k)) for k in CURVATURE_SETTINGS if a.get(k) != b.get(k)}
    if not base._curvature_draws_given and not other._curvature_draws_given:
        # each solver's own default (a folder saved without them, a request overriding the solver): no override of
        # the draws, which the ledger named as one (another solver's cache is not read anyway)
        changed.pop("curvature_draws", None)
    return changed


def with_config(loaded: LoadedModel, overrides: Mapping[str, Any]) -> MCMCUnlearner:
    """An unlearner on ``loaded``'s objects with config ``overrides`` (same bank, generator and cache).

    An override of a setting the cached curvature was built with (:data:`CURVATURE_SETTINGS`) drops that cache, so
    that the request builds its curvature with the settings its ledger entry records (under ``refresh_every > 1``
    the saved one was reused, built with the saved settings)."""
    if not overrides:
        return loaded.unlearner
    base = loaded.unlearner
    cfg = {**saved_config(base), **overrides}
    if (
        "solver" in overrides
        and "bank_shift" not in overrides
        and cfg.get("bank_shift") == "affine"
        and str(overrides["solver"]) not in ("exact", "ggn", "auto")
    ):
        # the saved affine transport goes with its dense solver: another solver takes its own default (mean)
        cfg["bank_shift"] = "auto"
    try:
        with warnings.catch_warnings():  # an option the new solver ignores is said only when the override sets it
            kept = "|".join(re.escape(k) for k in cfg if k not in overrides)
            if kept:
                warnings.filterwarnings("ignore", rf"(?:{kept})=.* has no effect with ", UserWarning)
            un = MCMCUnlearner(loaded.model, loaded.sampler, bank=base.bank, **cfg)
    except (TypeError, ValueError) as exc:
        # key=value pairs, as the library's messages spell an option: the command line's as_flags turns every one
        # into its flag (a dict's quoted keys came out half as keywords, half as flags)
        shown = ", ".join(f"{k}={shown_value(v)}" for k, v in overrides.items())
        raise ValueError(f"configuration override {shown} is invalid: {exc}") from None
    if "solver" not in overrides and base._dense_probe is not None:  # auto's weighing pending: the request weighs it
        un = rebuild_as_auto(loaded.model, loaded.sampler, base.bank, cfg, dict(base._dense_probe), un)
    un.generator.set_state(base.generator.get_state())
    tensors, meta = base.curvature_state()
    # the override may name another solver on purpose: what carries over (the removal count, the damping, the
    # carried influence) is loaded as before the state named its solver; a cache the new solver cannot read is reset.
    # Without one the state's solver is the unlearner's, and it is kept: solver='auto''s pending weighing of its dense
    # build is loaded only with it (popped, the override's request ran the dense solver unweighed)
    if "solver" in overrides:
        meta.pop("solver", None)
    try:
        un.load_curvature_state(tensors, meta)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError):
        un.reset_curvature()  # another solver: the cache of the saved one does not apply
        un._removed_digests = set(base._removed_digests)  # the rows removed so far (a new bank started none)
    else:
        if curvature_settings_changed(base, un):
            un.drop_curvature()
    return un


# ---------------------------------------------------------------------------------------------- save / commit
#: Keys of the unlearner's curvature state written only while set (a curvature ``fit()`` built that no request has
#: used yet): a commit's state without them, merged into the last one's, kept them (the next request, loaded, took
#: the cached curvature as fit's and searched it as its own build).
_WHILE_SET = ("built_by_fit", "fit_data_nll")
_OWN_FILES = {MANIFEST_NAME, ledger_mod.LEDGER_NAME, DATA_FILE, LEGACY_LOCK_NAME}


def _own(name: str) -> bool:
    return name in _OWN_FILES or is_state_file(name) or TMP_RE.fullmatch(name) is not None


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
    key: Key | bytes | str | None = None,
) -> Path:
    """Save a model (chain, sampler, bank, remaining data, unlearner config) into a new model folder.

    Args:
        path: Folder to create (or an empty folder).
        model: The live model (its parameters are the chain state).
        sampler: Its SG-MCMC sampler (default: ``unlearner.sampler``); SGLD and SGHMC are supported.
        data: The :class:`RemovableDataset` of the training data (removals so far are kept).
        unlearner: The :class:`MCMCUnlearner` holding the sample bank and configuration.
        model_spec: JSON spec rebuilding the model (:func:`~mcmc_unlearner.service.specs.gmm_model_spec`, ...).
        data_spec: JSON spec rebuilding the full training tensors, or ``{"kind": "tensors"}`` to store the data
            in the folder.
        extra: Free JSON stored in the manifest (e.g. experiment settings).
        overwrite: Replace a model already saved in ``path``, or the ledger and state files left in it without a
            manifest (its ledger of applied requests is discarded). Without it such a folder is refused and
            nothing in it is changed: a ledger or state file is never treated as debris of this save.
        check_data: Rebuild the data from ``data_spec`` and check it equals ``data``'s tensors.
        key: Integrity key to sign the folder with (``None``: ``$MCMC_UNLEARNER_KEY`` if set, else unsigned).

    Returns:
        The folder path.

    Raises:
        StoreError: The folder holds other files, already a model, or the ledger or state files of a model
            whose manifest is missing (a damaged folder: restore it from a backup); the specs do not reproduce
            the objects, or an object cannot be saved (custom callables or sampler class, or NaN or infinite
            sampler or unlearner state: SGHMC momentum, carried influence, cached curvature; NaN or infinite values in
            remaining rows of ``data``, on which every request would be refused); a write failed
            (full disk, read-only file system, I/O error): the files this save wrote are removed again, and the
            message names the folder (an error after the manifest's rename, in the folder fsync, is a
            :class:`RuntimeWarning` instead: the model is saved).
    """
    root = Path(path)
    k = integrity.as_key(key)
    sampler = sampler if sampler is not None else unlearner.sampler
    if not isinstance(model_spec, Mapping) or model_spec.get("kind") not in specs.MODEL_KINDS:
        kind = model_spec.get("kind") if isinstance(model_spec, Mapping) else type(model_spec).__name__
        raise StoreError(
            f"unknown model spec kind {kind!r}; known kinds: {', '.join(specs.MODEL_KINDS)}. The saved-model service "
            "rebuilds the model from its spec, so it serves the library's own model kinds only; for a network of "
            "your own, use MCMCUnlearner directly and store its samples yourself (unlearner.samples())"
        )
    check_saveable(model, sampler, unlearner)
    model_spec = specs.json_ok(dict(model_spec), "model_spec")
    data_spec = specs.json_ok(dict(data_spec), "data_spec")
    extra = specs.json_ok(dict(extra or {}), "extra")
    if data_spec.get("kind") not in specs.DATA_KINDS:
        raise StoreError(
            f"unknown data spec kind {data_spec.get('kind')!r}; known kinds: {', '.join(specs.DATA_KINDS)}"
        )
    if data_spec["kind"] != "tensors" and "fields" not in data_spec:
        data_spec["fields"] = ["x", "y"][: len(data.tensors)]
    fresh = specs.build_model(model_spec)
    if ParamSpec.of(fresh) != ParamSpec.of(model):
        raise StoreError("model_spec builds a model whose parameters differ in names or shapes from `model`")
    fingerprint = data_fingerprint(data.tensors)
    if check_data and data_spec["kind"] != "tensors":
        _, rebuilt = specs.build_from_spec(model_spec, data_spec)
        if data_fingerprint(rebuilt) != fingerprint:
            raise StoreError(
                f"data_spec {data_spec} does not reproduce the training tensors of `data` (dtype, shape or values "
                "differ); fix the spec, or use {'kind': 'tensors'} to store the data in the model folder"
            )
    sampler_cfg, _ = sampler_config(sampler)
    state = state_tensors(model, sampler, data, unlearner)
    bad = nonfinite_state(state)
    if bad:  # a folder every later load refuses: refused before the folder is touched
        raise StoreError(
            f"cannot save: the sampler's or unlearner's state is not finite (NaN or infinite values in "
            f"{', '.join(bad[:5])}): the chain or the unlearner diverged; nothing was saved: save a state from before "
            "the divergence (or re-run the chain with a smaller step size)"
        )
    rows = data.nonfinite_ids()
    if rows.numel():  # every request on such a folder was refused, a request for those rows too (stop 59's probe)
        raise StoreError(
            f"cannot save: the remaining training data hold NaN or infinite values in the rows with id(s) "
            f"{rows[:5].tolist()}{' ...' if rows.numel() > 5 else ''}: every deletion request on the folder would be "
            "refused (an influence step needs finite rows, and these could not be forgotten either); nothing was "
            "saved: fix those rows, or train without them and save data with them removed (data.remove(ids))"
        )

    if os.path.lexists(root) and not root.is_dir():
        raise StoreError(f"{root} exists and is not a folder; choose another --save-model path")
    root.mkdir(parents=True, exist_ok=True)
    with fsio.folder_lock(root):
        names = fsio.list_names(root)
        foreign = [n for n in names if not _own(n)]
        if foreign:
            raise StoreError(
                f"{root} is not empty (it holds {ascii(foreign[:3])[:120]}); save into a new or empty folder"
            )
        for n in names:  # the files this save replaces or removes: a directory there failed with the raw OS error
            if n != LEGACY_LOCK_NAME:
                fsio.refuse_directory(root, n, "save_model replaces or removes every entry named as a model's file")
        if MANIFEST_NAME not in names and not overwrite:
            history = history_files(root)
            if history:
                # a saved model whose manifest is gone: its ledger is the record of applied deletion requests,
                # never debris of this save (that was: the ledger and state deleted without a word)
                raise StoreError(
                    f"{_no_manifest_message(root, history)} (save_model refused: choose a new folder, or "
                    "overwrite=True to discard that ledger deliberately)"
                )
        if MANIFEST_NAME in names and not overwrite:
            raise StoreError(f"{root} already holds a saved model; choose another folder (or overwrite=True)")
        discarded: list[str] = []  # the earlier model's files this save removed (overwrite=True)
        wrote: list[str] = []  # the names this save (may have) created: nothing else is at them once it writes
        renaming: list[bool] = []  # set immediately before the manifest's rename (the save's commit point)
        renamed: list[bool] = []  # set once that rename has returned
        try:
            if MANIFEST_NAME in names:
                fsio.unlink_name(root, MANIFEST_NAME)  # first: a crash from here on leaves "no saved model"
                discarded.append(MANIFEST_NAME)
                fsio.fsync_dir(root)
            for n in names:
                if n != MANIFEST_NAME and n != LEGACY_LOCK_NAME and fsio.unlink_name(root, n):
                    discarded.append(n)
            data_file_sha = None
            if data_spec["kind"] == "tensors":
                blob = st_save({str(i): t.detach().cpu().contiguous().clone() for i, t in enumerate(data.tensors)})
                wrote.append(DATA_FILE)
                fsio.atomic_write(root, DATA_FILE, blob)
                data_file_sha = sha256_hex(blob)
            new_state = state_name(0)
            blob = state_bytes(state)
            wrote.append(new_state)
            fsio.atomic_write(root, new_state, blob)
            digest = model_digest(model, unlearner.bank, data.state_dict()["alive"])
            now = utc_now()
            from .. import __version__

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
            wrote.append(ledger_mod.LEDGER_NAME)
            head, _ = ledger_mod.append_entry(root / ledger_mod.LEDGER_NAME, entry)
            manifest = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "software_version": __version__,
                "created": now,
                "updated": now,
                "sequence": 0,
                "state_file": new_state,
                "state_sha256": sha256_hex(blob),
                "model_sha256": digest,
                "model_spec": model_spec,
                "data_spec": data_spec,
                "data_sha256": fingerprint,
                "data_file_sha256": data_file_sha,
                "data_config": {"batch_size": data.batch_size, "n_total": data.n_total},
                "sampler": sampler_cfg,
                "unlearner": saved_config(unlearner),
                "unlearner_state": {**unlearner.curvature_state()[1], "with_sampler": unlearner.sampler is not None},
                "ledger_entries": 1,
                "ledger_head": head,
                "last_request_id": None,
                "extra": extra,
            }
            fsio.atomic_write(
                root,
                MANIFEST_NAME,
                manifest_bytes(manifest, k),
                on_renaming=lambda: renaming.append(True),
                on_replaced=lambda: renamed.append(True),
            )
        except Exception as exc:
            _save_failed(root, exc, renaming=bool(renaming), renamed=bool(renamed), wrote=wrote, discarded=discarded)
    return root


def _save_failed(
    root: Path, exc: Exception, *, renaming: bool, renamed: bool, wrote: list[str], discarded: list[str]
) -> None:
    """:func:`save_model`'s answer to an error while it wrote (``exc``, raised inside ``except``).

    After the manifest's rename (its folder fsync failed) the model IS saved: a :class:`RuntimeWarning` says so
    and the save returns. Before it, the files this save wrote (``wrote``) are removed again, so that the folder is
    not left holding a state file or ledger without a manifest (which every later save and request refuses as a
    damaged model), and an OS error (full disk, read-only file system, I/O error, also a failed folder fsync) is
    said naming the folder, the outcome and the fix; it was the bare OS error (stop 58's review).
    """
    failed = exc if isinstance(exc, OSError) else exc.__cause__ if isinstance(exc, StoreError) else None
    if renamed:
        if not isinstance(failed, OSError):
            raise exc
        warnings.warn(
            f"the model IS saved in {root}, but a write step after its manifest was renamed into place failed "
            f"({_reason(failed)}): the save may not be on disk yet if the machine loses power now; run "
            f"`mcmc-unlearner verify --model {root}`",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    if renaming and os.path.lexists(root / MANIFEST_NAME):  # the rename did not return, yet a manifest is there
        raise StoreError(
            f"{_reason(failed or exc)} while {root}/manifest.json was being renamed into place, and one is there now: "
            f"whether the model is saved is UNKNOWN; nothing was removed: run `mcmc-unlearner verify --model {root}`, "
            "and save again with overwrite=True if it fails"
        ) from None
    with contextlib.suppress(OSError, StoreError):
        removed = False
        for n in wrote:
            removed = fsio.unlink_name(root, n) or removed
        if removed:
            fsio.fsync_dir(root)
    if not isinstance(failed, OSError):
        raise exc
    earlier = [n for n in discarded if n in (MANIFEST_NAME, ledger_mod.LEDGER_NAME) or is_state_file(n)]
    before = (
        f"; the files of the model saved there before ({', '.join(earlier[:4])}) were removed first" if earlier else ""
    )
    raise StoreError(
        f"could not save the model into {root} ({_reason(failed)}); nothing was saved{before}: check free space and "
        "write permission, then save again"
    ) from None


def _writer_key(loaded: LoadedModel) -> Key | None:
    snap = loaded.snapshot
    if snap is None:
        return integrity.resolve_key()
    if snap.signature == "unchecked":
        raise StoreError(
            f"{loaded.path} is signed: set {integrity.KEY_ENV} or pass key= to write to it (nothing was changed)"
        )
    return snap.key


def _adopt(base: MCMCUnlearner, done: MCMCUnlearner) -> None:
    """The saved configuration's unlearner takes over what a per-request override's unlearner ``done`` did: its
    bank, generator and request count, and its curvature state where ``base`` uses the same solver (another
    solver's cache is not one ``base`` can load, nor is a cache built with other :data:`CURVATURE_SETTINGS`: the next
    request builds its own). The state file is written from
    ``base``, as the folder is loaded: an override's curvature cache written instead (``--solver kfac`` on a folder
    saved with ``exact``) was refused as foreign tensors by every later ``status``, ``verify`` and ``forget``, and
    the state before it had been deleted (stop 47's probe)."""
    tensors, meta = done.curvature_state()
    base._set_bank(done.bank, fresh=False)
    if base.solver is done.solver:
        if base._dense_probe is not None and not done._dense_cost:
            # the override ran the folder's dense solver unweighed (its configuration names that solver): the folder's
            # own weighing stays pending for its next request (loading done's state had dropped it)
            meta = {**meta, "dense_weigh_pending": dict(base._dense_probe)}
        base.load_curvature_state(tensors, meta)
        base._state_loaded = False
        if curvature_settings_changed(base, done):  # built with the override's settings: not the saved ones'
            base.drop_curvature()
    else:
        base.reset_curvature()
        base._rows_at_samples, base._cumulative_warned = done._rows_at_samples, done._cumulative_warned
        base._g_round = done._g_round
        base._removed_digests = set(done._removed_digests)  # the rows removed so far, as a loaded state carries them
    base.generator.set_state(done.generator.get_state())


def commit_update(
    loaded: LoadedModel, entry: Mapping[str, Any], *, unlearner: MCMCUnlearner | None = None
) -> dict[str, Any]:
    """Durably commit the live state of ``loaded`` together with one ledger entry.

    Order: new state file (atomic) → ledger line (appended, fsynced) → manifest (atomic; the commit point) →
    delete the old state file. Call it under :func:`store_lock` after :func:`recover`. An error before the
    commit point removes the new state file and the appended line again, so the folder is as it was. An error
    after it (once ``os.replace`` of the manifest has returned, e.g. in the folder fsync) leaves the update
    committed: it is returned as applied, with a :class:`RuntimeWarning` naming the error, and the old state file
    is left for the next :func:`recover`. When the rename's outcome is unknown (it was attempted and did not return,
    and the manifest cannot be read back), nothing is rolled back and the error says the outcome is unknown; an
    error before the rename was attempted is rolled back whether or not the manifest can be read.

    Args:
        loaded: The loaded model whose live objects were changed (e.g. by ``unlearner.forget``).
        entry: Ledger fields of the event (``event``, ``request_id``, ...); hashes, sequence number and
            versions are added here.
        unlearner: The unlearner that did the work if it is not ``loaded.unlearner`` (config overrides):
            ``loaded.unlearner`` takes over its bank, generator and request count, and its curvature cache where the
            solver is the same (:func:`_adopt`); the stored configuration is kept.

    Returns:
        The ledger entry as written.

    Raises:
        StoreError: The new sampler/unlearner state holds NaN or infinite values (nothing written); a write failed
            before the commit point (nothing changed), or while the manifest was replaced
            with an outcome that cannot be read back (nothing rolled back; the message says so).
        fsio.CommittedInterrupt: Ctrl-C after the commit point (the update is applied).
    """
    from .. import __version__

    key = _writer_key(loaded)
    if unlearner is not None and unlearner is not loaded.unlearner:
        _adopt(loaded.unlearner, unlearner)
    un = loaded.unlearner
    root = loaded.path
    old = loaded.manifest
    seq = int(old["sequence"]) + 1
    new_state = state_name(seq)
    tensors = state_tensors(loaded.model, loaded.sampler, loaded.data, un)
    bad = nonfinite_state(tensors)
    if bad:  # every later load would refuse the folder (build_loaded): refused before anything is written
        raise StoreError(
            f"cannot commit the update: the sampler's or unlearner's new state is not finite (NaN or infinite values "
            f"in {', '.join(bad[:5])}): the request's computation diverged; nothing was changed: resend it with a "
            "larger damping or fewer rows per request, or restore the folder from a backup if it recurs"
        )
    blob = state_bytes(tensors)
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
    full = specs.json_ok(full, "ledger entry")
    lpath = root / ledger_mod.LEDGER_NAME
    size_before = os.lstat(lpath).st_size
    manifest = {k: v for k, v in old.items() if k not in ("manifest_sha256", "manifest_hmac", "integrity")}
    wrote_state = False
    mbytes: bytes | None = None
    renaming: list[bool] = []  # set immediately before os.replace of the manifest (the commit point)
    renamed: list[bool] = []  # set once that os.replace has returned
    late_error: BaseException | None = None  # an error after the commit point: the update IS applied
    try:
        fsio.atomic_write(root, new_state, blob, hook="state-temp-written")
        wrote_state = True
        phase("state-written")
        slow = fsio.pause_for("ledger-half")
        head, line = ledger_mod.append_entry(
            lpath,
            full,
            pause=slow,
            on_half=(lambda: print("[commit] ledger-half", file=sys.stderr, flush=True)) if slow else None,
        )
        phase("ledger-appended")
        manifest.update(
            {
                "updated": full.get("time", utc_now()),
                "software_version": __version__,
                "sequence": seq,
                "state_file": new_state,
                "state_sha256": sha256_hex(blob),
                "model_sha256": after,
                "sampler": sampler_config(loaded.sampler)[0],
                "unlearner_state": {
                    **{k: v for k, v in old.get("unlearner_state", {}).items() if k not in _WHILE_SET},
                    **un.curvature_state()[1],
                },
                # solver='auto' switched the folder's own unlearner (its dense build weighed costlier: K-FAC or CG):
                # the configuration it runs with from now on (kept as saved, a restart took the dense solver again)
                **(
                    {"unlearner": saved_config(un)} if un.solver.value != old.get("unlearner", {}).get("solver") else {}
                ),
                "ledger_entries": int(old["ledger_entries"]) + 1,
                "ledger_head": head,
                "last_request_id": full.get("request_id", old.get("last_request_id")),
            }
        )
        mbytes = manifest_bytes(manifest, key)
        fsio.atomic_write(
            root,
            MANIFEST_NAME,
            mbytes,
            hook="manifest-temp-written",
            on_renaming=lambda: renaming.append(True),
            on_replaced=lambda: renamed.append(True),
        )
    except BaseException as exc:
        on_disk, unreadable = (None, "") if mbytes is None else _manifest_on_disk(root)
        if mbytes is not None and (renamed or on_disk == mbytes):
            # the manifest is in place (an error or Ctrl-C after its rename, e.g. in the folder fsync): the update
            # IS committed; rolling it back now would delete the state file and the ledger line the committed
            # manifest names (stop 56's probe: it did, when the manifest could not be read back)
            if isinstance(exc, KeyboardInterrupt):
                raise _committed(full) from None
            if not isinstance(exc, Exception):
                raise
            late_error = exc  # said as a warning below; the request is reported as applied (it was "error", exit 2)
        elif renaming and on_disk is None:
            # the rename was attempted and did not return, and the manifest cannot be read back to tell whether it
            # happened: rolling back could delete a committed update, so nothing is touched; the next request's
            # recover() settles it. (An error before the rename, e.g. EMFILE opening the manifest's temp file, is
            # certainly not committed and is rolled back below: it was called UNKNOWN in stop 56's review.)
            raise _unknown(full, root, exc, unreadable) from None
        if late_error is None:
            with contextlib.suppress(OSError, StoreError):
                # also a line cut halfway by an interrupt during the append (``appended`` is still False then)
                if os.lstat(lpath).st_size > size_before:
                    ledger_mod.truncate_ledger(lpath, size_before)
                # also a state file renamed into place whose folder fsync was interrupted (``wrote_state`` still
                # False: it was left beside the manifest's, and verify said nothing; stop 47's probe)
                if wrote_state or os.path.lexists(root / new_state):
                    fsio.unlink_name(root, new_state)
                    fsio.fsync_dir(root)
            failed = exc if isinstance(exc, OSError) else exc.__cause__ if isinstance(exc, StoreError) else None
            if isinstance(failed, OSError):  # also the ledger's open, said as "cannot open file ..." without the fix
                raise StoreError(
                    f"could not write the update into {root} ({failed.strerror or failed}); nothing was changed: "
                    "check free space and write permission"
                ) from None
            raise
    interrupted = False
    if late_error is not None:
        # the old state file is kept (the commit may not be durable yet): the next request's recover() removes it
        warnings.warn(_committed_with_error(full, late_error), RuntimeWarning, stacklevel=2)
    else:
        try:
            phase("committed")
            with contextlib.suppress(OSError, StoreError):
                if old["state_file"] != new_state:
                    fsio.unlink_name(root, old["state_file"])  # left there, the next update's recovery removes it
        except KeyboardInterrupt:
            interrupted = True
    loaded.manifest = manifest
    loaded.entries.append(full)
    loaded.ledger_lines.append(line)
    loaded.model_sha256 = after
    if interrupted:
        raise _committed(full)
    return full


def _committed(entry: dict[str, Any]) -> fsio.CommittedInterrupt:
    what = _what(entry)
    return fsio.CommittedInterrupt(
        f"interrupted after the commit: {what} IS applied and recorded in the ledger (nothing half-written; "
        "`mcmc-unlearner status` shows it)"
    )


def _what(entry: Mapping[str, Any]) -> str:
    return f"request {entry.get('request_id')!r}" if entry.get("request_id") else "the update"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _committed_with_error(entry: Mapping[str, Any], exc: BaseException) -> str:
    """The warning for an error after the commit point: the update is applied, the later step failed."""
    return (
        f"{_what(entry)} IS applied and recorded in the ledger, but a write step after its commit point failed "
        f"({_reason(exc)}): the commit may not be on disk yet if the machine loses power now; run "
        "`mcmc-unlearner verify` (the previous state file is left in the folder; the next request removes it)"
    )


def _unknown(entry: Mapping[str, Any], root: Path, exc: BaseException, unreadable: str) -> BaseException:
    """The error for a failure while the manifest was replaced whose outcome cannot be read back: nothing is
    rolled back (a KeyboardInterrupt stays one, so that the CLI's exit code says "interrupted")."""
    msg = (
        f"{'interrupted' if isinstance(exc, KeyboardInterrupt) else _reason(exc)} while manifest.json was being "
        f"replaced, and it cannot be read back ({unreadable}): whether {_what(entry)} is applied is UNKNOWN; "
        f"nothing was rolled back. Run `mcmc-unlearner status` (or `verify`) on {str(root)!a} to see whether it "
        "is; resending the same request applies it at most once and removes what this write left behind"
    )
    return KeyboardInterrupt(msg) if isinstance(exc, KeyboardInterrupt) else StoreError(msg)


def _manifest_on_disk(root: Path) -> tuple[bytes | None, str]:
    """The manifest's bytes as on disk now, or ``None`` and why it could not be read."""
    try:
        return fsio.read_regular(root, MANIFEST_NAME, what="manifest"), ""
    except (OSError, StoreError) as exc:
        return None, _reason(exc)


def has_debris(snapshot: Snapshot) -> bool:
    """Whether :func:`recover` would change anything in the snapshot's folder (it writes only then)."""
    read, root = snapshot.ledger, snapshot.root
    if len(read.lines) > snapshot.count or read.partial:
        return True
    state = snapshot.manifest["state_file"]
    return any((is_state_file(n) and n != state) or TMP_RE.fullmatch(n) for n in fsio.list_names(root))


def recover(
    path: str | os.PathLike, snapshot: Snapshot | None = None, *, key: Key | bytes | str | None = None
) -> dict[str, Any]:
    """Roll back what an interrupted update left behind (call under :func:`store_lock`).

    Runs only on an intact folder: the snapshot (read now when not given) must pass every integrity check, so a
    damaged or tampered folder is refused before anything changes. Then it truncates uncommitted ledger lines
    (a request whose manifest was never written: it was not applied and will be re-applied when resubmitted)
    and deletes orphan state files and temp files. Only entries of the folder with those exact name patterns
    are removed (a link is removed, never followed).

    Returns:
        ``{"rolled_back": [request ids or "partial line"], "removed_files": [...]}``.

    Raises:
        StoreError: The folder is damaged (nothing is changed then), or a write of the clean-up failed (full disk,
            read-only file system, I/O error): the message names the folder; the committed model is unchanged.
    """
    snap = snapshot if snapshot is not None else read_snapshot(path, key=key)
    snap.raise_problems()
    try:
        return _recover(snap)
    except (OSError, StoreError) as exc:
        failed = exc if isinstance(exc, OSError) else exc.__cause__
        if not isinstance(failed, OSError):
            raise
        # was the bare OS error ("error: No space left on device", naming no folder; stop 58's probe)
        raise StoreError(
            f"could not clean up what an interrupted earlier request left in {snap.root} ({_reason(failed)}): the "
            "saved model is unchanged (its manifest, state file and committed ledger lines are as they were; nothing "
            "was applied now); check free space and write permission, then resend the request (it is applied at most "
            "once)"
        ) from None


def _recover(snap: Snapshot) -> dict[str, Any]:
    """:func:`recover`'s clean-up of an intact snapshot's folder (OS errors propagate)."""
    root = snap.root
    read, count = snap.ledger, snap.count
    rolled: list[str] = []
    if len(read.lines) > count or read.partial:
        for line in read.lines[count:]:
            try:
                rolled.append(str(ledger_mod.strict_loads(line).get("request_id")))
            except (ValueError, UnicodeDecodeError, AttributeError):
                rolled.append("unreadable line")
        if read.partial:
            rolled.append("partial line")
        ledger_mod.truncate_ledger(root / ledger_mod.LEDGER_NAME, read.end_of(count))
    removed = []
    for name in fsio.list_names(root):
        if (is_state_file(name) and name != snap.manifest["state_file"]) or TMP_RE.fullmatch(name):
            with contextlib.suppress(OSError, StoreError):
                if fsio.unlink_name(root, name):
                    removed.append(name)
    if removed:
        fsio.fsync_dir(root)
    return {"rolled_back": rolled, "removed_files": removed}
