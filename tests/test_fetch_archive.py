"""Archives are unpacked once, safely: nothing is ever written outside the target."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from stcorpus.curate.errors import UnsafeArchiveError
from stcorpus.curate.fetch import Fetcher
from stcorpus.curate.fetch.archive import Limits, unpack_archive
from tests.conftest import HEART
from tests.httpserver import LocalServer, serve
from tests.test_fetch_http import make_sample, settings

LIMITS = Limits(max_bytes=10 << 20, max_members=100, max_ratio=1000.0)


@pytest.fixture
def server(tmp_path: Path):
    with serve(tmp_path / "www") as running:
        yield running


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], *, mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:  # type: ignore[call-overload]
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def entry(name: str, kind: bytes = tarfile.REGTYPE, *, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    return info


def refuse(tmp_path: Path, archive: Path, *fragments: str, limits: Limits = LIMITS) -> None:
    """Unpacking fails naming the archive and the member, and writes nothing outside the target."""
    target = tmp_path / "sandbox" / "target"
    before = {p for p in tmp_path.rglob("*") if "sandbox" not in p.parts}
    with pytest.raises(UnsafeArchiveError) as info:
        unpack_archive(archive, target, limits=limits, display=f"archive {archive.name}")
    message = str(info.value)
    assert f"archive {archive.name}" in message
    for fragment in fragments:
        assert fragment in message
    after = {p for p in tmp_path.rglob("*") if "sandbox" not in p.parts}
    assert after == before, after - before
    assert not (tmp_path / "sandbox" / "evil").exists() and not (tmp_path / "evil").exists()


# --- tar ---------------------------------------------------------------------------------------


def test_tar_with_parent_component_is_refused(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tar.gz", [(entry("ok.txt"), b"fine"), (entry("../evil"), b"pwned")])
    refuse(tmp_path, archive, "'../evil'", "'..'")


def test_tar_with_absolute_path_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "abs_evil"
    archive = make_tar(tmp_path / "b.tar", [(entry(str(outside)), b"pwned")], mode="w")
    refuse(tmp_path, archive, "absolute path")
    assert not outside.exists()


def test_tar_symlink_pointing_outside_is_refused(tmp_path: Path) -> None:
    for name, link in (("l1.tar", "../../evil"), ("l2.tar", "/etc/passwd")):
        archive = make_tar(tmp_path / name, [(entry("spatial/link", tarfile.SYMTYPE, link=link), None)], mode="w")
        refuse(tmp_path, archive, "'spatial/link'")


def test_tar_symlink_then_write_through_it_is_refused(tmp_path: Path) -> None:
    # "a" -> "." passes a lexical check; "esc" -> "a/.." then climbs out of the target for real.
    members = [
        (entry("a", tarfile.SYMTYPE, link="."), None),
        (entry("esc", tarfile.SYMTYPE, link="a/.."), None),
        (entry("esc/evil"), b"pwned"),
    ]
    refuse(tmp_path, make_tar(tmp_path / "c.tar", members, mode="w"), "'esc")
    refuse(tmp_path, make_tar(tmp_path / "d.tar", members[:2], mode="w"), "'esc'", "outside")


def test_tar_hard_links_outside_or_to_nothing_are_refused_inside_ones_copy(tmp_path: Path) -> None:
    refuse(tmp_path, make_tar(tmp_path / "h1.tar", [(entry("x", tarfile.LNKTYPE, link="../evil"), None)]), "'x'")
    refuse(tmp_path, make_tar(tmp_path / "h2.tar", [(entry("x", tarfile.LNKTYPE, link="nothing"), None)]), "'x'")
    good = make_tar(
        tmp_path / "h3.tar", [(entry("a.txt"), b"data"), (entry("b.txt", tarfile.LNKTYPE, link="a.txt"), None)]
    )
    target = tmp_path / "out"
    unpack_archive(good, target, limits=LIMITS)
    assert (target / "b.txt").read_bytes() == b"data" and (target / "b.txt").stat().st_nlink == 1


def test_tar_device_and_fifo_members_are_refused(tmp_path: Path) -> None:
    refuse(tmp_path, make_tar(tmp_path / "dev.tar", [(entry("null", tarfile.CHRTYPE), None)]), "'null'", "device")
    refuse(tmp_path, make_tar(tmp_path / "fifo.tar", [(entry("pipe", tarfile.FIFOTYPE), None)]), "'pipe'", "FIFO")


def test_tar_limits_on_members_declared_bytes_and_ratio(tmp_path: Path) -> None:
    many = make_tar(tmp_path / "many.tar.gz", [(entry(f"f{i}"), b"") for i in range(6)])
    refuse(tmp_path, many, "more than 5 members", limits=Limits(max_bytes=1 << 20, max_members=5, max_ratio=1000))
    big = make_tar(tmp_path / "big.tar.gz", [(entry("a"), b"1" * 600), (entry("b"), b"2" * 600)])
    refuse(tmp_path, big, "'b'", "1000 bytes", limits=Limits(max_bytes=1000, max_members=10, max_ratio=1e9))
    # 8 MiB of zeros compress ~1000x: a bomb by ratio even though 8 MiB is under max_bytes.
    bomb = make_tar(tmp_path / "bomb.tar.gz", [(entry("zeros"), bytes(8 << 20))])
    refuse(
        tmp_path, bomb, "'zeros'", "archive_max_ratio", limits=Limits(max_bytes=1 << 30, max_members=10, max_ratio=50)
    )


def test_tar_good_archive_unpacks_with_normalised_modes(tmp_path: Path) -> None:
    members = [
        (entry("./spatial/", tarfile.DIRTYPE, mode=0o700), None),
        (entry("./spatial/run.sh", mode=0o4777), b"#!/bin/sh\n"),
        (entry("./spatial/data.csv", mode=0o600), b"a,b\n"),
        (entry("./spatial/alias.csv", tarfile.SYMTYPE, link="data.csv"), None),
    ]
    target = tmp_path / "out"
    written = unpack_archive(make_tar(tmp_path / "g.tgz", members), target, limits=LIMITS)
    assert written == len(b"#!/bin/sh\n") + len(b"a,b\n")
    assert (target / "spatial" / "alias.csv").read_bytes() == b"a,b\n"
    assert stat.S_IMODE((target / "spatial" / "run.sh").stat().st_mode) == 0o755  # no setuid kept
    assert stat.S_IMODE((target / "spatial" / "data.csv").stat().st_mode) == 0o644


# --- zip ---------------------------------------------------------------------------------------


def test_zip_with_parent_component_or_absolute_path_is_refused(tmp_path: Path) -> None:
    for name, member in (
        ("z1.zip", "../evil"),
        ("z2.zip", "a/../../evil"),
        ("z3.zip", "/evil"),
        ("z4.zip", "..\\evil"),
    ):
        with zipfile.ZipFile(tmp_path / name, "w") as zf:
            zf.writestr("fine.txt", b"ok")
            zf.writestr(zipfile.ZipInfo(member), b"pwned")
        refuse(tmp_path, tmp_path / name, repr(member))


def test_zip_symlink_outside_is_refused(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as zf:
        info = zipfile.ZipInfo("link")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../../../evil")
    refuse(tmp_path, tmp_path / "s.zip", "'link'", "outside")


def test_zip_that_lies_about_its_sizes_is_refused(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "lie.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(2 << 20))
    raw = bytearray((tmp_path / "lie.zip").read_bytes())
    declared = (2 << 20).to_bytes(4, "little")
    # Rewrite the uncompressed size in the local header and the central directory to 1,000 bytes.
    assert raw.count(declared) == 2
    raw = bytearray(bytes(raw).replace(declared, (1000).to_bytes(4, "little")))
    (tmp_path / "lie.zip").write_bytes(bytes(raw))
    refuse(tmp_path, tmp_path / "lie.zip", "'zeros.bin'")
    assert not any(p.stat().st_size > 1000 for p in (tmp_path / "sandbox").rglob("*") if p.is_file())


def test_zip_declared_size_over_the_limit_is_refused_before_writing(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "big.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.bin", bytes(3000))
    refuse(tmp_path, tmp_path / "big.zip", "'a.bin'", limits=Limits(max_bytes=2000, max_members=10, max_ratio=1e9))


def test_not_an_archive_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.tar.gz").write_bytes(gzip.compress(b"not a tar at all" * 100))
    refuse(tmp_path, tmp_path / "x.tar.gz", "not a tar or zip archive")


# --- through the Fetcher ------------------------------------------------------------------------


def spatial_tarball(path: Path) -> Path:
    """10x's spatial.tar.gz layout, from the real Space Ranger 1.0 files in tests/data."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(HEART / "spatial", arcname="spatial")
    return path


