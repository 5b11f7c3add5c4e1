"""DICOM series: reading one series from a folder with SimpleITK/GDCM, refusing what GDCM and
ITK would silently get wrong (slice files left out, uneven slice positions)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813

from hsam.errors import DataError
from hsam.io.images.volume import SUPPORTED_EXTENSIONS, itk_message

logger = logging.getLogger(__name__)

#: Largest relative deviation of one slice step from the series' median step (DICOM).
DICOM_STEP_TOLERANCE = 0.05


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _refuse_unread_dicom_files(folder: Path, files: Sequence[str]) -> None:
    """GDCM silently leaves out a slice file it cannot parse (e.g. a truncated copy), and ITK
    then stacks the rest as if nothing were missing: refuse DICOM files outside the series."""
    listed = {Path(f).resolve() for f in files}
    left_out = sorted(
        e.name
        for e in folder.iterdir()
        if e.is_file()
        and not e.name.startswith(".")
        and e.name.upper() != "DICOMDIR"
        and e.resolve() not in listed
        and _has_dicom_preamble(e)
    )
    if left_out:
        raise DataError(
            f"the DICOM series in {folder} leaves out {len(left_out)} DICOM file(s) that cannot "
            f"be read as part of it ({', '.join(left_out[:5])}{' ...' if len(left_out) > 5 else ''}"
            "): truncated or damaged slices? Replace them with complete copies of the series "
            "(or move files of other series out of the folder)"
        )


def _refuse_slice_gaps(folder: Path, image: sitk.Image, reader: sitk.ImageSeriesReader) -> None:
    """Refuse uneven slice positions: ITK averages the spacing over a gap (a missing slice)
    and the volume is silently stretched."""
    n = image.GetDepth()
    if n < 2:
        return
    positions = []
    for i in range(n):
        if not reader.HasMetaDataKey(i, "0020|0032"):
            logger.debug(
                "%s: slice %d has no ImagePositionPatient; positions not checked", folder, i
            )
            return
        try:
            positions.append([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")])
        except ValueError:
            return
    d = image.GetDirection()
    normal = np.array([d[2], d[5], d[8]])  # the slice axis (third column)
    depth = np.asarray(positions, dtype=np.float64) @ normal
    steps = np.abs(np.diff(depth))
    typical = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - typical)))
    if typical <= 0 or abs(steps[worst] - typical) > DICOM_STEP_TOLERANCE * typical:
        raise DataError(
            f"the DICOM series in {folder} has uneven slice positions: slices {worst + 1} and "
            f"{worst + 2} of {n} are {steps[worst]:.4g} mm apart where the median step is "
            f"{typical:.4g} mm (a missing or duplicated slice?); restore the complete series"
        )


def read_dicom_series(folder: Path) -> sitk.Image:
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise DataError(f"cannot scan {folder} for DICOM files: {itk_message(exc)}") from exc
    if not ids:
        raise DataError(
            f"{folder} is a folder without a DICOM series; pass a volume file "
            f"({', '.join(SUPPORTED_EXTENSIONS)}) or a folder holding the slices of one series"
        )
    if len(ids) > 1:
        raise DataError(
            f"{folder} holds {len(ids)} DICOM series ({', '.join(ids)}); move each series into "
            "its own folder and pass those folders"
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])
    _refuse_unread_dicom_files(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice positions for the gap check
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise DataError(
            f"cannot read the DICOM series in {folder}: {itk_message(exc)}; check that every "
            "slice is complete and belongs to the same series"
        ) from exc
    _refuse_slice_gaps(folder, image, reader)
    return image


def is_dicom_series(folder: Path) -> bool:
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False
