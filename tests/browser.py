"""What a person sees of a Prefect server: its UI, served next to the test server, rendered by Chromium.

``prefect_test_harness`` starts its server with ``PREFECT__SERVER_EPHEMERAL=1`` (and
``PREFECT_UI_ENABLED=0``), and an ephemeral server never mounts the UI: every UI path answers
404 JSON, and no setting turns it back on. So the tests serve Prefect's own UI app
(``create_ui_app``: the bundled static UI plus ``/ui-settings``) in a process of its own, with
``PREFECT_UI_API_URL`` pointing at the harness's API; the page in the browser then reads the
harness's data, exactly as the UI of a ``prefect server start`` reads its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import httpx

from infra.processes import free_ports

# Runs in the UI process: only the UI app, so no database, no migrations and no services race the
# harness server, which owns the SQLite file.
_UI_SERVER = """
import sys
import uvicorn
from prefect.server.api.server import create_ui_app
uvicorn.run(create_ui_app(ephemeral=False), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""

# Flags that rendered the Prefect UI headless on the CI machines: no sandbox as root,
# no GPU, nothing fetched from Google, /tmp instead of a small /dev/shm.
_CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]


@dataclass(frozen=True)
class PrefectUI:
    origin: str  # http://127.0.0.1:PORT
    base_path: str  # where the v2 UI is mounted: /v2
    api_url: str  # the API the UI reads from

    def url(self, href: str) -> str:
        """The address of a link as the UI writes it (root-relative, e.g. /v2/artifacts/key/K)."""
        return self.origin + href

    def flow_run_url(self, flow_run_id: str, tab: str | None = None) -> str:
        """The v2 UI's flow-run page; ``tab`` is one of its tabs (Logs, TaskRuns, Artifacts...)."""
        url = self.url(f"{self.base_path}/runs/flow-run/{flow_run_id}")
        return f"{url}?tab={tab}" if tab else url


class PrefectUIServer:
    """Prefect's UI app in a process of its own, for the server at ``api_url``.

    Starting and waiting are apart so that the process can boot (imports, copying the bundle)
    while the test does other work, e.g. runs its flow.
    """

    def __init__(self, api_url: str, static_dir: Path) -> None:
        # static_dir receives the UI bundle's copy (the server rewrites its base path in it): one of
        # the test's own keeps it off the copy in site-packages that local stacks share.
        (self.port,) = free_ports(1)
        self.root = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "true",
            "PREFECT_UI_API_URL": api_url,
            "PREFECT_UI_STATIC_DIRECTORY": str(static_dir),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        self.process = subprocess.Popen([sys.executable, "-c", _UI_SERVER, str(self.port)], env=env)
        self._ui: PrefectUI | None = None

    def ready(self, timeout: float = 60.0) -> PrefectUI:
        """Wait until the UI answers; where it is."""
        if self._ui is not None:
            return self._ui
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Prefect UI server exited with code {self.process.returncode}")
            try:
                settings = httpx.get(f"{self.root}/ui-settings", timeout=2).json()
                break
            except httpx.HTTPError as err:
                if time.monotonic() > deadline:
                    message = f"the Prefect UI server did not answer on {self.root} in {timeout} s"
                    raise TimeoutError(message) from err
                time.sleep(0.2)
        # The UI is only mounted when the bundle is in the wheel and could be copied: make sure it was.
        if "v2" not in settings["available_uis"]:
            raise RuntimeError(f"the Prefect UI server serves no v2 UI: {settings}")
        self._ui = PrefectUI(self.root, settings["v2_base_url"].rstrip("/"), settings["api_url"])
        return self._ui

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def serve_prefect_ui(api_url: str, static_dir: Path) -> Iterator[PrefectUIServer]:
    """Serve Prefect's UI for the server at ``api_url`` until the block ends; ``ready()`` waits for it."""
    server = PrefectUIServer(api_url, static_dir)
    try:
        yield server
    finally:
        server.stop()


