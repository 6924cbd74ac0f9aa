"""The corpus contract ``stcorpus/2``: every name, type and layout both wings agree on.

This module is the single place where ``curate`` (which writes corpora), ``loaders`` (which read
them) and ``training`` (which consumes loader batches) agree on what a corpus is. Its prose is
``CORPUS.md`` in the design notes; the README of every built corpus repeats the parts a reader
needs. What it holds:

- sample keys (``sample_key`` / ``parse_key``);
- a sample's WebDataset members (``Member``), its Parquet columns (``SAMPLE_COLUMNS``,
  ``sample_arrow_schema``) and metadata fields (``META_FIELDS``: ``pos``, ``neighbors``,
  ``n_neighbors``, ...), and the expression arrays (``Expr``: genes, counts and the niche fields);
- the views (``View``): tile size in px and um/px of the patch and the region, written to
  ``corpus.json`` under ``views`` by the build and read from there by the loader and training
  (never assumed: ``corpus_views``);
- the shard formats (``FORMATS``) and which of them a corpus holds (``corpus_formats``: ``corpus.json``
  ``formats``);
- the keys of ``corpus.json`` (``CorpusKey``), and the column types of ``slides.parquet``
  (``SLIDE_TYPES``), ``shards.parquet`` (``SHARD_TYPES``) and ``genes.parquet`` (``GENE_TYPES``);
- the batch a loader yields (``Batch``, ``BATCH_DTYPES``): names, dtypes and the sparse layout of
  the expression.

A sample is one spot. In a WebDataset shard it is four tar members sharing the key
``<slide_id>__<barcode>``::

    <key>.patch.jpg    RGB JPEG, ``views.patch`` px at its um/px (224 px at 0.5 um/px by default)
    <key>.region.jpg   RGB JPEG, ``views.region``; the patch sits in 3x3 cell ``pos``
    <key>.expr.npz     ``genes`` (sorted vocabulary indices) + ``counts``, and the same for the
                       summed in-tissue lattice neighbours (``niche_*``); stored (not deflated),
                       each array in the smallest dtype that holds the corpus's values
                       (``corpus.json`` ``expression``; schema 1 wrote int32 throughout)
    <key>.json         metadata (``META_FIELDS``)

In a Parquet shard it is one row with the same content in flat columns (``SAMPLE_COLUMNS``), the
two images as the ``datasets`` Image feature (a struct of ``bytes`` and ``path``). Expression
columns are ``list<int32>`` (counts ``list<float32>`` for a corpus with non-integer sources),
stored compactly by per-leaf Parquet encodings (``curate/shards.py`` says which).

Schema 2 against 1: compact expression in both formats; ``views`` and ``expression`` in
``corpus.json``; ``generation`` in ``shards.parquet``; ``array_row``/``array_col`` may be null
(cell-level data). A loader of schema 2 reads schema 1 (``READABLE_SCHEMAS``); a frozen copy of
each sits in ``tests/data/``.

A corpus holds both formats unless it was built with ``curate build --formats`` naming one:
``corpus.json`` ``formats`` lists the formats it holds (in ``FORMATS`` order), and
``shards.parquet`` lists only their shards. The key is optional within schema 2: a corpus written
before it existed (no key) holds both (``corpus_formats``), so its absence changes no reader.

Nothing here imports heavy libraries at module import; Arrow schemas are built on demand.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import pyarrow as pa

SCHEMA_NAME: Final = "stcorpus"
SCHEMA_VERSION: Final = 2
SCHEMA_ID: Final = f"{SCHEMA_NAME}/{SCHEMA_VERSION}"
#: Schemas the loader of this version reads (the writer writes only ``SCHEMA_ID``).
READABLE_SCHEMAS: Final = (f"{SCHEMA_NAME}/1", SCHEMA_ID)

# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------

KEY_SEPARATOR: Final = "__"

#: Slide ids are ours (set in manifests), so they are held to a strict alphabet: no dots
#: (WebDataset splits a member name at the first dot), no slashes, no double underscore
#: (the key separator), and they start with a letter or digit.
SLIDE_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]|_(?!_))*$")

# Barcodes come from sources (``AAACAAGTATCTCCCA-1``, ST's ``10x13`` or ``10.5x13.2``), so
# they are escaped: every character outside this set becomes ``%XX`` (its UTF-8 bytes).
_BARCODE_SAFE: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+")


class SampleKeyError(ValueError):
    """A slide id or key that does not follow the key format."""


def check_slide_id(slide_id: str) -> str:
    """Return ``slide_id`` if it is a valid slide id, else raise with what is wrong."""
    if not SLIDE_ID_PATTERN.match(slide_id):
        raise SampleKeyError(
            f"slide id {slide_id!r} is not allowed: use letters, digits, '-' and single '_' only "
            "(no '.', '/', spaces or '__'), starting with a letter or digit"
        )
    return slide_id


def escape_barcode(barcode: str) -> str:
    """Escape a source barcode for use in a key (``10.5x3`` -> ``10%2E5x3``); reversible."""
    if barcode and all(c in _BARCODE_SAFE for c in barcode):
        return barcode  # the common case (10x barcodes), no allocation per character
    out: list[str] = []
    for char in barcode:
        if char in _BARCODE_SAFE:
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8"))
    return "".join(out)


def unescape_barcode(escaped: str) -> str:
    """Invert :func:`escape_barcode`."""
    if "%" not in escaped:
        return escaped
    raw = bytearray()
    i = 0
    while i < len(escaped):
        if escaped[i] == "%":
            raw.append(int(escaped[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(escaped[i].encode("utf-8"))
            i += 1
    return raw.decode("utf-8")


def sample_key(slide_id: str, barcode: str) -> str:
    """The key of the spot ``barcode`` of slide ``slide_id``: ``<slide_id>__<barcode>``.

    >>> sample_key("TENX95", "AAACAAGTATCTCCCA-1")
    'TENX95__AAACAAGTATCTCCCA-1'
    >>> sample_key("GSE1_GSM2", "10.5x3")
    'GSE1_GSM2__10%2E5x3'
    """
    if not barcode:
        raise SampleKeyError(f"empty barcode in slide {slide_id!r}")
    return f"{check_slide_id(slide_id)}{KEY_SEPARATOR}{escape_barcode(barcode)}"


def parse_key(key: str) -> tuple[str, str]:
    """Split a key into ``(slide_id, barcode)``, undoing the barcode escape."""
    slide_id, sep, escaped = key.partition(KEY_SEPARATOR)
    if not sep or not escaped:
        raise SampleKeyError(f"{key!r} is not a sample key of the form '<slide_id>{KEY_SEPARATOR}<barcode>'")
    return check_slide_id(slide_id), unescape_barcode(escaped)


# ---------------------------------------------------------------------------------------------
# Samples: WebDataset members and Parquet columns
# ---------------------------------------------------------------------------------------------


class Member(str, Enum):
    """Tar member suffixes of one sample (the part after ``<key>.``)."""

    PATCH = "patch.jpg"
    REGION = "region.jpg"
    EXPR = "expr.npz"
    META = "json"


class Expr(str, Enum):
    """Arrays inside ``expr.npz`` and the matching Parquet list columns."""

    GENES = "genes"  # sorted vocabulary indices with a non-zero count
    COUNTS = "counts"  # raw counts (integers; float32 for a corpus with non-integer sources)
    NICHE_GENES = "niche_genes"  # sorted, genes non-zero in the summed neighbours
    NICHE_COUNTS = "niche_counts"  # summed raw counts of the in-tissue lattice neighbours


KEY_COLUMN: Final = "__key__"
PATCH_COLUMN: Final = "patch"
REGION_COLUMN: Final = "region"
#: Metadata names the loader reads beside the images and the expression.
POS: Final = "pos"
NEIGHBORS: Final = "neighbors"
N_NEIGHBORS: Final = "n_neighbors"
SLIDE_ID: Final = "slide_id"
#: The niche fields: the summed expression of the in-tissue neighbours and how many they are.
NICHE_FIELDS: Final = (Expr.NICHE_GENES.value, Expr.NICHE_COUNTS.value, N_NEIGHBORS)

#: Number of cells of the region grid (3x3); ``pos`` is row-major in ``range(REGION_GRID**2)``.
REGION_GRID: Final = 3


@dataclass(frozen=True)
class Field:
    """One metadata field: its name, Arrow type name and meaning."""

    name: str
    arrow: str  # one of: string, int32, int64, float32, float64, list<string>, list<int32>
    doc: str


#: The ``json`` member of a sample and the flat metadata columns of a Parquet row, in order.
#: Every field may be null where the source does not give it (``array_row``/``array_col`` for
#: cell-level data, ``organ`` where a manifest leaves it out).
META_FIELDS: Final[tuple[Field, ...]] = (
    Field(SLIDE_ID, "string", "slide id (unique in the corpus)"),
    Field("barcode", "string", "spot barcode as the source gives it"),
    Field("study_id", "string", "study the slide belongs to"),
    Field("split", "string", "train / validation / test"),
    Field("species", "string", "human or mouse"),
    Field("organ", "string", "organ, as the manifest names it"),
    Field("technology", "string", "source format the slide was read from (spaceranger, hest, stimage)"),
    Field("assay", "string", "measurement platform (visium, visium-hd, xenium, st)"),
    Field("x_um", "float64", "spot centre, micrometres from the image's left edge"),
    Field("y_um", "float64", "spot centre, micrometres from the image's top edge"),
    Field("array_row", "int32", "lattice row of the spot (null for cell-level data)"),
    Field("array_col", "int32", "lattice column of the spot (null for cell-level data)"),
    Field(POS, "int32", "cell 0..8 (row-major) of the 3x3 region grid holding the patch"),
    Field(NEIGHBORS, "list<string>", "keys of the in-tissue lattice neighbours"),
    Field(N_NEIGHBORS, "int32", "number of in-tissue lattice neighbours summed into niche_*"),
    Field("total_counts", "float64", "sum of the spot's counts over the vocabulary"),
    Field("n_genes", "int32", "number of genes with a non-zero count"),
    Field("outside_fraction", "float32", "fraction of the patch that lay outside the image (padded white)"),
)
META_FIELD_NAMES: Final = tuple(f.name for f in META_FIELDS)

#: Parquet columns of a sample, in order.
SAMPLE_COLUMNS: Final = (
    KEY_COLUMN,
    PATCH_COLUMN,
    REGION_COLUMN,
    *(e.value for e in Expr),
    *META_FIELD_NAMES,
)

#: Corpus-wide Arrow/Parquet types of ``counts`` and ``niche_counts``.
COUNT_DTYPES: Final = ("int32", "float32")
#: numpy dtypes an ``expr.npz`` array may have (schema 2 picks the smallest that holds the values).
TAR_INDEX_DTYPES: Final = ("uint16", "uint32", "int32")
TAR_COUNT_DTYPES: Final = ("uint8", "uint16", "uint32", "int32", "float32")


def smallest_uint(max_value: int) -> str:
    """The smallest unsigned numpy dtype name that holds ``0..max_value``.

    >>> smallest_uint(255), smallest_uint(256), smallest_uint(70_000)
    ('uint8', 'uint16', 'uint32')
    """
    if max_value < 0:
        raise ValueError(f"negative value {max_value} cannot be stored unsigned")
    for name, limit in (("uint8", 0xFF), ("uint16", 0xFFFF), ("uint32", 0xFFFFFFFF)):
        if max_value <= limit:
            return name
    raise ValueError(f"{max_value} does not fit 32 bits")


@dataclass(frozen=True)
class TarDtypes:
    """The numpy dtypes of the ``expr.npz`` arrays of a corpus (``corpus.json`` ``expression``).

    One choice per corpus, not per sample: ``datasets`` infers a tar dataset's features from its
    first samples, so every sample must agree.
    """

    genes: str = "int32"
    counts: str = "int32"
    niche_counts: str = "int32"

    def __post_init__(self) -> None:
        if self.genes not in TAR_INDEX_DTYPES:
            raise ValueError(f"tar gene index dtype must be one of {TAR_INDEX_DTYPES}, not {self.genes!r}")
        for name in (self.counts, self.niche_counts):
            if name not in TAR_COUNT_DTYPES:
                raise ValueError(f"tar count dtype must be one of {TAR_COUNT_DTYPES}, not {name!r}")

    @classmethod
    def smallest(
        cls, *, n_genes: int, max_count: float, max_niche_count: float, counts_dtype: str = "int32"
    ) -> TarDtypes:
        """The smallest dtypes for a vocabulary of ``n_genes`` and the corpus's largest counts."""
        genes = "uint16" if n_genes <= 1 << 16 else "uint32"
        if counts_dtype == "float32":
            return cls(genes=genes, counts="float32", niche_counts="float32")
        return cls(genes=genes, counts=smallest_uint(int(max_count)), niche_counts=smallest_uint(int(max_niche_count)))

    def record(self) -> dict[str, str]:
        """The ``corpus.json`` ``expression`` entry."""
        return {
            Expr.GENES.value: self.genes,
            Expr.COUNTS.value: self.counts,
            Expr.NICHE_GENES.value: self.genes,
            Expr.NICHE_COUNTS.value: self.niche_counts,
        }


