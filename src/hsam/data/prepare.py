"""Convert raw data into a training layout with few-shot split files and a split manifest.

:func:`prepare` is the library function behind ``hsam prepare FORMAT SRC DST``. Two outputs:

- ``format="synapse_raw"``, or ``"synapse"`` when ``src`` holds raw data
  (``RawData/Training/img/imgXXXX.nii.gz`` +
  ``label/labelXXXX.nii.gz``): the TransUNet layout. CT window [-125, 275] -> [0, 1], organ
  remap :data:`SYNAPSE_REMAP` (SAMed/H-SAM preprocessing: raw 1, 2, 3, 4, 6, 7, 8, 11 -> 1..8,
  everything else 0), training cases written as ``train_npz/caseXXXX_sliceNNN.npz`` (2-D,
  keys ``image``/``label``, float32 like upstream) and the TransUNet test cases
  (:data:`SYNAPSE_TEST_CASES`) as ``test_vol_h5/caseXXXX.npy.h5``. ``dataset.json`` records
  label names and each case's spacing (the TransUNet files have none).
- every format of :func:`hsam.data.formats.read_dataset` (``la``, ``acdc``, ``promise12``,
  ``nnunet``, ``synapse``): ``cases/<id>.npz`` volumes (see :func:`save_case_npz`) and a
  ``dataset.json`` in the nnU-Net spirit; read back with ``read_dataset("prepared", dst)``.

Both write ``splits/{train,val,test}.txt`` (plus ``train_slices.txt`` for slice-level
selections) and ``split_manifest.json``. ``dst`` is built in a temporary sibling folder and moved
into place with ``os.replace``, so it is either complete or absent; an existing ``dst`` is
refused unless ``overwrite=True``, and even then unless an earlier ``prepare`` wrote it
(recognised by :data:`PREPARE_MARKER`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import hsam
from hsam.data.case import Case
from hsam.data.formats import FORMATS, list_cases, read_dataset, read_list
from hsam.data.prepare_splits import (
    PrepareResult,
    ProgressFn,
    select_training,
    select_validation,
    write_splits,
)
from hsam.data.prepare_synapse import (
    SYNAPSE_REMAP,
    SYNAPSE_REMAP_TRANSUNET,
    SYNAPSE_TEST_CASES,
    is_synapse_raw,
    prepare_synapse_raw,
    remap_labels,
)
from hsam.data.slices import slice_id
from hsam.errors import DataError, OutputExistsError
from hsam.io.atomic import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "PREPARE_FORMATS",
    "PREPARE_MARKER",
    "PrepareResult",
    "SYNAPSE_REMAP",
    "SYNAPSE_REMAP_TRANSUNET",
    "SYNAPSE_TEST_CASES",
    "prepare",
    "remap_labels",
    "save_case_npz",
]

#: Formats :func:`prepare` accepts: raw Synapse, and every readable format but its own output.
PREPARE_FORMATS = ("synapse_raw", *(name for name in FORMATS if name != "prepared"))


def save_case_npz(path: str | Path, case: Case) -> None:
    """Write a case as ``.npz`` (image float32 ``(D, H, W)``, label uint8, spacing, label names
    as JSON, intensity, source, origin/direction and the NIfTI-1 header when known), atomically."""
    arrays: dict[str, Any] = {
        "image": np.asarray(case.image, dtype=np.float32),
        "spacing": np.asarray(case.spacing, dtype=np.float64),
        "label_names": np.asarray(json.dumps({str(k): v for k, v in case.label_names.items()})),
        "intensity": np.asarray(case.intensity),
        "source": np.asarray(case.source),
    }
    if case.label is not None:
        arrays["label"] = np.asarray(case.label, dtype=np.uint8)
    if case.origin is not None:
        arrays["origin"] = np.asarray(case.origin, dtype=np.float64)
    if case.direction is not None:
        arrays["direction"] = np.asarray(case.direction, dtype=np.float64)
    if case.nifti_header is not None:  # evaluate's saved predictions keep the source's qform/sform
        arrays["nifti_header"] = np.frombuffer(case.nifti_header, dtype=np.uint8)
    buf = io.BytesIO()
    # an .npz is a zip of .npy members; deflate level 1 is several times faster than numpy's
    # savez_compressed (level 6) for about the same size on images
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- destination


#: Written into every ``hsam prepare`` output: what it is and which top-level entries hsam
#: wrote, so that ``--overwrite`` replaces only such a folder.
PREPARE_MARKER = "hsam_prepare.json"
_MARKER_KIND = "hsam prepare output"


def _check_dst(src: Path, dst: Path, overwrite: bool) -> None:
    if not src.exists():
        raise DataError(f"source {src} does not exist; check the path.")
    s, d = src.resolve(), dst.resolve()
    if d == s or s.is_relative_to(d) or d.is_relative_to(s):
        raise DataError(
            f"destination {dst} overlaps the source {src}; choose a folder outside the source."
        )
    if not (dst.exists() or dst.is_symlink()):
        return
    if not overwrite:
        raise OutputExistsError(
            f"destination {dst} already exists; choose a new folder or pass overwrite=True "
            "(--overwrite) to replace an earlier hsam prepare output there."
        )
    _refuse_foreign_dst(dst)


def _refuse_foreign_dst(dst: Path) -> None:
    """``--overwrite`` deletes the old ``dst``: allow it only for a folder hsam prepare wrote
    (its :data:`PREPARE_MARKER`) that holds nothing else at the top level."""
    what = "to replace it, move or delete it yourself, or choose another destination"
    if dst.is_symlink() or not dst.is_dir():
        raise DataError(
            f"destination {dst} is {'a link' if dst.is_symlink() else 'a file'}, not an earlier "
            f"hsam prepare output, so --overwrite does not replace it; {what}."
        )
    marker = dst / PREPARE_MARKER
    try:
        recorded = json.loads(marker.read_text())
        written = set(recorded["contents"]) if recorded.get("kind") == _MARKER_KIND else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        written = None
    if written is None:
        raise DataError(
            f"destination {dst} is not an hsam prepare output (no valid {PREPARE_MARKER}), so "
            f"--overwrite does not replace it; {what}."
        )
    foreign = sorted(e.name for e in dst.iterdir() if e.name not in written)
    if foreign:
        raise DataError(
            f"destination {dst} is an hsam prepare output but also holds {foreign[:5]}"
            f"{' ...' if len(foreign) > 5 else ''}, which hsam did not write, so --overwrite "
            "does not replace it; move those elsewhere first, or choose another destination."
        )


def _write_marker(out: Path) -> None:
    contents = sorted([*(e.name for e in out.iterdir()), PREPARE_MARKER])
    record = {"kind": _MARKER_KIND, "hsam_version": hsam.__version__, "contents": contents}
    atomic_write_text(out / PREPARE_MARKER, json.dumps(record, indent=2) + "\n")


def _commit_dir(tmp: Path, dst: Path) -> None:
    """Move the finished ``tmp`` folder to ``dst``; an old ``dst`` is replaced last."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


