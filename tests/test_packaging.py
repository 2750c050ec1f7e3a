"""A wheel works without the repository: `pip install .` (not editable) puts the packaged
run configs and DeepSpeed templates inside the package, and the CLI finds them from any
directory. The wheel is built from a copy of the checkout placed outside the repository
and installed into a fresh venv that sees this environment's packages for torch & co., so
only gigamim itself comes from the wheel."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.launch import REPO, cpu_env


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build", "dist", "runs",
                                                               "__pycache__", "results", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(base / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((base / "dist").glob("gigamim-*.whl"))
    env_dir = base / "venv"
    # Not system_site_packages: run from inside a venv (as a newcomer runs the README's test
    # command) that would expose the base interpreter's packages, not this environment's. A
    # .pth of plain paths adds this interpreter's site dirs after the new venv's own (their
    # own .pth files, e.g. an editable gigamim, are not processed): torch & co. come from here,
    # gigamim only from the wheel.
    venv.create(env_dir, system_site_packages=False, with_pip=True)
    py = env_dir / "bin" / "python"
    inner_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True).stdout.strip()
    outer = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
    (Path(inner_site) / "outer_env.pth").write_text("".join(f"{p}\n" for p in outer))
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return wheel, py, elsewhere


def test_wheel_carries_configs_and_templates(wheel_env):
    wheel, _, _ = wheel_env
    names = zipfile.ZipFile(wheel).namelist()
    for template in ("cpu", "zero1", "zero2", "zero3_bf16", "zero3_offload"):
        assert f"gigamim/configs/deepspeed/{template}.json" in names
    assert "gigamim/configs/demo.yaml" in names and "gigamim_benchmarks/run.py" in names


def _wheel_env() -> dict:
    """The CPU environment without PYTHONPATH: no checkout on the path, gigamim from the wheel."""
    env = cpu_env()
    env.pop("PYTHONPATH", None)
    return env


def test_installed_cli_finds_packaged_files_from_another_directory(wheel_env, tmp_path):
    _, py, elsewhere = wheel_env
    code = "import gigamim, sys; print(gigamim.__file__)"
    where = subprocess.run([str(py), "-c", code], cwd=elsewhere, env=_wheel_env(), capture_output=True, text=True,
                           check=True)
    assert "site-packages" in where.stdout and str(REPO) not in where.stdout
    # Validation lists the packaged DeepSpeed templates (the shard check runs first, so give
    # it a real file).
    from gigamim.data.synthetic import write_synthetic_shards

    write_synthetic_shards(tmp_path / "s", 4, image_size=64, samples_per_shard=4)
    shard = next((tmp_path / "s").glob("*.tar"))
    r = subprocess.run([str(py), "-m", "gigamim", "pretrain", "--config", "demo", "--set", f"data.shards={shard}",
                        "--set", "deepspeed.config=zero9"], cwd=elsewhere, env=_wheel_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "packaged: cpu, zero1, zero1_bf16, zero2, zero3_bf16, zero3_offload" in r.stderr, r.stderr
    r = subprocess.run([str(py), "-m", "gigamim", "pretrain", "--config", "demo", "--print-config"], cwd=elsewhere,
                       env=_wheel_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "config: cpu" in r.stdout
