"""The one validation of loaded manifests that ``curate validate``, ``curate plan`` and ``curate build`` run.

Loading a manifest (``curate.manifest``) checks its structure: keys, types, required fields,
ids, URL schemes. This adds what needs the reader registry: source names each technology's
reader accepts, and reader options with their types (``image_fallback: 'no'`` is a string, not
``false``). A problem here is an error for all three commands; a technology that manifests may
declare but that has no reader yet is not: such slides are listed, and a build quarantines them
as ``no_reader``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stcorpus.curate.errors import ManifestError

if TYPE_CHECKING:
    from stcorpus.curate.manifest import Manifest

#: Problems listed in one error message; the rest are counted.
MAX_LISTED = 20


@dataclass
class ManifestCheck:
    """What :func:`check_manifests` found."""

    problems: list[str] = field(default_factory=list)  # each names the file, the entry and the field
    no_reader: dict[str, list[str]] = field(default_factory=dict)  # technology -> slide ids

    def no_reader_line(self) -> str | None:
        """``no reader yet (quarantined as no_reader by a build): xenium 3``, or None."""
        if not self.no_reader:
            return None
        counts = ", ".join(f"{tech} {len(ids):,}" for tech, ids in sorted(self.no_reader.items()))
        return f"no reader yet (a build quarantines these slides as no_reader): {counts}"


def check_manifests(manifests: Iterable[Manifest]) -> ManifestCheck:
    """Check every sample's source names and reader options against its technology's reader."""
    from stcorpus.curate.readers import READERS, check_sample

    found = ManifestCheck()
    for manifest in manifests:
        for sample in manifest.samples:
            if sample.technology not in READERS:
                found.no_reader.setdefault(sample.technology, []).append(sample.id)
                continue
            found.problems.extend(check_sample(sample))
    return found


def require_valid(manifests: Iterable[Manifest]) -> ManifestCheck:
    """:func:`check_manifests`, raising a ``ManifestError`` that lists the problems if there are any."""
    found = check_manifests(manifests)
    if found.problems:
        listed = found.problems[:MAX_LISTED]
        more = len(found.problems) - len(listed)
        raise ManifestError(
            "\n".join(listed)
            + (f"\n... and {more:,} more problem(s)" if more else "")
            + "\n(`curate validate MANIFEST...` lists every problem; fix them in the manifest)"
        )
    return found