# --------------------------------------------------------------------------- main entry


def prepare(
    format: str,
    src: str | Path,
    dst: str | Path,
    *,
    few_shot: str | int | float | None = None,
    seed: int | None = None,
    n_val: int = 0,
    test_ids: Sequence[str] | None = None,
    overwrite: bool = False,
    label_order: str = "samed",
    progress: ProgressFn | None = None,
) -> PrepareResult:
    """Convert raw data at ``src`` into a training layout at ``dst``.

    Args:
        format: ``"synapse_raw"`` (raw BTCV NIfTI -> TransUNet layout; ``"synapse"`` with a
            ``src`` holding ``RawData/Training/img`` means the same) or a
            :func:`~hsam.data.formats.read_dataset` format (``la``, ``acdc``, ``promise12``,
            ``nnunet``, ``synapse`` test volumes) -> ``cases/<id>.npz`` layout.
        src: source folder.
        dst: output folder (must not exist unless ``overwrite``; must not overlap ``src``).
        few_shot: training subset: ``None`` (all), an ``int`` n (cases; first n in file order
            when ``seed`` is None, else a seeded draw), a ``float`` in (0, 1] (that fraction of
            the training slices, seeded; ``seed`` None -> 0; numeric strings such as ``"4"``
            or ``"0.1"`` are parsed as such), or a standard split name
            (``synapse_train_220``, ``la_4``, ``promise12_3``) / a list file of case or slice
            ids.
        seed: seed for the selections.
        n_val: validation cases carved (by ``seed``) from the labelled training pool that the
            few-shot selection did not use; for ``acdc`` the shipped ``val.list`` is used when
            ``n_val == 0``.
        test_ids: test cases; default: Synapse's 12 TransUNet cases, LA's ``test.list``,
            otherwise none.
        overwrite: replace an existing ``dst`` that an earlier :func:`prepare` wrote (its
            :data:`PREPARE_MARKER` lists everything at its top level); anything else there
            is refused, never deleted.
        label_order: ``synapse_raw`` only: ``"samed"`` (:data:`SYNAPSE_REMAP`, default, what
            H-SAM used) or ``"transunet"`` (:data:`SYNAPSE_REMAP_TRANSUNET`).
        progress: optional ``f(done, total, case_id)`` called after each case.

    Returns:
        :class:`PrepareResult` with the manifest and its hash.

    Raises:
        OutputExistsError: ``dst`` exists and ``overwrite`` is False.
        DataError: ``overwrite`` and ``dst`` is not an earlier prepare output; unreadable or
            inconsistent data, unknown split names, empty splits.
    """
    key = format.strip().lower()
    if key not in PREPARE_FORMATS:
        raise DataError(f"unknown prepare format {format!r}; use one of {PREPARE_FORMATS}.")
    src, dst = Path(src), Path(dst)
    _check_dst(src, dst, overwrite)
    if key == "synapse" and is_synapse_raw(src):
        key = "synapse_raw"
    dst.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: the output gets the usual permissions (umask), not 0700
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        if key == "synapse_raw":
            result = prepare_synapse_raw(
                src,
                tmp,
                few_shot=few_shot,
                seed=seed,
                n_val=n_val,
                test_ids=test_ids,
                label_order=label_order,
                progress=progress,
            )
        else:
            result = _prepare_cases(
                key,
                src,
                tmp,
                few_shot=few_shot,
                seed=seed,
                n_val=n_val,
                test_ids=test_ids,
                progress=progress,
            )
        _write_marker(tmp)
        _commit_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.dst = dst
    logger.info(
        "prepared %d case(s) from %s into %s (train %d, manifest %s)",
        result.num_cases,
        src,
        dst,
        len(result.train),
        result.manifest_sha256[:12],
    )
    return result


