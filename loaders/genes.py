"""The gene space of a gene-side transform: which vocabulary gene lands in which output column.

Shards store raw counts, sparse (vocabulary indices + counts). The transform
(``stcorpus.loaders.expression.ExpressionTransform``) runs per batch as tensor operations over
the batch's concatenated non-zeros, on the device that consumes the batch; this module decides
its columns once, from ``genes.parquet``:

1. **Projection** (``to_human``): a mouse gene's counts move to its one-to-one human ortholog
   (``genes.parquet`` ``human_ortholog_id``, so also onto human genes the vocabulary does not
   hold: a mouse-only corpus projects too); a mouse gene without one drops out
   (``GeneSpace.dropped`` lists them). Human genes stay.
2. **Selection**: a panel (``genes.parquet`` ``panels``, applied to the vocabulary genes before
   their projection), explicit vocabulary indices or Ensembl ids, or else the genes the corpus
   measured (``genes.parquet`` ``measured``; ``measured_only: false``: every gene of the
   vocabulary, the references' ~128k). Output column ``k`` is the gene ``GeneSpace.ensembl_ids[k]``.
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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    #: No two genes of the same group (projected / not) share a column.
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
        if settings.measured_only and "measured" in genes.column_names:
            measured = genes.column("measured").to_pylist()
            return _unique([target[i] for i in range(n) if measured[i]])
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


def load_means(path: str) -> npt.NDArray[np.float64]:
    """A gene-mean vector saved with ``numpy.save``."""
    try:
        means = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise LoaderSettingsError(f"genes.gene_means: cannot read {path!r} as a .npy vector: {exc}") from exc
    if means.ndim != 1:
        raise LoaderSettingsError(f"genes.gene_means: {path!r} holds a {means.ndim}-D array, expected a vector")
    return np.asarray(means, dtype=np.float64)
