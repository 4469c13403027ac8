"""elmo_jax.train: the loss, training reduces perplexity, exact resume, multi-device equality, export, errors."""

import argparse
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elmo_jax import BiLM, batch_to_ids, bilm, token_embedding
from elmo_jax.characters import BOS_TOKEN, EOS_TOKEN, token_to_char_ids
from elmo_jax.options import BiLMOptions
from elmo_jax.train import commands
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
    softmax_rows,
)
from elmo_jax.train.trainer import TrainConfig, Trainer, TrainError, initialize_distributed
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


def test_two_processes_train_and_resume_as_one_process_does(tmp_path):
    """Multi-host data parallelism for real: 2 processes x 2 CPU devices, joined by jax.distributed (gloo).

    Each process feeds its own rows of the global batch; checkpoints are written and restored by both.
    Losses and params equal a one-process run on 4 devices.
    """
    options = tmp_path / "options.json"
    options.write_text(json.dumps(TINY))
    run = tmp_path / "run"
    _train_in_processes(2, "--train-prefix", DATA, "--vocab", VOCAB, "--options", options, "--out", run,
                        "--steps", 3, "--log-every", 1)
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
