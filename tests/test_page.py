"""End-to-end tests of the demo page (static/index.html, app.js, style.css) in headless Chromium.

Each test starts real Droid instances (conftest's `droid_factory`: an ephemeral port, the shared
test database, the demo agent) and drives Debian's /usr/bin/chromium through Python Playwright's
async API, using only the page's stable selectors (listed in the header comment of app.js).
Waiting is done with Playwright's retrying `expect`, never with fixed sleeps.

Screenshots (desktop 1280x900 and phone 390x844, tasks in every state, answered by the fake LLM of
tests/fake_llm.py) are written to tests/artifacts/.
"""
from __future__ import annotations

import gc
import os
import pathlib
import re
from typing import AsyncIterator

import pytest
import pytest_asyncio
import tornado.netutil
import tornado.websocket

from conftest import Api, make_config
from droid.app import make_app
from droid.tasks.service import TaskService
from fake_llm import FakeLLM, Step
from page_helpers import (CHROMIUM, DESKTOP, PASSWORD, PHONE, Chromium, card, expect,
                          expect_signed_in, new_email, run_task, sign_up, token_of, user_of)

pytestmark = pytest.mark.asyncio

ARTIFACTS = pathlib.Path(__file__).parent / "artifacts"
SLOW = 20_000  # ms: for waits that span a server restart and the client's reconnection backoff

expect.set_options(timeout=10_000)


