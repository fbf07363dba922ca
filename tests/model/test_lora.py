"""LoRA on attention (PEFT) and on every expert (ours, no dense delta)."""

import pytest
import torch
from torch.func import functional_call
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from gptoss_tune import load_model
from gptoss_tune.errors import UserError
from gptoss_tune.model.experts import MXFP4Experts


def _ids(seed=0, shape=(2, 16)):
    return torch.randint(0, 201088, shape, generator=torch.Generator().manual_seed(seed))


def test_zero_B_keeps_logits_and_a_step_changes_them_only_through_lora(tiny_ckpt):
    base = load_model(tiny_ckpt, device="cpu")
    torch.manual_seed(0)
    model = load_model(tiny_ckpt, device="cpu", lora={"rank": 4, "alpha": 8})
    ids = _ids()
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, ref)

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    for layer in model.model.layers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert hasattr(getattr(layer.self_attn, proj), "lora_A")
        for proj in ("gate_up_proj", "down_proj"):
            assert getattr(layer.mlp.experts, f"{proj}_lora_A").shape[0] == model.config.num_local_experts
            assert torch.count_nonzero(getattr(layer.mlp.experts, f"{proj}_lora_B")) == 0

    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    # Expert B factors get a non-zero gradient even though B starts at zero.
    assert model.model.layers[0].mlp.experts.down_proj_lora_B.grad.abs().sum() > 0
    opt.step()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, ref, atol=1e-4)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n


def test_attention_only_and_experts_only(tiny_ckpt):
    m = load_model(tiny_ckpt, device="cpu", lora={"rank": 2, "attention": ["q_proj", "v_proj"], "experts": []})
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all(".q_proj." in n or ".v_proj." in n for n in names)
    m = load_model(tiny_ckpt, device="cpu", lora={"rank": 2, "attention": [], "experts": ["down_proj"]})
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all("experts.down_proj_lora_" in n for n in names)


@pytest.mark.parametrize(
    "bad", [{"rank": 0}, {"alpha": -1}, {"attention": ["x_proj"]}, {"experts": ["up"]}, {"ranks": 4}]
)
def test_bad_lora_settings_are_user_errors(tiny_ckpt, bad):
    with pytest.raises(UserError, match="lora"):
        load_model(tiny_ckpt, device="cpu", lora=bad)


@pytest.mark.parametrize("top_k", [1, 2])
def test_expert_lora_gradients_equal_dense_reference(tiny_ckpt, top_k):
    """The one place a dense delta exists: transformers' GptOssExperts with W + scale·Aᵀ·Bᵀ as weights."""
    model = load_model(tiny_ckpt, device="cpu", lora={"rank": 3, "alpha": 6, "attention": []})
    ex: MXFP4Experts = model.model.layers[1].mlp.experts
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name in ("gate_up_proj_lora_A", "gate_up_proj_lora_B", "down_proj_lora_A", "down_proj_lora_B"):
            getattr(ex, name).copy_(torch.randn(getattr(ex, name).shape, generator=g) * 0.3)
    T, H, E = 11, ex.hidden_size, ex.num_experts
    x = torch.randn(T, H, generator=g, requires_grad=True)
    logits = torch.randn(T, E, generator=g)
    logits[:, 0] = -1e3  # expert 0 receives no token
    top, idx = torch.topk(logits, top_k, dim=-1)
    w = torch.softmax(top, dim=-1).requires_grad_(True)
    gout = torch.randn(T, H, generator=g)

    y = ex(x, idx, w)
    (y * gout).sum().backward()

    stock = GptOssExperts(model.config)
    A_gu = ex.gate_up_proj_lora_A.detach().clone().requires_grad_(True)
    B_gu = ex.gate_up_proj_lora_B.detach().clone().requires_grad_(True)
    A_dn = ex.down_proj_lora_A.detach().clone().requires_grad_(True)
    B_dn = ex.down_proj_lora_B.detach().clone().requires_grad_(True)
    s = ex.lora_scaling
    x2 = x.detach().clone().requires_grad_(True)
    w2 = w.detach().clone().requires_grad_(True)
    params = {
        # dense [E, in, out] weights plus the explicit delta Aᵀ·Bᵀ per expert
        "gate_up_proj": ex.dequantized("gate_up_proj") + s * torch.einsum("eri,eor->eio", A_gu, B_gu),
        "gate_up_proj_bias": ex.gate_up_proj_bias.float(),
        "down_proj": ex.dequantized("down_proj") + s * torch.einsum("eri,eor->eio", A_dn, B_dn),
        "down_proj_bias": ex.down_proj_bias.float(),
    }
    y2 = functional_call(stock, params, (x2, idx, w2))
    (y2 * gout).sum().backward()

    tol = dict(rtol=1e-4, atol=1e-5)
    assert torch.allclose(y, y2, **tol)
    assert torch.allclose(x.grad, x2.grad, **tol)
    assert torch.allclose(w.grad, w2.grad, **tol)
    for ours, ref in (
        (ex.gate_up_proj_lora_A, A_gu),
        (ex.gate_up_proj_lora_B, B_gu),
        (ex.down_proj_lora_A, A_dn),
        (ex.down_proj_lora_B, B_dn),
    ):
        assert torch.allclose(ours.grad, ref.grad, **tol)
    assert torch.count_nonzero(ex.gate_up_proj_lora_A.grad[0]) == 0  # the idle expert gets nothing
