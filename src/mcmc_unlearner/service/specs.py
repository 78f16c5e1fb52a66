"""Model and data registry of the deletion service: the only place that knows concrete models and data sets.

A saved model is rebuilt from two JSON specs:

* **model specs** — ``{"kind": "gmm", **GaussianMixture kwargs}`` (:func:`gmm_model_spec`) or
  ``{"kind": "bnn", "arch", "in_shape", "n_classes", "prior_std", "kwargs"?}`` (:func:`bnn_model_spec`);
* **data specs** — ``{"kind": "gmm-2d", "n", "seed", "fields"?}`` (:func:`gmm_data_spec`),
  ``{"kind": "image", "name", "seed", "data_dir"?, "n"?}`` (:func:`image_data_spec`; rows are 0-based rows of
  the training split) or ``{"kind": "tensors"}`` (the data is stored in the folder's ``data.safetensors``).

Adding a model or data kind means adding a branch here and nothing elsewhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fsio import StoreError
from .ledger import canonical_json

__all__ = [
    "DATA_KINDS",
    "MODEL_KINDS",
    "bnn_model_spec",
    "build_data",
    "build_from_spec",
    "build_model",
    "gmm_data_spec",
    "gmm_model_spec",
    "image_data_spec",
    "json_ok",
]

MODEL_KINDS = ("gmm", "bnn")
DATA_KINDS = ("gmm-2d", "image", "tensors")


def json_ok(obj: Any, what: str) -> Any:
    """``obj`` round-tripped through canonical JSON (refuses NaN/inf and non-JSON types)."""
    try:
        return json.loads(canonical_json(obj))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} must be JSON-serialisable (finite numbers, strings, lists, dicts): {exc}") from None


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
        spec["kwargs"] = json_ok(kwargs, "bnn model kwargs")
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


def build_model(model_spec: Mapping[str, Any]) -> nn.Module:
    """A fresh model from its spec; parameters are placeholders and the global RNG is not touched."""
    kind = model_spec.get("kind")
    opts = {k: v for k, v in model_spec.items() if k != "kind"}
    try:
        if kind == "gmm":
            from ..models.gmm import GaussianMixture

            return GaussianMixture(**opts, generator=torch.Generator().manual_seed(0))
        if kind == "bnn":
            from ..models.bnn import build_model as build_bnn

            kwargs = opts.pop("kwargs", None) or {}
            with torch.random.fork_rng(devices=[]):  # initial weights are overwritten; keep global RNG untouched
                return build_bnn(
                    opts["arch"], opts["in_shape"], opts["n_classes"], opts.get("prior_std", 0.1), **kwargs
                )
    except (TypeError, KeyError, ValueError, RuntimeError, MemoryError) as exc:
        raise StoreError(
            f"model spec {ascii(dict(model_spec))[:200]} is invalid ({ascii(str(exc))[:200]}); "
            "see gmm_model_spec/bnn_model_spec"
        ) from None
    raise StoreError(f"unknown model spec kind {ascii(kind)[:40]}; known kinds: {', '.join(MODEL_KINDS)}")


def build_data(
    data_spec: Mapping[str, Any], stored: Mapping[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, ...]:
    """The full training tensors of a data spec.

    Args:
        data_spec: The spec.
        stored: For kind ``"tensors"``: the tensors of the folder's ``data.safetensors`` (``"0"``, ``"1"``, ...).
    """
    kind = data_spec.get("kind")
    fields = data_spec.get("fields") or ["x", "y"]
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise StoreError(f"data spec fields {ascii(fields)[:80]} must be a list of names such as ['x', 'y']")
    try:
        if kind == "gmm-2d":
            from ..datasets import make_gmm_2d

            x, y = make_gmm_2d(n=int(data_spec.get("n", 2000)), seed=int(data_spec.get("seed", 23498353)))
            cols = {"x": torch.from_numpy(x), "y": torch.from_numpy(y)}
        elif kind == "image":
            from ..image_data import load_dataset

            ds = load_dataset(data_spec["name"], data_dir=data_spec.get("data_dir"), seed=int(data_spec.get("seed", 0)))
            n = data_spec.get("n")
            sl = slice(None) if n is None else slice(0, int(n))
            cols = {"x": ds.x_train[sl], "y": ds.y_train[sl]}
        elif kind == "tensors":
            if stored is None:
                raise StoreError("data spec kind 'tensors' needs the model folder (the data lives in data.safetensors)")
            keys = [str(i) for i in range(len(stored))]
            if sorted(stored) != sorted(keys):
                raise StoreError("data.safetensors must hold tensors named 0, 1, ...; restore it from a backup")
            return tuple(stored[k] for k in keys)
        else:
            raise StoreError(f"unknown data spec kind {ascii(kind)[:40]}; known kinds: {', '.join(DATA_KINDS)}")
    except (TypeError, KeyError, ValueError, OverflowError, MemoryError) as exc:
        raise StoreError(f"data spec {ascii(dict(data_spec))[:200]} is invalid ({ascii(str(exc))[:200]})") from None
    bad = [f for f in fields if f not in cols]
    if bad:
        raise StoreError(f"data spec fields {bad} unknown for kind {kind!r}; use a subset of {sorted(cols)}")
    return tuple(cols[f] for f in fields)


def build_from_spec(
    model_spec: Mapping[str, Any],
    data_spec: Mapping[str, Any],
    *,
    root: str | os.PathLike | None = None,
    stored: Mapping[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build a fresh model and the full training tensors from JSON specs (see the module docstring).

    Args:
        model_spec: Model spec.
        data_spec: Data spec.
        root: Model folder (kind ``"tensors"`` reads its ``data.safetensors`` when ``stored`` is not given).
        stored: The tensors of ``data.safetensors`` already read.

    Returns:
        ``(model, tensors)``; the model's parameters are placeholders (the global RNG is not touched).
    """
    if stored is None and root is not None and data_spec.get("kind") == "tensors":
        from .state import DATA_FILE, read_tensors

        stored = read_tensors(Path(root), DATA_FILE)[1]
    return build_model(model_spec), build_data(data_spec, stored)
