"""The sentiment validation split looks like dev: whole sentences the model never saw a piece
of, one half to pick the checkpoint and the other to fit the temperature
(training.sentiment.validation_split). The older "long" split stays reproducible for refits."""

import numpy as np
import pytest

from training.sentiment import validation_split

# SST-2 train in miniature: whole sentences with some of their sub-phrases as rows of their own
SENTENCES = [
    "a gorgeous , witty film",
    "gorgeous , witty",
    "witty film",
    "an utterly pointless exercise in tedium",
    "pointless exercise",
    "in tedium",
    "the cast is superb and the script sings",
    "the cast is superb",
    "the script sings",
    "a dull , lifeless mess",
    "dull",
    "lifeless mess",
    "it 's a charming , funny movie",
    "charming",
    "an overlong and tiresome drama",
    "tiresome drama",
    "the cast",  # inside two whole sentences
    "this is the kind of movie that makes you glad you went to the theater",  # 15 tokens: "long"
    "glad you went",
]
WHOLE = {0, 3, 6, 9, 12, 14, 17}


def phrases(sentence: str) -> set[str]:
    t = sentence.split()
    return {" ".join(t[a:b]) for a in range(len(t)) for b in range(a + 1, len(t) + 1)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_validation_is_whole_sentences_and_training_holds_no_piece_of_them(seed):
    train, select, calibrate = validation_split(SENTENCES, "whole", 4, seed)
    assert len(select) == len(calibrate) == 2
    assert set(select).isdisjoint(calibrate)  # the temperature is not fitted on the checkpoint's judge
    assert set(select) | set(calibrate) <= WHOLE  # never a phrase inside a trained sentence
    held_out = set().union(*(phrases(SENTENCES[i]) for i in np.r_[select, calibrate]))
    assert not {SENTENCES[i] for i in train} & held_out
    # every row that is no piece of a validation sentence is trained on
    assert set(train) == {i for i, s in enumerate(SENTENCES) if s not in held_out}


def test_the_split_is_seeded():
    a = validation_split(SENTENCES, "whole", 4, 0)
    b = validation_split(SENTENCES, "whole", 4, 0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_the_older_long_split_fits_and_selects_on_one_set():
    train, select, calibrate = validation_split(SENTENCES, "long", 2, 0)
    assert np.array_equal(select, calibrate) and list(select) == [17]  # the one row of >= 12 tokens
    assert set(train) == set(range(len(SENTENCES))) - {17, 18}
    with pytest.raises(ValueError, match="unknown sentiment split"):
        validation_split(SENTENCES, "random", 2, 0)
