"""Typed settings of the corpus loader.

Every option sits in one frozen dataclass with a default; dicts and YAML only fill them
(``LoaderSettings.from_dict``) and an unknown key is an error that names it. ``to_dict``
gives the resolved settings back as plain JSON types, to store beside a checkpoint.

>>> s = LoaderSettings.from_dict({"split": "train", "batch_size": 64, "genes": {"transform": "rank"}})
>>> s.split, s.genes.context_length
(('train',), 1024)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from stcorpus import schema
from stcorpus.loaders.errors import LoaderSettingsError
from stcorpus.loaders.parquet_fast import numba_available
from stcorpus.settings import build_dataclass, check_fields, one_of, type_message

FORMATS: Final = schema.FORMATS
GENE_TRANSFORMS: Final = ("none", "counts", "log1p", "cp10k_log1p", "rank")
VIEWS: Final = (schema.PATCH_COLUMN, schema.REGION_COLUMN)
DECODERS: Final = ("simplejpeg", "pil")
#: Where JPEGs are decoded: ``cpu`` in the workers, ``nvjpeg`` on the consuming CUDA device.
DECODE: Final = ("cpu", "nvjpeg")
#: What a batch carries of the expression: raw sparse counts, or the transform's dense/token output.
GENE_OUTPUTS: Final = ("sparse", "dense")
#: The gene transforms that read their input as raw counts (``slides.parquet`` ``count_kind``).
COUNT_TRANSFORMS: Final = ("log1p", "cp10k_log1p", "rank")
ON_BAD_SAMPLE: Final = ("error", "warn", "skip")
UNEVEN: Final = ("drop", "wrap")
#: How the expression list columns of Parquet shards are decoded (``auto``: numba when importable).
PARQUET_DECODERS: Final = ("auto", "pyarrow", "numba")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise LoaderSettingsError(type_message(name, [one_of(allowed)], value))


def _positive(name: str, value: float, *, zero: bool = False) -> None:
    if value < 0 or (value == 0 and not zero):
        raise LoaderSettingsError(f"{name} must be {'>= 0' if zero else '> 0'}, not {value!r}")


@dataclass(frozen=True)
class Filters:
    """Which slides to read, applied from ``slides.parquet`` before any shard is opened.

    Every field is a tuple of allowed values; an empty tuple means no restriction. Values are
    compared exactly (``organ=("heart",)``; ``licence`` holds SPDX ids such as ``CC-BY-4.0``).
    Only slides with ``status == "built"`` have samples; the split is ``LoaderSettings.split``.

    ``count_kind`` (``slides.parquet`` ``count_kind``: ``raw`` or ``normalized``) also decides
    what the count-based gene transforms (``log1p``, ``cp10k_log1p``, ``rank``) accept: by default
    they refuse a selection holding normalized slides, naming them. ``count_kind: [raw]`` leaves
    those slides out; ``count_kind: [raw, normalized]`` (or ``[normalized]``) takes them in
    knowingly, and the transform then treats their values as if they were counts.
    """

    organ: tuple[str, ...] = ()
    species: tuple[str, ...] = ()
    technology: tuple[str, ...] = ()
    assay: tuple[str, ...] = ()
    licence: tuple[str, ...] = ()
    slide_ids: tuple[str, ...] = ()
    exclude_slide_ids: tuple[str, ...] = ()
    count_kind: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_fields(self, path="filters.", error=LoaderSettingsError)
        for kind in self.count_kind:
            _choice("filters.count_kind", kind, schema.COUNT_KINDS)

    def active(self) -> bool:
        """True when at least one field restricts the slides."""
        return any(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclass(frozen=True)
class GeneSettings:
    """The gene-side transform (never baked into shards; see ``stcorpus.loaders.genes``).

    - ``transform``: ``none`` (no expression in the batch), ``counts`` (raw counts, dense),
      ``log1p`` (log1p of raw counts), ``cp10k_log1p`` (counts per ``target_sum`` of the spot's
      library, then log1p), ``rank`` (rank tokens, Nicheformer/STAMP style).
    - ``panel`` / ``genes``: the genes to keep, by panel name (``genes.parquet`` ``panels``) or by
      vocabulary index / Ensembl id: a gene space fixed by its names, the same on every corpus of
      the same references. Neither means the vocabulary: with ``measured_only`` (the default) the
      genes the corpus measured (``genes.parquet`` ``measured``: a few thousand to tens of
      thousands, not the references' ~128k, so a gene encoder's first layer stays small), else
      every vocabulary gene (after ``to_human``: every human gene). ``measured_only`` leaves
      ``panel`` and ``genes`` as given; corpora written before ``measured`` existed measured every
      gene of their vocabulary.
    - ``to_human``: project mouse genes onto their one-to-one human ortholog first.
    - ``niche``: transform the summed neighbour expression too (``niche_average`` divides it by
      the number of neighbours first, so it is on the scale of one spot).
    - ``gene_means``: rank transform only: path of a ``.npy`` float vector over the vocabulary that
      divides the scaled expression before ranking (technology means, Nicheformer); ``None`` skips it.
    - ``context_length``, ``token_offset``: rank tokens per sample, and the id of the first gene
      token (ids below it are special: 0 is padding).
    - ``output``: ``sparse`` (default): workers hand over the raw counts sparse (``genes``,
      ``counts``, ``offsets`` per batch, ``loaders/batch.py``) and the transform runs as batched
      tensor operations where the batch is consumed (``CorpusLoader(..., device=...)`` or
      ``CorpusDataset.finish``: on the GPU in training); ``dense``: the workers run it and hand
      over ``expr``/``tokens``.
    """

    transform: str = "log1p"
    panel: str | None = None
    genes: tuple[int | str, ...] = ()
    to_human: bool = False
    measured_only: bool = True
    niche: bool = False
    niche_average: bool = True
    target_sum: float = 10_000.0
    context_length: int = 1024
    gene_means: str | None = None
    token_offset: int = 1
    output: str = "sparse"

    def __post_init__(self) -> None:
        check_fields(self, path="genes.", error=LoaderSettingsError)
        _choice("genes.transform", self.transform, GENE_TRANSFORMS)
        _choice("genes.output", self.output, GENE_OUTPUTS)
        _positive("genes.target_sum", self.target_sum)
        _positive("genes.context_length", self.context_length)
        _positive("genes.token_offset", self.token_offset)
        if self.panel is not None and self.genes:
            raise LoaderSettingsError("give genes.panel or genes.genes, not both")
        if self.gene_means is not None and self.transform != "rank":
            raise LoaderSettingsError("genes.gene_means is used by the rank transform only")
        if self.niche and self.transform == "none":
            raise LoaderSettingsError("genes.niche needs a gene transform other than 'none'")


@dataclass(frozen=True)
class AugmentSettings:
    """Seeded image augmentations done in torch (no torchvision), per sample.

    The geometric ones (flips, 90-degree rotations) move the patch and the region together and
    update ``pos``, so the patch stays in its cell of the region. Colour jitter factors are drawn
    uniformly from ``[1 - x, 1 + x]`` (0 disables) and applied alike to both views.
    """

    hflip: bool = False
    vflip: bool = False
    rot90: bool = False
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0

    def __post_init__(self) -> None:
        check_fields(self, path="augment.", error=LoaderSettingsError)
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise LoaderSettingsError(f"augment.{name} must be in [0, 1), not {value!r}")

    def active(self) -> bool:
        """True when any augmentation is on."""
        return self.hflip or self.vflip or self.rot90 or bool(self.brightness or self.contrast or self.saturation)


@dataclass(frozen=True)
class HttpSettings:
    """Reading remote corpora (HTTP(S), the Hub, fsspec stores): retries, timeouts, read-ahead.

    ``block_mb``: stores other than HTTP(S), the Hub and S3 read a shard range in blocks of this
    many MiB, one request each (a shard no larger than a block is one request); a block is held in
    memory while it is read.
    """

    retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    timeout_s: float = 60.0
    readahead_mb: int = 64
    chunk_kb: int = 1024
    block_mb: int = 64

    def __post_init__(self) -> None:
        check_fields(self, path="http.", error=LoaderSettingsError)
        _positive("http.retries", self.retries, zero=True)
        _positive("http.backoff_s", self.backoff_s, zero=True)
        _positive("http.timeout_s", self.timeout_s)
        _positive("http.readahead_mb", self.readahead_mb, zero=True)
        _positive("http.chunk_kb", self.chunk_kb)
        _positive("http.block_mb", self.block_mb)


@dataclass(frozen=True)
class CacheSettings:
    """A local copy of the shards of a remote corpus (HTTP(S), the Hub, an fsspec store).

    With a ``folder``, each shard streamed from a remote corpus is written there as it is read,
    checked against ``shards.parquet``'s size and sha256 and renamed into place; later epochs and
    later runs (a resume, another training) read it from local disk. Shards are kept by sha256,
    so corpora and revisions share what they have in common. ``max_gb`` bounds the folder: the
    least recently used shards go first; a shard larger than the budget is streamed uncached.
    The workers and ranks of one node may share a folder (file locks, atomic renames). ``None``
    (the default): no cache, every epoch streams every shard again. Local corpora never use it.
    """

    folder: str | None = None
    max_gb: float = 100.0

    def __post_init__(self) -> None:
        check_fields(self, path="cache.", error=LoaderSettingsError)
        _positive("cache.max_gb", self.max_gb)


@dataclass(frozen=True)
class LoaderSettings:
    """Everything that decides what the loader yields, in which order.

    - ``split``: one split or several (read one after another in the shard order).
    - ``format``: ``parquet`` (default: row groups parse far faster than tar members, see
      ``bench/LOADER.md``) or ``wds``; both hold the same samples in the same order.
    - ``batch_size``, ``drop_last``: batches per rank; ``drop_last=False`` yields a short last batch.
    - ``uneven``: when the samples do not divide by the world size, ``drop`` leaves out the last
      ``N mod world_size`` samples of the epoch order, ``wrap`` repeats the first ones; either way
      every rank yields the same number of batches (no DDP hang).
    - ``shuffle``, ``seed``, ``shuffle_window``: shard order and a window permutation of samples,
      both a pure function of (seed, epoch, rank); the window is rounded up to a multiple of
      ``batch_size`` and bounds the raw samples a worker holds in memory.
    - ``views``: which images to decode (``patch``, ``region`` or both).
    - ``decoder``: ``simplejpeg`` (libjpeg-turbo, default) or ``pil``: the CPU decoder.
    - ``decode``: ``cpu`` (default: workers decode the JPEGs into uint8 batches) or ``nvjpeg``
      (workers hand over the JPEG bytes; the consumer decodes them batched on its CUDA device with
      torchvision's ``decode_jpeg``, the ``stcorpus[nvjpeg]`` extra). Augmentation parameters are
      drawn the same way either way and applied after decoding.
    - ``on_bad_sample``: ``error`` (default) raises; ``warn`` skips, counts and logs the key;
      ``skip`` skips and counts only. A shard that is missing, shorter or longer than
      ``shards.parquet`` says, or corrupt is a ``ShardError`` naming it; ``warn``/``skip`` skip
      the samples it would have given and count it.
    - ``verify_sha256``: hash every shard against ``shards.parquet``'s sha256 before its first
      sample (local shards once per process that opens them; remote ones are downloaded whole
      first, into ``cache.folder`` or a temporary file). Off by default: sizes are always checked,
      tar header checksums and Parquet footers catch most damage, and hashing reads every byte.
    - ``cache``: a local shard cache for remote corpora (``CacheSettings``).
    - ``parquet_decoder``: how the four expression list columns of Parquet shards are decoded:
      ``pyarrow``, ``numba`` (``stcorpus.loaders.parquet_fast``, the ``stcorpus[fast]`` extra:
      reads our writer's layout straight from the file, about half pyarrow's CPU time per value,
      and finds the JPEG leaves where they lie instead of copying them; a column chunk in any
      other layout is read by pyarrow) or ``auto`` (default: ``numba`` when it can be imported,
      else ``pyarrow``). With ``numba`` the tar reader also scans a local shard's headers with a
      compiled kernel. The batches are the same either way.
    """

    split: tuple[str, ...] = ("train",)
    format: str = "parquet"
    batch_size: int = 256
    drop_last: bool = True
    uneven: str = "drop"
    shuffle: bool = True
    seed: int = 0
    shuffle_window: int = 1024
    views: tuple[str, ...] = VIEWS
    decoder: str = "simplejpeg"
    decode: str = "cpu"
    on_bad_sample: str = "error"
    filters: Filters = field(default_factory=Filters)
    genes: GeneSettings = field(default_factory=GeneSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    verify_sha256: bool = False
    cache: CacheSettings = field(default_factory=CacheSettings)
    parquet_decoder: str = "auto"

    def __post_init__(self) -> None:
        split: Any = self.split
        if isinstance(split, str):  # LoaderSettings(split="train") reads naturally; store the tuple
            object.__setattr__(self, "split", (split,))
        check_fields(self, path="", error=LoaderSettingsError)
        if not self.split:
            raise LoaderSettingsError(f"split must name at least one of {schema.SPLITS}")
        for split in self.split:
            _choice("split", split, schema.SPLITS)
        if len(set(self.split)) != len(self.split):
            raise LoaderSettingsError(f"split names a split twice: {self.split}")
        _choice("format", self.format, FORMATS)
        _positive("batch_size", self.batch_size)
        _choice("uneven", self.uneven, UNEVEN)
        _positive("shuffle_window", self.shuffle_window)
        for view in self.views:
            _choice("views", view, VIEWS)
        if len(set(self.views)) != len(self.views):
            raise LoaderSettingsError(f"views names a view twice: {self.views}")
        if not self.views and self.genes.transform == "none":
            raise LoaderSettingsError("no views and genes.transform='none' would yield empty batches")
        _choice("decoder", self.decoder, DECODERS)
        _choice("decode", self.decode, DECODE)
        _choice("on_bad_sample", self.on_bad_sample, ON_BAD_SAMPLE)
        _choice("parquet_decoder", self.parquet_decoder, PARQUET_DECODERS)
        if self.parquet_decoder == "numba" and not numba_available():
            raise LoaderSettingsError(
                "parquet_decoder='numba' needs numba: pip install 'stcorpus[fast]', or use 'auto' / 'pyarrow'"
            )

    @property
    def window(self) -> int:
        """The shuffle window in samples: ``shuffle_window`` rounded up to whole batches."""
        return -(-self.shuffle_window // self.batch_size) * self.batch_size

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoaderSettings:
        """Settings from plain data (YAML/JSON); unknown keys and wrong types are errors."""
        return build_dataclass(cls, data, path="", error=LoaderSettingsError)

    def to_dict(self) -> dict[str, Any]:
        """The resolved settings as JSON types (tuples become lists)."""
        plain: dict[str, Any] = _plain(dataclasses.asdict(self))
        return plain


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
