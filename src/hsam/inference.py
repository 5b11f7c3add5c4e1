"""Slice-wise inference over whole volumes (shared by validation, `evaluate` and `predict`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

from hsam.modeling.hsam import HSAM, HSAMOutput

Stage = Literal["1", "2", "fused"]


def stage_probabilities(output: HSAMOutput, stage: Stage) -> torch.Tensor:
    """(B, T, S, S) class probabilities of one stage or of the fusion."""
    if stage == "fused":
        return output.probabilities
    if stage == "1":
        size = output.probabilities.shape[-2:]
        up = F.interpolate(output.stage1_logits, size=size, mode="bilinear", align_corners=False)
        return up.softmax(1)
    if output.stage2_logits is None:
        raise ValueError("stage 2 was requested from a one-stage model; use stage 1 or fused.")
    return output.stage2_logits.softmax(1)


@torch.no_grad()
def predict_volume(
    model: HSAM,
    volume: np.ndarray,
    *,
    batch_size: int = 8,
    stage: Stage = "fused",
    precision: Literal["fp32", "bf16"] = "fp32",
    return_probabilities: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Segment a (D, H, W) volume in [0, 1] slice by slice (every slice, empty ones too).

    Slices are resized (bilinear) to the model's S, predicted in batches, and the label map is
    resized back with nearest neighbour to (H, W).

    Returns:
      labels (D, H, W) uint8/uint16, and (T, D, H, W) float32 probabilities (resized back
      bilinearly) when `return_probabilities`, else None.
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must be (D, H, W), got shape {volume.shape}.")
    model.eval()
    device = next(model.parameters()).device
    d, h, w = volume.shape
    s = model.image_size
    t = model.num_classes
    labels = np.zeros((d, h, w), dtype=np.uint8 if t <= 256 else np.uint16)
    probs_out = np.zeros((t, d, h, w), dtype=np.float32) if return_probabilities else None
    for start in range(0, d, batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(volume[start : start + batch_size]))
        x = chunk.float().to(device)[:, None]
        if (h, w) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x)
        probs = stage_probabilities(out, stage).float()
        pred = probs.argmax(1, keepdim=True).float()
        if (h, w) != (s, s):
            pred = F.interpolate(pred, size=(h, w), mode="nearest")
        labels[start : start + len(chunk)] = pred[:, 0].to(torch.int64).cpu().numpy()
        if probs_out is not None:
            if (h, w) != (s, s):
                probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
            probs_out[:, start : start + len(chunk)] = probs.transpose(0, 1).cpu().numpy()
        if progress is not None:
            progress(len(chunk))
    return labels, probs_out
