"""The public API (`hsam.*`): the README's Python example runs as written, and the Predictor
and the scoring loop give the numbers of the low-level functions they wrap."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hsam
from conftest import write_nnunet_dataset
from hsam.config import DataConfig, ModelConfig, TrainConfig, to_dict
from hsam.errors import CheckpointError, ConfigError, DataError
from hsam.evaluation.metrics import evaluate_case
from hsam.evaluation.reports import case_rows
from hsam.evaluation.scoring import evaluate_cases
from hsam.inference.postprocess import keep_largest_component
from hsam.inference.predictor import (
    InferenceOptions,
    Predictor,
    predict_shared,
    shared_prefix_groups,
)
from hsam.inference.slicewise import predict_volume
from hsam.intensity import to_model_range
from hsam.io.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
POLICY = "percentile[0.5,99.5]"
TINY = ModelConfig(backbone="tiny", image_size=64, num_classes=1, lora_rank=2, lora_last_n=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_model(seed: int, *, stages: int = 2, backbone_seed: int | None = None):
    """A tiny H-SAM whose trainable weights are moved off their initial values (so two seeds
    really differ); the frozen backbone comes from `backbone_seed` (default: `seed`)."""
    cfg = dataclasses.replace(TINY, stages=stages)
    built = hsam.build_hsam(cfg, seed=seed if backbone_seed is None else backbone_seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in built.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return built


def _write_checkpoint(
    path: Path, seed: int = 0, *, stages: int = 2, inference: dict | None = None
) -> Path:
    """A tiny checkpoint; its run config has an `inference` section only when given one (as
    checkpoints written before that section existed)."""
    built = _tiny_model(seed, stages=stages)
    cfg = dataclasses.replace(TINY, stages=stages)
    config = {
        "model": to_dict(cfg),
        "data": to_dict(DataConfig()),
        "train": to_dict(TrainConfig()),
    }
    if inference is not None:
        config["inference"] = inference
    meta = {"intensity_policy": POLICY, "label_names": {"0": "background", "1": "blob"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, built, config=config, meta=meta)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The files the README example names, relative to this folder."""
    root = tmp_path_factory.mktemp("api")
    _write_checkpoint(root / "runs" / "mine" / "checkpoints" / "best.pt")
    write_nnunet_dataset(root / "MyDataset", n_cases=2)
    (root / "scans").mkdir()
    shutil.copy(
        root / "MyDataset" / "imagesTr" / "case1_0000.nii.gz", root / "scans" / "case01.nii.gz"
    )
    return root


def _readme_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Python API section has no python block"
    return match.group(1)


# --------------------------------------------------------------------------------------------
# public names
# --------------------------------------------------------------------------------------------
def test_public_names_resolve_and_import_stays_light():
    code = (
        "import sys, hsam; light = 'torch' not in sys.modules; "
        "[getattr(hsam, n) for n in hsam.__all__]; print(light, hsam.Predictor.__module__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["True", "hsam.inference.predictor"]
    assert hsam.evaluate_cases is evaluate_cases
    assert set(hsam.__all__) == {"__version__", *hsam._EXPORTS}
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        hsam.nothing  # noqa: B018


def test_readme_python_example_runs_as_written(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    namespace: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), namespace)  # noqa: S102
    scan, labels, pred, cases = (namespace[k] for k in ("scan", "labels", "pred", "cases"))
    assert labels.shape == scan.array.shape and labels.dtype == np.uint8
    assert pred.probabilities.shape == (2, *scan.array.shape)
    assert np.array_equal(pred.labels, labels)
    assert np.array_equal(labels, pred.probabilities.argmax(0))
    # case01 is case1: the Dice printed by the loop is the Dice of the predictor's labels.
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("case0 [") and printed[2].startswith("case1 [")
    case1 = cases[1]
    assert np.array_equal(labels, namespace["predictor"](case1.image, already=case1.intensity))
    expected = hsam.dice(labels == 1, case1.label == 1, "legacy")
    assert printed[2] == f"case1 {[expected]}"
    assert float(printed[4]) == hsam.dice(
        namespace["predictor"](cases[0].image) == 1, cases[0].label == 1, "legacy"
    )


# --------------------------------------------------------------------------------------------
# Predictor: the numbers of the functions it wraps
# --------------------------------------------------------------------------------------------
def test_predictor_applies_its_policy_and_settings(workspace):
    predictor = Predictor.from_checkpoint(
        workspace / "runs" / "mine" / "checkpoints" / "best.pt",
        device="cpu",
        stage=1,
        batch_size=4,
        postprocess="largest_component",
    )
    volume = np.random.default_rng(3).normal(50, 20, (5, 48, 40)).astype(np.float32)
    raw, probs = predict_volume(
        predictor.model,
        to_model_range(volume, POLICY),
        batch_size=4,
        stage="1",
        return_probabilities=True,
    )
    pred = predictor.predict(volume, return_probabilities=True)
    assert np.array_equal(pred.labels, keep_largest_component(raw, 1))
    assert np.array_equal(pred.probabilities, probs)  # probabilities are not post-processed
    assert np.array_equal(pred.image, to_model_range(volume, POLICY))
    assert np.array_equal(predictor(volume), pred.labels)


