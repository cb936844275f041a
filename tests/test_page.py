"""[L] The chat page served at `/`, in a real headless browser (Debian's Chromium driven by Playwright).

A real `run_mindformer.py --run_mode serve` process with the tiny model (tests/test_serve.py's ServerProcess);
the page is used the way a person uses it (pick a file, type, press Send / Enter / Stop / New chat) and every
answer it shows is compared with what the OpenAI client gets from the same server for the same conversation
(greedy), which tests/test_serve.py checks against Hugging Face. The conversation the page sends is read off the
wire. Screenshots (desktop and phone width) are saved in each test's tmp_path.
"""
import os
import threading
import time

import httpx
import numpy as np
import pytest
from playwright.sync_api import expect, sync_playwright

from helpers import IMAGES, ImageServer, ServerProcess, data_url, image_part, text_part

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CAT = os.path.join(IMAGES, "chelsea.jpg")
LONG = 30_000     # the answer's wait limit, in ms (the tiny model answers 24 tokens in well under a second)


@pytest.fixture(scope="module")
def browser():
    assert os.path.exists(CHROMIUM), "Chromium is missing: apt-get install -y chromium (scripts/test.sh does)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """The chat page in a fresh browser context, with the chat requests it sends recorded."""

    def __init__(self, browser, base, width=1280, height=860):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.sent = []
        self.page.on("request", self._record)
        self.page.goto(base + "/")
        expect(self.page.locator("#model")).not_to_be_empty()    # /limits and /v1/models were read

    def _record(self, request):
        if request.method == "POST" and request.url.endswith("/v1/chat/completions"):
            self.sent.append(request.post_data_json)

    def settings(self, **values):
        self.page.click("#settings summary")
        for field, value in values.items():
            self.page.fill(f"#{field}", str(value))
        self.page.click("#settings summary")

    def ask(self, text, files=(), press_enter=False):
        """Attach files, type, send; wait until the answer ends; (its state, the text shown)."""
        n = self.page.locator(".msg.assistant").count()
        if files:
            self.page.set_input_files("#file-input", list(files))
            expect(self.page.locator("#attachments .thumb")).to_have_count(len(files))
        self.page.fill("#prompt", text)
        if press_enter:
            self.page.press("#prompt", "Enter")
        else:
            self.page.click("#send")
        answer = self.page.locator(".msg.assistant").nth(n)
        expect(answer).not_to_have_attribute("data-state", "streaming", timeout=LONG)
        return answer.get_attribute("data-state"), answer.locator(".text").text_content()

    def notice(self):
        expect(self.page.locator("#notice")).to_be_visible()
        return self.page.locator("#notice-text").text_content()

    def screenshot(self, path):
        self.page.screenshot(path=str(path), full_page=True)

    def close(self):
        self.context.close()


def api_answer(server, messages, max_tokens):
    reply = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                                  temperature=0)
    return reply.choices[0].message.content


def noise_jpeg(tmp_path):
    """A photo the tests' yaml refuses: noise compresses badly, so this is over processor.max_bytes (300000)."""
    from PIL import Image
    path = tmp_path / "noise.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), dtype=np.uint8)).save(path, quality=95)
    assert os.path.getsize(path) > 300_000
    return str(path)


def test_page_streams_what_the_api_answers_and_keeps_the_conversation(server, browser, tmp_path):
    page = Page(browser, server.base)
    try:
        assert page.page.locator("#model").text_content() == "tiny"
        page.settings(**{"max-tokens": 24})
        question = "What is shown?"
        state, shown = page.ask(question, files=[CAT])
        first = [{"role": "user", "content": [image_part(data_url(CAT)), text_part(question)]}]
        assert page.sent[0]["messages"] == first
        assert page.sent[0]["stream"] is True and page.sent[0]["temperature"] == 0
        assert page.sent[0]["max_tokens"] == 24
        answer = api_answer(server, first, 24)
        assert state == "done" and answer and shown == answer

        thumb = page.page.locator(".msg.user .thumb").first       # the photo is shown, decoded, in the turn
        assert thumb.evaluate("img => img.complete && img.naturalWidth") == 451
        assert page.page.locator("#attachments .thumb").count() == 0

        # a follow-up with HTML in it: sent with the whole conversation, shown as text
        follow = "<b>x</b> & <img src=q onerror=alert(1)> What colour is it?"
        state, shown = page.ask(follow, press_enter=True)
        second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": [text_part(follow)]}]
        assert page.sent[1]["messages"] == second
        assert state == "done" and shown == api_answer(server, second, 24)
        assert page.page.locator(".msg.user .text").nth(1).text_content() == follow
        assert page.page.locator("#conversation b").count() == 0
        assert page.page.locator("#conversation img").count() == 1        # the photo, and no <img> from text
        page.screenshot(tmp_path / "page-desktop.png")

        page.page.set_viewport_size({"width": 390, "height": 844})
        assert page.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert page.page.locator("#send").is_visible() and page.page.locator("#new-chat").is_visible()
        page.screenshot(tmp_path / "page-phone.png")
        page.page.set_viewport_size({"width": 1280, "height": 860})

        # a new conversation starts empty: only the new message goes to the server
        page.page.click("#new-chat")
        expect(page.page.locator(".msg")).to_have_count(0)
        expect(page.page.locator("#empty")).to_be_visible()
        state, shown = page.ask("Hello?")
        alone = [{"role": "user", "content": [text_part("Hello?")]}]
        assert page.sent[2]["messages"] == alone and state == "done" and shown == api_answer(server, alone, 24)
    finally:
        page.close()


