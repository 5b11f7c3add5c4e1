"""Mapping volume intensities to the [0, 1] range the model takes.

One named policy per checkpoint, stored in it and reapplied by `predict`:
- `ct_window[lo,hi]`: Hounsfield units clipped to [lo, hi] and scaled to [0, 1] (TransUNet's
  [-125, 275] for abdominal CT). Volumes already windowed by a reader pass through.
- `percentile[lo,hi]`: per-volume robust min-max between the lo-th and hi-th percentiles
  (MR). It is invariant to any affine intensity change, so raw MR and z-scored MR (UA-MT's LA
  release) give the same model input.
- `minmax`: per-volume min-max (the SSL4MIS ACDC preprocessing; identity on such data).
"""

from __future__ import annotations

import re

import numpy as np

from hsam.errors import DataError

DEFAULT_MR_POLICY = "percentile[0.5,99.5]"
DEFAULT_CT_POLICY = "ct_window[-125,275]"

_POLICY = re.compile(r"(ct_window|percentile)\[(-?[\d.]+),(-?[\d.]+)\]")


def parse_policy(policy: str) -> tuple[str, float, float]:
    if policy == "minmax":
        return "percentile", 0.0, 100.0
    match = _POLICY.fullmatch(policy.replace(" ", ""))
    if not match:
        raise DataError(
            f"unknown intensity policy {policy!r}; use e.g. {DEFAULT_CT_POLICY!r} or "
            f"{DEFAULT_MR_POLICY!r}."
        )
    return match.group(1), float(match.group(2)), float(match.group(3))


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
