"""Per-slide gene mapping: a slide's features -> sorted unique Ensembl ids, counts re-indexed onto them.

A feature is mapped by its Ensembl id when it has one the reference knows (Space Ranger), else
by its name through the name tiers of :mod:`stcorpus.curate.genes.reference` (HEST h5ad, STimage); a
scanpy ``var_names_make_unique`` suffix (``TBCE-1``) is dropped only when the full name is
unknown and the base name maps. Features landing on one gene are summed. Nothing is dropped
without a number: the :class:`MappingReport` counts every feature and every count by outcome.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from stcorpus.curate.errors import GeneMappingError
from stcorpus.curate.genes.panels import PANELS, check_panels
from stcorpus.curate.genes.reference import (
    GeneReference,
    NameMatch,
    Tier,
    check_species,
    id_species,
    load_reference,
    normalise_id,
)

if TYPE_CHECKING:
    import scipy.sparse as sp

    from stcorpus.curate.slide import Features

#: Default of ``min_mapped_fraction``. A Space Ranger feature list maps >99% by id and a
#: symbol-only list from the same reference >99% by name, while a slide whose species is wrong
#: (mouse ids on a human slide) or whose feature table is broken (row numbers, probe ids) maps
#: next to nothing: half the features separates the two with a wide margin on either side, and
#: still admits old references and custom panels with many unnamed features.
DEFAULT_MIN_MAPPED_FRACTION: Final = 0.5

#: How many examples of each problem a report keeps.
DEFAULT_MAX_EXAMPLES: Final = 20

# scanpy/anndata ``var_names_make_unique`` appends "-1", "-2", ...; R's make.unique ".1", ".2".
_UNIQUE_SUFFIX: Final = re.compile(r"^(.+?)[-.](\d+)$")

# Why a feature is unmapped (keys of MappingReport.unmapped_reasons).
UNKNOWN_NAME: Final = "unknown_name"  # no tier knows the name (and the id, if any, is unknown too)
UNKNOWN_ID: Final = "unknown_id"  # an id the reference does not know, with no name to fall back on
OTHER_SPECIES: Final = "other_species"  # an Ensembl id of another species (ENSMUSG on a human slide)
NO_ENSEMBL_ID: Final = "no_ensembl_id"  # the name is an approved symbol of a gene without an Ensembl id
EMPTY: Final = "empty"  # neither an id nor a name


@dataclass(frozen=True)
class MappingReport:
    """How a slide's features found their genes, and what was lost; ``to_dict()`` for JSON.

    Feature counts: ``n_features = mapped + ambiguous + unmapped``; ``mapped`` splits into the
    ``by_*`` counts and includes ``outside_panel`` features (mapped, but not kept). Count totals
    are sums of the matrix entries of those features.
    """

    species: str
    n_features: int
    n_genes: int  # unique Ensembl ids kept (the slide's measured genes)
    panel: tuple[str, ...] | None
    by_id: int
    by_approved: int
    by_ensembl_name: int
    by_reference_name: int
    by_previous: int
    by_alias: int
    by_make_unique: int
    by_case_insensitive: int  # name matches that needed a change of case (part of the by_* above)
    id_fallback: int  # features whose id is unknown (retired) but whose name mapped
    ambiguous: int
    unmapped: int
    unmapped_reasons: dict[str, int]
    outside_panel: int
    conflicts: int  # mapped by id, but the name maps to another gene (the id wins)
    total_counts: float
    counts_ambiguous: float
    counts_unmapped: float
    counts_outside_panel: float
    ambiguous_examples: list[dict[str, Any]] = field(default_factory=list)
    unmapped_examples: list[dict[str, Any]] = field(default_factory=list)
    conflict_examples: list[dict[str, Any]] = field(default_factory=list)
    fallback_examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mapped(self) -> int:
        """Features that found a gene (kept or outside the panel)."""
        return self.n_features - self.ambiguous - self.unmapped

    @property
    def mapped_fraction(self) -> float:
        """``mapped / n_features`` (0 for a slide without features)."""
        return self.mapped / self.n_features if self.n_features else 0.0

    @property
    def merged(self) -> int:
        """Kept features that were summed into a gene another feature also maps to."""
        return self.mapped - self.outside_panel - self.n_genes

    @property
    def counts_lost(self) -> float:
        """Counts of features not kept: ambiguous, unmapped and outside the panel."""
        return self.counts_ambiguous + self.counts_unmapped + self.counts_outside_panel

    @property
    def lost_fraction(self) -> float:
        """``counts_lost / total_counts`` (0 for a slide without counts)."""
        return self.counts_lost / self.total_counts if self.total_counts else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data, with the derived figures."""
        data = asdict(self)
        data["panel"] = list(self.panel) if self.panel is not None else None
        data.update(
            mapped=self.mapped,
            mapped_fraction=self.mapped_fraction,
            merged=self.merged,
            counts_lost=self.counts_lost,
            lost_fraction=self.lost_fraction,
        )
        return data

    def summary(self) -> str:
        """One line for logs and quarantine reasons."""
        return (
            f"{self.mapped:,}/{self.n_features:,} features mapped ({self.mapped_fraction:.1%}) onto "
            f"{self.n_genes:,} {self.species} genes: {self.by_id:,} by id, "
            f"{self.mapped - self.by_id:,} by name; {self.ambiguous:,} ambiguous, {self.unmapped:,} unmapped, "
            f"{self.outside_panel:,} outside the panel; {self.lost_fraction:.2%} of counts not kept"
        )


