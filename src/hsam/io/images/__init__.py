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

Layout (one responsibility a module; every public name is importable from ``hsam.io.images``):
:mod:`~hsam.io.images.volume` (extensions, :class:`Geometry`, :class:`Volume`),
:mod:`~hsam.io.images.nifti` (NIfTI checks and header-preserving writes),
:mod:`~hsam.io.images.dicom` (DICOM series), :mod:`~hsam.io.images.reading` and
:mod:`~hsam.io.images.writing`.
"""

from hsam.io.atomic import refuse_existing
from hsam.io.images.dicom import DICOM_STEP_TOLERANCE
from hsam.io.images.nifti import refuse_unsupported_nifti
from hsam.io.images.reading import ImageFile, list_inputs, read_image, read_volume
from hsam.io.images.volume import (
    DICOM_OUTPUT_EXTENSION,
    SUPPORTED_EXTENSIONS,
    Geometry,
    Volume,
    check_finite,
    volume_extension,
)
from hsam.io.images.writing import (
    atomic_output,
    safe_output_path,
    write_label_volume,
    write_probability_volume,
)

__all__ = [
    "DICOM_OUTPUT_EXTENSION",
    "DICOM_STEP_TOLERANCE",
    "SUPPORTED_EXTENSIONS",
    "Geometry",
    "ImageFile",
    "Volume",
    "atomic_output",
    "check_finite",
    "list_inputs",
    "read_image",
    "read_volume",
    "refuse_existing",
    "refuse_unsupported_nifti",
    "safe_output_path",
    "volume_extension",
    "write_label_volume",
    "write_probability_volume",
]
