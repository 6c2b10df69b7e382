"""Smoke tests of the benchmark scripts: each runs end to end at its ``--quick`` size.

The checks are on the output's structure (machine lines, result lines, the
ratio lines each script promises), never on timings, which mean nothing at
these sizes on a shared machine.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH_DIR))

import bench_data  # noqa: E402
import bench_parse  # noqa: E402
import bench_scaling  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402
import gpu_all  # noqa: E402

RATIO_LINE = re.compile(r"^ratio (\S+): (\S+)x$", re.MULTILINE)
RESULT_LINE = re.compile(r"^result (\S+): (\S+) ", re.MULTILINE)
MACHINE_KEYS = ("cpu", "cores", "torch", "torch_threads")


def ratios(output: str) -> dict[str, float]:
    return {name: float(value) for name, value in RATIO_LINE.findall(output)}


def check_machine_lines(output: str) -> None:
    for key in MACHINE_KEYS:
        assert re.search(rf"^machine {key}: \S", output, re.MULTILINE), f"no 'machine {key}:' line"


def check_ratios(output: str, expected: set[str]) -> dict[str, float]:
    found = ratios(output)
    missing = expected - set(found)
    assert not missing, f"ratio lines missing: {sorted(missing)}; found {sorted(found)}"
    for name in expected:
        assert math.isfinite(found[name]), f"ratio {name} is {found[name]}"
        assert found[name] > 0, f"ratio {name} is {found[name]}"
    return found


def test_bench_parse_quick(tmp_path, capsys):
    json_path = tmp_path / "parse.json"
    assert bench_parse.main(["--quick", "--json", str(json_path)]) == 0
    output = capsys.readouterr().out
    check_machine_lines(output)
    check_ratios(output, {
        "parse_project_over_reference",
        "parse_project_with_cache_build_over_reference",
        "parse_project_fraction_of_matmul",
        "parse_reference_fraction_of_matmul",
    })
    results = dict(RESULT_LINE.findall(output))
    assert float(results["bisenet_flops"]) > 0
    assert json_path.exists()


def test_bench_data_quick(capsys):
    assert bench_data.main(["--quick"]) == 0
    output = capsys.readouterr().out
    check_machine_lines(output)
    check_ratios(output, {"data_project_over_reference"})


def test_bench_train_quick(capsys):
    assert bench_train.main(["--quick"]) == 0
    output = capsys.readouterr().out
    check_machine_lines(output)
    check_ratios(output, {
        "train_step_proposed_over_baseline_time",
        "train_step_baseline_fraction_of_matmul",
        "train_step_proposed_fraction_of_matmul",
    })


@pytest.mark.slow
def test_bench_scaling_quick(capsys):
    assert bench_scaling.main(["--quick"]) == 0
    output = capsys.readouterr().out
    check_machine_lines(output)
    check_ratios(output, {"scaling_time_large_over_small", "scaling_peak_large_over_small"})
    results = dict(RESULT_LINE.findall(output))
    assert float(results["scaling_archive_1"]) > 0
    assert float(results["scaling_archive_2"]) > 0


def test_gpu_all_dry_run(capsys):
    assert gpu_all.main(["--dry-run"]) == 0
    output = capsys.readouterr().out
    assert re.search(r"^plan: \d+ training runs, \d+ epochs each", output, re.MULTILINE)


def test_gpu_all_plan_assumed_counts(tmp_path):
    config, source = gpu_all.load_config(tmp_path / "absent.yaml")
    plan = gpu_all.build_plan(config, source)
    # Per dataset: 5 Table 1 cells (Table 2 reuses two), 4 + 4 new Table 3 cells
    # (lambda = 0.5 is Proposed), 7 new Figure 3 cells (n = 4 is Proposed) = 20.
    assert len(plan.runs) == 20 * 2 * 3
    assert len(set(plan.runs)) == len(plan.runs)
    assert plan.variants() == ["baseline", "ct", "st", "ct_st", "proposed"]


def test_gpu_all_estimate_sums_parts(capsys):
    config, source = gpu_all.load_config(None)
    plan = gpu_all.build_plan(config, source)
    rates = {name: 100.0 for name in plan.variants()}
    totals = gpu_all.estimate(plan, rates, eval_rate=400.0, parse_rate=50.0)
    trained = sum(
        plan.epochs * gpu_all.trained_images_per_epoch(plan.split_images[run.dataset]["train"], 16)
        for run in plan.runs
    )
    assert totals["training_seconds"] == pytest.approx(trained / 100.0)
    assert totals["total_seconds"] == pytest.approx(
        totals["training_seconds"] + totals["test_seconds"] + totals["parse_seconds"]
    )
    assert "estimate_total" in capsys.readouterr().out


def test_gpu_all_without_cuda_fails_clearly(capsys):
    if common.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_all.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_interleave_alternates_cases():
    calls = []
    common.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b"]


def test_run_child_peak_is_per_child():
    allocate = "import sys; block = bytearray(200 * 2**20); block[::4096] = b'x' * len(block[::4096])"
    _, big_peak, _ = common.run_child([sys.executable, "-c", allocate])
    _, small_peak, _ = common.run_child([sys.executable, "-c", "pass"])
    assert big_peak > 200 * 2**20
    assert small_peak < big_peak - 150 * 2**20


def test_run_child_failure_raises():
    with pytest.raises(RuntimeError, match="exit code 3"):
        common.run_child([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
