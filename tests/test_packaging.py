"""The source distribution carries what a build from it needs.

`pip install latentfast-X.tar.gz` compiles latentfast._C from the sdist's csrc/; setup.py
names only the .cpp sources, so the headers and included kernel files (.h, .inc) come in
through MANIFEST.in. The sdist is built from a copy of the checkout (setup.py sdist writes
an egg-info directory beside setup.py) and its file list compared with the checkout's.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SKIP = shutil.ignore_patterns(".venv*", ".git", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                               "*.pyc", ".pytest_cache")


def _sdist_names(tmp_path: Path) -> set[str]:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("csrc", "latentfast"):
        shutil.copytree(ROOT / folder, src / folder, ignore=_SKIP)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src, check=True,
                   capture_output=True)
    (archive,) = (tmp_path / "dist").glob("latentfast-*.tar.gz")
    with tarfile.open(archive) as tar:
        return {Path(*Path(m.name).parts[1:]).as_posix() for m in tar.getmembers() if m.isfile()}


def test_sdist_has_every_extension_source_and_module(tmp_path):
    names = _sdist_names(tmp_path)
    wanted = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "csrc").rglob("*")) if p.is_file()]
    wanted += [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "latentfast").rglob("*.py"))]
    assert any(name.endswith(".inc") for name in wanted)  # the files this test is about exist
    missing = [name for name in wanted if name not in names]
    assert not missing, f"the sdist lacks {missing}"
    assert "LICENSE" in names
