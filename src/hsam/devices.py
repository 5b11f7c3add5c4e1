"""Device selection shared by training and inference."""

from __future__ import annotations

import torch

from hsam.errors import ConfigError


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> the local GPU (``local_rank``) if available, else ``cpu``; otherwise
    ``torch.device(device)``.

    Raises:
        ConfigError: an unknown device string, or CUDA requested where it is not available.
    """
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'."
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} was requested but CUDA is not available here; use "
                "--device cpu (or auto)."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)."
            )
    return dev
