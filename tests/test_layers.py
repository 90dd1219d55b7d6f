"""The layers contract (pyproject.toml, run by ``make lint``): the tree as it is keeps it, and an
upward import planted in a copy of it (a low package importing a high one) breaks it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree, env={"PYTHONPATH": str(tree / "src"), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
    )  # fmt: skip


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    pytest.importorskip("importlinter")
    shutil.copytree(
        ROOT / "src" / "griffon", tmp_path / "src" / "griffon", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    kept = _lint(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    config = tmp_path / "src" / "griffon" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _planted():\n    import griffon.train.trainer  # noqa: F401\n")
    broken = _lint(tmp_path)
    assert broken.returncode != 0 and "griffon.config -> griffon.train.trainer" in broken.stdout, broken.stdout
