"""Checkpoint files on the tiny model: no pickle is ever loaded, resume verifies every file against the
manifest and falls back past damaged checkpoints, a full disk is one line that loses nothing."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
from helpers.training import read_metrics, synthetic_data, write_recipe

from gptoss_tune.errors import UserError
from gptoss_tune.train.recipe import load_recipe
from gptoss_tune.train.trainer import train

pytestmark = pytest.mark.xdist_group("train")


def _run(recipe_path, *overrides):
    return train(load_recipe(recipe_path, list(overrides)), data=synthetic_data())


def _six_steps(tiny_ckpt, d: Path) -> Path:
    """A finished 6-step run in d/run with checkpoints at steps 2, 4 and 6 (3 s on one core)."""
    recipe = write_recipe(
        d,
        tiny_ckpt,
        train={"max_steps": 6},
        eval={"every_steps": 0},
        early_stopping={"enabled": False},
        checkpoint={"every_steps": 2, "keep": 3},
    )
    _run(recipe)
    return d


def _ckpt(d: Path, step: int) -> Path:
    return d / "run" / "checkpoints" / f"step-{step:08d}"


class _Evil:
    """A pickle that, when loaded, creates `marker` (a stand-in for os.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_pickles_under_the_old_names_are_never_loaded(tiny_ckpt, tmp_path):
    d = _six_steps(tiny_ckpt, tmp_path / "a")
    ckpt = _ckpt(d, 4)
    marker = tmp_path / "pwned"
    for f in ckpt.glob("*.safetensors"):
        if f.name != "adapter.safetensors":
            f.unlink()
    for name in ("optimizer.pt", "scheduler.pt", "rng-rank0.pt"):
        (ckpt / name).write_bytes(pickle.dumps(_Evil(marker)))
    # branch into a new run from it, and continue it in place
    for out, resume in ((tmp_path / "b" / "run", ckpt), (d / "run", "auto")):
        if resume == "auto":
            shutil.rmtree(_ckpt(d, 6))
        recipe = load_recipe(d / "recipe.yaml", [f"resume={resume}", f"output_dir={out}", "train.max_steps=8"])
        with pytest.raises(UserError) as e:
            train(recipe, data=synthetic_data())
        msg = str(e.value)
        assert "\n" not in msg and str(ckpt) in msg and "optimizer.pt" in msg and "pickle" in msg, msg
        assert not marker.exists()
    assert [l["step"] for l in read_metrics(d / "run")[0]] == list(range(1, 7))  # nothing of the run was touched
