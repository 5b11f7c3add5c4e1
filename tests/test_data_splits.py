"""Few-shot split selection, manifests and the shipped standard split files."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from conftest import shared_data_dir
from hsam.data import (
    carve_validation,
    make_manifest,
    manifest_sha256,
    read_manifest,
    select_cases,
    select_slice_fraction,
    standard_split,
    write_manifest,
)
from hsam.data.splits import STANDARD_SPLITS, file_sha256
from hsam.errors import DataError

IDS = [f"case{i:04d}" for i in range(40)]


def test_select_cases_first_n_and_seeded() -> None:
    assert select_cases(IDS, 4, None) == IDS[:4]
    a, b = select_cases(IDS, 5, seed=0), select_cases(IDS, 5, seed=0)
    assert a == b and len(set(a)) == 5 and set(a) <= set(IDS)
    assert a == sorted(a, key=IDS.index)  # file order
    assert len({tuple(select_cases(IDS, 5, seed=s)) for s in range(6)}) == 6
    assert select_cases(IDS, len(IDS), seed=3) == IDS


def test_select_errors() -> None:
    with pytest.raises(DataError, match="empty case list"):
        select_cases([], 1, 0)
    with pytest.raises(DataError, match="n=41"):
        select_cases(IDS, 41, 0)
    with pytest.raises(DataError, match="n=0"):
        select_cases(IDS, 0, None)
    with pytest.raises(DataError, match="duplicate"):
        select_cases(["a", "b", "a"], 1, None)
    with pytest.raises(DataError, match="fraction"):
        select_slice_fraction(IDS, 0.0, 0)


def test_select_slice_fraction_matches_upstream_count() -> None:
    slices = [f"case{c:04d}_slice{i:03d}" for c in range(18) for i in range(123)][:2211]
    chosen = select_slice_fraction(slices, 0.1, seed=2345)
    assert len(chosen) == 221  # int(2211 * 0.1), as upstream
    assert chosen == select_slice_fraction(slices, 0.1, seed=2345)
    assert chosen != select_slice_fraction(slices, 0.1, seed=2346)
    assert chosen == sorted(chosen) and set(chosen) <= set(slices)
    assert len(select_slice_fraction(slices[:5], 0.01, seed=0)) == 1


def test_carve_validation() -> None:
    train, val = carve_validation(IDS, 6, seed=4)
    assert len(val) == 6 and set(train) | set(val) == set(IDS) and not set(train) & set(val)
    assert (train, val) == carve_validation(IDS, 6, seed=4)
    assert val != carve_validation(IDS, 6, seed=5)[1]
    assert carve_validation(IDS, 2, None) == (IDS[:-2], IDS[-2:])
    assert carve_validation(IDS, 0, 1) == (IDS, [])
    with pytest.raises(DataError, match="keep at least one"):
        carve_validation(IDS[:3], 3, 0)


def test_manifest_roundtrip_hash_and_atomic_write(tmp_path: Path) -> None:
    lst = tmp_path / "train.list"
    lst.write_text("a\nb\nc\n")
    m = make_manifest(
        train=["a", "b"],
        val=["c"],
        test=[],
        method="first_n",
        seed=None,
        sources=[lst],
        format="la",
    )
    assert m["sources"] == [{"path": str(lst), "sha256": file_sha256(lst)}]
    assert m["counts"] == {"train": 2, "val": 1, "test": 0} and m["format"] == "la"
    path = tmp_path / "run" / "split_manifest.json"
    sha = write_manifest(path, m)
    assert sha == manifest_sha256(m) == manifest_sha256(read_manifest(path))
    assert json.loads(path.read_text())["train"] == ["a", "b"]
    assert os.listdir(path.parent) == ["split_manifest.json"]  # no temp file left
    m2 = dict(m, seed=1)
    assert manifest_sha256(m2) != sha
    # a failed write leaves the previous manifest untouched
    with pytest.raises(DataError, match="not JSON-serialisable"):
        write_manifest(path, dict(m, bad=object()))
    assert manifest_sha256(read_manifest(path)) == sha
    assert os.listdir(path.parent) == ["split_manifest.json"]


def test_manifest_rejects_empty_or_overlapping_splits(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="training split is empty"):
        make_manifest(train=[], method="all", seed=None)
    with pytest.raises(DataError, match=r"train and test splits overlap in \['b'\]"):
        make_manifest(train=["a", "b"], test=["b"], method="all", seed=None)
    (tmp_path / "m.json").write_text(json.dumps({"train": []}))
    with pytest.raises(DataError, match="no training ids"):
        read_manifest(tmp_path / "m.json")


def test_standard_split_files() -> None:
    syn = standard_split("synapse_train_220")
    assert len(syn) == 221 and len(set(syn)) == 221
    assert all(re.fullmatch(r"case\d{4}_slice\d{3}", s) for s in syn)
    per_case = Counter(s.split("_")[0] for s in syn)
    assert len(per_case) == 18 and per_case["case0040"] == 17 and per_case["case0009"] == 21
    assert "case0006_slice000" in syn and "case0040_slice173" in syn
    assert len(standard_split("la_4")) == 4
    assert standard_split("promise12_3.txt") == ["Case29", "Case14", "Case05"]
    assert set(STANDARD_SPLITS) == {"synapse_train_220", "la_4", "promise12_3"}
    with pytest.raises(DataError, match="unknown standard split 'acdc_7'"):
        standard_split("acdc_7")


def test_la_4_is_first_four_of_shared_train_list() -> None:
    lst = shared_data_dir() / "la" / "train.list"
    if not lst.is_file():
        pytest.skip(f"{lst} not available")
    ids = [ln.strip() for ln in lst.read_text().splitlines() if ln.strip()]
    assert standard_split("la_4") == ids[:4]
