"""gptoss_sink attention against transformers' own eager gpt-oss attention (sinks, windows, packing)."""

import pytest
import torch
from helpers.reference import stock_model

from gptoss_tune import load_model
from gptoss_tune.model import attention as A

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _config(window=4, heads=4, kv_heads=2, head_dim=8, impl="eager"):
    from transformers import GptOssConfig

    cfg = GptOssConfig(
        hidden_size=32, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=window,
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, vocab_size=100,
    )  # fmt: skip
    cfg._attn_implementation = impl
    return cfg


def _module(cfg, layer_idx, seed):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention

    torch.manual_seed(seed)
    m = GptOssAttention(cfg, layer_idx)
    with torch.no_grad():
        m.sinks.normal_(0, 1.5)
    return m


def _layout(name, B, L):
    """(position_ids, 2D attention_mask) for a plain, packed or right-padded batch."""
    if name == "plain":
        return torch.arange(L).expand(B, L), None
    if name == "packed":  # rows of 3 and 2 examples; the second row has a 1-token example
        rows = [[5, L - 12, 7], [L - 1, 1]]
        pos = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in rows[:B]])
        return pos, None
    if name == "padded":
        mask = torch.ones(B, L, dtype=torch.long)
        mask[1, L - 6 :] = 0
        return torch.arange(L).expand(B, L), mask
    raise ValueError(name)


