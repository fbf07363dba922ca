"""`python -m gptoss_tune.demo` from an installed wheel: its recipe and sample data ship with the package."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_carries_the_demo_recipe_and_data_and_they_resolve_without_the_repository(tmp_path, tiny_ckpt):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("gptoss_tune-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    # the shipped files are the repository's own, byte for byte
    for rel in ("recipes/tiny-demo.yaml", "data/sample/train.jsonl", "data/sample/validation.jsonl"):
        assert (site / "gptoss_tune" / "demo" / rel).read_bytes() == (REPO / rel).read_bytes(), rel
    # In an empty directory, with only the unpacked wheel importable, the demo's recipe finds its data.
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = (
        "import gptoss_tune.demo.steps as s; from gptoss_tune.train.recipe import load_recipe; "
        f"r = load_recipe(s.RECIPE, ['model.path={tiny_ckpt}', 'output_dir=out']); "
        "print(s.RECIPE); print(r.data.train); print(r.data.validation)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=work,
        env={"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(line.startswith(str(site)) for line in out), out
    assert all(Path(p).is_file() for p in out)
