"""2-D training slices as a torch ``Dataset``, slice resizing, class frequencies, and the
per-case range of each class's volume fraction (for the prediction-size check of
:mod:`hsam.inference.volume_check`).

Each item is ``{"image": float32 (1, S, S), "label": int64 (S, S), "case_id": str,
"slice_index": int}``: the native slice, optionally augmented (before resizing), then brought
to ``S x S`` (image: linear or cubic; label: nearest neighbour, always), either stretched or,
with ``input_resize="pad"``, with its aspect kept and zeros below and to the right
(:func:`fitted_extent`; inference crops the same region back).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from hsam.config import InputResize
from hsam.data.augment import Augmenter
from hsam.data.case import Case
from hsam.data.formats import REGISTRY, get_format, slice_files_format
from hsam.data.formats.common import parse_slice_id, slice_id
from hsam.errors import DataError
from hsam.intensity import VolumeMapping, fit_volume_mapping

logger = logging.getLogger(__name__)

__all__ = [
    "SliceDataset",
    "class_frequencies",
    "class_volume_fraction_ranges",
    "class_volume_fractions",
    "fit_image",
    "fit_label",
    "fitted_extent",
    "parse_slice_id",
    "resize_image",
    "resize_label",
    "slice_id",
]

AugmentFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def _resample(arr: np.ndarray, size: tuple[int, int], order: int) -> np.ndarray:
    """Resize ``(H, W)`` to ``size`` with pixel-edge alignment (like torch
    ``align_corners=False``): output pixel ``o`` samples input ``(o + 0.5) * H / S - 0.5``."""
    H, W = arr.shape
    if size == (H, W):
        return arr.copy()
    sy, sx = H / size[0], W / size[1]
    return ndimage.affine_transform(
        arr,
        np.array([sy, sx]),
        offset=(0.5 * sy - 0.5, 0.5 * sx - 0.5),
        output_shape=size,
        order=order,
        mode="nearest",
    )


def resize_image(image: np.ndarray, size: int | tuple[int, int], order: int = 3) -> np.ndarray:
    """Resize a 2-D image ``(H, W)`` to ``size`` (spline ``order``: 1 linear, 3 cubic)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"resize_image expects (H, W), got shape {image.shape}")
    return _resample(image, _size2(size), order).astype(np.float32, copy=False)


