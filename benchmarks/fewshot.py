"""Few-shot results: H-SAM, the SAMed baseline and the Table-4 ablations over several seeds.

    python benchmarks/fewshot.py configs/la_4scans_litemedsam_cpu.yaml --seeds 0 1 2 \\
        --name la4 --title "LA, 4 labelled scans" --out runs/fewshot/la4

For each seed, every configuration is trained with `hsam train`'s engine on the protocol's
training split (checkpoint chosen on the validation volumes carved from the training cases,
never on the test list), then all checkpoints are evaluated in 3-D on the test list. The
frozen encoder units before the LoRA blocks are computed once per seed for a fixed set of
augmented views and shared by every configuration of that seed (same math as recomputing), and
once per test volume for all runs. Each finished run is kept in --out and an interrupted run
resumes from its last finished epoch, so a second call picks up where the first stopped
(only a run trained with the same configuration; otherwise the call stops and names the fields).
A run's test evaluation is kept beside it (`fewshot_eval.json`, keyed by the checkpoint's
sha256, the data and the test list) and reused by later calls; delete those files to
re-evaluate after changing the metrics code. Every section also scores the largest connected
component of the same predictions; `--slice-smoothing SIGMA` also scores each run with its
probabilities smoothed across slices (`hsam evaluate --slice-smoothing`; from the same pass of
the network as the raw predictions), stored as `fewshot_eval_slice_smoothing<SIGMA>.json`, and
adds those tables.

The script writes its own section of docs/results.md (between `<!-- fewshot:NAME -->` markers,
other sections untouched): rows = configurations, mean and standard deviation over seeds of
mean Dice, HD95 and per-class Dice (legacy policy, as the paper's tables), training time per
run, and a paragraph, computed from the numbers, on whether each of the paper's claims held.

Any protocol config works (a user's LA test list: --test-list FILE; a Synapse folder:
--set data.root=DIR with a Synapse config).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hsam.config import (
    DataConfig,
    InferenceConfig,
    ModelConfig,
    RunConfig,
    config_differences,
    load_run_config,
    load_yaml,
)
from hsam.data import read_dataset
from hsam.devices import configure_cpu_allocator, resolve_device, resolve_precision
from hsam.engine.data import read_id_list
from hsam.engine.prefix_cache import build_shared_prefix_cache
from hsam.engine.trainer import run_training
from hsam.errors import ConfigError, HSAMError
from hsam.evaluation.reports import summarize
from hsam.evaluation.scoring import evaluate_cases
from hsam.inference.postprocess import POSTPROCESS_CHOICES
from hsam.inference.predictor import Predictor, check_slice_smoothing_option
from hsam.io.atomic import atomic_write_text
from hsam.io.hashing import file_sha256

logger = logging.getLogger("fewshot")
REPO = Path(__file__).resolve().parents[1]

# Table 4's components: the mask-modulated cross-attention (MA), the hierarchical pixel
# decoder (HPD) and CMAttn. Every two-stage row switches them on or off; SAMed is stage 1 only.
COMPONENTS = ("mask_attention", "hierarchical_pixel_decoder", "cmattn")
SHORT = {"mask_attention": "MA", "hierarchical_pixel_decoder": "HPD", "cmattn": "CMAttn"}


@dataclasses.dataclass(frozen=True)
class Configuration:
    name: str
    label: str
    stages: int
    components: frozenset[str]

    def model_overrides(self) -> dict[str, Any]:
        if self.stages == 1:
            return {"stages": 1}
        return {
            "stages": 2,
            "mask_attention": "mask_attention" in self.components,
            "hierarchical_pixel_decoder": "hierarchical_pixel_decoder" in self.components,
            "cmattn": "paper" if "cmattn" in self.components else "off",
        }


def _two_stage(name: str, *components: str) -> Configuration:
    label = " + ".join(SHORT[c] for c in components) if components else "no component"
    return Configuration(name, f"two-stage, {label}", 2, frozenset(components))


CONFIGURATIONS = {
    c.name: c
    for c in (
        Configuration("samed", "SAMed baseline (stage 1 only)", 1, frozenset()),
        _two_stage("two_stage"),
        _two_stage("ma", "mask_attention"),
        _two_stage("hpd", "hierarchical_pixel_decoder"),
        _two_stage("cmattn", "cmattn"),
        _two_stage("ma_hpd", "mask_attention", "hierarchical_pixel_decoder"),
        _two_stage("ma_cmattn", "mask_attention", "cmattn"),
        _two_stage("hpd_cmattn", "hierarchical_pixel_decoder", "cmattn"),
        Configuration("hsam", "H-SAM (all components)", 2, frozenset(COMPONENTS)),
    )
}
# The table: baseline, each component alone, each pair, all three.
TABLE4 = ["samed", "ma", "hpd", "cmattn", "ma_hpd", "ma_cmattn", "hpd_cmattn", "hsam"]


def run_config(protocol: RunConfig, config: Configuration, seed: int) -> RunConfig:
    cfg = dataclasses.replace(
        protocol,
        model=dataclasses.replace(protocol.model, **config.model_overrides()),
        train=dataclasses.replace(protocol.train, seed=seed, cache_encoder_prefix=True),
    )
    return cfg


def _record_path(out: Path, seed: int, name: str) -> Path:
    return out / f"seed{seed}" / name / "fewshot_run.json"


def _check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to reuse or resume a run trained under another protocol."""
    diffs = config_differences(load_yaml(run_dir / "config.yaml"), cfg)
    if diffs:
        raise ConfigError(
            f"{run_dir} was trained with another configuration ({'; '.join(diffs)}). "
            "Use a new --out for the changed protocol, or remove that run folder to retrain it."
        )


