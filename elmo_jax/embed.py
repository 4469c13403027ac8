"""Embedding text at speed: ``Embedder`` (AllenNLP's ``ElmoEmbedder``) over the pure biLM functions.

How a stream of sentences is embedded:
1. Read a window of sentences, sort them by length and cut them into batches of at most ``batch_size``
   rows where padding costs least (``plan_batches``). Each batch is padded to a bucket length (``buckets``;
   longer sentences round up to a multiple of the largest bucket) and a power-of-two row count, so jit
   compiles a small, bounded number of programs whatever the input.
2. Dedupe tokens: the char CNN + highway run once per distinct token of the batch (plus <S>, </S>),
   padded to a bucketed count; with a vocabulary cache, known tokens skip even that.
3. The biLM runs stateless from zero state, so no number depends on batching, order or neighbours.
4. Batches are split across the local devices (``jax.sharding`` mesh); the next batch is prepared on
   the host while the devices work on the current one. Results come back in input order.
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

from .bilm import BiLM, add_sentence_boundaries, bilm_from_token_embeddings, token_embedding
from .characters import BOS_TOKEN, EOS_TOKEN, TokenError, token_to_char_ids
from .options import BiLMOptions
from .sharding import by_batch, data_mesh, replicated, round_up
from .weights import write_atomic

OUTPUT_MODES = ("all", "top", "average", "token")
DEFAULT_BUCKETS = (8, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The padded length of a batch whose longest sentence has ``length`` tokens."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    return round_up(length, buckets[-1])  # longer than every bucket: still embedded, one more shape


def row_bucket(n: int, batch_size: int, n_devices: int = 1) -> int:
    """Rows a batch of n sentences is padded to: the next power of two, at most batch_size, divisible by n_devices."""
    rows = 1
    while rows < n:
        rows *= 2
    return round_up(min(rows, batch_size), n_devices)


def plan_batches(lengths: Sequence[int], batch_size: int, buckets: Sequence[int], n_devices: int = 1,
                 step_overhead_rows: int = 40) -> list[tuple[int, int]]:
    """Cut sentences sorted by length into batches that minimise the padded work.

    A batch of sentences i..j-1 costs bucket(longest) x (padded rows + ``step_overhead_rows``): one scan
    step of r rows costs about as much as r + overhead rows of work, the overhead being the reading of the
    recurrent weights (measured on the 2-core CPU at 2x4096: 45 ms for 16 rows, 83 ms for 64, i.e. ~40
    rows). So a few very long sentences get a small batch of their own instead of making 64 rows run
    their length. Dynamic programming over the sorted order (O(len x batch_size)) finds the cheapest cut.

    Args:
      lengths: sentence lengths in increasing order.
    Returns:
      [(start, end)] covering range(len(lengths)) in order, each at most batch_size long.
    """
    n = len(lengths)
    padded = [bucket_length(length, buckets) for length in lengths]
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(max(0, end - batch_size), end):
            rows = row_bucket(end - start, batch_size, n_devices)
            cost = best[start] + padded[end - 1] * (rows + step_overhead_rows)
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches, end = [], n
    while end > 0:
        batches.append((cut[end], end))
        end = cut[end]
    return batches[::-1]


def distinct_count_bucket(n: int) -> int:
    """Pad a batch's count of distinct tokens to 64, 96, 128, 192, 256, 384, ... so few shapes cover all batches."""
    size = 64
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3  # 2^k -> 1.5 * 2^k -> 2^(k+1)
    return size


class PreparedBatch:
    """Host arrays for one batch: which sentences, their distinct tokens and where each token goes.

    unique_char_ids: (distinct, max_chars), rows 0 and 1 are <S> and </S>; token_index: (rows, time) int32
    into [computed distinct tokens, cached vocabulary]; mask: (rows, time) bool; positions: the window
    positions of the real rows.
    """

    __slots__ = ("positions", "lengths", "unique_char_ids", "token_index", "mask")

    def __init__(self, positions, lengths, unique_char_ids, token_index, mask):
        self.positions, self.lengths = positions, lengths
        self.unique_char_ids, self.token_index, self.mask = unique_char_ids, token_index, mask


