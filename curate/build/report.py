"""The QC report of a build: ``qc/index.html`` with PNG plots.

Per slide: a thumbnail with the spots overlaid and coloured by total counts, a montage of sample
patches, histograms of counts and genes per spot, the spots read and written and every spot not
written with its reason, the gene mapping report (the numbers of the unit's ``MappingReport``);
and a table of every slide that was not built, with every reason (a failed slide's exception,
stage and file). The per-slide images are drawn inside the slide's work
unit (where the image is open) and copied here by the pack.

Plots are drawn with PIL (matplotlib only lends its viridis colour map): no global state, safe in
worker processes, and a few milliseconds per slide.
"""

from __future__ import annotations

import html
import io
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


def _viridis(values: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.uint8]:
    """RGB colours of ``values`` (scaled to their own range) on matplotlib's viridis map."""
    from matplotlib import colormaps

    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    rgba = colormaps["viridis"](scaled, bytes=True)
    return np.asarray(rgba, dtype=np.uint8)[..., :3]


def _spot_radius(x: npt.NDArray[np.floating[Any]], y: npt.NDArray[np.floating[Any]]) -> float:
    """A disc radius that keeps neighbouring spots apart: a third of the median nearest-spot distance."""
    from scipy.spatial import cKDTree

    if len(x) < 2:
        return 4.0
    distances, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), k=2)
    return float(np.clip(np.median(distances[:, 1]) / 3, 1.5, 12.0))


