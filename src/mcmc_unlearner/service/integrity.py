"""Keyed integrity of model folders: HMAC-SHA256 over the manifest, which pins state file and ledger head.

Unkeyed checksums (``manifest_sha256``, the ledger's hash chain) catch accidents but not an adversary who can
write the folder: they can edit a file and recompute every hash. With a secret key the manifest also carries
``manifest_hmac = HMAC-SHA256(key, canonical manifest body)``; the body holds the SHA-256 of the state file,
of ``data.safetensors``, and the ledger's committed length and head hash (which chains every earlier line),
so rewriting the ledger, the state or the manifest — even with recomputed hashes — is detected.

The key comes from ``--key-file FILE`` or the environment variable ``MCMC_UNLEARNER_KEY`` (at least 16
bytes; e.g. ``openssl rand -hex 32``). The manifest records ``integrity = {"scheme": "hmac-sha256",
"key_id": ...}``, where ``key_id`` is itself an HMAC of a fixed label (it names the key without revealing it).
A signed folder cannot be written without its key, and with a key given an unsigned folder is refused (a
stripped signature looks exactly like that).

A MAC cannot detect a **rollback** of the whole folder to an older, correctly signed state: record the ledger
head that ``forget``/``status`` print and check it later with ``verify --expect-head HASH``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fsio import StoreError
from .ledger import canonical_json

__all__ = ["KEY_ENV", "MIN_KEY_BYTES", "SCHEME", "Key", "as_key", "check_signature", "resolve_key", "sign"]

KEY_ENV = "MCMC_UNLEARNER_KEY"
MIN_KEY_BYTES = 16
MAX_KEY_FILE_BYTES = 4096
SCHEME = "hmac-sha256"
_UNSIGNED_FIELDS = ("manifest_sha256", "manifest_hmac")


@dataclass(frozen=True)
class Key:
    """A secret integrity key.

    Attributes:
        secret: The key bytes.
        source: Where it came from (for messages; never the key itself).
    """

    secret: bytes
    source: str = "key"

    def __repr__(self) -> str:  # never print the secret
        return f"Key(source={self.source!r}, key_id={self.key_id!r})"

    @property
    def key_id(self) -> str:
        """16 hex digits naming the key (an HMAC of a fixed label: reveals nothing about the key)."""
        return hmac.new(self.secret, b"mcmc-unlearner key id", hashlib.sha256).hexdigest()[:16]

    def mac(self, data: bytes) -> str:
        """HMAC-SHA256 of ``data`` (hex)."""
        return hmac.new(self.secret, data, hashlib.sha256).hexdigest()


def _checked(secret: bytes, source: str) -> Key:
    if len(secret) < MIN_KEY_BYTES:
        raise StoreError(
            f"the integrity key from {source} has {len(secret)} bytes; use at least {MIN_KEY_BYTES} random bytes "
            "(e.g. `openssl rand -hex 32`)"
        )
    return Key(secret, source)


def _read_key_file(p: Path) -> bytes:
    """The bytes of a key file. It is the operator's own path, not a file of a model folder: links are followed
    (secret mounts such as Kubernetes' are links into a hidden folder), but it must end at a regular file."""
    where = f"key file {str(p)!a}"
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags)
    except FileNotFoundError:
        raise StoreError(f"{where} not found; pass --key-file FILE holding the key") from None
    except OSError as exc:
        raise StoreError(f"cannot open {where}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{where} is not a regular file (a folder, FIFO or device); pass a file holding the key")
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise StoreError(f"{where} has {st.st_size} bytes, more than the {MAX_KEY_FILE_BYTES} a key file may have")
        try:
            raw = os.read(fd, MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise StoreError(f"cannot read {where}: {exc.strerror or exc}") from None
        if len(raw) > MAX_KEY_FILE_BYTES:
            raise StoreError(f"{where} has more than the {MAX_KEY_FILE_BYTES} bytes a key file may have")
        return raw
    finally:
        os.close(fd)


def resolve_key(key_file: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> Key | None:
    """The integrity key: from ``key_file`` if given, else from ``$MCMC_UNLEARNER_KEY``, else ``None``.

    A key file holds the key bytes; one trailing newline is ignored.

    Raises:
        StoreError: The key file cannot be read, is not a regular file, or the key is shorter than 16 bytes.
    """
    env = os.environ if environ is None else environ
    if key_file is not None:
        raw = _read_key_file(Path(key_file))
        if raw.endswith(b"\r\n"):
            raw = raw[:-2]
        elif raw.endswith(b"\n"):
            raw = raw[:-1]
        return _checked(raw, f"key file {str(Path(key_file))!a}")
    value = env.get(KEY_ENV)
    if value is None:
        return None
    if not value:
        # set but empty (e.g. `export MCMC_UNLEARNER_KEY=$(cat missing-file)`): refused, not read as "no key" --
        # that silently saved unsigned folders and read signed ones unchecked
        raise StoreError(
            f"${KEY_ENV} is set but empty; set it to a key of at least {MIN_KEY_BYTES} bytes (e.g. `openssl rand "
            f"-hex 32`), or unset it to work without a key"
        )
    return _checked(value.encode("utf-8", "surrogateescape"), f"${KEY_ENV}")


def as_key(key: Key | bytes | str | None) -> Key | None:
    """Normalise an API ``key`` argument: a :class:`Key`, raw bytes, a string, or ``None`` (use the env var)."""
    if key is None:
        return resolve_key()
    if isinstance(key, Key):
        return key
    if isinstance(key, str):
        return _checked(key.encode("utf-8"), "the key argument")
    if isinstance(key, (bytes, bytearray)):
        return _checked(bytes(key), "the key argument")
    raise TypeError(f"key must be bytes, str or Key, got {type(key).__name__}")


def _body(manifest: Mapping[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in manifest.items() if k not in _UNSIGNED_FIELDS}).encode()


def sign(manifest: dict[str, Any], key: Key | None) -> dict[str, Any]:
    """Add ``manifest_sha256`` (and with a key ``integrity`` + ``manifest_hmac``) to a manifest body in place."""
    manifest.pop("manifest_hmac", None)
    if key is None:
        manifest.pop("integrity", None)
    else:
        manifest["integrity"] = {"scheme": SCHEME, "key_id": key.key_id}
    body = _body(manifest)
    manifest["manifest_sha256"] = hashlib.sha256(body).hexdigest()
    if key is not None:
        manifest["manifest_hmac"] = key.mac(body)
    return manifest


def check_signature(manifest: Mapping[str, Any], key: Key | None, where: str) -> str:
    """Check a parsed manifest's checksum and signature against ``key``.

    Returns:
        ``"verified"`` (signed, key matches), ``"unsigned"`` (no signature, no key), or ``"unchecked"`` (signed
        but no key given: only the unkeyed checksum was checked).

    Raises:
        StoreError: Checksum or HMAC mismatch, a different key, or a key given for an unsigned folder.
    """
    body = _body(manifest)
    if manifest.get("manifest_sha256") != hashlib.sha256(body).hexdigest():
        raise StoreError(f"{where} was modified (checksum mismatch); restore the folder from a backup")
    integrity = manifest.get("integrity")
    signed = integrity is not None or "manifest_hmac" in manifest
    if not signed:
        if key is not None:
            raise StoreError(
                f"{where} is not signed, but an integrity key was given ({key.source}): the folder was saved without "
                "a key or its signature was stripped; restore it from a backup, or drop the key to use it unsigned"
            )
        return "unsigned"
    if (
        not isinstance(integrity, dict)
        or integrity.get("scheme") != SCHEME
        or not isinstance(manifest.get("manifest_hmac"), str)
    ):
        raise StoreError(f"{where} has a malformed signature; restore the folder from a backup")
    if key is None:
        return "unchecked"
    if integrity.get("key_id") != key.key_id:
        raise StoreError(
            f"{where} is signed with another key (key id {ascii(integrity.get('key_id'))[:20]}, yours "
            f"{key.key_id}); use the folder's key"
        )
    if not hmac.compare_digest(str(manifest["manifest_hmac"]), key.mac(body)):
        raise StoreError(f"{where} was modified (HMAC mismatch: signed content changed); restore it from a backup")
    return "verified"
