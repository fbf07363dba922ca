"""Export formats, each loaded by the stock library it targets and compared with our model.

References: transformers' own GptOssForCausalLM (which dequantises MXFP4 itself), stock PEFT's
`PeftModel.from_pretrained`, tiktoken and openai-harmony for the tokenizer files.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.reference import stock_model
from helpers.runs import make_run_dir
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gptoss_kernels.mxfp4 import dequantize
from gptoss_tune import load_model
from gptoss_tune.errors import UserError
from gptoss_tune.export.exporter import export_run
from gptoss_tune.export.peft_format import from_peft_state_dict, peft_config, to_peft_state_dict
from gptoss_tune.model.adapter import load_with_adapter
from gptoss_tune.model.lora import LoraSettings

LORAS = {
    "full": {"rank": 2, "alpha": 4},
    "attention": {"rank": 3, "alpha": 6, "experts": []},
    "experts": {"rank": 2, "alpha": 8, "attention": []},
    "down_only": {"rank": 2, "alpha": 4, "attention": ["q_proj", "v_proj"], "experts": ["down_proj"]},
    "gate_up_only": {"rank": 2, "alpha": 4, "attention": ["q_proj"], "experts": ["gate_up_proj"]},
}


def _ids(n=12, seed=0):
    return torch.randint(0, 201088, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits.float()


def _quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def full_run(tiny_ckpt, tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run_full"), tiny_ckpt, lora=LORAS["full"])


@pytest.fixture(scope="module")
def exports(full_run, tmp_path_factory):
    """The full run exported once in every format."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for fmt in ("adapter", "merged-bf16", "merged-mxfp4"):
        out[fmt] = root / fmt
        out[fmt + ":report"] = export_run(full_run, fmt, root / fmt, progress=_quiet)
    return out


# ---- adapter --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "attention", "experts", "down_only", "gate_up_only", "router"])
def test_adapter_loads_in_stock_peft_with_our_logits(kind, tiny_ckpt, tmp_path):
    from peft import PeftModel

    lora = LORAS["full" if kind == "router" else kind]
    run = make_run_dir(tmp_path / "run", tiny_ckpt, lora=lora, train_router=kind == "router", seed=3)
    printed = []
    export_run(run, "adapter", tmp_path / "out", progress=printed.append)
    printed = "\n".join(printed)
    # vLLM's gpt-oss LoRA loader asserts both expert slots (bare `experts` = down_proj, `experts.base_layer` =
    # gate_up_proj): an adapter with any expert LoRA has both, the untrained one all zeros.
    peft_state = load_file(tmp_path / "out/adapter_model.safetensors")
    if lora.get("experts", ["x"]):
        for layer in range(2):
            for slot in ("experts.base_layer", "experts"):
                for ab in "AB":
                    assert f"base_model.model.model.layers.{layer}.mlp.{slot}.lora_{ab}.weight" in peft_state
        untrained = {"down_only": "experts.base_layer", "gate_up_only": "experts"}.get(kind)
        if untrained:
            assert not peft_state[f"base_model.model.model.layers.0.mlp.{untrained}.lora_B.weight"].any()
        targets = json.loads((tmp_path / "out/adapter_config.json").read_text())["target_parameters"]
        assert targets == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    if kind == "router":  # vLLM rejects modules_to_save: said, and no vLLM command is offered
        assert "warning: this adapter also trained the router" in printed and "vllm serve" not in printed
    else:
        assert f"vllm serve {tiny_ckpt} " in printed
        assert f"--enable-lora --lora-modules out={tmp_path / 'out'} --max-lora-rank 8" in printed
    ids = _ids()
    ours = _logits(load_with_adapter(run / "checkpoints/step-00000010", device="cpu"), ids)
    base = stock_model(tiny_ckpt)
    untuned = _logits(base, ids)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()
    got = _logits(peft_model, ids)
    assert (ours - untuned).abs().max() > 0.1  # the adapter matters, so equality below means something
    torch.testing.assert_close(got, ours, atol=2e-4, rtol=0)
    cfg = json.loads((tmp_path / "out/adapter_config.json").read_text())
    assert cfg["lora_dropout"] == 0.0 and cfg["r"] == lora["rank"]
    assert not (tmp_path / "out/config.json").exists()  # it would make transformers treat the dir as a full model


