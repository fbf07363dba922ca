"""bench_train.py: the CPU smoke run of its whole code path, and the pieces its numbers rest on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptoss_tune.model.experts import MXFP4Experts
from gptoss_tune.perf import bench, flops, models, report

ROOT = Path(__file__).resolve().parents[2]


def test_bench_script_prints_valid_json_and_a_table(tmp_path):
    out = tmp_path / "r.json"
    # through gpu_machine_imports.py: it fails if the script imported a package the GPU machine lacks
    cmd = [sys.executable, str(ROOT / "tests" / "helpers" / "gpu_machine_imports.py"), str(ROOT / "scripts" / "bench_train.py"),
           "--model", "tiny", "--seq", "48", "--steps", "1", "--warmup", "1", "--baseline", "--json-out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("{"))
    r = json.loads(line)
    assert r == json.loads(out.read_text())
    assert r["model"] == "tiny" and r["seq"] == 48 and r["device"] == "cpu"
    for key in ("ours", "baseline"):
        assert r[key]["tokens_per_s"] > 0 and len(r[key]["step_s"]) == 1
    # same weights, LoRA B = 0: both runs start from the same function (fp32 on the CPU)
    assert r["first_loss_rel_diff"] < 1e-5
    assert r["ours"]["trainable_params"] == r["baseline"]["trainable_params"]
    assert r["ours"]["experts_backend"] == "reference"
    assert "tokens/s" in proc.stdout and "speedup" in proc.stdout


def test_ours_and_baseline_hold_the_same_weights():
    cfg = models.bench_config("tiny")
    ours = models.build_ours(cfg, torch.device("cpu"), torch.float32, seed=3)
    base = models.build_baseline(cfg, torch.device("cpu"), torch.float32, seed=3)
    for layer_o, layer_b in zip(ours.model.layers, base.model.layers):
        assert isinstance(layer_o.mlp.experts, MXFP4Experts)
        for proj in ("gate_up_proj", "down_proj"):
            w = getattr(layer_b.mlp.experts, proj)
            assert torch.equal(layer_o.mlp.experts.dequantized(proj), w)
            assert 0.01 < w.std().item() < 0.04  # about 1/sqrt(hidden) of the real model
    so, sb = ours.state_dict(), base.state_dict()
    shared = [k for k in sb if k in so]
    assert len(shared) > 10
    for k in shared:
        assert torch.equal(so[k], sb[k]), k
    other = models.build_ours(cfg, torch.device("cpu"), torch.float32, seed=4)
    assert not torch.equal(other.lm_head.weight, ours.lm_head.weight)


def test_active_parameters_match_the_published_counts():
    # docs/gpt-oss-facts.md: active per token 3.61 B (20b), 5.13 B (120b), lm_head included
    assert round(flops.active_params(models.bench_config("20b"), 8, "all")["matmul"] / 1e9, 2) == 3.61
    assert round(flops.active_params(models.bench_config("120b"), 8, "all")["matmul"] / 1e9, 2) == 5.13
    # the issue: bf16 experts alone are 229 GB for 120b
    assert 229e9 < models.dense_bytes(models.bench_config("120b")) < 240e9


def test_attention_flops_count_visible_keys():
    cfg = {
        "num_attention_heads": 1,
        "head_dim": 1,
        "sliding_window": 3,
        "layer_types": ["sliding_attention", "full_attention"],
    }
    L = 10
    sliding = sum(min(p + 1, 3) for p in range(L)) / L
    full = sum(p + 1 for p in range(L)) / L
    assert flops.attention_forward_flops(cfg, L) == pytest.approx(4 * (sliding + full))


def test_goals_report_misses_with_the_gap():
    r = {"model": "20b", "seq": 2048, "lora_on": "all", "speedup": 6.0,
         "ours": {"tokens_per_s": 8000.0, "peak_gib": 14.0, "peak_gib_with_warmup": 15.0}}  # fmt: skip
    goals = {g["goal"]: g for g in report.check_goals(r)}
    assert goals["20b seq 2048: tokens/s >= 10000"]["met"] is False
    assert "missed by 2000" in goals["20b seq 2048: tokens/s >= 10000"]["detail"]
    assert goals["20b seq 2048: peak GiB <= 16.0"]["met"] and goals["20b seq 2048: speedup >= 5.0"]["met"]
    assert report.check_goals({**r, "model": "tiny"}) == []


def test_real_sizes_are_refused_without_a_gpu_unless_asked(tmp_path):
    """20b at its real size on a CPU machine would take tens of GB of host memory (seen: OOM-killed)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--model", "20b", "--seq", "16"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "--model 20b needs a CUDA device" in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_bench_script_plumbing_without_a_gpu(tmp_path):
    """scripts/gpu_bench.sh on a CPU machine: it returns within its budget, skips a stage the budget cannot
    hold, names unknown stages, and leaves at most three files (the device tool brings back at most eight)."""

    def run(budget, *stages):
        env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, BUDGET=str(budget), MIN_STAGE="50")
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh"), *stages], env=env,
                              capture_output=True, text=True, timeout=240, cwd=ROOT)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        return proc.stdout

    out = run(10, "nonsense", "120b", "kernels", "demo")
    assert "unknown stage nonsense" in out and "120b_2048 SKIPPED" in out and "== summary" in out
    if not (ROOT / ".whl").is_dir():  # a clean checkout: the demo stage says where its wheels come from
        assert "demo SKIPPED: no wheels in .whl/ (run bash scripts/gpu_wheels.sh" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["env.txt", "gpu_bench.log", "results.jsonl"]
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["rc"]) for r in lines] == [
        ("120b_2048", -1),
        ("kernels-check", -1),
        ("kernels-convergence", -1),
        ("demo", -1),
    ]


