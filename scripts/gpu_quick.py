#!/usr/bin/env python
"""The GPU verdict in ONE device call (issue 15): the expert kernels' correctness at the real shapes, then
the three headline benchmarks, in priority order, under one deadline; whatever it reached comes back.

    python scripts/gpu_quick.py                          # on the GPU machine: the whole plan in <= 450 s
    python scripts/gpu_quick.py --dry-run                # the same plan on the CPU at tiny sizes (minutes)
    python scripts/gpu_quick.py --only 131k --deadline 200   # stages again, e.g. in a warm machine's last minutes

Stages, in priority order (env and the issue's four are the verdict; the rest run only with time left):
  env          versions, the device, nvidia-smi (what the figures were measured on)
  kernels      scripts/check_moe_gpu.py: E = 32 and 128, hidden 2880, 4,096 tokens, top-4, LoRA r16: forward,
               grad x, grad routing weights and the four LoRA grads vs the fp32 reference (its TOLERANCES). If a
               check FAILS, or the script breaks or reaches nothing, every later benchmark runs with
               GPTOSS_TUNE_EXPERTS_BACKEND=reference and the summary says so. Cut by its time limit after some
               sizes passed: the kernels stay on, verdict INCOMPLETE.
  20b          bench_train 20b, seq 2048, LoRA r8 on attention + all experts, the baseline in the same run,
               one profiled step of ours (the profile is in quick.log)
  120b         bench_train 120b, seq 2048 (peak against 75 GiB)
  131k         bench_train 20b, one 131,072-token row (peak reported)
  convergence  scripts/check_convergence_gpu.py: 20 LoRA steps, Triton vs reference loss curves
  moe          scripts/bench_moe.py at 20b-2048 and 120b-2048 (rows are kept from the log if it is cut)
  attention    pytest -m gpu tests/model/test_attention.py tests/train/test_chunked_ce.py (9 flex compiles)

Time: each stage gets min(its cap, what is left of --deadline less 10 s) and is skipped when that is under
its minimum; a stage past its limit is stopped (SIGTERM, then SIGKILL) and the plan goes on. The benchmarks
also get bench_train's --time-limit (25 s under the stage's limit: imports and teardown), so a slow stage
times fewer steps instead of being killed. Every stage's wall time is printed and recorded. Statuses:
PASS / FAIL / INCOMPLETE (checks), OK / PARTIAL (stopped after ours was measured) / OOM (benchmarks),
TIMEOUT (stopped with nothing to read), ERROR (broke), SKIPPED (the deadline could not hold it).

Output, in $OUT (default ./quick-out; two files, the device tool returns at most eight):
  quick.json  {"plan", "env", "stages": [{"stage", "status", "seconds", "limit_s", "command", "summary",
              "report"}], "verdict", "finished"}; rewritten after every stage, so a call stopped from outside
              still returns what it reached. "report" is the stage's own JSON (bench_train's, check_moe_gpu's...).
  quick.log   every stage's full output, as it runs.
The summary table is printed last. Only the standard library is imported here; each stage is a subprocess
(its device memory is gone when it ends, and a crash or hang costs that stage only).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 450  # the device call gets timeout_s 480: 30 s for stopping a stage and writing the files
DRY_DEADLINE_S = 1200
DRY_CAP_S = 400  # the dry run checks plumbing, not time: a loaded CI machine runs interpreted kernels slowly
END_RESERVE_S = 10  # a stage's limit leaves this much of the deadline for stopping it and the files
BENCH_MARGIN_S = 25  # bench_train's --time-limit under its stage limit: imports before, teardown after
KILL_GRACE_S = 5
FALLBACK_ENV = {"GPTOSS_TUNE_EXPERTS_BACKEND": "reference"}


# Stage "env": what the figures were measured on, as one JSON line.
ENV_PROBE = """
import json, subprocess, sys
import peft, torch, transformers
env = dict(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda,
           transformers=transformers.__version__, peft=peft.__version__)
try:
    import triton
    env["triton"] = triton.__version__
except ImportError as e:
    env["triton"] = f"not importable: {e}"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(device=p.name, memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
else:
    env["device"] = "cpu"
from gptoss_tune.model.experts import _triton_ops
env["experts_triton_ops"] = _triton_ops() is not None
for key, cmd in (("nvidia_smi", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm",
                                 "--format=csv,noheader"]), ("commit", ["git", "log", "-1", "--format=%H %s"])):
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        env[key] = run.stdout.strip() if run.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        env[key] = None
print(json.dumps(env))
"""


@dataclass
class Stage:
    name: str
    kind: str  # env | kernels | bench | convergence | moe | pytest: how its report is read
    argv: list[str]
    cap_s: float  # the most it may take
    min_s: float  # skipped when less than this is left
    report: str | None = None  # the JSON file the command writes
    fallback: bool = False  # runs with FALLBACK_ENV after a kernel failure
    time_limit: bool = False  # gets bench_train's --time-limit
    env: dict = field(default_factory=dict)


def build_plan(dry_run: bool, work: Path, python: str, wrap: str | None = None) -> list[Stage]:
    """The stages, in priority order. --dry-run changes sizes and the device only: the same scripts and flags."""

    def script(name, *args):
        return [python, *([wrap] if wrap else []), str(ROOT / "scripts" / name), *args]

    def bench(name, model, seq, *extra, cap, min_s):
        path = str(work / f"{name}.json")
        size = (
            ["--model", "tiny", "--seq", str(seq[1]), "--device", "cpu"]
            if dry_run
            else ["--model", model, "--seq", str(seq[0])]
        )
        argv = script("bench_train.py", *size, *extra, "--json-out", path)
        return Stage(name, "bench", argv, cap, min_s, path, fallback=True, time_limit=True)

    cpu = ["--device", "cpu"] if dry_run else []
    kernels_json = str(work / "kernels.json")
    kernel_sizes = (
        ["--hidden", "32", "--experts", "4", "8", "--tokens", "16", "--rank", "2"]
        if dry_run
        else ["--experts", "32", "128", "--tokens", "4096"]
    )
    conv_json, moe_json = str(work / "convergence.json"), str(work / "moe.json")
    stages = [
        Stage("env", "env", [python, "-c", ENV_PROBE], 45, 10),
        Stage("kernels", "kernels", script("check_moe_gpu.py", *cpu, *kernel_sizes, "--no-behaviour", "--json", kernels_json),
              160, 60, kernels_json),
        # Step counts (docs/benchmarks.md, "How the quick plan is sized"): the first step pays compilation,
        # autotuning and the optimizer state; later steps repeat identical work, so one warm-up and the median
        # of 3 timed steps (2 at 131k, ~30 s each by the FLOP count) suffice; the JSON keeps every step's time.
        bench("20b", "20b", (2048, 32), "--baseline", "--warmup", "1", "--steps", "3", "--profile", "1", cap=130, min_s=60),
        bench("120b", "120b", (2048, 32), "--warmup", "1", "--steps", "3", cap=100, min_s=50),
        bench("131k", "20b", (131072, 128), "--warmup", "1", "--steps", "2", cap=130, min_s=90),
        Stage("convergence", "convergence",
              script("check_convergence_gpu.py", *cpu, *(["--small", "--steps", "2"] if dry_run else ["--steps", "20"]),
                     "--json", conv_json), 60, 30, conv_json),
        Stage("moe", "moe",
              script("bench_moe.py", *cpu, *(["--tiny"] if dry_run else []), "--shapes", "20b-2048", "120b-2048",
                     "--json", moe_json), 90, 40, moe_json),
        Stage("attention", "pytest",
              [python, "-m", "pytest", "-p", "no:cacheprovider", "-v", "--maxfail=3", "--durations=12", "-m", "gpu",
               "tests/model/test_attention.py", "tests/train/test_chunked_ce.py"], 300, 45, fallback=True),
    ]  # fmt: skip
    if dry_run:
        for stage in stages:
            stage.cap_s = max(stage.cap_s, DRY_CAP_S)
    return stages


# ---------------------------------------------------------------------------------------------------------
# reading each stage's report
# ---------------------------------------------------------------------------------------------------------
def _load(path: str | None):
    try:
        return json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None


def _json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def summarize_kernels(rc, timed_out, report, output) -> tuple[str, dict]:
    rows = (report or {}).get("results", [])
    by_e: dict[str, dict] = {}
    for r in rows:
        by_e.setdefault(str(r["experts"]), {})[r["tensor"]] = [r["rel_err"], r["tolerance"], r["passed"]]
    failed = [f"E={r['experts']} {r['tensor']}" for r in rows if not r["passed"]]
    summary = {"checks": by_e, "failed": failed, "first_call_s": (report or {}).get("first_call_s")}
    if failed:
        status = "FAIL"
    elif rows and rc == 0 and report.get("complete", True):
        status = "PASS"
    elif rows and timed_out:
        status = "INCOMPLETE"  # what it reached passed; the deadline cut the rest
    else:
        status = "ERROR"  # crashed, or nothing reached: not a verdict the benchmarks can rest on
        summary["error_tail"] = output[-1500:]
    return status, summary


def summarize_bench(rc, timed_out, report, output) -> tuple[str, dict]:
    if not report:
        return ("TIMEOUT" if timed_out else "ERROR"), {"error_tail": output[-1500:]}

    def side(r):
        if not r:
            return None
        if "skipped" in r:
            return {"skipped": r["skipped"]}
        steps = r.get("step_s") or []
        med = r.get("step_s_median")
        out = {
            "tokens_per_s": r.get("tokens_per_s"),
            "peak_gib_with_warmup": r.get("peak_gib_with_warmup"),
            "peak_gib": r.get("peak_gib"),
            "step_s": steps,
            # (max - min) / median of the timed steps: the median is stable when this is a few per cent
            "step_spread": (max(steps) - min(steps)) / med if steps and med else None,
        }
        for key in ("experts_backend", "mfu", "cut_by_time_limit"):
            if key in r:
                out[key] = r[key]
        return out

    summary = {
        "ours": side(report.get("ours")),
        "baseline": side(report.get("baseline")),
        "speedup": report.get("speedup"),
        "first_loss_rel_diff": report.get("first_loss_rel_diff"),
        "goals": report.get("goals", []),
    }
    if "incomplete" in report:
        summary["incomplete"] = report["incomplete"]
    ours = report.get("ours") or {}
    if rc == 0 and "incomplete" not in report:
        status = "OK" if "skipped" not in ours else "OOM" if ours.get("out_of_memory") else "SKIPPED"
    else:
        status = "PARTIAL"  # ours measured, then stopped (the baseline did not finish)
    return status, summary


def summarize_convergence(rc, timed_out, report, output) -> tuple[str, dict]:
    if not report:
        return ("TIMEOUT" if timed_out else "ERROR"), {"error_tail": output[-1500:]}
    summary = {k: report.get(k) for k in ("max_rel_diff", "tol", "passed")}
    return ("PASS" if report.get("passed") and rc == 0 else "FAIL"), summary


def summarize_moe(rc, timed_out, report, output) -> tuple[str, dict]:
    rows = (report or {}).get("rows") or [r for r in _json_lines(output) if "name" in r and "shape" in r]
    table = [
        {k: r.get(k) for k in ("shape", "name", "ms", "tflops", "peak_gb", "error") if r.get(k) is not None}
        for r in rows
    ]
    summary = {"rows": table, "summary": (report or {}).get("summary")}
    if not rows:
        return ("TIMEOUT" if timed_out else "ERROR"), dict(summary, error_tail=output[-1500:])
    return ("OK" if rc == 0 and report else "PARTIAL"), summary


def summarize_pytest(rc, timed_out, report, output) -> tuple[str, dict]:
    counts = {}
    for line in output.splitlines()[::-1]:
        found = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", line)
        if found and (" in " in line or line.startswith("=")):
            counts = {kind: int(n) for n, kind in found}
            break
    failures = [ln for ln in output.splitlines() if ln.startswith(("FAILED", "ERROR"))][:10]
    if timed_out:
        status = "TIMEOUT"
    elif rc in (0, 5):  # 5: nothing collected/selected (no GPU test ran), not a failure
        status = "PASS"
    else:
        status = "FAIL"
    return status, {"counts": counts, "failures": failures}


def summarize_env(rc, timed_out, report, output) -> tuple[str, dict]:
    lines = _json_lines(output)
    env = lines[-1] if lines else {"error_tail": output[-1500:]}
    return ("OK" if lines and rc == 0 else "ERROR"), env


SUMMARIZE = {"env": summarize_env, "kernels": summarize_kernels, "bench": summarize_bench,
             "convergence": summarize_convergence, "moe": summarize_moe, "pytest": summarize_pytest}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------
def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _run_command(argv, env, limit, log) -> tuple[int, bool, str]:
    """Run argv with stdout+stderr appended to `log`; stop it after `limit` s. -> (rc, timed_out, output)."""
    log.flush()
    start = os.path.getsize(log.name)  # the child appends through the same file
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    timed_out = False
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                rc = proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    with open(log.name, "rb") as f:
        f.seek(start)
        output = f.read().decode("utf-8", "replace")
    return rc, timed_out, output


def execute(
    stages, out: Path, deadline_s: float, base_env: dict, force_reference: bool = False, tail: int = 14
) -> dict:
    """Run `stages` in order within `deadline_s`; quick.json and quick.log in `out`. Returns quick.json's dict."""
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    result = {"plan": {"deadline_s": deadline_s, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "stages": [s.name for s in stages]},
              "env": None, "stages": [], "verdict": {}, "finished": False}  # fmt: skip
    reference = force_reference
    if force_reference:
        result["verdict"]["experts_backend_forced"] = "reference (--reference)"
    qjson = out / "quick.json"
    _write_json(qjson, result)
    with open(out / "quick.log", "a", encoding="utf-8") as log:
        for stage in stages:
            elapsed = time.monotonic() - t0
            left = deadline_s - elapsed
            limit = min(stage.cap_s, left - END_RESERVE_S)
            entry = {"stage": stage.name, "status": None, "seconds": 0.0, "limit_s": round(limit, 1)}
            if limit < stage.min_s:
                entry.update(
                    status="SKIPPED",
                    summary=f"{left:.0f} s of the {deadline_s:.0f} s deadline left; needs {stage.min_s:.0f}",
                )
                print(f"== {stage.name}: SKIPPED ({entry['summary']})", flush=True)
                result["stages"].append(entry)
                _write_json(qjson, result)
                continue
            argv = list(stage.argv)
            if stage.time_limit:
                argv += ["--time-limit", str(max(1, int(limit - BENCH_MARGIN_S)))]
            env = dict(base_env, **stage.env)
            if reference and stage.fallback:
                env.update(FALLBACK_ENV)
            entry["command"] = " ".join(argv[1:] if argv[0] == sys.executable else argv)
            entry["env"] = {k: env[k] for k in FALLBACK_ENV if k in env}
            header = f"== {stage.name} (limit {limit:.0f} s; {elapsed:.0f} s elapsed): {entry['command']}"
            print(header, flush=True)
            log.write(f"\n{header}\n")
            if entry["env"]:
                print(f"   with {entry['env']}", flush=True)
            if stage.report:
                Path(stage.report).unlink(missing_ok=True)
            s0 = time.monotonic()
            rc, timed_out, output = _run_command(argv, env, limit, log)
            seconds = time.monotonic() - s0
            report = _load(stage.report)
            status, summary = SUMMARIZE[stage.kind](rc, timed_out, report, output)
            entry.update(
                status=status, seconds=round(seconds, 1), rc=rc, timed_out=timed_out, summary=summary, report=report
            )
            if stage.kind == "env":
                result["env"] = summary
                entry.pop("report")
            if stage.kind == "kernels":
                result["verdict"]["kernels"] = status
                if status in ("FAIL", "ERROR") and not reference:
                    reference = True
                    why = f"the kernel check reported {status}"
                    result["verdict"]["experts_backend_forced"] = f"reference ({why})"
                    print(
                        f"!! {why}: every later benchmark runs with GPTOSS_TUNE_EXPERTS_BACKEND=reference", flush=True
                    )
            for line in [ln for ln in output.splitlines() if not ln.startswith("{")][-tail:]:
                print(f"   | {line[:200]}", flush=True)
            why = " (stopped at its limit)" if timed_out else ""
            print(f"== {stage.name}: {status}{why} in {seconds:.1f} s (rc {rc})", flush=True)
            result["stages"].append(entry)
            _write_json(qjson, result)
    backends = sorted({(e.get("summary") or {}).get("ours", {}).get("experts_backend") for e in result["stages"]
                       if e.get("status") not in ("SKIPPED", None) and isinstance(e.get("summary"), dict)
                       and isinstance(e["summary"].get("ours"), dict)} - {None})  # fmt: skip
    result["verdict"]["benchmark_experts_backends"] = backends
    result["verdict"]["goals"] = [dict(g, stage=e["stage"]) for e in result["stages"]
                                  if isinstance(e.get("summary"), dict) for g in e["summary"].get("goals", [])]  # fmt: skip
    result["total_s"] = round(time.monotonic() - t0, 1)
    result["finished"] = True
    _write_json(qjson, result)
    return result


