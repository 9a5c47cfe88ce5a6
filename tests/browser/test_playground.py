"""The playground (GET /) and the API docs (GET /docs) in a real, headless Chromium.

A person's session, driven by selenium: draw digits with the mouse and read the answer,
type sentences, upload and drop images, generate, move both morph sliders and the noise
slider, use the page on a 375 px phone and under an API key. Pictures go to the server as
they are (drawings at the pad's size, uploads byte for byte): the server frames them, and
the page shows the 28×28 input each model received ("what the model saw"). Throughout, the browser
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
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from tests.conftest import require_tools
from tests.service.conftest import Server

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "service" / "static"
FIXTURES = REPO / "tests" / "fixtures"
RESULTS = REPO / "results" / "playground"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

SESSION = True  # one scripted user session: the tests run in the order written (tests/conftest.py)
pytestmark = require_tools(str(CHROMIUM), str(CHROMEDRIVER))  # Debian's chromium and chromium-driver

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
    "digit-seen",
    "fashion-upload",
    "fashion-result",
    "fashion-seen",
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
    "codec-seen",
    "denoise-sigma",
    "denoise-output",
    "denoise-seen",
    "models-table",
    "rollouts-table",
    "rollouts-note",
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
# Records every picture the page posts (multipart `image`): its URL, byte size, pixel size and
# the other form fields, so a test can check what left the page (window.fetch, wrapped once).
SPY_ON_UPLOADS = """
if (!window.sentImages) {
  window.sentImages = [];
  const send = window.fetch;
  window.fetch = (url, init = {}) => {
    if (init.body instanceof FormData && init.body.has('image')) {
      const file = init.body.get('image');
      const entry = {url: String(url), bytes: file.size, size: null, fields: {}};
      for (const [name, value] of init.body) if (name !== 'image') entry.fields[name] = String(value);
      createImageBitmap(file).then(b => { entry.size = [b.width, b.height]; b.close(); }, () => { entry.size = []; });
      window.sentImages.push(entry);
    }
    return send.call(window, url, init);
  };
}
"""


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
        """Until `condition()` holds; an element the page re-rendered meanwhile (stale) is a retry."""
        try:
            wait = WebDriverWait(
                self.driver, timeout, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,)
            )
            return wait.until(lambda _: condition())
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


def unexpected(errors: list[dict], allowed: str | None = None) -> list[dict]:
    """The console errors a test must not see: all but those matching `allowed`."""
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


def sent_to(page: Browser, path: str) -> list[dict]:
    """The pictures the page posted to `path` since it opened (SPY_ON_UPLOADS), each once measured."""
    script = "return (window.sentImages || []).filter(e => e.url === arguments[0])"
    page.wait(lambda: all(e["size"] is not None for e in page.js(script, path)), message=f"the uploads to {path}")
    return page.js(script, path)


def model_input(page: Browser, name: str) -> np.ndarray:
    """The picture an output shows as what the model saw: a 28×28 PNG in a data: URL."""
    assert page.find(name).tag_name == "img", name
    src = page.wait_image(name)
    assert src.startswith("data:image/png;base64,") and len(src) > len("data:image/png;base64,"), src[:60]
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert image.size == (28, 28), image.size
    return np.asarray(image.convert("L"))


def canvas_png(page: Browser, canvas_id: str) -> bytes:
    """A canvas's pixels, at its full size, as the PNG the page sends."""
    url = page.js("return document.getElementById(arguments[0]).toDataURL('image/png')", canvas_id)
    return base64.b64decode(url.split(",", 1)[1])


def canvas_grey(page: Browser, canvas_id: str) -> np.ndarray:
    """A grey canvas's levels (its red channel), (height, width) uint8."""
    width, height, red = page.js(
        "const c = document.getElementById(arguments[0]);"
        "const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "return [c.width, c.height, Array.from(data.filter((_, i) => i % 4 === 0))];",
        canvas_id,
    )
    return np.array(red, dtype=np.uint8).reshape(height, width)


