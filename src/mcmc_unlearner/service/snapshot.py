"""Reading a model folder: the manifest (type-checked, confined, authenticated) and consistent snapshots.

``manifest.json`` is the commit point of a model folder: format version, the current state file (always
``state-<sequence>.safetensors``) and its SHA-256, the model's digest, model spec, data spec and data
fingerprint, sampler config, unlearner config, the ledger's committed length and head hash, the last applied
request id, ``extra`` (free JSON), ``manifest_sha256`` over all of that and, with an integrity key,
``manifest_hmac`` (:mod:`mcmc_unlearner.service.integrity`). Every field is type-checked and every name
confined to the folder before it is used; unknown fields are refused. The checksum and HMAC cover the values; the
file's bytes must also be the one layout every version of this library wrote (:func:`manifest_bytes`), so a
reformatted manifest is refused as an edited one.

**Snapshots.** Readers take no lock: :func:`read_snapshot` reads manifest, state, ledger (and data file),
then re-reads the manifest and retries if it changed. The committed state file is never rewritten and the
committed ledger prefix never changes, so equal manifests before and after mean one consistent state.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat as stat_mod
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import fsio, integrity, specs
from . import ledger as ledger_mod
from .fsio import BusyError, StoreError, sha256_hex
from .integrity import Key
from .state import DATA_FILE, FORMAT_NAME, FORMAT_VERSION, is_state_file, parse_tensors, state_name

__all__ = [
    "MANIFEST_NAME",
    "DamagedFolderError",
    "Snapshot",
    "check_folder",
    "history_files",
    "manifest_bytes",
    "read_snapshot",
]

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------------------------- manifest
def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


_MANIFEST_FIELDS: dict[str, Any] = {
    "format": lambda v: v == FORMAT_NAME,
    "format_version": lambda v: _is_int(v, 1),
    "software_version": lambda v: isinstance(v, str),
    "created": lambda v: isinstance(v, str),
    "updated": lambda v: isinstance(v, str),
    "sequence": lambda v: _is_int(v),
    "state_file": lambda v: isinstance(v, str),
    "state_sha256": lambda v: isinstance(v, str) and _HEX64.fullmatch(v),
    "model_sha256": lambda v: isinstance(v, str) and _HEX64.fullmatch(v),
    "model_spec": lambda v: isinstance(v, dict) and v.get("kind") in specs.MODEL_KINDS,
    "data_spec": lambda v: isinstance(v, dict) and v.get("kind") in specs.DATA_KINDS,
    "data_sha256": lambda v: isinstance(v, str) and _HEX64.fullmatch(v),
    "data_file_sha256": lambda v: v is None or (isinstance(v, str) and _HEX64.fullmatch(v)),
    "data_config": lambda v: isinstance(v, dict) and _is_int(v.get("batch_size"), 1) and _is_int(v.get("n_total"), 1),
    "sampler": lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("param_groups"), list)),
    "unlearner": lambda v: isinstance(v, dict),
    "unlearner_state": lambda v: isinstance(v, dict),
    "ledger_entries": lambda v: _is_int(v, 1),
    "ledger_head": lambda v: isinstance(v, str) and _HEX64.fullmatch(v),
    "last_request_id": lambda v: v is None or isinstance(v, str),
    "extra": lambda v: isinstance(v, dict),
    "manifest_sha256": lambda v: isinstance(v, str),
}
_OPTIONAL_FIELDS = {"integrity", "manifest_hmac"}


def _parse_manifest(raw: bytes, where: Path, key: Key | None) -> tuple[dict[str, Any], str]:
    """Parse, type-check and authenticate manifest bytes; returns ``(manifest, signature status)``."""
    try:
        manifest = ledger_mod.strict_loads(raw.decode("utf-8"))
        if isinstance(manifest, dict):
            ledger_mod.canonical_json(manifest)  # serialisable back (nesting depth, numbers)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise StoreError(f"{where} is corrupted (not valid JSON: {exc}); restore the folder from a backup") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{where} is not an mcmc-unlearner manifest")
    version = manifest.get("format_version")
    if _is_int(version, 1) and version > FORMAT_VERSION:
        raise StoreError(
            f"{where.parent} uses store format {version}; this mcmc-unlearner reads format <= {FORMAT_VERSION}: "
            "upgrade it"
        )
    signature = integrity.check_signature(manifest, key, str(where))
    if raw != _render(manifest):
        # the checksum and HMAC cover the values; this covers the bytes (the ledger's lines are checked the same
        # way): every folder this library wrote holds exactly _render(manifest), so an edit that keeps every value
        # (re-indented, keys reordered, CRLF line ends) is found too, and `verify` means "exactly as written"
        raise StoreError(
            f"{where} was reformatted or edited (its values match the checksum, but its bytes are not the ones this "
            "library wrote); restore the folder from a backup"
        )
    unknown = sorted(set(manifest) - set(_MANIFEST_FIELDS) - _OPTIONAL_FIELDS)
    bad = [k for k, ok in _MANIFEST_FIELDS.items() if k not in manifest or not ok(manifest[k])]
    if unknown or bad:
        what = f"unknown field(s) {unknown[:3]}" if unknown else f"field(s) {bad[:3]} missing or of the wrong type"
        raise StoreError(f"{where} is malformed ({what}); restore the folder from a backup")
    fsio.check_name(manifest["state_file"], "manifest state_file")
    if manifest["state_file"] != state_name(manifest["sequence"]):
        raise StoreError(
            f"{where} names state file {ascii(manifest['state_file'])[:60]} but sequence {manifest['sequence']} "
            f"means {state_name(manifest['sequence'])}: the manifest was tampered with; restore the folder"
        )
    if manifest["ledger_entries"] != manifest["sequence"] + 1:
        raise StoreError(f"{where}: ledger_entries does not match the sequence number; restore the folder")
    return manifest, signature


def _render(manifest: dict[str, Any]) -> bytes:
    """The bytes of ``manifest.json`` for a signed manifest: the one layout every version of this library wrote."""
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def manifest_bytes(manifest: dict[str, Any], key: Key | None) -> bytes:
    """Sign ``manifest`` in place (:func:`~mcmc_unlearner.service.integrity.sign`) and return its file bytes."""
    integrity.sign(manifest, key)
    return _render(manifest)


def write_manifest(root: Path, manifest: dict[str, Any], hook: str | None = None, key: Key | None = None) -> None:
    fsio.atomic_write(root, MANIFEST_NAME, manifest_bytes(manifest, key), hook=hook)


# ---------------------------------------------------------------------------------------------- snapshots
class _Moved(Exception):
    """The manifest changed while a snapshot was read (a writer committed): read again."""


@dataclass
class Snapshot:
    """One consistent reading of a model folder (see the module docstring).

    Attributes:
        root: The folder.
        manifest: The parsed, authenticated manifest.
        signature: ``"verified"``, ``"unsigned"`` or ``"unchecked"`` (signed, no key given).
        key: The key the manifest was checked with (``None``: none).
        ledger: The ledger's lines, committed ones first.
        entries: The committed entries, parsed (empty when unreadable; see ``problems``).
        state: The state file's tensors (``None`` when missing or damaged).
        stored_data: The tensors of ``data.safetensors`` (kind ``"tensors"`` only).
        problems: Integrity problems found (empty: intact).
    """

    root: Path
    manifest: dict[str, Any]
    signature: str
    key: Key | None
    ledger: ledger_mod.LedgerRead
    entries: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, torch.Tensor] | None = None
    stored_data: dict[str, torch.Tensor] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Committed ledger lines."""
        return int(self.manifest["ledger_entries"])

    @property
    def pending(self) -> int:
        """Ledger lines after the committed ones (an interrupted or in-progress request)."""
        return max(0, len(self.ledger.lines) - self.count) + (1 if self.ledger.partial else 0)

    @property
    def head(self) -> str:
        """SHA-256 of the last committed ledger line (the head a rollback check compares)."""
        return str(self.manifest["ledger_head"])

    def raise_problems(self) -> None:
        """Raise :class:`StoreError` with the first problem, if any."""
        if self.problems:
            raise StoreError(self.problems[0])


