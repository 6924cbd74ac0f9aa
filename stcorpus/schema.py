"""The corpus contract ``stcorpus/1``: names of members and columns, key format, layout.

This module is the single place where ``curate`` (which writes corpora) and ``loaders``
(which read them) agree on what a sample is. Its prose is ``CORPUS.md`` in the design notes;
the README of every built corpus repeats the parts a reader needs.

A sample is one spot. In a WebDataset shard it is four tar members sharing the key
``<slide_id>__<barcode>``::

    <key>.patch.jpg    224x224 RGB JPEG at 0.5 um/px centred on the spot
    <key>.region.jpg   224x224 RGB JPEG at 1.5 um/px; the patch sits in 3x3 cell ``pos``
    <key>.expr.npz     int32 ``genes`` (sorted vocabulary indices) + ``counts``, and the
                       same for the summed in-tissue lattice neighbours (``niche_*``)
    <key>.json         metadata (``META_FIELDS``)

In a Parquet shard it is one row with the same content in flat columns (``Column``), the
two images as the ``datasets`` Image feature (a struct of ``bytes`` and ``path``).

Nothing here imports heavy libraries at module import; the Arrow schema is built on demand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import pyarrow as pa

SCHEMA_NAME: Final = "stcorpus"
SCHEMA_VERSION: Final = 1
SCHEMA_ID: Final = f"{SCHEMA_NAME}/{SCHEMA_VERSION}"

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

    GENES = "genes"  # int32, sorted vocabulary indices with a non-zero count
    COUNTS = "counts"  # raw counts (int32, or float32 for a corpus with non-integer sources)
    NICHE_GENES = "niche_genes"  # int32, sorted, genes non-zero in the summed neighbours
    NICHE_COUNTS = "niche_counts"  # summed raw counts of the in-tissue lattice neighbours


KEY_COLUMN: Final = "__key__"
PATCH_COLUMN: Final = "patch"
REGION_COLUMN: Final = "region"

#: Number of cells of the region grid (3x3); ``pos`` is row-major in ``range(REGION_GRID**2)``.
REGION_GRID: Final = 3


@dataclass(frozen=True)
class Field:
    """One metadata field: its name, Arrow type name and meaning."""

    name: str
    arrow: str  # one of: string, int32, int64, float32, float64, list<string>
    doc: str


#: The ``json`` member of a sample and the flat metadata columns of a Parquet row, in order.
META_FIELDS: Final[tuple[Field, ...]] = (
    Field("slide_id", "string", "slide id (unique in the corpus)"),
    Field("barcode", "string", "spot barcode as the source gives it"),
    Field("study_id", "string", "study the slide belongs to"),
    Field("split", "string", "train / validation / test"),
    Field("species", "string", "human or mouse"),
    Field("organ", "string", "organ, as the manifest names it"),
    Field("technology", "string", "source format the slide was read from (spaceranger, hest, stimage)"),
    Field("assay", "string", "measurement platform (visium, visium-hd, xenium, st)"),
    Field("x_um", "float64", "spot centre, micrometres from the image's left edge"),
    Field("y_um", "float64", "spot centre, micrometres from the image's top edge"),
    Field("array_row", "int32", "lattice row of the spot"),
    Field("array_col", "int32", "lattice column of the spot"),
    Field("pos", "int32", "cell 0..8 (row-major) of the 3x3 region grid holding the patch"),
    Field("neighbors", "list<string>", "keys of the in-tissue lattice neighbours"),
    Field("n_neighbors", "int32", "number of in-tissue lattice neighbours summed into niche_*"),
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

COUNT_DTYPES: Final = ("int32", "float32")


def _arrow_type(name: str) -> pa.DataType:
    import pyarrow as pa

    if name == "list<string>":
        return pa.list_(pa.string())
    return pa.type_for_alias(name)


def image_arrow_type() -> pa.DataType:
    """The Arrow type of a ``datasets`` Image column: ``struct<bytes: binary, path: string>``."""
    import pyarrow as pa

    return pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def sample_arrow_schema(counts_dtype: str = "int32") -> pa.Schema:
    """Arrow schema of a Parquet sample shard, with the ``datasets`` features in its metadata."""
    import json

    import pyarrow as pa

    if counts_dtype not in COUNT_DTYPES:
        raise ValueError(f"counts dtype must be one of {COUNT_DTYPES}, not {counts_dtype!r}")
    count_type = pa.list_(_arrow_type(counts_dtype))
    fields = [
        pa.field(KEY_COLUMN, pa.string(), nullable=False),
        pa.field(PATCH_COLUMN, image_arrow_type()),
        pa.field(REGION_COLUMN, image_arrow_type()),
        pa.field(Expr.GENES.value, pa.list_(pa.int32())),
        pa.field(Expr.COUNTS.value, count_type),
        pa.field(Expr.NICHE_GENES.value, pa.list_(pa.int32())),
        pa.field(Expr.NICHE_COUNTS.value, count_type),
        *(pa.field(f.name, _arrow_type(f.arrow)) for f in META_FIELDS),
    ]
    metadata = {
        "huggingface": json.dumps({"info": {"features": hf_sample_features(counts_dtype)}}),
        "stcorpus": SCHEMA_ID,
    }
    return pa.schema(fields, metadata=metadata)


def _hf_value(arrow: str) -> dict[str, Any]:
    if arrow == "list<string>":
        return {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"}
    return {"dtype": arrow, "_type": "Value"}


def hf_sample_features(counts_dtype: str = "int32") -> dict[str, Any]:
    """The ``datasets`` Features (as JSON) of a Parquet sample row."""

    def int_list(dtype: str) -> dict[str, Any]:
        return {"feature": {"dtype": dtype, "_type": "Value"}, "_type": "List"}

    features: dict[str, Any] = {
        KEY_COLUMN: {"dtype": "string", "_type": "Value"},
        PATCH_COLUMN: {"_type": "Image"},
        REGION_COLUMN: {"_type": "Image"},
        Expr.GENES.value: int_list("int32"),
        Expr.COUNTS.value: int_list(counts_dtype),
        Expr.NICHE_GENES.value: int_list("int32"),
        Expr.NICHE_COUNTS.value: int_list(counts_dtype),
    }
    for f in META_FIELDS:
        features[f.name] = _hf_value(f.arrow)
    return features


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


#: Columns of ``shards.parquet``: one row per shard file.
SHARD_COLUMNS: Final = (
    "path",  # relative to the corpus root, e.g. wds/train/train-000000.tar
    "format",  # parquet | wds
    "split",
    "index",  # shard number within its split and format
    "n_samples",
    "bytes",
    "sha256",
    "first_key",
    "last_key",
    "slide_ids",  # list<string>: slides with at least one sample in the shard
)

#: Columns of ``genes.parquet``: the vocabulary.
GENE_COLUMNS: Final = (
    "index",  # int32, dense from 0: the values of `genes` / `niche_genes`
    "ensembl_id",  # ENSG... / ENSMUSG..., unversioned
    "symbol",  # approved symbol where known
    "species",  # human | mouse
    "biotype",  # HGNC locus group / Ensembl biotype where known
    "human_ortholog",  # int32 index of the one-to-one human ortholog in this vocabulary, else null
    "human_ortholog_id",  # Ensembl id of that ortholog even when it is not in this vocabulary, else null
    "panels",  # list<string>: named gene panels the gene belongs to (e.g. human-protein-coding)
)

#: Columns of ``slides.parquet``: one row per slide considered by the build.
SLIDE_COLUMNS: Final = (
    "slide_id",
    "study_id",
    "source",
    "source_id",
    "technology",
    "assay",
    "chemistry",
    "species",
    "organ",
    "disease_state",
    "oncotree_code",
    "patient",
    "preservation",
    "count_kind",  # raw | normalized: what the slide's values are (the manifest's `counts`)
    "licence",
    "distribution_licence",  # licence of the distribution the files came from, when it adds terms
    "citation",
    "mpp",
    "mpp_source",
    "n_spots",  # in-tissue spots read (null when nothing could be read)
    "n_spots_written",
    "spots_rejected",  # spots read but not written, by reason: the reader's drops (SpotDrop) and the build's
    "measured_genes",
    "mapping_rate",
    "status",  # built | quarantined | failed | excluded | duplicate
    "qc_flags",
    "reason",
    "reason_codes",  # the code of every reason the slide was not built (every failed check), in order
    "split",
    "duplicate_of",
)
