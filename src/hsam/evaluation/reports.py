"""Evaluation reports: per-case CSV, summary JSON, Markdown table shaped like H-SAM's Table 1.

The flow is ``metrics.evaluate_case`` per case -> :func:`case_rows` -> :func:`write_per_case_csv`
and :func:`summarize` -> :func:`write_summary_json` / :func:`markdown_table`. The summary is a
pure function of the per-case rows (cases sorted by id, classes by index, seeded bootstrap), so
``summarize(read_per_case_csv(csv))`` reproduces ``summary.json`` exactly: floats are written to
the CSV with ``repr`` (round-trip exact) and NaN as ``nan``.

Both metric policies are always reported side by side (see :mod:`hsam.evaluation.metrics`):

* ``legacy`` -- the published TransUNet/SAMed/H-SAM numbers: medpy Dice and pooled HD95 in
  voxel units, empty prediction -> Dice 0 and HD95 0, prediction on an empty ground truth ->
  Dice 1 and HD95 0. Never NaN. Use it only to compare with published tables.
* ``strict`` -- HD95 and NSD in mm; NaN where undefined (Dice: both masks empty; HD95/NSD:
  either mask empty). Means skip NaN and every summary entry says how many cases were defined.

Predicted-size warnings (:mod:`hsam.inference.volume_check`: a class whose predicted volume fraction
is far outside the training range) are kept per (case, class) in the CSV's ``volume_warning``
column (empty when none), listed in the summary's ``volume_warnings`` and, when there are any,
in a last section of the Markdown table. CSVs written before that column existed are still
read (as no warnings).

All writers are atomic (temp file + :func:`os.replace`) and refuse an existing file unless
``overwrite=True``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hsam.errors import DataError
from hsam.evaluation.metrics import (
    METRICS,
    POLICIES,
    bootstrap_ci,
    mean_over_classes,
    per_class_mean,
)
from hsam.io.atomic import atomic_write_text
from hsam.io.images import refuse_existing

logger = logging.getLogger(__name__)


def _write_report(path: str | os.PathLike, text: str, *, overwrite: bool) -> Path:
    """Write one report atomically and name it in the log (the files a user looks for)."""
    written = atomic_write_text(path, text, overwrite=overwrite)
    logger.info("wrote %s", path)
    return written


SUMMARY_FORMAT = "hsam-metrics-summary/1"
#: Columns of the per-case CSV, in order. One row per (case, class).
CSV_COLUMNS: tuple[str, ...] = (
    "case",
    "class_index",
    "class_name",
    "gt_voxels",
    "pred_voxels",
    "spacing_d_mm",
    "spacing_h_mm",
    "spacing_w_mm",
    "nsd_tolerance_mm",
    *(f"{p}_{m}" for p in POLICIES for m in METRICS),
    "volume_warning",
)
_INT_COLUMNS = ("class_index", "gt_voxels", "pred_voxels")
_STR_COLUMNS = ("case", "class_name", "volume_warning")
#: Columns added after the first release, with the value rows (and older CSVs) lacking them get.
OPTIONAL_COLUMNS: dict[str, Any] = {"volume_warning": ""}

POLICY_TEXT = {
    "legacy": (
        "published TransUNet/SAMed/H-SAM convention: medpy dc and hd95 (pooled 95th percentile "
        "of symmetric surface distances) in voxel units, spacing ignored; empty prediction -> "
        "Dice 0, HD95 0, NSD 0; prediction on empty ground truth -> Dice 1, HD95 0, NSD 1"
    ),
    "strict": (
        "HD95 (pooled, as medpy) and NSD (surface voxels counted, as MONAI) in mm with the "
        "voxel spacing; Dice and NSD NaN when both masks are empty (0 when only one is); HD95 "
        "NaN when either mask is empty; NaN cases are excluded from means and counted in "
        "n_undefined"
    ),
}
UNITS = {
    "legacy": {"dice": "fraction", "hd95": "voxels", "nsd": "fraction"},
    "strict": {"dice": "fraction", "hd95": "mm", "nsd": "fraction"},
}


# --------------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------------
def label_name_map(
    label_names: Mapping[int, str] | Sequence[str] | None, num_classes: int
) -> dict[int, str]:
    """Names of classes ``1..num_classes``.

    ``label_names`` is a mapping ``{label: name}`` or a sequence naming labels ``1..K`` in
    order (background excluded); missing names become ``"class_<c>"``.
    """
    names = {c: f"class_{c}" for c in range(1, num_classes + 1)}
    if label_names is None:
        return names
    if isinstance(label_names, Mapping):
        for k, v in label_names.items():
            if int(k) in names:
                names[int(k)] = str(v)
        return names
    seq = list(label_names)
    if len(seq) != num_classes:
        raise DataError(
            f"got {len(seq)} label names for {num_classes} classes; name the foreground classes "
            "1..K in order (no background), or pass a {label: name} mapping"
        )
    return {c: str(seq[c - 1]) for c in names}


def case_rows(
    case_id: str,
    result: Mapping[str, Any],
    label_names: Mapping[int, str] | Sequence[str] | None = None,
    volume_warnings: Mapping[int, str] | None = None,
) -> list[dict[str, Any]]:
    """Per-case CSV rows (one per class) from :func:`hsam.evaluation.metrics.evaluate_case`'s
    result.

    ``volume_warnings``: ``{class index: text}`` of the classes whose predicted size was flagged
    (:attr:`hsam.inference.volume_check.VolumeWarning.detail`), the ``volume_warning`` column."""
    warnings = volume_warnings or {}
    names = label_name_map(label_names, int(result["num_classes"]))
    sd, sh, sw = (float(s) for s in result["spacing"])
    rows = []
    for cls in result["classes"]:
        c = int(cls["class_index"])
        row: dict[str, Any] = {
            "case": str(case_id),
            "class_index": c,
            "class_name": names[c],
            "gt_voxels": int(cls["gt_voxels"]),
            "pred_voxels": int(cls["pred_voxels"]),
            "spacing_d_mm": sd,
            "spacing_h_mm": sh,
            "spacing_w_mm": sw,
            "nsd_tolerance_mm": float(cls["nsd_tolerance_mm"]),
        }
        for p in POLICIES:
            for m in METRICS:
                row[f"{p}_{m}"] = float(cls[p][m])
        row["volume_warning"] = str(warnings.get(c, ""))
        rows.append(row)
    return rows


def _fmt(value: Any, column: str) -> str:
    if column in _STR_COLUMNS:
        return str(value)
    if column in _INT_COLUMNS:
        return str(int(value))
    return repr(float(value))


def per_case_csv_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """The per-case CSV as text (columns :data:`CSV_COLUMNS`, floats full precision)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for i, row in enumerate(rows):
        missing = [c for c in CSV_COLUMNS if c not in row and c not in OPTIONAL_COLUMNS]
        if missing:
            raise DataError(f"per-case row {i} lacks columns {missing}; build rows with case_rows")
        try:
            writer.writerow([_fmt(row.get(c, OPTIONAL_COLUMNS.get(c)), c) for c in CSV_COLUMNS])
        except (TypeError, ValueError) as exc:
            raise DataError(f"per-case row {i} has a non-numeric value: {exc}") from exc
    return buf.getvalue()


