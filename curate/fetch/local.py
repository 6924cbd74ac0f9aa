"""Local sources: plain paths (relative to the manifest's folder) and file:// URLs.

Local files are not copied into the cache; they are hashed so the lock file pins them too.
A folder (an ``outs/`` folder, say) is pinned by a tree digest: the sha256 of one line per
entry, in sorted order of relative POSIX paths, each line ``<path>\\0<size>\\0<sha256>`` for a
file, ``<path>\\0link\\0<target>`` for a symlink to a folder (not followed). The digest does
not depend on the order the file system lists entries in, nor on timestamps or permissions.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from stcorpus.curate.errors import FetchError

if TYPE_CHECKING:
    from stcorpus.curate.fetch.cache import Cache

TREE_DIGEST_VERSION: Final = "stcorpus-tree/1"
_SCHEME: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def local_path(url: str, *, base_dir: Path) -> Path:
    """The absolute path a local source names: ``file://`` URLs as is, plain paths from ``base_dir``."""
    match = _SCHEME.match(url)
    if match is None:
        path = Path(url)
        return (path if path.is_absolute() else base_dir / path).absolute()
    if match.group(1).lower() != "file":
        raise FetchError(f"{url!r} is not a local path or file:// URL")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise FetchError(
            f"{url!r}: file:// URLs with a host ({parts.netloc}) are not supported; mount the share and use a path"
        )
    path = Path(url2pathname(unquote(parts.path)))
    return (path if path.is_absolute() else base_dir / path).absolute()


def tree_digest(folder: Path, *, cache: Cache) -> tuple[str, int]:
    """(digest, total bytes of the files) of a folder; file digests are memoised in the cache."""
    lines: list[tuple[str, str]] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for name in dirnames:
            path = here / name
            if path.is_symlink():
                rel = path.relative_to(folder).as_posix()
                lines.append((rel, f"{rel}\0link\0{path.readlink()}"))
        for name in filenames:
            path = here / name
            rel = path.relative_to(folder).as_posix()
            if not path.is_file():  # dangling link, socket, FIFO: nothing a reader can use
                raise FetchError(f"{path}: not a regular file (dangling link or special file) in local folder {folder}")
            size = path.stat().st_size
            total += size
            lines.append((rel, f"{rel}\0{size}\0{cache.local_sha256(path.absolute())}"))
    digest = hashlib.sha256(f"{TREE_DIGEST_VERSION}\n".encode())
    for _, line in sorted(lines):
        digest.update(line.encode("utf-8", errors="surrogateescape") + b"\n")
    return digest.hexdigest(), total
