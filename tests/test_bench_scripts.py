"""The GPU benchmark scripts on a machine without a GPU: the CPU dry run of
bench_gpu_mlp.py, its skip path, and the syntax and early exit of gpu_check.sh."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import gradflow as gf

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
MLP_SCRIPT = BENCHMARKS / "bench_gpu_mlp.py"
CHECK_SCRIPT = BENCHMARKS / "gpu_check.sh"


def run_script(args, tmp_path, timeout):
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def table_rows(output):
    return [line for line in output.splitlines()
            if line.startswith(("| large |", "| small |"))]


def test_mlp_dry_run_on_cpu(tmp_path):
    pytest.importorskip("torch")
    result = run_script(
        [sys.executable, str(MLP_SCRIPT), "--device", "cpu", "--dry-run"],
        tmp_path, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Dry run with tiny sizes" in result.stdout
    rows = table_rows(result.stdout)
    assert len(rows) == 4, result.stdout
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] in ("gelu", "relu")
        assert float(cells[3]) > 0, row
        assert float(cells[4]) > 0, row
        # Same weights and input on the CPU: the outputs agree to rounding.
        assert float(cells[-1]) < 1e-5, row
    assert "Target:" not in result.stdout


def test_mlp_dry_run_rejects_write_results(tmp_path):
    results = tmp_path / "RESULTS.md"
    result = run_script(
        [sys.executable, str(MLP_SCRIPT), "--device", "cpu", "--dry-run",
         "--write-results", "--results", str(results)],
        tmp_path, timeout=30,
    )
    assert result.returncode == 2
    assert "--dry-run" in result.stderr
    assert not results.exists()


def test_mlp_cpu_needs_dry_run(tmp_path):
    result = run_script([sys.executable, str(MLP_SCRIPT), "--device", "cpu"],
                        tmp_path, timeout=30)
    assert result.returncode == 2
    assert "--dry-run" in result.stderr


@pytest.mark.skipif(gf.cuda.is_available(), reason="a usable GPU runs the full benchmark")
def test_mlp_skips_without_gpu(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nearlier text\n")
    result = run_script(
        [sys.executable, str(MLP_SCRIPT), "--write-results", "--results", str(results)],
        tmp_path, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nearlier text\n")
    assert "<!-- bench_gpu_mlp:begin -->" in text
    assert "<!-- bench_gpu_mlp:end -->" in text
    assert "Not measured on a GPU yet." in text


def test_gpu_check_syntax():
    result = subprocess.run(["bash", "-n", str(CHECK_SCRIPT)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None,
                    reason="nvidia-smi is present, so the script would run in full")
def test_gpu_check_stops_without_gpu(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(CHECK_SCRIPT)], capture_output=True, text=True, timeout=30,
        cwd=BENCHMARKS.parent, env={**os.environ, "OUT": str(out)},
    )
    assert result.returncode == 2
    assert "nvidia-smi not found" in result.stderr
    assert (out / "summary.md").exists()


PHASES_SCRIPT = BENCHMARKS / "scaling_phases.py"


def test_scaling_phases_prints_a_row_per_size(tmp_path):
    result = run_script(
        [sys.executable, str(PHASES_SCRIPT), "--steps", "50", "200", "--repeats", "1"],
        tmp_path, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 50 |")
            or line.startswith("| 200 |")]
    assert len(rows) == 2, result.stdout
    for row in rows:
        cells = [cell.strip().replace(",", "") for cell in row.strip("|").split("|")]
        assert all(float(cell) > 0 for cell in cells[1:4]), row
        assert float(cells[4]) >= 0, row


def test_scaling_phases_rejects_zero_repeats(tmp_path):
    result = run_script(
        [sys.executable, str(PHASES_SCRIPT), "--repeats", "0"], tmp_path, timeout=30,
    )
    assert result.returncode == 2
    assert "--steps and --repeats must be 1 or more" in result.stderr
