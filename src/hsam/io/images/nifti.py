"""NIfTI specifics: the checks ITK's NIfTI reader does not make (truncation, NaN/inf voxels,
NIfTI-2), the input's raw NIfTI-1 header, and writing an output with a copy of that header so
its qform/sform are the input's bit for bit."""

from __future__ import annotations

import gzip
import io
import logging
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk  # noqa: N813

from hsam.errors import DataError
from hsam.io.images.volume import EXTENSION_FORMATS, Geometry, check_finite, volume_extension

logger = logging.getLogger(__name__)


def _stored_bytes(path: Path) -> int:
    """Bytes of NIfTI data on disk (decompressed for ``.nii.gz``).

    ITK reads truncated NIfTI files without complaint (the missing voxels become garbage), so
    the gzip stream is checked end to end (length and CRC) here."""
    if volume_extension(path) != ".nii.gz":
        return path.stat().st_size
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(
            f"cannot read {path}: the gzip stream is damaged or truncated ({exc}); "
            "re-export or re-copy the file"
        ) from exc
    return total


def _refuse_nifti2(path: Path, header: nib.spatialimages.SpatialHeader) -> None:
    if isinstance(header, nib.Nifti2Header):
        raise DataError(
            f"{path} is a NIfTI-2 file, a format hsam does not support (SimpleITK reads only "
            "NIfTI-1); convert it to NIfTI-1, e.g. in Python: nib.save(nib.Nifti1Image."
            "from_image(nib.load(path)), 'out.nii.gz'), or save it as .nrrd/.mha"
        )


def refuse_unsupported_nifti(path: str | os.PathLike) -> None:
    """Refuse a NIfTI-2 file with a clear message, reading only its header (SimpleITK's own
    error calls it corrupt). Other files, and files nibabel cannot parse, pass."""
    path = Path(path)
    if EXTENSION_FORMATS.get(volume_extension(path)) != "nifti" or not path.is_file():
        return
    try:
        header = nib.load(str(path)).header
    except Exception:  # nibabel raises many types on odd files; the full read reports them
        return
    _refuse_nifti2(path, header)


def check_nifti(path: Path) -> nib.spatialimages.SpatialImage | None:
    """Checks ITK's NIfTI reader does not make, done with nibabel before ITK reads the file.

    ITK zero-fills a truncated file and turns NaN/inf voxels into 0 without a word, and it
    cannot read NIfTI-2 at all (its error reads like a corrupt file). Returns the nibabel
    image (header and lazy data), or None when nibabel cannot read the file (ITK may).

    Raises:
        DataError: NIfTI-2, a truncated file or gzip stream, NaN/inf voxels (naming ``path``).
    """
    total = _stored_bytes(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types on odd files; SimpleITK may read it
        logger.warning(
            "nibabel cannot read the header of %s (%s); geometry from SimpleITK only", path, exc
        )
        return None
    header = img.header
    _refuse_nifti2(path, header)
    # the proxy's offset, not the header's: a single-file NIfTI may store vox_offset 0 while
    # its data start after the 352 header bytes
    offset = getattr(img.dataobj, "offset", header.get_data_offset())
    needed = int(offset) + int(
        np.prod(header.get_data_shape(), dtype=np.int64) * header.get_data_dtype().itemsize
    )
    if total < needed:
        raise DataError(
            f"cannot read {path}: it is truncated ({total} bytes of data where the header "
            f"announces {needed}); re-export or re-copy the file"
        )
    if header.get_data_dtype().kind in "fc":
        check_finite(np.asanyarray(img.dataobj), str(path))
    return img


def nifti_header_bytes(
    nifti: nib.spatialimages.SpatialImage, image: sitk.Image, path: Path
) -> bytes | None:
    """The NIfTI-1 header of ``path`` if nibabel agrees with SimpleITK on the voxel grid."""
    if type(nifti.header) is not nib.Nifti1Header:
        return None
    shape = tuple(int(s) for s in nifti.shape)
    size = tuple(int(s) for s in image.GetSize())
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    while len(size) > 3 and size[-1] == 1:
        size = size[:-1]
    if shape != size:
        logger.warning(
            "nibabel shape %s != SimpleITK size %s for %s; not copying the header",
            shape,
            size,
            path,
        )
        return None
    return bytes(nifti.header.binaryblock)


def write_nifti_from_header(data: np.ndarray, geometry: Geometry, tmp: Path, what: str) -> None:
    """Write with nibabel using a copy of the input's NIfTI-1 header (qform/sform kept)."""
    assert geometry.nifti_header is not None
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(geometry.nifti_header))
    zooms = tuple(float(z) for z in hdr.get_zooms()[:3])
    pixdim = hdr["pixdim"].copy()
    xyz = np.asarray(data).T  # (D,H,W)->(W,H,D)=(x,y,z); (T,D,H,W)->(x,y,z,T)
    hdr.set_data_shape(xyz.shape)
    hdr.set_zooms(zooms + (1.0,) * (xyz.ndim - 3))
    new_pixdim = hdr["pixdim"].copy()
    new_pixdim[xyz.ndim + 1 :] = pixdim[xyz.ndim + 1 :]  # unused slots stay as in the input
    hdr["pixdim"] = new_pixdim
    hdr.set_data_dtype(xyz.dtype)
    hdr.set_slope_inter(None, None)
    hdr["cal_min"] = 0
    hdr["cal_max"] = 0
    hdr["intent_code"] = 0
    hdr["intent_name"] = b""
    hdr["descrip"] = f"hsam {what}".encode()[:79]
    img = nib.Nifti1Image(xyz, None, header=hdr)
    nib.save(img, str(tmp))
