"""benchmarks/fewshot.py: configurations, claims, and a tiny end-to-end run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from conftest import ellipsoid_label, load_benchmark, write_nnunet_dataset
from hsam.config import AugmentConfig, InferenceConfig, ModelConfig
from hsam.data import read_dataset
from hsam.engine.data import prepare_case
from hsam.evaluation.metrics import dice
from hsam.inference.postprocess import keep_largest_component
from hsam.inference.slicewise import predict_volume
from hsam.io.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def fewshot():
    yield from load_benchmark("fewshot")


def test_table4_configurations_switch_the_right_components(fewshot):
    over = {n: fewshot.CONFIGURATIONS[n].model_overrides() for n in fewshot.TABLE4}
    assert over["samed"] == {"stages": 1}
    assert over["hsam"] == {
        "stages": 2,
        "mask_attention": True,
        "hierarchical_pixel_decoder": True,
        "cmattn": "paper",
    }
    assert over["ma"]["mask_attention"] and not over["ma"]["hierarchical_pixel_decoder"]
    assert over["ma"]["cmattn"] == "off"
    assert over["hpd_cmattn"] == {
        "stages": 2,
        "mask_attention": False,
        "hierarchical_pixel_decoder": True,
        "cmattn": "paper",
    }
    # Each component alone and each pair, plus baseline and full model: 8 distinct rows.
    assert len({json.dumps(o, sort_keys=True) for o in over.values()}) == 8


def test_claims_are_computed_from_paired_seeds(fewshot):
    def row(d):
        return {"dice": d, "hd95": 1.0, "per_class": {}}

    table = {}
    for seed, base in enumerate([80.0, 82.0, 81.0]):
        table[(seed, "samed")] = row(base)
        table[(seed, "hsam")] = row(base + 1.0)  # better in every seed
        table[(seed, "ma_hpd")] = row(base + 2.0)  # CMAttn hurts: hsam = ma_hpd - 1
        table[(seed, "ma_cmattn")] = row(base + 1.0 - (0.5 if seed else -0.5))
    lines = fewshot.claims(table, [0, 1, 2])
    assert lines[0].startswith("- H-SAM better than the SAMed baseline: held: +1.00")
    cm = next(line for line in lines if line.startswith("- Adding CMAttn"))
    assert "ma_hpd -> hsam" in cm and "did not hold: -1.00" in cm
    hpd = next(line for line in lines if line.startswith("- Adding HPD"))
    assert "ma_cmattn -> hsam" in hpd and "not clearly" in hpd  # +0.5 in two seeds, -0.5 in one
    single = fewshot.claims({(0, "samed"): row(80.0), (0, "hsam"): row(82.0)}, [0])
    assert "one seed only (+2.00" in single[0]  # no verdict from a single seed
    # H-SAM vs SAMed alone: one line for the components instead of one per component.
    assert single[1:] == [
        "- Each component's contribution: not measured (no ablation configuration ran; the "
        "default --configs runs all of Table 4)."
    ]
    assert not any(line.startswith("- Adding MA") for line in lines)  # MA has no pair above
    two = fewshot.claims({k: v for k, v in table.items() if k[0] < 2}, [0, 1])
    assert two[0] == (
        "- H-SAM better than the SAMed baseline: +1.00 Dice points (sd 0.00; better in 2 of 2 "
        "seeds); too few paired seeds for a verdict."
    )


def test_evaluation_note_says_what_was_evaluated(fewshot):
    assert fewshot._evaluation_note(12.3, 0, 4) == "test evaluation 12 s"
    assert fewshot._evaluation_note(99.0, 3, 4) == (
        "test evaluation 99 s (3 of 4 runs' evaluations reused)"
    )
    # All reused: the call took no evaluation time worth reporting.
    assert fewshot._evaluation_note(8.0, 4, 4) == (
        "test evaluations of all 4 runs reused from earlier calls"
    )
    # With slice smoothing each run has two evaluations (raw and smoothed).
    assert (
        fewshot._evaluation_note(5.0, 4, 4, 2) == "test evaluation 5 s (4 of 8 evaluations reused)"
    )
    assert fewshot._evaluation_note(5.0, 8, 4, 2).startswith("test evaluations of all 4 runs")


def test_intensity_note_names_what_the_protocol_changes(fewshot):
    from hsam.config import DataConfig

    assert fewshot._intensity_note(DataConfig()) == ""
    note = fewshot._intensity_note(
        DataConfig(intensity="percentile[1,99]", histogram_standardization=True)
    )
    assert note == (
        "; intensity percentile[1,99]; histogram standardisation onto the training volumes' "
        "mean landmarks"
    )


def test_threads_note_reports_the_training_runs_threads(fewshot, monkeypatch):
    monkeypatch.setattr(fewshot.torch, "get_num_threads", lambda: 8)
    one = [{"torch_threads": 1}, {"torch_threads": 1}]
    assert fewshot._threads_note(one) == "1 torch threads per training run"
    mixed = [{"torch_threads": 2}, {"torch_threads": 1}]
    assert fewshot._threads_note(mixed) == "1-2 torch threads per training run"
    # Older records carry no count: the note says whose count it gives instead.
    assert fewshot._threads_note([{"torch_threads": 1}, {}]) == (
        "8 torch threads in this call (runs did not record theirs)"
    )


def test_lora_note_names_rank_layers_and_blocks(fewshot):
    assert fewshot._lora_note(ModelConfig(lora_rank=4, lora_last_n=8)) == (
        "LoRA rank 4 on q and v of the last 8 encoder blocks"
    )
    assert fewshot._lora_note(ModelConfig(lora_rank=4, lora_layers="all_linear")) == (
        "LoRA rank 4 on every linear layer of every encoder block"
    )
    assert fewshot._lora_note(ModelConfig(lora_last_n=0)).startswith("no LoRA")


def test_inference_note_points_at_the_table_of_the_recipes_defaults(fewshot):
    note = fewshot._inference_note
    assert note(InferenceConfig(), 0.0).endswith("as the recipe's checkpoints predict by default.")
    la = InferenceConfig(slice_smoothing=2, postprocess="largest_component")
    assert "with slice smoothing 2 and the largest connected component" in note(la, 2.0)
    assert note(la, 2.0).endswith(": the last table below.")
    assert note(la, 0.0).endswith("(`--slice-smoothing 2` adds it).")
    lcc = InferenceConfig(postprocess="largest_component")
    assert note(lcc, 0.0).endswith(": the largest-connected-component table below.")
    assert note(InferenceConfig(slice_smoothing=1), 1.0).endswith("slice-smoothing table below.")
    turned = note(InferenceConfig(postprocess="largest_component", tta="rot90"), 0.0)
    assert turned.startswith("- inference: every table averages the probabilities over the four")
    assert "`inference.tta: rot90`" in turned
    assert turned.endswith(": the largest-connected-component table below.")


def test_augmentation_note_names_each_enabled_extra(fewshot):
    assert fewshot._augmentation_note(AugmentConfig()) == "rotation, scaling, elastic"
    assert fewshot._augmentation_note(AugmentConfig(enabled=False)) == "none"
    note = fewshot._augmentation_note(
        AugmentConfig(p_bias_field=0.5, bias_field_coefficient=0.3, p_gamma=0.2)
    )
    assert note == (
        "rotation, scaling, elastic, bias field (order 3, coefficients up to 0.3; p 0.5), "
        "gamma [0.5, 2.0] (p 0.2)"
    )
    assert fewshot._augmentation_note(AugmentConfig(p_histogram_shift=0.5)) == (
        "rotation, scaling, elastic, histogram shift (3 knots moved up to 0.3; p 0.5)"
    )


def test_a_full_section_replaces_the_partial_one(tmp_path, fewshot):
    results = tmp_path / "results.md"
    results.write_text(
        "# Few-shot results\n\nintro\n\n<!-- fewshot:acdc -->\n3 seeds, 2 configs\n"
        "<!-- /fewshot:acdc -->\n\n<!-- fewshot:acdc_partial -->\n2 seeds, 8 configs\n"
        "<!-- /fewshot:acdc_partial -->\n\n<!-- fewshot:la -->\nla\n<!-- /fewshot:la -->\n"
    )
    full = "<!-- fewshot:acdc -->\n3 seeds, 8 configs\n<!-- /fewshot:acdc -->\n"
    fewshot.update_results(results, "acdc", full, replaces=("acdc_partial", "absent"))
    text = results.read_text(encoding="utf-8")
    assert "2 seeds" not in text and "fewshot:acdc_partial" not in text
    assert text.count("3 seeds, 8 configs") == 1 and "3 seeds, 2 configs" not in text
    assert text.startswith("# Few-shot results\n\nintro") and "<!-- fewshot:la -->\nla" in text


def _tiny_protocol(tmp_path: Path, data: dict | None = None) -> Path:
    """Tiny model and schedule; `data` defaults to a 5-case nnU-Net folder (3 train, 2 test)."""
    if data is None:
        root = write_nnunet_dataset(tmp_path / "data", n_cases=5)
        (tmp_path / "train.list").write_text("case0\ncase1\ncase2\n")
        (tmp_path / "test.list").write_text("case3\ncase4\n")
        data = {
            "format": "nnunet",
            "root": str(root),
            "train_list": str(tmp_path / "train.list"),
            "test_list": str(tmp_path / "test.list"),
        }
    cfg = {
        "model": {
            "backbone": "tiny",
            "image_size": 64,
            "num_classes": 1,
            "lora_rank": 2,
            "lora_last_n": 1,
        },
        "data": {**data, "val_cases": 1},
        "train": {
            "epochs": 2,
            "batch_size": 2,
            "max_steps_per_epoch": 2,
            "warmup_steps": 1,
            "val_every": 1,
            "augmented_views": 2,
        },
    }
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fewshot_end_to_end_on_a_tiny_protocol(tmp_path, fewshot):
    protocol = _tiny_protocol(tmp_path)
    results = tmp_path / "results.md"
    results.write_text(
        "# Few-shot results\n\nintro kept\n\n<!-- fewshot:other -->\nother\n"
        "<!-- /fewshot:other -->\n"
    )
    argv = [
        str(protocol),
        "--seeds",
        "0",
        "1",
        "--configs",
        "samed",
        "hsam",
        "--out",
        str(tmp_path / "runs"),
        "--name",
        "tiny",
        "--results",
        str(results),
    ]
    assert fewshot.main(argv) == 0

    text = results.read_text(encoding="utf-8")
    assert "intro kept" in text and "<!-- fewshot:other -->\nother" in text
    section = text.split("<!-- fewshot:tiny -->", 1)[1].split("<!-- /fewshot:tiny -->", 1)[0]
    assert "SAMed baseline (stage 1 only)" in section and "H-SAM (all components)" in section
    assert "seed 0 | seed 1" in section and "H-SAM better than the SAMed baseline" in section
    (carved,) = json.loads((tmp_path / "runs" / "seed0" / "hsam" / "split.json").read_text())["val"]
    assert f"validation volumes carved from the training cases: `{carved}`)" in section
    assert "; training slices: all;" in section  # the protocol trains every slice
    hsam_row = next(line for line in section.splitlines() if line.startswith("| H-SAM"))
    assert re.search(r"\| \d+ \(\d+–\d+\) \|$", hsam_row)  # train time: median (range)

    # Every reported Dice is that of the run's selected checkpoint on the test volumes.
    out = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert {(r["seed"], r["name"]) for r in out["runs"]} == {
        (s, n) for s in (0, 1) for n in ("samed", "hsam")
    }
    run = next(r for r in out["runs"] if (r["seed"], r["name"]) == (1, "hsam"))
    assert run["selected_on"] == "validation"
    assert f"{run['torch_threads']} torch threads per training run" in section
    loaded = load_checkpoint(run["checkpoint"])
    model = loaded.built.model.eval()
    scores = []
    for case in read_dataset("nnunet", tmp_path / "data", ["case3", "case4"]):
        case = prepare_case(case, loaded.meta["intensity_policy"])
        pred, _ = predict_volume(model, case.image, batch_size=8)
        scores.append(dice(pred == 1, case.label == 1, "legacy"))
    reported = next(s for s in out["scores"] if (s["seed"], s["name"]) == (1, "hsam"))
    assert reported["dice"] == pytest.approx(100 * np.mean(scores), abs=1e-6)
    # ... and the post-processed row that of the same predictions cut to their largest
    # connected component.
    kept = []
    for case in read_dataset("nnunet", tmp_path / "data", ["case3", "case4"]):
        case = prepare_case(case, loaded.meta["intensity_policy"])
        pred, _ = predict_volume(model, case.image, batch_size=8)
        kept.append(dice(keep_largest_component(pred, 1) == 1, case.label == 1, "legacy"))
    lcc = out["scores_largest_component"]
    reported = next(s for s in lcc if (s["seed"], s["name"]) == (1, "hsam"))
    assert reported["dice"] == pytest.approx(100 * np.mean(kept), abs=1e-6)
    assert "With largest-connected-component post-processing" in section
    assert "- inference: the main table scores the raw predictions, as the recipe" in section

    # A second call reuses the finished runs and their evaluations, and rewrites only its
    # own section.
    record = tmp_path / "runs" / "seed0" / "samed" / "fewshot_run.json"
    evaluation = record.with_name("fewshot_eval.json")
    before = record.stat().st_mtime_ns, evaluation.stat().st_mtime_ns
    assert fewshot.main(argv) == 0
    assert (record.stat().st_mtime_ns, evaluation.stat().st_mtime_ns) == before
    text = results.read_text(encoding="utf-8")
    assert text.count("<!-- fewshot:tiny -->") == 1 and "intro kept" in text
    assert "test evaluations of all 4 runs reused from earlier calls" in text
    again = json.loads((tmp_path / "runs" / "results.json").read_text())["scores"]
    assert again == out["scores"]

    # --slice-smoothing adds tables of the smoothed predictions (the raw evaluations reused
    # and kept), scored as predict_volume's smoothed labels.
    assert fewshot.main([*argv, "--slice-smoothing", "1.5"]) == 0
    assert evaluation.stat().st_mtime_ns == before[1]
    assert record.with_name("fewshot_eval_slice_smoothing1.5.json").is_file()
    section = results.read_text(encoding="utf-8").split("<!-- fewshot:tiny -->", 1)[1]
    assert "With slice smoothing (same checkpoints; " in section
    assert "`--slice-smoothing 1.5` in `hsam evaluate`" in section
    assert "(4 of 8 evaluations reused)" in section
    smoothed = json.loads((tmp_path / "runs" / "results.json").read_text())
    summary = next(
        s for s in smoothed["summaries_slice_smoothing"] if (s["seed"], s["name"]) == (1, "hsam")
    )
    smoothed_scores = []
    for case in read_dataset("nnunet", tmp_path / "data", ["case3", "case4"]):
        case = prepare_case(case, loaded.meta["intensity_policy"])
        pred, _ = predict_volume(model, case.image, batch_size=8, slice_smoothing=1.5)
        smoothed_scores.append(dice(pred == 1, case.label == 1, "legacy"))
    legacy = summary["none"]["policies"]["legacy"]["mean"]["dice"]["mean"]
    assert legacy == pytest.approx(np.mean(smoothed_scores), abs=1e-6)
    assert fewshot.main([*argv, "--slice-smoothing", "-2"]) == 2

    # Another test list is evaluated afresh, raw and smoothed from one pass of each model.
    one = tmp_path / "one.list"
    one.write_text("case3\n")
    assert fewshot.main([*argv, "--test-list", str(one), "--slice-smoothing", "1.5"]) == 0
    for name in ("fewshot_eval.json", "fewshot_eval_slice_smoothing1.5.json"):
        assert json.loads(record.with_name(name).read_text())["key"]["test_ids"] == ["case3"]
    assert "evaluations reused" not in results.read_text(encoding="utf-8")
    again = json.loads((tmp_path / "runs" / "results.json").read_text())
    summary = next(
        s for s in again["summaries_slice_smoothing"] if (s["seed"], s["name"]) == (1, "hsam")
    )
    legacy = summary["none"]["policies"]["legacy"]["mean"]["dice"]["mean"]
    assert legacy == pytest.approx(smoothed_scores[0], abs=1e-6)

    # The recipe's test-time augmentation is how its models predict, in every table: the
    # runs are reused and evaluated afresh with it, scored as predict_volume's TTA labels.
    assert fewshot.main([*argv, "--set", "inference.tta=rot90"]) == 0
    assert json.loads(evaluation.read_text())["key"]["tta"] == "rot90"
    section = results.read_text(encoding="utf-8").split("<!-- fewshot:tiny -->", 1)[1]
    assert "every table averages the probabilities over the four quarter turns" in section
    turned = []
    for case in read_dataset("nnunet", tmp_path / "data", ["case3", "case4"]):
        case = prepare_case(case, loaded.meta["intensity_policy"])
        pred, _ = predict_volume(model, case.image, batch_size=8, tta="rot90")
        turned.append(dice(pred == 1, case.label == 1, "legacy"))
    out = json.loads((tmp_path / "runs" / "results.json").read_text())
    reported = next(s for s in out["scores"] if (s["seed"], s["name"]) == (1, "hsam"))
    assert reported["dice"] == pytest.approx(100 * np.mean(turned), abs=1e-6)
    assert turned != scores


def _samed_argv(protocol: Path, tmp_path: Path, seed: int = 0) -> list[str]:
    """fewshot.py arguments for the SAMed configuration alone, one seed, runs in tmp_path."""
    options = f"--seeds {seed} --configs samed --name tiny".split()
    return [
        str(protocol),
        *options,
        "--out",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "r.md"),
    ]


def test_fewshot_resumes_an_interrupted_run(tmp_path, fewshot):
    from hsam.config import load_run_config

    protocol = _tiny_protocol(tmp_path)
    run_dir = tmp_path / "runs" / "seed0" / "samed"
    cfg = fewshot.run_config(load_run_config(protocol), fewshot.CONFIGURATIONS["samed"], 0)
    fewshot.run_training(cfg, run_dir, stop_after=1)  # as if the call was killed after epoch 1
    argv = _samed_argv(protocol, tmp_path)
    assert fewshot.main(argv) == 0
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").open()]
    assert epochs == [0, 1]  # epoch 0 from the first call, epoch 1 resumed


def test_fewshot_refuses_runs_trained_under_another_protocol(tmp_path, fewshot, caplog):
    from hsam.config import dump_yaml, load_run_config, to_dict

    protocol = _tiny_protocol(tmp_path)
    argv = _samed_argv(protocol, tmp_path)
    assert fewshot.main(argv) == 0
    run_dir = tmp_path / "runs" / "seed0" / "samed"
    kept = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    # Another schedule is another experiment: refused, with the field named, nothing touched.
    assert fewshot.main([*argv, "--set", "train.epochs=3"]) == 2
    assert "train.epochs: 2 in the run, 3 now" in caplog.text and "new --out" in caplog.text
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == kept
    # The test list is read only at evaluation: the run is still reused.
    other = tmp_path / "other.list"
    other.write_text("case4\n")
    assert fewshot.main([*argv, "--set", f"data.test_list={other}"]) == 0

    # A run killed before its first epoch ended has nothing to resume: say what to do.
    started = tmp_path / "runs" / "seed1" / "samed"
    started.mkdir(parents=True)
    seed1 = fewshot.run_config(load_run_config(protocol), fewshot.CONFIGURATIONS["samed"], 1)
    (started / "config.yaml").write_text(dump_yaml(to_dict(seed1)))
    caplog.clear()
    assert fewshot.main(_samed_argv(protocol, tmp_path, seed=1)) == 2
    assert "interrupted before its first epoch ended" in caplog.text


def _blob_volume(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(D, H, W) CT-windowed image in [0, 1] with a bright ellipsoid labelled 1."""
    label = ellipsoid_label(rng)
    image = np.clip(rng.normal(0.3, 0.05, label.shape) + 0.5 * label, 0, 1)
    return image.astype(np.float32), label.astype(np.uint8)


