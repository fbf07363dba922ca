"""Completion tokens -> OpenAI message parts, by harmony channel, as they arrive.

openai-harmony's StreamableParser reads the tokens the model writes after `<|start|>assistant`:
`analysis` -> reasoning; `final` (and commentary addressed to nobody, i.e. preambles) -> content;
a message addressed `to=functions.NAME` -> a tool call whose arguments are the message text, but only
when the request offered tools (`functions`): a client that sent no tools never receives a tool call.
Any other recipient (gpt-oss's built-in `python` / `browser.*` tools, or a garbled header of an
undertrained model) is not a function the client can run, so its text goes by channel like any other
message (analysis -> reasoning, else -> content). Each `feed(token)` returns the events that token
produced, so streaming and non-streaming responses are built from the same parse.

The model speaks only as the assistant: a message it starts under another role (a hallucinated user
turn or tool result) ends the completion (`ended`), and its text is dropped; so does <|endoftext|>.
Special tokens inside a message's text are dropped rather than shown by name.

A model that does not follow the format (an untrained tiny model, a broken fine-tune) makes the parser
fail; from then on the text is passed through as content with special tokens dropped, and if nothing at
all was parsed the whole completion is returned as content, so the user sees what the model wrote.
harmony's parser holds a message header's text until `<|message|>` ends it, so a model writing plain
text would be held back until the end (a client with a 30 s read timeout timed out after 3,000 tokens).
Hence each header is checked as it grows (`_header_ok`): once it cannot be a harmony header (anything
but a role, `to=RECIPIENT`, `<|channel|>NAME` and up to three words such as `<|constrain|>json`), or
passes HEADER_MAX_TOKENS, the output is taken as plain text and streamed token by token from there.

User stop strings apply to the content: text is held back while it could still be the start of a stop
string, and generation ends at the first match (finish_reason "stop", the stop string not included).
"""

from __future__ import annotations

import codecs
import re
import uuid
from dataclasses import dataclass, field

from openai_harmony import HarmonyError, Role, StreamableParser

from gptoss_tune.data.tokenizer import harmony_encoding, tiktoken_encoding
from gptoss_tune.model.config import BOS_ID, CALL_ID, END_ID, EOS_ID, PAD_ID

FIRST_SPECIAL_ID = BOS_ID  # o200k_harmony's special tokens are ids 199998 and up
START_ID, MESSAGE_ID = 200006, 200008  # <|start|>, <|message|>
# The longest header gpt-oss writes, `<|start|>assistant to=functions.NAME<|channel|>commentary
# <|constrain|>json<|message|>`, is about 10 tokens plus the function's name (up to 64 characters).
HEADER_MAX_TOKENS = 80
# Every prefix of a harmony header after its role, in text form (special tokens by name).
_RECIPIENT = r"t(?:o(?:=[^ <]*)?)?"
_HEADER = re.compile(
    rf" *(?:{_RECIPIENT} *)?(?:<\|constrain\|>[^ <]* *)?"
    rf"(?:<\|channel\|>[^ <]*(?: +(?:<\|constrain\|>[^ <]*|[^ <]+)){{0,3}} *)?"
)
_ROLE = re.compile(r"[^ <]*")
_REPEATED_START = re.compile(r"<\|start\|>[^ <]*")  # `<|start|>assistant` again: harmony reads on


