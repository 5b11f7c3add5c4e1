"""``la``: the UA-MT release of the 2018 Left Atrium challenge (MRI).

Layout: ``2018LA_Seg_Training Set/<ID>/mri_norm2.h5`` (keys ``image``/``label``, ``(X, Y, Z)``
with axial slices along Z, read as ``(Z, X, Y)``), optional ``train.list``/``test.list``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from hsam.data.case import Case
from hsam.data.formats.base import DatasetFormat
from hsam.data.formats.common import h5_arrays, ids_from_lists, resolve_ids, to_label
from hsam.errors import DataError
from hsam.io.images import check_finite

__all__ = ["LA", "LA_LABELS", "LA_SPACING", "read_la", "read_la_case"]

LA_LABELS: dict[int, str] = {0: "background", 1: "left_atrium"}
LA_SPACING = (0.625, 0.625, 0.625)
_LA_DIR = "2018LA_Seg_Training Set"
_LA_FILE = "mri_norm2.h5"


def _la_root(root: Path) -> Path:
    if (root / _LA_DIR).is_dir():
        return root / _LA_DIR
    if root.is_dir():
        return root
    raise DataError(f"LA root {root} does not exist; point it at the folder holding {_LA_DIR!r}.")


def _ids_la(root: Path) -> list[str]:
    listed = ids_from_lists([root / "train.list", root / "test.list"])
    if listed is not None:
        return listed
    return sorted(p.parent.name for p in _la_root(root).glob(f"*/{_LA_FILE}"))


def read_la_case(path: str | Path, case_id: str | None = None) -> Case:
    """Read one UA-MT LA volume ``<ID>/mri_norm2.h5``.

    On disk ``image``/``label`` are ``(X, Y, Z)`` with axial slices along the last axis; they
    are transposed to ``(Z, X, Y)`` so that ``case.image[z] == h5["image"][:, :, z]``. The
    image is already z-scored by UA-MT (``intensity="zscore"``, not reapplied); spacing is
    0.625 mm isotropic.
    """
    path = Path(path)
    arrays = h5_arrays(path, ["image"], ["label"])
    image = np.asarray(arrays["image"], dtype=np.float32)
    if image.ndim != 3:
        raise DataError(f"{path}: LA image must be 3-D (X, Y, Z), got shape {image.shape}.")
    check_finite(image, str(path))
    image = np.ascontiguousarray(np.transpose(image, (2, 0, 1)))
    label = None
    if "label" in arrays:
        lab = np.asarray(arrays["label"])
        if lab.ndim != 3:
            raise DataError(f"{path}: LA label must be 3-D (X, Y, Z), got shape {lab.shape}.")
        label = np.ascontiguousarray(np.transpose(to_label(lab, str(path)), (2, 0, 1)))
    case = Case(
        case_id=case_id or path.parent.name,
        image=image,
        label=label,
        spacing=LA_SPACING,
        label_names=dict(LA_LABELS),
        intensity="zscore",
        source=str(path),
    )
    return case.validate(1)


def read_la(root: str | Path, ids: Iterable[str] | None = None) -> list[Case]:
    """Read UA-MT LA cases ``<root>/2018LA_Seg_Training Set/<ID>/mri_norm2.h5``.

    ``ids`` default to ``train.list`` then ``test.list`` in ``root`` (file order), or, without
    list files, every ``<ID>`` folder holding ``mri_norm2.h5`` (sorted).
    """
    root = Path(root)
    data_dir = _la_root(root)
    case_ids = resolve_ids(ids, lambda: _ids_la(root))
    return [read_la_case(data_dir / cid / _LA_FILE, cid) for cid in case_ids]


def _detect_la(root: Path) -> bool:
    return (root / _LA_DIR).is_dir() or any(root.glob(f"*/{_LA_FILE}"))


LA = DatasetFormat(name="la", list_cases=_ids_la, read_cases=read_la, detect=_detect_la)
