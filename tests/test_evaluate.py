"""elmo_jax.train.evaluate.perplexity on all devices: the per-batch, one-device numbers (bilm-tf's run_test), sums
kept on the devices and fetched once, the tied softmax's vocabulary embedded once."""

import functools
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elmo_jax.options import BiLMOptions
from elmo_jax.train import evaluate
from elmo_jax.train.data import LMDataset, load_vocabulary
from elmo_jax.train.evaluate import perplexity
from elmo_jax.train.loss import eval_loss, init_train_params, initial_lm_state
from elmo_jax.train.trainer import TrainConfig, Trainer
from tests.test_train import DATA, N_VOCAB, TINY, VOCAB, _run_in_processes


def _params(options: BiLMOptions) -> dict:
    params = init_train_params(options, jax.random.PRNGKey(3))
    params["softmax"]["b"] = jax.random.normal(jax.random.PRNGKey(4), (N_VOCAB,))  # logits far from uniform
    return jax.device_get(params)


def _reference(params, options, batch_size, unroll_steps, max_batches=None) -> dict:
    """The straightforward evaluation: one device, each batch's mean losses fetched, exp(mean over batches)."""
    vocab = load_vocabulary(VOCAB, N_VOCAB)
    vocab_char_ids = jnp.asarray(vocab.char_ids()) if options.training.share_embedding_softmax else None
    step = jax.jit(functools.partial(eval_loss, options=options))
    state, means = initial_lm_state(options, batch_size), []
    for batch in LMDataset(DATA, vocab, batch_size, unroll_steps, shuffle=False, loop=False).batches():
        losses, state = step(params, batch=batch, state=state, vocab_char_ids=vocab_char_ids)
        means.append({d: float(v) for d, v in jax.device_get(losses).items()})
        if len(means) == max_batches:
            break
    out = {d: math.exp(np.mean([m[d] for m in means])) for d in means[0]}
    return {**out, "mean": math.exp(np.mean([np.mean(list(m.values())) for m in means])), "batches": len(means)}


@pytest.mark.parametrize("tied, batch_size, unroll_steps, n_devices, max_batches, split", [
    (False, 4, 5, 4, None, False), (True, 4, 5, 4, None, False), (True, 4, 2, 1, None, False),
    (False, 2, 3, 4, 7, False), (True, 2, 3, 3, None, False),
    (False, 3, 5, 3, None, True), (True, 3, 5, 3, None, True)])
def test_perplexity_on_all_devices_equals_the_per_batch_reference(tied, batch_size, unroll_steps, n_devices,
                                                                   max_batches, split):
    """4 devices (batch split by rows), 1 device, and 4 devices of which 2 divide the batch, as many as divide
    it of 3 (1); and the softmax split by rows over 3 devices (32 words padded to 33 rows): the numbers of the
    per-batch evaluation within float rounding."""
    options = BiLMOptions.from_dict({**TINY, "share_embedding_softmax": tied})
    params = _params(options)
    got = perplexity(params, options, DATA, load_vocabulary(VOCAB, N_VOCAB), batch_size=batch_size,
                     unroll_steps=unroll_steps, max_batches=max_batches, devices=jax.devices()[:n_devices],
                     shard_softmax=split)
    want = _reference(params, options, batch_size, unroll_steps, max_batches)
    assert got["batches"] == want["batches"] > 2
    for name in ("forward", "backward", "mean"):
        np.testing.assert_allclose(got[name], want[name], rtol=2e-6, err_msg=name)
    assert want["mean"] > N_VOCAB  # random params: worse than uniform, so the check is not of a trivial value


