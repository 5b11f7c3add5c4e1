"""Readers for the dataset layouts of the H-SAM literature, all returning :class:`Case` objects.

Every reader converts to the ``(D, H, W)`` convention of :mod:`hsam.data.case` (2-D slices along
axis 0, spacing in mm along ``(D, H, W)``), returns float32 images and uint8 labels, and
validates each case (shapes, finite intensities, label range) with a :class:`DataError` that
names the file. Per-format axis conventions:

==============  =========================================  ==================================
format          file layout                                 axes on disk -> (D, H, W)
==============  =========================================  ==================================
``synapse``     ``test_vol_h5/caseXXXX.npy.h5`` (+ 2-D       already ``(D, H, W)`` (TransUNet
                ``train_npz/caseXXXX_sliceNNN.npz``)          transposed NIfTI ``(x,y,z)`` to
                                                             ``(z,y,x)``); spacing unknown
``la``          ``2018LA_Seg_Training Set/<ID>/              ``(X, Y, Z)`` -> ``(Z, X, Y)``
                mri_norm2.h5``                               (axial slices along Z)
``acdc``        ``data/<frame>.h5`` (3-D), ``data/slices/    already ``(D, H, W)``; spacing
                <frame>_slice_N.h5`` (2-D)                   unknown
``promise12``   ``CaseXX.mhd`` + ``CaseXX_segmentation.mhd``  SimpleITK ``(z, y, x)``
``nnunet``      ``imagesTr/C_0000.ext``, ``labelsTr/C.ext``,  SimpleITK ``(z, y, x)``
                ``dataset.json``
``prepared``    ``cases/<id>.npz`` + ``dataset.json``         as written by
                                                             :func:`hsam.data.prepare.prepare`
==============  =========================================  ==================================
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hsam.data.case import Case
from hsam.data.slices import parse_slice_id, synapse_slice_dir
from hsam.errors import DataError
from hsam.imageio import check_finite, read_image

logger = logging.getLogger(__name__)

__all__ = [
    "ACDC_LABELS",
    "CT_WINDOW",
    "FORMATS",
    "LA_LABELS",
    "PROMISE12_LABELS",
    "SYNAPSE_LABELS_SAMED",
    "SYNAPSE_LABELS_TRANSUNET",
    "apply_intensity",
    "ct_window",
    "minmax",
    "list_cases",
    "read_acdc",
    "read_acdc_slice",
    "read_acdc_volume",
    "read_case_npz",
    "read_dataset",
    "read_la",
    "read_la_case",
    "read_list",
    "read_nnunet",
    "read_prepared",
    "read_promise12",
    "read_sitk_case",
    "read_synapse",
    "read_synapse_slice",
    "read_synapse_training_volume",
    "read_synapse_volume",
    "zscore",
]

#: Default CT window in HU (TransUNet/SAMed/H-SAM Synapse preprocessing).
CT_WINDOW = (-125.0, 275.0)

#: Ids produced by the SAMed/H-SAM raw-Synapse preprocessing (also the names H-SAM's test.py
#: prints): raw 1, 2, 3, 4, 6, 7, 8, 11 -> 1..8. See :data:`hsam.data.prepare.SYNAPSE_REMAP`.
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
LA_LABELS: dict[int, str] = {0: "background", 1: "left_atrium"}
ACDC_LABELS: dict[int, str] = {
    0: "background",
    1: "right_ventricle",
    2: "myocardium",
    3: "left_ventricle",
}
PROMISE12_LABELS: dict[int, str] = {0: "background", 1: "prostate"}

LA_SPACING = (0.625, 0.625, 0.625)
_LA_DIR = "2018LA_Seg_Training Set"
_LA_FILE = "mri_norm2.h5"
_SITK_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


# --------------------------------------------------------------------------- intensity


def ct_window(x: np.ndarray, lo: float = CT_WINDOW[0], hi: float = CT_WINDOW[1]) -> np.ndarray:
    """Clip HU values to ``[lo, hi]`` and map linearly to ``[0, 1]`` (float32, any shape)."""
    if not hi > lo:
        raise DataError(f"CT window [{lo}, {hi}] is empty; the upper bound must exceed the lower.")
    x = np.asarray(x, dtype=np.float32)
    return ((np.clip(x, lo, hi) - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)


def zscore(x: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` over the whole array (float32, any shape); constant -> zeros."""
    x = np.asarray(x, dtype=np.float32)
    mean = float(x.mean(dtype=np.float64))
    std = float(x.std(dtype=np.float64))
    if std == 0.0:
        return (x - np.float32(mean)).astype(np.float32)
    return ((x - np.float32(mean)) / np.float32(std)).astype(np.float32)