def arrow_type(name: str) -> pa.DataType:
    """The Arrow type of a type name of this module (``int32``, ``list<string>``, ...)."""
    import pyarrow as pa

    if name.startswith("list<") and name.endswith(">"):
        return pa.list_(arrow_type(name[5:-1]))
    if name.startswith("map<") and name.endswith(">"):
        key, _, value = name[4:-1].partition(",")
        return pa.map_(arrow_type(key.strip()), arrow_type(value.strip()))
    return pa.type_for_alias(name)


_arrow_type = arrow_type  # the name the build used before it was public


def image_arrow_type() -> pa.DataType:
    """The Arrow type of a ``datasets`` Image column: ``struct<bytes: binary, path: string>``."""
    import pyarrow as pa

    return pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def expression_list_type(dtype: str) -> pa.DataType:
    """``list<element: dtype not null>``: the Arrow type of an expression column of a Parquet shard."""
    import pyarrow as pa

    return pa.list_(pa.field("element", arrow_type(dtype), nullable=False))


def sample_arrow_schema(counts_dtype: str = "int32") -> pa.Schema:
    """Arrow schema of a Parquet sample shard, with the ``datasets`` features in its metadata."""
    import json

    import pyarrow as pa

    if counts_dtype not in COUNT_DTYPES:
        raise ValueError(f"counts dtype must be one of {COUNT_DTYPES}, not {counts_dtype!r}")
    fields = [
        pa.field(KEY_COLUMN, pa.string(), nullable=False),
        pa.field(PATCH_COLUMN, image_arrow_type()),
        pa.field(REGION_COLUMN, image_arrow_type()),
        # Required lists of required values: Parquet then stores no definition levels for them,
        # which reads a quarter faster (every sample has the lists, empty at worst).
        pa.field(Expr.GENES.value, expression_list_type("int32"), nullable=False),
        pa.field(Expr.COUNTS.value, expression_list_type(counts_dtype), nullable=False),
        pa.field(Expr.NICHE_GENES.value, expression_list_type("int32"), nullable=False),
        pa.field(Expr.NICHE_COUNTS.value, expression_list_type(counts_dtype), nullable=False),
        *(pa.field(f.name, arrow_type(f.arrow)) for f in META_FIELDS),
    ]
    metadata = {
        "huggingface": json.dumps({"info": {"features": hf_sample_features(counts_dtype)}}),
        "stcorpus": SCHEMA_ID,
    }
    return pa.schema(fields, metadata=metadata)


