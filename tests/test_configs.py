"""Every shipped recipe parses against the config schema."""

import re

import pytest
import yaml

from conftest import REPO
from hsam.config import (
    RunConfig,
    config_differences,
    dump_yaml,
    from_dict,
    load_run_config,
    load_yaml,
    to_dict,
)
from hsam.errors import ConfigError

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """``("a.b", value)`` for every non-mapping value of a nested mapping."""
    out: list[tuple[str, object]] = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_parses(path):
    raw = load_yaml(path)
    if path.name == "upstream_code.yaml":
        cfg = from_dict(RunConfig, raw)
        assert cfg.model.cmattn == "reference"
    else:
        cfg = load_run_config(path)
        # an old config's data.num_classes that disagrees with model.num_classes is refused
        with pytest.raises(ConfigError, match="differ"):
            load_run_config(path, [f"data.num_classes={cfg.model.num_classes + 1}"])
    # K is stored once, in model.num_classes (upstream_code.yaml is an overlay without K)
    assert "num_classes" not in (raw.get("data") or {})
    # every value the recipe sets arrives in the parsed config (none dropped or defaulted);
    # through YAML, as configs are written, so tuples compare as lists
    parsed = yaml.safe_load(dump_yaml(to_dict(cfg)))
    for key, value in _leaves(raw):
        node = parsed
        for part in key.split("."):
            node = node[part]
        assert node == value, key


def test_there_are_recipes_for_the_papers_settings():
    names = {p.name for p in CONFIGS}
    assert {
        "synapse_10pct_vit_b_512.yaml",
        "synapse_full_vit_l_224.yaml",
        "la_4scans_vit_b_512.yaml",
        "promise12_3cases_vit_b_512.yaml",
    } <= names


def test_config_differences_name_what_a_run_was_trained_with():
    def config(*overrides: str) -> RunConfig:
        return load_run_config(None, ["model.num_classes=1", "train.epochs=4", *overrides])

    cfg = config("data.test_list=a.list")
    stored = yaml.safe_load(dump_yaml(to_dict(cfg)))
    assert config_differences(stored, cfg) == []
    changed = config("train.epochs=8", "model.lora_rank=8")
    assert config_differences(stored, changed) == [
        f"model.lora_rank: {cfg.model.lora_rank} in the run, 8 now",
        "train.epochs: 4 in the run, 8 now",
    ]
    # Not part of what is trained: the test list, the device and the inference defaults.
    moved = config("data.test_list=b.list", "train.device=cpu")
    assert config_differences(stored, moved) == []
    recipe = config(
        "inference.slice_smoothing=2",
        "inference.postprocess=largest_component",
        "inference.tta=rot90",
    )
    assert config_differences(stored, recipe) == []
    before_inference = {k: v for k, v in stored.items() if k != "inference"}
    assert config_differences(before_inference, recipe) == []
    # Resolved during training when left empty (here the class noise levels).
    stored["model"]["class_noise_std"] = [0.1, 0.35]
    assert config_differences(stored, cfg) == []
    # precision auto: the run records what it resolved to on its hardware.
    for resolved in ("fp32", "bf16"):
        stored["train"]["precision"] = resolved
        assert config_differences(stored, config("train.precision=auto")) == []
    assert config_differences(stored, config("train.precision=fp32")) == [
        "train.precision: 'bf16' in the run, 'fp32' now"
    ]
    stored["train"]["precision"] = cfg.train.precision
    # A field added to hsam after the run was trained counts as its default.
    del stored["train"]["compile"]
    assert config_differences(stored, cfg) == []
    compiled = config("train.compile=true")
    assert config_differences(stored, compiled) == ["train.compile: False in the run, True now"]
    # null is a value like any other (per-epoch stage weight), not "left to the run"...
    over_run = config("train.stage_weight_horizon=300")
    stored_over_run = yaml.safe_load(dump_yaml(to_dict(over_run)))
    assert config_differences(stored_over_run, cfg) == [
        "train.stage_weight_horizon: 300 in the run, None now"
    ]
    # ...but a one-stage model (SAMed) never uses the stage weight
    one_stage = config("model.stages=1")
    stored_one_stage = yaml.safe_load(
        dump_yaml(to_dict(config("model.stages=1", "train.stage_weight_horizon=300")))
    )
    assert config_differences(stored_one_stage, one_stage) == []


