"""The training objective of bilm-tf: two LMs over the biLM's pieces, sampled softmax, dropout.

Forward pass of one window (per row, state carried from the previous window):
    x   = token_embedding(char_ids)                      (batch, unroll_steps, P)
    per direction, per layer i: x_in = dropout(x); y = lstm_layer(x_in) (+ x_in if i > 0 and skip); x = y
    out = dropout(x)                                     (batch, unroll_steps, P)
The forward LM reads the forward stream, the backward LM reads the reversed stream; both run forward
in time. Dropout placement is bilm-tf's: DropoutWrapper(input_keep_prob) around (ResidualWrapper around)
each cell, and dropout on the flattened LSTM output before the softmax.

Loss: mean over tokens of the sampled softmax (training) or full softmax (evaluation); the biLM loss
is the mean of the forward and backward losses.

A train step touches few softmax rows (its targets and negatives, ``softmax_candidates``): the trainer
gathers those rows (``gather_softmax``) and differentiates the loss with respect to them, so the
softmax gradient is (rows, P), not (n_tokens_vocab, P) (bilm-tf's IndexedSlices).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..bilm import init_params, token_embedding
from ..elmo import dropout
from ..lstm import LSTMState, lstm_layer, zero_state
from ..options import BiLMOptions

DIRECTIONS = ("forward", "backward")
_HIT_LOGIT = float(np.finfo(np.float32).min)  # an accidental hit's logit: exp() of it is exactly 0


# ---------------------------------------------------------------- params


def init_softmax(options: BiLMOptions, key: jax.Array, rows: int | None = None) -> dict:
    """Softmax params: {"W": (rows, P), "b": (rows,)}; no "W" when tied to the token embeddings.

    Initialised as bilm-tf: W ~ normal(0, 1 / sqrt(P)), b = 0. ``rows`` (default n_tokens_vocab) may pad the
    tables beyond the vocabulary, so that they split evenly over devices: the rows past it are zeros, which no
    step samples, scores or changes (``vocabulary_softmax`` drops them).
    """
    vocab, proj = _n_vocab(options), options.lstm.projection_dim
    rows = vocab if rows is None else rows
    if rows < vocab:
        raise ValueError(f"a softmax of {rows} rows cannot hold the vocabulary's {vocab}")
    softmax = {"b": jnp.zeros((rows,), jnp.float32)}
    if not options.training.share_embedding_softmax:
        weights = jax.random.normal(key, (vocab, proj), jnp.float32) / np.sqrt(proj)
        softmax["W"] = jnp.pad(weights, ((0, rows - vocab), (0, 0)))
    return softmax


def vocabulary_softmax(params: dict, options: BiLMOptions) -> dict:
    """``params`` with its softmax tables cut to the vocabulary's rows (a sharded run pads them, ``init_softmax``)."""
    vocab = _n_vocab(options)
    return {**params, "softmax": {name: table[:vocab] for name, table in params["softmax"].items()}}


def init_train_params(options: BiLMOptions, key: jax.Array, bilm_params: dict | None = None,
                      table_rows: int | None = None) -> dict:
    """biLM params (random, or ``bilm_params`` for fine-tuning) plus a fresh "softmax" entry (of ``table_rows``
    rows, default the vocabulary's: ``init_softmax``).

    Random init follows bilm-tf where it differs from ``init_params``: relu convolution kernels
    uniform(-0.05, 0.05) (Kim et al.), LSTM kernels and projections TF's default glorot_uniform.
    """
    bilm_key, lstm_key, softmax_key = jax.random.split(key, 3)
    if bilm_params is None:
        bilm_params = init_params(options, bilm_key)
        keys = iter(jax.random.split(lstm_key, 4 * options.lstm.n_layers + len(options.char_cnn.filters)))
        if options.char_cnn.activation == "relu":
            for conv in bilm_params["convolutions"]:
                conv["kernel"] = jax.random.uniform(next(keys), conv["kernel"].shape, jnp.float32, -0.05, 0.05)
        for direction in DIRECTIONS:
            for layer in bilm_params["lstm"][direction]:
                for name in ("kernel", "projection"):
                    fan_in, fan_out = layer[name].shape
                    limit = np.sqrt(6.0 / (fan_in + fan_out))
                    layer[name] = jax.random.uniform(next(keys), (fan_in, fan_out), jnp.float32, -limit, limit)
    # Strongly typed float32 (init_params' jnp.full leaves are weak), so the step's output state has the
    # same types as its input and the jitted step compiles once.
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), {k: v for k, v in bilm_params.items()
                                                                   if k != "softmax"})
    params["softmax"] = init_softmax(options, softmax_key, table_rows)
    return params


