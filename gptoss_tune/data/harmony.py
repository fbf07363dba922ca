"""OpenAI-shaped chat messages -> an openai-harmony Conversation.

Used by training (every data format ends up here) and by the server (requests), so that a conversation
is rendered the same way in both. Input, in the shape of OpenAI's chat API:

    {"role": "system" | "developer", "content": "..."}     instructions -> the harmony developer message
    {"role": "user", "content": "..."}
    {"role": "assistant", "content": "...",                  final answer -> channel `final`
     "thinking" | "reasoning": "...",                        chain of thought -> channel `analysis`
     "tool_calls": [{"id": "c1", "type": "function",
                     "function": {"name": "f", "arguments": "{...}" | {...}}}]}
    {"role": "tool", "tool_call_id": "c1" [, "name": "f"], "content": "..."}

`content` may also be a list of text parts ([{"type": "text", "text": ...}]). Tools are OpenAI function
schemas ({"type": "function", "function": {"name", "description", "parameters"}}, or the flat
{"name", "description", "parameters"}).

The harmony messages produced (see docs/gpt-oss-facts.md):
- a system message: harmony's default identity, `Reasoning: low|medium|high`, the valid channels;
- a developer message `# Instructions` (system and developer messages at the start, joined by a blank
  line) and `# Tools` with the functions as `namespace functions`, when there is either;
- per assistant message, in this order: analysis (thinking), then either a final message (content) or,
  when it calls tools, an optional commentary preamble (content) and one commentary message per call,
  addressed `to=functions.NAME` with content type `<|constrain|>json`;
- a tool result as a message from `functions.NAME` to `assistant` on commentary.

Harmony's chain-of-thought rule is applied here, not by openai-harmony (its automatic dropping in
0.0.8 removes only the analysis before the conversation's FIRST final message, which deletes the chain
of thought of a single-turn training example and keeps stale analysis in later turns): an analysis
message is dropped when a final message follows it in an earlier turn; the last assistant turn, when
the conversation ends with one (a training target), keeps all of its analysis, including analysis
before a tool call. Render the result with `RenderConversationConfig(auto_drop_analysis=False)`.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import regex
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
)

from gptoss_tune.data.settings import MAX_DEPTH, MAX_UNBROKEN_CHARS
from gptoss_tune.errors import UserError

ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
JSON_CONTENT_TYPE = "<|constrain|>json"
# OpenAI's rule for function names; it also keeps the harmony header (`to=functions.NAME`) parseable.
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_SURROGATE = re.compile(r"[\ud800-\udfff]")
# A piece of the o200k split pattern never holds a digit. It is whitespace; or letters (marks
# included) with at most one character before them and a contraction ('s, 'll, ...) after; or
# punctuation with at most a space before and line breaks or slashes after. So no piece is more than 4
# characters longer than the longest run of one of these classes (line breaks count with punctuation
# too). The lookbehinds start a match only where a run starts, so the search is linear in the text.
_RUN_CLASSES = {
    "whitespace characters": r"\s",
    "letters": r"[\p{L}\p{M}]",
    "punctuation characters and line breaks": r"(?:[^\s\p{L}\p{N}]|[\r\n])",
}
_RUN_REST = {kind: regex.compile(f"{cls}*") for kind, cls in _RUN_CLASSES.items()}


@functools.lru_cache(maxsize=8)
def _long_runs(limit: int):
    return regex.compile(
        "|".join(f"(?P<g{i}>(?<!{cls}){cls}{{{limit + 1}}})" for i, cls in enumerate(_RUN_CLASSES.values()))
    )


def check_strings(
    value: Any,
    where: str = "",
    *,
    max_unbroken_chars: int | None = MAX_UNBROKEN_CHARS,
    limit_name: str = "data.max_unbroken_chars",
) -> None:
    """Refuse, with a UserError naming the field, what openai-harmony cannot render or renders in
    quadratic time: nesting deeper than MAX_DEPTH, a lone UTF-16 surrogate (a JSON escape such as
    \ud800 without its pair), and a string with more than `max_unbroken_chars` letters, punctuation or
    whitespace characters in a row (None: no limit). Walks `value` (a parsed example or request, keys
    included) without recursion."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        x, path, depth = stack.pop()
        if isinstance(x, str):
            _check_string(x, f"{where}{path or 'the example'}", max_unbroken_chars, limit_name)
        elif isinstance(x, (dict, list)):
            if depth > MAX_DEPTH:
                raise UserError(
                    f"{where}{path or 'the example'}: nested more than {MAX_DEPTH} levels deep (objects and lists "
                    f"within each other); flatten it"
                )
            items = x.items() if isinstance(x, dict) else enumerate(x)
            for k, v in reversed(list(items)):
                if isinstance(k, str):
                    sub = f"{path}.{k}" if path else k
                    _check_string(k, f"{where}{sub} (the key)", max_unbroken_chars, limit_name)
                else:
                    sub = f"{path}[{k}]"
                stack.append((v, sub, depth + 1))