def _hf_value(arrow: str) -> dict[str, Any]:
    if arrow.startswith("list<"):
        return {"feature": _hf_value(arrow[5:-1]), "_type": "List"}
    return {"dtype": arrow, "_type": "Value"}


def hf_sample_features(counts_dtype: str = "int32") -> dict[str, Any]:
    """The ``datasets`` Features (as JSON) of a Parquet sample row."""
    features: dict[str, Any] = {
        KEY_COLUMN: {"dtype": "string", "_type": "Value"},
        PATCH_COLUMN: {"_type": "Image"},
        REGION_COLUMN: {"_type": "Image"},
        Expr.GENES.value: _hf_value("list<int32>"),
        Expr.COUNTS.value: _hf_value(f"list<{counts_dtype}>"),
        Expr.NICHE_GENES.value: _hf_value("list<int32>"),
        Expr.NICHE_COUNTS.value: _hf_value(f"list<{counts_dtype}>"),
    }
    for f in META_FIELDS:
        features[f.name] = _hf_value(f.arrow)
    return features


# ---------------------------------------------------------------------------------------------
# Views: tile size and um/px, recorded in corpus.json
# ---------------------------------------------------------------------------------------------

VIEW_NAMES: Final = (PATCH_COLUMN, REGION_COLUMN)


