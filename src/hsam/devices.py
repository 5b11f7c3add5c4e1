"""Device selection shared by training and inference."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import sys

import torch

from hsam.errors import ConfigError

logger = logging.getLogger(__name__)

# glibc mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


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


PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs on bf16 hardware here: a CUDA GPU with bf16 units, or a CPU
    that oneDNN runs bf16 on (AVX-512/AMX). Elsewhere it is emulated: on an AVX2-only CPU the
    LiteMedSAM encoder ran ~10x slower in bf16 than in fp32."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        try:  # oneDNN's own check; a private op, so a build without it counts as no support
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"fp32"`` or ``"bf16"`` for `device`: ``"auto"`` is bf16 where the hardware has it
    (:func:`native_bf16`), else fp32. An explicit bf16 without hardware support is kept, with a
    warning that it will be slow.

    Raises:
        ConfigError: not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if precision == "auto":
        resolved = "bf16" if native_bf16(device) else "fp32"
        logger.info("precision auto: %s on %s", resolved, device)
        return resolved
    if precision == "bf16" and not native_bf16(device):
        logger.warning(
            "bf16 was requested but %s has no native bf16 support: autocast emulates it, "
            "about 10x slower than fp32 on an AVX2 CPU. Use precision auto (or fp32).",
            device,
        )
    return precision


def check_compile_supported(device: torch.device) -> None:
    """Fail early, with what to do, where `torch.compile` could only fail at the first step.

    Raises:
        ConfigError: on CPU without a C++ compiler (inductor generates and builds C++ there).
    """
    if device.type != "cpu":
        return
    candidates = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    if not any(shutil.which(c) for c in candidates if c):
        raise ConfigError(
            "train.compile=true on CPU needs a C++ compiler (g++ or clang++, or $CXX) for "
            "torch.compile's inductor backend; install one or set train.compile=false."
        )


def configure_cpu_allocator(
    *,
    mmap_threshold_bytes: int = 1 << 30,
    keep_free_bytes: int = 8 << 30,
    top_pad_bytes: int = 256 << 20,
) -> bool:
    """Let glibc's malloc keep freed activation memory for reuse instead of returning it.

    By default glibc serves every allocation above a few MiB with a fresh `mmap` (and
    `munmap`s it when freed) and trims the heap top whenever 128 KiB are free, so each forward
    pass page-faults its activations in again: a large share of a LiteMedSAM bf16 step's CPU
    time goes to the kernel (docs/benchmarks.json, rows "fast bf16" vs "fast bf16 + malloc":
    their step time and `sys_fraction`, rerun by benchmarks/bench_model.py). Raising
    the mmap and trim thresholds, padding heap growth and using a single arena keeps it.
    Peak RSS barely changes (the memory was needed at the peak anyway); it is just not given
    back between steps.

    Process-wide and irreversible; `hsam`'s commands call it at start-up. Returns False (and
    changes nothing) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = all(
        bool(mallopt(option, int(value)))
        for option, value in (
            (_M_MMAP_THRESHOLD, mmap_threshold_bytes),
            (_M_TRIM_THRESHOLD, keep_free_bytes),
            (_M_TOP_PAD, top_pad_bytes),
            # One arena: other threads' arenas are capped at 64 MiB heaps, so their large
            # blocks would still be mmap'd and unmapped each step.
            (_M_ARENA_MAX, 1),
        )
    )
    logger.debug("glibc malloc configured to keep freed memory: %s", ok)
    return ok
