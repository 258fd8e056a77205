"""`pip install .` gives a package and a `shufflenet-jax` command that work from any directory."""

import ast
import os
import subprocess
import sys

import pytest

from tests import processes

ROOT = processes.ROOT
REPOSITORY_FOLDERS = ("configs", "experiments", "tests", "benchmarks", "launch")


def test_the_package_never_imports_the_repositorys_top_level_folders():
  for path in (ROOT / "shufflenet_jax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      for name in names:
        assert name.split(".")[0] not in REPOSITORY_FOLDERS, f"{path}: imports {name}"


@pytest.mark.slow
def test_installed_console_script_runs_summary_and_a_smoke_train_outside_the_repo(
    fashion_dir, tmp_path):
  site = tmp_path / "site"
  install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                            "--no-build-isolation", f"--target={site}", str(ROOT)],
                           capture_output=True, text=True, timeout=300)
  assert install.returncode == 0, install.stderr
  assert (site / "shufflenet_jax" / "cli.py").exists() and not (site / "configs").exists()
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {**os.environ, "PYTHONPATH": str(site)}  # not the repository

  def run(*args):
    result = subprocess.run([str(site / "bin" / "shufflenet-jax"), *args], cwd=elsewhere,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout

  where = subprocess.run([sys.executable, "-c", "import shufflenet_jax; print(shufflenet_jax."
                          "__file__)"], cwd=elsewhere, env=env, capture_output=True, text=True)
  assert where.stdout.strip().startswith(str(site))
  summary = run("summary", f"--config={ROOT}/configs/shufflenet_v2.py:scale=0.5", "--json")
  assert '"model": "shufflenet_v2"' in summary.splitlines()[-1]
  trained = run("train", f"--config={ROOT}/configs/default.py:smoke",
                f"--config.data_dir={fashion_dir}", f"--config.tfds_data_dir={tmp_path / 'tfds'}",
                f"--workdir={tmp_path / 'run'}")
  assert "Done: step 4" in trained and (tmp_path / "run" / "result.json").exists()
