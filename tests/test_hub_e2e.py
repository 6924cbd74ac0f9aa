"""End to end from the Hub: real fixture slides laid out as HEST-1k and STimage-1K4M publish them,
served by a local Hub stand-in (``HF_ENDPOINT``), built by ``curate build`` from subsets of the
real manifests; slides that reach the build through both sources are built once.

One build (module scope) serves every test here. The slides, all cut from the real squidpy crop
of 10x V1_Adult_Mouse_Brain (HEST's TENX52, 0.7267 um/px):

- HEST ``TENX52``: the whole crop, genes named by symbol with Ensembl ids in ``var['gene_ids']``
  (HEST's h5ad of a Space Ranger sample);
- HEST ``TENX18`` (same scanner scale, 0.72674): another subset of the spots, symbols only;
- STimage ``Mouse_Brain_10X_01062023_Visium``: TENX52's data in STimage's CSV layout;
- STimage ``Mouse_Brain_10X_03292022_Visium``: TENX18's data in STimage's CSV layout;
- STimage ``Mouse_Brain_10X_05252023_Visium``: a third subset, a slide of its own.

Which STimage slides really are TENX52/TENX18 does not matter here: the stand-in serves the
copies under those manifest entries' paths, which makes them cross-source copies.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from stcorpus import schema
from stcorpus.curate.cli import main
from tests.httpserver import HubRepo, Request, serve
from tests.hub_standin import (
    HEST_REPO,
    STIMAGE_REPO,
    FixtureSlide,
    manifest_subset,
    real_slide,
    write_hest_sample,
    write_stimage_sample,
)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_TESTe2eTokenNeverPrinted0123456789"
HEST_COMMIT = "c0ffee" + "0" * 34
COPY_OF_TENX52 = "Mouse_Brain_10X_01062023_Visium"
COPY_OF_TENX18 = "Mouse_Brain_10X_03292022_Visium"
STIMAGE_OWN = "Mouse_Brain_10X_05252023_Visium"
STIMAGE_IDS = {COPY_OF_TENX52, COPY_OF_TENX18, STIMAGE_OWN}


@dataclass
class Built:
    """The build and what the stand-in saw."""

    out: Path
    hest: Path
    stimage: Path
    requests: list[Request]
    printed: str
    slides: dict[str, dict[str, Any]]
    tenx52: FixtureSlide


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    import huggingface_hub.constants

    tmp = tmp_path_factory.mktemp("hub-e2e")
    hest, stimage = tmp / "hub" / "hest", tmp / "hub" / "stimage"
    tenx52, tenx18 = real_slide(), real_slide(drop=0, ensembl_ids=False)
    write_hest_sample(hest, "TENX52", tenx52)
    write_hest_sample(hest, "TENX18", tenx18)
    write_stimage_sample(stimage, "Visium", COPY_OF_TENX52, tenx52)
    write_stimage_sample(stimage, "Visium", COPY_OF_TENX18, tenx18)
    write_stimage_sample(stimage, "Visium", STIMAGE_OWN, real_slide(drop=3, ensembl_ids=False))
    hest_manifest = manifest_subset(ROOT / "manifests" / "hest1k.yaml", {"TENX52", "TENX18"}, tmp / "m" / "hest1k.yaml")
    stimage_manifest = manifest_subset(ROOT / "manifests" / "stimage1k4m.yaml", STIMAGE_IDS, tmp / "m" / "stimage.yaml")
    out = tmp / "corpus"
    with pytest.MonkeyPatch.context() as patch, serve(tmp / "www") as server:
        # No real token or cache of this machine: the test's token in HF_TOKEN, the cache in tmp.
        patch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp / "no-token"))
        patch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
        patch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        patch.setenv("HF_TOKEN", TOKEN)
        patch.setenv("STCORPUS_CACHE", str(tmp / "cache"))
        # HEST-1k is gated and its files live in LFS/Xet behind a CDN; STimage's in git (no X-Linked-Etag).
        server.add_repo(HEST_REPO, HubRepo(folder=hest, commit=HEST_COMMIT, token=TOKEN))
        server.add_repo(STIMAGE_REPO, HubRepo(folder=stimage, lfs=False))
        patch.setenv("HF_ENDPOINT", server.url)  # read by the fetch layer at call time
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            manifests = [str(hest_manifest), str(stimage_manifest)]
            code = main(["build", *manifests, "--out", str(out), "--no-progress", "--holdout", "none"])
        assert code == 0, printed.getvalue()
        requests = list(server.requests)
    slides = {row["slide_id"]: row for row in pq.read_table(out / schema.SLIDES_FILE).to_pylist()}
    yield Built(out, hest, stimage, requests, printed.getvalue(), slides, tenx52)


def test_every_source_is_fetched_through_the_hub_routes(built: Built) -> None:
    # HEST: every file resolved on the Hub's origin with the token; LFS bytes from the CDN without it,
    # each distinct content once (TENX18's image is TENX52's: the content-addressed cache has it).
    hest_files = [p for p in built.hest.rglob("*") if p.is_file()]
    for file in hest_files:
        path = f"/datasets/{HEST_REPO}/resolve/main/{file.relative_to(built.hest).as_posix()}"
        heads = [r for r in built.requests if r.path == path and r.method == "HEAD"]
        assert heads and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in heads)
    cdn = [r for r in built.requests if r.path.startswith("/cdn/")]
    assert {r.path.removeprefix("/cdn/") for r in cdn} == {
        hashlib.sha256(p.read_bytes()).hexdigest() for p in hest_files
    }
    assert not any("authorization" in r.headers for r in cdn)
    whole = [r for r in cdn if "range" not in r.headers]  # each distinct content downloaded whole at most once
    assert len(whole) == len({r.path for r in whole})
    # the pyramidal TIFFs (digest known from the Hub) are read by byte range: only what the tiles need
    tiffs = {hashlib.sha256(p.read_bytes()).hexdigest() for p in hest_files if p.suffix.lower() in (".tif", ".tiff")}
    assert {r.path.removeprefix("/cdn/") for r in cdn if "range" in r.headers} <= tiffs
    # STimage: git-stored files, fetched at the commit the HEAD reported.
    for file in built.stimage.rglob("*"):
        if file.is_file():
            relative = file.relative_to(built.stimage).as_posix()
            assert any(r.method == "HEAD" and r.path.endswith(f"/resolve/main/{relative}") for r in built.requests)
    assert TOKEN not in built.printed

    # Provenance: every source by its hf:// URL, with the sha256 of the bytes the stand-in served.
    corpus = json.loads((built.out / schema.CORPUS_FILE).read_text())
    sources = {(s["slide_id"], s["url"]): s["sha256"] for s in corpus["sources"]}
    assert len(sources) == 2 * 3 + 3 * 3
    tif = hashlib.sha256((built.hest / "wsis" / "TENX52.tif").read_bytes()).hexdigest()
    assert sources[("TENX52", f"hf://datasets/{HEST_REPO}/wsis/TENX52.tif")] == tif
    csv = (built.stimage / "Visium" / "gene_exp" / f"{STIMAGE_OWN}_count.csv").read_bytes()
    url = f"hf://datasets/{STIMAGE_REPO}/Visium/gene_exp/{STIMAGE_OWN}_count.csv"
    assert sources[(STIMAGE_OWN, url)] == hashlib.sha256(csv).hexdigest()


def test_both_layouts_are_read_at_the_right_scale(built: Built) -> None:
    slides = built.slides
    assert slides["TENX52"]["source"] == "hest" and slides[STIMAGE_OWN]["source"] == "stimage"
    assert slides["TENX52"]["mpp_source"] == "manifest" and slides["TENX52"]["mpp"] == pytest.approx(0.726744, abs=1e-6)
    assert slides[STIMAGE_OWN]["mpp_source"] == "spot_radius"  # 55 um / (2 r), r from the coord CSV
    assert slides[STIMAGE_OWN]["mpp"] == pytest.approx(0.7267, abs=1e-4)
    assert slides["TENX52"]["n_spots_written"] == len(built.tenx52.barcodes) == 49
    assert slides[STIMAGE_OWN]["status"] == "built" and slides[STIMAGE_OWN]["n_spots_written"] == 42


def test_a_copy_under_both_layouts_is_built_once_and_kept_from_hest(built: Built) -> None:
    slides = built.slides
    # Kept from HEST by SOURCE_PREFERENCE (hest before stimage), although the STimage id sorts first.
    assert COPY_OF_TENX18 < "TENX18"
    assert slides["TENX18"]["status"] == "built"
    assert slides[COPY_OF_TENX18]["status"] == "duplicate"
    assert slides[COPY_OF_TENX18]["duplicate_of"] == "TENX18" and slides[COPY_OF_TENX18]["n_spots_written"] == 0
    assert slides[COPY_OF_TENX18]["reason"].startswith("duplicate")

    shards = pq.read_table(built.out / schema.SHARDS_FILE).to_pylist()
    in_shards = {s for row in shards for s in row["slide_ids"]}
    assert COPY_OF_TENX18 not in in_shards and {"TENX18", "TENX52", STIMAGE_OWN} <= in_shards
    written = sum(row["n_samples"] for row in shards if row["format"] == "parquet")
    assert written == sum(row["n_spots_written"] for row in slides.values())
    keys = pq.read_table(built.out / schema.PARQUET_DIR, columns=[schema.KEY_COLUMN]).column(0).to_pylist()
    assert len(keys) == written and not [k for k in keys if k.startswith(f"{COPY_OF_TENX18}__")]
    card = (built.out / schema.CARD_FILE).read_text()
    assert COPY_OF_TENX18 in card.split("## Slides not included", 1)[1]


def test_a_copy_named_by_ensembl_id_in_hest_and_by_symbol_in_stimage_is_built_once(built: Built) -> None:
    assert built.slides[COPY_OF_TENX52]["status"] == "duplicate"
    assert built.slides[COPY_OF_TENX52]["duplicate_of"] == "TENX52"
