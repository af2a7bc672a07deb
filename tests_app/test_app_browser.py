"""The viewer in a real browser: stage2/app.py in a subprocess on a free port with the demo weights, driven by
headless Chromium (/usr/bin/chromium and /usr/bin/chromedriver through selenium).

What the page shows is checked against independent references: stage2/infer.py's files for the same image and
weights (heat map, mask, probability, score), a numpy threshold of infer's probability for other thresholds,
scikit-learn's F1 and Jaccard for the ground-truth scores, and infer.py on a JPEG'd copy for the "what if" panel.

MPC_APP_SCREENSHOT=docs/images/app.png writes the README's screenshot (a 256-colour PNG) at the end of the run.
"""
import csv
import io
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score, jaccard_score

from conftest import DEMO_WEIGHTS, REPO
from datasets.io import read_image
from datasets.perturb import jpeg
from stage2.infer import main as infer_main
from utils.files import write_png

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1150")
WAIT_S = 90  # the first map includes loading the model in the app (a few seconds on a busy 2-core machine)
SCREENSHOT_ENV = "MPC_APP_SCREENSHOT"



@pytest.fixture(scope="module", autouse=True)
def chromium_installed():
    """A failure, not a skip: `make test-app` exists to run this in a browser (.ci/run installs one)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: install Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def infer(image_path: Path, out: Path):
    """stage2/infer.py's outputs for one image with its defaults: (heat map, mask, probability, score)."""
    infer_main(["--input", str(image_path), "--weights", str(DEMO_WEIGHTS), "--out", str(out), "--save-prob",
                "--num-workers", "0", "--no-progress"])
    with (out / "scores.csv").open() as f:
        score = float(next(csv.DictReader(f))["score"])
    stem = image_path.stem
    return (read_image(out / f"{stem}_heatmap.png"), read_image(out / f"{stem}_mask.png")[:, :, 0] > 127,
            np.load(out / f"{stem}_prob.npy"), score)


@pytest.fixture(scope="module")
def reference(spliced, tmp_path_factory):
    return infer(spliced[0], tmp_path_factory.mktemp("infer"))


@pytest.fixture(scope="module")
def server(spliced, tmp_path_factory):
    """The app on a free port; its log is printed when it fails to start."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, str(REPO / "stage2" / "app.py"), "--weights", str(DEMO_WEIGHTS),
                                    "--port", str(port), "--folder", str(spliced[0].parent)],
                                   cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the app did not start (exit {process.poll()}):\n{log_path.read_text()}")
        time.sleep(0.5)
    yield url, process
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


# ----------------------------------------------------------------------------------------------- page helpers


def open_page(driver, url):
    driver.get(url)
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))


def upload(driver, elem_id: str, path: Path):
    driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys(str(path))


def image_url(driver, elem_id: str, other_than: str | None = None) -> str:
    """The src of the picture shown in #elem_id, once there is one (other than `other_than`)."""
    def ready(d):
        found = d.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
        src = found[0].get_attribute("src") if found else None
        return src if src and src != other_than else False
    try:
        return WebDriverWait(driver, WAIT_S).until(ready)
    except TimeoutException:
        pytest.fail(f"no new picture in #{elem_id}; status: {text_of(driver, 'status')!r}")


def settled_image_url(driver, elem_id: str, other_than: str, quiet_s: float = 2.0) -> str:
    """The src of the picture in #elem_id once a new one is shown and no other follows for `quiet_s`. Typing a number
    sends its characters one by one, and the page may answer an intermediate value ("0" on the way to "0.72") with
    a picture of its own before the final one."""
    src = image_url(driver, elem_id, other_than)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        latest = image_url(driver, elem_id)
        if latest == src:
            return src
        src = latest
    pytest.fail(f"the picture in #{elem_id} kept changing for {WAIT_S} s")


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def shown_pixels(url: str) -> np.ndarray:
    """The pixels of a picture the page shows. The page may switch to a new picture's URL a moment before the server
    has the whole file to serve (seen once in CI: bytes that were not yet an image), so the file is fetched again
    until it decodes, for at most WAIT_S; its pixels are then compared exactly by the caller."""
    deadline = time.monotonic() + WAIT_S
    while True:
        data = fetch(url)
        try:
            return pixels(data)
        except Image.UnidentifiedImageError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def grey(picture: np.ndarray) -> np.ndarray:
    return picture if picture.ndim == 2 else picture[:, :, 0]


def text_of(driver, elem_id: str) -> str:
    return driver.find_element(By.ID, elem_id).text


def wait_for_text(driver, elem_id: str, *parts: str) -> str:
    try:
        WebDriverWait(driver, WAIT_S).until(lambda d: all(p in text_of(d, elem_id) for p in parts))
    except TimeoutException:
        pytest.fail(f"#{elem_id} never showed {parts}; it shows {text_of(driver, elem_id)!r}; status: "
                    f"{text_of(driver, 'status')!r}")
    return text_of(driver, elem_id)


def set_number(driver, elem_id: str, value):
    """Type into the number box of a slider or number field and press Enter (what a user does)."""
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.ENTER)


def download(driver, elem_id: str, name: str) -> bytes:
    """Click a download button and read the file the browser saved."""
    target = driver.downloads / name
    if target.exists():
        target.unlink()
    driver.find_element(By.ID, elem_id).click()
    try:
        WebDriverWait(driver, WAIT_S).until(lambda d: target.is_file() and target.stat().st_size > 0
                                            and not list(d.downloads.glob("*.crdownload")))
    except TimeoutException:
        pytest.fail(f"{name} was not downloaded; the folder holds {sorted(os.listdir(driver.downloads))}")
    return target.read_bytes()


