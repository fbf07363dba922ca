"""The training loop on the tiny model (CPU): learning, best checkpoint, early stopping, exact resume
after SIGKILL (also during a checkpoint write) and SIGTERM, NaN stop, loss normalisation, two processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.training import read_metrics, synthetic_data, wrapper_script, write_recipe

from gptoss_tune.runs import resolve_checkpoint, write_manifest
from gptoss_tune.train.recipe import load_recipe
from gptoss_tune.train.trainer import TrainingDiverged, train

pytestmark = pytest.mark.xdist_group("train")


def _run(recipe_path, *overrides, data=None):
    return train(load_recipe(recipe_path, list(overrides)), data=data or synthetic_data())


def _eval_loss_of(adapter_dir, model_dir, rows) -> float:
    """Validation loss of a saved adapter by transformers' own loss (mean per trained token), not ours."""
    from gptoss_tune.data.batching import collate
    from gptoss_tune.model.adapter import load_with_adapter

    model = load_with_adapter(adapter_dir, base_model=model_dir, device="cpu")
    total, n = 0.0, 0
    with torch.no_grad():
        for row in rows:  # one row per call: transformers' mean is then exactly that row's
            b = collate([row], packing=True)
            cnt = int((b["labels"][:, 1:] != -100).sum())
            total += (
                model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"]).loss.item() * cnt
            )
            n += cnt
    return total / n


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tmp_path_factory):
    """One uninterrupted run that the resume and multi-process tests compare against."""
    d = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(d, tiny_ckpt)
    result = _run(recipe)
    return d, recipe, result


def test_training_lowers_validation_loss_and_keeps_best(reference, tiny_ckpt):
    d, _, result = reference
    run = d / "run"
    train_lines, eval_lines = read_metrics(run)
    assert [l["step"] for l in train_lines] == list(range(1, 13))
    assert all(math.isfinite(l["loss"]) and "aux_loss" in l and len(l["router_entropy"]) == 2 for l in train_lines)
    assert [l["step"] for l in eval_lines] == [4, 8, 12]
    losses = [l["eval_loss"] for l in eval_lines]
    assert losses[-1] < losses[0] - 0.5, losses  # clearly learning
    assert result.stop_reason == "completed" and result.step == 12
    best = json.loads((run / "best.json").read_text())
    i = min(range(len(losses)), key=losses.__getitem__)
    assert best["step"] == eval_lines[i]["step"] and best["value"] == pytest.approx(losses[i])
    ckpt = resolve_checkpoint(run, "best")
    assert ckpt == run / best["checkpoint"]
    # The best checkpoint really holds the weights that scored best.
    assert _eval_loss_of(ckpt, tiny_ckpt, synthetic_data().validation) == pytest.approx(best["value"], rel=1e-5)
    assert (run / "final" / "adapter.json").is_file() and (run / "recipe.yaml").is_file()
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step-00000009", "step-00000012"]  # keep=2 newest; the best is among them
    share = [l for l in train_lines if "router_share" in l]
    assert share and abs(sum(share[0]["router_share"][0]) - 1) < 1e-3


def test_early_stopping_on_plateau(tiny_ckpt, tmp_path):
    recipe = write_recipe(
        tmp_path,
        tiny_ckpt,
        train={"max_steps": 40, "lr": 1e-7, "scheduler": "constant"},
        eval={"every_steps": 2},
        early_stopping={"patience": 2, "min_delta": 0.01},
        checkpoint={"every_steps": 0, "keep": 1},
    )
    result = _run(recipe)
    assert result.stop_reason == "early_stopping"
    assert result.step == 6  # evals at 2, 4 and 6: no gain above min_delta after the first, patience 2
    _, eval_lines = read_metrics(tmp_path / "run")
    assert [l["step"] for l in eval_lines] == [2, 4, 6]
    losses = [l["eval_loss"] for l in eval_lines]
    assert max(losses) - min(losses) < 0.01
    # The best adapter is the lowest validation loss even when the gain is below min_delta.
    best_step = eval_lines[min(range(3), key=losses.__getitem__)]["step"]
    assert result.best_step == best_step
    assert json.loads((tmp_path / "run" / "best.json").read_text())["step"] == best_step
    # The best checkpoint survives pruning (keep=1 keeps step 6 too).
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == sorted({f"step-{best_step:08d}", "step-00000006"})
    again = _run(recipe)  # resume: auto on a finished run does nothing
    assert again.stop_reason == "already_finished"


