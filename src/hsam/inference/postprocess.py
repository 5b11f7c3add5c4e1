"""Post-processing of predicted label volumes (named, optional, off by default).

`largest_component`: for each foreground class keep only its largest 3-D connected component
(26-connectivity) and set the other components of that class to background. One connected
structure per class is the anatomy of LA, ACDC's ventricles and myocardium, and most organs;
the few-shot literature on LA (UA-MT, BCP) applies it before scoring. It removes scattered false
positives and never adds a voxel, so it cannot repair a missed structure.
"""

from __future__ import annotations

from typing import get_args

import numpy as np
from scipy import ndimage

from hsam.config import Postprocess

POSTPROCESS_CHOICES: tuple[str, ...] = get_args(Postprocess)


def keep_largest_component(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(D, H, W) integer labels -> a copy where each class 1..K keeps its largest 3-D
    connected component (26-connectivity); the rest of that class becomes 0."""
    if labels.ndim != 3:
        raise ValueError(f"labels must be (D, H, W), got shape {labels.shape}.")
    out = labels.copy()
    structure = np.ones((3, 3, 3), dtype=bool)
    for c in range(1, num_classes + 1):
        mask = labels == c
        if not mask.any():
            continue
        components, n = ndimage.label(mask, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0  # background of the component map
        out[mask & (components != int(sizes.argmax()))] = 0
    return out


def postprocess_labels(labels: np.ndarray, num_classes: int, method: str) -> np.ndarray:
    """Apply the named post-processing ("none" returns `labels` itself)."""
    if method == "none":
        return labels
    if method == "largest_component":
        return keep_largest_component(labels, num_classes)
    raise ValueError(f"unknown post-processing {method!r}; choose one of {POSTPROCESS_CHOICES}.")