# ---------------------------------------------------------------------------------------------------------
# the summary printed last
# ---------------------------------------------------------------------------------------------------------
def _g(v, fmt):
    return "-" if v is None else format(v, fmt)


def _figures(entry) -> str:
    s = entry.get("summary")
    if not isinstance(s, dict):
        return str(s or "")
    kind_figures = []
    if "checks" in s:  # kernels: the worst error over the sizes, per tensor, against its tolerance
        worst: dict[str, list] = {}
        for checks in s["checks"].values():
            for name, (err, tol, _ok) in checks.items():
                if name.startswith("grad_lora[idle"):
                    continue
                if name not in worst or not err <= worst[name][0]:
                    worst[name] = [err, tol]
        sizes = ",".join(s["checks"])
        kind_figures.append(f"E={sizes or '-'}: " + " ".join(f"{n} {e:.1e}/{t:.0e}" for n, (e, t) in worst.items()))
        if s.get("failed"):
            kind_figures.append("FAILED " + ", ".join(s["failed"][:6]))
    elif "ours" in s:  # bench
        o, b = s.get("ours") or {}, s.get("baseline") or {}
        if "skipped" in o:
            kind_figures.append(f"ours {o['skipped'][:90]}")
        elif o:
            kind_figures.append(f"ours {_g(o.get('tokens_per_s'), ',.0f')} tok/s, peak {_g(o.get('peak_gib_with_warmup'), '.2f')} GiB, "
                                f"spread {_g(o.get('step_spread'), '.1%')}, {o.get('experts_backend', '?')}")  # fmt: skip
        if "skipped" in b:
            kind_figures.append(f"baseline {b['skipped'][:70]}")
        elif b:
            kind_figures.append(
                f"baseline {_g(b.get('tokens_per_s'), ',.0f')} tok/s, peak {_g(b.get('peak_gib_with_warmup'), '.2f')} GiB"
            )
        if s.get("speedup"):
            kind_figures.append(
                f"speedup {s['speedup']:.2f}x, first-loss diff {_g(s.get('first_loss_rel_diff'), '.1e')}"
            )
    elif "max_rel_diff" in s:
        kind_figures.append(f"max rel diff {_g(s.get('max_rel_diff'), '.1e')} (tol {_g(s.get('tol'), '.0e')})")
    elif "rows" in s:
        rows = [r for r in s["rows"] if r.get("name") in ("ours fwd+bwd LoRA r16", "bf16 grouped_mm fwd+bwd")]
        kind_figures.append(
            "; ".join(f"{r['shape']} {r['name']} {_g(r.get('ms'), '.2f')} ms" for r in rows) or f"{len(s['rows'])} rows"
        )
    elif "counts" in s:
        kind_figures.append(", ".join(f"{n} {k}" for k, n in s["counts"].items()) or "no count")
        kind_figures += s.get("failures", [])[:3]
    elif "device" in s:
        memory = f" {s['memory_gib']} GiB" if "memory_gib" in s else ""
        kind_figures.append(f"{s.get('device')}{memory}; torch {s.get('torch')}, transformers "
                            f"{s.get('transformers')}, peft {s.get('peft')}, triton {s.get('triton')}")  # fmt: skip
    if "error_tail" in s:
        kind_figures.append("error: " + " / ".join(s["error_tail"].strip().splitlines()[-2:])[:200])
    return "; ".join(kind_figures)


