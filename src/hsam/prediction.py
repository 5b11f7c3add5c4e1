"""`hsam predict`: segment medical volumes with a trained checkpoint, on the input's exact grid.

Pipeline per input (NIfTI ``.nii``/``.nii.gz``, MetaImage ``.mha``/``.mhd``, ``.nrrd``, or a
folder holding one DICOM series; folders of such files are expanded by
:func:`hsam.imageio.list_inputs`):

1. :func:`hsam.imageio.read_volume` -- the SimpleITK array ``(D, H, W) = (k, j, i)`` and the
   geometry, never reoriented, flipped or transposed;
2. intensities mapped to the model's ``[0, 1]`` with the checkpoint's stored policy
   (``meta["intensity_policy"]``, :func:`hsam.intensity.to_model_range`);
3. :func:`hsam.inference.predict_volume`: **slices are taken along the first array axis of the
   SimpleITK array, i.e. the image's k (z) index**: slice ``d`` is ``array[d]``, a plane of
   constant voxel index k whatever the direction cosines say (axial for a usual axial CT/MR
   acquisition; for a sagittal or coronal acquisition it is that acquisition plane). Every
   slice is predicted (empty ones too); the class probabilities are resized back to the
   slice grid (bilinear) and the labels are their argmax;
4. the label map is written on exactly the input's grid (same shape, spacing, origin,
   direction; a NIfTI output of a NIfTI input also keeps the input's qform/sform bit for bit)
   with :func:`hsam.imageio.write_label_volume`; optionally the per-class probabilities
   (one 4-D float32 file, class axis last in ITK order, see
   :func:`hsam.imageio.write_probability_volume`) and a PNG overlay montage
   (:func:`hsam.overlay.render_overlay`, legend from ``meta["label_names"]``).

Output names: ``<stem>_seg<ext>`` (``<ext>`` = the input's, ``.nii.gz`` for DICOM),
``<stem>_prob<ext>`` and ``<stem>_overlay.png`` in the output folder; with exactly one input and
an ``output`` that ends with a volume extension, ``output`` is the label file itself and the
others are ``<output stem>_prob<ext>`` / ``<output stem>_overlay.png`` beside it.

Size check: where the checkpoint records the range of each class's volume fraction over its
training cases (``meta["class_volume_fraction_range"]``), every prediction is compared with it and
a class far outside it (default: 10x, :mod:`hsam.volume_check`) is logged as a WARNING naming the
input, the class, the predicted fraction and the training range: a silent failure on a scan
unlike the training ones (e.g. an almost empty mask) shows up on that scan.

Safety: an existing output is refused unless ``overwrite``; an output folder inside an input
folder (or equal to it) is refused; every input's header is checked (readable, 3-D, scalar)
before anything is written; the files of one input are staged in a hidden folder inside the
output folder and moved into place only when all of them are complete, so an error leaves no
partial file (inputs finished before a failing one keep their complete outputs; the error says
which).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk  # noqa: N813
import torch
from tqdm.auto import tqdm

from hsam.atomic import check_writable_folder
from hsam.checkpoint import LoadedCheckpoint, load_checkpoint
from hsam.devices import resolve_device
from hsam.errors import CheckpointError, ConfigError, DataError
from hsam.imageio import (
    SUPPORTED_EXTENSIONS,
    list_inputs,
    read_volume,
    refuse_existing,
    refuse_unsupported_nifti,
    safe_output_path,
    volume_extension,
    write_label_volume,
    write_probability_volume,
)
from hsam.inference import Stage, predict_volume
from hsam.intensity import parse_policy, to_model_range
from hsam.modeling.hsam import HSAM
from hsam.overlay import render_overlay
from hsam.postprocess import POSTPROCESS_CHOICES, postprocess_labels
from hsam.volume_check import (
    DEFAULT_FACTOR,
    VolumeWarning,
    check_factor,
    ranges_from_meta,
    volume_warnings,
)

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]
#: Suffixes of the files written for one input.
LABEL_SUFFIX = "_seg"
PROBABILITY_SUFFIX = "_prob"
OVERLAY_SUFFIX = "_overlay.png"


# --------------------------------------------------------------------------------------------
# model loading, shared with hsam.evaluation
# --------------------------------------------------------------------------------------------
def normalize_stage(stage: str | int) -> Stage:
    """``1``/``"1"``, ``2``/``"2"`` or ``"fused"`` (ConfigError otherwise)."""
    value = str(stage).strip().lower()
    if value not in ("1", "2", "fused"):
        raise ConfigError(f"stage must be 1, 2 or fused, got {stage!r}.")
    return value  # type: ignore[return-value]


def check_precision(precision: str) -> Precision:
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be 'fp32' or 'bf16', got {precision!r}.")
    return precision  # type: ignore[return-value]


def check_postprocess(method: str) -> str:
    """`method` if it names a post-processing (hsam.postprocess), else a ConfigError."""
    if method not in POSTPROCESS_CHOICES:
        raise ConfigError(
            f"unknown post-processing {method!r}; choose one of {', '.join(POSTPROCESS_CHOICES)}."
        )
    return method


def check_volume_factor(factor: float | None) -> float | None:
    """The predicted-size check's factor (>= 1), or None when off (``None`` or ``0``)."""
    try:
        return check_factor(factor)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return int(batch_size)


