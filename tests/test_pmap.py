"""The pure pieces run inside a user's own ``jax.pmap`` and ``shard_map`` code with the same numbers as
the jit-over-mesh path, on 4 simulated CPU devices (tests/conftest.py): the biLM and Elmo, and the
training step (``train_step(..., axis_name=...)``)."""

import functools
import io
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from elmo_jax import batch_to_ids
from elmo_jax.bilm import bilm, stacked_lstm_params
from elmo_jax.elmo import ElmoConfig, elmo
from elmo_jax.options import BiLMOptions
from elmo_jax.scalar_mix import init_scalar_mix
from elmo_jax.sharding import data_mesh
from elmo_jax.train.trainer import Trainer, TrainConfig, TrainState, train_step
from tests.test_train import DATA as TRAIN_DATA
from tests.test_train import TINY as TRAIN_TINY
from tests.test_train import VOCAB as TRAIN_VOCAB

N_DEVICES = 4
SENTENCES = [["The", "cat", "sat", "."], ["A", "dog", "barked", "at", "it", "."], ["Hello", "!"], ["Yes"],
             ["ELMo", "runs", "in", "pmap", "."], ["One", "more", "sentence", "here", "."], ["x"], ["Two", "words"]]


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return batch_to_ids(SENTENCES)  # (8, 6, 50): 2 sentences per device


def _mesh_reference(fn, params, ids):
    """jit over a ("data",) mesh with the batch sharded: the package's own multi-device path."""
    mesh = data_mesh(jax.devices()[:N_DEVICES])
    batch = jax.device_put(ids, NamedSharding(mesh, PartitionSpec("data")))
    return np.asarray(jax.jit(fn)(params, batch))


def _per_device(ids: np.ndarray) -> np.ndarray:
    return ids.reshape(N_DEVICES, -1, *ids.shape[1:])


def test_bilm_forward_under_pmap_and_shard_map(tiny_model, ids):
    options = tiny_model.options
    params = {**tiny_model.params, "lstm": stacked_lstm_params(tiny_model.params["lstm"])}

    def forward(p, x):  # (batch, time, 50) -> (layers, batch, time + 2, dim)
        return bilm(p, options, x)[0].activations

    want = _mesh_reference(forward, params, ids)
    pmapped = jax.pmap(forward, axis_name="batch", in_axes=(None, 0))(params, _per_device(ids))
    got = np.moveaxis(np.asarray(pmapped), 0, 1).reshape(want.shape[0], len(SENTENCES), *want.shape[2:])
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)

    mesh = data_mesh(jax.devices()[:N_DEVICES])
    sharded = jax.jit(jax.shard_map(forward, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec("data")),
                                    out_specs=PartitionSpec(None, "data")))
    np.testing.assert_allclose(np.asarray(sharded(params, ids)), want, atol=1e-6, rtol=0)


def test_elmo_and_its_gradient_under_pmap_with_pmean(tiny_model, ids):
    """A user's data-parallel step: per-device loss on ELMo's mix, gradients averaged with lax.pmean."""
    options, config = tiny_model.options, ElmoConfig(num_output_representations=1, dropout=0.0)
    params = {"bilm": tiny_model.params, "scalar_mix": [init_scalar_mix(options.n_representation_layers)]}

    def loss(p, x):
        out, _ = elmo(p, options, config, x)
        return jnp.mean(out.representations[0] ** 2)

    def device_step(p, x):
        value, grads = jax.value_and_grad(loss)(p, x)
        return jax.lax.pmean(value, "batch"), jax.lax.pmean(grads, "batch")

    value, grads = jax.pmap(device_step, axis_name="batch", in_axes=(None, 0))(params, _per_device(ids))
    # jit over the mesh: the same loss as the mean of the per-device means (equal shards)
    def mesh_loss(p, x):
        return jnp.mean(jax.vmap(loss, in_axes=(None, 0))(p, x.reshape(N_DEVICES, -1, *x.shape[1:])))

    mesh = data_mesh(jax.devices()[:N_DEVICES])
    batch = jax.device_put(ids, NamedSharding(mesh, PartitionSpec("data")))
    want_value, want_grads = jax.jit(jax.value_and_grad(mesh_loss))(params, batch)
    np.testing.assert_allclose(np.asarray(value[0]), np.asarray(want_value), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want), atol=1e-6, rtol=1e-5)
    mix = np.asarray(grads["scalar_mix"][0]["weights"][0])
    assert np.abs(mix).max() > 0  # the mix is actually trained