def test_wrong_expert_order_would_be_caught(tiny_ckpt, exports, tmp_path):
    """Negative control: B laid out expert-major (the wrong guess) gives different logits in stock PEFT."""
    import shutil

    from peft import PeftModel

    bad = tmp_path / "bad"
    shutil.copytree(exports["adapter"], bad)
    state = load_file(bad / "adapter_model.safetensors")
    E = 8
    for k, t in state.items():
        if ".experts." in k and "lora_B" in k:
            out, rE = t.shape
            state[k] = t.reshape(out, rE // E, E).permute(0, 2, 1).reshape(out, rE).contiguous()
    save_file(state, bad / "adapter_model.safetensors")
    ids = _ids()
    good = _logits(PeftModel.from_pretrained(stock_model(tiny_ckpt), str(exports["adapter"])).eval(), ids)
    wrong = _logits(PeftModel.from_pretrained(stock_model(tiny_ckpt), str(bad)).eval(), ids)
    assert (good - wrong).abs().max() > 1e-2


def test_transformers_loads_adapter_dir_through_its_peft_integration(exports, full_run):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    m = (
        AutoModelForCausalLM.from_pretrained(str(exports["adapter"]), dtype=torch.float32).eval().float()
    )  # 5.17: bf16 experts
    ids = _ids(seed=1)
    ours = _logits(load_with_adapter(full_run / "checkpoints/step-00000010", device="cpu"), ids)
    torch.testing.assert_close(_logits(m, ids), ours, atol=2e-4, rtol=0)


@pytest.mark.parametrize("kind", ["full", "experts", "down_only"])
def test_peft_mapping_round_trips(kind):
    s = LoraSettings.coerce(LORAS[kind])
    E, H, I, r = 4, 32, 48, s.rank
    g = torch.Generator().manual_seed(0)
    dims = {"gate_up_proj": (H, 2 * I), "down_proj": (I, H)}
    state = {}
    for p in s.experts:
        state[f"model.layers.0.mlp.experts.{p}_lora_A"] = torch.randn(E, r, dims[p][0], generator=g)
        state[f"model.layers.0.mlp.experts.{p}_lora_B"] = torch.randn(E, dims[p][1], r, generator=g)
    for p in s.attention:
        state[f"model.layers.1.self_attn.{p}.lora_A.default.weight"] = torch.randn(r, H, generator=g)
        state[f"model.layers.1.self_attn.{p}.lora_B.default.weight"] = torch.randn(H, r, generator=g)
    peft_state = to_peft_state_dict(state, s)
    if len(s.experts) == 2:
        assert peft_state["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"].shape == (
            2 * I,
            r * E,
        )
        assert peft_state["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].shape == (r * E, I)
    back = from_peft_state_dict(peft_state, s, E)
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k]), k
    assert peft_config(s, "base").lora_dropout == 0.0


# ---- merged bf16 ----------------------------------------------------------------------------------


def test_merged_bf16_loads_in_stock_transformers(exports, full_run, tiny_ckpt):
    out = exports["merged-bf16"]
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    with safe_open(str(out / "model-00002-of-00004.safetensors"), "pt") as f:
        gu = f.get_tensor("model.layers.0.mlp.experts.gate_up_proj")
        dn = f.get_tensor("model.layers.0.mlp.experts.down_proj")
    assert gu.dtype == dn.dtype == torch.bfloat16
    assert tuple(gu.shape) == (8, 64, 128) and tuple(dn.shape) == (8, 64, 64)  # [E, H, 2I], [E, I, H]
    ids = _ids(seed=2)
    ours = _logits(load_with_adapter(full_run / "checkpoints/step-00000010", device="cpu"), ids)
    untuned = _logits(load_model(tiny_ckpt, device="cpu"), ids)
    got = _logits(stock_model(out), ids)
    # Merged weights are rounded to bf16: measured max |diff| 0.02 on logits of magnitude ~5, against a
    # tuning effect of ~3 (the test's tolerance is 0.1).
    assert (got - ours).abs().max() < 0.1
    assert (untuned - ours).abs().max() > 1.0


