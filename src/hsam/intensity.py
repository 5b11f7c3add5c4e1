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

A model policy may end in `+landmarks[v1,...,v11]`: histogram standardisation (Nyul & Udupa,
2000). After the base policy, the volume's own percentiles :data:`LANDMARK_PERCENTILES` are
mapped piecewise linearly onto these reference values (the mean landmarks of a run's training
volumes, so a checkpoint carries them); 0 and 1 stay in place, so the outermost segments run
from 0 to the first and from the last landmark to 1. It undoes monotone contrast differences
between scans (an MR blood pool that one scanner renders at 0.33 of the range and another at
0.8), which a per-volume min-max cannot.

:func:`apply_intensity` applies any name; :func:`to_model_range` applies a model policy
(:func:`parse_policy`) and takes into account what a reader already did.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from hsam.errors import DataError

#: Default CT window in HU (TransUNet/SAMed/H-SAM Synapse preprocessing).
CT_WINDOW = (-125.0, 275.0)
DEFAULT_MR_POLICY = "percentile[0.5,99.5]"
DEFAULT_CT_POLICY = "ct_window[-125,275]"

#: Percentiles whose values are a volume's histogram landmarks (Nyul's deciles with 1 and 99
#: as the ends, which ignore the outermost voxels).
LANDMARK_PERCENTILES = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)

_BOUNDED = re.compile(r"(ct_window|percentile)\[(-?[\d.]+),(-?[\d.]+)\]")
_LANDMARKS = re.compile(r"\+landmarks\[([^\]]*)\]$")
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
    """``(kind, lo, hi)`` of a model-input policy: a name whose output is in [0, 1],
    optionally followed by ``+landmarks[...]`` (module doc), which is validated too.

    Raises:
        DataError: an unknown name, ``zscore``/``none``, or malformed landmarks.
    """
    base, _ = split_landmarks(policy)
    try:
        kind, lo, hi = parse_intensity(base)
    except DataError:
        kind, lo, hi = "", 0.0, 0.0
    if kind not in ("ct_window", "percentile"):
        raise DataError(
            f"unknown intensity policy {policy!r}; use e.g. {DEFAULT_CT_POLICY!r} or "
            f"{DEFAULT_MR_POLICY!r}."
        )
    return kind, lo, hi


def split_landmarks(policy: str) -> tuple[str, np.ndarray | None]:
    """``(base policy, reference landmarks)`` of a model policy; the landmarks are None
    without a ``+landmarks[...]`` suffix.

    Raises:
        DataError: a suffix whose values are not :data:`LANDMARK_PERCENTILES`-many
            non-decreasing numbers in [0, 1].
    """
    compact = policy.strip().replace(" ", "")
    match = _LANDMARKS.search(compact)
    if match is None:
        return policy.strip(), None
    try:
        values = np.array([float(v) for v in match.group(1).split(",")], dtype=np.float64)
    except ValueError:
        values = np.array([np.nan])
    check_landmarks(values, where=f"intensity policy {policy!r}")
    return compact[: match.start()], values


def check_landmarks(values: np.ndarray, *, where: str) -> None:
    """Raise DataError unless `values` are reference landmarks (see split_landmarks)."""
    n = len(LANDMARK_PERCENTILES)
    if (
        values.shape != (n,)
        or not np.isfinite(values).all()
        or values.min() < 0.0
        or values.max() > 1.0
        or np.any(np.diff(values) < 0)
    ):
        raise DataError(
            f"{where}: histogram landmarks must be {n} non-decreasing numbers in [0, 1], the "
            f"reference intensities at the percentiles {list(LANDMARK_PERCENTILES)}; got "
            f"{np.round(values, 4).tolist()}."
        )


def volume_landmarks(image: np.ndarray) -> np.ndarray:
    """``(11,)`` float64: the percentiles :data:`LANDMARK_PERCENTILES` of a model-range image
    (the base policy applied), over all of its voxels."""
    return np.percentile(np.asarray(image, dtype=np.float32), LANDMARK_PERCENTILES)


def with_landmarks(policy: str, reference: np.ndarray) -> str:
    """`policy` with histogram standardisation onto `reference` (the mean
    :func:`volume_landmarks` of the training volumes).

    Raises:
        DataError: `policy` already standardises, or `reference` is not valid landmarks.
    """
    base, existing = split_landmarks(policy)
    if existing is not None:
        raise DataError(
            f"intensity policy {policy!r} already names its histogram landmarks; give either "
            "the landmarks or histogram standardisation from the training volumes, not both."
        )
    reference = np.asarray(reference, dtype=np.float64)
    check_landmarks(reference, where="reference landmarks")
    return f"{base}+landmarks[{','.join(f'{v:.4f}' for v in reference)}]"


def map_landmarks(image: np.ndarray, own: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """float32 `image` (in [0, 1]) mapped piecewise linearly from its landmarks `own` (its
    :func:`volume_landmarks`, or its whole volume's) onto `reference`, with 0 and 1 kept in
    place (the segments below the first and above the last landmark end there).

    Landmarks that coincide (a volume whose lowest tenth is all zero) are spread by a
    negligible step so that the map stays a function; voxels at the tie take the lowest of
    their reference values.
    """
    image = np.asarray(image, dtype=np.float32)
    source = np.concatenate(([0.0], np.asarray(own, dtype=np.float64), [1.0]))
    target = np.concatenate(([0.0], np.asarray(reference, dtype=np.float64), [1.0]))
    source = np.maximum.accumulate(source) + np.arange(source.size) * 1e-7
    return np.clip(np.interp(image, source, target), 0.0, 1.0).astype(np.float32)


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


@dataclass(frozen=True)
class VolumeMapping:
    """A model policy fitted to one volume: its base policy's (low, high) bounds and, with
    histogram standardisation, the volume's own landmarks and the reference ones. Calling it
    maps that volume's raw values (the whole volume or any of its slices) to [0, 1]."""

    bounds: tuple[float, float]
    landmarks: tuple[np.ndarray, np.ndarray] | None = None  # (the volume's, reference)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        image = apply_bounds(values, self.bounds)
        return image if self.landmarks is None else map_landmarks(image, *self.landmarks)


def fit_volume_mapping(values: np.ndarray, policy: str, *, already: str = "none") -> VolumeMapping:
    """`policy` fitted to the intensities `values` (a volume, or all the slices of one
    volume): bounds as model_range_bounds, landmarks over the values after those bounds."""
    bounds = model_range_bounds(values, policy, already=already)
    _, reference = split_landmarks(policy)
    if reference is None:
        return VolumeMapping(bounds)
    own = volume_landmarks(apply_bounds(values, bounds))
    return VolumeMapping(bounds, (own, reference))


def to_model_range(volume: np.ndarray, policy: str, *, already: str = "none") -> np.ndarray:
    """float32 volume in [0, 1] following `policy`: bounds as model_range_bounds, then
    standardised onto the policy's histogram landmarks when it names them."""
    return fit_volume_mapping(volume, policy, already=already)(volume)


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
