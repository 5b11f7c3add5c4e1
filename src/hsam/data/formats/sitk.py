"""Reading SimpleITK images (NIfTI, MHA/MHD, NRRD) into cases, shared by the ``promise12`` and
``nnunet`` formats and by :mod:`hsam.data.prepare`: the one reading path
(:func:`hsam.io.images.read_image`), the ``(z, y, x)`` -> ``(D, H, W)`` geometry and the check that
a label lies on its image's grid."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hsam.data.case import Case
from hsam.data.formats.common import num_foreground_classes, require_file, to_label
from hsam.errors import DataError
from hsam.intensity import apply_intensity
from hsam.io.images import read_image

logger = logging.getLogger(__name__)

__all__ = ["SITK_ENDINGS", "check_label_grid", "read_sitk", "read_sitk_case", "sitk_geometry"]

SITK_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


def read_sitk(path: Path) -> tuple[np.ndarray, Any, bytes | None]:
    """(array, SimpleITK image, NIfTI-1 header or None) through :func:`hsam.io.images.read_image`,
    the reading path (and checks) of every command."""
    import SimpleITK as sitk  # noqa: N813

    require_file(path, "image file")
    read = read_image(path)
    return sitk.GetArrayFromImage(read.image), read.image, read.nifti_header


def sitk_geometry(img: Any) -> tuple[tuple[float, float, float], tuple, tuple]:
    dim = img.GetDimension()
    sp = tuple(float(s) for s in img.GetSpacing())[:3]
    origin = tuple(float(o) for o in img.GetOrigin())[:3]
    direction = tuple(float(d) for d in img.GetDirection())
    if dim == 2:
        sp = (*sp, 1.0)
        origin = (*origin, 0.0)
        direction = (
            direction[0],
            direction[1],
            0.0,
            direction[2],
            direction[3],
            0.0,
            0.0,
            0.0,
            1.0,
        )
    elif dim == 4:
        direction = tuple(direction[r * 4 + c] for r in range(3) for c in range(3))
    return (sp[2], sp[1], sp[0]), origin, direction  # type: ignore[return-value]


def _as_volume(arr: np.ndarray, img: Any, path: Path) -> np.ndarray:
    """SimpleITK array -> (D, H, W): 2-D gets a slice axis, 4-D/vector keeps channel 0."""
    if img.GetNumberOfComponentsPerPixel() > 1:
        logger.warning(
            "%s: %d components per pixel; using the first",
            path,
            img.GetNumberOfComponentsPerPixel(),
        )
        arr = arr[..., 0]
    if arr.ndim == 4:
        logger.warning("%s: 4-D image with %d channels; using channel 0", path, arr.shape[0])
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise DataError(f"{path}: expected a 2-D or 3-D image, got array shape {arr.shape}.")
    return arr


#: How far a label's grid may be from its image's: spacing (relative), origin (relative to
#: its magnitude, plus an absolute mm floor) and direction cosines (absolute).
LABEL_SPACING_RTOL = 1e-3
LABEL_ORIGIN_RTOL = 1e-3
LABEL_ORIGIN_ATOL_MM = 1e-2
LABEL_DIRECTION_ATOL = 1e-4


def check_label_grid(
    image_path: str | Path,
    image_grid: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]],
    label_path: str | Path,
    label_grid: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]],
) -> None:
    """Refuse a label whose spacing, origin or direction differs from its image's.

    Grids are ``(spacing, origin, direction)`` as :func:`sitk_geometry` returns them. A label
    on another grid marks other anatomy than the voxels it is paired with, so training and
    metrics would be silently wrong.

    Raises:
        DataError: naming both files and each field that differs, with both values.
    """
    tolerances = {  # field (as the message names it): (rtol, atol)
        "spacing (D, H, W) mm": (LABEL_SPACING_RTOL, 0.0),
        "origin (x, y, z) mm": (LABEL_ORIGIN_RTOL, LABEL_ORIGIN_ATOL_MM),
        "direction": (0.0, LABEL_DIRECTION_ATOL),
    }
    differ = [
        f"{name} {_fmt(lab)} (image {_fmt(img)})"
        for (name, (rtol, atol)), img, lab in zip(
            tolerances.items(), image_grid, label_grid, strict=True
        )
        if not np.allclose(np.asarray(lab, float), np.asarray(img, float), rtol=rtol, atol=atol)
    ]
    if differ:
        raise DataError(
            f"{label_path}: the label's geometry differs from its image {image_path}: "
            f"{'; '.join(differ)}. Resample the label onto the image grid (nearest neighbour) "
            "or fix the header that is wrong."
        )


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def read_sitk_case(
    image_path: str | Path,
    label_path: str | Path | None,
    *,
    case_id: str,
    intensity: str,
    label_names: dict[int, str],
    num_classes: int | None = None,
) -> Case:
    """Read an image (and label) with SimpleITK (NIfTI, MHA/MHD, NRRD) into a :class:`Case`.

    SimpleITK's array is ``(z, y, x)``, which is used as ``(D, H, W)`` unchanged; spacing is
    SimpleITK's ``(x, y, z)`` reversed; origin and direction are kept in SimpleITK order.
    ``intensity`` (see :func:`apply_intensity`) is applied to the raw values. The label must
    be on the same grid (:func:`check_label_grid`). A 3-D NIfTI-1 image's header is kept
    (:attr:`Case.nifti_header`) so that outputs written on its grid keep its qform/sform.
    """
    image_path = Path(image_path)
    raw, img, nifti_header = read_sitk(image_path)
    raw = _as_volume(raw, img, image_path)
    image = apply_intensity(raw, intensity)
    spacing, origin, direction = sitk_geometry(img)
    label = None
    if label_path is not None:
        label_path = Path(label_path)
        lab_arr, lab_img, _ = read_sitk(label_path)
        lab_arr = _as_volume(lab_arr, lab_img, label_path)
        if lab_arr.shape != image.shape:
            raise DataError(
                f"{label_path}: label shape {lab_arr.shape} (D, H, W) differs from image "
                f"{image_path} shape {image.shape}; they must share one voxel grid."
            )
        check_label_grid(
            image_path, (spacing, origin, direction), label_path, sitk_geometry(lab_img)
        )
        label = to_label(lab_arr, str(label_path))
    case = Case(
        case_id=case_id,
        image=image,
        label=label,
        spacing=spacing,
        label_names=dict(label_names),
        intensity=intensity,
        source=str(image_path),
        origin=origin,
        direction=direction,
        nifti_header=nifti_header if img.GetDimension() == 3 else None,
    )
    return case.validate(
        num_classes if num_classes is not None else num_foreground_classes(label_names)
    )