def _prepare_cases(
    key: str,
    src: Path,
    out: Path,
    *,
    few_shot: str | int | float | None,
    seed: int | None,
    n_val: int,
    test_ids: Sequence[str] | None,
    progress: ProgressFn | None,
) -> PrepareResult:
    all_ids = list_cases(key, src)
    sources: list[Path] = []
    # Default pools per format: what the published protocols use.
    train_pool, val, test = list(all_ids), [], []
    if key in ("la", "acdc"):
        tl = src / "train.list"
        if tl.is_file():
            train_pool = read_list(tl)
            sources.append(tl)
        other = src / ("test.list" if key == "la" else "val.list")
        if other.is_file():
            sources.append(other)
            if key == "la":
                test = read_list(other)
            elif n_val == 0:
                val = read_list(other)
    if test_ids is not None:
        test = list(test_ids)
    unknown = [i for i in test if i not in all_ids]
    if unknown:
        raise DataError(f"test ids {unknown[:5]} are not cases of {src}.")
    train_pool = [i for i in train_pool if i not in test and i not in val]
    # Write every case, remembering label availability and slice counts.
    (out / "cases").mkdir(parents=True)
    wanted = list(dict.fromkeys([*all_ids, *train_pool, *val, *test]))
    labelled: set[str] = set()
    n_slices: dict[str, int] = {}
    spacing: dict[str, list[float]] = {}
    names: dict[int, str] = {}
    intensities: set[str] = set()
    for done, cid in enumerate(wanted, 1):
        (case,) = read_dataset(key, src, [cid])
        save_case_npz(out / "cases" / f"{cid}.npz", case)
        if case.label is not None:
            labelled.add(cid)
        n_slices[cid] = case.num_slices
        spacing[cid] = [float(s) for s in case.spacing]
        for k, v in case.label_names.items():
            if names.setdefault(k, v) != v:
                raise DataError(
                    f"case {cid!r}: label {k} is named {v!r} but {names[k]!r} elsewhere; "
                    "all cases must share one label map."
                )
        intensities.add(case.intensity)
        if progress is not None:
            progress(done, len(wanted), cid)
    train_pool = [i for i in train_pool if i in labelled]
    if not train_pool:
        raise DataError(f"{src}: no labelled training case; the training split would be empty.")

    def slices_of(ids: list[str]) -> list[str]:
        return [slice_id(c, d) for c in ids for d in range(n_slices[c])]

    train, train_slices, method = select_training(train_pool, few_shot, seed, slices_of)
    if n_val:
        val = select_validation(train_pool, train, n_val, seed)
    meta = {
        "name": src.name,
        "format": "hsam-prepared",
        "source_format": key,
        "source": str(src),
        "labels": {v: k for k, v in sorted(names.items())},
        "file_ending": ".npz",
        "numTraining": len(labelled),
        "intensity": sorted(intensities)[0] if len(intensities) == 1 else sorted(intensities),
        "spacing": spacing,
    }
    atomic_write_text(out / "dataset.json", json.dumps(meta, indent=2) + "\n")
    manifest, sha = write_splits(
        out,
        train=train,
        train_slices=train_slices,
        val=val,
        test=test,
        method=method,
        seed=seed,
        sources=sources,
        extra={"format": key, "few_shot": few_shot},
    )
    return PrepareResult(out, manifest, sha, len(wanted), train)
