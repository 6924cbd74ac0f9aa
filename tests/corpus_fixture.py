"""Write a small but realistic built corpus (schema ``stcorpus/2``) for the loader tests.

The samples are real: raw counts of the two real Space Ranger matrices in ``tests/data``
(human heart, 100 spots x 100 genes; mouse brain, 49 spots with counts x 49 genes), their real
lattice positions (``tissue_positions_list.csv``) and in-tissue neighbours, and H&E pixels cut
from the real full-resolution crop ``mouse-brain-fullres-h5ad/test_img.jpg``. What is made up
is only the pairing (the heart spots get mouse-brain pixels) and the cut of the spots into
slides and splits, which a test corpus needs:

==========  =======  ======  ==========  ==========================================
slide       species  organ   split       spots
==========  =======  ======  ==========  ==========================================
heart-a     human    heart   train       heart barcodes 0..39
heart-b     human    heart   train       heart barcodes 40..69 (another licence)
heart-c     human    heart   test        heart barcodes 70..99
mbrain-a    mouse    brain   train       mouse barcodes 0..24 with counts
mbrain-b    mouse    brain   validation  mouse barcodes 25..49 with counts
heart-q     human    heart   (none)      quarantined: in slides.parquet, no samples
==========  =======  ======  ==========  ==========================================

``repeats=k`` writes every slide ``k`` times (``heart-a``, ``heart-a-r1``, ...), with other
crops, for a corpus of a few thousand samples (benchmarks). Shards are written with
``stcorpus.curate.shards`` (the real writer), ``genes.parquet`` from ``tests/data/loader-genes``
(real Ensembl / HGNC / MGI facts), and the card carries the ``configs:`` that
``datasets.load_dataset(folder)`` reads. The real ``curate build`` replaces this in
end-to-end tests; this helper exists so the loader can be tested before and apart from it.
"""

from __future__ import annotations

import csv
import io
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt
from PIL import Image

from stcorpus import schema
from stcorpus.curate.shards import (
    ShardInfo,
    ShardSample,
    ShardSettings,
    ShardWriter,
    write_parquet_atomic,
    write_shard_index,
)

DATA = Path(__file__).parent / "data"
HEART = DATA / "human-heart-sr1.0"
MOUSE = DATA / "mouse-brain-sr1.1" / "outs"
IMAGE = DATA / "mouse-brain-fullres-h5ad" / "test_img.jpg"
GENES = DATA / "loader-genes" / "genes.csv"

#: Human orthologs left out of the vocabulary, standing in for orthologs outside a built reference:
#: their mouse genes keep ``human_ortholog_id`` but get a null ``human_ortholog`` index.
ORTHOLOGS_NOT_IN_VOCABULARY = ("ENSG00000164736", "ENSG00000137573", "ENSG00000137571")  # SOX17, SULF1, SLCO5A1

PATCH_PX = 224


@dataclass(frozen=True)
class SlideSpec:
    """One slide of the fixture: which matrix and barcodes, and its metadata."""

    slide_id: str
    matrix: str  # "heart" | "mouse"
    barcodes: slice
    split: str | None
    species: str
    organ: str
    licence: str
    status: str = "built"


SLIDES: tuple[SlideSpec, ...] = (
    SlideSpec("heart-a", "heart", slice(0, 40), "train", "human", "heart", "CC-BY-4.0"),
    SlideSpec("heart-b", "heart", slice(40, 70), "train", "human", "heart", "CC-BY-NC-4.0"),
    SlideSpec("heart-c", "heart", slice(70, 100), "test", "human", "heart", "CC-BY-4.0"),
    SlideSpec("mbrain-a", "mouse", slice(0, 25), "train", "mouse", "brain", "CC-BY-4.0"),
    SlideSpec("mbrain-b", "mouse", slice(25, 50), "validation", "mouse", "brain", "CC-BY-4.0"),
    SlideSpec("heart-q", "heart", slice(0, 0), None, "human", "heart", "CC-BY-4.0", status="quarantined"),
)


@dataclass
class FixtureCorpus:
    """What ``write_corpus`` wrote: the folder and every sample per split, in shard order."""

    root: Path
    samples: dict[str, list[ShardSample]]
    shards: list[ShardInfo]
    genes: list[dict[str, Any]]
    slides: list[dict[str, Any]]
    counts_dtype: str = "int32"
    by_key: dict[str, ShardSample] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_key = {s.key: s for split in self.samples.values() for s in split}

    def keys(self, split: str) -> list[str]:
        """Keys of ``split`` in the order they were written."""
        return [s.key for s in self.samples[split]]

    def shard_paths(self, fmt: str, split: str) -> list[Path]:
        """Absolute paths of the shards of ``split`` in format ``fmt``, by index."""
        return [
            self.root / s.path
            for s in sorted(self.shards, key=lambda s: s.index)
            if (s.format, s.split) == (fmt, split)
        ]