def minmax(x: np.ndarray) -> np.ndarray:
    """Map ``[min, max]`` of the whole array linearly to ``[0, 1]``; constant -> zeros."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        return np.zeros_like(x, dtype=np.float32)
    return ((x - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)


_WINDOW_RE = re.compile(r"^ct_window\[\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\]$")


def ct_window_spec(lo: float = CT_WINDOW[0], hi: float = CT_WINDOW[1]) -> str:
    """The :attr:`Case.intensity` string of a CT window, e.g. ``"ct_window[-125,275]"``."""
    return f"ct_window[{lo:g},{hi:g}]"


def apply_intensity(x: np.ndarray, spec: str) -> np.ndarray:
    """Apply the preprocessing named by ``spec`` (a :attr:`Case.intensity` string) to raw data.

    This is what ``predict`` reapplies to a new scan: ``"ct_window[lo,hi]"`` ->
    :func:`ct_window`, ``"zscore"`` -> :func:`zscore`, ``"minmax"`` -> :func:`minmax`,
    ``"none"`` -> float32 copy.
    """
    match = _WINDOW_RE.match(spec.strip())
    if match:
        return ct_window(x, float(match.group(1)), float(match.group(2)))
    if spec == "zscore":
        return zscore(x)
    if spec == "minmax":
        return minmax(x)
    if spec == "none":
        return np.asarray(x, dtype=np.float32).copy()
    raise DataError(
        f"unknown intensity preprocessing {spec!r}; use 'ct_window[lo,hi]', 'zscore', "
        "'minmax' or 'none'."
    )


# --------------------------------------------------------------------------- helpers


def check_case_id(case_id: str, where: str) -> str:
    """Refuse an id that is a path: ids name files and folders inside the dataset root, and
    one like ``../../x`` or ``/etc/x`` would make a reader open a file outside it.

    Raises:
        DataError: an id with ``/``, ``\\`` or a NUL byte, or ``.``/``..``, naming ``where``.
    """
    if case_id in (".", "..") or any(c in case_id for c in "/\\\0"):
        raise DataError(
            f"{where}: id {case_id!r} is a path, not a case or slice id; ids name files inside "
            "the dataset root and may not contain '/', '\\' or be '.' or '..'. Fix the list."
        )
    return case_id


def read_list(path: str | Path) -> list[str]:
    """Read a list file: one id a line; blank lines and ``#`` comments are ignored.

    Raises:
        DataError: if the file is missing, lists no id, or an id is a path
            (:func:`check_case_id`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"list file {path} does not exist; check the dataset root or list name.")
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(check_case_id(line, f"list file {path} line {number}"))
    if not ids:
        raise DataError(f"list file {path} is empty; it must name at least one case or slice.")
    return ids


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist; check the dataset root and the case id.")
    return path