class DamagedFolderError(StoreError):
    """A model folder without ``manifest.json`` that still holds a ledger or state files (:func:`history_files`):
    a saved model whose commit point was deleted or lost, not an empty folder."""


def check_folder(path: str | os.PathLike) -> Path:
    """The folder as a :class:`Path` once it exists, is a folder and holds a manifest (nothing is created).

    Raises:
        FileNotFoundError: The folder does not exist.
        DamagedFolderError: No manifest, but the ledger or state files of a saved model are there.
        StoreError: Not a folder, or no saved model in it.
    """
    root = Path(path)
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"model folder {str(root)!a} not found; save a model there first (--save-model DIR)"
        ) from None
    except OSError as exc:
        raise StoreError(f"cannot open model folder {str(root)!a}: {exc.strerror}") from None
    if not stat_mod.S_ISDIR(st.st_mode):
        raise StoreError(f"{str(root)!a} is not a folder; --model takes the folder a model was saved into")
    if not os.path.lexists(root / MANIFEST_NAME):
        history = history_files(root)
        if history:
            raise DamagedFolderError(_no_manifest_message(root, history))
        raise StoreError(
            f"{str(root)!a} holds no saved model (manifest.json missing, and no ledger or state file: never saved, "
            "or a save into it was interrupted early); save a model into it (--save-model DIR)"
        )
    return root


