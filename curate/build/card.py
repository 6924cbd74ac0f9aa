"""The dataset card (``README.md``) of a built corpus: YAML header for the Hub and ``datasets``, prose for people.

The YAML ``configs`` make ``datasets.load_dataset(<folder or repo>, streaming=True)`` read the
Parquet shards of every split, and ``dataset_info`` carries exact sample counts, so readers
know epoch lengths without opening a shard. The tar shards hold the same samples and load with
``load_dataset(<folder or repo>, data_dir="wds")``: one repository cannot also declare them as
a config, because ``datasets`` picks one builder per repository (huggingface/datasets#7101).
A corpus built with one format (``curate build --formats``) declares only that one: the card
lists, counts and shows how to load only the shards the corpus holds (:func:`card_format`).

The card has no timestamp: two builds of the same inputs give the same bytes (the build time
is kept in ``corpus.json`` alone). Its usage examples name the repository as ``<org>/<name>``
(``REPO_PLACEHOLDER``) until ``curate publish --repo ORG/NAME`` sends a copy that names the
repository (:func:`card_for_repo`); ``dataset_info.features`` are the Parquet rows' ``datasets``
features (``stcorpus.schema.hf_sample_features``), in the YAML form ``datasets`` reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import yaml

from stcorpus import schema
from stcorpus.curate.shards import ShardInfo

#: What the usage examples call the repository until it is known.
REPO_PLACEHOLDER: Final = "<org>/<name>"

#: SPDX ids the Hub's ``license`` field knows under a lower-case name.
_HUB_LICENCES = {
    "CC0-1.0": "cc0-1.0",
    "CC-BY-3.0": "cc-by-3.0",
    "CC-BY-4.0": "cc-by-4.0",
    "CC-BY-SA-4.0": "cc-by-sa-4.0",
    "CC-BY-NC-3.0": "cc-by-nc-3.0",
    "CC-BY-NC-4.0": "cc-by-nc-4.0",
    "CC-BY-NC-SA-4.0": "cc-by-nc-sa-4.0",
    "CC-BY-NC-ND-4.0": "cc-by-nc-nd-4.0",
    "CC-BY-ND-4.0": "cc-by-nd-4.0",
    "MIT": "mit",
    "Apache-2.0": "apache-2.0",
    "BSD-3-Clause": "bsd-3-clause",
    "Artistic-2.0": "artistic-2.0",
    "GPL-3.0-only": "gpl-3.0",
    "GPL-3.0-or-later": "gpl-3.0",
    "ODC-By-1.0": "odc-by",
    "PDDL-1.0": "pddl",
}


@dataclass(frozen=True)
class CardInputs:
    """What the card describes."""

    name: str
    slides: Sequence[Mapping[str, Any]]  # slides.parquet rows (every status)
    shards: Sequence[ShardInfo]
    n_genes: int
    counts_dtype: str
    tool_version: str
    settings: Mapping[str, Any]
    repo_id: str | None = None  # "<org>/<name>" when known, for the loading examples
    holdout: Mapping[str, Any] | None = None  # the holdout list that applied (corpus.json "holdout")
    generations: Sequence[Mapping[str, Any]] = ()  # corpus.json "generations"
    n_measured: int | None = None  # genes.parquet `measured` genes (None: every gene of the vocabulary)
    formats: Sequence[str] = schema.FORMATS  # the shard formats the corpus holds (corpus.json "formats")


def card_format(formats: Sequence[str]) -> str:
    """The format the card's ``configs`` and ``dataset_info`` describe: Parquet where the corpus has it."""
    return "parquet" if "parquet" in formats else "wds"


def _card_shards(inputs: CardInputs) -> list[ShardInfo]:
    fmt = card_format(inputs.formats)
    return [s for s in inputs.shards if s.format == fmt]


#: The ``data_files`` pattern of a split's shards, by format.
_DATA_FILES: Final = {
    "parquet": f"{schema.PARQUET_DIR}/{{split}}/*.parquet",
    "wds": f"{schema.WDS_DIR}/{{split}}/*.tar",
}


def _genes_line(inputs: CardInputs) -> str:
    """The vocabulary in a phrase: its size, and how many of its genes the corpus measured."""
    if inputs.n_measured is None:
        return f"{inputs.n_genes:,} genes (`genes.parquet`)"
    return (
        f"{inputs.n_measured:,} genes measured, on a vocabulary of {inputs.n_genes:,} (`genes.parquet`: every gene "
        "of the shipped gene references, so indices are the same in every corpus built with them)"
    )


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket of ``n`` samples."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M" if n < 10_000_000 else "10M<n<100M"


