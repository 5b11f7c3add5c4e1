"""Dataset formats behind one registry: every layout is one small module defining one
:class:`DatasetFormat` record (list, read, detect, and its 2-D slice files where it has any).

Every reader converts to the ``(D, H, W)`` convention of :mod:`hsam.data.case` (2-D slices along
axis 0, spacing in mm along ``(D, H, W)``), returns float32 images and uint8 labels, and
validates each case (shapes, finite intensities, label range) with a :class:`DataError` that
names the file. Per-format axis conventions:

==============  =========================================  ==================================
format          file layout                                 axes on disk -> (D, H, W)
==============  =========================================  ==================================
``synapse``     ``test_vol_h5/caseXXXX.npy.h5`` (+ 2-D       already ``(D, H, W)`` (TransUNet
                ``train_npz/caseXXXX_sliceNNN.npz``)          transposed NIfTI ``(x,y,z)`` to
                                                             ``(z,y,x)``); spacing unknown
``la``          ``2018LA_Seg_Training Set/<ID>/              ``(X, Y, Z)`` -> ``(Z, X, Y)``
                mri_norm2.h5``                               (axial slices along Z)
``acdc``        ``data/<frame>.h5`` (3-D), ``data/slices/    already ``(D, H, W)``; spacing
                <frame>_slice_N.h5`` (2-D)                   unknown
``promise12``   ``CaseXX.mhd`` + ``CaseXX_segmentation.mhd``  SimpleITK ``(z, y, x)``
``nnunet``      ``imagesTr/C_0000.ext``, ``labelsTr/C.ext``,  SimpleITK ``(z, y, x)``
                ``dataset.json``
``prepared``    ``cases/<id>.npz`` + ``dataset.json``         as written by
                                                             :func:`hsam.data.prepare.prepare`
==============  =========================================  ==================================

Adding a format: write ``formats/<name>.py`` with its readers and one :class:`DatasetFormat`,
and add the record to :data:`REGISTRY` below.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from hsam.data.case import Case
from hsam.data.formats.acdc import ACDC
from hsam.data.formats.base import DatasetFormat, SliceFiles
from hsam.data.formats.common import read_list
from hsam.data.formats.la import LA
from hsam.data.formats.nnunet import NNUNET
from hsam.data.formats.prepared import PREPARED
from hsam.data.formats.promise12 import PROMISE12
from hsam.data.formats.synapse import SYNAPSE
from hsam.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "REGISTRY",
    "DatasetFormat",
    "SliceFiles",
    "detect_format",
    "get_format",
    "list_cases",
    "read_dataset",
    "read_list",
    "slice_files_format",
]

#: Every format by name, in the order :func:`detect_format` tries them: most specific layout
#: first (a prepared folder has ``cases/`` *and* ``dataset.json``; PROMISE12's ``Case*.mhd``
#: search is recursive, so it would also match other layouts holding such files and goes last).
REGISTRY: dict[str, DatasetFormat] = {
    fmt.name: fmt for fmt in (PREPARED, LA, SYNAPSE, NNUNET, ACDC, PROMISE12)
}
#: Formats understood by :func:`read_dataset`.
FORMATS = tuple(REGISTRY)


def get_format(format: str) -> DatasetFormat:
    """The record of ``format`` (case and surrounding blanks ignored).

    Raises:
        DataError: an unknown name, listing the known ones.
    """
    key = format.strip().lower()
    if key not in REGISTRY:
        raise DataError(f"unknown dataset format {format!r}; use one of {', '.join(FORMATS)}.")
    return REGISTRY[key]


def _existing_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset root {root} does not exist; check the path.")
    return root


def list_cases(format: str, root: str | Path) -> list[str]:
    """Case ids that :func:`read_dataset` reads when ``ids`` is None, without reading them."""
    root = _existing_root(root)
    return get_format(format).list_cases(root)


def read_dataset(format: str, root: str | Path, ids: Iterable[str] | None = None) -> list[Case]:
    """Read the cases ``ids`` (default: all, see each reader) of a dataset in ``format``.

    Args:
        format: one of :data:`FORMATS` (``synapse``, ``la``, ``acdc``, ``promise12``,
            ``nnunet``, ``prepared``).
        root: dataset folder.
        ids: case ids, or ``None`` for the reader's default (documented per reader).

    Returns:
        validated cases, in the order of ``ids``.
    """
    fmt = get_format(format)
    root = _existing_root(root)
    cases = fmt.read_cases(root, ids)
    logger.debug("read %d %s case(s) from %s", len(cases), fmt.name, root)
    return cases


def detect_format(root: str | Path) -> str:
    """Guess the :func:`read_dataset` format of a dataset folder from its layout: the first
    format of :data:`REGISTRY` whose ``detect`` accepts it.

    ``cases/`` + ``dataset.json`` -> ``prepared``; ``2018LA_Seg_Training Set/`` or
    ``*/mri_norm2.h5`` -> ``la``; ``test_vol_h5/`` or ``*.npy.h5`` -> ``synapse``;
    ``imagesTr/`` -> ``nnunet``; ``data/*.h5`` or ``data/slices/`` -> ``acdc``;
    ``Case*.mhd`` -> ``promise12``.

    Raises:
        DataError: the folder does not exist or matches none of them.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; check the path")
    for fmt in REGISTRY.values():
        if fmt.detect(root):
            return fmt.name
    raise DataError(
        f"cannot tell the dataset format of {root} from its layout; pass format= one of "
        f"{', '.join(FORMATS)} (--format on the command line)"
    )


def slice_files_format(path: str | Path) -> DatasetFormat:
    """The format whose 2-D slice files end like ``path``.

    Raises:
        DataError: no format has slice files with that ending.
    """
    name = Path(path).name
    for fmt in REGISTRY.values():
        if fmt.slice_files is not None and name.endswith(fmt.slice_files.suffixes):
            return fmt
    kinds = [
        f"{'/'.join(f.slice_files.suffixes)} ({f.name})"
        for f in REGISTRY.values()
        if f.slice_files is not None
    ]
    raise DataError(f"{path}: unknown slice file type; expected {' or '.join(kinds)}.")
