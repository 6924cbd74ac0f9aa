"""The epoch plan: which samples each rank and worker reads, decided from counts alone."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stcorpus.loaders.errors import EmptySelectionError, LoaderSettingsError
from stcorpus.loaders.plan import (
    EpochPlan,
    ShardEntry,
    delivery_order,
    expand,
    intervals,
    iter_window_batches,
    worker_runs,
)
from stcorpus.loaders.settings import LoaderSettings


def shards(counts: list[int], *, selected: dict[int, list[int]] | None = None) -> list[ShardEntry]:
    selected = selected or {}
    return [
        ShardEntry(
            path=f"s{i}",
            split="train",
            index=i,
            n_rows=n,
            nbytes=0,
            rows=np.asarray(selected[i], dtype=np.int64) if i in selected else None,
        )
        for i, n in enumerate(counts)
    ]


def plan(entries: list[ShardEntry], **options: object) -> EpochPlan:
    kwargs: dict[str, object] = {
        "seed": 0,
        "epoch": 0,
        "shuffle": True,
        "rank": 0,
        "world_size": 1,
        "batch_size": 4,
        "window": 8,
        "drop_last": False,
        "uneven": "drop",
    }
    kwargs.update(options)
    return EpochPlan(entries, **kwargs)  # type: ignore[arg-type]


def samples_of(p: EpochPlan, batches: list[int]) -> list[tuple[int, int]]:
    """(shard path index, file row) of every sample of ``batches``, in emitted order."""
    out = []
    for u, group in iter_window_batches(p, np.asarray(batches)):
        start, stop = p.window_span(u)
        window = [(seg.shard, int(r)) for seg in p.segments(start, stop) for r in seg.rows]
        assert len(window) == stop - start
        perm = p.window_permutation(u)
        for b in group:
            out += [window[o] for o in p.batch_offsets(b, perm)]
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("uneven", ["drop", "wrap"])
def test_ranks_cover_the_epoch_with_equal_counts(world_size: int, uneven: str) -> None:
    entries = shards([7, 7, 7, 5, 3], selected={1: [0, 2, 3, 6]})  # 26 samples, shard 1 filtered by row
    n = sum(e.n for e in entries)
    seen: Counter[tuple[int, int]] = Counter()
    per_rank = []
    for rank in range(world_size):
        p = plan(entries, rank=rank, world_size=world_size, uneven=uneven)
        got = samples_of(p, list(range(p.n_batches)))
        assert len(got) == p.n_samples
        per_rank.append((p.n_batches, len(got)))
        seen.update(got)
    assert len(set(per_rank)) == 1, f"ranks differ: {per_rank}"
    everything = {(i, int(r)) for i, e in enumerate(entries) for r in e.raw_rows(0, e.n)}
    assert set(seen) <= everything
    assert (1, 1) not in seen and (1, 4) not in seen, "rows outside the selection were read"
    if uneven == "drop":
        assert max(seen.values()) == 1
        assert len(seen) == n - n % world_size
    else:
        assert set(seen) == everything
        assert sum(seen.values()) == world_size * -(-n // world_size)
        assert sum(c - 1 for c in seen.values()) == world_size * -(-n // world_size) - n


def test_drop_last_and_window_shuffle_are_seeded_and_epoch_aware() -> None:
    entries = shards([10, 10, 10])
    a = plan(entries, drop_last=True)
    assert a.n_batches == 7 and a.n_samples == 28
    order = samples_of(a, list(range(a.n_batches)))
    assert len(set(order)) == 28
    assert order == samples_of(plan(entries, drop_last=True), list(range(7))), "not reproducible"
    assert order != samples_of(plan(entries, drop_last=True, epoch=1), list(range(7))), "same order every epoch"
    assert order != samples_of(plan(entries, drop_last=True, seed=1), list(range(7)))
    unshuffled = samples_of(plan(entries, shuffle=False, drop_last=True), list(range(7)))
    assert unshuffled == [(s, r) for s in range(3) for r in range(10)][:28]
    # A window permutes only its own samples: positions never leave their window.
    for b in range(a.n_batches):
        lo = a.window_of(b) * a.window
        assert all(lo <= lo + o < lo + a.window for o in a.batch_offsets(b))


def test_worker_split_and_delivery_order() -> None:
    remaining = np.arange(10)
    runs = worker_runs(remaining, 3)
    assert [r.tolist() for r in runs] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert delivery_order(runs).tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8, 9]
    assert sorted(np.concatenate(worker_runs(np.array([1, 4, 5, 9]), 3)).tolist()) == [1, 4, 5, 9]
    assert intervals([5, 0, 1, 2, 7, 8]) == [[0, 3], [5, 6], [7, 9]]
    assert expand([[0, 3], [5, 6]]).tolist() == [0, 1, 2, 5]


def test_remaining_after_consumed_batches() -> None:
    p = plan(shards([40]))
    assert p.remaining([[0, 3], [5, 6]]).tolist() == [3, 4, 6, 7, 8, 9]


def test_too_little_data_is_a_clear_error() -> None:
    with pytest.raises(EmptySelectionError, match="fewer than one batch"):
        plan(shards([5]), world_size=2, batch_size=4, drop_last=True)
    with pytest.raises(EmptySelectionError, match="cannot be spread over 3 ranks"):
        plan(shards([2]), world_size=3)


def test_fingerprint_changes_with_what_decides_batches() -> None:
    entries = shards([7, 7])
    base = plan(entries).fingerprint()
    assert plan(entries, epoch=3).fingerprint() == base, "the epoch is stored beside the fingerprint"
    assert plan(entries, rank=0).fingerprint() == base
    for change in ({"seed": 1}, {"batch_size": 2}, {"window": 16}, {"uneven": "wrap"}):
        assert plan(entries, **change).fingerprint() != base, change
    assert plan(shards([7, 7], selected={0: [1, 2]})).fingerprint() != base


def test_settings_from_dict_are_strict() -> None:
    s = LoaderSettings.from_dict(
        {"split": "validation", "batch_size": 6, "shuffle_window": 10, "filters": {"organ": ["heart"]}}
    )
    assert s.split == ("validation",) and s.window == 12 and s.filters.organ == ("heart",)
    assert LoaderSettings.from_dict(s.to_dict()) == s
    with pytest.raises(LoaderSettingsError, match=r"unknown key\(s\): batchsize"):
        LoaderSettings.from_dict({"batchsize": 3})
    with pytest.raises(LoaderSettingsError, match=r"unknown key\(s\) in genes: mode"):
        LoaderSettings.from_dict({"genes": {"mode": "rank"}})
    with pytest.raises(LoaderSettingsError, match="batch_size must be an integer"):
        LoaderSettings.from_dict({"batch_size": "8"})
    with pytest.raises(LoaderSettingsError, match="format must be one of"):
        LoaderSettings(format="zarr")
    with pytest.raises(LoaderSettingsError, match=r"panel or genes\.genes, not both"):
        LoaderSettings.from_dict({"genes": {"panel": "p", "genes": [1]}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"batch_size": "8"}, "batch_size must be an integer, not '8'"),
        ({"shuffle": "no"}, "shuffle must be true or false, not 'no'"),
        ({"genes": {"niche": "yes"}}, "genes.niche must be true or false, not 'yes'"),
        ({"http": {"timeout_s": "5"}}, "http.timeout_s must be a number, not '5'"),
        ({"views": "patch"}, "views must be a list, not 'patch'"),
        ({"cache": {"max_gb": 0}}, "cache.max_gb must be > 0, not 0.0"),
    ],
)
def test_settings_built_in_python_fail_like_from_dict(data: dict[str, Any], message: str) -> None:
    """One check for both ways in: LoaderSettings(...) is validated exactly like from_dict."""
    from stcorpus.loaders.settings import CacheSettings, GeneSettings, HttpSettings

    nested = {"genes": GeneSettings, "http": HttpSettings, "cache": CacheSettings}
    with pytest.raises(LoaderSettingsError) as from_dict:
        LoaderSettings.from_dict(data)
    ((key, value),) = data.items()
    with pytest.raises(LoaderSettingsError) as direct:
        LoaderSettings(**{key: nested[key](**value) if key in nested else value})
    assert str(from_dict.value) == str(direct.value) == message


def test_unknown_setting_says_did_you_mean() -> None:
    with pytest.raises(LoaderSettingsError, match=r"batchsize \(did you mean 'batch_size'\?\); known: split"):
        LoaderSettings.from_dict({"batchsize": 3})


def test_import_loaders_is_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, loaders, loaders.settings, loaders.plan, loaders.errors; "
        "print(sorted(m for m in ('torch', 'pyarrow', 'datasets', 'simplejpeg', 'requests', 'huggingface_hub') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]", f"import loaders pulled in {out}"


def test_tar_cursor_reads_wanted_rows_and_refuses_going_back(tmp_path: Path) -> None:
    import io
    import tarfile

    from stcorpus.loaders.errors import ShardError
    from stcorpus.loaders.read import TarCursor

    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key in ("a" * 120, "dir/b", "ünï", "d"):  # a long (pax) name, a folder, non-ASCII
            for suffix in ("x.jpg", "json"):
                data = f"{key}.{suffix}".encode()
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = archive.getvalue()
    (tmp_path / "s.tar").write_bytes(data)
    for seekable in (False, True):
        stream = (tmp_path / "s.tar").open("rb") if seekable else io.BytesIO(data)
        cursor = TarCursor(stream, path="s.tar", seekable=seekable)
        got = list(cursor.rows([1, 2]))
        assert [(r, k) for r, k, _ in got] == [(1, "dir/b"), (2, "ünï")]
        assert got[1][2] == {"x.jpg": "ünï.x.jpg".encode(), "json": "ünï.json".encode()}
        with pytest.raises(ShardError, match="behind the cursor"):
            list(cursor.rows([2]))
        assert [k for _, k, _ in cursor.rows([3])] == ["d"]
        with pytest.raises(ShardError, match="sample 4 is missing"):
            list(cursor.rows([4]))
        stream.close()
    cut = TarCursor(io.BytesIO(data[:2000]), path="s.tar", seekable=False)
    with pytest.raises(ShardError, match="truncated"):
        list(cut.rows([3]))
    corrupt = bytearray(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        corrupt[tar.getmembers()[2].offset + 10] ^= 0xFF  # a byte of the name in dir/b.x.jpg's header
    with pytest.raises(ShardError, match="checksum"):
        list(TarCursor(io.BytesIO(bytes(corrupt)), path="s.tar", seekable=False).rows([3]))


def test_tar_header_byte_sum_is_exact_at_the_extremes() -> None:
    from stcorpus.loaders.read import _byte_sum

    rng = np.random.default_rng(0)
    for block in (bytes(512), b"\xff" * 512, rng.integers(0, 256, 512, dtype=np.uint8).tobytes()):
        assert _byte_sum(block) == sum(block)


def test_a_mapped_tar_shard_reads_like_the_file(tmp_path: Path) -> None:
    import io
    import tarfile

    from stcorpus.loaders.errors import ShardError
    from stcorpus.loaders.read import MappedShard, TarCursor, mapped

    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key in ("a", "b", "c"):
            for suffix, size in (("patch.jpg", 700), ("json", 3)):  # 700: padded to 1,024 in the archive
                data = bytes([ord(key)]) * size
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = size
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "s.tar").write_bytes(archive.getvalue())
    assert not isinstance(mapped(io.BytesIO(b"")), MappedShard)  # not a file: read as it is
    with (tmp_path / "s.tar").open("rb") as handle:
        expected = list(TarCursor(handle, path="s.tar", seekable=True).rows([0, 2]))
    stream = mapped((tmp_path / "s.tar").open("rb"))
    assert isinstance(stream, MappedShard)
    cursor = TarCursor(stream, path="s.tar", seekable=True)
    got = list(cursor.rows([0, 2]))
    cursor.close()
    assert [(r, k) for r, k, _ in got] == [(r, k) for r, k, _ in expected] == [(0, "a"), (2, "c")]
    for (_, _, members), (_, _, want) in zip(got, expected, strict=True):
        assert {s: bytes(v) for s, v in members.items()} == want  # views outlive the closed cursor
    (tmp_path / "cut.tar").write_bytes(archive.getvalue()[:1800])
    with pytest.raises(ShardError, match="truncated"):
        list(TarCursor(mapped((tmp_path / "cut.tar").open("rb")), path="cut.tar", seekable=True).rows([2]))


def test_parse_npz_matches_numpy() -> None:
    import io

    from stcorpus.curate.shards import encode_expr
    from stcorpus.loaders.read import parse_npz

    genes = np.array([1, 5, 9], dtype=np.int32)
    blob = encode_expr(genes, np.array([2.5, 1, 3], dtype=np.float32), genes[:0], np.zeros(0, dtype=np.float32))
    fast = parse_npz(blob)
    with np.load(io.BytesIO(blob)) as slow:
        assert set(fast) == set(slow.files)
        for name in slow.files:
            assert fast[name].dtype == slow[name].dtype and np.array_equal(fast[name], slow[name])
    compressed = io.BytesIO()
    np.savez_compressed(compressed, genes=genes)
    assert parse_npz(compressed.getvalue())["genes"].tolist() == [1, 5, 9]  # falls back to np.load
