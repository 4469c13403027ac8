import json

import h5py
import jax
import numpy as np
import pytest

from elmo_jax.characters import TokenError
from elmo_jax.cli import main
from elmo_jax.embed import Embedder, assemble_rows, plan_blocks
from tests import reference

WORDS = "the bank raised its interest rates . I went to river and deposited money in a very long sentence".split()


def _sentences(n, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.choice(WORDS, size=rng.integers(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def expected(tiny_model):
    sentences = _sentences(24)
    return sentences, [reference.bilm_sentence(tiny_model.params, tiny_model.options, s)[:, 1:-1] for s in sentences]


@pytest.mark.parametrize("batch_size, block_steps, window", [(1, 8, 16), (5, 3, 1), (16, 64, 2), (24, 1, 1)])
def test_batching_blocks_and_order_never_change_the_numbers(tiny_model, expected, batch_size, block_steps, window):
    sentences, want = expected
    embedder = Embedder(model=tiny_model, batch_size=batch_size, block_steps=block_steps, window_batches=window)
    got = list(embedder.embed_sentences(sentences))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_compilations_are_bounded(tiny_model):
    embedder = Embedder(model=tiny_model, batch_size=8)
    list(embedder.embed_sentences(_sentences(200, seed=1)))
    first = embedder.compilations
    # block programs: one per row count (1, 2, 4, 8); token layer: distinct-token buckets 8 short
    # sentences reach (64, 96, 128, 192); gathers: row counts x distinct-token buckets
    assert first <= 4 + 4 + 4 * 4
    list(embedder.embed_sentences(_sentences(200, seed=2)))
    assert embedder.compilations <= first + 2


def test_long_sentence_is_embedded(tiny_model):
    long = (WORDS * 20)[:300]
    got = Embedder(model=tiny_model).embed_sentence(long)
    np.testing.assert_allclose(got, reference.bilm_sentence(tiny_model.params, tiny_model.options, long)[:, 1:-1],
                               atol=1e-5)


def test_output_modes_and_sentence_vectors(tiny_model, expected):
    sentences, want = expected
    embedder = Embedder(model=tiny_model, batch_size=8)
    for mode, reduce in [("top", lambda a: a[-1]), ("average", lambda a: a.mean(0)), ("token", lambda a: a[0]),
                         ([0.2, 0.3, 0.5], lambda a: np.einsum("l,ltd->td", [0.2, 0.3, 0.5], a))]:
        for got, full in zip(embedder.embed_sentences(sentences, mode=mode), want):
            np.testing.assert_allclose(got, reduce(full), atol=1e-5)
    vectors = list(embedder.embed_sentences(sentences, mode="all", sentence_vectors=True))
    np.testing.assert_allclose(vectors[3], want[3].mean(axis=1), atol=1e-5)
    with pytest.raises(ValueError, match="one value per layer"):
        list(embedder.embed_sentences(sentences, mode=[1.0, 0.0]))
    with pytest.raises(ValueError, match="mode must be"):
        list(embedder.embed_sentences(sentences, mode="middle"))


def test_vocabulary_cache_gives_the_same_numbers(tiny_model, expected):
    sentences, want = expected
    embedder = Embedder(model=tiny_model, batch_size=8, vocab=WORDS[:10])
    for got, full in zip(embedder.embed_sentences(sentences), want):
        np.testing.assert_allclose(got, full, atol=1e-5)


def test_multi_device_equals_single_device(tiny_model, expected):
    assert jax.device_count() >= 4, "tests/conftest.py asks for 4 CPU devices"
    sentences, _ = expected
    one = Embedder(model=tiny_model, batch_size=6, devices=jax.devices()[:1])
    four = Embedder(model=tiny_model, batch_size=6, devices=jax.devices()[:4])
    assert four.n_devices == 4
    for a, b in zip(one.embed_sentences(sentences), four.embed_sentences(sentences)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bad_sentences(tiny_model):
    embedder = Embedder(model=tiny_model)
    with pytest.raises(TokenError, match="sentence 1 is empty"):
        list(embedder.embed_sentences([["a"], []]))
    with pytest.raises(TokenError, match="sentence 0, token 1"):
        list(embedder.embed_sentences([["a", None]]))
    got = list(embedder.embed_sentences([["a"], []], allow_empty=True))
    assert got[1].shape == (3, 0, 32)


@pytest.fixture
def cli_args(elmo_tiny):
    return ["--options", str(elmo_tiny / "options.json"), "--weights", str(elmo_tiny / "lm_weights.hdf5"),
            "--no-progress", "--batch-size", "4"]


@pytest.mark.parametrize("flag, shape", [("--all", (3, 5, 32)), ("--top", (5, 32)), ("--average", (5, 32)),
                                         ("--token", (5, 32))])
def test_cli_writes_allennlp_layout(tmp_path, cli_args, flag, shape):
    lines = ["The bank raised rates .", "I went to the river bank .", "Hello"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    assert main(["embed", str(tmp_path / "in.txt"), str(tmp_path / "out.hdf5"), flag, *cli_args]) == 0
    with h5py.File(tmp_path / "out.hdf5", "r") as f:
        assert sorted(f.keys()) == ["0", "1", "2", "sentence_to_index"]
        assert f["0"].shape == shape and f["0"].dtype == np.float32
        assert f["1"].shape[-2] == 7 and f["2"].shape[-2] == 1
        assert json.loads(f["sentence_to_index"][0]) == {line: str(i) for i, line in enumerate(lines)}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_cli_bad_input_leaves_no_output(tmp_path, cli_args, capsys):
    (tmp_path / "empty_line.txt").write_text("a b\n\nc\n")
    assert main(["embed", str(tmp_path / "empty_line.txt"), str(tmp_path / "o.hdf5"), *cli_args]) == 2
    assert "line 2 is empty" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "empty_line.txt"), str(tmp_path / "o.hdf5"), "--empty-lines", "skip",
                 *cli_args]) == 0
    with h5py.File(tmp_path / "o.hdf5", "r") as f:
        assert f["1"].shape == (3, 0, 32) and f["2"].shape == (3, 1, 32)
    (tmp_path / "latin1.txt").write_bytes(b"good line\ncaf\xe9 au lait\n")
    assert main(["embed", str(tmp_path / "latin1.txt"), str(tmp_path / "l.hdf5"), *cli_args]) == 2
    assert "line 2 is not UTF-8" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "missing.txt"), str(tmp_path / "m.hdf5"), *cli_args]) == 2
    assert main(["embed", str(tmp_path / "empty_line.txt"), str(tmp_path / "no_dir" / "x.hdf5"), *cli_args]) == 2
    assert "no_dir" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty_line.txt", "latin1.txt", "o.hdf5"]