def assert_mnist_framed(grey: np.ndarray) -> None:
    """The MNIST recipe: the ink's longer side about 20 px, its centre of mass at the centre."""
    ink = grey.astype(np.float64) * (grey >= 64)
    assert ink.sum() > 0, "no ink"
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    side = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    assert 17 <= side <= 22, f"the ink spans {side} px, MNIST's digits 20"
    ys, xs = np.indices(grey.shape)
    cy, cx = (ys * ink).sum() / ink.sum(), (xs * ink).sum() / ink.sum()
    assert abs(cy - 13.5) <= 1.5 and abs(cx - 13.5) <= 1.5, f"centre of mass at ({cy:.1f}, {cx:.1f})"


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def page(server):
    """The playground, opened once at a desktop size; the tests below use it in order."""
    browser = Browser(server.url)
    browser.collect()  # the browser's own start-up pages are not the playground's
    browser.open("/")
    browser.js(SPY_ON_UPLOADS)
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
    script = (STATIC / "app.js").read_text()
    assert "toMnist" not in script, "the page frames no picture itself: the server does"
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
    model_input(page, "fashion-seen")
    page.wait_image("generate-output")
    assert page.natural_size("generate-output") == (122, 122)  # 4×4 images of 28 px, 2 px apart
    page.wait(lambda: re.fullmatch(r"([0-9a-f]{2} ){15}[0-9a-f]{2}", page.text("codec-code")), message="a 16-byte code")
    page.wait_image("codec-output")
    model_input(page, "codec-seen")
    page.wait_image("denoise-output")
    assert page.natural_size("denoise-output") == (28, 28)
    model_input(page, "denoise-seen")
    filled = page.js("return performance.now()")
    print(f"playground: script ready at {ready:.0f} ms, every panel answered by {filled:.0f} ms")


def draw(page: Browser, strokes: list[list[tuple[int, int]]]) -> None:
    """Clear the digits pad and draw with the mouse: each stroke a polyline, in CSS pixels from the centre."""
    page.find("digit-clear").click()
    page.wait_text("digit-result", "–")
    assert page.image("digit-seen") is None, "a cleared pad shows no model input"
    strokes_on(page, page.find("digit-canvas"), strokes)


def strokes_on(page: Browser, canvas, strokes: list[list[tuple[int, int]]]) -> None:
    """Draw on a pad with the mouse: each stroke a polyline, in CSS pixels from the pad's centre."""
    for stroke in strokes:
        actions = ActionChains(page.driver, duration=40)
        actions.move_to_element_with_offset(canvas, *stroke[0]).click_and_hold()
        for (x0, y0), (x1, y1) in zip(stroke, stroke[1:]):
            for t in (0.25, 0.5, 0.75, 1.0):  # several pointer moves per segment, as a hand makes
                actions.move_to_element_with_offset(canvas, round(x0 + t * (x1 - x0)), round(y0 + t * (y1 - y0)))
        actions.release().perform()


def test_a_scribble_is_flagged_out_of_distribution(page):
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
def test_draw_a_digit_and_read_the_answer(page, digit, strokes):
    draw(page, strokes)
    page.wait_text("digit-result", digit)
    page.wait(page.idle, message="the last answer")
    bars = page.js("return [...document.querySelectorAll('#digit-bars li')].map(li => li.textContent)")
    assert len(bars) == 3 and bars[0].startswith(digit), bars
    flag = page.driver.find_element(By.ID, "digit-ood")
    assert flag.is_displayed() and flag.text.startswith("✓ looks like a handwritten digit"), flag.text
    model_input(page, "digit-seen")


def test_the_digits_pad_sends_the_drawing_and_shows_what_the_model_saw(page, server):
    page.wait(page.idle, message="the last answer")  # the 7 drawn above
    assert page.js("return typeof DrawPad === 'function' && !('toMnist' in DrawPad.prototype)")
    sent = sent_to(page, "/classify")[-1]
    width, height = page.js("const c = document.getElementById('digit-canvas'); return [c.width, c.height]")
    assert sent["size"] == [width, height], f"the whole pad, not a framed 28×28 copy: {sent}"
    assert sent["fields"] == {"model": "digits", "top_k": "3", "return_input": "true"}, sent
    seen = model_input(page, "digit-seen")
    assert_mnist_framed(seen)
    drawing = canvas_png(page, "digit-canvas")
    answer = httpx.post(
        server.url + "/classify",
        files={"image": ("7.png", drawing)},
        data={"model": "digits", "top_k": "3", "return_input": "true"},
    ).json()
    assert answer["label"] == "7"
    assert page.image("digit-seen") == f"data:image/png;base64,{answer['input_png']}", "the server's input_png"