def render(
    url: str,
    *,
    screenshot: Path | None = None,
    window: tuple[int, int] = (1400, 1000),
    budget_ms: int = 5000,
    timeout: float = 45.0,
    attempts: int = 2,
) -> str:
    """The page's DOM after its scripts ran for ``budget_ms`` of virtual time, and optionally its screenshot.

    Virtual time stands still while a request is pending and races ahead while the page is idle, so
    the budget is not a wait: the Prefect UI's data is on the page whatever the server's latency,
    and 5 s of it is ample for the route's lazy chunks and queries (15 s only costs more animation
    frames of the run graph).
    """
    # One run does both: Chromium writes the screenshot and prints the DOM of the same rendered page.
    extra = [f"--screenshot={screenshot}"] if screenshot is not None else []
    failures = []
    for _ in range(attempts):
        # A fresh profile per page: one shared by consecutive pages (run page, then an artifact key's
        # page) left about one run in ten stuck for good, idle, with nothing pending on the network.
        with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
            command = [
                "chromium",
                *_CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={window[0]},{window[1]}",
                f"--virtual-time-budget={budget_ms}",
                *extra,
                "--dump-dom",
                url,
            ]
            # Its own process group, so that a stuck browser goes with all its helper processes.
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
            )
            try:
                stdout, stderr = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                failures.append(f"no page after {timeout} s")
                continue
        if process.returncode == 0 and stdout:
            return stdout
        failures.append(f"exit {process.returncode}: {stderr[-2000:]}")
    raise RuntimeError(f"chromium rendered no page for {url}: {failures}")


@dataclass(frozen=True)
class Link:
    href: str
    text: str


@dataclass(frozen=True)
class Picture:
    src: str
    alt: str


@dataclass
class Page:
    """What a person can see of a rendered DOM: hidden subtrees, scripts and styles are left out."""

    title: str = ""
    text: str = ""  # the visible text, whitespace collapsed
    headings: list[str] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    tables: list[list[list[str]]] = field(default_factory=list)  # table -> rows -> cell texts
    images: list[Picture] = field(default_factory=list)

    def links_to(self, prefix: str) -> list[Link]:
        return [link for link in self.links if link.href.split("?")[0].startswith(prefix)]


# Elements with no end tag: they never open a subtree.
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
_INVISIBLE = {"script", "style", "template", "noscript"}


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self._stack: list[tuple[str, bool]] = []  # (tag, hidden)
        self._texts: list[str] = []
        self._title: list[str] = []
        # Open collectors: text gathered for the innermost heading, link and table cell.
        self._heading: list[str] | None = None
        self._link: tuple[str, list[str]] | None = None
        self._cell: list[str] | None = None
        self._tables: list[list[list[str]]] = []

    @property
    def _hidden(self) -> bool:
        return bool(self._stack) and self._stack[-1][1]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "img" and not self._hidden:
            self.page.images.append(Picture(attributes.get("src") or "", attributes.get("alt") or ""))
        if tag in _VOID:
            return
        style = (attributes.get("style") or "").replace(" ", "")
        hidden = (
            self._hidden
            or tag in _INVISIBLE
            or "hidden" in attributes
            or attributes.get("aria-hidden") == "true"
            or "display:none" in style
            or "visibility:hidden" in style
        )
        self._stack.append((tag, hidden))
        if hidden:
            return
        if tag in {"h1", "h2", "h3", "h4"}:
            self._heading = []
        elif tag == "a":
            self._link = (attributes.get("href") or "", [])
        elif tag == "table":
            self._tables.append([])
        elif tag == "tr" and self._tables:
            self._tables[-1].append([])
        elif tag in {"td", "th"}:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID or not any(open_tag == tag for open_tag, _ in self._stack):
            return
        while self._stack:
            open_tag, hidden = self._stack.pop()
            if not hidden:
                self._close(open_tag)
            if open_tag == tag:
                break

    def _close(self, tag: str) -> None:
        if tag in {"h1", "h2", "h3", "h4"} and self._heading is not None:
            self.page.headings.append(_collapse(" ".join(self._heading)))
            self._heading = None
        elif tag == "a" and self._link is not None:
            self.page.links.append(Link(self._link[0], _collapse(" ".join(self._link[1]))))
            self._link = None
        elif tag in {"td", "th"} and self._cell is not None:
            if self._tables and self._tables[-1]:
                self._tables[-1][-1].append(_collapse(" ".join(self._cell)))
            self._cell = None
        elif tag == "table" and self._tables:
            self.page.tables.append(self._tables.pop())

    def handle_data(self, data: str) -> None:
        tags = [tag for tag, _ in self._stack]
        if "head" in tags:
            # The document's title; an SVG icon's <title> in the body is not one.
            if tags[-1] == "title":
                self._title.append(data)
            return
        if self._hidden:
            return
        for collector in (self._texts, self._heading, self._link[1] if self._link else None, self._cell):
            if collector is not None:
                collector.append(data)

    def result(self) -> Page:
        self.page.title = _collapse(" ".join(self._title))
        self.page.text = _collapse(" ".join(self._texts))
        return self.page


def _collapse(text: str) -> str:
    return " ".join(text.split())


def parse_page(dom: str) -> Page:
    parser = _PageParser()
    parser.feed(dom)
    parser.close()
    return parser.result()
