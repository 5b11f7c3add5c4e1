"""Predicted-size check: training ranges of class volume fractions (hsam.data.slices), the
warning rule (hsam.inference.volume_check), and its reports/logs in `hsam evaluate` and
`hsam predict`.

End-to-end tests use the tiny bright-voxel checkpoint of ``test_prediction`` (K = 1, CT window):
on a volume with a bright box it predicts about the box (~6.7 % of the voxels), on a volume
without one it predicts nothing -- the silent "almost empty mask" failure the check is for.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import BOX, BOX_SHAPE, CT_POLICY, make_checkpoint, tiny_run_config, write_nifti
from hsam.apps.evaluate import INFO_FILE, evaluate_checkpoint
from hsam.apps.predict import predict_files
from hsam.data import (
    Case,
    SliceDataset,
    class_volume_fraction_ranges,
    class_volume_fractions,
)
from hsam.errors import ConfigError, DataError
from hsam.evaluation.reports import (
    CSV_COLUMNS,
    case_rows,
    markdown_table,
    read_per_case_csv,
    summarize,
    write_per_case_csv,
)
from hsam.inference.volume_check import (
    DEFAULT_FACTOR,
    META_KEY,
    check_factor,
    ranges_from_meta,
    volume_warnings,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------
# training ranges
# --------------------------------------------------------------------------------------------
def _case(case_id: str, label: np.ndarray) -> Case:
    return Case(
        case_id=case_id,
        image=np.zeros(label.shape, np.float32),
        label=label.astype(np.uint8),
        spacing=(1.0, 1.0, 1.0),
    )


def two_cases() -> list[Case]:
    """(4, 10, 10) volumes = 400 voxels. a: class 1 in slice 1 only (20 voxels), class 2 in
    slices 1-2 (2 x 10); b: class 1 in slices 0 and 3 (2 x 40), no class 2."""
    a = np.zeros((4, 10, 10), np.uint8)
    a[1, :2, :] = 1
    a[1, 5, :] = 2
    a[2, 5, :] = 2
    b = np.zeros((4, 10, 10), np.uint8)
    b[0, :4, :] = 1
    b[3, :4, :] = 1
    return [_case("a", a), _case("b", b)]


def test_volume_fractions_of_cases_use_whole_volumes_even_with_foreground_only():
    cases = two_cases()
    expected = {"a": [360 / 400, 20 / 400, 20 / 400], "b": [320 / 400, 80 / 400, 0.0]}
    for data in (
        cases,
        SliceDataset(cases, 8),
        SliceDataset(cases, 8, foreground_only=True),  # a: slices 1-2, b: 0 and 3 kept
        SliceDataset(cases, 8, slice_ids=["a_slice001", "b_slice000"]),
    ):
        got = class_volume_fractions(data, 2)
        assert list(got) == ["a", "b"]
        for k, v in expected.items():
            np.testing.assert_allclose(got[k], v)
    ranges = class_volume_fraction_ranges(SliceDataset(cases, 8, foreground_only=True), 2)
    assert ranges == {1: (20 / 400, 80 / 400), 2: (0.0, 20 / 400)}
    # a case none of whose slices was selected is not a training case
    only_a = SliceDataset(cases, 8, slice_ids=["a_slice001"])
    assert list(class_volume_fractions(only_a, 2)) == ["a"]


def _write_acdc_slices(root: Path, cases: list[Case]) -> list[str]:
    base = root / "data" / "slices"
    base.mkdir(parents=True)
    ids = []
    for case in cases:
        assert case.label is not None
        for d in range(case.num_slices):
            name = f"{case.case_id}_slice_{d}"
            with h5py.File(base / f"{name}.h5", "w") as f:
                f["image"] = np.zeros(case.label[d].shape, np.float32)
                f["label"] = case.label[d]
            ids.append(name)
    return ids


def test_volume_fractions_of_slice_files_use_the_selected_slices(tmp_path):
    """2-D slice files (ACDC h5): a case is its selected slices; with foreground_only only the
    slices with a label are selected, so the fraction is over those."""
    ids = _write_acdc_slices(tmp_path, two_cases())
    all_slices = SliceDataset.from_slice_list("acdc", tmp_path, ids, 8)
    got = class_volume_fractions(all_slices, 3)
    np.testing.assert_allclose(got["a"], [360 / 400, 20 / 400, 20 / 400, 0])
    np.testing.assert_allclose(got["b"], [320 / 400, 80 / 400, 0, 0])
    fg = SliceDataset.from_slice_list("acdc", tmp_path, ids, 8, foreground_only=True)
    got = class_volume_fractions(fg, 3)
    np.testing.assert_allclose(got["a"], [160 / 200, 20 / 200, 20 / 200, 0])  # slices 1, 2
    np.testing.assert_allclose(got["b"], [120 / 200, 80 / 200, 0, 0])  # slices 0, 3
    assert class_volume_fraction_ranges(fg, 3) == {
        1: (0.1, 0.4),
        2: (0.0, 0.1),
        3: (0.0, 0.0),
    }
    # only some slices of a case listed: the fraction is over those
    part = SliceDataset.from_slice_list("acdc", tmp_path, ["a_slice_1", "a_slice_3"], 8)
    np.testing.assert_allclose(class_volume_fractions(part, 3)["a"], [170 / 200, 0.1, 0.05, 0])


def test_volume_fractions_refuse_labels_above_k():
    with pytest.raises(DataError, match="exceed K = 1"):
        class_volume_fraction_ranges(two_cases(), 1)
    with pytest.raises(DataError, match="no labelled training case"):
        class_volume_fraction_ranges([], 1)


# --------------------------------------------------------------------------------------------
# the warning rule
# --------------------------------------------------------------------------------------------
def labels_with(fractions: dict[int, float], n: int = 10_000) -> np.ndarray:
    lab = np.zeros(n, np.uint8)
    start = 0
    for c, f in fractions.items():
        k = round(f * n)
        lab[start : start + k] = c
        start += k
    return lab.reshape(10, 10, -1)


RANGES = {"1": [0.02, 0.05], "2": [0.0, 0.01]}  # class 2 absent from some training case


def test_in_range_and_within_the_factor_do_not_warn():
    assert volume_warnings(labels_with({1: 0.03, 2: 0.005}), 2, RANGES, 3) == []
    # just inside lo / factor and hi * factor
    assert volume_warnings(labels_with({1: 0.0067, 2: 0.0299}), 2, RANGES, 3) == []
    assert volume_warnings(labels_with({1: 0.149}), 2, RANGES, 3) == []
    # class 2 may be absent: its training minimum is 0
    assert volume_warnings(labels_with({1: 0.03}), 2, RANGES, 3) == []


def test_far_outside_warns_with_names_and_numbers():
    (small,) = volume_warnings(
        labels_with({1: 0.006}), 2, RANGES, 3, label_names={1: "left atrium"}
    )
    assert (small.class_index, small.class_name, small.kind) == (1, "left atrium", "small")
    assert small.voxels == 60 and small.fraction == pytest.approx(0.006)
    assert (small.train_min, small.train_max, small.factor) == (0.02, 0.05, 3.0)
    for text in ("'left atrium'", "0.6%", "60 voxels", "2% to 5%", "3.3x below"):
        assert text in small.detail, (text, small.detail)
    assert small.message.startswith(small.detail) and "check this segmentation" in small.message
    large = volume_warnings(labels_with({1: 0.2, 2: 0.031}), 2, RANGES, 3)
    assert [(w.class_index, w.kind) for w in large] == [(1, "large"), (2, "large")]
    assert "4.0x above the training maximum" in large[0].detail
    record = large[1].to_dict()
    assert record["class_name"] == "class_2" and record["train_range"] == [0.0, 0.01]
    json.dumps(record)


def test_empty_prediction_of_an_always_present_class_warns():
    (w,) = volume_warnings(np.zeros((4, 8, 8), np.uint8), 2, RANGES)
    assert w.kind == "absent" and w.voxels == 0 and w.class_index == 1
    assert "absent from the prediction" in w.detail and "every training case" in w.detail
    # even a huge factor: absent is always flagged when every training case has the class
    assert volume_warnings(np.zeros(100, np.uint8), 2, RANGES, 1e9)[0].kind == "absent"


def test_class_never_seen_in_training_warns_when_predicted():
    (w,) = volume_warnings(labels_with({2: 0.01}), 2, {"2": [0.0, 0.0]}, 3)
    assert w.kind == "large" and "no training case contains" in w.detail


def test_missing_ranges_or_factor_skip_the_check():
    empty = np.zeros((2, 4, 4), np.uint8)
    assert volume_warnings(empty, 2, None) == []
    assert volume_warnings(empty, 2, {}) == []
    assert volume_warnings(empty, 2, RANGES, None) == []
    assert volume_warnings(empty, 2, RANGES, 0) == []
    assert volume_warnings(empty, 2, {1: (0.1, 0.2)})[0].kind == "absent"  # int keys too
    assert ranges_from_meta({"epoch": 3}, 2) is None  # older checkpoint
    assert ranges_from_meta({META_KEY: RANGES}, 2) == {1: (0.02, 0.05), 2: (0.0, 0.01)}
    with pytest.raises(ValueError, match=">= 1"):
        check_factor(0.5)
    assert check_factor(None) is None and check_factor(DEFAULT_FACTOR) == DEFAULT_FACTOR


def test_malformed_meta_is_skipped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="hsam.inference.volume_check"):
        assert ranges_from_meta({META_KEY: [0.1, 0.2]}, 1) is None
        assert ranges_from_meta({META_KEY: {"1": "x", "2": [0.5, 0.1]}}, 2) is None
        assert ranges_from_meta({META_KEY: {"1": [0.1, 0.2], "7": [0, 1]}}, 2) == {1: (0.1, 0.2)}
    assert len(caplog.records) == 4


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------
def _result(gt: int, pred: int) -> dict:
    metrics = {"dice": 0.5, "hd95": 1.0, "nsd": 0.5}
    return {
        "num_classes": 1,
        "spacing": (1.0, 1.0, 1.0),
        "classes": [
            {
                "class_index": 1,
                "gt_voxels": gt,
                "pred_voxels": pred,
                "nsd_tolerance_mm": 2.0,
                "legacy": metrics,
                "strict": metrics,
            }
        ],
    }


def test_reports_carry_the_warnings_and_read_older_csvs(tmp_path):
    rows = case_rows("ok", _result(100, 90), ["atrium"]) + case_rows(
        "bad", _result(100, 0), ["atrium"], volume_warnings={1: "class 'atrium' is absent, x"}
    )
    assert rows[0]["volume_warning"] == "" and CSV_COLUMNS[-1] == "volume_warning"
    path = write_per_case_csv(rows, tmp_path / "per_case.csv")
    back = read_per_case_csv(path)
    assert [r["volume_warning"] for r in back] == ["", "class 'atrium' is absent, x"]
    s = summarize(back, n_resamples=10)
    assert s == summarize(rows, n_resamples=10)
    assert s["volume_warnings"] == [
        {
            "case": "bad",
            "class_index": 1,
            "class_name": "atrium",
            "warning": "class 'atrium' is absent, x",
        }
    ]
    md = markdown_table({"run": s})
    assert "## Predicted-size warnings" in md and "| run | bad | atrium |" in md
    # a CSV from before the column existed: read as no warnings, summary unchanged otherwise
    with open(path, newline="") as fh:
        table = list(csv.reader(fh))
    old = tmp_path / "old.csv"
    with open(old, "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows([r[:-1] for r in table])
    old_rows = read_per_case_csv(old)
    assert [r["volume_warning"] for r in old_rows] == ["", ""]
    s_old = summarize(old_rows, n_resamples=10)
    assert s_old["volume_warnings"] == []
    assert s_old["policies"] == s["policies"]
    assert "Predicted-size warnings" not in markdown_table({"run": s_old})
    # rows built without the column (other callers) are still written
    bare = [{k: v for k, v in r.items() if k != "volume_warning"} for r in rows]
    write_per_case_csv(bare, tmp_path / "bare.csv")
    # an older summary without the key still tabulates
    del s_old["volume_warnings"]
    markdown_table({"run": s_old})


# --------------------------------------------------------------------------------------------
# end to end: evaluate and predict with a tiny checkpoint
# --------------------------------------------------------------------------------------------
def ct_volume(with_box: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU ``BOX_SHAPE`` volume: dark soft tissue (-100..50 HU) and, optionally, a bright box
    (200..275 HU, ~5.4 % of the voxels); and its label."""
    rng = np.random.default_rng(seed)
    vol = rng.uniform(-100, 50, BOX_SHAPE)
    label = np.zeros(BOX_SHAPE, np.uint8)
    if with_box:
        label[BOX] = 1
        vol[BOX] = rng.uniform(200, 275, vol[BOX].shape)
    return vol.astype(np.int16), label


