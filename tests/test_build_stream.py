"""Growing a corpus: an appended generation numbers its shards on and leaves the old ones byte-identical."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stcorpus import schema
from stcorpus.curate.build.pack import PackResult, PackSettings, pack
from stcorpus.curate.build.workdir import UnitResult, WorkDir
from stcorpus.curate.errors import SettingsError
from stcorpus.curate.genes import GeneIndex
from stcorpus.curate.shards import write_shard_index
from tests.test_build_pack import fake_unit

GENES = ["ENSG00000000003", "ENSG00000000005", "ENSG00000000419", "ENSG00000000457"]


def sha256s(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for sub in (schema.WDS_DIR, schema.PARQUET_DIR)
        for p in sorted((root / sub).rglob("*"))
        if p.is_file()
    }


def append(
    out: Path,
    work: WorkDir,
    units: list[UnitResult],
    splits: dict[str, str],
    index: GeneIndex,
    settings: PackSettings,
    first: PackResult,
    starts: dict[str, int],
) -> PackResult:
    """Pack ``units`` as generation 1 after ``first``, in the corpus's recorded dtypes."""
    return pack(
        out,
        work=work,
        units=units,
        splits=splits,
        gene_index=index,
        settings=settings,
        generation=1,
        first_index=starts,
        tar_dtypes=first.tar_dtypes,
        counts_dtype=first.counts_dtype,
    )


def test_append_writes_a_new_generation_and_keeps_old_shards(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / "work")
    work.prepare()
    old = [fake_unit(work, "A", 7, GENES), fake_unit(work, "B", 5, GENES)]
    out = tmp_path / "corpus"
    settings = PackSettings(samples_per_shard=4, seed=2)
    index = GeneIndex(GENES)
    first = pack(out, work=work, units=old, splits={"A": "train", "B": "test"}, gene_index=index, settings=settings)
    before = sha256s(out)
    assert sorted(before) == sorted(s.path for s in first.shards)

    # A killed earlier append left a half-named file at the next number: it is cleared, old ones are not.
    stale = out / schema.shard_path("wds", "train", 2)
    stale.write_bytes(b"partial")
    new = [fake_unit(work, "C", 6, GENES)]
    starts = {split: 1 + max(s.index for s in first.shards if s.split == split) for split in ("train", "test")}
    second = append(out, work, new, {"C": "train"}, index, settings, first, starts)
    after = sha256s(out)
    assert {k: after[k] for k in before} == before  # every old shard byte-identical
    assert {s.generation for s in second.shards} == {1} and {s.generation for s in first.shards} == {0}
    assert sorted({s.index for s in second.shards}) == [2, 3]  # train numbered on from the old last shard
    assert set(after) - set(before) == {s.path for s in second.shards}

    write_shard_index(out, [*first.shards, *second.shards])
    rows = pq.read_table(out / schema.SHARDS_FILE).to_pylist()
    assert sorted((r["generation"], r["split"], r["index"]) for r in rows if r["format"] == "wds") == [
        (0, "test", 0),
        (0, "test", 1),
        (0, "train", 0),
        (0, "train", 1),
        (1, "train", 2),
        (1, "train", 3),
    ]
    keys = [
        k
        for r in rows
        if r["format"] == "parquet"
        for k in pq.read_table(out / r["path"]).column("__key__").to_pylist()
    ]
    assert len(keys) == len(set(keys)) == 18

    # Same inputs, same bytes: redoing the append (as a resume after kill -9 does) rewrites identical files.
    again = append(out, work, new, {"C": "train"}, index, settings, first, starts)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in second.shards]
    assert sha256s(out) == after


def test_append_refuses_counts_the_corpus_cannot_store(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / "work")
    work.prepare()
    out = tmp_path / "corpus"
    settings = PackSettings(samples_per_shard=4)
    index = GeneIndex(GENES)
    first = pack(
        out,
        work=work,
        units=[fake_unit(work, "A", 3, GENES)],
        splits={"A": "train"},
        gene_index=index,
        settings=settings,
    )
    floats = [fake_unit(work, "F", 3, GENES, dtype="float32")]
    with pytest.raises(SettingsError, match="--overwrite"):
        append(out, work, floats, {"F": "train"}, index, settings, first, {"train": 1})
    with pytest.raises(SettingsError, match="first_index"):
        pack(
            out,
            work=work,
            units=floats,
            splits={"F": "train"},
            gene_index=index,
            settings=settings,
            first_index={"train": 1},
        )
