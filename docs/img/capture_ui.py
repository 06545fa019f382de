"""Retake the MLflow UI screenshots of docs/ui.md from a real headless Chromium session.

Starts `cleansweep ui` on a store holding a finished sweep, drives Debian's `chromium` over the DevTools protocol
(close the assistant panel, unfold the sweep's trials, open the chart view, configure a parallel-coordinates
chart) and writes two PNGs:

    python docs/img/capture_ui.py --tracking-uri sqlite:////abs/mlflow.db --sweep study-toy-mmcl-ssl-clean

Needs `apt-get install chromium`; aiohttp comes with ray[default]. A documentation tool, not part of the package.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDTH, HEIGHT = 1400, 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(tracking_uri: str, port: int) -> subprocess.Popen:
    """`cleansweep ui` as a user runs it; returns once it printed its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "cleansweep", "ui", "--port", str(port), "--tracking-uri",
                             tracking_uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if "MLflow UI for" in lines.get(timeout=1):
                return proc
        except queue.Empty:
            pass
    proc.kill()
    raise RuntimeError("cleansweep ui did not start")


def experiment_of(base: str, sweep: str) -> str:
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search", data=b'{"max_results": 100}',
                                 headers={"Content-Type": "application/json"})
    ids = [e["experiment_id"] for e in json.loads(urllib.request.urlopen(req).read())["experiments"]]
    body = json.dumps({"experiment_ids": ids, "filter": f"tags.`cleansweep.sweep` = '{sweep}'"}).encode()
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=body,
                                 headers={"Content-Type": "application/json"})
    runs = json.loads(urllib.request.urlopen(req).read())["runs"]
    return runs[0]["info"]["experiment_id"]


class Browser:
    """Just enough of the DevTools protocol: evaluate JS, click, type, screenshot."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws, self.n = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.n += 1
        await self.ws.send_str(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expr: str):
        r = await self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return r.get("result", {}).get("value")

    async def wait_for(self, expr: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not await self.js(f"!!({expr})"):
            if time.monotonic() > deadline:
                raise TimeoutError(expr)
            await asyncio.sleep(0.5)

    async def click(self, element_js: str) -> None:
        box = await self.js(f"(() => {{ const e = {element_js}; if (!e) return null; const b = "
                            "e.getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2]; })()")
        if box is None:
            raise LookupError(element_js)
        for kind in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    async def key(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)

    async def screenshot(self, path: Path) -> None:
        data = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(data["data"]))


def by_text(selector: str, text: str) -> str:
    return f"Array.from(document.querySelectorAll('{selector}')).find(e => (e.innerText || '').trim() === '{text}')"


async def capture(url: str, out_dir: Path, params: list[str], metrics: list[str], chart_filter: str) -> None:
    port, profile = free_port(), tempfile.mkdtemp(prefix="chromium-")
    chrome = subprocess.Popen(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                               f"--window-size={WIDTH},{HEIGHT}", f"--remote-debugging-port={port}", "about:blank"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ws_url = None
        for _ in range(120):
            try:
                tabs = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list").read())
                ws_url = next(t["webSocketDebuggerUrl"] for t in tabs if t["type"] == "page")
                break
            except (OSError, StopIteration):
                time.sleep(0.5)
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
            b = Browser(ws)
            await b.call("Page.enable")
            await b.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1,
                         mobile=False)
            await b.call("Page.navigate", url=url)
            await b.wait_for("document.body.innerText.includes('matching runs')")
            # MLflow 3 opens its assistant panel on first load: close it (the Close button on the right edge).
            await b.js("(() => { const c = Array.from(document.querySelectorAll('button[aria-label=Close]'))"
                       ".find(e => e.getBoundingClientRect().x > 1000); if (c) c.click(); })()")
            expander = "document.querySelector('.ag-row [role=gridcell] button.du-bois-light-btn-link')"
            await b.wait_for(expander)
            await b.click(expander)
            await asyncio.sleep(1)
            await b.click(by_text("button", "Add chart"))
            await asyncio.sleep(1.5)
            await b.click(by_text("[role=menuitem]", "Parallel coordinates"))
            await asyncio.sleep(2)
            for index, names in ((0, params), (1, metrics)):
                for name in names:
                    await b.click(f"document.querySelectorAll('[role=dialog] input[role=combobox]')[{index}]")
                    await b.call("Input.insertText", text=name)
                    await asyncio.sleep(1)
                    await b.key("Enter", 13)
                    await b.key("Escape", 27)
                    await asyncio.sleep(0.5)
            await asyncio.sleep(3)
            await b.screenshot(out_dir / "mlflow_parallel.png")
            await b.click(by_text("[role=dialog] button", "Cancel"))
            await asyncio.sleep(1)

            # The trials only (hide the parent's own metrics), and only the charts that matter.
            await b.click("document.querySelector('.ag-row label')")
            await b.click("document.querySelector('input[placeholder=\"Search metric charts\"]')")
            await b.call("Input.insertText", text=chart_filter)
            await asyncio.sleep(8)  # let every chart fetch its metric history
            await b.screenshot(out_dir / "mlflow_ui.png")
    finally:
        chrome.terminate()
        chrome.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", required=True, help="store holding the sweep (sqlite:////abs/mlflow.db)")
    ap.add_argument("--sweep", required=True, help="sweep whose trials to show")
    ap.add_argument("--params", default="optim.lr,method.ssl_weight", help="parallel-coordinates params")
    ap.add_argument("--metrics", default="best_feasible_top1,min_asr_top1", help="parallel-coordinates metrics")
    ap.add_argument("--chart-filter", default="top1", help="text typed into 'Search metric charts'")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    port = free_port()
    ui = start_ui(args.tracking_uri, port)
    try:
        base = f"http://127.0.0.1:{port}"
        exp = experiment_of(base, args.sweep)
        query = urllib.parse.quote(f"tags.`cleansweep.sweep` = '{args.sweep}'")
        url = (f"{base}/#/experiments/{exp}/runs?workflowType=machine_learning&compareRunsMode=CHART"
               f"&searchFilter={query}")
        asyncio.run(capture(url, args.out, args.params.split(","), args.metrics.split(","), args.chart_filter))
    finally:
        ui.send_signal(signal.SIGINT)
        ui.wait(timeout=60)
    for name in ("mlflow_ui.png", "mlflow_parallel.png"):
        print(args.out / name, (args.out / name).stat().st_size // 1024, "KiB")


if __name__ == "__main__":
    main()