def write_prepared(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    (root / "cases").mkdir(parents=True)
    (root / "dataset.json").write_text("{}")
    for cid, (vol, label) in cases.items():
        np.savez(
            root / "cases" / f"{cid}.npz",
            image=vol.astype(np.float32),
            label=label,
            spacing=np.array([3.0, 1.0, 1.0]),
            label_names=np.asarray(json.dumps({"0": "background", "1": "box"})),
            intensity=np.asarray("none"),
        )
    (root / "test.list").write_text("\n".join(cases) + "\n")
    return root


@pytest.fixture(scope="module")
def ranged_checkpoint(tmp_path_factory) -> Path:
    """Bright-voxel checkpoint whose meta says the box filled 4-8 % of every training case."""
    return make_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "ranged.pt",
        policy=CT_POLICY,
        extra_meta={META_KEY: {"1": [0.04, 0.08]}},
    )


def test_evaluate_warns_and_reports_the_failed_case(tmp_path, ranged_checkpoint, caplog):
    # the "failed" case's ground truth has the box, its image does not show it (lost contrast)
    failed = (ct_volume(False, 1)[0], ct_volume(True, 1)[1])
    root = write_prepared(tmp_path / "data", {"good": ct_volume(True, 0), "failed": failed})
    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING):
        summary = evaluate_checkpoint(
            ranged_checkpoint, root, out_dir=out, device="cpu", progress=False
        )
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    per_case = [m for m in warned if m.startswith("case failed: ")]
    assert len(per_case) == 1, warned
    assert "'box'" in per_case[0] and "absent from the prediction" in per_case[0]
    assert "4% to 8%" in per_case[0]
    assert not [m for m in warned if "case good" in m]
    assert any("1 of 2 case(s)" in m and "failed (box)" in m for m in warned)

    rows = {r["case"]: r for r in read_per_case_csv(out / "per_case.csv")}
    assert rows["good"]["volume_warning"] == ""
    assert "absent from the prediction" in rows["failed"]["volume_warning"]
    assert rows["failed"]["pred_voxels"] == 0
    assert [(w["case"], w["class_name"]) for w in summary["volume_warnings"]] == [("failed", "box")]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert "Predicted-size warnings" in (out / "table.md").read_text()
    info = json.loads((out / INFO_FILE).read_text())
    assert info["volume_check"] == {
        "factor": DEFAULT_FACTOR,
        "class_volume_fraction_range": {"1": [0.04, 0.08]},
        "checked": True,
        "n_warnings": 1,
    }
    by_case = {c["case"]: c["volume_warnings"] for c in info["cases"]}
    assert by_case["good"] == [] and by_case["failed"][0]["kind"] == "absent"

    # turned off: nothing flagged
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        s = evaluate_checkpoint(
            ranged_checkpoint,
            root,
            out_dir=tmp_path / "off",
            device="cpu",
            progress=False,
            volume_factor=0,
        )
    assert s["volume_warnings"] == [] and not caplog.records
    with pytest.raises(ConfigError, match=">= 1"):
        evaluate_checkpoint(ranged_checkpoint, root, out_dir=tmp_path / "x", volume_factor=0.5)


