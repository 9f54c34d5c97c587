"""End to end in a real browser: Debian's chromium, driven by selenium, uses the page of a running
`dinov2-serve` the way a person would (choose files, read the cards, switch the attention token,
download the CSV).

The browser is installed by scripts/install_browser.sh when missing (CI runs as root); the test
skips only when that script says it cannot install it here, and prints why. The screenshot it
takes is the README's: set DINOV2_UPDATE_SCREENSHOT=1 to rewrite docs/serve_screenshot.png.
"""

import csv
import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image
from serve_helpers import CLASSES, running_server, truncated

from dinov2.transfer.infer import main as infer_main

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install_browser.sh"
SCREENSHOT = REPO_ROOT / "docs" / "serve_screenshot.png"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root, where chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1100",
)


@pytest.fixture(scope="module")
def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver), installed with apt-get when missing."""
    run = subprocess.run([str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900)
    if run.returncode == 3:
        pytest.skip(f"no browser for the end-to-end test: {run.stderr.strip()}")
    assert run.returncode == 0, f"{INSTALL_SCRIPT.name} failed ({run.returncode}):\n{run.stderr}"
    chromium, driver = run.stdout.split()
    return chromium, driver


@pytest.fixture()
def driver(browser_paths, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_paths
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")  # a new, empty profile
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    service = Service(executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log"))
    browser = webdriver.Chrome(service=service, options=options)
    browser.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    browser.downloads = downloads
    try:
        yield browser
    finally:
        browser.quit()


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def _image_loaded(driver, img) -> int:
    """The decoded width of an <img> (0 while loading or when the browser could not decode it)."""
    return driver.execute_script("return arguments[0].complete ? arguments[0].naturalWidth : 0;", img)


def test_upload_through_the_page_shows_cards_and_downloads_the_csv(driver, trained, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By

    uploads = tmp_path / "uploads"
    uploads.mkdir()
    good = [Path(shutil.copy(p, uploads / p.name)) for p in trained.images(2)]
    broken = uploads / "broken.png"
    broken.write_bytes(truncated(good[0].read_bytes()))
    files = [good[0], broken, good[1]]
    args = ["--model", str(trained.model), "--reference", str(trained.reference)]
    args += ["--cache-dir", str(tmp_path / "cache"), "--max-files", "2"]  # the page sends 2 + 1 files
    with running_server(*args) as (url, _proc, _log):
        driver.get(url + "/")
        info = driver.find_element(By.ID, "model-info")
        _wait(lambda: "3 classes" in info.text, 30, "the model description from /api/health")
        assert "18 reference cells" in info.text

        driver.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in files))
        _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#cards .card")) == 3, 60, "three cards")

        ok_cards = driver.find_elements(By.CSS_SELECTOR, "#cards .card:not(.error)")
        error_cards = driver.find_elements(By.CSS_SELECTOR, "#cards .card.error")
        assert len(ok_cards) == 2 and len(error_cards) == 1
        assert error_cards[0].get_attribute("data-filename") == "broken.png"
        assert "broken.png: truncated" in error_cards[0].find_element(By.CLASS_NAME, "error-message").text
        for card, path in zip(ok_cards, good):
            assert card.get_attribute("data-filename") == path.name
            assert card.find_element(By.CLASS_NAME, "predicted").text in CLASSES
            bars = card.find_elements(By.CSS_SELECTOR, ".top3 .class-row")
            assert len(bars) == 3 and {b.find_element(By.CLASS_NAME, "class-name").text for b in bars} == set(
                CLASSES
            )
            overlay = card.find_element(By.CSS_SELECTOR, "img.overlay")
            assert overlay.get_attribute("src").startswith("data:image/png;base64,")
            _wait(lambda o=overlay: _image_loaded(driver, o) == 64, 10, "the attention overlay to decode")
            thumbs = card.find_elements(By.CSS_SELECTOR, "img.neighbour-thumb")
            assert len(thumbs) == 8
            _wait(lambda t=thumbs: all(_image_loaded(driver, x) == 64 for x in t), 20, "reference thumbnails")
        summary = driver.find_elements(By.CSS_SELECTOR, "#summary tbody tr")
        assert [row.find_elements(By.TAG_NAME, "td")[1].text for row in summary] == [p.name for p in files]

        # The register switch shows another map; CLS brings the first one back.
        card = ok_cards[0]
        overlay = card.find_element(By.CSS_SELECTOR, "img.overlay")
        cls_src = overlay.get_attribute("src")
        buttons = card.find_elements(By.CSS_SELECTOR, ".tokens button")
        assert [b.text for b in buttons] == ["CLS", "reg0", "reg1"]
        buttons[1].click()
        assert overlay.get_attribute("data-token") == "reg0" and overlay.get_attribute("src") != cls_src
        assert buttons[1].get_attribute("aria-pressed") == "true"
        buttons[0].click()
        assert overlay.get_attribute("src") == cls_src

        driver.save_screenshot(str(tmp_path / "serve_screenshot.png"))

        driver.find_element(By.ID, "download-csv").click()
        csv_path = driver.downloads / "predictions.csv"
        _wait(
            lambda: csv_path.is_file() and not list(driver.downloads.glob("*.crdownload")),
            60,
            "the CSV download",
        )

    # Two requests' CSVs joined by the page equal dinov2-infer's CSV of the same files, byte for byte.
    monkeypatch.chdir(uploads)
    assert (
        infer_main(
            ["--model", str(trained.model), "--csv", "infer.csv", "--no-progress", *(p.name for p in files)]
        )
        == 0
    )
    assert csv_path.read_bytes() == (uploads / "infer.csv").read_bytes()
    downloaded = list(csv.reader(io.StringIO(csv_path.read_text(encoding="utf-8"))))
    assert downloaded[0] == ["path", "predicted_class", "probability"] + [f"prob_{c}" for c in CLASSES] + [
        "error"
    ]
    assert [row[0] for row in downloaded[1:]] == [p.name for p in files]
    assert downloaded[2][1] == "" and "truncated" in downloaded[2][-1]

    shot = Image.open(tmp_path / "serve_screenshot.png")
    assert (
        shot.size[0] >= 1000 and len(shot.convert("L").getcolors(maxcolors=65536) or ()) > 50
    )  # a rendered page
    if os.environ.get("DINOV2_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        # A palette PNG keeps the committed file small; the page has few colours besides the cells.
        shot.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            SCREENSHOT, optimize=True
        )


def test_install_script_says_why_it_cannot_install(tmp_path):
    env = {"PATH": str(tmp_path), "DINOV2_CHROMIUM": str(tmp_path / "no-chromium")}  # no apt-get on PATH
    run = subprocess.run(
        ["/bin/bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, env=env, timeout=60
    )
    assert run.returncode == 3
    assert "cannot install the browser: apt-get not found" in run.stderr
    run = subprocess.run(
        ["/bin/bash", str(INSTALL_SCRIPT), "extra"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2 and "usage" in run.stderr