def _header(inputs: CardInputs) -> dict[str, Any]:
    built = [s for s in inputs.slides if s["status"] == "built" and s.get("n_spots_written")]
    licences = sorted({str(lic) for s in built for lic in (s["licence"], s.get("distribution_licence")) if lic})
    fmt = card_format(inputs.formats)
    parquet = _card_shards(inputs)
    splits = [split for split in schema.SPLITS if any(s.split == split for s in parquet)]
    header: dict[str, Any] = {"pretty_name": inputs.name}
    if len(licences) == 1 and licences[0] in _HUB_LICENCES:
        header["license"] = _HUB_LICENCES[licences[0]]
    else:
        header["license"] = "other"
        header["license_name"] = "per-slide" if licences else "none"
        header["license_details"] = "Each slide carries its own licence: " + (", ".join(licences) or "none") + "."
    header["tags"] = ["spatial-transcriptomics", "histopathology", "gene-expression", "visium", "stcorpus"]
    header["task_categories"] = ["image-feature-extraction"]
    header["size_categories"] = [size_category(sum(s.n_samples for s in parquet))]
    header["configs"] = [
        {
            "config_name": "default",
            "default": True,
            "data_files": [{"split": split, "path": _DATA_FILES[fmt].format(split=split)} for split in splits],
        }
    ]
    split_infos = []
    for split in splits:
        files = [s for s in parquet if s.split == split]
        split_infos.append(
            {"name": split, "num_bytes": sum(s.bytes for s in files), "num_examples": sum(s.n_samples for s in files)}
        )
    total = sum(s.bytes for s in parquet)
    header["dataset_info"] = {"config_name": "default"}
    if fmt == "parquet":  # the tar rows' features are datasets' WebDataset members: it infers them
        header["dataset_info"]["features"] = _yaml_features(inputs.counts_dtype)
    header["dataset_info"] |= {"splits": split_infos, "download_size": total, "dataset_size": total}
    return header


def _yaml_features(counts_dtype: str) -> list[dict[str, Any]]:
    """The Parquet rows' features as ``dataset_info.features`` in a card (``datasets``' own YAML form)."""
    from datasets import Features

    features = Features.from_dict(schema.hf_sample_features(counts_dtype))
    listed: list[dict[str, Any]] = features._to_yaml_list()
    return listed


def card_for_repo(text: str, repo_id: str) -> str:
    """The card ``text`` with its usage examples naming the Hub repository ``repo_id`` (``<org>/<name>``)."""
    return text.replace(f'"{REPO_PLACEHOLDER}"', f'"{repo_id}"').replace(
        f"hf://datasets/{REPO_PLACEHOLDER}", f"hf://datasets/{repo_id}"
    )


