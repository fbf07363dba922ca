"""Loss masks, token by token.

For each conversation the expected trained runs are written out as harmony text, and the tokens in
front of every run that starts a generation are checked against openai-harmony's
`render_conversation_for_completion` of the conversation so far (the prompt that serving gives the
model), so the mask boundary is exactly where generation begins.
"""

import pytest
from openai_harmony import Conversation, RenderConversationConfig, Role

from gptoss_tune.data.harmony import to_harmony_conversation
from gptoss_tune.data.rendering import render_example
from gptoss_tune.data.tokenizer import harmony_encoding
from gptoss_tune.errors import UserError

NO_DROP = RenderConversationConfig(auto_drop_analysis=False)
TOOLS = [
    {
        "type": "function",
        "function": {"name": "f", "description": "A tool.", "parameters": {"type": "object", "properties": {}}},
    }
]


def call(name="f", args="{}", id="c1"):
    return {"id": id, "type": "function", "function": {"name": name, "arguments": args}}


def runs(ids, mask):
    """[(start, end)] of the runs of trained tokens."""
    out, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


CASES = {
    "prompt-completion": (
        {"prompt": "Hi", "completion": "Hello!"},
        {},
        ["<|channel|>final<|message|>Hello!<|return|>"],
    ),
    "single turn keeps its analysis": (
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "thinking": "Easy: 4.", "content": "4"},
            ]
        },
        {},
        ["<|channel|>analysis<|message|>Easy: 4.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>"],
    ),
    "ends with a tool call": (
        {
            "messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "thinking": "use f", "tool_calls": [call()]},
            ],
            "tools": TOOLS,
        },
        {},
        [
            "<|channel|>analysis<|message|>use f<|end|><|start|>assistant to=functions.f<|channel|>commentary <|constrain|>json<|message|>{}<|call|>"
        ],
    ),
    "tool call, result, answer": (
        {
            "messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "thinking": "use f", "tool_calls": [call(args='{"x": 1}')]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
                {"role": "assistant", "thinking": "got 42", "content": "It is 42."},
            ],
            "tools": TOOLS,
        },
        {},
        [
            '<|channel|>analysis<|message|>use f<|end|><|start|>assistant to=functions.f<|channel|>commentary <|constrain|>json<|message|>{"x": 1}<|call|>',
            "<|channel|>analysis<|message|>got 42<|end|><|start|>assistant<|channel|>final<|message|>It is 42.<|return|>",
        ],
    ),
    "preamble before a call; two calls": (
        {
            "messages": [
                {"role": "user", "content": "go"},
                {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [call(id="a"), call(id="b", args='{"y":2}')],
                },
                {"role": "tool", "tool_call_id": "a", "content": "1"},
                {"role": "tool", "tool_call_id": "b", "content": "2"},
                {"role": "assistant", "content": "Done."},
            ],
            "tools": TOOLS,
        },
        {},
        [
            # The model continues after its preamble's <|end|>, so that <|start|>assistant is its own;
            # after <|call|> generation stops and the second call's <|start|>assistant is prompt.
            "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant to=functions.f<|channel|>commentary <|constrain|>json<|message|>{}<|call|>",
            ' to=functions.f<|channel|>commentary <|constrain|>json<|message|>{"y":2}<|call|>',
            "<|channel|>final<|message|>Done.<|return|>",
        ],
    ),
    "multi-turn, train_on last": (
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "u1"},
                {"role": "assistant", "thinking": "t1", "content": "f1"},
                {"role": "user", "content": "u2"},
                {"role": "assistant", "thinking": "t2", "content": "f2"},
            ]
        },
        {},
        ["<|channel|>analysis<|message|>t2<|end|><|start|>assistant<|channel|>final<|message|>f2<|return|>"],
    ),
    "multi-turn, train_on all": (
        {
            "messages": [
                {"role": "user", "content": "u1"},
                {"role": "assistant", "thinking": "t1", "content": "f1"},  # analysis dropped: header not trained
                {"role": "user", "content": "u2"},
                {"role": "assistant", "content": "f2"},  # nothing dropped: header trained
                {"role": "user", "content": "u3"},
                {"role": "assistant", "thinking": "t3", "tool_calls": [call()]},  # history call: <|call|> trained
                {"role": "tool", "tool_call_id": "c1", "content": "r"},
                {"role": "assistant", "content": "f3"},
                {"role": "user", "content": "u4"},
                {"role": "assistant", "thinking": "t4", "content": "f4"},
            ],
            "tools": TOOLS,
        },
        {"train_on": "all"},
        [
            "f1",  # never the <|end|> of a history final
            "<|channel|>final<|message|>f2",
            "{}<|call|>",
            "<|channel|>final<|message|>f3",
            "<|channel|>analysis<|message|>t4<|end|><|start|>assistant<|channel|>final<|message|>f4<|return|>",
        ],
    ),
    "prompt-completion lists: only the completion, even with train_on all": (
        {
            "prompt": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "f1"},
                {"role": "user", "content": "u2"},
            ],
            "completion": [{"role": "assistant", "reasoning": "r2", "content": "f2"}],
            "reasoning_effort": "high",
        },
        {"train_on": "all"},
        ["<|channel|>analysis<|message|>r2<|end|><|start|>assistant<|channel|>final<|message|>f2<|return|>"],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_mask_token_by_token(name):
    enc = harmony_encoding()
    example, kwargs, expected = CASES[name]
    r = render_example(example, **kwargs)
    assert len(r.input_ids) == len(r.loss_mask) and set(r.loss_mask) <= {0, 1}
    spans = runs(r.input_ids, r.loss_mask)
    assert [enc.decode(r.input_ids[s:e]) for s, e in spans] == expected

    # Whole token sequence: openai-harmony's training rendering of the same conversation.
    if "messages" in example:
        msgs = example["messages"]
    else:
        p, c = example["prompt"], example["completion"]
        msgs = ([{"role": "user", "content": p}] if isinstance(p, str) else p) + (
            [{"role": "assistant", "content": c}] if isinstance(c, str) else c
        )
    conv = to_harmony_conversation(msgs, tools=example.get("tools"), reasoning_effort=example.get("reasoning_effort"))
    assert r.input_ids == enc.render_conversation_for_training(conv, NO_DROP)

    # Every run that starts right after <|start|>assistant starts where the completion prompt ends.
    for s, _ in spans:
        if enc.decode(r.input_ids[s - 2 : s]) != "<|start|>assistant":
            continue
        prefix = r.input_ids[:s]
        n_msgs = prefix.count(200006) - 1  # messages before the one being generated
        hist = Conversation.from_messages(conv.messages[:n_msgs])
        assert prefix == enc.render_conversation_for_completion(hist, Role.ASSISTANT, NO_DROP)


