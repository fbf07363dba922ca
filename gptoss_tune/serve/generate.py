"""Token generation for serving: a KV-cache sampling loop, one token per call, and a scripted stand-in.

`ModelTokenSource.start(prompt_ids, params)` returns a `Generation` whose `next_token()` runs one forward
step: the prompt once (prefill, logits for its last position only), then each new token alone against
transformers' DynamicCache (sliding-window layers keep their window), so no prefix is ever recomputed.
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

from gptoss_tune.model.config import CALL_ID, EOS_ID, PAD_ID

# openai-harmony's stop_tokens_for_assistant_actions() (<|return|>, <|call|>), plus <|endoftext|>, which the
# published generation_config.json also stops on (eos_token_id [200002, 199999, 200012]), as transformers'
# generate and vLLM do: text after it is not part of the answer.
STOP_TOKENS = (EOS_ID, CALL_ID, PAD_ID)


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
        feed = self.prompt if self.last is None else [self.last]
        with self.source.lock, torch.inference_mode():
            ids = torch.tensor([feed], device=self.source.device)
            out = self.source.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            tok = sample_token(out.logits[0, -1], self.params.temperature, self.params.top_p, self.generator)
        self.forward_lengths.append(len(feed))
        self.last = tok
        return tok


class ModelTokenSource:
    """Samples from a loaded GptOssForCausalLM (load_model / load_with_adapter) with a KV cache."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()  # one forward of this model at a time (see the module docstring)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 131072))

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
        from gptoss_tune.data.tokenizer import tiktoken_encoding

        with self._lock:
            self.prompts.append(list(prompt_ids))
        text = self.script(list(prompt_ids)) if callable(self.script) else self.script
        tokens = tiktoken_encoding().encode(text, allowed_special="all")
        return _Scripted(tokens, params, self.delay)