@dataclass(frozen=True)
class SlideGenes:
    """A slide's counts on its measured genes.

    ``gene_ids`` are the sorted unique Ensembl ids the slide measured (every mapped feature on the
    panel, zero or not: not on the panel differs from 0); ``counts`` is spots x genes with the
    source dtype, features of one gene summed; ``feature_index[i]`` is the column of source
    feature ``i`` in ``gene_ids``, or -1 where it was not kept.
    """

    species: str
    gene_ids: npt.NDArray[np.str_]
    counts: sp.csr_matrix
    report: MappingReport
    feature_index: npt.NDArray[np.int32]


@dataclass(frozen=True)
class _Outcome:
    key: str | None  # the Ensembl id, when mapped
    tier: Tier | None
    case_insensitive: bool = False
    fallback: bool = False  # the id was unknown and the name decided
    ambiguous: tuple[str, ...] = ()
    reason: str = ""  # why unmapped
    conflict: str | None = None  # the gene the name maps to, when it differs from the id's


def _resolve_name(reference: GeneReference, name: str, *, case_insensitive: bool) -> tuple[NameMatch, bool]:
    """The name's match, trying a make_unique base when the full name is unknown; (match, used_suffix)."""
    match = reference.resolve(name, case_insensitive=case_insensitive)
    if match.tier is None:
        suffixed = _UNIQUE_SUFFIX.match(name.strip())
        if suffixed:
            base = reference.resolve(suffixed.group(1), case_insensitive=case_insensitive)
            if base.tier is not None:
                return base, True
    return match, False


def _name_outcome(
    reference: GeneReference, name: str, *, case_insensitive: bool, fallback: bool, unknown: str
) -> _Outcome:
    match, suffix = _resolve_name(reference, name, case_insensitive=case_insensitive)
    if match.ambiguous:
        return _Outcome(key=None, tier=match.tier, ambiguous=match.candidates)
    if match.key is None:
        return _Outcome(key=None, tier=None, reason=unknown)
    if match.key not in reference:
        return _Outcome(key=None, tier=match.tier, reason=NO_ENSEMBL_ID)
    tier = Tier.MAKE_UNIQUE if suffix else match.tier
    return _Outcome(key=match.key, tier=tier, case_insensitive=match.case_insensitive, fallback=fallback)


def _map_feature(reference: GeneReference, raw_id: str, raw_name: str, *, case_insensitive: bool) -> _Outcome:
    """Map one feature: by id if the reference knows it, else by name; record id/name conflicts."""
    name = raw_name.strip()
    gene_id = normalise_id(raw_id) if raw_id else None
    if gene_id is None and name:
        # HEST files and header-less matrices often carry the id in the name column.
        gene_id = normalise_id(name)
        if gene_id is not None:
            name = ""
    if gene_id is not None:
        if gene_id in reference:
            conflict = None
            if name and normalise_id(name) is None:
                match, _ = _resolve_name(reference, name, case_insensitive=case_insensitive)
                if match.key is not None and match.key != gene_id and match.key in reference:
                    conflict = match.key
            return _Outcome(key=gene_id, tier=Tier.ID, conflict=conflict)
        species = id_species(gene_id)
        if species != reference.species:
            # Not a retired id but the wrong species: a name fall-back would map mouse symbols
            # onto human genes case-insensitively and hide the mistake.
            return _Outcome(key=None, tier=None, reason=OTHER_SPECIES)
        if not name:
            return _Outcome(key=None, tier=None, reason=UNKNOWN_ID)
        return _name_outcome(reference, name, case_insensitive=case_insensitive, fallback=True, unknown=UNKNOWN_ID)
    if not name:
        return _Outcome(key=None, tier=None, reason=EMPTY)
    return _name_outcome(reference, name, case_insensitive=case_insensitive, fallback=False, unknown=UNKNOWN_NAME)


