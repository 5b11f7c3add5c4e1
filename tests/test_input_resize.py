"""model.input_resize "pad": slices keep their aspect on the way to S x S (longer side to S,
zeros below and to the right) in training and inference alike; "stretch" stays the default."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
import yaml
from torch.nn import functional as F
from torch.utils.data import Subset

from conftest import tiny_run_config, write_nnunet_dataset
from hsam.build import build_hsam
from hsam.config import load_run_config
from hsam.data import fit_image, fit_label, fitted_extent, resize_image, resize_label
from hsam.engine.data import build_run_data
from hsam.engine.prefix_cache import PrefixCache, build_shared_prefix_cache
from hsam.engine.trainer import run_training
from hsam.errors import ConfigError
from hsam.inference.predictor import Predictor, predict_shared, shared_prefix_groups
from hsam.inference.slicewise import _slice_batches, labels_from_probabilities

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fitted_extent_fills_the_longer_side_and_keeps_the_aspect():
    assert fitted_extent((190, 143), 256) == (256, 193)
    assert fitted_extent((143, 190), 256) == (193, 256)
    assert fitted_extent((300, 300), 256) == (256, 256)
    assert fitted_extent((2, 1000), 64) == (1, 64)  # never an empty side
    assert fitted_extent((30, 20), (64, 48)) == (64, 43)


def test_fit_pads_with_zeros_below_and_to_the_right():
    rng = np.random.default_rng(0)
    image = (rng.random((30, 20)) + 0.5).astype(np.float32)  # no zero anywhere
    label = (image > 1.0).astype(np.uint8)
    padded = fit_image(image, 48, order=1, resize="pad")
    padded_label = fit_label(label, 48, resize="pad")
    assert padded.shape == padded_label.shape == (48, 48)
    np.testing.assert_array_equal(padded[:, :32], resize_image(image, (48, 32), 1))
    np.testing.assert_array_equal(padded_label[:, :32], resize_label(label, (48, 32)))
    assert not padded[:, 32:].any() and not padded_label[:, 32:].any()
    # stretch is the plain resize
    np.testing.assert_array_equal(fit_image(image, 48, 1), resize_image(image, 48, 1))


def test_inference_crops_the_slice_region_back_and_batches_match_training():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (3, 30, 20)).astype(np.uint8)
    fitted = np.stack([fit_label(lab, 64, resize="pad") for lab in labels])
    probs = F.one_hot(torch.from_numpy(fitted).long(), 3).permute(0, 3, 1, 2).float()
    # upsampled to S and back through the pad path: exactly the labels (pixel-centred)
    assert np.array_equal(labels_from_probabilities(probs, (30, 20), "pad"), labels)
    assert not np.array_equal(labels_from_probabilities(probs, (30, 20), "stretch"), labels)

    volume = (rng.random((3, 30, 20)) + 0.1).astype(np.float32)
    ((_, x),) = list(_slice_batches(volume, 64, 4, torch.device("cpu"), resize="pad"))
    assert x.shape == (3, 1, 64, 64)
    content = F.interpolate(
        torch.from_numpy(volume)[:, None], size=(64, 43), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(x[..., :43], content)
    assert not x[..., 43:].any()


def test_released_resampling_needs_stretch(tmp_path):
    path = tiny_run_config(tmp_path)
    with pytest.raises(ConfigError, match="input_resize: stretch only"):
        load_run_config(path, ["model.input_resize=pad", "model.test_input_size=32"])
    with pytest.raises(ConfigError, match="input_resize"):
        load_run_config(path, ["model.input_resize=crop"])


def test_training_and_prediction_follow_the_models_input_resize(tmp_path):
    write_nnunet_dataset(tmp_path / "data", width=24)  # 40 x 24 slices: the aspect matters
    path = tiny_run_config(tmp_path, epochs=1, cache_encoder_prefix=True)
    overrides = ["model.lora_last_n=1", "model.input_resize=pad"]
    cfg = load_run_config(path, overrides)

    data = build_run_data(
        cfg.data, cfg.train, 64, num_classes=1, input_resize=cfg.model.input_resize
    )
    item = data.train[0]
    assert not item["image"][..., 38:].any() and not item["label"][..., 38:].any()  # (64, 38)

    result = run_training(cfg, tmp_path / "run")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["input_resize"] == "pad"
    padded = Predictor.from_checkpoint(result.final_checkpoint, intensity_policy=None)
    assert padded.model.input_resize == "pad"

    # the same weights read with stretched inputs are another prefix, never shared
    stretched = Predictor.from_checkpoint(result.final_checkpoint, intensity_policy=None)
    stretched.model.input_resize = "stretch"
    assert shared_prefix_groups([padded, stretched]) == [[0], [1]]
    volume = np.random.default_rng(2).random((4, 40, 24), dtype=np.float32)
    (shared,) = predict_shared([padded], volume)
    assert np.array_equal(shared.labels, padded(volume))

    # a prefix cache of stretched slices is refused by a padding run
    stretch_cfg = load_run_config(path, ["model.lora_last_n=1"])
    _, cache = build_shared_prefix_cache(stretch_cfg)
    with pytest.raises(ConfigError, match="model.input_resize is 'pad'"):
        run_training(cfg, tmp_path / "mixed", cache=cache)


def test_prefix_cache_takes_the_models_resize_through_a_subset_and_refuses_another(tmp_path):
    write_nnunet_dataset(tmp_path / "data", width=24)
    cfg = load_run_config(tiny_run_config(tmp_path), ["model.lora_last_n=1"])
    data = build_run_data(cfg.data, cfg.train, 64, num_classes=1, input_resize="pad")
    model = build_hsam(dataclasses.replace(cfg.model, input_resize="pad"), seed=0).model.eval()
    subset = Subset(data.train, range(2))
    subset.set_epoch = data.train.set_epoch
    build = functools.partial(
        PrefixCache.build,
        views=1,
        stop_unit=model.first_trainable_unit,
        batch_size=2,
        device=torch.device("cpu"),
        bf16=False,
        show_progress=False,
    )
    assert build(model, subset).input_resize == "pad"

    model.input_resize = "stretch"
    with pytest.raises(ValueError, match="input_resize='stretch'"):
        build(model, subset)
