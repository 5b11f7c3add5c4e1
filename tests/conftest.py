from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from hsam.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("HSAM_SHARED_DATA", REPO / ".." / "shared" / "data")).resolve()


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(backbone="tiny", image_size=64, num_classes=3, lora_rank=2)


def official_layout_tiny_sam(pretrain_size: int = 128) -> Sam:
    """A SAM in segment-anything's own classes/key layout with the tiny preset's sizes,
    trained-resolution `pretrain_size` (so loading at 64 must resize pos-embed/rel-pos)."""
    grid = pretrain_size // 16
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=pretrain_size,
            patch_size=16,
            embed_dim=32,
            depth=2,
            num_heads=2,
            mlp_ratio=4,
            out_chans=32,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=2,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=32,
            image_embedding_size=(grid, grid),
            input_image_size=(pretrain_size, pretrain_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2),
            transformer_dim=32,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
    )


@pytest.fixture
def tiny_sam_checkpoint(tmp_path) -> Path:
    torch.manual_seed(1)
    sam = official_layout_tiny_sam()
    with torch.no_grad():
        for p in sam.parameters():
            p.normal_(0, 0.05)  # non-trivial values so equality checks mean something
    path = tmp_path / "tiny_sam.pth"
    torch.save(sam.state_dict(), path)
    return path
