"""Token generation for serving: a KV-cache sampling loop, one token per call, and a scripted stand-in.

`ModelTokenSource.start(prompt_ids, params)` returns a `Generation` whose `next_token()` runs one forward
step: the prompt once (prefill, logits for its last position only), then each new token alone against
transformers' DynamicCache (sliding-window layers keep their window), so no prefix is ever recomputed.

Prefill memory grows linearly with the prompt. On CUDA the prompt goes through in one pass: from
FLEX_MIN_PREFILL (1,024) tokens the sink attention takes its flex route, which never builds the
[prompt x prompt] score matrix. On the CPU attention is dense math, so the prompt goes through in chunks
against the KV cache (`prefill_chunk_size`): each chunk's scores are [heads, chunk, tokens so far], and
the chunk shrinks as the prompt grows so they stay near PREFILL_SCORE_BUDGET (before: one 10,052-token
prompt on the tiny model peaked at 5.5 GB of [4, 10k, 10k] fp32 scores and their copies).
Each chunk takes the model's lock on its own, so other requests' tokens go on while a long prompt fills.
Experts stay MXFP4 (the model is `load_model`'s). Sampling: temperature 0 is greedy; otherwise softmax
at the temperature, nucleus (top_p) filtering, on the model's device, with a per-request torch.Generator
when a seed is given, so a seeded request is reproducible (on the same kind of device) whatever runs
beside it. Generation stops on the harmony stop tokens of
assistant actions (<|return|>, <|call|>), on <|endoftext|>, or at max_tokens.

One step per call lets the server run steps in worker threads and notice a cancelled request between
tokens. Each call enters torch.inference_mode itself (it is thread-local, and steps of one request may
run on different threads). Concurrent requests share one model, and their steps take turns on it (a
lock per model): a forward at a time, their tokens interleaving. Running forwards of one model from
several threads at once gains nothing on a GPU (one stream) or on the CPU (the cores are shared), and
is not safe: the first long prompt compiles flex attention (torch.compile is not thread-safe), the
first call of each Triton kernel shape autotunes by timing it (concurrent timings are wrong), and the
block-mask cache is a shared dict.

`ScriptedTokenSource` emits chosen harmony completions instead of sampling: tests drive the real server,
renderer and parser with it deterministically.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gptoss_tune.data.tokenizer import tiktoken_encoding
from gptoss_tune.model.config import CALL_ID, EOS_ID, PAD_ID

# openai-harmony's stop_tokens_for_assistant_actions() (<|return|>, <|call|>), plus <|endoftext|>, which the
# published generation_config.json also stops on (eos_token_id [200002, 199999, 200012]), as transformers'
# generate and vLLM do: text after it is not part of the answer.
STOP_TOKENS = (EOS_ID, CALL_ID, PAD_ID)

# Dense attention of q query rows against k keys holds about this many bytes per (head, row, key) at its
# peak: fp32 scores, their masked copy, the fp32 probabilities, their copy in the value dtype, the bool mask.
DENSE_ATTENTION_BYTES = 16
PREFILL_SCORE_BUDGET = 512 * 2**20  # bytes of one chunk's attention temporaries, while the chunk >= MIN
MIN_PREFILL_CHUNK = 32  # below this the per-forward overhead dominates; temporaries then grow linearly
MAX_PREFILL_CHUNK = 1024


def prefill_chunk_size(prompt_len: int, num_heads: int, device: torch.device) -> int:
    """Tokens per prefill forward: the whole prompt on CUDA (the flex route is memory-linear), else a chunk
    whose dense scores against the whole prompt fit PREFILL_SCORE_BUDGET (at least MIN_PREFILL_CHUNK rows)."""
    if torch.device(device).type == "cuda":
        return max(prompt_len, 1)
    rows = PREFILL_SCORE_BUDGET // max(1, num_heads * prompt_len * DENSE_ATTENTION_BYTES)
    return max(MIN_PREFILL_CHUNK, min(MAX_PREFILL_CHUNK, rows))


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = STOP_TOKENS


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token id from a [vocab] logits vector, on the logits' device.

    Sampling is the exponential race (argmax of p_i / E_i with E_i ~ Exp(1)), which draws exactly from p
    and takes half the time of torch.multinomial over the 201k vocabulary (13 vs 28 ms on a CPU core).
    """
    logits = logits.float()
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(probs, dim=-1) - probs < top_p  # the smallest prefix reaching top_p (at least one)
        probs = probs * keep
    noise = torch.empty_like(probs).exponential_(generator=generator)
    i = int(torch.argmax(probs / noise))
    return int(order[i]) if order is not None else i


