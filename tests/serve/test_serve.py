"""The server, driven over loopback by the official `openai` client (and raw httpx where the client hides
the wire format). A scripted token source emits chosen harmony completions so parsing and tool calls are
deterministic while the real server, renderer (harmony_messages + openai-harmony) and parser run; the
last tests run the real tiny model end to end.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import openai
import pytest
import torch

from gptoss_tune.data.tokenizer import harmony_encoding
from gptoss_tune.errors import UserError
from gptoss_tune.serve.app import ChatServer
from gptoss_tune.serve.generate import ModelTokenSource, ScriptedTokenSource
from gptoss_tune.serve.http import check_bind, start_in_thread

MODEL = "tuned-tiny"
KEY = "sk-test-key"
ANSWER = "<|channel|>analysis<|message|>The user greets me.<|end|><|start|>assistant<|channel|>final<|message|>Hello there! General Kenobi.<|return|>"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = (
    "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant to=functions.get_weather"
    '<|channel|>commentary <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
)
AFTER_TOOL = "<|channel|>final<|message|>It is 21 degrees in Paris.<|return|>"


def weather_script(prompt: list[int]) -> str:
    """Call the tool, or answer once the prompt holds the tool's result."""
    text = harmony_encoding().decode_utf8(prompt)
    return AFTER_TOOL if "<|start|>functions.get_weather to=assistant" in text else CALL


@contextlib.contextmanager
def serving(source, **kwargs):
    kwargs.setdefault("api_key", KEY)
    srv = ChatServer(source, MODEL, **kwargs)
    running = start_in_thread(srv.app)
    try:
        yield running, openai.OpenAI(base_url=running.base_url, api_key=KEY, max_retries=0, timeout=30)
    finally:
        running.stop()


def user(text="Hi"):
    return [{"role": "user", "content": text}]


def test_list_models_and_chat_by_channel():
    src = ScriptedTokenSource(ANSWER)
    with serving(src) as (srv, client):
        assert [m.id for m in client.models.list().data] == [MODEL]
        assert client.models.retrieve(MODEL).id == MODEL
        r = client.chat.completions.create(model=MODEL, messages=user())
    msg = r.choices[0].message
    assert msg.content == "Hello there! General Kenobi."
    assert msg.reasoning == msg.reasoning_content == "The user greets me."  # extra fields on the client's model
    assert msg.tool_calls is None
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion" and r.model == MODEL
    # usage: the prompt is harmony's render of the request, the completion the scripted tokens
    from openai_harmony import Conversation, Message, Role, SystemContent

    want_prompt = harmony_encoding().render_conversation_for_completion(
        Conversation.from_messages([Message.from_role_and_content(Role.SYSTEM, SystemContent.new()),
                                    Message.from_role_and_content(Role.USER, "Hi")]), Role.ASSISTANT)  # fmt: skip
    assert src.prompts[0] == list(want_prompt)
    n_completion = len(harmony_encoding().encode(ANSWER, allowed_special="all"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want_prompt), n_completion)
    assert r.usage.total_tokens == len(want_prompt) + n_completion


def test_reasoning_effort_and_system_prompt_reach_the_prompt():
    src = ScriptedTokenSource(ANSWER)
    with serving(src) as (_, client):
        client.chat.completions.create(model=MODEL, reasoning_effort="high",
                                       messages=[{"role": "system", "content": "Talk like a pirate."}] + user())  # fmt: skip
        client.chat.completions.create(model=MODEL, reasoning_effort="low", messages=user())
    first, second = (harmony_encoding().decode_utf8(p) for p in src.prompts)
    assert "Reasoning: high" in first and "# Instructions\n\nTalk like a pirate." in first
    assert "Reasoning: low" in second


def test_stream_with_usage_and_done_marker():
    with serving(ScriptedTokenSource(ANSWER)) as (srv, client):
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=user(), stream=True, stream_options={"include_usage": True}
            )
        )
        with httpx.Client() as h:
            body = h.post(f"{srv.base_url}/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": MODEL, "messages": user(), "stream": True}).text  # fmt: skip
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning", None) or "" for c in chunks if c.choices)
    assert content == "Hello there! General Kenobi." and reasoning == "The user greets me."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
        harmony_encoding().encode(ANSWER, allowed_special="all")
    )
    assert all(c.usage is None for c in chunks[:-1])
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[1][6:])  # no include_usage: no usage field


