"""Lock files: what every source of a manifest resolved to (URL as written, size, sha256).

``<manifest-stem>.lock.json`` beside the manifest by default::

    {
     "format": "stcorpus-lock/1",
     "manifest": {"file": "demo.yaml", "name": "demo", "sha256": "..."},
     "complete": true,
     "sources": [
      {"sample": "A1", "source": "matrix", "url": "https://...", "size": 123, "sha256": "...",
       "kind": "file", "commit": null},
      ...
     ]
    }

Entries are sorted by (sample, source) and there is no timestamp, so fetching the same
manifest twice writes the same bytes. ``complete`` says whether every source of every sample
of the manifest has an entry (a run with failures, or with ``--samples``, may leave gaps; a
later run fills them, keeping the entries of samples it did not fetch as long as the manifest
has not changed).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from stcorpus.curate.atomic import write_atomic
from stcorpus.curate.errors import FetchError

if TYPE_CHECKING:
    from stcorpus.curate.fetch.fetcher import Fetched
    from stcorpus.curate.manifest import Manifest

LOCK_FORMAT: Final = "stcorpus-lock/1"


@dataclass(frozen=True)
class LockEntry:
    """One source of one sample, as fetched."""

    sample: str
    source: str
    url: str
    size: int
    sha256: str
    kind: Literal["file", "folder"]
    commit: str | None = None

    @classmethod
    def from_fetched(cls, fetched: Fetched, *, sample: str, source: str) -> LockEntry:
        """The entry for a ``Fetched`` result (archives are pinned by the archive's bytes)."""
        return cls(
            sample=sample,
            source=source,
            url=fetched.url,
            size=fetched.size,
            sha256=fetched.sha256,
            kind="folder" if fetched.is_folder else "file",
            commit=fetched.commit,
        )


def default_lock_path(manifest_path: Path) -> Path:
    """``<manifest-stem>.lock.json`` beside the manifest."""
    return manifest_path.with_name(f"{manifest_path.stem}.lock.json")


def read_lock(path: Path) -> dict[str, Any]:
    """A lock file's content (checked for its format)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FetchError(f"{path}: cannot read lock file: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != LOCK_FORMAT:
        raise FetchError(f"{path}: not a {LOCK_FORMAT} lock file")
    return data


def write_lock(path: Path, *, manifest: Manifest, entries: Iterable[LockEntry], fetched_samples: Iterable[str]) -> bool:
    """Write the lock file of ``manifest`` atomically; return whether it is complete.

    ``entries`` are this run's results for the samples in ``fetched_samples``; entries of other
    samples are kept from an existing lock file of the same manifest bytes.
    """
    wanted = {(s.id, name): src.url for s in manifest.samples for name, src in s.sources.items()}
    refreshed = set(fetched_samples)
    merged: dict[tuple[str, str], Mapping[str, Any]] = {}
    if path.exists():
        try:
            previous = read_lock(path)
        except FetchError:
            previous = {}
        if previous.get("manifest", {}).get("sha256") == manifest.sha256:
            for item in previous.get("sources", []):
                key = (item.get("sample"), item.get("source"))
                if key in wanted and key[0] not in refreshed and wanted[key] == item.get("url"):
                    merged[key] = item
    for entry in entries:
        merged[(entry.sample, entry.source)] = asdict(entry)
    complete = set(wanted) <= set(merged)
    payload = {
        "format": LOCK_FORMAT,
        "manifest": {"file": manifest.path.name, "name": manifest.name, "sha256": manifest.sha256},
        "complete": complete,
        "sources": [dict(sorted(merged[key].items())) for key in sorted(merged)],
    }
    write_atomic(path, (json.dumps(payload, indent=1, sort_keys=False) + "\n").encode("utf-8"))
    return complete


def lock_sources(manifest_path: Path) -> dict[str, tuple[str, int]]:
    """``{url: (sha256, size)}`` from the lock file beside a manifest; empty when there is none.

    What ``curate fetch`` saw at each URL: a build uses it to pin inputs by content, to size them
    for ``--cache-budget`` and to verify mirrors before anything is downloaded.
    """
    path = default_lock_path(manifest_path)
    try:
        info = path.stat()
    except FileNotFoundError:
        return {}
    return dict(_lock_sources(path, info.st_mtime_ns, info.st_size))


@functools.lru_cache(maxsize=16)
def _lock_sources(path: Path, mtime_ns: int, size: int) -> tuple[tuple[str, tuple[str, int]], ...]:
    """What ``lock_sources`` reads, memoised per version of the file (a build asks once per source)."""
    del mtime_ns, size  # part of the memo's key only
    found: dict[str, tuple[str, int]] = {}
    for item in read_lock(path).get("sources", []):
        if item.get("kind") == "file" and isinstance(item.get("sha256"), str) and isinstance(item.get("size"), int):
            found[str(item["url"])] = (item["sha256"], item["size"])
    return tuple(sorted(found.items()))