def threshold_reference(prob: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The mask at `threshold` by the official rule (value on 0-255 > int(t·255)) from infer's probability, and
    the pixels too close to the threshold for float rounding of prob·255 to decide."""
    values = prob.astype(np.float64) * 255
    cut = math.floor(threshold * 255 + 1e-9)
    return values > cut, np.abs(values - cut) < 1e-3


# ----------------------------------------------------------------------------------------------- tests


def test_heatmap_mask_score_and_downloads_equal_infers_then_the_threshold_moves_the_mask(
        server, browser, spliced, reference):
    heat_ref, mask_ref, prob_ref, score_ref = reference
    open_page(browser, server[0])
    upload(browser, "upload", spliced[0])

    shown_heat = shown_pixels(image_url(browser, "heatmap"))
    np.testing.assert_array_equal(shown_heat[:, :, :3], heat_ref)
    mask_src = image_url(browser, "mask")
    np.testing.assert_array_equal(grey(shown_pixels(mask_src)) > 127, mask_ref)
    assert f"{score_ref:.4f}" in wait_for_text(browser, "score", "Image-level score")

    np.testing.assert_array_equal(pixels(download(browser, "download_heatmap", "splice_heatmap.png")), heat_ref)
    np.testing.assert_array_equal(np.load(io.BytesIO(download(browser, "download_prob", "splice_prob.npy"))),
                                  prob_ref)
    np.testing.assert_array_equal(grey(pixels(download(browser, "download_mask", "splice_mask.png"))) > 127,
                                  mask_ref)

    for threshold in (0.3, 0.72):
        set_number(browser, "threshold", threshold)
        mask_src = settled_image_url(browser, "mask", other_than=mask_src)
        shown = grey(shown_pixels(mask_src)) > 127
        expected, undecided = threshold_reference(prob_ref, threshold)
        assert undecided.sum() < 5 and np.array_equal(shown[~undecided], expected[~undecided])
        assert shown.sum() != mask_ref.sum()  # the mask moved: the map has pixels between the thresholds
        downloaded = grey(pixels(download(browser, "download_mask", "splice_mask.png"))) > 127
        np.testing.assert_array_equal(downloaded, shown)
    set_number(browser, "threshold", 0.5)
    np.testing.assert_array_equal(grey(shown_pixels(settled_image_url(browser, "mask", other_than=mask_src))) > 127,
                                  mask_ref)


def test_ground_truth_scores_and_what_if(server, browser, spliced, reference, tmp_path):
    image_path, mask_path, gt = spliced
    _, mask_ref, prob_ref, _ = reference
    open_page(browser, server[0])
    upload(browser, "upload", image_path)
    image_url(browser, "heatmap")
    upload(browser, "gt", mask_path)
    protocol = f"{f1_score(gt.ravel(), mask_ref.ravel()):.4f}"
    iou = f"{jaccard_score(gt.ravel(), mask_ref.ravel()):.4f}"
    text = wait_for_text(browser, "metrics", "protocol (0.5)")
    assert f"protocol (0.5) {protocol} {iou}" in text.replace("\n", " ")

    set_number(browser, "threshold", 0.3)
    expected, _ = threshold_reference(prob_ref, 0.3)
    wait_for_text(browser, "metrics", "at threshold 0.30", f"{f1_score(gt.ravel(), expected.ravel()):.4f}",
                  f"{jaccard_score(gt.ravel(), expected.ravel()):.4f}")
    set_number(browser, "threshold", 0.5)
    wait_for_text(browser, "metrics", "at threshold 0.50")

    by_hand = tmp_path / "splice_jpeg50.png"  # the distortion applied outside the app, then plain inference
    write_png(by_hand, jpeg(read_image(image_path), 50))
    heat_jpeg, mask_jpeg, _, score_jpeg = infer(by_hand, tmp_path / "infer_jpeg")
    set_number(browser, "level", 50)
    browser.find_element(By.ID, "apply").click()
    np.testing.assert_array_equal(shown_pixels(image_url(browser, "heatmap2"))[:, :, :3], heat_jpeg)
    np.testing.assert_array_equal(grey(shown_pixels(image_url(browser, "mask2"))) > 127, mask_jpeg)
    assert f"{score_jpeg:.4f}" in wait_for_text(browser, "score2", "after jpeg:50")
    f1_jpeg = f"{f1_score(gt.ravel(), mask_jpeg.ravel()):.4f}"
    wait_for_text(browser, "metrics2", f"protocol (0.5) {f1_jpeg}")

    target = os.environ.get(SCREENSHOT_ENV)
    shot = tmp_path / "app.png"
    browser.execute_script("window.scrollTo(0, 0)")
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, min(height + 140, 2400))  # the whole page in one picture
    browser.save_screenshot(str(shot))
    browser.set_window_size(1400, 1150)
    if target:
        picture = Image.open(shot).convert("RGB").quantize(256)
        picture.save(REPO / target, optimize=True)
        assert (REPO / target).stat().st_size < 300_000


def test_errors_are_shown_in_the_page_and_the_server_carries_on(server, browser, spliced, tmp_path):
    url, process = server
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not an image" * 10)
    open_page(browser, url)
    upload(browser, "upload", corrupt)
    status = wait_for_text(browser, "status", "Error", "cannot read", "corrupt.png")
    assert not browser.find_elements(By.CSS_SELECTOR, "#heatmap img")

    open_page(browser, url)  # the same server: still answering, the image still localised
    assert process.poll() is None
    upload(browser, "upload", spliced[0])
    image_url(browser, "heatmap")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    box = browser.find_element(By.CSS_SELECTOR, "#weights input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(garbage), Keys.ENTER)
    status = wait_for_text(browser, "status", "Error", "garbage.pth")
    assert "Traceback" not in status
    assert process.poll() is None

