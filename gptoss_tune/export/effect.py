"""How much of the fine-tune an export keeps, measured on held-out data: the effect retained.

    effect_retained = 1 - KL(tuned || export) / KL(tuned || base)

"tuned" is our model with the LoRA applied on the fly (what training evaluated), "base" the untouched
base model, "export" the exported weights loaded back. KL(tuned || base) is how far the fine-tune moved
the model's next-token distributions; KL(tuned || export) how far the export is from them. 1 = the export
is the tuned model; 0 = it is as far from it as the untouched base (the fine-tune is lost); below 0 it is
further from the tuned model than the base is (the export did damage). The ratio of the two KLs is the one
figure comparable across runs whose updates differ in size by orders of magnitude (re-quantisation noise is
absolute, an update's effect is not), and KL(tuned || .) weighs the tokens the tuned model is sure of,
which are the ones it was trained to produce.

Which tokens (`held_out`): the run's validation rows, else a seeded sample of its training rows, else a few
built-in prompts; rows as the run's data stage renders and packs them (harmony), scored at the positions
whose next token carries a loss (labels != -100, i.e. the assistant tokens the fine-tune was trained on):
the prompt tokens (system, user, tool text) are not what the fine-tune set out to change, and their
shifts would dilute the figure. Built-in prompts have no labels: every position is scored there.

The tuned log-probabilities are kept in memory (fp32, [positions, vocab]: 0.8 GB for 1024 positions of
the 201,088-token vocabulary) and every other model is compared with them as it runs, one model at a time.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from openai_harmony import Conversation, Message, Role, SystemContent
from safetensors import safe_open

from gptoss_kernels.requantize import METHODS
from gptoss_tune import runs as rd
from gptoss_tune.data.batching import IGNORE_INDEX
from gptoss_tune.data.tokenizer import harmony_encoding
from gptoss_tune.errors import UserError
from gptoss_tune.export.card import run_dir_of
from gptoss_tune.model.adapter import load_adapter_weights
from gptoss_tune.model.checkpoint import index_checkpoint
from gptoss_tune.model.experts import MXFP4Experts
from gptoss_tune.model.loader import load_model
from gptoss_tune.model.requant import base_expert, merged_expert, requant_expert
from gptoss_tune.train import qat
from gptoss_tune.train.qat import routed_dense_forward
from gptoss_tune.train.recipe import load_recipe
from gptoss_tune.train.stream import load_train_data

if TYPE_CHECKING:
    from gptoss_tune.export.exporter import AdapterSource

log = logging.getLogger(__name__)

DEFAULT_POSITIONS = 1024
DEFAULT_THRESHOLD = 0.9

BUILTIN_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers.",
    "How do I reverse a list in Python?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What should I pack for a weekend hiking trip?",
    "Translate 'good morning' into Spanish and German.",
)


@dataclass
class HeldOut:
    """Rows to score: (input_ids [T], position_ids [T], scored positions [n]) each."""

    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    source: str  # "validation", "training sample" or "built-in prompts"
    tokens: str  # which positions are scored
    note: str = ""  # why a fallback was taken
    positions: int = field(init=False)

    def __post_init__(self):
        self.positions = sum(int(s.numel()) for _, _, s in self.rows)

    def describe(self) -> dict:
        d = {"source": self.source, "rows": len(self.rows), "positions": self.positions, "tokens": self.tokens}
        if self.note:
            d["note"] = self.note
        return d


def _from_rows(rows: list[dict], source: str, max_positions: int) -> HeldOut | None:
    out, n = [], 0
    for r in rows:
        ids = torch.tensor(r["input_ids"], dtype=torch.long)
        labels = torch.tensor(r["labels"], dtype=torch.long)
        pos = torch.tensor(r.get("position_ids") or list(range(len(ids))), dtype=torch.long)
        # logits at t predict token t+1: score t where the label of t+1 carries a loss
        sel = torch.nonzero(labels[1:] != IGNORE_INDEX).flatten()[: max_positions - n]
        if sel.numel():
            out.append((ids, pos, sel))
            n += int(sel.numel())
        if n >= max_positions:
            break
    if not out:
        return None
    return HeldOut(out, source, "the trained (loss-masked) tokens of the run's rendered rows")


def builtin_held_out(prompts=BUILTIN_PROMPTS, note: str = "", max_positions: int = DEFAULT_POSITIONS) -> HeldOut:

    enc = harmony_encoding()
    rows, n = [], 0
    for p in prompts:
        if n >= max_positions:
            break
        conv = Conversation.from_messages(
            [
                Message.from_role_and_content(Role.SYSTEM, SystemContent.new()),
                Message.from_role_and_content(Role.USER, p),
            ]
        )
        ids = torch.tensor(list(enc.render_conversation_for_completion(conv, Role.ASSISTANT)), dtype=torch.long)
        ids = ids[: max_positions - n]
        n += len(ids)
        rows.append((ids, torch.arange(len(ids)), torch.arange(len(ids))))
    return HeldOut(rows, "built-in prompts", "every position of the built-in harmony prompts", note)


def held_out(src: AdapterSource, max_positions: int = DEFAULT_POSITIONS) -> HeldOut:
    """The run's validation data, else a sample of its training data, else the built-in prompts."""

    run = run_dir_of(src.ckpt)
    if run is None or not (run / rd.RECIPE).is_file():
        return builtin_held_out(
            max_positions=max_positions, note="no run directory with a recipe.yaml next to the checkpoint"
        )
    try:
        recipe = load_recipe(run / rd.RECIPE, check_paths=False)
        data = load_train_data(recipe)
    except Exception as e:  # the run's data is gone or unreadable: the export itself must not fail for it
        if not isinstance(e, (UserError, OSError, ValueError)):
            log.warning("reading the run's data for the effect measurement failed: %s: %s", type(e).__name__, e)
        return builtin_held_out(
            max_positions=max_positions, note=f"the run's data could not be read ({str(e).strip()[:200]})"
        )
    got = _from_rows(data.validation, "validation", max_positions)
    if got is None and data.train:
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0)).tolist()
        got = _from_rows([data.train[i] for i in order], "training sample", max_positions)
        if got is not None:
            got.note = "the run has no validation data: a seeded sample of its training rows (seen in training)"
    return got or builtin_held_out(max_positions=max_positions, note="the run's data holds no trained tokens")