def test_tool_call_round_trip():
    src = ScriptedTokenSource(weather_script)
    with serving(src) as (_, client):
        messages = user("What's the weather in Paris?")
        r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice="auto")
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        assert choice.message.content is None and choice.message.reasoning == "Need the weather."
        # send the assistant message back as it came (reasoning and reasoning_content both set), plus the result
        messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 21})}]
        r2 = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
        assert r2.choices[0].finish_reason == "stop" and r2.choices[0].message.content == "It is 21 degrees in Paris."
        # streamed, the call arrives as an id/name delta then argument deltas
        chunks = list(
            client.chat.completions.create(model=MODEL, messages=user("Weather?"), tools=[WEATHER_TOOL], stream=True)
        )
    second = harmony_encoding().decode_utf8(src.prompts[1])
    assert "namespace functions" in second and "type get_weather" in second
    assert (
        '<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"city": "Paris"}'
        in second
    )
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"celsius": 21}' in second
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_no_tool_calls_without_tools_and_none_for_builtin_recipients():
    """A client that offered no tools never gets tool_calls (an undertrained model garbles headers into
    recipients; gpt-oss calls its built-in python/browser tools): the text goes by channel instead."""
    builtin = "<|channel|>analysis<|message|>Run it.<|end|><|start|>assistant to=python<|channel|>analysis<|message|>print(1)<|call|>"
    with serving(ScriptedTokenSource(CALL)) as (_, client):
        r = client.chat.completions.create(model=MODEL, messages=user())  # no tools offered
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
        assert (
            r.choices[0].message.content == '{"city": "Paris"}'
            and r.choices[0].message.reasoning == "Need the weather."
        )
        r = client.chat.completions.create(model=MODEL, messages=user(), tools=[WEATHER_TOOL], tool_choice="none")
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(model=MODEL, messages=user(), stream=True))
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    with serving(ScriptedTokenSource(builtin)) as (_, client):
        r = client.chat.completions.create(model=MODEL, messages=user(), tools=[WEATHER_TOOL])
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.reasoning == "Run it.print(1)"


def test_a_turn_the_model_writes_for_someone_else_ends_the_completion():
    """The model speaks as the assistant only: a user turn or tool result it starts is not part of the answer."""
    enc = harmony_encoding()
    user_turn = "<|channel|>final<|message|>Hi!<|end|><|start|>user"
    tool_turn = CALL.replace("<|call|>", "<|end|>") + "<|start|>functions.get_weather to=assistant"
    for head, tail in (
        (user_turn, "<|message|>Thanks, and also" + " more" * 50),
        (tool_turn, "<|channel|>commentary<|message|>{}" + " more" * 50),
    ):
        with serving(ScriptedTokenSource(head + tail)) as (_, client):
            r = client.chat.completions.create(model=MODEL, messages=user(), tools=[WEATHER_TOOL])
            chunks = list(client.chat.completions.create(model=MODEL, messages=user(), tools=[WEATHER_TOOL], stream=True,
                                                         stream_options={"include_usage": True}))  # fmt: skip
        assert r.choices[0].finish_reason == "stop"
        assert "Thanks" not in (r.choices[0].message.content or "") and "{}" not in str(r.choices[0].message.tool_calls)
        # generation stopped once the foreign header was read, not at the end of the script
        # (the role is known once its header ends: at most the 4 tokens `<|channel|>commentary<|message|>` later)
        assert r.usage.completion_tokens <= len(enc.encode(head, allowed_special="all")) + 4
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert (
            streamed == (r.choices[0].message.content or "")
            and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        )


def test_tool_choice_none_hides_tools():
    src = ScriptedTokenSource(ANSWER)
    with serving(src) as (_, client):
        client.chat.completions.create(model=MODEL, messages=user(), tools=[WEATHER_TOOL], tool_choice="none")
    assert "namespace functions" not in harmony_encoding().decode_utf8(src.prompts[0])


