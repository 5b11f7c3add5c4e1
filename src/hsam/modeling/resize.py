"""Pixel-centred resizing of integer label maps (shared by the losses and CMAttn).

torch's ``mode="nearest"`` picks source index ``floor(o * H / S)``, which shifts a label map by
up to half a pixel towards the origin; ``"nearest-exact"`` picks ``floor((o + 0.5) * H / S)``,
the source pixel whose centre is nearest, which is how training slices are resized
(``hsam.data.slices.resize_label``). Predicted labels never go through here: inference resizes
probabilities bilinearly and takes the argmax.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torch.nn import functional as F


def resize_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """(B, H, W) integer labels -> (B, *size) int64, pixel-centred nearest neighbour."""
    if labels.ndim != 3:
        raise ValueError(f"labels must be (B, H, W), got {tuple(labels.shape)}.")
    size = (int(size[0]), int(size[1]))
    if tuple(labels.shape[-2:]) == size:
        return labels.long()
    # float32 holds every label id below 2**24 exactly.
    out = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")
    return out[:, 0].long()