def _n_vocab(options: BiLMOptions) -> int:
    if options.training.n_tokens_vocab is None:
        raise ValueError("options lack 'n_tokens_vocab': training needs the vocabulary size for the softmax")
    return options.training.n_tokens_vocab


def initial_lm_state(options: BiLMOptions, batch: int) -> dict:
    """Zero carried state: {"forward": [LSTMState per layer], "backward": [...]} of (batch, ...) arrays."""
    lstm = options.lstm
    directions = DIRECTIONS if options.training.bidirectional else DIRECTIONS[:1]
    return {d: [zero_state(batch, lstm.dim, lstm.projection_dim) for _ in range(lstm.n_layers)] for d in directions}


# ---------------------------------------------------------------- the two LMs


def lstm_stack(layers: list[dict], options: BiLMOptions, x: jax.Array, state: list[LSTMState], *,
               key: jax.Array | None, axis_name=None) -> tuple[jax.Array, list[LSTMState]]:
    """One direction's stacked LSTM, forward in time, with bilm-tf's dropout and skip connections.

    Args:
      layers: lstm_layer params per layer; x: (batch, time, P); state: LSTMState per layer.
      axis_name: None, or the pmap / shard_map axis that splits the batch (see ``batch_dropout``).
    Returns:
      (batch, time, P) output after output dropout, and the final LSTMState per layer.
    """
    lstm, rate = options.lstm, options.training.dropout
    mask = jnp.ones(x.shape[:2], bool)  # windows are always full
    new_state = []
    for i, (params, layer_state) in enumerate(zip(layers, state)):
        x_in = batch_dropout(x, rate, key=None if key is None else jax.random.fold_in(key, i), axis_name=axis_name)
        y, s = lstm_layer(params, x_in, mask, layer_state, cell_clip=lstm.cell_clip, proj_clip=lstm.proj_clip)
        if i > 0 and lstm.use_skip_connections:
            y = y + x_in  # ResidualWrapper inside DropoutWrapper: the skip adds the dropped input
        new_state.append(s)
        x = y
    out_key = None if key is None else jax.random.fold_in(key, len(layers))
    return batch_dropout(x, rate, key=out_key, axis_name=axis_name), new_state


def batch_dropout(x: jax.Array, rate: float, *, key: jax.Array | None, axis_name=None) -> jax.Array:
    """``elmo.dropout`` of a batch (batch, ...); under ``axis_name`` x holds this device's rows of the batch.

    The mask is then the one the whole batch gets from ``key``, at this device's rows, so a pmap or
    shard_map step drops exactly what the jit-over-mesh step drops (and devices do not share one mask).
    Each device draws the whole batch's mask: cheap next to the LSTM, whose matmuls cost about
    8 * dim multiply-adds per mask element.
    """
    if key is None or rate == 0.0 or axis_name is None:
        return dropout(x, rate, key=key)
    rows = x.shape[0]
    whole = (rows * jax.lax.psum(1, axis_name), *x.shape[1:])  # psum of a constant: the axis size, static
    keep = jax.random.bernoulli(key, 1.0 - rate, whole)
    keep = jax.lax.dynamic_slice_in_dim(keep, jax.lax.axis_index(axis_name) * rows, rows)  # (batch, ...)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _stack(trees: list):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def lm_outputs(params: dict, options: BiLMOptions, batch: dict, state: dict, *, key: jax.Array | None = None,
               long_token_rows: int | None = None, long_token_groups: int = 1, axis_name=None):
    """Top LSTM outputs of each LM on its stream.

    The directions are stacked on a leading axis and ``lstm_stack`` is vmapped over it, so both LMs run
    in one scan per layer (half the scans to compile and run).

    Args:
      batch: "char_ids" (batch, time, max_chars) and, if bidirectional, "char_ids_reverse".
      state: carried state (see initial_lm_state); key: dropout key, None for none (evaluation).
      long_token_rows: at most this many of the batch's tokens (both streams) are long: see char_cnn.char_cnn.
      long_token_groups: ``long_token_rows`` bounds each of this many equal blocks of batch rows instead (the
        trainer's devices: each picks and convolves its own rows' long tokens).
      axis_name: None, or the pmap / shard_map axis over which the batch is split: the dropout masks are then
        this device's rows of the whole batch's (``batch_dropout``).
    Returns:
      {"forward": (batch, time, P), "backward": ...} and the new carried state.
    """
    directions = list(state)
    # batch-major, so that flattening the tokens keeps a batch split over devices split (each device embeds its rows)
    char_ids = jnp.stack([batch["char_ids" if d == "forward" else "char_ids_reverse"] for d in directions], axis=1)
    x = token_embedding(params, options, char_ids, long_token_rows, long_token_groups)
    x = jnp.moveaxis(x, 1, 0)  # (directions, batch, time, P)
    layers = _stack([params["lstm"][d] for d in directions])
    states = _stack([state[d] for d in directions])
    if key is None:
        out, new = jax.vmap(lambda p, x, s: lstm_stack(p, options, x, s, key=None))(layers, x, states)
    else:
        keys = jnp.stack([jax.random.fold_in(key, d) for d in range(len(directions))])
        out, new = jax.vmap(lambda p, x, s, k: lstm_stack(p, options, x, s, key=k, axis_name=axis_name))(
            layers, x, states, keys)
    outputs = {d: out[i] for i, d in enumerate(directions)}
    new_state = {d: jax.tree.map(lambda a, i=i: a[i], new) for i, d in enumerate(directions)}
    return outputs, new_state


