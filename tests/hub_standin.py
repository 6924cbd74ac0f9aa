"""Local stand-ins for the Hugging Face Hub, for publish and end-to-end tests.

``HubApiStandIn`` answers the write side of the Hub API that ``huggingface_hub`` 2.4 uses to
publish a folder, on 127.0.0.1, so the real client code runs against it:

- ``GET  /api/datasets/<org>/<name>/tree/<revision>?recursive=...`` the file listing (``oid`` is
  the git blob id; files the Hub would keep in LFS/Xet -- by the default ``.gitattributes``
  patterns or over 10 MB -- carry ``lfs: {oid: <sha256>, size, pointerSize}``), 404 with
  ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` like the Hub;
- ``POST /api/repos/create``, ``POST /api/validate-yaml``, ``POST /api/datasets/.../branch/<name>``;
- ``POST /api/datasets/<org>/<name>/preupload/<revision>``: every file is "regular" (so its
  bytes travel base64 inside the commit; the stand-in has no LFS/Xet storage), with the
  remote blob id as ``oid`` for files it already holds;
- ``POST /api/datasets/<org>/<name>/commit/<revision>``: the NDJSON commit (``file``,
  ``deletedFile``), applied atomically; ``fail_commits`` makes chosen commits answer 500.

and the read side that ``datasets.load_dataset("<org>/<name>")`` and ``HfFileSystem`` use on what
was published there, so a published card's examples run as written (``HF_ENDPOINT``):

- ``GET  /api/datasets/<org>/<name>[/revision/<revision>]``: the repository's info (``sha``,
  ``siblings``, ``cardData``);
- ``POST /api/datasets/<org>/<name>/paths-info/<revision>``: entries of the paths asked for;
- ``HEAD``/``GET /datasets/<org>/<name>/resolve/<revision>/<path>``: the file, with ``Range``
  (206), ``ETag``, ``X-Repo-Commit`` and, for LFS/Xet files, ``X-Linked-Etag``/``X-Linked-Size``.

A revision is a branch or a commit id the stand-in answered a commit with. ``tests.httpserver``
has the resolve-only Hub stand-in used for fetching sources; the helpers below lay real fixture
slides out as HEST-1k and STimage-1K4M publish them, for that server to serve.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from tests.httpserver import serve_in_thread

# --- the write API --------------------------------------------------------------------------

#: Patterns of the Hub's default .gitattributes that matter for a corpus (stored in LFS/Xet).
LFS_PATTERNS = ("*.parquet", "*.tar", "*.png", "*.jpg", "*.npz", "*.h5", "*.h5ad", "*.tif")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = b"".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n".encode() for p in LFS_PATTERNS)

_API = re.compile(
    r"^/api/datasets/(?P<org>[^/]+)/(?P<name>[^/]+)/(?P<verb>tree|preupload|commit|branch|paths-info)/(?P<rest>.+)$"
)
_INFO = re.compile(r"^/api/datasets/(?P<org>[^/]+)/(?P<name>[^/]+)(?:/revision/(?P<rest>[^/]+))?$")
_RESOLVE = re.compile(r"^/datasets/(?P<org>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rest>[^/]+)/(?P<path>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def git_blob_id(data: bytes) -> str:
    """The git blob id of ``data``."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data, usedforsecurity=False).hexdigest()


def is_lfs(path: str, size: int) -> bool:
    """Whether the Hub would keep ``path`` in LFS/Xet storage."""
    name = path.rsplit("/", 1)[-1]
    return size >= LFS_MIN_SIZE or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS)


@dataclass
class StoredRepo:
    """A repository of the stand-in: branch -> path -> bytes, and its commit count."""

    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {".gitattributes": GITATTRIBUTES}})
    commits: list[dict[str, Any]] = field(default_factory=list)  # {"summary", "files", "deleted", "branch"}
    private: bool = False
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})  # branch -> last commit id
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit id -> files

    def files_at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """``(commit id, files)`` of a branch or a commit id, or None."""
        if revision in self.branches:
            return self.heads.get(revision, "0" * 40), self.branches[revision]
        if revision in self.snapshots:
            return revision, self.snapshots[revision]
        return None


@dataclass(frozen=True)
class ApiRequest:
    """One request the stand-in received."""

    method: str
    path: str
    headers: dict[str, str]


class HubApiStandIn:
    """State of the write-API stand-in (see the module docstring)."""

    __test__ = False

    def __init__(self) -> None:
        self.repos: dict[str, StoredRepo] = {}
        self.requests: list[ApiRequest] = []
        #: Commit numbers (1-based, across the server's life) that fail with a 500.
        self.fail_commits: set[int] = set()
        self.commit_attempts = 0
        self.port = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        """The endpoint (for HF_ENDPOINT)."""
        return f"http://127.0.0.1:{self.port}"

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        """What the repository holds on ``branch``."""
        return dict(self.repos[repo_id].branches[branch])

    def commits(self, repo_id: str) -> list[dict[str, Any]]:
        """The repository's commits, in order."""
        return list(self.repos[repo_id].commits)


