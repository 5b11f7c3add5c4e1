"""Every shipped recipe parses against the config schema."""

from pathlib import Path

import pytest

from hsam.config import RunConfig, from_dict, load_run_config, load_yaml

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
