"""The shipped gene tables and name resolution: tiers, ambiguity, case rules, versions, sources."""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources

import pytest

from stcorpus.curate.errors import SettingsError, UnsupportedSpeciesError
from stcorpus.curate.genes import PANELS, Tier, check_panels, load_reference, normalise_id, reference_sources
from stcorpus.curate.genes.reference import TABLE_COLUMNS, TABLE_FILES, GeneReference, check_species, read_table

# A small table with every situation name resolution has to decide.
ROWS = [
    {"key": "ENSG00000000001", "symbol": "ALPHA", "previous": "OLD1", "alias": "SHARED|A1"},
    {"key": "ENSG00000000002", "symbol": "BETA", "previous": "OLD2", "alias": "SHARED"},
    {"key": "ENSG00000000003", "symbol": "", "ensembl": "GAMMA-ENS", "reference": "AC000001.1"},
    {"key": "ENSG00000000004", "symbol": "C1orf99", "alias": "ALPHA"},  # an alias equal to another approved
    # Two Ensembl genes share a name (an alternate-haplotype copy); HGNC's previous symbol picks one.
    {"key": "ENSG00000000005", "symbol": "DELTA", "ensembl": "DUP", "previous": "DUP"},
    {"key": "ENSG00000000006", "symbol": "", "ensembl": "DUP"},
    {"key": "HGNC:99", "symbol": "NOID"},  # approved, no Ensembl id
    {"key": "ENSG00000000007", "symbol": "EPS", "alias": "NOID"},
    {"key": "ENSG00000000008", "symbol": "Mixed", "previous": "mixed-old"},
    {"key": "ENSG00000000009", "symbol": "MIXED"},  # differs from "Mixed" only by case
    {"key": "ENSG00000000010", "symbol": "Ab-cD"},  # two more that differ only by case,
    {"key": "ENSG00000000011", "symbol": "aB-Cd"},  # in neither species' convention
]


@pytest.fixture(scope="module")
def toy() -> GeneReference:
    return GeneReference.from_rows("human", ROWS)


def test_normalise_id_strips_versions_and_par_suffix() -> None:
    assert normalise_id("ENSG00000141510.17") == "ENSG00000141510"
    assert normalise_id("ENSG00000141510") == "ENSG00000141510"
    assert normalise_id(" ENSMUSG00000051951.5 ") == "ENSMUSG00000051951"
    assert normalise_id("ENSG00000002586.20_PAR_Y") == "ENSG00000002586"
    assert normalise_id("TP53") is None
    assert normalise_id("ENSG0000014151") is None  # 10 digits: not an id
    assert normalise_id("AL627309.1") is None


def test_approved_symbol_wins_over_alias_of_another_gene(toy: GeneReference) -> None:
    match = toy.resolve("ALPHA")
    assert (match.tier, match.key) == (Tier.APPROVED, "ENSG00000000001")


def test_previous_and_alias_tiers(toy: GeneReference) -> None:
    assert (toy.resolve("OLD2").tier, toy.resolve("OLD2").key) == (Tier.PREVIOUS, "ENSG00000000002")
    assert (toy.resolve("A1").tier, toy.resolve("A1").key) == (Tier.ALIAS, "ENSG00000000001")


def test_alias_naming_two_genes_is_ambiguous(toy: GeneReference) -> None:
    match = toy.resolve("SHARED")
    assert match.ambiguous and match.key is None
    assert match.candidates == ("ENSG00000000001", "ENSG00000000002")


def test_ensembl_and_reference_names(toy: GeneReference) -> None:
    assert (toy.resolve("GAMMA-ENS").tier, toy.resolve("GAMMA-ENS").key) == (Tier.ENSEMBL, "ENSG00000000003")
    assert (toy.resolve("AC000001.1").tier, toy.resolve("AC000001.1").key) == (Tier.REFERENCE, "ENSG00000000003")
    assert toy.symbol("ENSG00000000003") == "GAMMA-ENS"  # no approved symbol: the Ensembl name stands in


def test_ambiguous_tier_settled_by_a_lower_tier_naming_one_candidate(toy: GeneReference) -> None:
    match = toy.resolve("DUP")
    assert (match.tier, match.key) == (Tier.PREVIOUS, "ENSG00000000005")


def test_approved_symbol_without_ensembl_id_is_not_handed_to_lower_tiers(toy: GeneReference) -> None:
    match = toy.resolve("NOID")
    assert (match.tier, match.key) == (Tier.APPROVED, "HGNC:99")
    assert "HGNC:99" not in toy
    assert "ENSG00000000007" in toy


