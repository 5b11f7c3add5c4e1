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
import re
import secrets
import shutil
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import hsam
from hsam.atomic import atomic_output, atomic_write_bytes, atomic_write_text
from hsam.data.case import Case
from hsam.data.formats import FORMATS, list_cases, read_dataset, read_list
from hsam.data.formats.common import to_label
from hsam.data.formats.sitk import check_label_grid, read_sitk, sitk_geometry
from hsam.data.formats.synapse import SYNAPSE_LABELS_SAMED, SYNAPSE_LABELS_TRANSUNET
from hsam.data.slices import parse_slice_id, slice_id
from hsam.data.splits import (
    STANDARD_SPLITS,
    make_manifest,
    select_cases,
    select_slice_fraction,
    standard_split,
    write_list,
    write_manifest,
)
from hsam.errors import DataError, OutputExistsError
from hsam.intensity import DEFAULT_CT_POLICY, ct_window

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

#: Raw Synapse (BTCV) label id -> training id, as SAMed/H-SAM ``preprocess_data.py`` does:
#: 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 6 -> 5 liver, 7 -> 6 stomach,
#: 8 -> 7 aorta, 11 -> 8 pancreas; 5, 9, 10, 12, 13 -> 0. Names: ``SYNAPSE_LABELS_SAMED``.
SYNAPSE_REMAP: dict[int, int] = {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 11: 8}
#: Alternative order matching the TransUNet paper's alphabetical table
#: (``label_order="transunet"``; names ``SYNAPSE_LABELS_TRANSUNET``).
SYNAPSE_REMAP_TRANSUNET: dict[int, int] = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}
#: TransUNet/SAMed/H-SAM test volumes (12 cases).
SYNAPSE_TEST_CASES = tuple(f"case{n:04d}" for n in (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38))
#: Formats :func:`prepare` accepts: raw Synapse, and every readable format but its own output.
PREPARE_FORMATS = ("synapse_raw", *(name for name in FORMATS if name != "prepared"))

ProgressFn = Callable[[int, int, str], None]


@dataclass
class PrepareResult:
    """What :func:`prepare` wrote."""

    dst: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    num_cases: int
    train: list[str] = field(default_factory=list)


def remap_labels(label: np.ndarray, mapping: dict[int, int], where: str = "label") -> np.ndarray:
    """Apply ``mapping`` (old id -> new id; ids not in it -> 0) to an integer label array.

    Returns uint8. Raises :class:`DataError` for negative or > 255 values.
    """
    lab = to_label(label, where)
    lut = np.zeros(256, dtype=np.uint8)
    for old, new in mapping.items():
        lut[int(old)] = int(new)
    return lut[lab]


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


def _save_npz_slice(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, image=image.astype(np.float32), label=label.astype(np.float32))
    atomic_write_bytes(path, buf.getvalue())