# ---------------------------------------------------------------- softmax


def log_uniform_probs(n_vocab: int) -> jax.Array:
    """P(k) = log((k + 2) / (k + 1)) / log(n_vocab + 1), the Zipfian sampler's law over ids 0..n-1; sums to 1."""
    return _log_uniform_prob(jnp.arange(n_vocab, dtype=jnp.int32), n_vocab)


def _log_uniform_prob(ids: jax.Array, n_vocab: int) -> jax.Array:
    k = ids.astype(jnp.float32)
    return jnp.log1p(1.0 / (k + 1.0)) / jnp.log(n_vocab + 1.0)  # log((k+2)/(k+1)), precise for large k in float32


def log_uniform_draws(key: jax.Array, n_vocab: int, n: int) -> jax.Array:
    """n independent draws from log_uniform_probs (inverse CDF, as TF's LogUniformSampler): (n,) int32."""
    u = jax.random.uniform(key, (n,), jnp.float32)
    ids = jnp.floor(jnp.exp(u * jnp.log(n_vocab + 1.0))).astype(jnp.int32) - 1
    return jnp.clip(ids, 0, n_vocab - 1)


@functools.partial(jax.jit, static_argnums=(1, 2))
def sample_candidates(key: jax.Array, n_vocab: int, n_sampled: int) -> tuple[jax.Array, jax.Array]:
    """``n_sampled`` distinct ids drawn as TF's log_uniform_candidate_sampler(unique=True) draws them.

    Draws with replacement, skipping repeats, until n_sampled distinct ids are found; counts the draws
    (num_tries), which the expected counts need. Draws are made in chunks inside a while loop.
    Returns:
      ids (n_sampled,) int32 and num_tries () int32. With n_sampled >= n_vocab: every id, num_tries = -1.
    """
    if n_sampled >= n_vocab:
        return jnp.arange(n_vocab, dtype=jnp.int32), jnp.int32(-1)
    chunk = max(2 * n_sampled, 64)

    def body(carry):
        i, found, tries, seen, ids = carry
        draws = log_uniform_draws(jax.random.fold_in(key, i), n_vocab, chunk)
        order = jnp.argsort(draws, stable=True)
        sorted_draws = draws[order]
        first_sorted = jnp.concatenate([jnp.ones((1,), bool), sorted_draws[1:] != sorted_draws[:-1]])
        first = jnp.zeros((chunk,), bool).at[order].set(first_sorted)  # first occurrence within the chunk
        new = first & ~seen[draws]
        rank = found + jnp.cumsum(new.astype(jnp.int32))  # distinct ids found up to and including each draw
        take = new & (rank <= n_sampled)
        ids = ids.at[jnp.where(take, rank - 1, n_sampled)].set(draws, mode="drop")
        seen = seen.at[jnp.where(take, draws, n_vocab)].set(True, mode="drop")
        done = rank >= n_sampled
        tries = tries + jnp.where(jnp.any(done), jnp.argmax(done) + 1, chunk).astype(jnp.int32)
        return i + 1, jnp.minimum(rank[-1], n_sampled), tries, seen, ids

    init = (jnp.int32(0), jnp.int32(0), jnp.int32(0), jnp.zeros((n_vocab,), bool), jnp.zeros((n_sampled,), jnp.int32))
    _, _, tries, _, ids = jax.lax.while_loop(lambda c: c[1] < n_sampled, body, init)
    return ids, tries


