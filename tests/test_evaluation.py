"""Tests for hsam.apps.evaluate (`hsam evaluate`): reports on real LA and ACDC volumes with tiny
checkpoints, data/split resolution, class-count mismatches, safe outputs.

Checkpoints come from ``test_prediction`` (a tiny H-SAM trained on synthetic bright shapes,
K = 1, and an untrained K = 3 one): the scores are meaningless, the plumbing is what is tested.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from conftest import MR_POLICY, make_checkpoint, shared_data_dir
from hsam.apps.cli import main as cli_main
from hsam.apps.evaluate import (
    INFO_FILE,
    REPORT_FILES,
    detect_format,
    evaluate_checkpoint,
    resolve_split,
)
from hsam.config import DataConfig
from hsam.data import read_dataset, read_list
from hsam.errors import CheckpointError, ConfigError, DataError, OutputExistsError
from hsam.evaluation.reports import read_per_case_csv, summarize
from hsam.inference.postprocess import keep_largest_component

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def data_root(name: str) -> Path:
    root = shared_data_dir() / name
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    return root


@pytest.fixture(scope="module")
def la_root() -> Path:
    return data_root("la")


@pytest.fixture(scope="module")
def acdc_root() -> Path:
    return data_root("acdc")


@pytest.fixture(scope="module")
def la_list(la_root, tmp_path_factory) -> Path:
    """Two ids of LA's test.list (read from the file, never hard-coded)."""
    ids = read_list(la_root / "test.list")[:2]
    path = tmp_path_factory.mktemp("lists") / "la2.list"
    path.write_text("\n".join(ids) + "\n")
    return path


@pytest.fixture(scope="module")
def acdc_list(acdc_root, tmp_path_factory) -> Path:
    ids = read_list(acdc_root / "val.list")[:2]
    path = tmp_path_factory.mktemp("lists") / "acdc2.list"
    path.write_text("\n".join(ids) + "\n")
    return path


@pytest.fixture(scope="module")
def la_checkpoint(tmp_path_factory, la_root, la_list) -> Path:
    """K = 1 trained tiny checkpoint whose stored data config is LA with a 2-case test list."""
    data = DataConfig(format="la", root=str(la_root), test_list=str(la_list))
    return make_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "la_tiny.pt",
        policy=MR_POLICY,
        label_names={"0": "background", "1": "left atrium"},
        data=data,
    )


@pytest.fixture(scope="module")
def acdc_checkpoint(tmp_path_factory) -> Path:
    """K = 3 untrained tiny checkpoint (ACDC's label map), int keys in label_names."""
    return make_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "acdc_tiny.pt",
        num_classes=3,
        trained=False,
        policy="minmax",
        label_names={0: "background", 1: "RV", 2: "Myo", 3: "LV"},
    )


def check_reports(out: Path, summary: dict, n_cases: int, class_names: list[str]) -> None:
    for name in (*REPORT_FILES, INFO_FILE):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "summary.json").read_text())
    assert summary == on_disk
    assert summary["n_cases"] == n_cases
    assert [c["name"] for c in summary["classes"]] == class_names
    # The per-case CSV reproduces the summary exactly.
    rows = read_per_case_csv(out / "per_case.csv")
    assert len(rows) == n_cases * len(class_names)
    assert json.loads(json.dumps(summarize(rows), allow_nan=False)) == on_disk
    table = (out / "table.md").read_text()
    assert all(name in table for name in class_names)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers


# --------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------
def test_evaluate_la_folder(tmp_path, la_checkpoint, la_root, la_list):
    out = tmp_path / "eval"
    summary = evaluate_checkpoint(
        la_checkpoint,
        la_root,
        split=str(la_list),
        out_dir=out,
        device="cpu",
        batch_size=16,
        save_predictions=True,
        progress=False,
    )
    check_reports(out, summary, 2, ["left_atrium"])  # the data's names win over the meta's
    info = json.loads((out / INFO_FILE).read_text())
    assert info["data"]["format"] == "la"  # detected from the folder
    assert info["intensity_policy"] == MR_POLICY
    assert [c["case"] for c in info["cases"]] == read_list(la_list)
    cases = read_dataset("la", la_root, read_list(la_list))
    for case in cases:
        pred = nib.load(str(out / "predictions" / f"{case.case_id}.nii.gz"))
        arr = np.asarray(pred.dataobj).T  # nibabel (x, y, z) -> (D, H, W)
        assert arr.shape == case.shape
        np.testing.assert_allclose(pred.header.get_zooms(), case.spacing[::-1])
        assert set(np.unique(arr).tolist()) <= {0, 1}
        row = [r for r in read_per_case_csv(out / "per_case.csv") if r["case"] == case.case_id]
        assert row[0]["pred_voxels"] == int((arr == 1).sum())
        assert row[0]["gt_voxels"] == int((case.label == 1).sum())
        assert (row[0]["spacing_d_mm"], row[0]["spacing_h_mm"]) == case.spacing[:2]