def write_per_case_csv(
    rows: Iterable[Mapping[str, Any]], path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write the per-case CSV atomically (one row per case x class, both policies)."""
    text = per_case_csv_text(rows)  # build fully before touching the disk
    return _write_report(path, text, overwrite=overwrite)


def read_per_case_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a CSV written by :func:`write_per_case_csv` back into typed rows."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in CSV_COLUMNS if c not in header and c not in OPTIONAL_COLUMNS]
            if missing:
                raise DataError(
                    f"{path} is not an hsam per-case CSV: columns {missing} are missing"
                )
            rows = []
            for line, raw in enumerate(reader, start=2):
                try:
                    row: dict[str, Any] = {}
                    for c in CSV_COLUMNS:
                        if c not in header:  # an optional column of a CSV older than it
                            row[c] = OPTIONAL_COLUMNS[c]
                            continue
                        v = raw[c]
                        if c in _STR_COLUMNS:
                            row[c] = v
                        elif c in _INT_COLUMNS:
                            row[c] = int(v)
                        else:
                            row[c] = float(v)
                except (TypeError, ValueError) as exc:
                    raise DataError(f"{path}, line {line}: bad value ({exc})") from exc
                rows.append(row)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    return rows


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------
def _num(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _matrix(
    rows: Sequence[Mapping[str, Any]],
) -> tuple[list[str], list[tuple[int, str, float]], dict[tuple[str, int], Mapping[str, Any]]]:
    if not rows:
        raise DataError("no per-case rows to summarise; evaluate at least one case")
    table: dict[tuple[str, int], Mapping[str, Any]] = {}
    names: dict[int, str] = {}
    tols: dict[int, float] = {}
    for row in rows:
        key = (str(row["case"]), int(row["class_index"]))
        if key in table:
            raise DataError(f"case {key[0]!r} class {key[1]} appears twice in the per-case rows")
        table[key] = row
        c = key[1]
        name = str(row["class_name"])
        if names.setdefault(c, name) != name:
            raise DataError(f"class {c} is named both {names[c]!r} and {name!r}; fix the rows")
        tol = float(row["nsd_tolerance_mm"])
        if tols.setdefault(c, tol) != tol:
            raise DataError(
                f"class {c} has NSD tolerances {tols[c]} and {tol} mm in different cases; "
                "evaluate every case with the same tolerance"
            )
    cases = sorted({k[0] for k in table})
    classes = sorted(names)
    absent = [(k, c) for k in cases for c in classes if (k, c) not in table]
    if absent:
        raise DataError(
            f"{len(absent)} (case, class) pairs have no row, e.g. {absent[0]}; every case needs "
            "one row per class"
        )
    return cases, [(c, names[c], tols[c]) for c in classes], table


def summarize(
    per_case_rows: Iterable[Mapping[str, Any]],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Summary of per-case rows: per-class and mean Dice/HD95/NSD under both policies.

    For each policy and metric: per class the mean over cases (NaN ignored), its percentile
    bootstrap CI over cases (``n_resamples``, ``confidence``, ``numpy.random.default_rng(seed)``)
    and the counts of defined/undefined cases; and the mean over classes (of the per-class
    means that are defined) with its bootstrap CI. NaN is stored as ``None`` (JSON ``null``).
    ``volume_warnings`` lists the rows with a non-empty ``volume_warning`` (``case``,
    ``class_index``, ``class_name``, ``warning``), by case and class; empty when none.

    The result is JSON-ready and depends only on the rows' values (not their order).
    """
    rows = list(per_case_rows)
    cases, classes, table = _matrix(rows)
    policies: dict[str, Any] = {}
    for p in POLICIES:
        per_class: list[dict[str, Any]] = [{"index": c, "name": name} for c, name, _ in classes]
        mean: dict[str, Any] = {}
        for m in METRICS:
            values = np.array(
                [[float(table[(k, c)][f"{p}_{m}"]) for c, _, _ in classes] for k in cases],
                dtype=np.float64,
            )
            means, counts = per_class_mean(values)
            ci = bootstrap_ci(values, n_resamples=n_resamples, confidence=confidence, seed=seed)
            for j, entry in enumerate(per_class):
                entry[m] = {
                    "mean": _num(means[j]),
                    "ci": [_num(ci.per_class[j, 0]), _num(ci.per_class[j, 1])],
                    "n_defined": int(counts[j]),
                    "n_undefined": len(cases) - int(counts[j]),
                }
            mean[m] = {
                "mean": _num(mean_over_classes(means)),
                "ci": [_num(ci.class_mean[0]), _num(ci.class_mean[1])],
                "n_classes": int(np.count_nonzero(~np.isnan(means))),
            }
        policies[p] = {
            "definition": POLICY_TEXT[p],
            "units": dict(UNITS[p]),
            "per_class": per_class,
            "mean": mean,
        }
    return {
        "format": SUMMARY_FORMAT,
        "n_cases": len(cases),
        "cases": cases,
        "classes": [
            {"index": c, "name": name, "nsd_tolerance_mm": tol} for c, name, tol in classes
        ],
        "bootstrap": {
            "method": "percentile bootstrap, cases resampled with replacement",
            "n_resamples": int(n_resamples),
            "confidence": float(confidence),
            "seed": int(seed),
        },
        "policies": policies,
        "volume_warnings": [
            {
                "case": k,
                "class_index": c,
                "class_name": name,
                "warning": str(table[(k, c)]["volume_warning"]),
            }
            for k in cases
            for c, name, _ in classes
            if table[(k, c)].get("volume_warning")
        ],
    }


def write_summary_json(
    summary: Mapping[str, Any], path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write a :func:`summarize` result as strict JSON (no NaN), atomically."""
    try:
        text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    except ValueError as exc:
        raise DataError(f"summary holds NaN/inf; build it with summarize() ({exc})") from exc
    return _write_report(path, text, overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# Markdown (paper Table 1 shape)
# --------------------------------------------------------------------------------------------
def _cell(x: float | None, scale: float = 1.0) -> str:
    return "n/a" if x is None else f"{x * scale:.2f}"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown tables shaped like H-SAM's Table 1 for one or more runs.

    Args:
        summaries: ``{run or method name: summarize(...) result}``; all runs must have the
            same classes.

    Returns:
        Markdown with (1) the legacy table -- rows = runs, columns = classes (Dice %), then
        mean Dice (%) and mean HD95 (voxels): the numbers comparable with published tables;
        (2) the strict table -- classes (Dice %), mean Dice (%), mean HD95 (mm), mean NSD (%);
        (3) bootstrap CIs of the means; (4) strict undefined-case counts per class; and,
        only when a run has any, (5) its predicted-size warnings (``volume_warnings``).
    """
    if not summaries:
        raise DataError("no runs to tabulate; pass {run name: summary}")
    runs = list(summaries.items())
    class_names = [c["name"] for c in runs[0][1]["classes"]]
    for name, s in runs[1:]:
        if [c["name"] for c in s["classes"]] != class_names:
            raise DataError(
                f"run {name!r} has classes {[c['name'] for c in s['classes']]}, expected "
                f"{class_names}; tabulate runs with the same label map together"
            )
    heads = [_md_escape(n) for n in class_names]
    tols = sorted({c["nsd_tolerance_mm"] for c in runs[0][1]["classes"]})
    tol_text = (
        f"{tols[0]:g} mm"
        if len(tols) == 1
        else ", ".join(f"{c['name']} {c['nsd_tolerance_mm']:g} mm" for c in runs[0][1]["classes"])
    )
    ncases = ", ".join(f"{_md_escape(n)}: {s['n_cases']}" for n, s in runs)
    lines = [
        "## Legacy policy (comparable with published TransUNet/SAMed/H-SAM tables)",
        "",
        "Per-class and mean Dice in %, mean HD95 in voxels (spacing ignored). A missed organ "
        "scores Dice 0 and HD95 0; a prediction on an absent organ scores Dice 100 and HD95 0. "
        f"Cases: {ncases}.",
        "",
        _row(["Method", *heads, "Mean Dice (%)", "Mean HD95 (vox)"]),
        _row(["---", *(["---:"] * (len(heads) + 2))]),
    ]
    for name, s in runs:
        pol = s["policies"]["legacy"]
        lines.append(
            _row(
                [
                    _md_escape(name),
                    *(_cell(c["dice"]["mean"], 100) for c in pol["per_class"]),
                    _cell(pol["mean"]["dice"]["mean"], 100),
                    _cell(pol["mean"]["hd95"]["mean"]),
                ]
            )
        )
    lines += [
        "",
        "## Strict policy (physical units, undefined cases excluded)",
        "",
        "Per-class and mean Dice in %, mean HD95 in mm, mean NSD in % at tolerance "
        f"{tol_text}. Dice and NSD are undefined when organ and prediction are both absent (0 when "
        "only one is); HD95 when either is absent; undefined cases are left out of the means "
        "(counts below).",
        "",
        _row(["Method", *heads, "Mean Dice (%)", "Mean HD95 (mm)", "Mean NSD (%)"]),
        _row(["---", *(["---:"] * (len(heads) + 3))]),
    ]
    for name, s in runs:
        pol = s["policies"]["strict"]
        lines.append(
            _row(
                [
                    _md_escape(name),
                    *(_cell(c["dice"]["mean"], 100) for c in pol["per_class"]),
                    _cell(pol["mean"]["dice"]["mean"], 100),
                    _cell(pol["mean"]["hd95"]["mean"]),
                    _cell(pol["mean"]["nsd"]["mean"], 100),
                ]
            )
        )
    conf = runs[0][1]["bootstrap"]["confidence"]
    lines += [
        "",
        f"{conf * 100:g}% bootstrap confidence intervals of the means (cases resampled):",
        "",
        _row(
            [
                "Method",
                "Legacy Dice (%)",
                "Legacy HD95 (vox)",
                "Strict Dice (%)",
                "Strict HD95 (mm)",
                "Strict NSD (%)",
            ]
        ),
        _row(["---", *(["---:"] * 5)]),
    ]

    def ci(m: Mapping[str, Any], scale: float) -> str:
        lo, hi = m["ci"]
        return f"{_cell(m['mean'], scale)} [{_cell(lo, scale)}, {_cell(hi, scale)}]"

    for name, s in runs:
        lg, st = s["policies"]["legacy"]["mean"], s["policies"]["strict"]["mean"]
        lines.append(
            _row(
                [
                    _md_escape(name),
                    ci(lg["dice"], 100),
                    ci(lg["hd95"], 1),
                    ci(st["dice"], 100),
                    ci(st["hd95"], 1),
                    ci(st["nsd"], 100),
                ]
            )
        )
    lines += [
        "",
        "Strict undefined cases per class (Dice/HD95/NSD, of the run's cases):",
        "",
        _row(["Method", *heads]),
        _row(["---", *(["---:"] * len(heads))]),
    ]
    for name, s in runs:
        pol = s["policies"]["strict"]
        lines.append(
            _row(
                [
                    _md_escape(name),
                    *(
                        f"{c['dice']['n_undefined']}/{c['hd95']['n_undefined']}/"
                        f"{c['nsd']['n_undefined']}"
                        for c in pol["per_class"]
                    ),
                ]
            )
        )
    flagged = [(name, w) for name, s in runs for w in s.get("volume_warnings") or []]
    if flagged:
        lines += [
            "",
            "## Predicted-size warnings",
            "",
            "Cases where a predicted structure's size (fraction of the scan's voxels) is far "
            "outside the range seen in the training cases: the model may have failed on these "
            "scans (different contrast, scanner or field of view?); check their segmentations.",
            "",
            _row(["Method", "Case", "Class", "Warning"]),
            _row(["---", "---", "---", "---"]),
        ]
        lines += [
            _row(
                [
                    _md_escape(name),
                    _md_escape(str(w["case"])),
                    _md_escape(str(w["class_name"])),
                    _md_escape(str(w["warning"])),
                ]
            )
            for name, w in flagged
        ]
    return "\n".join(lines) + "\n"


def write_markdown_table(
    summaries: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write :func:`markdown_table` atomically."""
    return _write_report(path, markdown_table(summaries), overwrite=overwrite)


def write_reports(
    rows: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    run_name: str = "hsam",
    overwrite: bool = False,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``per_case.csv``, ``summary.json`` and ``table.md`` into ``out_dir``.

    Everything is computed before anything is written, and all three paths are checked first,
    so an existing output (without ``overwrite``) or bad rows leave the folder untouched.
    Returns ``{"per_case_csv", "summary_json", "table_md"}`` paths.
    """
    rows = list(rows)
    out = Path(out_dir)
    paths = {
        "per_case_csv": out / "per_case.csv",
        "summary_json": out / "summary.json",
        "table_md": out / "table.md",
    }
    if not overwrite:
        refuse_existing(paths.values())
    csv_text = per_case_csv_text(rows)
    summary = summarize(rows, n_resamples=n_resamples, confidence=confidence, seed=seed)
    json_text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    md_text = markdown_table({run_name: summary})
    _write_report(paths["per_case_csv"], csv_text, overwrite=overwrite)
    _write_report(paths["summary_json"], json_text, overwrite=overwrite)
    _write_report(paths["table_md"], md_text, overwrite=overwrite)
    return paths