def expected_count(ids: jax.Array, num_tries: jax.Array, n_vocab: int, n_sampled: int) -> jax.Array:
    """TF's expected count of each id among the sampled candidates: 1 - (1 - p)^num_tries (p * n_sampled when
    num_tries == n_sampled); 1 when every id is a candidate (num_tries = -1). Shape of ids."""
    p = _log_uniform_prob(ids, n_vocab)  # log_uniform_probs(n_vocab)[ids], without the (n_vocab,) table
    unique = -jnp.expm1(num_tries.astype(jnp.float32) * jnp.log1p(-p))
    count = jnp.where(num_tries == n_sampled, p * n_sampled, unique)
    return jnp.where(num_tries < 0, jnp.ones_like(p), count)


def softmax_rows(params: dict, options: BiLMOptions, ids: jax.Array, vocab_char_ids: jax.Array | None) -> jax.Array:
    """Softmax weight rows of ``ids`` (...,) -> (..., P): params["softmax"]["W"], or the token embeddings of the
    vocabulary words (vocab_char_ids (n_vocab, max_chars)) when share_embedding_softmax."""
    if "W" in params["softmax"]:
        return params["softmax"]["W"][ids]
    if vocab_char_ids is None:
        raise ValueError("share_embedding_softmax needs vocab_char_ids (the vocabulary's char ids)")
    return token_embedding(params, options, vocab_char_ids[ids])


def sampled_softmax_loss(hidden: jax.Array, labels: jax.Array, true_w: jax.Array, true_b: jax.Array,
                         sampled: jax.Array, sampled_w: jax.Array, sampled_b: jax.Array,
                         true_count: jax.Array, sampled_count: jax.Array) -> jax.Array:
    """TF's sampled_softmax_loss (num_true=1, remove_accidental_hits=True, subtract_log_q=True).

    Args:
      hidden: (n, P); labels: (n,) ids; true_w: (n, P), true_b: (n,) their softmax rows;
      sampled: (S,) ids; sampled_w: (S, P), sampled_b: (S,); true_count: (n,), sampled_count: (S,) expected counts.
    Returns:
      (n,) per-token losses: cross entropy of the true class among [true, sampled].
    """
    f32 = jnp.float32  # logits and their log-sum-exp in float32 whatever the compute dtype (no-op in float32)
    true_logits = jnp.sum(hidden * true_w, axis=-1).astype(f32) + true_b.astype(f32) - jnp.log(true_count)  # (n,)
    sampled_logits = (hidden @ sampled_w.T).astype(f32)  # (n, S)
    sampled_logits = sampled_logits + (sampled_b.astype(f32) - jnp.log(sampled_count))[None, :]
    sampled_logits = jnp.where(labels[:, None] == sampled[None, :], _HIT_LOGIT, sampled_logits)
    logits = jnp.concatenate([true_logits[:, None], sampled_logits], axis=-1)  # (n, 1 + S)
    return jax.nn.logsumexp(logits, axis=-1) - true_logits


