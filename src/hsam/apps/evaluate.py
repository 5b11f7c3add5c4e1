"""`hsam evaluate`: score a checkpoint on labelled volumes with the field's metrics.

For every case of the chosen split, :func:`hsam.evaluation.scoring.evaluate_cases` (the loop shared
with the demo, the few-shot benchmark and validation during training) maps the image to ``[0, 1]``
with the checkpoint's intensity policy (the reader's own preprocessing, ``Case.intensity``, is
taken into account), segments it slice by slice along axis 0 with a
:class:`hsam.inference.predictor.Predictor` (every slice), and scores it in 3-D per class with
:func:`hsam.evaluation.metrics.evaluate_case` (Dice, HD95, NSD under the ``legacy`` and ``strict``
policies, with the case's voxel spacing). Reports
(:func:`hsam.evaluation.reports.write_reports`): ``per_case.csv``, ``summary.json`` (per-class and
mean metrics, both policies, bootstrap CIs) and ``table.md`` (shaped like H-SAM's Table 1), plus
``evaluation.json`` (what was evaluated: checkpoint, data, split, case ids, stage, intensity
policy, versions) and, with ``save_predictions``, ``predictions/<case>.nii.gz`` label maps on the
case's ``(D, H, W)`` grid with its spacing (and origin/direction where the reader knows them).

Predicted-size check (:mod:`hsam.inference.volume_check`): where the checkpoint records each class's
range of volume fractions over its training cases, a predicted class far outside it is logged as a
WARNING naming the case, and recorded in the ``volume_warning`` column of ``per_case.csv``, the
``volume_warnings`` list of ``summary.json`` (and a section of ``table.md``), and per case in
``evaluation.json`` (``cases[i].volume_warnings``; the range and factor under ``volume_check``).

Data selection (``data`` argument):

* ``None``: the checkpoint's own ``config["data"]`` (the run it was trained with);
* a run-config YAML file: its ``data`` section (``format``, ``root``, ``test_list``); relative
  paths are taken as given (relative to the working directory, as ``hsam train`` does);
* a dataset folder: ``format`` given, or detected from the layout (:func:`detect_format`).

Splits (``split``): ``"test"`` -- ``data.test_list`` of a config, else the folder's
``test.list`` / ``splits/test.txt``; ``"val"`` -- the validation ids of the run's split manifest
(checkpoint ``meta["manifest"]`` / ``meta["split_manifest"]``) for config-driven data, else the
folder's ``split_manifest.json`` / ``splits/val.txt`` / ``val.list``; ``"all"`` -- every case of
the folder; or a path to a list file (one id a line).

Nothing is written before every case has been scored: existing outputs are refused up front
(unless ``overwrite``), predictions are staged in a hidden folder inside ``out_dir``, and each
report is written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import hsam
from hsam.config import DataConfig, check_legacy_data_num_classes, from_dict, load_run_config
from hsam.data import Case, list_cases, read_dataset, read_list
from hsam.data.formats import FORMATS, detect_format
from hsam.errors import CheckpointError, ConfigError, DataError
from hsam.evaluation.reports import write_reports
from hsam.evaluation.scoring import evaluate_cases
from hsam.inference.predictor import InferenceOptions, Prediction, Predictor, check_volume_factor
from hsam.inference.volume_check import DEFAULT_FACTOR
from hsam.io.atomic import (
    atomic_write_text,
    check_writable_folder,
    make_staging_dir,
    remove_stale_staging_dirs,
)
from hsam.io.images import Geometry, refuse_existing, write_label_volume

logger = logging.getLogger(__name__)

EVALUATION_FORMAT = "hsam-evaluation/1"
REPORT_FILES = ("per_case.csv", "summary.json", "table.md")
INFO_FILE = "evaluation.json"
PREDICTIONS_DIR = "predictions"
PREDICTION_EXTENSION = ".nii.gz"


# --------------------------------------------------------------------------------------------
# data selection
# --------------------------------------------------------------------------------------------
def _manifest_val(meta: dict[str, Any]) -> list[str]:
    for key in ("manifest", "split_manifest"):
        manifest = meta.get(key)
        if isinstance(manifest, dict) and manifest.get("val"):
            return [str(i) for i in manifest["val"]]
    return []


def _folder_split(root: Path, split: str) -> list[str] | None:
    """Ids of ``split`` ("test"/"val") from the list files of a dataset folder, or None."""
    manifest = root / "split_manifest.json"
    if split == "val" and manifest.is_file():
        try:
            ids = json.loads(manifest.read_text()).get("val") or []
        except (json.JSONDecodeError, AttributeError) as exc:
            raise DataError(f"{manifest} is not a valid split manifest ({exc})") from exc
        if ids:
            return [str(i) for i in ids]
    for name in (f"splits/{split}.txt", f"{split}.list", f"{split}.txt"):
        path = root / name
        if path.is_file():
            return read_list(path)
    return None


def resolve_split(
    split: str,
    *,
    fmt: str,
    root: Path,
    test_list: str | None = None,
    meta: dict[str, Any] | None = None,
    from_config: bool = False,
) -> tuple[list[str], str]:
    """Case ids of ``split`` and a description of where they came from (see module doc)."""
    if split not in ("test", "val", "all"):
        path = Path(split)
        if path.is_file():
            return read_list(path), f"list file {path}"
        raise DataError(
            f"split {split!r} is neither 'test', 'val', 'all' nor an existing list file"
        )
    if split == "all":
        return list_cases(fmt, root), f"all cases of {root}"
    if split == "test" and test_list:
        return read_list(test_list), f"data.test_list {test_list}"
    if split == "val" and from_config:
        ids = _manifest_val(meta or {})
        if ids:
            return ids, "validation ids of the checkpoint's split manifest"
    ids = _folder_split(root, split)
    if ids is not None:
        return ids, f"{split} list of {root}"
    if split == "val" and not from_config:
        ids = _manifest_val(meta or {})
        if ids:
            return ids, "validation ids of the checkpoint's split manifest"
    hint = "set data.test_list in the config" if split == "test" else "train with data.val_cases"
    raise DataError(
        f"no {split!r} split found for {root}: no {split}.list, splits/{split}.txt"
        + (", split_manifest.json or checkpoint manifest" if split == "val" else "")
        + f"; pass split=<list file> (--split FILE) or {hint}"
    )


def resolve_data(
    data: str | os.PathLike | None,
    *,
    checkpoint_config: dict[str, Any],
    num_classes: int,
    format: str | None = None,
) -> tuple[DataConfig | None, str, Path]:
    """(data config or None, format, root) for ``data`` (see module doc). A run config whose
    ``model.num_classes`` is not the checkpoint's `num_classes` (K) is refused."""
    if data is None:
        raw = checkpoint_config.get("data")
        if not isinstance(raw, dict):
            raise CheckpointError(
                "the checkpoint stores no data config; pass the data (a run config or a "
                "dataset folder)"
            )
        raw = dict(raw)
        if "num_classes" in raw:  # written before K was stored once (see hsam.config)
            check_legacy_data_num_classes(
                raw.pop("num_classes"), num_classes, "checkpoint config", log_level=logging.DEBUG
            )
        cfg = from_dict(DataConfig, raw, "checkpoint config.data")
    else:
        path = Path(data)
        if path.is_dir():
            fmt = (format or detect_format(path)).strip().lower()
            if fmt not in FORMATS:
                raise DataError(f"unknown dataset format {format!r}; use one of {FORMATS}")
            return None, fmt, path
        if not path.is_file():
            raise DataError(f"data {path} does not exist; pass a run config YAML or a folder")
        if path.suffix.lower() not in (".yaml", ".yml", ".json"):
            raise DataError(
                f"data {path} is a file but not a run config (.yaml/.yml); pass the config or "
                "the dataset folder"
            )
        run_cfg = load_run_config(path)
        if run_cfg.model.num_classes != num_classes:
            raise CheckpointError(
                f"the checkpoint predicts {num_classes} foreground class(es) but the config "
                f"{data} has model.num_classes = {run_cfg.model.num_classes}; evaluate a "
                "checkpoint trained on this label map"
            )
        cfg = run_cfg.data
    if not cfg.root:
        raise ConfigError("data.root is empty: set it to the dataset folder.")
    fmt = (format or cfg.format).strip().lower()
    return cfg, fmt, Path(cfg.root)


