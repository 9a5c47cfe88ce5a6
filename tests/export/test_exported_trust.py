"""The committed classifiers' trust settings, recomputed from the files: printed letters and
symbols the digits detector never saw are flagged, official test images pass, and a refit
starts from the classifier as trained (training.ood_graph.strip_trust)."""

import numpy as np
import onnx
import pytest

from service import preprocessing as pp
from service import tasks
from service.core import load_all
from tests.conftest import EXPORTED
from training import ood_graph, ood_sets, wild
from training.families import FAMILIES


@pytest.fixture(scope="module")
def models():
    _, loaded = load_all(EXPORTED)
    return {n: m for fam in loaded.values() for n, m in fam.models.items()}


def flagged(model, x: np.ndarray) -> np.ndarray:
    """(N, 28, 28) in [0, 1] -> out of distribution, as /classify decides it."""
    return tasks.image_outputs(model, x)[model.meta.ood.output] > model.meta.ood.threshold


def held_out_fonts() -> list[str]:
    fonts = wild.font_files()
    assert fonts, f"no TrueType fonts under {wild.FONT_DIR} (apt-get install fonts-dejavu-core)"
    held = [f for f in fonts if f not in ood_sets.fit_fonts(fonts)]
    assert held, "need a font the glyph term was not fitted on (DejaVu Mono is in fonts-dejavu-core)"
    return held


def test_digits_flags_printed_glyphs_of_held_out_fonts_and_characters(models):
    """Seeds differ from the fit's and the wild suite's; fonts and characters are held out of the fit."""
    digits = models["digits"]
    x = ood_sets.glyph_images(
        ood_sets.HELD_OUT_CHARS, held_out_fonts(), 96, 8100, ("glyph",), digits.meta.preprocessing
    )
    rate = flagged(digits, x).mean()
    assert rate >= FAMILIES["digits"].trust.bars["glyphs_held_out_flagged"][1], rate


def test_digits_flags_letters_printed_like_the_wild_suite(models):
    digits = models["digits"]
    fonts = wild.font_files()
    x = ood_sets.glyph_images(wild.LETTERS + wild.SYMBOLS, fonts, 96, 8200, ("glyph",), digits.meta.preprocessing)
    rate = flagged(digits, x).mean()
    assert rate >= FAMILIES["digits"].trust.bars["wild_letters_symbols_flagged"][1], rate


@pytest.mark.parametrize("name", ["digits", "fashion"])
def test_official_test_images_pass(models, name, mnist500, fashion500):
    images, _ = mnist500 if name == "digits" else fashion500
    rejected = flagged(models[name], pp.scale_pixels(images)).mean()
    assert rejected <= FAMILIES[name].trust.bars["false_reject_rate_test"][1], rejected


def test_digits_other_dataset_noise_and_blank_pages_are_flagged(models, fashion500):
    digits = models["digits"]
    assert flagged(digits, pp.scale_pixels(fashion500[0])).mean() >= 0.99
    assert flagged(digits, ood_sets.noise_images(200)).all()
    assert flagged(digits, ood_sets.blank_images()).all()


def test_stripping_the_trust_nodes_gives_the_classifier_its_logits_back(models, mnist500):
    digits = models["digits"]
    files = EXPORTED / digits.meta.family / digits.version / "digits.onnx"
    full = onnx.load(str(files))
    assert any(n.name == "ood/Outlier" for n in full.graph.node)  # the glyph term is in the served graph
    plain = ood_graph.strip_trust(full)
    assert [o.name for o in plain.graph.output] == ["logits"]
    assert not any(n.name.startswith(ood_graph.PREFIX) for n in plain.graph.node)
    pre = digits.meta.preprocessing
    x = pp.normalize(pp.scale_pixels(mnist500[0][:64]), pre.mean, pre.std)[:, None]
    want = ood_graph.session(full).run(["logits"], {"image": x})[0]
    got = ood_graph.session(plain).run(["logits"], {"image": x})[0]
    np.testing.assert_array_equal(got, want)
