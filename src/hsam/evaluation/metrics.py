"""Segmentation metrics for 3-D volumes under two explicit, documented policies.

All functions are pure and work on 3-D arrays of shape ``(D, H, W)`` (SimpleITK/numpy order:
slices, rows, columns). Masks may be boolean or integer; any non-zero voxel is foreground.
``spacing`` is always given in the same axis order as the array, ``(D, H, W)`` in mm, i.e. the
*reverse* of SimpleITK's ``GetSpacing()`` (which is x, y, z).

Policies
--------
``legacy`` -- the convention behind the published TransUNet / SAMed / H-SAM tables
(``calculate_metric_percase`` in their ``utils.py``), reproduced with medpy itself:

* both masks non-empty: Dice = ``medpy.metric.binary.dc``; HD95 =
  ``medpy.metric.binary.hd95(voxelspacing=None, connectivity=1)``, i.e. the 95th percentile of
  the *pooled* symmetric surface distances in **voxel units** (a step between slices counts 1,
  whatever the slice thickness). ``spacing`` is ignored by design.
* prediction non-empty, ground truth empty: Dice = 1, HD95 = 0 (a false-positive organ scores
  perfectly -- this is what the published numbers do).
* prediction empty (ground truth empty or not): Dice = 0, HD95 = 0 (a missed organ *improves*
  the mean HD95 -- again, what the published numbers do).
* NSD is not part of the published convention. Under ``legacy`` it is computed in mm (the
  tolerance is in mm) and follows the same empty-mask rules as legacy Dice (1 for a
  false-positive-only prediction, 0 for an empty prediction), so legacy values are never NaN.

``strict`` -- physical units and no silent zeros:

* Dice: ``2 |P & G| / (|P| + |G|)``; NaN when both masks are empty; 0 when exactly one is
  empty (false positives and misses both count as failures).
* HD95: 95th percentile of the pooled symmetric surface distances (medpy's definition, with
  ``voxelspacing=spacing``), in **mm**; NaN when either mask is empty.
* NSD: normalised surface Dice (Nikolov et al. 2021) at ``tolerance_mm``; NaN when both masks
  are empty, 0 when exactly one is (as DeepMind's ``surface-distance`` and MONAI, and as strict
  Dice: a missed organ counts as a failure instead of leaving the mean).

NaNs are meant to be *seen*: the aggregation helpers average over the defined cases and return
how many cases were defined, so a report can say "HD95 over 9 of 12 cases".

Surfaces (both policies, HD95 and NSD): ``mask XOR binary_erosion(mask)`` with the 6-connected
(connectivity 1) structuring element and background outside the array, exactly as medpy does.
Distances are Euclidean between surface-voxel centres (scipy's exact distance transform with
``sampling=spacing``). NSD counts surface *voxels*, as MONAI's ``compute_surface_dice`` does
by default (DeepMind's ``surface-distance`` weights each surface element by its area instead):
``NSD = (#{p in S_P: d(p, S_G) <= tau} + #{g in S_G: d(g, S_P) <= tau}) / (|S_P| + |S_G|)``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from medpy.metric import binary as medpy_binary
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from hsam.errors import DataError

logger = logging.getLogger(__name__)

Policy = Literal["legacy", "strict"]
POLICIES: tuple[str, ...] = ("legacy", "strict")
METRICS: tuple[str, ...] = ("dice", "hd95", "nsd")
#: Slack (mm) added to the NSD tolerance so that a distance equal to the tolerance counts as
#: inside it despite floating-point rounding in the distance transform.
NSD_EPS_MM = 1e-6

_STRUCTURE = generate_binary_structure(3, 1)


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise DataError(f"unknown metric policy {policy!r}; use one of {', '.join(POLICIES)}")
    return policy


def _as_mask(array: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(array)
    if arr.ndim != 3:
        raise DataError(
            f"{name} must be a 3-D (D, H, W) mask, got shape {arr.shape}; "
            "stack 2-D slices into a volume before computing 3-D metrics"
        )
    return arr if arr.dtype == bool else arr != 0


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = _as_mask(pred, "pred")
    g = _as_mask(gt, "gt")
    if p.shape != g.shape:
        raise DataError(
            f"pred shape {p.shape} != gt shape {g.shape}; resample the prediction onto the "
            "ground-truth grid first"
        )
    return p, g


def normalize_spacing(
    spacing: Sequence[float] | None, *, required: bool = True
) -> tuple[float, float, float] | None:
    """Validate a ``(D, H, W)`` spacing in mm: three finite positive numbers.

    Returns a tuple of three floats, or ``None`` when ``spacing`` is None and not required.
    """
    if spacing is None:
        if required:
            raise DataError(
                "the strict policy needs the voxel spacing in mm, (D, H, W) order; pass the "
                "volume's spacing (or (1, 1, 1) explicitly for unit spacing)"
            )
        return None
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError) as exc:
        raise DataError(f"spacing must be three numbers in mm (D, H, W), got {spacing!r}") from exc
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise DataError(
            f"spacing must be three finite positive numbers in mm (D, H, W), got {spacing!r}"
        )
    return values


def _check_tolerance(tolerance_mm: float) -> float:
    tol = float(tolerance_mm)
    if not np.isfinite(tol) or tol < 0:
        raise DataError(f"NSD tolerance must be a finite number >= 0 mm, got {tolerance_mm!r}")
    return tol


# --------------------------------------------------------------------------------------------
# geometry kernels
# --------------------------------------------------------------------------------------------
def _crop_to_union(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus a 1-voxel margin.

    The margin (clipped at the array border) keeps erosion identical to the full array (a mask
    voxel is at the crop border only if it is at the array border), and the distance transform
    is translation invariant, so every surface distance is unchanged. It only saves time.
    """
    union = p | g
    if not union.any():
        return p, g
    slices = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        lo = max(int(idx[0]) - 1, 0)
        hi = min(int(idx[-1]) + 2, union.shape[axis])
        slices.append(slice(lo, hi))
    key = tuple(slices)
    return p[key], g[key]


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: ``mask XOR eroded(mask)`` with 6-connectivity, background outside."""
    return mask ^ binary_erosion(mask, structure=_STRUCTURE, iterations=1, border_value=0)


def _surface_distances(
    p: np.ndarray, g: np.ndarray, spacing: tuple[float, float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each surface voxel of ``p`` to ``S_g`` and of ``g`` to ``S_p``.

    Both masks must be non-empty. Units are mm when ``spacing`` is given, voxels otherwise.
    Returns ``(d_p_to_g (|S_p|,), d_g_to_p (|S_g|,))``.
    """
    p, g = _crop_to_union(p, g)
    sp, sg = _surface(p), _surface(g)
    dt_to_g = distance_transform_edt(~sg, sampling=spacing)
    dt_to_p = distance_transform_edt(~sp, sampling=spacing)
    return dt_to_g[sp], dt_to_p[sg]