def plot_spots(
    path: Path,
    *,
    thumbnail: npt.NDArray[np.uint8],
    x: npt.NDArray[np.floating[Any]],
    y: npt.NDArray[np.floating[Any]],
    values: npt.NDArray[np.floating[Any]],
    title: str,
) -> None:
    """The slide thumbnail with spots at (x, y) thumbnail pixels coloured by log1p(``values``) (total counts).

    Drawn with PIL (a disc per spot, a colour bar with its range on the right): a QC image, made
    for every slide of a build, in a few milliseconds rather than matplotlib's half second.
    """
    from PIL import Image, ImageDraw

    image = Image.fromarray(np.ascontiguousarray(thumbnail[..., :3]))
    shrink = min(1.0, 640 / max(image.size))
    if shrink < 1.0:
        image = image.resize((max(1, round(image.width * shrink)), max(1, round(image.height * shrink))))
        x, y = x * shrink, y * shrink
    header, bar = 18, 70
    sheet = Image.new("RGB", (image.width + bar, image.height + header), "white")
    sheet.paste(image, (0, header))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), title, fill="black")
    if len(x):
        logs = np.log1p(np.asarray(values, dtype=np.float64))
        radius = _spot_radius(x, y)
        for cx, cy, colour in zip(x, y + header, _viridis(logs), strict=True):
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            draw.ellipse(box, fill=tuple(int(c) for c in colour), outline="white")
        top, bottom, left = header + 16, min(sheet.height - 16, header + 16 + 256), image.width + 8
        ramp = _viridis(np.linspace(1.0, 0.0, bottom - top))
        sheet.paste(Image.fromarray(np.repeat(ramp[:, None, :], 14, axis=1)), (left, top))
        draw.text((left, top - 14), f"{logs.max():.1f}", fill="black")
        draw.text((left, bottom + 2), f"{logs.min():.1f}", fill="black")
        draw.text((left + 18, (top + bottom) // 2 - 24), "log1p\ntotal\ncounts", fill="black")
    sheet.save(path, format="png")


def plot_montage(path: Path, *, jpegs: Sequence[bytes], columns: int = 8, title: str = "") -> None:
    """A grid of decoded tiles (e.g. the first patches of a slide), composed with PIL.

    Tiles are shown at most 120 px wide on a white sheet with a 4 px gutter and the title above.
    One image paste per tile instead of one matplotlib axes per tile: a tenth of the time.
    """
    from PIL import Image, ImageDraw

    if not jpegs:
        return
    tiles = [Image.open(io.BytesIO(data)).convert("RGB") for data in jpegs]
    side = min(120, max(max(tile.size) for tile in tiles))
    gutter, header = 4, 18 if title else 0
    rows = (len(tiles) + columns - 1) // columns
    width = columns * side + (columns + 1) * gutter
    sheet = Image.new("RGB", (width, header + rows * side + (rows + 1) * gutter), "white")
    for i, tile in enumerate(tiles):
        tile.thumbnail((side, side))
        row, column = divmod(i, columns)
        sheet.paste(tile, (gutter + column * (side + gutter), header + gutter + row * (side + gutter)))
    if title:
        ImageDraw.Draw(sheet).text((gutter, 3), title, fill="black")
    sheet.save(path, format="png")


def plot_histograms(path: Path, *, totals: npt.NDArray[Any], n_genes: npt.NDArray[Any], title: str) -> None:
    """Histograms (40 bins) of total counts and detected genes per spot, side by side, drawn with PIL."""
    from PIL import Image, ImageDraw

    panel_w, panel_h, margin, header = 400, 220, 36, 18
    sheet = Image.new("RGB", (2 * panel_w, header + panel_h + 34), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), title, fill="black")
    for index, (values, label) in enumerate(((totals, "total counts per spot"), (n_genes, "genes per spot"))):
        left, bottom = index * panel_w + margin, header + margin + panel_h - margin
        width, height = panel_w - 2 * margin, panel_h - margin
        draw.line([(left, bottom - height), (left, bottom), (left + width, bottom)], fill="black")
        draw.text((left + width // 2 - 50, bottom + 16), label, fill="black")
        values = np.asarray(values, dtype=np.float64)
        if not values.size:
            continue
        counts, edges = np.histogram(values, bins=40)
        step = width / len(counts)
        for i, n in enumerate(counts):
            top = bottom - height * n / max(int(counts.max()), 1)
            draw.rectangle([left + i * step, top, left + (i + 1) * step - 1, bottom], fill="#4c72b0")
        draw.text((left, bottom + 3), f"{edges[0]:g}", fill="black")
        draw.text((left + width - 40, bottom + 3), f"{edges[-1]:g}", fill="black")
        draw.text((left - margin + 2, bottom - height), f"{int(counts.max())}", fill="black")
    sheet.save(path, format="png")


def _rows(rows: Sequence[Sequence[Any]], head: Sequence[str]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _pairs(value: Any) -> list[tuple[str, int]]:
    """(reason, count) pairs of a ``spots_rejected`` value (a dict, or Arrow's list of pairs)."""
    items = value.items() if isinstance(value, Mapping) else (value or [])
    return [(str(reason), int(n)) for reason, n in items if n]


def _by_symbol(report: Mapping[str, Any]) -> int | None:
    """Features mapped by name (approved, previous or alias symbol, ...): mapped less those mapped by id."""
    if report.get("mapped") is None or report.get("by_id") is None:
        return None
    return int(report["mapped"]) - int(report["by_id"])


_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}th{background:#eee}"
    "img{max-width:100%;margin:4px 0}.slide{border-top:2px solid #888;margin-top:2em}"
)


def write_report(
    qc_dir: Path,
    *,
    name: str,
    slides: Sequence[Mapping[str, Any]],
    unit_qc_dirs: Mapping[str, Path],
    histograms: Mapping[str, tuple[npt.NDArray[Any], npt.NDArray[Any]]],
    mapping: Mapping[str, Mapping[str, Any]],
    summary: Mapping[str, Any],
    notes: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Write ``qc/index.html`` and its PNGs; returns the index path.

    ``notes``: what the reader and the build said of each slide (fallbacks taken, features or
    transcripts left out and why), listed for every slide, built or not.
    """
    notes = notes or {}
    shutil.rmtree(qc_dir, ignore_errors=True)
    qc_dir.mkdir(parents=True)
    built = [s for s in slides if s["status"] == "built"]
    others = [s for s in slides if s["status"] != "built"]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}: QC</title>",
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(name)}: build report</h1>",
        _rows([(k, v) for k, v in summary.items()], ("", "")),
        "<h2>Slides not built</h2>",
        _rows(
            [
                (s["slide_id"], s["status"], ", ".join(s.get("reason_codes") or []), s.get("n_spots"), s.get("reason"))
                for s in others
            ],
            ("slide", "status", "codes", "spots read", "reason"),
        )
        if others
        else "<p>None: every slide was built.</p>",
        "<h2>Spots not written</h2>",
        _rows(
            [
                (s["slide_id"], s["status"], s.get("n_spots"), s.get("n_spots_written"), reason, n)
                for s in slides
                for reason, n in _pairs(s.get("spots_rejected"))
            ],
            ("slide", "status", "spots read", "written", "reason", "spots"),
        ),
        "<h2>Gene mapping</h2>",
        _rows(
            [
                (
                    slide_id,
                    report.get("n_features"),
                    report.get("by_id"),
                    _by_symbol(report),
                    report.get("ambiguous"),
                    report.get("unmapped"),
                    report.get("merged"),
                    report.get("outside_panel"),
                    report.get("n_genes"),
                    f"{float(report.get('lost_fraction') or 0.0):.4f}",
                )
                for slide_id, report in sorted(mapping.items())
            ],
            (
                "slide",
                "features",
                "by id",
                "by symbol",
                "ambiguous",
                "unmapped",
                "summed duplicates",
                "outside panel",
                "genes kept",
                "counts lost",
            ),
        ),
        "<h2>Notes</h2>",
        _rows(
            [(slide_id, note) for slide_id, said in sorted(notes.items()) for note in said],
            ("slide", "what the reader and the build noted"),
        )
        if any(notes.values())
        else "<p>None.</p>",
        "<h2>Slides</h2>",
    ]
    for slide in sorted(built, key=lambda s: s["slide_id"]):
        slide_id = slide["slide_id"]
        parts.append(f"<div class='slide'><h3>{html.escape(slide_id)}</h3>")
        parts.append(
            _rows(
                [
                    (
                        slide.get("organ"),
                        slide.get("species"),
                        slide.get("assay"),
                        f"{slide.get('mpp') or 0:.4f} ({slide.get('mpp_source')})",
                        slide.get("count_kind"),
                        slide.get("n_spots"),
                        slide.get("n_spots_written"),
                        ", ".join(f"{reason} {n:,}" for reason, n in _pairs(slide.get("spots_rejected"))) or "none",
                        ", ".join(slide.get("qc_flags") or []) or "none",
                    )
                ],
                ("organ", "species", "assay", "um/px", "counts", "spots", "written", "not written", "QC flags"),
            )
        )
        source = unit_qc_dirs.get(slide_id)
        if source is not None and source.is_dir():
            for png in sorted(source.glob("*.png")):
                target = qc_dir / f"{slide_id}__{png.name}"
                shutil.copyfile(png, target)
                parts.append(f"<img src='{html.escape(target.name)}' alt='{html.escape(png.stem)}'>")
        if slide_id in histograms:
            totals, genes = histograms[slide_id]
            target = qc_dir / f"{slide_id}__histograms.png"
            plot_histograms(target, totals=totals, n_genes=genes, title=slide_id)
            parts.append(f"<img src='{html.escape(target.name)}' alt='histograms'>")
        parts.append("</div>")
    parts.append("</body></html>")
    index = qc_dir / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index
