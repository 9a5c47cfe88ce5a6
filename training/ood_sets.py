"""The images the trust step is fitted and checked on besides the classifier's own splits:
noise, blank and constant pages, the other dataset, and printed letters and symbols.

Printed glyphs (outlier exposure, training.ood): the Mahalanobis features do not separate a
printed "A" or "&" from a digit, so a logistic term on the same features is fitted on glyphs
rendered from some fonts and characters and checked on the others:

    fit        DejaVu Sans and Serif faces (all weights and slants), two thirds of the characters
    held out   the other characters (every third of wild.LETTERS + wild.SYMBOLS), the other
               fonts on the machine (DejaVu Mono, the math font, anything else installed), and
               optionally a directory of fonts never installed here (--heldout-fonts, e.g.
               Liberation and FreeFont unpacked from their Debian packages)

Every glyph goes through the served decoding and framing (service.images), rendered as
the wild suites render digits (canvas, photo, scan, page, pen widths) or as a printed
character on a canvas (wild.glyph). Seeds are far from the wild suites' (training.wild_eval).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np

from service import images as served
from service import preprocessing as pp
from training import data, wild
from training.families import FAMILIES

GLYPH_CHARS = wild.LETTERS + wild.SYMBOLS
HELD_OUT_CHARS = GLYPH_CHARS[1::3]
FIT_CHARS = "".join(c for c in GLYPH_CHARS if c not in HELD_OUT_CHARS)
GLYPH_MODES = ("glyph", "glyph", *wild.DIGIT_FAMILIES)  # printed on a canvas twice as often
GLYPH_SEED = 9100
GLYPH_N = 6000  # fitted glyphs; each held-out set has GLYPH_N // 6
RUNS = Path(__file__).resolve().parent.parent / "runs"
# fonts never installed on this machine, the strongest held-out check; filled by hand (git-ignored):
#   apt-get download fonts-liberation fonts-freefont-ttf && for d in *.deb; do dpkg -x $d x; done
#   && mkdir -p runs/heldout-fonts && cp x/usr/share/fonts/truetype/*/*.ttf runs/heldout-fonts/
HELDOUT_FONTS = RUNS / "heldout-fonts"


def heldout_fonts(path: Path | None = None) -> Path | None:
    """The extra held-out font directory: `path`, else runs/heldout-fonts when it holds fonts."""
    path = path or HELDOUT_FONTS
    return path if path.is_dir() and any(path.rglob("*.ttf")) else None


def glyph_cache(n: int = GLYPH_N, fonts: Path | None = None) -> Path:
    """Where the glyph sets of `n` fitted glyphs (and the extra held-out fonts) are cached."""
    fonts = heldout_fonts(fonts)
    return RUNS / "wild" / f"glyphs-{n}{'-' + fonts.name if fonts else ''}.npz"


def blank_images(seed: int = 1301) -> np.ndarray:
    """Blank pages, 602 images in [0, 1]: all-black and all-white, then for sensor noise sigma
    in (0.01, 0.02, 0.04) 100 black pages with |N(0, sigma)| and 100 white pages with
    1 - |N(0, sigma)| (the server inverts white pages, so both polarities are covered)."""
    rng = np.random.default_rng(seed)
    pages = [np.zeros((1, 28, 28)), np.ones((1, 28, 28))]
    for sigma in (0.01, 0.02, 0.04):
        noise = np.abs(rng.normal(0.0, sigma, (200, 28, 28)))
        pages += [noise[:100], 1.0 - noise[100:]]
    return np.clip(np.concatenate(pages), 0, 1).astype(np.float32)


def constant_images() -> np.ndarray:
    """Every grey level 0..255 as a flat 28x28 image (256 images)."""
    return np.repeat((np.arange(256, dtype=np.float32) / 255.0)[:, None, None], 28, 1).repeat(28, 2)


def noise_images(n: int = 2000, seed: int = 1302) -> np.ndarray:
    """Uniform noise: every pixel U[0, 1], seeded."""
    return np.random.default_rng(seed).random((n, 28, 28), dtype=np.float32)


OTHER_KEY = {"fashion": "fashion_mnist_test", "mnist": "mnist_test"}  # the other dataset's row names


def ood_sets(name: str, data_dir: Path) -> dict[str, np.ndarray]:
    """The evaluation sets of family `name` (pixels in [0, 1]); the first is its other dataset's
    test split (training.families: `Trust.other`)."""
    other = FAMILIES[name].trust.other
    images, _ = data.load_images(other, "test", data_dir)
    return {
        OTHER_KEY[other]: pp.scale_pixels(images),
        "uniform_noise": noise_images(),
        "blank": blank_images(),
        "constant": constant_images(),
    }


def fit_fonts(fonts: list[str]) -> list[str]:
    """The fonts glyphs are fitted on: DejaVu Sans and Serif faces; the rest are held out."""
    return [f for f in fonts if Path(f).name.startswith(("DejaVuSans", "DejaVuSerif")) and "Mono" not in f]


def _glyph_one(args) -> np.ndarray:
    char, font, seed, mode, pre = args
    upload = wild.glyph_upload(char, font, mode, np.random.default_rng(seed))
    return served.decode(served.probe(upload, "glyph", 1 << 40), pre)


def glyph_images(chars: str, fonts: list[str], n: int, seed: int, modes: tuple[str, ...], pre) -> np.ndarray:
    """n glyphs (random character of `chars`, font of `fonts`; rendering modes cycled), decoded
    and framed as served for preprocessing `pre` -> (n, 28, 28) float32 in [0, 1]."""
    pick = np.random.default_rng(seed)
    jobs = [
        (chars[pick.integers(len(chars))], fonts[pick.integers(len(fonts))], (seed, i), modes[i % len(modes)], pre)
        for i in range(n)
    ]
    with mp.get_context("fork").Pool(max(1, os.cpu_count() or 1)) as pool:
        return np.stack(pool.map(_glyph_one, jobs, chunksize=32))


def glyph_sets(pre, n: int = GLYPH_N, extra_fonts: Path | None = None, cache: Path | None = None) -> dict:
    """{"fit": n glyphs of the fit fonts and characters, "held_out_chars", "held_out_fonts",
    "held_out_both", ["extra_fonts", "extra_fonts_held_out_chars"]: n // 6 each} (see the
    module docstring; `extra_fonts`: default runs/heldout-fonts when present); cached as npz at
    `cache` when given."""
    if cache is not None and cache.is_file():
        z = np.load(cache)
        return {k: z[k] for k in z.files}
    fonts = wild.font_files()
    fit = fit_fonts(fonts)
    held = [f for f in fonts if f not in fit]
    if not fit or not held:
        raise RuntimeError(f"need DejaVu Sans/Serif and other fonts in {wild.FONT_DIR} (apt-get install fonts-dejavu)")
    k = max(1, n // 6)
    out = {
        "fit": glyph_images(FIT_CHARS, fit, n, GLYPH_SEED, GLYPH_MODES, pre),
        "held_out_chars": glyph_images(HELD_OUT_CHARS, fit, k, GLYPH_SEED + 1, ("glyph",), pre),
        "held_out_fonts": glyph_images(FIT_CHARS, held, k, GLYPH_SEED + 2, ("glyph",), pre),
        "held_out_both": glyph_images(HELD_OUT_CHARS, held, k, GLYPH_SEED + 3, ("glyph",), pre),
    }
    extra_fonts = heldout_fonts(extra_fonts)
    extra = sorted(str(p) for p in extra_fonts.rglob("*.ttf")) if extra_fonts else []
    if extra:
        out["extra_fonts"] = glyph_images(GLYPH_CHARS, extra, k, GLYPH_SEED + 4, ("glyph",), pre)
        out["extra_fonts_held_out_chars"] = glyph_images(HELD_OUT_CHARS, extra, k, GLYPH_SEED + 5, ("glyph",), pre)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, **out)
    return out