def _to_label(arr: np.ndarray, where: str) -> np.ndarray:
    """Convert an integer-valued label array (any dtype) to uint8, refusing fractions/ranges."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise DataError(f"{where}: label contains NaN/inf values; labels must be integers.")
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            frac = np.unique(arr[rounded != arr])[:5].tolist()
            raise DataError(
                f"{where}: label has non-integer values (e.g. {frac}); it was probably "
                "resampled with linear interpolation. Re-export it with nearest neighbour."
            )
        arr = rounded
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi > 255:
        raise DataError(
            f"{where}: label values range {int(lo)}..{int(hi)}, outside 0..255. Remap the class "
            "ids to 0..K first."
        )
    return arr.astype(np.uint8)


def _h5_arrays(path: Path, keys: Sequence[str], optional: Sequence[str] = ()) -> dict:
    import h5py

    _require_file(path, "HDF5 file")
    out: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as f:
            for key in (*keys, *optional):
                if key in f:
                    out[key] = f[key][()]
                    kind = getattr(out[key], "dtype", np.dtype(object)).kind
                    if kind not in "biuf":  # strings, objects, compound records
                        raise DataError(
                            f"{path}: dataset {key!r} holds {out[key].dtype} values, not "
                            "numbers; the file is not in the expected layout."
                        )
                elif key in keys:
                    raise DataError(
                        f"{path}: no dataset {key!r} (found {sorted(f.keys())}); the file is "
                        "not in the expected layout."
                    )
    except OSError as exc:
        raise DataError(f"{path}: cannot read HDF5 ({exc}); the file is corrupt.") from exc
    return out


def _resolve_ids(ids: Iterable[str] | None, default: Callable[[], list[str]]) -> list[str]:
    if ids is None:
        out = default()
    elif isinstance(ids, str):
        out = [ids]
    else:
        out = list(ids)
    if not out:
        raise DataError("no case ids to read (the id list is empty); name at least one case.")
    return [check_case_id(str(i), "case ids to read") for i in out]


def _dataset_json(root: Path) -> dict | None:
    path = root / "dataset.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc}); fix or regenerate the file.") from exc
    if not isinstance(meta, dict):
        raise DataError(
            f"{path}: expected a JSON object (with 'labels' etc.), found a "
            f"{type(meta).__name__}; fix or regenerate the file."
        )
    return meta


def _labels_from_json(meta: dict, path: Path) -> dict[int, str]:
    """Parse ``labels``: nnU-Net v2 ``{name: int}`` or MSD/v1 ``{"0": name}``."""
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: 'labels' must be a non-empty mapping of class name -> id.")
    names: dict[int, str] = {}
    if all(isinstance(v, str) for v in raw.values()) and all(str(k).isdigit() for k in raw):
        names = {int(k): str(v) for k, v in raw.items()}
    else:
        for name, value in raw.items():
            if isinstance(value, (list, tuple)):
                raise DataError(
                    f"{path}: label {name!r} is a region {value}; region-based labels are not "
                    "supported. Give each class one integer id."
                )
            try:
                names[int(value)] = str(name)
            except (TypeError, ValueError) as exc:
                raise DataError(f"{path}: label {name!r} has non-integer id {value!r}.") from exc
    names.setdefault(0, "background")
    return dict(sorted(names.items()))


def _num_classes(names: dict[int, str]) -> int:
    return max((k for k in names if k > 0), default=0)


# --------------------------------------------------------------------------- Synapse


def read_synapse_slice(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one TransUNet training slice ``caseXXXX_sliceNNN.npz``.

    Returns:
        ``(image, label)``: float32 ``(H, W)`` in [0, 1] (CT window already applied) and uint8
        ``(H, W)``.
    """
    path = _require_file(Path(path), "Synapse slice")
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
    return image, _to_label(label, str(path))


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
    arrays = _h5_arrays(path, ["image"], ["label"])
    image = np.asarray(arrays["image"], dtype=np.float32)
    check_finite(image, str(path))
    label = _to_label(arrays["label"], str(path)) if "label" in arrays else None
    name = path.name
    case_id = name[: -len(".npy.h5")] if name.endswith(".npy.h5") else path.stem
    names = dict(label_names or SYNAPSE_LABELS_TRANSUNET)
    case = Case(
        case_id=case_id,
        image=image,
        label=label,
        spacing=tuple(float(s) for s in spacing) if spacing else (1.0, 1.0, 1.0),
        label_names=names,
        intensity=ct_window_spec(),
        source=str(path),
    )
    return case.validate(num_classes if num_classes is not None else _num_classes(names))


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
    case_ids = _resolve_ids(ids, lambda: _ids_synapse(root))
    meta = _dataset_json(root)
    names = _labels_from_json(meta, root / "dataset.json") if meta else None
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
        intensity=ct_window_spec(),
        source=str(slices[indices[0]].parent),
    )
    return case.validate(num_classes if num_classes is not None else _num_classes(names))


# --------------------------------------------------------------------------- LA


def _la_root(root: Path) -> Path:
    if (root / _LA_DIR).is_dir():
        return root / _LA_DIR
    if root.is_dir():
        return root
    raise DataError(f"LA root {root} does not exist; point it at the folder holding {_LA_DIR!r}.")


def _ids_from_lists(lists: Sequence[Path]) -> list[str] | None:
    """Union of the ids in the existing list files (file order), or None if none exists."""
    if not any(p.is_file() for p in lists):
        return None
    out: list[str] = []
    for p in lists:
        if p.is_file():
            out += [i for i in read_list(p) if i not in out]
    return out


