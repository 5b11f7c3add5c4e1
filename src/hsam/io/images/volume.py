"""Volume files and grids: the supported extensions, :class:`Geometry` (the voxel grid an
output must be written on) and :class:`Volume` (an array with its grid), and the checks every
reader shares. No reading or writing here (see :mod:`hsam.io.images`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813

from hsam.errors import DataError

#: Volume file extensions that can be read and written (lower case, ``.nii.gz`` first).
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
#: The format of each supported extension (it picks the reader and the writer).
EXTENSION_FORMATS = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".mha": "metaimage",
    ".mhd": "metaimage",
    ".nrrd": "nrrd",
}
#: Extension used for outputs of a DICOM-series input.
DICOM_OUTPUT_EXTENSION = ".nii.gz"


def volume_extension(path: str | os.PathLike) -> str:
    """The supported volume extension of ``path`` (e.g. ``".nii.gz"``), or ``""`` if none."""
    name = Path(path).name.lower()
    for ext in SUPPORTED_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    return ""


def require_extension(path: Path, what: str) -> str:
    """:func:`volume_extension` of ``path``; a DataError naming ``what`` (input/output) when
    it has none."""
    ext = volume_extension(path)
    if not ext:
        raise DataError(
            f"{what} {path} has an unsupported extension; use one of "
            f"{', '.join(SUPPORTED_EXTENSIONS)} (or a folder holding one DICOM series)"
        )
    return ext


# --------------------------------------------------------------------------------------------
# geometry and volume
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """The voxel grid of a volume, enough to write a label map on exactly the same grid.

    Attributes (SimpleITK conventions, x fastest):
        size: ``(W, H, D)`` = SimpleITK ``GetSize()``.
        spacing: ``(x, y, z)`` spacing in mm = ``GetSpacing()``.
        origin: physical position of voxel ``(0, 0, 0)`` in mm, LPS = ``GetOrigin()``.
        direction: 9 direction cosines, row-major 3x3, LPS = ``GetDirection()``.
        pixel_type: the input's pixel type (``GetPixelIDTypeAsString()``), for the record.
        source_format: ``"nifti"``, ``"metaimage"``, ``"nrrd"``, ``"dicom"`` or ``"array"``.
        source_path: where it was read from (``""`` if built in memory).
        nifti_header: the input's raw NIfTI-1 header (348 bytes) or None.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    pixel_type: str = "8-bit unsigned integer"
    source_format: str = "array"
    source_path: str = ""
    nifti_header: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(D, H, W)`` of a volume on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def spacing_dhw(self) -> tuple[float, float, float]:
        """Spacing in array order ``(D, H, W)`` in mm (what :mod:`hsam.evaluation.metrics`
        expects)."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @classmethod
    def from_image(
        cls,
        image: sitk.Image,
        *,
        source_format: str = "array",
        source_path: str = "",
        nifti_header: bytes | None = None,
    ) -> Geometry:
        """Geometry of a 3-D SimpleITK image."""
        if image.GetDimension() != 3:
            raise DataError(f"need a 3-D image for a geometry, got {image.GetDimension()}-D")
        return cls(
            size=tuple(int(s) for s in image.GetSize()),  # type: ignore[arg-type]
            spacing=tuple(float(s) for s in image.GetSpacing()),  # type: ignore[arg-type]
            origin=tuple(float(o) for o in image.GetOrigin()),  # type: ignore[arg-type]
            direction=tuple(float(d) for d in image.GetDirection()),
            pixel_type=image.GetPixelIDTypeAsString(),
            source_format=source_format,
            source_path=source_path,
            nifti_header=nifti_header,
        )

    @classmethod
    def default(cls, shape: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Geometry:
        """Identity-direction, zero-origin grid for an array ``shape`` ``(D, H, W)`` and
        ``spacing`` ``(D, H, W)`` -- for data that carry no geometry (e.g. ``.npy.h5``)."""
        if len(shape) != 3 or len(spacing) != 3:
            raise DataError(f"shape and spacing must have 3 values, got {shape}, {spacing}")
        d, h, w = (int(s) for s in shape)
        sd, sh, sw = (float(s) for s in spacing)
        return cls((w, h, d), (sw, sh, sd), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this grid's spacing, origin and direction on a 3-D ``image`` (in place)."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def matches(self, other: Geometry, *, atol: float = 1e-6) -> bool:
        """Same size, and spacing/origin/direction equal within ``atol``."""
        return (
            tuple(self.size) == tuple(other.size)
            and np.allclose(self.spacing, other.spacing, rtol=0, atol=atol)
            and np.allclose(self.origin, other.origin, rtol=0, atol=atol)
            and np.allclose(self.direction, other.direction, rtol=0, atol=atol)
        )


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3-D volume as read from disk.

    Attributes:
        array: ``(D, H, W)`` numpy array in the file's pixel type, not reoriented.
        spacing: ``(D, H, W)`` spacing in mm (reverse of SimpleITK's ``GetSpacing()``).
        geometry: the grid, for writing outputs on exactly the same grid.
        path: the file or DICOM folder it came from.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    geometry: Geometry
    path: Path


def itk_message(exc: BaseException) -> str:
    """The informative line of a SimpleITK/ITK exception (its text is many lines long)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "ERROR" in ln or "error" in ln or "exception" in ln.lower():
            return ln[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def check_finite(array: np.ndarray, where: str) -> None:
    """Refuse an image with NaN or infinite voxels; ``where`` (the file) starts the message."""
    finite = np.isfinite(array)
    if not finite.all():
        n_bad = int(finite.size - np.count_nonzero(finite))
        raise DataError(
            f"{where}: image contains {n_bad} NaN/inf voxel(s). Fix or re-export the volume "
            "(e.g. replace NaN by the background value) before using it."
        )