def test_stop_strings_and_length():
    with serving(ScriptedTokenSource(ANSWER)) as (_, client):
        r = client.chat.completions.create(model=MODEL, messages=user(), stop=["General"])
        assert r.choices[0].message.content == "Hello there! " and r.choices[0].finish_reason == "stop"
        # a stop string spanning tokens, streamed: held back until decided, never leaked
        chunks = list(client.chat.completions.create(model=MODEL, messages=user(), stop=["e! Gen"], stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello ther"
        r = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=5)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
        r = client.chat.completions.create(model=MODEL, messages=user(), max_completion_tokens=3)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_generation_stops_at_endoftext():
    """<|endoftext|> ends the answer, as the published generation_config.json says (eos 200002, 199999, 200012)."""
    script = "<|channel|>final<|message|>Done.<|endoftext|><|start|>assistant<|channel|>final<|message|>" + "junk " * 30
    with serving(ScriptedTokenSource(script)) as (_, client):
        r = client.chat.completions.create(model=MODEL, messages=user())
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "Done."
    assert r.usage.completion_tokens == len(
        harmony_encoding().encode("<|channel|>final<|message|>Done.<|endoftext|>", allowed_special="all")
    )


def _error(exc_info):
    body = exc_info.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_errors_map_to_client_exceptions():
    with serving(ScriptedTokenSource(ANSWER), max_model_len=80) as (srv, client):
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0).chat.completions.create(
                model=MODEL, messages=user()
            )
        assert _error(e)["message"] == "incorrect API key"
        with httpx.Client() as h:
            r = h.get(f"{srv.base_url}/models")
            assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="gpt-4o", messages=user())
        assert _error(e)["code"] == "model_not_found" and "tuned-tiny" in _error(e)["message"]
        cases = [
            (dict(n=2), "n", "only n=1"),
            (dict(temperature=3.0), "temperature", "less than or equal to 2"),
            (dict(max_tokens=0), "max_tokens", "greater than or equal to 1"),
            (dict(reasoning_effort="extreme"), "reasoning_effort", "'low', 'medium' or 'high'"),
            (dict(tool_choice="required", tools=[WEATHER_TOOL]), "tool_choice", "'required' is not supported"),
            (dict(logprobs=True), "logprobs", "logprobs are not supported"),
            (dict(response_format={"type": "json_object"}), "response_format", "not supported"),
            (dict(extra_body={"top_k": 5}), "top_k", "unknown field 'top_k'"),
            (dict(stop=["a", "b", "c", "d", "e"]), "stop", "up to 4"),
            (dict(seed=2**70), "seed", "less than or equal to 9223372036854775807"),  # int64, not a 500
            (
                dict(tools=[{"type": "function", "function": {"name": "no spaces"}}]),
                "tools[0].function.name",
                "pattern",
            ),
            (dict(stream_options={"include_usage": True}), "stream_options", "only allowed when stream is true"),
            (dict(messages=[{"role": "wizard", "content": "x"}]), "messages", "unknown role 'wizard'"),
            (
                dict(messages=[{"role": "tool", "tool_call_id": "nope", "content": "x"}]),
                "messages",
                "matches no earlier",
            ),
            (dict(messages=user("word " * 100)), "messages", "maximum context length is 80"),
            (dict(max_tokens=60), "max_tokens", "you requested"),
        ]
        for kwargs, param, text in cases:
            kwargs.setdefault("messages", user())
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=MODEL, **kwargs)
            err = _error(e)
            assert err["param"] == param and text in err["message"], (kwargs, err)
        assert _error_code(client, dict(messages=user("word " * 100))) == "context_length_exceeded"
        with httpx.Client() as h:
            auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
            r = h.post(
                f"{srv.base_url}/chat/completions", headers=auth, content=b'{"model": "tuned-tiny", "messages": ['
            )
            assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
            r = h.post(f"{srv.base_url}/chat/completions", headers=auth, content=b"[1, 2]")
            assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
            r = h.post(f"{srv.base_url}/chat/completions", headers=auth, json={"model": MODEL})
            assert r.status_code == 400 and r.json()["error"]["message"] == "'messages' is required"
            r = h.get(f"{srv.base_url}/completions", headers=auth)
            assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def _error_code(client, kwargs):
    try:
        client.chat.completions.create(model=MODEL, **kwargs)
    except openai.BadRequestError as e:
        return e.response.json()["error"]["code"]