def test_interrupted_run_leaves_no_file(tiny_model, tmp_path):
    class Exploding:
        name = "exploding.txt"

        def __iter__(self):
            yield b"a b c\n"
            yield b"d e\n"
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Embedder(model=tiny_model, batch_size=1, window_batches=1).embed_file(Exploding(), tmp_path / "o.hdf5",
                                                                               progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bfloat16_compute_stays_close_to_float32(tiny_model, expected):
    sentences, want = expected
    embedder = Embedder(model=tiny_model, batch_size=8, dtype="bfloat16")
    got = list(embedder.embed_sentences(sentences[:6]))
    assert all(g.dtype == np.float32 for g in got)
    worst = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    scale = max(float(np.abs(w).max()) for w in want[:6])
    assert 0 < worst < 0.05 * scale, (worst, scale)  # bf16 has an 8-bit mantissa: ~1e-2 relative


def test_blocks_drop_finished_rows():
    lengths = [180] + [7] * 100  # one long sentence, then short ones (steps, longest first)
    blocks = plan_blocks(lengths, block_steps=8)
    assert blocks[0] == (0, 104) and all(start == 8 * k for k, (start, _) in enumerate(blocks))
    assert len(blocks) == 23 and all(rows == 1 for _, rows in blocks[1:])  # the long row runs alone
    assert plan_blocks([20, 9, 3], block_steps=8, n_devices=4) == [(0, 4), (8, 4), (16, 4)]


def test_assemble_rows_unreverses_the_backward_half():
    # 2 rows (3 and 1 tokens), 1 layer of width 2 * 1; forward step t = 10 * t, backward step t = -t
    steps = np.arange(8, dtype=np.float32)
    block = np.stack([np.stack([10 * steps, -steps], axis=-1)] * 2)[None]  # (1, rows, steps, 2)
    first, second = assemble_rows([(0, block[..., :4, :]), (4, block[..., 4:, :])], [3, 1], projection_dim=1)
    np.testing.assert_array_equal(first[0], [[10, -3], [20, -2], [30, -1]])
    np.testing.assert_array_equal(second[0], [[10, -1]])


def test_short_tokens_skip_padding_windows_exactly(tiny_model):
    from elmo_jax.bilm import token_embedding
    from elmo_jax.characters import token_to_char_ids
    from elmo_jax.embed import short_token_chars

    words = ["a", "bank", "x" * 13, "y" * 14, "z" * 15, "ÿ" * 7, "€" * 5, "w" * 60]
    embedder = Embedder(model=tiny_model)
    batch = embedder.prepare([words], [0])
    short_chars = short_token_chars(tiny_model.options)
    assert batch.short_char_ids.shape[1] == short_chars < 50
    assert batch.long_char_ids is not None and np.count_nonzero(batch.long_char_ids.any(axis=1)) == 3  # z*15, €*5, w*60
    ids = np.stack([token_to_char_ids(w) for w in words])
    full = token_embedding(tiny_model.params, tiny_model.options, ids)
    short = token_embedding(tiny_model.params, tiny_model.options, ids[:5, :short_chars])
    np.testing.assert_allclose(short, full[:5], atol=1e-6)
    expected = reference.bilm_sentence(tiny_model.params, tiny_model.options, words)[:, 1:-1]
    np.testing.assert_allclose(embedder.embed_sentence(words), expected, atol=1e-5)


def test_cli_repeated_sentence_maps_to_its_last_line_as_allennlp(tmp_path, cli_args):
    (tmp_path / "in.txt").write_text("a b\nc\na b\n")
    assert main(["embed", str(tmp_path / "in.txt"), str(tmp_path / "out.hdf5"), *cli_args]) == 0
    with h5py.File(tmp_path / "out.hdf5", "r") as f:
        assert json.loads(f["sentence_to_index"][0]) == {"a b": "2", "c": "1"}
        assert sorted(f.keys()) == ["0", "1", "2", "sentence_to_index"]
