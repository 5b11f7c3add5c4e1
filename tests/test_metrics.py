"""Tests for hsam.evaluation.metrics: legacy == medpy/TransUNet, strict in mm with NaN, NSD,
aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from medpy.metric import binary as medpy_binary
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist

from hsam.errors import DataError
from hsam.evaluation.metrics import (
    bootstrap_ci,
    dice,
    evaluate_case,
    hd95,
    mean_over_classes,
    nsd,
    per_class_mean,
)

SHAPES = [(12, 20, 16), (7, 31, 9), (20, 10, 25)]
SEEDS = [0, 1, 2, 3]


def blob(rng: np.random.Generator, shape: tuple[int, int, int], frac: float = 0.3) -> np.ndarray:
    """Smooth random blobs covering about ``frac`` of the volume (often touching the border)."""
    field = gaussian_filter(rng.standard_normal(shape), sigma=1.5)
    return field > np.quantile(field, 1 - frac)


def transunet_reference(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """The published convention, spelled out as in TransUNet/SAMed/H-SAM (medpy, no spacing)."""
    pred = pred > 0
    gt = gt > 0
    if pred.sum() > 0 and gt.sum() > 0:
        return medpy_binary.dc(pred, gt), medpy_binary.hd95(pred, gt)
    if pred.sum() > 0 and gt.sum() == 0:
        return 1.0, 0.0
    return 0.0, 0.0


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels by explicit 6-neighbour check (outside the array counts as background)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded.copy()
    for axis in range(3):
        for shift in (1, -1):
            interior &= np.roll(padded, shift, axis=axis)
    return mask & ~interior[1:-1, 1:-1, 1:-1]


def brute_distances(p: np.ndarray, g: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    sp = np.argwhere(brute_surface(p)) * np.asarray(spacing)
    sg = np.argwhere(brute_surface(g)) * np.asarray(spacing)
    dist = cdist(sp, sg)
    return dist.min(axis=1), dist.min(axis=0)


# --------------------------------------------------------------------------------------------
# legacy == medpy with the TransUNet edge-case rules
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_legacy_equals_medpy_on_random_masks(shape, seed):
    rng = np.random.default_rng(seed)
    pred = blob(rng, shape, frac=rng.uniform(0.05, 0.4))
    gt = blob(rng, shape, frac=rng.uniform(0.05, 0.4))
    ref_dc, ref_hd = transunet_reference(pred, gt)
    assert dice(pred, gt, "legacy") == pytest.approx(ref_dc, abs=1e-6)
    assert hd95(pred, gt, None, "legacy") == pytest.approx(ref_hd, abs=1e-6)
    # spacing is ignored by the legacy policy, by design (voxel units)
    assert hd95(pred, gt, (5.0, 0.7, 0.7), "legacy") == pytest.approx(ref_hd, abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_legacy_equals_medpy_small_objects_far_apart(seed):
    """Cropping to the union bounding box must not change medpy's numbers."""
    rng = np.random.default_rng(100 + seed)
    shape = (30, 40, 35)
    pred = np.zeros(shape, bool)
    gt = np.zeros(shape, bool)
    for m in (pred, gt):
        for _ in range(3):
            z, y, x = (int(rng.integers(0, s - 4)) for s in shape)
            dz, dy, dx = (int(v) for v in rng.integers(1, 5, size=3))
            m[z : z + dz, y : y + dy, x : x + dx] = True
    ref_dc, ref_hd = transunet_reference(pred, gt)
    assert dice(pred, gt, "legacy") == pytest.approx(ref_dc, abs=1e-6)
    assert hd95(pred, gt, None, "legacy") == pytest.approx(ref_hd, abs=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_strict_hd95_equals_medpy_with_spacing_and_brute_force(shape, seed):
    rng = np.random.default_rng(10 + seed)
    pred = blob(rng, shape, 0.2)
    gt = blob(rng, shape, 0.25)
    spacing = (2.5, 0.8, 1.1)
    ours = hd95(pred, gt, spacing, "strict")
    assert ours == pytest.approx(medpy_binary.hd95(pred, gt, voxelspacing=spacing), abs=1e-6)
    d_pg, d_gp = brute_distances(pred, gt, spacing)
    assert ours == pytest.approx(np.percentile(np.hstack([d_pg, d_gp]), 95), abs=1e-6)
    assert dice(pred, gt, "strict") == pytest.approx(medpy_binary.dc(pred, gt), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tol", [0.0, 1.0, 2.5, 4.0])
def test_nsd_equals_brute_force(seed, tol):
    rng = np.random.default_rng(20 + seed)
    shape = (9, 14, 12)
    pred = blob(rng, shape, 0.3)
    gt = blob(rng, shape, 0.3)
    spacing = (2.0, 0.9, 1.3)
    d_pg, d_gp = brute_distances(pred, gt, spacing)
    expected = (np.sum(d_pg <= tol + 1e-9) + np.sum(d_gp <= tol + 1e-9)) / (d_pg.size + d_gp.size)
    for policy in ("legacy", "strict"):
        assert nsd(pred, gt, spacing, tol, policy) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------------------------
# edge cases, both policies
# --------------------------------------------------------------------------------------------
NAN = float("nan")
METRIC_NAMES = ("dice", "hd95", "nsd")
EDGE = {
    # name: (pred non-empty, gt non-empty)
    "both_empty": (False, False),
    "pred_empty": (False, True),
    "gt_empty": (True, False),
}
EXPECTED = {
    ("legacy", "both_empty"): (0.0, 0.0, 0.0),
    ("legacy", "pred_empty"): (0.0, 0.0, 0.0),
    ("legacy", "gt_empty"): (1.0, 0.0, 1.0),
    ("strict", "both_empty"): (NAN, NAN, NAN),
    # NSD 0 when exactly one mask is empty, as DeepMind's surface-distance and MONAI.
    ("strict", "pred_empty"): (0.0, NAN, 0.0),
    ("strict", "gt_empty"): (0.0, NAN, 0.0),
}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("case", list(EDGE))
@pytest.mark.parametrize("policy", ["legacy", "strict"])
def test_edge_cases_pinned(policy, case):
    has_p, has_g = EDGE[case]
    pred = np.zeros((5, 6, 7), bool)
    gt = np.zeros((5, 6, 7), bool)
    if has_p:
        pred[1:3, 1:3, 1:3] = True
    if has_g:
        gt[2:4, 2:5, 2:5] = True
    exp_dice, exp_hd, exp_nsd = EXPECTED[(policy, case)]
    got = (
        dice(pred, gt, policy),
        hd95(pred, gt, (2.0, 1.0, 1.0), policy),
        nsd(pred, gt, (2.0, 1.0, 1.0), 1.0, policy),
    )
    assert all(same(g, e) for g, e in zip(got, (exp_dice, exp_hd, exp_nsd), strict=True)), got
    if policy == "legacy":
        ref = transunet_reference(pred, gt)
        assert (got[0], got[1]) == ref
    # evaluate_case gives the same values
    res = evaluate_case(pred.astype(np.uint8), gt.astype(np.uint8), 1, (2.0, 1.0, 1.0), 1.0)
    vals = res["classes"][0][policy]
    expected = EXPECTED[(policy, case)]
    assert all(same(vals[m], e) for m, e in zip(METRIC_NAMES, expected, strict=True))


# --------------------------------------------------------------------------------------------
# strict units
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4])
def test_strict_hd95_plane_shift_along_z_scales_with_spacing(k):
    pred = np.zeros((12, 8, 8), bool)
    gt = np.zeros((12, 8, 8), bool)
    gt[3] = True
    pred[3 + k] = True
    assert hd95(pred, gt, (3.0, 1.0, 1.0), "strict") == pytest.approx(3.0 * k)
    assert hd95(pred, gt, (3.0, 1.0, 1.0), "legacy") == pytest.approx(float(k))
    assert hd95(pred, gt, (1.0, 1.0, 1.0), "strict") == pytest.approx(float(k))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_strict_hd95_cube_shift_along_z(k):
    shape = (20, 14, 14)
    gt = np.zeros(shape, bool)
    gt[4:10, 4:10, 4:10] = True
    pred = np.roll(gt, k, axis=0)
    legacy = hd95(pred, gt, None, "legacy")
    strict = hd95(pred, gt, (3.0, 1.0, 1.0), "strict")
    assert legacy == pytest.approx(float(k))
    assert strict == pytest.approx(3.0 * k)
    assert strict == pytest.approx(medpy_binary.hd95(pred, gt, voxelspacing=(3.0, 1.0, 1.0)))