DROP_OR_PASTE = """([kind, b64]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const data = new DataTransfer();
    data.items.add(new File([bytes], "chelsea.jpg", {type: "image/jpeg"}));
    const event = kind === "drop" ? new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true})
                                  : new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true});
    document.querySelector(kind === "drop" ? "#conversation" : "#prompt").dispatchEvent(event);
}"""


@pytest.mark.parametrize("kind", ["drop", "paste"])
def test_a_dropped_or_pasted_photo_is_attached_as_its_bytes(kind, server, browser):
    page = Page(browser, server.base)
    try:
        b64 = data_url(CAT).split(",", 1)[1]
        page.page.evaluate(DROP_OR_PASTE, [kind, b64])
        thumb = page.page.locator("#attachments .thumb")
        expect(thumb).to_have_count(1)
        assert thumb.get_attribute("src") == data_url(CAT)
        page.page.click("#attachments .remove")
        expect(thumb).to_have_count(0)
    finally:
        page.close()


def test_oversized_image_is_a_message_and_the_page_goes_on(server, browser, tmp_path):
    big = noise_jpeg(tmp_path)
    images = ImageServer(big)
    page = Page(browser, server.base, width=390, height=844)
    try:
        page.settings(**{"max-tokens": 8})
        # picked from disk: the page knows the server's limit and says so before sending anything
        page.page.set_input_files("#file-input", big)
        text = page.notice()
        assert "noise.jpg" in text and "300000 bytes" in text
        assert page.page.locator("#attachments .thumb").count() == 0 and page.sent == []

        # given by URL: the server fetches it and refuses it with 413, whose message the page shows
        page.page.fill("#image-url", images.url("/cat.jpg"))
        page.page.click("#add-url")
        state, _ = page.ask("Describe it.")
        assert state == "error"
        text = page.notice()
        assert text.startswith("Too large for the server:") and "limit of 300000" in text
        page.screenshot(tmp_path / "page-413-phone.png")
        assert page.page.input_value("#prompt") == "Describe it."    # the words and the image are given back
        expect(page.page.locator("#attachments .thumb")).to_have_count(1)

        # the page goes on: drop the image, send again; the refused turn is not part of the conversation
        page.page.click("#attachments .remove")
        state, shown = page.ask("Describe it.")
        alone = [{"role": "user", "content": [text_part("Describe it.")]}]
        assert page.sent[-1]["messages"] == alone
        assert state == "done" and shown == api_answer(server, alone, 8)
        expect(page.page.locator("#notice")).to_be_hidden()
    finally:
        page.close()
        images.close()


@pytest.mark.slow
def test_stop_busy_and_gone_server_are_messages(setup, browser, tmp_path):
    s = ServerProcess(setup["yaml"], setup["ckpt"], str(setup["dir"] / "out_page_busy"), "--max_batch", "1",
                      "--max_queue", "1")
    page = Page(browser, s.base)
    try:
        # Stop: the answer ends where it was, is kept as the assistant's turn, and the server frees the row
        page.settings(**{"max-tokens": 400})
        page.page.fill("#prompt", "Tell me everything.")
        page.page.click("#send")
        answer = page.page.locator(".msg.assistant").last
        expect(answer.locator(".text")).not_to_be_empty(timeout=LONG)
        page.page.click("#stop")
        expect(answer).to_have_attribute("data-state", "stopped")
        expect(answer.locator(".note")).to_have_text("stopped")
        kept = answer.locator(".text").text_content()
        deadline = time.monotonic() + 30
        while httpx.get(s.base + "/health").json()["cancelled"] < 1:
            assert time.monotonic() < deadline, "the stopped answer was not cancelled on the server"
            time.sleep(0.2)
        page.settings(**{"max-tokens": 4})
        page.ask("And?")
        assert page.sent[-1]["messages"][1] == {"role": "assistant", "content": kept}

        # New chat while an answer streams: that answer is dropped, the next message goes alone
        page.settings(**{"max-tokens": 400})
        page.page.fill("#prompt", "Tell me everything.")
        page.page.click("#send")
        expect(page.page.locator(".msg.assistant").last.locator(".text")).not_to_be_empty(timeout=LONG)
        page.page.click("#new-chat")
        expect(page.page.locator(".msg")).to_have_count(0)
        assert page.page.input_value("#prompt") == ""
        page.settings(**{"max-tokens": 4})
        page.ask("Hi")
        assert page.sent[-1]["messages"] == [{"role": "user", "content": [text_part("Hi")]}]

        # the queue full: one request answered, one waiting, the page's is refused with 429
        def hold():
            httpx.post(s.base + "/v1/chat/completions", timeout=120,
                       json={"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 400})

        holders = [threading.Thread(target=hold) for _ in range(2)]
        for t in holders:
            t.start()
        deadline = time.monotonic() + 30
        while httpx.get(s.base + "/health").json()["waiting"] < 1:
            assert time.monotonic() < deadline, "the queue did not fill"
            time.sleep(0.05)
        state, _ = page.ask("Are you there?")
        assert state == "error"
        assert page.notice().startswith("The server is busy (its queue is full):")
        for t in holders:
            t.join(timeout=120)

        # the server gone: a network error, said in words
        s.close()
        state, _ = page.ask("Are you there?")
        assert state == "error" and page.notice().startswith("Cannot reach the server")
        page.screenshot(tmp_path / "page-gone.png")
    finally:
        page.close()
        s.close()
