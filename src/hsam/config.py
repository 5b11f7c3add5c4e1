"""Typed configuration: plain dataclasses, loaded from YAML with unknown keys rejected.

Every field that reproduces a behaviour of the authors' released code (rather than the paper)
says so in its comment; `configs/upstream_code.yaml` switches all of them on at once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from hsam.errors import ConfigError, DataError
from hsam.intensity import parse_policy, split_landmarks

logger = logging.getLogger(__name__)


def _check(ok: bool, where: str, value: Any, rule: str) -> None:
    """ConfigError naming the field and the allowed range unless `ok`."""
    if not ok:
        raise ConfigError(f"{where}={value!r} {rule}; fix it in the YAML file or --set override.")


def _at_least(where: str, value: Any, low: float, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = value is not None and math.isfinite(value) and value >= low
    _check(ok, where, value, f"must be a number >= {low:g}" + (" or null" if optional else ""))


def _fraction(where: str, value: float, *, high_open: bool = False) -> None:
    ok = math.isfinite(value) and value >= 0.0 and (value < 1.0 if high_open else value <= 1.0)
    _check(ok, where, value, f"must lie in [0, 1{')' if high_open else ']'}")


BlockOrder = Literal["self_first", "cross_first"]
CMAttnMode = Literal["paper", "reference", "off"]
FuseMode = Literal["probabilities", "logits"]
MaskDirections = Literal["both", "token_to_image"]
InputNormalization = Literal["backbone", "identity"]
InputResize = Literal["stretch", "pad"]
Stage2Init = Literal["random", "stage1"]
LoRALayers = Literal["qv", "all_linear"]
# Post-processings of predicted labels (hsam.inference.postprocess).
Postprocess = Literal["none", "largest_component"]
# Test-time augmentations (hsam.inference.slicewise.TTA_TRANSFORMS).
TestTimeAugmentation = Literal["none", "flip", "rot90"]


@dataclass
class ModelConfig:
    """Everything needed to rebuild an H-SAM network (stored in every checkpoint)."""

    # Encoder preset: sam_vit_b | sam_vit_l | sam_vit_h | litemedsam | tiny.
    backbone: str = "sam_vit_b"
    # Path of an official SAM checkpoint (sam_vit_*); litemedsam uses the bundled weights,
    # tiny is randomly initialised.
    backbone_weights: str | None = None
    # Input side S (multiple of 16 for ViT; 256 for LiteMedSAM).
    image_size: int = 512
    # Foreground classes K; the model predicts T = K + 1 masks, background first.
    num_classes: int = 8
    # LoRA rank of every adapted layer (paper: 4; the released code defaults to 5).
    lora_rank: int = 4
    # LoRA scaling alpha / rank; None = no scaling (paper and released code).
    lora_alpha: float | None = None
    # Adapt only the last N attention blocks; None = every block (paper); 0 = no LoRA, the
    # whole encoder frozen and only the decoders trained (its final embedding is cacheable).
    lora_last_n: int | None = None
    # Which layers of an adapted block get LoRA: qv = the q and v outputs of its qkv projection
    # (paper, released code); all_linear = also its attention output projection and both MLP
    # layers (every linear layer of the block) [ours].
    lora_layers: LoRALayers = "qv"
    # 2 = H-SAM; 1 = SAMed baseline (LoRA + SAM decoder only).
    stages: int = 2
    # Table 4 ablation switches.
    mask_attention: bool = True
    hierarchical_pixel_decoder: bool = True
    # paper = working sigmoid gate + class-balanced noise; reference = the released code's
    # softmax over a size-1 dimension (gate constantly 1, zero gradient); off = no CMAttn.
    cmattn: CMAttnMode = "paper"
    # Largest std of the class-balanced noise (given to the rarest class), relative to the std
    # of the mask features.
    cmattn_noise_max_std: float = 0.35
    # Per-class noise std (T values) computed from the training set's class frequencies;
    # None until training computes it (then no noise is added).
    class_noise_std: list[float] | None = None
    # Side of the grid CMAttn's class-token attention runs on (None = min(h, 32)): its feature
    # dimension is grid**2, so very fine grids (LiteMedSAM's 64 x 64) are average-pooled.
    cmattn_grid: int | None = None
    # Two-way block order: SAM / paper Fig. 2 run self-attention first; the released code runs
    # token-to-image cross-attention first in both stages.
    block_order: BlockOrder = "self_first"
    # Where the stage-1 prior multiplies stage-2 attention weights (paper Eq. 3 and DESIGN:
    # both directions; token_to_image keeps image-to-token attention plain).
    mask_attention_directions: MaskDirections = "both"
    # Training-only Gaussian noise on the stage-2 input embedding, std = value x global range
    # of the embedding (released code: 0.2; paper: none).
    stage2_embedding_noise: float = 0.0
    # Dropout on stage-2 token-to-image attention output (released code: 0.2; paper: none).
    stage2_dropout: float = 0.0
    # How stage 2's two-way transformer and x4 upscaling start: random = from scratch, at full
    # attention width (paper and released code); stage1 = copies of the pretrained stage-1
    # decoder's (SAM's attention downsampling, so the shapes match) [ours]. On ACDC 5%
    # validation frames it did not help (README, Recipes: 59.85 vs 62.08 Dice, seed 0).
    stage2_init: Stage2Init = "random"
    # Mean of the two stages' probabilities (paper) or of their logits (released code).
    fuse: FuseMode = "probabilities"
    # backbone = the normalisation the pretrained encoder was trained with (SAM: ImageNet mean
    # and std on a 0-255 scale; LiteMedSAM: [0, 1] as is); identity = SAMed/released code,
    # images in [0, 1] straight into SAM.
    input_normalization: InputNormalization = "backbone"
    # Inference only: resample each slice to this side (bicubic) before resizing it to S, as the
    # released test.py does with its default input_size 224 (512 -> 224 -> 512); None = off.
    test_input_size: int | None = None
    # How a slice becomes S x S, in training and inference alike: stretch = resized to S x S
    # whatever its aspect (paper, released code); pad = longer side to S, aspect kept, zeros
    # below and to the right (how MedSAM / MedSAM-lite were pretrained). On ACDC 5% validation
    # frames pad lowered SAMed seed 0 from 57.45 to 47.09 Dice (README, Recipes).
    input_resize: InputResize = "stretch"

    def __post_init__(self) -> None:
        where = "model"
        for name in ("image_size", "num_classes", "lora_rank"):
            _at_least(f"{where}.{name}", getattr(self, name), 1)
        _check(self.stages in (1, 2), f"{where}.stages", self.stages, "must be 1 or 2")
        _at_least(f"{where}.lora_last_n", self.lora_last_n, 0, optional=True)
        _at_least(f"{where}.cmattn_grid", self.cmattn_grid, 1, optional=True)
        _at_least(f"{where}.test_input_size", self.test_input_size, 1, optional=True)
        _check(
            self.test_input_size is None or self.input_resize == "stretch",
            f"{where}.test_input_size",
            self.test_input_size,
            "is the released code's square resampling; it works with input_resize: stretch only",
        )
        _at_least(f"{where}.cmattn_noise_max_std", self.cmattn_noise_max_std, 0)
        _at_least(f"{where}.stage2_embedding_noise", self.stage2_embedding_noise, 0)
        _fraction(f"{where}.stage2_dropout", self.stage2_dropout, high_open=True)
        if self.lora_alpha is not None:
            ok = math.isfinite(self.lora_alpha) and self.lora_alpha > 0
            _check(ok, f"{where}.lora_alpha", self.lora_alpha, "must be > 0 or null")
        for i, std in enumerate(self.class_noise_std or []):
            _at_least(f"{where}.class_noise_std[{i}]", std, 0)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and type(None) in typing.get_args(tp):
            return True, args[0]
    return False, tp


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting int->float where harmless."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed here (expected {tp}).")
    origin = typing.get_origin(inner)
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        return from_dict(inner, value, where)
    if origin is Literal:
        allowed = typing.get_args(inner)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}.")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(inner)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        return dict(value)
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        # YAML 1.1 (PyYAML) reads 1e-4 without a dot as a string; it means the number.
        return float(value)
    if inner in (int, float, str, bool):
        if not isinstance(value, inner) or (inner is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {inner.__name__}, got {value!r}.")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys are an error that lists valid ones."""
    legacy_k = _ABSENT
    if cls is RunConfig:
        data, legacy_k = _pop_legacy_data_num_classes(data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}. Valid keys: {', '.join(names)}. "
            "Check the spelling in your YAML file or --set override."
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    built = cls(**kwargs)
    if legacy_k is not _ABSENT:
        # after building: a bad model.num_classes is reported as such, not as a mismatch
        check_legacy_data_num_classes(legacy_k, built.model.num_classes, where)
    return built


