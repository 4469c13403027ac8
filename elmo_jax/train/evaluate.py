"""After training: test perplexity with the full softmax (bilm-tf's run_test) on all devices, restoring a run's
params, and exporting the biLM in the published HDF5 layout (bilm-tf's dump_weights / dump_token_embeddings).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from ..bilm import token_embedding
from ..characters import Vocabulary
from ..options import BiLMOptions
from ..sharding import by_batch, data_mesh, put_global, replicated, round_up
from .data import DataError, LMDataset
from .loss import eval_token_losses, initial_lm_state, vocabulary_softmax
from .trainer import (TrainConfig, TrainError, TrainState, _init_fn, _optimizer_settings, host_rows, load_config,
                      place_rows, softmax_table_rows, state_shardings)

NO_WORD_LOGIT = float(np.finfo(np.float32).min) / 2  # a split softmax's padding rows' bias: exp() of it is exactly 0


def perplexity(params: dict, options: BiLMOptions, files: str, vocab: Vocabulary, *, batch_size: int = 256,
               unroll_steps: int = 1, max_batches: int | None = None, devices: list | None = None,
               shard_softmax: bool = False) -> dict[str, float]:
    """Test perplexity as bilm-tf's run_test computes it, on all devices.

    One pass over the shards matched by ``files`` in order, unshuffled, cut into (batch_size, unroll_steps)
    windows with the LSTM state carried; the last partial batch is dropped. Perplexity = exp(mean over the
    tokens of the full-softmax loss), which is bilm-tf's exp(mean over batches of the batch means): every
    batch has batch_size * unroll_steps tokens.

    Each batch is split by rows over a data mesh (``elmo_jax.sharding.data_mesh``), params replicated. With
    several processes (``jax.distributed``), the mesh spans every process's devices and each process reads and
    encodes only the rows its devices hold (as the Trainer does); every process returns the same numbers. The sums
    of the losses (compensated float32 sums, so long evaluations lose no precision) and the token count stay
    on the devices and are fetched once, at the end. With a tied softmax (share_embedding_softmax) the
    vocabulary's token embeddings, the softmax weights, are computed once, split over the devices.

    Args:
      params: biLM params with "softmax"; vocab: the training vocabulary (n_tokens_vocab words).
      devices: the devices to use (default: all, of every process); in one process as many of the first of them
        as divide batch_size, with several all of them, and batch_size must divide evenly over them.
      shard_softmax: the softmax's weights and biases split by rows over those devices instead of copied to each
        (a vocabulary too large for one device, as ``TrainConfig.shard_softmax`` trains): each device scores the
        words it holds against the whole batch's hidden states (an all-gather of those) and XLA reduces the
        log-sum-exp across devices. The same numbers within float rounding.
    Returns:
      {"forward", "backward" (if bidirectional), "mean" (exp of the mean of the directions' losses), "batches"}.
    """
    options = options.replace(training=dataclasses.replace(options.training, batch_size=batch_size,
                                                            unroll_steps=unroll_steps, dropout=0.0))
    if options.training.n_tokens_vocab != len(vocab):
        raise DataError(f"{vocab.source}: vocabulary has {len(vocab)} tokens but the options say "
                        f"n_tokens_vocab={options.training.n_tokens_vocab}")
    # ---- mesh: the batch split by rows, the rest replicated
    devices = list(devices) if devices is not None else jax.devices()
    if jax.process_count() == 1:
        n_devices = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
    elif batch_size % len(devices):
        raise DataError(f"batch_size={batch_size} must divide evenly over the {len(devices)} devices of the "
                        f"{jax.process_count()} processes")
    else:
        n_devices = len(devices)
    mesh = data_mesh(devices[:n_devices])
    whole, rows = replicated(mesh), by_batch(mesh)
    own_rows = host_rows(rows, batch_size)  # this process's rows of each batch
    max_chars = options.char_cnn.max_characters_per_token
    data = LMDataset(files, vocab, batch_size, unroll_steps, shuffle=False, loop=False, max_chars=max_chars,
                     rows=own_rows)
    softmax = vocabulary_softmax(params, options)["softmax"]  # a sharded run's padding rows are not words
    params = put_global({name: value for name, value in params.items() if name != "softmax"}, whole)
    if options.training.share_embedding_softmax:
        softmax_w = vocabulary_embeddings(params, options, vocab.char_ids(max_chars), mesh, split=shard_softmax)
    else:
        softmax_w = softmax["W"]
    softmax = _place_softmax(softmax_w, softmax["b"], mesh, shard_softmax,
                             placed=options.training.share_embedding_softmax)
    # ---- the pass: sums on the devices
    step = _eval_step(options, mesh, shard_softmax)
    state = put_global(initial_lm_state(options, batch_size), rows)
    totals = put_global(_zero_totals(options), whole)
    n = 0
    for batch in data.batches():
        totals, state = step(params, softmax, place_rows(batch, own_rows, rows, batch_size), state, totals)
        n += 1
        if max_batches is not None and n >= max_batches:
            break
    if n == 0:
        raise DataError(f"{files!r}: too little text for one batch of batch_size={batch_size} x "
                        f"unroll_steps={unroll_steps} tokens")
    totals = jax.device_get(totals)  # the one fetch
    tokens = int(totals["tokens"])
    losses = {direction: (float(total) + float(compensation)) / tokens
              for direction, (total, compensation) in totals["losses"].items()}
    out = {direction: math.exp(loss) for direction, loss in losses.items()}
    out["mean"] = math.exp(sum(losses.values()) / len(losses))
    out["batches"] = n
    return out


def vocabulary_embeddings(params: dict, options: BiLMOptions, vocab_char_ids: np.ndarray, mesh: Mesh, *,
                          chunk: int = 1024, split: bool = False) -> jax.Array:
    """Every vocabulary word's token embedding, the weights of a tied softmax, computed once.

    Args:
      vocab_char_ids: (n_vocab, max_chars) (``Vocabulary.char_ids``).
      mesh: a data mesh; the words are split over its devices, each embedding its words ``chunk`` at a time.
      split: keep each device's words where they were embedded, with the padding rows after the last word.
    Returns:
      (n_vocab, projection_dim) float32, replicated over the mesh; with ``split``, (rows, projection_dim) split by
      rows over it, rows >= n_vocab a multiple of the mesh's size.
    """
    n_vocab, width = vocab_char_ids.shape
    per_device = -(-n_vocab // mesh.size)
    chunk = min(chunk, per_device)
    n_chunks = -(-per_device // chunk)  # per device
    padded = np.zeros((mesh.size * n_chunks * chunk, width), np.int32)  # padding words are embedded, then dropped
    padded[:n_vocab] = vocab_char_ids
    bilm_params = {name: value for name, value in params.items() if name != "softmax"}
    program = _vocabulary_program(options, mesh, None if split else n_vocab)
    return program(bilm_params, put_global(padded.reshape(-1, chunk, width), by_batch(mesh)))


@functools.lru_cache(maxsize=16)
def _vocabulary_program(options: BiLMOptions, mesh: Mesh, n_vocab: int | None):
    """The jitted vocabulary_embeddings: (params, (chunks, chunk, width) split over the mesh) -> (n_vocab, P)
    replicated, or with n_vocab None every padded row, split by rows."""

    def embed(params, chunks):  # this device's chunks -> their embeddings, one chunk at a time
        return jax.lax.map(lambda ids: token_embedding(params, options, ids), chunks)

    sharded = jax.shard_map(embed, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec("data")),
                            out_specs=PartitionSpec("data"))

    def program(params, chunks):
        out = sharded(params, chunks)  # (chunks, chunk, P)
        return out.reshape(-1, out.shape[-1])[:n_vocab]

    return jax.jit(program, out_shardings=replicated(mesh) if n_vocab is not None else by_batch(mesh))


def _place_softmax(w, b, mesh: Mesh, split: bool, placed: bool = False) -> dict:
    """The full softmax's {"W": (rows, P), "b": (rows,)} on the mesh: replicated (rows = n_vocab), or split by rows,
    padded to a multiple of the mesh's size with rows whose logit is NO_WORD_LOGIT (no weight in the log-sum-exp).

    w: (n_vocab, P) values, or with ``placed`` a jax.Array already on the mesh as it should be, padding rows
    included (``vocabulary_embeddings``); b: (n_vocab,) values.
    """
    n_vocab, where = b.shape[0], by_batch(mesh) if split else replicated(mesh)
    n_rows = w.shape[0] if placed else round_up(n_vocab, mesh.size) if split else n_vocab
    bias = np.full(n_rows, NO_WORD_LOGIT, np.float32)
    bias[:n_vocab] = np.asarray(b)
    if not placed:
        w = put_global(np.pad(np.asarray(w), ((0, n_rows - n_vocab), (0, 0))), where)
    return {"W": w, "b": put_global(bias, where)}


def _zero_totals(options: BiLMOptions) -> dict:
    """{"losses": {direction: (sum, compensation)} float32, "tokens": int32}: nothing summed yet."""
    zero = np.zeros((), np.float32)
    return {"losses": {direction: (zero, zero) for direction in initial_lm_state(options, 1)},
            "tokens": np.zeros((), np.int32)}


def _add(total: tuple[jax.Array, jax.Array], x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Neumaier's compensated sum: (sum, compensation) + x, the error of each float32 addition kept apart."""
    value, compensation = total
    new = value + x
    lost = jnp.where(jnp.abs(value) >= jnp.abs(x), (value - new) + x, (x - new) + value)
    return new, compensation + lost


@functools.lru_cache(maxsize=16)
def _eval_step(options: BiLMOptions, mesh: Mesh, split_softmax: bool = False):
    """The jitted step(bilm params, softmax {"W", "b"}, batch, state, totals) -> (totals, state) of one evaluation
    window: the batch and LSTM state split by rows over the mesh, the softmax too with ``split_softmax``, the rest
    replicated; totals and state are donated."""
    whole, rows = replicated(mesh), by_batch(mesh)

    def step(params, softmax, batch, state, totals):
        params = {**params, "softmax": {"b": softmax["b"]}}
        per_token, state = eval_token_losses(params, options, batch, state, softmax["W"],  # (batch * time,) each
                                             lm_sharding=rows if split_softmax else None)
        losses = {direction: _add(totals["losses"][direction], jnp.sum(values))
                  for direction, values in per_token.items()}
        return {"losses": losses, "tokens": totals["tokens"] + batch["next_token_id"].size}, state

    return jax.jit(step, in_shardings=(whole, rows if split_softmax else whole, rows, rows, whole),
                   out_shardings=(whole, rows), donate_argnums=(3, 4))


def load_run(run_dir: str | os.PathLike, step: int | None = None) -> tuple[dict, TrainConfig]:
    """Params (biLM + "softmax" of the vocabulary's rows, numpy) of a run's checkpoint (latest by default), and its
    TrainConfig."""
    import orbax.checkpoint as ocp

    run_dir = os.path.abspath(os.fspath(run_dir))
    config = load_config(run_dir)
    manager = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise TrainError(f"{run_dir}: no checkpoint in {run_dir}/checkpoints")
    rows = softmax_table_rows(config.options, config.shard_softmax)
    target = jax.eval_shape(_init_fn(config.options, _optimizer_settings(config), rows), jax.random.PRNGKey(0), None)
    # each process restores its own copy: on one device, or a split softmax split over its devices (whole on one,
    # a vocabulary trained split may not fit)
    local = jax.local_devices()
    split = config.shard_softmax and rows % len(local) == 0
    mesh = data_mesh(local if split else local[:1])
    where = state_shardings(target, mesh, split)._replace(
        lstm_state=jax.tree.map(lambda _: replicated(mesh), target.lstm_state))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, where)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except Exception as error:  # noqa: BLE001 - orbax raises many types for a damaged or mismatched checkpoint
        raise TrainError(f"{run_dir}: cannot restore checkpoint {step} ({error})") from None
    assert isinstance(restored, TrainState)
    return jax.device_get(vocabulary_softmax(restored.params, config.options)), config


def inference_options(options: BiLMOptions) -> BiLMOptions:
    """The options of an exported model: n_characters 262, the value inference (``BiLM.from_hdf5``) uses."""
    return options.replace(char_cnn=dataclasses.replace(options.char_cnn, n_characters=262))


def export(run_dir: str | os.PathLike, weights_out: str | os.PathLike, options_out: str | os.PathLike,
           vocab: str | os.PathLike | None = None, token_embeddings_out: str | os.PathLike | None = None) -> None:
    """Write a run's biLM (no softmax) as weights.hdf5 + options.json, loadable by ``elmo_jax.BiLM.from_hdf5``.

    The char table is written in the published 261-row layout (``save_hdf5`` drops padding row 0). With
    ``vocab`` and ``token_embeddings_out``, also writes each vocabulary word's token embedding,
    (n_words, projection_dim) under the HDF5 key "embedding" (bilm-tf's dump_token_embeddings).
    """
    from ..bilm import BiLM
    from ..weights import save_hdf5, save_options, write_atomic

    if (vocab is None) != (token_embeddings_out is None):
        raise ValueError("token embeddings need both a vocabulary and an output path")
    params, config = load_run(run_dir)
    bilm_params = {k: v for k, v in params.items() if k != "softmax"}
    options = inference_options(config.options)
    save_hdf5(bilm_params, options, weights_out)
    save_options(options, options_out, include_training=True)
    if vocab is not None:
        import h5py

        words = Vocabulary.from_file(vocab, require_specials=False).words
        embeddings = BiLM(bilm_params, options).embed_vocabulary(words)

        def write(tmp: str) -> None:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("embedding", data=embeddings.astype(np.float32))

        write_atomic(token_embeddings_out, write)