@dataclass(frozen=True)
class View:
    """One image view of the samples: its tile side in px and its resolution in um/px."""

    name: str
    size_px: int
    mpp: float

    @property
    def field_um(self) -> float:
        """Side of the field of view in micrometres."""
        return self.size_px * self.mpp

    def record(self) -> dict[str, Any]:
        """This view as its ``corpus.json`` ``views`` entry."""
        return {"size_px": self.size_px, "mpp": self.mpp}


#: The views of schema 1, whose corpus.json did not record them (CORPUS.md section 2).
SCHEMA1_VIEWS: Final = {
    PATCH_COLUMN: View(PATCH_COLUMN, 224, 0.5),
    REGION_COLUMN: View(REGION_COLUMN, 224, 1.5),
}
#: The views ``curate build`` cuts unless told otherwise (``--patch-size``, ``--patch-mpp``, ...):
#: schema 1's. Readers never assume them: they read each corpus's own (:func:`corpus_views`).
DEFAULT_VIEWS: Final = dict(SCHEMA1_VIEWS)


def views_record(views: Mapping[str, View]) -> dict[str, dict[str, Any]]:
    """The ``corpus.json`` ``views`` value: ``{"patch": {"size_px": 224, "mpp": 0.5}, ...}``."""
    return {name: views[name].record() for name in VIEW_NAMES if name in views}


