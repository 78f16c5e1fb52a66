"""Ctrl-C (KeyboardInterrupt) inside forget's commit never breaks the folder nor leaves a torn ledger line."""

from __future__ import annotations

import json

import pytest

from conftest import save_gmm, tiny_gmm
from mcmc_unlearner.service import deletion, fsio

IDS = [4, 17, 18]


def test_interrupt_right_after_manifest_rename_keeps_the_commit(tmp_path, monkeypatch):
    m = tmp_path / "m"
    save_gmm(m, tiny_gmm(bank=10))
    real = fsio.fsync_dir

    def fsync_dir(folder):  # Ctrl-C lands while the folder is fsynced after os.replace(manifest)
        if json.loads((m / "manifest.json").read_text())["sequence"] == 1:
            monkeypatch.setattr(fsio, "fsync_dir", real)
            raise KeyboardInterrupt
        real(folder)

    monkeypatch.setattr(fsio, "fsync_dir", fsync_dir)
    with pytest.raises(KeyboardInterrupt):
        deletion.forget(m, IDS, request_id="T1")
    monkeypatch.setattr(fsio, "fsync_dir", real)
    res = deletion.verify(m)
    assert res.ok, res.problems  # was: state-000001 missing, ledger has 1 line but 2 committed
    out = deletion.forget(m, IDS, request_id="T1")
    assert not out.applied  # committed before the interrupt: exactly once
    assert deletion.status(m)["n_removed"] == len(IDS)


def test_interrupt_inside_ledger_append_leaves_no_torn_line(tmp_path, monkeypatch):
    m = tmp_path / "m"
    save_gmm(m, tiny_gmm(bank=10))
    before = (m / "ledger.jsonl").read_bytes()
    monkeypatch.setenv(fsio.SLOW_COMMIT_ENV, "0.01")
    monkeypatch.setenv(fsio.SLOW_PHASE_ENV, "ledger-half")

    def sleep(s):  # Ctrl-C while the second half of the line is still to be written
        if s > 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(fsio.time, "sleep", sleep)
    with pytest.raises(KeyboardInterrupt):
        deletion.forget(m, IDS, request_id="T1")
    assert (m / "ledger.jsonl").read_bytes() == before  # "130: nothing half-written"


def test_interrupt_after_the_commit_point_says_the_request_is_applied(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the old state file is being tidied away: exit 130 said "interrupted" as if nothing had been
    done, although the request was applied and recorded; now the message says it is applied."""
    from mcmc_unlearner.cli import main
    from mcmc_unlearner.service import checkpoint

    m = tmp_path / "m"
    save_gmm(m, tiny_gmm(bank=10))
    real = checkpoint.phase

    def phase(name):
        if name == "committed":
            raise KeyboardInterrupt
        return real(name)

    monkeypatch.setattr(checkpoint, "phase", phase)
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(map(str, IDS)) + "\n")
    assert main(["forget", "--model", str(m), "--ids", str(ids), "--request-id", "T1"]) == 130
    err = capsys.readouterr().err
    assert "IS applied" in err and "'T1'" in err
    monkeypatch.setattr(checkpoint, "phase", real)
    assert deletion.verify(m).ok
    assert deletion.status(m)["n_removed"] == len(IDS)
    assert not deletion.forget(m, IDS, request_id="T1").applied  # exactly once


def test_a_partly_restored_folder_is_refused_not_rolled_back(tmp_path):
    """An older manifest and state file restored over a folder that applied a request (the newer ledger kept):
    the applied request's committed line looked like crash debris, `verify` said OK and the next request erased it
    from the ledger (and the request could be applied twice). No crash leaves a complete line without its state
    file, so this is now a problem that `verify` reports and `forget` refuses, changing nothing."""
    import shutil

    from mcmc_unlearner.service.fsio import StoreError

    m, old = tmp_path / "m", tmp_path / "old"
    save_gmm(m, tiny_gmm(bank=10))
    shutil.copytree(m, old)
    assert deletion.forget(m, IDS, request_id="T1").applied
    for f in m.glob("state-*.safetensors"):
        f.unlink()
    shutil.copy(old / "manifest.json", m)
    shutil.copy(old / "state-000000.safetensors", m)
    ledger = (m / "ledger.jsonl").read_bytes()
    res = deletion.verify(m)
    assert not res.ok and any("restored from an older copy" in p and "'T1'" in p for p in res.problems)
    with pytest.raises(StoreError, match="restored from an older copy"):
        deletion.forget(m, [20, 21], request_id="T2")
    assert (m / "ledger.jsonl").read_bytes() == ledger  # T1's line kept


def test_sigterm_during_an_experiment_cleans_its_output_folder_as_ctrl_c_does(tmp_path):
    """A scheduler's or ``timeout``'s SIGTERM killed `bnn` without a word and left its run marker in the output
    folder (stop 45's probe); it is now handled as Ctrl-C: one line, nothing left, exit 143."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mcmc_unlearner.cli", "bnn", "--quick", "--quiet", "--seed", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not out.exists() and time.time() < deadline:  # the run has claimed its folder: it is computing
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "mcmc-unlearner bnn: terminated (SIGTERM); nothing half-written", err
    assert not out.exists() or not any(out.iterdir())  # no marker, no half-written metrics


@pytest.mark.parametrize("at", ["committed", "before"])
def test_sigterm_during_forget_says_what_was_applied(tmp_path, monkeypatch, capsys, at):
    """SIGTERM during forget exited 143 without a word (stop 46's probe); it is handled as Ctrl-C now: before the
    commit nothing is written, after it the message says the request is applied."""
    import os
    import signal

    from mcmc_unlearner.cli import main
    from mcmc_unlearner.service import checkpoint

    m = tmp_path / "m"
    save_gmm(m, tiny_gmm(bank=10))
    ledger = (m / "ledger.jsonl").read_bytes()
    real = checkpoint.phase
    seen = []

    def phase(name):
        seen.append(name)
        if (at == "committed" and name == "committed") or (at == "before" and len(seen) == 1):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(name)

    monkeypatch.setattr(checkpoint, "phase", phase)
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(map(str, IDS)) + "\n")
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["forget", "--model", str(m), "--ids", str(ids), "--request-id", "T1"]) == 143
    assert signal.getsignal(signal.SIGTERM) is handler  # put back
    err = capsys.readouterr().err
    monkeypatch.setattr(checkpoint, "phase", real)
    assert deletion.verify(m).ok
    if at == "committed":
        assert "IS applied" in err and deletion.status(m)["n_removed"] == len(IDS)
    else:
        # nothing applied: the ledger as it was, no id removed (a temporary file of the unfinished commit is
        # rolled back by the next command, as after Ctrl-C)
        assert "terminated (SIGTERM)" in err and deletion.status(m)["n_removed"] == 0
        assert (m / "ledger.jsonl").read_bytes() == ledger


