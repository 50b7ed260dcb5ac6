"""The package as a user installs it: a wheel built from the project holds the LLaMA-Factory templates, and the CLI
from that wheel validates and prepares a run from a folder outside the checkout."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO, write_config

pytestmark = pytest.mark.slow  # pip builds the wheel (setuptools from PyPI in its build environment)


def test_wheel_carries_the_templates_and_runs_outside_the_checkout(tmp_path, tiny_model):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copytree(REPO / "autollm_lf", src / "autollm_lf", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(wheels)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("autollm_lf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"autollm_lf/templates/sft_lora.yaml.j2", "autollm_lf/templates/report.html.j2"} <= set(names)
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    where = subprocess.run([sys.executable, "-c", "import autollm_lf; print(autollm_lf.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True)
    assert where.stdout.strip().startswith(str(site)), where  # the wheel's code, not the checkout's
    cfg = write_config(elsewhere, tiny_model, name="wheel", baselines=False)
    for stage in ("validate", "prepare"):
        res = subprocess.run([sys.executable, "-m", "autollm_lf", stage, str(cfg)], cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert (elsewhere / "runs" / "wheel" / "data" / "dataset_info.json").is_file()
