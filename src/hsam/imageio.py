"""Medical volume IO that keeps the exact geometry of the input.

Reading goes through SimpleITK for every format, so arrays are always in SimpleITK/numpy order
``(z, y, x) = (D, H, W)`` and are never reoriented, flipped or transposed: voxel ``[k, j, i]``
of the array is voxel ``(i, j, k)`` of the file. :class:`Geometry` keeps what is needed to put a
label map back on exactly the same grid (size, spacing, origin, direction in ITK's LPS
convention, the original pixel type) and, for NIfTI inputs, the raw 348-byte NIfTI-1 header.

Writing:

* NIfTI output from a NIfTI input: written with nibabel from a copy of the input header, so the
  qform, sform, their codes, ``pixdim`` (including qfac) and units are the input's, bit for bit;
  only the data type, shape, scaling and description change. Any reader (ITK-SNAP, 3D Slicer,
  nibabel, SimpleITK) therefore maps the output exactly as it maps the input.
* Every other combination (MHA/MHD/NRRD, DICOM input to NIfTI output, ...): SimpleITK with the
  input's spacing, origin and direction.
* All writes are atomic: data go to a hidden temp file in the destination directory with the
  same extension (for ``.mhd``, whose data file is separate, to a hidden temp folder there) and
  are moved into place with :func:`os.replace`; a failed write leaves nothing behind. An
  existing output is refused (:class:`~hsam.errors.OutputExistsError`) unless ``overwrite``.

Supported inputs: ``.nii``, ``.nii.gz``, ``.mha``, ``.mhd`` (+ data file), ``.nrrd``, and a
folder holding one DICOM series (read with SimpleITK's ``ImageSeriesReader``/GDCM).

:func:`read_image` is the one reading path of every command (``predict`` through
:func:`read_volume`, ``train``/``evaluate``/``prepare`` through :mod:`hsam.data.formats`). It
adds the checks SimpleITK does not make: a truncated NIfTI (ITK zero-fills it), NaN/inf voxels
(ITK's NIfTI reader turns them into 0, so NIfTI data are checked with nibabel), NIfTI-2 (not
supported), and DICOM series with unreadable slice files or uneven slice positions.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk  # noqa: N813

from hsam.atomic import atomic_output as _atomic_output
from hsam.atomic import refuse_existing
from hsam.errors import DataError

logger = logging.getLogger(__name__)

#: Volume file extensions that can be read and written (lower case, ``.nii.gz`` first).
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
_FORMATS = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".mha": "metaimage",
    ".mhd": "metaimage",
    ".nrrd": "nrrd",
}
#: Extension used for outputs of a DICOM-series input.
DICOM_OUTPUT_EXTENSION = ".nii.gz"


def volume_extension(path: str | os.PathLike) -> str:
    """The supported volume extension of ``path`` (e.g. ``".nii.gz"``), or ``""`` if none."""
    name = Path(path).name.lower()
    for ext in SUPPORTED_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    return ""


def _require_extension(path: Path, what: str) -> str:
    ext = volume_extension(path)
    if not ext:
        raise DataError(
            f"{what} {path} has an unsupported extension; use one of "
            f"{', '.join(SUPPORTED_EXTENSIONS)} (or a folder holding one DICOM series)"
        )
    return ext


def _file_extension(path: Path) -> str:
    """Extension that a temp file must carry for writers to pick the same format."""
    ext = volume_extension(path)
    if ext:
        return ext
    return "".join(path.suffixes[-1:])


# --------------------------------------------------------------------------------------------
# geometry and volume
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """The voxel grid of a volume, enough to write a label map on exactly the same grid.

    Attributes (SimpleITK conventions, x fastest):
        size: ``(W, H, D)`` = SimpleITK ``GetSize()``.
        spacing: ``(x, y, z)`` spacing in mm = ``GetSpacing()``.
        origin: physical position of voxel ``(0, 0, 0)`` in mm, LPS = ``GetOrigin()``.
        direction: 9 direction cosines, row-major 3x3, LPS = ``GetDirection()``.
        pixel_type: the input's pixel type (``GetPixelIDTypeAsString()``), for the record.
        source_format: ``"nifti"``, ``"metaimage"``, ``"nrrd"``, ``"dicom"`` or ``"array"``.
        source_path: where it was read from (``""`` if built in memory).
        nifti_header: the input's raw NIfTI-1 header (348 bytes) or None.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    pixel_type: str = "8-bit unsigned integer"
    source_format: str = "array"
    source_path: str = ""
    nifti_header: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(D, H, W)`` of a volume on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def spacing_dhw(self) -> tuple[float, float, float]:
        """Spacing in array order ``(D, H, W)`` in mm (what :mod:`hsam.metrics` expects)."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @classmethod
    def from_image(
        cls,
        image: sitk.Image,
        *,
        source_format: str = "array",
        source_path: str = "",
        nifti_header: bytes | None = None,
    ) -> Geometry:
        """Geometry of a 3-D SimpleITK image."""
        if image.GetDimension() != 3:
            raise DataError(f"need a 3-D image for a geometry, got {image.GetDimension()}-D")
        return cls(
            size=tuple(int(s) for s in image.GetSize()),  # type: ignore[arg-type]
            spacing=tuple(float(s) for s in image.GetSpacing()),  # type: ignore[arg-type]
            origin=tuple(float(o) for o in image.GetOrigin()),  # type: ignore[arg-type]
            direction=tuple(float(d) for d in image.GetDirection()),
            pixel_type=image.GetPixelIDTypeAsString(),
            source_format=source_format,
            source_path=source_path,
            nifti_header=nifti_header,
        )

    @classmethod
    def default(cls, shape: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Geometry:
        """Identity-direction, zero-origin grid for an array ``shape`` ``(D, H, W)`` and
        ``spacing`` ``(D, H, W)`` -- for data that carry no geometry (e.g. ``.npy.h5``)."""
        if len(shape) != 3 or len(spacing) != 3:
            raise DataError(f"shape and spacing must have 3 values, got {shape}, {spacing}")
        d, h, w = (int(s) for s in shape)
        sd, sh, sw = (float(s) for s in spacing)
        return cls((w, h, d), (sw, sh, sd), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this grid's spacing, origin and direction on a 3-D ``image`` (in place)."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def matches(self, other: Geometry, *, atol: float = 1e-6) -> bool:
        """Same size, and spacing/origin/direction equal within ``atol``."""
        return (
            tuple(self.size) == tuple(other.size)
            and np.allclose(self.spacing, other.spacing, rtol=0, atol=atol)
            and np.allclose(self.origin, other.origin, rtol=0, atol=atol)
            and np.allclose(self.direction, other.direction, rtol=0, atol=atol)
        )


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3-D volume as read from disk.

    Attributes:
        array: ``(D, H, W)`` numpy array in the file's pixel type, not reoriented.
        spacing: ``(D, H, W)`` spacing in mm (reverse of SimpleITK's ``GetSpacing()``).
        geometry: the grid, for writing outputs on exactly the same grid.
        path: the file or DICOM folder it came from.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    geometry: Geometry
    path: Path


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def _itk_message(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "ERROR" in ln or "error" in ln or "exception" in ln.lower():
            return ln[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _ensure_3d(image: sitk.Image, path: Path) -> sitk.Image:
    dim = image.GetDimension()
    size = tuple(image.GetSize())
    if dim == 4 and size[3] == 1:
        return sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, 0])
    if dim == 2:
        raise DataError(
            f"{path} is a 2-D image (size {size}); hsam needs a 3-D volume: stack the slices "
            "into one volume file, or pass the folder of the DICOM series"
        )
    if dim != 3:
        raise DataError(
            f"{path} is a {dim}-D image (size {size}) where a 3-D volume is needed (several "
            "time points or channels?); split it into one 3-D file per time point/channel"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour "
            "or vector image); hsam needs a scalar 3-D volume: convert it to grey values"
        )
    return image


def check_finite(array: np.ndarray, where: str) -> None:
    """Refuse an image with NaN or infinite voxels; ``where`` (the file) starts the message."""
    finite = np.isfinite(array)
    if not finite.all():
        n_bad = int(finite.size - np.count_nonzero(finite))
        raise DataError(
            f"{where}: image contains {n_bad} NaN/inf voxel(s). Fix or re-export the volume "
            "(e.g. replace NaN by the background value) before using it."
        )


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
    if _FORMATS.get(volume_extension(path)) != "nifti" or not path.is_file():
        return
    try:
        header = nib.load(str(path)).header
    except Exception:  # nibabel raises many types on odd files; the full read reports them
        return
    _refuse_nifti2(path, header)


def _check_nifti(path: Path) -> nib.spatialimages.SpatialImage | None:
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


def _nifti_header_bytes(
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


def _read_dicom_series(folder: Path) -> sitk.Image:
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise DataError(f"cannot scan {folder} for DICOM files: {_itk_message(exc)}") from exc
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
            f"cannot read the DICOM series in {folder}: {_itk_message(exc)}; check that every "
            "slice is complete and belongs to the same series"
        ) from exc
    _refuse_slice_gaps(folder, image, reader)
    return image


@dataclass(frozen=True)
class ImageFile:
    """An image as :func:`read_image` read it, before any reshaping.

    Attributes:
        image: the SimpleITK image, any dimension.
        source_format: ``"nifti"``, ``"metaimage"``, ``"nrrd"`` or ``"dicom"``.
        nifti_header: the raw NIfTI-1 header when nibabel agrees on the grid, else None.
    """

    image: sitk.Image
    source_format: str
    nifti_header: bytes | None = field(default=None, repr=False)


def read_image(path: str | os.PathLike) -> ImageFile:
    """Read a volume file or DICOM folder with every integrity check: the one reading path of
    every command (``predict`` through :func:`read_volume`; ``train``, ``evaluate`` and
    ``prepare`` through :mod:`hsam.data.formats`).

    Refused with a :class:`DataError` naming the file: a missing path, an unsupported
    extension, NIfTI-2, a truncated or corrupt file, NaN/inf voxels, a DICOM series with
    unreadable slices or uneven slice positions. The image keeps its dimension (2-D, 4-D and
    vector images are for the caller to accept or refuse).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; check the path")
    if path.is_dir():
        return ImageFile(image=_read_dicom_series(path), source_format="dicom")
    if path.name.lower().endswith(".nhdr"):  # detached NRRD header (nnU-Net datasets); read only
        ext, fmt = ".nhdr", "nrrd"
    else:
        ext = _require_extension(path, "input")
        fmt = _FORMATS[ext]
    nifti = _check_nifti(path) if fmt == "nifti" else None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        hint = " (the data file named in a .mhd must sit next to it)" if ext == ".mhd" else ""
        raise DataError(
            f"cannot read {path}: {_itk_message(exc)}; the file is corrupt, truncated or "
            f"not a valid {fmt} volume{hint}"
        ) from exc
    if fmt != "nifti" and image.GetPixelID() in _FLOAT_PIXEL_IDS:
        check_finite(sitk.GetArrayViewFromImage(image), str(path))
    header = _nifti_header_bytes(nifti, image, path) if nifti is not None else None
    return ImageFile(image=image, source_format=fmt, nifti_header=header)


