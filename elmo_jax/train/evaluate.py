"""After training: test perplexity with the full softmax (bilm-tf's run_test), restoring a run's params, and
exporting the biLM in the published HDF5 layout (bilm-tf's dump_weights / dump_token_embeddings).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from ..characters import Vocabulary
from ..options import BiLMOptions
from ..sharding import data_mesh, replicated
from .data import DataError, LMDataset
from .loss import eval_loss, initial_lm_state
from .trainer import TrainConfig, TrainError, TrainState, _init_fn, _optimizer_settings, load_config


@functools.partial(jax.jit, static_argnames=("options",))
def _eval_step(params, options, batch, state, vocab_char_ids):
    return eval_loss(params, options, batch, state, vocab_char_ids)


def perplexity(params: dict, options: BiLMOptions, files: str, vocab: Vocabulary, *, batch_size: int = 256,
               unroll_steps: int = 1, max_batches: int | None = None) -> dict[str, float]:
    """Test perplexity as bilm-tf's run_test computes it.

    One pass over the shards matched by ``files`` in order, unshuffled, cut into (batch_size, unroll_steps)
    windows with the LSTM state carried; the last partial batch is dropped. The loss of a batch is the
    full-softmax mean over its tokens; perplexity = exp(mean over batches).

    Args:
      params: biLM params with "softmax"; vocab: the training vocabulary (n_tokens_vocab words).
    Returns:
      {"forward", "backward" (if bidirectional), "mean" (exp of the mean of the directions' losses), "batches"}.
    """
    options = options.replace(training=dataclasses.replace(options.training, batch_size=batch_size,
                                                            unroll_steps=unroll_steps, dropout=0.0))
    if options.training.n_tokens_vocab != len(vocab):
        raise DataError(f"{vocab.source}: vocabulary has {len(vocab)} tokens but the options say "
                        f"n_tokens_vocab={options.training.n_tokens_vocab}")
    max_chars = options.char_cnn.max_characters_per_token
    data = LMDataset(files, vocab, batch_size, unroll_steps, shuffle=False, loop=False, max_chars=max_chars)
    vocab_char_ids = jnp.asarray(vocab.char_ids(max_chars)) if options.training.share_embedding_softmax else None
    params = jax.device_put(params)  # once, not per batch
    state = initial_lm_state(options, batch_size)
    totals: dict[str, float] = {}
    n = 0
    for batch in data.batches():
        losses, state = _eval_step(params, options, batch, state, vocab_char_ids)
        for direction, value in jax.device_get(losses).items():
            totals[direction] = totals.get(direction, 0.0) + float(value)
        n += 1
        if max_batches is not None and n >= max_batches:
            break
    if n == 0:
        raise DataError(f"{files!r}: too little text for one batch of batch_size={batch_size} x "
                        f"unroll_steps={unroll_steps} tokens")
    out = {direction: math.exp(total / n) for direction, total in totals.items()}
    out["mean"] = math.exp(sum(totals.values()) / len(totals) / n)
    out["batches"] = n
    return out


def load_run(run_dir: str | os.PathLike, step: int | None = None) -> tuple[dict, TrainConfig]:
    """Params (biLM + "softmax", numpy) of a run's checkpoint (latest by default), and its TrainConfig."""
    import orbax.checkpoint as ocp

    run_dir = os.path.abspath(os.fspath(run_dir))
    config = load_config(run_dir)
    manager = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise TrainError(f"{run_dir}: no checkpoint in {run_dir}/checkpoints")
    target = jax.eval_shape(_init_fn(config.options, _optimizer_settings(config)), jax.random.PRNGKey(0), None)
    sharding = replicated(data_mesh(jax.devices()[:1]))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), target)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except Exception as error:  # noqa: BLE001 - orbax raises many types for a damaged or mismatched checkpoint
        raise TrainError(f"{run_dir}: cannot restore checkpoint {step} ({error})") from None
    assert isinstance(restored, TrainState)
    return jax.device_get(restored.params), config


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
