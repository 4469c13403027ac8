"""elmo_jax.train.data: bilm-tf's stateful windows, the reversed stream, resumable positions, errors."""

import itertools
import os

import numpy as np
import pytest

from elmo_jax.characters import Vocabulary, token_to_char_ids
from elmo_jax.train.data import DataError, LMDataset, load_vocabulary, shard_files
from tests.conftest import FIXTURES as SHARED_FIXTURES  # ../shared/fixtures or ELMO_JAX_FIXTURES

FIXTURES = str(SHARED_FIXTURES / "train_tiny")
VOCAB = f"{FIXTURES}/vocab.txt"
DATA = f"{FIXTURES}/data.txt"


def _shards(tmp_path, texts):
    for i, text in enumerate(texts):
        (tmp_path / f"shard{i}.txt").write_text(text)
    return str(tmp_path / "shard*.txt")


def _vocab():
    return load_vocabulary(VOCAB)


def test_windows_follow_sentences_in_order(tmp_path):
    vocab = Vocabulary(["<S>", "</S>", "<UNK>", "a", "b", "c"])
    pattern = _shards(tmp_path, ["a b c\nc b\n"])
    data = LMDataset(pattern, vocab, batch_size=1, unroll_steps=3, shuffle=False, loop=False)
    batches = list(data.batches())
    # stream: <S> a b c </S> <S> c b </S>; </S> is only a target, so inputs are <S> a b c <S> c b (7 tokens)
    assert len(batches) == 2  # the third, partial window is dropped (bilm-tf's test mode)
    inputs = np.concatenate([b["token_ids"][0] for b in batches])
    targets = np.concatenate([b["next_token_id"][0] for b in batches])
    np.testing.assert_array_equal(inputs, [0, 3, 4, 5, 0, 5])
    np.testing.assert_array_equal(targets, [3, 4, 5, 1, 5, 4])
    np.testing.assert_array_equal(batches[0]["char_ids"][0, 1], token_to_char_ids("a"))
    np.testing.assert_array_equal(batches[0]["char_ids"][0, 0], token_to_char_ids("<S>"))


def test_reverse_stream_reads_reversed_sentences(tmp_path):
    vocab = Vocabulary(["<S>", "</S>", "<UNK>", "a", "b", "c"])
    pattern = _shards(tmp_path, ["a b c\nc zz b\n"])
    data = LMDataset(pattern, vocab, batch_size=1, unroll_steps=4, shuffle=False, loop=False)
    first, second = list(data.batches())
    # reversed stream: </S> c b a <S> | </S> b zz c <S>: inputs </S> c b a | </S> b <UNK> c, targets shifted
    np.testing.assert_array_equal(first["token_ids_reverse"][0], [1, 5, 4, 3])
    np.testing.assert_array_equal(first["next_token_id_reverse"][0], [5, 4, 3, 0])
    np.testing.assert_array_equal(second["token_ids_reverse"][0], [1, 4, 2, 5])
    np.testing.assert_array_equal(second["next_token_id_reverse"][0], [4, 2, 5, 0])
    np.testing.assert_array_equal(second["char_ids_reverse"][0, 2], token_to_char_ids("zz"))  # chars keep the word
    np.testing.assert_array_equal(first["char_ids_reverse"][0, 0], token_to_char_ids("</S>"))


def test_rows_are_continuous_streams():
    data = LMDataset(DATA, _vocab(), batch_size=3, unroll_steps=4, seed=1)
    batches = list(itertools.islice(data.batches(), 30))
    for row in range(3):
        inputs = np.concatenate([b["token_ids"][row] for b in batches])
        targets = np.concatenate([b["next_token_id"][row] for b in batches])
        # the next input is the target, except after </S>, where the next sentence begins with <S>
        expected = np.where(targets[:-1] == 1, 0, targets[:-1])
        np.testing.assert_array_equal(inputs[1:], expected)
        assert (inputs != 1).all()


def test_start_position_resumes_exactly():
    data = LMDataset(DATA, _vocab(), batch_size=2, unroll_steps=7, seed=3)
    straight = list(itertools.islice(data.batches(), 40))  # several epochs of the 4-sentence shard
    resumed = list(itertools.islice(data.batches(start=23), 17))
    for a, b in zip(straight[23:], resumed):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_row_ranges_are_slices_of_the_global_batch():
    full = LMDataset(DATA, _vocab(), batch_size=4, unroll_steps=6, seed=2)
    halves = [LMDataset(DATA, _vocab(), batch_size=4, unroll_steps=6, seed=2, rows=rows) for rows in ((0, 2), (2, 4))]
    for whole, *parts in itertools.islice(zip(full.batches(), *(h.batches(start=0) for h in halves)), 15):
        for name in whole:
            np.testing.assert_array_equal(whole[name], np.concatenate([p[name] for p in parts]))
    with pytest.raises(DataError, match="rows"):
        LMDataset(DATA, _vocab(), batch_size=4, unroll_steps=6, rows=(3, 5))


def test_epochs_are_shuffled_by_seed(tmp_path):
    pattern = _shards(tmp_path, [f"w{i} w{i}\n" for i in range(6)])
    vocab = Vocabulary(["<S>", "</S>", "<UNK>"] + [f"w{i}" for i in range(6)])

    def order(seed):
        data = LMDataset(pattern, vocab, batch_size=1, unroll_steps=3, seed=seed)
        return [int(b["token_ids"][0, 1]) for b in itertools.islice(data.batches(), 12)]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(0)[:6] != order(0)[6:]  # each epoch has its own order
    assert sorted(order(0)[:6]) == list(range(3, 9))  # one epoch reads every sentence once


def test_empty_glob_names_the_pattern(tmp_path):
    with pytest.raises(DataError, match="nothing-here"):
        shard_files(str(tmp_path / "nothing-here*.txt"))


def test_empty_shard_names_the_file(tmp_path):
    (tmp_path / "a.txt").write_text("a b\n")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(DataError, match="b.txt"):
        shard_files(str(tmp_path / "*.txt"))
    (tmp_path / "b.txt").write_text("\n\n")
    data = LMDataset(str(tmp_path / "b.txt"), _vocab(), batch_size=1, unroll_steps=2, shuffle=False)
    with pytest.raises(DataError, match="b.txt: shard has no sentences"):
        next(data.batches())


def test_vocabulary_errors(tmp_path):
    no_specials = tmp_path / "vocab.txt"
    no_specials.write_text("the\nof\n")
    with pytest.raises(DataError, match="special tokens"):
        load_vocabulary(no_specials)
    with pytest.raises(DataError, match="n_tokens_vocab=100"):
        load_vocabulary(VOCAB, n_tokens_vocab=100)
    with pytest.raises(DataError, match="not found"):
        load_vocabulary(os.path.join(tmp_path, "missing.txt"))