def _reduce_layers(activations: jax.Array, mode: str, weights: jax.Array | None) -> jax.Array:
    """(layers, batch, time, dim) -> the requested output: all layers, the top, their average, the token layer, a mix."""
    if mode == "all":
        return activations
    if mode == "top":
        return activations[-1]
    if mode == "average":
        return jnp.mean(activations, axis=0)
    if mode == "token":
        return activations[0]
    return jnp.einsum("l,lbtd->btd", weights.astype(activations.dtype), activations)  # weighted mix


def embed_batch(params: dict, options: BiLMOptions, unique_char_ids: jax.Array, token_index: jax.Array,
                mask: jax.Array, cache: jax.Array | None, mode: str = "all", weights: jax.Array | None = None,
                dtype=jnp.float32) -> jax.Array:
    """One deduplicated, stateless batch.

    Args:
      unique_char_ids: (distinct, max_chars), rows 0/1 = <S>/</S>; token_index: (batch, time) int32 into
      [distinct tokens, cache rows]; mask: (batch, time) bool; cache: (vocab, projection_dim) or None.
    Returns:
      float32 (layers, batch, time, dim) for mode "all", else (batch, time, dim); <S>/</S> removed.
    """
    if dtype != jnp.float32:
        params = jax.tree.map(lambda p: p.astype(dtype), params)
    vectors = token_embedding(params, options, unique_char_ids)  # (distinct, projection_dim)
    if cache is not None:
        vectors = jnp.concatenate([vectors, cache.astype(vectors.dtype)])
    embedded = jnp.take(vectors, token_index, axis=0)  # (batch, time, projection_dim)
    embedded, full_mask = add_sentence_boundaries(embedded, mask, vectors[0], vectors[1])
    out, _ = bilm_from_token_embeddings(params, options, embedded, full_mask)
    activations = out.activations[:, :, 1:-1] * mask[None, :, :, None]  # drop <S>, shift tokens back in place
    return _reduce_layers(activations, mode, weights).astype(jnp.float32)


