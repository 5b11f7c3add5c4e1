"""``prepare`` of raw Synapse (BTCV) CT into the TransUNet layout, as SAMed/H-SAM preprocess it.

``RawData/Training/img/imgXXXX.nii.gz`` + ``label/labelXXXX.nii.gz`` -> CT window [-125, 275] ->
[0, 1], organ remap :data:`SYNAPSE_REMAP`, training cases as 2-D slices
``train_npz/caseXXXX_sliceNNN.npz`` and the test cases (:data:`SYNAPSE_TEST_CASES`) as
``test_vol_h5/caseXXXX.npy.h5``; ``dataset.json`` records label names and each case's spacing.
Called by :func:`hsam.data.prepare.prepare` inside its temporary output folder.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hsam.data.formats.common import slice_id, to_label
from hsam.data.formats.sitk import check_label_grid, read_sitk, sitk_geometry
from hsam.data.formats.synapse import SYNAPSE_LABELS_SAMED, SYNAPSE_LABELS_TRANSUNET
from hsam.data.prepare_splits import (
    PrepareResult,
    ProgressFn,
    select_training,
    select_validation,
    write_splits,
)
from hsam.data.splits import write_list
from hsam.errors import DataError
from hsam.intensity import DEFAULT_CT_POLICY, ct_window
from hsam.io.atomic import atomic_output, atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "SYNAPSE_REMAP",
    "SYNAPSE_REMAP_TRANSUNET",
    "SYNAPSE_TEST_CASES",
    "is_synapse_raw",
    "prepare_synapse_raw",
    "remap_labels",
]

#: Raw Synapse (BTCV) label id -> training id, as SAMed/H-SAM ``preprocess_data.py`` does:
#: 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 6 -> 5 liver, 7 -> 6 stomach,
#: 8 -> 7 aorta, 11 -> 8 pancreas; 5, 9, 10, 12, 13 -> 0. Names: ``SYNAPSE_LABELS_SAMED``.
SYNAPSE_REMAP: dict[int, int] = {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 11: 8}
#: Alternative order matching the TransUNet paper's alphabetical table
#: (``label_order="transunet"``; names ``SYNAPSE_LABELS_TRANSUNET``).
SYNAPSE_REMAP_TRANSUNET: dict[int, int] = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}
#: TransUNet/SAMed/H-SAM test volumes (12 cases).
SYNAPSE_TEST_CASES = tuple(f"case{n:04d}" for n in (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38))


def remap_labels(label: np.ndarray, mapping: dict[int, int], where: str = "label") -> np.ndarray:
    """Apply ``mapping`` (old id -> new id; ids not in it -> 0) to an integer label array.

    Returns uint8. Raises :class:`DataError` for negative or > 255 values.
    """
    lab = to_label(label, where)
    lut = np.zeros(256, dtype=np.uint8)
    for old, new in mapping.items():
        lut[int(old)] = int(new)
    return lut[lab]


def _save_npz_slice(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, image=image.astype(np.float32), label=label.astype(np.float32))
    atomic_write_bytes(path, buf.getvalue())


def _save_h5_volume(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    import h5py

    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("image", data=image.astype(np.float32))
        f.create_dataset("label", data=label.astype(np.float32))


_SYN_IMG = re.compile(r"^img(\d{4})\.nii(\.gz)?$")


def is_synapse_raw(src: Path) -> bool:
    return any((b / "img").is_dir() for b in (src / "RawData" / "Training", src / "Training", src))


def _synapse_dirs(src: Path) -> tuple[Path, Path]:
    for base in (src / "RawData" / "Training", src / "Training", src):
        if (base / "img").is_dir():
            if not (base / "label").is_dir():
                raise DataError(f"{base}: img/ exists but label/ is missing.")
            return base / "img", base / "label"
    raise DataError(
        f"{src}: no RawData/Training/img folder; point SRC at the Synapse (BTCV) RawData parent."
    )


def prepare_synapse_raw(
    src: Path,
    out: Path,
    *,
    few_shot: str | int | float | None,
    seed: int | None,
    n_val: int,
    test_ids: Sequence[str] | None,
    label_order: str,
    progress: ProgressFn | None,
) -> PrepareResult:
    if label_order not in ("samed", "transunet"):
        raise DataError(f"label_order={label_order!r} must be 'samed' or 'transunet'.")
    remap = SYNAPSE_REMAP if label_order == "samed" else SYNAPSE_REMAP_TRANSUNET
    names = SYNAPSE_LABELS_SAMED if label_order == "samed" else SYNAPSE_LABELS_TRANSUNET
    img_dir, lab_dir = _synapse_dirs(src)
    pairs: dict[str, tuple[Path, Path]] = {}
    for p in sorted(img_dir.iterdir()):
        m = _SYN_IMG.match(p.name)
        if not m:
            continue
        lab = lab_dir / p.name.replace("img", "label", 1)
        if not lab.is_file():
            raise DataError(f"{p}: its label {lab} does not exist.")
        pairs[f"case{m.group(1)}"] = (p, lab)
    if not pairs:
        raise DataError(f"{img_dir}: no imgXXXX.nii.gz files.")
    test = list(SYNAPSE_TEST_CASES if test_ids is None else test_ids)
    test = [c for c in test if c in pairs] if test_ids is None else test
    unknown = [c for c in test if c not in pairs]
    if unknown:
        raise DataError(f"test ids {unknown[:5]} have no image in {img_dir}.")
    pool = [c for c in pairs if c not in test]
    if not pool:
        raise DataError(f"{img_dir}: every case is a test case; the training split is empty.")
    # Decide the split first so that validation cases can be written as volumes.
    depth: dict[str, int] = {}
    for cid in pool:
        import SimpleITK as sitk  # noqa: N813

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(pairs[cid][0]))
        reader.ReadImageInformation()
        depth[cid] = int(reader.GetSize()[2]) if reader.GetDimension() >= 3 else 1

    def slices_of(ids: list[str]) -> list[str]:
        return [slice_id(c, d) for c in ids for d in range(depth[c])]

    train, train_slices, method = select_training(pool, few_shot, seed, slices_of)
    val = select_validation(pool, train, n_val, seed)
    (out / "train_npz").mkdir(parents=True)
    (out / "test_vol_h5").mkdir()
    if val:
        (out / "val_vol_h5").mkdir()
    spacing: dict[str, list[float]] = {}
    all_slices: list[str] = []
    order = [*pool, *test]
    for done, cid in enumerate(order, 1):
        img_path, lab_path = pairs[cid]
        raw, img, _ = read_sitk(img_path)
        lab_raw, lab_img, _ = read_sitk(lab_path)
        if raw.ndim != 3 or lab_raw.shape != raw.shape:
            raise DataError(
                f"{img_path}: image {raw.shape} and label {lab_raw.shape} must be equal 3-D shapes."
            )
        check_label_grid(img_path, sitk_geometry(img), lab_path, sitk_geometry(lab_img))
        lab = to_label(lab_raw, str(lab_path))
        bad = sorted(
            set(np.flatnonzero(np.bincount(lab.ravel(), minlength=256)).tolist()) - set(range(14))
        )
        if bad:
            raise DataError(
                f"{lab_path}: label values {bad} are not Synapse/BTCV organ ids (0..13)."
            )
        image = ct_window(raw)  # (D, H, W) = SimpleITK (z, y, x) = upstream transpose(2, 1, 0)
        label = remap_labels(lab, remap, str(lab_path))
        spacing[cid] = list(sitk_geometry(img)[0])
        if cid in test or cid in val:
            folder = "test_vol_h5" if cid in test else "val_vol_h5"
            _save_h5_volume(out / folder / f"{cid}.npy.h5", image, label)
        else:
            for d in range(image.shape[0]):
                sid = slice_id(cid, d)
                _save_npz_slice(out / "train_npz" / f"{sid}.npz", image[d], label[d])
                all_slices.append(sid)
        if progress is not None:
            progress(done, len(order), cid)
    meta = {
        "name": "Synapse",
        "format": "transunet",
        "source_format": "synapse_raw",
        "source": str(src),
        "labels": {v: k for k, v in names.items()},
        "label_order": label_order,
        "remap": {str(k): v for k, v in remap.items()},
        "channel_names": {"0": "CT"},
        "intensity": DEFAULT_CT_POLICY,
        "spacing": spacing,
    }
    atomic_write_text(out / "dataset.json", json.dumps(meta, indent=2) + "\n")
    lists = out / "lists"
    write_list(lists / "train.txt", all_slices)
    write_list(lists / "test_vol.txt", test)
    fs_slices = train_slices if train_slices is not None else slices_of(train)
    write_list(lists / "train_fewshot.txt", fs_slices)
    manifest, sha = write_splits(
        out,
        train=train,
        train_slices=fs_slices,
        val=val,
        test=test,
        method=method,
        seed=seed,
        sources=[],
        extra={"format": "synapse_raw", "few_shot": few_shot, "label_order": label_order},
    )
    return PrepareResult(out, manifest, sha, len(order), train)
