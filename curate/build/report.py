"""The QC report of a build: ``qc/index.html`` with PNG plots.

Per slide: a thumbnail with the spots overlaid and coloured by total counts, a montage of sample
patches, histograms of counts and genes per spot, the spots read and written and every spot not
written with its reason, the gene mapping report (the numbers of the unit's ``MappingReport``);
and a table of every slide that was not built, with every reason (a failed slide's exception,
stage and file). The per-slide images are drawn inside the slide's work
unit (where the image is open) and copied here by the pack.

Plots use matplotlib's object API (``Figure`` + the Agg canvas), never ``pyplot``: no global state,
safe in worker processes.
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


def _save(figure: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    # Fixed metadata keeps the PNG bytes reproducible (matplotlib stamps its version and software).
    figure.savefig(path, format="png", dpi=100, metadata={"Software": None})


def plot_spots(
    path: Path,
    *,
    thumbnail: npt.NDArray[np.uint8],
    x: npt.NDArray[np.floating[Any]],
    y: npt.NDArray[np.floating[Any]],
    values: npt.NDArray[np.floating[Any]],
    title: str,
) -> None:
    """The slide thumbnail with spots at (x, y) thumbnail pixels coloured by ``values`` (total counts)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 6 * thumbnail.shape[0] / max(thumbnail.shape[1], 1) + 0.6))
    axes = figure.add_subplot()
    axes.imshow(thumbnail)
    if len(x):
        points = axes.scatter(
            x, y, c=np.log1p(values), s=18, cmap="viridis", alpha=0.9, linewidths=0.3, edgecolors="white"
        )
        figure.colorbar(points, ax=axes, fraction=0.04, label="log1p(total counts)")
    axes.set_title(title, fontsize=9)
    axes.set_axis_off()
    figure.tight_layout()
    _save(figure, path)


def plot_montage(path: Path, *, jpegs: Sequence[bytes], columns: int = 8, title: str = "") -> None:
    """A grid of decoded tiles (e.g. the first patches of a slide)."""
    from matplotlib.figure import Figure
    from PIL import Image

    if not jpegs:
        return
    rows = (len(jpegs) + columns - 1) // columns
    figure = Figure(figsize=(columns * 1.2, rows * 1.2 + 0.4))
    for i, data in enumerate(jpegs):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.imshow(np.asarray(Image.open(io.BytesIO(data))))
        axes.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=9)
    _save(figure, path)


def plot_histograms(path: Path, *, totals: npt.NDArray[Any], n_genes: npt.NDArray[Any], title: str) -> None:
    """Histograms of total counts and detected genes per spot."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 2.8))
    for index, (values, label) in enumerate(((totals, "total counts per spot"), (n_genes, "genes per spot"))):
        axes = figure.add_subplot(1, 2, index + 1)
        if len(values):
            axes.hist(values, bins=40, color="#4c72b0")
        axes.set_xlabel(label)
        axes.set_ylabel("spots")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    _save(figure, path)


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
) -> Path:
    """Write ``qc/index.html`` and its PNGs; returns the index path."""
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
                "outside panel",
                "genes kept",
                "counts lost",
            ),
        ),
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
