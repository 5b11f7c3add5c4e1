"""The Predictor: a trained H-SAM ready to segment whole volumes, ``predictor(volume) -> labels``.

A :class:`Predictor` owns everything between a raw ``(D, H, W)`` volume and its label map: the
network (loaded from a checkpoint by :meth:`Predictor.from_checkpoint`, or any built model), the
intensity policy that maps raw intensities to the model's ``[0, 1]``
(:func:`hsam.intensity.to_model_range`), the batch size, the precision, the stage whose
probabilities are used, the post-processing of the labels, and the training size ranges used by
the predicted-size check (:mod:`hsam.inference.volume_check`). Shaped like MONAI's
callable inferers:

    predictor = Predictor.from_checkpoint("best.pt")
    labels = predictor(volume)                                      # (D, H, W) uint8
    pred = predictor.predict(volume, return_probabilities=True)     # + (T, D, H, W), [0, 1] input

Slices are taken along axis 0 and predicted with :func:`hsam.inference.slicewise.predict_volume`.
Several predictors whose models share their frozen encoder prefix (same backbone weights, LoRA
only after it) are run together by :func:`predict_shared`: the prefix is computed once per slice
and finished by each model (the same labels as one predictor at a time).

Nothing here reads or writes files other than the checkpoint: the ``predict`` application
(:mod:`hsam.apps.predict`) and the scoring loop (:mod:`hsam.evaluation.scoring`) sit on top of it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hsam.config import InferenceConfig, from_dict
from hsam.devices import PRECISIONS, resolve_device, resolve_precision
from hsam.errors import CheckpointError, ConfigError, DataError
from hsam.inference.postprocess import POSTPROCESS_CHOICES, postprocess_labels
from hsam.inference.slicewise import (
    TTA_TRANSFORMS,
    Precision,
    Stage,
    TestTimeAugmentation,
    check_slice_smoothing,
    predict_from_prefix,
    predict_volume,
    predict_volume_shared_prefix,
)
from hsam.inference.volume_check import (
    DEFAULT_FACTOR,
    VolumeWarning,
    check_factor,
    ranges_from_meta,
    volume_warnings,
)
from hsam.intensity import parse_policy, to_model_range
from hsam.io.checkpoint import LoadedCheckpoint, load_checkpoint
from hsam.modeling.hsam import HSAM

logger = logging.getLogger(__name__)

__all__ = [
    "InferenceOptions",
    "Prediction",
    "Predictor",
    "check_batch_size",
    "check_postprocess",
    "check_precision",
    "check_slice_smoothing_option",
    "check_tta",
    "check_volume_factor",
    "checkpoint_inference_defaults",
    "checkpoint_label_names",
    "normalize_stage",
    "predict_shared",
    "shared_prefix_groups",
]


# --------------------------------------------------------------------------------------------
# option checks (the CLI's values are checked here, before anything is loaded)
# --------------------------------------------------------------------------------------------
def normalize_stage(stage: str | int) -> Stage:
    """``1``/``"1"``, ``2``/``"2"`` or ``"fused"`` (ConfigError otherwise)."""
    value = str(stage).strip().lower()
    if value not in ("1", "2", "fused"):
        raise ConfigError(f"stage must be 1, 2 or fused, got {stage!r}.")
    return value  # type: ignore[return-value]


def check_precision(precision: str) -> str:
    """`precision` if it is ``auto``, ``fp32`` or ``bf16`` (ConfigError otherwise)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    return precision


def check_tta(tta: str) -> TestTimeAugmentation:
    """`tta` if it names a test-time augmentation (``none``, ``flip``, ``rot90``), else a
    ConfigError."""
    if tta not in TTA_TRANSFORMS:
        raise ConfigError(
            f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA_TRANSFORMS)}."
        )
    return tta  # type: ignore[return-value]


def check_slice_smoothing_option(sigma: float) -> float:
    """`sigma` (slices) if it is a usable slice-smoothing width, else a ConfigError."""
    try:
        return check_slice_smoothing(sigma)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def check_postprocess(method: str) -> str:
    """`method` if it names a post-processing (hsam.inference.postprocess), else a ConfigError."""
    if method not in POSTPROCESS_CHOICES:
        raise ConfigError(
            f"unknown post-processing {method!r}; choose one of {', '.join(POSTPROCESS_CHOICES)}."
        )
    return method


def check_volume_factor(factor: float | None) -> float | None:
    """The predicted-size check's factor (>= 1), or None when off (``None`` or ``0``)."""
    try:
        return check_factor(factor)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return int(batch_size)