def test_nsd_hand_computed_toys():
    spacing = (1.0, 1.0, 1.0)
    cube = np.zeros((10, 10, 10), bool)
    cube[2:6, 2:6, 2:6] = True
    assert nsd(cube, cube, spacing, 0.0, "strict") == 1.0
    # disjoint and far apart -> 0
    far = np.zeros((10, 10, 30), bool)
    far[2:4, 2:4, 25:28] = True
    near = np.zeros((10, 10, 30), bool)
    near[2:4, 2:4, 1:4] = True
    assert nsd(far, near, spacing, 3.0, "strict") == 0.0
    # shift by one voxel, tolerance 1 mm -> every surface voxel within tolerance
    shifted = np.roll(cube, 1, axis=2)
    assert nsd(shifted, cube, spacing, 1.0, "strict") == 1.0
    assert nsd(shifted, cube, spacing, 0.5, "strict") < 1.0
    # hand count: gt = {2}, pred = {2, 7} on a line: S_P = {2, 7}, S_G = {2};
    # pred voxels within 1 of S_G: {2} (7 is 5 away); gt voxel 2 within 1 of S_P: yes.
    gt = np.zeros((1, 1, 10), bool)
    pred = np.zeros((1, 1, 10), bool)
    gt[0, 0, 2] = True
    pred[0, 0, [2, 7]] = True
    assert nsd(pred, gt, spacing, 1.0, "strict") == pytest.approx(2 / 3)
    assert nsd(pred, gt, spacing, 5.0, "strict") == pytest.approx(1.0)


