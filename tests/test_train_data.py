"""elmo_jax.train.data: bilm-tf's stateful windows, the reversed stream, resumable positions, errors."""

import itertools
import json
import os

import numpy as np
import pytest

from elmo_jax.characters import Vocabulary, token_to_char_ids
from elmo_jax.train.data import CharIdCache, DataError, LMDataset, load_vocabulary, shard_files
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


def test_row_sets_are_slices_of_the_global_batch():
    full = LMDataset(DATA, _vocab(), batch_size=4, unroll_steps=6, seed=2)
    parts = [LMDataset(DATA, _vocab(), batch_size=4, unroll_steps=6, seed=2, rows=rows) for rows in ([0, 3], [1, 2])]
    for whole, *built in itertools.islice(zip(full.batches(), *(p.batches(start=0) for p in parts)), 15):
        for name in whole:
            np.testing.assert_array_equal(whole[name][[0, 3]], built[0][name])
            np.testing.assert_array_equal(whole[name][[1, 2]], built[1][name])
    # each part split and encoded only its own rows' sentences: together, what the whole batch did
    assert parts[0].stats["sentences_encoded"] + parts[1].stats["sentences_encoded"] == \
        full.stats["sentences_encoded"]
    for rows in ([3, 4], [2, 1], [1, 1], []):
        with pytest.raises(DataError, match="rows"):
            LMDataset(DATA, _vocab(), batch_size=4, unroll_steps=6, rows=rows)


def test_char_id_cache_is_bounded_and_leaves_the_batches_unchanged(tmp_path):
    pattern = _shards(tmp_path, [" ".join(f"w{i + j}" for j in range(5)) + "\n" for i in range(40)])
    vocab = Vocabulary(["<S>", "</S>", "<UNK>"] + [f"w{i}" for i in range(20)])
    unbounded = LMDataset(pattern, vocab, batch_size=3, unroll_steps=4, seed=2, char_cache_size=10**6)
    bounded = LMDataset(pattern, vocab, batch_size=3, unroll_steps=4, seed=2, char_cache_size=5)
    uncached = LMDataset(pattern, vocab, batch_size=3, unroll_steps=4, seed=2, char_cache_size=0)
    for whole, small, none in itertools.islice(zip(unbounded.batches(), bounded.batches(), uncached.batches()), 60):
        assert len(bounded.char_cache) <= 5 and len(uncached.char_cache) == 0
        for name in whole:
            np.testing.assert_array_equal(whole[name], small[name])
            np.testing.assert_array_equal(whole[name], none[name])
    assert len(unbounded.char_cache) == 46  # 44 words and <S>, </S>: the bound is what kept the others at 5
    cache = CharIdCache(50, 2)
    for token in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" comes
        np.testing.assert_array_equal(cache.get(token), token_to_char_ids(token))
    assert list(cache._rows) == ["a", "c"]
    with pytest.raises(DataError, match="char_cache_size must be >= 0"):
        LMDataset(pattern, vocab, batch_size=3, unroll_steps=4, char_cache_size=-1)


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


def _varied_shards(tmp_path, n_shards=5, n_sentences=20):
    rng = np.random.default_rng(7)
    texts = ["".join(" ".join(f"w{j}" for j in rng.integers(0, 20, rng.integers(1, 12))) + "\n"
                     for _ in range(n_sentences)) for _ in range(n_shards)]
    return _shards(tmp_path, texts), Vocabulary(["<S>", "</S>", "<UNK>"] + [f"w{i}" for i in range(15)])


def test_cursor_resumes_a_late_position_without_replaying_the_stream(tmp_path):
    pattern, vocab = _varied_shards(tmp_path)
    straight = LMDataset(pattern, vocab, batch_size=3, unroll_steps=4, seed=4)
    batches = straight.batches()
    expected = [next(batches) for _ in range(350)]
    cursor = json.loads(json.dumps(batches.get_state()))  # as a checkpoint stores it
    assert cursor["position"] == 350 and straight.stats["shards_read"] > 25  # six epochs of five shards
    read_before = straight.stats.copy()
    expected += [next(batches) for _ in range(40)]
    for rows in (None, [0, 2], [1]):
        resumed_data = LMDataset(pattern, vocab, batch_size=3, unroll_steps=4, seed=4, rows=rows)
        resumed = resumed_data.batches(state=cursor)
        assert resumed_data.stats["shards_read"] <= len({tuple(r[:2]) for r in cursor["rows"]})  # rows' sentences
        got = [next(resumed) for _ in range(40)]
        # nothing was replayed: what these 40 batches read and encoded, plus the shards and sentences the rows were in
        new = straight.stats - read_before
        assert resumed_data.stats["shards_read"] <= new["shards_read"] + 2
        assert resumed_data.stats["sentences_encoded"] <= new["sentences_encoded"] + 3
        picked = rows if rows is not None else [0, 1, 2]
        for a, b in zip(expected[350:], got):
            assert a.keys() == b.keys()
            for name in a:
                np.testing.assert_array_equal(a[name][picked], b[name])
        assert resumed.get_state() == json.loads(json.dumps(batches.get_state()))


def test_cursor_at_the_end_of_a_single_pass_gives_no_more_batches(tmp_path):
    pattern, vocab = _varied_shards(tmp_path, n_shards=2, n_sentences=5)
    data = LMDataset(pattern, vocab, batch_size=2, unroll_steps=3, shuffle=False, loop=False)
    batches = data.batches()
    n = sum(1 for _ in batches)
    assert n > 3 and batches.get_state()["position"] == n
    halfway = data.batches(start=2).get_state()
    assert len(list(data.batches(state=halfway))) == n - 2
    assert list(data.batches(state=batches.get_state())) == []


def test_cursor_of_other_data_is_refused_naming_the_field_or_file(tmp_path):
    pattern, vocab = _varied_shards(tmp_path)
    data = LMDataset(pattern, vocab, batch_size=3, unroll_steps=4, seed=4)
    batches = data.batches(start=30)
    cursor = batches.get_state()
    with pytest.raises(DataError, match="batch_size=3 but the data has 4"):
        LMDataset(pattern, vocab, batch_size=4, unroll_steps=4, seed=4).batches(state=cursor)
    with pytest.raises(DataError, match="seed=4 but the data has 5"):
        LMDataset(pattern, vocab, batch_size=3, unroll_steps=4, seed=5).batches(state=cursor)
    with pytest.raises(DataError, match="format"):
        data.batches(state={**cursor, "format": 0})
    epoch, shard = cursor["rows"][0][:2]
    name = data.files[data._epoch_order(epoch)[0][shard]]
    with open(name, encoding="utf-8") as f:
        lines = f.readlines()
    with open(name, "w", encoding="utf-8") as f:
        f.writelines(line.rstrip("\n") + " extra\n" for line in lines)
    with pytest.raises(DataError, match=f"{os.path.basename(name)}: shard differs"):
        data.batches(state=cursor)