def test_loss_is_normalised_over_accumulation(tmp_path, tiny_ckpt):
    """grad_accum=2 x 2 rows and grad_accum=1 x 4 rows see the same rows per step: same trajectory.

    (The load-balancing loss is a per-forward statistic, so it is switched off here: split differently it
    is a different number, in transformers too.)"""
    no_aux = {"aux_loss_coef": 0.0}
    recipe = write_recipe(
        tmp_path, tiny_ckpt, router=no_aux, train={"micro_batch_size": 4, "grad_accum": 1, "max_steps": 4}
    )
    _run(recipe)
    ref = write_recipe(tmp_path, tiny_ckpt, name="ref.yaml", router=no_aux, train={"max_steps": 4}, output_dir="ref")
    _run(ref)
    a, _ = read_metrics(tmp_path / "run")
    b, _ = read_metrics(tmp_path / "ref")
    assert [x["loss"] for x in a] == pytest.approx([x["loss"] for x in b], rel=1e-5)
    assert [x["grad_norm"] for x in a] == pytest.approx([x["grad_norm"] for x in b], rel=1e-4)


def _wait_for(predicate, proc, timeout=120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the training process exited early: {proc.returncode}\n{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def _steps_written(run: Path) -> int:
    f = run / "metrics.jsonl"
    if not f.is_file():
        return 0
    steps = [json.loads(l)["step"] for l in f.read_text().splitlines() if l.endswith("}")]
    return max(steps, default=0)


def test_sigkill_mid_training_and_mid_checkpoint_then_resume_gives_same_losses(reference, tmp_path):
    d, _, _ = reference
    recipe = write_recipe(tmp_path, Path(load_recipe(d / "recipe.yaml").model.path))
    script = wrapper_script(tmp_path)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), str(recipe)]

    # 1) SIGKILL in the middle of training (after step 5; checkpoints at 3, 4 (best at the eval), 6, 8, 9, 12).
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: _steps_written(run) >= 5, p)
    p.kill()
    p.wait()
    assert resolve_checkpoint(run, "last").name in ("step-00000004", "step-00000006")

    # 2) Resume, and SIGKILL it while it writes the step-9 checkpoint (files written, not yet renamed).
    marker = tmp_path / "in-checkpoint"
    p = subprocess.Popen(
        cmd,
        env={**env, "GPTOSS_TEST_HANG_AT_CHECKPOINT": "9", "GPTOSS_TEST_MARKER": str(marker)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for(marker.exists, p)
    p.kill()
    p.wait()
    assert (run / "checkpoints" / ".tmp-step-00000009").is_dir()
    assert not (run / "checkpoints" / "step-00000009").exists()
    assert resolve_checkpoint(run, "last").name == "step-00000008"  # the best checkpoint at the step-8 eval

    # 3) Resume to the end.
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resumed from" in out.stdout and not (run / "checkpoints" / ".tmp-step-00000009").exists()

    got_train, got_eval = read_metrics(run)
    ref_train, ref_eval = read_metrics(d / "run")
    assert [l["step"] for l in got_train] == list(range(1, 13))
    assert [l["loss"] for l in got_train] == [l["loss"] for l in ref_train]  # bit-identical on the CPU
    assert [l["aux_loss"] for l in got_train] == [l["aux_loss"] for l in ref_train]
    assert [l["eval_loss"] for l in got_eval] == [l["eval_loss"] for l in ref_eval]


def test_sigterm_saves_and_exits_then_resumes_exactly(reference, tmp_path, monkeypatch, tiny_ckpt):
    d, _, _ = reference
    recipe = write_recipe(tmp_path, tiny_ckpt, checkpoint={"every_steps": 0, "keep": 2})
    from gptoss_tune.train import tracking

    real = tracking.Tracker.train_step

    def signal_after_5(self, record, extra=None):  # arrives during step 5's bookkeeping: step 6 is the last
        real(self, record, extra)
        if record["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tracking.Tracker, "train_step", signal_after_5)
    result = _run(recipe)
    assert result.stop_reason == "interrupted" and result.step == 6 and result.exit_code == 128 + signal.SIGTERM
    assert resolve_checkpoint(tmp_path / "run", "last").name == "step-00000006"
    monkeypatch.setattr(tracking.Tracker, "train_step", real)
    result = _run(recipe)
    assert result.stop_reason == "completed"
    got, got_eval = read_metrics(tmp_path / "run")
    ref, ref_eval = read_metrics(d / "run")
    assert [l["loss"] for l in got] == [l["loss"] for l in ref]
    assert [l["eval_loss"] for l in got_eval] == [l["eval_loss"] for l in ref_eval]


def test_nan_loss_stops_naming_step_and_checkpoint(tiny_ckpt, tmp_path, capsys, monkeypatch):
    from gptoss_tune.train.trainer import Trainer

    recipe = write_recipe(tmp_path, tiny_ckpt, checkpoint={"every_steps": 1, "keep": 1})
    real = Trainer._forward_backward

    def nan_at_step_2(self, batches, scale):
        lm, aux, tokens, counts = real(self, batches, scale)
        return (lm * float("nan") if self.state.step == 1 else lm), aux, tokens, counts

    monkeypatch.setattr(Trainer, "_forward_backward", nan_at_step_2)
    with pytest.raises(TrainingDiverged) as e:
        _run(recipe)
    msg = str(e.value)
    assert "step 2:" in msg and "not finite" in msg and "sound checkpoint is" in msg and "step-00000001" in msg, msg
    monkeypatch.undo()

    # lr 1e30: step 1's update makes the weights 1e30; the run stops there and keeps no checkpoint of them
    # (the step-1 checkpoint used to hold them, named as "the last good checkpoint").
    over = ["train.lr=1e30", "train.scheduler=constant", "train.warmup_ratio=0", "train.max_grad_norm=0"]
    from gptoss_tune.cli.main import train_main
    from gptoss_tune.train import trainer as train_mod

    orig = train_mod.load_train_data
    train_mod.load_train_data = lambda r: synthetic_data()
    try:
        assert train_main([str(recipe), "resume=never", "overwrite=true", *over]) == 3
    finally:
        train_mod.load_train_data = orig
    err = capsys.readouterr().err
    assert "step 1: the trainable parameters exploded" in err and "no sound checkpoint" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_two_process_cpu_launch(reference, tmp_path):
    """accelerate launch with 2 processes (gloo): 2 x grad_accum 1 matches 1 x grad_accum 2 step for step
    (and with gradient checkpointing on here, off in the reference: it changes nothing but memory)."""
    d, _, _ = reference
    recipe = write_recipe(
        tmp_path,
        Path(load_recipe(d / "recipe.yaml").model.path),
        train={"grad_accum": 1, "gradient_checkpointing": True},
        checkpoint={"every_steps": 0, "keep": 1},
    )
    script = wrapper_script(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(script),
        str(recipe),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 process(es)" in out.stdout
    got, got_eval = read_metrics(tmp_path / "run")
    ref, ref_eval = read_metrics(d / "run")
    assert [l["step"] for l in got] == list(range(1, 13))  # one line per step: only the main process writes
    assert [l["loss"] for l in got] == pytest.approx([l["loss"] for l in ref], rel=1e-5)
    assert [l["eval_loss"] for l in got_eval] == pytest.approx([l["eval_loss"] for l in ref_eval], rel=1e-5)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000012"
    assert all(
        (ckpt / f).is_file() for f in ("rng-rank0.safetensors", "rng-rank1.safetensors", "optimizer.safetensors")
    )


def test_demo_recipe_on_sample_data_lowers_validation_loss(tiny_ckpt, tmp_path, capsys):
    """recipes/tiny-demo.yaml as shipped, on data/sample through the real data stage, shortened."""
    repo = Path(__file__).resolve().parents[2]
    recipe = load_recipe(
        repo / "recipes" / "tiny-demo.yaml",
        [
            f"model.path={tiny_ckpt}",
            f"output_dir={tmp_path / 'run'}",
            "train.max_steps=24",
            "eval.every_steps=12",
            "eval.max_batches=2",
            "logging.wandb.mode=disabled",
        ],
    )
    result = train(recipe)
    steps = [e["step"] for e in result.evals]
    losses = [e["eval_loss"] for e in result.evals]
    assert steps == [0, 12, 24]
    assert losses[0] > 12.0 and losses[-1] < losses[0] - 1.5, losses
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train"]["examples"] == 240 and report["validation"]["examples"] == 60
    assert result.best_step == 24 and (tmp_path / "run" / "best.json").is_file()
    out = capsys.readouterr().out  # the data stage's report is shown, not only written
    assert "train: 240 examples from" in out and "validation: 60 examples from" in out and "0 truncated" in out


def test_router_training_saves_router_and_resumes(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file

    from gptoss_tune.model.adapter import read_adapter_config

    recipe = write_recipe(
        tmp_path,
        tiny_ckpt,
        router={"train": True, "aux_loss_coef": 0.1},
        train={"max_steps": 2},
        eval={"every_steps": 0},
        checkpoint={"every_steps": 1, "keep": 2},
    )
    _run(recipe)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert read_adapter_config(ckpt)["router_trained"] is True
    saved = load_file(ckpt / "adapter.safetensors")
    router = {k for k in saved if ".mlp.router." in k}
    assert router == {f"model.layers.{i}.mlp.router.{w}" for i in range(2) for w in ("weight", "bias")}
    from gptoss_tune import load_model

    base = load_model(tiny_ckpt, device="cpu").model.layers[0].mlp.router.weight
    assert not torch.equal(saved["model.layers.0.mlp.router.weight"], base)  # it moved
    more = _run(recipe, "train.max_steps=3")  # resume with the router trainable again
    assert more.step == 3 and more.stop_reason == "completed"


def test_resume_from_a_checkpoint_path_into_a_new_run(reference, tmp_path):
    """resume: PATH branches a run: from the reference's step-9 checkpoint, steps 10-12 are the reference's."""
    d, recipe, _ = reference
    ckpt = d / "run" / "checkpoints" / "step-00000009"
    result = _run(recipe, f"resume={ckpt}", f"output_dir={tmp_path / 'branch'}")
    assert result.step == 12 and result.stop_reason == "completed"
    got, got_eval = read_metrics(tmp_path / "branch")
    ref, ref_eval = read_metrics(d / "run")
    assert [l["step"] for l in got] == [10, 11, 12]
    assert [l["loss"] for l in got] == [l["loss"] for l in ref[9:]]
    assert got_eval[-1]["eval_loss"] == ref_eval[-1]["eval_loss"]


def test_trainer_state_files_round_trip_and_resume_without_optional_keys(reference, tmp_path):
    """Every trainer_state.json the reference wrote reads back to the same text; a checkpoint whose file
    holds only what resume needs (no micro_batch_size: the recipe's; no tokens_seen, epoch, ...) still
    resumes: from step 9 the branch repeats the reference's steps 10-12."""
    import shutil

    from gptoss_tune.train.state import TrainerState

    d, recipe, _ = reference
    files = sorted((d / "run" / "checkpoints").glob("step-*/trainer_state.json"))
    assert files
    for f in files:
        text = f.read_text()
        assert json.dumps(TrainerState.from_dict(json.loads(text)).to_dict(), indent=2) + "\n" == text
    ckpt = tmp_path / "old-step-9"
    shutil.copytree(d / "run" / "checkpoints" / "step-00000009", ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    for key in ("epoch", "grad_accum", "micro_batch_size", "total_steps", "tokens_seen", "fingerprint"):
        del state[key]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(ckpt)  # as that version would have recorded its files (an edited one is refused as damaged)
    result = _run(recipe, f"resume={ckpt}", f"output_dir={tmp_path / 'branch'}")
    assert result.step == 12 and result.stop_reason == "completed"
    got, _ = read_metrics(tmp_path / "branch")
    ref, _ = read_metrics(d / "run")
    assert [l["loss"] for l in got] == [l["loss"] for l in ref[9:]]
    written = json.loads((tmp_path / "branch" / "checkpoints" / "step-00000012" / "trainer_state.json").read_text())
    assert written["micro_batch_size"] == 2 and written["epoch"] == 1.5 and written["tokens_seen"] > 0


def test_branching_with_another_micro_batch_size_keeps_the_data_position(reference, tmp_path):
    """The reference (32 rows, 2 a micro-batch, 2 micro-batches a step) has used 18 micro-batches, 1.125 epochs,
    at step 9; branched with 3 rows a micro-batch (11 an epoch) it goes on from the same place, micro-batch
    11 + ceil(4 / 3) = 13 of the new stream, not from micro-batch 18 of it (0.45 epochs further)."""
    d, recipe, _ = reference
    ckpt = d / "run" / "checkpoints" / "step-00000009"
    result = _run(recipe, f"resume={ckpt}", f"output_dir={tmp_path / 'branch'}", "train.micro_batch_size=3")
    assert result.step == 12
    got, _ = read_metrics(tmp_path / "branch")
    assert [l["epoch"] for l in got] == pytest.approx([15 / 11, 17 / 11, 19 / 11], abs=1e-4)


def test_learning_rate_schedules():
    from gptoss_tune.train.schedule import lr_lambda

    f = lr_lambda(total_steps=10, warmup_steps=2, kind="cosine", min_ratio=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]  # the first step already moves
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1) and f(6) == pytest.approx(0.55)
    g = lr_lambda(10, 0, "linear", 0.0)
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5) and g(10) == 0.0
    assert lr_lambda(10, 3, "constant", 0.0)(9) == 1.0


def test_extending_a_finished_run_uses_the_new_schedule_from_its_first_step(tiny_ckpt, tmp_path):
    """A finished cosine run ends at lr 0; continuing it with more steps must not run a step at that old rate."""
    from gptoss_tune.train.schedule import lr_lambda

    recipe = write_recipe(
        tmp_path,
        tiny_ckpt,
        train={"max_steps": 3, "warmup_ratio": 0.0},
        eval={"every_steps": 0},
        checkpoint={"every_steps": 0, "keep": 1},
    )
    _run(recipe)
    more = _run(recipe, "train.max_steps=5")
    assert more.step == 5
    lrs = [l["lr"] for l in read_metrics(tmp_path / "run")[0]]
    f = lr_lambda(5, 0, "cosine", 0.0)
    assert lrs[3:] == pytest.approx([3e-2 * f(3), 3e-2 * f(4)]) and lrs[3] > 0, lrs


def test_branching_from_another_runs_checkpoint(reference, tmp_path):
    """resume: PATH into a new output_dir: the recipe's lr applies, and the best checkpoint is one of the new
    run's (the old run's best is not in this directory, and was measured on other validation data)."""
    from helpers.training import synthetic_rows

    from gptoss_tune.train.schedule import lr_lambda
    from gptoss_tune.train.stream import TrainData

    d, recipe, _ = reference
    ckpt = d / "run" / "checkpoints" / "step-00000009"
    hard = synthetic_data()
    rows = synthetic_rows(8, seed=9)
    for r in rows:  # unlearnable validation rows: the branch never gets near the reference's best eval_loss
        r["labels"] = [-100] * 8 + [1000 + (t * 7919) % 40 for t in range(len(r["labels"]) - 8)]
    data = TrainData(hard.train, rows, {})
    branch = tmp_path / "branch"
    result = _run(recipe, f"resume={ckpt}", f"output_dir={branch}", "train.lr=0.01", data=data)
    assert result.step == 12 and result.best_step == 12
    assert resolve_checkpoint(branch, "best") == branch / "checkpoints" / "step-00000012"
    lrs = [l["lr"] for l in read_metrics(branch)[0]]
    f = lr_lambda(12, 2, "cosine", 0.0)  # the reference's 12 steps, 2 of warmup (kept from the checkpoint)
    assert lrs == pytest.approx([0.01 * f(s) for s in (9, 10, 11)])


def test_resume_path_rules(reference, tmp_path):
    from gptoss_tune.errors import UserError
    from gptoss_tune.train.resume import check_output_dir

    d, recipe, _ = reference
    run = d / "run"
    # inside the same run: from its newest checkpoint it continues; an older one would mix two histories
    plan = check_output_dir(load_recipe(recipe, [f"resume={run / 'checkpoints' / 'step-00000012'}"]))
    assert plan.mode == "resume" and not plan.branch and not plan.wipe
    with pytest.raises(UserError, match=r"older than step-00000012 in the same run"):
        check_output_dir(load_recipe(recipe, [f"resume={run / 'checkpoints' / 'step-00000009'}"]))
    # from elsewhere into a directory holding something else, or another run
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    ckpt = run / "checkpoints" / "step-00000009"
    with pytest.raises(UserError, match="is not empty and holds no gptoss-tune run"):
        check_output_dir(load_recipe(recipe, [f"resume={ckpt}", f"output_dir={tmp_path / 'notes'}"]))
    with pytest.raises(UserError, match="holds a different run .*train.lr"):
        check_output_dir(load_recipe(recipe, [f"resume={ckpt}", f"output_dir={run}", "train.lr=0.5"]))
    with pytest.raises(UserError, match="lies inside it"):
        check_output_dir(load_recipe(recipe, [f"resume={ckpt}", f"output_dir={run}", "train.lr=0.5", "overwrite=true"]))


def test_data_with_tokens_outside_the_vocabulary_is_a_user_error(tiny_ckpt, tmp_path):
    from gptoss_tune.errors import UserError

    data = synthetic_data()
    data.validation[0]["input_ids"][3] = 250_000
    with pytest.raises(
        UserError, match=r"the validation data holds token id 250000, but the model's vocabulary has 201088 tokens"
    ):
        _run(write_recipe(tmp_path, tiny_ckpt), data=data)


def test_best_json_follows_a_final_evaluation_at_an_already_saved_step(tiny_ckpt, tmp_path):
    """Step 9 is checkpointed (every 3) before the final evaluation (every 4: not at 9) finds it the best:
    best.json and the checkpoint's trainer state must say so (export reads best.json)."""
    recipe = write_recipe(
        tmp_path, tiny_ckpt, train={"max_steps": 9}, eval={"every_steps": 4}, checkpoint={"every_steps": 3, "keep": 2}
    )
    result = _run(recipe)
    losses = {e["step"]: e["eval_loss"] for e in result.evals}
    assert sorted(losses) == [4, 8, 9] and result.best_step == min(losses, key=losses.get) == 9, losses
    run = tmp_path / "run"
    assert json.loads((run / "best.json").read_text())["step"] == 9
    assert resolve_checkpoint(run, "best") == run / "checkpoints" / "step-00000009"
    state = json.loads((run / "checkpoints" / "step-00000009" / "trainer_state.json").read_text())
    assert state["best"] == {"step": 9, "value": losses[9]} and state["finished"]


def test_resume_with_dropout_restores_the_random_streams(tiny_ckpt, tmp_path, monkeypatch):
    """With LoRA dropout the losses depend on the RNG: a run interrupted (SIGTERM) and resumed equals the
    uninterrupted one only if the checkpoint's RNG states come back."""
    from gptoss_tune.train import tracking

    kw = dict(
        lora={"rank": 8, "alpha": 16, "dropout": 0.3},
        train={"max_steps": 4},
        eval={"every_steps": 2},
        checkpoint={"every_steps": 0, "keep": 1},
    )
    _run(write_recipe(tmp_path, tiny_ckpt, name="ref.yaml", output_dir="ref", **kw))
    real = tracking.Tracker.train_step

    def signal_after_1(self, record, extra=None):
        real(self, record, extra)
        if record["step"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tracking.Tracker, "train_step", signal_after_1)
    recipe = write_recipe(tmp_path, tiny_ckpt, **kw)
    assert _run(recipe).step == 2
    monkeypatch.setattr(tracking.Tracker, "train_step", real)
    assert _run(recipe).stop_reason == "completed"
    got, ref = read_metrics(tmp_path / "run")[0], read_metrics(tmp_path / "ref")[0]
    assert [l["loss"] for l in got] == [l["loss"] for l in ref]


def test_trained_router_stays_fp32_in_a_bf16_model(tiny_ckpt, tmp_path):
    """model.dtype bf16 without autocast (the CPU's train.mixed_precision): the trained router is fp32
    like the LoRA weights, so AdamW's small updates are not rounded away."""
    from safetensors.torch import load_file

    recipe = write_recipe(
        tmp_path,
        tiny_ckpt,
        router={"train": True},
        train={"max_steps": 1, "lr": 1e-4},
        eval={"every_steps": 0},
        checkpoint={"every_steps": 0, "keep": 1},
    )
    _run(recipe, "model.dtype=bf16")
    saved = load_file(tmp_path / "run" / "checkpoints" / "step-00000001" / "adapter.safetensors")
    router = {k: v for k, v in saved.items() if ".mlp.router." in k}
    assert router and all(v.dtype == torch.float32 for v in router.values())
    from gptoss_tune import load_model

    base = load_model(tiny_ckpt, device="cpu", dtype=torch.float32).model.layers[0].mlp.router.weight
    moved = (router["model.layers.0.mlp.router.weight"] - base.to(torch.bfloat16).float()).abs()
    assert 0 < moved.max() < 1e-3  # an lr-sized step, which bf16 (8 bits of mantissa) could not hold


def test_cuda_rng_states_restore_on_fewer_visible_devices(monkeypatch):
    """A checkpoint saved where 8 GPUs were visible resumes where 1 is: the states of the devices that
    exist are restored (torch.cuda.set_rng_state_all would fail on an invalid device ordinal)."""
    from gptoss_tune.train import checkpoint as tc

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device=0: restored.append((int(s[0]), device)))
    state = {"python": __import__("random").getstate(), "numpy": __import__("numpy").random.get_state(),
             "torch": torch.get_rng_state(), "cuda": [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]}  # fmt: skip
    tc.set_rng_state(state)
    assert restored == [(0, 0)]
