"""The biLM: token embeddings from characters, then a stack of bidirectional LSTM layers.

Pure functions over a params pytree (see ``init_params`` for its layout), plus the ``BiLM`` and
``StatefulBiLM`` classes that hold params and jit them.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .char_cnn import char_cnn
from .characters import ByteCharacters, boundary_char_ids
from .highway import highway
from .lstm import bidirectional_layer, stack_directions, zero_state
from .options import BiLMOptions

BiLMState = dict  # {"forward": [LSTMState per layer], "backward": [LSTMState per layer]}
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # params stay float32; compute may not


class BiLMOutput(NamedTuple):
    """activations: (n_layers + 1, batch, time + 2, 2 * projection_dim), BOS/EOS included, zeros at padding;
    mask: (batch, time + 2) bool."""

    activations: jax.Array
    mask: jax.Array


def init_params(options: BiLMOptions, key: jax.Array) -> dict:
    """Random params in the layout every function here reads (the same layout ``weights.load_hdf5`` returns).

    Scales follow bilm-tf's training initialisers loosely: normal / sqrt(fan_in), zero biases
    (highway carry bias -2 so layers start close to identity, as bilm-tf does).

    Args:
      options: the model's sizes; key: PRNG key.
    Returns:
      {"char_embed": (C, char_dim) with row 0 zero, "convolutions": [{"kernel": (width, char_dim, n), "bias":
      (n,)}], "highway": [{"carry"|"transform": {"kernel": (F, F), "bias": (F,)}}], "projection": {"kernel":
      (W + F, P), "bias": (P,)}, "lstm": {"forward"|"backward": [{"kernel": (2P, 4D), "bias": (4D,),
      "projection": (D, P)}] per layer}} with F = total filters, P = projection_dim, D = lstm dim, C = 262 for
      bilm-tf's byte ids (else n_characters); and with a word embedding (W = word_dim > 0, else 0) also
      "word_embed": (n_words, W) with row 0 zero.
    """
    cnn, lstm, tokens = options.char_cnn, options.lstm, options.tokens
    n_filters, proj, dim = cnn.n_filters, lstm.projection_dim, lstm.dim
    keys = iter(jax.random.split(key, 5 + len(cnn.filters) + 2 * cnn.n_highway + 4 * lstm.n_layers))

    def normal(shape, fan_in):
        return jax.random.normal(next(keys), shape, jnp.float32) / np.sqrt(fan_in)

    n_characters = cnn.n_characters if tokens.bos_ids else 262
    char_embed = jax.random.uniform(next(keys), (n_characters, cnn.char_embedding_dim), jnp.float32, -1.0, 1.0)
    params = {
        "char_embed": char_embed.at[0].set(0.0),
        "convolutions": [
            {"kernel": normal((width, cnn.char_embedding_dim, num), width * cnn.char_embedding_dim),
             "bias": jnp.zeros((num,), jnp.float32)}
            for width, num in cnn.filters
        ],
        "highway": [
            {"carry": {"kernel": normal((n_filters, n_filters), n_filters),
                       "bias": jnp.full((n_filters,), -2.0, jnp.float32)},
             "transform": {"kernel": normal((n_filters, n_filters), n_filters),
                           "bias": jnp.zeros((n_filters,), jnp.float32)}}
            for _ in range(cnn.n_highway)
        ],
        "projection": {"kernel": normal((tokens.word_dim + n_filters, proj), tokens.word_dim + n_filters),
                       "bias": jnp.zeros((proj,), jnp.float32)},
        "lstm": {
            direction: [
                {"kernel": normal((proj + proj, 4 * dim), proj + proj), "bias": jnp.zeros((4 * dim,), jnp.float32),
                 "projection": normal((dim, proj), dim)}
                for _ in range(lstm.n_layers)
            ]
            for direction in ("forward", "backward")
        },
    }
    if tokens.has_words:
        word_embed = jax.random.normal(next(keys), (tokens.n_words, tokens.word_dim), jnp.float32)
        params["word_embed"] = word_embed.at[0].set(0.0)
    return params


def split_token_ids(options: BiLMOptions, token_ids):
    """Token ids (..., width) -> (char ids (..., width - 1 or width), word ids (...,) or None).

    A model with a word embedding (``options.tokens.has_words``) has its word id in the last column; the
    char ids before it may be all ``max_characters_per_token`` or a short token's prefix (``char_cnn``).
    """
    if options.tokens.has_words:
        return token_ids[..., :-1], token_ids[..., -1]
    return token_ids, None


def token_embedding(params: dict, options: BiLMOptions, char_ids: jax.Array,
                    long_token_rows: int | None = None, long_token_groups: int = 1) -> jax.Array:
    """Context-free token vectors: char CNN -> highway -> [word vector, that] -> projection.

    Args:
      char_ids: (..., width) int32 token ids: char ids, then the word id if the model has words
        (``options.token_id_width``; see ``split_token_ids``).
      long_token_rows, long_token_groups: see ``char_cnn.char_cnn`` (None: convolve every position of every token).
    Returns:
      (..., projection_dim); masked tokens are not zeroed here (``bilm`` masks its outputs).
    """
    chars, words = split_token_ids(options, char_ids)
    *lead, n_chars = chars.shape
    x = char_cnn(params, chars.reshape(-1, n_chars), options.char_cnn.activation,
                 long_token_rows, long_token_groups)  # (tokens, n_filters)
    x = highway(params["highway"], x)
    if words is not None:  # ELMoForManyLangs: the word vector comes first
        x = jnp.concatenate([jnp.take(params["word_embed"], words.reshape(-1), axis=0).astype(x.dtype), x], axis=-1)
    x = x @ params["projection"]["kernel"] + params["projection"]["bias"][None, :]  # (tokens, projection_dim)
    return x.reshape(*lead, x.shape[-1])


def add_sentence_boundaries(x: jax.Array, mask: jax.Array, bos: jax.Array, eos: jax.Array):
    """Put ``bos`` before each sentence and ``eos`` after its last real token (AllenNLP's semantics).

    Args:
      x: (batch, time, *features) with sentences left-aligned; mask: (batch, time) bool.
      bos, eos: (*features,) the boundary token's char ids or vector.
    Returns:
      (batch, time + 2, *features) and mask (batch, time + 2) bool.
    """
    _, time = mask.shape
    lengths = jnp.sum(mask, axis=1)  # (batch,)
    padded = jnp.pad(x, [(0, 0), (1, 1)] + [(0, 0)] * (x.ndim - 2))
    positions = jnp.arange(time + 2)[None, :]
    feature_axes = (None,) * (x.ndim - 2)
    is_bos = (positions == 0)[(..., *feature_axes)]
    is_eos = (positions == (lengths + 1)[:, None])[(..., *feature_axes)]  # (batch, time + 2, 1...)
    with_boundaries = jnp.where(is_bos, bos.astype(x.dtype), jnp.where(is_eos, eos.astype(x.dtype), padded))
    return with_boundaries, positions <= (lengths + 1)[:, None]


def boundary_token_ids(options: BiLMOptions) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the sentence-begin and sentence-end tokens: two (token_id_width,) int32 arrays."""
    if options.tokens.bos_ids:
        return np.asarray(options.tokens.bos_ids, np.int32), np.asarray(options.tokens.eos_ids, np.int32)
    return boundary_char_ids(options.char_cnn.max_characters_per_token)


def char_ids_with_boundaries(char_ids: jax.Array, options: BiLMOptions) -> tuple[jax.Array, jax.Array]:
    """token ids (batch, time, width) from batch_to_ids -> (batch, time + 2, width) with <S>/</S>, mask."""
    bos, eos = (jnp.asarray(ids) for ids in boundary_token_ids(options))
    return add_sentence_boundaries(char_ids, jnp.any(char_ids > 0, axis=-1), bos, eos)


def boundary_embeddings(params: dict, options: BiLMOptions) -> tuple[jax.Array, jax.Array]:
    """Token vectors of <S> and </S>: two (projection_dim,) arrays."""
    ids = jnp.stack([jnp.asarray(i) for i in boundary_token_ids(options)])
    vectors = token_embedding(params, options, ids)
    return vectors[0], vectors[1]


def initial_state(options: BiLMOptions, batch: int, dtype=jnp.float32) -> BiLMState:
    """Zero LSTM state: {"forward"|"backward": [LSTMState(h (batch, projection_dim), c (batch, dim)) per layer]}."""
    lstm = options.lstm
    return {
        direction: [zero_state(batch, lstm.dim, lstm.projection_dim, dtype) for _ in range(lstm.n_layers)]
        for direction in ("forward", "backward")
    }


def bilstm(params: dict, options: BiLMOptions, x: jax.Array, mask: jax.Array, state: BiLMState | None = None,
           backward_x: jax.Array | None = None, reset: jax.Array | None = None, fuse_inputs: bool = False,
           feature_major: bool = False, split_directions: bool = False, input_gate_tables: tuple | None = None,
           rows: tuple | None = None):
    """The stacked bidirectional LSTM.

    Args:
      params: {"forward": [layer params], "backward": [layer params]} (see lstm.lstm_layer), or the same
        from ``stacked_lstm_params`` (faster when called many times: the stacking is done once).
      x: (batch, time, projection_dim) token embeddings; mask: (batch, time) bool.
      state: initial BiLMState, None for zeros.
      backward_x: None (the backward LM reads ``x`` from each sentence's end), or the backward LM's inputs
        already reversed within each sentence (batch, time, projection_dim); then the backward outputs come
        back in that reversed order too (see lstm.bidirectional_layer's ``backward_aligned``).
      reset: None, or (batch, time) bool with ``backward_x``: every layer's state is zeroed before these
        steps (a new sentence starts there in a packed lane).
      fuse_inputs, feature_major, split_directions: see lstm.bidirectional_layer (the same numbers, faster for
        inference on a CPU).
      input_gate_tables, rows: None, or the first layer's input gates of every token, (forward, backward) each
        (tokens, 4 * dim) (lstm.token_input_gates), and the tokens' indices (forward, backward) each (batch, time)
        int32, the backward reversed as ``backward_x``: the first layer looks its input gates up
        (lstm.bidirectional_layer) instead of multiplying ``x``.
    Returns:
      per-layer outputs, a list of n_layers arrays (batch, time, 2 * projection_dim) [forward, backward],
      zeros at padding; and the final BiLMState.
    """
    lstm = options.lstm
    if state is None:
        state = initial_state(options, x.shape[0], x.dtype)
    layers = params["stacked"] if "stacked" in params else stacked_lstm_params(params)["stacked"]
    inputs = (x, x if backward_x is None else backward_x)
    outputs, new_state = [], {"forward": [], "backward": []}
    for layer in range(lstm.n_layers):
        looked_up = layer == 0 and input_gate_tables is not None
        ys, (fw_state, bw_state) = bidirectional_layer(
            layers[layer], rows if looked_up else inputs, mask,
            (state["forward"][layer], state["backward"][layer]),
            cell_clip=lstm.cell_clip, proj_clip=lstm.proj_clip, backward_aligned=backward_x is not None,
            reset=reset, fuse_inputs=fuse_inputs, feature_major=feature_major, split_directions=split_directions,
            input_gate_tables=input_gate_tables if looked_up else None,
        )
        if layer > 0 and lstm.use_skip_connections:
            # Residual on the layer's output only; the carried state is untouched.
            ys = (ys[0] + inputs[0], ys[1] + inputs[1])
        new_state["forward"].append(fw_state)
        new_state["backward"].append(bw_state)
        outputs.append(jnp.concatenate(ys, axis=-1) * mask[..., None].astype(ys[0].dtype))
        inputs = ys
    return outputs, new_state


def sentence_start_state(params: dict, options: BiLMOptions, bos: jax.Array, eos: jax.Array, rows: int = 1,
                         **layout) -> list[dict]:
    """Every layer's state at a sentence's first token: the forward LM's after <S>, the backward LM's after </S>,
    each from zero state. Stateless, it is the same for every sentence, so packed lanes (``embed.py``) reset to it
    and run no boundary step.

    Args:
      params: as for ``bilstm``; bos, eos: (projection_dim,) the boundary tokens' vectors; rows: the batch it is
        computed in (``embed.START_ROWS``: a width whose matmuls give each row what a block's give); layout:
        ``bilstm``'s fuse_inputs, feature_major, split_directions.
    Returns:
      per layer {"reset_h": (2, projection_dim), "reset_c": (2, dim)}, [forward, backward] (lstm.RESET_KEYS).
    """
    x = jnp.broadcast_to(bos, (rows, 1, bos.shape[-1]))
    backward_x = jnp.broadcast_to(eos, (rows, 1, eos.shape[-1]))
    _, state = bilstm(params, options, x, jnp.ones((rows, 1), bool), backward_x=backward_x, **layout)
    return [{"reset_h": jnp.stack([f.h[0], b.h[0]]), "reset_c": jnp.stack([f.c[0], b.c[0]])}
            for f, b in zip(state["forward"], state["backward"])]


def stacked_lstm_params(params: dict) -> dict:
    """{"forward": [layer], "backward": [layer]} -> {"stacked": [stack_directions(forward, backward) per layer]}."""
    return {"stacked": [stack_directions(f, b) for f, b in zip(params["forward"], params["backward"])]}


def bilm_from_token_embeddings(params: dict, options: BiLMOptions, token_embeddings: jax.Array, mask: jax.Array,
                               state: BiLMState | None = None) -> tuple[BiLMOutput, BiLMState]:
    """The biLM given token vectors that already include <S>/</S>.

    Args:
      token_embeddings: (batch, time + 2, projection_dim); mask: (batch, time + 2) bool.
    Returns:
      BiLMOutput with activations (n_layers + 1, batch, time + 2, 2 * projection_dim), and the final state.
    """
    real = mask[..., None].astype(token_embeddings.dtype)  # (batch, time + 2, 1): 1 at tokens, 0 at padding
    token_layer = jnp.concatenate([token_embeddings, token_embeddings], axis=-1) * real
    lstm_outputs, new_state = bilstm(params["lstm"], options, token_embeddings, mask, state)
    return BiLMOutput(jnp.stack([token_layer, *lstm_outputs]), mask), new_state


def bilm(params: dict, options: BiLMOptions, char_ids: jax.Array, state: BiLMState | None = None):
    """Char ids -> all representation layers.

    Args:
      char_ids: (batch, time, max_chars) int32 from ``batch_to_ids`` (no <S>/</S>; they are added here).
      state: initial BiLMState (batch rows), None for zeros (stateless).
    Returns:
      BiLMOutput (activations (n_layers + 1, batch, time + 2, 2 * projection_dim), mask (batch, time + 2)),
      and the final BiLMState.
    """
    char_ids, mask = char_ids_with_boundaries(char_ids, options)
    return bilm_from_token_embeddings(params, options, token_embedding(params, options, char_ids), mask, state)


def bilm_from_word_ids(params: dict, options: BiLMOptions, cache: jax.Array, word_ids: jax.Array,
                       state: BiLMState | None = None):
    """The biLM with token vectors looked up in a vocabulary cache instead of computed from characters.

    Args:
      cache: (vocab, projection_dim) from ``BiLM.embed_vocabulary(words)``; row 0 is the padding entry.
      word_ids: (batch, time) int32 indices into the cache, 0 = padding (AllenNLP's ``word_inputs``).
    Returns:
      as ``bilm``; the numbers equal the char path's for the same words.
    """
    bos, eos = boundary_embeddings(params, options)
    mask = word_ids > 0
    embeddings, mask = add_sentence_boundaries(jnp.take(cache, word_ids, axis=0), mask, bos, eos)
    return bilm_from_token_embeddings(params, options, embeddings, mask, state)


@functools.partial(jax.jit, static_argnames=("options",))
def _bilm_jit(params, options, char_ids, state):
    return bilm(params, options, char_ids, state)


@functools.partial(jax.jit, static_argnames=("options",))
def _token_embedding_jit(params, options, char_ids):
    return token_embedding(params, options, char_ids)


class BiLM:
    """A biLM with its params: ``out, state = bilm(char_ids, state=None)``.

    Stateless by default: every call starts from zero state unless a state is passed.
    """

    def __init__(self, params: dict, options: BiLMOptions, characters=None, family: str = "bilm-tf"):
        """params: the nested dict of ``init_params`` / ``weights.load_hdf5``; options: the matching BiLMOptions;
        characters: how tokens become ids (default bilm-tf's UTF-8 bytes, ``characters.ByteCharacters``; an
        ELMoForManyLangs model has ``efml.DictionaryCharacters``); family: where the model comes from, one of
        ``families.FAMILIES``."""
        self.params = params
        self.options = options
        self.characters = model_characters(options, characters)
        self.family = family
        self._compute_params = None

    @property
    def compute_params(self) -> dict:
        """``params`` with the LSTM in ``stacked_lstm_params``'s layout, made once (outside jit) on first use.

        The jitted calls run on these: stacking and splitting the kernels inside a jitted scan copies them on
        every step. Costs a second copy of the LSTM weights; the numbers are the same.
        """
        if self._compute_params is None:
            self._compute_params = {**self.params, "lstm": stacked_lstm_params(self.params["lstm"])}
        return self._compute_params

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> BiLM:
        """Load any published ELMo: the family is detected from what ``path`` holds (``families.detect_family``).

        ``path``: a directory with options.json and one .hdf5 weight file (bilm-tf / AllenNLP), an NLPL
        archive (.zip, or the directory it unpacks to), an ELMoForManyLangs model directory, or a checkpoint
        directory of ``elmo-jax convert``. ``bilm.family`` says which family it was.
        """
        from .families import load_pretrained

        return load_pretrained(path)

    @classmethod
    def from_hdf5(cls, options_file: str | os.PathLike, weight_file: str | os.PathLike) -> BiLM:
        """Load a published (bilm-tf / AllenNLP layout) options.json + weights.hdf5."""
        from .weights import load_hdf5

        options = BiLMOptions.from_path(options_file)
        return cls(load_hdf5(weight_file, options), options)

    @classmethod
    def pretrained(cls) -> BiLM:
        """The built-in English biLM shipped with the package (``elmo_jax.pretrained``); no download."""
        from .pretrained import default_model_files

        return cls.from_hdf5(*default_model_files())

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike) -> BiLM:
        """Load params saved by ``weights.save_checkpoint`` / ``elmo-jax convert``."""
        from .weights import checkpoint_characters, load_checkpoint

        params, options = load_checkpoint(directory)
        return cls(params, options, *checkpoint_characters(directory, options))

    def __call__(self, char_ids, state: BiLMState | None = None) -> tuple[BiLMOutput, BiLMState]:
        """char_ids (batch, time, max_chars) -> (BiLMOutput, final state); see ``bilm``."""
        char_ids = _check_char_ids(char_ids, self.options)
        return _bilm_jit(self.compute_params, self.options, char_ids, state)

    def batch_to_ids(self, sentences) -> np.ndarray:
        """Tokenized sentences -> this model's token ids (batch, time, token_id_width) int32, 0 at padding.

        bilm-tf's ``batch_to_ids`` for the bilm-tf family; the model's own dictionaries for ELMoForManyLangs."""
        return self.characters.batch_to_ids(sentences)

    def token_embedding(self, char_ids) -> jax.Array:
        """token ids (..., token_id_width) -> context-free token vectors (..., projection_dim)."""
        return _token_embedding_jit(self.params, self.options, jnp.asarray(char_ids, jnp.int32))

    def embed_vocabulary(self, words: list[str], batch_size: int = 1024) -> np.ndarray:
        """Token vectors of each word (AllenNLP's ``vocab_to_cache``): (len(words), projection_dim) float32."""
        width = self.options.token_id_width
        ids = self.characters.tokens_ids(words)
        chunks = []
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            padded = np.zeros((batch_size, width), np.int32)  # one compiled shape for every chunk
            padded[: len(chunk)] = chunk
            chunks.append(np.asarray(self.token_embedding(padded))[: len(chunk)])
        return np.concatenate(chunks)

    def initial_state(self, batch: int) -> BiLMState:
        """Zero state for ``batch`` rows (see ``initial_state``)."""
        return initial_state(self.options, batch)


