"""What `serve` loads (run dirs, our adapters, PEFT exports), the vLLM command, the output parser's edge
cases, and the demo helper."""

from __future__ import annotations

import re
import shlex

import pytest
import torch
from helpers.runs import make_run_dir

from gptoss_tune.data.tokenizer import tiktoken_encoding
from gptoss_tune.errors import UserError
from gptoss_tune.export.exporter import export_run
from gptoss_tune.model.adapter import load_with_adapter
from gptoss_tune.serve.harmony_output import HarmonyOutputParser, StopMatcher
from gptoss_tune.serve.loading import load_for_serving
from gptoss_tune.serve.vllm import vllm_command


def _quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def run(tiny_ckpt, tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("serve_run"), tiny_ckpt, lora={"rank": 4, "alpha": 8})


@pytest.fixture(scope="module")
def peft_export(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("peft") / "adapter"
    export_run(run, "adapter", out, progress=_quiet)
    return out


@torch.no_grad()
def _logits(model):
    ids = torch.randint(0, 200000, (1, 10), generator=torch.Generator().manual_seed(0))
    return model(input_ids=ids).logits


def test_serve_loads_run_dirs_our_adapters_and_peft_exports(run, peft_export, tiny_ckpt):
    ref = _logits(load_with_adapter(run / "checkpoints/step-00000010", device="cpu"))
    m, name = load_for_serving(run, device="cpu")  # a run directory: its best checkpoint
    assert name == run.name
    torch.testing.assert_close(_logits(m), ref, atol=0, rtol=0)
    m, name = load_for_serving(tiny_ckpt, adapter=run / "checkpoints/step-00000010", device="cpu")
    torch.testing.assert_close(_logits(m), ref, atol=0, rtol=0)
    # the PEFT export, converted back to our layout on the MXFP4 base (alone, and as --adapter)
    m, _ = load_for_serving(peft_export, device="cpu")
    torch.testing.assert_close(_logits(m), ref, atol=1e-5, rtol=0)
    m, name = load_for_serving(tiny_ckpt, adapter=peft_export, device="cpu")
    torch.testing.assert_close(_logits(m), ref, atol=1e-5, rtol=0)
    assert name.endswith("+adapter")
    with pytest.raises(UserError, match="neither a gptoss_tune adapter"):
        load_for_serving(tiny_ckpt, adapter=tiny_ckpt, device="cpu")
    # --checkpoint picks among a run's checkpoints: anything else would silently serve something else
    with pytest.raises(UserError, match="--checkpoint last: applies to a training run directory, and .* is not one"):
        load_for_serving(tiny_ckpt, checkpoint="last", device="cpu")
    with pytest.raises(UserError, match="--checkpoint last: .* is served with --adapter"):
        load_for_serving(tiny_ckpt, adapter=peft_export, checkpoint="last", device="cpu")
    m, _ = load_for_serving(run, checkpoint="last", device="cpu")  # a run: fine
    # a PEFT adapter_config.json without its rank is one line, not a KeyError
    import json
    import shutil

    broken = peft_export.parent / "broken"
    shutil.copytree(peft_export, broken)
    cfg = json.loads((broken / "adapter_config.json").read_text())
    del cfg["r"]
    (broken / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"adapter_config.json: needs a numeric 'r' and 'lora_alpha' \(got None, "):
        load_for_serving(tiny_ckpt, adapter=broken, device="cpu")
    shutil.copy(peft_export / "adapter_config.json", broken / "adapter_config.json")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match=r"adapter_model.safetensors: unreadable \(.*\); export the adapter again"):
        load_for_serving(tiny_ckpt, adapter=broken, device="cpu")
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="adapter_model.safetensors is missing"):
        load_for_serving(tiny_ckpt, adapter=broken, device="cpu")


def test_print_vllm_command(run, peft_export, tiny_ckpt, tmp_path, capsys):
    from gptoss_tune.cli.main import main

    mx = tmp_path / "mx"
    export_run(run, "merged-mxfp4", mx, drift=False, progress=_quiet)
    cmd, notes = vllm_command(str(mx), port=9000, api_key="k")
    assert cmd[:3] == ["vllm", "serve", str(mx)]
    s = shlex.join(cmd)
    for opt in ("--tool-call-parser openai", "--enable-auto-tool-choice", "--reasoning-parser openai_gptoss",
                "--port 9000", "--api-key k", f"--served-model-name {mx.name}"):  # fmt: skip
        assert opt in s
    assert notes == []
    cmd, notes = vllm_command(str(tiny_ckpt), adapter=str(peft_export))
    s = shlex.join(cmd)
    assert f"--enable-lora --lora-modules adapter={peft_export} --max-lora-rank 8" in s  # rank 4 -> vLLM's 8
    assert any("expert LoRA" in n for n in notes)
    cmd2, _ = vllm_command(str(peft_export))  # the PEFT export alone: its base is the model
    assert cmd2[2] == str(tiny_ckpt) and "--enable-lora" in cmd2
    with pytest.raises(UserError, match="export first"):
        vllm_command(str(run))
    # an adapter exported before both expert slots were written: vLLM would assert; say how to fix it
    import json
    import shutil

    old = tmp_path / "old-adapter"
    shutil.copytree(peft_export, old)
    cfg = json.loads((old / "adapter_config.json").read_text())
    cfg["target_parameters"] = ["mlp.experts.down_proj"]
    (old / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="LoRA on down_proj only.*asserts both expert slots.*export it again"):
        vllm_command(str(old))
    assert main(["serve", "--print-vllm-command", str(mx)]) == 0
    assert capsys.readouterr().out.startswith(f"vllm serve {mx}")


