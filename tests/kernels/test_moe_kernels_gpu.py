"""GPU checks of the Triton expert kernels (skipped without CUDA).

Each runs one of the GPU scripts in its own process, so that no TRITON_INTERPRET set by the CPU kernel
tests (tests/kernels/test_moe_kernels.py) can reach it: real shapes (E = 32 and 128, hidden 2880) with the
documented tolerances, and the 20-step convergence check. See docs/kernels.md.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _run(script, *args, timeout=1800):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_real_shapes_match_reference_within_tolerance():
    out = _run("check_moe_gpu.py", "--experts", "32", "128", "--tokens", "2048")
    assert "PASS" in out


def test_twenty_lora_steps_follow_the_reference_loss_curve():
    out = _run("check_convergence_gpu.py", "--steps", "20")
    assert "PASS" in out


SECOND_DEVICE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from _moe_setup import random_layer, random_routing, setup_paths
setup_paths()
from gptoss_kernels.moe_reference import ExpertLoRA, ExpertWeights, moe_experts_reference
from gptoss_kernels.moe_triton import moe_experts
dev = torch.device("cuda", 1)
assert torch.cuda.current_device() == 0
w, lora = random_layer(8, 256, 256, dev, dtype=torch.bfloat16, rank=16)
idx, rw = random_routing(64, 8, 4, dev, dtype=torch.bfloat16)
x = torch.randn(64, 256, device=dev).bfloat16().requires_grad_(True)
out = moe_experts(x, idx, rw, w, lora)
out.float().square().sum().backward()
w32 = ExpertWeights(*[t.float() if t.is_floating_point() else t for t in w])
x32 = x.detach().float().requires_grad_(True)
ref = moe_experts_reference(x32, idx, rw.float(), w32, lora)
ref.square().sum().backward()
err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
gerr = ((x.grad.double() - x32.grad.double()).norm() / x32.grad.double().norm()).item()
print(f"out {err:.2e} grad_x {gerr:.2e}")
sys.exit(0 if err < 1e-2 and gerr < 2e-2 else 1)
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_layer_on_a_device_that_is_not_the_current_one():
    """`--device cuda:1` leaves cuda:0 current; Triton launches on the current device, so without the
    launchers' device guard the kernels would get device-1 pointers on device 0."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", SECOND_DEVICE, str(SCRIPTS)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
