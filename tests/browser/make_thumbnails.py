"""Render the template thumbnails example_workflows/<name>.jpg (what ComfyUI's templates dialog shows next to each
example) in a real front end: each example is opened and fitted to a square view; the reference-model example is
queued first, so that its thumbnail shows the plan picture and the A/B images with their numbers.

    COMFYUI_PATH=/path/to/ComfyUI python tests/browser/make_thumbnails.py [--skip-run]

Needs what the browser tests need (conftest.py). Takes a few minutes on a CPU (the reference example runs once).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "host"))
sys.path.insert(0, str(HERE))

from comfy_server import ComfyServer, chromium_path  # noqa: E402

EXAMPLES = HERE.parents[1] / "example_workflows"
REFERENCE = "Reference model - try it as-is"
SIZE = 480


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-run", action="store_true", help="do not queue the reference example (graph view only)")
    ap.add_argument("--only", nargs="*", default=None, help="only the examples whose file name contains one of these")
    args = ap.parse_args()
    import dfa_hostenv as H
    from PIL import Image
    from playwright.sync_api import sync_playwright

    if H.COMFY_PATH is None:
        print(H.SKIP_REASON, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        srv = ComfyServer(H.COMFY_PATH, Path(tmp))
        try:
            with sync_playwright() as p:
                b = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
                page = b.new_page(viewport={"width": 1400, "height": 1400})
                page.goto(srv.url)
                page.wait_for_function("() => window.app && (app.extensions || []).some(e => e.name === 'dfav2.ui')",
                                       timeout=120_000)
                time.sleep(1)
                page.keyboard.press("Escape")
                page.evaluate("""async () => {
                    await app.extensionManager.setting.set('Comfy.Minimap.Visible', false);
                    await app.extensionManager.command.execute('Workspace.ToggleFocusMode');
                }""")
                for f in sorted(EXAMPLES.glob("*.json")):
                    if args.only is not None and not any(o in f.stem for o in args.only):
                        continue
                    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", __import__("json").loads(f.read_text()))
                    time.sleep(1)
                    clip = None
                    if f.stem == REFERENCE and not args.skip_run:
                        page.evaluate("async () => { await app.queuePrompt(0, 1); }")
                        page.wait_for_function(
                            "() => (app.graph.nodes.find(n => n.type === 'DFACompare')?.imgs?.length ?? 0) === 3",
                            timeout=1_800_000, polling=2000)
                        time.sleep(2)
                        # The plan picture and the A/B node (uncompressed, compressed, difference, PSNR / SSIM).
                        page.evaluate("""() => {
                            const nodes = app.graph.nodes.filter(n => n.type === 'DFAPlanInfo' || n.type === 'DFACompare');
                            app.canvas.selectNodes(nodes);
                            app.extensionManager.command.execute('Comfy.Canvas.FitView');
                            app.canvas.deselectAll();
                        }""")
                    else:
                        # The pack's nodes and their neighbours (a whole graph is unreadable at thumbnail size).
                        page.evaluate("""() => {
                            const mine = app.graph.nodes.filter(n => n.type.startsWith('DFA') || n.type === 'KSampler');
                            app.canvas.selectNodes(mine);
                            app.extensionManager.command.execute('Comfy.Canvas.FitView');
                            app.canvas.deselectAll();
                        }""")
                    page.evaluate("() => app.extensionManager.toast.removeAll?.()")
                    time.sleep(1)
                    png = page.screenshot(clip=clip)
                    img = Image.open(io.BytesIO(png)).convert("RGB")
                    w, h = img.size
                    s = min(w, h)
                    img = img.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((SIZE, SIZE), Image.LANCZOS)
                    out = f.with_suffix(".jpg")
                    img.save(out, quality=82, optimize=True)
                    print(f"{out.name}: {out.stat().st_size // 1024} KiB")
                b.close()
        finally:
            srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
