"""The project as a package: installed from the checkout, a script copied alone runs; the diffusers version check."""

import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT
from packaging.requirements import Requirement

import segdiff

# The scripts that use diffusers, each of which checks its version.
DIFFUSERS_SCRIPTS = sorted(path.name for pattern in ("train_*.py", "generate_*.py") for path in ROOT.glob(pattern))


def test_the_scripts_minimum_diffusers_is_the_packages_lower_bound():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (diffusers,) = [Requirement(text) for text in project["dependencies"] if Requirement(text).name == "diffusers"]
    assert [(spec.operator, spec.version) for spec in diffusers.specifier] == [(">=", "0.35")]
    assert diffusers.specifier.contains(segdiff.MIN_DIFFUSERS_VERSION)
    assert not diffusers.specifier.contains("0.34.9")


@pytest.mark.parametrize("script", DIFFUSERS_SCRIPTS)
def test_every_script_stops_on_an_old_diffusers_naming_the_upgrade(script, monkeypatch):
    import diffusers.utils

    monkeypatch.setattr(diffusers.utils, "__version__", "0.30.0")
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(ImportError) as stopped:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    message = str(stopped.value)
    assert "requires a minimum version of 0.35.0, but the version found is 0.30.0" in message
    assert "Fix: pip install --upgrade 'diffusers>=0.35.0'" in message


def test_installed_package_runs_a_script_copied_alone(toy_data, tmp_path):
    """`pip install` of the checkout into a fresh venv, then train_spade_sdm.py alone in an empty folder: --help and
    a one-step training, importing segdiff from the venv.

    To stay fast and offline, the venv reaches this environment's packages through a .pth file instead of
    downloading them again; pip installs with --no-index, so a dependency the package declares and this environment
    lacks fails the install. The package is built from a copy of what it is made of (pyproject.toml, README.md,
    segdiff/), so nothing else of the checkout can stand in for a missing part."""
    source, venv, alone = tmp_path / "source", tmp_path / "venv", tmp_path / "alone"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "segdiff", source / "segdiff", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site_packages = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site_packages) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-build-isolation", source],
        check=True,
        env=env,
        capture_output=True,
    )

    alone.mkdir()
    shutil.copy(ROOT / "train_spade_sdm.py", alone)

    def run(*args):
        return subprocess.run(
            [python, *map(str, args)], cwd=alone, env=env, capture_output=True, text=True, timeout=600, check=True
        )

    where = run("-c", "import segdiff.pipelines.sdm as module; print(module.__file__)").stdout
    assert where.startswith(site_packages), where
    assert "--model_config" in run("train_spade_sdm.py", "--help").stdout
    run(
        "train_spade_sdm.py", "--data_root", toy_data, "--dataset", "generic", "--output_dir", alone / "model",
        "--model_config", ROOT / "configs" / "models" / "sdm_tiny.json", "--resolution", "32",
        "--train_batch_size", "2", "--max_train_steps", "1", "--report_to", "none", "--validation_steps", "0",
    )  # fmt: skip
    assert (alone / "model" / "model_index.json").is_file()
