"""The server against careless and hostile clients: web pages (Content-Type, Host, CORS), empty keys, bodies
that are too big, too deep, not text or too long, prompts that render slowly, and output that is not harmony.
Over loopback with httpx and the official openai client; a scripted token source stands in for the model.
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

from gptoss_tune.errors import UserError
from gptoss_tune.serve.app import ChatServer
from gptoss_tune.serve.generate import ScriptedTokenSource
from gptoss_tune.serve.http import HostCheck, start_in_thread
from gptoss_tune.serve.limits import ServerLimits
from gptoss_tune.serve.prompt import RenderPool, shared_render_pool

MODEL = "tuned-tiny"
ANSWER = "<|channel|>final<|message|>Hello there!<|return|>"


@contextlib.contextmanager
def serving(source=None, **kwargs):
    srv = ChatServer(source or ScriptedTokenSource(ANSWER), MODEL, **kwargs)
    running = start_in_thread(srv.app)
    try:
        yield running, openai.OpenAI(base_url=running.base_url, api_key="unused", max_retries=0, timeout=30)
    finally:
        running.stop()


def body(messages=None, **fields) -> dict:
    return {"model": MODEL, "messages": messages or [{"role": "user", "content": "Hi"}], **fields}


def error_of(response: httpx.Response) -> dict:
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


# ---- web pages ------------------------------------------------------------------------------------


def test_post_bodies_must_be_json():
    """A web page can POST text/plain (or a form) cross-origin without a preflight; such bodies are refused."""
    src = ScriptedTokenSource(ANSWER)
    with serving(src) as (srv, _), httpx.Client() as h:
        url = f"{srv.base_url}/chat/completions"
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"Content-Type": ctype} if ctype else {}
            r = h.post(url, content=json.dumps(body()).encode(), headers=headers)
            assert r.status_code == 415 and "application/json" in error_of(r)["message"], (ctype, r.text)
        assert src.prompts == []  # nothing was generated
        r = h.post(url, content=json.dumps(body()), headers={"Content-Type": "Application/JSON; charset=utf-8"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello there!"


def test_host_header_must_name_the_server():
    """DNS rebinding: a page at evil.example re-pointed to 127.0.0.1 sends `Host: evil.example`."""
    with serving() as (srv, client), httpx.Client() as h:
        root = f"http://127.0.0.1:{srv.port}"
        for path in ("/health", "/v1/models"):
            r = h.get(root + path, headers={"Host": f"evil.example:{srv.port}"})
            assert r.status_code == 403 and "--allowed-host" in error_of(r)["message"], r.text
        r = h.post(f"{root}/v1/chat/completions", json=body(), headers={"Host": "evil.example"})
        assert r.status_code == 403 and error_of(r)["code"] == "host_not_allowed"
        for host in (f"127.0.0.1:{srv.port}", f"localhost:{srv.port}", "localhost", "127.0.0.2", "[::1]:80"):
            assert h.get(root + "/health", headers={"Host": host}).status_code == 200, host
        assert client.models.list().data[0].id == MODEL  # the openai client sends Host 127.0.0.1:PORT
    with serving(allowed_hosts=["chat.example.com"]) as (srv, _), httpx.Client() as h:
        root = f"http://127.0.0.1:{srv.port}"
        assert h.get(root + "/health", headers={"Host": "chat.example.com"}).status_code == 200
        assert h.get(root + "/health", headers={"Host": "other.example.com"}).status_code == 403
    with serving(allowed_hosts=["*"]) as (srv, _):
        assert httpx.get(f"http://127.0.0.1:{srv.port}/health", headers={"Host": "any.example"}).status_code == 200


def test_host_rules_for_other_binds():
    lan = HostCheck("192.168.1.5")
    assert lan.allows("192.168.1.5:8000") and not lan.allows("10.0.0.1") and not lan.allows("localhost")
    wildcard = HostCheck("0.0.0.0", ["gpu-box.lan"])
    assert wildcard.allows("10.1.2.3:8000") and wildcard.allows("[fe80::1]") and wildcard.allows("GPU-BOX.lan.")
    assert wildcard.allows("localhost:8000") and not wildcard.allows("evil.example")
    assert HostCheck("::1").allows("[::1]:8000") and not HostCheck("::1").allows("evil.example")
    assert HostCheck("127.0.0.1").allows(None)  # HTTP/1.0 without Host: no browser sends that
    with pytest.raises(UserError, match="--allowed-host 'https://x.example/'"):
        HostCheck("127.0.0.1", ["https://x.example/"])


def test_cors_preflight_answered_only_for_configured_origins():
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    with serving() as (srv, _), httpx.Client() as h:
        url = f"{srv.base_url}/chat/completions"
        r = h.options(url, headers=preflight)
        assert r.status_code == 403 and "--cors-origin" in error_of(r)["message"]
        assert "access-control-allow-origin" not in r.headers
        r = h.post(url, json=body(), headers={"Origin": "https://app.example.com"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    with serving(cors_origins=["https://app.example.com"]) as (srv, _), httpx.Client() as h:
        url = f"{srv.base_url}/chat/completions"
        r = h.options(url, headers=preflight)
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = h.options(url, headers={**preflight, "Origin": "https://evil.example"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        r = h.post(url, json=body(), headers={"Origin": "https://app.example.com"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
        r = h.post(url, json=body(), headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_an_empty_api_key_is_a_start_up_error(tiny_ckpt, capsys, monkeypatch):
    from gptoss_tune.cli.main import main

    with pytest.raises(UserError, match="--api-key is empty"):
        ChatServer(ScriptedTokenSource(ANSWER), MODEL, api_key="")
    monkeypatch.setenv("GPTOSS_TUNE_API_KEY", "")
    assert main(["serve", str(tiny_ckpt)]) == 2
    err = capsys.readouterr().err
    assert "$GPTOSS_TUNE_API_KEY is empty" in err and len(err.strip().splitlines()) == 1 and "loading" not in err
    monkeypatch.delenv("GPTOSS_TUNE_API_KEY")
    for key, message in (("", "--api-key is empty"), ("  ", "--api-key is empty"), (" k ", "spaces at its ends")):
        assert main(["serve", str(tiny_ckpt), "--api-key", key]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert main(["serve", "--print-vllm-command", str(tiny_ckpt), "--api-key", key]) == 2
        capsys.readouterr()


# ---- what one request may send ----------------------------------------------------------------------


class CountingRenders(RenderPool):
    """The shared render pool, counting the requests rendered (each render's message count)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    async def render(self, req):
        self.calls.append(len(req.messages))
        return await shared_render_pool().render(req)


def test_size_limits_refuse_before_rendering():
    limits = ServerLimits(max_request_bytes=20_000, max_messages=5, max_string_chars=1_000)
    counted_renders = CountingRenders()
    with serving(limits=limits, render_pool=counted_renders) as (srv, client), httpx.Client() as h:
        url = f"{srv.base_url}/chat/completions"
        big = json.dumps(body([{"role": "user", "content": "x" * 30_000}])).encode()
        r = h.post(url, content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "--max-request-bytes" in error_of(r)["message"]

        def chunks():  # no Content-Length: refused as the bytes arrive
            yield big[:10_000]
            yield big[10_000:]

        r = h.post(url, content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}] * 6)
        err = error_of(e.value.response)
        assert err["param"] == "messages" and "--max-messages" in err["message"]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "system", "content": "ok"}, {"role": "user", "content": "y" * 1001}]
            )
        err = error_of(e.value.response)
        assert err["param"] == "messages[1].content" and "1001 characters" in err["message"]
        assert counted_renders.calls == []  # none of them reached the renderer
        ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "y" * 1000}] * 5)
        assert ok.choices[0].message.content == "Hello there!" and counted_renders.calls == [5]