def _check_string(s: str, field: str, limit: int | None, limit_name: str) -> None:
    m = _SURROGATE.search(s)
    if m:
        raise UserError(
            f"{field}: a lone UTF-16 surrogate (\\u{ord(m.group()):04x}) at character {m.start() + 1} is not text; "
            f"JSON writes a character beyond U+FFFF as a pair of escapes (\\ud83d\\ude00): fix what wrote this"
        )
    if limit is None or len(s) <= limit:
        return
    m = _long_runs(limit).search(s)
    if m:
        kind = list(_RUN_CLASSES)[int(m.lastgroup[1:])]
        n = _RUN_REST[kind].match(s, m.start()).end() - m.start()
        raise UserError(
            f"{field}: {n:,} {kind} in a row from character {m.start() + 1} (more than {limit_name} = {limit:,}); "
            f"openai-harmony's tokenizer takes time quadratic in such a run (30,000 CJK characters: seconds, "
            f"240,000: minutes): break the text up, or raise {limit_name}"
        )


@dataclass
class HarmonyMessage:
    """One harmony message and the index of the input message it came from (-1: the system message)."""

    message: Message
    source: int
    # True when harmony's rule dropped the analysis message that came right before this one: its header
    # (`<|channel|>final...`) then no longer shows what the model wrote at that point.
    after_dropped_analysis: bool = False

    @property
    def is_assistant(self) -> bool:
        return self.message.author.role == Role.ASSISTANT

    @property
    def channel(self) -> str | None:
        return self.message.channel

    @property
    def is_tool_call(self) -> bool:
        return self.is_assistant and self.message.recipient is not None


def to_harmony_conversation(
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    reasoning_effort: str | None = None,
    where: str = "",
) -> Conversation:
    """Convert OpenAI-shaped messages (and tools, reasoning effort) into a harmony Conversation.

    Works for a training example (ends with an assistant message, whose turn keeps its analysis) and for
    a request to complete (ends with a user or tool message). Invalid input raises UserError whose
    message starts with `where` and names the field.
    """
    hms = convert_messages(
        messages,
        tools=tools,
        reasoning_effort=reasoning_effort,
        where=where,
        keep_analysis_from=last_turn_start(messages),
    )
    return Conversation.from_messages([h.message for h in hms])


def last_turn_start(messages: list[dict]) -> int:
    """Index of the first message of the trailing assistant turn (assistant and tool messages after the
    last system/developer/user message); len(messages) when the conversation does not end with one."""
    if not isinstance(messages, list):
        return 0
    i = len(messages)
    while i > 0 and isinstance(messages[i - 1], dict) and messages[i - 1].get("role") in ("assistant", "tool"):
        i -= 1
    # A turn starts at its first assistant message (a stray tool message cannot start one).
    while i < len(messages) and messages[i].get("role") != "assistant":
        i += 1
    if i < len(messages) and messages[-1].get("role") != "assistant":
        return len(messages)  # the turn is still in progress (ends with a tool result): nothing is trained
    return i


