"""Warn when a predicted structure's size is far outside the sizes seen in training.

A model trained on a few scans can fail silently on a scan that differs from them (another
contrast, scanner or field of view): it predicts an almost empty mask, or floods the volume,
and nothing says so until someone looks. This module compares each predicted class's size with
the range measured on the training cases and returns a warning for the scan where it is far
outside.

Size is the **volume fraction**: the class's voxels divided by all voxels of the scan. It has no
unit, so it needs no spacing. Training stores, per foreground class, the minimum and maximum of
this fraction over the training cases in the checkpoint meta (``meta[META_KEY]`` =
``{"<class>": [lo, hi]}``, computed by :func:`hsam.data.class_volume_fraction_ranges`: whole
label volumes for data read as volumes, even with ``foreground_only``; the selected slices of
each volume for 2-D slice files, Synapse npz and ACDC h5). A prediction is flagged when its
fraction is below ``lo / factor`` or above ``hi * factor``; in particular a class present in
every training case (``lo > 0``) and absent from the prediction is always flagged. Checkpoints
without the key (trained before it existed) are not checked.

The default factor :data:`DEFAULT_FACTOR` = 10 was chosen on real data so that no ground-truth
volume of the shipped development sets triggers it (the predicted mask of a good model is near
its ground truth): LA (4 training scans vs 8 test scans) needs 1.1; ACDC with 7 training
patients (136 slices) vs the 20 validation frames needs 2.0; ACDC with 3 patients (68 slices,
one frame carved for validation) needs 8.4 (an end-systolic right ventricle 8x smaller than any
of the 5 training frames'). A near-empty mask of a failed prediction is typically 50x or more
below the training minimum, so it is still caught.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_FACTOR",
    "META_KEY",
    "VolumeWarning",
    "check_factor",
    "ranges_from_meta",
    "volume_warnings",
]

#: Checkpoint meta key of the per-class training range ``{"<class>": [lo, hi]}``.
META_KEY = "class_volume_fraction_range"
#: How far (a multiplicative factor) outside the training range a prediction must be to warn.
DEFAULT_FACTOR = 10.0

Kind = Literal["absent", "small", "large"]


@dataclass(frozen=True)
class VolumeWarning:
    """One class of one prediction whose size is far outside the training range.

    Attributes:
        class_index: the label value ``c`` (1..K).
        class_name: its name (checkpoint label names, or ``class_<c>``).
        kind: ``"absent"`` (no voxel, but the class is in every training case), ``"small"``
            (fraction < ``lo / factor``) or ``"large"`` (fraction > ``hi * factor``).
        voxels: predicted voxels of the class.
        fraction: ``voxels`` / all voxels of the scan.
        train_min, train_max: the training range of the fraction.
        factor: the tolerance it was checked with.
    """

    class_index: int
    class_name: str
    kind: Kind
    voxels: int
    fraction: float
    train_min: float
    train_max: float
    factor: float

    @property
    def detail(self) -> str:
        """What is wrong, with the numbers: class, predicted size, training range (one line,
        without the scan's name; the per-case report column)."""
        rng = f"{_pct(self.train_min)} to {_pct(self.train_max)}"
        if self.kind == "absent":
            what = (
                f"class {self.class_name!r} (label {self.class_index}) is absent from the "
                f"prediction (0 voxels) but occupies {rng} of the voxels in every training case"
            )
        else:
            if self.kind == "small":
                ratio = self.train_min / self.fraction
                side = "below the training minimum"
            elif self.train_max > 0:
                ratio = self.fraction / self.train_max
                side = "above the training maximum"
            else:
                ratio = math.inf
                side = "although no training case contains this class"
            times = f"{ratio:.1f}x " if math.isfinite(ratio) else ""
            what = (
                f"class {self.class_name!r} (label {self.class_index}) occupies "
                f"{_pct(self.fraction)} of the voxels ({self.voxels} voxels), {times}{side} "
                f"(training range {rng}; tolerance factor {self.factor:g})"
            )
        return what

    @property
    def message(self) -> str:
        """:attr:`detail` plus what it may mean, for a log line (without the scan's name)."""
        return (
            f"{self.detail}; the model may have failed on this scan (different contrast, "
            "scanner or field of view?): check this segmentation"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (with ``message``)."""
        return {
            "class_index": self.class_index,
            "class_name": self.class_name,
            "kind": self.kind,
            "voxels": self.voxels,
            "fraction": self.fraction,
            "train_range": [self.train_min, self.train_max],
            "factor": self.factor,
            "message": self.detail,
        }


def _pct(fraction: float) -> str:
    """A fraction as a percentage with 3 significant digits (``0.0123`` -> ``"1.23%"``)."""
    return f"{fraction * 100:.3g}%"


def check_factor(factor: float | None) -> float | None:
    """``None`` or ``0``: the check is off (returns None); else a factor >= 1.

    Raises:
        ValueError: a negative, non-finite or below-1 factor (it would flag normal sizes).
    """
    if factor is None or factor == 0:
        return None
    f = float(factor)
    if not math.isfinite(f) or f < 1:
        raise ValueError(
            f"volume check factor must be >= 1 (or 0 to turn the check off), got {factor!r}"
        )
    return f


def ranges_from_meta(
    meta: Mapping[str, Any], num_classes: int
) -> dict[int, tuple[float, float]] | None:
    """The training ranges ``{c: (lo, hi)}`` stored in a checkpoint's meta, or None.

    None when the key is missing (older checkpoints) or unusable (logged as a warning); classes
    outside ``1..num_classes`` and malformed entries are left out.
    """
    raw = meta.get(META_KEY)
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        logger.warning(
            "checkpoint meta %r is not a {class: [min, max]} mapping (%s); the predicted-size "
            "check is skipped",
            META_KEY,
            type(raw).__name__,
        )
        return None
    out: dict[int, tuple[float, float]] = {}
    for key, value in raw.items():
        try:
            c = int(key)
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            logger.warning(
                "checkpoint meta %r has a malformed entry %r: %r; that class is not checked",
                META_KEY,
                key,
                value,
            )
            continue
        if not (1 <= c <= num_classes) or not (0 <= lo <= hi <= 1):
            logger.warning(
                "checkpoint meta %r entry %r: %r is not a class 1..%d with 0 <= min <= max <= 1; "
                "that class is not checked",
                META_KEY,
                key,
                value,
                num_classes,
            )
            continue
        out[c] = (lo, hi)
    return out or None


def volume_warnings(
    labels: np.ndarray,
    num_classes: int,
    ranges: Mapping[int, tuple[float, float]] | Mapping[str, Any] | None,
    factor: float | None = DEFAULT_FACTOR,
    *,
    label_names: Mapping[int, str] | None = None,
) -> list[VolumeWarning]:
    """The classes of a predicted label map whose volume fraction is far outside training's.

    Args:
        labels: predicted label map (any shape, values ``0..K``); fraction = class voxels /
            ``labels.size``.
        num_classes: ``K``.
        ranges: ``{c: (lo, hi)}`` (int or str keys, e.g. the checkpoint meta's
            ``class_volume_fraction_range``), or None / empty: nothing is checked.
        factor: tolerance (>= 1): warn when the fraction is ``< lo / factor`` or
            ``> hi * factor``; None or 0 turns the check off.
        label_names: ``{c: name}`` for the messages (default ``class_<c>``).

    Returns:
        One :class:`VolumeWarning` per flagged class, by class index (empty: all in range).
    """
    f = check_factor(factor)
    if f is None or not ranges:
        return []
    parsed = ranges_from_meta({META_KEY: ranges}, num_classes)
    if not parsed:
        return []
    labels = np.asarray(labels)
    total = int(labels.size)
    if total == 0:
        return []
    counts = np.bincount(labels.astype(np.int64, copy=False).ravel(), minlength=num_classes + 1)
    names = label_names or {}
    out: list[VolumeWarning] = []
    for c, (lo, hi) in sorted(parsed.items()):
        voxels = int(counts[c])
        fraction = voxels / total
        kind: Kind | None = None
        if voxels == 0 and lo > 0:
            kind = "absent"
        elif fraction < lo / f:
            kind = "small"
        elif fraction > hi * f:
            kind = "large"
        if kind is not None:
            out.append(
                VolumeWarning(
                    class_index=c,
                    class_name=str(names.get(c, f"class_{c}")),
                    kind=kind,
                    voxels=voxels,
                    fraction=fraction,
                    train_min=lo,
                    train_max=hi,
                    factor=f,
                )
            )
    return out
