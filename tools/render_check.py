r"""Load the built site in headless Chromium and check that MathJax typeset every formula.

A tiny DevTools-protocol client over ``--remote-debugging-pipe`` (no
websocket library, no browser download: Debian's ``chromium``). For each page
it waits for MathJax to finish and reports:

* ``formulas``: arithmatex elements (one per ``$...$`` / ``math`` fence);
* ``containers``: ``mjx-container`` elements MathJax produced;
* ``errors``: the TeX of every formula rendered as ``merror``, with red
  unknown-macro text, or showing a literal backslash (``\_`` inside
  ``\text{}``: MathJax prints it as is);
* ``raw``: snippets of visible text (outside code) still holding ``$``,
  ``\(`` or ``\[``;
* ``external``: every URL the page requested outside the served site.

Usage::

    python tools/render_check.py site/                      # check every page
    python tools/render_check.py site/ --screenshot api/MatrixProduct.html docs/img/MatrixProduct.png
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import functools
import http.server
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
]

TRAMPOLINE = ("import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); "
              "os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])")

CHECK_PAGE_JS = r"""
(async () => {
  const deadline = Date.now() + %(timeout_ms)d;
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  while (document.readyState !== "complete") {
    if (Date.now() > deadline) return {error: "page did not finish loading"};
    await sleep(20);
  }
  const formulas = document.querySelectorAll(".arithmatex").length;
  if (formulas > 0) {
    while (!(window.MathJax && MathJax.startup && MathJax.startup.promise && MathJax.startup.document)) {
      if (Date.now() > deadline) return {error: "MathJax did not load", formulas};
      await sleep(20);
    }
    await MathJax.startup.promise;
  }
  const errors = [];
  if (window.MathJax && MathJax.startup && MathJax.startup.document) {
    for (const item of MathJax.startup.document.math) {
      const root = item.typesetRoot;
      if (!root) { errors.push({tex: item.math, why: "not typeset"}); continue; }
      if (root.querySelector('[data-mml-node="merror"], mjx-merror'))
        errors.push({tex: item.math, why: "merror: " + root.textContent.slice(0, 200)});
      else if (root.querySelector('[fill="red"], [color="red"], [style*="red"]'))
        errors.push({tex: item.math, why: "red (unknown macro)"});
      else if (root.querySelector('[data-c="5C"]') && !/\\(backslash|setminus)/.test(item.math))
        errors.push({tex: item.math, why: "a literal backslash (a macro left uninterpreted, e.g. in \\text)"});
    }
  }
  const containers = document.querySelectorAll("mjx-container").length;
  const body = document.body.cloneNode(true);
  body.querySelectorAll("mjx-container, script, style, pre, code, noscript").forEach((e) => e.remove());
  const text = body.textContent;
  const raw = [];
  for (const mark of ["$", "\\(", "\\["]) {
    let at = text.indexOf(mark);
    while (at >= 0 && raw.length < 10) {
      raw.push(text.slice(Math.max(0, at - 40), at + 40).replace(/\s+/g, " "));
      at = text.indexOf(mark, at + 1);
    }
  }
  return {formulas, containers, errors, raw, title: document.title};
})()
"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """Headless Chromium driven over the DevTools pipe (fd 3 in, fd 4 out)."""

    def __init__(self, executable: str | None = None, timeout: float = 30.0):
        executable = executable or find_chromium()
        if executable is None:
            raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="mnn-chromium-")
        to_browser_read, self._write = os.pipe()
        self._read, from_browser_write = os.pipe()
        # The browser reads commands on fd 3 and writes replies on fd 4. A
        # one-line Python trampoline maps the pipe ends there and execs it
        # (the ends are first renumbered >= 10 so the two dup2 cannot clobber
        # each other). No preexec_fn: the test's HTTP server thread may run.
        child_read = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD_CLOEXEC, 10)
        child_write = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_read)
        os.close(from_browser_write)
        to_browser_read, from_browser_write = child_read, child_write
        self.process = subprocess.Popen(
            [sys.executable, "-c", TRAMPOLINE, str(child_read), str(child_write), executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
             "about:blank"],
            pass_fds=(child_read, child_write),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Network.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True,
                  width=1100, height=900, deviceScaleFactor=1, mobile=False)

    # -- protocol ------------------------------------------------------------
    def _send(self, message: dict) -> None:
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._write, data):]

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise ConnectionError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: bool = False, timeout: float | None = None, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self._send(message)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def wait_event(self, method: str, timeout: float | None = None) -> dict:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for index, event in enumerate(self._events):
                if event.get("method") == method:
                    return self._events.pop(index)
            self._events.append(self._receive(deadline))

    # -- pages ---------------------------------------------------------------
    def open(self, url: str) -> None:
        self._events.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression,
                           awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def check_page(self, url: str) -> dict:
        self.open(url)
        result = self.evaluate(CHECK_PAGE_JS % {"timeout_ms": int(self.timeout * 1000)})
        origin = "/".join(url.split("/")[:3]) + "/"
        requested = [e["params"]["request"]["url"] for e in self._events
                     if e.get("method") == "Network.requestWillBeSent"]
        result["external"] = sorted({u for u in requested if not u.startswith((origin, "data:", "about:", "blob:"))})
        return result

    def screenshot(self, url: str, path: Path, selector: str = "article") -> Path:
        """A PNG of the element ``selector`` (the whole page if absent) after MathJax finished."""
        self.check_page(url)
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}) || document.body;"
            " const r = e.getBoundingClientRect();"
            " return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}; })()")
        shot = self.call("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True,
                         clip={**box, "scale": 1})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._send({"id": self._next_id + 1, "method": "Browser.close", "params": {}})
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(directory: Path):
    """Serve ``directory`` on 127.0.0.1 at a free port; yield the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def site_pages(site: Path) -> list[str]:
    """Every page of a built site, as a path relative to its root (``api/Linear.html``).

    Not ``404.html`` (a server's page) nor the highlighted source files under
    ``source/`` (plain HTML without math; see tools/mkdocs_hooks.py).
    """
    return sorted(html.relative_to(site).as_posix() for html in site.rglob("*.html")
                  if html.name != "404.html" and html.relative_to(site).parts[0] != "source")