def test_evaluate_acdc_with_run_config(tmp_path, acdc_checkpoint, acdc_root, acdc_list):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"backbone": "tiny", "image_size": 64, "num_classes": 3},
                "data": {
                    "format": "acdc",
                    "root": str(acdc_root),
                    "test_list": str(acdc_list),
                },
            }
        )
    )
    out = tmp_path / "eval"
    summary = evaluate_checkpoint(
        acdc_checkpoint, config, out_dir=out, device="cpu", stage=1, progress=False
    )
    check_reports(out, summary, 2, ["right_ventricle", "myocardium", "left_ventricle"])
    assert summary["cases"] == sorted(read_list(acdc_list))
    info = json.loads((out / INFO_FILE).read_text())
    assert info["stage"] == "1" and info["data"]["format"] == "acdc"
    assert "data.test_list" in info["data"]["ids_from"]


def test_evaluate_with_checkpoint_data_config(tmp_path, la_checkpoint, la_list):
    out = tmp_path / "eval"
    summary = evaluate_checkpoint(la_checkpoint, out_dir=out, device="cpu", progress=False)
    assert summary["cases"] == sorted(read_list(la_list))
    # a second run refuses to overwrite, then overwrites when asked, with the same result
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputExistsError):
        evaluate_checkpoint(la_checkpoint, out_dir=out, device="cpu", progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    again = evaluate_checkpoint(
        la_checkpoint, out_dir=out, device="cpu", overwrite=True, progress=False
    )
    assert again == summary


# --------------------------------------------------------------------------------------------
# class-count mismatches and bad input
# --------------------------------------------------------------------------------------------
def test_three_class_checkpoint_on_la_is_refused(tmp_path, acdc_checkpoint, la_root, la_list):
    out = tmp_path / "eval"
    with pytest.raises(CheckpointError, match=r"predicts 3 foreground class\(es\).* has 1"):
        evaluate_checkpoint(acdc_checkpoint, la_root, split=str(la_list), out_dir=out, device="cpu")
    assert not out.exists()


def test_one_class_checkpoint_on_acdc_is_refused(tmp_path, la_checkpoint, acdc_root, acdc_list):
    out = tmp_path / "eval"
    with pytest.raises(CheckpointError, match=r"predicts 1 foreground class\(es\).* has 3"):
        evaluate_checkpoint(
            la_checkpoint,
            acdc_root,
            split=str(acdc_list),
            out_dir=out,
            device="cpu",
            save_predictions=True,
        )
    assert not out.exists()


def test_prepared_data_with_more_classes_is_refused(tmp_path, la_checkpoint):
    """A prepared dataset with labels 0..2 for a K = 1 model."""
    root = tmp_path / "prepared"
    (root / "cases").mkdir(parents=True)
    (root / "dataset.json").write_text("{}")
    label = np.zeros((4, 16, 16), np.uint8)
    label[1, 4:8, 4:8] = 2
    np.savez(
        root / "cases" / "c1.npz",
        image=np.random.default_rng(0).random((4, 16, 16)).astype(np.float32),
        label=label,
        spacing=np.ones(3),
        label_names=np.asarray(json.dumps({"0": "background", "1": "a", "2": "b"})),
        intensity=np.asarray("none"),
    )
    (root / "test.list").write_text("c1\n")
    assert detect_format(root) == "prepared"
    with pytest.raises(CheckpointError, match=r"predicts 1 .* has 2"):
        evaluate_checkpoint(la_checkpoint, root, out_dir=tmp_path / "eval", device="cpu")
    assert not (tmp_path / "eval").exists()


def test_config_with_other_class_count_is_refused(tmp_path, la_checkpoint, acdc_root):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"num_classes": 3},
                "data": {"format": "acdc", "root": str(acdc_root)},
            }
        )
    )
    with pytest.raises(CheckpointError, match=r"predicts 1 .*model.num_classes = 3"):
        evaluate_checkpoint(la_checkpoint, config, out_dir=tmp_path / "eval", device="cpu")


