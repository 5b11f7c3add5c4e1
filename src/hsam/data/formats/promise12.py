"""``promise12``: the PROMISE12 prostate MRI challenge.

Layout: ``CaseXX.mhd`` (+ ``CaseXX_segmentation.mhd``) anywhere under the root; arrays are
SimpleITK ``(z, y, x)`` = ``(D, H, W)``, each volume z-scored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from hsam.data.case import Case
from hsam.data.formats.base import DatasetFormat
from hsam.data.formats.common import resolve_ids
from hsam.data.formats.sitk import read_sitk_case
from hsam.errors import DataError

__all__ = ["PROMISE12", "PROMISE12_LABELS", "read_promise12"]

PROMISE12_LABELS: dict[int, str] = {0: "background", 1: "prostate"}

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
    for cid in resolve_ids(ids, lambda: sorted(found)):
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


def _detect_promise12(root: Path) -> bool:
    return any(root.rglob("Case*.mhd"))


PROMISE12 = DatasetFormat(
    name="promise12",
    list_cases=_ids_promise12,
    read_cases=read_promise12,
    detect=_detect_promise12,
)