def checkpoint_label_names(meta: dict[str, Any], num_classes: int) -> dict[int, str]:
    """``{0: background, 1..K: name}`` from ``meta["label_names"]`` (int or str keys).

    Missing names become ``class_<c>``; a key that is not an integer is a CheckpointError.
    """
    names = {0: "background", **{c: f"class_{c}" for c in range(1, num_classes + 1)}}
    raw = meta.get("label_names")
    if raw is None:
        return names
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"checkpoint meta 'label_names' must map label ids to names, got {type(raw).__name__}"
        )
    for key, value in raw.items():
        try:
            idx = int(key)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint meta 'label_names' has a non-integer label id {key!r}"
            ) from exc
        if 0 <= idx <= num_classes:
            names[idx] = str(value)
    return names


@dataclass
class InferenceModel:
    """A checkpoint ready for inference.

    Attributes:
        model: the network, in eval mode, on ``device``.
        device: where it runs.
        num_classes: foreground classes K (the model predicts labels ``0..K``).
        intensity_policy: how raw intensities are mapped to ``[0, 1]``.
        label_names: ``{0: "background", 1..K: name}``.
        checkpoint: the file it was loaded from.
        loaded: the full :class:`~hsam.checkpoint.LoadedCheckpoint` (config, meta).
    """

    model: HSAM
    device: torch.device
    num_classes: int
    intensity_policy: str
    label_names: dict[int, str]
    checkpoint: Path
    loaded: LoadedCheckpoint

    def segment(
        self,
        volume01: np.ndarray,
        *,
        stage: Stage = "fused",
        batch_size: int = 8,
        precision: Precision = "fp32",
        return_probabilities: bool = False,
        postprocess: str = "none",
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels ``(D, H, W)`` (and probabilities ``(T, D, H, W)``) of a ``[0, 1]`` volume,
        slice by slice along axis 0 (see :func:`hsam.inference.predict_volume`), then the
        named post-processing of the labels (:mod:`hsam.postprocess`; probabilities as
        predicted)."""
        labels, probs = predict_volume(
            self.model,
            volume01,
            batch_size=batch_size,
            stage=stage,
            precision=precision,
            return_probabilities=return_probabilities,
        )
        return postprocess_labels(labels, self.num_classes, postprocess), probs

    @functools.cached_property
    def volume_ranges(self) -> dict[int, tuple[float, float]] | None:
        """Per-class training range of the volume fraction (``meta[
        "class_volume_fraction_range"]``), or None for checkpoints that do not record it."""
        return ranges_from_meta(self.loaded.meta, self.num_classes)

    def check_volumes(
        self,
        labels: np.ndarray,
        where: str,
        *,
        factor: float | None = DEFAULT_FACTOR,
        label_names: Mapping[int, str] | None = None,
    ) -> list[VolumeWarning]:
        """Predicted classes far outside the training size range
        (:func:`hsam.volume_check.volume_warnings`), each logged as a WARNING naming ``where``
        (the case or file). Empty when in range, when ``factor`` is None/0, or when the
        checkpoint has no range."""
        names = label_names or {c: n for c, n in self.label_names.items() if c > 0}
        found = volume_warnings(
            labels, self.num_classes, self.volume_ranges, factor, label_names=names
        )
        for w in found:
            logger.warning("%s: %s", where, w.message)
        return found


def log_volume_check(model: InferenceModel, factor: float | None) -> None:
    """Say once whether predicted sizes will be checked (and against what)."""
    if factor is None or factor == 0:
        logger.info("predicted-size check turned off")
    elif model.volume_ranges is None:
        logger.info(
            "checkpoint %s records no class_volume_fraction_range (trained before it was "
            "stored); predicted structure sizes are not checked",
            model.checkpoint,
        )
    else:
        logger.info(
            "checking predicted structure sizes (fraction of the scan's voxels) against the "
            "training range, tolerance factor %g: %s",
            factor,
            ", ".join(
                f"{model.label_names.get(c, c)} {lo:.3g}-{hi:.3g}"
                for c, (lo, hi) in model.volume_ranges.items()
            ),
        )


def load_inference_model(
    checkpoint: str | os.PathLike,
    *,
    device: str = "auto",
    backbone_weights: str | None = None,
    intensity_policy: str | None = None,
    stage: str | int = "fused",
) -> InferenceModel:
    """Load ``checkpoint`` for inference on ``device`` and read its preprocessing metadata.

    Args:
        checkpoint: an hsam checkpoint (written by ``hsam train``).
        device: ``"auto"`` (cuda if available, else cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        backbone_weights: the SAM weights file, where it lives elsewhere than at training time
            (its sha256 must match the one recorded in the checkpoint).
        intensity_policy: override of ``meta["intensity_policy"]`` (e.g.
            ``"ct_window[-125,275]"``); needed only for checkpoints that lack it.
        stage: checked against the model (stage 2 needs a two-stage model).

    Raises:
        CheckpointError: unreadable checkpoint, backbone mismatch, no intensity policy.
        ConfigError: bad device or stage.
    """
    dev = resolve_device(device)
    stage = normalize_stage(stage)
    loaded = load_checkpoint(checkpoint, backbone_weights=backbone_weights)
    cfg = loaded.model_config
    if stage == "2" and cfg.stages == 1:
        raise ConfigError(
            f"stage 2 was requested but checkpoint {checkpoint} is a one-stage model "
            "(model.stages = 1); use --stage 1 or fused."
        )
    policy = intensity_policy or loaded.meta.get("intensity_policy")
    if not policy:
        raise CheckpointError(
            f"checkpoint {checkpoint} does not record its intensity preprocessing "
            "(meta['intensity_policy']); pass it explicitly, e.g. intensity_policy="
            "'ct_window[-125,275]' for CT or 'percentile[0.5,99.5]' for MR."
        )
    try:
        parse_policy(str(policy))
    except DataError as exc:
        raise CheckpointError(f"checkpoint {checkpoint}: {exc}") from exc
    model = loaded.built.model.to(dev).eval()
    k = int(cfg.num_classes)
    return InferenceModel(
        model=model,
        device=dev,
        num_classes=k,
        intensity_policy=str(policy),
        label_names=checkpoint_label_names(loaded.meta, k),
        checkpoint=Path(checkpoint),
        loaded=loaded,
    )


# --------------------------------------------------------------------------------------------
# inputs and outputs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictionTarget:
    """Where the outputs of one input go."""

    input: Path
    labels: Path
    probabilities: Path | None
    overlay: Path | None

    def paths(self) -> list[Path]:
        return [p for p in (self.labels, self.probabilities, self.overlay) if p is not None]


def _check_header(path: Path) -> None:
    """Fail early (before any output is written) on an unreadable, non-3-D or vector file.

    Only the header is read; DICOM folders are checked when they are read."""
    if path.is_dir():
        return
    refuse_unsupported_nifti(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DataError(
            f"cannot read {path}: the file is corrupt, truncated or not a valid volume "
            f"({str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else exc})"
        ) from exc
    dim = reader.GetDimension()
    size = tuple(reader.GetSize())
    if dim == 2:
        raise DataError(
            f"{path} is a 2-D image (size {size}); hsam predict needs a 3-D volume: stack the "
            "slices into one volume file, or pass the folder of the DICOM series"
        )
    if dim == 4 and size[3] == 1:
        dim = 3
    if dim != 3:
        raise DataError(
            f"{path} is a {dim}-D image (size {size}) where a 3-D volume is needed (several "
            "time points or channels?); split it into one 3-D file per time point/channel"
        )
    if reader.GetNumberOfComponents() != 1:
        raise DataError(
            f"{path} has {reader.GetNumberOfComponents()} components per voxel (colour or vector "
            "image); hsam needs a scalar 3-D volume"
        )


def _base_and_ext(path: Path) -> tuple[str, str]:
    ext = volume_extension(path)
    return path.name[: -len(ext)], ext


def plan_outputs(
    inputs: Sequence[Path],
    output: str | os.PathLike,
    *,
    roots: Sequence[str | os.PathLike] = (),
    probabilities: bool = False,
    overlay: bool = False,
) -> list[PredictionTarget]:
    """Output paths for each input (see the module docstring for the naming rules).

    Raises:
        DataError: an output folder inside an input folder, an output that would be an input,
            a file ``output`` with several inputs, two inputs with the same output name.
    """
    out = Path(output)
    targets: list[PredictionTarget] = []
    if volume_extension(out) and not out.is_dir():
        if len(inputs) != 1:
            raise DataError(
                f"output {out} names one file but {len(inputs)} inputs were given; pass an "
                "output folder instead"
            )
        inp = inputs[0]
        # Same containment checks as for a folder output (the file goes into out.parent).
        safe_output_path(inp, out.parent, roots=roots, suffix=LABEL_SUFFIX)
        if out.resolve() == inp.resolve():
            raise DataError(f"output {out} is the input itself; choose another output path")
        base, ext = _base_and_ext(out)
        targets.append(
            PredictionTarget(
                input=inp,
                labels=out,
                probabilities=out.with_name(base + PROBABILITY_SUFFIX + ext)
                if probabilities
                else None,
                overlay=out.with_name(base + OVERLAY_SUFFIX) if overlay else None,
            )
        )
    else:
        if out.exists() and not out.is_dir():
            raise DataError(
                f"output {out} is an existing file without a volume extension "
                f"({', '.join(SUPPORTED_EXTENSIONS)}); pass a folder or a volume file name"
            )
        for inp in inputs:
            labels = safe_output_path(inp, out, roots=roots, suffix=LABEL_SUFFIX)
            base, ext = _base_and_ext(labels)
            base = base[: -len(LABEL_SUFFIX)]
            targets.append(
                PredictionTarget(
                    input=inp,
                    labels=labels,
                    probabilities=labels.with_name(base + PROBABILITY_SUFFIX + ext)
                    if probabilities
                    else None,
                    overlay=labels.with_name(base + OVERLAY_SUFFIX) if overlay else None,
                )
            )
    seen: dict[Path, Path] = {}
    input_files = {t.input.resolve() for t in targets}
    for t in targets:
        for p in t.paths():
            key = p.resolve()
            if key in seen:
                raise DataError(
                    f"inputs {seen[key]} and {t.input} would both write {p}; rename one of them "
                    "or predict them into different output folders"
                )
            if key in input_files:
                raise DataError(f"output {p} would overwrite an input; use another output folder")
            seen[key] = t.input
    return targets


def _commit_staged(staging: Path, labels: Path, *, overwrite: bool) -> None:
    """Move every file of ``staging`` (written under the final names) into ``labels``' folder.

    Every destination (MetaImage data files included) is checked first; data files go before
    headers (``.mhd`` last) and the label map last, so a reader never sees a header without its
    data, nor a label map without its companions."""
    staged = [f for f in staging.iterdir() if f.is_file()]
    dest_dir = labels.parent
    if not overwrite:
        refuse_existing(dest_dir / f.name for f in staged)
    order = sorted(staged, key=lambda f: (f.name == labels.name, f.name.endswith(".mhd")))
    for f in order:
        os.replace(f, dest_dir / f.name)


def _write_one(
    target: PredictionTarget,
    model: InferenceModel,
    *,
    stage: Stage,
    batch_size: int,
    precision: Precision,
    overwrite: bool,
    volume_factor: float | None = DEFAULT_FACTOR,
    postprocess: str = "none",
) -> tuple[list[Path], list[VolumeWarning]]:
    vol = read_volume(target.input)
    image01 = to_model_range(vol.array, model.intensity_policy)
    labels, probs = model.segment(
        image01,
        stage=stage,
        batch_size=batch_size,
        precision=precision,
        return_probabilities=target.probabilities is not None,
        postprocess=postprocess,
    )
    dest_dir = target.labels.parent
    dest_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".hsam-predict-", dir=dest_dir))
    try:
        write_label_volume(labels, vol.geometry, staging / target.labels.name)
        if target.probabilities is not None and probs is not None:
            write_probability_volume(probs, vol.geometry, staging / target.probabilities.name)
        if target.overlay is not None:
            render_overlay(
                image01,
                labels,
                {k: v for k, v in model.label_names.items() if k > 0},
                staging / target.overlay.name,
                spacing=vol.spacing,
            )
        _commit_staged(staging, target.labels, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    counts = np.bincount(labels.ravel(), minlength=model.num_classes + 1)
    # The writers log at DEBUG under the hidden staging folder; the final names go here.
    logger.info(
        "%s -> %s (shape %s, foreground voxels per class %s)",
        target.input,
        ", ".join(str(p) for p in target.paths()),
        labels.shape,
        counts[1:].tolist(),
    )
    found = model.check_volumes(labels, str(target.input), factor=volume_factor)
    return target.paths(), found


def predict_files(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    stage: str | int = "fused",
    batch_size: int = 8,
    device: str = "auto",
    precision: str = "fp32",
    probabilities: bool = False,
    overlay: bool = False,
    overwrite: bool = False,
    backbone_weights: str | None = None,
    intensity_policy: str | None = None,
    progress: bool = True,
    volume_factor: float | None = DEFAULT_FACTOR,
    postprocess: str = "none",
) -> list[Path]:
    """Segment volume files with ``checkpoint`` and write label maps on the inputs' grids.

    Args:
        checkpoint: an hsam checkpoint.
        inputs: volume files (``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``, ``.nrrd``), folders of
            them, or folders holding one DICOM series each.
        output: output folder (created if needed), or, with exactly one input, a volume file
            name (its extension picks the format).
        stage: ``1``, ``2`` or ``"fused"`` (the paper's output).
        batch_size: slices per forward pass.
        device: ``"auto"`` (cuda if available, else cpu), ``"cpu"``, ``"cuda[:N]"``.
        precision: ``"fp32"`` or ``"bf16"`` (autocast).
        probabilities: also write ``<stem>_prob<ext>``: float32 softmax probabilities, a 4-D
            image with the class (0 = background) as the last ITK axis. Memory: T x the
            volume's voxel count x 4 bytes.
        overlay: also write ``<stem>_overlay.png``, a montage of representative slices with
            the labels filled in and a legend of the checkpoint's label names.
        overwrite: replace existing outputs instead of refusing.
        backbone_weights: SAM weights file, if not where training found it.
        intensity_policy: override of the checkpoint's intensity preprocessing.
        progress: show a progress bar over the inputs (on a terminal).
        volume_factor: predicted-size check (module doc): log a WARNING for a class whose
            volume fraction is below ``min / factor`` or above ``max * factor`` of the
            training range stored in the checkpoint; None or 0 turns it off. Checkpoints
            without the range are not checked.
        postprocess: ``"none"`` or ``"largest_component"`` (each class keeps its largest 3-D
            connected component; :mod:`hsam.postprocess`). Applied to the labels only (the
            probabilities are the model's).

    Returns:
        The files written, per input: label map, then probabilities and overlay if asked.

    Raises:
        DataError: missing/unreadable/2-D/4-D/vector inputs, output inside an input folder,
            name clashes. OutputExistsError: an output exists and not ``overwrite`` (checked for
            all inputs before anything is computed). CheckpointError, ConfigError.
    """
    stage = normalize_stage(stage)
    prec = check_precision(precision)
    batch_size = check_batch_size(batch_size)
    volume_factor = check_volume_factor(volume_factor)
    check_postprocess(postprocess)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise DataError("no inputs given; pass volume files, folders of them or DICOM folders")
    roots = [Path(p) for p in inputs if Path(p).is_dir()]
    files = list_inputs(inputs)
    targets = plan_outputs(files, output, roots=roots, probabilities=probabilities, overlay=overlay)
    if not overwrite:
        refuse_existing(p for t in targets for p in t.paths())
    for folder in sorted({t.labels.parent for t in targets}):
        check_writable_folder(folder, "output folder")
    for t in targets:
        _check_header(t.input)
    model = load_inference_model(
        checkpoint,
        device=device,
        backbone_weights=backbone_weights,
        intensity_policy=intensity_policy,
        stage=stage,
    )
    logger.info(
        "predicting %d input(s) with %s on %s (stage %s, %s, intensity %s)",
        len(targets),
        checkpoint,
        model.device,
        stage,
        prec,
        model.intensity_policy,
    )
    log_volume_check(model, volume_factor)
    written: list[Path] = []
    done: list[Path] = []
    flagged: list[tuple[Path, VolumeWarning]] = []
    bar = tqdm(targets, desc="predict", unit="volume", disable=None if progress else True)
    for t in bar:
        try:
            paths, found = _write_one(
                t,
                model,
                stage=stage,
                batch_size=batch_size,
                precision=prec,
                overwrite=overwrite,
                volume_factor=volume_factor,
                postprocess=postprocess,
            )
            written += paths
            flagged += [(t.input, w) for w in found]
        except Exception:
            if done:
                logger.error(
                    "stopped at %s; the outputs of the %d input(s) before it are complete: %s",
                    t.input,
                    len(done),
                    ", ".join(str(p) for p in done),
                )
            raise
        done.append(t.input)
    if flagged and len(targets) > 1:  # repeat them after the progress bar, all together
        logger.warning(
            "%d of %d input(s) have a predicted structure far outside the training size range "
            "(check these segmentations): %s",
            len({p for p, _ in flagged}),
            len(targets),
            "; ".join(f"{p} ({w.class_name}: {w.kind})" for p, w in flagged),
        )
    return written
