"""Figure files: the same records give the same bytes in PNG, PDF and SVG."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..config import ConfigError
from ..store import StoreError, atomic_write, load, make_folder
from .catalog import check_names, figures, prepare
from .style import DPI, paper_style

FORMATS = ("png", "pdf", "svg")
# Metadata that would differ between two drawings of the same records (dates, versions).
SAVE_METADATA = {
    "png": {"Software": None},
    "pdf": {"CreationDate": None, "Producer": None, "Creator": None},
    "svg": {"Date": None, "Creator": None},
}


def freeze_layout(fig: Figure) -> None:
    """Lay the figure out once, then pin every Axes at its position rounded to 1e-6 of the
    figure and turn the layout engine off. Constrained layout's solver can differ between two
    runs in the last bits of a position, and SVG clip-path ids hash those bits."""
    if fig.get_layout_engine() is None:
        return
    fig.draw_without_rendering()
    for ax in fig.axes:
        ax.set_position(np.round(ax.get_position().bounds, 6).tolist())
    fig.set_layout_engine("none")


def render(fig: Figure, fmt: str, dpi: float = DPI) -> bytes:
    """The figure's file in ``fmt`` (png, pdf, svg), without dates or versions in it; ``dpi``
    sets the pixels of a PNG."""
    buffer = io.BytesIO()
    with paper_style():  # svg.hashsalt is read while saving
        freeze_layout(fig)
        fig.savefig(buffer, format=fmt, dpi=dpi, metadata=SAVE_METADATA[fmt])
    return buffer.getvalue()


def check_formats(formats: Sequence[str]) -> list[str]:
    formats = [f.strip().lower() for f in formats if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"format {bad[0] if bad else ''!r} is invalid: one or more of "
                          f"{', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def write_figures(results_dir: str | os.PathLike, formats: Sequence[str] = ("png",),
                  only: Sequence[str] | None = None,
                  run_ids: Sequence[str] | None = None) -> list[Path]:
    """Draw the figures of a results folder into ``results_dir/figures/NAME.FORMAT``.

    Args:
        results_dir: a folder made by gradlab (``<dir>/runs/<run_id>/``) or one run folder.
        formats: any of png, pdf, svg; the same records give the same bytes.
        only: figure names (``FIGURES``) to draw; all when None.
        run_ids: draw only these runs of the folder (e.g. a sweep's); all when None.

    Returns the paths written. Problems that ``gradlab.load`` reports are warnings.
    """
    formats = check_formats(formats)
    check_names(only)
    data = prepare(load(results_dir, run_ids=run_ids), results_dir)
    if data.grads.empty and data.epochs.empty:
        raise StoreError(f"{results_dir}: no finished run has records: nothing to draw")
    out = make_folder(Path(results_dir) / "figures")
    paths = []
    for name, fig in figures(data, only):
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            content = render(fig, fmt)
            atomic_write(path, lambda tmp, content=content: tmp.write_bytes(content))
            paths.append(path)
    return paths
