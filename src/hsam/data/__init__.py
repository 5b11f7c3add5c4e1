"""Data layer: volumes (:class:`Case`), format readers, 2-D training slices, augmentation,
few-shot splits and the ``prepare`` converter.

Axis convention everywhere: volumes are ``(D, H, W)`` with 2-D slices ``image[d]``; spacing in
mm along ``(D, H, W)``. See :mod:`hsam.data.formats` for each format's conversion.
"""

from __future__ import annotations

from hsam.data.augment import Augmenter
from hsam.data.case import Case
from hsam.data.formats import FORMATS, detect_format, list_cases, read_dataset, read_list
from hsam.data.formats.synapse import (
    read_synapse_slice,
    read_synapse_training_volume,
    read_synapse_volume,
)
from hsam.data.prepare import PrepareResult, prepare, save_case_npz
from hsam.data.slices import (
    SliceDataset,
    class_frequencies,
    class_volume_fraction_ranges,
    class_volume_fractions,
    fit_image,
    fit_label,
    fitted_extent,
    parse_slice_id,
    resize_image,
    resize_label,
    slice_id,
)
from hsam.data.splits import (
    carve_validation,
    make_manifest,
    manifest_sha256,
    read_manifest,
    select_cases,
    select_slice_fraction,
    standard_split,
    standard_split_path,
    write_manifest,
)
from hsam.intensity import apply_intensity, ct_window, minmax, zscore

__all__ = [
    "FORMATS",
    "Augmenter",
    "Case",
    "PrepareResult",
    "SliceDataset",
    "apply_intensity",
    "carve_validation",
    "class_frequencies",
    "class_volume_fraction_ranges",
    "class_volume_fractions",
    "ct_window",
    "detect_format",
    "list_cases",
    "make_manifest",
    "manifest_sha256",
    "minmax",
    "parse_slice_id",
    "prepare",
    "read_dataset",
    "read_list",
    "read_manifest",
    "read_synapse_slice",
    "read_synapse_training_volume",
    "read_synapse_volume",
    "fit_image",
    "fit_label",
    "fitted_extent",
    "resize_image",
    "resize_label",
    "save_case_npz",
    "select_cases",
    "select_slice_fraction",
    "slice_id",
    "standard_split",
    "standard_split_path",
    "write_manifest",
    "zscore",
]