# K (foreground classes) lives in model.num_classes alone: the network is built from it and
# every checkpoint has always stored it there, so keeping that field breaks no checkpoint and
# no loader. Configs, run directories and checkpoints written before K was stored once also
# carry data.num_classes, which had to equal it; they still load: the old key is accepted when
# it agrees, refused when it does not (a file naming two class counts is wrong somewhere), and
# never written again.
_ABSENT: Any = object()


def _pop_legacy_data_num_classes(data: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(`data` without ``data.num_classes``, its value or ``_ABSENT``); `data` is not changed."""
    section = data.get("data")
    if not isinstance(section, dict) or "num_classes" not in section:
        return data, _ABSENT
    section = dict(section)
    value = section.pop("num_classes")
    return {**data, "data": section}, value


def check_legacy_data_num_classes(
    value: Any, model_num_classes: int, where: str, *, log_level: int = logging.WARNING
) -> None:
    """Accept the retired ``data.num_classes`` when it equals ``model.num_classes`` (logging
    at `log_level` that it is deprecated), else raise a ConfigError naming both fields."""
    if value != model_num_classes or isinstance(value, bool):
        raise ConfigError(
            f"{where}: data.num_classes ({value!r}) and model.num_classes "
            f"({model_num_classes}) differ. The number of foreground classes is set by "
            "model.num_classes alone now: set it there and delete data.num_classes."
        )
    logger.log(
        log_level,
        "DeprecationWarning: %s: data.num_classes is deprecated and ignored (it equals "
        "model.num_classes = %d, which alone sets the number of foreground classes); delete it.",
        where,
        model_num_classes,
    )


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-type dict of a config dataclass (safe for YAML, JSON and torch weights_only)."""
    return dataclasses.asdict(obj)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (value parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value.")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section.")
        node[keys[-1]] = yaml.safe_load(raw)
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping at the top level.")
    return data


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)


