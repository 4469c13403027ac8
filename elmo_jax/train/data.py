"""Training data with bilm-tf's semantics: sharded sentence files cut into stateful windows.

Each line of a shard is one tokenized sentence. A sentence becomes ``<S> w1 .. wn </S>``; every batch
row is an endless stream of such sentences cut into windows of ``unroll_steps`` tokens, so the LSTM
state of a row carries from one window to the next (bilm-tf's ``LMDataset._get_batch``). The target
of each position is the next token of the stream; a sentence's ``</S>`` is only ever a target.

The backward LM reads its own stream (bilm-tf's ``BidirectionalLMDataset``): the same sentences,
each reversed (``</S> wn .. w1 <S>``), in the same rows and positions; not the forward window flipped.

The stream is a pure function of (seed, shards): epoch ``e`` shuffles the shard order and each
shard's sentences with ``numpy.random.default_rng((seed, e))``. A row that runs out of text takes the
stream's next sentence, rows in order, as bilm-tf's rows do.

Resume in O(1): ``Batches.get_state()`` is a small JSON-ready cursor: the stream's head (epoch, shard,
sentence), each row's sentence and offset in it, and the shuffling generator's state at the start of
each shard those point into. ``batches(state=cursor)`` continues from it after reading at most the
shards it points into, whatever the number of batches already read; ``batches(start=n)`` (replay
from the start) remains for positions without a cursor.

Multi-host: each host builds only its own ``rows``. Which row takes which sentence depends on the
lengths of all sentences before it, so every host reads each shard's lines and counts their tokens,
but only its own rows' sentences are split into tokens, encoded to ids and char ids, and copied.

Why not grain (checkpointable iterators, per-process sharding, prefetch): grain shards *records* over
processes, so a host would read only the sentences assigned to it by index. bilm-tf's rows instead
take sentences from one shared stream whenever they run out, so which row (and host) gets a sentence
depends on the lengths of every sentence before it; splitting the records by process gives another
stream than bilm-tf's and than a one-process run's (the numbers would change with the host count).
Keeping those rows in a grain ``MapDataset``/``IterDataset`` would need a custom stateful transform
holding exactly this module's cursor, so grain would add a dependency without replacing any of it.
"""

from __future__ import annotations

import glob
import os
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from ..characters import BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, TokenError, Vocabulary, token_to_char_ids

CURSOR_FORMAT = 1  # the layout of Batches.get_state()


class DataError(ValueError):
    """Training or test data that cannot be read: no shards, an empty shard, a bad vocabulary or cursor."""


def shard_files(pattern: str) -> list[str]:
    """The files matched by a glob, sorted; DataError naming the glob if there are none."""
    files = sorted(f for f in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(f))
    if not files:
        raise DataError(f"no data files match {pattern!r} (expected a glob like 'data/*.txt' naming "
                        f"text files with one tokenized sentence per line)")
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise DataError(f"{empty[0]}: shard file is empty (matched by {pattern!r}); every shard needs at "
                        f"least one sentence")
    return files


def load_vocabulary(path: str | os.PathLike, n_tokens_vocab: int | None = None) -> Vocabulary:
    """A bilm-tf training vocabulary: ``<S>``, ``</S>``, ``<UNK>`` present, size = options' n_tokens_vocab.

    Raises DataError naming the file (missing, no specials, size mismatch).
    """
    try:
        vocab = Vocabulary.from_file(path, require_specials=True)
    except TokenError as error:
        raise DataError(str(error)) from None
    if n_tokens_vocab is not None and len(vocab) != n_tokens_vocab:
        raise DataError(f"{os.fspath(path)}: vocabulary has {len(vocab)} tokens but the options say "
                        f"n_tokens_vocab={n_tokens_vocab}; they must be equal (the softmax has one row per token)")
    return vocab


