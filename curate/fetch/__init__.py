"""The fetch layer: manifest sources -> verified local paths in a content-addressed cache.

>>> from stcorpus.curate.fetch import Fetcher, FetchSettings
>>> with Fetcher(FetchSettings(per_host=2)) as fetcher:  # doctest: +SKIP
...     files = fetcher.fetch_sample(sample)  # {"matrix": Path, "spatial": Path (unpacked folder)}

- ``https://`` / ``http://``: streamed, resumed with Range, retried with backoff, verified;
- ``hf://datasets/<org>/<name>[@<rev>]/<path>``: through the Hub (``HF_ENDPOINT``, the token
  of ``hf auth login`` / ``HF_TOKEN``), checked against the Hub's announced sha256;
- local paths and ``file://``: used in place when the manifest allows them, hashed;
- mirrors (``--mirror PREFIX=PATH``, the manifest's ``mirrors``) and files huggingface_hub's cache
  already holds: used in place, verified by the manifest's or lock file's sha256;
- archives (``.tar.gz``/``.tgz``/``.tar``/``.zip``, or ``unpack: true``) unpacked safely, once.

Modules: ``settings`` (``FetchSettings``), ``fetcher`` (``Fetcher``, ``Fetched``), ``http``
(downloads into the cache, on the shared client of ``stcorpus.http``), ``hub`` (hf:// source
URLs; resolution in ``stcorpus.hub``), ``archive`` (safe unpacking), ``cache`` (layout, atomic
writes), ``local`` (local paths, tree digests), ``lockfile`` (``<manifest>.lock.json``),
``evict`` (content-keyed pins; a build releases inputs once a slide's unit is committed),
``budget`` (``--cache-budget``), ``hostcap`` (``--per-host`` across workers), ``progress``,
``ranges`` (partial copies of remote TIFFs, read by byte range as a build decodes them);
cross-process locks are ``stcorpus.locking``, shared with the loader's shard cache.
"""

from stcorpus.curate.fetch.fetcher import Fetched, Fetcher
from stcorpus.curate.fetch.lockfile import LockEntry, default_lock_path, read_lock, write_lock
from stcorpus.curate.fetch.settings import FetchSettings, default_cache_dir

__all__ = [
    "FetchSettings",
    "Fetched",
    "Fetcher",
    "LockEntry",
    "default_cache_dir",
    "default_lock_path",
    "read_lock",
    "write_lock",
]