def _save_h5_volume(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    import h5py

    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("image", data=image.astype(np.float32))
        f.create_dataset("label", data=label.astype(np.float32))


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


# --------------------------------------------------------------------------- few-shot


def _few_shot_ids(few_shot: str | int | float | None) -> tuple[list[str] | None, str]:
    """Resolve a named/list-file few-shot spec to ids, or (None, kind) for int/float/None."""
    if few_shot is None:
        return None, "all"
    if isinstance(few_shot, bool):
        raise DataError(f"few_shot={few_shot!r} is not a count, fraction or split name.")
    if isinstance(few_shot, (int, float)):
        return None, "count" if isinstance(few_shot, int) else "fraction"
    name = str(few_shot).strip()
    stem = name[:-4] if name.endswith(".txt") else name
    if stem in STANDARD_SPLITS:
        return standard_split(stem), f"standard:{stem}"
    path = Path(name)
    if path.is_file():
        return read_list(path), f"list:{path}"
    raise DataError(
        f"few_shot={few_shot!r} is neither a standard split ({', '.join(STANDARD_SPLITS)}) nor "
        "an existing list file; pass a case count (int), a slice fraction (float) or one of those."
    )


def _parse_few_shot(few_shot: str | int | float | None) -> str | int | float | None:
    if isinstance(few_shot, str):
        name = few_shot.strip()
        if re.fullmatch(r"\d+", name):
            return int(name)
        if re.fullmatch(r"\d*\.\d+", name):
            return float(name)
    return few_shot


def _select(
    pool: list[str],
    few_shot: str | int | float | None,
    seed: int | None,
    slices_of: Callable[[list[str]], list[str]],
) -> tuple[list[str], list[str] | None, str]:
    """Return (train case ids, train slice ids or None, method)."""
    few_shot = _parse_few_shot(few_shot)
    named, kind = _few_shot_ids(few_shot)
    if kind == "all":
        return list(pool), None, "all"
    if kind == "count":
        n = int(few_shot)  # type: ignore[arg-type]
        return select_cases(pool, n, seed), None, "first_n" if seed is None else "seeded_cases"
    if kind == "fraction":
        all_slices = slices_of(pool)
        fraction = float(few_shot)  # type: ignore[arg-type]
        chosen = select_slice_fraction(all_slices, fraction, 0 if seed is None else seed)
        cases = list(dict.fromkeys(parse_slice_id(s)[0] for s in chosen))
        return cases, chosen, "slice_fraction"
    assert named is not None
    if all(_looks_like_slice(i) for i in named):
        available = set(slices_of(pool))
        missing = [i for i in named if i not in available]
        if missing:
            raise DataError(
                f"few-shot split {kind}: {len(missing)} slice(s) are not in the data, e.g. "
                f"{missing[:5]}; the source lacks those cases or slices."
            )
        cases = list(dict.fromkeys(parse_slice_id(s)[0] for s in named))
        return cases, list(named), kind
    missing = [i for i in named if i not in pool]
    if missing:
        raise DataError(
            f"few-shot split {kind}: case(s) {missing[:5]} are not among the {len(pool)} "
            "labelled training cases of the source."
        )
    return list(named), None, kind


_SLICE_LIKE = re.compile(r"^.+_slice_?\d+$")


def _looks_like_slice(name: str) -> bool:
    return bool(_SLICE_LIKE.match(name))


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
    if key == "synapse" and _is_synapse_raw(src):
        key = "synapse_raw"
    dst.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: the output gets the usual permissions (umask), not 0700
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        if key == "synapse_raw":
            result = _prepare_synapse_raw(
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


def _write_splits(
    out: Path,
    *,
    train: list[str],
    train_slices: list[str] | None,
    val: list[str],
    test: list[str],
    method: str,
    seed: int | None,
    sources: list[Path],
    extra: dict[str, Any],
) -> tuple[dict[str, Any], str]:
    split_dir = out / "splits"
    write_list(split_dir / "train.txt", train)
    write_list(split_dir / "val.txt", val)
    write_list(split_dir / "test.txt", test)
    if train_slices is not None:
        write_list(split_dir / "train_slices.txt", train_slices)
        extra = {**extra, "train_slices": train_slices}
    manifest = make_manifest(
        train=train, val=val, test=test, method=method, seed=seed, sources=sources, **extra
    )
    sha = write_manifest(out / "split_manifest.json", manifest)
    return manifest, sha


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

    train, train_slices, method = _select(train_pool, few_shot, seed, slices_of)
    if n_val:
        rest = [i for i in train_pool if i not in train]
        if n_val > len(rest):
            raise DataError(
                f"n_val={n_val} but only {len(rest)} labelled case(s) remain outside the "
                "training selection; lower n_val or the few-shot size."
            )
        val = select_cases(rest, n_val, seed)
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
    manifest, sha = _write_splits(
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


_SYN_IMG = re.compile(r"^img(\d{4})\.nii(\.gz)?$")


def _is_synapse_raw(src: Path) -> bool:
    return any((b / "img").is_dir() for b in (src / "RawData" / "Training", src / "Training", src))


def _synapse_dirs(src: Path) -> tuple[Path, Path]:
    for base in (src / "RawData" / "Training", src / "Training", src):
        if (base / "img").is_dir():
            if not (base / "label").is_dir():
                raise DataError(f"{base}: img/ exists but label/ is missing.")
            return base / "img", base / "label"
    raise DataError(
        f"{src}: no RawData/Training/img folder; point SRC at the Synapse (BTCV) RawData parent."
    )


def _prepare_synapse_raw(
    src: Path,
    out: Path,
    *,
    few_shot: str | int | float | None,
    seed: int | None,
    n_val: int,
    test_ids: Sequence[str] | None,
    label_order: str,
    progress: ProgressFn | None,
) -> PrepareResult:
    if label_order not in ("samed", "transunet"):
        raise DataError(f"label_order={label_order!r} must be 'samed' or 'transunet'.")
    remap = SYNAPSE_REMAP if label_order == "samed" else SYNAPSE_REMAP_TRANSUNET
    names = SYNAPSE_LABELS_SAMED if label_order == "samed" else SYNAPSE_LABELS_TRANSUNET
    img_dir, lab_dir = _synapse_dirs(src)
    pairs: dict[str, tuple[Path, Path]] = {}
    for p in sorted(img_dir.iterdir()):
        m = _SYN_IMG.match(p.name)
        if not m:
            continue
        lab = lab_dir / p.name.replace("img", "label", 1)
        if not lab.is_file():
            raise DataError(f"{p}: its label {lab} does not exist.")
        pairs[f"case{m.group(1)}"] = (p, lab)
    if not pairs:
        raise DataError(f"{img_dir}: no imgXXXX.nii.gz files.")
    test = list(SYNAPSE_TEST_CASES if test_ids is None else test_ids)
    test = [c for c in test if c in pairs] if test_ids is None else test
    unknown = [c for c in test if c not in pairs]
    if unknown:
        raise DataError(f"test ids {unknown[:5]} have no image in {img_dir}.")
    pool = [c for c in pairs if c not in test]
    if not pool:
        raise DataError(f"{img_dir}: every case is a test case; the training split is empty.")
    # Decide the split first so that validation cases can be written as volumes.
    depth: dict[str, int] = {}
    for cid in pool:
        import SimpleITK as sitk  # noqa: N813

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(pairs[cid][0]))
        reader.ReadImageInformation()
        depth[cid] = int(reader.GetSize()[2]) if reader.GetDimension() >= 3 else 1

    def slices_of(ids: list[str]) -> list[str]:
        return [slice_id(c, d) for c in ids for d in range(depth[c])]

    train, train_slices, method = _select(pool, few_shot, seed, slices_of)
    val: list[str] = []
    if n_val:
        rest = [c for c in pool if c not in train]
        if n_val > len(rest):
            raise DataError(
                f"n_val={n_val} but only {len(rest)} training case(s) are unused by the "
                "few-shot selection; lower n_val (slice-level selections use every case)."
            )
        val = select_cases(rest, n_val, seed)
    (out / "train_npz").mkdir(parents=True)
    (out / "test_vol_h5").mkdir()
    if val:
        (out / "val_vol_h5").mkdir()
    spacing: dict[str, list[float]] = {}
    all_slices: list[str] = []
    order = [*pool, *test]
    for done, cid in enumerate(order, 1):
        img_path, lab_path = pairs[cid]
        raw, img, _ = read_sitk(img_path)
        lab_raw, lab_img, _ = read_sitk(lab_path)
        if raw.ndim != 3 or lab_raw.shape != raw.shape:
            raise DataError(
                f"{img_path}: image {raw.shape} and label {lab_raw.shape} must be equal 3-D shapes."
            )
        check_label_grid(img_path, sitk_geometry(img), lab_path, sitk_geometry(lab_img))
        lab = to_label(lab_raw, str(lab_path))
        bad = sorted(
            set(np.flatnonzero(np.bincount(lab.ravel(), minlength=256)).tolist()) - set(range(14))
        )
        if bad:
            raise DataError(
                f"{lab_path}: label values {bad} are not Synapse/BTCV organ ids (0..13)."
            )
        image = ct_window(raw)  # (D, H, W) = SimpleITK (z, y, x) = upstream transpose(2, 1, 0)
        label = remap_labels(lab, remap, str(lab_path))
        spacing[cid] = list(sitk_geometry(img)[0])
        if cid in test or cid in val:
            folder = "test_vol_h5" if cid in test else "val_vol_h5"
            _save_h5_volume(out / folder / f"{cid}.npy.h5", image, label)
        else:
            for d in range(image.shape[0]):
                sid = slice_id(cid, d)
                _save_npz_slice(out / "train_npz" / f"{sid}.npz", image[d], label[d])
                all_slices.append(sid)
        if progress is not None:
            progress(done, len(order), cid)
    meta = {
        "name": "Synapse",
        "format": "transunet",
        "source_format": "synapse_raw",
        "source": str(src),
        "labels": {v: k for k, v in names.items()},
        "label_order": label_order,
        "remap": {str(k): v for k, v in remap.items()},
        "channel_names": {"0": "CT"},
        "intensity": DEFAULT_CT_POLICY,
        "spacing": spacing,
    }
    atomic_write_text(out / "dataset.json", json.dumps(meta, indent=2) + "\n")
    lists = out / "lists"
    write_list(lists / "train.txt", all_slices)
    write_list(lists / "test_vol.txt", test)
    fs_slices = train_slices if train_slices is not None else slices_of(train)
    write_list(lists / "train_fewshot.txt", fs_slices)
    manifest, sha = _write_splits(
        out,
        train=train,
        train_slices=fs_slices,
        val=val,
        test=test,
        method=method,
        seed=seed,
        sources=[],
        extra={"format": "synapse_raw", "few_shot": few_shot, "label_order": label_order},
    )
    return PrepareResult(out, manifest, sha, len(order), train)