def read_shard(path: str) -> list[str]:
    """One shard's sentences as lines (blank lines skipped); DataError if there are none."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if not line.isspace()]
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: shard is not UTF-8 text ({error})") from None
    except OSError as error:
        raise DataError(f"{path}: shard cannot be read ({error})") from None
    if not lines:
        raise DataError(f"{path}: shard has no sentences (only blank lines)")
    return lines


class _Visit(NamedTuple):
    """One shard as one epoch reads it: its i-th sentence is lines[order[i]], of lengths[order[i]] tokens."""

    lines: list[str]
    order: np.ndarray  # (sentences,) int
    lengths: np.ndarray  # (sentences,) int


class _Sentence:
    """One sentence of a built row: token ids (n + 2,) with <S>/</S>, and its tokens for char ids."""

    __slots__ = ("chars", "ids", "tokens")

    def __init__(self, ids: np.ndarray, tokens: list[str]):
        self.ids, self.tokens, self.chars = ids, tokens, None

    def char_ids(self, cache: CharIdCache) -> np.ndarray:
        """(n + 2, max_chars) int32, computed once."""
        if self.chars is None:
            self.chars = np.stack([cache.get(token) for token in [BOS_TOKEN, *self.tokens, EOS_TOKEN]])
        return self.chars


class _Row:
    """A batch row's place in the stream: its sentence (epoch, shard, sentence) of ``length`` ids, read up to
    ``offset``; a row this host builds also keeps the sentence's line (encoded when first written)."""

    __slots__ = ("length", "line", "offset", "ref", "sentence")

    def __init__(self, ref: tuple[int, int, int] | None = None, length: int = 0, offset: int = 0):
        self.ref, self.length, self.offset, self.line, self.sentence = ref, length, offset, None, None


class CharIdCache:
    """token -> its (max_chars,) char ids, keeping the ``size`` most recently used tokens (an LRU; 0: none).

    Char ids are a pure function of the token, so the bound changes memory and time, never the ids.
    """

    def __init__(self, max_chars: int, size: int):
        if size < 0:
            raise DataError(f"char_cache_size must be >= 0, found {size}")
        self.max_chars, self.size = max_chars, size
        self._rows: OrderedDict[str, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, token: str) -> np.ndarray:
        row = self._rows.get(token)
        if row is not None:
            self._rows.move_to_end(token)
            return row
        row = token_to_char_ids(token, self.max_chars)
        if self.size:
            self._rows[token] = row
            if len(self._rows) > self.size:
                self._rows.popitem(last=False)  # the least recently used
        return row


class LMDataset:
    """Batches of stateful windows over sharded sentence files (bilm-tf's (Bidirectional)LMDataset).

    Args:
      pattern: glob of shard files.
      vocab: the training Vocabulary (ids for targets; unknown words -> <UNK>).
      batch_size, unroll_steps: each batch is (batch_size, unroll_steps) tokens.
      seed: the stream is a pure function of seed (shuffle=True) and the shards.
      shuffle: shuffle shards and sentences per epoch (training); False reads them in order (test).
      loop: endless epochs (training); False stops after one pass and drops the last, partial batch
        (bilm-tf's test mode).
      max_chars: characters per token.
      rows: the global row indices (sorted, distinct) this host builds (default all); a batch holds them in
        that order. Every host follows every row's place in the stream, so the streams are the global ones.
      char_cache_size: char ids of at most this many distinct tokens are kept (least recently used go first;
        200 bytes each with 50 chars, so 20 MB by default); the batches are the same whatever the size.

    ``stats`` counts the work done: "shards_read", "sentences_encoded".
    """

    def __init__(self, pattern: str, vocab: Vocabulary, batch_size: int, unroll_steps: int, *, seed: int = 0,
                 shuffle: bool = True, loop: bool = True, max_chars: int = 50, rows: Sequence[int] | None = None,
                 char_cache_size: int = 100_000):
        if batch_size < 1 or unroll_steps < 1:
            raise DataError(f"batch_size and unroll_steps must be >= 1, found {batch_size} and {unroll_steps}")
        for special in (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN):
            if special not in vocab.index:
                raise DataError(f"{vocab.source}: vocabulary lacks the special token {special}")
        self.pattern, self.files = pattern, shard_files(pattern)
        self.vocab, self.batch_size, self.unroll_steps = vocab, batch_size, unroll_steps
        self.seed, self.shuffle, self.loop, self.max_chars = seed, shuffle, loop, max_chars
        self.rows = tuple(range(batch_size)) if rows is None else tuple(int(r) for r in rows)
        ordered = list(self.rows) == sorted(set(self.rows))
        if not (self.rows and ordered and 0 <= self.rows[0] and self.rows[-1] < batch_size):
            raise DataError(f"rows {list(self.rows)} must be distinct, sorted, non-empty row indices of the batch of "
                            f"{batch_size} rows")
        self.char_cache = CharIdCache(max_chars, char_cache_size)
        self.stats: Counter = Counter()

    def batches(self, start: int = 0, state: dict[str, Any] | None = None) -> Batches:
        """Batches from position ``start`` (batches already read, reached by replaying the stream without
        encoding it), or from a cursor ``state`` (``Batches.get_state()``; no replay).

        Each batch is a dict of numpy arrays (batch = len(rows), all rows by default):
          token_ids, next_token_id (batch, unroll_steps) int32; char_ids (batch, unroll_steps, max_chars) int32;
          and token_ids_reverse, next_token_id_reverse, char_ids_reverse for the backward stream.
        """
        if state is not None:
            return Batches.from_state(self, state)
        batches = Batches(self)
        batches.skip(start)
        return batches

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.random.Generator | None]:
        """An epoch's shard order (n_shards,) and its generator, next to shuffle the first shard's sentences."""
        if not self.shuffle:
            return np.arange(len(self.files)), None
        rng = np.random.default_rng((self.seed, epoch))
        return rng.permutation(len(self.files)), rng

    def _read_visit(self, file_index: int, rng: np.random.Generator | None) -> _Visit:
        """A shard read, its sentences in the order ``rng`` shuffles them to (advancing rng)."""
        lines = read_shard(self.files[file_index])
        self.stats["shards_read"] += 1
        lengths = np.fromiter((len(line.split()) for line in lines), np.int64, len(lines))
        order = rng.permutation(len(lines)) if rng is not None else np.arange(len(lines))
        return _Visit(lines, order, lengths)

    def _encode(self, line: str) -> _Sentence:
        self.stats["sentences_encoded"] += 1
        tokens = line.split()
        return _Sentence(self.vocab.encode(tokens), tokens)