class Embedder:
    """Embed tokenized sentences with a biLM: ``embed_sentence``, ``embed_sentences``, ``embed_file``.

    Outputs per sentence (n = its number of tokens, dim = 2 * projection_dim), by ``mode``:
    "all" (layers, n, dim), "top" / "average" / "token" (n, dim), or a sequence of per-layer weights
    (n, dim) = sum_k w_k * layer_k. ``sentence_vectors=True`` averages over tokens instead:
    (layers, dim) or (dim,) (TF-Hub ELMo's "default" output is the mean of the weighted mix).
    """

    def __init__(self, options_file: str | os.PathLike | None = None, weight_file: str | os.PathLike | None = None,
                 *, model: BiLM | None = None, batch_size: int = 64, dtype: str = "float32", devices=None,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, vocab: Iterable[str] | None = None,
                 window_batches: int = 16, step_overhead_rows: int = 40):
        if model is None:
            if options_file is None or weight_file is None:
                raise ValueError("Embedder needs options_file and weight_file (or model=BiLM)")
            model = BiLM.from_hdf5(options_file, weight_file)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, found {dtype!r}")
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets must be increasing positive lengths, found {buckets}")
        self.model, self.options = model, model.options
        self.batch_size, self.dtype, self.buckets = batch_size, DTYPES[dtype], tuple(buckets)
        self.window_batches, self.step_overhead_rows = window_batches, step_overhead_rows
        self.mesh = data_mesh(devices)
        self.n_devices = self.mesh.devices.size
        self.params = jax.device_put(model.params, replicated(self.mesh))
        self._char_ids: dict[str, np.ndarray] = {}
        self.compilations = 0  # programs traced so far: one per (rows, time, distinct, mode) shape
        self._jit = jax.jit(self._traced, static_argnames=("mode",))
        self.cache_words: dict[str, int] = {}
        self.cache = None
        if vocab is not None:
            words = [w for w in dict.fromkeys(vocab) if w not in (BOS_TOKEN, EOS_TOKEN)]
            self.cache_words = {w: i for i, w in enumerate(words)}
            self.cache = jax.device_put(jnp.asarray(model.embed_vocabulary(words)), replicated(self.mesh))

    def _traced(self, params, unique_char_ids, token_index, mask, cache, weights, *, mode):
        self.compilations += 1  # runs once per compilation, not per call
        return embed_batch(params, self.options, unique_char_ids, token_index, mask, cache, mode, weights, self.dtype)

    # ----- host side -----
    def _token_ids(self, token: str) -> np.ndarray:
        ids = self._char_ids.get(token)
        if ids is None:
            ids = self._char_ids[token] = token_to_char_ids(token, self.options.char_cnn.max_characters_per_token)
        return ids

    def prepare(self, sentences: Sequence[Sequence[str]], positions: Sequence[int],
                batch_size: int | None = None) -> PreparedBatch:
        """Dedupe and pad one batch (host arrays, shapes bucketed and divisible by the device count)."""
        rows = row_bucket(len(positions), batch_size or self.batch_size, self.n_devices)
        lengths = np.array([len(sentences[p]) for p in positions])
        time_steps = bucket_length(int(lengths.max()), self.buckets)
        distinct = {BOS_TOKEN: 0, EOS_TOKEN: 1}
        for p in positions:
            for token in sentences[p]:
                if token not in distinct and token not in self.cache_words:
                    distinct[token] = len(distinct)
        n_distinct = round_up(distinct_count_bucket(len(distinct)), self.n_devices)
        unique_char_ids = np.zeros((n_distinct, self.options.char_cnn.max_characters_per_token), np.int32)
        for token, i in distinct.items():
            unique_char_ids[i] = self._token_ids(token)
        token_index = np.zeros((rows, time_steps), np.int32)
        mask = np.zeros((rows, time_steps), bool)
        for row, p in enumerate(positions):
            tokens = sentences[p]
            token_index[row, : len(tokens)] = [
                distinct[t] if t in distinct else n_distinct + self.cache_words[t] for t in tokens
            ]
            mask[row, : len(tokens)] = True
        return PreparedBatch(list(positions), lengths, unique_char_ids, token_index, mask)

    def run(self, batch: PreparedBatch, mode: str | Sequence[float] = "all") -> jax.Array:
        """Dispatch one prepared batch to the devices (asynchronous); returns the device array."""
        mode, weights = self._mode(mode)
        shard = by_batch(self.mesh)
        return self._jit(self.params, jax.device_put(batch.unique_char_ids, shard),
                         jax.device_put(batch.token_index, shard), jax.device_put(batch.mask, shard), self.cache,
                         weights, mode=mode)

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
        order = sorted((p for p in range(len(window)) if len(window[p]) > 0), key=lambda p: len(window[p]))
        in_flight = None
        lengths = [len(window[p]) for p in order]
        for start, end in plan_batches(lengths, batch_size, self.buckets, self.n_devices, self.step_overhead_rows):
            batch = self.prepare(window, order[start:end], batch_size)
            output = self.run(batch, mode)  # asynchronous: the next batch is prepared meanwhile
            if in_flight is not None:
                self._collect(*in_flight, results, sentence_vectors)
            in_flight = (batch, output)
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

    @staticmethod
    def _collect(batch: PreparedBatch, output, results, sentence_vectors: bool) -> None:
        host = np.asarray(output)
        time_axis = host.ndim - 2  # (layers, rows, time, dim) or (rows, time, dim)
        for row, (p, n) in enumerate(zip(batch.positions, batch.lengths)):
            value = host[:, row, :n] if time_axis == 2 else host[row, :n]
            results[p] = value.mean(axis=-2) if sentence_vectors else np.ascontiguousarray(value)

    def embed_file(self, input_file, output_file: str | os.PathLike, mode: str | Sequence[float] = "all",
                   batch_size: int | None = None, empty_lines: str = "error", progress: bool = True) -> dict:
        """Embed a file of tokenized sentences (one per line) into HDF5 in the layout of AllenNLP's ``elmo`` command.

        Datasets "0", "1", ... (line index) hold (layers, n, dim) or (n, dim) float32, and
        "sentence_to_index" holds JSON {sentence: "index"}. The file is written under a temporary name and
        renamed when complete: an error or interruption leaves no output file. ``empty_lines``: "error"
        (default; the message names the line) or "skip" (an empty line gets a dataset with 0 tokens).
        ``input_file``: a path, "-" for stdin, or an open binary file (any iterable of lines). Returns counts and timings.
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
                index.setdefault(text.strip(), str(number - 1))
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
