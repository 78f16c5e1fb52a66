"""File-system layer of the deletion service: confined, no-follow, atomic writes and the folder lock.

Every file of a model folder is addressed by a **plain name** inside the folder (no separators, no ``..``, no
absolute paths, no control characters; :func:`check_name`) and opened with ``O_NOFOLLOW`` (a symbolic link is
refused, never followed) and ``O_NONBLOCK`` (a FIFO or device cannot block the open), then checked to be a
regular file with ``fstat`` before a byte is read. Writes go to a fresh temporary file (``O_CREAT | O_EXCL``,
so a planted link cannot redirect them), are fsynced and renamed over the destination (``rename`` replaces a
link instead of following it), and the folder is fsynced. The two in-place writes (ledger append and
truncation) refuse files with other hard links, so nothing outside the folder can change through them.

**Lock.** Writers take an exclusive ``flock`` on the folder itself (its directory file descriptor): no lock
file is created, so a refused request leaves the folder listing unchanged and a planted ``.lock`` link is
never touched. The OS releases the lock when the process dies. Readers (``status``, ``verify``) take no lock;
they read a consistent snapshot instead (:func:`mcmc_unlearner.service.checkpoint.read_snapshot`).

**Test hook.** With the environment variable ``MCMC_UNLEARNER_SLOW_COMMIT=<seconds>`` every commit phase
prints ``[commit] <phase>`` on stderr and sleeps that long (:func:`phase`; ledger lines are then written in two
halves), so crash tests can kill the process inside each write window; ``MCMC_UNLEARNER_SLOW_PHASE=<phase>``
limits the sleep to that one phase. Never set them in production.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UnlearningError

__all__ = [
    "SLOW_COMMIT_ENV",
    "SLOW_PHASE_ENV",
    "BusyError",
    "CommittedInterrupt",
    "StoreError",
    "append_bytes",
    "atomic_write",
    "atomic_write_bytes",
    "check_name",
    "check_same_folder",
    "folder_lock",
    "fsync_dir",
    "list_names",
    "phase",
    "read_regular",
    "sha256_hex",
    "truncate_file",
    "unlink_name",
    "utc_now",
]

SLOW_COMMIT_ENV = "MCMC_UNLEARNER_SLOW_COMMIT"
SLOW_PHASE_ENV = "MCMC_UNLEARNER_SLOW_PHASE"

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f/\\]")


class StoreError(UnlearningError):
    """A model folder is missing pieces, corrupted, tampered with, or cannot hold the given objects."""


class BusyError(StoreError):
    """Another process holds the model folder's lock (retry later, or pass ``--wait SECONDS``)."""


class CommittedInterrupt(KeyboardInterrupt):
    """Ctrl-C after an update's commit point: the update is complete and in place (only tidying was cut short)."""


# ---------------------------------------------------------------------------------------------- small helpers
def utc_now() -> str:
    """Current UTC time, ISO 8601 with microseconds and a ``Z`` suffix."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data`` as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


def _slow() -> float:
    raw = os.environ.get(SLOW_COMMIT_ENV)
    if not raw:
        return 0.0
    try:
        return max(0.0, float(raw))
    except ValueError:
        return 0.0


def pause_for(name: str) -> float:
    """Seconds the test hook pauses at phase ``name`` (0 unless ``MCMC_UNLEARNER_SLOW_COMMIT`` is set)."""
    pause = _slow()
    only = os.environ.get(SLOW_PHASE_ENV)
    return pause if pause > 0 and (not only or only == name) else 0.0


def phase(name: str) -> None:
    """Test hook: announce a commit phase on stderr and pause (only with ``MCMC_UNLEARNER_SLOW_COMMIT``)."""
    if _slow() > 0:
        print(f"[commit] {name}", file=sys.stderr, flush=True)
        time.sleep(pause_for(name))


def check_name(name: object, what: str = "file name") -> str:
    """Return ``name`` if it is a plain file name inside a folder, else raise :class:`StoreError`.

    Plain: a non-empty string of at most 255 characters, not ``.`` or ``..``, without ``/``, ``\\``, NUL or
    other control characters (so neither absolute paths nor parent references can leave the folder).
    """
    if (
        not isinstance(name, str)
        or not name
        or len(name) > 255
        or name in (".", "..")
        or _BAD_NAME.search(name)
        or os.path.isabs(name)
    ):
        raise StoreError(
            f"{what} {ascii(name)[:80]} is not a plain file name inside the model folder (no separators, no '..', "
            "no absolute paths): the folder was tampered with; restore it from a backup"
        )
    return name


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _refuse_special(path: Path) -> None:
    """Refuse an existing entry that is a link or not a regular file, without opening it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise StoreError(
            f"{path} is a symbolic link; a model folder holds regular files only: replace the link by the file "
            "(or restore the folder from a backup)"
        )
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(
            f"{path} is not a regular file (a FIFO, device or folder); a model folder holds regular files only: "
            "restore the folder from a backup"
        )


