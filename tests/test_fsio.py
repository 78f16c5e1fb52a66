"""Confined file I/O: plain names only, links never followed, FIFOs never block, the folder lock."""

from __future__ import annotations

import os
import threading
import time

import pytest

from conftest import FileAudit, folder_state
from mcmc_unlearner.service import fsio
from mcmc_unlearner.service.fsio import BusyError, StoreError

pytestmark = pytest.mark.skipif(os.name != "posix", reason="links, FIFOs and flock are POSIX")


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/etc/passwd", "a\\b", "a\x00b", "a\nb", "x" * 256, 3])
def test_check_name_refuses_everything_but_plain_names(name):
    with pytest.raises(StoreError, match="plain file name"):
        fsio.check_name(name)


@pytest.mark.parametrize("name", ["manifest.json", "state-000001.safetensors", ".hidden", "a b", "é"])
def test_check_name_accepts_plain_names(name):
    assert fsio.check_name(name) == name


@pytest.fixture
def rooms(tmp_path):
    """A folder and an 'outside' folder holding a secret file."""
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"outside")
    return inside, outside


def test_read_refuses_links_fifos_and_large_files(rooms):
    inside, outside = rooms
    os.symlink(outside / "secret", inside / "link")
    os.mkfifo(inside / "fifo")
    (inside / "big").write_bytes(b"x" * 100)
    (inside / "ok").write_bytes(b"fine")
    with FileAudit() as audit:
        with pytest.raises(StoreError, match="symbolic link"):
            fsio.read_regular(inside, "link")
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="not a regular file"):
            fsio.read_regular(inside, "fifo")  # a FIFO without writer would block a plain open
        assert time.monotonic() - t0 < 5
        with pytest.raises(StoreError, match="more than the 10 bytes"):
            fsio.read_regular(inside, "big", max_bytes=10)
        with pytest.raises(FileNotFoundError):
            fsio.read_regular(inside, "missing")
        with pytest.raises(StoreError, match="plain file name"):
            fsio.read_regular(inside, "../out/secret")
        assert fsio.read_regular(inside, "ok") == b"fine"
    assert not audit.touching(outside) and not audit.followed_links()


def test_writes_replace_links_instead_of_following_them(rooms):
    inside, outside = rooms
    before = folder_state(outside)
    os.symlink(outside / "secret", inside / "target")
    os.symlink(outside / "new", inside / "dangling")
    with FileAudit() as audit:
        fsio.atomic_write(inside, "target", b"replaced")
        fsio.atomic_write(inside, "dangling", b"created here")
        fsio.atomic_write_bytes(inside / "plain", b"p")
    assert not (inside / "target").is_symlink() and (inside / "target").read_bytes() == b"replaced"
    assert not (inside / "dangling").is_symlink() and (inside / "dangling").read_bytes() == b"created here"
    assert folder_state(outside) == before and not audit.touching(outside)
    assert sorted(os.listdir(inside)) == ["dangling", "plain", "target"]  # no temp files left


def test_in_place_writes_refuse_links_and_hard_links(rooms):
    inside, outside = rooms
    before = folder_state(outside)
    os.symlink(outside / "secret", inside / "ledger")
    with pytest.raises(StoreError, match="symbolic link"):
        fsio.append_bytes(inside, "ledger", b"line\n")
    with pytest.raises(StoreError, match="symbolic link"):
        fsio.truncate_file(inside, "ledger", 0)
    os.link(outside / "secret", inside / "hard")
    with pytest.raises(StoreError, match="hard links"):
        fsio.append_bytes(inside, "hard", b"line\n")
    with pytest.raises(StoreError, match="hard links"):
        fsio.truncate_file(inside, "hard", 0)
    os.mkfifo(inside / "fifo")
    with pytest.raises(StoreError, match="not a regular file"):
        fsio.append_bytes(inside, "fifo", b"x")
    assert (outside / "secret").read_bytes() == b"outside"
    assert folder_state(outside)[1]["secret"][4] == before[1]["secret"][4]
    fsio.append_bytes(inside, "fresh", b"a\n")
    fsio.append_bytes(inside, "fresh", b"b\n")
    fsio.truncate_file(inside, "fresh", 2)
    assert (inside / "fresh").read_bytes() == b"a\n"
    assert fsio.unlink_name(inside, "ledger") and (outside / "secret").exists()  # the link goes, not the target


def test_folder_lock_is_exclusive_creates_nothing_and_waits(tmp_path):
    before = folder_state(tmp_path)
    with fsio.folder_lock(tmp_path):
        with pytest.raises(BusyError, match="another mcmc-unlearner process"):
            with fsio.folder_lock(tmp_path):
                pass
        t0 = time.monotonic()
        with pytest.raises(BusyError, match=r"still busy after 0\.3 s"):
            with fsio.folder_lock(tmp_path, wait=0.3):
                pass
        assert time.monotonic() - t0 >= 0.3
    assert folder_state(tmp_path) == before  # no lock file
    got = []

    def holder() -> None:
        with fsio.folder_lock(tmp_path):
            got.append("held")
            time.sleep(0.4)

    t = threading.Thread(target=holder)
    t.start()
    while not got:
        time.sleep(0.01)
    with fsio.folder_lock(tmp_path, wait=10):  # waits for the holder to finish
        pass
    t.join()
    with pytest.raises(FileNotFoundError):
        with fsio.folder_lock(tmp_path / "missing"):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        with fsio.folder_lock(tmp_path / "file"):
            pass