def test_elmo_under_shard_map(tiny_model, ids):
    options, config = tiny_model.options, ElmoConfig(num_output_representations=2, dropout=0.0)
    params = {"bilm": tiny_model.params,
              "scalar_mix": [init_scalar_mix(options.n_representation_layers, [1.0, 0.0, -1.0]),
                             init_scalar_mix(options.n_representation_layers)]}

    def forward(p, x):
        return jnp.stack(elmo(p, options, config, x)[0].representations)  # (2, batch, time, dim)

    want = _mesh_reference(forward, params, ids)
    mesh = data_mesh(jax.devices()[:N_DEVICES])
    sharded = jax.jit(functools.partial(jax.shard_map, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec("data")),
                                        out_specs=PartitionSpec(None, "data"))(forward))
    np.testing.assert_allclose(np.asarray(sharded(params, ids)), want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- the training loss and step


def _split_rows(tree, n: int = N_DEVICES):
    """(batch, ...) leaves -> (devices, batch / devices, ...): pmap's leading axis."""
    return jax.tree.map(lambda a: np.asarray(a).reshape(n, -1, *a.shape[1:]), tree)


@pytest.mark.parametrize("tied", [False, True])
def test_train_step_under_pmap_and_shard_map_equals_the_mesh_step(tmp_path, tied):
    """train_step(axis_name=...) inside pmap and shard_map (batch and LSTM state split by rows, the rest
    replicated) = the Trainer's jit-over-mesh step on 4 devices: losses, gradient norms, params, optimiser
    state and carried LSTM state after 3 steps, with dropout and the row-sparse softmax update."""
    options = BiLMOptions.from_dict({**TRAIN_TINY, "batch_size": 8, "share_embedding_softmax": tied})
    trainer = Trainer(TrainConfig(options, TRAIN_DATA, TRAIN_VOCAB), tmp_path / "run",
                      devices=jax.devices()[:N_DEVICES], log_stream=io.StringIO())
    start = jax.device_get(trainer.state)
    batches = list(itertools.islice(trainer.dataset.batches(), 3))
    want_metrics = [jax.device_get(trainer.step(batch)) for batch in batches]
    want = jax.device_get(trainer.state)
    vocab_char_ids = None if trainer.vocab_char_ids is None else np.asarray(trainer.vocab_char_ids)
    step = functools.partial(train_step, options=options, optimizer=trainer.optimizer, axis_name="batch")

    def check(got, metrics):
        for name in want_metrics[0]:
            np.testing.assert_allclose([m[name] for m in metrics], [m[name] for m in want_metrics], rtol=1e-5,
                                       err_msg=name)
        for g, w in zip(jax.tree.leaves((got.params, got.opt_state, got.step, got.lstm_state)),
                        jax.tree.leaves((want.params, want.opt_state, want.step, want.lstm_state))):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)

    # pmap: the state's LSTM rows on the leading axis with the batch's, the rest replicated (in_axes None)
    axes = TrainState(None, None, None, 0, None, None)
    pmapped = jax.pmap(step, axis_name="batch", in_axes=(axes, 0, None))
    state = start._replace(lstm_state=_split_rows(start.lstm_state))
    metrics = []
    for batch in batches:
        state, m = pmapped(state, _split_rows(batch), vocab_char_ids)
        for leaf in jax.tree.leaves((state.params, state.opt_state, m)):  # every device applied the same update
            np.testing.assert_array_equal(np.asarray(leaf), np.broadcast_to(np.asarray(leaf)[:1], leaf.shape))
        state = jax.tree.map(lambda a: a[0], state)._replace(lstm_state=state.lstm_state)
        metrics.append(jax.device_get(jax.tree.map(lambda a: a[0], m)))
    state = state._replace(lstm_state=jax.tree.map(lambda a: np.asarray(a).reshape(-1, *a.shape[2:]),
                                                   state.lstm_state))
    check(state, metrics)

    # shard_map over the Trainer's own mesh
    mesh, rows, whole = trainer.mesh, PartitionSpec("data"), PartitionSpec()
    specs = TrainState(whole, whole, whole, rows, whole, whole)
    sharded = jax.jit(jax.shard_map(functools.partial(step, axis_name="data"), mesh=mesh,
                                    in_specs=(specs, rows, whole), out_specs=(specs, whole)))
    state, metrics = start, []
    for batch in batches:
        state, m = sharded(state, batch, vocab_char_ids)
        metrics.append(jax.device_get(m))
    check(jax.device_get(state), metrics)