# --------------------------------------------------------------------------------------------
# per case
# --------------------------------------------------------------------------------------------
def check_classes(case: Case, predictor: Predictor, source: str) -> None:
    """CheckpointError when the case's label map does not fit the predictor's K classes
    (DataError when it has none)."""
    k = predictor.num_classes
    k_data = case.num_classes
    if case.label is None:
        raise DataError(
            f"case {case.case_id} ({case.source}) has no label map; evaluate needs labelled "
            "cases (use predict for unlabelled ones)"
        )
    top = int(case.label.max()) if case.label.size else 0
    if top > k or (k_data and k_data != k):
        found = k_data if k_data else top
        named = ", ".join(f"{c} {n}" for c, n in sorted(case.label_names.items()) if c > 0)
        raise CheckpointError(
            f"checkpoint {predictor.name} predicts {k} foreground class(es) but the data "
            f"({source}, case {case.case_id}) has {found} (label values up to {top}"
            + (f"; classes {named}" if named else "")
            + "); evaluate with a checkpoint trained on this label map"
        )


def _geometry(case: Case) -> Geometry:
    """The case's grid for :func:`~hsam.io.images.write_label_volume` (the writer of ``predict``);
    with the source's NIfTI-1 header, so a saved prediction keeps its qform/sform."""
    geo = Geometry.default(case.image.shape, case.spacing)
    return Geometry(
        size=geo.size,
        spacing=geo.spacing,
        origin=tuple(case.origin) if case.origin is not None else geo.origin,  # type: ignore[arg-type]
        direction=tuple(case.direction) if case.direction is not None else geo.direction,
        nifti_header=case.nifti_header,
    )


