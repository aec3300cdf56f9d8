"""Browser tests: a real ComfyUI server with this pack (tests/host/comfy_server.py) and headless Chromium driven
by Playwright's Python package. Needs a ComfyUI tree (COMFYUI_PATH, as the host tests), ComfyUI's packages in this
environment, the `playwright` package (no browser download: `pip install playwright`, never `playwright install`)
and a system Chromium (Debian: `apt-get install chromium`; another binary: DFAV2_CHROMIUM=/path/to/chrome).

Without any of them every test skips, with the reason; with COMFYUI_PATH set to something that is not a ComfyUI
tree the run fails (as the host tests). Screenshots go to $DFAV2_SHOTS (default: a pytest temporary folder).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
HOST_TESTS = HERE.parent / "host"
for p in (HERE, HOST_TESTS):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

PACK_MARKERS = ("dfav2", "ditfastattn", "comfyui-dfav2", "/dfav2/")


from comfy_server import chromium_path  # noqa: E402


def skip_reason() -> str | None:
    """Why the browser tests cannot run here (None: they can). Fails when COMFYUI_PATH is set but unusable."""
    import dfa_hostenv as H

    if H.COMFY_PATH is None:
        if H.HOST_REQUESTED:
            pytest.fail(f"browser tests: {H.SKIP_REASON}", pytrace=False)
        return f"browser tests: {H.SKIP_REASON}"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "browser tests: the playwright package is not installed (pip install playwright; no browser download)"
    if chromium_path() is None:
        return ("browser tests: no Chromium found (apt-get install chromium, or set DFAV2_CHROMIUM to a Chrome/Chromium "
                "binary)")
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    checked = False
    for item in items:
        if HERE not in Path(str(item.fspath)).parents:
            continue
        if not {"ui", "server", "browser"} & set(getattr(item, "fixturenames", ())):
            continue  # static checks of the example files need neither a host nor a browser
        if not checked:
            reason, checked = skip_reason(), True
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ["DFAV2_SHOTS"]) if os.environ.get("DFAV2_SHOTS") else tmp_path_factory.mktemp("shots")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _other_family_plan(path: Path) -> None:
    """A valid Flux plan (all full) in the plans folder: the dropdown must mark it on an SD3 model."""
    from dfav2.calibration.plan import LayerSpec, ModelSignature, Plan, save_plan
    from dfav2.kernels.methods import FULL

    layers = (LayerSpec("double.0", 4, 128),) + tuple(LayerSpec(f"single.{i}", 4, 128) for i in range(3))
    plan = Plan.uniform(ModelSignature("flux", layers), [1.0, 0.5], FULL, description="browser test: other family")
    save_plan(plan, path, overwrite=True)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    import dfa_hostenv as H
    from comfy_server import ComfyServer

    base = tmp_path_factory.mktemp("comfy_browser_base")
    _other_family_plan(base / "models" / "dfa_plans" / "other_family_flux.json")
    srv = ComfyServer(H.COMFY_PATH, base)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


class UI:
    """One browser page on the ComfyUI front end, with its console collected."""

    def __init__(self, browser, server, shots: Path) -> None:
        self.server, self.shots = server, shots
        self.context = browser.new_context(viewport={"width": 2200, "height": 1250})
        self.page = self.context.new_page()
        self.console: list[tuple[str, str]] = []
        self.page.on("console", lambda m: self.console.append((m.type, f"{m.text} @ {m.location.get('url', '')}")))
        self.page.on("pageerror", lambda e: self.console.append(("pageerror", f"{e} {getattr(e, 'stack', '')}")))
        self.page.on("requestfailed", lambda r: self.console.append(("requestfailed", r.url)))
        self.page.on("response", lambda r: r.status >= 400 and self.console.append(("http", f"{r.status} {r.url}")))
        self.open()

    def open(self) -> None:
        self.page.goto(self.server.url)
        self.wait_ready()

    def wait_ready(self) -> None:
        self.page.wait_for_function(
            "() => window.app && window.app.graph && (window.app.extensions || []).some(e => e.name === 'dfav2.ui')",
            timeout=120_000)
        time.sleep(1.0)
        self.page.keyboard.press("Escape")  # the first-run templates dialog

    def js(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def pack_errors(self) -> list[str]:
        """Console errors, page errors and failed requests that come from the pack (its file, route or name)."""
        out = []
        for kind, text in self.console:
            if kind in ("error", "pageerror", "requestfailed", "http") and any(m in text.lower() for m in PACK_MARKERS):
                out.append(f"{kind}: {text[:500]}")
        return out

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def load_template(self, name: str) -> None:
        """Open an example the way the templates dialog does: fetched from /api/workflow_templates/<pack>/."""
        self.js("""async (name) => {
            const r = await fetch(`/api/workflow_templates/ComfyUI-DFAv2/${encodeURIComponent(name)}.json`);
            if (!r.ok) throw new Error(`template ${name}: HTTP ${r.status}`);
            await app.loadGraphData(await r.json());
        }""", name)
        time.sleep(1.0)

    def fit(self) -> None:
        self.js("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        time.sleep(0.5)

    def queue(self) -> None:
        self.js("async () => { await app.queuePrompt(0, 1); }")

    def wait_done(self, timeout: float) -> dict:
        """Wait until the server's queue is empty; the newest history entry's status."""
        t0 = time.perf_counter()
        time.sleep(1.0)
        while time.perf_counter() - t0 < timeout:
            q = self.server.get("/queue")
            if not q["queue_running"] and not q["queue_pending"]:
                break
            time.sleep(1.0)
        else:
            raise TimeoutError(f"the queued prompt did not finish in {timeout:.0f} s")
        hist = self.server.get("/history")
        last = max(hist.values(), key=lambda h: h["prompt"][0])
        time.sleep(1.5)  # the last websocket messages reach the page
        return last

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def ui(browser, server, shots):
    u = UI(browser, server, shots)
    try:
        yield u
    finally:
        u.close()
