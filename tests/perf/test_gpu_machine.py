"""What the GPU scripts may import: the packages they need beyond the GPU image are carried as wheels."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))

from gpu_machine_imports import ABSENT_ON_GPU_MACHINE, CARRIED  # noqa: E402


def test_every_carried_package_is_in_the_wheel_list_and_none_is_also_absent():
    names = re.search(r'NAMES="([^"]*)"', (ROOT / "scripts" / "gpu_wheels.sh").read_text()).group(1).split()
    assert set(CARRIED) <= set(names), set(CARRIED) - set(names)
    assert not {c.replace("-", "_") for c in CARRIED} & set(ABSENT_ON_GPU_MACHINE)