def test_fewshot_runs_unchanged_on_a_synapse_folder(tmp_path, fewshot):
    """TransUNet layout: training slices in train_npz/, test volumes in test_vol_h5/; the
    validation case carved from the training cases is rebuilt from its slices."""
    rng = np.random.default_rng(0)
    root = tmp_path / "Synapse"
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    slice_ids = []
    for case in ("case0005", "case0006", "case0007"):
        image, label = _blob_volume(rng)
        for z in range(image.shape[0]):
            slice_ids.append(f"{case}_slice{z:03d}")
            np.savez(root / "train_npz" / f"{slice_ids[-1]}.npz", image=image[z], label=label[z])
    for case in ("case0001", "case0002"):
        image, label = _blob_volume(rng)
        with h5py.File(root / "test_vol_h5" / f"{case}.npy.h5", "w") as f:
            f["image"], f["label"] = image, label
    (tmp_path / "train.txt").write_text("\n".join(slice_ids[::2]) + "\n")
    (tmp_path / "test_vol.txt").write_text("case0001\ncase0002\n")
    data = {
        "format": "synapse",
        "root": str(root),
        "train_slices_list": str(tmp_path / "train.txt"),
        "test_list": str(tmp_path / "test_vol.txt"),
    }
    path = _tiny_protocol(tmp_path, data)
    results = tmp_path / "results.md"
    argv = [str(path), "--seeds", "0", "--configs", "hsam", "--out", str(tmp_path / "runs")]
    assert fewshot.main([*argv, "--name", "syn", "--results", str(results)]) == 0

    (run,) = json.loads((tmp_path / "runs" / "results.json").read_text())["runs"]
    assert run["selected_on"] == "validation"
    split = json.loads((tmp_path / "runs" / "seed0" / "hsam" / "split.json").read_text())
    assert len(split["val"]) == 1 and split["val"][0] in {"case0005", "case0006", "case0007"}
    assert not any(s.startswith(split["val"][0]) for s in split["train"])
    assert "2 volumes from" in results.read_text(encoding="utf-8")