def test_hostile_bodies_get_400s_not_500s():
    """With the default limits: a lone surrogate, JSON nested 100,000 deep, a 3 MB CJK message."""
    src, counted_renders = ScriptedTokenSource(ANSWER), CountingRenders()
    with serving(src, render_pool=counted_renders) as (srv, client), httpx.Client(timeout=30) as h:
        url = f"{srv.base_url}/chat/completions"
        ctype = {"Content-Type": "application/json"}
        head = '{"model": "tuned-tiny", "messages": [{"role": "user", "content": '
        cases = [
            (head + '"a\\ud800b"}]}', "messages[0].content", "lone UTF-16 surrogate"),
            (
                '{"model": "tuned-tiny", "messages": [{"role": "user", "\\udfff": 1, "content": "x"}]}',
                "messages[0]",
                "a key in 'messages[0]'",
            ),  # fmt: skip
            ("[" * 100_000 + "]" * 100_000, None, "nested too deeply"),
            (head + "[" * 500 + "]" * 500 + "}]}", None, "nested too deeply"),
            (head + '"x"}], "max_tokens": ' + "9" * 5000 + "}", None, "not valid JSON"),
            (head + '"x\udcff"}]}', None, "not valid JSON"),  # the byte 0xff: not UTF-8
        ]
        for raw, param, text in cases:
            r = h.post(url, content=raw.encode("utf-8", "surrogateescape"), headers=ctype)
            assert r.status_code == 400, (raw[:80], r.status_code, r.text[:200])
            err = error_of(r)
            assert text in err["message"] and (param is None or err["param"] == param), (raw[:80], err)
        cjk = "漢字かな交じり文" * 131_072  # 1,048,576 characters, 3 MB of UTF-8
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": cjk}])
        err = error_of(e.value.response)
        assert err["param"] == "messages[0].content" and "--max-string-chars" in err["message"]
        assert counted_renders.calls == [] and src.prompts == []
        assert client.chat.completions.create(model=MODEL, messages=body()["messages"]).choices[0].message.content


