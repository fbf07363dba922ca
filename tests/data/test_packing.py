"""Packing: rows within max_seq_len, positions restarting per example, and no attention across examples:
the summed loss of a packed row equals the sum of the examples' losses computed one by one."""

import torch

from gptoss_tune.data.batching import IGNORE_INDEX, collate
from gptoss_tune.data.packing import FitStats, fit, pack, to_row
from gptoss_tune.data.rendering import render_example


def test_pack_places_every_example_once_within_max_len():
    examples = [([i] * n, [0] + [1] * (n - 1)) for i, n in enumerate([50, 20, 90, 10, 60, 40, 30, 100])]
    rows = pack(examples, 100, packing=True)
    assert all(len(r["input_ids"]) <= 100 for r in rows)
    assert len(rows) == 4  # 400 tokens, best fit decreasing: 100 | 90+10 | 60+40 | 50+30+20
    seen = sorted(t for r in rows for t in set(r["input_ids"]))
    assert seen == list(range(8))
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"])
        # positions restart exactly where a new example (a new token value here) begins
        for i, p in enumerate(r["position_ids"]):
            assert (p == 0) == (i == 0 or r["input_ids"][i] != r["input_ids"][i - 1])
        assert all(lab == IGNORE_INDEX or lab == t for lab, t in zip(r["labels"], r["input_ids"]))
    assert [len(r["input_ids"]) for r in pack(examples, 100, packing=False)] == [50, 20, 90, 10, 60, 40, 30, 100]


def test_fit_truncates_drops_and_never_keeps_an_empty_target():
    s = FitStats()
    ids, mask = list(range(10)), [0] * 6 + [1] * 4
    assert fit(ids, mask, 10, "truncate", s) == (ids, mask)
    assert fit(ids, mask, 8, "truncate", s) == (ids[:8], mask[:8])
    assert fit(ids, mask, 6, "truncate", s, "x.jsonl:4: ") is None  # target cut away entirely
    assert fit(ids, mask, 8, "drop", s, "x.jsonl:5: ") is None
    assert (s.truncated, s.dropped_no_target, s.dropped_overlong) == (1, 1, 1)
    assert s.dropped_where[0].startswith("x.jsonl:4: no trained token within the first 6 tokens")
    assert s.dropped_where[1].startswith("x.jsonl:5: 10 tokens, longer than max_seq_len 8")


def _examples():
    return [
        render_example({"prompt": "Hi", "completion": "Hello there."}),
        render_example(
            {
                "messages": [
                    {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "thinking": "Add.", "content": "4"},
                ]
            }
        ),
        render_example({"prompt": "Name a colour.", "completion": "Blue."}),
    ]


def _summed_loss(model, batch):
    batch = {k: v for k, v in batch.items() if k != "token_mask"}
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits.float()
    # transformers' causal-LM loss, summed: position t predicts labels[t + 1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def test_packed_loss_equals_sum_of_separate_losses(tiny_ckpt):
    from gptoss_tune import load_model

    # The default attention (gptoss_sink) reads example boundaries from the restarting position_ids.
    model = load_model(tiny_ckpt).eval()  # sliding_window 4: both layer types see several examples
    exs = [(r.input_ids, r.loss_mask) for r in _examples()]
    separate = sum(_summed_loss(model, collate([to_row([e])], packing=True)) for e in exs)
    rows = pack(exs, 1024, packing=True)
    assert len(rows) == 1 and rows[0]["position_ids"].count(0) == 3
    packed = _summed_loss(model, collate(rows, packing=True))
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-4)
    # and padded to a longer length (padding is one more pseudo-example with labels -100)
    padded = _summed_loss(model, collate(rows, packing=True, pad_to=len(rows[0]["input_ids"]) + 7))
    torch.testing.assert_close(padded, separate, rtol=1e-5, atol=1e-4)

    # The check can fail: transformers' own "eager" attention, given the same packed batch, attends
    # across the examples (GptOssModel does not hand position_ids to its mask builders).
    eager = load_model(tiny_ckpt, attn_implementation="eager").eval()
    assert abs(_summed_loss(eager, collate(rows, packing=True)) - separate) > 1e-2

    # Padding mode: one example per row, attention_mask over the padding.
    batch = collate(pack(exs, 1024, packing=False), packing=False)
    assert "attention_mask" in batch
    torch.testing.assert_close(_summed_loss(model, batch), separate, rtol=1e-5, atol=1e-4)
