"""The trust step reads what training.families declares: evaluators, datasets, splits, bars,
thresholds; glyph sets split fonts and characters into fitted and held out."""

import numpy as np
import pytest

from training import evaluate, ood_image, ood_sets, wild
from training.families import FAMILIES


def test_every_family_declares_an_evaluator_that_exists_and_a_dataset():
    for name, family in FAMILIES.items():
        assert callable(getattr(evaluate, family.evaluator)), name
        assert evaluate.EVALUATORS[name] is getattr(evaluate, family.evaluator)
        assert family.dataset in ("mnist", "fashion", "sst2"), name
    for name in ("digits", "fashion"):  # classifier configs take the family's dataset
        assert FAMILIES[name].config().dataset == FAMILIES[name].dataset


def test_trust_bars_cover_the_issue_bars():
    digits = FAMILIES["digits"].trust
    assert digits.glyphs and digits.other == "fashion"
    assert digits.bars["wild_letters_symbols_flagged"][:2] == (">=", 0.90)
    assert digits.bars["glyphs_held_out_flagged"][:2] == (">=", 0.90)
    assert digits.bars["false_reject_rate_test"][:2] == ("<=", 0.05)
    assert FAMILIES["fashion"].trust.bars["false_reject_rate_test"][:2] == ("<=", 0.05)
    assert FAMILIES["sentiment"].trust.bars["ece_dev"][:2] == ("<=", 0.04)
    assert not FAMILIES["generator"].trust


def test_splits_come_from_the_model_metadata_else_the_family():
    family = FAMILIES["digits"]
    assert ood_image.splits(family, {"training": {"config": {"n_val": 123, "seed": 4}}}) == (123, 4)
    assert ood_image.splits(family, {}) == (family.config().n_val, family.config().seed)


@pytest.mark.parametrize(("official_rate", "expected"), [(0.5, 95.0), (0.99, 99.0)])
def test_threshold_is_the_larger_of_the_two_pass_rates(official_rate, expected, monkeypatch):
    import dataclasses

    family = FAMILIES["fashion"]
    family = dataclasses.replace(family, trust=dataclasses.replace(family.trust, official_pass_rate=official_rate))
    scores = np.arange(1.0, 201.0)  # the first 100 official (1..100), the rest wild renderings
    official = np.arange(200) < 100
    t = ood_image.threshold_for(scores, official, family, 0.475)  # 47.5% of all = score 95
    assert t == expected


def test_glyph_characters_and_fonts_are_split_without_overlap():
    assert set(ood_sets.FIT_CHARS).isdisjoint(ood_sets.HELD_OUT_CHARS)
    assert set(ood_sets.FIT_CHARS) | set(ood_sets.HELD_OUT_CHARS) == set(wild.LETTERS + wild.SYMBOLS)
    fonts = ["/f/DejaVuSans.ttf", "/f/DejaVuSerif-Bold.ttf", "/f/DejaVuSansMono.ttf", "/f/DejaVuMathTeXGyre.ttf"]
    assert ood_sets.fit_fonts(fonts) == fonts[:2]


def test_a_glyph_upload_is_framed_like_a_digit():
    from service.metadata import ImagePre

    fonts = wild.font_files()
    assert fonts, f"no TrueType fonts under {wild.FONT_DIR} (apt-get install fonts-dejavu-core)"
    pre = ImagePre(kind="image", size=28, scale="pixels/255", invert="auto", framing="digit")
    x = ood_sets.glyph_images("A&", fonts[:1], 8, 1, ("glyph", "photo", "scan", "canvas"), pre)
    assert x.shape == (8, 28, 28) and x.dtype == np.float32
    ink = x > 0.5
    assert ink.any(axis=(1, 2)).all()  # every glyph framed to visible ink
    for g in ink:  # the longer side scaled to MNIST's 20 px box (centre of mass centred, so it may shift)
        assert max(g.any(1).sum(), g.any(0).sum()) <= 21
