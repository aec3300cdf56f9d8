"""A real ComfyUI server for the host server tests and the browser tests: `ComfyServer(comfy_path, base)` starts
tests/host/launch_host.py (the CPU torchvision shim, then ComfyUI's main.py) on 127.0.0.1 with this pack linked into
``<base>/custom_nodes``; `chromium_path` finds the browser the browser tests drive.
Nothing is written into the ComfyUI tree: models, plans, outputs and the user folder live under `base`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = PACK_ROOT / "tests" / "host" / "launch_host.py"
PACK_DIR_NAME = "ComfyUI-DFAv2"


def chromium_path() -> str | None:
    """The Chromium/Chrome binary to drive: $DFAV2_CHROMIUM, else chromium / chromium-browser / google-chrome on PATH."""
    env = os.environ.get("DFAV2_CHROMIUM")
    if env:
        return env if os.path.isfile(env) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfy_path: Path, base: Path, *, timeout: float = 120.0, extra_args: tuple[str, ...] = ()) -> None:
        self.base = base
        (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = base / "custom_nodes" / PACK_DIR_NAME
        if not link.exists():
            os.symlink(PACK_ROOT, link)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = base / "server.log"
        args = [sys.executable, str(LAUNCHER), str(comfy_path), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                "--base-directory", str(base), "--disable-auto-launch", "--disable-api-nodes",
                "--database-url", "sqlite:///:memory:", *extra_args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.perf_counter()
        while True:
            try:
                self.get("/system_stats")
                break
            except Exception:  # noqa: BLE001
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited rc={self.proc.returncode}:\n{self.log_text()[-3000:]}")
                if time.perf_counter() - t0 > timeout:
                    self.stop()
                    raise RuntimeError(f"server did not come up in {timeout:.0f} s:\n{self.log_text()[-3000:]}")
                time.sleep(0.3)

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self._log.close()
