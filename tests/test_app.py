"""The web demo in a real headless browser: ``python app.py`` as a subprocess, driven by Selenium and Debian's Chromium.

Needs ``pip install -r requirements-app.txt`` and ``apt-get install chromium chromium-driver`` (``.ci/install-app-deps``
does both). Without them the test skips locally, and fails under CI (``CI=true``) so that CI cannot skip it silently.
The browser resolves no host but 127.0.0.1, so the page is shown to render with no internet, and the test checks that
it asked nothing of any other host. ``H2CACHE_APP_SCREENSHOT=assets/app.png`` keeps the screenshot after generating.
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a large green triangle on the right against a gray background"
STARTUP_SECONDS = 300  # importing torch and gradio and loading the model on a busy 2-core CPU
GENERATION_SECONDS = 300
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1500",
    # No name resolves except the app's address: the page must render without any CDN.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)


def missing_dependencies() -> list[str]:
    missing = [f"python package {name}" for name in ("gradio", "selenium") if importlib.util.find_spec(name) is None]
    missing += [f"{program} (Debian package)" for program in ("chromium", "chromedriver") if not shutil.which(program)]
    return missing


def require_dependencies():
    missing = missing_dependencies()
    if not missing:
        return
    reason = f"the browser test needs {', '.join(missing)}: run .ci/install-app-deps"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the browser test, but {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, seconds: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(1)
    tail = f"\napp log:\n{log.read_text()[-3000:]}" if log else ""
    raise AssertionError(f"timed out after {seconds} s waiting for {what}{tail}")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    require_dependencies()
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), "--model", "tiny"],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"

    def serving():
        if process.poll() is not None:
            raise AssertionError(f"app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_until(serving, STARTUP_SECONDS, "app.py to serve", log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="h2cache-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def text_of(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def images_in(driver, element_id: str) -> list:
    """The loaded images inside a component (naturalWidth > 0: the browser decoded them)."""
    from selenium.webdriver.common.by import By

    images = driver.find_elements(By.CSS_SELECTOR, f"#{element_id} img")
    return [image for image in images if driver.execute_script("return arguments[0].naturalWidth", image) > 0]


def replace_value(driver, css: str, value: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, css)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(value, Keys.TAB)


def hosts_requested(driver) -> set[str]:
    """Every network host the page asked for (from Chromium's performance log)."""
    hosts = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = urlparse(message["params"]["request"]["url"])
            if url.scheme in ("http", "https", "ws", "wss"):
                hosts.add(url.netloc)
    return hosts


def test_generate_in_the_browser_then_a_bad_value_shows_a_message(app_url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(app_url)
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#prompt textarea"), 60, "the page to render")
    replace_value(browser, "#prompt textarea", PROMPT)
    replace_value(browser, "#steps input", "12")
    browser.find_element(By.CSS_SELECTOR, "#generate button, button#generate").click()

    wait_until(lambda: "Done" in text_of(browser, "status"), GENERATION_SECONDS, "the generation")
    shown = ("uncached", "cached", "difference", "plot")
    wait_until(lambda: all(images_in(browser, element_id) for element_id in shown), 60, f"images in {shown}")
    numbers = text_of(browser, "numbers")
    for label in ("PSNR vs uncached", "SSIM vs uncached", "blocks computed", "wall-time ratio"):
        assert label in numbers, numbers
    assert "12 steps" in text_of(browser, "status")
    assert "dB" in numbers or "identical" in numbers

    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "app.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("H2CACHE_APP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["H2CACHE_APP_SCREENSHOT"])

    replace_value(browser, "#height input", "50")
    browser.find_element(By.CSS_SELECTOR, "#generate button, button#generate").click()
    message = wait_until(
        lambda: "multiple of 16" in (status := text_of(browser, "status")) and status, 60, "the error message"
    )
    assert message.startswith("Error: height must be a positive multiple of 16, got 50"), message
    assert not images_in(browser, "cached")
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    assert hosts_requested(browser) <= {urlparse(app_url).netloc}


def test_calibrate_tab_offers_its_choice_to_the_compare_tab(app_url, browser):
    import re

    from selenium.webdriver.common.by import By

    browser.get(app_url)
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "button[role=tab]"), 60, "the page to render")
    next(tab for tab in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if tab.text == "Calibrate").click()
    wait_until(lambda: browser.find_element(By.ID, "calibrate").is_displayed(), 30, "the calibrate tab")
    replace_value(browser, "#calibration-prompts textarea", PROMPT)
    replace_value(browser, "#grid-tau1 textarea", "0.05,0.3")
    replace_value(browser, "#grid-tau2 textarea", "0.5")
    replace_value(browser, "#calibration-steps input", "6")
    replace_value(browser, "#target-psnr input", "20")
    browser.find_element(By.CSS_SELECTOR, "#calibrate button, button#calibrate").click()

    status = wait_until(
        lambda: "Chosen" in (text := text_of(browser, "calibration-status")) and text, GENERATION_SECONDS, "the choice"
    )
    assert "over 1 prompts" in status and "tau1=0.3" in text_of(browser, "calibration-table")
    tau1 = re.search(r"tau1 ([0-9.]+)", status).group(1)
    use = browser.find_element(By.CSS_SELECTOR, "#use-chosen button, button#use-chosen")
    wait_until(use.is_enabled, 30, "the use button to be enabled")
    use.click()
    slider_box = "#h2-tau1 input[type=number]"
    wait_until(
        lambda: (
            browser.find_element(By.CSS_SELECTOR, slider_box).is_displayed()
            and float(browser.find_element(By.CSS_SELECTOR, slider_box).get_attribute("value")) == float(tau1)
        ),
        30,
        f"the compare tab's tau1 to become {tau1}",
    )
    assert float(browser.find_element(By.CSS_SELECTOR, "#h2-tau2 input[type=number]").get_attribute("value")) == 0.5
