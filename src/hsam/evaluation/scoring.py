"""One loop for every score: read case -> segment -> score -> rows.

:func:`evaluate_cases` is what ``hsam evaluate`` (:mod:`hsam.apps.evaluate`), the demo
(:mod:`hsam.apps.demo`), the few-shot benchmark (``benchmarks/fewshot.py``) and validation during
training (:func:`hsam.engine.trainer.validation_dice`) run. For each labelled
:class:`~hsam.data.Case` it segments the volume with every
:class:`~hsam.inference.predictor.Predictor` (several of them share one frozen encoder prefix per
slice, :func:`hsam.inference.predictor.predict_shared`), optionally hands each prediction to a
``save`` callback (which may return the labels to score instead, e.g. read back from the file it
wrote), and scores it in 3-D per class (:func:`hsam.evaluation.metrics.evaluate_case`: Dice, HD95,
NSD under both policies, rows for :func:`hsam.evaluation.reports.write_reports`; or the legacy Dice
alone). Checks of what the data should be (e.g. ``evaluate``'s class-count check) stay with the
callers.

Results come one :class:`CaseEvaluation` per case, as they are computed, so callers keep their
own progress bars, logs and reports; cases may be read lazily by a generator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hsam.data import Case
from hsam.errors import ConfigError, DataError
from hsam.evaluation.metrics import dice, evaluate_case
from hsam.evaluation.reports import case_rows
from hsam.inference.postprocess import postprocess_labels
from hsam.inference.predictor import Prediction, Predictor, check_postprocess, predict_shared
from hsam.inference.volume_check import VolumeWarning

if TYPE_CHECKING:  # the engine's cache type only; scoring does not depend on the engine
    from hsam.engine.prefix_cache import PrefixCache

__all__ = ["CaseEvaluation", "CaseScore", "SaveCallback", "class_names", "evaluate_cases"]

#: ``save(case, predictor index, prediction)``: called with each prediction before it is
#: scored; returns the labels to score (e.g. read back from the file it wrote), or None to
#: score ``prediction.labels``.
SaveCallback = Callable[[Case, int, Prediction], "np.ndarray | None"]


@dataclass(frozen=True)
class CaseScore:
    """One predictor's score on one case (of one extra post-processing, if asked).

    Attributes:
        predictor: index of the predictor in the sequence given to :func:`evaluate_cases`.
        postprocess: the extra post-processing scored, or None (the predictor's own output).
        labels: ``(D, H, W)`` labels that were scored.
        dice: legacy Dice of classes ``1..K``, in order.
        result: :func:`hsam.evaluation.metrics.evaluate_case`'s result (None with
            ``metrics="dice"``).
        rows: the case's per-class report rows (:func:`hsam.evaluation.reports.case_rows`;
            empty with ``metrics="dice"``).
        volume_warnings: predicted classes far outside the training size range.
    """

    predictor: int
    postprocess: str | None
    labels: np.ndarray
    dice: list[float]
    result: dict[str, Any] | None
    rows: list[dict[str, Any]]
    volume_warnings: list[VolumeWarning]


@dataclass(frozen=True)
class CaseEvaluation:
    """Every predictor's score on one case; ``seconds`` from reading it to the last score."""

    case: Case
    scores: list[CaseScore]
    seconds: float


def class_names(case: Case, predictor: Predictor) -> dict[int, str]:
    """Names of classes ``1..K``: the case's when it names them all, else the predictor's."""
    k = predictor.num_classes
    names = {c: n for c, n in case.label_names.items() if 0 < c <= k}
    if len(names) == k:
        return names
    return {c: n for c, n in predictor.label_names.items() if c > 0}


def _predict(
    predictors: Sequence[Predictor],
    case: Case,
    *,
    shared: bool,
    prefix_cache: PrefixCache | None,
) -> list[Prediction]:
    if shared:
        return predict_shared(predictors, case.image, already=case.intensity)
    (predictor,) = predictors
    if prefix_cache is None:
        return [predictor.predict(case.image, already=case.intensity)]
    image = predictor.to_model_range(case.image, already=case.intensity)
    features = prefix_cache.volume_features(
        predictor.model,
        case.case_id,
        image,
        batch_size=predictor.batch_size,
        bf16=predictor.precision == "bf16",
    )
    return [Prediction(predictor.predict_from_prefix(features, image.shape[1:]), None, image)]