def test_nsd_anisotropic_tolerance_in_mm():
    gt = np.zeros((10, 1, 1), bool)
    pred = np.zeros((10, 1, 1), bool)
    gt[2] = True
    pred[3] = True  # one slice away = 3 mm at spacing (3, 1, 1)
    assert nsd(pred, gt, (3.0, 1.0, 1.0), 2.0, "strict") == 0.0
    assert nsd(pred, gt, (3.0, 1.0, 1.0), 3.0, "strict") == 1.0
    assert nsd(pred, gt, (1.0, 1.0, 1.0), 2.0, "strict") == 1.0


# --------------------------------------------------------------------------------------------
# evaluate_case
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_case_equals_individual_functions(seed):
    rng = np.random.default_rng(seed)
    shape = (10, 18, 14)
    gt = np.zeros(shape, np.int64)
    pred = np.zeros(shape, np.int64)
    for c in (1, 2):
        gt[blob(rng, shape, 0.15)] = c
        pred[blob(rng, shape, 0.15)] = c
    pred[0, 0, 0] = 3  # class 3: FP-only (absent from gt)
    spacing = (2.0, 0.75, 0.75)
    tols = [1.0, 2.0, 1.5, 2.0]  # class 4 absent from both
    res = evaluate_case(pred, gt, 4, spacing, tols)
    assert res["num_classes"] == 4 and res["spacing"] == list(spacing)
    for entry in res["classes"]:
        c = entry["class_index"]
        p, g = pred == c, gt == c
        assert entry["gt_voxels"] == int(g.sum()) and entry["pred_voxels"] == int(p.sum())
        assert entry["nsd_tolerance_mm"] == tols[c - 1]
        for policy in ("legacy", "strict"):
            got = entry[policy]
            assert same(got["dice"], dice(p, g, policy))
            assert same(got["hd95"], hd95(p, g, spacing, policy))
            assert same(got["nsd"], nsd(p, g, spacing, tols[c - 1], policy))
        ref = transunet_reference(p, g)
        assert entry["legacy"]["dice"] == pytest.approx(ref[0], abs=1e-6)
        assert entry["legacy"]["hd95"] == pytest.approx(ref[1], abs=1e-6)
    assert res["classes"][2]["legacy"]["dice"] == 1.0  # FP-only scores 1 under legacy
    assert res["classes"][2]["strict"]["dice"] == 0.0
    assert math.isnan(res["classes"][3]["strict"]["dice"])


