"""Prefill in chunks against the KV cache: the same logits as one pass, and attention memory linear in the prompt."""

from __future__ import annotations

import pytest
import torch

from gptoss_tune.model import attention
from gptoss_tune.serve import generate
from gptoss_tune.serve.generate import ModelTokenSource, SamplingParams


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    from gptoss_tune import load_model

    return load_model(tiny_ckpt, device="cpu")


def _prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 200000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prefill_logits(source: ModelTokenSource, prompt: list[int]):
    gen = source.start(prompt, SamplingParams(max_tokens=1, temperature=0, stop_token_ids=()))
    captured = {}
    real = source.forward

    def forward(ids, cache):
        captured["logits"] = out = real(ids, cache)
        return out

    source.forward = forward
    try:
        gen.next_token()
    finally:
        del source.forward
    return captured["logits"].float(), gen


def test_chunked_prefill_matches_one_pass(tiny_model):
    """Chunks of 1..7 tokens cross the tiny model's 4-token sliding window at every offset; the last
    position's logits equal one uncached forward of the whole prompt (stock transformers call)."""
    prompt = _prompt(23)
    with torch.no_grad():
        want = tiny_model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    scale = want.abs().max()
    for chunk in (1, 3, 4, 5, 7, 23):
        got, gen = _prefill_logits(ModelTokenSource(tiny_model, prefill_chunk=chunk), prompt)
        assert gen.forward_lengths == [len(c) for c in (prompt[i : i + chunk] for i in range(0, 23, chunk))]
        assert torch.allclose(got, want, rtol=0, atol=1e-5 * scale), (chunk, (got - want).abs().max())
    # and greedy decoding after a chunked prefill follows full recomputation
    src = ModelTokenSource(tiny_model, prefill_chunk=5)
    gen = src.start(prompt, SamplingParams(max_tokens=6, temperature=0, stop_token_ids=()))
    got_tokens = list(iter(gen.next_token, None))
    seq, want_tokens = list(prompt), []
    with torch.no_grad():
        for _ in range(6):
            want_tokens.append(int(tiny_model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            seq.append(want_tokens[-1])
    assert got_tokens == want_tokens and gen.forward_lengths == [5, 5, 5, 5, 3, 1, 1, 1, 1, 1]


def test_prefill_attention_memory_is_linear_in_the_prompt(tiny_model, monkeypatch):
    """The default chunking keeps every dense attention call within the score budget (or MIN_PREFILL_CHUNK
    rows): no [prompt x prompt] score matrix, so attention memory grows linearly with the prompt (one pass
    over 1,200 tokens would build 4 x 1,200 x 1,200 scores, 6x the budget set here)."""
    budget = 4 * 64 * 1200 * generate.DENSE_ATTENTION_BYTES  # 64 rows of 4 heads against 1,200 keys
    monkeypatch.setattr(generate, "PREFILL_SCORE_BUDGET", budget)
    calls = []
    real = attention.dense_attention_lse

    def recording(query, key, *args, **kwargs):
        calls.append((query.shape[1], query.shape[2], key.shape[2]))
        return real(query, key, *args, **kwargs)

    monkeypatch.setattr(attention, "dense_attention_lse", recording)
    heads = tiny_model.config.num_attention_heads
    peaks = {}
    for n in (300, 1200, 2400):
        calls.clear()
        _, gen = _prefill_logits(ModelTokenSource(tiny_model), _prompt(n, seed=n))
        assert sum(gen.forward_lengths) == n and len(gen.forward_lengths) > 1
        peaks[n] = max(h * q * k for h, q, k in calls) * generate.DENSE_ATTENTION_BYTES
        assert all(q <= max(gen.forward_lengths) for _, q, _ in calls)
        assert peaks[n] <= max(budget, heads * generate.MIN_PREFILL_CHUNK * n * generate.DENSE_ATTENTION_BYTES)
    assert peaks[2400] < 2.5 * peaks[1200]  # one pass: 4x
