"""CMAttn: class-balanced mask-guided self-attention (H-SAM Sec. 3.3).

The stage-1 mask features (one map per class token) are noised during training with a
per-pixel Gaussian whose std depends on the pixel's ground-truth class (larger for rarer
classes), passed through self-attention among the class tokens (the spatial positions are the
feature dimension), compressed over classes to one map, and turned into a gate g that enhances
the stage-2 input: emb <- emb + emb * g.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from segment_anything.modeling.common import MLPBlock
from torch import Tensor, nn
from torch.nn import functional as F

from hsam.modeling.attention import FusedAttention
from hsam.modeling.resize import resize_labels

CMAttnMode = Literal["paper", "reference"]


def class_noise_std_from_frequencies(frequencies: Sequence[float], max_std: float) -> list[float]:
    """Per-class noise std with variance inversely proportional to class frequency.

    sigma_c = max_std * sqrt(f_min / f_c): the rarest present class gets `max_std`; a class
    absent from the training set (f_c = 0) also gets `max_std`.

    Arguments:
      frequencies: (T,) fraction of training pixels per class, background first.
      max_std: the std of the rarest class, relative to the mask features' std.
    """
    freqs = np.asarray(frequencies, dtype=np.float64)
    if freqs.ndim != 1 or (freqs < 0).any() or not np.isfinite(freqs).all():
        raise ValueError(f"class frequencies must be a 1-D non-negative vector, got {freqs}")
    present = freqs > 0
    if not present.any():
        raise ValueError("class frequencies are all zero: the training labels are empty.")
    f_min = freqs[present].min()
    stds = np.full_like(freqs, max_std)
    stds[present] = max_std * np.sqrt(f_min / freqs[present])
    return [float(s) for s in stds]


def _num_heads_for(dim: int, preferred: int = 8) -> int:
    return next(h for h in range(preferred, 0, -1) if dim % h == 0)


class ClassBalancedMaskAttention(nn.Module):
    """Gate the stage-2 input embedding with class-token self-attention over mask features.

    `mode="paper"`: features scaled like attention logits, residual self-attention blocks,
    sigmoid gate (values in (0, 1), varies over pixels, trained by the stage-2 loss).
    `mode="reference"`: the released code's function, reproduced for comparison: no residuals,
    then ReLU and a softmax over a dimension of size 1, so the gate is exactly 1 and every
    parameter of this block gets exactly zero gradient (emb <- 2 * emb).
    """

    def __init__(
        self,
        *,
        num_tokens: int,
        embedding_dim: int,
        grid_size: int,
        mlp_dim: int = 2048,
        mode: CMAttnMode = "paper",
        class_noise_std: Sequence[float] | None = None,
    ) -> None:
        """
        Arguments:
          num_tokens: T, the number of class (mask) tokens.
          embedding_dim: C of the decoder, used to scale the token-pixel dot products.
          grid_size: g; mask features on an h x w grid are average-pooled to g x g, and the
            attention feature dimension is g * g.
          mlp_dim: hidden width of the MLP after the attention.
          class_noise_std: (T,) noise std per class; None disables the noise.
        """
        super().__init__()
        dim = grid_size * grid_size
        heads = _num_heads_for(dim)
        self.mode = mode
        self.grid_size = grid_size
        self.feature_scale = embedding_dim**-0.5
        self.attn1 = FusedAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2 = FusedAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.gate = nn.Linear(num_tokens, 1)
        std = torch.zeros(num_tokens) if class_noise_std is None else torch.tensor(class_noise_std)
        if std.shape != (num_tokens,):
            raise ValueError(f"class_noise_std needs {num_tokens} values, got {std.shape[0]}.")
        self.register_buffer("class_noise_std", std.float(), persistent=False)

    def class_balanced_noise(self, x: Tensor, labels: Tensor) -> Tensor:
        """Noise for (B, T, g*g) features: pixel j gets N(0, sigma_{label(j)}^2 * var(x))."""
        g = self.grid_size
        lab = resize_labels(labels, (g, g))
        lab = lab.flatten(1).clamp_(0, len(self.class_noise_std) - 1)  # (B, g*g)
        std = self.class_noise_std[lab].to(x.dtype)  # (B, g*g)
        return torch.randn_like(x) * std[:, None, :] * x.detach().std()

    def compute_gate(self, mask_features: Tensor, hw: tuple[int, int], labels: Tensor | None):
        """(B, T, h*w) mask features -> (B, 1, h, w) gate."""
        b, t, _ = mask_features.shape
        h, w = hw
        g = self.grid_size
        x = mask_features.reshape(b, t, h, w)
        if (h, w) != (g, g):
            x = F.adaptive_avg_pool2d(x, (g, g))
        x = x.flatten(2)  # (B, T, g*g)
        if self.mode == "reference":
            x = self.norm1(self.attn1(x, x, x))
            x = self.attn2(x, x, x)
            x = self.norm3(x + self.mlp(x))
            gate = torch.softmax(F.relu(self.gate(x.transpose(1, 2))), dim=-1)
        else:
            x = x * self.feature_scale
            if self.training and labels is not None:
                x = x + self.class_balanced_noise(x, labels)
            x = self.norm1(x + self.attn1(x, x, x))
            x = self.norm2(x + self.attn2(x, x, x))
            x = self.norm3(x + self.mlp(x))
            gate = torch.sigmoid(self.gate(x.transpose(1, 2)))  # (B, g*g, 1)
        gate = gate.transpose(1, 2).reshape(b, 1, g, g)
        if (h, w) != (g, g):
            gate = F.interpolate(gate, size=(h, w), mode="bilinear", align_corners=False)
        return gate

    def forward(
        self, embedding: Tensor, mask_features: Tensor, labels: Tensor | None = None
    ) -> Tensor:
        """
        Arguments:
          embedding: (B, C, h, w) stage-2 input embedding.
          mask_features: (B, T, h*w) stage-1 mask tokens x image keys.
          labels: optional (B, H, W) integer ground truth (any resolution; resized with
            pixel-centred nearest neighbour),
            used for the class-balanced noise in training mode only.

        Returns:
          (B, C, h, w) embedding + embedding * gate.
        """
        gate = self.compute_gate(mask_features, embedding.shape[-2:], labels)
        return embedding + embedding * gate.to(embedding.dtype)