def test_internal_errors_never_leak_a_traceback():
    import logging

    class Broken:
        context_length = 1000

        def __init__(self):
            self.calls = 0

        def start(self, prompt, params):
            self.calls += 1
            if self.calls == 3:  # the third request works
                return ScriptedTokenSource(ANSWER).start(prompt, params)
            raise RuntimeError("secret internal detail")

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    uvicorn_errors = Records()
    try:
        with serving(Broken()) as (srv, client):
            logging.getLogger("uvicorn.error").addHandler(uvicorn_errors)  # after uvicorn configured its logging
            with pytest.raises(openai.InternalServerError) as e:
                client.chat.completions.create(model=MODEL, messages=user())
            text = e.value.response.text
            assert "secret" not in text and "Traceback" not in text and "internal server error" in text
            assert set(e.value.response.json()["error"]) == {"message", "type", "param", "code"}
            chunks = httpx.post(f"{srv.base_url}/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                                json={"model": MODEL, "messages": user(), "stream": True}).text  # fmt: skip
            assert "secret" not in chunks and "Traceback" not in chunks and chunks.rstrip().endswith("data: [DONE]")
            # the failures were answered, not re-raised into uvicorn (which closes the connection under the
            # client's next request): the same client, without retries, goes on working
            assert (
                client.chat.completions.create(model=MODEL, messages=user())
                .choices[0]
                .message.content.startswith("Hello")
            )
            assert httpx.get(f"{srv.base_url.removesuffix('/v1')}/health").json()["active_requests"] == 0
            assert not any("Exception in ASGI application" in m for m in uvicorn_errors.messages)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(uvicorn_errors)


def test_concurrency_limit_gives_429_and_frees_slots():
    src = ScriptedTokenSource(ANSWER, delay=0.05)  # ~0.85 s per request
    with serving(src, max_concurrency=2) as (srv, client):
        results: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(6)

        def one():
            start.wait(10)
            try:
                client.chat.completions.create(model=MODEL, messages=user())
                out = "ok"
            except openai.RateLimitError as e:
                assert "--max-concurrency 2" in _error_from(e)["message"]
                out = "429"
            with lock:
                results.append(out)

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 6 and results.count("ok") >= 2 and results.count("429") >= 1
        # everything finished: the slots are free again
        r = client.chat.completions.create(model=MODEL, messages=user())
        assert r.choices[0].message.content.startswith("Hello")
    with serving(ScriptedTokenSource(ANSWER, delay=0.01), max_concurrency=6) as (_, client):
        done = []
        threads = [
            threading.Thread(target=lambda: done.append(client.chat.completions.create(model=MODEL, messages=user())))
            for _ in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(done) == 6 and all(d.choices[0].finish_reason == "stop" for d in done)


def _error_from(e):
    return e.response.json()["error"]


def test_disconnected_stream_frees_its_slot():
    # ~40 s if it ran to the end, far beyond the 15 s allowed below even on a loaded 2-core CI machine
    long_answer = "<|channel|>final<|message|>" + "word " * 2000 + "<|return|>"
    src = ScriptedTokenSource(long_answer, delay=0.02)
    with serving(src, max_concurrency=1) as (srv, client):
        stream = client.chat.completions.create(model=MODEL, messages=user(), stream=True)
        first = [next(iter(stream)) for _ in range(3)]
        assert first[0].choices[0].delta.role == "assistant"
        with pytest.raises(openai.RateLimitError):  # the one slot is taken
            client.chat.completions.create(model=MODEL, messages=user(), max_tokens=2)
        stream.close()  # the client goes away mid-stream
        t0 = time.time()
        for _ in range(300):  # bounded: 300 x 50 ms
            try:
                r = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=2)
                break
            except openai.RateLimitError:
                time.sleep(0.05)
        else:
            pytest.fail("the slot of the disconnected stream was not freed")
        assert r.usage.completion_tokens == 2 and time.time() - t0 < 15


def test_bind_rules():
    check_bind("127.0.0.1", None)
    check_bind("localhost", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "k")
    with pytest.raises(UserError, match="--host 0.0.0.0 would expose.*--api-key"):
        check_bind("0.0.0.0", None)
    with pytest.raises(UserError, match="--host 192.168.1.5"):
        check_bind("192.168.1.5", "")


def test_serve_cli_refuses_public_bind_without_key(tiny_ckpt, capsys, monkeypatch):
    from gptoss_tune.cli.main import main

    monkeypatch.delenv("GPTOSS_TUNE_API_KEY", raising=False)
    assert main(["serve", str(tiny_ckpt), "--host", "0.0.0.0"]) == 2
    assert "without authentication" in capsys.readouterr().err


# ---- the real tiny model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_source(tiny_ckpt):
    from gptoss_tune import load_model

    return ModelTokenSource(load_model(tiny_ckpt, device="cpu"))


def test_real_tiny_model_end_to_end(tiny_source):
    with serving(tiny_source, api_key=None) as (_, client):
        client = openai.OpenAI(base_url=client.base_url, api_key="unused", max_retries=0, timeout=60)
        a = client.chat.completions.create(model=MODEL, messages=user("Hello?"), max_tokens=6, seed=7, temperature=0.8)
        b = client.chat.completions.create(model=MODEL, messages=user("Hello?"), max_tokens=6, seed=7, temperature=0.8)
        g = client.chat.completions.create(model=MODEL, messages=user("Hello?"), max_tokens=6, temperature=0)
        chunks = list(client.chat.completions.create(model=MODEL, messages=user("Hello?"), max_tokens=6, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))  # fmt: skip
    assert a.usage.completion_tokens <= 6 and a.choices[0].finish_reason in ("length", "stop")
    assert a.choices[0].message == b.choices[0].message  # a seed makes sampling reproducible
    assert chunks[-1].usage.completion_tokens == g.usage.completion_tokens
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == (g.choices[0].message.content or "")  # greedy: streamed and not streamed agree


def test_generation_uses_the_kv_cache_and_matches_full_recompute(tiny_source):
    from gptoss_tune.serve.generate import SamplingParams

    model = tiny_source.model
    prompt = torch.randint(0, 200000, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    gen = tiny_source.start(prompt, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=()))
    got = []
    while (t := gen.next_token()) is not None:
        got.append(t)
    assert gen.forward_lengths == [9] + [1] * 7  # the prefix is never fed again
    seq, want = list(prompt), []
    with torch.no_grad():
        for _ in range(8):  # the tiny model's 4-token sliding window is crossed, so both layer types are tested
            want.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            seq.append(want[-1])
    assert got == want and gen.finish_reason == "length"


def test_concurrent_requests_take_turns_on_the_shared_model(tiny_source):
    """Requests share one model: their forwards never overlap (compilation, autotuning and caches are not
    thread-safe), and each request gets exactly what it would get alone."""
    from gptoss_tune.serve.generate import SamplingParams

    model = tiny_source.model
    state = {"active": 0, "most": 0}
    lock = threading.Lock()

    def enter(*_):
        with lock:
            state["active"] += 1
            state["most"] = max(state["most"], state["active"])
        time.sleep(0.005)  # widen the window in which an unguarded second forward would overlap

    def leave(*_):
        with lock:
            state["active"] -= 1

    prompts = [
        torch.randint(0, 200000, (5 + i,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(4)
    ]

    def run(prompt):
        gen = tiny_source.start(prompt, SamplingParams(max_tokens=6, temperature=0, stop_token_ids=()))
        return [t for t in iter(gen.next_token, None)]

    alone = [run(p) for p in prompts]
    hooks = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
    try:
        results = [None] * len(prompts)
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, run(prompts[i]))) for i in range(len(prompts))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for h in hooks:
            h.remove()
    assert state["most"] == 1 and results == alone
