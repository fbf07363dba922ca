"""The expert load-balancing loss and routing statistics (the LM loss is gptoss_tune.train.chunked_ce).

`load_balancing_loss` is the Switch-Transformer auxiliary loss as transformers computes it for gpt-oss
(`load_balancing_loss_func`): softmax over all E router logits, top-k one-hot counts; for every layer
E * sum_e(fraction of routed slots to e * mean router probability of e), padding masked, summed over
tokens of all layers before normalising (the same pooled form as transformers).
"""

from __future__ import annotations

import math

import torch


def _flat_mask(token_mask: torch.Tensor | None, rows: int, device) -> torch.Tensor:
    if token_mask is None:
        return torch.ones(rows, device=device, dtype=torch.float32)
    return token_mask.reshape(-1).to(device=device, dtype=torch.float32)


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor],
    num_experts: int,
    top_k: int,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch load-balancing loss over every layer's router logits [B*T, E], padding (token_mask 0) masked."""
    device = router_logits[0].device
    mask = _flat_mask(token_mask, router_logits[0].shape[0], device)
    routed = torch.zeros(num_experts, device=device, dtype=torch.float32)
    prob = torch.zeros(num_experts, device=device, dtype=torch.float32)
    rows = torch.zeros((), device=device, dtype=torch.float32)
    for logits in router_logits:
        p = torch.softmax(logits.float(), dim=-1)
        top = torch.topk(p, top_k, dim=-1).indices
        one_hot = torch.zeros_like(p).scatter_(1, top, 1.0)  # [T, E], k ones per row
        routed = routed + (one_hot * mask[:, None]).sum(0)
        prob = prob + (p * mask[:, None]).sum(0)
        rows = rows + mask.sum()
    rows = rows.clamp_min(1.0)
    # transformers divides the routed-slot counts by rows (not rows * k), so a uniform router scores k.
    return num_experts * torch.sum((routed / rows) * (prob / rows))


@torch.no_grad()
def expert_counts(router_logits, top_k: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[layers, E] number of real tokens routed to each expert (top-k of the router logits, as the model routes)."""
    out = []
    for logits in router_logits:
        mask = _flat_mask(token_mask, logits.shape[0], logits.device)
        top = torch.topk(logits, top_k, dim=-1).indices
        c = torch.zeros(logits.shape[-1], device=logits.device, dtype=torch.float32)
        c.scatter_add_(0, top.reshape(-1), mask.repeat_interleave(top_k))
        out.append(c)
    return torch.stack(out)


def expert_load_stats(counts: torch.Tensor) -> dict[str, list]:
    """From [layers, E] counts: share of routed slots per expert, max/min share ratio (None when an expert
    got nothing), normalised entropy (1 = perfectly even, 0 = all on one expert) and idle experts, per layer."""
    counts = counts.double().cpu()
    E = counts.shape[1]
    share = counts / counts.sum(1, keepdim=True).clamp_min(1.0)
    ent = -(share * share.clamp_min(1e-30).log()).sum(1) / math.log(E) if E > 1 else torch.ones(counts.shape[0])
    maxmin = []
    for row in share:
        mn = row.min().item()
        maxmin.append(round(row.max().item() / mn, 4) if mn > 0 else None)
    return {
        "share": [[round(v, 5) for v in row.tolist()] for row in share],
        "max_min": maxmin,
        "entropy": [round(v, 5) for v in ent.tolist()],
        "idle": [int((row == 0).sum().item()) for row in counts],
    }
