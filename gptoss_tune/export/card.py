"""The model card (README.md) of an export: base model, LoRA settings, the run's final metrics, its data
report and recipe, the effect retained and the MXFP4 re-quantisation, and how to load and serve the export."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gptoss_tune import runs as rd

if TYPE_CHECKING:
    from gptoss_tune.export.exporter import AdapterSource


def run_dir_of(ckpt: Path) -> Path | None:
    """The training run a checkpoint belongs to (for its recipe, data report and metrics), if any."""
    # checkpoints/step-N/ and final/ sit at known depths; look there first (a recipe file next to the run
    # directory, as a user's own recipe.yaml often is, must not be taken for the run's)
    first = ckpt.parent.parent if ckpt.parent.name == rd.CHECKPOINTS else ckpt.parent if ckpt.name == rd.FINAL else None
    for cand in ((first,) if first is not None else ()) + (ckpt.parent.parent, ckpt.parent, ckpt):
        if (cand / rd.RECIPE).is_file() or (cand / rd.METRICS).is_file():
            return cand
    return None


def _read_metrics(run: Path | None) -> dict:
    out: dict = {}
    if run is None:
        return out
    for rec in rd.read_metrics(run / rd.METRICS):
        if "loss" in rec:
            out["final train loss"] = (rec.get("step"), rec["loss"])
        if "eval_loss" in rec:
            out["final eval loss"] = (rec.get("step"), rec["eval_loss"])
    if (run / rd.BEST).is_file():
        try:
            best = json.loads((run / rd.BEST).read_text())
            out[f"best {best.get('metric', 'metric')}"] = (best.get("step"), best.get("value"))
        except (json.JSONDecodeError, AttributeError):
            pass
    return out


def _effect_section(report: dict) -> list[str]:
    """How much of the fine-tune this export keeps (export/effect.py), and the re-quantiser candidates."""
    e, rq = report.get("effect"), report.get("requantization")
    if not e and not rq:
        return []
    lines = ["", "## How much of the fine-tune this export keeps", ""]
    if e:
        r = e["effect_retained"]
        lines += [
            f"Effect retained: **{'n/a' if r is None else f'{r:.3f}'}** = 1 - KL(tuned||export) / KL(tuned||base) "
            f"= 1 - {e['kl_tuned_export']:.3g} / {e['kl_tuned_base']:.3g}, mean per position over {e['positions']} "
            f"held-out positions ({e['source']}: {e['tokens']}). Tuned = {e['reference']}. 1 = the export is the tuned "
            "model, 0 = as far from it as the untouched base, below 0 = further.",
        ]
        if e.get("warning"):
            lines += ["", f"> {e['warning']}"]
    if rq:
        lines += ["", f"MXFP4 experts re-quantised with `{rq['method']}` (seed {rq['seed']}; {rq['chosen_by']}).", ""]
        if rq.get("candidates"):
            lines += ["| re-quantiser | effect retained | KL(tuned‖export) |", "|---|---|---|"]
            for m, c in rq["candidates"].items():
                r = c["effect_retained"]
                lines.append(f"| {m} | {'n/a' if r is None else f'{r:.3f}'} | {c['kl_tuned_export']:.3g} |")
    return lines


def model_card(fmt: str, src: AdapterSource, report: dict, out_name: str) -> str:
    run = run_dir_of(src.ckpt)
    lib = "peft" if fmt == "adapter" else "transformers"
    s = src.settings
    lines = [
        "---",
        f"base_model: {src.base_name}",
        f"library_name: {lib}",
        "license: apache-2.0",
        "tags: [gpt-oss, gptoss-tune, lora" + (", mxfp4" if fmt == "merged-mxfp4" else "") + "]",
        "---",
        "",
        f"# {out_name}",
        "",
        f"A LoRA fine-tune of `{src.base_name}` made with gptoss_tune, exported as **{fmt}**.",
        "",
        "| | |",
        "|---|---|",
        f"| checkpoint | `{src.ckpt}` |",
        f"| LoRA | rank {s.rank}, alpha {s.alpha:g}, attention {s.attention or 'none'}, experts {s.experts or 'none'}"
        + (", router trained" if src.router_trained else "")
        + " |",
        f"| exported | {time.strftime('%Y-%m-%d %H:%M:%S')} |",
    ]
    metrics = _read_metrics(run)
    if metrics:
        lines += ["", "## Final metrics", "", "| metric | step | value |", "|---|---|---|"]
        lines += [
            f"| {k} | {st} | {v:.4f} |" if isinstance(v, (int, float)) else f"| {k} | {st} | {v} |"
            for k, (st, v) in metrics.items()
        ]
    if run is not None and (run / rd.DATA_REPORT).is_file():
        try:
            data = json.loads((run / rd.DATA_REPORT).read_text())
            lines += ["", "## Data", "", "```json", json.dumps(data, indent=2), "```"]
        except json.JSONDecodeError:
            pass
    if run is not None and (run / rd.RECIPE).is_file():
        lines += ["", "## Recipe", "", "```yaml", (run / rd.RECIPE).read_text().rstrip(), "```"]
    lines += _effect_section(report)
    lines += ["", "## Use", ""]
    if fmt == "adapter":
        lines += [
            "```python",
            "from transformers import AutoModelForCausalLM",
            "from peft import PeftModel",
            f'base = AutoModelForCausalLM.from_pretrained("{src.base_name}", dtype="bfloat16")  # MXFP4 experts are dequantised',
            f'model = PeftModel.from_pretrained(base, "{out_name}")',
            "```",
            "",
            f"Serve: `gptoss-tune serve {src.base_name} --adapter {out_name}`, or see `gptoss-tune serve --print-vllm-command {src.base_name} --adapter {out_name}`.",
        ]
    else:
        lines += [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{out_name}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{out_name}")',
            "```",
            "",
            f"Serve: `gptoss-tune serve {out_name}` or `vllm serve {out_name} --tool-call-parser openai --enable-auto-tool-choice`.",
        ]
    lines += [
        "",
        "Prompts use the harmony format (render them with openai-harmony; the chat template covers plain chat).",
    ]
    return "\n".join(lines) + "\n"
