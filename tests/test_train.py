"""elmo_jax.train: the loss, training reduces perplexity, exact resume, multi-device equality, export, errors."""

import argparse
import dataclasses
import functools
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from elmo_jax import BiLM, batch_to_ids, bilm, token_embedding
from elmo_jax.characters import BOS_TOKEN, EOS_TOKEN, token_to_char_ids
from elmo_jax.options import BiLMOptions
from elmo_jax.train import commands
from elmo_jax.train import trainer as trainer_module
from elmo_jax.train.data import DataError, load_vocabulary
from elmo_jax.train.evaluate import export, load_run, perplexity
from elmo_jax.train.loss import (
    expected_count,
    full_softmax_loss,
    init_softmax,
    initial_lm_state,
    lm_outputs,
    log_uniform_probs,
    sample_candidates,
    sampled_softmax_loss,
    softmax_candidates,
    softmax_rows,
    vocabulary_softmax,
)
from elmo_jax.train.trainer import (
    BoundedBatches,
    RowSparse,
    TrainConfig,
    Trainer,
    TrainError,
    _init_fn,
    _make_optimizer,
    _optimizer_settings,
    apply_updates,
    dense_train_step,
    initialize_distributed,
    load_config,
    long_token_bound,
    train_step,
)
from tests.conftest import FIXTURES as SHARED_FIXTURES  # ../shared/fixtures or ELMO_JAX_FIXTURES

FIXTURES = str(SHARED_FIXTURES / "train_tiny")
DATA, VOCAB = f"{FIXTURES}/data.txt", f"{FIXTURES}/vocab.txt"
N_VOCAB = 32

TINY = {
    "char_cnn": {"embedding": {"dim": 4}, "filters": [[1, 4], [2, 8]], "n_highway": 1, "activation": "relu"},
    "lstm": {"dim": 32, "projection_dim": 8, "n_layers": 2, "cell_clip": 3.0, "proj_clip": 3.0,
             "use_skip_connections": True},
    "n_tokens_vocab": N_VOCAB, "unroll_steps": 5, "batch_size": 4, "n_negative_samples_batch": 8, "dropout": 0.1,
    "all_clip_norm_val": 10.0,
}


def _config(**changes):
    return TrainConfig(BiLMOptions.from_dict(TINY), DATA, VOCAB, **changes)


