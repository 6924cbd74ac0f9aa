"""Gene harmonisation: every slide's counts on one Ensembl-keyed gene axis.

- :func:`map_slide_genes` maps a slide's features (Ensembl ids and/or symbols, as the source
  gives them) to unversioned Ensembl ids through the shipped HGNC / MGI / Ensembl tables, sums
  features that land on one gene and reports every feature and count it could not place.
- :func:`build_vocabulary` gives ``genes.parquet``: every gene of the shipped references (of the
  build's panels), at indices that depend on nothing else, and which of them the corpus measured.
- :func:`vocabulary_indices` / :class:`GeneIndex` place a slide's genes in the vocabulary.
- :func:`reference_sources` gives the versions and licences of the tables for ``corpus.json``.

Arrow is imported only by the vocabulary functions that build tables.
"""

from stcorpus.curate.genes.mapping import DEFAULT_MIN_MAPPED_FRACTION, MappingReport, SlideGenes, map_slide_genes
from stcorpus.curate.genes.panels import PANELS, Panel, check_panels
from stcorpus.curate.genes.reference import (
    GENE_SPECIES,
    GeneReference,
    Tier,
    load_reference,
    normalise_id,
    reference_sources,
)
from stcorpus.curate.genes.vocabulary import (
    MEASURED,
    GeneIndex,
    MeasuredGenes,
    build_vocabulary,
    reference_vocabulary,
    vocabulary_arrow_schema,
    vocabulary_digest,
    vocabulary_indices,
    with_measured,
)

__all__ = [
    "DEFAULT_MIN_MAPPED_FRACTION",
    "GENE_SPECIES",
    "MEASURED",
    "PANELS",
    "GeneIndex",
    "GeneReference",
    "MappingReport",
    "MeasuredGenes",
    "Panel",
    "SlideGenes",
    "Tier",
    "build_vocabulary",
    "check_panels",
    "load_reference",
    "map_slide_genes",
    "normalise_id",
    "reference_sources",
    "reference_vocabulary",
    "vocabulary_arrow_schema",
    "vocabulary_digest",
    "vocabulary_indices",
    "with_measured",
]
