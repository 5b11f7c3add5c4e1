"""Tests for hsam.io.images: exact geometry round trips, no flips, atomic writes, clear errors."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

import hsam.io.images
from conftest import OBLIQUE, rotation, shared_data_dir, write_dicom_series
from hsam.errors import DataError, OutputExistsError
from hsam.io.images import (
    Geometry,
    list_inputs,
    read_volume,
    safe_output_path,
    write_label_volume,
    write_probability_volume,
)

SHAPE = (7, 11, 13)  # (D, H, W): all different, so any transpose changes the shape
MARK = (2, 8, 3)  # (k, j, i) index of a one-voxel marker
EXTS = [".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"]


def synthetic_image(direction: np.ndarray = OBLIQUE) -> tuple[sitk.Image, np.ndarray]:
    arr = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) % 50
    arr[MARK] = 1000
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.9, 3.5))  # x, y, z
    img.SetOrigin((-12.5, 40.25, 101.0))
    img.SetDirection(tuple(float(v) for v in direction.ravel()))
    return img, arr


def marker_labels() -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[MARK] = 3
    labels[0, 0, :4] = 1  # a short row along x at the first slice
    return labels


def image_geometry_equal(a: sitk.Image, b: sitk.Image, atol: float = 1e-9) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=atol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=atol)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", EXTS)
def test_roundtrip_oblique_anisotropic(tmp_path, ext):
    img, arr = synthetic_image()
    src = tmp_path / f"in{ext}"
    sitk.WriteImage(img, str(src))
    vol = read_volume(src)
    np.testing.assert_array_equal(vol.array, arr)  # no flip, no transpose
    assert vol.array[MARK] == 1000
    assert vol.spacing == pytest.approx((3.5, 0.9, 0.7))
    assert vol.geometry.shape == SHAPE
    assert vol.geometry.spacing_dhw == vol.spacing

    labels = marker_labels()
    out = write_label_volume(labels, vol.geometry, tmp_path / "out" / f"seg{ext}")
    written = sitk.ReadImage(str(out))
    image_geometry_equal(written, sitk.ReadImage(str(src)))
    assert written.GetPixelID() == sitk.sitkUInt8
    back = sitk.GetArrayFromImage(written)
    np.testing.assert_array_equal(back, labels)
    assert back[MARK] == 3
    # the marker sits at the same physical point in input and output
    idx = (MARK[2], MARK[1], MARK[0])
    np.testing.assert_allclose(
        written.TransformIndexToPhysicalPoint(idx), img.TransformIndexToPhysicalPoint(idx)
    )
    if ext in (".nii", ".nii.gz"):
        ni, no = nib.load(src), nib.load(out)
        np.testing.assert_array_equal(no.affine, ni.affine)
        for key in ("qform_code", "sform_code", "pixdim", "srow_x", "srow_y", "srow_z"):
            np.testing.assert_array_equal(no.header[key], ni.header[key])
        assert np.asarray(no.dataobj)[MARK[::-1]] == 3  # nibabel order (i, j, k)
    if ext == ".mhd":
        assert sorted(p.suffix for p in (tmp_path / "out").iterdir()) == [".mhd", ".zraw"]


NIB_AFFINES = {
    "ras": np.diag([0.8, 0.8, 2.5, 1.0])
    + np.array([[0, 0, 0, -40.0], [0, 0, 0, 12.0], [0, 0, 0, 7.0], [0, 0, 0, 0]]),
    "lps_flipped_xy": np.array(
        [[-0.8, 0, 0, 40.0], [0, -0.8, 0, 30.0], [0, 0, 2.5, -7.0], [0, 0, 0, 1.0]]
    ),
    "flipped_z": np.array([[0.8, 0, 0, 0.0], [0, 0.8, 0, 0.0], [0, 0, -2.5, 50.0], [0, 0, 0, 1]]),
    "oblique": np.vstack(
        [np.hstack([OBLIQUE @ np.diag([0.8, 0.9, 2.5]), [[3.0], [-4.0], [5.0]]]), [0, 0, 0, 1]]
    ),
}


@pytest.mark.parametrize("codes", [(1, 1), (0, 2), (1, 0)], ids=["q1s1", "q0s2", "q1s0"])
@pytest.mark.parametrize("name", list(NIB_AFFINES))
def test_nibabel_written_nifti_keeps_affine_and_voxels(tmp_path, name, codes):
    affine = NIB_AFFINES[name]
    xyz = np.zeros(SHAPE[::-1], np.int16)  # nibabel order (i, j, k) = (W, H, D)
    xyz[MARK[::-1]] = 500
    img = nib.Nifti1Image(xyz, affine)
    img.set_qform(affine, code=codes[0])
    img.set_sform(affine, code=codes[1])
    src = tmp_path / "in.nii.gz"
    nib.save(img, src)

    vol = read_volume(src)
    assert vol.array.shape == SHAPE
    assert vol.array[MARK] == 500
    # SimpleITK's view of the marker's position == nibabel's (RAS -> LPS)
    ras = nib.load(src).affine @ np.array([*MARK[::-1], 1.0])
    image = sitk.ReadImage(str(src))
    lps = image.TransformIndexToPhysicalPoint(tuple(int(v) for v in MARK[::-1]))
    np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-4)

    labels = np.zeros(SHAPE, np.uint8)
    labels[MARK] = 5
    out = write_label_volume(labels, vol.geometry, tmp_path / "seg.nii.gz")
    loaded_in, loaded_out = nib.load(src), nib.load(out)
    np.testing.assert_array_equal(loaded_out.affine, loaded_in.affine)
    assert int(loaded_out.header["qform_code"]) == codes[0]
    assert int(loaded_out.header["sform_code"]) == codes[1]
    data = np.asarray(loaded_out.dataobj)
    assert data.shape == SHAPE[::-1] and data[MARK[::-1]] == 5 and data.sum() == 5
    image_geometry_equal(sitk.ReadImage(str(out)), image)
    # cross-format: the same labels as .mha land on the same physical grid
    mha = write_label_volume(labels, vol.geometry, tmp_path / "seg.mha")
    image_geometry_equal(sitk.ReadImage(str(mha)), image)


def test_scaled_nifti_input_gives_unscaled_labels(tmp_path):
    xyz = np.arange(np.prod(SHAPE[::-1]), dtype=np.float32).reshape(SHAPE[::-1]) * 2.0
    img = nib.Nifti1Image(xyz, NIB_AFFINES["ras"])
    img.set_data_dtype(np.int16)
    img.header.set_slope_inter(2.0, 10.0)
    src = tmp_path / "scaled.nii"
    nib.save(img, src)
    vol = read_volume(src)
    labels = np.zeros(SHAPE, np.uint8)
    labels[MARK] = 2
    out = write_label_volume(labels, vol.geometry, tmp_path / "seg.nii")
    loaded = nib.load(out)
    assert loaded.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(loaded.dataobj), labels.T)
    np.testing.assert_array_equal(read_volume(out).array, labels)


def test_uint16_labels_and_label_validation(tmp_path):
    img, _ = synthetic_image()
    geo = Geometry.from_image(img)
    labels = marker_labels().astype(np.int32)
    labels[MARK] = 300
    out = write_label_volume(labels, geo, tmp_path / "big.mha")
    back = sitk.ReadImage(str(out))
    assert back.GetPixelID() == sitk.sitkUInt16
    assert sitk.GetArrayFromImage(back)[MARK] == 300
    with pytest.raises(DataError, match="shape"):
        write_label_volume(labels[:, :, :-1], geo, tmp_path / "x.mha")
    with pytest.raises(DataError, match="integers"):
        write_label_volume(labels.astype(float), geo, tmp_path / "x.mha")
    with pytest.raises(DataError, match=r"\[0, 65535\]"):
        write_label_volume(labels - 5, geo, tmp_path / "x.mha")
    with pytest.raises(DataError, match="extension"):
        write_label_volume(labels, geo, tmp_path / "x.png")
    assert listing(tmp_path) == ["big.mha"]


@pytest.mark.parametrize("ext", [".nii.gz", ".mha", ".nrrd"])
def test_probabilities_4d_and_per_class(tmp_path, ext):
    img, _ = synthetic_image()
    src = tmp_path / f"in{ext}"
    sitk.WriteImage(img, str(src))
    vol = read_volume(src)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=SHAPE).transpose(3, 0, 1, 2).astype(np.float32)
    (out,) = write_probability_volume(probs, vol.geometry, tmp_path / f"p{ext}")
    four = sitk.ReadImage(str(out))
    assert four.GetDimension() == 4 and four.GetSize() == (*SHAPE[::-1], 3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(four), probs)
    np.testing.assert_allclose(four.GetSpacing()[:3], img.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(four.GetOrigin()[:3], img.GetOrigin(), atol=1e-9)
    d4 = np.asarray(four.GetDirection()).reshape(4, 4)
    np.testing.assert_allclose(d4[:3, :3].ravel(), img.GetDirection(), atol=1e-9)
    if ext == ".nii.gz":
        np.testing.assert_array_equal(nib.load(out).affine, nib.load(src).affine)

    paths = write_probability_volume(
        probs, vol.geometry, tmp_path / "sub" / f"q{ext}", layout="per_class"
    )
    assert [p.name for p in paths] == [f"q_class{t:02d}{ext}" for t in range(3)]
    for t, p in enumerate(paths):
        one = sitk.ReadImage(str(p))
        image_geometry_equal(one, sitk.ReadImage(str(src)))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(one), probs[t])
    with pytest.raises(OutputExistsError):
        write_probability_volume(
            probs, vol.geometry, tmp_path / "sub" / f"q{ext}", layout="per_class"
        )
    with pytest.raises(DataError, match="layout"):
        write_probability_volume(probs, vol.geometry, tmp_path / f"r{ext}", layout="zip")
    with pytest.raises(DataError, match=r"\(T, D, H, W\)"):
        write_probability_volume(probs[0], vol.geometry, tmp_path / f"r{ext}")


def test_real_ct_roundtrip(tmp_path):
    ct = shared_data_dir() / "totalseg_example" / "example_ct_sm.nii.gz"
    if not ct.exists():
        pytest.skip(f"real CT not available at {ct}")
    vol = read_volume(ct)
    ref = nib.load(ct)
    assert vol.array.shape == ref.shape[::-1]
    # same voxels as nibabel, transposed only (no flips)
    np.testing.assert_array_equal(vol.array, np.asarray(ref.dataobj).T)
    np.testing.assert_allclose(vol.spacing, ref.header.get_zooms()[::-1])
    labels = (vol.array > 200).astype(np.uint8)
    labels[3, 10, 20] = 2
    out = write_label_volume(labels, vol.geometry, tmp_path / "ct_seg.nii.gz")
    got = nib.load(out)
    np.testing.assert_array_equal(got.affine, ref.affine)
    assert int(got.header["sform_code"]) == int(ref.header["sform_code"])
    assert int(got.header["qform_code"]) == int(ref.header["qform_code"])
    data = np.asarray(got.dataobj)
    assert data[20, 10, 3] == 2
    np.testing.assert_array_equal(data, labels.T)
    image_geometry_equal(sitk.ReadImage(str(out)), sitk.ReadImage(str(ct)))
    mha = write_label_volume(labels, vol.geometry, tmp_path / "ct_seg.mha")
    image_geometry_equal(sitk.ReadImage(str(mha)), sitk.ReadImage(str(ct)))


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------
def test_dicom_series_folder(tmp_path):
    img, arr = synthetic_image(direction=rotation((0, 0, 1), 15.0))
    series = tmp_path / "dicom" / "series_a"
    write_dicom_series(img, series, "1.2.826.0.1.3680043.2.1125.42")
    vol = read_volume(series)
    assert vol.geometry.source_format == "dicom"
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.spacing, (3.5, 0.9, 0.7), atol=1e-3)
    np.testing.assert_allclose(vol.geometry.direction, img.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(vol.geometry.origin, img.GetOrigin(), atol=1e-3)
    assert list_inputs([series]) == [series]
    write_dicom_series(img, tmp_path / "dicom" / "series_b", "1.2.826.0.1.3680043.2.1125.43")
    assert list_inputs([tmp_path / "dicom"]) == [series, tmp_path / "dicom" / "series_b"]
    out = safe_output_path(series, tmp_path / "preds")
    assert out == (tmp_path / "preds" / "series_a.nii.gz").resolve()
    written = write_label_volume(marker_labels(), vol.geometry, out)
    assert Geometry.from_image(sitk.ReadImage(str(written))).matches(vol.geometry)
    # two series in one folder: refuse and say what to do
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for sub in ("series_a", "series_b"):
        for f in (tmp_path / "dicom" / sub).iterdir():
            (mixed / f"{sub}_{f.name}").write_bytes(f.read_bytes())
    with pytest.raises(DataError, match="2 DICOM series"):
        read_volume(mixed)


# --------------------------------------------------------------------------------------------
# errors on input
# --------------------------------------------------------------------------------------------
def test_unreadable_and_corrupt_files_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(os.urandom(2000))
    with pytest.raises(DataError, match="garbage.nii.gz"):
        read_volume(garbage)
    bad_mha = tmp_path / "bad.mha"
    bad_mha.write_text("ObjectType = Image\nNDims = 3\n")
    with pytest.raises(DataError, match="bad.mha"):
        read_volume(bad_mha)
    with pytest.raises(DataError, match="does not exist"):
        read_volume(tmp_path / "missing.nii.gz")
    png = tmp_path / "volume.png"
    png.write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match="unsupported extension"):
        read_volume(png)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_truncated_files_are_refused(tmp_path, ext):
    img, _ = synthetic_image()
    src = tmp_path / f"full{ext}"
    sitk.WriteImage(img, str(src), useCompression=ext != ".nii")
    data = src.read_bytes()
    if ext == ".nii.gz":
        assert gzip.decompress(data)  # a complete stream before cutting it
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=f"cut{ext}"):
        read_volume(cut)


def test_2d_4d_and_vector_images_are_refused(tmp_path):
    two = tmp_path / "slice.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.int16)), str(two))
    with pytest.raises(DataError, match="2-D"):
        read_volume(two)
    four = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.int16), np.eye(4)), four)
    with pytest.raises(DataError, match="4-D"):
        read_volume(four)
    single = tmp_path / "single.nii.gz"
    data = np.zeros((4, 5, 6, 1), np.int16)
    data[1, 2, 3, 0] = 9
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0])), single)
    vol = read_volume(single)
    assert vol.array.shape == (6, 5, 4) and vol.array[3, 2, 1] == 9
    assert vol.spacing == pytest.approx((4.0, 3.0, 2.0))
    vec = tmp_path / "rgb.mha"
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True), str(vec)
    )
    with pytest.raises(DataError, match="components"):
        read_volume(vec)


# --------------------------------------------------------------------------------------------
# output safety
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".nii.gz", ".mha", ".mhd"])
def test_existing_output_refused_then_overwritten(tmp_path, ext):
    img, _ = synthetic_image()
    src = tmp_path / f"in{ext}"
    sitk.WriteImage(img, str(src))
    geo = read_volume(src).geometry
    out = tmp_path / "out" / f"seg{ext}"
    write_label_volume(marker_labels(), geo, out)
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    with pytest.raises(OutputExistsError, match="overwrite"):
        write_label_volume(np.zeros(SHAPE, np.uint8), geo, out)
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before
    write_label_volume(np.zeros(SHAPE, np.uint8), geo, out, overwrite=True)
    assert read_volume(out).array.max() == 0
    assert listing(out.parent) == sorted(before)  # no temp files left


def test_output_permissions_follow_umask(tmp_path):
    geo = Geometry.default(SHAPE, (2.0, 1.0, 1.0))
    out = write_label_volume(marker_labels(), geo, tmp_path / "seg.nii.gz")
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("ext", [".nii.gz", ".mha", ".mhd"])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, ext):
    img, _ = synthetic_image()
    src = tmp_path / f"in{ext}"
    sitk.WriteImage(img, str(src))
    geo = read_volume(src).geometry
    outdir = tmp_path / "out"
    outdir.mkdir()

    def half_write(image, name, *args, **kwargs):
        Path(name).write_bytes(b"partial")
        raise RuntimeError("disk full")

    def half_save(img, name):
        Path(name).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", half_write)
    monkeypatch.setattr(nib, "save", half_save)
    with pytest.raises((DataError, OSError)):
        write_label_volume(marker_labels(), geo, outdir / f"seg{ext}")
    assert listing(outdir) == []


def test_geometry_default_and_matches():
    geo = Geometry.default((4, 5, 6), (3.0, 2.0, 1.0))
    assert geo.size == (6, 5, 4) and geo.shape == (4, 5, 6)
    assert geo.spacing == (1.0, 2.0, 3.0) and geo.spacing_dhw == (3.0, 2.0, 1.0)
    other = Geometry.default((4, 5, 6), (3.0, 2.0, 1.0 + 1e-3))
    assert geo.matches(geo) and not geo.matches(other)


# --------------------------------------------------------------------------------------------
# input listing and output paths
# --------------------------------------------------------------------------------------------
def test_list_inputs(tmp_path):
    img, _ = synthetic_image()
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("b.mha", "a.nii.gz", "c.nrrd", ".hidden.nii.gz"):
        sitk.WriteImage(img, str(folder / name))
    (folder / "notes.txt").write_text("x")
    single = tmp_path / "single.nii"
    sitk.WriteImage(img, str(single))
    got = list_inputs([folder, single, folder / "a.nii.gz"])
    assert got == [folder / "a.nii.gz", folder / "b.mha", folder / "c.nrrd", single]
    with pytest.raises(DataError, match="does not exist"):
        list_inputs([tmp_path / "nope"])
    with pytest.raises(DataError, match="unsupported extension"):
        list_inputs([folder / "notes.txt"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no volume files"):
        list_inputs([empty])


def test_safe_output_path(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    f = scans / "case1.nii.gz"
    f.write_bytes(b"")
    assert safe_output_path(f, tmp_path / "out") == (tmp_path / "out" / "case1.nii.gz").resolve()
    assert safe_output_path(f, tmp_path / "out", suffix="_seg", extension=".mha").name == (
        "case1_seg.mha"
    )
    with pytest.raises(DataError, match="inside the input folder"):
        safe_output_path(f, scans / "preds", roots=[scans])
    with pytest.raises(DataError, match="inside the input folder"):
        safe_output_path(f, scans, roots=[scans])
    with pytest.raises(DataError, match="overwrite the input"):
        safe_output_path(f, scans)
    assert safe_output_path(f, scans, suffix="_seg").name == "case1_seg.nii.gz"
    dicom = tmp_path / "dicom_case"
    dicom.mkdir()
    with pytest.raises(DataError, match="inside the input folder"):
        safe_output_path(dicom, dicom / "out")
    with pytest.raises(DataError, match="not supported"):
        safe_output_path(f, tmp_path / "out", extension=".png")


# --------------------------------------------------------------------------------------------
# damaged inputs the readers used to accept (issue 15)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_non_finite_voxels_are_refused_naming_the_file(tmp_path, ext):
    """ITK's NIfTI reader turns NaN/inf into 0; they must be refused for every format."""
    arr = np.ones(SHAPE, np.float32)
    arr[MARK] = np.nan
    arr[0, 0, 0] = np.inf
    path = tmp_path / f"nan{ext}"
    if ext.startswith(".nii"):
        nib.save(nib.Nifti1Image(arr.T, np.diag([0.7, 0.9, 3.5, 1.0])), str(path))
    else:
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    with pytest.raises(DataError, match=rf"nan{re.escape(ext)}: image contains 2 NaN/inf"):
        read_volume(path)


