"""``synapse``: the TransUNet release of Synapse multi-organ CT.

Layout: ``test_vol_h5/caseXXXX.npy.h5`` (3-D, keys ``image``/``label``) and training cases as
2-D slices ``train_npz/caseXXXX_sliceNNN.npz``. Arrays are already ``(D, H, W)`` (TransUNet
transposed NIfTI ``(x, y, z)`` to ``(z, y, x)``), CT-windowed to [0, 1]; spacing unknown unless
a ``dataset.json`` written by :func:`hsam.data.prepare.prepare` records it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from hsam.data.case import Case
from hsam.data.formats.base import DatasetFormat, SliceFiles
from hsam.data.formats.common import (
    dataset_json,
    h5_arrays,
    labels_from_json,
    num_foreground_classes,
    parse_slice_id,
    require_file,
    resolve_ids,
    to_label,
)
from hsam.errors import DataError
from hsam.intensity import DEFAULT_CT_POLICY
from hsam.io.images import check_finite

logger = logging.getLogger(__name__)

__all__ = [
    "SYNAPSE",
    "SYNAPSE_LABELS_SAMED",
    "SYNAPSE_LABELS_TRANSUNET",
    "read_synapse",
    "read_synapse_slice",
    "read_synapse_training_volume",
    "read_synapse_volume",
    "synapse_slice_dir",
]

#: Ids produced by the SAMed/H-SAM raw-Synapse preprocessing (also the names H-SAM's test.py
#: prints): raw 1, 2, 3, 4, 6, 7, 8, 11 -> 1..8.
#: See :data:`hsam.data.prepare_synapse.SYNAPSE_REMAP`.
SYNAPSE_LABELS_SAMED: dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "right_kidney",
    3: "left_kidney",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    7: "aorta",
    8: "pancreas",
}
#: Ids of the TransUNet preprocessed release (``train_npz``/``test_vol_h5`` as downloaded),
#: alphabetical per the TransUNet paper table (see ``reference/peers.md`` §3.5: sources
#: disagree; check organ sizes before trusting per-organ columns).
SYNAPSE_LABELS_TRANSUNET: dict[int, str] = {
    0: "background",
    1: "aorta",
    2: "gallbladder",
    3: "left_kidney",
    4: "right_kidney",
    5: "liver",
    6: "pancreas",
    7: "spleen",
    8: "stomach",
}


def synapse_slice_dir(root: Path) -> Path:
    """Folder of the TransUNet training slices: ``root/train_npz``, or ``root`` itself."""
    return root / "train_npz" if (root / "train_npz").is_dir() else root


def read_synapse_slice(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one TransUNet training slice ``caseXXXX_sliceNNN.npz``.

    Returns:
        ``(image, label)``: float32 ``(H, W)`` in [0, 1] (CT window already applied) and uint8
        ``(H, W)``.
    """
    path = require_file(Path(path), "Synapse slice")
    try:
        with np.load(path) as data:
            if "image" not in data or "label" not in data:
                raise DataError(
                    f"{path}: expected keys 'image' and 'label', found {sorted(data.files)}."
                )
            image = np.asarray(data["image"], dtype=np.float32)
            label = np.asarray(data["label"])
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read .npz ({exc}); the file is corrupt.") from exc
    if image.ndim != 2 or image.shape != label.shape:
        raise DataError(
            f"{path}: image {image.shape} and label {label.shape} must be equal 2-D shapes."
        )
    check_finite(image, str(path))
    return image, to_label(label, str(path))


def read_synapse_volume(
    path: str | Path,
    *,
    label_names: dict[int, str] | None = None,
    spacing: tuple[float, float, float] | None = None,
    num_classes: int | None = None,
) -> Case:
    """Read one TransUNet test volume ``caseXXXX.npy.h5`` (keys ``image``, ``label``).

    Arrays on disk are already ``(D, H, W)`` (TransUNet transposed NIfTI ``(x, y, z)`` to
    ``(z, y, x)``), image in [0, 1] after the CT window [-125, 275]. The file stores no
    spacing, so ``spacing`` defaults to ``(1, 1, 1)`` unless given (or found in a
    ``dataset.json`` written by :func:`hsam.data.prepare.prepare`, see :func:`read_synapse`).
    ``label_names`` default to :data:`SYNAPSE_LABELS_TRANSUNET`.
    """
    path = Path(path)
    arrays = h5_arrays(path, ["image"], ["label"])
    image = np.asarray(arrays["image"], dtype=np.float32)
    check_finite(image, str(path))
    label = to_label(arrays["label"], str(path)) if "label" in arrays else None
    name = path.name
    case_id = name[: -len(".npy.h5")] if name.endswith(".npy.h5") else path.stem
    names = dict(label_names or SYNAPSE_LABELS_TRANSUNET)
    case = Case(
        case_id=case_id,
        image=image,
        label=label,
        spacing=tuple(float(s) for s in spacing) if spacing else (1.0, 1.0, 1.0),
        label_names=names,
        intensity=DEFAULT_CT_POLICY,
        source=str(path),
    )
    return case.validate(num_classes if num_classes is not None else num_foreground_classes(names))