class _Stream:
    """The head of the sentence stream: the (epoch, shard, sentence) it gives next, shard after shard.

    rng_states: (epoch, shard) -> the shuffling generator's state before that shard's sentences were shuffled
    (what a cursor needs to read one of its sentences again).
    """

    def __init__(self, data: LMDataset, epoch: int = 0, shard: int = 0, sentence: int = 0,
                 rng_state: dict | None = None):
        self.data, self.epoch, self.shard, self.sentence = data, epoch, shard, sentence
        self.visit: _Visit | None = None
        self.order, self.rng = None, None  # this epoch's shard order and generator, once computed
        self.rng_state = rng_state  # restores the generator before the first shard opened (a cursor's)
        self.rng_states: dict[tuple[int, int], dict] = {}

    def next(self) -> tuple[tuple[int, int, int], int, str] | None:
        """(its (epoch, shard, sentence), its number of tokens, its line) of the next sentence; None at the end."""
        while self.visit is None or self.sentence >= len(self.visit.lines):
            if self.visit is not None:
                self.visit, self.shard, self.sentence = None, self.shard + 1, 0
            if not self.open():
                return None
        index = self.visit.order[self.sentence]
        self.sentence += 1
        return (self.epoch, self.shard, self.sentence - 1), int(self.visit.lengths[index]), self.visit.lines[index]

    def open(self) -> bool:
        """Read the head's shard (moving to the next epoch after the last); False after the last epoch."""
        if self.visit is not None:
            return True
        if self.shard == len(self.data.files):
            self.epoch, self.shard, self.order = self.epoch + 1, 0, None
        if not self.data.loop and self.epoch > 0:
            return False
        if self.order is None:
            self.order, self.rng = self.data._epoch_order(self.epoch)
        if self.rng is not None:
            if self.rng_state is not None:
                self.rng.bit_generator.state, self.rng_state = self.rng_state, None
            self.rng_states[(self.epoch, self.shard)] = self.rng.bit_generator.state
        self.visit = self.data._read_visit(self.order[self.shard], self.rng)
        return True

    def position(self) -> tuple[list[int], dict | None]:
        """[epoch, shard, sentence] of the next sentence and the generator state a resume starts that shard with
        (None: the epoch's own, or its shard not yet read)."""
        if self.visit is None:
            return [self.epoch, self.shard, self.sentence], self.rng_state
        if self.sentence < len(self.visit.lines):
            return [self.epoch, self.shard, self.sentence], self.rng_states.get((self.epoch, self.shard))
        if self.shard + 1 < len(self.data.files):  # this shard is done: the next one, with the generator as it is
            return [self.epoch, self.shard + 1, 0], None if self.rng is None else self.rng.bit_generator.state
        return [self.epoch + 1, 0, 0], None


