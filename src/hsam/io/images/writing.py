"""Writing on the input's grid, atomically: :func:`write_label_volume`,
:func:`write_probability_volume`, the volume-aware :func:`atomic_output` and
:func:`safe_output_path` (where an output may go)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813

from hsam.errors import DataError
from hsam.io.atomic import atomic_output as _atomic_output
from hsam.io.atomic import refuse_existing
from hsam.io.images.nifti import write_nifti_from_header
from hsam.io.images.volume import (
    DICOM_OUTPUT_EXTENSION,
    EXTENSION_FORMATS,
    SUPPORTED_EXTENSIONS,
    Geometry,
    itk_message,
    require_extension,
    volume_extension,
)

logger = logging.getLogger(__name__)


def _file_extension(path: Path) -> str:
    """Extension that a temp file must carry for writers to pick the same format."""
    ext = volume_extension(path)
    if ext:
        return ext
    return "".join(path.suffixes[-1:])


def safe_output_path(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    roots: Sequence[str | os.PathLike] = (),
    suffix: str = "",
    extension: str | None = None,
) -> Path:
    """Output file path for ``input_path`` inside ``output_dir``.

    The name is the input's (the folder name for a DICOM series) + ``suffix`` + ``extension``
    (default: the input's extension; ``.nii.gz`` for DICOM). ``roots`` are the folders the user
    passed as inputs (before :func:`list_inputs` expanded them).

    Raises:
        DataError: ``output_dir`` is, or is inside, an input folder (``input_path`` itself when
            it is a folder, or any of ``roots``) -- outputs there would be read as inputs next
            time --, or the output would be the input file itself, or ``extension`` is not a
            supported volume extension.
    """
    inp = Path(input_path).resolve()
    out_dir = Path(output_dir).resolve()
    folders = [inp] if inp.is_dir() else []
    folders += [Path(r).resolve() for r in roots if Path(r).is_dir()]
    for folder in folders:
        if out_dir == folder or folder in out_dir.parents:
            raise DataError(
                f"output folder {output_dir} is inside the input folder {folder}; choose an "
                "output folder outside the inputs (outputs there would be read as inputs)"
            )
    if inp.is_dir():
        stem, ext_in = inp.name, DICOM_OUTPUT_EXTENSION
    else:
        ext_in = require_extension(inp, "input")
        stem = inp.name[: -len(ext_in)]
    ext = extension if extension is not None else ext_in
    if ext.lower() not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"output extension {ext!r} is not supported; use one of "
            f"{', '.join(SUPPORTED_EXTENSIONS)}"
        )
    out = out_dir / f"{stem}{suffix}{ext}"
    if out.resolve() == inp:
        raise DataError(
            f"output {out} would overwrite the input; use another output folder or a suffix"
        )
    return out


# --------------------------------------------------------------------------------------------
# atomic writing
# --------------------------------------------------------------------------------------------
def _companions(path: Path) -> list[Path]:
    """Files a writer creates next to ``path`` (the data file of a MetaImage header)."""
    if volume_extension(path) == ".mhd":
        stem = path.name[: -len(".mhd")]
        return [path.with_name(stem + ".raw"), path.with_name(stem + ".zraw")]
    return []


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """:func:`hsam.io.atomic.atomic_output` for a volume file: the temp file keeps the volume
    extension (writers pick the format from it) and a ``.mhd``'s data file moves with it."""
    path = Path(path)
    with _atomic_output(
        path, overwrite=overwrite, suffix=_file_extension(path), companions=_companions(path)
    ) as tmp:
        yield tmp


# --------------------------------------------------------------------------------------------
# writing volumes
# --------------------------------------------------------------------------------------------
def _to_sitk(data: np.ndarray, geometry: Geometry) -> sitk.Image:
    """``(D, H, W)`` or ``(T, D, H, W)`` array -> SimpleITK image on ``geometry``'s grid.

    4-D data become a 4-D image (class axis last in ITK order, spacing 1, origin 0)."""
    if data.ndim == 3:
        return geometry.apply_to(sitk.GetImageFromArray(data))
    vols = [geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(v))) for v in data]
    return sitk.JoinSeries(vols)


def _write_array(
    data: np.ndarray, geometry: Geometry, path: Path, *, overwrite: bool, what: str
) -> None:
    ext = require_extension(path, "output")
    with atomic_output(path, overwrite=overwrite) as tmp:
        if EXTENSION_FORMATS[ext] == "nifti" and geometry.nifti_header is not None:
            write_nifti_from_header(data, geometry, tmp, what)
        else:
            image = _to_sitk(data, geometry)
            try:
                sitk.WriteImage(image, str(tmp), useCompression=ext != ".nii")
            except RuntimeError as exc:
                raise DataError(f"cannot write {path}: {itk_message(exc)}") from exc
    logger.debug("wrote %s %s", what, path)