def _synapse_vol_dir(root: Path) -> Path:
    vol_dir = root / "test_vol_h5" if (root / "test_vol_h5").is_dir() else root
    if not vol_dir.is_dir():
        raise DataError(f"Synapse root {root} does not exist.")
    return vol_dir


def _ids_synapse(root: Path) -> list[str]:
    vol_dir = _synapse_vol_dir(root)
    return sorted(p.name[: -len(".npy.h5")] for p in vol_dir.glob("*.npy.h5"))


def read_synapse(root: str | Path, ids: Iterable[str] | None = None) -> list[Case]:
    """Read TransUNet Synapse test volumes from ``root/test_vol_h5`` (or ``root`` itself).

    ``ids`` are ``caseXXXX`` names (default: every ``*.npy.h5`` file, sorted); an id with no
    ``.npy.h5`` file but training slices is rebuilt from them
    (:func:`read_synapse_training_volume`). If ``root``
    holds a ``dataset.json`` (as :func:`hsam.data.prepare.prepare` writes), its ``labels`` and
    per-case ``spacing`` are used; otherwise the TransUNet label names and spacing (1, 1, 1)
    are assumed and logged.
    """
    root = Path(root)
    vol_dir = _synapse_vol_dir(root)
    case_ids = resolve_ids(ids, lambda: _ids_synapse(root))
    meta = dataset_json(root)
    names = labels_from_json(meta, root / "dataset.json") if meta else None
    spacings = (meta or {}).get("spacing", {})
    if meta is None:
        logger.info(
            "%s: no dataset.json; assuming TransUNet label ids and spacing (1, 1, 1) mm", root
        )
    cases = []
    for cid in case_ids:
        sp = spacings.get(cid)
        kwargs: dict[str, Any] = {
            "label_names": names,
            "spacing": tuple(sp) if sp else None,
        }
        path = vol_dir / f"{cid}.npy.h5"
        if path.is_file():
            cases.append(read_synapse_volume(path, **kwargs))
        else:  # training cases of the TransUNet release exist only as 2-D slices
            cases.append(read_synapse_training_volume(root, cid, **kwargs))
    return cases


def _synapse_training_slices(root: Path, case_id: str) -> dict[int, Path]:
    """Slice index -> ``train_npz/<case_id>_sliceNNN.npz`` (empty if there is none)."""
    base = synapse_slice_dir(root)
    found = {}
    for path in base.glob(f"{case_id}_slice*.npz"):
        case, index = parse_slice_id(path.stem)
        if case == case_id:
            found[index] = path
    return found


def read_synapse_training_volume(
    root: str | Path,
    case_id: str,
    *,
    label_names: dict[int, str] | None = None,
    spacing: tuple[float, float, float] | None = None,
    num_classes: int | None = None,
) -> Case:
    """Stack a training case's ``train_npz/<case_id>_sliceNNN.npz`` slices into a volume.

    The TransUNet release ships its training cases only as 2-D slices; this rebuilds one,
    e.g. for a validation case carved from the training cases. Every slice index between
    the first and the last must be present (a partial volume would bias 3-D metrics).
    Returns a ``(D, H, W)`` :class:`Case` like :func:`read_synapse_volume`.
    """
    root = Path(root)
    slices = _synapse_training_slices(root, case_id)
    if not slices:
        raise DataError(
            f"{root}: case {case_id} has neither a test volume ({case_id}.npy.h5) nor training "
            f"slices ({case_id}_sliceNNN.npz); check the case id and data.root."
        )
    indices = sorted(slices)
    missing = sorted(set(range(indices[0], indices[-1] + 1)) - set(indices))
    if missing:
        raise DataError(
            f"{root}: training case {case_id} lacks slices {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, so it cannot be rebuilt as a volume; "
            "carve validation cases whose slices are all present, or set data.val_cases: 0."
        )
    pairs = [read_synapse_slice(slices[i]) for i in indices]
    shapes = {image.shape for image, _ in pairs}
    if len(shapes) > 1:
        raise DataError(f"{root}: slices of {case_id} differ in shape {sorted(shapes)}.")
    names = dict(label_names or SYNAPSE_LABELS_TRANSUNET)
    case = Case(
        case_id=case_id,
        image=np.stack([image for image, _ in pairs]),
        label=np.stack([label for _, label in pairs]),
        spacing=tuple(float(s) for s in spacing) if spacing else (1.0, 1.0, 1.0),
        label_names=names,
        intensity=DEFAULT_CT_POLICY,
        source=str(slices[indices[0]].parent),
    )
    return case.validate(num_classes if num_classes is not None else num_foreground_classes(names))


def _detect_synapse(root: Path) -> bool:
    return (root / "test_vol_h5").is_dir() or any(root.glob("*.npy.h5"))


SYNAPSE = DatasetFormat(
    name="synapse",
    list_cases=_ids_synapse,
    read_cases=read_synapse,
    detect=_detect_synapse,
    slice_files=SliceFiles(
        suffixes=(".npz",),
        folder=synapse_slice_dir,
        read=read_synapse_slice,
        intensity=DEFAULT_CT_POLICY,
    ),
)
