"""The web app as a person uses it: headless Chromium (Debian's chromium + chromium-driver,
driven by selenium) against the real `cxr app` command. It uploads the shared NIH radiograph
and the MONOCHROME1 DICOM through the upload page, reads the study page (14 probabilities, the
activation map actually loaded, the flags, another finding's map picked), uploads a corrupt
file and sees its reason, and walks the runs browser back to the same study page.
Screenshots are kept in tests/output/."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.app_helpers import DICOM, NIH_PNG, app_params, corrupt, cxr_app
from tests.conftest import ROOT

OUTPUT = ROOT / "tests" / "output"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("chromium / chromedriver missing: `make test` installs them (scripts/install-chromium.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1300,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def site(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("app-browser")
    _, params_file = app_params(trained, root, "browser")
    with cxr_app(params_file, log=root / "app.log") as (url, _):
        yield url


def _image_loaded(driver, element_id: str) -> bool:
    return driver.execute_script(
        "const i = document.getElementById(arguments[0]); return !!i && i.complete && i.naturalWidth > 0;", element_id)


def _upload(driver, url: str, *paths: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url + "/")
    driver.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in paths))
    driver.find_element(By.ID, "upload-button").click()


def _check_study_page(driver, shot: str) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60)
    wait.until(ec.presence_of_element_located((By.ID, "findings")))
    rows = driver.find_elements(By.CSS_SELECTOR, "#findings tr.finding")
    assert len(rows) == 14
    probabilities = [float(r.find_element(By.CSS_SELECTOR, "td.probability").text) for r in rows]
    assert all(0.0 <= p <= 1.0 for p in probabilities)
    flagged_rows = [r.get_attribute("data-finding") for r in rows if "flagged" in r.get_attribute("class")]
    flagged_text = driver.find_element(By.ID, "flagged").text
    assert flagged_text == (", ".join(flagged_rows) or "none")
    assert all("FLAGGED" in r.find_element(By.CSS_SELECTOR, "td.flag").text
               for r in rows if r.get_attribute("data-finding") in flagged_rows)
    # Every finding shows its operating threshold, on the bar and in numbers.
    assert len(driver.find_elements(By.CSS_SELECTOR, "#findings .bar .threshold")) == 14
    wait.until(lambda d: _image_loaded(d, "cam-image") and _image_loaded(d, "radiograph") and _image_loaded(d, "crop"))
    assert driver.find_element(By.ID, "model-digest").text
    assert "not a diagnostic device" in driver.find_element(By.ID, "not-a-device").text
    assert driver.find_element(By.ID, "ood-verdict").text.startswith("Out of distribution:")
    OUTPUT.mkdir(exist_ok=True)
    driver.save_screenshot(str(OUTPUT / shot))
    return {"probabilities": probabilities, "flagged": flagged_rows, "url": driver.current_url}


def test_upload_a_png_and_read_its_study_page(browser, site):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    _upload(browser, site, NIH_PNG)
    page = _check_study_page(browser, "app-study-png.png")
    assert "/runs/app/studies/" in page["url"]
    assert browser.find_element(By.ID, "study-name").text == NIH_PNG.name
    # Pick another finding: its map replaces the first one and loads.
    before = browser.find_element(By.ID, "cam-image").get_attribute("src")
    select = Select(browser.find_element(By.ID, "cam-select"))
    choice = next(o.text for o in select.options if not o.is_selected())
    select.select_by_visible_text(choice)
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "cam-image").get_attribute("src") != before
                                     and _image_loaded(d, "cam-image"))
    assert browser.find_element(By.ID, "cam-name").text == choice
    # The API agrees with what the page shows.
    sha = page["url"].rstrip("/").split("/")[-1]
    rows = httpx.get(f"{site}/api/v1/runs/app/studies").json()["studies"]
    api = next(r for r in rows if r["sha256"] == sha)
    assert [p for p in api["flagged"].split(", ") if p] == page["flagged"]


def test_drop_the_monochrome1_dicom_on_the_upload_zone(browser, site):
    """Drag and drop: the file lands on the zone as a drop event (a DataTransfer holding it)."""
    from selenium.webdriver.common.by import By

    browser.get(site + "/")
    browser.find_element(By.ID, "file-input").send_keys(str(DICOM))
    browser.execute_script("""
        const input = document.getElementById("file-input"), zone = document.getElementById("drop-zone");
        const dt = new DataTransfer();
        for (const f of input.files) dt.items.add(f);
        input.value = "";  // only the drop handler can put the file back
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));""")
    page = _check_study_page(browser, "app-study-dicom.png")
    assert "/runs/app/studies/" in page["url"]


def test_several_files_at_once_and_a_corrupt_one_with_its_reason(browser, site, tmp_path):
    from selenium.webdriver.common.by import By

    broken = corrupt(tmp_path / "broken.png")
    from selenium.webdriver.support.ui import WebDriverWait

    _upload(browser, site, NIH_PNG, broken)
    # The form is submitted by script: wait for the results page, not for the click.
    WebDriverWait(browser, 120).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results tr.scored, #results tr.rejected")) == 2)
    rows = browser.find_elements(By.CSS_SELECTOR, "#results tr.scored, #results tr.rejected")
    assert len(rows) == 2
    status = {r.find_elements(By.TAG_NAME, "td")[0].text: r for r in rows}
    assert "scored" in status[NIH_PNG.name].get_attribute("class")
    reason = status["broken.png"].find_element(By.CSS_SELECTOR, "td.reason").text
    assert "rejected" in status["broken.png"].get_attribute("class") and len(reason) > 10
    browser.save_screenshot(str(OUTPUT / "app-upload-corrupt.png"))
    # A corrupt file alone: the results page says why.
    _upload(browser, site, broken)
    WebDriverWait(browser, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results tr.rejected td.reason"))
    assert browser.find_element(By.CSS_SELECTOR, "#results tr.rejected td.reason").text == reason


def test_the_runs_browser_leads_to_the_same_study_page(browser, site):
    from selenium.webdriver.common.by import By

    browser.get(site + "/runs")
    browser.find_element(By.LINK_TEXT, "app").click()
    links = browser.find_elements(By.CSS_SELECTOR, "#studies a.study-link")
    assert links
    target = next(l for l in links if l.text == NIH_PNG.name).get_attribute("href")
    browser.get(target)
    _check_study_page(browser, "app-study-from-runs.png")


def test_the_model_page_shows_the_card_and_its_figures(browser, site, trained):
    """/model: the served bundle's model card (written by `cxr evaluate` for these same weights)
    with every figure loaded, and what a probability means."""
    import shutil as sh

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tasks.bundle.bundle import FIGURES, MODEL_CARD
    from tests.evaluation_helpers import evaluated

    params, report = evaluated(trained)
    digest = report["model_digest"]
    source = Path(params.paths.models) / digest
    served = Path(trained.paths.models).parent / "models-browser" / digest  # the site's registered copy: same weights
    sh.copy2(source / MODEL_CARD, served / MODEL_CARD)
    sh.copytree(source / FIGURES, served / FIGURES, dirs_exist_ok=True)
    browser.get(site + "/model")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model-card h1"))
    assert browser.current_url.endswith(f"/models/{digest}")
    assert browser.find_element(By.ID, "model-digest").text == digest[:12]
    card = browser.find_element(By.ID, "model-card")
    assert "Known limits" in card.text and "not a diagnostic device" in card.text and "Calibration" in card.text
    images = card.find_elements(By.TAG_NAME, "img")
    assert len(images) == len(report["figures"])
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#model-card img')].every(i => i.complete && i.naturalWidth > 0);"))
    assert browser.find_element(By.ID, "probability-meaning").text.startswith("Probabilities are calibrated")
    OUTPUT.mkdir(exist_ok=True)
    browser.set_window_size(1300, 2400)
    browser.save_screenshot(str(OUTPUT / "app-model-card.png"))
    browser.set_window_size(1300, 1100)
