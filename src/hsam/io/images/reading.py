"""Reading: :func:`read_image` (every command's one reading path, with all integrity
checks), :func:`read_volume` (a 3-D volume with its exact geometry) and :func:`list_inputs`
(what user-given paths expand to)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk  # noqa: N813

from hsam.errors import DataError
from hsam.io.images.dicom import is_dicom_series, read_dicom_series
from hsam.io.images.nifti import check_nifti, nifti_header_bytes
from hsam.io.images.volume import (
    EXTENSION_FORMATS,
    SUPPORTED_EXTENSIONS,
    Geometry,
    Volume,
    check_finite,
    itk_message,
    require_extension,
    volume_extension,
)

logger = logging.getLogger(__name__)


def _ensure_3d(image: sitk.Image, path: Path) -> sitk.Image:
    dim = image.GetDimension()
    size = tuple(image.GetSize())
    if dim == 4 and size[3] == 1:
        return sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, 0])
    if dim == 2:
        raise DataError(
            f"{path} is a 2-D image (size {size}); hsam needs a 3-D volume: stack the slices "
            "into one volume file, or pass the folder of the DICOM series"
        )
    if dim != 3:
        raise DataError(
            f"{path} is a {dim}-D image (size {size}) where a 3-D volume is needed (several "
            "time points or channels?); split it into one 3-D file per time point/channel"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour "
            "or vector image); hsam needs a scalar 3-D volume: convert it to grey values"
        )
    return image


@dataclass(frozen=True)
class ImageFile:
    """An image as :func:`read_image` read it, before any reshaping.

    Attributes:
        image: the SimpleITK image, any dimension.
        source_format: ``"nifti"``, ``"metaimage"``, ``"nrrd"`` or ``"dicom"``.
        nifti_header: the raw NIfTI-1 header when nibabel agrees on the grid, else None.
    """

    image: sitk.Image
    source_format: str
    nifti_header: bytes | None = field(default=None, repr=False)


def read_image(path: str | os.PathLike) -> ImageFile:
    """Read a volume file or DICOM folder with every integrity check: the one reading path of
    every command (``predict`` through :func:`read_volume`; ``train``, ``evaluate`` and
    ``prepare`` through :mod:`hsam.data.formats`).

    Refused with a :class:`DataError` naming the file: a missing path, an unsupported
    extension, NIfTI-2, a truncated or corrupt file, NaN/inf voxels, a DICOM series with
    unreadable slices or uneven slice positions. The image keeps its dimension (2-D, 4-D and
    vector images are for the caller to accept or refuse).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; check the path")
    if path.is_dir():
        return ImageFile(image=read_dicom_series(path), source_format="dicom")
    if path.name.lower().endswith(".nhdr"):  # detached NRRD header (nnU-Net datasets); read only
        ext, fmt = ".nhdr", "nrrd"
    else:
        ext = require_extension(path, "input")
        fmt = EXTENSION_FORMATS[ext]
    nifti = check_nifti(path) if fmt == "nifti" else None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        hint = " (the data file named in a .mhd must sit next to it)" if ext == ".mhd" else ""
        raise DataError(
            f"cannot read {path}: {itk_message(exc)}; the file is corrupt, truncated or "
            f"not a valid {fmt} volume{hint}"
        ) from exc
    if fmt != "nifti" and image.GetPixelID() in _FLOAT_PIXEL_IDS:
        check_finite(sitk.GetArrayViewFromImage(image), str(path))
    header = nifti_header_bytes(nifti, image, path) if nifti is not None else None
    return ImageFile(image=image, source_format=fmt, nifti_header=header)


_FLOAT_PIXEL_IDS = frozenset(
    {sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64}
)


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3-D volume with its exact geometry.

    Args:
        path: a ``.nii``/``.nii.gz``/``.mha``/``.mhd``/``.nrrd`` file, or a folder holding one
            DICOM series.

    Returns:
        :class:`Volume` with ``array`` ``(D, H, W)`` in SimpleITK order (no reorientation),
        ``spacing`` ``(D, H, W)`` mm and the :class:`Geometry`. A 4-D file whose 4th dimension
        has size 1 is read as 3-D.

    Raises:
        DataError: everything :func:`read_image` refuses, a 2-D or genuinely 4-D image, or a
            vector/colour image.
    """
    path = Path(path)
    read = read_image(path)
    image = _ensure_3d(read.image, path)
    geometry = Geometry.from_image(
        image,
        source_format=read.source_format,
        source_path=str(path),
        nifti_header=read.nifti_header,
    )
    try:
        array = sitk.GetArrayFromImage(image)
    except RuntimeError as exc:  # pragma: no cover - lazy readers may fail here
        raise DataError(f"cannot read the voxels of {path}: {itk_message(exc)}") from exc
    logger.debug("read %s: shape %s spacing %s", path, array.shape, geometry.spacing_dhw)
    return Volume(array=array, spacing=geometry.spacing_dhw, geometry=geometry, path=path)


def list_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand user-given paths into a sorted, de-duplicated list of readable inputs.

    A file must have a supported extension. A folder expands to the volume files directly in
    it (hidden files skipped, sorted by name); a folder without volume files that holds a
    DICOM series is itself one input; otherwise its sub-folders holding DICOM series are.

    Raises:
        DataError: a path does not exist, has an unsupported extension, or a folder holds
            nothing readable.
    """
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise DataError(f"input {p} does not exist; check the path")
        if p.is_file():
            require_extension(p, "input")
            found.append(p)
            continue
        entries = sorted(e for e in p.iterdir() if not e.name.startswith("."))
        files = [e for e in entries if e.is_file() and volume_extension(e)]
        if files:
            found.extend(files)
        elif is_dicom_series(p):
            found.append(p)
        else:
            series = [e for e in entries if e.is_dir() and is_dicom_series(e)]
            if not series:
                raise DataError(
                    f"input folder {p} holds no volume files ({', '.join(SUPPORTED_EXTENSIONS)})"
                    " and no DICOM series; point to the files or the series folders"
                )
            found.extend(series)
    unique: list[Path] = []
    seen: set[Path] = set()
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique
