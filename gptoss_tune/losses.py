"""Training losses and routing statistics.

`lm_loss_sum` returns the SUM of the token cross-entropies and the number of trained tokens (not a mean),
so the training loop can divide by the trained tokens of the whole optimizer step across micro-batches
and processes: every trained token then weighs the same, however the tokens fall into micro-batches.
Only positions that carry a label are projected onto the 201,088-token vocabulary (prompt tokens never
get logits), in chunks, each recomputed in the backward pass, so at most one chunk of logits is alive.

`load_balancing_loss` is the Switch-Transformer auxiliary loss as transformers computes it for gpt-oss
(`load_balancing_loss_func`): softmax over all E router logits, top-k one-hot counts; for every layer
E * sum_e(fraction of routed slots to e * mean router probability of e), padding masked, summed over
tokens of all layers before normalising (the same pooled form as transformers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
DEFAULT_CHUNK_TOKENS = 1024  # 1024 x 201,088 fp32 logits = 0.82 GB alive at most


def shift_for_next_token(hidden_states: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [n, H], targets [n]) of the positions whose NEXT token is trained (labels are unshifted)."""
    h = hidden_states[:, :-1, :]
    y = labels[:, 1:]
    keep = y != IGNORE
    return h[keep], y[keep]


def _chunk_ce_sum(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = (h @ w.to(h.dtype).t()).float()
    return F.cross_entropy(logits, y, reduction="sum")


def lm_loss_sum(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over trained tokens, number of trained tokens).

    hidden_states [B, T, H] (final-norm output), lm_head_weight [V, H], labels [B, T] unshifted with -100
    where no loss falls. Logits are computed in fp32 for the softmax.
    """
    h, y = shift_for_next_token(hidden_states, labels)
    n = torch.tensor(y.numel(), device=labels.device)
    if y.numel() == 0:
        return hidden_states.sum() * 0.0, n
    total = None
    # One chunk: recomputing it in the backward would not lower the peak (it is the last op of the
    # forward), only cost a second projection (25% of a tiny-model step on the CPU).
    recompute = y.numel() > chunk_tokens
    for s in range(0, y.numel(), chunk_tokens):
        hc, yc = h[s : s + chunk_tokens], y[s : s + chunk_tokens]
        if recompute and torch.is_grad_enabled() and hc.requires_grad:
            part = checkpoint(_chunk_ce_sum, hc, lm_head_weight, yc, use_reentrant=False)
        else:
            part = _chunk_ce_sum(hc, lm_head_weight, yc)
        total = part if total is None else total + part
    return total, n


@torch.no_grad()
def lm_eval_sums(
    hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cross-entropy sum, trained tokens, tokens whose argmax prediction is right), for evaluation."""
    h, y = shift_for_next_token(hidden_states, labels)
    loss = torch.zeros((), device=labels.device, dtype=torch.float64)
    correct = torch.zeros((), device=labels.device, dtype=torch.long)
    for s in range(0, y.numel(), chunk_tokens):
        logits = (h[s : s + chunk_tokens] @ lm_head_weight.to(h.dtype).t()).float()
        yc = y[s : s + chunk_tokens]
        loss += F.cross_entropy(logits, yc, reduction="sum").double()
        correct += (logits.argmax(-1) == yc).sum()
    return loss, torch.tensor(y.numel(), device=labels.device), correct


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
