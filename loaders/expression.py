"""The gene transform as batched tensor operations, on whatever device consumes the batch.

A loader batch carries each sample's raw counts sparse: ``genes`` (vocabulary indices),
``counts`` and ``offsets`` (sample ``b`` owns ``offsets[b]:offsets[b + 1]``), the same for the
niche, and ``slide_index`` (the row of the sample's slide in this transform's table of measured
genes). :class:`ExpressionTransform` turns that into what gene encoders read, with the steps of
``stcorpus.loaders.genes`` (projection ``to_human``, selection by panel or genes, then the value
transform):

- ``counts`` / ``log1p`` / ``cp10k_log1p`` -> ``expr`` float32 ``(B, G)`` and ``expr_mask`` bool
  ``(B, G)`` (True where the slide measured the gene), and ``niche`` ``(B, G)`` when asked for;
- ``rank`` -> ``tokens`` int64 ``(B, L)`` and ``tokens_mask`` (and ``niche_tokens``...).

Everything is a handful of tensor operations over the batch's concatenated non-zeros (a scatter
into the dense output, two stable sorts for rank tokens), with no host synchronisation on the
dense path, so in training it runs on the GPU after the sparse batch was copied there: a batch
of 256 spots at 3,000 genes moves 6 MB instead of 61 MB of dense floats and 15 MB of mask.
The library size of a spot is the sum of all its counts, before projection and selection.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from stcorpus import schema
from stcorpus.loaders.errors import LoaderSettingsError
from stcorpus.loaders.genes import GeneSpace
from stcorpus.loaders.settings import GeneSettings

B = schema.Batch


def sparse_rows(offsets: Tensor, nnz: int) -> Tensor:
    """The sample (row) of each of the ``nnz`` concatenated non-zeros, from the ``(B + 1)`` offsets."""
    n = offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    rows = torch.arange(n, device=offsets.device)
    # output_size keeps CUDA from synchronising to learn the length.
    return torch.repeat_interleave(rows, lengths, output_size=nnz)


def to_csr(batch: Mapping[str, Any], *, n_genes: int, niche: bool = False) -> Tensor:
    """The raw counts of a sparse batch as a ``torch.sparse_csr_tensor`` of shape ``(B, n_genes)``."""
    prefix = "niche_" if niche else ""
    offsets, genes, counts = batch[f"{prefix}offsets"], batch[f"{prefix}genes"], batch[f"{prefix}counts"]
    size = (offsets.numel() - 1, n_genes)
    return torch.sparse_csr_tensor(offsets, genes.long(), counts, size=size, check_invariants=False)


class ExpressionTransform:
    """Sparse raw counts of a batch -> ``expr``/``expr_mask``/``niche`` or rank ``tokens`` (any device).

    Picklable (DataLoader workers run it with ``genes.output: dense``); its tables are copied to a
    device the first time a batch on that device arrives.
    """

    def __init__(
        self,
        space: GeneSpace,
        settings: GeneSettings,
        *,
        measured: Mapping[str, npt.NDArray[np.integer[Any]]],
        slides: Sequence[str] | None = None,
        means: npt.NDArray[np.floating[Any]] | None = None,
    ) -> None:
        self.space = space
        self.settings = settings
        self.kind = settings.transform
        self.slides = list(slides if slides is not None else sorted(measured))
        self.slide_rows = {slide: i for i, slide in enumerate(self.slides)}
        self.measured = {slide: np.asarray(measured.get(slide, ()), dtype=np.int64) for slide in self.slides}
        self.means = _checked_means(means, space) if means is not None else None
        # Two vocabulary genes can share an output column only after the mouse -> human projection.
        self.collisions = space.projected is not None or not space.injective
        kept = space.lut[space.lut >= 0]
        self.monotone = bool(np.all(np.diff(kept) > 0)) if kept.size > 1 else True
        self._tables: dict[str, dict[str, Tensor]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tables"] = {}  # device tensors do not travel; each process makes its own
        return state

    @property
    def size(self) -> int:
        """Width ``G`` of ``expr``."""
        return self.space.size

    @property
    def vocab_size(self) -> int:
        """Token ids are ``< vocab_size`` (rank transform): ``token_offset + G``."""
        return self.settings.token_offset + self.space.size

    def slide_index(self, slide_ids: Sequence[str]) -> npt.NDArray[np.int64]:
        """Rows of ``slide_ids`` in the measured-gene table (the batch's ``slide_index``)."""
        rows = self.slide_rows
        try:
            return np.fromiter((rows[s] for s in slide_ids), dtype=np.int64, count=len(slide_ids))
        except KeyError as exc:
            raise LoaderSettingsError(f"slide {exc.args[0]!r} is not among the selected slides") from None

    # -- device tables -----------------------------------------------------------------------

    def tables(self, device: torch.device) -> dict[str, Tensor]:
        """The lookup tables on ``device``: vocabulary -> column, measured mask per slide, means."""
        key = str(device)
        found = self._tables.get(key)
        if found is None:
            mask = np.zeros((len(self.slides), self.space.size), dtype=np.bool_)
            for row, slide in enumerate(self.slides):
                genes = self.measured[slide]
                if genes.size:
                    cols = self.space.lut[genes]
                    mask[row, cols[cols >= 0]] = True
            found = {
                "lut": torch.from_numpy(self.space.lut.astype(np.int64)).to(device),
                "mask": torch.from_numpy(mask).to(device),
            }
            if self.means is not None:
                found["means"] = torch.from_numpy(self.means.astype(np.float32)).to(device)
            self._tables[key] = found
        return found

    # -- the transform -----------------------------------------------------------------------

    def __call__(self, batch: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """Replace the sparse entries of ``batch`` by the transform's output (in place; returned)."""
        offsets = batch[B.OFFSETS.value]
        tables = self.tables(offsets.device)
        niche = B.NICHE_OFFSETS.value in batch
        if self.kind == "rank":
            batch[B.TOKENS.value], batch[B.TOKENS_MASK.value] = self.tokens(
                batch[B.GENES.value], batch[B.COUNTS.value], offsets, tables=tables
            )
            if niche:
                batch[B.NICHE_TOKENS.value], batch[B.NICHE_TOKENS_MASK.value] = self.tokens(
                    batch[B.NICHE_GENES.value], batch[B.NICHE_COUNTS.value], batch[B.NICHE_OFFSETS.value], tables=tables
                )
        else:
            batch[B.EXPR.value] = self.dense(batch[B.GENES.value], batch[B.COUNTS.value], offsets, tables=tables)
            batch[B.EXPR_MASK.value] = tables["mask"][batch[B.SLIDE_INDEX.value]]
            if niche:
                scale = None
                if self.settings.niche_average:
                    scale = batch[B.N_NEIGHBORS.value].to(torch.float32).clamp_min(1.0)
                batch[B.NICHE.value] = self.dense(
                    batch[B.NICHE_GENES.value],
                    batch[B.NICHE_COUNTS.value],
                    batch[B.NICHE_OFFSETS.value],
                    tables=tables,
                    scale=scale,
                )
        for name in schema.SPARSE_EXPRESSION:
            batch.pop(name, None)
        return batch

    def dense(
        self,
        genes: Tensor,
        counts: Tensor,
        offsets: Tensor,
        *,
        tables: Mapping[str, Tensor] | None = None,
        scale: Tensor | None = None,
    ) -> Tensor:
        """``(B, G)`` float32 of the dense transforms (``counts``, ``log1p``, ``cp10k_log1p``).

        ``scale`` ``(B,)`` divides each sample's counts first (the niche average over neighbours).
        """
        tables = tables if tables is not None else self.tables(offsets.device)
        n, width = offsets.numel() - 1, self.space.size
        rows = sparse_rows(offsets, genes.numel())
        values = counts.to(torch.float32)
        if scale is not None:
            values = values / scale[rows]
        if self.kind == "cp10k_log1p":
            library = torch.zeros(n, dtype=torch.float32, device=values.device).index_add_(0, rows, values)
            values = values / library.clamp_min(1e-12)[rows] * self.settings.target_sum
        cols = tables["lut"][genes.long()]
        # Dropped genes (column -1) land in one scratch cell past the end: no boolean indexing,
        # which would make a CUDA device wait for the host.
        flat = torch.where(cols >= 0, rows * width + cols, n * width)
        out = torch.zeros(n * width + 1, dtype=torch.float32, device=values.device)
        log = self.kind != "counts"
        if log and not self.collisions:
            values = torch.log1p(values)  # one log per non-zero, not one per cell
        out.index_add_(0, flat, values)
        dense = out[: n * width].view(n, width)
        if log and self.collisions:
            dense.log1p_()  # summed first: two genes on one column are one gene's count
        return dense

    def tokens(
        self, genes: Tensor, counts: Tensor, offsets: Tensor, *, tables: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(B, L)`` rank tokens and their mask (True on real tokens).

        Scaled expression ``count / library * target_sum`` (divided by the gene means when given),
        sorted descending per sample, ties by lower column; ids ``column + token_offset``, padded
        with 0.
        """
        tables = tables if tables is not None else self.tables(offsets.device)
        device = offsets.device
        n, width, length = offsets.numel() - 1, self.space.size, self.settings.context_length
        rows = sparse_rows(offsets, genes.numel())
        values = counts.to(torch.float32)
        library = torch.zeros(n, dtype=torch.float32, device=device).index_add_(0, rows, values)
        values = values / library.clamp_min(1e-12)[rows] * self.settings.target_sum
        cols = tables["lut"][genes.long()]
        valid = (cols >= 0) & (values > 0)
        if self.collisions:
            # Sum genes that share a column (sorted by (row, column) on the way).
            key = torch.where(valid, rows * width + cols.clamp_min(0), n * width)
            key, inverse = torch.unique(key, return_inverse=True)
            values = torch.zeros(key.numel(), dtype=torch.float32, device=device).index_add_(0, inverse, values)
            valid = key < n * width
            # The scratch key (invalid entries) goes to the last row, where it sorts last.
            rows, cols = (key // width).clamp_max(max(n - 1, 0)), key % width
        elif not self.monotone:
            order = torch.argsort(rows * width + cols, stable=True)
            rows, cols, values, valid = rows[order], cols[order], values[order], valid[order]
        if "means" in tables:
            values = values / tables["means"][cols.clamp_min(0)]
        # Entries are in (row, column) order; a stable sort by value, then one by row, leaves
        # each row's entries by descending value with ties in column order. Invalid ones sort last.
        values = torch.where(valid, values, torch.full_like(values, -1.0))
        order = torch.argsort(-values, stable=True)
        order = order[torch.argsort(rows[order], stable=True)]
        rows, cols, valid = rows[order], cols[order], valid[order]
        per_row = torch.bincount(rows, minlength=n)
        starts = torch.cumsum(per_row, 0) - per_row
        rank = torch.arange(rows.numel(), device=device) - starts[rows]
        take = valid & (rank < length)
        slot = torch.where(take, rows * length + rank, n * length)
        tokens = torch.zeros(n * length + 1, dtype=torch.int64, device=device)
        tokens.scatter_(0, slot, cols + self.settings.token_offset)
        mask = torch.zeros(n * length + 1, dtype=torch.bool, device=device)
        mask.scatter_(0, slot, take)
        return tokens[: n * length].view(n, length), mask[: n * length].view(n, length)


def _checked_means(means: npt.NDArray[np.floating[Any]], space: GeneSpace) -> npt.NDArray[np.float64]:
    """Gene means over the selected genes, checked: one positive finite value per output column."""
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
    checked: npt.NDArray[np.float64] = means.astype(np.float64)
    return checked
