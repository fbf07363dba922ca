"""The training objective as one module, so accelerate (DDP/FSDP) wraps the whole forward pass.

`Objective(model)(**batch)` runs the decoder with router logits recorded, and returns the LM loss sum
and trained-token count (gptoss_tune.train.chunked_ce.lm_loss_sum), the load-balancing loss of every MoE layer
(padding masked with the batch's token_mask) and the per-layer expert counts. Logits are never formed
for the whole sequence: only trained positions are projected on the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gptoss_tune.train.chunked_ce import DEFAULT_CHUNK_TOKENS, lm_eval_sums, lm_loss_sum
from gptoss_tune.train.losses import expert_counts, load_balancing_loss

MODEL_INPUTS = ("input_ids", "position_ids", "attention_mask")


@dataclass
class StepOutput:
    lm_loss_sum: torch.Tensor  # sum of token cross-entropies (differentiable in training)
    trained_tokens: torch.Tensor
    aux_loss: torch.Tensor  # load-balancing loss of this micro-batch (a mean, differentiable)
    expert_counts: torch.Tensor  # [layers, E]
    real_tokens: torch.Tensor
    correct: torch.Tensor | None = None  # evaluation only


class Objective(nn.Module):
    def __init__(self, model, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        super().__init__()
        self.model = model  # GptOssForCausalLM
        self.chunk_tokens = chunk_tokens
        cfg = model.config
        self.num_experts = cfg.num_local_experts
        self.top_k = cfg.num_experts_per_tok

    def forward(self, input_ids, labels, position_ids, token_mask, attention_mask=None, evaluate: bool = False):
        kwargs = {"input_ids": input_ids, "position_ids": position_ids}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        out = self.model.model(**kwargs, output_router_logits=True, use_cache=False)
        hidden = out.last_hidden_state
        router_logits = tuple(out.router_logits)
        aux = load_balancing_loss(router_logits, self.num_experts, self.top_k, token_mask)
        counts = expert_counts(router_logits, self.top_k, token_mask)
        real = token_mask.sum()
        head = self.model.lm_head
        # Under FSDP2 lm_head is its own unit and carries this loss as a registered forward method
        # (gptoss_tune.train.distributed.shard_fsdp2), so its weight is unsharded around the call.
        chunked = getattr(head, "chunked_loss", None)
        if evaluate:
            if chunked is not None:
                loss, n, correct = chunked(hidden, labels, self.chunk_tokens, True)
            else:
                loss, n, correct = lm_eval_sums(hidden, head.weight, labels, self.chunk_tokens)
            return StepOutput(loss, n, aux.detach(), counts, real, correct)
        if chunked is not None:
            loss, n = chunked(hidden, labels, self.chunk_tokens, False)
        else:
            loss, n = lm_loss_sum(hidden, head.weight, labels, chunk_tokens=self.chunk_tokens)
        return StepOutput(loss, n, aux, counts, real)
