"""Host tests: fixtures shared by the modules in this folder (ComfyUI found via COMFYUI_PATH; see dfa_hostenv)."""

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """Imports ComfyUI (at test time, not collection) with a temporary base directory. Without a configured host
    the test skips with the reason; with COMFYUI_PATH set, a host that does not import fails every host test with
    the import error (a broken host must not look like a green run)."""
    import dfa_hostenv as H

    error = H.import_host(tmp_path_factory.mktemp("comfy_inprocess_base"))
    if error:
        if H.HOST_REQUESTED:
            pytest.fail(error, pytrace=False)
        pytest.skip(error)
    return H


@pytest.fixture(scope="session")
def tiny_paths(host, tmp_path_factory):
    import dfa_hostenv as H

    return H.write_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def models(tiny_paths):
    """family -> the host-loaded ModelPatcher (never patched in place: tests apply on clones)."""
    import dfa_hostenv as H

    return {fam: H.load_model(fam, path) for fam, path in tiny_paths.items()}
