"""Recipes written carelessly or against the model: duplicate keys, non-finite numbers, loose types,
sizes the model cannot have, unreadable files. Each is one line naming the file, line and key."""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path

import pytest
from helpers.training import write_recipe
from pydantic import BaseModel

from gptoss_tune.cli.main import main as cli_main
from gptoss_tune.errors import UserError
from gptoss_tune.model.lora import LoraSettings
from gptoss_tune.train.memory import MemorySettings
from gptoss_tune.train.recipe import Recipe, load_recipe


def _error(path, *overrides) -> str:
    with pytest.raises(UserError) as e:
        load_recipe(path, list(overrides))
    assert "\n" not in str(e.value)
    return str(e.value)


def _line(path: Path, needle: str, nth: int = 1) -> int:
    hits = [i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line]
    return hits[nth - 1]


def test_a_key_written_twice_is_an_error_naming_both_lines(tmp_path, tiny_ckpt):
    path = write_recipe(tmp_path, tiny_ckpt)
    text = path.read_text()
    path.write_text(text + "lora:\n  alpha: 32\n")  # a second lora: section, rank silently back to the default
    first, again = _line(path, "lora:"), _line(path, "lora:", 2)
    assert _error(path) == (
        f"{path}:{again}: duplicate key 'lora' (first at line {first}); YAML would keep only the last one: merge the two"
    )
    path.write_text(text.replace("  rank: 8\n", "  rank: 8\n  alpha: 4\n  rank: 99\n"))
    assert _error(path).startswith(f"{path}:{_line(path, 'rank: 99')}: duplicate key 'rank' (first at line ")
    assert "duplicate key 'rank'" in _error(write_recipe(tmp_path, tiny_ckpt), "lora={rank: 4, rank: 5}")
    # YAML merge keys are meant to be overridden: not duplicates
    path.write_text(
        text.replace("lora:\n", "base: &b {rank: 4, alpha: 8}\nlora:\n  <<: *b\n").replace("base:", "x-base:")
    )
    with pytest.raises(UserError, match="unknown key 'x-base'"):
        load_recipe(path)  # got past the YAML (the anchor's own key is what is unknown)


def _float_keys(cls: type[BaseModel], prefix: str = ""):
    for name, f in cls.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _float_keys(ann, f"{prefix}{name}.")
        elif ann is float or (
            typing.get_origin(ann) in (typing.Union, types.UnionType) and float in typing.get_args(ann)
        ):
            yield f"{prefix}{name}"


FLOAT_KEYS = sorted(_float_keys(Recipe))


def test_every_float_key_is_found():
    assert {"train.lr", "lora.alpha", "train.epochs", "router.aux_loss_coef", "early_stopping.min_delta"} <= set(
        FLOAT_KEYS
    )


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused_everywhere(tmp_path, tiny_ckpt, key, value):
    msg = _error(write_recipe(tmp_path, tiny_ckpt), f"{key}={value}")
    assert f"{key}: input should be a finite number (got {value.replace('.', '')})" in msg, msg


def test_non_finite_in_the_file_and_from_python(tmp_path, tiny_ckpt):
    path = write_recipe(tmp_path, tiny_ckpt)
    path.write_text(path.read_text().replace("lr: 0.03", "lr: .inf"))
    assert _error(path).startswith(
        f"{path}:{_line(path, 'lr: .inf')}: train.lr: input should be a finite number (got inf)"
    )
    with pytest.raises(UserError, match=r"^lora\.alpha: input should be a finite number \(got inf\)"):
        LoraSettings.coerce({"alpha": float("inf")})


@pytest.mark.parametrize(
    "written, message",
    [
        ("  rank: true", "lora.rank: input should be a valid integer (got True)"),
        ("  rank: 8.0", "lora.rank: input should be a valid integer (got 8.0)"),
        ("  rank: '8'", "lora.rank: input should be a valid integer (got '8'); a quoted value is a string: write the number without quotes"),
        ("  packing: 'yes'", "data.packing: input should be a valid boolean (got 'yes'); a quoted value is a string: write true or false without quotes"),
        ("  packing: 1", "data.packing: input should be a valid boolean (got 1)"),
        ("  lr: '1e-3'", "train.lr: input should be a valid number (got '1e-3'); a quoted value is a string: write the number without quotes"),
    ],
)  # fmt: skip
def test_types_are_strict(tmp_path, tiny_ckpt, written, message):
    path = write_recipe(tmp_path, tiny_ckpt)
    key = written.split(":")[0]
    lines = path.read_text().splitlines()
    section = {"  rank": "lora:", "  packing": "data:", "  lr": "train:"}[key]
    lines.insert(lines.index(section) + 1, written)
    text = "\n".join(line for line in lines if not (line.startswith(key + ":") and line != written)) + "\n"
    path.write_text(text)
    assert _error(path) == f"{path}:{_line(path, written)}: {message}"


