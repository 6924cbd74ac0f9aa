"""Advisory file locks that serialise work on one cache entry across threads and processes.

Used by the fetch cache (``curate fetch``) and the loader's shard cache. ``flock`` locks belong
to an open file description, so two threads of one process that each open the lock file
exclude each other just as two processes do. The lock files stay in ``locks/`` (deleting a lock
file while another process waits on it would split the lock).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


@contextmanager
def file_lock(path: Path, *, what: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    ``what`` is said in the debug log when the lock is busy (another thread or process is
    downloading or unpacking the same thing).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path=path, what=what)
        try:
            yield
        finally:
            _release(fd)
    finally:
        os.close(fd)


def try_lock(path: Path) -> int | None:
    """Take the exclusive lock on ``path`` if nobody holds it: the open descriptor, else None.

    For work that may as well be skipped when another thread or process is doing it; release
    with :func:`unlock`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if _try_acquire(fd):
        return fd
    os.close(fd)
    return None


def unlock(fd: int) -> None:
    """Release a lock taken with :func:`try_lock` (or :func:`wait_lock`) and close its descriptor."""
    try:
        _release(fd)
    finally:
        os.close(fd)


def wait_lock(path: Path, *, what: str = "") -> int:
    """Take the exclusive lock on ``path``, waiting for it; the open descriptor (release with :func:`unlock`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path=path, what=what)
    except BaseException:
        os.close(fd)
        raise
    return fd


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _acquire(fd: int, *, path: Path, what: str) -> None:
        waited = False
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return
            except OSError:
                if not waited:
                    logger.debug("waiting for %s (locked: %s)", what or path.name, path)
                    waited = True
                time.sleep(0.1)

    def _try_acquire(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _release(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _acquire(fd: int, *, path: Path, what: str) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.debug("waiting for %s (locked by another thread or process: %s)", what or path.name, path)
            fcntl.flock(fd, fcntl.LOCK_EX)

    def _try_acquire(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _release(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