def test_failure_after_staged_predictions_leaves_nothing(tmp_path, la_checkpoint, la_root):
    """A case that cannot be read after one that was predicted and staged: no report, no
    prediction, no temp folder, and the output folder this call created is gone again."""
    bad_list = tmp_path / "bad.list"
    bad_list.write_text(read_list(la_root / "test.list")[0] + "\nNOT_A_CASE\n")
    out = tmp_path / "eval"
    with pytest.raises(DataError, match="NOT_A_CASE"):
        evaluate_checkpoint(
            la_checkpoint,
            la_root,
            split=str(bad_list),
            out_dir=out,
            device="cpu",
            save_predictions=True,
            progress=False,
        )
    assert not out.exists()


def test_existing_reports_are_refused_before_any_work(tmp_path, la_checkpoint):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "table.md").write_text("mine")
    with pytest.raises(OutputExistsError, match="table.md"):
        evaluate_checkpoint(la_checkpoint, out_dir=out, device="cpu")
    assert [p.name for p in out.iterdir()] == ["table.md"]
    assert (out / "table.md").read_text() == "mine"


def test_missing_data_and_splits(tmp_path, la_checkpoint, la_root):
    with pytest.raises(DataError, match="does not exist"):
        evaluate_checkpoint(la_checkpoint, tmp_path / "nope", out_dir=tmp_path / "e")
    with pytest.raises(DataError, match="neither 'test', 'val', 'all' nor"):
        evaluate_checkpoint(la_checkpoint, la_root, split="dev", out_dir=tmp_path / "e")
    with pytest.raises(DataError, match="no 'val' split"):
        evaluate_checkpoint(la_checkpoint, la_root, split="val", out_dir=tmp_path / "e")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        evaluate_checkpoint(la_checkpoint, tmp_path / "empty", out_dir=tmp_path / "e")
    assert not (tmp_path / "e").exists()


# --------------------------------------------------------------------------------------------
# data and split resolution (no model)
# --------------------------------------------------------------------------------------------
def test_detect_format(la_root, acdc_root):
    assert detect_format(la_root) == "la"
    assert detect_format(acdc_root) == "acdc"


def test_resolve_split_sources(tmp_path, la_root, acdc_root):
    ids, how = resolve_split("test", fmt="la", root=la_root)
    assert ids == read_list(la_root / "test.list") and "test list" in how
    ids, _ = resolve_split("val", fmt="acdc", root=acdc_root)
    assert ids == read_list(acdc_root / "val.list")
    meta = {"manifest": {"train": ["a"], "val": ["x1", "x2"]}}
    ids, how = resolve_split("val", fmt="acdc", root=acdc_root, meta=meta, from_config=True)
    assert ids == ["x1", "x2"] and "manifest" in how
    ids, _ = resolve_split("val", fmt="la", root=la_root, meta=meta)  # folder has no val list
    assert ids == ["x1", "x2"]
    listed = tmp_path / "my.txt"
    listed.write_text("b\n\na\n")
    assert resolve_split(str(listed), fmt="la", root=la_root)[0] == ["b", "a"]
    prepared = tmp_path / "prep"
    (prepared / "splits").mkdir(parents=True)
    (prepared / "split_manifest.json").write_text(json.dumps({"train": ["t"], "val": ["v"]}))
    (prepared / "splits" / "test.txt").write_text("z\n")
    assert resolve_split("val", fmt="prepared", root=prepared)[0] == ["v"]
    assert resolve_split("test", fmt="prepared", root=prepared)[0] == ["z"]


