"""Training defaults and recovery (issue 14): a second signal's exit status, early stopping without
validation data, max_steps over epochs, divergence advice and sound checkpoints, data changed under a run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _examples(n: int, seed: int = 0) -> str:
    import json
    import random

    r = random.Random(seed)
    words = ["red", "green", "blue", "amber", "violet", "teal", "ochre", "cyan"]
    return "".join(
        json.dumps({"prompt": f"Colour {i}?", "completion": " ".join(r.choice(words) for _ in range(6))}) + "\n"
        for i in range(n)
    )


def _minimal_recipe(tmp_path, tiny_ckpt, n_examples: int = 14, **train) -> Path:
    """What a newcomer writes: model, LoRA, training data, max_steps; nothing about validation or early
    stopping. (grad_accum 1 and no packing so one example is one step: 14 steps an epoch.)"""
    import yaml

    (tmp_path / "train.jsonl").write_text(_examples(n_examples))
    recipe = {
        "model": {"path": str(tiny_ckpt)},
        "lora": {"rank": 4},
        "data": {"train": "train.jsonl", "packing": False, "max_seq_len": 64},
        "train": {"max_steps": 40, "grad_accum": 1, **train},
        "output_dir": "run",
    }
    path = tmp_path / "minimal.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_minimal_recipe_trains_max_steps_over_several_epochs_without_early_stopping(tiny_ckpt, tmp_path, capsys):
    """No validation data: early stopping is off, with one line saying so (it was refused). train.max_steps 40
    on 14 examples runs 40 steps, cycling the data (it stopped after one epoch, at step 14, since epochs
    defaulted to 1 and 'the smaller won'); the start line says the length and why; the LR schedule spans
    the 40 steps."""
    from helpers.training import read_metrics

    from gptoss_tune.train.recipe import load_recipe
    from gptoss_tune.train.schedule import lr_lambda
    from gptoss_tune.train.trainer import train

    result = train(load_recipe(_minimal_recipe(tmp_path, tiny_ckpt)))
    out = capsys.readouterr().out
    assert result.stop_reason == "completed" and result.step == 40 and result.exit_code == 0
    assert "40 steps (train.max_steps; 2.9 epochs of 14 steps)" in out, out
    off = [line for line in out.splitlines() if "early stopping" in line]
    assert len(off) == 1 and "off" in off[0] and "no validation data" in off[0], off
    steps, evals = read_metrics(tmp_path / "run")
    assert [s["step"] for s in steps] == list(range(1, 41)) and evals == []
    assert steps[-1]["epoch"] == pytest.approx(40 / 14, abs=1e-4)
    f = lr_lambda(40, 2, "cosine", 0.0)  # warmup ceil(0.03 * 40) = 2 steps, cosine to 0 at step 40
    assert [s["lr"] for s in steps] == pytest.approx([2e-4 * f(i) for i in range(40)])


def test_epochs_apply_only_without_max_steps(tiny_ckpt, tmp_path, capsys):
    from gptoss_tune.train.length import run_length

    assert run_length(1.0, 40, 14, 1, 0, 0)[0] == 40  # max_steps wins over an explicit epochs (HF Trainer)
    assert "train.epochs 1 is ignored" in run_length(1.0, 40, 14, 1, 0, 0)[1]
    assert run_length(2.0, None, 14, 4, 0, 0) == (7, "7 steps (train.epochs 2; an epoch is 3.5 steps)")
    assert run_length(None, None, 14, 1, 0, 0)[0] == 14
    assert run_length(None, 10, 14, 1, 12, 12)[0] == 12  # a resumed run never goes back


def test_max_steps_resume_mid_second_epoch_repeats_the_uninterrupted_run(tiny_ckpt, tmp_path, monkeypatch):
    """20 rows, 2 micro-batches of 2 rows a step: 5 steps an epoch; max_steps 12 (with an explicit epochs 1,
    which it overrides). A SIGTERM stops after step 7, in the middle of the second epoch; resuming gives the
    uninterrupted run's losses bit for bit, and every epoch visits the rows in another order (seeded by seed
    and epoch)."""
    from helpers.training import read_metrics, synthetic_data

    from gptoss_tune.train import tracking
    from gptoss_tune.train.recipe import load_recipe
    from gptoss_tune.train.stream import MicroBatchStream
    from gptoss_tune.train.trainer import train

    def data():
        return synthetic_data(n_train=20, n_val=4)

    def run(d):
        recipe = write_recipe(d, tiny_ckpt, train={"epochs": 1, "max_steps": 12}, checkpoint={"every_steps": 0})
        return train(load_recipe(recipe), data=data())

    ref = run(tmp_path / "ref")
    assert ref.step == 12 and ref.stop_reason == "completed"

    real = tracking.Tracker.train_step

    def signal_after_6(self, record, extra=None):  # seen at the end of step 7: 14 micro-batches, epoch 1.4
        real(self, record, extra)
        if record["step"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tracking.Tracker, "train_step", signal_after_6)
    stopped = run(tmp_path / "b")
    assert stopped.stop_reason == "interrupted" and stopped.step == 7
    monkeypatch.setattr(tracking.Tracker, "train_step", real)
    resumed = run(tmp_path / "b")
    assert resumed.step == 12 and resumed.stop_reason == "completed"
    got, got_eval = read_metrics(tmp_path / "b" / "run")
    want, want_eval = read_metrics(tmp_path / "ref" / "run")
    assert [s["epoch"] for s in got[6:8]] == [1.4, 1.6]
    assert [s["loss"] for s in got] == [s["loss"] for s in want]
    assert [e["eval_loss"] for e in got_eval] == [e["eval_loss"] for e in want_eval]

    stream = MicroBatchStream(data().train, 2, 42)
    epochs = [[r["input_ids"] for i in range(e * 10, e * 10 + 10) for r in stream.rows_of(i)] for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2] and sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2])


def _train_cli(args: list[str], data) -> int:
    """`gptoss-tune train ARGS` in this process, on `data` instead of the recipe's files."""
    from gptoss_tune.cli.main import main
    from gptoss_tune.train import trainer as train_mod

    orig = train_mod.load_train_data
    train_mod.load_train_data = lambda recipe: data
    try:
        return main(["train", *args])
    finally:
        train_mod.load_train_data = orig


