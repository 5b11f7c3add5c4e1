"""Assemble a run's data from its `DataConfig`: few-shot training slices, validation volumes,
the split manifest, class frequencies, the per-class training range of volume fractions and the
intensity policy."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hsam.config import DataConfig, InputResize, RunConfig, TrainConfig
from hsam.data import (
    Augmenter,
    Case,
    SliceDataset,
    carve_validation,
    class_frequencies,
    class_volume_fraction_ranges,
    list_cases,
    make_manifest,
    parse_slice_id,
    read_dataset,
    read_list,
    select_cases,
    standard_split_path,
)
from hsam.data.formats import get_format
from hsam.errors import ConfigError, DataError
from hsam.intensity import (
    LANDMARK_PERCENTILES,
    policy_for,
    to_model_range,
    volume_landmarks,
    with_landmarks,
)

logger = logging.getLogger(__name__)


@dataclass
class RunData:
    train: SliceDataset
    val_cases: list[Case]
    manifest: dict[str, Any]
    intensity_policy: str
    label_names: dict[int, str]
    class_frequencies: np.ndarray  # (T,)
    # {c: (min, max)} over the training cases of class c's volume fraction
    # (hsam.inference.volume_check)
    class_volume_fraction_range: dict[int, tuple[float, float]] = field(default_factory=dict)


def prepare_case(case: Case, policy: str) -> Case:
    """The case with its image mapped to the model's [0, 1] input range."""
    return replace(case, image=to_model_range(case.image, policy, already=case.intensity))


def _standardizing(policy: str, train_cases: list[Case]) -> str:
    """`policy` with histogram standardisation onto the mean landmarks of `train_cases`."""
    landmarks = [volume_landmarks(prepare_case(c, policy).image) for c in train_cases]
    reference = np.mean(landmarks, axis=0)
    median = LANDMARK_PERCENTILES.index(50.0)
    logger.info(
        "histogram standardisation onto the mean landmarks of %d training volume(s); their "
        "medians %s -> %.3f",
        len(landmarks),
        ", ".join(f"{lm[median]:.3f}" for lm in landmarks),
        reference[median],
    )
    return with_landmarks(policy, reference)


def _augmenter(cfg: TrainConfig) -> Augmenter | None:
    aug = cfg.augment
    if not aug.enabled:
        return None
    return Augmenter(
        seed=cfg.seed,
        p_rotate=aug.p_rotate,
        max_angle=aug.max_angle,
        p_scale=aug.p_scale,
        scale_range=tuple(aug.scale_range),
        p_elastic=aug.p_elastic,
        p_flip_rot90=aug.p_flip_rot90,
        p_rot90=aug.p_rot90,
        p_bias_field=aug.p_bias_field,
        bias_field_coefficient=aug.bias_field_coefficient,
        bias_field_order=aug.bias_field_order,
        p_contrast=aug.p_contrast,
        contrast_range=tuple(aug.contrast_range),
        brightness_range=tuple(aug.brightness_range),
        p_gamma=aug.p_gamma,
        gamma_range=tuple(aug.gamma_range),
        p_histogram_shift=aug.p_histogram_shift,
        histogram_shift_points=aug.histogram_shift_points,
        histogram_shift_max=aug.histogram_shift_max,
    )


def list_path(spec: str) -> Path:
    """A list file's path; `standard:NAME` names a split shipped with hsam (synapse_train_220,
    la_4, promise12_3)."""
    if spec.startswith("standard:"):
        return standard_split_path(spec.removeprefix("standard:"))
    return Path(spec)


def read_id_list(spec: str) -> list[str]:
    return read_list(list_path(spec))


def _training_case_ids(cfg: DataConfig) -> tuple[list[str], str, list[Path]]:
    """(selected case ids, how they were chosen, source files)."""
    sources: list[Path] = []
    if cfg.train_list:
        ids = read_id_list(cfg.train_list)
        sources.append(list_path(cfg.train_list))
    else:
        ids = list_cases(cfg.format, cfg.root)
    if cfg.train_cases is not None:
        ids = select_cases(ids, cfg.train_cases, cfg.train_seed)
        how = (
            f"first {cfg.train_cases} cases in file order"
            if cfg.train_seed is None
            else f"{cfg.train_cases} cases drawn with seed {cfg.train_seed}"
        )
    else:
        how = "all listed cases"
    return ids, how, sources