def model_characters(options: BiLMOptions, characters=None):
    """A model's token-to-id mapping: ``characters``, or bilm-tf's UTF-8 bytes (``ByteCharacters``) when none
    is given. ValueError for a model with its own dictionaries and none given, or ids of the wrong width."""
    if characters is None:
        if options.tokens.bos_ids:
            raise ValueError("this model's tokens are ids in its own dictionaries: pass characters=")
        characters = ByteCharacters(options.char_cnn.max_characters_per_token)
    if characters.width != options.token_id_width:
        raise ValueError(f"characters give {characters.width} ids per token, the options expect "
                         f"{options.token_id_width}")
    return characters


def _check_char_ids(char_ids, options: BiLMOptions) -> jax.Array:
    shape = np.shape(char_ids)
    width = options.token_id_width
    if len(shape) != 3 or shape[-1] != width:
        raise ValueError(f"char_ids must have shape (batch, time, {width}), found {shape}"
                         + ("; this model's ids come from BiLM.batch_to_ids" if options.tokens.bos_ids else ""))
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"char_ids is empty: shape {shape}; pass at least one sentence with one token")
    return jnp.asarray(char_ids, jnp.int32)


class StatefulBiLM:
    """A BiLM that carries each batch row's LSTM state into the next call (bilm-tf / AllenNLP behaviour).

    The state of row i after a call is the initial state of row i in the next call. Calls with fewer
    rows than ``max_batch_size`` update only their rows; the others keep their state.
    """

    def __init__(self, bilm: BiLM, max_batch_size: int):
        """Keep one LSTM state row per batch row, up to ``max_batch_size`` rows, starting from zeros."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, found {max_batch_size}")
        self.bilm = bilm
        self.max_batch_size = max_batch_size
        self.reset()

    def reset(self) -> None:
        """Zero the state of every row."""
        self.state = initial_state(self.bilm.options, self.max_batch_size)

    def __call__(self, char_ids) -> BiLMOutput:
        """char_ids (batch, time, max_chars) -> BiLMOutput, continuing each row's state from the previous call
        (rows beyond ``batch`` keep theirs); the new state is kept, not returned."""
        batch = np.shape(char_ids)[0]
        if batch > self.max_batch_size:
            raise ValueError(f"batch of {batch} rows is larger than max_batch_size={self.max_batch_size}")
        rows = jax.tree.map(lambda s: s[:batch], self.state)
        out, new_rows = self.bilm(char_ids, rows)
        self.state = jax.tree.map(lambda s, new: s.at[:batch].set(new), self.state, new_rows)
        return out