def _hd95_from(d_pg: np.ndarray, d_gp: np.ndarray) -> float:
    return float(np.percentile(np.hstack((d_pg, d_gp)), 95))


def _nsd_from(d_pg: np.ndarray, d_gp: np.ndarray, tol: float) -> float:
    limit = tol + NSD_EPS_MM
    inside = int(np.count_nonzero(d_pg <= limit)) + int(np.count_nonzero(d_gp <= limit))
    return inside / float(d_pg.size + d_gp.size)


def _legacy_hd95(p: np.ndarray, g: np.ndarray) -> float:
    pc, gc = _crop_to_union(p, g)
    return float(medpy_binary.hd95(pc, gc, voxelspacing=None, connectivity=1))


# --------------------------------------------------------------------------------------------
# public metrics
# --------------------------------------------------------------------------------------------
def dice(pred: np.ndarray, gt: np.ndarray, policy: Policy) -> float:
    """Dice coefficient of two 3-D masks ``(D, H, W)``.

    ``legacy``: both non-empty -> medpy ``dc``; prediction non-empty and ground truth empty -> 1;
    empty prediction -> 0. ``strict``: both empty -> NaN; otherwise
    ``2 |P & G| / (|P| + |G|)`` (0 when exactly one is empty).
    """
    policy = _check_policy(policy)
    p, g = _pair(pred, gt)
    np_, ng = int(np.count_nonzero(p)), int(np.count_nonzero(g))
    if policy == "legacy":
        if np_ > 0 and ng > 0:
            return float(medpy_binary.dc(*_crop_to_union(p, g)))
        return 1.0 if np_ > 0 else 0.0
    if np_ == 0 and ng == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(p & g)) / float(np_ + ng)


def hd95(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None, policy: Policy
) -> float:
    """95th-percentile Hausdorff distance (pooled symmetric surface distances, as medpy).

    ``legacy``: medpy ``hd95(voxelspacing=None, connectivity=1)`` in voxels, ``spacing`` is
    ignored; prediction non-empty and ground truth empty -> 0; empty prediction -> 0.
    ``strict``: in mm with ``spacing`` ``(D, H, W)`` (required); NaN if either mask is empty.
    """
    policy = _check_policy(policy)
    p, g = _pair(pred, gt)
    has_p, has_g = bool(p.any()), bool(g.any())
    if policy == "legacy":
        return _legacy_hd95(p, g) if (has_p and has_g) else 0.0
    sp = normalize_spacing(spacing)
    if not (has_p and has_g):
        return float("nan")
    return _hd95_from(*_surface_distances(p, g, sp))


