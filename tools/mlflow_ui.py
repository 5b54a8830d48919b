"""The MLflow UI in headless Chromium: the pages the tutorial shows and the UI test checks.

Debian's `chromium` package, driven by Playwright from PyPI with `executable_path` (no browser
download). Selectors are MLflow 3's own test ids and component ids where it has them.
"""

from __future__ import annotations

import contextlib
import html
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from playwright.sync_api import Browser, Locator, Page, sync_playwright

# Without the background-networking flags Chromium tries to reach Google's hosts at every
# start, which this machine's closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# Milliseconds a page element may take to appear: the UI's bundle is large, and 2 cores
# running the test suite beside it make a first render take seconds.
TIMEOUT_MS = 60_000
VIEWPORT = {"width": 1400, "height": 900}
WIDE_VIEWPORT = {"width": 5000, "height": 900}


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def browser() -> Iterator[Browser]:
    path = chromium_path()
    if path is None:
        raise RuntimeError("no Chromium here: apt-get install chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def line_points(path_d: str) -> int:
    """Points of a Plotly line trace, from its SVG path ("M x,y L x,y L x,y")."""
    return len(re.findall(r"[ML]", path_d))


@dataclass
class MlflowUi:
    """One browser page on the MLflow UI at `url`."""

    page: Page
    url: str

    @classmethod
    def open(cls, browser_: Browser, url: str) -> MlflowUi:
        page = browser_.new_page(viewport=VIEWPORT)
        page.set_default_timeout(TIMEOUT_MS)
        return cls(page, url.rstrip("/"))

    def go(self, fragment: str) -> None:
        self.page.goto(f"{self.url}/#/{fragment}", wait_until="domcontentloaded")

    def close_assistant(self) -> None:
        """Close MLflow's assistant panel, which covers a third of the page."""
        panel = self.page.get_by_text("MLflow Assistant")
        with contextlib.suppress(Exception):
            panel.wait_for(timeout=5000)
            self.page.get_by_role("button", name="Close", exact=True).first.click()

    def run_charts(self, experiment_id: str, run_id: str, search: str) -> None:
        """A run's model-metrics tab, its charts filtered by `search`."""
        self.go(f"experiments/{experiment_id}/runs/{run_id}/model-metrics")
        box = self.page.get_by_placeholder("Search metric charts")
        box.fill(search)

    def chart_card(self, title: str) -> Locator:
        return self.page.locator('[data-testid="experiment-view-compare-runs-card"]').filter(
            has=self.page.locator(f'h4[title="{title}"]')
        )

    def line_paths(self, scope: Locator | Page | None = None) -> list[str]:
        """The SVG paths of the line traces drawn in `scope` (default: the page)."""
        scope = scope or self.page
        lines = scope.locator(".scatterlayer g.trace path.js-line")
        lines.first.wait_for()
        return [d for d in (line.get_attribute("d") for line in lines.all()) if d]

    def hide_run_parameters(self, card: Locator) -> None:
        """The image card's documented setting: Configure → Run details → off → Save.

        MLflow's image card prints every param of the run above the picture; with the ≈80 a
        dlharness run logs, that text fills the card and pushes the picture out of view.
        """
        card.locator('[data-testid="experiment-view-compare-runs-card-menu"]').click()
        self.page.get_by_role("menuitem", name="Configure").click()
        dialog = self.page.get_by_role("dialog")
        dialog.get_by_role("switch", name="Show run parameters").click()
        dialog.get_by_role("button", name="Save changes").click()
        dialog.wait_for(state="hidden")

    def select_runs(self, experiment_id: str, run_names: list[str]) -> None:
        """Tick runs in the experiment's run list."""
        self.go(f"experiments/{experiment_id}/runs")
        for name in run_names:
            row = self.page.locator(".ag-row", has_text=name).first
            row.wait_for()
            index = row.get_attribute("row-index")
            self.page.locator(f".ag-row[row-index='{index}'] .ag-selection-checkbox").first.click()

    def compare_metric(self, experiment_id: str, run_names: list[str], metric: str) -> None:
        """Tick runs in the run list, press Compare, then open `metric`'s chart of them all."""
        self.select_runs(experiment_id, run_names)
        self.page.get_by_role("button", name="Compare", exact=True).click()
        self.wait_for_route("compare-runs")
        link = self.page.get_by_role("link", name=metric, exact=True).first
        link.wait_for()
        # The link sits below plots that are still rendering and pushing it down: a click at
        # its position may land elsewhere (seen in CI), so the click goes to the element.
        link.dispatch_event("click")
        self.wait_for_route("metric")

    def models_table(self, experiment_id: str) -> dict[str, dict[str, str]]:
        """The experiment's Models tab ("Model training" view): each row's cells by column
        id, by model name. A metric's column id names it and its dataset,
        ``metrics.{"metricKey":"val/acc","datasetName":...,"datasetDigest":...}``."""
        # Wide enough that the grid renders every column (it draws only those in view).
        self.page.set_viewport_size(WIDE_VIEWPORT)
        self.go(f"experiments/{experiment_id}/models?workflowType=machine_learning")
        self.close_assistant()
        self.page.locator(".ag-row").first.wait_for()
        rows = {}
        for row in self.page.locator(".ag-center-cols-container .ag-row").all():
            index = row.get_attribute("row-index")
            cells = self.page.locator(f".ag-row[row-index='{index}'] .ag-cell").evaluate_all(
                "els => els.map(e => [e.getAttribute('col-id'), e.innerText])"
            )
            # Cells carry their column id HTML-escaped (the header cells do not).
            values = {html.unescape(column): text.strip() for column, text in cells}
            rows[values["name"].splitlines()[-1]] = values
        return rows

    def models_charts(self, experiment_id: str, search: str) -> None:
        """The Models tab's chart view (a bar per model for each linked metric and dataset),
        its charts filtered by `search`."""
        self.go(f"experiments/{experiment_id}/models?workflowType=machine_learning")
        self.close_assistant()
        self.page.locator(".ag-row").first.wait_for()
        # The view switch is a pair of icon radio buttons: list, then charts.
        switch = self.page.locator('[data-component-id="mlflow.logged_model.list.view-mode"]')
        box = switch.bounding_box()
        self.page.mouse.click(box["x"] + box["width"] * 0.75, box["y"] + box["height"] / 2)
        self.page.get_by_placeholder("Search metric charts").fill(search)

    def wait_for_route(self, route: str) -> None:
        """Wait until the single-page app shows `route` (a hash change fires no load event)."""
        self.page.wait_for_function(
            "route => window.location.hash.startsWith(`#/${route}`)", arg=route
        )

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