def checkpoint_inference_defaults(config: Mapping[str, Any], path: Any) -> InferenceConfig:
    """The inference defaults a checkpoint's run config records (``inference``; checkpoints
    written before it existed: none, i.e. :class:`hsam.config.InferenceConfig`'s defaults)."""
    section = config.get("inference") or {}
    try:
        return from_dict(InferenceConfig, section, "inference")
    except ConfigError:
        raise CheckpointError(
            f"checkpoint {path} records inference defaults hsam cannot use (its config's "
            f"'inference': {section!r}; edited, or written by another hsam version). Choose "
            "them: --postprocess, --slice-smoothing and --tta (Python: postprocess=, "
            "slice_smoothing=, tta=)."
        ) from None


def checkpoint_label_names(meta: Mapping[str, Any], num_classes: int) -> dict[int, str]:
    """``{0: background, 1..K: name}`` from ``meta["label_names"]`` (int or str keys).

    Missing names become ``class_<c>``; a key that is not an integer is a CheckpointError.
    """
    names = {0: "background", **{c: f"class_{c}" for c in range(1, num_classes + 1)}}
    raw = meta.get("label_names")
    if raw is None:
        return names
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"checkpoint meta 'label_names' must map label ids to names, got {type(raw).__name__}"
        )
    for key, value in raw.items():
        try:
            idx = int(key)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint meta 'label_names' has a non-integer label id {key!r}"
            ) from exc
        if 0 <= idx <= num_classes:
            names[idx] = str(value)
    return names


@dataclass(frozen=True)
class InferenceOptions:
    """The inference settings an application takes from its user (``hsam evaluate``,
    ``hsam predict``), checked when made: before anything is loaded, read or written."""

    stage: str | int = "fused"
    batch_size: int = 8
    precision: str = "fp32"
    #: None: the checkpoint's default (its run config's ``inference`` section).
    postprocess: str | None = None
    #: None: the checkpoint's default (its run config's ``inference`` section).
    tta: str | None = None
    #: None: the checkpoint's default (its run config's ``inference`` section).
    slice_smoothing: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage", normalize_stage(self.stage))
        check_batch_size(self.batch_size)
        check_precision(self.precision)
        if self.postprocess is not None:
            check_postprocess(self.postprocess)
        if self.tta is not None:
            check_tta(self.tta)
        if self.slice_smoothing is not None:
            sigma = check_slice_smoothing_option(self.slice_smoothing)
            object.__setattr__(self, "slice_smoothing", sigma)

    def load(
        self,
        checkpoint: str | os.PathLike,
        *,
        device: str = "auto",
        backbone_weights: str | None = None,
        intensity_policy: str | None = None,
    ) -> Predictor:
        """:meth:`Predictor.from_checkpoint` with these settings."""
        return Predictor.from_checkpoint(
            checkpoint,
            device=device,
            backbone_weights=backbone_weights,
            intensity_policy=intensity_policy,
            stage=self.stage,
            batch_size=self.batch_size,
            precision=self.precision,
            postprocess=self.postprocess,
            tta=self.tta,
            slice_smoothing=self.slice_smoothing,
        )


