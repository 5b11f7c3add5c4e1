"""The only place where a `ModelConfig` becomes modules (SAM's build_sam pattern)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from hsam.config import ModelConfig
from hsam.errors import ConfigError
from hsam.io.weights import (
    LoadReport,
    WeightsIdentity,
    load_pretrained,
    read_state_dict,
    resolve_backbone_weights,
)
from hsam.modeling.backbones import VIT_SPECS, build_backbone
from hsam.modeling.cmattn import ClassBalancedMaskAttention
from hsam.modeling.decoders import HierarchicalPixelDecoder, Stage1Decoder, Stage2Decoder
from hsam.modeling.hsam import HSAM
from hsam.modeling.lora import inject_lora, inject_lora_linears
from hsam.modeling.prompt import PromptFreeEncoder
from hsam.modeling.transformer import TwoWayTransformer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderSpec:
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048


# SAM's decoder hyper-parameters; the tiny preset shrinks them for fast tests.
DECODER_SPECS = {"tiny": DecoderSpec(depth=2, num_heads=2, mlp_dim=64)}


def _two_way(
    spec: DecoderSpec, dim: int, cfg: ModelConfig, *, downsample: int, dropout: float
) -> TwoWayTransformer:
    return TwoWayTransformer(
        depth=spec.depth,
        embedding_dim=dim,
        num_heads=spec.num_heads,
        mlp_dim=spec.mlp_dim,
        attention_downsample_rate=downsample,
        order=cfg.block_order,
        dropout=dropout,
    )


def _validate(cfg: ModelConfig) -> None:
    if cfg.num_classes < 1:
        raise ConfigError(
            f"model.num_classes must be >= 1 (foreground classes), got {cfg.num_classes}."
        )
    if cfg.stages not in (1, 2):
        raise ConfigError(f"model.stages must be 1 or 2, got {cfg.stages}.")
    if cfg.lora_rank < 1:
        raise ConfigError(f"model.lora_rank must be >= 1, got {cfg.lora_rank}.")
    t = cfg.num_classes + 1
    if cfg.class_noise_std is not None and len(cfg.class_noise_std) != t:
        raise ConfigError(
            f"model.class_noise_std has {len(cfg.class_noise_std)} values; it needs one per "
            f"class including background ({t})."
        )


def _embedding_dim(backbone: nn.Module, name: str) -> int:
    return VIT_SPECS[name].out_chans if name in VIT_SPECS else 256


def build_hsam_network(cfg: ModelConfig) -> HSAM:
    """A randomly initialised H-SAM for `cfg`, before pretrained weights and LoRA."""
    _validate(cfg)
    try:
        encoder = build_backbone(cfg.backbone, cfg.image_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    dim = _embedding_dim(encoder, cfg.backbone)
    grid = cfg.image_size // encoder.patch_stride  # h = w
    spec = DECODER_SPECS.get(cfg.backbone, DecoderSpec())
    t = cfg.num_classes + 1
    prompt = PromptFreeEncoder(embed_dim=dim, image_embedding_size=(grid, grid))
    stage1 = Stage1Decoder(
        transformer_dim=dim,
        transformer=_two_way(spec, dim, cfg, downsample=2, dropout=0.0),  # SAM's decoder
        num_multimask_outputs=t - 1,
        iou_head_depth=3,
        iou_head_hidden_dim=dim,
    )
    stage2 = None
    if cfg.stages == 2:
        cmattn = None
        if cfg.cmattn != "off":
            cmattn = ClassBalancedMaskAttention(
                num_tokens=t,
                embedding_dim=dim,
                grid_size=min(grid, cfg.cmattn_grid or 32),
                mlp_dim=spec.mlp_dim,
                mode=cfg.cmattn,
                class_noise_std=cfg.class_noise_std,
            )
        pixel_decoder = None
        if cfg.hierarchical_pixel_decoder:
            # Stage 1 predicts at 4h; the pixel decoder brings stage 2 to S.
            num_upsamples = int(math.log2(cfg.image_size // (4 * grid)))
            pixel_decoder = HierarchicalPixelDecoder(
                in_channels=2 * (dim // 8), out_channels=dim // 16, num_upsamples=num_upsamples
            )
        # From scratch, stage 2 uses full-width attention (no downsampling) as the released
        # code's masked cross-attention does; started from stage 1 it takes SAM's shapes.
        downsample = 2 if cfg.stage2_init == "stage1" else 1
        stage2 = Stage2Decoder(
            transformer_dim=dim,
            transformer=_two_way(spec, dim, cfg, downsample=downsample, dropout=cfg.stage2_dropout),
            num_mask_tokens=t,
            output_size=cfg.image_size,
            cmattn=cmattn,
            pixel_decoder=pixel_decoder,
            mask_image_to_token=cfg.mask_attention_directions == "both",
        )
    if cfg.input_normalization == "backbone":
        mean, std = encoder.normalization()
    else:
        mean, std = torch.zeros(3), torch.ones(3)
    return HSAM(
        image_encoder=encoder,
        prompt_encoder=prompt,
        mask_decoder=stage1,
        stage2_decoder=stage2,
        image_size=cfg.image_size,
        pixel_mean=mean,
        pixel_std=std,
        mask_attention=cfg.mask_attention,
        stage2_embedding_noise=cfg.stage2_embedding_noise,
        fuse=cfg.fuse,
        test_input_size=cfg.test_input_size,
        input_resize=cfg.input_resize,
    )


def lora_unit_range(model: HSAM, cfg: ModelConfig) -> list[tuple[int, nn.Module]]:
    targets = model.image_encoder.lora_targets()
    n = len(targets) if cfg.lora_last_n is None else cfg.lora_last_n
    if not 0 <= n <= len(targets):
        raise ConfigError(
            f"model.lora_last_n={cfg.lora_last_n}, but {cfg.backbone} has {len(targets)} "
            "attention blocks (0 = no LoRA: the whole encoder frozen)."
        )
    return targets[len(targets) - n :]


def apply_lora_and_freeze(model: HSAM, cfg: ModelConfig) -> None:
    """Freeze the encoder, inject LoRA, and leave only LoRA/decoder/prompt params trainable."""
    model.image_encoder.requires_grad_(False)
    targets = lora_unit_range(model, cfg)
    if cfg.lora_layers == "all_linear":
        inject_lora_linears(
            [model.image_encoder.unit_module(index) for index, _, _, _ in targets],
            skip=[attn.qkv for _, attn, _, _ in targets],
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
        )
    inject_lora(
        [attn for _, attn, _, _ in targets],
        [(q, v) for _, _, q, v in targets],
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
    )
    model.prompt_encoder.requires_grad_(False)
    model.prompt_encoder.no_mask_embed.requires_grad_(True)
    # Frozen units before the first adapted block can be computed once and cached; without
    # LoRA (decoder-only) that is every unit, and the cache holds the final embedding.
    model.first_trainable_unit = targets[0][0] if targets else len(model.image_encoder.units())


def copy_stage1_into_stage2(model: HSAM) -> None:
    """Start stage 2's two-way transformer and x4 upscaling as copies of stage 1's
    (`model.stage2_init: stage1`). Its mask tokens, hypernetworks, CMAttn and pixel decoder
    have no stage-1 counterpart and stay as initialised."""
    stage1, stage2 = model.mask_decoder, model.stage2_decoder
    stage2.transformer.load_state_dict(stage1.transformer.state_dict())
    stage2.output_upscaling.load_state_dict(stage1.output_upscaling.state_dict())


@dataclass
class BuiltModel:
    model: HSAM
    weights: WeightsIdentity
    load_report: LoadReport | None
    # Seed of the random initialisation: it defines every frozen tensor that pretrained
    # weights do not (all of them for the tiny preset), so checkpoints record it.
    seed: int | None


def build_hsam(cfg: ModelConfig, *, pretrained: bool = True, seed: int | None = 0) -> BuiltModel:
    """Build H-SAM for `cfg`: network, pretrained backbone/decoder weights, LoRA, freezing.

    `pretrained=False` skips reading weights (parameter counting, tests); the tiny preset
    never has weights. `seed` fixes the random initialisation of the new parameters.
    """
    if seed is not None:
        torch.manual_seed(seed)
    model = build_hsam_network(cfg)
    report = None
    identity = WeightsIdentity(cfg.backbone, None, None)
    if pretrained and cfg.backbone != "tiny":
        identity = resolve_backbone_weights(cfg.backbone, cfg.backbone_weights)
        report = load_pretrained(model, read_state_dict(identity.path), source=identity.path)
    if cfg.stage2_init == "stage1" and model.stage2_decoder is not None:
        copy_stage1_into_stage2(model)
    apply_lora_and_freeze(model, cfg)
    return BuiltModel(model=model, weights=identity, load_report=report, seed=seed)
