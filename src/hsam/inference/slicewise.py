"""Slice-wise inference of a model over whole [0, 1] volumes, with or without a shared frozen
encoder prefix. The functions the Predictor (hsam.inference.predictor) runs; applications use it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

from hsam.config import InputResize
from hsam.data.slices import fitted_extent
from hsam.modeling.hsam import HSAM, HSAMOutput

Stage = Literal["1", "2", "fused"]
Precision = Literal["fp32", "bf16"]
TestTimeAugmentation = Literal["none", "flip"]

#: The flips each test-time augmentation averages over (dims of a (B, C, H, W) batch); ``flip``
#: is nnU-Net's 2-D mirroring: identity, left-right, up-down and both.
TTA_FLIPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "flip": ((), (-1,), (-2,), (-2, -1)),
}


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


def _flipped(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x.flip(dims) if dims else x


def tta_probabilities(
    forward: Callable[[torch.Tensor], HSAMOutput],
    x: torch.Tensor,
    *,
    stage: Stage,
    tta: TestTimeAugmentation = "none",
) -> torch.Tensor:
    """(B, T, S, S) float32 probabilities of `stage` for input slices x (B, 1, S, S): the mean
    over `tta`'s flips of ``forward(flipped x)``'s probabilities, each flipped back."""
    flips = TTA_FLIPS[tta]
    total = None
    for dims in flips:
        probs = _flipped(stage_probabilities(forward(_flipped(x, dims)), stage).float(), dims)
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(flips)


def _slice_batches(
    volume: np.ndarray,
    size: int,
    batch_size: int,
    device: torch.device,
    input_size: int | None = None,
    resize: InputResize = "stretch",
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(index range, (b, 1, S, S) slices resized bilinearly) over a (D, H, W) volume.

    `resize` "pad" keeps the aspect: each slice is resized to its `fitted_extent` in S x S and
    zero-padded below and to the right, as training prepared it. With `input_size`, slices
    first go through input_size x input_size (bicubic), the released code's test-time
    resampling (`model.test_input_size`)."""
    if volume.ndim != 3:
        raise ValueError(f"volume must be (D, H, W), got shape {volume.shape}.")
    d, h, w = volume.shape
    for start in range(0, d, batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(volume[start : start + batch_size]))
        x = chunk.float().to(device)[:, None]
        if input_size is not None and (h, w) != (input_size, input_size):
            x = F.interpolate(x, size=(input_size,) * 2, mode="bicubic", align_corners=False)
            h, w = input_size, input_size
        extent = fitted_extent((h, w), size) if resize == "pad" else (size, size)
        if (h, w) != extent:
            x = F.interpolate(x, size=extent, mode="bilinear", align_corners=False)
        if extent != (size, size):
            x = F.pad(x, (0, size - extent[1], 0, size - extent[0]))
        yield slice(start, start + len(chunk)), x


def probabilities_to_grid(
    probs: torch.Tensor, shape: tuple[int, int], resize: InputResize = "stretch"
) -> torch.Tensor:
    """(b, T, S, S) -> (b, T, H, W) probabilities on the slice grid (bilinear, pixel-centred);
    with `resize` "pad" only the slice's own region of S x S (its `fitted_extent`) is used."""
    if resize == "pad":
        extent = fitted_extent(shape, (probs.shape[-2], probs.shape[-1]))
        probs = probs[..., : extent[0], : extent[1]]
    if tuple(probs.shape[-2:]) == tuple(shape):
        return probs
    return F.interpolate(probs, size=shape, mode="bilinear", align_corners=False)


def labels_from_probabilities(
    probs: torch.Tensor, shape: tuple[int, int], resize: InputResize = "stretch"
) -> np.ndarray:
    """(b, T, S, S) probabilities -> (b, H, W) labels: the argmax of the probabilities resized
    to the slice grid, so labels always equal the argmax of any probabilities written (a
    resized argmax would be off-centre and coarser)."""
    return probabilities_to_grid(probs, shape, resize).argmax(1).cpu().numpy()


def _model_batches(
    model: HSAM, volume: np.ndarray, batch_size: int, device: torch.device
) -> Iterator[tuple[slice, torch.Tensor]]:
    """`_slice_batches` with the model's S, test-time resampling and input resize."""
    return _slice_batches(
        volume, model.image_size, batch_size, device, model.test_input_size, model.input_resize
    )


def _label_dtype(num_tokens: int) -> type:
    """Smallest unsigned type for labels ``0..num_tokens - 1``."""
    return np.uint8 if num_tokens <= 256 else np.uint16