def test_merged_bf16_is_merged_in_fp32_and_rounded_once(exports, full_run, tiny_ckpt):
    """Every merged tensor is bf16(fp32(W) + s·B·A): one rounding (a bf16 sum would round twice and lose
    the small updates bf16 can still carry)."""
    lora = load_file(full_run / "checkpoints/step-00000010/adapter.safetensors")
    s = 4 / 2  # alpha / rank of LORAS["full"]
    base, merged = {}, {}
    for f in tiny_ckpt.glob("*.safetensors"):
        base.update(load_file(f))
    for f in exports["merged-bf16"].glob("*.safetensors"):
        merged.update(load_file(f))
    for layer in range(2):
        p = f"model.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            a, b = (lora[f"{p}self_attn.{proj}.lora_{x}.default.weight"].float() for x in "AB")
            want = (base[f"{p}self_attn.{proj}.weight"].float() + s * (b @ a)).to(torch.bfloat16)
            assert torch.equal(merged[f"{p}self_attn.{proj}.weight"], want), proj
        for proj in ("gate_up_proj", "down_proj"):
            e = f"{p}mlp.experts.{proj}"
            for x in range(8):
                w = dequantize(base[f"{e}_blocks"][x], base[f"{e}_scales"][x], torch.float32)
                delta = s * (lora[f"{e}_lora_B"][x].float() @ lora[f"{e}_lora_A"][x].float())
                assert torch.equal(merged[e][x], (w + delta).t().to(torch.bfloat16)), (e, x)


# ---- merged mxfp4 ---------------------------------------------------------------------------------


