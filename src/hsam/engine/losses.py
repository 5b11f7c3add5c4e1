"""Training losses and schedules of H-SAM (per-stage CE + Dice, stage weight, LR).

Every formula is a pure function with its provenance, pinned by tests.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from hsam.modeling.hsam import HSAMOutput
from hsam.modeling.resize import resize_labels

StageWeightSchedule = Literal["supplement", "main_text"]


def soft_dice_loss(logits: Tensor, labels: Tensor, smooth: float = 1e-5) -> Tensor:
    """1 - mean over T classes (background included) of the soft Dice, batch-pooled.

    Dice_c = (2 sum p_c y_c + smooth) / (sum p_c^2 + sum y_c^2 + smooth), p = softmax(logits),
    sums over the whole batch (the released code's DiceLoss).

    Arguments:
      logits: (B, T, H, W); labels: (B, H, W) integers in [0, T).
    """
    t = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(labels.long(), t).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1 - dice.mean()


def stage_loss(logits: Tensor, labels: Tensor, dice_weight: float = 0.9) -> Tensor:
    """(1 - w) * CE + w * Dice for one stage; labels are resized to the logits' size with
    pixel-centred nearest neighbour (as the training slices were resized to S)."""
    if labels.shape[-2:] != logits.shape[-2:]:
        labels = resize_labels(labels, logits.shape[-2:])
    ce = F.cross_entropy(logits.float(), labels.long())
    return (1 - dice_weight) * ce + dice_weight * soft_dice_loss(logits, labels)


def stage1_weight(
    epoch: float, schedule: StageWeightSchedule = "supplement", max_epochs: int | None = None
) -> float:
    """Weight of the stage-1 loss at `epoch` (stage 2 gets 1 - this).

    supplement (and released code): 1 - 0.6 ** (0.99 ** e): 0.400 at 0, 0.025 at 299.
    main_text: 0.8 * exp(-0.005 e) ("starts at 0.8, exponential decay 0.005").
    """
    if schedule == "supplement":
        return 1.0 - 0.6 ** (0.99**epoch)
    if schedule == "main_text":
        return 0.8 * math.exp(-0.005 * epoch)
    raise ValueError(f"unknown stage-weight schedule {schedule!r}")


def schedule_epoch(step: int, total_steps: int, horizon: int) -> float:
    """Step `step` of `total_steps` as a (fractional) epoch of a `horizon`-epoch schedule:
    0 at the first step, horizon - 1 at the last (stage_weight_horizon)."""
    if horizon < 1:
        raise ValueError(f"stage_weight_horizon must be >= 1, got {horizon}.")
    return (horizon - 1) * min(step / max(total_steps - 1, 1), 1.0)


def hsam_loss(
    output: HSAMOutput, labels: Tensor, stage1_weight_value: float, dice_weight: float = 0.9
) -> tuple[Tensor, dict[str, float]]:
    """w * L1 + (1 - w) * L2 (L1 alone for the one-stage model); returns the parts too."""
    l1 = stage_loss(output.stage1_logits, labels, dice_weight)
    if output.stage2_logits is None:
        return l1, {"loss_stage1": float(l1.detach())}
    l2 = stage_loss(output.stage2_logits, labels, dice_weight)
    total = stage1_weight_value * l1 + (1 - stage1_weight_value) * l2
    return total, {"loss_stage1": float(l1.detach()), "loss_stage2": float(l2.detach())}


def learning_rate(
    step: int, *, base_lr: float, warmup_steps: int, total_steps: int, power: float = 0.9
) -> float:
    """Linear warm-up to base_lr over `warmup_steps`, then poly decay to 0 at `total_steps`.

    Step k (0-based) of warm-up uses base_lr * (k + 1) / warmup_steps; afterwards
    base_lr * (1 - (k - warmup) / (total - warmup)) ** power. (The released code divides by
    `total` instead of `total - warmup`, so its LR never reaches 0; ours does at the end.)
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return base_lr * (1.0 - progress) ** power
