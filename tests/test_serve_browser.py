"""The web page in a real headless Chromium (selenium + chromedriver) against a real uvicorn server
with the tiny pipeline: submit a prompt, watch the queue, play the video, draft -> refine, cancel.

Chromium is required, not optional: CI installs the Debian packages `chromium` and `chromium-driver`.
"""
from __future__ import annotations

import shutil
import time

import pytest

from turbovid.pipeline import Pipeline
from turbovid.serve.app import create_app

from test_serve_load import serving

PLAYABLE = """
const vids = [...document.querySelectorAll('#gallery video')];
return vids.map(v => ({ready: v.readyState, duration: v.duration, width: v.videoWidth, height: v.videoHeight,
                        error: v.error && v.error.code}));
"""


def chrome():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.fail("the browser test needs Chromium: apt-get install -y chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser test needs selenium: pip install selenium")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # chromedriver gives each session a fresh temporary --user-data-dir unless told otherwise.
    return webdriver.Chrome(service=Service(driver_path), options=opts)


def wait(driver, script, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {script.strip()[:120]}\npage: {driver.page_source[:3000]}")


class HoldOnRequest:
    """The real pipeline; a prompt starting with "hold" stays at its first denoising step, calling
    the server's progress callback until that raises (the job was cancelled), for at most 60 s."""

    def __init__(self, pipe):
        self.pipe, self.spec = pipe, pipe.spec

    def generate(self, prompt, sample, image=None, progress=None, writer=None):
        def held(stage, done, total):
            progress(stage, done, total)
            deadline = time.monotonic() + 60
            while prompt.startswith("hold") and stage == "denoise" and time.monotonic() < deadline:
                time.sleep(0.05)
                progress(stage, done, total)
        return self.pipe.generate(prompt, sample, image=image, progress=held, writer=writer)


def test_page_generates_plays_refines_and_cancels(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    app = create_app(HoldOnRequest(Pipeline.load("tiny")), tmp_path, max_queue=4)
    driver = chrome()
    try:
        with serving(app) as url:
            driver.get(url + "/")
            wait(driver, "return document.querySelectorAll('#steps option').length === 4")
            assert "model tiny (t2v)" in driver.find_element(By.ID, "status").text
            assert driver.find_element(By.ID, "frames").get_attribute("value") == "9"

            # 1. A full job: submit, then the gallery plays it.
            driver.find_element(By.ID, "frames").clear()
            driver.find_element(By.ID, "frames").send_keys("5")
            driver.find_element(By.ID, "prompt").send_keys("a red circle moves <b>right</b>")
            Select(driver.find_element(By.ID, "steps")).select_by_value("2")
            driver.find_element(By.ID, "generate").click()
            wait(driver, "return [...document.querySelectorAll('#gallery video')].some(v => v.readyState >= 2)")
            (video,) = driver.execute_script(PLAYABLE)
            assert video["ready"] >= 2 and video["duration"] > 0 and video["error"] is None
            assert (video["width"], video["height"]) == (224, 128)
            # The prompt is shown as text, never parsed as HTML.
            assert "<b>right</b>" in driver.find_element(By.ID, "gallery").text
            assert not driver.find_elements(By.CSS_SELECTOR, "#gallery b")
            driver.execute_script("document.querySelector('#gallery video').play()")
            wait(driver, "return document.querySelector('#gallery video').currentTime > 0")

            # 2. Draft -> Refine: the refined video names its draft.
            driver.find_element(By.ID, "draft").click()
            wait(driver, "return [...document.querySelectorAll('#gallery button')]"
                         ".some(b => b.textContent.startsWith('Refine'))")
            next(b for b in driver.find_elements(By.CSS_SELECTOR, "#gallery button")
                 if b.text.startswith("Refine")).click()
            wait(driver, "return [...document.querySelectorAll('#gallery .card')]"
                         ".some(c => c.textContent.includes('refined from') && c.querySelector('video')"
                         " && c.querySelector('video').readyState >= 2)")
            assert all(v["ready"] >= 2 and v["duration"] > 0 for v in driver.execute_script(PLAYABLE))

            # 3. Cancel: a running job shows in the queue with its progress and a Cancel button.
            driver.find_element(By.ID, "prompt").clear()
            driver.find_element(By.ID, "prompt").send_keys("hold this one")
            driver.find_element(By.ID, "generate").click()
            wait(driver, "return document.querySelector('#queue') && "
                         "document.querySelector('#queue').textContent.includes('denoise 1/2')")
            driver.find_element(By.CSS_SELECTOR, "#queue button").click()
            wait(driver, "return [...document.querySelectorAll('#gallery .card')]"
                         ".some(c => c.textContent.includes('cancelled'))", timeout=60)
            assert driver.find_element(By.ID, "error").text == ""
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
    finally:
        driver.quit()
