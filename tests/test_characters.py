import numpy as np
import pytest

from elmo_jax import Vocabulary, batch_to_ids
from elmo_jax.characters import TokenError, boundary_char_ids, token_to_char_ids, tokens_to_char_ids


def test_ascii_token_ids_are_bytes_plus_one_between_word_markers():
    ids = token_to_char_ids("ab")
    assert ids.shape == (50,) and ids.dtype == np.int32
    assert list(ids[:4]) == [259, 98, 99, 260]  # BOW 258 + 1, 'a' 97 + 1, 'b' 98 + 1, EOW 259 + 1
    assert np.all(ids[4:] == 261)  # padding char 260 + 1


def test_multibyte_utf8_and_truncation_to_48_bytes():
    ids = token_to_char_ids("é")
    assert list(ids[:4]) == [259, 0xC3 + 1, 0xA9 + 1, 260]
    long = "x" * 60
    ids = token_to_char_ids(long)
    assert np.all(ids[1:49] == ord("x") + 1) and ids[49] == 260


def test_sentence_boundary_tokens():
    bos, eos = boundary_char_ids()
    assert list(bos[:3]) == [259, 257, 260] and list(eos[:3]) == [259, 258, 260]
    assert np.array_equal(token_to_char_ids("<S>"), bos) and np.array_equal(token_to_char_ids("</S>"), eos)


def test_many_tokens_at_once_are_each_token_s_ids():
    tokens = ["ab", "é", "x" * 60, "<S>", "</S>", "日本語" * 9, "a", "<S>x", "", "€" * 16, "z"]
    for max_chars in (50, 12):
        got = tokens_to_char_ids(tokens, max_chars)
        assert got.shape == (len(tokens), max_chars) and got.dtype == np.int32
        np.testing.assert_array_equal(got, np.stack([token_to_char_ids(t, max_chars) for t in tokens]))
    assert tokens_to_char_ids([]).shape == (0, 50)
    with pytest.raises(TokenError, match="not valid Unicode"):
        tokens_to_char_ids(["a", "a\udcff"])
    with pytest.raises(TokenError, match="must be str"):
        tokens_to_char_ids(["a", 3])


def test_batch_to_ids_pads_with_zero_tokens():
    ids = batch_to_ids([["a", "b", "c"], ["d"]])
    assert ids.shape == (2, 3, 50)
    assert np.all(ids[1, 1:] == 0) and np.all(ids[0] > 0)
    assert np.array_equal(ids[1, 0], token_to_char_ids("d"))


@pytest.mark.parametrize(
    "sentences, message",
    [
        ([], "empty batch"),
        ([["a"], []], "sentence 1 is empty"),
        ([["a", 3]], "token 1"),
        ("a b", "list of lists"),
        ([["a"], "b c"], "sentence 1 must be a list"),
    ],
)
def test_batch_to_ids_rejects_bad_input(sentences, message):
    with pytest.raises(TokenError, match=message):
        batch_to_ids(sentences)


def test_lone_surrogate_is_a_clear_error():
    with pytest.raises(TokenError, match="not valid Unicode"):
        token_to_char_ids("a\udcff")


def test_vocabulary_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("<S>\n</S>\n<UNK>\nthe\ncat\n")
    vocab = Vocabulary.from_file(path)
    assert len(vocab) == 5 and vocab.unk == 2
    assert list(vocab.encode(["the", "dog"])) == [0, 3, 2, 1]
    assert vocab.char_ids().shape == (5, 50)
    (tmp_path / "bad.txt").write_text("the\ncat\n")
    with pytest.raises(TokenError, match="lacks the special tokens"):
        Vocabulary.from_file(tmp_path / "bad.txt")
    with pytest.raises(TokenError, match="not found"):
        Vocabulary.from_file(tmp_path / "missing.txt")
