"""Tests for hsam.evaluation.reports (CSV, summary JSON, Markdown) and hsam.apps.overlay (PNG
montage)."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
from PIL import Image

from hsam.apps.overlay import label_color, render_overlay, select_slices
from hsam.errors import DataError, OutputExistsError
from hsam.evaluation import reports
from hsam.evaluation.metrics import evaluate_case
from hsam.evaluation.reports import (
    CSV_COLUMNS,
    case_rows,
    markdown_table,
    read_per_case_csv,
    summarize,
    write_per_case_csv,
    write_reports,
    write_summary_json,
)

NAMES = ["spleen", "right kidney", "left kidney"]


def synthetic_rows(n_cases: int = 5, seed: int = 0) -> list[dict]:
    """Per-case rows from real metric computations on small synthetic volumes.

    Class 3 ("left kidney") is absent from the ground truth of case 1 (FP there) and from both
    masks in case 2, so the strict policy has undefined (NaN) values."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_cases):
        shape = (8, 16, 16)
        gt = np.zeros(shape, np.uint8)
        pred = np.zeros(shape, np.uint8)
        for c, (z, y, x) in zip((1, 2, 3), [(1, 2, 2), (3, 9, 3), (2, 4, 10)], strict=True):
            s = int(rng.integers(2, 5))
            gt[z : z + s, y : y + 4, x : x + 4] = c
            dz, dy = (int(v) for v in rng.integers(-1, 2, size=2))
            pred[z + 1 + dz : z + s + dz, y + dy : y + 4 + dy, x : x + 4] = c
        if i == 1:
            gt[gt == 3] = 0
        if i == 2:
            gt[gt == 3] = 0
            pred[pred == 3] = 0
        res = evaluate_case(pred, gt, 3, (2.5, 0.8, 0.8), 1.6)
        rows += case_rows(f"case{i:02d}", res, NAMES)
    return rows


def test_csv_roundtrip_and_summary_reproducible(tmp_path):
    rows = synthetic_rows()
    paths = write_reports(rows, tmp_path / "run", run_name="hsam-10pct", n_resamples=500)
    with open(paths["summary_json"], encoding="utf-8") as fh:
        from_json = json.load(fh)
    back = read_per_case_csv(paths["per_case_csv"])
    assert len(back) == len(rows) == 15
    for a, b in zip(rows, back, strict=True):
        for k in CSV_COLUMNS:
            assert a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])), k
    assert summarize(back, n_resamples=500) == from_json
    shuffled = list(back)
    random.Random(3).shuffle(shuffled)
    assert summarize(shuffled, n_resamples=500) == from_json
    assert summarize(back, n_resamples=500, seed=1) != from_json  # the seed matters

    # strict JSON: no NaN/Infinity tokens (undefined values would be null)
    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    json.loads(paths["summary_json"].read_text(), parse_constant=refuse)


def test_summary_values_and_counts():
    rows = synthetic_rows()
    s = summarize(rows, n_resamples=300)
    assert s["n_cases"] == 5 and s["cases"] == [f"case{i:02d}" for i in range(5)]
    assert [c["name"] for c in s["classes"]] == NAMES
    assert s["classes"][0]["nsd_tolerance_mm"] == 1.6
    for policy in ("legacy", "strict"):
        pol = s["policies"][policy]
        for j, entry in enumerate(pol["per_class"]):
            for m in ("dice", "hd95", "nsd"):
                vals = np.array([r[f"{policy}_{m}"] for r in rows if r["class_index"] == j + 1])
                defined = vals[~np.isnan(vals)]
                assert entry[m]["n_defined"] == defined.size
                assert entry[m]["n_undefined"] == 5 - defined.size
                assert entry[m]["mean"] == pytest.approx(defined.mean())
                lo, hi = entry[m]["ci"]
                assert lo <= entry[m]["mean"] + 1e-12 and entry[m]["mean"] <= hi + 1e-12
        for m in ("dice", "hd95", "nsd"):
            means = [e[m]["mean"] for e in pol["per_class"]]
            assert pol["mean"][m]["mean"] == pytest.approx(np.mean(means))
    kidney = s["policies"]["strict"]["per_class"][2]
    assert kidney["dice"]["n_undefined"] == 1  # case02: both empty
    assert kidney["hd95"]["n_undefined"] == 2  # case01 FP-only, case02 both empty
    assert kidney["nsd"]["n_undefined"] == 1  # case01 FP-only scores 0 (DeepMind, MONAI)
    legacy_kidney = s["policies"]["legacy"]["per_class"][2]
    assert legacy_kidney["dice"]["n_undefined"] == 0
    assert s["policies"]["legacy"]["units"]["hd95"] == "voxels"
    assert s["policies"]["strict"]["units"]["hd95"] == "mm"
    assert s["bootstrap"]["n_resamples"] == 300