def test_case_rules_species_convention_then_unambiguous_case_insensitive(toy: GeneReference) -> None:
    assert toy.resolve("Mixed").key == "ENSG00000000008"  # exact always wins
    assert toy.resolve("MIXED").key == "ENSG00000000009"
    human = toy.resolve("mixed")  # human convention: upper-case
    assert (human.key, human.case_insensitive) == ("ENSG00000000009", True)
    mouse = GeneReference.from_rows("mouse", ROWS).resolve("mixed")  # mouse convention: capitalised
    assert (mouse.key, mouse.case_insensitive) == ("ENSG00000000008", True)
    folded = toy.resolve("ab-cd")  # no convention hit, and two genes fold to it: not guessed
    assert folded.ambiguous and folded.case_insensitive and folded.key is None
    lower = toy.resolve("beta")
    assert (lower.key, lower.case_insensitive) == ("ENSG00000000002", True)
    assert toy.resolve("beta", case_insensitive=False).tier is None
    assert toy.resolve("c1ORF99").key == "ENSG00000000004"  # neither exact nor upper: folded, unique


def test_tiers_can_be_switched_off() -> None:
    reference = GeneReference.from_rows("human", ROWS, tiers=[Tier.PREVIOUS])
    assert reference.resolve("AC000001.1").tier is None
    assert reference.resolve("A1").tier is None
    assert reference.resolve("OLD1").key == "ENSG00000000001"


def test_unsupported_species() -> None:
    with pytest.raises(UnsupportedSpeciesError, match="rat"):
        check_species("rat")
    with pytest.raises(UnsupportedSpeciesError):
        load_reference("zebrafish")


def test_check_panels() -> None:
    assert check_panels(None) is None
    assert check_panels("human-mt") == ("human-mt",)
    with pytest.raises(SettingsError, match="human-protein-coding"):
        check_panels(["human-coding"])
    with pytest.raises(SettingsError):
        check_panels([])


# --- the shipped tables -------------------------------------------------------------------------


def test_shipped_tables_match_their_recorded_checksums_and_stay_small() -> None:
    sources = reference_sources()
    total = 0
    for species, name in TABLE_FILES.items():
        data = resources.files("stcorpus.curate.genes").joinpath("data", name).read_bytes()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() == sources["tables"][name]["sha256"], name
        assert len(read_table(species)) == sources["tables"][name]["rows"]
        assert gzip.decompress(data).decode().split("\n", 1)[0].split("\t") == list(TABLE_COLUMNS)
        assert data[4:8] == b"\0\0\0\0", "gzip mtime must be 0 for byte-identical rebuilds"
    assert total < 3_000_000


def test_reference_sources_name_versions_and_licences() -> None:
    sources = reference_sources()
    names = {item["name"]: item for item in sources["inputs"]}
    assert set(names) == {"hgnc", "mgi", "ensembl_human", "ensembl_mouse", "tenx_grch38"}
    assert names["hgnc"]["licence"] == "CC0-1.0"
    for item in sources["inputs"]:
        assert item["version"] and item["licence"] and len(item["sha256"]) == 64
    sources["inputs"].clear()  # a copy: callers cannot damage the cached one
    assert reference_sources()["inputs"]
    orthologs = sources["stats"]["mouse"]["orthologs"]
    assert orthologs["mouse_genes_with_one2one_human_ortholog"] == 17101
    assert orthologs["ensembl_one2one_pairs"] - orthologs["dropped_mgi_disagrees"] == 17101


def test_shipped_human_reference() -> None:
    human = load_reference("human")
    assert load_reference("human") is human  # loaded once
    tp53 = human.resolve("TP53")
    assert (tp53.tier, tp53.key) == (Tier.APPROVED, "ENSG00000141510")
    assert human.biotype("ENSG00000141510") == "protein-coding gene"
    assert human.panels("ENSG00000198804") == ("human-mt", "human-protein-coding")  # MT-CO1
    # HGNC renamed MRPS36 to KGD4; Ensembl's MRPS36 name has a haplotype copy; the previous symbol decides.
    assert human.resolve("MRPS36").key == human.resolve("KGD4").key == "ENSG00000134056"
    # A clone-based lncRNA name that only the 10x (Ensembl 98) names carry.
    assert human.resolve("AL627309.1").key == "ENSG00000238009"
    assert "ENSG00000238009" in human and human.biotype("ENSG00000238009") is None


def test_shipped_mouse_reference_and_orthologs() -> None:
    mouse = load_reference("mouse")
    assert mouse.resolve("Trp53").key == "ENSMUSG00000059552"
    assert mouse.human_ortholog("ENSMUSG00000059552") == "ENSG00000141510"  # Trp53 -> TP53, one-to-one
    assert mouse.human_ortholog("ENSMUSG00000057666") is None  # Gapdh: one-to-many in Compara
    assert mouse.resolve("GAPDH").key == "ENSMUSG00000057666"  # upper-cased mouse symbols still map
    assert mouse.panels("ENSMUSG00000064351") == ("mouse-mt", "mouse-protein-coding")  # mt-Co1
    counts = reference_sources()["stats"]
    assert counts["human"]["panels"]["human-mt"] == 37
    assert counts["mouse"]["panels"]["mouse-mt"] == 37
    assert set(PANELS) >= {"human-protein-coding", "human-mt", "mouse-protein-coding"}
