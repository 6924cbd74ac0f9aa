"""Gene-side transforms: sparse raw counts of a batch -> dense vectors or rank tokens.

Shards store raw counts, sparse (vocabulary indices + counts). Everything here is done by the
loader, per batch, vectorised over the batch's concatenated non-zeros:

1. **Projection** (``to_human``): a mouse gene's counts move to its one-to-one human ortholog
   (``genes.parquet`` ``human_ortholog_id``, so also onto human genes the vocabulary does not
   hold: a mouse-only corpus projects too); a mouse gene without one drops out
   (``GeneSpace.dropped`` lists them). Human genes stay.
2. **Selection**: a panel (``genes.parquet`` ``panels``, applied to the vocabulary genes before
   their projection), explicit vocabulary indices or Ensembl ids, or every gene. Output column
   ``k`` is the gene ``GeneSpace.ensembl_ids[k]``.
3. **Value transform**, with the spot's library size taken over *all* its counts (before
   projection and selection, like ``scanpy.pp.normalize_total`` on the full matrix):

   - ``counts``: raw counts as float32;
   - ``log1p``: ``log(1 + count)``;
   - ``cp10k_log1p``: ``log(1 + count / library * target_sum)``;
   - ``rank``: Nicheformer/STAMP-style tokens: ``count / library * target_sum``, divided by a
     per-gene mean when given (genes with a non-positive or missing mean are an error), sorted
     descending (ties: lower column first), the top ``context_length`` non-zero genes as ids
     ``column + token_offset``, padded with 0.

The mask (``expr_mask``) is True where the sample's slide measured the gene
(``slides.parquet`` ``measured_genes``, projected the same way): a gene the slide did not
measure is not a zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from stcorpus.loaders.errors import LoaderSettingsError
from stcorpus.loaders.settings import GeneSettings

if TYPE_CHECKING:
    import pyarrow as pa

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


@dataclass
class GeneSpace:
    """Vocabulary -> output columns: ``lut[vocab_index]`` is the column, or -1 when dropped.

    Output columns are keyed by Ensembl id (``ensembl_ids``). After the mouse -> human projection
    a column may be a human gene that is not itself in the vocabulary (``genes.parquet`` keeps
    ``human_ortholog_id`` for those); its ``indices`` entry is then -1.
    """

    lut: IntArray
    indices: IntArray  # vocabulary index of each output column's gene, -1 if not in the vocabulary
    ensembl_ids: list[str]
    dropped: list[str] = field(default_factory=list)  # mouse genes without a one-to-one human ortholog
    #: Vocabulary genes moved to another gene's column by the projection (mouse -> human).
    projected: npt.NDArray[np.bool_] | None = None
    #: No two genes of the same group (projected / not) share a column: only a sample that mixes
    #: both groups can need summing (``collide``).
    injective: bool = True

    @property
    def size(self) -> int:
        """Number of output columns."""
        return len(self.indices)

    @classmethod
    def build(cls, genes: pa.Table, settings: GeneSettings) -> GeneSpace:
        """The gene space of ``settings`` over the vocabulary ``genes`` (``genes.parquet``)."""
        n = genes.num_rows
        ids: list[str] = genes.column("ensembl_id").to_pylist()
        species: list[str] = genes.column("species").to_pylist()
        target: list[str | None] = list(ids)
        dropped: list[str] = []
        if settings.to_human:
            index = genes.column("human_ortholog").to_pylist()
            names = genes.schema.names
            ortholog_ids = genes.column("human_ortholog_id").to_pylist() if "human_ortholog_id" in names else [None] * n
            for i in range(n):
                if species[i] == "human":
                    continue
                target[i] = ortholog_ids[i] or (ids[index[i]] if index[i] is not None else None)
                if target[i] is None:
                    dropped.append(ids[i])
        out = _selected(genes, settings, ids, target)
        column = {g: k for k, g in enumerate(out)}
        lut = np.array([column.get(t, -1) if t is not None else -1 for t in target], dtype=np.int64)
        vocab = {g: i for i, g in enumerate(ids)}
        projected = np.array([t is not None and t != g for t, g in zip(target, ids, strict=True)], dtype=np.bool_)
        injective = all(
            len(np.unique(cols)) == len(cols) for cols in (lut[(lut >= 0) & projected], lut[(lut >= 0) & ~projected])
        )
        return cls(
            lut=lut,
            indices=np.array([vocab.get(g, -1) for g in out], dtype=np.int64),
            ensembl_ids=out,
            dropped=dropped,
            projected=projected if projected.any() else None,
            injective=injective,
        )

    def collide(self, row: IntArray, genes: IntArray) -> bool:
        """True if two of a sample's genes may land on one column (then values are summed)."""
        if not self.injective:
            return True
        if self.projected is None or not len(row):
            return False
        moved = self.projected[genes]
        n = int(row.max()) + 1
        count = np.bincount(row, minlength=n)
        moved_count = np.bincount(row, weights=moved, minlength=n)
        return bool(np.any((moved_count > 0) & (moved_count < count)))