def resize_label(label: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a 2-D label ``(H, W)`` to ``size`` with nearest neighbour (dtype kept)."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"resize_label expects (H, W), got shape {label.shape}")
    return _resample(label, _size2(size), 0)


def fitted_extent(shape: tuple[int, int], size: int | tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` a ``(H, W)`` slice takes inside ``size`` with its aspect kept (longer side
    to the target, the other rounded): the content region of ``input_resize="pad"``."""
    H, W = int(shape[0]), int(shape[1])
    target_h, target_w = _size2(size)
    scale = min(target_h / H, target_w / W)
    return min(target_h, max(1, round(H * scale))), min(target_w, max(1, round(W * scale)))


def _fit(
    arr: np.ndarray,
    size: int | tuple[int, int],
    resize: InputResize,
    resample: Callable[[np.ndarray, tuple[int, int]], np.ndarray],
) -> np.ndarray:
    """`arr` resampled to `size` (stretch), or to its :func:`fitted_extent` and zero-padded
    below and to the right (pad): one decision for images and labels, as inference makes it."""
    target = _size2(size)
    if resize != "pad":
        return resample(arr, target)
    inner = resample(arr, fitted_extent(np.shape(arr), target))
    out = np.zeros(target, dtype=inner.dtype)
    out[: inner.shape[0], : inner.shape[1]] = inner
    return out


def fit_image(
    image: np.ndarray,
    size: int | tuple[int, int],
    order: int = 3,
    *,
    resize: InputResize = "stretch",
) -> np.ndarray:
    """A 2-D image brought to ``size``: stretched, or (``resize="pad"``) resized to its
    :func:`fitted_extent` and zero-padded below and to the right."""
    return _fit(image, size, resize, lambda a, s: resize_image(a, s, order))


def fit_label(
    label: np.ndarray, size: int | tuple[int, int], *, resize: InputResize = "stretch"
) -> np.ndarray:
    """A 2-D label brought to ``size`` as :func:`fit_image` brings its image (padding is
    background, 0)."""
    return _fit(label, size, resize, resize_label)


def _read_slice_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    slice_files = slice_files_format(path).slice_files
    assert slice_files is not None  # slice_files_format returns only formats that have them
    return slice_files.read(path)


def _volume_mappings(files: Sequence[Path], policy: str, already: str) -> dict[str, VolumeMapping]:
    """`policy` fitted per volume, over all of that volume's slice files."""
    groups: dict[str, list[Path]] = {}
    for p in files:
        groups.setdefault(parse_slice_id(p.name.split(".")[0])[0], []).append(p)
    mappings = {}
    for case_id, group in groups.items():
        values = np.concatenate([_read_slice_file(p)[0].ravel() for p in group])
        try:
            mappings[case_id] = fit_volume_mapping(values, policy, already=already)
        except DataError as e:
            raise DataError(f"volume {case_id} ({group[0].parent}): {e}") from None
    return mappings


class SliceDataset(Dataset):
    """2-D training slices of a few-shot split.

    Build it from cases (``SliceDataset(cases, size)``) or from 2-D slice files
    (:meth:`from_slice_files`, :meth:`from_slice_list`).

    Args:
        cases: volumes whose slices ``image[d]`` are the samples (cases without a label are
            refused).
        size: output side ``S`` (or ``(S_h, S_w)``).
        foreground_only: keep only slices whose label has a voxel > 0 (LA, PROMISE12 protocol).
        slice_ids: keep only these slices (``<case>_sliceNNN`` or ``<case>_slice_N``).
        augment: ``f(image2d, label2d) -> (image2d, label2d)`` applied to the native slice
            before resizing. An :class:`Augmenter` gets a per-sample generator derived from
            ``(seed, epoch, index)`` when ``seed`` is set, so results do not depend on the
            number or order of data-loader workers; call :meth:`set_epoch` every epoch.
        image_order: spline order for the image resize (1 linear, 3 cubic; upstream 3).
        input_resize: ``"stretch"`` to ``size`` or ``"pad"`` (aspect kept, zeros below and to
            the right): the model's ``input_resize``, which inference repeats.
        seed: base seed of the per-sample generators (``None``: drawn once from the
            :class:`Augmenter`'s own generator, so a seeded augmenter stays reproducible).
    """

    def __init__(
        self,
        cases: Sequence[Case] = (),
        size: int | tuple[int, int] = 512,
        *,
        foreground_only: bool = False,
        slice_ids: Iterable[str] | None = None,
        augment: AugmentFn | None = None,
        image_order: int = 3,
        seed: int | None = None,
        input_resize: InputResize = "stretch",
    ) -> None:
        if input_resize not in ("stretch", "pad"):
            raise ValueError(f"input_resize must be 'stretch' or 'pad', got {input_resize!r}")
        self.size = _size2(size)
        self.input_resize = input_resize
        self.augment = augment
        self.image_order = int(image_order)
        if seed is None and isinstance(augment, Augmenter):
            # per-sample generators even without an explicit seed, derived from the
            # augmenter's own seeded RNG, so data-loader workers do not repeat each other
            seed = int(augment.rng.integers(0, 2**63 - 1))
        self.seed = seed
        self.epoch = 0
        self._cases: list[Case] = list(cases)
        self._files: list[Path] = []
        # the intensity policy fitted per case id, applied to slice files (from_slice_files)
        self._intensity: dict[str, VolumeMapping] = {}
        self._items: list[tuple[str, int, int]] = []  # (case_id, slice_index, source index)
        wanted = None if slice_ids is None else {parse_slice_id(s) for s in slice_ids}
        for ci, case in enumerate(self._cases):
            if case.label is None:
                raise DataError(
                    f"case {case.case_id!r} ({case.source}) has no label; training slices "
                    "need labels."
                )
            fg = set(case.foreground_slices()) if foreground_only else None
            for d in range(case.num_slices):
                if fg is not None and d not in fg:
                    continue
                if wanted is not None and (case.case_id, d) not in wanted:
                    continue
                self._items.append((case.case_id, d, ci))
        if wanted is not None and self._cases:
            missing = wanted - {(c, d) for c, d, _ in self._items}
            if missing:
                names = sorted(slice_id(c, d) for c, d in missing)[:5]
                raise DataError(
                    f"{len(missing)} requested slice(s) not found in the cases, e.g. {names}; "
                    "check the split file against the data."
                )
        if self._cases and not self._items:
            raise DataError(
                "no training slices selected (all slices empty or filtered out); check the "
                "split and foreground_only."
            )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_slice_files(
        cls,
        paths: Iterable[str | Path],
        size: int | tuple[int, int] = 512,
        *,
        foreground_only: bool = False,
        intensity: tuple[str, str] | None = None,
        **kwargs: Any,
    ) -> SliceDataset:
        """Dataset over 2-D slice files: Synapse ``caseXXXX_sliceNNN.npz`` or ACDC
        ``<frame>_slice_N.h5``. Files are read lazily per item (and once at construction
        when ``foreground_only`` or ``intensity``). ``kwargs`` as in the constructor.

        ``intensity``: ``(policy, already)`` of :func:`hsam.intensity.fit_volume_mapping`,
        fitted once per volume over all of its given slices (before the foreground filter),
        so the slices of a volume share one mapping as the whole volume does at test time.
        """
        ds = cls((), size, **kwargs)
        files = [Path(p) for p in paths]
        for p in files:
            if not p.is_file():
                raise DataError(f"slice file {p} does not exist; check the root and split list.")
        if intensity is not None:
            ds._intensity = _volume_mappings(files, *intensity)
        for p in files:
            case_id, index = parse_slice_id(p.name.split(".")[0])
            if foreground_only and not _read_slice_file(p)[1].any():
                continue
            ds._items.append((case_id, index, len(ds._files)))
            ds._files.append(p)
        if not ds._items:
            raise DataError("no slice files selected; the list is empty or has no foreground.")
        return ds

    @classmethod
    def from_slice_list(
        cls,
        format: str,
        root: str | Path,
        slice_ids: Iterable[str],
        size: int | tuple[int, int] = 512,
        **kwargs: Any,
    ) -> SliceDataset:
        """Slices named in a list: ``format="synapse"`` reads
        ``root/train_npz/<id>.npz`` (or ``root/<id>.npz``); ``"acdc"`` reads
        ``root/data/slices/<id>.h5``."""
        root = Path(root)
        ids = list(slice_ids)
        if not ids:
            raise DataError("empty slice list; the split names no training slice.")
        slice_files = get_format(format).slice_files
        if slice_files is None:
            having = [f.name for f in REGISTRY.values() if f.slice_files is not None]
            raise DataError(
                f"slice files exist for {' and '.join(map(repr, having))}, not {format!r}."
            )
        base = slice_files.folder(root)
        paths = [base / f"{i}{slice_files.suffixes[0]}" for i in ids]
        return cls.from_slice_files(paths, size, **kwargs)

    # ------------------------------------------------------------------ access
    @property
    def slice_ids(self) -> list[str]:
        """Ids of the samples (file stem for file-based datasets, ``<case>_sliceNNN`` else)."""
        if self._files:
            return [self._files[src].name.split(".")[0] for _, _, src in self._items]
        return [slice_id(c, d) for c, d, _ in self._items]

    @property
    def case_ids(self) -> list[str]:
        """Distinct case ids, in sample order."""
        return list(dict.fromkeys(c for c, _, _ in self._items))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch for the per-sample augmentation generators."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._items)

    def raw_slice(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Native ``(image (H, W) float32, label (H, W) uint8)`` of sample ``index``,
        neither augmented nor resized."""
        _, d, src = self._items[index]
        if self._files:
            return _read_slice_file(self._files[src])
        case = self._cases[src]
        assert case.label is not None
        return case.image[d], case.label[d]

    def iter_case_labels(self) -> Iterator[tuple[str, list[np.ndarray]]]:
        """Native label arrays of each training case, for per-case class statistics.

        Yields ``(case_id, labels)`` once per case with at least one sample, in sample order:

        * built from cases: ``[case.label]``, the **whole** label volume, every slice of it,
          whatever ``foreground_only`` / ``slice_ids`` selected (the size of a structure in a
          volume is what a prediction on a whole volume is compared with);
        * built from slice files (Synapse npz, ACDC h5): the selected native label slices of
          that case (there is no volume to read), so a "case" is the set of its training slices.
        """
        if self._cases:
            seen: dict[int, str] = {}
            for case_id, _, src in self._items:
                seen.setdefault(src, case_id)
            for src, case_id in seen.items():
                label = self._cases[src].label
                assert label is not None  # refused in __init__
                yield case_id, [label]
            return
        groups: dict[str, list[int]] = {}
        for i, (case_id, _, _) in enumerate(self._items):
            groups.setdefault(case_id, []).append(i)
        for case_id, indices in groups.items():
            yield case_id, [self.raw_slice(i)[1] for i in indices]

    def iter_labels(self) -> Iterator[np.ndarray]:
        """Native label slices of all samples (for :func:`class_frequencies`)."""
        for i in range(len(self)):
            yield self.raw_slice(i)[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        case_id, d, _ = self._items[index]
        image, label = self.raw_slice(index)
        if case_id in self._intensity:
            image = self._intensity[case_id](image)
        if self.augment is not None:
            if isinstance(self.augment, Augmenter) and self.seed is not None:
                # one generator per (seed, epoch, sample): independent of worker count/order
                rng = np.random.default_rng([self.seed, self.epoch, index])
                image, label = self.augment(image, label, rng=rng)
            else:
                image, label = self.augment(image, label)
        image = fit_image(image, self.size, self.image_order, resize=self.input_resize)
        label = fit_label(np.asarray(label), self.size, resize=self.input_resize)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)[None]),
            "label": torch.from_numpy(label.astype(np.int64)),
            "case_id": case_id,
            "slice_index": int(d),
        }


def _class_counts(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Voxels per class ``0..K`` of one label array (DataError on a value above ``K``)."""
    bc = np.bincount(np.asarray(label, dtype=np.int64).ravel(), minlength=num_classes + 1)
    if bc.size > num_classes + 1 and bc[num_classes + 1 :].any():
        bad = (np.flatnonzero(bc[num_classes + 1 :]) + num_classes + 1).tolist()
        raise DataError(
            f"label values {bad} exceed K = {num_classes}; set num_classes to the dataset's "
            "number of foreground classes or remap the labels."
        )
    return bc[: num_classes + 1]


def class_frequencies(data: SliceDataset | Sequence[Case], num_classes: int) -> np.ndarray:
    """Fraction of voxels per class, background included, over the training slices.

    Args:
        data: a :class:`SliceDataset` (its selected native label slices, before augmentation
            and resizing) or cases (all labelled voxels).
        num_classes: ``K`` foreground classes.

    Returns:
        float64 array ``(K + 1,)`` summing to 1.

    Raises:
        DataError: a label value above ``K``, or no labelled voxel at all.
    """
    counts = np.zeros(num_classes + 1, dtype=np.int64)
    labels: Iterable[np.ndarray]
    if isinstance(data, SliceDataset):
        labels = data.iter_labels()
    else:
        labels = (c.label for c in data if c.label is not None)
    for lab in labels:
        counts += _class_counts(lab, num_classes)
    total = counts.sum()
    if total == 0:
        raise DataError("no labelled voxels to count class frequencies from.")
    return counts / total


def class_volume_fractions(
    data: SliceDataset | Sequence[Case], num_classes: int
) -> dict[str, np.ndarray]:
    """Per training case, the fraction of its voxels that each class occupies.

    Args:
        data: a :class:`SliceDataset` or cases. A dataset built from cases counts each case's
            **whole** label volume (all slices, also where ``foreground_only`` or
            ``slice_ids`` left slices out of training); one built from slice files counts the
            case's selected slices only (fraction = class voxels / voxels of those slices),
            see :meth:`SliceDataset.iter_case_labels`. Cases (a sequence) count their whole
            label volume; unlabelled ones are skipped.
        num_classes: ``K`` foreground classes.

    Returns:
        ``{case_id: float64 array (K + 1,)}`` (background included, summing to 1), in case order.

    Raises:
        DataError: a label value above ``K``, or a case without any voxel.
    """
    groups: Iterable[tuple[str, list[np.ndarray]]]
    if isinstance(data, SliceDataset):
        groups = data.iter_case_labels()
    else:
        groups = ((c.case_id, [c.label]) for c in data if c.label is not None)
    out: dict[str, np.ndarray] = {}
    for case_id, labels in groups:
        if case_id in out:
            raise DataError(f"case id {case_id!r} appears twice in the training data.")
        counts = np.zeros(num_classes + 1, dtype=np.int64)
        for lab in labels:
            counts += _class_counts(lab, num_classes)
        total = counts.sum()
        if total == 0:
            raise DataError(f"case {case_id!r} has no voxel to measure class sizes on.")
        out[case_id] = counts / total
    return out


def class_volume_fraction_ranges(
    data: SliceDataset | Sequence[Case], num_classes: int
) -> dict[int, tuple[float, float]]:
    """``{c: (min, max)}`` over the training cases of class ``c``'s volume fraction
    (:func:`class_volume_fractions`), for the foreground classes ``1..K``.

    A minimum of 0 means the class is absent from some training case. Stored in the checkpoint
    meta as ``class_volume_fraction_range`` (``{str(c): [lo, hi]}``) and checked against each
    prediction by :func:`hsam.inference.volume_check.volume_warnings`.

    Raises:
        DataError: no training case, or as :func:`class_volume_fractions`.
    """
    per_case = class_volume_fractions(data, num_classes)
    if not per_case:
        raise DataError("no labelled training case to measure class volume fractions on.")
    table = np.stack(list(per_case.values()))  # (cases, K + 1)
    return {
        c: (float(table[:, c].min()), float(table[:, c].max())) for c in range(1, num_classes + 1)
    }
