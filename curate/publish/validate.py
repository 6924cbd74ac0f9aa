"""What a publish would send, and whether it may: the corpus's files, hashed, and every problem found.

``scan_corpus`` lists the files of a corpus folder that belong on a Hub repository or an fsspec
target: everything but hidden paths (``.work/``, ``.x.partial``, ``.git/``) and temporary
files, each with its size, sha256 and git blob id (the Hub compares small files by blob id,
large ones by sha256; both come from one read of the file).

``check_corpus`` then holds the folder to the data contract and lists *every* problem rather
than stopping at the first, so a user fixes them in one round:

- ``corpus.json``: JSON, the schema id this code knows, the provenance keys, split counts equal
  to ``shards.parquet``'s, ``formats`` (both where absent) the formats ``shards.parquet`` lists;
- ``shards.parquet``: every shard present with the recorded size and sha256, no shard file on
  disk missing from it, the formats it holds (one or both) holding the same number of samples
  per split;
- ``README.md``: a YAML header that parses, ``configs`` whose data files exist, ``dataset_info``
  counts equal to ``shards.parquet``'s for the format the card describes (Parquet where the
  corpus has it, else WebDataset);
- ``slides.parquet`` / ``genes.parquet``: present and readable, consistent with the shards and
  ``corpus.json``;
- no build work folder (``units/*/result.json``) under a visible name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final

from stcorpus import schema

#: Keys ``corpus.json`` must hold (what ``curate build`` writes and readers rely on).
REQUIRED_CORPUS_KEYS: Final = (
    "schema",
    "name",
    "tool",
    "tool_version",
    "counts_dtype",
    "n_genes",
    "vocabulary_sha256",
    "splits",
    "manifests",
    "sources",
    "settings",
)
#: Suffixes of files being written (``curate build``'s atomic writes, editors, downloads).
TEMPORARY_SUFFIXES: Final = (".partial", ".tmp", ".temp", ".lock", "~")
#: The Hub's limits on files per repository and per folder (CORPUS.md section 2).
HUB_MAX_FILES: Final = 100_000
HUB_MAX_FILES_PER_FOLDER: Final = 10_000

#: Largest file the Hub keeps in plain git; bigger ones are always LFS/Xet (compared by sha256), so
#: their git blob id is never needed -- and skipping it nearly doubles the hashing speed.
GIT_BLOB_MAX: Final = 10 << 20
_CHUNK: Final = 4 << 20


@dataclass(frozen=True)
class LocalFile:
    """One file of the corpus folder as it would be published."""

    path: str  # relative, POSIX separators
    size: int
    sha256: str
    git_oid: str  # git blob id: sha1 of b"blob <size>\\0" + content ("" above GIT_BLOB_MAX)
    mtime_ns: int = 0  # when it was hashed, to notice a file rewritten before it is sent
    #: Bytes sent instead of the file's (the card naming its Hub repository); size and digests are theirs.
    content: bytes | None = None
    disk_size: int | None = None  # the file's own size when ``content`` replaces it

    def with_content(self, content: bytes) -> LocalFile:
        """This file published as ``content`` (its size and digests become those of ``content``)."""
        sha256, oid = hash_bytes(content)
        return LocalFile(
            path=self.path,
            size=len(content),
            sha256=sha256,
            git_oid=oid,
            mtime_ns=self.mtime_ns,
            content=content,
            disk_size=self.disk_size if self.content is not None else self.size,
        )

    @property
    def top(self) -> str:
        """The first component of the path (``wds``, ``parquet``, ``qc``, or the file's own name)."""
        return self.path.split("/", 1)[0]


@dataclass
class CorpusScan:
    """The files of a corpus folder and what was left out of them."""

    root: Path
    files: dict[str, LocalFile] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # hidden and temporary paths (never published)

    @property
    def total_bytes(self) -> int:
        """Bytes of every file to publish."""
        return sum(f.size for f in self.files.values())


def hash_file(path: Path, *, size: int | None = None) -> tuple[str, str]:
    """``(sha256, git blob id)`` of a file, from one read; the blob id is "" above ``GIT_BLOB_MAX``."""
    size = path.stat().st_size if size is None else size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\x00" % size, usedforsecurity=False) if size <= GIT_BLOB_MAX else None
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest() if sha1 is not None else ""


def hash_bytes(data: bytes) -> tuple[str, str]:
    """``(sha256, git blob id)`` of ``data`` (the blob id is "" above ``GIT_BLOB_MAX``)."""
    sha1 = hashlib.sha1(b"blob %d\x00" % len(data) + data, usedforsecurity=False) if len(data) <= GIT_BLOB_MAX else None
    return hashlib.sha256(data).hexdigest(), sha1.hexdigest() if sha1 is not None else ""


def check_unchanged(root: Path, file: LocalFile) -> None:
    """Refuse to send a file that changed after it was validated (a build still writing into the folder)."""
    from stcorpus.curate.errors import PublishError

    stat = (root / file.path).stat()
    size = file.disk_size if file.content is not None and file.disk_size is not None else file.size
    if stat.st_size != size or (file.mtime_ns and stat.st_mtime_ns != file.mtime_ns):
        raise PublishError(
            f"{file.path} changed after it was validated (is a build still writing to {root}?); publish again"
        )


def is_skipped(relative: PurePosixPath) -> bool:
    """True for paths never published: hidden components (``.work``, ``.git``) and temporary files."""
    return any(part.startswith(".") for part in relative.parts) or relative.name.endswith(TEMPORARY_SUFFIXES)


def list_corpus_files(root: Path) -> tuple[list[PurePosixPath], list[str]]:
    """Relative paths of the files to publish (sorted) and of the skipped ones (hidden folders once)."""
    keep: list[PurePosixPath] = []
    skipped: list[str] = []
    for folder, dirs, names in os.walk(root):
        here = PurePosixPath(Path(folder).relative_to(root).as_posix())
        for name in sorted(dirs):
            if name.startswith("."):
                skipped.append(f"{(here / name).as_posix()}/")
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            relative = here / name if here != PurePosixPath(".") else PurePosixPath(name)
            if is_skipped(relative):
                skipped.append(relative.as_posix())
            elif (Path(folder) / name).is_file():
                keep.append(relative)
    return sorted(keep), sorted(s.removeprefix("./") for s in skipped)


def scan_corpus(root: Path, *, jobs: int = 4, progress: Callable[[int], None] | None = None) -> CorpusScan:
    """Hash every file of ``root`` that a publish would send (``jobs`` files at a time).

    ``progress`` is called with each file's size once it is hashed.
    """
    paths, skipped = list_corpus_files(root)

    def one(relative: PurePosixPath) -> LocalFile:
        path = root / relative
        stat = path.stat()
        sha256, oid = hash_file(path, size=stat.st_size)
        if progress is not None:
            progress(stat.st_size)
        return LocalFile(
            path=relative.as_posix(), size=stat.st_size, sha256=sha256, git_oid=oid, mtime_ns=stat.st_mtime_ns
        )

    scan = CorpusScan(root=root, skipped=skipped)
    # hashlib releases the GIL on large buffers: threads hash files in parallel.
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for item in pool.map(one, paths):
            scan.files[item.path] = item
    return scan


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def split_front_matter(text: str) -> tuple[str | None, str]:
    """``(yaml header, body)`` of a dataset card; the header is None when the card has none."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        return None, text
    for i in range(1, len(lines)):
        if lines[i].strip() == "---":
            return "".join(lines[1:i]), "".join(lines[i + 1 :])
    return None, text


def _read_parquet(path: Path, problems: list[str]) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        problems.append(f"{path.name}: not a readable Parquet file ({exc}); rebuild the corpus with `curate build`")
        return None


def _shard_counts(rows: Sequence[Mapping[str, Any]], fmt: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for row in rows:
        if row.get("format") == fmt:
            counts[str(row.get("split"))] += int(row.get("n_samples") or 0)
    return counts


def _check_shards(scan: CorpusScan, problems: list[str]) -> list[dict[str, Any]] | None:
    path = scan.root / schema.SHARDS_FILE
    if not path.is_file():
        problems.append(f"{schema.SHARDS_FILE} is missing: the shard index is part of the corpus (rebuild it)")
        return None
    table = _read_parquet(path, problems)
    if table is None:
        return None
    missing_columns = [c for c in schema.SHARD_COLUMNS if c not in table.column_names]
    if missing_columns:
        problems.append(f"{schema.SHARDS_FILE} lacks the columns {', '.join(missing_columns)}")
        return None
    rows: list[dict[str, Any]] = table.to_pylist()
    indexed: set[str] = set()
    for row in rows:
        rel = str(row["path"])
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or rel.startswith("/"):
            problems.append(f"{schema.SHARDS_FILE}: shard path {rel!r} is not a path inside the corpus")
            continue
        if rel in indexed:
            problems.append(f"{schema.SHARDS_FILE}: shard {rel} is listed twice")
        indexed.add(rel)
        if row["format"] not in schema.FORMATS or not rel.startswith(f"{row['format']}/"):
            problems.append(f"{schema.SHARDS_FILE}: shard {rel} has format {row['format']!r}")
        local = scan.files.get(rel)
        if local is None:
            problems.append(f"shard {rel} is listed in {schema.SHARDS_FILE} but missing from the folder")
            continue
        if local.size != row["bytes"]:
            problems.append(
                f"shard {rel}: {local.size:,} bytes on disk, {row['bytes']:,} in {schema.SHARDS_FILE} "
                "(truncated or rewritten after the build)"
            )
        if local.sha256 != row["sha256"]:
            problems.append(
                f"shard {rel}: sha256 {local.sha256} on disk, {row['sha256']} in {schema.SHARDS_FILE} "
                "(corrupted or rewritten after the build; rebuild it with `curate build`)"
            )
    for rel, local in scan.files.items():
        if local.top in (schema.WDS_DIR, schema.PARQUET_DIR) and rel not in indexed:
            problems.append(
                f"{rel} is a shard file missing from {schema.SHARDS_FILE} (left over from another build? "
                "delete it or rebuild)"
            )
    wds, parquet = _shard_counts(rows, "wds"), _shard_counts(rows, "parquet")
    if wds and parquet and wds != parquet:
        problems.append(
            f"{schema.SHARDS_FILE}: the WebDataset and Parquet shards hold different numbers of samples "
            f"(wds {dict(wds)}, parquet {dict(parquet)})"
        )
    return rows


def _check_corpus_json(
    scan: CorpusScan, shards: Sequence[Mapping[str, Any]] | None, problems: list[str]
) -> dict[str, Any] | None:
    path = scan.root / schema.CORPUS_FILE
    if not path.is_file():
        problems.append(f"{schema.CORPUS_FILE} is missing: a corpus without provenance is not published")
        return None
    try:
        corpus = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{schema.CORPUS_FILE} is not valid JSON: {exc}")
        return None
    if not isinstance(corpus, dict):
        problems.append(f"{schema.CORPUS_FILE} holds a {type(corpus).__name__}, not an object")
        return None
    if corpus.get("schema") != schema.SCHEMA_ID:
        problems.append(
            f"{schema.CORPUS_FILE}: schema {corpus.get('schema')!r}, but this stcorpus writes and reads "
            f"{schema.SCHEMA_ID!r} (publish it with the stcorpus version that built it, or rebuild)"
        )
    missing = [key for key in REQUIRED_CORPUS_KEYS if key not in corpus]
    if missing:
        problems.append(f"{schema.CORPUS_FILE} lacks the provenance keys {', '.join(missing)}")
    try:
        formats = schema.corpus_formats(corpus)
    except ValueError as exc:
        problems.append(f"{schema.CORPUS_FILE}: {exc}")
    else:
        listed = {str(row.get("format")) for row in shards or ()}
        if shards and listed != set(formats):
            problems.append(
                f"{schema.CORPUS_FILE}: formats {list(formats)}"
                + (" (no key: both)" if schema.CorpusKey.FORMATS.value not in corpus else "")
                + f" but {schema.SHARDS_FILE} lists {sorted(listed)} shards"
            )
    splits = corpus.get("splits")
    if shards is not None and isinstance(splits, dict):
        for fmt in schema.FORMATS:
            counts = _shard_counts(shards, fmt)
            if counts and dict(counts) != {str(k): int(v) for k, v in splits.items() if v}:
                problems.append(
                    f"{schema.CORPUS_FILE}: splits {splits} but the {fmt} shards in {schema.SHARDS_FILE} hold "
                    f"{dict(counts)}"
                )
    return corpus


def _config_entries(header: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = header.get(key)
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, Mapping)]
    return []


def _data_file_patterns(config: Mapping[str, Any]) -> list[tuple[str | None, str]]:
    """``(split, pattern)`` of a ``configs`` entry's ``data_files`` (string, list or split mapping)."""
    data_files = config.get("data_files")
    out: list[tuple[str | None, str]] = []
    items: Iterable[Any] = data_files if isinstance(data_files, list) else [data_files]
    for item in items:
        if isinstance(item, str):
            out.append((None, item))
        elif isinstance(item, Mapping):
            paths = item.get("path")
            for pattern in paths if isinstance(paths, list) else [paths]:
                if isinstance(pattern, str):
                    out.append((str(item["split"]) if item.get("split") else None, pattern))
    return out


def _matches(scan: CorpusScan, pattern: str) -> list[str]:
    if pattern.startswith("/") or ".." in PurePosixPath(pattern).parts:
        return []
    found = []
    for path in scan.root.glob(pattern):
        relative = path.relative_to(scan.root).as_posix()
        if relative in scan.files:
            found.append(relative)
    return found


def _check_card(
    scan: CorpusScan,
    shards: Sequence[Mapping[str, Any]] | None,
    problems: list[str],
    *,
    corpus: Mapping[str, Any] | None = None,
) -> None:
    import yaml

    from stcorpus.curate.build.card import card_format

    path = scan.root / schema.CARD_FILE
    if not path.is_file():
        problems.append(f"{schema.CARD_FILE} (the dataset card) is missing")
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{schema.CARD_FILE}: cannot read it as UTF-8 text: {exc}")
        return
    front, _ = split_front_matter(text)
    if front is None:
        problems.append(f"{schema.CARD_FILE} has no YAML header between '---' lines (configs, dataset_info)")
        return
    try:
        header = yaml.safe_load(front)
    except yaml.YAMLError as exc:
        problems.append(f"{schema.CARD_FILE}: the YAML header does not parse: {exc}")
        return
    if not isinstance(header, dict):
        problems.append(f"{schema.CARD_FILE}: the YAML header is a {type(header).__name__}, not a mapping")
        return
    configs = _config_entries(header, "configs")
    if not configs:
        problems.append(f"{schema.CARD_FILE}: no `configs` in the YAML header, so `load_dataset` cannot find the data")
    for config in configs:
        name = config.get("config_name", "default")
        patterns = _data_file_patterns(config)
        if not patterns:
            problems.append(f"{schema.CARD_FILE}: config {name!r} has no data_files")
        for split, pattern in patterns:
            if not _matches(scan, pattern):
                where = f" (split {split})" if split else ""
                problems.append(f"{schema.CARD_FILE}: config {name!r}{where}: data_files {pattern!r} match no file")
    if shards is None:
        return
    try:
        fmt = card_format(schema.corpus_formats(corpus or {}))
    except ValueError:
        fmt = "parquet"  # _check_corpus_json reports the malformed key
    parquet = [s for s in shards if s.get("format") == fmt]
    examples = _shard_counts(parquet, fmt)
    shown = {"parquet": "Parquet", "wds": "WebDataset"}[fmt]
    nbytes: Counter[str] = Counter()
    for s in parquet:
        nbytes[str(s["split"])] += int(s["bytes"])
    infos = _config_entries(header, "dataset_info")
    if not infos:
        problems.append(f"{schema.CARD_FILE}: no `dataset_info` (exact sample counts per split) in the YAML header")
    for info in infos:
        name = info.get("config_name", "default")
        splits = info.get("splits") or []
        seen: dict[str, Mapping[str, Any]] = {
            str(s.get("name")): s for s in splits if isinstance(s, Mapping) and s.get("name")
        }
        if set(seen) != set(examples):
            problems.append(
                f"{schema.CARD_FILE}: dataset_info {name!r} lists splits {sorted(seen)}, {schema.SHARDS_FILE} "
                f"has {shown} shards for {sorted(examples)}"
            )
        for split, entry in seen.items():
            if split not in examples:
                continue
            if entry.get("num_examples") != examples[split]:
                problems.append(
                    f"{schema.CARD_FILE}: dataset_info {name!r} split {split}: num_examples "
                    f"{entry.get('num_examples')} but {schema.SHARDS_FILE} counts {examples[split]} samples"
                )
            if "num_bytes" in entry and entry.get("num_bytes") != nbytes[split]:
                problems.append(
                    f"{schema.CARD_FILE}: dataset_info {name!r} split {split}: num_bytes {entry.get('num_bytes')} "
                    f"but the {shown} shards in {schema.SHARDS_FILE} hold {nbytes[split]} bytes"
                )


def _check_tables(
    scan: CorpusScan,
    shards: Sequence[Mapping[str, Any]] | None,
    corpus: Mapping[str, Any] | None,
    problems: list[str],
) -> None:
    slides_path, genes_path = scan.root / schema.SLIDES_FILE, scan.root / schema.GENES_FILE
    if not slides_path.is_file():
        problems.append(f"{schema.SLIDES_FILE} is missing: every slide's licence and status must travel with the data")
    else:
        slides = _read_parquet(slides_path, problems)
        if slides is not None:
            if "slide_id" not in slides.column_names or "status" not in slides.column_names:
                problems.append(f"{schema.SLIDES_FILE} lacks the slide_id/status columns")
            elif shards is not None:
                status = dict(
                    zip(slides.column("slide_id").to_pylist(), slides.column("status").to_pylist(), strict=True)
                )
                in_shards = sorted({s for row in shards for s in (row.get("slide_ids") or [])})
                unknown = [s for s in in_shards if status.get(s) != "built"]
                if unknown:
                    problems.append(
                        f"{schema.SLIDES_FILE}: slides {', '.join(unknown[:10])} have samples in the shards but no "
                        "'built' row"
                    )
    if not genes_path.is_file():
        problems.append(f"{schema.GENES_FILE} is missing: the gene indices in the shards mean nothing without it")
    else:
        genes = _read_parquet(genes_path, problems)
        n_genes = corpus.get("n_genes") if corpus else None
        if genes is not None and isinstance(n_genes, int) and genes.num_rows != n_genes:
            problems.append(f"{schema.GENES_FILE} has {genes.num_rows} genes, {schema.CORPUS_FILE} says {n_genes}")


def _check_layout(scan: CorpusScan, problems: list[str], *, hub: bool) -> None:
    work = sorted(
        {
            rel.split("/units/", 1)[0] if "/units/" in rel else "."
            for rel in scan.files
            if PurePosixPath(rel).name == "result.json" and "units" in PurePosixPath(rel).parts[:-2]
        }
    )
    if work:
        problems.append(
            f"{', '.join(work)}: a build work folder (units/*/result.json) is not part of a corpus; move it out or "
            "give it a hidden name (the default is .work/)"
        )
    if not hub:
        return
    if len(scan.files) > HUB_MAX_FILES:
        problems.append(f"{len(scan.files):,} files: the Hub takes at most {HUB_MAX_FILES:,} per repository")
    folders = Counter(str(PurePosixPath(rel).parent) for rel in scan.files)
    for folder, n in sorted(folders.items()):
        if n > HUB_MAX_FILES_PER_FOLDER:
            problems.append(
                f"{folder}/ holds {n:,} files: the Hub takes at most {HUB_MAX_FILES_PER_FOLDER:,} per folder "
                "(rebuild with larger shards)"
            )


def check_corpus(scan: CorpusScan, *, hub: bool = False) -> list[str]:
    """Every problem that forbids publishing the scanned corpus (empty when it may be published).

    ``hub``: also hold the folder to the Hub's file-count limits.
    """
    problems: list[str] = []
    if not scan.files:
        return [f"{scan.root} holds no file to publish"]
    shards = _check_shards(scan, problems)
    corpus = _check_corpus_json(scan, shards, problems)
    _check_card(scan, shards, problems, corpus=corpus)
    _check_tables(scan, shards, corpus, problems)
    _check_layout(scan, problems, hub=hub)
    return problems