def corpus_views(info: Mapping[str, Any]) -> dict[str, View]:
    """The views of a corpus from its ``corpus.json`` (``info``).

    Schema 2 records them under ``views``. A schema 1 corpus built by ``curate build`` has them in
    ``settings.tiles``; one that has neither holds the schema 1 contract's 224 px at 0.5 / 1.5 um/px.
    """
    recorded = info.get(CorpusKey.VIEWS.value)
    if isinstance(recorded, Mapping) and recorded:
        views = {}
        for name, entry in recorded.items():
            if name not in VIEW_NAMES or not isinstance(entry, Mapping):
                raise ValueError(f"corpus.json views: unknown view {name!r} (views are {VIEW_NAMES})")
            size, mpp = entry.get("size_px"), entry.get("mpp")
            if not isinstance(size, int) or size < 1 or not isinstance(mpp, (int, float)) or mpp <= 0:
                raise ValueError(f"corpus.json views.{name}: size_px and mpp must be positive, got {dict(entry)}")
            views[name] = View(name, size, float(mpp))
        return views
    tiles = (info.get("settings") or {}).get("tiles") or {}
    if tiles:
        patch = View(PATCH_COLUMN, int(tiles["patch_size"]), float(tiles["patch_mpp"]))
        region_size = int(tiles.get("region_size") or patch.size_px)
        region_mpp = tiles.get("region_mpp") or REGION_GRID * patch.field_um / region_size
        return {PATCH_COLUMN: patch, REGION_COLUMN: View(REGION_COLUMN, region_size, float(region_mpp))}
    return dict(SCHEMA1_VIEWS)