def history_files(root: Path) -> list[str]:
    """The entries of ``root`` that hold a saved model's history: a non-empty ``ledger.jsonl`` and every
    ``state-<k>.safetensors`` (links and other non-regular entries of those names count too: nothing is
    followed). Without ``manifest.json`` they mean a damaged folder, never "no saved model"."""
    out: list[str] = []
    try:
        names = fsio.list_names(root)
    except OSError:  # an unlistable folder: nothing seen, nothing claimed
        return out
    for name in names:
        if name == ledger_mod.LEDGER_NAME:
            try:
                st = os.lstat(root / name)
            except FileNotFoundError:
                continue
            if st.st_size > 0 or not stat_mod.S_ISREG(st.st_mode):
                out.append(name)
        elif is_state_file(name):
            out.append(name)
    return out


def _no_manifest_message(root: Path, history: list[str]) -> str:
    n = None
    if ledger_mod.LEDGER_NAME in history:
        with contextlib.suppress(OSError, StoreError):
            n = fsio.read_regular(root, ledger_mod.LEDGER_NAME, what="ledger").count(b"\n")
    names = [
        f"{h} ({n} line{'' if n == 1 else 's'})" if h == ledger_mod.LEDGER_NAME and n is not None else h
        for h in history
    ]
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    # what an interrupted save leaves: its state file and at most the save line, no request applied yet
    early = set(history) <= {ledger_mod.LEDGER_NAME, state_name(0)} and (
        ledger_mod.LEDGER_NAME not in history or (n is not None and n <= 1)
    )
    hint = (
        "; if a save into it was interrupted, no request was applied: delete the folder and save again" if early else ""
    )
    return (
        f"{str(root)!a} is damaged: manifest.json is missing but the folder holds {shown}, the ledger and state of a "
        "saved model: the manifest was deleted or lost. Restore the folder from a backup (do not save a new model "
        f"into it: that would discard the ledger of applied requests){hint}; nothing was changed"
    )


