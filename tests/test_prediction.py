"""Tests for hsam.apps.predict (`hsam predict`): exact output geometry, no flips or transposes,
safe outputs, clear errors.

A tiny H-SAM (``backbone="tiny"``, S = 64, K = 1) is trained for a few hundred AdamW steps on
synthetic slices where the label is ``image > 0.5`` (bright discs and boxes on a dark noisy
background), so its predictions mark bright voxels: a bright box placed off-centre in a volume
must come back where it is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
import torch

from conftest import (
    BOX,
    BOX_SHAPE,
    CT_POLICY,
    IMAGE_SIZE,
    MR_POLICY,
    OBLIQUE,
    make_checkpoint,
    rotation,
    run_config,
    shared_data_dir,
    synthetic_bright_batch,
    trained_bright_model,
    write_dicom_series,
    write_nifti,
)
from hsam.apps.predict import plan_outputs, predict_files
from hsam.build import build_hsam
from hsam.config import ModelConfig
from hsam.devices import native_bf16, resolve_device, resolve_precision
from hsam.errors import CheckpointError, ConfigError, DataError, OutputExistsError
from hsam.inference.predictor import Predictor, checkpoint_label_names
from hsam.io.checkpoint import save_checkpoint
from hsam.io.images import read_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mr_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "bright_mr.pt", policy=MR_POLICY)


@pytest.fixture(scope="module")
def ct_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "bright_ct.pt", policy=CT_POLICY)


# --------------------------------------------------------------------------------------------
# synthetic volumes
# --------------------------------------------------------------------------------------------


def bright_box_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """int16 ``(D, H, W)`` volume: dark noise with a bright box; and the box mask."""
    rng = np.random.default_rng(seed)
    vol = rng.uniform(0, 300, BOX_SHAPE)
    mask = np.zeros(BOX_SHAPE, bool)
    mask[BOX] = True
    vol[mask] = rng.uniform(700, 1000, int(mask.sum()))
    return vol.astype(np.int16), mask


SPACING_XYZ = (0.7, 0.9, 3.5)


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def assert_box_found(pred: np.ndarray, box: np.ndarray) -> None:
    """The predicted foreground is the box, in place: same centroid (within 1.5 voxels or 20 %
    of the box's extent along each axis: the tiny model bleeds a little), good overlap, and much
    better overlap than with the box flipped along any axis."""
    fg = pred > 0
    assert fg.any(), "nothing was segmented"
    extent = np.ptp(np.argwhere(box), axis=0) + 1
    err = np.abs(centroid(fg) - centroid(box))
    assert (err <= np.maximum(1.5, 0.2 * extent)).all(), (centroid(fg), centroid(box))
    d = dice(fg, box)
    assert d > 0.6, d
    for axis in range(3):
        assert dice(fg, np.flip(box, axis)) < d - 0.3, axis


def oblique_affine(lps: bool) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = OBLIQUE @ np.diag(SPACING_XYZ)
    aff[:3, 3] = (-40.5, 12.25, 97.0)
    if lps:  # the same voxel grid stored with x and y negated (a scanner-LPS style affine)
        aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
    return aff


# --------------------------------------------------------------------------------------------
# model-level helpers
# --------------------------------------------------------------------------------------------
def test_trained_model_segments_bright_voxels():
    built = trained_bright_model()
    x, y = synthetic_bright_batch(np.random.default_rng(123), 32)
    with torch.no_grad():
        pred = built.model(x).probabilities.argmax(1)
    inter = ((pred == 1) & (y == 1)).sum().item()
    dice = 2 * inter / ((pred == 1).sum().item() + (y == 1).sum().item())
    assert dice > 0.6


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu-ish:?")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_precision_auto_is_bf16_only_on_bf16_hardware(monkeypatch, caplog):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16"):
        resolve_precision("fp16", cpu)
    # A CPU without bf16 units (AVX2 only): auto is fp32, an explicit bf16 stays but warns.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not native_bf16(cpu)
    assert resolve_precision("auto", cpu) == "fp32"
    with caplog.at_level(logging.WARNING, logger="hsam.devices"):
        assert resolve_precision("bf16", cpu) == "bf16"
    assert "no native bf16 support" in caplog.text
    model = build_hsam(ModelConfig(backbone="tiny", image_size=32, num_classes=1)).model
    assert Predictor(model=model, intensity_policy=None, precision="auto").precision == "fp32"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert Predictor(model=model, intensity_policy=None, precision="auto").precision == "bf16"


def test_label_names_accept_int_and_str_keys():
    assert checkpoint_label_names({"label_names": {"0": "bg", "1": "liver"}}, 2) == {
        0: "bg",
        1: "liver",
        2: "class_2",
    }
    assert checkpoint_label_names({"label_names": {0: "bg", 1: "la"}}, 1) == {0: "bg", 1: "la"}
    assert checkpoint_label_names({}, 1) == {0: "background", 1: "class_1"}
    with pytest.raises(CheckpointError, match="non-integer"):
        checkpoint_label_names({"label_names": {"liver": 1}}, 1)


def test_predictor_from_checkpoint_reads_meta(mr_checkpoint):
    m = Predictor.from_checkpoint(mr_checkpoint, device="cpu")
    assert m.num_classes == 1
    assert m.intensity_policy == MR_POLICY
    assert m.label_names == {0: "background", 1: "sphere"}
    assert not m.model.training


def test_checkpoint_without_policy_needs_an_override(tmp_path):
    ckpt = make_checkpoint(tmp_path / "nopolicy.pt", policy=None)
    with pytest.raises(CheckpointError, match="intensity_policy"):
        Predictor.from_checkpoint(ckpt, device="cpu")
    m = Predictor.from_checkpoint(ckpt, device="cpu", intensity_policy=CT_POLICY)
    assert m.intensity_policy == CT_POLICY


def test_stage_2_of_a_one_stage_model_is_refused(tmp_path):
    cfg = ModelConfig(backbone="tiny", image_size=IMAGE_SIZE, num_classes=1, lora_rank=2, stages=1)
    ckpt = tmp_path / "samed.pt"
    save_checkpoint(
        ckpt, build_hsam(cfg), config=run_config(cfg), meta={"intensity_policy": MR_POLICY}
    )
    with pytest.raises(ConfigError, match="one-stage"):
        Predictor.from_checkpoint(ckpt, device="cpu", stage="2")
    Predictor.from_checkpoint(ckpt, device="cpu", stage=1)


# --------------------------------------------------------------------------------------------
# geometry round trips and location
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lps", [False, True], ids=["ras", "lps"])
def test_nifti_oblique_roundtrip_and_location(tmp_path, mr_checkpoint, lps):
    vol, box = bright_box_volume()
    src = write_nifti(tmp_path / "vol.nii.gz", vol, oblique_affine(lps))
    written = predict_files(mr_checkpoint, [src], tmp_path / "out", device="cpu", progress=False)
    assert written == [tmp_path / "out" / "vol_seg.nii.gz"]
    img_in, img_out = nib.load(str(src)), nib.load(str(written[0]))
    assert img_out.shape == img_in.shape
    np.testing.assert_array_equal(img_out.affine, img_in.affine)
    np.testing.assert_array_equal(img_out.header.get_qform(), img_in.header.get_qform())
    np.testing.assert_array_equal(img_out.header.get_sform(), img_in.header.get_sform())
    assert int(img_out.header["qform_code"]) == int(img_in.header["qform_code"])
    assert int(img_out.header["sform_code"]) == int(img_in.header["sform_code"])
    assert img_out.header["pixdim"][0] == img_in.header["pixdim"][0]  # qfac
    assert img_out.get_data_dtype() == np.uint8
    pred_ijk = np.asarray(img_out.dataobj)  # nibabel order (i, j, k)
    assert_box_found(pred_ijk.T, box)  # back to (k, j, i) = (D, H, W)
    # and SimpleITK agrees on the grid
    a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(written[0]))
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("ext", [".mha", ".nrrd", ".mhd"])
def test_sitk_formats_oblique_anisotropic_roundtrip(tmp_path, mr_checkpoint, ext):
    vol, box = bright_box_volume(seed=1)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing(SPACING_XYZ)
    img.SetOrigin((-12.5, 40.25, 101.0))
    img.SetDirection(tuple(float(v) for v in OBLIQUE.ravel()))
    src = tmp_path / f"scan{ext}"
    sitk.WriteImage(img, str(src))
    written = predict_files(
        mr_checkpoint,
        [src],
        tmp_path / "out",
        device="cpu",
        probabilities=True,
        overlay=True,
        progress=False,
    )
    out = tmp_path / "out"
    assert written == [out / f"scan_seg{ext}", out / f"scan_prob{ext}", out / "scan_overlay.png"]
    seg, inp = sitk.ReadImage(str(written[0])), sitk.ReadImage(str(src))
    assert seg.GetSize() == inp.GetSize() == img.GetSize()
    # NRRD stores spacing x direction as one matrix: reading it back rounds in the last bit
    np.testing.assert_allclose(seg.GetSpacing(), inp.GetSpacing(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(seg.GetOrigin(), inp.GetOrigin(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(seg.GetDirection(), inp.GetDirection(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(seg.GetSpacing(), SPACING_XYZ, rtol=0, atol=1e-12)
    pred = sitk.GetArrayFromImage(seg)
    assert pred.shape == vol.shape
    assert_box_found(pred, box)
    prob = sitk.GetArrayFromImage(sitk.ReadImage(str(written[1])))
    assert prob.shape == (2, *vol.shape) and prob.dtype == np.float32
    np.testing.assert_allclose(prob.sum(0), 1.0, atol=1e-4)
    # labels are the argmax of the probabilities resized to the slice grid: of exactly the
    # probabilities written
    np.testing.assert_array_equal(prob.argmax(0), pred)
    assert written[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_stage_1_and_bf16(tmp_path, mr_checkpoint):
    vol, box = bright_box_volume(seed=4)
    src = write_nifti(tmp_path / "v.nii.gz", vol, oblique_affine(True))
    for stage, precision in (("1", "fp32"), ("fused", "bf16")):
        out = tmp_path / f"out_{stage}_{precision}"
        (seg,) = predict_files(
            mr_checkpoint, [src], out, device="cpu", stage=stage, precision=precision
        )
        img = nib.load(str(seg))
        np.testing.assert_array_equal(img.affine, nib.load(str(src)).affine)
        assert np.asarray(img.dataobj).shape == vol.T.shape


def test_single_input_to_named_file(tmp_path, mr_checkpoint):
    vol, box = bright_box_volume(seed=2)
    (tmp_path / "in").mkdir()
    src = write_nifti(tmp_path / "in" / "a.nii", vol, oblique_affine(False))
    target = tmp_path / "res" / "mask.nii.gz"
    written = predict_files(mr_checkpoint, [src], target, device="cpu", overlay=True)
    assert written == [target, tmp_path / "res" / "mask_overlay.png"]
    out = nib.load(str(target))
    np.testing.assert_array_equal(out.affine, nib.load(str(src)).affine)
    assert_box_found(np.asarray(out.dataobj).T, box)


def test_dicom_series_folder(tmp_path, mr_checkpoint):
    vol, box = bright_box_volume(seed=3)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing(SPACING_XYZ)
    img.SetOrigin((-12.5, 40.25, 101.0))
    img.SetDirection(tuple(float(v) for v in rotation((0, 0, 1), 15.0).ravel()))
    series = tmp_path / "dicom" / "series_a"
    write_dicom_series(img, series, "1.2.826.0.1.3680043.2.1125.77")
    written = predict_files(mr_checkpoint, [tmp_path / "dicom"], tmp_path / "out", device="cpu")
    assert written == [tmp_path / "out" / "series_a_seg.nii.gz"]
    seg = sitk.ReadImage(str(written[0]))
    assert seg.GetSize() == img.GetSize()
    np.testing.assert_allclose(seg.GetSpacing(), img.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(seg.GetOrigin(), img.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(seg.GetDirection(), img.GetDirection(), atol=1e-5)
    assert_box_found(sitk.GetArrayFromImage(seg), box)
    with pytest.raises(DataError, match="inside the input folder"):
        predict_files(mr_checkpoint, [series], series / "out", device="cpu")


def real_ct() -> Path:
    ct = shared_data_dir() / "totalseg_example" / "example_ct_sm.nii.gz"
    if not ct.is_file():
        pytest.skip(f"shared data not found at {ct}")
    return ct


def assert_same_nifti_header(src: Path, out: Path) -> None:
    img_in, img_out = nib.load(str(src)), nib.load(str(out))
    assert img_out.shape == img_in.shape
    np.testing.assert_array_equal(img_out.affine, img_in.affine)
    for key in ("qform_code", "sform_code", "pixdim", "srow_x", "srow_y", "srow_z", "xyzt_units"):
        np.testing.assert_array_equal(img_out.header[key], img_in.header[key])
    for key in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"):
        assert img_out.header[key] == img_in.header[key]


def test_real_ct_roundtrip(tmp_path, ct_checkpoint):
    ct = real_ct()
    written = predict_files(
        ct_checkpoint, [ct], tmp_path / "out", device="cpu", probabilities=True, overlay=True
    )
    out = tmp_path / "out"
    assert written == [
        out / "example_ct_sm_seg.nii.gz",
        out / "example_ct_sm_prob.nii.gz",
        out / "example_ct_sm_overlay.png",
    ]
    assert_same_nifti_header(ct, written[0])
    seg = nib.load(str(written[0]))
    assert seg.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1}
    prob = nib.load(str(written[1]))
    assert prob.shape == (*nib.load(str(ct)).shape, 2)
    np.testing.assert_array_equal(prob.affine, seg.affine)
    vol, lab = read_volume(ct), read_volume(written[0])
    assert lab.geometry.matches(vol.geometry, atol=1e-5)


def test_real_ct_grid_box_lands_in_place(tmp_path, ct_checkpoint):
    """The real CT's grid and header, its anatomy darkened (<= 0 HU), a 600 HU box off-centre:
    the bright-voxel model must find the box where it is in the file."""
    ct = real_ct()
    img = nib.load(str(ct))
    hu = np.asarray(img.dataobj)  # (i, j, k)
    box_ijk = np.zeros(hu.shape, bool)
    box_ijk[70:110, 10:40, 4:12] = True
    data = np.minimum(hu, 0)
    data[box_ijk] = 600
    src = tmp_path / "ct_box.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(hu.dtype), img.affine, img.header), str(src))
    written = predict_files(ct_checkpoint, [src], tmp_path / "out", device="cpu")
    assert_same_nifti_header(ct, written[0])
    pred_ijk = np.asarray(nib.load(str(written[0])).dataobj)
    assert_box_found(pred_ijk.T, box_ijk.T)


# --------------------------------------------------------------------------------------------
# bad input, safe outputs
# --------------------------------------------------------------------------------------------
def _files(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_unreadable_file_is_refused_before_writing(tmp_path, mr_checkpoint):
    good = write_nifti(tmp_path / "good.nii.gz", bright_box_volume()[0], np.eye(4))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"this is not a nifti file at all" * 20)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="bad.nii.gz"):
        predict_files(mr_checkpoint, [good, bad], out, device="cpu")
    assert _files(out) == []


def test_nifti2_is_refused_as_unsupported_before_the_model_loads(tmp_path):
    src = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti2Image(bright_box_volume()[0].T, np.eye(4)), str(src))
    with pytest.raises(DataError, match=r"two\.nii\.gz is a NIfTI-2 file.*not support") as exc:
        predict_files(tmp_path / "not_needed.pt", [src], tmp_path / "out", device="cpu")
    assert "corrupt" not in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_truncated_file_leaves_only_complete_outputs(tmp_path, mr_checkpoint):
    good = write_nifti(tmp_path / "a_good.nii.gz", bright_box_volume()[0], np.eye(4))
    raw = write_nifti(tmp_path / "full.nii", bright_box_volume()[0], np.eye(4)).read_bytes()
    bad = tmp_path / "b_truncated.nii"
    bad.write_bytes(raw[: len(raw) // 2])  # header intact, voxels missing
    out = tmp_path / "out"
    with pytest.raises(DataError, match="b_truncated"):
        predict_files(mr_checkpoint, [good, bad], out, device="cpu", probabilities=True)
    assert _files(out) == ["a_good_prob.nii.gz", "a_good_seg.nii.gz"]  # no temp, no partial


def test_2d_and_4d_images_are_refused(tmp_path, mr_checkpoint):
    two_d = tmp_path / "slice.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 30), np.int16)), str(two_d))
    four_d = tmp_path / "cine.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 5, 3), np.int16), np.eye(4)), str(four_d))
    out = tmp_path / "out"
    with pytest.raises(DataError, match="2-D"):
        predict_files(mr_checkpoint, [two_d], out, device="cpu")
    with pytest.raises(DataError, match="4-D"):
        predict_files(mr_checkpoint, [four_d], out, device="cpu")
    assert _files(out) == []


def test_output_inside_input_folder_is_refused(tmp_path, mr_checkpoint):
    folder = tmp_path / "scans"
    folder.mkdir()
    write_nifti(folder / "a.nii.gz", bright_box_volume()[0], np.eye(4))
    for out in (folder, folder / "seg", folder / "seg" / "x.nii.gz"):
        with pytest.raises(DataError, match="inside the input folder"):
            predict_files(mr_checkpoint, [folder], out, device="cpu")
    assert _files(folder) == ["a.nii.gz"]


def test_existing_output_needs_overwrite(tmp_path, mr_checkpoint):
    src = write_nifti(tmp_path / "a.nii.gz", bright_box_volume()[0], np.eye(4))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_seg.nii.gz").write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="a_seg.nii.gz"):
        predict_files(mr_checkpoint, [src], out, device="cpu", overlay=True)
    assert (out / "a_seg.nii.gz").read_bytes() == b"old"
    assert _files(out) == ["a_seg.nii.gz"]
    predict_files(mr_checkpoint, [src], out, device="cpu", overlay=True, overwrite=True)
    assert nib.load(str(out / "a_seg.nii.gz")).shape == BOX_SHAPE[::-1]
    assert _files(out) == ["a_overlay.png", "a_seg.nii.gz"]


def test_plan_outputs_naming_and_clashes(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = tmp_path / "x" / "scan.nii.gz"
    b = tmp_path / "y" / "scan.nii.gz"
    c = tmp_path / "y" / "other.mha"
    for p in (a, b, c):
        p.write_bytes(b"")
    plan = plan_outputs([a, c], tmp_path / "o", probabilities=True, overlay=True)
    assert [t.paths() for t in plan] == [
        [
            tmp_path / "o" / "scan_seg.nii.gz",
            tmp_path / "o" / "scan_prob.nii.gz",
            tmp_path / "o" / "scan_overlay.png",
        ],
        [
            tmp_path / "o" / "other_seg.mha",
            tmp_path / "o" / "other_prob.mha",
            tmp_path / "o" / "other_overlay.png",
        ],
    ]
    with pytest.raises(DataError, match="would both write"):
        plan_outputs([a, b], tmp_path / "o")
    with pytest.raises(DataError, match="names one file"):
        plan_outputs([a, c], tmp_path / "o" / "seg.nii.gz")
    with pytest.raises(DataError, match="input itself"):
        plan_outputs([a], a)


def test_bad_arguments(tmp_path, mr_checkpoint):
    src = write_nifti(tmp_path / "a.nii.gz", bright_box_volume()[0], np.eye(4))
    with pytest.raises(ConfigError, match="stage"):
        predict_files(mr_checkpoint, [src], tmp_path / "o", stage="3")
    with pytest.raises(ConfigError, match="precision"):
        predict_files(mr_checkpoint, [src], tmp_path / "o", precision="fp16")
    with pytest.raises(DataError, match="does not exist"):
        predict_files(mr_checkpoint, [tmp_path / "missing.nii.gz"], tmp_path / "o")
    with pytest.raises(CheckpointError, match="does not exist"):
        predict_files(tmp_path / "nope.pt", [src], tmp_path / "o", device="cpu")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# malformed checkpoints and unwritable outputs (issue 15)
# --------------------------------------------------------------------------------------------
def test_output_under_a_file_is_refused_before_any_work(tmp_path):
    """The checkpoint does not exist: the output check must come first (no compute)."""
    from hsam.errors import OutputError

    src = write_nifti(tmp_path / "a.nii.gz", bright_box_volume()[0], np.eye(4))
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    for out in (blocker / "out", blocker / "out" / "a.nii.gz"):
        with pytest.raises(OutputError, match="a_file, which is a file"):
            predict_files(tmp_path / "missing.pt", [src], out, device="cpu")
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("missing", ["state_dict", "meta", "config", "backbone"])
def test_incomplete_checkpoint_is_a_clear_error(tmp_path, missing):
    from hsam.apps.cli import main

    path = make_checkpoint(tmp_path / "k.pt", trained=False)
    payload = torch.load(path, weights_only=True)
    del payload[missing]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=f"incomplete or damaged \\('{missing}' is missing"):
        Predictor.from_checkpoint(path, device="cpu")
    assert main(["info", "--checkpoint", str(path)]) == 2


def test_resume_state_given_as_checkpoint_says_what_to_use(tmp_path):
    from hsam.io.checkpoint import RESUME_FORMAT

    last = tmp_path / "checkpoints" / "last.pt"
    last.parent.mkdir()
    torch.save({"format": RESUME_FORMAT, "state_dict": {}, "next_epoch": 3}, last)
    with pytest.raises(CheckpointError, match="resume state.*use best.pt or final.pt"):
        Predictor.from_checkpoint(last, device="cpu")


class _Pickled:
    """An arbitrary Python object: torch's weights-only loader refuses it."""


def test_pickled_objects_are_refused_without_torchs_advice(tmp_path):
    """torch's message suggests weights_only=False (running code from the file): not shown."""
    path = tmp_path / "old_last.pt"
    torch.save({"rng": _Pickled()}, path)
    with pytest.raises(CheckpointError, match="objects other than tensors") as info:
        Predictor.from_checkpoint(path, device="cpu")
    assert "weights_only" not in str(info.value)


def test_log_lines_never_name_the_staging_folder(tmp_path, caplog):
    import logging

    ckpt = make_checkpoint(tmp_path / "k.pt", trained=False)
    src = write_nifti(tmp_path / "a.nii.gz", bright_box_volume()[0], np.eye(4))
    with caplog.at_level(logging.INFO, logger="hsam"):
        predict_files(ckpt, [src], tmp_path / "out", device="cpu", probabilities=True)
    assert ".hsam-predict-" not in caplog.text
    assert str(tmp_path / "out" / "a_seg.nii.gz") in caplog.text


def test_staging_left_by_a_killed_run_is_removed_and_nothing_else(tmp_path):
    """A kill between staging and the move leaves `.hsam-predict-<host>-<pid>-*`; the next
    predict into that folder removes it, but not a live run's staging nor a look-alike."""
    import subprocess
    import sys

    from hsam.io.atomic import make_staging_dir

    out = tmp_path / "out"
    out.mkdir()
    code = (
        "import sys; from hsam.io.atomic import make_staging_dir; "
        "p = make_staging_dir(sys.argv[1], 'predict'); (p / 'a_seg.nii.gz').write_text('cut'); "
        "print(p)"
    )
    dead = Path(subprocess.check_output([sys.executable, "-c", code, str(out)], text=True).strip())
    live = make_staging_dir(out, "predict")  # this process is alive
    mine = out / ".hsam-predict-notes"
    mine.mkdir()
    ckpt = make_checkpoint(tmp_path / "k.pt", trained=False)
    src = write_nifti(tmp_path / "a.nii.gz", bright_box_volume()[0], np.eye(4))
    predict_files(ckpt, [src], out, device="cpu", progress=False)
    assert not dead.exists()
    assert live.is_dir() and mine.is_dir()
    assert (out / "a_seg.nii.gz").is_file()