# ---------------------------------------------------------------------------------------------
# Corpus layout
# ---------------------------------------------------------------------------------------------

CARD_FILE: Final = "README.md"
CORPUS_FILE: Final = "corpus.json"
GENES_FILE: Final = "genes.parquet"
SLIDES_FILE: Final = "slides.parquet"
SHARDS_FILE: Final = "shards.parquet"
QC_DIR: Final = "qc"
WDS_DIR: Final = "wds"
PARQUET_DIR: Final = "parquet"

SPLITS: Final = ("train", "validation", "test")
FORMATS: Final = ("parquet", "wds")


class CorpusKey(str, Enum):
    """Keys of ``corpus.json`` that readers rely on (the build writes more: provenance)."""

    SCHEMA = "schema"  # SCHEMA_ID of the writer
    NAME = "name"
    N_GENES = "n_genes"  # rows of genes.parquet
    COUNTS_DTYPE = "counts_dtype"  # COUNT_DTYPES: int32, or float32 when a source is not integer
    SPLITS = "splits"  # split -> number of samples
    VIEWS = "views"  # view -> {"size_px", "mpp"} (schema 2)
    EXPRESSION = "expression"  # expr.npz array -> numpy dtype (schema 2, TarDtypes.record)
    SAMPLES_PER_SHARD = "samples_per_shard"
    #: FORMATS the corpus holds, in FORMATS order (optional: absent, the corpus holds both)
    FORMATS = "formats"
    SETTINGS = "settings"  # the resolved build settings
    TOOL_VERSION = "tool_version"


#: Keys a corpus.json must have for a loader to open the corpus.
REQUIRED_CORPUS_KEYS: Final = (CorpusKey.SCHEMA.value, CorpusKey.N_GENES.value)


def corpus_formats(info: Mapping[str, Any]) -> tuple[str, ...]:
    """The shard formats a corpus holds, from its ``corpus.json`` (``info``), in ``FORMATS`` order.

    Corpora written before ``formats`` was recorded hold both.

    >>> corpus_formats({"formats": ["parquet"]})
    ('parquet',)
    >>> corpus_formats({})
    ('parquet', 'wds')
    """
    recorded = info.get(CorpusKey.FORMATS.value)
    if recorded is None:
        return FORMATS
    if (
        not isinstance(recorded, list)
        or not recorded
        or any(fmt not in FORMATS for fmt in recorded)
        or len(set(recorded)) != len(recorded)
    ):
        raise ValueError(f"corpus.json formats must be a non-empty list of {FORMATS}, not {recorded!r}")
    return tuple(fmt for fmt in FORMATS if fmt in recorded)


