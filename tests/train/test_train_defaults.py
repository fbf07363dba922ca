"""Training defaults and recovery (issue 14): a second signal's exit status, early stopping without
validation data, max_steps over epochs, divergence advice and sound checkpoints, data changed under a run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers.training import wrapper_script, write_recipe

pytestmark = pytest.mark.xdist_group("train")


def _wait_for(cond, proc, timeout=120):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_a_second_sigterm_exits_143_like_the_first(tiny_ckpt, tmp_path):
    """The first SIGTERM asks for a checkpoint at the end of the step; a second one stops at once. Both mean
    'terminated': the status is 128 + SIGTERM = 143 (a second one gave 130, the status of Ctrl-C)."""
    recipe = write_recipe(tmp_path, tiny_ckpt)
    marker = tmp_path / "in-checkpoint"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GPTOSS_TEST_HANG_AT_CHECKPOINT": "3",  # hangs inside the step-3 checkpoint write
        "GPTOSS_TEST_MARKER": str(marker),
    }
    p = subprocess.Popen(
        [sys.executable, str(wrapper_script(tmp_path)), str(recipe)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for(marker.exists, p)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, out
    assert "received SIGTERM" in out and "interrupted" in out and "Traceback" not in out, out
