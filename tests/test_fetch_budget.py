"""Issue 17 items 1-4: the cache budget (--cache-budget), the per-host cap across workers, download progress."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path

import pytest

from stcorpus.curate.build.pipeline import BuildSettings, build
from stcorpus.curate.cli import main
from stcorpus.curate.errors import BudgetExceededError, SettingsError
from stcorpus.curate.fetch import Fetcher
from stcorpus.curate.fetch.budget import CacheBudget, Need, disk_bytes, parse_size
from stcorpus.curate.fetch.cache import Cache, url_key
from stcorpus.curate.fetch.evict import pin, reclaim
from stcorpus.curate.fetch.hostcap import SharedHostLimit
from stcorpus.curate.fetch.progress import DownloadProgress
from stcorpus.http import PerHostLimit
from tests.httpserver import serve
from tests.test_build_scale import _http_manifest, _served_slides
from tests.test_fetch_http import make_sample, settings


def test_sizes_are_read_with_binary_units() -> None:
    assert parse_size("200G") == 200 << 30 and parse_size("500M") == 500 << 20 and parse_size("1.5k") == 1536
    assert parse_size("2GiB") == parse_size("2GB") == 2 << 30 and parse_size("123") == 123
    with pytest.raises(SettingsError, match=r"e\.g\. 200G"):
        parse_size("lots")


def test_a_reservation_waits_for_room_and_never_fails(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    budget = CacheBudget(cache, 100_000, poll=0.01)
    order: list[str] = []
    first_in = threading.Event()

    def second() -> None:
        first_in.wait()
        with budget.reserve("B", [Need("http://h/b", 50_000)], what="slide B"):
            order.append("B in")

    thread = threading.Thread(target=second)
    thread.start()
    with budget.reserve("A", [Need("http://h/a", 80_000)], what="slide A"):
        first_in.set()
        time.sleep(0.3)
        order.append("A out")  # B could not get in while A's 80 kB were on their way
    thread.join(timeout=10)
    assert order == ["A out", "B in"] and not list((cache.root / "budget").glob("*.json"))


def test_bytes_already_downloaded_count_once(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    partial = cache.partial_path("http://h/a")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 30_000)  # A's download is 30 kB along
    budget = CacheBudget(cache, 100_000)
    with budget.reserve("A", [Need("http://h/a", 80_000)], what="slide A"), cache_lock(budget):
        assert disk_bytes(cache) + budget.outstanding() == 80_000


def cache_lock(budget: CacheBudget):  # the ledger's lock, as the budget takes it
    return budget._lock()


def test_inputs_larger_than_the_budget_are_an_error_naming_the_flag(tmp_path: Path) -> None:
    budget = CacheBudget(Cache(tmp_path / "cache"), 1 << 20)
    with pytest.raises(BudgetExceededError) as info, budget.reserve("A", [Need("http://h/wsi.tif", 3 << 20)], what="A"):
        pass
    message = str(info.value)
    assert "--cache-budget" in message and "http://h/wsi.tif" in message and "3.0 MiB" in message


def test_a_reservation_of_a_dead_process_is_dropped(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    import socket

    dead = {"holder": "X", "host": socket.gethostname(), "pid": _dead_pid(), "needs": [{"url": "u", "size": 90_000}]}
    (cache.root / "budget").mkdir(parents=True)
    (cache.root / "budget" / f"{url_key('X')}.json").write_text(json.dumps(dead))
    with CacheBudget(cache, 100_000).reserve("A", [Need("http://h/a", 50_000)], what="A"):
        pass  # would wait forever if the dead reservation counted


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_unpinned_inputs_are_reclaimed_oldest_first_pinned_ones_never(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    for name in ("old", "new", "pinned"):
        (www / name).write_bytes(os.urandom(20_000))
    with serve(www) as server:
        names = ("old", "new", "pinned")
        samples = {n: make_sample(_dir(tmp_path / "m" / n), {"m": server.file_url(n)}, sample_id=n) for n in names}
        with Fetcher(settings(tmp_path)) as fetcher:
            got = {}
            for name in names:
                sample = samples[name]
                got[name] = fetcher.fetch(sample.sources["m"], sample=sample)
                time.sleep(0.02)
            pin(fetcher.cache, [samples["pinned"]])
            assert reclaim(fetcher.cache, 1) == 20_000  # one blob is enough: the oldest
            assert not fetcher.cache.has_blob(got["old"].sha256) and fetcher.cache.has_blob(got["new"].sha256)
            assert reclaim(fetcher.cache, 10**9) == 20_000
            assert fetcher.cache.has_blob(got["pinned"].sha256)


def test_a_build_stays_within_its_cache_budget(tmp_path: Path) -> None:
    www = _served_slides(tmp_path / "www", 2)
    sizes = {p.name: p.stat().st_size for p in www.iterdir()}
    budget = max(sizes["st0.h5ad"], sizes["st1.h5ad"]) + sizes["img.jpg"] + 1000  # one slide's inputs, not two
    with serve(www) as server:
        path = _http_manifest(tmp_path, server, 2)
        # --keep-sources: without the budget both slides' inputs would stay (st0 + st1 + img > budget);
        # the budget deletes st0, which no slide needs any more, before st1 comes in.
        fetch = settings(tmp_path, cache_budget=budget, keep_sources=True)
        peak = _Peak(Cache(fetch.cache_dir))
        with peak:
            summary = build([path], out=tmp_path / "out", settings=BuildSettings(progress=False), fetch=fetch)
    assert summary.exit_code == 0 and summary.slides.get("built") == 2
    assert sizes["st0.h5ad"] + sizes["st1.h5ad"] + sizes["img.jpg"] > budget >= peak.most > 0
    assert server.count("/img.jpg", method="GET") == 1  # pinned by the second slide: never reclaimed


def test_a_slide_larger_than_the_budget_fails_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    www = _served_slides(tmp_path / "www", 1)
    with serve(www) as server:
        path = _http_manifest(tmp_path, server, 1)
        args = ["build", str(path), "--out", str(tmp_path / "out"), "--no-progress", "--cache", str(tmp_path / "c")]
        code = main([*args, "--cache-budget", "100K"])
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert (
        code == 2 and "no slide could be built" in printed
    )  # the only slide failed and "raise --cache-budget to at least 974.5 KiB" in printed
    assert server.count("/st0.h5ad", method="GET") == 0


def test_release_sources_is_gone_with_what_to_do_instead(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["build", "m.yaml", "--out", "o", "--release-sources"])
    assert "--keep-sources" in capsys.readouterr().err


def test_the_per_host_cap_holds_across_clients(tmp_path: Path) -> None:
    state = {"now": 0, "most": 0}
    guard = threading.Lock()

    def request(limit: SharedHostLimit) -> None:
        for _ in range(3):
            with limit.slot("http://127.0.0.1:9/file"):
                with guard:
                    state["now"] += 1
                    state["most"] = max(state["most"], state["now"])
                time.sleep(0.02)
                with guard:
                    state["now"] -= 1

    # Each client has its own in-process limit of 4, as each build worker does; the cap is shared.
    limits = [SharedHostLimit(PerHostLimit(4), root=tmp_path, cap=2, poll=0.005) for _ in range(5)]
    threads = [threading.Thread(target=request, args=(limit,)) for limit in limits]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert state["most"] == 2


def test_progress_lines_say_bytes_rate_and_eta_at_most_every_interval() -> None:
    out = io.StringIO()
    progress = DownloadProgress("TENX95", total=4 << 20, every=3600.0, stream=out)
    progress(1 << 20)
    assert out.getvalue() == ""  # within the interval: silent
    line = progress.line(progress._start + 2.0)
    assert line == "fetch TENX95: 1.0 MiB of 4.0 MiB (25%), 512.0 KiB/s, ETA 6 s"
    progress.finish()
    assert out.getvalue().startswith("fetch TENX95: 1.0 MiB of 4.0 MiB (25%)")


class _Peak:
    """Samples the cache's bytes on disk in a thread while the block runs."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, disk_bytes(self.cache))
            time.sleep(0.005)

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