def test_fetched_spatial_tarball_is_unpacked_once_and_byte_identical(tmp_path: Path, server: LocalServer) -> None:
    spatial_tarball(server.root / "spatial.tar.gz")
    sample = make_sample(tmp_path, {"spatial": server.file_url("spatial.tar.gz")})
    with Fetcher(settings(tmp_path)) as fetcher:
        first = fetcher.fetch(sample.sources["spatial"], sample=sample)
        folder = fetcher.fetch_sample(sample)["spatial"]
    assert first.unpacked == folder and folder.is_dir() and first.target == folder
    assert first.sha256 == hashlib.sha256((server.root / "spatial.tar.gz").read_bytes()).hexdigest()
    for original in (HEART / "spatial").iterdir():
        assert (folder / "spatial" / original.name).read_bytes() == original.read_bytes()
    assert server.count("/spatial.tar.gz") == 1
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_unpack_flag_overrides_the_extension_rule(tmp_path: Path, server: LocalServer) -> None:
    with zipfile.ZipFile(server.root / "download", "w") as zf:
        zf.writestr("outs/spatial/scalefactors_json.json", (HEART / "spatial" / "scalefactors_json.json").read_bytes())
    (server.root / "plain.tar.gz").write_bytes(b"kept as a file")
    sample = make_sample(
        tmp_path,
        {
            "outs": {"url": server.file_url("download"), "unpack": True},
            "other": {"url": server.file_url("plain.tar.gz"), "unpack": False},
        },
    )
    with Fetcher(settings(tmp_path)) as fetcher:
        files = fetcher.fetch_sample(sample)
    assert (files["outs"] / "outs" / "spatial" / "scalefactors_json.json").is_file()
    assert files["other"].is_file() and files["other"].read_bytes() == b"kept as a file"


def test_refused_archive_leaves_nothing_in_the_cache(tmp_path: Path, server: LocalServer) -> None:
    make_tar(server.root / "evil.tar.gz", [(entry("spatial/ok.png"), b"png"), (entry("../../evil"), b"x")])
    sample = make_sample(tmp_path, {"spatial": server.file_url("evil.tar.gz")}, sample_id="EVIL-1")
    with Fetcher(settings(tmp_path)) as fetcher, pytest.raises(UnsafeArchiveError) as info:
        fetcher.fetch(sample.sources["spatial"], sample=sample)
    assert "EVIL-1" in str(info.value) and "'../../evil'" in str(info.value)
    assert not (tmp_path / "cache" / "unpacked").exists()
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    assert not (tmp_path / "evil").exists() and not (tmp_path / "cache" / "evil").exists()


def test_truncated_archive_is_refused_as_corrupt(tmp_path: Path) -> None:
    full = make_tar(tmp_path / "full.tar.gz", [(entry("a.bin"), os.urandom(200_000)), (entry("b.bin"), b"b")])
    (tmp_path / "cut.tar.gz").write_bytes(full.read_bytes()[:100_000])
    refuse(tmp_path, tmp_path / "cut.tar.gz", "corrupt or truncated")
