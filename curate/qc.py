"""Slide quality control: measure, record, and stop a slide that cannot give honest samples.

``check_slide(slide, settings=...)`` runs every check on a slide a reader returned and
records each one as a :class:`~curate.slide.QCCheck` (the number measured, pass/fail and
why) in ``slide.qc``. A failed *blocking* check raises the matching
:class:`~curate.errors.QCError` subclass once every check has been recorded, so the build
can quarantine the slide with a reason and still report all the numbers; a failed
non-blocking check is a flag (``slide.flags``) and the slide is built.

Checks, in the order a blocking failure is reported:

=========================  ======================================================  ==========
check                      value                                                   blocking
=========================  ======================================================  ==========
``in_tissue_spots``        spots flagged in tissue                                 yes: NoSpotsError
``spots_with_counts``      in-tissue spots with a non-zero total                   yes: NoSpotsError
``image_not_blank``        ``"ok"`` or what is wrong (transparent, one colour)     yes: BlankImageError
``image_mpp``              um/px of level 0                                        yes: ImageTooCoarseError
``spots_outside_image``    in-tissue spot centres outside the image                yes, above a fraction
``mpp_lattice_agreement``  relative difference of ``slide.mpp`` and the lattice    setting
``zero_count_spots``       in-tissue spots with no counts                          no
``total_counts_median``    median total counts of in-tissue spots                  no
``genes_detected_median``  median detected genes of in-tissue spots                no
=========================  ======================================================  ==========

Readers add ``barcodes_with_position`` (matrix barcodes without a position are counted and
dropped; none left raises :class:`~curate.errors.BarcodeMismatchError`) through
:func:`match_barcodes`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from stcorpus.curate.errors import (
    BarcodeMismatchError,
    BlankImageError,
    CorruptSourceError,
    ImageTooCoarseError,
    NoSpotsError,
    QCError,
    ScaleMismatchError,
    SpotsOutsideImageError,
)
from stcorpus.curate.geometry import fit_lattice
from stcorpus.curate.slide import QCCheck

if TYPE_CHECKING:
    from stcorpus.curate.imaging import SlideImage
    from stcorpus.curate.slide import Slide

_GEM_SUFFIX: Final = re.compile(r"-\d+$")


@dataclass(frozen=True)
class QCSettings:
    """Thresholds of :func:`check_slide`; the defaults are what a build uses.

    Attributes:
        mpp_tolerance: largest accepted relative difference between the slide's um/px and
            the um/px fitted from its spot lattice (0.10 = 10%).
        scale_mismatch_blocking: a disagreement above ``mpp_tolerance`` raises
            :class:`ScaleMismatchError` instead of flagging the slide.
        max_mpp: coarsest level-0 resolution accepted (um/px); 0.5 um/px tiles cut from a
            coarser image are upsampled guesses, so such slides are stopped.
        max_outside_fraction: largest accepted fraction of in-tissue spot centres outside
            the image before :class:`SpotsOutsideImageError`.
        blank_tolerance: an image whose sampled pixels span at most this many grey levels
            in every channel is one colour (blank); JPEG noise on a flat image stays below 4.
        min_lattice_spots: fewest spots for a lattice fit; below, the check is skipped.
        thumbnail_size: longest side of the thumbnail the blank test looks at.
        max_thumbnail_source_pixels: largest pyramid level (pixels) decoded for that
            thumbnail; an image without a small enough level is sampled in windows instead,
            so a flat whole-slide TIFF is never decoded whole.
    """

    mpp_tolerance: float = 0.10
    scale_mismatch_blocking: bool = False
    max_mpp: float = 1.0
    max_outside_fraction: float = 0.05
    blank_tolerance: int = 4
    min_lattice_spots: int = 6
    thumbnail_size: int = 1024
    max_thumbnail_source_pixels: int = 16_000_000

    def __post_init__(self) -> None:
        from stcorpus.curate.errors import SettingsError

        if not 0 < self.mpp_tolerance < 1:
            raise SettingsError(
                f"mpp_tolerance must be in (0, 1) (curate build --mpp-tolerance), not {self.mpp_tolerance}"
            )
        if not self.max_mpp > 0:
            raise SettingsError(f"max_mpp must be positive (curate build --max-mpp), not {self.max_mpp}")
        if not 0 <= self.max_outside_fraction <= 1:
            raise SettingsError(
                f"max_outside_fraction must be in [0, 1] (curate build --max-spots-outside), not "
                f"{self.max_outside_fraction}"
            )


# ---------------------------------------------------------------------------------------------
# Helpers readers use
# ---------------------------------------------------------------------------------------------


def match_barcodes(
    matrix_barcodes: npt.NDArray[np.str_],
    position_barcodes: npt.NDArray[np.str_],
    *,
    slide_id: str,
    what: str = "positions",
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], QCCheck]:
    """Join matrix barcodes to position barcodes.

    Returns the matrix rows that have a position (in matrix order), the matching position
    rows, and the ``barcodes_with_position`` check (value: matrix barcodes dropped). If no
    barcode matches as written but they do once the ``-1`` GEM-group suffix is removed on
    both sides (re-published tables often drop it), that match is used and said so.
    Raises :class:`BarcodeMismatchError` when nothing matches.
    """
    unique, counts = np.unique(position_barcodes, return_counts=True)
    if (counts > 1).any():
        dupes = unique[counts > 1]
        raise CorruptSourceError(
            f"{what}: {dupes.shape[0]} barcode(s) appear more than once (e.g. {dupes[0]!r}); one row per spot expected",
            slide_id=slide_id,
        )
    matrix_rows, position_rows = _join(matrix_barcodes, position_barcodes)
    how = ""
    if matrix_rows.shape[0] == 0:
        # Only when one side has no suffix at all: '-1' vs '-2' are different libraries.
        stripped_matrix = np.array([_GEM_SUFFIX.sub("", b) for b in matrix_barcodes.tolist()], dtype=np.str_)
        stripped_positions = np.array([_GEM_SUFFIX.sub("", b) for b in position_barcodes.tolist()], dtype=np.str_)
        for left, right in ((stripped_matrix, position_barcodes), (matrix_barcodes, stripped_positions)):
            rows, pos = _join(left, right)
            if rows.shape[0]:
                matrix_rows, position_rows = rows, pos
                how = " (matched after removing the '-N' GEM-group suffix, which one side lacks)"
                break
    n = int(matrix_barcodes.shape[0])
    if matrix_rows.shape[0] == 0:
        raise BarcodeMismatchError(
            f"none of the {n:,} matrix barcodes has a row in {what} ({position_barcodes.shape[0]:,} rows); "
            f"matrix barcodes look like {matrix_barcodes[:2].tolist()}, {what} like {position_barcodes[:2].tolist()}. "
            "Check that both files come from the same sample and run",
            slide_id=slide_id,
        )
    dropped = n - int(matrix_rows.shape[0])
    if dropped:
        reason = f"{dropped:,} of {n:,} matrix barcodes have no row in {what}: dropped{how}"
    else:
        reason = f"all {n:,} matrix barcodes have a row in {what}{how}"
    return matrix_rows, position_rows, QCCheck("barcodes_with_position", dropped, passed=True, reason=reason)


def _join(left: npt.NDArray[np.str_], right: npt.NDArray[np.str_]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    lookup = {barcode: i for i, barcode in enumerate(right.tolist())}
    pairs = [(i, lookup[b]) for i, b in enumerate(left.tolist()) if b in lookup]
    if not pairs:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
    array = np.array(pairs, dtype=np.intp)
    return array[:, 0], array[:, 1]


def blank_reason(pixels: npt.NDArray[np.uint8], *, tolerance: int = 4) -> str | None:
    """Why ``pixels`` (H x W x 3 or 4) show no image, or None if they do.

    Fully transparent (alpha 0 everywhere) or one colour (every channel within
    ``tolerance`` grey levels over the opaque pixels), which covers all-black, all-white and
    placeholder images such as Space Ranger fixtures' ``(0, 0, 0, 255)`` hires PNG.
    """
    if pixels.size == 0:
        return "empty image"
    flat = pixels.reshape(-1, pixels.shape[-1]) if pixels.ndim == 3 else pixels.reshape(-1, 1)
    if flat.shape[1] == 4:
        opaque = flat[:, 3] > 0
        if not opaque.any():
            return "fully transparent (alpha 0 everywhere)"
        flat = flat[opaque, :3]
    spread = flat.max(axis=0).astype(np.int64) - flat.min(axis=0).astype(np.int64)
    if int(spread.max()) <= tolerance:
        colour = tuple(int(v) for v in np.median(flat, axis=0))
        return f"a single colour {colour} (every channel within {int(spread.max())} grey levels)"
    return None


def image_blank_reason(
    image: SlideImage,
    *,
    x: npt.NDArray[np.float64] | None = None,
    y: npt.NDArray[np.float64] | None = None,
    settings: QCSettings | None = None,
) -> str | None:
    """:func:`blank_reason` for a whole image, reading at most a thumbnail's worth of pixels.

    Uses the thumbnail when a pyramid level small enough exists (or the image is small);
    otherwise reads small windows at the spot centres ``x``, ``y`` (level-0 pixels) and on a
    coarse grid, so a flat whole-slide TIFF is never decoded whole.
    """
    settings = settings or QCSettings()
    scale = max(image.width, image.height) / settings.thumbnail_size
    level = image.levels[image.best_level(max(scale, 1.0))]
    if level.width * level.height <= settings.max_thumbnail_source_pixels:
        return blank_reason(
            image.thumbnail(max_size=settings.thumbnail_size, keep_alpha=True), tolerance=settings.blank_tolerance
        )
    size = 64
    centres: list[tuple[float, float]] = []
    if x is not None and y is not None and x.shape[0]:
        pick = np.unique(np.linspace(0, x.shape[0] - 1, num=min(32, x.shape[0])).astype(np.intp))
        centres.extend(zip(x[pick].tolist(), y[pick].tolist(), strict=True))
    grid = np.linspace(0.1, 0.9, 5)
    centres.extend((gx * image.width, gy * image.height) for gy in grid for gx in grid)
    inside = [(cx, cy) for cx, cy in centres if 0 <= cx < image.width and 0 <= cy < image.height]
    windows = [
        image.read_region(
            level=0,
            x=min(max(int(cx) - size // 2, 0), max(image.width - size, 0)),
            y=min(max(int(cy) - size // 2, 0), max(image.height - size, 0)),
            width=min(size, image.width),
            height=min(size, image.height),
            keep_alpha=True,
        )
        for cx, cy in inside
    ]
    return blank_reason(
        np.concatenate([w.reshape(-1, w.shape[-1]) for w in windows])[None], tolerance=settings.blank_tolerance
    )


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


#: Where each technology's reader takes the in-tissue flag from, for the "no spot in tissue" message.
_TISSUE_FLAG: dict[str, str] = {
    "spaceranger": "the positions' in_tissue column (a raw matrix joined with the wrong positions file?)",
    "hest": "obs['in_tissue'] of the h5ad (or the positions it was made from)",
    "st": "the spot file's `selected` column (1 for a spot under tissue)",
}


def _check_spots(slide: Slide) -> tuple[list[QCCheck], QCError | None]:
    spots = slide.spots
    in_tissue = spots.in_tissue
    n_in = int(in_tissue.sum())
    checks = [
        QCCheck(
            "in_tissue_spots",
            n_in,
            passed=n_in > 0,
            reason=f"{n_in:,} of {len(spots):,} spots are in tissue",
            blocking=True,
        )
    ]
    if len(spots) == 0:
        dropped = ", ".join(f"{n:,} {reason}" for reason, n in sorted(slide.dropped_spots.items()) if n)
        return checks, NoSpotsError(
            f"the slide has no spot to build: its count table has no rows{' left' if dropped else ''}"
            f"{' (dropped: ' + dropped + ')' if dropped else ''}; check that the `sources` name the right files",
            slide_id=slide.id,
        )
    if n_in == 0:
        flag = _TISSUE_FLAG.get(slide.sample.technology, _TISSUE_FLAG["spaceranger"])
        error = NoSpotsError(
            f"none of the {len(spots):,} spots is flagged in tissue: check {flag}",
            slide_id=slide.id,
        )
        return checks, error
    counts = slide.counts[np.flatnonzero(in_tissue)]
    totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    detected = np.asarray((counts != 0).sum(axis=1)).ravel()
    zero = int((totals == 0).sum())
    with_counts = n_in - zero
    checks += [
        QCCheck(
            "spots_with_counts",
            with_counts,
            passed=with_counts > 0,
            reason=f"{with_counts:,} in-tissue spots have counts",
            blocking=True,
        ),
        QCCheck("zero_count_spots", zero, passed=True, reason=f"{zero:,} of {n_in:,} in-tissue spots have no counts"),
        QCCheck(
            "total_counts_median",
            float(np.median(totals)),
            passed=True,
            reason=f"total counts per in-tissue spot: median {np.median(totals):.0f}, min {totals.min():.0f}, "
            f"max {totals.max():.0f}",
        ),
        QCCheck(
            "genes_detected_median",
            float(np.median(detected)),
            passed=True,
            reason=f"detected genes per in-tissue spot: median {np.median(detected):.0f}, max {int(np.max(detected))}",
        ),
    ]
    if with_counts == 0:
        return checks, NoSpotsError(
            f"all {n_in:,} in-tissue spots have zero counts: the matrix does not belong to these positions or is empty",
            slide_id=slide.id,
        )
    return checks, None


def _check_image(slide: Slide, settings: QCSettings) -> tuple[list[QCCheck], list[QCError]]:
    image = slide.image
    name = image.path.name
    checks: list[QCCheck] = []
    errors: list[QCError] = []
    in_tissue = slide.spots.in_tissue
    x, y = slide.spots.x_px[in_tissue], slide.spots.y_px[in_tissue]

    reason = image_blank_reason(image, x=x, y=y, settings=settings)
    checks.append(QCCheck("image_not_blank", reason or "ok", passed=reason is None, reason=reason or "", blocking=True))
    if reason is not None:
        errors.append(
            BlankImageError(
                f"image {name} ({image.width}x{image.height}) is {reason}: it is a placeholder or the wrong file; "
                "name the real H&E image as the sample's `image` source",
                slide_id=slide.id,
            )
        )

    coarse = slide.mpp > settings.max_mpp
    checks.append(
        QCCheck(
            "image_mpp",
            float(slide.mpp),
            passed=not coarse,
            reason=f"{slide.mpp:.4g} um/px ({slide.mpp_source})"
            + (f"; coarser than the {settings.max_mpp:g} um/px allowed" if coarse else ""),
            blocking=True,
        )
    )
    if coarse:
        fallback = (
            " The reader fell back to a downscaled image (see notes)."
            if any("fell back" in n for n in slide.notes)
            else ""
        )
        errors.append(
            ImageTooCoarseError(
                f"image {name} is {slide.mpp:.3g} um/px ({slide.mpp_source}), coarser than the "
                f"{settings.max_mpp:g} um/px needed for honest 0.5 um/px tiles.{fallback} Provide the "
                "full-resolution H&E as the sample's `image` source, or accept coarser images knowingly with "
                f"`curate build --max-mpp` (now {settings.max_mpp:g})",
                slide_id=slide.id,
            )
        )

    outside = (x < 0) | (y < 0) | (x >= image.width) | (y >= image.height)
    n_out, n_in = int(outside.sum()), int(x.shape[0])
    fraction = n_out / n_in if n_in else 0.0
    too_many = fraction > settings.max_outside_fraction
    checks.append(
        QCCheck(
            "spots_outside_image",
            n_out,
            passed=not too_many,
            reason=f"{n_out:,} of {n_in:,} in-tissue spot centres ({fraction:.1%}) lie outside the image",
            blocking=True,
        )
    )
    if too_many:
        errors.append(
            SpotsOutsideImageError(
                f"{n_out:,} of {n_in:,} in-tissue spot centres ({fraction:.1%}, more than the "
                f"{settings.max_outside_fraction:.0%} allowed) lie outside image {name} "
                f"({image.width}x{image.height} px; "
                f"spots span x {x.min():.0f}..{x.max():.0f}, y {y.min():.0f}..{y.max():.0f}): wrong image, wrong "
                "scale factor or swapped x/y. Check the `image` source and the positions belong together",
                slide_id=slide.id,
            )
        )
    return checks, errors


def _check_scale(slide: Slide, settings: QCSettings) -> tuple[QCCheck, QCError | None]:
    spots = slide.spots
    blocking = settings.scale_mismatch_blocking
    if len(spots) < settings.min_lattice_spots:
        return (
            QCCheck(
                "mpp_lattice_agreement",
                None,
                passed=True,
                reason=f"{len(spots)} spots: too few to fit the lattice (need {settings.min_lattice_spots})",
                blocking=blocking,
            ),
            None,
        )
    fit = fit_lattice(
        spots.x_px, spots.y_px, spots.array_row, spots.array_col, lattice=slide.lattice, pitch_um=slide.pitch_um
    )
    if fit is None:
        return (
            QCCheck(
                "mpp_lattice_agreement",
                None,
                passed=True,
                reason="spots lie on one lattice line: the scale cannot be fitted",
                blocking=blocking,
            ),
            None,
        )
    difference = abs(slide.mpp - fit.mpp) / fit.mpp
    described = (
        f"{slide.mpp:.4f} um/px ({slide.mpp_source}) vs {fit.mpp:.4f} um/px from the {slide.lattice} lattice "
        f"({slide.pitch_um:g} um pitch, {fit.n_inliers}/{fit.n_spots} spots, rms {fit.rms_residual_px:.1f} px, "
        f"anisotropy {fit.anisotropy:.3f}): {difference:.1%} apart"
    )
    if slide.mpp_source == "lattice":
        return QCCheck(
            "mpp_lattice_agreement", difference, passed=True, reason=f"um/px was taken from this fit: {described}"
        ), None
    passed = difference <= settings.mpp_tolerance
    check = QCCheck(
        "mpp_lattice_agreement",
        difference,
        passed=passed,
        reason=described + ("" if passed else f", more than the {settings.mpp_tolerance:.0%} allowed"),
        blocking=blocking,
    )
    if passed or not blocking:
        return check, None
    return check, ScaleMismatchError(
        f"the slide's scale and its spot lattice disagree: {described}, more than the {settings.mpp_tolerance:.0%} "
        "allowed. The image may not be the one the positions were registered to (or is downscaled), or the "
        "um/px metadata is wrong; set the sample's `mpp` in the manifest if it is known, or build the slide "
        "flagged with `curate build --scale-mismatch flag` (the default)",
        slide_id=slide.id,
    )


def check_slide(slide: Slide, *, settings: QCSettings | None = None) -> Slide:
    """Run every check on ``slide``, record them in ``slide.qc``, raise on a blocking failure.

    All checks are recorded before the first blocking failure (in the table's order) is
    raised, with every further blocking failure in its ``also``, so a quarantined slide still
    carries every number and every reason. Running it twice replaces the
    earlier records. Returns the same slide.

    >>> slide = check_slide(read_slide(sample, files))  # doctest: +SKIP
    >>> slide.flags  # failed non-blocking checks  # doctest: +SKIP
    ['mpp_lattice_agreement']
    """
    settings = settings or QCSettings()
    spot_checks, spot_error = _check_spots(slide)
    image_checks, image_errors = _check_image(slide, settings)
    scale_check, scale_error = _check_scale(slide, settings)
    new = [*spot_checks, *image_checks, scale_check]
    names = {check.name for check in new}
    slide.qc[:] = [check for check in slide.qc if check.name not in names] + new
    errors = [e for e in (spot_error, *image_errors, scale_error) if e is not None]
    if errors:
        first = errors[0]
        first.also = tuple(errors[1:])  # a slide failing several checks is quarantined with all of them
        raise first
    return slide


def summary(slide: Slide) -> str:
    """One line per check, for logs: ``name: value (PASS|FLAG|FAIL) reason``."""
    lines = []
    for check in slide.qc:
        status = "PASS" if check.passed else ("FAIL" if check.blocking else "FLAG")
        value = f"{check.value:.4g}" if isinstance(check.value, float) and math.isfinite(check.value) else check.value
        lines.append(f"{check.name}: {value} ({status}) {check.reason}".rstrip())
    return "\n".join(lines)
