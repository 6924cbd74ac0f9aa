"""The one validation of loaded manifests that ``curate validate``, ``curate plan`` and ``curate build`` run.

Loading a manifest (``curate.manifest``) checks its structure: keys, types, required fields,
ids, URL schemes. This adds what needs the reader registry: source names each technology's
reader accepts, and reader options with their types (``image_fallback: 'no'`` is a string, not
``false``). A problem here is an error for all three commands; a technology that manifests may
declare but that has no reader yet is not: such slides are listed, and a build quarantines them
as ``no_reader``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stcorpus.curate.errors import ManifestError

if TYPE_CHECKING:
    from stcorpus.curate.manifest import Manifest, Sample

#: Problems listed in one error message; the rest are counted.
MAX_LISTED = 20


@dataclass
class ManifestCheck:
    """What :func:`check_manifests` found."""

    problems: list[str] = field(default_factory=list)  # each names the file, the entry and the field
    no_reader: dict[str, list[str]] = field(default_factory=dict)  # technology -> slide ids
    #: Local sources whose path does not exist: an error for ``curate validate``; ``plan`` lists them
    #: and a build fails those slides only (one slide never stops a build).
    missing_local: list[str] = field(default_factory=list)

    def no_reader_line(self) -> str | None:
        """``no reader yet (quarantined as no_reader by a build): xenium 3``, or None."""
        if not self.no_reader:
            return None
        counts = ", ".join(f"{tech} {len(ids):,}" for tech, ids in sorted(self.no_reader.items()))
        return f"no reader yet (a build quarantines these slides as no_reader): {counts}"


def check_manifests(manifests: Iterable[Manifest], *, holdout: Collection[str] = ()) -> ManifestCheck:
    """Check every sample's source names and reader options against its technology's reader, and
    its pinned ``split:`` against its group's and the holdout list (``holdout``: held-out slide ids)."""
    from stcorpus.curate.build.splits import group_of
    from stcorpus.curate.readers import READERS, check_sample

    found = ManifestCheck()
    pins: dict[str, tuple[str, Sample]] = {}
    for manifest in manifests:
        for sample in manifest.samples:
            found.problems.extend(_check_pin(sample, pins, group_of(sample), holdout))
            if sample.technology not in READERS:
                found.no_reader.setdefault(sample.technology, []).append(sample.id)
                continue
            found.problems.extend(check_sample(sample))
            found.missing_local.extend(_missing_local(sample))
    return found


def _missing_local(sample: Sample) -> list[str]:
    """Each local source of ``sample`` whose path does not exist, said with the path it resolved to."""
    from stcorpus.curate.errors import FetchError
    from stcorpus.curate.fetch.local import local_path

    missing = []
    for name, source in sorted(sample.sources.items()):
        if not source.is_local:
            continue
        try:
            path = local_path(source.url, base_dir=sample.base_dir)
        except FetchError:
            continue  # the fetch says why
        if not path.exists():
            missing.append(
                f"{sample.describe()}: source {name!r}: {path} does not exist (a relative path is read from the "
                "manifest's folder); fix the path in `sources`"
            )
    return missing


def _check_pin(sample: Sample, pins: dict[str, tuple[str, Sample]], group: str, holdout: Collection[str]) -> list[str]:
    if sample.split is None:
        return []
    problems = []
    if sample.id in holdout and sample.split != "test":
        problems.append(
            f"{sample.describe()}: field 'split': {sample.split!r}, but the slide is on the benchmark holdout "
            "list, so it may only be pinned to 'test' (or pass --holdout none to train on benchmark slides "
            "knowingly)"
        )
    previous = pins.setdefault(group, (sample.split, sample))
    if previous[0] != sample.split:
        problems.append(
            f"{sample.describe()}: field 'split': {sample.split!r}, but slide {previous[1].id!r} of the same "
            f"group ({group}) is pinned to {previous[0]!r}; pin every slide of one patient alike"
        )
    return problems


def require_valid(manifests: Iterable[Manifest], *, holdout: Collection[str] = ()) -> ManifestCheck:
    """:func:`check_manifests`, raising a ``ManifestError`` that lists the problems if there are any."""
    found = check_manifests(manifests, holdout=holdout)
    if found.problems:
        listed = found.problems[:MAX_LISTED]
        more = len(found.problems) - len(listed)
        raise ManifestError(
            "\n".join(listed)
            + (f"\n... and {more:,} more problem(s)" if more else "")
            + "\n(`curate validate MANIFEST...` lists every problem; fix them in the manifest)"
        )
    return found
