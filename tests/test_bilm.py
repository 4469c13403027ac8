import json

import h5py
import jax
import numpy as np
import pytest

from elmo_jax import BiLM, BiLMOptions, StatefulBiLM, batch_to_ids, init_params
from tests import reference

SENTENCES = [["The", "cat", "sat", "."], ["Dogs", "bark"], ["A", "very", "long", "sentence", "indeed", "with",
                                                              "naïve", "tokens", "!"]]


def test_golden_stateful_parity_with_bilm_tf(elmo_tiny, tiny_model):
    """bilm-tf's outputs: batch i = sentence i of each of the 3 lists, batches run in order 0..9, state carried."""
    sentences = json.loads((elmo_tiny / "sentences.json").read_text())
    stateful = StatefulBiLM(tiny_model, max_batch_size=3)
    worst = 0.0
    for i in range(10):
        batch = [sentences[k][i].split() for k in range(3)]
        activations = np.asarray(stateful(batch_to_ids(batch)).activations)
        for k in range(3):
            with h5py.File(elmo_tiny / f"lm_embeddings_{k}.hdf5", "r") as f:
                expected = f[str(i)][...]  # (2, n_tokens, 16): forward, backward of the top layer
            expected = np.concatenate([expected[0], expected[1]], axis=-1)
            n = len(batch[k])
            worst = max(worst, float(np.abs(activations[2, k, 1 : n + 1] - expected).max()))
    assert worst <= 1e-5, worst


def test_golden_token_embeddings(elmo_tiny, tiny_model):
    words = (elmo_tiny / "vocab_test.txt").read_text().strip().split("\n")
    with h5py.File(elmo_tiny / "elmo_token_embeddings.hdf5", "r") as f:
        expected = f["embedding"][...]
    np.testing.assert_allclose(tiny_model.embed_vocabulary(words, batch_size=128), expected, atol=1e-5)


def test_stateless_matches_reference_whatever_the_batch(tiny_model):
    """A sentence's activations depend neither on its batch neighbours nor on padding."""
    expected = [reference.bilm_sentence(tiny_model.params, tiny_model.options, s) for s in SENTENCES]
    for batch in ([SENTENCES[0]], SENTENCES, SENTENCES[::-1], [SENTENCES[0]] * 5 + [SENTENCES[2]]):
        out, _ = tiny_model(batch_to_ids(batch))
        assert out.activations.shape == (3, len(batch), max(map(len, batch)) + 2, 32)
        for row, sentence in enumerate(batch):
            n = len(sentence) + 2
            want = expected[SENTENCES.index(sentence)]
            np.testing.assert_allclose(out.activations[:, row, :n], want, atol=1e-5)
            assert np.all(np.asarray(out.activations[:, row, n:]) == 0)
            assert np.asarray(out.mask[row]).sum() == n


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_options_are_honoured(skip, activation):
    """use_skip_connections false (which AllenNLP refuses) and tanh filters against the loop reference."""
    options = BiLMOptions.from_dict({
        "lstm": {"dim": 12, "projection_dim": 6, "n_layers": 3, "cell_clip": 2, "proj_clip": 2,
                 "use_skip_connections": skip},
        "char_cnn": {"embedding": {"dim": 3}, "filters": [[1, 4], [3, 5]], "n_highway": 2, "activation": activation},
    })
    params = init_params(options, jax.random.key(3))
    model = BiLM(params, options)
    out, _ = model(batch_to_ids(SENTENCES))
    for row, sentence in enumerate(SENTENCES):
        want = reference.bilm_sentence(params, options, sentence)
        np.testing.assert_allclose(out.activations[:, row, : len(sentence) + 2], want, atol=1e-5)
    if not skip:
        with_skip = BiLM(params, options.replace(lstm=options.lstm.__class__(12, 6, 3, 2.0, 2.0, True)))
        other, _ = with_skip(batch_to_ids(SENTENCES))
        np.testing.assert_allclose(other.activations[:2], out.activations[:2], atol=1e-6)  # layers below the skip
        assert np.abs(np.asarray(other.activations[2:] - out.activations[2:])).max() > 1e-2