def test_predictor_refuses_bad_settings(workspace):
    model = _tiny_model(0).model
    with pytest.raises(ConfigError, match="unknown intensity policy"):
        Predictor(model=model, intensity_policy="zscore")
    with pytest.raises(ConfigError, match="precision"):
        Predictor(model=model, intensity_policy=None, precision="fp16")
    with pytest.raises(ConfigError, match="post-processing"):
        Predictor(model=model, intensity_policy=None, postprocess="smooth")
    with pytest.raises(ConfigError, match="batch_size"):
        Predictor(model=model, intensity_policy=None, batch_size=0)


def test_a_checkpoint_predicts_with_its_recipes_inference_defaults(workspace, tmp_path, caplog):
    """The run config's `inference` section is what from_checkpoint applies unless told
    otherwise; a checkpoint without one (written before it existed) predicts as before."""
    recipe = {"slice_smoothing": 1.5, "postprocess": "largest_component", "tta": "rot90"}
    path = _write_checkpoint(tmp_path / "recipe.pt", seed=9, inference=recipe)
    with caplog.at_level(logging.INFO, logger="hsam.inference.predictor"):
        predictor = Predictor.from_checkpoint(path, device="cpu", batch_size=4)
    settings = (predictor.slice_smoothing, predictor.postprocess, predictor.tta)
    assert settings == (1.5, "largest_component", "rot90")
    assert (
        "post-processing largest_component, test-time augmentation rot90, slice smoothing 1.5"
        in caplog.text
    )
    volume = np.random.default_rng(4).normal(50, 20, (6, 40, 48)).astype(np.float32)
    image = to_model_range(volume, POLICY)
    smoothed, _ = predict_volume(
        predictor.model, image, batch_size=4, slice_smoothing=1.5, tta="rot90"
    )
    assert np.array_equal(predictor(volume), keep_largest_component(smoothed, 1))
    raw, _ = predict_volume(predictor.model, image, batch_size=4)
    assert not np.array_equal(raw, smoothed)
    told = Predictor.from_checkpoint(
        path, device="cpu", postprocess="none", slice_smoothing=0, tta="none"
    )
    assert (told.slice_smoothing, told.postprocess, told.tta) == (0.0, "none", "none")
    # hsam predict / evaluate without --slice-smoothing / --postprocess / --tta: the defaults
    cli = InferenceOptions().load(path, device="cpu")
    assert (cli.slice_smoothing, cli.postprocess, cli.tta) == (1.5, "largest_component", "rot90")
    assert np.array_equal(told(volume), raw)
    old = Predictor.from_checkpoint(workspace / "runs" / "mine" / "checkpoints" / "best.pt")
    assert (old.slice_smoothing, old.postprocess, old.tta) == (0.0, "none", "none")
    bad = _write_checkpoint(tmp_path / "bad.pt", inference={"slice_smoothing": -1})
    with pytest.raises(CheckpointError, match="inference defaults hsam cannot use .*-1"):
        Predictor.from_checkpoint(bad, device="cpu")
    chosen = Predictor.from_checkpoint(
        bad, device="cpu", postprocess="none", slice_smoothing=2, tta="none"
    )
    assert chosen.slice_smoothing == 2.0


def test_shared_prefix_predictions_equal_each_predictor_alone():
    a = Predictor(model=_tiny_model(1).model, intensity_policy=POLICY, batch_size=2)
    b = Predictor(
        model=_tiny_model(2, stages=1, backbone_seed=1).model,  # same backbone, other LoRA
        intensity_policy=POLICY,
        batch_size=2,
        postprocess="largest_component",
    )
    other = Predictor(model=_tiny_model(3).model, intensity_policy=POLICY, batch_size=2)
    # The same model read at another stage shares the prefix (and the model runs once).
    a_stages = [
        Predictor(model=a.model, intensity_policy=POLICY, batch_size=2, stage=s) for s in (1, 2)
    ]
    everyone = [a, b, other, *a_stages]
    assert shared_prefix_groups(everyone) == [[0, 1, 3, 4], [2]]
    volume = np.random.default_rng(0).normal(0, 1, (5, 50, 70)).astype(np.float32)
    shared = predict_shared(everyone, volume)
    for predictor, prediction in zip(everyone, shared, strict=True):
        assert np.array_equal(prediction.labels, predictor(volume))
    assert not np.array_equal(shared[0].labels, shared[2].labels)  # the models differ
    assert not np.array_equal(shared[3].labels, shared[4].labels)  # and so do the stages