def test_serve_keeps_a_merged_bf16_export_dense(run, tmp_path, caplog):
    """A merged-bf16 export is served as stock transformers computes it; re-quantising its experts to MXFP4
    on load (what the loader did) moves the logits by far more than the tolerance."""
    from helpers.reference import stock_model

    from gptoss_tune.model.experts import DenseExperts
    from gptoss_tune.model.loader import load_model

    merged = tmp_path / "merged"
    export_run(run, "merged-bf16", merged, progress=_quiet)
    served, _ = load_for_serving(merged, device="cpu")
    assert all(isinstance(layer.mlp.experts, DenseExperts) for layer in served.model.layers)
    want = _logits(stock_model(merged))
    torch.testing.assert_close(_logits(served), want, atol=2e-4, rtol=0)
    with caplog.at_level("WARNING"):
        requantised = _logits(load_model(merged, device="cpu"))  # the training loader's default: MXFP4
    assert (requantised - want).abs().max() > 1e-2
    assert "quantising them to MXFP4 on load" in caplog.text and "merged-bf16" in caplog.text


def test_stop_matcher():
    m = StopMatcher(["END", "xyz"])
    assert m.feed("abc E") == "abc "  # 'E' could start END: held back
    assert m.feed("N") == ""
    assert m.feed("D tail") == "" and m.stopped
    m = StopMatcher(["END"])
    assert m.feed("abc E") == "abc " and m.feed("x") == "Ex" and m.flush() == ""
    assert StopMatcher([]).feed("E") == "E"


def test_parser_falls_back_to_raw_text_for_an_untrained_model():
    enc = tiktoken_encoding()
    # not harmony at all: everything becomes content, special tokens dropped
    p = HarmonyOutputParser()
    for t in enc.encode("plain words<|end|> more", allowed_special="all"):
        p.feed(t)
    p.finish()
    assert "".join(p.content) == "plain words more"
    # harmony first, then garbage after a message: the parsed part stays, the rest passes through
    p = HarmonyOutputParser()
    for t in enc.encode("<|channel|>final<|message|>ok<|end|>junk", allowed_special="all"):
        p.feed(t)
    p.finish()
    assert "".join(p.content) == "okjunk"


def test_parser_drops_special_tokens_inside_message_text():
    """An undertrained model writes special tokens inside a message; harmony's parser keeps their names as
    text (`<|message|>`, `<|reserved_200319|>`), which no client should see."""
    enc = tiktoken_encoding()
    p = HarmonyOutputParser()
    text = "<|channel|>analysis<|message|>a<|message|>b<|reserved_200319|>c<|end|><|start|>assistant<|channel|>final<|message|>x<|constrain|>y<|return|>"
    for t in enc.encode(text, allowed_special="all"):
        p.feed(t)
    p.finish()
    assert "".join(p.reasoning) == "abc" and "".join(p.content) == "xy"


def test_demo_helper(run, tmp_path):
    from gptoss_tune.demo.ask import export_serve_and_ask

    lines = []
    reply = export_serve_and_ask(run, tmp_path / "export", max_tokens=4, progress=lines.append)
    assert reply.usage.completion_tokens <= 4 and reply.choices[0].finish_reason in ("length", "stop")
    assert any(
        "asked 'I get error E04 on my Velora City. How do I fix it?' through the openai client" in line
        for line in lines
    )
    assert (tmp_path / "export/config.json").is_file()


