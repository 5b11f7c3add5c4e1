"""Self-describing H-SAM checkpoints: config + metadata + trainable tensors only.

One file holds the resolved config, the backbone identity (name + sha256 of its weights),
library versions, caller metadata (label names, intensity preprocessing, split hash, epoch,
metrics) and the trainable tensors (LoRA, decoders, no-mask embedding). Loading rebuilds the
model from the stored config, checks the backbone weights are the same file, and loads the
tensors strictly. Writes are atomic: a temp file in the same folder, then a rename.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import hsam
from hsam.build import BuiltModel, build_hsam
from hsam.config import ModelConfig, from_dict
from hsam.errors import CheckpointError, ConfigError
from hsam.io.atomic import atomic_output
from hsam.io.weights import load_torch_file

logger = logging.getLogger(__name__)

FORMAT = "hsam/1"
#: Format of ``checkpoints/last.pt``, the state `hsam train --resume` continues from.
RESUME_FORMAT = "hsam-resume/1"
#: What `save_checkpoint` writes, with the type each entry must have.
_PAYLOAD_TYPES = {
    "config": dict,
    "backbone": dict,
    "versions": dict,
    "meta": dict,
    "state_dict": dict,
}


def clean_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip DistributedDataParallel (`module.`) and torch.compile (`_orig_mod.`) prefixes."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Tensors of the parameters that require grad (everything else is rebuilt on load)."""
    return {
        name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad
    }


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file beside `path`, fsync, then rename over it."""
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        try:
            torch.save(obj, handle)
        except RuntimeError as err:
            # Ctrl-C inside torch.save surfaces as the zip writer's RuntimeError on exit; give
            # the interrupt back so the CLI stops with its one line (the temp file is dropped).
            if isinstance(err.__context__, KeyboardInterrupt):
                raise err.__context__ from None
            raise
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(
    path: str | Path,
    built: BuiltModel,
    *,
    config: dict[str, Any],
    meta: dict[str, Any] | None = None,
) -> None:
    """Write `built.model`'s trainable tensors with `config` (must contain `model`)."""
    if "model" not in config:
        raise ValueError("config must contain the 'model' section")
    model = built.model
    frozen_missing = [
        n for n, p in model.named_parameters() if not p.requires_grad and "lora_" in n
    ]
    if frozen_missing:
        raise CheckpointError(
            f"LoRA parameters are frozen and would not be saved: {frozen_missing[:5]}"
        )
    payload = {
        "format": FORMAT,
        "config": config,
        "backbone": {
            "name": built.weights.name,
            "sha256": built.weights.sha256,
            "init_seed": built.seed,
        },
        "versions": {"hsam": hsam.__version__, "torch": str(torch.__version__)},
        "meta": meta or {},
        "state_dict": trainable_state_dict(model),
    }
    atomic_torch_save(payload, path)
    logger.info("saved checkpoint %s", path)


@dataclass
class LoadedCheckpoint:
    built: BuiltModel
    config: dict[str, Any]
    model_config: ModelConfig
    meta: dict[str, Any]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The payload of an hsam checkpoint, with every entry `save_checkpoint` writes present
    and of the right type (CheckpointError naming what is wrong otherwise)."""
    payload = load_torch_file(path, "checkpoint")
    if isinstance(payload, dict) and payload.get("format") == RESUME_FORMAT:
        raise CheckpointError(
            f"{path} is a training resume state (last.pt, read by `hsam train --resume`), not "
            "a model checkpoint; use best.pt or final.pt from the same checkpoints folder."
        )
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an hsam checkpoint (format {FORMAT!r}); hsam checkpoints are "
            "written by `hsam train`."
        )
    problems = [
        f"{key!r} is missing" if key not in payload else f"{key!r} is not a {kind.__name__}"
        for key, kind in _PAYLOAD_TYPES.items()
        if not isinstance(payload.get(key), kind)
    ]
    if not problems and not isinstance(payload["config"].get("model"), dict):
        problems.append("'config' has no 'model' section")
    if not problems and not all(isinstance(v, Tensor) for v in payload["state_dict"].values()):
        problems.append("'state_dict' holds values that are not tensors")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} is incomplete or damaged ({'; '.join(problems)}); use a "
            "checkpoint written by `hsam train` (checkpoints/best.pt or final.pt)."
        )
    return payload


def load_trainable_state(model: nn.Module, state: dict[str, Tensor], *, source: str) -> None:
    """Load trainable tensors strictly: every trainable parameter, nothing else, same shapes."""
    state = clean_state_dict(state)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    misshaped = sorted(
        f"{n}: checkpoint {tuple(state[n].shape)} vs model {tuple(params[n].shape)}"
        for n in expected & set(state)
        if state[n].shape != params[n].shape
    )
    if missing or unexpected or misshaped:
        lines = [f"checkpoint {source} does not match the model built from its config:"]
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
        ):
            if keys:
                more = f" ... ({len(keys) - 10} more)" if len(keys) > 10 else ""
                lines.append(f"{label} keys: {', '.join(keys[:10])}{more}")
        raise CheckpointError("\n  ".join(lines))
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def load_checkpoint(
    path: str | Path, *, backbone_weights: str | None = None, pretrained: bool = True
) -> LoadedCheckpoint:
    """Rebuild the model stored in `path` and load its trainable tensors.

    `backbone_weights` overrides the stored path of a SAM checkpoint (e.g. on another
    machine); its sha256 must equal the one recorded at training time.
    """
    payload = read_checkpoint(path)
    config = payload["config"]
    try:
        model_cfg = from_dict(ModelConfig, config["model"], "checkpoint config.model")
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path} has an unusable config: {exc}") from exc
    if backbone_weights is not None:
        model_cfg.backbone_weights = backbone_weights
    built = build_hsam(model_cfg, pretrained=pretrained, seed=payload["backbone"].get("init_seed"))
    stored_sha = payload["backbone"].get("sha256")
    if pretrained and stored_sha and built.weights.sha256 != stored_sha:
        raise CheckpointError(
            f"checkpoint {path} was trained on backbone weights with sha256 {stored_sha}, but "
            f"{built.weights.path} has sha256 {built.weights.sha256}. Pass the same file with "
            "--backbone-weights."
        )
    load_trainable_state(built.model, payload["state_dict"], source=str(path))
    return LoadedCheckpoint(built, config, model_cfg, payload["meta"])