def evaluate_cases(
    predictors: Predictor | Sequence[Predictor],
    cases: Iterable[Case],
    *,
    metrics: Literal["all", "dice"] = "all",
    nsd_tolerance_mm: float | Sequence[float] = 2.0,
    postprocess: Sequence[str] | None = None,
    volume_factor: float | None = None,
    save: SaveCallback | None = None,
    prefix_cache: PrefixCache | None = None,
) -> Iterator[CaseEvaluation]:
    """Segment and score every labelled case; one :class:`CaseEvaluation` per case, in order.

    Args:
        predictors: one :class:`~hsam.inference.predictor.Predictor`, or several (a sequence): those
            sharing a frozen encoder compute its prefix once per slice.
        cases: labelled cases with raw images (each predictor applies its intensity policy,
            taking ``Case.intensity`` into account) or, for predictors whose policy is None,
            images already in ``[0, 1]``.
        metrics: ``"all"`` (:func:`hsam.evaluation.metrics.evaluate_case` and report rows) or
            ``"dice"`` (the legacy Dice alone, no surface distances: validation during training).
        nsd_tolerance_mm: NSD tolerance in mm (one value, or one per class 1..K).
        postprocess: post-processings (:mod:`hsam.inference.postprocess`) to score, each applied to
            every prediction (one :class:`CaseScore` each); None scores the predictions as they are.
        volume_factor: predicted-size check of each prediction (:mod:`hsam.inference.volume_check`,
            logged and recorded per score); None turns it off.
        save: called with each prediction before it is scored (:data:`SaveCallback`).
        prefix_cache: a training run's cache of the validation volumes' encoder prefix, keyed
            by case id (one predictor only).

    Raises:
        DataError: an unlabelled case, label values above a predictor's K. ConfigError: a
        prefix cache with several predictors, or not built for the predictor's model.
    """
    shared = not isinstance(predictors, Predictor)
    group = list(predictors) if shared else [predictors]  # type: ignore[list-item]
    if prefix_cache is not None and len(group) != 1:
        raise ConfigError(
            "a prefix cache of validation volumes serves one predictor only; score the "
            "predictors one at a time, or pass them without the cache"
        )
    if prefix_cache is not None and prefix_cache.start_unit != group[0].prefix_units:
        raise ConfigError(
            f"the prefix cache ends at encoder unit {prefix_cache.start_unit}, but the model's "
            f"first LoRA unit is {group[0].prefix_units}; build the cache for this model"
        )
    methods: list[str | None] = [None]
    if postprocess is not None:
        methods = [check_postprocess(m) for m in postprocess]
    it = iter(cases)
    while True:
        start = time.perf_counter()
        case = next(it, None)  # timed from the read of the case (a lazy iterable reads here)
        if case is None:
            return
        if case.label is None:
            raise DataError(
                f"case {case.case_id} ({case.source}) has no label map; scoring needs labelled "
                "cases (use predict for unlabelled ones)"
            )
        predictions = _predict(group, case, shared=shared, prefix_cache=prefix_cache)
        scores = []
        for index, (predictor, prediction) in enumerate(zip(group, predictions, strict=True)):
            labels = prediction.labels
            if save is not None:
                saved = save(case, index, prediction)
                labels = labels if saved is None else saved
            k = predictor.num_classes
            names = class_names(case, predictor)
            found = predictor.check_volumes(
                labels, f"case {case.case_id}", factor=volume_factor, label_names=names
            )
            for method in methods:
                scored = labels if method is None else postprocess_labels(labels, k, method)
                result: dict[str, Any] | None = None
                rows: list[dict[str, Any]] = []
                if metrics == "dice":
                    dices = [dice(scored == c, case.label == c, "legacy") for c in range(1, k + 1)]
                else:
                    result = evaluate_case(scored, case.label, k, case.spacing, nsd_tolerance_mm)
                    dices = [c["legacy"]["dice"] for c in result["classes"]]
                    warnings = {w.class_index: w.detail for w in found}
                    rows = case_rows(case.case_id, result, names, volume_warnings=warnings)
                scores.append(CaseScore(index, method, scored, dices, result, rows, found))
        yield CaseEvaluation(case, scores, time.perf_counter() - start)
