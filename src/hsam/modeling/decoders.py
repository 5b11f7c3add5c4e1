"""The two decoder stages of H-SAM.

Stage 1 is SAM's mask decoder with T = K + 1 mask tokens; besides its logits it returns the
mask features (mask tokens x image keys, before upsampling) and its upscaled pixel features.
Stage 2 is a second two-way transformer whose cross-attention is modulated by the stage-1
prior, fed with the CMAttn-enhanced embedding, followed by the hierarchical pixel decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP, MaskDecoder
from torch import Tensor, nn
from torch.nn import functional as F

from hsam.modeling.cmattn import ClassBalancedMaskAttention
from hsam.modeling.transformer import TwoWayTransformer


@dataclass(frozen=True)
class Stage1Output:
    logits: Tensor  # (B, T, 4h, 4w)
    mask_features: Tensor  # (B, T, h*w)
    upscaled: Tensor  # (B, C/8, 4h, 4w)


def _upscaling(dim: int) -> nn.Sequential:
    """SAM's x4 upscaling: (B, C, h, w) -> (B, C/8, 4h, 4w)."""
    return nn.Sequential(
        nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
        LayerNorm2d(dim // 4),
        nn.GELU(),
        nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
        nn.GELU(),
    )


def _predict_masks(hypernetworks: nn.ModuleList, tokens: Tensor, features: Tensor) -> Tensor:
    """tokens (B, T, C), features (B, D, H, W) -> logits (B, T, H, W)."""
    b, d, h, w = features.shape
    weights = torch.stack([mlp(tokens[:, i]) for i, mlp in enumerate(hypernetworks)], dim=1)
    return (weights @ features.flatten(2)).view(b, -1, h, w)


class Stage1Decoder(MaskDecoder):
    """SAM's `MaskDecoder` run prompt-free with T mask tokens.

    Construct with `num_multimask_outputs = T - 1` (SAM adds one token). The transformer,
    `iou_token` and `output_upscaling` load from SAM; mask tokens and hypernetwork MLPs are new.
    The IoU head is kept so SAM's decoder is intact, but no loss trains it, so it is frozen
    and not evaluated.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.iou_prediction_head.requires_grad_(False)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, dense: Tensor) -> Stage1Output:
        """
        Arguments:
          image_embedding: (B, C, h, w) encoder output.
          image_pe: (1, C, h, w) dense positional encoding.
          dense: (1, C, h, w) no-mask prompt embedding.
        """
        b, c, h, w = image_embedding.shape
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(b, -1, -1)  # (B, 1 + T, C)
        src = image_embedding + dense
        hs, keys = self.transformer(src, image_pe, tokens)
        mask_tokens_out = hs[:, 1:]  # (B, T, C)
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        logits = _predict_masks(self.output_hypernetworks_mlps, mask_tokens_out, upscaled)
        mask_features = mask_tokens_out @ keys.transpose(1, 2)  # (B, T, hw)
        return Stage1Output(logits=logits, mask_features=mask_features, upscaled=upscaled)


class HierarchicalPixelDecoder(nn.Module):
    """Fuse stage-2 and stage-1 pixel features (skip connection) and decode to full size.

    (B, 2 * C/8, 4h, 4w) -> (B, C/16, 4h * 2**num_upsamples, ...). Each of the two layers is a
    x2 transposed convolution while upsampling is still needed (ViT: two, 4h -> 16h = S), else
    a 3x3 convolution (LiteMedSAM, whose stage 1 is already at S: the fusion happens at S).
    """

    def __init__(self, *, in_channels: int, out_channels: int, num_upsamples: int) -> None:
        super().__init__()
        if not 0 <= num_upsamples <= 2:
            raise ValueError(f"the pixel decoder upsamples 0 to 2 times, not {num_upsamples}.")
        layers: list[nn.Module] = []
        channels = [in_channels, in_channels // 2, out_channels]
        for i in range(2):
            cin, cout = channels[i], channels[i + 1]
            if i < num_upsamples:
                layers.append(nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2))
            else:
                layers.append(nn.Conv2d(cin, cout, kernel_size=3, padding=1))
            layers += [LayerNorm2d(cout), nn.GELU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, stage2_features: Tensor, stage1_features: Tensor) -> Tensor:
        return self.layers(torch.cat([stage2_features, stage1_features], dim=1))


class Stage2Decoder(nn.Module):
    """Second decoder: prior-modulated two-way transformer + (hierarchical) pixel decoder."""

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_mask_tokens: int,
        output_size: int,
        cmattn: ClassBalancedMaskAttention | None,
        pixel_decoder: HierarchicalPixelDecoder | None,
        mask_image_to_token: bool = True,
    ) -> None:
        """
        Arguments:
          transformer_dim: C.
          transformer: the stage-2 two-way transformer.
          num_mask_tokens: T.
          output_size: S, the side of the stage-2 logits.
          cmattn: CMAttn block, or None (ablation).
          pixel_decoder: the hierarchical pixel decoder, or None (ablation): then stage 2
            predicts at 4h x 4w from its own features, bilinearly resized to S.
          mask_image_to_token: also modulate image-to-token attention by the prior.
        """
        super().__init__()
        self.output_size = output_size
        self.mask_tokens = nn.Embedding(num_mask_tokens, transformer_dim)
        self.transformer = transformer
        self.cmattn = cmattn
        self.output_upscaling = _upscaling(transformer_dim)
        self.pixel_decoder = pixel_decoder
        if pixel_decoder is not None:
            hyper_out, hyper_depth = transformer_dim // 16, 5
        else:
            hyper_out, hyper_depth = transformer_dim // 8, 3
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, hyper_out, hyper_depth)
            for _ in range(num_mask_tokens)
        )
        self.mask_image_to_token = mask_image_to_token

    def forward(
        self,
        image_embedding: Tensor,
        image_pe: Tensor,
        dense: Tensor,
        stage1: Stage1Output,
        prior: Tensor | None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """
        Arguments:
          image_embedding: (B, C, h, w) encoder output (noised in training if configured).
          image_pe, dense: (1, C, h, w).
          stage1: the stage-1 outputs (mask features for CMAttn, pixel features for the skip).
          prior: (B, T, h*w) class probabilities from stage 1, or None (no mask attention).
          labels: optional (B, H, W) ground truth for CMAttn's class-balanced noise.

        Returns:
          (B, T, S, S) stage-2 logits.
        """
        b, c, h, w = image_embedding.shape
        src = image_embedding + dense
        if self.cmattn is not None:
            src = self.cmattn(src, stage1.mask_features, labels)
        tokens = self.mask_tokens.weight.unsqueeze(0).expand(b, -1, -1)
        hs, keys = self.transformer(src, image_pe, tokens, prior, self.mask_image_to_token)
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        if self.pixel_decoder is not None:
            upscaled = self.pixel_decoder(upscaled, stage1.upscaled)
        logits = _predict_masks(self.output_hypernetworks_mlps, hs, upscaled)
        if logits.shape[-1] != self.output_size:
            logits = F.interpolate(
                logits, size=(self.output_size,) * 2, mode="bilinear", align_corners=False
            )
        return logits
