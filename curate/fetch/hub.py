"""``hf://datasets/<org>/<name>[@<revision>]/<path>`` sources: the fetch layer's side of :mod:`stcorpus.hub`.

Resolution (endpoint from ``HF_ENDPOINT`` at call time, resolve URLs, the user's token, the
headers a HEAD answers with) lives in :mod:`stcorpus.hub`, shared with the loader; this module
only turns a malformed source URL into the fetch layer's errors. The GET asks for the commit the
HEAD saw, so the bytes match the digest even if a branch moves (see ``fetcher.py``).
"""

from __future__ import annotations

from stcorpus.curate.errors import FetchError, UnsupportedSchemeError
from stcorpus.errors import HubUrlError
from stcorpus.hub import HubFile, parse_hf

__all__ = ["HubFile", "parse_hf_url"]


def parse_hf_url(url: str) -> HubFile:
    """Split ``hf://datasets/<org>/<name>[@<revision>]/<path>``; a revision may be %-encoded (``refs%2Fpr%2F1``).

    >>> parse_hf_url("hf://datasets/MahmoodLab/hest@v1.1/st/TENX95.h5ad")
    HubFile(repo_id='MahmoodLab/hest', path='st/TENX95.h5ad', revision='v1.1')
    """
    try:
        return parse_hf(url, file=True)
    except HubUrlError as exc:
        raise (UnsupportedSchemeError if exc.unsupported else FetchError)(str(exc)) from None
