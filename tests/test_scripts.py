"""Every script runs from the repository root as a file and as a module, without installing anything, and the
generic package names (models, datasets, utils) resolve to ours even when a same-named package (HuggingFace's
`datasets`, say) comes first on the path."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["stage1/train.py", "stage2/train.py", "stage2/test.py", "stage2/infer.py", "stage2/export.py",
           "generate_flist.py"]


@pytest.fixture(scope="module")
def shadowing_path(tmp_path_factory) -> str:
    """A folder of impostor packages named like ours; importing any of them fails loudly."""
    root = tmp_path_factory.mktemp("impostors")
    for name in ("models", "datasets", "utils", "losses"):
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(f"raise ImportError('the impostor {name} package was imported')\n")
    return str(root)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_as_a_file_and_as_a_module(script, shadowing_path):
    env = {**os.environ, "PYTHONPATH": shadowing_path}
    as_file = subprocess.run([sys.executable, script, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=120)
    assert as_file.returncode == 0, as_file.stderr[-1500:]
    assert "usage" in as_file.stdout
    module = script.removesuffix(".py").replace("/", ".")
    as_module = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=120)
    assert as_module.returncode == 0, as_module.stderr[-1500:]
    assert as_module.stdout.splitlines()[1:] == as_file.stdout.splitlines()[1:]  # the same parser either way
