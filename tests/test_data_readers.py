"""Readers on small fixtures written in tmp_path: Synapse npz/h5, PROMISE12 mhd, nnU-Net MHA,
NRRD and MSD; Case validation and the bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from hsam.data import Case, apply_intensity, ct_window, minmax, read_dataset, zscore
from hsam.data.formats import read_list
from hsam.data.formats.synapse import (
    SYNAPSE_LABELS_TRANSUNET,
    read_synapse_slice,
    read_synapse_volume,
)
from hsam.errors import DataError


def _coded_volume(shape: tuple[int, int, int]) -> np.ndarray:
    """(D, H, W) array whose value encodes its index: 100*d + 10*h + w (orientation check)."""
    d, h, w = np.indices(shape)
    return (100 * d + 10 * h + w).astype(np.float32)


def _write_sitk(
    path: Path,
    arr: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    direction: tuple[float, ...] | None = None,
) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)  # arr is (z, y, x)
    img.SetSpacing(spacing)  # (x, y, z)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return img


def _blob_label(shape: tuple[int, int, int], k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, dtype=np.uint8)
    for c in range(1, k + 1):
        d, h, w = (rng.integers(0, s) for s in shape)
        lab[d, max(0, h - 2) : h + 2, max(0, w - 2) : w + 2] = c
    return lab


# --------------------------------------------------------------------------- intensity


def test_intensity_helpers() -> None:
    x = np.array([-1000.0, -125.0, 75.0, 275.0, 3000.0])
    np.testing.assert_allclose(ct_window(x), [0.0, 0.0, 0.5, 1.0, 1.0])
    assert ct_window(x).dtype == np.float32
    z = zscore(np.arange(10.0))
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-6
    np.testing.assert_allclose(minmax(np.array([2.0, 4.0, 6.0])), [0.0, 0.5, 1.0])
    assert np.all(zscore(np.full(5, 3.0)) == 0) and np.all(minmax(np.full(5, 3.0)) == 0)
    np.testing.assert_allclose(apply_intensity(x, "ct_window[-125,275]"), ct_window(x))
    np.testing.assert_allclose(apply_intensity(x, "ct_window[0,100]"), ct_window(x, 0, 100))
    with pytest.raises(DataError, match="unknown intensity"):
        apply_intensity(x, "histogram")


# --------------------------------------------------------------------------- Case.validate


def _case(**kw: object) -> Case:
    base: dict = dict(
        case_id="c1",
        image=np.zeros((2, 4, 5), np.float32),
        label=np.zeros((2, 4, 5), np.uint8),
        label_names={0: "background", 1: "organ"},
        source="/x/c1.nii.gz",
    )
    base.update(kw)
    return Case(**base)


def test_case_validate_accepts_good_case() -> None:
    case = _case()
    assert case.validate(1) is case
    assert case.shape == (2, 4, 5) and case.num_classes == 1


def test_case_validate_errors_name_the_problem() -> None:
    img = np.zeros((2, 4, 5), np.float32)
    img[1, 2, 3] = np.nan
    with pytest.raises(DataError, match=r"'c1'.*1 NaN/inf"):
        _case(image=img).validate(1)
    with pytest.raises(DataError, match=r"label shape \(2, 4, 4\) differs from image"):
        _case(label=np.zeros((2, 4, 4), np.uint8)).validate(1)
    lab = np.zeros((2, 4, 5), np.uint8)
    lab[0, 0, 0], lab[1, 1, 1] = 3, 7
    with pytest.raises(DataError, match=r"label values \[3, 7\] are outside 0\.\.1"):
        _case(label=lab).validate(1)
    with pytest.raises(DataError, match="3-D"):
        _case(image=np.zeros((4, 5), np.float32), label=None).validate()
    with pytest.raises(DataError, match="float32"):
        _case(image=np.zeros((2, 4, 5), np.float64)).validate()


def test_foreground_slices() -> None:
    lab = np.zeros((4, 3, 3), np.uint8)
    lab[1, 0, 0] = 1
    lab[3, 2, 2] = 2
    assert _case(image=np.zeros((4, 3, 3), np.float32), label=lab).foreground_slices() == [1, 3]


# --------------------------------------------------------------------------- Synapse


def test_synapse_slice_roundtrip(tmp_path: Path) -> None:
    image = np.random.default_rng(0).random((6, 7)).astype(np.float32)
    label = np.zeros((6, 7), np.float32)
    label[1:3, 2:5] = 8.0
    np.savez(tmp_path / "case0005_slice003.npz", image=image, label=label)
    img, lab = read_synapse_slice(tmp_path / "case0005_slice003.npz")
    np.testing.assert_array_equal(img, image)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 8}
    np.testing.assert_array_equal(lab, label.astype(np.uint8))


def test_synapse_slice_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_synapse_slice(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", img=np.zeros((2, 2)))
    with pytest.raises(DataError, match="expected keys 'image' and 'label'"):
        read_synapse_slice(tmp_path / "bad.npz")
    np.savez(tmp_path / "frac.npz", image=np.zeros((2, 2)), label=np.full((2, 2), 0.5))
    with pytest.raises(DataError, match="non-integer"):
        read_synapse_slice(tmp_path / "frac.npz")


def test_synapse_volume_orientation_and_dataset_json(tmp_path: Path) -> None:
    vol_dir = tmp_path / "test_vol_h5"
    vol_dir.mkdir()
    image = _coded_volume((3, 5, 7)) / 1000.0
    label = _blob_label((3, 5, 7), 8).astype(np.float32)
    with h5py.File(vol_dir / "case0001.npy.h5", "w") as f:
        f["image"] = image
        f["label"] = label
    case = read_synapse_volume(vol_dir / "case0001.npy.h5")
    assert case.case_id == "case0001" and case.shape == (3, 5, 7)
    np.testing.assert_array_equal(case.image, image)  # already (D, H, W): unchanged
    np.testing.assert_array_equal(case.label, label.astype(np.uint8))
    assert case.spacing == (1.0, 1.0, 1.0)
    assert case.label_names == SYNAPSE_LABELS_TRANSUNET
    assert case.intensity == "ct_window[-125,275]"
    # dataset.json (as written by prepare) supplies spacing and names
    meta = {"labels": {"background": 0, "spleen": 1, "x": 8}, "spacing": {"case0001": [3, 1, 1]}}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    (case2,) = read_dataset("synapse", tmp_path)
    assert case2.spacing == (3.0, 1.0, 1.0) and case2.label_names[1] == "spleen"


def test_synapse_training_case_is_rebuilt_from_its_slices(tmp_path: Path) -> None:
    train = tmp_path / "train_npz"
    train.mkdir()
    (tmp_path / "test_vol_h5").mkdir()
    label = _blob_label((4, 5, 7), 8)
    image = _coded_volume((4, 5, 7)) / 1000.0
    for z in (2, 0, 3, 1):  # glob order is not slice order
        np.savez(train / f"case0005_slice{z:03d}.npz", image=image[z], label=label[z])
    np.savez(train / "case00051_slice000.npz", image=image[0], label=label[0])  # another case
    (case,) = read_dataset("synapse", tmp_path, ["case0005"])
    assert case.case_id == "case0005" and case.shape == (4, 5, 7)
    np.testing.assert_allclose(case.image, image.astype(np.float32))
    np.testing.assert_array_equal(case.label, label)
    assert case.intensity == "ct_window[-125,275]"
    (train / "case0005_slice002.npz").unlink()
    with pytest.raises(DataError, match=r"case0005 lacks slices \[2\].*data.val_cases: 0"):
        read_dataset("synapse", tmp_path, ["case0005"])
    with pytest.raises(DataError, match="case case0009 has neither a test volume"):
        read_dataset("synapse", tmp_path, ["case0009"])


def test_synapse_volume_label_out_of_range(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "case0002.npy.h5", "w") as f:
        f["image"] = np.zeros((2, 3, 3), np.float32)
        f["label"] = np.full((2, 3, 3), 9.0, np.float32)
    with pytest.raises(DataError, match=r"case0002.*label values \[9\] are outside 0\.\.8"):
        read_synapse_volume(tmp_path / "case0002.npy.h5")


# --------------------------------------------------------------------------- PROMISE12


def test_promise12_mhd(tmp_path: Path) -> None:
    arr = _coded_volume((4, 6, 8))
    lab = np.zeros((4, 6, 8), np.uint8)
    lab[1:3, 2:4, 3:7] = 1
    sub = tmp_path / "TrainingData_Part1"
    _write_sitk(sub / "Case05.mhd", arr, spacing=(0.6, 0.7, 3.6), origin=(1.0, 2.0, 3.0))
    _write_sitk(
        sub / "Case05_segmentation.mhd", lab, spacing=(0.6, 0.7, 3.6), origin=(1.0, 2.0, 3.0)
    )
    _write_sitk(sub / "Case50.mhd", arr[:2], spacing=(0.5, 0.5, 3.0))  # test case: no label
    assert (sub / "Case05.raw").is_file()  # .mhd header + .raw data, as in PROMISE12
    cases = read_dataset("promise12", tmp_path)
    assert [c.case_id for c in cases] == ["Case05", "Case50"]
    c = cases[0]
    assert c.spacing == pytest.approx((3.6, 0.7, 0.6))  # sitk (x, y, z) reversed
    np.testing.assert_allclose(c.image, zscore(arr), atol=1e-6)  # (z, y, x) unchanged
    np.testing.assert_array_equal(c.label, lab)
    assert c.intensity == "zscore" and c.origin == (1.0, 2.0, 3.0)
    assert cases[1].label is None
    with pytest.raises(DataError, match="Case07"):
        read_dataset("promise12", tmp_path, ["Case07"])


# --------------------------------------------------------------------------- nnU-Net


def _nnunet(root: Path, ending: str, modality: str, labels: dict[str, int]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    meta = {
        "channel_names": {"0": modality},
        "labels": labels,
        "numTraining": 1,
        "file_ending": ending,
    }
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("ending", [".mha", ".nrrd", ".nii.gz"])
def test_nnunet_formats_orientation_spacing(tmp_path: Path, ending: str) -> None:
    root = tmp_path / "Dataset001_Test"
    _nnunet(root, ending, "MRI", {"background": 0, "a": 1, "b": 2})
    arr = _coded_volume((3, 4, 5))
    lab = _blob_label((3, 4, 5), 2)
    direction = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    img = _write_sitk(
        root / "imagesTr" / f"p1_0000{ending}", arr, (0.8, 0.9, 2.5), (10.0, -5.0, 2.0), direction
    )
    _write_sitk(
        root / "labelsTr" / f"p1{ending}", lab, (0.8, 0.9, 2.5), (10.0, -5.0, 2.0), direction
    )
    (case,) = read_dataset("nnunet", root)
    assert case.case_id == "p1" and case.shape == (3, 4, 5)
    assert case.spacing == pytest.approx((2.5, 0.9, 0.8))
    np.testing.assert_allclose(case.image, zscore(arr), atol=1e-6)
    np.testing.assert_array_equal(case.label, lab)
    assert case.origin == pytest.approx(img.GetOrigin())
    assert case.direction == pytest.approx(direction)
    assert case.label_names == {0: "background", 1: "a", 2: "b"}
    assert case.intensity == "zscore"


def test_nnunet_ct_window_and_msd_layout(tmp_path: Path) -> None:
    root = tmp_path / "Task09_Spleen"
    root.mkdir()
    hu = np.linspace(-400, 600, 2 * 3 * 4).reshape(2, 3, 4).astype(np.int16)
    _write_sitk(root / "imagesTr" / "spleen_1.nii.gz", hu)
    _write_sitk(root / "labelsTr" / "spleen_1.nii.gz", (hu > 100).astype(np.uint8))
    meta = {
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
        "training": [
            {"image": "./imagesTr/spleen_1.nii.gz", "label": "./labelsTr/spleen_1.nii.gz"}
        ],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    (case,) = read_dataset("nnunet", root)
    assert case.case_id == "spleen_1" and case.intensity == "ct_window[-125,275]"
    np.testing.assert_allclose(case.image, ct_window(hu), atol=1e-6)
    assert case.image.min() == 0.0 and case.image.max() == 1.0
    assert case.label_names == {0: "background", 1: "spleen"}


def test_nnunet_bad_inputs(tmp_path: Path) -> None:
    root = tmp_path / "Dataset002_Bad"
    _nnunet(root, ".mha", "MRI", {"background": 0, "a": 1, "b": 2})
    arr = _coded_volume((3, 4, 5))
    # shape mismatch
    _write_sitk(root / "imagesTr" / "s1_0000.mha", arr)
    _write_sitk(root / "labelsTr" / "s1.mha", np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"s1\.mha: label shape \(3, 4, 4\).*differs from image"):
        read_dataset("nnunet", root, ["s1"])
    # label above K = 2
    lab = np.zeros((3, 4, 5), np.uint8)
    lab[0, 0, 0], lab[2, 3, 4] = 5, 2
    _write_sitk(root / "imagesTr" / "s2_0000.mha", arr)
    _write_sitk(root / "labelsTr" / "s2.mha", lab)
    with pytest.raises(DataError, match=r"'s2'.*label values \[5\] are outside 0\.\.2"):
        read_dataset("nnunet", root, ["s2"])
    # NaN intensities
    nan = arr.copy()
    nan[1, 1, 1] = np.nan
    _write_sitk(root / "imagesTr" / "s3_0000.mha", nan)
    with pytest.raises(DataError, match=r"s3_0000\.mha: image contains 1 NaN/inf"):
        read_dataset("nnunet", root, ["s3"])
    # unknown case id
    with pytest.raises(DataError, match=r"'s9'.*imagesTr/s9_0000\.mha"):
        read_dataset("nnunet", root, ["s9"])
    # region labels are refused
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "MRI"},
                "labels": {"background": 0, "whole": [1, 2]},
                "file_ending": ".mha",
            }
        )
    )
    with pytest.raises(DataError, match="region"):
        read_dataset("nnunet", root, ["s2"])


def test_missing_paths_and_formats(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset format 'kits'"):
        read_dataset("kits", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        read_dataset("la", tmp_path / "nope")
    (tmp_path / "2018LA_Seg_Training Set").mkdir()
    with pytest.raises(DataError, match=r"mri_norm2\.h5 does not exist"):
        read_dataset("la", tmp_path, ["XYZ"])
    with pytest.raises(DataError, match="nnU-Net root.*dataset.json"):
        read_dataset("nnunet", tmp_path)
    (tmp_path / "empty.list").write_text("\n# comment only\n")
    with pytest.raises(DataError, match="empty"):
        read_list(tmp_path / "empty.list")
    with pytest.raises(DataError, match="empty"):
        read_dataset("la", tmp_path, [])


def test_la_synthetic_transpose_and_corrupt_file(tmp_path: Path) -> None:
    case_dir = tmp_path / "2018LA_Seg_Training Set" / "ABC"
    case_dir.mkdir(parents=True)
    xyz = np.random.default_rng(1).random((6, 5, 4)).astype(np.float32)
    lab = (xyz > 0.7).astype(np.uint8)
    with h5py.File(case_dir / "mri_norm2.h5", "w") as f:
        f["image"] = xyz
        f["label"] = lab
    (tmp_path / "train.list").write_text("ABC\n")
    (case,) = read_dataset("la", tmp_path)
    assert case.shape == (4, 6, 5)
    for z in range(4):
        np.testing.assert_array_equal(case.image[z], xyz[:, :, z])
        np.testing.assert_array_equal(case.label[z], lab[:, :, z])
    (case_dir / "mri_norm2.h5").write_bytes(b"not an hdf5 file")
    with pytest.raises(DataError, match="corrupt"):
        read_dataset("la", tmp_path)


# --------------------------------------------------------------------------- damaged inputs


def test_nnunet_refuses_truncated_and_nan_nifti(tmp_path: Path) -> None:
    """train/evaluate/prepare read through hsam.io.images's checks: ITK alone zero-fills a cut
    .nii and turns NaN into 0 in NIfTI files."""
    root = tmp_path / "Dataset003_Damaged"
    _nnunet(root, ".nii", "MRI", {"background": 0, "a": 1})
    arr = _coded_volume((6, 7, 8))
    _write_sitk(root / "imagesTr" / "t1_0000.nii", arr)
    _write_sitk(root / "labelsTr" / "t1.nii", np.zeros((6, 7, 8), np.uint8))
    image = root / "imagesTr" / "t1_0000.nii"
    image.write_bytes(image.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"t1_0000\.nii: it is truncated"):
        read_dataset("nnunet", root, ["t1"])
    nan = arr.copy()
    nan[2, 3, 4] = np.nan
    _write_sitk(image, nan)
    with pytest.raises(DataError, match=r"t1_0000\.nii: image contains 1 NaN/inf"):
        read_dataset("nnunet", root, ["t1"])


@pytest.mark.parametrize(
    ("field", "spacing", "origin", "direction"),
    [
        ("direction", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0, 1, 0, 1, 0, 0, 0, 0, 1)),
        ("spacing", (1.0, 1.0, 1.5), (0.0, 0.0, 0.0), None),
        ("origin", (1.0, 1.0, 1.0), (0.0, 0.0, 4.0), None),
    ],
)
def test_label_on_another_grid_is_refused(
    tmp_path: Path, field: str, spacing: tuple, origin: tuple, direction: tuple | None
) -> None:
    root = tmp_path / "Dataset004_Grid"
    _nnunet(root, ".nii.gz", "MRI", {"background": 0, "a": 1})
    _write_sitk(root / "imagesTr" / "g1_0000.nii.gz", _coded_volume((3, 4, 5)))
    lab = _blob_label((3, 4, 5), 1)
    direction = tuple(float(v) for v in direction) if direction else None
    _write_sitk(root / "labelsTr" / "g1.nii.gz", lab, spacing, origin, direction)
    with pytest.raises(DataError, match=rf"g1\.nii\.gz: the label's geometry differs.*{field}"):
        read_dataset("nnunet", root, ["g1"])
    # within the tolerance (float noise of a re-export) it is read
    _write_sitk(root / "labelsTr" / "g1.nii.gz", lab, (1.0, 1.0, 1.0 + 1e-6))
    (case,) = read_dataset("nnunet", root, ["g1"])
    np.testing.assert_array_equal(case.label, lab)


def test_ids_that_leave_the_dataset_root_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "outside" / "mri_norm2.h5"
    secret.parent.mkdir()
    with h5py.File(secret, "w") as f:
        f["image"] = np.zeros((4, 4, 2), np.float32)
        f["label"] = np.zeros((4, 4, 2), np.uint8)
    root = tmp_path / "la"
    (root / "2018LA_Seg_Training Set").mkdir(parents=True)
    (root / "train.list").write_text("../../outside\n")
    with pytest.raises(DataError, match=r"train\.list line 1: id '\.\./\.\./outside' is a path"):
        read_dataset("la", root)
    with pytest.raises(DataError, match=r"id '\.\./\.\./outside' is a path"):
        read_dataset("la", root, ["../../outside"])
    for bad in ("..", "/etc/passwd", "a\\b"):
        with pytest.raises(DataError, match="is a path"):
            read_dataset("acdc", root, [bad])


def test_dataset_json_that_is_not_an_object_is_a_clear_error(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps([{"labels": {"background": 0}}]))
    with pytest.raises(DataError, match="dataset.json: expected a JSON object.*list"):
        read_dataset("nnunet", tmp_path)


def test_h5_image_of_strings_is_a_clear_error(tmp_path):
    case = tmp_path / "2018LA_Seg_Training Set" / "ID0"
    case.mkdir(parents=True)
    with h5py.File(case / "mri_norm2.h5", "w") as f:
        f["image"] = np.array([[["a", "b"]] * 2] * 2, dtype="S1")
        f["label"] = np.zeros((2, 2, 2), np.uint8)
    with pytest.raises(DataError, match="'image' holds .* values, not numbers"):
        read_dataset("la", tmp_path, ["ID0"])
