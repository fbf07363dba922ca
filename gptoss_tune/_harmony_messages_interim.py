"""INTERIM stand-in for gptoss_tune.harmony_messages (being written on the `data` branch).

Used by the server only while `gptoss_tune.harmony_messages` does not exist; delete this file once it
lands on main. Same signature: OpenAI-shaped messages -> openai_harmony.Conversation.
"""

from __future__ import annotations

import json

from .errors import UserError


def _text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise UserError(f"{where}.content[{i}]: only text parts are supported")
            parts.append(p["text"])
        return "".join(parts)
    raise UserError(f"{where}.content: expected a string or a list of text parts")


def to_harmony_conversation(messages, *, tools=None, reasoning_effort=None, where=""):
    from openai_harmony import (
        Author, Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent, ToolDescription,
    )  # fmt: skip

    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}messages: expected a non-empty list")
    system = SystemContent.new()
    if reasoning_effort:
        system = system.with_reasoning_effort(ReasoningEffort(str(reasoning_effort).capitalize()))
    out = [Message.from_role_and_content(Role.SYSTEM, system)]
    instructions = []
    body = []
    names: dict[str, str] = {}
    for i, m in enumerate(messages):
        w = f"{where}messages[{i}]"
        if not isinstance(m, dict):
            raise UserError(f"{w}: expected an object")
        role = m.get("role")
        if role in ("system", "developer"):
            instructions.append(_text(m.get("content"), w))
        elif role == "user":
            body.append(Message.from_role_and_content(Role.USER, _text(m.get("content"), w)))
        elif role == "assistant":
            thinking = m.get("reasoning") or m.get("reasoning_content") or m.get("thinking")
            if thinking:
                body.append(Message.from_role_and_content(Role.ASSISTANT, thinking).with_channel("analysis"))
            text = _text(m.get("content"), w)
            for j, tc in enumerate(m.get("tool_calls") or []):
                fn = (tc or {}).get("function") or {}
                name = fn.get("name")
                if not isinstance(name, str) or not name:
                    raise UserError(f"{w}.tool_calls[{j}].function.name: missing")
                args = fn.get("arguments", "")
                if not isinstance(args, str):
                    args = json.dumps(args)
                names[tc.get("id", "")] = name
                body.append(
                    Message.from_role_and_content(Role.ASSISTANT, args)
                    .with_channel("commentary")
                    .with_recipient(f"functions.{name}")
                    .with_content_type("<|constrain|>json")
                )
            if text or not m.get("tool_calls"):
                body.append(Message.from_role_and_content(Role.ASSISTANT, text).with_channel("final"))
        elif role == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id", ""))
            if not name:
                raise UserError(f"{w}.tool_call_id: does not match any earlier assistant tool call")
            body.append(
                Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), _text(m.get("content"), w))
                .with_channel("commentary")
                .with_recipient("assistant")
            )
        else:
            raise UserError(f"{w}.role: {role!r} is not one of system, developer, user, assistant, tool")
    dev = None
    if instructions:
        dev = DeveloperContent.new().with_instructions("\n\n".join(instructions))
    if tools:
        descs = [
            ToolDescription.new(t["function"]["name"], t["function"].get("description") or "", parameters=t["function"].get("parameters"))
            for t in tools
        ]
        dev = (dev or DeveloperContent.new()).with_function_tools(descs)
    if dev is not None:
        out.append(Message.from_role_and_content(Role.DEVELOPER, dev))
    return Conversation.from_messages(out + body)