def test_nifti2_is_called_unsupported_not_corrupt(tmp_path):
    path = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti2Image(np.zeros(SHAPE[::-1], np.int16), np.eye(4)), str(path))
    with pytest.raises(DataError, match=r"two\.nii\.gz is a NIfTI-2 file.*not support") as exc:
        read_volume(path)
    assert "corrupt" not in str(exc.value)


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    img, _ = synthetic_image(direction=rotation((0, 0, 1), 15.0))
    series = tmp_path / "series"
    write_dicom_series(img, series, "1.2.826.0.1.3680043.2.1125.44")
    (series / "slice003.dcm").unlink()
    with pytest.raises(DataError, match=r"series.*uneven slice positions.*3 and 4 of 6"):
        read_volume(series)


def test_dicom_series_with_a_truncated_slice_is_refused(tmp_path):
    img, _ = synthetic_image()
    series = tmp_path / "series"
    write_dicom_series(img, series, "1.2.826.0.1.3680043.2.1125.45")
    last = series / f"slice{SHAPE[0] - 1:03d}.dcm"  # an end slice: no gap shows in the positions
    last.write_bytes(last.read_bytes()[:400])
    with pytest.raises(DataError, match=r"leaves out 1 DICOM file.*slice006\.dcm.*truncated"):
        read_volume(series)


def test_the_package_re_exports_every_public_name_of_the_former_module():
    """hsam.io.images is split by responsibility; callers keep importing from hsam.io.images."""
    former = {
        "DICOM_OUTPUT_EXTENSION", "DICOM_STEP_TOLERANCE", "SUPPORTED_EXTENSIONS", "Geometry",
        "ImageFile", "Volume", "atomic_output", "check_finite", "list_inputs", "read_image",
        "read_volume", "refuse_existing", "refuse_unsupported_nifti", "safe_output_path",
        "volume_extension", "write_label_volume", "write_probability_volume",
    }  # fmt: skip
    assert set(hsam.io.images.__all__) == former
    assert all(getattr(hsam.io.images, name) is not None for name in former)