def build_run_data(
    data: DataConfig,
    train: TrainConfig,
    image_size: int,
    *,
    num_classes: int,
    input_resize: InputResize = "stretch",
) -> RunData:
    """Read and select the training and validation data of a run with `num_classes` (K,
    the run's ``model.num_classes``) foreground classes, its slices brought to `image_size`
    as the model's `input_resize` says."""
    if not data.root:
        raise DataError("data.root is empty: set it to the dataset folder.")
    augment = _augmenter(train)
    val_cases: list[Case] = []
    if data.train_slices_list:
        if data.histogram_standardization:
            raise ConfigError(
                "data.histogram_standardization fits its landmarks on training volumes "
                "(data.train_list / train_cases), not on slice files "
                "(data.train_slices_list); turn it off, or give the landmarks in "
                "data.intensity ('...+landmarks[v1,...,v11]')."
            )
        slice_ids = read_id_list(data.train_slices_list)
        if data.train_slices is not None:
            slice_ids = slice_ids[: data.train_slices]
        if not slice_ids:
            raise DataError(f"{data.train_slices_list} selects no slices; the split is empty.")
        case_ids = list(dict.fromkeys(parse_slice_id(s)[0] for s in slice_ids))
        train_ids, val_ids = carve_validation(case_ids, data.val_cases, data.val_seed)
        kept = [s for s in slice_ids if parse_slice_id(s)[0] in set(train_ids)]
        # what the format's slice files already hold (Synapse npz: CT window; ACDC: minmax)
        slice_files = get_format(data.format).slice_files
        if slice_files is None:
            raise DataError(
                f"data.train_slices_list works with slice files (synapse, acdc), not "
                f"{data.format!r}; use data.train_list / train_cases instead."
            )
        applied = slice_files.intensity
        policy = data.intensity or policy_for(applied)
        dataset = SliceDataset.from_slice_list(
            data.format,
            data.root,
            kept,
            image_size,
            augment=augment,
            seed=train.seed,
            input_resize=input_resize,
            foreground_only=data.foreground_only,
            # the files hold the format's own mapping; another policy is refitted per volume
            intensity=(policy, applied) if data.intensity else None,
        )
        how = f"first {len(slice_ids)} lines of {Path(data.train_slices_list).name}"
        sources = [list_path(data.train_slices_list)]
        label_names = {i: f"class{i}" for i in range(num_classes + 1)}
        if val_ids:
            val_cases = read_dataset(data.format, data.root, val_ids)
        train_list = kept
        # The volumes behind the slices (ACDC: patientNNN_frameMM), so the manifest names
        # the patients a slice fraction selected.
        extra = {"train_cases": train_ids}
    else:
        ids, how, sources = _training_case_ids(data)
        train_ids, val_ids = carve_validation(ids, data.val_cases, data.val_seed)
        cases = read_dataset(data.format, data.root, train_ids + val_ids)
        for case in cases:
            case.validate(num_classes)
        policy = data.intensity or policy_for(cases[0].intensity)
        if data.histogram_standardization:
            policy = _standardizing(policy, cases[: len(train_ids)])
        cases = [prepare_case(c, policy) for c in cases]
        train_cases = cases[: len(train_ids)]
        val_cases = cases[len(train_ids) :]
        label_names = cases[0].label_names
        dataset = SliceDataset(
            train_cases,
            image_size,
            foreground_only=data.foreground_only,
            augment=augment,
            seed=train.seed,
            input_resize=input_resize,
        )
        train_list = train_ids
        extra = {}
    val_cases = (
        [prepare_case(c, policy) for c in val_cases] if data.train_slices_list else val_cases
    )
    freqs = class_frequencies(dataset, num_classes)
    # whole volumes when the training data are volumes (also with foreground_only), the
    # selected slices of each volume for slice files (see class_volume_fractions)
    volume_ranges = class_volume_fraction_ranges(dataset, num_classes)
    manifest = make_manifest(
        train=train_list, val=val_ids, method=how, seed=data.train_seed, sources=sources, **extra
    )
    logger.info(
        "training on %d slices from %d case(s); %d validation volume(s); intensity %s",
        len(dataset),
        len(dataset.case_ids),
        len(val_cases),
        policy,
    )
    logger.info(
        "class volume fractions over the %d training case(s), min-max: %s",
        len(dataset.case_ids),
        ", ".join(f"{c}: {lo:.4g}-{hi:.4g}" for c, (lo, hi) in volume_ranges.items()),
    )
    return RunData(dataset, val_cases, manifest, policy, dict(label_names), freqs, volume_ranges)


def run_data_of(cfg: RunConfig) -> RunData:
    """:func:`build_run_data` of a run config: its data, training settings and the model's
    S, K and input resize."""
    return build_run_data(
        cfg.data,
        cfg.train,
        cfg.model.image_size,
        num_classes=cfg.model.num_classes,
        input_resize=cfg.model.input_resize,
    )
