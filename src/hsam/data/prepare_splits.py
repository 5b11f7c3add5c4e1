"""What a ``prepare`` output records besides its volumes, shared by both conversions of
:mod:`hsam.data.prepare`: the few-shot training selection (a count, a slice fraction, a standard
split or a list file), ``splits/*.txt``, ``split_manifest.json``, and the :class:`PrepareResult`
that reports them."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsam.data.formats.common import parse_slice_id, read_list
from hsam.data.splits import (
    STANDARD_SPLITS,
    make_manifest,
    select_cases,
    select_slice_fraction,
    standard_split,
    write_list,
    write_manifest,
)
from hsam.errors import DataError

__all__ = ["PrepareResult", "ProgressFn", "select_training", "write_splits"]

#: ``progress(done, total, case_id)``, called after each case a conversion writes.
ProgressFn = Callable[[int, int, str], None]


@dataclass
class PrepareResult:
    """What :func:`prepare` wrote."""

    dst: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    num_cases: int
    train: list[str] = field(default_factory=list)


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


def select_training(
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


def select_validation(pool: list[str], train: list[str], n_val: int, seed: int | None) -> list[str]:
    """`n_val` validation cases drawn (by `seed`) from the pool cases the training selection
    left unused."""
    if not n_val:
        return []
    rest = [c for c in pool if c not in train]
    if n_val > len(rest):
        raise DataError(
            f"n_val={n_val} but only {len(rest)} labelled case(s) remain outside the training "
            "selection; lower n_val or the few-shot size (slice-level selections use every "
            "case)."
        )
    return select_cases(rest, n_val, seed)


_SLICE_LIKE = re.compile(r"^.+_slice_?\d+$")


def _looks_like_slice(name: str) -> bool:
    return bool(_SLICE_LIKE.match(name))


def write_splits(
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
