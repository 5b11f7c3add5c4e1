"""The one internal representation of a labelled (or unlabelled) volume: :class:`Case`.

Axis convention (every reader converts to it, see :mod:`hsam.data.formats`):

- ``image`` and ``label`` are 3-D arrays of shape ``(D, H, W)``;
- ``image[d]`` is the 2-D slice the model sees (axial for CT/MR abdomen and LA, short-axis for
  ACDC, transverse for PROMISE12);
- ``spacing`` is in millimetres along ``(D, H, W)`` (so it is SimpleITK's ``(x, y, z)`` spacing
  reversed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from hsam.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["Case", "INTENSITY_KINDS", "label_values"]

#: Accepted prefixes of :attr:`Case.intensity`.
INTENSITY_KINDS = ("ct_window", "zscore", "minmax", "none")


@dataclass
class Case:
    """One volume with its (optional) label map.

    Attributes:
        case_id: identifier as used in list files (``case0001``, ``patient028_frame01``, ...).
        image: float32 array ``(D, H, W)``; 2-D slices are ``image[d]``.
        label: uint8 array ``(D, H, W)`` with values ``0..K`` (0 = background) or ``None``.
        spacing: voxel size in mm along ``(D, H, W)``; ``(1, 1, 1)`` where the source format
            does not store it (Synapse ``.npy.h5``, SSL4MIS ACDC), which readers log.
        label_names: ``{class_id: name}``, with ``0`` the background.
        intensity: preprocessing already applied to ``image``: ``"ct_window[-125,275]"``,
            ``"zscore"``, ``"minmax"`` or ``"none"``
            (see :func:`hsam.intensity.apply_intensity`).
        source: path the case was read from.
        origin: physical origin in SimpleITK ``(x, y, z)`` order, where the source has one.
        direction: SimpleITK direction cosines (9 floats, row-major), where the source has one.
        nifti_header: the raw NIfTI-1 header of a NIfTI source, so that label maps written on
            this grid keep its qform/sform (see :mod:`hsam.io.images`); None otherwise.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    label_names: dict[int, str] = field(default_factory=lambda: {0: "background"})
    intensity: str = "none"
    source: str = ""
    origin: tuple[float, float, float] | None = None
    direction: tuple[float, ...] | None = None
    nifti_header: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(D, H, W)``."""
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    @property
    def num_slices(self) -> int:
        """Number of 2-D slices ``D``."""
        return int(self.image.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of foreground classes ``K`` named in :attr:`label_names`."""
        return max((k for k in self.label_names if k > 0), default=0)

    def foreground_slices(self) -> list[int]:
        """Indices ``d`` whose label slice ``label[d]`` contains any foreground voxel."""
        if self.label is None:
            return []
        return [int(d) for d in np.flatnonzero(self.label.reshape(self.num_slices, -1).any(1))]

    def validate(self, num_classes: int | None = None) -> Case:
        """Check shapes, dtypes, finiteness and the label range; return ``self``.

        Args:
            num_classes: ``K`` (foreground classes). Label values must lie in ``0..K``. If
                ``None``, the largest id in :attr:`label_names` is used when it has foreground
                entries, otherwise the range is not checked.

        Raises:
            DataError: naming the case and its source, with what is wrong and what to do.
        """
        where = f"case {self.case_id!r} ({self.source or 'no source'})"
        if not isinstance(self.image, np.ndarray) or self.image.ndim != 3:
            shape = getattr(self.image, "shape", None)
            raise DataError(
                f"{where}: image must be a 3-D (D, H, W) array, got shape {shape}. "
                "Add a slice axis for 2-D data (image[None])."
            )
        if min(self.image.shape) == 0:
            raise DataError(f"{where}: image has an empty axis, shape {self.image.shape}.")
        if self.image.dtype != np.float32:
            raise DataError(
                f"{where}: image dtype is {self.image.dtype}, expected float32 "
                "(readers convert; build Case objects with image.astype(np.float32))."
            )
        finite = np.isfinite(self.image)
        if not finite.all():
            n_bad = int(finite.size - np.count_nonzero(finite))
            raise DataError(
                f"{where}: image contains {n_bad} NaN/inf voxel(s). Fix or re-export the "
                "volume (e.g. replace NaN by the background value) before using it."
            )
        if len(self.spacing) != 3 or not all(float(s) > 0 for s in self.spacing):
            raise DataError(f"{where}: spacing {self.spacing} must be three positive mm values.")
        if self.label is None:
            return self
        if not isinstance(self.label, np.ndarray) or self.label.shape != self.image.shape:
            raise DataError(
                f"{where}: label shape {getattr(self.label, 'shape', None)} differs from image "
                f"shape {self.image.shape}. Image and label must be on the same voxel grid."
            )
        if not np.issubdtype(self.label.dtype, np.integer):
            raise DataError(
                f"{where}: label dtype is {self.label.dtype}, expected an integer type (uint8)."
            )
        k = num_classes if num_classes is not None else (self.num_classes or None)
        values = label_values(self.label)
        if k is not None:
            bad = [int(v) for v in values if v < 0 or v > k]
            if bad:
                raise DataError(
                    f"{where}: label values {bad} are outside 0..{k} (K = {k} foreground "
                    f"classes). Remap the label ids or set num_classes to at least {max(bad)}."
                )
        return self


def label_values(label: np.ndarray) -> list[int]:
    """Sorted distinct integer values of a label array (fast for uint8 via bincount)."""
    if label.dtype == np.uint8:
        counts = np.bincount(label.ravel(), minlength=256)
        return [int(v) for v in np.flatnonzero(counts)]
    return [int(v) for v in np.unique(label)]
