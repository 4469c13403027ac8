"""Embedding text at speed: ``Embedder`` (AllenNLP's ``ElmoEmbedder``) over the pure biLM functions.

How a stream of sentences is embedded:
1. Read a window of sentences, sort them longest first and cut them into batches of ``batch_size``.
2. Dedupe tokens: the char CNN + highway run once per distinct token of the batch (plus <S>, </S>),
   padded to a bucketed count; with a vocabulary cache, known tokens skip even that.
3. The biLSTM runs in time blocks of ``block_steps`` steps, and each block carries only the rows whose
   sentences are still running (a prefix, since rows are sorted longest first), rounded up to a few row
   counts. The backward LM reads each sentence reversed within its own length, so in both directions a
   row is active on a prefix of the time axis and a finished row costs nothing. This is what AllenNLP
   gets from shrinking its batch as sentences end; here the shapes stay static (one compiled program per
   row count), so padding costs at most one block per sentence instead of the batch's longest sentence.
4. The biLM runs stateless from zero state, so no number depends on batching, order or neighbours.
5. Rows are split across the local devices (``jax.sharding`` mesh); blocks are dispatched
   asynchronously, so the host assembles one batch while the devices work on the next.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import char_cnn
from .bilm import COMPUTE_DTYPES, BiLM, bilstm, initial_state, stacked_lstm_params, token_embedding
from .char_cnn import long_tokens
from .characters import BOS_TOKEN, EOS_TOKEN, PAD_CHAR, TokenError, token_to_char_ids
from .options import BiLMOptions
from .sharding import by_batch, data_mesh, replicated, round_up
from .weights import write_atomic

OUTPUT_MODES = ("all", "top", "average", "token")
PAD_ID = PAD_CHAR + 1  # char ids are +1 shifted
BLOCK_STEPS = 8
CHAR_ID_CACHE_SIZE = 200_000  # words whose char ids are kept (~60 MB)


def block_rows(n: int, n_devices: int = 1) -> int:
    """Rows a block with n running sentences is padded to: 1, 2, 4, 8, then multiples of 8, then of 32 above
    128 (few row counts, so few compiled programs), divisible by the device count."""
    if n <= 8:
        rows = 1
        while rows < n:
            rows *= 2
    else:
        rows = round_up(n, 8 if n <= 128 else 32)
    return round_up(rows, n_devices)


def plan_blocks(lengths: Sequence[int], block_steps: int, n_devices: int = 1) -> list[tuple[int, int]]:
    """Time blocks of a batch whose rows are sorted longest first.

    Args:
      lengths: steps of each row (tokens + <S> + </S>), non-increasing.
    Returns:
      [(first step, rows)] for blocks of ``block_steps`` steps: the block needs the rows still running at its
      first step (a prefix of the batch), padded by ``block_rows`` and never more than the batch's rows.
    """
    padded_batch = block_rows(len(lengths), n_devices)
    blocks = []
    for start in range(0, lengths[0], block_steps):
        running = sum(1 for length in lengths if length > start)
        blocks.append((start, min(block_rows(running, n_devices), padded_batch)))
    return blocks


def count_bucket(n: int, minimum: int = 64) -> int:
    """Pad a count of distinct tokens to a multiple of ``minimum`` up to 8x it, then of 2x, 4x, ... (at most
    ~12% padding above 8x, ~25% below it), so a few compiled token-layer programs cover every batch."""
    step = minimum
    while n > 8 * step:
        step *= 2
    return round_up(n, step)


def short_token_chars(options: BiLMOptions) -> int:
    """Char positions that suffice for a short token (see ``char_cnn.short_token_chars``)."""
    return char_cnn.short_token_chars([width for width, _ in options.char_cnn.filters],
                                      options.char_cnn.max_characters_per_token)


class PreparedBatch:
    """Host arrays for one batch, rows sorted longest first.

    positions: the window positions of the rows; lengths: tokens per row (without <S>, </S>);
    short_char_ids: (short distinct, short_token_chars) the first char ids of the batch's short tokens, rows 0
    and 1 are <S> and </S>; long_char_ids: (long distinct, max_chars) or None, the other tokens;
    forward_index: (rows, steps) int32, each row's tokens with <S>/</S> as indices into [short tokens, long
    tokens, cached vocabulary]; backward_index: the same reversed within each row's length; mask: (rows,
    steps) bool; blocks: plan_blocks.
    """

    __slots__ = ("positions", "lengths", "short_char_ids", "long_char_ids", "forward_index", "backward_index",
                 "mask", "blocks")

    def __init__(self, positions, lengths, short_char_ids, long_char_ids, forward_index, backward_index, mask,
                 blocks):
        self.positions, self.lengths = positions, lengths
        self.short_char_ids, self.long_char_ids = short_char_ids, long_char_ids
        self.forward_index, self.backward_index, self.mask, self.blocks = forward_index, backward_index, mask, blocks


def _reduce_layers(activations: jax.Array, mode: str, weights: jax.Array | None) -> jax.Array:
    """(layers, ...) -> the requested output: all layers, the top, their average, the token layer, a weighted mix."""
    if mode == "all":
        return activations
    if mode == "top":
        return activations[-1]
    if mode == "average":
        return jnp.mean(activations, axis=0)
    if mode == "token":
        return activations[0]
    return jnp.einsum("l,l...->...", weights.astype(activations.dtype), activations)  # weighted mix


def token_layer(forward_x: jax.Array, backward_x: jax.Array, mask: jax.Array) -> jax.Array:
    """Layer 0 of a block: (rows, steps, projection_dim) twice -> (rows, steps, 2 * projection_dim), zero at padding."""
    return jnp.concatenate([forward_x, backward_x], axis=-1) * mask[..., None].astype(forward_x.dtype)


def embed_block(params: dict, options: BiLMOptions, forward_x: jax.Array, backward_x: jax.Array, mask: jax.Array,
                state, mode: str = "all", weights: jax.Array | None = None):
    """One time block of the stateless biLM over the running rows of a batch.

    Args:
      forward_x: (rows, steps, projection_dim) token vectors; backward_x: the same rows' tokens reversed
      within each sentence; mask: (rows, steps) bool; state: BiLMState of (rows, ...) at the block's start.
    Returns:
      float32 (layers, rows, steps, 2 * projection_dim) for mode "all", else (rows, steps, 2 * projection_dim);
      the last axis is [forward at step t, backward at reversed step t]; and the state after the block.
    """
    outputs, state = bilstm(params["lstm"], options, forward_x, mask, state, backward_x=backward_x)
    # (layers, rows, steps, 2 * projection_dim)
    activations = jnp.stack([token_layer(forward_x, backward_x, mask), *outputs])
    return _reduce_layers(activations, mode, weights).astype(jnp.float32), state


def assemble_rows(blocks: list[tuple[int, np.ndarray]], lengths: Sequence[int],
                  projection_dim: int) -> list[np.ndarray]:
    """Block outputs -> each sentence's (..., tokens, 2 * projection_dim) in sentence order, <S>/</S> dropped.

    blocks: [(first step, (..., block rows, steps, 2 * projection_dim))], rows sorted as ``lengths``.
    The backward half of row r at step t belongs to token position length + 1 - t (reversed within the row).
    """
    _, first = blocks[0]
    steps = first.shape[-2]
    lead, rows = first.shape[:-3], first.shape[-3]
    full = np.zeros((*lead, rows, len(blocks) * steps, 2 * projection_dim), np.float32)
    for start, block in blocks:
        full[..., : block.shape[-3], start : start + steps, :] = block
    out = []
    for row, n in enumerate(lengths):
        forward = full[..., row, 1 : n + 1, :projection_dim]
        backward = full[..., row, n:0:-1, projection_dim:]  # reversed step t holds position n + 1 - t
        out.append(np.concatenate([forward, backward], axis=-1))
    return out


class Embedder:
    """Embed tokenized sentences with a biLM: ``embed_sentence``, ``embed_sentences``, ``embed_file``.

    Outputs per sentence (n = its number of tokens, dim = 2 * projection_dim), by ``mode``:
    "all" (layers, n, dim), "top" / "average" / "token" (n, dim), or a sequence of per-layer weights
    (n, dim) = sum_k w_k * layer_k. ``sentence_vectors=True`` averages over tokens instead:
    (layers, dim) or (dim,) (TF-Hub ELMo's "default" output is the mean of the weighted mix).
    With no options and weights files (and no ``model``), the built-in English model is used.

    Args:
      options_file, weight_file: a biLM in the bilm-tf / AllenNLP layout (both or neither).
      model: an already loaded BiLM instead of files.
      batch_size: sentences per batch (memory; the numbers do not depend on it).
      dtype: "float32" or "bfloat16" compute (outputs are float32 either way).
      devices: the devices whose mesh splits each batch's rows (default all local devices).
      vocab: words whose token vectors are computed once and cached (AllenNLP's vocab_to_cache).
      window_batches: batches of sentences read and sorted by length at a time (memory stays bounded).
      block_steps: time steps per biLSTM block; finished rows drop out between blocks.
    """

    def __init__(self, options_file: str | os.PathLike | None = None, weight_file: str | os.PathLike | None = None,
                 *, model: BiLM | None = None, batch_size: int = 64, dtype: str = "float32", devices=None,
                 vocab: Iterable[str] | None = None, window_batches: int = 16, block_steps: int = BLOCK_STEPS):
        if model is None:
            if (options_file is None) != (weight_file is None):
                raise ValueError("Embedder needs both options_file and weight_file, or neither (the built-in "
                                 "English model), or model=BiLM")
            model = BiLM.pretrained() if options_file is None else BiLM.from_hdf5(options_file, weight_file)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size}")
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(COMPUTE_DTYPES)}, found {dtype!r}")
        if block_steps < 1 or window_batches < 1:
            raise ValueError(f"block_steps and window_batches must be >= 1, found {block_steps}, {window_batches}")
        self.model, self.options = model, model.options
        self.batch_size, self.dtype, self.block_steps = batch_size, COMPUTE_DTYPES[dtype], block_steps
        self.window_batches = window_batches
        self.mesh = data_mesh(devices)
        self.n_devices = self.mesh.devices.size
        compute_params = jax.tree.map(lambda p: p.astype(self.dtype), model.params)
        compute_params["lstm"] = stacked_lstm_params(compute_params["lstm"])  # once, not in every block call
        self.params = jax.device_put(compute_params, replicated(self.mesh))
        self._char_ids: dict[str, np.ndarray] = {}
        self.compilations = 0  # programs traced so far: one per (rows, mode) block shape, one per token count
        self.short_chars = short_token_chars(self.options)
        self._vectors = jax.jit(self._traced_vectors)
        self._gather = jax.jit(self._traced_gather)
        self._block = jax.jit(self._traced_block, static_argnames=("mode",), donate_argnums=(3,))
        self.cache_words: dict[str, int] = {}
        self.cache = None
        if vocab is not None:
            words = [w for w in dict.fromkeys(vocab) if w not in (BOS_TOKEN, EOS_TOKEN)]
            self.cache_words = {w: i for i, w in enumerate(words)}
            self.cache = jax.device_put(jnp.asarray(model.embed_vocabulary(words)), replicated(self.mesh))

    # ----- jitted pieces (each traced once per shape) -----
    def _traced_vectors(self, params, char_ids):
        self.compilations += 1  # runs once per compilation, not per call
        return token_embedding(params, self.options, char_ids)

    def _traced_gather(self, vectors, forward_index, backward_index):
        self.compilations += 1
        return jnp.take(vectors, forward_index, axis=0), jnp.take(vectors, backward_index, axis=0)

    def _traced_block(self, params, forward_x, backward_x, state, mask, weights, *, mode):
        self.compilations += 1
        return embed_block(params, self.options, forward_x, backward_x, mask, state, mode, weights)

    # ----- host side -----
    def _token_ids(self, token: str) -> np.ndarray:
        ids = self._char_ids.get(token)
        if ids is None:
            if len(self._char_ids) >= CHAR_ID_CACHE_SIZE:  # memory stays bounded on any corpus
                self._char_ids.clear()
            ids = self._char_ids[token] = token_to_char_ids(token, self.options.char_cnn.max_characters_per_token)
        return ids

    def prepare(self, sentences: Sequence[Sequence[str]], positions: Sequence[int]) -> PreparedBatch:
        """Dedupe and lay out one batch: host arrays of PreparedBatch, rows padded by ``block_rows``.

        ``positions`` index ``sentences`` and must be sorted longest first."""
        lengths = np.array([len(sentences[p]) for p in positions])
        if np.any(lengths[1:] > lengths[:-1]):
            raise ValueError("prepare needs positions sorted longest first")
        steps = lengths + 2  # with <S> and </S>
        blocks = plan_blocks(steps.tolist(), self.block_steps, self.n_devices)
        rows = blocks[0][1]
        short, long = [BOS_TOKEN, EOS_TOKEN], []
        seen = set(short)
        for p in positions:
            for token in sentences[p]:
                if token not in seen and token not in self.cache_words:
                    seen.add(token)
                    ids = self._token_ids(token)
                    is_short = self.short_chars == len(ids) or not long_tokens(ids)
                    (short if is_short else long).append(token)
        n_short = round_up(count_bucket(len(short)), self.n_devices)
        n_long = round_up(count_bucket(len(long), 8), self.n_devices) if long else 0
        index = {token: i for i, token in enumerate(short)}
        index.update((token, n_short + i) for i, token in enumerate(long))
        cached = n_short + n_long  # cache rows follow the computed tokens
        max_chars = self.options.char_cnn.max_characters_per_token
        short_char_ids = np.zeros((n_short, self.short_chars), np.int32)
        for i, token in enumerate(short):
            short_char_ids[i] = self._token_ids(token)[: self.short_chars]
        long_char_ids = None
        if long:
            long_char_ids = np.zeros((n_long, max_chars), np.int32)
            for i, token in enumerate(long):
                long_char_ids[i] = self._token_ids(token)
        total_steps = len(blocks) * self.block_steps
        forward_index = np.zeros((rows, total_steps), np.int32)
        backward_index = np.zeros((rows, total_steps), np.int32)
        mask = np.zeros((rows, total_steps), bool)
        for row, p in enumerate(positions):
            ids = [0] + [index[t] if t in index else cached + self.cache_words[t] for t in sentences[p]] + [1]
            forward_index[row, : len(ids)] = ids
            backward_index[row, : len(ids)] = ids[::-1]
            mask[row, : len(ids)] = True
        return PreparedBatch(list(positions), lengths, short_char_ids, long_char_ids, forward_index, backward_index,
                             mask, blocks)

    def run(self, batch: PreparedBatch, mode: str | Sequence[float] = "all") -> list[tuple[int, jax.Array]]:
        """Dispatch one prepared batch to the devices (asynchronous).

        Returns [(first step, block output)], each output (layers, rows, block_steps, 2 * projection_dim) for mode
        "all", else (rows, block_steps, 2 * projection_dim), rows shrinking block by block; see assemble_rows."""
        mode, weights = self._mode(mode)
        shard = by_batch(self.mesh)
        parts = [self._vectors(self.params, jax.device_put(batch.short_char_ids, shard))]
        if batch.long_char_ids is not None:
            parts.append(self._vectors(self.params, jax.device_put(batch.long_char_ids, shard)))
        if self.cache is not None:
            parts.append(self.cache.astype(self.dtype))
        vectors = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
        if mode == "token":  # the context-free layer needs no LSTM: one block covering every step
            rows, total = batch.forward_index.shape
            blocks = [(0, rows, total)]
        else:
            blocks = [(start, rows, self.block_steps) for start, rows in batch.blocks]
        state, outputs = None, []
        for start, rows, steps in blocks:
            window = (slice(0, rows), slice(start, start + steps))
            forward_x, backward_x = self._gather(vectors, jax.device_put(batch.forward_index[window], shard),
                                                 jax.device_put(batch.backward_index[window], shard))
            mask = jax.device_put(batch.mask[window], shard)
            if mode == "token":
                outputs.append((start, token_layer(forward_x, backward_x, mask).astype(jnp.float32)))
                continue
            if state is None:
                state = initial_state(self.options, rows, self.dtype)
            elif state["forward"][0].h.shape[0] != rows:  # rows that have finished drop out
                state = jax.tree.map(lambda a, n=rows: a[:n], state)
            out, state = self._block(self.params, forward_x, backward_x, state, mask, weights, mode=mode)
            outputs.append((start, out))
        return outputs

    def _mode(self, mode):
        if isinstance(mode, str):
            if mode not in OUTPUT_MODES:
                raise ValueError(f"mode must be one of {OUTPUT_MODES} or a list of layer weights, found {mode!r}")
            return mode, None
        weights = np.asarray(mode, np.float32)
        if weights.shape != (self.options.n_representation_layers,):
            raise ValueError(f"mode weights need one value per layer ({self.options.n_representation_layers}), "
                             f"found {list(mode)}")
        return "weighted", jnp.asarray(weights)

    # ----- public API -----
    def embed_sentence(self, tokens: Sequence[str], mode: str | Sequence[float] = "all") -> np.ndarray:
        """One sentence -> (layers, n, dim) for mode "all", else (n, dim)."""
        return next(self.embed_sentences([tokens], mode=mode))

    def embed_sentences(self, sentences: Iterable[Sequence[str]], mode: str | Sequence[float] = "all",
                        batch_size: int | None = None, sentence_vectors: bool = False,
                        allow_empty: bool = False) -> Iterator[np.ndarray]:
        """Embed a stream of tokenized sentences; yields one array per sentence, in input order.

        Memory stays bounded for any corpus (a window of ``window_batches`` batches at a time). An empty
        sentence raises TokenError naming its index, or with ``allow_empty`` yields an array with 0 tokens.
        """
        batch_size = self.batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size}")
        self._mode(mode)
        stream = iter(sentences)
        start = 0
        while True:
            window = list(itertools.islice(stream, batch_size * self.window_batches))
            if not window:
                return
            for offset, sentence in enumerate(window):
                _check_sentence(sentence, start + offset, allow_empty)
            yield from self._embed_window(window, mode, sentence_vectors, batch_size)
            start += len(window)

    def _embed_window(self, window, mode, sentence_vectors, batch_size: int) -> Iterator[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(window)
        order = sorted((p for p in range(len(window)) if len(window[p]) > 0), key=lambda p: -len(window[p]))
        in_flight = None
        for start in range(0, len(order), batch_size):
            batch = self.prepare(window, order[start : start + batch_size])
            outputs = self.run(batch, mode)  # asynchronous: the previous batch is assembled meanwhile
            if in_flight is not None:
                self._collect(*in_flight, results, sentence_vectors)
            in_flight = (batch, outputs)
        if in_flight is not None:
            self._collect(*in_flight, results, sentence_vectors)
        layers, dim = self.options.n_representation_layers, self.options.output_dim
        for p, result in enumerate(results):
            if result is None:  # an allowed empty sentence
                shape = (layers, 0, dim) if mode == "all" else (0, dim)
                result = np.zeros(shape, np.float32)
                if sentence_vectors:
                    result = np.full(shape[:-2] + (dim,), np.nan, np.float32)
            yield result

    def _collect(self, batch: PreparedBatch, outputs, results, sentence_vectors: bool) -> None:
        blocks = [(start, np.asarray(out)) for start, out in outputs]
        for p, value in zip(batch.positions, assemble_rows(blocks, batch.lengths, self.options.lstm.projection_dim)):
            results[p] = value.mean(axis=-2) if sentence_vectors else value

    def embed_file(self, input_file, output_file: str | os.PathLike, mode: str | Sequence[float] = "all",
                   batch_size: int | None = None, empty_lines: str = "error", progress: bool = True) -> dict:
        """Embed a file of tokenized sentences (one per line) into HDF5 in the layout of AllenNLP's ``elmo`` command.

        Datasets "0", "1", ... (line index) hold (layers, n, dim) or (n, dim) float32, and
        "sentence_to_index" holds JSON {sentence: "index"}. The file is written under a temporary name and
        renamed when complete: an error or interruption leaves no output file. ``empty_lines``: "error"
        (default; the message names the line) or "skip" (an empty line gets a dataset with 0 tokens).
        ``input_file``: a path, "-" for stdin, or an open binary file (any iterable of lines).
        Returns counts and timings.
        """
        if empty_lines not in ("error", "skip"):
            raise ValueError(f"empty_lines must be 'error' or 'skip', found {empty_lines!r}")
        import h5py

        stats = {"sentences": 0, "tokens": 0, "seconds": 0.0}
        index: dict[str, str] = {}
        lines = _read_lines(input_file)

        def tokenized():
            for number, text in lines:
                tokens = text.split()
                if not tokens and empty_lines == "error":
                    raise TokenError(f"{_name(input_file)}: line {number} is empty; remove it or use "
                                     f"empty_lines='skip' (--empty-lines skip)")
                index[text.strip()] = str(number - 1)  # a repeated sentence maps to its last line, as AllenNLP
                yield tokens

        def write(tmp: str) -> None:
            started = last = time.perf_counter()
            with h5py.File(tmp, "w") as f:
                for i, array in enumerate(self.embed_sentences(tokenized(), mode, batch_size, allow_empty=True)):
                    f.create_dataset(str(i), data=array)
                    stats["sentences"] += 1
                    stats["tokens"] += array.shape[-2]
                    now = time.perf_counter()
                    if progress and now - last > 1.0:
                        _progress(stats, now - started)
                        last = now
                dataset = f.create_dataset("sentence_to_index", (1,), dtype=h5py.special_dtype(vlen=str))
                dataset[0] = json.dumps(index)
            stats["seconds"] = time.perf_counter() - started
            if progress:
                _progress(stats, stats["seconds"], end="\n")

        write_atomic(output_file, write)
        return stats


def _check_sentence(sentence, index: int, allow_empty: bool) -> None:
    if isinstance(sentence, str) or not isinstance(sentence, Sequence):
        raise TokenError(f"sentence {index} must be a list of str tokens, found {type(sentence).__name__}")
    if not sentence and not allow_empty:
        raise TokenError(f"sentence {index} is empty: every sentence needs at least one token")
    for j, token in enumerate(sentence):
        if not isinstance(token, str) or not token:
            raise TokenError(f"sentence {index}, token {j}: tokens must be non-empty str, found {token!r}")


def _name(source) -> str:
    return "<stdin>" if source == "-" else getattr(source, "name", str(source))


def _read_lines(source) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of a UTF-8 file; a line that is not UTF-8 is an error naming it."""
    if source == "-":
        handle, close = sys.stdin.buffer, False
    elif not isinstance(source, (str, bytes, os.PathLike)):  # an open binary file or any iterable of lines
        handle, close = source, False
    else:
        handle, close = open(source, "rb"), True  # opened now, so a missing file fails before any output
    return _decode(handle, close, _name(source))


def _decode(handle, close: bool, name: str) -> Iterator[tuple[int, str]]:
    try:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            except UnicodeDecodeError as error:
                raise TokenError(f"{name}: line {number} is not UTF-8 text ({error})") from None
            yield number, text.rstrip("\r\n")
    finally:
        if close:
            handle.close()


def _progress(stats: dict, seconds: float, end: str = "") -> None:
    rate = stats["sentences"] / max(seconds, 1e-9)
    tokens = stats["tokens"] / max(seconds, 1e-9)
    print(f"\r{stats['sentences']} sentences, {rate:,.0f} sentences/s, {tokens:,.0f} tokens/s", end=end,
          file=sys.stderr, flush=True)
