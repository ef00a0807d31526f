"""The page `GET /` serves (issue 28), driven in a real headless browser — Debian's chromium with
its chromedriver, through selenium — against the real service over a socket with the built-in model.

Skips, saying why, where no browser is installed (`apt-get install chromium chromium-driver`;
`.ci/run` installs them). Nothing is downloaded at test time: the driver's path is given, so
selenium's own driver manager never runs. With ORTDIFFUSION_SCREENSHOTS=DIR the first test saves
the page mid-generation and at the end (the README's pictures: docs/images/page-*.png).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from test_serve import KEY, running

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
except ImportError:
    selenium = None

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None or selenium is None,
    reason="no headless browser here: needs chromium and chromedriver (apt-get install chromium chromium-driver) "
           "and selenium (the dev extra)")

PROMPT = "a red circle on the left"
#: Flags that keep chromium off the network (this machine has none) and out of the user's profile.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1000,1250")


@pytest.fixture(scope="module")
def builtin():
    from ortdiffusion import Pipeline

    return Pipeline.load("builtin", providers="cpu")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(condition, timeout_s: float = 120, every_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"not within {timeout_s:g} s: {condition.__doc__ or condition}")


def element(browser, element_id: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id)


def open_page(browser, url: str):
    browser.get(url)
    wait_for(lambda: element(browser, "generate").is_displayed() or element(browser, "key-form").is_displayed(), 30)


def type_into(browser, element_id: str, text: str) -> None:
    field = element(browser, element_id)
    field.clear()
    field.send_keys(text)


def save(browser, directory: str | None, name: str) -> None:
    """A screenshot, reduced to a small palette PNG for the README."""
    if not directory:
        return
    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    path = Path(directory) / name
    shot.quantize(64, dither=Image.Dither.NONE).save(path, optimize=True)


def test_type_a_prompt_watch_it_form_and_get_the_apis_pixels(builtin, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    shots = os.environ.get("ORTDIFFUSION_SCREENSHOTS")
    with running(builtin, model_name="builtin") as url:
        open_page(browser, url)
        assert "builtin" in element(browser, "model").text
        type_into(browser, "seed", "7")
        type_into(browser, "prompt", PROMPT)
        element(browser, "prompt").send_keys(Keys.ENTER)  # Enter generates

        seen, shot_taken = [], False

        def finished():
            text = element(browser, "progress-text").text
            if text.startswith("Step") and (not seen or seen[-1] != text):
                seen.append(text)
            nonlocal shot_taken
            step = int(text.split()[1]) if text.startswith("Step") else 0
            if not shot_taken and step >= 8 and browser.find_elements(By.CSS_SELECTOR, "#previews img[src]"):
                save(browser, shots, "page-progress.png")
                shot_taken = True
            return browser.find_elements(By.CSS_SELECTOR, "#gallery img.result")

        (result,) = wait_for(finished, every_s=0.02)
        updates = int(element(browser, "progress-area").get_attribute("data-updates"))
        assert updates >= 2 and len(seen) >= 2, (updates, seen)  # the page showed the steps go by
        caption = browser.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
        assert PROMPT in caption and "7" in caption and "unet: cpu" in caption and "ddim" in caption
        save(browser, shots, "page-done.png")

        src = result.get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
        api = httpx.post(f"{url}/v1/images/generations", timeout=120, json={
            "prompt": PROMPT, "seed": 7, "size": "64x64", "response_format": "b64_json"}).json()
        expected = np.asarray(Image.open(io.BytesIO(base64.b64decode(api["data"][0]["b64_json"]))))
        assert shown.shape == expected.shape == (64, 64, 3)
        assert np.array_equal(shown, expected)


def test_the_key_is_asked_once_and_refusals_are_said_plainly(builtin, browser):
    from selenium.webdriver.common.keys import Keys

    with running(builtin, model_name="builtin", api_key=KEY, max_queue=1) as url:
        browser.get("about:blank")
        open_page(browser, url)
        assert element(browser, "key-form").is_displayed() and not element(browser, "generate").is_displayed()
        type_into(browser, "api-key", KEY)
        element(browser, "api-key").send_keys(Keys.ENTER)
        wait_for(lambda: element(browser, "generate").is_displayed(), 30)
        assert browser.execute_script("return sessionStorage.getItem('ortdiffusion-api-key')") == KEY

        # invalid: the API's own message, naming the field
        type_into(browser, "prompt", PROMPT)
        type_into(browser, "steps", "100000")
        element(browser, "prompt").send_keys(Keys.ENTER)
        alert = wait_for(lambda: element(browser, "error").is_displayed() and element(browser, "error").text, 60)
        assert alert.startswith("The request is invalid") and "steps" in alert

        # the queue full: one request running and one waiting (max_queue=1), then the page's is refused
        holders = [threading.Thread(target=hold, args=(url, seed), daemon=True) for seed in (1, 2)]
        stop.clear()
        for thread in holders:
            thread.start()
            time.sleep(0.5)
        try:
            type_into(browser, "steps", "2")
            element(browser, "prompt").send_keys(Keys.ENTER)
            alert = wait_for(lambda: "queue is full" in element(browser, "error").text and element(browser, "error").text,
                             60)
            assert "Try again" in alert
        finally:
            stop.set()
            for thread in holders:
                thread.join(30)


stop = threading.Event()


def hold(url: str, seed: int) -> None:
    """A long generation (150 steps: the most a request may ask for), streamed, abandoned when `stop` is set
    (the service cancels it)."""
    with httpx.stream("POST", f"{url}/v1/images/generations", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "held", "steps": 150, "seed": seed, "stream": True, "progress": True}) as r:
        for _ in r.iter_lines():
            if stop.is_set():
                return


def test_an_edit_from_the_page_input_image_and_mask(builtin, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    scene = builtin("a red circle on the right", seed=3).images[0]
    scene.save(tmp_path / "scene.png")
    with running(builtin, model_name="builtin") as url:
        open_page(browser, url)
        assert element(browser, "edit").is_displayed()  # the model has the image encoder
        element(browser, "image").send_keys(str(tmp_path / "scene.png"))
        canvas = wait_for(lambda: element(browser, "mask-canvas").is_displayed() and element(browser, "mask-canvas"), 30)
        # paint a stroke down the left side with the pointer (the canvas shows 64 px as 256)
        browser.execute_script("document.getElementById('brush').value = 64")
        ActionChains(browser).move_to_element_with_offset(canvas, -90, -120).click_and_hold() \
            .move_by_offset(0, 240).release().perform()
        type_into(browser, "prompt", "a blue square on the left")
        type_into(browser, "steps", "8")
        element(browser, "prompt").send_keys(Keys.ENTER)
        (result,) = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#gallery img.result"))
        assert "inpainting" in browser.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
        edited = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.get_attribute("src").split(",", 1)[1]))))
        original = np.asarray(scene)
        assert np.array_equal(edited[:, 40:], original[:, 40:])  # unpainted: kept exactly (OpenAI's edits)
        assert not np.array_equal(edited[:, :20], original[:, :20])  # painted: redrawn
