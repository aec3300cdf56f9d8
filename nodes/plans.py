"""Plan files in ComfyUI: the `dfa_plans` model folder (`.json` only), dropdown options, loading, fingerprints.

Plans live in ``models/dfa_plans`` (or any ``dfa_plans:`` entry of ``extra_model_paths.yaml``).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..calibration.plan import Plan, PlanError, load_plan, read_plan_bytes

__all__ = [
    "FOLDER", "NO_PLAN", "register_plan_folder", "plan_options", "resolve_plan_path", "load_plan_file",
    "plan_fingerprint", "safe_plan_file_name", "existing_plan_path", "plan_write_path", "plan_infos",
]

FOLDER = "dfa_plans"
#: Dropdown entry meaning "no file: use the connected DFA_PLAN input".
NO_PLAN = "none"


def register_plan_folder() -> None:
    """Register ``<models>/dfa_plans`` with folder_paths and restrict the folder to ``.json`` files.

    Idempotent; keeps paths a user added through extra_model_paths.yaml (those are loaded first).
    """
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER)
    try:
        folder_paths.add_model_folder_path(FOLDER, default, is_default=True)
    except TypeError:  # very old hosts: no is_default
        folder_paths.add_model_folder_path(FOLDER, default)
    paths, _ = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, {".json"})


def plan_options() -> list[str]:
    """Dropdown values: the plan files found now, then NO_PLAN."""
    import folder_paths

    try:
        files = [f for f in folder_paths.get_filename_list(FOLDER) if f.lower().endswith(".json")]
    except KeyError:
        files = []
    return sorted(files) + [NO_PLAN]


def resolve_plan_path(name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
        raise ValueError(f"plan file {name!r} was not found in the dfa_plans folders ({folders})")
    return path


def load_plan_file(name: str) -> Plan:
    """Load and validate a plan chosen in the dropdown; errors name the file and the bad field."""
    if name == NO_PLAN:
        raise ValueError(
            "no plan selected: put a plan .json into models/dfa_plans and pick it, or connect a DFA_PLAN input"
        )
    path = resolve_plan_path(name)
    try:
        return load_plan(path)
    except PlanError as exc:
        raise ValueError(f"plan file {name!r} is not a valid DiTFastAttnV2 plan: {exc}") from None


def plan_fingerprint(name: str) -> str:
    """Content hash of a plan file (so editing the file re-runs the node); the name if it cannot be read."""
    if name == NO_PLAN:
        return NO_PLAN
    try:  # read_plan_bytes: a named pipe called x.json must not block the prompt queue
        return hashlib.sha256(read_plan_bytes(resolve_plan_path(name))).hexdigest()
    except (OSError, ValueError):  # PlanError is a ValueError
        return f"missing:{name}"


_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def safe_plan_file_name(name: str) -> str:
    """A plan name as a safe file name ``<name>.json``: letters, digits, ``_ - .`` only (anything else, path
    separators included, becomes ``_``), no leading dot, at most 100 characters. Raises ValueError when nothing
    usable is left."""
    stem = str(name).strip()
    if stem.lower().endswith(".json"):
        stem = stem[: -len(".json")]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._ ")[:100].rstrip("._ ")
    if not stem:
        raise ValueError(f"plan_name {name!r} has no usable characters; use letters, digits, '_', '-' or '.'")
    if stem.lower().split(".")[0] in _RESERVED:  # Windows device names
        stem = "_" + stem
    return stem + ".json"


def existing_plan_path(name: str) -> Path | None:
    """The file DFACalibrate's `plan_name` refers to (see `safe_plan_file_name`) if it exists in a dfa_plans
    folder, else None."""
    import folder_paths

    existing = folder_paths.get_full_path(FOLDER, safe_plan_file_name(name))
    return None if existing is None else Path(existing)


def plan_write_path(name: str, *, overwrite: bool) -> Path:
    """Where DFACalibrate writes the plan `name` (see `safe_plan_file_name`): the existing file of that name in the
    dfa_plans folders when `overwrite` is on (so the dropdown picks the new plan), else ``<first dfa_plans folder>/
    <name>.json``. Raises ValueError when the file exists and `overwrite` is off."""
    import folder_paths

    file_name = safe_plan_file_name(name)
    existing = folder_paths.get_full_path(FOLDER, file_name)
    if existing is not None:
        if not overwrite:
            raise ValueError(
                f"plan file {existing} already exists and overwrite is off; no calibration was run. Choose another "
                "plan_name or turn overwrite on to replace it."
            )
        return Path(existing)
    folders = folder_paths.get_folder_paths(FOLDER)
    if not folders:
        raise ValueError("no dfa_plans folder is registered (models/dfa_plans); reinstall the pack")
    return Path(folders[0]) / file_name


_INFO_CACHE: dict[str, tuple[float, int, dict]] = {}


def plan_infos() -> list[dict]:
    """For the UI's plan dropdown: per plan file its model family, signature and calibration size (see
    `report.plan_info`), or an ``error`` for a file that is not a valid plan. Parsed files are cached by mtime."""
    from .report import plan_info

    out = []
    for name in plan_options():
        if name == NO_PLAN:
            continue
        try:
            path = resolve_plan_path(name)
            st = os.stat(path)
            hit = _INFO_CACHE.get(path)
            if hit is not None and hit[:2] == (st.st_mtime, st.st_size):
                out.append(hit[2])
                continue
            info = plan_info(name, load_plan(path))
            _INFO_CACHE[path] = (st.st_mtime, st.st_size, info)
        except (OSError, ValueError) as exc:  # PlanError is a ValueError
            info = {"name": name, "error": str(exc)}
        out.append(info)
    return out