@dataclass(frozen=True)
class _Matrix:
    gene_ids: list[str]
    barcodes: list[str]
    indptr: npt.NDArray[np.int64]
    indices: npt.NDArray[np.int64]
    data: npt.NDArray[np.int64]
    positions: dict[str, tuple[int, int, int, int]]  # barcode -> array_row, array_col, pxl_row, pxl_col
    um_per_px: float


def _read_matrix(h5: Path, positions_csv: Path, scalefactors: Path) -> _Matrix:
    with h5py.File(h5, "r") as f:
        m = f["matrix"]
        data = np.asarray(m["data"][:])
        counts = data.astype(np.int64)
        assert np.array_equal(counts, data), f"{h5} does not hold integer counts"
        matrix = (
            [x.decode() for x in m["features/id"][:]],
            [x.decode() for x in m["barcodes"][:]],
            np.asarray(m["indptr"][:], dtype=np.int64),
            np.asarray(m["indices"][:], dtype=np.int64),
            counts,
        )
    positions = {}
    with positions_csv.open() as handle:
        for row in csv.reader(handle):
            positions[row[0]] = (int(row[2]), int(row[3]), int(row[4]), int(row[5]))
    spot_px = json.loads(scalefactors.read_text())["spot_diameter_fullres"]
    return _Matrix(*matrix, positions=positions, um_per_px=55.0 / spot_px)


def _matrices() -> dict[str, _Matrix]:
    return {
        "heart": _read_matrix(
            HEART / "filtered_feature_bc_matrix.h5",
            HEART / "spatial/tissue_positions_list.csv",
            HEART / "spatial/scalefactors_json.json",
        ),
        "mouse": _read_matrix(
            MOUSE / "raw_feature_bc_matrix.h5",
            MOUSE / "spatial/tissue_positions_list.csv",
            MOUSE / "spatial/scalefactors_json.json",
        ),
    }


def vocabulary() -> list[dict[str, Any]]:
    """The fixture's ``genes.parquet`` rows (schema.GENE_COLUMNS), from ``loader-genes/genes.csv``."""
    with GENES.open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["ensembl_id"] not in ORTHOLOGS_NOT_IN_VOCABULARY]
    index = {r["ensembl_id"]: i for i, r in enumerate(rows)}
    genes = []
    for i, r in enumerate(rows):
        panels = []
        if r["biotype"] in ("protein-coding gene", "protein coding gene"):
            panels.append(f"{r['species']}-protein-coding")
        if r["in_heart_matrix"] == "1" and i % 4 == 0:
            panels.append("heart-demo")
        ortholog_id = r["human_ortholog_id"] or None
        genes.append(
            {
                "index": i,
                "ensembl_id": r["ensembl_id"],
                "symbol": r["symbol"] or None,
                "species": r["species"],
                "biotype": r["biotype"] or None,
                "human_ortholog": index.get(ortholog_id) if ortholog_id else None,
                "human_ortholog_id": ortholog_id,
                "panels": panels,
                "measured": True,  # the fixture's vocabulary is the genes its slides measured
            }
        )
    return genes


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


