"""The training objective against transformers: load-balancing loss, LM loss, router gradients."""

from __future__ import annotations

import pytest
import torch

from gptoss_tune import load_model
from gptoss_tune.batching import collate
from gptoss_tune.losses import expert_counts, expert_load_stats, lm_loss_sum, load_balancing_loss
from gptoss_tune.objective import Objective


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
    assert len(logits) == cfg.num_hidden_layers and logits[0].shape == (batch["input_ids"].numel(), cfg.num_local_experts)
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
        assert not torch.allclose(ours, load_balancing_loss(logits, cfg.num_local_experts, cfg.num_experts_per_tok, None))


def test_lm_loss_sum_equals_transformers_mean(tiny_ckpt):
    model = load_model(tiny_ckpt, device="cpu")
    batch = _ragged_batch(model.config.vocab_size, seed=1)
    labels = batch["labels"]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        h = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        for chunk in (4096, 5):  # chunking changes nothing
            s, n = lm_loss_sum(h, model.lm_head.weight, labels, chunk_tokens=chunk)
            assert n.item() == int((labels[:, 1:] != -100).sum())
            torch.testing.assert_close(s / n, out.loss, rtol=1e-5, atol=1e-5)


def test_lm_loss_gradient_matches_unchunked(tiny_ckpt):
    model = load_model(tiny_ckpt, device="cpu")
    batch = _ragged_batch(model.config.vocab_size, seed=2)
    h = torch.randn(*batch["input_ids"].shape, model.config.hidden_size, requires_grad=True)
    w = model.lm_head.weight
    s, n = lm_loss_sum(h, w, batch["labels"], chunk_tokens=4)
    (g1,) = torch.autograd.grad(s, h)
    logits = (h[:, :-1] @ w.t()).float()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="sum")
    (g2,) = torch.autograd.grad(ref, h)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


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
    frozen = [n for n, p in model.named_parameters() if p.grad is not None and "lora_" not in n and ".mlp.router." not in n]
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