def _ids_la(root: Path) -> list[str]:
    listed = _ids_from_lists([root / "train.list", root / "test.list"])
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
    arrays = _h5_arrays(path, ["image"], ["label"])
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
        label = np.ascontiguousarray(np.transpose(_to_label(lab, str(path)), (2, 0, 1)))
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
    case_ids = _resolve_ids(ids, lambda: _ids_la(root))
    return [read_la_case(data_dir / cid / _LA_FILE, cid) for cid in case_ids]


# --------------------------------------------------------------------------- ACDC

_ACDC_SPACING_LOGGED = False
_ACDC_SLICE_RE = re.compile(r"^(?P<frame>.+)_slice_(?P<n>\d+)$")


def read_acdc_slice(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one SSL4MIS ACDC training slice ``data/slices/<frame>_slice_N.h5``.

    Returns:
        ``(image, label)``: float32 ``(H, W)`` in [0, 1] and uint8 ``(H, W)`` in 0..3.
    """
    path = Path(path)
    arrays = _h5_arrays(path, ["image", "label"])
    image = np.asarray(arrays["image"], dtype=np.float32)
    label = _to_label(arrays["label"], str(path))
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
    arrays = _h5_arrays(path, ["image"], ["label"])
    image = np.asarray(arrays["image"], dtype=np.float32)
    check_finite(image, str(path))
    label = _to_label(arrays["label"], str(path)) if "label" in arrays else None
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
    listed = _ids_from_lists([root / "train.list", root / "val.list"])
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
    case_ids = _resolve_ids(ids, lambda: _ids_acdc(root))
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


# --------------------------------------------------------------------------- SimpleITK formats


def _read_sitk(path: Path) -> tuple[np.ndarray, Any, bytes | None]:
    """(array, SimpleITK image, NIfTI-1 header or None) through :func:`hsam.imageio.read_image`,
    the reading path (and checks) of every command."""
    import SimpleITK as sitk  # noqa: N813

    _require_file(path, "image file")
    read = read_image(path)
    return sitk.GetArrayFromImage(read.image), read.image, read.nifti_header


def _sitk_geometry(img: Any) -> tuple[tuple[float, float, float], tuple, tuple]:
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

    Grids are ``(spacing, origin, direction)`` as :func:`_sitk_geometry` returns them. A label
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
    raw, img, nifti_header = _read_sitk(image_path)
    raw = _as_volume(raw, img, image_path)
    image = apply_intensity(raw, intensity)
    spacing, origin, direction = _sitk_geometry(img)
    label = None
    if label_path is not None:
        label_path = Path(label_path)
        lab_arr, lab_img, _ = _read_sitk(label_path)
        lab_arr = _as_volume(lab_arr, lab_img, label_path)
        if lab_arr.shape != image.shape:
            raise DataError(
                f"{label_path}: label shape {lab_arr.shape} (D, H, W) differs from image "
                f"{image_path} shape {image.shape}; they must share one voxel grid."
            )
        check_label_grid(
            image_path, (spacing, origin, direction), label_path, _sitk_geometry(lab_img)
        )
        label = _to_label(lab_arr, str(label_path))
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
    return case.validate(num_classes if num_classes is not None else _num_classes(label_names))


_PROMISE_RE = re.compile(r"^Case\d+$")


def _promise_files(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        raise DataError(f"PROMISE12 root {root} does not exist.")
    return {p.stem: p for p in root.rglob("Case*.mhd") if _PROMISE_RE.match(p.stem)}


def _ids_promise12(root: Path) -> list[str]:
    return sorted(_promise_files(root))


def read_promise12(root: str | Path, ids: Iterable[str] | None = None) -> list[Case]:
    """Read PROMISE12 ``CaseXX.mhd`` (+ ``CaseXX_segmentation.mhd``) under ``root`` (recursive).

    Arrays are SimpleITK ``(z, y, x)`` = ``(D, H, W)`` (transverse slices), spacing from the
    header, each volume z-scored (``intensity="zscore"``). A case without a segmentation file
    (a challenge test case) gets ``label=None``. ``ids`` default to every ``CaseXX`` found.
    """
    root = Path(root)
    found = _promise_files(root)
    cases = []
    for cid in _resolve_ids(ids, lambda: sorted(found)):
        if cid not in found:
            raise DataError(
                f"PROMISE12 case {cid!r}: no {cid}.mhd under {root} (found {len(found)} cases)."
            )
        seg = found[cid].with_name(f"{cid}_segmentation.mhd")
        cases.append(
            read_sitk_case(
                found[cid],
                seg if seg.is_file() else None,
                case_id=cid,
                intensity="zscore",
                label_names=PROMISE12_LABELS,
                num_classes=1,
            )
        )
    return cases


# --------------------------------------------------------------------------- nnU-Net / MSD


def _modality_intensity(meta: dict) -> str:
    channels = meta.get("channel_names") or meta.get("modality") or {}
    first = str(channels.get("0", channels.get(0, ""))) if isinstance(channels, dict) else ""
    kind = first.strip().lower()
    if kind == "ct":
        return ct_window_spec()
    if kind in ("nonorm", "none"):
        return "none"
    if kind in ("rescale_to_0_1", "minmax"):
        return "minmax"
    return "zscore"


def _nnunet_image_files(root: Path, meta: dict) -> dict[str, tuple[Path, Path | None]]:
    """Map case id -> (image file, label file) for nnU-Net v2 or MSD layouts."""
    ending = meta.get("file_ending")
    images = root / "imagesTr"
    labels = root / "labelsTr"
    if not images.is_dir():
        raise DataError(f"nnU-Net root {root}: no imagesTr/ folder.")
    out: dict[str, tuple[Path, Path | None]] = {}
    if ending:
        suffix = "_0000" + ending
        for p in sorted(images.iterdir()):
            if p.name.endswith(suffix) and not p.name.startswith("."):
                cid = p.name[: -len(suffix)]
                lab = labels / f"{cid}{ending}"
                out[cid] = (p, lab if lab.is_file() else None)
        return out
    training = meta.get("training")
    if isinstance(training, list) and training:
        for entry in training:
            img = root / str(entry["image"])
            lab = root / str(entry["label"]) if entry.get("label") else None
            cid = img.name
            for end in _SITK_ENDINGS:
                if cid.endswith(end):
                    cid = cid[: -len(end)]
                    break
            out[cid] = (img, lab)
        return out
    for p in sorted(images.iterdir()):
        if p.name.startswith("."):
            continue
        for end in _SITK_ENDINGS:
            if p.name.endswith(end):
                cid = p.name[: -len(end)]
                cid = cid[: -len("_0000")] if cid.endswith("_0000") else cid
                lab = labels / f"{cid}{end}"
                out[cid] = (p, lab if lab.is_file() else None)
                break
    return out


def _nnunet_meta(root: Path) -> dict:
    meta = _dataset_json(root)
    if meta is None:
        raise DataError(
            f"nnU-Net root {root}: missing {root / 'dataset.json'}; it defines labels and modality."
        )
    return meta


def _ids_nnunet(root: Path, labelled_only: bool = False) -> list[str]:
    files = _nnunet_image_files(root, _nnunet_meta(root))
    return sorted(c for c, (_, lab) in files.items() if lab is not None or not labelled_only)


def read_nnunet(root: str | Path, ids: Iterable[str] | None = None) -> list[Case]:
    """Read an nnU-Net v2 raw dataset (or an MSD task folder).

    Layout: ``imagesTr/<CASE>_0000<file_ending>``, ``labelsTr/<CASE><file_ending>`` and a
    ``dataset.json`` with ``labels`` (name -> id; MSD's id -> name also accepted),
    ``file_ending`` and ``channel_names`` (``modality`` in MSD). Only channel 0 is used.
    Arrays are SimpleITK ``(z, y, x)`` = ``(D, H, W)``; spacing is SimpleITK's reversed.
    Intensity: modality ``CT`` -> CT window [-125, 275] -> [0, 1]; otherwise per-volume z-score.
    A case whose label file is missing gets ``label=None``; ``K`` is the largest label id.
    """
    root = Path(root)
    meta = _nnunet_meta(root)
    names = _labels_from_json(meta, root / "dataset.json")
    intensity = _modality_intensity(meta)
    files = _nnunet_image_files(root, meta)
    cases = []
    for cid in _resolve_ids(ids, lambda: sorted(files)):
        if cid not in files:
            ending = meta.get("file_ending", "")
            raise DataError(
                f"nnU-Net case {cid!r}: no image imagesTr/{cid}_0000{ending} under {root}."
            )
        img, lab = files[cid]
        cases.append(read_sitk_case(img, lab, case_id=cid, intensity=intensity, label_names=names))
    return cases


# --------------------------------------------------------------------------- prepared (.npz)


def read_case_npz(path: str | Path) -> Case:
    """Read one case written by :func:`hsam.data.prepare.save_case_npz` (arrays ``(D, H, W)``)."""
    path = _require_file(Path(path), "case file")
    try:
        with np.load(path, allow_pickle=False) as data:
            image = np.asarray(data["image"], dtype=np.float32)
            label = _to_label(data["label"], str(path)) if "label" in data else None
            spacing = tuple(float(s) for s in data["spacing"])
            names = {int(k): v for k, v in json.loads(str(data["label_names"])).items()}
            intensity = str(data["intensity"])
            source = str(data["source"]) if "source" in data else str(path)
            origin = tuple(float(v) for v in data["origin"]) if "origin" in data else None
            direction = tuple(float(v) for v in data["direction"]) if "direction" in data else None
            header = data["nifti_header"].tobytes() if "nifti_header" in data else None
    except KeyError as exc:
        raise DataError(f"{path}: missing key {exc}; regenerate it with hsam prepare.") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read case .npz ({exc}); the file is corrupt.") from exc
    case = Case(
        case_id=path.stem,
        image=image,
        label=label,
        spacing=spacing,  # type: ignore[arg-type]
        label_names=names,
        intensity=intensity,
        source=source,
        origin=origin,  # type: ignore[arg-type]
        direction=direction,
        nifti_header=header,
    )
    return case.validate(_num_classes(names))


def _ids_prepared(root: Path) -> list[str]:
    case_dir = root / "cases"
    if not case_dir.is_dir():
        raise DataError(f"prepared dataset {root}: no cases/ folder; run hsam prepare first.")
    return sorted(p.stem for p in case_dir.glob("*.npz"))


def read_prepared(root: str | Path, ids: Iterable[str] | None = None) -> list[Case]:
    """Read ``root/cases/<id>.npz`` as written by :func:`hsam.data.prepare.prepare`.

    ``ids`` default to every file in ``cases/`` (sorted).
    """
    root = Path(root)
    case_ids = _resolve_ids(ids, lambda: _ids_prepared(root))
    return [read_case_npz(root / "cases" / f"{cid}.npz") for cid in case_ids]


# --------------------------------------------------------------------------- dispatcher

_READERS: dict[str, Callable[[str | Path, Iterable[str] | None], list[Case]]] = {
    "synapse": read_synapse,
    "la": read_la,
    "acdc": read_acdc,
    "promise12": read_promise12,
    "nnunet": read_nnunet,
    "prepared": read_prepared,
}
#: Formats understood by :func:`read_dataset`.
FORMATS = tuple(_READERS)

_LISTERS: dict[str, Callable[[Path], list[str]]] = {
    "synapse": _ids_synapse,
    "la": _ids_la,
    "acdc": _ids_acdc,
    "promise12": _ids_promise12,
    "nnunet": _ids_nnunet,
    "prepared": _ids_prepared,
}


def _format_key(format: str) -> str:
    key = format.strip().lower()
    if key not in _READERS:
        raise DataError(f"unknown dataset format {format!r}; use one of {', '.join(FORMATS)}.")
    return key


def list_cases(format: str, root: str | Path) -> list[str]:
    """Case ids that :func:`read_dataset` reads when ``ids`` is None, without reading them."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset root {root} does not exist; check the path.")
    return _LISTERS[_format_key(format)](root)


def read_dataset(format: str, root: str | Path, ids: Iterable[str] | None = None) -> list[Case]:
    """Read the cases ``ids`` (default: all, see each reader) of a dataset in ``format``.

    Args:
        format: one of :data:`FORMATS` (``synapse``, ``la``, ``acdc``, ``promise12``,
            ``nnunet``, ``prepared``).
        root: dataset folder.
        ids: case ids, or ``None`` for the reader's default (documented per reader).

    Returns:
        validated cases, in the order of ``ids``.
    """
    key = _format_key(format)
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset root {root} does not exist; check the path.")
    cases = _READERS[key](root, ids)
    logger.debug("read %d %s case(s) from %s", len(cases), key, root)
    return cases
