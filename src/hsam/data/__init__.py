"""Data layer: volumes (:class:`Case`), format readers, 2-D training slices, augmentation,
few-shot splits and the ``prepare`` converter.

Axis convention everywhere: volumes are ``(D, H, W)`` with 2-D slices ``image[d]``; spacing in
mm along ``(D, H, W)``. See :mod:`hsam.data.readers` for each format's conversion.
"""

from __future__ import annotations

from hsam.data.augment import Augmenter
from hsam.data.case import Case
from hsam.data.prepare import PrepareResult, prepare, save_case_npz
from hsam.data.readers import (
    FORMATS,
    apply_intensity,
    ct_window,
    list_cases,
    minmax,
    read_dataset,
    read_list,
    read_synapse_slice,
    read_synapse_training_volume,
    read_synapse_volume,
    zscore,
)
from hsam.data.slices import (
    SliceDataset,
    class_frequencies,
    class_volume_fraction_ranges,
    class_volume_fractions,
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
