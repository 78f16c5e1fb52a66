"""Saved models on disk (compatibility module): see :mod:`mcmc_unlearner.service.checkpoint`.

The implementation lives in :mod:`mcmc_unlearner.service` (``fsio``, ``specs``, ``integrity``, ``checkpoint``);
this module re-exports the names code written against the single-module layout uses.
"""

from __future__ import annotations

from .service.checkpoint import (
    DATA_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    LoadedModel,
    Snapshot,
    build_loaded,
    check_folder,
    commit_update,
    load_model,
    model_digest,
    read_snapshot,
    read_torch_checkpoint,
    recover,
    save_model,
    store_lock,
    tensors_digest,
    unlearner_config,
    with_config,
)
from .service.fsio import (
    SLOW_COMMIT_ENV,
    SLOW_PHASE_ENV,
    BusyError,
    StoreError,
    atomic_write_bytes,
    phase,
    sha256_hex,
    utc_now,
)
from .service.integrity import KEY_ENV, Key, resolve_key
from .service.snapshot import DamagedFolderError
from .service.snapshot import write_manifest as _write_manifest
from .service.specs import (
    bnn_model_spec,
    build_from_spec,
    gmm_data_spec,
    gmm_model_spec,
    image_data_spec,
)
from .service.state import data_fingerprint as _data_fingerprint
from .service.state import sampler_config as _sampler_config
from .service.state import state_bytes as _state_bytes
from .service.state import state_name as _state_name
from .service.state import state_tensors as _state_tensors

_sha256 = sha256_hex

__all__ = [
    "DATA_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KEY_ENV",
    "MANIFEST_NAME",
    "SLOW_COMMIT_ENV",
    "SLOW_PHASE_ENV",
    "BusyError",
    "DamagedFolderError",
    "Key",
    "LoadedModel",
    "Snapshot",
    "StoreError",
    "_data_fingerprint",
    "_sampler_config",
    "_sha256",
    "_state_bytes",
    "_state_name",
    "_state_tensors",
    "_write_manifest",
    "atomic_write_bytes",
    "bnn_model_spec",
    "build_from_spec",
    "build_loaded",
    "check_folder",
    "commit_update",
    "gmm_data_spec",
    "gmm_model_spec",
    "image_data_spec",
    "load_model",
    "model_digest",
    "phase",
    "read_snapshot",
    "read_torch_checkpoint",
    "recover",
    "resolve_key",
    "save_model",
    "store_lock",
    "tensors_digest",
    "unlearner_config",
    "utc_now",
    "with_config",
]