def test_checkpoint_without_ranges_is_not_checked(tmp_path, caplog):
    ckpt = make_checkpoint(tmp_path / "old.pt", policy=CT_POLICY)  # no META_KEY
    root = write_prepared(tmp_path / "data", {"failed": ct_volume(False, 1)})
    out = tmp_path / "eval"
    with caplog.at_level(logging.INFO):
        summary = evaluate_checkpoint(ckpt, root, out_dir=out, device="cpu", progress=False)
    assert summary["volume_warnings"] == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("not checked" in r.getMessage() for r in caplog.records)
    info = json.loads((out / INFO_FILE).read_text())
    assert info["volume_check"]["checked"] is False
    assert info["volume_check"]["class_volume_fraction_range"] is None


def test_predict_warns_on_the_file(tmp_path, ranged_checkpoint, caplog):
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    good = write_nifti(tmp_path / "good.nii.gz", ct_volume(True, 0)[0], aff)
    failed = write_nifti(tmp_path / "failed.nii.gz", ct_volume(False, 1)[0], aff)
    with caplog.at_level(logging.WARNING):
        written = predict_files(
            ranged_checkpoint, [good, failed], tmp_path / "out", device="cpu", progress=False
        )
    assert len(written) == 2  # the outputs are still written
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    per_file = [m for m in warned if m.startswith(f"{failed}: ")]
    assert len(per_file) == 1, warned
    assert "'sphere'" in per_file[0] and "absent" in per_file[0] and "4% to 8%" in per_file[0]
    assert not [m for m in warned if m.startswith(f"{good}: ")]
    assert any("1 of 2 input(s)" in m for m in warned)


def test_training_stores_the_ranges(tmp_path):
    """A tiny real training run (nnU-Net-layout data) writes the meta key; the ranges are those
    of its training cases (whole volumes)."""
    from hsam.config import load_run_config
    from hsam.data import read_dataset
    from hsam.engine.trainer import run_training

    cfg = load_run_config(tiny_run_config(tmp_path, epochs=1, val_every=1))
    run_training(cfg, tmp_path / "run")
    payload = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=True)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    train = read_dataset("nnunet", cfg.data.root, split["train"])
    lo, hi = class_volume_fraction_ranges(train, 1)[1]
    assert payload["meta"][META_KEY] == {"1": [pytest.approx(lo), pytest.approx(hi)]}
    assert 0 < lo <= hi < 1
