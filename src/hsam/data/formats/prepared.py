"""``prepared``: volumes written by :func:`hsam.data.prepare.prepare`.

Layout: ``cases/<id>.npz`` (arrays ``(D, H, W)``, see :func:`hsam.data.prepare.save_case_npz`)
and a ``dataset.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from hsam.data.case import Case
from hsam.data.formats.base import DatasetFormat
from hsam.data.formats.common import num_foreground_classes, require_file, resolve_ids, to_label
from hsam.errors import DataError

__all__ = ["PREPARED", "read_case_npz", "read_prepared"]


def read_case_npz(path: str | Path) -> Case:
    """Read one case written by :func:`hsam.data.prepare.save_case_npz` (arrays ``(D, H, W)``)."""
    path = require_file(Path(path), "case file")
    try:
        with np.load(path, allow_pickle=False) as data:
            image = np.asarray(data["image"], dtype=np.float32)
            label = to_label(data["label"], str(path)) if "label" in data else None
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
    return case.validate(num_foreground_classes(names))


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
    case_ids = resolve_ids(ids, lambda: _ids_prepared(root))
    return [read_case_npz(root / "cases" / f"{cid}.npz") for cid in case_ids]


def _detect_prepared(root: Path) -> bool:
    return (root / "cases").is_dir() and (root / "dataset.json").is_file()


PREPARED = DatasetFormat(
    name="prepared",
    list_cases=_ids_prepared,
    read_cases=read_prepared,
    detect=_detect_prepared,
)
