"""benchmarks/gpu_check.py's dry run on the CPU, so that the script CI cannot run on a GPU still
runs every single-process stage against the current code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script checks the GPU itself")
def test_without_cuda_it_checks_nothing_unless_allowed_to_use_the_cpu(tmp_path: Path) -> None:
    skipped = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=True)
    assert skipped.stdout.startswith("SKIP  no CUDA device")

    done = subprocess.run([sys.executable, str(SCRIPT), "--allow-cpu", "--work-dir", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    verdicts = [line.split()[:2] for line in lines if line.startswith(("PASS", "FAIL", "SKIP"))]
    assert verdicts == [["PASS", "run"], ["SKIP", "run-ddp"], ["SKIP", "run-fsdp"], ["PASS", "eval"]]
    steps = next(line for line in lines if line.strip().startswith("steps:"))
    assert len(re.findall(r"[\d.]+ s \(\d+ tokens\)", steps)) == 2  # the run's two distillation steps
    assert lines[-1] == "GPU check: all stages passed"
    assert (tmp_path / "run" / "student" / "adapter_model.safetensors").is_file()