def format_summary(result: dict, out: Path) -> str:
    lines = [f"== quick plan: {result.get('total_s', 0):.0f} s of {result['plan']['deadline_s']:.0f} s"]
    lines.append(f"{'stage':<12} {'status':<10} {'s':>6}  figures")
    for e in result["stages"]:
        lines.append(f"{e['stage']:<12} {e['status']:<10} {e['seconds']:>6.1f}  {_figures(e)}")
    v = result["verdict"]
    lines.append(f"kernels: {v.get('kernels', 'not run')}; experts backend in the benchmarks: "
                 f"{', '.join(v.get('benchmark_experts_backends') or []) or '-'}"
                 + (f"; FORCED {v['experts_backend_forced']}" if "experts_backend_forced" in v else ""))  # fmt: skip
    for g in v.get("goals", []):
        value = "" if g.get("value") is None else f" (value {g['value']:.4g})"
        lines.append(f"goal {g['goal']}: {'MET' if g['met'] else 'MISSED ' + g.get('detail', '')}{value}")
    lines.append(f"files: {out / 'quick.json'}, {out / 'quick.log'}")
    return "\n".join(lines)


# The model stage's settings types are pydantic models, which the GPU image lacks: its wheels travel in .whl/
# (bash scripts/gpu_wheels.sh here, then carry [".whl"]) and are unpacked for the stages. Names as in the
# wheel files (tests/helpers/gpu_machine_imports.py CARRIED).
CARRIED_WHEELS = ("pydantic", "pydantic_core", "typing_inspection", "annotated_types", "typing_extensions")