@pytest.mark.parametrize(
    "override,field",
    [
        ("train.base_lr=-0.001", "train.base_lr"),
        ("train.base_lr=.nan", "train.base_lr"),
        ("train.base_lr=0", "train.base_lr"),
        ("train.betas=[0.9, 1.0]", "train.betas[1]"),
        ("train.betas=[-0.1, 0.999]", "train.betas[0]"),
        ("train.betas=[0.9]", "train.betas"),
        ("train.val_every=0", "train.val_every"),
        ("train.augmented_views=0", "train.augmented_views"),
        ("train.max_steps_per_epoch=0", "train.max_steps_per_epoch"),
        ("train.dice_weight=2", "train.dice_weight"),
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.weight_decay=-1", "train.weight_decay"),
        ("train.warmup_steps=-5", "train.warmup_steps"),
        ("train.inference_batch_size=0", "train.inference_batch_size"),
        ("train.augment.max_angle=.nan", "train.augment.max_angle"),
        ("train.augment.histogram_shift_points=0", "train.augment.histogram_shift_points"),
        ("train.augment.histogram_shift_max=1.5", "train.augment.histogram_shift_max"),
        ("train.augment.histogram_shift_max=.nan", "train.augment.histogram_shift_max"),
        ("train.augment.scale_range=[0.5, .inf]", "train.augment.scale_range"),
        ("model.num_classes=0", "model.num_classes"),
        ("model.stage2_dropout=1.0", "model.stage2_dropout"),
        ("model.lora_alpha=-2.0", "model.lora_alpha"),
        ("data.val_cases=-1", "data.val_cases"),
        ("data.train_cases=0", "data.train_cases"),
        ("inference.slice_smoothing=-1", "inference.slice_smoothing"),
        ("inference.slice_smoothing=.inf", "inference.slice_smoothing"),
    ],
)
def test_out_of_range_values_are_refused_when_the_config_loads(override, field):
    """Each used to crash deep in torch/numpy (some after an epoch) or train nonsense."""
    with pytest.raises(ConfigError, match=re.escape(field) + "="):
        load_run_config(None, [override])  # range errors come before cross-field checks


def test_exponent_notation_without_a_dot_is_a_number(tmp_path):
    """PyYAML reads 1e-7 (no dot) as a string; in a float field it means the number, from a
    file and from --set alike, while a word is still refused."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  base_lr: 5e-4\n  weight_decay: 1E-2\n")
    cfg = load_run_config(path, ["inference.slice_smoothing=+2e0"])
    assert (cfg.train.base_lr, cfg.train.weight_decay) == (5e-4, 1e-2)
    assert cfg.inference.slice_smoothing == 2.0
    assert load_run_config(None, ["train.base_lr=1e-7"]).train.base_lr == 1e-7
    with pytest.raises(ConfigError, match="train.base_lr: expected float"):
        load_run_config(None, ["train.base_lr=fast"])
    with pytest.raises(ConfigError, match="train.epochs: expected int"):
        load_run_config(None, ["train.epochs=1e3"])  # an int field takes no float form


# K is stored once (model.num_classes); configs and run directories written before that also
# carry data.num_classes and must keep loading.
def _old_style(tmp_path, data_k: int, model_k: int = 3):
    path = tmp_path / "old.yaml"
    path.write_text(
        dump_yaml(
            {
                "model": {"backbone": "tiny", "image_size": 64, "num_classes": model_k},
                "data": {"format": "acdc", "root": "somewhere", "num_classes": data_k},
                "train": {"epochs": 4},
            }
        )
    )
    return path


def test_old_config_with_both_class_counts_still_loads(tmp_path, caplog):
    path = _old_style(tmp_path, data_k=3)
    with caplog.at_level("WARNING", logger="hsam.config"):
        cfg = load_run_config(path)
    assert cfg.model.num_classes == 3
    assert "data.num_classes is deprecated" in caplog.text
    # the same run as the config without the old key, and K is not written twice again
    new = load_run_config(
        None,
        [
            "model.backbone=tiny",
            "model.image_size=64",
            "model.num_classes=3",
            "data.format=acdc",
            "data.root=somewhere",
            "train.epochs=4",
        ],
    )
    assert cfg == new
    assert "num_classes" not in to_dict(cfg)["data"]
    # an old run directory's config.yaml (how --resume reads it) loads and is not a change
    stored = load_yaml(path)
    assert from_dict(RunConfig, stored, str(path)) == cfg
    assert config_differences(stored, cfg) == []
    assert "num_classes" in stored["data"]  # the caller's mapping is left as it was


@pytest.mark.parametrize("data_k", [1, 4, True])
def test_old_config_with_two_different_class_counts_is_refused(tmp_path, data_k):
    with pytest.raises(ConfigError) as err:
        load_run_config(_old_style(tmp_path, data_k=data_k))
    message = str(err.value)
    assert "data.num_classes" in message and "model.num_classes" in message
    assert f"({data_k!r})" in message and "(3)" in message
    # through the resume path too
    with pytest.raises(ConfigError, match="data.num_classes .* and model.num_classes .* differ"):
        from_dict(RunConfig, load_yaml(_old_style(tmp_path, data_k=data_k)))
