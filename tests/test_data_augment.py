"""Augmenter: labels never gain values, reproducibility per seed, image/label alignment,
documented probabilities; the optional flip/rot90 and intensity extras (default off)."""

from __future__ import annotations

import numpy as np
import pytest

from hsam.config import AugmentConfig, TrainConfig, load_run_config
from hsam.data import Augmenter, Case, SliceDataset, resize_image, resize_label
from hsam.engine.data import _augmenter
from hsam.errors import ConfigError


def _multiclass(h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    """Label with sparse class ids (interpolating between 0 and 9 would invent 1..8)."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((h, w), np.uint8)
    for c in (2, 5, 9, 13):
        y, x = rng.integers(4, h - 12), rng.integers(4, w - 12)
        lab[y : y + 10, x : x + 9] = c
    return lab


def _square(h: int = 64, w: int = 64) -> tuple[np.ndarray, np.ndarray]:
    lab = np.zeros((h, w), np.uint8)
    lab[12:30, 34:52] = 1  # off-centre, so rotation and zoom move it
    return lab.astype(np.float32), lab


@pytest.mark.parametrize("order", [1, 3])
def test_label_never_gains_values(order: int) -> None:
    aug = Augmenter(0, p_rotate=0.8, p_scale=0.8, p_elastic=0.8, image_order=order)
    lab = _multiclass()
    values = set(np.unique(lab).tolist())
    image = lab.astype(np.float32) * 0.1
    seen_ops = set()
    for _ in range(150):
        out_img, out_lab = aug(image, lab)
        assert out_lab.dtype == lab.dtype and out_lab.shape == lab.shape
        assert out_img.dtype == np.float32 and out_img.shape == image.shape
        assert set(np.unique(out_lab).tolist()) <= values
        seen_ops.update(aug.last_applied)
    assert seen_ops == {"rotate", "scale", "elastic"}


def test_label_without_background_gains_only_fill_zero() -> None:
    aug = Augmenter(1, p_rotate=1, p_scale=1, p_elastic=0, scale_range=(0.85, 0.9))
    lab = np.full((32, 32), 3, np.uint8)
    lab[:, 16:] = 5
    _, out = aug(np.zeros((32, 32), np.float32), lab)
    assert set(np.unique(out).tolist()) <= {0, 3, 5}  # 0 only where the slice was padded
    assert (out == 0).any()


def test_reproducible_for_a_seed_and_differs_across_seeds() -> None:
    image, lab = _square()
    kw = dict(p_rotate=1.0, p_scale=1.0, p_elastic=1.0)
    a, b, c = Augmenter(7, **kw), Augmenter(7, **kw), Augmenter(8, **kw)
    for _ in range(3):
        ia, la = a(image, lab)
        ib, lb = b(image, lab)
        ic, lc = c(image, lab)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
        assert not np.array_equal(ia, ic)
    # an explicit per-sample generator gives the same result regardless of history
    x1 = a(image, lab, rng=np.random.default_rng(123))
    x2 = c(image, lab, rng=np.random.default_rng(123))
    np.testing.assert_array_equal(x1[0], x2[0])
    # a Generator can be passed instead of a seed
    g1 = Augmenter(np.random.default_rng(5), **kw)(image, lab)
    g2 = Augmenter(5, **kw)(image, lab)
    np.testing.assert_array_equal(g1[1], g2[1])


@pytest.mark.parametrize(
    "kw",
    [
        dict(p_rotate=1.0, p_scale=0.0, p_elastic=0.0),
        dict(p_rotate=0.0, p_scale=1.0, p_elastic=0.0),
        dict(p_rotate=0.0, p_scale=0.0, p_elastic=1.0, elastic_magnitude=0.03),
        dict(p_rotate=1.0, p_scale=1.0, p_elastic=1.0),
    ],
)
def test_image_and_label_stay_aligned(kw: dict) -> None:
    image, lab = _square()
    aug = Augmenter(3, **kw)
    moved = 0
    for _ in range(10):
        out_img, out_lab = aug(image, lab)
        img_mask = out_img > 0.5
        inter = np.logical_and(img_mask, out_lab == 1).sum()
        union = np.logical_or(img_mask, out_lab == 1).sum()
        assert union > 0 and inter / union > 0.9
        moved += int(not np.array_equal(out_lab, lab))
    assert moved >= 8  # the transforms actually changed the geometry


def test_rotation_moves_the_square_about_the_centre() -> None:
    image, lab = _square()
    aug = Augmenter(0, p_rotate=1.0, p_scale=0.0, p_elastic=0.0, max_angle=20.0)
    centre = np.array([31.5, 31.5])
    before = np.argwhere(lab == 1).mean(0) - centre
    for _ in range(5):
        _, out = aug(image, lab)
        after = np.argwhere(out == 1).mean(0) - centre
        # distance to the centre preserved, angle changed by at most 20 degrees
        assert abs(np.linalg.norm(after) - np.linalg.norm(before)) < 1.0
        cos = after @ before / (np.linalg.norm(after) * np.linalg.norm(before))
        assert cos >= np.cos(np.radians(20.5))


def test_scaling_changes_area_within_range() -> None:
    image, lab = _square()
    aug = Augmenter(0, p_rotate=0.0, p_scale=1.0, p_elastic=0.0, scale_range=(0.85, 1.25))
    areas = []
    for _ in range(20):
        _, out = aug(image, lab)
        areas.append((out == 1).sum() / (lab == 1).sum())
    assert min(areas) >= 0.85**2 - 0.08 and max(areas) <= 1.25**2 + 0.08
    assert max(areas) - min(areas) > 0.3


def test_probabilities_and_modes() -> None:
    img = np.zeros((8, 8), np.float32)
    aug = Augmenter(11, p_rotate=0.3, p_scale=0.6, p_elastic=0.0)
    counts = {"rotate": 0, "scale": 0, "elastic": 0}
    n = 1000
    for _ in range(n):
        aug(img)
        for op in aug.last_applied:
            counts[op] += 1
    assert abs(counts["rotate"] / n - 0.3) < 0.05
    assert abs(counts["scale"] / n - 0.6) < 0.05
    assert counts["elastic"] == 0
    one = Augmenter(11, p_rotate=0.45, p_scale=0.4125, p_elastic=0.1169, mode="one_of")
    none = 0
    for _ in range(n):
        one(img)
        assert len(one.last_applied) <= 1
        none += not one.last_applied
    assert abs(none / n - (1 - 0.45 - 0.4125 - 0.1169)) < 0.02
    ident = Augmenter(0, p_rotate=0, p_scale=0, p_elastic=0)
    image, lab = _square()
    out_img, out_lab = ident(image, lab)
    np.testing.assert_array_equal(out_img, image)
    np.testing.assert_array_equal(out_lab, lab)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="p_rotate"):
        Augmenter(0, p_rotate=1.5)
    with pytest.raises(ConfigError, match="one_of"):
        Augmenter(0, p_rotate=0.6, p_scale=0.6, mode="one_of")
    with pytest.raises(ConfigError, match="scale_range"):
        Augmenter(0, scale_range=(1.2, 0.8))


def _ramp(h: int = 48, w: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A [0, 1] image with distinct values everywhere and a label derived from it."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = ((yy * w + xx) / (h * w - 1)).astype(np.float32)
    image[:, : w // 3] *= 0.5  # not a pure function of position along one axis
    return image, (image * 7).astype(np.uint8)


_GEOMETRIC = dict(p_rotate=0.7, p_scale=0.7, p_elastic=0.5)
_EXTRAS_OFF = dict(
    p_flip_rot90=0.0, p_bias_field=0.0, p_contrast=0.0, p_gamma=0.0, p_histogram_shift=0.0
)


def test_extras_default_off_and_do_not_change_geometric_draws() -> None:
    image, lab = _ramp()
    default = Augmenter(21, **_GEOMETRIC)
    assert (default.p_flip_rot90, default.p_rot90) == (0.0, 0.0)
    assert (default.p_contrast, default.p_gamma) == (0.0, 0.0)
    explicit = Augmenter(21, **_GEOMETRIC, **_EXTRAS_OFF)
    # intensity-only extras draw after the geometric ones: for the same per-sample generator
    # (as SliceDataset passes) the geometry is unchanged
    intensity = Augmenter(
        21, **_GEOMETRIC, p_bias_field=1.0, p_contrast=1.0, p_gamma=1.0, p_histogram_shift=1.0
    )
    for i in range(20):
        i0, l0 = default(image, lab, rng=np.random.default_rng([21, i]))
        ops = default.last_applied
        i1, l1 = explicit(image, lab, rng=np.random.default_rng([21, i]))
        i2, l2 = intensity(image, lab, rng=np.random.default_rng([21, i]))
        np.testing.assert_array_equal(i0, i1)
        np.testing.assert_array_equal(l0, l1)
        np.testing.assert_array_equal(l0, l2)
        assert set(ops) <= {"rotate", "scale", "elastic"}
        assert intensity.last_applied == ops + (
            "bias_field",
            "contrast",
            "gamma",
            "histogram_shift",
        )
    # the paper config (no geometric op drawn either) is an exact copy
    ident = Augmenter(0, p_rotate=0, p_scale=0, p_elastic=0)
    out_img, out_lab = ident(image, lab)
    np.testing.assert_array_equal(out_img, image)
    np.testing.assert_array_equal(out_lab, lab)


@pytest.mark.parametrize(
    "kw, op",
    [
        (dict(p_gamma=1.0, gamma_range=(0.5, 2.0)), "gamma"),
        (dict(p_histogram_shift=1.0), "histogram_shift"),
        (dict(p_bias_field=1.0, bias_field_coefficient=0.5), "bias_field"),
        (
            dict(p_contrast=1.0, contrast_range=(0.65, 1.5), brightness_range=(-0.15, 0.15)),
            "contrast",
        ),
    ],
)
def test_intensity_ops_change_image_keep_range_and_label(kw: dict, op: str) -> None:
    image, lab = _ramp()
    aug = Augmenter(5, p_rotate=0, p_scale=0, p_elastic=0, **kw)
    changed = 0
    for _ in range(20):
        out_img, out_lab = aug(image, lab)
        assert aug.last_applied == (op,)
        assert out_img.dtype == np.float32 and out_img.shape == image.shape
        assert out_img.min() >= 0.0 and out_img.max() <= 1.0
        np.testing.assert_array_equal(out_lab, lab)
        changed += int(np.abs(out_img - image).max() > 1e-3)
    assert changed >= 18
    # reproducible for a per-sample generator
    a = aug(image, lab, rng=np.random.default_rng(9))[0]
    b = Augmenter(77, p_rotate=0, p_scale=0, p_elastic=0, **kw)(
        image, lab, rng=np.random.default_rng(9)
    )[0]
    np.testing.assert_array_equal(a, b)


def _monomials(shape: tuple[int, int], order: int) -> np.ndarray:
    y, x = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    terms = [y**i * x**j for i in range(order + 1) for j in range(order + 1 - i)]
    return np.stack([t.ravel() for t in terms], axis=1)


def test_bias_field_is_a_smooth_multiplicative_polynomial_field() -> None:
    shape = (24, 20)
    image = np.full(shape, 0.2, np.float32)  # no clipping: |log field| <= 6 * 0.1
    aug = Augmenter(
        3,
        p_rotate=0,
        p_scale=0,
        p_elastic=0,
        p_bias_field=1.0,
        bias_field_coefficient=0.1,
        bias_field_order=2,
    )
    for _ in range(10):
        out, _ = aug(image)
        assert aug.last_applied == ("bias_field",)
        log_field = np.log(out.astype(np.float64) / 0.2).ravel()
        assert np.abs(log_field).max() <= 6 * 0.1 + 1e-5
        # exactly a degree-2 polynomial in the slice coordinates, and not a degree-1 one
        for order, fits in ((2, True), (1, False)):
            basis = _monomials(shape, order)
            coef = np.linalg.lstsq(basis, log_field, rcond=None)[0]
            residual = np.abs(basis @ coef - log_field).max()
            assert (residual < 1e-5) == fits, (order, residual)


def test_bias_field_can_make_a_dimmer_region_the_brighter_one() -> None:
    # Global monotone ops (contrast, gamma) keep the brighter patch brighter; a bias field
    # does not, which is what a scan whose blood pool is not its brightest structure needs.
    image = np.full((32, 32), 0.1, np.float32)
    image[4:12, 4:12] = 0.6
    image[20:28, 20:28] = 0.5
    swaps = {}
    for name, kw in (
        ("bias_field", dict(p_bias_field=1.0)),
        ("global", dict(p_contrast=1.0, p_gamma=1.0)),
    ):
        aug = Augmenter(8, p_rotate=0, p_scale=0, p_elastic=0, **kw)
        outs = [aug(image)[0] for _ in range(200)]
        swaps[name] = sum(o[20:28, 20:28].mean() > o[4:12, 4:12].mean() for o in outs)
    assert swaps["global"] == 0
    assert 20 <= swaps["bias_field"] <= 180


def test_histogram_shift_is_a_monotone_curve_that_can_darken_the_middle_under_a_bright_top():
    x = np.linspace(0.0, 1.0, 101, dtype=np.float32)[None, :]
    aug = Augmenter(
        4, p_rotate=0, p_scale=0, p_elastic=0, p_histogram_shift=1.0, histogram_shift_max=0.3
    )
    middles = []
    for _ in range(300):
        out = aug(x)[0][0]
        assert aug.last_applied == ("histogram_shift",)
        assert np.all(np.diff(out) >= 0)  # the order of intensities is kept
        assert (out[0], out[-1]) == (0.0, 1.0)
        assert np.abs(out - x[0]).max() <= 0.3 + 1e-6  # knots move at most the maximum
        middles.append(float(out[75]))
    # an LA blood pool at 0.75 can end up under 0.5 while the brightest voxels stay at 1
    assert min(middles) < 0.5 and max(middles) > 0.95
    assert 0.3 < np.mean(np.array(middles) < 0.75) < 0.7  # darker about as often as brighter
    with pytest.raises(ConfigError, match="histogram_shift_points"):
        Augmenter(0, histogram_shift_points=0)
    with pytest.raises(ConfigError, match="histogram_shift_max"):
        Augmenter(0, histogram_shift_max=1.5)


def test_gamma_is_a_monotone_power_in_range() -> None:
    image, lab = _ramp()
    image[0, 0] = -0.01  # cubic overshoot below 0 must not give NaN
    aug = Augmenter(3, p_rotate=0, p_scale=0, p_elastic=0, p_gamma=1.0, gamma_range=(0.5, 2.0))
    gammas = []
    inner = (image > 0.05) & (image < 0.95)
    for _ in range(200):
        out, _ = aug(image, lab)
        assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
        g = np.log(out[inner]) / np.log(image[inner])
        assert np.ptp(g) < 1e-3  # one exponent for the whole slice
        gammas.append(float(g.mean()))
    assert 0.5 - 1e-3 <= min(gammas) < 0.6 and 1.8 < max(gammas) <= 2.0 + 1e-3
    # log-uniform: about half the draws brighten (g < 1), half darken
    assert 0.4 < np.mean(np.array(gammas) < 1.0) < 0.6
    fixed = Augmenter(0, p_rotate=0, p_scale=0, p_elastic=0, p_gamma=1.0, gamma_range=(2, 2))
    np.testing.assert_allclose(fixed(image, lab)[0][inner], image[inner] ** 2, rtol=1e-5)


def test_contrast_brightness_formula() -> None:
    image, lab = _ramp()
    aug = Augmenter(
        0,
        p_rotate=0,
        p_scale=0,
        p_elastic=0,
        p_contrast=1.0,
        contrast_range=(0.5, 0.5),
        brightness_range=(0.1, 0.1),
    )
    out, _ = aug(image, lab)
    m = image.mean()
    np.testing.assert_allclose(out, np.clip(0.5 * (image - m) + m + 0.1, 0, 1), atol=1e-6)
    assert out.std() < image.std()


def test_intensity_ops_follow_geometric_ones() -> None:
    image, lab = _ramp()
    kw = dict(p_rotate=1.0, p_scale=0.0, p_elastic=0.0, max_angle=30.0)
    geo = Augmenter(4, **kw)
    both = Augmenter(4, **kw, p_gamma=1.0, gamma_range=(2.0, 2.0))
    g_img, g_lab = geo(image, lab)
    b_img, b_lab = both(image, lab)
    assert both.last_applied == ("rotate", "gamma")
    np.testing.assert_array_equal(g_lab, b_lab)
    # gamma of the rotated image (whose padding is the slice min, 0) stays in [0, 1]
    np.testing.assert_allclose(b_img, np.clip(g_img, 0, 1) ** 2, rtol=1e-5, atol=1e-7)


def _exact_outputs(aug: Augmenter, image: np.ndarray, lab: np.ndarray, op: str, n: int = 60):
    """`n` images from `aug` applying only the exact (no resampling) extra `op`, each checked
    to have moved its label with it."""
    for _ in range(n):
        out_img, out_lab = aug(image, lab)
        assert aug.last_applied == (op,)
        assert out_lab.dtype == lab.dtype and out_img.dtype == np.float32
        assert out_img.shape in (image.shape, image.shape[::-1]) and out_lab.shape == out_img.shape
        # the label is still the same function of the image: moved together, no resampling
        np.testing.assert_array_equal(out_lab, (out_img * 7).astype(np.uint8))
        np.testing.assert_array_equal(np.sort(out_img, None), np.sort(image, None))
        yield out_img


@pytest.mark.parametrize("shape", [(48, 40), (32, 32)])
def test_flip_rot90_moves_image_and_label_together(shape: tuple[int, int]) -> None:
    image, lab = _ramp(*shape)
    aug = Augmenter(1, p_rotate=0, p_scale=0, p_elastic=0, p_flip_rot90=1.0)
    seen = set()
    for out_img in _exact_outputs(aug, image, lab, "flip_rot90"):
        seen.add(out_img.tobytes())
        # SSL4MIS always flips after the rot90, so the result is one of the 4 mirror images
        assert not any(np.array_equal(out_img, np.rot90(image, k)) for k in range(4))
    assert len(seen) == 4
    with_geo = Augmenter(1, p_rotate=1.0, p_scale=0, p_elastic=0, p_flip_rot90=1.0)
    with_geo(image, lab)
    assert with_geo.last_applied == ("rotate", "flip_rot90")


@pytest.mark.parametrize("shape", [(48, 40), (32, 32)])
def test_rot90_turns_image_and_label_together_and_never_mirrors(shape: tuple[int, int]) -> None:
    image, lab = _ramp(*shape)
    aug = Augmenter(1, p_rotate=0, p_scale=0, p_elastic=0, p_rot90=1.0)
    ks = set()
    for out_img in _exact_outputs(aug, image, lab, "rot90"):
        # always a real rotation of the slice (k in 1..3), never a mirror image: handedness
        # (which side the right ventricle is on, looking along the rotation) is kept
        k = [k for k in range(4) if np.array_equal(out_img, np.rot90(image, k))]
        assert len(k) == 1 and k[0] != 0
        ks.add(k[0])
    assert ks == {1, 2, 3}
    off = Augmenter(1, p_rotate=0, p_scale=0, p_elastic=0, p_rot90=0.0)
    np.testing.assert_array_equal(off(image, lab)[0], image)


def test_flip_rot90_of_non_square_slices_is_resized_by_the_dataset() -> None:
    image, _ = _ramp(20, 30)
    lab = (image > 0.6).astype(np.uint8)
    case = Case("c", np.stack([image] * 3), np.stack([lab] * 3), label_names={0: "bg", 1: "x"})
    aug = Augmenter(0, p_rotate=0, p_scale=0, p_elastic=0, p_flip_rot90=1.0)
    ds = SliceDataset([case], 24, augment=aug, seed=3, image_order=1)
    shapes = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert item["image"].shape == (1, 24, 24) and item["label"].shape == (24, 24)
            # the dataset resized exactly what the augmenter returned for this sample
            out_img, out_lab = aug(image, lab, rng=np.random.default_rng([3, epoch, i]))
            shapes.append(out_img.shape)
            np.testing.assert_array_equal(item["label"].numpy(), resize_label(out_lab, 24))
            np.testing.assert_array_equal(item["image"][0].numpy(), resize_image(out_img, 24, 1))
    assert {(20, 30), (30, 20)} <= set(shapes)  # odd k swapped height and width


def test_extras_probabilities() -> None:
    img = np.full((8, 8), 0.5, np.float32)
    aug = Augmenter(
        2,
        p_rotate=0,
        p_scale=0,
        p_elastic=0,
        p_flip_rot90=0.5,
        p_rot90=0.3,
        p_bias_field=0.4,
        p_contrast=0.3,
        p_gamma=0.8,
    )
    counts = {"flip_rot90": 0, "rot90": 0, "bias_field": 0, "contrast": 0, "gamma": 0}
    n = 1000
    for _ in range(n):
        aug(img)
        for op in aug.last_applied:
            counts[op] += 1
    assert abs(counts["flip_rot90"] / n - 0.5) < 0.05
    assert abs(counts["rot90"] / n - 0.3) < 0.05
    assert abs(counts["bias_field"] / n - 0.4) < 0.05
    assert abs(counts["contrast"] / n - 0.3) < 0.05
    assert abs(counts["gamma"] / n - 0.8) < 0.05


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(p_gamma=1.2), "p_gamma"),
        (dict(p_contrast=-0.1), "p_contrast"),
        (dict(p_flip_rot90=2.0), "p_flip_rot90"),
        (dict(p_rot90=1.5), "p_rot90"),
        (dict(p_rot90=-0.2), "p_rot90"),
        (dict(p_bias_field=1.5), "p_bias_field"),
        (dict(bias_field_coefficient=-0.1), "bias_field_coefficient"),
        (dict(bias_field_order=0), "bias_field_order"),
        (dict(bias_field_order=1.5), "bias_field_order"),
        (dict(gamma_range=(0.0, 2.0)), "gamma_range"),
        (dict(gamma_range=(2.0, 0.5)), "gamma_range.*low <= high"),
        (dict(gamma_range=(0.5, 1.0, 2.0)), "gamma_range.*two numbers"),
        (dict(contrast_range=(-0.5, 1.5)), "contrast_range"),
        (dict(brightness_range=(0.2, -0.2)), "brightness_range"),
        (dict(brightness_range=(-1.5, 0.2)), "brightness_range.*\\[-1, 1\\]"),
    ],
)
def test_extras_config_errors(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Augmenter(0, **kw)
    cfg_kw = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
    with pytest.raises(ConfigError, match="train.augment." + match):
        AugmentConfig(**cfg_kw)


def test_run_config_validates_and_wires_the_extras() -> None:
    with pytest.raises(ConfigError, match="train.augment.p_gamma"):
        load_run_config(None, ["train.augment.p_gamma=1.5"])
    with pytest.raises(ConfigError, match="train.augment.gamma_range"):
        load_run_config(None, ["train.augment.gamma_range=[2.0, 0.5]"])
    with pytest.raises(ConfigError, match="train.augment.scale_range"):
        load_run_config(None, ["train.augment.scale_range=[0, 1.2]"])
    defaults = _augmenter(TrainConfig())
    assert defaults is not None
    assert (defaults.p_flip_rot90, defaults.p_rot90) == (0.0, 0.0)
    assert (defaults.p_contrast, defaults.p_gamma) == (0.0, 0.0)
    cfg = load_run_config(
        None,
        [
            "train.augment.p_gamma=0.3",
            "train.augment.gamma_range=[0.4, 3]",
            "train.augment.p_contrast=0.2",
            "train.augment.contrast_range=[0.5, 1.2]",
            "train.augment.brightness_range=[-0.3, 0.1]",
            "train.augment.p_flip_rot90=0.5",
            "train.augment.p_rot90=0.25",
            "train.augment.p_bias_field=0.4",
            "train.augment.bias_field_coefficient=0.3",
            "train.augment.bias_field_order=2",
            "train.augment.p_histogram_shift=0.6",
            "train.augment.histogram_shift_points=5",
            "train.augment.histogram_shift_max=0.2",
            "model.num_classes=1",
        ],
    )
    aug = _augmenter(cfg.train)
    assert aug is not None
    assert aug.p_gamma == 0.3 and aug.gamma_range == (0.4, 3.0)
    assert aug.p_contrast == 0.2 and aug.contrast_range == (0.5, 1.2)
    assert aug.brightness_range == (-0.3, 0.1) and aug.p_flip_rot90 == 0.5
    assert aug.p_rot90 == 0.25
    assert (aug.p_bias_field, aug.bias_field_coefficient, aug.bias_field_order) == (0.4, 0.3, 2)
    assert (aug.p_histogram_shift, aug.histogram_shift_points, aug.histogram_shift_max) == (
        0.6,
        5,
        0.2,
    )