class Generation:
    """One request's generation state; `next_token()` returns the next id, or None when finished.

    Subclasses produce tokens in `_step()` (None: nothing more to say); the stop and length rules are here.
    """

    params: SamplingParams
    finish_reason: str | None = None  # "stop" (a stop token) or "length"
    generated: int = 0

    def next_token(self) -> int | None:
        if self.finish_reason is not None:
            return None
        if self.generated >= self.params.max_tokens:
            self.finish_reason = "length"
            return None
        tok = self._step()
        if tok is None:
            self.finish_reason = "stop"
            return None
        self.generated += 1
        if tok in self.params.stop_token_ids:
            self.finish_reason = "stop"
        elif self.generated >= self.params.max_tokens:
            self.finish_reason = "length"
        return tok

    def _step(self) -> int | None:  # pragma: no cover - interface
        raise NotImplementedError


class _ModelGeneration(Generation):
    def __init__(self, source: "ModelTokenSource", prompt_ids: Sequence[int], params: SamplingParams):
        from transformers import DynamicCache

        self.source = source
        self.params = params
        self.prompt = list(prompt_ids)
        self.cache = DynamicCache(config=source.model.config)
        self.last: int | None = None
        self.generator = torch.Generator(source.device).manual_seed(params.seed) if params.seed is not None else None
        self.forward_lengths: list[int] = []  # tokens fed per forward (tests check there is no recompute)

    def _step(self) -> int:
        if self.last is None:
            size = self.source.prefill_chunk or prefill_chunk_size(
                len(self.prompt), self.source.num_heads, self.source.device
            )
            feeds = [self.prompt[i : i + size] for i in range(0, len(self.prompt), size)]
        else:
            feeds = [[self.last]]
        for feed in feeds:  # the lock is taken per chunk: other requests' tokens go on during a long prefill
            with self.source.lock, torch.inference_mode():
                logits = self.source.forward(feed, self.cache)
            self.forward_lengths.append(len(feed))
        with self.source.lock, torch.inference_mode():
            tok = sample_token(logits, self.params.temperature, self.params.top_p, self.generator)
        self.last = tok
        return tok


class ModelTokenSource:
    """Samples from a loaded GptOssForCausalLM (load_model / load_with_adapter) with a KV cache."""

    def __init__(self, model, prefill_chunk: int | None = None):
        """prefill_chunk: tokens per prefill forward (default: `prefill_chunk_size`, chosen per prompt)."""
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.model = model
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()  # one forward of this model at a time (see the module docstring)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 131072))
        self.num_heads = int(model.config.num_attention_heads)
        self.prefill_chunk = prefill_chunk

    def forward(self, ids: Sequence[int], cache) -> torch.Tensor:
        """Feeds `ids` after what `cache` holds (and appends them to it); the [vocab] logits of the last one."""
        x = torch.tensor([list(ids)], device=self.device)
        out = self.model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    def start(self, prompt_ids: Sequence[int], params: SamplingParams) -> Generation:
        return _ModelGeneration(self, prompt_ids, params)


class _Scripted(Generation):
    def __init__(self, tokens: list[int], params: SamplingParams, delay: float):
        self.tokens, self.params, self.delay = tokens, params, delay

    def _step(self) -> int | None:
        if self.generated >= len(self.tokens):
            return None
        if self.delay:
            time.sleep(self.delay)
        return self.tokens[self.generated]


@dataclass
class ScriptedTokenSource:
    """Emits a chosen completion for each request: `script(prompt_ids) -> harmony text` (or a fixed text).

    The text is what the model would write after the rendered prompt's `<|start|>assistant`, e.g.
    `<|channel|>final<|message|>Hi!<|return|>`; it is encoded with the real o200k_harmony tokenizer.
    `delay` seconds per token lets tests hold a request open (concurrency, disconnects).
    """

    script: str | Callable[[list[int]], str]
    delay: float = 0.0
    context_length: int = 131072
    prompts: list[list[int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self, prompt_ids: Sequence[int], params: SamplingParams) -> Generation:
        with self._lock:
            self.prompts.append(list(prompt_ids))
        text = self.script(list(prompt_ids)) if callable(self.script) else self.script
        tokens = tiktoken_encoding().encode(text, allowed_special="all")
        return _Scripted(tokens, params, self.delay)
