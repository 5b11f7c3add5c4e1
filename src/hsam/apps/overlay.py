"""PNG overlay montages of a segmentation on its image (Pillow only, no matplotlib).

Slices are shown in array order: tile ``k`` is ``image[z_k]`` with rows = H (first array axis
after D) and columns = W, exactly as stored -- no reorientation, so what you see is what the
model saw. Predicted labels are filled with a semi-transparent class colour; the ground truth,
when given, is drawn as a fully opaque outline in the same colour. A legend names each class.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_erosion

from hsam.errors import DataError
from hsam.io.images import atomic_output

logger = logging.getLogger(__name__)

#: Class colours (RGB), label ``c`` uses ``PALETTE[(c - 1) % len(PALETTE)]``.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)
FILL_ALPHA = 0.45
_MIN_TILE = 192
_PAD = 6


def label_color(label: int) -> tuple[int, int, int]:
    """RGB colour of foreground label ``label`` (>= 1)."""
    return PALETTE[(int(label) - 1) % len(PALETTE)]


def select_slices(labels: np.ndarray, gt: np.ndarray | None = None, n_slices: int = 6) -> list:
    """Representative slice indices along D: always the slice with the most foreground
    (prediction or ground truth), the rest spread evenly over the foreground's extent (over the
    whole volume if there is no foreground). Sorted, unique, at most ``n_slices``."""
    d = labels.shape[0]
    n = max(1, min(int(n_slices), d))
    fg = labels != 0
    if gt is not None:
        fg = fg | (gt != 0)
    counts = fg.reshape(d, -1).sum(axis=1)
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return sorted({int(round(z)) for z in np.linspace(0, d - 1, n)})
    lo, hi = int(nz[0]), int(nz[-1])
    picks = sorted({int(round(z)) for z in np.linspace(lo, hi, min(n, hi - lo + 1))})
    best = int(np.argmax(counts))
    if best not in picks:
        nearest = min(range(len(picks)), key=lambda i: abs(picks[i] - best))
        picks[nearest] = best
    return sorted(set(picks))


def _gray(image: np.ndarray) -> np.ndarray:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros(image.shape, dtype=np.uint8)
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    scaled = (np.nan_to_num(image.astype(np.float64), nan=lo) - lo) / (hi - lo)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def _names(label_names: Mapping[int, str] | Sequence[str] | None) -> dict[int, str]:
    if label_names is None:
        return {}
    if isinstance(label_names, Mapping):
        return {int(k): str(v) for k, v in label_names.items()}
    return {i + 1: str(v) for i, v in enumerate(label_names)}


def _tile(
    gray: np.ndarray, lab: np.ndarray, gt: np.ndarray | None, labels_to_draw: list[int]
) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float64)
    for c in labels_to_draw:
        colour = np.array(label_color(c), dtype=np.float64)
        m = lab == c
        if m.any():
            rgb[m] = (1 - FILL_ALPHA) * rgb[m] + FILL_ALPHA * colour
        if gt is not None:
            g = gt == c
            if g.any():
                edge = g & ~binary_erosion(g, border_value=0)
                rgb[edge] = colour
    return rgb.round().astype(np.uint8)


def render_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    label_names: Mapping[int, str] | Sequence[str] | None,
    path: str | os.PathLike,
    *,
    gt: np.ndarray | None = None,
    n_slices: int = 6,
    spacing: Sequence[float] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a PNG montage of ``labels`` (and optionally ``gt``) over ``image``, atomically.

    Args:
        image: ``(D, H, W)`` intensities (grey levels: 0.5-99.5 percentile window).
        labels: ``(D, H, W)`` integer prediction (0 = background), filled semi-transparent.
        label_names: ``{label: name}`` or a sequence naming labels ``1..K``; used for the legend.
        path: output ``.png``.
        gt: optional ``(D, H, W)`` ground truth, drawn as outlines in the class colours.
        n_slices: number of tiles (see :func:`select_slices`).
        spacing: optional ``(D, H, W)`` mm, to draw in-plane pixels with the right aspect.
        overwrite: replace an existing file instead of refusing.

    Raises:
        DataError: shapes differ or are not 3-D.
        OutputExistsError: ``path`` exists and not ``overwrite``.
    """
    path = Path(path)
    img = np.asarray(image)
    lab = np.asarray(labels)
    ref = None if gt is None else np.asarray(gt)
    if img.ndim != 3:
        raise DataError(f"overlay image must be 3-D (D, H, W), got shape {img.shape}")
    for name, arr in (("labels", lab), ("gt", ref)):
        if arr is not None and arr.shape != img.shape:
            raise DataError(f"overlay {name} shape {arr.shape} != image shape {img.shape}")
    names = _names(label_names)
    present = set(np.unique(lab).tolist()) | (set() if ref is None else set(np.unique(ref)))
    drawn = sorted({int(c) for c in present if c != 0} | set(names))
    zs = select_slices(lab, ref, n_slices)
    gray = _gray(img)

    h, w = img.shape[1:]
    sy, sx = (1.0, 1.0) if spacing is None else (float(spacing[1]), float(spacing[2]))
    scale = max(1.0, _MIN_TILE / max(h * sy / min(sy, sx), w * sx / min(sy, sx)))
    tile_w = max(1, round(w * sx / min(sy, sx) * scale))
    tile_h = max(1, round(h * sy / min(sy, sx) * scale))

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 2
    cols = min(len(zs), 3)
    rows = math.ceil(len(zs) / cols)
    cell_w, cell_h = tile_w + _PAD, tile_h + text_h + _PAD

    legend = [(c, names.get(c, f"label {c}")) for c in drawn]
    if ref is not None:
        legend_note = "filled = prediction, outline = ground truth"
    else:
        legend_note = "filled = prediction"
    width = max(cols * cell_w + _PAD, 240)
    entries_w = [text_h + 4 + probe.textbbox((0, 0), n, font=font)[2] + 12 for _, n in legend]
    legend_rows, x = 1, _PAD
    for ew in entries_w:
        if x + ew > width and x > _PAD:
            legend_rows += 1
            x = _PAD
        x += ew
    legend_h = (legend_rows + 1) * (text_h + 4) + _PAD
    canvas = Image.new("RGB", (width, rows * cell_h + _PAD + legend_h), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)

    for i, z in enumerate(zs):
        tile = _tile(gray[z], lab[z], None if ref is None else ref[z], drawn)
        pil = Image.fromarray(tile).resize((tile_w, tile_h), Image.Resampling.NEAREST)
        x0 = _PAD + (i % cols) * cell_w
        y0 = _PAD + (i // cols) * cell_h
        draw.text((x0, y0), f"slice z={z}", fill=(255, 255, 255), font=font)
        canvas.paste(pil, (x0, y0 + text_h))

    y = rows * cell_h + _PAD
    draw.text((_PAD, y), legend_note, fill=(255, 255, 255), font=font)
    y += text_h + 4
    x = _PAD
    for (c, name), ew in zip(legend, entries_w, strict=True):
        if x + ew > width and x > _PAD:
            x = _PAD
            y += text_h + 4
        draw.rectangle([x, y, x + text_h, y + text_h - 2], fill=label_color(c))
        draw.text((x + text_h + 4, y), name, fill=(255, 255, 255), font=font)
        x += ew

    with atomic_output(path, overwrite=overwrite) as tmp:
        canvas.save(tmp, format="PNG")
    logger.debug("wrote overlay %s (slices %s)", path, zs)
    return path