def _read_once(root: Path, key: Key | None) -> Snapshot:
    mpath = root / MANIFEST_NAME
    try:
        mraw = fsio.read_regular(root, MANIFEST_NAME, what="manifest", max_bytes=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise StoreError(f"{mpath} is missing; restore the folder from a backup") from None
    manifest, signature = _parse_manifest(mraw, mpath, key)
    snap = Snapshot(root, manifest, signature, key, ledger_mod.LedgerRead())
    try:
        _read_rest(snap)
    except (StoreError, FileNotFoundError):
        if _manifest_changed(root, mraw):
            raise _Moved() from None
        raise
    if _manifest_changed(root, mraw):
        raise _Moved()
    return snap


def _manifest_changed(root: Path, mraw: bytes) -> bool:
    try:
        return fsio.read_regular(root, MANIFEST_NAME, what="manifest", max_bytes=MAX_MANIFEST_BYTES) != mraw
    except (StoreError, FileNotFoundError):
        return True


def _read_rest(snap: Snapshot) -> None:
    """Read state, ledger and data file of ``snap.manifest`` and record integrity problems."""
    root, manifest = snap.root, snap.manifest
    state_path = root / manifest["state_file"]
    try:
        raw = fsio.read_regular(root, manifest["state_file"], what="state file")
    except FileNotFoundError:
        raw = None
        snap.problems.append(f"{state_path} is missing: the model folder is incomplete; restore it from a backup")
    if raw is not None:
        if sha256_hex(raw) != manifest["state_sha256"]:
            snap.problems.append(
                f"{state_path} does not match the SHA-256 in manifest.json (truncated or tampered); "
                "restore the folder from a backup"
            )
        else:
            try:
                snap.state = parse_tensors(raw, state_path)
            except StoreError as exc:
                snap.problems.append(str(exc))
    lpath = root / ledger_mod.LEDGER_NAME
    try:
        snap.ledger = ledger_mod.parse_ledger(fsio.read_regular(root, ledger_mod.LEDGER_NAME, what="ledger"))
    except FileNotFoundError:
        snap.ledger = ledger_mod.LedgerRead()
    read, count = snap.ledger, snap.count
    if len(read.lines) < count:
        snap.problems.append(
            f"{lpath} has {len(read.lines)} complete lines but {count} are committed: the ledger was truncated or "
            "deleted; restore the folder from a backup"
        )
    else:
        if ledger_mod.line_sha256(read.lines[count - 1]) != manifest["ledger_head"]:
            snap.problems.append(
                f"{lpath}: committed line {count} does not match the manifest's ledger head: the ledger was "
                "modified; run `mcmc-unlearner verify` and restore the folder from a backup"
            )
        try:
            snap.entries = read.entries(count)
        except ledger_mod.LedgerError as exc:
            snap.problems.append(f"{lpath}: {exc}; restore the folder from a backup")
        else:
            chain = ledger_mod.check_chain(read.lines[:count], snap.entries)
            snap.problems += [
                f"{lpath} was modified ({p}); run `mcmc-unlearner verify` and restore the folder from a backup"
                for p in chain
            ]
        snap.problems += _restored_lines(root, manifest, read.lines[count:])
    snap.problems += _obstacles(root, manifest["state_file"])
    if manifest["data_spec"].get("kind") == "tensors":
        try:
            draw = fsio.read_regular(root, DATA_FILE, what="data file")
        except FileNotFoundError:
            snap.problems.append(f"{root / DATA_FILE} is missing; restore it from a backup")
        else:
            if sha256_hex(draw) != manifest["data_file_sha256"]:
                snap.problems.append(f"{root / DATA_FILE} does not match manifest.json (tampered); restore it")
            else:
                try:
                    snap.stored_data = parse_tensors(draw, root / DATA_FILE)
                except StoreError as exc:
                    snap.problems.append(str(exc))


def _obstacles(root: Path, current: str) -> list[str]:
    """Directories at state-file names other than the current one: recovery cannot remove them, and the one at the
    next state file's name made every request fail with "check free space and write permission" while verify said
    OK (stop 56's probe)."""
    out = []
    for name in fsio.list_names(root):
        if name == current or not is_state_file(name):
            continue
        with contextlib.suppress(OSError):
            if stat_mod.S_ISDIR(os.lstat(root / name).st_mode):
                out.append(
                    f"{root / name} is a directory; remove or rename it: a model folder holds regular files only, "
                    "and a directory at a state file's name blocks the state file a request writes"
                )
    return out


def _restored_lines(root: Path, manifest: dict[str, Any], pending: list[bytes]) -> list[str]:
    """Complete ledger lines after the committed ones that no crash can leave (else ``[]``: crash debris).

    An interrupted update leaves at most one complete uncommitted line, numbered ``sequence + 1``, whose state file
    it wrote before the line (a rollback truncates the line before deleting the file). Several such lines, another
    number or a missing state file mean committed history under an older manifest: a partly restored folder, which
    recovery must not roll back (it would erase applied requests from the ledger)."""
    entries = []
    for line in pending:
        try:
            entry = ledger_mod.strict_loads(line)
            entries.append((int(entry["seq"]), str(entry.get("request_id"))))
        except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
            continue  # not an entry (appended garbage): rolled back as before
    want = int(manifest["sequence"]) + 1
    if not entries or (len(entries) == 1 and entries[0][0] == want and (root / state_name(want)).exists()):
        return []
    ids = ", ".join(f"{rid!r} (seq {seq})" for seq, rid in entries)
    return [
        f"{root / ledger_mod.LEDGER_NAME} holds {len(entries)} uncommitted entr{'y' if len(entries) == 1 else 'ies'} "
        f"({ids}) that no interrupted update leaves (at most one, seq {want}, with its state file): the manifest or "
        "state files look restored from an older copy than the ledger. Restore the whole folder (manifest.json, "
        "state files and ledger.jsonl) from one backup; nothing was changed"
    ]


def read_snapshot(
    path: str | os.PathLike, *, key: Key | bytes | str | None = None, wait: float = 10.0, strict: bool = True
) -> Snapshot:
    """Read one consistent snapshot of a model folder without taking a lock.

    Checks the manifest (format, every field's type, confined file names, checksum, HMAC with ``key``), the
    state file's SHA-256, the ledger's committed length, head, canonical form and hash chain, and the data
    file's SHA-256. Nothing in the folder is changed.

    Args:
        path: The model folder.
        key: Integrity key (``None``: ``$MCMC_UNLEARNER_KEY`` if set).
        wait: Seconds to keep retrying while writers keep committing.
        strict: Raise on the first integrity problem (else return them in ``problems``).

    Raises:
        FileNotFoundError: The folder does not exist.
        StoreError: Damaged or tampered folder (``strict``), or a malformed manifest.
        BusyError: No consistent reading within ``wait`` seconds.
    """
    root = check_folder(path)
    k = integrity.as_key(key)
    deadline = time.monotonic() + max(0.0, wait)
    while True:
        try:
            snap = _read_once(root, k)
            break
        except _Moved:
            if time.monotonic() >= deadline:
                raise BusyError(
                    f"{str(root)!a} kept changing while it was read (writers committing) for {wait:g} s; "
                    "retry, or pass a longer --wait"
                ) from None
            time.sleep(0.02)
    if strict:
        snap.raise_problems()
    return snap
