"""What every reader does the same way: counts dtypes, feature names, files."""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from stcorpus.curate.errors import CorruptSourceError, NonIntegerCountsError, ScaleMismatchError, SourceMissingError
from stcorpus.curate.geometry import derive_array_coords
from stcorpus.curate.qc import match_barcodes
from stcorpus.curate.slide import QCCheck, SpotDrop

if TYPE_CHECKING:
    import scipy.sparse as sp

    from stcorpus.curate.geometry import Geometry
    from stcorpus.curate.manifest import Sample

#: Unversioned or versioned Ensembl gene ids of any species (ENSG, ENSMUSG, ENSDARG, ...).
ENSEMBL_ID: Final = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")

_INT32_MAX: Final = np.iinfo(np.int32).max


def is_ensembl(names: npt.NDArray[np.str_]) -> npt.NDArray[np.bool_]:
    """Which of ``names`` are Ensembl gene ids."""
    return np.fromiter((bool(ENSEMBL_ID.match(str(n))) for n in names), dtype=bool, count=names.shape[0])


def as_str_array(values: Any) -> npt.NDArray[np.str_]:
    """A 1-d unicode array from bytes, objects or strings (HDF5 gives bytes)."""
    array = np.asarray(values)
    if array.dtype.kind == "S":
        return np.char.decode(array, "utf-8").astype(np.str_)
    if array.dtype.kind == "O":
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.tolist()], dtype=np.str_)
    return array.astype(np.str_)


def raw_counts(matrix: sp.csr_matrix, *, sample: Sample, source: Path, notes: list[str]) -> sp.csr_matrix:
    """``matrix`` as canonical CSR with the count dtype the corpus stores.

    Integer matrices become int32 (int64 kept only if a value does not fit). Floating-point
    matrices whose values are all whole numbers are cast to int32 losslessly (10x h5 files
    written by scripts and most h5ad files store counts as float). Anything else is not raw
    counts: it is kept as float32 when the manifest declares ``counts: normalized``, and
    raises :class:`NonIntegerCountsError` otherwise.
    """
    import scipy.sparse as sp

    csr = sp.csr_matrix(matrix)
    if csr.shape[1] == 0:
        raise CorruptSourceError(
            f"{source.name}: the count table has no feature (gene) columns; point the manifest at the slide's counts",
            slide_id=sample.id,
        )
    csr.sum_duplicates()
    data = csr.data
    kind = data.dtype.kind
    if kind in "iub":
        if data.size and (int(data.max()) > _INT32_MAX or int(data.min()) < -_INT32_MAX):
            notes.append(f"counts kept as {data.dtype} (values exceed int32)")
            return csr
        if data.size and int(data.min()) < 0 and sample.counts != "normalized":
            raise NonIntegerCountsError(
                f"{source.name}: negative values (min {int(data.min())}) are not raw counts; point the manifest at "
                "the raw count matrix, or declare `counts: normalized` for a knowingly transformed source",
                slide_id=sample.id,
            )
        return sp.csr_matrix((data.astype(np.int32), csr.indices, csr.indptr), shape=csr.shape)
    if kind != "f":
        raise CorruptSourceError(
            f"{source.name}: count matrix has dtype {data.dtype}, expected numbers", slide_id=sample.id
        )
    finite = np.isfinite(data)
    good = finite & (data == np.round(data)) & (data >= 0) & (data <= _INT32_MAX)
    if good.all():
        if data.size:
            notes.append(f"counts stored as {data.dtype} are whole numbers: cast to int32 losslessly")
        return sp.csr_matrix((data.astype(np.int32), csr.indices, csr.indptr), shape=csr.shape)
    if sample.counts == "normalized":
        if not finite.all():
            raise CorruptSourceError(
                f"{source.name}: {int((~finite).sum()):,} of {data.size:,} stored values are NaN or infinite; "
                "no count-based model can use them (declared `counts: normalized` or not): point the manifest at a "
                "source without missing values",
                slide_id=sample.id,
            )
        notes.append(f"counts are not integers (declared `counts: normalized`): kept as float32 from {data.dtype}")
        return sp.csr_matrix((data.astype(np.float32), csr.indices, csr.indptr), shape=csr.shape)
    bad = data[~good]
    example = float(bad[0])
    raise NonIntegerCountsError(
        f"{source.name}: {bad.size:,} of {data.size:,} stored values are not whole non-negative numbers "
        f"(e.g. {example:.4g}; min {float(np.nanmin(data)):.4g}, max {float(np.nanmax(data)):.4g}): this is not raw "
        "counts. Point the manifest at the raw counts, or declare `counts: normalized` if the source is knowingly "
        "normalised",
        slide_id=sample.id,
    )


