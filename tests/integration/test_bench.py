"""The benchmark keeps working: tiny in-process passes of every variant and workload kind.

No timing is asserted here; budgets are checked by `scripts/bench.py` itself.
"""

from __future__ import annotations

import json
import os

import pytest

from ..conftest import bench_module

bench = bench_module("tracking_cost")
VARIANTS, Workload, main, measure = bench.VARIANTS, bench.Workload, bench.main, bench.measure
BUDGETS = bench.BUDGETS


def test_benchmark_smoke(tmp_path):
    """Every variant on digits, written beside the other sections of the results file."""
    out = tmp_path / "results.json"
    # A GPU machine's section and an earlier heavy run, which this run must keep.
    gpu_section = {"date": "2026-11-26", "machine": {"gpu": "H200"}, "workloads": {}}
    heavy = {"workload": {"name": "heavy"}, "ratio_c_over_b": 1.5}
    cpu_section = {"date": "2026-11-25", "machine": {}, "workloads": {"heavy": heavy}}
    out.write_text(json.dumps({"gpu": gpu_section, "cpu": cpu_section}))
    tiny = ["--epochs", "1", "--repeats", "1", "--in-process", "--out", str(out)]
    assert main([*tiny, "--workloads", "digits", "--variants", "".join(VARIANTS)]) == 0

    results = json.loads(out.read_text())
    assert results["gpu"] == gpu_section
    assert results["cpu"]["workloads"]["heavy"] == heavy
    assert results["heavy.ratio_c_over_b"] == 1.5
    assert {"cpu", "cores", "torch", "lightning", "mlflow"} <= set(results["cpu"]["machine"])
    workload = results["cpu"]["workloads"]["digits"]
    for variant, label in VARIANTS.items():
        row = workload[f"{variant}_{label}"]
        assert row["fit_s"]["median"] > 0
        # One epoch: its steady rate is its own.
        assert row["steady_epoch_s"]["median"] == row["first_epoch_s"]["median"] > 0
        assert row["steady_images_per_s"]["median"] > 0
        assert 0 < row["cores_busy"]["median"] <= os.cpu_count() + 0.5  # rounding of CPU times
        assert "steady_mfu" not in row  # a CPU has no bf16 tensor-core peak to compare with
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
    assert paired["ci95"] == [paired["median"], paired["median"]]  # one round: no spread
    assert results["digits.paired_ratio_c_over_b"] == paired["median"] > 0
    for ratio in ("ratio_c_over_b", "ratio_b_over_a", "ratio_d_over_b"):
        assert results[f"digits.{ratio}"] == workload[ratio] > 0
    assert set(workload["within_budget"]) == {"ratio_c_over_b", "ratio_b_over_a", "end_of_run_s"}


def test_median_interval_narrows_with_more_rounds_and_holds_the_median():
    """Seven rounds of a ratio near 1.08 with the spread of this VM's digits runs, then the
    same spread over 21 rounds: the interval holds the median, lies inside min–max, and is
    narrower for more rounds (where min–max only widens)."""
    seven = [1.02, 1.05, 1.07, 1.08, 1.10, 1.14, 1.31]
    low, high = bench.median_interval(seven)
    assert min(seven) <= low <= 1.08 <= high <= max(seven)
    assert bench.median_interval(seven) == (low, high)  # seeded
    low21, high21 = bench.median_interval(seven * 3)
    assert low21 <= 1.08 <= high21
    assert high21 - low21 < high - low


def test_benchmark_refuses_unknown_workloads(capsys):
    assert main(["--workloads", "imagenet"]) == 2
    assert "workloads: digits, heavy" in capsys.readouterr().err


def test_benchmark_gpu_options_run_on_the_cpu():
    """The heavy workload's synthetic images through resnet18, with NHWC, the data held on
    the device and determinism off (GPU workload options), on the CPU; bf16 is 20× slower
    than float32 on this CPU, so float32. Two epochs: a steady one after the first."""
    work = Workload("options", 2, 60, "resnet18", 8, 32, "32", True, True, deterministic=False)
    result = measure(work, "abc", repeats=1, device="cpu", in_process=True)
    for variant in ("a_plain_pytorch", "b_bare_lightning", "c_dlharness"):
        assert result[variant]["steady_images_per_s"]["median"] > 0
    assert result["ratio_c_over_b"] > 0
    assert result["paired_steady_ratio_c_over_b"]["median"] > 0


def test_gpu_fast_path_workload_compiles_and_lets_cudnn_choose():
    fast = bench.workloads("gpu", None, None)["gpu_fast"]
    assert (fast.compile, fast.deterministic, fast.data_on_device) == (True, False, True)
    assert (fast.precision, fast.channels_last) == ("bf16-mixed", True)
    assert set(BUDGETS["gpu_fast"]) == {"steady_ratio_c_over_b", "steady_images_per_s_c"}


def test_forward_flops_match_resnet18s_known_cost(tmp_path):
    """The MFU's numerator: torch's counter on the harness's network, checked on resnet18's
    known cost (0.56 GFLOPs of multiply-adds at 32×32 with the small-image stem)."""
    from dlharness.training.components import build_datamodule

    cfg = bench.build_config(
        Workload("flops", 1, 60, "resnet18", 64, 32), tmp_path, tmp_path, "cpu"
    )
    info = build_datamodule(cfg.data, cfg.seed).info
    assert 2 * 0.55e9 < bench.forward_flops_per_image(cfg, info) < 2 * 0.57e9


@pytest.mark.slow
def test_sweep_overhead_benchmark_measures_the_gap_between_trials(tmp_path):
    bench = bench_module("sweep_overhead")
    report = bench.measure(trials=2, epochs=1, folder=tmp_path)
    gap = report["overhead_s"]
    assert len(gap["each"]) == 1
    assert 0 < gap["median"] < report["sweep_wall_s"]
    assert report["training_s_per_trial_median"] > 0


def test_epoch_profile_splits_the_wall_time(tmp_path, capsys):
    """The GPU profile's script, on the CPU: the host's split only, which adds up."""
    profile = bench_module("gpu_profile")
    assert profile.union_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.8)]) == 4
    out = tmp_path / "profile.json"
    argv = ["--device", "cpu", "--workload", "digits", "--epochs", "2", "--variant", "b"]
    assert profile.main([*argv, "--out", str(out)]) == 0
    split = json.loads(out.read_text())
    assert split["epoch"] == 1 and split["wall_s"] > 0
    # The training thread's ops lie within the profiled epoch.
    assert 0 < split["host_in_torch_ops_s"] <= split["wall_s"]
    assert "gpu_busy_s" not in split
    assert "aten::convolution_backward" in split["top_host_ops_self_ms"]
    assert "digits (b), epoch 1: CPU run" in capsys.readouterr().out
