"""The report opened in a real browser (headless Chromium through selenium and Debian's chromedriver):
every image loads, the console has no errors, the page is not blank. `.ci/run` installs Debian's
`chromium` and `chromium-driver`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import moesaic
from moesaic.analysis.run import analyze

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")


def _browser():
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver (Debian: chromium-driver)", DRIVER))
               if path is None]
    if missing:
        msg = f"headless browser test needs {' and '.join(missing)} on PATH (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


@pytest.mark.slow
def test_report_in_headless_chromium(trained_ckpt: Path, hf_mixtral: tuple[Path, Path], tiny_config: Path,
                                     tmp_path: Path) -> None:
    a, b = hf_mixtral
    reports = [analyze(moesaic.load(trained_ckpt), tiny_config, tmp_path / "demo", passages=24),
               analyze(moesaic.load(a), tiny_config, tmp_path / "hf", compare=moesaic.load(b), passages=24)]
    driver = _browser()
    try:
        for rep in reports:
            driver.get((rep / "report.html").resolve().as_uri())
            images = driver.execute_script(
                "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);")
            assert len(images) >= 8, images
            assert all(done and width > 0 for _, done, width in images), images
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert errors == []
            text = driver.execute_script("return document.body.innerText;")
            assert "Summary per layer" in text and "Actions" in text and len(text) > 500
            shot = tmp_path / f"{rep.name}.png"
            assert driver.save_screenshot(str(shot))
            from PIL import Image

            colours = Image.open(shot).convert("L").getcolors(maxcolors=1 << 16)
            assert colours is None or len(colours) > 16  # not a blank page
        assert "Compared with" in driver.execute_script("return document.body.innerText;")
    finally:
        driver.quit()
