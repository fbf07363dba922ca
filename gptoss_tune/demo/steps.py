"""`make demo`: the main job of the toolkit on the embedded default (a tiny gpt-oss in the real layout).

1. write the tiny checkpoint (published layout: MXFP4 experts, the real 201,088-token vocabulary),
2. load it with LoRA on attention and every expert and run one forward + backward pass (a quick check),
3. train recipes/tiny-demo.yaml on data/sample: evaluation, early stopping, best checkpoint,
4. export the best checkpoint, serve it, ask one question through the official openai client.

Each step prints what it did and where its output went.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

DEMO_DIR = Path("runs/demo")  # under the current directory
# Shipped with the package (links to the repository's recipes/ and data/ in a checkout, copies in a wheel),
# so the demo runs the same from a checkout and from an installed wheel.
RECIPE = Path(__file__).parent / "recipes" / "tiny-demo.yaml"


def write_model(ctx: dict) -> str:
    from gptoss_tune.model.tiny import write_tiny_checkpoint

    ckpt = DEMO_DIR / "tiny-gpt-oss"
    write_tiny_checkpoint(ckpt, force=True, seed=0)
    ctx["model"] = ckpt.resolve()
    return f"wrote a tiny gpt-oss checkpoint in the published MXFP4 layout to {ckpt}/"


def check_model(ctx: dict) -> str:
    from gptoss_tune import load_model
    from gptoss_tune.model.experts import MXFP4Experts
    from gptoss_tune.model.lora import lora_parameter_count

    model = load_model(ctx["model"], lora={"rank": 8, "alpha": 16})  # cuda if there is one, else cpu
    device = next(model.parameters()).device
    experts = [m for m in model.modules() if isinstance(m, MXFP4Experts)]
    resident = sum(m.resident_bytes() for m in experts)
    dense = sum(m.num_experts * 3 * m.hidden_size * m.intermediate_size * 2 for m in experts)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 32)).to(device)
    model.train()
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    frozen_with_grad = [n for n in with_grad if "lora_" not in n]
    if frozen_with_grad:
        raise RuntimeError(f"frozen weights got gradients: {frozen_with_grad[:3]}")
    return (
        f"loaded it with load_model on {device} (experts: {experts[0].resolved_backend(device)}): {len(experts)} MXFP4 expert layers, {resident:,} resident expert bytes "
        f"({dense / resident:.2f}x smaller than bf16), {lora_parameter_count(model):,} LoRA parameters on attention "
        f"and every expert; forward + backward: loss {out.loss.item():.3f}, gradients on {len(with_grad)} LoRA tensors only"
    )


def train_model(ctx: dict) -> str:
    from gptoss_tune.train.recipe import load_recipe
    from gptoss_tune.train.trainer import train

    recipe_path = RECIPE.resolve()
    print(
        f"      training {recipe_path} (LoRA on the sample support conversations; evaluation and early stopping)",
        flush=True,
    )
    run = (DEMO_DIR / "train").resolve()
    recipe = load_recipe(
        recipe_path, [f"model.path={ctx['model']}", f"output_dir={run}", "resume=never", "overwrite=true"]
    )
    result = train(recipe)
    ctx["run"], ctx["result"] = run, result
    evals = result.evals
    first, best = evals[0]["eval_loss"], result.best_eval_loss
    how = "stopped early" if result.stop_reason == "early_stopping" else "finished"
    return (
        f"trained: validation loss {first:.3f} at step {evals[0]['step']} -> best {best:.3f} at step {result.best_step}; "
        f"{how} at step {result.step}. Run directory {run}/ (metrics.jsonl, best.json -> checkpoints/, final/, "
        f"recipe.yaml, wandb/)"
    )


def export_and_serve(ctx: dict) -> str:
    from gptoss_tune.demo.ask import export_serve_and_ask

    out = (DEMO_DIR / "export").resolve()
    reply = export_serve_and_ask(ctx["run"], out, progress=lambda line: print(f"      {line}", flush=True))
    msg = reply.choices[0].message
    return (
        f"exported the best checkpoint to {out}/ and served it; the openai client got finish_reason="
        f"{reply.choices[0].finish_reason!r}, reasoning {getattr(msg, 'reasoning', None)!r}, content {msg.content!r} "
        f"(a 2-layer model with random base weights learns the harmony format of the sample data, not its facts)"
    )


# The demo's steps, in order; each takes and fills ctx and returns its summary line.
STEPS = [write_model, check_model, train_model, export_and_serve]


def main() -> int:
    os.environ.setdefault("WANDB_SILENT", "true")  # W&B runs offline here; its banner would drown the demo's lines
    t0 = time.time()
    ctx: dict = {}
    for i, step in enumerate(STEPS, 1):
        line = step(ctx)
        print(f"[{i}/{len(STEPS)}] {line}", flush=True)
    result = ctx.get("result")
    if result is not None and result.evals and not result.best_eval_loss < result.evals[0]["eval_loss"]:
        print("the validation loss did not fall: something is wrong", file=sys.stderr)
        return 1
    print(f"demo finished in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