def test_flip_tta_makes_the_prediction_mirror_with_the_input():
    """Averaged over the four flips, a mirrored volume gets the mirrored probabilities (the
    random tiny model alone is not mirror-symmetric, so without TTA this fails)."""
    model = _tiny_model(4).model
    volume = np.random.default_rng(1).normal(0, 1, (3, 40, 56)).astype(np.float32)
    predict = {
        tta: Predictor(model=model, intensity_policy=POLICY, tta=tta).predict
        for tta in ("none", "flip")
    }

    def probs(tta: str, v: np.ndarray) -> np.ndarray:
        return predict[tta](v, return_probabilities=True).probabilities

    for axis in (-1, -2):
        mirrored = np.ascontiguousarray(np.flip(volume, axis))
        assert not np.allclose(probs("none", mirrored), np.flip(probs("none", volume), axis))
        np.testing.assert_allclose(
            probs("flip", mirrored), np.flip(probs("flip", volume), axis), atol=1e-5
        )
    flipped = predict["flip"](volume, return_probabilities=True)
    assert np.array_equal(flipped.labels, flipped.probabilities.argmax(0))
    assert not np.array_equal(flipped.probabilities, probs("none", volume))


def test_rot90_tta_makes_the_prediction_turn_with_the_input():
    """Averaged over the four quarter turns, a square slice turned by a quarter gets the
    turned probabilities (not so without TTA); the shared-prefix path gives the same labels."""
    model = _tiny_model(4).model
    volume = np.random.default_rng(5).normal(0, 1, (3, 48, 48)).astype(np.float32)
    turned = np.ascontiguousarray(np.rot90(volume, 1, axes=(1, 2)))

    def probs(tta: str, v: np.ndarray) -> np.ndarray:
        predictor = Predictor(model=model, intensity_policy=POLICY, tta=tta)
        return predictor.predict(v, return_probabilities=True).probabilities

    assert not np.allclose(probs("none", turned), np.rot90(probs("none", volume), 1, (2, 3)))
    np.testing.assert_allclose(
        probs("rot90", turned), np.rot90(probs("rot90", volume), 1, (2, 3)), atol=1e-5
    )
    rot90 = Predictor(model=model, intensity_policy=POLICY, tta="rot90")
    other = Predictor(
        model=_tiny_model(6, stages=1, backbone_seed=4).model, intensity_policy=POLICY, tta="rot90"
    )
    assert shared_prefix_groups([rot90, other]) == [[0, 1]]
    for predictor, prediction in zip(
        (rot90, other), predict_shared([rot90, other], volume), strict=True
    ):
        assert np.array_equal(prediction.labels, predictor(volume))


def test_flip_tta_with_a_shared_prefix_equals_each_predictor_alone():
    models = [_tiny_model(5).model, _tiny_model(6, stages=1, backbone_seed=5).model]
    predictors = [Predictor(model=m, intensity_policy=POLICY, tta="flip") for m in models]
    plain = Predictor(model=models[0], intensity_policy=POLICY)
    assert shared_prefix_groups([*predictors, plain]) == [[0, 1], [2]]
    volume = np.random.default_rng(2).normal(0, 1, (4, 36, 44)).astype(np.float32)
    for predictor, prediction in zip(predictors, predict_shared(predictors, volume), strict=True):
        assert np.array_equal(prediction.labels, predictor(volume))
    with pytest.raises(ConfigError, match="needs the slices"):
        predictors[0].predict_from_prefix(torch.zeros(1, 8, 4, 4), (36, 44))
    with pytest.raises(ConfigError, match="test-time augmentation 'rot45'"):
        Predictor(model=models[0], intensity_policy=None, tta="rot45")


