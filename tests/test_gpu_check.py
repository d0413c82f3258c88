"""`make gpu-check` without a GPU: one line saying so, exit 0, nothing written, so it runs anywhere.

The GPU path itself (install, tests/test_cuda.py, the bench) runs only on a lent GPU machine.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def run_without_gpu(cmd: list[str], out: Path) -> subprocess.CompletedProcess:
    """`cmd` from the repo root with every GPU hidden, so the no-GPU path runs on any machine."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(out)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def assert_one_line_and_nothing_written(run: subprocess.CompletedProcess, out: Path) -> None:
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [run.stdout.strip()], run.stdout
    assert run.stdout.startswith("gpu-check: no GPU here (") and "nothing checked" in run.stdout
    assert not out.exists(), "the no-GPU path must write nothing"


def test_script_says_there_is_no_gpu_in_one_line_and_exits_0(tmp_path):
    out = tmp_path / "out"
    run = run_without_gpu([sys.executable, "scripts/gpu_check.py"], out)
    assert_one_line_and_nothing_written(run, out)
    assert "sees no CUDA GPU" in run.stdout  # this python has torch: it is the GPU that is missing


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_target_runs_the_script(tmp_path):
    out = tmp_path / "out"
    run = run_without_gpu(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}"], out)
    assert_one_line_and_nothing_written(run, out)