def test_ctrl_c_after_the_new_state_file_is_renamed_leaves_no_stray_file(tmp_path, monkeypatch):
    """Was (stop 47's probe): Ctrl-C while the folder was fsynced after the new state file's rename, before the
    ledger line: the request was reported as not applied, but state-000001 stayed beside state-000000 and verify
    said nothing."""
    import os

    from mcmc_unlearner.service import checkpoint

    folder = save_gmm(tmp_path / "m", tiny_gmm(0, bank=10, burn=60))
    before = sorted(os.listdir(folder))
    real_fsync_dir, real_commit = fsio.fsync_dir, checkpoint.commit_update
    calls = [0]

    def fsync_dir(root):
        calls[0] += 1
        if calls[0] == 1:  # the first folder fsync of the commit: right after the state file's rename
            raise KeyboardInterrupt
        return real_fsync_dir(root)

    def commit(*args, **kwargs):
        monkeypatch.setattr(fsio, "fsync_dir", fsync_dir)
        try:
            return real_commit(*args, **kwargs)
        finally:
            monkeypatch.setattr(fsio, "fsync_dir", real_fsync_dir)

    monkeypatch.setattr(checkpoint, "commit_update", commit)
    with pytest.raises(KeyboardInterrupt):
        deletion.forget(folder, [5], request_id="r1")
    assert sorted(os.listdir(folder)) == before
    monkeypatch.setattr(checkpoint, "commit_update", real_commit)
    assert deletion.verify(folder).ok and deletion.forget(folder, [5], request_id="r1").applied


def _fail_after_manifest_rename(monkeypatch, m, *, reread_fails: bool = False) -> None:
    """EIO from the folder fsync right after os.replace(manifest) (and, with ``reread_fails``, the manifest cannot be
    read back then: EMFILE), once."""
    real_fsync, real_read = fsio.fsync_dir, fsio.read_regular
    armed = [False]

    def fsync_dir(folder):
        if not armed[0] and json.loads((m / "manifest.json").read_text())["sequence"] == 1:
            armed[0] = True
            monkeypatch.setattr(fsio, "fsync_dir", real_fsync)
            raise OSError(5, "Input/output error")
        real_fsync(folder)

    def read_regular(root, name, **kw):
        if armed[0] and name == "manifest.json":
            monkeypatch.setattr(fsio, "read_regular", real_read)
            raise OSError(24, "Too many open files")
        return real_read(root, name, **kw)

    monkeypatch.setattr(fsio, "fsync_dir", fsync_dir)
    if reread_fails:
        monkeypatch.setattr(fsio, "read_regular", read_regular)