def _tensor_layout(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                out[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


def test_merged_mxfp4_has_the_original_layout_and_loads_in_stock_transformers(exports, tiny_ckpt):
    out = exports["merged-mxfp4"]
    assert _tensor_layout(out) == _tensor_layout(tiny_ckpt)
    cfg, base_cfg = (json.loads((d / "config.json").read_text()) for d in (out, tiny_ckpt))
    assert cfg == base_cfg  # same config.json, quantization_config included
    ids = _ids(seed=4)
    ours = _logits(load_model(out, device="cpu"), ids)
    torch.testing.assert_close(_logits(stock_model(out), ids), ours, atol=2e-4, rtol=0)
    rep = exports["merged-mxfp4:report"]
    assert json.loads((out / "export_report.json").read_text())["requantization"] == rep["requantization"]
    for proj in ("gate_up_proj", "down_proj"):
        s = rep["requantization"][proj]
        assert 0 < s["relative_error"] < 0.2 and 0 < s["lora_update_retained"] < 1.5
    d = rep["drift"]
    assert d["prompts"] == 4 and 0 <= d["export_vs_tuned"]["top1_agreement"] <= 1
    assert d["base_vs_tuned"]["max_abs_logit_diff"] > 0
    # the export keeps the tuning: it is far closer to the tuned model than the untuned base is
    assert d["export_vs_tuned"]["mean_kl"] < 0.5 * d["base_vs_tuned"]["mean_kl"]


def test_mxfp4_requantisation_is_lossless_without_expert_lora(tiny_ckpt, tmp_path):
    run = make_run_dir(tmp_path / "run", tiny_ckpt, lora=LORAS["attention"])
    rep = export_run(run, "merged-mxfp4", tmp_path / "out", drift=False, progress=_quiet)
    assert rep["requantization"]["gate_up_proj"]["relative_error"] == 0.0
    assert "drift" not in rep

    def experts(d):
        t = {}
        for f in d.glob("*.safetensors"):
            t.update({k: v for k, v in load_file(f).items() if "experts" in k and not k.endswith("_bias")})
        return t

    a, b = experts(tiny_ckpt), experts(tmp_path / "out")
    for k in a:
        if k.endswith("_blocks"):
            s = k.replace("_blocks", "_scales")
            assert torch.equal(dequantize(a[k], a[s], torch.float32), dequantize(b[k], b[s], torch.float32)), k


def test_merge_from_a_bf16_base(tiny_ckpt, exports, tmp_path):
    """A dense bf16 base (experts `gate_up_proj`/`down_proj`): merged-bf16 equals stock PEFT on that base."""
    from peft import PeftModel

    bf16_base = exports["merged-bf16"]  # any dense bf16 gpt-oss checkpoint will do as a base
    run = make_run_dir(tmp_path / "run", bf16_base, lora=LORAS["full"], seed=5)
    export_run(run, "adapter", tmp_path / "adapter", progress=_quiet)
    export_run(run, "merged-bf16", tmp_path / "merged", progress=_quiet)
    ids = _ids(seed=6)
    ref = _logits(PeftModel.from_pretrained(stock_model(bf16_base), str(tmp_path / "adapter")).eval(), ids)
    base = _logits(stock_model(bf16_base), ids)
    got = _logits(stock_model(tmp_path / "merged"), ids)
    assert (got - ref).abs().max() < 0.1 < (base - ref).abs().max()


# ---- streaming ------------------------------------------------------------------------------------


def test_merge_streams_one_layer_at_a_time(tmp_path):
    from gptoss_tune.model.tiny import write_tiny_checkpoint

    peaks = {}
    for layers in (2, 4):
        # A small vocabulary so that a layer, not the embedding, is the largest shard.
        base = write_tiny_checkpoint(tmp_path / f"base{layers}", layers=layers, vocab=1024, hidden=64, intermediate=128)
        cfg = json.loads((base / "config.json").read_text())
        cfg.update(pad_token_id=0, eos_token_id=1)
        (base / "config.json").write_text(json.dumps(cfg))
        run = make_run_dir(tmp_path / f"run{layers}", base)
        rep = export_run(run, "merged-bf16", tmp_path / f"out{layers}", progress=_quiet)
        peaks[layers] = rep["peak_shard_bytes"]
        assert rep["shards"] == layers + 2
        E, H, I = 8, 64, 128
        experts = (E * H * 2 * I + E * I * H + E * 2 * I + E * H) * 2
        attention = ((64 * 64 + 64) * 2 + (32 * 64 + 32) * 2 + 4) * 2  # q,o + k,v (+ biases) + sinks, bf16
        layer_bytes = experts + attention + (E * 64 + E) * 2 + 2 * 64 * 2
        assert rep["peak_shard_bytes"] == layer_bytes  # the largest set of tensors held is one layer
        assert rep["total_bytes"] > (layers - 0.5) * layer_bytes
    assert peaks[2] == peaks[4]


# ---- tokenizer, card, errors ----------------------------------------------------------------------


def test_exported_tokenizer_matches_tiktoken_and_harmony(exports):
    from openai_harmony import Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent
    from transformers import AutoTokenizer

    from gptoss_tune.data.tokenizer import harmony_encoding, tiktoken_encoding

    for fmt in ("adapter", "merged-mxfp4"):
        tok = AutoTokenizer.from_pretrained(str(exports[fmt]))
        enc = tiktoken_encoding()
        for text in [
            "Hello, world!  Two  spaces\n\n\ttab 1234567 3.14159",
            "<|start|>user<|message|>Grüße, 你好, مرحبا 🎉<|end|><|start|>assistant",
            "def f(x):\n    return x ** 2  # comment\n",
        ]:
            assert tok.encode(text, add_special_tokens=False) == enc.encode(text, allowed_special="all"), text
            assert tok.decode(enc.encode(text, allowed_special="all")) == text
        assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (200002, 199999, 199998)

    # The chat template against the server's prompts (harmony_messages rendered by openai-harmony).
    from gptoss_tune.serve.openai_schema import parse_request
    from gptoss_tune.serve.prompt import render_prompt

    convs = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Answer in French."}, {"role": "developer", "content": "Be brief."},
         {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Salut !", "thinking": "greet back"},
         {"role": "user", "content": "How are you?"}],
        [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "system", "content": "Now be terse."},
         {"role": "user", "content": "C"}],
    ]  # fmt: skip
    for msgs, effort in zip(convs, ("low", "high", None)):
        kw = {"reasoning_effort": effort} if effort else {}
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **kw)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        want = render_prompt(parse_request({"model": "m", "messages": msgs, **kw}))
        assert list(ids) == want, h_decode(want)
    # and against a conversation built by hand with openai-harmony
    h = harmony_encoding()
    conv = Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(ReasoningEffort.LOW)),
        Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions("Answer in French.")),
        Message.from_role_and_content(Role.USER, "Hi"),
    ])  # fmt: skip
    ids = tok.apply_chat_template([{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
                                  add_generation_prompt=True, tokenize=True, reasoning_effort="low")  # fmt: skip
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert list(ids) == list(h.render_conversation_for_completion(conv, Role.ASSISTANT))
    with pytest.raises(Exception, match="openai-harmony"):
        tok.apply_chat_template(
            msgs, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}], tokenize=False
        )


