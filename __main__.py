"""Command-line entry (see README): ``python <pack folder> validate PLAN`` / ``inspect PLAN`` need no host;
``demo``, ``train-ref``, ``study`` import ComfyUI first (found via COMFYUI_PATH or custom_nodes)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _load_pack(name: str = "dfav2"):
    # The folder may have any name (e.g. ComfyUI-DFAv2); import it as a package so relative imports work.
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


#: Commands that need the host: name -> module of the pack with a ``main(argv)``.
HOST_COMMANDS = {"demo": "refmodels.demo", "train-ref": "refmodels.train", "study": "refmodels.study"}


def _host_command(cmd: str, argv: list) -> int:
    # ComfyUI must be importable (and --cpu set) before the pack's `nodes` package is imported: prepare it with the
    # standalone host_compat.py, loaded by file path.
    spec = importlib.util.spec_from_file_location("dfav2_host_compat", ROOT / "host_compat.py")
    compat = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = compat
    spec.loader.exec_module(compat)
    if not {"-h", "--help"} & set(argv):
        comfy_path, why = compat.find_comfyui(ROOT)
        if comfy_path is None:
            print(f"{cmd}: {why}", file=sys.stderr)
            return 2
        try:
            compat.import_comfyui(comfy_path, cpu=True if "--cpu" in argv else None)
        except Exception as exc:  # noqa: BLE001 - one line, not a traceback
            print(f"{cmd}: ComfyUI at {comfy_path} could not be imported: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
    _load_pack()
    return importlib.import_module(f"dfav2.{HOST_COMMANDS[cmd]}").main(argv)


if __name__ == "__main__":
    if sys.argv[1:2] and sys.argv[1] in HOST_COMMANDS:
        sys.exit(_host_command(sys.argv[1], sys.argv[2:]))
    _load_pack()
    from dfav2.calibration.cli import main

    sys.exit(main())
