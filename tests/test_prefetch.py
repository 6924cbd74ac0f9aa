"""Issue 17 item 2: the local executor downloads the next slides' sources while the running ones compute.

Overlap is read off the server: the arrival time of each request (``Request.at``) against the
moment each slide's unit was committed (its ``result.json``).
"""

from __future__ import annotations

import faulthandler
import hashlib
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stcorpus import schema
from stcorpus.curate.build import executors
from stcorpus.curate.build.pipeline import BuildSettings, build
from stcorpus.curate.build.workdir import RESULT_FILE
from stcorpus.curate.cli import main
from stcorpus.curate.errors import SettingsError
from stcorpus.curate.fetch import FetchSettings
from stcorpus.curate.fetch.budget import CacheBudget, Need
from stcorpus.curate.fetch.cache import Cache
from tests.build_fixtures import IMAGE, hest_entry, manifest, variant_h5ad
from tests.httpserver import Fault, LocalServer, serve
from tests.test_fetch_budget import _Peak
from tests.test_fetch_http import settings

N_SLIDES = 3
#: Body bytes per second per connection: a slide's ~0.75 MB counts take about 0.6 s, its image 0.2 s.
RATE = 1.2e6


@pytest.fixture(autouse=True)
def _no_hang() -> Iterator[None]:
    """A deadlock ends the session with a Timeout (every thread's stack on stderr) instead of hanging it."""
    faulthandler.dump_traceback_later(60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def www(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three distinct real slides: one counts file each, one shared H&E image."""
    folder = tmp_path_factory.mktemp("www")
    for i in range(N_SLIDES):
        variant_h5ad(folder, f"st{i}", drop=i)
    shutil.copyfile(IMAGE, folder / "img.jpg")
    return folder


def _manifest(tmp_path: Path, server: LocalServer) -> Path:
    entries = [
        hest_entry(f"PF-{i}", st=server.file_url(f"st{i}.h5ad"), wsi=server.file_url("img.jpg"), patient=f"P{i}")
        for i in range(N_SLIDES)
    ]
    return manifest(tmp_path / "manifests", entries, name="prefetch")


@dataclass
class _Run:
    server: LocalServer
    out: Path
    wall: float
    built: int


def _build(tmp_path: Path, www: Path, name: str, *, workers: int = 1, **fetch: Any) -> _Run:
    """Build the three slides over a throttled link into ``tmp_path/name``."""
    with serve(www) as server:
        server.rate = RATE
        path = _manifest(tmp_path / name, server)
        out = tmp_path / name / "out"
        start = time.monotonic()
        summary = build(
            [path],
            out=out,
            settings=BuildSettings(workers=workers, progress=False),
            fetch=settings(tmp_path / name, **({"progress_every": None} | fetch)),
        )
        wall = time.monotonic() - start
    return _Run(server, out, wall, built=summary.slides.get("built", 0))


def _arrived(server: LocalServer, i: int) -> float:
    """When the first GET of slide i's counts reached the server."""
    return server.requests_for(f"/st{i}.h5ad", method="GET")[0].at


def _committed(out: Path, i: int) -> float:
    return (out / ".work" / "units" / f"PF-{i}" / RESULT_FILE).stat().st_mtime


def _corpus_bytes(out: Path) -> dict[str, str]:
    """sha256 of every shard and of slides.parquet."""
    files = [
        out / schema.SLIDES_FILE,
        *sorted((out / schema.WDS_DIR).rglob("*")),
        *(out / schema.PARQUET_DIR).rglob("*"),
    ]
    return {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def test_the_next_slide_downloads_while_the_current_one_computes(tmp_path: Path, www: Path) -> None:
    on = _build(tmp_path, www, "on", prefetch=1)
    off = _build(tmp_path, www, "off", prefetch=0)
    assert on.built == off.built == N_SLIDES
    for i in range(N_SLIDES - 1):
        # With prefetch, slide i+1's counts are on their way before slide i's unit is done ...
        assert _arrived(on.server, i + 1) < _committed(on.out, i)
        # ... without it, only once slide i's unit has been committed.
        assert _arrived(off.server, i + 1) > _committed(off.out, i)
    # Each file came once: the units found the prefetched ones cached.
    assert all(on.server.count(f"/st{i}.h5ad", method="GET") == 1 for i in range(N_SLIDES))
    assert _corpus_bytes(on.out) == _corpus_bytes(off.out) != {}
    print(f"wall: prefetch 1 {on.wall:.2f} s, prefetch 0 {off.wall:.2f} s")


def test_under_a_cache_budget_prefetch_stays_within_it_and_never_starves_a_slide(
    tmp_path: Path, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = {p.name: p.stat().st_size for p in www.iterdir()}
    largest = max(sizes[f"st{i}.h5ad"] for i in range(N_SLIDES))
    # Room for one slide's inputs only, and slide 0's unit late to ask for it: a prefetch of slide 1
    # that took the room first would leave that unit waiting forever for bytes (pinned for slide 1)
    # that only its own completion frees.
    tight = largest + sizes["img.jpg"] + 1000
    late_unit = executors.unit_task

    def late(*args: Any) -> Any:
        time.sleep(0.5)
        return late_unit(*args)

    with monkeypatch.context() as patch:
        patch.setattr(executors, "unit_task", late)
        assert _build(tmp_path, www, "tight", prefetch=2, cache_budget=tight).built == N_SLIDES
    # Room for two: slide i+1 comes in while slide i computes, and the budget still holds.
    roomy = 2 * largest + sizes["img.jpg"] + 1000
    cache = Cache(tmp_path / "roomy" / "cache")
    with _Peak(cache) as peak:
        run = _build(tmp_path, www, "roomy", prefetch=2, cache_budget=roomy)
    assert run.built == N_SLIDES
    assert 0 < peak.most <= roomy
    assert _arrived(run.server, 1) < _committed(run.out, 0)
    assert all(run.server.count(f"/st{i}.h5ad", method="GET") == 1 for i in range(N_SLIDES))


def test_prefetch_and_units_share_the_per_host_cap(tmp_path: Path, www: Path) -> None:
    # Slide 1's prefetch starts with slide 0's unit: two connections at once under the default cap ...
    assert _build(tmp_path, www, "uncapped", prefetch=1).server.max_in_flight >= 2
    # ... and one with --per-host 1, which the prefetch thread and two worker processes hold together.
    run = _build(tmp_path, www, "capped", workers=2, prefetch=1, host_cap=1)
    assert run.built == N_SLIDES and run.server.max_in_flight == 1
    assert all(run.server.count(f"/st{i}.h5ad", method="GET") == 1 for i in range(N_SLIDES))


def test_a_build_holds_one_per_host_cap_across_all_workers_by_default(tmp_path: Path) -> None:
    """No --per-host: two workers and ten prefetch threads, each with its own in-process limit, would
    open eleven connections to the one host; the build's default cap holds them to DEFAULT_HOST_CAP."""
    from stcorpus.curate.fetch.settings import DEFAULT_HOST_CAP
    from stcorpus.curate.manifest import load_manifest

    slides, ahead = 12, 10
    www = tmp_path / "www"
    www.mkdir()
    for i in range(slides):
        variant_h5ad(www, f"st{i}", drop=i)  # drop i and i+7 differ by spot i: twelve distinct slides
    shutil.copyfile(IMAGE, www / "img.jpg")

    def write_manifest(folder: Path, server: LocalServer) -> Path:
        entries = [
            hest_entry(f"HC-{i}", st=server.file_url(f"st{i}.h5ad"), wsi=server.file_url("img.jpg"), patient=f"P{i}")
            for i in range(slides)
        ]
        return manifest(folder, entries, name="hostcap")

    # Without the shared cap the same downloads do overlap past it (the prefetch threads alone) ...
    with serve(www) as server:
        server.rate = RATE
        samples = load_manifest(write_manifest(tmp_path / "uncapped", server)).samples
        fetch = settings(tmp_path / "uncapped", prefetch=ahead, host_cap=None, progress_every=None)
        prefetcher = executors.Prefetcher(samples, fetch=fetch, running=2)
        deadline = time.monotonic() + 30
        while len(prefetcher.prefetched) < ahead and time.monotonic() < deadline:
            time.sleep(0.05)
        prefetcher.close()
        assert len(prefetcher.prefetched) == ahead
        assert server.max_in_flight > DEFAULT_HOST_CAP
    # ... and `curate build --workers 2 --prefetch 10`, no --per-host, never has more at once.
    with serve(www) as server:
        server.rate = RATE
        path = write_manifest(tmp_path / "capped", server)
        out, cache = tmp_path / "capped" / "out", tmp_path / "capped" / "cache"
        args = ["build", str(path), "--out", str(out), "--cache", str(cache), "--workers", "2", "--no-progress"]
        assert main([*args, "--prefetch", str(ahead)]) == 0
    assert 2 <= server.max_in_flight <= DEFAULT_HOST_CAP, server.max_in_flight
    assert all(server.count(f"/st{i}.h5ad", method="GET") == 1 for i in range(slides))
    assert len(list((cache / "locks").glob("host-*.lock"))) == DEFAULT_HOST_CAP  # the cap's slots, in the cache


def test_the_per_host_flag_is_the_caps_size_and_named_in_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    from stcorpus.curate.fetch.settings import DEFAULT_HOST_CAP

    with pytest.raises(SystemExit):
        main(["build", "--help"])
    assert f"(default {DEFAULT_HOST_CAP};" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("budget", [None, "roomy"])
def test_a_failed_prefetch_leaves_the_slide_to_its_unit(tmp_path: Path, www: Path, budget: str | None) -> None:
    sizes = {p.name: p.stat().st_size for p in www.iterdir()}
    limit = None if budget is None else 2 * max(sizes.values()) + sizes["img.jpg"] + 1000
    with serve(www) as server:
        server.rate = RATE
        server.add_fault("/st1.h5ad", Fault(status=404, times=None, methods=("GET", "HEAD")))
        path = _manifest(tmp_path, server)
        out = tmp_path / "out"
        summary = build(
            [path],
            out=out,
            settings=BuildSettings(workers=1, progress=False),
            fetch=settings(tmp_path, prefetch=1, cache_budget=limit),
        )
    assert summary.slides.get("built") == 2 and summary.slides.get("failed") == 1
    record = (out / ".work" / "units" / "PF-1" / RESULT_FILE).read_text()
    assert '"status": "failed"' in record and "fetch: " in record and "404" in record
    # Prefetched, then fetched again by its unit: two tries at slide 1's counts (HEAD first under a budget).
    assert server.count("/st1.h5ad") >= 2
    if budget is not None:
        # Under a budget the first failed prefetch ends prefetching: slide 2 waits for its own unit.
        assert _arrived(server, 2) > (out / ".work" / "units" / "PF-1" / RESULT_FILE).stat().st_mtime


def test_a_reservation_leaves_room_for_what_earlier_slides_still_need(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    budget = CacheBudget(cache, 100_000, poll=0.01)
    earlier = [Need("http://h/running", 80_000)]
    got_in = threading.Event()

    def ahead() -> None:
        with budget.reserve("B (prefetch)", [Need("http://h/next", 50_000)], what="slide B", spare=lambda: earlier):
            got_in.set()

    thread = threading.Thread(target=ahead)
    thread.start()
    assert not got_in.wait(0.3)  # 80 kB still to come for a running slide + 50 kB > 100 kB
    earlier.clear()  # that slide is done
    assert got_in.wait(5)
    thread.join(timeout=5)


def test_prefetch_settings_are_whole_numbers_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(SettingsError, match="--prefetch"):
            FetchSettings(cache_dir=tmp_path / "c", prefetch=bad)  # type: ignore[arg-type]
    assert FetchSettings(cache_dir=tmp_path / "c").prefetch == 2
    for bad_text in ("-1", "1.5", "two"):
        with pytest.raises(SystemExit):
            main(["build", "m.yaml", "--out", str(tmp_path / "o"), "--prefetch", bad_text])
        assert "--prefetch" in capsys.readouterr().err


def test_closing_ends_a_prefetch_waiting_for_room_and_leaves_no_reservation(tmp_path: Path, www: Path) -> None:
    from stcorpus.curate.manifest import load_manifest

    sizes = {p.name: p.stat().st_size for p in www.iterdir()}
    with serve(www) as server:
        samples = load_manifest(_manifest(tmp_path, server)).samples
        # Room for slide 0 (which nobody downloads here) and not for slide 1 beside it: slide 1 waits.
        fetch = settings(tmp_path, cache_budget=sizes["st0.h5ad"] + sizes["img.jpg"] + 1000, progress_every=None)
        ahead = executors.Prefetcher(samples, fetch=fetch, running=1)
        time.sleep(0.5)
        start = time.monotonic()
        ahead.close()
        assert time.monotonic() - start < 2
        for thread in ahead._threads:  # it ends at its next look at the ledger (at most a poll away)
            thread.join(timeout=3)
            assert not thread.is_alive()
    assert ahead.prefetched == [] and not list((tmp_path / "cache" / "budget").glob("*.json"))
    assert server.count("/st1.h5ad", method="GET") == 0


def test_a_range_read_tiffs_tiles_are_prefetched_before_its_unit_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pinned remote TIFF is read by byte range: its prefetch downloads the tiles the unit will cut
    (not only the header), so slide 1's range requests are all made while slide 0 computes, and the
    corpus is the one a build without prefetch gives."""
    from tests.test_fetch_ranges import sha256, write_slide

    www = tmp_path / "www"
    www.mkdir()
    for i in range(2):
        variant_h5ad(www, f"st{i}", drop=i)
        write_slide(www / f"wsi{i}.tif", "jpeg")

    def run(name: str, ahead: int) -> tuple[LocalServer, Path]:
        with serve(www) as server:
            entries = []
            for i in range(2):
                entry = hest_entry(f"RR-{i}", st=server.file_url(f"st{i}.h5ad"), wsi=Path("WSI"), patient=f"P{i}")
                wsi = f"{{url: '{server.file_url(f'wsi{i}.tif')}', sha256: {sha256(www / f'wsi{i}.tif')}}}"
                entries.append(entry.replace("wsi: 'WSI'", f"wsi: {wsi}"))
            out = tmp_path / name / "out"
            build(
                [manifest(tmp_path / name / "m", entries, name="ranged")],
                out=out,
                settings=BuildSettings(workers=1, progress=False),
                fetch=settings(tmp_path / name, progress_every=None, prefetch=ahead),
            )
        return server, out

    unit_task = executors.unit_task

    def slow_first(sample: Any, *args: Any) -> Any:
        if sample.id == "RR-0":
            time.sleep(2.0)  # slide 0 "computes" long enough for slide 1's whole prefetch
        return unit_task(sample, *args)

    monkeypatch.setattr(executors, "unit_task", slow_first)
    on, on_out = run("on", 1)
    off, off_out = run("off", 0)
    ranged = [r for r in on.requests_for("/wsi1.tif", method="GET") if "range" in r.headers]
    assert len(ranged) > 2  # header/IFD reads and the coalesced tile ranges

    def committed(out: Path) -> float:
        return (out / ".work" / "units" / "RR-0" / RESULT_FILE).stat().st_mtime

    slide0_done = committed(on_out)
    late = [(r.headers["range"], round(r.at - slide0_done, 3)) for r in ranged if r.at >= slide0_done]
    assert late == [], (len(ranged), late)
    # without prefetch the tiles are read by the unit, after slide 0 is done
    tiles_off = [r for r in off.requests_for("/wsi1.tif", method="GET") if "range" in r.headers]
    assert tiles_off and max(r.at for r in tiles_off) > committed(off_out)
    # the unit found its tiles in the partial copy: no range fetched twice, and the same corpus
    spans = [r.headers["range"] for r in ranged]
    assert len(spans) == len(set(spans))
    assert _corpus_bytes(on_out) == _corpus_bytes(off_out) != {}
