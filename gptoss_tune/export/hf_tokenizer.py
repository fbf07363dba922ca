"""Hugging Face tokenizer files for exported models, built from the real o200k_harmony vocabulary.

tokenizer.json comes from transformers' own tiktoken conversion (`TikTokenConverter`: byte-level BPE with
the merges recovered from the ranks, o200k's split regex, every harmony special token as an added token),
so `AutoTokenizer.from_pretrained(dir)` encodes exactly like tiktoken (tested on text with special tokens,
whitespace runs, digits and non-Latin scripts). The chat template renders plain chat exactly as
openai-harmony does (tested against the renderer): prompts as the server renders them, and a conversation
that ends with an assistant answer as training renders it (its chain of thought kept, `<|return|>` at the
end, so an SFT library using these files trains the stop token gpt-oss emits); content may be a string or
a list of text parts. Conversations with tools must go through
openai-harmony (vLLM and `gptoss-tune serve` do), and the template says so instead of rendering them wrong.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

from gptoss_tune.data.tokenizer import ensure_vocab, harmony_encoding, tiktoken_encoding
from gptoss_tune.model.config import BOS_ID, EOS_ID, PAD_ID

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# What gptoss_tune.data.harmony + openai-harmony render for plain chat (the server's and training's
# prompts): harmony's default system message with the reasoning effort, the leading system/developer
# messages as one developer message, earlier turns' final answers (their chain of thought dropped, as
# harmony does), and `<|start|>assistant` as the generation prompt.
CHAT_TEMPLATE = """\
{#- gpt-oss harmony format for plain chat (system, developer, user, assistant text), written by gptoss_tune.
    Content may be a string or a list of text parts. A conversation that ends with an assistant turn renders
    as harmony's training render does: that turn keeps its chain of thought (thinking/reasoning) and its
    final answer ends with <|return|>. Conversations with tools or tool calls must be rendered with
    openai-harmony. -#}
{%- macro text(c) -%}
{%- if c is string -%}{{ c }}
{%- elif c is iterable and c is not mapping -%}
{%- for p in c -%}
{%- if p is mapping and p.type == "text" and p.text is string -%}{{ p.text }}
{%- else -%}{{ raise_exception("content parts must be text parts ({'type': 'text', 'text': ...}); render others with openai-harmony") }}
{%- endif -%}
{%- endfor -%}
{%- else -%}{{ raise_exception("content must be a string or a list of text parts") }}
{%- endif -%}
{%- endmacro -%}
{%- if tools is defined and tools -%}
{{- raise_exception("this chat template renders plain chat only; render conversations with tools with openai-harmony (as vLLM and gptoss-tune serve do)") -}}
{%- endif -%}
{%- set effort = (reasoning_effort | lower) if (reasoning_effort is defined and reasoning_effort) else "medium" -%}
{%- if effort not in ["low", "medium", "high"] -%}
{{- raise_exception("reasoning_effort must be low, medium or high") -}}
{%- endif -%}
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06

Reasoning: {{ effort }}

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>
{#- Leading system/developer messages become one developer message; later ones stay in place. The trailing
    assistant turn starts after the last message that is not the assistant's. -#}
{%- set ns = namespace(head=[], in_head=true, last_other=-1) -%}
{%- for m in messages -%}
{%- if ns.in_head and m.role in ["system", "developer"] -%}
{%- set ns.head = ns.head + [text(m.content)] -%}
{%- else -%}
{%- set ns.in_head = false -%}
{%- endif -%}
{%- if m.role != "assistant" -%}
{%- set ns.last_other = loop.index0 -%}
{%- endif -%}
{%- endfor -%}
{%- if ns.head -%}
<|start|>developer<|message|># Instructions

{{ ns.head | join("\n\n") }}<|end|>
{%- endif -%}
{%- set n_head = ns.head | length -%}
{%- for m in messages[n_head:] -%}
{%- if m.role == "user" -%}
<|start|>user<|message|>{{ text(m.content) }}<|end|>
{%- elif m.role in ["system", "developer"] -%}
<|start|>developer<|message|># Instructions

{{ text(m.content) }}<|end|>
{%- elif m.role == "assistant" -%}
{%- if m.tool_calls is defined and m.tool_calls -%}
{{- raise_exception("this chat template renders plain chat only; render tool calls with openai-harmony") -}}
{%- endif -%}
{%- if m.content is not defined or m.content is none -%}
{{- raise_exception("an assistant message needs content") -}}
{%- endif -%}
{%- if loop.index0 + n_head > ns.last_other -%}
{#- the trailing turn keeps its chain of thought; earlier turns' is dropped, as harmony does -#}
{%- set thinking = m.thinking if (m.thinking is defined and m.thinking is not none) else (m.reasoning if (m.reasoning is defined and m.reasoning is not none) else (m.reasoning_content if (m.reasoning_content is defined and m.reasoning_content is not none) else "")) -%}
{%- set thinking = text(thinking) -%}
{%- if thinking -%}
<|start|>assistant<|channel|>analysis<|message|>{{ thinking }}<|end|>
{%- endif -%}
{%- endif -%}
<|start|>assistant<|channel|>final<|message|>{{ text(m.content) }}
{%- if loop.last and not add_generation_prompt -%}<|return|>{%- else -%}<|end|>{%- endif -%}
{%- else -%}
{{- raise_exception("role " + m.role + " is not plain chat; render it with openai-harmony") -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|start|>assistant
{%- endif -%}
"""


def build_tokenizer_json(path: Path) -> None:
    """Write tokenizer.json for o200k_harmony (about 28 MB; converted once per process, about 2 s)."""
    shutil.copyfile(_converted_tokenizer_json(), path)


@functools.lru_cache(maxsize=1)
def _converted_tokenizer_json() -> Path:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = tiktoken_encoding()
    names = special_token_names()
    # The converter appends added tokens in order after the 199,998 ranks, so ids must run without gaps.
    ids = sorted(names)
    if ids != list(range(ids[0], ids[0] + len(ids))) or ids[0] != len(enc._mergeable_ranks):
        raise RuntimeError("o200k_harmony special token ids are not contiguous after the ranks; cannot convert")
    tok = TikTokenConverter(
        vocab_file=str(ensure_vocab()), pattern=enc._pat_str, extra_special_tokens=[names[i] for i in ids]
    ).converted()
    for i in (ids[0], ids[-1]):
        if tok.token_to_id(names[i]) != i:
            raise RuntimeError(f"converted tokenizer put {names[i]} at {tok.token_to_id(names[i])}, not {i}")
    tmp = tempfile.mkdtemp(prefix="gptoss_tune-tokenizer-")
    atexit.register(shutil.rmtree, tmp, True)
    path = Path(tmp) / "tokenizer.json"
    tok.save(str(path))
    return path


def special_token_names() -> dict[int, str]:
    """id -> name of every o200k_harmony special token. tiktoken names id 200018 twice (<|endofprompt|> and
    <|reserved_200018|>); openai-harmony decodes it as the latter, which is kept."""
    names: dict[int, str] = {}
    for s, i in tiktoken_encoding()._special_tokens.items():
        if i in names:
            names[i] = harmony_encoding().decode([i])
        else:
            names[i] = s
    return names


def write_tokenizer_files(out_dir: str | Path, model_max_length: int = 131072) -> list[Path]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer_json(out / "tokenizer.json")
    names = special_token_names()
    special = {"bos_token": names[BOS_ID], "eos_token": names[EOS_ID], "pad_token": names[PAD_ID]}
    added = {
        str(i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, s in sorted(names.items())
    }
    config = {
        **special,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return [out / f for f in TOKENIZER_FILES]