def _params_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained 1200 steps on train_tiny, with the full-softmax training perplexity before and after."""
    run_dir = tmp_path_factory.mktemp("run")
    trainer = Trainer(_config(n_steps=1200, log_every=400, checkpoint_every=1200), run_dir,
                      devices=jax.devices()[:1], log_stream=io.StringIO())
    vocab = load_vocabulary(VOCAB, N_VOCAB)
    before = perplexity(jax.device_get(trainer.state.params), trainer.options, DATA, vocab, batch_size=4,
                        unroll_steps=5)
    history = trainer.train()
    after = perplexity(jax.device_get(trainer.state.params), trainer.options, DATA, vocab, batch_size=4,
                       unroll_steps=5)
    return trainer, run_dir, before, after, history


# ---------------------------------------------------------------- (f) the loss


def test_log_uniform_probs_sum_to_one_and_decrease():
    p = np.asarray(log_uniform_probs(793471), np.float64)
    assert abs(p.sum() - 1.0) < 1e-4
    assert (np.diff(p) < 0).all()
    np.testing.assert_allclose(p[:2], np.log([2, 1.5]) / np.log(793472), rtol=1e-5)


def test_sampler_draws_distinct_ids_with_counts():
    ids, tries = sample_candidates(jax.random.key(0), 1000, 50)
    ids = np.asarray(ids)
    assert len(set(ids.tolist())) == 50 and ids.min() >= 0 and ids.max() < 1000
    assert int(tries) >= 50
    counts = np.asarray(expected_count(jnp.asarray(ids), tries, 1000, 50))
    assert ((counts > 0) & (counts <= 1)).all()
    # Frequent ids are sampled more often: over many draws id 0 is nearly always a candidate, id 999 rarely.
    many, _ = jax.vmap(lambda k: sample_candidates(k, 1000, 50))(jax.random.split(jax.random.key(5), 200))
    hits = np.bincount(np.asarray(many).ravel(), minlength=1000)
    assert hits[0] > 190 and hits[999] < 20


def test_sampled_softmax_equals_full_softmax_when_negatives_cover_the_vocabulary():
    keys = jax.random.split(jax.random.key(1), 3)
    hidden = jax.random.normal(keys[0], (12, 8))
    w, b = jax.random.normal(keys[1], (20, 8)), jax.random.normal(keys[2], (20,))
    labels = jnp.arange(12) % 20

    @jax.jit
    def both(hidden, labels, w, b):
        sampled, tries = sample_candidates(jax.random.key(2), 20, 20)
        sampled_loss = sampled_softmax_loss(hidden, labels, w[labels], b[labels], sampled, w[sampled], b[sampled],
                                            expected_count(labels, tries, 20, 20),
                                            expected_count(sampled, tries, 20, 20))
        return sampled_loss, full_softmax_loss(hidden, labels, w, b)

    sampled_loss, full_loss = both(hidden, labels, w, b)
    np.testing.assert_allclose(sampled_loss, full_loss, rtol=1e-5, atol=1e-5)


def test_sampled_softmax_removes_accidental_hits_and_subtracts_log_q():
    hidden = np.array([[1.0, -2.0], [0.5, 0.5]], np.float32)
    w = np.array([[0.3, 0.1], [-0.2, 0.4], [1.0, 1.0], [0.0, -1.0]], np.float32)
    b = np.array([0.1, -0.1, 0.2, 0.0], np.float32)
    labels, sampled = np.array([2, 1]), np.array([1, 3])
    q_true, q_sampled = np.array([0.5, 0.25]), np.array([0.25, 0.125])
    got = sampled_softmax_loss(*map(jnp.asarray, (hidden, labels, w[labels], b[labels], sampled, w[sampled],
                                                  b[sampled], q_true, q_sampled)))
    expected = []
    for i in range(2):
        true = hidden[i] @ w[labels[i]] + b[labels[i]] - np.log(q_true[i])
        negatives = [hidden[i] @ w[s] + b[s] - np.log(q) for s, q in zip(sampled, q_sampled) if s != labels[i]]
        logits = np.array([true, *negatives])
        expected.append(np.log(np.exp(logits).sum()) - true)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_tied_softmax_uses_the_token_embeddings_of_the_vocabulary(trained):
    options = BiLMOptions.from_dict({**TINY, "share_embedding_softmax": True})
    softmax = init_softmax(options, jax.random.PRNGKey(0))
    assert set(softmax) == {"b"}  # no separate weights to train
    params = {**jax.device_get(trained[0].state.params), "softmax": softmax}
    vocab_char_ids = jnp.asarray(load_vocabulary(VOCAB).char_ids())
    ids = jnp.array([0, 5, 31])
    rows = jax.jit(softmax_rows, static_argnums=1)(params, options, ids, vocab_char_ids)
    expected = jax.jit(token_embedding, static_argnums=1)(params, options, vocab_char_ids[ids])
    np.testing.assert_array_equal(rows, expected)
    with pytest.raises(ValueError, match="vocab_char_ids"):
        softmax_rows(params, options, ids, None)


# ---------------------------------------------------------------- (g) the row-sparse softmax update


@pytest.mark.parametrize("tied, clip_norm, n_devices, shard_softmax", [
    (False, 0.05, 1, False), (False, None, 4, False), (True, 0.05, 4, False), (True, 0.05, 4, True)])
def test_row_sparse_update_equals_the_dense_optax_update(tmp_path, tied, clip_norm, n_devices, shard_softmax):
    """Several steps of the trainer (row-sparse softmax gradient and Adagrad) = the dense gradient + optax; also
    with the (tied: bias only) softmax split by rows over the devices."""
    options = BiLMOptions.from_dict({**TINY, "share_embedding_softmax": tied})
    config = TrainConfig(options, DATA, VOCAB, clip_norm=clip_norm, shard_softmax=shard_softmax)
    trainer = Trainer(config, tmp_path / "run", devices=jax.devices()[:n_devices], log_stream=io.StringIO())
    assert ("W" in trainer.state.params["softmax"]) is not tied
    reference = jax.device_get(trainer.state)
    dense_step = jax.jit(functools.partial(dense_train_step, options=options, settings=_optimizer_settings(config)))
    batches = trainer.dataset.batches()
    duplicates = overlaps = 0
    for _ in range(4):
        batch = next(batches)
        candidates = softmax_candidates(options, batch, jax.random.fold_in(reference.key, reference.step))
        labels = np.asarray(candidates.labels)
        duplicates += sum(len(np.unique(row)) < row.size for row in labels)
        overlaps += sum(np.isin(row, s).any() for row, s in zip(labels, np.asarray(candidates.sampled)))
        got = jax.device_get(trainer.step(batch))
        reference, expected = dense_step(reference, batch, trainer.vocab_char_ids)
        np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-6)
        np.testing.assert_allclose(got["grad_norm"], expected["grad_norm"], rtol=1e-6)
        clip = clip_norm if clip_norm is not None else TINY["all_clip_norm_val"]
        assert (expected["grad_norm"] > clip) == (clip_norm is not None)  # clipped in the cases that say so
    assert duplicates and overlaps  # ids repeat within a step, and targets are drawn as negatives
    state = jax.device_get(trainer.state)
    for got, expected in zip(jax.tree.leaves((state.params, state.opt_state)),
                             jax.tree.leaves((reference.params, reference.opt_state))):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)  # float rounding (4 devices sum otherwise)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(reference.opt_state)  # optax's state: checkpoints


def test_row_sparse_adagrad_changes_only_its_rows_as_optax_would():
    """make_optimizer on a RowSparse gradient (pads, rows absent) = optax on the dense gradient; other rows stay."""
    vocab, proj = 40, 3
    keys = iter(jax.random.split(jax.random.key(7), 20))
    params = {"softmax": {"W": jax.random.normal(next(keys), (vocab, proj)), "b": jnp.zeros((vocab,))},
              "other": jax.random.normal(next(keys), (5,))}
    settings = (0.2, 1.0, 0.5)  # the clip triggers
    sparse, dense = _make_optimizer(*settings), optax.chain(optax.clip_by_global_norm(settings[2]),
                                                            optax.adagrad(0.2, initial_accumulator_value=1.0, eps=0.0))
    sparse_state, dense_state = sparse.init(params), dense.init(params)
    sparse_params, dense_params = params, params
    for step in range(3):
        ids = jnp.array([3 + step, 7, 39, 0, vocab, vocab], jnp.int32)  # distinct, then two pads; rows 8..38 untouched
        w_rows = jax.random.normal(next(keys), (6, proj)).at[4:].set(0.0)
        b_rows = jax.random.normal(next(keys), (6,)).at[4:].set(0.0)
        other = jax.random.normal(next(keys), (5,))
        grads = {"softmax": {"W": RowSparse(ids, w_rows), "b": RowSparse(ids, b_rows)}, "other": other}
        dense_grads = {"softmax": {"W": jnp.zeros((vocab, proj)).at[ids].set(w_rows, mode="drop"),
                                   "b": jnp.zeros((vocab,)).at[ids].set(b_rows, mode="drop")}, "other": other}
        before = sparse_params
        updates, sparse_state = jax.jit(sparse.update)(grads, sparse_state, sparse_params)
        sparse_params = jax.jit(apply_updates)(sparse_params, updates)
        updates, dense_state = dense.update(dense_grads, dense_state, dense_params)
        dense_params = optax.apply_updates(dense_params, updates)
        np.testing.assert_array_equal(sparse_params["softmax"]["W"][8:39], before["softmax"]["W"][8:39])
    _params_close(sparse_params, dense_params, 1e-7)
    _params_close(sparse_state, dense_state, 1e-7)
    assert jax.tree.structure(sparse_state) == jax.tree.structure(dense_state)


def _all_reduced_shapes(hlo: str) -> list[tuple[int, ...]]:
    """Shapes of the arrays that all-reduce ops of a compiled HLO module reduce (their results)."""
    shapes = []
    for line in hlo.splitlines():
        if re.search(r"\ball-reduce(-start)?\(", line):
            result = line.split("=", 1)[1].split("all-reduce")[0]
            shapes += [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]", result)]
    return shapes


def _batch_shapes() -> dict:
    """The shapes and dtypes of a bidirectional training batch of 4 rows x 5 steps (to trace a step without data)."""
    batch = {name: jax.ShapeDtypeStruct((4, 5), jnp.int32) for name in
             ("token_ids", "next_token_id", "token_ids_reverse", "next_token_id_reverse")}
    batch.update({name: jax.ShapeDtypeStruct((4, 5, 50), jnp.int32) for name in ("char_ids", "char_ids_reverse")})
    return batch


def test_data_parallel_step_all_reduces_the_touched_softmax_rows_only():
    """4 devices, a 5,000-word vocabulary: no all-reduce carries a (5000, P) or (5000,) array; the dense one does."""
    vocab = 5000
    options = BiLMOptions.from_dict({**TINY, "n_tokens_vocab": vocab})
    settings = (0.2, 1.0, 10.0)
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = jax.eval_shape(_init_fn(options, settings), jax.random.PRNGKey(0), None)
    shardings = state._replace(params=replicated, opt_state=replicated, step=replicated, lstm_state=by_batch,
                               data_position=replicated, key=replicated)
    batch = _batch_shapes()

    def compiled(step):
        program = jax.jit(step, in_shardings=(shardings, by_batch, replicated), out_shardings=(shardings, replicated))
        return program.lower(state, batch, None).compile().as_text()

    sparse = _all_reduced_shapes(compiled(functools.partial(train_step, options=options,
                                                            optimizer=_make_optimizer(*settings))))
    dense = _all_reduced_shapes(compiled(functools.partial(dense_train_step, options=options, settings=settings)))
    assert sparse and not any(vocab in shape for shape in sparse), sparse
    assert any(vocab in shape for shape in dense), dense  # the check sees a dense softmax gradient


# ---------------------------------------------------------------- (a) training works


def test_training_reduces_perplexity(trained):
    _, run_dir, before, after, history = trained
    assert before["forward"] > 20 and before["backward"] > 20  # near-uniform over 32 words at init
    assert after["forward"] * 3 < before["forward"] and after["backward"] * 3 < before["backward"]
    assert after["mean"] * 3 < before["mean"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [400, 800, 1200] == [m["step"] for m in history]
    assert all(np.isfinite(m["loss"]) and m["tokens_per_s"] > 0 for m in lines)


# ---------------------------------------------------------------- (b) resume


def test_bounded_batches_read_ahead_yet_yield_the_stream_and_cursor_of_each_position():
    """Bounds agreed for several batches at once (one all-gather with several processes): the same batches and
    bounds as one at a time, and at each position the cursor a plain stream has there."""
    from elmo_jax.train.data import LMDataset

    vocab = load_vocabulary(VOCAB)
    data = LMDataset(DATA, vocab, batch_size=2, unroll_steps=5, shuffle=False, loop=False)
    plain, bounded = data.batches(), BoundedBatches(data.batches(), ahead=3)
    count = 0
    for batch, bound in bounded:
        want = next(plain)
        assert all(np.array_equal(batch[k], want[k]) for k in want) and bound == long_token_bound(want)
        count += 1
        assert bounded.position == plain.position == count and bounded.get_state() == plain.get_state()
        assert bounded.batches.position - count == len(bounded.pending) < 3  # read 3 at a time
    assert count >= 4 and next(plain, None) is None
    resumed = BoundedBatches(data.batches(state=plain.get_state()), ahead=3)
    assert next(resumed, None) is None


def test_resume_continues_exactly(tmp_path):
    quiet = io.StringIO()
    config = _config(n_steps=12, log_every=3, checkpoint_every=100)
    straight = Trainer(config, tmp_path / "straight", devices=jax.devices()[:1], log_stream=quiet)
    straight.train()
    first = Trainer(config, tmp_path / "split", devices=jax.devices()[:1], log_stream=quiet)
    first.train(6)  # checkpoints at its end
    del first
    resumed = Trainer(config, tmp_path / "split", resume=True, devices=jax.devices()[:1], log_stream=quiet)
    assert int(resumed.state.step) == 6 and int(resumed.state.data_position) == 6
    resumed.train()
    assert int(resumed.state.step) == 12
    _params_close(straight.state.params, resumed.state.params, 1e-6)
    _params_close(straight.state.lstm_state, resumed.state.lstm_state, 1e-6)
    _params_close(straight.state.opt_state, resumed.state.opt_state, 1e-6)


def test_resume_on_new_data_keeps_the_model_and_reads_the_new_data_from_its_start(tmp_path):
    quiet, one = io.StringIO(), jax.devices()[:1]
    other = tmp_path / "other.txt"
    with open(DATA, encoding="utf-8") as f:
        other.write_text("".join(reversed(f.readlines())), encoding="utf-8")
    config = _config(n_steps=20, log_every=100, checkpoint_every=100)
    first = Trainer(config, tmp_path / "run", devices=one, log_stream=quiet)
    first.train(4)  # checkpoints at its end
    new_config = dataclasses.replace(config, train_prefix=str(other))
    switched = Trainer(new_config, tmp_path / "run", resume=True, new_data=True, devices=one, log_stream=quiet)
    assert int(switched.state.step) == 4 and int(switched.state.data_position) == 0
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(switched.state.lstm_state))
    _params_close(first.state.params, switched.state.params, 0)
    _params_close(first.state.opt_state, switched.state.opt_state, 0)
    # The reference: the trained state stepped by hand through the first batches of the new data, from zero state.
    reference = Trainer(new_config, tmp_path / "reference", devices=one, log_stream=quiet)
    reference.state = jax.tree.map(jnp.copy, switched.state)  # the step donates its input state
    batches = reference.dataset.batches()
    for _ in range(3):
        reference.step(next(batches))
    switched.train(3)
    _params_close(reference.state.params, switched.state.params, 1e-6)
    assert int(switched.state.data_position) == 3
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train_prefix"] == str(other)
    with pytest.raises(TrainError, match="resume"):
        Trainer(new_config, tmp_path / "fresh", new_data=True, devices=one, log_stream=quiet)


def test_non_finite_loss_raises(tmp_path):
    trainer = Trainer(_config(n_steps=2, log_every=1), tmp_path / "nan", devices=jax.devices()[:1],
                      log_stream=io.StringIO())
    nan_projection = {k: v * jnp.nan for k, v in trainer.state.params["projection"].items()}
    params = dict(trainer.state.params, projection=nan_projection)
    trainer.state = trainer.state._replace(params=params)
    with pytest.raises(TrainError, match="non-finite loss at step 1"):
        trainer.train()


def test_bfloat16_compute_trains_with_float32_params_and_state(tmp_path):
    quiet = io.StringIO()
    f32 = Trainer(_config(n_steps=300, log_every=1, checkpoint_every=1000), tmp_path / "f32",
                  devices=jax.devices()[:1], log_stream=quiet)
    bf16 = Trainer(_config(n_steps=300, log_every=1, checkpoint_every=1000, compute_dtype="bfloat16"),
                   tmp_path / "bf16", devices=jax.devices()[:1], log_stream=quiet)
    first_f32, first_bf16 = f32.train(1)[0], bf16.train(1)[0]
    # same init, batch and key: bfloat16 only rounds (8 mantissa bits)
    assert abs(first_bf16["loss"] - first_f32["loss"]) < 0.02 * first_f32["loss"]
    assert first_bf16["loss"] != first_f32["loss"]
    vocab = load_vocabulary(VOCAB, N_VOCAB)

    def train_perplexity(trainer):
        params = jax.device_get(trainer.state.params)
        return perplexity(params, trainer.options, DATA, vocab, batch_size=4, unroll_steps=5)["mean"]

    before = train_perplexity(bf16)
    f32.train()
    bf16.train()
    # 300 steps: bfloat16 learns as float32 does (float32 evaluation of both)
    assert train_perplexity(bf16) < before / 1.5
    assert abs(train_perplexity(bf16) - train_perplexity(f32)) < 0.1 * train_perplexity(f32), (
        train_perplexity(bf16), train_perplexity(f32))
    state = bf16.state
    assert {a.dtype for a in jax.tree.leaves((state.params, state.opt_state, state.lstm_state))
            if jnp.issubdtype(a.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    assert set(bf16._step.compilations().values()) == {1}
    with pytest.raises(TrainError, match="compute_dtype must be one of"):
        _config(compute_dtype="float16")


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (jit, scan, while, cond, custom rules)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.parametrize("tied", [False, True])
def test_bfloat16_step_adds_the_gradients_of_gathered_rows_in_float32(tied):
    """The char embedding and the softmax rows are gathered from float32 tables in a bfloat16 step, so their
    gradients (scatter-adds: 20x slower in bfloat16 than in float32 on an H200, which made the whole step 78x
    slower there) add in float32, while the LMs run in bfloat16."""
    options = BiLMOptions.from_dict({**TINY, "share_embedding_softmax": tied})
    settings = (0.2, 1.0, 10.0)
    state = jax.eval_shape(_init_fn(options, settings), jax.random.PRNGKey(0), None)
    batch = _batch_shapes()
    vocab_char_ids = jax.ShapeDtypeStruct((N_VOCAB, 50), jnp.int32) if tied else None
    step = functools.partial(train_step, options=options, optimizer=_make_optimizer(*settings),
                             compute_dtype=jnp.bfloat16)
    equations = list(_equations(jax.make_jaxpr(step)(state, batch, vocab_char_ids).jaxpr))
    added = {eqn.outvars[0].aval.dtype for eqn in equations if eqn.primitive.name == "scatter-add"}
    assert jnp.dtype(jnp.float32) in added and jnp.dtype(jnp.bfloat16) not in added, added
    products = {eqn.outvars[0].aval.dtype for eqn in equations if eqn.primitive.name == "dot_general"}
    assert jnp.dtype(jnp.bfloat16) in products  # the check sees a bfloat16 step


# ---------------------------------------------------------------- (c) data parallel


def test_one_and_four_devices_give_the_same_losses(tmp_path):
    assert jax.device_count() >= 4, "tests/conftest.py must set jax_num_cpu_devices to 4"
    quiet = io.StringIO()
    config = _config(n_steps=4, log_every=1, checkpoint_every=100)
    one = Trainer(config, tmp_path / "one", devices=jax.devices()[:1], log_stream=quiet)
    four = Trainer(config, tmp_path / "four", devices=jax.devices()[:4], log_stream=quiet)
    assert four.state.lstm_state["forward"][0].h.sharding.shard_shape((4, 8)) == (1, 8)
    losses_one = [m["loss"] for m in one.train()]
    losses_four = [m["loss"] for m in four.train()]
    np.testing.assert_allclose(losses_one, losses_four, rtol=1e-5)
    # the step's output state has its input's types: one compilation per program (per long-token bound)
    assert set(four._step.compilations().values()) == {1}
    _params_close(one.state.params, four.state.params, 1e-5)


def test_a_softmax_split_by_rows_trains_as_a_replicated_one(tmp_path, capsys):
    """shard_softmax: the softmax and its Adagrad accumulator split by rows over 4 devices (padded to
    SOFTMAX_ROW_BLOCK rows) give bit for bit the replicated run's losses and params, through a checkpoint and
    resume, and the same full-softmax perplexity, also from ``elmo-jax perplexity``, which evaluates such a run
    split too; the padding rows stay zero and are never scored."""
    quiet = io.StringIO()
    config = _config(n_steps=4, log_every=1, checkpoint_every=2)
    sharded_config = dataclasses.replace(config, shard_softmax=True)
    replicated = Trainer(config, tmp_path / "replicated", devices=jax.devices()[:4], log_stream=quiet)
    sharded = Trainer(sharded_config, tmp_path / "sharded", devices=jax.devices()[:4], log_stream=quiet)
    rows = trainer_module.SOFTMAX_ROW_BLOCK
    for table in (sharded.state.params["softmax"]["W"], sharded.state.opt_state[1][0].sum_of_squares["softmax"]["W"]):
        assert table.shape == (rows, 8) and table.sharding.shard_shape(table.shape) == (rows // 4, 8)
    assert replicated.state.params["softmax"]["W"].shape == (N_VOCAB, 8)
    want = [m["loss"] for m in replicated.train()]
    assert [m["loss"] for m in sharded.train(2)] == want[:2]
    resumed = Trainer(sharded_config, tmp_path / "sharded", resume=True, devices=jax.devices()[:4], log_stream=quiet)
    assert [m["loss"] for m in resumed.train()] == want[2:]
    params = jax.device_get(resumed.state.params)
    assert not np.any(params["softmax"]["W"][N_VOCAB:]) and not np.any(params["softmax"]["b"][N_VOCAB:])
    _params_close(vocabulary_softmax(params, config.options), jax.device_get(replicated.state.params), 0.0)
    restored, _ = load_run(tmp_path / "sharded")
    assert restored["softmax"]["W"].shape == (N_VOCAB, 8)
    vocab = load_vocabulary(VOCAB, N_VOCAB)
    want = perplexity(jax.device_get(replicated.state.params), config.options, DATA, vocab, batch_size=4,
                      unroll_steps=5)
    assert perplexity(params, config.options, DATA, vocab, batch_size=4, unroll_steps=5) == want
    capsys.readouterr()
    assert _cli("perplexity", "--run-dir", tmp_path / "sharded", "--test-prefix", DATA, "--vocab", VOCAB,
                "--batch-size", 4, "--unroll-steps", 5) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("forward", "backward", "mean"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6)
    with pytest.raises(TrainError, match="4096 rows .* do not split evenly over 3 devices"):
        Trainer(TrainConfig(BiLMOptions.from_dict({**TINY, "batch_size": 6}), DATA, VOCAB, shard_softmax=True),
                tmp_path / "three", devices=jax.devices()[:3])


def test_each_device_embeds_its_own_rows(tmp_path):
    """In the compiled data-parallel step on 4 devices (batch 4 x 5, both streams: 10 tokens a device, 40 in all),
    every convolution of the char CNN, forward and backward, runs on one device's tokens or its long-token slots,
    and nothing is gathered across devices but the targets: with the streams stacked direction-major every device
    convolved every token (40), and with the long tokens picked from the whole batch it gathered their flags."""
    trainer = Trainer(_config(), tmp_path / "run", devices=jax.devices()[:4], log_stream=io.StringIO())
    batch = next(trainer.dataset.batches())
    bound = long_token_bound(batch, trainer.row_groups, 4)
    assert bound == 8  # a bound of 8 long tokens per device's 10 tokens: the short/long path runs
    for rows in (None, bound):
        hlo = trainer._step.program(rows).lower(trainer.state, trainer.put_batch(batch), None).compile().as_text()
        convolved = {int(n) for n in re.findall(r"= f32\[(\d+),\d+,\d+\]\{[^}]*\} convolution\(", hlo)}
        assert convolved and convolved <= {10, 8, 4}, convolved  # 4: the kernels' gradients (char_dim first)
        gathered = set(re.findall(r"= (\w+\[[\d,]*\])\{[^}]*\} all-gather(?:-start)?\(", hlo))
        assert gathered == {"s32[2,20]"}, gathered  # only the targets, for the softmax candidates


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_in_processes(n_processes: int, *argv) -> None:
    """Run ``elmo-jax train --distributed ARGV`` in n_processes local processes of 2 CPU devices each."""
    port = _free_port()
    launched = []
    for index in range(n_processes):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(n_processes),
               "JAX_PROCESS_ID": str(index), "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu"}
        launched.append(subprocess.Popen([sys.executable, "-m", "elmo_jax.cli", "train", "--distributed",
                                          *map(str, argv)], env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))
    for process in launched:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output


@pytest.mark.parametrize("shard_softmax", [False, True], ids=["replicated", "sharded-softmax"])
def test_two_processes_train_and_resume_as_one_process_does(tmp_path, shard_softmax):
    """Multi-host data parallelism for real: 2 processes x 2 CPU devices, joined by jax.distributed (gloo).

    Each process feeds its own rows of the global batch; checkpoints are written and restored by both.
    Losses and params equal a one-process run on 4 devices with a replicated softmax, also when the 2 processes
    split theirs by rows over the 4 devices (each process holding half of it).
    """
    options = tmp_path / "options.json"
    options.write_text(json.dumps(TINY))
    run = tmp_path / "run"
    _train_in_processes(2, "--train-prefix", DATA, "--vocab", VOCAB, "--options", options, "--out", run,
                        "--steps", 3, "--log-every", 1, *["--shard-softmax"] * shard_softmax)
    assert load_config(run).shard_softmax == shard_softmax
    _train_in_processes(2, "--out", run, "--resume", "--steps", 2, "--log-every", 1)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5]  # process 0 alone writes the metrics

    one = Trainer(_config(n_steps=5, log_every=1, checkpoint_every=100), tmp_path / "one",
                  devices=jax.devices()[:4], log_stream=io.StringIO())
    expected = one.train()
    np.testing.assert_allclose([m["loss"] for m in logged], [m["loss"] for m in expected], rtol=1e-5)
    params, _ = load_run(run)
    _params_close(params, jax.device_get(one.state.params), 1e-5)


def test_distributed_settings_from_the_environment_are_checked(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(TrainError, match="JAX_NUM_PROCESSES='two': expected an integer"):
        initialize_distributed()


# ---------------------------------------------------------------- (d) export


def test_export_reloads_with_identical_activations(trained, tmp_path):
    trainer, run_dir, *_ = trained
    weights, options_file, embeddings = tmp_path / "w.hdf5", tmp_path / "options.json", tmp_path / "emb.hdf5"
    export(run_dir, weights, options_file, vocab=VOCAB, token_embeddings_out=embeddings)
    assert json.loads(options_file.read_text())["char_cnn"]["n_characters"] == 262
    with h5py.File(weights) as f:
        assert f["char_embed"].shape == (261, 4) and "softmax" not in str(list(f))
    model = BiLM.from_hdf5(options_file, weights)
    params, _ = load_run(run_dir)
    trained_bilm = {k: v for k, v in params.items() if k != "softmax"}
    _params_close(model.params, trained_bilm, 0.0)  # the file round trip is exact
    char_ids = np.array(jax.random.randint(jax.random.key(3), (2, 6, 50), 1, 262), np.int32)
    char_ids[1, 4:] = 0  # a shorter sentence
    got, _ = model(char_ids)
    expected, _ = jax.jit(bilm, static_argnums=1)(trained_bilm, model.options, jnp.asarray(char_ids))
    np.testing.assert_array_equal(np.asarray(got.activations), np.asarray(expected.activations))
    with_trainer_options, _ = jax.jit(bilm, static_argnums=1)(params, trainer.options, jnp.asarray(char_ids))
    np.testing.assert_allclose(np.asarray(got.activations), np.asarray(with_trainer_options.activations), atol=1e-6)
    with h5py.File(embeddings) as f:
        table = f["embedding"][...]
    assert table.shape == (N_VOCAB, 8)
    np.testing.assert_allclose(table, model.embed_vocabulary(load_vocabulary(VOCAB).words), atol=1e-6)

    # Fine-tuning starts from the exported biLM with a fresh softmax.
    tuned = Trainer(_config(n_steps=2, init_weights=str(weights)), tmp_path / "tune", devices=jax.devices()[:1],
                    log_stream=io.StringIO())
    _params_close({k: v for k, v in tuned.state.params.items() if k != "softmax"}, trained_bilm, 0.0)
    assert not np.allclose(tuned.state.params["softmax"]["W"], params["softmax"]["W"])
    assert np.isfinite(tuned.train()[-1]["loss"])


def test_exported_model_holds_the_trained_language_models(trained, tmp_path):
    """The exported biLM's top layer, read as the trainer reads it, predicts what the trained LMs predict.

    Forward half at position t -> token t + 1, backward half at t -> token t - 1, through the run's softmax:
    the same per-token losses as the trainer's LMs on each sentence's forward and reversed stream (zero
    state). This ties inference (padding, reversal within each sentence's length, direction order, char
    ids 261 vs 262) to the LMs the softmax was trained with.
    """
    _, run_dir, *_ = trained
    export(run_dir, tmp_path / "w.hdf5", tmp_path / "options.json")
    model = BiLM.from_hdf5(tmp_path / "options.json", tmp_path / "w.hdf5")
    params, config = load_run(run_dir)
    vocab = load_vocabulary(VOCAB, N_VOCAB)
    with open(DATA) as f:
        sentences = [line.split() for line in f][:4]  # lengths 17, 7, ... : padding in the batch
    assert len({len(s) for s in sentences}) > 1
    output, _ = model(batch_to_ids(sentences))
    top = np.asarray(output.activations[-1])  # (batch, time + 2, 2P)
    projection = top.shape[-1] // 2
    w, b = params["softmax"]["W"], params["softmax"]["b"]
    for row, sentence in enumerate(sentences):
        ids = vocab.encode(sentence)  # (n + 2,) with <S> and </S>
        chars = np.stack([token_to_char_ids(t) for t in [BOS_TOKEN, *sentence, EOS_TOKEN]])  # (n + 2, 50)
        stream = {"char_ids": chars[None, :-1], "char_ids_reverse": chars[None, ::-1][:, :-1]}
        hidden, _ = lm_outputs(params, config.options, stream, initial_lm_state(config.options, 1))
        n = len(sentence)
        trainer_forward = full_softmax_loss(hidden["forward"][0], jnp.asarray(ids[1:]), w, b)
        trainer_backward = full_softmax_loss(hidden["backward"][0], jnp.asarray(ids[::-1][1:]), w, b)
        exported_forward = full_softmax_loss(jnp.asarray(top[row, : n + 1, :projection]), jnp.asarray(ids[1:]), w, b)
        backward_half = top[row, 1 : n + 2, projection:][::-1]  # </S> .. w1: each predicts the token before it
        exported_backward = full_softmax_loss(jnp.asarray(backward_half), jnp.asarray(ids[::-1][1:]), w, b)
        np.testing.assert_allclose(exported_forward, trainer_forward, atol=1e-5, rtol=0)
        np.testing.assert_allclose(exported_backward, trainer_backward, atol=1e-5, rtol=0)
    # and the trained LMs are worth tying to: they predict the training text far better than chance
    assert float(jnp.mean(trainer_forward)) < 0.5 * np.log(N_VOCAB)


# ---------------------------------------------------------------- (e) errors and the CLI


def _cli(*argv):
    parser = argparse.ArgumentParser(prog="elmo-jax")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_bad_input_errors(tmp_path):
    with pytest.raises(DataError, match="no-such"):
        Trainer(TrainConfig(BiLMOptions.from_dict(TINY), str(tmp_path / "no-such*.txt"), VOCAB), tmp_path / "r")
    (tmp_path / "vocab.txt").write_text("the\nof\n")
    with pytest.raises(DataError, match="special tokens"):
        Trainer(TrainConfig(BiLMOptions.from_dict(TINY), DATA, str(tmp_path / "vocab.txt")), tmp_path / "r")
    with pytest.raises(DataError, match="n_tokens_vocab=33"):
        Trainer(TrainConfig(BiLMOptions.from_dict({**TINY, "n_tokens_vocab": 33}), DATA, VOCAB), tmp_path / "r")
    (tmp_path / "file").write_text("")
    with pytest.raises(TrainError, match="cannot create or write the run directory"):
        Trainer(_config(), tmp_path / "file" / "run")
    with pytest.raises(TrainError, match="batch_size=4 must divide evenly over 3 devices"):
        Trainer(_config(), tmp_path / "r", devices=jax.devices()[:3])


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    options = tmp_path / "options.json"
    options.write_text(json.dumps(TINY))
    (tmp_path / "file").write_text("")
    cases = [
        (["train", "--train-prefix", tmp_path / "none*.txt", "--vocab", VOCAB, "--options", options,
          "--out", tmp_path / "r"], "none*.txt"),
        (["train", "--train-prefix", DATA, "--vocab", VOCAB, "--options", options, "--out", tmp_path / "file" / "r"],
         "cannot create or write"),
        (["train", "--out", tmp_path / "fresh", "--resume"], "config.json"),
        (["perplexity", "--test-prefix", DATA, "--vocab", VOCAB, "--weights", tmp_path / "w.hdf5"], "--run-dir"),
        (["export", tmp_path / "empty", "--weights", tmp_path / "w.hdf5", "--options", tmp_path / "o.json"],
         "config.json"),
    ]
    for argv, fragment in cases:
        with pytest.raises(SystemExit) as exit_info:
            _cli(*argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err and "Traceback" not in err, err


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_from_its_beginning(tmp_path, capsys):
    options = tmp_path / "options.json"
    options.write_text(json.dumps(TINY))
    flags = ["--train-prefix", DATA, "--vocab", VOCAB, "--options", options, "--steps", 3, "--log-every", 1,
             "--devices", 1]
    assert _cli("train", "--out", tmp_path / "straight", *flags) == 0
    expected = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    capsys.readouterr()
    # killed before config.json: the directory exists and is empty; the flags of a new run are at hand
    (tmp_path / "no-config").mkdir()
    # killed after config.json, before the first checkpoint: the saved config is used, no flags needed
    Trainer(_config(n_steps=3, log_every=1), tmp_path / "no-checkpoint", devices=jax.devices()[:1])
    assert (tmp_path / "no-checkpoint" / "config.json").exists()
    for run, argv in ((tmp_path / "no-config", flags), (tmp_path / "no-checkpoint", ["--devices", 1])):
        capsys.readouterr()
        assert _cli("train", "--out", run, "--resume", *argv) == 0
        notices = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("step ")]
        assert notices == [f"{run}: no checkpoint to resume yet; starting the run from its beginning"], notices
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in logged] == [1, 2, 3]
        np.testing.assert_allclose([m["loss"] for m in logged], [m["loss"] for m in expected], rtol=1e-6)
    assert _cli("train", "--out", tmp_path / "no-checkpoint", "--resume", "--steps", 1, "--devices", 1) == 0
    assert "starting the run" not in capsys.readouterr().out  # now there is a checkpoint: a plain resume


def test_cli_train_resume_perplexity_export(tmp_path, capsys):
    options = tmp_path / "options.json"
    options.write_text(json.dumps(TINY))
    run = tmp_path / "run"
    assert _cli("train", "--train-prefix", DATA, "--vocab", VOCAB, "--options", options, "--out", run,
                "--steps", 3, "--log-every", 1, "--devices", 1) == 0
    assert _cli("train", "--out", run, "--resume", "--steps", 2, "--log-every", 1, "--devices", 1) == 0
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    other = tmp_path / "other.txt"
    other.write_text("the the cat .\n" * 20, encoding="utf-8")
    assert _cli("train", "--out", run, "--resume", "--train-prefix", other, "--steps", 1, "--devices", 1) == 0
    assert "on new data" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["train_prefix"] == str(other)
    capsys.readouterr()
    assert _cli("perplexity", "--run-dir", run, "--test-prefix", DATA, "--vocab", VOCAB, "--batch-size", 4,
                "--unroll-steps", 5) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"forward", "backward", "mean", "batches"} and result["mean"] > 1
    assert _cli("export", run, "--weights", tmp_path / "w.hdf5", "--options", tmp_path / "o.json") == 0
    assert BiLM.from_hdf5(tmp_path / "o.json", tmp_path / "w.hdf5").options.lstm.dim == 32


# ---------------------------------------------------------------- (g) O(1) resume, per-host rows


def test_resume_reads_the_data_cursor_and_an_old_checkpoint_replays(tmp_path, monkeypatch):
    """A checkpoint holds the data cursor: resuming at step 50 reads no more of the stream than the steps after it
    need, with the uninterrupted run's numbers bit for bit. A checkpoint without one (written before cursors
    existed) is resumed by replaying the stream, with the same numbers, and says so in one line."""
    monkeypatch.setattr(trainer_module, "BOUNDS_AHEAD", 1)  # shards read count the steps' batches, none ahead
    quiet, one = io.StringIO(), jax.devices()[:1]
    config = _config(n_steps=60, log_every=100, checkpoint_every=50)
    straight = Trainer(config, tmp_path / "straight", devices=one, log_stream=quiet)
    straight.train(50)
    read_by_50 = straight.dataset.stats["shards_read"]
    straight.train()
    assert read_by_50 >= 7  # train_tiny is one short shard: a replay to step 50 reads it once per epoch
    (tmp_path / "split").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoints", tmp_path / "split" / "checkpoints",
                    ignore=shutil.ignore_patterns("60"))
    shutil.copytree(tmp_path / "split", tmp_path / "old")
    shutil.rmtree(tmp_path / "old" / "checkpoints" / "50" / "data")
    notes, old_notes = io.StringIO(), io.StringIO()
    resumed = Trainer(config, tmp_path / "split", resume=True, devices=one, log_stream=notes)
    old = Trainer(config, tmp_path / "old", resume=True, devices=one, log_stream=old_notes)
    assert resumed.data_cursor["position"] == 50 and old.data_cursor is None
    resumed.train()
    # the shard as each epoch the rows' sentences come from shuffled it, then what steps 51-60 read
    epochs = len({tuple(row[:2]) for row in resumed.data_cursor["rows"]})
    assert resumed.dataset.stats["shards_read"] <= epochs + straight.dataset.stats["shards_read"] - read_by_50
    assert resumed.dataset.stats["shards_read"] < read_by_50
    assert notes.getvalue().startswith("step 60 ")  # and nothing else
    old.train()
    assert old.dataset.stats["shards_read"] > read_by_50
    assert old_notes.getvalue().splitlines()[0] == (
        f"{old.run_dir}: no data cursor at data position 50 (a checkpoint written before checkpoints held one): "
        f"replaying the stream's first 50 batches to reach it")
    for run in (resumed, old):
        for part in ("params", "opt_state", "lstm_state"):
            _params_close(getattr(straight.state, part), getattr(run.state, part), 0)
    assert resumed._restore_cursor(60) == straight._cursor()  # the resumed run's last cursor is the straight one's


_ROWS_SCRIPT = """
import json, pathlib, sys
import jax, numpy as np
from elmo_jax.sharding import by_batch, data_mesh, replicated
from elmo_jax.train.trainer import host_rows, initialize_distributed, long_token_bound, place_rows
initialize_distributed()
me = jax.process_index()
mine, theirs = ([d for d in jax.devices() if d.process_index == p] for p in (me, 1 - me))
order = [d for pair in zip(*sorted([mine, theirs], key=lambda ds: ds[0].process_index)) for d in pair]
sharding = by_batch(data_mesh(order))  # devices of the two processes interleaved: p0, p1, p0, p1
rows = host_rows(sharding, 8)
whole = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
placed = place_rows({"x": whole[rows]}, rows, sharding, 8)["x"]
shards_ok = all(np.array_equal(np.asarray(s.data), whole[s.index]) for s in placed.addressable_shards)
total = int(jax.jit(lambda a: a.sum(), out_shardings=replicated(sharding.mesh))(placed))
chars = np.full((2, 5, 50), 260, np.int32)
chars[..., :3] = 259  # short tokens (their char ids end before position 3)
long = int(sys.argv[2 + me])
chars.reshape(-1, 50)[:long, 20] = 66  # this host's long tokens (char ids past position 16)
bound = long_token_bound({"char_ids": chars})
result = {"rows": rows, "shards_ok": shards_ok, "total": total, "bound": bound}
pathlib.Path(sys.argv[1], f"result{me}.json").write_text(json.dumps(result))
"""


def _run_in_processes(n_processes: int, argv: list[str], tmp_path, script: str | None = None) -> list[dict]:
    """Run ``script`` (default _ROWS_SCRIPT) DIR ARGV in n_processes local processes of 2 CPU devices each; the
    results they wrote (DIR/result{process index}.json).

    Each writes its result to a file in DIR: Gloo prints to stdout from C++ and can split any line printed there."""
    port = _free_port()
    launched = []
    for index in range(n_processes):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(n_processes),
               "JAX_PROCESS_ID": str(index), "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu"}
        launched.append(subprocess.Popen([sys.executable, "-c", script or _ROWS_SCRIPT, str(tmp_path), *argv], env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for process in launched:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
    return [json.loads((tmp_path / f"result{index}.json").read_text()) for index in range(n_processes)]


def test_hosts_own_the_rows_of_the_index_map_and_agree_on_the_long_token_bound(tmp_path):
    """2 processes whose devices the mesh interleaves: each owns the rows its devices hold (not a block by
    process_index), places them where the index map says, and both take the bound of the global batch."""
    # each host: 2 rows x 5 tokens; the global batch's bound is max(8, 20 // 16) = 8 long tokens
    first, second = _run_in_processes(2, ["6", "2"], tmp_path)  # 8 long tokens in all: both use the bound
    assert first["rows"] == [0, 1, 4, 5] and second["rows"] == [2, 3, 6, 7]
    assert first["shards_ok"] and second["shards_ok"]
    assert first["total"] == second["total"] == sum(range(24))
    assert first["bound"] == second["bound"] == 8
    # 9 long tokens in all, though each host alone is within 8: neither uses the bound
    first, second = _run_in_processes(2, ["5", "4"], tmp_path)
    assert first["bound"] is None and second["bound"] is None
