"""The H-SAM network: normalise -> encode -> stage 1 -> prior -> stage 2 -> fused output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hsam.modeling.decoders import Stage1Decoder, Stage2Decoder
from hsam.modeling.prompt import PromptFreeEncoder


@dataclass(frozen=True)
class HSAMOutput:
    """Outputs of one forward pass; T = K + 1 classes, background first."""

    stage1_logits: Tensor  # (B, T, 4h, 4w)
    stage2_logits: Tensor | None  # (B, T, S, S); None for the one-stage (SAMed) model
    probabilities: Tensor  # (B, T, S, S) fused class probabilities


class HSAM(nn.Module):
    """Prompt-free SAM with a LoRA-adapted frozen encoder and a two-stage decoder."""

    #: Index into ``image_encoder.units()`` of the first unit with trainable (LoRA) parameters.
    #: The units before it are frozen, so their output may be computed once and cached (the
    #: encoder-prefix cache); ``len(units())`` when the whole encoder is frozen. 0 (nothing
    #: cacheable: a new encoder is trainable throughout) until
    #: :func:`hsam.build.apply_lora_and_freeze` sets it.
    first_trainable_unit: int

    def __init__(
        self,
        *,
        image_encoder: nn.Module,
        prompt_encoder: PromptFreeEncoder,
        mask_decoder: Stage1Decoder,
        stage2_decoder: Stage2Decoder | None,
        image_size: int,
        pixel_mean: Tensor,
        pixel_std: Tensor,
        mask_attention: bool = True,
        stage2_embedding_noise: float = 0.0,
        fuse: Literal["probabilities", "logits"] = "probabilities",
        test_input_size: int | None = None,
        input_resize: Literal["stretch", "pad"] = "stretch",
    ) -> None:
        """
        Arguments:
          image_encoder: a backbone (see hsam.modeling.backbones), LoRA already injected.
          prompt_encoder: dense PE and the no-mask embedding.
          mask_decoder: stage 1 (SAM's decoder with T mask tokens).
          stage2_decoder: stage 2, or None for the one-stage SAMed baseline.
          image_size: S.
          pixel_mean, pixel_std: (3,) normalisation for images in [0, 1].
          mask_attention: feed the stage-1 prior to stage 2's cross-attention.
          stage2_embedding_noise: training-only noise on stage 2's input, std = this x the
            embedding's global range (released code: 0.2).
          fuse: average the stages' probabilities (paper) or logits (released code).
          test_input_size: read by slice-wise inference (hsam.inference.slicewise), which resamples
            slices through this side first (released code: 224); None = off.
          input_resize: read by slice-wise inference, which brings slices to S x S the way
            training did: "stretch" (resize) or "pad" (longer side to S, aspect kept, zeros
            below and to the right).
        """
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.stage2_decoder = stage2_decoder
        self.image_size = image_size
        self.register_buffer("pixel_mean", pixel_mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", pixel_std.view(1, -1, 1, 1), persistent=False)
        self.mask_attention = mask_attention
        self.stage2_embedding_noise = stage2_embedding_noise
        self.fuse = fuse
        self.test_input_size = test_input_size
        self.input_resize = input_resize
        self.first_trainable_unit = 0
        # A new nn.Module starts in training mode; the frozen encoder must not, even before
        # anyone calls train()/eval() (a prefix cache built right after construction).
        self.image_encoder.eval()

    def train(self, mode: bool = True) -> HSAM:
        """Set training mode for the decoders; the frozen encoder always stays in eval mode,
        so its BatchNorm layers (TinyViT) use their pretrained statistics and never update
        them, and training-time encoder behaviour equals inference."""
        super().train(mode)
        self.image_encoder.eval()
        return self

    def _frozen_encoder(self) -> nn.Module:
        """The encoder, forced back to eval mode if a caller switched it to training (its
        BatchNorm statistics must never be batch statistics or change)."""
        if self.image_encoder.training:
            self.image_encoder.eval()
        return self.image_encoder

    @property
    def num_tokens(self) -> int:
        """T = K + 1: the class (mask) tokens, one per output channel, background first.
        Configs, cases and :class:`hsam.inference.predictor.Predictor` call K ``num_classes``; the
        model's count includes background, so it has its own name."""
        return self.mask_decoder.num_mask_tokens

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 1 or 3, S, S) in [0, 1] -> (B, 3, S, S) normalised for the encoder."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (B, 1 or 3, S, S), got {tuple(images.shape)}.")
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images must be {self.image_size} x {self.image_size} (the model's "
                f"image_size), got {tuple(images.shape[-2:])}; resize them first."
            )
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return (images - self.pixel_mean) / self.pixel_std

    def encode(self, images: Tensor, *, start_unit: int = 0) -> Tensor:
        """Image embedding (B, C, h, w). With `start_unit > 0`, `images` are cached features
        of the encoder's first `start_unit` units (see `encode_prefix`)."""
        x = self.preprocess(images) if start_unit == 0 else images
        for unit in self._frozen_encoder().units()[start_unit:]:
            x = unit(x)
        return x

    @torch.no_grad()
    def encode_prefix(self, images: Tensor, stop_unit: int) -> Tensor:
        """Features after the first `stop_unit` encoder units (frozen, so cacheable)."""
        x = self.preprocess(images)
        for unit in self._frozen_encoder().units()[:stop_unit]:
            x = unit(x)
        return x

    def decode(self, embedding: Tensor, labels: Tensor | None = None) -> HSAMOutput:
        """
        Arguments:
          embedding: (B, C, h, w) encoder output.
          labels: optional (B, S, S) integer ground truth, used only in training mode by
            CMAttn's class-balanced noise.
        """
        pe = self.prompt_encoder.dense_pe()
        dense = self.prompt_encoder.dense_embedding()
        stage1 = self.mask_decoder(embedding, pe, dense)
        size = (self.image_size, self.image_size)
        stage1_up = F.interpolate(stage1.logits, size=size, mode="bilinear", align_corners=False)
        if self.stage2_decoder is None:
            return HSAMOutput(stage1.logits, None, torch.softmax(stage1_up, dim=1))

        prior = None
        if self.mask_attention:
            # Learnable prior: not detached, so the stage-2 loss also trains stage 1.
            grid = F.interpolate(
                stage1.logits, size=embedding.shape[-2:], mode="bilinear", align_corners=False
            )
            prior = torch.softmax(grid, dim=1).flatten(2)  # (B, T, h*w)
        stage2_input = embedding
        if self.training and self.stage2_embedding_noise > 0:
            spread = embedding.max() - embedding.min()
            stage2_input = embedding + torch.randn_like(embedding) * (
                self.stage2_embedding_noise * spread
            )
        logits2 = self.stage2_decoder(stage2_input, pe, dense, stage1, prior, labels)
        if self.fuse == "logits":
            probs = torch.softmax((stage1_up + logits2) / 2, dim=1)
        else:
            probs = (torch.softmax(stage1_up, dim=1) + torch.softmax(logits2, dim=1)) / 2
        return HSAMOutput(stage1.logits, logits2, probs)

    def forward(
        self, images: Tensor, labels: Tensor | None = None, *, start_unit: int = 0
    ) -> HSAMOutput:
        """
        Arguments:
          images: (B, 1 or 3, S, S) intensities in [0, 1], or with `start_unit > 0` the
            cached output of the encoder's first `start_unit` units (`encode_prefix`).
          labels: optional (B, S, S) ground truth for CMAttn's training-only noise.
        """
        return self.decode(self.encode(images, start_unit=start_unit), labels)