def test_nan_free_json_and_metrics_finite(tmp_path, acdc_checkpoint, acdc_root, acdc_list):
    """An untrained model may miss classes: strict metrics become NaN in the CSV and null in
    the JSON; legacy ones stay finite."""
    out = tmp_path / "eval"
    evaluate_checkpoint(
        acdc_checkpoint, acdc_root, split=str(acdc_list), out_dir=out, device="cpu", progress=False
    )

    def no_constants(name: str) -> None:
        raise AssertionError(f"summary.json holds {name}")

    json.loads((out / "summary.json").read_text(), parse_constant=no_constants)
    for row in read_per_case_csv(out / "per_case.csv"):
        assert all(math.isfinite(row[f"legacy_{m}"]) for m in ("dice", "hd95", "nsd"))


def test_largest_component_postprocessing_is_what_gets_scored(
    tmp_path, acdc_checkpoint, acdc_root, acdc_list
):
    """The untrained K = 3 model scatters every class; --postprocess largest_component saves
    and scores the raw prediction with each class cut to its largest 3-D component."""
    runs = {}
    for method in ("none", "largest_component"):
        out = tmp_path / method
        evaluate_checkpoint(
            acdc_checkpoint,
            acdc_root,
            split=str(acdc_list),
            out_dir=out,
            device="cpu",
            save_predictions=True,
            postprocess=method,
            progress=False,
        )
        runs[method] = out
    case_id = read_list(acdc_list)[0]
    raw, kept = (
        np.asarray(nib.load(str(runs[m] / "predictions" / f"{case_id}.nii.gz")).dataobj)
        for m in ("none", "largest_component")
    )
    np.testing.assert_array_equal(kept, keep_largest_component(raw, 3))
    infos = {m: json.loads((runs[m] / INFO_FILE).read_text()) for m in runs}
    assert [(i["postprocess"], i["tta"]) for i in infos.values()] == [
        ("none", "none"),
        ("largest_component", "none"),
    ]
    rows = {m: read_per_case_csv(runs[m] / "per_case.csv") for m in runs}
    pairs = zip(rows["none"], rows["largest_component"], strict=True)
    assert all(b["pred_voxels"] <= a["pred_voxels"] for a, b in pairs)
    with pytest.raises(ConfigError, match="post-processing"):
        evaluate_checkpoint(
            acdc_checkpoint,
            acdc_root,
            split=str(acdc_list),
            out_dir=tmp_path / "x",
            postprocess="median",
        )


def test_cli_flip_tta_is_scored_and_recorded(tmp_path, acdc_checkpoint, acdc_root, acdc_list):
    """`hsam evaluate --tta flip` scores the flip-averaged prediction and says so in the
    evaluation record."""
    outs = {}
    for tta in ("none", "flip"):
        outs[tta] = tmp_path / tta
        argv = ["evaluate", "--checkpoint", str(acdc_checkpoint), "--data", str(acdc_root)]
        argv += ["--split", str(acdc_list), "--out", str(outs[tta]), "--device", "cpu"]
        assert cli_main([*argv, "--tta", tta, "--save-predictions"]) == 0
        assert json.loads((outs[tta] / INFO_FILE).read_text())["tta"] == tta
    case_id = read_list(acdc_list)[0]
    none, flip = (
        np.asarray(nib.load(str(outs[t] / "predictions" / f"{case_id}.nii.gz")).dataobj)
        for t in ("none", "flip")
    )
    assert not np.array_equal(none, flip)
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--checkpoint", str(acdc_checkpoint), "--out", "x", "--tta", "rot"])


def test_cli_slice_smoothing_is_applied_and_recorded(
    tmp_path, acdc_checkpoint, acdc_root, acdc_list, caplog
):
    """`hsam evaluate --slice-smoothing` scores the smoothed prediction and records it; a
    negative sigma is refused before anything is written."""
    outs = {}
    for sigma in ("0", "2"):
        outs[sigma] = tmp_path / sigma
        argv = ["evaluate", "--checkpoint", str(acdc_checkpoint), "--data", str(acdc_root)]
        argv += ["--split", str(acdc_list), "--out", str(outs[sigma]), "--device", "cpu"]
        assert cli_main([*argv, "--slice-smoothing", sigma, "--save-predictions"]) == 0
        info = json.loads((outs[sigma] / INFO_FILE).read_text())
        assert info["slice_smoothing"] == float(sigma)
    case_id = read_list(acdc_list)[0]
    plain, smoothed = (
        np.asarray(nib.load(str(outs[s] / "predictions" / f"{case_id}.nii.gz")).dataobj)
        for s in ("0", "2")
    )
    assert not np.array_equal(plain, smoothed)
    argv = ["evaluate", "--checkpoint", str(acdc_checkpoint), "--out", str(tmp_path / "bad")]
    assert cli_main([*argv, "--slice-smoothing", "-1"]) == 2
    assert "slice smoothing must be a finite sigma >= 0" in caplog.text
    assert not (tmp_path / "bad").exists()


