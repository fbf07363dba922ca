"""OpenAI-shaped messages -> harmony, checked token for token against openai-harmony's own renderer.

Each case builds the expected harmony messages by hand with openai-harmony's types and renders both
with `render_conversation_for_training(..., auto_drop_analysis=False)`.
"""

import pytest
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
)

from gptoss_tune.data.harmony import to_harmony_conversation
from gptoss_tune.data.tokenizer import harmony_encoding
from gptoss_tune.errors import UserError

NO_DROP = RenderConversationConfig(auto_drop_analysis=False)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ORDER = {  # the flat (Responses API) shape is accepted too
    "name": "lookup_order",
    "description": "Find an order by its number.",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "integer"}}, "required": ["order_id"]},
}


def S(effort=None, tools=False):
    c = SystemContent.new()
    if effort:
        c = c.with_reasoning_effort(effort)
    return Message.from_role_and_content(Role.SYSTEM, c)


def D(instructions=None, tools=None):
    c = DeveloperContent.new()
    if instructions:
        c = c.with_instructions(instructions)
    if tools:
        c = c.with_function_tools(tools)
    return Message.from_role_and_content(Role.DEVELOPER, c)


def U(t):
    return Message.from_role_and_content(Role.USER, t)


def A(t):
    return Message.from_role_and_content(Role.ASSISTANT, t).with_channel("analysis")


def F(t):
    return Message.from_role_and_content(Role.ASSISTANT, t).with_channel("final")


def CALL(name, args):
    return (
        Message.from_role_and_content(Role.ASSISTANT, args)
        .with_channel("commentary")
        .with_recipient(f"functions.{name}")
        .with_content_type("<|constrain|>json")
    )


def RESULT(name, t):
    return (
        Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), t)
        .with_channel("commentary")
        .with_recipient("assistant")
    )


WEATHER_TD = ToolDescription.new("get_weather", "Current weather in a city.", WEATHER["function"]["parameters"])
ORDER_TD = ToolDescription.new("lookup_order", "Find an order by its number.", ORDER["parameters"])