def _command_after(text: str, marker: str) -> list[str]:
    import shlex

    cmd = shlex.split(text.split(marker, 1)[1].strip().splitlines()[0])
    assert cmd[:2] == ["gptoss-tune", "train"], cmd
    return cmd[2:]


def _trainable_norms(run_dir) -> dict[str, float]:
    import math

    from safetensors.torch import load_file

    out = {}
    for ckpt in sorted((run_dir / "checkpoints").glob("step-*")):
        tensors = load_file(ckpt / "adapter.safetensors")
        out[ckpt.name] = math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))
    return out


def test_divergence_keeps_only_sound_checkpoints_and_prints_a_command_that_works(tiny_ckpt, tmp_path, capsys):
    """lr 100 with 5 warmup steps: the updates of steps 1 and 2 grow the LoRA weights' norm from 10 to 3.3e3 and
    8.9e3, step 3's to 1.6e4, past 1000x the start: the run stops there and writes no checkpoint of it. The
    message points at step 2's checkpoint, names train.lr with the default 2e-4 (not lr/4 = 25), and its
    command, run as printed, continues from that checkpoint into a new output_dir and finishes."""
    import math

    from helpers.training import read_metrics, synthetic_data

    from gptoss_tune.train.recipe import load_recipe
    from gptoss_tune.train.trainer import TrainingDiverged, train

    recipe = write_recipe(
        tmp_path,
        tiny_ckpt,
        train={"lr": 100.0, "scheduler": "constant", "warmup_ratio": 0.5, "max_steps": 10},
        eval={"every_steps": 0},
        checkpoint={"every_steps": 1, "keep": 5},
    )
    with pytest.raises(TrainingDiverged) as e:
        train(load_recipe(recipe), data=synthetic_data())
    msg = str(e.value)
    run = tmp_path / "run"
    assert msg.startswith("step 3: the trainable parameters exploded") and "\n" not in msg, msg
    assert f"the last sound checkpoint is {run / 'checkpoints' / 'step-00000002'}" in msg, msg
    assert "train.lr 100 is far above" in msg and "train.lr=0.0002" in msg, msg
    norms = _trainable_norms(run)
    assert list(norms) == ["step-00000001", "step-00000002"]
    assert all(math.isfinite(n) and n < 1e4 for n in norms.values()), norms

    capsys.readouterr()
    assert _train_cli(_command_after(msg, "To continue from it:"), synthetic_data()) == 0
    branch = tmp_path / "run-lr0.0002"
    steps, _ = read_metrics(branch)
    assert [s["step"] for s in steps] == list(range(3, 11))
    assert max(s["lr"] for s in steps) == pytest.approx(2e-4)  # the warmup (5 steps) is kept, to the new peak
    assert all(math.isfinite(s["loss"]) for s in steps)


def test_divergence_from_lora_alpha_names_it_and_restarts_with_a_sound_value(tiny_ckpt, tmp_path, capsys):
    """lora.alpha 1e30 (a scale of 1.25e29): the first gradient is infinite. The advice names lora.alpha (not
    the learning rate) and, since a checkpoint trained with another alpha cannot be continued under a new
    one, its command starts again, and works."""
    from helpers.training import synthetic_data

    recipe = write_recipe(
        tmp_path,
        tiny_ckpt,
        lora={"rank": 8, "alpha": 1e30},
        train={"max_steps": 3},
        eval={"every_steps": 0},
    )
    capsys.readouterr()
    assert _train_cli([str(recipe)], synthetic_data()) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "Likely cause: lora.alpha 1e+30" in err and "no sound checkpoint was written" in err, err
    args = _command_after(err, "To start again:")
    assert "lora.alpha=16" in args and "resume=never" in args, args
    assert _train_cli(args, synthetic_data()) == 0
    assert (tmp_path / "run-alpha16" / "final").is_dir()


