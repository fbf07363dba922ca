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


def _six_steps_recipe(tiny_ckpt, d: Path) -> Path:
    return write_recipe(
        d,
        tiny_ckpt,
        train={"max_steps": 6},
        eval={"every_steps": 0},
        early_stopping={"enabled": False},
        checkpoint={"every_steps": 2, "keep": 3},
    )


def _six_steps(tiny_ckpt, d: Path) -> Path:
    """A finished 6-step run in d/run with checkpoints at steps 2, 4 and 6 (3 s on one core)."""
    recipe = _six_steps_recipe(tiny_ckpt, d)
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


def test_crafted_pickles_under_the_old_names_are_never_loaded(tiny_ckpt, tmp_path, capsys):
    d = _six_steps(tiny_ckpt, tmp_path / "a")
    ckpt = _ckpt(d, 4)
    marker = tmp_path / "pwned"
    for f in ckpt.glob("*.safetensors"):
        if f.name != "adapter.safetensors":
            f.unlink()
    for name in ("optimizer.pt", "scheduler.pt", "rng-rank0.pt"):
        (ckpt / name).write_bytes(pickle.dumps(_Evil(marker)))
    # branching from it into a new run: refused with one line
    recipe = load_recipe(d / "recipe.yaml", [f"resume={ckpt}", f"output_dir={tmp_path / 'b'}", "train.max_steps=8"])
    with pytest.raises(UserError) as e:
        train(recipe, data=synthetic_data())
    msg = str(e.value)
    assert "\n" not in msg and str(ckpt) in msg and "optimizer.pt" in msg and "pickle" in msg, msg
    assert not marker.exists() and not any((tmp_path / "b").iterdir())  # locked (created), nothing written
    # continuing the run (resume: auto) when it is the newest: skipped, saying why, never loaded
    shutil.rmtree(_ckpt(d, 6))
    _run(d / "recipe.yaml", "train.max_steps=8")
    out = capsys.readouterr().out
    assert "step-00000004 is damaged (it holds optimizer.pt, rng-rank0.pt, scheduler.pt, pickle files" in out, out
    assert not marker.exists()


def _losses(d: Path) -> list[float]:
    return [l["loss"] for l in read_metrics(d / "run")[0]]


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: (c / "optimizer.safetensors").unlink(),
        lambda c: (c / "adapter.safetensors").write_bytes((c / "adapter.safetensors").read_bytes()[:-1]),
        lambda c: (c / "manifest.json").unlink(),
    ],
    ids=["optimizer-deleted", "adapter-truncated", "manifest-deleted"],
)
def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(tiny_ckpt, tmp_path, capsys, damage):
    d = _six_steps(tiny_ckpt, tmp_path)
    ref = _losses(d)
    from gptoss_tune.runs import checkpoint_problem

    # every checkpoint verifies, step 6 too, whose trainer_state.json was rewritten after the final evaluation
    assert [checkpoint_problem(_ckpt(d, s)) for s in (2, 4, 6)] == [None, None, None]
    damage(_ckpt(d, 6))
    capsys.readouterr()
    _run(d / "recipe.yaml")
    out = capsys.readouterr().out
    assert "note: resuming from step-00000004: step-00000006 is damaged (" in out, out
    assert "resumed from" in out and str(_ckpt(d, 4)) in out
    assert (d / "run" / "checkpoints" / "damaged-step-00000006").is_dir()  # kept, out of the way
    assert _losses(d) == ref  # steps 5 and 6 again, bit-identical
    assert checkpoint_problem(_ckpt(d, 6)) is None


def test_damaged_checkpoints_named_explicitly_are_one_line_and_all_damaged_is_refused(tiny_ckpt, tmp_path, capsys):
    from gptoss_tune.export.exporter import resolve_export_checkpoint
    from gptoss_tune.runs import resolve_checkpoint

    d = _six_steps(tiny_ckpt, tmp_path / "a")
    run = d / "run"
    opt = _ckpt(d, 4) / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])
    recipe = load_recipe(d / "recipe.yaml", [f"resume={_ckpt(d, 4)}", f"output_dir={tmp_path / 'b'}"])
    with pytest.raises(UserError) as e:
        train(recipe, data=synthetic_data())
    assert (
        "\n" not in str(e.value)
        and str(_ckpt(d, 4)) in str(e.value)
        and "optimizer.safetensors is 100 bytes" in str(e.value)
    )
    assert not any((tmp_path / "b").iterdir())

    # export: best.json names step 6: damaged, refused; 'last' skips final/ and step 6, saying so
    for c in (_ckpt(d, 6), run / "final"):
        (c / "adapter.safetensors").write_bytes(b"x" + (c / "adapter.safetensors").read_bytes()[1:])
    for resolve in (lambda: resolve_checkpoint(run, "best"), lambda: resolve_export_checkpoint(_ckpt(d, 6))):
        with pytest.raises(UserError) as e:
            resolve()
        assert "\n" not in str(e.value) and str(_ckpt(d, 6)) in str(e.value) and "adapter.safetensors" in str(e.value)
    capsys.readouterr()
    assert resolve_checkpoint(run, "last") == _ckpt(d, 4)  # its optimizer state is damaged, its adapter is not
    err = capsys.readouterr().err
    assert "skipping" in err and str(run / "final") in err and str(_ckpt(d, 6)) in err

    # resume: PATH inside the run to an older checkpoint is allowed when every newer one is damaged
    from gptoss_tune.train.resume import check_output_dir

    plan = check_output_dir(load_recipe(d / "recipe.yaml", [f"resume={_ckpt(d, 2)}"]))
    assert plan.checkpoint == _ckpt(d, 2) and [p for p, _ in plan.skipped] == [_ckpt(d, 4), _ckpt(d, 6)]

    # resume: auto with every checkpoint damaged: one line, and nothing of the run touched
    (_ckpt(d, 2) / "rng-rank0.safetensors").unlink()
    with pytest.raises(UserError) as e:
        _run(d / "recipe.yaml", "train.max_steps=8")
    assert "\n" not in str(e.value) and "no intact checkpoint" in str(e.value) and "step-00000006" in str(e.value)
    assert [_ckpt(d, s).is_dir() for s in (2, 4, 6)] == [True, True, True]