def test_type_a_sentence(page):
    box = page.find("sentiment-input")
    box.clear()
    box.send_keys("a dull, lifeless and boring mess")
    page.wait_text("sentiment-result", "negative")
    box.clear()
    box.send_keys("a wonderful, moving and beautifully acted film")
    page.wait_text("sentiment-result", "positive")
    assert "unknown to the model" in page.driver.find_element(By.ID, "sentiment-note").text


def test_fashion_upload_drop_and_samples(page, server, uploads):
    page.find("fashion-upload").send_keys(str(uploads["sneaker"]))
    page.wait_text("fashion-result", "Sneaker")
    page.wait(page.idle, message="the fashion answer")
    assert len(page.driver.find_elements(By.CSS_SELECTOR, "#fashion-bars li")) == 3
    flag = page.driver.find_element(By.ID, "fashion-ood")
    assert flag.is_displayed() and flag.text.startswith("✓ looks like a Fashion-MNIST"), flag.text
    sent = sent_to(page, "/classify")[-1]
    assert sent["bytes"] == uploads["sneaker"].stat().st_size and sent["size"] == [112, 112], "the file as it is"
    model_input(page, "fashion-seen")
    answer = httpx.post(
        server.url + "/classify",
        files={"image": ("sneaker.png", uploads["sneaker"].read_bytes())},
        data={"model": "fashion", "return_input": "true"},
    ).json()
    assert page.image("fashion-seen") == f"data:image/png;base64,{answer['input_png']}"
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
def test_morph_slider(page, server, kind):
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
    answer = httpx.post(server.url + "/generate", json=body)
    assert answer.status_code == 200, answer.text
    frames = answer.json()["images"]
    assert [first, middle, last] == [f"data:image/png;base64,{frames[i]}" for i in (0, 4, 8)]


def test_codec_pad_sends_the_drawing_and_shows_what_the_model_saw(page, server):
    page.driver.find_element(By.ID, "codec-clear").click()
    page.wait_text("codec-code", "–")
    assert page.image("codec-seen") is None and page.image("codec-output") is None
    strokes_on(page, page.driver.find_element(By.ID, "codec-canvas"), [[(-45, -50), (45, -50), (-10, 55)]])  # a 7
    page.wait(lambda: page.text("codec-code") != "–", message="a code for the drawing")
    page.wait_image("codec-output")
    page.wait(page.idle, message="the codec")
    sent = sent_to(page, "/compress")[-1]
    width, height = page.js("const c = document.getElementById('codec-canvas'); return [c.width, c.height]")
    assert sent["size"] == [width, height], f"the whole pad, not a framed 28×28 copy: {sent}"
    assert sent["fields"] == {"return_input": "true"}, sent
    assert_mnist_framed(model_input(page, "codec-seen"))
    expected = httpx.post(
        server.url + "/compress",
        files={"image": ("7.png", canvas_png(page, "codec-canvas"))},
        data={"return_input": "true"},
    ).json()
    assert page.text("codec-code") == base64.b64decode(expected["code"]).hex(" "), "the code POST /compress gives"
    assert page.image("codec-seen") == f"data:image/png;base64,{expected['input_png']}", "the server's input_png"
    stats = page.driver.find_element(By.ID, "codec-stats").text
    assert f"{len(base64.b64decode(expected['input_png']))} bytes of PNG" in stats and "PSNR" in stats, stats


def test_codec_upload(page, server, uploads):
    before = page.text("codec-code")
    page.find("codec-upload").send_keys(str(uploads["seven"]))
    page.wait(lambda: page.text("codec-code") not in (before, "–"), message="a new code")
    page.wait_image("codec-output")
    page.wait(page.idle, message="the codec")
    sent = sent_to(page, "/compress")[-1]
    assert sent["bytes"] == uploads["seven"].stat().st_size and sent["fields"] == {"return_input": "true"}, sent
    expected = httpx.post(
        server.url + "/compress",
        files={"image": ("7.png", uploads["seven"].read_bytes())},
        data={"return_input": "true"},
    ).json()
    assert page.text("codec-code") == base64.b64decode(expected["code"]).hex(" "), "the code POST /compress gives"
    assert page.image("codec-seen") == f"data:image/png;base64,{expected['input_png']}", "the server's input_png"
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
    sent = sent_to(page, "/denoise")[-1]
    assert sent["size"] == [28, 28] and sent["fields"] == {"return_input": "true"}, sent
    seen = model_input(page, "denoise-seen").astype(int)
    noisy_pixels = canvas_grey(page, "denoise-noisy").astype(int)
    assert np.abs(seen - noisy_pixels).max() <= 1, "a 28×28 input reaches the denoiser as it is (X-Model-Input)"


