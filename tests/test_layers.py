"""The layer rule: each stage imports only stages below it, so no import cycle can form.

    cli, demo, perf (and the `python -m` launchers)          the commands
      serve       -> export -> train -> runs -> data -> model  the stages of the data flow
      errors, devices, atomic_io, settings                    the core every stage uses
    gptoss_kernels                                            the kernels (never import gptoss_tune)

Every import is checked, at module level and inside functions alike: a function-level import of an upper
stage is still an upward dependency, only hidden.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LAYERS = [
    ["gptoss_kernels"],
    ["errors", "devices", "atomic_io", "settings"],
    ["model"],
    ["data"],
    ["runs"],
    ["train"],
    ["export"],
    ["serve"],
    ["cli", "demo", "perf", "__main__", "__init__"],
]
RANK = {stage: i for i, stages in enumerate(LAYERS) for stage in stages}
SIDEWAYS = {1, len(LAYERS) - 1}  # the core modules, and the commands, may use each other
LAUNCHERS = {"__main__"}  # `python -m gptoss_tune.<stage>` entry points sit with the commands


def stage_of(module: str) -> str:
    parts = module.split(":")[0].split(".")
    if parts[0] == "gptoss_kernels":
        return "gptoss_kernels"
    if parts[-1] in LAUNCHERS:
        return "__main__"
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts[0] = "gptoss_kernels"
    if parts[-1] == "__init__":
        parts = parts[:-1] if len(parts) > 1 else parts
    return ".".join(parts)


def _is_module(package: str, name: str) -> bool:
    if package not in ("gptoss_tune", "gptoss_kernels"):
        return False
    d = REPO / ("kernels" if package == "gptoss_kernels" else package)
    return (d / f"{name}.py").is_file() or (d / name / "__init__.py").is_file()


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, module) of every import of gptoss_tune / gptoss_kernels in `source`, relative ones resolved."""
    package = module.split(".")
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level] + ([base] if base else []))
            # `from gptoss_tune import runs` imports the module gptoss_tune.runs; `from gptoss_tune import
            # load_model` a name of the package facade
            out += [
                (node.lineno, f"{base}.{a.name}" if _is_module(base, a.name) else f"{base}:{a.name}")
                for a in node.names
            ]
    # `from gptoss_tune import __version__` reads package metadata, not code
    return [(n, m) for n, m in out if m.split(".")[0] in ("gptoss_tune", "gptoss_kernels") and "__version__" not in m]


def violations(files: dict[str, str]) -> list[str]:
    """Imports that go up the layers, or sideways into another stage of the same layer."""
    bad = []
    for module, source in files.items():
        here = stage_of(module)
        for line, target in imported_modules(source, module):
            there = stage_of(target)
            if here == "gptoss_kernels" and there != "gptoss_kernels":
                bad.append(f"{module}:{line}: the kernels import {target}; they must not depend on gptoss_tune")
            elif RANK[there] > RANK[here] or (
                RANK[there] == RANK[here] and there != here and RANK[here] not in SIDEWAYS
            ):
                bad.append(f"{module}:{line}: {here} imports {target} ({there} is not below {here})")
    return bad


def project_files() -> dict[str, str]:
    paths = [*(REPO / "gptoss_tune").rglob("*.py"), *(REPO / "kernels").rglob("*.py")]
    return {module_name(p): p.read_text() for p in paths}


def test_every_module_belongs_to_a_layer():
    unknown = {stage_of(m) for m in project_files()} - set(RANK)
    assert not unknown, f"modules outside the layer list: {unknown}; add their stage to LAYERS"


def test_no_import_goes_up_the_layers():
    assert violations(project_files()) == []


@pytest.mark.parametrize(
    "module,source",
    [
        ("gptoss_tune.model.loader", "def f():\n    from gptoss_tune.train.recipe import Recipe\n"),
        ("gptoss_tune.data.rendering", "from gptoss_tune.serve import app\n"),
        ("gptoss_tune.train.trainer", "import gptoss_tune.export.exporter\n"),
        ("gptoss_kernels.moe_reference", "from gptoss_tune.model.config import PAD_ID\n"),
        ("gptoss_tune.errors", "from gptoss_tune.runs import CHECKPOINTS\n"),
        ("gptoss_tune.model.lora", "from .. import runs\n"),
    ],
)
def test_the_check_catches_an_upward_import(module, source):
    assert len(violations({module: source})) == 1


# Function-level imports hide dependencies from the reader and from this check's first glance, so they are
# kept only where they buy something: a heavy or optional third-party package that most commands never need
# (the reason beside each), and the entry points, which import their stage only once a verb runs so that
# `gptoss-tune --help` does not pay for torch and transformers (about 4 s here).
LAZY_PACKAGES = {
    "triton": "optional: CUDA kernels; the CPU paths run without it",
    "gptoss_kernels.moe_triton": "needs triton (optional)",
    "deepspeed": "optional extra: only under a DeepSpeed accelerate config",
    "wandb": "optional tracker",
    "bitsandbytes": "optional: only for 8-bit optimizer states",
    "quicktok": "optional source of the tokenizer's vocabulary file",
    "fastapi": "the server's dependency: training never loads it",
    "starlette": "the server's dependency: training never loads it",
    "uvicorn": "the server's dependency: training never loads it",
    "openai": "the demo's client only",
    "transformers": "heavy (about 2 s to import): the data and recipe stages run without it",
    "peft": "heavy, and only when LoRA goes on attention",
    "datasets": "heavy (pyarrow): only when data is read",
    "torch._dynamo": "imports the compiler stack: only on the compiled attention route",
    "torch.profiler": "only when a benchmark profiles",
    "torch.distributed": "only on multi-process runs",
}
LAZY_MODULES = ("gptoss_tune.__init__", "gptoss_tune.cli.", "gptoss_tune.demo.")


def function_level_imports(source: str) -> list[tuple[int, str]]:
    found = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    found += [(node.lineno, a.name) for a in node.names]
                elif isinstance(node, ast.ImportFrom):  # `from a import b` counts as a.b: b may be a module
                    base = "." * node.level + (node.module or "")
                    found += [(node.lineno, f"{base}.{a.name}".replace("..", ".")) for a in node.names]
    return sorted(set(found))


def unjustified_lazy_imports(files: dict[str, str]) -> list[str]:
    bad = []
    for module, source in files.items():
        entry_point = (module + ".").startswith(LAZY_MODULES) or module == "gptoss_tune"
        for line, name in function_level_imports(source):
            if entry_point and name.startswith(("gptoss_tune", "gptoss_kernels", ".")):
                continue
            if not any(name == p or name.startswith(p + ".") for p in LAZY_PACKAGES):
                bad.append(f"{module}:{line} imports {name} inside a function: move it to the module's imports")
    return bad


def test_function_level_imports_only_for_heavy_or_optional_packages():
    assert unjustified_lazy_imports(project_files()) == []


@pytest.mark.parametrize(
    "module,source,expected",
    [
        ("gptoss_tune.model.adapter", "def f():\n    from gptoss_tune.model.loader import load_model\n", 1),
        ("gptoss_tune.serve.app", "def f():\n    import hmac\n", 1),
        ("gptoss_tune.train.tracking", "def f():\n    import wandb\n", 0),
        ("gptoss_tune.cli.train", "def f():\n    from gptoss_tune.train.trainer import Trainer\n", 0),
        ("gptoss_tune.cli.train", "def f():\n    import json\n", 1),
    ],
)
def test_the_lazy_import_check_catches_a_needless_one(module, source, expected):
    assert len(unjustified_lazy_imports({module: source})) == expected
