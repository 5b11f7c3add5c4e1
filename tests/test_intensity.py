"""Histogram standardisation as a model policy (`+landmarks[...]`, hsam.intensity)."""

from __future__ import annotations

import numpy as np
import pytest

from hsam.errors import DataError
from hsam.intensity import (
    LANDMARK_PERCENTILES,
    fit_volume_mapping,
    parse_policy,
    split_landmarks,
    to_model_range,
    volume_landmarks,
    with_landmarks,
)

BASE = "percentile[0.5,99.5]"


def _scan(seed: int = 0) -> np.ndarray:
    """An MR-like volume: dark background, a bright blob (the 'blood pool'), noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:12, :40, :40]
    blob = ((y - 20) ** 2 + (x - 18) ** 2 < 120).astype(np.float32)
    return (80 + 300 * blob + 40 * np.sin(x / 5.0) + rng.normal(0, 15, z.shape)).astype(np.float32)


def _reference() -> np.ndarray:
    return volume_landmarks(to_model_range(_scan(), BASE))


def test_policy_with_landmarks_round_trips_and_parses():
    reference = _reference()
    policy = with_landmarks(BASE, reference)
    assert policy.startswith(BASE + "+landmarks[")
    base, parsed = split_landmarks(policy)
    assert base == BASE
    np.testing.assert_allclose(parsed, reference, atol=5e-5)  # 4 decimals in the name
    assert parse_policy(policy) == ("percentile", 0.5, 99.5)
    assert split_landmarks(BASE) == (BASE, None)


@pytest.mark.parametrize(
    "landmarks",
    [
        "0.1,0.2",
        "0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2,0.1,0.05,0.0",
        "0,.1,.2,.3,.4,.5,.6,.7,.8,.9,1.2",
        "a",
    ],
)
def test_malformed_landmarks_are_refused_with_what_they_must_be(landmarks):
    with pytest.raises(DataError, match=r"11 non-decreasing numbers in \[0, 1\]"):
        parse_policy(f"{BASE}+landmarks[{landmarks}]")


def test_a_policy_that_names_landmarks_does_not_take_a_second_set():
    policy = with_landmarks(BASE, _reference())
    with pytest.raises(DataError, match="already names its histogram landmarks"):
        with_landmarks(policy, _reference())


def test_standardisation_puts_each_scan_on_the_reference_landmarks():
    """A scan whose contrast differs by a monotone curve (its square, its square root) lands
    on the reference landmarks, where the min-max policy alone leaves it far off."""
    reference = _reference()
    policy = with_landmarks(BASE, reference)
    scan = _scan(1)
    for changed in (scan**2, np.sqrt(scan - scan.min() + 1)):
        plain = volume_landmarks(to_model_range(changed, BASE))
        standardised = volume_landmarks(to_model_range(changed, policy))
        assert np.abs(plain - reference).max() > 0.1
        assert np.abs(standardised - reference).max() < 0.01
    # an affine change of the raw values (another scanner gain) changes nothing
    np.testing.assert_allclose(
        to_model_range(3 * scan + 7, policy), to_model_range(scan, policy), atol=1e-5
    )


def test_standardisation_is_monotone_and_stays_in_range():
    scan = _scan(2)
    scan[:3] = scan.min()  # a quarter of the volume tied at its minimum
    assert volume_landmarks(to_model_range(scan, BASE))[1] == 0.0  # landmarks tie at 0
    out = to_model_range(scan, with_landmarks(BASE, _reference()))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    order = np.argsort(scan, axis=None, kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= 0)  # no two intensities swap


def test_slices_mapped_with_their_volume_fit_equal_the_whole_volume():
    """A mapping fitted over all slices of a volume (how slice files train) maps each slice
    as the whole volume is mapped at test time."""
    scan = _scan(3)
    policy = with_landmarks(BASE, _reference())
    mapping = fit_volume_mapping(scan, policy)
    slices = np.stack([mapping(s) for s in scan])
    np.testing.assert_array_equal(slices, to_model_range(scan, policy))
    assert len(mapping.landmarks[0]) == len(LANDMARK_PERCENTILES)
