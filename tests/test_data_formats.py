"""The dataset-format registry: every format is one record with list, read and detect, and
detection picks the right format on a small layout of each."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from conftest import write_nnunet_dataset
from hsam.data import prepare
from hsam.data.formats import (
    FORMATS,
    REGISTRY,
    DatasetFormat,
    detect_format,
    get_format,
    list_cases,
    read_dataset,
    slice_files_format,
)
from hsam.errors import DataError


def _label(shape: tuple[int, int, int], k: int) -> np.ndarray:
    """Label with classes 1..k in separate corners, so reading keeps every class."""
    lab = np.zeros(shape, np.uint8)
    for c in range(1, k + 1):
        lab[:, c : c + 2, c : c + 2] = c
    return lab


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["image"] = image
        f["label"] = label


def _la(root: Path) -> str:
    xyz = (8, 9, 3)  # (X, Y, Z): read as (Z, X, Y)
    lab = np.zeros(xyz, np.uint8)
    lab[2:5, 3:6, 1] = 1
    _write_h5(root / "2018LA_Seg_Training Set" / "A01" / "mri_norm2.h5", np.ones(xyz), lab)
    return "A01"


def _acdc(root: Path) -> str:
    shape = (3, 8, 9)
    _write_h5(root / "data" / "patient001_frame01.h5", np.ones(shape), _label(shape, 3))
    return "patient001_frame01"


def _synapse(root: Path) -> str:
    shape = (3, 8, 9)
    _write_h5(root / "test_vol_h5" / "case0001.npy.h5", np.ones(shape), _label(shape, 2))
    return "case0001"


def _promise12(root: Path) -> str:
    root.mkdir(parents=True)
    shape = (3, 8, 9)
    sitk.WriteImage(sitk.GetImageFromArray(np.ones(shape, np.float32)), str(root / "Case00.mhd"))
    label = sitk.GetImageFromArray(_label(shape, 1))
    sitk.WriteImage(label, str(root / "Case00_segmentation.mhd"))
    return "Case00"


def _nnunet(root: Path) -> str:
    write_nnunet_dataset(root, n_cases=2)
    return "case0"


def _prepared(root: Path) -> str:
    src = _nnunet(root.parent / "nnunet_source")
    prepare("nnunet", root.parent / "nnunet_source", root, few_shot=1, seed=0, n_val=0)
    return src


LAYOUTS = {
    "la": _la,
    "acdc": _acdc,
    "synapse": _synapse,
    "promise12": _promise12,
    "nnunet": _nnunet,
    "prepared": _prepared,
}


def test_every_format_is_registered_with_list_read_and_detect():
    assert set(FORMATS) == set(LAYOUTS) and tuple(REGISTRY) == FORMATS
    for name, fmt in REGISTRY.items():
        assert isinstance(fmt, DatasetFormat) and fmt.name == name
        assert callable(fmt.list_cases) and callable(fmt.read_cases) and callable(fmt.detect)
        assert get_format(f" {name.upper()} ") is fmt
    with pytest.raises(DataError, match="unknown dataset format 'nifti'; use one of"):
        get_format("nifti")


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_detect_list_and_read_each_layout(tmp_path, name):
    root = tmp_path / name
    case_id = LAYOUTS[name](root)
    assert detect_format(root) == name
    # no other format claims it: detection does not depend on which one is tried first
    assert [n for n, fmt in REGISTRY.items() if fmt.detect(root)] == [name]
    ids = list_cases(name, root)
    assert case_id in ids
    (case,) = read_dataset(name, root, [case_id])
    assert case.case_id == case_id and case.image.ndim == 3 and case.label is not None


def test_detect_refuses_unknown_and_missing_folders(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        detect_format(tmp_path / "stuff")
    with pytest.raises(DataError, match="does not exist"):
        detect_format(tmp_path / "absent")


def test_slice_files_belong_to_the_formats_that_have_them(tmp_path):
    assert slice_files_format("case0005_slice004.npz").name == "synapse"
    assert slice_files_format("patient001_frame01_slice_3.h5").name == "acdc"
    with pytest.raises(DataError, match="unknown slice file type"):
        slice_files_format("case0005_slice004.png")
    having = {n for n, fmt in REGISTRY.items() if fmt.slice_files is not None}
    assert having == {"synapse", "acdc"}
