"""The streaming pack: shards written as units finish, in bounded disk, the same bytes whatever the timing or a kill."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stcorpus import schema
from stcorpus.curate.build.pack import PackResult, PackSettings, StreamPack, consumption_order, pack
from stcorpus.curate.build.workdir import SAMPLES_FILE, STATS_FILE, UnitResult, WorkDir
from stcorpus.curate.errors import SettingsError
from stcorpus.curate.genes import GeneIndex
from stcorpus.curate.shards import ShardSettings, ShardWriter
from tests.test_build_pack import fake_unit

GENES = ["ENSG00000000003", "ENSG00000000005", "ENSG00000000419", "ENSG00000000457"]
SETTINGS = PackSettings(samples_per_shard=4, seed=3, window=3)


def units_of(work: WorkDir, n: int = 8) -> list[UnitResult]:
    return [fake_unit(work, f"S{i}", 3 + (i * 5) % 7, GENES) for i in range(n)]


def splits_of(units: list[UnitResult]) -> dict[str, str]:
    return {u.slide_id: ("test" if u.slide_id == "S5" else "train") for u in units}


def order_of(units: list[UnitResult]) -> list[str]:
    return consumption_order((u.slide_id, u.slide.get("source")) for u in units)


def stream(
    out: Path,
    work: WorkDir,
    units: list[UnitResult],
    *,
    release: bool = False,
    splits: dict[str, str] | None = None,
    settings: PackSettings = SETTINGS,
    **options: Any,
) -> StreamPack:
    return StreamPack(
        out,
        work=work,
        order=order_of(units),
        splits=splits or splits_of(units),
        gene_index=GeneIndex(GENES),
        settings=settings,
        counts_dtype="int32",
        release=release,
        **options,
    )


def files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for sub in (schema.WDS_DIR, schema.PARQUET_DIR)
        for p in sorted((out / sub).rglob("*"))
        if p.is_file()
    }


def reference(tmp_path: Path, work: WorkDir, units: list[UnitResult]) -> tuple[PackResult, dict[str, bytes]]:
    result = pack(
        tmp_path / "reference",
        work=work,
        units=units,
        splits=splits_of(units),
        gene_index=GeneIndex(GENES),
        settings=SETTINGS,
    )
    return result, files(tmp_path / "reference")


def test_the_bytes_do_not_depend_on_the_order_units_finish(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / "work")
    work.prepare()
    units = units_of(work)
    expected, expected_files = reference(tmp_path, work, units)
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        packer = stream(out, work, units)
        packer.resume({})
        for i in np.random.default_rng(attempt).permutation(len(units)):
            packer.add(units[i])
        result = packer.finish()
        assert [(s.path, s.sha256) for s in result.shards] == [(s.path, s.sha256) for s in expected.shards]
        assert files(out) == expected_files
    assert expected.n_samples == {"train": sum(u.n_samples for u in units if u.slide_id != "S5"), "test": 3 + 25 % 7}
    # Every sample once; consecutive samples mix the window's slides.
    import pyarrow.parquet as pq

    keys = [
        k
        for s in expected.shards
        if s.format == "parquet"
        for k in pq.read_table(tmp_path / "reference" / s.path)["__key__"].to_pylist()
    ]
    assert len(keys) == len(set(keys)) == sum(u.n_samples for u in units)
    first = [k.split("__", 1)[0] for k in keys[:12]]
    assert len(set(first)) >= 3


def test_units_are_released_once_packed_and_the_disk_stays_bounded(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / "work")
    work.prepare()
    units = units_of(work, 12)
    _, expected_files = reference(tmp_path, work, units)
    out = tmp_path / "out"
    packer = stream(out, work, units, release=True)
    packer.resume({})
    on_disk = []
    by_id = {u.slide_id: u for u in units}
    added: list[str] = []
    for slide_id in order_of(units):  # as a local pool finishes them, near enough
        packer.add(by_id[slide_id])
        added.append(slide_id)
        on_disk.append(sum(work.has_samples(s) for s in added))
    result = packer.finish()
    # Never more than the windows (3 slides per split, 2 splits) and the slides of the open shards.
    assert max(on_disk) <= 2 * SETTINGS.window + 2, on_disk
    assert not any(work.has_samples(u.slide_id) for u in units)
    assert all((work.unit_dir(u.slide_id) / STATS_FILE).is_file() for u in units)
    totals, genes = work.histograms("S1")
    assert len(totals) == len(genes) == units[1].n_samples
    assert files(out) == expected_files
    assert sum(result.n_samples.values()) == sum(u.n_samples for u in units)


@pytest.mark.parametrize("stop_after", [2, 5, 9])
def test_a_killed_pack_resumes_to_the_same_bytes(tmp_path: Path, stop_after: int) -> None:
    work = WorkDir(tmp_path / "work")
    work.prepare()
    units = units_of(work, 10)
    _, expected_files = reference(tmp_path, work, units)
    out = tmp_path / "out"
    killed = stream(out, work, units, release=True)
    killed.resume({})
    for unit in units[:stop_after]:
        killed.add(unit)
    del killed  # as a kill -9 leaves it: open shards as hidden partial files, no finish
    visible = [p.name for p in out.rglob("*") if p.is_file()]
    assert all(not name.startswith(".") or name.endswith(".partial") for name in visible)
    assert all(name.startswith(".") for name in visible if name.endswith(".partial"))
    again = stream(out, work, units, release=True)
    reusable: dict[str, UnitResult | None] = {u.slide_id: work.result(u.slide_id) for u in units}
    not_needed = again.resume(reusable)
    # What the first run released is exactly what the resumed pack does not need again.
    released = {u.slide_id for u in units if not work.has_samples(u.slide_id)}
    assert released <= not_needed
    assert bool(released) == (stop_after >= 5), "slides leave the window only once it has been full"
    for unit in units:
        again.add(unit)
    again.finish()
    assert {k: v for k, v in files(out).items() if not Path(k).name.startswith(".")} == expected_files
    assert not list(out.rglob(".*partial*"))
    # A finished pack of the same inputs is taken as done, and a changed slide starts it over.
    done = stream(out, work, units, release=True)
    assert done.resume(reusable) == {u.slide_id for u in units}
    assert files(out) == expected_files
    changed = dict(reusable)
    changed["S0"] = UnitResult(**{**vars(reusable["S0"]), "unit_key": "other"})
    assert stream(out, work, units, release=True).resume(changed) == set()
    assert not (out / schema.WDS_DIR).exists()


def test_duplicates_keep_the_preferred_source(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / "work")
    work.prepare()
    units = []
    for slide_id, source in (("A-stimage", "stimage"), ("B-hest", "hest"), ("C", "hest")):
        unit = fake_unit(work, slide_id, 4, GENES)
        unit.slide["source"] = source
        unit.content_digest = "same" if slide_id != "C" else "other"
        units.append(unit)
    assert order_of(units) == ["B-hest", "C", "A-stimage"]
    packer = stream(tmp_path / "out", work, units, release=True, splits={u.slide_id: "train" for u in units})
    packer.resume({})
    for unit in units:
        packer.add(unit)
    result = packer.finish()
    assert result.duplicates == {"A-stimage": "B-hest"} and result.packed == ["B-hest", "C"]
    assert not work.has_samples("A-stimage")  # a duplicate's samples are not needed either


def test_a_later_slide_widens_the_tar_dtypes_and_every_tar_shard_is_rewritten(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / "work")
    work.prepare()
    small = fake_unit(work, "A", 9, GENES)
    big = fake_unit(work, "B", 5, GENES)
    table = work.samples("B")
    counts = table.column("counts").to_pylist()
    counts[0][0] = 70_000  # needs uint32
    import pyarrow as pa

    from stcorpus.curate.build.workdir import write_samples

    changed = table.set_column(
        table.schema.get_field_index("counts"), "counts", pa.array(counts, table.schema.field("counts").type)
    )
    write_samples(tmp_path / "B.arrow", changed)  # not over the mapped file it was read from
    (tmp_path / "B.arrow").replace(work.unit_dir("B") / SAMPLES_FILE)
    settings = PackSettings(samples_per_shard=4, seed=1, window=1)
    both = {"A": "train", "B": "train"}
    packer = stream(tmp_path / "out", work, [small, big], splits=both, settings=settings)
    packer.resume({})
    packer.add(small)
    assert packer.tar_dtypes is not None and packer.tar_dtypes.counts == "uint8"
    packer.add(big)
    result = packer.finish()
    assert result.tar_dtypes.counts == "uint32"
    for shard in result.shards:
        if shard.format != "wds":
            continue
        with tarfile.open(tmp_path / "out" / shard.path) as tar:
            for member in tar:
                if member.name.endswith(".expr.npz"):
                    data = tar.extractfile(member)
                    assert data is not None
                    with np.load(io.BytesIO(data.read())) as arrays:
                        assert arrays["counts"].dtype == np.uint32
    # An append cannot widen the corpus's dtypes.
    fixed = stream(
        tmp_path / "fixed",
        work,
        [small, big],
        splits=both,
        settings=settings,
        generation=1,
        first_index={"train": 0},
        tar_dtypes=result.tar_dtypes.__class__(genes="uint16", counts="uint8", niche_counts="uint8"),
    )
    fixed.resume({})
    fixed.add(small)
    with pytest.raises(SettingsError, match=r"appended slide B needs expr.npz dtypes.*--reshuffle"):
        fixed.add(big)


def test_retyped_tar_shards_are_the_bytes_written_in_the_wider_dtypes(tmp_path: Path) -> None:
    from stcorpus.curate.build.pack import _SlideCache

    work = WorkDir(tmp_path / "work")
    work.prepare()
    unit = fake_unit(work, "A", 10, GENES)
    cache = _SlideCache(work, gene_index=GeneIndex(GENES), counts_dtype="int32", drop_outside=False)
    samples = cache.source(unit).samples(np.arange(10), split="train")
    narrow = schema.TarDtypes(genes="uint16", counts="uint8", niche_counts="uint8")
    wide = schema.TarDtypes(genes="uint32", counts="uint16", niche_counts="uint32")
    shard = ShardSettings(samples_per_shard=4)
    with ShardWriter(tmp_path / "a", split="train", settings=shard, tar_dtypes=wide) as direct:
        direct.add_all(samples)
    retyped = ShardWriter(tmp_path / "b", split="train", settings=shard, tar_dtypes=narrow)
    retyped.add_all(samples[:6])  # one shard committed, one open
    retyped.retype(wide)
    retyped.add_all(samples[6:])
    retyped.close()
    assert [(s.path, s.sha256, s.bytes) for s in retyped.shards] == [(s.path, s.sha256, s.bytes) for s in direct.shards]
    assert files(tmp_path / "a") == files(tmp_path / "b")


def _rerun(out: Path, work: WorkDir, units: list[UnitResult], rebuild: dict[str, int]) -> tuple[set[str], set[str]]:
    """Resume a released pack over ``units``; rebuild (as a unit would) what it needs whose samples are gone."""
    again = stream(out, work, units, release=True)
    not_needed = again.resume({u.slide_id: u if u.status != "failed" else None for u in units})
    rebuilt = set()
    for unit in units:
        if unit.slide_id not in not_needed and not work.has_samples(unit.slide_id) and unit.status == "built":
            fake_unit(work, unit.slide_id, rebuild[unit.slide_id], GENES)
            rebuilt.add(unit.slide_id)
        again.add(unit)
    again.finish()
    return not_needed, rebuilt


def test_an_edited_slide_repacks_from_its_place_on_and_reuses_the_slides_before(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / "work")
    work.prepare()
    units = units_of(work, 10)
    sizes = {u.slide_id: u.n_samples for u in units}
    out = tmp_path / "out"
    first = stream(out, work, units, release=True)
    first.resume({})
    for unit in units:
        first.add(unit)
    first.finish()
    # S7 changes (its entry, its counts): what a fresh pack of the new slides writes.
    edited = fake_unit(work, "S7", 11, GENES)
    edited.unit_key = "edited"
    work.commit(work.begin("S7"), edited)  # result only: its samples were written by fake_unit above
    sizes["S7"] = 11
    new_units = [edited if u.slide_id == "S7" else u for u in units]
    fresh_work = WorkDir(tmp_path / "fresh-work")
    fresh_work.prepare()
    fresh_units = [fake_unit(fresh_work, u.slide_id, sizes[u.slide_id], GENES) for u in new_units]
    fresh_units[7].unit_key = "edited"
    reference = pack(
        tmp_path / "fresh",
        work=fresh_work,
        units=fresh_units,
        splits=splits_of(fresh_units),
        gene_index=GeneIndex(GENES),
        settings=SETTINGS,
    )
    assert reference.shards
    fake_unit(work, "S7", 11, GENES)  # the edited slide's samples, as its rebuilt unit writes them
    not_needed, rebuilt = _rerun(out, work, new_units, sizes)
    assert files(out) == files(tmp_path / "fresh")
    assert {"S0", "S1"} <= not_needed and "S7" not in not_needed
    assert "S0" not in rebuilt and len(rebuilt) < len(units) - 1


def test_after_a_failed_slide_nothing_is_released_so_its_retry_rebuilds_nothing(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / "work")
    work.prepare()
    units = units_of(work, 10)
    sizes = {u.slide_id: u.n_samples for u in units}
    _, expected_files = reference(tmp_path, work, units)
    failed = UnitResult(**{**vars(units[4]), "status": "failed", "n_samples": 0, "content_digest": ""})
    out = tmp_path / "out"
    first = stream(out, work, units, release=True)
    first.resume({})
    for unit in units:
        first.add(failed if unit.slide_id == "S4" else unit)
    first.finish()
    assert all(work.has_samples(u.slide_id) for u in units[4:])  # held from the failure on
    assert not all(work.has_samples(u.slide_id) for u in units[:4])  # released before it
    _, rebuilt = _rerun(out, work, units, sizes)  # S4 builds this time
    assert rebuilt == set() and files(out) == expected_files


@pytest.mark.parametrize("fmt", schema.FORMATS)
def test_a_killed_pack_of_one_format_resumes_to_that_formats_bytes(tmp_path: Path, fmt: str) -> None:
    """``formats=(fmt,)``: the shards of that format a pack of both writes, after a kill and a resume too."""
    work = WorkDir(tmp_path / "work")
    work.prepare()
    units = units_of(work, 10)
    _, both = reference(tmp_path, work, units)
    expected = {path: data for path, data in both.items() if path.startswith(f"{fmt}/")}
    one = PackSettings(samples_per_shard=4, seed=3, window=3, formats=(fmt,))
    out = tmp_path / "out"
    killed = stream(out, work, units, settings=one)
    killed.resume({})
    for unit in units[:5]:
        killed.add(unit)
    del killed  # committed shards of the first slides stay, the open one is a hidden partial file
    again = stream(out, work, units, settings=one)
    assert again.resume({u.slide_id: work.result(u.slide_id) for u in units}), "resumed, not started over"
    for unit in units:
        again.add(unit)
    result = again.finish()
    assert {s.format for s in result.shards} == {fmt}
    assert sum(result.n_samples.values()) == sum(u.n_samples for u in units)
    assert {k: v for k, v in files(out).items() if not Path(k).name.startswith(".")} == expected