def train_seed(
    protocol: RunConfig, seed: int, names: list[str], out: Path
) -> tuple[list[dict[str, Any]], float]:
    """Train every configuration for one seed; returns run records and the cache build time.

    Finished runs are reused and interrupted ones resumed only if they were trained with the
    same configuration (ConfigError otherwise)."""
    records, pending = [], []
    for name in names:
        path = _record_path(out, seed, name)
        if (path.parent / "config.yaml").is_file():
            _check_same_config(path.parent, run_config(protocol, CONFIGURATIONS[name], seed))
        if path.is_file():
            records.append(json.loads(path.read_text()))
            logger.info("seed %d %s: already trained (%s)", seed, name, path.parent)
        else:
            pending.append(name)
    cache_s = 0.0
    if pending:
        t = time.time()
        _, cache = build_shared_prefix_cache(run_config(protocol, CONFIGURATIONS[pending[0]], seed))
        cache_s = time.time() - t
    for name in pending:
        cfg = run_config(protocol, CONFIGURATIONS[name], seed)
        run_dir = out / f"seed{seed}" / name
        logger.info("seed %d: training %s", seed, CONFIGURATIONS[name].label)
        # A run interrupted after an epoch continues from its resume state.
        resume = (run_dir / "checkpoints" / "last.pt").is_file()
        if not resume and (run_dir / "config.yaml").is_file():
            raise ConfigError(
                f"{run_dir} holds a run interrupted before its first epoch ended (no "
                "checkpoints/last.pt to resume from); remove that folder and call again."
            )
        result = run_training(cfg, run_dir, cache=cache, resume=resume)
        record = {
            "seed": seed,
            "name": name,
            "checkpoint": str(result.best_checkpoint),
            "selected_on": "validation" if result.best_val_dice is not None else "last epoch",
            "best_val_dice": result.best_val_dice,
            # Summed over every call that trained the run (a resumed one included).
            "train_seconds": result.trained_seconds,
            "prefix_cache_seconds": cache_s,
            "torch_threads": torch.get_num_threads(),
        }
        atomic_write_text(_record_path(out, seed, name), json.dumps(record, indent=2))
        records.append(record)
    return records, cache_s


def _evaluation_key(
    protocol: RunConfig, record: dict[str, Any], test_ids: list[str], slice_smoothing: float = 0.0
) -> dict:
    """What an evaluation of a run depends on: a stored one is reused only if all match."""
    key = {
        "checkpoint_sha256": file_sha256(record["checkpoint"]),
        "data_format": protocol.data.format,
        "data_root": str(Path(protocol.data.root).resolve()),
        "test_ids": list(test_ids),
        "precision": protocol.train.precision,
        "inference_batch_size": protocol.train.inference_batch_size,
        "postprocess": list(POSTPROCESS_CHOICES),
    }
    if slice_smoothing:  # absent for the raw predictions, as in evaluations stored before
        key["slice_smoothing"] = slice_smoothing
    if protocol.inference.tta != "none":  # absent without it, as in evaluations stored before
        key["tta"] = protocol.inference.tta
    return key


