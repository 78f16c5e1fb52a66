"""Real OS errors inside a request's writes (stop 58's probe): the folder is the old model or the new one, and the
message names the folder and says which.

The faults are injected at the ``os`` calls themselves (``os.fsync``, ``os.open``, ``os.ftruncate``), not at the
store's helpers, so that a helper that swallows an error is caught too: the folder fsync swallowed every error,
so the documented warning for an I/O error after the commit point never fired for a real one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat

import pytest

from conftest import save_gmm, tiny_gmm
from mcmc_unlearner.service import deletion, fsio
from mcmc_unlearner.service.fsio import StoreError

IDS = [4, 17, 18]


def _contents(folder) -> dict[str, str]:
    """Each entry's content hash (a rollback keeps contents, not modification times: docs/deletion-service.md)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _sequence(folder) -> int:
    return json.loads((folder / "manifest.json").read_text())["sequence"]


def _fail_folder_fsync(monkeypatch, when, err: int = errno.EIO) -> list[int]:
    """``os.fsync`` of a folder raises ``err`` once, the first time ``when()`` holds; returns the hit count."""
    real = os.fsync
    hits: list[int] = []

    def fsync(fd):
        if not hits and stat.S_ISDIR(os.fstat(fd).st_mode) and when():
            hits.append(fd)
            raise OSError(err, os.strerror(err))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return hits


def test_fsync_dir_raises_a_failed_fsync_and_passes_over_an_unsupported_one(tmp_path, monkeypatch):
    for err, raised in ((errno.EIO, True), (errno.ENOSPC, True), (errno.EINVAL, False)):
        hits = _fail_folder_fsync(monkeypatch, lambda: True, err)
        if raised:  # was: every error swallowed
            with pytest.raises(OSError) as info:
                fsio.fsync_dir(tmp_path)
            assert info.value.errno == err
        else:  # a file system without folder fsync: nothing to report
            fsio.fsync_dir(tmp_path)
        assert hits
    with pytest.raises(FileNotFoundError):  # was: a folder that cannot be opened passed silently too
        fsio.fsync_dir(tmp_path / "missing")


def test_a_real_eio_from_the_folder_fsync_after_the_manifest_rename_is_reported(tmp_path, monkeypatch):
    """The documented warning ("IS applied ... a write step after its commit point failed") for an ``os.fsync``
    that fails after the manifest's rename; before, the error was swallowed and the request said nothing."""
    m = save_gmm(tmp_path / "m", tiny_gmm(bank=10))
    hits = _fail_folder_fsync(monkeypatch, lambda: _sequence(m) == 1)
    with pytest.warns(RuntimeWarning, match=r"request 'T1' IS applied.*Input/output error.*verify"):
        out = deletion.forget(m, IDS, request_id="T1")
    assert hits and out.applied
    monkeypatch.undo()
    assert deletion.verify(m).ok
    assert deletion.status(m)["n_removed"] == len(IDS)
    again = deletion.forget(m, IDS, request_id="T1")
    assert not again.applied  # exactly once
    assert again.recovered["removed_files"] == ["state-000000.safetensors"]  # kept by the late error, tidied now


def test_a_failed_folder_fsync_before_the_commit_point_rolls_the_request_back(tmp_path, monkeypatch):
    """The folder fsync after the new state file's rename fails (the manifest not yet replaced): the request is
    refused and rolled back. Before, the error was swallowed and the request committed on a folder fsync that
    had failed."""
    m = save_gmm(tmp_path / "m", tiny_gmm(bank=10))
    before = _contents(m)
    hits = _fail_folder_fsync(monkeypatch, lambda: (m / "state-000001.safetensors").exists() and _sequence(m) == 0)
    with pytest.raises(StoreError, match=r"could not write the update into .*Input/output error.*nothing was changed"):
        deletion.forget(m, IDS, request_id="T1")
    assert hits
    monkeypatch.undo()
    assert _contents(m) == before
    out = deletion.forget(m, IDS, request_id="T1")
    assert out.applied and deletion.verify(m).ok


def test_a_ledger_that_cannot_be_opened_for_the_append_says_nothing_was_changed(tmp_path, monkeypatch):
    """ENOSPC opening the ledger for the append was said as "cannot open file .../ledger.jsonl: No space left on
    device" (no outcome, no fix), unlike every other failed write of the commit."""
    m = save_gmm(tmp_path / "m", tiny_gmm(bank=10))
    before = _contents(m)
    real = os.open

    def fail_ledger_append(path, flags, *a, **kw):
        if str(path).endswith("ledger.jsonl") and flags & os.O_APPEND:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", fail_ledger_append)
    with pytest.raises(StoreError) as info:
        deletion.forget(m, IDS, request_id="T1")
    monkeypatch.undo()
    msg = str(info.value)
    assert msg.startswith(f"could not write the update into {m} (No space left on device)"), msg
    assert "nothing was changed: check free space and write permission" in msg
    assert _contents(m) == before
    assert deletion.forget(m, IDS, request_id="T1").applied


