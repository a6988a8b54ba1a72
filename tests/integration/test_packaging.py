"""A non-editable build carries the C++ kernel (built once, at build time) and the recipes."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # compiles the kernel: ~1 min on 2 quiet cores, several under load
def test_wheel_carries_the_kernel_and_the_recipes(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
                    "--no-deps", "-w", str(tmp_path), str(REPO)], check=True, timeout=1800)
    names = set(zipfile.ZipFile(next(tmp_path.glob("distca-*.whl"))).namelist())
    assert any(re.fullmatch(r"distca/_C\.[^/]*\.so", n) for n in names)
    recipes = {f"distca/recipes/{p.name}" for p in (REPO / "recipes").glob("*.yaml")}
    assert recipes and recipes <= names