_FLOAT_PIXEL_IDS = frozenset(
    {sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64}
)


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3-D volume with its exact geometry.

    Args:
        path: a ``.nii``/``.nii.gz``/``.mha``/``.mhd``/``.nrrd`` file, or a folder holding one
            DICOM series.

    Returns:
        :class:`Volume` with ``array`` ``(D, H, W)`` in SimpleITK order (no reorientation),
        ``spacing`` ``(D, H, W)`` mm and the :class:`Geometry`. A 4-D file whose 4th dimension
        has size 1 is read as 3-D.

    Raises:
        DataError: everything :func:`read_image` refuses, a 2-D or genuinely 4-D image, or a
            vector/colour image.
    """
    path = Path(path)
    read = read_image(path)
    image = _ensure_3d(read.image, path)
    geometry = Geometry.from_image(
        image,
        source_format=read.source_format,
        source_path=str(path),
        nifti_header=read.nifti_header,
    )
    try:
        array = sitk.GetArrayFromImage(image)
    except RuntimeError as exc:  # pragma: no cover - lazy readers may fail here
        raise DataError(f"cannot read the voxels of {path}: {_itk_message(exc)}") from exc
    logger.debug("read %s: shape %s spacing %s", path, array.shape, geometry.spacing_dhw)
    return Volume(array=array, spacing=geometry.spacing_dhw, geometry=geometry, path=path)


def _is_dicom_series(folder: Path) -> bool:
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False


def list_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand user-given paths into a sorted, de-duplicated list of readable inputs.

    A file must have a supported extension. A folder expands to the volume files directly in
    it (hidden files skipped, sorted by name); a folder without volume files that holds a
    DICOM series is itself one input; otherwise its sub-folders holding DICOM series are.

    Raises:
        DataError: a path does not exist, has an unsupported extension, or a folder holds
            nothing readable.
    """
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise DataError(f"input {p} does not exist; check the path")
        if p.is_file():
            _require_extension(p, "input")
            found.append(p)
            continue
        entries = sorted(e for e in p.iterdir() if not e.name.startswith("."))
        files = [e for e in entries if e.is_file() and volume_extension(e)]
        if files:
            found.extend(files)
        elif _is_dicom_series(p):
            found.append(p)
        else:
            series = [e for e in entries if e.is_dir() and _is_dicom_series(e)]
            if not series:
                raise DataError(
                    f"input folder {p} holds no volume files ({', '.join(SUPPORTED_EXTENSIONS)})"
                    " and no DICOM series; point to the files or the series folders"
                )
            found.extend(series)
    unique: list[Path] = []
    seen: set[Path] = set()
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


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
        ext_in = _require_extension(inp, "input")
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
    """:func:`hsam.atomic.atomic_output` for a volume file: the temp file keeps the volume
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


def _write_nifti_from_header(data: np.ndarray, geometry: Geometry, tmp: Path, what: str) -> None:
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


def _write_array(
    data: np.ndarray, geometry: Geometry, path: Path, *, overwrite: bool, what: str
) -> None:
    ext = _require_extension(path, "output")
    with atomic_output(path, overwrite=overwrite) as tmp:
        if _FORMATS[ext] == "nifti" and geometry.nifti_header is not None:
            _write_nifti_from_header(data, geometry, tmp, what)
        else:
            image = _to_sitk(data, geometry)
            try:
                sitk.WriteImage(image, str(tmp), useCompression=ext != ".nii")
            except RuntimeError as exc:
                raise DataError(f"cannot write {path}: {_itk_message(exc)}") from exc
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
    ext = _require_extension(path, "output")
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
    _require_extension(path, "output")
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
                _write_nifti_from_header(arr[t], geometry, tmp, "probabilities")
            else:
                sitk.WriteImage(
                    _to_sitk(arr[t], geometry),
                    str(tmp),
                    useCompression=volume_extension(p) != ".nii",
                )
    logger.debug("wrote %d per-class probability files next to %s", len(paths), path)
    return paths