@pytest.mark.parametrize("split", [False, True])
def test_perplexity_fetches_once_and_embeds_the_tied_vocabulary_once(monkeypatch, split):
    """Several batches: one device_get (the sums at the end) and one vocabulary embedding; the carried LSTM
    state and the batches are split over the 4 devices, the softmax weights copied to each or split by rows."""
    options = BiLMOptions.from_dict({**TINY, "share_embedding_softmax": True})
    params = _params(options)
    fetches, embeddings, states = [], [], []
    device_get, embed = jax.device_get, evaluate.vocabulary_embeddings
    monkeypatch.setattr(jax, "device_get", lambda x: fetches.append(x) or device_get(x))
    monkeypatch.setattr(evaluate, "vocabulary_embeddings", lambda *a, **k: embeddings.append(a) or embed(*a, **k))
    compiled = evaluate._eval_step

    def spied(options, mesh, split_softmax):
        step = compiled(options, mesh, split_softmax)

        def spy(params, softmax, batch, state, totals):
            states.append((batch["char_ids"].sharding, softmax["W"].sharding))
            return step(params, softmax, batch, state, totals)

        return spy

    monkeypatch.setattr(evaluate, "_eval_step", spied)
    got = perplexity(params, options, DATA, load_vocabulary(VOCAB, N_VOCAB), batch_size=4, unroll_steps=2,
                     devices=jax.devices()[:4], shard_softmax=split)
    assert got["batches"] == len(states) > 2
    assert len(fetches) == 1 and len(embeddings) == 1
    batch_sharding, w_sharding = states[0]
    assert batch_sharding.shard_shape((4, 2, 50)) == (1, 2, 50)  # one row per device
    assert len(w_sharding.device_set) == 4
    assert w_sharding.shard_shape((N_VOCAB, 8)) == ((N_VOCAB // 4, 8) if split else (N_VOCAB, 8))


def test_compensated_sum_keeps_the_precision_a_float32_sum_loses():
    values = np.full(200_000, 4.1, np.float32)  # a long evaluation's per-batch loss sums
    total = jax.jit(lambda xs: jax.lax.scan(lambda t, x: (evaluate._add(t, x), None),
                                            (jnp.float32(0), jnp.float32(0)), xs)[0])(values)
    naive = jax.jit(lambda xs: jax.lax.scan(lambda t, x: (t + x, None), jnp.float32(0), xs)[0])(values)
    exact = float(np.sum(values.astype(np.float64)))
    assert abs(float(total[0]) + float(total[1]) - exact) <= 1e-6 * exact  # a few float32 roundings
    assert abs(float(naive) - exact) > 1e-3 * exact  # what the compensation saves


_PERPLEXITY_SCRIPT = """
import contextlib, io, json, pathlib, sys
import jax
from elmo_jax.cli import main
from elmo_jax.train import evaluate
seen = {}
class Recorded(evaluate.LMDataset):  # which rows this process reads
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        seen["rows"] = list(self.rows)
mesh = evaluate.data_mesh
evaluate.LMDataset = Recorded
evaluate.data_mesh = lambda devices: seen.setdefault("mesh", []).append(len(devices)) or mesh(devices)
out = io.StringIO()
with contextlib.redirect_stdout(out):  # Gloo prints to the real stdout from C++; the JSON is kept apart from it
    status = main(["perplexity", "--distributed", *sys.argv[2:]])
devices = [d.process_index for d in jax.devices()]
result = {"status": status, "stdout": out.getvalue(), "devices": devices, **seen}
pathlib.Path(sys.argv[1], f"result{jax.process_index()}.json").write_text(json.dumps(result))
"""


def test_two_processes_evaluate_their_own_rows_as_one_process_on_four_devices(tmp_path):
    """``elmo-jax perplexity --distributed`` in 2 processes x 2 CPU devices (gloo): one mesh over the 4 devices,
    each process reading its own 2 rows of each batch; process 0 prints the numbers one process on 4 devices
    gives, with the tied vocabulary embedded over the 4 devices of both processes."""
    options = BiLMOptions.from_dict({**TINY, "share_embedding_softmax": True})
    trainer = Trainer(TrainConfig(options, DATA, VOCAB, n_steps=3, checkpoint_every=3), tmp_path / "run",
                      devices=jax.devices()[:4], log_stream=io.StringIO())
    trainer.train()
    params = jax.device_get(trainer.state.params)
    want = perplexity(params, options, DATA, load_vocabulary(VOCAB, N_VOCAB), batch_size=4, unroll_steps=3,
                      devices=jax.devices()[:4])
    first, second = _run_in_processes(2, ["--run-dir", str(tmp_path / "run"), "--test-prefix", DATA, "--vocab",
                                          VOCAB, "--batch-size", "4", "--unroll-steps", "3"], tmp_path,
                                      script=_PERPLEXITY_SCRIPT)
    assert first["status"] == second["status"] == 0
    assert first["devices"] == second["devices"] == [0, 0, 1, 1]  # one runtime: both see all 4 devices
    assert first["mesh"] == second["mesh"] == [1, 4]  # restored on a local device, evaluated over all 4
    assert first["rows"] == [0, 1] and second["rows"] == [2, 3]  # each reads the rows its devices hold
    assert second["stdout"] == ""  # process 0 alone prints
    got = json.loads(first["stdout"])
    assert got["batches"] == want["batches"] > 2
    for name in ("forward", "backward", "mean"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)