def _safe_name(case_id: str) -> str:
    return re.sub(r"[^\w.\-]", "_", case_id) or "case"


# --------------------------------------------------------------------------------------------
# main entry
# --------------------------------------------------------------------------------------------
def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike | None = None,
    *,
    split: str = "test",
    out_dir: str | os.PathLike,
    stage: str | int = "fused",
    batch_size: int = 8,
    device: str = "auto",
    precision: str = "fp32",
    nsd_tolerance_mm: float | Sequence[float] = 2.0,
    overwrite: bool = False,
    backbone_weights: str | None = None,
    format: str | None = None,
    save_predictions: bool = False,
    run_name: str | None = None,
    intensity_policy: str | None = None,
    progress: bool = True,
    volume_factor: float | None = DEFAULT_FACTOR,
    postprocess: str | None = None,
    tta: str | None = None,
    slice_smoothing: float | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on a labelled split and write the reports into ``out_dir``.

    Args:
        checkpoint: an hsam checkpoint.
        data: ``None`` (the checkpoint's data config), a run-config YAML, or a dataset folder.
        split: ``"test"``, ``"val"``, ``"all"`` or a list file of case ids (module doc).
        out_dir: report folder (created if needed).
        stage: ``1``, ``2`` or ``"fused"``.
        batch_size: slices per forward pass.
        device: ``"auto"``, ``"cpu"``, ``"cuda[:N]"``.
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (bf16 where the device has bf16 hardware).
        nsd_tolerance_mm: NSD tolerance in mm (one value, or one per class 1..K).
        overwrite: replace existing reports/predictions instead of refusing.
        backbone_weights: SAM weights file, if not where training found it.
        format: dataset format of a folder ``data`` (default: detected), or an override of
            the config's ``data.format``.
        save_predictions: also write ``predictions/<case>.nii.gz``.
        run_name: the "Method" of the Markdown table (default: the checkpoint's file stem).
        intensity_policy: override of the checkpoint's intensity preprocessing.
        progress: progress bar over cases (on a terminal).
        volume_factor: predicted-size check (module doc): flag a class whose volume fraction
            is below ``min / factor`` or above ``max * factor`` of the checkpoint's training
            range; None or 0 turns it off. Checkpoints without the range are not checked.
        postprocess: ``"none"`` or ``"largest_component"`` (:mod:`hsam.inference.postprocess`),
            applied to each predicted volume before it is scored (and saved).
        tta: test-time augmentation, ``"none"``, ``"flip"`` (probabilities averaged over
            the identity, left-right, up-down and both flips of each slice) or ``"rot90"``
            (over its four quarter turns); 4x the compute.
        slice_smoothing: sigma, in slices, of a Gaussian averaging the class probabilities
            across neighbouring slices before the argmax (0: off; for thin slices, e.g. LA).
            ``postprocess``, ``tta`` and ``slice_smoothing`` left None take the checkpoint's
            recipe defaults (its run config's ``inference`` section; none, none and 0 without
            one).

    Returns:
        The summary written to ``summary.json`` (:func:`hsam.evaluation.reports.summarize`'s
        format).

    Raises:
        CheckpointError: the checkpoint's class count differs from the data's (both named).
        DataError: missing data, unknown split, unlabelled cases. OutputExistsError: outputs
        exist and not ``overwrite``. ConfigError: bad stage/device/precision.
    """
    options = InferenceOptions(
        stage=stage,
        batch_size=batch_size,
        precision=precision,
        postprocess=postprocess,
        tta=tta,
        slice_smoothing=slice_smoothing,
    )
    volume_factor = check_volume_factor(volume_factor)
    out = Path(out_dir)
    report_paths = [out / name for name in (*REPORT_FILES, INFO_FILE)]
    if not overwrite:
        refuse_existing(report_paths)
    check_writable_folder(out, "report folder")  # before the model is loaded or anything run
    predictor = options.load(
        checkpoint,
        device=device,
        backbone_weights=backbone_weights,
        intensity_policy=intensity_policy,
    )
    loaded = predictor.loaded
    assert loaded is not None  # from a checkpoint
    cfg, fmt, root = resolve_data(
        data, checkpoint_config=loaded.config, num_classes=predictor.num_classes, format=format
    )
    ids, ids_from = resolve_split(
        split,
        fmt=fmt,
        root=root,
        test_list=cfg.test_list if cfg is not None else None,
        meta=loaded.meta,
        from_config=cfg is not None,
    )
    if not ids:
        raise DataError(f"the {split!r} split ({ids_from}) is empty; nothing to evaluate")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DataError(f"the {split!r} split ({ids_from}) lists {dup[:5]} more than once")
    pred_paths = {i: out / PREDICTIONS_DIR / f"{_safe_name(i)}{PREDICTION_EXTENSION}" for i in ids}
    if save_predictions and not overwrite:
        refuse_existing(pred_paths.values())
    source = f"{fmt} data at {root}"
    logger.info(
        "evaluating %s on %d case(s) of %s (%s; stage %s, %s, %s, intensity %s, tta %s, "
        "slice smoothing %g)",
        checkpoint,
        len(ids),
        source,
        ids_from,
        predictor.stage,
        predictor.precision,
        predictor.device,
        predictor.intensity_policy,
        predictor.tta,
        predictor.slice_smoothing,
    )
    predictor.log_volume_check(volume_factor)

    out_existed = out.exists()
    staging: Path | None = None
    try:
        rows: list[dict[str, Any]] = []
        per_case: list[dict[str, Any]] = []
        flagged: list[tuple[str, str]] = []
        start = time.perf_counter()
        bar = tqdm(ids, desc="evaluate", unit="case", disable=None if progress else True)
        read_ids: list[str] = []  # the listed id of each case read (a reader may rename it)

        def read_cases() -> Iterator[Case]:
            for cid in bar:  # read lazily: evaluate_cases scores each case before the next
                read_ids.append(cid)
                (case,) = read_dataset(fmt, root, [cid])
                check_classes(case, predictor, source)
                yield case

        def save(case: Case, _: int, prediction: Prediction) -> None:
            nonlocal staging
            if staging is None:  # created lazily: a failure on the first case leaves no trace
                out.mkdir(parents=True, exist_ok=True)
                remove_stale_staging_dirs(out, "evaluate")
                staging = make_staging_dir(out, "evaluate")
            name = pred_paths[read_ids[-1]].name
            write_label_volume(prediction.labels, _geometry(case), staging / name)

        evaluations = evaluate_cases(
            predictor,
            read_cases(),
            nsd_tolerance_mm=nsd_tolerance_mm,
            volume_factor=volume_factor,
            save=save if save_predictions else None,
        )
        for evaluation in evaluations:
            case, (score,) = evaluation.case, evaluation.scores
            flagged += [(case.case_id, w.class_name) for w in score.volume_warnings]
            rows += score.rows
            per_case.append(
                {
                    "case": case.case_id,
                    "shape": list(case.shape),
                    "seconds": round(evaluation.seconds, 3),
                    "volume_warnings": [w.to_dict() for w in score.volume_warnings],
                }
            )
            logger.info(
                "%s: legacy Dice %s (%.1f s)",
                read_ids[-1],
                [round(d, 4) for d in score.dice],
                evaluation.seconds,
            )
            bar.set_postfix(dice=f"{float(np.mean(score.dice)):.3f}")
        total = time.perf_counter() - start

        info = {
            "format": EVALUATION_FORMAT,
            "hsam_version": hsam.__version__,
            "torch_version": str(torch.__version__),
            "checkpoint": str(checkpoint),
            "checkpoint_meta": {
                k: loaded.meta[k]
                for k in ("epoch", "metrics", "intensity_policy", "label_names")
                if k in loaded.meta
            },
            "model": {
                "backbone": loaded.model_config.backbone,
                "image_size": loaded.model_config.image_size,
                "num_classes": predictor.num_classes,
                "stages": loaded.model_config.stages,
            },
            "data": {"format": fmt, "root": str(root), "split": split, "ids_from": ids_from},
            "cases": per_case,
            "stage": predictor.stage,
            "precision": predictor.precision,
            "device": str(predictor.device),
            "batch_size": predictor.batch_size,
            "intensity_policy": predictor.intensity_policy,
            "postprocess": predictor.postprocess,
            "tta": predictor.tta,
            "slice_smoothing": predictor.slice_smoothing,
            "nsd_tolerance_mm": nsd_tolerance_mm
            if isinstance(nsd_tolerance_mm, (int, float))
            else list(nsd_tolerance_mm),
            "seconds": round(total, 3),
            "volume_check": {
                "factor": volume_factor,
                "class_volume_fraction_range": None
                if predictor.volume_ranges is None
                else {str(c): [lo, hi] for c, (lo, hi) in predictor.volume_ranges.items()},
                "checked": volume_factor is not None and predictor.volume_ranges is not None,
                "n_warnings": len(flagged),
            },
        }
        name = run_name or Path(checkpoint).stem
        if not overwrite:  # again: time has passed since the first check
            refuse_existing(report_paths)
        if staging is not None:
            staged = sorted(staging.iterdir())
            if not overwrite:
                refuse_existing(pred_paths.values())
            (out / PREDICTIONS_DIR).mkdir(parents=True, exist_ok=True)
            for f in staged:
                os.replace(f, out / PREDICTIONS_DIR / f.name)
        paths = write_reports(rows, out, run_name=name, overwrite=overwrite)
        atomic_write_text(out / INFO_FILE, json.dumps(info, indent=2) + "\n", overwrite=overwrite)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            if not out_existed and not any(out.iterdir()):
                out.rmdir()  # only what this call created, and only if it is empty
    summary: dict[str, Any] = json.loads(Path(paths["summary_json"]).read_text())
    logger.info(
        "evaluated %d case(s) in %.1f s: mean Dice legacy %s; reports in %s",
        len(ids),
        total,
        summary["policies"]["legacy"]["mean"]["dice"]["mean"],
        out,
    )
    if flagged:  # repeated after the progress bar, so it is not lost among the case lines
        logger.warning(
            "%d of %d case(s) have a predicted structure far outside the training size range "
            "(check these segmentations; volume_warning column of %s): %s",
            len({k for k, _ in flagged}),
            len(ids),
            out / "per_case.csv",
            ", ".join(f"{k} ({c})" for k, c in flagged),
        )
    return summary