def _unique(values: list[str | None]) -> list[str]:
    """Values in first-seen order, without None or repeats."""
    return list(dict.fromkeys(v for v in values if v is not None))


def _selected(genes: pa.Table, settings: GeneSettings, ids: list[str], target: list[str | None]) -> list[str]:
    """Ensembl ids of the output columns, in order (projection already applied through ``target``)."""
    n = genes.num_rows
    if settings.panel is not None:
        panels = genes.column("panels").to_pylist()
        chosen = [target[i] for i in range(n) if settings.panel in (panels[i] or [])]
        if not chosen:
            known = sorted({p for ps in panels for p in (ps or [])})
            raise LoaderSettingsError(f"no gene is in panel {settings.panel!r}; panels in genes.parquet: {known}")
        return _unique(chosen)
    if not settings.genes:
        return _unique(target)
    by_id = {g: i for i, g in enumerate(ids)}
    targets = set(_unique(target))
    out: list[str] = []
    missing: list[str] = []
    orphans: list[str] = []
    for g in settings.genes:
        if isinstance(g, int):
            if not 0 <= g < n:
                missing.append(str(g))
            elif target[g] is None:
                orphans.append(ids[g])
            else:
                out.append(target[g])  # type: ignore[arg-type]
            continue
        name = g.split(".", 1)[0]  # unversioned
        if name in targets:
            out.append(name)
        elif name in by_id and target[by_id[name]] is None:
            orphans.append(name)
        elif name in by_id:
            out.append(target[by_id[name]])  # type: ignore[arg-type]
        else:
            missing.append(g)
    if missing:
        raise LoaderSettingsError(f"{len(missing)} selected genes are not in the vocabulary: {missing[:5]}")
    if orphans:
        raise LoaderSettingsError(
            f"genes.to_human: {len(orphans)} selected genes have no one-to-one human ortholog: {orphans[:5]}"
        )
    if len(set(out)) != len(out):
        raise LoaderSettingsError("genes.genes names a gene twice (after the projection to human)")
    return out


@dataclass
class Flat:
    """A batch of sparse vectors, concatenated: sample ``row[i]`` has ``values[i]`` at ``genes[i]``."""

    row: IntArray
    genes: IntArray
    values: npt.NDArray[np.float64]
    n: int

    @classmethod
    def of(cls, genes: Sequence[npt.NDArray[Any]], values: Sequence[npt.NDArray[Any]]) -> Flat:
        """Concatenate per-sample ``genes``/``values``."""
        lengths = np.fromiter(map(len, genes), dtype=np.int64, count=len(genes))
        if len(genes) == 0 or lengths.sum() == 0:
            empty = np.zeros(0, dtype=np.int64)
            return cls(empty, empty, np.zeros(0), len(genes))
        return cls(
            row=np.repeat(np.arange(len(genes), dtype=np.int64), lengths),
            genes=np.concatenate(genes).astype(np.int64, copy=False),
            values=np.concatenate(values).astype(np.float64, copy=False),
            n=len(genes),
        )


