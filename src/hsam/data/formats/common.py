"""Checks and small readers shared by the dataset formats: case ids and list files, label
arrays, HDF5 datasets and ``dataset.json``, and the 2-D slice naming."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from hsam.errors import DataError

__all__ = [
    "check_case_id",
    "dataset_json",
    "h5_arrays",
    "ids_from_lists",
    "labels_from_json",
    "num_foreground_classes",
    "parse_slice_id",
    "read_list",
    "require_file",
    "resolve_ids",
    "slice_id",
    "to_label",
]

_SLICE_ID_RE = re.compile(r"^(?P<case>.+?)_slice_?(?P<n>\d+)$")


def slice_id(case_id: str, index: int) -> str:
    """Upstream slice naming ``<case>_sliceNNN`` (zero-padded to 3 digits)."""
    return f"{case_id}_slice{index:03d}"


def parse_slice_id(name: str) -> tuple[str, int]:
    """``"case0005_slice004"`` or ``"patient001_frame01_slice_3"`` -> ``(case_id, index)``."""
    m = _SLICE_ID_RE.match(name)
    if not m:
        raise DataError(f"slice id {name!r} is not of the form <case>_sliceNNN or <case>_slice_N.")
    return m.group("case"), int(m.group("n"))


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


def ids_from_lists(lists: Sequence[Path]) -> list[str] | None:
    """Union of the ids in the existing list files (file order), or None if none exists."""
    if not any(p.is_file() for p in lists):
        return None
    out: list[str] = []
    for p in lists:
        if p.is_file():
            out += [i for i in read_list(p) if i not in out]
    return out


def resolve_ids(ids: Iterable[str] | None, default: Callable[[], list[str]]) -> list[str]:
    """``ids`` as a checked list (one string is one id); ``default()`` when None."""
    if ids is None:
        out = default()
    elif isinstance(ids, str):
        out = [ids]
    else:
        out = list(ids)
    if not out:
        raise DataError("no case ids to read (the id list is empty); name at least one case.")
    return [check_case_id(str(i), "case ids to read") for i in out]


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist; check the dataset root and the case id.")
    return path


def to_label(arr: np.ndarray, where: str) -> np.ndarray:
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


def h5_arrays(path: Path, keys: Sequence[str], optional: Sequence[str] = ()) -> dict:
    """The numeric datasets ``keys`` (required) and ``optional`` of an HDF5 file."""
    import h5py

    require_file(path, "HDF5 file")
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


def dataset_json(root: Path) -> dict | None:
    """``root/dataset.json`` as a dict, or None where there is none."""
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


def labels_from_json(meta: dict, path: Path) -> dict[int, str]:
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


def num_foreground_classes(names: dict[int, str]) -> int:
    """K: the largest foreground id of a label table."""
    return max((k for k in names if k > 0), default=0)
