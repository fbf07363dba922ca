"""Recipes: schema, overrides, path resolution, and a one-line error for every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers.training import write_recipe

from gptoss_tune.cli.main import main as cli_main
from gptoss_tune.errors import UserError
from gptoss_tune.model.lora import LoraSettings
from gptoss_tune.train.recipe import load_recipe
from gptoss_tune.train.resume import check_output_dir

REPO = Path(__file__).resolve().parents[2]


def _recipe(tmp_path, tiny_ckpt, **sections):
    return write_recipe(tmp_path, tiny_ckpt, **sections)


def _error(path, *overrides) -> str:
    with pytest.raises(UserError) as e:
        load_recipe(path, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_paths_and_overrides(tmp_path, tiny_ckpt, monkeypatch):
    path = _recipe(tmp_path, tiny_ckpt)
    monkeypatch.chdir(tmp_path / "data")
    r = load_recipe(path, ["train.lr=1e-3", "lora.attention=[q_proj, v_proj]", "router.train=true", "output_dir=here"])
    assert r.data.train == str(tmp_path / "data" / "train.jsonl")  # relative to the recipe file
    assert r.output_dir == str(tmp_path / "data" / "here")  # a command-line path: relative to the current directory
    assert r.train.lr == 1e-3 and r.router.train is True
    assert r.lora == LoraSettings(
        rank=8, alpha=16.0, dropout=0.0, attention=["q_proj", "v_proj"], experts=["gate_up_proj", "down_proj"]
    )
    assert r.router.aux_loss_coef == 0.01 and r.train.scheduler == "cosine" and r.resume == "auto"
    dumped = yaml.safe_load(r.to_yaml())  # the resolved recipe round-trips
    assert dumped["train"]["lr"] == 1e-3 and dumped["early_stopping"]["patience"] == 3


def test_every_key_has_a_description():
    from pydantic import BaseModel

    from gptoss_tune.train.recipe import Recipe

    def walk(cls, prefix=""):
        for name, f in cls.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from walk(ann, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", f

    keys = dict(walk(Recipe))
    missing = [k for k, f in keys.items() if not f.description]
    assert missing == []
    doc = (REPO / "docs" / "recipes.md").read_text()
    undocumented = [k for k in keys if f"`{k}`" not in doc]
    assert undocumented == []
    for contract in (
        "model.path",
        "lora.rank",
        "lora.experts",
        "router.aux_loss_coef",
        "router.train",
        "data.train",
        "data.val_fraction",
        "data.reasoning_effort",
        "train.grad_accum",
        "train.warmup_ratio",
        "train.gradient_checkpointing",
        "eval.every_steps",
        "early_stopping.min_delta",
        "checkpoint.keep",
        "resume",
        "output_dir",
        "logging.wandb.project",
        "logging.wandb.mode",
    ):
        assert contract in keys


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.lrr=1"], "unknown key 'train.lrr'; did you mean 'train.lr'?"),
        (["lora.rnak=4"], "unknown key 'lora.rnak'; did you mean 'lora.rank'?"),
        (["data.trian=x"], "unknown key 'data.trian'; did you mean 'data.train'?"),
        (["optput_dir=x"], "unknown key 'optput_dir'; did you mean 'output_dir'?"),
        (["train.lr=fast"], "train.lr: input should be a valid number"),
        (["lora.rank=0"], "lora.rank: input should be greater than 0 (got 0)"),
        (["lora.rank=2.5"], "lora.rank: input should be a valid integer"),
        (["train.lr=-0.001"], "train.lr: input should be greater than 0 (got -0.001)"),
        (
            ["lora.attention=[q_proj, w_proj]"],
            "lora.attention.1: input should be 'q_proj', 'k_proj', 'v_proj' or 'o_proj'",
        ),
        (["lora.attention=[]", "lora.experts=[]"], "nothing would be trained"),
        (
            ["early_stopping.patience=0"],
            "early_stopping.patience must be at least 1 when early stopping is on (got 0)",
        ),
        (
            ["data.val_fraction=0", "early_stopping.enabled=true"],
            "early_stopping.enabled is true but there is no validation data",
        ),
        (["early_stopping.enabled=yes_please"], "early_stopping.enabled"),
        (["logging.wandb.mode=cloud"], "logging.wandb.mode: input should be 'offline', 'online' or 'disabled'"),
        (["train.lr"], "must look like key.sub=value"),
        (["train.lr=[1"], "the value is not valid YAML"),
        (["data.train=missing.jsonl"], "data.train: '"),
        (["data.validation=nope.jsonl"], "data.validation: '"),
        (["model.path=./no-such-model"], "model.path: model path"),
        (["resume=./no-such-ckpt"], "resume: '"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, tiny_ckpt, overrides, expected):
    path = _recipe(tmp_path, tiny_ckpt)
    msg = _error(path, *overrides)
    assert msg.startswith(str(path)) or msg.startswith("override"), msg
    assert expected in msg, msg


def test_patience_zero_is_fine_without_early_stopping(tmp_path, tiny_ckpt):
    r = load_recipe(_recipe(tmp_path, tiny_ckpt), ["early_stopping.enabled=false", "early_stopping.patience=0"])
    assert r.early_stopping.patience == 0


def test_bad_files(tmp_path, tiny_ckpt):
    assert "does not exist" in _error(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: x\n data: [\n")
    assert _error(bad).startswith(f"{bad}:3: not valid YAML")
    bad.write_text("- a\n- b\n")
    assert "a recipe is a YAML mapping" in _error(bad)
    bad.write_text("data: {train: x}\n")
    assert "'model' is required" in _error(bad)
    (tmp_path / "m").mkdir()
    bad.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"train": "bad.yaml", "val_fraction": 0.1}}))
    assert "model.path:" in _error(bad) and "config.json" in _error(bad)


def test_output_dir_with_another_run(tmp_path, tiny_ckpt):
    path = _recipe(tmp_path, tiny_ckpt)
    r = load_recipe(path)
    assert check_output_dir(r).mode == "fresh"
    run = Path(r.output_dir)
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and holds no gptoss-tune run"):
        check_output_dir(r)
    (run / "notes.txt").unlink()
    (run / "recipe.yaml").write_text(load_recipe(path, ["train.lr=0.5"]).to_yaml())
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')  # it trained: worth protecting
    with pytest.raises(
        UserError, match=r"holds a different run \(train.lr is 0.5 there, 0.03 here\).*overwrite=true"
    ) as e:
        check_output_dir(r)
    assert str(e.value).startswith(str(path))
    plan = check_output_dir(load_recipe(path, ["overwrite=true"]))
    assert plan.mode == "fresh" and plan.wipe
    (run / "recipe.yaml").write_text(r.to_yaml())  # the same run: resume (no checkpoint yet -> restart)
    assert check_output_dir(load_recipe(path, ["train.max_steps=50", "eval.every_steps=2"])).mode == "fresh"
    with pytest.raises(UserError, match="already holds a run.*resume=auto.*overwrite=true"):
        check_output_dir(load_recipe(path, ["resume=never"]))


def test_validate_cli(tmp_path, tiny_ckpt, capsys):
    path = _recipe(tmp_path, tiny_ckpt)
    assert cli_main(["validate", str(path), "train.lr=1e-3", "--print"]) == 0
    out = capsys.readouterr().out
    assert "valid; will start a fresh run" in out and "lr: 0.001" in out
    assert cli_main(["validate", str(path), "lora.rnak=4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'lora.rank'" in err and "Traceback" not in err
    assert cli_main(["train", str(path), "train.lr=-1"]) == 2
    assert "train.lr: input should be greater than 0" in capsys.readouterr().err


def test_train_module_entry_reports_user_errors(tmp_path, tiny_ckpt, capsys):
    from gptoss_tune.cli.main import train_main

    assert train_main([str(_recipe(tmp_path, tiny_ckpt)), "lora.rank=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptoss_tune.train: error: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    "name",
    [
        "tiny-demo.yaml",
        "gpt-oss-20b-lora.yaml",
        "gpt-oss-120b-lora.yaml",
        "gpt-oss-20b-lora-multigpu.yaml",
        "gpt-oss-120b-lora-multigpu.yaml",
    ],
)
def test_shipped_recipes_validate(name):
    r = load_recipe(REPO / "recipes" / name, check_paths=False)
    assert r.model.path and r.data.train


def test_a_second_training_in_the_same_output_dir_is_refused(tmp_path):
    import os

    from gptoss_tune.runs import lock_run_dir

    fd = lock_run_dir(tmp_path / "run", "r.yaml")
    try:
        with pytest.raises(UserError, match="in use by another training process"):
            lock_run_dir(tmp_path / "run", "r.yaml")
    finally:
        os.close(fd)
    os.close(lock_run_dir(tmp_path / "run", "r.yaml"))  # free again once released


def test_errors_name_the_line_of_the_key_in_the_recipe_file(tmp_path, tiny_ckpt):
    path = _recipe(tmp_path, tiny_ckpt)
    text = path.read_text()
    # write_recipe dumps block YAML: find the line of `lr:` under `train:` and of the `lora:` section
    lines = text.splitlines()
    lr_line = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("lr:"))
    path.write_text(text.replace("lr: 0.03", "lr: -0.5").replace("rank: 8", "rnak: 8"))
    lora_rank_line = next(i for i, line in enumerate(path.read_text().splitlines(), 1) if "rnak" in line)
    assert _error(path).startswith(f"{path}:{lora_rank_line}: unknown key 'lora.rnak'; did you mean 'lora.rank'?")
    path.write_text(text.replace("lr: 0.03", "lr: -0.5"))
    assert _error(path).startswith(f"{path}:{lr_line}: train.lr: input should be greater than 0 (got -0.5)")
    # a value given on the command line has no line in the file (not even its section's)
    assert _error(_recipe(tmp_path, tiny_ckpt), "train.lr=-2").startswith(
        f"{path}: train.lr: input should be greater than 0"
    )
    path.write_text(text.replace("data/train.jsonl", "data/nope.jsonl"))
    train_line = next(i for i, line in enumerate(lines, 1) if "data/train.jsonl" in line)
    assert _error(path).startswith(f"{path}:{train_line}: data.train: '")


def test_recipe_level_tools_are_checked_by_validate(tmp_path, tiny_ckpt):
    msg = _error(_recipe(tmp_path, tiny_ckpt), 'data.tools=[{"name": "a b"}]')
    assert "data.tools[0].name: 'a b' is not a valid function name" in msg
    ok = load_recipe(
        _recipe(tmp_path, tiny_ckpt), ['data.tools=[{"name": "lookup", "parameters": {"type": "object"}}]']
    )
    assert ok.data.tools[0]["name"] == "lookup"


def test_packing_with_an_attention_that_crosses_examples_is_refused(tmp_path, tiny_ckpt):
    msg = _error(_recipe(tmp_path, tiny_ckpt), "model.attn_implementation=eager")
    assert "model.attn_implementation 'eager' lets the examples packed into one row attend to each other" in msg
    assert "data.packing: false" in msg
    r = load_recipe(_recipe(tmp_path, tiny_ckpt), ["model.attn_implementation=eager", "data.packing=false"])
    assert r.model.attn_implementation == "eager"
    assert load_recipe(_recipe(tmp_path, tiny_ckpt), ["model.attn_implementation=gptoss_sink_eager"]).data.packing


def test_a_run_that_never_trained_is_replaced_by_the_corrected_recipe(tmp_path, tiny_ckpt):
    """A run that failed before its first step (e.g. a bad data line) left recipe.yaml and nothing else: the
    fixed recipe (data.on_bad_line=skip, another data file, ...) starts fresh instead of being refused."""
    path = _recipe(tmp_path, tiny_ckpt)
    run = Path(load_recipe(path).output_dir)
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text(load_recipe(path).to_yaml())
    (run / "metrics.jsonl").write_text("")
    for fixed in (["data.on_bad_line=skip"], ["resume=never"]):
        plan = check_output_dir(load_recipe(path, fixed))
        assert plan.mode == "fresh" and plan.wipe


def test_an_output_dir_that_cannot_be_created_is_one_line(tmp_path, tiny_ckpt):
    from gptoss_tune.runs import lock_run_dir

    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "afile" / "run"
    msg = _error(_recipe(tmp_path, tiny_ckpt), f"output_dir={bad}")
    assert f"output_dir: '{bad}' cannot be written ({tmp_path / 'afile'} is not a writable directory)" in msg
    with pytest.raises(UserError, match=r"r\.yaml: output_dir '.*afile/run' cannot be created \(Not a directory\)"):
        lock_run_dir(bad, "r.yaml")