def test_slice_smoothing_averages_probabilities_across_slices():
    """With slice smoothing the probabilities are those of each slice averaged with its
    neighbours by a Gaussian along the slice axis, the labels their argmax; the shared-prefix
    and cached-prefix paths give the same labels."""
    from scipy import ndimage

    from hsam.inference.slicewise import encode_volume_prefix, predict_from_prefix

    model = _tiny_model(7).model
    volume = np.random.default_rng(3).normal(0, 1, (6, 36, 44)).astype(np.float32)
    plain = Predictor(model=model, intensity_policy=POLICY, batch_size=4)
    smooth = Predictor(model=model, intensity_policy=POLICY, batch_size=4, slice_smoothing=1.5)
    raw = plain.predict(volume, return_probabilities=True).probabilities
    out = smooth.predict(volume, return_probabilities=True)
    expected = ndimage.gaussian_filter1d(raw, 1.5, axis=1, mode="nearest")
    np.testing.assert_allclose(out.probabilities, expected, atol=1e-6)
    np.testing.assert_allclose(out.probabilities.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(out.labels, out.probabilities.argmax(0))
    assert not np.array_equal(out.labels, raw.argmax(0))  # the average changed some voxels
    assert np.array_equal(smooth(volume), out.labels)  # labels alone: the same
    # shared prefix (a second model on the same backbone) and cached prefix agree
    other = Predictor(
        model=_tiny_model(8, stages=1, backbone_seed=7).model,
        intensity_policy=POLICY,
        batch_size=4,
        slice_smoothing=1.5,
    )
    assert shared_prefix_groups([smooth, other, plain]) == [[0, 1, 2]]
    shared = predict_shared([smooth, other], volume)
    for predictor, prediction in zip((smooth, other), shared, strict=True):
        assert np.array_equal(prediction.labels, predictor(volume))
    # Raw and smoothed labels of one model come from one pass of it: a predictor made by
    # with_settings shares the model object, which runs once per batch of slices.
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    both = predict_shared([plain, plain.with_settings(slice_smoothing=1.5)], volume)
    hook.remove()
    assert len(calls) == 2  # 6 slices in batches of 4
    assert np.array_equal(both[0].labels, raw.argmax(0))
    assert np.array_equal(both[1].labels, out.labels)
    with pytest.raises(ConfigError, match="unknown predictor setting"):
        plain.with_settings(smoothing=1.5)
    image = smooth.to_model_range(volume)
    features = encode_volume_prefix(model, image, prefix_units=smooth.prefix_units, batch_size=4)
    assert np.array_equal(smooth.predict_from_prefix(features, (36, 44)), out.labels)
    labels = predict_from_prefix(
        model, features, (36, 44), prefix_units=smooth.prefix_units, slice_smoothing=1.5
    )
    assert np.array_equal(labels, out.labels)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="slice smoothing"):
            Predictor(model=model, intensity_policy=None, slice_smoothing=bad)


# --------------------------------------------------------------------------------------------
# evaluate_cases
# --------------------------------------------------------------------------------------------
def test_evaluate_cases_scores_what_evaluate_case_gives(workspace):
    predictor = Predictor.from_checkpoint(
        workspace / "runs" / "mine" / "checkpoints" / "best.pt", device="cpu"
    )
    cases = hsam.read_dataset("nnunet", workspace / "MyDataset", ["case0", "case1"])
    saved = []

    def save(case, index, prediction):
        saved.append((case.case_id, index))
        return np.zeros_like(prediction.labels) if case.case_id == "case1" else None

    evaluations = list(
        evaluate_cases(
            [predictor, predictor],
            cases,
            nsd_tolerance_mm=1.5,
            postprocess=["none", "largest_component"],
            save=save,
        )
    )
    assert saved == [("case0", 0), ("case0", 1), ("case1", 0), ("case1", 1)]
    assert [e.case.case_id for e in evaluations] == ["case0", "case1"]
    first = evaluations[0].scores
    assert [(s.predictor, s.postprocess) for s in first] == [
        (0, "none"),
        (0, "largest_component"),
        (1, "none"),
        (1, "largest_component"),
    ]
    labels = predictor(cases[0].image, already=cases[0].intensity)
    for score, method_labels in zip(
        first[:2], (labels, keep_largest_component(labels, 1)), strict=True
    ):
        result = evaluate_case(method_labels, cases[0].label, 1, cases[0].spacing, 1.5)
        assert score.result == result
        assert score.rows == case_rows("case0", result, {1: "blob"})
        assert score.dice == [result["classes"][0]["legacy"]["dice"]]
    # What `save` returned is what was scored: an empty prediction of a non-empty label.
    assert evaluations[1].scores[0].dice == [0.0] and not evaluations[1].scores[0].labels.any()

    (dice_only,) = evaluate_cases(predictor, cases[:1], metrics="dice")
    assert dice_only.scores[0].dice == first[0].dice and dice_only.scores[0].rows == []


def test_evaluate_cases_needs_labelled_cases_that_fit(workspace):
    predictor = Predictor.from_checkpoint(
        workspace / "runs" / "mine" / "checkpoints" / "best.pt", device="cpu"
    )
    (case,) = hsam.read_dataset("nnunet", workspace / "MyDataset", ["case0"])
    with pytest.raises(DataError, match="case0 .* has no label map"):
        next(evaluate_cases(predictor, [dataclasses.replace(case, label=None)]))
    with pytest.raises(DataError, match=r"gt_labels has labels in \[0, 3\]"):
        next(evaluate_cases(predictor, [dataclasses.replace(case, label=case.label * 3)]))
    with pytest.raises(ConfigError, match="one predictor"):
        next(evaluate_cases([predictor, predictor], [case], prefix_cache=object()))  # type: ignore[arg-type]
