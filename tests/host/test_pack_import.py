"""The pack imports without ComfyUI (or with one too old for the V3 node API): nodes/ stays importable, the
entry point explains what is missing. Runs everywhere (no host needed)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CODE = """
import asyncio, importlib.abc, importlib.util, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'comfy', 'comfy_api', 'comfy_extras', 'folder_paths', 'nodes', 'server'}:
            raise ImportError('No module named ' + repr(name))
sys.meta_path.insert(0, Block())
spec = importlib.util.spec_from_file_location('dfav2', ROOT + '/__init__.py', submodule_search_locations=[ROOT])
mod = importlib.util.module_from_spec(spec); sys.modules['dfav2'] = mod; spec.loader.exec_module(mod)
import dfav2.nodes, dfav2.nodes.adapter, dfav2.nodes.plans
assert 'comfy_api' in dfav2.nodes.IMPORT_ERROR and '0.3.75' in dfav2.nodes.IMPORT_ERROR
try:
    asyncio.run(mod.comfy_entrypoint())
except ImportError as exc:
    assert '0.3.75' in str(exc), exc
else:
    raise AssertionError('comfy_entrypoint should explain the missing host API')
print('ok')
"""


def test_pack_imports_without_a_host():
    r = subprocess.run([sys.executable, "-c", f"ROOT = {str(ROOT)!r}\n" + CODE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")