def test_vanishing_gradients_warn_with_what_to_change(tiny_ckpt, tmp_path, capsys):
    """No trained token and no load-balancing loss: the gradient is exactly 0 every step and the loss flat.
    The run finishes (nothing is broken) but says, during the run and in its summary, that nothing learns
    and what to look at."""
    from helpers.training import synthetic_rows

    from gptoss_tune.train.recipe import load_recipe
    from gptoss_tune.train.stream import TrainData
    from gptoss_tune.train.trainer import train

    rows = synthetic_rows(16)
    for r in rows:
        r["labels"] = [-100] * len(r["labels"])
    recipe = write_recipe(
        tmp_path, tiny_ckpt, router={"aux_loss_coef": 0.0}, train={"max_steps": 4}, data={"val_fraction": 0.0}
    )
    capsys.readouterr()
    result = train(load_recipe(recipe), data=TrainData(rows, [], {}))
    assert result.exit_code == 0 and result.step == 4
    warnings = [line for line in capsys.readouterr().out.splitlines() if "gradient norm has been exactly 0" in line]
    assert len(warnings) == 2, warnings  # once when it happens (step 3), once in the summary
    assert "since step 1" in warnings[0] and "train.lr" in warnings[0] and "data.train_on" in warnings[0]


def test_lr_1e6_stops_at_its_first_update_instead_of_finishing_with_a_dead_model(tiny_ckpt, tmp_path):
    """lr 1e6 (clipping on) finished with exit 0: the first update grew the weights 1.7e7-fold, after which the
    gradient was exactly 0 and the loss flat for the rest of the run. Now the first update stops it."""
    from helpers.training import synthetic_data

    from gptoss_tune.train.recipe import load_recipe
    from gptoss_tune.train.trainer import TrainingDiverged, train

    recipe = write_recipe(tmp_path, tiny_ckpt, train={"lr": 1e6, "warmup_ratio": 0.0, "max_steps": 10})
    with pytest.raises(TrainingDiverged) as e:
        train(load_recipe(recipe), data=synthetic_data())
    assert str(e.value).startswith("step 1: the trainable parameters exploded") and "train.lr=0.0002" in str(e.value)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_resume_refuses_data_changed_under_the_same_path(tiny_ckpt, tmp_path, capsys):
    """A run on 20 examples, then train.jsonl rewritten with 7: resume=auto (and resume=PATH of its checkpoint,
    and `validate`) refuse with one line naming the file and the flag (it continued silently on the 7);
    resume_allow_data_change=true continues, saying so. Nothing of the run is touched by the refusal."""
    from gptoss_tune.cli.main import main

    recipe = _minimal_recipe(tmp_path, tiny_ckpt, n_examples=20, max_steps=3)
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    metrics = (run / "metrics.jsonl").read_text()
    (tmp_path / "train.jsonl").write_text(_examples(7, seed=1))
    capsys.readouterr()
    ckpt = run / "checkpoints" / "step-00000003"
    for extra in ([], [f"resume={ckpt}"]):
        assert main(["train", str(recipe), "train.max_steps=5", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"data.train: '{tmp_path / 'train.jsonl'}' changed" in err and "20 -> 7 lines" in err, err
        assert "resume_allow_data_change=true" in err, err
    # a new run branched from its checkpoint that reads the same path is checked against its record too
    assert main(["train", str(recipe), f"resume={ckpt}", f"output_dir={tmp_path / 'branch'}"]) == 2
    assert "resume_allow_data_change=true" in capsys.readouterr().err
    assert main(["validate", str(recipe), "train.max_steps=5"]) == 2
    assert "resume_allow_data_change=true" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == metrics

    assert main(["train", str(recipe), "train.max_steps=5", "resume_allow_data_change=true"]) == 0
    out = capsys.readouterr().out
    assert "continuing on the new data" in out and "resumed from" in out, out
    assert main(["train", str(recipe), "train.max_steps=6"]) == 0  # the new data is now the run's record


def test_the_retry_command_keeps_the_launch_flags_that_chose_the_strategy():
    """A diverged FSDP2 run's advice must relaunch FSDP2: the accelerate flags come from the launcher."""
    from gptoss_tune.train.divergence import accelerate_launch_prefix

    launcher = ["/v/bin/python", "/v/bin/accelerate", "launch", "--config_file", "my fsdp.yaml", "--num_processes",
                "2", "-m", "gptoss_tune.train", "recipe.yaml", "train.lr=1"]  # fmt: skip
    assert accelerate_launch_prefix(2, launcher) == (
        "accelerate launch --config_file 'my fsdp.yaml' --num_processes 2 -m gptoss_tune.train"
    )
    assert (
        accelerate_launch_prefix(4, ["torchrun", "x.py"]) == "accelerate launch --num_processes 4 -m gptoss_tune.train"
    )