def test_serve_command_in_a_subprocess(run):
    """`gptoss-tune serve RUN_DIR` as a user runs it: loads the best checkpoint, answers, stops on SIGTERM."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", GPTOSS_TUNE_API_KEY="sk-sub")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gptoss_tune",
            "serve",
            str(run),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--served-model-name",
            "mine",
            "--log-level",
            "warning",
        ],  # fmt: skip
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for _ in range(240):  # bounded: up to 60 s for the model to load
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.25)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-sub", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="mine", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert r.usage.completion_tokens <= 3 and r.model == "mine"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "serving 'mine' on http://127.0.0.1:" in out and "Traceback" not in out
    # the context is the estimate from free memory (or the model's limit), and the request limits are shown
    assert re.search(r"context: \d+ tokens \((estimated: [\d.]+ GiB free hold|the model's limit)", out), out
    assert "request limits: 8388608 bytes, 2048 messages, strings of 131072 characters" in out


def test_sampling_follows_the_distribution_and_top_p():
    from gptoss_tune.serve.generate import sample_token

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample_token(logits, 1.0, 1.0, g) for _ in range(4000)]), minlength=4)
    assert torch.allclose(counts / 4000, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    # top_p 0.7 keeps {0.5, 0.3} (the smallest prefix reaching 0.7), renormalised to 5/8, 3/8
    counts = torch.bincount(torch.tensor([sample_token(logits, 1.0, 0.7, g) for _ in range(4000)]), minlength=4)
    assert counts[2:].sum() == 0 and abs(counts[0] / 4000 - 0.625) < 0.03
    assert sample_token(logits, 0.0, 1.0, g) == 0
    a = [sample_token(logits, 1.0, 1.0, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(a)) == 1  # the same seed, the same draw


def test_serve_cli_refuses_bad_flags_before_loading_the_model(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """Every flag mistake is one line and exit 2, before the model loads (minutes for 120b)."""
    import socket

    from gptoss_tune.cli.main import main

    monkeypatch.delenv("GPTOSS_TUNE_API_KEY", raising=False)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        cases = [
            (["--port", str(busy.getsockname()[1])], "Address already in use (another server is listening there"),
            (["--port", "70000"], "--port 70000: must be between 0 and 65535"),
            (["--max-model-len", "0"], "--max-model-len must be at least 1, got 0"),
            (["--max-concurrency", "0"], "--max-concurrency must be at least 1, got 0"),
            (["--device", "gpu0"], "--device 'gpu0': not a torch device; use cpu, cuda or cuda:N"),
            (["--host", "no-such-host.invalid", "--api-key", "k"], "--host no-such-host.invalid: cannot resolve"),
            (["--max-request-bytes", "0"], "--max-request-bytes must be a positive integer, got 0"),
            (["--max-messages", "-1"], "--max-messages must be a positive integer, got -1"),
            (["--max-string-chars", "0"], "--max-string-chars must be a positive integer, got 0"),
            (["--allowed-host", "http://proxy.example/"], "--allowed-host 'http://proxy.example/': give a host name"),
            (["--cors-origin", "app.example.com"], "--cors-origin 'app.example.com': give an origin"),
        ]
        if not torch.cuda.is_available():
            cases.append((["--device", "cuda"], "--device 'cuda': no CUDA device is available"))
        for flags, message in cases:
            assert main(["serve", str(tiny_ckpt), *flags]) == 2, flags
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err and "loading" not in err, (flags, err)
    finally:
        busy.close()
    (tmp_path / "empty").mkdir()
    for model_dir, message in ((tmp_path / "empty", "not a model directory (no config.json)"),
                               (tmp_path / "missing", "no such model directory")):  # fmt: skip
        assert main(["serve", "--print-vllm-command", str(model_dir)]) == 2
        assert message in capsys.readouterr().err
    assert main(["serve", "--print-vllm-command", "openai/gpt-oss-20b"]) == 0  # a hub id passes through to vLLM
    assert capsys.readouterr().out.startswith("vllm serve openai/gpt-oss-20b ")


def test_parser_streams_text_that_is_not_harmony_token_by_token():
    """Text in a harmony header is held until `<|message|>`; text that cannot be a header (plain text, a
    garbled header) is passed on as it arrives, not at the end. Real headers still parse."""
    enc = tiktoken_encoding()
    for text, first in (
        ("Plain words, never harmony." + " more" * 30, 0),
        ("<|channel|>final and then no message" + " more" * 30, 5),  # up to 3 words may follow the channel
        ("<|start|>assistant<|channel|>final<|message|>ok" + " more" * 30, 5),
        ("<|channel|>analysis<|message|>a<|end|><|start|>assistant" + " more" * 30, 7),
    ):
        p = HarmonyOutputParser()
        emitted = [i for i, t in enumerate(enc.encode(text, allowed_special="all")) if p.feed(t)]
        assert emitted[0] <= first and len(emitted) >= 30, (text, emitted[:5])
    p = HarmonyOutputParser(functions=True)
    call = " to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{}<|call|>"
    events = [e for t in enc.encode(call, allowed_special="all") for e in p.feed(t)]
    assert [e.kind for e in events] == ["tool_call", "tool_args"] and not p.content
