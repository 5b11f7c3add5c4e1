"""`hsam predict`: segment medical volumes with a trained checkpoint, on the input's exact grid.

The file layer over :class:`hsam.inference.predictor.Predictor` (which loads the checkpoint, applies
its intensity policy and predicts): choosing, checking and staging the output files.

Pipeline per input (NIfTI ``.nii``/``.nii.gz``, MetaImage ``.mha``/``.mhd``, ``.nrrd``, or a
folder holding one DICOM series; folders of such files are expanded by
:func:`hsam.io.images.list_inputs`):

1. :func:`hsam.io.images.read_volume` -- the SimpleITK array ``(D, H, W) = (k, j, i)`` and the
   geometry, never reoriented, flipped or transposed;
2. intensities mapped to the model's ``[0, 1]`` with the checkpoint's stored policy
   (``meta["intensity_policy"]``, :func:`hsam.intensity.to_model_range`);
3. :meth:`hsam.inference.predictor.Predictor.predict`
   (:func:`hsam.inference.slicewise.predict_volume`): **slices are taken along the first array axis
   of the SimpleITK array, i.e. the image's k (z) index**: slice ``d`` is ``array[d]``, a plane of
   constant voxel index k whatever the direction cosines say (axial for a usual axial CT/MR
   acquisition; for a sagittal or coronal acquisition it is that acquisition plane). Every slice is
   predicted (empty ones too); the class probabilities are resized back to the slice grid (bilinear)
   and the labels are their argmax;
4. the label map is written on exactly the input's grid (same shape, spacing, origin,
   direction; a NIfTI output of a NIfTI input also keeps the input's qform/sform bit for bit)
   with :func:`hsam.io.images.write_label_volume`; optionally the per-class probabilities
   (one 4-D float32 file, class axis last in ITK order, see
   :func:`hsam.io.images.write_probability_volume`) and a PNG overlay montage
   (:func:`hsam.apps.overlay.render_overlay`, legend from ``meta["label_names"]``).

Output names: ``<stem>_seg<ext>`` (``<ext>`` = the input's, ``.nii.gz`` for DICOM),
``<stem>_prob<ext>`` and ``<stem>_overlay.png`` in the output folder; with exactly one input and
an ``output`` that ends with a volume extension, ``output`` is the label file itself and the
others are ``<output stem>_prob<ext>`` / ``<output stem>_overlay.png`` beside it.

Size check: where the checkpoint records the range of each class's volume fraction over its
training cases (``meta["class_volume_fraction_range"]``), every prediction is compared with it and
a class far outside it (default: 10x, :mod:`hsam.inference.volume_check`) is logged as a WARNING
naming the input, the class, the predicted fraction and the training range: a silent failure on a
scan unlike the training ones (e.g. an almost empty mask) shows up on that scan.

Safety: an existing output is refused unless ``overwrite``; an output folder inside an input
folder (or equal to it) is refused; every input's header is checked (readable, 3-D, scalar)
before anything is written; the files of one input are staged in a hidden folder inside the
output folder and moved into place only when all of them are complete, so an error leaves no
partial file (inputs finished before a failing one keep their complete outputs; the error says
which).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813
from tqdm.auto import tqdm

from hsam.apps.overlay import render_overlay
from hsam.errors import DataError
from hsam.inference.predictor import InferenceOptions, Predictor, check_volume_factor
from hsam.inference.volume_check import DEFAULT_FACTOR, VolumeWarning
from hsam.io.atomic import check_writable_folder, make_staging_dir, remove_stale_staging_dirs
from hsam.io.images import (
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

logger = logging.getLogger(__name__)

#: Suffixes of the files written for one input.
LABEL_SUFFIX = "_seg"
PROBABILITY_SUFFIX = "_prob"
OVERLAY_SUFFIX = "_overlay.png"


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


def _target(
    inp: Path, labels: Path, base: str, ext: str, *, probabilities: bool, overlay: bool
) -> PredictionTarget:
    """The outputs of `inp`: `labels`, and beside it ``<base>_prob<ext>`` / ``<base>_overlay.png``
    when asked for."""
    return PredictionTarget(
        input=inp,
        labels=labels,
        probabilities=labels.with_name(base + PROBABILITY_SUFFIX + ext) if probabilities else None,
        overlay=labels.with_name(base + OVERLAY_SUFFIX) if overlay else None,
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
        targets.append(_target(inp, out, base, ext, probabilities=probabilities, overlay=overlay))
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
                _target(inp, labels, base, ext, probabilities=probabilities, overlay=overlay)
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
    predictor: Predictor,
    *,
    overwrite: bool,
    volume_factor: float | None = DEFAULT_FACTOR,
) -> tuple[list[Path], list[VolumeWarning]]:
    vol = read_volume(target.input)
    prediction = predictor.predict(vol.array, return_probabilities=target.probabilities is not None)
    labels, probs = prediction.labels, prediction.probabilities
    dest_dir = target.labels.parent
    dest_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_staging_dirs(dest_dir, "predict")
    staging = make_staging_dir(dest_dir, "predict")
    try:
        write_label_volume(labels, vol.geometry, staging / target.labels.name)
        if target.probabilities is not None and probs is not None:
            write_probability_volume(probs, vol.geometry, staging / target.probabilities.name)
        if target.overlay is not None:
            render_overlay(
                prediction.image,
                labels,
                {k: v for k, v in predictor.label_names.items() if k > 0},
                staging / target.overlay.name,
                spacing=vol.spacing,
            )
        _commit_staged(staging, target.labels, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    counts = np.bincount(labels.ravel(), minlength=predictor.num_classes + 1)
    # The writers log at DEBUG under the hidden staging folder; the final names go here.
    logger.info(
        "%s -> %s (shape %s, foreground voxels per class %s)",
        target.input,
        ", ".join(str(p) for p in target.paths()),
        labels.shape,
        counts[1:].tolist(),
    )
    found = predictor.check_volumes(labels, str(target.input), factor=volume_factor)
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
    postprocess: str | None = None,
    tta: str | None = None,
    slice_smoothing: float | None = None,
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
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"auto"`` (bf16 where the device
            has bf16 hardware, else fp32).
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
            connected component; :mod:`hsam.inference.postprocess`). Applied to the labels only (the
            probabilities are the model's).
        tta: test-time augmentation, ``"none"``, ``"flip"`` (probabilities averaged over
            the identity, left-right, up-down and both flips of each slice) or ``"rot90"``
            (over its four quarter turns); 4x the compute.
        slice_smoothing: sigma, in slices, of a Gaussian averaging the class probabilities
            across neighbouring slices before the argmax (0: off; for thin slices, e.g. LA).
            ``postprocess``, ``tta`` and ``slice_smoothing`` left None take the checkpoint's
            recipe defaults (its run config's ``inference`` section; none, none and 0 without
            one).

    Returns:
        The files written, per input: label map, then probabilities and overlay if asked.

    Raises:
        DataError: missing/unreadable/2-D/4-D/vector inputs, output inside an input folder,
            name clashes. OutputExistsError: an output exists and not ``overwrite`` (checked for
            all inputs before anything is computed). CheckpointError, ConfigError.
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
    predictor = options.load(
        checkpoint,
        device=device,
        backbone_weights=backbone_weights,
        intensity_policy=intensity_policy,
    )
    logger.info(
        "predicting %d input(s) with %s on %s (stage %s, %s, intensity %s, tta %s, "
        "slice smoothing %g)",
        len(targets),
        checkpoint,
        predictor.device,
        predictor.stage,
        predictor.precision,
        predictor.intensity_policy,
        predictor.tta,
        predictor.slice_smoothing,
    )
    predictor.log_volume_check(volume_factor)
    written: list[Path] = []
    done: list[Path] = []
    flagged: list[tuple[Path, VolumeWarning]] = []
    bar = tqdm(targets, desc="predict", unit="volume", disable=None if progress else True)
    for t in bar:
        try:
            paths, found = _write_one(
                t, predictor, overwrite=overwrite, volume_factor=volume_factor
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
