"""Few-shot split selection, split manifests and the standard split files shipped with hsam.

Selection is deterministic: the same ids, count/fraction and seed always give the same split;
``seed=None`` in :func:`select_cases` takes the first ``n`` ids in file order (the standard LA
and ACDC protocols). The manifest is a JSON dict that records the train/val/test ids, how they
were chosen (method, seed) and the sha256 of each list file used, so a run can prove which data
it saw; :func:`manifest_sha256` hashes its canonical form.

Standard splits (``src/hsam/splits/``, read with :func:`standard_split`):

- ``synapse_train_220``: the upstream Synapse 10% list ``train_220.txt``, 221 slice ids
  ``caseXXXX_sliceNNN`` (drawn upstream with an unseeded sampler, so only the file reproduces it;
  it includes background-only slices);
- ``la_4``: the first 4 ids of the UA-MT LA ``train.list``; the protocol trains on the
  foreground slices only (label > 0) of these 4 scans, 224 slices in total;
- ``promise12_3``: Case29, Case14, Case05 (MLB-Seg/H-SAM; foreground slices only, 58).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from hsam.errors import DataError
from hsam.io.atomic import atomic_write_text
from hsam.io.hashing import file_sha256

logger = logging.getLogger(__name__)

__all__ = [
    "STANDARD_SPLITS",
    "carve_validation",
    "file_sha256",
    "make_manifest",
    "manifest_sha256",
    "read_manifest",
    "select_cases",
    "select_slice_fraction",
    "standard_split",
    "write_list",
    "write_manifest",
]

#: Names accepted by :func:`standard_split` with what each holds.
STANDARD_SPLITS = {
    "synapse_train_220": "Synapse 10%: 221 training slices (upstream train_220.txt)",
    "la_4": "LA: first 4 scans of UA-MT train.list (foreground slices used)",
    "promise12_3": "PROMISE12: Case29, Case14, Case05 (foreground slices used)",
}


def _check_ids(ids: Sequence[str], what: str) -> list[str]:
    ids = list(ids)
    if not ids:
        raise DataError(f"cannot select from an empty {what} list; give at least one id.")
    dupes = sorted(i for i, c in Counter(ids).items() if c > 1)
    if dupes:
        raise DataError(f"{what} list has duplicate ids {dupes[:5]}; each id must appear once.")
    return ids


def select_cases(ids: Sequence[str], n: int, seed: int | None = None) -> list[str]:
    """Choose ``n`` case ids: the first ``n`` in file order if ``seed`` is None (LA/ACDC
    protocol), else ``n`` drawn without replacement with ``numpy.random.default_rng(seed)``,
    returned in file order.

    Raises:
        DataError: empty ``ids``, duplicates, or ``n`` not in ``1..len(ids)``.
    """
    ids = _check_ids(ids, "case")
    if not 1 <= n <= len(ids):
        raise DataError(f"cannot select n={n} cases from {len(ids)}; use 1 <= n <= {len(ids)}.")
    if seed is None:
        return ids[:n]
    chosen = np.random.default_rng(seed).choice(len(ids), size=n, replace=False)
    return [ids[i] for i in sorted(chosen.tolist())]


def select_slice_fraction(slice_ids: Sequence[str], fraction: float, seed: int) -> list[str]:
    """Choose ``int(len(slice_ids) * fraction)`` slice ids (at least 1) with
    ``numpy.random.default_rng(seed)``, returned in file order.

    The count follows upstream (``int(2211 * 0.1) = 221``); the upstream draw was unseeded, so
    use :func:`standard_split` ``("synapse_train_220")`` to reproduce the paper's list.
    """
    slice_ids = _check_ids(slice_ids, "slice")
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"slice fraction {fraction} must be in (0, 1].")
    if seed is None:
        raise DataError("select_slice_fraction needs an integer seed (a random draw).")
    n = max(1, int(len(slice_ids) * fraction))
    chosen = np.random.default_rng(seed).choice(len(slice_ids), size=n, replace=False)
    return [slice_ids[i] for i in sorted(chosen.tolist())]


def carve_validation(
    case_ids: Sequence[str], n_val: int, seed: int | None = None
) -> tuple[list[str], list[str]]:
    """Split ``case_ids`` into ``(train, val)`` with ``n_val`` validation cases.

    ``seed=None`` takes the last ``n_val`` ids in file order; otherwise a seeded draw. Both
    parts keep file order. ``n_val=0`` returns ``(all, [])``.

    Raises:
        DataError: if no training case would remain or ``n_val < 0``.
    """
    ids = _check_ids(case_ids, "case")
    if n_val < 0 or n_val >= len(ids):
        raise DataError(
            f"cannot hold out n_val={n_val} of {len(ids)} cases; keep at least one for "
            f"training (0 <= n_val <= {len(ids) - 1})."
        )
    if n_val == 0:
        return ids, []
    if seed is None:
        val_idx = set(range(len(ids) - n_val, len(ids)))
    else:
        val_idx = set(np.random.default_rng(seed).choice(len(ids), n_val, replace=False).tolist())
    train = [c for i, c in enumerate(ids) if i not in val_idx]
    val = [c for i, c in enumerate(ids) if i in val_idx]
    return train, val


# --------------------------------------------------------------------------- files


def write_list(path: str | Path, ids: Sequence[str]) -> None:
    """Write a list file (one id a line) atomically."""
    atomic_write_text(path, "".join(f"{i}\n" for i in ids))


def make_manifest(
    *,
    train: Sequence[str],
    val: Sequence[str] = (),
    test: Sequence[str] = (),
    method: str,
    seed: int | None,
    sources: Sequence[str | Path] = (),
    **extra: Any,
) -> dict[str, Any]:
    """Build a split manifest dict.

    Args:
        train, val, test: ids (cases or slices) of each part; ``train`` must not be empty and
            the parts must not overlap.
        method: how the split was chosen, e.g. ``"first_n"``, ``"seeded_cases"``,
            ``"slice_fraction"``, ``"standard:synapse_train_220"``, ``"all"``.
        seed: the seed used (``None`` for deterministic rules).
        sources: list files the ids came from; each is recorded with its sha256.
        extra: further JSON-serialisable fields (format, few_shot, ...).
    """
    if not train:
        raise DataError("the training split is empty; select at least one case or slice.")
    parts = {"train": list(train), "val": list(val), "test": list(test)}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        common = sorted(set(parts[a]) & set(parts[b]))
        if common:
            raise DataError(f"{a} and {b} splits overlap in {common[:5]}; they must be disjoint.")
    from hsam import __version__

    manifest: dict[str, Any] = {
        "hsam_version": __version__,
        "method": method,
        "seed": seed,
        **parts,
        "counts": {k: len(v) for k, v in parts.items()},
        "sources": [{"path": str(p), "sha256": file_sha256(p)} for p in sources],
    }
    manifest.update(extra)
    return manifest


def _canonical(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("utf-8")


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace): independent of
    file formatting, changes with any id, seed or source hash."""
    return hashlib.sha256(_canonical(manifest)).hexdigest()


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> str:
    """Write ``manifest`` as indented JSON atomically; return :func:`manifest_sha256`."""
    try:
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    except TypeError as exc:
        raise DataError(f"split manifest for {path} is not JSON-serialisable: {exc}") from exc
    atomic_write_text(path, text)
    return manifest_sha256(manifest)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read a manifest written by :func:`write_manifest`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split manifest {path} does not exist.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"split manifest {path} is not valid JSON ({exc}).") from exc
    if not isinstance(manifest, dict) or not manifest.get("train"):
        raise DataError(f"split manifest {path} has no training ids ('train' is empty).")
    return manifest


def standard_split_path(name: str) -> Path:
    """File of a standard split shipped in ``hsam/splits/`` (see :data:`STANDARD_SPLITS`)."""
    stem = name[:-4] if name.endswith(".txt") else name
    if stem not in STANDARD_SPLITS:
        raise DataError(
            f"unknown standard split {name!r}; available: {', '.join(sorted(STANDARD_SPLITS))}."
        )
    return Path(str(resources.files("hsam").joinpath("splits", f"{stem}.txt")))


def standard_split(name: str) -> list[str]:
    """Ids of a standard split shipped in ``hsam/splits/`` (see :data:`STANDARD_SPLITS`)."""
    res = standard_split_path(name)
    if not res.is_file():
        raise DataError(f"standard split file {res} is missing from the installed package.")
    ids = [ln.strip() for ln in res.read_text().splitlines() if ln.strip()]
    if not ids:
        raise DataError(f"standard split file {res} is empty.")
    return ids
