"""What ``pip install .`` installs: one top-level package, ``stcorpus``, with its data files."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_stcorpus_as_the_only_top_level_package(tmp_path: Path) -> None:
    # The wheel pip builds for `pip install .` (no network: the build backend is already here).
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*command, str(ROOT), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("stcorpus-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"stcorpus"}
    top_level = next(name for name in names if name.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["stcorpus"]
    for expected in (
        "stcorpus/curate/cli.py",
        "stcorpus/loaders/dataset.py",
        "stcorpus/training/pretrain.py",
        "stcorpus/curate/genes/data/human.tsv.gz",
        "stcorpus/training/configs/corpus-cpu.yaml",
        "stcorpus/curate/build/slurm-example.yaml",
    ):
        assert expected in names, f"{expected} missing from the wheel"
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "curate = stcorpus.curate.cli:main" in entry_points

    # Installed from that wheel into a fresh folder: one top-level package, real folders (not the
    # checkout's links), and the wings import from there with the checkout off sys.path.
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site)]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True, cwd=tmp_path)
    assert sorted(p.name for p in site.iterdir() if p.suffix != ".dist-info" and p.name != "bin") == ["stcorpus"]
    assert all((site / "stcorpus" / wing).is_dir() and not (site / "stcorpus" / wing).is_symlink() for wing in WINGS)
    probe = (
        f"import sys; sys.path.insert(0, {str(site)!r}); import stcorpus.curate.cli, stcorpus.training.config, "
        f"stcorpus.loaders; print(stcorpus.__file__); print(sorted(set({WINGS!r}) & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-P", "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path)
    where, generic = out.stdout.split("\n")[:2]
    assert Path(where).is_relative_to(site) and generic == "[]"


WINGS = ("curate", "loaders", "training")