FULL_DISK_SCRIPT = """
import errno, os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from helpers.training import synthetic_data
import gptoss_tune.train.trainer as train_mod
import gptoss_tune.train.checkpoint as ck
from gptoss_tune.cli.main import train_main
train_mod.load_train_data = lambda recipe: synthetic_data()
real = ck.save_state
def full(obj, path):  # the disk fills up halfway through the optimizer state of step 4
    if "step-00000004" in str(path) and "optimizer" in path.name:
        path.write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(obj, path)
ck.save_state = full
sys.exit(train_main(sys.argv[1:]))
"""


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_loses_nothing(tiny_ckpt, tmp_path):
    import subprocess
    import sys

    from gptoss_tune.runs import checkpoint_problem

    ref = _losses(_six_steps(tiny_ckpt, tmp_path / "ref"))
    d = tmp_path / "full"
    d.mkdir()
    recipe = _six_steps_recipe(tiny_ckpt, d)
    script = d / "full_disk.py"
    script.write_text(FULL_DISK_SCRIPT.format(tests=str(Path(__file__).parents[1])))
    out = subprocess.run([sys.executable, str(script), str(recipe)], capture_output=True, text=True, timeout=300)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    step4 = _ckpt(d, 4)
    assert err[-1].startswith(f"gptoss_tune.train: error: {step4}: the disk is full: this checkpoint needs about ")
    assert "bytes) and " in err[-1] and "are free on" in err[-1] and f"continue from {_ckpt(d, 2)}" in err[-1]
    assert not (d / "run" / "checkpoints" / ".tmp-step-00000004").exists() and not step4.exists()
    assert checkpoint_problem(_ckpt(d, 2)) is None
    _run(recipe)  # space freed: continues from step 2 as if nothing happened
    assert _losses(d) == ref


@pytest.mark.parametrize(
    "error",
    [
        "SafetensorError",
        RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4480 vs 4374"),
        OSError(122, "Disk quota exceeded"),
    ],
)
def test_every_kind_of_full_disk_is_one_line_naming_the_checkpoint(tmp_path, error):
    from safetensors import SafetensorError

    from gptoss_tune.train.checkpoint import write_guard

    if error == "SafetensorError":  # what safetensors raises on a full disk
        error = SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )
    tmp, final = tmp_path / "checkpoints" / ".tmp-step-00000008", tmp_path / "checkpoints" / "step-00000008"
    tmp.mkdir(parents=True)
    with pytest.raises(UserError) as e, write_guard(tmp, final, lambda: 5 << 20):
        (tmp / "part").write_bytes(b"x")
        raise error
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        f"{final}: the disk is full: this checkpoint needs about 6.0 MiB (6291456 bytes)"
    )
    assert "no checkpoint of this run was written yet" in msg and not tmp.exists()
    with pytest.raises(RuntimeError, match="a bug"), write_guard(tmp, final, lambda: 0):  # anything else: as it is
        raise RuntimeError("a bug")


@pytest.mark.parametrize("killed_at", [1, 2, 3, None])
def test_rewriting_trainer_state_leaves_a_checkpoint_that_verifies_whenever_it_is_killed(
    tmp_path, monkeypatch, killed_at
):
    """rewrite_json writes three files (manifest accepting both, trainer_state.json, final manifest): a kill
    before any of them leaves the old or the new trainer_state.json, and either verifies."""
    import gptoss_tune.runs as runs

    c = tmp_path / "step-00000004"
    c.mkdir()
    (c / "adapter.safetensors").write_bytes(b"weights")
    (c / "trainer_state.json").write_text('{"step": 4}\n')
    runs.write_manifest(c)
    real, calls = runs.atomic_write_text, []

    def write(path, text):
        calls.append(path)
        if len(calls) == killed_at:
            raise KeyboardInterrupt  # the process dies here
        real(path, text)

    monkeypatch.setattr(runs, "atomic_write_text", write)
    try:
        runs.rewrite_json(c, "trainer_state.json", '{"step": 4, "finished": true}\n')
    except KeyboardInterrupt:
        pass
    assert runs.checkpoint_problem(c) is None
    (c / "trainer_state.json").write_text('{"step": 5}\n')  # anything else is still caught
    assert "trainer_state.json" in runs.checkpoint_problem(c)