def test_rendering_does_not_stall_the_server():
    """/health answers while a big prompt renders (a 120,000-character CJK message once froze it for 55 s).
    openai-harmony holds the GIL while it tokenizes, so this needs the render in another process: with
    the render in a thread, /health waited 1 to 3 s here."""
    shared_render_pool().start()  # the workers' start-up is not what is measured
    src = ScriptedTokenSource(ANSWER)
    with serving(src, max_model_len=4096) as (srv, client):
        result = {}

        def ask():
            t0 = time.perf_counter()
            try:  # 32,000 unpunctuated CJK characters: ~20,000 tokens, seconds of harmony's tokenizer
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "日本語の文章です" * 4000}]
                )
            except openai.BadRequestError as e:
                result["error"] = error_of(e.response)
            result["seconds"] = time.perf_counter() - t0

        t = threading.Thread(target=ask)
        t.start()
        answered = [time.perf_counter()]
        with httpx.Client(timeout=60) as h:
            while t.is_alive():
                assert h.get(f"http://127.0.0.1:{srv.port}/health").status_code == 200
                answered.append(time.perf_counter())
                time.sleep(0.05)
        t.join()
    assert result["error"]["code"] == "context_length_exceeded" and src.prompts == []
    # the longest gap between two answers (this test runs in the server's process, so a render holding
    # the GIL stalls its polling too: the gap, not one request's latency, shows it)
    gap = max(b - a for a, b in zip(answered, answered[1:]))
    # the render must last several polling gaps for the test to mean anything (16,000 characters took
    # 1.35 s on CI and 3 s here, hence the 32,000 and a precondition well below either)
    assert result["seconds"] > 1.0 and gap < 0.5, (result["seconds"], gap)


