"""Intensity mappings, named by one vocabulary shared by readers and the model input.

A name describes what is done to a volume's raw values; the same strings are written into
:attr:`hsam.data.Case.intensity` (what a reader applied), into checkpoints (the model-input
policy, reapplied by `predict`) and into run configs:

- `ct_window[lo,hi]`: Hounsfield units clipped to [lo, hi] and scaled to [0, 1] (TransUNet's
  [-125, 275] for abdominal CT). As a model policy, volumes already windowed by a reader pass
  through.
- `percentile[lo,hi]`: per-volume robust min-max between the lo-th and hi-th percentiles
  (MR). It is invariant to any affine intensity change, so raw MR and z-scored MR (UA-MT's LA
  release) give the same model input.
- `minmax`: per-volume min-max (the SSL4MIS ACDC preprocessing; identity on such data), the
  same as `percentile[0,100]`.
- `zscore`: (x - mean) / std over the volume; `none`: the values unchanged. These two are
  reader preprocessing only: their output is not in [0, 1], so they are no model policy.

:func:`apply_intensity` applies any name; :func:`to_model_range` applies a model policy
(:func:`parse_policy`) and takes into account what a reader already did.
"""

from __future__ import annotations

import re

import numpy as np

from hsam.errors import DataError

#: Default CT window in HU (TransUNet/SAMed/H-SAM Synapse preprocessing).
CT_WINDOW = (-125.0, 275.0)
DEFAULT_MR_POLICY = "percentile[0.5,99.5]"
DEFAULT_CT_POLICY = "ct_window[-125,275]"

_BOUNDED = re.compile(r"(ct_window|percentile)\[(-?[\d.]+),(-?[\d.]+)\]")
# Names whose output is not the model's [0, 1] input range (reader preprocessing only).
_UNBOUNDED = ("zscore", "none")


def parse_intensity(name: str) -> tuple[str, float, float]:
    """``(kind, lo, hi)`` of any intensity name (module doc); ``minmax`` is
    ``("percentile", 0, 100)``; ``zscore``/``none`` have ``lo = hi = 0``.

    Raises:
        DataError: a name outside the vocabulary.
    """
    name = name.strip()
    if name == "minmax":
        return "percentile", 0.0, 100.0
    if name in _UNBOUNDED:
        return name, 0.0, 0.0
    match = _BOUNDED.fullmatch(name.replace(" ", ""))
    if not match:
        raise DataError(
            f"unknown intensity preprocessing {name!r}; use 'ct_window[lo,hi]', "
            "'percentile[lo,hi]', 'minmax', 'zscore' or 'none'."
        )
    return match.group(1), float(match.group(2)), float(match.group(3))


def parse_policy(policy: str) -> tuple[str, float, float]:
    """``(kind, lo, hi)`` of a model-input policy: a name whose output is in [0, 1].

    Raises:
        DataError: an unknown name, or ``zscore``/``none``.
    """
    try:
        kind, lo, hi = parse_intensity(policy)
    except DataError:
        kind, lo, hi = "", 0.0, 0.0
    if kind not in ("ct_window", "percentile"):
        raise DataError(
            f"unknown intensity policy {policy!r}; use e.g. {DEFAULT_CT_POLICY!r} or "
            f"{DEFAULT_MR_POLICY!r}."
        )
    return kind, lo, hi


def policy_for(applied: str) -> str:
    """The model-input policy for data whose reader applied `applied` (Case.intensity)."""
    if applied.startswith("ct_window"):
        return DEFAULT_CT_POLICY
    return "minmax" if applied == "minmax" else DEFAULT_MR_POLICY


def model_range_bounds(
    values: np.ndarray, policy: str, *, already: str = "none"
) -> tuple[float, float]:
    """(low, high) such that clip((x - low) / (high - low), 0, 1) is `policy` applied to
    the intensities `values` (a volume, or all the slices of one volume); see to_model_range.

    `already` is what a reader already did (Case.intensity): a CT window that matches the
    policy is not applied twice.
    """
    kind, lo, hi = parse_policy(policy)
    values = np.asarray(values, dtype=np.float32)
    if not np.isfinite(values).all():
        raise DataError("the image contains NaN or infinite values; fix or mask them first.")
    if kind == "ct_window":
        return (0.0, 1.0) if already.startswith("ct_window") else (lo, hi)
    low, high = np.percentile(values, [lo, hi])
    return float(low), float(high)


def apply_bounds(volume: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """float32 clip((volume - low) / (high - low), 0, 1); all zeros when high <= low."""
    low, high = bounds
    volume = np.asarray(volume, dtype=np.float32)
    if high <= low:
        return np.zeros_like(volume)
    return ((np.clip(volume, low, high) - low) / (high - low)).astype(np.float32)


def to_model_range(volume: np.ndarray, policy: str, *, already: str = "none") -> np.ndarray:
    """float32 volume in [0, 1] following `policy` (see model_range_bounds)."""
    return apply_bounds(volume, model_range_bounds(volume, policy, already=already))


def ct_window(x: np.ndarray, lo: float = CT_WINDOW[0], hi: float = CT_WINDOW[1]) -> np.ndarray:
    """Clip HU values to ``[lo, hi]`` and map linearly to ``[0, 1]`` (float32, any shape)."""
    if not hi > lo:
        raise DataError(f"CT window [{lo}, {hi}] is empty; the upper bound must exceed the lower.")
    return apply_bounds(x, (float(lo), float(hi)))


def minmax(x: np.ndarray) -> np.ndarray:
    """Map ``[min, max]`` of the whole array linearly to ``[0, 1]``; constant -> zeros."""
    return to_model_range(x, "minmax")


def zscore(x: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` over the whole array (float32, any shape); constant -> zeros."""
    x = np.asarray(x, dtype=np.float32)
    mean = float(x.mean(dtype=np.float64))
    std = float(x.std(dtype=np.float64))
    if std == 0.0:
        return (x - np.float32(mean)).astype(np.float32)
    return ((x - np.float32(mean)) / np.float32(std)).astype(np.float32)


def apply_intensity(x: np.ndarray, name: str) -> np.ndarray:
    """Apply the intensity mapping ``name`` (any name of the module doc) to raw values.

    This is how a reader preprocesses raw data (the name is then its :attr:`Case.intensity`).
    """
    kind, lo, hi = parse_intensity(name)
    if kind == "zscore":
        return zscore(x)
    if kind == "none":
        return np.asarray(x, dtype=np.float32).copy()
    if kind == "ct_window":
        return ct_window(x, lo, hi)
    return to_model_range(x, name)