# --------------------------------------------------------------------------------------------
# the predictor
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    """One volume's prediction.

    Attributes:
        labels: ``(D, H, W)`` uint8 (uint16 above 256 classes) labels ``0..K``, post-processed.
        probabilities: ``(T, D, H, W)`` float32 class probabilities (as predicted and, with
            slice smoothing, smoothed; before post-processing) when asked for, else None.
        image: ``(D, H, W)`` float32 model input in ``[0, 1]`` (the intensity policy applied).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    image: np.ndarray


class Predictor:
    """A model with its preprocessing and inference settings; ``predictor(volume) -> labels``."""

    def __init__(
        self,
        *,
        model: HSAM,
        intensity_policy: str | None,
        label_names: Mapping[int, str] | None = None,
        stage: str | int = "fused",
        batch_size: int = 8,
        precision: str = "fp32",
        postprocess: str = "none",
        tta: str = "none",
        slice_smoothing: float = 0.0,
        volume_ranges: Mapping[int, tuple[float, float]] | None = None,
        checkpoint: Path | None = None,
        loaded: LoadedCheckpoint | None = None,
    ) -> None:
        """
        Arguments:
          model: the network (its device is where inference runs). It is switched to eval mode
            when it predicts.
          intensity_policy: how raw intensities map to ``[0, 1]`` (e.g.
            ``"ct_window[-125,275]"``); None when volumes are given already in ``[0, 1]``
            (e.g. cases from :func:`hsam.engine.data.prepare_case`).
          label_names: ``{0: "background", 1..K: name}`` (default ``class_<c>``).
          stage: ``1``, ``2`` or ``"fused"`` (the paper's output).
          batch_size: slices per forward pass.
          precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"auto"`` (bf16 where the model's
            device has bf16 hardware, else fp32: :func:`hsam.devices.resolve_precision`).
          postprocess: ``"none"`` or ``"largest_component"`` (:mod:`hsam.inference.postprocess`),
            applied to the labels (the probabilities stay the model's).
          tta: test-time augmentation: ``"none"``, ``"flip"`` (probabilities averaged over
            the identity, left-right, up-down and both flips of each slice) or ``"rot90"``
            (over its four quarter turns); 4x the compute. For models trained with those
            transforms (``train.augment.p_flip_rot90``, ``p_rot90``).
          slice_smoothing: sigma, in slices, of a Gaussian that averages the class
            probabilities across neighbouring slices before the argmax (0: off, each slice on
            its own). For thin, near-isotropic slices such as LA's 0.625 mm (README,
            "Slice smoothing"); the whole volume's probabilities are held while it predicts.
          volume_ranges: per-class training range of the volume fraction, for
            :meth:`check_volumes` (None: sizes are not checked).
          checkpoint, loaded: the file the model came from and its loaded content (config,
            meta), when it came from one.
        """
        if intensity_policy is not None:
            try:
                parse_policy(intensity_policy)
            except DataError as exc:
                raise ConfigError(str(exc)) from exc
        self.model = model
        self.intensity_policy = intensity_policy
        self.stage: Stage = normalize_stage(stage)
        self.batch_size = check_batch_size(batch_size)
        self.precision: Precision = resolve_precision(  # type: ignore[assignment]
            check_precision(precision), next(model.parameters()).device
        )
        self.postprocess = check_postprocess(postprocess)
        self.tta: TestTimeAugmentation = check_tta(tta)
        self.slice_smoothing = check_slice_smoothing_option(slice_smoothing)
        #: Foreground classes K (the model predicts labels 0..K from its T = K + 1 tokens).
        self.num_classes = int(model.num_tokens) - 1
        self.label_names = checkpoint_label_names(
            {"label_names": dict(label_names or {})}, self.num_classes
        )
        self.volume_ranges = dict(volume_ranges) if volume_ranges is not None else None
        self.checkpoint = checkpoint
        self.loaded = loaded

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike,
        *,
        device: str = "auto",
        backbone_weights: str | None = None,
        intensity_policy: str | None = None,
        stage: str | int = "fused",
        batch_size: int = 8,
        precision: str = "fp32",
        postprocess: str | None = None,
        tta: str | None = None,
        slice_smoothing: float | None = None,
    ) -> Predictor:
        """Load ``checkpoint`` (written by ``hsam train``) for inference on ``device``.

        Args:
            checkpoint: an hsam checkpoint.
            device: ``"auto"`` (cuda if available, else cpu), ``"cpu"``, ``"cuda[:N]"``.
            backbone_weights: the SAM weights file, where it lives elsewhere than at training
                time (its sha256 must match the one recorded in the checkpoint).
            intensity_policy: override of ``meta["intensity_policy"]`` (e.g.
                ``"ct_window[-125,275]"``); needed only for checkpoints that lack it.
            stage, batch_size, precision, postprocess, tta, slice_smoothing: as in the
                constructor; stage 2 needs a two-stage model. ``postprocess``, ``tta`` and
                ``slice_smoothing`` left None take the checkpoint's recipe defaults (its run
                config's ``inference`` section; none, none and 0 for checkpoints without one).

        Raises:
            CheckpointError: unreadable checkpoint, backbone mismatch, no intensity policy.
            ConfigError: bad device, stage, batch size, precision or post-processing.
        """
        dev = resolve_device(device)
        stage = normalize_stage(stage)
        loaded = load_checkpoint(checkpoint, backbone_weights=backbone_weights)
        cfg = loaded.model_config
        if stage == "2" and cfg.stages == 1:
            raise ConfigError(
                f"stage 2 was requested but checkpoint {checkpoint} is a one-stage model "
                "(model.stages = 1); use --stage 1 or fused."
            )
        policy = intensity_policy or loaded.meta.get("intensity_policy")
        if not policy:
            raise CheckpointError(
                f"checkpoint {checkpoint} does not record its intensity preprocessing "
                "(meta['intensity_policy']); pass it explicitly, e.g. intensity_policy="
                "'ct_window[-125,275]' for CT or 'percentile[0.5,99.5]' for MR."
            )
        try:
            parse_policy(str(policy))
        except DataError as exc:
            raise CheckpointError(f"checkpoint {checkpoint}: {exc}") from exc
        k = int(cfg.num_classes)
        chosen = []
        if postprocess is None or slice_smoothing is None or tta is None:
            recipe = checkpoint_inference_defaults(loaded.config, checkpoint)
        if postprocess is None:
            postprocess = recipe.postprocess
            chosen.append(f"post-processing {postprocess}")
        if tta is None:
            tta = recipe.tta
            chosen.append(f"test-time augmentation {tta}")
        if slice_smoothing is None:
            slice_smoothing = recipe.slice_smoothing
            chosen.append(f"slice smoothing {slice_smoothing:g}")
        if chosen:
            logger.info(
                "%s: %s (the recipe's defaults, its config's 'inference')",
                checkpoint,
                ", ".join(chosen),
            )
        return cls(
            model=loaded.built.model.to(dev).eval(),
            intensity_policy=str(policy),
            label_names=checkpoint_label_names(loaded.meta, k),
            stage=stage,
            batch_size=batch_size,
            precision=precision,
            postprocess=postprocess,
            tta=tta,
            slice_smoothing=slice_smoothing,
            volume_ranges=ranges_from_meta(loaded.meta, k),
            checkpoint=Path(checkpoint),
            loaded=loaded,
        )

    def with_settings(self, **changes: Any) -> Predictor:
        """A predictor of the same model object (not a copy, so :func:`predict_shared` runs it
        once for both) with some inference settings changed, e.g. ``slice_smoothing=2.0``;
        checked as the constructor checks them."""
        settings = {
            "intensity_policy": self.intensity_policy,
            "label_names": self.label_names,
            "stage": self.stage,
            "batch_size": self.batch_size,
            "precision": self.precision,
            "postprocess": self.postprocess,
            "tta": self.tta,
            "slice_smoothing": self.slice_smoothing,
            "volume_ranges": self.volume_ranges,
            "checkpoint": self.checkpoint,
            "loaded": self.loaded,
        }
        if unknown := sorted(set(changes) - set(settings)):
            raise ConfigError(
                f"unknown predictor setting(s) {unknown}; choose from {sorted(settings)}"
            )
        return Predictor(model=self.model, **(settings | changes))

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def prefix_units(self) -> int:
        """Encoder units before the first trainable (LoRA) one: frozen, shareable."""
        return int(self.model.first_trainable_unit)

    @property
    def name(self) -> str:
        """The checkpoint file, or "the model" (for messages)."""
        return str(self.checkpoint) if self.checkpoint is not None else "the model"

    # ------------------------------------------------------------------ inference
    def to_model_range(self, volume: np.ndarray, *, already: str = "none") -> np.ndarray:
        """``(D, H, W)`` float32 model input in ``[0, 1]``: the intensity policy applied
        (``already``: what a reader did, :attr:`hsam.data.Case.intensity`); the volume itself
        when the policy is None."""
        if self.intensity_policy is None:
            return volume
        return to_model_range(volume, self.intensity_policy, already=already)

    def predict(
        self, volume: np.ndarray, *, already: str = "none", return_probabilities: bool = False
    ) -> Prediction:
        """Segment a raw ``(D, H, W)`` volume slice by slice along axis 0 (every slice)."""
        image = self.to_model_range(volume, already=already)
        labels, probs = predict_volume(
            self.model,
            image,
            batch_size=self.batch_size,
            stage=self.stage,
            precision=self.precision,
            tta=self.tta,
            slice_smoothing=self.slice_smoothing,
            return_probabilities=return_probabilities,
        )
        return Prediction(self.finish(labels), probs, image)

    def __call__(self, volume: np.ndarray, *, already: str = "none") -> np.ndarray:
        """``(D, H, W)`` labels of a raw ``(D, H, W)`` volume (see :meth:`predict`)."""
        return self.predict(volume, already=already).labels

    def predict_from_prefix(self, features: Tensor, shape: tuple[int, int]) -> np.ndarray:
        """``(D, H, W)`` labels from the frozen encoder prefix of every slice (``(D, ...)``,
        :func:`hsam.inference.slicewise.encode_volume_prefix`; e.g. a training run's cached
        validation volumes): the same labels as :meth:`predict` on the volume, prefix not
        recomputed. Without test-time augmentation only (the flips need the slices)."""
        if self.tta != "none":
            raise ConfigError(
                f"test-time augmentation {self.tta!r} needs the slices, not their cached encoder "
                "prefix; use predict() or a predictor with tta='none'."
            )
        labels = predict_from_prefix(
            self.model,
            features,
            shape,
            prefix_units=self.prefix_units,
            batch_size=self.batch_size,
            stage=self.stage,
            precision=self.precision,
            slice_smoothing=self.slice_smoothing,
        )
        return self.finish(labels)

    def finish(self, labels: np.ndarray) -> np.ndarray:
        """The predictor's post-processing of predicted labels."""
        return postprocess_labels(labels, self.num_classes, self.postprocess)

    # ------------------------------------------------------------------ size check
    def check_volumes(
        self,
        labels: np.ndarray,
        where: str,
        *,
        factor: float | None = DEFAULT_FACTOR,
        label_names: Mapping[int, str] | None = None,
    ) -> list[VolumeWarning]:
        """Predicted classes far outside the training size range
        (:func:`hsam.inference.volume_check.volume_warnings`), each logged as a WARNING naming
        ``where`` (the case or file). Empty when in range, when ``factor`` is None/0, or when the
        predictor has no range."""
        names = label_names or {c: n for c, n in self.label_names.items() if c > 0}
        found = volume_warnings(
            labels, self.num_classes, self.volume_ranges, factor, label_names=names
        )
        for w in found:
            logger.warning("%s: %s", where, w.message)
        return found

    def log_volume_check(self, factor: float | None) -> None:
        """Say once whether predicted sizes will be checked (and against what)."""
        if factor is None or factor == 0:
            logger.info("predicted-size check turned off")
        elif self.volume_ranges is None:
            logger.info(
                "checkpoint %s records no class_volume_fraction_range (trained before it was "
                "stored); predicted structure sizes are not checked",
                self.name,
            )
        else:
            logger.info(
                "checking predicted structure sizes (fraction of the scan's voxels) against the "
                "training range, tolerance factor %g: %s",
                factor,
                ", ".join(
                    f"{self.label_names.get(c, c)} {lo:.3g}-{hi:.3g}"
                    for c, (lo, hi) in self.volume_ranges.items()
                ),
            )


# --------------------------------------------------------------------------------------------
# several predictors, one frozen encoder prefix
# --------------------------------------------------------------------------------------------
def _frozen_encoder_tensors(model: HSAM) -> list[Tensor]:
    return [p for p in model.image_encoder.parameters() if not p.requires_grad]


def _same_prefix(a: Predictor, b: Predictor) -> bool:
    """Whether `b` can finish `a`'s prefix features with the same inputs and settings."""
    # stages and slice smoothing (applied to each model's output) may differ
    settings = ("intensity_policy", "batch_size", "precision", "tta")
    if any(getattr(a, s) != getattr(b, s) for s in settings) or a.prefix_units != b.prefix_units:
        return False
    # how slices become model inputs (the prefix is computed from those inputs)
    geometry = ("image_size", "test_input_size", "input_resize")
    if any(getattr(a.model, g) != getattr(b.model, g) for g in geometry):
        return False
    if a.model is b.model:
        return True
    fa, fb = _frozen_encoder_tensors(a.model), _frozen_encoder_tensors(b.model)
    return len(fa) == len(fb) and all(
        x.shape == y.shape and x.device == y.device and torch.equal(x, y)
        for x, y in zip(fa, fb, strict=True)
    )


def shared_prefix_groups(predictors: Sequence[Predictor]) -> list[list[int]]:
    """Indices of predictors grouped by identical frozen encoder and settings (one prefix per
    group). Pretrained backbones put every run in one group; random ones (tests) split by
    seed."""
    groups: list[list[int]] = []
    for i, predictor in enumerate(predictors):
        for group in groups:
            if _same_prefix(predictors[group[0]], predictor):
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def predict_shared(
    predictors: Sequence[Predictor], volume: np.ndarray, *, already: str = "none"
) -> list[Prediction]:
    """One :class:`Prediction` per predictor (in order) of a raw ``(D, H, W)`` volume, the
    frozen encoder prefix computed once per slice for each :func:`shared_prefix_groups` group.
    The labels are those each predictor gives alone; no probabilities are kept."""
    out: list[Prediction | None] = [None] * len(predictors)
    for group in shared_prefix_groups(predictors):
        lead = predictors[group[0]]
        image = lead.to_model_range(volume, already=already)
        labels = predict_volume_shared_prefix(
            [predictors[i].model for i in group],
            image,
            prefix_units=lead.prefix_units,
            batch_size=lead.batch_size,
            stage=[predictors[i].stage for i in group],
            precision=lead.precision,
            tta=lead.tta,
            slice_smoothing=[predictors[i].slice_smoothing for i in group],
        )
        for i, raw in zip(group, labels, strict=True):
            out[i] = Prediction(predictors[i].finish(raw), None, image)
    return [p for p in out if p is not None]
