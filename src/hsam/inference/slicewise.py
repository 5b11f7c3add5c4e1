"""Slice-wise inference of a model over whole [0, 1] volumes, with or without a shared frozen
encoder prefix. The functions the Predictor (hsam.inference.predictor) runs; applications use it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from hsam.config import InputResize, TestTimeAugmentation
from hsam.data.slices import fitted_extent
from hsam.modeling.hsam import HSAM, HSAMOutput

Stage = Literal["1", "2", "fused"]
Precision = Literal["fp32", "bf16"]
#: A test-time transform of a (B, C, S, S) batch: the dims it flips, then its quarter turns
#: (counter-clockwise, in the last two dims).
Transform = tuple[tuple[int, ...], int]

#: The transforms each test-time augmentation averages over: ``flip`` is nnU-Net's 2-D
#: mirroring (identity, left-right, up-down and both); ``rot90`` the four quarter turns, for
#: models trained with them (``train.augment.p_rot90``).
TTA_TRANSFORMS: dict[str, tuple[Transform, ...]] = {
    "none": (((), 0),),
    "flip": (((), 0), ((-1,), 0), ((-2,), 0), ((-2, -1), 0)),
    "rot90": (((), 0), ((), 1), ((), 2), ((), 3)),
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


def _transformed(x: torch.Tensor, transform: Transform) -> torch.Tensor:
    dims, turns = transform
    x = x.flip(dims) if dims else x
    return torch.rot90(x, turns, dims=(-2, -1)) if turns else x


def _restored(x: torch.Tensor, transform: Transform) -> torch.Tensor:
    """`x` (e.g. probabilities of a transformed batch) mapped back: the inverse of
    `_transformed`."""
    dims, turns = transform
    x = torch.rot90(x, -turns, dims=(-2, -1)) if turns else x
    return x.flip(dims) if dims else x


def tta_probabilities(
    forward: Callable[[torch.Tensor], HSAMOutput],
    x: torch.Tensor,
    *,
    stage: Stage,
    tta: TestTimeAugmentation = "none",
) -> torch.Tensor:
    """(B, T, S, S) float32 probabilities of `stage` for input slices x (B, 1, S, S): the mean
    over `tta`'s transforms of ``forward(transformed x)``'s probabilities, each mapped back."""
    transforms = TTA_TRANSFORMS[tta]
    total = None
    for transform in transforms:
        out = forward(_transformed(x, transform))
        probs = _restored(stage_probabilities(out, stage).float(), transform)
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(transforms)


def check_slice_smoothing(sigma: float) -> float:
    """`sigma` as a float if it is a usable smoothing width (finite, >= 0), else ValueError."""
    value = float(sigma)
    if not np.isfinite(value) or value < 0:
        raise ValueError(
            f"slice smoothing must be a finite sigma >= 0 in slices (0 = off), got {sigma!r}."
        )
    return value


def smooth_across_slices(probs: np.ndarray, sigma: float) -> np.ndarray:
    """(T, D, H, W) class probabilities averaged across neighbouring slices: a Gaussian of
    `sigma` slices along D (edges repeat the end slices), the same in-plane. Slice-wise
    predictions of a thin-slice volume disagree from slice to slice; the average makes them
    agree where the anatomy does. Probabilities stay probabilities (the kernel sums to 1)."""
    if sigma == 0:
        return probs
    return ndimage.gaussian_filter1d(probs, sigma, axis=1, mode="nearest")


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


class _VolumeProbabilities:
    """A volume's labels from its slices' probabilities, added batch by batch: each batch's
    argmax at once, or, with slice smoothing or `keep`, the whole volume's probabilities held
    until :meth:`finish` (which smooths them across slices first)."""

    def __init__(
        self, num_tokens: int, shape: tuple[int, ...], slice_smoothing: float, keep: bool = False
    ) -> None:
        self.sigma = check_slice_smoothing(slice_smoothing)
        self.keep = keep
        self.grid = (int(shape[-2]), int(shape[-1]))
        self.labels = np.zeros(shape, dtype=_label_dtype(num_tokens))
        self.probs = None
        if keep or self.sigma:
            self.probs = np.zeros((num_tokens, *shape), dtype=np.float32)

    def add(self, index: slice, probs: torch.Tensor, resize: InputResize) -> None:
        """(b, T, S, S) probabilities of the slices `index`."""
        if self.probs is None:
            self.labels[index] = labels_from_probabilities(probs, self.grid, resize)
        else:  # labelled once, in finish
            grid = probabilities_to_grid(probs, self.grid, resize)
            self.probs[:, index] = grid.transpose(0, 1).cpu().numpy()

    def finish(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(D, H, W) labels and, with `keep`, the (T, D, H, W) probabilities they are the
        argmax of (smoothed as they are)."""
        if self.probs is not None:
            self.probs = smooth_across_slices(self.probs, self.sigma)
            self.labels = self.probs.argmax(0).astype(self.labels.dtype)
        return self.labels, self.probs if self.keep else None


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
    slice_smoothing: float = 0.0,
    return_probabilities: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Segment a (D, H, W) volume in [0, 1] slice by slice (every slice, empty ones too).

    Slices are resized (bilinear) to the model's S, stretched or aspect-kept and padded as
    `model.input_resize` says, and predicted in batches (averaged over `tta`'s transforms); the
    class probabilities of the slice's region are resized back (bilinear) to (H, W),
    smoothed across slices when `slice_smoothing` (a sigma in slices) is above 0
    (:func:`smooth_across_slices`; the whole volume's probabilities are then held), and the
    labels are their argmax.

    Returns:
      labels (D, H, W) uint8 (uint16 above 256 classes), and (T, D, H, W) float32
      probabilities (resized back bilinearly, smoothed as the labels) when
      `return_probabilities`, else None.
    """
    model.eval()
    device = next(model.parameters()).device
    volume_probs = _VolumeProbabilities(
        model.num_tokens, volume.shape, slice_smoothing, keep=return_probabilities
    )
    for index, x in _model_batches(model, volume, batch_size, device):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            probs = tta_probabilities(model, x, stage=stage, tta=tta)
        volume_probs.add(index, probs, model.input_resize)
        if progress is not None:
            progress(x.shape[0])
    return volume_probs.finish()


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
    slice_smoothing: float = 0.0,
) -> np.ndarray:
    """(D, H, W) labels from `encode_volume_prefix` features; the same labels as
    `predict_volume` on the volume (same math, the prefix is just not recomputed)."""
    model.eval()
    device = next(model.parameters()).device
    volume_probs = _VolumeProbabilities(
        model.num_tokens, (features.shape[0], *shape), slice_smoothing
    )
    for start in range(0, features.shape[0], batch_size):
        x = features[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x, start_unit=prefix_units)
        probs = stage_probabilities(out, stage).float()
        volume_probs.add(slice(start, start + len(x)), probs, model.input_resize)
    return volume_probs.finish()[0]


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
    slice_smoothing: float | Sequence[float] = 0.0,
) -> list[np.ndarray]:
    """Like `predict_volume` for several models that share their first `prefix_units` frozen
    encoder units (same backbone weights, LoRA only after them): the prefix runs once per
    slice (and test-time transform). `stage` and `slice_smoothing`: one for all models, or one
    per model; a model listed several times (e.g. once per stage, or per smoothing) runs once.
    Returns one (D, H, W) label volume per entry."""
    stages = [stage] * len(models) if isinstance(stage, str) else list(stage)
    sigmas = (
        list(slice_smoothing)
        if isinstance(slice_smoothing, Sequence)
        else [slice_smoothing] * len(models)
    )
    if len(stages) != len(models) or len(sigmas) != len(models):
        raise ValueError(
            f"{len(stages)} stages and {len(sigmas)} slice smoothings for {len(models)} models."
        )
    device = next(models[0].parameters()).device
    outputs = [
        _VolumeProbabilities(m.num_tokens, volume.shape, sigma)
        for m, sigma in zip(models, sigmas, strict=True)
    ]
    for model in models:
        model.eval()
    transforms = TTA_TRANSFORMS[tta]
    for index, x in _model_batches(models[0], volume, batch_size, device):
        sums: list[torch.Tensor | None] = [None] * len(models)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            for transform in transforms:
                prefix = models[0].encode_prefix(_transformed(x, transform), prefix_units)
                finished: dict[int, HSAMOutput] = {}
                for i, model in enumerate(models):
                    if id(model) not in finished:
                        finished[id(model)] = model(prefix, start_unit=prefix_units)
                    out = finished[id(model)]
                    probs = _restored(stage_probabilities(out, stages[i]).float(), transform)
                    sums[i] = probs if sums[i] is None else sums[i] + probs
        for volume_probs, total in zip(outputs, sums, strict=True):
            assert total is not None
            volume_probs.add(index, total / len(transforms), models[0].input_resize)
    return [volume_probs.finish()[0] for volume_probs in outputs]