def _harmony_cases():
    """The held conversations of the data tests (messages and the harmony messages built by hand for them)."""
    import importlib.util
    from pathlib import Path

    f = Path(__file__).parents[1] / "data" / "test_harmony_messages.py"
    spec = importlib.util.spec_from_file_location("_held_harmony_cases", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.CASES


def test_exported_chat_template_renders_the_harmony_training_ids(exports):
    """A conversation ending with an assistant answer renders as harmony's training render (openai-harmony on
    the hand-built messages): list-of-text-parts content, the trailing turn's chain of thought, `<|return|>`."""
    from openai_harmony import Conversation, RenderConversationConfig
    from transformers import AutoTokenizer

    from gptoss_tune.data.tokenizer import harmony_encoding

    tok = AutoTokenizer.from_pretrained(str(exports["adapter"]))
    enc = harmony_encoding()
    plain = {k: v for k, v in _harmony_cases().items() if "tools" not in v[0]}
    assert len(plain) >= 7 and any(isinstance(m["content"], list) for k, _ in plain.values() for m in k["messages"])
    for name, (kwargs, expected) in plain.items():
        want = enc.render_conversation_for_training(
            Conversation.from_messages(expected), RenderConversationConfig(auto_drop_analysis=False)
        )
        extra = {"reasoning_effort": kwargs["reasoning_effort"]} if "reasoning_effort" in kwargs else {}
        ids = tok.apply_chat_template(kwargs["messages"], tokenize=True, **extra)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        assert list(ids) == list(want), f"{name}\nours: {enc.decode(list(ids))!r}\nwant: {enc.decode(want)!r}"
        assert want[-1] == enc.encode("<|return|>", allowed_special="all")[0]
    # a prompt whose content is a list of text parts renders as the server renders it
    from gptoss_tune.serve.openai_schema import parse_request
    from gptoss_tune.serve.prompt import render_prompt

    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert list(ids) == render_prompt(parse_request({"model": "m", "messages": msgs}))
    with pytest.raises(Exception, match="text parts"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], tokenize=False)


def h_decode(ids):
    from gptoss_tune.data.tokenizer import harmony_encoding

    return harmony_encoding().decode_utf8(ids)


def test_model_card_and_self_contained_dirs(exports, full_run):
    for fmt in ("adapter", "merged-bf16", "merged-mxfp4"):
        d = exports[fmt]
        for f in (
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
            "README.md",
        ):
            assert (d / f).is_file(), (fmt, f)
        card = (d / "README.md").read_text()
        assert card.startswith("---\nbase_model: ")
        assert "library_name: " + ("peft" if fmt == "adapter" else "transformers") in card
        assert "rank: 2" in card  # the recipe
        assert "| final eval loss | 10 | 1.2500 |" in card
        assert '"tokens": 3456' in card  # the data summary
    assert "re-quantisation" in (exports["merged-mxfp4"] / "README.md").read_text()


def test_export_errors(tiny_ckpt, full_run, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/file").write_text("x")
    with pytest.raises(UserError, match="exists and is not empty.*--force"):
        export_run(full_run, "adapter", tmp_path / "busy", progress=_quiet)
    with pytest.raises(UserError, match="--format 'gguf'"):
        export_run(full_run, "gguf", tmp_path / "o", progress=_quiet)
    with pytest.raises(UserError, match="not a checkpoint directory"):
        export_run(full_run, "adapter", tmp_path / "o", checkpoint="checkpoints/step-99", progress=_quiet)
    with pytest.raises(UserError, match="does not exist"):
        export_run(tmp_path / "nope", "adapter", tmp_path / "o", progress=_quiet)
    from gptoss_tune.model.tiny import write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "other", layers=3)
    with pytest.raises(UserError, match="trained on num_hidden_layers=2.*--base"):
        export_run(full_run, "adapter", tmp_path / "o", base=other, progress=_quiet)
    for target in (full_run, full_run / "checkpoints", tiny_ckpt, tiny_ckpt.parent):
        with pytest.raises(UserError, match="overlaps the input"):
            export_run(full_run, "merged-bf16", target, force=True, progress=_quiet)
    assert (tiny_ckpt / "config.json").is_file() and (full_run / "best.json").is_file()
    bad = make_run_dir(tmp_path / "badrun", tiny_ckpt)
    f = bad / "checkpoints/step-00000010/adapter.safetensors"
    st = load_file(f)
    st["model.layers.0.self_attn.q_proj.lora_B.default.weight"][0, 0] = float("nan")
    save_file(st, f)
    with pytest.raises(UserError, match="q_proj.lora_B.*NaN"):
        export_run(bad, "merged-bf16", tmp_path / "o", progress=_quiet)
    assert not (tmp_path / "o").exists()


