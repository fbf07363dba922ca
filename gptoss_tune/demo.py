"""`make demo`: the main job of the toolkit on the embedded default (a tiny gpt-oss in the real layout).

At this stage: write the tiny checkpoint, load it with LoRA on attention and every expert, and run one
forward and backward pass, printing what happened at each step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

DEMO_DIR = Path("runs/demo")


def main() -> int:
    from gptoss_tune import load_model
    from gptoss_tune.experts import MXFP4Experts
    from gptoss_tune.lora import lora_parameter_count
    from gptoss_tune.tiny import write_tiny_checkpoint

    t0 = time.time()
    ckpt = DEMO_DIR / "tiny-gpt-oss"
    write_tiny_checkpoint(ckpt, force=True, seed=0)
    print(f"[1/3] wrote a tiny gpt-oss checkpoint in the published MXFP4 layout to {ckpt}/")

    model = load_model(ckpt, lora={"rank": 8, "alpha": 16}, device="cpu")
    experts = [m for m in model.modules() if isinstance(m, MXFP4Experts)]
    resident = sum(m.resident_bytes() for m in experts)
    dense = sum(m.num_experts * 3 * m.hidden_size * m.intermediate_size * 2 for m in experts)
    print(
        f"[2/3] loaded it with load_model: {len(experts)} MXFP4 expert layers, {resident:,} resident expert bytes "
        f"({dense / resident:.2f}x smaller than bf16), {lora_parameter_count(model):,} LoRA parameters "
        f"on attention and every expert"
    )

    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    model.train()
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    frozen_with_grad = [n for n in with_grad if "lora_" not in n]
    print(
        f"[3/3] forward + backward on 2x32 tokens: loss {out.loss.item():.4f} (aux {out.aux_loss.item():.4f}); "
        f"{len(with_grad)} LoRA tensors got gradients, {len(frozen_with_grad)} frozen ones did"
    )
    print(f"demo finished in {time.time() - t0:.1f}s")
    return 0 if not frozen_with_grad else 1


if __name__ == "__main__":
    sys.exit(main())
