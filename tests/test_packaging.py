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