class Batches(Iterator):
    """An LMDataset's batches from some position on; ``get_state()`` is the cursor that continues them.

    position: batches read (produced or skipped) so far.
    """

    def __init__(self, data: LMDataset, stream: _Stream | None = None, rows: list[_Row] | None = None,
                 position: int = 0):
        self.data, self.position = data, position
        self.stream = stream if stream is not None else _Stream(data)
        self.rows = rows if rows is not None else [_Row() for _ in range(data.batch_size)]
        self.local = {row: i for i, row in enumerate(data.rows)}  # global row -> its index in a batch

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._fill(write=True)
        if batch is None:
            raise StopIteration
        return batch

    def skip(self, n: int) -> None:
        """Advance n batches without building them (no sentence is split or encoded)."""
        for _ in range(n):
            if self._fill(write=False) is None:
                return

    def get_state(self) -> dict[str, Any]:
        """The cursor (JSON-ready) at ``position``: from it, ``LMDataset.batches(state=...)`` continues exactly.

        {"format", "position", "batch_size", "unroll_steps", "seed", "shuffle", "shards" (their number);
         "stream": [epoch, shard, sentence] read next, "stream_rng": generator state to open that shard with or None;
         "rows": per row [epoch, shard, sentence, length in ids, offset] or None (no sentence yet);
         "shard_rngs": [[epoch, shard, generator state before its sentences were shuffled], ...] for the rows'.}
        """
        data, stream = self.data, self.stream
        head, head_rng = stream.position()
        visits = sorted({row.ref[:2] for row in self.rows if row.ref is not None})
        return {"format": CURSOR_FORMAT, "position": self.position, "batch_size": data.batch_size,
                "unroll_steps": data.unroll_steps, "seed": data.seed, "shuffle": data.shuffle,
                "shards": len(data.files), "stream": head, "stream_rng": head_rng,
                "rows": [None if row.ref is None else [*row.ref, row.length, row.offset] for row in self.rows],
                "shard_rngs": [[*visit, stream.rng_states[visit]] for visit in visits] if data.shuffle else []}

    @classmethod
    def from_state(cls, data: LMDataset, state: dict[str, Any]) -> Batches:
        """The batches a cursor continues; reads only the shards the stream's head and this host's rows are in."""
        _check_cursor(data, state)
        stream = _Stream(data, *state["stream"], rng_state=state["stream_rng"])
        stream.rng_states = {(e, s): rng for e, s, rng in state["shard_rngs"]}
        rows = [_Row() if saved is None else _Row(tuple(saved[:3]), saved[3], saved[4]) for saved in state["rows"]]
        opened = {}  # (epoch, shard) -> (visit, the epoch's shard order, its generator after the visit)
        for r in data.rows:
            row = rows[r]
            if row.ref is None:
                continue
            epoch, shard, sentence = row.ref
            if (epoch, shard) not in opened:
                order, rng = data._epoch_order(epoch)
                if rng is not None:
                    rng.bit_generator.state = stream.rng_states[(epoch, shard)]
                opened[(epoch, shard)] = data._read_visit(order[shard], rng), order, rng
            visit = opened[(epoch, shard)][0]
            index = visit.order[sentence] if sentence < len(visit.order) else None
            if index is None or visit.lengths[index] + 2 != row.length:
                raise DataError(f"{data.files[data._epoch_order(epoch)[0][shard]]}: shard differs from the one the "
                                f"data cursor was saved with (its sentence {sentence} is not {row.length - 2} tokens)")
            row.line = visit.lines[index]
        if (stream.epoch, stream.shard) in opened:  # the head reads on in a shard just read for a row
            stream.visit, stream.order, stream.rng = opened[(stream.epoch, stream.shard)]
            stream.rng_state = None
        return cls(data, stream, rows, position=state["position"])

    def _advance(self, row: _Row, steps: int, keep_line: bool) -> bool:
        """Move ``row`` on by ``steps`` tokens without building them, as ``_fill`` does (the same sentences and
        offsets), keeping the line of a sentence pulled if ``keep_line``; False at the end of data."""
        while True:
            if row.ref is not None:
                left = row.length - 1 - row.offset
                if left >= steps:
                    row.offset += steps
                    return True
                steps -= left
            pulled = self.stream.next()
            if pulled is None:
                return False
            row.ref, n_tokens, line = pulled
            row.length, row.offset, row.sentence = n_tokens + 2, 0, None
            row.line = line if keep_line else None

    def _fill(self, write: bool) -> dict[str, np.ndarray] | None:
        """One batch: advance every row by unroll_steps tokens (bilm-tf's _get_batch); None at the end of data."""
        data, steps = self.data, self.data.unroll_steps
        if write:
            shape = (len(data.rows), steps)
            out = {name: np.zeros(shape, np.int32)
                   for name in ("token_ids", "next_token_id", "token_ids_reverse", "next_token_id_reverse")}
            out["char_ids"] = np.zeros((*shape, data.max_chars), np.int32)
            out["char_ids_reverse"] = np.zeros((*shape, data.max_chars), np.int32)
        for r, row in enumerate(self.rows):
            i = self.local.get(r)
            if not write or i is None:  # skipping, or another host's row: only its place moves on
                if not self._advance(row, steps, keep_line=i is not None):
                    return None
                continue
            pos = 0
            while pos < steps:
                if row.ref is None or row.length - row.offset <= 1:  # only </S> left: it was the last target
                    pulled = self.stream.next()
                    if pulled is None:
                        return None
                    row.ref, n_tokens, row.line = pulled
                    row.length, row.offset, row.sentence = n_tokens + 2, 0, None
                offset = row.offset
                n = min(row.length - 1 - offset, steps - pos)
                if row.sentence is None:
                    row.sentence = data._encode(row.line)
                ids, chars = row.sentence.ids, row.sentence.char_ids(data.char_cache)
                rev_ids, rev_chars = ids[::-1], chars[::-1]
                out["token_ids"][i, pos : pos + n] = ids[offset : offset + n]
                out["next_token_id"][i, pos : pos + n] = ids[offset + 1 : offset + n + 1]
                out["char_ids"][i, pos : pos + n] = chars[offset : offset + n]
                out["token_ids_reverse"][i, pos : pos + n] = rev_ids[offset : offset + n]
                out["next_token_id_reverse"][i, pos : pos + n] = rev_ids[offset + 1 : offset + n + 1]
                out["char_ids_reverse"][i, pos : pos + n] = rev_chars[offset : offset + n]
                if offset + n == len(ids) - 1:
                    row.sentence.chars = None  # the row is done with it; free the memory
                row.offset = offset + n
                pos += n
        self.position += 1
        if len(self.stream.rng_states) > 2 * len(self.rows) + 2:  # keep the states the rows and head still need
            needed = {row.ref[:2] for row in self.rows if row.ref is not None}
            needed.add((self.stream.epoch, self.stream.shard))
            self.stream.rng_states = {k: v for k, v in self.stream.rng_states.items() if k in needed}
        return out if write else {}


def _check_cursor(data: LMDataset, state: dict[str, Any]) -> None:
    """DataError naming the field when a cursor does not belong to this dataset's stream."""
    if not isinstance(state, dict) or state.get("format") != CURSOR_FORMAT:
        raise DataError(f"data cursor has format {state.get('format') if isinstance(state, dict) else None!r}, "
                        f"expected {CURSOR_FORMAT}")
    expected = {"batch_size": data.batch_size, "unroll_steps": data.unroll_steps, "seed": data.seed,
                "shuffle": data.shuffle, "shards": len(data.files)}
    for field, value in expected.items():
        if state.get(field) != value:
            raise DataError(f"data cursor was saved with {field}={state.get(field)!r} but the data has {value!r} "
                            f"({data.pattern!r}): resume on the data the run was trained on, or continue on other "
                            f"data from its start (--resume --train-prefix)")
    if len(state.get("rows") or ()) != data.batch_size:
        raise DataError(f"data cursor has {len(state.get('rows') or ())} rows, expected {data.batch_size}")
