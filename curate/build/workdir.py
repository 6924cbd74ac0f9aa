"""The build's work folder: one finished unit per slide, written atomically, read by the pack.

Layout (``<out>/.work/`` by default)::

    build.json                       which manifests this work folder builds (``BuildRecord``)
    units/<slide_id>/result.json     what happened: status, reason, slide row, QC, mapping, tiles
    units/<slide_id>/samples.arrow   the slide's samples (Arrow IPC, uncompressed: memory-mapped by pack;
                                     schema ``unit_sample_schema``)
    units/<slide_id>/qc/*.png        the slide's QC plots (thumbnail with spots, patch montage)
    units/<slide_id>/stats.arrow     what the QC report needs of the samples (total counts, genes per
                                     sample), left when the pack released samples.arrow
    pack.json                        the streaming pack's checkpoint (``pack.StreamPack``)

A unit is written into ``units/.<slide_id>.<pid>.tmp/`` and renamed into place in one step, so a
unit folder that exists is complete: a build killed at any moment leaves at most a temporary
folder, which the next run deletes. A unit is reused only when its ``unit_key`` (the settings and
the resolved manifest entry, see ``curate.build.unit.unit_key``) matches and its recorded inputs
are still the sources' bytes; a unit written in another work format is not reused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from stcorpus import schema
from stcorpus.curate.atomic import fsync_dir, write_atomic

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import pyarrow as pa

#: stcorpus-unit/2: ``unit_key`` (settings + resolved manifest entry), reader drops, failure details.
UNIT_FORMAT: Final = "stcorpus-unit/2"
RESULT_FILE: Final = "result.json"
SAMPLES_FILE: Final = "samples.arrow"
#: What is left of a unit's samples once they are packed (``WorkDir.release_samples``).
STATS_FILE: Final = "stats.arrow"
STATS_COLUMNS: Final = ("total_counts", "n_genes")
#: The streaming pack's checkpoint (``pack.StreamPack``): rewritten after every committed shard.
CHECKPOINT_FILE: Final = "pack.json"
QC_SUBDIR: Final = "qc"
BUILD_RECORD_FILE: Final = "build.json"

UnitStatus = Literal["built", "quarantined", "failed"]

#: The unit's key column (the shards' is ``schema.KEY_COLUMN``); its images and expression lists
#: carry the shards' names (``schema.PATCH_COLUMN``, ``schema.Expr``).
UNIT_KEY: Final = "key"
UNIT_IMAGES: Final = (schema.PATCH_COLUMN, schema.REGION_COLUMN)
UNIT_LISTS: Final = tuple(e.value for e in schema.Expr)
#: Metadata fields a unit stores per sample; the others come from the slide (and the split).
UNIT_SAMPLE_FIELDS: Final = (
    "barcode",
    "x_um",
    "y_um",
    "array_row",
    "array_col",
    schema.POS,
    schema.NEIGHBORS,
    schema.N_NEIGHBORS,
    "total_counts",
    "n_genes",
    "outside_fraction",
)


def unit_sample_schema(counts_dtype: str) -> pa.Schema:
    """Arrow schema of a unit's ``samples.arrow`` (gene indices are local to the slide)."""
    import pyarrow as pa

    counts = pa.list_(pa.int32() if counts_dtype == "int32" else pa.float32())
    meta_types = {f.name: schema._arrow_type(f.arrow) for f in schema.META_FIELDS}
    return pa.schema(
        [
            (UNIT_KEY, pa.string()),
            *((name, pa.binary()) for name in UNIT_IMAGES),
            (schema.Expr.GENES.value, pa.list_(pa.int32())),
            (schema.Expr.COUNTS.value, counts),
            (schema.Expr.NICHE_GENES.value, pa.list_(pa.int32())),
            (schema.Expr.NICHE_COUNTS.value, counts),
            *((name, meta_types[name]) for name in UNIT_SAMPLE_FIELDS),
        ]
    )


