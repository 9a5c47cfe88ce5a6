import io

import numpy as np
import pytest
from PIL import Image

from service import preprocessing as pp


@pytest.mark.parametrize(
    "text, tokens",
    [
        (
            "It's a charming, often affecting journey.",
            ["it", "'s", "a", "charming", ",", "often", "affecting", "journey", "."],
        ),
        ("I DON'T like it!!", ["i", "do", "n't", "like", "it", "!"]),
        ("  spaced\tout\n", ["spaced", "out"]),
        ("we'll see \u2014 maybe", ["we", "'ll", "see", "\u2014", "maybe"]),
        ("well-made film", ["well-made", "film"]),
        ("great \U0001f600 movie", ["great", "movie"]),
        (
            "didn\u2019t LOVE it &amp; that\u2019s ok...",
            ["did", "n't", "love", "it", "&", "that", "'s", "ok", ".", ".", "."],
        ),
        ("see http://x.org/a?b=1 or www.y.com now", ["see", "or", "now"]),
        ("<b>bold</b> &quot;move&quot;", ["bold", '"', "move", '"']),
        ("what?!?! no!!!", ["what", "?", "!", "?", "!", "no", "!"]),
        ("", []),
        ("   ", []),
    ],
)
def test_tokenize_matches_sst2_conventions(text, tokens):
    assert pp.tokenize(text) == tokens


def test_tokenize_leaves_sst2_text_as_it_was():
    """SST-2 is already in the conventions: normalization must not change a token of it (the
    vocabulary and the model were built on these tokens)."""
    for text in ["it 's slow -- very , very slow .", "xxx is a blast", "undead * * *", "... the film ( a mess ) ..."]:
        assert pp.tokenize(text) == pp.tokenize(text, normalize=False)


def test_encode_recovers_elongated_words_the_vocabulary_knows():
    index = {"<pad>": 0, "<unk>": 1, "so": 2, "good": 3, "xxx": 4, "boring": 5}
    assert pp.encode(pp.tokenize("Sooooo GOOOOOD"), index) == [2, 3]
    assert pp.encode(pp.tokenize("xxx boriiiing"), index) == [4, 5]
    assert pp.encode(pp.tokenize("zzzz"), index) == [pp.UNK]


def test_encode_maps_unknown_words_and_truncates():
    index = {"<pad>": 0, "<unk>": 1, "good": 2}
    assert pp.encode(["good", "zzz"], index) == [2, pp.UNK]
    assert len(pp.encode(["good"] * 1000, index)) == pp.MAX_TOKENS


def test_pad_batch_right_pads_and_reports_lengths():
    tokens, lengths = pp.pad_batch([[5, 6, 7], [8]])
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert lengths.tolist() == [3, 1]


def test_build_vocab_orders_by_frequency_after_reserved():
    vocab = pp.build_vocab([["b", "a", "b"], ["c"]], min_freq=1)
    assert vocab == ["<pad>", "<unk>", "b", "a", "c"]
    assert pp.build_vocab([["b", "a", "b"]], min_freq=2) == ["<pad>", "<unk>", "b"]


@pytest.mark.parametrize("dim, bits", [(32, 4), (16, 8), (20, 5), (7, 3)])
def test_pack_unpack_round_trip(dim, bits):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1 << bits, size=(9, dim), dtype=np.uint8)
    blobs = pp.pack_codes(codes, bits)
    assert all(len(b) == pp.code_bytes(dim, bits) for b in blobs)
    np.testing.assert_array_equal(pp.unpack_codes(blobs, dim, bits), codes)


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="16 bytes"):
        pp.unpack_codes([b"\x00" * 15], 32, 4)


def test_quantize_dequantize_error_is_half_a_step():
    x = np.linspace(0, 1, 1001, dtype=np.float32)[None]
    err = np.abs(pp.dequantize(pp.quantize(x, 4), 4) - x).max()
    assert err <= 0.5 / 15 + 1e-6


def test_sample_latents_is_deterministic_and_mixes_digits():
    z1, d1 = pp.sample_latents(50, 64, seed=7)
    z2, d2 = pp.sample_latents(50, 64, seed=7)
    np.testing.assert_array_equal(z1, z2)
    np.testing.assert_array_equal(d1, d2)
    assert len(set(d1.tolist())) > 5
    z3, d3 = pp.sample_latents(4, 64, seed=7, digit=3)
    assert d3.tolist() == [3, 3, 3, 3] and z3.dtype == np.float32


def _img(array, mode="L"):
    return Image.fromarray(array).convert(mode)


def test_to_grey_square_keeps_28x28_mnist_pixels_exactly(mnist500):
    x = mnist500[0][0]
    out = pp.to_grey_square(_img(x), invert="auto")
    np.testing.assert_array_equal(pp.to_uint8(out), x)


def test_auto_invert_turns_dark_on_light_into_mnist_style(mnist500):
    x = mnist500[0][0]
    out = pp.to_grey_square(_img(255 - x, "RGB"), invert="auto")
    np.testing.assert_allclose(out, x / 255.0, atol=1 / 255)
    assert pp.to_grey_square(_img(255 - x), invert="none").mean() > 0.5  # not inverted


def test_non_square_images_are_padded_with_background_then_resized():
    wide = np.zeros((20, 80), dtype=np.uint8)
    wide[:, 30:50] = 255
    out = pp.to_grey_square(_img(wide), invert="none")
    assert out.shape == (28, 28)
    assert out[:5].max() == 0 and out[-5:].max() == 0  # padding rows above and below
    assert out[14, 14] > 0.9


def test_alpha_is_composited_over_white_and_16_bit_is_scaled():
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)  # fully transparent -> white
    out = pp.to_grey_square(Image.fromarray(rgba, "RGBA"), invert="none")
    assert out.min() == 1.0
    deep = np.full((28, 28), 65535, dtype=np.uint16)
    img16 = Image.fromarray(deep)
    assert pp.to_grey_square(img16, invert="none").min() == 1.0


def test_png_bytes_are_deterministic_and_decode_back():
    x = np.random.default_rng(1).random((28, 28), dtype=np.float32)
    a, b = pp.png_bytes(x), pp.png_bytes(x.copy())
    assert a == b
    back = np.asarray(Image.open(io.BytesIO(a)))
    np.testing.assert_array_equal(back, pp.to_uint8(x))


def test_psnr_known_values():
    ref = np.zeros((2, 4, 4), dtype=np.float32)
    est = ref.copy()
    est[1] += 0.1
    p = pp.psnr(ref, est)
    assert p[1] == pytest.approx(20.0) and p[0] > 100


def test_softmax_rows_sum_to_one_and_resist_overflow():
    p = pp.softmax(np.array([[1000.0, 0.0], [1.0, 1.0]], dtype=np.float32))
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-6)
    assert p[0, 0] == pytest.approx(1.0) and p[1, 0] == pytest.approx(0.5)