def test_saved_predictions_keep_the_nifti_header(tmp_path):
    """`--save-predictions` writes with predict's writer: a NIfTI input whose qform and sform
    differ keeps both and their codes, so nibabel places the prediction where the input is."""
    root = tmp_path / "Dataset005_Header"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1}}
    (root / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".nii.gz"}))
    rng = np.random.default_rng(0)
    vol = rng.uniform(0, 100, (5, 20, 24)).astype(np.float32)  # (D, H, W)
    lab = np.zeros(vol.shape, np.uint8)
    lab[1:3, 5:10, 6:12] = 1
    sform = np.diag([0.8, 0.9, 2.5, 1.0])
    sform[:3, 3] = (10.0, -20.0, 30.0)
    qform = sform.copy()
    qform[:3, 3] += (5.0, 0.0, 0.0)  # the same grid 5 mm away: qform and sform disagree
    image = root / "imagesTr" / "c1_0000.nii.gz"
    for path, data in ((image, vol), (root / "labelsTr" / "c1.nii.gz", lab)):
        img = nib.Nifti1Image(data.T, None)
        img.set_sform(sform, code=2)
        img.set_qform(qform, code=1)
        nib.save(img, str(path))
    checkpoint = make_checkpoint(tmp_path / "k1.pt", trained=False, policy=MR_POLICY)
    out = tmp_path / "eval"
    evaluate_checkpoint(
        checkpoint,
        root,
        format="nnunet",
        split="all",
        out_dir=out,
        device="cpu",
        save_predictions=True,
        progress=False,
    )
    src, pred = nib.load(str(image)), nib.load(str(out / "predictions" / "c1.nii.gz"))
    assert pred.shape == src.shape
    np.testing.assert_array_equal(pred.affine, src.affine)
    np.testing.assert_array_equal(pred.header.get_qform(), src.header.get_qform())
    np.testing.assert_array_equal(pred.header.get_sform(), src.header.get_sform())
    assert int(pred.header["qform_code"]) == 1 and int(pred.header["sform_code"]) == 2


def test_report_folder_under_a_file_is_refused_before_any_work(tmp_path):
    """The checkpoint does not exist: the output check must come first (no compute)."""
    from hsam.errors import OutputError

    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    with pytest.raises(OutputError, match="a_file, which is a file"):
        evaluate_checkpoint(tmp_path / "missing.pt", None, out_dir=blocker / "reports")
    assert blocker.read_text() == "mine"


# --------------------------------------------------------------------------------------------
# checkpoints written before K was stored once (config["data"] also holds num_classes)
# --------------------------------------------------------------------------------------------
def _with_data_num_classes(checkpoint: Path, path: Path, k: int) -> Path:
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert "num_classes" not in payload["config"]["data"]  # what this version writes
    payload["config"]["data"]["num_classes"] = k
    torch.save(payload, path)
    return path


def test_old_checkpoint_with_data_num_classes_evaluates_the_same(tmp_path, la_checkpoint):
    old = _with_data_num_classes(la_checkpoint, tmp_path / "old.pt", 1)
    new_summary = evaluate_checkpoint(
        la_checkpoint, out_dir=tmp_path / "new", device="cpu", progress=False
    )
    old_summary = evaluate_checkpoint(old, out_dir=tmp_path / "old", device="cpu", progress=False)
    assert old_summary == new_summary


def test_checkpoint_with_two_different_class_counts_is_refused(tmp_path, la_checkpoint):
    bad = _with_data_num_classes(la_checkpoint, tmp_path / "bad.pt", 3)
    with pytest.raises(ConfigError, match=r"data.num_classes \(3\) and model.num_classes \(1\)"):
        evaluate_checkpoint(bad, out_dir=tmp_path / "eval", device="cpu", progress=False)
