"""Reading model folders: confinement (no reads or writes outside the folder), integrity before recovery, and
consistent lock-free snapshots while writers commit.

Each probe of the issue "Deletion requests you can trust" is a test here: one stderr line, exit code 2 (or
verify's 1), the folder byte-identical (every file's hash plus the listing's and the folder's mtimes), no
traceback, and no file outside the folder opened, changed or created (an audit hook records every open).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FileAudit, folder_state, save_gmm, tiny_gmm
from mcmc_unlearner.cli import main
from mcmc_unlearner.service import integrity
from mcmc_unlearner.service.checkpoint import load_model, read_snapshot
from mcmc_unlearner.service.deletion import forget, status, verify
from mcmc_unlearner.service.fsio import StoreError

pytestmark = pytest.mark.skipif(os.name != "posix", reason="links, FIFOs and flock are POSIX")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return save_gmm(tmp_path_factory.mktemp("snap") / "m", tiny_gmm(bank=10))


@pytest.fixture
def rooms(template, tmp_path):
    """(model folder, outside folder with a copy of the state file and a secret)."""
    m = tmp_path / "m"
    shutil.copytree(template, m)
    out = tmp_path / "outside"
    out.mkdir()
    shutil.copy(m / "state-000000.safetensors", out / "x")
    (out / "secret").write_text("do not touch")
    return m, out


def resign(m: Path, mutate) -> None:
    """Edit the manifest and recompute its (unkeyed) checksum, as anyone who can write the folder can."""
    man = json.loads((m / "manifest.json").read_text())
    mutate(man)
    integrity.sign(man, None)
    (m / "manifest.json").write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")


def _ids(tmp_path: Path, text: str = "1 2") -> str:
    p = tmp_path / "ids.txt"
    p.write_text(text)
    return str(p)


def _all_refuse(m: Path, out: Path, tmp_path: Path, capsys, match: str) -> None:
    """forget, status and verify all refuse (one line, nothing changed, nothing outside touched)."""
    before, outside = folder_state(m), folder_state(out)
    with FileAudit() as audit:
        rc = main(["forget", "--model", str(m), "--ids", _ids(tmp_path)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and match in err, err
        rc = main(["status", "--model", str(m)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and match in err, err
        assert main(["verify", "--model", str(m)]) == 1
        assert match in capsys.readouterr().err
    assert folder_state(m) == before and folder_state(out) == outside
    assert not audit.touching(out), audit.touching(out)
    assert not audit.followed_links()


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_manifest_naming_a_file_outside_is_refused(rooms, tmp_path, capsys, where):
    """Was: the outside file was read, then deleted, and verify said OK."""
    m, out = rooms
    target = "../outside/x" if where == "relative" else str(out / "x")
    resign(m, lambda man: man.update(state_file=target))
    _all_refuse(m, out, tmp_path, capsys, "not a plain file name")
    assert (out / "x").exists()


def test_manifest_naming_another_state_file_is_refused(rooms, tmp_path, capsys):
    m, out = rooms
    shutil.copy(m / "state-000000.safetensors", m / "state-000007.safetensors")
    resign(m, lambda man: man.update(state_file="state-000007.safetensors"))
    _all_refuse(m, out, tmp_path, capsys, "tampered with")


@pytest.mark.parametrize(
    "rewrite",
    [
        lambda text: json.dumps(json.loads(text), indent=4, sort_keys=True) + "\n",  # re-indented
        lambda text: json.dumps(json.loads(text)),  # one line, keys in the file's own order
        lambda text: text.replace("\n", "\r\n"),  # CRLF line ends (a Windows checkout)
        lambda text: text + "\n",  # a blank line appended
    ],
)
def test_manifest_reformatted_without_changing_a_value_is_refused(rooms, tmp_path, capsys, rewrite):
    """Was: the checksum covers the parsed values only, so `verify` said OK for a manifest whose bytes were edited."""
    m, out = rooms
    text = (m / "manifest.json").read_text()
    edited = rewrite(text)
    assert edited != text and json.loads(edited) == json.loads(text)  # same values, other bytes
    (m / "manifest.json").write_bytes(edited.encode())
    _all_refuse(m, out, tmp_path, capsys, "manifest.json was reformatted or edited")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda man: man.update(sequence="1"), "wrong type"),
        (lambda man: man.update(ledger_entries=10**30), "does not match the sequence"),
        (lambda man: man.update(surprise=1), "unknown field"),
        (lambda man: man.update(data_config={"batch_size": 0, "n_total": 200}), "wrong type"),
        (lambda man: man.update(model_spec={"kind": "svm"}), "wrong type"),
        (lambda man: man["unlearner"].update(solver="newton"), "unlearner configuration is invalid"),
        (lambda man: man["sampler"].update(param_groups=[]), "do not fit together"),
        (lambda man: man.update(model_spec={"kind": "gmm", "k": 10**15}), "invalid"),
    ],
)
def test_resigned_malformed_manifests_refused_cleanly(rooms, tmp_path, capsys, mutate, match):
    m, out = rooms
    resign(m, mutate)
    _all_refuse(m, out, tmp_path, capsys, match)


@pytest.mark.parametrize("name", ["state-000000.safetensors", "ledger.jsonl", "manifest.json"])
def test_symlinked_files_are_not_followed(rooms, tmp_path, capsys, name):
    m, out = rooms
    shutil.move(m / name, out / name)
    os.symlink(out / name, m / name)
    _all_refuse(m, out, tmp_path, capsys, "symbolic link")


def test_planted_lock_link_is_never_touched(rooms, tmp_path, capsys):
    """Was: `.lock` symlinked outside made every forget create the target, even when refused."""
    m, out = rooms
    os.symlink(out / "created-by-lock", m / ".lock")
    before = folder_state(m)
    assert main(["forget", "--model", str(m), "--ids", _ids(tmp_path, "100000")]) == 2
    assert folder_state(m) == before
    with FileAudit() as audit:
        assert main(["forget", "--model", str(m), "--ids", _ids(tmp_path, "5")]) == 0
    capsys.readouterr()
    assert not (out / "created-by-lock").exists() and not audit.touching(out)
    assert os.path.islink(m / ".lock")


def test_fifo_in_the_folder_cannot_hang_readers(rooms, tmp_path, capsys):
    """Was: a FIFO as state_file hung status and verify (no writer ever opens it: a plain open blocks forever)."""
    m, out = rooms
    os.unlink(m / "state-000000.safetensors")
    os.mkfifo(m / "state-000000.safetensors")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(  # in a subprocess, so that a hang is a timeout here, not a stuck test run
        [sys.executable, "-m", "mcmc_unlearner.cli", "status", "--model", str(m)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2 and "not a regular file" in proc.stderr and "Traceback" not in proc.stderr
    _all_refuse(m, out, tmp_path, capsys, "not a regular file")


def test_hard_linked_ledger_is_not_written_through(rooms, tmp_path, capsys):
    m, out = rooms
    os.link(m / "ledger.jsonl", out / "backup-ledger.jsonl")
    before, outside = folder_state(m), (out / "backup-ledger.jsonl").read_bytes()
    assert main(["forget", "--model", str(m), "--ids", _ids(tmp_path)]) == 2
    assert "hard links" in capsys.readouterr().err
    assert folder_state(m) == before and (out / "backup-ledger.jsonl").read_bytes() == outside
    assert verify(m).ok  # reading is fine


def test_no_lock_file_is_created_on_refusal(tmp_path, capsys):
    """Was: an empty folder got a `.lock` on refusal."""
    empty = tmp_path / "empty"
    empty.mkdir()
    before = folder_state(empty)
    for cmd in ("forget", "status", "verify"):
        extra = ["--ids", _ids(tmp_path)] if cmd == "forget" else []
        assert main([cmd, "--model", str(empty), *extra]) == 2
        assert "holds no saved model" in capsys.readouterr().err
    assert folder_state(empty) == before == (before[0], {})
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["forget", "--model", str(f), "--ids", _ids(tmp_path)]) == 2  # was a traceback
    assert "is not a folder" in capsys.readouterr().err


def _crash_debris(m: Path) -> None:
    """What a kill between ledger append and manifest rename leaves: an orphan state file and a torn line."""
    shutil.copy(m / "state-000000.safetensors", m / "state-000001.safetensors")
    with open(m / "ledger.jsonl", "ab") as f:
        f.write(b'{"event":"forget","request_id":"torn"}\n{"event":"forg')


def test_bad_request_after_a_crash_changes_nothing(rooms, tmp_path, capsys):
    """Was: recovery ran first, so a bad request deleted the crash evidence before being refused."""
    m, _ = rooms
    _crash_debris(m)
    before = folder_state(m)
    for text in ("100000", "1 1", "abc"):
        assert main(["forget", "--model", str(m), "--ids", _ids(tmp_path, text)]) == 2
        capsys.readouterr()
        assert folder_state(m) == before
    assert main(["forget", "--model", str(m), "--ids", _ids(tmp_path), "--damping", "1e12"]) == 4  # gate: same
    capsys.readouterr()
    assert folder_state(m) == before
    res = verify(m)
    assert res.ok and "uncommitted" in res.notes[0]
    assert main(["forget", "--model", str(m), "--ids", _ids(tmp_path)]) == 0  # a good request recovers, then commits
    assert "rolled back 2 uncommitted" in capsys.readouterr().err
    assert sorted(os.listdir(m)) == ["ledger.jsonl", "manifest.json", "state-000001.safetensors"]
    assert verify(m).ok and not verify(m).notes


def test_tampered_folder_after_a_crash_is_refused_before_recovery(rooms, tmp_path, capsys):
    m, _ = rooms
    _crash_debris(m)
    lines = (m / "ledger.jsonl").read_bytes().split(b"\n")
    lines[0] = lines[0].replace(b'"n_total":200', b'"n_total":201')
    (m / "ledger.jsonl").write_bytes(b"\n".join(lines))
    before = folder_state(m)
    assert main(["forget", "--model", str(m), "--ids", _ids(tmp_path)]) == 2
    assert "ledger" in capsys.readouterr().err
    assert folder_state(m) == before  # the torn tail and orphan (the evidence) are still there


def test_snapshot_retries_while_a_writer_commits(rooms, monkeypatch):
    """A manifest that changes between the first and last read means a writer committed: read again."""
    m, _ = rooms
    from mcmc_unlearner.service import snapshot as snap_mod

    real = snap_mod._manifest_changed
    calls = []

    def flaky(root, raw):
        calls.append(1)
        return len(calls) == 1 or real(root, raw)

    monkeypatch.setattr(snap_mod, "_manifest_changed", flaky)
    assert read_snapshot(m).count == 1 and len(calls) == 2
    calls.clear()
    monkeypatch.setattr(snap_mod, "_manifest_changed", lambda root, raw: True)
    from mcmc_unlearner.service.fsio import BusyError

    with pytest.raises(BusyError, match="kept changing"):
        read_snapshot(m, wait=0.2)


def test_verify_during_concurrent_writes_never_fails(template, tmp_path):
    """0 false FAILED verdicts while another process keeps committing requests (500 runs: benchmarks/)."""
    m = tmp_path / "m"
    shutil.copytree(template, m)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    script = (
        "import sys\nfrom mcmc_unlearner.service.deletion import forget\n"
        "for i in range(20, 60):\n    forget(sys.argv[1], [i], wait=30)\n"
    )
    start = verify(m).head
    writer = subprocess.Popen([sys.executable, "-c", script, str(m)], env=env, stderr=subprocess.PIPE)
    verdicts, heads = [], set()
    try:
        # the writer's interpreter and torch take seconds to start on a loaded machine, longer than 300 verifies:
        # begin counting at its first commit, so the verdicts overlap its writes
        deadline = time.monotonic() + 120
        while writer.poll() is None and time.monotonic() < deadline:
            res = verify(m, wait=30)
            assert res.ok, res.problems
            if res.head != start:
                break
            time.sleep(0.01)
        while writer.poll() is None and len(verdicts) < 300:
            res = verify(m, wait=30)
            verdicts.append(res.ok)
            heads.add(res.head)
            assert res.ok, res.problems
    finally:
        writer.wait(timeout=300)
    assert writer.returncode == 0, writer.stderr.read().decode()
    assert all(verdicts) and len(verdicts) >= 5 and len(heads) >= 2  # verdicts spanned several commits
    assert len(load_model(m).requests) == 40 and verify(m).ok


def test_status_reports_head_and_pending(rooms):
    m, _ = rooms
    st = status(m)
    assert st["ledger_head"] == json.loads((m / "manifest.json").read_text())["ledger_head"]
    out = forget(m, [9])
    assert out.head == status(m)["ledger_head"] != st["ledger_head"]
    with pytest.raises(FileNotFoundError, match="not found"):
        read_snapshot(m / "nope")
    with pytest.raises(StoreError, match="holds no saved model"):
        read_snapshot(m.parent / "outside")
