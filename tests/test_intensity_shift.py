"""benchmarks/intensity_shift.py: the knee curve, and Dice of the unshifted volume."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from conftest import load_benchmark, make_checkpoint, write_nnunet_dataset
from hsam.data import read_dataset
from hsam.evaluation.scoring import evaluate_cases
from hsam.inference.predictor import Predictor


@pytest.fixture(scope="module")
def intensity_shift():
    yield from load_benchmark("intensity_shift")


def test_knee_darkens_the_middle_and_keeps_the_top(intensity_shift):
    x = np.linspace(0.0, 1.0, 201, dtype=np.float32)
    out = intensity_shift.knee(x, 0.6, 0.85)
    assert np.all(np.diff(out) > 0)  # strictly monotone: no two intensities merge
    assert out[0] == 0.0 and out[-1] == pytest.approx(1.0)
    assert out[164] == pytest.approx(0.6 * 0.82)  # an LA blood pool at 0.82 goes to 0.49
    np.testing.assert_allclose(intensity_shift.knee(x, 1.0, 0.85), x, atol=1e-6)
    with pytest.raises(ValueError, match="factor"):
        intensity_shift.knee(x, 0.0, 0.85)


def test_factor_one_scores_what_evaluate_scores(tmp_path, intensity_shift, caplog):
    root = write_nnunet_dataset(tmp_path / "data", n_cases=1)
    ckpt = make_checkpoint(tmp_path / "bright.pt")
    argv = [str(ckpt), "--format", "nnunet", "--root", str(root), "--cases", "case0"]
    with caplog.at_level(logging.INFO, logger="intensity_shift"):
        assert intensity_shift.main([*argv, "--factors", "1", "0.3", "--gammas", "1"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "intensity_shift"]
    names = [line.split(":")[0] for line in lines]
    assert names == ["case0 factor 1", "case0 factor 0.3", "case0 gamma 1"]
    assert lines[2].split(":")[1] == lines[0].split(":")[1]  # gamma 1 is the volume itself
    (case,) = read_dataset("nnunet", root, ["case0"])
    (evaluation,) = evaluate_cases(
        Predictor.from_checkpoint(ckpt, device="cpu", precision="auto"), [case], metrics="dice"
    )
    expected = 100 * float(np.mean(evaluation.scores[0].dice))
    assert f"Dice {expected:.2f}," in lines[0]
    assert float(lines[0].split("Dice ")[1].split(",")[0]) > 50  # the model finds the blob
    medians = [float(line.split("labelled median ")[1].split(",")[0]) for line in lines]
    assert medians[1] < medians[0]  # the shifted volume is the one scored
