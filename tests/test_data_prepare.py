"""prepare(): raw Synapse -> TransUNet layout, other formats -> cases/*.npz, splits, manifest,
refusal to overwrite, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from conftest import shared_data_dir
from hsam.data import (
    SliceDataset,
    ct_window,
    manifest_sha256,
    prepare,
    read_dataset,
    read_list,
    read_manifest,
    standard_split,
)
from hsam.data.formats.synapse import read_synapse_slice
from hsam.data.prepare import SYNAPSE_REMAP
from hsam.errors import DataError, OutputExistsError

SHAPE = (3, 6, 8)  # (z, y, x) per case: 3 slices


def _write(path: Path, arr: np.ndarray, spacing: tuple[float, float, float]) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def _raw_synapse(root: Path, numbers: tuple[int, ...] = (1, 5, 6, 7)) -> dict[str, tuple]:
    """Tiny RawData/Training with HU images and raw BTCV label ids 0..13."""
    rng = np.random.default_rng(0)
    out = {}
    for n in numbers:
        hu = rng.integers(-1000, 1000, SHAPE).astype(np.int16)
        lab = rng.integers(0, 14, SHAPE).astype(np.uint8)
        _write(root / "RawData" / "Training" / "img" / f"img{n:04d}.nii.gz", hu, (0.7, 0.7, 3.0))
        _write(
            root / "RawData" / "Training" / "label" / f"label{n:04d}.nii.gz", lab, (0.7, 0.7, 3.0)
        )
        out[f"case{n:04d}"] = (hu, lab)
    return out


def _expected_remap(lab: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    out = np.zeros_like(lab)
    for old, new in mapping.items():
        out[lab == old] = new
    return out


def test_prepare_synapse_raw(tmp_path: Path) -> None:
    raw = _raw_synapse(tmp_path / "src")
    dst = tmp_path / "Synapse"
    res = prepare("synapse", tmp_path / "src", dst, few_shot="1", n_val=1)  # raw detected
    assert res.dst == dst and res.num_cases == 4
    # case0001 is a TransUNet test case; case0005 is the first training case (seed None)
    assert sorted(os.listdir(dst / "test_vol_h5")) == ["case0001.npy.h5"]
    assert res.train == ["case0005"] and res.manifest["method"] == "first_n"
    assert res.manifest["val"] == ["case0006"] and res.manifest["test"] == ["case0001"]
    assert sorted(os.listdir(dst / "val_vol_h5")) == ["case0006.npy.h5"]
    slices = sorted(p.stem for p in (dst / "train_npz").glob("*.npz"))
    assert slices == [f"case{c:04d}_slice{d:03d}" for c in (5, 7) for d in range(3)]
    hu, lab = raw["case0005"]
    # same orientation as upstream: nibabel (x, y, z) data transposed (2, 1, 0)
    nib_img = nib.load(tmp_path / "src" / "RawData" / "Training" / "img" / "img0005.nii.gz")
    upstream = np.transpose(nib_img.get_fdata(), (2, 1, 0))
    for d in range(3):
        image, _ = read_synapse_slice(dst / "train_npz" / f"case0005_slice{d:03d}.npz")
        np.testing.assert_allclose(image, ct_window(upstream[d]), atol=1e-6)
    for d in range(3):
        image, label = read_synapse_slice(dst / "train_npz" / f"case0005_slice{d:03d}.npz")
        np.testing.assert_allclose(image, ct_window(hu[d]), atol=1e-6)  # (z, y, x) slices
        np.testing.assert_array_equal(label, _expected_remap(lab[d], SYNAPSE_REMAP))
    with np.load(dst / "train_npz" / "case0005_slice000.npz") as f:
        assert f["label"].dtype == np.float32  # TransUNet file format
    remapped = _expected_remap(lab, SYNAPSE_REMAP)
    assert not np.isin(remapped, [9, 10, 11, 12, 13]).any()
    (test_case,) = read_dataset("synapse", dst)
    thu, tlab = raw["case0001"]
    np.testing.assert_allclose(test_case.image, ct_window(thu), atol=1e-6)
    np.testing.assert_array_equal(test_case.label, _expected_remap(tlab, SYNAPSE_REMAP))
    assert test_case.spacing == pytest.approx((3.0, 0.7, 0.7))  # from dataset.json
    assert test_case.label_names[1] == "spleen" and test_case.label_names[8] == "pancreas"
    assert read_list(dst / "lists" / "train_fewshot.txt") == [
        f"case0005_slice{d:03d}" for d in range(3)
    ]
    assert read_list(dst / "lists" / "test_vol.txt") == ["case0001"]
    manifest = read_manifest(dst / "split_manifest.json")
    assert manifest_sha256(manifest) == res.manifest_sha256
    ds = SliceDataset.from_slice_list(
        "synapse", dst, read_list(dst / "splits" / "train_slices.txt"), 16
    )
    assert len(ds) == 3


def test_prepare_synapse_transunet_order_and_fraction(tmp_path: Path) -> None:
    from hsam.data.prepare import SYNAPSE_REMAP_TRANSUNET

    raw = _raw_synapse(tmp_path / "src", (2, 5, 9))
    dst = tmp_path / "out"
    res = prepare(
        "synapse_raw", tmp_path / "src", dst, few_shot=0.5, seed=3, label_order="transunet"
    )
    assert res.manifest["method"] == "slice_fraction" and len(res.manifest["train_slices"]) == 3
    _, label = read_synapse_slice(dst / "train_npz" / "case0005_slice001.npz")
    np.testing.assert_array_equal(
        label, _expected_remap(raw["case0005"][1][1], SYNAPSE_REMAP_TRANSUNET)
    )
    meta = json.loads((dst / "dataset.json").read_text())
    assert meta["labels"]["aorta"] == 1 and meta["label_order"] == "transunet"
    # the standard 10% list names slices this tiny source lacks: a clear error, nothing written
    with pytest.raises(DataError, match="slice.*not in the data"):
        prepare("synapse_raw", tmp_path / "src", tmp_path / "out2", few_shot="synapse_train_220")
    assert not (tmp_path / "out2").exists()


def test_prepare_refuses_existing_dst_and_overlap(tmp_path: Path) -> None:
    _raw_synapse(tmp_path / "src", (5,))
    dst = tmp_path / "out"
    prepare("synapse_raw", tmp_path / "src", dst)
    with pytest.raises(OutputExistsError, match="already exists.*overwrite"):
        prepare("synapse_raw", tmp_path / "src", dst)
    # an earlier prepare output is replaced with --overwrite
    (dst / "train_npz" / "stale.npz").write_bytes(b"old")
    res = prepare("synapse_raw", tmp_path / "src", dst, overwrite=True)
    assert not (dst / "train_npz" / "stale.npz").exists() and (dst / "train_npz").is_dir()
    assert res.manifest["test"] == []
    with pytest.raises(DataError, match="overlaps the source"):
        prepare("synapse_raw", tmp_path / "src", tmp_path / "src" / "out", overwrite=True)
    with pytest.raises(DataError, match="overlaps the source"):
        prepare("synapse_raw", tmp_path / "src", tmp_path, overwrite=True)
    assert (tmp_path / "src" / "RawData").is_dir()


def test_overwrite_replaces_only_an_earlier_prepare_output(tmp_path: Path) -> None:
    _raw_synapse(tmp_path / "src", (5,))
    # a folder of the user's own files
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match=r"mine is not an hsam prepare output.*move or delete"):
        prepare("synapse_raw", tmp_path / "src", mine, overwrite=True)
    assert (mine / "keep.txt").read_text() == "user data"
    # a plain file
    note = tmp_path / "notes.txt"
    note.write_text("user data")
    with pytest.raises(DataError, match=r"notes\.txt is a file, not an earlier hsam prepare"):
        prepare("synapse_raw", tmp_path / "src", note, overwrite=True)
    assert note.read_text() == "user data"
    # an earlier output to which the user added a file of their own
    dst = tmp_path / "out"
    prepare("synapse_raw", tmp_path / "src", dst)
    (dst / "my_notes.md").write_text("user data")
    with pytest.raises(DataError, match=r"also holds \['my_notes\.md'\]"):
        prepare("synapse_raw", tmp_path / "src", dst, overwrite=True)
    assert (dst / "my_notes.md").read_text() == "user data"
    # a marker that is not hsam's
    (dst / "my_notes.md").unlink()
    (dst / "hsam_prepare.json").write_text('{"kind": "something else", "contents": []}')
    with pytest.raises(DataError, match="not an hsam prepare output"):
        prepare("synapse_raw", tmp_path / "src", dst, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["mine", "notes.txt", "out", "src"]  # no leftovers


def test_prepare_output_permissions_follow_umask(tmp_path: Path) -> None:
    _raw_synapse(tmp_path / "src", (5,))
    mask = os.umask(0o022)
    try:
        res = prepare("synapse_raw", tmp_path / "src", tmp_path / "out")
    finally:
        os.umask(mask)
    assert res.dst.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert (res.dst / "train_npz").stat().st_mode & 0o777 == 0o755
    assert (res.dst / "dataset.json").stat().st_mode & 0o777 == 0o644


def test_prepare_refuses_damaged_sources(tmp_path: Path) -> None:
    """The synapse_raw path reads through the same checks as every command: a truncated
    volume, NaN voxels in a NIfTI, and a label on another grid are refused, naming the file."""
    _raw_synapse(tmp_path / "src", (5, 6))
    img = tmp_path / "src" / "RawData" / "Training" / "img" / "img0006.nii.gz"
    lab = tmp_path / "src" / "RawData" / "Training" / "label" / "label0006.nii.gz"
    good_img, good_lab = img.read_bytes(), lab.read_bytes()
    raw = nib.load(str(img))
    data = np.asarray(raw.dataobj).astype(np.float32)
    # uncompressed: ITK zero-fills a cut .nii without a word
    for path in (img, lab):
        nib.save(nib.load(str(path)), str(path.with_suffix("")))
        path.unlink()
    cut = img.with_suffix("")
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"img0006\.nii: it is truncated"):
        prepare("synapse_raw", tmp_path / "src", tmp_path / "out")
    cut.unlink()
    lab.with_suffix("").unlink()
    lab.write_bytes(good_lab)
    data[1, 2, 0] = np.nan
    nib.save(nib.Nifti1Image(data, raw.affine), str(img))
    with pytest.raises(DataError, match=r"img0006\.nii\.gz: image contains 1 NaN/inf"):
        prepare("synapse_raw", tmp_path / "src", tmp_path / "out")
    img.write_bytes(good_img)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(lab)))
    _write(lab, arr, (0.7, 0.7, 2.5))
    with pytest.raises(DataError, match=r"label0006\.nii\.gz: the label's geometry.*spacing"):
        prepare("synapse_raw", tmp_path / "src", tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_prepare_failure_leaves_nothing(tmp_path: Path) -> None:
    _raw_synapse(tmp_path / "src", (5, 6))
    bad = np.full(SHAPE, 20, np.uint8)
    label = tmp_path / "src" / "RawData" / "Training" / "label" / "label0006.nii.gz"
    _write(label, bad, (0.7, 0.7, 3.0))
    with pytest.raises(DataError, match=r"label0006.*\[20\].*0\.\.13"):
        prepare("synapse_raw", tmp_path / "src", tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no dst, no partial folder


def _nnunet_source(root: Path, n: int = 5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    out = {}
    for i in range(n):
        arr = rng.normal(100, 20, (4, 5, 6)).astype(np.float32)
        lab = rng.integers(0, 3, (4, 5, 6)).astype(np.uint8)
        _write(root / "imagesTr" / f"p{i}_0000.mha", arr, (0.5, 0.6, 2.0))
        _write(root / "labelsTr" / f"p{i}.mha", lab, (0.5, 0.6, 2.0))
        out[f"p{i}"] = (arr, lab)
    meta = {
        "channel_names": {"0": "T2"},
        "labels": {"background": 0, "a": 1, "b": 2},
        "file_ending": ".mha",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return out


def test_prepare_nnunet_to_cases_roundtrip(tmp_path: Path) -> None:
    src = tmp_path / "Dataset003_X"
    _nnunet_source(src)
    dst = tmp_path / "prepared"
    res = prepare("nnunet", src, dst, few_shot=2, seed=0, n_val=1, test_ids=["p4"])
    originals = {c.case_id: c for c in read_dataset("nnunet", src)}
    prepared = read_dataset("prepared", dst)
    assert [c.case_id for c in prepared] == sorted(originals)
    for case in prepared:
        ref = originals[case.case_id]
        np.testing.assert_array_equal(case.image, ref.image)
        np.testing.assert_array_equal(case.label, ref.label)
        assert case.spacing == ref.spacing and case.label_names == ref.label_names
        assert case.origin == ref.origin and case.direction == ref.direction
        assert case.intensity == "zscore"
    m = res.manifest
    assert len(m["train"]) == 2 and len(m["val"]) == 1 and m["test"] == ["p4"]
    assert not set(m["train"]) & set(m["val"]) and m["method"] == "seeded_cases"
    assert read_list(dst / "splits" / "train.txt") == m["train"]
    again = prepare("nnunet", src, tmp_path / "again", few_shot=2, seed=0, n_val=1, test_ids=["p4"])
    assert again.manifest["train"] == m["train"] and again.manifest["val"] == m["val"]
    meta = json.loads((dst / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "a": 1, "b": 2} and meta["file_ending"] == ".npz"
    with pytest.raises(DataError, match="neither a standard split"):
        prepare("nnunet", src, tmp_path / "x", few_shot="no_such_split")
    with pytest.raises(DataError, match=r"case\(s\) \['Case29'"):
        prepare("nnunet", src, tmp_path / "y", few_shot="promise12_3")


def test_prepare_synapse_volumes_format(tmp_path: Path) -> None:
    src = tmp_path / "Synapse"
    (src / "test_vol_h5").mkdir(parents=True)
    with h5py.File(src / "test_vol_h5" / "case0001.npy.h5", "w") as f:
        f["image"] = np.zeros((2, 4, 4), np.float32)
        f["label"] = np.ones((2, 4, 4), np.float32)
    res = prepare("synapse", src, tmp_path / "out")
    assert res.train == ["case0001"] and res.manifest["method"] == "all"


@pytest.mark.slow
def test_prepare_real_la_standard_split(tmp_path: Path) -> None:
    root = shared_data_dir() / "la"
    if not root.is_dir():
        pytest.skip(f"{root} not available")
    res = prepare("la", root, tmp_path / "LA", few_shot="la_4")
    assert res.train == standard_split("la_4") == read_list(root / "train.list")[:4]
    assert res.manifest["test"] == read_list(root / "test.list")
    assert {s["path"] for s in res.manifest["sources"]} == {
        str(root / "train.list"),
        str(root / "test.list"),
    }
    cases = read_dataset("prepared", tmp_path / "LA", res.train)
    ds = SliceDataset(cases, 32, foreground_only=True)
    assert all(int(ds[i]["label"].max()) == 1 for i in (0, len(ds) - 1))
    assert cases[0].spacing == (0.625, 0.625, 0.625)