#: How text tables write a missing number (R: NA; pandas: empty or NaN).
MISSING_NUMBER: Final = frozenset({"", "na", "nan", "n/a", "null", "none"})


def coordinate(text: str) -> float:
    """A coordinate from a text table: NaN where the table marks it missing; ValueError if not a number."""
    if text.strip().lower() in MISSING_NUMBER:
        return float("nan")
    return float(text)


def whole_numbers(values: Any, *, what: str, slide_id: str | None = None) -> npt.NDArray[np.int64]:
    """``values`` (numbers or booleans, as a table column holds them) rounded to int64; a
    :class:`CorruptSourceError` naming ``what`` when one is missing, not a number or huge.

    Casting NaN to an integer gives an arbitrary value and text raises deep in numpy: both
    would otherwise reach the corpus as wrong array coordinates or tissue flags.
    """
    array = np.asarray(values)
    if array.dtype.kind == "b":
        return array.astype(np.int64)
    try:
        numbers = array.astype(np.float64)
    except (TypeError, ValueError) as exc:
        example = next((v for v in array.tolist() if not _is_number(v)), array.tolist()[:1])
        raise CorruptSourceError(
            f"{what} is not numeric (e.g. {example!r}); expected whole numbers", slide_id=slide_id
        ) from exc
    bad = ~np.isfinite(numbers) | (np.abs(numbers) > _INT32_MAX)
    if bad.any():
        raise CorruptSourceError(
            f"{what}: {int(bad.sum()):,} of {numbers.shape[0]:,} values are missing, infinite or huge "
            f"(e.g. {float(numbers[bad][0])!r}); expected whole numbers",
            slide_id=slide_id,
        )
    return np.rint(numbers).astype(np.int64)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def option(sample: Sample, name: str, *, default: Any) -> Any:
    """A reader option from the manifest, or its default."""
    return sample.reader.get(name, default)


#: The pseudo-spot grids a pooling reader (visium-hd, xenium) offers with its reader option ``grid``.
POOL_GRIDS: Final = ("hex", "square")


def pool_grid(sample: Sample, *, key: str, square_side: str, bin_um: int | None = None) -> tuple[str, Geometry]:
    """The grid the reader options ``grid``, ``pitch_um`` and ``spot_diameter_um`` declare for pooling.

    ``hex``: Visium-like spots (55 um on a 100 um pitch unless the options say otherwise), geometry
    ``key``; ``square``: squares of side ``pitch_um`` (``square_side`` says what it is), a whole
    multiple of ``bin_um`` where the source is binned.
    """
    from dataclasses import replace

    from stcorpus.curate.geometry import VISIUM, square_bins

    grid = str(option(sample, "grid", default="hex"))
    if grid not in POOL_GRIDS:
        raise SourceMissingError(
            f"{sample.describe()}: reader option grid={grid!r}; use one of {', '.join(POOL_GRIDS)}",
            slide_id=sample.id,
        )
    pitch = option(sample, "pitch_um", default=None)
    if grid == "hex":
        diameter = float(option(sample, "spot_diameter_um", default=VISIUM.spot_diameter_um))
        pitch_um = float(pitch) if pitch is not None else float(VISIUM.pitch_um or 100.0)
        if bin_um is not None and diameter < bin_um:  # a spot smaller than one bin holds at most one
            raise SourceMissingError(
                f"{sample.describe()}: reader option spot_diameter_um={diameter:g} is smaller than the {bin_um} um "
                "bins pooled into it; use a diameter of several bins (Visium: 55), or read finer bins with bin_um",
                slide_id=sample.id,
            )
        if diameter > pitch_um:  # discs would overlap: a point in two of them would belong to either
            raise SourceMissingError(
                f"{sample.describe()}: reader option spot_diameter_um={diameter:g} exceeds the hex pitch_um "
                f"{pitch_um:g}, so neighbouring spots would overlap; use a diameter of at most the pitch "
                "(Visium: 55 on 100)",
                slide_id=sample.id,
            )
        return grid, replace(VISIUM, key=key, pitch_um=pitch_um, spot_diameter_um=diameter)
    if pitch is None:
        raise SourceMissingError(
            f"{sample.describe()}: grid: square needs the reader option pitch_um ({square_side})", slide_id=sample.id
        )
    if bin_um is not None:
        ratio = float(pitch) / bin_um
        if ratio < 1 or abs(ratio - round(ratio)) > 1e-9:
            raise SourceMissingError(
                f"{sample.describe()}: reader option pitch_um={pitch!r} is not a whole multiple of the {bin_um} um "
                f"bins; use e.g. {bin_um * max(1, round(ratio))}",
                slide_id=sample.id,
            )
    return grid, square_bins(float(pitch))


