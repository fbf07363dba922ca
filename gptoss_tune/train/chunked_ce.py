"""Language-model loss without the [tokens x 201,088] logits: linear + cross-entropy, chunk by chunk.

For a 2,048-token row the full logits are 2,048 x 201,088 values: 0.8 GB in bf16 plus 1.6 GB for the
fp32 copy transformers' loss makes, plus as much again for their gradient. Here only trained tokens
(label != -100, after the causal shift) are projected at all, `chunk_tokens` of them at a time, and
the gradient is computed in the same pass:

    forward, per chunk:  logits = h @ W^T (in h's dtype, as nn.Linear), upcast to fp32,
                         loss += logsumexp(logits) - logits[target]
                         g = softmax(logits) - onehot(target)   (the gradient of the summed loss)
                         grad_h[chunk] = g @ W;  grad_W += g^T @ h   (grad_W only if W requires grad)
    backward:            grad_h * grad_output, grad_W * grad_output (the loss is a scalar sum)

Trade-off (chosen: gradients in the forward, the approach of fused linear-CE kernels): the same 3
matmuls as the unfused loss, no recompute; it stores grad_h (tokens x hidden, as large as h itself)
until backward instead of h, and a fp32 [V, H] accumulator only when the lm_head trains. Recomputing the
logits in backward instead would cost a 4th matmul (+33% of the loss' FLOPs) to save nothing larger
than grad_h. When no gradient is needed (eval, torch.no_grad) only the loss is computed.

Peak extra memory is about chunk_tokens x V x 6 bytes (bf16 logits, then their fp32 copy, then the
bf16 gradient): 0.6 GB at the default 512 tokens for V = 201,088. Numerics match transformers'
ForCausalLMLoss (bf16 logits from the matmul, loss in fp32): fp32 agrees with F.cross_entropy on full
logits to ~1e-6 relative; bf16 to the rounding of the bf16 matmul output (~1e-3 relative on gradients).
"""

from __future__ import annotations

import torch

from gptoss_tune.data.batching import IGNORE_INDEX

DEFAULT_CHUNK_TOKENS = 512


def _check(hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> None:
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be [batch, length, hidden], got shape {list(hidden_states.shape)}")
    if labels.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"labels shape {list(labels.shape)} does not match hidden_states {list(hidden_states.shape[:2])}"
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden_states.shape[2]:
        raise ValueError(
            f"lm_head_weight must be [vocab, {hidden_states.shape[2]}], got shape {list(lm_head_weight.shape)}"
        )
    if not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")


def _shifted_trained(hidden_states: torch.Tensor, labels: torch.Tensor):
    """(h [N, H], targets [N]) for the N trained positions: position t predicts labels[t + 1]."""
    h = hidden_states[:, :-1]
    t = labels[:, 1:].to(hidden_states.device)
    keep = t != IGNORE_INDEX
    return h[keep], t[keep]


def _lse_softmax_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp per row, softmax) computed IN PLACE in `logits` (torch.logsumexp would allocate a
    second buffer of the chunk's size)."""
    m = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(m).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    lse = (m + total.log()).squeeze(-1)
    return lse, probs.div_(total)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs (as transformers' loss), fp64 kept for fp64 (tests)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        acc = _acc_dtype(hidden)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for s in range(0, n, chunk):
            h = hidden[s : s + chunk]
            t = targets[s : s + chunk]
            logits = (h @ weight.t()).to(acc)  # bf16 matmul output upcast, exactly as transformers' loss sees it
            target_logit = logits.gather(1, t.unsqueeze(1)).squeeze(1)
            lse, probs = _lse_softmax_(logits)  # in place: no second [chunk, V] fp32 buffer
            loss += (lse - target_logit).sum()
            if not (need_h or need_w):
                continue
            probs[torch.arange(probs.shape[0], device=probs.device), t] -= 1.0  # softmax - onehot
            g = probs.to(h.dtype)
            del logits, probs
            if need_h:
                grad_h[s : s + chunk] = g @ weight
            if need_w:
                grad_w += (g.t() @ h).to(acc)
            del g
        ctx.grad_h = grad_h
        ctx.grad_w = grad_w
        ctx.weight_dtype = weight.dtype
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.used:
            raise RuntimeError("lm_loss_sum computes its gradients in the forward: backward through it only once")
        ctx.used = True
        grad_h = grad_w = None
        if ctx.grad_h is not None:
            # In place (the buffer is ours and used once) and with the fp32 scale: casting the scale (1 / tokens)
            # to bf16 first would scale every gradient by the same rounding error (0.1-0.2% bias).
            grad_h = ctx.grad_h.mul_(grad_loss)
        if ctx.grad_w is not None:
            grad_w = (ctx.grad_w * grad_loss).to(ctx.weight_dtype)
        ctx.grad_h = ctx.grad_w = None
        return grad_h, grad_w, None, None


def lm_loss_sum(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over trained tokens, and how many there were.

    hidden_states [B, L, H]: the final-norm output (`model.model(...).last_hidden_state`).
    lm_head_weight [V, H]: `model.lm_head.weight` (its gradient is computed only if it requires grad).
    labels [B, L]: unshifted, -100 where no loss falls (shifted inside, like transformers).
    Returns (loss_sum fp32 scalar with grad, n_tokens long scalar), both on hidden_states' device and
    without a host sync beyond selecting the trained tokens, so the caller can normalise by the token
    count of the whole optimizer step (all micro-batches and processes), not of one micro-batch.
    """
    _check(hidden_states, lm_head_weight, labels, chunk_tokens)
    h, t = _shifted_trained(hidden_states, labels)
    n_tokens = torch.tensor(t.numel(), dtype=torch.long, device=hidden_states.device)
    if t.numel() == 0:
        return hidden_states.sum().float() * 0.0, n_tokens  # still part of the graph: backward works
    if not (torch.is_grad_enabled() and (h.requires_grad or lm_head_weight.requires_grad)):
        return _loss_sums(h, lm_head_weight, t, chunk_tokens)[0], n_tokens  # no gradient work under no_grad
    return _ChunkedLinearCrossEntropy.apply(h, lm_head_weight, t, chunk_tokens), n_tokens


@torch.no_grad()
def _loss_sums(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, chunk_tokens: int):
    """(loss_sum, n_correct) over already shifted and selected tokens, without gradients."""
    loss = torch.zeros((), dtype=_acc_dtype(h), device=h.device)
    correct = torch.zeros((), dtype=torch.long, device=h.device)
    for s in range(0, t.numel(), chunk_tokens):
        logits = (h[s : s + chunk_tokens] @ weight.t()).to(loss.dtype)
        tc = t[s : s + chunk_tokens]
        correct += (logits.argmax(-1) == tc).sum()
        target_logit = logits.gather(1, tc.unsqueeze(1)).squeeze(1)
        lse, _ = _lse_softmax_(logits)
        loss += (lse - target_logit).sum()
    return loss, correct


@torch.no_grad()
def lm_eval_sums(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_sum, n_tokens, n_correct) over trained tokens, for evaluation; n_correct counts argmax hits."""
    _check(hidden_states, lm_head_weight, labels, chunk_tokens)
    h, t = _shifted_trained(hidden_states, labels)
    loss, correct = _loss_sums(h, lm_head_weight, t, chunk_tokens)
    return loss, torch.tensor(t.numel(), dtype=torch.long, device=hidden_states.device), correct
