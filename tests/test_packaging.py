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


def _setup_helpers() -> dict:
    """setup.py's module-level helper functions, without running setup()."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
            or (isinstance(n, ast.FunctionDef) and n.name in ("_weight", "_unity_sources"))]
    namespace: dict = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace


def test_unity_build_compiles_every_kernel_source_once(tmp_path, monkeypatch):
    """The generated translation units #include every kernel source exactly once, in groups
    of similar size; csrc/latentfast.cpp stays its own unit, and a second run rewrites nothing
    (so ninja rebuilds only what changed)."""
    import re

    helpers = _setup_helpers()
    monkeypatch.chdir(ROOT)  # setup.py runs from the repository root
    sources = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").glob("**/*.cpp"))
    assert len(sources) >= 5 and "csrc/latentfast.cpp" in sources
    units = helpers["_unity_sources"](sources, out_dir=str(tmp_path))
    assert units[0] == "csrc/latentfast.cpp" and len(units) == 3
    included = []
    weights = []
    for unit in units[1:]:
        names = re.findall(r'^#include "([^"]+)"$', Path(unit).read_text(), re.M)
        included += names
        weights.append(sum(helpers["_weight"](f"csrc/{n}") for n in names))
    assert sorted(f"csrc/{n}" for n in included) == [s for s in sources if s != "csrc/latentfast.cpp"]
    assert max(weights) < 1.5 * min(weights), weights
    stamps = [Path(u).stat().st_mtime_ns for u in units[1:]]
    assert helpers["_unity_sources"](sources, out_dir=str(tmp_path)) == units
    assert [Path(u).stat().st_mtime_ns for u in units[1:]] == stamps
