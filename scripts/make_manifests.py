"""Generate the real-corpus manifests and the benchmark holdout list from published metadata tables.

    .venv/bin/python scripts/make_manifests.py [--sources manifests/sources] [--out manifests]
                                               [--check] [--summary] [--overlaps]

Reads the tables copied into ``manifests/sources/`` (each folder has a SOURCE.md saying where it comes
from) and writes four files into ``--out``:

- ``hest1k.yaml``: every HEST-1k sample (``HEST_v1_1_0.csv``) with its ``hf://datasets/MahmoodLab/hest``
  files (``st/<id>.h5ad``, ``wsis/<id>.tif``, ``metadata/<id>.json``), one study per ``dataset_title``;
- ``stimage1k4m.yaml``: every STimage-1K4M slide (``meta_all_gene02122025.csv``) whose species the manifest
  model can hold, with its ``hf://datasets/jiawennnn/STimage-1K4M`` files;
- ``10x-visium.yaml``: the 10x Genomics public Visium datasets that scanpy and squidpy download (H&E only),
  with their ``cf.10xgenomics.com`` files;
- ``holdout.yaml``: the benchmark slides kept out of pretraining (HEST-Benchmark, DLPFC, HER2ST), with the
  copies of those slides that the metadata shows in the other manifests. Written twice, the same bytes:
  ``manifests/holdout.yaml`` and the copy that ships inside the package (``curate/build/holdout.yaml``,
  the default of ``curate build/plan --holdout``), so a manifest copied anywhere keeps its holdouts.

Every value comes from those tables or from the explicit tables in this file (licence spellings, the 10x
datasets' species/organ read off their names); nothing is fetched. Output is deterministic: studies and
samples are sorted, YAML is written with a fixed key order, so a rerun on the same inputs is byte-identical
(``--check`` compares with the files in ``--out`` and writes nothing). ``--summary`` prints the totals and
what was excluded, ``--overlaps`` the slides the metadata suggests are the same slide (for the dedup step).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from stcorpus.curate.errors import ManifestError
from stcorpus.curate.manifest import KNOWN_LICENCES, MANIFEST_FORMAT, SPECIES
from stcorpus.schema import SLIDE_ID_PATTERN

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
DEFAULT_SOURCES: Final = REPO_ROOT / "manifests" / "sources"
DEFAULT_OUT: Final = REPO_ROOT / "manifests"
#: Generated files that are also written (when writing to DEFAULT_OUT) to where the package ships them.
PACKAGE_COPIES: Final = {"holdout.yaml": REPO_ROOT / "curate" / "build" / "holdout.yaml"}
HOLDOUT_FORMAT: Final = "stcorpus-holdout/1"  # curate.build.splits.HOLDOUT_FORMAT
REGENERATE: Final = ".venv/bin/python scripts/make_manifests.py"

HEST_TABLE: Final = "hest/HEST_v1_1_0.csv"
HEST_BENCH_TABLE: Final = "hest/hest-benchmark-tasks.md"
STIMAGE_TABLE: Final = "stimage1k4m/meta_all_gene02122025.csv"
TENX_TABLE: Final = "10x-visium/datasets.tsv"

HEST_HUB: Final = "hf://datasets/MahmoodLab/hest"
STIMAGE_HUB: Final = "hf://datasets/jiawennnn/STimage-1K4M"
TENX_SAMPLES: Final = "https://cf.10xgenomics.com/samples/spatial-exp"
TENX_DATABASE: Final = "https://support.10xgenomics.com/spatial-gene-expression/datasets"

# ---------------------------------------------------------------------------------------------
# Normalisation tables (the decisions, written out so they can be read and tested)
# ---------------------------------------------------------------------------------------------

#: HEST's ``license`` column, spelling by spelling, as an SPDX id. A blank cell is ``LicenseRef-unknown``;
#: a spelling not listed here stops the generator (decide it here, do not guess).
HEST_LICENCES: Final[Mapping[str, str]] = {
    "CC BY 4.0": "CC-BY-4.0",
    "Creative Commons Attribution 4.0": "CC-BY-4.0",
    "Creative Commons Attribution 4.0 International": "CC-BY-4.0",
    "Creative Commons Attribution 4.0 International License": "CC-BY-4.0",
    # Unversioned, but only HEST's 10x Genomics samples (TENX*) carry this spelling (checked in
    # HEST_UNVERSIONED_10X_ONLY below) and 10x publishes its datasets under CC BY 4.0.
    "Creative Commons Attribution": "CC-BY-4.0",
    # Unversioned and from journal articles: the version is not stated, so it is not guessed.
    "CC BY": "LicenseRef-CC-BY-unversioned",
    "CC BY NC 3.0": "CC-BY-NC-3.0",
    "CC BY-NC 4.0": "CC-BY-NC-4.0",
    "Creative Commons Attribution NonCommercial License 4.0": "CC-BY-NC-4.0",
    "CC BY-NC-ND 4.0": "CC-BY-NC-ND-4.0",
    # "DEED" is the name of Creative Commons' summary page, not another licence.
    "CC BY-NC-ND 4.0 DEED": "CC-BY-NC-ND-4.0",
    # Mahmood Lab's own unpublished samples: kept as HEST labels them, never turned into an open licence.
    "Internal": "LicenseRef-Internal",
}
UNKNOWN_LICENCE: Final = "LicenseRef-unknown"
#: The unversioned spelling mapped to CC-BY-4.0 above on the grounds that only 10x samples use it.
HEST_UNVERSIONED_10X_ONLY: Final = "Creative Commons Attribution"

HEST_ASSAYS: Final[Mapping[str, str]] = {
    "Visium": "visium",
    "Visium HD": "visium-hd",
    "Xenium": "xenium",
    "Spatial Transcriptomics": "st",
}
HEST_SPECIES: Final[Mapping[str, str]] = {"Homo sapiens": "human", "Mus musculus": "mouse"}

STIMAGE_ASSAYS: Final[Mapping[str, str]] = {"ST": "st", "Visium": "visium", "VisiumHD": "visium-hd"}
#: STimage's ``species`` column -> the manifest's species; ``None``: the model has no value for it
#: ("fish" names no species: the table uses it for a brain and for an electric organ).
STIMAGE_SPECIES: Final[Mapping[str, str | None]] = {
    "human": "human",
    "mouse": "mouse",
    "rattus norvegicus": "rat",
    "human & mouse": "human+mouse",
    "pig": "pig",
    "frog": "frog",
    "ambystoma mexicanum": "axolotl",
    "plant": "plant",
    "fish": None,
}

#: 10x datasets read off their names (species, organ, disease) where the name says it. The
#: V1_Breast_Cancer_Block_A_* names carry no species: 10x titles them "Human Breast Cancer (Block A
#: Section 1/2)" (HEST_v1_1_0.csv rows TENX13/TENX14, download pages ...human-breast-cancer-block-a-...).
#: "bowel" is HEST's organ word for colon/rectum (HEST's rows of these same 10x colorectal datasets).
TENX_FACTS: Final[Mapping[str, tuple[str, str, str | None]]] = {
    "V1_Breast_Cancer_Block_A_Section_1": ("human", "breast", "cancer"),
    "V1_Breast_Cancer_Block_A_Section_2": ("human", "breast", "cancer"),
    "V1_Human_Heart": ("human", "heart", None),
    "V1_Human_Lymph_Node": ("human", "lymph node", None),
    "V1_Mouse_Kidney": ("mouse", "kidney", None),
    "V1_Adult_Mouse_Brain": ("mouse", "brain", None),
    "V1_Mouse_Brain_Sagittal_Posterior": ("mouse", "brain", None),
    "V1_Mouse_Brain_Sagittal_Posterior_Section_2": ("mouse", "brain", None),
    "V1_Mouse_Brain_Sagittal_Anterior": ("mouse", "brain", None),
    "V1_Mouse_Brain_Sagittal_Anterior_Section_2": ("mouse", "brain", None),
    "V1_Human_Brain_Section_1": ("human", "brain", None),
    "V1_Human_Brain_Section_2": ("human", "brain", None),
    "V1_Adult_Mouse_Brain_Coronal_Section_1": ("mouse", "brain", None),
    "V1_Adult_Mouse_Brain_Coronal_Section_2": ("mouse", "brain", None),
    "Targeted_Visium_Human_Cerebellum_Neuroscience": ("human", "brain", None),
    "Parent_Visium_Human_Cerebellum": ("human", "brain", None),
    "Targeted_Visium_Human_SpinalCord_Neuroscience": ("human", "spinal cord", None),
    "Parent_Visium_Human_SpinalCord": ("human", "spinal cord", None),
    "Targeted_Visium_Human_Glioblastoma_Pan_Cancer": ("human", "brain", "cancer"),
    "Parent_Visium_Human_Glioblastoma": ("human", "brain", "cancer"),
    "Targeted_Visium_Human_BreastCancer_Immunology": ("human", "breast", "cancer"),
    "Parent_Visium_Human_BreastCancer": ("human", "breast", "cancer"),
    "Targeted_Visium_Human_OvarianCancer_Pan_Cancer": ("human", "ovary", "cancer"),
    "Targeted_Visium_Human_OvarianCancer_Immunology": ("human", "ovary", "cancer"),
    "Parent_Visium_Human_OvarianCancer": ("human", "ovary", "cancer"),
    "Targeted_Visium_Human_ColorectalCancer_GeneSignature": ("human", "bowel", "cancer"),
    "Parent_Visium_Human_ColorectalCancer": ("human", "bowel", "cancer"),
    "Visium_FFPE_Mouse_Brain": ("mouse", "brain", None),
    "Visium_FFPE_Mouse_Brain_IF": ("mouse", "brain", None),
    "Visium_FFPE_Mouse_Kidney": ("mouse", "kidney", None),
    "Visium_FFPE_Human_Breast_Cancer": ("human", "breast", "cancer"),
    "Visium_FFPE_Human_Prostate_Acinar_Cell_Carcinoma": ("human", "prostate", "cancer"),
    "Visium_FFPE_Human_Prostate_Cancer": ("human", "prostate", "cancer"),
    "Visium_FFPE_Human_Prostate_IF": ("human", "prostate", "cancer"),
    "Visium_FFPE_Human_Normal_Prostate": ("human", "prostate", "healthy"),
}

#: The DLPFC benchmark sections (spatialLIBD, Maynard et al. 2021): sample ids 151507-151676.
DLPFC_FIRST: Final = 151507
DLPFC_LAST: Final = 151676
DLPFC_HEST_TITLE: Final = "spatialLIBD"
#: HER2ST (Andersson et al. 2021, Nat Commun): the publication both tables cite.
HER2ST_PMID: Final = "34650042"

#: Sample fields a study's samples may share (moved into the study's ``defaults`` when all agree).
SHARED_FIELDS: Final = (
    "assay",
    "species",
    "organ",
    "disease_state",
    "oncotree_code",
    "patient",
    "preservation",
    "licence",
    "citation",
)
#: Key order of a sample in the YAML.
SAMPLE_KEYS: Final = (
    "id",
    "source_id",
    "assay",
    "species",
    "organ",
    "disease_state",
    "oncotree_code",
    "patient",
    "preservation",
    "licence",
    "citation",
    "mpp",
    "spots",
    "image_size",
    "sources",
)

# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _blank(value: str | None) -> str | None:
    """``None`` for a missing, empty or whitespace-only cell, else the stripped value."""
    if value is None:
        return None
    value = value.strip()
    return value or None


def _lower(value: str | None) -> str | None:
    """Lower-cased, so the manifests share one spelling ("Brain" in HEST, "brain" in STimage)."""
    value = _blank(value)
    return value.lower() if value else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def natural_key(identifier: str) -> tuple[str, int, str]:
    """Sort ``TENX9`` before ``TENX10``: the letters, then the number, then the rest."""
    match = re.match(r"^([A-Za-z_\-]*?)(\d+)(.*)$", identifier)
    if match is None:
        return (identifier, -1, "")
    return (match.group(1), int(match.group(2)), match.group(3))


def slugify(text: str, *, max_len: int = 64) -> str:
    """A lower-case, hyphenated id from free text, cut at a word boundary after ``max_len`` characters."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(slug) > max_len:
        slug = slug[:max_len].rsplit("-", 1)[0]
    return slug or "untitled"