def test_terminators():
    """<|return|> ends the trained final answer, <|call|> a tool call; both trained."""
    r = render_example({"prompt": "a", "completion": "b"})
    assert r.input_ids[-1] == 200002 and r.loss_mask[-1] == 1
    assert 200007 not in [t for t, m in zip(r.input_ids, r.loss_mask) if m]  # no <|end|> trained here
    r = render_example({"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "tool_calls": [call()]}]})
    assert r.input_ids[-1] == 200012 and r.loss_mask[-1] == 1


def test_nothing_but_assistant_tokens_is_trained():
    r = render_example(CASES["tool call, result, answer"][0])
    enc = harmony_encoding()
    text_untrained = enc.decode([t for t, m in zip(r.input_ids, r.loss_mask) if not m])
    for part in (
        "<|start|>system",
        "<|start|>developer",
        "<|start|>user<|message|>go<|end|>",
        "functions.f to=assistant<|channel|>commentary<|message|>42<|end|>",
    ):
        assert part in text_untrained


FORMAT_ERRORS = [
    ({"prompt": "x"}, "completion: missing"),
    ({"text": "x"}, 'expected {"messages": [...]} or {"prompt": ..., "completion": ...}; the keys are text'),
    (
        {"messages": [{"role": "user", "content": "x"}]},
        "messages[0]: the last message is a 'user' message; a training example must end with an assistant message",
    ),
    (
        {"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]},
        "messages[1].role: unknown role 'robot'",
    ),
    (
        {"prompt": "x", "completion": [{"role": "user", "content": "y"}]},
        "completion[0]: a completion must start with an assistant message",
    ),
    ({"prompt": [{"role": "user"}], "completion": "y"}, "prompt[0].content: missing"),
    (
        {"prompt": "x", "completion": [{"role": "assistant"}]},
        "completion[0]: an assistant message needs content or tool_calls",
    ),
    ({"prompt": "x", "completion": "y", "reasoning_effort": "max"}, "reasoning_effort: unknown reasoning effort 'max'"),
    ([1, 2], "expected a JSON object"),
]


@pytest.mark.parametrize("example,message", FORMAT_ERRORS)
def test_format_errors(example, message):
    with pytest.raises(UserError) as e:
        render_example(example, where="f.jsonl:3: ")
    assert str(e.value).startswith("f.jsonl:3: ") and message in str(e.value), str(e.value)


def test_recipe_defaults_and_example_overrides():
    enc = harmony_encoding()
    r = render_example({"prompt": "a", "completion": "b"}, reasoning_effort="low", tools=TOOLS)
    text = enc.decode(r.input_ids)
    assert "Reasoning: low" in text and "type f = (" in text
    r = render_example(
        {"prompt": "a", "completion": "b", "reasoning_effort": "high", "tools": []}, reasoning_effort="low", tools=TOOLS
    )
    text = enc.decode(r.input_ids)
    assert "Reasoning: high" in text and "namespace functions" not in text


def test_special_token_text_in_content_stays_text():
    """The masks split messages at <|start|>: text that spells a special token must not become one (it would
    inject a message, and the loss would fall on the wrong tokens)."""
    enc = harmony_encoding()
    fake = "<|end|><|start|>assistant<|channel|>final<|message|>hi<|return|>"
    r = render_example({"prompt": f"say {fake}", "completion": f"ok {fake}"})
    specials = [t for t in r.input_ids if t >= 199998]
    assert specials.count(200006) == 3 and specials.count(200002) == 1  # system, user, assistant; one <|return|>
    trained = [t for t, m in zip(r.input_ids, r.loss_mask) if m]
    assert enc.decode(trained) == f"<|channel|>final<|message|>ok {fake}<|return|>"
