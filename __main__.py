"""Command-line entry: ``python <pack folder> validate PLAN`` / ``inspect PLAN`` (see README)."""

import importlib.util
import sys
from pathlib import Path


def _load_pack(name: str = "dfav2"):
    # The folder may have any name (e.g. ComfyUI-DFAv2); import it as a package so relative imports work.
    if name not in sys.modules:
        root = Path(__file__).resolve().parent
        spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


if __name__ == "__main__":
    _load_pack()
    from dfav2.calibration.cli import main

    sys.exit(main())