@dataclass
class Event:
    kind: str  # "content" | "reasoning" | "tool_call" (start: id and name) | "tool_args"
    text: str = ""
    index: int = 0
    id: str = ""
    name: str = ""


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf, self.stopped = self.buf[: min(hits)], "", True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        out = self.buf[: len(self.buf) - hold]
        self.buf = self.buf[len(self.buf) - hold :]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class HarmonyOutputParser:
    stop: list[str] = field(default_factory=list)
    functions: bool = False  # the request offered tools: messages to functions.NAME are tool calls
    gen_finish: str | None = None  # set by the caller: why generation ended ("stop", "length", ...)

    def __post_init__(self):

        self._enc = harmony_encoding()
        self._tk = tiktoken_encoding()
        self._parser = StreamableParser(self._enc, role=Role.ASSISTANT)
        self._stop = StopMatcher(self.stop)
        self._raw = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tool_msg: int | None = None  # index (in parser.messages) of the message the open tool call is
        self._assistant = Role.ASSISTANT
        self.ended = False  # the model started a message under another role: the completion is over
        self.tokens: list[int] = []
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[ToolCall] = []
        self.parsed_any = False
        self._header: list[int] | None = []  # the open header's tokens (None: not in a header)
        self._header_has_role = False  # the header follows <|start|> (the first one's role is the prompt's)

    @property
    def stopped(self) -> bool:
        """A user stop string matched: generation should end."""
        return self._stop.stopped

    @property
    def done(self) -> bool:
        """Generation should end: a stop string matched, or the model left the assistant's turn."""
        return self._stop.stopped or self.ended

    def _is_call(self, recipient: str | None) -> bool:
        return bool(self.functions and recipient and recipient.startswith("functions."))

    def _content(self, text: str) -> list[Event]:
        text = self._stop.feed(text)
        if not text:
            return []
        self.content.append(text)
        return [Event("content", text)]

    def _raw_text(self, tok: int) -> str:
        if self._is_special(tok):
            return ""
        return self._utf8.decode(self._tk.decode_single_token_bytes(tok))

    @staticmethod
    def _is_special(tok: int) -> bool:
        return tok >= FIRST_SPECIAL_ID

    def _header_ok(self) -> bool:
        """Whether the open header (with its newest token) can still become a harmony header."""
        if len(self._header) > HEADER_MAX_TOKENS:
            return False
        text = self._tk.decode(self._header)
        if self._header_has_role:
            text = text[_ROLE.match(text).end() :]
        elif m := _REPEATED_START.match(text):
            text = text[m.end() :]
        return _HEADER.fullmatch(text) is not None

    def _go_raw(self, pending: list[int]) -> list[Event]:
        """From here on the output is plain text; `pending` are the tokens held back so far in this message."""
        self._raw = True
        if not self.parsed_any:  # nothing was harmony: the whole completion so far is the text
            return self._content("".join(self._raw_text(t) for t in self.tokens))
        return self._content("".join(self._raw_text(t) for t in pending))

    def _track_header(self, tok: int) -> None:
        if tok == MESSAGE_ID:
            self._header = None
        elif tok in (END_ID, EOS_ID, CALL_ID):
            self._header = None
        elif tok == START_ID:
            self._header, self._header_has_role = [], True

    def feed(self, tok: int) -> list[Event]:
        if self.ended:
            return []
        self.tokens.append(tok)
        if tok == PAD_ID:  # <|endoftext|>: the end of the completion (harmony's parser would keep it as text)
            self.ended = True
            return []
        if self._raw:
            return self._content(self._raw_text(tok))
        if self._header is not None and tok != MESSAGE_ID:
            self._header.append(tok)
            if not self._header_ok():
                return self._go_raw(self._header)

        p = self._parser
        try:
            p.process(tok)
        except HarmonyError:
            return self._go_raw([tok])
        self._track_header(tok)
        if p.current_role not in (None, self._assistant):
            self.ended = True  # a user turn or tool result written by the model: not part of the answer
            return []
        events: list[Event] = []
        recipient = p.current_recipient
        call = self._is_call(recipient)
        msg_index = len(p.messages)
        if call and self._tool_msg != msg_index:
            self._tool_msg = msg_index
            name = recipient[len("functions.") :]
            self.tool_calls.append(ToolCall(new_tool_call_id(), name))
            events.append(Event("tool_call", index=len(self.tool_calls) - 1, id=self.tool_calls[-1].id, name=name))
            self.parsed_any = True
        delta = p.last_content_delta or ""
        if self._is_special(tok):
            # A special token inside a message's text (an undertrained model writes `<|message|>` or a reserved
            # token there): harmony's parser keeps its name as text; it is never text for the client.
            return events
        if not delta:
            return events
        self.parsed_any = True
        if call:
            self.tool_calls[-1].arguments += delta
            events.append(Event("tool_args", delta, index=len(self.tool_calls) - 1))
        elif p.current_channel == "analysis":
            self.reasoning.append(delta)
            events.append(Event("reasoning", delta))
        else:
            events += self._content(delta)
        return events

    def finish(self) -> list[Event]:
        """Call once generation ended: releases held-back text, or the raw text if nothing parsed."""
        events: list[Event] = []
        if not self._raw and not self.parsed_any and self.tokens:
            events += self._content("".join(self._raw_text(t) for t in self.tokens))
        if self._raw:
            events += self._content(self._utf8.decode(b"", final=True))
        return events + self._content_flush()

    def _content_flush(self) -> list[Event]:
        if self._stop.stopped:
            return []
        text = self._stop.flush()
        if not text:
            return []
        self.content.append(text)
        return [Event("content", text)]
