"""The error contract: every bad input gets a 4xx JSON body that names the problem."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.conftest import png

DIGIT = png(np.zeros((28, 28), np.uint8))


def image_bytes(fmt: str, mode: str = "L", size=(28, 28), **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 0).save(buf, format=fmt, **save)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG claiming width×height pixels whose first row of zeros compresses
    to a few bytes (a decompression bomb's calling card): it must be refused from the header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


MULTIPART_NO_FILE = {
    "content": b'--zz\r\nContent-Disposition: form-data; name="model"\r\n\r\ndigits\r\n--zz--\r\n',
    "headers": {"content-type": "multipart/form-data; boundary=zz"},
}


def form(*parts, **fields):
    return {"files": list(parts), "data": fields}


CASES = [
    # (id, method, path, request kwargs, status, words the message must contain)
    ("empty file", "/classify", form(("image", ("a.png", b"", "image/png"))), 400, "empty"),
    (
        "text file as image",
        "/classify",
        form(("image", ("a.png", b"hello world", "image/png"))),
        415,
        "not a supported image",
    ),
    ("truncated png", "/classify", form(("image", ("a.png", DIGIT[:40], "image/png"))), 400, "truncated or corrupt"),
    ("pixel bomb header", "/classify", form(("image", ("a.png", png_bomb(50000, 50000), "image/png"))), 413, "pixels"),
    ("no image field", "/classify", MULTIPART_NO_FILE, 400, "no file field 'image'"),
    ("url-encoded form", "/classify", form(model="digits"), 415, "multipart/form-data"),
    (
        "unknown form field",
        "/classify",
        form(("image", ("a.png", DIGIT, "image/png")), modle="digits"),
        400,
        "unknown field 'modle'",
    ),
    (
        "unknown model",
        "/classify",
        form(("image", ("a.png", DIGIT, "image/png")), model="cats"),
        400,
        "does not serve image-classification",
    ),
    (
        "sentiment for an image",
        "/classify",
        form(("image", ("a.png", DIGIT, "image/png")), model="sentiment"),
        400,
        "text goes as JSON",
    ),
    ("digits for text", "/classify", {"json": {"text": "hi", "model": "digits"}}, 400, "images go as multipart"),
    (
        "generator for denoising",
        "/denoise",
        form(("image", ("a.png", DIGIT, "image/png")), model="generator"),
        400,
        "does not serve image-denoising",
    ),
    (
        "unloaded version",
        "/classify",
        form(("image", ("a.png", DIGIT, "image/png")), model_version="1999-01-01-x"),
        404,
        "no loaded version",
    ),
    ("model not a string", "/generate", {"json": {"model": 7}}, 400, "model must be a string"),
    (
        "reject_ood not a bool",
        "/classify",
        {"json": {"text": "hi", "reject_ood": "maybe"}},
        400,
        "reject_ood must be true or false",
    ),
    (
        "top_k zero",
        "/classify",
        form(("image", ("a.png", DIGIT, "image/png")), top_k="0"),
        400,
        "top_k must be between 1 and 10",
    ),
    (
        "top_k not a number",
        "/classify",
        form(("image", ("a.png", DIGIT, "image/png")), top_k="three"),
        400,
        "top_k must be an integer",
    ),
    (
        "image as text field",
        "/classify",
        {"data": {"image": "not a file"}, "files": [("x", ("x", b"", "text/plain"))]},
        400,
        "field 'image' must be a file part",
    ),
    (
        "plain text body",
        "/classify",
        {"content": b"hi", "headers": {"content-type": "text/plain"}},
        415,
        "multipart/form-data",
    ),
    ("empty text", "/classify", {"json": {"text": ""}}, 400, "empty or only whitespace"),
    ("whitespace text", "/classify", {"json": {"text": " \n\t "}}, 400, "empty or only whitespace"),
    ("text not a string", "/classify", {"json": {"text": 5}}, 400, "text must be a string"),
    ("text and texts", "/classify", {"json": {"text": "a", "texts": ["b"]}}, 400, "exactly one of"),
    ("neither text nor texts", "/classify", {"json": {"top_k": 1}}, 400, "exactly one of"),
    ("texts not a list", "/classify", {"json": {"texts": "abc"}}, 400, "texts must be a list"),
    ("texts empty list", "/classify", {"json": {"texts": []}}, 400, "texts must be a list of 1 to"),
    ("texts item not string", "/classify", {"json": {"texts": ["ok", None]}}, 400, "texts[1] must be a string"),
    ("enormous text", "/classify", {"json": {"text": "a" * 20001}}, 413, "limit is 20000"),
    ("json array body", "/classify", {"json": ["hi"]}, 400, "JSON object"),
    (
        "broken json",
        "/generate",
        {"content": b'{"n": 1', "headers": {"content-type": "application/json"}},
        400,
        "not valid JSON",
    ),
    ("json without content type", "/generate", {"content": b'{"n": 1}'}, 415, "application/json"),
    ("n zero", "/generate", {"json": {"n": 0}}, 400, "n must be between 1 and 64"),
    ("n too large", "/generate", {"json": {"n": 65}}, 400, "n must be between 1 and 64"),
    ("n float", "/generate", {"json": {"n": 2.5}}, 400, "n must be an integer"),
    ("n boolean", "/generate", {"json": {"n": True}}, 400, "n must be an integer"),
    ("digit 10", "/generate", {"json": {"digit": 10}}, 400, "digit must be between 0 and 9"),
    ("digit negative", "/generate", {"json": {"digit": -1}}, 400, "digit must be between 0 and 9"),
    ("digit string", "/generate", {"json": {"digit": "seven"}}, 400, "digit must be an integer"),
    ("seed negative", "/generate", {"json": {"seed": -5}}, 400, "seed must be between 0"),
    (
        "seed huge",
        "/generate",
        {"content": b'{"seed": ' + str(2**70).encode() + b"}", "headers": {"content-type": "application/json"}},
        400,
        "seed must be an integer",
    ),
    ("seed past 2**63", "/generate", {"json": {"seed": 2**63}}, 400, "seed must be between 0"),
    ("bad format", "/generate", {"json": {"format": "gif"}}, 400, "format must be 'png' or 'json'"),
    ("unknown json field", "/generate", {"json": {"count": 3}}, 400, "unknown field(s) ['count']"),
    ("code not base64", "/decompress", {"json": {"code": "!!!!"}}, 400, "not valid base64"),
    ("code wrong length", "/decompress", {"json": {"code": "AAAA"}}, 400, "exactly 16 bytes, got 3"),
    ("code far too long", "/decompress", {"json": {"code": "A" * 5000}}, 400, "too long"),
    ("code missing", "/decompress", {"json": {}}, 400, "code must be a base64 string"),
    ("code a number", "/decompress", {"json": {"code": 123}}, 400, "code must be a base64 string"),
    (
        "two images to compress",
        "/compress",
        form(("image", ("a.png", DIGIT, "image/png")), ("image", ("b.png", DIGIT, "image/png"))),
        400,
        "exactly one image",
    ),
    ("compress json", "/compress", {"json": {"image": "x"}}, 415, "multipart/form-data"),
    (
        "denoise with extra field",
        "/denoise",
        form(("image", ("a.png", DIGIT, "image/png")), top_k="3"),
        400,
        "unknown field 'top_k'",
    ),
    (
        "denoise not an image",
        "/denoise",
        form(("image", ("a.gz", b"\x1f\x8b\x08\x00junk", "image/png"))),
        415,
        "not a supported image",
    ),
    # an attacker's list: parser limits, number edge cases, encodings, names used as paths
    (
        "deeply nested json",
        "/generate",
        {"content": b'{"n": ' + b"[" * 100000 + b"]" * 100000 + b"}", "headers": {"content-type": "application/json"}},
        400,
        "not valid JSON",
    ),
    (
        "5000-digit integer",
        "/generate",
        {"content": b'{"n": ' + b"9" * 5000 + b"}", "headers": {"content-type": "application/json"}},
        400,
        "not valid JSON",
    ),
    (
        "NaN",
        "/generate",
        {"content": b'{"n": NaN}', "headers": {"content-type": "application/json"}},
        400,
        "not valid JSON",
    ),
    (
        "Infinity seed",
        "/generate",
        {"content": b'{"seed": Infinity}', "headers": {"content-type": "application/json"}},
        400,
        "not valid JSON",
    ),
    (
        "json not utf-8",
        "/classify",
        {"content": b'{"text": "\xff\xfe"}', "headers": {"content-type": "application/json"}},
        400,
        "not valid JSON",
    ),
    (
        "model name as a path",
        "/classify",
        form(("image", ("a.png", DIGIT, "image/png")), model="../exported/digits"),
        400,
        "does not serve",
    ),
    (
        "65 images",
        "/classify",
        form(*[("image", (f"{i}.png", DIGIT, "image/png")) for i in range(65)]),
        400,
        "malformed multipart body",
    ),
    (
        "huge form field",
        "/classify",
        form(("image", ("a.png", DIGIT, "image/png")), top_k="1" * 70000),
        400,
        "malformed multipart body",
    ),
    (
        "top_k fraction",
        "/classify",
        form(("image", ("a.png", DIGIT, "image/png")), top_k="2.5"),
        400,
        "top_k must be an integer",
    ),
    (
        "texts over the count limit",
        "/classify",
        {"json": {"texts": ["ok"] * 65}},
        400,
        "texts must be a list of 1 to 64",
    ),
    ("url-safe base64 code", "/decompress", {"json": {"code": "-_-_-_-_-_-_-_-_-_-_-w=="}}, 400, "not valid base64"),
    ("code with a newline", "/decompress", {"json": {"code": "AAAAAAAAAAAA\nAAAAAAAAAAA="}}, 400, "not valid base64"),
    (
        "bad multipart",
        "/classify",
        {"content": b"--zz\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=zz"}},
        400,
        "no file field",
    ),
]


@pytest.mark.parametrize("path, kwargs, status, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_json_4xx(client, path, kwargs, status, words):
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["status"] == status and words in body["error"] and body["request_id"]
    assert "Traceback" not in r.text and "/work/" not in r.text


@pytest.mark.parametrize(
    "fmt, mode, save",
    [
        ("GIF", "P", {}),
        ("BMP", "RGB", {}),
        ("WEBP", "RGB", {}),
        ("TIFF", "I;16", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "P", {"transparency": 0}),
        ("JPEG", "CMYK", {}),
        ("PNG", "1", {}),
    ],
)
def test_odd_but_valid_images_are_accepted(client, mnist500, fmt, mode, save):
    """Each format and mode carries the same digit (a 7, dark on light, 56×56) and gets its label."""
    img = _digit_on_paper(mnist500, 0, (56, 56))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img).astype(np.uint16) * 257)  # 16-bit grey
    elif mode == "1":
        img = img.point(lambda v: 255 if v > 128 else 0).convert("1")
    elif mode == "P" and "transparency" in save:
        img = img.convert("P")  # a palette index the picture does not use is the transparent one
        save = {"transparency": int(np.setdiff1d(np.arange(256), np.asarray(img))[0])}
    else:
        img = img.convert(mode)
    r = client.post("/classify", files={"image": ("x", _save(img, fmt, **save), "image/octet-stream")})
    assert r.status_code == 200, r.text
    assert r.json()["label"] == str(mnist500[1][0]), (fmt, mode, r.json()["label"])


def test_animated_gif_uses_its_first_frame(client, mnist500):
    frames = [Image.fromarray(mnist500[0][i]) for i in (0, 1)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    r = client.post("/classify", files={"image": ("a.gif", buf.getvalue(), "image/gif")})
    assert r.status_code == 200 and r.json()["index"] == mnist500[1][0]


def test_exif_rotation_is_applied(client, mnist500):
    img, label = Image.fromarray(mnist500[0][0]), mnist500[1][0]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buf = io.BytesIO()
    img.rotate(90, expand=True).save(buf, format="JPEG", quality=95, exif=exif)
    r = client.post("/classify", files={"image": ("r.jpg", buf.getvalue(), "image/jpeg")})
    assert r.status_code == 200 and r.json()["index"] == label


@pytest.mark.parametrize(
    "text", ["\x00\x01\x07 a film \x1b[31m", "😍😍 loved it 🎬", "مذهل", "\u202e\u200b great \ufeff", "a" * 19999]
)
def test_odd_but_valid_text_is_classified(client, text):
    r = client.post("/classify", json={"text": text})
    assert r.status_code == 200, r.text
    assert r.json()["label"] in ("positive", "negative")


def test_errors_never_echo_paths_or_environment(client):
    r = client.post(
        "/classify", files={"image": ("../../etc/passwd", b"root:x:0:0", "image/png")}, data={"model": "/etc/passwd"}
    )
    assert r.status_code == 400  # the name is looked up in the registry, never opened
    for body in (r.text, client.post("/generate", json={"n": "x" * 100}).text):
        assert "Traceback" not in body and "/work" not in body and "DEEPSERVE_" not in body


def test_body_over_the_limit_is_413(client):
    r = client.post("/classify", files={"image": ("big.png", b"\x00" * (9 * 1024 * 1024), "image/png")})
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_wrong_method_and_unknown_path(client):
    r = client.get("/classify")
    assert r.status_code == 405 and r.json()["error"]
    r = client.post("/nope")
    assert r.status_code == 404 and r.json()["error"] == "no such path '/nope'; the API is described at /docs.json"
    r = client.get("/" + "x" * 5000)
    assert r.status_code == 404 and len(r.json()["error"]) < 200  # the path is not echoed in full


LONG = "x" * 100_000


@pytest.mark.parametrize(
    "path, kwargs",
    [
        ("/classify", form(("image", ("a.png", DIGIT, "image/png")), model=LONG)),
        ("/classify", form(("image", ("a.png", DIGIT, "image/png")), top_k=LONG[:60_000])),
        ("/classify", form(("image", ("a.png", DIGIT, "image/png")), **{LONG[:5000]: "1"})),
        ("/classify", {"json": {"text": "hi", "model": LONG}}),
        ("/classify", {"json": {"text": "hi", "model_version": LONG}}),
        ("/generate", {"json": {LONG[:50_000] + str(i): 1 for i in range(20)}}),
        ("/generate", {"json": {"format": LONG}}),
        ("/generate", {"json": {"n": LONG}}),
        ("/decompress", {"json": {"code": LONG}}),
        ("/" + LONG[:8000], {}),
    ],
    ids=["model", "top_k", "field name", "json model", "model_version", "json keys", "format", "n", "code", "path"],
)
def test_error_messages_never_echo_unbounded_input(client, path, kwargs):
    r = client.post(path, **kwargs)
    assert 400 <= r.status_code < 500, r.text[:300]
    assert len(r.json()["error"]) < 400, r.json()["error"][:500]


def _digit_on_paper(mnist500, index: int, size: tuple[int, int]) -> Image.Image:
    """A dark digit on light paper, like a photo of a handwritten one."""
    return Image.fromarray(255 - mnist500[0][index]).resize(size, Image.Resampling.BICUBIC)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _frames(mnist500, n: int) -> list[Image.Image]:
    return [Image.fromarray(mnist500[0][i % 10]) for i in range(n)]


ODD_VALID = {
    # a 12 MP phone photo, stored sideways with EXIF "rotate 90° clockwise to display"
    "12 MP JPEG with EXIF rotation": lambda m: _save(
        _digit_on_paper(m, 1, (3000, 4000)).rotate(90, expand=True).convert("RGB"), "JPEG", quality=90, exif=_exif(6)
    ),
    "1-bit fax TIFF (CCITT group 4)": lambda m: _save(
        _digit_on_paper(m, 1, (1728, 1728)).point(lambda v: 255 if v > 128 else 0).convert("1"),
        "TIFF",
        compression="group4",
    ),
    "16-bit greyscale PNG scan": lambda m: _save(Image.fromarray(_np_digit(m, 1).astype(np.uint16) * 257), "PNG"),
    "many-frame GIF (200 frames)": lambda m: _save(
        _frames(m, 201)[1], "GIF", save_all=True, append_images=_frames(m, 201)[2:], duration=20
    ),
    "many-frame TIFF (100 pages)": lambda m: _save(
        _frames(m, 101)[1], "TIFF", save_all=True, append_images=_frames(m, 101)[2:]
    ),
    "animated WebP (50 frames)": lambda m: _save(
        _frames(m, 51)[1], "WEBP", save_all=True, append_images=_frames(m, 51)[2:], duration=20, lossless=True
    ),
    "wide strip with the digit in it": lambda m: _save(_strip(m, 1), "PNG"),
}


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _np_digit(mnist500, index: int) -> np.ndarray:
    return mnist500[0][index]


def _strip(mnist500, index: int) -> Image.Image:
    strip = np.zeros((28, 2000), np.uint8)
    strip[:, 986:1014] = mnist500[0][index]
    return Image.fromarray(strip)


@pytest.mark.parametrize("kind", list(ODD_VALID))
def test_odd_but_valid_uploads_still_work(client, mnist500, kind):
    data = ODD_VALID[kind](mnist500)
    r = client.post("/classify", files={"image": ("x", data, "application/octet-stream")})
    assert r.status_code == 200, r.text
    if kind != "wide strip with the digit in it":  # a 28-px-high strip becomes a 28×0.4-px sliver: no digit left
        assert r.json()["label"] == str(mnist500[1][1]), (kind, r.json()["label"])


def test_sixty_four_ordinary_images_per_request_still_work(client, mnist500):
    files = [
        ("image", (f"{i}.jpg", _save(_digit_on_paper(mnist500, i, (400, 400)).convert("RGB"), "JPEG"), "image/jpeg"))
        for i in range(64)
    ]
    r = client.post("/classify", files=files)
    assert r.status_code == 200 and len(r.json()["results"]) == 64
    labels = [x["label"] for x in r.json()["results"]]
    right = np.mean([label == str(y) for label, y in zip(labels, mnist500[1][:64])])
    assert right >= 0.95, (right, labels)  # photos of digits on paper: framed and read


def test_one_image_over_the_per_image_pixel_limit_is_refused_from_its_header(client):
    """Over the per-image limit (16 M) but under the per-request one (32 M): the image's own
    budget refuses it, from the header, before a pixel is decoded."""
    r = client.post("/classify", files={"image": ("big.png", png_bomb(4100, 4000), "image/png")})
    assert r.status_code == 413, r.text
    body = r.json()
    assert "4100×4000 = 16400000 pixels" in body["error"] and body["limit"] == 16_000_000, body
