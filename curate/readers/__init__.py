"""Readers: one per technology, each turning a sample's fetched files into a validated ``Slide``.

Dispatch is by the manifest's declared ``technology`` through ``READERS``, never by guessing
from file names. A reader is a keyword-only function::

    read(*, sample: Sample, files: Mapping[str, Path], images: ImageSettings) -> Slide

``files`` maps the sample's source names to local paths (a file, or the folder an archive was
unpacked into). Each reader declares the source names it accepts and the ``reader:`` options
it understands, so ``curate validate`` can check a manifest without downloading anything.
``images`` (``ImageSettings``: the pixel budget of images decoded whole) is the build's, the
same for every reader.

Reader modules are imported only when a reader is used (they pull in h5py, anndata, ...).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from stcorpus.curate.errors import NoReaderError

if TYPE_CHECKING:
    from stcorpus.curate.imaging import ImageSettings
    from stcorpus.curate.manifest import Sample
    from stcorpus.curate.slide import Slide

ReadFn = Callable[..., "Slide"]


@dataclass(frozen=True)
class ReaderSpec:
    """What a reader accepts: source names (one of ``required_any`` groups must be complete) and options."""

    technology: str
    module: str  # curate.readers.<module> defines `read`
    #: Alternatives: the sample's sources must include every name of at least one group.
    required_any: tuple[frozenset[str], ...]
    optional: frozenset[str] = frozenset()
    options: Mapping[str, type] = field(default_factory=dict)
    doc: str = ""

    @property
    def accepted(self) -> frozenset[str]:
        """Every source name this reader reads."""
        names: set[str] = set(self.optional)
        for group in self.required_any:
            names |= group
        return frozenset(names)

    def load(self) -> ReadFn:
        """Import the reader module and return its ``read`` function."""
        read: ReadFn = importlib.import_module(f"stcorpus.curate.readers.{self.module}").read
        return read


#: Registered readers by technology key.
READERS: dict[str, ReaderSpec] = {
    spec.technology: spec
    for spec in (
        ReaderSpec(
            technology="spaceranger",
            module="spaceranger",
            # A whole outs/ folder, or its parts: a matrix plus a spatial/ folder (or archive),
            # or a matrix plus the positions and scale factors named one by one.
            required_any=(
                frozenset({"outs"}),
                frozenset({"matrix", "spatial"}),
                frozenset({"matrix", "positions", "scalefactors"}),
            ),
            optional=frozenset({"image"}),
            options={"matrix": str, "image_fallback": bool},
            doc=(
                "Space Ranger 1.x-3.x output. Sources: outs (folder/archive) | matrix (10x h5 or MTX "
                "folder/archive) + spatial (folder/archive) | matrix + positions + scalefactors; image: "
                "the full-resolution image. Options: matrix=filtered|raw (which matrix of outs/), "
                "image_fallback=true|false (use hires/lowres PNG when no full-resolution image)."
            ),
        ),
        ReaderSpec(
            technology="hest",
            module="hest",
            required_any=(frozenset({"st", "wsi"}),),
            optional=frozenset({"metadata"}),
            options={"spatial_key": str},
            doc="A HEST-1k sample. Sources: st (st/<id>.h5ad), wsi (wsis/<id>.tif), metadata (metadata/<id>.json).",
        ),
        ReaderSpec(
            technology="stimage",
            module="stimage",
            required_any=(frozenset({"counts", "coords", "image"}),),
            options={"spot_diameter_um": float, "bin_size_um": float},
            doc=(
                "An STimage-1K4M slide. Sources: counts (<slide>_count.csv), coords (<slide>_coord.csv), "
                "image (<slide>.png). Options: spot_diameter_um (float; default 55.0 Visium, 100.0 ST) turns "
                "the coord file's radius r into um/px; bin_size_um (float) the bin side of a Visium HD slide."
            ),
        ),
        ReaderSpec(
            technology="st",
            module="st",
            required_any=(frozenset({"counts", "spots", "image"}),),
            doc=(
                "Legacy Spatial Transcriptomics. Sources: counts (spots x genes TSV[.gz], rows keyed '<x>x<y>'), "
                "spots (spot file: x y new_x new_y pixel_x pixel_y selected), image (the full-resolution H&E). "
                "um/px is fitted from pixel_x/pixel_y against new_x/new_y at 200 um per array unit."
            ),
        ),
    )
}


def get_reader(technology: str) -> ReaderSpec:
    """The reader registered for ``technology``; an error listing the valid keys otherwise."""
    try:
        return READERS[technology]
    except KeyError:
        valid = ", ".join(sorted(READERS)) or "none"
        raise NoReaderError(f"no reader for technology {technology!r}; readers exist for: {valid}") from None


def check_sample(sample: Sample) -> list[str]:
    """Problems with a sample's source names and reader options, without reading any file."""
    where = sample.describe()
    if sample.technology not in READERS:
        valid = ", ".join(sorted(READERS))
        return [f"{where}: technology {sample.technology!r} has no reader yet (readers: {valid})"]
    spec = READERS[sample.technology]
    problems: list[str] = []
    names = set(sample.sources)
    unknown = sorted(names - spec.accepted)
    if unknown:
        problems.append(
            f"{where}: field 'sources': unknown source name(s) {', '.join(unknown)} for technology "
            f"{spec.technology!r} (accepted: {', '.join(sorted(spec.accepted))})"
        )
    if spec.required_any and not any(group <= names for group in spec.required_any):
        options = " or ".join("{" + ", ".join(sorted(g)) + "}" for g in spec.required_any)
        problems.append(f"{where}: field 'sources': technology {spec.technology!r} needs {options}")
    for option, value in sample.reader.items():
        expected = spec.options.get(option)
        if expected is None:
            valid = ", ".join(sorted(spec.options)) or "none"
            problems.append(f"{where}: field 'reader.{option}': unknown reader option (valid: {valid})")
        elif expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            # YAML writes 65 for 65.0; every float option is a size in um
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{where}: field 'reader.{option}': expected a positive number of um, got {value!r}")
        elif not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            problems.append(f"{where}: field 'reader.{option}': expected {expected.__name__}, got {value!r}")
    return problems


def read_slide(sample: Sample, files: Mapping[str, Path], *, images: ImageSettings | None = None) -> Slide:
    """Read ``sample`` from its fetched ``files`` with the reader of its technology.

    ``images`` bounds what may be decoded at once (default: ``ImageSettings()``).
    """
    from stcorpus.curate.imaging import ImageSettings

    return get_reader(sample.technology).load()(sample=sample, files=files, images=images or ImageSettings())


__all__ = ["READERS", "ReaderSpec", "check_sample", "get_reader", "read_slide"]
