"""The chat page as a person uses it: headless Chromium (Debian's package) driven by Playwright against a tiny saved
model on 127.0.0.1. Load the page, upload a PNG, ask, watch the answer stream in, check it is the pipeline's answer;
a second turn with a new image; a file that is not an image shows the error line. A screenshot of the page is kept
(the folder is printed; set PHANTOM_HF_ARTEFACTS to choose it).

Skipped, with the reason, where Gradio, Playwright for Python or a Chromium executable cannot be found (Chromium:
PHANTOM_HF_CHROMIUM, else `chromium` on the PATH); CI's app pass installs all three (.ci/run)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from transformers import LogitsProcessor, LogitsProcessorList, pipeline

from .test_app import (
    MAX_NEW_TOKENS,
    QUESTION,
    TIMEOUT,
    app_model_and_processor,
    assistant,
    free_port,
    pipeline_answer,
    save_png,
    user,
)

CHROMIUM = os.environ.get("PHANTOM_HF_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Chromium without a sandbox (CI runs as root), a GPU or any traffic of its own.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
_MISSING = [
    reason
    for reason, missing in (
        ('Gradio is not installed (pip install "phantom-hf[app]")', importlib.util.find_spec("gradio") is None),
        ("Playwright for Python is not installed (pip install playwright)", importlib.util.find_spec("playwright") is None),
        (f"no Chromium executable at {CHROMIUM} (apt-get install chromium)", not os.access(CHROMIUM, os.X_OK)),
    )
    if missing
]
if _MISSING:
    pytest.skip("browser test of the chat page skipped: " + "; ".join(_MISSING), allow_module_level=True)

from playwright.sync_api import Page, sync_playwright  # noqa: E402

# Seconds each generated token is held back in the served model, so that the browser sees the answer grow.
TOKEN_DELAY = 0.15
# Records, in the page, every text the last answer bubble shows as Gradio re-renders it, and the number of answers
# shown while the question box was disabled (it is while an answer is generated).
WATCH_ANSWERS = """() => {
    window.seenAnswers = [];
    window.busyWithAnswer = 0;
    const record = () => {
        const answers = document.querySelectorAll('#conversation [data-testid="bot"]');
        if (answers.length) window.seenAnswers.push(answers[answers.length - 1].innerText.trim());
        if (document.querySelector('#question textarea').disabled) window.busyWithAnswer = answers.length;
    };
    new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


class SlowTokens(LogitsProcessor):
    """Leaves the scores as they are and sleeps `TOKEN_DELAY` per token: generation is paced, not changed."""

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        time.sleep(TOKEN_DELAY)
        return scores


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from phantom_hf.app import build_app
    from phantom_hf.cli import _load_model_and_processor

    folder = tmp_path_factory.mktemp("browser-model")
    model, processor = app_model_and_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    model, processor = _load_model_and_processor(str(folder))
    model.eval()
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    generate = model.generate

    def paced_generate(*args: Any, **kwargs: Any) -> Any:
        return generate(*args, logits_processor=LogitsProcessorList([SlowTokens()]), **kwargs)

    model.generate = paced_generate
    demo = build_app(model, processor, title="tiny Phantom")
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo, pipe
    demo.close()


@pytest.fixture(scope="module")
def browser() -> Any:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def ask_in_page(page: Page, text: str, *files: Path) -> None:
    """Attach `files` with the question box's upload input, type `text`, press Enter."""
    if files:
        page.locator("#question input[type=file]").set_input_files([str(file) for file in files])
        page.wait_for_function(
            "n => document.querySelectorAll('#question .thumbnail-item, #question .thumbnail-image').length >= n",
            arg=len(files),
            timeout=TIMEOUT * 1000,
        )
    page.locator("#question textarea").fill(text)
    page.locator("#question textarea").press("Enter")


def set_max_new_tokens(page: Page, value: int) -> None:
    """Type `value` into the open settings' max-new-tokens box (Enter) until the box and its slider both show it for
    half a second: a value typed while Gradio is still setting up the page can be replaced by the default (seen about
    once in six runs: the page then answered with 256 new tokens)."""
    number, slider = (page.locator(f"#max-new-tokens input[type={kind}]") for kind in ("number", "range"))
    deadline = time.monotonic() + TIMEOUT
    while True:
        number.fill(str(value))
        number.press("Enter")
        shown = []
        for _ in range(5):
            page.wait_for_timeout(100)
            shown.append((number.input_value(), slider.input_value()))
        if set(shown) == {(str(value), str(value))}:
            return
        assert time.monotonic() < deadline, f"the max-new-tokens box does not keep {value}: {shown}"


def wait_for_answer(page: Page, turns: int) -> str:
    """Wait until the page has shown the `turns`-th answer being generated and the question box is usable again;
    the last answer's text."""
    page.wait_for_function(
        """n => document.querySelectorAll('#conversation [data-testid="bot"]').length === n
               && window.busyWithAnswer === n && !document.querySelector('#question textarea').disabled""",
        arg=turns,
        timeout=TIMEOUT * 1000,
    )
    return page.locator('#conversation [data-testid="bot"]').last.inner_text().strip()


def test_a_person_chats_with_images_in_the_browser(served: Any, browser: Any, tmp_path: Path) -> None:
    demo, pipe = served
    artefacts = Path(os.environ.get("PHANTOM_HF_ARTEFACTS") or tmp_path)
    artefacts.mkdir(parents=True, exist_ok=True)
    first, second = save_png(tmp_path, "first.png", seed=1), save_png(tmp_path, "second.png", seed=3, size=(50, 90))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    page.goto(demo.local_url)
    page.wait_for_selector("#question textarea", timeout=TIMEOUT * 1000)
    page.locator("#conversation").wait_for(timeout=TIMEOUT * 1000)
    page.evaluate(WATCH_ANSWERS)
    page.locator("#generation").get_by_text("Generation").first.click()  # opens the settings
    set_max_new_tokens(page, MAX_NEW_TOKENS)

    ask_in_page(page, QUESTION, first)
    answer = wait_for_answer(page, 1)
    expected = pipeline_answer(pipe, [user(QUESTION, first)])
    assert answer == expected.strip() and len(expected.split()) >= 3
    seen = [text for text in dict.fromkeys(page.evaluate("window.seenAnswers")) if text and text != answer]
    assert seen and all(answer.startswith(text) for text in seen), seen  # it grew word by word before the end

    follow_up = "and what about this one ?"
    ask_in_page(page, follow_up, second)
    second_answer = wait_for_answer(page, 2)
    assert second_answer == pipeline_answer(pipe, [user(QUESTION, first), assistant(expected), user(follow_up, second)]).strip()
    assert page.locator('#conversation [data-testid="user"] img').count() == 2  # both turns keep their image

    ask_in_page(page, QUESTION, bad)
    error_line = page.locator("#error-line")
    error_line.get_by_text("error: image file").wait_for(timeout=TIMEOUT * 1000)
    assert error_line.inner_text().strip().startswith("error: image file 'broken.png' cannot be decoded")
    assert page.locator('#conversation [data-testid="bot"]').count() == 2  # the conversation is unchanged

    screenshot = artefacts / "app.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot of the chat page: {screenshot}")
    page.close()