@dataclass
class DataConfig:
    """Where the data is and which cases/slices train, validate and test."""

    # la | acdc | synapse | promise12 | nnunet | prepared (see hsam.data.formats).
    format: str = "la"
    root: str = ""
    # File of training case ids (default: the reader's standard training list), or a split
    # shipped with hsam as standard:NAME (la_4, promise12_3).
    train_list: str | None = None
    # Few-shot: the first N cases of train_list (train_seed None, the LA/ACDC protocol) or N
    # drawn with train_seed.
    train_cases: int | None = None
    train_seed: int | None = None
    # Few-shot by slices: a file of slice ids (e.g. Synapse train_220.txt, ACDC
    # train_slices.list, or standard:synapse_train_220) and optionally only its first N lines
    # (ACDC 5% / 10%: 68 / 136).
    train_slices_list: str | None = None
    train_slices: int | None = None
    # Keep only slices with foreground (LA and PROMISE12 protocol).
    foreground_only: bool = False
    # Validation volumes carved from the training cases (never the test list).
    val_cases: int = 0
    val_seed: int = 0
    # Cases to evaluate on (file of ids), used by `hsam evaluate --split test`.
    test_list: str | None = None
    # (No num_classes: K is model.num_classes; an old data.num_classes equal to it is accepted,
    # see check_legacy_data_num_classes.)
    # Model-input intensity policy (hsam.intensity), stored in the checkpoint and reapplied
    # by predict/evaluate. null: the data's own (CT: ct_window[-125,275]; MR volumes:
    # percentile[0.5,99.5]; ACDC slice files: minmax, as SSL4MIS prepared them). For slice
    # files a percentile policy is computed over all listed slices of each volume.
    intensity: str | None = None
    # Histogram standardisation [ours; Nyul & Udupa 2000]: after the policy above, each
    # volume's percentiles 1, 10..90, 99 are mapped onto the training volumes' mean ones,
    # which the policy then names (`+landmarks[...]`, hsam.intensity) and the checkpoint
    # carries to predict/evaluate. Volume data only (data.train_list / train_cases).
    # No recipe sets it: on LA it cost ~24 Dice on a bright held-out scan (README).
    histogram_standardization: bool = False

    def __post_init__(self) -> None:
        _at_least("data.val_cases", self.val_cases, 0)
        _at_least("data.train_cases", self.train_cases, 1, optional=True)
        _at_least("data.train_slices", self.train_slices, 1, optional=True)
        if self.intensity is not None:
            try:
                parse_policy(self.intensity)
            except DataError as e:
                raise ConfigError(f"data.intensity: {e}") from None
            if self.histogram_standardization and split_landmarks(self.intensity)[1] is not None:
                raise ConfigError(
                    "data.intensity already names histogram landmarks; drop them or set "
                    "data.histogram_standardization: false (which fits them on the training "
                    "volumes)."
                )


