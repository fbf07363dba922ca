"""The benchmark's result dict, read: the issue's goals, the printed table, the JSON line."""

from __future__ import annotations

import json
import math

GOALS = [
    # (model, seq, lora_on, min tokens/s, max peak GiB, min speedup over the baseline)
    ("20b", 2048, "all", 10_000, 16.0, 5.0),
    ("120b", 2048, "all", 5_000, 75.0, None),
    ("20b", 131072, "all", None, 80.0, None),
]


def check_goals(result: dict) -> list[dict]:
    out = []
    ours = result["ours"]
    for model, seq, lora_on, min_tps, max_peak, min_speedup in GOALS:
        if (result["model"], result["seq"], result["lora_on"]) != (model, seq, lora_on):
            continue
        if "skipped" in ours:  # ours did not run (out of memory): every goal of the case is missed
            out.append({"goal": f"{model} seq {seq}: runs", "value": None, "met": False, "detail": ours["skipped"]})
            continue
        checks = []
        if min_tps is not None:
            checks.append(("tokens/s", ours["tokens_per_s"], ">=", min_tps))
        if max_peak is not None and ours.get("peak_gib_with_warmup") is not None:
            # the warm-up (compilation, autotuning) counts: a run that exceeds the budget there never starts
            checks.append(("peak GiB", ours["peak_gib_with_warmup"], "<=", max_peak))
        if min_speedup is not None and result.get("speedup"):
            checks.append(("speedup", result["speedup"], ">=", min_speedup))
        for what, value, op, target in checks:
            met = value >= target if op == ">=" else value <= target
            miss = "" if met else (f"missed by {abs(value - target):.4g} ({value / target:.2f}x the target)")
            out.append({"goal": f"{model} seq {seq}: {what} {op} {target}", "value": value, "met": met, "detail": miss})
    return out


def format_table(result: dict) -> str:
    rows = [("", "tokens/s", "step s", "peak GiB", "MFU", "MFU(6N)", "first loss")]
    for key in ("ours", "baseline"):
        r = result.get(key)
        if not r:
            continue
        if "skipped" in r:
            rows.append((key, r["skipped"], "", "", "", "", ""))
            continue
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        rows.append((key, f(r["tokens_per_s"], ",.0f"), f(r["step_s_median"], ".3f"), f(r["peak_gib"], ".2f"),
                     f(r.get("mfu"), ".1%"), f(r.get("mfu_6n"), ".1%"), f(r["loss_first"], ".4f")))  # fmt: skip
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [
        f"gpt-oss-{result['model']} seq {result['seq']} x{result['batch']}, LoRA r={result['rank']} on {result['lora_on']}, {result['device']}"
    ]
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in rows]
    if result.get("speedup"):
        lines.append(
            f"speedup {result['speedup']:.2f}x; first-step loss differs by {result['first_loss_rel_diff']:.2e} (relative)"
        )
    for g in result.get("goals", []):
        value = "" if g["value"] is None else f" (value {g['value']:.4g})"
        lines.append(f"goal {g['goal']}: {'MET' if g['met'] else 'MISSED ' + g['detail']}{value}")
    if "experts_backend" in result.get("ours", {}):
        lines.append(f"experts backend: {result['ours']['experts_backend']}")
    return "\n".join(lines)


def to_json(result: dict) -> str:
    def default(o):
        if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
            return None
        return str(o)

    return json.dumps(result, default=default)