def carried_site(work: Path, python: str) -> Path | None:
    """A folder with the carried packages unpacked, when `python` cannot import pydantic; None when it can."""
    probe = subprocess.run([python, "-c", "import pydantic"], capture_output=True)
    if probe.returncode == 0:
        return None
    wheels = sorted(w for w in (ROOT / ".whl").glob("*.whl") if w.name.split("-")[0].lower() in CARRIED_WHEELS)
    if not wheels:
        raise SystemExit(
            "gpu_quick: pydantic is not importable here and .whl/ holds no wheels for it: run "
            '`bash scripts/gpu_wheels.sh` where PyPI is reachable and pass carry [".whl"] to the call'
        )
    site = work / "site"
    # pip of the plan's own interpreter (the GPU machine's python3, the same one the stages run with)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target"]
    subprocess.run([*pip, str(site), *map(str, wheels)], check=True)
    return site


def stage_env(work: Path, python: str = sys.executable) -> dict:
    """The repo and kernels/ as `gptoss_kernels` (never as `kernels`, a name transformers probes) on the path,
    and the carried packages where the interpreter lacks them."""
    site = carried_site(work, python)
    shim = work / "shim"
    shim.mkdir(exist_ok=True)
    link = shim / "gptoss_kernels"
    if not link.exists():
        link.symlink_to(ROOT / "kernels", target_is_directory=True)
    env = dict(os.environ)
    paths = [str(ROOT), str(shim)] + ([str(site)] if site else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", WANDB_MODE="disabled")  # fmt: skip
    return env


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="the whole plan on the CPU at tiny sizes (CI)")
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help=f"seconds for the plan (default {DEADLINE_S}; dry run {DRY_DEADLINE_S})",
    )
    ap.add_argument("--only", nargs="+", default=None, help="these stages only, in plan order")
    ap.add_argument("--cap", action="append", default=[], metavar="STAGE=S", help="another cap for a stage, seconds")
    ap.add_argument(
        "--reference", action="store_true", help="benchmarks with GPTOSS_TUNE_EXPERTS_BACKEND=reference from the start"
    )
    ap.add_argument(
        "--out", default=os.environ.get("OUT") or "quick-out", help="output folder (default $OUT, else ./quick-out)"
    )
    ap.add_argument("--python", default=sys.executable, help="the interpreter the stages run with")
    ap.add_argument(
        "--wrap", default=None, help="run each stage script through this one (tests: gpu_machine_imports.py)"
    )
    return ap.parse_args(argv)  # fmt: skip


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out).resolve()
    with tempfile.TemporaryDirectory(prefix="gpu_quick_") as tmp:
        work = Path(tmp)
        stages = build_plan(args.dry_run, work, args.python, args.wrap)
        names = [s.name for s in stages]
        if args.only:
            unknown = sorted(set(args.only) - set(names))
            if unknown:
                print(f"gpu_quick: unknown stage(s) {', '.join(unknown)} (stages: {' '.join(names)})", file=sys.stderr)
                return 2
            stages = [s for s in stages if s.name in args.only]
        for cap in args.cap:
            name, _, seconds = cap.partition("=")
            match = [s for s in stages if s.name == name]
            if not match or not seconds.replace(".", "", 1).isdigit():
                print(
                    f"gpu_quick: --cap {cap}: expected STAGE=SECONDS with a stage of {' '.join(names)}", file=sys.stderr
                )
                return 2
            match[0].cap_s = float(seconds)
        deadline = args.deadline or (DRY_DEADLINE_S if args.dry_run else DEADLINE_S)
        mode = "dry run (CPU, tiny sizes)" if args.dry_run else "GPU"
        print(f"gpu_quick: {mode}, {len(stages)} stages, deadline {deadline:.0f} s, output {out}", flush=True)
        result = execute(stages, out, deadline, stage_env(work, args.python), force_reference=args.reference)
    print(format_summary(result, out), flush=True)
    bad = [e["stage"] for e in result["stages"] if e["status"] in ("FAIL", "ERROR")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
