"""benchmarks/bench_model.py: the report is computed from the measured rows."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    yield from load_benchmark("bench_model")


def _result(bench, median_s, *, compile_s=None, flops=None, **job):
    spec = dict(kind="train", backbone="litemedsam", image_size=256, num_classes=8, batch=4)
    spec.update(attention="auto", precision="bf16", malloc_tuned=True)
    spec.update(job)
    r = bench.Result(bench.Job(**spec), times_s=[median_s] * 3, median_s=median_s)
    r.slices_per_s, r.peak_mem_gb, r.flops, r.compile_s = 4 / median_s, 2.0, flops, compile_s
    r.prefix_s_per_slice = 0.3 if r.job.cached else None
    return r


def test_cached_prefix_target_is_judged_from_the_rows(bench, tmp_path):
    results = [
        _result(bench, 16.0, attention="package", precision="fp32", malloc_tuned=False, flops=1e12),
        _result(bench, 4.0),
        _result(bench, 2.0, lora_last_n=2, cached=True, flops=4e11),
        _result(bench, 1.5, lora_last_n=2, cached=True, compiled=True, compile_s=120.0),
    ]
    gemm = {"fp32": 100.0, "bf16": 200.0}
    meta = {"command": "x", "date": "d", "machine": "m", "torch": "t", "python": "p"}
    meta.update(gemm_n=8, gpu=False)
    rows = bench.to_rows(results, gemm)
    assert rows[1]["speedup_vs_straightforward_fp32"] == pytest.approx(4.0)
    assert rows[0]["gemm_fraction"] == pytest.approx(1e12 / 16.0 / 1e9 / 100.0)
    # FLOPs counted once per model math: the compiled cached row shares the eager one's.
    assert rows[1]["flops"] == 1e12 and rows[2]["flops"] == rows[3]["flops"] == 4e11

    markdown = bench.render(rows, gemm, meta)
    # Fastest cached step 1.5 / 4 s per slice: 4 / 1.5 = 2.67x the fast whole encoder (not
    # met), 16 / 1.5 = 10.67x the straightforward one (met).
    assert "like for like): 2.67x, not met" in markdown
    assert "straightforward whole-encoder implementation: 10.67x, met" in markdown
    assert "120 s (fast bf16 + malloc + LoRA last 2 + cached prefix + compile)" in markdown

    # --render-only rewrites the markdown from the JSON alone.
    (tmp_path / "benchmarks.json").write_text(
        json.dumps({"meta": meta, "gemm_gflops": gemm, "rows": rows})
    )
    assert bench.main(["--render-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "benchmarks.md").read_text() == markdown
