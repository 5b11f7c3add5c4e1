"""``acdc``: the SSL4MIS release of ACDC (cardiac cine MRI).

Layout: ``data/<frame>.h5`` (3-D, already ``(D, H, W)``), ``data/slices/<frame>_slice_N.h5``
(2-D training slices), optional ``train.list``/``val.list``. Images are per-volume min-max
normalised; spacing is not stored and set to ``(1, 1, 1)``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from hsam.data.case import Case
from hsam.data.formats.base import DatasetFormat, SliceFiles
from hsam.data.formats.common import h5_arrays, ids_from_lists, resolve_ids, to_label
from hsam.errors import DataError
from hsam.io.images import check_finite

logger = logging.getLogger(__name__)

__all__ = ["ACDC", "ACDC_LABELS", "read_acdc", "read_acdc_slice", "read_acdc_volume"]

ACDC_LABELS: dict[int, str] = {
    0: "background",
    1: "right_ventricle",
    2: "myocardium",
    3: "left_ventricle",
}

_ACDC_SPACING_LOGGED = False
_ACDC_SLICE_RE = re.compile(r"^(?P<frame>.+)_slice_(?P<n>\d+)$")


def read_acdc_slice(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one SSL4MIS ACDC training slice ``data/slices/<frame>_slice_N.h5``.

    Returns:
        ``(image, label)``: float32 ``(H, W)`` in [0, 1] and uint8 ``(H, W)`` in 0..3.
    """
    path = Path(path)
    arrays = h5_arrays(path, ["image", "label"])
    image = np.asarray(arrays["image"], dtype=np.float32)
    label = to_label(arrays["label"], str(path))
    if image.ndim != 2 or image.shape != label.shape:
        raise DataError(
            f"{path}: image {image.shape} and label {label.shape} must be equal 2-D shapes."
        )
    check_finite(image, str(path))
    if label.max() > 3:
        raise DataError(
            f"{path}: label values {sorted(set(np.unique(label).tolist()) - {0, 1, 2, 3})} are "
            "outside 0..3 (ACDC has 3 foreground classes)."
        )
    return image, label


def read_acdc_volume(path: str | Path, case_id: str | None = None) -> Case:
    """Read one SSL4MIS ACDC 3-D frame ``data/<frame>.h5``, already ``(D, H, W)``.

    Images are per-volume min-max normalised by SSL4MIS (``intensity="minmax"``). The files
    store no spacing: ``spacing`` is ``(1, 1, 1)`` (voxel units).
    """
    path = Path(path)
    arrays = h5_arrays(path, ["image"], ["label"])
    image = np.asarray(arrays["image"], dtype=np.float32)
    check_finite(image, str(path))
    label = to_label(arrays["label"], str(path)) if "label" in arrays else None
    case = Case(
        case_id=case_id or path.stem,
        image=image,
        label=label,
        spacing=(1.0, 1.0, 1.0),
        label_names=dict(ACDC_LABELS),
        intensity="minmax",
        source=str(path),
    )
    return case.validate(3)


def _acdc_from_slices(slice_dir: Path, frame: str) -> Case:
    paths = []
    for p in slice_dir.glob(f"{frame}_slice_*.h5"):
        m = _ACDC_SLICE_RE.match(p.stem)
        if m and m.group("frame") == frame:
            paths.append((int(m.group("n")), p))
    if not paths:
        raise DataError(
            f"ACDC frame {frame!r}: neither data/{frame}.h5 nor data/slices/{frame}_slice_*.h5 "
            f"exists under {slice_dir.parent}; check the id against train.list/val.list."
        )
    paths.sort()
    numbers = [n for n, _ in paths]
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise DataError(
            f"ACDC frame {frame!r}: slice files {slice_dir}/{frame}_slice_N.h5 have gaps "
            f"(N = {numbers}); the volume cannot be stacked. Restore the missing slices."
        )
    images, labels = [], []
    for _, p in paths:
        img, lab = read_acdc_slice(p)
        if images and img.shape != images[0].shape:
            raise DataError(f"{p}: slice shape {img.shape} differs from {images[0].shape}.")
        images.append(img)
        labels.append(lab)
    case = Case(
        case_id=frame,
        image=np.stack(images),
        label=np.stack(labels),
        spacing=(1.0, 1.0, 1.0),
        label_names=dict(ACDC_LABELS),
        intensity="minmax",
        source=str(slice_dir / f"{frame}_slice_*.h5"),
    )
    return case.validate(3)


def _acdc_data_dir(root: Path) -> Path:
    data_dir = root / "data" if (root / "data").is_dir() else root
    if not data_dir.is_dir():
        raise DataError(f"ACDC root {root} does not exist; point it at the folder with data/.")
    return data_dir


def _ids_acdc(root: Path) -> list[str]:
    listed = ids_from_lists([root / "train.list", root / "val.list"])
    if listed is not None:
        return listed
    return sorted(p.stem for p in _acdc_data_dir(root).glob("*.h5"))


def read_acdc(root: str | Path, ids: Iterable[str] | None = None) -> list[Case]:
    """Read SSL4MIS ACDC frames (``patientXXX_frameYY``) under ``root`` (holding ``data/``).

    A frame with a 3-D file ``data/<frame>.h5`` is read from it; a frame that exists only as
    2-D training slices ``data/slices/<frame>_slice_N.h5`` is stacked in slice order N
    (``image[d]`` is the file with the d-th smallest N; in the SSL4MIS files N starts at 1, so
    ``d = N - 1``; gaps in N are an error).
    ``ids`` default to ``train.list`` then ``val.list`` (file order), or every ``data/*.h5``.
    Spacing is unknown in this layout and set to ``(1, 1, 1)``.
    """
    root = Path(root)
    data_dir = _acdc_data_dir(root)
    case_ids = resolve_ids(ids, lambda: _ids_acdc(root))
    global _ACDC_SPACING_LOGGED
    if not _ACDC_SPACING_LOGGED:
        logger.info("ACDC (SSL4MIS layout) stores no voxel spacing; using (1, 1, 1)")
        _ACDC_SPACING_LOGGED = True
    cases = []
    for cid in case_ids:
        vol = data_dir / f"{cid}.h5"
        if vol.is_file():
            cases.append(read_acdc_volume(vol, cid))
        else:
            cases.append(_acdc_from_slices(data_dir / "slices", cid))
    return cases


def _detect_acdc(root: Path) -> bool:
    data = root / "data"
    return data.is_dir() and (any(data.glob("*.h5")) or (data / "slices").is_dir())


def _acdc_slice_folder(root: Path) -> Path:
    """Where a slice list's ``<frame>_slice_N.h5`` files are: ``root/data/slices``, or
    ``root`` itself when it has no ``data/`` folder."""
    return root / "data" / "slices" if (root / "data").is_dir() else root


ACDC = DatasetFormat(
    name="acdc",
    list_cases=_ids_acdc,
    read_cases=read_acdc,
    detect=_detect_acdc,
    slice_files=SliceFiles(
        suffixes=(".h5", ".hdf5"),
        folder=_acdc_slice_folder,
        read=read_acdc_slice,
        intensity="minmax",
    ),
)
