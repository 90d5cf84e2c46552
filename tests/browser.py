"""Open a page in Debian's headless Chromium over the DevTools protocol (websocket-client):
console errors, uncaught exceptions and failed loads, then a script's result."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-allow-origins=*",
    "--remote-debugging-port=0",
]


def available() -> bool:
    return Path(CHROMIUM).is_file()


def open_page(url: str, script: str, timeout: float = 60.0) -> tuple[list[str], Any]:
    """Load `url`; (console/log errors and exceptions, the value `script` evaluates to)."""
    import websocket

    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            port = _devtools_port(proc, timeout)
            ws = websocket.create_connection(_page_socket(port), timeout=timeout)
            try:
                return _drive(ws, url, script, timeout)
            finally:
                ws.close()
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _devtools_port(proc: subprocess.Popen, timeout: float) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stderr.readline()
        m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if m:
            return int(m.group(1))
        if not line and proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode} before DevTools started")
    raise TimeoutError("chromium's DevTools did not start")


def _page_socket(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
        pages = [t for t in json.load(r) if t["type"] == "page"]
    return pages[0]["webSocketDebuggerUrl"]


def _drive(ws: Any, url: str, script: str, timeout: float) -> tuple[list[str], Any]:
    ids = iter(range(1, 10_000))
    errors: list[str] = []

    def send(method: str, **params: Any) -> int:
        i = next(ids)
        ws.send(json.dumps({"id": i, "method": method, "params": params}))
        return i

    def wait(pred: Any) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            msg = json.loads(ws.recv())
            _collect(msg, errors)
            if pred(msg):
                return msg
        raise TimeoutError("no answer from chromium")

    for method in ("Page.enable", "Runtime.enable", "Log.enable"):
        i = send(method)
        wait(lambda m, i=i: m.get("id") == i)
    send("Page.navigate", url=url)
    wait(lambda m: m.get("method") == "Page.loadEventFired")
    i = send("Runtime.evaluate", expression=script, returnByValue=True, awaitPromise=True)
    res = wait(lambda m: m.get("id") == i)["result"]
    if "exceptionDetails" in res:
        raise RuntimeError(f"script failed: {res['exceptionDetails']}")
    return errors, res["result"].get("value")


def _collect(msg: dict, errors: list[str]) -> None:
    method, p = msg.get("method"), msg.get("params", {})
    if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
        errors.append("console: " + " ".join(str(a.get("value")) for a in p.get("args", [])))
    elif method == "Runtime.exceptionThrown":
        errors.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
    elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
        e = p["entry"]
        errors.append(f"log: {e.get('text')} {e.get('url', '')}")