class _ApiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubApiStandIn

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, status: int, body: Any = None, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _record(self, method: str) -> str:
        path = unquote(urlsplit(self.path).path)
        with self.state.lock:
            self.state.requests.append(ApiRequest(method, path, {k.lower(): v for k, v in self.headers.items()}))
        return path

    def _repo(self, match: re.Match[str]) -> tuple[str, StoredRepo | None]:
        repo_id = f"{match.group('org')}/{match.group('name')}"
        return repo_id, self.state.repos.get(repo_id)

    def do_HEAD(self) -> None:
        path = self._record("HEAD")
        resolve = _RESOLVE.match(path)
        if resolve:
            self._resolve(resolve, body=False)
        else:
            self._send(404, None)

    def _resolve(self, match: re.Match[str], *, body: bool) -> None:
        _, repo = self._repo(match)
        if repo is None:
            self._send(404, None, {"X-Error-Code": "RepoNotFound"})
            return
        found = repo.files_at(unquote(match.group("rest")))
        if found is None:
            self._send(404, None, {"X-Error-Code": "RevisionNotFound"})
            return
        commit, files = found
        name = match.group("path")
        data = files.get(name)
        if data is None:
            self._send(404, None, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
            return
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes", "ETag": f'"{git_blob_id(data)}"'}
        if is_lfs(name, len(data)):
            sha = hashlib.sha256(data).hexdigest()
            headers |= {"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))}
        status, start, end = 200, 0, len(data) - 1
        asked = _RANGE.match((self.headers.get("Range") or "").strip())
        if asked:
            start = int(asked.group(1))
            end = min(int(asked.group(2)), len(data) - 1) if asked.group(2) else len(data) - 1
            if start >= len(data):
                self._send(416, None, {"Content-Range": f"bytes */{len(data)}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        chunk = data[start : end + 1]
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        if body:
            self.wfile.write(chunk)

    def _info(self, match: re.Match[str]) -> None:
        repo_id, repo = self._repo(match)
        if repo is None:
            self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return
        found = repo.files_at(unquote(match.group("rest") or "main"))
        if found is None:
            self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            return
        commit, files = found
        self._send(
            200,
            {
                "_id": hashlib.sha1(repo_id.encode(), usedforsecurity=False).hexdigest()[:24],
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": name} for name in sorted(files)],
            },
        )

    def _paths_info(self, repo: StoredRepo, revision: str, body: bytes) -> None:
        found = repo.files_at(revision)
        if found is None:
            self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            return
        _, files = found
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            asked = list(json.loads(body or b"{}").get("paths", []))
        else:
            asked = parse_qs(body.decode()).get("paths", [])
        entries: list[dict[str, Any]] = []
        for name in asked:
            name = name.strip("/")
            data = files.get(name)
            if data is not None:
                entry: dict[str, Any] = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": name}
                if is_lfs(name, len(data)):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            elif any(f.startswith(name + "/") for f in files) or name == "":
                entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": name})
        self._send(200, entries)

    def do_GET(self) -> None:
        path = self._record("GET")
        resolve = _RESOLVE.match(path)
        if resolve:
            self._resolve(resolve, body=True)
            return
        info = _INFO.match(path)
        if info:
            self._info(info)
            return
        match = _API.match(path)
        if not match or match.group("verb") != "tree":
            self._send(404, {"error": "not found"})
            return
        _, repo = self._repo(match)
        if repo is None:
            self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return
        revision, _, prefix = match.group("rest").partition("/")
        found = repo.files_at(unquote(revision))
        if found is None:
            self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            return
        files = found[1]
        recursive = parse_qs(urlsplit(self.path).query).get("recursive", ["false"])[0].lower() == "true"
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for name, data in sorted(files.items()):
            if prefix and not name.startswith(prefix.rstrip("/") + "/"):
                continue
            relative = name[len(prefix.rstrip("/")) + 1 :] if prefix else name
            if not recursive and "/" in relative:
                folders.add(relative.split("/", 1)[0])
                continue
            parts = name.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
            entry: dict[str, Any] = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": name}
            if is_lfs(name, len(data)):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        self._send(200, entries)

    def do_POST(self) -> None:
        path = self._record("POST")
        body = self._body()
        if path == "/api/validate-yaml":
            self._send(200, {"errors": [], "warnings": []})
            return
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            with self.state.lock:
                if repo_id not in self.state.repos:
                    self.state.repos[repo_id] = StoredRepo(private=payload.get("visibility") == "private")
            self._send(200, {"url": f"{self.state.url}/datasets/{repo_id}", "name": repo_id})
            return
        match = _API.match(path)
        if not match:
            self._send(404, {"error": "not found"})
            return
        repo_id, repo = self._repo(match)
        if repo is None:
            self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return
        verb, revision = match.group("verb"), match.group("rest")
        if verb == "paths-info":
            self._paths_info(repo, unquote(revision), body)
            return
        if verb == "branch":
            with self.state.lock:
                repo.branches.setdefault(revision, dict(repo.branches["main"]))
            self._send(200, {})
            return
        files = repo.branches.get(revision)
        if files is None:
            self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            return
        if verb == "preupload":
            asked = json.loads(body)["files"]
            answer = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_id(files[f["path"]]) if f["path"] in files else None,
                }
                for f in asked
            ]
            self._send(200, {"files": answer})
            return
        self._commit(repo_id, repo, revision, body)

    def _commit(self, repo_id: str, repo: StoredRepo, revision: str, body: bytes) -> None:
        with self.state.lock:
            self.state.commit_attempts += 1
            attempt = self.state.commit_attempts
        if attempt in self.state.fail_commits:
            self._send(500, {"error": "Internal Error - We're working hard to fix this as soon as possible!"})
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        summary = ""
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                summary = value["summary"]
            elif key == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            else:
                self._send(400, {"error": f"the stand-in does not take {key!r} operations"})
                return
        files = repo.branches[revision]
        missing = [p for p in deleted if p not in files]
        if missing:
            error = {"error": f"A file with this name doesn't exist: {missing[0]}"}
            self._send(404, error, {"X-Error-Code": "EntryNotFound"})
            return
        with self.state.lock:
            files.update(added)
            for name in deleted:
                del files[name]
            repo.commits.append({"summary": summary, "files": sorted(added), "deleted": deleted, "branch": revision})
            oid = hashlib.sha1(f"{repo_id}{len(repo.commits)}".encode(), usedforsecurity=False).hexdigest()
            repo.heads[revision] = oid
            repo.snapshots[oid] = dict(files)
        self._send(200, {"commitUrl": f"{self.state.url}/datasets/{repo_id}/commit/{oid}", "commitOid": oid})


@contextmanager
def serve_hub_api() -> Iterator[HubApiStandIn]:
    """Run the write-API stand-in on 127.0.0.1 for the ``with`` block."""
    state = HubApiStandIn()
    handler = type("ApiHandler", (_ApiHandler,), {"state": state})
    with serve_in_thread(handler) as httpd:
        state.port = httpd.server_address[1]
        yield state


# --- HEST-1k and STimage-1K4M layouts from real fixture slides ------------------------------

HEST_REPO = "MahmoodLab/hest"
STIMAGE_REPO = "jiawennnn/STimage-1K4M"


@dataclass(frozen=True)
class FixtureSlide:
    """A real slide (counts, coordinates in full-resolution pixels, H&E pixels) to lay out as a source would."""

    barcodes: list[str]
    genes: list[str]  # symbols
    gene_ids: list[str] | None  # Ensembl ids, where the source gives them
    counts: np.ndarray  # (spots, genes), integer
    x: np.ndarray  # pixels of `image`, column
    y: np.ndarray  # pixels of `image`, row
    image: np.ndarray  # RGB uint8
    mpp: float


def real_slide(*, drop: int | None = None, ensembl_ids: bool = True) -> FixtureSlide:
    """The squidpy crop of 10x V1_Adult_Mouse_Brain (HEST's TENX52) with raw-like integer counts.

    The fixture's ``X`` is log1p-normalised; ``expm1`` rounded gives integer counts with the same
    structure. ``drop`` leaves out spots ``drop, drop + 7, ...``: a different slide's worth of data.
    ``ensembl_ids=False`` names genes by symbol only (as in HEST studies not processed from Space
    Ranger outputs, and in every STimage slide).
    """
    import anndata
    from PIL import Image

    from tests.build_fixtures import H5AD, IMAGE, MPP

    adata = anndata.read_h5ad(H5AD)
    keep = np.ones(adata.n_obs, dtype=bool)
    if drop is not None:
        keep[drop::7] = False
    matrix = adata.X[keep]
    dense = np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix, dtype=np.float64)
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[keep]
    return FixtureSlide(
        barcodes=[str(b) for b in adata.obs_names[keep]],
        genes=[str(g) for g in adata.var_names],
        gene_ids=[str(g) for g in adata.var["gene_ids"]] if ensembl_ids else None,
        counts=np.rint(np.expm1(dense)).astype(np.int32),
        x=xy[:, 0],
        y=xy[:, 1],
        image=np.asarray(Image.open(IMAGE).convert("RGB")),
        mpp=MPP,
    )


def write_hest_sample(repo: Path, sample_id: str, slide: FixtureSlide) -> None:
    """``st/<id>.h5ad``, ``wsis/<id>.tif`` (pyramidal JPEG TIFF) and ``metadata/<id>.json`` as HEST-1k has them."""
    import anndata
    import pandas as pd  # type: ignore[import-untyped]
    import scipy.sparse as sp

    from tests.test_readers_support import write_pyramid

    for folder in ("st", "wsis", "metadata"):
        (repo / folder).mkdir(parents=True, exist_ok=True)
    obs = pd.DataFrame(
        {
            "in_tissue": np.ones(len(slide.barcodes), dtype=np.int64),
            "pxl_col_in_fullres": slide.x,
            "pxl_row_in_fullres": slide.y,
        },
        index=pd.Index(slide.barcodes),
    )
    var = pd.DataFrame({"gene_ids": slide.gene_ids} if slide.gene_ids is not None else {}, index=pd.Index(slide.genes))
    # HEST stores raw counts as float32 in a CSR matrix, and the spot centres in obsm['spatial'] as (x, y).
    adata = anndata.AnnData(X=sp.csr_matrix(slide.counts.astype(np.float32)), obs=obs, var=var)
    adata.obsm["spatial"] = np.stack([slide.x, slide.y], axis=1)
    adata.write_h5ad(repo / "st" / f"{sample_id}.h5ad")
    # HEST's TIFF resolution tags are off by 10x (the reader must not trust them): write them that way.
    write_pyramid(repo / "wsis" / f"{sample_id}.tif", slide.image, resolution_um=slide.mpp / 10)
    height, width = slide.image.shape[:2]
    metadata = {
        "dataset_title": "Mouse Brain Section (Coronal)",
        "id": sample_id,
        "st_technology": "Visium",
        "species": "Mus musculus",
        "organ": "Brain",
        "pixel_size_um_embedded": slide.mpp / 10,
        "pixel_size_um_estimated": slide.mpp,
        "inter_spot_dist": 100.0,
        "spot_diameter": 55.0,
        "fullres_px_width": width,
        "fullres_px_height": height,
        "spots_under_tissue": len(slide.barcodes),
        "magnification": "10x",
    }
    (repo / "metadata" / f"{sample_id}.json").write_text(json.dumps(metadata, indent=1))


def write_stimage_sample(repo: Path, tech: str, slide_name: str, slide: FixtureSlide) -> None:
    """``<tech>/gene_exp/<slide>_count.csv``, ``<tech>/coord/<slide>_coord.csv``, ``<tech>/image/<slide>.png``.

    As STimage-1K4M publishes them: spot ids ``<slide>_<barcode>`` as an unnamed index column,
    gene symbols as count columns, coordinates ``,yaxis,xaxis,r`` in pixels of the PNG, with
    ``r`` the spot radius in pixels (55 um spots for Visium).
    """
    from PIL import Image

    for folder in ("gene_exp", "coord", "image"):
        (repo / tech / folder).mkdir(parents=True, exist_ok=True)
    with (repo / tech / "gene_exp" / f"{slide_name}_count.csv").open("w") as handle:
        handle.write("," + ",".join(slide.genes) + "\n")
        for barcode, row in zip(slide.barcodes, slide.counts, strict=True):
            handle.write(f"{slide_name}_{barcode}," + ",".join(str(int(v)) for v in row) + "\n")
    radius = 55.0 / (2 * slide.mpp)
    with (repo / tech / "coord" / f"{slide_name}_coord.csv").open("w") as handle:
        handle.write(",yaxis,xaxis,r\n")
        for barcode, x, y in zip(slide.barcodes, slide.x, slide.y, strict=True):
            handle.write(f"{slide_name}_{barcode},{y},{x},{radius}\n")
    Image.fromarray(slide.image).save(repo / tech / "image" / f"{slide_name}.png")


def manifest_subset(manifest: Path, ids: set[str], out: Path) -> Path:
    """The real manifest ``manifest`` cut down to the samples ``ids`` (same header, defaults and entries)."""
    import yaml

    document = yaml.safe_load(manifest.read_text())
    studies = []
    for study in document["studies"]:
        samples = [s for s in study["samples"] if s["id"] in ids]
        if samples:
            studies.append({**study, "samples": samples})
    found = {s["id"] for study in studies for s in study["samples"]}
    if found != ids:
        raise KeyError(f"not in {manifest.name}: {sorted(ids - found)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump({**document, "studies": studies}, sort_keys=False))
    return out
