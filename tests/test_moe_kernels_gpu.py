"""GPU checks of the Triton expert kernels (skipped without CUDA).

Each runs one of the GPU scripts in its own process, so that no TRITON_INTERPRET set by the CPU kernel
tests (tests/test_moe_kernels.py) can reach it: real shapes (E = 32 and 128, hidden 2880) with the
documented tolerances, and the 20-step convergence check. See docs/kernels.md.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _run(script, *args, timeout=1800):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_real_shapes_match_reference_within_tolerance():
    out = _run("check_moe_gpu.py", "--experts", "32", "128", "--tokens", "2048")
    assert "PASS" in out


def test_twenty_lora_steps_follow_the_reference_loss_curve():
    out = _run("check_convergence_gpu.py", "--steps", "20")
    assert "PASS" in out