def test_an_io_error_after_the_commit_point_reports_the_request_applied(tmp_path, monkeypatch, capsys):
    """Was (stop 56's probe): EIO from the folder fsync after the manifest's rename printed the OS error alone and
    exited 2, as a refusal, though the request was committed (a resend said "already applied"). Now it is reported
    as applied (exit 0) with the I/O error as a warning."""
    from mcmc_unlearner.cli import main

    m = tmp_path / "m"
    save_gmm(m, tiny_gmm(bank=10))
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(map(str, IDS)) + "\n")
    _fail_after_manifest_rename(monkeypatch, m)
    assert main(["forget", "--model", str(m), "--ids", str(ids), "--request-id", "T1"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("applied request T1")
    assert "warning: request 'T1' IS applied" in err and "Input/output error" in err and "verify" in err
    assert deletion.verify(m).ok
    assert deletion.status(m)["n_removed"] == len(IDS)
    assert not deletion.forget(m, IDS, request_id="T1").applied  # exactly once


def test_a_failed_manifest_reread_never_rolls_back_a_committed_update(tmp_path, monkeypatch):
    """Was (stop 56's probe): EIO after the manifest's rename and then a failed re-read of the manifest (EMFILE)
    were taken as "not committed": the committed state file was deleted and its ledger line cut, and verify found
    the folder broken. Whether the rename returned is now recorded, so the update is kept and reported applied."""
    m = tmp_path / "m"
    save_gmm(m, tiny_gmm(bank=10))
    _fail_after_manifest_rename(monkeypatch, m, reread_fails=True)
    with pytest.warns(RuntimeWarning, match="IS applied"):
        out = deletion.forget(m, IDS, request_id="T1")
    assert out.applied
    res = deletion.verify(m)
    assert res.ok, res.problems  # was: state-000001 missing, ledger has 1 line but 2 committed
    assert deletion.status(m)["n_removed"] == len(IDS)
    assert not deletion.forget(m, IDS, request_id="T1").applied


def test_an_unknown_commit_outcome_rolls_nothing_back(tmp_path, monkeypatch):
    """The manifest's rename fails and the manifest cannot be read back: whether the update is committed cannot be
    told, so nothing is rolled back (the error says so) and the next request settles it."""
    import os

    from mcmc_unlearner.service.fsio import StoreError

    m = tmp_path / "m"
    save_gmm(m, tiny_gmm(bank=10))
    real_replace, real_read = os.replace, fsio.read_regular
    armed = [False]

    def replace(a, b):
        if str(b).endswith("manifest.json"):
            armed[0] = True
            raise OSError(5, "Input/output error")
        real_replace(a, b)

    def read_regular(root, name, **kw):
        if armed[0] and name == "manifest.json":
            raise OSError(24, "Too many open files")
        return real_read(root, name, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(fsio, "read_regular", read_regular)
    with pytest.raises(StoreError, match=r"UNKNOWN; nothing was rolled back.*status"):
        deletion.forget(m, IDS, request_id="T1")
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(fsio, "read_regular", real_read)
    assert (m / "state-000001.safetensors").exists()  # not deleted (was: deleted as if not committed)
    assert len((m / "ledger.jsonl").read_bytes().splitlines()) == 2  # the line is kept for recover() to judge
    assert deletion.verify(m).ok  # the old manifest is in place: the line is an uncommitted tail
    out = deletion.forget(m, IDS, request_id="T1")
    assert out.applied and out.recovered["rolled_back"] == ["T1"]
    assert deletion.status(m)["n_removed"] == len(IDS)


def test_an_error_before_the_manifest_rename_is_rolled_back_even_if_the_manifest_is_unreadable(tmp_path, monkeypatch):
    """Was (stop 56's review): EMFILE opening the manifest's temp file, i.e. before the rename was attempted, with
    the manifest unreadable afterwards (the same EMFILE) was reported as UNKNOWN and nothing rolled back, though the
    request certainly was not committed. Now only a rename that was attempted and did not return is UNKNOWN."""
    import os

    from mcmc_unlearner.service.fsio import StoreError

    m = tmp_path / "m"
    save_gmm(m, tiny_gmm(bank=10))
    before = {p.name: p.read_bytes() for p in m.iterdir()}
    real_open, real_read = os.open, fsio.read_regular
    armed = [False]

    def fake_open(path, flags, *a, **k):
        if ".manifest.json.tmp" in str(path):
            armed[0] = True
            raise OSError(24, "Too many open files")
        return real_open(path, flags, *a, **k)

    def read_regular(root, name, **kw):
        if armed[0] and name == "manifest.json":
            raise OSError(24, "Too many open files")
        return real_read(root, name, **kw)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(fsio, "read_regular", read_regular)
    with pytest.raises(StoreError, match=r"Too many open files.*nothing was changed") as err:
        deletion.forget(m, IDS, request_id="T1")
    assert "UNKNOWN" not in str(err.value)
    monkeypatch.setattr(os, "open", real_open)
    monkeypatch.setattr(fsio, "read_regular", real_read)
    assert {p.name: p.read_bytes() for p in m.iterdir()} == before  # rolled back: the folder as it was
    assert deletion.verify(m).ok
    out = deletion.forget(m, IDS, request_id="T1")
    assert out.applied and not out.recovered.get("rolled_back")
