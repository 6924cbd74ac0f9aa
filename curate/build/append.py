"""Growing a built corpus: what ``curate build --append`` reads from the corpus it adds to.

An append writes the samples of the slides the corpus does not hold yet as a new *generation*
of shards, numbered on from each split's last shard, and leaves every existing shard file
byte-identical (so a re-publish sends only the new files, and users who pinned a revision keep
their bytes). Everything an append must agree with comes from the corpus itself:

- ``corpus.json`` ``generations``: one record per generation (its date, manifests, slides with
  their unit identity and content fingerprint, samples per split). It is written last, so it is
  the commit point: shards and ``shards.parquet`` rows of a generation it does not list are what
  a killed append left, and the rerun writes them again (``pack`` clears the files first).
- ``genes.parquet``: the vocabulary is kept, so every existing gene index stays valid. Built on
  the same gene references and panels (``vocabulary_sha256`` is the same), it holds every gene a
  new slide can measure; only its ``measured`` column may grow, and the file is then rewritten
  with the same indices. A corpus whose vocabulary is another (the union of its slides, written
  before the vocabulary was the references', or other references): a gene a new slide measured
  outside it is dropped from that slide's samples, counted per slide and reported (as CORPUS.md
  asks of unmapped features); ``--reshuffle`` rebuilds the corpus on the reference vocabulary.
- ``corpus.json`` ``counts_dtype`` and ``expression``: the dtypes of the shards, one per corpus.
- ``corpus.json`` ``settings``: the settings that decide a sample's bytes must be the corpus's.
- ``corpus.json`` ``formats``: the shard formats the corpus holds (both where the key is absent);
  an append writes exactly those (``check_formats``; a rerun of the build that made the corpus too).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stcorpus import schema
from stcorpus.curate.build.workdir import UnitResult, WorkDir
from stcorpus.curate.errors import BuildError
from stcorpus.curate.shards import ShardInfo

if TYPE_CHECKING:
    import pyarrow as pa

    from stcorpus.curate.build.unit import UnitSettings
    from stcorpus.curate.fetch import FetchSettings
    from stcorpus.curate.manifest import Sample

#: ``corpus.json`` key of the generation records.
GENERATIONS_KEY = "generations"

#: ``settings`` keys an append may change: which slides it considers.
_FREE_SETTINGS = ("selection",)

_REBUILD = "pass --reshuffle to rebuild the whole corpus (every shard rewritten) or --overwrite to start over"


@dataclass(frozen=True)
class Existing:
    """The built corpus an append adds to."""

    out: Path
    info: dict[str, Any]  # corpus.json
    generations: list[dict[str, Any]]  # corpus.json generations (committed ones)
    shards: list[ShardInfo]  # shards.parquet rows of those generations
    rows: dict[str, dict[str, Any]]  # slides.parquet rows by slide id (every status)
    vocabulary: pa.Table  # genes.parquet

    @property
    def slides(self) -> dict[str, dict[str, Any]]:
        """Slides whose samples are in the corpus: slide id -> {unit_key, content_digest}."""
        return {slide: entry for g in self.generations for slide, entry in g["slides"].items()}

    @property
    def next_generation(self) -> int:
        """The number the append's generation gets."""
        return 1 + max(int(g["generation"]) for g in self.generations)

    def first_index(self) -> dict[str, int]:
        """One past each split's last shard (0 for a split without shards): where the append numbers from."""
        return {
            split: 1 + max((s.index for s in self.shards if s.split == split), default=-1) for split in schema.SPLITS
        }

    @property
    def counts_dtype(self) -> str:
        """The corpus's counts dtype."""
        return str(self.info.get("counts_dtype", "int32"))

    @property
    def tar_dtypes(self) -> schema.TarDtypes:
        """The corpus's ``expr.npz`` dtypes."""
        record = self.info.get(schema.CorpusKey.EXPRESSION.value) or {}
        return schema.TarDtypes(
            genes=str(record.get(schema.Expr.GENES.value, "int32")),
            counts=str(record.get(schema.Expr.COUNTS.value, "int32")),
            niche_counts=str(record.get(schema.Expr.NICHE_COUNTS.value, "int32")),
        )


