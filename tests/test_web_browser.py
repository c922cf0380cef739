"""End to end in headless Chromium: the real skin-fl-web server, upload, prediction and overlay, correction, case list."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from client.web.users import UserList
from web_support import lesion_image, train_tiny_model

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    model = train_tiny_model(tmp_path / "final_model.pt")
    data_dir = tmp_path / "web"
    token = UserList(data_dir / "users.json").add("dr.alice")
    port = _free_port()
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "client.web_cli", "serve", "--data-dir", str(data_dir), "--model", str(model), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"skin-fl-web did not start: {process.communicate(timeout=5)[0].decode()[-2000:]}") from None
                time.sleep(0.2)
        yield url, token, data_dir
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_see_prediction_and_overlay_correct_it_and_find_it_in_the_case_list(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as visible
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, token, data_dir = server
    image = tmp_path / "patient 17 lesion.jpg"
    lesion_image("mel", 3).save(image, quality=92)
    wait = WebDriverWait(browser, 30)

    browser.get(url + "/")
    assert "does not replace, a clinician's diagnosis" in browser.find_element(By.ID, "clinical-note").text
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "sign-in").click()
    wait.until(visible.visibility_of_element_located((By.ID, "files")))
    assert browser.find_element(By.ID, "signed-in").text == "Signed in as dr.alice"

    browser.find_element(By.ID, "files").send_keys(str(image))
    browser.find_element(By.ID, "classify").click()
    result = wait.until(visible.visibility_of_element_located((By.CSS_SELECTOR, ".result")))
    case_id = result.get_attribute("data-case-id")
    top_class = result.find_element(By.CSS_SELECTOR, ".top-class").text
    assert top_class and "%" in result.find_element(By.CSS_SELECTOR, ".top-probability").text
    assert len(result.find_elements(By.CSS_SELECTOR, ".probabilities tbody tr")) == 7
    overlay = result.find_element(By.CSS_SELECTOR, "img.overlay")
    wait.until(lambda driver: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) == 384)

    label = Select(result.find_element(By.CSS_SELECTOR, ".label-select"))
    predicted = label.first_selected_option.get_attribute("value")
    corrected = "df" if predicted != "df" else "vasc"
    label.select_by_value(corrected)
    result.find_element(By.CSS_SELECTOR, ".note").send_keys("dermoscopy shows central white patch")
    result.find_element(By.CSS_SELECTOR, ".save-label").click()
    wait.until(lambda driver: "corrected" in result.find_element(By.CSS_SELECTOR, ".feedback-status").text)

    browser.get(url + "/cases")
    row = wait.until(visible.visibility_of_element_located((By.CSS_SELECTOR, f"tr[data-case-id='{case_id}']")))
    cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
    assert cells[2] == "dr.alice" and cells[3].startswith(predicted) and cells[4] == "corrected"
    assert cells[5] == corrected and cells[6] == "dermoscopy shows central white patch" and cells[7] == "dr.alice"
    wait.until(lambda driver: driver.execute_script("return arguments[0].naturalWidth", row.find_element(By.TAG_NAME, "img")) > 0)
    Select(browser.find_element(By.ID, "status")).select_by_value("pending")
    wait.until(lambda driver: not driver.find_elements(By.CSS_SELECTOR, f"tr[data-case-id='{case_id}']"))
    assert [path.name for path in (data_dir / "images").iterdir()] == [f"{case_id}.jpg"]