def check_site(site: Path, pages: list[str] | None = None) -> dict[str, dict]:
    pages = site_pages(site) if pages is None else pages
    results = {}
    with serve(site) as base, Browser() as browser:
        for page in pages:
            results[page] = browser.check_page(base + page)
    return results


def problems(result: dict) -> list[str]:
    """What is wrong with one page's result, as readable lines (empty when all is well)."""
    if "error" in result:
        return [result["error"]]
    out = []
    if result["containers"] != result["formulas"]:
        out.append(f"{result['formulas']} formulas but {result['containers']} rendered by MathJax")
    out += [f"{e['why']}: {e['tex']}" for e in result["errors"]]
    out += [f"raw TeX delimiter in visible text: ...{snippet}..." for snippet in result["raw"]]
    out += [f"loaded from outside the site: {url}" for url in result.get("external", [])]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("site", type=Path)
    parser.add_argument("--screenshot", nargs=2, metavar=("PAGE", "PNG"),
                        help="save a PNG of PAGE (e.g. api/MatrixProduct.html) instead of checking")
    args = parser.parse_args(argv)
    if args.screenshot:
        page, png = args.screenshot
        with serve(args.site) as base, Browser() as browser:
            browser.screenshot(base + page, Path(png))
        print(f"screenshot of {page}: {png}")
        return 0
    bad = 0
    for page, result in check_site(args.site).items():
        issues = problems(result)
        bad += bool(issues)
        print(f"{'FAIL' if issues else 'ok  '} /{page} ({result.get('formulas', 0)} formulas)")
        for issue in issues:
            print(f"       {issue}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