CASES = {
    "prompt-completion": (
        dict(messages=[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]),
        [S(), U("What is 2+2?"), F("4")],
    ),
    "system and developer instructions": (
        dict(
            messages=[
                {"role": "system", "content": "You are terse."},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Bonjour"},
            ]
        ),
        [S(), D("You are terse.\n\nAnswer in French."), U("Hello"), F("Bonjour")],
    ),
    "explicit empty final answer": (
        dict(
            messages=[
                {"role": "user", "content": "Say nothing."},
                {"role": "assistant", "thinking": "ok", "content": ""},
            ]
        ),
        [S(), U("Say nothing."), A("ok"), F("")],
    ),
    "reasoning effort low": (
        dict(
            messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            reasoning_effort="low",
        ),
        [S(ReasoningEffort.LOW), U("Hi"), F("Hello")],
    ),
    "reasoning effort high": (
        dict(
            messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            reasoning_effort="HIGH",
        ),
        [S(ReasoningEffort.HIGH), U("Hi"), F("Hello")],
    ),
    "analysis plus final (thinking)": (
        dict(
            messages=[
                {"role": "user", "content": "2+3?"},
                {"role": "assistant", "thinking": "2 plus 3 is 5.", "content": "5"},
            ]
        ),
        [S(), U("2+3?"), A("2 plus 3 is 5."), F("5")],
    ),
    "analysis plus final (reasoning)": (
        dict(
            messages=[
                {"role": "user", "content": "2+3?"},
                {"role": "assistant", "reasoning": "Add them.", "content": "5"},
            ]
        ),
        [S(), U("2+3?"), A("Add them."), F("5")],
    ),
    "multi-turn drops earlier analysis": (
        dict(
            messages=[
                {"role": "user", "content": "u1"},
                {"role": "assistant", "thinking": "t1", "content": "f1"},
                {"role": "user", "content": "u2"},
                {"role": "assistant", "thinking": "t2", "content": "f2"},
                {"role": "user", "content": "u3"},
                {"role": "assistant", "thinking": "t3", "content": "f3"},
            ]
        ),
        [S(), U("u1"), F("f1"), U("u2"), F("f2"), U("u3"), A("t3"), F("f3")],
    ),
    "tool call and its result": (
        dict(
            messages=[
                {"role": "user", "content": "Weather in Oslo?"},
                {
                    "role": "assistant",
                    "thinking": "Need the weather tool.",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 4}'},
                {"role": "assistant", "thinking": "4 degrees.", "content": "It is 4 °C in Oslo."},
            ],
            tools=[WEATHER],
        ),
        [
            S(),
            D(tools=[WEATHER_TD]),
            U("Weather in Oslo?"),
            A("Need the weather tool."),
            CALL("get_weather", '{"city": "Oslo"}'),
            RESULT("get_weather", '{"temp_c": 4}'),
            A("4 degrees."),
            F("It is 4 °C in Oslo."),
        ],
    ),
    "several tools, object arguments, name-matched result, preamble": (
        dict(
            messages=[
                {"role": "system", "content": "You are the support bot."},
                {"role": "user", "content": "Where is order 7?"},
                {
                    "role": "assistant",
                    "content": "Let me look that up.",
                    "tool_calls": [{"function": {"name": "lookup_order", "arguments": {"order_id": 7}}}],
                },
                {"role": "tool", "name": "lookup_order", "content": [{"type": "text", "text": "shipped"}]},
                {"role": "assistant", "content": "It has shipped."},
            ],
            tools=[WEATHER, ORDER],
            reasoning_effort="low",
        ),
        [
            S(ReasoningEffort.LOW),
            D("You are the support bot.", [WEATHER_TD, ORDER_TD]),
            U("Where is order 7?"),
            Message.from_role_and_content(Role.ASSISTANT, "Let me look that up.").with_channel("commentary"),
            CALL("lookup_order", '{"order_id":7}'),
            RESULT("lookup_order", "shipped"),
            F("It has shipped."),
        ],
    ),
    "history tool turn drops its analysis, trained turn keeps analysis before its call": (
        dict(
            messages=[
                {"role": "user", "content": "Weather in Rome?"},
                {
                    "role": "assistant",
                    "thinking": "call it",
                    "tool_calls": [{"id": "a", "function": {"name": "get_weather", "arguments": "{}"}}],
                },
                {"role": "tool", "tool_call_id": "a", "content": "sunny"},
                {"role": "assistant", "thinking": "sunny", "content": "Sunny."},
                {"role": "user", "content": "And Oslo?"},
                {
                    "role": "assistant",
                    "thinking": "call again",
                    "tool_calls": [{"id": "b", "function": {"name": "get_weather", "arguments": "{}"}}],
                },
            ],
            tools=[WEATHER],
        ),
        [
            S(),
            D(tools=[WEATHER_TD]),
            U("Weather in Rome?"),
            CALL("get_weather", "{}"),
            RESULT("get_weather", "sunny"),
            F("Sunny."),
            U("And Oslo?"),
            A("call again"),
            CALL("get_weather", "{}"),
        ],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tokens_equal_openai_harmony(name):
    enc = harmony_encoding()
    kwargs, expected = CASES[name]
    ours = to_harmony_conversation(
        kwargs["messages"], tools=kwargs.get("tools"), reasoning_effort=kwargs.get("reasoning_effort")
    )
    want = enc.render_conversation_for_training(Conversation.from_messages(expected), NO_DROP)
    got = enc.render_conversation_for_training(ours, NO_DROP)
    assert got == want, f"\nours: {enc.decode(got)!r}\nwant: {enc.decode(want)!r}"


def test_single_turn_keeps_its_analysis():
    """openai-harmony's default dropping would delete the chain of thought of the trained turn."""
    enc = harmony_encoding()
    conv = to_harmony_conversation(
        [{"role": "user", "content": "q"}, {"role": "assistant", "thinking": "because", "content": "a"}]
    )
    text = enc.decode(enc.render_conversation_for_training(conv, NO_DROP))
    assert "<|channel|>analysis<|message|>because<|end|>" in text
    assert text.endswith("<|channel|>final<|message|>a<|return|>")


def test_request_for_completion_drops_closed_analysis_keeps_open_tool_turn():
    enc = harmony_encoding()
    # Ends with a user message: the earlier turn ended in a final answer, so its analysis goes.
    conv = to_harmony_conversation(
        [
            {"role": "user", "content": "u1"},
            {"role": "assistant", "thinking": "t1", "content": "f1"},
            {"role": "user", "content": "u2"},
        ]
    )
    want = Conversation.from_messages([S(), U("u1"), F("f1"), U("u2")])
    assert enc.render_conversation_for_completion(
        conv, Role.ASSISTANT, NO_DROP
    ) == enc.render_conversation_for_completion(want, Role.ASSISTANT, NO_DROP)
    # Ends with a tool result: the turn is still going, its analysis stays.
    msgs = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "thinking": "t",
            "tool_calls": [{"id": "x", "function": {"name": "get_weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "x", "content": "rain"},
    ]
    conv = to_harmony_conversation(msgs, tools=[WEATHER])
    want = Conversation.from_messages(
        [S(), D(tools=[WEATHER_TD]), U("Weather?"), A("t"), CALL("get_weather", "{}"), RESULT("get_weather", "rain")]
    )
    got = enc.render_conversation_for_completion(conv, Role.ASSISTANT, NO_DROP)
    assert got == enc.render_conversation_for_completion(want, Role.ASSISTANT, NO_DROP)
    assert enc.decode(got).endswith("<|start|>assistant")


BAD = [
    ([{"role": "bot", "content": "x"}], {}, "messages[0].role: unknown role 'bot'"),
    (
        [{"role": "user", "content": "x"}, {"role": "assistant"}],
        {},
        "messages[1]: an assistant message needs content or tool_calls",
    ),
    (
        [{"role": "user", "content": "x"}, {"role": "assistant", "thinking": "only"}],
        {},
        "messages[1]: an assistant message needs content or tool_calls",
    ),
    ([{"role": "user"}], {}, "messages[0].content: missing"),
    (
        [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c9", "content": "r"}],
        {},
        "messages[1].tool_call_id: 'c9' matches no earlier",
    ),
    (
        [{"role": "user", "content": "x"}, {"role": "tool", "name": "f", "content": "r"}],
        {},
        "messages[1].name: no earlier assistant tool call called 'f'",
    ),
    (
        [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}],
        {},
        "messages[1]: a tool result needs tool_call_id",
    ),
    (
        [{"role": "user", "content": "x"}],
        {"reasoning_effort": "extreme"},
        "reasoning_effort: unknown reasoning effort 'extreme'",
    ),
    (
        [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
        ],
        {},
        "messages[1].tool_calls[0].function.arguments: not valid JSON",
    ),
    (
        [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "bad name", "arguments": "{}"}}]},
        ],
        {},
        "messages[1].tool_calls[0].function.name: 'bad name' is not a valid function name",
    ),
    (
        [{"role": "user", "content": "x"}],
        {"tools": [{"type": "function", "function": {"description": "no name"}}]},
        "tools[0].function.name",
    ),
    (
        [{"role": "user", "content": "x"}, {"role": "assistant", "thinking": "a", "reasoning": "b", "content": "c"}],
        {},
        "not both",
    ),
    ([{"role": "user", "content": {"x": 1}}], {}, "messages[0].content: expected a string or a list of text parts"),
    ([], {}, "messages: the list is empty"),
    ("hello", {}, "messages: expected a list of messages, got a string"),
]


@pytest.mark.parametrize("messages,kwargs,message", BAD)
def test_bad_input_names_where_and_field(messages, kwargs, message):
    with pytest.raises(UserError) as e:
        to_harmony_conversation(messages, where="data/train.jsonl:12: ", **kwargs)
    assert str(e.value).startswith("data/train.jsonl:12: "), str(e.value)
    assert message in str(e.value)