def test_interrupted_export_leaves_nothing(full_run, tmp_path, monkeypatch):
    import gptoss_tune.export.exporter as exporter

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "write_tokenizer_files", boom)
    with pytest.raises(KeyboardInterrupt):
        export_run(full_run, "merged-bf16", tmp_path / "out", progress=_quiet)
    assert list(tmp_path.iterdir()) == []


def test_export_cli(full_run, tmp_path, capsys):
    from gptoss_tune.cli.main import main

    assert main(["export", str(full_run), "--format", "adapter", "--out", str(tmp_path / "a")]) == 0
    assert "wrote adapter export" in capsys.readouterr().out
    assert main(["export", str(full_run), "--format", "adapter", "--out", str(tmp_path / "a")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_export_refuses_an_unwritable_out_and_a_bad_device_and_reports_a_full_disk(full_run, tmp_path, monkeypatch):
    import errno

    import gptoss_tune.export.exporter as export

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match=r"--out .*a-file/out: cannot create it \(.*\); choose a writable directory"):
        export_run(full_run, "merged-bf16", tmp_path / "a-file" / "out", progress=_quiet)
    with pytest.raises(UserError, match="--device 'gpu0': not a torch device"):
        export_run(full_run, "merged-mxfp4", tmp_path / "o", device="gpu0", progress=_quiet)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_file", full_disk)
    with pytest.raises(UserError, match=r"^--out .*/o: the disk filled up .*needs about .* free.*nothing was written$"):
        export_run(full_run, "merged-bf16", tmp_path / "o", progress=_quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no partial export, no temporary left


def shutil_usage(free):
    import shutil

    return shutil._ntuple_diskusage(10**12, 10**12 - free, free)


def _dir_bytes(d):
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),
        RuntimeError(
            "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file: unexpected pos 3456"
        ),
        "safetensors",
    ],
)
def test_a_full_disk_is_one_line_naming_out_and_the_space_needed(
    error, exports, full_run, tmp_path, monkeypatch, capsys
):
    """safetensors and torch report a full disk in their own words (not OSError): one line, exit 2, --out named,
    the space needed estimated from what the export writes; nothing is left under --out or beside it."""
    import gptoss_tune.export.exporter as export
    from gptoss_tune.cli.main import main

    if error == "safetensors":
        from safetensors import SafetensorError

        error = SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )
    calls = []

    def fills_up(*a, **k):  # the second shard does not fit
        calls.append(1)
        if len(calls) == 2:
            raise error
        return save_file(*a, **k)

    monkeypatch.setattr(export, "save_file", fills_up)
    out = tmp_path / "out"
    assert main(["export", str(full_run), "--format", "merged-bf16", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert f"--out {out}: the disk filled up" in err and "free some space or choose another --out" in err
    shortfall = []
    monkeypatch.setattr(export.shutil, "disk_usage", lambda p: shutil_usage(0))
    monkeypatch.setattr(export, "save_file", save_file)
    export_run(full_run, "adapter", out, progress=shortfall.append)  # a warning before it starts, not a refusal
    assert any(
        "warning: this export writes about" in line and "is free on the disk of --out" in line for line in shortfall
    )
    import shutil as _shutil

    _shutil.rmtree(out)
    needed = (
        float(err.split("needs about ")[1].split()[0]) * {"MB": 1e6, "GB": 1e9}[err.split("needs about ")[1].split()[1]]
    )
    real = _dir_bytes(exports["merged-bf16"])  # the same export, written where there was room
    assert 0.8 * real < needed < 1.5 * real, (needed, real)
    assert list(tmp_path.iterdir()) == []


def test_an_adapter_export_onto_a_full_disk_names_out_not_the_tokenizer_source(full_run, tmp_path, monkeypatch):
    import gptoss_tune.export.hf_tokenizer as hft

    def full(path):  # copying tokenizer.json from the converted copy in the system temp directory
        raise OSError(28, "No space left on device", "/tmp/gptoss_tune-tokenizer-abc123/tokenizer.json")

    monkeypatch.setattr(hft, "build_tokenizer_json", full)
    with pytest.raises(UserError) as e:
        export_run(full_run, "adapter", tmp_path / "ad", progress=_quiet)
    assert str(e.value).startswith(
        f"--out {tmp_path / 'ad'}: the disk filled up"
    ) and "gptoss_tune-tokenizer" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_a_file_is_refused_and_never_replaced(full_run, tmp_path, capsys):
    from gptoss_tune.cli.main import main

    f = tmp_path / "model.bin"
    f.write_text("precious")
    for force in ([], ["--force"]):
        assert main(["export", str(full_run), "--format", "adapter", "--out", str(f), *force]) == 2
        err = capsys.readouterr().err
        assert f"--out {f}: is a file, not a directory" in err and "not empty" not in err
        assert f.read_text() == "precious"
    with pytest.raises(UserError, match="is a file, not a directory"):
        export_run(full_run, "merged-bf16", f, force=True, progress=_quiet)
    assert f.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]
    # a symbolic link would be replaced by the export's rename, not filled: refused, the link and target kept
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(UserError, match="is a symbolic link; pass the directory it points to"):
        export_run(full_run, "adapter", tmp_path / "link", force=True, progress=_quiet)
    assert (tmp_path / "link").is_symlink() and list((tmp_path / "target").iterdir()) == []


_KILLED_EXPORT = """
import os, signal, sys
from gptoss_tune.export.exporter import export_run

def progress(line):
    if "layer 0: written" in line:  # the first layer's shard is on disk
        os.kill(os.getpid(), signal.SIGKILL)

export_run(sys.argv[1], "merged-bf16", sys.argv[2], progress=progress)
"""


def test_a_killed_export_leaves_a_temporary_that_the_next_export_removes(full_run, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "exports" / "merged"
    r = subprocess.run(
        [sys.executable, "-c", _KILLED_EXPORT, str(full_run), str(out)], env=dict(os.environ), timeout=120
    )
    assert r.returncode == -signal.SIGKILL
    left = [p for p in out.parent.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".merged.") and not out.exists()
    assert any(f.suffix == ".safetensors" for f in left[0].iterdir())  # a shard was written before the kill
    # Things that are not ours (or not stale) stay: a user's hidden directory, a file named like ours, our
    # temporary of a live process (this one), another program's temporary.
    from gptoss_tune.export.out_dir import _host

    h = _host()
    keep = [out.parent / ".merged.tmp-123", out.parent / f".other.gptoss-tune-export-{h}-1-x", out.parent / "notes"]
    keep[0].mkdir()
    (keep[0] / "x").write_text("user data")
    keep[1].write_text("a file, not our directory")
    live = out.parent / f".merged.gptoss-tune-export-{h}-{os.getpid()}-live"
    elsewhere = (
        out.parent / ".merged.gptoss-tune-export-00000000-999999999-x"
    )  # another machine's: its pid means nothing here
    for d in (live, elsewhere):
        d.mkdir()
        (d / ".gptoss-tune-export-in-progress").write_text("")
    keep += [live, elsewhere]
    keep[2].mkdir()
    printed = []
    export_run(full_run, "adapter", out.parent / "adapter", progress=printed.append)
    assert not left[0].exists() and any(f"removed {left[0]}" in line for line in printed)
    assert all(p.exists() for p in keep)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([*(p.name for p in keep), "adapter"])
    # killed between moving the previous export aside (for --force) and renaming the new one in: the previous
    # export is put back, not deleted
    aside = out.parent / f".adapter.gptoss-tune-replaced-{h}-999999999"
    (out.parent / "adapter").rename(aside)
    export_run(full_run, "adapter", out.parent / "again", progress=printed.append)
    assert (out.parent / "adapter/adapter_config.json").is_file() and not aside.exists()


def test_export_base_with_a_wrong_shape_tensor_is_one_line(full_run, tiny_ckpt, tmp_path, capsys):
    import shutil

    from gptoss_tune.cli.main import main

    bad = tmp_path / "bad-base"
    shutil.copytree(tiny_ckpt, bad)
    st = load_file(bad / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    want = list(st[name].shape)
    st[name] = torch.zeros(want[0], want[1] // 2, dtype=st[name].dtype)
    save_file(st, bad / "model.safetensors", metadata={"format": "pt"})
    for fmt in ("merged-bf16", "merged-mxfp4"):
        assert main(["export", str(full_run), "--format", fmt, "--base", str(bad), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        assert f"'{name}' has shape [{want[0]}, {want[1] // 2}], expected {want}" in err
        assert "pass the --base the adapter was trained on" in err
    assert not (tmp_path / "o").exists()