def _masks(cfg, layer_type, B, L, pos, mask2d):
    """The reference mask from transformers' masking utils (which DO see position_ids when given)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    build = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
    embeds = torch.zeros(B, L, 1)
    return build(config=cfg, inputs_embeds=embeds, attention_mask=mask2d, past_key_values=None, position_ids=pos)


def _qkv(B, cfg, L, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, cfg.num_attention_heads, L, cfg.head_dim, generator=g, dtype=dtype)
    k = torch.randn(B, cfg.num_key_value_heads, L, cfg.head_dim, generator=g, dtype=dtype)
    v = torch.randn(B, cfg.num_key_value_heads, L, cfg.head_dim, generator=g, dtype=dtype)
    return [t.mul(2.0).requires_grad_() for t in (q, k, v)]


def _run(fn, module, q, k, v, mask, **kw):
    out, _ = fn(
        module,
        q,
        k,
        v,
        mask,
        scaling=module.scaling,
        dropout=0.0,
        sliding_window=module.sliding_window,
        s_aux=module.sinks,
        **kw,
    )
    return out


@pytest.mark.parametrize("layout", ["plain", "packed", "padded"])
@pytest.mark.parametrize("layer_idx", [0, 1], ids=["sliding", "full"])
def test_outputs_and_gradients_match_transformers_eager(layout, layer_idx):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    B, L = 2, 24
    cfg = _config(window=4)
    module = _module(cfg, layer_idx, seed=layer_idx)
    layer_type = cfg.layer_types[layer_idx]
    pos, mask2d = _layout(layout, B, L)
    ref_mask = _masks(cfg, layer_type, B, L, pos, mask2d)
    cfg_ours = _config(window=4, impl=A.ATTN_IMPLEMENTATION)
    our_mask = _masks(cfg_ours, layer_type, B, L, pos, mask2d)
    assert isinstance(our_mask, A.SinkMask)

    module.double()  # fp64 on both sides: differences are the implementations', not rounding
    q, k, v = _qkv(B, cfg, L, seed=7, dtype=torch.float64)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = _run(eager_attention_forward, module, q, k, v, ref_mask)
    ours = _run(A.sink_attention_forward, module, q2, k2, v2, our_mask, position_ids=pos, route="eager")
    assert ours.shape == ref.shape == (B, L, cfg.num_attention_heads, cfg.head_dim)
    valid = torch.ones(B, L, dtype=torch.bool) if mask2d is None else mask2d.bool()
    # padded query rows have no defined output in either implementation; compare real rows
    torch.testing.assert_close(ours[valid], ref[valid], rtol=1e-10, atol=1e-12)

    g = torch.randn_like(ref) * valid[:, :, None, None]
    ref_grads = torch.autograd.grad(ref, [q, k, v, module.sinks], g)
    sinks_ref_grad = ref_grads[3].clone()
    our_grads = torch.autograd.grad(ours, [q2, k2, v2, module.sinks], g)
    for name, a, b in zip("q k v sinks".split(), our_grads[:3] + (our_grads[3],), ref_grads[:3] + (sinks_ref_grad,)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"grad {name}: {m}")
    assert our_grads[3].abs().sum() > 0  # the sinks do get a gradient


def test_bf16_error_no_worse_than_transformers_eager():
    """bf16 inputs: our route (fp32 scores and softmax) is at least as close to fp64 as transformers' eager
    (bf16 softmax). Seen: 0.54% vs 0.58% relative."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    B, L = 2, 40
    cfg = _config(window=None)
    ref_module = _module(cfg, 1, seed=0).double()
    q, k, v = _qkv(B, cfg, L, seed=1, dtype=torch.float64)
    ref = _run(A.sink_attention_forward, ref_module, q, k, v, A.SinkMask(B, L, L), route="eager")
    module = _module(cfg, 1, seed=0).bfloat16()
    qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
    ours = _run(A.sink_attention_forward, module, qb, kb, vb, A.SinkMask(B, L, L), route="eager")
    pos = torch.arange(L).expand(B, L)
    eager = _run(eager_attention_forward, module, qb, kb, vb, _masks(cfg, "full_attention", B, L, pos, None).bfloat16())
    err = lambda x: ((x.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(ours) < 1e-2 and err(ours) <= 1.1 * err(eager), (err(ours), err(eager))


def test_packed_differs_from_unpacked():
    """Guard: the packed case above cannot pass by accident - documents change the result."""
    B, L = 2, 24
    cfg = _config(window=None)
    module = _module(cfg, 1, seed=3)
    q, k, v = _qkv(B, cfg, L, seed=3)
    pos, _ = _layout("packed", B, L)
    spec = A.SinkMask(B, L, L)
    packed = _run(A.sink_attention_forward, module, q, k, v, spec, position_ids=pos, route="eager")
    plain = _run(A.sink_attention_forward, module, q, k, v, A.SinkMask(B, L, L), position_ids=None, route="eager")
    assert torch.equal(packed[:, :5], plain[:, :5])  # the first example of each row is unaffected
    assert not torch.allclose(packed[0, 5:], plain[0, 5:], atol=1e-3)


def test_lse_identity_is_the_sink_softmax():
    """out_without_sink * sigmoid(lse - sink) equals softmax over [scores, sink] with the sink dropped."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 5, 9, generator=g, dtype=torch.float64)
    v = torch.randn(3, 9, 4, generator=g, dtype=torch.float64)
    sinks = torch.randn(3, generator=g, dtype=torch.float64)
    full = torch.cat([scores, sinks.view(3, 1, 1).expand(3, 5, 1)], -1).softmax(-1)[..., :-1] @ v
    lse = torch.logsumexp(scores, -1)
    ident = A.apply_sinks((scores.softmax(-1) @ v).unsqueeze(0), lse.unsqueeze(0), sinks)[0]
    torch.testing.assert_close(ident, full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["plain", "packed", "padded"])
@pytest.mark.parametrize("window", [None, 128])
def test_flex_route_forward_matches_dense_route_on_cpu(layout, window):
    """flex_attention (uncompiled, forward only on the CPU) with our BlockMask equals the dense route."""
    B, L = 2, 300  # more than two 128-blocks: partial and full blocks both occur
    cfg = _config(window=window or 4, heads=4, kv_heads=2, head_dim=16)
    module = _module(cfg, 1, seed=5)
    module.sliding_window = window
    pos, mask2d = _layout(layout, B, L)
    spec = A.sink_mask_interface(B, L, L, attention_mask=None if mask2d is None else mask2d.bool())
    q, k, v = _qkv(B, cfg, L, seed=11)
    with torch.no_grad():
        dense = _run(A.sink_attention_forward, module, q, k, v, spec, position_ids=pos, route="eager")
        flex = _run(A.sink_attention_forward, module, q, k, v, spec, position_ids=pos, route="flex")
    torch.testing.assert_close(flex, dense, rtol=2e-5, atol=2e-5)


def _block_codes(bm, b):
    """Dense [q_blocks, kv_blocks] codes from a BlockMask: 0 skipped, 1 partial (mask_mod applied), 2 full."""
    nq = bm.kv_num_blocks.shape[-1]
    nk = -(-bm.shape[-1] // bm.BLOCK_SIZE[1])
    codes = torch.zeros(nq, nk, dtype=torch.long)
    for qb in range(nq):
        for i in range(int(bm.kv_num_blocks[b, 0, qb])):
            codes[qb, int(bm.kv_indices[b, 0, qb, i])] = 1
        if bm.full_kv_num_blocks is not None:
            for i in range(int(bm.full_kv_num_blocks[b, 0, qb])):
                codes[qb, int(bm.full_kv_indices[b, 0, qb, i])] = 2
    return codes


@pytest.mark.parametrize("window", [None, 128])
def test_block_mask_classifies_every_block_correctly(window):
    """Full blocks skip the mask_mod in the fused kernel: a block marked full must be entirely visible,
    a skipped block entirely hidden. (The CPU flex forward applies mask_mod everywhere, so this is the
    check of the sparsity structure the GPU kernel relies on.)"""
    B, L = 2, 700
    pos = torch.stack([
        torch.cat([torch.arange(200), torch.arange(300), torch.arange(200)]),
        torch.cat([torch.arange(650), torch.arange(50)]),
    ])  # fmt: skip
    docs = A.document_ids(pos)
    mod = A.make_mask_mod(window, documents=docs)
    bm = A.build_block_mask(mod, B, L, L, "cpu", batched=True)
    dense = A.dense_mask(mod, B, L, L, "cpu")[:, 0]
    bs = bm.BLOCK_SIZE
    seen = set()
    for b in range(B):
        codes = _block_codes(bm, b)
        seen |= set(codes.flatten().tolist())
        for qb in range(codes.shape[0]):
            for kb in range(codes.shape[1]):
                tile = dense[b, qb * bs[0] : (qb + 1) * bs[0], kb * bs[1] : (kb + 1) * bs[1]]
                want = 0 if not tile.any() else (2 if tile.all() else 1)
                assert codes[qb, kb] == want or (codes[qb, kb] == 1 and want == 2), (b, qb, kb, codes[qb, kb], want)
    # every kind occurs, so the check above means something (a 128-window has no full 128-blocks)
    assert seen == ({0, 1} if window else {0, 1, 2})


def test_block_masks_are_cached_by_content():
    A.clear_block_mask_cache()
    B, L = 1, 256
    pos = torch.cat([torch.arange(100), torch.arange(156)])[None]
    cfg = _config(window=4, head_dim=16)
    module = _module(cfg, 1, seed=1)
    q, k, v = _qkv(B, cfg, L, seed=1)
    with torch.no_grad():
        for _ in range(2):  # two "steps", each with a fresh SinkMask as transformers makes per forward
            spec = A.sink_mask_interface(B, L, L)
            _run(A.sink_attention_forward, module, q, k, v, spec, position_ids=pos.clone(), route="flex")
            _run(A.sink_attention_forward, module, q, k, v, spec, position_ids=pos.clone(), route="flex")
    assert len(A._BLOCK_MASKS) == 1
    with torch.no_grad():
        pos2 = torch.cat([torch.arange(101), torch.arange(155)])[None]
        _run(A.sink_attention_forward, module, q, k, v, A.sink_mask_interface(B, L, L), position_ids=pos2, route="flex")
    assert len(A._BLOCK_MASKS) == 2


def test_flex_route_refuses_cpu_backward_with_a_clear_message():
    cfg = _config(head_dim=16)
    module = _module(cfg, 1, seed=1)
    q, k, v = _qkv(1, cfg, 32, seed=1)
    with pytest.raises(NotImplementedError, match="no backward on the CPU"):
        _run(A.sink_attention_forward, module, q, k, v, A.SinkMask(1, 32, 32), route="flex")


# ---------------------------------------------------------------------------------------------------
# whole tiny model
# ---------------------------------------------------------------------------------------------------
def _ids(seed, shape):
    return torch.randint(0, 201088, shape, generator=torch.Generator().manual_seed(seed))


def test_load_model_defaults_to_gptoss_sink(tiny_ckpt):
    m = load_model(tiny_ckpt, device="cpu")
    assert m.config._attn_implementation == A.ATTN_IMPLEMENTATION


def test_tiny_model_logits_equal_eager_and_packed_rows_equal_separate_rows(tiny_ckpt):
    ours = load_model(tiny_ckpt, device="cpu", attn_implementation=A.ATTN_IMPLEMENTATION)
    eager = load_model(tiny_ckpt, device="cpu", attn_implementation="eager")
    ids = _ids(0, (2, 20))  # 20 tokens > window 4
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, eager(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        a, b, c = _ids(1, (1, 7)), _ids(2, (1, 9)), _ids(3, (1, 4))
        packed_ids = torch.cat([a, b, c], 1)
        pos = torch.cat([torch.arange(7), torch.arange(9), torch.arange(4)])[None]
        packed = ours(input_ids=packed_ids, position_ids=pos).logits[0]
        for part, (s, e) in zip((a, b, c), ((0, 7), (7, 16), (16, 20))):
            torch.testing.assert_close(packed[s:e], eager(input_ids=part).logits[0], rtol=1e-5, atol=1e-5)
        # transformers' own eager attention does NOT keep packed examples apart in gpt-oss: if this
        # starts failing, transformers fixed it and the docs' warning can go.
        stock_packed = eager(input_ids=packed_ids, position_ids=pos).logits[0]
        assert not torch.allclose(stock_packed[7:16], eager(input_ids=b).logits[0], atol=1e-3)


def test_tiny_model_matches_stock_transformers_with_padding(tiny_ckpt):
    ours = load_model(tiny_ckpt, device="cpu")
    ref = stock_model(tiny_ckpt)
    ids = _ids(4, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = ref(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[1, :9], b[1, :9], rtol=1e-5, atol=1e-5)


def test_tiny_model_lora_gradients_equal_eager(tiny_ckpt):
    lora = {"rank": 4, "alpha": 8}
    grads = {}
    for impl in (A.ATTN_IMPLEMENTATION, "eager"):
        torch.manual_seed(0)
        m = load_model(tiny_ckpt, device="cpu", attn_implementation=impl, lora=lora)
        for n, p in m.named_parameters():
            if "lora_B" in n:  # nonzero B so every LoRA factor gets a gradient
                with torch.no_grad():
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
        m.train()
        ids = _ids(5, (2, 16))
        m(input_ids=ids, labels=ids).loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    assert grads[A.ATTN_IMPLEMENTATION].keys() == grads["eager"].keys() and grads["eager"]
    for n, g in grads["eager"].items():
        torch.testing.assert_close(
            grads[A.ATTN_IMPLEMENTATION][n], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}"
        )


def test_generation_with_kv_cache_equals_eager(tiny_ckpt):
    ours = load_model(tiny_ckpt, device="cpu")
    eager = load_model(tiny_ckpt, device="cpu", attn_implementation="eager")
    ids = _ids(6, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as batched generation does
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    a = ours.generate(input_ids=ids, **kw)
    b = eager.generate(input_ids=ids, **kw)
    assert a.sequences.tolist() == b.sequences.tolist()
    for sa, sb in zip(a.scores, b.scores):  # 8 decode steps (q_len 1 against the cache), sliding window 4
        torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# GPU: the compiled flex route, forward and backward
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def many_compiles(monkeypatch):
    """Each (window, documents, padding) variant compiles flex once; this module has more than dynamo's 8."""
    import torch._dynamo.config as dynamo_config

    monkeypatch.setattr(dynamo_config, "cache_size_limit", 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["plain", "packed", "padded"])
@pytest.mark.parametrize("window", [None, 128])
def test_flex_route_on_cuda_matches_fp32_reference(layout, window, many_compiles):
    """Real head shapes (64 query heads, 8 KV heads, head_dim 64), bf16 through compiled flex vs fp32 dense."""
    import copy

    B, L = 2, 1024
    cfg = _config(window=window or 128, heads=64, kv_heads=8, head_dim=64)
    ref_module = _module(cfg, 1, seed=0).cuda()
    ref_module.sliding_window = window
    module = copy.deepcopy(ref_module).bfloat16()
    if layout == "packed":
        pos = torch.stack(
            [torch.cat([torch.arange(300), torch.arange(724)]), torch.cat([torch.arange(1000), torch.arange(24)])]
        )
        mask2d = None
    else:
        pos, mask2d = _layout(layout, B, L)
    pos = pos.cuda()
    spec = A.sink_mask_interface(B, L, L, attention_mask=None if mask2d is None else mask2d.bool().cuda())
    q, k, v = (t.detach().mul(0.5).cuda().requires_grad_() for t in _qkv(B, cfg, L, seed=1))  # unit-variance inputs
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    ref = _run(A.sink_attention_forward, ref_module, q, k, v, spec, position_ids=pos, route="eager")
    out = _run(A.sink_attention_forward, module, qb, kb, vb, spec, position_ids=pos, route="flex")
    valid = torch.ones(B, L, dtype=torch.bool, device="cuda") if mask2d is None else mask2d.bool().cuda()
    rel = ((out.float() - ref)[valid].norm() / ref[valid].norm()).item()
    assert rel < 1e-2, rel
    g = torch.randn_like(ref) * valid[:, :, None, None]
    ref_grads = torch.autograd.grad(ref, [q, k, v, ref_module.sinks], g)
    our_grads = torch.autograd.grad(out, [qb, kb, vb, module.sinks], g.bfloat16())
    for name, a, b in zip("q k v sinks".split(), our_grads, ref_grads):
        rel = ((a.float() - b).norm() / b.norm()).item()
        assert rel < 2e-2, (name, rel)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_model_on_cuda_flex_route_equals_dense_route(tiny_ckpt, many_compiles):
    """The whole model on CUDA in bf16: the default (flex) route against the dense route, packed rows,
    logits and LoRA gradients, with per-layer checkpointing on as in training."""
    from gptoss_tune.train.chunked_ce import lm_loss_sum
    from gptoss_tune.train.memory import enable_checkpointing

    results = {}
    for impl in (A.ATTN_IMPLEMENTATION, A.ATTN_EAGER):
        torch.manual_seed(0)
        m = load_model(tiny_ckpt, device="cuda", attn_implementation=impl, lora={"rank": 4, "alpha": 8})
        for n, p in m.named_parameters():
            if "lora_B" in n:
                with torch.no_grad():
                    p.normal_(0, 0.05, generator=torch.Generator(device="cuda").manual_seed(len(n)))
        enable_checkpointing(m)
        m.train()
        ids = _ids(9, (2, 96)).cuda()
        pos = torch.cat([torch.arange(40), torch.arange(56)]).expand(2, 96).cuda()
        out = m.model(input_ids=ids, position_ids=pos, use_cache=False)
        loss_sum, n_tok = lm_loss_sum(out.last_hidden_state, m.lm_head.weight, ids)
        (loss_sum / n_tok).backward()
        results[impl] = (
            out.last_hidden_state.detach().float(),
            {k: p.grad.float() for k, p in m.named_parameters() if p.requires_grad},
        )
    (h_flex, g_flex), (h_dense, g_dense) = results[A.ATTN_IMPLEMENTATION], results[A.ATTN_EAGER]
    assert ((h_flex - h_dense).norm() / h_dense.norm()).item() < 1e-2
    for k in g_dense:
        rel = ((g_flex[k] - g_dense[k]).norm() / g_dense[k].norm().clamp_min(1e-12)).item()
        assert rel < 5e-2, (k, rel)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_route_under_bf16_autocast_as_the_training_loop_runs_it():
    """The training loop (accelerate mixed_precision bf16) and bench_train.py run the compiled flex route
    under torch.autocast: same output and gradients as without it, bf16 inputs, fp32 lse for the sinks."""
    B, L = 1, 512
    cfg = _config(window=128, heads=64, kv_heads=8, head_dim=64)
    module = _module(cfg, 0, seed=2).cuda().bfloat16()
    pos = torch.cat([torch.arange(200), torch.arange(312)])[None].cuda()
    spec = A.sink_mask_interface(B, L, L)
    q, k, v = (t.detach().mul(0.5).cuda().bfloat16().requires_grad_() for t in _qkv(B, cfg, L, seed=4))
    outs, grads = [], []
    for autocast in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = _run(A.sink_attention_forward, module, q, k, v, spec, position_ids=pos, route="flex")
        assert out.dtype == torch.bfloat16
        outs.append(out.float())
        grads.append(torch.autograd.grad(out.float().square().sum(), [q, k, v]))
    assert ((outs[0] - outs[1]).norm() / outs[0].norm()).item() < 1e-2
    for a, b in zip(*grads):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2


# ---------------------------------------------------------------------------------------------------
# compiled routes: every variant of a training run stays compiled (CPU, dynamo's eager backend)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def compiled_on_cpu(monkeypatch):
    """The CUDA code path's torch.compile calls, on the CPU with dynamo's "eager" backend: the same guards,
    cache entries and recompiles as inductor on CUDA, without generating kernels. Dynamo's own limit is
    restored afterwards; hitting it raises instead of silently running uncompiled."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(dynamo_config, name, getattr(dynamo_config, name))
    monkeypatch.setattr(dynamo_config, "fail_on_recompile_limit_hit", True)
    monkeypatch.setattr(A, "COMPILE_ON_CPU", True)
    monkeypatch.setattr(A, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(A, "_COMPILED", {})
    torch._dynamo.reset()
    A.clear_block_mask_cache()
    yield
    torch._dynamo.reset()
    A.clear_block_mask_cache()


def test_compiled_flex_and_block_masks_survive_every_training_variant(compiled_on_cpu):
    """Sliding and full layers x plain, packed and padded batches x training and no_grad evaluation x
    changing lengths: more compiled versions than dynamo's default limit of 8. Past the limit torch runs
    flex_attention uncompiled (dense [B, H, Q, K] scores) and create_block_mask densely ([B, 1, Q, K]),
    which at 131,072 tokens does not fit any GPU; gptoss_tune.model.attention raises the limit."""
    from torch._dynamo.utils import counters

    counters.clear()
    cfg = _config(window=4, head_dim=16)
    modules = {w: _module(cfg, 1, seed=3) for w in (None, 4)}
    for L in (24, 32, 40):
        for layout in ("plain", "packed", "padded"):
            pos, mask2d = _layout(layout, 2, L)
            q, k, v = (t.detach() for t in _qkv(2, cfg, L, seed=L))  # the CPU flex route has no backward
            spec = A.sink_mask_interface(2, L, L, attention_mask=mask2d)
            for grad in (True, False):
                for window, module in modules.items():
                    with torch.set_grad_enabled(grad):  # a guard of its own, as training vs evaluation
                        out, _ = A.sink_attention_forward(
                            module, q, k, v, spec, sliding_window=window, position_ids=pos, route="flex"
                        )
                    assert out.shape == (2, L, cfg.num_attention_heads, 16)
    # the point of the test: more versions than dynamo's default limit were needed (and none fell back)
    assert counters["stats"]["unique_graphs"] > 8, dict(counters["stats"])