@pytest.mark.parametrize("resend", [False, True], ids=["new-request", "resent-applied-request"])
def test_a_failed_clean_up_of_crash_debris_names_the_folder(tmp_path, monkeypatch, capsys, resend):
    """An interrupted request's torn ledger line cannot be cut back (the truncation fails): the error was the bare
    OS error (`error: No space left on device`, naming no folder, exit 2); now it names the folder, says that the
    saved model is unchanged and what to do, and the next request cleans up and applies."""
    from mcmc_unlearner.cli import ExitCode, main

    m = save_gmm(tmp_path / "m", tiny_gmm(bank=10))
    if resend:
        deletion.forget(m, IDS, request_id="T1")
    with open(m / "ledger.jsonl", "ab") as f:  # what a kill inside the ledger append leaves
        f.write(b'{"event": "forget", "ids": [')
    before = _contents(m)
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(map(str, IDS)))
    real = os.ftruncate

    def ftruncate(fd, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "ftruncate", ftruncate)
    code = main(["forget", "--model", str(m), "--ids", str(ids), "--request-id", "T1"])
    _, err = capsys.readouterr()
    monkeypatch.setattr(os, "ftruncate", real)
    assert code == ExitCode.REFUSED
    assert f"could not clean up what an interrupted earlier request left in {m} (No space left on device)" in err
    assert "the saved model is unchanged" in err and "check free space and write permission" in err
    assert len(err.strip().splitlines()) == 1
    assert _contents(m) == before
    assert deletion.verify(m).ok  # the torn line is an uncommitted tail, noted, not a problem
    out = deletion.forget(m, IDS, request_id="T1")
    assert out.applied is not resend
    assert out.recovered["rolled_back"] == ["partial line"]
    assert deletion.verify(m).ok and deletion.status(m)["n_removed"] == len(IDS)


def _fail_kth_folder_fsync(monkeypatch, k: int, err: int = errno.EIO) -> list[int]:
    """The ``k``-th ``os.fsync`` of a folder (1-based) raises ``err``; returns the folder fsyncs counted."""
    real = os.fsync
    seen: list[int] = []

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            seen.append(fd)
            if len(seen) == k:
                raise OSError(err, os.strerror(err))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


@pytest.mark.parametrize("k", [1, 2], ids=["after-the-state-file", "after-the-new-ledger"])
def test_a_failed_folder_fsync_in_save_model_saves_nothing_and_says_so(tmp_path, monkeypatch, k):
    """save_model's folder fsyncs before its manifest's rename: it raised the bare OS error and left a state file (and
    ledger) without a manifest, which the next save_model and every request refused as a damaged model."""
    objs = tiny_gmm(bank=10)
    m = tmp_path / "m"
    _fail_kth_folder_fsync(monkeypatch, k)
    with pytest.raises(StoreError) as info:
        save_gmm(m, objs)
    monkeypatch.undo()
    msg = str(info.value)
    assert msg.startswith(f"could not save the model into {m} (Input/output error); nothing was saved:"), msg
    assert "check free space and write permission, then save again" in msg
    assert sorted(os.listdir(m)) == []  # nothing half-written
    save_gmm(m, objs)  # saving again works
    assert deletion.verify(m).ok


def test_a_failed_folder_fsync_after_save_model_renamed_its_manifest_is_a_warning(tmp_path, monkeypatch):
    """After the manifest's rename the model IS saved: a warning says so (not an error, and nothing removed)."""
    objs = tiny_gmm(bank=10)
    m = tmp_path / "m"
    seen = _fail_kth_folder_fsync(monkeypatch, 3)
    with pytest.warns(RuntimeWarning, match=r"the model IS saved in .*Input/output error.*verify --model"):
        save_gmm(m, objs)
    monkeypatch.undo()
    assert len(seen) == 3
    assert deletion.verify(m).ok
    assert deletion.forget(m, IDS, request_id="T1").applied


def test_save_model_overwrite_that_fails_says_the_earlier_model_was_removed(tmp_path, monkeypatch):
    """overwrite=True removes the earlier model's files before it writes; a write that then fails says so."""
    objs = tiny_gmm(bank=10)
    m = save_gmm(tmp_path / "m", objs)
    real = os.open

    def no_space_for_temp_files(path, flags, *a, **kw):
        if flags & os.O_CREAT and ".tmp-" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", no_space_for_temp_files)
    with pytest.raises(StoreError) as info:
        save_gmm(m, objs, overwrite=True)
    monkeypatch.undo()
    msg = str(info.value)
    assert msg.startswith(f"could not save the model into {m} (No space left on device); nothing was saved; "), msg
    assert "model saved there before (manifest.json, ledger.jsonl, state-000000.safetensors) were removed" in msg
    assert sorted(os.listdir(m)) == []
    save_gmm(m, objs)
    assert deletion.verify(m).ok