@dataclass
class AugmentConfig:
    """Training augmentation (hsam.data.Augmenter). Paper: rotation, scale and elastic only;
    the flip/rot90 and intensity options default to off. Images are in [0, 1] here."""

    p_rotate: float = 0.5
    max_angle: float = 20.0
    p_scale: float = 0.5
    scale_range: list[float] = dataclasses.field(default_factory=lambda: [0.85, 1.25])
    p_elastic: float = 0.2
    enabled: bool = True
    # Probability of rot90 by k in {0..3} plus a flip along a random axis, image and label
    # together (SSL4MIS ACDC random_rot_flip; paper: none).
    p_flip_rot90: float = 0.0
    # Probability of rot90 by k in {1, 2, 3} without a flip, image and label together: the
    # anatomy keeps its handedness (ACDC stores about 1 patient in 5 rotated by 90 degrees).
    p_rot90: float = 0.0
    # Probability of x -> clip(x * exp(f), 0, 1), f a random polynomial over the slice (MR
    # bias field, TorchIO RandomBiasField): regions change brightness relative to each other.
    p_bias_field: float = 0.0
    # Largest absolute coefficient of the log-field polynomial (TorchIO: 0.5), >= 0.
    bias_field_coefficient: float = 0.5
    # Degree of the log-field polynomial, >= 1 (TorchIO: 3).
    bias_field_order: int = 3
    # Probability of x -> clip(a (x - mean) + mean + b, 0, 1) (nnU-Net contrast/brightness).
    p_contrast: float = 0.0
    # Contrast factor a, uniform in [low, high], low > 0 (nnU-Net: [0.75, 1.25]).
    contrast_range: list[float] = dataclasses.field(default_factory=lambda: [0.65, 1.5])
    # Additive brightness b, uniform in [low, high] within [-1, 1], applied with contrast
    # (batchgenerators' additive brightness; nnU-Net v2 scales brightness by [0.75, 1.25]).
    brightness_range: list[float] = dataclasses.field(default_factory=lambda: [-0.15, 0.15])
    # Probability of x -> x ** g on [0, 1] images (nnU-Net gamma).
    p_gamma: float = 0.0
    # Gamma g, log-uniform in [low, high], 0 < low (nnU-Net: [0.7, 1.5]); g > 1 darkens.
    gamma_range: list[float] = dataclasses.field(default_factory=lambda: [0.5, 2.0])
    # Probability of x through a random monotone piecewise-linear curve from (0, 0) to (1, 1)
    # (as ANTs histogramWarpImageIntensities, MONAI RandHistogramShift): it can darken
    # mid-range tissue under a bright top.
    p_histogram_shift: float = 0.0
    # Interior knots of that curve, evenly spaced in x, an integer >= 1.
    histogram_shift_points: int = 3
    # How far each knot moves up or down, in [0, 1].
    histogram_shift_max: float = 0.3

    def __post_init__(self) -> None:
        where = "train.augment"
        for name in (
            "p_rotate",
            "p_scale",
            "p_elastic",
            "p_flip_rot90",
            "p_rot90",
            "p_bias_field",
            "p_contrast",
            "p_gamma",
            "p_histogram_shift",
        ):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"{where}.{name}={p} must be a probability in [0, 1].")
        if not (math.isfinite(self.bias_field_coefficient) and self.bias_field_coefficient >= 0):
            raise ConfigError(
                f"{where}.bias_field_coefficient={self.bias_field_coefficient} must be >= 0."
            )
        if int(self.bias_field_order) != self.bias_field_order or self.bias_field_order < 1:
            raise ConfigError(
                f"{where}.bias_field_order={self.bias_field_order} must be an integer >= 1."
            )
        if int(self.histogram_shift_points) != self.histogram_shift_points or (
            self.histogram_shift_points < 1
        ):
            raise ConfigError(
                f"{where}.histogram_shift_points={self.histogram_shift_points} must be an "
                "integer >= 1."
            )
        if not 0.0 <= self.histogram_shift_max <= 1.0:
            raise ConfigError(
                f"{where}.histogram_shift_max={self.histogram_shift_max} must lie in [0, 1]."
            )
        if not (math.isfinite(self.max_angle) and self.max_angle >= 0):
            raise ConfigError(f"{where}.max_angle={self.max_angle} must be >= 0 degrees.")
        for name, positive in (
            ("scale_range", True),
            ("contrast_range", True),
            ("brightness_range", False),
            ("gamma_range", True),
        ):
            pair = list(getattr(self, name))
            if len(pair) != 2:
                raise ConfigError(f"{where}.{name}={pair} must be two numbers [low, high].")
            lo, hi = pair
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ConfigError(f"{where}.{name}={pair} must be finite numbers.")
            if not lo <= hi:
                raise ConfigError(f"{where}.{name}={pair} must have low <= high.")
            if positive and lo <= 0:
                raise ConfigError(f"{where}.{name}={pair} must be > 0.")
        lo, hi = self.brightness_range
        if lo < -1.0 or hi > 1.0:
            raise ConfigError(
                f"{where}.brightness_range={list(self.brightness_range)} must lie in [-1, 1] "
                "(images are in [0, 1])."
            )


