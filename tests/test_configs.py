"""Every shipped recipe parses against the config schema."""

from pathlib import Path

import pytest
import yaml

from hsam.config import (
    RunConfig,
    config_differences,
    dump_yaml,
    from_dict,
    load_run_config,
    load_yaml,
    to_dict,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_parses(path):
    if path.name == "upstream_code.yaml":
        cfg = from_dict(RunConfig, load_yaml(path))
        assert cfg.model.cmattn == "reference"
    else:
        cfg = load_run_config(path)
        assert cfg.model.num_classes == cfg.data.num_classes


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
    # Not part of what is trained: the test list and the device.
    moved = config("data.test_list=b.list", "train.device=cpu")
    assert config_differences(stored, moved) == []
    # Resolved during training when left empty (here the class noise levels).
    stored["model"]["class_noise_std"] = [0.1, 0.35]
    assert config_differences(stored, cfg) == []
    # A field added to hsam after the run was trained counts as its default.
    del stored["train"]["compile"]
    assert config_differences(stored, cfg) == []
    compiled = config("train.compile=true")
    assert config_differences(stored, compiled) == ["train.compile: False in the run, True now"]