class _Tiles:
    """Patch (0.5 um/px stand-in) and region (3x3 cells, downscaled) JPEGs cut from the real H&E crop."""

    def __init__(self, quality: int) -> None:
        self.image = Image.open(IMAGE).convert("RGB")
        self.quality = quality

    def _jpeg(self, image: Image.Image) -> bytes:
        out = io.BytesIO()
        image.save(out, "JPEG", quality=self.quality)
        return out.getvalue()

    def cut(self, key: str, pos: int) -> tuple[bytes, bytes]:
        region_px = 3 * PATCH_PX
        h = _crc(key)
        rx = h % (self.image.width - region_px)
        ry = (h // 7919) % (self.image.height - region_px)
        row, col = divmod(pos, 3)
        px, py = rx + col * PATCH_PX, ry + row * PATCH_PX
        patch = self.image.crop((px, py, px + PATCH_PX, py + PATCH_PX))
        region = self.image.crop((rx, ry, rx + region_px, ry + region_px)).resize(
            (PATCH_PX, PATCH_PX), Image.Resampling.BOX
        )
        return self._jpeg(patch), self._jpeg(region)


def _slide_samples(
    spec: SlideSpec,
    slide_id: str,
    matrix: _Matrix,
    vocab_index: dict[str, int],
    tiles: _Tiles,
    counts_dtype: str,
) -> list[ShardSample]:
    to_vocab = np.array([vocab_index[g] for g in matrix.gene_ids], dtype=np.int32)
    spots = []
    for b in range(len(matrix.barcodes))[spec.barcodes]:
        lo, hi = matrix.indptr[b], matrix.indptr[b + 1]
        if hi == lo:
            continue  # no counts: a build writes no sample for it
        genes = to_vocab[matrix.indices[lo:hi]]
        order = np.argsort(genes)
        spots.append((matrix.barcodes[b], genes[order], matrix.data[lo:hi][order]))
    by_lattice = {matrix.positions[bc][:2]: i for i, (bc, _, _) in enumerate(spots)}
    samples = []
    for barcode, genes, counts in spots:
        r, c, pxl_row, pxl_col = matrix.positions[barcode]
        neighbours = [
            by_lattice[rc]
            for rc in ((r, c - 2), (r, c + 2), (r - 1, c - 1), (r - 1, c + 1), (r + 1, c - 1), (r + 1, c + 1))
            if rc in by_lattice
        ]
        niche: dict[int, int] = {}
        for n in neighbours:
            for g, v in zip(spots[n][1].tolist(), spots[n][2].tolist(), strict=True):
                niche[g] = niche.get(g, 0) + v
        niche_genes = np.array(sorted(niche), dtype=np.int32)
        niche_counts = np.array([niche[g] for g in sorted(niche)], dtype=counts_dtype)
        key = schema.sample_key(slide_id, barcode)
        pos = _crc(key) % 9
        patch, region = tiles.cut(key, pos)
        meta = {
            "slide_id": slide_id,
            "barcode": barcode,
            "study_id": f"study-{spec.matrix}",
            "split": spec.split,
            "species": spec.species,
            "organ": spec.organ,
            "technology": "spaceranger",
            "assay": "visium",
            "x_um": pxl_col * matrix.um_per_px,
            "y_um": pxl_row * matrix.um_per_px,
            "array_row": r,
            "array_col": c,
            "pos": pos,
            "neighbors": [schema.sample_key(slide_id, spots[n][0]) for n in neighbours],
            "n_neighbors": len(neighbours),
            "total_counts": float(counts.sum()),
            "n_genes": len(genes),
            "outside_fraction": 0.0,
        }
        samples.append(
            ShardSample(
                key=key,
                patch=patch,
                region=region,
                genes=genes,
                counts=counts.astype(counts_dtype),
                niche_genes=niche_genes,
                niche_counts=niche_counts,
                meta=meta,
            )
        )
    return samples


def _slide_row(
    spec: SlideSpec, slide_id: str, n_written: int, measured: Sequence[int], *, count_kind: str
) -> dict[str, Any]:
    return {
        "slide_id": slide_id,
        "study_id": f"study-{spec.matrix}",
        "source": "10x",
        "source_id": slide_id,
        "technology": "spaceranger",
        "assay": "visium",
        "chemistry": "Spatial 3' v1",
        "species": spec.species,
        "organ": spec.organ,
        "disease_state": "healthy",
        "oncotree_code": None,
        "patient": f"patient-{slide_id}",
        "preservation": "fresh frozen",
        "count_kind": count_kind,
        "licence": spec.licence,
        "citation": "10x Genomics public dataset",
        "mpp": 0.5,
        "mpp_source": "scalefactors",
        "n_spots": n_written,
        "n_spots_written": n_written if spec.status == "built" else 0,
        "measured_genes": list(measured) if spec.status == "built" else [],
        "mapping_rate": 1.0,
        "status": spec.status,
        "qc_flags": [] if spec.status == "built" else ["no_spots"],
        "reason": None if spec.status == "built" else "no_spots: fixture slide without samples",
        "split": spec.split,
        "duplicate_of": None,
    }


def _card(splits: Sequence[str], counts: dict[str, int], nbytes: dict[str, int]) -> str:
    files = "\n".join(f"  - split: {s}\n    path: {schema.PARQUET_DIR}/{s}/*.parquet" for s in splits)
    info = "\n".join(f"  - name: {s}\n    num_bytes: {nbytes[s]}\n    num_examples: {counts[s]}" for s in splits)
    return (
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        f"{files}\ndataset_info:\n  splits:\n{info}\nlicense: other\n---\n\n"
        "# stcorpus test fixture\n\nA tiny corpus written by `tests/corpus_fixture.py` for the loader tests.\n"
    )


def write_corpus(
    root: Path,
    *,
    samples_per_shard: int = 7,
    row_group_size: int = 3,
    counts_dtype: str = "int32",
    pack: str = "shuffle",
    repeats: int = 1,
    seed: int = 0,
    jpeg_quality: int = 90,
    normalized: Sequence[str] = (),
) -> FixtureCorpus:
    """Write the fixture corpus into ``root`` and return what was written.

    ``pack="shuffle"`` orders each split by one seeded global shuffle across slides (the build's
    default, so shards mix slides); ``pack="slide"`` writes slide by slide in lattice order.
    ``normalized``: slide ids recorded as ``count_kind: normalized`` in slides.parquet.
    """
    import pyarrow as pa

    if pack not in ("shuffle", "slide"):
        raise ValueError(f"pack must be 'shuffle' or 'slide', not {pack!r}")
    matrices = _matrices()
    genes = vocabulary()
    vocab_index = {g["ensembl_id"]: g["index"] for g in genes}
    tiles = _Tiles(jpeg_quality)
    per_split: dict[str, list[ShardSample]] = {s: [] for s in schema.SPLITS}
    slides = []
    for spec in SLIDES:
        for r in range(repeats):
            slide_id = spec.slide_id if r == 0 else f"{spec.slide_id}-r{r}"
            matrix = matrices[spec.matrix]
            measured = sorted(vocab_index[g] for g in matrix.gene_ids)
            samples = (
                []
                if spec.status != "built"
                else _slide_samples(spec, slide_id, matrix, vocab_index, tiles, counts_dtype)
            )
            kind = "normalized" if slide_id in normalized else "raw"
            slides.append(_slide_row(spec, slide_id, len(samples), measured, count_kind=kind))
            if spec.split is not None:
                per_split[spec.split].extend(samples)
    settings = ShardSettings(samples_per_shard=samples_per_shard, row_group_size=row_group_size)
    every = [sample for split in per_split.values() for sample in split]
    tar_dtypes = schema.TarDtypes.smallest(
        n_genes=len(genes),
        max_count=max((float(s.counts.max()) for s in every if len(s.counts)), default=0.0),
        max_niche_count=max((float(s.niche_counts.max()) for s in every if len(s.niche_counts)), default=0.0),
        counts_dtype=counts_dtype,
    )
    shards: list[ShardInfo] = []
    splits = [s for s in schema.SPLITS if per_split[s]]
    for i, split in enumerate(splits):
        if pack == "shuffle":
            order = np.random.default_rng([seed, i]).permutation(len(per_split[split]))
            per_split[split] = [per_split[split][j] for j in order]
        with ShardWriter(
            root, split=split, counts_dtype=counts_dtype, settings=settings, tar_dtypes=tar_dtypes
        ) as writer:
            writer.add_all(per_split[split])
        shards.extend(writer.shards)
    write_shard_index(root, shards)
    gene_schema = schema.table_arrow_schema(schema.GENE_TYPES)
    write_parquet_atomic(root / schema.GENES_FILE, pa.Table.from_pylist(genes, schema=gene_schema))
    rows = [{name: row.get(name) for name in schema.SLIDE_COLUMNS} for row in slides]
    slide_table = pa.Table.from_pylist(rows, schema=schema.slides_arrow_schema())
    write_parquet_atomic(root / schema.SLIDES_FILE, slide_table)
    counts = {s: len(per_split[s]) for s in splits}
    corpus = {
        "schema": schema.SCHEMA_ID,
        "counts_dtype": counts_dtype,
        "n_genes": len(genes),
        "splits": counts,
        "views": schema.views_record(schema.SCHEMA1_VIEWS),
        "expression": tar_dtypes.record(),
        "tool": "tests/corpus_fixture.py",
        "build": {"samples_per_shard": samples_per_shard, "pack": pack, "seed": seed, "repeats": repeats},
    }
    (root / schema.CORPUS_FILE).write_text(json.dumps(corpus, indent=1) + "\n")
    nbytes = {s: sum(i.bytes for i in shards if (i.format, i.split) == ("parquet", s)) for s in splits}
    (root / schema.CARD_FILE).write_text(_card(splits, counts, nbytes))
    return FixtureCorpus(
        root=root,
        samples={s: per_split[s] for s in splits},
        shards=shards,
        genes=genes,
        slides=slides,
        counts_dtype=counts_dtype,
    )