@dataclass
class TrainConfig:
    epochs: int = 300
    # Per-process batch; effective batch = batch_size x accumulation_steps x processes.
    batch_size: int = 8
    accumulation_steps: int = 1
    base_lr: float = 0.0025
    weight_decay: float = 0.1
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 250
    poly_power: float = 0.9
    # Per-stage loss: (1 - dice_weight) * CE + dice_weight * Dice.
    dice_weight: float = 0.9
    # supplement: 1 - 0.6 ** (0.99 ** e) (released code); main_text: 0.8 exp(-0.005 e).
    stage_weight_schedule: Literal["supplement", "main_text"] = "supplement"
    # None = the schedule per absolute epoch (paper: set for 250-300 epochs). N = the run's
    # progress mapped onto N schedule epochs, per optimiser step, so a short run goes through
    # the whole curve (a 4-epoch run otherwise never leaves the start weight 0.40) [ours].
    stage_weight_horizon: int | None = None
    # auto: bf16 where the hardware has it (GPU bf16 units, AVX-512/AMX CPU), else fp32;
    # config.yaml and checkpoints record what the run resolved it to.
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    device: str = "auto"
    seed: int = 2345
    # Validate on the carved validation volumes every N epochs (and at the last epoch).
    val_every: int = 10
    num_workers: int = 0
    # Cap optimiser steps per epoch (quick runs and tests); None = the whole data set.
    max_steps_per_epoch: int | None = None
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    # Slices per forward pass during validation inference.
    inference_batch_size: int = 8
    # Compute the frozen encoder units before the first LoRA block once, for a fixed set of
    # `augmented_views` augmentations of every slice (epoch e trains on view e mod V). Same
    # math as recomputing; worth it when LoRA covers only the last blocks (model.lora_last_n).
    cache_encoder_prefix: bool = False
    augmented_views: int = 4
    # torch.compile (inductor) the training forward pass. Compiling costs minutes on a small
    # CPU (and needs a C++ compiler there); whether it pays off is measured per configuration
    # in docs/benchmarks.md. Validation stays eager: its batch shapes differ.
    compile: bool = False

    def __post_init__(self) -> None:
        # Checked here, when the config loads: a bad value otherwise fails deep in torch or
        # numpy (some after an epoch of training) or trains nonsense.
        where = "train"
        for name in ("epochs", "batch_size", "accumulation_steps", "val_every"):
            _at_least(f"{where}.{name}", getattr(self, name), 1)
        for name in ("inference_batch_size", "augmented_views"):
            _at_least(f"{where}.{name}", getattr(self, name), 1)
        _at_least(f"{where}.max_steps_per_epoch", self.max_steps_per_epoch, 1, optional=True)
        for name in ("warmup_steps", "num_workers", "weight_decay", "poly_power"):
            _at_least(f"{where}.{name}", getattr(self, name), 0)
        lr_ok = math.isfinite(self.base_lr) and self.base_lr > 0
        _check(lr_ok, f"{where}.base_lr", self.base_lr, "must be a number > 0")
        _fraction(f"{where}.dice_weight", self.dice_weight)
        _check(len(self.betas) == 2, f"{where}.betas", self.betas, "must be two numbers")
        for i, beta in enumerate(self.betas):
            _fraction(f"{where}.betas[{i}]", beta, high_open=True)
        if self.stage_weight_horizon is not None and self.stage_weight_horizon < 1:
            raise ConfigError(
                f"train.stage_weight_horizon={self.stage_weight_horizon} must be >= 1 (the "
                "number of schedule epochs a run is mapped onto), or null for per-epoch."
            )


