"""Readers on the real data in ../shared/data (LA, ACDC, TotalSegmentator CT); skipped when the
folder is absent. Set HSAM_SHARED_DATA to point elsewhere. No case ids or counts are hard-coded:
they come from the list files."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from conftest import REPO, load_benchmark, shared_data_dir
from hsam.config import load_run_config
from hsam.data import (
    SliceDataset,
    class_frequencies,
    ct_window,
    read_dataset,
    read_list,
    standard_split,
)
from hsam.data.formats.acdc import read_acdc_slice
from hsam.engine.data import build_run_data

DATA = shared_data_dir()


def _need(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data {path} not available")
    return path


# --------------------------------------------------------------------------- LA


def test_la_reader_shapes_values_spacing_orientation() -> None:
    root = _need("la")
    first = read_list(root / "train.list")[0]
    (case,) = read_dataset("la", root, [first])
    with h5py.File(root / "2018LA_Seg_Training Set" / first / "mri_norm2.h5", "r") as f:
        image, label = f["image"][()], f["label"][()]
    assert case.shape == (image.shape[2], image.shape[0], image.shape[1])  # (Z, X, Y)
    np.testing.assert_array_equal(case.image, np.moveaxis(image, -1, 0))
    np.testing.assert_array_equal(case.label, np.moveaxis(label, -1, 0))
    z = case.num_slices // 2
    np.testing.assert_array_equal(case.image[z], image[:, :, z])
    assert set(np.unique(case.label).tolist()) == {0, 1}
    assert case.spacing == (0.625, 0.625, 0.625)
    assert case.intensity == "zscore" and case.label_names[1] == "left_atrium"
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8


def test_la_default_ids_follow_list_files() -> None:
    root = _need("la")
    from hsam.data import list_cases

    expected = read_list(root / "train.list") + read_list(root / "test.list")
    assert list_cases("la", root) == expected


def test_la_4_foreground_slices_match_h5() -> None:
    root = _need("la")
    ids = standard_split("la_4")
    assert ids == read_list(root / "train.list")[:4]
    cases = read_dataset("la", root, ids)
    ds = SliceDataset(cases, 64, foreground_only=True, image_order=1)
    expected = 0
    for cid in ids:
        with h5py.File(root / "2018LA_Seg_Training Set" / cid / "mri_norm2.h5", "r") as f:
            expected += int(f["label"][()].reshape(-1, f["label"].shape[2]).any(0).sum())
    assert len(ds) == expected
    for i in (0, len(ds) // 2, len(ds) - 1):
        item = ds[i]
        assert item["image"].shape == (1, 64, 64) and item["label"].shape == (64, 64)
        assert int(item["label"].max()) == 1
    freq = class_frequencies(ds, 1)
    assert freq.shape == (2,) and abs(freq.sum() - 1) < 1e-9 and 0 < freq[1] < 0.5


@pytest.mark.slow
def test_histogram_standardisation_narrows_the_la_blood_pool_spread(capsys):
    """benchmarks/blood_pool_intensity.py --standardize: each training scan standardised onto
    the other three's landmarks (as a held-out scan would be) brings the blood pools closer
    together than the percentile policy alone leaves them."""
    root = _need("la")
    module = next(load_benchmark("blood_pool_intensity"))
    module.main(["--root", str(root), "--standardize"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train")]
    assert len(lines) == len(read_list(REPO / "src" / "hsam" / "splits" / "la_4.txt"))
    raw = [float(line.split("label ")[1].split(",")[0]) for line in lines]
    standardised = [float(line.split("label ")[2].split(",")[0]) for line in lines]
    assert max(standardised) - min(standardised) < 0.75 * (max(raw) - min(raw))
    assert min(standardised) > min(raw)


# --------------------------------------------------------------------------- ACDC


def test_acdc_val_volumes() -> None:
    root = _need("acdc")
    ids = read_list(root / "val.list")[:2]
    cases = read_dataset("acdc", root, ids)
    for cid, case in zip(ids, cases, strict=True):
        with h5py.File(root / "data" / f"{cid}.h5", "r") as f:
            np.testing.assert_array_equal(case.image, f["image"][()])  # already (D, H, W)
        assert case.case_id == cid and case.image.ndim == 3
        assert set(np.unique(case.label).tolist()) <= {0, 1, 2, 3}
        assert case.spacing == (1.0, 1.0, 1.0) and case.intensity == "minmax"
        assert case.image.min() >= 0.0 and case.image.max() <= 1.0


def test_acdc_training_slices_and_stacked_frames() -> None:
    root = _need("acdc")
    slice_ids = read_list(root / "train_slices.list")[:6]
    for sid in slice_ids:
        image, label = read_acdc_slice(root / "data" / "slices" / f"{sid}.h5")
        assert image.ndim == 2 and image.shape == label.shape
        assert label.max() <= 3
    ds = SliceDataset.from_slice_list("acdc", root, slice_ids, 96, image_order=1)
    assert len(ds) == len(slice_ids) and ds.slice_ids == slice_ids
    item = ds[0]
    assert item["case_id"] + "_slice_" + str(item["slice_index"]) == slice_ids[0]
    assert set(np.unique(item["label"].numpy()).tolist()) <= {0, 1, 2, 3}
    # a training frame exists only as slices: stacked in slice order
    frame = read_list(root / "train.list")[0]
    (case,) = read_dataset("acdc", root, [frame])
    files = sorted(
        (root / "data" / "slices").glob(f"{frame}_slice_*.h5"),
        key=lambda p: int(p.stem.rsplit("_", 1)[1]),
    )
    assert case.num_slices == len(files)
    for d in (0, case.num_slices - 1):
        image, label = read_acdc_slice(files[d])
        np.testing.assert_array_equal(case.image[d], image)
        np.testing.assert_array_equal(case.label[d], label)


@pytest.mark.parametrize(
    ("recipe", "lines", "patients"),
    [
        ("acdc_5pct_litemedsam_cpu.yaml", 68, {"038", "050", "099"}),
        ("acdc_10pct_litemedsam_cpu.yaml", 136, {"021", "038", "049", "050", "058", "099", "100"}),
    ],
)
def test_acdc_fraction_recipes_select_the_ssl4mis_patients(recipe, lines, patients) -> None:
    root = _need("acdc")
    path = REPO / "configs" / recipe
    overrides = [f"data.root={root}", f"data.train_slices_list={root / 'train_slices.list'}"]
    cfg = load_run_config(path, overrides)
    data = build_run_data(
        cfg.data, cfg.train, cfg.model.image_size, num_classes=cfg.model.num_classes
    )
    manifest = data.manifest
    # The manifest names the volumes (patient and frame) the slices came from; the carved
    # validation volume is one of those patients' frames, never a test patient.
    cases = manifest["train_cases"] + manifest["val"]
    assert {c.split("_")[0].removeprefix("patient") for c in cases} == patients
    assert len(manifest["train"]) + sum(c.num_slices for c in data.val_cases) == lines
    assert {s.rsplit("_slice_", 1)[0] for s in manifest["train"]} == set(manifest["train_cases"])
    assert not set(cases) & set(read_list(root / "val.list"))


# --------------------------------------------------------------------------- TotalSegmentator CT

# TotalSegmentator ids -> a small label map: liver 1, spleen 2, right kidney 3, left kidney 4.
_TOTALSEG_REMAP = {5: 1, 1: 2, 2: 3, 3: 4}


def _totalseg_nnunet(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    src = _need("totalseg_example")
    root = tmp_path / "Dataset100_TotalSegExample"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    ct = src / "example_ct_sm.nii.gz"
    (root / "imagesTr" / "ct_0000.nii.gz").symlink_to(ct)
    seg = sitk.ReadImage(str(src / "example_seg.nii.gz"))
    arr = sitk.GetArrayFromImage(seg)
    lut = np.zeros(256, np.uint8)
    for old, new in _TOTALSEG_REMAP.items():
        lut[old] = new
    remapped = lut[arr]
    out = sitk.GetImageFromArray(remapped)
    out.CopyInformation(seg)
    sitk.WriteImage(out, str(root / "labelsTr" / "ct.nii.gz"))
    meta = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root, ct, remapped


def test_totalseg_ct_via_nnunet_layout(tmp_path: Path) -> None:
    root, ct, remapped = _totalseg_nnunet(tmp_path)
    (case,) = read_dataset("nnunet", root)
    ref = sitk.ReadImage(str(ct))
    ref_arr = sitk.GetArrayFromImage(ref)
    assert case.case_id == "ct"
    assert case.shape == ref_arr.shape == tuple(reversed(ref.GetSize()))
    assert case.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert case.spacing == pytest.approx(tuple(reversed(ref.GetSpacing())))
    np.testing.assert_allclose(case.image, ct_window(ref_arr), atol=1e-6)
    np.testing.assert_array_equal(case.label, remapped)
    assert case.origin == pytest.approx(ref.GetOrigin())
    assert case.direction == pytest.approx(ref.GetDirection())
    assert case.intensity == "ct_window[-125,275]"
    assert case.image.min() >= 0.0 and case.image.max() <= 1.0
    assert set(np.unique(case.label).tolist()) == {0, 1, 2, 3, 4}
    # the liver is the largest of these organs (label-map sanity check)
    counts = np.bincount(case.label.ravel(), minlength=5)
    assert counts[1] == counts[1:].max()
