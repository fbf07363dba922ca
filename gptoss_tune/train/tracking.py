"""Where training reports go: metrics.jsonl (always), Weights & Biases (offline by default), the console.

Only the main process creates a Tracker; the others never write files.

metrics.jsonl holds one JSON object per line: training lines have "step" and "loss" (the LM loss, the
number comparable with eval_loss), evaluation lines "step" and "eval_loss".
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gptoss_tune.runs import METRICS

WANDB_ID_FILE = "wandb_run_id"


def _memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except Exception:
        return 0.0


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Tracker:
    def __init__(self, recipe, run_dir: Path, total_steps: int, start_step: int):
        self.run_dir = Path(run_dir)
        self.every = recipe.logging.every_steps
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.time()
        self.metrics = open(self.run_dir / METRICS, "a")
        self.wandb = self._init_wandb(recipe)
        mode = recipe.logging.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        self.bar = None
        if mode == "bar":
            self.bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True)

    # ---- W&B ---------------------------------------------------------------------------------------
    def _init_wandb(self, recipe):
        cfg = recipe.logging.wandb
        mode = os.environ.get("WANDB_MODE") or cfg.mode  # the environment wins, as wandb users expect
        if mode == "disabled":
            return None
        try:
            import wandb
        except ImportError:
            print("wandb is not installed; tracking to metrics.jsonl only", file=sys.stderr)
            return None
        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if run_id is None:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
        try:
            return wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or self.run_dir.name,
                tags=cfg.tags or None,
                mode=mode,
                dir=str(self.run_dir),
                id=run_id,
                resume="allow",
                config=recipe.model_dump(mode="json"),
            )
        except Exception as e:  # tracking must never stop training
            print(f"wandb could not start ({type(e).__name__}: {e}); tracking to metrics.jsonl only", file=sys.stderr)
            return None

    # ---- records -----------------------------------------------------------------------------------
    def write(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def train_step(self, record: dict, wandb_extra: dict | None = None) -> None:
        self.write(record)
        step = record["step"]
        if self.wandb is not None and (step % self.every == 0 or step == self.total):
            flat = {f"train/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            flat.update(wandb_extra or {})
            self.wandb.log(flat, step=step)
        done = step - self.start_step
        rate = (time.time() - self.t0) / max(done, 1)
        eta = _fmt_eta(rate * (self.total - step))
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if step % self.every == 0:
                self.bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    aux=f"{record['aux_loss']:.3f}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                    mem=f"{_memory_gib():.1f}GiB",
                    refresh=False,
                )
        elif self.mode == "lines" and (step % self.every == 0 or step == self.total):
            print(
                f"step {step}/{self.total}  loss {record['loss']:.4f}  aux {record['aux_loss']:.4f}  lr {record['lr']:.2e}  "
                f"{record['tokens_per_s']:.0f} tok/s  mem {_memory_gib():.1f} GiB  eta {eta}",
                flush=True,
            )

    def eval_step(self, record: dict) -> None:
        self.write(record)
        if self.wandb is not None:
            self.wandb.log(
                {
                    f"eval/{k[5:] if k.startswith('eval_') else k}": v
                    for k, v in record.items()
                    if isinstance(v, (int, float)) and k != "step"
                },
                step=record["step"],
            )
        self.info(
            f"eval at step {record['step']}: loss {record['eval_loss']:.4f}  perplexity {record['eval_perplexity']:.2f}  "
            f"accuracy {record['eval_accuracy']:.3f}  (best {record['best_eval_loss']:.4f} at step {record['best_step']})"
        )

    def info(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.mode != "none":
            print(text, flush=True)

    def close(self, summary: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        if self.wandb is not None:
            if summary:
                for k, v in summary.items():
                    self.wandb.summary[k] = v
            self.wandb.finish()
