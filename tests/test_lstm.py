import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elmo_jax.lstm import (LSTMState, bidirectional_layer, feature_major_kernels, lstm_layer, stack_directions,
                           token_input_gates, zero_state)
from tests.reference import lstm_run

BATCH, TIME, IN, DIM, PROJ = 3, 7, 5, 6, 5


def _params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"kernel": jax.random.normal(k1, (IN + PROJ, 4 * DIM)) * 0.5,
            "bias": jax.random.normal(k2, (4 * DIM,)) * 0.1,
            "projection": jax.random.normal(k3, (DIM, PROJ)) * 0.5}


def _inputs():
    xs = jax.random.normal(jax.random.key(1), (BATCH, TIME, IN))
    lengths = np.array([7, 4, 1])
    mask = np.arange(TIME)[None, :] < lengths[:, None]
    return xs, jnp.asarray(mask), lengths


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("clip", [None, 0.3])
def test_layer_matches_loop_per_sentence(reverse, clip):
    params = _params(jax.random.key(0))
    xs, mask, lengths = _inputs()
    ys, state = lstm_layer(params, xs, mask, zero_state(BATCH, DIM, PROJ), cell_clip=clip, proj_clip=clip,
                           reverse=reverse)
    for b, n in enumerate(lengths):
        sentence = np.asarray(xs[b, :n], np.float64)
        expected, (h, c) = lstm_run(params, sentence[::-1] if reverse else sentence, clip, clip)
        expected = expected[::-1] if reverse else expected
        np.testing.assert_allclose(ys[b, :n], expected, atol=1e-5)
        assert np.all(np.asarray(ys[b, n:]) == 0)  # padding emits zeros
        np.testing.assert_allclose(state.h[b], h, atol=1e-5)  # padding never changes the state
        np.testing.assert_allclose(state.c[b], c, atol=1e-5)


def test_initial_state_is_used():
    params = _params(jax.random.key(0))
    xs, mask, _ = _inputs()
    start = LSTMState(h=jnp.full((BATCH, PROJ), 0.2), c=jnp.full((BATCH, DIM), -0.4))
    ys, _ = lstm_layer(params, xs, mask, start)
    expected, _ = lstm_run(params, np.asarray(xs[0], np.float64), None, None,
                           h=np.full(PROJ, 0.2), c=np.full(DIM, -0.4))
    np.testing.assert_allclose(ys[0], expected, atol=1e-5)


@pytest.mark.parametrize("fuse_inputs, feature_major, precomputed, split", [
    (False, False, False, False), (True, False, False, False), (True, True, False, False), (False, True, True, False),
    (False, False, False, True), (True, False, False, True), (True, True, False, True)])
def test_bidirectional_layer_equals_two_layers(fuse_inputs, feature_major, precomputed, split):
    """Every step layout (input half hoisted; [x, h] @ kernel; kernel^T @ [x; h] feature-major, its transposed
    weights made here or beforehand; each with the directions batched or split into their own ops) gives two
    lstm_layers' numbers."""
    forward, backward = _params(jax.random.key(0)), _params(jax.random.key(5))
    xs, mask, _ = _inputs()
    xs_back = xs * 2.0
    state = (zero_state(BATCH, DIM, PROJ), LSTMState(jnp.ones((BATCH, PROJ)) * 0.1, jnp.ones((BATCH, DIM)) * 0.1))
    layer = stack_directions(forward, backward)
    if precomputed:
        layer = feature_major_kernels(layer)
        assert layer["kernel_t"].shape == (2, 4 * DIM, IN + PROJ) and layer["projection_t"].shape == (2, PROJ, DIM)
    (fw, bw), (fs, bs) = bidirectional_layer(layer, (xs, xs_back), mask, state, cell_clip=1.0,
                                             fuse_inputs=fuse_inputs, feature_major=feature_major,
                                             split_directions=split)
    fw_ref, fs_ref = lstm_layer(forward, xs, mask, state[0], cell_clip=1.0)
    bw_ref, bs_ref = lstm_layer(backward, xs_back, mask, state[1], cell_clip=1.0, reverse=True)
    for a, b in [(fw, fw_ref), (bw, bw_ref), (fs.h, fs_ref.h), (fs.c, fs_ref.c), (bs.h, bs_ref.h), (bs.c, bs_ref.c)]:
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_backward_aligned_equals_flipped_time_axis():
    """Reversing each sentence within its own length (left-aligned) gives the same backward LM."""
    layer = stack_directions(_params(jax.random.key(0)), _params(jax.random.key(5)))
    xs, mask, lengths = _inputs()
    state = (zero_state(BATCH, DIM, PROJ), zero_state(BATCH, DIM, PROJ))
    (fw, bw), _ = bidirectional_layer(layer, (xs, xs), mask, state, cell_clip=1.0)
    within = np.zeros((BATCH, TIME), np.int32)  # row r, step t reads position lengths[r] - 1 - t
    for r, n in enumerate(lengths):
        within[r, :n] = np.arange(n)[::-1]
    xs_aligned = jnp.take_along_axis(xs, jnp.asarray(within)[..., None], axis=1)
    (fw_a, bw_a), _ = bidirectional_layer(layer, (xs, xs_aligned), mask, state, cell_clip=1.0, backward_aligned=True)
    np.testing.assert_allclose(fw_a, fw, atol=1e-6)
    for r, n in enumerate(lengths):
        np.testing.assert_allclose(bw_a[r, :n][::-1], bw[r, :n], atol=1e-6)
        np.testing.assert_array_equal(bw_a[r, n:], 0.0)