def nsd(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float,
    policy: Policy,
) -> float:
    """Normalised surface Dice at ``tolerance_mm`` (Nikolov et al.), in [0, 1].

    Fraction of the surface voxels of both masks that lie within ``tolerance_mm`` (inclusive)
    of the other mask's surface, distances in mm with ``spacing`` ``(D, H, W)``.
    ``strict``: NaN if both masks are empty, 0 if exactly one is (DeepMind, MONAI).
    ``legacy`` (no published convention; chosen to mirror legacy Dice): prediction non-empty
    and ground truth empty -> 1; empty prediction -> 0.
    """
    policy = _check_policy(policy)
    p, g = _pair(pred, gt)
    sp = normalize_spacing(spacing)
    tol = _check_tolerance(tolerance_mm)
    has_p, has_g = bool(p.any()), bool(g.any())
    if not (has_p and has_g):
        if policy == "strict":
            return 0.0 if (has_p or has_g) else float("nan")
        return 1.0 if has_p else 0.0
    return _nsd_from(*_surface_distances(p, g, sp), tol)


def _tolerances(nsd_tolerance_mm: float | Sequence[float], num_classes: int) -> list[float]:
    if np.isscalar(nsd_tolerance_mm):
        return [_check_tolerance(nsd_tolerance_mm)] * num_classes  # type: ignore[arg-type]
    tols = [_check_tolerance(t) for t in nsd_tolerance_mm]  # type: ignore[union-attr]
    if len(tols) != num_classes:
        raise DataError(
            f"got {len(tols)} NSD tolerances for {num_classes} classes; give one number, or "
            "one per class 1..num_classes"
        )
    return tols


