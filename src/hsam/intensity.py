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


def to_model_range(volume: np.ndarray, policy: str, *, already: str = "none") -> np.ndarray:
    """float32 volume in [0, 1] following `policy`.

    `already` is what a reader already did (Case.intensity): a CT window that matches the
    policy is not applied twice.
    """
    kind, lo, hi = parse_policy(policy)
    volume = np.asarray(volume, dtype=np.float32)
    if not np.isfinite(volume).all():
        raise DataError("the image contains NaN or infinite values; fix or mask them first.")
    if kind == "ct_window":
        if already.startswith("ct_window"):
            return np.clip(volume, 0.0, 1.0)
        return ((np.clip(volume, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    low, high = np.percentile(volume, [lo, hi])
    if high <= low:
        return np.zeros_like(volume)
    return ((np.clip(volume, low, high) - low) / (high - low)).astype(np.float32)
