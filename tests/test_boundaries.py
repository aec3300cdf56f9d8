"""Architecture rules: the core (kernels/, calibration/) never imports the host; the package imports anywhere."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST_MODULES = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes", "execution", "latent_preview")

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {names!r}:
            raise ImportError('host module imported by the core: ' + name)
sys.meta_path.insert(0, Block())
import importlib.util
spec = importlib.util.spec_from_file_location('dfav2', {root!r} + '/__init__.py', submodule_search_locations=[{root!r}])
mod = importlib.util.module_from_spec(spec); sys.modules['dfav2'] = mod; spec.loader.exec_module(mod)
import dfav2.kernels, dfav2.kernels.engine, dfav2.kernels.cost, dfav2.kernels.masks
import dfav2.calibration, dfav2.calibration.plan, dfav2.calibration.cli
import pkgutil
for pkg in (dfav2.kernels, dfav2.calibration):
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(pkg.__name__ + '.' + info.name)
print('ok')
"""


def test_core_imports_with_host_modules_blocked():
    code = BLOCKER.format(names=set(HOST_MODULES), root=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")


def test_core_sources_name_no_host_module():
    for folder in ("kernels", "calibration"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    assert name.split(".")[0] not in HOST_MODULES, f"{path.relative_to(ROOT)} imports {name}"


def test_package_version_matches_pyproject():
    import dfav2

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["version"] == dfav2.__version__