@dataclass
class InferenceConfig:
    """How a recipe's checkpoints predict by default [ours]: a checkpoint keeps its run's
    config, so ``hsam predict`` / ``hsam evaluate`` (and ``Predictor.from_checkpoint``) use
    these unless told otherwise, and validation during training scores with them. They do not
    change what is trained (a run's reuse ignores them)."""

    # Sigma, in slices, of a Gaussian that averages the class probabilities across
    # neighbouring slices before the argmax (0: off). For thin, near-isotropic slices (LA).
    slice_smoothing: float = 0.0
    # "largest_component": each class keeps its largest 3-D connected component.
    postprocess: Postprocess = "none"
    # Probabilities averaged over transformed slices: "flip" (the four mirrorings) or "rot90"
    # (the four quarter turns), for models trained with those transforms.
    tta: TestTimeAugmentation = "none"

    def __post_init__(self) -> None:
        _at_least("inference.slice_smoothing", self.slice_smoothing, 0)


@dataclass
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    inference: InferenceConfig = dataclasses.field(default_factory=InferenceConfig)


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run config from YAML (or the defaults), apply `a.b=v` overrides, validate."""
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides))
    return from_dict(RunConfig, data, "config")


# Fields that do not change what a run trains: where it is evaluated, on which device and
# how its checkpoints predict by default.
_NOT_TRAINING = frozenset(
    {
        "data.test_list",
        "train.device",
        "inference.slice_smoothing",
        "inference.postprocess",
        "inference.tta",
    }
)
# Fields a run fills in when the config leaves them unresolved (this value): the class noise
# levels and the precision "auto" (resolved for the run's hardware).
_RESOLVED_IN_TRAINING = {"model.class_noise_std": None, "train.precision": "auto"}
# The stage weight mixes the losses of two stages: a one-stage model never uses it.
_TWO_STAGE_ONLY = frozenset({"train.stage_weight_schedule", "train.stage_weight_horizon"})


def config_differences(stored: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Fields where a run's stored config (its config.yaml) differs from `cfg`, each as
    ``"train.epochs: 4 in the run, 8 now"``.

    Not compared: fields a run resolves when `cfg` leaves them unresolved (the class noise
    levels, precision auto), fields that do not change what is trained (test list, device,
    inference defaults) and, for a one-stage model, the stage weight. A field `stored` lacks
    was added to hsam after the run; it counts as its default, the behaviour from before the
    field existed."""
    # Through YAML, as config.yaml was written, so tuples compare as lists.
    wanted = yaml.safe_load(dump_yaml(to_dict(cfg)))
    defaults = yaml.safe_load(dump_yaml(to_dict(RunConfig())))
    ignored = _NOT_TRAINING | (_TWO_STAGE_ONLY if cfg.model.stages == 1 else frozenset())
    found: list[str] = []

    def walk(want: dict[str, Any], have: Any, default: dict[str, Any], prefix: str) -> None:
        have = have if isinstance(have, dict) else {}
        for key, value in want.items():
            field = prefix + key
            if isinstance(value, dict):
                walk(value, have.get(key), default.get(key) or {}, field + ".")
                continue
            unresolved = field in _RESOLVED_IN_TRAINING and value == _RESOLVED_IN_TRAINING[field]
            if field in ignored or unresolved:
                continue
            trained = have.get(key, default.get(key))
            if value != trained:
                found.append(f"{field}: {trained!r} in the run, {value!r} now")

    walk(wanted, stored, defaults, "")
    return found