def test_overlong_prompt_refused_before_any_model_work():
    src = ScriptedTokenSource(ANSWER)
    with serving(src, max_model_len=64) as (srv, client):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 200}])
        assert error_of(e.value.response)["code"] == "context_length_exceeded"
        assert src.prompts == []  # the token source was never started
        assert httpx.get(f"http://127.0.0.1:{srv.port}/health").json()["active_requests"] == 0  # slot freed


# ---- streaming whatever the model writes -----------------------------------------------------------


@pytest.mark.parametrize(
    "script",
    [
        "<|channel|>final<|message|>" + "word " * 150 + "<|return|>",  # one long harmony message
        "Plain text from a model that never learned harmony. " + "word " * 150,
        "<|channel|>final but then the header never ends " + "word " * 150,  # a garbled header
    ],
    ids=["harmony", "plain", "garbled-header"],
)
def test_stream_sends_deltas_as_tokens_decode(script):
    """The first content delta arrives long before the model's message ends, whatever the model writes
    (before: text in an unfinished harmony header was held back to the end)."""
    delay = 0.01
    src = ScriptedTokenSource(script, delay=delay)
    with serving(src) as (_, client):
        t0 = time.perf_counter()
        first, pieces = None, []
        for c in client.chat.completions.create(model=MODEL, messages=body()["messages"], stream=True):
            if c.choices and c.choices[0].delta.content:
                first = first if first is not None else time.perf_counter() - t0
                pieces.append(c.choices[0].delta.content)
        total = time.perf_counter() - t0
    assert first is not None and first < total / 3, (first, total)
    assert len(pieces) > 100 and "".join(pieces).rstrip().endswith("word")


# ---- the default context ------------------------------------------------------------------------------


class _Stub(torch.nn.Module):
    """A model as estimate_context sees it: a config and bf16 attention weights on the CPU."""

    def __init__(self, size: str):
        from transformers import GptOssConfig

        from gptoss_tune.model.config import published_config

        super().__init__()
        self.config = GptOssConfig(**published_config(size))
        self.self_attn = torch.nn.Linear(2, 2, dtype=torch.bfloat16)


def test_default_context_is_what_free_memory_holds():
    from gptoss_tune.serve.capacity import GIB, estimate_context, kv_bytes_per_token

    # one token's KV cache: the full-attention layers (half of them) x keys and values x 8 heads x 64 x bf16
    assert kv_bytes_per_token(_Stub("20b").config, 2) == 12 * 2 * 8 * 64 * 2 == 24576
    assert kv_bytes_per_token(_Stub("120b").config, 2) == 18 * 2 * 8 * 64 * 2
    model = _Stub("20b")
    # per token on the CPU: 4 requests x 24 KiB of KV + 64 heads x 32 prefill rows x 16 bytes = 128 KiB;
    # room: 90% of 16 GiB less 1 GiB reserve and the 512 MiB prefill score budget
    est = estimate_context(model, max_concurrency=4, free=16 * GIB)
    want = int(16 * GIB * 0.9 - 1.5 * GIB) // (128 * 1024) // 256 * 256
    assert est.per_token_bytes == 128 * 1024 and est.tokens == want == 105472
    assert est.limited_by_memory and "16.0 GiB free hold 105472 tokens" in est.describe(4)
    one = estimate_context(model, max_concurrency=1, free=8 * GIB)  # 24 + 32 KiB per token
    assert one.per_token_bytes == 56 * 1024 and one.tokens == int(8 * GIB * 0.9 - 1.5 * GIB) // (56 * 1024) // 256 * 256
    big = estimate_context(model, max_concurrency=4, free=256 * GIB)
    assert big.tokens == 131072 and not big.limited_by_memory and big.fits  # capped at the model's
    tight = estimate_context(model, max_concurrency=4, free=int(1.6 * GIB))  # less than the fixed 1.5 GiB
    assert not tight.fits and tight.tokens == 256
