"""The record every dataset format registers (see :mod:`hsam.data.formats`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hsam.data.case import Case

__all__ = ["DatasetFormat", "SliceFiles"]


@dataclass(frozen=True, kw_only=True)
class SliceFiles:
    """A format's 2-D training slice files (one image/label pair per file).

    Attributes:
        suffixes: file endings, the first the one a slice list names; also how a file's
            format is recognised.
        folder: dataset root -> the folder holding ``<slice id><suffix>``.
        read: file -> ``(image float32 (H, W), label uint8 (H, W))``.
        intensity: what the files' images already had applied (an :mod:`hsam.intensity` name).
    """

    suffixes: tuple[str, ...]
    folder: Callable[[Path], Path]
    read: Callable[[Path], tuple[np.ndarray, np.ndarray]]
    intensity: str


@dataclass(frozen=True, kw_only=True)
class DatasetFormat:
    """One dataset layout: how to list, read and recognise it.

    Attributes:
        name: the ``format`` string of configs and the command line.
        list_cases: root -> the case ids ``read_cases(root, None)`` reads, without reading them.
        read_cases: ``(root, ids or None)`` -> validated cases in the order of ``ids``.
        detect: root -> whether the folder has this layout (cheap: looks at names only).
        slice_files: the format's 2-D slice files, or None where it has none.
    """

    name: str
    list_cases: Callable[[Path], list[str]]
    read_cases: Callable[[Path, Iterable[str] | None], list[Case]]
    detect: Callable[[Path], bool]
    slice_files: SliceFiles | None = None
