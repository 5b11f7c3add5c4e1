"""Training augmentation of 2-D slices: geometric (rotation, scaling, elastic deformation,
optionally rot90, or rot90 and flip) and optional intensity (bias field, contrast/brightness,
gamma, histogram shift).

The rotation, scaling and elastic transforms are composed into ONE backward coordinate map
(output pixel -> input position), so each sample is resampled once. The image is interpolated
(linear or cubic); the label is always resampled with nearest neighbour (``order=0``) on the same
coordinates, so image and label stay aligned and the label never gains a value: every output
label value is an input label value, or 0 (background) where the transform reaches outside the
slice. (The upstream H-SAM elastic path interpolates labels linearly, which invents class ids at
borders.)

The optional extras default to off (paper: rotation, scale and elastic only), in this order after
the coordinate map:

* ``flip_rot90`` (SSL4MIS ACDC ``random_rot_flip``): ``np.rot90`` by ``k`` in {0, 1, 2, 3} and a
  flip along a random axis, on image and label together (exact, no resampling). As in SSL4MIS the
  flip always follows, so the result is one of the 4 mirror images of the slice (never a pure
  rotation). For a non-square slice an odd ``k`` swaps height and width; ``SliceDataset``
  resizes to ``S x S`` afterwards.
* ``rot90``: ``np.rot90`` by ``k`` uniform in {1, 2, 3}, image and label together, no flip: the
  anatomy keeps its handedness (a mirrored heart puts the right ventricle where the left one
  is, which no scan shows), only its orientation in the slice changes. For scanners that store
  some patients' slices rotated by 90 degrees (ACDC: about 1 patient in 5).
* ``bias_field`` (MR intensity non-uniformity, as TorchIO's ``RandomBiasField``):
  ``clip(x * exp(f), 0, 1)`` with ``f`` a polynomial of degree ``bias_field_order`` in the
  slice coordinates (each scaled to ``[-1, 1]``), coefficients uniform in
  ``[-bias_field_coefficient, bias_field_coefficient]``. Unlike contrast and gamma, which map
  every pixel through one monotone function, it changes which regions of a slice are
  brightest: an LA blood pool that is not the brightest structure of its scan is what the
  global ops never show the model.
* ``contrast`` (nnU-Net contrast + additive brightness): ``clip(a * (x - m) + m + b, 0, 1)`` with
  ``m`` the slice mean, ``a`` uniform in ``contrast_range``, ``b`` uniform in
  ``brightness_range``.
* ``gamma`` (nnU-Net gamma): ``clip(x, 0, 1) ** g`` with ``g`` log-uniform in ``gamma_range``.
* ``histogram_shift`` (like ANTs' ``histogramWarpImageIntensities``, break points 0.25 / 0.5 /
  0.75 by default in both, and MONAI's ``RandHistogramShift``): ``x`` through a random monotone
  piecewise-linear curve from (0, 0) to (1, 1) whose ``histogram_shift_points`` interior knots,
  evenly spaced in ``x``, each move up or down by up to ``histogram_shift_max`` (then sorted,
  so the curve stays monotone). Unlike contrast and gamma it can darken the middle of the
  range while the brightest voxels stay at the top: an LA blood pool at 0.45 under a bright
  tail, as the dimmest LA scans look after percentile scaling.

The intensity ops assume images in the model's ``[0, 1]`` range (see :mod:`hsam.intensity`) and
keep them there; they never touch the label.

Randomness comes from one :class:`numpy.random.Generator`: the same seed gives the same sequence
of augmentations. For data-loader workers, pass a per-sample generator to
:meth:`Augmenter.__call__` (``SliceDataset`` derives one from ``(seed, epoch, index)``), which
makes results independent of the number of workers. An extra op draws from the generator only
when its probability is > 0, and after the rotation/scale/elastic draws, so configs without the
extras give bit-identical results to before they existed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from hsam.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["Augmenter", "AUGMENT_OPS", "EXTRA_OPS"]

#: Names of the transforms, in the order they are composed (rotate, then scale, then elastic).
AUGMENT_OPS = ("rotate", "scale", "elastic")
#: Names of the optional extras (default off), in the order they follow the coordinate map.
EXTRA_OPS = ("flip_rot90", "rot90", "bias_field", "contrast", "gamma", "histogram_shift")


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"augment {name}={p} must be a probability in [0, 1].")


def _check_pair(name: str, value: Sequence[float]) -> tuple[float, float]:
    if len(value) != 2:
        raise ConfigError(f"augment {name}={list(value)} must be two numbers [low, high].")
    lo, hi = float(value[0]), float(value[1])
    if not lo <= hi:
        raise ConfigError(f"augment {name}={list(value)} must have low <= high.")
    return lo, hi


def _bias_field(
    shape: tuple[int, ...], order: int, coefficient: float, rng: np.random.Generator
) -> np.ndarray:
    """``exp`` of a random polynomial of degree ``order`` over an ``(H, W)`` grid in
    ``[-1, 1]^2``: one coefficient per monomial ``y^i x^j`` with ``i + j <= order``."""
    y = np.linspace(-1.0, 1.0, shape[0])[:, None]
    x = np.linspace(-1.0, 1.0, shape[1])[None, :]
    log_field = np.zeros(shape[:2])
    for i in range(order + 1):
        for j in range(order + 1 - i):
            log_field += rng.uniform(-coefficient, coefficient) * y**i * x**j
    return np.exp(log_field)


def _histogram_shift(
    image: np.ndarray, points: int, max_shift: float, rng: np.random.Generator
) -> np.ndarray:
    """`image` in [0, 1] through a random monotone piecewise-linear curve (module doc)."""
    knots = np.linspace(0.0, 1.0, points + 2)
    moved = knots.copy()
    moved[1:-1] = np.clip(knots[1:-1] + rng.uniform(-max_shift, max_shift, points), 0.0, 1.0)
    return np.interp(np.clip(image, 0.0, 1.0), knots, np.sort(moved)).astype(np.float32)


def _turn(
    image: np.ndarray, label: np.ndarray | None, k: int, *, flip_axis: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``np.rot90`` by ``k``, then a flip along ``flip_axis`` if given, of image and label
    alike (exact: no resampling)."""

    def move(a: np.ndarray) -> np.ndarray:
        a = np.rot90(a, k)
        return np.ascontiguousarray(a if flip_axis is None else np.flip(a, flip_axis))

    return move(image), None if label is None else move(label)