def unique_slugs(titles: Iterable[str]) -> dict[str, str]:
    """A slug per distinct title; titles whose slugs collide all get a short hash of the full title."""
    by_slug: dict[str, set[str]] = defaultdict(set)
    for title in set(titles):
        by_slug[slugify(title)].add(title)
    result: dict[str, str] = {}
    for slug, group in by_slug.items():
        for title in group:
            digest = hashlib.sha256(title.encode("utf-8")).hexdigest()[:6]
            result[title] = slug if len(group) == 1 else f"{slug}-{digest}"
    return result


def sanitize_id(name: str) -> str:
    """A manifest id from a source name: characters other than letters, digits, '-' and '_' become '-'."""
    slide_id = re.sub(r"[^A-Za-z0-9_\-]", "-", name)
    slide_id = re.sub(r"_{2,}", "_", slide_id).strip("-_")
    if not SLIDE_ID_PATTERN.match(slide_id):
        raise ManifestError(f"cannot make a valid slide id from {name!r} (got {slide_id!r}); add a rule to sanitize_id")
    return slide_id


def hest_licence(raw: str | None) -> str:
    """The SPDX id (or LicenseRef) for a HEST ``license`` cell; unknown spellings are an error."""
    value = _blank(raw)
    if value is None:
        return UNKNOWN_LICENCE
    try:
        return HEST_LICENCES[value]
    except KeyError:
        raise ManifestError(
            f"HEST licence spelling {value!r} is not in HEST_LICENCES (scripts/make_manifests.py): "
            "add it there with the SPDX id it means"
        ) from None


