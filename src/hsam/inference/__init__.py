"""Inference: slice-wise prediction of volumes (:mod:`~hsam.inference.slicewise`), the
:class:`~hsam.inference.predictor.Predictor`, post-processing and the predicted-size check.
Import the modules themselves; this package imports nothing (so the CLI starts light)."""
