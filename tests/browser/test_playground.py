"""The playground (GET /) and the API docs (GET /docs) in a real, headless Chromium.

A person's session, driven by selenium: draw digits with the mouse and read the answer,
type sentences, upload and drop images, generate, move both morph sliders and the noise
slider, use the page on a 375 px phone and under an API key. Throughout, the browser
console must stay free of errors and every request the page makes must go to the server's
own origin. Screenshots land in results/playground/ (`make screenshots` copies two of them
to docs/img/).
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from tests.service.conftest import Server

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "service" / "static"
FIXTURES = REPO / "tests" / "fixtures"
RESULTS = REPO / "results" / "playground"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(
        "the browser tests need Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): "
        "`make tools` installs them where apt-get is usable",
        allow_module_level=True,
    )

CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
)
BROWSER_UI = ("chrome:", "chrome-untrusted:", "devtools:")  # the browser's own pages, not ours
API_KEY = "playground-test-key"
PLAYGROUND_FILES = ("index.html", "app.js", "style.css", "docs.html", "docs.js")
# the stable hooks for tests, exactly these
TEST_IDS = [
    "digit-canvas",
    "digit-clear",
    "digit-result",
    "fashion-upload",
    "fashion-result",
    "sentiment-input",
    "sentiment-result",
    "generate-digit",
    "generate-seed",
    "generate-button",
    "generate-output",
    "morph-seed-slider",
    "morph-seed-output",
    "morph-digit-slider",
    "morph-digit-output",
    "codec-upload",
    "codec-code",
    "codec-output",
    "denoise-sigma",
    "denoise-output",
    "models-table",
]
# the controls a person operates (the other hooks are results and outputs)
CONTROLS = [
    "digit-canvas",
    "digit-clear",
    "fashion-upload",
    "sentiment-input",
    "generate-digit",
    "generate-seed",
    "generate-button",
    "morph-seed-slider",
    "morph-digit-slider",
    "codec-upload",
    "denoise-sigma",
]
SNEAKER = 7  # the Fashion-MNIST label


def by_testid(name: str) -> str:
    return f'[data-testid="{name}"]'


class Browser:
    """One headless Chromium with its console and network log kept for the whole session."""

    def __init__(self, origin: str, width: int = 1280, height: int = 900):
        self.origin = origin
        self.profile = tempfile.mkdtemp(prefix="deepserve-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in CHROME_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.add_argument(f"--window-size={width},{height}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        self.driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        self.console: list[dict] = []
        self.requests: list[tuple[str, str]] = []  # (the document that asked, the URL asked for)

    def open(self, path: str = "/") -> None:
        self.driver.get(self.origin + path)

    def collect(self) -> None:
        self.console += self.driver.get_log("browser")
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                params = message["params"]
                self.requests.append((params.get("documentURL", ""), params["request"]["url"]))

    def errors(self) -> list[dict]:
        self.collect()
        return [e for e in self.console if e["level"] == "SEVERE"]

    def foreign_requests(self) -> list[str]:
        """Every request a page of ours made to another origin (data: and same-origin blob: URLs are local)."""
        self.collect()
        foreign = []
        for document, url in self.requests:
            if document.startswith(BROWSER_UI):
                continue
            if url.startswith("data:") or url.startswith(f"blob:{self.origin}/") or origin_of(url) == self.origin:
                continue
            foreign.append(url)
        return foreign

    def requests_to(self, path: str) -> int:
        self.collect()
        return sum(url == self.origin + path for _, url in self.requests)

    def find(self, name: str):
        return self.driver.find_element(By.CSS_SELECTOR, by_testid(name))

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def js_async(self, script: str, *args):
        """Run a script that calls its last argument with the result."""
        return self.driver.execute_async_script(script, *args)

    def wait(self, condition, timeout: float = 20, message: str = ""):
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda _: condition())
        except TimeoutException:
            errors = self.js("return [...document.querySelectorAll('.error')].map(e => e.textContent).filter(Boolean)")
            raise AssertionError(f"timed out: {message}; errors on the page: {errors}") from None

    def text(self, name: str) -> str:
        return self.js("return document.querySelector(arguments[0]).textContent.trim()", by_testid(name))

    def wait_text(self, name: str, expected: str, timeout: float = 20) -> None:
        self.wait(
            lambda: self.text(name) == expected, timeout, f"{name} to read {expected!r}, it reads {self.text(name)!r}"
        )

    def image(self, name: str) -> str | None:
        """The src of an output <img> once it is loaded, else None."""
        return self.js(
            "const el = document.querySelector(arguments[0]);"
            "return el.complete && el.naturalWidth > 0 && el.getAttribute('src') ? el.src : null;",
            by_testid(name),
        )

    def wait_image(self, name: str, other_than: str | None = None, timeout: float = 20) -> str:
        return self.wait(
            lambda: (src := self.image(name)) and src != other_than and src, timeout, f"{name} to show a new image"
        )

    def natural_size(self, name: str) -> tuple[int, int]:
        return tuple(
            self.js(
                "const el = document.querySelector(arguments[0]); return [el.naturalWidth, el.naturalHeight]",
                by_testid(name),
            )
        )

    def idle(self) -> bool:
        return self.js("return document.querySelectorAll('[aria-busy=\"true\"]').length === 0")

    def screenshot(self, path: Path, width: int, mobile: bool = False) -> None:
        """A full-page screenshot at this CSS width."""
        path.parent.mkdir(parents=True, exist_ok=True)
        metrics = {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": mobile}
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        height = self.js("return document.documentElement.scrollHeight")
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": height})
        time.sleep(0.2)  # one layout and paint at the new size
        self.driver.save_screenshot(str(path))
        self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    def quit(self) -> None:
        self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)


def unexpected(errors: list[dict], morph_supported: bool, allowed: str | None = None) -> list[dict]:
    """The console errors a test must not see: all but those matching `allowed`, and, until the
    server has /generate's morph_to, the morph panels' refused requests."""
    if not morph_supported:
        errors = [e for e in errors if not re.search(r"/generate - .* status of 400", e["message"])]
    return [e for e in errors if not (allowed and re.search(allowed, e["message"]))]


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def png(array: np.ndarray, size: int | None = None) -> bytes:
    image = Image.fromarray(array)
    if size:
        image = image.resize((size, size), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page(server):
    """The playground, opened once at a desktop size; the tests below use it in order."""
    browser = Browser(server.url)
    browser.collect()  # the browser's own start-up pages are not the playground's
    browser.open("/")
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> dict[str, Path]:
    """Files to upload: a Fashion-MNIST sneaker, dark on light and enlarged like a photo, and an MNIST 7."""
    folder = tmp_path_factory.mktemp("uploads")
    fashion = np.load(FIXTURES / "fashion_test500.npz")
    assert fashion["labels"][9] == SNEAKER
    (folder / "sneaker.png").write_bytes(png(255 - fashion["images"][9], size=112))
    shutil.copy(FIXTURES / "mnist_test0_label7.png", folder / "seven.png")
    return {"sneaker": folder / "sneaker.png", "seven": folder / "seven.png"}


@pytest.fixture(scope="module")
def morph_supported(server) -> bool:
    body = {"digit": 3, "seed": 1, "morph_to": {"digit": 8, "seed": 1}, "steps": 3, "format": "json"}
    return httpx.post(server.url + "/generate", json=body, timeout=30).status_code == 200


@pytest.fixture(scope="module")
def ood_flag(server) -> bool:
    """Whether the server sends the out-of-distribution flag with image classifications."""
    seven = (FIXTURES / "mnist_test0_label7.png").read_bytes()
    return "in_distribution" in httpx.post(server.url + "/classify", files={"image": ("7.png", seven)}).json()


# ------------------------------------------------------------------ the files themselves


def test_static_files_are_small_self_contained_and_csp_clean(server):
    sizes = {name: (STATIC / name).stat().st_size for name in PLAYGROUND_FILES}
    total = sum(p.stat().st_size for p in STATIC.rglob("*") if p.is_file())
    assert total < 60_000, f"the playground's files add up to {total} bytes: {sizes}"
    for name in ("index.html", "docs.html"):
        html = (STATIC / name).read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), f"{name} has an inline script"
        assert not re.search(r"\son[a-z]+\s*=", html), f"{name} has an inline event handler"
        assert not re.search(r"\sstyle\s*=|<style", html), f"{name} has inline styles"
        assert not re.search(r"(src|href)=\"(https?:)?//", html), f"{name} loads something from another origin"
    for path in ("/", "/docs", "/static/app.js"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200, path
        assert r.headers["content-security-policy"] == "default-src 'self'; img-src 'self' data: blob:", path
    assert httpx.get(server.url + "/docs.json").json()["paths"], "/docs.json is the OpenAPI document"


# ------------------------------------------------------------------ the playground, panel by panel


def test_the_test_hooks(page):
    hooks = dict(
        page.js("return [...document.querySelectorAll('[data-testid]')].map(e => [e.dataset.testid, e.tagName])")
    )
    assert sorted(hooks) == sorted(TEST_IDS)
    kinds = {name: page.find(name).get_attribute("type") for name in hooks if hooks[name] == "INPUT"}
    assert all(kinds[n] == "file" for n in hooks if n.endswith("-upload"))
    assert all(kinds[n] == "range" for n in hooks if n.endswith("-slider") or n == "denoise-sigma")
    assert all(hooks[n] in ("IMG", "CANVAS") for n in hooks if n.endswith("-output"))


def test_page_is_interactive_fast_and_every_panel_fills(page, server):
    ready = page.js("return performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd")
    assert ready < 1000, f"the page's script ran {ready:.0f} ms after navigation began"
    assert page.driver.title == "deepserve playground"
    models = httpx.get(server.url + "/models").json()["models"]
    page.wait(
        lambda: len(page.find("models-table").find_elements(By.CSS_SELECTOR, "tbody tr")) == len(models),
        message="the models table",
    )
    table = page.find("models-table").text
    for m in models:
        assert m["name"] in table and m["version"] in table, m["name"]
    assert "CPU" in table  # the provider column
    page.wait_text("sentiment-result", "positive")
    page.wait_text("fashion-result", "Ankle boot")
    page.wait_image("generate-output")
    assert page.natural_size("generate-output") == (122, 122)  # 4×4 images of 28 px, 2 px apart
    page.wait(lambda: re.fullmatch(r"([0-9a-f]{2} ){15}[0-9a-f]{2}", page.text("codec-code")), message="a 16-byte code")
    page.wait_image("codec-output")
    page.wait_image("denoise-output")
    assert page.natural_size("denoise-output") == (28, 28)
    filled = page.js("return performance.now()")
    print(f"playground: script ready at {ready:.0f} ms, every panel answered by {filled:.0f} ms")


def draw(page: Browser, strokes: list[list[tuple[int, int]]]) -> None:
    """Clear the digits pad and draw with the mouse: each stroke a polyline, in CSS pixels from the centre."""
    canvas = page.find("digit-canvas")
    page.find("digit-clear").click()
    page.wait_text("digit-result", "–")
    for stroke in strokes:
        actions = ActionChains(page.driver, duration=40)
        actions.move_to_element_with_offset(canvas, *stroke[0]).click_and_hold()
        for (x0, y0), (x1, y1) in zip(stroke, stroke[1:]):
            for t in (0.25, 0.5, 0.75, 1.0):  # several pointer moves per segment, as a hand makes
                actions.move_to_element_with_offset(canvas, round(x0 + t * (x1 - x0)), round(y0 + t * (y1 - y0)))
        actions.release().perform()


def test_a_scribble_is_flagged_out_of_distribution(page, ood_flag):
    if not ood_flag:
        pytest.skip("the server sends no in_distribution flag")
    draw(page, [[(-60, -90), (-60, 20), (60, 20)]])  # an L: not a digit
    page.wait(lambda: page.text("digit-result") != "–", message="an answer")
    page.wait(page.idle, message="the last answer")
    flag = page.driver.find_element(By.ID, "digit-ood")
    assert flag.is_displayed() and "does not look like a handwritten digit" in flag.text, flag.text
    assert "bad" in flag.get_attribute("class")


@pytest.mark.parametrize(
    ("digit", "strokes"),
    [
        ("1", [[(5, -95), (0, 0), (-5, 95)]]),
        ("0", [[(round(-55 * math.sin(i * math.pi / 8)), round(-90 * math.cos(i * math.pi / 8))) for i in range(17)]]),
        ("7", [[(-65, -80), (65, -80), (-15, 90)]]),  # a bar, then the diagonal down (last: the screenshot's)
    ],
)
def test_draw_a_digit_and_read_the_answer(page, ood_flag, digit, strokes):
    draw(page, strokes)
    page.wait_text("digit-result", digit)
    page.wait(page.idle, message="the last answer")
    bars = page.js("return [...document.querySelectorAll('#digit-bars li')].map(li => li.textContent)")
    assert len(bars) == 3 and bars[0].startswith(digit), bars
    flag = page.driver.find_element(By.ID, "digit-ood")
    if ood_flag:
        assert flag.is_displayed() and flag.text.startswith("✓ looks like a handwritten digit"), flag.text
    else:
        assert not flag.is_displayed()


def test_type_a_sentence(page):
    box = page.find("sentiment-input")
    box.clear()
    box.send_keys("a dull, lifeless and boring mess")
    page.wait_text("sentiment-result", "negative")
    box.clear()
    box.send_keys("a wonderful, moving and beautifully acted film")
    page.wait_text("sentiment-result", "positive")
    assert "unknown to the model" in page.driver.find_element(By.ID, "sentiment-note").text


def test_fashion_upload_drop_and_samples(page, uploads, ood_flag):
    page.find("fashion-upload").send_keys(str(uploads["sneaker"]))
    page.wait_text("fashion-result", "Sneaker")
    assert len(page.driver.find_elements(By.CSS_SELECTOR, "#fashion-bars li")) == 3
    flag = page.driver.find_element(By.ID, "fashion-ood")
    assert flag.is_displayed() == ood_flag and (not ood_flag or flag.text.startswith("✓ looks like a Fashion-MNIST"))
    page.driver.find_element(By.CSS_SELECTOR, 'button[data-sample="trouser"]').click()
    page.wait_text("fashion-result", "Trouser")
    dropped = page.js_async(  # a file dropped on the drop zone (selenium cannot drag from the desktop)
        "const done = arguments[arguments.length - 1];"
        "fetch('/static/samples/bag.png').then(r => r.blob()).then(blob => {"
        "  const data = new DataTransfer(); data.items.add(new File([blob], 'bag.png', {type: 'image/png'}));"
        "  document.getElementById('fashion-drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));"
        "  done(true); });",
    )
    assert dropped
    page.wait_text("fashion-result", "Bag")


def test_generate(page, server):
    before = page.image("generate-output")
    Select(page.find("generate-digit")).select_by_value("5")
    seed = page.find("generate-seed")
    seed.clear()
    seed.send_keys("42")
    page.find("generate-button").click()
    src = page.wait_image("generate-output", other_than=before)
    page.wait(page.idle, message="the generator to finish")
    shown = page.js(  # the pixels on screen (CSP's connect-src keeps fetch() off blob: URLs)
        "const img = document.querySelector(arguments[0]);"
        "const canvas = document.createElement('canvas'); canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;"
        "const ctx = canvas.getContext('2d'); ctx.drawImage(img, 0, 0);"
        "return Array.from(ctx.getImageData(0, 0, canvas.width, canvas.height).data.filter((_, i) => i % 4 === 0));",
        by_testid("generate-output"),
    )
    answer = httpx.post(server.url + "/generate", json={"n": 16, "digit": 5, "seed": 42})
    expected = np.asarray(Image.open(io.BytesIO(answer.content)).convert("L"))
    assert np.array_equal(np.array(shown, dtype=np.uint8).reshape(expected.shape), expected), (
        "the grid is what POST /generate answers for digit 5, seed 42"
    )
    assert src


@pytest.mark.parametrize("kind", ["seed", "digit"])
def test_morph_slider(page, server, morph_supported, kind):
    if not morph_supported:
        pytest.xfail("POST /generate does not accept morph_to yet")
    slider, output = page.find(f"morph-{kind}-slider"), f"morph-{kind}-output"
    if kind == "seed":  # endpoints that differ: seed 42 -> 7 of the digit generated last
        target = page.driver.find_element(By.ID, "morph-seed-to")
        target.clear()
        target.send_keys("7", Keys.TAB)
    else:  # digit 5 -> 8
        Select(page.driver.find_element(By.ID, "morph-digit-to")).select_by_value("8")
    page.wait(page.idle, message="the morph frames")
    first = page.wait_image(output)
    page.wait(page.idle, message="the morph frames")
    assert slider.get_attribute("type") == "range" and slider.get_attribute("max") == "8"
    requests = page.requests_to("/generate")
    slider.send_keys(Keys.END)
    last = page.wait_image(output, other_than=first)
    assert slider.get_attribute("value") == "8"
    slider.send_keys(Keys.HOME, *[Keys.ARROW_RIGHT] * 4)  # the middle frame, for the screenshot
    middle = page.wait_image(output, other_than=last)
    assert middle not in (first, last)
    assert page.requests_to("/generate") == requests, "moving the slider picks a fetched frame: no request"
    to = {"digit": 5, "seed": 7} if kind == "seed" else {"digit": 8, "seed": 42}
    body = {"digit": 5, "seed": 42, "morph_to": to, "steps": 9, "format": "json"}
    frames = httpx.post(server.url + "/generate", json=body).json()["images"]
    assert [first, middle, last] == [f"data:image/png;base64,{frames[i]}" for i in (0, 4, 8)]


def test_codec_upload(page, server, uploads):
    before = page.text("codec-code")
    page.find("codec-upload").send_keys(str(uploads["seven"]))
    page.wait(lambda: page.text("codec-code") not in (before, "–"), message="a new code")
    page.wait_image("codec-output")
    page.wait(page.idle, message="the codec")
    expected = httpx.post(server.url + "/compress", files={"image": ("7.png", uploads["seven"].read_bytes())}).json()
    assert page.text("codec-code") == base64.b64decode(expected["code"]).hex(" "), "the code POST /compress gives"
    assert page.natural_size("codec-output") == (28, 28)
    stats = page.driver.find_element(By.ID, "codec-stats").text
    psnr = float(re.search(r"PSNR ([\d.]+) dB", stats).group(1))
    assert 15 < psnr < 40, stats
    assert f"{uploads['seven'].stat().st_size} bytes of PNG" in stats


def test_noise_slider(page):
    slider = page.find("denoise-sigma")
    assert slider.get_attribute("type") == "range"
    page.wait(page.idle, message="the denoiser")
    before = page.wait_image("denoise-output")
    slider.send_keys(*[Keys.ARROW_RIGHT] * 4)  # σ 0.3 -> 0.5
    assert page.driver.find_element(By.ID, "denoise-sigma-value").text == "0.50"
    page.wait_image("denoise-output", other_than=before)
    page.wait(page.idle, message="the denoiser")
    noisy = float(re.search(r"([\d.]+) dB", page.driver.find_element(By.ID, "denoise-noisy-cap").text).group(1))
    denoised = float(re.search(r"([\d.]+) dB", page.driver.find_element(By.ID, "denoise-output-cap").text).group(1))
    assert denoised > noisy + 5, f"denoised {denoised} dB against noisy {noisy} dB"


def test_controls_are_labelled_and_keyboard_reachable(page):
    controls = page.driver.find_elements(By.CSS_SELECTOR, "input, select, textarea, button, canvas[tabindex], a[href]")
    missing = [
        el.get_attribute("outerHTML")[:80] for el in controls if el.is_displayed() and not el.accessible_name.strip()
    ]
    assert len(controls) > 20 and not missing, f"controls without an accessible name: {missing}"
    for name in CONTROLS:
        assert page.find(name).accessible_name.strip(), name
    page.js("document.activeElement.blur(); window.scrollTo(0, 0)")
    reached = set()
    for _ in range(80):  # Tab from the top of the page
        ActionChains(page.driver).send_keys(Keys.TAB).perform()
        reached.add(page.js("return document.activeElement.dataset.testid || ''"))
    assert not set(CONTROLS) - reached, f"not reachable with Tab: {set(CONTROLS) - reached}"


def test_no_console_errors_and_no_requests_to_other_origins(page, morph_supported):
    page.wait(page.idle, message="every panel to finish")
    errors = unexpected(page.errors(), morph_supported)
    assert not errors, errors
    assert not page.foreign_requests()
    assert page.requests_to("/classify") >= 5 and page.requests_to("/compress") >= 2


def test_screenshots_and_no_horizontal_scroll_on_a_phone(page):
    page.js("document.activeElement.blur(); window.scrollTo(0, 0)")
    page.screenshot(RESULTS / "playground.png", 1280)
    page.driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 375, "height": 812, "deviceScaleFactor": 1, "mobile": True}
    )
    time.sleep(0.2)
    widths = page.js("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], f"horizontal scrolling at 375 px: the page is {widths[0]} px wide"
    page.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    page.screenshot(RESULTS / "playground-mobile.png", 375, mobile=True)
    for name in ("playground.png", "playground-mobile.png"):
        assert Image.open(RESULTS / name).size[0] in (1280, 375), name


# ------------------------------------------------------------------ under an API key, and the docs


def test_page_asks_for_the_api_key_then_works(morph_supported):
    server = Server(env={"DEEPSERVE_API_KEY": API_KEY})
    browser = Browser(server.url)
    try:
        browser.collect()
        browser.open("/")
        form = browser.driver.find_element(By.ID, "auth")
        browser.wait(form.is_displayed, message="the API key form")
        browser.screenshot(RESULTS / "api-key.png", 1280)
        key = browser.driver.find_element(By.ID, "api-key")
        assert key.get_attribute("type") == "password" and key.accessible_name == "API key"
        assert browser.driver.switch_to.active_element == key
        key.send_keys("wrong-key", Keys.ENTER)
        browser.wait(lambda: "not accepted" in form.text, message="the wrong key to be refused")
        assert form.is_displayed()
        key.send_keys(API_KEY, Keys.ENTER)
        browser.wait_text("sentiment-result", "positive")
        browser.wait_text("fashion-result", "Ankle boot")
        browser.wait(lambda: len(browser.driver.find_elements(By.CSS_SELECTOR, "#models-table tbody tr")) > 0)
        browser.wait_image("denoise-output")
        browser.wait(browser.idle, message="every panel to finish")
        assert not form.is_displayed()
        browser.driver.refresh()  # the key is kept for the tab's session
        browser.wait_text("sentiment-result", "positive")
        browser.wait(browser.idle, message="every panel to finish")
        assert not browser.driver.find_element(By.ID, "auth").is_displayed()
        errors = unexpected(browser.errors(), morph_supported, allowed=r"status of 401")  # before the key
        assert not errors, errors
        assert not browser.foreign_requests()
    finally:
        browser.quit()
        server.stop()


def test_docs_page_renders_swagger_from_this_server(server):
    browser = Browser(server.url)
    try:
        browser.collect()
        browser.open("/docs")
        browser.wait(
            lambda: browser.js("return document.querySelectorAll('.opblock').length") > 5, message="the operations"
        )
        assert "/classify" in browser.driver.find_element(By.ID, "swagger-ui").text
        browser.screenshot(RESULTS / "docs.png", 1280)
        assert not browser.errors(), browser.errors()
        assert not browser.foreign_requests()
        assert browser.requests_to("/docs.json") == 1
    finally:
        browser.quit()
