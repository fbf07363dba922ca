"""The training objective against transformers: load-balancing loss, LM loss, router gradients."""

from __future__ import annotations

import pytest
import torch

from gptoss_tune import load_model
from gptoss_tune.data.batching import collate
from gptoss_tune.train.losses import expert_counts, expert_load_stats, load_balancing_loss
from gptoss_tune.train.objective import Objective


def _ragged_batch(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in (11, 7, 9):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:], "position_ids": list(range(n))})
    return collate(rows, packing=False)


@pytest.mark.parametrize("masked", [True, False])
def test_aux_loss_equals_transformers(tiny_ckpt_topk4, masked):
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

    model = load_model(tiny_ckpt_topk4, device="cpu")
    cfg = model.config
    batch = _ragged_batch(cfg.vocab_size)
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    logits = tuple(out.router_logits)
    assert len(logits) == cfg.num_hidden_layers and logits[0].shape == (
        batch["input_ids"].numel(),
        cfg.num_local_experts,
    )
    mask = batch["token_mask"] if masked else None
    ours = load_balancing_loss(logits, cfg.num_local_experts, cfg.num_experts_per_tok, mask)
    ref = load_balancing_loss_func(logits, cfg.num_local_experts, cfg.num_experts_per_tok, mask)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    # and the number transformers' own forward adds to its loss (aux_loss with output_router_logits=True)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    if masked:
        torch.testing.assert_close(ours, full.aux_loss, rtol=1e-6, atol=1e-6)
    # padding changes the unmasked number: the mask is doing something
    if masked:
        assert not torch.allclose(
            ours, load_balancing_loss(logits, cfg.num_local_experts, cfg.num_experts_per_tok, None)
        )


def test_objective_lm_loss_equals_transformers(tiny_ckpt):
    """The LM sum / trained tokens of the objective (chunked_ce) is transformers' own loss, in training and eval."""
    model = load_model(tiny_ckpt, device="cpu")
    batch = _ragged_batch(model.config.vocab_size, seed=1)
    obj = Objective(model, chunk_tokens=5)
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        ev = obj(**batch, evaluate=True)
    out = obj(**batch)
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert out.trained_tokens.item() == ev.trained_tokens.item() == n
    torch.testing.assert_close(out.lm_loss_sum.detach() / n, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ev.lm_loss_sum.float() / n, ref, rtol=1e-5, atol=1e-5)
    assert 0 <= ev.correct.item() <= n


def test_packed_row_loss_equals_separate_rows(tiny_ckpt):
    """Packed rows (no attention_mask, restarting position_ids): attention never crosses examples."""
    model = load_model(tiny_ckpt, device="cpu")
    g = torch.Generator().manual_seed(5)
    rows = []
    for n in (9, 6, 7):
        ids = torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:], "position_ids": list(range(n))})
    packed = {k: sum((r[k] for r in rows), []) for k in ("input_ids", "labels", "position_ids")}
    obj = Objective(model)
    with torch.no_grad():
        together = obj(**collate([packed], packing=True), evaluate=True)
        apart = [obj(**collate([r], packing=True), evaluate=True) for r in rows]
    assert together.trained_tokens.item() == sum(a.trained_tokens.item() for a in apart)
    torch.testing.assert_close(together.lm_loss_sum, sum(a.lm_loss_sum for a in apart), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train_router", [False, True])
def test_router_gets_gradients_only_when_trained(tiny_ckpt, train_router):
    model = load_model(tiny_ckpt, device="cpu", lora={"rank": 2, "alpha": 4})
    if train_router:
        for n, p in model.named_parameters():
            if ".mlp.router." in n:
                p.requires_grad_(True)
    obj = Objective(model).train()
    batch = _ragged_batch(model.config.vocab_size, seed=3)
    out = obj(**batch)
    (out.lm_loss_sum / out.trained_tokens + 0.5 * out.aux_loss).backward()
    router = {n: p for n, p in model.named_parameters() if ".mlp.router." in n}
    assert len(router) == 2 * model.config.num_hidden_layers  # weight and bias per layer
    for n, p in router.items():
        if train_router:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    frozen = [
        n for n, p in model.named_parameters() if p.grad is not None and "lora_" not in n and ".mlp.router." not in n
    ]
    assert frozen == []


def test_router_gets_gradient_from_the_aux_loss_alone(tiny_ckpt):
    model = load_model(tiny_ckpt, device="cpu", lora={"rank": 2, "alpha": 4})
    w = model.model.layers[0].mlp.router.weight
    w.requires_grad_(True)
    out = Objective(model)(**_ragged_batch(model.config.vocab_size, seed=4))
    out.aux_loss.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_expert_load_stats():
    logits = torch.tensor([[5.0, 1, 0, -1], [5.0, 0, 1, -1], [5.0, 1, -1, 0]])
    counts = expert_counts((logits,), top_k=2, token_mask=torch.tensor([1, 1, 0]))
    assert counts.tolist() == [[2.0, 1.0, 1.0, 0.0]]
    s = expert_load_stats(counts)
    assert s["share"][0] == [0.5, 0.25, 0.25, 0.0]
    assert s["max_min"] == [None] and s["idle"] == [1]
    even = expert_load_stats(torch.tensor([[3.0, 3, 3, 3]]))
    assert even["entropy"] == [1.0] and even["max_min"] == [1.0]