def _evaluation_path(record: dict[str, Any], slice_smoothing: float = 0.0) -> Path:
    """<run dir>/fewshot_eval.json (fewshot_eval_slice_smoothing<sigma>.json for smoothed
    predictions), beside the run record (checkpoint: <run dir>/checkpoints)."""
    name = f"fewshot_eval_slice_smoothing{slice_smoothing:g}" if slice_smoothing else "fewshot_eval"
    return Path(record["checkpoint"]).parents[1] / f"{name}.json"


def stored_evaluation(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The summaries (per post-processing) stored at `path` for exactly this evaluation
    `key`, else None."""
    stored = json.loads(path.read_text()) if path.is_file() else None
    return stored["summaries"] if stored and stored["key"] == key else None


def evaluate_runs(
    protocol: RunConfig,
    records: list[dict[str, Any]],
    test_ids: list[str],
    smoothings: tuple[float, ...] = (0.0,),
) -> tuple[dict[float, dict[tuple[int, str], dict[str, Any]]], int]:
    """3-D evaluation of every run's checkpoint on the test cases (prefix shared per slice),
    of its predictions with each slice smoothing in `smoothings` (0: the raw predictions;
    see `hsam.inference.slicewise`; one pass of the network serves them all) and of each
    post-processing of them (`hsam.inference.postprocess`).

    A run evaluated before with the same checkpoint bytes, data, test list and smoothing keeps
    its stored summaries (beside its run record); returns {smoothing: {(seed, name):
    {postprocess: summary}}} and how many (run, smoothing) evaluations were reused."""
    summaries: dict[float, dict[tuple[int, str], dict[str, Any]]] = {s: {} for s in smoothings}
    todo: list[tuple[dict[str, Any], float, dict[str, Any]]] = []
    for record in records:
        for sigma in smoothings:
            key = _evaluation_key(protocol, record, test_ids, sigma)
            summary = stored_evaluation(_evaluation_path(record, sigma), key)
            if summary is None:
                todo.append((record, sigma, key))
            else:
                summaries[sigma][(record["seed"], record["name"])] = summary
    if todo:
        fresh = _evaluate(protocol, [(r, sigma) for r, sigma, _ in todo], test_ids)
        for (record, sigma, key), summary in zip(todo, fresh, strict=True):
            stored = json.dumps({"key": key, "summaries": summary}, indent=2)
            atomic_write_text(_evaluation_path(record, sigma), stored)
            summaries[sigma][(record["seed"], record["name"])] = summary
    ordered = {
        sigma: {(r["seed"], r["name"]): by_run[(r["seed"], r["name"])] for r in records}
        for sigma, by_run in summaries.items()
    }
    return ordered, len(records) * len(smoothings) - len(todo)


def _evaluate(
    protocol: RunConfig, jobs: list[tuple[dict[str, Any], float]], test_ids: list[str]
) -> list[dict[str, Any]]:
    """Summaries (per post-processing) of each (run record, slice smoothing), in order; a
    checkpoint is loaded once and its smoothings share its model, so it runs once per slice."""
    by_checkpoint: dict[str, Predictor] = {}
    predictors = []
    for record, sigma in jobs:
        path = str(record["checkpoint"])
        if path not in by_checkpoint:
            by_checkpoint[path] = Predictor.from_checkpoint(
                path,
                device="cpu",
                batch_size=protocol.train.inference_batch_size,
                precision=protocol.train.precision,
                postprocess="none",  # the raw labels; evaluate_cases scores each method
                slice_smoothing=0.0,  # not the recipe's default: each table says its own
                tta=protocol.inference.tta,  # part of how the recipe's models predict: every table
            )
        predictors.append(by_checkpoint[path].with_settings(slice_smoothing=sigma))
    cases = (read_dataset(protocol.data.format, protocol.data.root, [i])[0] for i in test_ids)
    evaluations = evaluate_cases(predictors, cases, postprocess=POSTPROCESS_CHOICES)
    rows = {method: [[] for _ in jobs] for method in POSTPROCESS_CHOICES}
    for i, evaluation in enumerate(evaluations, 1):
        for score in evaluation.scores:
            rows[score.postprocess][score.predictor].extend(score.rows)
        case_id = evaluation.case.case_id
        logger.info("test case %d/%d %s: %.0f s", i, len(test_ids), case_id, evaluation.seconds)
    return [
        {method: summarize(rows[method][j], n_resamples=200) for method in POSTPROCESS_CHOICES}
        for j in range(len(jobs))
    ]


def scores(summary: dict[str, Any]) -> dict[str, Any]:
    """Mean Dice (%), HD95 (voxels) and per-class Dice (%) under the legacy policy."""
    legacy = summary["policies"]["legacy"]

    def pct(x: float | None) -> float:
        return float("nan") if x is None else 100.0 * x

    return {
        "dice": pct(legacy["mean"]["dice"]["mean"]),
        "hd95": float("nan")
        if legacy["mean"]["hd95"]["mean"] is None
        else legacy["mean"]["hd95"]["mean"],
        "per_class": {c["name"]: pct(c["dice"]["mean"]) for c in legacy["per_class"]},
    }


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"  # one seed: no spread to report
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}"


def _lora_note(model: ModelConfig) -> str:
    """Where the protocol's LoRA sits: rank, layers (model.lora_layers) and blocks."""
    if model.lora_last_n == 0:
        return "no LoRA (encoder frozen, decoders only)"
    layers = "q and v" if model.lora_layers == "qv" else "every linear layer"
    blocks = (
        "every encoder block"
        if model.lora_last_n is None
        else f"the last {model.lora_last_n} encoder blocks"
    )
    return f"LoRA rank {model.lora_rank} on {layers} of {blocks}"


def _median_range(values: list[float]) -> str:
    """Wall-clock times: the median resists a run slowed by other work on the machine."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.median(values):.0f} ({min(values):.0f}–{max(values):.0f})"


def _paired(table: dict[tuple[int, str], dict[str, Any]], a: str, b: str, seeds: list[int]):
    """Per-seed Dice differences a - b (seeds where both ran)."""
    return [
        table[(s, a)]["dice"] - table[(s, b)]["dice"]
        for s in seeds
        if (s, a) in table and (s, b) in table
    ]


# Two paired differences are both positive by chance one time in four; protocols run 3 seeds.
MIN_PAIRS_FOR_VERDICT = 3


def _verdict(diffs: list[float]) -> str:
    if not diffs:
        return "not measured"
    mean = statistics.fmean(diffs)
    if len(diffs) == 1:
        return f"one seed only ({mean:+.2f} Dice points), no verdict without a spread"
    sd = statistics.stdev(diffs)
    wins = sum(d > 0 for d in diffs)
    spread = f"{mean:+.2f} Dice points (sd {sd:.2f}; better in {wins} of {len(diffs)} seeds)"
    if len(diffs) < MIN_PAIRS_FOR_VERDICT:
        return f"{spread}; too few paired seeds for a verdict"
    if mean > 0 and wins == len(diffs):
        return f"held: {spread}"
    if mean > 0:
        return f"not clearly: {spread}, within the seed-to-seed spread"
    return f"did not hold: {spread}"


def claims(table: dict[tuple[int, str], dict[str, Any]], seeds: list[int]) -> list[str]:
    """Sentences on the paper's claims, computed from paired per-seed differences."""
    overall = _verdict(_paired(table, "hsam", "samed", seeds))
    lines = [f"- H-SAM better than the SAMed baseline: {overall}."]
    by_components = {c.components: n for n, c in CONFIGURATIONS.items() if c.stages == 2}
    for component in COMPONENTS:
        diffs: list[float] = []
        pairs = []
        for without, name in by_components.items():
            if component in without:
                continue
            with_name = by_components.get(without | {component})
            if with_name is None:
                continue
            d = _paired(table, with_name, name, seeds)
            if d:
                diffs += d
                pairs.append(f"{name} -> {with_name}")
        alone = _paired(table, by_components[frozenset({component})], "samed", seeds)
        if not diffs and not alone:
            continue
        lines.append(
            f"- Adding {SHORT[component]} to a two-stage model "
            f"({', '.join(pairs) or 'no pair run'}): {_verdict(diffs)}. "
            f"{SHORT[component]} alone vs SAMed: {_verdict(alone)}."
        )
    if len(lines) == 1:
        lines.append(
            "- Each component's contribution: not measured (no ablation configuration ran; "
            "the default --configs runs all of Table 4)."
        )
    return lines


def _validation_note(out: Path, records: list[dict[str, Any]]) -> str:
    """Which volumes, carved from the training cases, selected the checkpoints (split.json)."""
    ids: dict[str, None] = {}
    for record in records:
        split = _record_path(out, record["seed"], record["name"]).with_name("split.json")
        if split.is_file():
            ids.update(dict.fromkeys(json.loads(split.read_text())["val"]))
    if not any(r["selected_on"] == "validation" for r in records):
        return "no validation volumes"
    carved = "validation volumes carved from the training cases"
    return f"{carved}: {', '.join(f'`{i}`' for i in ids)}" if ids else carved


def _augmentation_note(aug: Any) -> str:
    if not aug.enabled:
        return "none"
    parts = ["rotation, scaling, elastic"]
    if aug.p_flip_rot90 > 0:
        parts.append(f"flip/rot90 (p {aug.p_flip_rot90})")
    if aug.p_rot90 > 0:
        parts.append(f"rot90 without flip (p {aug.p_rot90})")
    if aug.p_bias_field > 0:
        parts.append(
            f"bias field (order {aug.bias_field_order}, coefficients up to "
            f"{aug.bias_field_coefficient}; p {aug.p_bias_field})"
        )
    if aug.p_contrast > 0:
        parts.append(f"contrast {aug.contrast_range} (p {aug.p_contrast})")
    if aug.p_gamma > 0:
        parts.append(f"gamma {aug.gamma_range} (p {aug.p_gamma})")
    if aug.p_histogram_shift > 0:
        parts.append(
            f"histogram shift ({aug.histogram_shift_points} knots moved up to "
            f"{aug.histogram_shift_max}; p {aug.p_histogram_shift})"
        )
    return ", ".join(parts)


def _threads_note(records: list[dict[str, Any]]) -> str:
    """The torch threads the runs trained with (a later call that reuses them may differ)."""
    threads = {r.get("torch_threads") for r in records}
    if None in threads:  # records written before runs stored their thread count
        return f"{torch.get_num_threads()} torch threads in this call (runs did not record theirs)"
    low, high = min(threads), max(threads)
    return f"{low if low == high else f'{low}-{high}'} torch threads per training run"


def _intensity_note(data: DataConfig) -> str:
    """What the protocol does to intensities beyond the format's default policy ('' if
    nothing), as a clause of the protocol line."""
    notes = [f"intensity {data.intensity}"] if data.intensity else []
    if data.histogram_standardization:
        notes.append("histogram standardisation onto the training volumes' mean landmarks")
    return "".join(f"; {note}" for note in notes)


def _evaluation_note(seconds: float, reused: int, runs: int, per_run: int = 1) -> str:
    """`per_run` evaluations of each of `runs` runs (2 with slice smoothing), `reused` of
    them from earlier calls."""
    total = runs * per_run
    if reused == total:  # this call only checked the stored evaluations' keys
        return f"test evaluations of all {runs} runs reused from earlier calls"
    note = f"test evaluation {seconds:.0f} s"
    what = "runs' evaluations" if per_run == 1 else "evaluations"
    return note + (f" ({reused} of {total} {what} reused)" if reused else "")


def render(
    args: argparse.Namespace,
    protocol: RunConfig,
    records: list[dict[str, Any]],
    table: dict[tuple[int, str], dict[str, Any]],
    test_ids: list[str],
    cache_seconds: dict[int, float],
    eval_seconds: float,
    reused: int = 0,
    variants: Sequence[tuple[str, dict[tuple[int, str], dict[str, Any]]]] = (),
) -> str:
    """The results section; `variants` are (heading, table) of the same checkpoints
    evaluated otherwise (post-processed, slice-smoothed), each paired with `table`."""
    seeds = sorted({r["seed"] for r in records})
    names = [n for n in args.configs if any(r["name"] == n for r in records)]
    classes = list(next(iter(table.values()))["per_class"])
    train_s = {(r["seed"], r["name"]): r["train_seconds"] for r in records}
    selected = sorted({r["selected_on"] for r in records})
    m, d, t = protocol.model, protocol.data, protocol.train
    now = dt.datetime.now(dt.timezone.utc)
    # With slice smoothing each run has two stored evaluations (raw, smoothed).
    per_run = 2 if args.slice_smoothing else 1
    evaluation = _evaluation_note(eval_seconds, reused, len(records), per_run)
    lines = [
        f"<!-- fewshot:{args.name} -->",
        f"## {args.title}",
        "",
        f"Written by `benchmarks/fewshot.py` on {now:%Y-%m-%d %H:%M} UTC:",
        "",
        f"    {args.command}",
        "",
        f"- protocol: `{args.protocol}`; backbone `{m.backbone}` at S = {m.image_size}, "
        f"{_lora_note(m)}; {t.epochs} epochs, batch "
        f"{t.batch_size}, lr {t.base_lr}, {t.augmented_views} cached augmented views, "
        f"{t.precision}; training slices: "
        + ("only those with label (data.foreground_only)" if d.foreground_only else "all")
        + _intensity_note(d)
        + "; stage weight "
        + (
            f"over the run ({t.stage_weight_horizon}-epoch schedule)"
            if t.stage_weight_horizon
            else "per epoch"
        )
        + f"; augmentation: {_augmentation_note(t.augment)}; "
        f"seeds {', '.join(map(str, seeds))}.",
        f"- test: {len(test_ids)} volumes from `{args.test_list or d.test_list}`, 3-D, "
        "legacy policy (the paper's convention: Dice, HD95 in voxels); checkpoint chosen on "
        f"{' / '.join(selected)} ({_validation_note(Path(args.out), records)}).",
        _inference_note(protocol.inference, args.slice_smoothing),
        f"- machine: {platform.processor() or platform.machine()} "
        f"({torch.backends.cpu.get_cpu_capability()}), {_threads_note(records)}, "
        f"torch {torch.__version__}; encoder prefix cache "
        f"{statistics.fmean(cache_seconds.values()) if cache_seconds else 0:.0f} s per seed "
        f"(shared by its runs); {evaluation}.",
        "",
        "Mean ± standard deviation over seeds (the mean alone for a single seed). Train time: "
        "wall-clock seconds of a run's epochs (training and validation, prefix cache excluded; "
        "an interrupted run's calls summed); a run that shared the CPU with other work shows as "
        "the top of the range.",
        "",
        "| Configuration | MA | HPD | CMAttn | Dice (%) | HD95 (vox) | "
        + " | ".join(f"{c} Dice" for c in classes)
        + " | train time (s, median (range)) |",
        "|---|---|---|---|---|---|" + "---|" * len(classes) + "---|",
    ]
    for name in names:
        cfg = CONFIGURATIONS[name]
        runs = [table[(s, name)] for s in seeds if (s, name) in table]
        marks = ["✓" if c in cfg.components else "" for c in COMPONENTS]
        if cfg.stages == 1:
            marks = ["—"] * 3
        cells = [
            cfg.label,
            *marks,
            _mean_sd([r["dice"] for r in runs]),
            _mean_sd([r["hd95"] for r in runs]),
            *[_mean_sd([r["per_class"][c] for r in runs]) for c in classes],
            _median_range([train_s[(s, name)] for s in seeds if (s, name) in train_s]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per seed, mean Dice (%):",
        "",
        "| Configuration | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for name in names:
        cells = [f"{table[(s, name)]['dice']:.2f}" if (s, name) in table else "—" for s in seeds]
        lines.append(f"| {CONFIGURATIONS[name].label} | " + " | ".join(cells) + " |")
    lines += ["", "Did the paper's claims hold here (paired by seed)?", "", *claims(table, seeds)]
    for heading, variant in variants:
        lines += ["", *_variant_lines(heading, table, variant, names, seeds)]
    lines += ["", f"<!-- /fewshot:{args.name} -->", ""]
    return "\n".join(lines)


def _inference_note(inference: InferenceConfig, sigma: float) -> str:
    """Which table holds what `hsam predict` gives the recipe's checkpoints by default (its
    config's `inference`); `sigma`: this call's --slice-smoothing."""
    note = "- inference: the main table scores the raw predictions"
    if inference.tta != "none":
        turns = "four quarter turns" if inference.tta == "rot90" else "four flips"
        note = (
            f"- inference: every table averages the probabilities over the {turns} of each "
            f"slice (the recipe's `inference.tta: {inference.tta}`); the main table scores "
            "the predictions without post-processing"
        )
    smoothing, lcc = inference.slice_smoothing, inference.postprocess == "largest_component"
    if not smoothing and not lcc:
        return note + ", as the recipe's checkpoints predict by default."
    defaults = " and ".join(
        ([f"slice smoothing {smoothing:g}"] if smoothing else [])
        + (["the largest connected component"] if lcc else [])
    )
    if smoothing and smoothing != sigma:
        where = f"not evaluated in this section (`--slice-smoothing {smoothing:g}` adds it)"
    elif smoothing:
        where = "the last table below" if lcc else "the slice-smoothing table below"
    else:
        where = "the largest-connected-component table below"
    return (
        f"{note}; the recipe's checkpoints predict with {defaults} by default (config "
        f"`inference`, applied by `hsam predict` / `evaluate`): {where}."
    )


LCC_HEADING = (
    "With largest-connected-component post-processing (same checkpoints and predictions; "
    "`--postprocess largest_component` in `hsam evaluate` / `predict`):"
)


def _smoothing_headings(sigma: float) -> tuple[str, str]:
    """Headings of the slice-smoothed evaluations, without and with the largest component."""
    how = (
        f"class probabilities averaged across neighbouring slices with a Gaussian of sigma "
        f"{sigma:g} slices before the argmax; `--slice-smoothing {sigma:g}` in `hsam evaluate` "
        "/ `predict`"
    )
    return (
        f"With slice smoothing (same checkpoints; {how}):",
        f"With slice smoothing and the largest connected component (same checkpoints; {how}, "
        "then `--postprocess largest_component`):",
    )


def _variant_lines(
    heading: str,
    table: dict[tuple[int, str], dict[str, Any]],
    variant: dict[tuple[int, str], dict[str, Any]],
    names: list[str],
    seeds: list[int],
) -> list[str]:
    """The same checkpoints evaluated another way (`heading` says how), paired with the raw
    predictions."""
    lines = [
        heading,
        "",
        "| Configuration | Dice (%) | HD95 (vox) | Dice change vs raw, paired by seed |",
        "|---|---|---|---|",
    ]
    for name in names:
        keys = [(s, name) for s in seeds if (s, name) in variant]
        diffs = [variant[k]["dice"] - table[k]["dice"] for k in keys]
        change = f"{statistics.fmean(diffs):+.2f}" if diffs else "—"
        if len(diffs) > 1:
            change += f" (better in {sum(d > 0 for d in diffs)} of {len(diffs)} seeds)"
        cells = [
            CONFIGURATIONS[name].label,
            _mean_sd([variant[k]["dice"] for k in keys]),
            _mean_sd([variant[k]["hd95"] for k in keys]),
            change,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _split_section(text: str, name: str) -> tuple[str, str] | None:
    """(text before, text after) the section `name`, or None if the file has none."""
    start, end = f"<!-- fewshot:{name} -->", f"<!-- /fewshot:{name} -->"
    if start not in text or end not in text:
        return None
    before, rest = text.split(start, 1)
    return before, rest.split(end, 1)[1].lstrip("\n")


def update_results(path: Path, name: str, section: str, replaces: tuple[str, ...] = ()) -> None:
    """Replace this protocol's section of the results file (other sections stay).

    Sections named in `replaces` (e.g. an earlier partial run of the same protocol that
    this one supersedes) are removed.
    """
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        text = (
            "# Few-shot results\n\n"
            "Each section below is written by `benchmarks/fewshot.py` (command inside); "
            "rerun it to refresh.\n\n"
        )
    for old in replaces:
        if old != name and (parts := _split_section(text, old)) is not None:
            text = parts[0] + parts[1]
    if (parts := _split_section(text, name)) is not None:
        text = parts[0] + section + parts[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("protocol", help="run config (YAML) of the protocol, e.g. configs/...")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=TABLE4,
        choices=list(CONFIGURATIONS),
        help=f"configurations to run (default: {' '.join(TABLE4)})",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--test-list", help="file of test case ids (default: data.test_list)")
    parser.add_argument("--out", required=True, help="folder of the runs (reused if present)")
    parser.add_argument("--name", required=True, help="section key in the results file")
    parser.add_argument("--title", help="section title (default: the name)")
    parser.add_argument("--results", default=str(REPO / "docs" / "results.md"))
    parser.add_argument(
        "--slice-smoothing",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="also score every run with its probabilities smoothed across slices (a "
        "Gaussian of SIGMA slices; `hsam evaluate --slice-smoothing`), as extra tables",
    )
    parser.add_argument(
        "--replaces",
        nargs="+",
        default=[],
        metavar="NAME",
        help="sections this one supersedes, removed from the results file (e.g. a partial run)",
    )
    args = parser.parse_args(argv)
    args.title = args.title or args.name
    args.command = "python benchmarks/fewshot.py " + " ".join(
        a if " " not in a else repr(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    configure_cpu_allocator()
    try:
        return run(args, parser)
    except HSAMError as exc:
        logger.error("%s", exc)
        return 2


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    args.slice_smoothing = check_slice_smoothing_option(args.slice_smoothing)
    protocol = load_run_config(args.protocol, args.set)
    # precision auto, resolved once for this machine: training, cache and evaluation agree.
    device = resolve_device(protocol.train.device)
    precision = resolve_precision(protocol.train.precision, device)
    protocol = dataclasses.replace(
        protocol, train=dataclasses.replace(protocol.train, precision=precision)
    )
    test_spec = args.test_list or protocol.data.test_list
    if not test_spec:
        parser.error("the protocol has no data.test_list; pass --test-list")
    test_ids = read_id_list(test_spec)
    out = Path(args.out)
    records: list[dict[str, Any]] = []
    cache_seconds: dict[int, float] = {}
    for seed in args.seeds:
        seed_records, cache_s = train_seed(protocol, seed, args.configs, out)
        records += seed_records
        # Reused runs report the cache time of the call that trained them.
        cache_seconds[seed] = cache_s or max(r["prefix_cache_seconds"] for r in seed_records)
    smoothings = (0.0, args.slice_smoothing) if args.slice_smoothing else (0.0,)
    t = time.time()
    evaluated, reused = evaluate_runs(protocol, records, test_ids, smoothings)
    eval_seconds = time.time() - t
    if reused:
        total = len(records) * len(smoothings)
        logger.info("%d of %d evaluations reused from earlier calls", reused, total)
    summaries = evaluated[0.0]
    table = {key: scores(s["none"]) for key, s in summaries.items()}
    table_lcc = {key: scores(s["largest_component"]) for key, s in summaries.items()}
    variants = [(LCC_HEADING, table_lcc)]
    smoothed: dict[tuple[int, str], dict[str, Any]] = {}
    if args.slice_smoothing:
        smoothed = evaluated[args.slice_smoothing]
        headings = _smoothing_headings(args.slice_smoothing)
        for heading, method in zip(headings, POSTPROCESS_CHOICES, strict=True):
            variants.append((heading, {k: scores(s[method]) for k, s in smoothed.items()}))
    atomic_write_text(
        out / "results.json",
        json.dumps(
            {
                "command": args.command,
                "runs": records,
                "scores": [{"seed": s, "name": n, **v} for (s, n), v in table.items()],
                "scores_largest_component": [
                    {"seed": s, "name": n, **v} for (s, n), v in table_lcc.items()
                ],
                "summaries": [{"seed": s, "name": n, **v} for (s, n), v in summaries.items()],
                "slice_smoothing": args.slice_smoothing,
                "summaries_slice_smoothing": [
                    {"seed": s, "name": n, **v} for (s, n), v in smoothed.items()
                ],
            },
            indent=2,
        ),
    )
    section = render(
        args, protocol, records, table, test_ids, cache_seconds, eval_seconds, reused, variants
    )
    update_results(Path(args.results), args.name, section, tuple(args.replaces))
    logger.info("wrote %s (section %s) and %s", args.results, args.name, out / "results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
