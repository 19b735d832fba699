"""A real browser: Chromium's own EventSource reconnects after cut connections, and the example
page still gets every event exactly once, in order."""

from __future__ import annotations

import shutil
import tempfile

import anyio
import pytest
from playwright.async_api import async_playwright

from mcp_sse_transport import SseConfig, sse_app

from ._sdk_compat import example_server
from ._support import CuttingProxy, serving

pytestmark = pytest.mark.anyio

# As the machine's docs advise for headless Chromium as root with no network beyond loopback.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = shutil.which("chromium")
    assert path is not None, "Chromium is required: ./scripts/test and .ci/run install Debian's chromium"
    return path


async def test_the_browser_page_gets_every_event_once_across_cut_connections() -> None:
    steps, cut_at = 1500, (300, 700, 1100)
    app = sse_app(example_server, config=SseConfig(retry_interval=0.2))
    with anyio.fail_after(120), tempfile.TemporaryDirectory() as profile:
        async with serving(app) as base:
            proxy = CuttingProxy(base)
            async with proxy.running() as proxied, async_playwright() as playwright:
                browser = await playwright.chromium.launch_persistent_context(
                    profile, executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True
                )
                try:
                    page = await browser.new_page()
                    await page.goto(f"{proxied}/")
                    await page.wait_for_function("window.demo.ready === true")
                    await page.evaluate(f"() => {{ window.countdown({steps}, 0.002); }}")
                    for opens, count in enumerate(cut_at, start=2):
                        await page.wait_for_function(f"window.demo.progress.length >= {count}")
                        proxy.cut()
                        await page.wait_for_function(f"window.demo.opens >= {opens}")
                    await page.wait_for_function("window.demo.result !== null", timeout=60_000)
                    progress = await page.evaluate("window.demo.progress")
                    opens = await page.evaluate("window.demo.opens")
                    errors = await page.evaluate("window.demo.errors")
                    result = await page.evaluate("window.demo.result")
                    ordered = await page.text_content("#ordered")
                finally:
                    await browser.close()
    assert progress == list(range(1, steps + 1)), "every event exactly once, in order"
    assert ordered == "yes"
    assert result == f"counted {steps} steps"
    assert opens == len(cut_at) + 1, "the browser reconnected by itself after each cut"
    assert errors == []