class Augmenter:
    """Random rotation, scaling and elastic deformation of an ``(H, W)`` image/label pair,
    optionally followed by rot90/flip, contrast/brightness and gamma (default off).

    Args:
        seed: an ``int`` seed, a ready :class:`numpy.random.Generator`, or ``None`` (fresh
            OS entropy; not reproducible).
        p_rotate: probability of a rotation by an angle drawn uniformly from
            ``[-max_angle, max_angle]`` degrees about the slice centre. Default 0.5.
        max_angle: rotation range in degrees. Default 20 (paper: +-20).
        p_scale: probability of an isotropic zoom by a factor drawn uniformly from
            ``scale_range`` about the centre (>1 zooms in and crops, <1 zooms out and pads with
            the fill value); the output keeps the input size. Default 0.5.
        scale_range: ``(low, high)`` zoom factors. Default ``(0.85, 1.25)``.
        p_elastic: probability of an elastic deformation. Default 0.2.
        elastic_sigma: smoothness of the random displacement field: Gaussian sigma as a
            fraction of the slice side (upstream: 0.08).
        elastic_magnitude: RMS displacement as a fraction of the slice side (0.01 = 5 px at
            512; upstream's alpha = 2W with sigma = 0.08W gives about 4 px at any size).
        image_order: spline order for the image, 1 (linear) or 3 (cubic).
        mode: ``"independent"`` (default): each transform is applied with its own probability,
            any combination can occur; ``"one_of"``: at most one transform per sample, chosen
            with probabilities ``p_rotate``, ``p_scale``, ``p_elastic`` (sum <= 1; the rest is
            "none"), like the upstream code (0.45 / 0.4125 / 0.1169 there). Applies to these
            three only; the extras below always have independent probabilities.
        p_flip_rot90: probability of ``np.rot90`` by ``k`` uniform in {0, 1, 2, 3} followed by a
            flip along a random axis (SSL4MIS ACDC ``random_rot_flip``). Default 0 (off).
        p_rot90: probability of ``np.rot90`` by ``k`` uniform in {1, 2, 3}, without a flip
            (handedness kept). Default 0 (off).
        p_bias_field: probability of a smooth multiplicative bias field (see the module
            docstring). Default 0 (off).
        bias_field_coefficient: largest absolute polynomial coefficient of the log-field
            (TorchIO's default 0.5), ``>= 0``.
        bias_field_order: degree of the log-field polynomial, ``>= 1`` (TorchIO: 3).
        p_contrast: probability of ``clip(a * (x - mean) + mean + b, 0, 1)``, ``a`` uniform in
            ``contrast_range``, ``b`` uniform in ``brightness_range`` (nnU-Net). Default 0.
        contrast_range: ``(low, high)`` contrast factors, ``0 < low <= high``. Default
            ``(0.65, 1.5)``.
        brightness_range: ``(low, high)`` additive shifts in ``[-1, 1]``. Default
            ``(-0.15, 0.15)``.
        p_gamma: probability of ``clip(x, 0, 1) ** g``, ``g`` log-uniform in ``gamma_range``
            (nnU-Net). Default 0.
        gamma_range: ``(low, high)`` gamma exponents, ``0 < low <= high``; ``g < 1`` brightens,
            ``g > 1`` darkens. Default ``(0.5, 2.0)``.
        p_histogram_shift: probability of the random monotone intensity curve of the module
            docstring. Default 0.
        histogram_shift_points: its interior knots, ``>= 1``. Default 3.
        histogram_shift_max: how far each knot moves, in ``[0, 1]``. Default 0.3.

    Image fill outside the slice is the slice minimum (background for CT windows and MR);
    label fill is 0. After each call :attr:`last_applied` names the transforms used, in the
    order applied (names from :data:`AUGMENT_OPS` and :data:`EXTRA_OPS`).
    """

    def __init__(
        self,
        seed: int | np.random.Generator | None = None,
        *,
        p_rotate: float = 0.5,
        max_angle: float = 20.0,
        p_scale: float = 0.5,
        scale_range: tuple[float, float] = (0.85, 1.25),
        p_elastic: float = 0.2,
        elastic_sigma: float = 0.08,
        elastic_magnitude: float = 0.01,
        image_order: int = 1,
        mode: str = "independent",
        p_flip_rot90: float = 0.0,
        p_rot90: float = 0.0,
        p_bias_field: float = 0.0,
        bias_field_coefficient: float = 0.5,
        bias_field_order: int = 3,
        p_contrast: float = 0.0,
        contrast_range: Sequence[float] = (0.65, 1.5),
        brightness_range: Sequence[float] = (-0.15, 0.15),
        p_gamma: float = 0.0,
        gamma_range: Sequence[float] = (0.5, 2.0),
        p_histogram_shift: float = 0.0,
        histogram_shift_points: int = 3,
        histogram_shift_max: float = 0.3,
    ) -> None:
        for name, p in (
            ("p_rotate", p_rotate),
            ("p_scale", p_scale),
            ("p_elastic", p_elastic),
            ("p_flip_rot90", p_flip_rot90),
            ("p_rot90", p_rot90),
            ("p_bias_field", p_bias_field),
            ("p_contrast", p_contrast),
            ("p_gamma", p_gamma),
            ("p_histogram_shift", p_histogram_shift),
        ):
            _check_probability(name, p)
        c_lo, c_hi = _check_pair("contrast_range", contrast_range)
        if c_lo <= 0:
            raise ConfigError(f"augment contrast_range={list(contrast_range)} must be > 0.")
        b_lo, b_hi = _check_pair("brightness_range", brightness_range)
        if b_lo < -1.0 or b_hi > 1.0:
            raise ConfigError(
                f"augment brightness_range={list(brightness_range)} must lie in [-1, 1] "
                "(images are in [0, 1])."
            )
        g_lo, g_hi = _check_pair("gamma_range", gamma_range)
        if g_lo <= 0:
            raise ConfigError(f"augment gamma_range={list(gamma_range)} must be > 0.")
        if not (math.isfinite(bias_field_coefficient) and bias_field_coefficient >= 0):
            raise ConfigError(
                f"augment bias_field_coefficient={bias_field_coefficient} must be >= 0."
            )
        if int(bias_field_order) != bias_field_order or bias_field_order < 1:
            raise ConfigError(
                f"augment bias_field_order={bias_field_order} must be an integer >= 1."
            )
        if int(histogram_shift_points) != histogram_shift_points or histogram_shift_points < 1:
            raise ConfigError(
                f"augment histogram_shift_points={histogram_shift_points} must be an integer >= 1."
            )
        if not 0.0 <= histogram_shift_max <= 1.0:
            raise ConfigError(
                f"augment histogram_shift_max={histogram_shift_max} must lie in [0, 1]."
            )
        if mode not in ("independent", "one_of"):
            raise ConfigError(f"augment mode {mode!r} must be 'independent' or 'one_of'.")
        if mode == "one_of" and p_rotate + p_scale + p_elastic > 1.0 + 1e-9:
            raise ConfigError(
                f"augment mode 'one_of' needs p_rotate + p_scale + p_elastic <= 1, got "
                f"{p_rotate + p_scale + p_elastic:g}."
            )
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"augment scale_range {scale_range} must be 0 < low <= high.")
        if image_order not in (0, 1, 3):
            raise ConfigError(f"augment image_order={image_order} must be 1 (linear) or 3.")
        if max_angle < 0 or elastic_sigma <= 0 or elastic_magnitude < 0:
            raise ConfigError(
                "augment max_angle and elastic_magnitude must be >= 0 and elastic_sigma > 0."
            )
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.p_rotate = float(p_rotate)
        self.max_angle = float(max_angle)
        self.p_scale = float(p_scale)
        self.scale_range = (float(lo), float(hi))
        self.p_elastic = float(p_elastic)
        self.elastic_sigma = float(elastic_sigma)
        self.elastic_magnitude = float(elastic_magnitude)
        self.image_order = int(image_order)
        self.mode = mode
        self.p_flip_rot90 = float(p_flip_rot90)
        self.p_rot90 = float(p_rot90)
        self.p_bias_field = float(p_bias_field)
        self.bias_field_coefficient = float(bias_field_coefficient)
        self.bias_field_order = int(bias_field_order)
        self.p_contrast = float(p_contrast)
        self.contrast_range = (c_lo, c_hi)
        self.brightness_range = (b_lo, b_hi)
        self.p_gamma = float(p_gamma)
        self.gamma_range = (g_lo, g_hi)
        self.p_histogram_shift = float(p_histogram_shift)
        self.histogram_shift_points = int(histogram_shift_points)
        self.histogram_shift_max = float(histogram_shift_max)
        self.last_applied: tuple[str, ...] = ()

    def reseed(self, seed: int | np.random.Generator) -> None:
        """Replace the generator (e.g. per data-loader worker)."""
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def _choose(self, rng: np.random.Generator) -> tuple[str, ...]:
        probs = (self.p_rotate, self.p_scale, self.p_elastic)
        if self.mode == "one_of":
            u = rng.random()
            for op, cum in zip(AUGMENT_OPS, np.cumsum(probs), strict=True):
                if u < cum:
                    return (op,)
            return ()
        draws = rng.random(3)
        return tuple(op for op, p, u in zip(AUGMENT_OPS, probs, draws, strict=True) if u < p)

    def __call__(
        self,
        image: np.ndarray,
        label: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Augment one slice.

        Args:
            image: ``(H, W)`` float array.
            label: ``(H, W)`` integer array or ``None``.
            rng: generator to draw from instead of :attr:`rng` (per-sample reproducibility).

        Returns:
            ``(image, label)``: float32 and the label in its input dtype, both ``(H, W)``, or
            ``(W, H)`` after an odd rot90 of a non-square slice (``flip_rot90``, ``rot90``).
        """
        image = np.asarray(image)
        if image.ndim != 2:
            raise ValueError(f"Augmenter expects a 2-D (H, W) image, got shape {image.shape}")
        if label is not None and np.shape(label) != image.shape:
            raise ValueError(f"label shape {np.shape(label)} != image shape {image.shape}")
        rng = rng if rng is not None else self.rng
        ops = self._choose(rng)
        image = image.astype(np.float32, copy=False)
        if ops:
            image, label = self._warp(image, label, ops, rng)
        else:
            image = image.copy()
            label = None if label is None else np.array(label, copy=True)
        # Extras draw only when enabled, after the warp's draws: configs without them keep
        # their exact random sequence.
        extras: list[str] = []
        if self.p_flip_rot90 > 0 and rng.random() < self.p_flip_rot90:
            k, axis = int(rng.integers(4)), int(rng.integers(2))
            image, label = _turn(image, label, k, flip_axis=axis)
            extras.append("flip_rot90")
        if self.p_rot90 > 0 and rng.random() < self.p_rot90:
            image, label = _turn(image, label, int(rng.integers(1, 4)))
            extras.append("rot90")
        if self.p_bias_field > 0 and rng.random() < self.p_bias_field:
            field = _bias_field(
                image.shape, self.bias_field_order, self.bias_field_coefficient, rng
            )
            image = np.clip(image * field, 0.0, 1.0).astype(np.float32, copy=False)
            extras.append("bias_field")
        if self.p_contrast > 0 and rng.random() < self.p_contrast:
            a = rng.uniform(*self.contrast_range)
            b = rng.uniform(*self.brightness_range)
            m = float(image.mean())
            image = np.clip(a * (image - m) + m + b, 0.0, 1.0).astype(np.float32, copy=False)
            extras.append("contrast")
        if self.p_gamma > 0 and rng.random() < self.p_gamma:
            lo, hi = self.gamma_range
            g = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            image = np.power(np.clip(image, 0.0, 1.0), g).astype(np.float32, copy=False)
            extras.append("gamma")
        if self.p_histogram_shift > 0 and rng.random() < self.p_histogram_shift:
            image = _histogram_shift(
                image, self.histogram_shift_points, self.histogram_shift_max, rng
            )
            extras.append("histogram_shift")
        self.last_applied = ops + tuple(extras)
        return image, label

    def _warp(
        self,
        image: np.ndarray,
        label: np.ndarray | None,
        ops: tuple[str, ...],
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Rotation / scale / elastic ``ops`` as one backward coordinate map."""
        H, W = image.shape
        # Backward map: input = centre + A @ (output - centre) [+ displacement(output)].
        A = np.eye(2)
        if "rotate" in ops:
            theta = math.radians(rng.uniform(-self.max_angle, self.max_angle))
            c, s = math.cos(theta), math.sin(theta)
            A = A @ np.array([[c, -s], [s, c]])
        if "scale" in ops:
            A = A / rng.uniform(*self.scale_range)
        centre = np.array([(H - 1) / 2.0, (W - 1) / 2.0])
        fill = float(image.min())
        if "elastic" not in ops:
            offset = centre - A @ centre
            out = ndimage.affine_transform(
                image, A, offset=offset, order=self.image_order, mode="constant", cval=fill
            )
            lab = None
            if label is not None:
                lab = ndimage.affine_transform(
                    np.asarray(label), A, offset=offset, order=0, mode="constant", cval=0
                )
            return out.astype(np.float32, copy=False), lab
        grid = np.indices((H, W), dtype=np.float64).reshape(2, -1) - centre[:, None]
        coords = (A @ grid + centre[:, None]).reshape(2, H, W)
        coords += self._displacement((H, W), rng)
        out = ndimage.map_coordinates(
            image, coords, order=self.image_order, mode="constant", cval=fill
        )
        lab = None
        if label is not None:
            lab = ndimage.map_coordinates(
                np.asarray(label), coords, order=0, mode="constant", cval=0
            )
        return out.astype(np.float32, copy=False), lab

    def _displacement(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """Smooth random displacement field ``(2, H, W)`` in pixels with the configured RMS.

        White noise is smoothed with a Gaussian on a grid coarsened by up to sigma/4 (cheap for
        large sigma), upsampled linearly, and scaled to RMS ``elastic_magnitude * max(H, W)``.
        """
        H, W = shape
        side = max(H, W)
        sigma = self.elastic_sigma * side
        step = max(1, int(sigma // 4))
        coarse = (math.ceil(H / step) + 1, math.ceil(W / step) + 1)
        field = np.empty((2, H, W), dtype=np.float64)
        for k in range(2):
            noise = rng.uniform(-1.0, 1.0, size=coarse)
            smooth = ndimage.gaussian_filter(noise, sigma / step, mode="reflect")
            up = ndimage.zoom(smooth, (step, step), order=1)[:H, :W]
            if up.shape != (H, W):  # pragma: no cover - coarse grid always covers H x W
                up = np.pad(up, ((0, H - up.shape[0]), (0, W - up.shape[1])), mode="edge")
            rms = float(np.sqrt(np.mean(up**2)))
            field[k] = up / rms if rms > 0 else up
        return field * (self.elastic_magnitude * side / math.sqrt(2.0))
