"""scripts/build_gene_tables.py on tiny inputs in the real formats: content, ortholog veto, determinism."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from stcorpus.curate.genes.reference import GeneReference, Tier

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_gene_tables.py"

HGNC = (
    "hgnc_id\tsymbol\tlocus_group\tlocation\talias_symbol\tprev_symbol\tensembl_gene_id\n"
    'HGNC:1\tALPHA\tprotein-coding gene\t1p36\t"AL1|SHARED"\tOLDA\tENSG00000000001\n'
    "HGNC:2\tBETA\tnon-coding RNA\t2q11\tSHARED\t\tENSG00000000002\n"
    "HGNC:3\tMT-CO1\tprotein-coding gene\tmitochondria\t\t\tENSG00000000003\n"
    "HGNC:4\tNOID\tpseudogene\t3p21\t\t\t\n"
)
BIOMART_HUMAN = (
    "Gene stable ID,Gene name,Mouse gene name,Mouse gene stable ID,Mouse homology type\n"
    "ENSG00000000001,ALPHA,Alpha,ENSMUSG00000000001,ortholog_one2one\n"
    "ENSG00000000002,BETA-OLD,,,\n"
    "ENSG00000000003,MT-CO1,mt-Co1,ENSMUSG00000000003,ortholog_one2one\n"
    "ENSG00000000009,,,,\n"
)
BIOMART_MOUSE = (
    "Gene stable ID,Gene name,Human gene name,Human gene stable ID,Human homology type\n"
    "ENSMUSG00000000001,Alpha,ALPHA,ENSG00000000001,ortholog_one2one\n"
    "ENSMUSG00000000002,Gm1,,ENSG00000000009,ortholog_one2one\n"
    "ENSMUSG00000000003,mt-Co1,MT-CO1,ENSG00000000003,ortholog_one2one\n"
    "ENSMUSG00000000004,Multi,ALPHA,ENSG00000000001,ortholog_one2many\n"
)
# MGI rows end with an extra tab; missing values are "null".
MGI_HEADER = (
    "MGI Accession ID\tMarker Symbol\tMarker Name\tFeature Type\tEntrezGene ID\tNCBI Gene chromosome\t"
    "NCBI Gene start\tNCBI Gene end\tNCBI Gene strand\tEnsembl Gene ID\tEnsembl Gene chromosome\t"
    "Ensembl Gene start\tEnsembl Gene end\tEnsembl Gene strand\tCCDS IDs\tHGNC ID\n"
)


def mgi_row(mgi: str, symbol: str, kind: str, ensembl: str, chromosome: str, hgnc: str) -> str:
    values = [mgi, symbol, "name", kind, "1", chromosome, "1", "2", "+", ensembl, chromosome, "1", "2", "+", "null"]
    return "\t".join([*values, hgnc]) + "\t\n"


MGI = (
    MGI_HEADER
    + mgi_row("MGI:1", "Alpha", "protein coding gene", "ENSMUSG00000000001", "4", "HGNC:1")
    # MGI pairs this gene with BETA, Ensembl with ENSG00000000009: the Ensembl pair is vetoed.
    + mgi_row("MGI:2", "Beta2", "lncRNA gene", "ENSMUSG00000000002", "5", "HGNC:2")
    + mgi_row("MGI:3", "mt-Co1", "protein coding gene", "ENSMUSG00000000003", "MT", "HGNC:3")
    + mgi_row("MGI:4", "Qtl1", "QTL", "null", "null", "null")
)
TENX = "ENSG00000000001\tALPHA\tGene Expression\nENSG00000000009\tAC000009.1\tGene Expression\n"
TENX += "ENSG00000000099\tRETIRED\tGene Expression\n"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_gene_tables", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def reference_dir(tmp_path: Path) -> Path:
    root = tmp_path / "reference"
    for sub in ("hgnc", "mgi", "ensembl_biomart", "feature-lists"):
        (root / sub).mkdir(parents=True)
    (root / "hgnc" / "hgnc_complete_set.txt.gz").write_bytes(gzip.compress(HGNC.encode()))
    (root / "mgi" / "HGNC_AllianceHomology.rpt.gz").write_bytes(gzip.compress(MGI.encode()))
    (root / "ensembl_biomart" / "human_to_mouse.csv").write_text(BIOMART_HUMAN)
    (root / "ensembl_biomart" / "mouse_to_human.csv").write_text(BIOMART_MOUSE)
    (root / "feature-lists" / "GRCh38-2020-A_features.tsv.gz").write_bytes(gzip.compress(TENX.encode()))
    return root


def test_build_is_byte_identical_and_check_passes(reference_dir: Path, tmp_path: Path) -> None:
    script = load_script()
    out = tmp_path / "data"
    assert script.main(["--reference", str(reference_dir), "--out", str(out)]) == 0
    first = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert set(first) == {"human.tsv.gz", "mouse.tsv.gz", "SOURCES.json", "SOURCES.md"}
    assert script.build(reference_dir) == first
    assert script.main(["--reference", str(reference_dir), "--out", str(out), "--check"]) == 0
    (out / "mouse.tsv.gz").write_bytes(first["mouse.tsv.gz"][:-1] + b"x")
    assert script.main(["--reference", str(reference_dir), "--out", str(out), "--check"]) == 1
    assert script.main(["--reference", str(tmp_path / "missing"), "--out", str(out)]) == 2


def table(data: bytes) -> list[dict[str, str]]:
    lines = gzip.decompress(data).decode().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


def test_built_tables_hold_what_resolution_needs(reference_dir: Path) -> None:
    outputs = load_script().build(reference_dir)
    human = GeneReference("human", table(outputs["human.tsv.gz"]))
    assert human.resolve("ALPHA").key == "ENSG00000000001"
    assert (human.resolve("OLDA").tier, human.resolve("AL1").tier) == (Tier.PREVIOUS, Tier.ALIAS)
    assert human.resolve("SHARED").ambiguous
    assert (human.resolve("BETA-OLD").tier, human.resolve("BETA-OLD").key) == (Tier.ENSEMBL, "ENSG00000000002")
    assert (human.resolve("AC000009.1").tier, human.resolve("AC000009.1").key) == (Tier.REFERENCE, "ENSG00000000009")
    assert human.resolve("RETIRED").tier is None  # a 10x name of an id no current table knows: not kept
    assert human.resolve("NOID").key == "HGNC:4" and "HGNC:4" not in human
    assert human.panels("ENSG00000000003") == ("human-mt", "human-protein-coding")
    assert human.biotype("ENSG00000000002") == "non-coding RNA"

    mouse = GeneReference("mouse", table(outputs["mouse.tsv.gz"]))
    assert len(mouse) == 4  # MGI genes with an Ensembl id plus Ensembl-only genes; the QTL is left out
    assert mouse.resolve("Gm1").key == "ENSMUSG00000000002"  # Ensembl's name of MGI's Beta2
    assert mouse.human_ortholog("ENSMUSG00000000001") == "ENSG00000000001"
    assert mouse.human_ortholog("ENSMUSG00000000002") is None  # vetoed: MGI pairs it with BETA
    assert mouse.human_ortholog("ENSMUSG00000000004") is None  # one-to-many
    assert mouse.panels("ENSMUSG00000000003") == ("mouse-mt", "mouse-protein-coding")

    sources = json.loads(outputs["SOURCES.json"])
    orthologs = sources["stats"]["mouse"]["orthologs"]
    assert orthologs["ensembl_one2one_pairs"] == 3
    assert (orthologs["dropped_mgi_disagrees"], orthologs["mouse_genes_with_one2one_human_ortholog"]) == (1, 2)
    assert orthologs["both_agree"] == 2
    assert {i["name"] for i in sources["inputs"]} == {"hgnc", "mgi", "ensembl_human", "ensembl_mouse", "tenx_grch38"}