def evaluate_case(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    num_classes: int,
    spacing: Sequence[float],
    nsd_tolerance_mm: float | Sequence[float],
) -> dict:
    """Per-class Dice, HD95 and NSD of one case under both policies.

    Args:
        pred_labels: ``(D, H, W)`` integer label map, values in ``0..num_classes``.
        gt_labels: ``(D, H, W)`` integer label map on the same grid, same value range.
        num_classes: number of foreground classes K (background 0 is not scored); classes
            ``1..K`` are evaluated, as in H-SAM's ``test.py``.
        spacing: voxel spacing in mm, ``(D, H, W)`` order (used by ``strict`` and NSD).
        nsd_tolerance_mm: NSD tolerance in mm, one number or one per class ``1..K``.

    Returns:
        ``{"spacing": [d, h, w], "num_classes": K, "classes": [per-class dict, ...]}`` where
        each per-class dict is ``{"class_index": c, "gt_voxels": int, "pred_voxels": int,
        "nsd_tolerance_mm": float, "legacy": {"dice", "hd95", "nsd"},
        "strict": {"dice", "hd95", "nsd"}}``; values are floats, NaN only under ``strict``.
        Each value equals what :func:`dice`, :func:`hd95` and :func:`nsd` return for
        ``pred_labels == c`` and ``gt_labels == c``.
    """
    pred = np.asarray(pred_labels)
    gt = np.asarray(gt_labels)
    for name, arr in (("pred_labels", pred), ("gt_labels", gt)):
        if arr.ndim != 3:
            raise DataError(f"{name} must be a 3-D (D, H, W) label map, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool:
            raise DataError(f"{name} must hold integer labels, got dtype {arr.dtype}")
    if pred.shape != gt.shape:
        raise DataError(
            f"pred_labels shape {pred.shape} != gt_labels shape {gt.shape}; predict on the "
            "ground-truth grid"
        )
    if int(num_classes) < 1:
        raise DataError(f"num_classes must be >= 1 (foreground classes), got {num_classes}")
    num_classes = int(num_classes)
    for name, arr in (("pred_labels", pred), ("gt_labels", gt)):
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > num_classes):
            raise DataError(
                f"{name} has labels in [{int(arr.min())}, {int(arr.max())}] but num_classes is "
                f"{num_classes}; remap the labels to 0..{num_classes} first"
            )
    sp = normalize_spacing(spacing)
    tols = _tolerances(nsd_tolerance_mm, num_classes)

    classes = []
    for c in range(1, num_classes + 1):
        p = pred == c
        g = gt == c
        n_p, n_g = int(np.count_nonzero(p)), int(np.count_nonzero(g))
        tol = tols[c - 1]
        if n_p and n_g:
            p, g = _crop_to_union(p, g)  # counts and distances unchanged, less work below
            d_pg, d_gp = _surface_distances(p, g, sp)
            overlap = int(np.count_nonzero(p & g))
            strict_dice = 2.0 * overlap / float(n_p + n_g)
            strict = {
                "dice": strict_dice,
                "hd95": _hd95_from(d_pg, d_gp),
                "nsd": _nsd_from(d_pg, d_gp, tol),
            }
            legacy = {
                "dice": float(medpy_binary.dc(p, g)),
                "hd95": _legacy_hd95(p, g),
                "nsd": strict["nsd"],
            }
        else:
            nan = float("nan")
            one_empty = 0.0 if (n_p or n_g) else nan  # both empty: undefined
            strict = {"dice": one_empty, "hd95": nan, "nsd": one_empty}
            legacy_fp = 1.0 if n_p else 0.0
            legacy = {"dice": legacy_fp, "hd95": 0.0, "nsd": legacy_fp}
        classes.append(
            {
                "class_index": c,
                "gt_voxels": n_g,
                "pred_voxels": n_p,
                "nsd_tolerance_mm": tol,
                "legacy": legacy,
                "strict": strict,
            }
        )
        logger.debug("class %d: legacy %s strict %s", c, legacy, strict)
    return {"spacing": list(sp), "num_classes": num_classes, "classes": classes}


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
def _as_matrix(values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise DataError(f"expected a (cases, classes) matrix, got shape {arr.shape}")
    return arr


def per_class_mean(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over cases per class, ignoring NaN.

    Args:
        values: ``(N_cases, K)`` (or ``(N_cases,)`` for one class).

    Returns:
        ``(means (K,), n_defined (K,) int)``; a class with no defined case has mean NaN.
    """
    arr = _as_matrix(values)
    valid = ~np.isnan(arr)
    counts = valid.sum(axis=0)
    sums = np.where(valid, arr, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return means, counts.astype(int)


def mean_over_classes(class_means: np.ndarray) -> float:
    """Mean of per-class means ``(K,)`` over the classes that are defined (NaN if none)."""
    arr = np.asarray(class_means, dtype=np.float64).ravel()
    valid = ~np.isnan(arr)
    return float(arr[valid].mean()) if valid.any() else float("nan")


@dataclass(frozen=True)
class BootstrapCI:
    """Percentile bootstrap confidence intervals over cases.

    ``per_class``: ``(K, 2)`` lower/upper bounds of the per-class mean (NaN ignored within a
    resample). ``class_mean``: ``(2,)`` bounds of the mean over classes of those means, always
    over the same class set (the classes defined in the data).
    """

    per_class: np.ndarray
    class_mean: np.ndarray
    n_resamples: int
    confidence: float
    seed: int


def bootstrap_ci(
    values: np.ndarray,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    chunk: int = 250,
) -> BootstrapCI:
    """Percentile bootstrap CIs of the per-class mean and of the mean over classes.

    Cases (rows) are resampled with replacement ``n_resamples`` times with
    ``numpy.random.default_rng(seed)``; in each resample the per-class mean ignores NaN. The
    class mean averages a fixed class set, the classes with at least one defined case in
    ``values`` (those :func:`mean_over_classes` averages): a resample in which one of them has
    no defined case has no class mean (it is left out), rather than an average over fewer
    classes that would mix different quantities. Bounds are the ``(1-confidence)/2`` and
    ``(1+confidence)/2`` percentiles over resamples (ignoring resamples where the statistic is
    undefined). Deterministic for a given ``values`` row order and seed.

    Args:
        values: ``(N_cases, K)`` matrix (or ``(N_cases,)``), NaN = undefined case.
    """
    arr = _as_matrix(values)
    if not 0 < confidence < 1:
        raise DataError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise DataError(f"n_resamples must be >= 1, got {n_resamples}")
    n, k = arr.shape
    if n == 0:
        nan2 = np.full(2, np.nan)
        return BootstrapCI(np.full((k, 2), np.nan), nan2, n_resamples, confidence, seed)
    rng = np.random.default_rng(seed)
    valid = ~np.isnan(arr)
    filled = np.where(valid, arr, 0.0)
    per_class_stats = np.empty((n_resamples, k))
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(b, n))
        sums = filled[idx].sum(axis=1)
        counts = valid[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class_stats[start : start + b] = np.where(counts > 0, sums / counts, np.nan)
    q = [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        class_set = valid.any(axis=0)
        # NaN (left out below) when a class of the set is undefined in that resample.
        class_mean_stats = per_class_stats[:, class_set].mean(axis=1)
        per_class = np.nanpercentile(per_class_stats, q, axis=0).T
        class_mean = np.nanpercentile(class_mean_stats, q)
    return BootstrapCI(
        np.asarray(per_class, dtype=float).reshape(k, 2),
        np.asarray(class_mean, dtype=float),
        n_resamples,
        confidence,
        seed,
    )