def test_denoise_my_drawing(page):
    """The "Use my drawing" button: the digits pad's drawing goes to the server at its full size,
    the denoiser's own framing makes the clean 28×28 image, and what the model saw is shown."""
    page.wait(page.idle, message="the denoiser")
    before, requests = page.image("denoise-output"), len(sent_to(page, "/denoise"))
    page.driver.find_element(By.ID, "denoise-mine").click()
    page.wait_image("denoise-output", other_than=before)
    page.wait(page.idle, message="the denoiser")
    framing, denoising = sent_to(page, "/denoise")[requests:]
    width, height = page.js("const c = document.getElementById('digit-canvas'); return [c.width, c.height]")
    assert framing["size"] == [width, height] and framing["fields"] == {"return_input": "true"}, framing
    assert denoising["size"] == [28, 28] and denoising["fields"] == {"return_input": "true"}, denoising
    assert_mnist_framed(canvas_grey(page, "denoise-clean"))
    seen = model_input(page, "denoise-seen").astype(int)
    assert np.abs(seen - canvas_grey(page, "denoise-noisy").astype(int)).max() <= 1


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


def test_no_console_errors_and_no_requests_to_other_origins(page):
    page.wait(page.idle, message="every panel to finish")
    errors = unexpected(page.errors())
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


def test_page_asks_for_the_api_key_then_works():
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
        errors = unexpected(browser.errors(), allowed=r"status of 401")  # before the key
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


def test_the_rollout_panel_shows_a_running_rollout_then_its_decision(tmp_path):
    from tests.conftest import EXPORTED
    from tests.service.test_versions import ADMIN, add_version

    models = tmp_path / "exported"
    shutil.copytree(EXPORTED, models, ignore=shutil.ignore_patterns(".status", ".manifest.lock"))
    add_version(models, "digits", "2099-05-01-twin")
    server = Server(env={"DEEPSERVE_EXPORTED_DIR": str(models), "DEEPSERVE_ADMIN_KEY": "admin-secret"})
    browser = Browser(server.url)
    base = f"{server.url}/admin/models/digits"
    try:
        r = httpx.post(f"{base}/candidate", json={"version": "2099-05-01-twin"}, headers=ADMIN, timeout=90)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{base}/rollout", json={"shadow": 1.0, "canary": 0.3}, headers=ADMIN, timeout=30)
        assert r.status_code == 200, r.text
        seven = (FIXTURES / "mnist_test0_label7.png").read_bytes()
        for i in range(12):  # twelve clients: the canary's share answers some, the active version the others
            r = httpx.post(
                server.url + "/classify",
                files={"image": ("7.png", seven, "image/png")},
                headers={"X-Client-Id": f"client-{i}"},
                timeout=30,
            )
            assert r.status_code == 200
        browser.collect()
        browser.open("/")
        # the table is re-rendered every 2 s: read the first row's text in one script (no stale element)
        first_row = lambda: browser.js(
            "const r = document.querySelector('#rollouts-table tbody tr'); return r ? r.innerText : ''"
        )
        browser.wait(lambda: "of " in first_row(), message="the running rollout with its agreement")
        text = first_row()
        assert "digits" in text and "2099-05-01-twin" in text and "shadow 100% · canary 30%" in text, text
        assert "100% of" in text and "running" in text, text  # the twin agrees with the active version
        assert "Updates every 2 s" in browser.text("rollouts-note")
        r = httpx.delete(f"{base}/rollout", headers=ADMIN, timeout=30)
        assert r.status_code == 200, r.text
        browser.wait(lambda: "rolled back" in first_row(), message="the decision, without a reload")
        assert "stopped by an operator" in first_row()
        browser.screenshot(RESULTS / "rollouts.png", 1280)
        errors = unexpected(browser.errors())
        assert not errors, errors
        assert not browser.foreign_requests()
    finally:
        browser.quit()
        server.stop()