@torch.no_grad()
def log_probs(model, held: HeldOut) -> list[torch.Tensor]:
    """fp32 log-probabilities [n, vocab] at the scored positions of each row (only those go through lm_head)."""
    dev = next(model.parameters()).device
    model.eval()
    out = []
    for ids, pos, sel in held.rows:
        h = model.model(input_ids=ids[None].to(dev), position_ids=pos[None].to(dev)).last_hidden_state[0]
        logits = model.lm_head(h[sel.to(dev)]).float()
        out.append(torch.log_softmax(logits, -1).cpu())
    return out


def compare(ref: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    """Mean per-position KL(ref || other) and top-1 agreement."""
    kl, agree, n = 0.0, 0, 0
    for a, b in zip(ref, other):
        kl += float((a.exp() * (a - b)).sum(-1).double().sum())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
    return {"kl": kl / max(n, 1), "top1_agreement": agree / max(n, 1)}


def retained(kl_export: float, kl_base: float) -> float | None:
    """1 - KL(tuned||export)/KL(tuned||base); None when the fine-tune did not move the model at all."""
    if not kl_base > 0:
        return None
    return 1.0 - kl_export / kl_base


class EffectMeter:
    """The tuned model's log-probabilities on held-out rows, and the KL of other models against them.

    Holds one model: ours with the LoRA. The base is that model with every LoRA B zeroed (a separate load
    when the router was trained); re-quantisation candidates swap the experts' MXFP4 bytes in place
    (`candidate`), the expert LoRA off and the attention LoRA on, and put the base bytes back after.
    """

    def __init__(self, src: AdapterSource, held: HeldOut, device: str | None = None, fake_quant: dict | None = None):

        self.src, self.held, self.device = src, held, device
        self.model = load_model(src.base_dir, lora=src.settings, device=device)
        load_adapter_weights(self.model, src.ckpt)
        self.reference = "base + LoRA applied on the fly"
        if fake_quant:  # the run finished quantisation-aware: the model it trained and evaluated
            self.reference = f"the quantisation-aware model (experts through Q(W + s·B·A), {fake_quant['requant']!r})"
            qat.enable(self.model, fake_quant["requant"], int(fake_quant.get("seed", 0)))
        self.tuned = log_probs(self.model, held)
        qat.disable(self.model)
        if src.router_trained:
            base_model = load_model(src.base_dir, device=device)
            self.base = compare(self.tuned, log_probs(base_model, held))
            del base_model
            gc.collect()
        else:
            with self._lora_off(experts_only=False):
                self.base = compare(self.tuned, log_probs(self.model, held))

    def _lora_off(self, experts_only: bool):

        @contextlib.contextmanager
        def ctx():
            saved = {}
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if "lora_B" in n and (not experts_only or ".mlp.experts." in n):
                        saved[n] = p.detach().clone()
                        p.zero_()
            try:
                yield
            finally:
                params = dict(self.model.named_parameters())
                with torch.no_grad():
                    for n, t in saved.items():
                        params[n].copy_(t)

        return ctx()

    def measure(self, model) -> dict:
        return compare(self.tuned, log_probs(model, self.held))

    @torch.no_grad()
    def candidate(self, method: str, seed: int) -> dict:
        """KL against the tuned model of the model whose experts are re-quantised with `method` (the
        export's bytes for an MXFP4 base: same function, same seeds) and whose attention is bf16(W + s·B·A),
        as the export stores it: the candidate's figure is the export's."""

        layers = [m for m in self.model.modules() if isinstance(m, MXFP4Experts)]
        saved = []
        scale = self.src.scale
        for i, m in enumerate(layers):
            for proj in m.lora_targets:
                blocks, scales = getattr(m, f"{proj}_blocks"), getattr(m, f"{proj}_scales")
                saved.append((blocks, scales, blocks.clone(), scales.clone()))
                lora = (getattr(m, f"{proj}_lora_A").cpu(), getattr(m, f"{proj}_lora_B").cpu())
                for e in range(m.num_experts):
                    bb, bs = blocks[e].cpu(), scales[e].cpu()
                    merged = merged_expert(base_expert(bb, bs), lora, scale, e)
                    nb, ns = requant_expert(bb, bs, merged, method, seed, i, proj, e)
                    blocks[e].copy_(nb)
                    scales[e].copy_(ns)

        qat.enable_attention(self.model)  # attention as the export stores it: the candidate is the export
        try:
            with self._lora_off(experts_only=True):
                return self.measure(self.model)
        finally:
            qat.disable(self.model)
            for blocks, scales, b0, s0 in saved:
                blocks.copy_(b0)
                scales.copy_(s0)

    def close(self) -> None:
        self.model = None
        gc.collect()


def measure_export(meter: EffectMeter, export_dir: Path) -> dict:
    """The export loaded back against the tuned model, beside the base. merged-mxfp4 through our loader;
    merged-bf16 with its experts kept dense as stored (our loader would re-quantise them to MXFP4 on load,
    which is not what transformers or vLLM serve): its dense experts replace the forward of each layer."""

    model = load_model(export_dir, device=meter.device)
    _keep_dense_experts(model, export_dir)
    got = meter.measure(model)
    del model
    gc.collect()
    return effect_entry(got, meter.base)


def _keep_dense_experts(model, export_dir: Path) -> None:

    idx = index_checkpoint(Path(export_dir))
    layers = [m for m in model.modules() if isinstance(m, MXFP4Experts)]
    for i, m in enumerate(layers):
        dense = {}
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{i}.mlp.experts.{proj}"
            if name not in idx.tensors:
                return  # MXFP4 experts: the loaded bytes are the export's
            with safe_open(str(idx.tensors[name].file), framework="pt", device="cpu") as f:
                dense[proj] = f.get_tensor(name).to(m.gate_up_proj_bias.device)  # [E, in, out]
        weight = partial(lambda d, proj, e: d[proj][e].t(), dense)
        m.fake_quant = partial(lambda w, mod, h, r, g: routed_dense_forward(mod, h, r, g, w), weight)


def effect_entry(got: dict, base: dict) -> dict:
    return {
        "kl_tuned_export": got["kl"],
        "kl_tuned_base": base["kl"],
        "effect_retained": retained(got["kl"], base["kl"]),
        "top1_agreement_export": got["top1_agreement"],
        "top1_agreement_base": base["top1_agreement"],
    }


# ---- the export's use of it -------------------------------------------------------------------------


def checkpoint_step(ckpt: Path) -> int | None:

    m = re.match(r"^step-(\d+)$", ckpt.name)
    return int(m.group(1)) if m else None


def quantization_aware_record(src: AdapterSource, progress=None) -> dict | None:
    """The run's quantisation-aware phase, when the exported checkpoint was trained in it."""
    rec = qat.recorded(run_dir_of(src.ckpt))
    if rec is None:
        return None
    step = checkpoint_step(src.ckpt)
    if step is not None and step <= int(rec.get("from_step", 0)):
        (progress or log.warning)(
            f"  note: {src.ckpt.name} predates the run's quantisation-aware phase (from step {rec.get('from_step')}): "
            f"exported as an ordinary checkpoint; `--checkpoint last` exports the phase's model"
        )
        return None
    return rec


def choose_requant(
    src: AdapterSource, meter: EffectMeter | None, requant: str, seed: int, progress
) -> tuple[str, int, dict]:
    """(method, seed, report) for a merged-mxfp4 export. "auto": the run's quantisation-aware re-quantiser
    when it had that phase, else the candidate with the highest effect retained on the held-out data
    (without a measurement: "keep", which is never further from the tuned model than the base)."""

    rec = quantization_aware_record(src, progress)
    info: dict = {"seed": seed, "candidates": {}}
    if meter is not None and requant == "auto":  # forced: only the export written is measured (each candidate
        # re-quantises every expert on the CPU, about as long as the merge itself)
        for m in METHODS:
            got = effect_entry(meter.candidate(m, seed), meter.base)
            info["candidates"][m] = got
            r = got["effect_retained"]
            progress(f"  re-quantiser {m:<10} effect retained {'n/a' if r is None else f'{r:.3f}'}")
    if requant != "auto":
        method, info["chosen_by"] = requant, "--requant"
    elif rec is not None:
        method, info["chosen_by"] = rec["requant"], "the run's quantisation-aware phase"
        seed = info["seed"] = int(rec.get("seed", seed))
    elif info["candidates"] and meter.base["kl"] > 0:
        method = max(METHODS, key=lambda m: (info["candidates"][m]["effect_retained"], m == "keep"))
        info["chosen_by"] = "highest effect retained on the held-out data"
    else:
        method, info["chosen_by"] = "keep", "default (nothing measured)"
    info["method"] = method
    return method, seed, info


def warning_line(fmt: str, effect: dict, threshold: float, src: AdapterSource) -> str | None:
    r = effect.get("effect_retained")
    if r is None or r >= threshold:
        return None
    base = src.base_name
    kept = (
        f"is further from the tuned model than the untouched base is (effect retained {r:.2f}: worse than not "
        f"exporting the fine-tune at all)"
        if r < 0
        else f"keeps only {r:.2f} of the fine-tune's effect (below {threshold:g})"
    )
    return (
        f"WARNING: this {fmt} export {kept}; "
        f"the lossless route keeps all of it: `gptoss-tune export RUN --format adapter --out DIR`, then "
        f"`gptoss-tune serve {base} --adapter DIR` or vLLM (`vllm serve {base} --enable-lora --lora-modules NAME=DIR`)"
    )
