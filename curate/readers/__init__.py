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

from stcorpus.curate.errors import ManifestError, NoReaderError
from stcorpus.settings import coerce, unknown_keys_message

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
    #: Options that take one of a few values: checked by ``check_sample`` (validate, plan, build) alike.
    choices: Mapping[str, tuple[object, ...]] = field(default_factory=dict)
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
            choices={"matrix": ("filtered", "raw")},
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
            technology="spatialdata",
            module="sdata",
            required_any=(frozenset({"store"}),),
            options={
                "table": str,
                "region": str,
                "layer": str,
                "image": str,
                "coordinate_system": str,
                "micron_coordinate_system": str,
                "spot_diameter_um": float,
            },
            doc=(
                "A SpatialData zarr store (extra stcorpus[spatialdata]). Source: store (the .zarr folder). Options: "
                "table, region (the annotated shapes/points element), layer (counts layer instead of X), image (the "
                "H&E element; default the finest non-blank one), coordinate_system, micron_coordinate_system (a "
                "system in um that fixes um/px), spot_diameter_um (circle sites' physical diameter; 65 for "
                "spatialdata-io Visium stores)."
            ),
        ),
        ReaderSpec(
            technology="visium-hd",
            module="visium_hd",
            required_any=(frozenset({"outs"}),),
            optional=frozenset({"image"}),
            options={
                "bin_um": int,
                "grid": str,
                "pitch_um": float,
                "spot_diameter_um": float,
                "matrix": str,
                "image_fallback": bool,
            },
            choices={"bin_um": (2, 8, 16), "grid": ("hex", "square"), "matrix": ("filtered", "raw")},
            doc=(
                "Space Ranger 3.x Visium HD binned outputs. Sources: outs (outs/ or binned_outputs/), image (the "
                "full-resolution H&E). Options: bin_um=2|8|16 (bins read; default 8), grid=hex|square (default hex: "
                "spot_diameter_um 55 on pitch_um 100; square: squares of pitch_um, a multiple of bin_um), counts "
                "summed; matrix and image_fallback as for spaceranger."
            ),
        ),
        ReaderSpec(
            technology="xenium",
            module="xenium",
            required_any=(frozenset({"outs", "image"}),),
            optional=frozenset({"alignment"}),
            options={
                "samples": str,
                "neighbour_radius_um": float,
                "neighbour_k": int,
                "grid": str,
                "pitch_um": float,
                "spot_diameter_um": float,
                "min_qv": float,
            },
            choices={"samples": ("cells", "pseudo-spots"), "grid": ("hex", "square")},
            doc=(
                "10x Xenium output bundle + H&E. Sources: outs (the bundle folder: experiment.xenium, "
                "cell_feature_matrix.h5, cells.parquet, transcripts.parquet), image (the H&E), alignment (3x3 CSV, "
                "H&E px -> morphology px). Options: samples=cells|pseudo-spots (default cells; neighbours within "
                "neighbour_radius_um 50, the neighbour_k 6 nearest); pseudo-spots pool transcripts with qv >= min_qv "
                "(20) of gene features onto grid=hex|square (pitch_um, spot_diameter_um as for visium-hd)."
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
    unknown_options = sorted(set(sample.reader) - set(spec.options))
    if unknown_options:
        problems.append(f"{where}: {unknown_keys_message(unknown_options, sorted(spec.options), where='reader')}")
    for option, value in sample.reader.items():
        if option in spec.options:
            try:  # the settings' one strict check: no bool from 'no', a float may be written 65
                coerce(spec.options[option], value, f"reader.{option}", error=ManifestError)
            except ManifestError as exc:
                problems.append(f"{where}: {exc}")
        kind = spec.options.get(option)
        number = kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and option.endswith("_um") and not (math.isfinite(float(value)) and float(value) > 0):
            problems.append(f"{where}: reader.{option} must be a positive number of um, not {value!r}")
        elif number and kind is int and isinstance(value, int) and value < 1:  # bin_um, neighbour_k: counts
            problems.append(f"{where}: reader.{option} must be a positive whole number, not {value!r}")
        elif number and not math.isfinite(float(value)):  # min_qv: any finite threshold, 0 keeps every one
            problems.append(f"{where}: reader.{option} must be a finite number, not {value!r}")
        allowed = spec.choices.get(option)
        if allowed is not None and not isinstance(value, bool) and value not in allowed:
            problems.append(
                f"{where}: reader.{option}={value!r} is not one of {', '.join(repr(a) for a in allowed)} "
                f"(technology {spec.technology!r})"
            )
    return problems


def read_slide(sample: Sample, files: Mapping[str, Path], *, images: ImageSettings | None = None) -> Slide:
    """Read ``sample`` from its fetched ``files`` with the reader of its technology.

    ``images`` bounds what may be decoded at once (default: ``ImageSettings()``).
    """
    from stcorpus.curate.imaging import ImageSettings

    return get_reader(sample.technology).load()(sample=sample, files=files, images=images or ImageSettings())


__all__ = ["READERS", "ReaderSpec", "check_sample", "get_reader", "read_slide"]