def require_file(files: Mapping[str, Path], name: str, *, sample: Sample) -> Path:
    """The local path of source ``name``, which must exist."""
    path = files.get(name)
    if path is None:
        raise SourceMissingError(
            f"{sample.describe()}: source {name!r} is required but not in the fetched files "
            f"(have: {', '.join(sorted(files)) or 'none'})",
            slide_id=sample.id,
        )
    if not path.exists():
        raise SourceMissingError(
            f"source {name!r}: {path} does not exist; run `curate fetch` again", slide_id=sample.id
        )
    return path


def single_file_in(folder: Path, suffixes: tuple[str, ...], *, what: str, sample: Sample) -> Path:
    """The one file under ``folder`` (recursively) whose name ends with one of ``suffixes``."""
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    if len(found) == 1:
        return found[0]
    if not found:
        raise SourceMissingError(
            f"{folder}: no {what} file ({', '.join(suffixes)}) in this folder; name the file itself as the source",
            slide_id=sample.id,
        )
    listed = ", ".join(str(p.relative_to(folder)) for p in found[:5])
    raise SourceMissingError(
        f"{folder}: {len(found)} {what} files ({listed}{', ...' if len(found) > 5 else ''}); name the one to use "
        "as the source instead of the folder",
        slide_id=sample.id,
    )


def read_json(path: Path, *, sample: Sample) -> dict[str, Any]:
    """A JSON object from ``path``."""
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptSourceError(f"{path}: not readable JSON: {exc}", slide_id=sample.id) from exc
    if not isinstance(value, dict):
        raise CorruptSourceError(f"{path}: expected a JSON object, found {type(value).__name__}", slide_id=sample.id)
    return value


