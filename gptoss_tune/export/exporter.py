"""`gptoss-tune export`: a training checkpoint as a PEFT adapter, a merged bf16 model or a merged MXFP4 model.

    adapter       adapter_config.json + adapter_model.safetensors for stock PEFT on transformers'
                  GptOssForCausalLM (base dequantised) and for vLLM's --lora-modules (export_peft.py).
    merged-bf16   a full Hugging Face checkpoint, LoRA merged, experts dense bf16 `gate_up_proj` [E, H, 2I]
                  and `down_proj` [E, I, H] as transformers' GptOssExperts holds them, no quantization_config.
    merged-mxfp4  LoRA merged and the experts re-quantised to MXFP4 with OpenAI's rule, in the layout and
                  quantization_config of openai/gpt-oss-*, so everything that loads the original loads it.

Merging streams: the base checkpoint is read one tensor (experts: one expert) at a time through
safetensors, the merged tensors of one layer are written as one shard, and nothing else is held, so
peak memory is about one layer's output beyond the process (the report records the largest shard held).
Every export directory also gets generation_config.json, the tokenizer files (hf_tokenizer.py), a model
card (README.md, card.py) with the recipe, data summary and final metrics, and export_report.json;
merged-mxfp4 also the logit drift of the export against the tuned model (drift.py). The directory
is built next to its destination and renamed into place, so an interrupted export leaves nothing that
looks complete.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import math
import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gptoss_kernels.mxfp4 import dequantize, quantize
from gptoss_tune import runs as rd
from gptoss_tune.devices import check_device
from gptoss_tune.errors import UserError
from gptoss_tune.export import FORMATS
from gptoss_tune.export import out_dir as od
from gptoss_tune.export.base_check import check_base_tensors
from gptoss_tune.export.card import model_card, run_dir_of  # noqa: F401  (public from here too)
from gptoss_tune.export.drift import DRIFT_PROMPTS, drift_prompt_ids, logit_drift  # noqa: F401  (public from here too)
from gptoss_tune.export.hf_tokenizer import write_tokenizer_files
from gptoss_tune.export.out_dir import estimate_bytes
from gptoss_tune.export.peft_format import PEFT_WEIGHTS_FILE, peft_config, to_peft_state_dict
from gptoss_tune.export.vllm_route import ROUTER_WARNING, adapter_command, with_both_expert_slots
from gptoss_tune.model.adapter import CONFIG_FILE as OUR_CONFIG
from gptoss_tune.model.adapter import WEIGHTS_FILE as OUR_WEIGHTS
from gptoss_tune.model.adapter import read_adapter_config
from gptoss_tune.model.checkpoint import index_checkpoint, read_config, resolve_model_dir
from gptoss_tune.model.config import EXPERT_PROJECTIONS, GENERATION_CONFIG, QUANTIZATION_CONFIG
from gptoss_tune.model.lora import LoraSettings

log = logging.getLogger(__name__)

REPORT_FILE = "export_report.json"


# ---- locating what to export ---------------------------------------------------------------------


def resolve_export_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    """A run directory's checkpoint ('best', 'last' or a path); a bare adapter directory is itself."""
    run = Path(run_dir)
    if which in ("best", "last") and (run / OUR_CONFIG).is_file():
        return rd.intact_adapter(run)
    return rd.resolve_checkpoint(run, which)