def _check_grid(shape: tuple[int, ...], geometry: Geometry, what: str) -> None:
    if tuple(shape) != geometry.shape:
        raise DataError(
            f"{what} shape {tuple(shape)} does not match the input grid (D, H, W) "
            f"{geometry.shape} of {geometry.source_path or 'the geometry'}; resample to it first"
        )


def write_label_volume(
    labels: np.ndarray,
    geometry: Geometry,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a label map on exactly the input's grid, atomically.

    Args:
        labels: ``(D, H, W)`` non-negative integer (or bool) labels, shape ``geometry.shape``.
        geometry: the input's :class:`Geometry` (from :func:`read_volume`).
        path: output file; the extension picks the format (see :data:`SUPPORTED_EXTENSIONS`).
        overwrite: replace an existing file instead of refusing.

    The file is ``uint8`` if ``max(labels) <= 255`` else ``uint16``. Spacing, origin and
    direction are the input's; a NIfTI written from a NIfTI input also keeps its qform/sform
    (see the module docstring).

    Raises:
        DataError: wrong shape/dtype, negative labels or labels above 65535.
        OutputExistsError: ``path`` exists and not ``overwrite``.
    """
    path = Path(path)
    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise DataError(f"labels must be a 3-D (D, H, W) array, got shape {arr.shape}")
    _check_grid(arr.shape, geometry, "labels")
    if arr.dtype != bool and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"labels must be integers, got dtype {arr.dtype}; take the argmax first")
    lo = int(arr.min()) if arr.size else 0
    hi = int(arr.max()) if arr.size else 0
    if lo < 0 or hi > 65535:
        raise DataError(f"labels must lie in [0, 65535] to be written, got [{lo}, {hi}]")
    dtype = np.uint8 if hi <= 255 else np.uint16
    _write_array(
        np.ascontiguousarray(arr, dtype=dtype), geometry, path, overwrite=overwrite, what="labels"
    )
    return path


def _per_class_path(path: Path, index: int) -> Path:
    ext = require_extension(path, "output")
    return path.with_name(f"{path.name[: -len(ext)]}_class{index:02d}{ext}")


def write_probability_volume(
    probs: np.ndarray,
    geometry: Geometry,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    layout: str = "4d",
) -> list[Path]:
    """Write class probabilities on the input's grid, as float32, atomically.

    Args:
        probs: ``(T, D, H, W)`` float; channel ``t`` is class ``t`` (0 = background), e.g. the
            softmax of the model.
        geometry: the input's :class:`Geometry`.
        path: output file name.
        layout: ``"4d"`` -- one 4-D image whose 4th (slowest) axis is the class: NIfTI
            ``dim = [4, W, H, D, T]`` with ``pixdim[4] = 1``, read back by SimpleITK as
            ``(T, D, H, W)``; the first three axes carry the input's geometry.
            ``"per_class"`` -- one 3-D file per class, ``<stem>_classTT<ext>``; all are
            written or none.

    Returns:
        The paths written.

    Raises:
        DataError: wrong shape, non-finite values, unknown layout.
        OutputExistsError: an output exists and not ``overwrite`` (checked for all first).
    """
    path = Path(path)
    arr = np.asarray(probs)
    if arr.ndim != 4:
        raise DataError(f"probabilities must be (T, D, H, W), got shape {arr.shape}")
    _check_grid(arr.shape[1:], geometry, "probabilities")
    if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)):
        raise DataError("probabilities must be finite floating-point values")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    require_extension(path, "output")
    if layout == "4d":
        _write_array(arr, geometry, path, overwrite=overwrite, what="probabilities")
        return [path]
    if layout != "per_class":
        raise DataError(f"unknown probability layout {layout!r}; use '4d' or 'per_class'")
    paths = [_per_class_path(path, t) for t in range(arr.shape[0])]
    if not overwrite:
        refuse_existing(p for q in paths for p in [q, *_companions(q)])
    with contextlib.ExitStack() as stack:
        for t, p in enumerate(paths):
            tmp = stack.enter_context(atomic_output(p, overwrite=overwrite))
            if volume_extension(p) in (".nii", ".nii.gz") and geometry.nifti_header is not None:
                write_nifti_from_header(arr[t], geometry, tmp, "probabilities")
            else:
                sitk.WriteImage(
                    _to_sitk(arr[t], geometry),
                    str(tmp),
                    useCompression=volume_extension(p) != ".nii",
                )
    logger.debug("wrote %d per-class probability files next to %s", len(paths), path)
    return paths
