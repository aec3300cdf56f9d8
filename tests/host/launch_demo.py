"""Run the pack's `demo` command (`python <pack> demo ...`) with ComfyUI's base directory moved to a temporary
folder: `python launch_demo.py <base directory> <pack folder> demo <options...>` with COMFYUI_PATH set. Test-only.

The demo imports ComfyUI in-process, and importing its folder_paths creates `<ComfyUI>/input` when it is missing.
The host tests must not write into the host tree (CI's is read-only), so this sets `args.base_directory` (what
`main.py --base-directory` does) before the pack's `__main__` imports ComfyUI, then runs `__main__` unchanged with
runpy, as `python <pack>` would.
"""

import os
import runpy
import sys

if __name__ == "__main__":
    base, pack = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    comfy_dir = os.path.abspath(os.environ["COMFYUI_PATH"])
    sys.path.insert(0, comfy_dir)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.base_directory = base
    # Take ComfyUI off sys.path again: runpy puts the pack folder first, and the demo's import_comfyui must then put
    # ComfyUI back in front of it, or `import nodes` would find the pack's nodes/ instead of ComfyUI's nodes.py.
    sys.path.remove(comfy_dir)
    sys.argv = [pack] + sys.argv[3:]
    runpy.run_path(pack, run_name="__main__")