class AdapterSource:
    """A checkpoint's LoRA settings and tensors, checked against the base model's config."""

    def __init__(self, ckpt: Path, base: str | Path | None = None):
        self.ckpt = ckpt
        self.meta = read_adapter_config(ckpt)
        self.settings = LoraSettings.coerce(self.meta["lora"])
        self.base_name = str(base or self.meta.get("base_model") or "")
        if not self.base_name:
            raise UserError(f"{ckpt / OUR_CONFIG}: does not name its base model; pass --base")
        self.base_dir = resolve_model_dir(self.base_name)
        self.config = read_config(self.base_dir)
        for k, want in (self.meta.get("model_config") or {}).items():
            if k in self.config and self.config[k] != want:
                raise UserError(
                    f"{ckpt / OUR_CONFIG}: adapter was trained on {k}={want}, but the base model {self.base_dir} has "
                    f"{self.config[k]}; pass the right --base"
                )
        f = ckpt / OUR_WEIGHTS
        if not f.is_file():
            raise UserError(f"{ckpt}: {OUR_WEIGHTS} is missing")
        try:
            # Read lazily, one tensor at a time: a 120b expert LoRA is gigabytes, and merging needs one layer's.
            self._file = safe_open(str(f), framework="pt", device="cpu")
            self.names = set(self._file.keys())
        except Exception as e:
            raise UserError(f"{f}: unreadable ({str(e).strip() or type(e).__name__})") from None
        self.router_trained = bool(self.meta.get("router_trained"))
        self.scale = self.settings.alpha / self.settings.rank
        self._check_shapes()

    def _check_shapes(self) -> None:
        c = self.config
        E, H, I, r = c["num_local_experts"], c["hidden_size"], c["intermediate_size"], self.settings.rank
        q_out = c["num_attention_heads"] * c["head_dim"]
        kv_out = c["num_key_value_heads"] * c["head_dim"]
        dims = {"q_proj": (H, q_out), "k_proj": (H, kv_out), "v_proj": (H, kv_out), "o_proj": (q_out, H),
                "gate_up_proj": (H, 2 * I), "down_proj": (I, H)}  # fmt: skip
        expected: dict[str, tuple[int, ...]] = {}
        for i in range(c["num_hidden_layers"]):
            for p in self.settings.attention:
                d_in, d_out = dims[p]
                expected[f"model.layers.{i}.self_attn.{p}.lora_A.default.weight"] = (r, d_in)
                expected[f"model.layers.{i}.self_attn.{p}.lora_B.default.weight"] = (d_out, r)
            for p in self.settings.experts:
                d_in, d_out = dims[p]
                expected[f"model.layers.{i}.mlp.experts.{p}_lora_A"] = (E, r, d_in)
                expected[f"model.layers.{i}.mlp.experts.{p}_lora_B"] = (E, d_out, r)
            if self.router_trained:
                expected[f"model.layers.{i}.mlp.router.weight"] = (E, H)
                expected[f"model.layers.{i}.mlp.router.bias"] = (E,)
        f = self.ckpt / OUR_WEIGHTS
        missing = sorted(set(expected) - self.names)
        unexpected = sorted(self.names - set(expected))
        if missing or unexpected:
            raise UserError(
                f"{f}: does not match its adapter.json and the base model (missing {missing[:2]}, unexpected {unexpected[:2]})"
            )
        for k, shape in expected.items():
            got = tuple(self._file.get_slice(k).get_shape())
            if got != shape:
                raise UserError(f"{f}: '{k}' has shape {list(got)}, expected {list(shape)}")
            if not torch.isfinite(self.tensor(k)).all():  # one tensor at a time
                raise UserError(f"{f}: '{k}' holds NaN or Inf; this checkpoint is broken, export another one")

    def tensor(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor (the adapter format needs them all; merging reads them layer by layer)."""
        return {k: self.tensor(k) for k in sorted(self.names)}

    def lora(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) for a module ('model.layers.0.self_attn.q_proj' or 'model.layers.0.mlp.experts.down_proj')."""
        if ".mlp.experts." in name:
            a, b = f"{name}_lora_A", f"{name}_lora_B"
        else:
            a, b = f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"
        return (self.tensor(a).float(), self.tensor(b).float()) if a in self.names else None


# ---- shards ---------------------------------------------------------------------------------------


class ShardWriter:
    """Writes one safetensors shard per call (one layer's tensors) and the index at the end.

    `peak_bytes` is the largest set of output tensors held at once: the streaming guarantee, checked by
    the tests (it must not grow with the number of layers).
    """

    def __init__(self, out_dir: Path, num_shards: int):
        self.out_dir = out_dir
        self.num_shards = num_shards
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.written = 0
        self.peak_bytes = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        self.written += 1
        if self.written > self.num_shards:
            raise RuntimeError("more shards than planned")
        name = f"model-{self.written:05d}-of-{self.num_shards:05d}.safetensors"
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self.peak_bytes = max(self.peak_bytes, nbytes)
        self.total += nbytes
        save_file({k: v.contiguous() for k, v in tensors.items()}, self.out_dir / name, metadata={"format": "pt"})
        self.weight_map.update({k: name for k in tensors})

    def finish(self) -> None:
        if self.written != self.num_shards:
            raise RuntimeError(f"wrote {self.written} shards, planned {self.num_shards}")
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---- merging --------------------------------------------------------------------------------------


class _RequantStats:
    """Sums over every expert of one projection, for the re-quantisation report."""

    def __init__(self):
        self.err2 = self.merged2 = self.delta2 = self.kept = 0.0

    def add(self, base: torch.Tensor, delta: torch.Tensor | None, merged: torch.Tensor, requant: torch.Tensor) -> None:
        self.err2 += float((requant - merged).double().pow(2).sum())
        self.merged2 += float(merged.double().pow(2).sum())
        if delta is not None:
            self.delta2 += float(delta.double().pow(2).sum())
            self.kept += float(((requant - base).double() * delta.double()).sum())

    def summary(self) -> dict:
        out = {"relative_error": math.sqrt(self.err2 / self.merged2) if self.merged2 else 0.0}
        if self.delta2:
            # How much of the LoRA update survives rounding: the projection of (requantised - base) on the
            # update (1 = all of it), and the rounding error measured against the update's size.
            out["lora_update_retained"] = self.kept / self.delta2
            out["error_vs_lora_update"] = math.sqrt(self.err2 / self.delta2)
        return out


def _merge_linear(w: torch.Tensor, lora, scale: float) -> torch.Tensor:
    if lora is None:
        return w
    a, b = lora
    return (w.float() + scale * (b @ a)).to(w.dtype)


def _expert_weight(st: dict, name: str, e: int) -> torch.Tensor:
    """One expert's base weight as fp32 [out, in] (from MXFP4 blocks/scales, or a dense [E, in, out])."""
    if f"{name}_blocks" in st:
        return dequantize(st[f"{name}_blocks"][e], st[f"{name}_scales"][e], torch.float32)
    return st[name][e].float().t()


def merge_layer(
    i: int, get: Callable[[str], object], names: set[str], src: AdapterSource, fmt: str, stats: dict[str, _RequantStats]
) -> dict[str, torch.Tensor]:
    """Every output tensor of layer i, merged; experts handled one expert at a time."""
    prefix = f"model.layers.{i}."
    out: dict[str, torch.Tensor] = {}
    experts = f"{prefix}mlp.experts."
    E = src.config["num_local_experts"]
    for name in sorted(n for n in names if n.startswith(prefix)):
        if name.startswith(experts) and not name.endswith("_bias"):
            continue  # expert matrices below
        if src.router_trained and name.startswith(f"{prefix}mlp.router."):
            out[name] = src.tensor(name).to(torch.bfloat16)
            continue
        t = get(name)[:]
        if name.endswith(".weight") and ".self_attn." in name:
            t = _merge_linear(t, src.lora(name[: -len(".weight")]), src.scale)
        out[name] = t
    for proj in EXPERT_PROJECTIONS:
        base_name = experts + proj
        slices = {k: get(k) for k in (base_name, f"{base_name}_blocks", f"{base_name}_scales") if k in names}
        lora = src.lora(base_name)
        merged_out = requant_blocks = requant_scales = None
        for e in range(E):
            w = _expert_weight(slices, base_name, e)  # [out, in] fp32
            delta = src.scale * (lora[1][e] @ lora[0][e]) if lora is not None else None  # B[e] A[e]: [out, in]
            merged = w + delta if delta is not None else w
            if fmt == "merged-bf16":
                if merged_out is None:
                    merged_out = torch.empty(E, w.shape[1], w.shape[0], dtype=torch.bfloat16)  # [E, in, out]
                merged_out[e] = merged.t().to(torch.bfloat16)
            else:
                blocks, scales = quantize(merged)
                if requant_blocks is None:
                    requant_blocks = torch.empty(E, *blocks.shape, dtype=torch.uint8)
                    requant_scales = torch.empty(E, *scales.shape, dtype=torch.uint8)
                requant_blocks[e], requant_scales[e] = blocks, scales
                stats.setdefault(proj, _RequantStats()).add(w, delta, merged, dequantize(blocks, scales, torch.float32))
        if fmt == "merged-bf16":
            out[base_name] = merged_out
        else:
            out[f"{base_name}_blocks"], out[f"{base_name}_scales"] = requant_blocks, requant_scales
    return out


def write_merged(src: AdapterSource, fmt: str, out_dir: Path, progress: Callable[[str], None]) -> dict:
    idx = index_checkpoint(src.base_dir)
    names = set(idx.tensors)
    L = src.config["num_hidden_layers"]
    groups: list[tuple[str, list[str]]] = [("embeddings", ["model.embed_tokens.weight"])]
    groups += [(f"layer {i}", [f"model.layers.{i}."]) for i in range(L)]
    groups.append(("final norm and lm_head", ["model.norm.weight", "lm_head.weight"]))
    writer = ShardWriter(out_dir, len(groups))
    stats: dict[str, _RequantStats] = {}
    files: dict[Path, object] = {}

    def get(name: str):
        f = idx.tensors[name].file
        if f not in files:
            files[f] = safe_open(str(f), framework="pt", device="cpu")
        return files[f].get_slice(name)

    t0 = time.time()
    for gi, (label, keys) in enumerate(groups):
        if label.startswith("layer "):
            tensors = merge_layer(gi - 1, get, names, src, fmt, stats)
        else:
            tensors = {k: get(k)[:] for k in keys}
        writer.write(tensors)
        del tensors
        gc.collect()
        progress(f"  {label}: written ({gi + 1}/{len(groups)}, {time.time() - t0:.0f}s)")
    files.clear()
    writer.finish()
    config = dict(src.config)
    if fmt == "merged-bf16":
        config.pop("quantization_config", None)
        config["torch_dtype"] = "bfloat16"
    else:
        config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    report = {"shards": writer.num_shards, "total_bytes": writer.total, "peak_shard_bytes": writer.peak_bytes}
    if fmt == "merged-mxfp4":
        report["requantization"] = {p: s.summary() for p, s in stats.items()}
    return report


def write_adapter(src: AdapterSource, out_dir: Path) -> dict:
    ours, settings = with_both_expert_slots(src.state, src.settings, src.config)  # vLLM asserts both slots
    cfg = peft_config(settings, src.base_name, router_trained=src.router_trained)
    cfg.save_pretrained(str(out_dir))
    state = to_peft_state_dict(ours, settings)
    save_file(state, out_dir / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
    if src.settings.dropout:
        log.info(
            "lora_dropout %.3g written as 0 (dropout is training-only; PEFT refuses it on expert LoRA)",
            src.settings.dropout,
        )
    report = {"tensors": len(state), "bytes": sum(t.numel() * t.element_size() for t in state.values())}
    if settings.experts != src.settings.experts:
        report["zero_expert_slots"] = [p for p in settings.experts if p not in src.settings.experts]
    if src.router_trained:
        report.setdefault("warnings", []).append(ROUTER_WARNING)
    else:
        report["vllm_rank"] = settings.rank
    return report


# ---- the command ----------------------------------------------------------------------------------


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path,
    checkpoint: str = "best",
    base: str | Path | None = None,
    force: bool = False,
    drift: bool = True,
    device: str | None = None,
    progress: Callable[[str], None] = print,
) -> dict:
    """Export one checkpoint of a run; returns the report (also written to OUT/export_report.json)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")

    out = Path(out)
    od.check_out(out, force)
    if fmt == "merged-mxfp4" and drift:
        check_device(device)
    ckpt = resolve_export_checkpoint(run_dir, checkpoint)
    src = AdapterSource(ckpt, base)
    _check_out_dir(out, [Path(run_dir), ckpt, src.base_dir])
    if fmt != "adapter":  # merging reads every base tensor: check their shapes first (headers only)
        check_base_tensors(src.base_dir, ckpt, base is not None)
    progress(f"exporting {ckpt} (base {src.base_dir}) as {fmt} to {out}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        od.remove_stale_temporaries(out.parent, progress)
        od.warn_if_short(out, _estimate(fmt, src), progress)
        tmp = od.make_temporary(out)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror or e}); choose a writable directory") from None
    t0 = time.time()
    try:
        report: dict = {"format": fmt, "checkpoint": str(ckpt), "base_model": src.base_name}
        if fmt == "adapter":
            report.update(write_adapter(src, tmp))
        else:
            report.update(write_merged(src, fmt, tmp, progress))
        gen = src.base_dir / "generation_config.json"
        if gen.is_file():
            shutil.copyfile(gen, tmp / "generation_config.json")
        else:
            (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")

        write_tokenizer_files(tmp, model_max_length=int(src.config.get("max_position_embeddings", 131072)))
        if fmt == "merged-mxfp4" and drift:
            progress("  measuring logit drift of the MXFP4 export against the tuned model ...")
            report["drift"] = logit_drift(src, tmp, device=device)
        report["seconds"] = round(time.time() - t0, 2)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(fmt, src, report, out.name))
        od.replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # The machine's problem, not a bug: say what and where (--out, never a temporary or a source file).
        if od.is_disk_full(e):
            raise od.disk_full_error(out, _estimate(fmt, src)) from None
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            raise UserError(
                f"--out {out}: writing the export failed ({e.strerror}); choose a writable --out; nothing was written"
            ) from None
        raise
    progress(summary_lines(report, out))
    return report


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _estimate(fmt: str, src: AdapterSource) -> int:
    try:
        return estimate_bytes(fmt, src.ckpt / OUR_WEIGHTS, src.base_dir)
    except Exception:  # only for the message; never hide the disk-full error behind another
        return 0


def _check_out_dir(out: Path, inputs: list[Path]) -> None:
    """--out must not be an input or hold one (with --force it would be replaced); inside is fine."""
    o = out.resolve()
    for p in inputs:
        r = p.resolve()
        if o == r or o in r.parents:
            raise UserError(f"--out {out} overlaps the input {p}; export to a directory of its own")


def adapter_serving_lines(report: dict, out: Path) -> list[str]:
    """How to serve an adapter export without losing anything: vLLM's command, or why vLLM cannot."""
    if report.get("format") != "adapter":
        return []

    lines = [f"  warning: {w}" for w in report.get("warnings", [])]
    if "vllm_rank" in report:
        cmd = adapter_command(report["base_model"], out, report["vllm_rank"], name=out.name)
        lines.append(f"  serve it with vLLM (MXFP4 base + LoRA, nothing lost): {shlex.join(cmd)}")
    lines.append(
        f"  or here: gptoss-tune serve {shlex.quote(str(report['base_model']))} --adapter {shlex.quote(str(out))}"
    )
    return lines


def summary_lines(report: dict, out: Path) -> str:
    lines = [f"wrote {report['format']} export to {out}/ in {report.get('seconds', 0):.1f}s"]
    lines += adapter_serving_lines(report, out)
    for proj, s in (report.get("requantization") or {}).items():
        line = f"  re-quantisation {proj}: relative error {s['relative_error']:.4f}"
        if "lora_update_retained" in s:
            line += f", LoRA update retained {s['lora_update_retained']:.3f} (rounding error {s['error_vs_lora_update']:.2f}x the update)"
        lines.append(line)
    d = report.get("drift")
    if d:
        e, b = d["export_vs_tuned"], d["base_vs_tuned"]
        lines.append(
            f"  logit drift vs the tuned model on {d['prompts']} prompts: max |diff| {e['max_abs_logit_diff']:.4f}, "
            f"mean KL {e['mean_kl']:.2e}, top-1 agreement {e['top1_agreement']:.3f} "
            f"(the tuning itself moved them by max {b['max_abs_logit_diff']:.4f}, KL {b['mean_kl']:.2e})"
        )
    return "\n".join(lines)