@pytest.mark.parametrize(
    "script,args",
    [
        ("check_moe_gpu.py", ["--device", "cpu", "--small", "--experts", "4", "--tokens", "24", "--rank", "4"]),
        ("check_convergence_gpu.py", ["--device", "cpu", "--small", "--steps", "2"]),
    ],
)
def test_gpu_check_scripts_run_their_plumbing_on_the_cpu(script, args, tmp_path):
    """The kernel check scripts, interpreted on the CPU at small sizes: they pass, write their JSON, and
    import only what the GPU machine has (what bench_moe.py imports, these import too)."""
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(ROOT / "tests" / "helpers" / "gpu_machine_imports.py"), str(ROOT / "scripts" / script), *args,
           "--json", str(tmp_path / "r.json")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("PASS") and json.loads((tmp_path / "r.json").read_text())


def test_an_out_of_memory_run_is_reported_and_freed_and_the_other_still_runs(monkeypatch):
    """On the GPU either model may run out of memory (the baseline at long sequences, ours while tuning):
    the script must still print what did run, say which one ran out, and free the device memory the failed
    run held before the other one is measured."""
    import weakref

    held = []

    def oom_baseline(setup, deadline=None):
        model = torch.nn.Linear(8, 8)  # stands for the model the failed run had built
        held.append(weakref.ref(model))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")

    monkeypatch.setattr(bench, "_run_baseline", oom_baseline)
    r = bench.run(_config(baseline=True))
    assert r["ours"]["tokens_per_s"] > 0
    assert r["baseline"]["out_of_memory"] and "out of memory (baseline): CUDA out of memory" in r["baseline"]["skipped"]
    assert "more detail" not in r["baseline"]["skipped"] and "speedup" not in r
    assert held and held[0]() is None  # nothing of the failed run survives its report
    assert "out of memory (baseline)" in report.format_table(r)
    json.loads(report.to_json(r))

    # ours out of memory on a goal case: every goal of that case reads as missed, with the reason
    r = {"model": "20b", "seq": 131072, "lora_on": "all", "batch": 1, "rank": 8, "device": "H100",
         "ours": {"skipped": "out of memory (ours): CUDA out of memory", "out_of_memory": True}}  # fmt: skip
    r["goals"] = report.check_goals(r)
    assert [(g["met"], g["detail"]) for g in r["goals"]] == [(False, "out of memory (ours): CUDA out of memory")]
    assert "MISSED out of memory (ours)" in report.format_table(r)