@pytest_asyncio.fixture
async def chromium() -> AsyncIterator[Chromium]:
    """A headless Chromium for this test; the test errors if any page threw an uncaught error."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (tests/run does)")
    browser = await Chromium().start()
    try:
        yield browser
    finally:
        await browser.close()
    assert not browser.errors, f"uncaught errors in the page: {browser.errors}"


# ------------------------------------------------------------------------------ the main path

async def test_sign_up_create_task_and_see_it_complete(chromium, droid_factory):
    app = await droid_factory(DROID_DEMO_DELAY_S=0.3)
    page = await chromium.page(await chromium.context(), app.url + "/")
    await expect(page.locator("#auth-view")).to_be_visible()
    await expect(page.locator("#app-view")).to_be_hidden()

    email = await sign_up(page, app.url, name="Ada Lovelace")
    await expect(page.locator("#greeting")).to_contain_text("Ada")
    await expect(page.locator("#conn-count")).to_have_text("1 tab open")
    await expect(page.locator("#board-summary")).to_contain_text("No tasks yet")
    # the agent list came from GET /agents
    await expect(page.locator("#task-agent option")).not_to_have_count(0)

    task = await run_task(page, "Write a haiku about message queues.")
    assert task["status"] == "pending"
    done = card(page, task["id"])
    await expect(done).to_have_attribute("data-status", "completed")
    await expect(page.locator("#list-done").locator(f'[data-task-id="{task["id"]}"]')).to_be_visible()
    await expect(done.locator(".status-chip")).to_have_text("completed")
    await expect(done.locator(".task-prompt")).to_have_text("Write a haiku about message queues.")
    await expect(done.locator(".task-response")).to_contain_text("demo agent")
    await expect(done.locator(".task-response")).to_contain_text("Write a haiku about message queues.")
    await expect(done.locator(".task-cancel")).to_be_hidden()
    await expect(done.locator(".task-meta")).to_contain_text("tokens")
    await expect(page.locator("#count-done")).to_have_text("1")
    await expect(page.locator("#count-pending")).to_have_text("0")
    await expect(page.locator("#count-processing")).to_have_text("0")
    await expect(page.locator("#board-summary")).to_have_text("1 task · 1 completed")

    # the developer panel saw the whole life of the task, in seq order
    log = page.locator("#event-log")
    for name in ("task.created", "task.processing", "task.progress", "task.completed"):
        await expect(log.locator(f'li.ev[data-event="{name}"]').first).to_be_attached()
    specific = ", ".join(f'li.ev[data-event="{name}"]'
                         for name in ("task.created", "task.processing", "task.completed"))
    seqs = await log.locator(specific).evaluate_all("els => els.map(e => Number(e.dataset.seq))")
    assert len(seqs) == 3 and seqs == sorted(seqs, reverse=True), seqs  # newest first

    # a reload keeps the session (localStorage) and shows the task from REST
    await page.reload()
    await expect_signed_in(page, email)
    await expect(card(page, task["id"])).to_have_attribute("data-status", "completed")
    await expect(card(page, task["id"]).locator(".task-response")).to_contain_text("demo agent")


async def test_two_tabs_share_the_session_and_the_board(chromium, droid_factory):
    app = await droid_factory(DROID_DEMO_DELAY_S=0.5)
    context = await chromium.context()
    tab1 = await chromium.page(context, app.url + "/")
    email = await sign_up(tab1, app.url)
    await expect(tab1.locator("#conn-count")).to_have_text("1 tab open")

    # the second tab shares localStorage: it is signed in without the form
    tab2 = await chromium.page(context, app.url + "/")
    await expect_signed_in(tab2, email)
    await expect(tab1.locator("#conn-count")).to_have_text("2 tabs open")
    await expect(tab2.locator("#conn-count")).to_have_text("2 tabs open")

    task = await run_task(tab1, "Explain WebSockets to a ten-year-old in three sentences.")
    for tab in (tab1, tab2):
        shown = card(tab, task["id"])
        await expect(shown).to_have_attribute("data-status", "completed")
        await expect(shown.locator(".task-prompt")).to_have_text(task["prompt"])
        await expect(shown.locator(".task-response")).to_contain_text("demo agent")
        await expect(tab.locator("[data-task-id]")).to_have_count(1)

    await tab2.close()
    await expect(tab1.locator("#conn-count")).to_have_text("1 tab open")


async def test_a_second_user_sees_none_of_it(chromium, droid_factory):
    app = await droid_factory(DROID_DEMO_DELAY_S=0.2)
    alice = await chromium.page(await chromium.context(), app.url + "/")
    await sign_up(alice, app.url)
    first = await run_task(alice, "Alice's private plan")
    await expect(card(alice, first["id"])).to_have_attribute("data-status", "completed")

    bob = await chromium.page(await chromium.context(), app.url + "/")
    await sign_up(bob, app.url)
    await expect(bob.locator("#conn-count")).to_have_text("1 tab open")
    await expect(alice.locator("#conn-count")).to_have_text("1 tab open")

    # Alice works while Bob's page is live: nothing of it reaches Bob
    second = await run_task(alice, "Alice's second secret")
    await expect(card(alice, second["id"])).to_have_attribute("data-status", "completed")
    await expect(bob.locator("#board-summary")).to_contain_text("No tasks yet")
    await expect(bob.locator("[data-task-id]")).to_have_count(0)
    for column in ("pending", "processing", "done"):
        await expect(bob.locator(f"#count-{column}")).to_have_text("0")
    await expect(bob.locator('#event-log li.ev[data-event^="task."]')).to_have_count(0)
    assert "Alice" not in await bob.locator("#main").inner_text()
    # and a reload of Bob's tasks over REST finds none either
    await bob.evaluate("window.droid.reload()")
    await expect(bob.locator("[data-task-id]")).to_have_count(0)


# ------------------------------------------------------------------------------ cancel

async def test_cancel_a_processing_and_a_pending_task(chromium, droid_factory):
    # one attempt at a time, and a slow demo agent: the first task stays processing for a while
    # and the second waits behind it
    app = await droid_factory(DROID_DEMO_DELAY_S=20, WORKER_CONCURRENCY=1)
    page = await chromium.page(await chromium.context(), app.url + "/")
    await sign_up(page, app.url)

    running = await run_task(page, "A long essay on queues")
    busy = card(page, running["id"])
    await expect(busy).to_have_attribute("data-status", "processing")
    await expect(page.locator("#list-processing").locator(f'[data-task-id="{running["id"]}"]')).to_be_visible()
    # the answer streams in (task.progress) while it is processing
    await expect(busy.locator(".task-response")).to_contain_text("This is Droid")
    await expect(busy.locator(".task-response-label")).to_have_text("Answer · writing…")

    waiting = await run_task(page, "A second essay, queued")
    queued = card(page, waiting["id"])
    await expect(queued).to_have_attribute("data-status", "pending")
    await expect(page.locator("#list-pending").locator(f'[data-task-id="{waiting["id"]}"]')).to_be_visible()

    await queued.locator(".task-cancel").click()
    await expect(queued).to_have_attribute("data-status", "cancelled")
    await expect(queued.locator(".task-cancel")).to_be_hidden()
    await expect(page.locator("#list-done").locator(f'[data-task-id="{waiting["id"]}"]')).to_be_visible()

    await busy.locator(".task-cancel").click()
    await expect(busy).to_have_attribute("data-status", "cancelled")
    await expect(busy.locator(".status-chip")).to_have_text("cancelled")
    await expect(busy.locator(".task-response-label")).to_have_text("Partial answer")
    await expect(page.locator("#count-done")).to_have_text("2")
    await expect(page.locator("#board-summary")).to_have_text("2 tasks · 2 cancelled")

    # the server agrees
    api = Api(app.url)
    try:
        token = await token_of(page)
        for task in (running, waiting):
            reply = await api.get(f"/tasks/{task['id']}", token=token)
            assert reply.body["status"] == "cancelled", reply.body
    finally:
        api.close()


# ------------------------------------------------------------------------------ restart

async def start_droid(store, port: int = 0, **env):
    """A Droid on `port` (0: an ephemeral one) over `store`, with conftest's test configuration
    (same JWT secret, so tokens outlive a restart)."""
    app = await make_app(make_config(**env), store=store)
    await app.start(tornado.netutil.bind_sockets(port, "127.0.0.1"))
    return app


async def stop_droid(app) -> None:
    """Stop `app` the way a process exit would: Droid.stop(), then close the WebSocket
    connections it leaves open. (Droid.stop() does not close established WebSockets, and neither
    does python-engineio's disconnect, whose CLOSE packet the JS client ignores: in a real process
    the exit right after stop() closes them.) Harmless once Droid.stop() closes them itself."""
    await app.stop()
    for obj in gc.get_objects():
        if (isinstance(obj, tornado.websocket.WebSocketHandler) and obj.application is app.application
                and obj.ws_connection is not None):
            obj.close(1001, "server restarting")


async def test_the_page_survives_a_server_restart(chromium, shared_store):
    # no worker: tasks stay pending, so the only changes are the ones this test makes
    app = await start_droid(shared_store, WORKER_CONCURRENCY=0)
    running = [app]
    api = Api(app.url)
    try:
        page = await chromium.page(await chromium.context(), app.url + "/")
        email = await sign_up(page, app.url)
        kept = await run_task(page, "Keep me pending")
        doomed = await run_task(page, "Cancel me while the page is offline")
        await expect(page.locator("#count-pending")).to_have_text("2")
        user = await user_of(page)

        running.remove(app)
        await stop_droid(app)
        await expect(page.locator("#conn-state")).to_have_text(re.compile("^(reconnecting|offline)$"))
        await expect(page.locator("#conn-count")).to_have_text("")

        # the truth changes while no server listens: a cancel that publishes an event (replayed
        # to the page after its lastSeq), and a task written with no event at all (only the
        # reload over REST after reconnecting can show it)
        app2 = await make_app(make_config(WORKER_CONCURRENCY=0), store=shared_store)
        await app2.tasks.cancel(user["id"], doomed["id"])
        silent, _ = await TaskService(shared_store).create(
            user["id"], agent_id=kept["agentId"], prompt="Created while the server was down")
        await expect(page.locator("#conn-state")).not_to_have_text("live")
        await expect(card(page, doomed["id"])).to_have_attribute("data-status", "pending")

        # a new instance on the same port and database: the page's token is still valid
        await app2.start(tornado.netutil.bind_sockets(app.port, "127.0.0.1"))
        running.append(app2)
        await expect(page.locator("#conn-state")).to_have_text("live", timeout=SLOW)
        await expect(page.locator("#conn-pill")).to_have_attribute("data-state", "live")
        await expect(page.locator("#conn-count")).to_have_text("1 tab open")
        await expect(page.locator("#user-email")).to_have_text(email)
        await expect(card(page, doomed["id"])).to_have_attribute("data-status", "cancelled")
        await expect(card(page, silent["id"])).to_have_attribute("data-status", "pending")
        await expect(card(page, silent["id"]).locator(".task-prompt")).to_have_text(
            "Created while the server was down")
        await expect(card(page, kept["id"])).to_have_attribute("data-status", "pending")
        await expect(page.locator("#count-pending")).to_have_text("2")
        await expect(page.locator("#count-done")).to_have_text("1")

        # and it is live on the new instance: a task made over REST appears, a cancel works
        token = await token_of(page)
        made = await api.post("/tasks", {"prompt": "Made over REST after the restart"}, token=token)
        assert made.status == 201, made.body
        await expect(card(page, made.body["id"])).to_have_attribute("data-status", "pending")
        await card(page, kept["id"]).locator(".task-cancel").click()
        await expect(card(page, kept["id"])).to_have_attribute("data-status", "cancelled")
        assert (await api.get(f"/tasks/{kept['id']}", token=token)).body["status"] == "cancelled"
    finally:
        api.close()
        for instance in running:
            await stop_droid(instance)


# ------------------------------------------------------------------------------ safety and a11y

async def test_user_text_is_rendered_as_text(chromium, droid_factory):
    app = await droid_factory()
    page = await chromium.page(await chromium.context())
    await page.add_init_script("window.__xss = 0")
    await page.goto(app.url + "/")
    name = '<img src=x onerror="window.__xss++">'
    await sign_up(page, app.url, name=name)
    prompts = ['<img src=x onerror="window.__xss++">',
               '<script>window.__xss++</script><b>bold?</b> & "quotes"']
    tasks = [await run_task(page, p) for p in prompts]
    for task, prompt in zip(tasks, prompts):
        shown = card(page, task["id"])
        await expect(shown).to_have_attribute("data-status", "completed")
        await expect(shown.locator(".task-prompt")).to_have_text(prompt)
        # the demo agent quotes the prompt in its answer: text as well
        await expect(shown.locator(".task-response")).to_contain_text(prompt[:20])
    await expect(page.locator("#greeting")).to_contain_text("<img")
    assert await page.locator("img, #board script, #board b, #event-log b").count() == 0
    # the raw event panel shows the payload as text too
    await page.click("#event-panel summary")
    await expect(page.locator("#event-log .ev-json").first).to_be_visible()
    assert await page.locator("#event-log").get_by_text("onerror", exact=False).count() > 0
    assert await page.evaluate("window.__xss") == 0


async def test_sign_up_and_sign_in_with_the_keyboard_only(chromium, droid_factory):
    app = await droid_factory()
    page = await chromium.page(await chromium.context(), app.url + "/")
    keys = page.keyboard  # Tab, Enter and shortcuts are real key presses; text is inserted at the focus

    async def focused() -> str:
        return await page.evaluate("document.activeElement && document.activeElement.id")

    # Tab from the top of the page reaches the email field after the skip link and the brand
    for _ in range(6):
        await keys.press("Tab")
        if await focused() == "auth-email":
            break
    assert await focused() == "auth-email"
    email = new_email("keys")
    await keys.insert_text(email)
    for field, text in (("auth-password", PASSWORD), ("auth-name", "Grace")):
        await keys.press("Tab")
        assert await focused() == field
        await keys.insert_text(text)
    await keys.press("Tab")
    assert await focused() == "signin-btn"
    await keys.press("Tab")
    assert await focused() == "signup-btn"
    await keys.press("Enter")  # "Create account"
    await expect_signed_in(page, email)
    # the composer has the focus; Ctrl+Enter runs the task
    assert await focused() == "task-prompt"
    await keys.insert_text("Typed without a mouse")
    async with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/tasks")):
        await keys.press("Control+Enter")
    await expect(page.locator('[data-status="completed"] .task-prompt')).to_have_text("Typed without a mouse")

    await page.click("#signout-btn")
    await expect(page.locator("#auth-view")).to_be_visible()
    assert await focused() == "auth-email"
    await expect(page.locator("#auth-email")).to_have_value(email)  # kept for the next sign-in
    await keys.press("Tab")
    await keys.insert_text("not the password")
    await keys.press("Enter")  # Enter in a field submits with the first button: "Sign in"
    error = page.locator("#auth-view #form-error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("Invalid")
    await expect(page.locator("#auth-password")).to_have_attribute("aria-invalid", "true")
    assert await focused() == "auth-password"
    await keys.press("Control+A")
    await keys.insert_text(PASSWORD)
    await keys.press("Enter")
    await expect_signed_in(page, email)
    await expect(page.locator("#form-error")).to_be_hidden()
    await expect(page.locator('[data-status="completed"] .task-prompt')).to_have_text("Typed without a mouse")


async def test_validation_errors_are_shown_in_the_form(chromium, droid_factory):
    app = await droid_factory()
    page = await chromium.page(await chromium.context(), app.url + "/")
    error = page.locator("#form-error")
    await expect(error).to_be_hidden()

    # sign-up: a password that is too short; the error sits in the sign-in card
    await page.fill("#auth-email", new_email("short"))
    await page.fill("#auth-password", "short")
    await page.click("#signup-btn")
    await expect(page.locator("#auth-view #form-error")).to_be_visible()
    await expect(error).to_contain_text("password")
    await expect(page.locator("#auth-password")).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("#app-view")).to_be_hidden()

    email = await sign_up(page, app.url)
    await expect(error).to_be_hidden()

    # an empty prompt: the server's 400 message, in the composer, and no task
    await page.click("#task-submit")
    await expect(page.locator("#app-view #form-error")).to_be_visible()
    await expect(error).to_have_text("prompt must be a non-empty string")
    await expect(error).to_have_attribute("role", "alert")
    await expect(page.locator("#task-prompt")).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("[data-task-id]")).to_have_count(0)

    # typing clears the field's error state; a valid prompt clears the message
    await page.fill("#task-prompt", "Now with words")
    await expect(page.locator("#task-prompt")).not_to_have_attribute("aria-invalid", "true")
    await run_task(page, "Now with words")
    await expect(error).to_be_hidden()
    await expect(page.locator("#user-email")).to_have_text(email)


# ------------------------------------------------------------------------------ screenshots

# (status, prompt, priority, what the fake LLM does with it), in the order they are created; with
# one worker slot the first four reach the LLM in this order, and the others wait behind the fourth
SCREENSHOT_TASKS = [
    ("completed", "Write a haiku about message queues.", "normal",
     Step("stream", answer="Messages wait in line,\nconsumers wake one by one:\nthe queue hums, then sleeps.")),
    ("completed", "Explain WebSockets to a ten-year-old in three sentences.", "normal",
     Step("stream", answer="A WebSocket is like a phone call between your browser and a server "
                           "instead of sending letters back and forth. Once the call starts, both "
                           "sides can talk whenever they want. That is how this page sees your "
                           "tasks change the moment they do.")),
    ("failed", "Summarise the attached 400-page PDF.", "high",
     Step("error400", answer="This model's maximum context length is 8192 tokens.")),
    ("processing", "Draft a launch plan for the beta.", "normal",
     Step("stream_hang", chunks=["Here is a first draft. Week one: announce the beta, collect "
                                 "feedback from the waiting list, ", "(never sent)"])),
    ("pending", "List five names for a friendly robot and say why each fits.", "urgent", None),
    ("pending", "Translate the release notes into Portuguese.", "low", None),
    ("cancelled", "Generate 10,000 test users.", "normal", None),
]


async def test_screenshots_desktop_and_phone(chromium, droid_factory):
    fake = await FakeLLM().start()
    try:
        fake.script(*(step for *_, step in SCREENSHOT_TASKS if step is not None))
        app = await droid_factory(LLM_BASE_URL=fake.base_url, LLM_MODEL="fake-model",
                                  WORKER_CONCURRENCY=1, TASK_MAX_RETRIES=0)
        await take_screenshots(chromium, app)
    finally:
        await fake.stop()  # ends the held request


async def take_screenshots(chromium, app) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page = await chromium.page(await chromium.context(DESKTOP), app.url + "/")
    await page.screenshot(path=ARTIFACTS / "page-signed-out-desktop.png", full_page=True,
                          animations="disabled")
    await sign_up(page, app.url, name="Ada Lovelace")

    ids: dict[str, list[str]] = {}
    for status, prompt, priority, _ in SCREENSHOT_TASKS:
        task = await run_task(page, prompt, priority=priority)
        ids.setdefault(status, []).append(task["id"])
        if status in ("completed", "failed"):
            await expect(card(page, task["id"])).to_have_attribute("data-status", status)
        elif status == "processing":
            await expect(card(page, task["id"]).locator(".task-response")).to_contain_text("first draft")
    await card(page, ids["cancelled"][0]).locator(".task-cancel").click()
    for status, task_ids in ids.items():
        for task_id in task_ids:
            await expect(card(page, task_id)).to_have_attribute("data-status", status)
    await expect(card(page, ids["failed"][0]).locator(".task-error")).to_contain_text("context length")
    await expect(card(page, ids["completed"][0]).locator(".task-response")).to_contain_text("the queue hums")
    await expect(page.locator("#count-pending")).to_have_text("2")
    await expect(page.locator("#count-processing")).to_have_text("1")
    await expect(page.locator("#count-done")).to_have_text("4")
    await page.locator("#task-prompt").blur()
    await page.mouse.move(0, 0)  # no hover state in the pictures

    await page.screenshot(path=ARTIFACTS / "page-desktop.png", full_page=True, animations="disabled")
    await page.set_viewport_size(PHONE)
    await expect(page.locator("#board")).to_be_visible()
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page scrolls sideways on a phone: {width}px"
    await page.screenshot(path=ARTIFACTS / "page-phone.png", full_page=True, animations="disabled")
    await page.click("#event-panel summary")
    await expect(page.locator("#event-log li.ev").first).to_be_visible()
    await page.locator("#event-panel").screenshot(path=ARTIFACTS / "page-phone-events.png",
                                                  animations="disabled")
    for name in ("page-signed-out-desktop", "page-desktop", "page-phone", "page-phone-events"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------ settings panel

async def test_settings_panel_keys_and_webhooks(chromium, droid_factory):
    """Create and revoke an API key, add an endpoint (a real receiver on loopback), send a test
    event and see its delivery, and see an endpoint disabled live (a 410)."""
    from standardwebhooks import Webhook
    from webhook_receiver import Receiver, Reply

    receiver = await Receiver().start()
    app = await droid_factory(DROID_WEBHOOK_ALLOW_PRIVATE="true",
                              DROID_WEBHOOK_RETRY_SCHEDULE="0,0.2")
    api = Api(app.url)
    try:
        page = await chromium.page(await chromium.context(), app.url + "/")
        await sign_up(page, app.url)
        await page.click("#settings-panel summary")
        await expect(page.locator("#key-form")).to_be_visible()

        # an API key, shown once, listed, usable, then revoked
        await page.fill("#key-name", "CI runner")
        await page.select_option("#key-scope", "read")
        await page.click("#key-create")
        await expect(page.locator("#key-new")).to_be_visible()
        key = (await page.locator("#key-new-value").text_content()).strip()
        assert re.match(r"^droid_sk_[A-Za-z0-9_-]{43}$", key), key
        row = page.locator("#key-list li[data-key-id]")
        await expect(row).to_have_count(1)
        await expect(row.locator(".key-name")).to_have_text("CI runner")
        await expect(row.locator(".key-scope")).to_have_text("read")
        await expect(row.locator(".key-prefix")).to_have_text(key[:17] + "…")
        assert (await api.get("/tasks", token=key)).status == 200
        await row.locator(".key-revoke").click()
        await expect(page.locator("#key-list li[data-key-id]")).to_have_count(0)
        assert (await api.get("/tasks", token=key)).status == 401
        # a refusal is shown
        await page.click("#key-create")
        await expect(page.locator("#key-error")).to_have_text("name must be a non-empty string")

        # an endpoint, a test event, its delivery
        await page.fill("#hook-url", receiver.url)
        await page.click("#hook-create")
        await expect(page.locator("#hook-new")).to_be_visible()
        secret = (await page.locator("#hook-new-secret").text_content()).strip()
        hook = page.locator("#hook-list li[data-endpoint-id]")
        await expect(hook).to_have_count(1)
        await expect(hook.locator(".hook-url")).to_have_text(receiver.url)
        await expect(hook).to_have_attribute("data-enabled", "true")
        await hook.locator(".hook-test").click()
        delivered = hook.locator(".delivery-list li[data-status='succeeded']")
        await expect(delivered).to_have_count(1)
        await expect(delivered.locator(".delivery-event")).to_have_text("webhook.test")
        await expect(delivered.locator(".delivery-attempts")).to_contain_text("HTTP 200")
        got = receiver.received[0]
        assert Webhook(secret).verify(got.body, got.headers)["type"] == "webhook.test"

        # the receiver says 410: the endpoint is disabled, and the page hears it on the socket
        receiver.answer = lambda r: Reply(410)
        await hook.locator(".hook-test").click()
        await expect(page.locator("#toast")).to_contain_text("Webhook endpoint disabled")
        await expect(hook).to_have_attribute("data-enabled", "false")
        await expect(hook.locator(".hook-state")).to_contain_text("410 Gone")
        await expect(hook.locator(".delivery-list li[data-status='failed']")).to_have_count(1)
        ARTIFACTS.mkdir(exist_ok=True)
        await page.locator("#settings-panel").screenshot(path=ARTIFACTS / "page-settings.png",
                                                         animations="disabled")
        await hook.locator(".hook-delete").click()
        await expect(page.locator("#hook-list li[data-endpoint-id]")).to_have_count(0)
    finally:
        api.close()
        await receiver.stop()