@pytest.mark.parametrize("fuse_inputs, feature_major, split", [
    (True, False, False), (True, True, False), (False, False, True), (True, False, True), (True, True, True)])
def test_step_layouts_agree_through_resets(fuse_inputs, feature_major, split):
    """Packed lanes (backward_aligned, reset flags): the fused and feature-major steps, and the directions split
    into their own ops, give the hoisted, batched step's numbers, state included."""
    layer = stack_directions(_params(jax.random.key(0)), _params(jax.random.key(5)))
    xs, mask, _ = _inputs()
    reset = jnp.asarray(np.arange(TIME)[None, :] % 3 == np.arange(BATCH)[:, None])  # a new sentence every 3 steps
    state = (LSTMState(jnp.ones((BATCH, PROJ)) * 0.2, jnp.ones((BATCH, DIM)) * -0.3), zero_state(BATCH, DIM, PROJ))
    args = (layer, (xs, xs * 0.5), mask, state)
    want = bidirectional_layer(*args, cell_clip=1.0, proj_clip=0.8, backward_aligned=True, reset=reset)
    got = bidirectional_layer(*args, cell_clip=1.0, proj_clip=0.8, backward_aligned=True, reset=reset,
                              fuse_inputs=fuse_inputs, feature_major=feature_major, split_directions=split)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("backward_aligned", [False, True])
def test_looked_up_input_gates_agree(split, backward_aligned):
    """A layer whose inputs are tokens of a table: their input gates looked up from ``token_input_gates``' tables
    (each step multiplies only h_prev) give the numbers of the token vectors themselves, through resets too, the
    directions batched or split."""
    forward, backward = _params(jax.random.key(0)), _params(jax.random.key(5))
    layer = stack_directions(forward, backward)
    vectors = jax.random.normal(jax.random.key(2), (11, IN))  # a table of 11 tokens
    rows = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, BATCH, TIME)), jnp.int32)
    _, mask, _ = _inputs()
    reset = jnp.asarray(np.arange(TIME)[None, :] % 3 == np.arange(BATCH)[:, None]) if backward_aligned else None
    state = (LSTMState(jnp.ones((BATCH, PROJ)) * 0.2, jnp.ones((BATCH, DIM)) * -0.3), zero_state(BATCH, DIM, PROJ))
    kwargs = dict(cell_clip=1.0, proj_clip=0.8, backward_aligned=backward_aligned, reset=reset, split_directions=split)
    want = bidirectional_layer(layer, (vectors[rows[0]], vectors[rows[1]]), mask, state, **kwargs)
    tables = (token_input_gates(forward, vectors), token_input_gates(backward, vectors))
    assert tables[0].shape == (11, 4 * DIM)
    got = bidirectional_layer(layer, (rows[0], rows[1]), mask, state, input_gate_tables=tables, **kwargs)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="batch-major"):
        bidirectional_layer(layer, (rows[0], rows[1]), mask, state, input_gate_tables=tables, feature_major=True)
