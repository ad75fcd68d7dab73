"""
Headless Chromium (Debian's package) driven over the DevTools protocol on a
pipe (``--remote-debugging-pipe``: commands on the child's fd 3, replies and
events on its fd 4, each a JSON text ended by a NUL byte).  No driver, no
browser download, no port: nothing but the browser and this file.

:func:`find_chromium` names the binary or says why there is none (the tests
skip with that reason).  :class:`Chromium` opens one page and keeps every
event; :meth:`Chromium.errors` lists the console errors, uncaught exceptions
and error log entries (a content security policy violation is one) seen so
far.  Waits are bounded; a timeout raises with what was seen.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")

#: The flags this machine's Chromium needs (root, no GPU, nothing fetched from the internet).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--no-default-browser-check",
         "--window-size=1280,900", "--remote-debugging-pipe")
CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome")
TIMEOUT = 20.0


def find_chromium() -> tuple[str | None, str]:
    """(the binary, "") or (None, why not); ``PILOT_CHROMIUM`` names one explicitly."""
    explicit = os.environ.get("PILOT_CHROMIUM")
    for name in ((explicit,) if explicit else CANDIDATES):
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and os.access(path, os.X_OK):
            return path, ""
    return None, ("no Chromium found (tried " + ", ".join((explicit,) if explicit else CANDIDATES) +
                  "); install Debian's chromium package, as .ci/run does")


def _high(fd: int) -> int:
    """``fd`` moved to a number of 10 or more."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class BrowserError(AssertionError):
    pass


class Chromium:
    def __init__(self, binary: str, user_data_dir: str, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # the child's ends out of the way of fds 3 and 4, which the child gets them as
        to_child_r, from_child_w = _high(to_child_r), _high(from_child_w)
        os.makedirs(user_data_dir, exist_ok=True)
        self.stderr_path = os.path.join(user_data_dir, "chromium.stderr")
        stderr = open(self.stderr_path, "wb")

        def fds() -> None:  # in the child: the protocol's pipes on fds 3 and 4
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        try:
            self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
                                         stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                         preexec_fn=fds, pass_fds=(3, 4))
        finally:
            stderr.close()
            os.close(to_child_r)
            os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self._replies: dict[int, dict[str, Any]] = {}
        self.session: str | None = None

    # --- the protocol -------------------------------------------------------------------

    def _read(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        ready, _, _ = select.select([self._from_child], [], [], min(left, 0.2))
        if not ready:
            return
        data = os.read(self._from_child, 1 << 20)
        if not data:
            raise BrowserError(f"Chromium closed the pipe; its output:\n{self.output()}")
        self._buffer += data
        while b"\0" in self._buffer:
            text, _, self._buffer = self._buffer.partition(b"\0")
            message = json.loads(text)
            if "id" in message:
                self._replies[message["id"]] = message
            else:
                self.events.append(message)

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = True) -> dict[str, Any]:
        """Send one command (to the page's session unless ``session`` is False); its result."""
        self._next_id += 1
        ident = self._next_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session and self.session is not None:
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while ident not in self._replies:
            if time.monotonic() > deadline:
                raise BrowserError(f"no reply to {method} in {self.timeout} s")
            self._read(deadline)
        reply = self._replies.pop(ident)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def wait(self, predicate: Callable[[], T | None], what: str, timeout: float | None = None) -> T:
        """Read events until ``predicate()`` is true; its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {what}; errors: {self.errors()}")
            self._read(min(deadline, time.monotonic() + 0.2))

    # --- a page -------------------------------------------------------------------------

    def open(self, url: str) -> None:
        """A new page (its console and log on), at ``url``, once loaded."""
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Page.navigate", {"url": url})
        self.wait(lambda: any(e.get("method") == "Page.loadEventFired" for e in self.events), "the page's load")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for_text(self, element_id: str, text: str, timeout: float | None = None) -> None:
        expression = f"(document.getElementById({json.dumps(element_id)}) || {{}}).textContent"
        deadline = time.monotonic() + (timeout or self.timeout)
        seen = None
        while time.monotonic() < deadline:
            seen = self.evaluate(expression)
            if seen == text:
                return
            self._read(min(deadline, time.monotonic() + 0.25))
        raise BrowserError(f"#{element_id} shows {seen!r}, not {text!r}; errors: {self.errors()}")

    def screenshot(self, path: str) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries so far."""
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append("console: " + json.dumps(params.get("args", []))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                out.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
        return out

    def output(self) -> str:
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("Browser.close", session=False)
            except (BrowserError, OSError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
