"""The dashboard in a real browser (Debian's headless chromium, driven by Playwright) against
the live stack: the page loads without console errors, draws one cell per KV block, shows an
n = 4 request's shared prompt blocks (ref_cnt > 1) while it runs and lights them up on hover,
and shows the blocks back to free or cached once it ends; the autouse fixture then checks the
pool with fsck.

`PAGEDSERVE_DASHBOARD_SCREENSHOT=docs/dashboard.png` also saves the page under load there
(the README's picture).
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import httpx
from e2e_harness import NUM_KV_BLOCKS, Stack

SYSTEM_PROMPT = "You are a careful assistant. Answer in short, plain sentences. " * 3


class Streams:
    """Streaming completions kept running in threads until `close()` (which aborts them)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.chunks = 0

    def start(self, prompt: str, n: int) -> None:
        body = {"model": "", "prompt": prompt, "n": n, "max_tokens": 300, "temperature": 1.0,
                "seed": 11, "ignore_eos": True, "stream": True}  # fmt: skip

        def run() -> None:
            with httpx.Client(base_url=self.base_url, timeout=60.0) as http:
                models = http.get("/v1/models").json()["data"]
                body["model"] = models[0]["id"]
                while not self.stop.is_set():  # a request that ends (about 1 s) is sent again
                    with http.stream("POST", "/v1/completions", json=body) as reply:
                        for _ in reply.iter_lines():
                            self.chunks += 1
                            if self.stop.is_set():
                                return  # leaving the block closes the connection: the gateway aborts

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def test_dashboard_shows_shared_blocks_live(stack: Stack, chromium, tmp_path: Path) -> None:
    page = chromium.new_page(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(f"{stack.http_url}/dashboard")

    pool = f'section.pool[data-pool="{stack.pool_id}"]'
    cells = f"{pool} .grid .cell"
    page.wait_for_function(f"document.querySelectorAll('{cells}').length > 0", timeout=15_000)
    assert page.locator(cells).count() == NUM_KV_BLOCKS
    assert page.locator(f'{cells}[data-state="used"]').count() == 0

    # A finished request leaves its prompt's full blocks cached, for the next like it.
    with httpx.Client(base_url=stack.http_url, timeout=60.0) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        warm = {"model": model, "prompt": SYSTEM_PROMPT + "Hello.", "max_tokens": 2}
        assert http.post("/v1/completions", json=warm).status_code == 200
    page.wait_for_function(
        f"document.querySelectorAll('{cells}[data-state=\"cached\"]').length > 0", timeout=10_000
    )

    streams = Streams(stack.http_url)
    try:
        streams.start("def fibonacci(n):\n    " * 4, n=4)
        streams.start(SYSTEM_PROMPT + "Name a colour.", n=1)
        streams.start(SYSTEM_PROMPT + "Name a fruit.", n=1)
        # The four choices point at their prompt's full blocks: ref_cnt 4, in the DOM.
        page.wait_for_function(
            f"[...document.querySelectorAll('{cells}')].some(c => Number(c.dataset.ref) >= 4)",
            timeout=30_000,
        )
        assert page.locator(f'{cells}[data-state="used"]').count() > 0
        requests = f"{pool} .requests li"
        assert page.locator(requests).count() >= 1

        # Hovering the n = 4 request lights its blocks and rings those it shares.
        shared_request = page.locator(requests, has_text="4 seq").first
        shared_request.hover()
        lit = page.locator(f"{cells}.hl")
        rings = page.locator(f"{cells}.shared")
        page.wait_for_function(f"document.querySelectorAll('{cells}.shared').length > 0", timeout=5_000)
        assert lit.count() >= rings.count() > 0
        assert all(int(r) > 1 for r in rings.evaluate_all("cs => cs.map(c => c.dataset.ref)"))
        assert page.locator(f"{pool} .grid.focus").count() == 1

        shot = tmp_path / "dashboard.png"
        page.mouse.move(0, 0)
        target = os.environ.get("PAGEDSERVE_DASHBOARD_SCREENSHOT")
        if target:  # a few seconds of history in the plots for the README's picture
            page.wait_for_timeout(6_000)
        page.screenshot(path=str(shot), full_page=True)
        if target:
            shutil.copyfile(shot, target)
        assert streams.chunks > 0
    finally:
        streams.close()

    # Aborted: every block goes back to free, or stays cached for the next prompt like it.
    page.wait_for_function(
        f"document.querySelectorAll('{cells}[data-state=\"used\"]').length === 0", timeout=20_000
    )
    states = set(page.locator(cells).evaluate_all("cs => cs.map(c => c.dataset.state)"))
    assert states <= {"free", "cached"} and "cached" in states
    page.wait_for_function(f"document.querySelectorAll('{pool} .requests li').length === 0", timeout=10_000)
    assert not errors, errors
    page.close()