@dataclass
class UnitResult:
    """What one slide's work unit produced (``result.json``)."""

    slide_id: str
    status: UnitStatus  # built; quarantined (bad data, not retried); failed (e.g. network, retried next run)
    settings_digest: str  # of the settings alone (UnitSettings.digest)
    unit_key: str = ""  # the unit's identity: settings + resolved manifest entry (unit.unit_key)
    reason: str = ""  # "<code>: <message>" when not built (every failed check when several failed)
    failures: list[str] = field(default_factory=list)  # quarantine codes of every failed check / exception type
    error: dict[str, Any] = field(default_factory=dict)  # failed on an exception: type, message, stage, files
    slide: dict[str, Any] = field(default_factory=dict)  # the slides.parquet row, less corpus-level fields
    qc: list[dict[str, Any]] = field(default_factory=list)
    mapping: dict[str, Any] = field(default_factory=dict)  # the gene mapping report
    tiles: dict[str, Any] = field(default_factory=dict)  # tile counts and rejections
    gene_ids: list[str] = field(default_factory=list)  # measured Ensembl ids (local gene index -> id)
    counts_dtype: str = "int32"
    n_samples: int = 0
    sample_bytes: int = 0  # total bytes of the samples' images + expression, for shard sizing
    inputs: list[dict[str, Any]] = field(default_factory=list)  # name, url, sha256, size of each source
    content_digest: str = ""  # fingerprint of the counts (and image), for deduplication
    dropped_spots: dict[str, int] = field(default_factory=dict)  # spots the reader dropped, by SpotDrop reason
    seconds: float = 0.0
    format: str = UNIT_FORMAT

    @property
    def spots_rejected(self) -> dict[str, int]:
        """Every spot read but not written, by reason: the reader's drops and the build's rejections."""
        rejected = {reason: int(n) for reason, n in self.dropped_spots.items() if n}
        for reason, n in (self.tiles.get("rejected") or {}).items():
            if n:
                rejected[reason] = rejected.get(reason, 0) + int(n)
        return dict(sorted(rejected.items()))

    def to_json(self) -> str:
        """Deterministic JSON text (sorted keys; ``seconds`` is the only run-dependent field)."""
        return json.dumps(asdict(self), sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> UnitResult:
        """Parse ``result.json`` text."""
        data = json.loads(text)
        if data.get("format") != UNIT_FORMAT:
            raise ValueError(f"not a {UNIT_FORMAT} result (format {data.get('format')!r})")
        return cls(**data)


class WorkDir:
    """The units of a build, keyed by slide id."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.units = root / "units"

    def prepare(self) -> int:
        """Create the folders and delete temporaries left by a killed run; return how many were deleted."""
        self.units.mkdir(parents=True, exist_ok=True)
        stale = [p for p in self.units.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return len(stale)

    def unit_dir(self, slide_id: str) -> Path:
        """The folder of a finished unit."""
        return self.units / slide_id

    def stamp(self, slide_id: str) -> tuple[int, int] | None:
        """Which commit of the slide's unit is in place (its result file's inode and mtime), or None.

        A commit moves a new folder into place, so a stamp that changed means a new commit.
        """
        try:
            stat = (self.unit_dir(slide_id) / RESULT_FILE).stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    def result(self, slide_id: str) -> UnitResult | None:
        """The finished unit of a slide, or None (also for a unit of an older work format: it is rebuilt)."""
        path = self.unit_dir(slide_id) / RESULT_FILE
        if not path.is_file():
            return None
        text = path.read_text(encoding="utf-8")
        if json.loads(text).get("format") != UNIT_FORMAT:
            return None
        return UnitResult.from_json(text)

    def reusable(self, slide_id: str, unit_key: str, *, need_samples: bool = True) -> UnitResult | None:
        """The finished unit of a slide if it has this identity and need not be retried (not ``failed``).

        A built unit whose samples the pack released counts only without ``need_samples`` (the
        pack, which knows it packed them). Whether its inputs are still the sources' bytes is for
        the caller to check (``unit.reusable_unit``).
        """
        result = self.result(slide_id)
        if result is None or result.unit_key != unit_key or result.status == "failed":
            return None
        if need_samples and result.status == "built" and result.n_samples and not self.has_samples(slide_id):
            return None
        return result

    def begin(self, slide_id: str) -> Path:
        """A fresh temporary folder to write a unit into.

        Named after the slide, the host, the process and a random token: on a cluster a worker
        presumed lost may still be writing while its replacement (possibly with the same pid on
        another host) starts, and neither may delete the other's folder.
        """
        tmp = self.units / f".{slide_id}.{_writer_tag()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, result: UnitResult) -> Path:
        """Write ``result.json`` into ``tmp`` and move the folder into place atomically."""
        (tmp / RESULT_FILE).write_text(result.to_json(), encoding="utf-8")
        for path in tmp.rglob("*"):
            if path.is_file():
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
        final = self.unit_dir(result.slide_id)
        if final.exists():
            # Replace an outdated unit: move it aside first so `final` is never half old, half new.
            old = self.units / f".{result.slide_id}.{_writer_tag()}.old.tmp"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        fsync_dir(self.units)
        return final

    def samples(self, slide_id: str) -> pa.Table:
        """The samples of a built unit, memory-mapped (no copy into RAM)."""
        import pyarrow as pa

        # Not closed here: the table's buffers point into the map, which lives as long as they do.
        source = pa.memory_map(str(self.unit_dir(slide_id) / SAMPLES_FILE), "r")
        return pa.ipc.open_file(source).read_all()

    def has_samples(self, slide_id: str) -> bool:
        """Whether a unit's samples are still on disk (the pack deletes them once packed)."""
        return (self.unit_dir(slide_id) / SAMPLES_FILE).is_file()

    def release_samples(self, slide_id: str) -> int:
        """Delete a packed unit's ``samples.arrow``, keeping its QC statistics; returns the bytes freed.

        The result and QC plots stay: the unit is still the slide's record (reused by the next
        build of the same inputs, read by the QC report).
        """
        import pyarrow as pa

        folder = self.unit_dir(slide_id)
        path = folder / SAMPLES_FILE
        if not path.is_file():
            return 0
        size = path.stat().st_size
        stats = self.samples(slide_id).select(list(STATS_COLUMNS))
        tmp = folder / f".{STATS_FILE}.{_writer_tag()}.tmp"
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, stats.schema) as writer:
            writer.write_table(stats)
        tmp.replace(folder / STATS_FILE)
        path.unlink()
        return size

    def histograms(self, slide_id: str) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.integer]]:
        """Total counts and detected genes of a built unit's samples, for the QC report."""
        import pyarrow as pa

        if self.has_samples(slide_id):
            table = self.samples(slide_id)
        else:
            table = pa.ipc.open_file(pa.memory_map(str(self.unit_dir(slide_id) / STATS_FILE), "r")).read_all()
        return table.column("total_counts").to_numpy(), table.column("n_genes").to_numpy()

    def results(self) -> Iterator[UnitResult]:
        """Every finished unit (of this work format), by slide id."""
        if not self.units.is_dir():
            return
        for path in sorted(self.units.iterdir()):
            if not path.name.startswith("."):
                result = self.result(path.name)
                if result is not None:
                    yield result

    def remove_units(self) -> None:
        """Delete every unit (``curate build --overwrite``: the folder built another corpus)."""
        shutil.rmtree(self.units, ignore_errors=True)
        self.record_path.unlink(missing_ok=True)
        (self.root / CHECKPOINT_FILE).unlink(missing_ok=True)  # the shards it described are gone

    @property
    def record_path(self) -> Path:
        """``build.json``: the manifests this work folder builds."""
        return self.root / BUILD_RECORD_FILE

    def record(self) -> BuildRecord | None:
        """What ``write_record`` wrote, or None for a fresh (or pre-record) work folder."""
        try:
            data = json.loads(self.record_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return BuildRecord(name=data.get("name"), manifests=tuple(data.get("manifests") or ()))

    def write_record(self, record: BuildRecord) -> None:
        """Say which manifests this work folder builds (checked by the next build into it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.record_path, (json.dumps(asdict(record), indent=1, sort_keys=True) + "\n").encode())


@dataclass(frozen=True)
class BuildRecord:
    """The identity of a build, for refusing to replace another corpus: its manifests' names.

    Names, not digests: editing a manifest (a fixed URL, a new slide) is the same build resumed,
    and only the slides whose entries changed are rebuilt.
    """

    name: str | None
    manifests: tuple[str, ...]


def _writer_tag() -> str:
    import socket
    import uuid

    host = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_samples(path: Path, table: pa.Table) -> None:
    """Write a unit's samples as an uncompressed Arrow IPC file (random access for the pack)."""
    import pyarrow as pa

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=4096)


def settings_digest(settings: Mapping[str, Any]) -> str:
    """A stable digest of the settings that change what a unit contains."""
    import hashlib

    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