def _text(value: object) -> str:
    """A feature field as text: h5py hands out bytes, pandas NaN for a missing name."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def _column_sums(matrix: sp.csr_matrix) -> npt.NDArray[Any]:
    """Per-feature sums: int64 for integer counts, float64 otherwise."""
    dtype = np.int64 if matrix.dtype.kind in "iub" else np.float64
    return np.asarray(matrix.sum(axis=0, dtype=dtype)).ravel()


def _total(values: npt.NDArray[Any], mask: npt.NDArray[np.bool_]) -> float:
    total = values[mask].sum()
    return int(total) if values.dtype.kind in "iu" else float(total)


def map_slide_genes(
    features: Features,
    counts: sp.spmatrix | sp.sparray,
    *,
    species: str,
    panel: str | list[str] | tuple[str, ...] | None = None,
    min_mapped_fraction: float = DEFAULT_MIN_MAPPED_FRACTION,
    case_insensitive: bool = True,
    reference: GeneReference | None = None,
    slide_id: str | None = None,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
) -> SlideGenes:
    """Map a slide's features onto Ensembl ids and re-index its counts onto the measured genes.

    ``features`` names the columns of ``counts`` (spots x features, any scipy sparse format) as
    the source gives them. ``panel`` keeps only genes of those named panels (the rest are counted
    as ``outside_panel``). Raises ``UnsupportedSpeciesError`` for a species without gene tables,
    and ``GeneMappingError`` when fewer than ``min_mapped_fraction`` of the features map.

    >>> genes = map_slide_genes(slide.features, slide.counts, species="human")  # doctest: +SKIP
    >>> genes.report.summary()  # doctest: +SKIP
    '36,553/36,601 features mapped (99.9%) onto 36,549 human genes: ...'
    """
    import scipy.sparse as sp

    check_species(species, slide_id=slide_id)
    panels = check_panels(panel)
    if panels is not None and not any(PANELS[p].species == species for p in panels):
        names = ", ".join(panels)
        raise GeneMappingError(
            f"panel(s) {names} hold no {species} gene: every feature of this slide would be dropped; "
            f"choose {species} panels or no panel",
            slide_id=slide_id,
        )
    if reference is None:
        reference = load_reference(species)
    elif reference.species != species:
        raise ValueError(f"reference is for {reference.species}, slide species is {species}")
    matrix = sp.csr_matrix(counts)
    n_spots, n_features = matrix.shape
    if n_features != len(features):
        raise ValueError(f"counts has {n_features} columns but there are {len(features)} features")
    where = f"slide {slide_id}: " if slide_id else ""
    if n_features == 0:
        raise GeneMappingError(f"{where}the slide has no features; check its matrix", slide_id=slide_id)

    outcomes = [
        _map_feature(reference, _text(raw_id), _text(raw_name), case_insensitive=case_insensitive)
        for raw_id, raw_name in zip(features.ids.tolist(), features.names.tolist(), strict=True)
    ]
    keys = [o.key for o in outcomes]
    in_panel = [key is not None and (panels is None or any(p in panels for p in reference.panels(key))) for key in keys]
    gene_ids = np.array(sorted({k for k, keep in zip(keys, in_panel, strict=True) if keep and k}), dtype=np.str_)
    column = {gene_id: i for i, gene_id in enumerate(gene_ids.tolist())}
    feature_index = np.array(
        [column[k] if keep and k else -1 for k, keep in zip(keys, in_panel, strict=True)], dtype=np.int32
    )

    # Re-index: every stored entry moves to its gene's column; entries of dropped features go.
    # Duplicate columns within a row (two features, one gene) are summed by sum_duplicates, which
    # keeps the source dtype.
    target = feature_index[matrix.indices]
    keep = target >= 0
    dropped_at = np.flatnonzero(~keep)  # few: a cumulative sum over every entry would cost more
    dropped_rows = np.searchsorted(matrix.indptr, dropped_at, side="right") - 1
    kept_per_row = np.diff(matrix.indptr) - np.bincount(dropped_rows, minlength=n_spots)
    indptr = np.zeros(n_spots + 1, dtype=np.int64)
    np.cumsum(kept_per_row, out=indptr[1:])
    mapped = sp.csr_matrix(
        (matrix.data[keep], target[keep].astype(np.int32), indptr), shape=(n_spots, len(gene_ids)), dtype=matrix.dtype
    )
    mapped.sum_duplicates()

    report = _report(
        outcomes,
        in_panel,
        _column_sums(matrix),
        species=species,
        panels=panels,
        n_genes=len(gene_ids),
        features=features,
        max_examples=max_examples,
    )
    if report.mapped_fraction < min_mapped_fraction:
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in report.unmapped_reasons.items())
        examples = ", ".join(repr(e["name"] or e["id"]) for e in report.unmapped_examples[:5])
        raise GeneMappingError(
            f"{where}only {report.mapped:,} of {report.n_features:,} features ({report.mapped_fraction:.1%}) map to "
            f"{species} genes, below the {min_mapped_fraction:g} required: {report.ambiguous:,} ambiguous, "
            f"{report.unmapped:,} unmapped ({reasons}; e.g. {examples}). Check the slide's species and that its "
            "feature table holds gene ids or symbols (or accept fewer knowingly: `curate build "
            "--min-mapped-fraction`)",
            slide_id=slide_id,
        )
    return SlideGenes(species=species, gene_ids=gene_ids, counts=mapped, report=report, feature_index=feature_index)


def _report(
    outcomes: list[_Outcome],
    in_panel: list[bool],
    column_sums: npt.NDArray[Any],
    *,
    species: str,
    panels: tuple[str, ...] | None,
    n_genes: int,
    features: Features,
    max_examples: int,
) -> MappingReport:
    ids = features.ids.tolist()
    names = features.names.tolist()
    tiers = Counter(o.tier for o in outcomes if o.key is not None)
    ambiguous = np.array([bool(o.ambiguous) for o in outcomes])
    unmapped = np.array([o.key is None and not o.ambiguous for o in outcomes])
    outside = np.array([o.key is not None and not keep for o, keep in zip(outcomes, in_panel, strict=True)])

    def example(i: int, **extra: Any) -> dict[str, Any]:
        return {"index": i, "id": str(ids[i]), "name": str(names[i]), **extra}

    ambiguous_examples = [
        example(i, candidates=list(o.ambiguous), tier=o.tier.value if o.tier else None)
        for i, o in enumerate(outcomes)
        if o.ambiguous
    ][:max_examples]
    unmapped_examples = [example(i, reason=o.reason) for i, o in enumerate(outcomes) if unmapped[i]][:max_examples]
    conflict_examples = [example(i, name_maps_to=o.conflict) for i, o in enumerate(outcomes) if o.conflict][
        :max_examples
    ]
    fallback_examples = [
        example(i, mapped_to=o.key, tier=o.tier.value if o.tier else None) for i, o in enumerate(outcomes) if o.fallback
    ][:max_examples]
    return MappingReport(
        species=species,
        n_features=len(outcomes),
        n_genes=n_genes,
        panel=panels,
        by_id=tiers[Tier.ID],
        by_approved=tiers[Tier.APPROVED],
        by_ensembl_name=tiers[Tier.ENSEMBL],
        by_reference_name=tiers[Tier.REFERENCE],
        by_previous=tiers[Tier.PREVIOUS],
        by_alias=tiers[Tier.ALIAS],
        by_make_unique=tiers[Tier.MAKE_UNIQUE],
        by_case_insensitive=sum(1 for o in outcomes if o.key is not None and o.case_insensitive),
        id_fallback=sum(1 for o in outcomes if o.key is not None and o.fallback),
        ambiguous=int(ambiguous.sum()),
        unmapped=int(unmapped.sum()),
        unmapped_reasons=dict(sorted(Counter(o.reason for o, u in zip(outcomes, unmapped, strict=True) if u).items())),
        outside_panel=int(outside.sum()),
        conflicts=sum(1 for o in outcomes if o.conflict),
        total_counts=_total(column_sums, np.ones(len(outcomes), dtype=bool)),
        counts_ambiguous=_total(column_sums, ambiguous),
        counts_unmapped=_total(column_sums, unmapped),
        counts_outside_panel=_total(column_sums, outside),
        ambiguous_examples=ambiguous_examples,
        unmapped_examples=unmapped_examples,
        conflict_examples=conflict_examples,
        fallback_examples=fallback_examples,
    )


__all__ = [
    "DEFAULT_MIN_MAPPED_FRACTION",
    "MappingReport",
    "SlideGenes",
    "map_slide_genes",
]