def test_numbers_in_every_spelling_and_overrides_still_work(tmp_path, tiny_ckpt):
    path = write_recipe(tmp_path, tiny_ckpt)
    path.write_text(path.read_text().replace("lr: 0.03", "lr: 1e-3").replace("alpha: 16", "alpha: 32"))
    r = load_recipe(path)
    assert r.train.lr == 1e-3 and r.lora.alpha == 32.0 and isinstance(r.lora.alpha, float)
    path.write_text(path.read_text().replace("lr: 1e-3", "lr: 1.0e-2").replace("packing", "packing"))
    assert load_recipe(path).train.lr == 1e-2
    r = load_recipe(path, ["train.lr=2E-4", "train.adam_eps=1e-8", "lora.alpha=8", "data.packing=no", "lora.rank=4"])
    assert (r.train.lr, r.train.adam_eps, r.lora.alpha, r.data.packing, r.lora.rank) == (2e-4, 1e-8, 8.0, False, 4)
    assert "train.lr: input should be a valid number (got 'fast')" in _error(path, "train.lr=fast")
    # the resolved recipe (what the run directory keeps) reads back as the same recipe
    from gptoss_tune.train.recipe import load_yaml, validate_dict

    assert validate_dict(load_yaml(r.to_yaml())).model_dump() == r.model_dump()
    # the Python API: tuples for the projection lists, ints for floats
    assert LoraSettings(attention=("q_proj",), alpha=4).attention == ["q_proj"]
    with pytest.raises(UserError, match="memory.gradient_checkpointing: input should be a valid boolean"):
        MemorySettings.coerce({"gradient_checkpointing": "false"})


def test_sizes_the_model_cannot_have_are_refused_at_validate(tmp_path, tiny_ckpt):
    path = write_recipe(tmp_path, tiny_ckpt)  # the tiny model: hidden_size 64, max_position_embeddings 131,072
    assert load_recipe(path, ["lora.rank=64"]).lora.rank == 64
    assert _error(path, "lora.rank=100000") == (
        f"{path}: lora.rank 100000 is above the model's width (hidden_size 64 in config.json); no adapted matrix "
        f"has a rank above its smaller side: use at most 64 (8 to 64 is usual)"
    )
    path.write_text(path.read_text().replace("max_seq_len: 64", "max_seq_len: 200000"))
    assert _error(path) == (
        f"{path}:{_line(path, 'max_seq_len')}: data.max_seq_len 200000 is above the model's context "
        f"(max_position_embeddings 131072 in config.json): use at most 131072"
    )
    assert cli_main(["validate", str(path)]) == 2
    from gptoss_tune import load_model

    with pytest.raises(UserError, match=r"^lora\.rank 65 is above the model's width \(hidden_size 64\)"):
        load_model(tiny_ckpt, lora={"rank": 65}, device="cpu")  # the Python API: before any LoRA is built


def test_an_unreadable_recipe_is_one_line(tmp_path, tiny_ckpt, monkeypatch, capsys):
    d = tmp_path / "adir.yaml"
    d.mkdir()
    assert _error(d) == f"recipe '{d}' is not a file"
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    assert _error(fifo) == f"recipe '{fifo}' is not a file"  # and it does not block reading it

    path = write_recipe(tmp_path, tiny_ckpt)
    real = Path.read_text

    def denied(self, *a, **k):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", denied)  # the tests may run as root, which chmod does not stop
    assert _error(path) == f"recipe '{path}' cannot be read (Permission denied); check its permissions"
    assert cli_main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"gptoss-tune validate: error: recipe '{path}' cannot be read (Permission denied); check its permissions\n"
    )
