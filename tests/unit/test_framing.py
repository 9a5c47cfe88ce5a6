"""Subject framing (service.preprocessing): the MNIST and Fashion-MNIST recipes on any picture."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from service import preprocessing as pp
from training import wild


def _frame(data: bytes, framing: str = "digit") -> np.ndarray:
    return pp.to_grey_square(Image.open(io.BytesIO(data)), "auto", framing)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _on_canvas(img28: np.ndarray, size: int, top: int, left: int, height: int, dark_on_light: bool) -> np.ndarray:
    """A test digit scaled to `height` px and pasted on a (size, size) canvas."""
    crop = wild._ink_crop(img28)
    h, w = crop.shape
    up = np.asarray(Image.fromarray(crop).resize((max(1, round(w * height / h)), height), Image.Resampling.BILINEAR))
    canvas = np.zeros((size, size), np.uint8)
    canvas[top : top + up.shape[0], left : left + up.shape[1]] = up
    return 255 - canvas if dark_on_light else canvas


def test_28x28_uploads_pass_through_unchanged(mnist500, fashion500):
    """28×28 is the models' own format: the official test files are used bit for bit."""
    for x in [*mnist500[0][:50], *fashion500[0][:50]]:
        for framing in ("digit", "garment"):
            got = pp.to_grey_square(Image.fromarray(x), "auto", framing)
            np.testing.assert_array_equal(got, pp.to_grey_square(Image.fromarray(x), "auto", "none"))


def test_an_enlarged_28x28_digit_is_framed(mnist500):
    """The same digit as a larger picture that it fills (an enlarged scan) is framed to MNIST's box."""
    x = mnist500[0][0]
    filled = np.asarray(Image.fromarray(wild._ink_crop(x)).resize((56, 56), Image.Resampling.BILINEAR))
    out = pp.to_grey_square(Image.fromarray(filled), "auto", "digit")
    rows = np.flatnonzero(out.max(1) > 0.3)
    assert rows[-1] - rows[0] <= pp.DIGIT_BOX  # back to a 20 px box with margins


@pytest.mark.parametrize("dark_on_light", [True, False])
@pytest.mark.parametrize("where", [(10, 10, 90), (150, 170, 120), (30, 200, 200), (0, 0, 280)])
def test_framing_ignores_position_size_and_polarity(mnist500, dark_on_light, where):
    """The same digit anywhere on a canvas, at any size, dark or light, frames to one 28×28 image
    (the reference: the digit light-on-dark, 100 px tall, in the middle of a 300 px canvas)."""
    images, _ = mnist500
    top, left, height = where
    size = max(300, top + height, left + height)
    corr = []
    for x in images[:20]:
        out = pp.frame_digit(_on_canvas(x, size, top, left, min(height, size - top), dark_on_light))
        ref = pp.frame_digit(_on_canvas(x, 300, 100, 100, 100, False))
        assert out is not None and out.shape == (28, 28) and out.dtype == np.float32
        corr.append(_corr(out, ref))  # a wrong crop (a part of the digit, a box) correlates below 0.3
        cy, cx = pp.centre_of_mass(out)
        assert abs(cy - 13.5) < 1.0 and abs(cx - 13.5) < 1.0  # MNIST: centre of mass at the centre
        rows, cols = np.flatnonzero(out.max(1) > 0.2), np.flatnonzero(out.max(0) > 0.2)
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 in (19, 20, 21)  # longer side 20 px
    assert min(corr) > 0.6 and np.median(corr) > 0.85, np.round(corr, 2)


def test_uneven_light_table_edge_noise_and_jpeg(mnist500):
    """The photo family (dark table in view, slanted light, shadow, noise, JPEG) frames the digit
    as MNIST's own image frames (failures look like a box: correlation near 0)."""
    images, _ = mnist500
    outs = [_frame(b) for b in wild.render("photo", images[:60], 99)]
    corr = np.array([_corr(o, pp.frame_digit(x)) for o, x in zip(outs, images[:60])])
    assert np.median(corr) > 0.8 and np.mean(corr > 0.4) >= 0.95, np.round(np.sort(corr), 2)


@pytest.mark.parametrize(
    "page",
    [
        np.full((280, 280), 255, np.uint8),
        np.full((480, 640), 200, np.uint8),
        np.clip(np.random.default_rng(0).normal(230, 4, (480, 640)), 0, 255).astype(np.uint8),
        np.tile(np.linspace(120, 250, 640, dtype=np.float32), (480, 1)).astype(np.uint8),  # a light gradient
        np.zeros((100, 100), np.uint8),
    ],
)
def test_a_blank_page_is_never_framed_into_a_digit(page):
    assert pp.frame_digit(page) is None
    img = Image.fromarray(page)  # no subject: the whole-picture rule, as for an unframed model
    np.testing.assert_array_equal(pp.to_grey_square(img, "auto", "digit"), pp.to_grey_square(img, "auto", "none"))


@pytest.mark.parametrize("shape", [(29, 33), (110, 37), (64, 64), (300, 200), (28, 100), (480, 640)])
def test_noise_is_never_framed_into_a_digit(shape):
    """Uniform noise of any size has contrast but no structure: no subject, the whole-picture
    rule, which the OOD score flags (a table-like patch of noise must not turn into ink)."""
    for seed in range(5):
        noise = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
        assert pp.frame_digit(noise) is None


@pytest.mark.parametrize("shape", [(1, 1), (1, 5000), (5000, 1), (2, 2), (3, 900), (28, 27), (4000, 3)])
def test_degenerate_shapes_answer_a_28x28_image(shape):
    rng = np.random.default_rng(1)
    for framing in ("digit", "garment"):
        out = pp.to_grey_square(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)), "auto", framing)
        assert out.shape == (28, 28) and out.dtype == np.float32 and 0 <= out.min() <= out.max() <= 1


def test_framing_makes_no_working_copy_larger_than_the_image(mnist500):
    """Memory: every array framing allocates is smaller than the decoded picture itself.
    tracemalloc counts every thread's allocations (under make test's xdist workers, execnet's
    thread receives work meanwhile): framing allocates the same every call and other threads
    only add, so the least of three peaks, after a first call (lazy imports), is framing's."""
    big = _on_canvas(mnist500[0][0], 3000, 500, 900, 1500, True)  # 9 MB of grey pixels
    assert pp.frame_digit(big) is not None
    peaks = []
    for _ in range(3):
        tracemalloc.start()
        try:
            out = pp.frame_digit(big)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert out is not None
    assert min(peaks) < big.nbytes / 3, f"peaks {peaks} bytes for a {big.nbytes}-byte image"


def test_garment_recipe_round_trips_a_fashion_image(fashion500):
    """A Fashion-MNIST image negated onto a white page, small and off-centre, frames back to itself."""
    images, _ = fashion500
    corr = []
    for x in images[:30]:
        page = np.full((400, 300), 255, np.uint8)
        product = 255 - np.asarray(Image.fromarray(x).resize((84, 84), Image.Resampling.BICUBIC))
        page[250:334, 17:101] = product
        out = pp.frame_garment(page)
        assert out is not None
        corr.append(_corr(out, pp.scale_pixels(x)))
    assert np.median(corr) > 0.85 and min(corr) > 0.6
    assert pp.frame_garment(np.full((50, 50), 255, np.uint8)) is None