def test_markdown_table_shape():
    s1 = summarize(synthetic_rows(seed=0), n_resamples=200)
    s2 = summarize(synthetic_rows(seed=1), n_resamples=200)
    md = markdown_table({"H-SAM (ours)": s1, "baseline": s2})
    lines = md.splitlines()
    header = "| Method | spleen | right kidney | left kidney | Mean Dice (%) | Mean HD95 (vox) |"
    assert header in lines
    legacy_at = lines.index(header)
    strict_header = next(ln for ln in lines if "Mean HD95 (mm)" in ln)
    assert lines.index(strict_header) > legacy_at  # strict below legacy
    assert strict_header.startswith("| Method | spleen | right kidney | left kidney |")
    row = lines[legacy_at + 2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    leg = s1["policies"]["legacy"]
    assert cells[0] == "H-SAM (ours)"
    assert cells[1] == f"{leg['per_class'][0]['dice']['mean'] * 100:.2f}"
    assert cells[4] == f"{leg['mean']['dice']['mean'] * 100:.2f}"
    assert cells[5] == f"{leg['mean']['hd95']['mean']:.2f}"
    assert lines[legacy_at + 3].startswith("| baseline |")
    assert "| H-SAM (ours) | 0/0/0 | 0/0/0 | 1/2/1 |" in lines  # NSD: only case02
    other = summarize(
        [{**r, "class_name": r["class_name"].upper()} for r in synthetic_rows()], n_resamples=10
    )
    with pytest.raises(DataError, match="same label map"):
        markdown_table({"a": s1, "b": other})


def test_markdown_escapes_pipes_and_marks_missing():
    rows = [{**r, "class_name": "a|b"} for r in synthetic_rows(n_cases=2) if r["class_index"] == 1]
    for r in rows:
        r["strict_hd95"] = float("nan")
    md = markdown_table({"run": summarize(rows, n_resamples=10)})
    assert "a\\|b" in md and "n/a" in md


def test_bad_rows_are_refused_and_nothing_written(tmp_path):
    rows = synthetic_rows(n_cases=2)
    out = tmp_path / "run"
    with pytest.raises(DataError, match="twice"):
        write_reports(rows + rows[:1], out)
    with pytest.raises(DataError, match="no row"):
        write_reports(rows[:-1], out)
    with pytest.raises(DataError, match="no per-case rows"):
        summarize([])
    bad = [dict(r) for r in rows]
    bad[3]["legacy_dice"] = "oops"
    with pytest.raises(DataError, match="non-numeric"):
        write_per_case_csv(bad, tmp_path / "bad.csv")
    assert not out.exists() or list(out.iterdir()) == []
    assert not (tmp_path / "bad.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["run"])


def test_existing_outputs_refused_and_untouched(tmp_path):
    rows = synthetic_rows(n_cases=2)
    paths = write_reports(rows, tmp_path, n_resamples=50)
    before = {p: p.read_bytes() for p in paths.values()}
    with pytest.raises(OutputExistsError, match="overwrite"):
        write_reports(synthetic_rows(n_cases=3), tmp_path, n_resamples=50)
    assert {p: p.read_bytes() for p in paths.values()} == before
    with pytest.raises(OutputExistsError):
        write_summary_json(summarize(rows, n_resamples=50), paths["summary_json"])
    write_reports(synthetic_rows(n_cases=3), tmp_path, n_resamples=50, overwrite=True)
    assert summarize(read_per_case_csv(paths["per_case_csv"]), n_resamples=50)["n_cases"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "per_case.csv",
        "summary.json",
        "table.md",
    ]


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def boom(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        write_per_case_csv(synthetic_rows(n_cases=1), tmp_path / "per_case.csv")
    assert list(tmp_path.iterdir()) == []


def test_read_per_case_csv_errors(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="not an hsam per-case CSV"):
        read_per_case_csv(other)
    with pytest.raises(DataError, match="cannot read"):
        read_per_case_csv(tmp_path / "missing.csv")
    good = write_per_case_csv(synthetic_rows(n_cases=1), tmp_path / "good.csv")
    text = good.read_text().splitlines()
    text[1] = text[1].replace("case00,1", "case00,one")
    broken = tmp_path / "broken.csv"
    broken.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match="line 2"):
        read_per_case_csv(broken)


def test_label_name_map():
    assert reports.label_name_map(None, 2) == {1: "class_1", 2: "class_2"}
    assert reports.label_name_map({2: "liver", 9: "x"}, 2) == {1: "class_1", 2: "liver"}
    with pytest.raises(DataError, match="label names"):
        reports.label_name_map(["a"], 2)


# --------------------------------------------------------------------------------------------
# overlay
# --------------------------------------------------------------------------------------------
def overlay_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (20, 40, 50)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[5:12, 10:25, 10:30] = 1
    labels[9, 5:35, 5:45] = 2  # slice 9 has the most foreground
    gt = np.zeros_like(labels)
    gt[6:13, 12:27, 10:30] = 1
    return image, labels, gt


def test_select_slices():
    _, labels, gt = overlay_case()
    zs = select_slices(labels, gt, 4)
    assert 9 in zs and zs == sorted(set(zs)) and len(zs) <= 4
    assert min(zs) >= 5 and max(zs) <= 12
    assert select_slices(np.zeros((10, 3, 3)), None, 3) == [0, 4, 9]  # no foreground: spread
    assert select_slices(labels[:2], None, 6) == [0, 1]


def test_render_overlay(tmp_path):
    image, labels, gt = overlay_case()
    out = render_overlay(image, labels, {1: "liver", 2: "aorta"}, tmp_path / "ov.png", gt=gt)
    with Image.open(out) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert im.width >= 3 * 192
    colours = {tuple(p) for p in pixels}
    assert label_color(1) in colours and label_color(2) in colours  # outline/legend colours
    with pytest.raises(OutputExistsError):
        render_overlay(image, labels, ["liver", "aorta"], out)
    render_overlay(image, labels, ["liver", "aorta"], out, overwrite=True, n_slices=2)
    with pytest.raises(DataError, match="shape"):
        render_overlay(image, labels[:-1], None, tmp_path / "bad.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ov.png"]
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))
