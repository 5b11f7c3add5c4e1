"""The demo end to end with a reduced schedule (real LiteMedSAM weights, bundled LA sample)."""

from __future__ import annotations

import pytest

from hsam.apps.cli import main
from hsam.apps.demo import DemoSchedule, run_demo, sample_root
from hsam.data import read_dataset, read_list
from hsam.errors import ConfigError, OutputExistsError
from hsam.evaluation.metrics import dice
from hsam.io.images import read_volume


def test_sample_is_small_and_complete():
    root = sample_root()
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 15 * 2**20
    assert len(read_list(root / "train.list")) == 2 and len(read_list(root / "test.list")) == 2
    assert (root.parent / "DATA.md").is_file()


def test_existing_output_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_demo(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("option", ["--views", "--epochs"])
def test_demo_refuses_a_schedule_below_one_before_writing(tmp_path, option, capsys):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", option, "0", "--out", str(out)])
    assert exit_info.value.code == 2 and not out.exists()
    assert f"{option}: expected a whole number >= 1, got '0'" in capsys.readouterr().err


def test_demo_schedule_below_one_is_a_config_error_before_any_folder(tmp_path):
    out = tmp_path / "demo"
    with pytest.raises(ConfigError, match="augmented_views"):
        run_demo(out, schedule=DemoSchedule(augmented_views=0))
    assert not out.exists()


@pytest.mark.slow
# It still caches, trains two models and evaluates a whole LA volume: 15 minutes (the default
# limit) were not enough on a 2-core AVX2-only CPU in fp32 while other jobs shared the cores.
@pytest.mark.timeout(2700)
def test_demo_reduced_schedule_end_to_end(tmp_path):
    schedule = DemoSchedule(epochs=1, augmented_views=1, test_cases=1)
    result = run_demo(tmp_path / "demo", schedule=schedule)
    out = result.out_dir
    report = (out / "report.md").read_text()
    assert "| H-SAM |" in report and "| SAMed baseline (stage 1 only) |" in report
    (case,) = read_dataset("la", sample_root(), read_list(sample_root() / "test.list")[:1])
    for method, name in (("hsam", "H-SAM"), ("samed", "SAMed baseline (stage 1 only)")):
        pred = read_volume(out / "predictions" / method / f"{case.case_id}.nii.gz").array
        assert pred.shape == case.label.shape
        assert (out / "overlays" / f"{case.case_id}_{method}.png").stat().st_size > 0
        assert (out / method / "checkpoints" / "final.pt").is_file()
        # The reported Dice is the Dice of the written prediction file.
        expected = dice(pred == 1, case.label == 1, "legacy")
        assert result.scores[name]["dice"] == pytest.approx(expected, abs=1e-9)
        assert f"{100 * expected:.2f}" in report