def test_stateful_rows_beyond_a_smaller_batch_keep_their_state(tiny_model):
    stateful = StatefulBiLM(tiny_model, max_batch_size=3)
    stateful(batch_to_ids(SENTENCES))
    before = jax.tree.map(np.asarray, stateful.state)
    stateful(batch_to_ids([["Hello", "world"]]))
    after = jax.tree.map(np.asarray, stateful.state)
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        assert np.array_equal(old[1:], new[1:]) and not np.array_equal(old[0], new[0])
    # Carried state changes the numbers; reset() gives the stateless ones back.
    stateless, _ = tiny_model(batch_to_ids(SENTENCES))
    carried = stateful(batch_to_ids(SENTENCES))
    assert np.abs(np.asarray(carried.activations[1] - stateless.activations[1])).max() > 1e-4
    stateful.reset()
    np.testing.assert_allclose(stateful(batch_to_ids(SENTENCES)).activations, stateless.activations, atol=1e-6)
    with pytest.raises(ValueError, match="max_batch_size"):
        stateful(batch_to_ids(SENTENCES * 2))


def test_bad_char_ids(tiny_model):
    with pytest.raises(ValueError, match="shape"):
        tiny_model(np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="empty"):
        tiny_model(np.zeros((0, 3, 50), np.int32))


def test_char_cnn_long_token_bound_gives_the_full_values_and_gradients(tiny_model):
    """The training step's char CNN: short tokens over their first positions, up to a bound of long ones
    over all; values and gradients equal the full convolution's."""
    import jax.numpy as jnp

    from elmo_jax.char_cnn import char_cnn, long_tokens
    from elmo_jax.characters import token_to_char_ids
    from elmo_jax.train.trainer import long_token_bound

    words = ["a", "bank", "x" * 13, "y" * 14, "z" * 15, "ÿ" * 7, "€" * 5, "w" * 60, "The", "."]
    ids = np.stack([token_to_char_ids(w) for w in words])
    assert long_tokens(ids).tolist() == [False] * 4 + [True, False, True, True, False, False]
    activation = tiny_model.options.char_cnn.activation

    def loss(params, bound):
        return jnp.sum(jnp.sin(char_cnn(params, jnp.asarray(ids), activation, bound)))

    full = char_cnn(tiny_model.params, ids, activation)
    for bound in (3, 8):  # exactly the long tokens, and spare slots
        np.testing.assert_allclose(char_cnn(tiny_model.params, ids, activation, bound), full, atol=1e-6)
        grads, expected = jax.grad(loss)(tiny_model.params, bound), jax.grad(loss)(tiny_model.params, None)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # In groups (a device's rows each), each group's long tokens are bounded and picked apart: words 0-4 hold 1
    # long token, 5-9 hold 2.
    for bound in (2, 3):
        np.testing.assert_allclose(char_cnn(tiny_model.params, ids, activation, bound, long_token_groups=2), full,
                                   atol=1e-6)
    grouped = jax.grad(lambda p: jnp.sum(jnp.sin(char_cnn(p, jnp.asarray(ids), activation, 2, 2))))(tiny_model.params)
    for got, want in zip(jax.tree.leaves(grouped), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The trainer's bound: 1/16 of a batch's tokens (at least 8), or None when more are long.
    short_batch = np.tile(ids[0], (8, 16, 1))  # (batch, unroll_steps, max_chars)
    batch = {"char_ids": short_batch.copy(), "char_ids_reverse": short_batch.copy()}
    assert long_token_bound(batch) == 16  # 2 streams x 8 x 16 = 256 tokens, none long
    batch["char_ids"][0] = ids[7]  # 16 long tokens: still within the bound
    assert long_token_bound(batch) == 16
    assert long_token_bound(batch, np.arange(8) // 4, 2) is None  # rows 0-3 hold all 16: over 128 // 16 = 8
    batch["char_ids_reverse"][0, 0] = ids[7]
    assert long_token_bound(batch) is None