def refuse_directory(root: Path, name: str, what: str) -> None:
    """Refuse a directory at ``root/name`` (not followed through a link: a link there is replaced, never its
    target), before anything is written: renaming a file over it, or unlinking it, failed with the raw
    ``IsADirectoryError`` (stop 56: ``save_model`` into a folder holding a directory at a state file's name)."""
    try:
        st = os.lstat(Path(root) / name)
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISDIR(st.st_mode):
        raise StoreError(
            f"{Path(root) / name} is a directory; remove or rename it: a model folder holds regular files only, "
            f"and {what}; nothing was changed"
        )


def _regular_fd(path: Path, flags: int, what: str) -> int:
    """Open ``path`` without following a final link and check that it is a regular file (returns the fd).

    The entry is checked with ``lstat`` first (a FIFO or device is never opened), then opened with
    ``O_NOFOLLOW | O_NONBLOCK`` and checked again with ``fstat`` (it cannot have been swapped in between).
    """
    _refuse_special(path)
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | _CLOEXEC, 0o644)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        _refuse_special(path)  # swapped for a link or FIFO since the check
        # the OS error stays the cause: a writer that rolls back tells a failed write by it (checkpoint.commit_update)
        raise StoreError(f"cannot open {what} {path}: {_os_reason(exc)}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(
                f"{path} is not a regular file (a FIFO, device or folder); a model folder holds regular files only: "
                "restore the folder from a backup"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(root: Path, name: str, *, what: str = "file", max_bytes: int | None = None) -> bytes:
    """Read the regular file ``root/name`` (confined name, no links followed, no blocking on FIFOs).

    Raises:
        FileNotFoundError: The file does not exist.
        StoreError: Bad name, a link, not a regular file, larger than ``max_bytes``, or unreadable.
    """
    path = Path(root) / check_name(name, what)
    fd = _regular_fd(path, os.O_RDONLY, what)
    try:
        size = os.fstat(fd).st_size
        if max_bytes is not None and size > max_bytes:
            raise StoreError(f"{path} is {size} bytes, more than the {max_bytes} bytes a {what} may have: refused")
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except OSError as exc:
                raise StoreError(f"cannot read {what} {path}: {_os_reason(exc)}") from None
            if not chunk:
                break
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                raise StoreError(f"{path} grew past the {max_bytes} bytes a {what} may have while it was read")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def list_names(root: Path) -> list[str]:
    """Names in the folder (nothing followed, sorted)."""
    return sorted(os.listdir(root))


# errors of a folder fsync that mean "not supported here" (some network and FUSE file systems), not a failed write
_FSYNC_UNSUPPORTED = frozenset(
    getattr(errno, n) for n in ("EINVAL", "ENOTSUP", "EOPNOTSUPP", "ENOSYS") if hasattr(errno, n)
)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder so a rename or new file in it survives a crash (no-op where unsupported).

    Raises:
        OSError: The folder could not be opened or its fsync failed (e.g. ``EIO``): the renames in it may not be
            on disk. Only a file system that does not support a folder fsync (``EINVAL``, ``ENOTSUP``) or a
            platform without folder descriptors (Windows) is passed over; until stop 58 every error was, so an I/O
            error right after a request's commit point went unreported while the docs promised a warning.
    """
    if os.name == "nt":  # pragma: no cover - no directory file descriptors
        return
    fd = os.open(folder, os.O_RDONLY | _CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def atomic_write(
    root: Path,
    name: str,
    data: bytes,
    *,
    hook: str | None = None,
    on_renaming: Callable[[], None] | None = None,
    on_replaced: Callable[[], None] | None = None,
) -> None:
    """Write ``root/name`` atomically: fresh temp file in the folder, fsync, rename over ``name``, fsync folder.

    A crash at any point leaves either the old file or the new one, never a mix. The temp file is created
    with ``O_EXCL | O_NOFOLLOW`` and the rename replaces a link at ``name`` rather than following it, so the
    write never lands outside the folder.

    Args:
        root: The folder.
        name: Plain file name inside it.
        data: Bytes to write.
        hook: Phase announced by the test hook (module docstring) once the temp file is durable.
        on_renaming: Called immediately before the rename over ``name`` (after the temp file is written): an error
            before it left ``name`` as it was for certain (e.g. ``EMFILE`` opening the temp file).
        on_replaced: Called as soon as the rename over ``name`` has returned (before the folder fsync), so that a
            caller can tell "the new file is in place" from "it is not" when a later step fails (between the two
            calls, the rename's outcome is unknown).
    """
    root = Path(root)
    name = check_name(name)
    refuse_directory(root, name, "a file is being written at that name")
    tmp = root / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if hook:
            phase(hook)
        if on_renaming is not None:
            on_renaming()
        os.replace(tmp, root / name)
        if on_replaced is not None:
            on_replaced()
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(root)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, hook: str | None = None) -> None:
    """:func:`atomic_write` addressed by a path (``path.parent`` is the folder, ``path.name`` the file)."""
    p = Path(path)
    atomic_write(p.parent, p.name, data, hook=hook)


def _single_link(fd: int, path: Path) -> None:
    if os.fstat(fd).st_nlink > 1:
        raise StoreError(
            f"{path} has other hard links (a hard-linked backup?); writing it in place would change them too: "
            "copy the folder (cp -r) instead of hard-linking it"
        )


def append_bytes(
    root: Path, name: str, data: bytes, *, pause: float = 0.0, on_half: Callable[[], None] | None = None
) -> None:
    """Append ``data`` to the regular file ``root/name`` (created if missing) and fsync it.

    Args:
        root: The folder.
        name: Plain file name inside it.
        data: Bytes to append.
        pause: Test hook: seconds to sleep between writing the two halves (widens the torn-write window).
        on_half: Test hook called after the first half is written.
    """
    root = Path(root)
    path = root / check_name(name)
    existed = os.path.lexists(path)
    fd = _regular_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "file")
    try:
        _single_link(fd, path)
        if pause > 0:
            half = len(data) // 2
            _write_all(fd, data[:half])
            os.fsync(fd)
            if on_half is not None:
                on_half()
            time.sleep(pause)
            data = data[half:]
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if not existed:
        fsync_dir(root)


def truncate_file(root: Path, name: str, size: int) -> None:
    """Cut the regular file ``root/name`` back to ``size`` bytes and fsync it."""
    path = Path(root) / check_name(name)
    fd = _regular_fd(path, os.O_RDWR, "file")
    try:
        _single_link(fd, path)
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_name(root: Path, name: str) -> bool:
    """Remove the entry ``root/name`` if it exists (a link is removed, never its target); True if removed."""
    try:
        os.unlink(Path(root) / check_name(name))
    except FileNotFoundError:
        return False
    return True


def check_same_folder(path: str | os.PathLike, ident: tuple[int, int] | None) -> None:
    """Refuse to go on when ``path`` no longer names the folder that was locked (``ident``: its device and inode,
    as :func:`folder_lock` yields them): the folder was moved, or replaced by another (a restored backup), while
    the request ran. Writing by path would then change a folder this process neither locked nor checked."""
    if ident is None:
        return
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is None or (st.st_dev, st.st_ino) != ident:
        raise StoreError(
            f"the model folder {str(path)!a} was moved or replaced while the request ran; nothing was changed: "
            "send the request again to the folder as it is now"
        )


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, *, wait: float = 0.0) -> Iterator[tuple[int, int] | None]:
    """Exclusive lock on a model folder for one writer (``flock`` on the folder's own file descriptor).

    Nothing is created in the folder. The OS releases the lock when the holder exits or is killed. Yields the
    locked folder's ``(st_dev, st_ino)`` (``None`` where there are no locks), for :func:`check_same_folder`: the
    lock holds the folder, not its path.

    Args:
        path: The model folder.
        wait: Seconds to wait for another writer to finish (0: fail at once).

    Raises:
        BusyError: Another process still holds the lock after ``wait`` seconds.
        FileNotFoundError / StoreError: The folder is missing or not a folder.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks
        yield None
        return
    root = Path(path)
    try:
        fd = os.open(root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(f"model folder {root} not found; save a model there first") from None
    except NotADirectoryError:
        raise StoreError(f"{root} is not a folder; model_dir takes the folder a model was saved into") from None
    except PermissionError:  # said "Permission denied: 'ro2'" alone (stop 46's probe)
        raise StoreError(
            f"cannot open the model folder {root}: permission denied; give this user read and execute permission "
            "on it (chmod u+rx); nothing was changed"
        ) from None
    try:
        deadline = time.monotonic() + max(0.0, wait)
        delay = 0.01
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    hint = "retry later or pass wait=SECONDS" if wait <= 0 else f"still busy after {wait:g} s"
                    raise BusyError(
                        f"another mcmc-unlearner process is writing to {root}; {hint} (nothing was changed)"
                    ) from None
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.25)
            except OSError as exc:  # e.g. a file system without flock on folders
                raise StoreError(f"cannot lock {root}: {_os_reason(exc)}; use a local file system") from None
        st = os.fstat(fd)
        yield (st.st_dev, st.st_ino)
    finally:
        os.close(fd)
