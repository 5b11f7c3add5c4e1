"""Parameter accounting per component, and the identity of the backbone weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hsam.build import build_hsam
from hsam.config import ModelConfig, to_dict
from hsam.io.weights import WeightsIdentity, resolve_backbone_weights
from hsam.modeling.hsam import HSAM


@dataclass(frozen=True)
class Count:
    total: int
    trainable: int


def _count(params: list[nn.Parameter]) -> Count:
    return Count(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
    )


def parameter_report(model: HSAM) -> dict[str, Count]:
    """Parameter counts: encoder (frozen part), LoRA, prompt, stage 1, stage 2 and its parts."""
    encoder = list(model.image_encoder.named_parameters())
    report = {
        "image_encoder_frozen": _count([p for n, p in encoder if "lora_" not in n]),
        "lora": _count([p for n, p in encoder if "lora_" in n]),
        "prompt_encoder": _count(list(model.prompt_encoder.parameters())),
        "stage1_decoder": _count(list(model.mask_decoder.parameters())),
    }
    stage2 = model.stage2_decoder
    if stage2 is not None:
        report["stage2_decoder"] = _count(list(stage2.parameters()))
        parts = {
            "stage2.cmattn": stage2.cmattn,
            "stage2.transformer": stage2.transformer,
            "stage2.pixel_decoder": stage2.pixel_decoder,
            "stage2.hypernetworks": stage2.output_hypernetworks_mlps,
        }
        for name, module in parts.items():
            if module is not None:
                report[name] = _count(list(module.parameters()))
    report["total"] = _count(list(model.parameters()))
    return report


def model_info(cfg: ModelConfig, *, resolve_weights: bool = True) -> dict[str, Any]:
    """Counts for `cfg` (random init, weights are not read) and the weights' identity."""
    # Counting needs shapes only; TinyViT's constructor reads values, so it is built for real.
    device = "cpu" if cfg.backbone == "litemedsam" else "meta"
    with torch.device(device):
        model = build_hsam(cfg, pretrained=False).model
    identity = WeightsIdentity(cfg.backbone, cfg.backbone_weights, None)
    if resolve_weights and (cfg.backbone == "litemedsam" or cfg.backbone_weights):
        identity = resolve_backbone_weights(cfg.backbone, cfg.backbone_weights)
    counts = parameter_report(model)
    return {
        "model": to_dict(cfg),
        "backbone_weights": {
            "name": identity.name,
            "path": identity.path,
            "sha256": identity.sha256,
        },
        "parameters": {k: {"total": v.total, "trainable": v.trainable} for k, v in counts.items()},
    }


def format_info(info: dict[str, Any]) -> str:
    """Human-readable table of `model_info`'s result."""
    m = info["model"]
    w = info["backbone_weights"]
    lines = [
        f"H-SAM  backbone={m['backbone']}  S={m['image_size']}  K={m['num_classes']}  "
        f"rank={m['lora_rank']}  stages={m['stages']}  cmattn={m['cmattn']}",
        f"backbone weights: {w['path'] or 'not given'}  sha256={w['sha256'] or '-'}",
        f"{'component':<24}{'total':>16}{'trainable':>16}",
    ]
    for name, c in info["parameters"].items():
        lines.append(f"{name:<24}{c['total']:>16,}{c['trainable']:>16,}")
    total = info["parameters"]["total"]["total"]
    lines.append(f"total: {total / 1e6:.2f} M parameters")
    return "\n".join(lines)
