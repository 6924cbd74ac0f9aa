"""Named gene panels: sets of genes a build can restrict its vocabulary to.

Membership is data: ``scripts/build_gene_tables.py`` writes each gene's panels into the shipped
tables from the reference annotations, and ``genes.parquet`` carries them in its ``panels`` column
so loaders can select a panel without importing ``curate``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from stcorpus.curate.errors import SettingsError


@dataclass(frozen=True)
class Panel:
    """A named gene panel: its species and how its members are chosen."""

    name: str
    species: str
    doc: str


#: Every named panel, by name.
PANELS: Final[dict[str, Panel]] = {
    panel.name: panel
    for panel in (
        Panel(
            "human-protein-coding",
            "human",
            "HGNC locus group 'protein-coding gene' (with an Ensembl id)",
        ),
        Panel(
            "human-mt",
            "human",
            "genes of the mitochondrial genome (HGNC location 'mitochondria', with an Ensembl id): "
            "13 protein-coding, 2 rRNA, 22 tRNA",
        ),
        Panel(
            "mouse-protein-coding",
            "mouse",
            "MGI feature type 'protein coding gene' (with an Ensembl id)",
        ),
        Panel(
            "mouse-mt",
            "mouse",
            "genes of the mitochondrial genome (MGI: Ensembl chromosome MT)",
        ),
    )
}


def check_panels(names: Iterable[str] | str | None) -> tuple[str, ...] | None:
    """Validate panel names; return them sorted and unique (``None`` for no panel selection).

    >>> check_panels(["human-mt", "human-protein-coding", "human-mt"])
    ('human-mt', 'human-protein-coding')
    """
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    chosen = tuple(sorted(set(names)))
    if not chosen:
        raise SettingsError("an empty panel selection keeps no gene: name at least one panel, or pass None")
    unknown = [name for name in chosen if name not in PANELS]
    if unknown:
        raise SettingsError(f"unknown gene panel(s) {', '.join(unknown)}; panels are: {', '.join(sorted(PANELS))}")
    return chosen


__all__ = ["PANELS", "Panel", "check_panels"]