def _table(rows: Sequence[Sequence[Any]], head: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        text = "" if value is None else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _counts(slides: Sequence[Mapping[str, Any]], field: str) -> list[tuple[str, int, int]]:
    n_slides: Counter[str] = Counter()
    n_spots: Counter[str] = Counter()
    for slide in slides:
        value = str(slide.get(field) or "unknown")
        n_slides[value] += 1
        n_spots[value] += int(slide.get("n_spots_written") or 0)
    return [(value, n_slides[value], n_spots[value]) for value in sorted(n_slides)]


def _count_kind_text(built: Sequence[Mapping[str, Any]]) -> tuple[str, str, list[str]]:
    """(what the values are, the normalisation advice, the lines of a count-kind section) for the built slides.

    A slide declared ``counts: normalized`` is never called raw: the card names every such slide.
    """
    normalized = sorted(str(s["slide_id"]) for s in built if (s.get("count_kind") or "raw") != "raw")
    if not normalized:
        return "raw counts", "Counts are raw: normalise in the loader, never in the shards.", []
    what = (
        "normalised values, not raw counts"
        if len(normalized) == len(built)
        else f"counts (raw, but normalised values for {len(normalized)} of {len(built)} slides: see Count kinds)"
    )
    advice = (
        "Not every slide holds raw counts (`slides.parquet` column `count_kind`): the loader's count-based "
        "transforms (log1p, CP10k, rank) refuse normalised slides unless told otherwise."
    )
    section = [
        "## Count kinds",
        "",
        f"{len(normalized)} of {len(built)} slides hold values their source published already normalised "
        "(`count_kind: normalized`), not raw counts; the others hold raw counts:",
        "",
        _table(
            [
                (s["slide_id"], s.get("count_kind"), s.get("n_spots_written"))
                for s in built
                if s["slide_id"] in normalized
            ],
            ("slide", "count kind", "samples"),
        ),
        "",
    ]
    return what, advice, section


def _holdout_text(holdout: Mapping[str, Any] | None) -> str:
    """What the Splits section says about benchmark slides."""
    if holdout is None:
        return "benchmark slides listed in the build's holdout list never reach `train`."
    if holdout.get("name") == "none":
        return (
            "no holdout list was applied (`--holdout none`): benchmark slides (HEST-Benchmark, DLPFC, HER2ST) "
            "may be in `train`."
        )
    policy = "built into `test`" if holdout.get("policy") == "test" else "left out"
    return (
        f"benchmark slides never reach `train`: the holdout list `{holdout.get('name')}` "
        f"({holdout.get('slides', 0):,} slides, sha256 `{holdout.get('sha256')}`) held out "
        f"{holdout.get('held_out', 0):,} of this build's slides ({policy})."
    )


def _datasets_lines(formats: Sequence[str], *, repo: str, first: str) -> list[str]:
    """The ``load_dataset`` lines of the card, for the formats the corpus holds."""
    if "parquet" not in formats:
        return [
            f'ds = load_dataset("{repo}", streaming=True)  # WebDataset tars, every split',
            f'print(next(iter(ds["{first}"]))["__key__"])',
        ]
    if "wds" not in formats:
        return [
            f'ds = load_dataset("{repo}", streaming=True)  # Parquet shards, every split',
            f'print(next(iter(ds["{first}"]))["__key__"])',
        ]
    return [
        f'ds = load_dataset("{repo}", streaming=True)                  # Parquet shards, every split',
        f'wds = load_dataset("{repo}", data_dir="wds", streaming=True)  # the same samples as WebDataset tars',
        f'print(next(iter(ds["{first}"]))["__key__"], next(iter(wds["{first}"]))["__key__"])',
    ]


def _formats_note(formats: Sequence[str]) -> list[str]:
    """A paragraph saying which format a single-format corpus holds (nothing for both)."""
    if len(formats) > 1:
        return []
    names = {"parquet": "Parquet", "wds": "WebDataset"}
    held, other = formats[0], next(f for f in schema.FORMATS if f not in formats)
    return [
        f"This corpus holds its samples as {names[held]} shards only (`{held}/`; built with `curate build "
        f"--formats {held}`, recorded in `corpus.json` `formats`): there are no {names[other]} shards (`{other}/`).",
        "",
    ]


def render_card(inputs: CardInputs) -> str:
    """The full text of the corpus's ``README.md``."""
    header = yaml.safe_dump(_header(inputs), sort_keys=False, allow_unicode=True, width=1000)
    slides = list(inputs.slides)
    built = [s for s in slides if s["status"] == "built" and s.get("n_spots_written")]
    values, advice, kinds_section = _count_kind_text(built)
    others = [s for s in slides if s not in built]
    parquet = _card_shards(inputs)
    by_split = Counter({split: sum(s.n_samples for s in parquet if s.split == split) for split in schema.SPLITS})
    repo = inputs.repo_id or REPO_PLACEHOLDER
    first = next((split for split in schema.SPLITS if by_split[split]), schema.SPLITS[0])  # what the examples read
    lines = [
        "---",
        header.rstrip(),
        "---",
        "",
        f"# {inputs.name}",
        "",
        f"A corpus of (H&E tile, gene expression) pairs from spatial transcriptomics, schema `{schema.SCHEMA_ID}`, "
        f"built by `curate build` (stcorpus {inputs.tool_version}). One sample is one spot: a 224x224 patch at "
        f"0.5 um/px centred on the spot, a 224x224 region at 1.5 um/px around it, the spot's {values} on one "
        "Ensembl-keyed gene vocabulary, and the summed counts of its in-tissue lattice neighbours.",
        "",
        f"{sum(by_split.values()):,} samples from {len(built)} slides; {_genes_line(inputs)}; counts stored as "
        f"{inputs.counts_dtype}.",
        "",
        "## Load it",
        "",
        "With `datasets` (images decode to PIL):",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        *_datasets_lines(inputs.formats, repo=repo, first=first),
        "```",
        "",
        *_formats_note(inputs.formats),
        "For training at GPU speed, the torch loader of stcorpus (`pip install 'stcorpus[torch]'`) decodes in "
        "its own workers, resumes exactly and applies gene transforms (log1p, CP10k, rank tokens, panels, "
        "mouse-to-human orthologs); it reads the repository directly, with a local shard cache for later epochs "
        "if you give it a folder:",
        "",
        "```python",
        "from stcorpus.loaders import CorpusDataset, CorpusLoader, LoaderSettings",
        "",
        f'settings = LoaderSettings.from_dict({{"split": "{first}", "batch_size": 8, "drop_last": False'
        + ("" if "parquet" in inputs.formats else ', "format": "wds"')
        + "})",
        f'loader = CorpusLoader(CorpusDataset("hf://datasets/{repo}", settings), num_workers=0)',
        'print(next(iter(loader))["key"][:2])',
        "```",
        "",
        advice,
        "",
        "## Splits",
        "",
        _table([(split, f"{by_split[split]:,}") for split in schema.SPLITS if by_split[split]], ("split", "samples")),
        "",
        "Slides are split by patient (or by study where patients are unknown) with a seeded hash; "
        + _holdout_text(inputs.holdout),
        "",
        *kinds_section,
        "## Sample format",
        "",
        _table(
            [
                (f"`{schema.Member.PATCH.value}` / `patch`", "224x224 RGB JPEG, 0.5 um/px, centred on the spot"),
                (
                    f"`{schema.Member.REGION.value}` / `region`",
                    "224x224 RGB JPEG, 1.5 um/px; the patch is cell `pos` (0..8, row-major) of its 3x3 grid",
                ),
                (
                    f"`{schema.Member.EXPR.value}` / `genes`, `counts`",
                    "sorted int32 indices into genes.parquet of non-zero genes, and their counts (raw unless the "
                    "slide's `count_kind` in slides.parquet is `normalized`)",
                ),
                (
                    f"`{schema.Member.EXPR.value}` / `niche_genes`, `niche_counts`",
                    "the same for the summed counts of the in-tissue lattice neighbours",
                ),
                *((f"`json` / `{f.name}`", f.doc) for f in schema.META_FIELDS),
            ],
            ("WebDataset member / Parquet column", "content"),
        ),
        "",
        "A gene a slide did not measure is not a zero: `slides.parquet` lists each slide's `measured_genes`, and "
        "`genes.parquet` `measured` marks the genes some slide measured.",
        "",
        "## Contents",
        "",
        "### By organ",
        "",
        _table(_counts(built, "organ"), ("organ", "slides", "samples")),
        "",
        "### By species",
        "",
        _table(_counts(built, "species"), ("species", "slides", "samples")),
        "",
        "### By technology",
        "",
        _table(_counts(built, "assay"), ("assay", "slides", "samples")),
        "",
        "## Licences",
        "",
        "Every slide keeps the licence of its source; using this corpus means honouring each of them. Where "
        "the files came through a distribution that adds its own terms (e.g. HEST-1k's CC-BY-NC-SA-4.0), both "
        "apply.",
        "",
        _table(_counts(built, "licence"), ("licence", "slides", "samples")),
        "",
        _table(_counts(built, "distribution_licence"), ("distribution licence", "slides", "samples")),
        "",
        "## Slides",
        "",
        _table(
            [
                (
                    s["slide_id"],
                    s["study_id"],
                    s["source"],
                    s["licence"],
                    s.get("citation"),
                    s["split"],
                    s["n_spots_written"],
                )
                for s in sorted(built, key=lambda s: s["slide_id"])
            ],
            ("slide", "study", "source", "licence", "citation", "split", "samples"),
        ),
        "",
    ]
    if others:
        lines += [
            "## Slides not included",
            "",
            _table(
                [
                    (s["slide_id"], s["status"], s.get("reason") or "")
                    for s in sorted(others, key=lambda s: s["slide_id"])
                ],
                ("slide", "status", "reason"),
            ),
            "",
        ]
    if inputs.generations:
        lines += [
            "## Generations",
            "",
            "The corpus grows by appending: each `curate build --append` writes its slides' samples as new shards "
            "(`generation` in `shards.parquet`) and leaves every earlier shard byte-identical, so a pinned revision "
            "keeps its bytes. A loader reads all generations as one corpus; `corpus.json` `generations` records "
            "when each was built.",
            "",
            _table(
                [
                    (
                        g["generation"],
                        ", ".join(str(m["name"]) for m in g.get("manifests") or []),
                        len(g.get("slides") or {}),
                        f"{sum((g.get('samples') or {}).values()):,}",
                        g.get("shards", ""),
                    )
                    for g in inputs.generations
                ],
                ("generation", "manifests", "slides", "samples", "shards"),
            ),
            "",
        ]
    citations = sorted({str(s["citation"]) for s in built if s.get("citation")})
    lines += ["## Citations", ""]
    lines += [f"- {c}" for c in citations] or ["- (no citations recorded in the manifests)"]
    lines += [
        "",
        "## Provenance",
        "",
        "`corpus.json` records the schema version, the tool version, the manifests' digests, every source file's "
        "URL, size and sha256, the build settings and the gene reference versions: `curate build` on the same "
        "manifests regenerates this corpus. `shards.parquet` lists every shard with its sample count and sha256.",
        "",
    ]
    return "\n".join(lines)