def test_evaluate_case_rejects_bad_input():
    a = np.zeros((4, 5, 6), np.uint8)
    with pytest.raises(DataError, match="remap"):
        evaluate_case(a + 9, a, 8, (1, 1, 1), 1.0)
    with pytest.raises(DataError, match="shape"):
        evaluate_case(a, np.zeros((4, 5, 7), np.uint8), 1, (1, 1, 1), 1.0)
    with pytest.raises(DataError, match="3-D"):
        evaluate_case(a[0], a[0], 1, (1, 1, 1), 1.0)
    with pytest.raises(DataError, match="integer"):
        evaluate_case(a.astype(float), a, 1, (1, 1, 1), 1.0)
    with pytest.raises(DataError, match="tolerances"):
        evaluate_case(a, a, 2, (1, 1, 1), [1.0])
    with pytest.raises(DataError, match="spacing"):
        evaluate_case(a, a, 1, (1, 0, 1), 1.0)


def test_input_validation():
    m = np.zeros((3, 4, 5), bool)
    with pytest.raises(DataError, match="3-D"):
        dice(m[0], m[0], "legacy")
    with pytest.raises(DataError, match="shape"):
        dice(m, np.zeros((3, 4, 6), bool), "strict")
    with pytest.raises(DataError, match="policy"):
        dice(m, m, "monai")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="spacing"):
        hd95(m, m, None, "strict")
    with pytest.raises(DataError, match="tolerance"):
        nsd(m, m, (1, 1, 1), -1.0, "strict")
    # integer masks: any non-zero voxel is foreground
    a = np.zeros((3, 4, 5), np.int32)
    a[1, 1, 1] = 7
    assert dice(a, a > 0, "strict") == 1.0


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
def test_per_class_mean_ignores_nan_and_counts():
    v = np.array([[1.0, np.nan, np.nan], [3.0, 4.0, np.nan], [5.0, 8.0, np.nan]])
    means, counts = per_class_mean(v)
    assert means[0] == 3.0 and means[1] == 6.0 and math.isnan(means[2])
    assert counts.tolist() == [3, 2, 0]
    assert mean_over_classes(means) == 4.5
    assert math.isnan(mean_over_classes(np.array([np.nan, np.nan])))


def test_bootstrap_matches_naive_loop_and_is_seeded():
    rng = np.random.default_rng(0)
    v = rng.uniform(0, 1, size=(12, 3))
    v[[1, 5], 2] = np.nan
    n_res = 300
    ci = bootstrap_ci(v, n_resamples=n_res, seed=7, chunk=n_res)
    idx = np.random.default_rng(7).integers(0, 12, size=(n_res, 12))
    stats = np.array([[np.nanmean(v[i, k]) for k in range(3)] for i in idx])
    class_stats = stats.mean(axis=1)
    np.testing.assert_allclose(ci.per_class, np.percentile(stats, [2.5, 97.5], axis=0).T)
    np.testing.assert_allclose(ci.class_mean, np.percentile(class_stats, [2.5, 97.5]))
    again = bootstrap_ci(v, n_resamples=n_res, seed=7, chunk=n_res)
    np.testing.assert_array_equal(again.per_class, ci.per_class)
    other = bootstrap_ci(v, n_resamples=n_res, seed=8, chunk=n_res)
    assert not np.array_equal(other.per_class, ci.per_class)
    means, _ = per_class_mean(v)
    assert np.all(ci.per_class[:, 0] <= means) and np.all(means <= ci.per_class[:, 1])


def test_bootstrap_class_mean_uses_one_class_set_in_every_resample():
    """Class 2 is defined in one case only: a resample without that case must not report the
    mean over class 1 alone (0.9) as the class mean (0.5 = mean of 0.9 and 0.1)."""
    v = np.column_stack([np.full(8, 0.9), [0.1] + [np.nan] * 7])
    ci = bootstrap_ci(v, n_resamples=400, seed=3)
    means, _ = per_class_mean(v)
    assert mean_over_classes(means) == pytest.approx(0.5)
    np.testing.assert_allclose(ci.class_mean, [0.5, 0.5])


def test_bootstrap_degenerate_inputs():
    const = np.full((5, 2), 0.8)
    ci = bootstrap_ci(const, n_resamples=100)
    np.testing.assert_allclose(ci.per_class, 0.8)
    one = bootstrap_ci(np.array([[0.3, np.nan]]), n_resamples=50)
    assert one.per_class[0].tolist() == [0.3, 0.3]
    assert np.isnan(one.per_class[1]).all()
    assert one.class_mean.tolist() == [0.3, 0.3]
    empty = bootstrap_ci(np.zeros((0, 2)), n_resamples=10)
    assert np.isnan(empty.per_class).all()
    with pytest.raises(DataError):
        bootstrap_ci(const, confidence=1.5)
