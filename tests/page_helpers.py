"""Helpers for the end-to-end tests of the demo page (tests/test_page.py).

- `Chromium`: Debian's /usr/bin/chromium driven by Python Playwright's async API (never
  `playwright install`), recording every uncaught page error so a test can insist on none.
- UI steps the tests share: sign up through the form, run a task through the composer, find a
  task's card.
"""
from __future__ import annotations

import uuid
from typing import Any

from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

CHROMIUM = "/usr/bin/chromium"
# Known-good flags for this machine (RECIPES.md, a).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "correct horse battery"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def new_email(tag: str = "page") -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@example.com"


class Chromium:
    """One headless Chromium for one test; `errors` collects uncaught errors of every page."""

    def __init__(self) -> None:
        self._pw: Any = None
        self.browser: Browser | None = None
        self.errors: list[str] = []

    async def start(self) -> "Chromium":
        self._pw = await async_playwright().start()
        try:
            self.browser = await self._pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                          args=CHROMIUM_ARGS)
        except BaseException:
            await self.close()
            raise
        return self

    async def context(self, viewport: dict | None = None) -> BrowserContext:
        """A fresh browser context: its own localStorage, i.e. a separate visitor."""
        assert self.browser is not None
        return await self.browser.new_context(viewport=viewport or DESKTOP)

    async def page(self, context: BrowserContext, url: str | None = None) -> Page:
        """A new tab in `context` (tabs of one context share localStorage), opened on `url`."""
        page = await context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(f"{page.url}: {exc}"))
        if url is not None:
            await page.goto(url)
        return page

    async def close(self) -> None:
        if self.browser is not None:
            await self.browser.close()
        if self._pw is not None:
            await self._pw.stop()


# ---------------------------------------------------------------------------------- UI steps

async def sign_up(page: Page, base_url: str, email: str | None = None, *,
                  name: str | None = None) -> str:
    """Create an account through the sign-in card; returns the email once the page is live."""
    email = email or new_email()
    if not page.url.startswith(base_url):
        await page.goto(base_url + "/")
    await page.fill("#auth-email", email)
    await page.fill("#auth-password", PASSWORD)
    if name is not None:
        await page.fill("#auth-name", name)
    await page.click("#signup-btn")
    await expect_signed_in(page, email)
    return email


async def expect_signed_in(page: Page, email: str) -> None:
    """The signed-in view is shown for `email` and its socket is live."""
    await expect(page.locator("#app-view")).to_be_visible()
    await expect(page.locator("#auth-view")).to_be_hidden()
    await expect(page.locator("#user-email")).to_have_text(email)
    await expect(page.locator("#conn-state")).to_have_text("live")
    await expect(page.locator("#conn-pill")).to_have_attribute("data-state", "live")


async def run_task(page: Page, prompt: str, priority: str | None = None) -> dict:
    """Create a task through the composer; returns the task the REST API answered with."""
    await page.fill("#task-prompt", prompt)
    if priority is not None:
        await page.select_option("#task-priority", priority)
    async with page.expect_response(
            lambda r: r.request.method == "POST" and r.url.endswith("/tasks")) as info:
        await page.click("#task-submit")
    response = await info.value
    assert response.status == 201, await response.text()
    task = await response.json()
    await expect(card(page, task["id"])).to_be_visible()
    return task


def card(page: Page, task_id: str):
    """The locator of one task's card."""
    return page.locator(f'#board [data-task-id="{task_id}"]')


async def token_of(page: Page) -> str:
    token = await page.evaluate("localStorage.getItem('droid.token')")
    assert token, "the page stored no token"
    return token


async def user_of(page: Page) -> dict:
    user = await page.evaluate("JSON.parse(localStorage.getItem('droid.user'))")
    assert user and user.get("id"), user
    return user


__all__ = ["CHROMIUM", "Chromium", "DESKTOP", "PHONE", "PASSWORD", "card",
           "expect", "expect_signed_in", "new_email", "run_task", "sign_up", "token_of", "user_of"]