def generation_record(
    generation: int,
    *,
    built_at: str,
    manifests: Sequence[Mapping[str, Any]],
    units: Sequence[UnitResult],
    samples: Mapping[str, int],
    n_shards: int,
    genes_outside: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """One ``corpus.json`` ``generations`` entry: what the generation added and from which manifests.

    ``genes_outside`` (an append): per slide, the measured genes outside the corpus's vocabulary
    that were dropped from its samples; the record keeps their number per slide.
    """
    return {
        "generation": generation,
        "built_at": built_at,
        "manifests": [dict(m) for m in manifests],
        "slides": {
            u.slide_id: {"unit_key": u.unit_key, "content_digest": u.content_digest}
            for u in sorted(units, key=lambda u: u.slide_id)
        },
        "samples": dict(samples),
        "shards": n_shards,
        "genes_outside_vocabulary": {slide: len(ids) for slide, ids in sorted((genes_outside or {}).items())},
    }


def read_existing(out: Path, *, work: WorkDir) -> Existing:
    """The corpus in ``out`` as an append sees it; a folder without a finished corpus is an error.

    A corpus written before generations were recorded is one generation 0 holding its built
    slides (their identity read from the work folder's units, where they still are).
    """
    import pyarrow.parquet as pq

    corpus = out / schema.CORPUS_FILE
    if not corpus.is_file():
        raise BuildError(
            f"--append: {out} holds no built corpus ({schema.CORPUS_FILE} is missing): build it first without --append"
        )
    try:
        info: dict[str, Any] = json.loads(corpus.read_text(encoding="utf-8"))
        rows = {r["slide_id"]: r for r in pq.read_table(out / schema.SLIDES_FILE).to_pylist()}
        shard_rows = pq.read_table(out / schema.SHARDS_FILE).to_pylist()
        vocabulary = pq.read_table(out / schema.GENES_FILE)
    except (OSError, ValueError) as exc:
        raise BuildError(
            f"--append: the corpus in {out} cannot be read ({exc}); pass --overwrite to rebuild it"
        ) from None
    if info.get("schema") != schema.SCHEMA_ID:
        raise BuildError(
            f"--append: the corpus in {out} is schema {info.get('schema')!r}, this stcorpus writes "
            f"{schema.SCHEMA_ID}: {_REBUILD}"
        )
    generations = info.get(GENERATIONS_KEY)
    if not generations:
        built = sorted(slide for slide, row in rows.items() if row.get("status") == "built")
        units = {slide: work.result(slide) for slide in built}
        generations = [
            {
                "generation": 0,
                "built_at": info.get("built_at"),
                "manifests": info.get("manifests") or [],
                "slides": {
                    slide: {
                        "unit_key": unit.unit_key if unit else "",
                        "content_digest": unit.content_digest if unit else "",
                    }
                    for slide, unit in units.items()
                },
                "samples": info.get("splits") or {},
                # written before generations (and formats) were recorded: both formats
                "shards": sum(1 for r in shard_rows if r["format"] == "parquet"),
            }
        ]
    committed = {int(g["generation"]) for g in generations}
    shards = [
        ShardInfo(**{**r, "slide_ids": tuple(r["slide_ids"] or ())})
        for r in shard_rows
        if int(r["generation"]) in committed
    ]
    # A stat per shard, not a hash: a killed --reshuffle or --overwrite leaves corpus.json naming shards it removed.
    broken = [s.path for s in shards if not (out / s.path).is_file() or (out / s.path).stat().st_size != s.bytes]
    if broken:
        raise BuildError(
            f"--append: {len(broken)} shard(s) that {schema.SHARDS_FILE} lists in {out} are missing or have another "
            f"size (e.g. {broken[0]}): finish the build that was rewriting them (rerun it, e.g. with --reshuffle) "
            "before appending"
        )
    return Existing(out=out, info=info, generations=list(generations), shards=shards, rows=rows, vocabulary=vocabulary)


def check_formats(out: Path, info: Mapping[str, Any], formats: Sequence[str], *, growing: bool) -> None:
    """The build's shard ``formats`` must be those the corpus in ``out`` holds (``corpus.json`` ``info``).

    ``growing``: an append (else a rerun of the build of the same manifests, which resumes the corpus).
    Only a build that rewrites every shard (``--reshuffle``, ``--overwrite``) may change them.
    """
    try:
        held = schema.corpus_formats(info)
    except ValueError as exc:
        raise BuildError(f"{out}/{schema.CORPUS_FILE}: {exc}; pass --overwrite to rebuild the corpus") from None
    if tuple(formats) == held:
        return
    doing = "--append" if growing else f"--out {out}"
    verb = "append to it" if growing else "resume it"
    raise BuildError(
        f"{doing}: the corpus in {out} holds {' and '.join(held)} shards ({schema.CORPUS_FILE} formats), not "
        f"--formats {','.join(formats)}: give --formats {','.join(held)} to {verb}, or rebuild every shard in "
        f"--formats {','.join(formats)} with --reshuffle (or --overwrite)" + (" instead of --append" if growing else "")
    )


def _without_formats(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` without ``pack.formats``, which corpora written before it lack (``check_formats`` has it)."""
    pack = settings.get("pack")
    if not isinstance(pack, Mapping):
        return dict(settings)
    return {**settings, "pack": {k: v for k, v in pack.items() if k != "formats"}}


def check_settings(existing: Existing, settings: Mapping[str, Any]) -> None:
    """The settings that decide a sample's bytes (tiles, QC, genes, splits, order, holdout) must be the corpus's.

    So must the shard formats (``settings["pack"]["formats"]``, against ``corpus.json`` ``formats``).
    """
    check_formats(existing.out, existing.info, settings["pack"]["formats"], growing=True)
    recorded = _without_formats(existing.info.get("settings") or {})
    settings = _without_formats(settings)
    differ = sorted(
        key
        for key in set(recorded) | set(settings)
        if key not in _FREE_SETTINGS
        and json.dumps(recorded.get(key), sort_keys=True) != json.dumps(settings.get(key), sort_keys=True)
    )
    if differ:
        raise BuildError(
            f"--append: settings {', '.join(differ)} differ from those the corpus in {existing.out} was built with "
            f"({schema.CORPUS_FILE} settings): give the same options as that build, or {_REBUILD}"
        )


def split_new(
    samples: Sequence[Sample], existing: Existing, *, unit: UnitSettings, fetch: FetchSettings
) -> list[Sample]:
    """The samples the corpus does not hold yet; one it holds whose entry or inputs changed is an error.

    A slide's identity is its unit key (settings + resolved manifest entry) and the sha256 of its
    inputs as ``corpus.json`` ``sources`` recorded them; an input whose bytes are not known
    without the network (an unpinned remote source not in the cache) is not compared.
    """
    from stcorpus.curate.build.unit import known_inputs, unit_key

    held = existing.slides
    recorded: dict[str, set[tuple[str, str, str]]] = {}
    for source in existing.info.get("sources") or []:
        recorded.setdefault(str(source["slide_id"]), set()).add(
            (str(source["name"]), str(source["url"]), str(source["sha256"]))
        )
    changed: list[str] = []
    new: list[Sample] = []
    for sample in samples:
        if sample.id not in held:
            new.append(sample)
            continue
        key = held[sample.id].get("unit_key")
        if key and key != unit_key(sample, unit):
            changed.append(f"{sample.id} (manifest entry or settings)")
            continue
        current = known_inputs(sample, fetch)
        if current is not None and sample.id in recorded:
            now = {(str(i["name"]), str(i["url"]), str(i["sha256"])) for i in current}
            if now != recorded[sample.id]:
                names = sorted({name for name, _, _ in now ^ recorded[sample.id]})
                changed.append(f"{sample.id} (input files: {', '.join(names)})")
    if changed:
        raise BuildError(
            f"--append: {len(changed)} slide(s) already in the corpus in {existing.out} changed since they were built: "
            f"{'; '.join(changed[:10])}{'; ...' if len(changed) > 10 else ''}. An append never rewrites existing "
            f"shards: {_REBUILD}"
        )
    return new


def corpus_digests(existing: Existing) -> dict[str, str]:
    """Counts fingerprint -> slide of every slide in the corpus (an appended slide equal to one is a duplicate).

    The corpus's copy is kept whatever the source preference: its shards are not rewritten.
    """
    return {
        entry["content_digest"]: slide for slide, entry in sorted(existing.slides.items()) if entry["content_digest"]
    }


def genes_outside(units: Sequence[UnitResult], vocabulary: pa.Table) -> dict[str, list[str]]:
    """Per new slide, the measured genes outside the corpus's vocabulary (dropped from its samples).

    Empty when the corpus's vocabulary is the references' (of the same panels) that mapped the slides.
    """
    import numpy as np

    from stcorpus.curate.genes import GeneIndex

    index = GeneIndex(vocabulary)
    outside = {}
    for unit in units:
        ids = np.asarray(unit.gene_ids, dtype=np.str_)
        missing = ids[index.positions(ids) < 0].tolist()
        if missing:
            outside[unit.slide_id] = missing
    return outside


def merged_manifests(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The corpus's manifests after an append: the earlier ones, a re-given one replaced by its current digest."""
    by_name = {str(m["name"]): dict(m) for m in old}
    by_name.update({str(m["name"]): dict(m) for m in new})
    return [by_name[name] for name in sorted(by_name)]


def merged_sources(existing: Existing, results: Mapping[str, UnitResult]) -> list[dict[str, Any]]:
    """``corpus.json`` ``sources``: the corpus's slides as recorded, and the inputs of the slides this run read."""
    kept = [s for s in existing.info.get("sources") or [] if s["slide_id"] not in results]
    fresh = [{"slide_id": r.slide_id, **i} for r in results.values() for i in r.inputs]
    return sorted([*kept, *fresh], key=lambda s: (s["slide_id"], s["name"]))