@torch.no_grad()
def predict_volume(
    model: HSAM,
    volume: np.ndarray,
    *,
    batch_size: int = 8,
    stage: Stage = "fused",
    precision: Precision = "fp32",
    tta: TestTimeAugmentation = "none",
    return_probabilities: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Segment a (D, H, W) volume in [0, 1] slice by slice (every slice, empty ones too).

    Slices are resized (bilinear) to the model's S, stretched or aspect-kept and padded as
    `model.input_resize` says, and predicted in batches (averaged over `tta`'s flips); the
    class probabilities of the slice's region are resized back (bilinear) to (H, W) and the
    labels are their argmax.

    Returns:
      labels (D, H, W) uint8 (uint16 above 256 classes), and (T, D, H, W) float32
      probabilities (resized back bilinearly) when `return_probabilities`, else None.
    """
    model.eval()
    device = next(model.parameters()).device
    _, h, w = volume.shape
    labels = np.zeros(volume.shape, dtype=_label_dtype(model.num_tokens))
    probs_out = None
    if return_probabilities:
        probs_out = np.zeros((model.num_tokens, *volume.shape), dtype=np.float32)
    batches = _model_batches(model, volume, batch_size, device)
    for index, x in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            probs = tta_probabilities(model, x, stage=stage, tta=tta)
        probs = probabilities_to_grid(probs, (h, w), model.input_resize)
        labels[index] = probs.argmax(1).cpu().numpy()
        if probs_out is not None:
            probs_out[:, index] = probs.transpose(0, 1).cpu().numpy()
        if progress is not None:
            progress(x.shape[0])
    return labels, probs_out


@torch.no_grad()
def encode_volume_prefix(
    model: HSAM,
    volume: np.ndarray,
    *,
    prefix_units: int,
    batch_size: int = 8,
    precision: Precision = "fp32",
) -> torch.Tensor:
    """Features (D, ...) of the first `prefix_units` frozen encoder units for every slice of a
    (D, H, W) volume, on the CPU; `predict_from_prefix` finishes them with any model that shares
    those units."""
    device = next(model.parameters()).device
    chunks = []
    for _, x in _model_batches(model, volume, batch_size, device):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            chunks.append(model.encode_prefix(x, prefix_units).cpu())
    return torch.cat(chunks)


@torch.no_grad()
def predict_from_prefix(
    model: HSAM,
    features: torch.Tensor,
    shape: tuple[int, int],
    *,
    prefix_units: int,
    batch_size: int = 8,
    stage: Stage = "fused",
    precision: Precision = "fp32",
) -> np.ndarray:
    """(D, H, W) labels from `encode_volume_prefix` features; the same labels as
    `predict_volume` on the volume (same math, the prefix is just not recomputed)."""
    model.eval()
    device = next(model.parameters()).device
    labels = np.zeros((features.shape[0], *shape), dtype=_label_dtype(model.num_tokens))
    for start in range(0, features.shape[0], batch_size):
        x = features[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x, start_unit=prefix_units)
        probs = stage_probabilities(out, stage).float()
        labels[start : start + len(x)] = labels_from_probabilities(probs, shape, model.input_resize)
    return labels


@torch.no_grad()
def predict_volume_shared_prefix(
    models: Sequence[HSAM],
    volume: np.ndarray,
    *,
    prefix_units: int,
    batch_size: int = 8,
    stage: Stage | Sequence[Stage] = "fused",
    precision: Precision = "fp32",
    tta: TestTimeAugmentation = "none",
) -> list[np.ndarray]:
    """Like `predict_volume` for several models that share their first `prefix_units` frozen
    encoder units (same backbone weights, LoRA only after them): the prefix runs once per
    slice (and flip). `stage`: one for all models, or one per model; a model listed several
    times (e.g. once per stage) runs once. Returns one (D, H, W) label volume per entry."""
    stages = [stage] * len(models) if isinstance(stage, str) else list(stage)
    if len(stages) != len(models):
        raise ValueError(f"{len(stages)} stages for {len(models)} models.")
    device = next(models[0].parameters()).device
    _, h, w = volume.shape
    outputs = [np.zeros(volume.shape, dtype=_label_dtype(m.num_tokens)) for m in models]
    for model in models:
        model.eval()
    flips = TTA_FLIPS[tta]
    for index, x in _model_batches(models[0], volume, batch_size, device):
        sums: list[torch.Tensor | None] = [None] * len(models)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            for dims in flips:
                prefix = models[0].encode_prefix(_flipped(x, dims), prefix_units)
                finished: dict[int, HSAMOutput] = {}
                for i, model in enumerate(models):
                    if id(model) not in finished:
                        finished[id(model)] = model(prefix, start_unit=prefix_units)
                    out = finished[id(model)]
                    probs = _flipped(stage_probabilities(out, stages[i]).float(), dims)
                    sums[i] = probs if sums[i] is None else sums[i] + probs
        for labels, total in zip(outputs, sums, strict=True):
            assert total is not None
            # The mean's argmax is the sum's: no division needed for labels.
            labels[index] = labels_from_probabilities(total, (h, w), models[0].input_resize)
    return outputs
