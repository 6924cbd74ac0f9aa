"""``curate fetch MANIFEST...``: download every source into the cache and pin it in a lock file.

Sources are fetched by a pool of threads (``--workers``), at most ``--per-host`` at a time
per host; progress bars count bytes and files; each failure is listed with its reason and
makes the exit code 1. Each manifest gets ``<manifest-stem>.lock.json`` beside it (or
``--lock PATH`` for a single manifest) with the URL, size and sha256 of every source.
"""

from __future__ import annotations

import argparse
import sys


def _ids(text: str) -> list[str]:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise argparse.ArgumentTypeError("expected a comma-separated list of sample ids")
    return ids


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, not {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``curate fetch``."""
    parser.add_argument("manifests", nargs="+", metavar="MANIFEST", help="manifest YAML files")
    parser.add_argument(
        "--cache",
        metavar="DIR",
        help="cache folder (default: $STCORPUS_CACHE, else $XDG_CACHE_HOME/stcorpus or ~/.cache/stcorpus)",
    )
    parser.add_argument(
        "--lock", metavar="PATH", help="lock file to write (one manifest only; default: <manifest-stem>.lock.json)"
    )
    parser.add_argument("--workers", type=_positive, default=4, metavar="N", help="parallel downloads (default 4)")
    parser.add_argument("--per-host", type=_positive, metavar="N", help="parallel requests per host (default 4)")
    parser.add_argument("--retries", type=int, metavar="N", help="retries per file after the first attempt (default 5)")
    parser.add_argument(
        "--allow-local", action="store_true", help="allow local paths and file:// sources in every sample"
    )
    parser.add_argument("--samples", type=_ids, metavar="ID,...", help="fetch only these samples")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Fetch, print failures and a summary, write lock files; 1 if anything failed."""
    import logging
    import threading
    from concurrent.futures import ThreadPoolExecutor, as_completed
    from pathlib import Path
    from typing import Any

    from tqdm import tqdm

    from stcorpus.curate.errors import CurateError, SettingsError
    from stcorpus.curate.fetch import Fetched, Fetcher, FetchSettings, LockEntry, default_lock_path, write_lock
    from stcorpus.curate.manifest import load_manifests

    manifests = load_manifests(args.manifests, allow_local=args.allow_local)
    if args.lock and len(manifests) != 1:
        raise SettingsError("--lock names one lock file: give one manifest (each gets <stem>.lock.json by default)")
    selected = set(args.samples) if args.samples else None
    if selected is not None:
        unknown = sorted(selected - {s.id for m in manifests for s in m.samples})
        if unknown:
            raise SettingsError(f"--samples: no sample {', '.join(map(repr, unknown))} in the manifests given")
    jobs = [
        (manifest, sample, name, source)
        for manifest in manifests
        for sample in manifest.samples
        if selected is None or sample.id in selected
        for name, source in sample.sources.items()
    ]
    # One process: its --per-host is already the cap for all its threads; the cross-process cap of a
    # build (FetchSettings.host_cap) would only cap a --per-host above it and add lock files.
    options: dict[str, Any] = {"allow_local": args.allow_local, "host_cap": None}
    if args.cache:
        options["cache_dir"] = Path(args.cache)
    if args.per_host:
        options["per_host"] = args.per_host
    if args.retries is not None:
        options["retries"] = args.retries
    settings = FetchSettings(**options)

    quiet = bool(getattr(args, "quiet", False))
    disable = True if (args.no_progress or quiet) else None  # None: tqdm shows bars on a terminal only
    files_bar = tqdm(total=len(jobs), unit="file", desc="files", disable=disable, position=0)
    bytes_bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="bytes", disable=disable, position=1)
    counter_lock = threading.Lock()
    downloaded = 0

    def on_bytes(count: int) -> None:
        nonlocal downloaded
        with counter_lock:
            downloaded += count
            bytes_bar.update(count)

    results: dict[int, Fetched] = {}
    failures: list[tuple[int, BaseException]] = []
    log_filter = _RedactQuery()
    urllib3_log = logging.getLogger("urllib3.connectionpool")
    urllib3_log.addFilter(log_filter)
    try:
        with Fetcher(settings, on_bytes=on_bytes) as fetcher, ThreadPoolExecutor(max_workers=args.workers) as pool:
            futures = {
                pool.submit(fetcher.fetch, source, sample=sample, name=name): index
                for index, (_, sample, name, source) in enumerate(jobs)
            }
            for future in as_completed(futures):
                index = futures[future]
                try:
                    results[index] = future.result()
                except (CurateError, OSError) as exc:
                    failures.append((index, exc))
                files_bar.update(1)
    finally:
        urllib3_log.removeFilter(log_filter)
        bytes_bar.close()
        files_bar.close()

    for index, error in sorted(failures, key=lambda item: item[0]):
        _, sample, name, _ = jobs[index]
        reason = str(error) if isinstance(error, CurateError) else f"{sample.describe()}: source {name!r}: {error}"
        print(f"FAILED {sample.id}/{name}: {reason}", file=sys.stderr)

    for manifest in manifests:
        entries = [
            LockEntry.from_fetched(results[i], sample=sample.id, source=name)
            for i, (owner, sample, name, _) in enumerate(jobs)
            if owner is manifest and i in results
        ]
        fetched_samples = {sample.id for owner, sample, _, _ in jobs if owner is manifest}
        lock_path = Path(args.lock) if args.lock else default_lock_path(manifest.path)
        complete = write_lock(lock_path, manifest=manifest, entries=entries, fetched_samples=fetched_samples)
        state = "complete" if complete else "incomplete: some sources have no entry yet"
        print(f"{manifest.path}: lock file {lock_path} ({state})")

    fetched = [r for r in results.values() if not r.cache_hit and not r.local]
    hits = sum(r.cache_hit for r in results.values())
    local = sum(r.local for r in results.values())
    print(
        f"curate fetch: {len(results)} of {len(jobs)} sources ready: {len(fetched)} downloaded "
        f"({_human(downloaded)} transferred), {hits} cache hits, {local} local; {len(failures)} failed"
    )
    return 1 if failures else 0


def _human(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns


class _RedactQuery:
    """A logging filter for urllib3's request lines: signed CDN URLs and ?token= stay out of -vv logs."""

    def filter(self, record: object) -> bool:
        from stcorpus.http import redact_url

        args = getattr(record, "args", None)
        if isinstance(args, tuple):
            record.args = tuple(redact_url(a) if isinstance(a, str) and "?" in a else a for a in args)  # type: ignore[attr-defined]
        return True
