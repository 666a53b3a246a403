"""envs.vocab: token table, encode / decode round trips, errors."""
import numpy as np
import pytest

from envs import vocab


def test_table():
    assert vocab.size == 64 == len(vocab.TOKENS) == len(set(vocab.TOKENS))
    assert (vocab.PAD, vocab.EOS) == (0, 1)
    assert vocab.TOKENS[vocab.DIGIT_0 + 7] == "7" and vocab.TOKENS[vocab.LETTER_A + 25] == "z"
    for name in ["OBS", "TASK", "SEARCH", "ANSWER", "CALC", "YES", "NO", "ERR", "RESULT", "SEP"]:
        assert vocab.TOKENS[getattr(vocab, name)] == f"<{name.lower()}>"
    assert [vocab.TOKENS[t] for t in (vocab.PLUS, vocab.MINUS, vocab.TIMES, vocab.LESS,
                                      vocab.QUESTION)] == ["+", "-", "*", "<", "?"]


def test_encode_examples():
    assert vocab.encode("<calc> 12 + 7") == [vocab.CALC, vocab.DIGIT_0 + 1, vocab.DIGIT_0 + 2,
                                             vocab.PLUS, vocab.DIGIT_0 + 7]
    assert vocab.encode("  ") == []
    # a '<' that does not open a known tag is the operator
    assert vocab.encode("< 5 ?") == [vocab.LESS, vocab.DIGIT_0 + 5, vocab.QUESTION]
    assert vocab.encode("<foo>") == [vocab.LESS] + [vocab.LETTER_A + ord(c) - 97 for c in "foo"] + [vocab.GREATER]
    assert vocab.encode("<>") == [vocab.LESS, vocab.GREATER]


def test_decode_examples():
    assert vocab.decode(vocab.encode("<obs> <result> a3")) == "<obs> <result> a 3"
    assert vocab.decode(vocab.encode("ab12-3")) == "ab 12 - 3"
    assert vocab.decode([vocab.OBS, vocab.PAD, vocab.YES]) == "<obs> <yes>"
    assert vocab.decode([vocab.OBS, vocab.PAD], skip_pad=False) == "<obs> <pad>"


def test_round_trip_random_ids():
    rng = np.random.default_rng(0)
    for _ in range(500):
        ids = rng.integers(0, vocab.size, rng.integers(0, 20)).tolist()
        assert vocab.encode(vocab.decode(ids, skip_pad=False)) == ids
        assert vocab.encode(vocab.decode(ids)) == [i for i in ids if i != vocab.PAD]


def test_round_trip_text():
    for text in ["<task> ( 12 + 7 ) * 3", "<search> a 3 r <eos>", "<answer> - 42 <eos>",
                 "<obs> 0 , 1 ne", "<summary> x = 1 . <sep>"]:
        assert vocab.decode(vocab.encode(text)) == text


def test_errors():
    with pytest.raises(ValueError, match="'A'"):
        vocab.encode("<calc> A")
    with pytest.raises(ValueError, match="'é'"):
        vocab.encode("é")
    with pytest.raises(ValueError, match="64"):
        vocab.decode([64])
    with pytest.raises(ValueError, match="-1"):
        vocab.decode([-1])
    with pytest.raises(ValueError, match="do not fit"):
        vocab.pad_to([1, 2, 3], 2)
    assert vocab.pad_to([5], 3) == [5, 0, 0]
