"""scripts/gpu_quick.py, the one-call GPU plan (issue 15): its logic on stand-in stages (fast), the GPU plan's
flags against each script's own parser, and the whole plan dry-run on the CPU (slow: eight subprocesses)."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


quick = _script("gpu_quick")


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_kernel_failure_sends_the_benchmarks_to_the_reference_and_the_deadline_holds(tmp_path):
    """A failed kernel check: every later stage that can takes GPTOSS_TUNE_EXPERTS_BACKEND=reference and the
    summary says so; a stage past its limit is stopped and the plan goes on; a stage the deadline cannot hold
    is skipped and named; the bench stage gets --time-limit under its stage limit; two files come back."""
    S = quick.Stage
    kernels_json, bench_json = str(tmp_path / "k.json"), str(tmp_path / "b.json")
    failed = {"results": [{"experts": 32, "tensor": "out", "rel_err": 0.5, "tolerance": 0.01, "passed": False},
                          {"experts": 32, "tensor": "grad_x", "rel_err": 1e-3, "tolerance": 0.02, "passed": True}],
              "complete": True}  # fmt: skip
    write_bench = (
        "import json, os, sys; limit = sys.argv[sys.argv.index('--time-limit') + 1]; "
        f"json.dump({{'ours': {{'experts_backend': os.environ.get('GPTOSS_TUNE_EXPERTS_BACKEND', 'triton'), "
        f"'tokens_per_s': 1.0, 'step_s': [1.0, 1.1, 0.9], 'step_s_median': 1.0, 'limit': limit}}, 'goals': []}}, "
        f"open({bench_json!r}, 'w'))"
    )
    stages = [
        S("kernels", "kernels", _py(f"import json, sys; json.dump({failed!r}, open({kernels_json!r}, 'w')); sys.exit(1)"),
          30, 0, kernels_json),
        S("20b", "bench", _py(write_bench) + ["--json-out", bench_json], 40, 0, bench_json, fallback=True, time_limit=True),
        S("hang", "pytest", _py("import time; print('started', flush=True); time.sleep(120)"), 1.5, 0),
        S("late", "pytest", _py("pass"), 30, 1000),
    ]  # fmt: skip
    t0 = time.monotonic()
    r = quick.execute(stages, tmp_path / "out", deadline_s=60, base_env=quick.stage_env(tmp_path))
    assert time.monotonic() - t0 < 30
    status = {e["stage"]: e["status"] for e in r["stages"]}
    assert status == {"kernels": "FAIL", "20b": "OK", "hang": "TIMEOUT", "late": "SKIPPED"}
    assert r["verdict"]["kernels"] == "FAIL" and "reference" in r["verdict"]["experts_backend_forced"]
    bench = r["stages"][1]
    assert bench["env"] == {"GPTOSS_TUNE_EXPERTS_BACKEND": "reference"}
    assert bench["summary"]["ours"]["experts_backend"] == "reference"
    assert int(bench["report"]["ours"]["limit"]) == 40 - quick.BENCH_MARGIN_S
    assert bench["summary"]["ours"]["step_spread"] == pytest.approx(0.2)
    assert r["stages"][2]["timed_out"] and r["stages"][2]["seconds"] < 1.5 + quick.KILL_GRACE_S + 2
    assert "needs 1000" in r["stages"][3]["summary"]
    assert r["verdict"]["benchmark_experts_backends"] == ["reference"] and r["finished"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["quick.json", "quick.log"]
    assert json.loads((tmp_path / "out" / "quick.json").read_text()) == json.loads(json.dumps(r, default=str))
    assert "started" in (tmp_path / "out" / "quick.log").read_text()
    text = quick.format_summary(r, tmp_path / "out")
    assert "kernels: FAIL" in text and "FORCED reference" in text and "FAILED E=32 out" in text


def test_a_kernel_check_cut_by_time_after_passing_sizes_keeps_the_kernels(tmp_path):
    """Stopped at its limit after E = 32 passed: INCOMPLETE, not a failure; the benchmarks keep the kernels."""
    path = str(tmp_path / "k.json")
    partial = {"results": [{"experts": 32, "tensor": "out", "rel_err": 3e-3, "tolerance": 0.01, "passed": True}],
               "complete": False}  # fmt: skip
    code = f"import json, time; json.dump({partial!r}, open({path!r}, 'w')); time.sleep(60)"
    stages = [quick.Stage("kernels", "kernels", _py(code), 1.5, 0, path),
              quick.Stage("after", "pytest", _py("pass"), 10, 0, fallback=True)]  # fmt: skip
    r = quick.execute(stages, tmp_path / "out", deadline_s=60, base_env=quick.stage_env(tmp_path))
    assert r["verdict"]["kernels"] == "INCOMPLETE" and "experts_backend_forced" not in r["verdict"]
    assert r["stages"][1]["env"] == {}


def test_the_gpu_plan_parses_with_each_scripts_own_flags(tmp_path):
    """Every GPU stage's command is accepted by its script's parser (a typo in a GPU-only flag would otherwise
    surface only on the device), and the dry run uses the same scripts and flags but for sizes and device."""
    parsers = {"bench_train.py": _script("bench_train").parse_args, "check_moe_gpu.py": _script("check_moe_gpu").parse,
               "check_convergence_gpu.py": _script("check_convergence_gpu").parse, "bench_moe.py": _script("bench_moe").parse}  # fmt: skip
    gpu = quick.build_plan(False, tmp_path, sys.executable)
    dry = quick.build_plan(True, tmp_path, sys.executable)
    assert [s.name for s in gpu] == ["env", "kernels", "20b", "120b", "131k", "convergence", "moe", "attention"]
    assert [s.name for s in dry] == [s.name for s in gpu]
    sizes = {
        "--model",
        "--seq",
        "--experts",
        "--tokens",
        "--hidden",
        "--rank",
        "--device",
        "--small",
        "--tiny",
        "--steps",
    }
    for g, d in zip(gpu, dry):
        script = Path(g.argv[1]).name
        if script in parsers:
            args = parsers[script](g.argv[2:] + (["--time-limit", "100"] if g.time_limit else []))
            assert vars(args), g.name
            assert Path(d.argv[1]).name == script
        gpu_flags = {a for a in g.argv if a.startswith("--")} - sizes
        assert gpu_flags <= {a for a in d.argv if a.startswith("--")}, g.name
        assert "--device" not in g.argv
    plan = {s.name: s.argv for s in gpu}
    assert plan["20b"][plan["20b"].index("--seq") + 1] == "2048" and "--baseline" in plan["20b"]
    assert plan["131k"][plan["131k"].index("--seq") + 1] == "131072"
    assert plan["120b"][plan["120b"].index("--model") + 1] == "120b"
    assert plan["kernels"][plan["kernels"].index("--experts") + 1 :][:2] == ["32", "128"]
    assert sum(s.cap_s for s in gpu[:5]) > quick.DEADLINE_S - 100  # the first five may use the whole deadline
    assert quick.main(["--only", "nonsense"]) == 2


@pytest.mark.slow
def test_the_whole_plan_dry_runs_on_the_cpu(tmp_path):
    """--dry-run: every stage, the same scripts and flags at tiny sizes on the CPU, each script through
    gpu_machine_imports.py (a package the GPU machine lacks fails it), in one call, as CI would."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_quick.py"), "--dry-run", "--out", str(out),
           "--wrap", str(ROOT / "tests" / "helpers" / "gpu_machine_imports.py")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    r = json.loads((out / "quick.json").read_text())
    assert r["finished"] and [e["stage"] for e in r["stages"]] == [s.name for s in quick.build_plan(True, tmp_path, "")]
    status = {e["stage"]: e["status"] for e in r["stages"]}
    assert status == {"env": "OK", "kernels": "PASS", "20b": "OK", "120b": "OK", "131k": "OK",
                      "convergence": "PASS", "moe": "OK", "attention": "PASS"}, status  # fmt: skip
    assert r["env"]["device"] == "cpu" and r["verdict"]["kernels"] == "PASS"
    assert r["verdict"]["benchmark_experts_backends"] == ["reference"]  # the CPU's backend, not a forced one
    stages = {e["stage"]: e for e in r["stages"]}
    assert set(stages["kernels"]["summary"]["checks"]) == {"4", "8"}
    for name in ("20b", "120b", "131k"):
        assert stages[name]["summary"]["ours"]["tokens_per_s"] > 0 and stages[name]["seconds"] > 0
        assert "--time-limit" in stages[name]["command"]
    assert stages["20b"]["summary"]["first_loss_rel_diff"] < 1e-5
    assert {row["shape"] for row in stages["moe"]["summary"]["rows"]} == {"20b-2048", "120b-2048"}
    assert sorted(p.name for p in out.iterdir()) == ["quick.json", "quick.log"]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("files:") and "== quick plan" in proc.stdout