class GeneTransform:
    """Turns sparse raw counts of a batch into the batch's ``expr`` (+ mask) or ``tokens``."""

    def __init__(
        self,
        space: GeneSpace,
        settings: GeneSettings,
        *,
        measured: Mapping[str, IntArray],
        means: npt.NDArray[np.floating[Any]] | None = None,
    ) -> None:
        self.space = space
        self.settings = settings
        self.kind = settings.transform
        self.measured = measured
        self._masks: dict[str, npt.NDArray[np.bool_]] = {}
        self._mask_rows: dict[str, int] = {}  # slide -> its row of _mask_table
        self._mask_table: npt.NDArray[np.bool_] | None = None
        self.means: npt.NDArray[np.float64] | None = None
        if means is not None:
            means = np.asarray(means, dtype=np.float64)
            if len(means) == len(space.lut) and len(means) != space.size:
                if (space.indices < 0).any():
                    raise LoaderSettingsError(
                        "gene means over the vocabulary cannot cover human orthologs outside it: "
                        f"give one mean per selected gene ({space.size})"
                    )
                means = means[space.indices]
            if len(means) != space.size:
                raise LoaderSettingsError(
                    f"gene means have {len(means)} values; need one per vocabulary gene ({len(space.lut)}) "
                    f"or per selected gene ({space.size})"
                )
            bad = ~np.isfinite(means) | (means <= 0)
            if bad.any():
                raise LoaderSettingsError(
                    f"{int(bad.sum())} gene means are not positive finite numbers (e.g. "
                    f"{[space.ensembl_ids[i] for i in np.flatnonzero(bad)[:3]]}): drop those genes or fix the means"
                )
            self.means = means.astype(np.float64)

    # -- masks -------------------------------------------------------------------------------

    def mask(self, slide_ids: Sequence[str]) -> npt.NDArray[np.bool_]:
        """``(B, G)`` True where each sample's slide measured the gene."""
        # One row per slide seen so far; a batch's mask is one gather from those rows.
        rows = self._mask_rows
        index = [rows.get(slide) for slide in slide_ids]
        if None in index:
            for slide in slide_ids:
                self._slide_mask(slide)
            index = [rows[slide] for slide in slide_ids]
        table = self._mask_table
        if table is None or len(table) < len(rows):
            table = self._mask_table = np.stack([self._masks[slide] for slide in rows]) if rows else None
        if table is None:
            return np.zeros((0, self.space.size), dtype=np.bool_)
        return table[np.asarray(index, dtype=np.intp)]

    def _slide_mask(self, slide: str) -> npt.NDArray[np.bool_]:
        mask = self._masks.get(slide)
        if mask is None:
            mask = np.zeros(self.space.size, dtype=np.bool_)
            genes = self.measured.get(slide)
            if genes is not None and len(genes):
                cols = self.space.lut[genes]
                mask[cols[cols >= 0]] = True
            self._masks[slide] = mask
            self._mask_rows[slide] = len(self._mask_rows)
        return mask

    # -- values ------------------------------------------------------------------------------

    def library(self, flat: Flat) -> npt.NDArray[np.float64]:
        """Library size of each sample: the sum of all its counts."""
        return np.bincount(flat.row, weights=flat.values, minlength=flat.n).astype(np.float64)

    def dense(self, flat: Flat, *, scale: npt.NDArray[np.float64] | None = None) -> FloatArray:
        """``(B, G)`` float32 of the dense transforms (``counts``, ``log1p``, ``cp10k_log1p``).

        ``scale`` divides each sample's counts first (the niche average over neighbours).
        """
        values = flat.values
        if scale is not None:
            values = values / scale[flat.row]
        if self.kind == "cp10k_log1p":
            library = np.bincount(flat.row, weights=values, minlength=flat.n)
            values = values / np.maximum(library, 1e-12)[flat.row] * self.settings.target_sum
        cols = self.space.lut[flat.genes]
        keep = cols >= 0
        out = np.zeros((flat.n, self.space.size), dtype=np.float32)
        if not self.space.collide(flat.row, flat.genes):
            vals = values[keep]
            if self.kind != "counts":
                vals = np.log1p(vals)
            out[flat.row[keep], cols[keep]] = vals
        else:
            np.add.at(out, (flat.row[keep], cols[keep]), values[keep])
            if self.kind != "counts":
                np.log1p(out, out=out)
        return out

    def tokens(self, flat: Flat) -> tuple[IntArray, npt.NDArray[np.bool_]]:
        """``(B, L)`` rank tokens and their mask (True on real tokens)."""
        length = self.settings.context_length
        library = np.maximum(self.library(flat), 1e-12)
        values = flat.values / library[flat.row] * self.settings.target_sum
        cols = self.space.lut[flat.genes]
        keep = (cols >= 0) & (values > 0)
        row, col, val = flat.row[keep], cols[keep], values[keep]
        if len(row) and self.space.collide(flat.row, flat.genes):
            # Two vocabulary genes on one column (projection): sum them first.
            key = row * self.space.size + col
            uniq, inverse = np.unique(key, return_inverse=True)
            val = np.bincount(inverse, weights=val).astype(np.float64)
            row, col = uniq // self.space.size, uniq % self.space.size
        if self.means is not None:
            val = val / self.means[col]
        order = np.lexsort((col, -val, row))
        row, col = row[order], col[order]
        starts = np.searchsorted(row, np.arange(flat.n))
        rank = np.arange(len(row)) - starts[row]
        take = rank < length
        tokens = np.zeros((flat.n, length), dtype=np.int64)
        tokens[row[take], rank[take]] = col[take] + self.settings.token_offset
        mask = np.zeros((flat.n, length), dtype=np.bool_)
        mask[row[take], rank[take]] = True
        return tokens, mask

    @property
    def vocab_size(self) -> int:
        """Token ids are ``< vocab_size`` (rank transform): ``token_offset + G``."""
        return self.settings.token_offset + self.space.size


def load_means(path: str) -> npt.NDArray[np.float64]:
    """A gene-mean vector saved with ``numpy.save``."""
    try:
        means = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise LoaderSettingsError(f"genes.gene_means: cannot read {path!r} as a .npy vector: {exc}") from exc
    if means.ndim != 1:
        raise LoaderSettingsError(f"genes.gene_means: {path!r} holds a {means.ndim}-D array, expected a vector")
    return np.asarray(means, dtype=np.float64)
