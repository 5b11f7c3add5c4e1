"""benchmarks/acdc_validation.py: which frames it scores, and its per-frame report."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import load_benchmark, make_checkpoint
from hsam.evaluation.scoring import evaluate_cases
from hsam.inference.predictor import Predictor


@pytest.fixture(scope="module")
def acdc_validation():
    yield from load_benchmark("acdc_validation")


def _acdc_slices(root: Path, patients: list[str], shape: tuple[int, int]) -> None:
    """Two frames of 2 slices per patient, listed patient by patient as SSL4MIS lists them."""
    rng = np.random.default_rng(0)
    lines = []
    for patient in patients:
        for frame in ("frame01", "frame02"):
            for index in (0, 1):
                name = f"{patient}_{frame}_slice_{index}"
                label = np.zeros(shape, np.uint8)
                label[4:12, 4:10] = 1 + index
                label[14:20, 12:18] = 3
                path = root / "data" / "slices" / f"{name}.h5"
                path.parent.mkdir(parents=True, exist_ok=True)
                with h5py.File(path, "w") as f:
                    f["image"] = rng.random(shape).astype(np.float32)
                    f["label"] = label
                lines.append(name)
    (root / "train_slices.list").write_text("\n".join(lines) + "\n")


def test_validation_frames_skip_the_labelled_patients(tmp_path, acdc_validation):
    _acdc_slices(tmp_path, ["patient001", "patient002", "patient003", "patient004"], (24, 20))
    # The first 4 lines are patient001's frame01: all of patient001 is labelled, never scored.
    frames = acdc_validation.validation_frames(tmp_path, labelled_lines=4, every=1)
    ids = [c.case_id for c in frames]
    assert ids == [f"patient00{p}_frame0{f}" for p in (2, 3, 4) for f in (1, 2)]
    assert all(c.image.shape == (2, 24, 20) for c in frames)
    every_other = acdc_validation.validation_frames(tmp_path, labelled_lines=4, every=2)
    assert [c.case_id for c in every_other] == ids[:2] + ids[4:]


def test_per_frame_logs_each_frames_shape_and_class_dice(tmp_path, acdc_validation, caplog):
    _acdc_slices(tmp_path, ["patient001", "patient002"], (24, 20))
    ckpt = make_checkpoint(tmp_path / "k3.pt", num_classes=3, trained=False)
    argv = [str(ckpt), "--root", str(tmp_path), "--labelled-lines", "4", "--every", "1"]
    with caplog.at_level(logging.INFO, logger="acdc_validation"):
        assert acdc_validation.main([*argv, "--stages", "fused", "--per-frame"]) == 0
    rows = [r.getMessage() for r in caplog.records if r.getMessage().startswith("  ")]
    assert [r.split()[0] for r in rows] == ["patient002_frame01", "patient002_frame02"]
    for row in rows:
        assert "(2, 24, 20) fused [" in row
        per_class = [float(v) for v in row.split("[")[1].rstrip("]").split(",")]
        assert len(per_class) == 3 and all(0.0 <= v <= 100.0 for v in per_class)
    summary = caplog.records[-1].getMessage()
    assert summary.startswith(str(ckpt)) and "'fused'" in summary
    # The per-class line holds each class's mean over the frames, whose mean is the summary.
    classes = caplog.records[-2].getMessage()
    assert classes.startswith(f"{ckpt} per-class mean Dice")
    class_means = [float(v) for v in classes.split("[")[1].rstrip("]}").split(",")]
    frame_rows = [[float(v) for v in r.split("[")[1].rstrip("]").split(",")] for r in rows]
    assert class_means == pytest.approx(np.mean(frame_rows, axis=0), abs=0.06)
    assert float(summary.split(":")[1].rstrip("}")) == pytest.approx(np.mean(class_means), abs=0.06)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="acdc_validation"):
        acdc_validation.main([*argv, "--stages", "fused"])
    assert not any(r.getMessage().startswith("  ") for r in caplog.records)


def test_postprocess_variants_score_what_the_postprocessed_predictor_scores(
    tmp_path, acdc_validation, caplog
):
    _acdc_slices(tmp_path, ["patient001", "patient002"], (24, 20))
    ckpt = make_checkpoint(tmp_path / "k3.pt", num_classes=3, trained=False)
    argv = [str(ckpt), "--root", str(tmp_path), "--labelled-lines", "4", "--every", "1"]
    with caplog.at_level(logging.INFO, logger="acdc_validation"):
        main_args = [*argv, "--stages", "fused", "--per-frame"]
        assert acdc_validation.main([*main_args, "--postprocess", "none", "largest_component"]) == 0
    rows = {
        tuple(r.getMessage().split()[i] for i in (0, 4)): r.getMessage().split("[")[1]
        for r in caplog.records
        if r.getMessage().startswith("  ")
    }
    frames = acdc_validation.validation_frames(tmp_path, labelled_lines=4, every=1)
    for postprocess, key in (("none", "fused"), ("largest_component", "fused+largest_component")):
        predictor = Predictor.from_checkpoint(
            ckpt, device="cpu", precision="auto", postprocess=postprocess
        )
        for case, evaluation in zip(
            frames, evaluate_cases(predictor, frames, metrics="dice"), strict=True
        ):
            expected = [round(100 * d, 1) for d in evaluation.scores[0].dice]
            logged = [float(v) for v in rows[(case.case_id, key)].rstrip("]").split(",")]
            assert logged == expected, (case.case_id, key)
    # the untrained model scatters its labels, so keeping the largest component changes Dice
    assert any(
        rows[(c.case_id, "fused")] != rows[(c.case_id, "fused+largest_component")] for c in frames
    )
    summary = caplog.records[-1].getMessage()
    assert "'fused'" in summary and "'fused+largest_component'" in summary
