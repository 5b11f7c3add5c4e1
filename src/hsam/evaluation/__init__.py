"""Evaluation: metric functions (:mod:`~hsam.evaluation.metrics`), report files
(:mod:`~hsam.evaluation.reports`) and the scoring loop (:mod:`~hsam.evaluation.scoring`).
Import the modules themselves; this package imports nothing."""
