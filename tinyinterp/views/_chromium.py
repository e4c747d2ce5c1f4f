"""A small Chrome DevTools protocol client over Chromium's debugging pipe, for the views' tests
(and for screenshots of a view).

Why the pipe (``--remote-debugging-pipe``: JSON messages ending in NUL on file descriptors 3 and 4)
rather than a websocket or selenium: it needs no Python dependency, opens no port, and the
browser can run with every network request refused; the protocol is the same one a websocket
client would speak.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The path of a Chromium/Chrome binary (``TINYINTERP_CHROMIUM`` first), or None."""
    env = os.environ.get("TINYINTERP_CHROMIUM")
    if env:
        return env if shutil.which(env) or os.path.exists(env) else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(RuntimeError):
    pass


class Browser:
    """Headless Chromium driven over the DevTools pipe. ``page()`` opens a tab attached in
    flattened mode; events are kept per session for inspection."""

    def __init__(self, binary: str | None = None, *, width: int = 1280, height: int = 900,
                 timeout: float = 30.0):
        binary = binary or find_chromium()
        if binary is None:
            raise FileNotFoundError("no Chromium found (looked for " + ", ".join(CANDIDATES)
                                    + "; set TINYINTERP_CHROMIUM); on Debian: apt-get install "
                                    "chromium")
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="ti-chromium-")
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()

        args = [binary, "--headless=new", "--remote-debugging-pipe", "--no-sandbox",
                "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update",
                "--mute-audio", "--hide-scrollbars", f"--window-size={width},{height}",
                # no network: every host resolves nowhere and every proxy is refused
                "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
                "--proxy-bypass-list=<-loopback>", f"--user-data-dir={self._profile}",
                "about:blank"]
        # The child reads commands on fd 3 and writes replies on fd 4. A shell moves the pipe
        # ends there (no preexec_fn: forking a process that runs JAX's threads that way warns);
        # bash, because dash reads only one-digit descriptors in a redirection.
        a = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)  # above 4, so the moves cannot clash
        b = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
        os.close(to_child_r)
        os.close(from_child_w)
        shell = f'exec "$@" 3<&{a} 4>&{b} {a}<&- {b}>&-'
        bash = shutil.which("bash") or "/bin/bash"
        self.proc = subprocess.Popen([bash, "-c", shell, "bash", *args], pass_fds=(a, b),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(a)
        os.close(b)
        self._buf = b""
        self._next = 0
        self.events: list[dict] = []
        self.call("Browser.getVersion")

    # -- protocol
    def _send(self, method: str, params: dict | None, session: str | None) -> int:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            n = os.write(self._w, data)
            data = data[n:]
        return self._next

    def _read_one(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CDPError("timed out waiting for Chromium")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise CDPError("Chromium closed the DevTools pipe (it exited: code "
                                   f"{self.proc.poll()})")
                self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        i = self._send(method, params, session)
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._read_one(deadline)
            if m.get("id") == i:
                if "error" in m:
                    raise CDPError(f"{method}: {m['error']}")
                return m.get("result", {})
            if "method" in m:
                self.events.append(m)

    def wait_event(self, method: str, session: str | None, timeout: float | None = None) -> dict:
        for k, e in enumerate(self.events):
            if e["method"] == method and e.get("sessionId") == session:
                return self.events.pop(k)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            m = self._read_one(deadline)
            if m.get("method") == method and m.get("sessionId") == session:
                return m
            if "method" in m:
                self.events.append(m)

    def page(self, width: int = 1280, height: int = 900) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Page(self, target, session, width, height)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self._send("Browser.close", None, None)
                    self.proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            for fd in (self._r, self._w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    """One tab: ``open(path)`` loads a file with the network emulated offline and every request
    recorded; ``eval``, ``hover``, ``click`` and ``screenshot`` act on it; ``console_errors()`` and
    ``requests()`` say what happened."""

    def __init__(self, browser: Browser, target: str, session: str, width: int, height: int):
        self.b, self.target, self.session = browser, target, session
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Network.emulateNetworkConditions", {"offline": True, "latency": 0,
                                                       "downloadThroughput": -1,
                                                       "uploadThroughput": -1})
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                         "deviceScaleFactor": 1, "mobile": False})

    def call(self, method: str, params: dict | None = None) -> dict:
        return self.b.call(method, params, self.session)

    def _events(self, *methods: str) -> list[dict]:
        return [e for e in self.b.events if e.get("sessionId") == self.session
                and e["method"] in methods]

    def open(self, path: str | os.PathLike) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no page to open at {path}")
        url = Path(path).resolve().as_uri()
        self.call("Page.navigate", {"url": url})
        self.b.wait_event("Page.loadEventFired", self.session)

    def eval(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": True})
        if "exceptionDetails" in r:
            raise CDPError(f"{expression!r} raised: {r['exceptionDetails']}")
        return r["result"].get("value")

    def center(self, selector: str) -> tuple[float, float]:
        """Scroll the element into view; its centre in viewport coordinates."""
        box = self.eval("(function(){var e=document.querySelector(" + json.dumps(selector) + ");"
                        "if(!e) return null; e.scrollIntoView({block:'center',inline:'center'});"
                        "var r=e.getBoundingClientRect();"
                        "return [r.left+r.width/2, r.top+r.height/2];})()")
        if box is None:
            raise CDPError(f"no element matches {selector!r}")
        return box[0], box[1]

    def hover(self, selector: str) -> None:
        """Move the mouse onto the element (real input events, as a person's mouse)."""
        x, y = self.center(selector)
        self.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def click(self, selector: str) -> None:
        x, y = self.center(selector)
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y,
                                                   "button": "left", "clickCount": 1})

    def screenshot(self, path: str | os.PathLike, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.eval("[Math.ceil(document.documentElement.scrollWidth),"
                             "Math.ceil(document.documentElement.scrollHeight)]")
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1})
        data = self.call("Page.captureScreenshot", params)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads logged since the page opened."""
        out = []
        for e in self._events("Runtime.consoleAPICalled", "Runtime.exceptionThrown",
                              "Log.entryAdded"):
            p = e["params"]
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                  for a in p.get("args", [])))
            elif e["method"] == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append("exception: " + str(d.get("exception", {}).get("description")
                                               or d.get("text")))
            elif e["method"] == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append("log: " + p["entry"].get("text", ""))
        return out

    def requests(self) -> list[str]:
        """The URL of every request the page made (data: URLs included)."""
        return [e["params"]["request"]["url"] for e in self._events("Network.requestWillBeSent")]

    def close(self) -> None:
        self.b.call("Target.closeTarget", {"targetId": self.target})