def test_the_carried_pydantic_wheels_are_unpacked_where_the_interpreter_lacks_pydantic(tmp_path, monkeypatch):
    """The GPU image has no pydantic (the model stage's settings types need it): the plan unpacks the carried
    wheels from .whl/ for the stages, stops at once naming gpu_wheels.sh when there are none, and adds
    nothing where pydantic imports."""
    assert quick.carried_site(tmp_path, sys.executable) is None  # this interpreter has it
    bare = tmp_path / "bare-python"  # an interpreter without site-packages: no pydantic, like the GPU image
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    repo = tmp_path / "repo"
    (repo / ".whl").mkdir(parents=True)
    monkeypatch.setattr(quick, "ROOT", repo)
    with pytest.raises(SystemExit, match=r"gpu_wheels\.sh.*carry \[\"\.whl\"\]"):
        quick.carried_site(tmp_path, str(bare))
    # a wheel is a zip; pip unpacks it with --target (the stand-in wheel holds a module named pydantic)
    import zipfile

    wheel = repo / ".whl" / "pydantic-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pydantic/__init__.py", "VERSION = '9.9.9'\n")
        z.writestr("pydantic-9.9.9.dist-info/METADATA", "Metadata-Version: 2.1\nName: pydantic\nVersion: 9.9.9\n")
        z.writestr("pydantic-9.9.9.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("pydantic-9.9.9.dist-info/RECORD", "")
    (repo / ".whl" / "datasets-1.0-py3-none-any.whl").write_bytes(b"not a wheel: must not be touched")
    site = quick.carried_site(tmp_path, str(bare))
    assert (site / "pydantic" / "__init__.py").read_text() == "VERSION = '9.9.9'\n"
    assert not (site / "datasets").exists()
