"""Decoder attention: SAM's `Attention` on the fused SDPA kernel, plus the mask-modulated path.

Parameter names are SAM's (q_proj, k_proj, v_proj, out_proj), so pretrained decoder weights
load unchanged.
"""

from __future__ import annotations

import math

import torch
from segment_anything.modeling.transformer import Attention as SamAttention
from torch import Tensor
from torch.nn import functional as F


class FusedAttention(SamAttention):
    """Multi-head attention with an optional multiplicative prior on the attention weights.

    Without a prior this is plain attention through `scaled_dot_product_attention` (except
    bf16 on CPU, see below). With a
    prior M (H-SAM Eq. 3) the weights become softmax(QK^T / sqrt(d)) * M, multiplied after the
    softmax and not renormalised, so that a query only gathers values where the prior is high.
    """

    def forward(self, q: Tensor, k: Tensor, v: Tensor, prior: Tensor | None = None) -> Tensor:
        """
        Arguments:
          q: (B, Nq, C) queries; k, v: (B, Nk, C) keys and values.
          prior: optional (B, Nq, Nk) weights in [0, 1], shared across heads.

        Returns:
          (B, Nq, C) attended values.
        """
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        if prior is None and not (q.device.type == "cpu" and q.dtype == torch.bfloat16):
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # The prior multiplies after the softmax, which no fused kernel offers. Plain bf16
            # attention also goes here on CPU: torch's CPU flash kernel measured 3-5x slower
            # than these two matmuls for the decoders' shapes (few tokens x h*w pixels).
            scale = 1.0 / math.sqrt(q.shape[-1])
            weights = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
            if prior is not None:
                weights = weights * prior.unsqueeze(1).to(weights.dtype)
            out = weights @ v
        return self.out_proj(self._recombine_heads(out))
