"""The benchmark keeps working: tiny in-process passes of every variant and workload kind.

No timing is asserted here; budgets are checked by `scripts/bench.py` itself.
"""

from __future__ import annotations

import json

import pytest

from .conftest import bench_module

bench = bench_module("tracking_cost")
VARIANTS, Workload, main, measure = bench.VARIANTS, bench.Workload, bench.main, bench.measure


def test_benchmark_smoke(tmp_path):
    """Every variant on digits, written beside the other sections of the results file."""
    out = tmp_path / "results.json"
    # A GPU machine's section and an earlier heavy run, which this run must keep.
    gpu_section = {"date": "2026-11-26", "machine": {"gpu": "H200"}, "workloads": {}}
    heavy = {"workload": {"name": "heavy"}, "ratio_c_over_b": 1.5}
    cpu_section = {"date": "2026-11-25", "machine": {}, "workloads": {"heavy": heavy}}
    out.write_text(json.dumps({"gpu": gpu_section, "cpu": cpu_section}))
    tiny = ["--epochs", "1", "--repeats", "1", "--in-process", "--out", str(out)]
    assert main([*tiny, "--workloads", "digits"]) == 0

    results = json.loads(out.read_text())
    assert results["gpu"] == gpu_section
    assert results["cpu"]["workloads"]["heavy"] == heavy
    assert results["heavy.ratio_c_over_b"] == 1.5
    assert {"cpu", "cores", "torch", "lightning", "mlflow"} <= set(results["cpu"]["machine"])
    workload = results["cpu"]["workloads"]["digits"]
    for variant, label in VARIANTS.items():
        assert workload[f"{variant}_{label}"]["fit_s"]["median"] > 0
    tracking = workload["c_dlharness"]
    assert {
        "per_epoch_ms/metric_logging",
        "per_epoch_ms/plots",
        "per_epoch_ms/checkpoint_save",
        "per_epoch_ms/artifact_upload",
        "per_epoch_ms/training_thread_stall",
        "end_of_run_s/package_index",
        "end_of_run_s/classifier",
        "end_of_run_s",
    } <= set(tracking)
    assert tracking["per_epoch_ms/training_thread_stall"]["median"] > 0
    paired = workload["paired_ratio_c_over_b"]
    assert len(paired["rounds"]) == workload["repeats"]
    assert paired["min"] <= paired["median"] <= paired["max"]
    assert results["digits.paired_ratio_c_over_b"] == paired["median"] > 0
    for ratio in ("ratio_c_over_b", "ratio_b_over_a", "ratio_d_over_b"):
        assert results[f"digits.{ratio}"] == workload[ratio] > 0
    assert set(workload["within_budget"]) == {"ratio_c_over_b", "ratio_b_over_a", "end_of_run_s"}


def test_benchmark_refuses_unknown_workloads(capsys):
    assert main(["--workloads", "imagenet"]) == 2
    assert "workloads: digits, heavy" in capsys.readouterr().err


def test_benchmark_gpu_options_run_on_the_cpu():
    """The heavy workload's synthetic images through resnet18, with NHWC and the data held on
    the device (GPU workload options), on the CPU; bf16 is 20× slower than float32 on this
    CPU, so float32."""
    work = Workload("options", 1, 60, "resnet18", 8, 32, "32", True, True)
    result = measure(work, "abc", repeats=1, device="cpu", in_process=True)
    for variant in ("a_plain_pytorch", "b_bare_lightning", "c_dlharness"):
        assert result[variant]["images_per_s"]["median"] > 0
    assert result["ratio_c_over_b"] > 0


@pytest.mark.slow
def test_sweep_overhead_benchmark_measures_the_gap_between_trials(tmp_path):
    bench = bench_module("sweep_overhead")
    report = bench.measure(trials=2, epochs=1, folder=tmp_path)
    gap = report["overhead_s"]
    assert len(gap["each"]) == 1
    assert 0 < gap["median"] < report["sweep_wall_s"]
    assert report["training_s_per_trial_median"] > 0
