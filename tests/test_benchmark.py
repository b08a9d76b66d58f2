"""Smoke test of scripts/benchmark.py: it runs and writes its JSON. Timings are never asserted."""

import json

import pytest

from scripts import benchmark


@pytest.mark.slow
def test_benchmark_cpu_small_writes_all_keys(tmp_path):
    out = tmp_path / "out.json"
    benchmark.main(["--preset", "cpu-small", "--repeats", "1", "--warmup", "1", "--check", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["preset"] == "cpu-small" and result["threads"] >= 1 and result["torch"]
    for key in (
        "nonprivate_s",
        "dp_s",
        "dp_over_nonprivate",
        "dp_secure_s",
        "dp_secure_over_dp",
        "opacus_hooks_s",
        "opacus_hooks_over_dp",
        "opacus_ghost_s",
    ):
        assert result[key] > 0, key
    assert set(result["peak_mem_mb"]) == {"nonprivate", "dp", "dp_secure", "opacus_hooks", "opacus_ghost"}
    assert all(v > 0 for v in result["peak_mem_mb"].values())
    # the peers hand their optimizer the same clipped gradient as ours (float error only)
    assert all(v < 1e-4 for v in result["check_max_rel_diff"].values()), result["check_max_rel_diff"]
