"""How far the merged-MXFP4 export's logits drift from the tuned model (base + LoRA on the fly, i.e. what
merged-bf16 stores before its bf16 rounding), next to how far the tuning moved them from the base, on a
few harmony prompts. One model is loaded at a time."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from openai_harmony import Conversation, Message, Role, SystemContent

from gptoss_tune.data.tokenizer import harmony_encoding
from gptoss_tune.model.adapter import load_adapter_weights
from gptoss_tune.model.loader import load_model

if TYPE_CHECKING:
    from gptoss_tune.export.exporter import AdapterSource


DRIFT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers.",
)


def drift_prompt_ids(prompts=DRIFT_PROMPTS) -> list[list[int]]:

    enc = harmony_encoding()
    out = []
    for p in prompts:
        conv = Conversation.from_messages(
            [
                Message.from_role_and_content(Role.SYSTEM, SystemContent.new()),
                Message.from_role_and_content(Role.USER, p),
            ]
        )
        out.append(list(enc.render_conversation_for_completion(conv, Role.ASSISTANT)))
    return out


def _compare(ref: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    max_abs, kl_sum, agree, n = 0.0, 0.0, 0, 0
    for a, b in zip(ref, other):
        max_abs = max(max_abs, float((a - b).abs().max()))
        la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        kl_sum += float((la.exp() * (la - lb)).sum())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
    return {"max_abs_logit_diff": max_abs, "mean_kl": kl_sum / n, "top1_agreement": agree / n, "positions": n}


@torch.no_grad()
def logit_drift(src: AdapterSource, export_dir: Path, device: str | None = None, prompts=DRIFT_PROMPTS) -> dict:
    """Logits of the merged-MXFP4 export against the tuned model with its LoRA applied on the fly.

    The reference is what merged-bf16 stores (base + LoRA, before bf16 rounding); one model is loaded at
    a time. The untuned base is measured too, so the drift can be read against the size of the tuning.
    """

    ids = drift_prompt_ids(prompts)

    def logits(model) -> list[torch.Tensor]:
        dev = next(model.parameters()).device
        return [model(input_ids=torch.tensor([x], device=dev)).logits[0].float().cpu() for x in ids]

    model = load_model(src.base_dir, lora=src.settings, device=device)
    load_adapter_weights(model, src.ckpt)
    tuned = logits(model)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.zero_()
    if src.router_trained:
        model = load_model(src.base_dir, device=device)
    base = logits(model)
    del model
    gc.collect()
    model = load_model(export_dir, device=device)
    exported = logits(model)
    del model
    gc.collect()
    return {"prompts": len(ids), "export_vs_tuned": _compare(tuned, exported), "base_vs_tuned": _compare(tuned, base)}
