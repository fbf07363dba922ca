"""Memory options: checkpointing changes nothing numerically, recomputes, and saves less; settings errors."""

import pytest
import torch

from gptoss_tune import load_model
from gptoss_tune.errors import UserError
from gptoss_tune.train.chunked_ce import lm_loss_sum
from gptoss_tune.train.memory import (
    MemorySettings,
    apply_memory_settings,
    bitsandbytes_available,
    build_optimizer,
    disable_checkpointing,
    enable_checkpointing,
    training_state_bytes,
)


@pytest.fixture(scope="module")
def lora_model(tiny_ckpt_topk4):
    torch.manual_seed(0)
    m = load_model(tiny_ckpt_topk4, device="cpu", lora={"rank": 4, "alpha": 8})
    for n, p in m.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return m.train()


def _step(model, packed=True):
    """One micro-batch as the training loop will run it: packed row, no mask, chunked loss."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 201088, (2, 24), generator=g)
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24) if packed else None
    labels = ids.clone()
    labels[:, :4] = -100
    model.zero_grad(set_to_none=True)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.model(input_ids=ids, position_ids=pos, use_cache=False, output_router_logits=True)
        loss_sum, n = lm_loss_sum(out.last_hidden_state, model.lm_head.weight, labels, chunk_tokens=16)
        loss = loss_sum / n
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, saved[0]


def _count_attention_calls(model):
    calls = [0]
    hooks = [
        layer.self_attn.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        for layer in model.model.layers
    ]
    return calls, hooks


@pytest.mark.parametrize("every_n,offload", [(1, False), (2, False), (1, True)])
def test_checkpointing_gives_identical_loss_and_grads(lora_model, every_n, offload):
    disable_checkpointing(lora_model)
    calls, hooks = _count_attention_calls(lora_model)
    loss0, grads0, saved0 = _step(lora_model)
    plain_calls = calls[0]
    n = enable_checkpointing(lora_model, every_n_layers=every_n, offload=offload)
    calls[0] = 0
    loss1, grads1, saved1 = _step(lora_model)
    for h in hooks:
        h.remove()
    disable_checkpointing(lora_model)
    layers = len(lora_model.model.layers)
    assert n == len(range(0, layers, every_n))
    assert calls[0] == plain_calls + n  # each checkpointed layer ran again in backward
    assert saved1 < saved0 / 2  # what autograd keeps outside the checkpoints
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and grads0
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=0, atol=0, msg=lambda s, k=k: f"{k}: {s}")


def test_checkpointing_is_inactive_in_eval_mode(lora_model):
    enable_checkpointing(lora_model)
    lora_model.eval()
    calls, hooks = _count_attention_calls(lora_model)
    with torch.no_grad():
        lora_model.model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    for h in hooks:
        h.remove()
    lora_model.train()
    disable_checkpointing(lora_model)
    assert calls[0] == len(lora_model.model.layers)


def test_apply_memory_settings(lora_model):
    s = apply_memory_settings(lora_model, {"checkpoint_every_n_layers": 2})
    assert s.gradient_checkpointing and lora_model.gptoss_tune_checkpointing == {"every_n_layers": 2, "offload": False}
    flags = [layer.gradient_checkpointing for layer in lora_model.model.layers]
    assert flags == [i % 2 == 0 for i in range(len(flags))]
    apply_memory_settings(lora_model, {"gradient_checkpointing": False})
    assert not any(layer.gradient_checkpointing for layer in lora_model.model.layers)


@pytest.mark.parametrize(
    "value,message",
    [
        (
            {"optimizer": "sgd"},
            r"memory.optimizer: input should be 'adamw', 'adamw_8bit' or 'paged_adamw_8bit' \(got 'sgd'\)",
        ),
        (
            {"checkpoint_every_n_layers": 0},
            r"memory.checkpoint_every_n_layers: input should be greater than or equal to 1 \(got 0\)",
        ),
        (
            {"loss_chunk_tokens": -1},
            r"memory.loss_chunk_tokens: input should be greater than or equal to 16 \(got -1\)",
        ),
        (
            {"gradient_checkpointing": False, "offload_checkpoints": True},
            "memory: offload_checkpoints needs gradient_checkpointing: true",
        ),
        ({"chunk": 3}, r"unknown key 'memory.chunk'; known keys under memory: gradient_checkpointing, "),
        ([1], "memory must be a MemorySettings or a dict, got list"),
    ],
)
def test_memory_settings_errors(value, message):
    with pytest.raises(UserError, match=message):
        MemorySettings.coerce(value)


def test_build_optimizer(lora_model):
    opt = build_optimizer(lora_model.parameters(), "adamw", lr=1e-3)
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in lora_model.parameters() if p.requires_grad) > 0
    with pytest.raises(UserError, match="no trainable parameters"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2), requires_grad=False)])
    assert training_state_bytes(1000, "adamw") == 16000 and training_state_bytes(1000, "adamw_8bit") == 10000


@pytest.mark.skipif(bitsandbytes_available(), reason="bitsandbytes is installed here")
def test_8bit_optimizer_without_bitsandbytes_says_what_to_do(lora_model):
    with pytest.raises(
        UserError, match="needs the bitsandbytes package.*pip install bitsandbytes, or use optimizer: adamw"
    ):
        build_optimizer(lora_model.parameters(), "adamw_8bit")


def test_offload_moves_exactly_each_layer_input_to_the_host(lora_model, monkeypatch):
    """What `offload_checkpoints` puts in host memory: each checkpointed layer's input hidden states
    ([B, L, H], the 18 GB term at 131k tokens) and nothing else, in particular not the packed MXFP4 expert
    weights the expert kernels save for backward (that would copy the model to the host every step)."""
    moved = []

    class recording_save_on_cpu(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory=False, device_type="cuda"):
            def pack(t):
                moved.append((tuple(t.shape), t.dtype))
                return t.device, t.cpu()

            super().__init__(pack, lambda packed: packed[1].to(packed[0]))

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", recording_save_on_cpu)
    disable_checkpointing(lora_model)
    loss0, grads0, _ = _step(lora_model)
    enable_checkpointing(lora_model, offload=True)
    try:
        loss1, grads1, _ = _step(lora_model)
    finally:
        disable_checkpointing(lora_model)
    hidden = lora_model.config.hidden_size
    assert moved == [((2, 24, hidden), torch.float32)] * len(lora_model.model.layers)
    assert torch.equal(loss0, loss1)
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=0, atol=0)