def positive_float(value: Any) -> float | None:
    """``value`` as a finite positive float, else None (metadata fields are often '' or NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


#: Spots whose median nearest-neighbour distance is below this fraction of the lattice pitch
#: (at the declared um/px) cannot lie on that lattice: the declared um/px is wrong.
MIN_SPACING_OF_PITCH: Final = 0.8

#: What to do about a wrong declared um/px, by where it came from.
_MPP_FIX: Final = {
    "manifest": "Fix or remove the sample's `mpp` in the manifest",
    "metadata": "The metadata's um/px is wrong: set the sample's `mpp` in the manifest",
    "spot_radius": "The spot radius gives a wrong um/px: set the sample's `mpp` in the manifest",
}


def lattice_coords(
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    *,
    geometry: Geometry,
    mpp: float | None,
    mpp_source: str,
    sample: Sample,
    notes: list[str],
    why: str = "",
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """Array (row, col) derived from pixel centres on the assay's lattice (``geometry.derive_array_coords``).

    With a declared ``mpp`` the lattice pitch in pixels is ``pitch_um / mpp``; spots that lie
    much closer together than that pitch (a median neighbour distance below
    :data:`MIN_SPACING_OF_PITCH` of it) cannot be on the lattice, so the um/px is wrong and the
    slide is refused with the um/px the spacing implies. Spots further apart than the pitch
    are a sparse subset and fine. The derivation is said in ``notes`` after ``why``.
    """
    lattice, pitch_um = geometry.lattice_and_pitch()
    derived = derive_array_coords(x, y, lattice=lattice, pitch_px=pitch_um / mpp if mpp else None)
    if mpp and np.isfinite(derived.spacing_px) and derived.spacing_px < MIN_SPACING_OF_PITCH * derived.pitch_px:
        implied = pitch_um / derived.spacing_px if derived.spacing_px > 0 else float("nan")
        fix = _MPP_FIX.get(mpp_source, "Set the sample's `mpp` in the manifest")
        raise ScaleMismatchError(
            f"{sample.describe()}: at {mpp:.4g} um/px ({mpp_source}) the {geometry.describe()} has a pitch of "
            f"{derived.pitch_px:.1f} px, but neighbouring spots lie a median {derived.spacing_px:.1f} px apart: "
            f"that um/px is wrong (the spacing implies about {implied:.4g} um/px). {fix}",
            slide_id=sample.id,
        )
    notes.append(why + derived.describe())
    return derived.row, derived.col


# ---------------------------------------------------------------------------------------------
# Joining the count table to the spot positions, counting every spot that cannot be kept
# ---------------------------------------------------------------------------------------------

IndexArray = npt.NDArray[np.intp]


@dataclass(frozen=True)
class SpotJoin:
    """Which count rows a slide keeps, the position rows they pair with, and what was dropped.

    ``dropped`` counts by ``SpotDrop`` reason (only reasons that occurred); the same numbers
    are said in ``notes`` by the join.
    """

    rows: IndexArray  # count-table rows kept, in count-table order
    position_rows: IndexArray  # the position row of each kept count row
    check: QCCheck  # ``barcodes_with_position``
    dropped: dict[str, int]


def first_occurrences(ids: npt.NDArray[np.str_]) -> IndexArray:
    """Rows of ``ids`` that are the first occurrence of their value, in order."""
    _, first = np.unique(ids, return_index=True)
    return np.sort(first).astype(np.intp)


def drop_duplicates(ids: npt.NDArray[np.str_], *, what: str, dropped: dict[str, int], notes: list[str]) -> IndexArray:
    """The rows of ``ids`` to keep (first occurrences), counting the later ones as dropped."""
    keep = first_occurrences(ids)
    n_duplicates = int(ids.shape[0] - keep.shape[0])
    if n_duplicates:
        kept = np.zeros(ids.shape[0], dtype=bool)
        kept[keep] = True
        example = str(ids[~kept][0])
        count_drop(dropped, SpotDrop.DUPLICATE_BARCODE, n_duplicates)
        notes.append(
            f"{what}: {n_duplicates:,} row(s) repeat a spot id listed before (e.g. {example!r}): the later rows dropped"
        )
    return keep


def count_drop(dropped: dict[str, int], reason: str, n: int) -> None:
    """Add ``n`` spots dropped for ``reason`` (nothing when ``n`` is 0)."""
    if n:
        dropped[reason] = dropped.get(reason, 0) + int(n)


def join_spots(
    count_ids: npt.NDArray[np.str_],
    position_ids: npt.NDArray[np.str_],
    *,
    in_tissue: npt.NDArray[np.bool_],
    finite: npt.NDArray[np.bool_],
    sample: Sample,
    counts_name: str,
    positions_name: str,
    notes: list[str],
) -> SpotJoin:
    """Pair count rows with position rows by spot id, counting every spot that cannot be kept.

    ``in_tissue`` and ``finite`` (whether the position's centre is a finite pixel) are per
    position row. Dropped, by :class:`~curate.slide.SpotDrop` reason: repeated ids on either
    side (the first row of an id is kept); count rows without a position; in-tissue positions
    without a count row; and matched spots whose centre is NaN or infinite. Off-tissue
    positions without a count row are not drops: a filtered matrix leaves them out. Raises
    :class:`~curate.errors.BarcodeMismatchError` when no id matches, and
    :class:`~curate.errors.CorruptSourceError` when no matched spot has a finite centre.
    """
    dropped: dict[str, int] = {}
    count_keep = drop_duplicates(count_ids, what=counts_name, dropped=dropped, notes=notes)
    position_keep = drop_duplicates(position_ids, what=positions_name, dropped=dropped, notes=notes)
    matched, matched_positions, check = match_barcodes(
        count_ids[count_keep], position_ids[position_keep], slide_id=sample.id, what=positions_name
    )
    rows, position_rows = count_keep[matched], position_keep[matched_positions]
    not_in_positions = int(count_keep.shape[0] - rows.shape[0])
    if not_in_positions:
        count_drop(dropped, SpotDrop.NOT_IN_POSITIONS, not_in_positions)
        notes.append(f"{not_in_positions:,} {counts_name} row(s) have no spot in {positions_name}: dropped")
    paired = np.zeros(position_ids.shape[0], dtype=bool)
    paired[position_rows] = True
    unpaired = np.zeros(position_ids.shape[0], dtype=bool)
    unpaired[position_keep] = True
    unpaired &= ~paired & in_tissue
    not_in_matrix = int(unpaired.sum())
    if not_in_matrix:
        count_drop(dropped, SpotDrop.NOT_IN_MATRIX, not_in_matrix)
        example = str(position_ids[np.flatnonzero(unpaired)[0]])
        notes.append(
            f"{not_in_matrix:,} in-tissue spot(s) of {positions_name} have no row in {counts_name} "
            f"(e.g. {example!r}): nothing to keep for them"
        )
    good = finite[position_rows]
    n_bad = int((~good).sum())
    if n_bad:
        if not good.any():
            raise CorruptSourceError(
                f"{positions_name}: every one of the {n_bad:,} matched spots has a NaN or infinite centre; "
                "the positions file is broken: fetch it again from its source",
                slide_id=sample.id,
            )
        count_drop(dropped, SpotDrop.NAN_COORDINATES, n_bad)
        example = str(position_ids[position_rows[~good][0]])
        notes.append(f"{n_bad:,} spot(s) of {positions_name} have a NaN or infinite centre (e.g. {example!r}): dropped")
        rows, position_rows = rows[good], position_rows[good]
    return SpotJoin(rows=rows, position_rows=position_rows, check=check, dropped=dropped)


# ---------------------------------------------------------------------------------------------
# Spots x genes text tables (STimage CSV, legacy ST TSV)
# ---------------------------------------------------------------------------------------------

#: Text block parsed at a time; one block becomes one dense float64 chunk before going sparse.
_BLOCK_BYTES: Final = 8 << 20


#: What reading a text source (``open_text``) raises on a damaged file: a bad gzip stream is a
#: ``zlib.error`` (not an OSError), a cut one an EOFError, a non-UTF-8 one a UnicodeDecodeError.
TEXT_ERRORS: Final = (OSError, EOFError, UnicodeDecodeError, csv.Error, zlib.error)


def open_text(path: Path) -> io.TextIOBase:
    """A text file, read through gzip when its name ends in ``.gz``; a UTF-8 byte-order mark (Excel writes one)
    is skipped, so a header's first name stays ``barcode``, not ``\ufeffbarcode``."""
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return path.open("r", encoding="utf-8-sig", newline="")


def read_count_table(
    path: Path, *, delimiter: str, sample: Sample
) -> tuple[npt.NDArray[np.str_], npt.NDArray[np.str_], sp.csr_matrix]:
    """Row ids, column names and the values (sparse, float64 as parsed) of a delimited table.

    The first column holds the row ids and the header row the column names, with or without an
    empty cell above the ids (R's ``write.table`` leaves it out). A ``.gz`` file is read
    through gzip. The table is parsed in blocks (pyarrow) straight into a sparse matrix, so a
    300 MB file never becomes a dense array.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import scipy.sparse as sp

    try:
        with open_text(path) as handle:
            lines = csv.reader(handle, delimiter=delimiter)
            header = next(lines, None)
            first = next(lines, None)
    except TEXT_ERRORS as exc:
        raise CorruptSourceError(f"{path}: cannot read the header line: {exc}", slide_id=sample.id) from exc
    if header is None:
        raise CorruptSourceError(f"{path}: the file is empty", slide_id=sample.id)
    offset = 0 if first is not None and len(first) == len(header) + 1 else 1
    genes = np.array([g.strip() for g in header[offset:]], dtype=np.str_)
    if genes.shape[0] == 0:
        raise CorruptSourceError(f"{path}: header has no gene columns", slide_id=sample.id)
    names = ["spot", *(f"g{i}" for i in range(genes.shape[0]))]  # generated: gene names may repeat
    types = {name: pa.float64() for name in names[1:]}
    types["spot"] = pa.string()
    ids: list[str] = []
    blocks: list[sp.csr_matrix] = []
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(column_types=types),
        )
        for batch in reader:
            ids.extend(str(v) for v in batch.column(0).to_pylist())
            dense = np.asarray(batch.drop_columns(["spot"]).to_tensor(null_to_nan=True, row_major=True))
            blocks.append(sp.csr_matrix(dense))
    except (pa.ArrowInvalid, OSError, EOFError) as exc:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise CorruptSourceError(f"{path}: malformed counts {kind}: {exc}", slide_id=sample.id) from exc
    if not blocks:
        raise CorruptSourceError(f"{path}: no spot rows", slide_id=sample.id)
    values = sp.vstack(blocks, format="csr")
    # A delimiter at the end of every line makes a column with no name and no values: not data.
    unnamed = genes == ""
    if unnamed.any():
        missing = np.bincount(values.indices[np.isnan(values.data)], minlength=values.shape[1])
        empty = unnamed & (missing == values.shape[0])
        if empty.any():
            keep = np.flatnonzero(~empty)
            values, genes = values[:, keep].tocsr(), genes[keep]
    return np.array(ids, dtype=np.str_), genes, values