def full_softmax_loss(hidden: jax.Array, labels: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """Cross entropy over the whole vocabulary: hidden (n, P), labels (n,), w (V, P), b (V,) -> (n,)."""
    logits = hidden @ w.T + b[None, :]  # (n, V)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]


def _targets(batch: dict, direction: str) -> jax.Array:
    return batch["next_token_id" if direction == "forward" else "next_token_id_reverse"]


def _directions(options: BiLMOptions) -> tuple[str, ...]:
    """The LMs in sorted order, as jax orders a dict's keys (so as a jitted state lists them); direction i
    draws its negatives with fold_in(key, i)."""
    return tuple(sorted(DIRECTIONS if options.training.bidirectional else DIRECTIONS[:1]))


class Candidates(NamedTuple):
    """The softmax rows of one train step: its targets, its negatives and the distinct ids among them.

    Directions in sorted order ("backward" first). labels: (directions, n) int32 targets, n = batch * unroll_steps;
    sampled: (directions, S) int32 negatives; tries: (directions,) int32 draws the sampler made; ids:
    (directions * (n + S),) int32 the distinct ids of labels and sampled, ascending, padded with n_vocab (no row);
    label_slots (directions, n) and sampled_slots (directions, S): where each label and negative is in ids
    (labels == ids[label_slots]).
    """

    labels: jax.Array
    sampled: jax.Array
    tries: jax.Array
    ids: jax.Array
    label_slots: jax.Array
    sampled_slots: jax.Array


def softmax_candidates(options: BiLMOptions, batch: dict, key: jax.Array) -> Candidates:
    """The targets and sampled negatives of one window, and the distinct softmax rows they touch.

    Each direction draws its own candidates, as bilm-tf's two sampled_softmax_loss ops do.
    Args:
      batch: see data.LMDataset.batches; key: the step's key, the one train_loss gets.
    """
    _, sample_key = jax.random.split(key)  # train_loss's dropout key is the first half
    directions = _directions(options)
    n_vocab, n_sampled = _n_vocab(options), options.training.n_negative_samples_batch
    labels = jnp.stack([_targets(batch, d).reshape(-1) for d in directions])  # (directions, batch * time)
    keys = jnp.stack([jax.random.fold_in(sample_key, d) for d in range(len(directions))])
    sampled, tries = jax.vmap(lambda k: sample_candidates(k, n_vocab, n_sampled))(keys)  # (directions, S)
    touched = jnp.concatenate([labels.reshape(-1), sampled.reshape(-1)])  # (directions * (n + S),)
    ids, slots = jnp.unique(touched, size=touched.size, fill_value=n_vocab, return_inverse=True)
    slots = slots.reshape(-1)
    return Candidates(labels, sampled, tries, ids.astype(jnp.int32), slots[: labels.size].reshape(labels.shape),
                      slots[labels.size :].reshape(sampled.shape))


def gather_softmax(softmax: dict, ids: jax.Array) -> dict:
    """Rows ``ids`` (n,) of each softmax table ("W" (V, P) -> (n, P), "b" (V,) -> (n,)); an id >= V gives zeros."""
    return {name: table.at[ids].get(mode="fill", fill_value=0) for name, table in softmax.items()}


def train_loss(params: dict, options: BiLMOptions, batch: dict, state: dict, *, key: jax.Array,
               vocab_char_ids: jax.Array | None = None, long_token_rows: int | None = None,
               long_token_groups: int = 1, candidates: Candidates | None = None, axis_name=None):
    """Mean of the directions' sampled-softmax losses on one window, with dropout.

    Args:
      params: biLM params and "softmax": the whole tables ("W" (V, P), "b" (V,)) when ``candidates`` is None;
        else only their rows ``candidates.ids``, as ``gather_softmax`` gives them ("W" (n, P), "b" (n,)), so
        that the gradient of the softmax has those rows only.
      batch: see data.LMDataset.batches (arrays of (batch, unroll_steps[, max_chars])).
      state: carried LSTM state; key: dropout and sampler key (one step's key).
      long_token_rows, long_token_groups: see lm_outputs.
      candidates: softmax_candidates(options, batch, key), or None to draw them here.
      axis_name: None, or the pmap / shard_map axis that splits the batch: ``batch`` and ``state`` are this
        device's rows, the dropout masks are its rows of the whole batch's, and the loss is that of its rows
        (the mean over devices, ``lax.pmean``, is the whole batch's: every device has as many tokens).
        The negatives come from ``key`` alone, so every device draws the whole batch's; with ``candidates``,
        pass the whole batch's ids and slots with this device's labels (``trainer.train_step`` does).
    Returns:
      (loss scalar, ({direction: loss}, new state)).
    """
    dropout_key, _ = jax.random.split(key)
    outputs, new_state = lm_outputs(params, options, batch, state, key=dropout_key, long_token_rows=long_token_rows,
                                    long_token_groups=long_token_groups, axis_name=axis_name)
    n_vocab, n_sampled = _n_vocab(options), options.training.n_negative_samples_batch
    softmax = params["softmax"]
    if candidates is None:  # index the whole tables: the softmax gradient is dense, (V, P)
        c = softmax_candidates(options, batch, key)
        true_w, sampled_w = (softmax_rows(params, options, ids, vocab_char_ids) for ids in (c.labels, c.sampled))
        true_b, sampled_b = softmax["b"][c.labels], softmax["b"][c.sampled]
    else:  # the rows of c.ids: labels and negatives are slots in them
        c = candidates
        if "W" in softmax:
            w = softmax["W"]
        elif vocab_char_ids is None:
            raise ValueError("share_embedding_softmax needs vocab_char_ids (the vocabulary's char ids)")
        else:
            # float32, so that the gradients of the slots gathered below add in float32 (exact: a widening)
            w = token_embedding(params, options, vocab_char_ids.at[c.ids].get(mode="fill", fill_value=0))
            w = w.astype(jnp.float32)
        true_w, sampled_w = w[c.label_slots], w[c.sampled_slots]  # (directions, n, P), (directions, S, P)
        true_b, sampled_b = softmax["b"][c.label_slots], softmax["b"][c.sampled_slots]
    directions = _directions(options)
    hidden = jnp.stack([outputs[d] for d in directions])
    hidden = hidden.reshape(len(directions), -1, hidden.shape[-1])  # (directions, batch * time, P)
    # the rows in the LMs' dtype, gathered first: a float32 table's gradient then adds in float32 (see
    # trainer.GATHERED_TABLES); the biases stay as they are, as the logits are summed in float32
    true_w, sampled_w = true_w.astype(hidden.dtype), sampled_w.astype(hidden.dtype)

    def direction_loss(hidden, labels, sampled, tries, true_w, true_b, sampled_w, sampled_b):
        per_token = sampled_softmax_loss(
            hidden, labels, true_w, true_b, sampled, sampled_w, sampled_b,
            expected_count(labels, tries, n_vocab, n_sampled), expected_count(sampled, tries, n_vocab, n_sampled))
        return jnp.mean(per_token)

    per_direction = jax.vmap(direction_loss)(hidden, c.labels, c.sampled, c.tries, true_w, true_b, sampled_w,
                                             sampled_b)  # (directions,)
    losses = {d: per_direction[i] for i, d in enumerate(directions)}
    return jnp.mean(per_direction), (losses, new_state)


def eval_loss(params: dict, options: BiLMOptions, batch: dict, state: dict,
              vocab_char_ids: jax.Array | None = None) -> tuple[dict, dict]:
    """Full-softmax mean loss of each direction on one window, no dropout: ({direction: loss}, new state)."""
    w = softmax_rows(params, options, jnp.arange(_n_vocab(options)), vocab_char_ids)
    per_token, new_state = eval_token_losses(params, options, batch, state, w)
    return {direction: jnp.mean(losses) for direction, losses in per_token.items()}, new_state


def eval_token_losses(params: dict, options: BiLMOptions, batch: dict, state: dict,
                      softmax_w: jax.Array, lm_sharding=None) -> tuple[dict, dict]:
    """Full-softmax loss of every token of one window, no dropout.

    Args:
      softmax_w: (n_tokens_vocab, P) the softmax weights (``softmax_rows`` of every id; for a tied softmax
        the vocabulary's token embeddings, which an evaluation computes once).
      lm_sharding: None, or under jit the sharding the LMs' outputs (batch, time, P) keep (e.g. split by rows):
        with a softmax split by rows, XLA would otherwise run the LMs on the whole batch on every device.
    Returns:
      ({direction: (batch * time,) losses}, new state).
    """
    outputs, new_state = lm_outputs(params, options, batch, state, key=None)
    losses = {}
    for direction, out in outputs.items():
        if lm_sharding is not None:
            out = jax.lax.with_sharding_constraint(out, lm_sharding)
        hidden = out.reshape(-1, out.shape[-1])
        losses[direction] = full_softmax_loss(hidden, _targets(batch, direction).reshape(-1), softmax_w,
                                              params["softmax"]["b"])
    return losses, new_state