def citation_from_link(link: str | None) -> str | None:
    """A DOI, PMID or PMCID from a study link where the link spells one out, else the link itself."""
    link = _blank(link)
    if link is None or not link.lower().startswith("http"):
        return None
    patterns: tuple[tuple[str, Callable[[re.Match[str]], str]], ...] = (
        (r"pubmed\.ncbi\.nlm\.nih\.gov/(\d+)", lambda m: f"PMID:{m.group(1)}"),
        (r"ncbi\.nlm\.nih\.gov/pmc/articles/(PMC\d+)", lambda m: f"PMCID:{m.group(1)}"),
        (r"doi\.org/(10\.[^?#\s]+)", lambda m: f"doi:{m.group(1)}"),
        (r"science\.org/doi/(10\.[^?#\s]+)", lambda m: f"doi:{m.group(1)}"),
        # nature.com article URLs are the DOI suffix of prefix 10.1038.
        (r"nature\.com/articles/([^?#/\s]+)", lambda m: f"doi:10.1038/{m.group(1)}"),
        # bioRxiv content URLs are the DOI plus a version (v1) and an optional ".full".
        (r"biorxiv\.org/content/(10\.1101/[0-9.]+?)(?:v\d+)?(?:\.full)?(?:[?#].*)?$", lambda m: f"doi:{m.group(1)}"),
    )
    for pattern, make in patterns:
        match = re.search(pattern, link)
        if match:
            return make(match)
    return re.split(r"[?#]", link, maxsplit=1)[0]


def _read_csv(path: Path, *, delimiter: str = ",") -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:  # HEST's table starts with a BOM
        return list(csv.DictReader(handle, delimiter=delimiter))


# ---------------------------------------------------------------------------------------------
# Manifest assembly and YAML
# ---------------------------------------------------------------------------------------------


class _FlowList(list[Any]):
    """A list written on one line (``[w, h]``)."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper with one-line lists for ``_FlowList`` and no anchors/aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_flow_list(dumper: yaml.SafeDumper, data: _FlowList) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", list(data), flow_style=True)


_Dumper.add_representer(_FlowList, _represent_flow_list)


def dump_yaml(header: Sequence[str], data: Mapping[str, Any]) -> str:
    """``data`` as YAML after a ``#`` comment header; stable: no key sorting, no line wrapping."""
    body = yaml.dump(
        dict(data),
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=1_000_000,
    )
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header)
    return comments + body


