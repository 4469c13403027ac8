import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from elmo_jax import batch_to_ids
from elmo_jax.elmo import Elmo, ElmoConfig, elmo, remove_sentence_boundaries
from elmo_jax.modules import ElmoModule, FrozenParam
from elmo_jax.scalar_mix import masked_layer_norm, scalar_mix

SENTENCES = [["The", "bank", "raised", "rates", "."], ["River", "bank"]]


@pytest.fixture(scope="module")
def tiny_elmo(elmo_tiny):
    return Elmo.from_hdf5(elmo_tiny / "options.json", elmo_tiny / "lm_weights.hdf5", 2, dropout=0.5,
                          scalar_mix_parameters=[0.5, -1.0, 2.0], vocab_to_cache=["@@PADDING@@", "The", "bank",
                                                                                   "raised", "rates", ".", "River"])


def test_scalar_mix_is_softmax_weighted_sum_times_gamma():
    layers = jax.random.normal(jax.random.key(0), (3, 2, 4, 5))
    params = {"weights": jnp.array([0.1, 2.0, -1.0]), "gamma": jnp.array(1.7)}
    w = np.exp([0.1, 2.0, -1.0]) / np.exp([0.1, 2.0, -1.0]).sum()
    expected = 1.7 * np.einsum("l,lbtd->btd", w, np.asarray(layers))
    np.testing.assert_allclose(scalar_mix(params, layers), expected, rtol=1e-5)


def test_masked_layer_norm_uses_only_unmasked_positions():
    x = jax.random.normal(jax.random.key(1), (2, 4, 3))
    mask = jnp.array([[True, True, True, False], [True, False, False, False]])
    values = np.concatenate([np.asarray(x[0, :3]).ravel(), np.asarray(x[1, :1]).ravel()])
    expected = (np.asarray(x) - values.mean()) / np.sqrt(values.var() + 1e-12)
    np.testing.assert_allclose(masked_layer_norm(x, mask), expected, rtol=1e-4, atol=1e-5)


def test_remove_sentence_boundaries():
    x = jnp.arange(2 * 5, dtype=jnp.float32).reshape(2, 5, 1) + 1
    mask = jnp.array([[True] * 5, [True, True, True, False, False]])  # lengths 3 and 1 plus <S>, </S>
    out, new_mask = remove_sentence_boundaries(x, mask)
    assert np.array_equal(np.asarray(out[..., 0]), [[2, 3, 4], [7, 0, 0]])
    assert np.array_equal(np.asarray(new_mask), [[True] * 3, [True, False, False]])


def test_elmo_representations(tiny_elmo, tiny_model):
    ids = batch_to_ids(SENTENCES)
    out = tiny_elmo(ids)
    assert len(out.representations) == 2 and out.representations[0].shape == (2, 5, 32)
    activations, _ = tiny_model(ids)
    w = np.exp([0.5, -1.0, 2.0]) / np.exp([0.5, -1.0, 2.0]).sum()
    expected = np.einsum("l,lbtd->btd", w, np.asarray(activations.activations))[:, 1:-1]
    expected[1, 2:] = 0
    np.testing.assert_allclose(out.representations[1], expected, atol=1e-6)
    # The vocabulary cache gives the same numbers as the char path.
    words = np.array([[1, 2, 3, 4, 5], [6, 2, 0, 0, 0]])
    cached = tiny_elmo(word_ids=words)
    np.testing.assert_allclose(cached.representations[0], out.representations[0], atol=1e-6)


def test_keep_sentence_boundaries_and_layer_norm(tiny_model):
    config = ElmoConfig(num_output_representations=1, do_layer_norm=True, keep_sentence_boundaries=True)
    params = {"bilm": tiny_model.params, "scalar_mix": [{"weights": jnp.zeros(3), "gamma": jnp.array(1.0)}]}
    out, _ = elmo(params, tiny_model.options, config, jnp.asarray(batch_to_ids(SENTENCES)))
    assert out.representations[0].shape == (2, 7, 32) and out.mask.shape == (2, 7)


def test_dropout_needs_a_key_and_scales(tiny_elmo):
    ids = batch_to_ids(SENTENCES)
    plain = np.asarray(tiny_elmo(ids).representations[0])
    dropped = np.asarray(tiny_elmo(ids, key=jax.random.key(0)).representations[0])
    kept = dropped != 0
    assert 0.3 < kept[plain != 0].mean() < 0.7
    np.testing.assert_allclose(dropped[kept], plain[kept] * 2.0, rtol=1e-5)


def test_gradients_reach_scalar_mix_and_bilm(tiny_elmo):
    ids = jnp.asarray(batch_to_ids(SENTENCES))

    def loss(params):
        out, _ = elmo(params, tiny_elmo.options, tiny_elmo.config, ids, key=jax.random.key(1))
        return sum(jnp.sum(r**2) for r in out.representations)

    grads = jax.grad(loss)(tiny_elmo.params)
    for name, tree in [("scalar_mix", grads["scalar_mix"]), ("lstm", grads["bilm"]["lstm"]),
                       ("char_embed", grads["bilm"]["char_embed"]), ("highway", grads["bilm"]["highway"])]:
        leaves = [np.asarray(g) for g in jax.tree.leaves(tree)]
        assert all(np.isfinite(g).all() for g in leaves), name
        assert any(np.abs(g).max() > 0 for g in leaves), name


def test_nnx_module_matches_elmo_and_trains_only_the_mix(tiny_elmo):
    module = ElmoModule(tiny_elmo.params["bilm"], tiny_elmo.options, tiny_elmo.config,
                        scalar_mix_parameters=[0.5, -1.0, 2.0])
    ids = batch_to_ids(SENTENCES)
    np.testing.assert_allclose(module(ids).representations[1], tiny_elmo(ids).representations[1], atol=1e-6)
    frozen = nnx.to_pure_dict(nnx.state(module, FrozenParam))["bilm"]
    # The module's state has the loader's keys and shapes.
    expected_shapes = jax.tree.map(np.shape, tiny_elmo.params["bilm"])
    as_lists = jax.tree.map(np.shape, frozen)
    as_lists["convolutions"] = [as_lists["convolutions"][i] for i in sorted(as_lists["convolutions"])]
    as_lists["highway"] = [as_lists["highway"][i] for i in sorted(as_lists["highway"])]
    as_lists["lstm"] = {d: [as_lists["lstm"][d][i] for i in sorted(as_lists["lstm"][d])] for d in as_lists["lstm"]}
    assert as_lists == expected_shapes
    before = jax.tree.map(np.asarray, frozen)
    optimizer = nnx.Optimizer(module, optax.adam(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(module, optimizer, ids):
        def loss(module):
            return jnp.sum(module(ids, rngs=nnx.Rngs(dropout=0)).representations[0] ** 2)

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.Param))(module)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction raises an int32 count to a float
            optimizer.update(module, grads)
        return value

    first = step(module, optimizer, ids)
    for _ in range(3):
        last = step(module, optimizer, ids)
    assert last < first
    after = nnx.to_pure_dict(nnx.state(module, FrozenParam))["bilm"]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_bad_calls(tiny_elmo, tiny_model, elmo_tiny):
    with pytest.raises(ValueError, match="char_ids"):
        tiny_elmo()
    with pytest.raises(ValueError, match="vocab_to_cache"):
        tiny_elmo(word_ids=np.array([[1, 99]]))
    with pytest.raises(ValueError, match="num_output_representations"):
        Elmo.from_hdf5(elmo_tiny / "options.json", elmo_tiny / "lm_weights.hdf5", 0)