def shard_path(fmt: str, split: str, index: int) -> str:
    """Relative path of shard ``index`` of ``split`` in format ``fmt`` (``parquet`` or ``wds``).

    >>> shard_path("wds", "train", 3)
    'wds/train/train-000003.tar'
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
    if fmt == "wds":
        return f"{WDS_DIR}/{split}/{split}-{index:06d}.tar"
    if fmt == "parquet":
        return f"{PARQUET_DIR}/{split}/{split}-{index:06d}.parquet"
    raise ValueError(f"unknown shard format {fmt!r}; formats are {FORMATS}")


#: Columns of ``shards.parquet`` and their types: one row per shard file.
SHARD_TYPES: Final[dict[str, str]] = {
    "path": "string",  # relative to the corpus root, e.g. wds/train/train-000000.tar
    "format": "string",  # parquet | wds
    "split": "string",
    "generation": "int32",  # 0 for the first build; each append writes the next (schema 2)
    "index": "int32",  # shard number within its split and format
    "n_samples": "int64",
    "bytes": "int64",
    "sha256": "string",
    "first_key": "string",
    "last_key": "string",
    "slide_ids": "list<string>",  # slides with at least one sample in the shard
}
SHARD_COLUMNS: Final = tuple(SHARD_TYPES)

#: Columns of ``genes.parquet`` and their types: the vocabulary.
GENE_TYPES: Final[dict[str, str]] = {
    "index": "int32",  # dense from 0: the values of `genes` / `niche_genes`
    "ensembl_id": "string",  # ENSG... / ENSMUSG..., unversioned
    "symbol": "string",  # approved symbol where known
    "species": "string",  # human | mouse
    "biotype": "string",  # HGNC locus group / Ensembl biotype where known
    "human_ortholog": "int32",  # index of the one-to-one human ortholog in this vocabulary, else null
    "human_ortholog_id": "string",  # Ensembl id of that ortholog even when it is not in this vocabulary
    "panels": "list<string>",  # named gene panels the gene belongs to (e.g. human-protein-coding)
    # some built slide measured the gene (the vocabulary is the reference's, not the slides' union);
    # absent from corpora written before it existed, whose vocabulary was the union: every gene measured
    "measured": "bool",
}
GENE_COLUMNS: Final = tuple(GENE_TYPES)
#: Columns of ``genes.parquet`` a reader may find missing (older corpora), with what they mean then.
GENE_OPTIONAL_COLUMNS: Final[dict[str, object]] = {"measured": True}

#: Values of ``slides.parquet`` ``count_kind``.
COUNT_KINDS: Final = ("raw", "normalized")

#: Columns of ``slides.parquet`` and their types: one row per slide considered by the build.
#: Add a column here (name -> type) and both the build and the readers follow.
SLIDE_TYPES: Final[dict[str, str]] = {
    "slide_id": "string",
    "study_id": "string",
    "source": "string",
    "source_id": "string",
    "technology": "string",
    "assay": "string",
    "chemistry": "string",
    "species": "string",
    "organ": "string",
    "disease_state": "string",
    "oncotree_code": "string",
    "patient": "string",
    "preservation": "string",
    "count_kind": "string",  # COUNT_KINDS: what the slide's values are (the manifest's `counts`)
    "licence": "string",
    "distribution_licence": "string",  # licence of the distribution the files came from, when it adds terms
    "citation": "string",
    "mpp": "float64",
    "mpp_source": "string",
    "n_spots": "int64",  # in-tissue spots read (null when nothing could be read)
    "n_spots_written": "int64",
    # spots read but not written, by reason: the reader's drops (SpotDrop) and the build's
    "spots_rejected": "map<string,int64>",
    "measured_genes": "list<int32>",
    "mapping_rate": "float64",
    "status": "string",  # built | quarantined | excluded | duplicate | failed
    "qc_flags": "list<string>",
    "reason": "string",
    "reason_codes": "list<string>",  # the code of every reason the slide was not built (every failed check), in order
    "split": "string",
    "duplicate_of": "string",
}
SLIDE_COLUMNS: Final = tuple(SLIDE_TYPES)


def table_arrow_schema(types: Mapping[str, str]) -> pa.Schema:
    """An Arrow schema from a name -> type table of this module, tagged with ``SCHEMA_ID``."""
    import pyarrow as pa

    return pa.schema([(name, arrow_type(t)) for name, t in types.items()], metadata={"stcorpus": SCHEMA_ID})


def slides_arrow_schema() -> pa.Schema:
    """The Arrow schema of ``slides.parquet`` (``SLIDE_TYPES``)."""
    return table_arrow_schema(SLIDE_TYPES)


def shards_arrow_schema() -> pa.Schema:
    """The Arrow schema of ``shards.parquet`` (``SHARD_TYPES``)."""
    return table_arrow_schema(SHARD_TYPES)


# ---------------------------------------------------------------------------------------------
# Batches: what the torch loader yields and training consumes
# ---------------------------------------------------------------------------------------------


class Batch(str, Enum):
    """Entries of a loader batch (a plain dict; ``loaders/batch.py`` documents the shapes).

    Expression travels sparse from the loader's workers (``genes``/``counts``/``offsets``: the
    raw counts of sample ``b`` are ``counts[offsets[b]:offsets[b + 1]]`` at vocabulary indices
    ``genes[...]``); the gene transform turns it into the dense or token entries where the batch
    is consumed (on the GPU in training). ``genes.output: dense`` does that in the workers.
    """

    KEY = "key"
    SLIDE_ID = "slide_id"
    PATCH = "patch"
    REGION = "region"
    PATCH_JPEG = "patch_jpeg"  # decode: nvjpeg: the JPEG bytes of the batch, concatenated
    PATCH_JPEG_OFFSETS = "patch_jpeg_offsets"
    REGION_JPEG = "region_jpeg"
    REGION_JPEG_OFFSETS = "region_jpeg_offsets"
    AUGMENT_ROT90 = "augment_rot90"  # decode: nvjpeg: augmentation drawn in the worker, applied after decode
    AUGMENT_HFLIP = "augment_hflip"
    AUGMENT_JITTER = "augment_jitter"
    POS = "pos"
    GENES = "genes"  # sparse: vocabulary indices of the non-zero counts
    COUNTS = "counts"  # sparse: raw counts
    OFFSETS = "offsets"  # sparse: (B + 1) row starts
    NICHE_GENES = "niche_genes"
    NICHE_COUNTS = "niche_counts"
    NICHE_OFFSETS = "niche_offsets"
    N_NEIGHBORS = "n_neighbors"
    SLIDE_INDEX = "slide_index"  # row of each sample's slide in the transform's measured-gene table
    EXPR = "expr"
    EXPR_MASK = "expr_mask"
    NICHE = "niche"
    TOKENS = "tokens"
    TOKENS_MASK = "tokens_mask"
    NICHE_TOKENS = "niche_tokens"
    NICHE_TOKENS_MASK = "niche_tokens_mask"


#: torch dtype names of the tensor entries of a batch (``counts``: int32, or float32 for a
#: corpus with non-integer counts).
BATCH_DTYPES: Final[dict[str, str]] = {
    Batch.PATCH.value: "uint8",
    Batch.REGION.value: "uint8",
    Batch.PATCH_JPEG.value: "uint8",
    Batch.PATCH_JPEG_OFFSETS.value: "int64",
    Batch.REGION_JPEG.value: "uint8",
    Batch.REGION_JPEG_OFFSETS.value: "int64",
    Batch.AUGMENT_ROT90.value: "int64",
    Batch.AUGMENT_HFLIP.value: "bool",
    Batch.AUGMENT_JITTER.value: "float32",
    Batch.POS.value: "int64",
    Batch.GENES.value: "int32",
    Batch.OFFSETS.value: "int64",
    Batch.NICHE_GENES.value: "int32",
    Batch.NICHE_OFFSETS.value: "int64",
    Batch.N_NEIGHBORS.value: "float32",
    Batch.SLIDE_INDEX.value: "int64",
    Batch.EXPR.value: "float32",
    Batch.EXPR_MASK.value: "bool",
    Batch.NICHE.value: "float32",
    Batch.TOKENS.value: "int64",
    Batch.TOKENS_MASK.value: "bool",
    Batch.NICHE_TOKENS.value: "int64",
    Batch.NICHE_TOKENS_MASK.value: "bool",
}
#: The sparse expression entries (raw counts; the gene transform consumes them).
SPARSE_EXPRESSION: Final = (
    Batch.GENES.value,
    Batch.COUNTS.value,
    Batch.OFFSETS.value,
    Batch.NICHE_GENES.value,
    Batch.NICHE_COUNTS.value,
    Batch.NICHE_OFFSETS.value,
    Batch.N_NEIGHBORS.value,
    Batch.SLIDE_INDEX.value,
)