def test_mfu_peak_by_device_name():
    assert flops.peak_for_device_name("NVIDIA H100 80GB HBM3") == 989.4  # the SXM part the goals are set on
    assert flops.peak_for_device_name("NVIDIA H100 PCIe") == 756.0
    assert flops.peak_for_device_name("NVIDIA H200") == 989.4
    assert flops.peak_for_device_name("NVIDIA A100-SXM4-80GB") is None


def _config(**over):
    """The BenchConfig bench_train.py's flags make for a tiny CPU run, with `over` replaced."""
    import dataclasses
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args(
        ["--model", "tiny", "--seq", "16", "--rank", "4", "--steps", "1", "--warmup", "0", "--device", "cpu"]
    )
    return dataclasses.replace(script.config_from_args(args), **over)


def test_mixed_precision_is_the_training_loops_autocast():
    """On CUDA the training loop runs the forward under bf16 autocast (train.mixed_precision auto), so the
    benchmark does too by default; the setting is recorded and takes effect (bf16 matmuls move the loss)."""
    config = _config()
    plain = bench.run(config)
    mixed = bench.run(_config(mixed_precision="bf16"))
    assert config == _config() and config.alpha is None and plain["alpha"] == 8  # run resolves, never mutates
    assert plain["settings"]["mixed_precision"] == "no" and mixed["settings"]["mixed_precision"] == "bf16"
    a, b = plain["ours"]["loss_first"], mixed["ours"]["loss_first"]
    assert a != b and abs(a - b) / a < 1e-3


def test_a_bad_benchmark_config_is_one_user_error():
    from gptoss_tune.errors import UserError

    with pytest.raises(UserError, match=r"benchmark lora_on='experts': choose one of all, attention"):
        bench.BenchConfig(model="tiny", seq=16, lora_on="experts")
    with pytest.raises(UserError, match=r"benchmark seq=0: must be at least 1"):
        bench.BenchConfig(model="tiny", seq=0)


def test_perf_sits_on_top_and_nothing_in_the_library_imports_it():
    """perf may import model/, data/, train/ (and the shared base modules), never cli/serve/export/demo;
    no other package imports perf."""
    import ast

    def imports(path):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                yield from (a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield node.module

    pkg = ROOT / "gptoss_tune"
    seen_perf = set()
    for path in pkg.rglob("*.py"):
        ours = [m for m in imports(path) if m.startswith("gptoss_tune.")]
        if path.parent.name == "perf":
            seen_perf.update(m.split(".")[1] for m in ours)
        else:
            assert not [m for m in ours if m.startswith("gptoss_tune.perf")], path
    assert {"model", "train", "perf"} <= seen_perf  # the scan sees perf's own imports
    assert seen_perf <= {"model", "data", "train", "perf", "errors", "devices", "atomic_io", "runs"}, seen_perf


def test_a_time_limit_cuts_the_timed_steps_and_skips_the_baseline():
    """--time-limit (the quick GPU plan gives each stage one): at least one timed step, then no more once
    the next would end past the limit, and no baseline once ours used it up; ours' part is handed out first."""
    partial = []
    r = bench.run(_config(baseline=True, steps=4, time_limit_s=0.01), on_partial=partial.append)
    assert len(r["ours"]["step_s"]) == 1 and r["ours"]["cut_by_time_limit"] is True
    assert r["baseline"]["skipped"].startswith("time limit") and "speedup" not in r
    assert r["settings"]["time_limit_s"] == 0.01
    assert [p["incomplete"] for p in partial] == ["the baseline was still to run"] and "baseline" not in partial[0]

    timed = iter(range(100))
    res = bench.run_steps(lambda: float(next(timed)), torch.device("cpu"), warmup=1, steps=3, deadline=None)
    assert len(res.seconds) == 3 and not res.cut_by_time_limit and res.losses == [0.0, 1.0, 2.0, 3.0]