def convert_messages(
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    reasoning_effort: str | None = None,
    where: str = "",
    keep_analysis_from: int | None = None,
    field: str = "messages",
    names: list[str] | None = None,
) -> list[HarmonyMessage]:
    """The harmony messages for `messages`, each with the index of its input message.

    Analysis messages from input messages before `keep_analysis_from` (default: all) are dropped when a
    final message from before `keep_analysis_from` follows them. Errors name `field` (the list) and
    `names[i]` (message i; default `messages[i]`).
    """
    if not isinstance(messages, list):
        raise UserError(f"{where}{field}: expected a list of messages, got {_kind(messages)}")
    if not messages:
        raise UserError(f"{where}{field}: the list is empty")
    names = names or [f"{field}[{i}]" for i in range(len(messages))]
    keep_from = len(messages) if keep_analysis_from is None else keep_analysis_from

    system = SystemContent.new()
    effort = parse_reasoning_effort(reasoning_effort, f"{where}reasoning_effort")
    if effort is not None:
        system = system.with_reasoning_effort(effort)
    out = [HarmonyMessage(Message.from_role_and_content(Role.SYSTEM, system), -1)]

    functions = parse_tools(tools, where)
    # Instructions: the system/developer messages before the first user/assistant message.
    n_head = 0
    instructions = []
    while (
        n_head < len(messages)
        and isinstance(messages[n_head], dict)
        and messages[n_head].get("role") in ("system", "developer")
    ):
        instructions.append(_text(messages[n_head], f"{where}{names[n_head]}.content", required=True))
        n_head += 1
    if instructions or functions:
        dev = DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions("\n\n".join(instructions))
        if functions:
            dev = dev.with_function_tools(functions)
        out.append(HarmonyMessage(Message.from_role_and_content(Role.DEVELOPER, dev), 0))

    calls: dict[str, str] = {}  # tool_call_id -> function name
    called: list[str] = []  # function names in call order, for tool results that give only a name
    for i in range(n_head, len(messages)):
        m = messages[i]
        at = f"{where}{names[i]}"
        if not isinstance(m, dict):
            raise UserError(f"{at}: expected a message object, got {_kind(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise UserError(f"{at}.role: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if role in ("system", "developer"):
            # Later instructions stay where they are, as a developer message.
            text = _text(m, f"{at}.content", required=True)
            out.append(
                HarmonyMessage(
                    Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(text)), i
                )
            )
        elif role == "user":
            out.append(
                HarmonyMessage(Message.from_role_and_content(Role.USER, _text(m, f"{at}.content", required=True)), i)
            )
        elif role == "assistant":
            out.extend(HarmonyMessage(msg, i) for msg in _assistant(m, at, calls, called))
        else:
            out.append(HarmonyMessage(_tool_result(m, at, calls, called), i))

    return _drop_history_analysis(out, keep_from)


def parse_reasoning_effort(value: Any, field: str) -> ReasoningEffort | None:
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in REASONING_EFFORTS:
        return REASONING_EFFORTS[value.lower()]
    raise UserError(f"{field}: unknown reasoning effort {value!r}; expected low, medium or high")


def parse_tools(tools: Any, where: str = "") -> list[ToolDescription]:
    """OpenAI function schemas (a list, or a JSON string of one) -> harmony ToolDescriptions."""
    if tools is None:
        return []
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}tools: not valid JSON ({e.msg})") from None
    if not isinstance(tools, list):
        raise UserError(f"{where}tools: expected a list of function schemas, got {_kind(tools)}")
    out, seen = [], set()
    for k, t in enumerate(tools):
        at = f"{where}tools[{k}]"
        if not isinstance(t, dict):
            raise UserError(f"{at}: expected a function schema object, got {_kind(t)}")
        if "function" in t:
            if t.get("type", "function") != "function":
                raise UserError(f"{at}.type: only function tools are supported, got {t.get('type')!r}")
            fn, at = t["function"], f"{at}.function"
            if not isinstance(fn, dict):
                raise UserError(f"{at}: expected an object with name, description and parameters")
        else:
            fn = t
        name = fn.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise UserError(f"{at}.name: {name!r} is not a valid function name (letters, digits, _ and -, at most 64)")
        if name in seen:
            raise UserError(f"{at}.name: the function {name!r} is defined twice")
        seen.add(name)
        desc = fn.get("description") or ""
        if not isinstance(desc, str):
            raise UserError(f"{at}.description: expected a string")
        params = fn.get("parameters")
        if isinstance(params, str):
            try:
                params = json.loads(params)
            except json.JSONDecodeError as e:
                raise UserError(f"{at}.parameters: not valid JSON ({e.msg})") from None
        if params is not None and not isinstance(params, dict):
            raise UserError(f"{at}.parameters: expected a JSON schema object, got {_kind(params)}")
        out.append(ToolDescription.new(name, desc, params))
    return out


