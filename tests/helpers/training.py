"""Helpers for the training tests: learnable synthetic rows, recipes on the tiny model, metrics."""

from __future__ import annotations

import json
import random
import sys
import textwrap
from pathlib import Path

import yaml


def synthetic_rows(n: int, seq: int = 40, k: int = 40, seed: int = 0, prompt: int = 8) -> list[dict]:
    """Rows in the batching.py contract: arithmetic progressions over k token ids (learnable), the
    first `prompt` tokens untrained."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        a, step = r.randrange(k), r.choice([1, 2, 3])
        ids = [1000 + (a + step * i) % k for i in range(seq)]
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "position_ids": list(range(seq))})
    return rows


def synthetic_data(n_train: int = 32, n_val: int = 8):
    from gptoss_tune.train.stream import TrainData

    return TrainData(
        synthetic_rows(n_train), synthetic_rows(n_val, seed=1), {"train_rows": n_train, "validation_rows": n_val}
    )


def write_recipe(dir: Path, model: Path, name: str = "recipe.yaml", **sections) -> Path:
    """A small recipe for the tiny model; `sections` are merged over the defaults (section dicts)."""
    (dir / "data").mkdir(parents=True, exist_ok=True)
    (dir / "data" / "train.jsonl").touch()
    recipe = {
        "model": {"path": str(model)},
        "lora": {"rank": 8, "alpha": 16},
        "data": {"train": "data/train.jsonl", "val_fraction": 0.2, "max_seq_len": 64},
        "train": {
            "epochs": None,
            "max_steps": 12,
            "micro_batch_size": 2,
            "grad_accum": 2,
            "lr": 3e-2,
            "warmup_ratio": 0.1,
            "gradient_checkpointing": False,
        },
        "eval": {"every_steps": 4},
        "early_stopping": {"patience": 3},
        "checkpoint": {"every_steps": 3, "keep": 2},
        "logging": {"wandb": {"mode": "disabled"}, "progress": "lines"},
        "output_dir": "run",
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path = dir / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [l for l in lines if "loss" in l], [l for l in lines if "eval_loss" in l]


def wrapper_script(dir: Path, extra: str = "", name: str = "train_synthetic.py") -> Path:
    """A `python SCRIPT RECIPE [overrides]` entry that trains on synthetic_data (one torch thread, like the
    tests), and, with GPTOSS_TEST_HANG_AT_CHECKPOINT=N, hangs inside the write of step N's checkpoint after
    touching GPTOSS_TEST_MARKER (so a test can kill it mid-write). `extra`: more set-up code (unindented),
    run before training."""
    script = dir / name
    script.write_text(
        textwrap.dedent(f"""
        import os, sys, time
        import torch
        torch.set_num_threads(1)
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from helpers.training import synthetic_data
        import gptoss_tune.train.trainer as train_mod
        from gptoss_tune.cli.main import train_main
        import gptoss_tune.train.checkpoint as ck
        train_mod.load_train_data = lambda recipe: synthetic_data()
        hang = os.environ.get("GPTOSS_TEST_HANG_AT_CHECKPOINT")
        if hang:
            real = ck.write_checkpoint_files
            def slow(tmp, **kw):
                real(tmp, **kw)
                if tmp.name.endswith("step-%08d" % int(hang)):
                    open(os.environ["GPTOSS_TEST_MARKER"], "w").close()
                    time.sleep(120)
            ck.write_checkpoint_files = slow
    """)
        + textwrap.dedent(extra)
        + "\nsys.exit(train_main(sys.argv[1:]))\n"
    )
    return script


PYTHON = sys.executable
