"""One training example -> harmony token ids and the loss mask (1 where the loss falls).

Formats (one JSON object per example; see docs/data.md):
    {"prompt": "...", "completion": "..."}                 the completion is the assistant's final answer
    {"prompt": [messages], "completion": [messages]}       OpenAI-shaped messages (either side may be a string)
    {"messages": [messages]}                               chat
each optionally with "reasoning_effort" (low/medium/high) and "tools" (OpenAI function schemas), which
override the recipe's.

What is trained (the model's own output, and nothing else):
- Which assistant messages: a prompt-completion example trains its completion; a chat example trains its
  last assistant turn (train_on "last": the assistant and tool messages after the last user message) or
  every assistant turn (train_on "all"). Tool results, user, system and developer tokens never are.
- Within a trained assistant message, everything after the `<|start|>assistant` that generation is
  prompted with: the header the model writes itself (` to=functions.NAME`, `<|channel|>`, the channel,
  ` <|constrain|>json`, `<|message|>`), the content and the terminator. `<|return|>` ends the final answer
  that ends the example, `<|call|>` a tool call, `<|end|>` an analysis message or a preamble.
- `<|start|>assistant` itself is trained only where the model writes it: right after its own analysis or
  preamble message ended with `<|end|>` (generation stops only at `<|return|>` and `<|call|>`). After a
  user message, a tool result or a `<|call|>`, the serving side writes it (render_conversation_for_completion
  ends with it), so it is prompt.
- History turns (train_on "all"): harmony drops a finished turn's analysis, and a final message in
  history ends with `<|end|>`. The model never writes `<|end|>` after a final answer (it writes
  `<|return|>`, which the caller rewrites for history), so that `<|end|>` is not trained: training it
  is exactly the `<|return|>`/`<|end|>` confusion that makes tuned models run on. Where the analysis in
  front of a message was dropped, that message's header is not trained either: the model wrote
  `<|channel|>analysis` there, not the `<|channel|>final` that history shows, and training it would
  teach the model to stop reasoning. Its content and terminator are trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from openai_harmony import Conversation, DeveloperContent, HarmonyError, RenderConversationConfig, TextContent

from gptoss_tune.data.harmony import (
    ROLES,
    HarmonyMessage,
    _kind,
    check_strings,
    convert_messages,
    last_turn_start,
)
from gptoss_tune.data.settings import MAX_UNBROKEN_CHARS
from gptoss_tune.data.tokenizer import harmony_encoding
from gptoss_tune.errors import UserError

START, END, MESSAGE, RETURN, CALL = 200006, 200007, 200008, 200002, 200012
ASSISTANT = 173781  # "assistant" after <|start|>: one token in o200k_harmony
NO_DROP = RenderConversationConfig(auto_drop_analysis=False)


@dataclass
class RenderedExample:
    input_ids: list[int]
    loss_mask: list[int]  # same length; 1 where the loss falls (on predicting this token)
    empty_target: bool = False  # the trained messages hold no text (an empty answer); the report counts these

    @property
    def trained_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass
class ParsedExample:
    messages: list[dict]
    names: list[str]  # the field path of each message, for errors
    tools: Any
    reasoning_effort: Any
    trained_from: int  # index of the first message of the target part
    prompt_completion: bool


def parse_example(
    example: Any, *, reasoning_effort: str | None = None, tools: list | None = None, where: str = ""
) -> ParsedExample:
    """Recognise the format of one example and return its messages and where its target starts."""
    if not isinstance(example, dict):
        raise UserError(f"{where}expected a JSON object with messages, or prompt and completion; got {_kind(example)}")
    effort = example["reasoning_effort"] if example.get("reasoning_effort") is not None else reasoning_effort
    ex_tools = example["tools"] if example.get("tools") is not None else tools
    has_pc = "prompt" in example or "completion" in example
    if "messages" in example and example["messages"] is not None:
        if has_pc and (example.get("prompt") is not None or example.get("completion") is not None):
            raise UserError(f"{where}give either messages, or prompt and completion, not both")
        messages = example["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}messages: expected a non-empty list of messages, got {_kind(messages)}")
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "assistant":
            role = last.get("role") if isinstance(last, dict) else None
            if isinstance(last, dict) and role not in ROLES:
                raise UserError(
                    f"{where}messages[{len(messages) - 1}].role: unknown role {role!r}; expected one of {', '.join(ROLES)}"
                )
            raise UserError(
                f"{where}messages[{len(messages) - 1}]: the last message is {_what(role)}; "
                f"a training example must end with an assistant message (its target)"
            )
        return ParsedExample(
            messages,
            [f"messages[{i}]" for i in range(len(messages))],
            ex_tools,
            effort,
            last_turn_start(messages),
            False,
        )
    if has_pc:
        for key in ("prompt", "completion"):
            if example.get(key) is None:
                raise UserError(f"{where}{key}: missing (a prompt-completion example needs both prompt and completion)")
        prompt = _side(example["prompt"], "user", "prompt", where)
        completion = _side(example["completion"], "assistant", "completion", where)
        first, last = completion[0], completion[-1]
        if not isinstance(first, dict) or first.get("role") != "assistant":
            raise UserError(
                f"{where}completion[0]: a completion must start with an assistant message, not {_what(_role(first))}"
            )
        if not isinstance(last, dict) or last.get("role") != "assistant":
            raise UserError(
                f"{where}completion[{len(completion) - 1}]: a completion must end with an assistant message, not {_what(_role(last))}"
            )
        names = _names(example["prompt"], "prompt", len(prompt)) + _names(
            example["completion"], "completion", len(completion)
        )
        return ParsedExample(prompt + completion, names, ex_tools, effort, len(prompt), True)
    keys = ", ".join(sorted(map(str, example))) or "none"
    raise UserError(
        f'{where}expected {{"messages": [...]}} or {{"prompt": ..., "completion": ...}}; the keys are {keys}'
    )


def render_example(
    example: Any,
    *,
    reasoning_effort: str | None = None,
    tools: list | None = None,
    train_on: Literal["last", "all"] = "last",
    where: str = "",
    max_unbroken_chars: int | None = MAX_UNBROKEN_CHARS,
    limit_name: str = "data.max_unbroken_chars",
) -> RenderedExample:
    """Render one example (any accepted format) to token ids and its loss mask, unpacked and untruncated.

    Refuses (UserError naming the field) what the renderer cannot take or takes quadratic time over
    (harmony.check_strings; `max_unbroken_chars` is its limit, named `limit_name` in messages), and an
    example with no text at all."""
    check_strings(example, where, max_unbroken_chars=max_unbroken_chars, limit_name=limit_name)
    p = parse_example(example, reasoning_effort=reasoning_effort, tools=tools, where=where)
    hms = convert_messages(
        p.messages,
        tools=p.tools,
        reasoning_effort=p.reasoning_effort,
        where=where,
        keep_analysis_from=p.trained_from,
        names=p.names,
    )
    target = [h for h in hms if h.source >= p.trained_from]
    empty_target = not any(_has_text(h) for h in target)
    if empty_target and not any(_has_text(h) for h in hms if 0 <= h.source < p.trained_from):
        what = "prompt and completion are" if p.prompt_completion else "every message is"
        raise UserError(f"{where}{what} empty: there is nothing to learn from this example; remove it")
    trained_from = 0 if (train_on == "all" and not p.prompt_completion) else p.trained_from
    r = render_with_mask(hms, trained_from=trained_from, where=where)
    r.empty_target = empty_target
    return r


def _has_text(h: HarmonyMessage) -> bool:
    """Whether a message says anything: text that is not only whitespace, instructions or tools, or a tool call."""
    if h.is_tool_call:
        return True
    for c in h.message.content:
        if isinstance(c, TextContent) and c.text.strip():
            return True
        if isinstance(c, DeveloperContent) and ((c.instructions or "").strip() or c.tools):
            return True
    return False


def render_with_mask(hms: list[HarmonyMessage], *, trained_from: int, where: str = "") -> RenderedExample:
    """Tokens of a conversation ending with an assistant message, with the loss on the assistant
    messages from input index `trained_from` on (module docstring: which of their tokens)."""
    enc = harmony_encoding()
    try:
        # Training rendering: the final answer that ends the conversation ends with <|return|>.
        ids = enc.render_conversation_for_training(Conversation.from_messages([h.message for h in hms]), NO_DROP)
    except (HarmonyError, ValueError) as e:  # ValueError: JSON it cannot take (check_strings refuses what we know)
        raise UserError(f"{where}openai-harmony cannot render this example: {_first_line(e)}") from None
    except BaseException as e:
        # A Rust panic inside openai-harmony arrives as pyo3's PanicException, a BaseException.
        if type(e).__name__ != "PanicException":
            raise
        raise UserError(
            f"{where}openai-harmony crashed rendering this example ({_first_line(e)}); shorten or split its longest text"
        ) from None
    # Every message starts with <|start|>, and text never encodes to a special token (openai-harmony
    # encodes "<|start|>" inside content as plain text), so the starts split the messages exactly.
    starts = [i for i, t in enumerate(ids) if t == START]
    if len(starts) != len(hms):
        raise RuntimeError(f"{where}rendered {len(starts)} messages for {len(hms)}; openai-harmony's layout changed")
    bounds = starts + [len(ids)]
    mask = [0] * len(ids)
    for k, h in enumerate(hms):
        if not h.is_assistant or h.source < trained_from:
            continue
        s, e = bounds[k], bounds[k + 1]
        if ids[s + 1] != ASSISTANT:
            raise RuntimeError(f"{where}an assistant message renders as {ids[s : s + 3]}; expected <|start|>assistant")
        prev = hms[k - 1]
        model_continues = prev.is_assistant and (
            prev.channel == "analysis" or (prev.channel == "commentary" and not prev.is_tool_call)
        )
        first = s if model_continues else s + 2  # <|start|>assistant: the model's own only after its own <|end|>
        if h.after_dropped_analysis:
            first = ids.index(MESSAGE, s, e) + 1  # the header shown is not what the model wrote there
        last = e
        if h.channel == "final" and ids[e - 1] == END:
            last = e - 1  # a final in history: the model writes <|return|>, never <|end|>
        for i in range(first, last):
            mask[i] = 1
    return RenderedExample(ids, mask)


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def _side(value: Any, role: str, key: str, where: str) -> list:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value:
        return value
    raise UserError(f"{where}{key}: expected a string or a non-empty list of messages, got {_kind(value)}")


def _names(value: Any, key: str, n: int) -> list[str]:
    return [key] if isinstance(value, str) else [f"{key}[{i}]" for i in range(n)]


def _role(m: Any) -> Any:
    return m.get("role") if isinstance(m, dict) else None


def _what(role: Any) -> str:
    return f"a {role!r} message" if isinstance(role, str) else "not a message"