def _assistant(m: dict, at: str, calls: dict[str, str], called: list[str]) -> list[Message]:
    thinking = None
    for key in ("thinking", "reasoning", "reasoning_content"):
        if m.get(key) is not None:
            if thinking is not None:
                raise UserError(f"{at}.{key}: give the chain of thought in one of thinking or reasoning, not both")
            thinking = _as_text(m[key], f"{at}.{key}")
    content = _text(m, f"{at}.content", required=False)
    tool_calls = m.get("tool_calls") or []
    if not isinstance(tool_calls, list):
        raise UserError(f"{at}.tool_calls: expected a list, got {_kind(tool_calls)}")
    if not tool_calls and content is None:
        # An explicit "" is an (empty) final answer, which a model can give and a client echo back; a
        # missing content with no tool calls is a malformed message.
        raise UserError(f"{at}: an assistant message needs content or tool_calls (it has neither)")

    out = []
    if thinking:
        out.append(Message.from_role_and_content(Role.ASSISTANT, thinking).with_channel("analysis"))
    if not tool_calls:
        out.append(Message.from_role_and_content(Role.ASSISTANT, content).with_channel("final"))
        return out
    if content:
        # Text beside tool calls is a preamble: commentary without a recipient, before the calls.
        out.append(Message.from_role_and_content(Role.ASSISTANT, content).with_channel("commentary"))
    for k, call in enumerate(tool_calls):
        cat = f"{at}.tool_calls[{k}]"
        if not isinstance(call, dict):
            raise UserError(f"{cat}: expected a tool call object, got {_kind(call)}")
        if call.get("type", "function") not in ("function", None):
            raise UserError(f"{cat}.type: only function calls are supported, got {call.get('type')!r}")
        fn = call.get("function", call)
        fat = f"{cat}.function" if "function" in call else cat
        if not isinstance(fn, dict):
            raise UserError(f"{fat}: expected an object with name and arguments")
        name = fn.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise UserError(f"{fat}.name: {name!r} is not a valid function name (letters, digits, _ and -, at most 64)")
        args = _arguments(fn.get("arguments"), f"{fat}.arguments")
        if call.get("id") is not None:
            calls[str(call["id"])] = name
        called.append(name)
        out.append(
            Message.from_role_and_content(Role.ASSISTANT, args)
            .with_channel("commentary")
            .with_recipient(f"functions.{name}")
            .with_content_type(JSON_CONTENT_TYPE)
        )
    return out


def _arguments(args: Any, field: str) -> str:
    """Tool-call arguments as JSON text: a string is kept as written (it must be JSON); an object is
    written compactly, as gpt-oss writes arguments."""
    if args is None:
        return "{}"
    if isinstance(args, str):
        try:
            json.loads(args)
        except json.JSONDecodeError as e:
            raise UserError(f"{field}: not valid JSON ({e.msg}): {args[:60]!r}") from None
        return args
    return json.dumps(args, ensure_ascii=False, separators=(",", ":"))


def _tool_result(m: dict, at: str, calls: dict[str, str], called: list[str]) -> Message:
    call_id = m.get("tool_call_id")
    name = m.get("name")
    if call_id is not None:
        if str(call_id) not in calls:
            raise UserError(f"{at}.tool_call_id: {call_id!r} matches no earlier assistant tool call")
        call_name = calls[str(call_id)]
        if name is not None and name not in (call_name, f"functions.{call_name}"):
            raise UserError(f"{at}.name: {name!r} differs from the function {call_name!r} that call {call_id!r} called")
        name = call_name
    elif name is not None:
        name = name.removeprefix("functions.") if isinstance(name, str) else name
        if name not in called:
            raise UserError(f"{at}.name: no earlier assistant tool call called {name!r}")
    else:
        raise UserError(f"{at}: a tool result needs tool_call_id (or name) to match it with its call")
    content = m.get("content")
    if content is None:
        raise UserError(f"{at}.content: a tool result needs content")
    text = content if isinstance(content, str) else _parts_text(content, f"{at}.content", allow_json=True)
    return (
        Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), text)
        .with_channel("commentary")
        .with_recipient("assistant")
    )


def _text(m: dict, field: str, *, required: bool) -> str | None:
    content = m.get("content")
    if content is None:
        if required:
            raise UserError(f"{field}: missing (a {m.get('role')} message needs content)")
        return None
    return _as_text(content, field)


def _as_text(content: Any, field: str) -> str:
    if isinstance(content, str):
        return content
    return _parts_text(content, field, allow_json=False)


def _parts_text(content: Any, field: str, *, allow_json: bool) -> str:
    """A list of OpenAI text parts -> one string. Tool results may also be any JSON value."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        texts = [p.get("text") for p in content]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    if allow_json and isinstance(content, (dict, list, int, float, bool)):
        return json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    raise UserError(
        f"{field}: expected a string or a list of text parts ({{'type': 'text', 'text': ...}}), got {_kind(content)}"
    )


def _drop_history_analysis(hms: list[HarmonyMessage], keep_from: int) -> list[HarmonyMessage]:
    """Drop analysis that a later final message (from before keep_from) closed: harmony's rule for history."""
    drop = set()
    final_follows = False
    for k in range(len(hms) - 1, -1, -1):
        h = hms[k]
        in_history = h.source < keep_from
        if in_history and h.is_assistant and h.channel == "final":
            final_follows = True
        if in_history and final_follows and h.is_assistant and h.channel == "analysis":
            drop.add(k)
    out = []
    for k, h in enumerate(hms):
        if k in drop:
            continue
        h.after_dropped_analysis = (k - 1) in drop
        out.append(h)
    return out


def _kind(x: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(x), type(x).__name__
    )
