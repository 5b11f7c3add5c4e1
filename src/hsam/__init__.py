"""H-SAM: prompt-free hierarchical-decoding adaptation of SAM for medical image segmentation.

The public Python API (see the README's "Python API"):

- build a model: :class:`ModelConfig`, :func:`build_hsam`;
- load a checkpoint: :class:`Predictor` (``Predictor.from_checkpoint``), :func:`load_checkpoint`;
- predict a volume: ``predictor(volume)`` / :meth:`Predictor.predict`, :func:`predict_files`
  (``hsam predict``), :func:`read_volume` / :func:`read_dataset` to read scans and cases;
- evaluate: :func:`evaluate_cases` (the scoring loop), :func:`evaluate_checkpoint`
  (``hsam evaluate``, with reports);
- metrics: :func:`evaluate_case`, :func:`dice`, :func:`hd95`, :func:`nsd`.

The names are imported on first use, so ``import hsam`` (and the CLI's start) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "ModelConfig": "hsam.config",
    "build_hsam": "hsam.build",
    "load_checkpoint": "hsam.io.checkpoint",
    "Predictor": "hsam.inference.predictor",
    "Prediction": "hsam.inference.predictor",
    "predict_files": "hsam.apps.predict",
    "read_volume": "hsam.io.images",
    "read_dataset": "hsam.data",
    "evaluate_cases": "hsam.evaluation.scoring",
    "evaluate_checkpoint": "hsam.apps.evaluate",
    "evaluate_case": "hsam.evaluation.metrics",
    "dice": "hsam.evaluation.metrics",
    "hd95": "hsam.evaluation.metrics",
    "nsd": "hsam.evaluation.metrics",
}

__all__ = [
    "ModelConfig",
    "Prediction",
    "Predictor",
    "__version__",
    "build_hsam",
    "dice",
    "evaluate_case",
    "evaluate_cases",
    "evaluate_checkpoint",
    "hd95",
    "load_checkpoint",
    "nsd",
    "predict_files",
    "read_dataset",
    "read_volume",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports lazily
    from hsam.apps.evaluate import evaluate_checkpoint
    from hsam.apps.predict import predict_files
    from hsam.build import build_hsam
    from hsam.config import ModelConfig
    from hsam.data import read_dataset
    from hsam.evaluation.metrics import dice, evaluate_case, hd95, nsd
    from hsam.evaluation.scoring import evaluate_cases
    from hsam.inference.predictor import Prediction, Predictor
    from hsam.io.checkpoint import load_checkpoint
    from hsam.io.images import read_volume


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hsam' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