def _ordered_sample(sample: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(sample) - set(SAMPLE_KEYS)
    if unknown:
        raise ManifestError(f"internal: sample keys {sorted(unknown)} have no place in SAMPLE_KEYS")
    return {key: sample[key] for key in SAMPLE_KEYS if key in sample and sample[key] is not None}


def build_study(
    study_id: str, samples: Sequence[Mapping[str, Any]], *, title: str | None = None, url: str | None = None
) -> dict[str, Any]:
    """A study entry: fields every sample shares move into ``defaults``, samples sorted by id."""
    ordered = sorted(samples, key=lambda s: natural_key(str(s["id"])))
    defaults: dict[str, Any] = {}
    for name in SHARED_FIELDS:
        values = [s.get(name) for s in ordered]
        if values and values[0] is not None and all(v == values[0] for v in values):
            defaults[name] = values[0]
    entries = [_ordered_sample({k: v for k, v in s.items() if k not in defaults or k == "id"}) for s in ordered]
    study: dict[str, Any] = {"id": study_id}
    if title:
        study["title"] = title
    if url:
        study["url"] = url
    if defaults:
        study["defaults"] = defaults
    study["samples"] = entries
    return study


def manifest_document(
    *, name: str, description: str, defaults: Mapping[str, Any], studies: Iterable[dict[str, Any]]
) -> dict[str, Any]:
    """The top level of a manifest, studies sorted by id."""
    return {
        "manifest": MANIFEST_FORMAT,
        "name": name,
        "description": description,
        "defaults": dict(defaults),
        "studies": sorted(studies, key=lambda s: str(s["id"])),
    }


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Excluded:
    """A source row left out of a manifest, and why."""

    manifest: str
    source_id: str
    reason: str


@dataclass(frozen=True)
class Overlap:
    """Two slides the metadata suggests are the same tissue section (or the same image)."""

    kind: str  # hest-hest | stimage-hest | 10x-10x
    first: str
    second: str
    evidence: str


@dataclass
class Catalogue:
    """Everything one run produces: the file texts, what was left out, and the overlap candidates."""

    files: dict[str, str] = field(default_factory=dict)
    excluded: list[Excluded] = field(default_factory=list)
    overlaps: list[Overlap] = field(default_factory=list)
    holdout: dict[str, list[str]] = field(default_factory=dict)  # slide id -> reasons
    holdout_groups: dict[str, list[str]] = field(default_factory=dict)  # benchmark -> slide ids
    unmapped: list[str] = field(default_factory=list)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # manifest file -> flat samples


# ---------------------------------------------------------------------------------------------
# HEST-1k
# ---------------------------------------------------------------------------------------------


def hest_samples(rows: Sequence[Mapping[str, str]]) -> list[dict[str, Any]]:
    """One flat sample dict per HEST row (with its ``study`` title and ``study_url``)."""
    unversioned = sorted(
        r["id"] for r in rows if _blank(r["license"]) == HEST_UNVERSIONED_10X_ONLY and not r["id"].startswith("TENX")
    )
    if unversioned:
        raise ManifestError(
            f"HEST rows {unversioned} use the licence spelling {HEST_UNVERSIONED_10X_ONLY!r} but are not 10x "
            "Genomics samples: HEST_LICENCES maps that spelling to CC-BY-4.0 only because 10x uses it; decide these"
        )
    samples: list[dict[str, Any]] = []
    for row in rows:
        sample_id = row["id"].strip()
        if not SLIDE_ID_PATTERN.match(sample_id):
            raise ManifestError(f"HEST id {sample_id!r} is not a valid slide id")
        technology = row["st_technology"].strip()
        species = row["species"].strip()
        if technology not in HEST_ASSAYS or species not in HEST_SPECIES:
            raise ManifestError(f"HEST row {sample_id}: unknown st_technology {technology!r} or species {species!r}")
        study_link = _blank(row["study_link"])
        page = _blank(row["download_page_link1"])
        link = study_link if study_link and study_link.lower().startswith("http") else page
        samples.append(
            {
                "id": sample_id,
                "study": _one_line(row["dataset_title"]),
                "study_url": link,
                "assay": HEST_ASSAYS[technology],
                "species": HEST_SPECIES[species],
                "organ": _lower(row["organ"]),
                "disease_state": _lower(row["disease_state"]),
                "oncotree_code": _blank(row["oncotree_code"]),
                "patient": _blank(row["patient"]),
                "preservation": _blank(row["preservation_method"]),
                "licence": hest_licence(row["license"]),
                "citation": citation_from_link(link),
                "mpp": float(row["pixel_size_um_estimated"]),
                "spots": int(row["spots_under_tissue"]),
                "image_size": _FlowList([int(row["fullres_px_width"]), int(row["fullres_px_height"])]),
                "sources": {
                    "st": f"{HEST_HUB}/st/{sample_id}.h5ad",
                    "wsi": f"{HEST_HUB}/wsis/{sample_id}.tif",
                    "metadata": f"{HEST_HUB}/metadata/{sample_id}.json",
                },
            }
        )
    return samples


def _studies(samples: Sequence[dict[str, Any]], ids: Mapping[str, str]) -> list[dict[str, Any]]:
    by_study: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for sample in samples:
        by_study[sample["study"]].append(sample)
    studies = []
    for title, members in by_study.items():
        urls = {m.get("study_url") for m in members}
        url = urls.pop() if len(urls) == 1 else None
        flat = [{k: v for k, v in m.items() if k not in ("study", "study_url")} for m in members]
        studies.append(build_study(ids[title], flat, title=title or None, url=url))
    return studies


def build_hest(sources: Path, catalogue: Catalogue) -> None:
    """``hest1k.yaml`` from ``HEST_v1_1_0.csv``."""
    rows = _read_csv(sources / HEST_TABLE)
    samples = hest_samples(rows)
    titles = unique_slugs(s["study"] for s in samples)
    studies = _studies(samples, titles)
    catalogue.samples["hest1k.yaml"] = samples
    header = [
        "GENERATED by scripts/make_manifests.py from manifests/sources/hest/HEST_v1_1_0.csv — do not edit by hand.",
        f"Regenerate: {REGENERATE}   (see manifests/sources/hest/SOURCE.md for where the table comes from)",
        "",
        "HEST-1k (Jaume et al., NeurIPS 2024; https://huggingface.co/datasets/MahmoodLab/hest): "
        f"{len(samples)} samples in {len(studies)} studies, one study per `dataset_title`.",
        "ACCESS: HEST-1k is gated. Accept its terms on https://huggingface.co/datasets/MahmoodLab/hest (request",
        "access; it is granted automatically), then log in with `hf auth login` (or set HF_TOKEN): `curate fetch`",
        "sends that token for the hf:// sources below.",
        "",
        "Fields: assay from st_technology; species; organ and disease_state lower-cased; oncotree_code, patient,",
        "preservation (preservation_method) as HEST gives them; mpp = pixel_size_um_estimated; spots =",
        "spots_under_tissue; image_size = [fullres_px_width, fullres_px_height]; citation = DOI / PMID / PMCID spelled",
        "out by study_link (else that link, else download_page_link1).",
        "LICENCES: `licence` is each source study's own terms as HEST records them, mapped to SPDX by the",
        "HEST_LICENCES table in the script (blank -> LicenseRef-unknown, 'Internal' -> LicenseRef-Internal). HEST-1k",
        "itself (its processed files, which these sources are) is released under CC BY-NC-SA 4.0: that is every",
        "sample's `distribution_licence`, and a build's licence allow-list must admit both.",
    ]
    document = manifest_document(
        name="hest1k",
        description="HEST-1k v1.1.0: every sample of HEST_v1_1_0.csv (MahmoodLab/hest on the Hugging Face Hub).",
        defaults={"source": "hest", "technology": "hest", "distribution_licence": "CC-BY-NC-SA-4.0"},
        studies=studies,
    )
    catalogue.files["hest1k.yaml"] = dump_yaml(header, document)


# ---------------------------------------------------------------------------------------------
# STimage-1K4M
# ---------------------------------------------------------------------------------------------


def stimage_study(slide: str) -> str:
    """GEO series for ``GSE..._GSM...`` slides, else ``Species_Organ_Author_Date`` (e.g. Human_Breast_He_06222020)."""
    if re.match(r"^GSE\d+_GSM\d+$", slide):
        return slide.split("_", 1)[0]
    return "_".join(slide.split("_")[:4])


def stimage_citation(slide: str, pmids: str) -> str | None:
    """``PMID:a; PMID:b`` from the ``pmid`` column; the GEO series where no PMID is given."""
    found = [p.strip() for p in pmids.split(",") if p.strip()]
    if found:
        return "; ".join(f"PMID:{p}" for p in found)
    if re.match(r"^GSE\d+_GSM\d+$", slide):
        return f"GEO:{slide.split('_', 1)[0]}"
    return None


def stimage_licence(slide: str) -> str:
    """CC-BY-4.0 for slides STimage took from 10x Genomics' releases (``_10X_`` in the name), else unknown.

    STimage-1K4M's repository is MIT, but that covers its code and tables: the slides keep their sources'
    terms and the table states none, so a GEO slide is ``LicenseRef-unknown`` rather than a guess.
    """
    return "CC-BY-4.0" if "_10X_" in slide else UNKNOWN_LICENCE


def stimage_samples(rows: Sequence[Mapping[str, str]], catalogue: Catalogue) -> list[dict[str, Any]]:
    """One flat sample per STimage slide the model can hold; the others go to ``catalogue.excluded``."""
    samples: list[dict[str, Any]] = []
    for row in rows:
        slide = row["slide"].strip()
        raw_species = row["species"].strip()
        if raw_species not in STIMAGE_SPECIES:
            raise ManifestError(f"STimage slide {slide}: species {raw_species!r} is not in STIMAGE_SPECIES")
        species = STIMAGE_SPECIES[raw_species]
        if species is None:
            catalogue.excluded.append(
                Excluded("stimage1k4m.yaml", slide, f"species {raw_species!r} names no species the manifest takes")
            )
            continue
        tech = row["tech"].strip()
        if tech not in STIMAGE_ASSAYS:
            raise ManifestError(f"STimage slide {slide}: tech {tech!r} is not in STIMAGE_ASSAYS")
        slide_id = sanitize_id(slide)
        title = _blank(row["title"])
        samples.append(
            {
                "id": slide_id,
                "source_id": slide if slide != slide_id else None,
                "study": stimage_study(slide),
                "study_title": _one_line(title) if title else None,
                "assay": STIMAGE_ASSAYS[tech],
                "species": species,
                "organ": _lower(row["tissue"]),
                "disease_state": "cancer" if row["involve_cancer"].strip() == "True" else None,
                "licence": stimage_licence(slide),
                "citation": stimage_citation(slide, row["pmid"]),
                "spots": int(row["spot_num"]),
                "sources": {
                    "counts": f"{STIMAGE_HUB}/{tech}/gene_exp/{slide}_count.csv",
                    "coords": f"{STIMAGE_HUB}/{tech}/coord/{slide}_coord.csv",
                    "image": f"{STIMAGE_HUB}/{tech}/image/{slide}.png",
                },
            }
        )
    return samples


def build_stimage(sources: Path, catalogue: Catalogue) -> None:
    """``stimage1k4m.yaml`` from ``meta_all_gene02122025.csv``."""
    rows = _read_csv(sources / STIMAGE_TABLE)
    samples = stimage_samples(rows, catalogue)
    catalogue.samples["stimage1k4m.yaml"] = samples
    by_study: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for sample in samples:
        by_study[sample["study"]].append(sample)
    studies = []
    for key, members in by_study.items():
        titles = {m["study_title"] for m in members}
        title = titles.pop() if len(titles) == 1 else None
        flat = [{k: v for k, v in m.items() if k not in ("study", "study_title")} for m in members]
        studies.append(build_study(sanitize_id(key), flat, title=title))
    excluded = [e for e in catalogue.excluded if e.manifest == "stimage1k4m.yaml"]
    header = [
        "GENERATED by scripts/make_manifests.py from manifests/sources/stimage1k4m/meta_all_gene02122025.csv"
        " — do not edit by hand.",
        f"Regenerate: {REGENERATE}   (see manifests/sources/stimage1k4m/SOURCE.md)",
        "",
        "STimage-1K4M (Chen et al. 2024, arXiv:2406.06393; https://huggingface.co/datasets/jiawennnn/STimage-1K4M):",
        f"{len(samples)} of {len(rows)} slides in {len(studies)} studies (GEO series, or Species_Organ_Author_Date of",
        f"the slide name). Excluded: {len(excluded)} slides whose species is 'fish' (no species the manifest takes).",
        "Slide names that are not valid ids ('.', '+') become ids with '-'; `source_id` keeps the name.",
        "",
        "Fields: assay from tech; species normalised (rattus norvegicus -> rat, 'human & mouse' -> human+mouse,",
        "ambystoma mexicanum -> axolotl); organ = tissue (lower-cased); disease_state = cancer where",
        "involve_cancer is True (absent otherwise: False does not say healthy); spots = spot_num; citation = the",
        "PMIDs, else the GEO series.",
        "LICENCES: STimage-1K4M's repository is MIT, which covers its code and tables, not the slides: those keep",
        "their sources' terms and the table states none. Slides from 10x Genomics releases (_10X_ in the name) are",
        "CC-BY-4.0 (10x's terms); every other slide is LicenseRef-unknown until its source's terms are checked.",
    ]
    document = manifest_document(
        name="stimage1k4m",
        description="STimage-1K4M: the slides of meta_all_gene02122025.csv (jiawennnn/STimage-1K4M on the Hub).",
        defaults={"source": "stimage", "technology": "stimage"},
        studies=studies,
    )
    catalogue.files["stimage1k4m.yaml"] = dump_yaml(header, document)


# ---------------------------------------------------------------------------------------------
# 10x Genomics public Visium datasets
# ---------------------------------------------------------------------------------------------


def tenx_samples(rows: Sequence[Mapping[str, str]], catalogue: Catalogue) -> list[dict[str, Any]]:
    """One flat sample per 10x dataset with an H&E image (or none known); fluorescence datasets excluded."""
    samples: list[dict[str, Any]] = []
    for row in rows:
        sample_id = row["sample_id"].strip()
        version = row["spaceranger_version"].strip()
        note = row["note"].strip()
        if sample_id not in TENX_FACTS:
            raise ManifestError(f"10x dataset {sample_id} has no entry in TENX_FACTS (species, organ, disease)")
        if "fluorescen" in note:
            catalogue.excluded.append(
                Excluded("10x-visium.yaml", sample_id, f"not an H&E image: {note} (datasets.tsv note)")
            )
            continue
        species, organ, disease = TENX_FACTS[sample_id]
        prefix = f"{TENX_SAMPLES}/{version}/{sample_id}/{sample_id}"
        sources = {"matrix": f"{prefix}_filtered_feature_bc_matrix.h5", "spatial": f"{prefix}_spatial.tar.gz"}
        image = row["image_file"].strip()
        if image:
            sources["image"] = f"{TENX_SAMPLES}/{version}/{sample_id}/{image}"
        samples.append(
            {
                "id": sanitize_id(sample_id),
                "study": sanitize_id(f"10x-visium-spaceranger-{version}"),
                "version": version,
                "species": species,
                "organ": organ,
                "disease_state": disease,
                "preservation": "FFPE" if sample_id.startswith("Visium_FFPE_") else None,
                "citation": f"{sample_id}, Spatial Gene Expression Dataset by Space Ranger {version}, 10x Genomics",
                "sources": sources,
            }
        )
    return samples


def build_tenx(sources: Path, catalogue: Catalogue) -> None:
    """``10x-visium.yaml`` from ``10x-visium/datasets.tsv``."""
    rows = _read_csv(sources / TENX_TABLE, delimiter="\t")
    samples = tenx_samples(rows, catalogue)
    catalogue.samples["10x-visium.yaml"] = samples
    by_study: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for sample in samples:
        by_study[sample["study"]].append(sample)
    studies = []
    for key, members in by_study.items():
        version = members[0]["version"]
        flat = [{k: v for k, v in m.items() if k not in ("study", "version")} for m in members]
        studies.append(
            build_study(key, flat, title=f"10x Genomics Visium datasets processed with Space Ranger {version}")
        )
    excluded = [e for e in catalogue.excluded if e.manifest == "10x-visium.yaml"]
    no_image = sorted(s["id"] for s in samples if "image" not in s["sources"])
    header = [
        "GENERATED by scripts/make_manifests.py from manifests/sources/10x-visium/datasets.tsv — do not edit by hand.",
        f"Regenerate: {REGENERATE}   (see manifests/sources/10x-visium/SOURCE.md)",
        "",
        f"10x Genomics public Visium datasets ({TENX_DATABASE}): the {len(rows)} that scverse/squidpy",
        "(src/squidpy/datasets/_10x_datasets.py @ e76e147e, datasets.yaml @ ba864432) and scverse/scanpy",
        "(src/scanpy/datasets/_datasets.py @ d9808e33) download, with their URLs as those codebases build them:",
        "https://cf.10xgenomics.com/samples/spatial-exp/<version>/<id>/<id>_{filtered_feature_bc_matrix.h5,",
        "spatial.tar.gz,image.tif}. No checksums are given: `curate fetch` records them in the lock file.",
        f"{len(samples)} datasets; excluded {len(excluded)} fluorescence datasets (not H&E): "
        + ", ".join(sorted(e.source_id for e in excluded))
        + ".",
        f"No full-resolution image published: {', '.join(no_image) or 'none'} (the build falls back to the",
        "Space Ranger hires image and quarantines it as too coarse).",
        "One study per Space Ranger release: serial sections and Targeted/Parent pairs (same tissue section, same",
        "H&E image) then share a split group. species/organ/disease come from the dataset names (TENX_FACTS).",
        "LICENCE: 10x Genomics publishes these datasets under CC BY 4.0; cite them as in `citation`.",
    ]
    document = manifest_document(
        name="10x-visium",
        description="10x Genomics public Visium (Space Ranger 1.1-1.3) datasets named by scanpy and squidpy.",
        defaults={"source": "10x", "technology": "spaceranger", "assay": "visium", "licence": "CC-BY-4.0"},
        studies=studies,
    )
    catalogue.files["10x-visium.yaml"] = dump_yaml(header, document)


# ---------------------------------------------------------------------------------------------
# Overlaps seen in the metadata
# ---------------------------------------------------------------------------------------------

HEST_TECH_FOR_STIMAGE: Final[Mapping[str, str]] = {"ST": "st", "Visium": "visium", "VisiumHD": "visium-hd"}


def hest_internal_overlaps(rows: Sequence[Mapping[str, str]], *, max_spot_diff: int = 2) -> list[Overlap]:
    """HEST pairs with the same full-resolution image size and spot counts within ``max_spot_diff``."""
    by_size: dict[tuple[str, str], list[Mapping[str, str]]] = defaultdict(list)
    for row in rows:
        by_size[(row["fullres_px_width"], row["fullres_px_height"])].append(row)
    found = []
    for (width, height), group in by_size.items():
        for a, b in itertools.combinations(sorted(group, key=lambda r: natural_key(r["id"])), 2):
            spots_a, spots_b = int(a["spots_under_tissue"]), int(b["spots_under_tissue"])
            if abs(spots_a - spots_b) > max_spot_diff:
                continue
            same = "same study" if a["dataset_title"] == b["dataset_title"] else "different studies"
            found.append(
                Overlap(
                    "hest-hest",
                    a["id"],
                    b["id"],
                    f"image {width}x{height} px, spots {spots_a}/{spots_b}, {same}",
                )
            )
    return found


def stimage_hest_overlaps(
    stimage: Sequence[Mapping[str, Any]],
    hest: Sequence[Mapping[str, Any]],
    *,
    min_study_matches: int = 2,
    min_st_fraction: float = 0.5,
) -> list[Overlap]:
    """STimage slides with the assay, species and spot count of a HEST slide, in study pairs matching repeatedly.

    A spot count alone collides by chance (a Visium slide covered edge to edge has all 4,992 spots; legacy
    ST slides have a few hundred, and HEST's ALS study alone has 302 of them), so a pair counts only where
    it is one-to-one within its two studies (the STimage slide matches no other slide of that HEST study and
    the reverse), and only in study pairs with at least ``min_study_matches`` such pairs; for legacy ST
    those pairs must also cover ``min_st_fraction`` of the smaller study.
    """
    hest_by_key: dict[tuple[str, str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for h in hest:
        hest_by_key[(h["assay"], h["species"], h["spots"])].append(h)
    stimage_sizes = Counter(str(s["study"]) for s in stimage)
    hest_sizes = Counter(str(h["study"]) for h in hest)
    candidates: list[tuple[Mapping[str, Any], Mapping[str, Any], str]] = []
    per_stimage: Counter[tuple[str, str]] = Counter()  # (stimage slide, HEST study) -> matches
    per_hest: Counter[tuple[str, str]] = Counter()  # (HEST slide, STimage study) -> matches
    for s in stimage:
        study = str(s["study"])
        for h in hest_by_key.get((s["assay"], s["species"], s["spots"]), []):
            candidates.append((s, h, study))
            per_stimage[(str(s["id"]), h["study"])] += 1
            per_hest[(str(h["id"]), study)] += 1
    one_to_one = [
        (s, h, study)
        for s, h, study in candidates
        if per_stimage[(str(s["id"]), h["study"])] == 1 and per_hest[(str(h["id"]), study)] == 1
    ]
    pair_counts = Counter((study, h["study"]) for _, h, study in one_to_one)
    found = []
    for s, h, study in one_to_one:
        n = pair_counts[(study, h["study"])]
        smaller = min(stimage_sizes[study], hest_sizes[h["study"]])
        if n < min_study_matches or (s["assay"] == "st" and n < min_st_fraction * smaller):
            continue
        found.append(
            Overlap(
                "stimage-hest",
                str(s["id"]),
                str(h["id"]),
                f"{s['assay']}, {s['species']}, {s['spots']} spots; {n} one-to-one matches between STimage study "
                f"{study} ({stimage_sizes[study]} slides) and HEST '{h['study'][:50]}' ({hest_sizes[h['study']]})",
            )
        )
    return sorted(found, key=lambda o: (natural_key(o.first), natural_key(o.second)))


#: Organ words the two tables use for the same organ (HEST says "bowel" where STimage says "colon").
ORGAN_SYNONYMS: Final[Mapping[str, str]] = {
    "colon": "bowel",
    "colorectal": "bowel",
    "largeintestine": "bowel",
    "intestine": "bowel",
    "rectum": "bowel",
    "cerebellum": "brain",
    "lymphnode": "lymph",
    "node": "lymph",
}


def organs_compatible(first: str | None, second: str | None) -> bool:
    """Whether two organ labels can name the same tissue: either unknown, or a word in common."""
    if not first or not second:
        return True

    def words(label: str) -> set[str]:
        return {ORGAN_SYNONYMS.get(w, w) for w in re.split(r"[^a-z]+", label.lower()) if w}

    return bool(words(first) & words(second))


def stimage_internal_overlaps(stimage: Sequence[Mapping[str, Any]], *, full_array: int = 4992) -> list[Overlap]:
    """STimage slides from 10x releases (``_10X_`` in the name) with equal species, organ and Visium spot count.

    10x re-publishes some datasets (the same section under a later release date); these pairs are candidates.
    """
    by_key: dict[tuple[str, str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for s in stimage:
        source = str(s.get("source_id") or s["id"])
        if "_10X_" in source and s["assay"] == "visium" and s["spots"] != full_array:
            by_key[(s["species"], str(s.get("organ")), s["spots"])].append(s)
    found = []
    for (species, organ, spots), group in sorted(by_key.items()):
        for a, b in itertools.combinations(sorted(group, key=lambda x: str(x["id"])), 2):
            found.append(
                Overlap("stimage-stimage", str(a["id"]), str(b["id"]), f"visium, {species}, {organ}, {spots} spots")
            )
    return found


def stimage_hest_single_overlaps(
    stimage: Sequence[Mapping[str, Any]], hest: Sequence[Mapping[str, Any]], *, full_array: int = 4992
) -> list[Overlap]:
    """Weaker candidates: a one-slide STimage study (a 10x release) whose Visium spot count one HEST slide has.

    Reported for the dedup pre-check only (never used for the holdout list): a count that exactly one HEST
    slide of all 1,229 has, other than the full 4,992-spot array.
    """
    hest_by_key: dict[tuple[str, str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for h in hest:
        hest_by_key[(h["assay"], h["species"], h["spots"])].append(h)
    sizes = Counter(str(s["study"]) for s in stimage)
    found = []
    for s in stimage:
        if sizes[str(s["study"])] != 1 or s["assay"] != "visium" or s["spots"] == full_array:
            continue
        matches = hest_by_key.get((s["assay"], s["species"], s["spots"]), [])
        if len(matches) == 1 and organs_compatible(s.get("organ"), matches[0].get("organ")):
            h = matches[0]
            found.append(
                Overlap(
                    "stimage-hest-weak",
                    str(s["id"]),
                    str(h["id"]),
                    f"{s['assay']}, {s['species']}, {s['spots']} spots, the only HEST slide with that count "
                    f"('{h['study'][:50]}'); STimage study of one slide",
                )
            )
    return sorted(found, key=lambda o: (natural_key(o.first), natural_key(o.second)))


def tenx_image_overlaps(rows: Sequence[Mapping[str, str]]) -> list[Overlap]:
    """10x datasets whose images squidpy's registry records with the same sha256 (one tissue section)."""
    by_hash: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        digest = row["image_sha256"].strip()
        if digest:
            by_hash[digest].append(row["sample_id"].strip())
    found = []
    for digest, ids in sorted(by_hash.items()):
        for a, b in itertools.combinations(sorted(ids), 2):
            found.append(Overlap("10x-10x", a, b, f"identical image sha256 {digest[:12]}... (squidpy registry)"))
    return found


# ---------------------------------------------------------------------------------------------
# Holdout list
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchTask:
    """One row of the HEST-Benchmark task table."""

    number: int
    name: str
    technology: str
    declared: int
    ids: tuple[str, ...]


def _expand_ids(cell: str) -> list[str]:
    """``TENX95, NCBI783`` and ``MEND139~MEND162`` (an id range) into ids."""
    ids: list[str] = []
    for part in (p.strip() for p in cell.split(",")):
        if not part:
            continue
        if "~" in part:
            first, last = (x.strip() for x in part.split("~", 1))
            m1, m2 = re.match(r"^([A-Za-z]+)(\d+)$", first), re.match(r"^([A-Za-z]+)(\d+)$", last)
            if not m1 or not m2 or m1.group(1) != m2.group(1):
                raise ManifestError(f"cannot read the id range {part!r} in the HEST-Benchmark table")
            ids.extend(f"{m1.group(1)}{n}" for n in range(int(m1.group(2)), int(m2.group(2)) + 1))
        else:
            ids.append(part)
    return ids


def read_bench_tasks(path: Path) -> list[BenchTask]:
    """The task rows of HEST's benchmark table (markdown)."""
    tasks = []
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not re.match(r"^Task \d+$", cells[0]):
            continue
        tasks.append(
            BenchTask(
                number=int(cells[0].split()[1]),
                name=cells[1],
                technology=cells[3],
                declared=int(cells[2]),
                ids=tuple(_expand_ids(cells[4])),
            )
        )
    if not tasks:
        raise ManifestError(f"{path}: no 'Task N' rows found")
    return tasks


def build_holdout(sources: Path, catalogue: Catalogue) -> None:
    """``holdout.yaml``: benchmark slides, and their copies that the metadata shows in the manifests."""
    hest_rows = _read_csv(sources / HEST_TABLE)
    stimage_rows = _read_csv(sources / STIMAGE_TABLE)
    hest = catalogue.samples["hest1k.yaml"]
    stimage = catalogue.samples["stimage1k4m.yaml"]
    manifest_ids = {str(s["id"]) for samples in catalogue.samples.values() for s in samples}
    stimage_id = {row["slide"].strip(): sanitize_id(row["slide"].strip()) for row in stimage_rows}
    reasons: dict[str, list[str]] = defaultdict(list)
    groups: dict[str, list[str]] = defaultdict(list)

    def hold(slide_id: str, group: str, reason: str) -> None:
        if slide_id not in manifest_ids:
            catalogue.unmapped.append(f"{group}: {slide_id} ({reason}) is in no manifest")
            return
        if reason not in reasons[slide_id]:
            reasons[slide_id].append(reason)
        if slide_id not in groups[group]:
            groups[group].append(slide_id)

    # 1. HEST-Benchmark: the tasks and their sample ids, as HEST's tutorial lists them.
    hest_ids = {row["id"] for row in hest_rows}
    for task in read_bench_tasks(sources / HEST_BENCH_TABLE):
        present = [i for i in task.ids if i in hest_ids]
        for missing in (i for i in task.ids if i not in hest_ids):
            catalogue.unmapped.append(
                f"HEST-Benchmark Task {task.number} {task.name}: {missing} is in the task's id range but not in "
                f"HEST_v1_1_0.csv (the table declares {task.declared} samples, {len(present)} found)"
            )
        for sample_id in present:
            hold(sample_id, "HEST-Benchmark", f"HEST-Benchmark Task {task.number} {task.name} ({task.technology})")

    # 2. DLPFC: spatialLIBD sections 151507-151676, in HEST (subseries) and STimage (slide name).
    for row in hest_rows:
        subseries = (row["subseries"] or "").strip()
        in_range = subseries.isdigit() and DLPFC_FIRST <= int(subseries) <= DLPFC_LAST
        if row["dataset_title"].strip() == DLPFC_HEST_TITLE and in_range:
            hold(row["id"], "DLPFC", f"DLPFC benchmark: spatialLIBD section {subseries} (Maynard et al. 2021)")
    for row in stimage_rows:
        match = re.match(r"^Human_Brain_Maynard_\d+_Visium_(\d{6})$", row["slide"].strip())
        if match and DLPFC_FIRST <= int(match.group(1)) <= DLPFC_LAST:
            hold(
                stimage_id[row["slide"].strip()],
                "DLPFC",
                f"DLPFC benchmark: spatialLIBD section {match.group(1)} (Maynard et al. 2021), STimage copy",
            )

    # 3. HER2ST: the samples of Andersson et al. 2021 (PMID 34650042) in both tables.
    for row in hest_rows:
        if citation_from_link(row["study_link"]) == f"PMID:{HER2ST_PMID}":
            section = (row["subseries"] or "").strip()
            hold(
                row["id"], "HER2ST", f"HER2ST benchmark: section {section} (Andersson et al. 2021, PMID:{HER2ST_PMID})"
            )
    for row in stimage_rows:
        if HER2ST_PMID in [p.strip() for p in row["pmid"].split(",")]:
            section = row["slide"].strip().rsplit("_", 1)[-1]
            hold(
                stimage_id[row["slide"].strip()],
                "HER2ST",
                f"HER2ST benchmark: section {section} (Andersson et al. 2021, PMID:{HER2ST_PMID}), STimage copy",
            )

    # 4. Probable copies of held-out slides under other ids, following the metadata's evidence from slide to
    #    slide (a STimage slide can copy a HEST slide that itself copies a benchmark slide).
    edges: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for overlap in hest_internal_overlaps(hest_rows):
        if "different studies" in overlap.evidence:
            edges[overlap.first].append((overlap.second, overlap.evidence))
            edges[overlap.second].append((overlap.first, overlap.evidence))
    for overlap in stimage_hest_overlaps(stimage, hest):
        edges[overlap.first].append((overlap.second, overlap.evidence))
        edges[overlap.second].append((overlap.first, overlap.evidence))
    root_of = {slide_id: slide_id for ids in groups.values() for slide_id in ids}
    group_of = {slide_id: group for group, ids in groups.items() for slide_id in ids}
    queue = sorted(root_of, key=natural_key)
    for node in queue:  # breadth first; the queue grows while it is walked
        for neighbour, evidence in sorted(edges.get(node, []), key=lambda e: natural_key(e[0])):
            if neighbour in root_of:
                continue
            root, group = root_of[node], group_of[node]
            via = "" if node == root else f", itself a probable copy of {root}"
            hold(neighbour, group, f"probable copy of {node}{via} ({group}): {evidence}")
            root_of[neighbour], group_of[neighbour] = root, group
            queue.append(neighbour)

    catalogue.holdout = dict(reasons)
    catalogue.holdout_groups = {k: sorted(v, key=natural_key) for k, v in groups.items()}
    order = {"HEST-Benchmark": 0, "DLPFC": 1, "HER2ST": 2}
    slides: list[dict[str, str]] = []
    for group in sorted(groups, key=lambda g: order.get(g, 9)):
        for slide_id in sorted(groups[group], key=natural_key):
            if any(s["id"] == slide_id for s in slides):
                continue
            slides.append({"id": slide_id, "reason": "; ".join(reasons[slide_id])})
    header = [
        "GENERATED by scripts/make_manifests.py — do not edit by hand.",
        f"Regenerate: {REGENERATE}",
        "",
        "Benchmark slides kept out of pretraining by default (curate/build/splits.py: holdout='test' puts the",
        "slide's whole split group in test, holdout='exclude' leaves it out). Sources:",
        "- HEST-Benchmark: the task table of mahmoodlab/HEST tutorials/4-Running-HEST-Benchmark.ipynb @ 99303555",
        "  (manifests/sources/hest/hest-benchmark-tasks.md), ids as in HEST_v1_1_0.csv;",
        "- DLPFC: spatialLIBD sections 151507-151676 (HEST dataset_title 'spatialLIBD', subseries = section;",
        "  STimage slides Human_Brain_Maynard_02082021_Visium_<section>);",
        "- HER2ST: Andersson et al. 2021 (PMID:34650042): HEST study_link and STimage pmid.",
        "- probable copies of those slides under other ids: HEST slides of another study with the same",
        "  full-resolution image size and a spot count within 2; STimage slides with the same assay, species and",
        "  spot count in a study whose slides match the same HEST study at least twice.",
        f"{len(slides)} slides: "
        + ", ".join(f"{g} {len(v)}" for g, v in sorted(catalogue.holdout_groups.items(), key=lambda x: order[x[0]])),
    ]
    document = {
        "holdout": HOLDOUT_FORMAT,
        "description": "Public benchmark slides (HEST-Benchmark, DLPFC, HER2ST) and their copies in the manifests.",
        "slides": slides,
    }
    catalogue.files["holdout.yaml"] = dump_yaml(header, document)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

OUTPUTS: Final = ("hest1k.yaml", "stimage1k4m.yaml", "10x-visium.yaml", "holdout.yaml")


def generate(sources: Path = DEFAULT_SOURCES) -> Catalogue:
    """Build all four files from the tables under ``sources``; nothing is written."""
    catalogue = Catalogue()
    build_hest(sources, catalogue)
    build_stimage(sources, catalogue)
    build_tenx(sources, catalogue)
    build_holdout(sources, catalogue)
    hest_rows = _read_csv(sources / HEST_TABLE)
    tenx_rows = _read_csv(sources / TENX_TABLE, delimiter="\t")
    catalogue.overlaps = [
        *hest_internal_overlaps(hest_rows),
        *stimage_hest_overlaps(catalogue.samples["stimage1k4m.yaml"], catalogue.samples["hest1k.yaml"]),
        *stimage_hest_single_overlaps(catalogue.samples["stimage1k4m.yaml"], catalogue.samples["hest1k.yaml"]),
        *stimage_internal_overlaps(catalogue.samples["stimage1k4m.yaml"]),
        *tenx_image_overlaps(tenx_rows),
    ]
    for name, samples in catalogue.samples.items():
        bad = sorted({s["licence"] for s in samples if "licence" in s and not _valid_licence(s["licence"])})
        bad_species = sorted({s["species"] for s in samples if s["species"] not in SPECIES})
        if bad or bad_species:
            raise ManifestError(f"{name}: licences {bad} / species {bad_species} would not validate")
    return catalogue


def _valid_licence(value: str) -> bool:
    return value in KNOWN_LICENCES or re.match(r"^LicenseRef-[A-Za-z0-9.\-]+$", value) is not None


def summary(catalogue: Catalogue) -> str:
    """Totals per manifest (slides, expected spots, by assay/species/licence), exclusions, holdouts."""
    lines: list[str] = []
    for name in ("hest1k.yaml", "stimage1k4m.yaml", "10x-visium.yaml"):
        samples = catalogue.samples[name]
        with_spots = [s["spots"] for s in samples if s.get("spots") is not None]
        lines.append(f"{name}: {len(samples)} slides, {len({s['study'] for s in samples})} studies")
        lines.append(
            f"  expected spots: {sum(with_spots):,} over {len(with_spots)} slides"
            + (f" ({len(samples) - len(with_spots)} without a count)" if len(with_spots) < len(samples) else "")
        )
        for label, key in (("assay", "assay"), ("species", "species"), ("licence", "licence")):
            default = {"10x-visium.yaml": {"assay": "visium", "licence": "CC-BY-4.0"}}.get(name, {}).get(key)
            counts = Counter(str(s.get(key, default)) for s in samples)
            lines.append(f"  {label}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda x: -x[1])))
    lines.append(f"excluded: {len(catalogue.excluded)}")
    lines.extend(f"  {e.manifest}: {e.source_id}: {e.reason}" for e in catalogue.excluded)
    total = len(catalogue.holdout)
    lines.append(f"holdout: {total} slides")
    for group, ids in catalogue.holdout_groups.items():
        lines.append(f"  {group}: {len(ids)}")
    lines.append(f"unmapped benchmark ids: {len(catalogue.unmapped)}")
    lines.extend(f"  {u}" for u in catalogue.unmapped)
    kinds = Counter(o.kind for o in catalogue.overlaps)
    lines.append("overlap candidates: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write (or ``--check``) the four files; optionally print the summary and overlaps."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sources", type=Path, default=DEFAULT_SOURCES, help="folder of the copied source tables")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder the manifests are written to")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out; write nothing")
    parser.add_argument("--summary", action="store_true", help="print totals, exclusions and holdout counts")
    parser.add_argument("--overlaps", action="store_true", help="print the overlap candidates as TSV")
    args = parser.parse_args(argv)
    try:
        catalogue = generate(args.sources)
    except (ManifestError, OSError, KeyError, ValueError) as exc:
        print(f"make_manifests: error: {exc}", file=sys.stderr)
        return 2
    status = 0
    package = args.out.resolve() == DEFAULT_OUT.resolve()
    targets = [(args.out / name, name) for name in OUTPUTS]
    targets += [(path, name) for name, path in PACKAGE_COPIES.items() if package]
    for path, name in targets:
        text = catalogue.files[name]
        if args.check:
            current = path.read_text(encoding="utf-8") if path.exists() else None
            if current != text:
                print(f"{path}: differs from what the sources generate; rerun {REGENERATE}", file=sys.stderr)
                status = 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
    if args.summary:
        print(summary(catalogue))
    if args.overlaps:
        print("kind\tfirst\tsecond\tevidence")
        for overlap in catalogue.overlaps:
            print(f"{overlap.kind}\t{overlap.first}\t{overlap.second}\t{overlap.evidence}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
