"""``nnunet``: an nnU-Net v2 raw dataset, or a Medical Segmentation Decathlon task folder.

Layout: ``imagesTr/<CASE>_0000<file_ending>``, ``labelsTr/<CASE><file_ending>`` and a
``dataset.json`` (labels, file ending, modality); arrays are SimpleITK ``(z, y, x)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from hsam.data.case import Case
from hsam.data.formats.base import DatasetFormat
from hsam.data.formats.common import dataset_json, labels_from_json, resolve_ids
from hsam.data.formats.sitk import SITK_ENDINGS, read_sitk_case
from hsam.errors import DataError
from hsam.intensity import DEFAULT_CT_POLICY

__all__ = ["NNUNET", "read_nnunet"]


def _modality_intensity(meta: dict) -> str:
    channels = meta.get("channel_names") or meta.get("modality") or {}
    first = str(channels.get("0", channels.get(0, ""))) if isinstance(channels, dict) else ""
    kind = first.strip().lower()
    if kind == "ct":
        return DEFAULT_CT_POLICY
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
            for end in SITK_ENDINGS:
                if cid.endswith(end):
                    cid = cid[: -len(end)]
                    break
            out[cid] = (img, lab)
        return out
    for p in sorted(images.iterdir()):
        if p.name.startswith("."):
            continue
        for end in SITK_ENDINGS:
            if p.name.endswith(end):
                cid = p.name[: -len(end)]
                cid = cid[: -len("_0000")] if cid.endswith("_0000") else cid
                lab = labels / f"{cid}{end}"
                out[cid] = (p, lab if lab.is_file() else None)
                break
    return out


def _nnunet_meta(root: Path) -> dict:
    meta = dataset_json(root)
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
    names = labels_from_json(meta, root / "dataset.json")
    intensity = _modality_intensity(meta)
    files = _nnunet_image_files(root, meta)
    cases = []
    for cid in resolve_ids(ids, lambda: sorted(files)):
        if cid not in files:
            ending = meta.get("file_ending", "")
            raise DataError(
                f"nnU-Net case {cid!r}: no image imagesTr/{cid}_0000{ending} under {root}."
            )
        img, lab = files[cid]
        cases.append(read_sitk_case(img, lab, case_id=cid, intensity=intensity, label_names=names))
    return cases


def _detect_nnunet(root: Path) -> bool:
    return (root / "imagesTr").is_dir()


NNUNET = DatasetFormat(
    name="nnunet",
    list_cases=_ids_nnunet,
    read_cases=read_nnunet,
    detect=_detect_nnunet,
)
