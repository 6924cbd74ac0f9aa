"""Files that appear whole or not at all: write to a temporary name, fsync, rename, fsync the folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the platform allows it."""
    if os.name != "posix":  # pragma: no cover - Windows has no directory fsync
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the umask (0644 under the usual umask 022).

    ``tempfile.mkstemp`` creates files 0600; outputs written through it are set to this mode so a
    corpus's card and provenance are as readable as its shards (a web server, a shared folder).
    The umask is read from ``/proc`` where it can be (``os.umask`` must set it to read it, which
    is not safe next to threads creating files).
    """
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        status = ""  # not Linux: fall back to reading it with os.umask
    for line in status.splitlines():
        if line.startswith("Umask:"):
            return 0o666 & ~int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: Path, data: bytes, *, tmp_dir: Path | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a torn one.

    The temporary file is hidden (``.<name>.<random>.tmp``) and unique, so concurrent writers of the
    same path never share one; ``tmp_dir`` must be on the same filesystem as ``path``. The file gets
    :func:`default_file_mode` (not ``mkstemp``'s 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = tmp_dir if tmp_dir is not None else path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), default_file_mode())
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
